"""GLA fast path: fla's chunk_gla behind a self-check, seq_idx -> cu_seqlens, states in and out.

CPU tests drive the adapter and the self-check through a stand-in with fla's API (built from the
reference, one document at a time); tests marked `cuda` run fla itself where it is installed.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from zoo_kernels.gla import chunk_gla, fast
from zoo_kernels.gla.ref import chunk_gla_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fla_standin(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None
):
    """fla.ops.gla.chunk_gla's calling convention, computed by the reference document by document."""
    if cu_seqlens is None:
        o, final = chunk_gla_ref(q, k, v, g, scale, initial_state, None, True)
        return o, (final if output_final_state else None)
    assert q.shape[0] == 1, "fla wants the batch flattened to 1 with cu_seqlens"
    outs, finals = [], []
    bounds = cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = initial_state[i : i + 1] if initial_state is not None else None
        o, final = chunk_gla_ref(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale, h0, None, True)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, 1), (torch.cat(finals, 0) if output_final_state else None)


def make_inputs(batch, length, heads, dk, dv, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return {
        "q": rnd(batch, length, heads, dk).to(dtype),
        "k": rnd(batch, length, heads, dk).to(dtype),
        "v": rnd(batch, length, heads, dv).to(dtype),
        "g": F.logsigmoid(rnd(batch, length, heads, dk) + 2).to(dtype),
        "initial_state": rnd(batch, heads, dk, dv),
    }


def packed_seq_idx(batch, length, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    seq_idx = torch.zeros(batch, length, dtype=torch.int32)
    for b in range(batch):
        for i, cut in enumerate(sorted(torch.randint(1, length, (3,), generator=gen).tolist())):
            seq_idx[b, cut:] = i + 1
    return seq_idx.to(device)


def outputs_and_grads(fn, inputs, seq_idx, seed=1):
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in inputs.items()}
    o, final = fn(
        leaves["q"], leaves["k"], leaves["v"], leaves["g"], None, leaves["initial_state"], seq_idx, True
    )
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() + (
        final * torch.randn(final.shape, generator=gen).to(o.device)
    ).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "final": final, **{f"d{k}": g for k, g in zip(leaves, grads)}}


def adapter(fn):
    return lambda q, k, v, g, scale, h0, seq_idx, final: fast._run_fla(
        fn, q, k, v, g, scale, h0, seq_idx, final
    )


@pytest.fixture
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(fast, "_VERDICTS", {})


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_adapter_matches_reference(packed):
    """seq_idx -> cu_seqlens, per-document initial states and per-row final states, gradients included."""
    inputs = make_inputs(3, 45, 2, 16, 8, torch.float32, "cpu")
    seq_idx = packed_seq_idx(3, 45) if packed else None
    got = outputs_and_grads(adapter(fla_standin), inputs, seq_idx)
    ref = outputs_and_grads(chunk_gla_ref, inputs, seq_idx)
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-5, name


def test_verdict_accepts_a_correct_kernel(fresh_verdicts, monkeypatch):
    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: fla_standin)
    assert fast.fla_verdict(torch.device("cpu"), torch.float32, 16, 16) == (True, "")


def test_verdict_taken_under_inference_mode_accepts_a_correct_kernel(fresh_verdicts, monkeypatch):
    """The first GLA call of a process may run under torch.inference_mode (eager_decode_overhead.py's generate did
    on an H100): the probe's backward failed on inference tensors and fla stayed off for the whole process."""
    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: fla_standin)
    with torch.inference_mode():
        assert fast.fla_verdict(torch.device("cpu"), torch.float32, 16, 16) == (True, "")


def test_verdict_rejects_a_crashing_kernel_once(fresh_verdicts, monkeypatch):
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Triton 3.6 is not supported on Hopper for this backward")

    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: crashing)
    with pytest.warns(UserWarning, match="self-check"):
        ok, reason = fast.fla_verdict(torch.device("cpu"), torch.float32, 16, 16)
    assert not ok and "RuntimeError" in reason
    fast.fla_verdict(torch.device("cpu"), torch.float32, 16, 16)
    assert len(calls) == 1, "the verdict is cached per device"


