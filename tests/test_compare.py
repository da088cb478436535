"""The fair comparison: parameter/FLOP/memory accounting, budget matching, and the demo end to end."""

from __future__ import annotations

import copy
import json
import math
import platform
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ctrl_c_on_step, interrupt_after, save_letter_tokenizer
from transformers import AutoModelForCausalLM

from zoo.compare import (
    _recall_labels,
    account,
    causal_keys_mean,
    chunk_padding,
    load_compare_config,
    main,
    match_budget,
    module_weights,
    parameter_counts,
    resolve_models,
)
from zoo.config import ZooConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((ROOT / "configs" / "models").glob("*.yaml"))
FAMILIES = ("mamba", "mamba2", "transformerpp", "gla", "jamba")


def fields_of(name: str, **overrides) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text())
    data.update(overrides)
    return data


def instantiated_params(config: ZooConfig) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# variants that exercise every option the formulas read
VARIANTS = {
    "mamba-bias-norms": fields_of("mamba-tiny", mixers={"M": {"type": "mamba", "d_state": 8, "bias": True,
                                                              "conv_bias": False, "inner_norms": True,
                                                              "dt_rank": 7, "expand": 1.5}}),
    "mamba2-groups-bias": fields_of("mamba2-tiny", mixers={"M": {"type": "mamba2", "d_state": 8, "head_dim": 8,
                                                                 "n_groups": 2, "bias": True,
                                                                 "conv_bias": False, "d_conv": 3}}),
    "attention-window-headdim": fields_of("transformerpp-tiny", tie_embeddings=False,
                                          mixers={"A": {"type": "attention", "n_heads": 4, "n_kv_heads": 1,
                                                        "head_dim": 24, "window": 16}}),
    "gla-widths": fields_of("gla-tiny", mixers={"G": {"type": "gla", "n_heads": 4, "expand_k": 1.0,
                                                      "expand_v": 2.0, "gate_low_rank_dim": 8}}),
    "jamba-moe-hidden": fields_of("jamba-tiny", moe={"every": 2, "n_experts": 3, "top_k": 1, "hidden": 40}),
    # widths that budget matching writes as expand = d_inner / d_model, whose product is a hair off 232
    # (232 / 56 · 56 = 232.00000000000003): they were refused, so the matcher skipped them
    "mamba-matched-width": fields_of("mamba-tiny", d_model=56, mixers={"M": {"type": "mamba", "expand": 232 / 56}}),
    "mamba2-matched-width": fields_of("mamba2-tiny", d_model=56, mixers={"M": {"type": "mamba2", "head_dim": 8,
                                                                               "d_state": 8, "expand": 232 / 56}}),
    "gla-matched-width": fields_of("gla-tiny", d_model=56, mixers={"G": {"type": "gla", "n_heads": 4,
                                                                         "expand_k": 232 / 56, "expand_v": 232 / 56}}),
    "default-heads-ffn": {"vocab_size": 97, "d_model": 128, "layers": "AMA",
                          "mixers": {"A": {"type": "attention"}, "M": {"type": "mamba"}}, "ffn": "swiglu"},
}


@pytest.mark.parametrize("fields", [yaml.safe_load(p.read_text()) for p in MODEL_CONFIGS] + list(VARIANTS.values()),
                         ids=[p.stem for p in MODEL_CONFIGS] + list(VARIANTS))
def test_parameter_formulas_match_instantiated_modules(fields):
    config = ZooConfig(**copy.deepcopy(fields))
    counts = parameter_counts(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert counts["total"] == n, f"formula {counts['total']} != instantiated {n}"
    embedding = model.get_input_embeddings().weight.numel()
    if not config.tie_embeddings:
        embedding += model.get_output_embeddings().weight.numel()
    assert counts["non_embedding"] == n - embedding
    # active: every parameter but the experts a token does not reach (top_k of n_experts)
    from zoo.layers import MoE

    idle = sum(sum(p.numel() for p in m.experts.parameters()) * (m.n_experts - m.top_k) / m.n_experts
               for m in model.modules() if isinstance(m, MoE))
    assert counts["active"] == n - idle
    acc = account(config, [64])
    assert acc["params"] == n
    # the matmul weights of the formulas equal those counted on the modules (nn.Linear / nn.Conv1d)
    assert acc["matmul_weights"] == pytest.approx(module_weights(model), rel=0, abs=1e-6)


def test_flops_hand_computed():
    # Transformer++: V=100, d=32, 2 layers, 4 heads of 8 (2 KV heads), SwiGLU 64, tied head.
    tf = ZooConfig(vocab_size=100, d_model=32, layers="AA", ffn={"type": "swiglu", "hidden": 64},
                   mixers={"A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2}})
    weights = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64) + 100 * 32  # q k v o ffn, head
    row = account(tf, [16])["per_length"][0]
    assert row["flops_per_token"] == 2 * weights + 2 * 4 * (17 / 2) * 4 * 8  # 2 layers of 2·2·L_avg·H·Dh
    assert row["decode_flops_per_token"] == 2 * weights + 2 * 4 * 17 * 4 * 8
    assert row["kv_floats"] == 2 * (2 * 2 * 8 * 16) and row["state_floats"] == 0
    assert row["cache_mib"] == row["kv_floats"] * 2 / 2**20

    assert causal_keys_mean(16, 4) == (10 + 12 * 4) / 16  # keys 1, 2, 3, 4, then 4 each
    win = ZooConfig(vocab_size=100, d_model=32, layers="A", ffn="none",
                    mixers={"A": {"type": "attention", "n_heads": 4, "window": 4}})
    row = account(win, [16])["per_length"][0]
    assert row["flops_per_token"] == 2 * (4 * 32 * 32 + 100 * 32) + 4 * (58 / 16) * 4 * 8
    assert row["kv_floats"] == 2 * 4 * 8 * 3  # the window's past keys only (window - 1)
    assert row["decode_flops_per_token"] == 2 * (4 * 32 * 32 + 100 * 32) + 4 * 4 * 4 * 8  # a step sees 4 keys

    # Mamba-1: d=16, d_inner 32, N=4, conv 4, dt_rank ceil(16/16)=1; V=50.
    mb = ZooConfig(vocab_size=50, d_model=16, layers="M", ffn="none",
                   mixers={"M": {"type": "mamba", "d_state": 4, "expand": 2}})
    weights = 16 * 64 + 32 * 4 + 32 * (1 + 8) + 1 * 32 + 32 * 16 + 50 * 16
    row = account(mb, [100])["per_length"][0]
    assert row["flops_per_token"] == 2 * weights + 9 * 32 * 4
    assert row["state_floats"] == 32 * 4 + 32 * 3 and row["kv_floats"] == 0

    # Mamba-2: d=32, d_inner 64, head_dim 16 -> 4 heads, N=8, 1 group, conv 4, chunk 8; V=50.
    m2 = ZooConfig(vocab_size=50, d_model=32, layers="M", ffn="none",
                   mixers={"M": {"type": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 8}})
    weights = 32 * (128 + 16 + 4) + (64 + 16) * 4 + 64 * 32 + 50 * 32
    rows = account(m2, [16, 4])["per_length"]
    # the chunk's C·Bᵀ and scores · x are causal as attention's: (Q+1)/2 of its tokens per token
    assert rows[0]["flops_per_token"] == 2 * weights + 2 * (9 / 2) * (8 + 64) + 4 * 4 * 16 * 8  # chunk 8
    assert rows[1]["flops_per_token"] == 2 * weights + 2 * (5 / 2) * (8 + 64) + 4 * 4 * 16 * 8  # chunk = L = 4
    assert rows[0]["decode_flops_per_token"] == 2 * weights + 4 * 4 * 16 * 8

    # GLA: d=32, 2 heads, keys 16 (8 per head), values 32 (16 per head), gate rank 4, chunk 8; V=50.
    gla = ZooConfig(vocab_size=50, d_model=32, layers="G", ffn="none",
                    mixers={"G": {"type": "gla", "n_heads": 2, "gate_low_rank_dim": 4, "chunk_size": 8}})
    weights = 2 * 32 * 16 + 2 * 32 * 32 + 32 * 4 + 4 * 16 + 32 * 32 + 50 * 32
    row = account(gla, [16])["per_length"][0]
    assert row["flops_per_token"] == 2 * weights + 2 * (9 / 2) * 2 * (8 + 16) + 4 * 2 * 8 * 16
    assert row["state_floats"] == 2 * 8 * 16

    # MoE: the router and top_k of n_experts experts per token.
    moe = ZooConfig(vocab_size=50, d_model=16, layers="AA", ffn={"type": "swiglu", "hidden": 32},
                    mixers={"A": {"type": "attention", "n_heads": 2}},
                    moe={"every": 2, "offset": 1, "n_experts": 4, "top_k": 2})
    weights = 2 * 4 * 16 * 16 + 3 * 16 * 32 + (16 * 4 + 2 * 3 * 16 * 32) + 50 * 16
    row = account(moe, [8])["per_length"][0]
    assert row["flops_per_token"] == 2 * weights + 2 * 4 * 4.5 * 2 * 8



ATTENTION_REF = {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "attn_backend": "math"}
FLOP_COUNTER_MODELS = {
    "mamba2-groups": dict(vocab_size=50, d_model=32, layers="MM", ffn="none",
                          mixers={"M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 8,
                                        "scan_backend": "ref"}}),
    "gla-swiglu": dict(vocab_size=50, d_model=32, layers="GG", ffn={"type": "swiglu", "hidden": 48},
                       mixers={"G": {"type": "gla", "n_heads": 2, "expand_k": 1.0, "gate_low_rank_dim": 4,
                                     "chunk_size": 8, "scan_backend": "ref"}}),
    "attention-window-moe-untied": dict(vocab_size=64, d_model=32, layers="AA", ffn={"type": "swiglu", "hidden": 48},
                                        tie_embeddings=False, mixers={"A": {**ATTENTION_REF, "window": 5}},
                                        moe={"every": 2, "offset": 1, "n_experts": 3, "top_k": 2}),
    "jamba": dict(vocab_size=64, d_model=32, layers="MMAM", ffn={"type": "swiglu", "hidden": 48},
                  mixers={"M": {"type": "mamba", "d_state": 8, "scan_backend": "ref"}, "A": ATTENTION_REF},
                  moe={"every": 2, "offset": 1, "n_experts": 4, "top_k": 2}),
}


@pytest.mark.parametrize("name", sorted(FLOP_COUNTER_MODELS))
def test_flops_match_torch_flop_counter_on_the_references(name, monkeypatch):
    """torch's FlopCounterMode counts the matmuls the reference forward runs. It agrees with the accounting exactly,
    less what the references compute otherwise: the causal conv is elementwise (2 per conv weight unseen), attention_ref
    scores every query against every key before masking (4·L·H·Dh, not 4·L_avg·H·Dh), the chunked scans' references
    likewise every chunk token against every other (2·Q, not Q+1, per token of each quadratic term), and Mamba-1's
    reference scan is elementwise but for y = C·h (2·d_inner·N of its 9·d_inner·N). The chunked scans pad the last
    chunk: at L = 13 with chunks of 8 they compute 16 tokens, which the accounting counted as 13."""
    from torch.utils.flop_counter import FlopCounterMode
    from zoo_kernels.attention.ref import attention_ref

    # torch's CPU SDPA kernel is not among the counted ops; the reference computes the same attention with einsums
    monkeypatch.setattr("zoo.mixers.attention.attention",
                        lambda q, k, v, backend=None, **kw: attention_ref(q, k, v, **kw))
    torch.manual_seed(0)
    config = ZooConfig(**copy.deepcopy(FLOP_COUNTER_MODELS[name]))
    model = AutoModelForCausalLM.from_config(config).eval()
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv1d))
    for L, row in zip([8, 13, 20], account(config, [8, 13, 20])["per_length"]):
        unseen = 2 * conv_weights
        for b in model.model.layers:
            m = b.mixer
            if config.layer_specs()[m.layer_idx]["type"] == "attention":
                unseen -= 4 * (L - causal_keys_mean(L, m.window)) * m.n_heads * m.head_dim
            elif config.layer_specs()[m.layer_idx]["type"] == "mamba":
                unseen += 7 * m.d_inner * m.d_state
            elif config.layer_specs()[m.layer_idx]["type"] == "mamba2":
                masked = m.n_groups * m.d_state + m.n_heads * m.head_dim  # per masked pair: C·Bᵀ, scores · x
                unseen -= chunk_padding(L, m.chunk_size) * (m.chunk_size - 1) * masked
            elif config.layer_specs()[m.layer_idx]["type"] == "gla":
                unseen -= chunk_padding(L, m.chunk_size) * (m.chunk_size - 1) * m.n_heads * (m.head_k + m.head_v)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(input_ids=torch.randint(0, config.vocab_size, (1, L)))
        assert counter.get_total_flops() == pytest.approx((row["flops_per_token"] - unseen) * L, rel=1e-12), (name, L)

def test_active_parameters_of_a_moe_model_with_a_custom_mixer_leave_out_the_skipped_experts():
    """A mixer given by import path is counted on the meta model; its active count was then the total, as if each
    token ran every expert, while the same model with the built-in name left out the n_experts - top_k others."""
    from zoo.compare import parameter_counts

    common = dict(vocab_size=50, d_model=16, layers="MM", ffn={"type": "swiglu", "hidden": 32},
                  moe={"every": 2, "n_experts": 4, "top_k": 1})
    builtin = ZooConfig(mixers={"M": {"type": "mamba", "d_state": 4}}, **common)
    dotted = ZooConfig(mixers={"M": {"type": "zoo.mixers.mamba.Mamba", "d_state": 4}}, **common)
    assert parameter_counts(dotted) == parameter_counts(builtin)
    assert account(dotted, [8])["active_params"] == account(builtin, [8])["active_params"] \
        == parameter_counts(builtin)["total"] - (4 - 1) * 3 * 16 * 32


def test_budget_matching_coerces_a_dotted_mixers_yaml_numbers():
    """A mixer given by import path has its options checked (check_spec) for each candidate width; YAML's 1e-3 (no
    dot) reached that check as the string '1e-3' and match_budget failed with "'>' not supported between 'str' and
    'int'", while the same model with the built-in name matched."""
    from zoo.compare import match_budget

    common = dict(vocab_size=64, d_model=32, layers="MM", ffn={"type": "swiglu", "hidden": 64})
    builtin = match_budget({**common, "mixers": {"M": {"type": "mamba", "d_state": 4, "dt_min": 1e-3}}}, 40000)
    dotted = match_budget({**common, "mixers": {"M": {"type": "zoo.mixers.mamba.Mamba", "d_state": "4",
                                                      "dt_min": "1e-3"}}}, 40000)
    assert dotted[1] == builtin[1]


def _cache_floats(cache) -> tuple[int, int]:
    """(KV floats, other floats) held by a prefilled cache's layers: attention keys/values, recurrent states."""
    kv = other = 0
    if not hasattr(cache, "layers"):  # transformers 5.17's MambaCache (its output's cache_params)
        return 0, sum(t.numel() for t in (*cache.conv_states, *cache.ssm_states))
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            kv += keys.numel() + layer.values.numel()
        else:  # transformers' LinearAttentionLayer (zoo's RecurrentLayer is one): states by index, None if unused
            states = (*layer.conv_states.values(), *layer.recurrent_states.values())
            other += sum(t.numel() for t in states if t is not None)
    return kv, other


@pytest.mark.parametrize("window", [None, 1, 2, 5])
def test_cache_floats_are_those_the_cache_holds_after_a_prefill(window):
    """A sliding layer keeps the last window - 1 keys (the next token's own joins them in the step): the accounting
    counted `window`, one token per layer too many (and a window of 2 then looked like a constant, recurrent state)."""
    config = ZooConfig(vocab_size=50, d_model=32, layers="MAG", ffn="none",
                       mixers={"A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "window": window},
                               "M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 8},
                               "G": {"type": "gla", "n_heads": 2}})
    model = AutoModelForCausalLM.from_config(config).eval()
    for L in (1, 3, 13):
        with torch.no_grad():
            cache = model(input_ids=torch.randint(0, 50, (1, L)), use_cache=True).past_key_values
        row = account(config, [L])["per_length"][0]
        assert (row["kv_floats"], row["state_floats"]) == _cache_floats(cache), (window, L)


@pytest.mark.parametrize("fields", [
    {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "sliding_window": 4},
    {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "vocab_size": 100,
     "conv_kernel": 4}], ids=["mistral-window", "mamba"])
def test_transformers_cache_floats_are_those_the_cache_holds(fields):
    """transformers' sliding layer keeps window - 1 keys; its Mamba cache keeps conv_kernel inputs per channel (zoo's
    keeps conv_kernel - 1), which the accounting counted as conv_kernel - 1."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**fields)
    with torch.no_grad():
        out = AutoModelForCausalLM.from_config(config).eval()(input_ids=torch.randint(0, 100, (1, 16)), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache_params  # (5.17's Mamba: the latter)
    row = account(config, [16])["per_length"][0]
    assert (row["kv_floats"], row["state_floats"]) == _cache_floats(cache)


def _cache_bytes_held(cache) -> int:
    """Bytes of the tensors a cache's layers hold: keys/values, conv and recurrent states, each at its own dtype."""
    out = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        tensors = (keys, layer.values) if isinstance(keys, torch.Tensor) else \
            (*layer.conv_states.values(), *layer.recurrent_states.values())
        out += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return out


