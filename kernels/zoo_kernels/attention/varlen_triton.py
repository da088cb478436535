"""Causal attention forward over packed rows (documents in each row given by seq_idx), in Triton.

Packed rows on torch's built-in FlashAttention-2 varlen kernel (sm80 code, no wgmma on Hopper) ran the forward
at ~151 TFLOP/s on an H200 while unpacked rows got ~506 on cuDNN (benchmarks/NOTES_attention.md). Here Triton
compiles tl.dot to wgmma on Hopper, and the rows stay in their [B, L, H, D] layout: no cu_seqlens, no host sync.

One program per (query block of BLOCK_M rows, row b, head h). Query i sees key j iff j lies in i's document
and j <= i. With doc_start[b, i] the position where i's document starts (documents are runs of equal seq_idx,
as in `visible_mask`), that is doc_start[b, i] <= j <= i. The block's keys run from the start lo of its first
query's document to its last query, in two loops:
- unmasked: the whole BLOCK_N blocks of keys in [lo, first query]. Every query of the first document sees all of
  them; a query of a later document (one that starts inside the query block) sees none, so its running
  softmax state is reset to empty after this loop instead of masking every block;
- masked: the remaining keys (the diagonal band, at most BLOCK_M / BLOCK_N + 1 blocks) with the
  doc_start <= j <= i test.
Online softmax in fp32 with exp2 (log2(e) folded into the scale), fp32 accumulator. Forward only: there is no
backward (`attention` takes it only for calls that need no gradient).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE_ENV = "ZOO_ATTN_TRITON_AUTOTUNE"  # "0": the first config that fits the head dim, no benchmarking
HEAD_DIMS = (32, 64, 128, 256)
_SMEM_BYTES = 227 * 1024  # the opt-in maximum of shared memory per block on sm90 (H100, H200)
_LOG2E = 1.4426950408889634

# Autotune set; the first config that fits a head dim is its default. Shared memory: the Q tile plus num_stages
# buffers of K and V (what ptxas reports, `smem_bytes`). Compiled for sm90 ahead of time: the defaults (first
# of D <= 128, (64, 32) for D = 256) use <= 255 registers without spilling; at D = 128 the 4-warp 128 x 64
# and 64 x 128 tiles spill, and so do the larger tiles at D = 256 (autotuning weighs that).
CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
]


def smem_bytes(config: dict, head_dim: int, elem_bytes: int = 2) -> int:
    """Shared memory a config needs, estimated: the Q tile and num_stages (K, V) tiles."""
    return elem_bytes * head_dim * (config["BLOCK_M"] + 2 * config["num_stages"] * config["BLOCK_N"])


def configs_for(head_dim: int, elem_bytes: int = 2) -> list[dict]:
    """The configs of CONFIGS that fit in shared memory at this head dim, in order."""
    return [c for c in CONFIGS if smem_bytes(c, head_dim, elem_bytes) <= _SMEM_BYTES]


def _prune(configs, named_args, **kwargs):
    dim, elem = kwargs["HEAD_DIM"], named_args["q_ptr"].element_size()
    return [c for c in configs if smem_bytes({**c.kwargs, "num_stages": c.num_stages}, dim, elem) <= _SMEM_BYTES]


@triton.jit
def _attend_block(acc, l_i, m_i, q, k, v, qk_scale, offs_kn, ds_q, span_q,
                  MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_N block of keys into the running (acc, l, m) of BLOCK_M queries (m in log2 units)."""
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        # doc_start <= j <= i as one unsigned compare: 0 <= j - doc_start <= i - doc_start = span
        visible = (offs_kn[None, :] - ds_q[:, None]).to(tl.uint32, bitcast=True) <= span_q[:, None]
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _packed_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, ds_ptr,
    L, H, GROUP, qk_scale, L_KEY,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh, s_db,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, RETURN_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    q_lo = pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, L)  # exclusive; the last key any query of the block sees is q_hi - 1
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    ds_row = ds_ptr + b.to(tl.int64) * s_db
    ds_q = tl.load(ds_row + offs_m, mask=row_ok, other=0)  # (BLOCK_M,) where each query's document starts
    span_q = (offs_m - ds_q).to(tl.uint32, bitcast=True)  # (BLOCK_M,) keys before each query in its document
    lo = tl.load(ds_row + q_lo)  # first key of the block: the start of its first query's document
    # whole blocks of keys in [lo, q_lo]: visible to the first document's queries, to no other query
    full_end = lo + ((q_lo + 1 - lo) // BLOCK_N) * BLOCK_N

    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + q_lo.to(tl.int64) * s_ql
    q = tl.load(q_base + (offs_m - q_lo)[:, None] * s_ql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_ptrs = (k_ptr + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh + lo.to(tl.int64) * s_kl
              + offs_n[:, None] * s_kl + offs_d[None, :])  # (BLOCK_N, HEAD_DIM), advanced by BLOCK_N rows
    v_ptrs = (v_ptr + b.to(tl.int64) * s_vb + kvh.to(tl.int64) * s_vh + lo.to(tl.int64) * s_vl
              + offs_n[:, None] * s_vl + offs_d[None, :])

    # finite start: a row whose keys in a masked block are all hidden gets p = exp2(-inf) = 0, not NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(lo, full_end, BLOCK_N):
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, qk_scale, start_n + offs_n, ds_q, span_q,
                                      MASKED=False, IEEE=IEEE)
        k_ptrs += BLOCK_N * s_kl
        v_ptrs += BLOCK_N * s_vl
    # queries of documents that start inside this block saw only keys of earlier documents so far: forget them
    first_doc = ds_q == lo
    m_i = tl.where(first_doc, m_i, -1.0e30)
    l_i = tl.where(first_doc, l_i, 0.0)
    acc = tl.where(first_doc[:, None], acc, 0.0)
    for start_n in range(full_end, q_hi, BLOCK_N):
        offs_kn = start_n + offs_n
        kv_ok = (offs_kn < L)[:, None]
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, qk_scale, offs_kn, ds_q, span_q,
                                      MASKED=True, IEEE=IEEE)
        k_ptrs += BLOCK_N * s_kl
        v_ptrs += BLOCK_N * s_vl

    acc = acc / l_i[:, None]  # every query sees itself: l_i > 0
    o_base = o_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + q_lo.to(tl.int64) * s_ol
    tl.store(o_base + (offs_m - q_lo)[:, None] * s_ol + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log of sum_j exp(scale * q.k_j)
        tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


_packed_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                           num_stages=c["num_stages"]) for c in CONFIGS],
    key=["HEAD_DIM", "L_KEY"],  # plus the dtypes of the tensor arguments (Triton adds them)
    prune_configs_by={"early_config_prune": _prune},
)(_packed_fwd_kernel)


