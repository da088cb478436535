"""The pure-PyTorch references of zoo_kernels against plain per-token loops, and against themselves.

Each reference (called through its dispatcher with backend="ref", which also pins the positional argument
order) is compared with a sequential fp64 loop written here: outputs, final states and the gradients of
every input under random upstream gradients on both. Then, per op: packing documents with seq_idx equals
running them separately, a sequence run in pieces with the state carried equals one run (gradients
included), and stepping the *_state_update function through a sequence equals the scan.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from zoo_kernels import (
    causal_conv1d,
    causal_conv1d_update,
    chunk_gla,
    gla_state_update,
    selective_scan,
    selective_state_update,
    ssd_chunk_scan,
    ssd_state_update,
)
from zoo_kernels.selective_scan import ref as selective_scan_ref_module
from zoo_kernels.selective_scan.ref import linear_scan

TOL = 1e-4  # fp32 reference vs fp64 loop; a wrong formula gives errors of order 1


# ----------------------------------------------------------------------------------------------------------
# Sequential oracles (one token at a time, fp64)


def document_ids(seq_idx: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """0 for the first document of each row, +1 at every change of seq_idx."""
    if seq_idx is None:
        return torch.zeros(batch, length, dtype=torch.long)
    changes = torch.zeros(batch, length, dtype=torch.long)
    changes[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return changes.cumsum(1)


def reset_mask(seq_idx: torch.Tensor | None, t: int, batch: int) -> torch.Tensor:
    """[batch] 1.0 where the state carries into position t, 0.0 where a new document starts at t."""
    if seq_idx is None or t == 0:
        return torch.ones(batch, dtype=torch.float64)
    return (seq_idx[:, t] == seq_idx[:, t - 1]).double()


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, seq_idx=None):
    batch, dim, length = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B = B[:, None] if B.dim() == 3 else B.repeat_interleave(dim // B.shape[1], dim=1)  # (b, D or 1, N, L)
    C = C[:, None] if C.dim() == 3 else C.repeat_interleave(dim // C.shape[1], dim=1)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        h = h * reset_mask(seq_idx, t, batch)[:, None, None]
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def ssd_loop(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
             seq_idx=None):
    batch, length, n_heads, head_dim = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.repeat_interleave(n_heads // B.shape[2], dim=2)  # (b, L, H, N)
    C = C.repeat_interleave(n_heads // C.shape[2], dim=2)
    h = x.new_zeros(batch, n_heads, head_dim, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        h = h * reset_mask(seq_idx, t, batch)[:, None, None, None]
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h
        h = h + (x[:, t] * dt[:, t, :, None])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, h


def gla_loop(q, k, v, g, scale=None, initial_state=None, seq_idx=None):
    batch, length, n_heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    S = q.new_zeros(batch, n_heads, key_dim, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(length):
        S = S * reset_mask(seq_idx, t, batch)[:, None, None, None]
        S = torch.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


def conv1d_loop(x, weight, bias=None, seq_idx=None, initial_state=None, activation=None):
    batch, dim, length = x.shape
    width = weight.shape[1]
    history = x.new_zeros(batch, dim, width - 1) if initial_state is None else initial_state
    doc = document_ids(seq_idx, batch, length)

    def tap(j: int, t: int) -> torch.Tensor:
        """Input at time j as seen from position t (zero from another document)."""
        value = x[:, :, j] if j >= 0 else history[:, :, width - 1 + j]
        same = (doc[:, max(j, 0)] if j >= 0 else torch.zeros(batch, dtype=torch.long)) == doc[:, t]
        return value * same[:, None].double()

    ys = []
    for t in range(length):
        y = sum(weight[:, w] * tap(t - width + 1 + w, t) for w in range(width))
        ys.append(y if bias is None else y + bias)
    y = torch.stack(ys, dim=-1)
    if activation is not None:
        y = F.silu(y)
    final = [tap(length - width + 1 + w, length - 1) for w in range(width - 1)]
    final = torch.stack(final, dim=-1) if final else x.new_zeros(batch, dim, 0)
    return y, final


# ----------------------------------------------------------------------------------------------------------
# The ops under test, called through the dispatchers (keywords in, positional into the reference)


def run_selective_scan(**kw):
    return selective_scan(**kw, return_final_state=True, backend="ref")


def run_ssd(**kw):
    return ssd_chunk_scan(**kw, return_final_state=True, backend="ref")


def run_gla(**kw):
    return chunk_gla(**kw, return_final_state=True, backend="ref")


def run_conv1d(**kw):
    return causal_conv1d(**kw, return_final_state=True, backend="ref")


# ----------------------------------------------------------------------------------------------------------
# Inputs


def make_seq_idx(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random documents per row; the last row reuses ids (0, 1, 0, ...) since only changes matter."""
    seq_idx = torch.zeros(batch, length, dtype=torch.int32)
    for b in range(batch):
        cuts = sorted(set(torch.randint(1, max(length, 2), (3,), generator=gen).tolist()))
        for n, cut in enumerate(cuts):
            seq_idx[b, cut:] = (n + 1) % 2 if b == batch - 1 else n + 1
    return seq_idx


def selective_scan_inputs(batch, dim, n_state, length, groups=0, *, D=False, z=False, bias=False,
                          softplus=False, init=False, strong=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    bc_shape = (batch, groups, n_state, length) if groups else (batch, n_state, length)
    inputs = {
        "u": rnd(batch, dim, length),
        # Raw Δ before softplus, or directly a positive Δ up to 1 (decays down to exp(-5) per step).
        "delta": rnd(batch, dim, length) - 1 if softplus else torch.rand(batch, dim, length, generator=gen,
                                                                         dtype=torch.float64),
        # Down to -5 per unit Δ; `strong` makes it -250, far past fp32's exp range over a chunk.
        "A": -torch.rand(dim, n_state, generator=gen, dtype=torch.float64) * (250 if strong else 5),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim) if D else None,
        "z": rnd(batch, dim, length) if z else None,
        "delta_bias": rnd(dim) * 0.5 if bias else None,
        "initial_state": rnd(batch, dim, n_state) if init else None,
    }
    return {k: v for k, v in inputs.items() if v is not None}, {"delta_softplus": softplus}


