"""Single-token decode kernels against their references, and the decode step's in-place state contract.

- conv1d update (CUDA): one thread per (row, channel), x read through its batch stride (a column slice of
  the in_proj output), the fp32 state shifted in place;
- selective-scan state update (CUDA): 4 states per lane with 16-byte accesses, 4 batch rows per block from batch
  8 on (a partial last group of rows), the scalar kernel for N % 4 != 0; B/C/z read through their batch strides;
  with dt_weight (Mamba's dt_proj folded in) dt is a low-rank strided slice and the kernel computes dt_low W^T;
- GLA step (Triton): on CUDA, and on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must
  be set before triton is imported);
- decode attention (Triton): the per-head and the grouped split kernels over splits and launch configurations,
  with and without a window, on CUDA and (fp32: the interpreter's bf16 tl.dot is wrong) in the interpreter;
- the mixers' decode steps update the cached states in place (CUDA graphs replay them at fixed addresses) and
  still equal the full forward; Mamba's step with dt_proj folded in decodes like the dt_proj matmul; constants
  kept across steps follow parameter changes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import patch_triton_interpreter, rel_err, run_in_interpreter
from zoo_kernels.conv1d.ref import causal_conv1d_update_ref
from zoo_kernels.gla.ref import gla_state_update_ref
from zoo_kernels.selective_scan.ref import selective_state_update_ref

from zoo.cache import output_cache

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")



@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["silu", None])
def test_conv_update_kernel_matches_reference(dtype, width, bias, act):
    from zoo_kernels.conv1d.cuda import causal_conv1d_update_cuda

    torch.manual_seed(0)
    batch, dim = 5, 200
    wide = torch.randn(batch, 3 * dim, device="cuda").to(dtype)
    x = wide[:, dim:2 * dim]  # a strided column slice, as the mixers pass it
    w = torch.randn(dim, width, device="cuda")
    b = torch.randn(dim, device="cuda") if bias else None
    state = torch.randn(batch, dim, width - 1, device="cuda")
    ref_state = state.clone()
    for _ in range(3):  # a few steps: the shift carries over
        y = causal_conv1d_update_cuda(state, x, w, b, act)
        y_ref = causal_conv1d_update_ref(ref_state, x, w, b, act)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert y.dtype == dtype and rel_err(y, y_ref) < tol
        assert torch.equal(state, ref_state)
        x = x * 0.5 + 0.1


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,G,batch,rank", [
    (4, 1, 3, 8), (8, 1, 3, 8), (16, 1, 3, 8), (16, 2, 3, 8), (32, 1, 3, 8), (64, 4, 3, 8),
    # from batch 8 on a block takes 4 rows: 9 leaves a partial last row group, 64 none
    (16, 2, 9, 8), (16, 1, 64, 8), (64, 4, 9, 8), (32, 2, 64, 8),
    (12, 1, 3, 8), (12, 2, 9, 8),  # N a multiple of 4, not a power of two: an idle lane per channel
    (256, 1, 9, 8),  # more 4-state groups than 32 lanes: each lane loops
    (16, 1, 9, 5),  # B/C rows not 4-element aligned: scalar B/C loads
    (6, 1, 3, 8), (6, 2, 9, 8),  # N % 4 != 0: the scalar kernel
])
def test_state_update_kernel_matches_reference(dtype, N, G, batch, rank):
    from zoo_kernels.selective_scan.cuda import selective_state_update_cuda

    torch.manual_seed(N + G + batch)
    dim = 136  # not a multiple of the channels per block
    A = -torch.rand(dim, N, device="cuda") * 3
    D = torch.randn(dim, device="cuda")
    xz = torch.randn(batch, 2 * dim, device="cuda").to(dtype)
    x, z = xz[:, :dim], xz[:, dim:]  # strided slices, as the Mamba mixer passes them
    dbl = torch.randn(batch, rank + 2 * G * N, device="cuda").to(dtype)
    Bs, Cs = dbl[:, rank:rank + G * N], dbl[:, rank + G * N:]
    if G > 1:
        Bs, Cs = Bs.unflatten(-1, (G, N)), Cs.unflatten(-1, (G, N))
    dt = torch.randn(batch, dim, device="cuda").to(dtype)
    bias = torch.randn(dim, device="cuda") * 0.1
    state = torch.randn(batch, dim, N, device="cuda")
    ref_state = state.clone()
    y = selective_state_update_cuda(state, x, dt, A, Bs, Cs, D, z, bias, True)
    y_ref = selective_state_update_ref(ref_state, x, dt, A, Bs, Cs, D, z, bias, True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(y, y_ref) < tol
    assert rel_err(state, ref_state) < 1e-5


def _low_rank_inputs(device, dtype, batch, dim, N, rank, shift=0, seed=0):
    """The state update's inputs as the Mamba step passes them with dt_proj folded in: dt_low, B and C column
    slices of one x_proj output (shift > 0 moves them off 4-element alignment), x and z slices of in_proj's."""
    gen = torch.Generator().manual_seed(seed)
    x_dbl = torch.randn(batch, shift + rank + 2 * N, generator=gen).to(device, dtype)
    dt_low, Bs, Cs = x_dbl[:, shift:].split([rank, N, N], dim=1)
    xz = torch.randn(batch, 2 * dim, generator=gen).to(device, dtype)
    weight = (torch.randn(dim, rank, generator=gen) * rank ** -0.5).to(device, dtype)
    A = (-torch.rand(dim, N, generator=gen) * 3).to(device)
    D, bias = torch.randn(dim, generator=gen).to(device), (torch.randn(dim, generator=gen) * 0.1).to(device)
    state = torch.randn(batch, dim, N, generator=gen).to(device)
    return state, xz[:, :dim], dt_low, A, Bs, Cs, D, xz[:, dim:], bias, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 5, 48, 64])
