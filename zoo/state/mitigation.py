"""Training-free state-collapse mitigations (Stuffed Mamba), applied by the recurrent mixers at inference.

A mixer (mamba, mamba2, gla) whose ``mitigation`` attribute holds a spec routes its scan through the
functions here; with ``mitigation = None`` (the default) its code path is untouched. Specs
(``parse_mitigation``)::

    forget:c_alpha=0.999,c_b=0.7,c_dt=1.0   α' = c_α·α (log-decay + log c_α), B' = c_B·B, Δ' = c_dt·Δ
    norm:threshold=10,chunk=64              cap each head's state norm ‖h‖_F at the threshold
    window:r=512                            sliding window by state difference, exact
    forget:c_alpha=0.999+norm:threshold=10  several at once ("+"); window does not combine with norm

Maths per mixer (h the state, a the decay, b the input of h_t = a_t ⊙ h_{t-1} + b_t):

- mamba: a = exp(Δ A) per channel and state index, b = Δ u B; gla: a = exp(g) per key channel, b = kᵀv
  (``c_b`` scales k, ``c_dt`` scales the log decay g, which is what scaling Δ does to log α = ΔA);
  mamba2: a = exp(Δ A_h) per head, b = Δ x Bᵀ.
- forget: c_α·a_t is applied exactly without touching the kernels: in a segment starting at s the scan
  runs from c·h_{s-1} on g_t = h_t / c^{t-s}, i.e. with B_t / c^{t-s} and C_t · c^{t-s} (the ratios of all terms are
  unchanged, so rounding is too), and the final state is multiplied back by c^{length-1}; segments are cut
  so that |length · log c| stays within the dtype's range (``_FORGET_EXPONENT``). gla takes g + log c_α.
- norm: a parallel forward is run in pieces of ``chunk`` tokens; after each piece (and at the end) heads
  whose norm exceeds the threshold are rescaled to it. The cap therefore acts at chunk granularity in a
  prefill and exactly per token in decoding (every step is capped); the chunks count a row's tokens, not its
  pads, from the start of each packed document (seq_idx). threshold may be a float or a tensor [heads] (see
  ``zoo.state.recorder.calibrate_norm_threshold``); mamba's heads are groups of ``group_size`` channels,
  mamba2's and gla's are their heads.
- window: h_t^(r) = h_t − (∏_{i=t−r+1..t} a_i) ⊙ h_{t−r} = Σ_{j=t−r+1..t} (∏_{i=j+1..t} a_i) b_j, the state
  the scan reaches from zero at t−r+1. Computed exactly in blocks of r tokens: with X the scan restarted at
  every block start and Λ the in-block running sum of log-decays, for t at offset o of block k
  h_t^(r) = X_t + exp(Λ_t) ⊙ (X^{k−1}_{end} − exp(Λ^{k−1}_{end} − Λ^{k−1}_o) ⊙ X^{k−1}_o): every difference
  spans at most one block, so no cancellation against the unbounded full state. The cache keeps the
  last r−1 tokens' scan inputs (not r states), so a prefill in pieces and decoding give the same outputs
  as one forward; its recurrent state is h^(r) at the last token. Cost: O(r · state) memory per block
  and per decoding step (the window is re-scanned), plain PyTorch (the kernels cannot express it).
  Packed sequences (seq_idx) are refused with a window; beam search reorders its carried inputs with the cache.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from zoo_kernels import (
    chunk_gla,
    gla_state_update,
    selective_scan,
    selective_state_update,
    ssd_chunk_scan,
    ssd_state_update,
)
from zoo_kernels.selective_scan.ref import linear_scan

from zoo.layers import keep_rows_

# The neutral spec: every value leaves the mixer's output unchanged.
DEFAULTS = {"c_alpha": 1.0, "c_b": 1.0, "c_dt": 1.0, "threshold": math.inf, "chunk": 64, "window": None,
            "group_size": 64}
# Spec names per kind in the text form, mapped to spec keys.
KINDS = {"forget": {"c_alpha": "c_alpha", "c_b": "c_b", "c_dt": "c_dt", "delta": "c_dt"},
         "norm": {"threshold": "threshold", "chunk": "chunk", "group_size": "group_size"},
         "window": {"r": "window", "window": "window"}}
_EXAMPLES = {"forget": "forget:c_alpha=0.999,c_b=0.7", "norm": "norm:threshold=10,chunk=64", "window": "window:r=512"}
# Largest |exponent| of the forget rescaling inside one segment, by dtype (fp16 tops out at 65504).
_FORGET_EXPONENT = {torch.float16: 6.0}
_FORGET_EXPONENT_DEFAULT = 40.0


# ---- specs ---------------------------------------------------------------------------------------------------

def parse_mitigation(text: str | None) -> dict | None:
    """'forget:c_alpha=0.999,c_b=0.7' | 'norm:threshold=10' | 'window:r=512' | 'a+b' | 'none' -> spec dict.

    Returns None for None, '' or 'none'; the dict holds only the keys given (``normalize_spec`` fills in the
    neutral rest). Raises ValueError naming the unknown kind or key.
    """
    if text is None or text.strip().lower() in ("", "none"):
        return None
    spec: dict = {}
    # "+" joins parts, but not the one of an exponent (c_alpha=1e+0 was cut into 'forget:c_alpha=1e' and '0')
    for part in re.split(r"(?<![0-9.][eE])\+", text):
        kind, _, args = part.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"mitigation {part!r}: unknown kind {kind!r}; use forget, norm or window "
                             f"(e.g. forget:c_alpha=0.999,c_b=0.7 | norm:threshold=10 | window:r=512)")
        items = [a.strip() for a in args.split(",") if a.strip()]
        if not items:  # a bare 'forget' or 'norm' was taken as c = 1 or no cap: no mitigation, without a word
            raise ValueError(f"mitigation {part!r}: give its settings, e.g. {_EXAMPLES[kind]}")
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in KINDS[kind]:
                raise ValueError(f"mitigation {part!r}: expected key=value with key in {sorted(KINDS[kind])}, "
                                 f"got {item!r}")
            if KINDS[kind][key] in spec:  # (the last one was taken, silently)
                raise ValueError(f"mitigation {text!r}: {KINDS[kind][key]} is given twice; give it once")
            value = value.strip()
            if value.lower() == "none" and key not in ("r", "window"):  # (float(None): a TypeError)
                raise ValueError(f"mitigation {part!r}: {key} must be a number, got {value!r}")
            try:
                spec[KINDS[kind][key]] = None if value.lower() == "none" else float(value)
            except ValueError:
                raise ValueError(f"mitigation {part!r}: {key} must be a number, could not convert {value!r}") from None
        if kind == "window" and "window" not in spec:
            raise ValueError(f"mitigation {part!r}: give the window length, e.g. window:r=512")
        if kind == "norm" and "threshold" not in spec:  # (norm:chunk=8 alone capped nothing, without a word)
            raise ValueError(f"mitigation {part!r}: give the cap, e.g. norm:threshold=10 (zoo eval state "
                             f"--norm-calibrate LEN measures per-head thresholds; give its chunk as --norm-chunk)")
    return normalize_spec(spec)


def normalize_spec(spec: Mapping | None) -> dict | None:
    """The spec with every key present (neutral defaults) and checked; None stays None."""
    if spec is None:
        return None
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"mitigation: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **spec}
    for key in ("c_alpha", "c_b", "c_dt"):
        out[key] = float(out[key])
    if not 0 < out["c_alpha"] <= 1:
        raise ValueError(f"mitigation c_alpha: must be in (0, 1] (forget more), got {out['c_alpha']}")
    for key in ("c_b", "c_dt"):
        if not (out[key] > 0 and math.isfinite(out[key])):
            raise ValueError(f"mitigation {key}: must be a finite number > 0, got {out[key]}")
    threshold = out["threshold"]
    if isinstance(threshold, torch.Tensor):
        if not bool((threshold > 0).all()):
            raise ValueError("mitigation threshold: every per-head threshold must be > 0")
    else:
        out["threshold"] = float(threshold)
        if not out["threshold"] > 0:
            raise ValueError(f"mitigation threshold: must be > 0, got {threshold}")
    # whole numbers >= 1: int() cut chunk=1.5 to 1 without a word, and failed on inf with an OverflowError
    for key in ("chunk", "group_size"):
        if not (float(out[key]).is_integer() and out[key] >= 1):
            raise ValueError(f"mitigation chunk / group_size: must be >= 1 and whole, got {key}={out[key]}")
        out[key] = int(out[key])
    if out["window"] is not None:
        if not (float(out["window"]).is_integer() and out["window"] >= 1):
            raise ValueError(f"mitigation window: r must be a positive integer, got {out['window']}")
        out["window"] = int(out["window"])
        if _has_cap(out):
            raise ValueError("mitigation: window and norm do not combine (the windowed state is not capped)")
    return out


def is_neutral(spec: Mapping | None) -> bool:
    """True when `spec` changes nothing (c = 1, no cap, no window)."""
    if spec is None:
        return True
    s = normalize_spec(spec)
    return s["c_alpha"] == 1 and s["c_b"] == 1 and s["c_dt"] == 1 and not _has_cap(s) and s["window"] is None


def splits_matter(spec: str | Mapping | None) -> bool:
    """Whether outputs under `spec` (text or dict) depend on how a sequence is split into forwards: the norm cap acts at
    the end of every forward (and every `chunk` tokens within it), so an evaluation's chunk size is one of its
    settings; forget and window are exact whatever the split."""
    parsed = parse_mitigation(spec) if isinstance(spec, str) else normalize_spec(spec)
    return parsed is not None and _has_cap(parsed)


def _has_cap(spec: Mapping) -> bool:
    threshold = spec["threshold"]
    return isinstance(threshold, torch.Tensor) or math.isfinite(threshold)


def _spec(mixer) -> dict:
    """The mixer's mitigation, normalized, checked once per spec: normalize_spec reads a per-head threshold tensor
    (calibrate_norm_threshold's, on the model's device) on the host, which at every mixer call was a device sync per
    layer and step, and failed the capture of generate(cuda_graph=True). The spec is checked again when one of its
    values is replaced (a tensor by another tensor object)."""
    spec = mixer.mitigation or {}
    items = sorted(spec.items())
    kept = mixer.__dict__.get("_checked_mitigation")
    if kept is not None and len(kept[0]) == len(items) and all(
            k == j and (v is w or not isinstance(v, torch.Tensor) and not isinstance(w, torch.Tensor) and v == w)
            for (k, v), (j, w) in zip(kept[0], items)):
        return kept[1]
    out = normalize_spec(spec)
    mixer.__dict__["_checked_mitigation"] = (items, out)
    return out


def format_spec(spec: Mapping | None) -> str:
    """A spec back in its text form (non-neutral parts only); 'none' when neutral."""
    if spec is None:
        return "none"
    s = normalize_spec(spec)
    parts = []
    # 15 digits: ':g' kept 6, so c_alpha=0.9999999 (a 1M-token forget) was named c_alpha=1
    forget = [f"{k}={s[k]:.15g}" for k in ("c_alpha", "c_b", "c_dt") if s[k] != 1]
    if forget:
        parts.append("forget:" + ",".join(forget))
    if _has_cap(s):
        t = "per-head" if isinstance(s["threshold"], torch.Tensor) else f"{s['threshold']:.15g}"
        parts.append(f"norm:threshold={t},chunk={s['chunk']}")
    if s["window"] is not None:
        parts.append(f"window:r={s['window']}")
    return "+".join(parts) or "none"


# ---- heads and the norm cap ------------------------------------------------------------------------------------

def head_view(kind: str, state: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """A recurrent state as [batch, heads, elements per head].

    kind 'mamba': state [batch, d_inner, N], heads are groups of gcd(d_inner, group_size) channels;
    'mamba2': [batch, H, P, N]; 'gla': [batch, H, K, V].
    """
    if kind == "mamba":
        size = math.gcd(state.shape[1], group_size)
        return state.reshape(state.shape[0], state.shape[1] // size, size * state.shape[2])
    return state.flatten(2)


def cap_state(kind: str, state: torch.Tensor, threshold: float | torch.Tensor, group_size: int = 64, *,
              written_back: bool = True) -> torch.Tensor:
    """`state` with every head whose Frobenius norm exceeds `threshold` (float or [heads]) scaled down to it.

    written_back: whether the caller then overwrites `state` in place with the result, as the decoding steps do: the
    backward of the scaling reads the tensor it scaled, so under autograd an fp32 `state` is then copied first (any
    other dtype is, by its cast). False where `state` is never written in place afterwards (the parallel scans' cuts,
    which go on with the result as a new tensor): no copy, which kept one more state per cut alive until backward."""
    work = state.float()
    if written_back and work is state and state.requires_grad:
        work = state.clone()
    heads = head_view(kind, work, group_size)  # (b, heads, elements)
    if isinstance(threshold, torch.Tensor) and threshold.shape not in ((), (1,), (heads.shape[1],)):
        # (a shape check, no device sync; it failed with "The size of tensor a (3) must match the size of tensor b")
        raise ValueError(f"mitigation threshold: a per-head threshold of shape {tuple(threshold.shape)} for a {kind} "
                         f"layer of {heads.shape[1]} heads (group_size={group_size}); calibrate it on this model with "
                         f"the same group_size (zoo.state.calibrate_norm_threshold)")
    norm = heads.norm(dim=-1, keepdim=True)
    limit = threshold.to(norm)[:, None] if isinstance(threshold, torch.Tensor) else threshold
    factor = (limit / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
    return (heads * factor).view_as(state).to(state.dtype)


# ---- shared drivers --------------------------------------------------------------------------------------------

def _segments(length: int, spec: Mapping, dtype: torch.dtype, mask: torch.Tensor | None = None,
              seq_idx: torch.Tensor | None = None) -> list[tuple[int, int, bool | torch.Tensor]]:
    """(start, stop, cap_after) pieces of a parallel forward: cut every `chunk` tokens when capping and
    wherever the forget rescaling would leave the dtype's exponent range. With a mask [b, T] (0 = pad) the cap
    counts each row's tokens, a pad being no step (so a padded row is capped where the row alone is), and with
    seq_idx [b, T] it counts them from each packed document's start (so a document is capped where it is alone):
    cap_after is then the rows [b] capped at that cut (every row at the end)."""
    bounds = {0, length}
    caps: dict[int, bool | torch.Tensor] = {}
    if _has_cap(spec):
        caps = dict.fromkeys(range(spec["chunk"], length, spec["chunk"]), True)
        padded = mask is not None and not bool(mask.all())
        packed = seq_idx is not None and bool((seq_idx[:, 1:] != seq_idx[:, :-1]).any())
        if padded or packed:
            tokens = mask != 0 if padded else torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
            count = tokens.long().cumsum(1)  # (b, T): a row's tokens so far
            if packed:  # less those before the document's start
                starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)
                count = count - torch.where(starts, count - tokens.long(), 0).cummax(1).values
            hit = tokens & (count % spec["chunk"] == 0)  # (b, T): a row's chunk ends at this token
            hit[:, -1] = False  # (the end caps every row)
            caps = {int(t) + 1: hit[:, t] for t in hit.any(0).nonzero().flatten().tolist()}
        caps[length] = True
        bounds.update(caps)
    log_c = -math.log(spec["c_alpha"])
    if log_c > 0:
        step = max(1, int(_FORGET_EXPONENT.get(dtype, _FORGET_EXPONENT_DEFAULT) / log_c))
        bounds.update(range(step, length, step))
    edges = sorted(bounds)
    return [(a, b, caps.get(b, False)) for a, b in zip(edges[:-1], edges[1:])]


def _drive(kind: str, spec: Mapping, length: int, dtype: torch.dtype, initial_state, seq_idx,
           run: Callable, mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a scan piece by piece (forget segments, norm chunks), carrying and capping the state (mask [b, T], 0 =
    pad: see ``_segments``).

    run(start, stop, initial_state, rescale) -> (y, final) runs the kernel on [start, stop); rescale is None
    or the per-token factors c^{-(k_t - 1)} [1 or b, stop - start] to put on B (and their inverse on C), k_t the number
    of the row's tokens in [start, t] (t - start + 1 without pads: a pad is no step, so c_α does not decay it either);
    the first token's c_α is put on initial_state (of the rows with a token in the piece).
    Returns the pieces' outputs (the caller concatenates them on its time dim) and the final state.
    """
    if length == 0:  # no tokens: no step, so neither c_α nor the cap acts (the kernel's empty output, the state)
        y, state = run(0, 0, initial_state, None)
        return [y], state
    c = spec["c_alpha"]
    padded = mask is not None and c != 1 and not bool(mask.all())
    ys, state = [], initial_state
    for start, stop, cap in _segments(length, spec, dtype, mask, seq_idx):
        if state is not None and seq_idx is not None and start > 0:
            # a document starting exactly at the cut must not see the carried state
            same = (seq_idx[:, start] == seq_idx[:, start - 1]).to(state.dtype)
            state = state * same.view(-1, *([1] * (state.dim() - 1)))
        rescale = None
        if c != 1:
            if padded:  # (b, n): each row's tokens so far in the piece
                offsets = (mask[:, start:stop] != 0).to(torch.float64).cumsum(1).cpu()
            else:
                offsets = torch.arange(1, stop - start + 1, dtype=torch.float64)[None]
            # the first token's c_α goes on the carried state (h_s = a_s·(c·h_{s−1}) + b_s) and the others' on the
            # inputs, g_t = h_t / c^{k_t − 1}: a one-token piece needs no factor at all (c^{-k_t} overflowed fp16 for
            # c_α below e^-6 ≈ 0.0025, and fp32 below about 3e-39, and every output was NaN)
            if state is not None:  # (the rows with a token in the piece)
                first = c ** (offsets[:, -1] > 0).to(device=state.device, dtype=torch.float64)
                state = state * first.to(state.dtype).view(-1, *([1] * (state.dim() - 1)))
            offsets = (offsets - 1).clamp(min=0)
            rescale = torch.exp(-offsets * math.log(c)).float()  # c^{-(k_t - 1)}
        y, state = run(start, stop, state, rescale)
        if rescale is not None:
            steps = offsets[:, -1].to(device=state.device, dtype=torch.float64)  # (1 or b)
            state = state * (c ** steps).to(state.dtype).view(-1, *([1] * (state.dim() - 1)))
        # (the state is the kernel's or the rescaling's new tensor, which nothing overwrites in place)
        if cap is True:
            state = cap_state(kind, state, spec["threshold"], spec["group_size"], written_back=False)
        elif cap is not False:  # the rows whose chunk ends here
            capped = cap_state(kind, state, spec["threshold"], spec["group_size"], written_back=False)
            state = torch.where(cap.view(-1, *([1] * (state.dim() - 1))), capped, state)
        ys.append(y)
    return ys, state