@pytest.mark.parametrize("state_dtype", ["float32", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layers", ["MM", "NN", "GG", "MANG"], ids=["mamba", "mamba2", "gla", "hybrid"])
def test_cache_bytes_are_those_the_cache_holds_in_each_dtype(layers, dtype, state_dtype):
    """cache_mib charged every recurrent-state float 4 bytes, but decode_state_dtype "model" keeps the Mamba, Mamba-2
    and GLA recurrent states in the model's dtype (the conv windows stay fp32): a bf16 GLA model's cache was counted at
    twice its size. Each float is charged its dtype's bytes: kv_bytes the model's, state_bytes fp32's. The cache is
    taken as decoding keeps it: a prefill, then one step (the step puts the prefill's fp32 states in state_dtype)."""
    config = ZooConfig(vocab_size=50, d_model=32, layers=layers, ffn="none", decode_state_dtype=state_dtype,
                       mixers={"M": {"type": "mamba", "d_state": 4},
                               "N": {"type": "mamba2", "d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 8},
                               "G": {"type": "gla", "n_heads": 2},
                               "A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2}})
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    row = account(config, [8], kv_bytes=dtype.itemsize, state_bytes=4)["per_length"][0]
    assert row["cache_mib"] * 2 ** 20 == _cache_bytes_held(cache)
    assert (row["kv_floats"], row["state_floats"]) == _cache_floats(cache)  # the float counts whatever the dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_mamba_cache_bytes_are_those_the_cache_holds(dtype):
    """transformers' Mamba keeps its conv state in the model's dtype and its SSM state in fp32: its cache was charged
    4 bytes per float throughout."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type="mamba", hidden_size=32, num_hidden_layers=2, state_size=8,
                                  vocab_size=100, conv_kernel=4)
    from zoo.cache import output_cache
    from zoo.decode import cache_argument

    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 100, (1, 16)), use_cache=True)
    row = account(config, [16], kv_bytes=dtype.itemsize, state_bytes=4)["per_length"][0]
    # (the output's cache field: cache_params before transformers 5.2x, past_key_values since)
    assert row["cache_mib"] * 2 ** 20 == _cache_bytes_held(output_cache(out, cache_argument(model)))


def test_transformers_baselines_are_accounted():
    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True}
    from transformers import AutoConfig

    config = AutoConfig.for_model(**llama)
    row = account(config, [16])["per_length"][0]
    weights = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + 100 * 32
    assert row["flops_per_token"] == 2 * weights + 2 * 4 * 8.5 * 4 * 8
    assert row["kv_floats"] == 2 * 2 * 2 * 8 * 16


def test_gpt2_projections_are_counted():
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: its FLOPs counted the LM head only (8.6K per token
    instead of 2·27.8K + attention for this config), about 9x too few against a zoo model of the same size."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  eos_token_id=0, bos_token_id=0)
    acc = account(config, [16])
    weights = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 100 * 32  # c_attn, attn c_proj, c_fc, mlp c_proj; head
    assert acc["matmul_weights"] == weights
    assert acc["per_length"][0]["flops_per_token"] == 2 * weights + 2 * 4 * 8.5 * 4 * 8


def test_transformers_baselines_with_per_layer_windows_and_unaccountable_layouts():
    """layer_types decide which layers slide (Gemma-2 alternates sliding and full attention; the window applies to
    the sliding ones only); a transformers MoE (experts outside nn.Linear, active parameters unknown) or hybrid
    (Jamba: Mamba layers counted as attention) is refused, naming the way out, rather than counted wrong."""
    from transformers import AutoConfig

    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100}
    gemma = AutoConfig.for_model("gemma2", **common, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention"])
    row = account(gemma, [16])["per_length"][0]
    assert row["kv_floats"] == 2 * 2 * 8 * 3 + 2 * 2 * 8 * 16  # 3 keys kept by the sliding layer, 16 by the full one
    expect = 4 * (causal_keys_mean(16, 4) + causal_keys_mean(16)) * 4 * 8
    assert row["flops_per_token"] - 2 * account(gemma, [16])["matmul_weights"] == pytest.approx(expect)
    for model_type, extra in (("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
                              ("jamba", {"num_experts": 1, "attn_layer_period": 2, "attn_layer_offset": 1})):
        config = AutoConfig.for_model(model_type, **common, **extra)
        with pytest.raises(ValueError, match="mixture of experts" if model_type == "mixtral" else "not attention"):
            account(config, [16])


@pytest.mark.parametrize("fields", [
    {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 8, "head_dim": 16,
     "state_size": 16, "n_groups": 1, "expand": 2, "vocab_size": 100},
    {"model_type": "falcon_mamba", "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "vocab_size": 100}],
    ids=["mamba2", "falcon_mamba"])
def test_transformers_recurrent_models_the_accounting_cannot_count_are_named(fields):
    """A transformers model with neither attention heads nor model_type mamba (Mamba-2, Falcon-Mamba) ended `zoo
    compare` in an AttributeError traceback ('Mamba2Config' object has no attribute 'num_attention_heads'), read before
    the check that names the model type and the way out."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**fields)
    with pytest.raises(ValueError, match=rf"model_type '{fields['model_type']}' is neither attention"):
        account(config, [16])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("budget", [150_000, 400_000])
def test_match_budget_lands_within_two_percent(name, budget):
    fields = fields_of(f"{name}-tiny", vocab_size=260)
    matched, info = match_budget(fields, budget, tolerance=0.02)
    n = instantiated_params(ZooConfig(**matched))
    assert abs(n / budget - 1) <= 0.02, f"{name}: {n} parameters for a budget of {budget} ({info})"
    assert info["params"] == n


def test_match_budget_130m_and_other_knobs():
    for name in FAMILIES:
        matched, info = match_budget(fields_of(f"{name}-130m"), 130e6, multiple_of=64)
        n = instantiated_params(ZooConfig(**matched))
        assert abs(n / 130e6 - 1) <= 0.02, (name, n, info)
        assert matched["d_model"] == 768  # the families already sit near 130M: only widths are tuned
    # non-embedding count and the n_layers knob
    matched, info = match_budget(fields_of("mamba-tiny", vocab_size=260), 300_000, count="non_embedding",
                                 knob="n_layers")
    config = ZooConfig(**matched)
    assert abs(parameter_counts(config)["non_embedding"] / 300_000 - 1) <= 0.02
    assert info["knob"] == "n_layers" and config.num_hidden_layers == info["n_layers"]
    with pytest.raises(ValueError, match="budget.tolerance"):
        match_budget(fields_of("transformerpp-tiny"), 150_000, adjust="none", tolerance=1e-4, multiple_of=64)


@pytest.mark.parametrize("knob", ["d_model", "n_layers"])
def test_budget_out_of_reach_says_which_end(knob):
    """A budget no size reaches names the smallest or largest size the knob gives, not 'no valid model'."""
    fields = fields_of("mamba-tiny", vocab_size=260)
    with pytest.raises(ValueError, match=rf"budget.params: 1,000 is below the smallest size, [\d,]+ total "
                                         rf"parameters with {knob}="):
        match_budget(fields, 1_000, knob=knob)
    with pytest.raises(ValueError, match=rf"budget.params: 10,000,000,000 is above the largest size tried, [\d,]+ "
                                         rf"total parameters with {knob}="):
        match_budget(fields, 1e10, knob=knob)


def test_budget_past_the_adjusted_widths_reach_says_which_end():
    """A budget past what the adjusted width reaches (half to twice the base's) at the smallest or largest size was
    reported as a tolerance miss at the base width, advising a smaller budget.adjust_multiple_of or a wider tolerance,
    which reach nothing: one Transformer++ layer (untied head) of 82,496 parameters was 'the closest size' to 58,000
    though its halved ffn gives 64,064, and 32 GLA layers (the most n_layers tries) were 15% under 700,000."""
    fields = fields_of("transformerpp-tiny", vocab_size=259, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"budget.params: 62,000 is below the smallest size, 64,064 total parameters "
                                         r"with n_layers=1 and ffn_hidden=96 \(budget.adjust keeps it within half"):
        match_budget(fields, 62_000, knob="n_layers")
    matched, info = match_budget(fields, 58_000, knob="n_layers", tolerance=0.15)  # the halved ffn is in reach
    assert info["adjusted"] == {"ffn_hidden": 96} and instantiated_params(ZooConfig(**matched)) == 64_064
    gla = fields_of("gla-tiny", vocab_size=260, ffn="none")
    with pytest.raises(ValueError, match=r"budget.params: 700,000 is above the largest size tried, [\d,]+ total "
                                         r"parameters with n_layers=32; lower budget.params"):
        match_budget(gla, 700_000, knob="n_layers")


def test_budget_far_below_the_smallest_size_names_its_narrowed_width():
    """A budget under a third of the smallest size stopped the search before that size's narrowed ffn was tried: one
    "MMAM" unit of jamba-tiny was named the smallest size at 373,696 parameters, though its halved ffn gives 250,816
    (which a budget of 250,000 then matches)."""
    fields = fields_of("jamba-tiny", vocab_size=260)
    smallest = instantiated_params(ZooConfig(**dict(fields, layers="MMAM", ffn={"type": "swiglu", "hidden": 64})))
    assert smallest == 250_816
    with pytest.raises(ValueError, match=r"budget.params: 60,000 is below the smallest size, 250,816 total parameters "
                                         r"with n_layers=1 and ffn_hidden=64 \(budget.adjust keeps it"):
        match_budget(fields, 60_000, knob="n_layers")


def test_a_misspelt_recipe_field_is_answered_with_the_name_the_comparison_config_spells(tmp_path):
    # the suggestion came from zoo.train, which named its own field: 'did you mean train.max_steps?', a path the
    # comparison config does not have (its field, and the override, is recipe.train.max_steps)
    bad = tmp_path / "bad.yaml"
    for recipe, wanted in (({"train": {"max_stpes": 3}}, "recipe.train.max_steps"), ({"trian": {}}, "recipe.train")):
        bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, "recipe": recipe}))
        with pytest.raises(ValueError, match=rf"; did you mean {re.escape(wanted)}\?"):
            load_compare_config(bad)


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, "budjet": {}}))
    with pytest.raises(ValueError, match="budjet: unknown field; did you mean budget"):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                   "recipe": {"model": "x"}}))
    with pytest.raises(ValueError, match="recipe.model"):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                   "throughput": {"batch_size": 2, "batch_tokens": 64}}))
    with pytest.raises(ValueError, match="throughput: set one of batch_size and batch_tokens, not both"):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                   "base": "configs/models/transformerpp-tiny.yaml"}))
    with pytest.raises(ValueError, match=r"^base: is the config that swaps start from, but there are no swaps"):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {" ": "configs/models/mamba-tiny.yaml"}}))
    with pytest.raises(ValueError, match=r"^models. : a model name names its results folder; use a name that is "
                                         r"not blank"):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                   "recipe": {"train": {"max_step": 3}}}))
    with pytest.raises(ValueError, match=r"^recipe.train.max_step: unknown field; did you mean recipe.train.max_steps"):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, "accounting": {"kv_bytes": 0}}))
    with pytest.raises(ValueError, match="accounting.kv_bytes: bytes per float must be >= 1"):
        load_compare_config(bad)


@pytest.mark.parametrize("where, name", [("models", "results.md"), ("models", "loss.png"),
                                         ("swaps", "compare_config.yaml")])
def test_a_model_named_as_one_of_the_comparisons_files_is_refused(tmp_path, where, name):
    """A model's folder took the path of output_dir's file of that name: the comparison failed writing it, mid-run
    (results.md after the first model trained, loss.png after every model had)."""
    models = {"m": "configs/models/mamba-tiny.yaml"}
    section = {"models": {**models, name: models["m"]}} if where == "models" else \
        {"models": models, "base": models["m"], "swaps": {name: None}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(section))
    with pytest.raises(ValueError, match=rf"^{where}\.{re.escape(name)}: a model name names its results folder, and "
                                         rf"output_dir's {re.escape(name)} is the comparison's own file"):
        load_compare_config(bad)


def test_a_model_yaml_that_is_not_valid_yaml_is_named(tmp_path):
    """A model config of the comparison that YAML cannot parse was reported as yaml's own error, which names the text
    as "<unicode string>": not which model, nor which file."""
    (tmp_path / "broken.yaml").write_text("d_model: [64\n")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml", "b": "broken.yaml"}}))
    cfg, folder = load_compare_config(path)
    with pytest.raises(ValueError, match=r"models\.b: 'broken.yaml' is not valid YAML \(.*broken.yaml\): while "
                                         r"parsing a flow sequence"):
        resolve_models(cfg, folder)


def test_throughput_batch_size_alone_is_taken(tmp_path):
    """throughput.batch_tokens defaulted to 8192, so a config giving batch_size alone (rows per step) was refused with
    'set exactly one of batch_size and batch_tokens', which it had; it had to null batch_tokens too."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                    "throughput": {"seq_lens": [64], "batch_size": 2}}))
    cfg, _ = load_compare_config(path)
    assert (cfg.throughput.batch_size, cfg.throughput.batch_tokens) == (2, None)
    path.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, "throughput": {}}))
    cfg, _ = load_compare_config(path)
    assert (cfg.throughput.batch_size, cfg.throughput.batch_tokens) == (None, 8192)  # the default, as before


def test_model_and_length_errors_name_the_field(tmp_path):
    """A missing model YAML names the model (or base) that points to it; a swap that is not a mapping and a length
    below 1 are refused naming their field, before anything is trained (they were an AttributeError, and a
    ZeroDivisionError after the first model's training)."""
    bad = tmp_path / "bad.yaml"
    cases = [({"models": {"mamba": "configs/models/nope.yaml"}}, "models.mamba: no such model config"),
             ({"base": "nope.yaml", "swaps": {"x": {}}}, "base: no such model config"),
             ({"base": "configs/models/mamba-tiny.yaml", "swaps": {"x": [1]}}, "swaps.x: expected a mapping"),
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "throughput": {"seq_lens": [0, 64]}},
              r"throughput.seq_lens: lengths must be >= 1"),
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "accounting": {"seq_lens": [0]}},
              r"accounting.seq_lens: lengths must be >= 1"),
             # a typo under model_overrides was reported as the first model's field
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "model_overrides": {"vocab_sise": 260}},
              r"model_overrides: vocab_sise: unknown field; did you mean 'vocab_size'"),
             # a list of overrides was a TypeError traceback ('cannot convert dictionary update sequence element')
             ({"models": {"m": {"config": "configs/models/mamba-tiny.yaml", "overrides": ["vocab_size: 260"]}}},
              r"models.m.overrides: expected a mapping of config fields"),
             # a quoted "false" was true (bool of a non-empty string)
             ({"models": {"m": {"config": "configs/models/mamba-tiny.yaml", "match": "false"}}},
              r"models.m.match: expected true or false"),
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "train_lengths": [64, 64]},
              r"train_lengths: each length once"),
             # a name YAML reads as a number or a boolean: `output_dir / 5` failed in a TypeError traceback
             ({"models": {5: "configs/models/mamba-tiny.yaml"}},
              r"models.5: YAML reads this model name as the int 5, but"),
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "base": "configs/models/mamba-tiny.yaml",
               "swaps": {True: None}}, r"swaps.True: YAML reads this model name as the bool True, but"),
             # a name with '/' made nested result folders
             ({"models": {"a/b": "configs/models/mamba-tiny.yaml"}}, r"models.a/b: a model name names its results"),
             # transformers' own message for an unknown model type lists every type it knows (12K characters)
             ({"models": {"m": {"config": {"model_type": "lamma", "hidden_size": 64}}}},
              r"models.m: model_type: 'lamma' is not a transformers model type; did you mean 'llama'"),
             # transformers' checks of its fields raise huggingface_hub's StrictDataclassError, no ValueError: the
             # comparison ended in a traceback
             ({"models": {"m": {"config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3}}}},
              r"models.m: The hidden size \(64\) is not a multiple of the number of attention heads \(3\)"),
             ({"models": {"m": {"config": {"model_type": "llama", "hidden_size": "64"}}}},
              r"models.m: Field 'hidden_size' expected int, got str"),
             # a field value transformers' checks let through failed the accounting's build of the model (on the
             # meta device) in torch's traceback, naming no model ("RuntimeError: Trying to create tensor with
             # negative dimension -1: [64, -1]"), or in torch's one line "groups must be a positive integer"
             ({"models": {"m": {"config": {"model_type": "mamba", "hidden_size": 32, "state_size": -1}}}},
              r"models.m: the mamba model \(MambaConfig\) cannot be built from its config: RuntimeError: Trying to "
              r"create tensor with negative dimension -1: \[64, -1\]; check the values of its fields \(state_size=-1, "
              r"hidden_size=32\)"),
             ({"models": {"m": {"config": {"model_type": "mamba", "hidden_size": 0}}}},
              r"models.m: the mamba model \(MambaConfig\) cannot be built from its config: ValueError: groups must be "
              r"a positive integer; check the values of its fields \(hidden_size=0\)"),
             # transformers builds a Mamba of conv_kernel 0, accounted without a word, which failed at the first
             # step of its training ("negative padding is not supported"), after the models before it trained
             ({"models": {"m": {"config": {"model_type": "mamba", "hidden_size": 32, "conv_kernel": 0}}}},
              r"models.m: conv_kernel: 0 is no kernel size for the causal convolution of the mamba model's Mamba "
              r"layers, which mixes each channel's last conv_kernel inputs \(the current one included\); give an "
              r"integer >= 1"),
             # a training length whose rows do not divide batch_tokens failed only when that length's training began
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "train_lengths": [64, 96],
               "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": 64},
                          "train": {"batch_tokens": 256, "micro_batch_size": 2, "max_steps": 2},
                          "schedule": {"warmup_steps": 0}}},
              r"train_lengths: at L=96: "),
             # without batch_tokens a micro-batch of 4 x 64 tokens became 1 x 1024: the L=1024 models trained on 4x
             # the tokens of the L=64 ones
             ({"models": {"m": "configs/models/mamba-tiny.yaml"}, "train_lengths": [64, 1024],
               "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": 64},
                          "train": {"micro_batch_size": 4, "max_steps": 2}, "schedule": {"warmup_steps": 0}}},
              r"train_lengths: at L=1024: a micro-batch holds 1 · 1024 = 1024 tokens, not the recipe's 4 · 64 = 256, "
              r"so the lengths would train on different tokens per step; set recipe.train.batch_tokens to a multiple "
              r"of 1024")]
    for data, message in cases:
        bad.write_text(yaml.safe_dump(data))
        with pytest.raises(ValueError, match=message):
            cfg, folder = load_compare_config(bad)
            resolve_models(cfg, folder)


