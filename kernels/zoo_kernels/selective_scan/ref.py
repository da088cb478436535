"""Mamba-1 selective scan in plain PyTorch: the specification, the CPU path and the oracle of the CUDA kernel.

The recurrence h_t = a_t h_{t-1} + b_t (per channel d and state n, a_t = exp(Δ_t A) ≤ 1) is evaluated in
chunks of `CHUNK_SIZE` tokens; inside a chunk a log-depth parallel scan multiplies decays only (never
divides by them), so nothing can overflow, and the state entering a chunk is folded into its first token.
Document boundaries (seq_idx) set a_t = 0, which resets the state without any -inf in the arithmetic.
The scan's backward is its adjoint, the same scan run backwards in time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo_kernels._checks import first_problem, raise_if, shape_problem
from zoo_kernels._fp32 import no_autocast

# Tokens per chunk, and floats per [batch, chunk, channels, N] block on CPU (4 MiB: stays in cache).
CHUNK_SIZE = 64
BLOCK_ELEMENTS = 1 << 20


def _scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan h_t = a_t * h_{t-1} + b_t along dim 1 (h_{-1} = 0) in log2(T) levels.

    Work-efficient odd/even recursion: adjacent pairs are combined (products of decays only, never a
    division), the half-length scan gives the odd positions and one multiply-add the even ones.
    """
    T = a.shape[1]
    if T == 1:
        return b
    if T % 2:
        h = _scan(a[:, :-1], b[:, :-1])
        return torch.cat([h, torch.addcmul(b[:, -1:], a[:, -1:], h[:, -1:])], dim=1)
    a_even, a_odd = a[:, 0::2], a[:, 1::2]
    b_even, b_odd = b[:, 0::2], b[:, 1::2]
    h_odd = _scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))  # h at positions 1, 3, 5, ...
    h_even = torch.cat([b_even[:, :1], torch.addcmul(b_even[:, 1:], a_even[:, 1:], h_odd[:, :-1])], dim=1)
    return torch.stack([h_even, h_odd], dim=2).flatten(1, 2)


class _LinearScan(torch.autograd.Function):
    """The scan with its adjoint as backward: a reverse scan of the same form, so the backward costs
    about one forward and keeps only a and h (autograd through the recursion is 3-4x slower)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = ctx.saved_tensors
        # dL/db_t = g_t = grad_h_t + a_{t+1} g_{t+1}: the same scan run backwards in time.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        grad_b = _scan(a_next.flip(1), grad_h.flip(1)).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return grad_b * h_prev, grad_b


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan h_t = a_t * h_{t-1} + b_t along dim 1 with h_{-1} = 0; differentiable in a and b.

    a, b: [batch, T, ...] (same shape). Returns h [batch, T, ...].
    """
    return _LinearScan.apply(a, b)


def scan_shape_problem(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                       seq_idx=None) -> str | None:
    """Why these inputs do not have selective_scan's shapes (None: they do). Without it the reference broadcast a
    wrong one (a delta or B of length 1, a B or z of batch 1, a D of size 1) into wrong numbers where the CUDA
    kernel refuses it (cuda._scan_problem, which also limits N)."""
    if u.dim() != 3:
        return f"u must be [batch, D, L], got {tuple(u.shape)}"
    if A.dim() != 2:
        return f"A must be [D, N], got {tuple(A.shape)}"
    if B.dim() not in (3, 4) or C.dim() not in (3, 4):
        return f"B and C must be [batch, N, L] or [batch, G, N, L], got {tuple(B.shape)} and {tuple(C.shape)}"
    batch, dim, length = u.shape
    as4 = lambda t: tuple(t.shape) if t.dim() == 4 else (t.shape[0], 1, *t.shape[1:])  # noqa: E731 (G = 1)
    groups, n_state = as4(B)[1], A.shape[1]
    if groups < 1 or dim % groups:
        return f"D={dim} is not divisible by the number of B/C groups {groups}"
    bc = (batch, groups, n_state, length)
    return first_problem(
        shape_problem(delta, "delta", (batch, dim, length)), shape_problem(A, "A", (dim, n_state)),
        None if as4(B) == bc else f"B has shape {tuple(B.shape)}, expected {bc}" + (
            f" or {(batch, n_state, length)}" if groups == 1 else ""),
        None if as4(C) == bc else f"C has shape {tuple(C.shape)}, expected B's {tuple(B.shape)}",
        shape_problem(D, "D", (dim,)), shape_problem(z, "z", (batch, dim, length)),
        shape_problem(delta_bias, "delta_bias", (dim,)),
        shape_problem(initial_state, "initial_state", (batch, dim, n_state)),
        shape_problem(seq_idx, "seq_idx", (batch, length)))