def ssd_inputs(batch, length, n_heads, head_dim, groups, n_state, *, chunk_size=64, D=None, z=False,
               bias=False, softplus=False, init=False, strong=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    inputs = {
        "x": rnd(batch, length, n_heads, head_dim),
        "dt": rnd(batch, length, n_heads) - 1 if softplus else torch.rand(batch, length, n_heads,
                                                                          generator=gen, dtype=torch.float64),
        "A": -torch.rand(n_heads, generator=gen, dtype=torch.float64) * (250 if strong else 5),
        "B": rnd(batch, length, groups, n_state),
        "C": rnd(batch, length, groups, n_state),
        "D": None if D is None else rnd(n_heads) if D == "h" else rnd(n_heads, head_dim),
        "z": rnd(batch, length, n_heads, head_dim) if z else None,
        "dt_bias": rnd(n_heads) * 0.5 if bias else None,
        "initial_state": rnd(batch, n_heads, head_dim, n_state) if init else None,
    }
    options = {"dt_softplus": softplus, "chunk_size": chunk_size}
    return {k: v for k, v in inputs.items() if v is not None}, options


def gla_inputs(batch, length, n_heads, key_dim, value_dim, *, chunk_size=64, g_min=-1.0, init=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    inputs = {
        "q": rnd(batch, length, n_heads, key_dim),
        "k": rnd(batch, length, n_heads, key_dim),
        "v": rnd(batch, length, n_heads, value_dim),
        "g": torch.rand(batch, length, n_heads, key_dim, generator=gen, dtype=torch.float64) * g_min,
        "initial_state": rnd(batch, n_heads, key_dim, value_dim) if init else None,
    }
    return {k: v for k, v in inputs.items() if v is not None}, {"chunk_size": chunk_size}


def conv1d_inputs(batch, dim, length, width, *, bias=False, activation=None, init=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    inputs = {
        "x": rnd(batch, dim, length),
        "weight": rnd(dim, width),
        "bias": rnd(dim) if bias else None,
        "initial_state": rnd(batch, dim, width - 1) if init else None,
    }
    return {k: v for k, v in inputs.items() if v is not None}, {"activation": activation}


# ----------------------------------------------------------------------------------------------------------
# Comparison machinery


def leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}


def forward_backward(fn: Callable, inputs: dict[str, torch.Tensor], options: dict, cotangents=None,
                     seed: int = 123):
    """(out, final_state, {name: grad}, cotangents) for loss = Σ out·g_out + Σ final_state·g_state."""
    out, final_state = fn(**inputs, **options)
    if cotangents is None:
        gen = torch.Generator().manual_seed(seed)
        cotangents = (torch.randn(out.shape, generator=gen, dtype=torch.float64),
                      torch.randn(final_state.shape, generator=gen, dtype=torch.float64))
    loss = (out * cotangents[0].to(out.dtype)).sum()
    loss = loss + (final_state * cotangents[1].to(final_state.dtype)).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return out.detach(), final_state.detach(), dict(zip(inputs, grads)), cotangents


def check_against_loop(op: Callable, loop: Callable, inputs: dict, options: dict, seq_idx=None, tol=TOL):
    """Reference (fp32) vs sequential loop (fp64): output, final state and every input's gradient."""
    loop_options = {k: v for k, v in options.items() if k != "chunk_size"}
    out_ref, state_ref, grads_ref, cot = forward_backward(loop, leaves(inputs, torch.float64),
                                                          {**loop_options, "seq_idx": seq_idx})
    out, state, grads, _ = forward_backward(op, leaves(inputs, torch.float32),
                                            {**options, "seq_idx": seq_idx}, cot)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert_close("out", out, out_ref, tol)
    assert_close("final_state", state, state_ref, tol)
    for name in inputs:
        assert_close(f"grad {name}", grads[name], grads_ref[name], tol)


# ----------------------------------------------------------------------------------------------------------
# Mamba-1 selective scan

SELECTIVE_SCAN_CASES = [
    pytest.param((1, 3, 1, 1), {}, id="L1-D3-N1"),
    pytest.param((2, 5, 4, 7), {"D": True, "z": True}, id="L7-D5-N4-D-z"),
    pytest.param((2, 6, 16, 33), {"groups": 3, "bias": True, "softplus": True, "init": True},
                 id="L33-D6-N16-G3-bias-softplus-init"),
    pytest.param((1, 5, 64, 130), {"D": True, "init": True}, id="L130-D5-N64-D-init"),
    pytest.param((2, 7, 8, 130), {"D": True, "z": True, "bias": True, "softplus": True, "init": True},
                 id="L130-D7-N8-all"),
    pytest.param((2, 4, 3, 70), {"init": True, "strong": True}, id="L70-D4-N3-strong-decay"),
]


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize(("shape", "flags"), SELECTIVE_SCAN_CASES)
def test_selective_scan_matches_loop(shape, flags, seq):
    batch, dim, n_state, length = shape
    inputs, options = selective_scan_inputs(batch, dim, n_state, length, **flags)
    seq_idx = make_seq_idx(batch, length, torch.Generator().manual_seed(1)) if seq else None
    check_against_loop(run_selective_scan, selective_scan_loop, inputs, options, seq_idx)


@pytest.mark.parametrize("n_seg", [2, 4, 8])
@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
def test_selective_scan_seq_split_matches_loop(n_seg, seq):
    """Rows cut into segments (split.py, what seq_split runs) give the unsplit results and gradients, document
    boundaries inside a segment and on a segment's first position included."""
    batch, dim, n_state, length = 2, 5, 8, 96
    inputs, options = selective_scan_inputs(batch, dim, n_state, length, groups=1, D=True, z=True, bias=True,
                                            softplus=True, init=True, seed=3)
    seq_idx = None
    if seq:
        seq_idx = make_seq_idx(batch, length, torch.Generator().manual_seed(2))
        seg_len = length // n_seg
        seq_idx[0, seg_len:] += 5  # a document starts exactly where the second segment does
    run = lambda **kw: selective_scan(**kw, return_final_state=True, backend="ref", seq_split=n_seg)
    check_against_loop(run, selective_scan_loop, inputs, options, seq_idx)


def test_selective_scan_seq_split_choice(monkeypatch):
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")  # the package: zoo_kernels.selective_scan is the op
    x = torch.zeros(1, 4, 6)
    with pytest.raises(ValueError, match="does not divide"):
        ss.selective_scan(x, x, torch.zeros(4, 2), torch.zeros(1, 2, 6), torch.zeros(1, 2, 6), backend="ref",
                          seq_split=4)
    with pytest.raises(ValueError, match="seq_split"):
        ss.selective_scan(x, x, torch.zeros(4, 2), torch.zeros(1, 2, 6), torch.zeros(1, 2, 6), backend="ref",
                          seq_split=0)
    assert ss._resolve_seq_split(None, 16384) == 1  # off unless asked for
    monkeypatch.setenv(ss.SEQ_SPLIT_ENV, "8")
    assert ss._resolve_seq_split(None, 16384) == 8
    assert ss._resolve_seq_split(2, 16384) == 2  # an explicit argument wins


def test_selective_scan_env_split_skips_lengths_it_does_not_divide(monkeypatch):
    """$ZOO_SCAN_SEQ_SPLIT=4 (README: forces S) made every call whose length 4 does not divide raise "seq_split=4 does
    not divide the sequence length 37", an argument the caller never passed: a Mamba prompt of 37 tokens, on CPU
    too. The split is exact, so such a call runs unsplit; a value that is no positive int names the variable."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    inputs, options = selective_scan_inputs(1, 4, 3, 37, D=True, init=True)
    inputs = {k: v.float() for k, v in inputs.items()}
    monkeypatch.delenv(ss.SEQ_SPLIT_ENV, raising=False)
    expected = selective_scan(**inputs, **options, backend="ref")
    monkeypatch.setenv(ss.SEQ_SPLIT_ENV, "4")
    assert_close("out", selective_scan(**inputs, **options, backend="ref"), expected, 1e-6)
    assert ss._resolve_seq_split(None, 36) == 4 and ss._resolve_seq_split(None, 37) == 1
    with pytest.raises(ValueError, match="does not divide"):  # an explicit argument is still refused
        selective_scan(**inputs, **options, backend="ref", seq_split=4)
    for bad in ("four", "0", "-2"):
        monkeypatch.setenv(ss.SEQ_SPLIT_ENV, bad)
        with pytest.raises(ValueError, match=rf"ZOO_SCAN_SEQ_SPLIT='{bad}': expected a positive int"):
            selective_scan(**inputs, **options, backend="ref")


def test_selective_scan_auto_split_follows_the_measured_rule(monkeypatch):
    """Default S = 4 on CUDA only for rows >= 8192 whose batch x ⌈D/16⌉ blocks are at most 1.5x the SMs (measured
    on 132 SMs: 96, 128 and 192 blocks gain, 768 lose); $ZOO_SCAN_SEQ_SPLIT overrides it."""
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    monkeypatch.setattr(ss, "sm_count", lambda device: 132)
    monkeypatch.delenv(ss.SEQ_SPLIT_ENV, raising=False)
    u = lambda b, d, L: torch.empty(b, d, L, device="meta")  # noqa: E731
    assert ss._resolve_seq_split(None, 16384, u(1, 1536, 16384), "cuda") == 4  # 96 blocks
    assert ss._resolve_seq_split(None, 16384, u(1, 2048, 16384), "cuda") == 4  # 128 blocks
    assert ss._resolve_seq_split(None, 8192, u(2, 1536, 8192), "cuda") == 4  # 192 blocks
    assert ss._resolve_seq_split(None, 8192, u(3, 1536, 8192), "cuda") == 1  # 288 blocks
    assert ss._resolve_seq_split(None, 16384, u(8, 1536, 16384), "cuda") == 1  # 768 blocks
    assert ss._resolve_seq_split(None, 4096, u(1, 1536, 4096), "cuda") == 1  # short rows
    assert ss._resolve_seq_split(None, 16384, u(1, 1536, 16384), "ref") == 1  # the reference: never
    monkeypatch.setenv(ss.SEQ_SPLIT_ENV, "1")
    assert ss._resolve_seq_split(None, 16384, u(1, 1536, 16384), "cuda") == 1


def test_selective_scan_channel_blocks(monkeypatch):
    """Small chunks and channel blocks inside B/C groups (as used at large sizes) give the same result."""
    monkeypatch.setattr(selective_scan_ref_module, "CHUNK_SIZE", 8)
    monkeypatch.setattr(selective_scan_ref_module, "BLOCK_ELEMENTS", 2 * 8 * 4 * 2)  # 2 channels a block
    inputs, options = selective_scan_inputs(2, 9, 4, 29, groups=3, D=True, init=True, softplus=True)
    seq_idx = make_seq_idx(2, 29, torch.Generator().manual_seed(2))
    check_against_loop(run_selective_scan, selective_scan_loop, inputs, options, seq_idx)


# Wrong shapes the reference broadcast into wrong numbers (or crashed on obscurely) where the CUDA kernel refuses
# them: (argument, its wrong value from the valid inputs of selective_scan_inputs(2, 4, 3, 10, all on))
SCAN_BAD_SHAPES = {
    "delta_length_1": ("delta", lambda t: t["delta"][..., :1]),
    "delta_batch_1": ("delta", lambda t: t["delta"][:1]),
    "B_length_1": ("B", lambda t: t["B"][..., :1]),
    "B_batch_1": ("B", lambda t: t["B"][:1]),
    "C_batch_1": ("C", lambda t: t["C"][:1]),
    "z_batch_1": ("z", lambda t: t["z"][:1]),
    "D_size_1": ("D", lambda t: t["D"][:1]),
    "delta_bias_size_1": ("delta_bias", lambda t: t["delta_bias"][:1]),
    "initial_state_batch_1": ("initial_state", lambda t: t["initial_state"][:1]),
    "initial_state_D_1": ("initial_state", lambda t: t["initial_state"][:, :1]),
    "seq_idx_batch_1": ("seq_idx", lambda t: torch.zeros(1, 10, dtype=torch.long)),
    "A_rows_1": ("A", lambda t: t["A"][:1]),
    "B_constant_D_N": ("B", lambda t: t["B"][0, :, 0].expand(4, 3)),  # mamba_ssm's non-selective B
}


@pytest.mark.parametrize("seq_split", [None, 2])
@pytest.mark.parametrize("case", list(SCAN_BAD_SHAPES))
def test_selective_scan_ref_refuses_wrong_shapes_naming_them(case, seq_split):
    """The reference (and its split path) refuses what the CUDA kernel refuses, naming the argument, instead of
    broadcasting it: a delta of length 1 gave an output with no recurrence at all, a B of batch 1 every row's B."""
    inputs, options = selective_scan_inputs(2, 4, 3, 10, D=True, z=True, bias=True, init=True)
    inputs = {k: v.float() for k, v in inputs.items()}
    inputs["seq_idx"] = torch.zeros(2, 10, dtype=torch.long)
    name, bad = SCAN_BAD_SHAPES[case]
    inputs[name] = bad(inputs)
    with pytest.raises(ValueError, match=rf"^selective_scan: (B and C must|{name} has shape|{name} must be)"):
        selective_scan(**inputs, **options, backend="ref", seq_split=seq_split)


@pytest.mark.parametrize("backend", ["ref", "cuda", "auto"], ids=["ref", "kernel", "auto"])
def test_selective_scan_names_a_u_of_other_rank(backend):
    """A u without its batch dimension ([D, L]) failed with a bare IndexError (the split's choice read u.shape[2])."""
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"^selective_scan: u must be \[batch, D, L\], got \(4, 8\)"):
        selective_scan(x, x, torch.zeros(4, 2), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), backend=backend)


