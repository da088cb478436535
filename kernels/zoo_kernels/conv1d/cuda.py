"""Causal depthwise conv1d on our CUDA kernel (widths 2..4), with document resets and a carried state.

Why a kernel of our own: cuDNN's grouped conv1d needs the input padded by W-1 first (an extra read and
write of x) and runs depthwise convolutions far from the memory bound; ours reads x once and writes y
once (benchmarks/conv1d.py measures both against bytes / 3.0 TB/s). Built just in time like the
selective scan (see zoo_kernels.selective_scan.cuda.build_extension); other widths and dtypes take the
torch reference, which is exact but slower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from zoo_kernels._checks import device_problem, first_problem, raise_if, require_cuda, shape_problem, tensor_problem
from zoo_kernels.conv1d.ref import causal_conv1d_ref
from zoo_kernels.selective_scan.cuda import JitExtension

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("causal_conv1d_api.cpp", "causal_conv1d.cu")
_HEADERS = ("causal_conv1d.h",)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WIDTHS = (2, 3, 4)

_EXTENSION = JitExtension("causal-conv1d CUDA extension", _SOURCES, _HEADERS, _CSRC, "zoo_causal_conv1d")


available, why_unavailable, _module = _EXTENSION.available, _EXTENSION.why_unavailable, _EXTENSION.module


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_state, silu):
        x_ = x.contiguous()
        w_, b_, h_ = _f32(weight), _f32(bias), _f32(initial_state)
        seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        y = _module().fwd(x_, w_, b_, seq, h_, silu)
        ctx.save_for_backward(x_, w_, b_, seq, h_)
        ctx.silu = silu
        ctx.in_dtypes = (weight.dtype, None if bias is None else bias.dtype,
                         None if initial_state is None else initial_state.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, b, seq, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db, dh = _module().bwd(x, w, b, seq, h, dy.to(x.dtype).contiguous(), ctx.silu,
                                       h is not None and need[4])
        w_dt, b_dt, h_dt = ctx.in_dtypes
        return (
            dx if need[0] else None,
            dw.to(w_dt) if need[1] else None,
            db.to(b_dt) if need[2] and b is not None else None,
            None,
            dh.to(h_dt) if need[4] and h is not None else None,
            None,
        )


def _final_state(x, initial_state, seq_idx, width):
    """The last W-1 inputs [batch, D, W-1] fp32, zero before the last document (torch ops: autograd flows)."""
    batch, dim, length = x.shape
    hist = width - 1
    if length >= hist:
        tail = x[..., length - hist:].float()
    else:
        prev = (initial_state.float() if initial_state is not None
                else x.new_zeros(batch, dim, hist, dtype=torch.float32))
        tail = torch.cat([prev, x.float()], dim=2)[..., -hist:]
    if seq_idx is None:
        return tail
    starts = torch.zeros_like(seq_idx, dtype=torch.int32)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).int()
    count = starts.cumsum(dim=1)  # document starts at or before each position
    pos = torch.arange(length - hist, length, device=x.device)
    at_pos = torch.where(pos >= 0, count[:, pos.clamp(min=0)], torch.zeros_like(count[:, :1]))
    same_doc = at_pos == count[:, -1:]  # no document starts after the position
    return tail * same_doc[:, None, :]


def causal_conv1d_cuda(x, weight, bias=None, seq_idx=None, initial_state=None, activation=None,
                       return_final_state=False):
    """Same arguments and results as `causal_conv1d_ref`: y [batch, D, L] (and the final state fp32).

    x: [batch, D, L] fp32/bf16/fp16; weight: [D, W] with W in 2..4 on the kernel (else the reference);
    bias: [D]; seq_idx: [batch, L] int; initial_state: [batch, D, W-1]; activation None, "silu", "swish".
    Raises ValueError for shapes the kernel does not take (`_problem`), RuntimeError off CUDA or where the extension
    is unavailable.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    width = weight.shape[1]
    if width not in WIDTHS or x.dtype not in _DTYPES:
        return causal_conv1d_ref(x, weight, bias, seq_idx, initial_state, activation, return_final_state)
    raise_if("causal_conv1d", _problem(x, weight, bias, seq_idx, initial_state))
    require_cuda("causal_conv1d", x, "causal_conv1d_ref")
    y = _CausalConv1dFn.apply(x, weight, bias, seq_idx, initial_state, activation is not None)
    if not return_final_state:
        return y
    return y, _final_state(x, initial_state, seq_idx, width)


