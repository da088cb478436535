"""The persistent Mamba layers kernel (zoo_kernels.selective_scan.fused_layers): a run of Mamba blocks without MLPs,
one decode token, in one launch (experimental: the model does not take it; benchmarks/mamba_layers.py).

- CPU: its torch reference (`mamba_layers_ref`) is the model's own decode of a Mamba stack (residual adds, norms,
  mixers' steps, final norm), and the shape check refuses what the kernel does not take, saying why.
- CUDA (compute capability 9.0+): the kernel against the reference over three steps (states carried over), batch
  1 to 64 (partial row tiles), bf16 and fp16, fp32 states and states in the activations' dtype, with a padding
  mask, with the residual stream rounded to the activations' dtype, from an fp32 or a low-precision input.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from zoo_kernels.selective_scan import fused_layers
from zoo_kernels.selective_scan.fused_layers import MambaLayerTensors, mamba_layers_ref

needs_clusters = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs an NVIDIA GPU with compute capability 9.0+ (thread-block clusters)")


def _model_layers(model, cache, dtype):
    """The blocks' tensors of a zoo Mamba model, with clones of its cache's states."""
    out = []
    for block, layer in zip(model.model.layers, cache.layers):
        m = block.mixer
        A, D, w, b = m._decode_constants()
        conv_state, state = layer.step_states()
        out.append(MambaLayerTensors(
            norm_w=block.norm.weight.to(dtype), in_w=m.in_proj.weight.to(dtype), conv_w=w, conv_b=b,
            x_w=m.x_proj.weight.to(dtype), dt_w=m.dt_proj.weight.to(dtype), dt_b=m.dt_proj.bias.float(), A=A, D=D,
            out_w=m.out_proj.weight.to(dtype), conv_state=conv_state.clone(), state=state.clone()))
    return out


def test_reference_is_the_models_decode_of_a_mamba_stack():
    """mamba_layers_ref from the embedding through every block, then the final norm, gives the model's last hidden
    state for one decode token, and leaves the states the model's step leaves (fp32, CPU)."""
    import zoo
    from zoo.cache import ZooCache

    torch.manual_seed(0)
    config = zoo.ZooConfig.from_yaml("configs/models/mamba-tiny.yaml")
    model = zoo.ZooForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (3, 5))
    token = torch.randint(0, config.vocab_size, (3, 1))
    with torch.no_grad():
        cache = ZooCache.for_model(model)
        model(prompt, past_key_values=cache, use_cache=True)
        layers = _model_layers(model, cache, torch.float32)
        want = model.model(token, past_key_values=cache, use_cache=True).last_hidden_state[:, 0]
        x = model.model.embeddings(token[:, 0]).float()
        res = mamba_layers_ref(x, None, layers, config.norm_eps)
        got = model.model.norm_f(res)
    assert rel_err(got, want) < 1e-5
    for t, layer in zip(layers, cache.layers):
        conv_state, state = layer.step_states()
        assert rel_err(t.conv_state, conv_state) < 1e-6 and rel_err(t.state, state) < 1e-5


