"""Checkpoints that travel: transformers Mamba / Mamba-2 / Llama / Jamba and mamba_ssm <-> ZooForCausalLM.

Each format has an importer (`from_hf_mamba`, ..., `from_mamba_ssm`: a source model, or mamba_ssm's config dict
and state dict, -> a ZooForCausalLM with the same logits) and an exporter (`to_hf_mamba`, ..., `to_mamba_ssm`).
Both directions read one key table per format, so they cannot drift apart. An option of either side that has
no exact counterpart raises `UnmappableError` naming the option; nothing is approximated. Options that only
shape the random initialization (dt_min, A_init_range, ...) are carried where both sides have them and
otherwise dropped, since they do not change the function a checkpoint computes. One option is dropped with a
warning instead: residual_in_fp32, which Llama and Jamba lack (they add the residual in the weights' dtype); it
changes nothing in fp32 or under autocast, only the rounding of bf16 / fp16 weights' logits.

Converted models share tensors with their source (no copy, each tensor keeps its dtype), so converting a large
checkpoint costs little memory; clone the result before training it if the source must stay untouched. The
exceptions are the weights one side fuses and the other splits, which are copies: Jamba's experts (one 3D tensor
per layer in transformers, one module per expert in the zoo), mamba_ssm's GatedMLP fc1 (the zoo's up and gate) and
its MHA in_proj (the zoo's q, k and v).

    zoo convert SRC DST --from hf-mamba      # transformers folder -> complete zoo folder
    zoo convert SRC DST --to mamba_ssm       # zoo folder -> mamba_ssm folder (config.json + pytorch_model.bin)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.config import ZooConfig
from zoo.hub import (
    check_model_ref,
    check_save_folder,
    json_object,
    load_folder_tokenizer,
    readable_weights,
    require_tokenizer,
    save_model_folder,
    shard_size,
    write_folder,
)
from zoo.modeling import ZooForCausalLM
from zoo.registry import get_mixer

FORMATS = ("hf-mamba", "hf-mamba2", "hf-llama", "hf-jamba", "mamba_ssm")
_HF_MODEL_TYPES = {"mamba": "hf-mamba", "mamba2": "hf-mamba2", "llama": "hf-llama", "jamba": "hf-jamba"}
_READABLE = f"zoo convert reads model_type {', '.join(map(repr, _HF_MODEL_TYPES))}, zoo and mamba_ssm folders"
# mamba_ssm's MambaConfig fields (models/config_mamba.py) and its default values
_MAMBA_SSM_FIELDS = {"d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {},
                     "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
                     "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
_MAMBA_SSM_EPS = 1e-5  # MixerModel's norm_epsilon and Mamba2's gated-norm eps: fixed, not in its config
_MAMBA_SSM_MLP_MULTIPLE = 128  # GatedMLP rounds hidden_features up to a multiple of this
# options that choose an implementation at run time, not the function: never block an export
_RUNTIME_OPTIONS = {"scan_backend", "attn_backend"}
# transformers' Mamba and Mamba-2 with rescale_prenorm_residual on divide every out_proj by sqrt(num_hidden_layers)
# in _init_weights, in place, on from_pretrained too: the loaded weights, not only fresh ones. An init-only option,
# so exports write it off and imports load with it off.
_RESCALED_ON_LOAD = ("hf-mamba", "hf-mamba2")


class UnmappableError(ValueError):
    """An option of the source or target format that has no exact counterpart on the other side."""


def _unmappable(fmt: str, option: str, value: Any, why: str) -> UnmappableError:
    return UnmappableError(f"{fmt}: {option}={value!r} cannot be mapped exactly: {why}")


# ---- key tables ----------------------------------------------------------------------------------------------
# (source key, zoo key) pairs; `{i}` stands for a layer index and a trailing "." makes the pair a prefix rule.

def _compile(rules: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in rules:
        if reverse:
            src, dst = dst, src
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)")
        pattern = "^" + pattern + ("(?P<rest>.*)$" if src.endswith(".") else "$")
        out.append((re.compile(pattern), dst))
    return out


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], reverse: bool, fmt: str
            ) -> dict[str, torch.Tensor]:
    """Rename every key by the first matching rule; a key no rule matches is an error naming it."""
    compiled = _compile(rules, reverse)
    out = {}
    for key, value in state.items():
        for pattern, dst in compiled:
            m = pattern.match(key)
            if m:
                groups = m.groupdict()
                new = dst.replace("{i}", groups.get("i") or "") + (groups.get("rest") or "")
                out[new] = value
                break
        else:
            raise UnmappableError(f"{fmt}: weight {key!r} has no counterpart in the "
                                  f"{'source format' if reverse else 'zoo model'}")
    return out


_MAMBA_KEYS = [  # transformers' MambaForCausalLM and Mamba2ForCausalLM
    ("backbone.embeddings.weight", "model.embeddings.weight"),
    ("backbone.layers.{i}.norm.weight", "model.layers.{i}.norm.weight"),
    ("backbone.layers.{i}.mixer.", "model.layers.{i}.mixer."),
    ("backbone.norm_f.weight", "model.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
_LLAMA_KEYS = [
    ("model.embed_tokens.weight", "model.embeddings.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.norm.weight"),
    ("model.layers.{i}.self_attn.", "model.layers.{i}.mixer."),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.", "model.layers.{i}.ffn."),
    ("model.norm.weight", "model.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
_MAMBA_SSM_KEYS = [  # after `_mamba_ssm_split_mlp`: mlp.fc1 -> mlp.{up,gate}_proj, mlp.fc2 -> mlp.down_proj
    ("backbone.embedding.weight", "model.embeddings.weight"),
    ("backbone.layers.{i}.norm.weight", "model.layers.{i}.norm.weight"),
    ("backbone.layers.{i}.mixer.", "model.layers.{i}.mixer."),
    ("backbone.layers.{i}.norm2.weight", "model.layers.{i}.ffn_norm.weight"),
    ("backbone.layers.{i}.mlp.", "model.layers.{i}.ffn."),
    ("backbone.norm_f.weight", "model.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _jamba_keys(kinds: list[str]) -> list[tuple[str, str]]:
    """Jamba's table: the mixer lives under `mamba.` or `self_attn.` depending on the layer."""
    rules = [
        ("model.embed_tokens.weight", "model.embeddings.weight"),
        ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.norm.weight"),
        ("model.layers.{i}.pre_ff_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
        ("model.layers.{i}.feed_forward.", "model.layers.{i}.ffn."),
        ("model.final_layernorm.weight", "model.norm_f.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ]
    for i, kind in enumerate(kinds):
        rules.append((f"model.layers.{i}.{'mamba' if kind == 'mamba' else 'self_attn'}.", f"model.layers.{i}.mixer."))
    return rules


# ---- model building ------------------------------------------------------------------------------------------

def _carry_generation_config(source: nn.Module | None, model: nn.Module) -> None:
    """The source's generation defaults (every eos id, sampling settings) travel with its weights: rebuilt from
    the config alone, generate would not stop at the ids only generation_config.json lists. So does how its rows
    began, where a zoo finetune recorded it in the config (add_bos, which zoo generate and zoo eval read through
    zoo.eval.common.trained_with_bos): rebuilt without it, a model finetuned without <bos> was prompted with one."""
    if getattr(source, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(source.generation_config)
    add_bos = getattr(getattr(source, "config", None), "add_bos", None)
    if isinstance(add_bos, bool):
        model.config.add_bos = add_bos


def _build_zoo(config: ZooConfig, state: dict[str, torch.Tensor], source: nn.Module | None = None
               ) -> ZooForCausalLM:
    """A ZooForCausalLM holding exactly `state` (tensors adopted, not copied) and the generation config of
    `source`; missing or extra keys raise."""
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embeddings.weight"])
    with torch.device("meta"):
        model = ZooForCausalLM(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise UnmappableError(f"zoo model: the mapped weights do not fit the config (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    for key, value in model.state_dict().items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise UnmappableError(f"zoo model: {key} has shape {tuple(state[key].shape)} in the source but "
                                  f"{tuple(value.shape)} in the mapped config")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    model.config.dtype = model.model.embeddings.weight.dtype
    model.mark_no_weight_decay()
    _carry_generation_config(source, model)
    return model.eval()


def _build_hf(cls: type, config, state: dict[str, torch.Tensor], source: nn.Module | None = None) -> nn.Module:
    """A transformers model of class `cls` holding exactly `state` (tensors adopted with their dtypes) and the
    generation config of `source`."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is assigned below; random init would only cost time
        model = cls(config)
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        embed = model.get_input_embeddings().weight
        embed_key = next(k for k, v in model.named_parameters(remove_duplicate=False) if v is embed)
        state.setdefault("lm_head.weight", state[embed_key])
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise UnmappableError(f"{cls.__name__}: the mapped weights do not fit (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.dtype = model.get_input_embeddings().weight.dtype
    _carry_generation_config(source, model)
    return model.eval()


def _token_ids(config) -> dict[str, Any]:
    return {k: getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _defaults(mixer_type: str) -> dict[str, Any]:
    params = inspect.signature(get_mixer(mixer_type).__init__).parameters
    return {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}


def _options(spec: dict) -> dict[str, Any]:
    """A layer's mixer kwargs with the mixer's defaults filled in (the function it computes, in full)."""
    return _defaults(spec["type"]) | {k: v for k, v in spec.items() if k not in ("type", "ffn")}


def _check_options(fmt: str, spec: dict, mapped: set[str], init_only: set[str] = frozenset(),
                   required: dict[str, Any] | None = None) -> dict[str, Any]:
    """A layer's options, after raising for any that is neither mapped, init-only, a runtime choice, nor at
    its default, and for any `required` option with another value."""
    opts, defaults, required = _options(spec), _defaults(spec["type"]), required or {}
    for name, value in required.items():
        if opts.get(name) != value:
            raise _unmappable(fmt, name, opts.get(name), f"{fmt} requires {value!r}")
    for name, value in opts.items():
        if name in mapped or name in init_only or name in required or name in _RUNTIME_OPTIONS:
            continue
        if value != defaults.get(name):
            raise _unmappable(fmt, name, value, f"{fmt} has no such option")
    return opts


def _uniform_layers(model: ZooForCausalLM, fmt: str, mixer_type: str, ffn: str) -> dict:
    """The one mixer spec all layers share (pure stacks); raises naming the first layer that differs."""
    specs = model.config.layer_specs()
    for i, spec in enumerate(specs):
        if spec["type"] != mixer_type:
            raise _unmappable(fmt, f"layers[{i}].type", spec["type"], f"{fmt} stacks only {mixer_type!r} layers")
        if spec["ffn"] != ffn:
            raise _unmappable(fmt, f"layers[{i}].ffn", spec["ffn"], f"{fmt} needs ffn {ffn!r} in every layer")
        if _function_options(spec) != _function_options(specs[0]):
            raise _unmappable(fmt, f"layers[{i}]", spec, f"{fmt} needs the same mixer options in every layer")
    return specs[0]


def _function_options(spec: dict) -> dict[str, Any]:
    return {k: v for k, v in _options(spec).items() if k not in _RUNTIME_OPTIONS}


def _no_moe(model: ZooForCausalLM, fmt: str) -> None:
    if model.config.moe is not None:
        raise _unmappable(fmt, "moe", model.config.moe, f"{fmt} has no mixture of experts")


def _warn_fp32_residual_dropped(fmt: str, model: ZooForCausalLM, target: str) -> None:
    """Warn when `model` keeps its residual stream in fp32 over half-precision weights: `target` has no
    residual_in_fp32 and adds it in the weights' dtype (with fp32 weights, or under autocast, the two are the same)."""
    dtype = model.get_input_embeddings().weight.dtype
    if model.config.residual_in_fp32 and dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"{fmt}: residual_in_fp32=True is dropped: {target} has no such option and adds the residual "
                      f"stream in {name}, so its {name} logits differ from this model's (which adds it in fp32); run "
                      f"the exported model in fp32 or under autocast for the same logits", stacklevel=3)


def _as_int(fmt: str, name: str, value: Any) -> int:
    if float(value).is_integer():
        return int(value)
    raise _unmappable(fmt, name, value, f"{fmt} needs an integer")


def _check_conv_kernel(fmt: str, config) -> None:
    """The source's conv kernel below 1 refused naming its own field (the zoo's d_conv refused it, naming no field of
    the source's config)."""
    from zoo.train import check_conv_kernel

    check_conv_kernel(config, f"{fmt}: ")


def _check_act(fmt: str, config) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unmappable(fmt, "hidden_act", act, "the zoo uses SiLU (SwiGLU, Mamba's conv/gate)")


# ---- transformers Mamba --------------------------------------------------------------------------------------

def from_hf_mamba(model) -> ZooForCausalLM:
    """transformers' MambaForCausalLM -> ZooForCausalLM (layers of the `mamba` mixer, ffn none).

    Same logits, but not the same output_hidden_states: the zoo's follow transformers' Llama (and its Jamba, and
    its Mamba-2 in transformers 5.25; 5.17's Mamba-2 is as its Mamba), n_layers + 1 entries, the embeddings first and
    the last after the final norm; transformers' Mamba leaves the embeddings out and gives each layer's output, then
    the final norm's (n_layers + 1 too). So its [i] is the zoo's [i + 1] up to i = n_layers - 2, its [-2] the last
    layer's output before the norm, and both [-1] agree."""
    c, fmt = model.config, "hf-mamba"
    _check_act(fmt, c)
    _check_conv_kernel(fmt, c)
    mixer = {"type": "mamba", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
             "dt_rank": int(c.time_step_rank), "dt_min": c.time_step_min, "dt_max": c.time_step_max,
             "dt_init_floor": c.time_step_floor, "dt_scale": c.time_step_scale, "conv_bias": c.use_conv_bias,
             "bias": c.use_bias}
    config = ZooConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, layers="M" * c.num_hidden_layers,
                       mixers={"M": mixer}, ffn="none", tie_embeddings=c.tie_word_embeddings,
                       norm_eps=c.layer_norm_epsilon, initializer_range=c.initializer_range,
                       rescale_prenorm_residual=c.rescale_prenorm_residual, residual_in_fp32=c.residual_in_fp32,
                       **_token_ids(c))
    return _build_zoo(config, _rename(_state(model), _MAMBA_KEYS, False, fmt), model)


def to_hf_mamba(model: ZooForCausalLM):
    """ZooForCausalLM (pure `mamba` stack, ffn none) -> transformers' MambaForCausalLM (whose output_hidden_states
    leave the embeddings out: see `from_hf_mamba`)."""
    from transformers import MambaConfig, MambaForCausalLM

    fmt, zc = "hf-mamba", model.config
    _no_moe(model, fmt)
    o = _check_options(fmt, _uniform_layers(model, fmt, "mamba", "none"),
                       {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "dt_scale",
                        "conv_bias", "bias", "inner_norm_eps"}, required={"inner_norms": False})
    m = model.model.layers[0].mixer
    # float(...) in every export: transformers' configs are strict dataclasses that refuse an int where a float is
    # typed, and a zoo config takes one (dt_scale: 2, aux_loss_coef: 0)
    config = MambaConfig(vocab_size=zc.vocab_size, hidden_size=zc.d_model, state_size=m.d_state,
                         num_hidden_layers=zc.num_hidden_layers, layer_norm_epsilon=float(zc.norm_eps),
                         expand=_as_int(fmt, "expand", o["expand"]), conv_kernel=m.d_conv, use_bias=o["bias"],
                         use_conv_bias=o["conv_bias"], hidden_act="silu",
                         initializer_range=float(zc.initializer_range),
                         rescale_prenorm_residual=False,  # (_RESCALED_ON_LOAD)
                         residual_in_fp32=zc.residual_in_fp32, time_step_rank=m.dt_rank,
                         time_step_scale=float(o["dt_scale"]), time_step_min=float(o["dt_min"]),
                         time_step_max=float(o["dt_max"]), time_step_floor=float(o["dt_init_floor"]),
                         tie_word_embeddings=zc.tie_embeddings, **_token_ids(zc))
    return _build_hf(MambaForCausalLM, config, _rename(_state(model), _MAMBA_KEYS, True, fmt), model)


# ---- transformers Mamba-2 ------------------------------------------------------------------------------------

def hf_mamba2_norm_groups(n_groups: int) -> int:
    """Groups of the gated RMSNorm in the installed transformers' Mamba2: before 5.2x it normalized over all
    d_inner channels whatever n_groups was (1); since then per B/C group, as mamba_ssm does (n_groups)."""
    import inspect

    from transformers.models.mamba2 import modeling_mamba2

    # (named MambaRMSNormGated up to transformers 5.2x, Mamba2RMSNormGated since 5.25)
    norm = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
    grouped = "group_size" in inspect.signature(norm.__init__).parameters
    return n_groups if grouped else 1


def from_hf_mamba2(model) -> ZooForCausalLM:
    """transformers' Mamba2ForCausalLM -> ZooForCausalLM (layers of the `mamba2` mixer, ffn none).

    Older transformers normalize the gated RMSNorm over all d_inner channels whatever n_groups is (mamba_ssm
    and transformers 5.2x normalize per group): the mixer gets the installed version's grouping
    (`hf_mamba2_norm_groups`), norm_groups=1 where that differs from the zoo's per-group default.
    """
    c, fmt = model.config, "hf-mamba2"
    _check_act(fmt, c)
    _check_conv_kernel(fmt, c)
    limit = tuple(float(x) for x in c.time_step_limit)
    if limit != (0.0, math.inf):
        raise _unmappable(fmt, "time_step_limit", c.time_step_limit, "the zoo's Mamba-2 does not clamp dt")
    d_inner = int(c.expand * c.hidden_size)
    if c.num_heads * c.head_dim != d_inner:
        raise _unmappable(fmt, "num_heads", c.num_heads, f"num_heads·head_dim must equal expand·hidden_size "
                                                         f"= {d_inner}")
    mixer = {"type": "mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
             "head_dim": c.head_dim, "n_groups": c.n_groups, "chunk_size": c.chunk_size,
             "dt_min": c.time_step_min, "dt_max": c.time_step_max, "dt_init_floor": c.time_step_floor,
             "conv_bias": c.use_conv_bias, "bias": c.use_bias, "norm_eps": c.layer_norm_epsilon}
    if c.n_groups > 1 and hf_mamba2_norm_groups(c.n_groups) == 1:
        mixer["norm_groups"] = 1
    config = ZooConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, layers="M" * c.num_hidden_layers,
                       mixers={"M": mixer}, ffn="none", tie_embeddings=c.tie_word_embeddings,
                       norm_eps=c.layer_norm_epsilon, initializer_range=c.initializer_range,
                       rescale_prenorm_residual=c.rescale_prenorm_residual, residual_in_fp32=c.residual_in_fp32,
                       **_token_ids(c))
    return _build_zoo(config, _rename(_state(model), _MAMBA_KEYS, False, fmt), model)


def to_hf_mamba2(model: ZooForCausalLM):
    """ZooForCausalLM (pure `mamba2` stack, ffn none) -> transformers' Mamba2ForCausalLM."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    fmt, zc = "hf-mamba2", model.config
    _no_moe(model, fmt)
    o = _check_options(fmt, _uniform_layers(model, fmt, "mamba2", "none"),
                       {"d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size", "dt_min", "dt_max",
                        "dt_init_floor", "conv_bias", "bias", "norm_eps", "norm_groups"}, init_only={"A_init_range"})
    m = model.model.layers[0].mixer
    hf_groups = hf_mamba2_norm_groups(m.n_groups)
    if m.norm.group_size != m.d_inner // hf_groups:
        raise _unmappable(fmt, "norm_groups", o["norm_groups"] or o["n_groups"],
                          "this transformers' Mamba2 normalizes the gated RMSNorm over all d_inner channels; "
                          "set norm_groups: 1 (or n_groups: 1)" if hf_groups == 1 else
                          f"this transformers' Mamba2 normalizes the gated RMSNorm per B/C group ({hf_groups})")
    if o["norm_eps"] != zc.norm_eps:
        raise _unmappable(fmt, "norm_eps", o["norm_eps"], f"transformers' Mamba2 uses one layer_norm_epsilon for "
                                                          f"the block norms ({zc.norm_eps}) and the gated norm")
    config = Mamba2Config(num_heads=m.n_heads, head_dim=m.head_dim, vocab_size=zc.vocab_size, hidden_size=zc.d_model,
                          state_size=m.d_state, num_hidden_layers=zc.num_hidden_layers,
                          layer_norm_epsilon=float(zc.norm_eps), expand=_as_int(fmt, "expand", o["expand"]),
                          conv_kernel=m.d_conv, n_groups=m.n_groups, use_bias=o["bias"], use_conv_bias=o["conv_bias"],
                          hidden_act="silu", initializer_range=float(zc.initializer_range),
                          residual_in_fp32=zc.residual_in_fp32,
                          rescale_prenorm_residual=False, time_step_min=float(o["dt_min"]),  # (_RESCALED_ON_LOAD)
                          time_step_max=float(o["dt_max"]), time_step_floor=float(o["dt_init_floor"]),
                          time_step_limit=(0.0, float("inf")), chunk_size=m.chunk_size,
                          tie_word_embeddings=zc.tie_embeddings, **_token_ids(zc))
    return _build_hf(Mamba2ForCausalLM, config, _rename(_state(model), _MAMBA_KEYS, True, fmt), model)


# ---- transformers Llama --------------------------------------------------------------------------------------

def _rope_theta(fmt: str, c) -> float:
    rope = getattr(c, "rope_parameters", None) or {}
    if "rope_type" not in rope and hasattr(c, "rope_scaling") and c.rope_scaling:
        rope = c.rope_scaling
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _unmappable(fmt, "rope_parameters.rope_type (rope_scaling)", rope_type,
                          "the zoo's attention implements plain RoPE only")
    return float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def from_hf_llama(model) -> ZooForCausalLM:
    """transformers' LlamaForCausalLM -> ZooForCausalLM (Transformer++: `attention` mixer + SwiGLU)."""
    c, fmt = model.config, "hf-llama"
    _check_act(fmt, c)
    for name in ("attention_bias", "mlp_bias"):
        if getattr(c, name, False):
            raise _unmappable(fmt, name, True, "the zoo's attention and SwiGLU have no biases")
    if getattr(c, "attention_dropout", 0.0):
        raise _unmappable(fmt, "attention_dropout", c.attention_dropout, "the zoo's attention has no dropout")
    mixer = {"type": "attention", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
             "head_dim": c.head_dim, "rope_theta": _rope_theta(fmt, c)}
    config = ZooConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, layers="A" * c.num_hidden_layers,
                       mixers={"A": mixer}, ffn={"type": "swiglu", "hidden": c.intermediate_size},
                       tie_embeddings=c.tie_word_embeddings, norm_eps=c.rms_norm_eps,
                       initializer_range=c.initializer_range, max_position_embeddings=c.max_position_embeddings,
                       residual_in_fp32=False, **_token_ids(c))  # Llama adds its residual in the model's dtype
    return _build_zoo(config, _rename(_state(model), _LLAMA_KEYS, False, fmt), model)


def to_hf_llama(model: ZooForCausalLM):
    """ZooForCausalLM (pure `attention` stack with SwiGLU) -> transformers' LlamaForCausalLM.

    Llama adds the residual in the weights' dtype: residual_in_fp32 is dropped, with a warning for bf16 / fp16
    weights (whose logits then differ from the zoo model's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fmt, zc = "hf-llama", model.config
    _no_moe(model, fmt)
    _check_options(fmt, _uniform_layers(model, fmt, "attention", "swiglu"), {"n_heads", "n_kv_heads", "head_dim",
                   "rope_theta"}, required={"rope": True, "window": None})
    m = model.model.layers[0].mixer
    config = LlamaConfig(vocab_size=zc.vocab_size, hidden_size=zc.d_model, intermediate_size=zc.ffn_spec()["hidden"],
                         num_hidden_layers=zc.num_hidden_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim, hidden_act="silu",
                         max_position_embeddings=getattr(zc, "max_position_embeddings", 2048),
                         initializer_range=float(zc.initializer_range), rms_norm_eps=float(zc.norm_eps),
                         tie_word_embeddings=zc.tie_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
                         attention_bias=False, mlp_bias=False, **_token_ids(zc))
    _warn_fp32_residual_dropped(fmt, model, "LlamaForCausalLM")
    return _build_hf(LlamaForCausalLM, config, _rename(_state(model), _LLAMA_KEYS, True, fmt), model)


# ---- transformers Jamba --------------------------------------------------------------------------------------

def _jamba_unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers keeps experts as 3D tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    out = {}
    for key, value in state.items():
        if key.endswith(".experts.gate_up_proj"):
            base = key.removesuffix("gate_up_proj")
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = gate[e].clone()
                out[f"{base}{e}.up_proj.weight"] = up[e].clone()
        elif key.endswith(".experts.down_proj"):
            base = key.removesuffix("down_proj")
            for e in range(value.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = value[e].clone()
        else:
            out[key] = value
    return out


def _jamba_fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, experts = {}, {}
    for key, value in state.items():
        m = re.match(r"^(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
        else:
            out[key] = value
    for base, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        out[base + "gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"], w["up_proj"]]) for w in order])
        out[base + "down_proj"] = torch.stack([w["down_proj"] for w in order])
    return out


def _period(flags: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset) for every layer, or None."""
    on = [i for i, f in enumerate(flags) if f]
    if not on:
        return len(flags) + 1, len(flags)
    for period in range(on[0] + 1, len(flags) + 1):
        if all(f == (i % period == on[0]) for i, f in enumerate(flags)):
            return period, on[0]
    return None


def from_hf_jamba(model) -> ZooForCausalLM:
    """transformers' JambaForCausalLM -> ZooForCausalLM (Mamba with dt/B/C norms, attention without RoPE,
    MoE whose top-k weights are not renormalized)."""
    c, fmt = model.config, "hf-jamba"
    _check_act(fmt, c)
    _check_conv_kernel(fmt, c)
    if getattr(c, "attention_dropout", 0.0):
        raise _unmappable(fmt, "attention_dropout", c.attention_dropout, "the zoo's attention has no dropout")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kinds = list(c.layers_block_type)
    mamba = {"type": "mamba", "d_state": c.mamba_d_state, "d_conv": c.mamba_d_conv, "expand": c.mamba_expand,
             "dt_rank": int(c.mamba_dt_rank), "conv_bias": c.mamba_conv_bias, "bias": c.mamba_proj_bias,
             "inner_norms": True, "inner_norm_eps": c.rms_norm_eps}
    attention = {"type": "attention", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
                 "head_dim": head_dim, "rope": False}
    moe = None
    if any(n > 1 for n in c.layers_num_experts):
        moe = {"every": c.expert_layer_period, "offset": c.expert_layer_offset, "n_experts": c.num_experts,
               "top_k": c.num_experts_per_tok, "hidden": c.intermediate_size,
               "aux_loss_coef": c.router_aux_loss_coef, "normalize_topk": False}
    config = ZooConfig(vocab_size=c.vocab_size, d_model=c.hidden_size,
                       layers="".join("A" if k == "attention" else "M" for k in kinds),
                       mixers={"M": mamba, "A": attention}, ffn={"type": "swiglu", "hidden": c.intermediate_size},
                       moe=moe, tie_embeddings=c.tie_word_embeddings, norm_eps=c.rms_norm_eps,
                       initializer_range=c.initializer_range, rescale_prenorm_residual=False,
                       residual_in_fp32=False,  # transformers' Jamba adds its residual in the model's dtype
                       max_position_embeddings=c.max_position_embeddings,
                       output_router_logits=bool(getattr(c, "output_router_logits", False)), **_token_ids(c))
    if [s["ffn"] == "moe" for s in config.layer_specs()] != [n > 1 for n in c.layers_num_experts]:
        raise _unmappable(fmt, "expert_layer_period/offset", (c.expert_layer_period, c.expert_layer_offset),
                          "the expert layers do not follow the zoo's moe.every/offset rule")
    state = _jamba_unfuse_experts(_state(model))
    return _build_zoo(config, _rename(state, _jamba_keys(kinds), False, fmt), model)


def to_hf_jamba(model: ZooForCausalLM):
    """ZooForCausalLM (Jamba-style: mamba with inner_norms, attention with rope off, MoE without
    renormalization, periodic layer pattern) -> transformers' JambaForCausalLM.

    Jamba adds the residual in the weights' dtype: residual_in_fp32 is dropped, with a warning for bf16 / fp16
    weights (whose logits then differ from the zoo model's)."""
    from transformers import JambaConfig, JambaForCausalLM

    fmt, zc = "hf-jamba", model.config
    specs = zc.layer_specs()
    if all(spec["type"] == "mamba" for spec in specs):
        # transformers' Jamba sizes its attention mask from the cache's attention layers: with none, forward and
        # generate (with the default cache) raise "`get_mask_sizes` can only be called on Attention layers"
        fits = "no other format has a MoE" if zc.moe is not None else (
            "a Mamba stack without inner_norms exports with --to mamba_ssm (ffn none or swiglu)"
            + (" or --to hf-mamba" if all(spec["ffn"] == "none" for spec in specs) else ""))
        raise _unmappable(fmt, "layers", zc.layers, f"transformers' JambaForCausalLM cannot run a model without an "
                                                    f"attention layer (its cache sizes the mask from one); {fits}")
    kinds, mamba_opts, attn_opts = [], None, None
    for i, spec in enumerate(specs):
        if spec["type"] == "mamba":
            _check_options(fmt, spec, {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"},
                           init_only={"dt_min", "dt_max", "dt_init_floor", "dt_scale"},
                           required={"inner_norms": True, "inner_norm_eps": zc.norm_eps})
            if mamba_opts is not None and _function_options(spec) != mamba_opts:
                raise _unmappable(fmt, f"layers[{i}]", spec, "Jamba needs the same Mamba options in every layer")
            mamba_opts, kind = _function_options(spec), "mamba"
        elif spec["type"] == "attention":
            _check_options(fmt, spec, {"n_heads", "n_kv_heads", "head_dim"}, init_only={"rope_theta"},
                           required={"rope": False, "window": None})
            if attn_opts is not None and _function_options(spec) != attn_opts:
                raise _unmappable(fmt, f"layers[{i}]", spec, "Jamba needs the same attention options in every layer")
            attn_opts, kind = _function_options(spec), "attention"
        else:
            raise _unmappable(fmt, f"layers[{i}].type", spec["type"], "Jamba has only Mamba and attention layers")
        if spec["ffn"] == "none":
            raise _unmappable(fmt, f"layers[{i}].ffn", "none", "every Jamba layer has an MLP or a MoE")
        kinds.append(kind)
    attn_period = _period([k == "attention" for k in kinds])
    if attn_period is None:
        raise _unmappable(fmt, "layers", zc.layers, "Jamba places attention every attn_layer_period layers "
                                                    "from attn_layer_offset")
    moe_flags = [s["ffn"] == "moe" for s in specs]
    expert_period = _period(moe_flags)
    if expert_period is None:
        raise _unmappable(fmt, "moe", zc.moe, "Jamba places MoE layers every expert_layer_period layers")
    hidden = zc.ffn_spec().get("hidden")  # None with ffn: none, where every layer is a MoE (refused above otherwise)
    n_experts, top_k = 1, 2
    if any(moe_flags):
        moe = zc.moe_spec()
        if moe["normalize_topk"]:
            raise _unmappable(fmt, "moe.normalize_topk", True, "Jamba uses the top-k router probabilities as they are")
        if moe["n_experts"] < 2:
            raise _unmappable(fmt, "moe.n_experts", moe["n_experts"], "Jamba builds a plain MLP, with no router, "
                                                                     "where num_experts is 1")
        if any(not f for f in moe_flags) and moe["hidden"] != hidden:
            raise _unmappable(fmt, "moe.hidden", moe["hidden"], f"Jamba's experts and MLPs share intermediate_size "
                                                                f"(ffn.hidden = {hidden})")
        hidden, n_experts, top_k = moe["hidden"], moe["n_experts"], moe["top_k"]
    mamba = next((b.mixer for b in model.model.layers if kinds[b.mixer.layer_idx] == "mamba"), None)
    attn = next((b.mixer for b in model.model.layers if kinds[b.mixer.layer_idx] == "attention"), None)
    extra: dict[str, Any] = {}
    if mamba is not None:
        extra.update(mamba_d_state=mamba.d_state, mamba_d_conv=mamba.d_conv, mamba_dt_rank=mamba.dt_rank,
                     mamba_expand=_as_int(fmt, "expand", mamba_opts["expand"]), mamba_conv_bias=mamba_opts["conv_bias"],
                     mamba_proj_bias=mamba_opts["bias"])
    if attn is not None:
        if attn.head_dim * attn.n_heads != zc.d_model:
            raise _unmappable(fmt, "head_dim", attn.head_dim, "Jamba's head_dim is hidden_size / num_attention_heads")
        extra.update(num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_kv_heads)
    config = JambaConfig(vocab_size=zc.vocab_size, tie_word_embeddings=zc.tie_embeddings, hidden_size=zc.d_model,
                         intermediate_size=hidden, num_hidden_layers=len(specs), hidden_act="silu",
                         initializer_range=float(zc.initializer_range), rms_norm_eps=float(zc.norm_eps),
                         router_aux_loss_coef=float(zc.moe_spec()["aux_loss_coef"]) if zc.moe is not None else 0.001,
                         max_position_embeddings=getattr(zc, "max_position_embeddings", 262144),
                         num_experts_per_tok=top_k, num_experts=n_experts,
                         expert_layer_period=expert_period[0], expert_layer_offset=expert_period[1],
                         attn_layer_period=attn_period[0], attn_layer_offset=attn_period[1],
                         output_router_logits=bool(zc.output_router_logits), use_mamba_kernels=False, **extra,
                         **_token_ids(zc))
    _warn_fp32_residual_dropped(fmt, model, "JambaForCausalLM")
    state = _rename(_state(model), _jamba_keys(kinds), True, fmt)
    return _build_hf(JambaForCausalLM, config, _jamba_fuse_experts(state), model)


# ---- mamba_ssm (MambaLMHeadModel) ----------------------------------------------------------------------------

def _mamba_ssm_split_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GatedMLP: fc1 -> [y, gate] halves, out = fc2(y · silu(gate)); so y is SwiGLU's up, the second half its gate."""
    out = {}
    for key, value in state.items():
        if key.endswith(".mlp.fc1.weight"):
            base = key.removesuffix("fc1.weight")
            up, gate = value.chunk(2, dim=0)
            out[base + "up_proj.weight"], out[base + "gate_proj.weight"] = up.clone(), gate.clone()
        elif key.endswith(".mlp.fc2.weight"):
            out[key.removesuffix("fc2.weight") + "down_proj.weight"] = value
        elif key.endswith(".mlp.fc1.bias") or key.endswith(".mlp.fc2.bias"):
            raise UnmappableError("mamba_ssm: GatedMLP with bias=True cannot be mapped exactly: SwiGLU has no biases")
        else:
            out[key] = value
    return out


def _mamba_ssm_fuse_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(".mlp.up_proj.weight"):
            base = key.removesuffix("up_proj.weight")
            out[base + "fc1.weight"] = torch.cat([value, state[base + "gate_proj.weight"]])
        elif key.endswith(".mlp.gate_proj.weight"):
            continue
        elif key.endswith(".mlp.down_proj.weight"):
            out[key.removesuffix("down_proj.weight") + "fc2.weight"] = value
        else:
            out[key] = value
    return out


def _mamba_ssm_split_attention(state: dict[str, torch.Tensor], layers: list[int], spec: dict[str, Any]
                               ) -> dict[str, torch.Tensor]:
    """MHA (modules/mha.py): in_proj = [q (num_heads·head_dim rows), k, v (num_heads_kv·head_dim each)], out_proj
    -> the zoo's q/k/v/o_proj, for the attention layers `layers`; the rest passes through."""
    out = dict(state)
    q_rows, kv_rows = spec["n_heads"] * spec["head_dim"], spec["n_kv_heads"] * spec["head_dim"]
    for i in layers:
        p = f"backbone.layers.{i}.mixer."
        if p + "in_proj.weight" not in out:  # (named by _build_zoo as q/k/v_proj missing)
            continue
        w = out.pop(p + "in_proj.weight")
        if w.shape[0] != q_rows + 2 * kv_rows:
            raise UnmappableError(f"mamba_ssm: {p}in_proj.weight has {w.shape[0]} rows, not the {q_rows + 2 * kv_rows} "
                                  f"of q, k and v that attn_cfg gives (num_heads, num_heads_kv, head_dim)")
        q, k, v = w.split([q_rows, kv_rows, kv_rows])
        out[p + "q_proj.weight"], out[p + "k_proj.weight"], out[p + "v_proj.weight"] = q.clone(), k.clone(), v.clone()
        if p + "out_proj.weight" in out:
            out[p + "o_proj.weight"] = out.pop(p + "out_proj.weight")
    return out


def _mamba_ssm_fuse_attention(state: dict[str, torch.Tensor], layers: list[int]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for i in layers:
        p = f"backbone.layers.{i}.mixer."
        out[p + "in_proj.weight"] = torch.cat([out.pop(p + f"{x}_proj.weight") for x in "qkv"])
        out[p + "out_proj.weight"] = out.pop(p + "o_proj.weight")
    return out


_MAMBA_SSM_MAMBA1 = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "dt_rank": "dt_rank",
                     "dt_min": "dt_min", "dt_max": "dt_max", "dt_scale": "dt_scale", "dt_init_floor": "dt_init_floor",
                     "conv_bias": "conv_bias", "bias": "bias"}
_MAMBA_SSM_MAMBA2 = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "headdim": "head_dim",
                     "ngroups": "n_groups", "A_init_range": "A_init_range", "dt_min": "dt_min", "dt_max": "dt_max",
                     "dt_init_floor": "dt_init_floor", "bias": "bias", "conv_bias": "conv_bias",
                     "chunk_size": "chunk_size"}
# mamba_ssm options that choose kernels or initialization only, with no effect on a checkpoint's function
_MAMBA_SSM_IGNORED = {"use_fast_path", "use_mem_eff_path", "dt_init", "conv_init", "layer_idx", "sequence_parallel",
                      "process_group", "device", "dtype"}


# mamba_ssm's MHA options (modules/mha.py) the zoo's attention has one value of, with MHA's defaults: no biases,
# causal, no convolution over q/k/v, no parallel MLP (mlp_dim), the default 1/sqrt(head_dim) scale, RoPE in halves
_MAMBA_SSM_MHA_FIXED = {"qkv_proj_bias": (False, True), "out_proj_bias": (False, True), "causal": (True, False),
                        "d_conv": (0, 0), "mlp_dim": (0, 0), "softmax_scale": (None, None)}


def _mamba_ssm_attention(attn_cfg: dict, d_model: int) -> dict[str, Any]:
    """mamba_ssm's attn_cfg (MHA's keyword arguments) -> the zoo's attention spec; raises for an option whose value
    computes another function (biases, a bidirectional or convolved attention, partial or interleaved RoPE)."""
    fmt, cfg = "mamba_ssm", dict(attn_cfg)
    n_heads = cfg.pop("num_heads", None)
    if n_heads is None:
        raise _unmappable(fmt, "attn_cfg.num_heads", None, "mamba_ssm's MHA needs num_heads (it has no default)")
    n_kv_heads = cfg.pop("num_heads_kv", None)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    head_dim = cfg.pop("head_dim", None)
    head_dim = d_model // n_heads if head_dim is None else head_dim
    for name, (value, default) in _MAMBA_SSM_MHA_FIXED.items():
        unset = name not in cfg
        given = cfg.pop(name, default)
        same = given == value
        if name == "mlp_dim":  # MHA rounds it up to a multiple of 256: 0 (none) for anything not above 0
            same = math.ceil(given / 256) == 0
        elif name == "softmax_scale" and given is not None:  # the default spelled out
            same = math.isclose(given, head_dim ** -0.5, rel_tol=1e-12)
        if not same:
            why = f"the zoo's attention has {name}={value!r} only" + (" (attn_cfg leaves it at MHA's default)"
                                                                       if unset else "")
            raise _unmappable(fmt, f"attn_cfg.{name}", given, why)
    rotary_dim, base = cfg.pop("rotary_emb_dim", 0), cfg.pop("rotary_emb_base", 10000.0)
    interleaved = cfg.pop("rotary_emb_interleaved", False)
    spec: dict[str, Any] = {"type": "attention", "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim}
    if rotary_dim == 0:
        spec["rope"] = False
    elif rotary_dim != head_dim:
        raise _unmappable(fmt, "attn_cfg.rotary_emb_dim", rotary_dim, f"the zoo's RoPE rotates the whole head "
                                                                      f"(head_dim {head_dim}) or nothing (0)")
    elif interleaved:
        raise _unmappable(fmt, "attn_cfg.rotary_emb_interleaved", True, "the zoo's RoPE rotates halves "
                                                                        "(GPT-NeoX's, not GPT-J's pairs)")
    else:
        spec["rope_theta"] = float(base)
    for name, value in cfg.items():
        if name not in ("layer_idx", "device", "dtype"):
            raise _unmappable(fmt, f"attn_cfg.{name}", value, "unknown MHA option")
    return spec


def _mamba_ssm_mixer(ssm_cfg: dict, d_model: int) -> dict[str, Any]:
    fmt = "mamba_ssm"
    cfg = dict(ssm_cfg)
    layer = cfg.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise _unmappable(fmt, "ssm_cfg.layer", layer, "the zoo maps Mamba1 and Mamba2 layers")
    table = _MAMBA_SSM_MAMBA1 if layer == "Mamba1" else _MAMBA_SSM_MAMBA2
    spec: dict[str, Any] = {"type": "mamba" if layer == "Mamba1" else "mamba2"}
    if layer == "Mamba2":
        d_inner = int(cfg.get("expand", 2) * d_model)
        if cfg.get("d_ssm") == d_inner:
            cfg.pop("d_ssm")  # the default spelled out: no gated-MLP channels beside the SSM
        required = {"d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False}
        for name, value in required.items():
            if cfg.pop(name, value) != value:
                raise _unmappable(fmt, f"ssm_cfg.{name}", ssm_cfg[name], f"the zoo's Mamba-2 has {name}={value!r} "
                                                                         f"only")
        limit = tuple(float(x) for x in cfg.pop("dt_limit", (0.0, math.inf)))
        if limit != (0.0, math.inf):
            raise _unmappable(fmt, "ssm_cfg.dt_limit", limit, "the zoo's Mamba-2 does not clamp dt")
        spec["norm_eps"] = _MAMBA_SSM_EPS
    for name, value in cfg.items():
        if name in table:
            spec[table[name]] = tuple(value) if name == "A_init_range" else value
        elif name not in _MAMBA_SSM_IGNORED:
            raise _unmappable(fmt, f"ssm_cfg.{name}", value, f"unknown {layer} option")
    expand = spec.get("expand", 2)
    if layer == "Mamba1" and isinstance(expand, (int, float)) and not float(expand * d_model).is_integer():
        spec["expand"] = _truncated_expand(expand, d_model)
    return spec


def _truncated_expand(expand: float, d_model: int) -> float:
    """The expand of the width mamba_ssm's Mamba builds, d_inner = int(expand·d_model), where expand·d_model is no
    whole number (1.5 at d_model 33: 49; 2.3 at 50: 114.99999999999999, so 114): the zoo's mixer refused the first
    (its expand·d_model must be whole) and rounded the second to 115, so the checkpoint did not load. The expand given
    is d_inner / d_model, or the float just above it where int() would truncate that one below d_inner (the export
    writes it back, and mamba_ssm builds d_inner from it)."""
    d_inner = int(expand * d_model)
    fit = d_inner / d_model
    return fit if int(fit * d_model) == d_inner else math.nextafter(fit, math.inf)


_MAMBA_SSM_COUNTS = {"d_model": 1, "n_layer": 1, "vocab_size": 1, "pad_vocab_size_multiple": 1, "d_intermediate": 0}


def _mamba_ssm_typed(c: dict[str, Any]) -> dict[str, Any]:
    """mamba_ssm's config fields checked for the types its MambaConfig declares (a hand-edited config.json's
    "n_layer": "2", "attn_layer_idx": 3 or "pad_vocab_size_multiple": 0 ended in a TypeError or ZeroDivisionError
    traceback naming no field); a whole number written as a float is taken as the int."""
    def bad(name: str, what: str) -> ValueError:
        return ValueError(f"mamba_ssm: config.json's {name}={c[name]!r} is not {what}, as mamba_ssm's MambaConfig "
                          f"takes it")

    c = dict(c)
    for name, least in _MAMBA_SSM_COUNTS.items():
        value = c[name]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise bad(name, "an integer" + (" above 0" if least else " of at least 0"))
        c[name] = value
    for name in ("rms_norm", "residual_in_fp32", "fused_add_norm", "tie_embeddings"):
        if not isinstance(c[name], bool):
            raise bad(name, "true or false")
    for name in ("ssm_cfg", "attn_cfg"):  # (null is {}, as create_block takes it)
        if c[name] is not None and not isinstance(c[name], dict):
            raise bad(name, "an object of keyword arguments (or null)")
    idx = c["attn_layer_idx"]
    if idx is not None and not (isinstance(idx, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in idx)):
        raise bad("attn_layer_idx", "a list of layer indices (or null)")
    return c


def from_mamba_ssm(config: dict, state_dict: dict[str, torch.Tensor]) -> ZooForCausalLM:
    """mamba_ssm's MambaLMHeadModel (its config.json dict and state dict) -> ZooForCausalLM.

    Mamba-1 or Mamba-2 layers (ssm_cfg["layer"]), MHA layers at attn_layer_idx (attn_cfg: causal, no biases, RoPE
    over the whole head or none), an optional GatedMLP per layer (d_intermediate > 0), RMSNorm with eps 1e-5. The
    vocabulary is padded as mamba_ssm pads it (pad_vocab_size_multiple), so the zoo model has the padded size and
    the same logits over every row.
    """
    fmt = "mamba_ssm"
    unknown = sorted(set(config) - set(_MAMBA_SSM_FIELDS))
    if unknown:
        raise _unmappable(fmt, unknown[0], config[unknown[0]], "not a field of mamba_ssm's MambaConfig")
    c = _mamba_ssm_typed({**_MAMBA_SSM_FIELDS, **config})
    if not c["rms_norm"]:
        raise _unmappable(fmt, "rms_norm", False, "the zoo's blocks use RMSNorm, not LayerNorm")
    d_model = c["d_model"]
    # (create_block: layer i is an MHA where i is in attn_layer_idx; null ssm_cfg / attn_cfg / attn_layer_idx are {})
    attn_layers = [i for i in range(c["n_layer"]) if i in (c["attn_layer_idx"] or [])]
    letters = "".join("A" if i in attn_layers else "M" for i in range(c["n_layer"]))
    mixers = {}
    if "M" in letters:
        mixers["M"] = _mamba_ssm_mixer(c["ssm_cfg"] or {}, d_model)
    if attn_layers:
        mixers["A"] = _mamba_ssm_attention(c["attn_cfg"] or {}, d_model)
    vocab = c["vocab_size"]
    multiple = c["pad_vocab_size_multiple"]
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        # (a bare tensor ended in a TypeError traceback, a list named its tensors as the dict's keys)
        what = f"a {type(state_dict).__name__}"
        if isinstance(state_dict, dict):  # a training checkpoint's: the state dict under one of its keys
            inner = [k for k, v in state_dict.items() if isinstance(v, dict)]
            what = f"a dict of {sorted(map(str, state_dict))[:5]}" + (f" (the state dict under {inner[0]!r}?)"
                                                                      if inner else "")
        raise UnmappableError(f"mamba_ssm: the weights are {what}, not a state dict (names to tensors); give "
                              f"MambaLMHeadModel's state dict, as its save_pretrained writes it")
    state = dict(state_dict)
    if "backbone.embeddings.weight" in state:  # the key transformers' Mamba load hook also accepts
        state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    if "backbone.embedding.weight" not in state:
        raise UnmappableError(f"mamba_ssm: the state dict has no 'backbone.embedding.weight' (its first keys: "
                              f"{sorted(state)[:3]}); give MambaLMHeadModel's state dict, as its save_pretrained "
                              f"writes it")
    rows = state["backbone.embedding.weight"].shape[0]
    if rows != vocab:
        raise UnmappableError(f"mamba_ssm: the embedding has {rows} rows but vocab_size={c['vocab_size']} padded to "
                              f"a multiple of {multiple} is {vocab}")
    ffn: Any = "none"
    if c["d_intermediate"]:
        hidden = -(-c["d_intermediate"] // _MAMBA_SSM_MLP_MULTIPLE) * _MAMBA_SSM_MLP_MULTIPLE
        ffn = {"type": "swiglu", "hidden": hidden}
    zoo_config = ZooConfig(vocab_size=vocab, d_model=d_model, layers=letters, mixers=mixers, ffn=ffn,
                           tie_embeddings=c["tie_embeddings"], norm_eps=_MAMBA_SSM_EPS,
                           residual_in_fp32=c["residual_in_fp32"])
    if attn_layers:
        state = _mamba_ssm_split_attention(state, attn_layers, mixers["A"])
    state = _mamba_ssm_split_mlp(state)
    if c["tie_embeddings"]:
        state.pop("lm_head.weight", None)
    return _build_zoo(zoo_config, _rename(state, _MAMBA_SSM_KEYS, False, fmt))


def _same_layers(fmt: str, specs: list[dict], indices: list[int], what: str) -> dict:
    """The one spec the layers `indices` share (mamba_ssm has one ssm_cfg, one attn_cfg); raises naming the first
    that differs."""
    first = specs[indices[0]]
    for i in indices:
        if specs[i]["type"] != first["type"]:
            raise _unmappable(fmt, f"layers[{i}].type", specs[i]["type"],
                              f"mamba_ssm has one {what} for every such layer (layer {indices[0]}: {first['type']!r})")
        if _function_options(specs[i]) != _function_options(first):
            raise _unmappable(fmt, f"layers[{i}]", specs[i], f"mamba_ssm has one {what}: every such layer needs the "
                                                             f"options of layer {indices[0]}")
    return first


def to_mamba_ssm(model: ZooForCausalLM) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ZooForCausalLM (mamba or mamba2 layers, attention layers among them (MHA at attn_layer_idx), the same ffn
    none or SwiGLU in every layer) -> (mamba_ssm config dict, state dict). (mamba_ssm's MHA takes its RoPE from
    flash_attn: loading an export whose attention has RoPE needs flash_attn installed beside mamba_ssm.)"""
    fmt, zc = "mamba_ssm", model.config
    _no_moe(model, fmt)
    specs = zc.layer_specs()
    ffn = specs[0]["ffn"]
    for i, spec in enumerate(specs):
        if spec["type"] not in ("mamba", "mamba2", "attention"):
            raise _unmappable(fmt, f"layers[{i}].type", spec["type"], "mamba_ssm's MambaLMHeadModel stacks Mamba, "
                                                                      "Mamba-2 and attention (MHA) layers")
        if spec["ffn"] != ffn:
            raise _unmappable(fmt, f"layers[{i}].ffn", spec["ffn"], f"mamba_ssm gives every layer the same MLP "
                                                                    f"(d_intermediate; layer 0: {ffn!r})")
    if zc.norm_eps != _MAMBA_SSM_EPS:
        raise _unmappable(fmt, "norm_eps", zc.norm_eps, f"mamba_ssm's norms use eps {_MAMBA_SSM_EPS}")
    attn_layers = [i for i, spec in enumerate(specs) if spec["type"] == "attention"]
    ssm_layers = [i for i, spec in enumerate(specs) if spec["type"] != "attention"]
    attn_cfg: dict[str, Any] = {}
    if attn_layers:
        spec = _same_layers(fmt, specs, attn_layers, "attn_cfg")
        o = _check_options(fmt, spec, {"n_heads", "n_kv_heads", "head_dim", "rope", "rope_theta"},
                           required={"window": None})
        a = model.model.layers[attn_layers[0]].mixer
        # modules/mha.py: MHA(num_heads, num_heads_kv, head_dim, qkv_proj_bias, out_proj_bias, causal, rotary_emb_dim,
        # rotary_emb_base, rotary_emb_interleaved); flash_attn's RotaryEmbedding rotates halves, as the zoo's RoPE
        attn_cfg = {"num_heads": a.n_heads, "num_heads_kv": a.n_kv_heads, "head_dim": a.head_dim,
                    "qkv_proj_bias": False, "out_proj_bias": False, "causal": True,
                    "rotary_emb_dim": a.head_dim if o["rope"] else 0, "rotary_emb_base": float(o["rope_theta"]),
                    "rotary_emb_interleaved": False}
    ssm_cfg: dict[str, Any] = {}
    if ssm_layers:
        ssm_cfg = _mamba_ssm_ssm_cfg(model, _same_layers(fmt, specs, ssm_layers, "ssm_cfg"), ssm_layers[0])
    d_intermediate = 0
    if ffn == "swiglu":
        d_intermediate = zc.ffn_spec()["hidden"]
        if d_intermediate % _MAMBA_SSM_MLP_MULTIPLE:
            raise _unmappable(fmt, "ffn.hidden", d_intermediate,
                              f"mamba_ssm's GatedMLP rounds it up to a multiple of {_MAMBA_SSM_MLP_MULTIPLE}")
    if getattr(zc, "add_bos", None) is False:  # (a zoo finetune's record: zoo.eval.common.trained_with_bos)
        warnings.warn("mamba_ssm: add_bos=False (the model was finetuned on rows without <bos>) is dropped: "
                      "mamba_ssm's MambaConfig has no such field, so the folder converted back into the zoo is "
                      "prompted with <bos> by zoo generate and zoo eval; convert it to a transformers format to keep "
                      "it",
                      stacklevel=2)
    multiple = 8 if zc.vocab_size % 8 == 0 else 1
    config = {"d_model": zc.d_model, "d_intermediate": d_intermediate, "n_layer": zc.num_hidden_layers,
              "vocab_size": zc.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": attn_layers, "attn_cfg": attn_cfg,
              "rms_norm": True, "residual_in_fp32": bool(zc.residual_in_fp32), "fused_add_norm": True,
              "pad_vocab_size_multiple": multiple, "tie_embeddings": bool(zc.tie_embeddings)}
    state = _mamba_ssm_fuse_mlp(_rename(_state(model), _MAMBA_SSM_KEYS, True, fmt))
    return config, _mamba_ssm_fuse_attention(state, attn_layers)


def _mamba_ssm_ssm_cfg(model: ZooForCausalLM, spec: dict, layer: int) -> dict[str, Any]:
    """mamba_ssm's ssm_cfg for the Mamba or Mamba-2 layers whose spec is `spec` (the mixer of `layer` one of them)."""
    fmt, zc, mixer_type = "mamba_ssm", model.config, spec["type"]
    m = model.model.layers[layer].mixer
    if mixer_type == "mamba":
        table = _MAMBA_SSM_MAMBA1
        o = _check_options(fmt, spec, set(table.values()) | {"inner_norm_eps"}, required={"inner_norms": False})
        ssm_cfg: dict[str, Any] = {"layer": "Mamba1"}
    else:
        table = _MAMBA_SSM_MAMBA2
        o = _check_options(fmt, spec, set(table.values()) | {"norm_eps", "norm_groups"})
        if o["norm_eps"] != _MAMBA_SSM_EPS:
            raise _unmappable(fmt, "norm_eps", o["norm_eps"], f"mamba_ssm's gated norm uses eps {_MAMBA_SSM_EPS}")
        if m.norm.group_size != m.d_inner // m.n_groups:
            raise _unmappable(fmt, "norm_groups", o["norm_groups"], "mamba_ssm normalizes per B/C group (n_groups)")
        ssm_cfg = {"layer": "Mamba2"}
    for theirs, ours in table.items():
        value = o[ours]
        ssm_cfg[theirs] = list(value) if isinstance(value, tuple) else value
    if mixer_type == "mamba":
        ssm_cfg["dt_rank"] = m.dt_rank
    # mamba_ssm's Mamba2 takes d_inner = expand * d_model as it comes (a float expand, 2.0 included, makes it a float
    # width its layers cannot be built with); its Mamba truncates int(expand * d_model), which a budget-matched expand
    # (zoo compare's d_inner / d_model) can land one below the zoo's width
    expand = o["expand"]
    if float(expand).is_integer():
        ssm_cfg["expand"] = int(expand)
    elif mixer_type == "mamba2":
        raise _unmappable(fmt, "expand", expand, "mamba_ssm's Mamba2 needs an integer (its d_inner is expand·d_model)")
    elif int(expand * zc.d_model) != m.d_inner:
        raise _unmappable(fmt, "expand", expand, f"mamba_ssm's Mamba makes d_inner int(expand·d_model) = "
                                                 f"{int(expand * zc.d_model)}, not {m.d_inner}")
    return ssm_cfg


# ---- folders -------------------------------------------------------------------------------------------------

_IMPORTERS = {"hf-mamba": from_hf_mamba, "hf-mamba2": from_hf_mamba2, "hf-llama": from_hf_llama,
              "hf-jamba": from_hf_jamba}
_EXPORTERS = {"hf-mamba": to_hf_mamba, "hf-mamba2": to_hf_mamba2, "hf-llama": to_hf_llama,
              "hf-jamba": to_hf_jamba}
_HF_CLASSES = {"hf-mamba": "MambaForCausalLM", "hf-mamba2": "Mamba2ForCausalLM", "hf-llama": "LlamaForCausalLM",
               "hf-jamba": "JambaForCausalLM"}


def _folder_config(folder: str | Path) -> dict[str, Any]:
    """A folder's config.json; ValueError naming the file where it is no JSON object (json's own message named
    neither the file nor the folder, and a list ended in an AttributeError's traceback)."""
    return json_object(Path(folder) / "config.json", "a model config (a JSON object)",
                       "give a model folder whose config.json its library wrote")


def detect_format(folder: str | Path) -> str:
    """'zoo', one of FORMATS, from a folder's config.json; raises naming what it found."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a model folder")
    config = _folder_config(folder)
    model_type = config.get("model_type")
    if model_type == "zoo":
        return "zoo"
    if model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    if model_type is None and {"d_model", "n_layer"} <= set(config):
        return "mamba_ssm"
    if model_type is not None:  # another architecture: no --from reads it (load_as_zoo refuses each)
        raise ValueError(f"{folder} holds a model_type={model_type!r} checkpoint, which zoo convert does not read; "
                         f"{_READABLE}")
    raise ValueError(f"{folder}: cannot tell the format (config.json has no model_type); pass --from one of "
                     f"{', '.join(FORMATS)}")


def load_mamba_ssm(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """mamba_ssm's folder: config.json and pytorch_model.bin (read with weights_only), the one weights file
    MambaLMHeadModel.from_pretrained reads, or where there is none, model.safetensors."""
    folder = Path(folder)
    config = _folder_config(folder)
    # the bin first, as mamba_ssm reads the folder: beside a model.safetensors of another save (save_mamba_ssm into
    # a folder an hf export had written) the safetensors were read, another model's weights under this config
    with readable_weights(folder):  # (a file that is no checkpoint: a ValueError naming it, not torch's traceback)
        if not (folder / "pytorch_model.bin").is_file() and (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return config, load_file(folder / "model.safetensors")
        return config, torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _write_mamba_ssm(config: dict[str, Any], state: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "pytorch_model.bin")


def save_mamba_ssm(config: dict[str, Any], state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Write the files MambaLMHeadModel.from_pretrained reads: config.json and pytorch_model.bin, as zoo.hub's
    write_folder writes a model folder: beside `folder` and moved in, so that a save that fails or is interrupted
    leaves no config.json without its weights (nor a bin cut short), and into an existing folder no earlier save's
    weight files stay beside the new ones."""
    return write_folder(folder, lambda target: _write_mamba_ssm(config, state, target))


def _restore_stored_dtypes(model: nn.Module, folder: Path) -> None:
    """Give a half-precision parameter back the fp32 it has in the folder's safetensors files: transformers'
    from_pretrained (dtype="auto") casts every tensor to the config's dtype, rounding the fp32 tensors of a half
    checkpoint (Mamba's A_log and D, as the zoo's bf16 models keep and export them). Only such upcasts: a file
    stored in another half dtype than its config's stays as loaded (one dtype throughout), as does a parameter whose
    stored values are not the loaded ones once cast (renamed or transformed by the loader)."""
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    index = folder / "model.safetensors.index.json"  # the files from_pretrained read, not any other beside them
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                param = params.get(key)
                if param is None or param.dtype not in (torch.bfloat16, torch.float16) \
                        or f.get_slice(key).get_dtype() != "F32":
                    continue
                stored = f.get_tensor(key)
                if stored.shape == param.shape and torch.equal(stored.to(param.dtype), param.data):
                    param.data = stored


def _refuse_partial_load(fmt: str, folder: str | Path, cls_name: str, info: dict) -> None:
    """Raise naming the first keys from_pretrained's loading `info` reports missing, unexpected or mismatched:
    transformers would initialize missing weights at random and drop unexpected ones, with only its load report."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise UnmappableError(f"{fmt}: {folder} does not fit {cls_name}: {kind.replace('_', ' ')} "
                                  f"{keys[:5]}{' ...' if len(keys) > 5 else ''}")


def load_as_zoo(folder: str | Path, fmt: str | None = None) -> ZooForCausalLM:
    """Any supported checkpoint folder (zoo or one of FORMATS; detected when `fmt` is None) as a zoo model."""
    import transformers

    folder = Path(folder).expanduser()  # (zoo graft --base '~/model': 'no config.json')
    if (folder / "adapter_config.json").is_file():  # from_pretrained would load the adapter into the model
        raise ValueError(f"{folder} holds a PEFT adapter (adapter_config.json) beside its model, which transformers' "
                         f"from_pretrained loads on top of the model: the converted model would hold LoRA layers "
                         f"(another model, or no save at all); give the merged model's folder (merge_and_unload, zoo "
                         f"finetune's merged/) or move the adapter's files out")
    if fmt is None:
        fmt = detect_format(folder)
    else:
        try:
            found = detect_format(folder)
        except ValueError:  # no model_type to tell by: take --from at its word (the weights are checked below)
            model_type = _folder_config(folder).get("model_type")
            if model_type is not None:  # another architecture (qwen2, mistral, ...): its own options would be lost
                raise ValueError(f"{folder} holds a model_type={model_type!r} checkpoint, which --from {fmt} does not "
                                 f"read (its biases, sliding window or other options would be dropped); "
                                 f"{_READABLE}") from None
            found = fmt
        if found != fmt:  # transformers would build the class's default model and load nothing into it
            hint = (f"pass --from {found} or leave --from out" if found in FORMATS else
                    "leave --from out (--to FORMAT converts a zoo folder out of the zoo)")
            raise ValueError(f"{folder} holds a {found} checkpoint (its config.json), not {fmt}; {hint}")
    if fmt == "zoo":  # (a classifier's folder, or one whose config lost the weights' layers: refused, not filled in)
        with readable_weights(folder):
            model, info = ZooForCausalLM.from_pretrained(folder, output_loading_info=True)
        _refuse_partial_load(fmt, folder, "ZooForCausalLM", info)
        return model.eval()
    if fmt == "mamba_ssm":
        return from_mamba_ssm(*load_mamba_ssm(folder))
    if fmt not in _IMPORTERS:
        raise ValueError(f"--from: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    off = {"rescale_prenorm_residual": False} if fmt in _RESCALED_ON_LOAD else {}
    with readable_weights(folder):
        source, info = getattr(transformers, _HF_CLASSES[fmt]).from_pretrained(folder, dtype="auto",
                                                                               output_loading_info=True, **off)
    _refuse_partial_load(fmt, folder, _HF_CLASSES[fmt], info)
    _restore_stored_dtypes(source, Path(folder))
    model = _IMPORTERS[fmt](source)
    if off:  # the folder's own value, for the zoo's init (which never touches loaded weights)
        saved = _folder_config(folder).get("rescale_prenorm_residual", False)
        model.config.rescale_prenorm_residual = bool(saved)
    return model


_MAMBA_SSM_UNSHARDED = ("--max-shard-size: --to mamba_ssm writes one pytorch_model.bin, the only weights file "
                        "mamba_ssm's from_pretrained reads (it loads no shards); leave --max-shard-size out")


def convert(src: str | Path, dst: str | Path, *, from_format: str | None = None, to_format: str | None = None,
            tokenizer: str | None = None, max_shard_size: str | int | None = None) -> Path:
    """Convert the folder `src` into the folder `dst`: into a complete zoo folder (`from_format`, detected if
    neither format is given), or into `to_format` from a zoo folder (or any folder `load_as_zoo` reads). The
    tokenizer of `src` (or `tokenizer`: 'byte' or a path) is saved alongside. Safetensors shards hold
    `max_shard_size` at most (default 5GB); mamba_ssm's one pytorch_model.bin takes none."""
    check_model_ref(src, what="source")
    if not Path(src).expanduser().is_dir():  # a hub id or a mistyped path: the tokenizer lookup went to the hub
        raise ValueError(f"source: {str(src)!r}: no such model folder; zoo convert reads a local folder (a hub "
                         f"model: download it first, e.g. `hf download ID --local-dir DIR`)")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()  # ('~/out' quoted: a folder named '~' in the cwd)
    if from_format and to_format:
        raise ValueError("pass one of --from (into the zoo) and --to (out of the zoo), not both")
    if to_format == "mamba_ssm" and max_shard_size is not None:
        raise ValueError(_MAMBA_SSM_UNSHARDED)
    max_shard_size = "5GB" if max_shard_size is None else max_shard_size
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"the destination {dst} is the source folder; write the converted checkpoint elsewhere")
    if Path(dst).exists() and not Path(dst).is_dir():
        raise ValueError(f"the destination {dst} is a file; give a folder to write the converted checkpoint to")
    check_save_folder(dst)  # (a config.json not of a model, or an adapter: refused before the model is loaded)
    tok = require_tokenizer(tokenizer) if tokenizer else load_folder_tokenizer(src)
    if to_format is None:
        model = load_as_zoo(src, from_format)
        return save_model_folder(model, dst, tok, max_shard_size=max_shard_size)
    if to_format not in FORMATS:
        raise ValueError(f"--to: unknown format {to_format!r}; use one of {', '.join(FORMATS)}")
    model = load_as_zoo(src)
    if to_format == "mamba_ssm":  # written as a zoo folder is: no earlier save's weights left for load_mamba_ssm
        config, state = to_mamba_ssm(model)
        return write_folder(dst, lambda target: _write_mamba_ssm(config, state, target), tok)
    # as a zoo folder: written beside DST and moved in (no partial folder, no earlier save's weights left behind)
    return save_model_folder(_EXPORTERS[to_format](model), dst, tok, max_shard_size=max_shard_size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="zoo convert", description="Convert checkpoints into and out of the zoo with "
                                "identical logits; options without an exact counterpart are errors.")
    p.add_argument("src", help="source model folder")
    p.add_argument("dst", help="destination folder")
    way = p.add_mutually_exclusive_group()
    way.add_argument("--from", dest="from_format", choices=FORMATS,
                     help="format of SRC; DST becomes a zoo folder (detected from config.json when omitted)")
    way.add_argument("--to", dest="to_format", choices=FORMATS,
                     help="DST gets this format; SRC is a zoo folder (or any folder --from reads)")
    p.add_argument("--tokenizer", help="tokenizer to save with DST: 'byte' or a folder (default: SRC's, if any)")
    p.add_argument("--max-shard-size", type=shard_size,
                   help="safetensors shard size: 5GB, 500MB or a number of bytes (default 5GB; not with --to "
                        "mamba_ssm, which writes one pytorch_model.bin)")
    args = p.parse_args(argv)
    if args.to_format == "mamba_ssm" and args.max_shard_size is not None:
        p.error(_MAMBA_SSM_UNSHARDED)
    out = convert(args.src, args.dst, from_format=args.from_format, to_format=args.to_format,
                  tokenizer=args.tokenizer, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


__all__ = ["FORMATS", "UnmappableError", "convert", "detect_format", "from_hf_jamba", "from_hf_llama",
           "from_hf_mamba", "from_hf_mamba2", "from_mamba_ssm", "load_as_zoo", "load_mamba_ssm", "main",
           "save_mamba_ssm", "to_hf_jamba", "to_hf_llama", "to_hf_mamba", "to_hf_mamba2", "to_mamba_ssm"]


if __name__ == "__main__":
    main()
