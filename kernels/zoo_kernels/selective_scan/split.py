"""The selective scan with rows cut into S segments: two cheap passes, one full forward and one full backward.

The scan kernel runs one block per 16 channels and row over the whole row, so a batch of one fills too few
blocks at long L. Here every row of length L becomes S segment rows of length T = L / S:

- forward: a cheap pass gives every segment's final state from zero, f_s = Σ_t exp(A (S_T − S_t)) Δ_t u_t B_t
  (S_t = Σ_{τ≤t} Δ_τ inside the segment), and its decay sum P_s = S_T; the states entering the segments follow
  from the linear recurrence, h_0 = initial_state (or 0), h_{s+1} = exp(A P_s) h_s + f_s (a torch loop over S
  states); then ONE full forward over the segment rows from h_s gives the unsplit outputs, and the last
  segment's final state the final state.
- backward: with dy_t = dout_t · silu(z_t) (dout_t without z), the gradient reaching C_t·h_t, a cheap pass
  gives every segment's g_s = Σ_t exp(A S_t) C_t dy_t, the gradient of the state entering it when the state
  leaving it gets none; the gradients of the states entering the segments follow backwards, λ_S = dfinal (or 0),
  λ_s = g_s + exp(A P_s) λ_{s+1}; then ONE full backward over the segment rows, from h_s and with
  dfinal = λ_{s+1} (the user's for the last), gives every gradient; dA, dD and dΔ-bias sum over the rows as
  the kernel's do, and segment 0's dh0 is the initial state's gradient.

Why this is exact, though no gradient flows through the cheap passes or the combines (which read u, Δ, B, C
too): within a segment the loss depends on the inputs at time t only through the state h_{t−1} before t and
through the adjoint (gradient of the loss w.r.t. h_t) after t. A segment's full backward computes every
input's gradient at t from exactly these two (the kernel's own backward: inputs at t times the adjoint, with
h_{t−1} re-run from h0), and both are the unsplit scan's: h0 = h_s is the unsplit state entering the segment,
so every h_{t−1} is; dfinal = λ_{s+1} is the unsplit gradient of the state leaving it, so every adjoint is.
The passes only compute h_s and λ_s, which the per-segment fwd and bwd then use as constants: adding the
passes' own derivative would count the inputs' influence on the other segments twice. The same argument
gives the gradient of initial_state as segment 0's dh0.

Document boundaries (seq_idx [batch, L]: the state restarts from zero at every position t > 0 where seq_idx
differs from position t − 1; position 0 never restarts, so initial_state reaches the first document) cut the
same recurrences. A document start at a segment's position 1 .. T−1 is a reset inside the segment rows, which
the full scans see in the cut seq_idx; the passes count, of f_s, only the tokens from the segment's last
document start on, and of g_s only those before its first; the segment's decay exp(A P_s) becomes 0 (the
state leaving it no longer depends on the one entering it). A document start at a segment's position 0 is no
reset for the kernel (it never resets at its row's first position, it decays h0 into it), so the link
ℓ_s = [seq_idx at the segment's first token == at the previous segment's last] zeroes the state entering
segment s instead: h_{s+1} = ℓ_{s+1} (exp(A P_s) h_s + f_s). Backwards the gradient of the state leaving
segment s passes through the same link: segment s's dfinal is ℓ_{s+1} λ_{s+1}, and λ_s = g_s + exp(A P_s)
ℓ_{s+1} λ_{s+1}. With h0 = 0 at a document start the kernel's step there is the unsplit one, h = Δ B u, and
the exactness argument above holds unchanged (h0 times the kernel's unmasked first decay is the unsplit state
before the segment's first token, times its decay and document mask).

Cost: each cheap pass is about one exp per (t, d, n) and reads u, Δ, B (dout, z, Δ, C backwards), writing
one state per segment; the full scans run once, as the unsplit scan does. The first segment's adjoint and the
last one's final state are never needed and not computed.

Layout: on CUDA the kernel scans the segments in place (its nseg: block row b scans segment b % S of row b / S,
channels a whole row apart), the passes read strided views [batch, S, ..., T] of the same rows, and out and the
gradients come back as whole rows: no copies (_InPlace; segments must start 4-aligned, T % 4 == 0, for the
kernel's float4 dB/dC accumulation). Elsewhere (the reference, or T % 4 != 0) the segment rows are copies
[batch * S, ..., T] (_Copied): u, Δ, B, C, z and seq_idx once, dout once, out and the gradients back. The copies
had cost a third of the split's time: at B = 1, L = 16K, 1536 channels, S = 4 on an H200, fwd+bwd 2.52 ms with
them, 1.99 in place (unsplit 2.85). seq_idx's segment boundaries are computed once per forward pass (_documents)
and kept for the next layer's call and for the backward.

`selective_scan(..., seq_split=S)` runs this on the reference backend (selective_scan_ref with the torch passes
below: the same orchestration, tested on CPU) and on CUDA (the kernel's fwd/bwd with the Triton passes of
split_passes.py; tests/test_selective_scan_cuda.py passed on an H200, 2026-12-03), where S = 4 is the default
for long rows that fill few blocks (selective_scan's module docstring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from zoo_kernels._checks import raise_if
from zoo_kernels.selective_scan.ref import scan_shape_problem, selective_scan_ref


def _delta(delta, delta_bias, delta_softplus):
    """Δ in fp32 as the scan computes it; delta [..., D, T]."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _per_channel(bc, dim):
    """[batch, S, G, N, T] -> [batch, S, D, N, T] in fp32 (channel d reads group d // (D // G))."""
    return bc.float().repeat_interleave(dim // bc.shape[2], dim=2)


def _document_starts(seq):
    """[..., T] bool, True where a document starts inside a segment: positions 1 .. T-1 where seq_idx changes."""
    starts = torch.zeros_like(seq, dtype=torch.bool)
    starts[..., 1:] = seq[..., 1:] != seq[..., :-1]
    return starts


def final_states_ref(u, delta, A, B, delta_bias, delta_softplus, first, count, seq_idx=None):
    """Segments first .. first+count-1 from a zero state: final states f [batch, count, D, N] and decay sums
    P = ΣΔ [batch, count, D], fp32. u, delta [batch, S, D, T]; B [batch, S, G, N, T]; seq_idx [batch, S, T]:
    f counts only the tokens from the segment's last document start on (P stays the whole segment's sum)."""
    seg = slice(first, first + count)
    dt = _delta(delta[:, seg], delta_bias, delta_softplus)
    sums = dt.cumsum(-1)
    later = sums[..., -1:] - sums  # Σ Δ after t
    w = torch.exp(later[..., None, :] * A.float()[..., None])  # [batch, count, D, N, T]
    dtu = dt * u[:, seg].float()
    if seq_idx is not None:
        starts = _document_starts(seq_idx[:, seg])
        pos = torch.arange(starts.shape[-1], device=starts.device)
        last = (starts * pos).amax(-1, keepdim=True)  # the last document start, 0 if none
        dtu = dtu * (pos >= last)[:, :, None]
    f = (w * dtu[..., None, :] * _per_channel(B[:, seg], u.shape[2])).sum(-1)
    return f, sums[..., -1]


def entry_adjoints_ref(dout, z, delta, A, C, delta_bias, delta_softplus, first, count, seq_idx=None):
    """Segments first .. first+count-1: gradients of the entering state g [batch, count, D, N] when the leaving
    state gets none, and decay sums P [batch, count, D], fp32. dout, z, delta [batch, S, D, T]; C [batch, S, G,
    N, T]; seq_idx [batch, S, T]: g counts only the tokens before the segment's first document start (P stays the
    whole segment's sum)."""
    seg = slice(first, first + count)
    dt = _delta(delta[:, seg], delta_bias, delta_softplus)
    dy = dout[:, seg].float()
    if z is not None:
        dy = dy * F.silu(z[:, seg].float())
    if seq_idx is not None:
        starts = _document_starts(seq_idx[:, seg])
        pos = torch.arange(starts.shape[-1], device=starts.device)
        first_start = torch.where(starts, pos, starts.shape[-1]).amin(-1, keepdim=True)  # T if none
        dy = dy * (pos < first_start)[:, :, None]
    sums = dt.cumsum(-1)
    w = torch.exp(sums[..., None, :] * A.float()[..., None])  # [batch, count, D, N, T]
    g = (w * dy[..., None, :] * _per_channel(C[:, seg], dout.shape[2])).sum(-1)
    return g, sums[..., -1]


def _boundaries(seq):
    """Of seq_idx's segments [batch, S, T], fp32 [batch, S] each: whole, 0 where a document starts inside the
    segment (its decay: the state leaving it ignores the one entering), and link, 0 where the segment's first
    token starts a document (the state entering it is zero; 1 for segment 0)."""
    whole = (~_document_starts(seq).any(-1)).float()
    link = torch.ones_like(whole)
    link[:, 1:] = (seq[:, 1:, 0] == seq[:, :-1, -1]).float()
    return whole, link


def _carry_states(h_init, f, decay, link=None):
    """States entering the S segments, [batch, S, D, N]: h_0 = h_init, h_{s+1} = link_{s+1} (decay_s h_s + f_s)
    (link [batch, S-1] of segments 1 .. S-1, None: all 1)."""
    if link is not None:
        f, decay = f * link[..., None, None], decay * link[..., None, None]
    states = [h_init]
    for s in range(f.shape[1]):
        states.append(torch.addcmul(f[:, s], decay[:, s], states[-1]))
    return torch.stack(states, 1)


def _carry_adjoints(dfinal, g, decay, link=None):
    """Gradients of the states leaving the S segments, [batch, S, D, N]: dfinal for the last, then backwards
    λ = link_{s+1} (g_{s+1} + decay_{s+1} λ') (g, decay, link [batch, S-1] of segments 1 .. S-1; None: all 1)."""
    if link is not None:
        g, decay = g * link[..., None, None], decay * link[..., None, None]
    adjoints = [dfinal]
    for s in reversed(range(g.shape[1])):
        adjoints.append(torch.addcmul(g[:, s], decay[:, s], adjoints[-1]))
    return torch.stack(adjoints[::-1], 1)


class _Ref:
    """The pieces on selective_scan_ref: inputs keep their dtypes, the full backward is autograd through it."""

    final_states = staticmethod(final_states_ref)
    entry_adjoints = staticmethod(entry_adjoints_ref)
    seq_dtype = None  # seq_idx's segment rows keep its dtype

    @staticmethod
    def prepare(u, A, D, delta_bias):
        """(dtype of the segment rows, None: each keeps its own; A, D, delta_bias as the full scan takes them)."""
        return None, A, D, delta_bias

    @staticmethod
    def strided(seg_len):
        """False: the full scans take copies of the segment rows (the reference scans whole rows)."""
        return False

    @staticmethod
    def forward(args, delta_softplus, h0, seq, save, n_seg):
        out, final = selective_scan_ref(*args, delta_softplus, h0, seq, True)
        return out, final, ()

    @staticmethod
    def backward(args, delta_softplus, h0, seq, saved, dout, dfinal, need_dh0, n_seg):
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_() for t in (*args, h0)]
            out, final = selective_scan_ref(*leaves[:-1], delta_softplus, leaves[-1], seq, True)
            wrt = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad((out, final), wrt, (dout, dfinal)))
        return tuple(None if t is None else next(grads) for t in leaves)