def test_train_lengths_advice_is_taken_by_a_recipe_that_sets_grad_accum(tmp_path):
    """The advice for train_lengths whose micro-batches would differ in tokens was to set recipe.train.batch_tokens;
    beside the recipe's train.grad_accum (the demo's sets it) that was refused next ('set either train.batch_tokens
    or train.grad_accum, not both'). It says to set it in place of grad_accum, which is then taken."""
    path = tmp_path / "lengths.yaml"
    train = {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 2}
    data = {"models": {"m": "configs/models/mamba-tiny.yaml"}, "train_lengths": [64, 1024],
            "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": 64}, "train": train,
                       "schedule": {"warmup_steps": 0}}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"set recipe\.train\.batch_tokens to a multiple of 1024 in place of "
                                         r"recipe\.train\.grad_accum \(unset it\)$"):
        load_compare_config(path)
    del train["grad_accum"]
    path.write_text(yaml.safe_dump({**data, "recipe": {**data["recipe"], "train": {**train, "batch_tokens": 1024}}}))
    cfg, _ = load_compare_config(path)
    assert cfg.train_lengths == [64, 1024]
    train["grad_accum"] = None  # unset in YAML: the advice is the plain one
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"set recipe\.train\.batch_tokens to a multiple of 1024$"):
        load_compare_config(path)
    path.write_text(yaml.safe_dump({**data, "train_lengths": [1024]}))  # one length: no lengths to differ
    cfg, _ = load_compare_config(path)
    assert cfg.train_lengths == [1024]


def test_recipe_fields_the_comparison_would_not_honour_are_refused(tmp_path):
    """recipe.model_overrides reached training (build_model applies it) but not budget matching or accounting: with
    vocab_size 4000 the table said 197K parameters, -1.6% from the budget, for a model of 500K; recipe.eval was
    replaced by the comparison's eval.every 0 without a word. Both are refused, naming where the setting goes."""
    bad = tmp_path / "bad.yaml"
    for recipe, message in (({"model_overrides": {"vocab_size": 4000}}, "recipe.model_overrides: .* top-level "
                                                                         "model_overrides"),
                            ({"eval": {"every": 10}}, "recipe.eval: .* top-level eval section")):
        bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, "recipe": recipe}))
        with pytest.raises(ValueError, match=message):
            load_compare_config(bad)


@pytest.mark.parametrize("mqar, message", [
    ({"vocab_size": 8}, r"eval.mqar: mqar: vocab_size=8 has 3 keys, fewer than n_kv=4; pass vocab_size >= "
                        r"2 \* n_kv \+ 2 = 10"),
    ({"power_a": 0}, r"eval.mqar: mqar: power_a=0.0 must be > 0"),
    ({"eval_n_kv": [16]}, r"eval.mqar: no cell of eval_seq_lens x eval_n_kv: mqar: n_kv=16 needs seq_len >= 4 .*64")])
def test_mqar_settings_no_row_can_be_built_with_are_refused_up_front(tmp_path, mqar, message):
    """MQAR settings whose rows cannot be built (n_kv beyond half the task's vocabulary, power_a <= 0, an evaluation
    grid with no buildable cell) failed only at the MQAR phase, after the first model's text training."""
    bad = tmp_path / "bad.yaml"
    base = {"steps": 2, "seq_len": 32, "n_kv": 4, "vocab_size": 32, "eval_seq_lens": [32, 48]}
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                   "eval": {"mqar": {**base, **mqar}}}))
    with pytest.raises(ValueError, match=message):
        load_compare_config(bad)
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                   "eval": {"mqar": {**base, "eval_n_kv": [4, 16]}}}))
    load_compare_config(bad)  # one buildable cell is enough: evaluation skips the other with a warning


@pytest.mark.parametrize("override, message", [
    ("--models.gla={config: configs/models/gla-tiny.yaml, overrides: {vocab_size: 200}}",
     "models.gla: 200 embeddings but the tokenizer has 259 tokens"),
    ("--eval.mqar.vocab_size=300", "eval.mqar.vocab_size: 300 exceeds models.mamba's vocabulary 260"),
    # model_overrides reach the zoo models only: the advice to set model_overrides.vocab_size was refused again
    ("--models.llama={model_type: llama, vocab_size: 200, hidden_size: 32, intermediate_size: 64, "
     "num_hidden_layers: 1, num_attention_heads: 2}",
     "models.llama: 200 embeddings but the tokenizer has 259 tokens; set vocab_size >= 259 (in models.llama's own "
     "fields: model_overrides reach the zoo models only)")])
def test_vocabulary_too_small_is_refused_before_training(tmp_path, capsys, override, message):
    """A model with fewer embeddings than the tokenizer's tokens (or MQAR's vocabulary) is refused before any model
    trains, naming it; it was refused when its own phase came, after the models before it had trained."""
    out = tmp_path / "vocab"
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", override,
                 "--recipe.train.max_steps=2", "--recipe.schedule.warmup_steps=1", "--recipe.log.progress_bar=false",
                 "--eval.batches=1", "--eval.per_position=null", "--eval.passkey=null", "--eval.mqar.steps=2",
                 "--throughput=null"]) == 2
    assert message in capsys.readouterr().err
    assert not any(out.glob("*/train-*"))


def test_a_tokenizer_whose_pad_or_eos_id_lies_past_a_models_embeddings_is_refused_before_training(tmp_path, capsys):
    # a tokenizer of 30 tokens whose <pad> and <eos> have ids 700 and 701 passed the check of its size against each
    # model's embeddings: a model of 300 was refused when its own training came, after the models before it trained
    save_letter_tokenizer(tmp_path / "tok", pad_token=("<pad>", 700), eos_token=("<eos>", 701))
    out = tmp_path / "vocab"
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}",
                 f"--recipe.tokenizer={tmp_path / 'tok'}", "--recipe.data.add_bos=false",
                 "--model_overrides.vocab_size=800",
                 "--models.gla={config: configs/models/gla-tiny.yaml, overrides: {vocab_size: 300}}",
                 "--recipe.train.max_steps=2", "--recipe.schedule.warmup_steps=1", "--recipe.log.progress_bar=false",
                 "--eval.batches=1", "--eval.per_position=null", "--eval.passkey=null", "--eval.mqar.steps=2",
                 "--throughput=null"]) == 2
    assert "models.gla: tokenizer: its pad_token_id 700 is outside the model's vocabulary (vocab_size 300: ids " \
           "0..299), though the tokenizer has 30 tokens (its ids have gaps); set vocab_size >= 702" \
        in capsys.readouterr().err
    assert not any(out.glob("*/train-*"))


def test_recipe_trackers_are_kept_beside_csv(tmp_path):
    """recipe.log.trackers (tensorboard, wandb) was replaced by ['csv'] without a word: no run of the comparison
    reached the user's tracker. CSV is added (the loss curves are read from metrics.csv), the rest is kept."""
    from zoo.compare import train_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"},
                                    "recipe": {"log": {"trackers": ["tensorboard"]}}}))
    cfg, folder = load_compare_config(path)
    (entry,) = resolve_models(cfg, folder)
    assert train_config(cfg, entry, 64, tmp_path / "run").log.trackers == ["tensorboard", "csv"]
    cfg.recipe["log"]["trackers"] = ["csv"]
    assert train_config(cfg, entry, 64, tmp_path / "run").log.trackers == ["csv"]


def test_base_and_swaps(tmp_path):
    path = tmp_path / "swaps.yaml"
    path.write_text(yaml.safe_dump({
        "base": "configs/models/transformerpp-tiny.yaml", "model_overrides": {"vocab_size": 260},
        "swaps": {"attn": {}, "gla": {"A": {"type": "gla", "n_heads": 2}},
                  "mamba": {"A": {"type": "mamba"}, "ffn": "none", "layers": "AAAA"}},
        "budget": {"params": 150_000}}))
    cfg, folder = load_compare_config(path)
    entries = {e.name: e for e in resolve_models(cfg, folder)}
    assert entries["gla"].fields["mixers"]["A"]["type"] == "gla"
    assert entries["mamba"].fields["ffn"] == "none"
    for entry in entries.values():
        assert abs(instantiated_params(entry.config()) / 150_000 - 1) <= 0.02


def test_swap_of_a_letter_the_pattern_does_not_use_is_refused(tmp_path):
    """A swap keyed by a letter the base's pattern lacks (G on Transformer++'s "AA") added an unused mixer: the 'gla'
    model was the base Transformer++, trained and reported under the name gla. Now refused, naming the letters."""
    path = tmp_path / "swaps.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/models/transformerpp-tiny.yaml",
                                    "swaps": {"gla": {"G": {"type": "gla", "n_heads": 2}}}}))
    cfg, folder = load_compare_config(path)
    with pytest.raises(ValueError, match=r"swaps.gla.G: the layer pattern 'AA' has no letter 'G'.* use one of its "
                                         r"letters \(A\) or set layers"):
        resolve_models(cfg, folder)
    # with its own pattern the new letter is used
    path.write_text(yaml.safe_dump({"base": "configs/models/transformerpp-tiny.yaml",
                                    "swaps": {"gla": {"G": {"type": "gla", "n_heads": 2}, "layers": "GG"}}}))
    (entry,) = resolve_models(*load_compare_config(path))
    assert [s["type"] for s in entry.config().layer_specs()] == ["gla", "gla"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}",
            "--recipe.train.max_steps=3", "--recipe.schedule.warmup_steps=1", "--recipe.log.every=1",
            "--recipe.log.progress_bar=false", "--eval.batches=1", "--eval.per_position.n_docs=1",
            "--eval.per_position.max_len=96", "--eval.per_position.chunk_size=32", "--eval.mqar.steps=2",
            "--eval.mqar.eval_samples=8", "--throughput.seq_lens=[32, 64]", "--throughput.steps=1",
            "--throughput.warmup=0", "--throughput.batch_tokens=64",
            "--eval.passkey={lengths: [256], depths: [0.5], n_samples: 1, max_new_tokens: 6}"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    table = (out / "results.md").read_text()
    assert table in printed.out
    assert "(data seed 0, initialisation seed 0)" in table  # the header named train.seed alone, as "seed"
    for name in FAMILIES:
        assert f"| {name} |" in table
        record = json.loads((out / name / "result.json").read_text())
        assert record["done"] and set(record["phases"]) == {"train/L128", "eval/L128", "mqar", "throughput"}
        train = record["phases"]["train/L128"]
        assert train["steps"] == 3 and train["tokens"] == 3 * 4 * 128  # the same tokens for every model
        assert math.isfinite(record["phases"]["eval/L128"]["eval_loss"])
        assert 0 <= record["phases"]["mqar"]["accuracy"] <= 1
        assert record["phases"]["eval/L128"]["passkey"]["rows"][0]["n_samples"] == 1
        assert abs(record["accounting"]["params"] / 200_000 - 1) <= 0.02
        assert record["phases"]["eval/L128"]["backend"]  # the backend each mixer ran
    curves = [json.loads((out / n / "result.json").read_text())["phases"]["train/L128"]["curve"] for n in FAMILIES]
    assert len({tuple(r["tokens"] for r in c) for c in curves}) == 1
    assert "## Wall time per phase" in table  # each phase's seconds, to plan a run on a GPU
    for name in FAMILIES:
        secs = json.loads((out / name / "result.json").read_text())["phase_seconds"]
        assert set(secs) == {"train/L128", "eval/L128", "mqar", "throughput"} and all(v >= 0 for v in secs.values())
        assert re.search(rf"\| {name} \| \d+ \| \d+ \| \d+ \| \d+ \| \d+ \|", table), name
    for png in ("loss.png", "throughput.png", "memory.png", "recall.png", "length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # a rerun redoes nothing but the report; a changed throughput setting redoes only that phase
    before = {n: (out / n / "result.json").stat().st_mtime_ns for n in FAMILIES}
    assert main(argv + ["--only=mamba"]) == 0
    err = capsys.readouterr().err
    assert "training at" not in err and "throughput and memory" not in err
    assert (out / "mamba" / "result.json").stat().st_mtime_ns != before["mamba"]  # rewritten, unchanged phases
    assert all((out / n / "result.json").stat().st_mtime_ns == before[n] for n in FAMILIES if n != "mamba")
    assert "| transformerpp |" in (out / "results.md").read_text()  # finished models stay in the report
    argv[argv.index("--throughput.seq_lens=[32, 64]")] = "--throughput.seq_lens=[32]"
    assert main(argv + ["--only=gla"]) == 0
    err = capsys.readouterr().err
    assert "gla: throughput and memory" in err and "training at" not in err and "MQAR" not in err


@pytest.mark.parametrize("accounting_only", [False, True], ids=["run", "accounting-only"])
def test_a_comparison_builds_each_model_on_the_meta_device_once(tmp_path, monkeypatch, accounting_only):
    # the checks and the accounting built every model on the meta device anew: a transformers model four times
    # (resolve_models' check, _check_inputs' accounting and its own check, run_model's accounting), a zoo model three
    import collections

    import zoo.compare as compare

    real, built = compare._meta_model, collections.Counter()

    def counted(config, given=()):
        built[type(config).__name__] += 1
        return real(config, given)

    monkeypatch.setattr(compare, "_meta_model", counted)
    for phase in ("phase_train", "phase_eval"):  # (the training and its evaluation build real models, not counted)
        monkeypatch.setattr(compare, phase, lambda *args, **kwargs: {"checkpoint": "none"})
    llama = {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"llama": {"config": llama}, "mamba": "configs/models/mamba-tiny.yaml"},
        "model_overrides": {"vocab_size": 260}, "output_dir": str(tmp_path / "out"),
        "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": 16},
                   "train": {"max_steps": 1, "seed": 0}, "schedule": {"warmup_steps": 0}},
        "eval": {"batches": 1}, "throughput": None}))
    compare.run_comparison(*load_compare_config(path), accounting_only=accounting_only)
    assert built == {"LlamaConfig": 1, "ZooConfig": 1}


def _interrupt_model(monkeypatch, n: int) -> list[str]:
    """Ctrl-C as the comparison starts its n-th model; returns the names of the models it started."""
    import zoo.compare as compare

    real, calls = compare.run_model, []

    def stop(cfg, entry, *args, **kwargs):
        calls.append(entry.name)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(cfg, entry, *args, **kwargs)

    monkeypatch.setattr(compare, "run_model", stop)
    return calls


def test_interrupted_run_leaves_the_finished_models_table(tmp_path, monkeypatch):
    import zoo.compare as compare

    calls = _interrupt_model(monkeypatch, 3)
    out = tmp_path / "cut"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=2",
            "--recipe.schedule.warmup_steps=1", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null"]
    with pytest.raises(KeyboardInterrupt):
        compare.run_comparison(*load_compare_config(argv[0], [a[2:] for a in argv[1:]]))
    table = (out / "results.md").read_text()
    assert table.startswith(f"_Partial: 2 of {len(FAMILIES)} models finished; the run goes on with {calls[2]}._")
    assert f"| {calls[0]} |" in table and f"| {calls[1]} |" in table and f"| {calls[2]} |" not in table


def test_interrupted_forced_run_names_the_models_it_had_not_reached_and_how_to_redo_them(tmp_path, monkeypatch,
                                                                                        capsys):
    """--force stopped at its first model said 'rerun the same command without --force to continue': that rerun kept
    the earlier results of the models --force had not reached yet as finished, and the redo it was asked for was lost
    without a word. The message names them and the command that redoes them, and the two commands redo both."""
    import zoo.compare as compare

    out = tmp_path / "forced"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null",
            "--only=mamba,gla"]
    assert main(argv) == 0  # the earlier results of both
    real = compare.run_model
    _interrupt_model(monkeypatch, 1)
    assert main([*argv, "--force"]) == 130
    err = capsys.readouterr().err
    assert err.rstrip().endswith("rerun the same command without --force to continue, then with --force --only=gla "
                                 "to redo the model --force had not reached (the rerun without it keeps its earlier "
                                 "results)"), err
    monkeypatch.setattr(compare, "run_model", real)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "mamba: training" in err and "gla: training" not in err
    assert main([*argv[:-1], "--only=gla", "--force"]) == 0
    assert "gla: training" in capsys.readouterr().err


def test_a_forced_run_interrupted_before_its_first_model_says_to_rerun_it_with_force(tmp_path, monkeypatch, capsys):
    # Ctrl-C during the checks before any model (the meta builds, the passkey prompts) advised 'rerun the same command
    # without --force to continue': --force had deleted nothing yet, so that rerun kept every earlier result, and the
    # redo asked for was lost without a word
    import zoo.compare as compare

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_check_inputs", stopped)
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={tmp_path / 'forced'}",
            "--only=mamba,gla", "--force"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.rstrip().endswith("rerun the same command to continue"), err


def test_interrupted_forced_run_says_to_continue_without_force(tmp_path, monkeypatch, capsys):
    """After Ctrl-C in a run started with --force, 'rerun the same command to continue' led to --force again, which
    deletes each model's results before redoing it: the models finished before the interruption were retrained."""
    _interrupt_model(monkeypatch, 2)
    out = tmp_path / "forced"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=mamba,gla", "--force"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "rerun the same command without --force to continue" in err
    assert main(argv[:-1]) == 0  # the advice: mamba's results are kept, gla is run
    err = capsys.readouterr().err
    assert "mamba: training" not in err and "gla: training" in err