def test_selective_scan_ref_takes_b_and_c_in_either_ungrouped_form():
    """B [batch, 1, N, L] with C [batch, N, L] (the CUDA kernel takes the pair) equals both in one form."""
    inputs, options = selective_scan_inputs(2, 4, 3, 10, D=True)
    inputs = {k: v.float() for k, v in inputs.items()}
    expected = selective_scan(**inputs, **options, backend="ref")
    mixed = selective_scan(**{**inputs, "B": inputs["B"][:, None]}, **options, backend="ref")
    assert_close("out", mixed, expected, 1e-6)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 64, 100])
def test_linear_scan(length):
    a = torch.rand(2, length, 3, dtype=torch.float64)
    b = torch.randn(2, length, 3, dtype=torch.float64)
    h, expected = torch.zeros(2, 3, dtype=torch.float64), []
    for t in range(length):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    assert_close("linear_scan", linear_scan(a, b), torch.stack(expected, dim=1), 1e-12)


def test_linear_scan_gradients():
    a = torch.rand(1, 7, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b))


# ----------------------------------------------------------------------------------------------------------
# Mamba-2 SSD

SSD_CASES = [
    pytest.param((1, 1, 2, 3, 1, 1), {}, id="L1-H2-P3-N1"),
    pytest.param((2, 7, 3, 4, 1, 8), {"chunk_size": 4, "D": "h", "z": True}, id="L7-H3-P4-N8-chunk4-D-z"),
    pytest.param((2, 33, 4, 5, 2, 16), {"chunk_size": 8, "D": "hp", "bias": True, "softplus": True,
                                        "init": True}, id="L33-H4-P5-G2-N16-chunk8-Dhp-bias-softplus-init"),
    pytest.param((1, 130, 2, 3, 1, 64), {"chunk_size": 32, "init": True}, id="L130-H2-P3-N64-chunk32-init"),
    pytest.param((2, 130, 6, 3, 3, 5), {"D": "h", "z": True, "bias": True, "softplus": True, "init": True},
                 id="L130-H6-P3-G3-N5-chunk64-all"),
    pytest.param((2, 70, 3, 2, 1, 4), {"chunk_size": 16, "init": True, "strong": True},
                 id="L70-H3-chunk16-strong-decay"),
]


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize(("shape", "flags"), SSD_CASES)
def test_ssd_matches_loop(shape, flags, seq):
    batch, length = shape[:2]
    inputs, options = ssd_inputs(*shape, **flags)
    seq_idx = make_seq_idx(batch, length, torch.Generator().manual_seed(1)) if seq else None
    check_against_loop(run_ssd, ssd_loop, inputs, options, seq_idx)


