"""The JIT-built extensions' argument checks (their TORCH_CHECKs), mirrored in Python.

The selective scan's and the causal conv's public entry points refuse here (ValueError) what their extension would
refuse, before it sees it: on the GPU machine's image a TORCH_CHECK whose message formats a number crashed the process
(a segfault in libstdc++'s stream code compiled into the extension; thirteenth session,
benchmarks/NOTES_selective_scan.md). The C++ checks stay, a backstop that only a bug of ours should reach.
pdl_linear has its own (`_problem`, `_config_problem`). The fused Mamba step has none: its callers must ask
`fused_step.supported` first (the mixer does), and checking its eleven tensors in Python on every call would cost
eager decoding ~10 us per layer and step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tensor_problem(t: torch.Tensor | None, name: str, dtype: torch.dtype | None, shape: Sequence[int]) -> str | None:
    """csrc's `check(t, name, dtype, shape)` but its is_cuda (device_problem): t's dtype (None: any), contiguity
    and shape; None where t passes (or is None)."""
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        return f"{name} must be {dtype}, got {t.dtype}"
    if not t.is_contiguous():
        return f"{name} must be contiguous"
    return shape_problem(t, name, shape)


def shape_problem(t: torch.Tensor | None, name: str, shape: Sequence[int]) -> str | None:
    """Why t's shape is not `shape` (None: it is, or t is None)."""
    if t is None or tuple(t.shape) == tuple(shape):
        return None
    return f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"


def first_problem(*problems: str | None) -> str | None:
    """The first of the problems that is not None."""
    return next((p for p in problems if p is not None), None)


def device_problem(name: str, first: torch.Tensor, **others: torch.Tensor | None) -> str | None:
    """Why the tensors the extension reads are not all on `first`'s device (None: they are), the device's index
    included: the extension checks is_cuda only and runs on `first`'s device, so a tensor of another GPU was read
    through a pointer of that GPU. Where they are, the caller raises RuntimeError off CUDA (require_cuda)."""
    off = [n for n, t in others.items() if t is not None and t.device != first.device]
    return f"{', '.join(off)} must be on {name}'s device ({first.device}), got {others[off[0]].device}" if off else None


def raise_if(what: str, problem: str | None) -> None:
    """ValueError(f"{what}: {problem}") where there is a problem."""
    if problem is not None:
        raise ValueError(f"{what}: {problem}")


def require_cuda(what: str, first: torch.Tensor, cpu_path: str) -> None:
    """RuntimeError where `first` (and so, after device_problem, every tensor) is not on CUDA."""
    if not first.is_cuda:
        raise RuntimeError(f"{what}: needs CUDA tensors ({cpu_path} is the CPU path)")
