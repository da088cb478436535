"""Our CUDA and Triton kernels (selective scan, its split passes, causal conv1d, the decode state update, the SSD
chunk scan, decode attention) at the edges of their index and launch limits: offsets past 2^31 elements, grid rows
past gridDim.y's 65535, zero-size inputs. Each case compares with the torch reference (or the same kernel under the
limit, where the reference would be too slow) on the GPU; each stays under ~15 GB of GPU memory and a few seconds
(plus the SSD autotuner's compiles). The tests without the cuda mark check launch grids, shared memory sizes and
offsets on the CPU (the last through Triton's interpreter).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, patch_triton_interpreter, run_in_interpreter

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


def _scan_inputs(batch, dim, length, nstate, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).requires_grad_()

    return dict(u=rnd(batch, dim, length), delta=rnd(batch, dim, length, scale=0.5, shift=-1.0),
                A=(-(torch.rand(dim, nstate, device="cuda", generator=g) * 1.5 + 0.1)).requires_grad_(),
                B=rnd(batch, nstate, length), C=rnd(batch, nstate, length), D=rnd(dim), z=rnd(batch, dim, length),
                delta_bias=rnd(dim, scale=0.3), initial_state=rnd(batch, dim, nstate))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("batch", [65537, 0], ids=["past-gridDim.y", "empty"])
def test_scan_rows_past_the_grid_limit_and_none(batch):
    """The scan's grid put the batch rows (x segments) in gridDim.y: from 65536 rows the launch failed ("invalid
    configuration argument"), and an empty batch launched an empty grid, a launch error too. Output, final state and
    every gradient against the reference (fp32)."""
    from zoo_kernels.selective_scan.cuda import selective_scan_cuda
    from zoo_kernels.selective_scan.ref import selective_scan_ref

    inp = _scan_inputs(batch, 16, 8, 4)
    names = list(inp)
    results = {}
    for name, fn in (("cuda", selective_scan_cuda), ("ref", selective_scan_ref)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
        out, last = fn(**leaves, delta_softplus=True, return_final_state=True)
        g = torch.Generator(device="cuda").manual_seed(1)
        w_out = torch.randn(out.shape, device="cuda", generator=g)
        w_last = torch.randn(last.shape, device="cuda", generator=g)
        ((out * w_out).sum() + (last * w_last).sum()).backward()
        results[name] = (out, last, [leaves[k].grad for k in names])
    (out, last, grads), (out_r, last_r, grads_r) = results["cuda"], results["ref"]
    assert_close("out", out, out_r, 1e-4)
    assert_close("final_state", last, last_r, 1e-4)
    for name, gr, gr_r in zip(names, grads, grads_r):
        assert_close(f"d{name}", gr, gr_r, 1e-4)


@pytest.mark.cuda
@needs_gpu
def test_conv1d_empty_batch():
    """An empty batch launched an empty grid (batch x D blocks): a launch error, forward and backward."""
    from zoo_kernels.conv1d.cuda import causal_conv1d_cuda

    x = torch.randn(0, 8, 16, device="cuda", requires_grad=True)
    weight = torch.randn(8, 4, device="cuda", requires_grad=True)
    bias = torch.randn(8, device="cuda", requires_grad=True)
    y = causal_conv1d_cuda(x, weight, bias, activation="silu")
    y.sum().backward()
    assert y.shape == (0, 8, 16) and x.grad.shape == (0, 8, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("batch", [65537, 0], ids=["past-gridDim.y", "empty"])
def test_conv1d_update_rows_past_the_grid_limit_and_none(batch):
    """The conv update's grid put the batch in gridDim.y: from 65536 rows (and at 0) the launch failed."""
    from zoo_kernels.conv1d.cuda import causal_conv1d_update_cuda
    from zoo_kernels.conv1d.ref import causal_conv1d_update_ref

    dim, width = 8, 4
    state = torch.randn(batch, dim, width - 1, device="cuda")
    x = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16)
    weight, bias = torch.randn(dim, width, device="cuda"), torch.randn(dim, device="cuda")
    state_ref = state.clone()
    y = causal_conv1d_update_cuda(state, x, weight, bias, "silu")
    y_ref = causal_conv1d_update_ref(state_ref, x, weight, bias, "silu")
    assert_close("y", y.float(), y_ref.float(), 1e-2)
    assert_close("conv_state", state, state_ref, 1e-6)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(("batch", "nstate"), [(65537, 3), (262150, 16)], ids=["scalar-kernel", "vector-kernel"])
