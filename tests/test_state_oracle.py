"""The state-collapse mitigations (zoo.state.mitigation) against a naive per-token recurrence written from Stuffed
Mamba's formulas (Chen et al. 2024), in fp64, independent of zoo's scans and windowed blocks: forget α' = c_α·α, B' =
c_B·B, Δ' = c_dt·Δ; norm caps each head's ‖h‖_F at the threshold every `chunk` tokens of a row (counted from the
forward's start) and at each forward's end; window h_t^(r) = h_t − (∏_{i=t−r+1..t} α_i)·h_{t−r}. The mixers' scan and
step inputs are recorded as they run (one forward, a prefill in pieces that do not divide the length, token by
token), with pads in the rows, and the oracle replays them row by row, pads left out: outputs and states must agree."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_state import make_mixer

from zoo.cache import RecurrentLayer
from zoo.state import mitigation as mit

KINDS = ["mamba", "mamba2", "gla"]
ENTRIES = ["mamba_scan", "mamba_step", "mamba2_scan", "mamba2_step", "gla_scan", "gla_step"]
MODES = {"one forward": None, "pieces": [5, 7, 4, 7], "decode": [6] + [1] * 17}


def record(monkeypatch) -> list:
    """Wrap the mitigation entry points; each call is kept as (name, args, kwargs, outputs, state after)."""
    calls = []

    def wrap(name, entry):
        def wrapped(mixer, *args, **kwargs):
            out = entry(mixer, *args, **kwargs)
            final = out[1] if isinstance(out, tuple) else args[0] if name.endswith("_step") else None
            calls.append((name, args, kwargs, out[0] if isinstance(out, tuple) else out,
                          None if final is None else final.clone()))
            return out
        return wrapped

    for name in ENTRIES:
        monkeypatch.setattr(mit, name, wrap(name, getattr(mit, name)))
    return calls


def tokens_of(call) -> list[list[tuple[int | None, dict, torch.Tensor]]]:
    """Per row: (document id, the token's scan inputs in fp64, its output) of each of the call's tokens (no pads)."""
    name, a, kw, y, _ = call
    step = name.endswith("_step")
    if name.startswith("mamba_"):
        u, delta, B, C, z = (a[1], a[2], a[4], a[5], a[6]) if step else (a[0], a[1], a[3], a[4], a[5])
        B, C = (B, C) if B.dim() == (3 if step else 4) else (B.unsqueeze(1), C.unsqueeze(1))
        pick = (lambda t, b, i: t[b]) if step else (lambda t, b, i: t[b, ..., i])
        inputs = dict(u=u, delta=delta, B=B, C=C, z=z)
        length = 1 if step else u.shape[-1]
    elif name.startswith("mamba2_"):
        x, dt, B, C = a[1:3] + a[4:6] if step else a[:2] + a[3:5]
        pick = (lambda t, b, i: t[b]) if step else (lambda t, b, i: t[b, i])
        inputs = dict(x=x, dt=dt, B=B, C=C)
        length = 1 if step else x.shape[1]
    else:
        q, k, v, g, scale = a[1:6] if step else a[:5]
        pick = (lambda t, b, i: t[b]) if step else (lambda t, b, i: t[b, i])
        inputs = dict(q=q, k=k, v=v, g=g)
        length = 1 if step else q.shape[1]
    if step:
        tokens = kw.get("tokens", a[-1] if len(a) > (9 if name.startswith("mamba_") else 8 if "2" in name else 7)
                        else None)
        mask, seq_idx = (None if tokens is None else tokens[:, None]), None
    else:
        mask = kw.get("mask", a[-1] if len(a) > (10 if name.startswith("mamba_") else 9) else None)
        seq_idx = a[7] if name.startswith("mamba_") else a[6]
    rows = []
    for b in range(y.shape[0]):
        row = []
        for i in range(length):
            if mask is not None and not bool(mask[b, i]):
                continue
            token = {n: pick(t, b, i).double() for n, t in inputs.items()}
            if name.startswith("gla"):
                token["scale"] = scale
            row.append((None if seq_idx is None else int(seq_idx[b, i]), token, pick(y, b, i) if step else
                        (y[b, :, i] if name.startswith("mamba_") else y[b, i])))
        rows.append(row)
    return rows


def one_step(kind, mixer, t, spec):
    """(α, the state's input b, readout(h)) of one token under the spec's forget settings."""
    c_alpha, c_b, c_dt = spec["c_alpha"], spec["c_b"], spec["c_dt"]
    if kind == "mamba":
        A = -torch.exp(mixer.A_log.double())  # (D, N)
        dt = F.softplus(t["delta"]) * c_dt
        per = A.shape[0] // t["B"].shape[0]
        B, C = t["B"].repeat_interleave(per, 0) * c_b, t["C"].repeat_interleave(per, 0)
        return (torch.exp(dt[:, None] * A) * c_alpha, (dt * t["u"])[:, None] * B,
                lambda h: ((h * C).sum(-1) + mixer.D.double() * t["u"]) * F.silu(t["z"]))
    if kind == "mamba2":
        A = -torch.exp(mixer.A_log.double())  # (H,)
        dt = F.softplus(t["dt"] + mixer.dt_bias.double()) * c_dt
        per = A.shape[0] // t["B"].shape[0]
        B, C = t["B"].repeat_interleave(per, 0) * c_b, t["C"].repeat_interleave(per, 0)
        return ((torch.exp(dt * A) * c_alpha)[:, None, None], (dt[:, None] * t["x"])[..., None] * B[:, None],
                lambda h: torch.einsum("hpn,hn->hp", h, C) + t["x"] * mixer.D.double()[:, None])
    g = t["g"] * c_dt + math.log(c_alpha)
    return (torch.exp(g)[..., None], (t["k"] * c_b)[..., None] * t["v"][:, None],
            lambda h: torch.einsum("hk,hkv->hv", t["q"] * t["scale"], h))


def capped(kind, h, threshold, group_size):
    size = math.gcd(h.shape[0], group_size) if kind == "mamba" else 1
    heads = h.reshape(h.shape[0] // size, -1)
    limit = threshold.double()[:, None] if isinstance(threshold, torch.Tensor) else threshold
    norm = heads.norm(dim=-1, keepdim=True)
    return (heads * torch.where(norm > limit, limit / norm, torch.ones_like(norm))).reshape(h.shape)


@torch.no_grad()
def replay(kind, mixer, spec, calls, batch):
    """The largest relative difference of the recorded outputs and states from the oracle's."""
    spec = mit.normalize_spec(spec)
    r, cap = spec["window"], mit._has_cap(spec)
    worst = 0.0

    def diff(want, got):
        return (want - got.double().reshape(want.shape)).abs().max().item() / max(1.0, want.abs().max().item())

    calls_tokens = [tokens_of(c) for c in calls]
    for b in range(batch):
        h, states, log_decays, doc, windowed = None, [], [], None, None
        for call, rows in zip(calls, calls_tokens):
            count = 0  # the row's tokens since the forward's (or the document's) start
            for seq, t, y in rows[b]:
                if seq is not None and seq != doc:
                    h, states, log_decays, doc, count = None, [], [], seq, 0
                a, inp, read = one_step(kind, mixer, t, spec)
                h = a * (0 if h is None else h) + inp
                log_decays.append(torch.log(a).expand_as(h) + (log_decays[-1] if log_decays else 0))
                states.append(h)
                if r is not None:
                    i = len(states) - 1
                    windowed = h if i < r else h - torch.exp(log_decays[i] - log_decays[i - r]) * states[i - r]
                    worst = max(worst, diff(read(windowed), y))
                    continue
                worst = max(worst, diff(read(h), y))
                count += 1
                if cap and count % spec["chunk"] == 0:
                    h = states[-1] = capped(kind, h, spec["threshold"], spec["group_size"])
            if cap and h is not None:  # every forward's end
                h = states[-1] = capped(kind, h, spec["threshold"], spec["group_size"])
            if call[4] is not None and h is not None:
                worst = max(worst, diff(windowed if r is not None else h, call[4][b]))
    return worst


def norm_threshold(kind, mixer, x, fraction, per_head=False, group_size=64):
    """`fraction` of the smallest head norm the unmitigated mixer reaches on x (so that the cap acts)."""
    mixer.mitigation = None
    cache = RecurrentLayer()
    with torch.no_grad():
        mixer(x, cache=cache)
    norms = mit.head_view(kind, cache.recurrent_state, group_size).norm(dim=-1)  # (b, heads)
    return fraction * (norms.min(0).values * torch.linspace(0.5, 1.5, norms.shape[1]) if per_head else norms.min())


def spec_for(name, kind, mixer, x):
    group_size = 16 if kind == "mamba" else 64  # mamba: 8 heads of 16 channels (d_inner 64)
    return {"forget": lambda: {"c_alpha": 0.85, "c_b": 0.7, "c_dt": 0.6},
            "forget segments": lambda: {"c_alpha": 0.2, "c_b": 0.7, "c_dt": 0.5},
            "norm": lambda: {"threshold": norm_threshold(kind, mixer, x, 0.3).item(), "chunk": 4, "c_alpha": 0.95},
            "norm per head": lambda: {"threshold": norm_threshold(kind, mixer, x, 0.4, True, group_size), "chunk": 3,
                                      "group_size": group_size},
            "window": lambda: {"window": 5},
            "window forget": lambda: {"window": 4, "c_alpha": 0.8, "c_b": 0.6, "c_dt": 0.7}}[name]()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["forget", "forget segments", "norm", "norm per head", "window", "window forget"])
@pytest.mark.parametrize("kind", KINDS)
def test_mitigation_equals_the_per_token_recurrence(kind, name, mode, monkeypatch):
    """Rows with pads before their tokens and between them (inside the decode steps too), beside each other."""
    mixer = make_mixer(kind)
    torch.manual_seed(5)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, 8:10] = 0
    x = torch.randn(2, 23, 32) * mask[..., None]
    spec = spec_for(name, kind, mixer, x)
    mixer.mitigation = spec
    calls = record(monkeypatch)
    with torch.no_grad():
        if MODES[mode] is None:
            mixer(x, attention_mask=mask)
        else:
            cache, start = RecurrentLayer(), 0
            for n in MODES[mode]:
                mixer(x[:, start:start + n], cache=cache, attention_mask=mask[:, :start + n])
                start += n
    assert calls and replay(kind, mixer, spec, calls, 2) < 1e-5


@pytest.mark.parametrize("name", ["forget segments", "norm", "norm per head"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_mitigation_equals_the_per_token_recurrence(kind, name, monkeypatch):
    """Packed documents (seq_idx), in one forward and in pieces cut inside documents: each starts from zero."""
    mixer = make_mixer(kind)
    torch.manual_seed(6)
    x = torch.randn(2, 23, 32)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9 + [2] * 7, [0] * 2 + [1] * 21])
    spec = spec_for(name, kind, mixer, x)
    mixer.mitigation = spec
    for pieces in ([(0, 23)], [(0, 5), (5, 12), (12, 23)]):
        calls = record(monkeypatch)
        cache = RecurrentLayer()
        with torch.no_grad():
            for a, b in pieces:
                mixer(x[:, a:b], seq_idx=seq_idx[:, a:b], cache=cache)
        assert calls and replay(kind, mixer, spec, calls, 2) < 1e-5, pieces
