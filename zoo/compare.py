"""Fair comparison: models matched to one parameter budget, trained and evaluated under one recipe.

``zoo compare CONFIG [--section.field=value ...] [--force] [--only NAME,...] [--accounting-only]``

A comparison config (configs/compare/*.yaml) names the models and one recipe::

    output_dir: runs/compare-demo
    model_overrides: {vocab_size: 260}           # applied to every zoo model
    budget: {params: 150000, count: total, knob: d_model, tolerance: 0.02}
    models:                                      # name -> zoo YAML | {config: YAML or mapping, overrides: {}}
      mamba: configs/models/mamba-tiny.yaml      #   | an inline mapping (model_type: llama for transformers)
    base: configs/models/transformerpp-tiny.yaml # optional: a base config and mixer swaps, also models
    swaps: {gla: {A: {type: gla, n_heads: 2}}}   #   (one-letter keys replace mixers, others are fields)
    recipe: {...}                                # `zoo train` run config less model, output_dir, model_overrides, eval
    train_lengths: [2048, 8192]                  # optional: train every model at each length
    eval: {batches: 8, per_position: {...}, mqar: {...}, passkey: {...}}
    throughput: {seq_lens: [512, 1024, 2048], batch_tokens: 8192, steps: 3}
    accounting: {seq_lens: [2048, 8192]}

For every model it (1) solves its size for the budget, (2) accounts parameters, FLOPs and cache memory,
(3) trains it with ``zoo.train`` on the same rows in the same order (same seeds), (4) evaluates held-out
loss, per-position loss on long documents and passkey retrieval, (5) trains a fresh copy on MQAR (the same
batches for every model) and measures recall, (6) measures training throughput and peak memory over sequence
lengths on the present device (training tokens/s counts real tokens: an unpacked recipe's pads are left
out). Each phase's result is written to ``OUT/<model>/result.json`` as soon as it
finishes, so a comparison interrupted (Ctrl-C, or SIGTERM: exit status 130 either way) loses at most the phase that
was running (training itself resumes
from its last checkpoint, the per-position loss from its last saved document, passkey from its last finished
cell, MQAR's training from its last saved step); a rerun skips what is done unless
``--force``. Models finished by an earlier run
(``--only``) join the table only if their results were made with the current model config, recipe and phase
settings; the others are named at its top. The end of a run writes
``results.md`` (printed), ``results.json`` and the plots ``loss.png`` (training loss against tokens),
``throughput.png`` and ``memory.png`` (against sequence length), ``recall.png`` (MQAR accuracy against
recurrent state size) and ``length.png`` (per-position loss), with the backend each mixer ran (a plot with
nothing to draw is left out, and results.md says why);
``--accounting-only`` writes ``accounting.md`` only (a finished comparison's results stay).

Budget matching (`match_budget`). The knob (``d_model`` in steps of ``multiple_of``, or ``n_layers``: the
number of repeats of the layer pattern) sets the size with the base's proportions (an explicit ffn hidden
size scales with d_model); then one width is adjusted, within half to twice its base, so the count lands within
``tolerance`` of the budget: the SwiGLU/MoE hidden size when the model has an ffn (an explicit MoE hidden size beside a
SwiGLU follows its ratio to a multiple of ``adjust_multiple_of``, the one below or above), else the ``expand`` of the
Mamba / Mamba-2 mixers of its ``mixers`` (a list of layers keeps its widths).
Among the candidates inside the tolerance the one whose adjusted width departs least from the base
proportions wins. ``count: total`` counts every parameter (tied embeddings once); ``non_embedding`` leaves
out the token embedding (and an untied LM head).

Accounting (`account`), forward FLOPs per token of a length-L sequence (B·L tokens cost B·L times this):

- matmuls and convolutions: 2 per weight touched per token, the LM head included (tied or not; 2·V·d);
  an MoE touches its router and top_k of its n_experts experts. Biases, norms, activations, softmax,
  gating and the embedding lookup are left out (elementwise, a few % at these sizes).
- attention: 2·2·L_avg·H·Dh per layer (QKᵀ and PV), L_avg = (1/L)·Σ_{t=1..L} min(t, window) the mean
  number of keys a query sees: (L+1)/2 for full causal attention.
- Mamba-1 selective scan: 9·d_inner·N per layer (the Mamba paper's ~9·B·L·D·N).
- Mamba-2 SSD, chunk Q = min(chunk_size, L), H heads of P channels, G groups of B/C of N states:
  2·Q_avg·G·N (C·Bᵀ in the chunk) + 2·Q_avg·H·P (scores · x) + 2·H·P·N (chunk states) + 2·H·P·N (inter-chunk
  output C·h) per token, Q_avg = (Q+1)/2 the mean number of the chunk's tokens a token sees.
- GLA chunk form, chunk C = min(chunk_size, L), H heads of key width K and value width V: 2·C_avg·H·K
  (intra-chunk scores) + 2·C_avg·H·V (scores · v) + 2·H·K·V (q·S) + 2·H·K·V (state update kᵀv) per token,
  C_avg = (C+1)/2.
- the chunks' quadratic terms are causal as attention's: the pairs above the diagonal are masked, not counted
  (the GPU kernels skip those blocks, as flash attention does; the references compute the dense blocks and mask).
- both chunk forms per token of the padded length ⌈L/Q⌉·Q: the last chunk is computed in full (padded), so these
  terms are scaled by ⌈L/Q⌉·Q / L where Q does not divide L. Below one chunk (L < chunk_size) the GPU kernels
  compute more than Q = L (the Triton SSD a whole chunk, fla a chunk of its own choice), and GLA's reference
  rounds L up to its 16-token sub-chunks.
- decode (one token after L of context): matmuls as above; attention 4·min(L+1, window)·H·Dh; Mamba-1
  9·d_inner·N; Mamba-2 4·H·P·N; GLA 4·H·K·V.
- training (`training_flops_per_token`, zoo.train's and benchmarks/train_throughput.py's MFU): 3 × the forward's
  per token (the backward costs two forwards), recomputation left out; rows trained in chunks (tbptt_chunk) count
  attention at the row's length (its KV cache keeps the row's earlier keys) and the chunk terms at the chunk's.

Memory per sequence: each mixer's ``state_size(L)`` (floats): KV for attention (2·H_kv·Dh·min(L, window − 1):
a sliding layer keeps the last window − 1 keys, the next token's own joins them),
conv + SSM state for Mamba, the matrix state for GLA; bytes at ``accounting.kv_bytes`` per float kept in the model's
dtype (bf16: KV, and the recurrent states of a model with ``decode_state_dtype: model``, its SSM / GLA states, or
transformers' Mamba's conv state) and ``accounting.state_bytes`` per float kept in fp32 (the other recurrent states:
Mamba's and Mamba-2's conv windows always, the SSM / GLA states by default). The cache as decoding keeps it: a prefill
leaves the recurrent states in fp32, which the first step puts in the model's dtype under ``decode_state_dtype: model``.

Measured memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the timed training steps (weights,
gradients, activations, workspace; the warmup steps' one-off buffers left out); on CPU, which has no allocator
statistics, weights + gradients + the tensors autograd saves for backward (counted once per storage): the part of a
step's memory that grows with L.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import difflib
import functools
import gc
import hashlib
import inspect
import itertools
import json
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from zoo.config import ZooConfig
from zoo.config_files import find_config
from zoo.decode import _dict_output
from zoo.layers import scaled_width
from zoo.registry import get_mixer, is_dotted_path

RESULT_FILE = "result.json"
# every plot write_plots may write; one it leaves out is removed from the output folder, as an earlier run's
# recall.png (say) would show results that this run's table has left out
PLOTS = ("loss.png", "throughput.png", "memory.png", "recall.png", "length.png")
# the files of output_dir beside the models' folders
OUTPUT_FILES = ("results.md", "results.json", "accounting.md", "compare_config.yaml", *PLOTS)
# the per-position evaluation's finished documents, in the run folder (zoo.eval.length's partial file), and the seconds
# between its saves; the passkey evaluation's finished cells, beside it
PER_POSITION_PARTIAL, SAVE_EVERY = "per-position.partial.pt", 30.0
PASSKEY_PARTIAL = "passkey.partial.pt"
# the MQAR phase's training (the fresh copy, its optimizer and batch generator, its losses), beside them; kept until
# result.json holds the phase
MQAR_PARTIAL = "mqar.partial.pt"
# the training steps each invocation timed (real tokens and seconds, each less its first step), in the run folder: a
# resumed training's tokens/s is over the steps of every invocation on the device
TRAIN_TIMING = "train-timing.json"


# ---- accounting: parameters and FLOPs ------------------------------------------------------------------------

@dataclass
class LayerCost:
    """One layer's cost. params: all of its parameters (mixer, ffn, norms). weights: weights of the
    matmuls/convolutions one token touches (an MoE's router and top_k experts). seq_flops(L): per-token
    sequence-mixing FLOPs in a forward over L tokens; decode_flops(L): those of one token after L of context.
    kv: attention, whose keys are its cache's (rows trained in chunks still see the row's earlier keys)."""

    mixer: str
    params: int
    weights: float
    seq_flops: Callable[[int], float]
    decode_flops: Callable[[int], float]
    kv: bool = False


def mixer_kwargs(kind: str, spec: dict) -> dict[str, Any]:
    """The mixer's keyword arguments: `spec` (without type/ffn) over the defaults of its constructor."""
    cls = get_mixer(kind)
    out = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
           if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    out.update({k: v for k, v in spec.items() if k not in ("type", "ffn")})
    return out


def causal_keys_mean(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a query sees in causal attention over seq_len tokens: (1/L)·Σ_t min(t, window)."""
    L = seq_len
    if window is None or window >= L:
        return (L + 1) / 2
    return (window * (window + 1) / 2 + (L - window) * window) / L


def chunk_padding(seq_len: int, chunk_size: int) -> float:
    """Tokens a chunked scan computes per real token: ⌈L/Q⌉·Q / L with Q = min(chunk_size, L) (the last chunk is
    padded to Q)."""
    chunk = min(chunk_size, seq_len)
    return math.ceil(seq_len / chunk) * chunk / seq_len


def _mixer_cost(kind: str, d: int, spec: dict) -> tuple[int, float, Callable[[int], float], Callable[[int], float]]:
    """(params, weights touched per token, seq_flops(L), decode_flops(L)) of one mixer (formulas: module doc)."""
    kw = mixer_kwargs(kind, spec)
    if kind == "mamba":
        di, N, K = scaled_width(d, kw["expand"]), kw["d_state"], kw["d_conv"]
        r = math.ceil(d / 16) if kw["dt_rank"] == "auto" else int(kw["dt_rank"])
        weights = d * 2 * di + di * K + di * (r + 2 * N) + r * di + di * d  # in, conv, x, dt, out
        params = weights + di + di * N + di  # dt_proj bias, A_log, D
        params += (2 * di + d) if kw["bias"] else 0
        params += di if kw["conv_bias"] else 0
        params += (r + 2 * N) if kw["inner_norms"] else 0
        return params, weights, lambda L: 9.0 * di * N, lambda L: 9.0 * di * N
    if kind == "mamba2":
        di, N, K, P, G = scaled_width(d, kw["expand"]), kw["d_state"], kw["d_conv"], kw["head_dim"], kw["n_groups"]
        H = di // P
        conv_dim = di + 2 * G * N
        in_width = 2 * di + 2 * G * N + H
        weights = d * in_width + conv_dim * K + di * d
        params = weights + 3 * H + di  # dt_bias, A_log, D; gated norm
        params += (in_width + d) if kw["bias"] else 0
        params += conv_dim if kw["conv_bias"] else 0
        Q = kw["chunk_size"]
        return (params, weights, lambda L: chunk_padding(L, Q) * ((min(Q, L) + 1) * (G * N + H * P) + 4.0 * H * P * N),
                lambda L: 4.0 * H * P * N)
    if kind == "attention":
        H = kw["n_heads"] or max(1, d // 64)
        Hkv = kw["n_kv_heads"] or H
        Dh = kw["head_dim"] or d // H
        window = kw["window"]
        weights = d * H * Dh + 2 * d * Hkv * Dh + H * Dh * d
        return (weights, weights, lambda L: 4.0 * causal_keys_mean(L, window) * H * Dh,
                lambda L: 4.0 * min(L + 1, window or L + 1) * H * Dh)
    if kind == "gla":
        H = kw["n_heads"]
        Kd, Vd, r = scaled_width(d, kw["expand_k"]), scaled_width(d, kw["expand_v"]), kw["gate_low_rank_dim"]
        hk, hv = Kd // H, Vd // H
        weights = 2 * d * Kd + 2 * d * Vd + d * r + r * Kd + Vd * d  # q, k, v, g, gk (low rank), o
        params = weights + Kd + hv  # gk bias, output norm
        C = kw["chunk_size"]
        return (params, weights, lambda L: chunk_padding(L, C) * ((min(C, L) + 1) * H * (hk + hv) + 4.0 * H * hk * hv),
                lambda L: 4.0 * H * hk * hv)
    raise KeyError(kind)


ANALYTIC_MIXERS = ("mamba", "mamba2", "attention", "gla")


def layer_costs(config: ZooConfig) -> list[LayerCost] | None:
    """Per-layer costs of a zoo config from the formulas above; None if a mixer is not one of ANALYTIC_MIXERS."""
    d = config.d_model
    specs = config.layer_specs()
    if any(s["type"] not in ANALYTIC_MIXERS or is_dotted_path(s["type"]) for s in specs):
        return None
    out = []
    for spec in specs:
        params, weights, seq, dec = _mixer_cost(spec["type"], d, spec)
        params += d  # pre-mixer norm
        if spec["ffn"] == "swiglu":
            h = config.ffn_spec()["hidden"]
            params += d + 3 * d * h
            weights += 3 * d * h
        elif spec["ffn"] == "moe":
            moe = config.moe_spec()
            E, h, k = moe["n_experts"], moe["hidden"], moe["top_k"]
            params += d + d * E + E * 3 * d * h
            weights += d * E + k * 3 * d * h
        out.append(LayerCost(spec["type"], params, weights, seq, dec, kv=spec["type"] == "attention"))
    return out


def parameter_counts(config: ZooConfig, model: nn.Module | None = None) -> dict[str, int]:
    """{total, embedding, non_embedding, active} parameters of a zoo config, from the formulas (no model is
    built; a config with a mixer the formulas do not know is instantiated on the meta device instead, or counted on
    `model`, its model already built there). active: what one token uses (an MoE's router and top_k experts only)."""
    d, V = config.d_model, config.vocab_size
    embedding = V * d * (1 if config.tie_embeddings else 2)
    inactive = 0  # the experts a token skips, whatever the mixers
    if config.moe is not None:
        moe = config.moe_spec()
        n_moe = sum(1 for s in config.layer_specs() if s["ffn"] == "moe")
        inactive = n_moe * (moe["n_experts"] - moe["top_k"]) * 3 * d * moe["hidden"]
    costs = layer_costs(config)
    if costs is None:
        model = _meta_model(config) if model is None else model
        total = sum(p.numel() for p in model.parameters())
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
                "active": total - inactive}
    total = embedding + d + sum(c.params for c in costs)  # + final norm
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "active": total - inactive}


