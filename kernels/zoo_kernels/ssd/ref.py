"""Mamba-2 SSD (state space duality) in plain PyTorch: the specification, the CPU path and the kernel oracle.

The chunked algorithm of the Mamba-2 paper: inside each chunk of T tokens the output is a masked
quadratic form whose decay matrix is the exponential of segment sums of log-decays (exponents ≤ 0 only,
so nothing overflows); across chunks one state per chunk is passed on. Document boundaries (seq_idx)
are masks on the segment sums, never -inf in the arithmetic, so no NaN can appear in values or gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo_kernels._checks import first_problem, raise_if, shape_problem
from zoo_kernels._fp32 import no_autocast


def document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """[batch, L] int -> [batch, L] long: 0 for the first document of each row, +1 at every change.

    Two positions are in the same document exactly when their ids are equal (an id that reappears
    later in seq_idx still starts a new document).
    """
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return starts.cumsum(dim=1)


def segment_sum(x: torch.Tensor, same_document: torch.Tensor | None = None) -> torch.Tensor:
    """Masked segment sums: x [..., T] -> [..., T, T] with out[t, s] = x[s+1] + ... + x[t] for s ≤ t.

    Entries with s > t, or with t and s in different documents (same_document [..., T, T] False), are
    -inf, so exp() of the result is the decay matrix. Built by a cumsum over a masked copy rather than
    as cumsum[t] - cumsum[s], which loses precision when the cumulative sum is large.
    """
    T = x.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x_rep = x[..., :, None].expand(*x.shape, T).masked_fill(~strictly_lower, 0.0)  # [t, s] = x[t] if t > s
    out = x_rep.cumsum(dim=-2)
    valid = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if same_document is not None:
        valid = valid & same_document
    return out.masked_fill(~valid, float("-inf"))


def _d_problem(D: torch.Tensor | None, n_heads: int, head_dim: int) -> str | None:
    if D is None or tuple(D.shape) in ((n_heads,), (n_heads, head_dim)):
        return None
    return f"D has shape {tuple(D.shape)}, expected {(n_heads,)} or {(n_heads, head_dim)}"


def scan_shape_problem(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, initial_state=None,
                       seq_idx=None) -> str | None:
    """Why these inputs do not have ssd_chunk_scan's shapes (None: they do). Without it the reference broadcast a
    dt of one head, an A, D or dt_bias of size 1 or a z of batch 1 into wrong numbers where the Triton kernel
    refuses them (triton_ssd.ssd_chunk_scan_triton)."""
    if x.dim() != 4:
        return f"x must be [batch, L, H, P], got {tuple(x.shape)}"
    batch, length, n_heads, head_dim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape[2] < 1 or n_heads % B.shape[2]:
        return (f"B must be [batch, L, G, N] = [{batch}, {length}, G, N] with G dividing H={n_heads}, "
                f"got {tuple(B.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size must be a positive int, got {chunk_size!r}"
    n_state = B.shape[3]
    return first_problem(
        shape_problem(C, "C", tuple(B.shape)), shape_problem(dt, "dt", (batch, length, n_heads)),
        shape_problem(A, "A", (n_heads,)), _d_problem(D, n_heads, head_dim),
        shape_problem(z, "z", (batch, length, n_heads, head_dim)), shape_problem(dt_bias, "dt_bias", (n_heads,)),
        shape_problem(initial_state, "initial_state", (batch, n_heads, head_dim, n_state)),
        shape_problem(seq_idx, "seq_idx", (batch, length)))


def update_shape_problem(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> str | None:
    """Why these inputs do not have ssd_state_update's shapes (None: they do)."""
    if x.dim() != 3:
        return f"x must be [batch, H, P], got {tuple(x.shape)}"
    batch, n_heads, head_dim = x.shape
    if B.dim() != 3 or B.shape[0] != batch or B.shape[1] < 1 or n_heads % B.shape[1]:
        return f"B must be [batch, G, N] = [{batch}, G, N] with G dividing H={n_heads}, got {tuple(B.shape)}"
    return first_problem(
        shape_problem(C, "C", tuple(B.shape)),
        shape_problem(state, "state", (batch, n_heads, head_dim, B.shape[2])),
        shape_problem(dt, "dt", (batch, n_heads)), shape_problem(A, "A", (n_heads,)), _d_problem(D, n_heads, head_dim),
        shape_problem(z, "z", (batch, n_heads, head_dim)), shape_problem(dt_bias, "dt_bias", (n_heads,)))