class _Cuda:
    """The pieces on our CUDA kernel (its fwd/bwd called as _SelectiveScanFn does) and the Triton passes."""

    seq_dtype = torch.int32  # the kernel reads seq_idx as int32

    @staticmethod
    def final_states(*args):
        from zoo_kernels.selective_scan.split_passes import final_states

        return final_states(*args)

    @staticmethod
    def entry_adjoints(*args):
        from zoo_kernels.selective_scan.split_passes import entry_adjoints

        return entry_adjoints(*args)

    @staticmethod
    def prepare(u, A, D, delta_bias):
        """(u's dtype, A, D, delta_bias in fp32); split_scan has checked the inputs (cuda.check_scan)."""
        from zoo_kernels.selective_scan.cuda import _f32

        return u.dtype, _f32(A), _f32(D), _f32(delta_bias)

    @staticmethod
    def strided(seg_len):
        """True: the kernel scans the segments in place (its nseg), no copies; its dB/dC accumulate in float4
        steps, so a segment must start 4-aligned."""
        return seg_len % 4 == 0

    @staticmethod
    def forward(args, delta_softplus, h0, seq, save, n_seg):
        from zoo_kernels.selective_scan.cuda import _module

        # the kernel resets where seq changes inside a row, never at its first position: it starts from h0
        out, final, ckpt, y_save = _module().fwd(*args, delta_softplus, h0, seq, save, True, n_seg)
        return out, final, (ckpt, y_save if args[6] is not None else None)

    @staticmethod
    def backward(args, delta_softplus, h0, seq, saved, dout, dfinal, need_dh0, n_seg):
        from zoo_kernels.selective_scan.cuda import _module

        ckpt, y_save = saved
        du, ddelta, dA, dB, dC, dD, dz, ddb, dh0 = _module().bwd(
            *args, delta_softplus, h0, seq, ckpt, y_save, dout, dfinal, need_dh0, n_seg)
        row_len = args[0].shape[-1]
        present = lambda i, g: g if args[i] is not None else None
        return (du, ddelta, dA, dB[..., :row_len], dC[..., :row_len], present(5, dD), present(6, dz),
                present(7, ddb), dh0 if need_dh0 else None)