def _meta_model(config, given: dict[str, Any] = ()) -> nn.Module:
    """The model of `config` on the meta device; a transformers config whose field values its model cannot be built
    from is a ValueError naming the model type, the error and the numeric fields of `given` (zoo.train's
    model_build_errors)."""
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type)
    from zoo.train import model_build_errors

    with model_build_errors(config, given), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _hf_windows(config) -> list[int | None]:
    """Each layer's attention window (None: full) of a transformers config whose layers are all attention: the
    sliding_window on the layers `layer_types` marks sliding (every layer where it has none, as Mistral).
    Raises for layouts the accounting cannot count from the config and the modules: a MoE (experts outside
    nn.Linear, active parameters unknown) or layers that are not attention (a hybrid such as Jamba)."""
    model_type = getattr(config, "model_type", "")
    if getattr(config, "num_attention_heads", None) is None:
        raise ValueError(f"accounting: transformers model_type {model_type!r} is neither attention "
                         f"(num_attention_heads) nor mamba; give it as a zoo config")
    experts = [getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")]
    if any(isinstance(e, int) and e > 1 for e in experts):
        raise ValueError(f"accounting: transformers model_type {model_type!r} is a mixture of experts, whose active "
                         f"parameters and FLOPs are not counted here; give it as a zoo config (moe: ...)")
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layers_block_type", None) or getattr(config, "layer_types", None)
    if not kinds:
        return [window] * n
    other = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if other or len(kinds) != n:
        raise ValueError(f"accounting: transformers model_type {model_type!r} has layers that are not attention "
                         f"({', '.join(other) or 'layer_types of another length'}); give it as a zoo config")
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _hf_layer_costs(config) -> list[LayerCost]:
    """Sequence-mixing costs of a transformers config: Llama-like attention or Mamba (weights filled later)."""
    n = config.num_hidden_layers
    if getattr(config, "model_type", "") == "mamba":
        di, N = config.intermediate_size, config.state_size
        return [LayerCost("mamba", 0, 0, lambda L: 9.0 * di * N, lambda L: 9.0 * di * N) for _ in range(n)]
    windows = _hf_windows(config)  # first: it names a layout it cannot count, which has no num_attention_heads
    H = config.num_attention_heads
    Dh = getattr(config, "head_dim", None) or config.hidden_size // H
    return [LayerCost("attention", 0, 0, lambda L, w=window: 4.0 * causal_keys_mean(L, w) * H * Dh,
                      lambda L, w=window: 4.0 * min(L + 1, w or L + 1) * H * Dh, kv=True)
            for window in windows]


def module_weights(model: nn.Module) -> float:
    """Weights of the matmuls and convolutions one token touches, counted on the modules: every nn.Linear
    (the LM head included), nn.Conv1d and transformers Conv1D (GPT-2's projections) weight once, an MoE's experts
    scaled by top_k / n_experts."""
    from transformers.pytorch_utils import Conv1D

    from zoo.layers import MoE

    scale: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, MoE):
            for expert_module in module.experts.modules():
                scale[id(expert_module)] = module.top_k / module.n_experts
    total = 0.0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, Conv1D)):
            total += module.weight.numel() * scale.get(id(module), 1.0)
    return total


def _forward_terms(config, model: nn.Module) -> tuple[list[LayerCost], float]:
    """(each layer's cost, matmul weights one token touches) of a config and its (meta) model: the parts of a
    forward's FLOPs per token, 2 · weights + Σ seq_flops(L). Raises ValueError for a transformers config the
    accounting cannot count (`_hf_windows`)."""
    if not isinstance(config, ZooConfig):
        return _hf_layer_costs(config), module_weights(model)
    costs = layer_costs(config)
    if costs is not None:
        return costs, sum(c.weights for c in costs) + config.vocab_size * config.d_model
    # a custom mixer: weights from the modules; a sequence-mixing term for the built-in mixers only (the hybrid's
    # attention layers keep theirs), none for a custom one
    costs = []
    for b, spec in zip(model.model.layers, config.layer_specs()):
        kind = getattr(type(b.mixer), "mixer_type", None)
        seq, dec = (_mixer_cost(kind, config.d_model, spec)[2:] if kind in ANALYTIC_MIXERS
                    else (lambda L: 0.0, lambda L: 0.0))
        costs.append(LayerCost(b.mixer.__class__.__name__, 0, 0, seq, dec, kv=kind == "attention"))
    return costs, module_weights(model)


def training_flops_per_token(config, seq_len: int, chunk_len: int | None = None) -> float:
    """Model FLOPs of training one token of rows of seq_len tokens: 3 × the forward's (`account`; the backward
    costs two forwards: the gradients of the activations and of the weights). Recomputation (gradient
    checkpointing, truncated BPTT's exact mode) is not counted: MFU leaves it out (PaLM, appendix B).

    Args:
        config: a ZooConfig, or a transformers config (Llama-like attention or Mamba).
        seq_len: the rows' length L.
        chunk_len: rows trained in chunks of this many tokens with the state carried (zoo.train's tbptt_chunk):
            attention still attends over the row's earlier keys (its KV cache), so its term stays at seq_len;
            the chunked scans (Mamba-2, GLA) start afresh in every chunk, so theirs are at chunk_len.

    Raises ValueError for a transformers config the accounting cannot count (a MoE, a hybrid).
    """
    costs, weights = _forward_terms(config, _meta_model(config))
    inner = seq_len if chunk_len is None else chunk_len
    return 3.0 * (2.0 * weights + sum(c.seq_flops(seq_len if c.kv else inner) for c in costs))


def account(config, seq_lens: list[int], kv_bytes: int = 2, state_bytes: int = 4, model: nn.Module | None = None
            ) -> dict[str, Any]:
    """Parameters, FLOPs per token and cache memory per sequence of a model config at each length.

    FLOPs by the module doc's formulas, causal throughout: attention's and the chunked scans' (Mamba-2, GLA)
    quadratic terms count the pairs on and below the diagonal only, (n+1)/2 per token for n keys or chunk tokens.

    Args:
        config: a ZooConfig, or a transformers config (Llama-like attention or Mamba).
        seq_lens: lengths L at which FLOPs and memory are given.
        kv_bytes / state_bytes: bytes per cache float kept in the model's dtype (KV, and the recurrent states of
            decode_state_dtype "model": `model_dtype_state_size`) / kept in fp32 (the other recurrent states).
        model: the config's model already built on the meta device (`ModelEntry.meta_model`), else built here.

    Returns:
        dict with params (instantiated on the meta device), embedding_params, non_embedding_params,
        active_params, layers (mixer types), d_model (a transformers config's hidden_size), and per_length rows:
        seq_len, flops_per_token (forward), decode_flops_per_token, kv_floats, state_floats (whatever their dtype),
        cache_mib (per sequence, each float at its dtype's bytes).
    """
    model = _meta_model(config) if model is None else model
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        embed += head.weight.numel()
    costs, weights = _forward_terms(config, model)
    if isinstance(config, ZooConfig):
        active = parameter_counts(config, model)["active"]
        states = [(mixer_state_size(b.mixer), _is_attention(b.mixer), model_dtype_state_size(b.mixer, config))
                  for b in model.model.layers]
    else:
        active = params
        mamba = getattr(config, "model_type", "") == "mamba"
        states = [(fn, not mamba, low) for fn, low in zip(_hf_state_fns(config), _hf_model_dtype_state_fns(config))]
    rows = []
    for L in seq_lens:
        kv = sum(fn(L) for fn, is_kv, _ in states if is_kv)
        state = sum(fn(L) for fn, is_kv, _ in states if not is_kv)
        low = sum(low(L) for _, is_kv, low in states if not is_kv)  # the state floats kept in the model's dtype
        rows.append({
            "seq_len": L,
            "flops_per_token": 2.0 * weights + sum(c.seq_flops(L) for c in costs),
            "decode_flops_per_token": 2.0 * weights + sum(c.decode_flops(L) for c in costs),
            "kv_floats": int(kv), "state_floats": int(state),
            "cache_mib": ((kv + low) * kv_bytes + (state - low) * state_bytes) / 2 ** 20,
        })
    return {"params": params, "embedding_params": embed, "non_embedding_params": params - embed,
            "active_params": active, "matmul_weights": weights, "layers": [c.mixer for c in costs],
            "d_model": config.d_model if isinstance(config, ZooConfig) else getattr(config, "hidden_size", None),
            "per_length": rows}


def _is_attention(mixer: nn.Module) -> bool:
    """Whether the mixer's cache grows with the sequence (KV), judged by its state size at two lengths: 0 and 1, as
    a sliding window of 2 keeps one key from the first token on."""
    size = mixer_state_size(mixer)
    return size(1) != size(0)


def mixer_state_size(mixer: nn.Module) -> Callable[[int], int]:
    """The mixer's `state_size` (floats of cache per sequence after L tokens); 0 for a custom mixer that defines
    neither it nor `init_state` (it keeps no cache). A mixer that keeps a cache but does not size it raises,
    naming it: its memory is not known."""
    size = getattr(mixer, "state_size", None)
    if callable(size):
        return size
    if not hasattr(mixer, "init_state"):
        return lambda seq_len: 0
    name = type(mixer).__name__
    raise ValueError(f"mixer {name} defines init_state (a cache) but no state_size(seq_len), the floats of cache "
                     f"per sequence after seq_len tokens that the accounting of cache memory reads; give {name} "
                     f"state_size(self, seq_len: int) -> int (0 when it keeps no state)")


def model_dtype_state_size(mixer: nn.Module, config) -> Callable[[int], int]:
    """The floats of the mixer's (non-KV) `state_size` that a decoding cache keeps in the model's dtype rather than
    fp32: with decode_state_dtype "model", the recurrent state of a mixer whose step takes it low-precision
    (`low_precision_state`: ZooCache.for_model), its `recurrent_state_size` (Mamba's and Mamba-2's conv windows stay
    fp32); none otherwise. A low_precision_state mixer without recurrent_state_size raises, naming it."""
    if getattr(config, "decode_state_dtype", "float32") != "model" or not getattr(mixer, "low_precision_state", False):
        return lambda seq_len: 0
    size = getattr(mixer, "recurrent_state_size", None)
    if callable(size):
        return size
    name = type(mixer).__name__
    raise ValueError(f"mixer {name} sets low_precision_state (decode_state_dtype 'model' keeps its recurrent state in "
                     f"the model's dtype) but defines no recurrent_state_size(seq_len), the floats of its state_size "
                     f"so kept, which the accounting of cache memory reads; give {name} recurrent_state_size(self, "
                     f"seq_len: int) -> int")


def _hf_state_fns(config) -> list[Callable[[int], int]]:
    """Each layer's cache floats per sequence after L tokens, of a transformers config (see _hf_windows)."""
    if getattr(config, "model_type", "") == "mamba":
        di, N, K = config.intermediate_size, config.state_size, config.conv_kernel
        return [lambda L: di * N + di * K] * config.num_hidden_layers  # its conv state keeps K inputs (zoo's K - 1)
    windows = _hf_windows(config)  # (first, as in _hf_layer_costs)
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    Dh = getattr(config, "head_dim", None) or config.hidden_size // H
    # a sliding layer (transformers' DynamicSlidingWindowLayer) keeps the last window - 1 keys
    return [lambda L, w=window: 2 * Hkv * Dh * min(L, w - 1 if w else L) for window in windows]


def _hf_model_dtype_state_fns(config) -> list[Callable[[int], int]]:
    """Each layer's (non-KV) state floats that a transformers cache keeps in the model's dtype: its Mamba's conv state
    (conv_kernel inputs per channel; the SSM state is fp32); none for attention (its keys and values are KV)."""
    if getattr(config, "model_type", "") == "mamba":
        di, K = config.intermediate_size, config.conv_kernel
        return [lambda L: di * K] * config.num_hidden_layers
    return [lambda L: 0] * config.num_hidden_layers


# ---- budget matching ---------------------------------------------------------------------------------------

