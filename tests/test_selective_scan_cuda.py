"""Our selective-scan CUDA kernel against the torch reference: outputs and every gradient, packing, chunking.

Every case draws fresh random inputs; freshly allocated outputs come from memory poisoned with NaN, so an
element the kernel forgets to write fails the finiteness check. fp32 is compared tightly; bf16 and fp16
within their rounding band (both paths compute in fp32 and round the same values).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from zoo_kernels.selective_scan import cuda as ss_cuda
from zoo_kernels.selective_scan.ref import selective_scan_ref, selective_state_update_ref

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def poison_allocator(nbytes: int = 1 << 28) -> None:
    """Leave NaN in the caching allocator's free blocks, so unwritten outputs show up as NaN."""
    junk = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del junk


def make_inputs(batch, dim, length, nstate, groups, dtype, *, z=True, D=True, bias=True, softplus=True,
                h0=False, docs=0, seed=0):
    """Random inputs on the GPU (leaves with requires_grad). docs > 0: seq_idx with that many boundaries."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dt)

    bc_shape = (batch, groups, nstate, length) if groups > 1 else (batch, nstate, length)
    inp = {
        "u": rnd(batch, dim, length),
        # softplus(delta + bias) around 0.05..1; without softplus a positive step directly
        "delta": rnd(batch, dim, length, scale=0.5, shift=-1.0) if softplus
        else (torch.rand(batch, dim, length, device="cuda", generator=g) * 0.5 + 0.01).to(dtype),
        "A": -(torch.rand(dim, nstate, device="cuda", generator=g) * 1.5 + 0.1),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim, dt=torch.float32) if D else None,
        "z": rnd(batch, dim, length) if z else None,
        # without softplus the step must stay positive (exp(ΔA) > 1 would blow the state up): bias >= 0
        "delta_bias": (rnd(dim, scale=0.3, dt=torch.float32) if softplus
                       else torch.rand(dim, device="cuda", generator=g) * 0.1) if bias else None,
        "initial_state": rnd(batch, dim, nstate, dt=torch.float32) if h0 else None,
    }
    for t in inp.values():
        if t is not None:
            t.requires_grad_(True)
    seq_idx = None
    if docs:
        cuts = torch.stack([torch.randperm(length - 1, device="cuda", generator=g)[:docs] + 1
                            for _ in range(batch)])
        marks = torch.zeros(batch, length, dtype=torch.int32, device="cuda")
        marks.scatter_(1, cuts, 1)
        seq_idx = marks.cumsum(1, dtype=torch.int32)
    return inp, seq_idx


def run(fn, inp, seq_idx, softplus, want_final):
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    return fn(*args, softplus, inp["initial_state"], seq_idx, want_final)


def grads_of(inp, outputs, cotangents):
    """Gradients of every input leaf; an input the outputs do not depend on gets zeros."""
    leaves = [(k, v) for k, v in inp.items() if v is not None]
    gs = torch.autograd.grad(outputs, [v for _, v in leaves], cotangents, allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves, gs)}


def clone_leaves(inp):
    return {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inp.items()}


CASES = [
    # batch, dim, length, nstate, groups, dtype, options
    (2, 24, 1, 16, 1, torch.float32, {}),
    (2, 37, 255, 16, 1, torch.float32, {"h0": True}),
    (1, 40, 2049, 7, 2, torch.float32, {"docs": 5, "h0": True}),
    (2, 20, 100, 1, 1, torch.float32, {"z": False, "bias": False}),
    (1, 17, 333, 33, 1, torch.float32, {"softplus": False, "D": False}),
    (1, 48, 130, 4, 3, torch.float32, {"docs": 3}),
    (1, 8, 8200, 64, 1, torch.float32, {"h0": True}),
    (1, 30, 8193, 16, 1, torch.float32, {"docs": 7}),
    (3, 19, 77, 2, 1, torch.float32, {"h0": True, "docs": 2}),
    (1, 16, 640, 32, 1, torch.float32, {"z": False, "h0": True}),
    (2, 64, 512, 16, 1, torch.bfloat16, {}),
    (1, 40, 1001, 16, 2, torch.bfloat16, {"docs": 4, "h0": True}),
    (1, 24, 4100, 8, 1, torch.bfloat16, {"z": False}),
    (2, 32, 300, 16, 1, torch.float16, {"h0": True}),
]


def case_id(case):
    b, d, L, n, g, dt, opts = case
    extra = "-".join((k if v is True else f"{k}{v}") if v else f"no{k}" for k, v in opts.items())
    return f"b{b}-D{d}-L{L}-N{n}-G{g}-{str(dt)[6:]}" + (f"-{extra}" if extra else "")


SPLIT_CASES = [  # batch, dim, length, nstate, groups, dtype, options, segments
    (1, 40, 4096, 16, 1, torch.float32, {"h0": True}, 4),
    (2, 24, 1024, 16, 2, torch.float32, {"docs": 6, "h0": True}, 8),
    (1, 64, 2048, 16, 1, torch.bfloat16, {"docs": 3}, 2),
    (2, 40, 1000, 16, 2, torch.bfloat16, {"docs": 4, "h0": True}, 2),  # T = 500: in place, no 16-byte accesses
    (2, 24, 1002, 16, 1, torch.float32, {"h0": True}, 2),  # T = 501: not 4-aligned, segment rows copied
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[case_id(c[:7]) + f"-S{c[7]}" for c in SPLIT_CASES])
def test_seq_split_matches_reference(case):
    """Rows cut into segments on the kernel (zoo_kernels.selective_scan seq_split) against the unsplit reference."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    batch, dim, length, nstate, groups, dtype, opts, n_seg = case
    inp, seq_idx = make_inputs(batch, dim, length, nstate, groups, dtype, **opts)
    ref_inp = clone_leaves(inp)
    out_ref, final_ref = run(selective_scan_ref, ref_inp, seq_idx, True, True)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, final = ss.selective_scan(*args, True, inp["initial_state"], seq_idx, True, backend="cuda",
                                   seq_split=n_seg)
    tol = TOL[dtype]
    assert_close("out", out, out_ref, tol)
    assert_close("final_state", final, final_ref, max(tol, 1e-4))
    dout, dfinal = torch.randn_like(out), torch.randn_like(final)
    g_ref = grads_of(ref_inp, (out_ref, final_ref), (dout, dfinal))
    g = grads_of(inp, (out, final), (dout, dfinal))
    for name in g_ref:
        assert_close(f"grad {name}", g[name], g_ref[name], 2 * tol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("docs", [0, 5], ids=["dense", "seq_idx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_seg", [2, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_split_scheme_matches_unsplit_kernel(batch, n_seg, dtype, docs, monkeypatch):
    """The split (Triton passes, one kernel fwd and bwd over the segment rows) against the unsplit kernel:
    outputs, final state and every gradient. Δ ≈ softplus(-6) keeps about a third of a segment's entering
    state, so the carried states and adjoints matter; batch 2 has grouped B/C. With seq_idx: random document
    starts, one on segment 1's first token (row 0) and one on its second (last row)."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    length = 1024
    inp, seq_idx = make_inputs(batch, 64, length, 16, batch, dtype, h0=True, docs=docs, seed=batch)
    if docs:
        seq_idx[0, length // n_seg:] += 7
        seq_idx[-1, length // n_seg + 1:] += 7
    inp["delta"] = (inp["delta"].detach() - 5).requires_grad_(True)
    ref_inp = clone_leaves(inp)
    out_ref, final_ref = run(ss_cuda.selective_scan_cuda, ref_inp, seq_idx, True, True)
    poison_allocator()
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, final = ss.selective_scan(*args, True, inp["initial_state"], seq_idx, True, backend="cuda",
                                   seq_split=n_seg)
    tol = TOL[dtype]
    assert out.dtype == dtype and final.dtype == torch.float32
    assert_close("out", out, out_ref, tol)
    assert_close("final_state", final, final_ref, max(tol, 1e-4))
    dout, dfinal = torch.randn_like(out), torch.randn_like(final)
    g_ref = grads_of(ref_inp, (out_ref, final_ref), (dout, dfinal))
    poison_allocator()
    g = grads_of(inp, (out, final), (dout, dfinal))
    for name in g_ref:
        assert g[name].dtype == inp[name].dtype, name
        assert_close(f"grad {name}", g[name], g_ref[name], 2 * tol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("with_seq", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("groups", "nstate"), [(1, 16), (2, 64), (3, 5)])
def test_split_passes_match_torch_passes(groups, nstate, dtype, with_seq):
    """The Triton passes of the split (final states from zero, entering adjoints) against their torch reference;
    with seq_idx, document starts on a segment's first, second and last token and on chunk boundaries."""
    from zoo_kernels.selective_scan import split, split_passes

    g = torch.Generator(device="cuda").manual_seed(groups)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=g)
    batch, n_seg, dim, seg_len = 2, 4, 48, 300
    u, dout, z = (rnd(batch, n_seg, dim, seg_len).to(dtype) for _ in range(3))
    delta = (rnd(batch, n_seg, dim, seg_len) - 3).to(dtype)
    A = -(torch.rand(dim, nstate, device="cuda", generator=g) + 0.1)
    B, C = (rnd(batch, n_seg, groups, nstate, seg_len).to(dtype) for _ in range(2))
    bias = rnd(dim) * 0.2
    seq = None
    if with_seq:  # positions in the row of n_seg * seg_len = 1200 tokens; the last row one later
        marks = torch.zeros(batch, n_seg * seg_len, dtype=torch.int32, device="cuda")
        for row in range(batch):
            marks[row, [p + row for p in (32, 64, 300, 301, 599, 700, 733, 1000, 1050)]] = 1
        seq = marks.cumsum(1, dtype=torch.int32).view(batch, n_seg, seg_len)
    pairs = (
        (split_passes.final_states(u, delta, A, B, bias, True, 0, n_seg - 1, seq),
         split.final_states_ref(u, delta, A, B, bias, True, 0, n_seg - 1, seq)),
        (split_passes.entry_adjoints(dout, z, delta, A, C, bias, True, 1, n_seg - 1, seq),
         split.entry_adjoints_ref(dout, z, delta, A, C, bias, True, 1, n_seg - 1, seq)),
    )
    for name, (ours, ref) in zip(("final_states", "entry_adjoints"), pairs):
        for what, a, b in zip(("state", "decay sum"), ours, ref):
            assert_close(f"{name} {what}", a, b, 1e-4)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_scan_matches_reference(case):
    batch, dim, length, nstate, groups, dtype, opts = case
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    inp, seq_idx = make_inputs(batch, dim, length, nstate, groups, dtype, softplus=softplus, **opts)
    ref_inp = clone_leaves(inp)
    out_ref, final_ref = run(selective_scan_ref, ref_inp, seq_idx, softplus, True)
    poison_allocator()
    out, final = run(ss_cuda.selective_scan_cuda, inp, seq_idx, softplus, True)
    tol = TOL[dtype]
    assert out.dtype == dtype and final.dtype == torch.float32
    assert_close("out", out, out_ref, tol)
    assert_close("final_state", final, final_ref, max(tol, 1e-4))
    dout = torch.randn_like(out)
    dfinal = torch.randn_like(final)
    g_ref = grads_of(ref_inp, (out_ref, final_ref), (dout, dfinal))
    poison_allocator()
    g = grads_of(inp, (out, final), (dout, dfinal))
    assert set(g) == set(g_ref)
    for name in GRAD_NAMES:
        if name in g:
            assert g[name].dtype == inp[name].dtype, name
            assert_close(f"d{name}", g[name], g_ref[name], 2 * tol)


@pytest.mark.cuda
@needs_gpu
def test_out_only_and_final_only_gradients():
    """Either output alone may carry the loss: the missing cotangent is treated as zero."""
    inp, _ = make_inputs(2, 24, 200, 16, 1, torch.float32, h0=True, seed=1)
    ref_inp = clone_leaves(inp)
    out, final = run(ss_cuda.selective_scan_cuda, inp, None, True, True)
    out_ref, final_ref = run(selective_scan_ref, ref_inp, None, True, True)
    w = torch.randn_like(final)
    g = grads_of(inp, (final * w).sum(), None)
    g_ref = grads_of(ref_inp, (final_ref * w).sum(), None)
    for name in g:
        assert_close(f"d{name} (final only)", g[name], g_ref[name], 2e-4)
    inp2 = clone_leaves(inp)
    out2 = run(ss_cuda.selective_scan_cuda, inp2, None, True, False)
    ref2 = clone_leaves(inp)
    out2_ref = run(selective_scan_ref, ref2, None, True, False)
    dout = torch.randn_like(out2)
    g2, g2_ref = grads_of(inp2, out2, dout), grads_of(ref2, out2_ref, dout)
    for name in g2:
        assert_close(f"d{name} (out only)", g2[name], g2_ref[name], 2e-4)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packing_equals_separate_runs(dtype):
    """Documents packed in one row with seq_idx give the outputs and gradients of separate runs."""
    lengths = [50, 77, 1, 130]
    total = sum(lengths)
    inp, _ = make_inputs(1, 40, total, 16, 1, dtype, h0=True, seed=2)
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None].cuda()
    out, final = run(ss_cuda.selective_scan_cuda, inp, seq_idx, True, True)
    dout = torch.randn_like(out)
    dfinal = torch.randn_like(final)
    g = grads_of(inp, (out, final), (dout, dfinal))

    sep = clone_leaves(inp)
    outs, start, loss = [], 0, 0.0
    for i, n in enumerate(lengths):
        part = {k: v for k, v in sep.items()}
        for k in ("u", "delta", "z"):
            part[k] = sep[k][..., start:start + n]
        for k in ("B", "C"):
            part[k] = sep[k][..., start:start + n]
        part["initial_state"] = sep["initial_state"] if i == 0 else None  # it only feeds the first document
        o, f = run(ss_cuda.selective_scan_cuda, part, None, True, True)
        outs.append(o)
        loss = loss + (o.float() * dout[..., start:start + n].float()).sum()
        start += n
    loss = loss + (f * dfinal).sum()
    g_sep = grads_of(sep, loss, None)
    tol = TOL[dtype]
    assert_close("packed out", out, torch.cat(outs, dim=-1), tol)
    assert_close("packed final", final, f, 1e-4)
    for name in g:
        assert_close(f"packed d{name}", g[name], g_sep[name], 2 * tol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("docs", [0, 3], ids=["plain", "packed"])
def test_chunked_runs_equal_one_run(docs):
    """Carrying the final state into the next call (truncated-BPTT style) equals one call, gradients included.

    Document starts avoid the piece boundaries: a call's first position never starts a document.
    """
    length, pieces = 300, [100, 64, 136]
    inp, _ = make_inputs(2, 33, length, 16, 1, torch.float32, h0=True, seed=3)
    seq_idx = None
    if docs:
        marks = torch.zeros(2, length, dtype=torch.int32, device="cuda")
        marks[0, [30, 120, 250]] = 1
        marks[1, [99, 101, 299]] = 1
        seq_idx = marks.cumsum(1, dtype=torch.int32)
    out, final = run(ss_cuda.selective_scan_cuda, inp, seq_idx, True, True)
    dout = torch.randn_like(out)
    dfinal = torch.randn_like(final)
    g = grads_of(inp, (out, final), (dout, dfinal))

    ch = clone_leaves(inp)
    state, start, loss, outs = ch["initial_state"], 0, 0.0, []
    for n in pieces:
        part = dict(ch)
        for k in ("u", "delta", "z", "B", "C"):
            part[k] = ch[k][..., start:start + n]
        part["initial_state"] = state
        seq_part = None if seq_idx is None else seq_idx[:, start:start + n]
        o, state = run(ss_cuda.selective_scan_cuda, part, seq_part, True, True)
        outs.append(o)
        loss = loss + (o * dout[..., start:start + n]).sum()
        start += n
    loss = loss + (state * dfinal).sum()
    g_ch = grads_of(ch, loss, None)
    assert_close("chunked out", torch.cat(outs, dim=-1), out, 1e-5)
    assert_close("chunked final", state, final, 1e-5)
    for name in g:
        assert_close(f"chunked d{name}", g_ch[name], g[name], 1e-4)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [1, 2], ids=["G1", "G2"])
def test_state_update_equals_scan_steps(dtype, groups):
    batch, dim, nstate, length = 3, 24, 16, 12
    inp, _ = make_inputs(batch, dim, length, nstate, groups, dtype, h0=True, seed=4)
    with torch.no_grad():
        out, final = run(ss_cuda.selective_scan_cuda, inp, None, True, True)
        state = inp["initial_state"].detach().clone()
        state_ref = state.clone()
        for t in range(length):
            args = (inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t], inp["C"][..., t],
                    inp["D"], inp["z"][..., t], inp["delta_bias"], True)
            y = ss_cuda.selective_state_update_cuda(state, *args)
            y_ref = selective_state_update_ref(state_ref, *args)
            assert y.dtype == dtype
            assert_close(f"step {t} y vs ref", y, y_ref, TOL[dtype])
            assert_close(f"step {t} y vs scan", y, out[..., t], TOL[dtype])
        assert_close("state vs ref", state, state_ref, 1e-5)
        assert_close("state vs scan", state, final, 1e-4)


@pytest.mark.cuda
@needs_gpu
def test_extension_builds():
    assert ss_cuda.available(), ss_cuda.why_unavailable()
    assert ss_cuda.why_unavailable() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_gpu_says_why():
    assert not ss_cuda.available()
    assert "no CUDA device" in ss_cuda.why_unavailable()


def _cpu_scan(**changes):
    """Valid CPU arguments of selective_scan_cuda (batch 2, D 4, L 8, N 4, seq_idx and h0) with `changes`."""
    t = dict(u=torch.zeros(2, 4, 8), delta=torch.zeros(2, 4, 8), A=torch.zeros(4, 4), B=torch.zeros(2, 4, 8),
             C=torch.zeros(2, 4, 8), D=torch.zeros(4), z=torch.zeros(2, 4, 8), delta_bias=torch.zeros(4),
             initial_state=torch.zeros(2, 4, 4), seq_idx=torch.zeros(2, 8, dtype=torch.long))
    t.update(changes)
    return t


SCAN_BAD = {
    "u_2d": (dict(u=torch.zeros(4, 8)), "u must be"),
    "B_2d": (dict(B=torch.zeros(2, 4)), "B and C must be"),
    "C_5d": (dict(C=torch.zeros(2, 1, 1, 4, 8)), "B and C must be"),
    "N_0": (dict(B=torch.zeros(2, 0, 8), C=torch.zeros(2, 0, 8), A=torch.zeros(4, 0)), "N = 0"),
    "N_65_in_B": (dict(B=torch.zeros(2, 65, 8), C=torch.zeros(2, 65, 8)), "N = 65"),
    "N_65_in_A": (dict(A=torch.zeros(4, 65)), "N = 65 > 64"),
    "groups_3": (dict(B=torch.zeros(2, 3, 4, 8), C=torch.zeros(2, 3, 4, 8)), "not divisible"),
    "empty": (dict(u=torch.zeros(2, 4, 0), delta=torch.zeros(2, 4, 0), B=torch.zeros(2, 4, 0),
                   C=torch.zeros(2, 4, 0), z=None, seq_idx=None), "empty"),
    "delta_shape": (dict(delta=torch.zeros(2, 4, 7)), "delta has shape"),
    "A_shape": (dict(A=torch.zeros(3, 4)), "A has shape"),
    "B_batch": (dict(B=torch.zeros(1, 4, 8)), "B has shape"),
    "C_groups": (dict(C=torch.zeros(2, 2, 4, 8)), "C has shape"),
    "D_shape": (dict(D=torch.zeros(5)), "D has shape"),
    "z_shape": (dict(z=torch.zeros(2, 4, 7)), "z has shape"),
    "delta_bias_shape": (dict(delta_bias=torch.zeros(4, 1)), "delta_bias has shape"),
    "initial_state_shape": (dict(initial_state=torch.zeros(1, 4, 4)), "initial_state has shape"),
    "seq_idx_shape": (dict(seq_idx=torch.zeros(8, dtype=torch.long)), "seq_idx has shape"),
}


@pytest.mark.parametrize("case", list(SCAN_BAD))
def test_scan_refuses_what_the_extension_would_before_any_device(case):
    """Every check of csrc/selective_scan_api.cpp's make_params that bad arguments can reach is mirrored in Python
    (ValueError on CPU tensors, before the device check and the extension), also on the split path."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    changes, words = SCAN_BAD[case]
    t = _cpu_scan(**changes)
    with pytest.raises(ValueError, match=words):
        ss_cuda.selective_scan_cuda(**t)
    if case not in ("u_2d", "empty", "initial_state_shape"):  # (the split's own checks / states come first)
        with pytest.raises(ValueError, match=words):
            ss.selective_scan(**t, backend="cuda", seq_split=2)


def test_scan_takes_valid_arguments_up_to_the_device_check():
    """Valid CPU arguments ([batch, N, L] or grouped B and C) pass the checks and stop at the device (RuntimeError);
    u's dtype stays a TypeError."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    for bc in (torch.zeros(2, 4, 8), torch.zeros(2, 2, 4, 8)):
        with pytest.raises(RuntimeError, match="CUDA"):
            ss_cuda.selective_scan_cuda(**_cpu_scan(B=bc, C=bc))
        with pytest.raises(RuntimeError, match="CUDA"):
            ss.selective_scan(**_cpu_scan(B=bc, C=bc, initial_state=None), backend="cuda", seq_split=2)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        ss_cuda.selective_scan_cuda(**_cpu_scan(u=torch.zeros(2, 4, 8, dtype=torch.float64)))


def _cpu_update(**changes):
    """Valid CPU arguments of selective_state_update_cuda (batch 2, D 4, N 4) with `changes`."""
    t = dict(state=torch.zeros(2, 4, 4), x=torch.zeros(2, 4), dt=torch.zeros(2, 4), A=torch.zeros(4, 4),
             B=torch.zeros(2, 4), C=torch.zeros(2, 4), D=torch.zeros(4), z=torch.zeros(2, 4), dt_bias=torch.zeros(4))
    t.update(changes)
    return t


UPDATE_BAD = {
    "x_1d": (dict(x=torch.zeros(4)), "x must be"),
    "B_4d": (dict(B=torch.zeros(2, 1, 1, 4)), "B and C must be"),
    "B_C_shapes": (dict(C=torch.zeros(2, 1, 5)), "one shape"),
    "groups_3": (dict(B=torch.zeros(2, 3, 4), C=torch.zeros(2, 3, 4)), "not divisible"),
    "groups_0": (dict(B=torch.zeros(2, 0, 4), C=torch.zeros(2, 0, 4)), "G = 0"),
    "state_shape": (dict(state=torch.zeros(2, 4, 5)), "state has shape"),
    "A_shape": (dict(A=torch.zeros(4, 5)), "A has shape"),
    "dt_shape": (dict(dt=torch.zeros(2, 3)), "dt has shape"),
    "dt_low_rank_1d": (dict(dt=torch.zeros(2), dt_weight=torch.zeros(4, 2)), "dt must be"),
    "dt_weight_shape": (dict(dt=torch.zeros(2, 2), dt_weight=torch.zeros(4, 3)), "dt_weight has shape"),
    "z_shape": (dict(z=torch.zeros(2, 5)), "z has shape"),
    "D_shape": (dict(D=torch.zeros(5)), "D has shape"),
    "dt_bias_shape": (dict(dt_bias=torch.zeros(3)), "dt_bias has shape"),
}


@pytest.mark.parametrize("case", list(UPDATE_BAD))
def test_state_update_refuses_what_the_extension_would_before_any_device(case):
    """csrc/selective_scan_api.cpp's state_update checks, mirrored in Python (ValueError on CPU tensors), also
    through selective_state_update(backend="cuda")."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    changes, words = UPDATE_BAD[case]
    with pytest.raises(ValueError, match=words):
        ss_cuda.selective_state_update_cuda(**_cpu_update(**changes))
    with pytest.raises(ValueError, match=words):
        ss.selective_state_update(**_cpu_update(**changes), backend="cuda")


def test_state_update_takes_valid_arguments_up_to_the_device_check():
    """Grouped or not, with dt_weight or not, a strided x or an fp64 one (cast): past the checks, RuntimeError."""
    for changes in ({}, dict(B=torch.zeros(2, 2, 4), C=torch.zeros(2, 2, 4)),
                    dict(dt=torch.zeros(2, 3), dt_weight=torch.zeros(4, 3)), dict(x=torch.zeros(2, 8)[:, ::2]),
                    dict(x=torch.zeros(2, 4, dtype=torch.float64))):
        with pytest.raises(RuntimeError, match="CUDA"):
            ss_cuda.selective_state_update_cuda(**_cpu_update(**changes))


@pytest.mark.parametrize("name", ["dt", "B", "C", "z", "A", "dt_bias"])
def test_state_update_refuses_an_argument_on_another_device(name):
    """The extension checks none of dt, B, C, z's devices (a CPU dt next to a CUDA x was read as device memory) and
    compares only is_cuda for the others (a tensor of another GPU passed): now any other device is refused, naming
    the argument. On CPU, 'meta' stands for the other device."""
    t = _cpu_update()
    t[name] = t[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} must be on x's device \(cpu\), got meta"):
        ss_cuda.selective_state_update_cuda(**t)


@pytest.mark.parametrize("name", ["A", "seq_idx", "initial_state"])
def test_scan_refuses_an_argument_on_another_device(name):
    t = _cpu_scan()
    t[name] = t[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} must be on u's device \(cpu\), got meta"):
        ss_cuda.selective_scan_cuda(**t)


def test_device_check_compares_gpu_indices():
    """cuda:0 and cuda:1 are both is_cuda: the check compares devices (stand-ins: it reads .device only)."""
    from types import SimpleNamespace

    from zoo_kernels._checks import device_problem

    gpu = lambda i: SimpleNamespace(is_cuda=True, device=torch.device("cuda", i))  # noqa: E731
    assert device_problem("u", gpu(0), A=gpu(0), D=None) is None
    assert device_problem("u", gpu(0), A=gpu(1)) == "A must be on u's device (cuda:0), got cuda:1"