def update_shape_problem(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_weight=None) -> str | None:
    """Why these inputs do not have selective_state_update's shapes (None: they do; cuda._update_problem on CUDA)."""
    if x.dim() != 2:
        return f"x must be [batch, D], got {tuple(x.shape)}"
    if B.dim() not in (2, 3) or C.dim() not in (2, 3):
        return f"B and C must be [batch, N] or [batch, G, N], got {tuple(B.shape)} and {tuple(C.shape)}"
    batch, dim = x.shape
    as3 = lambda t: tuple(t.shape) if t.dim() == 3 else (t.shape[0], 1, t.shape[1])  # noqa: E731 (G = 1)
    groups, n_state = as3(B)[1], as3(B)[2]
    if groups < 1 or dim % groups:
        return f"D={dim} is not divisible by the number of B/C groups {groups}"
    if dt_weight is not None and (dt.dim() != 2 or dt.shape[0] != batch):
        return f"with dt_weight, dt must be [{batch}, R], got {tuple(dt.shape)}"
    return first_problem(
        None if as3(B)[0] == batch else f"B has shape {tuple(B.shape)}, expected batch {batch}",
        None if as3(C) == as3(B) else f"C has shape {tuple(C.shape)}, expected B's {tuple(B.shape)}",
        shape_problem(state, "state", (batch, dim, n_state)), shape_problem(A, "A", (dim, n_state)),
        shape_problem(dt_weight, "dt_weight", (dim, dt.shape[-1])) if dt_weight is not None
        else shape_problem(dt, "dt", (batch, dim)),
        shape_problem(z, "z", (batch, dim)), shape_problem(D, "D", (dim,)), shape_problem(dt_bias, "dt_bias", (dim,)))