def test_state_update_rows_past_the_grid_limit(batch, nstate):
    """The state update's grid put the batch (the scalar kernel: N % 4 != 0) or its blocks of 4 rows (the vector
    kernel, from batch 8) in gridDim.y: past 65535 of them the launch failed."""
    from zoo_kernels.selective_scan.cuda import selective_state_update_cuda
    from zoo_kernels.selective_scan.ref import selective_state_update_ref

    dim = 8
    g = torch.Generator(device="cuda").manual_seed(0)
    state = torch.randn(batch, dim, nstate, device="cuda", generator=g)
    x, dt, z = (torch.randn(batch, dim, device="cuda", generator=g) for _ in range(3))
    B, C = (torch.randn(batch, nstate, device="cuda", generator=g) for _ in range(2))
    A = -(torch.rand(dim, nstate, device="cuda", generator=g) + 0.1)
    D, dt_bias = torch.randn(dim, device="cuda", generator=g), torch.randn(dim, device="cuda", generator=g)
    state_ref = state.clone()
    y = selective_state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, True)
    y_ref = selective_state_update_ref(state_ref, x, dt, A, B, C, D, z, dt_bias, True)
    assert_close("y", y, y_ref, 1e-4)
    assert_close("state", state, state_ref, 1e-4)


def test_scan_backward_shared_memory_against_the_gpu_limit():
    """The backward kernel's block needs 150,096 bytes of shared memory at N = 33..64 (the static_assert in
    csrc/selective_scan_kernels.cuh pins the mirror's values), more than the 101,376 a block may have on compute
    capability 8.6, 8.9 and 12.x: check_scan refuses a call asking gradients there (before, the backward's launch
    failed with "invalid argument" after the forward had run); an H100's 232,448 bytes take it."""
    from zoo_kernels.selective_scan.cuda import backward_problem, backward_smem_bytes

    assert [backward_smem_bytes(n) for n in (3, 8, 16, 32, 33, 64)] == [37648, 57744, 97936, 97872, 150096, 150096]
    problem = backward_problem(64, 101376)
    assert problem is not None and "N = 64" in problem and "150096" in problem and "101376" in problem
    assert backward_problem(32, 101376) is None and backward_problem(64, 232448) is None
    assert backward_problem(64, None) is None  # (torch does not report the limit: taken as enough)


@pytest.mark.cuda
@needs_gpu
def test_ssd_chunks_past_the_grid_limit():
    """The SSD scan's cumsum and dt kernels put the chunks of a row in gridDim.y: from L = 65535 x chunk_size + 1
    on (4.2M tokens at chunk 64) the forward's launch failed, and so did the backward's. At chunk 16, 65537 chunks:
    output, final state and every gradient against chunk 32 (32769 chunks, under the limit), fp32."""
    from test_ssd_triton import assert_all_close, make_inputs, run_both, triton_fn

    length = 65536 * 16 + 16  # 65537 chunks of 16 tokens
    inputs, _ = make_inputs(1, length, 2, 16, 1, 16, torch.float32, "cuda", seed=5)
    fn = triton_fn()
    a, b = run_both(lambda *args: fn(*args[:5], 16, *args[6:]), lambda *args: fn(*args[:5], 32, *args[6:]),
                    inputs, None, 0)
    # dA, dD and d dt_bias sum a million terms of both signs: their rounding shows more than the others'
    assert_all_close(a, b, {"default": 1e-3, "dA": 1e-2, "dD": 1e-2, "ddt_bias": 1e-2}, "chunk 16 (65537 chunks) vs 32")


def test_ssd_launch_grids_stay_within_the_axis_limits(monkeypatch):
    """Every launch of the SSD scan, forward and backward, at 65537 chunks of 16 tokens in a row keeps grid axes 1
    and 2 within 65535 (CPU: each kernel is replaced by a recorder of its grid under each autotune config, so nothing
    runs). The cumsum and dt kernels had the chunks in axis 1."""
    pytest.importorskip("triton")
    from zoo_kernels.ssd import triton_ssd

    grids: dict[str, list[tuple[int, ...]]] = {}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.configs = name, getattr(kernel, "configs", [None])

        def __getitem__(self, grid):
            def launch(*args, **meta):
                for config in self.configs:
                    full = {**meta, **(config.kwargs if config is not None else {})}
                    grids.setdefault(self.name, []).append(tuple(grid(full) if callable(grid) else grid))
            return launch

    for name in dir(triton_ssd):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(triton_ssd, name, Recorder(name, getattr(triton_ssd, name)))
    length, H, P, N = 65537 * 16, 1, 16, 16
    x = torch.zeros(1, length, H, P, requires_grad=True)
    dt = torch.zeros(1, length, H, requires_grad=True)
    B, C = (torch.zeros(1, length, 1, N, requires_grad=True) for _ in range(2))
    triton_ssd.ssd_chunk_scan_triton(x, dt, -torch.ones(H), B, C, chunk_size=16).sum().backward()
    assert {"_cumsum_fwd_kernel", "_chunk_scan_fwd_kernel", "_bwd_source_kernel", "_bwd_dt_kernel"} <= set(grids)
    over = {name: g for name, launches in grids.items() for g in launches
            if len(g) > 3 or g[0] >= 2**31 or any(axis > 65535 for axis in g[1:])}
    assert not over, f"grid axes past their limits: {over}"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-head"])
