"""The split selective scan (zoo_kernels.selective_scan.split: cheap passes, one full fwd and bwd per segment row)
against the unsplit scan, on the reference pieces; its Triton passes against their torch reference.

The CPU cases use slowly decaying states (small Δ, A in -1..-0.1) so that a segment keeps most of the state
entering it: dropping the carried states or adjoints, or with seq_idx the links, decays and truncations at
document starts, must break the result (checked), so the equality cannot hold vacuously. The Triton passes run
through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported); the
CUDA kernel's split is tested in tests/test_selective_scan_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, patch_triton_interpreter, rel_err, run_in_interpreter
from zoo_kernels.selective_scan import selective_scan
from zoo_kernels.selective_scan import split as split_module

TOL = 1e-5  # fp32 math on both sides; a missing carry gives errors of order 0.1 or more (checked below)


def scan_inputs(batch, dim, n_state, length, groups=0, *, D=False, z=False, bias=False, softplus=False,
                init=False, seed=0):
    """fp32 inputs whose states decay slowly: Δ about 0.02 (softplus(-4 ± 0.5), or 0..0.04 directly)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
    bc_shape = (batch, groups, n_state, length) if groups else (batch, n_state, length)
    inputs = {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length) * 0.5 - 4 if softplus
        else torch.rand(batch, dim, length, generator=gen) * 0.04,
        "A": -(torch.rand(dim, n_state, generator=gen) * 0.9 + 0.1),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim) if D else None,
        "z": rnd(batch, dim, length) if z else None,
        "delta_bias": rnd(dim) * 0.3 if bias else None,
        "initial_state": rnd(batch, dim, n_state) if init else None,
    }
    return {k: v for k, v in inputs.items() if v is not None}, {"delta_softplus": softplus}


def forward_backward(inputs, options, n_seg, grad_out=True, grad_final=True, seq_idx=None, return_final=True):
    """(out, final state, {name: gradient}) of one call, under fixed random cotangents; without return_final the
    call does not ask for the final state (None, and no gradient from it)."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    result = selective_scan(**leaves, **options, seq_idx=seq_idx, return_final_state=return_final, backend="ref",
                            seq_split=n_seg)
    out, final = result if return_final else (result, None)
    grad_final = grad_final and return_final
    gen = torch.Generator().manual_seed(7)
    final_shape = (*out.shape[:2], inputs["A"].shape[1])  # [batch, D, N]
    cot_out, cot_final = torch.randn(out.shape, generator=gen), torch.randn(final_shape, generator=gen)
    outputs = [t for t, on in ((out, grad_out), (final, grad_final)) if on]
    cots = [c for c, on in ((cot_out, grad_out), (cot_final, grad_final)) if on]
    grads = torch.autograd.grad(outputs, list(leaves.values()), cots, allow_unused=True)
    return out.detach(), None if final is None else final.detach(), {
        k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}  # unused: zeros


CASES = [  # (batch, dim, n_state, length, groups), flags, which outputs get a gradient (out, final state)
    pytest.param((2, 5, 4, 96, 0), {"D": True, "z": True, "bias": True, "softplus": True, "init": True},
                 (True, True), id="all"),
    pytest.param((1, 6, 8, 96, 3), {}, (True, False), id="G3-plain"),
    pytest.param((2, 6, 5, 96, 2), {"z": True, "softplus": True, "init": True}, (True, True), id="G2-z-init"),
    pytest.param((2, 4, 1, 96, 0), {"D": True, "bias": True, "init": True}, (False, True), id="N1-final-only"),
]


@pytest.mark.parametrize("n_seg", [2, 4, 8])
@pytest.mark.parametrize(("shape", "flags", "wanted"), CASES)
def test_split_matches_unsplit(shape, flags, wanted, n_seg):
    """Output, final state and every input's gradient equal the unsplit scan's."""
    *dims, groups = shape
    inputs, options = scan_inputs(*dims, groups, **flags)
    out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1, *wanted)
    out, final, grads = forward_backward(inputs, options, n_seg, *wanted)
    assert_close("out", out, out_ref, TOL)
    assert_close("final_state", final, final_ref, TOL)
    for name in inputs:
        assert_close(f"grad {name}", grads[name], grads_ref[name], TOL)


def test_split_needs_the_carried_states(monkeypatch):
    """Without the cheap passes' states (forward) or adjoints (backward) the results are far off."""
    inputs, options = scan_inputs(2, 5, 4, 96, D=True, z=True, softplus=True, init=True)
    out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1)
    carry_states, carry_adjoints = split_module._carry_states, split_module._carry_adjoints
    monkeypatch.setattr(split_module, "_carry_states",
                        lambda h, f, decay, link=None: carry_states(h, f * 0, decay, link))
    out, final, _ = forward_backward(inputs, options, 4)
    assert rel_err(out, out_ref) > 0.05 and rel_err(final, final_ref) > 0.05
    monkeypatch.setattr(split_module, "_carry_states", carry_states)
    monkeypatch.setattr(split_module, "_carry_adjoints",
                        lambda d, g, decay, link=None: carry_adjoints(d, g * 0, decay, link))
    out, _, grads = forward_backward(inputs, options, 4)
    assert_close("out", out, out_ref, TOL)
    for name in ("u", "delta", "B", "initial_state"):
        assert rel_err(grads[name], grads_ref[name]) > 0.05, name