@no_autocast
def ssd_chunk_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 scan h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ, y_t = h_t C_t + D x_t, out = y * silu(z).

    x, z: [batch, L, H, P]; dt: [batch, L, H] (Δ = dt + dt_bias, softplus'ed if dt_softplus);
    A: [H] (negative); B, C: [batch, L, G, N] (head h reads group h // (H // G)); D: [H] or [H, P];
    dt_bias: [H]; initial_state: [batch, H, P, N]; seq_idx: [batch, L] int, the state restarts from zero
    wherever it changes. Any L (the last chunk is padded with Δ = 0, which leaves the state unchanged).
    Returns y [batch, L, H, P] in x's dtype, and with return_final_state also the state after the last
    position [batch, H, P, N] in fp32. Math in fp32; differentiable in every input.
    """
    raise_if("ssd_chunk_scan", scan_shape_problem(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx))
    batch, length, n_heads, head_dim = x.shape
    groups, n_state = B.shape[2], B.shape[3]
    heads_per_group = n_heads // groups

    if length == 0:  # no token: the state passes through (the chunking below needs one)
        out = (x.float() * 0).to(x.dtype)  # (batch, 0, H, P), attached to x's graph
        if not return_final_state:
            return out
        return out, (x.new_zeros(batch, n_heads, head_dim, n_state, dtype=torch.float32) if initial_state is None
                     else initial_state.float())
    x32 = x.float()
    dt32 = dt.float()
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.float()
    if dt_softplus:
        dt32 = F.softplus(dt32)
    doc = None if seq_idx is None else document_ids(seq_idx)

    T = min(chunk_size, length)
    pad = -length % T
    n_chunks = (length + pad) // T
    xdt = x32 * dt32[..., None]
    dA = dt32 * A.float()
    B32, C32 = B.float(), C.float()
    if pad:
        # Padded tokens have Δ = 0 (decay 1, no input): the state after them is the state at L - 1.
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        B32 = F.pad(B32, (0, 0, 0, 0, 0, pad))
        C32 = F.pad(C32, (0, 0, 0, 0, 0, pad))
        if doc is not None:
            doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1)

    # Chunked layouts; heads split as (group, head in group) so that B/C broadcast over a group's heads.
    xdt = xdt.view(batch, n_chunks, T, groups, heads_per_group, head_dim)  # (b, c, T, g, e, p)
    B32 = B32.view(batch, n_chunks, T, groups, n_state)
    C32 = C32.view(batch, n_chunks, T, groups, n_state)
    dA = dA.view(batch, n_chunks, T, groups, heads_per_group).permute(0, 3, 4, 1, 2)  # (b, g, e, c, T)

    same_document = None
    carried = None  # does the state entering the chunk reach position t: (b, 1, 1, c, T)
    if doc is not None:
        doc = doc.view(batch, n_chunks, T)
        same_document = (doc[:, :, :, None] == doc[:, :, None, :])[:, None, None]  # (b, 1, 1, c, T, T)
        # The previous token's document: for chunk 0 it is document 0, the initial state's.
        doc_before = torch.cat([doc.new_zeros(batch, 1), doc[:, :-1, -1]], dim=1)  # (b, c)
        carried = (doc == doc_before[:, :, None])[:, None, None]

    # 1. Inside each chunk: y = (C Bᵀ ∘ L) (Δ x) with L[t, s] = exp(Δ_{s+1} A + ... + Δ_t A).
    decay = torch.exp(segment_sum(dA, same_document))  # (b, g, e, c, T, T)
    scores = torch.einsum("bctgn,bcsgn->bgcts", C32, B32)
    y = torch.einsum("bgcts,bgects,bcsgep->bctgep", scores, decay, xdt)

    # 2. Each chunk's own contribution to the state at its end (the last row of the decay matrix).
    chunk_states = torch.einsum("bcsgn,bgecs,bcsgep->bcgepn", B32, decay[..., -1, :], xdt)

    # 3. Pass states from chunk to chunk: exp(total log-decay of the chunk), zero across a boundary.
    decay_in = torch.exp(dA.cumsum(dim=-1))  # (b, g, e, c, T): decay from the chunk start to t
    if carried is not None:
        decay_in = decay_in * carried
    if initial_state is None:
        state = x32.new_zeros(batch, groups, heads_per_group, head_dim, n_state)
    else:
        state = initial_state.float().view(batch, groups, heads_per_group, head_dim, n_state)
    states_in = []
    for c in range(n_chunks):
        states_in.append(state)
        state = state * decay_in[:, :, :, c, -1, None, None] + chunk_states[:, c]
    states_in = torch.stack(states_in, dim=1)  # (b, c, g, e, p, n)

    # 4. The carried state's part of the output, decayed from the chunk start to t.
    y = y + torch.einsum("bctgn,bcgepn,bgect->bctgep", C32, states_in, decay_in)

    y = y.reshape(batch, n_chunks * T, n_heads, head_dim)[:, :length]
    if D is not None:
        D32 = D.float()
        y = y + x32 * (D32[:, None] if D32.dim() == 1 else D32)
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(x.dtype)
    if return_final_state:
        return out, state.reshape(batch, n_heads, head_dim, n_state)
    return out


@no_autocast
def ssd_state_update_ref(
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
) -> torch.Tensor:
    """One decoding step of the SSD scan; updates `state` in place and returns y [batch, H, P].

    state: [batch, H, P, N] (fp32); x, z: [batch, H, P]; dt: [batch, H]; A: [H]; B, C: [batch, G, N];
    D: [H] or [H, P]; dt_bias: [H]. Stepping a sequence through this function equals ssd_chunk_scan_ref.
    """
    raise_if("ssd_state_update", update_shape_problem(state, x, dt, A, B, C, D, z, dt_bias))
    batch, n_heads, head_dim = x.shape
    groups = B.shape[1]
    x32 = x.float()
    dt32 = dt.float()
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.float()
    if dt_softplus:
        dt32 = F.softplus(dt32)
    B32 = B.float().repeat_interleave(n_heads // groups, dim=1)  # (batch, H, N)
    C32 = C.float().repeat_interleave(n_heads // groups, dim=1)
    decay = torch.exp(dt32 * A.float())[:, :, None, None]  # (batch, H, 1, 1)
    # with autograd on, the product keeps its own copy of the old state (the in-place update below must not change
    # a tensor the backward needs)
    old = state.to(torch.float32, copy=torch.is_grad_enabled())
    new_state = old * decay + (x32 * dt32[..., None])[..., None] * B32[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C32)
    if D is not None:
        D32 = D.float()
        y = y + x32 * (D32[:, None] if D32.dim() == 1 else D32)
    if z is not None:
        y = y * F.silu(z.float())
    state.copy_(new_state)
    return y.to(x.dtype)
