"""Gated linear attention, chunk form: fla-core's chunk_gla where it is sound, ours otherwise."""

from __future__ import annotations

import torch

from zoo_kernels._checks import raise_if
from zoo_kernels._grad import needs_grad
from zoo_kernels.gla import fast
from zoo_kernels.gla.ref import chunk_gla_ref, gla_state_update_ref, update_shape_problem


def fast_backend(device: torch.device) -> str | None:
    """Name of the fastest sound GLA chunk kernel on `device` ("fla"), or None."""
    return fast.best_backend(device)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return fast_backend(device) or "ref"
    if backend not in ("ref", "fla"):  # zoo's own Triton GLA kernel is the decode step's (gla_state_update) only
        raise ValueError(f"chunk_gla backend must be 'auto', 'fla' or 'ref', got {backend!r}")
    return backend


def chunk_gla(q, k, v, g, scale=None, initial_state=None, seq_idx=None, return_final_state=False,
              chunk_size=64, backend: str = "auto"):
    """Gated linear attention S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t.

    Shapes: q, k, g [batch, T, H, K] (g: log decay, ≤ 0); v [batch, T, H, V]; scale default K**-0.5;
    initial_state [batch, H, K, V]; seq_idx [batch, T] int. Returns o [batch, T, H, V] in q's dtype,
    and with return_final_state also the final state [batch, H, K, V] in fp32.
    """
    backend = resolve_backend(backend, q.device)
    if q.dim() == 4 and q.shape[1] == 0:  # no token: the reference passes the state through
        backend = "ref"
    args = (q, k, v, g, scale, initial_state, seq_idx, return_final_state, chunk_size)
    if backend != "ref":
        return fast.chunk_gla_fast(*args, backend=backend)
    return chunk_gla_ref(*args)


def gla_state_update(state, q, k, v, g, scale=None, backend: str = "auto"):
    """One decoding step; updates `state` [batch, H, K, V] (fp32) in place, returns o [batch, H, V].

    q, k, g [batch, H, K]; v [batch, H, V]. backend "auto": one Triton kernel on CUDA where Triton imports
    (zoo_kernels.gla.step) and no input needs a gradient (the kernel has no backward), the torch reference
    otherwise; "triton" forces the kernel (on CPU it needs
    TRITON_INTERPRET=1), "ref" the reference.
    """
    if backend not in ("auto", "triton", "ref"):
        raise ValueError(f"gla_state_update backend must be 'auto', 'triton' or 'ref', got {backend!r}")
    if backend == "triton" or (backend == "auto" and q.device.type == "cuda"
                               and not needs_grad(state, q, k, v, g)):  # the kernel has no backward
        # the reference checks its own; the kernel indexes every tensor by the state's batch and heads (a wrong
        # shape is read out of bounds), so they are checked before it too
        raise_if("gla_state_update", update_shape_problem(state, q, k, v, g))
        try:
            from zoo_kernels.gla import step
        except ImportError:
            if backend == "triton":
                raise
        else:
            if step.supported(state, q, k, v, g):
                return step.gla_state_update_triton(state, q, k, v, g, scale)
    return gla_state_update_ref(state, q, k, v, g, scale)


__all__ = ["chunk_gla", "chunk_gla_ref", "gla_state_update", "fast_backend"]