def update_supported(conv_state, x, weight) -> bool:
    """Whether `causal_conv1d_update_cuda` takes these tensors: a contiguous fp32 state on CUDA, x [batch, D] with
    unit channel stride in fp32/bf16/fp16, width 2..4."""
    return (conv_state.is_cuda and conv_state.dtype == torch.float32 and conv_state.is_contiguous()
            and x.dim() == 2 and x.stride(1) == 1 and x.dtype in _DTYPES and weight.shape[-1] in WIDTHS)


def causal_conv1d_update_cuda(conv_state, x, weight, bias=None, activation=None):
    """One decoding step in one kernel; shifts x [batch, D] into conv_state [batch, D, W-1] (fp32, contiguous)
    in place and returns y [batch, D] in x's dtype. weight [D, W] and bias [D] are read as fp32 (pass fp32
    tensors to avoid a conversion per call). Raises ValueError for arguments the kernel does not take
    (`_update_problem`), RuntimeError off CUDA or where the extension is unavailable."""
    if activation not in (None, "silu", "swish"):  # causal_conv1d's and the reference's names ("swish" = SiLU)
        raise ValueError(f"causal_conv1d_update: activation must be None, 'silu' or 'swish', got {activation!r}")
    raise_if("causal_conv1d_update", _update_problem(conv_state, x, weight, bias))
    require_cuda("causal_conv1d_update", x, "causal_conv1d_update_ref")
    return _module().update(conv_state, x, _f32(weight), _f32(bias), activation is not None)


def _problem(x, weight, bias, seq_idx, initial_state) -> str | None:
    """Why csrc/causal_conv1d_api.cpp's make_params would refuse these inputs of the kernel path (W in 2..4 and
    x's dtype: causal_conv1d_cuda's gate; dtypes and contiguity: _CausalConv1dFn's casts): their shapes and
    devices; None: it takes them. Reads no device."""
    if x.dim() != 3:
        return f"x must be [batch, D, L], got {tuple(x.shape)}"
    batch, dim, length = x.shape
    width = weight.shape[1]
    if length < 1:
        return "empty sequence"
    problem = first_problem(
        shape_problem(weight, "weight", (dim, width)), shape_problem(bias, "bias", (dim,)),
        shape_problem(seq_idx, "seq_idx", (batch, length)),
        shape_problem(initial_state, "initial_state", (batch, dim, width - 1)))
    return problem or device_problem("x", x, weight=weight, bias=bias, seq_idx=seq_idx, initial_state=initial_state)


def _update_problem(conv_state, x, weight, bias) -> str | None:
    """Why csrc/causal_conv1d_api.cpp's conv_update would refuse these inputs (weight and bias are cast to
    contiguous fp32 here); None: it takes them. Reads no device."""
    if x.dtype not in _DTYPES:
        return f"x must be fp32, bf16 or fp16, got {x.dtype}"
    if x.dim() != 2 or x.stride(1) != 1:
        return f"x must be [batch, D] with unit channel stride, got {tuple(x.shape)} strides {x.stride()}"
    if weight.dim() != 2 or weight.shape[1] not in WIDTHS:
        return f"weight must be [D, W] with W in {WIDTHS}, got {tuple(weight.shape)}"
    batch, dim = x.shape
    width = weight.shape[1]
    problem = first_problem(
        shape_problem(weight, "weight", (dim, width)), shape_problem(bias, "bias", (dim,)),
        tensor_problem(conv_state, "conv_state", torch.float32, (batch, dim, width - 1)))
    return problem or device_problem("x", x, weight=weight, bias=bias, conv_state=conv_state)


__all__ = ["available", "why_unavailable", "causal_conv1d_cuda", "causal_conv1d_update_cuda", "update_supported",
           "WIDTHS"]
