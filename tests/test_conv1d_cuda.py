"""Our causal depthwise conv1d CUDA kernel against the torch reference: output, final state, all gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from zoo_kernels.conv1d import cuda as conv_cuda
from zoo_kernels.conv1d.ref import causal_conv1d_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def make_inputs(batch, dim, length, width, dtype, *, bias, init, docs, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    inp = {
        "x": torch.randn(batch, dim, length, device="cuda", generator=g).to(dtype),
        "weight": torch.randn(dim, width, device="cuda", generator=g) * 0.5,
        "bias": torch.randn(dim, device="cuda", generator=g) if bias else None,
        "initial_state": torch.randn(batch, dim, width - 1, device="cuda", generator=g) if init else None,
    }
    for t in inp.values():
        if t is not None:
            t.requires_grad_(True)
    seq_idx = None
    if docs and length > 1:
        cuts = torch.stack([torch.randperm(length - 1, device="cuda", generator=g)[:docs] + 1
                            for _ in range(batch)])
        marks = torch.zeros(batch, length, dtype=torch.int32, device="cuda")
        marks.scatter_(1, cuts, 1)
        seq_idx = marks.cumsum(1, dtype=torch.int32)
    return inp, seq_idx


CASES = [
    # batch, dim, length, width, dtype, bias, init, docs, activation
    (2, 5, 1, 4, torch.float32, True, True, 0, "silu"),
    (2, 5, 2, 4, torch.float32, True, True, 1, "silu"),
    (1, 7, 7, 3, torch.float32, False, True, 2, None),
    (2, 64, 1000, 4, torch.float32, True, False, 9, "silu"),
    (1, 33, 4099, 2, torch.float32, True, True, 5, None),
    (2, 64, 2048, 4, torch.bfloat16, True, True, 0, "silu"),
    (1, 40, 1023, 4, torch.bfloat16, True, True, 6, "silu"),
    (2, 24, 513, 3, torch.float16, False, False, 3, "silu"),
    (1, 6, 50, 5, torch.float32, True, True, 2, "silu"),  # width 5: the reference path
    # lengths across several backward blocks, documents dense enough that some start at the blocks' edges
    (2, 3, 5000, 4, torch.bfloat16, True, True, 1500, "silu"),
    (1, 4, 3000, 3, torch.float32, True, True, 900, "silu"),
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=[
    f"b{c[0]}-D{c[1]}-L{c[2]}-W{c[3]}-{str(c[4])[6:]}{'-bias' * c[5]}{'-init' * c[6]}-docs{c[7]}-{c[8]}"
    for c in CASES
])
def test_conv_matches_reference(case):
    batch, dim, length, width, dtype, bias, init, docs, act = case
    inp, seq_idx = make_inputs(batch, dim, length, width, dtype, bias=bias, init=init, docs=docs, seed=length)
    ref_inp = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    y_ref, fs_ref = causal_conv1d_ref(ref_inp["x"], ref_inp["weight"], ref_inp["bias"], seq_idx,
                                      ref_inp["initial_state"], act, True)
    torch.full((1 << 26,), float("nan"), device="cuda")  # poison the allocator's free blocks
    y, fs = conv_cuda.causal_conv1d_cuda(inp["x"], inp["weight"], inp["bias"], seq_idx, inp["initial_state"],
                                         act, True)
    assert y.dtype == dtype and fs.dtype == torch.float32
    tol = TOL[dtype]
    assert_close("y", y, y_ref, tol)
    assert_close("final_state", fs, fs_ref, 1e-6)
    dy, dfs = torch.randn_like(y), torch.randn_like(fs)
    leaves = [k for k, v in inp.items() if v is not None]
    g = torch.autograd.grad((y, fs), [inp[k] for k in leaves], (dy, dfs))
    g_ref = torch.autograd.grad((y_ref, fs_ref), [ref_inp[k] for k in leaves], (dy, dfs))
    for name, a, b in zip(leaves, g, g_ref):
        assert a.dtype == inp[name].dtype
        assert_close(f"d{name}", a, b, 2 * tol)


@pytest.mark.cuda
@needs_gpu
def test_extension_builds():
    assert conv_cuda.available(), conv_cuda.why_unavailable()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_gpu_says_why():
    assert not conv_cuda.available()
    assert "no CUDA device" in conv_cuda.why_unavailable()


def _cpu_conv(**changes):
    """Valid CPU arguments of causal_conv1d_cuda (batch 2, D 4, L 8, W 4) with `changes`."""
    t = dict(x=torch.zeros(2, 4, 8), weight=torch.zeros(4, 4), bias=torch.zeros(4),
             seq_idx=torch.zeros(2, 8, dtype=torch.long), initial_state=torch.zeros(2, 4, 3))
    t.update(changes)
    return t


CONV_BAD = {
    "x_2d": (dict(x=torch.zeros(4, 8)), "x must be"),
    "weight_3d": (dict(weight=torch.zeros(4, 3, 1)), "weight has shape"),
    "weight_rows": (dict(weight=torch.zeros(5, 4)), "weight has shape"),
    "empty": (dict(x=torch.zeros(2, 4, 0), seq_idx=None), "empty"),
    "bias_shape": (dict(bias=torch.zeros(5)), "bias has shape"),
    "seq_idx_shape": (dict(seq_idx=torch.zeros(2, 7, dtype=torch.long)), "seq_idx has shape"),
    "initial_state_shape": (dict(initial_state=torch.zeros(2, 4, 2)), "initial_state has shape"),
}


@pytest.mark.parametrize("case", list(CONV_BAD))
def test_conv_refuses_what_the_extension_would_before_any_device(case):
    """csrc/causal_conv1d_api.cpp's make_params checks, mirrored in Python (ValueError on CPU tensors, before the
    device check and the extension); other widths and dtypes take the reference as before."""
    changes, words = CONV_BAD[case]
    with pytest.raises(ValueError, match=words):
        conv_cuda.causal_conv1d_cuda(**_cpu_conv(**changes))


def test_conv_takes_valid_arguments_up_to_the_device_check():
    with pytest.raises(RuntimeError, match="CUDA"):
        conv_cuda.causal_conv1d_cuda(**_cpu_conv())
    y = conv_cuda.causal_conv1d_cuda(**_cpu_conv(weight=torch.zeros(4, 5), initial_state=None))  # width 5: reference
    assert y.shape == (2, 4, 8)


UPDATE_BAD = {
    "x_fp64": (dict(x=torch.zeros(2, 4, dtype=torch.float64)), "fp32, bf16 or fp16"),
    "x_3d": (dict(x=torch.zeros(2, 4, 1)), "unit channel stride"),
    "x_strided": (dict(x=torch.zeros(2, 8)[:, ::2]), "unit channel stride"),
    "weight_1d": (dict(weight=torch.zeros(4)), "weight must be"),
    "width_5": (dict(weight=torch.zeros(4, 5), conv_state=torch.zeros(2, 4, 4)), "weight must be"),
    "weight_rows": (dict(weight=torch.zeros(5, 4)), "weight has shape"),
    "bias_shape": (dict(bias=torch.zeros(5)), "bias has shape"),
    "state_dtype": (dict(conv_state=torch.zeros(2, 4, 3, dtype=torch.bfloat16)), "conv_state must be"),
    "state_strided": (dict(conv_state=torch.zeros(2, 4, 6)[..., ::2]), "conv_state must be contiguous"),
    "state_shape": (dict(conv_state=torch.zeros(2, 4, 2)), "conv_state has shape"),
}


@pytest.mark.parametrize("case", list(UPDATE_BAD))
def test_update_refuses_what_the_extension_would_before_any_device(case):
    """csrc/causal_conv1d_api.cpp's conv_update checks, mirrored in Python (ValueError on CPU tensors)."""
    t = dict(conv_state=torch.zeros(2, 4, 3), x=torch.zeros(2, 4), weight=torch.zeros(4, 4), bias=torch.zeros(4))
    changes, words = UPDATE_BAD[case]
    t.update(changes)
    with pytest.raises(ValueError, match=words):
        conv_cuda.causal_conv1d_update_cuda(**t, activation="silu")