def _document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[batch, L] bool, True where a new document starts (never at position 0: the initial state's)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


@no_autocast
def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t·h_t + D u_t, out = y * silu(z).

    u, delta, z: [batch, D, L]; A: [D, N]; B, C: [batch, N, L] or grouped [batch, G, N, L] (channel d
    reads group d // (D // G)); D, delta_bias: [D]; Δ = delta + delta_bias, softplus'ed if
    delta_softplus; initial_state: [batch, D, N]; seq_idx: [batch, L] int, the state restarts from zero
    wherever it changes (so initial_state only reaches the first document of each row).
    Returns out [batch, D, L] in u's dtype, and with return_final_state also the state after the last
    position [batch, D, N] in fp32. Math in fp32; differentiable in every input.
    """
    raise_if("selective_scan", scan_shape_problem(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx))
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else 1

    if length == 0:  # no token: the state passes through (the chunk loop below needs one)
        h = u.new_zeros(batch, dim, n_state, dtype=torch.float32) if initial_state is None else initial_state.float()
        out = (u.float() * 0).to(u.dtype)  # (batch, D, 0), attached to u's graph
        return (out, h) if return_final_state else out
    u32 = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # Token-major layouts so that chunks and the scan's even/odd slices are contiguous blocks of D*N.
    dt_t = dt.transpose(1, 2).contiguous()  # (batch, L, D)
    dtu_t = (dt * u32).transpose(1, 2).contiguous()  # (batch, L, D)
    B_t = (B.float() if B.dim() == 4 else B.float()[:, None]).permute(0, 3, 1, 2).contiguous()  # (batch, L, G, N)
    C_t = (C.float() if C.dim() == 4 else C.float()[:, None]).permute(0, 3, 1, 2).contiguous()  # (batch, L, G, N)
    A32 = A.float()
    keep = None if seq_idx is None else ~_document_starts(seq_idx)  # (batch, L)

    # Blocks of channels (inside one B/C group) keep each chunk's [batch, T, channels, N] working set
    # about BLOCK_ELEMENTS floats, small enough to stay in cache: several times faster than whole-D chunks on CPU.
    # Inputs are cut with split/unbind (one backward node each), not sliced per block and chunk, whose
    # backward would write a zero-padded full-size gradient for every piece.
    group_size = dim // groups
    block_elements = BLOCK_ELEMENTS if u.device.type == "cpu" else 1 << 26  # a GPU wants few, large ops
    block = max(1, min(group_size, block_elements // max(1, batch * min(CHUNK_SIZE, length) * n_state)))
    sizes = [min(block, group_size - start) for start in range(0, group_size, block)] * groups
    block_group = [g for g in range(groups) for _ in range(len(sizes) // groups)]
    h0_blocks = [None] * len(sizes) if initial_state is None else initial_state.float().split(sizes, dim=1)
    B_chunks = [B_g.split(CHUNK_SIZE, dim=1) for B_g in B_t.unbind(2)]  # [group][chunk]: (batch, T, N)
    C_chunks = [C_g.split(CHUNK_SIZE, dim=1) for C_g in C_t.unbind(2)]
    keep_chunks = None if keep is None else keep.split(CHUNK_SIZE, dim=1)
    y_blocks, h_blocks = [], []
    for g, dt_b, dtu_b, A_b, h in zip(block_group, dt_t.split(sizes, dim=2), dtu_t.split(sizes, dim=2),
                                      A32.split(sizes), h0_blocks):
        if h is None:
            h = u32.new_zeros(batch, A_b.shape[0], n_state)
        ys = []
        for c, (dt_c, dtu_c) in enumerate(zip(dt_b.split(CHUNK_SIZE, dim=1), dtu_b.split(CHUNK_SIZE, dim=1))):
            a = torch.exp(dt_c[..., None] * A_b)  # (batch, T, channels, N)
            if keep_chunks is not None:
                a = a * keep_chunks[c][:, :, None, None]
            bx = dtu_c[..., None] * B_chunks[g][c][:, :, None, :]  # (batch, T, channels, N)
            bx[:, 0] = torch.addcmul(bx[:, 0], a[:, 0], h)  # fold the carried state into the first token
            hs = linear_scan(a, bx)
            ys.append(torch.einsum("btdn,btn->btd", hs, C_chunks[g][c]))
            h = hs[:, -1]
        y_blocks.append(torch.cat(ys, dim=1))
        h_blocks.append(h)
    y = torch.cat(y_blocks, dim=2).transpose(1, 2)  # (batch, D, L)
    h = torch.cat(h_blocks, dim=1)  # (batch, D, N)
    if D is not None:
        y = y + D.float()[:, None] * u32
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, h) if return_final_state else out


@no_autocast
def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step of the selective scan; updates `state` in place and returns y [batch, D].

    state: [batch, D, N] (fp32); x, dt, z: [batch, D]; A: [D, N]; B, C: [batch, N] or [batch, G, N];
    D, dt_bias: [D]. dt_weight [D, R]: dt is then [batch, R] and the step uses dt @ dt_weight.T (in fp32), before
    dt_bias and softplus. Stepping a sequence through this function equals selective_scan_ref on it.
    """
    raise_if("selective_state_update", update_shape_problem(state, x, dt, A, B, C, D, z, dt_bias, dt_weight))
    batch, dim = x.shape
    x32 = x.float()
    dt32 = dt.float()
    if dt_weight is not None:
        dt32 = dt32 @ dt_weight.float().T
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.float()
    if dt_softplus:
        dt32 = F.softplus(dt32)
    B32 = B.float() if B.dim() == 3 else B.float()[:, None]  # (batch, G, N)
    C32 = C.float() if C.dim() == 3 else C.float()[:, None]
    groups, n_state = B32.shape[1], B32.shape[2]
    decay = torch.exp(dt32[:, :, None] * A.float())  # (batch, D, N)
    bx = ((dt32 * x32).view(batch, groups, dim // groups, 1) * B32[:, :, None]).view(batch, dim, n_state)
    # with autograd on, the product keeps its own copy of the old state: the in-place update below must not
    # change a tensor the backward needs (a step taken with gradients, e.g. through a cache)
    new_state = state.to(torch.float32, copy=torch.is_grad_enabled()) * decay + bx
    y = torch.einsum("bgen,bgn->bge", new_state.view(batch, groups, dim // groups, n_state), C32)
    y = y.reshape(batch, dim)
    if D is not None:
        y = y + D.float() * x32
    if z is not None:
        y = y * F.silu(z.float())
    state.copy_(new_state)
    return y.to(x.dtype)
