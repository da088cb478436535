"""The fused Mamba-1 decode step (zoo_kernels.selective_scan.fused_step): conv update, x_proj, dt_proj, state
update and gate in one launch of 8-CTA clusters.

- CPU: the torch reference of the fused step is the mixer's unfused step (so the CUDA kernel, checked against
  the reference, computes what the mixer did before); the fused path is never taken off CUDA or where the shapes
  do not fit.
- CUDA (compute capability 9.0+): the kernel against the reference over several steps (the states carry over),
  for every dtype, rows per CTA 1 / 2 / 4 / 8 (batch 1 to 130, partial last row groups), widths 2-4, N 4-64, with
  and without the optional biases, with a padding mask in one step; and the mixer's decode with and without the
  fused step (ZOO_MAMBA_FUSED_STEP=0) gives the same tokens and logits. The register-rows kernel likewise (2 and 4
  rows per CTA, d_inner 1024-2048, partial row groups, fp32 states and states in the activations' dtype), and the
  launcher's plan picks it where it fits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from zoo_kernels.selective_scan import fused_step

needs_clusters = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs an NVIDIA GPU with compute capability 9.0+ (thread-block clusters)")


def _inputs(batch, dim, nstate, rank, width, dtype, device, biases=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    xz = rnd(batch, 2 * dim).to(dtype)
    return dict(
        x=xz[:, :dim], z=xz[:, dim:],  # column slices of one in_proj output, as the mixer passes them
        conv_state=rnd(batch, dim, width - 1), conv_weight=rnd(dim, width, scale=0.5),
        conv_bias=rnd(dim, scale=0.1) if biases else None,
        x_proj_weight=rnd(rank + 2 * nstate, dim, scale=dim ** -0.5).to(dtype),
        dt_weight=rnd(dim, rank, scale=rank ** -0.5).to(dtype),
        dt_bias=rnd(dim, scale=0.5) - 3 if biases else None,
        A=-torch.rand(dim, nstate, generator=g).add(0.5).mul(torch.arange(1, nstate + 1)).to(device),
        D=rnd(dim) if biases else None,
        state=rnd(batch, dim, nstate, scale=0.3),
    )


def test_reference_is_the_mixers_unfused_step():
    """mamba_step_ref on a Mamba mixer's weights and caches gives the output of the mixer's own step (CPU: the
    conv update, x_proj and the state update with dt_proj folded in)."""
    from zoo.cache import RecurrentLayer
    from zoo.mixers.mamba import Mamba

    torch.manual_seed(0)
    mixer = Mamba(64, d_state=16, dt_rank=8).eval()
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        getattr(mixer, name).reset_parameters()  # nn.Linear's init: dt_low @ W.T matters next to the bias
    batch = 3
    x = torch.randn(batch, 1, 64)
    cache = RecurrentLayer()
    cache.set(torch.randn(batch, mixer.d_inner, 3), torch.randn(batch, mixer.d_inner, 16) * 0.3)
    conv_state, state = (t.clone() for t in cache.step_states())
    with torch.no_grad():
        out = mixer(x, cache=cache)
        A, D, w, b = mixer._decode_constants()
        xz = mixer.in_proj(x[:, 0])
        y = fused_step.mamba_step_ref(xz[:, :mixer.d_inner], xz[:, mixer.d_inner:], conv_state, w, b,
                                      mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias.float(), A, D,
                                      state)
        ref = mixer.out_proj(y[:, None])
    assert rel_err(out, ref) < 1e-6
    new_conv, new_state = cache.step_states()
    assert torch.allclose(new_conv, conv_state) and torch.allclose(new_state, state, atol=1e-6)


def test_fused_step_is_not_taken_off_cuda_or_for_shapes_it_does_not_fit():
    x = torch.randn(2, 128)
    w, A = torch.randn(128, 4), torch.randn(128, 16)
    assert not fused_step.supported(x, w, torch.randn(8 + 32, 128), A)  # CPU
    if torch.cuda.is_available():
        for dim, nstate, rank, width in ((96, 16, 8, 4), (128, 12, 8, 4), (128, 16, 6, 4), (128, 16, 8, 5)):
            x = torch.randn(2, dim, device="cuda", dtype=torch.bfloat16)
            assert not fused_step.supported(x, torch.randn(dim, width), torch.randn(rank + 2 * nstate, dim),
                                            torch.randn(dim, nstate))


@pytest.mark.cuda
@needs_clusters
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,dim,nstate,rank,width,rows", [
    (1, 1536, 16, 48, 4, 0),     # Mamba-130M at batch 1: the kernel's choice (1 row per CTA, 8 CTAs)
    (64, 1536, 16, 48, 4, 2),    # ... at batch 64, rows per CTA forced (the choice may be the unfused step)
    (67, 1536, 16, 48, 4, 4),    # a partial last row group
    (130, 512, 16, 32, 4, 8),    # 8 rows per CTA, partial
    (5, 2048, 16, 64, 4, 0),     # Mamba-370M
    (9, 512, 8, 16, 3, 0),       # N = 8 (2 lanes per channel), width 3
    (3, 256, 64, 16, 2, 0),      # N = 64 (16 lanes per channel), width 2
    (20, 64, 4, 16, 4, 2),       # 8 channels per CTA, N = 4 (no shuffles)
])
@pytest.mark.parametrize("biases", [True, False])
def test_fused_step_matches_reference(dtype, batch, dim, nstate, rank, width, rows, biases, monkeypatch):
    if dtype == torch.float32 and rank % 4 or dtype != torch.float32 and rank % 8:
        pytest.skip("rank not a multiple of 16 bytes' elements")
    if rows:
        monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", str(rows))
    t = _inputs(batch, dim, nstate, rank, width, dtype, "cuda", biases)
    assert fused_step.supported(t["x"], t["conv_weight"], t["x_proj_weight"], t["A"])
    mask = (torch.arange(batch, device="cuda") % 3 != 1).to(dtype)  # padding rows: x and u zeroed
    ref = {k: v.clone() if k in ("conv_state", "state") else v for k, v in t.items()}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for step in range(3):  # the states carry over
        y = fused_step.mamba_step(**t, mask=mask if step == 1 else None)
        y_ref = fused_step.mamba_step_ref(**ref, mask=mask if step == 1 else None)
        assert y.dtype == dtype and y.shape == (batch, dim)
        assert rel_err(y, y_ref) < tol, f"step {step}: y"
        assert torch.equal(t["conv_state"], ref["conv_state"]), f"step {step}: conv state"
        assert rel_err(t["state"], ref["state"]) < tol, f"step {step}: state"
        # rounding to bf16 at a different sum order may flip one value of x_proj's outputs; keep both sides on the
        # same trajectory so that such flips do not accumulate over the steps
        ref["state"].copy_(t["state"])
        xz = torch.randn(batch, 2 * dim, device="cuda").to(dtype)
        t["x"], t["z"] = ref["x"], ref["z"] = xz[:, :dim], xz[:, dim:]


@pytest.mark.cuda
@needs_clusters
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,dim,rank,width,rows", [
    (64, 1536, 48, 4, 4),   # Mamba-130M at batch 64: 16 clusters of 4-row CTAs
    (33, 1536, 48, 4, 2),   # a partial last row group
    (61, 1536, 48, 3, 4),   # width 3, partial
    (64, 2048, 64, 4, 4),   # Mamba-370M (4 items per thread)
    (7, 1024, 32, 2, 2),    # 2 items per thread, width 2
])
@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("low_state", [False, True])
def test_register_rows_kernel_matches_reference(dtype, batch, dim, rank, width, rows, biases, low_state, monkeypatch):
    """The register-rows kernel (states in registers, 2 or 4 rows per CTA, N = 16) against the reference over three
    steps, one with a padding mask; the state in fp32 or in the activations' dtype (decode_state_dtype "model")."""
    monkeypatch.setenv("ZOO_MAMBA_STEP_KERNEL", "rows")
    monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", str(rows))
    t = _inputs(batch, dim, 16, rank, width, dtype, "cuda", biases)
    if low_state:
        t["state"] = t["state"].to(dtype)
    assert fused_step.supported(t["x"], t["conv_weight"], t["x_proj_weight"], t["A"], t["state"].dtype)
    mask = (torch.arange(batch, device="cuda") % 3 != 1).to(dtype)
    ref = {k: v.clone() if k in ("conv_state", "state") else v for k, v in t.items()}
    for step in range(3):
        y = fused_step.mamba_step(**t, mask=mask if step == 1 else None)
        y_ref = fused_step.mamba_step_ref(**ref, mask=mask if step == 1 else None)
        assert y.dtype == dtype and y.shape == (batch, dim)
        assert rel_err(y, y_ref) < 2e-2, f"step {step}: y"
        assert torch.equal(t["conv_state"], ref["conv_state"]), f"step {step}: conv state"
        assert rel_err(t["state"], ref["state"]) < 2e-2, f"step {step}: state"
        ref["state"].copy_(t["state"])  # (as in test_fused_step_matches_reference)
        xz = torch.randn(batch, 2 * dim, device="cuda").to(dtype)
        t["x"], t["z"] = ref["x"], ref["z"] = xz[:, :dim], xz[:, dim:]