def test_results_of_another_recipe_are_left_out_of_the_table(tmp_path, capsys):
    """A rerun with --only and a changed recipe redoes that model; the others' results on disk were trained on other
    rows (or for other steps), so the table leaves them out and says so rather than comparing them."""
    out = tmp_path / "mixed"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=3",
            "--recipe.schedule.warmup_steps=1", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null"]
    assert main(argv + ["--only=mamba,gla"]) == 0
    assert "| gla |" in (out / "results.md").read_text()
    capsys.readouterr()
    argv[argv.index("--recipe.train.max_steps=3")] = "--recipe.train.max_steps=2"
    assert main(argv + ["--only=mamba", "--force"]) == 0
    table = (out / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" not in table
    assert table.startswith("_Left out: gla:") and table in capsys.readouterr().out


def test_a_model_an_earlier_run_did_not_finish_is_named_in_the_table(tmp_path, monkeypatch, capsys):
    """A model stopped mid-training, then a run of another model (--only): the table left the unfinished model out
    without a word, and read as the whole comparison."""
    import zoo.train as zt

    out = tmp_path / "unfinished"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=2",
            "--recipe.schedule.warmup_steps=1", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null"]
    real = zt.lr_at
    monkeypatch.setattr(zt, "lr_at", ctrl_c_on_step(real, 1))
    assert main(argv + ["--only=gla"]) == 130
    monkeypatch.setattr(zt, "lr_at", real)
    assert main(argv + ["--only=mamba"]) == 0
    table = (out / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" not in table
    assert table.startswith("_Not finished: gla: an earlier run stopped before their last phase; rerun them "
                            "(--only gla) to continue where they stopped._")
    assert table in capsys.readouterr().out
    assert main(argv + ["--only=gla"]) == 0  # the advice: gla finishes and joins the table
    table = (out / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" in table and "Not finished" not in table


def test_a_training_resumed_for_its_last_step_keeps_the_tokens_per_second_of_its_earlier_steps(tmp_path, monkeypatch):
    """train tok/s was timed over the steps of the invocation that finished the training, less its first: a training
    stopped with one step left recorded none (the table's "—"), one with a few left was timed over those few. The steps
    every invocation timed on this device count (an earlier invocation's on another device do not)."""
    import zoo.train as zt

    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), "--recipe.train.max_steps=3",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=mamba"]
    real = zt.lr_at
    for out, elsewhere in ((tmp_path / "here", False), (tmp_path / "elsewhere", True)):
        monkeypatch.setattr(zt, "lr_at", ctrl_c_on_step(real, 2))  # steps 0 and 1 done, then stopped
        assert main([*argv, f"--output_dir={out}"]) == 130
        timing = out / "mamba" / "train-L128" / "train-timing.json"
        if elsewhere:
            (segment,) = json.loads(timing.read_text())
            # (no card of this name: the H100 named here before was the GPU machine's own)
            timing.write_text(json.dumps([{**segment, "device": "another machine's GPU"}]))
        monkeypatch.setattr(zt, "lr_at", real)
        assert main([*argv, f"--output_dir={out}"]) == 0
        train = json.loads((out / "mamba" / "result.json").read_text())["phases"]["train/L128"]
        assert train["steps"] == 3
        if elsewhere:
            assert train["train_tokens_per_s"] is None
        else:
            assert train["train_tokens_per_s"] is not None
            (segment,) = json.loads(timing.read_text())  # steps 0 and 1, less the first
            assert segment["tokens"] == 4 * 128 and segment["seconds"] > 0
            assert train["train_tokens_per_s"] == pytest.approx(segment["tokens"] / segment["seconds"])


def test_a_train_timing_file_that_is_not_a_list_of_segments_is_dropped_with_a_warning(tmp_path, monkeypatch, capsys):
    # phase_train read train-timing.json in its finally block with json.loads alone: a file cut short or edited by hand
    # ended an interrupted invocation in json's message, naming no file ("zoo compare: Expecting value: line 1 column
    # 13 (char 12)", exit status 2), in place of the interruption's "rerun the same command to continue" (130); one of
    # another JSON value (an object) ended a finished training in a traceback ("TypeError: string indices must be
    # integers")
    import zoo.train as zt

    out = tmp_path / "run"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), "--recipe.train.max_steps=5",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=mamba", f"--output_dir={out}"]
    timing = out / "mamba" / "train-L128" / "train-timing.json"
    real = zt.lr_at
    monkeypatch.setattr(zt, "lr_at", ctrl_c_on_step(real, 2))  # steps 0 and 1 done and saved, then stopped
    assert main(argv) == 130
    timing.write_text('[{"device": ')
    monkeypatch.setattr(zt, "lr_at", ctrl_c_on_step(real, 4))  # steps 2 and 3, then stopped
    capsys.readouterr()
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(timing))}: not valid JSON .*dropped"):
        assert main(argv) == 130
    assert "zoo compare: interrupted" in capsys.readouterr().err
    (segment,) = json.loads(timing.read_text())  # this invocation's steps (2 and 3, less the first)
    assert segment["tokens"] == 4 * 128
    timing.write_text('{"device": "cpu"}')
    monkeypatch.setattr(zt, "lr_at", real)
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(timing))}: holds a JSON dict, not a list of .*dropped"):
        assert main(argv) == 0
    train = json.loads((out / "mamba" / "result.json").read_text())["phases"]["train/L128"]
    assert train["steps"] == 5 and train["train_tokens_per_s"] is None  # (step 4 alone: no step timed)


def test_a_training_from_its_first_step_drops_the_steps_an_earlier_invocation_timed(tmp_path):
    """train-timing.json of an invocation whose training is not resumed (no checkpoint in the run folder) times steps
    trained again: they counted into the fresh training's tokens/s."""
    out = tmp_path / "run"
    timing = out / "mamba" / "train-L128" / "train-timing.json"
    timing.parent.mkdir(parents=True)
    from zoo.compare import _device_name

    timing.write_text(json.dumps([{"device": _device_name(), "tokens": 10**9, "seconds": 1.0}]))
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), "--recipe.train.max_steps=3",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=mamba", f"--output_dir={out}"]
    assert main(argv) == 0
    (segment,) = json.loads(timing.read_text())  # this invocation's steps 1 and 2
    assert segment["tokens"] == 2 * 4 * 128
    train = json.loads((out / "mamba" / "result.json").read_text())["phases"]["train/L128"]
    assert train["train_tokens_per_s"] == pytest.approx(segment["tokens"] / segment["seconds"])


def test_a_trained_checkpoint_cut_short_is_refused_naming_its_file(tmp_path):
    # a model folder whose weights were cut short (a full disk, a copy): the evaluation phases ended in safetensors'
    # traceback, naming no file
    from zoo.compare import _load_trained

    model = AutoModelForCausalLM.from_config(ZooConfig(d_model=32, n_layers=1, vocab_size=64,
                                                       mixers={"M": {"type": "mamba"}}, layers="M"))
    model.save_pretrained(tmp_path / "ckpt" / "model")
    weights = tmp_path / "ckpt" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*--force"):
        _load_trained(tmp_path / "ckpt", torch.device("cpu"))


def test_accounting_only_needs_no_training(tmp_path, capsys):
    out = tmp_path / "acc"
    assert main([str(ROOT / "configs" / "compare" / "130m.yaml"), f"--output_dir={out}", "--accounting-only"]) == 0
    table = capsys.readouterr().out
    for name in FAMILIES:
        assert f"| {name} | 8192 |" in table
    assert not any(out.glob("*/train-*"))
    assert (out / "accounting.md").read_text() in table


def test_accounting_only_accounts_the_models_of_only_and_refuses_force(tmp_path, capsys):
    """--accounting-only took --only and --force and ignored both: `--only mamba` printed every model's accounting,
    and --force (which redoes trained models) did nothing without a word."""
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={tmp_path}", "--accounting-only"]
    assert main(argv + ["--only=mamba,gla"]) == 0
    table = (tmp_path / "accounting.md").read_text()
    assert "| mamba | 128 |" in table and "| gla | 128 |" in table
    assert "| transformerpp |" not in table and "| mamba2 |" not in table and "| jamba |" not in table
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv + ["--force"])
    assert e.value.code == 2 and "--force redoes trained models" in capsys.readouterr().err


def test_a_run_of_some_models_is_not_refused_for_a_problem_in_the_entry_of_another(tmp_path, capsys):
    """The checks before training (resolve_models: config files, fields, special ids, the budget; _check_inputs:
    vocabulary against the tokenizer, ...) covered every model of the config: `--only mamba` was refused for a problem
    in the entry of a model it does not run. They cover the models run; a model left out whose entry is refused is
    named where it has results (they are not of this config), and the recipe's packing, which every model trains
    under, is still checked for all."""
    demo = yaml.safe_load((ROOT / "configs" / "compare" / "demo.yaml").read_text())
    models = ROOT / "configs" / "models"
    path = tmp_path / "compare.yaml"

    def write(**entries) -> str:
        path.write_text(yaml.safe_dump({**demo, "models": {"mamba": str(models / "mamba-tiny.yaml"), **entries}}))
        return str(path)

    argv = [f"--output_dir={tmp_path / 'out'}", "--recipe.train.max_steps=1", "--recipe.schedule.warmup_steps=0",
            "--recipe.log.progress_bar=false", "--eval.batches=1", "--eval.per_position=null", "--eval.mqar=null",
            "--throughput=null"]
    broken = {"transformerpp": {"config": str(models / "transformerpp-tiny.yaml"),  # fewer embeddings than tokens
                                "overrides": {"vocab_size": 100}},
              "jamba": {"config": str(models / "jamba-tiny.yaml"), "overrides": {"pad_token_id": 1000}}}
    assert main([write(gla=str(models / "gla-tiny.yaml"), **broken), *argv, "--only=mamba,gla"]) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" in table
    capsys.readouterr()
    assert main([write(gla="no-such-model.yaml", **broken), *argv, "--only=mamba"]) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" not in table and "_Left out: gla:" in table
    capsys.readouterr()
    assert main([write(gla="no-such-model.yaml"), *argv, "--only=gla"]) == 2
    assert "zoo compare: models.gla: no such model config 'no-such-model.yaml'" in capsys.readouterr().err
    assert main([write(**broken), *argv, "--only=jamba"]) == 2
    assert "zoo compare: models.jamba: pad_token_id: 1000 is outside" in capsys.readouterr().err
    assert main([write(**broken), *argv, "--only=transformerpp"]) == 2
    assert "zoo compare: models.transformerpp: 100 embeddings but the tokenizer has" in capsys.readouterr().err
    # packed rows: the recipe of every model (a transformers Mamba takes neither seq_idx nor position_ids)
    hf_mamba = {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 260, "state_size": 4}
    assert main([write(hf=hf_mamba), *argv, "--only=mamba"]) == 2
    assert "zoo compare: recipe.data.packing: models.hf takes neither seq_idx" in capsys.readouterr().err


def test_a_run_of_some_models_is_not_refused_for_another_model_that_cannot_be_built(tmp_path):
    """The packing check of the models --only leaves out built each of them: one whose transformers class refuses its
    config when built (GPT-2's n_embd not a multiple of n_head, which its config takes) refused `--only mamba` in
    transformers' message alone, naming no model. It is that model's own problem, refused when a run trains it."""
    demo = yaml.safe_load((ROOT / "configs" / "compare" / "demo.yaml").read_text())
    gpt2 = {"model_type": "gpt2", "n_embd": 30, "n_head": 4, "n_layer": 1, "vocab_size": 260, "bos_token_id": 0,
            "eos_token_id": 0}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({**demo, "models": {"mamba": str(ROOT / "configs" / "models" / "mamba-tiny.yaml"),
                                                       "gpt2": gpt2}}))
    argv = [str(path), f"--output_dir={tmp_path / 'out'}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null",
            "--recipe.data.packing=true"]  # (packed rows: checked for the models left out too)
    assert main([*argv, "--only=mamba"]) == 0
    assert "| mamba |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("only", ["", ",", " , "])
def test_an_only_without_model_names_is_refused(tmp_path, capsys, only):
    """--only "$MODELS" with the variable empty (or only commas) ran every model of the config, hours of training for
    a run meant for some of them; --accounting-only accounted them all."""
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={tmp_path}", "--accounting-only"]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--only", only])
    assert e.value.code == 2 and f"--only: no model name in {only!r}" in capsys.readouterr().err
    assert not (tmp_path / "accounting.md").exists()


def test_accounting_only_leaves_a_finished_comparisons_results_alone(tmp_path, capsys):
    """--accounting-only (documented as needing no GPU) on a comparison's output_dir replaced its results.md and
    results.json by tables without a trained number, and its compare_config.yaml by the settings of the look."""
    out = tmp_path / "done"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=mamba"]
    assert main(argv) == 0
    before = {n: (out / n).read_bytes() for n in ("results.md", "results.json", "compare_config.yaml")}
    assert main(argv[:2] + ["--accounting-only", "--budget.params=300000"]) == 0
    assert "| mamba | 128 |" in capsys.readouterr().out
    assert {n: (out / n).read_bytes() for n in before} == before


# ---- decoding loops (zoo.decode), used by benchmarks/generate.py ---------------------------------------------

def _decode_models() -> dict:
    from transformers import AutoConfig

    torch.manual_seed(0)
    models = {n: AutoModelForCausalLM.from_config(ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{n}-tiny.yaml"))
              for n in FAMILIES}
    models["hf-llama"] = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512))
    models["hf-mamba"] = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=512))
    return {name: model.eval() for name, model in models.items()}


@pytest.mark.filterwarnings("ignore")
def test_eager_decoder_equals_generate():
    from zoo.decode import EagerDecoder, graphable, prefill

    for name, model in _decode_models().items():
        prompt = torch.randint(0, 512, (3, 20))
        ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)[:, 20:]
        state = prefill(model, prompt, chunk_size=7 if name in FAMILIES else None)
        first = state.next_ids.clone()
        got = torch.cat([first, EagerDecoder(model, state).decode(5)], dim=1)
        assert torch.equal(got, ref), name
        assert graphable(state.cache) == (name in FAMILIES), name  # zoo caches: KV layers can be made static


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mamba", "mamba2", "gla"])
def test_graph_decoder_equals_eager(name):
    from zoo.decode import EagerDecoder, GraphDecoder, prefill

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{name}-tiny.yaml"))
    model = model.cuda().eval()
    prompt = torch.randint(0, 512, (4, 40), device="cuda")
    eager = EagerDecoder(model, prefill(model, prompt)).decode(12)
    graph = GraphDecoder(model, prefill(model, prompt)).decode(12)
    assert torch.equal(graph, eager)


def test_table_numbers_that_round_up_to_the_next_unit_take_it():
    """The table's K / M / G numbers: 999,600 parameters (a 1M budget met 0.04% under) printed as "1e+03K", 999.6
    tokens/s as "1e+03"."""
    from zoo.compare import _si

    assert [_si(n) for n in (999.6, 999_600, 999_999_999, -999_600)] == ["1K", "1M", "1G", "-1M"]
    assert [_si(n) for n in (999.4, 1234, 99_950, 0.5, 0, None)] == ["999", "1.23K", "100K", "0.5", "0", "—"]


def test_recall_plot_labels_a_state_size_once_over_its_points():
    # a recurrent model's state is the same at every MQAR length; its two points (accuracies 0.070 and 0.072)
    # had a label each, printed on top of each other; attention's cache grows with the length: a label a point
    rows = [{"n_kv": 4, "state_floats": 100, "accuracy": 0.070, "seq_len": 32},
            {"n_kv": 4, "state_floats": 100, "accuracy": 0.072, "seq_len": 64},
            {"n_kv": 4, "state_floats": 400, "accuracy": 0.5, "seq_len": 128}]
    assert _recall_labels(rows) == [(100, 0.072, "L=32,64"), (400, 0.5, "L=128")]


class _CustomEMA(torch.nn.Module):
    """A custom mixer (by import path) with no sequence-mixing FLOPs of its own beyond its projection."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size, dtype, device, max_len=None):
        return None

    def state_size(self, seq_len: int) -> int:
        return 0

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x)


def test_a_custom_mixer_keeps_the_attention_flops_of_the_hybrids_builtin_layers():
    """A hybrid with one custom mixer fell back to module weights for every layer and dropped the sequence-mixing
    FLOPs of its built-in layers too: its attention layer's QKᵀ and PV cost nothing, the same at L = 8 and 4096, so
    a custom-mixer hybrid looked cheaper than it is against an attention baseline."""
    common = dict(vocab_size=50, d_model=16, ffn="none", layers="CA")
    custom = ZooConfig(mixers={"C": {"type": f"{__name__}._CustomEMA"}, "A": {"type": "attention", "n_heads": 2}},
                       **common)
    rows = account(custom, [8, 4096])["per_length"]
    weights = 16 * 16 + 4 * 16 * 16 + 50 * 16
    for row, L in zip(rows, (8, 4096)):
        assert row["flops_per_token"] == 2 * weights + 4 * causal_keys_mean(L) * 2 * 8
        assert row["decode_flops_per_token"] == 2 * weights + 4 * (L + 1) * 2 * 8


class _NoCache(torch.nn.Module):
    """A custom mixer with neither init_state nor state_size: it keeps no cache."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x).cumsum(1)


class _UnsizedCache(_NoCache):
    def init_state(self, batch_size, dtype, device, max_len=None):
        return None


def test_a_custom_mixer_without_state_size_is_accounted_or_named():
    """account() read every mixer's state_size: a custom mixer without one ended the accounting (zoo compare,
    zoo info) in AttributeError: '_NoCache' object has no attribute 'state_size'. A mixer that keeps no cache
    (no init_state) holds 0 floats; one with a cache but no size raises naming the mixer and the method."""
    common = dict(vocab_size=50, d_model=16, ffn="none", layers="CA")
    attention = {"type": "attention", "n_heads": 2}
    row = account(ZooConfig(mixers={"C": {"type": f"{__name__}._NoCache"}, "A": attention}, **common),
                  [8])["per_length"][0]
    assert row["state_floats"] == 0 and row["kv_floats"] == 2 * 2 * 8 * 8
    with pytest.raises(ValueError, match=r"mixer _UnsizedCache defines init_state .* no state_size\(seq_len\)"):
        account(ZooConfig(mixers={"C": {"type": f"{__name__}._UnsizedCache"}, "A": attention}, **common), [8])


class _LowPrecisionUnsplit(_NoCache):
    """A custom recurrent mixer whose step takes a low-precision state, but that does not say how much of it."""

    low_precision_state = True

    def init_state(self, batch_size, dtype, device, max_len=None):
        from zoo.cache import RecurrentLayer

        return RecurrentLayer()

    def state_size(self, seq_len: int) -> int:
        return 16


def test_a_custom_low_precision_mixer_without_its_split_is_named():
    """Under decode_state_dtype "model" a mixer with low_precision_state keeps part of its state_size in the model's
    dtype: without recurrent_state_size, the part so kept, its cache bytes are not known, and the accounting says so
    (its fp32 default is counted as before)."""
    common = dict(vocab_size=50, d_model=16, ffn="none", layers="C",
                  mixers={"C": {"type": f"{__name__}._LowPrecisionUnsplit"}})
    row = account(ZooConfig(**common), [8], state_bytes=4)["per_length"][0]
    assert row["state_floats"] == 16 and row["cache_mib"] * 2 ** 20 == 64
    with pytest.raises(ValueError, match=r"mixer _LowPrecisionUnsplit sets low_precision_state .* no "
                                         r"recurrent_state_size\(seq_len\)"):
        account(ZooConfig(decode_state_dtype="model", **common), [8])


