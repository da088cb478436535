"""Single-query attention over a static KV buffer (CUDA-graph decoding), split over the keys (flash-decoding).

The static KV layer (zoo.cache.StaticKVLayer) keeps keys and values in fixed buffers [B, S, Hkv, D] and the
number of stored tokens in a device tensor `length`, so that a captured step serves every replay. A dense-mask
SDPA kernel over the buffer runs one program per (row, head) and walks all S keys: 124 us per layer at batch 1
and 2K keys on an H200, where the keys and values of that layer are 0.4 MB (0.1 us at the copy bandwidth).
Here the keys are cut into `splits` chunks, each program reduces one chunk of one (row, head) with an online
softmax into (max, sum, weighted values), and a second kernel combines the chunks. `length` is read on the device:
slots at or past it are masked (their loads are skipped), and with a window only the last `window` tokens count.

Two split kernels write the same partial results for the one combine kernel. The per-head kernel runs a program
per (row, query head, chunk), so with grouped-query attention (H = GROUP * Hkv) every KV head's keys and values
are read GROUP times. The grouped kernel runs a program per (row, KV head, chunk) that takes the GROUP query heads
of that KV head together: it reads each key and value once, scores the [GROUP, D] query tile against a block of
keys with tl.dot (tensor cores, fp32 accumulation), and walks only the chunk's visible slots.
benchmarks/decode_attention.py times both over splits and launch configurations.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from zoo_kernels._device import sm_count


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
                  H, GROUP, S, D, CHUNK, WINDOW, scale,
                  s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
                  HAS_WINDOW: tl.constexpr, HAS_START: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  WIDE: tl.constexpr):
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
    if HAS_START:  # a left-padded row: its first slots hold pads
        lo = tl.maximum(lo, tl.load(start_ptr + b))
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = split * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        visible = (offs_n < length) & (offs_n >= lo) & (offs_n < start + CHUNK) & (offs_n < S)
        m2 = visible[:, None] & md[None, :]
        offs_s = offs_n  # a slot's index; its offset in 64 bits where WIDE (see decode_attention)
        if WIDE:
            offs_s = offs_n.to(tl.int64)
        k = tl.load(k_ptr + b.to(tl.int64) * s_kb + offs_s[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1)
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + b.to(tl.int64) * s_vb + offs_s[:, None] * s_vs + kvh * s_vh + offs_d[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    out = bh * nsplit + split
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out.to(tl.int64) * BLOCK_D + offs_d, acc)


@triton.jit
def _grouped_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
                          H, HKV, S, D, CHUNK, WINDOW, scale,
                          s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
                          GROUP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_START: tl.constexpr,
                          BLOCK_G: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
                          PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """One (row, KV head, chunk): the online softmax of its GROUP query heads (rows of a [BLOCK_G, BLOCK_D] tile,
    BLOCK_G >= 16 for tl.dot; the rows past GROUP are zero queries, never stored) over the chunk's visible keys.
    The key loop walks only the chunk's visible slots [max(chunk start, lo), min(chunk end, length)), so chunks
    past `length` or before the window cost no iterations (and keep m = -inf, l = 0 for the combine)."""
    bk = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bk // HKV
    kvh = bk % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mg = offs_g < GROUP
    md = offs_d < D
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=mg[:, None] & md[None, :],
                other=0.0).to(k_ptr.dtype.element_ty)
    length = tl.load(len_ptr).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(length - WINDOW, 0)
    if HAS_START:  # a left-padded row: its first slots hold pads
        lo = tl.maximum(lo, tl.load(start_ptr + b).to(tl.int32))
    start = tl.maximum(split * CHUNK, lo)
    end = tl.minimum(tl.minimum(split * CHUNK + CHUNK, length), S)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b.to(tl.int64) * s_kb + kvh * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + kvh * s_vh
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = offs_n < end
        m2 = visible[:, None] & md[None, :]
        offs_s = offs_n  # a slot's index; its offset in 64 bits where WIDE (see decode_attention)
        if WIDE:
            offs_s = offs_n.to(tl.int64)
        k = tl.load(k_base + offs_s[:, None] * s_ks + offs_d[None, :], mask=m2, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(visible[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the block's first slot is visible
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + offs_s[:, None] * s_vs + offs_d[None, :], mask=m2, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = (b * H + heads) * nsplit + split  # the per-head kernel's layout: (row, query head, chunk)
    tl.store(m_ptr + out, m_i, mask=mg)
    tl.store(l_ptr + out, l_i, mask=mg)
    tl.store(acc_ptr + out.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mg[:, None])


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
    """Key chunks per (row, head) — per (row, KV head) for the grouped kernel: about four programs per SM in all,
    chunks of at least 64 keys."""
    want = max(1, -(-4 * sms // batch_heads))
    return max(1, min(want, slots // 64, 128))


def chunking(slots: int, splits: int, block_n: int) -> tuple[int, int]:
    """(keys per chunk, chunks) for `splits` chunks asked over `slots` keys: each chunk whole blocks of block_n
    keys, so the rounding can leave fewer chunks than asked."""
    chunk = -(-slots // splits)
    chunk = -(-chunk // block_n) * block_n
    return chunk, -(-slots // chunk)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                     window: int | None = None, scale: float | None = None, splits: int | None = None, *,
                     grouped: bool | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, 1, H, D]; keys, values [B, S, Hkv, D] (unit stride over D); length int64 [1] on the device: the
    visible keys are slots [max(0, length - window), length). start (int64 [B] on the device, each < length): row
    b also sees no slot below start[b] (its left padding). Returns o [B, 1, H, D] in q's dtype.

    grouped: the grouped kernel (a program per KV head, its GROUP query heads together) or the per-head kernel;
    None chooses the grouped one. It reads each KV head once, and its tl.dot loop is software-pipelined: on an H200
    (benchmarks/decode_attention.py, RESULTS.md) at batch 64 and 2100 keys, 12 heads x 64, 97.6 against 170.8 us
    (the bandwidth floor: 97.8), with 4 KV heads 38.0 against 143.8 us; at batch 1 7.3 against 9.0 us.
    splits: key chunks per program row (default splits_for over the programs of the chosen kernel); block_n:
    keys per loop step (64; 32 from head dim 256 on); num_warps (4); num_stages: software-pipelining stages of
    the grouped kernel's key loop (tl.range; default 2, 1 = no pipelining), for the per-head kernel Triton's
    launch option (its loop, without tl.dot, is not pipelined whatever the value: Triton 3.6 and 3.9, sm_90).
    Chunks are rounded up to whole blocks, so the splits run can be fewer than asked. fp32 inputs take the
    grouped kernel's products in full fp32 (input_precision "ieee"), not tf32."""
    B, T, H, D = q.shape
    S, Hkv = keys.shape[1], keys.shape[2]
    if T != 1 or H % Hkv or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention: one query per row, H a multiple of the KV heads, unit stride over D")
    if keys.dim() != 4 or values.shape != keys.shape or keys.shape[0] != B or keys.shape[3] != D:
        # the kernels index both buffers by q's rows and head size and by keys' slots and heads
        raise ValueError(f"decode_attention: keys and values must both be [{B}, S, Hkv, {D}], got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    if window is not None and window < 1:  # the kernels would see no key (NaN); the reference reads 0 as no window
        raise ValueError(f"decode_attention: window must be None or at least 1, got {window}")
    if not isinstance(length, torch.Tensor) or length.numel() != 1 or length.dtype not in (torch.int64, torch.int32) \
            or length.device != q.device:
        # the kernels read length[0] alone: a per-row [B] length gave every row the first row's keys
        got = f"{length.dtype} {tuple(length.shape)} on {length.device}" if isinstance(length, torch.Tensor) \
            else type(length).__name__
        raise ValueError(f"decode_attention: length must be an int64 tensor of one element (the tokens stored, "
                         f"shared by all rows) on {q.device}, got {got}")
    if S == 0:  # no slot to attend to (splits_for and chunking divided by zero)
        raise ValueError("decode_attention: the KV buffer has no slot (S = 0)")
    if B == 0:  # no row: nothing to launch (splits_for divided by zero)
        return torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    grouped = True if grouped is None else grouped
    scale = D ** -0.5 if scale is None else scale
    rows = B * (Hkv if grouped else H)  # programs per chunk
    if splits is None:
        splits = splits_for(rows, S, sm_count(q.device))
    block_d = max(16, triton.next_power_of_2(D))
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    chunk, splits = chunking(S, splits, block_n)
    m = torch.empty(B * H, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, splits, block_d, device=q.device, dtype=torch.float32)
    q3 = q[:, 0]
    q3 = q3 if q3.stride(-1) == 1 else q3.contiguous()  # the kernels read a head's query at unit stride
    if start is not None and (start.shape != (B,) or start.dtype != torch.long or start.device != q.device):
        raise ValueError(f"decode_attention: start must be int64 [{B}] on {q.device}, got {start.dtype} "
                         f"{tuple(start.shape)} on {start.device}")
    # (read only with HAS_START; the kernels read start[b] at unit stride)
    rows_start = length if start is None else start.contiguous()
    args = (q3, keys, values, length, rows_start, m, l, acc, H, Hkv if grouped else H // Hkv, S, D, chunk,
            window or 0, float(scale), q3.stride(0), q3.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2))
    # WIDE: a slot's offset (slot x its stride, Hkv D in a [B, S, Hkv, D] buffer) reaches 2^31 within a row, past
    # an int32 product: from 2.8M slots at 12 heads x 64. Those buffers take 64-bit slot offsets; every other keeps
    # the 32-bit kernel (the 64-bit offsets in every kernel cost Transformer++'s decode 18% at batch 64, 2K: H200,
    # twenty-seventh session, 1.85 -> 2.19 ms per step).
    wide = (S - 1) * max(keys.stride(1), values.stride(1)) + (Hkv - 1) * max(keys.stride(2), values.stride(2)) \
        + D >= 2 ** 31
    if grouped:
        group = H // Hkv
        _grouped_split_kernel[(rows, splits)](
            *args, GROUP=group, HAS_WINDOW=window is not None, HAS_START=start is not None,
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
            NUM_STAGES=2 if num_stages is None else num_stages,
            PRECISION="ieee" if keys.dtype == torch.float32 else None, WIDE=wide, num_warps=num_warps or 4,
        )
    else:
        launch = {} if num_stages is None else {"num_stages": num_stages}
        _split_kernel[(rows, splits)](*args, HAS_WINDOW=window is not None, HAS_START=start is not None,
                                      BLOCK_N=block_n, BLOCK_D=block_d, WIDE=wide, num_warps=num_warps or 4,
                                      **launch)
    o = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)
    _combine_kernel[(B * H,)](m, l, acc, o, H, D, splits, o.stride(0), o.stride(2),
                              BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4)
    return o