def _round_to(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


def _try_config(fields: dict) -> ZooConfig | None:
    """The config of `fields`, or None when it is invalid: the config's own checks, and the options / check_spec
    of a mixer given by import path, which the config leaves to the model build (a candidate width that such a
    mixer refuses is skipped, as one a built-in mixer refuses)."""
    from zoo.config import check_mixer_options, coerce_mixer_options

    try:
        config = ZooConfig(**copy.deepcopy(fields))
        for i, spec in enumerate(config.layer_specs()):
            if is_dotted_path(spec["type"]):  # its options coerced as the model's build does (YAML's 1e-3: a string)
                cls = get_mixer(spec["type"])
                options = coerce_mixer_options(cls, {k: v for k, v in spec.items() if k not in ("type", "ffn")},
                                               f"layers[{i}]")
                check_mixer_options(cls, {**spec, **options}, config.d_model, f"layers[{i}]", f"layers[{i}]")
        return config
    except ValueError:
        return None


def _count(config: ZooConfig, count: str) -> int:
    counts = parameter_counts(config)
    return counts["total"] if count == "total" else counts["non_embedding"]


def _pattern_unit(layers: Any) -> tuple[str, int]:
    """(repeated unit, repeats) of a layer pattern string, for the n_layers knob."""
    if not isinstance(layers, str):
        raise ValueError("budget.knob: n_layers needs `layers` as a pattern string; use knob d_model")
    groups = layers.split()
    if len(groups) > 1:
        if len(set(groups)) != 1:
            raise ValueError(f"budget.knob: n_layers repeats the pattern's groups, but {layers!r} has different "
                             f"groups; make them equal or use knob d_model")
        return groups[0], len(groups)
    letters = groups[0]
    if len(set(letters)) == 1:
        return letters[0], len(letters)
    return letters, 1


def _adjustable(config: ZooConfig, adjust: str, fields: dict) -> str | None:
    """Which width `match_budget` adjusts: 'ffn', 'expand' or None."""
    specs = config.layer_specs()
    has_ffn = any(s["ffn"] in ("swiglu", "moe") for s in specs)
    has_expand = any(s["type"] in ("mamba", "mamba2") for s in specs)
    if adjust == "auto":  # expand is adjusted in the fields' `mixers` (_with_d_inner): a list of layers keeps its own
        in_mixers = not isinstance(fields.get("layers"), (list, tuple)) and any(  # (layers unset: "MM" over them)
            isinstance(m, dict) and m.get("type") in ("mamba", "mamba2") for m in (fields.get("mixers") or {}).values())
        return "ffn" if has_ffn else ("expand" if has_expand and in_mixers else None)
    if adjust == "none":
        return None
    if adjust == "ffn" and not has_ffn:
        raise ValueError("budget.adjust: 'ffn' but the model has no ffn; use expand, auto or none")
    if adjust == "expand" and not has_expand:
        raise ValueError("budget.adjust: 'expand' but the model has no mamba/mamba2 mixer; use ffn, auto or none")
    return adjust


def _ffn_hidden(fields: dict, config: ZooConfig) -> int:
    return int(config.ffn_spec().get("hidden") or config.moe_spec()["hidden"])


def _with_ffn_hidden(fields: dict, hidden: int, base_hidden: int, step: int, moe_hidden: int | None = None) -> dict:
    """fields with the ffn hidden size set (an explicit MoE hidden size scales by the same ratio, to the nearest
    multiple of `step` as the ffn's, or is `moe_hidden` where given; without a dense ffn, `ffn: null` or none, the
    experts' hidden size is the one set)."""
    out = copy.deepcopy(fields)
    ffn = out.get("ffn", "swiglu")  # left out: the default SwiGLU; null: none
    dense = ffn == "swiglu" or (isinstance(ffn, dict) and ffn.get("type", "swiglu") == "swiglu")
    if dense:
        out["ffn"] = dict(ffn if isinstance(ffn, dict) else {"type": "swiglu"}, hidden=hidden)
    if isinstance(out.get("moe"), dict):
        if out["moe"].get("hidden"):
            out["moe"]["hidden"] = moe_hidden or _round_to(out["moe"]["hidden"] * hidden / base_hidden, step)
        elif not dense:  # the experts' default hidden size is the ffn's, and there is none
            out["moe"]["hidden"] = hidden
    return out


def _expand_letters(fields: dict) -> dict[str, float]:
    mixers = fields.get("mixers") or {}
    out = {}
    for letter, spec in mixers.items():
        if spec.get("type") in ("mamba", "mamba2"):
            out[letter] = float(spec.get("expand", 2))
    if not out:
        raise ValueError("budget.adjust: expand needs mamba/mamba2 mixers in `mixers` (pattern configs)")
    if len(set(out.values())) > 1:
        raise ValueError(f"budget.adjust: expand is adjusted for all mamba mixers together, which needs one "
                         f"expand, got {out}; set budget.adjust=none")
    return out


def _with_d_inner(fields: dict, d_inner: int) -> dict:
    out = copy.deepcopy(fields)
    d = out["d_model"]
    for letter in _expand_letters(fields):
        out["mixers"][letter]["expand"] = d_inner / d
    return out


def _scaled(fields: dict, d_model: int, d0: int) -> dict:
    """fields at a new d_model with the base's proportions (explicit ffn / MoE hidden sizes scale with it)."""
    out = copy.deepcopy(fields)
    out["d_model"] = d_model
    ffn = out.get("ffn")
    if isinstance(ffn, dict) and ffn.get("hidden"):
        out["ffn"] = dict(ffn, hidden=_round_to(ffn["hidden"] * d_model / d0, 8))
    if isinstance(out.get("moe"), dict) and out["moe"].get("hidden"):
        out["moe"]["hidden"] = _round_to(out["moe"]["hidden"] * d_model / d0, 8)
    return out


def _primary_candidates(fields: dict, knob: str, multiple_of: int) -> Iterator[tuple[int, dict]]:
    """(knob value, fields) in increasing size, with the base's proportions."""
    if knob == "d_model":
        d0 = fields["d_model"]
        for d in range(multiple_of, 64 * d0 + 1, multiple_of):
            yield d, _scaled(fields, d, d0)
    elif knob == "n_layers":
        unit, n0 = _pattern_unit(fields["layers"])
        for n in range(1, 16 * n0 + 1):
            out = copy.deepcopy(fields)
            out["layers"] = " ".join([unit] * n) if len(unit) > 1 else unit * n
            yield n, out
    else:
        raise ValueError(f"budget.knob: unknown {knob!r}; use d_model or n_layers")


def _adjusted_widths(target: float, base: int, step: int) -> set[int]:
    """The widths `match_budget` tries for an adjusted width of `base` whose count lands on the budget at `target`:
    the multiples of `step` around it, each brought within half to twice the base (the limit a target past it stops at:
    the closest size that limit reaches, which a target out of it lost, leaving the base width alone)."""
    low, high = step * math.ceil(base / 2 / step), step * math.floor(2 * base / step)
    if low > high:
        return set()
    return {min(max(_round_to(target, step) + k * step, low), high) for k in (-1, 0, 1)}


def match_budget(fields: dict, budget: float, *, count: str = "total", knob: str = "d_model",
                 adjust: str = "auto", tolerance: float = 0.02, multiple_of: int = 8,
                 adjust_multiple_of: int = 8) -> tuple[dict, dict[str, Any]]:
    """Resize a zoo model config to `budget` parameters (algorithm in the module docstring).

    Args:
        fields: the zoo config fields (a parsed model YAML).
        budget: target parameter count.
        count: 'total' or 'non_embedding'.
        knob: 'd_model' (steps of multiple_of) or 'n_layers' (repeats of the pattern).
        adjust: 'auto' | 'ffn' | 'expand' | 'none': the width tuned to land within tolerance.
        tolerance: allowed |params / budget - 1|.
        multiple_of: d_model step; adjust_multiple_of: step of the ffn hidden size / Mamba d_inner.

    Returns:
        (the matched fields, info: params, error, knob value, adjusted width and its change from the base).

    Raises:
        ValueError naming budget.* when no candidate lands within the tolerance (with the closest one).
    """
    if count not in ("total", "non_embedding"):
        raise ValueError(f"budget.count: unknown {count!r}; use total or non_embedding")
    base, given = ZooConfig(**copy.deepcopy(fields)), fields
    # the knobs as the config resolves them: d_model given under transformers' name hidden_size or left at its
    # default, layers at its default pattern (each was read from the fields, a KeyError)
    fields = {**{k: v for k, v in fields.items() if k != "hidden_size"}, "d_model": base.d_model,
              "layers": copy.deepcopy(fields.get("layers", base.layers))}
    what = _adjustable(base, adjust, fields)
    best: tuple | None = None  # (outside, deviation, error, knob value, fields, params, adjusted)
    step = adjust_multiple_of  # the adjusted width's step (Mamba-2's d_inner: whole heads of every group too)
    # the fewest and the most parameters of the sizes tried (params, knob value, adjusted width), for the message of
    # a budget out of their reach
    lowest: tuple[int, int, int | None] | None = None
    highest: tuple[int, int, int | None] | None = None

    def reached(n: int, value: int, adjusted: int | None) -> None:
        nonlocal lowest, highest
        lowest = min(lowest or (n, value, adjusted), (n, value, adjusted), key=lambda t: t[0])
        highest = max(highest or (n, value, adjusted), (n, value, adjusted), key=lambda t: t[0])

    for value, primary in _primary_candidates(fields, knob, multiple_of):
        config = _try_config(primary)
        if config is None:
            continue
        n_nominal = _count(config, count)
        first = lowest is None  # the smallest size: its narrowed width is tried too, for the message of a budget below
        reached(n_nominal, value, None)
        if n_nominal > 3 * budget and not first:
            break
        if n_nominal < budget / 3:
            continue
        options: list[tuple[dict, float, int | None]] = [(primary, 0.0, None)]
        if what == "ffn":
            h0 = _ffn_hidden(primary, config)
            step = adjust_multiple_of
            probe = _try_config(_with_ffn_hidden(primary, h0 + 16 * step, h0, step))
            slope = (_count(probe, count) - n_nominal) / (16 * step) if probe is not None else 0
            if slope > 0:
                target = h0 + (budget - n_nominal) / slope
                moe = primary.get("moe")
                m0 = moe.get("hidden") if isinstance(moe, dict) else None
                dense = _try_config(_with_ffn_hidden(primary, h0 + 16 * step, h0, step, m0)) if m0 else None
                dense_slope = (_count(dense, count) - n_nominal) / (16 * step) if dense is not None else 0
                if dense_slope > 0:  # an explicit MoE hidden size beside a dense ffn: it follows the ffn's ratio to a
                    # multiple of the step, the one below or above, and the ffn lands the count (a step of the experts
                    # is n_experts ffn steps: the nearest multiple alone often left the budget out of reach)
                    probe = _try_config(_with_ffn_hidden(primary, h0, h0, step, m0 + 16 * step))
                    moe_slope = (_count(probe, count) - n_nominal) / (16 * step) if probe is not None else 0
                    exact = m0 * target / h0
                    for m in {max(step, step * math.floor(exact / step)), max(step, step * math.ceil(exact / step))}:
                        h_target = h0 + (budget - n_nominal - moe_slope * (m - m0)) / dense_slope
                        for h in _adjusted_widths(h_target, h0, step):
                            options.append((_with_ffn_hidden(primary, h, h0, step, m),
                                            abs(math.log(h / h0)) + abs(math.log(m * h0 / (m0 * h))), h))
                else:
                    for h in _adjusted_widths(target, h0, step):
                        options.append((_with_ffn_hidden(primary, h, h0, step), abs(math.log(h / h0)), h))
        elif what == "expand":
            letters = _expand_letters(primary)
            d = primary["d_model"]
            di0 = round(next(iter(letters.values())) * d)
            step = adjust_multiple_of
            for spec in (primary.get("mixers") or {}).values():
                if spec.get("type") == "mamba2":
                    step = math.lcm(step, int(spec.get("head_dim", 64)) * int(spec.get("n_groups", 1)))
            probe = _try_config(_with_d_inner(primary, di0 + 4 * step))
            slope = (_count(probe, count) - n_nominal) / (4 * step) if probe is not None else 0
            if slope > 0:
                target = di0 + (budget - n_nominal) / slope
                for di in _adjusted_widths(target, di0, step):
                    options.append((_with_d_inner(primary, di), abs(math.log(di / di0)), di))
        for candidate, deviation, adjusted in options:
            config = _try_config(candidate)
            if config is None:
                continue
            n = _count(config, count)
            reached(n, value, adjusted)
            error = n / budget - 1
            key = (abs(error) > tolerance, deviation if abs(error) <= tolerance else abs(error), abs(error))
            if best is None or key < best[0]:
                best = (key, value, candidate, n, adjusted, error)
    if best is None or abs(best[-1]) > tolerance:  # a budget past every size tried, adjusted widths included: said
        # so (a finer step or tolerance, the advice below, would not reach it)
        width = "ffn_hidden" if what == "ffn" else "d_inner"

        def size(n: int, value: int, adjusted: int | None) -> str:
            limit = f" and {width}={adjusted} (budget.adjust keeps it within half to twice the base's)"
            return f"{n:,} {count} parameters with {knob}={value}{limit if adjusted is not None else ''}"

        if lowest is not None and lowest[0] > budget:
            raise ValueError(f"budget.params: {budget:,.0f} is below the smallest size, {size(*lowest)}; raise "
                             f"budget.params or change the model")
        if highest is not None and highest[0] < budget:
            raise ValueError(f"budget.params: {budget:,.0f} is above the largest size tried, {size(*highest)}; lower "
                             f"budget.params or change the knob")
    if best is None:
        raise ValueError(f"budget.params: no {knob} gives a valid model near {budget:,.0f} parameters")
    key, value, matched, n, adjusted, error = best
    # as the config spelled them where the match left them: the fields are a comparison's training key (their
    # fingerprint), and a d_model: 768 or a layers pattern added to them retrained the finished models of a rerun
    if "hidden_size" in given and matched["d_model"] == base.d_model:
        matched = {**{k: v for k, v in matched.items() if k != "d_model"}, "hidden_size": given["hidden_size"]}
    resolved = {"d_model": base.d_model, "layers": base.layers}
    matched = {k: v for k, v in matched.items() if k in given or k not in resolved or v != resolved[k]}
    info = {"budget": budget, "count": count, "params": n, "error": error, "knob": knob, knob: value}
    if adjusted is not None:
        info["adjusted"] = {"ffn_hidden" if what == "ffn" else "d_inner": adjusted}
    if abs(error) > tolerance:  # the settings that give finer sizes (budget.multiple_of steps d_model only)
        fixes = ["a smaller budget.multiple_of" if knob == "d_model" else "knob d_model", "a wider budget.tolerance"]
        if what is None and adjust == "none" and _adjustable(base, "auto", fields) is not None:  # (auto adjusts one)
            fixes.insert(0, "budget.adjust: auto")
        elif what == "ffn" or (what == "expand" and step == adjust_multiple_of):
            width = "ffn hidden size" if what == "ffn" else "d_inner"
            fixes.insert(0, f"a smaller budget.adjust_multiple_of (the {width} moves in steps of {step})")
        raise ValueError(f"budget.tolerance: the closest size has {n:,} parameters ({error:+.1%} from "
                         f"{budget:,.0f}) with {knob}={value}; try {', '.join(fixes)}")
    return matched, info


# ---- the comparison config -----------------------------------------------------------------------------------

@dataclass
class BudgetConfig:
    """Parameter budget: see `match_budget`."""

    params: float
    count: str = "total"
    knob: str = "d_model"
    adjust: str = "auto"
    tolerance: float = 0.02
    multiple_of: int = 8
    adjust_multiple_of: int = 8


@dataclass
class MQARConfig:
    """A fresh copy of each model is trained for `steps` on MQAR batches (the same for every model: one
    generator seeded with `seed`) at (seq_len, n_kv), then evaluated on eval_seq_lens x eval_n_kv (default:
    the training cell) with eval_samples fresh rows. vocab_size must not exceed the models'. steps 0 evaluates
    the text-trained model instead. The training is saved every `checkpoint_every` steps (0: only when stopped)
    and when SIGTERM or Ctrl-C stops it; a rerun continues from there (checkpoint_every changes no result)."""

    steps: int = 200
    batch_size: int = 32
    seq_len: int = 64
    n_kv: int = 4
    vocab_size: int = 256
    power_a: float = 0.01
    lr: float = 3e-3
    warmup_steps: int = 10
    eval_seq_lens: list[int] | None = None
    eval_n_kv: list[int] | None = None
    eval_samples: int = 256
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class PerPositionConfig:
    """Per-position loss on n_docs long documents of the built-in corpus (held-out files first), max_len
    tokens each, run chunk_size tokens at a time with the cache carried."""

    n_docs: int = 4
    max_len: int = 4096
    chunk_size: int | None = 1024
    batch_size: int = 1


@dataclass
class PasskeyConfig:
    """Passkey retrieval (zoo.eval.passkey) of the text-trained model."""

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    n_samples: int = 2
    prefill_chunk_size: int | None = None
    max_new_tokens: int = 8


@dataclass
class EvalSection:
    """Held-out loss over `batches` batches of micro_batch_size rows (default: the recipe's) of the recipe's
    eval split; the optional evaluations below."""

    batches: int = 8
    micro_batch_size: int | None = None
    per_position: PerPositionConfig | None = None
    mqar: MQARConfig | None = None
    passkey: PasskeyConfig | None = None


@dataclass
class ThroughputConfig:
    """Training-step (forward + backward) tokens/s and peak memory at each seq_len on random tokens, with
    batch_size rows or batch_tokens // L rows (at least 1; 8192 tokens when neither is given); the median of
    `steps` timed steps after `warmup`."""

    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    batch_size: int | None = None
    batch_tokens: int | None = None
    warmup: int = 1
    steps: int = 3

    def __post_init__(self):
        if self.batch_size is None and self.batch_tokens is None:  # a default that a given batch_size replaces
            self.batch_tokens = 8192


@dataclass
class AccountingConfig:
    """Lengths at which FLOPs and cache memory are tabulated; bytes per cache float kept in the model's dtype (KV, and
    the recurrent states of decode_state_dtype "model") / in fp32 (the other recurrent states)."""

    seq_lens: list[int] = field(default_factory=lambda: [2048, 8192])
    kv_bytes: int = 2
    state_bytes: int = 4


@dataclass
class CompareConfig:
    """A comparison (module docstring). recipe: a `zoo train` run config without model, output_dir, model_overrides
    and eval (the comparison sets those)."""

    models: dict[str, Any] = field(default_factory=dict)
    base: Any = None
    swaps: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    budget: BudgetConfig | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    train_lengths: list[int] | None = None
    eval: EvalSection = field(default_factory=EvalSection)
    throughput: ThroughputConfig | None = field(default_factory=ThroughputConfig)
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    output_dir: str = "runs/compare"
    cpu_threads: int | None = None
    title: str = "comparison"


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> tuple[CompareConfig, Path]:
    """Read a comparison config and apply ``section.field=value`` overrides (values parsed as YAML).

    Returns (the config, the folder relative paths in it are tried against after the working directory)."""
    from zoo.train import _build, read_yaml

    cfg = _build(CompareConfig, read_yaml(path, overrides, kind="compare"), "")
    validate_compare_config(cfg)
    return cfg, find_config(path, "compare").resolve().parent


def validate_compare_config(cfg: CompareConfig) -> None:
    """Raise ValueError naming the field for impossible settings."""
    if not cfg.models and not cfg.swaps:
        raise ValueError("models: empty; name at least one model (or a base and swaps)")
    if not cfg.output_dir:  # (--output_dir=$OUT with OUT unset) wrote the results into the working directory
        raise ValueError("output_dir: empty; name the results directory")
    if cfg.swaps and cfg.base is None:
        raise ValueError("swaps: need `base:` (the config the mixers are swapped in)")
    if cfg.base is not None and not cfg.swaps:  # it was never read: the comparison left it out without a word
        raise ValueError("base: is the config that swaps start from, but there are no swaps; add swaps (NAME: null "
                         "compares the base itself) or name it under models")
    clash = set(cfg.models) & set(cfg.swaps)
    if clash:
        raise ValueError(f"swaps: names {sorted(clash)} are also in models; rename one")
    for where, names in (("models", cfg.models), ("swaps", cfg.swaps)):
        for name in names:  # a model's name is its results folder: one path component
            if not isinstance(name, str):  # (YAML's 5, 1.5 or yes: `output_dir / 5` failed in a TypeError traceback,
                # and --only 5 was refused as an unknown model)
                raise ValueError(f"{where}.{name}: YAML reads this model name as the {type(name).__name__} "
                                 f"{name!r}, but a model name names its results folder; quote it")
            if not str(name).strip() or any(c in str(name) for c in "/\\") or str(name) in (".", ".."):
                raise ValueError(f"{where}.{name}: a model name names its results folder; use a name that is not "
                                 f"blank, '.' or '..', without '/' or '\\'")
            if str(name) in OUTPUT_FILES:  # its folder took the file's path: writing the file failed, mid-run
                raise ValueError(f"{where}.{name}: a model name names its results folder, and output_dir's "
                                 f"{name} is the comparison's own file; rename the model")
    if cfg.model_overrides:  # a typo here would be reported at the first model, as that model's field
        ZooConfig.check_fields(cfg.model_overrides, "model_overrides: ")
    for key in ("model", "output_dir"):
        if key in cfg.recipe:
            raise ValueError(f"recipe.{key}: set per model by the comparison; remove it from the recipe")
    if "model_overrides" in cfg.recipe:  # training would apply it, but the budget and the accounting would not
        raise ValueError("recipe.model_overrides: the comparison's models take their fields before budget matching "
                         "and accounting; move it to the top-level model_overrides (every model) or to "
                         "models.NAME.overrides")
    if "eval" in cfg.recipe:  # training runs with eval.every 0: the settings would be dropped
        raise ValueError("recipe.eval: the comparison evaluates every model itself on the same rows; remove it from "
                         "the recipe and set the top-level eval section (eval.batches, eval.micro_batch_size, ...)")
    if cfg.budget is not None:
        b = cfg.budget
        if not b.params > 0:
            raise ValueError(f"budget.params: must be > 0, got {b.params}")
        if b.count not in ("total", "non_embedding"):
            raise ValueError(f"budget.count: unknown {b.count!r}; use total or non_embedding")
        if b.knob not in ("d_model", "n_layers"):
            raise ValueError(f"budget.knob: unknown {b.knob!r}; use d_model or n_layers")
        if b.adjust not in ("auto", "ffn", "expand", "none"):
            raise ValueError(f"budget.adjust: unknown {b.adjust!r}; use auto, ffn, expand or none")
        if not 0 < b.tolerance < 1:
            raise ValueError(f"budget.tolerance: must be in (0, 1), got {b.tolerance}")
        if b.multiple_of < 1 or b.adjust_multiple_of < 1:
            raise ValueError("budget.multiple_of / adjust_multiple_of: must be >= 1")
    if cfg.train_lengths is not None and (not cfg.train_lengths or any(L < 2 for L in cfg.train_lengths)):
        raise ValueError(f"train_lengths: a non-empty list of lengths >= 2, got {cfg.train_lengths}")
    if cfg.train_lengths is not None and len(set(cfg.train_lengths)) < len(cfg.train_lengths):
        raise ValueError(f"train_lengths: each length once, got {cfg.train_lengths}")
    e = cfg.eval
    if e.batches < 1:
        raise ValueError(f"eval.batches: must be >= 1, got {e.batches}")
    # the evaluations run after the first model's training: a value they refuse would end the run there
    positive = [("eval.micro_batch_size", e.micro_batch_size)]
    if e.per_position is not None:
        pp = e.per_position
        positive += [("eval.per_position.n_docs", pp.n_docs), ("eval.per_position.chunk_size", pp.chunk_size),
                     ("eval.per_position.batch_size", pp.batch_size)]
        if pp.max_len < 2:
            raise ValueError(f"eval.per_position.max_len: must be >= 2 (a loss needs a token before it), got "
                             f"{pp.max_len}")
    if e.passkey is not None:
        pk = e.passkey
        if not pk.lengths or not pk.depths:
            raise ValueError(f"eval.passkey: lengths and depths need at least one value each, got lengths "
                             f"{pk.lengths} and depths {pk.depths}")
        if any(n < 1 for n in pk.lengths):  # (numpy's "expected non-negative integer", seeding the keys, named none)
            raise ValueError(f"eval.passkey.lengths: lengths must be >= 1, got {pk.lengths}")
        bad = [d for d in pk.depths if not 0 <= d <= 1]
        if bad:
            raise ValueError(f"eval.passkey.depths: {bad[0]:g} is not a fraction of the filler in [0, 1]")
        positive += [("eval.passkey.n_samples", pk.n_samples), ("eval.passkey.max_new_tokens", pk.max_new_tokens),
                     ("eval.passkey.prefill_chunk_size", pk.prefill_chunk_size)]
    for name, value in positive:
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if e.mqar is not None:
        m = e.mqar
        if m.steps < 0 or m.batch_size < 1 or m.eval_samples < 1 or m.checkpoint_every < 0:
            raise ValueError("eval.mqar: steps >= 0, batch_size >= 1, eval_samples >= 1 and checkpoint_every >= 0")
        if not 0 < m.lr < math.inf:  # (inf trained every model to NaN, recall 0 for each)
            raise ValueError(f"eval.mqar.lr: must be a finite number > 0, got {m.lr}")
        if m.warmup_steps < 0:  # (it started the cosine partway, at a lower rate, without a word)
            raise ValueError(f"eval.mqar.warmup_steps: must be >= 0, got {m.warmup_steps}")
        for name in ("eval_seq_lens", "eval_n_kv"):  # [] was taken as unset: the training cell alone, without a word
            if getattr(m, name) == []:
                raise ValueError(f"eval.mqar.{name}: an empty list; give at least one value, or leave it unset (null) "
                                 f"for the training cell's")
        if not 0 <= m.seed < 2 ** 32:  # as train.seed: one past torch's range failed after the first model trained
            raise ValueError(f"eval.mqar.seed: must be in [0, 2**32), got {m.seed}")
        if 4 * m.n_kv > m.seq_len:
            raise ValueError(f"eval.mqar.seq_len: needs >= 4 * n_kv = {4 * m.n_kv}, got {m.seq_len}")
        # the task's own checks (keys from half the vocabulary, the gap law's exponent) before any model trains;
        # evaluation skips the cells it cannot build, but needs one
        problem = _mqar_cell_error(m.seq_len, m.n_kv, m)
        if problem is None:
            cells = [(L, n) for L in m.eval_seq_lens or [m.seq_len] for n in m.eval_n_kv or [m.n_kv]]
            errors = [_mqar_cell_error(L, n, m) for L, n in cells]
            if all(errors):
                problem = f"no cell of eval_seq_lens x eval_n_kv: {errors[0]}"
        if problem is not None:
            raise ValueError(f"eval.mqar: {problem}; change n_kv, vocab_size, power_a or the eval grid")
    if cfg.throughput is not None:
        t = cfg.throughput
        if not t.seq_lens or t.steps < 1 or t.warmup < 0:
            raise ValueError("throughput: needs seq_lens, steps >= 1 and warmup >= 0")
        if any(L < 1 for L in t.seq_lens):
            raise ValueError(f"throughput.seq_lens: lengths must be >= 1, got {t.seq_lens}")
        if t.batch_size is not None and t.batch_tokens is not None:
            raise ValueError("throughput: set one of batch_size and batch_tokens, not both")
        for name, value in (("batch_size", t.batch_size), ("batch_tokens", t.batch_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"throughput.{name}: must be >= 1, got {value}")
    if any(L < 1 for L in cfg.accounting.seq_lens):
        raise ValueError(f"accounting.seq_lens: lengths must be >= 1, got {cfg.accounting.seq_lens}")
    for name in ("kv_bytes", "state_bytes"):  # 0 gave a cache of 0 MiB, a negative one a negative cache
        if getattr(cfg.accounting, name) < 1:
            raise ValueError(f"accounting.{name}: bytes per float must be >= 1 (2 for bf16, 4 for fp32), got "
                             f"{getattr(cfg.accounting, name)}")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 1:
        raise ValueError(f"cpu_threads: must be >= 1, got {cfg.cpu_threads}")
    try:  # zoo.train names its own fields (train.max_steps), which sit under recipe here
        base = _recipe_config(cfg.recipe)
    except ValueError as e:  # (its suggestion too: 'did you mean train.max_steps?' named a field the comparison
        # config does not have, as the override --train.max_steps is not one of zoo compare's)
        raise ValueError(f"recipe.{e}".replace("; did you mean ", "; did you mean recipe.", 1)) from None
    micro = base.train.micro_batch_size * base.data.seq_len
    for L in cfg.train_lengths or []:  # each length's recipe, before any model trains (zoo.train checks it at start)
        try:
            run = _recipe_config(_recipe_at(cfg, L))
        except ValueError as e:
            raise ValueError(f"train_lengths: at L={L}: {e}") from None
        rows = run.train.micro_batch_size * L
        if run.train.batch_tokens is not None and run.train.batch_tokens % rows:
            raise ValueError(f"train_lengths: at L={L}: recipe.train.batch_tokens {run.train.batch_tokens} is not a "
                             f"multiple of micro_batch_size · seq_len = {run.train.micro_batch_size} · {L}")
        if run.train.batch_tokens is None and rows != micro and len(set(cfg.train_lengths)) > 1:
            # the lengths would train on different tokens per step (one length alone: every model on the same)
            common = math.lcm(*(max(1, micro // n) * n for n in cfg.train_lengths))
            # (zoo train refuses batch_tokens beside grad_accum: the advice alone was refused next)
            instead = " in place of recipe.train.grad_accum (unset it)" if base.train.grad_accum is not None else ""
            raise ValueError(f"train_lengths: at L={L}: a micro-batch holds {run.train.micro_batch_size} · {L} = "
                             f"{rows} tokens, not the recipe's {base.train.micro_batch_size} · {base.data.seq_len} = "
                             f"{micro}, so the lengths would train on different tokens per step; set "
                             f"recipe.train.batch_tokens to a multiple of {common}{instead}")


def _mqar_cell_error(seq_len: int, n_kv: int, m: MQARConfig) -> str | None:
    """Why MQAR rows cannot be built at (seq_len, n_kv) with m's vocabulary and power_a (None: they can)."""
    from zoo.data.synthetic import mqar_batch

    try:
        mqar_batch(1, seq_len, n_kv, m.vocab_size, m.power_a)
    except ValueError as e:
        return str(e)
    return None


# ---- models of a comparison ------------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """One model of the comparison: its name, its config fields (zoo, or with a transformers model_type),
    and how it was matched to the budget."""

    name: str
    fields: dict[str, Any]
    is_zoo: bool
    match: dict[str, Any] | None = None
    # (the fields it was built from, the model on the meta device): see meta_model
    _meta: tuple[dict[str, Any], nn.Module] | None = field(default=None, init=False, repr=False, compare=False)

    def meta_model(self) -> nn.Module:
        """The model of its config on the meta device (`_meta_model`), built once for its fields: the checks of
        resolve_models and _check_inputs and the accounting of _check_inputs and run_model built it four times (a
        transformers model; three a zoo model). Built anew where the fields changed (match_budget replaces them)."""
        if self._meta is None or self._meta[0] != self.fields:
            model = _meta_model(self.config(), () if self.is_zoo else self.fields)
            self._meta = (copy.deepcopy(self.fields), model)
        return self._meta[1]

    def config(self):
        if self.is_zoo:
            return ZooConfig(**copy.deepcopy(self.fields))
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        fields = dict(self.fields)
        model_type = fields.pop("model_type")
        if model_type not in CONFIG_MAPPING:  # transformers' own message lists every model type it knows
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"model_type: {model_type!r} is not a transformers model type{hint}")
        from zoo.train import config_field_errors

        with config_field_errors():  # (a hidden size not a multiple of the heads ended the comparison in a traceback)
            return AutoConfig.for_model(model_type, **fields)


def _find(path: str, folder: Path, where: str) -> Path:
    """A model config named in a comparison config: from the working directory, from the comparison config's folder,
    else among the packaged model configs (zoo.config_files' rule)."""
    if not Path(path).expanduser().is_file() and (folder / path).is_file():
        return folder / path
    try:
        return find_config(path, "models")
    except FileNotFoundError as e:
        raise ValueError(f"{where}: no such model config {path!r} (tried the working directory, {folder} and "
                         f"the packaged configs: {e})") from None


def _read_fields(spec: Any, folder: Path, where: str) -> dict[str, Any]:
    if isinstance(spec, str):
        path = _find(spec, folder, where)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:  # (yaml's message named "<unicode string>": not which model's file)
            raise ValueError(f"{where}: {spec!r} is not valid YAML ({path}): {e}") from None
        if not isinstance(data, dict):  # an empty file too: it compared the default 768-wide model
            raise ValueError(f"{where}: {spec!r} does not hold a mapping of config fields"
                             f"{' (an empty file)' if data is None else ''}")
        return data
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    raise ValueError(f"{where}: expected a model YAML path or a mapping of config fields, got {spec!r}")


def model_names(cfg: CompareConfig) -> list[str]:
    """The comparison's model names, in the config's order (models, then swaps)."""
    return [*cfg.models, *cfg.swaps]


def resolve_models(cfg: CompareConfig, folder: Path, only: list[str] | None = None) -> list[ModelEntry]:
    """The comparison's models (those named in `only`, else all) with overrides applied and, for zoo models, matched
    to the budget. A model left out of `only` is neither read nor checked: a problem in its entry refused a run of
    the others (--only)."""
    from zoo.data.text import SPECIAL_IDS
    from zoo.train import check_config_fields, check_special_ids

    raw: list[tuple[str, dict, dict, bool]] = []  # name, fields, overrides, match
    for name, spec in cfg.models.items():
        if only is not None and name not in only:
            continue
        where = f"models.{name}"
        if isinstance(spec, dict) and "config" in spec:
            unknown = set(spec) - {"config", "overrides", "match"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use config, overrides, match")
            overrides = spec.get("overrides") or {}
            if not isinstance(overrides, dict):
                raise ValueError(f"{where}.overrides: expected a mapping of config fields, got {overrides!r}")
            match = spec.get("match", True)
            if not isinstance(match, bool):  # a quoted "false" was true
                raise ValueError(f"{where}.match: expected true or false, got {match!r}")
            raw.append((name, _read_fields(spec["config"], folder, where), dict(overrides), match))
        else:
            raw.append((name, _read_fields(spec, folder, where), {}, True))
    swaps = {name: swap for name, swap in cfg.swaps.items() if only is None or name in only}
    if swaps:
        base = _read_fields(cfg.base, folder, "base")
        for name, swap in swaps.items():
            if swap is not None and not isinstance(swap, dict):
                raise ValueError(f"swaps.{name}: expected a mapping of mixer letters and fields, got {swap!r}")
            fields = copy.deepcopy(base)
            for key, value in (swap or {}).items():
                if len(key) == 1:  # a pattern letter: replace that mixer
                    fields.setdefault("mixers", {})[key] = value
                else:
                    fields[key] = value
            # a letter the pattern does not use would leave this model the base itself, under another name
            layers = fields.get("layers")
            used = set("".join(layers.split())) if isinstance(layers, str) else set()
            for key in (swap or {}):
                if len(key) == 1 and key not in used:
                    raise ValueError(f"swaps.{name}.{key}: the layer pattern {layers!r} has no letter {key!r}, so "
                                     f"the swap would change nothing; use one of its letters "
                                     f"({', '.join(sorted(used)) or 'none: layers is not a pattern string'}) or "
                                     f"set layers in the swap")
            raw.append((name, fields, {}, True))
    entries = []
    for name, fields, overrides, match in raw:
        model_type = fields.get("model_type", "zoo")
        is_zoo = model_type == "zoo"
        if is_zoo:
            fields.pop("model_type", None)
            fields = {**fields, **cfg.model_overrides, **overrides}
        else:
            fields = {**fields, **overrides}
        try:
            if is_zoo:
                ZooConfig.check_fields(fields)
            entry = ModelEntry(name, fields, is_zoo)
            config = entry.config()
            if not is_zoo:  # a misspelled field was kept as an attribute: the default model was matched and accounted
                # (--accounting-only), and its training refused it only at its turn, after the models before it trained
                check_config_fields(config, fields, "")
            # a special id its fields name past its vocabulary: a Llama's pad failed the accounting's build
            # ('AssertionError: Padding_idx must be within num_embeddings', a traceback), another was refused by
            # zoo.train only at the model's turn, after the models before it trained
            check_special_ids(config, [n for n in SPECIAL_IDS if n in fields])
            if not is_zoo:  # a field value transformers' checks let through (a Mamba's state_size -1) failed the
                # accounting's build in torch's traceback ("Trying to create tensor with negative dimension -1"),
                # naming no model
                entry.meta_model()
        except (ValueError, TypeError) as e:
            raise ValueError(f"models.{name}: {e}") from e
        if is_zoo and cfg.budget is not None and match:
            b = cfg.budget
            try:
                entry.fields, entry.match = match_budget(
                    fields, b.params, count=b.count, knob=b.knob, adjust=b.adjust, tolerance=b.tolerance,
                    multiple_of=b.multiple_of, adjust_multiple_of=b.adjust_multiple_of)
            except ValueError as e:
                raise ValueError(f"models.{name}: {e}") from e
        entries.append(entry)
    return entries


# ---- results on disk -----------------------------------------------------------------------------------------

def _write_json_atomic(path: Path, obj: Any) -> None:
    from zoo.eval.common import write_text_atomically

    write_text_atomically(json.dumps(obj, indent=1, default=_json_default) + "\n", path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _phase_done(data: dict[str, Any], phase: str, key: str) -> bool:
    """Whether a model's result data holds `phase`, recorded with the settings fingerprint `key`."""
    return data.get("phase_keys", {}).get(phase) == key and phase in data.get("phases", {})


def _changed_message(names: list[str], out: Path) -> str:
    return (f"{out}: the results of {', '.join(names)} were made with another model config or recipe; redo them "
            f"with --force --only {','.join(names)} (--force alone redoes every model), or choose another output_dir")


class ModelRecord:
    """OUT/<model>/result.json: the model's phases, each saved as soon as it finishes with the fingerprint of
    the settings it depends on (a phase whose settings changed is redone; a model whose config or recipe
    changed is refused, since its training checkpoints belong to the old one)."""

    def __init__(self, folder: Path, fingerprints: list[str], header: dict[str, Any]):
        """fingerprints: the model's (`_model_fingerprints`); results under another are refused."""
        self.folder, self.path = folder, folder / RESULT_FILE
        data = json.loads(self.path.read_text()) if self.path.is_file() else None
        if data is not None and data.get("fingerprint") not in fingerprints:
            raise ValueError(_changed_message([folder.name], folder.parent))
        self.data = data or {"phases": {}, "phase_keys": {}}
        self.data["fingerprint"] = fingerprints[0]
        self.data.update(header)
        self.save()

    def needs(self, phase: str, key: str) -> bool:
        return not _phase_done(self.data, phase, key)

    def get(self, phase: str) -> dict[str, Any] | None:
        return self.data["phases"].get(phase)

    def put(self, phase: str, result: dict[str, Any], key: str, seconds: float | None = None) -> None:
        self.data["phases"][phase] = result
        self.data["phase_keys"][phase] = key
        if seconds is not None:  # wall time of the invocation that ran the phase (a resumed one: its part)
            self.data.setdefault("phase_seconds", {})[phase] = round(seconds, 1)
        self.save()

    def run(self, phase: str, key: str, message: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run a phase, print its wall time and save it with the result."""
        print(message, file=sys.stderr)
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        print(f"{message.split('] ', 1)[-1]}: {seconds:.0f} s", file=sys.stderr)
        self.put(phase, result, key, seconds)

    def save(self) -> None:
        _write_json_atomic(self.path, self.data)


# ---- phases ---------------------------------------------------------------------------------------------------

def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _backend_report(model, device: torch.device) -> dict[str, str]:
    """Which kernel each mixer runs, resolved under the phase's autocast: attention picks its kernel by dtype, and
    resolved in fp32 a bf16 run on a GPU was reported as sdpa_efficient where it ran cuDNN or FlashAttention."""
    if not hasattr(model, "backend_report"):
        return {}
    with _autocast(device):
        return model.backend_report()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _recipe_config(recipe: dict[str, Any]):
    """The recipe as zoo.train reads it (defaults filled in), around a model given as a mapping of config fields, as
    train_config gives each model: an unset tokenizer is then 'byte' (a string model "x" made it the hub id "x", an
    unset tokenizer being the model's own)."""
    from zoo.train import config_from_dict

    return config_from_dict({**copy.deepcopy(recipe), "model": {}, "output_dir": "x"})


def _lengths(cfg: CompareConfig) -> list[int]:
    recipe = _recipe_config(cfg.recipe)
    return list(cfg.train_lengths or [recipe.data.seq_len])


def _recipe_at(cfg: CompareConfig, seq_len: int) -> dict[str, Any]:
    """The recipe at one training length: micro-batch rows scaled so a micro-batch keeps its tokens (with
    train.batch_tokens every length trains on the same tokens per step)."""
    recipe = copy.deepcopy(cfg.recipe)
    base = _recipe_config(recipe)
    data = dict(recipe.get("data") or {})
    data["seq_len"] = seq_len
    train = dict(recipe.get("train") or {})
    if seq_len != base.data.seq_len:
        train["micro_batch_size"] = max(1, base.train.micro_batch_size * base.data.seq_len // seq_len)
    return {**recipe, "data": data, "train": train}


def train_config(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path):
    """The `zoo train` config of one model at one training length: the recipe at that length (`_recipe_at`) with
    the model, the run directory, CSV logging (besides the recipe's log.trackers), a final checkpoint, and no
    periodic evaluation (the comparison evaluates every model on the same rows itself)."""
    from zoo.train import config_from_dict

    recipe = _recipe_at(cfg, seq_len)
    data, train = recipe["data"], recipe["train"]
    log = dict(recipe.get("log") or {})
    log["trackers"] = list(dict.fromkeys([*(log.get("trackers") or []), "csv"]))  # the loss curves read metrics.csv
    checkpoint = dict(recipe.get("checkpoint") or {}, final=True)  # evaluation loads the final weights
    model = dict(entry.fields)
    if entry.is_zoo:
        model["model_type"] = "zoo"
    return config_from_dict({**recipe, "model": model, "output_dir": str(run_dir), "data": data,
                             "train": train, "eval": {"every": 0}, "log": log, "checkpoint": checkpoint})


def read_curve(metrics_csv: Path) -> list[dict[str, float]]:
    """(step, tokens, loss) rows of a run's metrics.csv, the last row of each step (a resumed run relogs)."""
    if not metrics_csv.is_file():
        return []
    rows: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("loss") and row.get("tokens"):
                step = int(float(row["step"]))
                rows[step] = {"step": step, "tokens": float(row["tokens"]), "loss": float(row["loss"])}
                if row.get("peak_mem_gib"):
                    rows[step]["peak_mem_gib"] = float(row["peak_mem_gib"])
    return [rows[s] for s in sorted(rows)]


def _timing_segments(timing: Path) -> list[dict[str, Any]]:
    """The timed segments of train-timing.json (one per invocation that trained steps: device, tokens, seconds), []
    where there is none. A file that is no such list (cut short, edited by hand) is removed with a warning, its
    segments dropped: read in phase_train's `finally`, its error replaced the exception in flight (a Ctrl-C's
    KeyboardInterrupt), and after a finished training a refusal would cost the timing it guards (a rerun resumes with
    no step left to time)."""
    if not timing.is_file():
        return []
    try:
        segments = json.loads(timing.read_text())
    except (OSError, ValueError) as e:  # (json's error, or UnicodeDecodeError: a ValueError)
        why = f"not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else f"cannot be read ({e})"
    else:
        if isinstance(segments, list) and all(
                isinstance(s, dict) and isinstance(s.get("device"), str)
                and all(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)
                        for k in ("tokens", "seconds")) for s in segments):
            return segments
        why = (f"holds a JSON {type(segments).__name__}, not a list of timed segments (device, tokens, seconds)"
               if not isinstance(segments, list) else "not a list of timed segments (device, tokens, seconds)")
    import warnings

    warnings.warn(f"{timing}: {why}; the train tok/s of the steps it timed is dropped (timed over this and later "
                  f"invocations' steps)", stacklevel=2)
    with contextlib.suppress(OSError):  # (an error here would replace the exception in flight too)
        timing.unlink(missing_ok=True)
    return []


def phase_train(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path) -> dict[str, Any]:
    """Train (or resume) one model at one length with zoo.train; raises KeyboardInterrupt if it was stopped."""
    from zoo.train import latest_checkpoint, train

    tcfg = train_config(cfg, entry, seq_len, run_dir)
    stamps: list[float] = []
    real: list[int] = []  # each step's tokens that are not pads (unpacked rows are padded)

    def on_step(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        real.append(metrics["real_tokens"])

    timing, device_name = run_dir / TRAIN_TIMING, _device_name()
    if latest_checkpoint(run_dir) is None:  # a training from its first step: the steps an earlier invocation timed
        # (one stopped before its first checkpoint, or whose checkpoints were removed) are trained again, not resumed
        timing.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        result = train(tcfg, resume="auto", on_step=on_step)
    finally:  # an interrupted invocation's steps too: timed over the resumed steps alone, a training resumed for its
        # last step had none to time (train tok/s "—"), and one resumed for a few steps was timed over those few
        segments = _timing_segments(timing)
        if len(stamps) > 1:
            segments.append({"device": device_name, "tokens": sum(real[1:]), "seconds": stamps[-1] - stamps[0]})
            _write_json_atomic(timing, segments)
    wall = time.perf_counter() - start
    if result.stopped:
        raise KeyboardInterrupt(f"training of {entry.name} stopped at step {result.step}")
    info = json.loads((run_dir / "run_info.json").read_text())
    curve = read_curve(run_dir / "metrics.csv")
    peaks = [r["peak_mem_gib"] for r in curve if "peak_mem_gib" in r]
    tail = [r["loss"] for r in curve[-3:]]
    checkpoint = Path(result.checkpoint).relative_to(run_dir.parent)  # the model folder may move
    # the first step of each invocation pays one-time costs (kernel builds, allocator warm-up): time the steps after
    # it; real tokens (an unpacked recipe's pads are no work, and models are compared on the same rows); the steps
    # timed on this device (a training resumed elsewhere is that device's)
    here = [s for s in segments if s["device"] == device_name]
    seconds = sum(s["seconds"] for s in here)
    tps = sum(s["tokens"] for s in here) / seconds if seconds > 0 else None
    return {"seq_len": seq_len, "steps": result.step, "tokens": result.tokens, "wall_s": wall,
            "tokens_per_step": info["tokens_per_step"], "train_tokens_per_s": tps,
            "peak_mem_gib": max(peaks) if peaks else None, "final_train_loss": sum(tail) / len(tail) if tail else None,
            "curve": curve, "checkpoint": str(checkpoint), "backend": info.get("backend", {}),
            "precision": info.get("precision"), "device": info.get("device"), "device_name": _device_name()}


def _load_trained(checkpoint: str | Path, device: torch.device):
    """A model's trained weights (its final checkpoint's model folder) on `device`; a weights file there that cannot
    be read (cut short by a full disk or a copy) is refused naming it, where safetensors' traceback named none."""
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401
    from zoo.hub import readable_weights

    folder = Path(checkpoint) / "model"
    with readable_weights(folder, fix="rerun the comparison with --force (and --only for this model) to train it "
                                      "again"):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.to(device).eval()


@torch.no_grad()
def heldout_loss(model, tcfg, tokenizer, batches: int, micro_batch_size: int | None, device: torch.device
                 ) -> dict[str, float]:
    """Mean next-token cross-entropy over the first `batches` batches of the recipe's eval split (the same
    rows for every model); an MoE's auxiliary loss is not included."""
    import itertools

    from zoo.data.text import ByteTokenizer, TextStream
    from zoo.train import ModelInputs, count_byte_targets

    inputs = ModelInputs.of(model)
    stream = TextStream(tcfg.data, tokenizer, "eval")
    total, count, n_bytes = 0.0, 0, 0
    for batch, _ in itertools.islice(stream.batches(micro_batch_size or tcfg.train.micro_batch_size), batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs = inputs.kwargs(batch, labels=False)
        if inputs.use_cache:
            kwargs["use_cache"] = False
        with _autocast(device):
            logits = model(**kwargs).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((labels != -100).sum())
        n_bytes += count_byte_targets(batch["labels"])
    mean = total / max(count, 1)
    out = {"eval_loss": mean, "eval_tokens": count}
    if isinstance(tokenizer, ByteTokenizer) and n_bytes:  # nats over the text's bytes (not its <eos> targets)
        out["bits_per_byte"] = total / n_bytes / math.log(2)
    return out


def phase_eval(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path, checkpoint: Path,
               device: torch.device) -> dict[str, Any]:
    """Held-out loss, per-position loss and passkey of the trained model at one length. The per-position loss's
    finished documents and the passkey's finished cells are saved as they end (``PER_POSITION_PARTIAL`` and
    ``PASSKEY_PARTIAL`` in ``run_dir``) and kept complete until the caller has saved the phase, so a rerun resumes an
    interrupted evaluation."""
    from zoo.data.text import load_tokenizer
    from zoo.decode import continues_chunks_exactly
    from zoo.eval.common import model_fingerprint, read_partial, save_atomically
    from zoo.eval.length import corpus_documents, document_provenance, evaluate_length
    from zoo.eval.passkey import evaluate_passkey

    tcfg = train_config(cfg, entry, seq_len, run_dir)
    tokenizer = load_tokenizer(tcfg.tokenizer)
    model = _load_trained(checkpoint, device)
    out: dict[str, Any] = heldout_loss(model, tcfg, tokenizer, cfg.eval.batches, cfg.eval.micro_batch_size, device)
    out["backend"] = _backend_report(model, device)
    # zoo.eval carries caches chunk to chunk; transformers' Mamba cannot continue a chunk exactly and runs
    # each document in one forward instead
    carries = continues_chunks_exactly(model)
    key = {"model": model_fingerprint(str(Path(checkpoint) / "model")), "device": str(device)}
    pp = cfg.eval.per_position
    if pp is not None:
        # the files the recipe held out of training first (a data.holdout below the corpus's default 0.01 trained on
        # most of those 1%); another source's held-out text is not the built-in corpus, any file of it is unseen
        holdout = tcfg.data.holdout if tcfg.data.source == "stdlib" else 0.01
        docs = corpus_documents(tokenizer, pp.n_docs, pp.max_len, seed=tcfg.data.seed, add_bos=tcfg.data.add_bos,
                                holdout=holdout)
        provenance = document_provenance(docs, f"{entry.name}'s per-position loss", tcfg.data.source == "stdlib")
        chunk = pp.chunk_size if carries else None
        with _autocast(device):
            res = evaluate_length(model, docs, chunk, pp.batch_size, progress=True,
                                  partial=run_dir / PER_POSITION_PARTIAL, partial_key=key, save_every=SAVE_EVERY,
                                  label=f"{entry.name}'s per-position loss", keep_partial=True)
        out["per_position"] = {"bins": res["bins"], "n_documents": res["n_documents"], "max_len": res["max_len"],
                               "chunk_size": chunk, "documents": provenance}
    pk = cfg.eval.passkey
    if pk is not None:
        prefill = pk.prefill_chunk_size if carries else None
        # what a cell's result depends on besides its length and depth (evaluate_passkey keeps the saved cells of
        # this grid)
        settings = {"key": key, "seed": tcfg.train.seed, "n_samples": pk.n_samples,
                    "max_new_tokens": pk.max_new_tokens, "prefill_chunk_size": prefill}
        partial, label = run_dir / PASSKEY_PARTIAL, f"{entry.name}'s passkey"
        done = read_partial(partial, settings, label)
        if done is not None:
            grid = {(int(n), float(d)) for n in pk.lengths for d in pk.depths}
            kept = sum((int(r["length"]), float(r["depth"])) in grid for r in done["rows"])
            print(f"resuming {label}: {kept} of {len(grid)} cells are done ({partial})")

        def save(result: dict) -> None:  # after every cell: a rerun runs only the cells not finished
            save_atomically({"settings": settings, "rows": result["rows"], "samples": result["samples"]}, partial)

        with _autocast(device):
            res = evaluate_passkey(model, tokenizer, pk.lengths, pk.depths, pk.n_samples, seed=tcfg.train.seed,
                                   max_new_tokens=pk.max_new_tokens, prefill_chunk_size=prefill, progress=True,
                                   on_cell=save, done=done)
        out["passkey"] = {"rows": res["rows"],
                          "accuracy": sum(r["accuracy"] for r in res["rows"]) / len(res["rows"])}
    del model
    _free_memory()
    return out


def _fresh_model(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path, device: torch.device):
    """A freshly initialised model exactly as training builds it (same seed, same special token ids)."""
    from accelerate.utils import set_seed

    from zoo.data.text import load_tokenizer
    from zoo.train import build_model

    tcfg = train_config(cfg, entry, seq_len, run_dir)
    set_seed(tcfg.train.seed)
    return tcfg, build_model(tcfg, load_tokenizer(tcfg.tokenizer)).to(device)


def phase_mqar(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path, checkpoint: Path | None,
               device: torch.device) -> dict[str, Any]:
    """Train a fresh copy on MQAR (the same batches for every model), then measure recall accuracy. The training is
    saved in ``MQAR_PARTIAL`` in ``run_dir`` every ``eval.mqar.checkpoint_every`` steps, when SIGTERM or Ctrl-C stops
    it (KeyboardInterrupt after saving) and after its last step, and kept until the caller has saved the phase: a
    rerun continues it to the result of an uninterrupted run."""
    from zoo.eval.synthetic import EVAL_SEED, evaluate_synthetic

    m = cfg.eval.mqar
    if m.steps:
        model, losses = _train_mqar(cfg, entry, seq_len, run_dir, device)
    else:
        if checkpoint is None:
            raise ValueError("eval.mqar.steps: 0 evaluates the text-trained model, which is missing")
        model, losses = _load_trained(checkpoint, device), []
    seq_lens = m.eval_seq_lens or [m.seq_len]
    n_kv = m.eval_n_kv or [m.n_kv]
    with _autocast(device):
        res = evaluate_synthetic(model, "mqar", seq_lens, n_kv, m.eval_samples, min(m.eval_samples, 64),
                                 seed=m.seed + EVAL_SEED, vocab_size=m.vocab_size, power_a=m.power_a)
    state = {L: _state_floats(model, L) for L in seq_lens}
    rows = [dict(r, state_floats=state[r["seq_len"]]) for r in res["rows"]]
    correct = sum(r["n_correct"] for r in rows)
    answers = sum(r["n_answers"] for r in rows)
    del model
    _free_memory()
    return {"accuracy": correct / max(answers, 1), "rows": rows, "train_losses": losses[::max(1, len(losses) // 50)],
            "final_train_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
            "state_floats": state[seq_lens[0]], "seq_len": seq_lens[0]}


def _train_mqar(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path, device: torch.device
                ) -> tuple[nn.Module, list[float]]:
    """phase_mqar's training of a fresh copy (continued from ``run_dir / MQAR_PARTIAL`` when one of the same settings
    is there); returns (the model in eval mode, each step's loss)."""
    from tqdm.auto import tqdm

    from zoo.data.synthetic import mqar_batch
    from zoo.eval.common import read_partial, save_atomically
    from zoo.train import (
        NO_DECAY_NAMES,
        ScheduleConfig,
        _aux_part,
        _set_torch_rng_state,
        _StopRequest,
        _torch_rng_state,
        build_optimizer,
        lr_at,
        resume_by_name,
    )

    m = cfg.eval.mqar
    tcfg, model = _fresh_model(cfg, entry, seq_len, run_dir, device)
    vocab = model.get_input_embeddings().num_embeddings
    if m.vocab_size > vocab:
        raise ValueError(f"eval.mqar.vocab_size: {m.vocab_size} exceeds {entry.name}'s vocabulary {vocab}")
    opt_cfg = dataclasses.replace(tcfg.optim, lr=m.lr)
    sched = dataclasses.replace(
        tcfg, optim=opt_cfg, train=dataclasses.replace(tcfg.train, max_steps=m.steps),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=min(m.warmup_steps, m.steps - 1), min_lr=m.lr / 10))
    generator = torch.Generator().manual_seed(m.seed)
    losses: list[float] = []
    start = 0
    # what the saved training depends on: the phase's settings, the model and recipe, the length it is built at
    settings = {"key": {"mqar": _phase_keys(cfg)["mqar"], "model": _model_fingerprints(cfg, entry)[0],
                        "seq_len": seq_len, "device": str(device)}}
    partial, label = run_dir / MQAR_PARTIAL, f"{entry.name}'s MQAR training"
    # onto the CPU: its optimizer state was saved on the model's device, and one saved on a GPU failed to load on a
    # machine without one, "not a readable partial run", where it is a run of another device (load_state_dict puts
    # the state on the parameters' device)
    saved = read_partial(partial, settings, label, map_location="cpu")
    # a partial training saved before NO_DECAY_NAMES were exempt by name (a transformers Mamba's 2-D A_log decayed)
    # continues as it trained: its optimizer state is for those groups
    by_name = resume_by_name(model, opt_cfg, None if saved is None
                             else [len(g["params"]) for g in saved["optimizer"]["param_groups"]])
    if not by_name:
        print(f"{label}: {partial}'s run decayed the parameters named {', '.join(NO_DECAY_NAMES)} (it was saved before "
              f"they were exempt by name), and goes on decaying them, as its optimizer state holds them",
              file=sys.stderr)
    optimizer = build_optimizer(model, opt_cfg, by_name=by_name)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        _set_torch_rng_state(saved["rng"])
        start, losses = saved["step"], list(saved["losses"])
        print(f"continuing {entry.name}'s MQAR training from step {start} of {m.steps} ({partial})", file=sys.stderr)

    def save(steps: int, batch_rng: torch.Tensor, rng: dict[str, Any]) -> None:  # after `steps` steps
        save_atomically({"settings": settings, "step": steps, "losses": losses[:steps],
                         "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "optimizer": optimizer.state_dict(), "generator": batch_rng, "rng": rng}, partial)

    model.train()
    completed, updating = start, False
    at_step: tuple[int, torch.Tensor, dict[str, Any]] | None = None  # the step in progress and the states it began at
    bar = tqdm(range(start, m.steps), desc=f"{entry.name}: mqar", dynamic_ncols=True, initial=start, total=m.steps)
    try:
        with _StopRequest() as stop:
            for step in bar:
                at_step = (step, generator.get_state(), _torch_rng_state())
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, sched)
                batch = mqar_batch(m.batch_size, m.seq_len, m.n_kv, m.vocab_size, m.power_a, generator=generator)
                with _autocast(device):
                    out = model(**{k: v.to(device) for k, v in batch.items()}, **_dict_output(model))
                loss = out.loss
                loss.backward()
                updating = True
                if tcfg.optim.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), tcfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # the cross entropy alone, as the text phase's curve: an MoE's loss adds coef · its aux loss
                aux = _aux_part(model, out, 1)
                losses.append((loss.detach() - aux if aux is not None else loss).item())
                updating, completed = False, step + 1
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                # the last step too: a stop in the evaluation would otherwise train the phase again
                if completed == m.steps or stop.requested or (m.checkpoint_every and
                                                             completed % m.checkpoint_every == 0):
                    save(completed, generator.get_state(), _torch_rng_state())
                if stop.requested:
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step
        if updating:  # parameters may be half-updated: keep the last save
            raise
        optimizer.zero_grad(set_to_none=True)
        if at_step is not None and at_step[0] == completed:  # the unfinished step is redone, from the batch it drew
            save(*at_step)
        else:  # between steps (a save of the finished one was interrupted)
            save(completed, generator.get_state(), _torch_rng_state())
        raise
    finally:
        bar.close()
    if completed < m.steps:
        raise KeyboardInterrupt(f"{label} stopped after step {completed}, saved in {partial}; the same command "
                                f"continues from there")
    model.eval()
    return model, losses


def _state_floats(model, seq_len: int) -> int:
    """Floats of cache per sequence after seq_len tokens (each mixer's state_size; KV for attention)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is not None and all(hasattr(b, "mixer") for b in layers):
        return int(sum(mixer_state_size(b.mixer)(seq_len) for b in layers))
    return int(sum(fn(seq_len) for fn in _hf_state_fns(model.config)))


def _step_memory_cpu(model, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of weights + gradients + tensors saved for backward (once per storage) of one training step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return t.detach()  # t itself: a saved output (GLA's exp) held its own node, a cycle autograd never freed

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**(_dict_output(model) | batch)).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * weights + sum(saved.values())


def phase_throughput(cfg: CompareConfig, entry: ModelEntry, seq_len: int, run_dir: Path, device: torch.device
                     ) -> dict[str, Any]:
    """Training-step tokens/s and memory at each of throughput.seq_lens (module docstring: memory)."""
    from tqdm.auto import tqdm

    from zoo.train import ModelInputs, out_of_memory

    t = cfg.throughput
    tcfg, model = _fresh_model(cfg, entry, seq_len, run_dir, device)
    inputs = ModelInputs.of(model)
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    rows = []
    for L in tqdm(t.seq_lens, desc=f"{entry.name}: throughput", dynamic_ncols=True):
        B = t.batch_size or max(1, t.batch_tokens // L)
        row: dict[str, Any] = {"seq_len": L, "batch_size": B}
        try:
            ids = torch.randint(0, vocab, (B, L), generator=generator).to(device)
            batch: dict[str, Any] = {"input_ids": ids, "labels": ids, **_dict_output(model)}
            if inputs.use_cache:
                batch["use_cache"] = False
            times = []
            for i in range(t.warmup + t.steps):
                if i == t.warmup and device.type == "cuda":  # the peak of the timed steps: not the warmup's one-off
                    torch.cuda.synchronize(device)           # buffers (autotuners' benchmarks, first-call workspaces)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                with _autocast(device):
                    loss = model(**batch).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= t.warmup:
                    times.append(time.perf_counter() - start)
            step_s = statistics.median(times)
            row.update(step_ms=step_s * 1e3, tokens_per_s=B * L / step_s)
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
                row["memory_method"] = "cuda max_memory_allocated"
            else:
                row["peak_mib"] = _step_memory_cpu(model, batch) / 2 ** 20
                row["memory_method"] = "weights + grads + saved activations"
        except RuntimeError as e:  # (a CPU's failed allocation ended the comparison in a traceback)
            if not out_of_memory(e):
                raise
            # an OOM in backward leaves `loss` holding the step's graph: it sat under the next length's step and peak
            loss = batch = ids = None
            model.zero_grad(set_to_none=True)
            row.update(step_ms=None, tokens_per_s=None, peak_mib=None, note="out of memory")
            _free_memory()
        rows.append(row)
    backend = _backend_report(model, device)
    del model
    _free_memory()
    return {"rows": rows, "backend": backend, "device": str(device),
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}


# ---- the run --------------------------------------------------------------------------------------------------

def _label(name: str, L: int, lengths: list[int]) -> str:
    return name if len(lengths) == 1 else f"{name}@{L}"


# recipe fields that change no result: a rerun with another progress bar or tracker continues the comparison
_RECIPE_NO_RESULT = ("log.progress_bar", "log.trackers", "log.project", "log.peak_tflops", "checkpoint.keep")


def _model_fingerprints(cfg: CompareConfig, entry: ModelEntry) -> list[str]:
    """The fingerprints a model's results may carry: of its fields and the recipe as zoo.train reads it (defaults
    filled in) less _RECIPE_NO_RESULT; then of the recipe as written (results of earlier versions)."""
    from zoo.train import _flat

    recipe = _flat(_recipe_config(cfg.recipe).to_dict())
    recipe = {k: v for k, v in recipe.items() if k not in ("model", "output_dir", *_RECIPE_NO_RESULT)}
    return [_fingerprint({"fields": entry.fields, "recipe": recipe}),
            _fingerprint({"fields": entry.fields, "recipe": cfg.recipe})]


def _phase_keys(cfg: CompareConfig) -> dict[str, str]:
    """Each phase of a model and the fingerprint of the settings it depends on (a recorded phase with another
    key is redone)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "mqar"}
    if cfg.eval.per_position is not None:  # its documents (results of corpus_documents' earlier ones are redone)
        from zoo.eval.length import CORPUS_LAYOUT

        settings["per_position"] |= {"layout": CORPUS_LAYOUT}
    eval_key = _fingerprint(settings)
    keys = {}
    for L in _lengths(cfg):
        keys[f"train/L{L}"], keys[f"eval/L{L}"] = "train", eval_key
    if cfg.eval.mqar is not None:
        mqar = dataclasses.asdict(cfg.eval.mqar)
        del mqar["checkpoint_every"]  # (how often the training is saved: no result depends on it)
        if not cfg.eval.mqar.steps:  # it evaluates the model trained at the first length
            mqar["text_model_length"] = _lengths(cfg)[0]
        keys["mqar"] = _fingerprint(mqar)
    if cfg.throughput is not None:
        keys["throughput"] = _fingerprint({**dataclasses.asdict(cfg.throughput), "device": _device_name()})
    return keys


def _accounting(cfg: CompareConfig, entry: ModelEntry) -> dict[str, Any]:
    """The model's accounting at the accounting lengths and the training lengths, with the accounting settings."""
    a = cfg.accounting
    return account(entry.config(), sorted(set(a.seq_lens) | set(_lengths(cfg))), a.kv_bytes, a.state_bytes,
                   entry.meta_model())


def run_model(cfg: CompareConfig, entry: ModelEntry, out: Path, device: torch.device, position: str
              ) -> dict[str, Any]:
    """All phases of one model, skipping those recorded with the same settings; returns its record."""
    from zoo.eval.common import remove_partial

    lengths = _lengths(cfg)
    keys = _phase_keys(cfg)
    folder = out / entry.name
    header = {"name": entry.name, "fields": entry.fields, "is_zoo": entry.is_zoo, "match": entry.match,
              "accounting": _accounting(cfg, entry)}
    record = ModelRecord(folder, _model_fingerprints(cfg, entry), header)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(entry.fields, sort_keys=False))
    for L in lengths:
        run_dir = folder / f"train-L{L}"
        if record.needs(f"train/L{L}", "train"):
            record.run(f"train/L{L}", "train", f"[{position}] {entry.name}: training at L={L}",
                       functools.partial(phase_train, cfg, entry, L, run_dir))
            _free_memory()
        if record.needs(f"eval/L{L}", keys[f"eval/L{L}"]):
            checkpoint = folder / record.get(f"train/L{L}")["checkpoint"]
            record.run(f"eval/L{L}", keys[f"eval/L{L}"], f"[{position}] {entry.name}: evaluating (L={L})",
                       functools.partial(phase_eval, cfg, entry, L, run_dir, checkpoint, device))
        for name in (PER_POSITION_PARTIAL, PASSKEY_PARTIAL):  # (kept by phase_eval until result.json holds the phase)
            remove_partial(run_dir / name)
    first = lengths[0]
    run_dir = folder / f"train-L{first}"
    if cfg.eval.mqar is not None:
        key = keys["mqar"]
        if record.needs("mqar", key):
            checkpoint = folder / record.get(f"train/L{first}")["checkpoint"]
            record.run("mqar", key, f"[{position}] {entry.name}: MQAR",
                       functools.partial(phase_mqar, cfg, entry, first, run_dir, checkpoint, device))
        remove_partial(run_dir / MQAR_PARTIAL)  # (kept by phase_mqar until result.json holds the phase)
    if cfg.throughput is not None:
        key = keys["throughput"]
        if record.needs("throughput", key):
            record.run("throughput", key, f"[{position}] {entry.name}: throughput and memory",
                       functools.partial(phase_throughput, cfg, entry, first, run_dir, device))
    record.data["done"] = True
    record.save()
    return record.data


# ---- report: tables and plots ----------------------------------------------------------------------------------

_SI_UNITS = (("", 1.0), ("K", 1e3), ("M", 1e6), ("G", 1e9))


def _si(n: float | None, digits: int = 3) -> str:
    """n to `digits` significant digits with a K / M / G suffix. A value that rounds up to 1000 of its unit takes the
    next one (999,600 parameters printed as "1e+03K", 999.6 tokens/s as "1e+03")."""
    if n is None:
        return "—"
    i = max(j for j, (_, size) in enumerate(_SI_UNITS) if j == 0 or abs(n) >= size)
    while True:
        unit, size = _SI_UNITS[i]
        text = f"{n / size:.{digits}g}"
        if abs(float(text)) < 1000 or i + 1 == len(_SI_UNITS):
            return text + unit
        i += 1


def _mib(value: float) -> str:
    """A size in MiB to 3 significant digits, whole MiB from 1000 on (2,345, where ".3g" printed 2.35e+03)."""
    return f"{value:,.0f}" if abs(value) >= 999.5 else f"{value:.3g}"


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _backend_summary(report: dict[str, str]) -> str:
    """{'layers.0.Mamba': 'cuda', ...} -> 'Mamba: cuda' (one entry per mixer class)."""
    seen: dict[str, set[str]] = {}
    for key, value in report.items():
        kind = key.rsplit(".", 1)[-1]
        seen.setdefault(kind, set()).add(str(value))
    return ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in seen.items()) or "—"


def _cache_bytes(cfg: CompareConfig) -> str:
    """The bytes per float the cache memory is counted at (accounting.kv_bytes / state_bytes)."""
    a = cfg.accounting
    return (f"KV {a.kv_bytes} and states {a.state_bytes} bytes per float, states kept in the model's dtype "
            f"{a.kv_bytes}")


def _trained_elsewhere(records: list[dict[str, Any]], lengths: list[int], device: str) -> dict[str, list[str]]:
    """{the device a training phase ran on: the models (and lengths) trained there} of the training phases that ran on
    another device than `device` (a CPU's thread count included: the training phase's key holds no device, so a rerun
    elsewhere keeps them). A phase recorded without its device's name (earlier versions) is told by its device type."""
    here = _device().type
    out: dict[str, list[str]] = {}
    for rec in records:
        for L in lengths:
            tr = rec["phases"].get(f"train/L{L}")
            if not tr:
                continue
            name = tr.get("device_name")
            if name is None:
                kind = str(tr.get("device") or "").split(":")[0]
                if not kind or kind == here:
                    continue
                name = "CPU" if kind == "cpu" else f"a {kind} device"
            elif name == device:
                continue
            out.setdefault(name, []).append(_label(rec["name"], L, lengths))
    return out


def _throughput_precision(records: list[dict[str, Any]]) -> str:
    """" (bf16 autocast)" / " (fp32)": the precision the throughput phase ran in (bf16 autocast on a GPU whatever the
    recipe's precision, which the training's tok/s ran in), "" when no record has one."""
    precision = next((r["phases"]["throughput"].get("precision") for r in records if r["phases"].get("throughput")),
                     None)
    return f" ({precision})" if precision else ""


def markdown_report(records: list[dict[str, Any]], cfg: CompareConfig, device: str) -> str:
    """The comparison's markdown: the main table, accounting per length, throughput per length."""
    lengths = _lengths(cfg)
    recipe = _recipe_config(cfg.recipe)
    lines = [f"# {cfg.title}", "",
             f"Device: {device}. Recipe: the same rows in the same order for every model (data seed "
             f"{recipe.data.seed}, initialisation seed {recipe.train.seed})."]
    elsewhere = _trained_elsewhere(records, lengths, device)
    if elsewhere:  # a rerun on another device (or CPU thread count) keeps the trained models: not this device's numbers
        lines.append("Trained on another device: " + "; ".join(f"{', '.join(names)} on {name}"
                                                                for name, names in elsewhere.items())
                     + f" (train tok/s and the training precision are that device's, not {device}'s).")
    if cfg.budget is not None:
        lines.append(f"Budget: {cfg.budget.params:,.0f} {cfg.budget.count} parameters "
                     f"(± {cfg.budget.tolerance:.0%}, knob {cfg.budget.knob}).")
    lines += ["", "| model | params | non-emb | vs budget | FLOPs/tok @L | cache/seq @L | train L | tokens | "
              "train tok/s | eval loss | bits/byte | MQAR acc | passkey | backends |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec in records:
        acc = rec["accounting"]
        matched = format(rec["match"]["error"], "+.1%") if rec.get("match") else ("unmatched" if cfg.budget else "—")
        mqar = rec["phases"].get("mqar")
        for L in lengths:
            tr = rec["phases"].get(f"train/L{L}") or {}
            ev = rec["phases"].get(f"eval/L{L}") or {}
            # eval.mqar.steps 0 evaluates the model trained at the first length: not the other lengths' models
            recall = mqar if L == lengths[0] or cfg.eval.mqar is None or cfg.eval.mqar.steps else None
            per_L = next(r for r in acc["per_length"] if r["seq_len"] == L)
            backend = _backend_summary(ev.get("backend") or tr.get("backend") or {}) if rec.get("is_zoo", True) \
                else "transformers"
            lines.append(
                f"| {_label(rec['name'], L, lengths)} | {_si(acc['params'])} | {_si(acc['non_embedding_params'])} | "
                f"{matched} | {_si(per_L['flops_per_token'])} | {_mib(per_L['cache_mib'])} MiB | {L} | "
                f"{_si(tr.get('tokens'))} | {_si(tr.get('train_tokens_per_s'))} | {_fmt(ev.get('eval_loss'))} | "
                f"{_fmt(ev.get('bits_per_byte'), '.3f')} | {_fmt(recall['accuracy'] if recall else None, '.3f')} | "
                f"{_fmt(ev['passkey']['accuracy'] if ev.get('passkey') else None, '.2f')} | "
                f"{backend} |")
    mqar_whose = ("" if cfg.eval.mqar is None else " by a fresh copy trained on MQAR" if cfg.eval.mqar.steps
                  else f" by the model trained at L={lengths[0]}, on its rows only")
    lines += ["", "Columns: params, every parameter (tied embeddings once, every expert of an MoE: its active ones are "
              "under Sizes); non-emb, less the token embedding and an untied head; vs budget, the budget's count "
              "against budget.params; FLOPs/tok @L, forward FLOPs per token at the training length L (a training "
              f"step costs 3x); cache/seq @L, the inference cache per sequence after L tokens ({_cache_bytes(cfg)}); "
              "tokens, the training tokens (an unpacked row's pads included); train tok/s, real (not pad) training "
              "tokens per second over the steps after the first; eval loss, cross-entropy in nats per token over "
              f"every target of the first {cfg.eval.batches} batches of held-out rows (the same rows for every "
              "model); bits/byte, those nats in bits per text byte; MQAR acc, the fraction of queries answered "
              f"right over the MQAR cells{mqar_whose}; passkey, the fraction of samples retrieved, averaged over "
              "lengths x depths."]
    lines += ["", f"## Accounting per length (forward FLOPs per token; cache per sequence: {_cache_bytes(cfg)})", "",
              "| model | L | FLOPs/token | decode FLOPs/token | KV floats | state floats | cache MiB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for rec in records:
        for row in rec["accounting"]["per_length"]:
            lines.append(f"| {rec['name']} | {row['seq_len']} | {_si(row['flops_per_token'])} | "
                         f"{_si(row['decode_flops_per_token'])} | {_si(row['kv_floats'])} | "
                         f"{_si(row['state_floats'])} | {_mib(row['cache_mib'])} |")
    if any(rec["phases"].get("throughput") for rec in records):
        method = next((r["phases"]["throughput"]["rows"][0].get("memory_method") for r in records
                       if r["phases"].get("throughput") and r["phases"]["throughput"]["rows"]), "")
        lines += ["", f"## Training step (forward + backward) on {device}{_throughput_precision(records)}; memory: "
                  f"{method}", "",
                  "| model | L | batch | tokens/s | ms/step | memory MiB |", "| --- | --- | --- | --- | --- | --- |"]
        for rec in records:
            for row in (rec["phases"].get("throughput") or {}).get("rows", []):
                lines.append(f"| {rec['name']} | {row['seq_len']} | {row['batch_size']} | "
                             f"{_si(row.get('tokens_per_s'))} | {_fmt(row.get('step_ms'), '.1f')} | "
                             f"{_fmt(row.get('peak_mib'), '.1f')} {row.get('note', '')}|")
    if any(rec["phases"].get("mqar") for rec in records):
        lines += ["", "## MQAR recall", "", "| model | seq_len | n_kv | accuracy | state floats/seq |",
                  "| --- | --- | --- | --- | --- |"]
        for rec in records:
            for row in (rec["phases"].get("mqar") or {}).get("rows", []):
                lines.append(f"| {rec['name']} | {row['seq_len']} | {row['n_kv']} | {row['accuracy']:.3f} | "
                             f"{_si(row['state_floats'])} |")
    if records:
        lines += ["", "## Sizes", "", "| model | d_model | layers | adjusted to the budget | params | active params |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for rec in records:
            adj = ", ".join(f"{k}={v}" for k, v in ((rec.get("match") or {}).get("adjusted") or {}).items())
            n_layers = len(rec["accounting"]["layers"])
            # the config's width, not its fields': a model config leaving d_model at its default (768) showed "—"
            lines.append(f"| {rec['name']} | {rec['accounting'].get('d_model') or '—'} | {n_layers} | "
                         f"{adj or '—'} | {rec['accounting']['params']:,} | {rec['accounting']['active_params']:,} |")
    timed = [rec for rec in records if rec.get("phase_seconds")]
    if timed:
        groups = ("train", "eval", "mqar", "throughput")
        lines += ["", "## Wall time per phase (seconds; train and eval summed over lengths; a resumed phase counts "
                  "the run that finished it)", "", "| model | " + " | ".join(groups) + " | total |",
                  "| --- |" + " --- |" * (len(groups) + 1)]
        for rec in timed:
            per: dict[str, float] = {}
            for phase, seconds in rec["phase_seconds"].items():  # train/L2048 and train/L8192 add up
                per[phase.split("/")[0]] = per.get(phase.split("/")[0], 0.0) + seconds
            lines.append(f"| {rec['name']} | " + " | ".join(_fmt(per.get(g), ".0f") for g in groups) +
                         f" | {sum(per.values()):.0f} |")
    return "\n".join(lines) + "\n"


def _recall_labels(rows: list[dict[str, Any]]) -> list[tuple[int, float, str]]:
    """(x, y, "L=...") labels of one model's MQAR points: one per state size, over the highest of its points (a
    recurrent state is the same at every length, and its accuracies differ a little: one label per point printed
    them on top of each other)."""
    points: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        points.setdefault(r["state_floats"], []).append((r["seq_len"], r["accuracy"]))
    return [(x, max(a for _, a in at), "L=" + ",".join(str(L) for L in sorted({L for L, _ in at})))
            for x, at in points.items()]


def _unplotted(records: list[dict[str, Any]], cfg: CompareConfig) -> dict[str, str]:
    """The plots that would hold no line, each with why: write_plots leaves them out and results.md says so (a
    comparison without eval.mqar, or with throughput: null, wrote an empty recall.png / throughput.png, bare axes
    under a title, and matplotlib warned "No artists with labels found to put in legend")."""
    lengths = _lengths(cfg)
    if not records:
        return {name: "no model has finished results" for name in PLOTS}
    why = {}
    if not any((rec["phases"].get(f"train/L{L}") or {}).get("curve") for rec in records for L in lengths):
        why["loss.png"] = "no training curve"
    if not any(r.get("tokens_per_s") for rec in records for r in (rec["phases"].get("throughput") or {}).get(
            "rows", [])):
        why["throughput.png"] = ("throughput: null" if cfg.throughput is None
                                 else "no throughput measured (out of memory at every length)")
    if not any(rec["phases"].get("mqar") for rec in records):
        why["recall.png"] = "eval.mqar is not set" if cfg.eval.mqar is None else "no MQAR results"
    if not any((rec["phases"].get(f"eval/L{L}") or {}).get("per_position") for rec in records for L in lengths):
        why["length.png"] = ("eval.per_position is not set" if cfg.eval.per_position is None
                             else "no per-position results")
    return why


def _unplotted_note(records: list[dict[str, Any]], cfg: CompareConfig) -> str:
    why = _unplotted(records, cfg)
    return ("\nPlots left out (nothing to draw): " + "; ".join(f"{name}: {why[name]}" for name in PLOTS if name in why)
            + ".\n") if why else ""


def write_plots(records: list[dict[str, Any]], cfg: CompareConfig, out: Path) -> list[Path]:
    """loss.png, throughput.png, memory.png, recall.png and length.png, each where it has a line to draw
    (`_unplotted`); a plot left out is removed from `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = _lengths(cfg)
    written = []
    skip = _unplotted(records, cfg)
    for name in skip:
        (out / name).unlink(missing_ok=True)

    def legend(ax, **kwargs) -> None:
        if ax.get_legend_handles_labels()[0]:  # (an empty one warns "No artists with labels found")
            ax.legend(**kwargs)

    def save(fig, name: str) -> None:
        if name in skip:
            plt.close(fig)
            return
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in records:
        for L in lengths:
            curve = (rec["phases"].get(f"train/L{L}") or {}).get("curve") or []
            if curve:
                ax.plot([r["tokens"] for r in curve], [r["loss"] for r in curve],
                        label=_label(rec["name"], L, lengths))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title("loss vs tokens (same rows, same order)")
    ax.grid(True, alpha=0.3)
    legend(ax)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in records:
        rows = [r for r in (rec["phases"].get("throughput") or {}).get("rows", []) if r.get("tokens_per_s")]
        if rows:
            ax.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=rec["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("training tokens / s (forward + backward)")
    ax.set_title(f"throughput on {_device_name()}{_throughput_precision(records)}")
    ax.grid(True, which="both", alpha=0.3)
    legend(ax)
    save(fig, "throughput.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    method = ""
    for rec in records:
        rows = [r for r in (rec["phases"].get("throughput") or {}).get("rows", []) if r.get("peak_mib")]
        if rows:
            method = rows[0].get("memory_method", "")
            ax1.plot([r["seq_len"] for r in rows], [r["peak_mib"] for r in rows], marker="o", label=rec["name"])
        per_length = rec["accounting"]["per_length"]
        ax2.plot([r["seq_len"] for r in per_length], [r["cache_mib"] for r in per_length], marker="o",
                 label=rec["name"])
    ax1.set_title(f"training step memory ({method})" if method else "training step memory", fontsize=9)
    ax1.set_ylabel("MiB")
    # wrapped: on one line the right-hand title ran past the figure's edge, cut off at "states kept in the model's"
    ax2.set_title(textwrap.fill(f"inference cache per sequence ({_cache_bytes(cfg)})", 60), fontsize=9)
    ax2.set_ylabel("MiB")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.grid(True, which="both", alpha=0.3)
        legend(ax, fontsize=8)
    if not method:  # no step measured (throughput: null, or out of memory at every length): the cache alone
        ax1.text(0.5, 0.5, "not measured" + (" (throughput: null)" if cfg.throughput is None else ""),
                 ha="center", va="center", transform=ax1.transAxes, color="gray")
    save(fig, "memory.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    several = cfg.eval.mqar is not None and len(cfg.eval.mqar.eval_seq_lens or [0]) > 1
    for i, rec in enumerate(records):
        mq = rec["phases"].get("mqar")
        if mq:
            rows = sorted(mq["rows"], key=lambda r: (r["n_kv"], r["state_floats"]))
            (line,) = ax.plot([r["state_floats"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                              label=rec["name"])
            for x, y, text in _recall_labels(rows) if several else []:
                # models at similar state sizes and accuracies (all at chance, say) would print their labels on
                # top of each other: each model's labels sit at its own height, in its line's colour
                ax.annotate(text, (x, y), fontsize=7, xytext=(3, 4 + 9 * (i % 5)), textcoords="offset points",
                            color=line.get_color())
    if cfg.eval.mqar is not None:  # values are drawn from the upper V - V // 2 tokens of the task's vocabulary
        from zoo.eval.synthetic import chance_accuracy

        chance = chance_accuracy("mqar", {"vocab_size": cfg.eval.mqar.vocab_size})
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.margins(x=0.1)  # room for the rightmost point's label
    ax.set_xlabel("cache floats per sequence at the MQAR length (recurrent state, or KV)")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("recall vs state size")
    ax.grid(True, which="both", alpha=0.3)
    legend(ax)
    save(fig, "recall.png")

    curves, trained_at, seen = {}, [], False
    for rec in records:
        for L in lengths:
            pp = (rec["phases"].get(f"eval/L{L}") or {}).get("per_position")
            if pp:
                curves[_label(rec["name"], L, lengths)] = {"bins": pp["bins"]}
                trained_at.append(L)
                documents = pp.get("documents") or {}
                seen |= bool(documents.get("trained_on_corpus") and documents.get("train_tokens"))
    if curves:  # every length a plotted curve was trained at is marked, not only the first
        from zoo.eval.length import plot_length_curves

        # (two lines: the first title on one ran past both edges of the figure)
        title = ("per-position loss on long documents, partly training text\n(see result.json's train_share)" if seen
                 else "per-position loss on long held-out documents")
        written.append(plot_length_curves(curves, out / "length.png", train_length=sorted(set(trained_at)),
                                          title=title))
    return written


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' * (n != 1)})"


def _check_inputs(cfg: CompareConfig, entries: list[ModelEntry], others: list[ModelEntry] = ()) -> None:
    """Refuse before any training what the trainer or a phase would refuse for one model midway: fewer
    embeddings than the tokenizer's tokens or MQAR's vocabulary, packed rows for a model whose forward takes
    neither seq_idx nor position_ids, a model the accounting cannot count (a transformers MoE or hybrid, a custom
    mixer with a cache but no state_size), a phase's rows longer than the absolute positions a model learns.

    entries: the models this run trains; others: the config's other models (--only left them out), checked for the
    recipe every model trains under alone (packing: its fix changes the recipe, which would redo the models this run
    trains), not for what concerns them alone."""
    from zoo.data.text import load_tokenizer, special_id_outside
    from zoo.train import ModelInputs, position_table

    recipe = _recipe_config(cfg.recipe)
    tokenizer = load_tokenizer(recipe.tokenizer)
    n_tokens = len(tokenizer)
    pk = cfg.eval.passkey
    if pk is not None:  # evaluate_passkey refuses a length below its template only after the first model trained
        from zoo.eval.passkey import bare_template_tokens, longest_answer

        cells = {(int(n), float(d)) for n in pk.lengths for d in pk.depths}
        # with every key of a length (evaluate_passkey's keys: seed train.seed), not key 10000's alone
        # with BOS as the models train (data.add_bos), as evaluate_passkey builds the prompts
        bare = bare_template_tokens(tokenizer, recipe.train.seed, cells, pk.n_samples, recipe.data.add_bos)
        short = [n for n in pk.lengths if n < bare[int(n)]]
        if short:
            raise ValueError(f"eval.passkey.lengths: {short[0]} tokens is shorter than the bare passkey template "
                             f"({bare[int(short[0])]} tokens with tokenizer {recipe.tokenizer!r} and the keys of that "
                             f"length); give lengths of at least {bare[int(short[0])]}")
        need = longest_answer(tokenizer, recipe.train.seed, cells, pk.n_samples)
        if pk.max_new_tokens < need:  # every answer would be cut before its last digit: passkey 0 for any model
            raise ValueError(f"eval.passkey.max_new_tokens: {pk.max_new_tokens} new tokens cannot write an answer "
                             f"\" <5-digit key>\" of up to {need} tokens with tokenizer {recipe.tokenizer!r}; give "
                             f"max_new_tokens >= {need}")
    _check_heldout(cfg, tokenizer)
    mqar = cfg.eval.mqar
    for entry in others if recipe.data.packing else ():
        try:
            model = entry.meta_model()
        except Exception:  # (a model this run does not train is not refused for its own problem, as GPT-2's n_embd
            # not a multiple of n_head refused `--only` of the others, in transformers' message naming no model)
            continue
        _check_packing(recipe, entry, ModelInputs.of(model))
    for entry in entries:
        try:  # each model's record starts with its accounting
            _accounting(cfg, entry)
        except ValueError as e:
            raise ValueError(f"models.{entry.name}: {e}") from None
        model = entry.meta_model()
        vocab = model.get_input_embeddings().num_embeddings
        # model_overrides reach the zoo models only: a transformers model's vocab_size is one of its own fields
        where = "model_overrides.vocab_size for every zoo model" if entry.is_zoo else \
            f"in models.{entry.name}'s own fields: model_overrides reach the zoo models only"
        if vocab < n_tokens:
            raise ValueError(f"models.{entry.name}: {vocab} embeddings but the tokenizer has {n_tokens} tokens; "
                             f"set vocab_size >= {n_tokens} ({where})")
        if outside := special_id_outside(tokenizer, vocab):  # (a tokenizer whose ids have gaps)
            raise ValueError(f"models.{entry.name}: tokenizer: {outside[0]}; set vocab_size >= {outside[1]} "
                             f"({where})")
        if mqar is not None and mqar.vocab_size > vocab:
            raise ValueError(f"eval.mqar.vocab_size: {mqar.vocab_size} exceeds models.{entry.name}'s vocabulary "
                             f"{vocab}")
        _check_packing(recipe, entry, ModelInputs.of(model))
        if (table := position_table(model)) is not None:  # GPT-2's wpe: a longer row failed in it, mid-run
            for name, positions, fix in _phase_positions(cfg):
                what, advice, shortest = f"{positions} positions", None, None
                if positions > table[1] and name == "eval.passkey.lengths":
                    # its prompts take a few tokens fewer than their lengths (whole filler sentences): the bound
                    # refused a length whose prompts the model held; zoo eval passkey's check says which do not fit
                    from zoo.eval.passkey import positions_refusal

                    refusal = positions_refusal(tokenizer, recipe.train.seed, pk.lengths, pk.depths, pk.n_samples,
                                                recipe.data.add_bos, pk.max_new_tokens, table[1], "lengths")
                    if refusal is None:
                        continue
                    positions, what, advice, shortest = refusal
                if positions > table[1]:
                    raise ValueError(f"{name}: {what}, but models.{entry.name} ({type(model).__name__}) "
                                     f"learns {table[1]} absolute positions ({table[0]}, config "
                                     f"max_position_embeddings); {advice or fix(table[1])}" + (
                                         ", or raise its max_position_embeddings" if shortest is None else
                                         f"; raise its max_position_embeddings to at least {shortest}"))


def _check_packing(recipe, entry: ModelEntry, inputs) -> None:
    """Refuse packed rows (the recipe's data.packing) for a model whose forward (`inputs`: zoo.train.ModelInputs) takes
    neither seq_idx nor position_ids."""
    if recipe.data.packing and not (inputs.seq_idx or inputs.position_ids):
        raise ValueError(f"recipe.data.packing: models.{entry.name} takes neither seq_idx nor position_ids, "
                         f"so packed documents would see each other; set recipe.data.packing=false (for every "
                         f"model: they train on the same rows)")


def _phase_positions(cfg: CompareConfig) -> list[tuple[str, int, Callable[[int], str]]]:
    """(field, the positions a phase feeds a model, the fix for a model of n learned positions) of every phase the
    comparison runs: a model of learned absolute positions (`zoo.train.position_table`) failed past them with
    "IndexError: index out of range in self", its training refused only at its turn, the evaluations, MQAR and
    throughput after it had trained."""
    where = "train_lengths" if cfg.train_lengths else "recipe.data.seq_len"
    out = [(where, max(_lengths(cfg)), lambda n: f"train at lengths <= {n}")]
    pp = cfg.eval.per_position
    if pp is not None:  # documents of max_len tokens, BOS included, their cache carried chunk to chunk
        out.append(("eval.per_position.max_len", pp.max_len, lambda n: f"lower it to <= {n}"))
    pk = cfg.eval.passkey
    if pk is not None:  # a prompt of up to its length, then the new tokens (the last one is never fed back); the
        # prompts' real lengths, a few tokens shorter, are measured where this bound is past a model's positions, and
        # the fix is then zoo.eval.passkey.positions_refusal's
        out.append(("eval.passkey.lengths", max(pk.lengths) + pk.max_new_tokens - 1,
                    lambda n: f"give lengths of at most {n - pk.max_new_tokens + 1}"))
    m = cfg.eval.mqar
    if m is not None:  # its training rows, and the evaluation's cells that can be built (the others are skipped)
        cells = [L for L in m.eval_seq_lens or [m.seq_len] for n in m.eval_n_kv or [m.n_kv]
                 if _mqar_cell_error(L, n, m) is None]
        for name, L in (("eval.mqar.seq_len", m.seq_len if m.steps else 0),
                        ("eval.mqar.eval_seq_lens", max(cells, default=0))):
            out.append((name, L, lambda n: f"lower it to <= {n}"))
    if cfg.throughput is not None:
        out.append(("throughput.seq_lens", max(cfg.throughput.seq_lens), lambda n: f"keep them <= {n}"))
    return out


def _check_heldout(cfg: CompareConfig, tokenizer) -> None:
    """Refuse a recipe whose held-out rows (`heldout_loss`'s, at every training length) hold no target: the eval phase,
    after a model trained, recorded eval_loss 0 (a perplexity of 1) for held-out documents that fill no packed row."""
    from zoo.data.text import TextStream
    from zoo.train import count_targets

    for seq_len in _lengths(cfg):
        tcfg = _recipe_config(_recipe_at(cfg, seq_len))
        if tcfg.data.eval_split is None and tcfg.data.holdout == 0:  # (TextStream says: set zoo train's eval.every)
            raise ValueError("recipe.data.holdout: is 0 and recipe.data.eval_split is unset, so there are no held-out "
                             "rows to evaluate every model on; set holdout > 0 (or an eval_split of a hub dataset)")
        stream = TextStream(tcfg.data, tokenizer, "eval")
        rows = stream.batches(cfg.eval.micro_batch_size or tcfg.train.micro_batch_size)
        if not sum(count_targets(batch["labels"]) for batch, _ in itertools.islice(rows, cfg.eval.batches)):
            raise ValueError(f"recipe.data: the held-out documents fill no row of {seq_len} tokens (data.seq_len at "
                             f"that training length), so the eval phase would have no target; raise "
                             f"recipe.data.holdout, give a source with more text, or train at shorter lengths")


def _finished_records(cfg: CompareConfig, entries: list[ModelEntry], by_name: dict[str, Any], out: Path,
                      refused: list[str] = ()) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The records of this invocation plus models finished by an earlier one (e.g. run with --only), in the
    config's order; the models whose earlier results were made with another model config, recipe or phase
    settings (a rerun would redo them), which are left out: the table compares models under one recipe; and the
    models an earlier run started but did not finish (left out too, and named: the table looked complete without
    them). A record keeps only the phases this run's settings ask for: a phase it turned off (eval.mqar: null) would
    show results made under whatever settings each model last ran it with, side by side. `refused`: the models with
    results whose entry in the config is refused (--only left them out), named with the stale ones."""
    keys = _phase_keys(cfg)
    found, stale, unfinished = {name: _asked_phases(data, keys) for name, data in by_name.items()}, [], []
    for entry in entries:
        path = out / entry.name / RESULT_FILE
        if entry.name not in found and path.is_file():
            data = json.loads(path.read_text())
            if not data.get("done"):
                unfinished.append(entry.name)
                continue
            current = data.get("fingerprint") in _model_fingerprints(cfg, entry) and all(
                _phase_done(data, phase, key) for phase, key in keys.items())
            if current:  # accounting and match as this run's settings give them (another run's kv_bytes, say)
                found[entry.name] = _asked_phases({**data, "match": entry.match,
                                                   "accounting": _accounting(cfg, entry)}, keys)
            else:
                stale.append(entry.name)
    return [found[e.name] for e in entries if e.name in found], [*stale, *refused], unfinished


def _asked_phases(data: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """A model's record with only the phases in `keys` (and their wall times)."""
    return {**data, "phases": {k: v for k, v in data["phases"].items() if k in keys},
            "phase_seconds": {k: v for k, v in (data.get("phase_seconds") or {}).items() if k in keys}}


def _left_out_note(stale: list[str], out: Path, unfinished: list[str] = ()) -> str:
    note = ""
    if stale:
        # (the throughput phase's key holds the device: a run on a GPU, or on another CPU thread count, leaves out too)
        note += (f"_Left out: {', '.join(stale)}: the results in {out} were made with another model config, recipe "
                 f"or evaluation settings, or their throughput measured on another device; rerun them (--only "
                 f"{','.join(stale)}, with --force if the model or recipe changed)._\n\n")
    if unfinished:
        note += (f"_Not finished: {', '.join(unfinished)}: an earlier run stopped before their last phase; rerun "
                 f"them (--only {','.join(unfinished)}) to continue where they stopped._\n\n")
    return note


def run_comparison(cfg: CompareConfig, folder: Path, force: bool = False, only: list[str] | None = None,
                   accounting_only: bool = False) -> dict[str, Any]:
    """Run the comparison's models (those in `only`, else all), skipping phases already done unless `force`,
    then write the tables and plots over every model of the config that has finished results.

    Returns {"records": [...], "markdown": str, "plots": [paths]}.
    """
    import shutil

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = model_names(cfg)
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"--only: unknown models {sorted(unknown)}; the config has {names}")
    try:  # (the checks before the first model: a stop here with --force has deleted nothing)
        todo = resolve_models(cfg, folder, only or None)
        # the config's other models, for the table of those an earlier run finished: one whose entry is refused (this
        # run does not train it, and is not refused for it) has no results of this config, and is named where it has
        # some
        entries, refused = [], []
        for name in names:
            try:
                entries += [e for e in todo if e.name == name] or resolve_models(cfg, folder, [name])
            except ValueError:
                if (out / name / RESULT_FILE).is_file():
                    refused.append(name)
        if not accounting_only:
            _check_inputs(cfg, todo, [e for e in entries if e.name not in {t.name for t in todo}])
            # refused before any model trains: found at its turn, it stopped the run after the models before it
            recorded = {e.name: json.loads((out / e.name / RESULT_FILE).read_text()).get("fingerprint")
                        for e in todo if not force and (out / e.name / RESULT_FILE).is_file()}
            changed = [e.name for e in todo
                       if e.name in recorded and recorded[e.name] not in _model_fingerprints(cfg, e)]
            if changed:
                raise ValueError(_changed_message(changed, out))
        device = _device()
        threads = torch.get_num_threads()
        if device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        if not accounting_only:  # an accounting look (no GPU needed) must not overwrite a comparison's record
            (out / "compare_config.yaml").write_text(yaml.safe_dump(
                {**dataclasses.asdict(cfg), "resolved_models": {e.name: e.fields for e in entries}}, sort_keys=False))
    except KeyboardInterrupt as e:
        # the advice to continue without --force kept every earlier result: the redo --force asked for was lost
        e.nothing_forced = force
        raise
    try:
        if accounting_only:  # the models of --only, as a run trains them (it accounted every model of the config)
            records = [{"name": e.name, "fields": e.fields, "match": e.match, "phases": {},
                        "accounting": _accounting(cfg, e)} for e in todo]
        else:
            by_name = {}
            for i, entry in enumerate(todo):
                cleared = i  # the models before it: their results are redone (a stop mid-delete: not yet cleared)
                try:
                    if force and (out / entry.name).exists():
                        shutil.rmtree(out / entry.name)
                    cleared = i + 1
                    by_name[entry.name] = run_model(cfg, entry, out, device, f"{i + 1}/{len(todo)}")
                    if i + 1 < len(todo):  # a run stopped later still leaves the table of the models finished so far
                        done, stale, unfinished = _finished_records(cfg, entries, by_name, out, refused)
                        later = {e.name for e in todo[i + 1:]}  # (this run goes on with them)
                        (out / "results.md").write_text(
                            f"_Partial: {len(done)} of {len(names)} models finished; the run goes on with "
                            f"{todo[i + 1].name}._\n\n" +
                            _left_out_note(stale, out, [n for n in unfinished if n not in later]) +
                            markdown_report(done, cfg, _device_name()))
                except KeyboardInterrupt as e:
                    # the models --force had not reached keep their earlier results, which the advised rerun without
                    # --force took as done: named, for the interruption to say how to redo them
                    if force:
                        e.not_forced = [x.name for x in todo[cleared:] if (out / x.name).exists()]
                    raise
            records, stale, unfinished = _finished_records(cfg, entries, by_name, out, refused)
        note = "" if accounting_only else _left_out_note(stale, out, unfinished)
        markdown = note + markdown_report(records, cfg, _device_name())
        if not accounting_only:
            markdown += _unplotted_note(records, cfg)
        if accounting_only:  # results.md / results.json of a finished comparison stay as they are
            (out / "accounting.md").write_text(markdown)
        else:
            (out / "results.md").write_text(markdown)
            _write_json_atomic(out / "results.json", {"device": _device_name(), "records": records})
        plots = [] if accounting_only else write_plots(records, cfg, out)
    finally:
        torch.set_num_threads(threads)
    return {"records": records, "markdown": markdown, "plots": plots}


def main(argv: list[str] | None = None) -> int:
    """``zoo compare CONFIG [--section.field=value ...] [--force] [--only a,b] [--accounting-only]``."""
    parser = argparse.ArgumentParser(
        prog="zoo compare", allow_abbrev=False,
        description="Compare models under one recipe and parameter budget: accounting, training, evaluation, "
                    "throughput; a markdown table and plots in output_dir. Overrides: --section.field=value "
                    "(e.g. --recipe.train.max_steps=10 --output_dir=runs/x).")
    parser.add_argument("config", help="comparison config YAML (configs/compare/*.yaml), or a packaged one's name "
                                       "(demo, 130m)")
    parser.add_argument("--force", action="store_true", help="redo models that already have results")
    parser.add_argument("--only", default=None,
                        help="comma-separated model names to run (with --accounting-only: to account)")
    parser.add_argument("--accounting-only", action="store_true",
                        help="print the parameter / FLOP / memory accounting without training")
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}; overrides look like --section.field=value")
    try:
        cfg, folder = load_compare_config(args.config, [item[2:] for item in rest])
    except ValueError as e:
        parser.error(str(e))
    if args.force and args.accounting_only:  # (it was accepted and did nothing: no result is redone or removed)
        parser.error("--force redoes trained models, and --accounting-only trains none and leaves the results alone; "
                     "give one of them")
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only is not None else None
    if only == []:  # (an empty shell variable: --only "$MODELS") it ran, or accounted, every model of the config
        parser.error(f"--only: no model name in {args.only!r}; give comma-separated names of the config's models, or "
                     f"leave --only out for all of them")
    start = time.perf_counter()
    from zoo.eval.common import sigterm_interrupts

    try:
        # SIGTERM (`timeout`'s, a scheduler's) stops the evaluation and throughput phases as Ctrl-C does, what they
        # finished saved: it killed the process there without a word (only the trainings, zoo.train's and MQAR's,
        # handled it, and they still do: their handler takes precedence while they train)
        with sigterm_interrupts():
            result = run_comparison(cfg, folder, force=args.force, only=only, accounting_only=args.accounting_only)
    except KeyboardInterrupt as e:
        # --force deletes a model's results before redoing it: the same command again would redo the finished ones
        # (stopped before it deleted any: the same command, --force and all)
        how = "the same command without --force" if args.force and not getattr(e, "nothing_forced", False) \
            else "the same command"
        why = f": {e}" if str(e) else ""  # (which training or phase stopped, and where it saved, when it says)
        # the models --force had not reached: the rerun without --force kept their earlier results as finished
        later = getattr(e, "not_forced", [])
        models, their = ("the models", "their") if len(later) > 1 else ("the model", "its")
        then = (f", then with --force --only={','.join(later)} to redo {models} --force had not reached (the rerun "
                f"without it keeps {their} earlier results)" if later else "")
        print(f"\nzoo compare: interrupted{why}; finished phases are kept in {cfg.output_dir}; rerun {how} to "
              f"continue{then}", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"zoo compare: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    for path in result["plots"]:
        print(f"wrote {path}")
    print(f"results in {cfg.output_dir} ({time.perf_counter() - start:.0f} s)")
    return 0


__all__ = ["AccountingConfig", "BudgetConfig", "CompareConfig", "EvalSection", "LayerCost", "MQARConfig",
           "ModelEntry", "PasskeyConfig", "PerPositionConfig", "ThroughputConfig", "account", "causal_keys_mean",
           "heldout_loss", "layer_costs", "load_compare_config", "main", "markdown_report", "match_budget",
           "mixer_kwargs", "module_weights", "parameter_counts", "read_curve", "resolve_models", "run_comparison",
           "train_config", "training_flops_per_token", "write_plots"]


if __name__ == "__main__":
    sys.exit(main())