class _ThreeHeads(_CustomEMA):
    """A custom mixer whose check_spec wants d_model divisible by its 3 heads."""

    def __init__(self, d_model: int, layer_idx: int = 0, *, n_heads: int = 3):
        self.check_spec(d_model, n_heads=n_heads)
        super().__init__(d_model, layer_idx)

    @staticmethod
    def check_spec(d_model: int, *, n_heads: int = 3) -> None:
        if d_model % n_heads:
            raise ValueError(f"n_heads: {n_heads} does not divide d_model {d_model}")


def test_budget_matching_skips_the_widths_a_custom_mixer_refuses():
    """match_budget skips a candidate d_model that the config refuses; a mixer given by import path is checked only
    when its model is built, so its refusal (here: 3 heads do not divide d_model 8) ended the whole search instead
    of skipping that width."""
    fields = dict(d_model=48, vocab_size=256, layers="HA", ffn={"type": "swiglu", "hidden": 128},
                  mixers={"H": {"type": f"{__name__}._ThreeHeads"}, "A": {"type": "attention", "n_heads": 2}})
    matched, info = match_budget(fields, 200_000)
    assert matched["d_model"] % 3 == 0 and abs(info["error"]) <= 0.02


@pytest.mark.parametrize("ffn", [None, "none"], ids=["null", "none"])
def test_budget_matching_keeps_a_moe_model_without_a_dense_ffn_so(ffn):
    """Mamba layers with MoE every second layer and no dense ffn (`ffn: null`): adjusting the ffn width wrote a SwiGLU
    of that width as the ffn, so the matched model had a SwiGLU MLP on every non-MoE layer, another architecture
    trained and reported under the name. The width adjusted is the experts' hidden size."""
    fields = dict(vocab_size=260, d_model=64, layers="MMMM", mixers={"M": {"type": "mamba"}}, ffn=ffn,
                  moe={"every": 2, "n_experts": 4, "top_k": 2})
    base = [s["ffn"] for s in ZooConfig(**copy.deepcopy(fields)).layer_specs()]
    assert base == ["none", "moe", "none", "moe"]
    matched, info = match_budget(fields, 400_000)
    assert [s["ffn"] for s in ZooConfig(**copy.deepcopy(matched)).layer_specs()] == base
    assert abs(info["error"]) <= 0.02 and info["params"] == instantiated_params(ZooConfig(**matched))


@pytest.mark.parametrize("hidden, budget, step", [(40, 150_000, 8), (40, 400_000, 8), (100, 1_000_000, 8),
                                                  (48, 300_000, 16), (100, 400_000, 16)])
def test_budget_matching_rounds_an_explicit_moe_hidden_size_to_the_step(hidden, budget, step):
    """An explicit MoE hidden size scaled by the ffn's ratio was rounded to 1, not to budget.adjust_multiple_of as the
    ffn's hidden size is: jamba-tiny's experts of 40 came out 14 wide at 150K parameters (35 at 400K). It is a multiple
    of the step, the one below or above the ffn's ratio, and the ffn's width lands the count within the tolerance."""
    fields = fields_of("jamba-tiny", vocab_size=260, moe={"every": 2, "n_experts": 3, "top_k": 1, "hidden": hidden})
    matched, info = match_budget(fields, budget, adjust_multiple_of=step)
    assert matched["moe"]["hidden"] % step == 0 and matched["ffn"]["hidden"] % step == 0, matched
    assert abs(info["error"]) <= 0.02 and info["params"] == instantiated_params(ZooConfig(**matched))


@pytest.mark.parametrize("section, message", [
    ({"eval": {"passkey": {"n_samples": 0}}}, r"eval.passkey.n_samples: must be >= 1, got 0"),
    ({"eval": {"passkey": {"lengths": []}}}, r"eval.passkey: lengths and depths need at least one value"),
    ({"eval": {"passkey": {"depths": [50]}}}, r"eval.passkey.depths: 50 is not a fraction"),
    ({"eval": {"passkey": {"max_new_tokens": 0}}}, r"eval.passkey.max_new_tokens: must be >= 1"),
    # (numpy's "expected non-negative integer" from the keys' seed, naming no field)
    ({"eval": {"passkey": {"lengths": [1024, -5]}}}, r"eval.passkey.lengths: lengths must be >= 1, got \[1024, -5\]"),
    ({"eval": {"per_position": {"n_docs": 0}}}, r"eval.per_position.n_docs: must be >= 1"),
    ({"eval": {"per_position": {"max_len": 1}}}, r"eval.per_position.max_len: must be >= 2"),
    ({"eval": {"per_position": {"chunk_size": 0}}}, r"eval.per_position.chunk_size: must be >= 1"),
    ({"eval": {"micro_batch_size": 0}}, r"eval.micro_batch_size: must be >= 1"),
    ({"eval": {"mqar": {"lr": -1e-3}}}, r"eval.mqar.lr: must be a finite number > 0"),
    # (an infinite lr trained every model to NaN; a negative warmup began the cosine partway, both without a word)
    ({"eval": {"mqar": {"lr": math.inf}}}, r"eval.mqar.lr: must be a finite number > 0, got inf"),
    ({"eval": {"mqar": {"warmup_steps": -5}}}, r"eval.mqar.warmup_steps: must be >= 0, got -5"),
    # ('Overflow when unpacking long long' from the batch generator, after the first model's text training)
    # (an empty eval grid was taken as unset: the training cell alone)
    ({"eval": {"mqar": {"eval_seq_lens": []}}}, r"eval.mqar.eval_seq_lens: an empty list"),
    ({"eval": {"mqar": {"eval_n_kv": []}}}, r"eval.mqar.eval_n_kv: an empty list"),
    ({"eval": {"mqar": {"seed": 2 ** 64}}}, r"eval.mqar.seed: must be in \[0, 2\*\*32\), got 18446744073709551616"),
    ({"throughput": {"batch_size": 0}}, r"throughput.batch_size: must be >= 1"),
    ({"throughput": {"batch_tokens": 0}}, r"throughput.batch_tokens: must be >= 1")])
def test_evaluation_settings_are_checked_before_any_training(tmp_path, section, message):
    """The evaluations run after the first model's text training (hours at 130M): a passkey, per-position or eval
    setting they refuse (n_samples 0, no lengths, a depth of 50, no documents) ended the run there with a message
    naming no field, a batch_size of 0 was a TypeError, a batch_tokens of 0 timed one row, a negative MQAR lr trained
    uphill. Each is refused when the config is read, naming it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, **section}))
    with pytest.raises(ValueError, match=message):
        load_compare_config(bad)


def test_passkey_lengths_below_the_template_are_refused_before_training(tmp_path, capsys):
    """A passkey length shorter than the bare template (188 byte tokens) was refused by evaluate_passkey after the first
    model had trained, advising '--lengths' (zoo eval passkey's option), not the comparison's field."""
    out = tmp_path / "short"
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--only=mamba",
                 "--recipe.train.max_steps=1", "--recipe.schedule.warmup_steps=0", "--eval.per_position=null",
                 "--eval.mqar=null", "--throughput=null", "--eval.passkey={lengths: [64, 512]}"]) == 2
    assert "eval.passkey.lengths: 64 tokens is shorter than the bare passkey template" in capsys.readouterr().err
    assert not any(out.glob("*/train-*"))


def test_passkey_max_new_tokens_too_few_for_the_key_is_refused_before_training(tmp_path, capsys):
    """eval.passkey.max_new_tokens 2 cut every byte-tokenizer answer " 12345" (6 tokens) to " 1": every model's passkey
    column read 0.00 whatever it wrote."""
    out = tmp_path / "few"
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--only=mamba",
                 "--recipe.train.max_steps=1", "--recipe.schedule.warmup_steps=0", "--eval.per_position=null",
                 "--eval.mqar=null", "--throughput=null",
                 "--eval.passkey={lengths: [256], depths: [0.5], n_samples: 1, max_new_tokens: 2}"]) == 2
    assert "eval.passkey.max_new_tokens: 2 new tokens cannot write an answer" in capsys.readouterr().err
    assert not any(out.glob("*/train-*"))


def test_models_finished_earlier_are_accounted_with_this_runs_settings(tmp_path):
    """A model finished by an earlier run (--only) joined the table with the accounting stored in its result.json:
    after a rerun with accounting.kv_bytes 1 (fp8 KV) and other accounting lengths, the table and results.json gave
    Transformer++'s cache at 2 bytes per float and at the old lengths, beside models accounted at 1 byte."""
    out = tmp_path / "acc"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null"]
    assert main(argv + ["--only=transformerpp"]) == 0
    assert main(argv + ["--only=gla", "--accounting.kv_bytes=1", "--accounting.seq_lens=[128, 1024]"]) == 0
    records = {r["name"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    rows = records["transformerpp"]["accounting"]["per_length"]
    assert [r["seq_len"] for r in rows] == [128, 1024]
    assert all(r["cache_mib"] == r["kv_floats"] / 2**20 for r in rows)  # one byte per KV float
    assert "| transformerpp | 1024 |" in (out / "results.md").read_text()


def test_a_phase_turned_off_is_not_reported_from_earlier_runs(tmp_path):
    """With eval.mqar: null the finished models' MQAR phases stayed in the table and recall plot whatever settings each
    was made with: mamba's after 2 MQAR steps beside gla's after 1, both under 'MQAR acc'. A phase the config turns
    off is left out of the report (and a length no longer trained out of the wall-time table)."""
    out = tmp_path / "off"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--throughput=null", "--eval.passkey=null", "--eval.mqar.eval_samples=8",
            "--eval.mqar.eval_seq_lens=[32]"]
    assert main(argv + ["--only=mamba", "--eval.mqar.steps=2"]) == 0
    assert main(argv + ["--only=gla", "--eval.mqar.steps=1"]) == 0
    assert main(argv + ["--only=gla", "--eval.mqar=null"]) == 0
    table = (out / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" in table and "## MQAR recall" not in table
    records = json.loads((out / "results.json").read_text())["records"]
    assert all(set(r["phases"]) == {"train/L128", "eval/L128"} == set(r["phase_seconds"]) for r in records)


def test_a_rerun_with_another_progress_bar_continues_the_comparison(tmp_path, capsys):
    """The results' fingerprint covered the recipe as written, progress bar and trackers included: rerunning a finished
    comparison without --recipe.log.progress_bar=false (or with a tensorboard tracker added) was refused as 'results
    of a different model config or recipe; pass --force', which retrains every model. Fields that change no result
    are left out of it; results written before (the recipe's own fingerprint) still count as this comparison's."""
    out = tmp_path / "bar"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--eval.batches=1", "--eval.per_position=null",
            "--eval.mqar=null", "--throughput=null", "--eval.passkey=null", "--only=mamba"]
    assert main(argv + ["--recipe.log.progress_bar=false"]) == 0
    capsys.readouterr()
    assert main(argv + ["--recipe.log.trackers=[csv, tensorboard]"]) == 0
    err = capsys.readouterr().err
    assert "another model config or recipe" not in err and "mamba: training" not in err
    assert "| mamba |" in (out / "results.md").read_text()
    # a result.json written under the recipe's own fingerprint is taken
    from zoo.compare import ModelRecord, _fingerprint, _model_fingerprints

    cfg, folder = load_compare_config(argv[0], [a[2:] for a in argv[1:-1]])
    (entry,) = [e for e in resolve_models(cfg, folder) if e.name == "mamba"]
    data = json.loads((out / "mamba" / "result.json").read_text())
    data["fingerprint"] = _fingerprint({"fields": entry.fields, "recipe": cfg.recipe})
    (out / "mamba" / "result.json").write_text(json.dumps(data))
    assert ModelRecord(out / "mamba", _model_fingerprints(cfg, entry), {}).data["phases"] == data["phases"]
    with pytest.raises(ValueError, match="another model config or recipe"):  # a change that matters is refused
        cfg.recipe["train"]["max_steps"] = 2
        ModelRecord(out / "mamba", _model_fingerprints(cfg, entry), {})


def test_mqar_of_the_text_trained_model_is_redone_when_the_first_length_changes(tmp_path):
    """eval.mqar.steps 0 evaluates the model trained at the first of train_lengths; its settings key did not hold that
    length, so after train_lengths [128, 256] became [256, 128] the recorded recall of the L=128 model was kept as
    the L=256 model's."""
    from zoo.compare import _phase_keys

    path = tmp_path / "c.yaml"
    keys = {}
    for lengths in ([128, 256], [256, 128]):
        for steps in (0, 2):
            path.write_text(yaml.safe_dump({"models": {"m": "configs/models/mamba-tiny.yaml"}, "train_lengths": lengths,
                                            "recipe": {"data": {"seq_len": 128}, "train": {"micro_batch_size": 2}},
                                            "eval": {"mqar": {"steps": steps}}}))
            keys[lengths[0], steps] = _phase_keys(load_compare_config(path)[0])["mqar"]
    assert keys[128, 0] != keys[256, 0]
    assert keys[128, 2] == keys[256, 2]  # a fresh copy trained on MQAR: the text model's length does not matter


def test_backends_are_reported_in_the_dtype_the_phases_run_in(tmp_path, monkeypatch):
    """Evaluation and throughput run under the device's autocast (bf16 on a GPU), but their backend reports were
    resolved outside it, in fp32: on an H100 the table said attention ran sdpa_efficient where it ran cuDNN."""
    import zoo.compare as compare
    from zoo.mixers.attention import Attention

    monkeypatch.setattr(compare, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    # the kernel attention picks depends on the dtype it runs in: report that dtype
    monkeypatch.setattr(Attention, "backend_name", lambda self: str(torch.get_autocast_dtype("cpu"))
                        if torch.is_autocast_enabled("cpu") else "fp32")
    out = tmp_path / "bf16"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--eval.passkey=null", "--throughput.seq_lens=[16]",
            "--throughput.steps=1", "--throughput.warmup=0", "--only=transformerpp"]
    assert main(argv) == 0
    phases = json.loads((out / "transformerpp" / "result.json").read_text())["phases"]
    for phase in ("eval/L128", "throughput"):
        assert set(phases[phase]["backend"].values()) == {"torch.bfloat16"}, phase
    assert "attention: torch.bfloat16 |" in (out / "results.md").read_text()


def test_cache_memory_is_labelled_with_the_bytes_it_is_counted_at(tmp_path, monkeypatch):
    """accounting.kv_bytes / state_bytes set the cache MiB, but the table and memory.png said "KV bf16, states fp32"
    whatever they were."""
    import matplotlib.axes

    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml",
                                      [f"output_dir={tmp_path}", "accounting.kv_bytes=1", "accounting.state_bytes=2"])
    result = compare.run_comparison(cfg, folder, accounting_only=True)
    assert ("cache per sequence: KV 1 and states 2 bytes per float, states kept in the model's dtype 1)"
            in result["markdown"])
    row = next(r for r in result["records"][0]["accounting"]["per_length"] if r["seq_len"] == 128)
    assert row["cache_mib"] == pytest.approx((row["kv_floats"] + 2 * row["state_floats"]) / 2 ** 20)
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: titles.append(label) or real(self, label, *a, **k))
    compare.write_plots(result["records"], cfg, tmp_path)
    assert "inference cache per sequence (KV 1 and states 2 bytes per float, states kept in the model's dtype 1)" \
        in [" ".join(t.split()) for t in titles]  # (wrapped to fit the figure)


def test_throughput_section_and_plot_name_the_precision_they_ran_in(tmp_path, monkeypatch):
    """On a GPU the throughput phase runs under bf16 autocast whatever the recipe's precision (the one train tok/s ran
    in): its table and plot named the device only."""
    import matplotlib.axes

    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [f"output_dir={tmp_path}"])
    records = compare.run_comparison(cfg, folder, only=["mamba", "gla"], accounting_only=True)["records"]
    for rec in records:  # as a GPU run records it
        rec["phases"]["throughput"] = {"precision": "bf16 autocast", "device": "cuda", "rows": [
            {"seq_len": 128, "batch_size": 8, "step_ms": 10.0, "tokens_per_s": 102400.0, "peak_mib": 50.0,
             "memory_method": "cuda max_memory_allocated"}]}
    table = compare.markdown_report(records, cfg, "NVIDIA H100")
    assert "## Training step (forward + backward) on NVIDIA H100 (bf16 autocast); memory: cuda max_memory_allocated" \
        in table
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: titles.append(label) or real(self, label, *a, **k))
    compare.write_plots(records, cfg, tmp_path)
    assert f"throughput on {compare._device_name()} (bf16 autocast)" in titles


def test_plot_titles_fit_inside_their_figures(tmp_path, monkeypatch):
    """memory.png's cache title (the bytes per float) and length.png's title for documents that are partly training
    text ran past the figure's edge on one line: the saved PNGs cut them off mid-sentence."""
    import matplotlib.figure

    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [f"output_dir={tmp_path}"])
    records = compare.run_comparison(cfg, folder, only=["mamba", "gla"], accounting_only=True)["records"]
    bins = [{"start": 1, "end": 16, "mean_loss": 3.0, "n_tokens": 15}, {"start": 16, "end": 128, "mean_loss": 2.5,
                                                                         "n_tokens": 112}]
    for rec in records:  # per-position documents that the recipe partly trained on: the longer title
        rec["phases"]["eval/L128"] = {"per_position": {"bins": bins, "documents": {"trained_on_corpus": True,
                                                                                   "train_tokens": 10}}}
    outside = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        real(fig, path, *args, **kwargs)
        fig.canvas.draw()
        box, renderer = fig.bbox, fig.canvas.get_renderer()
        for ax in fig.axes:
            extent = ax.title.get_window_extent(renderer)
            if extent.x0 < box.x0 or extent.x1 > box.x1 or extent.y1 > box.y1:
                outside.append((Path(path).name, ax.title.get_text()))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    paths = compare.write_plots(records, cfg, tmp_path)
    assert {p.name for p in paths} >= {"memory.png", "length.png"}
    assert outside == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_threads makes another device only on a CPU")
