"""State statistics over position: the Stuffed Mamba diagnosis of state collapse.

``record_state_statistics(model, input_ids)`` runs a zoo model over long rows in chunks, carrying its cache
(constant memory for recurrent models), and records per recurrent layer and head:

- the state: mean, variance, RMS and Frobenius norm of each head's elements (mamba: groups of
  ``group_size`` channels of the [d_inner, N] state; mamba2: heads of [H, P, N]; gla: heads of [H, K, V]),
  read from the cache's ``RecurrentLayer`` after every chunk;
- the decay: mean Δ (mamba, mamba2), mean log α and mean α = exp(ΔA) (gla: exp(g)) over the chunk's
  tokens and the head's channels, and the cumulative log ∏α (the running sum of the mean log-decay)
  at the chunk end; B statistics (mean and RMS per B group; gla: the keys per head) over the chunk;
  all as the mixer actually used them (mitigations included), read through the mixers' ``state_probe``;
- the mean next-token loss of the chunk's tokens.

Resolution: the state is sampled at chunk ends only; Δ / α / B are exact means over each chunk. Chunk
ends are log-spaced below ``chunk_size`` (``points_per_octave``) and every ``chunk_size`` tokens above,
so a log-position plot has even detail. All statistics are averaged over the batch rows.
``plot_state_statistics`` draws one PNG per statistic (a panel per layer, a line per head) with the
training length marked.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.cache import RecurrentLayer, output_cache
from zoo.layers import last_columns
from zoo.state.mitigation import format_spec, head_view, no_zoo_mixer, recurrent_mixers

STATE_STATS = ("state_mean", "state_var", "state_rms", "state_norm")
DECAY_STATS = ("delta_mean", "log_alpha_mean", "alpha_mean", "log_alpha_cumsum")
B_STATS = ("B_mean", "B_rms")
# a run's progress is saved at least this many times as long as its last save took apart (a hybrid's attention cache
# grows with the rows: saves would otherwise take over a long run)
SAVE_COST_FACTOR = 10


def mixer_kind(mixer) -> str:
    """'mamba', 'mamba2' or 'gla' for a recurrent zoo mixer."""
    from zoo.mixers.gla import GLA
    from zoo.mixers.mamba import Mamba
    from zoo.mixers.mamba2 import Mamba2

    for cls, kind in ((Mamba2, "mamba2"), (Mamba, "mamba"), (GLA, "gla")):
        if isinstance(mixer, cls):
            return kind
    raise TypeError(f"{type(mixer).__name__} is not a recurrent zoo mixer")


def check_recurrent(model, what: str) -> None:
    """Refuse a model without a recurrent zoo mixer: it has no state, and the statistics would be the loss alone."""
    if not recurrent_mixers(model):
        raise ValueError(f"{what}: {no_zoo_mixer(model)}; so no state to record (zoo eval length gives the "
                         f"per-position loss of any model)")


def chunk_ends(length: int, chunk_size: int, points_per_octave: int = 2, min_chunk: int = 16) -> list[int]:
    """Positions after which the state is sampled: log-spaced up to chunk_size, then every chunk_size."""
    ends = set(range(chunk_size, length, chunk_size)) | {length}
    if points_per_octave > 0:
        k = math.ceil(math.log2(min_chunk) * points_per_octave)
        while (end := round(2 ** (k / points_per_octave))) < min(chunk_size, length):
            ends.add(end)
            k += 1
    return sorted(e for e in ends if 0 < e <= length)


class StateRecorder:
    """Installs a probe on every recurrent mixer of `model` (a context manager) and accumulates the Δ,
    decay and B statistics of the tokens it sees until ``take`` returns and resets them."""

    def __init__(self, model, group_size: int = 64):
        self.model, self.group_size = model, group_size
        self.mixers = recurrent_mixers(model)
        self.kinds = {m.layer_idx: mixer_kind(m) for m in self.mixers}
        self._sums: dict[int, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> StateRecorder:
        for mixer in self.mixers:
            mixer.state_probe = self._probe
        return self

    def __exit__(self, *exc) -> None:
        for mixer in self.mixers:
            mixer.state_probe = None

    def _add(self, layer: int, name: str, value: torch.Tensor) -> None:
        sums = self._sums.setdefault(layer, {})
        value = value.detach().double().cpu()
        sums[name] = sums[name] + value if name in sums else value

    @torch.no_grad()
    def _probe(self, mixer, delta=None, A=None, log_c: float = 0.0, B=None, log_decay=None, mask=None) -> None:
        """delta [b, T, D or H]; A [D, N] or [H]; B [b, T, G, N] (gla: keys [b, T, H, K]); log_decay [b, T, H, K];
        mask [b, >= T] (0 = pad; its last T columns are these positions) or None: a pad is no position (a one-token
        step of a pad is no step), as zoo.layers.step_pad_rows treats it."""
        layer, kind = mixer.layer_idx, self.kinds[mixer.layer_idx]
        length = (delta if delta is not None else log_decay).shape[1]
        w = None if mask is None else (last_columns(mask, length) != 0).to(torch.float32)  # (b, T)
        if w is not None and bool(w.all()):
            w = None

        def total(x: torch.Tensor) -> torch.Tensor:  # Σ over (b, T) of x [b, T, ...], pads left out
            return (x if w is None else x * w.view(*w.shape, *([1] * (x.dim() - 2)))).sum((0, 1))

        if kind == "mamba":
            batch, length, dim = delta.shape
            size = math.gcd(dim, self.group_size)
            grouped = delta.float().view(batch, length, dim // size, size)  # (b, T, heads, channels)
            A32 = A.float().view(dim // size, size, -1)  # (heads, channels, N)
            la = torch.einsum("bthc,hc->bth", grouped, A32.mean(-1)) / size + log_c  # mean over channels and N
            alpha = torch.zeros_like(la)
            for s in range(0, length, 256):  # exp per (channel, n), a slice of tokens at a time
                alpha[:, s:s + 256] = torch.exp(grouped[:, s:s + 256, :, :, None] * A32 + log_c).mean((-1, -2))
            self._add(layer, "delta", total(grouped.mean(-1)))
        elif kind == "mamba2":
            batch, length = delta.shape[:2]
            la = delta.float() * A.float() + log_c  # (b, T, H)
            alpha = torch.exp(la)
            self._add(layer, "delta", total(delta.float()))
        else:
            batch, length = log_decay.shape[:2]
            la = log_decay.float().mean(-1)  # (b, T, H)
            alpha = torch.exp(log_decay.float()).mean(-1)
        self._add(layer, "log_alpha", total(la))
        self._add(layer, "alpha", total(alpha))
        self._add(layer, "tokens", torch.tensor(float(batch * length) if w is None else float(w.sum())))
        self._add(layer, "rows", torch.tensor(float(batch)))
        self._add(layer, "calls", torch.tensor(1.0))
        B32 = B.float()
        self._add(layer, "B", total(B32.mean(-1)))
        self._add(layer, "B_sq", total(B32.pow(2).mean(-1)))

    def take(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer: delta_mean, log_alpha_mean, alpha_mean [heads], log_alpha_sum [heads] (Σ over the tokens,
        mean over rows), B_mean, B_rms [B groups], over the tokens since the last call; then resets."""
        out = {}
        for layer, s in self._sums.items():
            tokens, batch = s["tokens"], s["rows"] / s["calls"]
            stats = {"log_alpha_mean": s["log_alpha"] / tokens, "alpha_mean": s["alpha"] / tokens,
                     "log_alpha_sum": s["log_alpha"] / batch,
                     "B_mean": s["B"] / tokens, "B_rms": (s["B_sq"] / tokens).sqrt()}
            if "delta" in s:
                stats["delta_mean"] = s["delta"] / tokens
            out[layer] = stats
        self._sums = {}
        return out