# ----------------------------------------------------------------------------------------------------------
# GLA

GLA_CASES = [
    pytest.param((1, 1, 1, 4, 3), {}, id="L1-H1-K4-V3"),
    pytest.param((2, 7, 2, 5, 6), {"init": True}, id="L7-H2-K5-V6-init"),
    pytest.param((2, 33, 2, 8, 4), {"chunk_size": 16, "init": True}, id="L33-K8-V4-chunk16-init"),
    pytest.param((1, 130, 1, 16, 8), {"chunk_size": 64, "g_min": -5.0, "init": True},
                 id="L130-K16-V8-chunk64-g5-init"),
    pytest.param((2, 130, 2, 6, 5), {"chunk_size": 40, "g_min": -30.0}, id="L130-K6-V5-chunk40-g30"),
    pytest.param((1, 45, 3, 4, 4), {"chunk_size": 20, "init": True}, id="L45-H3-chunk20-sub10-init"),
    pytest.param((2, 33, 2, 4, 3), {"chunk_size": 16, "g_min": 0.0, "init": True}, id="L33-no-decay"),
]


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize(("shape", "flags"), GLA_CASES)
def test_gla_matches_loop(shape, flags, seq):
    batch, length = shape[:2]
    inputs, options = gla_inputs(*shape, **flags)
    seq_idx = make_seq_idx(batch, length, torch.Generator().manual_seed(1)) if seq else None
    check_against_loop(run_gla, gla_loop, inputs, options, seq_idx)