def document_ids(batch, length, starts):
    """seq_idx [batch, length] int64 with documents starting at `starts` (positions > 0) in row 0 and one position
    later in the other rows (a start on a segment's first token moves to its second)."""
    marks = torch.zeros(batch, length, dtype=torch.int64)
    for row in range(batch):
        marks[row, [p + row for p in starts if p + row < length]] = 1
    return marks.cumsum(1) + 3


L_SEQ = 96  # divisible by every S below
DOCUMENTS = {  # document starts as a function of the segment length T and the row length L
    "no-boundary": lambda T, L: [],
    "at-segment-start": lambda T, L: [T, 2 * T],
    "inside-segment": lambda T, L: [T + T // 2],
    "several-in-one-segment": lambda T, L: [T + 3, T + 7, T + 8, 2 * T - 1],
    "one-token-docs": lambda T, L: [1, 2, T - 1, T, T + 1, L - 1],
    "spanning-3-segments": lambda T, L: [T // 2, 2 * T + T // 2],
    "many": lambda T, L: [5, 11, 17, 29, 30, 47, 48, 50, 64, 71, 72, 90],
}
DOC_CASES = [  # documents, (batch, dim, n_state, groups), flags, which outputs get a gradient, return_final_state
    pytest.param("no-boundary", (2, 5, 4, 0), {"D": True, "z": True, "bias": True, "softplus": True, "init": True},
                 (True, True), True, id="no-boundary-all"),
    pytest.param("at-segment-start", (2, 5, 4, 0), {"init": True}, (True, True), True, id="segment-start-init"),
    pytest.param("at-segment-start", (2, 6, 5, 2), {"D": True, "z": True, "bias": True, "softplus": True},
                 (True, True), True, id="segment-start-G2-all-no-init"),
    pytest.param("inside-segment", (2, 5, 4, 0), {"z": True, "softplus": True, "init": True}, (True, True), True,
                 id="inside-z-init"),
    pytest.param("several-in-one-segment", (2, 5, 4, 0),
                 {"D": True, "z": True, "bias": True, "softplus": True, "init": True}, (True, True), True,
                 id="several-all"),
    pytest.param("one-token-docs", (2, 6, 3, 3), {"D": True, "bias": True, "init": True}, (False, True), True,
                 id="one-token-G3-final-only"),
    pytest.param("spanning-3-segments", (1, 5, 4, 0), {"init": True}, (True, False), False,
                 id="spanning-init-no-final"),
    pytest.param("many", (2, 5, 4, 0), {"D": True, "z": True, "softplus": True, "init": True}, (True, True), True,
                 id="many-init"),
    pytest.param("many", (2, 5, 1, 0), {}, (True, False), False, id="many-N1-plain-no-final"),
]


@pytest.mark.parametrize("n_seg", [2, 3, 4])
@pytest.mark.parametrize(("docs", "shape", "flags", "wanted", "return_final"), DOC_CASES)
def test_split_with_documents_matches_unsplit(docs, shape, flags, wanted, return_final, n_seg):
    """With seq_idx: output, final state and every input's gradient equal the unsplit scan's."""
    batch, dim, n_state, groups = shape
    inputs, options = scan_inputs(batch, dim, n_state, L_SEQ, groups, **flags)
    seq_idx = document_ids(batch, L_SEQ, DOCUMENTS[docs](L_SEQ // n_seg, L_SEQ))
    out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1, *wanted, seq_idx, return_final)
    out, final, grads = forward_backward(inputs, options, n_seg, *wanted, seq_idx, return_final)
    assert_close("out", out, out_ref, TOL)
    if return_final:
        assert_close("final_state", final, final_ref, TOL)
    else:
        assert final is None
    for name in inputs:
        assert_close(f"grad {name}", grads[name], grads_ref[name], TOL)


def _break(monkeypatch, broken):
    """Monkeypatches split.py so that one piece of its seq_idx handling is missing."""
    real = split_module
    if broken == "link-forward":  # the state entering a segment that starts a document is kept
        carry = real._carry_states
        monkeypatch.setattr(real, "_carry_states", lambda h, f, decay, link=None: carry(h, f, decay))
    elif broken == "link-backward":  # the gradient flows back across a document start on a segment's first token
        carry = real._carry_adjoints
        monkeypatch.setattr(real, "_carry_adjoints", lambda d, g, decay, link=None: carry(d, g, decay))
    elif broken == "decay-inside":  # a document start inside a segment does not cut the carried state
        boundaries = real._boundaries
        monkeypatch.setattr(real, "_boundaries", lambda seq: (torch.ones(seq.shape[:2]), boundaries(seq)[1]))
    elif broken in ("final-state-truncation", "entry-adjoint-truncation"):  # a pass ignores seq_idx
        name = "final_states" if broken == "final-state-truncation" else "entry_adjoints"
        ref_pass = getattr(real._Ref, name)
        monkeypatch.setattr(real._Ref, name, staticmethod(lambda *args: ref_pass(*args[:-1])))
    else:  # the full scans over the segment rows do not reset inside them
        forward, backward = real._Ref.forward, real._Ref.backward
        monkeypatch.setattr(real._Ref, "forward", staticmethod(
            lambda args, softplus, h0, seq, *rest: forward(args, softplus, h0, None, *rest)))
        monkeypatch.setattr(real._Ref, "backward", staticmethod(
            lambda args, softplus, h0, seq, *rest: backward(args, softplus, h0, None, *rest)))


BREAKS = {  # what breaks -> whether the forward still holds
    "link-forward": False, "link-backward": True, "decay-inside": False, "final-state-truncation": False,
    "entry-adjoint-truncation": True, "segment-rows-without-seq": False,
}


@pytest.mark.parametrize("broken", list(BREAKS))
def test_split_needs_the_document_boundaries(broken, monkeypatch):
    """With seq_idx, breaking the links, the decays of segments with a document start inside, the passes'
    truncation at document starts or the segment rows' seq_idx makes the results far off (documents start on a
    segment's first token, inside segments, and in one segment twice)."""
    inputs, options = scan_inputs(2, 5, 4, L_SEQ, D=True, z=True, softplus=True, init=True)
    seq_idx = document_ids(2, L_SEQ, [24, 36, 53, 60])  # S = 4: T = 24
    out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1, seq_idx=seq_idx)
    _break(monkeypatch, broken)
    out, final, grads = forward_backward(inputs, options, 4, seq_idx=seq_idx)
    grad_err = max(rel_err(grads[name], grads_ref[name]) for name in inputs)
    assert grad_err > 0.01, grad_err  # each break: 0.04 or more
    if BREAKS[broken]:
        assert_close("out", out, out_ref, TOL)
        assert_close("final_state", final, final_ref, TOL)
    else:
        assert max(rel_err(out, out_ref), rel_err(final, final_ref)) > 0.01


def _in_place_reference(monkeypatch):
    """Makes the reference pieces take the CUDA kernel's in-place layout (_InPlace: whole rows, the kernel scans
    their n_seg segments itself): the emulated kernel cuts the rows, runs the reference per segment row and
    returns whole rows (states per segment row), as the kernel's nseg contract says."""
    real = split_module
    forward, backward = real._Ref.forward, real._Ref.backward
    per_row = (0, 1, 3, 4, 6)  # u, delta, B, C, z: [batch, ..., L]; A, D, delta_bias are shared

    def cut(args, n_seg):
        return tuple(real._cut(t, n_seg, None) if i in per_row and t is not None else t for i, t in enumerate(args))

    def fwd(args, softplus, h0, seq, save, n_seg):
        batch = args[0].shape[0]
        out, final, saved = forward(cut(args, n_seg), softplus, h0, real._cut(seq, n_seg, None), save, 1)
        return real._uncut(out, batch, out.dtype), final, saved

    def bwd(args, softplus, h0, seq, saved, dout, dfinal, need_dh0, n_seg):
        batch = args[0].shape[0]
        grads = backward(cut(args, n_seg), softplus, h0, real._cut(seq, n_seg, None), saved,
                         real._cut(dout, n_seg, None), dfinal, need_dh0, 1)
        return tuple(real._uncut(g, batch, g.dtype) if i in per_row and g is not None else g
                     for i, g in enumerate(grads))

    monkeypatch.setattr(real._Ref, "strided", staticmethod(lambda seg_len: True))
    monkeypatch.setattr(real._Ref, "forward", staticmethod(fwd))
    monkeypatch.setattr(real._Ref, "backward", staticmethod(bwd))


@pytest.mark.parametrize("n_seg", [2, 4])
@pytest.mark.parametrize("docs", ["no-boundary", "at-segment-start", "many"])
def test_split_in_place_layout_matches_unsplit(docs, n_seg, monkeypatch):
    """The CUDA path's layout (no segment-row copies: the passes read strided views of the whole rows, the kernel
    scans the segments in place), with the kernel's contract emulated on the reference: results and every
    gradient equal the unsplit scan's, grouped B/C and seq_idx included."""
    inputs, options = scan_inputs(2, 6, 5, L_SEQ, 2, D=True, z=True, bias=True, softplus=True, init=True)
    seq_idx = document_ids(2, L_SEQ, DOCUMENTS[docs](L_SEQ // n_seg, L_SEQ))
    out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1, seq_idx=seq_idx)
    calls = []
    _in_place_reference(monkeypatch)
    layout = split_module._InPlace
    monkeypatch.setattr(split_module, "_InPlace", lambda *a: calls.append(a) or layout(*a))
    out, final, grads = forward_backward(inputs, options, n_seg, seq_idx=seq_idx)
    assert calls == [(2, n_seg)]  # the in-place layout ran
    assert_close("out", out, out_ref, TOL)
    assert_close("final_state", final, final_ref, TOL)
    for name in inputs:
        assert_close(f"grad {name}", grads[name], grads_ref[name], TOL)


def test_in_place_layout_needs_the_carried_states(monkeypatch):
    """The in-place layout's passes must read the right segments: a view that mixed them up (here: the segments
    of the passes reversed) breaks the result, so the test above cannot pass vacuously."""
    inputs, options = scan_inputs(1, 5, 4, L_SEQ, 0, init=True)
    out_ref, _, _ = forward_backward(inputs, options, 1)
    _in_place_reference(monkeypatch)
    segments = split_module._InPlace.segments
    monkeypatch.setattr(split_module._InPlace, "segments",
                        lambda self, rows: None if rows is None else segments(self, rows).flip(1))
    out, _, _ = forward_backward(inputs, options, 4)
    assert rel_err(out, out_ref) > 0.01


def test_segment_rows_are_contiguous():
    """The CUDA kernel and the Triton passes need contiguous segment rows; at batch 1 a view could pass for one."""
    u = torch.randn(1, 3, 8)
    rows = split_module._cut(u, 4, torch.float16)
    assert rows.shape == (4, 3, 2) and rows.dtype == torch.float16 and rows.is_contiguous()
    assert torch.equal(split_module._uncut(rows, 1, torch.float32), u.half().float())


def test_split_runs_eagerly_under_torch_compile():
    """split_scan is excluded from dynamo (host loops, Triton passes, the extension): a compiled caller gets the
    split's results and gradients, equal to the unsplit scan's."""
    torch.manual_seed(0)
    u = torch.randn(1, 8, 64, requires_grad=True)
    delta, A, B, C = torch.randn(1, 8, 64), -torch.rand(8, 4), torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    ref = selective_scan(u, delta, A, B, C, delta_softplus=True, backend="ref")
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), u)
    compiled = torch.compile(lambda x: selective_scan(x, delta, A, B, C, delta_softplus=True, backend="ref",
                                                      seq_split=4))
    out = compiled(u)
    (grad,) = torch.autograd.grad(out.square().sum(), u)
    assert_close("out", out, ref, 1e-5)
    assert_close("du", grad, grad_ref, 1e-5)


def test_split_passes_in_the_interpreter():
    pytest.importorskip("triton")
    run_in_interpreter(__file__)


def _interpreter_main() -> None:
    """The Triton passes against the torch passes (fp32, fp16, bf16; grouped B/C, N padded, partial chunks; with
    seq_idx in fp32: document starts on a chunk's first step, a segment's first, second and last), then the whole
    split on the reference scans with the Triton passes in place of the torch ones, without and with seq_idx."""
    from zoo_kernels.selective_scan import split_passes

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for batch, n_seg, dim, groups, n_state, seg_len, bias, softplus, z, starts in (
                (2, 3, 6, 3, 5, 40, True, True, True, [32, 40, 45, 79, 81, 113, 114]),
                (1, 2, 8, 1, 16, 33, False, False, False, [64, 65])):
            rnd = lambda *shape: torch.randn(*shape, generator=gen)
            u, dout = rnd(batch, n_seg, dim, seg_len).to(dtype), rnd(batch, n_seg, dim, seg_len).to(dtype)
            delta = (rnd(batch, n_seg, dim, seg_len) - 2 if softplus
                     else torch.rand(batch, n_seg, dim, seg_len, generator=gen) * 0.3).to(dtype)
            A = -(torch.rand(dim, n_state, generator=gen) + 0.1)
            B, C = (rnd(batch, n_seg, groups, n_state, seg_len).to(dtype) for _ in range(2))
            delta_bias = rnd(dim) * 0.1 if bias else None
            gate = rnd(batch, n_seg, dim, seg_len).to(dtype) if z else None
            seq = document_ids(batch, n_seg * seg_len, starts).view(batch, n_seg, seg_len)
            for seq_idx in (None, seq, seq.int()) if dtype == torch.float32 else (None,):
                for name, ours, ref in (
                        ("final_states",
                         split_passes.final_states(u, delta, A, B, delta_bias, softplus, 0, n_seg - 1, seq_idx),
                         split_module.final_states_ref(u, delta, A, B, delta_bias, softplus, 0, n_seg - 1, seq_idx)),
                        ("entry_adjoints",
                         split_passes.entry_adjoints(dout, gate, delta, A, C, delta_bias, softplus, 1, n_seg - 1,
                                                     seq_idx),
                         split_module.entry_adjoints_ref(dout, gate, delta, A, C, delta_bias, softplus, 1, n_seg - 1,
                                                         seq_idx))):
                    for what, a, b in zip(("state", "decay sum"), ours, ref):
                        assert rel_err(a, b) < 1e-5, (name, what, dtype, seq_idx is not None, rel_err(a, b))
    print("interpreter: split passes match the torch passes")
    split_module._Ref.final_states = staticmethod(split_passes.final_states)
    split_module._Ref.entry_adjoints = staticmethod(split_passes.entry_adjoints)
    for length, n_seg, seq_idx in ((64, 4, None), (96, 2, document_ids(2, 96, [20, 32, 48, 60, 95]))):
        inputs, options = scan_inputs(2, 6, 5, length, 2, D=True, z=True, bias=True, softplus=True, init=True)
        out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1, seq_idx=seq_idx)
        out, final, grads = forward_backward(inputs, options, n_seg, seq_idx=seq_idx)
        assert rel_err(out, out_ref) < TOL and rel_err(final, final_ref) < TOL
        for name in inputs:
            assert rel_err(grads[name], grads_ref[name]) < TOL, (name, rel_err(grads[name], grads_ref[name]))
    print("interpreter: the split with the Triton passes matches the unsplit scan, without and with seq_idx")



def test_document_cache_follows_seq_idx():
    """The split keeps the last seq_idx's boundaries for the next layer; a seq_idx changed in place, or a new one,
    must not reuse them (results equal the unsplit scan's each time)."""
    inputs, options = scan_inputs(2, 5, 4, L_SEQ, 0, init=True)
    seq_idx = document_ids(2, L_SEQ, DOCUMENTS["at-segment-start"](L_SEQ // 4, L_SEQ))
    for change in ("same", "in-place", "new"):
        if change == "in-place":
            seq_idx.copy_(document_ids(2, L_SEQ, DOCUMENTS["many"](L_SEQ // 4, L_SEQ)))
        elif change == "new":
            seq_idx = document_ids(2, L_SEQ, DOCUMENTS["inside-segment"](L_SEQ // 4, L_SEQ))
        out_ref, _, _ = forward_backward(inputs, options, 1, seq_idx=seq_idx)
        out, _, _ = forward_backward(inputs, options, 4, seq_idx=seq_idx)
        assert_close(f"out ({change})", out, out_ref, TOL)


if __name__ == "__main__":
    patch_triton_interpreter()
    _interpreter_main()
