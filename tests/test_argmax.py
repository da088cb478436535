"""zoo_kernels.argmax (greedy decoding's argmax) against torch.argmax: ties, NaN, -inf rows, V off the block size,
strided rows, in-place output; and zoo.decode.greedy, which takes it on CUDA.

On CPU the kernel runs in Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before triton imports).
"""

from __future__ import annotations

import pytest
import torch
from helpers import patch_triton_interpreter, run_in_interpreter

from zoo.decode import greedy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases(device: str):
    """(name, x [R, V]) with the edge cases; V = 50280 (GPT-NeoX's padded vocabulary) is not a multiple of the
    kernel's 2048-wide chunks."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x = torch.randn(6, 50280, generator=gen).to(dtype)
        x[1, 7] = x[1, 4100] = x[1, 50279] = 100.0  # a tie across blocks: the first index
        x[2, 4095] = x[2, 4096] = 50.0  # a tie at a block boundary
        x[3] = float("-inf")  # all -inf: index 0
        x[4, 33000] = float("nan")  # a NaN: its index
        x[5, 2047] = x[5, 2048] = x[5, 50000] = 60.0  # a tie across the first pass's chunks (2048 wide)
        out.append((f"{dtype}", x.to(device)))
    small = torch.randn(3, 17, generator=gen)
    small[0, 16] = 9.0  # the max in the last, masked block's tail
    out.append(("V=17", small.to(device)))
    wide = torch.randn(4, 300, generator=gen)
    out.append(("strided rows", wide[:, 20:220].to(device)))
    # fp64 logits: compared in fp32 they tied (1 + 1e-12 and 1 + 2e-12: the first won) and 1e300 became +inf
    double = torch.full((2, 3000), -10.0, dtype=torch.float64)
    double[0, 10], double[0, 2900] = 1 + 1e-12, 1 + 2e-12
    double[1, 5], double[1, 2500] = 1e300, 2e300
    out.append(("float64", double.to(device)))
    return out


def _check(device: str) -> None:
    from zoo_kernels.argmax import argmax_rows

    for name, x in _cases(device):
        ref = x.argmax(-1)
        got = argmax_rows(x)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), ref.cpu()), (name, got, ref)
        buf = torch.full((x.shape[0], 1), -1, dtype=torch.int64, device=device)
        assert argmax_rows(x, buf[:, 0]) is not None and torch.equal(buf[:, 0].cpu(), ref.cpu()), name
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(2, 3, device=device), torch.zeros(2, dtype=torch.int32, device=device))
    assert argmax_rows(torch.zeros(0, 5, device=device)).shape == (0,)


def test_argmax_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    run_in_interpreter(__file__)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_argmax_kernel_on_cuda():
    _check("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_torch_argmax_and_writes_in_place(device):
    logits = torch.randn(3, 2, 1000, device=device)
    logits[1, -1, 5] = logits[1, -1, 900] = 50.0
    ref = logits[:, -1:].argmax(-1)
    assert torch.equal(greedy(logits), ref)
    buf = torch.zeros(3, 1, dtype=torch.int64, device=device)
    assert greedy(logits, out=buf) is buf and torch.equal(buf, ref)


if __name__ == "__main__":
    patch_triton_interpreter()
    _check("cpu")