@pytest.mark.parametrize("batch", [1, 3, 9])
@pytest.mark.parametrize("with_bias,softplus", [(True, True), (False, True), (True, False), (False, False)])
def test_low_rank_dt_reference_equals_the_precomputed_dt(dtype, rank, batch, with_bias, softplus):
    """dt_weight: the step computes dt = dt_low @ W.T (fp32) itself, then bias and softplus, as if given that dt."""
    from zoo_kernels.selective_scan import selective_state_update

    state, x, dt_low, A, Bs, Cs, D, z, bias, weight = _low_rank_inputs("cpu", dtype, batch, 40, 8, rank)
    bias = bias if with_bias else None
    ref_state = state.clone()
    y = selective_state_update(state, x, dt_low, A, Bs, Cs, D, z, bias, softplus, weight, backend="ref")
    dt = dt_low.float() @ weight.float().T
    y_ref = selective_state_update_ref(ref_state, x, dt, A, Bs, Cs, D, z, bias, softplus)
    assert y.dtype == dtype and rel_err(y, y_ref) < 1e-6
    assert rel_err(state, ref_state) < 1e-6


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 9, 64])
@pytest.mark.parametrize("N,rank,shift", [
    (16, 48, 0), (16, 5, 0), (16, 1, 0), (16, 256, 0),  # the vector kernel, 4 lanes per channel
    (16, 48, 1),  # dt_low, B, C, off 4-element alignment: one term per load
    (4, 48, 0), (12, 48, 0), (128, 64, 0),  # 1 lane (the whole dot product), 4 with one state-idle, 32
    (6, 48, 0), (6, 5, 0),  # N % 4 != 0: the scalar kernel
])
def test_state_update_kernel_with_low_rank_dt_matches_reference(dtype, batch, N, rank, shift):
    from zoo_kernels.selective_scan.cuda import selective_state_update_cuda

    state, x, dt_low, A, Bs, Cs, D, z, bias, weight = _low_rank_inputs("cuda", dtype, batch, 136, N, rank, shift)
    ref_state = state.clone()
    y = selective_state_update_cuda(state, x, dt_low, A, Bs, Cs, D, z, bias, True, dt_weight=weight)
    y_ref = selective_state_update_ref(ref_state, x, dt_low, A, Bs, Cs, D, z, bias, True, dt_weight=weight)
    assert y.dtype == dtype and rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(state, ref_state) < 1e-5