def test_gla_scale():
    inputs, options = gla_inputs(1, 20, 2, 4, 3, chunk_size=16, init=True)
    check_against_loop(run_gla, gla_loop, inputs, {**options, "scale": 0.3})


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
def test_gla_decay_of_zero(seq):
    """g = -inf (log of a decay of exactly 0: a hard reset of some key channels) is a log decay <= 0 as documented;
    the chunk form returned NaN outputs, states and gradients (G_t - G_s = -inf + inf), while the decoding step
    (gla_state_update) and the loop take it. Now it equals the loop, gradients included."""
    inputs, options = gla_inputs(2, 40, 2, 4, 3, chunk_size=16, init=True)
    inputs["g"][0, 5, 0, :2] = float("-inf")  # inside a sub-chunk
    inputs["g"][1, 16:18, 1] = float("-inf")  # at a chunk's start, every channel
    inputs["g"][0, 33, :, 3] = float("-inf")
    seq_idx = make_seq_idx(2, 40, torch.Generator().manual_seed(1)) if seq else None
    check_against_loop(run_gla, gla_loop, inputs, options, seq_idx)


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
def test_gla_positive_log_decay(seq):
    """A log decay g > 0 (a growing state): the chunk form clamped every pairwise exponent G_t - G_s to <= 0, which cut
    the in-sub-chunk and cross-sub-chunk decays of such a g to 1 (wrong outputs, states and gradients by ~30%, with
    no error), while the decoding step (gla_state_update_ref) and the loop take it. The exponents of the masked pairs
    are now zeroed by position, so it equals the loop."""
    inputs, options = gla_inputs(2, 40, 2, 4, 3, chunk_size=32, init=True)
    inputs["g"] = inputs["g"] + 0.3  # g in (-0.7, 0.3]: about a third of the entries grow
    seq_idx = make_seq_idx(2, 40, torch.Generator().manual_seed(1)) if seq else None
    check_against_loop(run_gla, gla_loop, inputs, options, seq_idx)


# ----------------------------------------------------------------------------------------------------------
# Causal conv1d

CONV1D_CASES = [
    pytest.param((1, 3, 1, 4), {"init": True}, id="L1-D3-W4-init"),
    pytest.param((2, 5, 2, 4), {"bias": True, "activation": "silu", "init": True},
                 id="L2-D5-W4-bias-silu-init"),
    pytest.param((2, 6, 7, 3), {"activation": "swish"}, id="L7-D6-W3-swish"),
    pytest.param((2, 5, 33, 4), {"bias": True, "activation": "silu", "init": True}, id="L33-D5-W4-all"),
    pytest.param((1, 7, 130, 2), {"bias": True, "init": True}, id="L130-D7-W2-bias-init"),
    pytest.param((2, 3, 9, 1), {"bias": True}, id="L9-D3-W1"),
]


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize(("shape", "flags"), CONV1D_CASES)
def test_conv1d_matches_loop(shape, flags, seq):
    batch, dim, length, width = shape
    inputs, options = conv1d_inputs(batch, dim, length, width, **flags)
    seq_idx = make_seq_idx(batch, length, torch.Generator().manual_seed(1)) if seq else None
    check_against_loop(run_conv1d, conv1d_loop, inputs, options, seq_idx)


def test_conv1d_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), activation="relu", backend="ref")


CONV_BAD_SHAPES = {  # (argument, wrong value) against x [2, 5, 10], weight [5, 4]
    "weight_one_row": ("weight", torch.ones(1, 4)),
    "bias_size_1": ("bias", torch.ones(1)),
    "initial_state_width": ("initial_state", torch.ones(2, 5, 2)),
    "initial_state_batch_1": ("initial_state", torch.ones(1, 5, 3)),
    "seq_idx_batch_1": ("seq_idx", torch.zeros(1, 10, dtype=torch.long)),
    "seq_idx_1d": ("seq_idx", torch.zeros(10, dtype=torch.long)),
}


@pytest.mark.parametrize("case", list(CONV_BAD_SHAPES))
def test_conv1d_ref_refuses_wrong_shapes_naming_them(case):
    """The reference refuses what the CUDA kernel refuses, naming the argument: a weight of one row or a bias of
    size 1 was broadcast over every channel on CPU, the rest crashed in torch.cat/indexing without a name."""
    inputs = dict(x=torch.randn(2, 5, 10), weight=torch.randn(5, 4), bias=torch.randn(5),
                  initial_state=torch.randn(2, 5, 3), seq_idx=torch.zeros(2, 10, dtype=torch.long))
    name, bad = CONV_BAD_SHAPES[case]
    inputs[name] = bad
    with pytest.raises(ValueError, match=rf"^causal_conv1d: {name} has shape"):
        causal_conv1d(**inputs, activation="silu", backend="ref")


@pytest.mark.parametrize("name", ["weight", "bias", "conv_state", "x"])
def test_conv1d_update_ref_refuses_wrong_shapes_naming_them(name):
    """The same for the decoding step; causal_conv1d's package takes (x, conv_state), ours (conv_state, x): the
    swapped call names x instead of failing in torch.cat."""
    args = dict(conv_state=torch.zeros(2, 5, 3), x=torch.zeros(2, 5), weight=torch.zeros(5, 4), bias=torch.zeros(5))
    bad = {"weight": torch.zeros(1, 4), "bias": torch.zeros(1), "conv_state": torch.zeros(2, 5, 2),
           "x": torch.zeros(2, 5, 3)}
    args[name] = bad[name]
    with pytest.raises(ValueError, match=rf"^causal_conv1d_update: {name} (has shape|must be)"):
        causal_conv1d_update(**args, backend="ref")