@pytest.mark.cuda
@needs_clusters
def test_the_plan_takes_the_register_rows_kernel_where_it_fits():
    """At the 130M shapes in bf16 the plan is the register-rows kernel in one wave: 2 rows per CTA at batch 1 and
    32, 4 at batch 64 (2 would need 32 clusters); fp32 activations and N = 8 take one-row CTAs of the slots kernel."""
    ext = fused_step._module()
    rows_kernel, slots = fused_step.KERNELS["rows"], fused_step.KERNELS["slots"]
    assert tuple(ext.plan(64, 1536, 16, 48, 4, 2)) == (rows_kernel, 4)
    assert tuple(ext.plan(1, 1536, 16, 48, 4, 2)) == (rows_kernel, 2)
    assert tuple(ext.plan(1, 1536, 16, 48, 4, 4)) == (slots, 1)
    assert tuple(ext.plan(1, 1536, 8, 48, 4, 2)) == (slots, 1)
    x = torch.zeros(64, 1536, device="cuda", dtype=torch.bfloat16)
    conv_w, x_proj_w, A = torch.zeros(1536, 4), torch.zeros(80, 1536), torch.zeros(1536, 16)
    assert fused_step.supported(x, conv_w, x_proj_w, A, torch.bfloat16)  # a bf16 state: the register-rows kernel
    assert not fused_step.supported(x[:, :1024 + 64], conv_w, x_proj_w, torch.zeros(1088, 16), torch.bfloat16)
    assert not fused_step.supported(x, conv_w, x_proj_w, A, torch.float16)  # a state in neither dtype
    t = _inputs(64, 1536, 16, 48, 4, torch.bfloat16, "cuda")
    assert fused_step.supported(t["x"], t["conv_weight"], t["x_proj_weight"], t["A"])


