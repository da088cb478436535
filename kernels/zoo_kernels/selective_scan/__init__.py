"""Mamba-1 selective scan: one entry point, the CUDA kernel on NVIDIA GPUs, the torch reference elsewhere.

Sequence split (`seq_split=S`): the CUDA kernel runs one block per 16 channels and batch row, each over the
whole sequence, so at batch 1 a 130M layer (1536 channels) fills 96 blocks, fewer than an H100's or H200's 132
multiprocessors. seq_split=S cuts every row into S segments that run as S rows in parallel, with or without
seq_idx, in split.py: cheap passes (Triton on CUDA) give each segment's final state from zero and, backwards,
the gradient of its entering state; the states (and gradients) at the segment boundaries follow from the linear
recurrence (cut by document boundaries), and one full forward and one full backward over the segment rows give
the unsplit results and every gradient exactly.
By default (seq_split=None, $ZOO_SCAN_SEQ_SPLIT unset) CUDA takes S = 4 where that measured faster: rows of
L >= 8192 whose blocks (batch x channel blocks of 16) are at most 1.5x the multiprocessors. On an H200
(benchmarks/scan_split.py, 2026-12-03, ninth session: the kernel scans the segments in place, no copies)
B = 1, L = 16K, 1536 channels (96 blocks): 1.98 vs 2.82 ms fwd+bwd (0.55 vs 0.82 fwd); 2048 channels (128
blocks): 2.60 vs 2.86 at S = 4; B = 2 x 8K (192 blocks): 1.87 vs 2.00; B = 8 x 2K (768 blocks): slower at every
S (1.80 vs 1.44 at S = 4), so that stays unsplit.
An earlier split ran the full scan twice each way (every segment from zero for its final state, then again from
the carried state); slower at every shape measured (B = 1, L = 16K, S = 4: 4.31 vs 2.85 ms fwd+bwd), it was
removed (benchmarks/NOTES_selective_scan.md keeps its numbers).
"""

from __future__ import annotations

import torch

from zoo_kernels._device import sm_count
from zoo_kernels._env import env_int
from zoo_kernels._grad import needs_grad
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
    initial_state=None, seq_idx=None, return_final_state=False, backend: str = "auto", seq_split=None,
):
    """Selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t·h_t + D u_t, out = y * silu(z).

    Shapes: u, delta, z [batch, D, L]; A [D, N]; B, C [batch, N, L] or grouped [batch, G, N, L]
    (channel d reads group d // (D // G)); D, delta_bias [D]; initial_state [batch, D, N];
    seq_idx [batch, L] int (the state restarts from zero where it changes). Returns out [batch, D, L]
    in u's dtype, and with return_final_state also the final state [batch, D, N] in fp32.
    seq_split: segments per row scanned in parallel (module docstring; exact); must divide L. None reads
    $ZOO_SCAN_SEQ_SPLIT (applied where it divides L, else no split), else the measured default (`auto_seq_split`: 4
    on CUDA for long rows that fill few blocks, else 1).
    """
    if u.dim() != 3:  # (before the split's choice reads L)
        raise ValueError(f"selective_scan: u must be [batch, D, L], got {tuple(u.shape)}")
    backend = resolve_backend(backend, u.device)
    if u.shape[2] == 0:  # no token: the reference passes the state through (the kernel refuses L = 0)
        backend, seq_split = "ref", 1
    if backend == "cuda":
        from zoo_kernels.selective_scan.cuda import selective_scan_cuda as scan
    else:
        scan = selective_scan_ref
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, return_final_state)
    n_seg = _resolve_seq_split(seq_split, u.shape[2], u, backend)
    if n_seg > 1:
        from zoo_kernels.selective_scan.split import split_scan

        return split_scan(backend, n_seg, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                          seq_idx, return_final_state)
    return scan(*args)


SEQ_SPLIT_ENV = "ZOO_SCAN_SEQ_SPLIT"


def auto_seq_split(u: torch.Tensor, backend: str) -> int:
    """The default split (module docstring): 4 on CUDA where rows are >= 8192 long and batch x ⌈D/16⌉ blocks
    are at most 1.5x the multiprocessors, else 1."""
    batch, dim, length = u.shape
    if backend != "cuda" or length < 8192 or length % 16:  # segments 4-aligned: scanned in place (split.py)
        return 1
    return 4 if 2 * batch * -(-dim // 16) <= 3 * sm_count(u.device) else 1


def _resolve_seq_split(seq_split, length: int, u: torch.Tensor | None = None, backend: str = "ref") -> int:
    if seq_split is None:
        forced = env_int(SEQ_SPLIT_ENV, None, low=1, what="segments per row; 1 = no split")
        if forced is None:
            return auto_seq_split(u, backend) if u is not None else 1
        # the split is exact, so a length it does not divide (a prompt, a decoding step) runs unsplit, not refused
        return forced if length % forced == 0 else 1
    if not isinstance(seq_split, int) or seq_split < 1:
        raise ValueError(f"seq_split must be a positive int, got {seq_split!r}")
    if length % seq_split:
        raise ValueError(f"seq_split={seq_split} does not divide the sequence length {length}")
    return seq_split


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           dt_weight=None, backend: str = "auto"):
    """One decoding step; updates `state` [batch, D, N] (fp32) in place and returns y [batch, D].

    x, dt, z [batch, D]; B, C [batch, N] or [batch, G, N]; A [D, N]; D, dt_bias [D]. dt_weight [D, R] (Mamba's
    dt_proj folded into the step): dt is then the low-rank [batch, R] and the step uses dt @ dt_weight.T, before
    dt_bias and softplus. The CUDA kernel has no backward: where an input needs a gradient the torch reference runs.
    """
    backend = resolve_backend(backend, x.device)
    if backend == "cuda" and not needs_grad(state, x, dt, A, B, C, D, z, dt_bias, dt_weight):
        from zoo_kernels.selective_scan.cuda import selective_state_update_cuda

        return selective_state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_weight)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_weight)


__all__ = ["selective_scan", "selective_scan_ref", "selective_state_update", "cuda_available"]