SSD_BAD_SHAPES = {  # (argument, wrong value) against ssd_inputs(2, 10, 4, 3, 2, 5, all on)
    "dt_one_head": ("dt", lambda t: t["dt"][..., :1]),
    "A_size_1": ("A", lambda t: t["A"][:1]),
    "D_size_1": ("D", lambda t: t["D"][:1]),
    "dt_bias_size_1": ("dt_bias", lambda t: t["dt_bias"][:1]),
    "z_batch_1": ("z", lambda t: t["z"][:1]),
    "C_batch_1": ("C", lambda t: t["C"][:1]),
    "initial_state_batch_1": ("initial_state", lambda t: t["initial_state"][:1]),
    "chunk_size_0": ("chunk_size", lambda t: 0),
}


@pytest.mark.parametrize("case", list(SSD_BAD_SHAPES))
def test_ssd_ref_refuses_wrong_shapes_naming_them(case):
    """The reference refuses what the Triton kernel refuses, naming the argument: a dt of one head, an A, D or
    dt_bias of size 1 or a z of batch 1 were broadcast into wrong numbers on CPU (chunk_size 0: ZeroDivisionError)."""
    inputs, options = ssd_inputs(2, 10, 4, 3, 2, 5, chunk_size=8, D="h", z=True, bias=True, init=True)
    inputs = {**{k: v.float() for k, v in inputs.items()}, **options}
    name, bad = SSD_BAD_SHAPES[case]
    inputs[name] = bad(inputs)
    with pytest.raises(ValueError, match=rf"^ssd_chunk_scan: {name} (has shape|must be)"):
        ssd_chunk_scan(**inputs, backend="ref")


GLA_BAD_SHAPES = {  # (argument, wrong value) against gla_inputs(2, 10, 2, 5, 3, init)
    "v_batch_1": ("v", lambda t: t["v"][:1]),
    "initial_state_batch_1": ("initial_state", lambda t: t["initial_state"][:1]),
    "g_one_channel": ("g", lambda t: t["g"][..., :1]),
    "k_batch_1": ("k", lambda t: t["k"][:1]),
    "seq_idx_batch_1": ("seq_idx", lambda t: torch.zeros(1, 10, dtype=torch.long)),
    "chunk_size_0": ("chunk_size", lambda t: 0),
}


@pytest.mark.parametrize("case", list(GLA_BAD_SHAPES))
def test_gla_ref_refuses_wrong_shapes_naming_them(case):
    """A v or initial_state of batch 1 was broadcast over every row on CPU (wrong numbers), the rest crashed in a
    view (chunk_size 0: StopIteration); now a ValueError names the argument."""
    inputs, options = gla_inputs(2, 10, 2, 5, 3, init=True)
    inputs = {**{k: v.float() for k, v in inputs.items()}, **options}
    name, bad = GLA_BAD_SHAPES[case]
    inputs[name] = bad(inputs)
    with pytest.raises(ValueError, match=rf"^chunk_gla: {name} (has shape|must be)"):
        chunk_gla(**inputs, backend="ref")


def _step_args(op: str) -> dict:
    if op == "selective_scan":
        return dict(state=torch.zeros(2, 4, 3), x=torch.zeros(2, 4), dt=torch.zeros(2, 4), A=torch.zeros(4, 3),
                    B=torch.zeros(2, 3), C=torch.zeros(2, 3), D=torch.zeros(4), z=torch.zeros(2, 4),
                    dt_bias=torch.zeros(4))
    if op == "ssd":
        return dict(state=torch.zeros(2, 4, 3, 5), x=torch.zeros(2, 4, 3), dt=torch.zeros(2, 4), A=torch.zeros(4),
                    B=torch.zeros(2, 2, 5), C=torch.zeros(2, 2, 5), D=torch.zeros(4), z=torch.zeros(2, 4, 3),
                    dt_bias=torch.zeros(4))
    return dict(state=torch.zeros(2, 2, 5, 3), q=torch.zeros(2, 2, 5), k=torch.zeros(2, 2, 5), v=torch.zeros(2, 2, 3),
                g=torch.zeros(2, 2, 5))


STEP_BAD_SHAPES = [  # (op, argument, wrong value): broadcast silently by the references before
    ("selective_scan", "D", torch.zeros(1)), ("selective_scan", "dt_bias", torch.zeros(1)),
    ("selective_scan", "dt", torch.zeros(2, 1)), ("selective_scan", "A", torch.zeros(1, 3)),
    ("selective_scan", "z", torch.zeros(1, 4)), ("selective_scan", "B", torch.zeros(1, 3)),
    ("ssd", "A", torch.zeros(1)), ("ssd", "dt", torch.zeros(2, 1)), ("ssd", "dt_bias", torch.zeros(1)),
    ("ssd", "D", torch.zeros(1)), ("ssd", "z", torch.zeros(1, 4, 3)),
    ("gla", "g", torch.zeros(2, 2, 1)), ("gla", "k", torch.zeros(1, 2, 5)), ("gla", "v", torch.zeros(1, 2, 3)),
]


@pytest.mark.parametrize(("op", "name", "bad"), STEP_BAD_SHAPES, ids=[f"{o}-{n}" for o, n, _ in STEP_BAD_SHAPES])
def test_state_update_refs_refuse_wrong_shapes_naming_them(op, name, bad):
    """The decoding steps' references refuse a wrong shape naming the argument (the CUDA/Triton steps do too)."""
    fn = {"selective_scan": selective_state_update, "ssd": ssd_state_update, "gla": gla_state_update}[op]
    what = {"selective_scan": "selective_state_update", "ssd": "ssd_state_update", "gla": "gla_state_update"}[op]
    args = _step_args(op)
    fn(**args, backend="ref")  # the valid call runs
    args[name] = bad
    with pytest.raises(ValueError, match=rf"^{what}: {name} (has shape|must be)"):
        fn(**args, backend="ref")