def test_models_trained_on_another_device_are_named_in_the_report(tmp_path, capsys):
    """The training phase's key holds no device: a rerun on another device (here another CPU thread count) keeps the
    trained models, whose train tok/s (and training precision: recipe precision auto is fp32 on a CPU, bf16 on a GPU)
    are that device's, but the table's header named only this run's device."""
    out = tmp_path / "moved"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=2",
            "--recipe.schedule.warmup_steps=1", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=gla"]
    assert main(argv + ["--cpu_threads=1"]) == 0
    assert "another device" not in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(argv + ["--cpu_threads=2"]) == 0
    assert "gla: training" not in capsys.readouterr().err  # kept, not retrained
    table = (out / "results.md").read_text()
    assert "Device: CPU (2 threads)." in table
    assert "Trained on another device: gla on CPU (1 thread) (train tok/s and the training precision are that " \
           "device's, not CPU (2 threads)'s)." in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_threads makes another device only on a CPU")
def test_a_model_left_out_for_its_throughput_device_is_told_so(tmp_path, capsys):
    """A model whose throughput was measured on another device (here another CPU thread count) is left out of a run
    of the others, as its throughput phase's key holds the device; the note named only another model config, recipe or
    evaluation settings, none of which had changed."""
    out = tmp_path / "device"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput.seq_lens=[32]", "--throughput.steps=1",
            "--throughput.warmup=0", "--throughput.batch_tokens=32"]
    assert main(argv + ["--only=gla", "--cpu_threads=1"]) == 0
    assert main(argv + ["--only=mamba", "--cpu_threads=2"]) == 0
    table = (out / "results.md").read_text()
    assert "| mamba |" in table and "| gla |" not in table
    assert table.startswith(f"_Left out: gla: the results in {out} were made with another model config, recipe or "
                            f"evaluation settings, or their throughput measured on another device; rerun them")


def test_results_of_a_changed_model_are_refused_before_any_model_trains(tmp_path, capsys):
    """A model whose config changed since its results were made was refused only at its turn, after the models
    before it had trained, and the advice (--force) would have redone every finished model."""
    out = tmp_path / "changed"
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null"]
    assert main(argv + ["--only=gla"]) == 0
    capsys.readouterr()
    assert main(argv + ["--only=transformerpp,gla", "--budget.params=210000"]) == 2
    err = capsys.readouterr().err
    assert "the results of gla were made with another model config or recipe" in err
    assert "--force --only gla " in err and "training at" not in err
    assert not (out / "transformerpp").exists()
    assert "210000" not in (out / "compare_config.yaml").read_text()  # the record of the finished run stays


def test_budget_out_of_tolerance_names_the_settings_that_give_finer_sizes():
    """The advice was 'allow budget.adjust, change budget.multiple_of or knob' whatever the settings: jamba-tiny's
    ffn hidden size, already adjusted, moved 7.7% of the budget per step of budget.adjust_multiple_of (the one setting
    that lands it), and under knob n_layers budget.multiple_of (a d_model step) changes nothing."""
    fields = fields_of("jamba-tiny")
    with pytest.raises(ValueError, match=r"-2.4% from 150,000\) with d_model=24; try a smaller "
                                         r"budget.adjust_multiple_of \(the ffn hidden size moves in steps of 8\)") as e:
        match_budget(fields, 150_000)
    assert "budget.adjust:" not in str(e.value)
    assert abs(match_budget(fields, 150_000, adjust_multiple_of=4)[1]["error"]) <= 0.02  # the advice lands it
    # Mamba-2's d_inner moves in whole heads (head_dim 16 here), not in steps of adjust_multiple_of
    with pytest.raises(ValueError, match=r"with n_layers=3; try knob d_model, a wider budget.tolerance$"):
        match_budget(fields_of("mamba2-tiny"), 150_000, knob="n_layers")
    assert abs(match_budget(fields_of("mamba2-tiny"), 150_000)[1]["error"]) <= 0.02
    with pytest.raises(ValueError, match=r"; try budget.adjust: auto, a smaller budget.multiple_of"):
        match_budget(fields, 150_000, adjust="none")


def _refused_before_the_first_model_trains(tmp_path, capsys, name: str, model, folder: str, *, seq_len: int = 16,
                                           micro_batch_size: int = 1, data: dict | None = None,
                                           edit=None, args: tuple[str, ...] = ()) -> str:
    """Run `zoo compare` on a tiny Mamba and then `model` (named `name`) that the run must refuse before the Mamba
    trains: the exit status 2, no training begun, no folder of the Mamba's; stderr. `edit(cfg)` changes the config
    before it is written."""
    cfg = {"models": {"mamba": "configs/models/mamba-tiny.yaml", name: model},
           "model_overrides": {"vocab_size": 260}, "output_dir": str(tmp_path / folder),
           "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": seq_len, **(data or {})},
                      "train": {"max_steps": 1, "micro_batch_size": micro_batch_size}, "schedule": {"warmup_steps": 0},
                      "log": {"progress_bar": False}},
           "eval": {"batches": 1}, "throughput": None}
    if edit is not None:
        edit(cfg)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), *args]) == 2
    err = capsys.readouterr().err
    assert "training at" not in err and not (tmp_path / folder / "mamba").exists()
    return err


def test_a_model_the_accounting_cannot_count_is_refused_before_any_model_trains(tmp_path, capsys):
    """A transformers MoE (or a custom mixer with a cache but no state_size) failed its accounting only at its turn,
    after the models before it had trained."""
    mixtral = {"model_type": "mixtral", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 2,
               "num_experts_per_tok": 1}
    err = _refused_before_the_first_model_trains(tmp_path, capsys, "mixtral", mixtral, "moe", seq_len=32)
    assert "models.mixtral: accounting: transformers model_type 'mixtral' is a mixture of experts" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_throughput_peak_memory_leaves_out_the_warmup_steps(tmp_path, monkeypatch):
    """The peak was reset before the warmup steps, so one-off allocations of a first call (Triton's autotuning
    benchmarks, here a 1 GiB buffer) counted in the model's memory column."""
    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [
        f"output_dir={tmp_path}", "throughput.seq_lens=[32]", "throughput.steps=1", "throughput.warmup=1"])
    (entry,) = [e for e in resolve_models(cfg, folder) if e.name == "transformerpp"]
    real, calls = compare._autocast, []

    def autocast(device):  # entered before each step's forward
        calls.append(device)
        if len(calls) == 1:
            torch.empty(2 ** 30, dtype=torch.uint8, device=device)
        return real(device)

    monkeypatch.setattr(compare, "_autocast", autocast)
    # what earlier tests in this process left allocated counts in the peak too (1.1 GB after the modeling and train
    # cuda tests): the bound is on the phase's own share
    before = torch.cuda.memory_allocated() / 2 ** 20
    (row,) = compare.phase_throughput(cfg, entry, 128, tmp_path / "run", torch.device("cuda"))["rows"]
    assert len(calls) >= 2 and 0 < row["peak_mib"] - before < 512  # (the backend report enters it after the steps)


def test_throughput_releases_the_graph_of_a_step_out_of_memory_in_backward(tmp_path, monkeypatch):
    """After an out-of-memory error in backward, the failed step's loss (and its graph, the length's activations)
    stayed referenced while the next length's steps ran, under their memory peak."""
    import contextlib
    import weakref

    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [
        f"output_dir={tmp_path}", "throughput.seq_lens=[16, 32]", "throughput.steps=1", "throughput.warmup=0"])
    (entry,) = [e for e in resolve_models(cfg, folder) if e.name == "transformerpp"]
    failed, alive = [], []
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        if not failed:
            failed.append(weakref.ref(self))
            raise torch.OutOfMemoryError("out of memory")
        return real_backward(self, *args, **kwargs)

    def autocast(device):  # entered before each step's forward
        if failed:
            alive.append(failed[0]() is not None)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(compare, "_autocast", autocast)
    rows = compare.phase_throughput(cfg, entry, 128, tmp_path / "run", torch.device("cpu"))["rows"]
    assert rows[0]["note"] == "out of memory" and rows[1]["tokens_per_s"] > 0
    assert alive and not any(alive)


def test_a_throughput_length_past_the_cpus_memory_is_recorded_out_of_memory(tmp_path, monkeypatch):
    """The CPU allocator's failure is a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), not
    torch.OutOfMemoryError: a throughput length too long for the machine's memory ended the comparison in that
    traceback, after the model had trained, been evaluated and trained on MQAR; a GPU's is recorded and the run goes
    on. (The allocator's failure is raised for the middle length: a length past the memory, asked for, was given by a
    machine that overcommits memory, and its worker was killed as the tokens were written: the README's test command
    on the H100's machine, forty-fourth session.)"""
    import zoo.compare as compare

    real = torch.randint

    def randint(low, high, size, **kwargs):
        if tuple(size)[-1] == 64:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                               "tried to allocate 35184372088832 bytes.")
        return real(low, high, size, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)
    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [
        f"output_dir={tmp_path}", "throughput={seq_lens: [16, 64, 32], batch_size: 1, steps: 1, warmup: 0}"])
    (entry,) = [e for e in resolve_models(cfg, folder) if e.name == "mamba"]
    rows = compare.phase_throughput(cfg, entry, 128, tmp_path / "run", torch.device("cpu"))["rows"]
    assert [r.get("note") for r in rows] == [None, "out of memory", None]
    assert rows[0]["tokens_per_s"] > 0 and rows[2]["tokens_per_s"] > 0


@pytest.mark.parametrize("layers", [[{"type": "mamba"}, {"type": "mamba"}], "MM"], ids=["list", "default-mixers"])
def test_budget_matching_of_a_mamba_stack_without_its_own_mixers(layers):
    """Under budget.adjust auto a Mamba stack given as a list of layers (or a pattern over the default mixers) was
    refused with "budget.adjust: expand needs mamba/mamba2 mixers in `mixers`", an adjustment nobody had asked for;
    d_model alone matches it."""
    fields = {"vocab_size": 260, "d_model": 64, "ffn": "none", "layers": layers}
    _, info = match_budget(fields, 100_000)
    assert abs(info["error"]) <= 0.02 and "adjusted" not in info
    assert parameter_counts(ZooConfig(**match_budget(fields, 100_000)[0]))["total"] == info["params"]


def test_budget_matching_adjusts_the_expand_of_mamba_mixers_under_the_default_layers():
    """A config that gives its Mamba mixer in `mixers` and leaves `layers` at its default pattern ("MM", over those
    mixers) has its expand adjusted under budget.adjust auto, as one that spells the pattern out; it was matched by
    d_model alone and refused where no d_model lands within the tolerance."""
    fields = {"vocab_size": 512, "d_model": 128, "ffn": "none", "mixers": {"M": {"type": "mamba", "expand": 2}}}
    for budget in (1.0e6, 1.3e6):
        _, spelled = match_budget({**fields, "layers": "MM"}, budget, multiple_of=64)
        _, info = match_budget(fields, budget, multiple_of=64)
        assert info == spelled and abs(info["error"]) <= 0.02
    assert "adjusted" in info


@pytest.mark.parametrize("given, spelled, knob", [
    ({"hidden_size": 64, "layers": "MMMM"}, {"d_model": 64, "layers": "MMMM"}, "d_model"),
    ({"layers": "MMMM"}, {"d_model": 768, "layers": "MMMM"}, "d_model"),
    ({"d_model": 64}, {"d_model": 64, "layers": "MM"}, "n_layers"),
], ids=["hidden_size", "default-d_model", "default-layers"])
def test_budget_matching_of_a_config_that_leaves_its_knob_to_the_defaults(given, spelled, knob):
    """A model config giving d_model under transformers' name hidden_size, or leaving it (768) or layers ("MM") at the
    default, ended match_budget in a KeyError traceback ('d_model', 'layers'): the knob is now read as the config
    resolves it, and the match is that of the config spelled out."""
    common = {"vocab_size": 260, "mixers": {"M": {"type": "mamba"}}, "ffn": "none"}
    budget = 3e6 if knob == "d_model" and "hidden_size" not in given else 200_000
    matched, info = match_budget({**common, **given}, budget, knob=knob)
    assert (matched, info) == match_budget({**common, **spelled}, budget, knob=knob)
    assert abs(info["error"]) <= 0.02 and parameter_counts(ZooConfig(**matched))["total"] == info["params"]


@pytest.mark.parametrize("given, knob", [({"hidden_size": 64, "layers": "MMMM"}, "n_layers"),
                                         ({"layers": "MMMM"}, "n_layers"), ({"d_model": 64}, "d_model")],
                         ids=["hidden_size", "default-d_model", "default-layers"])
def test_budget_matching_keeps_the_fields_as_given_where_it_leaves_them(given, knob):
    """Reading the knobs as the config resolves them added d_model: 768 (or hidden_size's value) and the default
    layers to the matched fields, the key of a comparison's trainings (their fingerprint), so a rerun of a comparison
    begun before retrained its finished models. The width or pattern the match leaves is spelled as it was given."""
    common = {"vocab_size": 260, "mixers": {"M": {"type": "mamba"}}, "ffn": "none"}
    n = parameter_counts(ZooConfig(**common, **given))["total"]
    matched, info = match_budget({**common, **given}, 2 * n, knob=knob, tolerance=0.3)
    moved = "layers" if knob == "n_layers" else "d_model"
    assert set(matched) == set(common) | set(given) | {moved}
    assert {k: v for k, v in matched.items() if k != moved} == {k: v for k, v in {**common, **given}.items()
                                                                if k != moved}


def test_budget_advice_names_budget_adjust_auto_only_where_auto_adjusts_a_width():
    """A missed budget under budget.adjust none advised 'budget.adjust: auto' also for a model auto adjusts nothing
    in (a list of Mamba layers keeps its widths), where auto misses it the same way."""
    mamba = {"vocab_size": 512, "d_model": 128, "ffn": "none"}
    listed = {**mamba, "layers": [{"type": "mamba"}, {"type": "mamba"}]}
    with pytest.raises(ValueError, match="budget.tolerance") as error:
        match_budget(listed, 1.3e6, multiple_of=64, adjust="none")
    assert "budget.adjust: auto" not in str(error.value)
    patterned = {**mamba, "layers": "MM", "mixers": {"M": {"type": "mamba", "expand": 2}}}
    with pytest.raises(ValueError, match="try budget.adjust: auto"):
        match_budget(patterned, 1.3e6, multiple_of=64, adjust="none")
    assert abs(match_budget(patterned, 1.3e6, multiple_of=64)[1]["error"]) <= 0.02  # as auto does


def interrupt_before_the_eval_phase_is_saved(monkeypatch, argv, out, calls, partial, evaluations):
    """Rerun `zoo compare argv` into `out` with another eval setting (its eval phase redone): Ctrl-C after every
    evaluation (`evaluations` calls recorded in `calls`) but before result.json holds the phase keeps `partial`; the
    next rerun evaluates nothing and removes it."""
    import zoo.compare as compare

    real = compare.ModelRecord.put

    def interrupted(self, phase, *args, **kwargs):
        if phase.startswith("eval/"):
            raise KeyboardInterrupt
        return real(self, phase, *args, **kwargs)

    monkeypatch.setattr(compare.ModelRecord, "put", interrupted)
    calls[:] = []
    assert main([*argv, f"--output_dir={out}", "--eval.batches=2"]) == 130
    assert len(calls) == evaluations and partial.is_file()
    monkeypatch.setattr(compare.ModelRecord, "put", real)
    calls[:] = []
    assert main([*argv, f"--output_dir={out}", "--eval.batches=2"]) == 0
    assert calls == [] and not partial.exists()


def test_per_position_documents_are_the_files_the_recipe_held_out(tmp_path, monkeypatch):
    """The per-position loss ("on long held-out documents") took the built-in corpus's files held out at 0.01, whatever
    the recipe's data.holdout: with holdout 0.001 the model had trained on 15 of those 16 files. The documents start
    with the files the recipe held out."""
    import zoo.eval.length as length
    from zoo.data.text import stdlib_files

    real, seen = length.corpus_documents, []

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(length, "corpus_documents", spy)
    files = stdlib_files("eval", 0.001)  # the built-in corpus is the running Python's standard library
    if len(files) != 1 or files[0].stat().st_size < 4096:
        pytest.skip(f"Python {platform.python_version()} holds out {len(files)} file(s) at holdout 0.001 "
                    f"({sum(f.stat().st_size for f in files)} bytes), not one large enough for this test")
    (held_out,) = files
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={tmp_path / 'out'}", "--only=mamba",
            "--recipe.train.max_steps=1", "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false",
            "--recipe.data.holdout=0.001", "--eval.batches=1", "--eval.mqar=null", "--throughput=null",
            "--eval.passkey=null"]
    assert main([*argv, "--eval.per_position={n_docs: 1, max_len: 64, chunk_size: 32}"]) == 0
    assert len(seen) == 1 and bytes(seen[0][0][1:].tolist()) == held_out.read_bytes()[:63]
    result = tmp_path / "out" / "mamba" / "result.json"
    documents = json.loads(result.read_text())["phases"]["eval/L128"]["per_position"]["documents"]
    assert documents["holdout"] == 0.001 and documents["train_tokens"] == 0 and documents["trained_on_corpus"]
    # documents longer than the held-out text: the share of training text is recorded, and said
    n = held_out.stat().st_size // 2 + 100
    with pytest.warns(UserWarning, match=r"mamba's per-position loss: 1 of 2 documents .* training files"):
        assert main([*argv, f"--eval.per_position={{n_docs: 2, max_len: {n}, chunk_size: 4096}}"]) == 0
    documents = json.loads(result.read_text())["phases"]["eval/L128"]["per_position"]["documents"]
    assert documents["train_tokens"] == seen[-1].train_tokens > 0 and documents["train_documents"] == 1
    assert documents["train_tokens"] == 2 * n - 2 - documents["held_tokens"]


