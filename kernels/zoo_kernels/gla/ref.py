"""Gated linear attention (GLA), chunk form, in plain PyTorch: the specification, CPU path and kernel oracle.

Semantics of flash-linear-attention's chunk_gla: S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t and
o_t = scale · q_t S_t, with a per-key-channel log decay g ≤ 0. The decay between positions s ≤ t is
exp(G_t - G_s) per channel (G the cumulative sum of g), which does not factor into a q part and a k part
without overflow. Each chunk is therefore cut into sub-chunks of SUB_CHUNK tokens: between sub-chunks the
decay is split at the first token of the query's sub-chunk (both factors have exponents ≤ 0), and inside
a sub-chunk it is formed pair by pair. No exponent is ever positive, for any g ≤ 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo_kernels._checks import first_problem, raise_if, shape_problem
from zoo_kernels._fp32 import no_autocast

SUB_CHUNK = 16
LOG_DECAY_FLOOR = -100.0  # g below it (-inf included) decays by exp(-100) ~ 4e-44, i.e. to 0


def _document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """[batch, L] -> [batch, L] long, 0 for the first document and +1 wherever seq_idx changes."""
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return starts.cumsum(dim=1)


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int) -> torch.Tensor:
    """Decayed scores A[t, s] = Σ_k q[t,k] k[s,k] exp(G[t,k] - G[s,k]) for s ≤ t, inside one chunk.

    q, k, G: [b, h, T, K] with G the cumulative log decay from the chunk start. Returns [b, h, T, T]; the
    entries with s > t are finite garbage that the caller masks.
    """
    b, h, T, K = q.shape
    n = T // sub
    qs, ks, Gs = (t.view(b, h, n, sub, K) for t in (q, k, G))
    # Diagonal sub-blocks, pair by pair: [b, h, n, t, s, K]; the exponents of s > t (masked by the caller) are set to
    # 0 by position, not by sign: clamping every exponent to <= 0 also cut the s <= t ones of a positive g (growth)
    lower = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()[:, :, None]  # (t, s, 1)
    pair = torch.exp(torch.where(lower, Gs[:, :, :, :, None] - Gs[:, :, :, None], 0.0))
    diag = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", qs, ks, pair)
    A = torch.zeros(b, h, n, sub, n, sub, dtype=q.dtype, device=q.device)
    A = A + torch.einsum("bhnts,nm->bhntms", diag, torch.eye(n, dtype=q.dtype, device=q.device))
    if n > 1:
        # Off-diagonal: reference point r_i = the first token of query sub-chunk i (exponents ≤ 0 on both
        # sides for g ≤ 0: G_t - G_r for t ≥ r, G_r - G_s for s < r; later s get exponent 0 and are masked).
        G_ref = Gs[:, :, :, 0]  # (b, h, n, K)
        q_ref = qs * torch.exp(Gs - G_ref[:, :, :, None])  # (b, h, n, sub, K)
        before = (torch.arange(T, device=q.device)[None, :]
                  < torch.arange(0, T, sub, device=q.device)[:, None])[:, :, None]  # (n, T, 1): s < r_i
        k_ref = k[:, :, None] * torch.exp(torch.where(before, G_ref[:, :, :, None] - G[:, :, None], 0.0))  # b,h,n,T,K
        off = torch.einsum("bhntk,bhnsk->bhnts", q_ref, k_ref).view(b, h, n, sub, n, sub)
        earlier = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)[:, None, :, None]
        A = A + off * earlier
    return A.view(b, h, T, T)


def chunk_shape_problem(q, k, v, g, initial_state=None, seq_idx=None, chunk_size=64) -> str | None:
    """Why these inputs do not have chunk_gla's shapes (None: they do). Without it the reference broadcast a v or
    an initial_state of batch 1 over every row (wrong numbers) and crashed in a view on the others."""
    if q.dim() != 4 or v.dim() != 4:
        return f"q must be [batch, T, H, K] and v [batch, T, H, V], got {tuple(q.shape)} and {tuple(v.shape)}"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size must be a positive int, got {chunk_size!r}"
    batch, length, n_heads, key_dim = q.shape
    value_dim = v.shape[-1]
    return first_problem(
        shape_problem(k, "k", tuple(q.shape)), shape_problem(g, "g", tuple(q.shape)),
        shape_problem(v, "v", (batch, length, n_heads, value_dim)),
        shape_problem(initial_state, "initial_state", (batch, n_heads, key_dim, value_dim)),
        shape_problem(seq_idx, "seq_idx", (batch, length)))


def update_shape_problem(state, q, k, v, g) -> str | None:
    """Why these inputs do not have gla_state_update's shapes (None: they do)."""
    if q.dim() != 3 or v.dim() != 3:
        return f"q must be [batch, H, K] and v [batch, H, V], got {tuple(q.shape)} and {tuple(v.shape)}"
    batch, n_heads, key_dim = q.shape
    return first_problem(
        shape_problem(k, "k", tuple(q.shape)), shape_problem(g, "g", tuple(q.shape)),
        shape_problem(v, "v", (batch, n_heads, v.shape[-1])),
        shape_problem(state, "state", (batch, n_heads, key_dim, v.shape[-1])))