def test_verdict_rejects_a_wrong_kernel(fresh_verdicts, monkeypatch):
    def wrong(q, k, v, g, **kwargs):
        return fla_standin(q, k, v, g * 2, **kwargs)  # e.g. a log2 / ln mix-up of the gate

    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: wrong)
    with pytest.warns(UserWarning):
        ok, reason = fast.fla_verdict(torch.device("cpu"), torch.float32, 16, 16)
    assert not ok and "off by" in reason


def test_unsound_fla_falls_back_to_the_reference(fresh_verdicts, monkeypatch):
    def crashing(*args, **kwargs):
        raise RuntimeError("unsupported on this GPU")

    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: crashing)
    q, k, v, g, h0 = make_inputs(2, 40, 2, 16, 16, torch.float32, "cpu").values()
    args = (q, k, v, g, None, h0)
    with pytest.warns(UserWarning, match="reference runs instead"):
        o, final = fast.chunk_gla_fast(*args, None, True)
    o_ref, final_ref = chunk_gla_ref(*args, None, True)
    assert rel_err(o, o_ref) < 1e-6 and rel_err(final, final_ref) < 1e-6


@pytest.mark.parametrize("bad", ["seq_idx", "initial_state", "v", "chunk_size"])
def test_fla_path_refuses_what_the_reference_refuses(fresh_verdicts, monkeypatch, bad):
    """fla was handed the tensors unchecked: a seq_idx of one row for two (cu_seqlens covering the first row alone)
    or an initial_state of one row was read as it lay, where the reference raises. Now the same ValueError, naming
    the argument, before fla runs."""
    calls = []
    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: lambda *a, **kw: calls.append(1) or fla_standin(*a, **kw))
    monkeypatch.setattr(fast, "_verdict", lambda *a: (True, ""))
    q, k, v, g, h0 = make_inputs(2, 40, 2, 16, 8, torch.float32, "cpu").values()
    args = {"q": q, "k": k, "v": v, "g": g, "initial_state": h0, "seq_idx": None, "chunk_size": 64}
    args[bad] = {"seq_idx": packed_seq_idx(1, 40), "initial_state": h0[:1], "v": v[:1], "chunk_size": 0}[bad]
    for fn in (chunk_gla_ref, fast.chunk_gla_fast):
        with pytest.raises(ValueError, match=bad):
            fn(**args)
    assert not calls, "fla ran on inputs the reference refuses"


def test_missing_fla(fresh_verdicts, monkeypatch):
    monkeypatch.setattr(fast, "_fla_chunk_gla", lambda: None)
    ok, reason = fast.fla_verdict(torch.device("cpu"), torch.float32, 16, 16)
    assert not ok and "fla-core" in reason
    with pytest.raises(ImportError, match="fla-core"):
        fast.chunk_gla_fast(*make_inputs(1, 8, 1, 16, 16, torch.float32, "cpu").values())
    assert fast.best_backend(torch.device("cpu")) is None


def test_verdict_is_redone_when_fla_imports_later(fresh_verdicts, monkeypatch):
    """A process that imports fla after its first call (e.g. once fla joins sys.path) gets fla judged, not the
    'not installed' verdict kept; the new verdict is then kept like any other."""
    monkeypatch.setattr(fast, "_FLA", [])
    monkeypatch.setitem(sys.modules, "fla.ops.gla", None)  # the import fails
    cpu, dims = torch.device("cpu"), (torch.float32, 16, 16)
    ok, reason = fast.fla_verdict(cpu, *dims)
    assert not ok and "not installed" in reason
    probes = []

    def counted(*args, **kwargs):
        probes.append(1)
        return fla_standin(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "fla.ops.gla", types.SimpleNamespace(chunk_gla=counted))
    assert fast.fla_verdict(cpu, *dims) == (True, "")
    n_probe = len(probes)
    q, k, v, g, h0 = make_inputs(2, 40, 2, 16, 16, torch.float32, "cpu").values()
    o = fast.chunk_gla_fast(q, k, v, g, None, h0)
    assert len(probes) == n_probe + 1, "one call of fla itself, no second self-check"
    assert rel_err(o, chunk_gla_ref(q, k, v, g, None, h0)) < 1e-6