def _random_layers(n, batch, d_model, dtype, state_dtype, device, seed=0, rank=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    E, rank = 2 * d_model, rank or max(8, -(-d_model // 16) // 8 * 8)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return [MambaLayerTensors(
        norm_w=(1 + rnd(d_model, scale=0.1)).to(dtype), in_w=rnd(2 * E, d_model, scale=d_model ** -0.5).to(dtype),
        conv_w=rnd(E, 4, scale=0.5), conv_b=rnd(E, scale=0.1), x_w=rnd(rank + 32, E, scale=E ** -0.5).to(dtype),
        dt_w=rnd(E, rank, scale=rank ** -0.5).to(dtype), dt_b=rnd(E, scale=0.5) - 3,
        A=-torch.rand(E, 16, generator=g).add(0.5).mul(torch.arange(1, 17)).to(device), D=rnd(E),
        out_w=rnd(d_model, E, scale=0.3 * E ** -0.5).to(dtype), conv_state=rnd(batch, E, 3),
        state=rnd(batch, E, 16, scale=0.3).to(state_dtype)) for _ in range(n)]


def test_shape_check_says_why():
    layers = _random_layers(2, 4, 128, torch.bfloat16, torch.float32, "cpu")
    problem = fused_layers._shape_problem
    assert problem(layers, 4, torch.float32).startswith("activations in torch.float32")
    assert problem(layers, 65, torch.bfloat16).startswith("batch 65")
    assert problem(layers, 3, torch.bfloat16).startswith("layer 0: conv_state has shape")
    assert "must be a contiguous, 16-byte aligned CUDA tensor" in problem(layers, 4, torch.bfloat16)  # (CPU)
    layers[1].in_w.requires_grad_(True)
    assert problem(layers, 4, torch.bfloat16).startswith("a tensor needs gradients")
    with torch.no_grad():
        assert "must be a contiguous, 16-byte aligned CUDA tensor" in problem(layers, 4, torch.bfloat16)
    layers[1].in_w.requires_grad_(False)
    odd = _random_layers(1, 4, 96, torch.bfloat16, torch.float32, "cpu")
    assert problem(odd, 4, torch.bfloat16).startswith("d_inner 192")
    assert fused_layers.problem(layers, 4, torch.bfloat16) is not None  # never taken off CUDA


@needs_clusters
@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("d_model", [128, 768])
def test_kernel_matches_reference_over_steps(batch, dtype, state_dtype, d_model):
    layers = _random_layers(3, batch, d_model, dtype, state_dtype, "cuda", seed=batch)
    why = fused_layers.problem(layers, batch, dtype)
    if why is not None and "do not fit at once" in why:
        pytest.skip(why)
    assert why is None, why
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, d_model, generator=g).cuda()
    pending = torch.randn(batch, d_model, generator=g).to(dtype).cuda()
    ref_layers = [MambaLayerTensors(**{**t.__dict__, "conv_state": t.conv_state.clone(), "state": t.state.clone()})
                  for t in layers]
    run = fused_layers.MambaLayers(layers, batch, dtype, 1e-5)
    for _ in range(3):
        got = run.run(x, pending).clone()
        want = mamba_layers_ref(x, pending, ref_layers, 1e-5)
        assert rel_err(got, want) < 2e-2
    tol = 2e-2 if state_dtype == torch.float32 else 4e-2
    for t, r in zip(layers, ref_layers):
        assert rel_err(t.state.float(), r.state.float()) < tol
        assert rel_err(t.conv_state, r.conv_state) < 2e-2


@needs_clusters
@pytest.mark.cuda
def test_kernel_with_mask_rounded_stream_and_low_precision_input():
    batch, d_model, dtype = 24, 128, torch.bfloat16
    layers = _random_layers(2, batch, d_model, dtype, torch.float32, "cuda", seed=5)
    why = fused_layers.problem(layers, batch, dtype)
    if why is not None:
        pytest.skip(why)
    ref_layers = [MambaLayerTensors(**{**t.__dict__, "conv_state": t.conv_state.clone(), "state": t.state.clone()})
                  for t in layers]
    x = torch.randn(batch, d_model, device="cuda").to(dtype)
    mask = (torch.arange(batch, device="cuda") % 3 != 0).to(dtype)
    run = fused_layers.MambaLayers(layers, batch, dtype, 1e-5, res_round=True)
    got = run.run(x, None, mask).clone()
    want = mamba_layers_ref(x, None, ref_layers, 1e-5, res_round=True, mask=mask)
    assert rel_err(got, want) < 2e-2
    assert torch.equal(got, got.to(dtype).float())  # the stream is kept in bf16
    for t, r in zip(layers, ref_layers):
        assert rel_err(t.state, r.state) < 2e-2
        padded = mask == 0  # padding rows: x and u zeroed, as the mixer's step does
        assert rel_err(t.conv_state[padded], r.conv_state[padded]) < 1e-6


@needs_clusters
@pytest.mark.cuda
def test_run_refuses_bad_inputs():
    layers = _random_layers(1, 4, 128, torch.bfloat16, torch.float32, "cuda")
    if fused_layers.problem(layers, 4, torch.bfloat16) is not None:
        pytest.skip("kernel unavailable")
    run = fused_layers.MambaLayers(layers, 4, torch.bfloat16, 1e-5)
    with pytest.raises(ValueError, match="x must be"):
        run.run(torch.randn(5, 128, device="cuda"))
    with pytest.raises(ValueError, match="pending must be"):
        run.run(torch.randn(4, 128, device="cuda"), torch.randn(4, 128, device="cuda"))
    with pytest.raises(ValueError, match="batch 65"):
        fused_layers.MambaLayers(layers, 65, torch.bfloat16, 1e-5)
