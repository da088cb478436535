"""Single-query attention over a static KV buffer (CUDA-graph decoding), split over the keys (flash-decoding).

The static KV layer (zoo.cache.StaticKVLayer) keeps keys and values in fixed buffers [B, S, Hkv, D] and the
number of stored tokens in a device tensor `length`, so that a captured step serves every replay. A dense-mask
SDPA kernel over the buffer runs one program per (row, head) and walks all S keys: 124 us per layer at batch 1
and 2K keys on an H200, where the keys and values of that layer are 0.4 MB (0.1 us at the copy bandwidth).
Here the keys are cut into `splits` chunks, each program reduces one chunk of one (row, head) with an online
softmax into (max, sum, weighted values), and a second kernel combines the chunks. `length` is read on the device:
slots at or past it are masked (their loads are skipped), and with a window only the last `window` tokens count.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from zoo_kernels._device import sm_count


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
                  H, GROUP, S, D, CHUNK, WINDOW, scale,
                  s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
                  HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_d, mask=md, other=0.0).to(tl.float32) * scale
    length = tl.load(len_ptr)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(length - WINDOW, 0)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = split * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        visible = (offs_n < length) & (offs_n >= lo) & (offs_n < start + CHUNK) & (offs_n < S)
        m2 = visible[:, None] & md[None, :]
        k = tl.load(k_ptr + b.to(tl.int64) * s_kb + offs_n[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1)
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + b.to(tl.int64) * s_vb + offs_n[:, None] * s_vs + kvh * s_vh + offs_d[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    out = bh * nsplit + split
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out.to(tl.int64) * BLOCK_D + offs_d, acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, H, D, NSPLIT, s_ob, s_oh,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    ms = offs_s < NSPLIT
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + bh * NSPLIT + offs_s, mask=ms, other=-float("inf"))
    l = tl.load(l_ptr + bh * NSPLIT + offs_s, mask=ms, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(m == -float("inf"), 0.0, tl.exp(m - top))
    acc = tl.load(acc_ptr + (bh * NSPLIT + offs_s[:, None]).to(tl.int64) * BLOCK_D + offs_d[None, :],
                  mask=ms[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=offs_d < D)


def splits_for(batch_heads: int, slots: int, sms: int = 132) -> int:
    """Key chunks per (row, head): about four programs per SM in all, chunks of at least 64 keys."""
    want = max(1, -(-4 * sms // batch_heads))
    return max(1, min(want, slots // 64, 128))


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                     window: int | None = None, scale: float | None = None, splits: int | None = None
                     ) -> torch.Tensor:
    """q [B, 1, H, D]; keys, values [B, S, Hkv, D] (unit stride over D); length int64 [1] on the device: the
    visible keys are slots [max(0, length - window), length). Returns o [B, 1, H, D] in q's dtype."""
    B, T, H, D = q.shape
    S, Hkv = keys.shape[1], keys.shape[2]
    if T != 1 or H % Hkv or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention: one query per row, H a multiple of the KV heads, unit stride over D")
    scale = D ** -0.5 if scale is None else scale
    if splits is None:
        sms = sm_count(q.device)
        splits = splits_for(B * H, S, sms)
    chunk = -(-S // splits)
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 64 if block_d <= 128 else 32
    chunk = -(-chunk // block_n) * block_n
    splits = -(-S // chunk)
    m = torch.empty(B * H, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, splits, block_d, device=q.device, dtype=torch.float32)
    q3 = q[:, 0]
    _split_kernel[(B * H, splits)](
        q3, keys, values, length, m, l, acc, H, H // Hkv, S, D, chunk, window or 0, float(scale),
        q3.stride(0), q3.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        HAS_WINDOW=window is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    o = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    _combine_kernel[(B * H,)](m, l, acc, o, H, D, splits, o.stride(0), o.stride(2),
                              BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4)
    return o


def reference(q, keys, values, length: int, window: int | None = None) -> torch.Tensor:
    """The same attention in fp32 torch (tests)."""
    lo = max(0, length - window) if window else 0
    k = keys[:, lo:length].float().repeat_interleave(q.shape[2] // keys.shape[2], dim=2)
    v = values[:, lo:length].float().repeat_interleave(q.shape[2] // keys.shape[2], dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q[:, 0].float(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v)[:, None].to(q.dtype)




@triton.jit
def _rope_kernel(x_ptr, pos_ptr, inv_ptr, y_ptr, H, s_xb, s_xh, s_yb, s_yh, s_pb,
                 HALF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    pos = tl.load(pos_ptr + b * s_pb).to(tl.float32)
    freq = pos * tl.load(inv_ptr + offs, mask=m, other=0.0)
    c = tl.cos(freq)
    s = tl.sin(freq)
    base = x_ptr + b * s_xb + h * s_xh
    x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=m, other=0.0).to(tl.float32)
    out = y_ptr + b * s_yb + h * s_yh
    tl.store(out + offs, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(out + HALF + offs, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=m)


def rope_one_token(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) of one token per row in one kernel: x [B, 1, H, D] (unit stride over D),
    position_ids [B, 1] on the device, inv_freq [D/2] fp32. The same formula as the attention mixer's
    rope_tables + apply_rope (fp32, rounded once), which take about ten kernels per call."""
    B, T, H, D = x.shape
    if T != 1 or D % 2 or x.stride(-1) != 1:
        raise ValueError("rope_one_token: x must be [B, 1, H, D] with an even D and unit stride over D")
    y = torch.empty(B, 1, H, D, device=x.device, dtype=x.dtype)
    _rope_kernel[(B * H,)](x, position_ids, inv_freq, y, H, x.stride(0), x.stride(2), y.stride(0), y.stride(2),
                           position_ids.stride(0), HALF=D // 2, BLOCK=max(16, triton.next_power_of_2(D // 2)),
                           num_warps=1)
    return y


__all__ = ["decode_attention", "reference", "rope_one_token", "splits_for"]