# ------------------------------------------------------------------------------------------------ GPU


def fla_or_skip():
    ok, reason = fast.fla_verdict(torch.device("cuda"), torch.bfloat16, 128, 128)
    if not ok:
        pytest.skip(f"fla not usable here: {reason}")


# GPU cases use bf16 and K = V = 128, the shapes of benchmarks/gla.py: fla autotunes each new
# (dtype, head size) for minutes on first use, so the tests share one autotuning with the benchmark.
# fla keeps bf16 intermediates; dg comes from a reversed cumsum.
TOL = 3e-2


@pytest.mark.cuda
@cuda
def test_best_backend_never_crashes():
    inputs = make_inputs(2, 70, 2, 128, 128, torch.bfloat16, "cuda")
    o = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert fast.best_backend(torch.device("cuda")) in ("fla", None)
    ref = chunk_gla_ref(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert rel_err(o, ref) < TOL


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("shape", [(2, 300, 4, 128, 128), (1, 1000, 2, 128, 128)], ids=["b2-T300", "b1-T1000"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_fla_matches_reference(shape, packed):
    fla_or_skip()
    batch, length, heads, dk, dv = shape
    inputs = make_inputs(batch, length, heads, dk, dv, torch.bfloat16, "cuda")
    seq_idx = packed_seq_idx(batch, length, device="cuda") if packed else None
    fla = lambda *args: fast.chunk_gla_fast(*args, backend="fla")
    got = outputs_and_grads(fla, inputs, seq_idx)
    ref = outputs_and_grads(chunk_gla_ref, inputs, seq_idx)
    errors = {name: rel_err(got[name], ref[name]) for name in ref}
    assert all(e < TOL for e in errors.values()), {k: f"{e:.2e}" for k, e in errors.items()}


@pytest.mark.cuda
@cuda
def test_fla_chunked_equals_whole():
    fla_or_skip()
    inputs = make_inputs(2, 333, 4, 128, 128, torch.bfloat16, "cuda", seed=3)
    fla = lambda *args: fast.chunk_gla_fast(*args, backend="fla")

    def chained(q, k, v, g, scale, h0, seq_idx, final):
        o1, s1 = fla(q[:, :128], k[:, :128], v[:, :128], g[:, :128], scale, h0, None, True)
        o2, s2 = fla(q[:, 128:], k[:, 128:], v[:, 128:], g[:, 128:], scale, s1, None, True)
        return torch.cat([o1, o2], 1), s2

    a = outputs_and_grads(chained, inputs, None)
    b = outputs_and_grads(fla, inputs, None)
    for name in a:
        assert rel_err(a[name], b[name]) < TOL, name


def test_document_boundaries_are_converted_once_per_seq_idx():
    """seq_idx -> cu_seqlens syncs with the device: kept for the same, unmodified tensor; redone otherwise."""
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])
    first = fast._documents(seq_idx)
    assert first[1].tolist() == [0, 2, 5, 8, 10] and first[2].device.type == "cpu"
    assert first[4].tolist() == [1, 3]  # the last document of each row
    assert fast._documents(seq_idx) is first
    seq_idx[0, 1] = 1  # in place: a new document boundary
    again = fast._documents(seq_idx)
    assert again is not first and again[1].tolist() == [0, 1, 5, 8, 10]
    assert fast._documents(seq_idx.clone()) is not again


def test_documents_take_inference_tensors():
    """cu_seqlens from a seq_idx made under inference_mode (no version counter: not cached, still right)."""
    with torch.inference_mode():
        seq_idx = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])
        begins, cu, cu_cpu, row_start, last_of_row = fast._documents(seq_idx)
        again = fast._documents(seq_idx)
    assert cu.tolist() == [0, 2, 5, 8, 10] == again[1].tolist()
    assert row_start.tolist() == [True, False, True, False] and last_of_row.tolist() == [1, 3]