def windowed_scan(log_decay: Callable, inputs: Callable, readout: Callable, length: int, window: int,
                  first: int = 0, initial: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed linear recurrence h_p^(r) = Σ_{j=p−r+1..p} (∏_{i=j+1..p} a_i) ⊙ b_j, exactly, in blocks of r.

    log_decay(start, stop) -> log a [b, n, ...] broadcastable to the state; inputs(start, stop) -> b
    [b, n, *state]; readout(h, start, stop) -> outputs of positions [start, stop) from their states
    h [b, n, *state]. Returns (the readouts of positions first .. length−1 concatenated on dim 1,
    h^(r) at length − 1). Without a position past `first` (no new token), the readouts are empty and the state is
    `initial` [b, *state] (the cache's, zeros without one): the r−1 carried tokens alone do not make h^(r).
    """
    if first == length:
        empty = inputs(length, length).float()  # (b, 0, *state)
        state = initial if initial is not None else empty.new_zeros(empty.shape[0], *empty.shape[2:])
        return readout(empty, length, length), state
    ys, prev, last = [], None, None
    for start in range(0, length, window):
        stop = min(length, start + window)
        la = log_decay(start, stop).float()
        b = inputs(start, stop).float()
        cum = la.cumsum(dim=1)  # Λ: in-block running sum of log-decays (exponents stay within one block)
        a = torch.exp(la)
        if torch.is_grad_enabled():  # the scan's backward wants a of b's shape; inference broadcasts it
            a = a.expand_as(b).contiguous()
        X = linear_scan(a, b)  # the scan restarted at the block start
        h = X
        if prev is not None:
            X_prev, cum_prev = prev
            n = stop - start
            # the previous block's tokens after offset o, decayed to its end, then to p
            tail = X_prev[:, -1:] - torch.exp(cum_prev[:, -1:] - cum_prev[:, :n]) * X_prev[:, :n]
            h = X + torch.exp(cum) * tail
        prev = (X, cum)
        last = h[:, -1]
        if stop > first:
            lo = max(start, first)
            ys.append(readout(h[:, lo - start:], lo, stop))
    return torch.cat(ys, dim=1), last


def _window_inputs(cache, window: int, new: tuple[torch.Tensor, ...], seq_idx, reads: tuple[torch.Tensor, ...] = (),
                   mask: torch.Tensor | None = None) -> tuple[tuple, int, tuple, Callable]:
    """The carried last r−1 tokens' scan inputs followed by this call's (time on dim 1), the carry length `first`,
    the readout's tensors `reads` (this call's, time on dim 1; position p's at p - first) and restore(y), which
    puts `windowed_scan`'s readouts back in this call's order; stores the new carry on the cache.

    With a mask [b, T] (0 = pad) the window counts a row's tokens, not its pads: each row is laid out as [its pads,
    the carry, its tokens] (a pad adds nothing and keeps the state, so in front it is no step of any window), the
    reads likewise (zeros at the carry), `first` is 0 and restore takes the readouts back to the row's order."""
    if seq_idx is not None:
        raise ValueError("mitigation window: packed sequences (seq_idx) are not supported; evaluate documents "
                         "one per row")
    carry = None
    if cache is not None:
        stored = getattr(cache, "window_carry", None) if cache.has_state else None  # a reset cache drops it
        if stored is not None:
            if stored[0] != window:
                raise ValueError(f"mitigation window: the cache was filled with r={stored[0]}, now r={window}; "
                                 f"start a new cache")
            carry = stored[1]
        elif cache.has_state:
            raise ValueError("mitigation window: the cache holds a state computed without the window; apply "
                             "the mitigation before the first forward")
    ext = new if carry is None else tuple(torch.cat([c, n], dim=1) for c, n in zip(carry, new))
    first = 0 if carry is None else carry[0].shape[1]
    restore = _identity
    if mask is not None and not bool(mask.all()):
        tokens = torch.cat([mask.new_ones(mask.shape[0], first), mask], dim=1) != 0  # (b, first + T)
        order = torch.argsort(tokens.to(torch.int8), dim=1, stable=True)  # the pads, then carry and tokens in order
        ext = tuple(_gather_time(t, order) for t in ext)
        reads = tuple(_gather_time(torch.cat([t.new_zeros(t.shape[0], first, *t.shape[2:]), t], dim=1), order)
                      for t in reads)
        inverse, skip = torch.argsort(order, dim=1), first
        restore = lambda y: _gather_time(y, inverse)[:, skip:]  # noqa: E731
        first = 0
    if cache is not None:
        cache.window_carry = (window, tuple(t[:, t.shape[1] - min(window - 1, t.shape[1]):] for t in ext))
    return ext, first, reads, restore


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _keep_idle_rows(final: torch.Tensor, initial: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The windowed state `final` [b, ...] with each row that had no token in the call (all pads: no step) back at
    `initial`, its state before the call: the scan over its r−1 carried tokens alone gave h^(r−1), which was stored
    as the row's state (the outputs read the carry, not the state, so only the state went wrong)."""
    if mask is None or initial is None:
        return final
    active = (mask != 0).any(1)  # (b); no host read of it: a decode step may be captured in a CUDA graph
    return torch.where(active.view(-1, *([1] * (final.dim() - 1))), final, initial.to(final))


def _gather_time(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [b, L, ...] reordered on its time dim by index [b, L]."""
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))


def _time_last_rescale(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (t.float() * factor.to(t.device)).to(t.dtype)


# ---- mamba (Mamba-1) -------------------------------------------------------------------------------------------

def _mamba_effective(mixer, delta, B, spec) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """(delta, softplus flag, B) with c_dt and c_b applied; untouched when neutral (bit-identical path)."""
    softplus = True
    if spec["c_dt"] != 1:
        delta = (F.softplus(delta.float()) * spec["c_dt"]).to(delta.dtype)
        softplus = False
    if spec["c_b"] != 1:
        B = (B.float() * spec["c_b"]).to(B.dtype)
    return delta, softplus, B


def _probe(mixer, **tensors) -> None:
    if mixer.state_probe is not None:
        mixer.state_probe(mixer, **tensors)


def mamba_scan(mixer, u, delta, A, B, C, z, initial_state, seq_idx, cache, backend: str, mask=None):
    """Mamba's selective scan with the mixer's mitigation (and state probe).

    Same tensors as the mixer's ``selective_scan`` call: u, delta (before softplus, dt bias included), z
    [b, D, T]; A [D, N]; B, C [b, N, T] or [b, G, N, T]; mask [b, T] (0 = pad) or None. Returns y [b, D, T]
    (and the final state [b, D, N] when `cache` is given), like ``selective_scan(..., return_final_state=cache is not
    None)``.
    """
    spec = _spec(mixer)
    want_final = cache is not None
    delta, softplus, B = _mamba_effective(mixer, delta, B, spec)
    D = mixer.D.float()
    grouped_B = B if B.dim() == 4 else B[:, None]  # (b, G, N, T)
    if mixer.state_probe is not None:
        dt = F.softplus(delta.float()) if softplus else delta.float()
        _probe(mixer, delta=dt.transpose(1, 2), A=A, log_c=math.log(spec["c_alpha"]),
               B=grouped_B.permute(0, 3, 1, 2), mask=mask)
    if spec["window"] is not None:
        dt = F.softplus(delta.float()) if softplus else delta.float()
        y, final = _mamba_window(mixer, spec, u, dt, A, grouped_B, C if C.dim() == 4 else C[:, None], z, D,
                                 seq_idx, cache, mask, initial_state)
        return (y, final) if want_final else y
    if spec["c_alpha"] == 1 and not _has_cap(spec):
        return selective_scan(u, delta, A, B, C, D, z, None, softplus, initial_state, seq_idx, want_final,
                              backend=backend)

    def run(start, stop, state, rescale):
        Bs, Cs = B[..., start:stop], C[..., start:stop]
        if rescale is not None:  # (1 or b, n) -> (1 or b, 1, [1,] n)
            factor = rescale.view(rescale.shape[0], *([1] * (Bs.dim() - 2)), rescale.shape[1])
            Bs, Cs = _time_last_rescale(Bs, factor), _time_last_rescale(Cs, 1 / factor)
        return selective_scan(u[..., start:stop], delta[..., start:stop], A, Bs, Cs, D,
                              None if z is None else z[..., start:stop], None, softplus, state,
                              None if seq_idx is None else seq_idx[:, start:stop], True, backend=backend)

    ys, final = _drive("mamba", spec, u.shape[-1], B.dtype, initial_state, seq_idx, run, mask)
    y = torch.cat(ys, dim=-1)
    return (y, final) if want_final else y


def _mamba_window(mixer, spec, u, dt, A, B, C, z, D, seq_idx, cache, mask=None, initial=None):
    """Windowed Mamba scan: u, dt (Δ), z [b, D, T]; B, C [b, G, N, T]; mask [b, T] or None; initial [b, D, N] (the
    cached state, kept at T = 0) or None. Returns y [b, D, T], h^(r) [b, D, N]."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    log_c = math.log(spec["c_alpha"])
    new = (dt.transpose(1, 2), u.float().transpose(1, 2), B.float().permute(0, 3, 1, 2))  # (b,T,D),(b,T,G,N)
    (dt_e, u_e, B_e), first, (C_t,), restore = _window_inputs(
        cache, spec["window"], new, seq_idx, (C.float().permute(0, 3, 1, 2),), mask)  # C_t (b, T, G, N)
    A32 = A.float()

    def per_channel(t):  # (b, n, G, N) -> (b, n, D, N): channel d reads group d // (D // G)
        return t.repeat_interleave(dim // groups, dim=2)

    y, final = windowed_scan(
        lambda s, e: dt_e[:, s:e, :, None] * A32 + log_c,
        lambda s, e: (dt_e[:, s:e] * u_e[:, s:e])[..., None] * per_channel(B_e[:, s:e]),
        lambda h, s, e: (h * per_channel(C_t[:, s - first:e - first])).sum(-1),
        dt_e.shape[1], spec["window"], first, initial)
    y = restore(y).transpose(1, 2) + D[:, None] * u.float()  # (b, D, T)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), _keep_idle_rows(final, initial, mask)


def mamba_step(mixer, state, u, delta, A, B, C, z, cache, backend: str, tokens=None):
    """One decoding step of Mamba with the mitigation; updates `state` [b, D, N] in place, returns y [b, D].

    Same tensors as the mixer's ``selective_state_update`` call: u, delta (before softplus), z [b, D];
    B, C [b, N]. tokens [b] (bool) or None: a row whose position is a pad (False; its u is 0, its delta PAD_DT) is
    no step: neither c_α nor the cap touches its state, and the window does not count it.
    """
    spec = _spec(mixer)
    delta, softplus, B = _mamba_effective(mixer, delta, B, spec)
    if mixer.state_probe is not None:
        dt = F.softplus(delta.float()) if softplus else delta.float()
        _probe(mixer, delta=dt[:, None], A=A, log_c=math.log(spec["c_alpha"]),
               B=(B if B.dim() == 3 else B[:, None])[:, None], mask=_step_mask(tokens))
    if spec["window"] is not None:
        dt = F.softplus(delta.float()) if softplus else delta.float()
        Bg = (B if B.dim() == 3 else B[:, None])[..., None]  # (b, G, N, 1)
        Cg = (C if C.dim() == 3 else C[:, None])[..., None]
        y, final = _mamba_window(mixer, spec, u[..., None], dt[..., None], A, Bg, Cg,
                                 None if z is None else z[..., None], mixer.D.float(), None, cache,
                                 _step_mask(tokens), state)
        state.copy_(final)
        return y[..., 0]
    saved = state.clone() if tokens is not None and (spec["c_alpha"] != 1 or _has_cap(spec)) else None
    if spec["c_alpha"] != 1:
        state.mul_(spec["c_alpha"])
    y = selective_state_update(state, u, delta, A, B, C, mixer.D.float(), z, None, softplus, backend=backend)
    if _has_cap(spec):
        state.copy_(cap_state("mamba", state, spec["threshold"], spec["group_size"]))
    if saved is not None:
        keep_rows_(state, saved, tokens)
    return y


# ---- mamba2 ----------------------------------------------------------------------------------------------------

def _mamba2_effective(mixer, dt, spec) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(dt, dt_bias, softplus flag) with c_dt applied; the mixer's own arguments when c_dt = 1."""
    if spec["c_dt"] == 1:
        return dt, mixer.dt_bias.float(), True
    return F.softplus(dt.float() + mixer.dt_bias.float()) * spec["c_dt"], None, False


def _mamba2_delta(dt, dt_bias, softplus) -> torch.Tensor:
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias
    return F.softplus(dt) if softplus else dt


def mamba2_scan(mixer, x, dt, A, B, C, initial_state, seq_idx, cache, backend: str, mask=None):
    """Mamba-2's SSD scan with the mixer's mitigation (and state probe).

    Same tensors as the mixer's ``ssd_chunk_scan`` call: x [b, T, H, P]; dt [b, T, H] (before bias and
    softplus); A [H]; B, C [b, T, G, N]; mask [b, T] (0 = pad) or None. Returns y [b, T, H, P] (and the final
    state [b, H, P, N] when `cache` is given).
    """
    spec = _spec(mixer)
    want_final = cache is not None
    dt, dt_bias, softplus = _mamba2_effective(mixer, dt, spec)
    if spec["c_b"] != 1:
        B = (B.float() * spec["c_b"]).to(B.dtype)
    D = mixer.D.float()
    if mixer.state_probe is not None:
        _probe(mixer, delta=_mamba2_delta(dt, dt_bias, softplus), A=A, log_c=math.log(spec["c_alpha"]), B=B,
               mask=mask)
    if spec["window"] is not None:
        y, final = _mamba2_window(mixer, spec, x, _mamba2_delta(dt, dt_bias, softplus), A, B, C, D, seq_idx, cache,
                                  mask, initial_state)
        return (y, final) if want_final else y
    if spec["c_alpha"] == 1 and not _has_cap(spec):
        return ssd_chunk_scan(x, dt, A, B, C, mixer.chunk_size, D, None, dt_bias, softplus, initial_state, seq_idx,
                              want_final, backend=backend)

    def run(start, stop, state, rescale):
        Bs, Cs = B[:, start:stop], C[:, start:stop]
        if rescale is not None:  # (1 or b, n) -> (1 or b, n, 1, 1)
            Bs = _time_last_rescale(Bs, rescale[:, :, None, None])
            Cs = _time_last_rescale(Cs, (1 / rescale)[:, :, None, None])
        return ssd_chunk_scan(x[:, start:stop], dt[:, start:stop], A, Bs, Cs, mixer.chunk_size, D, None, dt_bias,
                              softplus, state, None if seq_idx is None else seq_idx[:, start:stop], True,
                              backend=backend)

    ys, final = _drive("mamba2", spec, x.shape[1], B.dtype, initial_state, seq_idx, run, mask)
    y = torch.cat(ys, dim=1)
    return (y, final) if want_final else y


def _mamba2_window(mixer, spec, x, delta, A, B, C, D, seq_idx, cache, mask=None, initial=None):
    """Windowed Mamba-2 scan: x [b, T, H, P]; delta (Δ) [b, T, H]; B, C [b, T, G, N]; mask [b, T] or None; initial
    [b, H, P, N] (the cached state, kept at T = 0) or None."""
    n_heads = x.shape[2]
    per_group = n_heads // B.shape[2]
    log_c = math.log(spec["c_alpha"])
    (dt_e, x_e, B_e), first, (C32,), restore = _window_inputs(
        cache, spec["window"], (delta.float(), x.float(), B.float()), seq_idx, (C.float(),), mask)
    A32 = A.float()

    def per_head(t):  # (b, n, G, N) -> (b, n, H, N)
        return t.repeat_interleave(per_group, dim=2)

    y, final = windowed_scan(
        lambda s, e: (dt_e[:, s:e] * A32 + log_c)[..., None, None],
        lambda s, e: (dt_e[:, s:e, :, None] * x_e[:, s:e])[..., None] * per_head(B_e[:, s:e])[:, :, :, None],
        lambda h, s, e: torch.einsum("bthpn,bthn->bthp", h, per_head(C32[:, s - first:e - first])),
        dt_e.shape[1], spec["window"], first, initial)
    y = restore(y) + x.float() * (D[:, None] if D.dim() == 1 else D)
    return y.to(x.dtype), _keep_idle_rows(final, initial, mask)


def mamba2_step(mixer, state, x, dt, A, B, C, cache, backend: str, tokens=None):
    """One decoding step of Mamba-2 with the mitigation; updates `state` [b, H, P, N], returns y [b, H, P].

    Same tensors as the mixer's ``ssd_state_update`` call: x [b, H, P]; dt [b, H]; B, C [b, G, N]. tokens as in
    `mamba_step` (a pad's x, B, C are 0, its dt PAD_DT).
    """
    spec = _spec(mixer)
    dt, dt_bias, softplus = _mamba2_effective(mixer, dt, spec)
    if spec["c_b"] != 1:
        B = (B.float() * spec["c_b"]).to(B.dtype)
    if mixer.state_probe is not None:
        _probe(mixer, delta=_mamba2_delta(dt, dt_bias, softplus)[:, None], A=A, log_c=math.log(spec["c_alpha"]),
               B=B[:, None], mask=_step_mask(tokens))
    if spec["window"] is not None:
        y, final = _mamba2_window(mixer, spec, x[:, None], _mamba2_delta(dt, dt_bias, softplus)[:, None], A,
                                  B[:, None], C[:, None], mixer.D.float(), None, cache, _step_mask(tokens), state)
        state.copy_(final)
        return y[:, 0]
    saved = state.clone() if tokens is not None and (spec["c_alpha"] != 1 or _has_cap(spec)) else None
    # a low-precision state (decode_state_dtype "model") takes c_α (and the cap) in fp32 with the step's own decay and
    # is rounded once, as the unmitigated step rounds it: c_α > ~0.996 multiplied in bf16 on its own rounds it back
    work = state if state.dtype == torch.float32 else state.float()
    if spec["c_alpha"] != 1:
        work.mul_(spec["c_alpha"])
    y = ssd_state_update(work, x, dt, A, B, C, mixer.D.float(), None, dt_bias, softplus, backend=backend)
    if _has_cap(spec):
        work.copy_(cap_state("mamba2", work, spec["threshold"], spec["group_size"]))
    if work is not state:
        state.copy_(work)
    if saved is not None:
        keep_rows_(state, saved, tokens)
    return y


# ---- gla -------------------------------------------------------------------------------------------------------

def _gla_effective(k, g, spec, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, g) with c_b on the keys and c_dt, log c_α on the log decay; untouched when neutral. mask [b, T] (0 = pad)
    or None: a pad keeps its log decay of 0 (no step, so c_α does not decay it either)."""
    if spec["c_b"] != 1:
        k = (k.float() * spec["c_b"]).to(k.dtype)
    if spec["c_dt"] != 1 or spec["c_alpha"] != 1:
        log_c = math.log(spec["c_alpha"])
        if mask is not None:
            log_c = log_c * (mask != 0).float()[:, -g.shape[1]:, None, None]
        g = g.float() * spec["c_dt"] + log_c
    return k, g


def gla_scan(mixer, q, k, v, g, scale, initial_state, seq_idx, cache, backend: str, mask=None):
    """GLA's chunk scan with the mixer's mitigation (and state probe).

    Same tensors as the mixer's ``chunk_gla`` call: q, k, g [b, T, H, K] (g the log decay); v [b, T, H, V]; mask
    [b, T] (0 = pad) or None.
    Returns o [b, T, H, V] (and the final state [b, H, K, V] when `cache` is given).
    """
    spec = _spec(mixer)
    want_final = cache is not None
    k, g = _gla_effective(k, g, spec, mask)
    _probe(mixer, log_decay=g.float(), B=k, mask=mask)
    if spec["window"] is not None:
        o, final = _gla_window(spec, q, k, v, g, scale, seq_idx, cache, mask, initial_state)
        return (o, final) if want_final else o
    if not _has_cap(spec):
        return chunk_gla(q, k, v, g, scale, initial_state, seq_idx, want_final, mixer.chunk_size, backend=backend)

    def run(start, stop, state, rescale):
        return chunk_gla(q[:, start:stop], k[:, start:stop], v[:, start:stop], g[:, start:stop], scale, state,
                         None if seq_idx is None else seq_idx[:, start:stop], True, mixer.chunk_size, backend=backend)

    ys, final = _drive("gla", {**spec, "c_alpha": 1.0}, q.shape[1], k.dtype, initial_state, seq_idx, run, mask)
    o = torch.cat(ys, dim=1)
    return (o, final) if want_final else o


def _gla_window(spec, q, k, v, g, scale, seq_idx, cache, mask=None, initial=None):
    """Windowed GLA: q, k, g [b, T, H, K]; v [b, T, H, V]; mask [b, T] or None; initial [b, H, K, V] (the cached
    state, kept at T = 0) or None. Returns o [b, T, H, V], h^(r) [b, H, K, V]."""
    q32 = q.float() * (scale if scale is not None else q.shape[-1] ** -0.5)
    (g_e, k_e, v_e), first, (q32,), restore = _window_inputs(
        cache, spec["window"], (g.float(), k.float(), v.float()), seq_idx, (q32,), mask)
    o, final = windowed_scan(
        lambda s, e: g_e[:, s:e, :, :, None],
        lambda s, e: k_e[:, s:e, :, :, None] * v_e[:, s:e, :, None, :],
        lambda h, s, e: torch.einsum("bthk,bthkv->bthv", q32[:, s - first:e - first], h),
        g_e.shape[1], spec["window"], first, initial)
    return restore(o).to(q.dtype), _keep_idle_rows(final, initial, mask)


def gla_step(mixer, state, q, k, v, g, scale, cache, tokens=None):
    """One decoding step of GLA with the mitigation; updates `state` [b, H, K, V], returns o [b, H, V]. tokens
    as in `mamba_step` (a pad's k and log decay are 0)."""
    spec = _spec(mixer)
    mask = _step_mask(tokens)
    k, g = (t[:, 0] for t in _gla_effective(k[:, None], g[:, None], spec, mask))
    _probe(mixer, log_decay=g.float()[:, None], B=k[:, None], mask=mask)
    if spec["window"] is not None:
        o, final = _gla_window(spec, q[:, None], k[:, None], v[:, None], g[:, None], scale, None, cache, mask, state)
        state.copy_(final)
        return o[:, 0]
    saved = state.clone() if tokens is not None and _has_cap(spec) else None
    o = gla_state_update(state, q, k, v, g, scale)
    if _has_cap(spec):
        state.copy_(cap_state("gla", state, spec["threshold"], spec["group_size"]))
    if saved is not None:
        keep_rows_(state, saved, tokens)
    return o


def _step_mask(tokens: torch.Tensor | None) -> torch.Tensor | None:
    """A one-token step's tokens [b] (bool) as the scans' mask [b, 1] (0 = pad), or None."""
    return None if tokens is None else tokens[:, None].long()


# ---- applying to a model ---------------------------------------------------------------------------------------

def recurrent_mixers(model) -> list:
    """The mixers of `model` (a zoo model, or any module) that take a mitigation, in layer order."""
    return [m for m in model.modules() if hasattr(type(m), "mitigation") and hasattr(type(m), "state_probe")]


def recurrent_kinds(model) -> set[str]:
    """The kinds ('mamba', 'mamba2', 'gla') of `model`'s recurrent mixers."""
    from zoo.state.recorder import mixer_kind

    return {mixer_kind(m) for m in recurrent_mixers(model)}


def names_group_size(text: str) -> bool:
    """Whether the mitigation spec text sets group_size (the heads a cap groups Mamba channels into)."""
    return re.search(r"\bgroup_size\s*=", text) is not None


def apply_mitigation(model, spec: str | Mapping | None) -> list[int]:
    """Set the mitigation `spec` (text or dict; None / 'none' clears it) on every recurrent mixer of `model`.

    Returns the layer indices it was set on. Attention layers have no state and are left alone.
    """
    parsed = parse_mitigation(spec) if isinstance(spec, str) else normalize_spec(spec)
    if isinstance(spec, str) and parsed is not None and names_group_size(spec):
        kinds = sorted(recurrent_kinds(model))
        if kinds and "mamba" not in kinds:  # (it was taken and ignored: the cap acted on the layers' own heads)
            raise ValueError(f"mitigation {spec!r}: group_size groups the channels of mamba layers into the heads the "
                             f"cap acts on, but the model has none (its {' and '.join(kinds)} layers' heads are their "
                             f"own); leave group_size out")
    layers = []
    for mixer in recurrent_mixers(model):
        mixer.mitigation = None if parsed is None else dict(parsed)
        layers.append(getattr(mixer, "layer_idx", len(layers)))
    if parsed is not None and not layers:
        raise ValueError(f"mitigation {format_spec(parsed)!r} (--mitigation): {no_zoo_mixer(model)}")
    return layers


# transformers models whose own recurrent layers the state tools cannot reach, and what brings them into the zoo
_CONVERTIBLE = {"mamba": "hf-mamba", "mamba2": "hf-mamba2", "jamba": "hf-jamba"}


def no_zoo_mixer(model) -> str:
    """Why `model` has nothing for the state tools (they act on zoo's mamba, mamba2 and gla mixers) and what to do."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _CONVERTIBLE:
        return (f"{name} is transformers' {model_type} model, whose recurrent layers are not zoo mixers (which the "
                f"state tools act on); convert it first with zoo convert SRC DST --from {_CONVERTIBLE[model_type]} "
                f"(same logits) and pass DST")
    if model_type not in (None, "zoo"):
        return (f"{name} is not a zoo model ({model_type}); the state tools act on zoo's mamba, mamba2 and gla "
                f"mixers (zoo convert brings transformers Mamba, Mamba-2 and Jamba checkpoints into the zoo)")
    return (f"{name} has no recurrent layer (zoo mamba, mamba2 or gla mixer); use a zoo model with one (a hybrid "
            f"is fine)")


def add_mitigation_argument(parser) -> None:
    """Add ``--mitigation SPEC`` to an argparse parser (eval commands)."""
    parser.add_argument("--mitigation", default=None,
                        help="training-free state-collapse mitigation: forget:c_alpha=0.999,c_b=0.7[,c_dt=0.2] | "
                             "norm:threshold=10[,chunk=64] | window:r=512 | several joined by '+' | none")


__all__ = [
    "DEFAULTS",
    "add_mitigation_argument",
    "apply_mitigation",
    "cap_state",
    "format_spec",
    "gla_scan",
    "gla_step",
    "head_view",
    "is_neutral",
    "mamba2_scan",
    "mamba2_step",
    "mamba_scan",
    "mamba_step",
    "names_group_size",
    "no_zoo_mixer",
    "normalize_spec",
    "parse_mitigation",
    "recurrent_kinds",
    "recurrent_mixers",
    "splits_matter",
    "windowed_scan",
]