def test_decode_attention_slot_offsets_past_2_31(grouped):
    """A static KV buffer with S x Hkv x D > 2^31 elements per row: the split kernels' slot offset (slot x Hkv D)
    was an int32 product and wrapped from slot 2^31 / (Hkv D) on. Hkv = 1, D = 64, S = 2^25 + 128 (two 4.3 GB bf16
    buffers): the window of the last 256 slots straddles slot 2^25, whose offset is 2^31; against the reference on
    those slots alone."""
    from zoo_kernels.attention.decode import decode_attention, reference

    S, D, window = (1 << 25) + 128, 64, 256
    keys = torch.zeros(1, S, 1, D, device="cuda", dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    g = torch.Generator(device="cuda").manual_seed(0)
    last = slice(S - window, S)
    keys[:, last].normal_(generator=g)
    values[:, last].normal_(generator=g)
    q = torch.randn(1, 1, 2, D, device="cuda", generator=g).to(torch.bfloat16)
    o = decode_attention(q, keys, values, torch.tensor([S], device="cuda"), window, grouped=grouped)
    ref = reference(q, keys[:, last], values[:, last], window)
    assert_close("o", o.float(), ref.float(), 1e-2)


def test_decode_attention_without_rows_or_slots():
    """An empty batch returns an empty output and an empty KV buffer is refused by name; both raised
    ZeroDivisionError (the splits' and chunks' arithmetic) before. Nothing is launched: CPU tensors do."""
    pytest.importorskip("triton")
    from zoo_kernels.attention.decode import decode_attention

    q, kv = torch.randn(0, 1, 4, 16), torch.randn(0, 64, 2, 16)
    o = decode_attention(q, kv, kv, torch.tensor([10]))
    assert o.shape == (0, 1, 4, 16) and o.dtype == q.dtype
    with pytest.raises(ValueError, match="S = 0"):
        empty = torch.randn(1, 0, 2, 16)  # a row with no slot (kv[:1] of the empty batch above has no row)
        decode_attention(torch.randn(1, 1, 4, 16), empty, empty, torch.tensor([0]))


_SLOT_STRIDE = 1 << 20  # fp32 elements between two slots of the interpreter case: slot 2048 starts at 2^31


def test_decode_attention_slot_offsets_past_2_31_in_the_interpreter():
    """The same wrap on the CPU, through Triton's interpreter (which computes int32 offsets as int32 too): keys
    and values as strided views of one lazily allocated 8.6 GB storage (only the 2049 slots' pages are touched),
    slot stride 2^20, so slot 2048's offset is 2^31; a window of the last 4 slots. Before the int64 slot offsets the
    interpreter read 8 GB before the storage (a segfault); now both kernels equal the reference. Skipped where the
    address space is refused."""
    pytest.importorskip("triton")
    try:
        del_me = torch.empty(2048 * _SLOT_STRIDE + 32)
    except RuntimeError as error:
        pytest.skip(f"no 8.6 GB of address space here: {error}")
    del del_me
    run_in_interpreter(__file__)


def _interpreter_main() -> None:
    from zoo_kernels.attention.decode import decode_attention, reference

    S, D = 2049, 16
    storage = torch.empty((S - 1) * _SLOT_STRIDE + 2 * D)
    g = torch.Generator().manual_seed(0)
    for slot in range(S):
        storage[slot * _SLOT_STRIDE: slot * _SLOT_STRIDE + 2 * D] = torch.randn(2 * D, generator=g)
    keys = storage.as_strided((1, S, 1, D), (S * _SLOT_STRIDE, _SLOT_STRIDE, D, 1), 0)
    values = storage.as_strided((1, S, 1, D), (S * _SLOT_STRIDE, _SLOT_STRIDE, D, 1), D)
    q = torch.randn(1, 1, 2, D, generator=g)
    want = reference(q, keys.clone(), values.clone(), S, 4)
    for grouped in (True, False):
        o = decode_attention(q, keys, values, torch.tensor([S]), 4, grouped=grouped, splits=1)
        err = ((o - want).norm() / want.norm()).item()
        assert err < 1e-5, (grouped, err)
    print("interpreter: decode attention reads slots past offset 2^31")


if __name__ == "__main__":
    patch_triton_interpreter()
    _interpreter_main()
