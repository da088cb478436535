"""y = x · Wᵀ (+ b) for a decode step's few rows (M ≤ 64), in one Triton kernel tiled over the weight's rows.

At one token per sequence the projections of a decode step are matrix-vector products: the weight is read once
and the rows of x ride along. Each program takes BLOCK_N rows of W, walks K in BLOCK_K steps with the M rows of x
(padded to 16, masked) and writes its [M, BLOCK_N] tile; BLOCK_N is chosen so that the grid has a program for
most SMs (see `_config`). Forward only.

Measured inside CUDA graphs on the H200 (benchmarks/decode_linear.py): every projection of the 130M models takes
3.4-5 us through cuBLAS or this kernel alike, 2-5x the weight's bytes over bandwidth: a graph node's latency, not
bandwidth, bounds them. The kernel wins only at one row with K >= N (out_proj 4.3 vs 5.7 us, down_proj 5.1 vs
7.2 us); with it on every projection of ≤ 64 rows a Mamba step at batch 64 ran 0.84 ms against cuBLAS's 0.77.
So `zoo.layers.Linear` uses it for that case alone.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from zoo_kernels._device import sm_count

MAX_ROWS = 64


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, o_ptr, M, N, K, s_xm, s_wn, s_om,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * s_xm
    w_cols = w_ptr + rn[None, :].to(tl.int64) * s_wn  # W [N, K] read as its transpose [K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = o_ptr + rm[:, None].to(tl.int64) * s_om + rn[None, :]
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=1024)  # a decode step asks the same few shapes every token
def _config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the widest BLOCK_N (64 down to 16) that still gives
    about one program per SM, so the weight streams through most SMs at once."""
    block_m = max(16, triton.next_power_of_2(M))
    sms = sm_count(device)
    block_n = 64
    while block_n > 16 and triton.cdiv(N, block_n) < sms:
        block_n //= 2
    block_k = min(256 if block_m <= 32 else 128, max(16, triton.next_power_of_2(K)))
    return block_m, block_n, block_k, 4, 3


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] with at most MAX_ROWS rows; weight [N, K], bias [N].

    x's last dimension must be unit-stride (rows may be strided); the output is contiguous [..., N] in x's dtype.
    fp32 inputs use IEEE products (F.linear's default), bf16/fp16 the tensor cores with fp32 accumulation.
    x, weight and bias must share one of those dtypes and one device (F.linear refuses mixed dtypes too; the
    kernel's tl.dot failed on them with an interpreter or compiler assertion, and read an fp64 x wrong).
    `config` overrides the launch configuration (benchmarks/decode_linear.py sweeps it).
    """
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected x [..., K], "
                         "weight [N, K]")
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape != (N, K) or weight.stride(-1) != 1:
        raise ValueError(f"skinny_linear: weight {tuple(weight.shape)} (stride {weight.stride()}) vs x [..., {K}]")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"skinny_linear: bias {tuple(bias.shape)} vs {N} outputs")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"skinny_linear: x is {x.dtype}; takes float32, bfloat16 or float16 (use F.linear)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"skinny_linear: {name} is {t.dtype}, x {x.dtype}; they must share a dtype")
        if t is not None and t.device != x.device:
            raise ValueError(f"skinny_linear: {name} is on {t.device}, x on {x.device}; they must share a device")
    M = x.numel() // K if K else math.prod(x.shape[:-1])  # (reshape(-1, 0) cannot infer the rows)
    if M > MAX_ROWS:
        raise ValueError(f"skinny_linear: {M} rows; at most {MAX_ROWS} (use F.linear)")
    if K == 0:  # an empty sum: F.linear's zeros, plus the bias
        out = torch.zeros(M, N, device=x.device, dtype=x.dtype)
        return (out if bias is None else out + bias).view(*x.shape[:-1], N)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it at unit stride
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M and N:
        block_m, block_n, block_k, warps, stages = config or _config(M, N, K, x.device)
        _skinny_kernel[(triton.cdiv(N, block_n),)](
            x2, weight, bias if bias is not None else weight, out, M, N, K, x2.stride(0), weight.stride(0),
            out.stride(0), HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )
    return out.view(*x.shape[:-1], N)


__all__ = ["MAX_ROWS", "skinny_linear"]
