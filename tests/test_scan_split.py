"""The split selective scan (zoo_kernels.selective_scan.split: cheap passes, one full fwd and bwd per segment row)
against the unsplit scan, on the reference pieces; its Triton passes against their torch reference.

The CPU cases use slowly decaying states (small Δ, A in -1..-0.1) so that a segment keeps most of the state
entering it: dropping the carried states or adjoints must break the result (checked), so the equality cannot
hold vacuously. The Triton passes run through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be
set before triton is imported); the CUDA kernel's split is tested in tests/test_selective_scan_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rel_err, run_in_interpreter
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


def forward_backward(inputs, options, n_seg, grad_out=True, grad_final=True):
    """(out, final state, {name: gradient}) of one call, under fixed random cotangents."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, final = selective_scan(**leaves, **options, return_final_state=True, backend="ref", seq_split=n_seg)
    gen = torch.Generator().manual_seed(7)
    cot_out, cot_final = torch.randn(out.shape, generator=gen), torch.randn(final.shape, generator=gen)
    outputs = [t for t, on in ((out, grad_out), (final, grad_final)) if on]
    cots = [c for c, on in ((cot_out, grad_out), (cot_final, grad_final)) if on]
    grads = torch.autograd.grad(outputs, list(leaves.values()), cots, allow_unused=True)
    return out.detach(), final.detach(), {k: torch.zeros_like(v) if g is None else g  # C, D, z: not in the final
                                          for (k, v), g in zip(leaves.items(), grads)}


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
    monkeypatch.setattr(split_module, "_carry_states", lambda h, f, decay: carry_states(h, f * 0, decay))
    out, final, _ = forward_backward(inputs, options, 4)
    assert rel_err(out, out_ref) > 0.05 and rel_err(final, final_ref) > 0.05
    monkeypatch.setattr(split_module, "_carry_states", carry_states)
    monkeypatch.setattr(split_module, "_carry_adjoints", lambda d, g, decay: carry_adjoints(d, g * 0, decay))
    out, _, grads = forward_backward(inputs, options, 4)
    assert_close("out", out, out_ref, TOL)
    for name in ("u", "delta", "B", "initial_state"):
        assert rel_err(grads[name], grads_ref[name]) > 0.05, name


def test_segment_rows_are_contiguous():
    """The CUDA kernel and the Triton passes need contiguous segment rows; at batch 1 a view could pass for one."""
    u = torch.randn(1, 3, 8)
    rows = split_module._cut(u, 4, torch.float16)
    assert rows.shape == (4, 3, 2) and rows.dtype == torch.float16 and rows.is_contiguous()
    assert torch.equal(split_module._uncut(rows, 1, torch.float32), u.half().float())


def test_split_passes_in_the_interpreter():
    pytest.importorskip("triton")
    run_in_interpreter(__file__)


def _interpreter_main() -> None:
    """The Triton passes against the torch passes (fp32, fp16, bf16; grouped B/C, N padded, partial chunks), then
    the whole split on the reference scans with the Triton passes in place of the torch ones."""
    from zoo_kernels.selective_scan import split_passes

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for batch, n_seg, dim, groups, n_state, seg_len, bias, softplus, z in (
                (2, 3, 6, 3, 5, 40, True, True, True), (1, 2, 8, 1, 16, 33, False, False, False)):
            rnd = lambda *shape: torch.randn(*shape, generator=gen)
            u, dout = rnd(batch, n_seg, dim, seg_len).to(dtype), rnd(batch, n_seg, dim, seg_len).to(dtype)
            delta = (rnd(batch, n_seg, dim, seg_len) - 2 if softplus
                     else torch.rand(batch, n_seg, dim, seg_len, generator=gen) * 0.3).to(dtype)
            A = -(torch.rand(dim, n_state, generator=gen) + 0.1)
            B, C = (rnd(batch, n_seg, groups, n_state, seg_len).to(dtype) for _ in range(2))
            delta_bias = rnd(dim) * 0.1 if bias else None
            gate = rnd(batch, n_seg, dim, seg_len).to(dtype) if z else None
            for name, ours, ref in (
                    ("final_states", split_passes.final_states(u, delta, A, B, delta_bias, softplus, 0, n_seg - 1),
                     split_module.final_states_ref(u, delta, A, B, delta_bias, softplus, 0, n_seg - 1)),
                    ("entry_adjoints",
                     split_passes.entry_adjoints(dout, gate, delta, A, C, delta_bias, softplus, 1, n_seg - 1),
                     split_module.entry_adjoints_ref(dout, gate, delta, A, C, delta_bias, softplus, 1, n_seg - 1))):
                for what, a, b in zip(("state", "decay sum"), ours, ref):
                    assert rel_err(a, b) < 1e-5, (name, what, dtype, rel_err(a, b))
    print("interpreter: split passes match the torch passes")
    split_module._Ref.final_states = staticmethod(split_passes.final_states)
    split_module._Ref.entry_adjoints = staticmethod(split_passes.entry_adjoints)
    inputs, options = scan_inputs(2, 6, 5, 64, 2, D=True, z=True, bias=True, softplus=True, init=True)
    out_ref, final_ref, grads_ref = forward_backward(inputs, options, 1)
    out, final, grads = forward_backward(inputs, options, 4)
    assert rel_err(out, out_ref) < TOL and rel_err(final, final_ref) < TOL
    for name in inputs:
        assert rel_err(grads[name], grads_ref[name]) < TOL, (name, rel_err(grads[name], grads_ref[name]))
    print("interpreter: the split with the Triton passes matches the unsplit scan")


if __name__ == "__main__":
    _interpreter_main()
