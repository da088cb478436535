"""Mamba-1 selective scan: one entry point, the CUDA kernel on NVIDIA GPUs, the torch reference elsewhere."""

from __future__ import annotations

import torch

from zoo_kernels.selective_scan.ref import selective_scan_ref, selective_state_update_ref


def cuda_available() -> bool:
    """True when our CUDA extension is built (or can be JIT-built) for the present GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        from zoo_kernels.selective_scan import cuda as _cuda
    except ImportError:
        return False
    return _cuda.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "cuda" if device.type == "cuda" and cuda_available() else "ref"
    if backend not in ("ref", "cuda"):
        raise ValueError(f"selective_scan backend must be 'auto', 'cuda' or 'ref', got {backend!r}")
    return backend


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, seq_idx=None, return_final_state=False, backend: str = "auto",
):
    """Selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t·h_t + D u_t, out = y * silu(z).

    Shapes: u, delta, z [batch, D, L]; A [D, N]; B, C [batch, N, L] or grouped [batch, G, N, L]
    (channel d reads group d // (D // G)); D, delta_bias [D]; initial_state [batch, D, N];
    seq_idx [batch, L] int (the state restarts from zero where it changes). Returns out [batch, D, L]
    in u's dtype, and with return_final_state also the final state [batch, D, N] in fp32.
    """
    backend = resolve_backend(backend, u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, return_final_state)
    if backend == "cuda":
        from zoo_kernels.selective_scan.cuda import selective_scan_cuda

        return selective_scan_cuda(*args)
    return selective_scan_ref(*args)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend: str = "auto"):
    """One decoding step; updates `state` [batch, D, N] (fp32) in place and returns y [batch, D].

    x, dt, z [batch, D]; B, C [batch, N] or [batch, G, N]; A [D, N]; D, dt_bias [D].
    """
    backend = resolve_backend(backend, x.device)
    if backend == "cuda":
        from zoo_kernels.selective_scan.cuda import selective_state_update_cuda

        return selective_state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


__all__ = ["selective_scan", "selective_scan_ref", "selective_state_update", "cuda_available"]
