"""Greedy decoding's argmax over the vocabulary: Triton kernels writing the token ids in place.

`argmax_rows(x, out)`: out[r] = the first index of the largest value of x[r] (torch.argmax's choice among ties),
a NaN counting as larger than any number. A decode step ends with the argmax of every row's logits ([B, V], V
~50K); torch's reduction took 13.6 us for it on the H200 at batch 1 and at batch 64 alike (twelfth session's profile,
results/gpu-2026-12-03/s12-call3-prof.txt: 4% of Mamba-130M's step at batch 1), plus a copy into the graph's token
buffer, which `out` saves. The first version, one program per row walking its row in 4096-wide blocks, took the same
13.1 us at batch 64 on the H100 (thirtieth session's profile): 64 programs, each a chain of 13 dependent block loads.

Now rows are split: one program per (row, BLOCK-wide chunk) writes its chunk's max and first index of it (V = 50280:
25 chunks of 2048), and a second kernel, one program per row, takes the first chunk holding the row's max. Ties keep
the earliest index at both levels, so the choice is torch.argmax's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # a chunk per program of the first pass


@triton.jit
def _argmax_part_kernel(x_ptr, pv_ptr, pi_ptr, s_x, V, S, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    idx = chunk * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * s_x + idx, mask=idx < V, other=float("-inf")).to(pv_ptr.dtype.element_ty)
    v = tl.where(v != v, float("inf"), v)  # NaN: the largest (a +inf before the first NaN would win: see below)
    i = tl.argmax(v, 0, tie_break_left=True)  # a chunk of -inf (or the masked tail): its first index
    tl.store(pv_ptr + row * S + chunk, tl.max(v, 0))
    tl.store(pi_ptr + row * S + chunk, (chunk * BLOCK + i).to(tl.int64))


@triton.jit
def _argmax_pick_kernel(pv_ptr, pi_ptr, out_ptr, s_out, S, S_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, S_BLOCK)
    v = tl.load(pv_ptr + row * S + offs, mask=offs < S, other=float("-inf"))
    j = tl.argmax(v, 0, tie_break_left=True)  # the earliest chunk among equal maxima: the earliest index
    tl.store(out_ptr + row * s_out, tl.load(pi_ptr + row * S + j))


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax over the last dimension of x [R, V] (CUDA, any float dtype, unit stride over V), into out [R]
    (int64, any stride; allocated when None); returns out. Ties go to the first index, as torch.argmax's; a NaN
    counts as +inf, so a row holding both +inf and NaN gets the first of them (torch: the first NaN).
    Raises ValueError on other shapes or dtypes."""
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: x must be a float [rows, V > 0] tensor, got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, V = x.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=x.device)
    elif out.dtype != torch.int64 or out.shape != (rows,) or out.device != x.device:
        raise ValueError(f"argmax_rows: out must be int64 [{rows}] on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if rows:
        S = triton.cdiv(V, BLOCK)
        # fp64 compared in fp64: rounded to fp32, close logits tie (the first wins) and those past 3.4e38 become inf
        pv = torch.empty(rows, S, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                         device=x.device)
        pi = torch.empty(rows, S, dtype=torch.int64, device=x.device)
        _argmax_part_kernel[(rows, S)](x, pv, pi, x.stride(0), V, S, BLOCK=BLOCK, num_warps=4)
        _argmax_pick_kernel[(rows,)](pv, pi, out, out.stride(0), S, S_BLOCK=max(16, triton.next_power_of_2(S)),
                                     num_warps=1)
    return out