def _gla_inputs(device, dtype, batch=3, H=2, K=24, V=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, H, K, generator=gen).to(device, dtype) for _ in range(2))
    v = torch.randn(batch, H, V, generator=gen).to(device, dtype)
    g = -torch.rand(batch, H, K, generator=gen).to(device) * 0.5
    state = torch.randn(batch, H, K, V, generator=gen).to(device)
    return state, q, k, v, g


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(24, 40), (96, 192), (128, 128), (256, 64)])
def test_gla_step_kernel_matches_reference_cuda(dtype, K, V):
    from zoo_kernels.gla import gla_state_update

    state, q, k, v, g = _gla_inputs("cuda", dtype, K=K, V=V)
    ref_state = state.clone()
    o = gla_state_update(state, q, k, v, g, backend="triton")
    o_ref = gla_state_update_ref(ref_state, q, k, v, g)
    assert o.dtype == dtype
    assert rel_err(o, o_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(state, ref_state) < 1e-5


def test_gla_step_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    run_in_interpreter(__file__)


def _interpreter_main() -> None:
    from zoo_kernels.gla import gla_state_update

    for K, V in ((24, 40), (16, 16)):
        state, q, k, v, g = _gla_inputs("cpu", torch.float32, K=K, V=V)
        ref_state = state.clone()
        o = gla_state_update(state, q, k, v, g, 0.3, backend="triton")
        o_ref = gla_state_update_ref(ref_state, q, k, v, g, 0.3)
        assert rel_err(o, o_ref) < 1e-5, (K, V, rel_err(o, o_ref))
        assert rel_err(state, ref_state) < 1e-6
    print("interpreter: GLA step matches the reference")
    from zoo_kernels.gated_norm import gated_rms_norm

    for before, group, z_on in ((False, 24, True), (True, 48, True), (False, 48, False)):
        x, z, w = _norm_inputs("cpu", torch.float32, d=48)
        y = gated_rms_norm(x, z if z_on else None, w, 1e-5, group, before)
        y_ref = _norm_reference(x, z if z_on else None, w, group, before)
        assert rel_err(y, y_ref) < 1e-5, (before, group, rel_err(y, y_ref))
    # x, z with a last dimension that is not unit-stride, a strided weight: read as unit-stride, they gave wrong
    # numbers (the Mamba-2 / GLA module passes unit-stride ones only); now copied
    x, z, w = _norm_inputs("cpu", torch.float32, d=48)
    xt, zt, ws = x.t().contiguous().t(), z.t().contiguous().t(), torch.stack([w, w + 1], -1)[:, 0]
    assert xt.stride(-1) != 1 and ws.stride(-1) != 1
    for before in (False, True):
        y = gated_rms_norm(xt, zt, ws, 1e-5, 24, before)
        assert rel_err(y, _norm_reference(x, z, w, 24, before)) < 1e-5, ("strided", before)
    print("interpreter: gated RMSNorm matches the formula")
    from zoo_kernels.attention.decode import decode_attention, reference

    for window, splits, length in ((None, 3, 150), (None, 1, 7), (37, 4, 200), (5, 2, 3)):
        q, keys, values = _attn_inputs("cpu", torch.float32, B=2, H=4, Hkv=2, D=32, S=208)
        o = decode_attention(q, keys, values, torch.tensor([length]), window, splits=splits)
        assert rel_err(o, reference(q, keys, values, length, window)) < 1e-5, (window, splits, length)
    q, keys, values = _attn_inputs("cpu", torch.float32, B=2, H=4, Hkv=2, D=32, S=208)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # a query not unit-stride over D: copied, was misread
    for grouped in (True, False):
        o = decode_attention(qt, keys, values, torch.tensor([150]), None, grouped=grouped)
        assert rel_err(o, reference(q, keys, values, 150, None)) < 1e-5, ("strided q", grouped)
    print("interpreter: decode attention matches the reference")
    start = torch.tensor([0, 41])  # left-padded rows: row 1 sees no slot below 41
    for grouped in (True, False):
        for window, splits, length in ((None, 3, 150), (37, 4, 200), (None, 1, 42)):
            q, keys, values = _attn_inputs("cpu", torch.float32, B=2, H=4, Hkv=2, D=32, S=208)
            o = decode_attention(q, keys, values, torch.tensor([length]), window, splits=splits, grouped=grouped,
                                 start=start)
            want = reference(q, keys, values, length, window, start=start)
            assert rel_err(o, want) < 1e-5, ("start", grouped, window, splits, length)
            assert rel_err(want[1:], reference(q, keys, values, length, window)[1:]) > 1e-3 or window == 37
    # start as a strided view (a column of a [B, 2] tensor): read at unit stride, row 1 saw 7 pads, not its 41
    start_view = torch.tensor([[0, 7], [41, 7]])[:, 0]
    q, keys, values = _attn_inputs("cpu", torch.float32, B=2, H=4, Hkv=2, D=32, S=208)
    for grouped in (True, False):
        o = decode_attention(q, keys, values, torch.tensor([150]), None, splits=3, grouped=grouped, start=start_view)
        assert rel_err(o, reference(q, keys, values, 150, None, start=start)) < 1e-5, ("strided start", grouped)
    print("interpreter: decode attention of left-padded rows matches the reference")
    _check_ring_decode_attention()
    print("interpreter: decode attention over a sliding-window ring matches the reference")
    for group, D, window in ((1, 64, None), (3, 64, None), (4, 64, 37), (3, 24, 37)):  # 24: below its block
        _check_decode_attention("cpu", torch.float32, group, D, window, True, S=208, lengths=(150, 1),
                                splits_list=(None, 3, 16), launches=((None, None, None), (32, 2, 1)))
    print("interpreter: grouped decode attention matches the reference")
    _check_rope("cpu", torch.float32)
    print("interpreter: one-token RoPE matches the mixer's tables")
    from zoo_kernels.add_norm import add_rms_norm

    for res_dtype, with_delta, d in ((torch.float32, True, 48), (torch.float32, False, 20), (torch.bfloat16, True, 7)):
        res, delta, w = _add_norm_inputs("cpu", res_dtype, torch.float32, d=d)
        r, y = add_rms_norm(res, delta if with_delta else None, w, 1e-5, torch.float32)
        r_ref, y_ref = add_norm_reference(res, delta if with_delta else None, w, 1e-5, torch.float32)
        assert r.dtype == r_ref.dtype and torch.equal(r, r_ref), (res_dtype, with_delta, d)
        assert rel_err(y, y_ref) < 1e-5, (res_dtype, with_delta, d, rel_err(y, y_ref))
    res = torch.randn(3, 16, 5).transpose(1, 2)  # a last dimension that is not unit-stride is copied, not refused
    delta = torch.randn(16, 5, 3).permute(2, 1, 0)
    weight = torch.rand(16) + 0.5
    r, y = add_rms_norm(res, delta, weight, 1e-5, torch.float32)
    r_ref, y_ref = add_norm_reference(res, delta, weight, 1e-5, torch.float32)
    assert torch.equal(r, r_ref) and rel_err(y, y_ref) < 1e-5
    strided = torch.stack([weight, weight + 1], -1)[:, 0]  # a weight view of stride 2: copied, was misread
    r, y = add_rms_norm(res, delta, strided, 1e-5, torch.float32)
    assert torch.equal(r, r_ref) and rel_err(y, y_ref) < 1e-5, "strided weight"
    print("interpreter: residual add + RMSNorm matches the block's formula")
    from zoo_kernels.skinny_linear import skinny_linear

    # fp32 and fp16 (the interpreter's bf16 products are wrong: Triton 3.9 gives garbage for tl.dot on bf16)
    for rows, k, n, bias, dtype in ((1, 40, 70, False, torch.float32), (5, 100, 33, True, torch.float32),
                                    (64, 48, 96, True, torch.float32), (17, 130, 20, True, torch.float16)):
        gen = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, 2 * k, generator=gen)[:, :k].to(dtype)  # strided rows, as a column slice gives
        w = torch.randn(n, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        y = skinny_linear(x, w, b)
        y_ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        assert y.dtype == dtype and y.shape == (rows, n) and rel_err(y, y_ref) < 1e-3, (rows, k, n, rel_err(y, y_ref))
        if b is not None:  # a bias view of stride 2: copied, was misread
            y = skinny_linear(x, w, torch.stack([b, b + 1], -1)[:, 0])
            assert rel_err(y, y_ref) < 1e-3, ("strided bias", rows, k, n, rel_err(y, y_ref))
    print("interpreter: skinny linear matches F.linear")


def _add_norm_inputs(device, res_dtype, dtype, rows=5, d=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    res = torch.randn(rows, 2, d, generator=gen).to(device, res_dtype)
    delta = torch.randn(rows, 2, 2 * d, generator=gen).to(device, dtype)[..., d:]  # a strided view
    return res, delta, (torch.rand(d, generator=gen) + 0.5).to(device, dtype)


def add_norm_reference(residual, delta, weight, eps, out_dtype, residual_dtype=None):
    """zoo.layers.Block's formula: r = residual + delta, then RMSNorm(r.to(weight dtype)) · weight."""
    from zoo.layers import RMSNorm

    r = residual if delta is None else residual + delta
    if residual_dtype is not None:
        r = r.to(residual_dtype)
    norm = RMSNorm(weight.shape[0], eps).to(weight.device, weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return r, norm(r.to(out_dtype))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("res_dtype,dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("d,with_delta", [(768, True), (1000, True), (768, False), (4096, True)])
def test_add_norm_kernel_matches_the_block(res_dtype, dtype, d, with_delta):
    from zoo_kernels.add_norm import add_rms_norm

    res, delta, w = _add_norm_inputs("cuda", res_dtype, dtype, rows=37, d=d)
    delta = delta if with_delta else None
    r, y = add_rms_norm(res, delta, w, 1e-5, dtype, res_dtype)
    r_ref, y_ref = add_norm_reference(res, delta, w, 1e-5, dtype, res_dtype)
    assert r.dtype == res_dtype and y.dtype == dtype
    assert torch.equal(r, r_ref)
    assert rel_err(y, y_ref) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_blocks_with_pending_adds_equal_the_plain_blocks():
    """Block.forward_pending (the adds carried into the next norm) chains to what Block.forward computes; on
    CPU with the torch formula in the kernel's place (the kernel itself: the interpreter and cuda tests)."""
    from transformers import AutoModelForCausalLM

    import zoo

    for residual_in_fp32 in (True, False):
        config = zoo.ZooConfig(vocab_size=64, d_model=32, layers="MAM", ffn={"type": "swiglu", "hidden": 64},
                               mixers={"M": {"type": "mamba", "d_state": 8},
                                       "A": {"type": "attention", "n_heads": 2}},
                               residual_in_fp32=residual_in_fp32)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
        x = model.model.embeddings(torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)))
        with torch.no_grad():
            plain, pending, fused = x, None, x
            for block in model.model.layers:
                plain = block(plain)[0]
                fused, pending, _ = block.forward_pending(fused, pending, add_norm_reference)
            norm_f = model.model.norm_f
            want = norm_f(plain.to(norm_f.weight.dtype))
            got = add_norm_reference(fused, pending, norm_f.weight, norm_f.eps, norm_f.weight.dtype)[1]
        assert torch.equal(got, want), residual_in_fp32


def test_pending_adds_take_the_norms_peft_tuned():
    """The fused add + norm (CUDA inference) read each norm's `.weight` and `.eps`; a norm tuned with PEFT's LN tuning
    has no eps (an LN-tuned model failed every CUDA forward without gradients, generate included, with "'LNTuningLayer'
    object has no attribute 'eps'"), and its `.weight` is its base layer's. The wrapped norms are called now; on CPU
    with the torch formula in the kernel's place, as the test above."""
    from peft import LNTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import zoo

    config = zoo.ZooConfig(vocab_size=64, d_model=32, layers="MAM", ffn={"type": "swiglu", "hidden": 64},
                           mixers={"M": {"type": "mamba", "d_state": 8}, "A": {"type": "attention", "n_heads": 2}})
    torch.manual_seed(0)
    tuned = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LNTuningConfig(target_modules=["norm", "ffn_norm", "norm_f"])).eval()
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:  # the tuned copies of the norms' weights
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) + 0.5)
    model = tuned.get_base_model().model
    assert type(model.layers[0].norm).__name__ == "LNTuningLayer"
    x = model.embeddings(torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        plain, pending, fused = x, None, x
        for block in model.layers:
            plain = block(plain)[0]
            fused, pending, _ = block.forward_pending(fused, pending, add_norm_reference)
        torch.testing.assert_close(fused + pending, plain, rtol=1e-5, atol=1e-5)
        from zoo.layers import add_then_norm  # the final norm's, as ZooModel.forward takes it

        got = add_then_norm(add_norm_reference, model.norm_f, fused, pending, plain.dtype)[1]
        torch.testing.assert_close(got, model.norm_f(plain), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["mamba", "transformerpp", "jamba", "gla", "mamba2"])
def test_fused_inference_forward_equals_the_training_forward(name):
    """Under no_grad on CUDA the model runs its blocks with the fused add + norm; logits match the autograd
    path's (which keeps the separate ops) in bf16."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401 - registers the model type

    config = zoo.ZooConfig.from_yaml(Path(__file__).parents[1] / "configs" / "models" / f"{name}-tiny.yaml")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (3, 40), device="cuda")
    with torch.no_grad():
        fused = model(ids).logits.float()
    with torch.enable_grad():
        plain = model(ids).logits.float()
    assert rel_err(fused, plain) < 1e-2


def _norm_inputs(device, dtype, rows=5, d=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, 2 * d, generator=gen).to(device, dtype)
    return wide[:, :d], torch.randn(rows, d, generator=gen).to(device, dtype), \
        (torch.rand(d, generator=gen) + 0.5).to(device, dtype)


def _norm_reference(x, z, w, group, before):
    from zoo.layers import GatedRMSNorm

    norm = GatedRMSNorm(x.shape[-1], eps=1e-5, group_size=group, norm_before_gate=before).to(x.device, w.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    with torch.enable_grad():  # the torch formula (the fused kernel serves only inference)
        return norm(x, z).detach()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,group,before,z_on", [(1536, 1536, False, True), (1536, 384, False, True),
                                                 (192, 192, True, True), (192, 64, True, False)])
def test_gated_norm_kernel_matches_the_formula(dtype, d, group, before, z_on):
    from zoo.layers import GatedRMSNorm

    x, z, w = _norm_inputs("cuda", dtype, d=d)
    norm = GatedRMSNorm(d, eps=1e-5, group_size=group, norm_before_gate=before).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        y = norm(x, z if z_on else None)  # inference: the Triton kernel
    y_ref = _norm_reference(x, z if z_on else None, w, group, before)
    assert y.dtype == dtype and rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def _attn_inputs(device, dtype, B, H, Hkv, D, S, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=gen).to(device, dtype)
    keys, values = (torch.randn(B, S, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))
    return q, keys, values


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,D,S,length,window", [
    (1, 12, 12, 64, 2192, 2100, None), (64, 12, 12, 64, 2192, 2049, None), (3, 12, 4, 128, 400, 1, None),
    (2, 8, 2, 256, 1000, 999, None), (4, 4, 2, 64, 300, 290, 37), (2, 6, 6, 80, 130, 17, 64)])
def test_decode_attention_kernel_matches_reference(dtype, B, H, Hkv, D, S, length, window):
    from zoo_kernels.attention.decode import decode_attention, reference

    q, keys, values = _attn_inputs("cuda", dtype, B, H, Hkv, D, S)
    o = decode_attention(q, keys, values, torch.tensor([length], device="cuda"), window)
    assert o.dtype == dtype and o.shape == q.shape
    assert rel_err(o, reference(q, keys, values, length, window)) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("window", [0, -3])
def test_decode_attention_refuses_a_window_below_one(window):
    """window 0 made the kernels mask every key (lo = length): NaN, where `reference` (and the mixer, which
    refuses it) reads 0 as no window."""
    pytest.importorskip("triton")
    from zoo_kernels.attention.decode import decode_attention

    q, keys, values = _attn_inputs("cpu", torch.float32, B=1, H=2, Hkv=1, D=16, S=64)
    with pytest.raises(ValueError, match="window"):
        decode_attention(q, keys, values, torch.tensor([10]), window, splits=1)


@pytest.mark.parametrize("bad", ["values_slots", "keys_batch", "head_dim"])
def test_decode_attention_refuses_mismatched_shapes(bad):
    """The kernels index keys and values by q's rows and head size and by keys' slots and heads: values with fewer
    slots, a KV buffer of fewer rows or another head size than q were read out of bounds; refused now."""
    pytest.importorskip("triton")
    from zoo_kernels.attention.decode import decode_attention

    q, keys, values = _attn_inputs("cpu", torch.float32, B=2, H=2, Hkv=1, D=16, S=64)
    if bad == "values_slots":
        values = values[:, :32]
    elif bad == "keys_batch":
        keys, values = keys[:1], values[:1]
    else:
        keys, values = keys[..., :8], values[..., :8]
    with pytest.raises(ValueError, match="decode_attention: keys and values"):
        decode_attention(q, keys, values, torch.tensor([10]), splits=1)


@pytest.mark.parametrize("length", [torch.tensor([10, 3]), torch.tensor(10.0).reshape(1), 10],
                         ids=["per-row", "float", "int"])
def test_decode_attention_refuses_a_length_that_is_not_one_integer(length):
    """The kernels read length[0] alone: a per-row length [B] gave row 1 the 10 keys of row 0 where it asked for 3
    (fuzzed in the interpreter); a float one was compared as a float, a Python int failed inside tl.load."""
    pytest.importorskip("triton")
    from zoo_kernels.attention.decode import decode_attention

    q, keys, values = _attn_inputs("cpu", torch.float32, B=2, H=2, Hkv=1, D=16, S=64)
    with pytest.raises(ValueError, match="decode_attention: length must be"):
        decode_attention(q, keys, values, length, splits=1)


def _check_decode_attention(device, dtype, group, D, window, grouped, S=400, lengths=(333, 1),
                            splits_list=(None, 1, 3, 16), launches=((None, None, None),)):
    """decode_attention against the reference for each length, splits and launch configuration (block_n,
    num_warps, num_stages). The lengths stay below S, so the chunks past them hold no visible key, and so do the
    ones before a window; 16 splits of 400 slots round to fewer (whole blocks per chunk)."""
    from zoo_kernels.attention.decode import decode_attention, reference

    Hkv = 2
    q, keys, values = _attn_inputs(device, dtype, B=3, H=group * Hkv, Hkv=Hkv, D=D, S=S, seed=group + D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for length in lengths:
        want = reference(q, keys, values, length, window)
        for splits in splits_list:
            for block_n, num_warps, num_stages in launches:
                o = decode_attention(q, keys, values, torch.tensor([length], device=device), window, splits=splits,
                                     grouped=grouped, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
                assert o.dtype == dtype and o.shape == q.shape
                err = rel_err(o, want)
                assert err < tol, (group, D, window, length, splits, block_n, num_warps, num_stages, err)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("grouped", [True, False])
def test_decode_attention_of_left_padded_rows_matches_reference(dtype, window, grouped):
    """start: each row's first visible slot (its left padding ends there), for the static decode of padded rows."""
    from zoo_kernels.attention.decode import decode_attention, reference

    q, keys, values = _attn_inputs("cuda", dtype, B=3, H=8, Hkv=2, D=64, S=400, seed=7)
    start = torch.tensor([0, 130, 332], device="cuda")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for splits in (None, 1, 3, 16):
        o = decode_attention(q, keys, values, torch.tensor([333], device="cuda"), window, splits=splits,
                             grouped=grouped, start=start)
        assert rel_err(o, reference(q, keys, values, 333, window, start=start.cpu())) < tol, splits


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("grouped", [True, False])
def test_decode_attention_kernels_match_reference_across_launches(dtype, group, D, window, grouped):
    """Both split kernels at their defaults and at other blocks, warps and pipelining stages (in fp32 unpipelined
    at 128 keys: three stages of 128 x 128 fp32 keys and values overflow the shared memory)."""
    stages = 1 if dtype == torch.float32 else 3
    _check_decode_attention("cuda", dtype, group, D, window, grouped,
                            launches=((None, None, None), (32, 2, 1), (128, 8, stages)))


def _check_ring_decode_attention() -> None:
    """A static layer of window 5 and capacity 200 is a ring of 10 slots (zoo.cache.StaticKVLayer): read by the
    kernel through its kernel_view, each step sees the last 5 tokens (from each row's first token on), as the
    reference over every token in position order does, before and after the ring wraps."""
    from zoo_kernels.attention.decode import decode_attention, reference

    from zoo.cache import StaticKVLayer

    gen = torch.Generator().manual_seed(9)
    B, Hkv, D, W, seen, total = 2, 2, 32, 5, 3, 24
    for start in (None, torch.tensor([0, 2])):
        layer = StaticKVLayer(B, 200, Hkv, D, dtype=torch.float32, device="cpu", window=W)
        assert layer.ring == W and layer.keys.shape[1] == 16
        keys, values = (torch.randn(B, total, Hkv, D, generator=gen) for _ in range(2))
        layer.load(keys[:, :seen].transpose(1, 2), values[:, :seen].transpose(1, 2), seen)
        layer.start = start
        for t in range(seen, total):
            q = torch.randn(B, 1, 2 * Hkv, D, generator=gen)
            layer.write(keys[:, t:t + 1], values[:, t:t + 1])
            length, first = layer.kernel_view()
            want = reference(q, keys, values, t + 1, W, start=start)
            for grouped in (True, False):
                o = decode_attention(q, layer.keys, layer.values, length, W, splits=2, grouped=grouped, start=first)
                assert rel_err(o, want) < 1e-5, ("ring", start, t, grouped, rel_err(o, want))


def _check_rope(device, dtype):
    from zoo_kernels.attention.decode import rope_one_token

    from zoo.mixers.attention import Attention

    mixer = Attention(64, n_heads=4, rope_theta=10000.0).to(device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 4, 16, generator=gen).to(device, dtype)
    pos = torch.tensor([[0], [17], [70000]]).to(device)
    y = rope_one_token(x, pos, mixer.rope_inv_freq(x.device))
    y_ref = mixer.apply_rope(x, mixer.rope_tables(pos))
    assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2), rel_err(y, y_ref)
    # inv_freq as a strided view (stride 2): read at unit stride, it took every other frequency
    inv_freq = mixer.rope_inv_freq(x.device)
    y = rope_one_token(x, pos, torch.stack([inv_freq, inv_freq + 1], -1)[:, 0])
    assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2), ("strided inv_freq", rel_err(y, y_ref))
    # a position_ids or inv_freq of the wrong shape was read out of bounds: refused
    for bad_pos, bad_freq in ((pos[:1], inv_freq), (pos, inv_freq[:4])):
        with pytest.raises(ValueError, match="rope_one_token"):
            rope_one_token(x, bad_pos, bad_freq)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_one_token_matches_the_mixer(dtype):
    _check_rope("cuda", dtype)