def reference(q, keys, values, length: int, window: int | None = None, start=None) -> torch.Tensor:
    """The same attention in fp32 torch (tests); start: per-row first visible slots (a list or tensor)."""
    if start is not None:
        return torch.cat([reference(q[b:b + 1], keys[b:b + 1, int(start[b]):], values[b:b + 1, int(start[b]):],
                                    length - int(start[b]), window) for b in range(q.shape[0])])
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
    if position_ids.shape != (B, 1) or inv_freq.shape != (D // 2,):  # the kernel would read past them
        raise ValueError(f"rope_one_token: position_ids must be [{B}, 1] and inv_freq [{D // 2}], got "
                         f"{tuple(position_ids.shape)} and {tuple(inv_freq.shape)}")
    inv_freq = inv_freq.contiguous()  # the kernel reads it at unit stride
    y = torch.empty(B, 1, H, D, device=x.device, dtype=x.dtype)
    _rope_kernel[(B * H,)](x, position_ids, inv_freq, y, H, x.stride(0), x.stride(2), y.stride(0), y.stride(2),
                           position_ids.stride(0), HALF=D // 2, BLOCK=max(16, triton.next_power_of_2(D // 2)),
                           num_warps=1)
    return y


__all__ = ["chunking", "decode_attention", "reference", "rope_one_token", "splits_for"]