def test_update_takes_valid_arguments_up_to_the_device_check():
    """A column slice of a wider x (unit channel stride), bf16, fp64 weights (cast): past the checks, RuntimeError."""
    for x, weight in ((torch.zeros(2, 4), torch.zeros(4, 4)), (torch.zeros(2, 8, dtype=torch.bfloat16)[:, 4:],
                                                                torch.zeros(4, 4, dtype=torch.float64))):
        with pytest.raises(RuntimeError, match="CUDA"):
            conv_cuda.causal_conv1d_update_cuda(torch.zeros(2, 4, 3), x, weight, torch.zeros(4), "silu")


@pytest.mark.parametrize("activation", ["swish", "relu"])
def test_update_takes_the_activations_the_scan_and_the_reference_take(activation):
    """causal_conv1d and causal_conv1d_update_ref take activation "swish" (SiLU, as causal_conv1d's own package):
    the kernel's update must too (it raised ValueError on CUDA alone), and refuse what they refuse, naming it."""
    from zoo_kernels.conv1d.ref import causal_conv1d_update_ref

    args = (torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(4, 4), torch.zeros(4))
    if activation == "relu":
        for fn in (conv_cuda.causal_conv1d_update_cuda, causal_conv1d_update_ref):
            with pytest.raises(ValueError, match="activation must be None, 'silu' or 'swish', got 'relu'"):
                fn(*args, activation)
        return
    causal_conv1d_update_ref(*args, activation)
    with pytest.raises(RuntimeError, match="CUDA"):  # past the checks: only the device is left
        conv_cuda.causal_conv1d_update_cuda(*args, activation)