# a one-step mamba of the demo whose only evaluation is the per-position loss over three documents
PER_POSITION_ONLY = ["--recipe.train.max_steps=1", "--recipe.schedule.warmup_steps=0",
                     "--recipe.log.progress_bar=false", "--eval.batches=1",
                     "--eval.per_position={n_docs: 3, max_len: 96, chunk_size: 32, batch_size: 1}",
                     "--eval.mqar=null", "--throughput=null", "--eval.passkey=null", "--only=mamba"]


def per_position_run(tmp_path):
    """(argv without --output_dir, the per-position phase of an uninterrupted run, the output folder for the run under
    test, its partial file)."""
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), *PER_POSITION_ONLY]
    assert main([*argv, f"--output_dir={tmp_path / 'whole'}"]) == 0
    whole = json.loads((tmp_path / "whole" / "mamba" / "result.json").read_text())["phases"]["eval/L128"]
    out = tmp_path / "out"
    return argv, whole, out, out / "mamba" / "train-L128" / "per-position.partial.pt"


def test_interrupted_per_position_evaluation_resumes_at_its_next_document(tmp_path, monkeypatch, capsys):
    """The per-position loss on long documents was saved only with its eval phase: an interruption in it (hours of
    1M-token documents) lost every finished document. Its finished documents are saved as it goes and kept until
    result.json holds the phase, so a rerun resumes at the next document, to the curve of an uninterrupted run, and one
    interrupted after the last document (before the phase was saved) runs no document again."""
    import zoo.compare as compare
    import zoo.eval.length as length

    monkeypatch.setattr(compare, "SAVE_EVERY", 0, raising=False)
    argv, whole, out, partial = per_position_run(tmp_path)
    calls, stop = interrupt_after(monkeypatch, length, 2)
    assert main([*argv, f"--output_dir={out}"]) == 130
    assert partial.is_file()
    capsys.readouterr()
    stop[0], calls[:] = None, []
    assert main([*argv, f"--output_dir={out}"]) == 0
    assert calls == [1] and "resuming mamba's per-position loss from document 3 of 3" in capsys.readouterr().out
    result = json.loads((out / "mamba" / "result.json").read_text())["phases"]["eval/L128"]
    assert result["per_position"] == whole["per_position"] and not partial.exists()

    interrupt_before_the_eval_phase_is_saved(monkeypatch, argv, out, calls, partial, 3)


def test_comparison_stopped_by_sigterm_in_an_evaluation_keeps_its_documents_and_says_so(tmp_path, monkeypatch, capsys):
    """SIGTERM (`timeout`'s, a scheduler's) outside a training (in the per-position loss, passkey, MQAR's evaluation,
    throughput) killed zoo compare without a word, exit status 143 and the documents finished since the last periodic
    save lost. It stops as Ctrl-C does now: every finished document saved, one line saying what is kept, 130, the
    handler before the command back afterwards; and the same command continues at the next document."""
    import signal

    from helpers import sigterm_after, sigterm_raises_terminated

    import zoo.eval.length as length

    argv, whole, out, partial = per_position_run(tmp_path)
    real = length.per_position_loss
    calls = sigterm_after(monkeypatch, length, 2)
    with sigterm_raises_terminated() as handler:
        assert main([*argv, f"--output_dir={out}"]) == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    assert calls == [1, 1] and torch.load(partial)["batches"] == 2
    assert capsys.readouterr().err.endswith(f"\nzoo compare: interrupted; finished phases are kept in {out}; rerun "
                                            f"the same command to continue\n")
    monkeypatch.setattr(length, "per_position_loss", real)
    calls, _ = interrupt_after(monkeypatch, length, None)
    assert main([*argv, f"--output_dir={out}"]) == 0
    assert calls == [1] and "resuming mamba's per-position loss from document 3 of 3" in capsys.readouterr().out
    result = json.loads((out / "mamba" / "result.json").read_text())["phases"]["eval/L128"]
    assert result["per_position"] == whole["per_position"] and not partial.exists()


def test_interrupted_passkey_evaluation_resumes_at_its_next_cell(tmp_path, monkeypatch, capsys):
    """The passkey grid was saved only with its eval phase: an interruption in it lost every finished cell. Its
    finished cells are saved as they end and kept until result.json holds the phase, so a rerun runs only the remaining
    cells, to the result of an uninterrupted run, and one interrupted after the last cell (before the phase was saved)
    runs none. The finished prompts of the cell it stopped in are saved too (they were lost), and not run again."""
    import zoo.eval.passkey as passkey

    real_generate = passkey.greedy_generate
    calls, stop = [], [None]

    def generate(*args, **kwargs):  # one call per prompt; Ctrl-C at the call after stop[0]
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(passkey, "greedy_generate", generate)
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.passkey={lengths: [256, 320], depths: [0, 1], n_samples: 2, max_new_tokens: 6}",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--only=mamba"]
    assert main([*argv, f"--output_dir={tmp_path / 'whole'}"]) == 0
    assert len(calls) == 8
    whole = json.loads((tmp_path / "whole" / "mamba" / "result.json").read_text())["phases"]["eval/L128"]
    out = tmp_path / "out"
    partial = out / "mamba" / "train-L128" / "passkey.partial.pt"
    stop[0], calls[:] = 5, []  # two cells of two prompts finished, the third cell's first prompt done
    assert main([*argv, f"--output_dir={out}"]) == 130
    assert partial.is_file()
    capsys.readouterr()
    stop[0], calls[:] = None, []
    assert main([*argv, f"--output_dir={out}"]) == 0
    assert len(calls) == 3 and "resuming mamba's passkey: 2 of 4 cells are done" in capsys.readouterr().out
    result = json.loads((out / "mamba" / "result.json").read_text())["phases"]["eval/L128"]
    assert result["passkey"] == whole["passkey"] and not partial.exists()

    interrupt_before_the_eval_phase_is_saved(monkeypatch, argv, out, calls, partial, 8)


def test_throughput_reports_the_median_of_an_even_number_of_timed_steps(tmp_path, monkeypatch):
    """ms/step and tokens/s are documented as the median of the timed steps; with an even count (the demo times 2)
    the upper middle one was taken, so two steps of 1 s and 3 s read 3 s."""
    import types

    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [
        f"output_dir={tmp_path}", "throughput.seq_lens=[16]", "throughput.steps=2", "throughput.warmup=0",
        "throughput.batch_tokens=16"])
    (entry,) = [e for e in resolve_models(cfg, folder) if e.name == "transformerpp"]
    clock = iter([0.0, 1.0, 10.0, 13.0])  # each step's start and end: steps of 1 s and 3 s
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    (row,) = compare.phase_throughput(cfg, entry, 128, tmp_path / "run", torch.device("cpu"))["rows"]
    assert row["step_ms"] == pytest.approx(2000.0) and row["tokens_per_s"] == pytest.approx(16 / 2.0)


@pytest.mark.parametrize("steps", [0, 5])
def test_mqar_of_the_text_trained_model_is_shown_on_its_own_lengths_row_only(tmp_path, steps):
    """eval.mqar.steps 0 evaluates the model trained at the first length, but the main table gave its accuracy on
    every length's row too, as if the model trained at L=256 had it; a fresh copy trained on MQAR is every row's."""
    from zoo.compare import _accounting, markdown_report

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [
        f"output_dir={tmp_path}", "train_lengths=[128, 256]", "recipe.train.batch_tokens=512",
        "recipe.train.grad_accum=null", f"eval.mqar.steps={steps}"])
    (entry,) = [e for e in resolve_models(cfg, folder) if e.name == "gla"]
    record = {"name": "gla", "fields": entry.fields, "match": entry.match, "accounting": _accounting(cfg, entry),
              "phases": {"mqar": {"accuracy": 0.625, "rows": []}}}
    table = markdown_report([record], cfg, "CPU")
    cells = {line.split(" | ")[0]: line.split(" | ")[11] for line in table.splitlines() if line.startswith("| gla@")}
    assert cells == {"| gla@128": "0.625", "| gla@256": "0.625" if steps else "—"}
    legend = next(line for line in table.splitlines() if line.startswith("Columns:"))
    assert ("a fresh copy trained on MQAR" if steps else "the model trained at L=128, on its rows only") in legend


def test_the_main_table_states_units_and_what_each_column_counts(tmp_path, capsys):
    """The main table gave eval loss without its unit, FLOPs/tok without saying forward (training costs 3x), params
    without saying an MoE's every expert counts, train tok/s without saying which tokens."""
    out = tmp_path / "acc"
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--accounting-only"]) == 0
    table = (out / "accounting.md").read_text()
    legend = next(line for line in table.splitlines() if line.startswith("Columns:"))
    for said in ("every expert of an MoE", "forward FLOPs per token", "nats per token", "real (not pad)",
                 "fraction of queries", "KV 2 and states 4 bytes per float", "first 2 batches of held-out rows"):
        assert said in legend, said


def test_sizes_table_gives_the_width_of_a_config_that_leaves_d_model_at_its_default(tmp_path):
    """The Sizes table read d_model from the model's fields: a config leaving it at its default (768) showed "—"."""
    mamba = {"vocab_size": 300, "layers": "MM", "mixers": {"M": {"type": "mamba", "d_state": 4}}, "ffn": "none"}
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "throughput": None,
                                      "models": {"default": mamba, "named": {**mamba, "hidden_size": 64}}}))
    assert main([str(config), "--accounting-only"]) == 0
    sizes = (tmp_path / "out" / "accounting.md").read_text().split("## Sizes")[1]
    assert re.search(r"^\| default \| 768 \| 2 \|", sizes, re.M) and re.search(r"^\| named \| 64 \| 2 \|", sizes, re.M)


def test_cpu_step_memory_of_a_config_with_return_dict_false():
    # transformers' return_dict=False (a config exported with it) makes the forward return a tuple, which has no .loss:
    # the memory step failed on it ("'tuple' object has no attribute 'loss'"); it asks for an output object
    from zoo.compare import _step_memory_cpu

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig(**fields_of("gla-tiny", vocab_size=260)))
    ids = torch.randint(0, 260, (2, 32))
    expected = _step_memory_cpu(model, {"input_ids": ids, "labels": ids})
    model.config.return_dict = False
    assert isinstance(model(input_ids=ids), tuple)
    for batch in ({"input_ids": ids, "labels": ids}, {"input_ids": ids, "labels": ids, "return_dict": True}):
        assert _step_memory_cpu(model, batch) == pytest.approx(expected, rel=0.01)  # (a few KiB apart, call to call)


def test_cpu_step_memory_frees_the_steps_graph():
    """The CPU memory measurement's pack hook returned each saved tensor itself: a saved output (GLA's decay, exp)
    then held its own node, a cycle autograd never frees, so every measured step of GLA kept its graph, activations
    and the parameters upstream alive for the rest of the comparison."""
    import gc
    import weakref

    from zoo.compare import _step_memory_cpu

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig(**fields_of("gla-tiny", vocab_size=260)))
    ids = torch.randint(0, 260, (2, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    grads = {}
    hooks = [p.register_hook(lambda g, i=i: grads.__setitem__(i, g.clone())) for i, p in enumerate(model.parameters())]
    assert _step_memory_cpu(model, {"input_ids": ids, "labels": ids}) > 0
    for i, g in enumerate(expected):  # the measured step's gradients are those of a plain step
        torch.testing.assert_close(grads[i], g)
    for hook in hooks:
        hook.remove()
    refs = [weakref.ref(p) for p in model.parameters()]
    del model, loss
    gc.collect()
    assert not [r for r in refs if r() is not None]


def test_interrupted_mqar_training_continues_from_its_last_step(tmp_path, monkeypatch, capsys):
    """The MQAR phase trains a fresh copy of each model with no checkpoint: Ctrl-C or SIGTERM in it lost its steps,
    and the rerun trained it from step 0 while the other phases resumed. It saves on a stop (and every
    checkpoint_every steps) until result.json holds the phase, and the rerun continues to an uninterrupted run's
    accuracy and losses."""
    import os
    import signal

    import zoo.compare as compare
    import zoo.data.synthetic as synthetic

    real_batch, calls, plan = synthetic.mqar_batch, [], {}

    def batch(*args, **kwargs):  # the training loop's batches (the config check draws one without a generator)
        if "generator" in kwargs:
            calls.append(partial.is_file())
            if plan.get(len(calls)) == "sigint":  # a first Ctrl-C: the loop finishes its step, saves and stops
                os.kill(os.getpid(), signal.SIGINT)
            out = real_batch(*args, **kwargs)
            if plan.get(len(calls)) == "mid-step":  # a second Ctrl-C after the step drew its batch
                raise KeyboardInterrupt
            return out
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(synthetic, "mqar_batch", batch)
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--throughput=null", "--eval.passkey=null", "--only=gla",
            "--eval.mqar={steps: 6, batch_size: 4, seq_len: 32, n_kv: 4, vocab_size: 32, lr: 1.0e-2, "
            "warmup_steps: 2, eval_seq_lens: [32], eval_samples: 8}"]
    partial = tmp_path / "whole" / "gla" / "train-L128" / "mqar.partial.pt"
    assert main([*argv, f"--output_dir={tmp_path / 'whole'}"]) == 0
    whole = json.loads((tmp_path / "whole" / "gla" / "result.json").read_text())["phases"]["mqar"]
    assert len(calls) == 6 and len(whole["train_losses"]) == 6

    out = tmp_path / "out"
    partial = out / "gla" / "train-L128" / "mqar.partial.pt"
    calls[:], plan = [], {3: "sigint"}
    assert main([*argv, f"--output_dir={out}"]) == 130
    assert len(calls) == 3 and partial.is_file()  # the third step finished before the stop
    calls[:], plan = [], {2: "mid-step"}
    assert main([*argv, f"--output_dir={out}"]) == 130
    assert len(calls) == 2 and "continuing gla's MQAR training from step 3 of 6" in capsys.readouterr().err
    calls[:], plan = [], {}
    real_put = compare.ModelRecord.put

    def put(self, phase, *args, **kwargs):  # Ctrl-C after the phase's training, before result.json holds it
        if phase == "mqar":
            raise KeyboardInterrupt
        return real_put(self, phase, *args, **kwargs)

    monkeypatch.setattr(compare.ModelRecord, "put", put)
    assert main([*argv, f"--output_dir={out}"]) == 130
    assert len(calls) == 2 and partial.is_file()  # steps 5 and 6 (the mid-step stop redid its unfinished step)
    monkeypatch.setattr(compare.ModelRecord, "put", real_put)
    calls[:] = []
    assert main([*argv, f"--output_dir={out}"]) == 0
    assert calls == [] and not partial.exists()
    result = json.loads((out / "gla" / "result.json").read_text())["phases"]["mqar"]
    for name in ("accuracy", "rows", "train_losses", "final_train_loss"):
        assert result[name] == whole[name], name

    # a checkpoint every 2 steps: a run killed outright loses at most the steps since the last one
    calls[:], partial = [], tmp_path / "every" / "gla" / "train-L128" / "mqar.partial.pt"
    assert main([*argv, f"--output_dir={tmp_path / 'every'}", "--eval.mqar.checkpoint_every=2"]) == 0
    assert calls == [False, False, True, True, True, True]


def test_an_mqar_training_saved_on_a_gpu_is_refused_on_a_cpu_machine_as_of_another_device(tmp_path, monkeypatch,
                                                                                              capsys):
    """The MQAR phase's partial training holds its optimizer state on the model's device, and its settings name that
    device. One saved on a GPU could not be loaded at all on a machine without one ('Attempting to deserialize object
    on a CUDA device'), and the rerun said it was "not a readable partial run (RuntimeError)"; it is read onto the CPU
    and refused for what it is, a run of another device."""
    import torch.serialization

    import zoo.compare as compare

    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), "--recipe.train.max_steps=1",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--throughput=null", "--eval.passkey=null", "--only=gla",
            "--eval.mqar={steps: 2, batch_size: 4, seq_len: 32, n_kv: 4, vocab_size: 32, lr: 1.0e-2, "
            "warmup_steps: 1, eval_seq_lens: [32], eval_samples: 8}", f"--output_dir={tmp_path}"]
    real_put = compare.ModelRecord.put

    def put(self, phase, *args, **kwargs):  # Ctrl-C after the phase's training, before result.json holds it
        if phase == "mqar":
            raise KeyboardInterrupt
        return real_put(self, phase, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(compare.ModelRecord, "put", put)
        assert main(argv) == 130
    partial = tmp_path / "gla" / "train-L128" / "mqar.partial.pt"
    saved = torch.load(partial, weights_only=True)
    assert saved["optimizer"]["state"]  # tensors on the model's device
    saved["settings"]["key"]["device"] = "cuda"
    with monkeypatch.context() as patch:  # the file a GPU machine writes: storages tagged cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved, partial)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"gla's MQAR training: {partial} holds a partial run of other settings (device differ); starting over" \
        in out, out
    assert not partial.exists()


def test_length_plot_marks_every_training_length(tmp_path, monkeypatch):
    """With train_lengths [32, 64], length.png has curves of models trained at 32 and at 64, but only the first
    length (32) was marked as the training length."""
    import matplotlib.axes

    import zoo.compare as compare

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml",
                                      [f"output_dir={tmp_path}", "train_lengths=[32, 64]"])
    records = compare.run_comparison(cfg, folder, only=["mamba", "gla"], accounting_only=True)["records"]
    bins = [{"start": 1, "end": 16, "mean_loss": 3.0, "n_tokens": 15}, {"start": 16, "end": 128, "mean_loss": 2.5,
                                                                         "n_tokens": 112}]
    for rec in records:
        for L in (32, 64):
            rec["phases"][f"eval/L{L}"] = {"per_position": {"bins": bins}}
    lines = []
    real = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline",
                        lambda self, x=0, *a, **k: lines.append((x, k.get("label"))) or real(self, x, *a, **k))
    paths = compare.write_plots(records, cfg, tmp_path)
    assert tmp_path / "length.png" in paths
    assert lines == [(32, "train length 32"), (64, "train length 64")]
    lines.clear()
    for rec in records:  # only the curves at 64: only 64 is marked
        del rec["phases"]["eval/L32"]
    compare.write_plots(records, cfg, tmp_path)
    assert lines == [(64, "train length 64")]