@pytest.mark.cuda
@needs_clusters
@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_mixers_decode_alike_with_and_without_the_fused_step(name, monkeypatch):
    """Greedy decoding of a bf16 model (d_inner 256, dt_rank 8) takes the fused step by default and the unfused one
    with ZOO_MAMBA_FUSED_STEP=0 (where the step never asks _fused_step): the same tokens, logits within bf16's
    rounding."""
    from transformers import AutoModelForCausalLM

    import zoo
    import zoo.mixers.mamba as mamba_module

    mixer = {"type": "mamba", "d_state": 16, "dt_rank": 8}
    layers = "MM" if name == "mamba" else "MA"
    mixers = {"M": mixer, "A": {"type": "attention", "n_heads": 4}}
    config = zoo.ZooConfig(vocab_size=128, d_model=128, layers=layers,
                           mixers={k: v for k, v in mixers.items() if k in layers}, ffn="none")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).cuda().to(torch.bfloat16).eval()
    calls = []
    fused = mamba_module.Mamba._fused_step
    monkeypatch.setattr(mamba_module.Mamba, "_fused_step",
                        lambda self, *a: calls.append(fused(self, *a)) or calls[-1])
    prompt = torch.randint(0, 128, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ZOO_MAMBA_FUSED_STEP", flag)
        calls.clear()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        if flag == "1":
            assert calls and all(calls)
        else:  # switched off: the step does not even consider the kernel (_may_fuse, before in_proj)
            assert not any(calls)
        runs[flag] = out.sequences, torch.stack(out.logits, 1).float()
    assert torch.equal(runs["1"][0], runs["0"][0])
    assert rel_err(runs["1"][1], runs["0"][1]) < 2e-2


def test_extension_says_why_it_is_unavailable(monkeypatch):
    """Without a GPU, or below compute capability 9.0 (no clusters), the fused step is unavailable with the reason
    and never built; with one, the JIT build runs once and every later call reuses it."""
    import importlib

    cuda_module = importlib.import_module("zoo_kernels.selective_scan.cuda")  # (the package's `cuda` is a function)
    JitExtension = cuda_module.JitExtension

    def make():
        return JitExtension("fused Mamba step", fused_step._SOURCES, fused_step._HEADERS, fused_step._CSRC,
                            "zoo_mamba_step", (9, 0), "the fused step needs thread-block clusters,")

    builds = []
    monkeypatch.setattr(cuda_module, "build_extension", lambda *a: builds.append(a) or "ext")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ext = make()
    assert not ext.available() and "no CUDA device" in ext.why_unavailable()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    ext = make()
    assert not ext.available() and "compute capability 9.0 or newer" in ext.why_unavailable()
    with pytest.raises(RuntimeError, match="thread-block clusters"):
        ext.module()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    ext = make()
    assert ext.available() and ext.module() == "ext" and ext.available() and ext.why_unavailable() is None
    assert len(builds) == 1 and builds[0][3:] == ("zoo_mamba_step", ())  # (prefix, defines)


def test_weights_off_16_byte_alignment_are_copied_for_the_kernel():
    """The kernel copies weights with 16-byte cp.async: a view at another offset (a flat buffer's) is passed as an
    aligned copy, an aligned tensor as itself."""
    flat = torch.arange(20, dtype=torch.float32)
    view = flat[1:17]
    assert view.data_ptr() % 16 != 0
    copy = fused_step._aligned(view)
    assert copy.data_ptr() % 16 == 0 and torch.equal(copy, view)
    assert fused_step._aligned(flat) is flat and fused_step._aligned(None) is None


def test_gradients_through_cached_steps_equal_the_forward_over_the_same_tokens():
    """Decoding with autograd on (the reference step on CPU, the path a step that needs gradients takes): three
    cached steps from empty states give the gradients of one forward over the same three tokens. The step updates
    its states in place; that must not clobber what the backward needs."""
    from zoo.cache import RecurrentLayer
    from zoo.mixers.mamba import Mamba

    torch.manual_seed(0)
    mixer = Mamba(64, d_state=8, dt_rank=8).double()
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    mixer(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    cache = RecurrentLayer()
    cache.set(torch.zeros(2, mixer.d_inner, 3, dtype=torch.float64),
              torch.zeros(2, mixer.d_inner, 8, dtype=torch.float32))
    out = torch.cat([mixer(x[:, t:t + 1], cache=cache) for t in range(3)], dim=1)
    out.square().sum().backward()
    for name, param in mixer.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.cuda
@needs_clusters
def test_a_step_that_needs_gradients_does_not_take_the_fused_kernel():
    """The fused kernel has no backward: with autograd on and trainable weights the step takes the unfused path,
    and the gradient reaches x_proj's weight; without autograd the same mixer takes the kernel."""
    from zoo.cache import RecurrentLayer
    from zoo.mixers.mamba import Mamba

    torch.manual_seed(0)
    mixer = Mamba(128, d_state=16, dt_rank=8).cuda()
    x = torch.randn(2, 1, 128, device="cuda")
    cache = RecurrentLayer()
    cache.set(torch.zeros(2, mixer.d_inner, 3, device="cuda"), torch.zeros(2, mixer.d_inner, 16, device="cuda"))
    xs = torch.randn(2, mixer.d_inner, device="cuda")
    assert not mixer._fused_step(xs.requires_grad_(), "cuda")
    mixer(x, cache=cache).sum().backward()
    assert mixer.x_proj.weight.grad is not None and mixer.x_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert mixer._fused_step(xs.detach(), "cuda")