@pytest.mark.parametrize("name", ["k", "v", "g", "state"])
def test_gla_state_update_checks_shapes_before_the_kernel(name):
    """The GLA step's Triton kernel indexes q, k, v, g by the state's batch and heads and had no check (a k of batch
    1 was read out of bounds on a GPU): the dispatcher refuses a wrong shape before it picks a path."""
    args = _step_args("gla")
    args[name] = {"k": torch.zeros(1, 2, 5), "v": torch.zeros(2, 2, 4)[:1], "g": torch.zeros(2, 1, 5),
                  "state": torch.zeros(2, 2, 5, 4)}[name]
    with pytest.raises(ValueError, match=rf"^gla_state_update: {name} has shape"):
        gla_state_update(**args, backend="triton")


EMPTY_CASES = {  # op: (dispatcher, its package's name for monkeypatching, inputs of length 0, the fast backend)
    "selective_scan": (run_selective_scan, "zoo_kernels.selective_scan",
                       lambda: selective_scan_inputs(2, 4, 3, 0, D=True, z=True, bias=True, init=True), "cuda"),
    "ssd": (run_ssd, "zoo_kernels.ssd", lambda: ssd_inputs(2, 0, 4, 3, 2, 5, D="h", z=True, init=True), "triton"),
    "gla": (run_gla, "zoo_kernels.gla", lambda: gla_inputs(2, 0, 2, 5, 3, init=True), "fla"),
    "conv1d": (run_conv1d, "zoo_kernels.conv1d", lambda: conv1d_inputs(2, 5, 0, 4, bias=True, init=True), "cuda"),
}


@pytest.mark.parametrize("fast", [False, True], ids=["ref", "fast-backend-chosen"])
@pytest.mark.parametrize("op", list(EMPTY_CASES))
def test_length_zero_passes_the_state_through(op, fast, monkeypatch):
    """A piece of no token (the empty last slice of a chunked prefill, a batch of [B, 0]) leaves the state as it
    was: the scans' references raised ZeroDivisionError (selective_scan: IndexError) and the CUDA kernels refuse
    L = 0, so the dispatchers take the reference there; the final state carries initial_state's gradient."""
    import importlib

    runner, package, make, fast_name = EMPTY_CASES[op]
    if fast:  # as on a GPU: the dispatcher resolves to the fast backend (which refuses or cannot run L = 0 here)
        monkeypatch.setattr(importlib.import_module(package), "resolve_backend", lambda backend, device: fast_name)
    raw, options = make()
    inputs = leaves(raw, torch.float32)
    out, final = runner(**inputs, **options)
    time_dim = 2 if op in ("selective_scan", "conv1d") else 1
    assert out.shape[time_dim] == 0 and out.shape[0] == 2
    assert_close("final_state", final.detach(), inputs["initial_state"].detach(), 0.0)
    (grad,) = torch.autograd.grad(final.sum(), inputs["initial_state"])
    assert torch.equal(grad, torch.ones_like(grad))


def test_selective_scan_ref_takes_batch_zero():
    """Batch 0 (an empty micro-batch) raised ZeroDivisionError in the reference's block sizing."""
    inputs, options = selective_scan_inputs(1, 4, 3, 7, D=True, init=True)
    inputs = {k: v[:0] if k != "A" and k != "D" else v for k, v in inputs.items()}
    out, final = run_selective_scan(**inputs, **options)
    assert out.shape == (0, 4, 7) and final.shape == (0, 4, 3)


# ----------------------------------------------------------------------------------------------------------
# Consistency of every op with itself: packing, pieces, steps.
# Per op: the runner, its inputs for a length, the time dimension of each input that runs along time
# (the others are parameters, or initial_state), and the time dimension of the output.

OPS = {
    "selective_scan": (
        run_selective_scan,
        lambda length: selective_scan_inputs(2, 6, 4, length, groups=2, D=True, z=True, bias=True,
                                             softplus=True, init=True),
        {"u": 2, "delta": 2, "B": 3, "C": 3, "z": 2},
        2,
    ),
    "ssd": (
        run_ssd,
        lambda length: ssd_inputs(2, length, 4, 3, 2, 5, chunk_size=8, D="h", z=True, bias=True,
                                  softplus=True, init=True),
        {"x": 1, "dt": 1, "B": 1, "C": 1, "z": 1},
        1,
    ),
    "gla": (
        run_gla,
        lambda length: gla_inputs(2, length, 2, 5, 3, chunk_size=16, g_min=-2.0, init=True),
        {"q": 1, "k": 1, "v": 1, "g": 1},
        1,
    ),
    "conv1d": (
        run_conv1d,
        lambda length: conv1d_inputs(2, 5, length, 4, bias=True, activation="silu", init=True),
        {"x": 2},
        2,
    ),
}


def time_slice(inputs: dict, time_dims: dict, rows: slice, span: slice, initial_state=None) -> dict:
    """The inputs of rows `rows` and positions `span`, with `initial_state` (None: zero state)."""
    out = {}
    for name, value in inputs.items():
        if name == "initial_state":
            continue
        if name in time_dims:
            index = [rows] + [slice(None)] * (value.dim() - 1)
            index[time_dims[name]] = span
            value = value[tuple(index)]
        out[name] = value
    if initial_state is not None:
        out["initial_state"] = initial_state
    return out