def tiny_mqar_config(tmp_path: Path, model: str, steps: int):
    """A comparison of one packaged model (configs/models/<model>.yaml) whose MQAR phase trains `steps` steps of 4
    rows of 32 tokens (4 pairs over 32 values) and evaluates 8 rows at length 32."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"m": f"configs/models/{model}.yaml"}, "recipe": {"tokenizer": "byte"},
        "eval": {"mqar": {"steps": steps, "batch_size": 4, "seq_len": 32, "n_kv": 4, "vocab_size": 32,
                          "warmup_steps": 0, "eval_seq_lens": [32], "eval_samples": 8}}}))
    return load_compare_config(path)[0]


def test_mqar_phase_train_losses_of_a_moe_model_are_the_cross_entropy(tmp_path):
    """The MQAR phase's train_losses and final_train_loss of a Jamba-style model were its objective, the cross
    entropy plus moe.aux_loss_coef · its load-balancing loss, while the text phase's curve (metrics.csv's loss) is
    the cross entropy alone. The first step's loss, before any update, is now the same at any aux_loss_coef."""
    from zoo.compare import ModelEntry, _train_mqar

    cfg = tiny_mqar_config(tmp_path, "jamba-tiny", steps=1)
    fields = yaml.safe_load((ROOT / "configs/models/jamba-tiny.yaml").read_text())
    first = {}
    for coef in (0.0, 5.0):
        entry = ModelEntry("m", {**fields, "vocab_size": 260, "moe": {**fields["moe"], "aux_loss_coef": coef}}, True)
        _, losses = _train_mqar(cfg, entry, 128, tmp_path / str(coef), torch.device("cpu"))
        first[coef] = losses[0]
    # the aux loss of each MoE layer is about top_k = 2: 5 · it moved the loss by about 10
    assert math.isclose(first[5.0], first[0.0], rel_tol=1e-5), first


def test_passkey_template_check_counts_bos_as_the_recipe_trains():
    """The check before training measured the passkey template with BOS whatever data.add_bos said: a recipe trained
    without BOS (whose prompts have none) was refused a length equal to its template, one token too early."""
    from zoo.compare import _check_inputs
    from zoo.data.text import load_tokenizer
    from zoo.eval.passkey import bare_template_tokens

    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", ["eval.passkey={lengths: [512]}"])
    pk, seed = cfg.eval.passkey, cfg.recipe.get("train", {}).get("seed", 0)
    cells = {(512, float(d)) for d in pk.depths}
    length = bare_template_tokens(load_tokenizer("byte"), seed, cells, pk.n_samples, add_bos=False)[512]
    for add_bos, refused in ((False, False), (True, True)):
        cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml", [
            f"eval.passkey={{lengths: [{length}]}}", f"recipe.data.add_bos={str(add_bos).lower()}"])
        if refused:
            with pytest.raises(ValueError, match="shorter than the bare passkey template"):
                _check_inputs(cfg, resolve_models(cfg, folder))
        else:
            _check_inputs(cfg, resolve_models(cfg, folder))


def test_an_interrupted_comparison_says_so_under_its_own_name(tmp_path, monkeypatch, capsys):
    """zoo compare's interruption line read 'interrupted: finished phases are kept ...' with no `zoo compare:` (every
    other command's message has its name) and dropped what the KeyboardInterrupt said: which training stopped, and at
    which step."""
    import zoo.compare as compare

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("training of mamba stopped at step 3")

    monkeypatch.setattr(compare, "run_comparison", stopped)
    out = tmp_path / "cmp"
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}"]) == 130
    assert capsys.readouterr().err == (f"\nzoo compare: interrupted: training of mamba stopped at step 3; finished "
                                       f"phases are kept in {out}; rerun the same command to continue\n")
    monkeypatch.setattr(compare, "run_comparison", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--force"]) == 130
    assert capsys.readouterr().err.startswith("\nzoo compare: interrupted; finished phases are kept in ")


def test_mqar_training_saved_while_a_transformers_mambas_a_log_was_decayed_continues_as_it_trained(tmp_path,
                                                                                                   monkeypatch, capsys):
    """A partial MQAR training of a transformers Mamba saved while its 2-D A_log was decayed (before NO_DECAY_NAMES
    were exempt by name) failed to continue: torch refused its optimizer state ("a parameter group that doesn't
    match the size"). It continues now, saying so, in the groups it trained in, to the uninterrupted run's losses."""
    import zoo.train as zt
    from zoo.compare import MQAR_PARTIAL, ModelEntry, _train_mqar

    cfg = tiny_mqar_config(tmp_path, "mamba-tiny", steps=3)
    entry = ModelEntry("m", {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 260,
                             "state_size": 4}, False)
    monkeypatch.setattr(zt, "NO_DECAY_NAMES", ())  # the rule before the names were exempt
    _, whole = _train_mqar(cfg, entry, 128, tmp_path / "whole", torch.device("cpu"))
    real = zt.lr_at

    monkeypatch.setattr(zt, "lr_at", ctrl_c_on_step(real, 2))
    with pytest.raises(KeyboardInterrupt):
        _train_mqar(cfg, entry, 128, tmp_path / "cut", torch.device("cpu"))
    saved = torch.load(tmp_path / "cut" / MQAR_PARTIAL, weights_only=True)
    assert saved["step"] == 2
    monkeypatch.undo()
    capsys.readouterr()
    _, losses = _train_mqar(cfg, entry, 128, tmp_path / "cut", torch.device("cpu"))
    assert "decayed the parameters named A_log, D, dt_bias" in capsys.readouterr().err
    assert losses == whole


def test_a_recipe_without_a_tokenizer_is_checked_with_the_byte_tokenizer_its_models_train_with(tmp_path):
    """A recipe that names no tokenizer trains each model (a mapping of config fields) with 'byte'; the check before
    training built the recipe around the model "x", whose own tokenizer (an unset tokenizer is the model's) was then
    the hub id "x", which does not load."""
    import yaml

    from zoo.compare import _check_inputs, train_config

    data = yaml.safe_load((ROOT / "configs" / "compare" / "demo.yaml").read_text())
    data["recipe"].pop("tokenizer")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    cfg, folder = load_compare_config(tmp_path / "c.yaml", [])
    entries = resolve_models(cfg, folder)
    _check_inputs(cfg, entries)
    assert train_config(cfg, entries[0], 64, tmp_path / "run").tokenizer == "byte"


def test_cache_sizes_of_a_thousand_mib_and_more_print_whole(tmp_path):
    """The accounting's cache column printed 2.3e+03 (".3g") for Transformer++'s KV cache at 65536 tokens in the 130m
    comparison: sizes from 1000 MiB on are whole MiB with a thousands separator."""
    assert main(["130m", f"--output_dir={tmp_path}", "--accounting-only", "--only=transformerpp"]) == 0
    table = (tmp_path / "accounting.md").read_text()
    assert "e+0" not in table
    rows = [line for line in table.splitlines() if line.startswith("| transformerpp | 65536 |")]
    assert rows and re.search(r"\| \d,\d{3} \|$", rows[0])


@pytest.mark.parametrize("holdout, message", [(0.01, "fill no row of 128 tokens"), (0.0, "recipe.data.holdout: is 0")])
def test_a_recipe_whose_held_out_rows_hold_no_target_is_refused_before_training(tmp_path, holdout, message):
    """Held-out documents too short to fill one packed row gave no evaluation row: the eval phase, after each model
    trained, recorded eval_loss 0 (perplexity 1) for every model; a holdout of 0 failed there, naming zoo train's
    eval.every, which a comparison does not take."""
    from zoo.compare import _check_inputs

    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    docs = tmp_path / "docs.jsonl"  # 300 short documents: the 1% held out (a few) is fewer than 128 tokens
    docs.write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(300)))
    cfg, folder = load_compare_config(ROOT / "configs" / "compare" / "demo.yaml",
                                      [f"recipe.data={{source: {docs}, seq_len: 128, holdout: {holdout}}}"])
    with pytest.raises(ValueError, match=message):
        _check_inputs(cfg, resolve_models(cfg, folder))


def test_a_comparison_without_mqar_or_throughput_writes_no_empty_plot(tmp_path):
    """With eval.mqar unset or throughput: null, recall.png and throughput.png were bare axes under a title (and
    matplotlib warned "No artists with labels found to put in legend"), and a recall.png of an earlier run with MQAR
    stayed beside a table without it: they are left out, removed, and results.md says why."""
    import warnings

    out = tmp_path / "bare"
    out.mkdir()
    (out / "recall.png").write_bytes(b"an earlier run's plot")
    argv = [str(ROOT / "configs" / "compare" / "demo.yaml"), f"--output_dir={out}", "--recipe.train.max_steps=2",
            "--recipe.schedule.warmup_steps=0", "--recipe.log.progress_bar=false", "--eval.batches=1",
            "--eval.per_position=null", "--eval.mqar=null", "--throughput=null", "--eval.passkey=null", "--only=gla"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert [str(w.message) for w in caught if "No artists with labels" in str(w.message)] == []
    assert sorted(p.name for p in out.glob("*.png")) == ["loss.png", "memory.png"]
    assert ("Plots left out (nothing to draw): throughput.png: throughput: null; recall.png: eval.mqar is not set; "
            "length.png: eval.per_position is not set.") in (out / "results.md").read_text()


@pytest.mark.parametrize("override, message", [
    ({"recipe": {"data": {"seq_len": 64}}}, "recipe.data.seq_len: 64 positions"),
    ({"train_lengths": [16, 64]}, "train_lengths: 64 positions"),
    ({"eval": {"batches": 1, "per_position": {"n_docs": 1, "max_len": 64, "chunk_size": 16}}},
     "eval.per_position.max_len: 64 positions"),
    ({"eval": {"batches": 1, "passkey": {"lengths": [200], "n_samples": 1}}},
     "eval.passkey.lengths: at least 195 positions (a prompt of at least 188 tokens at length 200, then 8 new tokens, "
     "the last not fed back), but models.gpt2 (GPT2LMHeadModel) learns 194 absolute positions"),
    ({"eval": {"batches": 1, "mqar": {"steps": 0, "seq_len": 16, "n_kv": 2, "vocab_size": 64,
                                      "eval_seq_lens": [16, 64]}}}, "eval.mqar.eval_seq_lens: 64 positions"),
    ({"throughput": {"seq_lens": [16, 64], "steps": 1}}, "throughput.seq_lens: 64 positions"),
])
def test_a_phase_longer_than_a_models_learned_positions_is_refused_before_any_model_trains(tmp_path, capsys,
                                                                                             override, message):
    """A GPT-2 (learned absolute positions, its wpe) failed on a longer row with 'IndexError: index out of range in
    self': its training was refused only at its turn, and the per-position loss, passkey, MQAR and throughput phases
    ended in that traceback after it had trained."""
    positions = 194 if "passkey" in override.get("eval", {}) else 32  # (passkey's byte prompts at 200: 188 tokens)
    gpt2 = {"model_type": "gpt2", "vocab_size": 260, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": positions}

    def edit(cfg):
        for key, value in override.items():
            if key == "recipe":
                cfg["recipe"]["data"].update(value["data"])
            else:
                cfg[key] = value

    err = _refused_before_the_first_model_trains(tmp_path, capsys, "gpt2", gpt2, "gpt2", micro_batch_size=4,
                                                 data={"packing": False}, edit=edit)
    assert message in err and "absolute positions (transformer.wpe" in err


def test_a_model_whose_learned_positions_hold_the_real_passkey_prompts_is_not_refused(tmp_path):
    """The check before training took a passkey prompt to be as long as its length, and refused a GPT-2 whose positions
    held every prompt the phase builds (a few tokens shorter: whole filler sentences) and the new tokens it feeds back;
    one position fewer is still refused."""
    from zoo.compare import _check_inputs
    from zoo.data.text import load_tokenizer
    from zoo.eval.passkey import build_passkey_prompt, cell_keys

    tokenizer = load_tokenizer("byte")
    longest = max(len(build_passkey_prompt(tokenizer, 200, depth, key).input_ids)
                  for depth in (0.0, 1.0) for key in cell_keys(0, 200, depth, 2))
    assert longest < 200

    def check(positions: int) -> None:
        gpt2 = {"model_type": "gpt2", "vocab_size": 260, "n_embd": 32, "n_layer": 1, "n_head": 2,
                "n_positions": positions}
        path = tmp_path / "compare.yaml"
        path.write_text(yaml.safe_dump({
            "models": {"gpt2": gpt2}, "output_dir": str(tmp_path / "out"),
            "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": 16, "packing": False},
                       "train": {"max_steps": 1, "seed": 0}, "schedule": {"warmup_steps": 0}},
            "eval": {"batches": 1, "passkey": {"lengths": [200], "depths": [0, 1], "n_samples": 2,
                                               "max_new_tokens": 6}}, "throughput": None}))
        cfg, folder = load_compare_config(path)
        _check_inputs(cfg, resolve_models(cfg, folder))

    check(longest + 5)  # the prompt, then 5 of the 6 new tokens (the last is never fed back)
    with pytest.raises(ValueError, match=rf"eval.passkey.lengths: at least {longest + 5} positions \(a prompt of at "
                                         rf"least {longest} tokens at length 200, .* learns {longest + 4} absolute "
                                         rf"positions"):
        check(longest + 4)


@pytest.mark.parametrize("positions", [260, 194], ids=["a-length-fits", "no-length-fits"])
def test_zoo_compare_and_zoo_eval_passkey_refuse_prompts_past_learned_positions_in_the_same_words(tmp_path, positions):
    """The check that a model of learned positions holds the passkey prompts was written twice, in zoo eval passkey
    ('a prompt of 188 tokens (length 200) and 8 new tokens') and in zoo compare ('195 positions (a prompt of 188
    tokens at length 200, then max_new_tokens 8, ...)'): one function says it for both, each naming its own option.
    Where even the prompt without filler (188 tokens with the byte tokenizer) does not fit, both say no length does,
    and compare how many positions to raise the model's to."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from zoo.compare import _check_inputs
    from zoo.data.text import load_tokenizer
    from zoo.eval.passkey import evaluate_passkey

    gpt2 = {"model_type": "gpt2", "vocab_size": 260, "n_embd": 32, "n_layer": 1, "n_head": 2,
            "n_positions": positions}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"gpt2": gpt2}, "output_dir": str(tmp_path / "out"),
        "recipe": {"tokenizer": "byte", "data": {"source": "stdlib", "seq_len": 16, "packing": False},
                   "train": {"max_steps": 1, "seed": 0}, "schedule": {"warmup_steps": 0}},
        "eval": {"batches": 1, "passkey": {"lengths": [400], "depths": [0, 1], "n_samples": 2}}, "throughput": None}))
    cfg, folder = load_compare_config(path)
    with pytest.raises(ValueError) as compare_refusal:
        _check_inputs(cfg, resolve_models(cfg, folder))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=260, n_positions=positions, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    with pytest.raises(ValueError) as eval_refusal:
        evaluate_passkey(model, load_tokenizer("byte"), [400], [0, 1], 2, seed=0)
    compare_says = re.fullmatch(rf"eval\.passkey\.lengths: (.*), but models\.gpt2 \(GPT2LMHeadModel\) learns "
                                rf"{positions} absolute positions \(.*\); (.*?)(, or raise its max_position_embeddings"
                                rf"|; raise its max_position_embeddings to at least 195)", str(compare_refusal.value))
    eval_says = re.fullmatch(rf"lengths: (.*), but GPT2LMHeadModel learns {positions} absolute positions \(.*\); "
                             rf"(.*)", str(eval_refusal.value))
    assert compare_says and eval_says, (str(compare_refusal.value), str(eval_refusal.value))
    assert compare_says[1] == eval_says[1] and compare_says[1].startswith("at least ")
    assert compare_says[2] == eval_says[2].replace("--lengths", "lengths")
    if positions == 260:
        assert compare_says[2] == "give lengths of at most 253" and compare_says[3].startswith(", or raise")
    else:
        assert compare_says[2] == ("no lengths fit in them: passkey's shortest prompt (without filler) takes 188 "
                                   "tokens, 195 positions with the new tokens")


@pytest.mark.parametrize("accounting_only", [False, True], ids=["run", "accounting-only"])
def test_a_misspelled_field_of_a_transformers_model_is_refused_before_any_model_trains(tmp_path, capsys,
                                                                                        accounting_only):
    """transformers keeps a key its config class does not take, so a Llama given hidden_sise: 32 was the default
    4096-wide Llama: --accounting-only accounted it without a word, and a run refused it (zoo.train's check) only at
    its turn, after the models before it had trained."""
    llama = {"model_type": "llama", "vocab_size": 260, "hidden_sise": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2}
    err = _refused_before_the_first_model_trains(tmp_path, capsys, "llama", llama, "typo",
                                                 args=("--accounting-only",) if accounting_only else ())
    assert "models.llama: hidden_sise: unknown field of LlamaConfig (llama); did you mean 'hidden_size'?" in err


@pytest.mark.parametrize("name, model, overrides, message", [
    ("llama", {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 2, "pad_token_id": 400}, {}, "pad_token_id: 400"),
    ("gpt2", {"model_type": "gpt2", "vocab_size": 260, "n_embd": 32, "n_layer": 1, "n_head": 2, "bos_token_id": 500},
     {}, "bos_token_id: 500"),
    ("mamba2", "configs/models/mamba2-tiny.yaml", {"eos_token_id": 300}, "eos_token_id: 300"),
])
def test_a_special_id_a_model_config_names_past_its_vocabulary_is_refused_before_any_model_trains(
        tmp_path, capsys, name, model, overrides, message):
    """A Llama's pad_token_id past its vocabulary ended in the accounting's build with 'AssertionError: Padding_idx
    must be within num_embeddings' (a traceback); another special id passed the checks and was refused by zoo.train
    only at the model's turn, after the models before it had trained."""
    second = {"config": model, "overrides": overrides} if overrides else model  # (its overrides: its own)
    err = _refused_before_the_first_model_trains(tmp_path, capsys, name, second, "ids")
    assert f"models.{name}: {message} is outside the model's vocabulary (vocab_size 260" in err