@no_autocast
def chunk_gla_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t.

    q, k, g: [batch, T, H, K] (g: log decay, ≤ 0 in GLA; a positive one, growth, is computed exactly too, as
    gla_state_update_ref does); v: [batch, T, H, V]; scale: default K**-0.5;
    initial_state: [batch, H, K, V]; seq_idx: [batch, T] int, the state restarts from zero wherever it
    changes. Any T (the last chunk is padded with g = 0, k = v = 0). Returns o [batch, T, H, V] in q's
    dtype, and with return_final_state also the state after the last position [batch, H, K, V] in fp32.
    Math in fp32; differentiable in every input.
    """
    raise_if("chunk_gla", chunk_shape_problem(q, k, v, g, initial_state, seq_idx, chunk_size))
    batch, length, n_heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if scale is None:
        scale = key_dim**-0.5
    if length == 0:  # no token: the state passes through (the chunking below needs one)
        out = (v.float() * 0).to(q.dtype)  # (batch, 0, H, V), attached to v's graph
        if not return_final_state:
            return out
        return out, (q.new_zeros(batch, n_heads, key_dim, value_dim, dtype=torch.float32) if initial_state is None
                     else initial_state.float())
    sub = next(s for s in range(min(SUB_CHUNK, chunk_size), 0, -1) if chunk_size % s == 0)
    T = min(chunk_size, -(-length // sub) * sub)
    pad = -length % T
    n_chunks = (length + pad) // T

    # (batch, H, L, dim) layouts; padding has g = 0 and k = v = 0, which leaves the state unchanged.
    q32, k32, v32, g32 = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v, g))
    # g = -inf (a decay of exactly 0, a hard reset) made G_t - G_s = -inf - (-inf) = NaN below; exp(LOG_DECAY_FLOOR)
    # is 0 to fp32's precision next to any kept value, and cumulative sums of it stay small enough to difference
    g32 = g32.clamp(min=LOG_DECAY_FLOOR)
    q32 = q32 * scale
    doc = None
    if seq_idx is not None:
        doc = _document_ids(seq_idx)
        doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1)

    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if initial_state is None:
        state = q32.new_zeros(batch, n_heads, key_dim, value_dim)
    else:
        state = initial_state.float()
    outs = []
    for c in range(n_chunks):
        span = slice(c * T, (c + 1) * T)
        qc, kc, vc = q32[:, :, span], k32[:, :, span], v32[:, :, span]
        G = g32[:, :, span].cumsum(dim=2)  # (b, H, T, K): log decay from the chunk start, ≤ 0
        mask = causal
        decay_end = torch.exp(G[:, :, -1:] - G)  # decay from s to the chunk's last token, ≤ 1
        decay_start = torch.exp(G)  # decay from the chunk start to t, ≤ 1
        if doc is not None:
            dc = doc[:, span]
            before = dc.new_zeros(batch) if c == 0 else doc[:, c * T - 1]
            mask = mask & (dc[:, :, None] == dc[:, None, :])[:, None]  # (b, 1, T, T)
            decay_end = decay_end * (dc == dc[:, -1:])[:, None, :, None]
            decay_start = decay_start * (dc == before[:, None])[:, None, :, None]
        A = _chunk_attention(qc, kc, G, sub) * mask
        o = A @ vc + (qc * decay_start) @ state  # (b, H, T, V)
        outs.append(o)
        state = state * decay_start[:, :, -1, :, None] + (kc * decay_end).transpose(2, 3) @ vc
    o = torch.cat(outs, dim=2)[:, :, :length].transpose(1, 2)  # (batch, T, H, V)
    out = o.to(q.dtype)
    return (out, state) if return_final_state else out


@no_autocast
def gla_state_update_ref(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decoding step of GLA; updates `state` in place and returns o [batch, H, V] in q's dtype.

    state: [batch, H, K, V] (fp32); q, k, g: [batch, H, K]; v: [batch, H, V]; scale default K**-0.5.
    Stepping a sequence through this function equals chunk_gla_ref on it.
    """
    raise_if("gla_state_update", update_shape_problem(state, q, k, v, g))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    decay = torch.exp(g.float())[..., None]  # (batch, H, K, 1)
    # with autograd on, the product keeps its own copy of the old state (the in-place update below must not change
    # a tensor the backward needs)
    old = state.to(torch.float32, copy=torch.is_grad_enabled())
    new_state = old * decay + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, new_state)
    state.copy_(new_state)
    return o.to(q.dtype)