def state_statistics(kind: str, state: torch.Tensor, group_size: int = 64) -> dict[str, torch.Tensor]:
    """Per head (batch-averaged) mean, var, rms and Frobenius norm of a recurrent state (see ``head_view``)."""
    heads = head_view(kind, state.detach().double(), group_size)  # (b, heads, elements)
    return {"state_mean": heads.mean(-1).mean(0), "state_var": heads.var(-1, unbiased=False).mean(0),
            "state_rms": heads.pow(2).mean(-1).sqrt().mean(0), "state_norm": heads.norm(dim=-1).mean(0)}


@torch.no_grad()
def record_state_statistics(model, input_ids: torch.Tensor, chunk_size: int = 1024, points_per_octave: int = 2,
                            min_chunk: int = 16, group_size: int = 64, train_length: int | None = None,
                            progress: bool = False, partial: str | Path | None = None, partial_key: dict | None = None,
                            save_every: float = 30.0, label: str = "state statistics",
                            keep_partial: bool = False) -> dict:
    """State, decay and loss statistics of `model` over the positions of `input_ids` [B, T] (see module doc).

    `partial`: a file where the run so far (its statistics and the model's cache) is saved, atomically, after a
    forward, at most every `save_every` seconds (and at least 10 times as long as a save took: a hybrid's attention
    cache grows with the rows), so an interrupted run resumes there: a call with the same `partial_key` (the caller's
    settings: which model), rows, sizes, device and mitigation starts at the next chunk and gives the result an
    uninterrupted run gives; a file of other settings is replaced. Removed when the run completes, unless
    `keep_partial`: then saved complete, so that a rerun returns its result without a forward (`zoo eval state
    --compare` keeps its unmitigated run so while the mitigated one runs, and removes it after). `label` names the
    run in the messages about it.

    Returns a dict: positions (tokens seen at each sample), loss [n] (mean NLL of each chunk's tokens),
    layers {layer: {kind, heads, <stat>: [n][heads or B groups]}} with the stats STATE_STATS + DECAY_STATS
    + B_STATS (delta_mean absent for gla), plus chunk_size, train_length and the mitigation in effect.
    """
    check_recurrent(model, "record_state_statistics")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch, length = input_ids.shape
    ends = chunk_ends(length, chunk_size, points_per_octave, min_chunk)
    recorder = StateRecorder(model, group_size)
    was_training = model.training
    model.eval()
    series: dict[int, dict[str, list]] = {}
    cumsum: dict[int, torch.Tensor] = {}
    losses, cache, previous_logit, start, done = [], None, None, 0, 0
    if partial is not None:
        from zoo.cache import ZooCache
        from zoo.eval.common import read_partial, save_atomically, tokens_digest

        settings = json.loads(json.dumps({
            "key": dict(partial_key or {}), "rows": tokens_digest(input_ids), "shape": [batch, length],
            "chunk_size": chunk_size, "points_per_octave": points_per_octave, "min_chunk": min_chunk,
            "group_size": group_size, "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "mitigation": [{k: v.tolist() if isinstance(v, torch.Tensor) else v
                            for k, v in (m.mitigation or {}).items()} for m in recorder.mixers]}))
        fresh = ZooCache.for_model(model, batch)  # its classes are the ones the saved cache may hold
        # onto the model's device: a run saved on a GPU (its settings name the device) read on a machine without one
        # failed to load, and was said to be "not a readable partial run (RuntimeError)" rather than of another device
        saved = read_partial(partial, settings, label, [type(fresh), *{type(layer) for layer in fresh.layers}],
                             map_location=device)
        if saved is not None:
            done, cache, previous_logit = saved["chunks"], saved["cache"], saved["previous_logit"]
            losses, series, cumsum = saved["losses"], saved["series"], saved["cumsum"]
            start = ends[done - 1]
            print(f"resuming {label} from token {start} of {length} ({partial})" if done < len(ends) else
                  f"{label}: every chunk is done in {partial}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=length, desc="state statistics", unit="tok", dynamic_ncols=True, initial=start)
    last_save, wait = time.monotonic(), save_every
    from zoo.decode import _dict_output

    output = _dict_output(model)  # an output object also where the config's return_dict is False (a tuple: no .logits)
    # the bar closed on the way out, an interruption's too: left open, it was drawn again below the 'interrupted' line
    with recorder, contextlib.closing(bar) if bar is not None else contextlib.nullcontext():
        for n, end in enumerate(ends[done:], done + 1):
            chunk = input_ids[:, start:end]
            out = model(input_ids=chunk, past_key_values=cache, use_cache=True, **output)
            cache = output_cache(out)
            logits = out.logits.float()
            pieces = [logits[:, :-1]] if previous_logit is None else [previous_logit, logits[:, :-1]]
            targets = chunk[:, 1:] if previous_logit is None else chunk
            scores = torch.cat(pieces, dim=1)
            losses.append(F.cross_entropy(scores.flatten(0, 1), targets.flatten()).item() if targets.numel() else
                          float("nan"))
            previous_logit = logits[:, -1:]
            decay = recorder.take()
            for i, layer_cache in enumerate(cache.layers):
                if not (isinstance(layer_cache, RecurrentLayer) and layer_cache.has_state):
                    continue
                kind = recorder.kinds[i]
                if kind == "mamba" and i not in series:  # heads are groups of gcd(d_inner, group_size) channels
                    dim = layer_cache.recurrent_state.shape[1]
                    series[i] = {"kind": kind, "channels_per_head": math.gcd(dim, group_size)}
                    if dim % group_size:
                        warnings.warn(f"group_size={group_size} does not divide layer {i}'s d_inner={dim}: its heads "
                                      f"are groups of {math.gcd(dim, group_size)} channels", stacklevel=2)
                row = state_statistics(kind, layer_cache.recurrent_state, group_size)
                d = decay.get(i, {})
                if d:
                    cumsum[i] = cumsum.get(i, torch.zeros_like(d["log_alpha_sum"])) + d["log_alpha_sum"]
                    row.update({k: v for k, v in d.items() if k != "log_alpha_sum"})
                    row["log_alpha_cumsum"] = cumsum[i]
                target = series.setdefault(i, {"kind": kind})
                for name, value in row.items():
                    target.setdefault(name, []).append(value.tolist())
            if bar is not None:
                bar.update(end - start)
            start = end
            if partial is not None and n < len(ends) and time.monotonic() - last_save >= wait:
                began = time.monotonic()
                save_atomically({"settings": settings, "chunks": n, "cache": cache, "previous_logit": previous_logit,
                                 "losses": losses, "series": series, "cumsum": cumsum}, partial)
                last_save = time.monotonic()
                wait = max(save_every, SAVE_COST_FACTOR * (last_save - began))
    model.train(was_training)
    if partial is not None and keep_partial and done < len(ends):  # (no forward follows: without the cache)
        save_atomically({"settings": settings, "chunks": len(ends), "cache": None, "previous_logit": previous_logit,
                         "losses": losses, "series": series, "cumsum": cumsum}, partial)
    elif partial is not None and not keep_partial:
        from zoo.eval.common import remove_partial

        remove_partial(partial)
    layers = {}
    for i, s in series.items():
        s["heads"] = len(s["state_rms"][0])
        layers[i] = s
    mitigations = {format_spec(m.mitigation) for m in recorder.mixers}
    return {"positions": ends, "loss": losses, "layers": layers, "chunk_size": chunk_size, "batch": batch,
            "train_length": train_length, "group_size": group_size,
            "mitigation": mitigations.pop() if len(mitigations) == 1 else sorted(mitigations)}


@torch.no_grad()
def calibrate_norm_threshold(model, input_ids: torch.Tensor, factor: float = 1.0, chunk: int = 64,
                             chunk_size: int = 1024, group_size: int = 64, points_per_octave: int = 0,
                             min_chunk: int = 16) -> dict[int, torch.Tensor]:
    """Set a per-head state-norm cap on every recurrent mixer from a reference prefix (Stuffed Mamba's state
    normalization): threshold = factor · the largest head norm seen in any row of `input_ids` [B, T] by the
    unmitigated model, at every point where the cap acts in the run it is set for: each `chunk` tokens into each of
    that run's forwards and at their ends, the forwards being record_state_statistics' with `chunk_size`,
    `points_per_octave` and `min_chunk` (0: every chunk_size tokens, as evaluate_length's). Forget settings already
    on a mixer are kept (a window is refused: the windowed state is not capped); returns the thresholds per layer."""
    check_recurrent(model, "calibrate_norm_threshold")
    if any((m.mitigation or {}).get("window") is not None for m in recurrent_mixers(model)):
        # (it calibrated, then the model's next forward failed: window and norm do not combine)
        raise ValueError("calibrate_norm_threshold: a mixer holds the window mitigation, which does not combine with "
                         "the norm cap (the windowed state is not capped); clear it first (apply_mitigation(model, "
                         "None)) or use a forget setting beside the cap")
    rows = (input_ids[None] if input_ids.dim() == 1 else input_ids).to(next(model.parameters()).device)
    if rows.shape[1] == 0:  # (no state to measure: it failed with a KeyError after the run)
        raise ValueError("calibrate_norm_threshold: input_ids has no tokens; the reference prefix must be >= 1 token")
    mixers = recurrent_mixers(model)
    saved = {id(m): m.mitigation for m in mixers}
    for m in mixers:
        m.mitigation = None
    ends = chunk_ends(rows.shape[1], chunk_size, points_per_octave, min_chunk)
    # where the cap checks: a norm that peaked between two of these (a chunk_size end, a log-spaced forward's end)
    # was missed, so factor 1 capped the reference prefix itself
    points = sorted({p for s, e in zip([0, *ends], ends) for p in (*range(s + chunk, e, chunk), e)})
    kinds = {m.layer_idx: mixer_kind(m) for m in mixers}
    largest: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    from zoo.decode import _dict_output

    output = _dict_output(model)  # an output object also where the config's return_dict is False (a tuple: no cache)
    try:
        cache, start = None, 0
        for end in points:
            cache = output_cache(model(input_ids=rows[:, start:end], past_key_values=cache, use_cache=True, **output))
            start = end
            for i, kind in kinds.items():
                norms = head_view(kind, cache.layers[i].recurrent_state.double(), group_size).norm(dim=-1)  # (b, heads)
                top = norms.max(dim=0).values  # of any row: the cap acts per row
                largest[i] = top if i not in largest else torch.maximum(largest[i], top)
    finally:
        model.train(was_training)
        for m in mixers:
            m.mitigation = saved[id(m)]
    thresholds = {}
    for m in mixers:
        thresholds[m.layer_idx] = factor * largest[m.layer_idx].float()
        base = {k: v for k, v in (m.mitigation or {}).items() if k not in ("threshold", "chunk", "group_size")}
        m.mitigation = {**base, "threshold": thresholds[m.layer_idx], "chunk": chunk, "group_size": group_size}
    return thresholds


# ---- plots -------------------------------------------------------------------------------------------------

LABELS = {"state_mean": "state mean", "state_var": "state variance", "state_rms": "state RMS",
          "state_norm": "state norm ‖h‖_F", "delta_mean": "mean Δ", "log_alpha_mean": "mean log α",
          "alpha_mean": "mean α = exp(ΔA)", "log_alpha_cumsum": "log ∏α (cumulative)",
          "B_mean": "B mean", "B_rms": "B RMS"}
# what the decay and B statistics are in a GLA layer (no Δ, A or B: α = exp(g) per key channel, the keys k in B's place)
GLA_LABELS = {"log_alpha_mean": "mean log α = g", "alpha_mean": "mean α = exp(g)",
              "log_alpha_cumsum": "log ∏α = Σ g (cumulative)", "B_mean": "key k mean", "B_rms": "key k RMS"}
LOG_Y = {"state_var", "state_rms", "state_norm", "delta_mean", "B_rms"}


def plot_state_statistics(result: dict | Sequence[tuple[str, dict]], out_dir: str | Path,
                          train_length: int | None = None) -> list[Path]:
    """One PNG per statistic under out_dir (state_rms.png, ...; loss.png): a panel per recurrent layer, a line
    per head (B statistics: per B group), log-position x axis, the training length dashed. `result` may be a
    list of (label, result) pairs to overlay runs (e.g. with and without a mitigation), named in a legend; a lone
    result's mitigation (its ``mitigation``, when not 'none') is named in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("", result)] if isinstance(result, dict) else list(result)
    # a lone run under a mitigation says so in its titles (overlaid runs have their legend): they said nothing of it, so
    # its plots read as the model's own
    mitigation = result.get("mitigation") if isinstance(result, dict) else None
    if isinstance(mitigation, (list, tuple)):  # (its layers under different mitigations)
        mitigation = " / ".join(mitigation)
    named = f"; mitigation {mitigation}" if mitigation not in (None, "none") else ""
    train_length = train_length or runs[0][1].get("train_length")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = sorted(runs[0][1]["layers"], key=int)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # a legend where a run is named: unnamed overlaid runs (labels '') made matplotlib warn "No artists with labels
    # found to put in legend" once per PNG
    legend = len(runs) > 1 and any(label for label, _ in runs)
    paths = []
    for stat in (*STATE_STATS, *DECAY_STATS, *B_STATS):
        present = [layer for layer in layers if stat in runs[0][1]["layers"][layer]]
        if not present:
            continue
        cols = min(4, len(present))
        rows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
        for ax, layer in zip(axes.flat, present):
            for r, (label, res) in enumerate(runs):
                values = torch.tensor(res["layers"][layer][stat])  # (positions, heads)
                for h in range(values.shape[1]):
                    ax.plot(res["positions"], values[:, h], color=colors[r % len(colors)], alpha=0.6, lw=0.9,
                            label=label if h == 0 and label else None)
            ax.set_xscale("log")
            if stat in LOG_Y:
                ax.set_yscale("log")
            if train_length:
                ax.axvline(train_length, color="k", ls="--", lw=1)
            ax.set_title(f"layer {layer} ({runs[0][1]['layers'][layer]['kind']})", fontsize=9)
            ax.set_xlabel("position")
        for ax in list(axes.flat)[len(present):]:
            ax.set_visible(False)
        if legend:
            axes.flat[0].legend(fontsize=7)
        kinds = {runs[0][1]["layers"][layer]["kind"] for layer in present}
        label = LABELS[stat]
        if "gla" in kinds and stat in GLA_LABELS:  # (it said exp(ΔA) and B of a GLA layer's exp(g) and keys)
            label = GLA_LABELS[stat] if kinds == {"gla"} else f"{label}; gla: {GLA_LABELS[stat]}"
        fig.suptitle(label + named + (f"  (training length {train_length}, dashed)" if train_length else ""))
        fig.tight_layout()
        path = out_dir / f"{stat}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r, (label, res) in enumerate(runs):
        ax.plot(res["positions"], res["loss"], color=colors[r % len(colors)], label=label or None)
    ax.set_xscale("log")
    if train_length:
        ax.axvline(train_length, color="k", ls="--", lw=1)
    ax.set_xlabel("position")
    ax.set_ylabel("mean loss of the chunk (nats)")
    if named:
        ax.set_title(named[2:], fontsize=9)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


__all__ = [
    "StateRecorder",
    "calibrate_norm_threshold",
    "check_recurrent",
    "chunk_ends",
    "mixer_kind",
    "plot_state_statistics",
    "record_state_statistics",
    "state_statistics",
]