def _cut(t, n_seg, dtype):
    """[batch, ..., L] -> the segment rows [batch * S, ..., L / S], contiguous, in dtype (one copy)."""
    if t is None:
        return None
    t = t.unflatten(-1, (n_seg, t.shape[-1] // n_seg)).movedim(-2, 1)
    rows = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    return rows.copy_(t).flatten(0, 1)


def _uncut(t, batch, dtype):
    """The segment rows [batch * S, ..., T] -> [batch, ..., S * T] in dtype (one copy)."""
    t = t.unflatten(0, (batch, -1)).movedim(1, -2)
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t).flatten(-2)


def _segments(t, batch):
    """[batch * S, ...] -> the view [batch, S, ...] the passes read."""
    return None if t is None else t.unflatten(0, (batch, -1))


class _Copied:
    """Segment rows as copies [batch * S, ..., T]: the full scans see S times the rows, each T long."""

    def __init__(self, batch, n_seg):
        self.batch, self.n_seg, self.kernel_segments = batch, n_seg, 1

    def rows(self, t, dtype):
        return _cut(t, self.n_seg, dtype)

    def segments(self, rows):
        return _segments(rows, self.batch)

    def whole(self, rows, dtype):
        return _uncut(rows, self.batch, dtype)


class _InPlace:
    """Segment rows in place: the full scans take the whole rows [batch, ..., L] and scan their S segments in
    parallel (the kernel's nseg); the passes read the strided views [batch, S, ..., T]. No copies."""

    def __init__(self, batch, n_seg):
        self.batch, self.n_seg, self.kernel_segments = batch, n_seg, n_seg

    def rows(self, t, dtype):
        return None if t is None else t.to(dtype or t.dtype).contiguous()

    def segments(self, rows):
        return None if rows is None else rows.unflatten(-1, (self.n_seg, -1)).movedim(-2, 1)

    def whole(self, rows, dtype):
        return rows.to(dtype)


_DOC_CACHE: dict = {}


def _documents(seq_idx, lay, dtype):
    """(seq_idx as the full scans take it, its segments' (whole, link) of _boundaries), or (None, None). Every
    Mamba layer of a forward pass gets the same seq_idx: the last call's result is reused while the same tensor
    comes back unchanged (identity and version; inference tensors, which have no version, are not cached)."""
    if seq_idx is None:
        return None, None
    key = (id(seq_idx), seq_idx._version, type(lay), lay.batch, lay.n_seg, dtype) \
        if not seq_idx.is_inference() else None
    if key is not None and _DOC_CACHE.get("key") == key and _DOC_CACHE["ref"] is seq_idx:
        return _DOC_CACHE["value"]
    seq_s = lay.rows(seq_idx, dtype)  # [batch * S, T] (copied) or [batch, L] (in place)
    value = (seq_s, _boundaries(lay.segments(seq_s)))
    if key is not None and not torch.compiler.is_compiling():
        _DOC_CACHE.update(key=key, ref=seq_idx, value=value)
    return value


class _SplitScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, n_seg, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus,
                return_final_state):
        batch, dim, length = u.shape
        dtype, A_, D_, bias_ = impl.prepare(u, A, D, delta_bias)
        lay = (_InPlace if impl.strided(length // n_seg) else _Copied)(batch, n_seg)
        B4, C4 = (t if t.dim() == 4 else t.unsqueeze(1) for t in (B, C))
        u_s, delta_s, B_s, C_s, z_s = (lay.rows(t, dtype) for t in (u, delta, B4, C4, z))
        seq_s, bounds = _documents(seq_idx, lay, impl.seq_dtype)
        f, sums = impl.final_states(lay.segments(u_s), lay.segments(delta_s), A_, lay.segments(B_s),
                                    bias_, delta_softplus, 0, n_seg - 1, lay.segments(seq_s))
        h_init = u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32) if initial_state is None \
            else initial_state.float()
        decay, link = torch.exp(sums[..., None] * A_.float()), None
        if seq_s is not None:  # segments 0 .. S-2 leave their states to segments 1 .. S-1
            whole, link = bounds
            decay, link = decay * whole[:, :-1, None, None], link[:, 1:]
        h0 = _carry_states(h_init, f, decay, link).flatten(0, 1)  # [batch * S, D, N]
        args = (u_s, delta_s, A_, B_s, C_s, D_, z_s, bias_)
        save = any(ctx.needs_input_grad)
        out, final, saved = impl.forward(args, delta_softplus, h0, seq_s, save, lay.kernel_segments)
        if save:
            ctx.save_for_backward(*args, h0, seq_s, *saved)
            ctx.impl, ctx.lay, ctx.batch, ctx.softplus = impl, lay, batch, bool(delta_softplus)
            ctx.bounds = bounds
            ctx.in_dtypes = tuple(None if t is None else t.dtype
                                  for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
            ctx.bc_dims = (B.dim(), C.dim())
        ctx.set_materialize_grads(False)
        out = lay.whole(out, out.dtype)
        return (out, _segments(final, batch)[:, -1]) if return_final_state else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal=None):
        impl, lay, batch = ctx.impl, ctx.lay, ctx.batch
        saved = ctx.saved_tensors
        args, h0, seq_s, extra = saved[:8], saved[8], saved[9], saved[10:]
        u_s, delta_s, A_, _, C_s, _, z_s, bias_ = args
        n_seg = lay.n_seg
        dout_s = torch.zeros_like(u_s) if dout is None else lay.rows(dout, u_s.dtype)
        g, sums = impl.entry_adjoints(lay.segments(dout_s), lay.segments(z_s), lay.segments(delta_s),
                                      A_, lay.segments(C_s), bias_, ctx.softplus, 1, n_seg - 1,
                                      lay.segments(seq_s))
        decay, link = torch.exp(sums[..., None] * A_.float()), None
        if seq_s is not None:  # segments 1 .. S-1 send their entering states' gradients to segments 0 .. S-2
            whole, link = ctx.bounds
            decay, link = decay * whole[:, 1:, None, None], link[:, 1:]
        last = torch.zeros_like(h0[:batch]) if dfinal is None else dfinal.float()
        dfinal_s = _carry_adjoints(last, g, decay, link).flatten(0, 1)
        need = ctx.needs_input_grad[2:11]
        grads = impl.backward(args, ctx.softplus, h0, seq_s, extra, dout_s, dfinal_s, need[8], lay.kernel_segments)
        out = []
        for i, (grad, dtype, wanted) in enumerate(zip(grads, ctx.in_dtypes, need)):
            if not wanted or grad is None:
                out.append(None)
            elif i in (0, 1, 3, 4, 6):  # u, delta, B, C, z: per segment row
                grad = lay.whole(grad, dtype)
                out.append(grad.squeeze(1) if i in (3, 4) and ctx.bc_dims[i - 3] == 3 else grad)
            else:  # A, D, delta_bias: summed over the rows; initial_state: segment 0's dh0
                out.append((_segments(grad, batch)[:, 0] if i == 8 else grad).to(dtype))
        return (None, None, *out, None, None, None)


@torch.compiler.disable  # eager under torch.compile: host-side loops over segments, Triton passes, the extension
def split_scan(backend, n_seg, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
               return_final_state):
    """selective_scan over rows cut into n_seg segments (module docstring); backend 'cuda' or 'ref'. Same
    arguments and results as selective_scan; seq_idx [batch, L] int or None. On 'cuda' the inputs are checked first
    as the unsplit kernel's (cuda.check_scan; the segments' entering states are made here, so not initial_state),
    then on both backends their shapes, initial_state's included (ref.scan_shape_problem)."""
    if backend == "cuda":
        from zoo_kernels.selective_scan.cuda import check_scan

        check_scan(u, delta, A, B, C, D, z, delta_bias, None, seq_idx)
    raise_if("selective_scan", scan_shape_problem(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx))
    impl = _Cuda if backend == "cuda" else _Ref
    return _SplitScanFn.apply(impl, n_seg, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                              delta_softplus, return_final_state)


__all__ = ["split_scan", "final_states_ref", "entry_adjoints_ref"]