@pytest.mark.parametrize("op", list(OPS))
def test_packed_equals_separate(op):
    """Documents packed in one row with seq_idx give the outputs, final state and gradients of
    separate runs (the first document starts from initial_state, the others from zero)."""
    runner, make_inputs, time_dims, out_time_dim = OPS[op]
    length = 45
    raw, options = make_inputs(length)
    seq_idx = torch.zeros(2, length, dtype=torch.int64)
    seq_idx[0, 10:], seq_idx[0, 11:], seq_idx[0, 30:] = 1, 2, 3  # includes a one-token document
    seq_idx[1, 20:] = 7

    packed = leaves(raw, torch.float32)
    out, state, grads, cot = forward_backward(runner, packed, {**options, "seq_idx": seq_idx})

    separate = leaves(raw, torch.float32)
    loss, outs = 0.0, []
    for row in range(2):
        cuts = [0] + (torch.nonzero(seq_idx[row, 1:] != seq_idx[row, :-1]).flatten() + 1).tolist() + [length]
        row_outs = []
        for n, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
            init = separate["initial_state"][row : row + 1] if n == 0 else None
            piece = time_slice(separate, time_dims, slice(row, row + 1), slice(start, end), init)
            piece_out, piece_state = runner(**piece, **options)
            row_outs.append(piece_out)
        index = [slice(row, row + 1)] + [slice(None)] * (out.dim() - 1)
        loss = loss + (torch.cat(row_outs, dim=out_time_dim) * cot[0][tuple(index)].float()).sum()
        loss = loss + (piece_state * cot[1][row : row + 1].float()).sum()
        outs.append((torch.cat(row_outs, dim=out_time_dim).detach(), piece_state.detach()))
    separate_grads = dict(zip(separate, torch.autograd.grad(loss, list(separate.values()))))

    assert_close("out", out, torch.cat([o for o, _ in outs]), 1e-5)
    assert_close("final_state", state, torch.cat([s for _, s in outs]), 1e-5)
    for name in raw:
        assert_close(f"grad {name}", grads[name], separate_grads[name], 1e-5)


@pytest.mark.parametrize("seq", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize("op", list(OPS))
def test_pieces_equal_one_run(op, seq):
    """A sequence run in pieces (final state carried into the next call) equals one run, gradients
    included; pieces of 1, 2 and 30 tokens cover the conv's short-input path and multi-chunk pieces."""
    runner, make_inputs, time_dims, out_time_dim = OPS[op]
    length = 70
    raw, options = make_inputs(length)
    seq_idx = None
    if seq:  # boundaries inside pieces, not at their starts (a piece's initial state feeds its first token)
        seq_idx = torch.zeros(2, length, dtype=torch.int64)
        seq_idx[0, 12:], seq_idx[0, 50:], seq_idx[1, 36:] = 1, 2, 1

    whole = leaves(raw, torch.float32)
    out, state, grads, cot = forward_backward(runner, whole, {**options, "seq_idx": seq_idx})

    split = leaves(raw, torch.float32)
    cuts = [0, 1, 3, 33, 40, length]
    carried, outs = split["initial_state"], []
    for start, end in zip(cuts[:-1], cuts[1:]):
        piece = time_slice(split, time_dims, slice(None), slice(start, end), carried)
        piece_seq = None if seq_idx is None else seq_idx[:, start:end]
        piece_out, carried = runner(**piece, **options, seq_idx=piece_seq)
        outs.append(piece_out)
    out_split = torch.cat(outs, dim=out_time_dim)
    loss = (out_split * cot[0].float()).sum() + (carried * cot[1].float()).sum()
    split_grads = dict(zip(split, torch.autograd.grad(loss, list(split.values()))))

    assert_close("out", out_split.detach(), out, 1e-5)
    assert_close("final_state", carried.detach(), state, 1e-5)
    for name in raw:
        assert_close(f"grad {name}", split_grads[name], grads[name], 1e-5)


def step_through(op: str, inputs: dict, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the op's *_state_update token by token from initial_state; returns (outputs, final state)."""
    channels_first = op in ("selective_scan", "conv1d")  # [batch, D, L] layouts
    length = next(iter(inputs.values())).shape[2 if channels_first else 1]
    state = inputs["initial_state"].clone()
    outs = []
    for t in range(length):
        if op == "selective_scan":
            outs.append(selective_state_update(state, inputs["u"][..., t], inputs["delta"][..., t],
                                               inputs["A"], inputs["B"][..., t], inputs["C"][..., t],
                                               inputs["D"], inputs["z"][..., t], inputs["delta_bias"],
                                               options["delta_softplus"], backend="ref"))
        elif op == "ssd":
            outs.append(ssd_state_update(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"],
                                         inputs["B"][:, t], inputs["C"][:, t], inputs["D"], inputs["z"][:, t],
                                         inputs["dt_bias"], options["dt_softplus"], backend="ref"))
        elif op == "gla":
            outs.append(gla_state_update(state, inputs["q"][:, t], inputs["k"][:, t], inputs["v"][:, t],
                                         inputs["g"][:, t]))
        else:
            outs.append(causal_conv1d_update(state, inputs["x"][..., t], inputs["weight"], inputs["bias"],
                                             options["activation"]))
    return torch.stack(outs, dim=2 if channels_first else 1), state


@pytest.mark.parametrize("op", list(OPS))
def test_state_update_steps_equal_scan(op):
    """Stepping the decode function through a sequence gives the scan's outputs and final state."""
    runner, make_inputs, _, _ = OPS[op]
    raw, options = make_inputs(37)
    inputs = {k: v.float() for k, v in raw.items()}
    with torch.no_grad():
        out, state = runner(**inputs, **options)
        out_steps, state_steps = step_through(op, inputs, options)
    assert state_steps.dtype == torch.float32
    assert_close("out", out_steps, out, 1e-5)
    assert_close("final_state", state_steps, state, 1e-5)


@pytest.mark.parametrize("op", list(OPS))
def test_low_precision_inputs(op):
    """bf16 inputs: output in bf16, final state in fp32, both close to the fp32 run (math is fp32)."""
    runner, make_inputs, _, _ = OPS[op]
    raw, options = make_inputs(20)
    low = {k: v.to(torch.bfloat16) for k, v in raw.items()}
    with torch.no_grad():
        out, state = runner(**low, **options)
        out32, state32 = runner(**{k: v.float() for k, v in low.items()}, **options)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close("out", out.float(), out32, 1e-2)
    assert_close("final_state", state, state32, 1e-6)


def test_references_ignore_autocast():
    """The references are fp32 specifications: a bf16 autocast region around them changes nothing."""
    from zoo_kernels.attention import attention_ref

    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    mask = torch.tensor([[False, True, True, True, True, True]])
    plain = attention_ref(q, k, v, key_padding_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = attention_ref(q, k, v, key_padding_mask=mask)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