# ---- the mixers' steps ------------------------------------------------------------------------------------------

def _tiny(kind: str):
    import zoo

    mixers = {"mamba": {"type": "mamba", "d_state": 8}, "mamba2": {"type": "mamba2", "d_state": 16, "head_dim": 16},
              "gla": {"type": "gla", "n_heads": 2}}
    config = zoo.ZooConfig(vocab_size=64, d_model=32, layers="MM", mixers={"M": mixers[kind]}, ffn="none")
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gla"])
def test_decode_step_updates_states_in_place_and_equals_the_forward(kind):
    model = _tiny(kind)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        cache = output_cache(out)
        steps, pointers = [], []
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            pointers.append([[x.data_ptr() for x in layer.tensors()] for layer in cache.layers])
    assert torch.allclose(torch.cat(steps, 1), full[:, 8:], atol=1e-4, rtol=1e-4)
    # the first step may make a prefilled state contiguous fp32 (the conv state is a view of the prompt's tail
    # on some paths); from then on every step writes into the same tensors
    assert all(p == pointers[0] for p in pointers[1:])


class _WrappedLinear(torch.nn.Linear):
    """Not a plain nn.Linear, as a PEFT adapter's wrapper is not: the Mamba step must call it."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_step_with_dt_proj_folded_in_decodes_like_the_matmul(dtype, monkeypatch):
    """The Mamba step passes dt_proj's weight to the state update (on CPU the reference's dot product) instead of
    calling dt_proj; greedy decoding gives the logits of the dt_proj matmul path, which a wrapped dt_proj takes.
    The projections get nn.Linear's init: with the zoo's small one dt_low @ W.T is ~1e-3 next to the bias, and the
    logits hardly depend on it. Sensitivity: W scaled by 1.001 moves the fp32 logits by 1.5e-6."""
    import zoo.mixers.mamba as mamba_module

    weights = []
    update = mamba_module.selective_state_update
    monkeypatch.setattr(mamba_module, "selective_state_update",
                        lambda *args, **kw: weights.append(args[10] if len(args) > 10 else None) or update(*args, **kw))
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    runs = {}
    for folded in (True, False):
        model = _tiny("mamba")
        mixers = [layer.mixer for layer in model.model.layers]
        for mixer in mixers:
            for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
                getattr(mixer, name).reset_parameters()
            if not folded:
                mixer.dt_proj.__class__ = _WrappedLinear
        model.to(dtype)
        weights.clear()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        passed = [mixer.dt_proj.weight if folded else None for mixer in mixers] * 5  # the 5 steps after the prefill
        assert len(weights) == len(passed) and all(w is want for w, want in zip(weights, passed))
        runs[folded] = out.sequences, torch.stack(out.logits, 1).float()
    assert torch.equal(runs[True][0], runs[False][0])
    # bf16: the matmul rounds dt to bf16 (1.3e-3 here), the kernel keeps it in fp32
    assert rel_err(runs[True][1], runs[False][1]) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_decode_kernels_are_skipped_where_gradients_are_needed():
    """The single-step kernels have no backward: a call that needs gradients takes the torch reference."""
    from zoo_kernels._grad import needs_grad

    w = torch.ones(2, requires_grad=True)
    assert needs_grad(None, w) and not needs_grad(w.detach(), None)
    with torch.no_grad():
        assert not needs_grad(w)


def test_decoded_constants_follow_parameter_changes():
    from zoo.layers import decoded_constants

    lin = torch.nn.Linear(3, 3)
    with torch.no_grad():
        first = decoded_constants(lin, "_c", (lin.weight,), lambda: lin.weight.float() * 2)
        assert decoded_constants(lin, "_c", (lin.weight,), lambda: None) is first  # kept
        before = first.clone()
        lin.weight.add_(1.0)  # an in-place change bumps the version
        second = decoded_constants(lin, "_c", (lin.weight,), lambda: lin.weight.float() * 2)
    assert second is first, "made again, written into the kept tensor (a kept CUDA graph reads it there)"
    assert torch.allclose(second, before + 2)
    fresh = decoded_constants(lin, "_c", (lin.weight,), lambda: lin.weight * 2)
    assert fresh.requires_grad  # with autograd on: computed afresh, in the graph


def test_decoded_constants_keep_a_compiled_forward_whole():
    """Traced by torch.compile (an evaluation under no_grad of a compiled model), the constants are made in the
    compiled graph: the storage checks of the kept ones (untyped_storage().data_ptr()) broke the graph at every
    Mamba-2 layer (its A) and every compiled forward ran in pieces."""
    from zoo.layers import decoded_constants

    torch._dynamo.reset()
    lin = torch.nn.Linear(3, 3)
    compiled = torch.compile(lambda x: x * decoded_constants(lin, "_c", (lin.weight,), lambda: lin.weight.float() * 2),
                             backend="eager", fullgraph=True)
    x = torch.randn(3, 3)
    with torch.no_grad():
        assert torch.equal(compiled(x), x * lin.weight * 2)
        lin.weight.add_(1.0)
        assert torch.equal(compiled(x), x * lin.weight * 2)
    torch._dynamo.reset()



@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 16, 64])
@pytest.mark.parametrize("k,n,bias", [(768, 3072, False), (1536, 80, False), (48, 1536, True), (2048, 768, False),
                                      (100, 50280, False), (33, 17, True)])
def test_skinny_linear_matches_cublas(dtype, rows, k, n, bias):
    from zoo_kernels.skinny_linear import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 1, 2 * k, device="cuda", generator=gen).to(dtype)[..., k:]
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    y = skinny_linear(x, w, b)
    y_ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (rows, 1, n) and y.dtype == dtype and rel_err(y, y_ref) < 1e-2


def test_skinny_linear_refuses_mixed_inputs_and_sums_nothing_at_k0():
    """Checked before any launch (so on CPU, no interpreter): K = 0 gives F.linear's zeros plus the bias (reshape
    failed on it); a weight or bias of another dtype than x (bf16 x, fp32 weight: a tl.dot assertion), a dtype the
    kernel does not take (fp64 was computed wrong), or another device is a ValueError that says which."""
    pytest.importorskip("triton")
    from zoo_kernels.skinny_linear import skinny_linear

    F = torch.nn.functional
    for x, w, b in ((torch.randn(3, 0), torch.randn(5, 0), torch.randn(5)),
                    (torch.randn(2, 1, 0), torch.randn(4, 0), None), (torch.randn(0, 0), torch.randn(4, 0), None)):
        y = skinny_linear(x, w, b)
        assert y.dtype == x.dtype and torch.equal(y, F.linear(x, w, b)), (x.shape, b is None)
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    for args, word in (((x.bfloat16(), w), "dtype"), ((x, w.bfloat16()), "dtype"), ((x.half(), w), "dtype"),
                       ((x, w, torch.randn(8).bfloat16()), "dtype"), ((x.double(), w.double()), "float64"),
                       ((x, w.to("meta")), "device"), ((x, w, torch.randn(8, device="meta")), "device"),
                       ((x, torch.randn(16)), "weight")):
        with pytest.raises(ValueError, match=word):
            skinny_linear(*args)


@pytest.mark.cuda
@cuda
def test_zoo_linear_takes_the_kernel_only_for_one_row_and_k_at_least_n(monkeypatch):
    """The rule benchmarks/decode_linear.py and generate.py measured: the kernel beats cuBLAS inside a graph only
    at one row with K >= N (out_proj, o_proj, down_proj); everything else stays on cuBLAS. Only in zoo.decode's
    steps (`decoding()`): outside them (transformers' eager generate) a Triton launch's host cost is the step's."""
    import zoo.layers as layers

    monkeypatch.setattr(layers, "DECODE_PDL", False)  # (the PDL kernel's rule: the next test)
    calls = []
    kernel = layers._skinny_linear()
    monkeypatch.setattr(layers, "_skinny_linear", lambda: lambda *a: calls.append(1) or kernel(*a))
    lin = layers.Linear(96, 64, bias=True).to("cuda", torch.bfloat16)
    x = torch.randn(2, 1, 96, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x[:1])  # not in a decode step: cuBLAS
        assert not calls
        with layers.decoding():
            assert rel_err(lin(x[:1]), torch.nn.functional.linear(x[:1], lin.weight, lin.bias)) < 1e-2
            assert len(calls) == 1
            lin(x)  # 2 rows: cuBLAS
            layers.Linear(96, 128).to("cuda", torch.bfloat16)(x[:1])  # K < N: cuBLAS
            layers.Linear(96, 64).to("cuda")(x[:1].float())  # fp32: cuBLAS
            with torch.autocast("cuda", dtype=torch.bfloat16):
                lin(x[:1])
    with layers.decoding():
        lin(x[:1])  # autograd on: cuBLAS
    assert len(calls) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an NVIDIA GPU with compute capability 9.0+")
def test_zoo_linear_takes_the_pdl_kernel_up_to_pdl_max_rows(monkeypatch):
    """On Hopper, in a decode step (`zoo.layers.decoding()`), inference projections of at most PDL_MAX_ROWS rows in
    bf16/fp16 take zoo_kernels.pdl_linear (it beat cuBLAS in graph-captured decode steps up to 32 rows and lost at
    64); more rows, autograd, ZOO_DECODE_PDL=0 (the module's DECODE_PDL) and calls outside a decode step do not."""
    import zoo.layers as layers

    calls = []
    kernel, supported = layers._pdl_linear()
    monkeypatch.setattr(layers, "_pdl_linear", lambda: (lambda *a: calls.append(1) or kernel(*a), supported))
    lin = layers.Linear(256, 512, bias=True).to("cuda", torch.bfloat16)
    most = layers.PDL_MAX_ROWS
    x = torch.randn(most + 1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x[:1])  # not in a decode step: cuBLAS
        with layers.decoding():
            for rows in (1, most):
                assert rel_err(lin(x[:rows]), torch.nn.functional.linear(x[:rows], lin.weight, lin.bias)) < 1e-2
            assert len(calls) == 2
            lin(x)  # one row more: cuBLAS
            monkeypatch.setattr(layers, "DECODE_PDL", False)
            lin(x[:1])  # off: the skinny kernel's rule (K < N here: cuBLAS)
    monkeypatch.setattr(layers, "DECODE_PDL", True)
    with layers.decoding():
        lin(x[:1])  # autograd on: cuBLAS
    assert len(calls) == 2


if __name__ == "__main__":
    patch_triton_interpreter()
    _interpreter_main()