_DOC_START_CACHE: dict = {}


def doc_starts(seq_idx: Tensor) -> Tensor:
    """doc_start [B, L] int32: the position where each token's document starts (a run of equal seq_idx).

    The last call's result is reused while the same seq_idx tensor comes back unchanged (every attention layer
    of a forward pass packs the same way); nothing syncs with the device. Inference tensors have no version
    counter: they are not cached.
    """
    cache = not seq_idx.is_inference()
    key = (id(seq_idx), seq_idx._version) if cache else None
    if cache and _DOC_START_CACHE.get("key") == key and _DOC_START_CACHE["ref"] is seq_idx:
        return _DOC_START_CACHE["doc_start"]
    length = seq_idx.shape[1]
    start = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    pos = torch.arange(length, device=seq_idx.device, dtype=torch.int32).expand_as(seq_idx)
    doc_start = torch.where(start, pos, 0).cummax(dim=1).values.to(torch.int32).contiguous()
    if cache:
        _DOC_START_CACHE.update(key=key, ref=seq_idx, doc_start=doc_start)
    return doc_start


def _autotune() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0" and not _INTERPRET


@torch.compiler.disable
def packed_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_idx: Tensor,
    scale: float | None = None,
    doc_start: Tensor | None = None,
    *,
    return_lse: bool = False,
    config: dict | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal attention inside the documents of packed rows, forward only.

    q [B, L, H, D]; k, v [B, L, Hkv, D] with H % Hkv == 0 (query head h reads kv head h // (H // Hkv)); any
    strides with a unit stride over D (no copies). D in HEAD_DIMS; fp16/bf16 (fp32 exact, for the
    interpreter). seq_idx [B, L] int: documents are runs of equal values; query i sees key j iff both lie in
    one run and j <= i (`visible_mask`). scale defaults to D**-0.5. doc_start [B, L] int32 (`doc_starts`)
    when the caller has it. config: one of CONFIGS (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the
    autotuned choice ($ZOO_ATTN_TRITON_AUTOTUNE=0: the first fitting config).
    Returns o [B, L, H, D] in q's dtype, and with return_lse the log-sum-exp [B, H, L] fp32 of the scaled
    scores (natural log).
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (batch, length) or k.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"packed_attention_fwd expects q [B, L, H, D], k/v [B, L, Hkv, D] with H % Hkv == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if seq_idx.shape != (batch, length):
        raise ValueError(f"seq_idx must be [B, L] = {(batch, length)}, got {tuple(seq_idx.shape)}")
    if dim not in HEAD_DIMS:
        raise ValueError(f"packed_attention_fwd supports head_dim in {HEAD_DIMS}, got {dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"packed_attention_fwd needs q, k, v of one dtype among fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("packed_attention_fwd needs a unit stride over the head dim of q, k and v")
    scale = dim**-0.5 if scale is None else float(scale)
    if doc_start is None:
        doc_start = doc_starts(seq_idx).to(q.device)
    o = torch.empty(batch, length, heads, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32) if return_lse else o
    args = (q, k, v, o, lse, doc_start, length, heads, heads // kv_heads, scale * _LOG2E,
            triton.next_power_of_2(length),  # autotune key: L bucketed
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), doc_start.stride(0))
    flags = dict(HEAD_DIM=dim, IEEE=q.dtype == torch.float32, RETURN_LSE=return_lse)
    if not configs_for(dim, q.element_size()):
        raise ValueError(f"packed_attention_fwd: no tile config fits in shared memory at head_dim {dim} in {q.dtype}")
    if config is None and not _autotune():
        config = configs_for(dim, q.element_size())[0]
    if config is None:
        _packed_fwd_tuned[lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)](*args, **flags)
    else:
        grid = (triton.cdiv(length, config["BLOCK_M"]), batch * heads)
        _packed_fwd_kernel[grid](*args, **flags, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                                 num_warps=config["num_warps"], num_stages=config["num_stages"])
    return (o, lse) if return_lse else o


__all__ = ["AUTOTUNE_ENV", "CONFIGS", "HEAD_DIMS", "configs_for", "doc_starts", "packed_attention_fwd",
           "smem_bytes"]
