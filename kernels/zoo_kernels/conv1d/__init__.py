"""Causal depthwise conv1d with packed-sequence resets and a carried state."""

from __future__ import annotations

import torch

from zoo_kernels._grad import needs_grad
from zoo_kernels.conv1d.ref import causal_conv1d_ref, causal_conv1d_update_ref


def cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from zoo_kernels.conv1d import cuda as _cuda
    except ImportError:
        return False
    return _cuda.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "cuda" if device.type == "cuda" and cuda_available() else "ref"
    if backend not in ("ref", "cuda"):
        raise ValueError(f"causal_conv1d backend must be 'auto', 'cuda' or 'ref', got {backend!r}")
    return backend


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_state=None, activation=None,
                  return_final_state=False, backend: str = "auto"):
    """y[:, d, t] = act(bias[d] + Σ_w weight[d, w] · x[:, d, t - W + 1 + w]), zero before the start.

    Shapes: x [batch, D, L]; weight [D, W]; bias [D]; initial_state [batch, D, W-1] (the inputs before
    x); seq_idx [batch, L] int (inputs of another document count as zero); activation None or "silu".
    Returns y [batch, D, L] in x's dtype, and with return_final_state also the last W-1 inputs
    [batch, D, W-1] (the conv state to carry).
    """
    backend = resolve_backend(backend, x.device)
    if x.dim() == 3 and x.shape[2] == 0:  # no token: the reference passes the state through (the kernel refuses L = 0)
        backend = "ref"
    args = (x, weight, bias, seq_idx, initial_state, activation, return_final_state)
    if backend == "cuda":
        from zoo_kernels.conv1d.cuda import causal_conv1d_cuda

        return causal_conv1d_cuda(*args)
    return causal_conv1d_ref(*args)


def causal_conv1d_update(conv_state, x, weight, bias=None, activation=None, backend: str = "auto"):
    """One decoding step; shifts x [batch, D] into conv_state [batch, D, W-1] in place, returns y [batch, D].

    On CUDA one kernel when the state is a contiguous fp32 tensor and x has unit channel stride (x may be a
    column slice of a wider projection); otherwise the torch reference."""
    backend = resolve_backend(backend, x.device)
    if backend == "cuda" and not needs_grad(conv_state, x, weight, bias):  # the kernel has no backward
        from zoo_kernels.conv1d.cuda import causal_conv1d_update_cuda, update_supported

        if update_supported(conv_state, x, weight):
            return causal_conv1d_update_cuda(conv_state, x, weight, bias, activation)
    return causal_conv1d_update_ref(conv_state, x, weight, bias, activation)


__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "cuda_available"]
