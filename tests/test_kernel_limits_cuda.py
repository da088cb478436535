"""Our CUDA kernels (selective scan, its split passes, causal conv1d, the decode state update) at the edges of their
index and launch limits: offsets past 2^31 elements, grid rows past gridDim.y's 65535, zero-size inputs. Each case
compares with the torch reference (or the unsplit kernel, where the reference would be too slow) on the GPU; each
stays under ~15 GB of GPU memory and a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@needs_gpu
def test_split_scan_with_channel_offsets_past_2_31():
    """D x L > 2^31 at batch 1 (a long prefill): the split passes' channel offset d x L (the in-place layout's
    channel stride is the whole row) was an int32 product and wrapped for d >= 2^31 / L; the unsplit kernel's offsets
    are 64-bit, so its result on the last channels alone is the oracle."""
    from zoo_kernels.selective_scan import selective_scan

    dim, length, nstate = 4160, 1 << 19, 16  # 4159 x 2^19 = 2.18e9 > 2^31 - 1: channels 4096.. wrapped
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.empty(1, dim, length, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    delta = torch.empty_like(u).normal_(-1.0, 0.5, generator=g)
    A = -(torch.rand(dim, nstate, device="cuda", generator=g) * 1.5 + 0.1)
    B = torch.randn(1, nstate, length, device="cuda", generator=g).to(torch.bfloat16)
    C = torch.randn(1, nstate, length, device="cuda", generator=g).to(torch.bfloat16)
    with torch.no_grad():
        out = selective_scan(u, delta, A, B, C, delta_softplus=True, backend="cuda", seq_split=4)
        last = slice(dim - 64, dim)
        ref = selective_scan(u[:, last], delta[:, last], A[last], B, C, delta_softplus=True, backend="cuda",
                             seq_split=1)
    assert_close("out (last 64 channels)", out[:, last].float(), ref.float(), 1e-2)
