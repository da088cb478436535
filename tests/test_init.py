"""Initialisation of a freshly built model (AutoModelForCausalLM.from_config) against mamba_ssm, transformers' Mamba
and Llama: the distributions every parameter starts from, as transformers' init machinery leaves them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from zoo import ZooConfig


def build(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ZooConfig(**fields))


def std_close(t: torch.Tensor, want: float, name: str) -> None:
    got = t.float().std().item()
    assert abs(got / want - 1) < 0.05, f"{name}: std {got:.5f}, expected {want:.5f}"


# residual branches: one per mixer, one per ffn (mamba_ssm's n_residuals_per_layer: 1 without an MLP, 2 with)
@pytest.mark.parametrize("layers,ffn,branches", [("MMMM", "none", 4), ("MMMMMM", "swiglu", 12)],
                         ids=["pure-mamba", "mamba-mlp"])
def test_output_projections_are_rescaled_by_the_residual_branches(layers, ffn, branches):
    """GPT-2 / mamba_ssm's rescale_prenorm_residual: each residual branch's output projection starts at
    initializer_range / sqrt(N), N the number of residual branches in the stack; every other projection at
    initializer_range."""
    model = build(vocab_size=64, d_model=128, layers=layers, mixers={"M": {"type": "mamba", "d_state": 4}},
                  ffn={"type": "swiglu", "hidden": 256} if ffn == "swiglu" else "none")
    scaled = 0.02 / math.sqrt(branches)
    for i, block in enumerate(model.model.layers):
        std_close(block.mixer.out_proj.weight, scaled, f"layers[{i}].mixer.out_proj")
        std_close(block.mixer.in_proj.weight, 0.02, f"layers[{i}].mixer.in_proj")
        if block.ffn is not None:
            std_close(block.ffn.down_proj.weight, scaled, f"layers[{i}].ffn.down_proj")
            std_close(block.ffn.up_proj.weight, 0.02, f"layers[{i}].ffn.up_proj")
    std_close(model.model.embeddings.weight, 0.02, "embeddings")


def test_every_mixer_and_the_moe_experts_are_rescaled_and_the_switch_turns_it_off():
    fields = dict(vocab_size=64, d_model=128, layers="MSAG", ffn={"type": "swiglu", "hidden": 256},
                  mixers={"M": {"type": "mamba", "d_state": 4}, "A": {"type": "attention", "n_heads": 2},
                          "S": {"type": "mamba2", "d_state": 8, "head_dim": 32}, "G": {"type": "gla", "n_heads": 2}},
                  moe={"every": 2, "n_experts": 2, "top_k": 1})
    for rescale in (True, False):
        model = build(**fields, rescale_prenorm_residual=rescale)
        scaled = 0.02 / math.sqrt(8) if rescale else 0.02
        for i, block in enumerate(model.model.layers):
            for name in block.mixer.output_projections:
                std_close(getattr(block.mixer, name).weight, scaled, f"layers[{i}].mixer.{name}")
            experts = getattr(block.ffn, "experts", [block.ffn])
            for e, expert in enumerate(experts):
                std_close(expert.down_proj.weight, scaled, f"layers[{i}] expert {e} down_proj")
                std_close(expert.gate_proj.weight, 0.02, f"layers[{i}] expert {e} gate_proj")


def test_mamba_ssm_parameter_inits_survive_the_model_init():
    """The model-wide Linear init runs before each mixer's own: dt_proj keeps mamba_ssm's uniform ±dt_rank^-0.5
    weight and softplus^-1(dt) bias with dt log-uniform in [dt_min, dt_max]; A_log, D as S4D-real / Mamba-2;
    a linear bias (bias: true) and GLA's gate bias start at zero."""
    model = build(vocab_size=64, d_model=64, layers="MSG", ffn="none",
                  mixers={"M": {"type": "mamba", "d_state": 4, "bias": True},
                          "S": {"type": "mamba2", "d_state": 8, "head_dim": 16}, "G": {"type": "gla", "n_heads": 2}})
    mamba, mamba2, gla = (block.mixer for block in model.model.layers)
    bound = mamba.dt_rank ** -0.5
    w = mamba.dt_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    for dt_bias in (mamba.dt_proj.bias, mamba2.dt_bias):
        dt = F.softplus(dt_bias.float())
        assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert torch.equal(mamba.A_log, torch.log(torch.arange(1, 5.0)).expand(mamba.d_inner, 4))
    assert torch.equal(mamba.D, torch.ones_like(mamba.D)) and torch.equal(mamba2.D, torch.ones_like(mamba2.D))
    assert (mamba2.A_log.exp() >= 1).all() and (mamba2.A_log.exp() <= 16).all()
    for bias in (mamba.in_proj.bias, mamba.out_proj.bias, gla.gk_proj[1].bias):
        assert torch.equal(bias, torch.zeros_like(bias))
