"""Mamba-2 SSD chunked scan: our Triton kernel on GPU, the chunked torch reference elsewhere."""

from __future__ import annotations

import torch

from zoo_kernels._grad import needs_grad
from zoo_kernels.ssd.ref import ssd_chunk_scan_ref, ssd_state_update_ref

MIN_CHUNK_SIZE = 16  # the Triton chunk scan's smallest chunk (ssd_chunk_scan_triton refuses smaller ones)


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from zoo_kernels.ssd import triton_ssd  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "ref"
    if backend not in ("ref", "triton"):
        raise ValueError(f"ssd_chunk_scan backend must be 'auto', 'triton' or 'ref', got {backend!r}")
    return backend


def ssd_chunk_scan(
    x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
    initial_state=None, seq_idx=None, return_final_state=False, backend: str = "auto",
):
    """Mamba-2 scan h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ, y_t = h_t C_t + D x_t, out = y * silu(z).

    Shapes: x, z [batch, L, H, P]; dt [batch, L, H]; A [H] (negative); B, C [batch, L, G, N]
    (head h reads group h // (H // G)); D [H] or [H, P]; dt_bias [H]; initial_state [batch, H, P, N];
    seq_idx [batch, L] int. Returns y [batch, L, H, P] in x's dtype, and with return_final_state
    also the final state [batch, H, P, N] in fp32.
    """
    backend = resolve_backend(backend, x.device)
    if x.dim() == 4 and x.shape[1] == 0:  # no token: the reference passes the state through
        backend = "ref"
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx, return_final_state)
    if backend == "triton":
        from zoo_kernels.ssd.triton_ssd import ssd_chunk_scan_triton

        return ssd_chunk_scan_triton(*args)
    return ssd_chunk_scan_ref(*args)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     backend: str = "auto"):
    """One decoding step; updates `state` [batch, H, P, N] (fp32) in place and returns y [batch, H, P].

    x, z [batch, H, P]; dt [batch, H]; B, C [batch, G, N]; A [H]; D [H] or [H, P]; dt_bias [H]. The Triton
    kernel has no backward: where an input needs a gradient the torch reference runs.
    """
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and not needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        from zoo_kernels.ssd.triton_ssd import ssd_state_update_triton

        return ssd_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return ssd_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


__all__ = ["MIN_CHUNK_SIZE", "ssd_chunk_scan", "ssd_chunk_scan_ref", "ssd_state_update", "triton_available"]
