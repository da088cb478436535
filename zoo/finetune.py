"""PEFT LoRA finetuning that provably adapts every targeted projection, on whichever backend runs.

LoRA on Mamba projections is often silently lost in the field: a fused kernel reads ``in_proj.weight``
instead of calling ``in_proj``, so the adapter trains while most of the model never changes (PEFT issues 2274,
2556). Zoo mixers call every projection through its ``forward``, and `wrap_lora` checks it at wrap time: it
hooks every adapted module, runs a tiny forward through the model on its own device (training forward,
prefill and one cached decode step, every MoE expert routed; a classifier's training and eval forwards), and
raises naming each adapted module whose forward never ran.

    from zoo.finetune import wrap_lora
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(path), r=8, alpha=16)  # mixers' lora_targets
    model = wrap_lora(base, target_modules="all-linear")                           # every nn.Linear
    model = wrap_lora(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=0))

``zoo finetune CONFIG [--section.field=value ...]`` (also ``accelerate launch scripts/finetune.py CONFIG``)
loads a checkpoint with ``AutoModelForCausalLM.from_pretrained``, wraps it, trains on a synthetic task
(``zoo.data.synthetic``) or on jsonl rows ``{"text"}`` / ``{"prompt", "completion"}`` (loss on the completion
only), saves the adapter, reloads it with ``PeftModel.from_pretrained``, merges it (``merge_and_unload``) and
saves the merged checkpoint (in the base checkpoint's dtype), reporting the task accuracy before and after. A
run directory holds ``adapter/``, ``merged/``, ``finetune_config.yaml`` and ``finetune_result.json`` (and
``base/`` when the config pretrains its own base model from a zoo YAML, see `PretrainSection`); a phase stopped by
Ctrl-C or SIGTERM leaves ``finetune-checkpoint/`` (or ``pretrain-checkpoint/``), which the same command continues
(`LoopSection.checkpoint_every`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zoo.cache import output_cache
from zoo.config_files import find_config
from zoo.data.synthetic import IGNORE_INDEX, TASKS, SyntheticDataset, make_batch
from zoo.decode import _dict_output, cache_argument
from zoo.layers import MoE, SwiGLU, mark_saved_copies
from zoo.modeling import ZooForSequenceClassification
from zoo.train import (
    NO_DECAY_NAMES,
    ModelInputs,
    OptimConfig,
    ScheduleConfig,
    _aux_part,
    _build,
    _flat,
    _has_aux_loss,
    _progress_bars_on_main_only,
    _refuse_fp16_without_autocast,
    _refuse_lone_processes,
    _run_precision,
    _weighted_loss,
    build_optimizer,
    count_targets,
    forward_backward,
    lr_at,
    position_table,
    read_yaml,
    reset_accelerate_state,
    resume_by_name,
)

MLP_TYPES = (SwiGLU, MoE)


# ---- targets -----------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The model under a PeftModel (names relative to it are what PEFT matches targets against)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def default_lora_targets(model: nn.Module, include_mlp: bool = False) -> list[str]:
    """Full module names (relative to `model`, as PEFT matches them) of every projection LoRA should adapt.

    Each mixer names its adaptable ``nn.Linear`` children in ``lora_targets`` (attention q/k/v/o, Mamba
    in/x/dt/out, Mamba-2 in/out, GLA q/k/v/g/o). With ``include_mlp`` the SwiGLU projections
    (gate/up/down) of every MLP and of every MoE expert are added.

    Args:
        model: a zoo model (or any model whose sequence mixers declare ``lora_targets``).
        include_mlp: also adapt the MLP and expert projections.

    Returns:
        module names in model order, e.g. ``["model.layers.0.mixer.in_proj", ...]``.

    Raises:
        ValueError: when no module of the model declares ``lora_targets`` (pass ``target_modules`` to
            `wrap_lora`, e.g. ``"all-linear"``), or a declared target is not an ``nn.Linear`` child.
    """
    base = _unwrap(model)
    targets: list[str] = []
    declared = False
    for name, module in base.named_modules():
        names = getattr(module, "lora_targets", None)
        if not names:
            continue
        declared = True
        if isinstance(module, MoE):
            continue  # its experts are SwiGLU modules, visited on their own
        if isinstance(module, MLP_TYPES) and not include_mlp:
            continue
        for target in names:
            try:
                child = module.get_submodule(target)
            except AttributeError:
                raise ValueError(f"{type(module).__name__}.lora_targets names {target!r}, which is not a "
                                 f"submodule of {name or 'the model'}") from None
            if hasattr(child, "get_base_layer"):  # already wrapped by PEFT
                child = child.get_base_layer()
            if not isinstance(child, nn.Linear):
                raise ValueError(f"{type(module).__name__}.lora_targets names {target!r}, a "
                                 f"{type(child).__name__}; lora_targets must be nn.Linear children")
            targets.append(f"{name}.{target}" if name else target)
    if not declared:
        raise ValueError(f"{type(base).__name__} declares no lora_targets on its modules; pass target_modules "
                         f"explicitly, e.g. 'all-linear' or a list of module names")
    for name, module in base.named_modules():
        mixer = getattr(module, "mixer", None)
        if isinstance(mixer, nn.Module) and not getattr(mixer, "lora_targets", None):
            # a custom mixer that names no targets would silently train without adapters
            linears = [n for n, m in mixer.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                warnings.warn(f"{name}.mixer ({type(mixer).__name__}) declares no lora_targets, so its projections "
                              f"({', '.join(linears)}) get no adapters; set {type(mixer).__name__}.lora_targets = "
                              f"{tuple(linears)!r}, or pass target_modules", stacklevel=2)
    return targets


def unmatched_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Entries of `target_modules` that match no module of `model`, under PEFT's rules.

    A string is a regular expression that must match a whole module name (``"all-linear"`` matches when the
    model has an ``nn.Linear``); each entry of a list matches a module named exactly so, or whose name ends
    with ``"." + entry``.
    """
    names = [name for name, _ in _unwrap(model).named_modules() if name]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            found = any(isinstance(m, nn.Linear) for m in _unwrap(model).modules())
        else:
            found = any(re.fullmatch(target_modules, name) for name in names)
        return [] if found else [target_modules]
    suffixes: set[str] = set()
    for name in names:
        parts = name.split(".")
        suffixes.update(".".join(parts[i:]) for i in range(len(parts)))
    return [t for t in target_modules if t not in suffixes]


# ---- coverage ----------------------------------------------------------------------------------------------

def _adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adapter-wrapped modules (PEFT tuner layers) by name relative to the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, BaseTunerLayer)}


def _block_rows(base: nn.Module, adapted: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per residual block (a module with a ``mixer``), or per numbered layer of another model."""
    blocks = [(name, m) for name, m in base.named_modules() if isinstance(getattr(m, "mixer", None), nn.Module)]
    rows, claimed = [], set()
    if blocks:
        for i, (prefix, block) in enumerate(blocks):
            mine = [n[len(prefix) + 1:] for n in adapted if n.startswith(prefix + ".")]
            claimed.update(f"{prefix}.{n}" for n in mine)
            mixer = block.mixer
            backend = mixer.backend_name() if hasattr(mixer, "backend_name") else "torch"
            declared = [f"mixer.{t}" for t in getattr(mixer, "lora_targets", ())]
            rows.append({"layer": i, "name": prefix, "mixer": getattr(mixer, "mixer_type", type(mixer).__name__),
                         "backend": backend,
                         "mixer_modules": [n.removeprefix("mixer.") for n in mine if n.startswith("mixer.")],
                         "other_modules": [n for n in mine if not n.startswith("mixer.")],
                         "not_adapted": [t.removeprefix("mixer.") for t in declared if t not in mine]})
        return rows, [n for n in adapted if n not in claimed]
    groups: dict[str, list[str]] = {}
    for name in adapted:
        match = re.match(r"^(.*?\.\d+)\.(.+)$", name)  # the first numbered segment is the layer (as PEFT reads it)
        if match:
            groups.setdefault(match.group(1), []).append(match.group(2))
            claimed.add(name)
    for i, (prefix, mine) in enumerate(groups.items()):
        rows.append({"layer": i, "name": prefix, "mixer": "-", "backend": "-", "mixer_modules": [],
                     "other_modules": mine, "not_adapted": []})
    return rows, [n for n in adapted if n not in claimed]


def lora_report(model: nn.Module) -> dict[str, Any]:
    """Which layers and mixers of a PeftModel got adapters.

    Returns:
        dict with ``adapted`` (module names relative to the base model), ``n_adapted``, ``trainable_params``,
        ``total_params``, ``layers`` (one row per block: layer, name, mixer, backend, mixer_modules,
        other_modules (MLP / experts), not_adapted (mixer lora_targets left out)) and ``other`` (adapted
        modules outside the blocks).
    """
    base = _unwrap(model)
    adapted = list(_adapter_layers(model))
    rows, other = _block_rows(base, adapted)
    return {"adapted": adapted, "n_adapted": len(adapted),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()), "layers": rows, "other": other}


def _compact(names: list[str]) -> str:
    """'experts.0.up_proj experts.1.up_proj' -> 'experts.*.up_proj' (x2)."""
    if not names:
        return "-"
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.\d+\.", ".*.", n)
        counts[key] = counts.get(key, 0) + 1
    return " ".join(k if "*" not in k else f"{k} (x{c})" for k, c in counts.items())


def format_lora_report(report: dict[str, Any]) -> str:
    """`lora_report` as a markdown table with a one-line summary."""
    frac = report["trainable_params"] / max(1, report["total_params"])
    lines = [f"LoRA: {report['n_adapted']} modules adapted, {report['trainable_params']:,} trainable parameters "
             f"({frac:.2%} of {report['total_params']:,})"]
    if "probe" in report:
        probe = report["probe"]
        lines[0] += f"; every adapted forward ran on {probe['device']} ({', '.join(probe['phases'])})"
    lines += ["| layer | mixer | backend | adapted mixer projections | adapted MLP / other | not adapted |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in report["layers"]:
        lines.append(f"| {row['layer']} | {row['mixer']} | {row['backend']} | {_compact(row['mixer_modules'])} "
                     f"| {_compact(row['other_modules'])} | {_compact(row['not_adapted'])} |")
    if report["other"]:
        lines.append(f"| other | | | | {_compact(report['other'])} | |")
    return "\n".join(lines)


@contextlib.contextmanager
def _route_every_expert(model: nn.Module) -> Iterator[None]:
    """Zoo MoE layers send every token to every expert, so that each expert's adapter is reached."""
    saved = [(m, m.top_k) for m in model.modules() if isinstance(m, MoE)]
    try:
        for m, _ in saved:
            m.top_k = m.n_experts
        yield
    finally:
        for m, k in saved:
            m.top_k = k


def check_lora_reached(model: nn.Module, seq_len: int = 8, batch_size: int = 2) -> dict[str, Any]:
    """Run a tiny forward on the model's device and raise if any adapter-wrapped module was bypassed.

    Every adapted module gets a forward hook; the model then runs three paths on random tokens: a training
    forward (train mode, gradients enabled, no cache), a prefill with ``use_cache=True`` and one cached
    decode step (skipped when the model returns no cache). A model that does not generate (a classifier, no
    ``prepare_inputs_for_generation``) runs the training forward and an eval forward without a cache. A module
    whose forward did not run in some path is bypassed there: a fused kernel read its ``.weight`` (the adapter
    is ignored), or it is not on that path at all. Zoo MoE layers route every token to every expert during the
    check.

    Args:
        model: a PeftModel (or any model holding PEFT tuner layers).
        seq_len, batch_size: the probe's input_ids [batch_size, seq_len].

    Returns:
        ``{"device", "phases": [names], "modules": n}``.

    Raises:
        ValueError: naming the bypassed modules and the path on which they were skipped.
    """
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError("check_lora_reached: the model holds no adapter layers")
    base = _unwrap(model)
    param = next(model.parameters())
    generates = callable(getattr(base, "prepare_inputs_for_generation", None))
    if not generates and getattr(getattr(base, "config", None), "pad_token_id", 0) is None:
        batch_size = 1  # a classifier without a pad_token_id cannot find each row's last token: one row at a time
    # the embedding's rows: PEFT may have wrapped it (LoRA on it, trainable_token_indices, modules_to_save), and its
    # wrappers forward .weight but not num_embeddings
    vocab = base.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(param.device)
    ran: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: ran.add(name))
               for name, m in layers.items()]
    missed: dict[str, list[str]] = {}
    phases: list[str] = []
    was_training = model.training

    def record(phase: str) -> None:
        phases.append(phase)
        skipped = [n for n in layers if n not in ran]
        if skipped:
            missed[phase] = skipped
        ran.clear()

    try:
        with _route_every_expert(base):
            model.train()
            with torch.enable_grad():
                model(input_ids=input_ids, use_cache=False)
            record("train forward")
            model.eval()
            # a zoo model with a custom mixer that defines no init_state keeps no cache: its prefill runs without
            cacheable = getattr(getattr(base, "model", base), "_cacheable", None)
            with torch.no_grad():
                if not generates:
                    model(input_ids=input_ids, use_cache=False)
                    record("eval forward")
                else:
                    # an output object also where the config's return_dict is False: its tuple held no cache
                    # field, and the decode step went unprobed
                    out = model(input_ids=input_ids, use_cache=cacheable() if callable(cacheable) else True,
                                **_dict_output(model))
                    record("prefill")
                    cache = output_cache(out)
                    if cache is not None:
                        model(input_ids=input_ids[:, -1:], **{cache_argument(base): cache}, use_cache=True)
                        record("decode step")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if missed:
        details = "; ".join(f"{phase}: {', '.join(names)}" for phase, names in missed.items())
        raise ValueError(f"LoRA would be bypassed on {param.device}: the forward of these adapted modules never "
                         f"ran ({details}). A kernel that reads a projection's .weight ignores its adapter; call "
                         f"the projection's forward instead, or leave the module out of target_modules")
    return {"device": str(param.device), "phases": phases, "modules": len(layers)}


def _check_modules_to_save(model: nn.Module, entries: Any, where: str) -> None:
    """Refuse modules_to_save entries that match no module of `model` under PEFT's rule (a module whose name, as the
    PeftModel names it, ends with the entry): PEFT skips them without a word, and the module named trains not at all."""
    if entries is None:
        return
    if isinstance(entries, str):  # PEFT matched each of its characters: every module whose name ends in one
        raise ValueError(f"{where}: a list of module names, got the string {entries!r}; pass [{entries!r}]")
    names = [f"base_model.model.{n}" if n else "base_model.model" for n, _ in _unwrap(model).named_modules()]
    missing = [e for e in entries if not any(n.endswith(e) for n in names)]
    if missing:
        raise ValueError(f"{where}: {missing} match no module of {type(model).__name__} (an entry names a module, or "
                         f"the end of its name); module names look like "
                         f"{[n for n, _ in _unwrap(model).named_modules() if n][:4]}")


def _example_targets(model: nn.Module) -> list[str]:
    """Four module names a target can name, for error messages: projections (nn.Linear, transformers' Conv1D of
    GPT-2), else any."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]
    return (names or [n for n, _ in model.named_modules() if n])[:4]


def wrap_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
              target_modules: str | list[str] | None = None, include_mlp: bool = False, *,
              check_forward: bool = True, verbose: bool = True, **lora_kwargs: Any):
    """Wrap a causal LM or a zoo classifier with LoRA adapters (``peft.get_peft_model``) and check their coverage.

    Args:
        model: the causal LM (zoo or any Hugging Face model that generates), or a
            `zoo.ZooForSequenceClassification` (task_type ``SEQ_CLS``: PEFT also trains a copy of its ``score``
            head, through modules_to_save), on the device it will train on.
        r, alpha, dropout: LoRA rank, scaling numerator (scale alpha / r) and dropout.
        target_modules: None: `default_lora_targets` (the mixers' ``lora_targets``); ``"all-linear"``; a
            regular expression over module names; or a list of module names / name suffixes.
        include_mlp: with the default targets, also adapt MLP and MoE expert projections.
        check_forward: run `check_lora_reached` (a tiny forward on the model's device).
        verbose: print the coverage table.
        lora_kwargs: other ``peft.LoraConfig`` fields (``use_rslora``, ``init_lora_weights``, ...).

    Returns:
        a ``PeftModelForCausalLM`` (``PeftModelForSequenceClassification`` for a classifier); its coverage report
        (`lora_report`, plus ``probe``) is in ``.zoo_lora_report``.

    Raises:
        ValueError: a target entry matches no module; an adapted module is bypassed on the active backend; the
            model is neither a causal LM nor a zoo classifier, or task_type is not the one its class takes.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("wrap_lora: the model is already a PeftModel; pass its base model")
    # a PeftModel's base model, or zoo.hub.load_causal_lm's of an adapter: get_peft_model set up its adapter 'default'
    # afresh, so the trained adapter in it was lost (the model back to its base's outputs), without a word
    from zoo.hub import peft_layer, peft_wrapping

    wrapped = peft_layer(model)
    if wrapped is not None:
        raise ValueError(f"wrap_lora: the model holds PEFT adapter layers ({wrapped}, ...), which a new LoRA would "
                         f"reset; to train a new adapter on top of them, merge them first "
                         f"(PeftModel.from_pretrained(base model, adapter).merge_and_unload()), or continue training "
                         f"the adapter itself with PeftModel.from_pretrained(base model, adapter, is_trainable=True)")
    # LoraConfig's own names for what wrap_lora takes as arguments failed with "LoraConfig() got multiple values"
    for peft_name, ours in (("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        if peft_name in lora_kwargs:
            raise ValueError(f"wrap_lora: {peft_name} is wrap_lora's {ours}; pass {ours}={lora_kwargs[peft_name]!r}")
    if isinstance(model, ZooForSequenceClassification):
        expected, kind = "SEQ_CLS", "sequence-classification"
    elif callable(getattr(model, "prepare_inputs_for_generation", None)):  # PEFT's CAUSAL_LM wrapper calls it
        expected, kind = "CAUSAL_LM", "causal-LM"
    else:
        raise ValueError(f"wrap_lora: a {type(model).__name__} is neither a causal LM (it has no "
                         f"prepare_inputs_for_generation, which PEFT's CAUSAL_LM model calls) nor a "
                         f"zoo.ZooForSequenceClassification; load a zoo folder with AutoModelForCausalLM or "
                         f"AutoModelForSequenceClassification, or call peft.get_peft_model with a LoraConfig of the "
                         f"model's task_type")
    task_type = lora_kwargs.pop("task_type", expected)
    if task_type != expected:
        raise ValueError(f"task_type: wrap_lora makes a {kind} PeftModel (task_type {expected!r}) of a "
                         f"{type(model).__name__}, got {task_type!r}")
    if target_modules is None:
        target_modules = default_lora_targets(model, include_mlp)
    elif include_mlp:
        raise ValueError("include_mlp: only applies to the default targets; add the MLP projections "
                         "(gate_proj, up_proj, down_proj) to target_modules instead")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules: empty list; leave it None for the mixers' lora_targets")
    missing = unmatched_targets(model, target_modules)
    if missing:
        raise ValueError(f"target_modules: {missing} match no module of {type(model).__name__}; module names "
                         f"look like {_example_targets(model)} (see "
                         f"zoo.finetune.default_lora_targets)")
    _check_modules_to_save(model, lora_kwargs.get("modules_to_save"), "modules_to_save")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=expected, **lora_kwargs)
    with peft_wrapping():
        peft_model = get_peft_model(model, config)
    # modules_to_save's trained copies are deep copies, whose Parameters lost the _no_weight_decay flags
    mark_saved_copies(peft_model)
    report = lora_report(peft_model)
    if check_forward:
        report["probe"] = check_lora_reached(peft_model)
    peft_model.zoo_lora_report = report
    if verbose:
        print(format_lora_report(report))
    return peft_model


# ---- data --------------------------------------------------------------------------------------------------

@dataclass
class DataSection:
    """What to train and evaluate on: a synthetic ``task`` or jsonl ``source`` files (exactly one).

    task: 'mqar' | 'selective_copying' | 'induction_heads' with ``task_kwargs`` (``n_kv``, ``vocab_size``, ...);
    fresh rows every step, ``n_eval`` held-out rows (another seed). source / eval_source: jsonl path(s) or
    glob(s) (possibly compressed: rows.jsonl.gz, .bz2, .xz) whose rows are ``{"text": ...}`` (loss on every token)
    or ``{"prompt": ..., "completion": ...}`` (loss on the completion and eos only; a row with the fields of both is
    refused, naming its file and line); a row whose text or completion is empty (or whitespace) is skipped, with a
    warning that counts them; without eval_source a ``holdout`` fraction is held out (the copies of a held-out row
    with it: they are not trained on).
    seq_len: row length of a task (None: the task's default), or the truncation length of jsonl rows
    (None: none). add_bos / add_eos: wrap jsonl rows (zoo models pretrain on ``<bos>`` text ``<eos>``).
    """

    task: str | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str | list[str] | None = None
    eval_source: str | list[str] | None = None
    holdout: float = 0.1
    seq_len: int | None = None
    n_eval: int = 256
    add_bos: bool = True
    add_eos: bool = True
    seed: int = 0

    def validate(self, prefix: str) -> None:
        if (self.task is None) == (self.source is None):
            raise ValueError(f"{prefix}.task / {prefix}.source: give exactly one (a synthetic task such as 'mqar', "
                             f"or jsonl files)")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"{prefix}.task: unknown {self.task!r}; choose one of {sorted(TASKS)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"{prefix}.seq_len: must be >= 2, got {self.seq_len}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"{prefix}.holdout: must be in [0, 1), got {self.holdout}")
        if self.source is not None and self.eval_source is None and self.holdout == 0:
            raise ValueError(f"{prefix}.holdout: 0 leaves no evaluation rows (accuracy is measured before and "
                             f"after finetuning); set it above 0, or give {prefix}.eval_source")
        if self.n_eval < 1:
            raise ValueError(f"{prefix}.n_eval: must be >= 1, got {self.n_eval}")
        # options of the other kind of data were ignored without a word (n_eval: 100 on jsonl rows held out 10%)
        default = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        # (add_bos: false on a task's rows, which hold no bos or eos, too)
        unused = [("eval_source", self.eval_source is not None, "jsonl data", ""),
                  ("holdout", self.holdout != default["holdout"], "jsonl data without eval_source", ""),
                  ("add_bos", self.add_bos != default["add_bos"], "jsonl data", " (a task's rows hold no bos)"),
                  ("add_eos", self.add_eos != default["add_eos"], "jsonl data", " (a task's rows hold no eos)")] \
            if self.task is not None else \
            [("task_kwargs", bool(self.task_kwargs), "a synthetic task", ""),
             ("n_eval", self.n_eval != default["n_eval"], "a synthetic task",
              f" (jsonl data holds out {prefix}.holdout of its rows, or evaluates on {prefix}.eval_source)"),
             ("holdout", self.eval_source is not None and self.holdout != default["holdout"],
              f"jsonl data without {prefix}.eval_source", " (the eval_source rows are the evaluation rows)")]
        for name, given, applies, hint in unused:
            if given:
                raise ValueError(f"{prefix}.{name}: applies to {applies} only; drop it{hint}")
        if "seq_len" in self.task_kwargs:
            raise ValueError(f"{prefix}.task_kwargs.seq_len: give the row length as {prefix}.seq_len")
        if self.task is not None:
            _check_task_kwargs(self.task, self.task_kwargs, self.seq_len, f"{prefix}.task_kwargs")


def _check_task_kwargs(task: str, kwargs: dict[str, Any], seq_len: int | None, where: str) -> None:
    """Refuse task arguments the task does not take (with a did-you-mean) or cannot build a row from."""
    taken = [n for n in inspect.signature(TASKS[task]).parameters if n not in ("batch_size", "seq_len", "generator")]
    for name in kwargs:
        if name not in taken:
            close = difflib.get_close_matches(name, taken, n=1)
            raise ValueError(f"{where}.{name}: not an argument of task {task!r}"
                             + (f"; did you mean {close[0]!r}?" if close else "") + f" (it takes {taken})")
    try:
        make_batch(task, 1, seq_len, generator=torch.Generator().manual_seed(0), **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: task {task!r} cannot build a row ({e})") from None


@dataclass
class LoopSection:
    """The training loop: max_steps optimizer steps of grad_accum micro-batches of micro_batch_size rows
    per process. precision: auto (the launch's `accelerate launch --mixed_precision` when it names one, else bf16
    autocast on a GPU that has it, else fp32) | bf16 | fp16 (GPU only) | fp32; another than the launch's is refused;
    the top-level section's applies to the pretrain phase too (one accelerator runs both).

    state_passing: recurrent models only; each micro-batch starts from the (detached) final states of the one
    before, row by row, instead of zeros, so that training visits the states that long inputs reach ("state
    passing", Buitrago Ruiz & Gu 2025, a fix for length generalization). A model with a KV cache raises.

    checkpoint_every: save the phase's trainable weights, optimizer and step every this many steps (0: only when
    stopped) to OUTPUT_DIR/<phase>-checkpoint, and the last step until the phase's result is saved; SIGTERM or Ctrl-C
    saves the last completed step and stops (a second Ctrl-C stops at once), and the same command again, with as many
    processes, continues from there (exactly: the data order is replayed; under state_passing the first resumed
    micro-batch starts from zeros)."""

    seed: int = 0
    max_steps: int = 300
    micro_batch_size: int = 16
    grad_accum: int = 1
    precision: str = "auto"
    eval_batch_size: int = 64
    log_every: int = 50
    progress_bar: bool = True
    state_passing: bool = False
    checkpoint_every: int = 100

    def validate(self, prefix: str) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2 ** 32:  # (accelerate's set_seed refused it once the phase began, naming no field)
            raise ValueError(f"{prefix}.seed: must be in [0, 2**32), got {self.seed}")
        if self.checkpoint_every < 0:
            raise ValueError(f"{prefix}.checkpoint_every: must be >= 0 (0: save on interruption only), got "
                             f"{self.checkpoint_every}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"{prefix}.precision: unknown {self.precision!r}; use auto, bf16, fp16 or fp32")


@dataclass
class LoraSection:
    """LoRA: rank r, alpha (scale alpha / r), dropout; target_modules None (the mixers' lora_targets, plus
    MLP / expert projections with include_mlp), 'all-linear', a regex or a list; check_forward: the bypass
    check of `wrap_lora`. use_rslora (scale alpha / sqrt(r)), use_dora (weight-decomposed LoRA) and
    modules_to_save (modules trained whole and saved with the adapter) are peft.LoraConfig's."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = None
    include_mlp: bool = False
    check_forward: bool = True
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None


@dataclass
class PretrainSection:
    """Train every parameter of a fresh model first (only when ``model`` is a zoo YAML): the result is saved
    as ``output_dir/base`` and finetuned from there with ``from_pretrained``. A base saved by the same
    pretrain section is reused. A pretrain on the finetune's task whose rows include those the finetune holds out
    (seed data.seed + 1) is refused: its accuracy before and after would be measured on training rows."""

    data: DataSection
    train: LoopSection = field(default_factory=LoopSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))


@dataclass
class FinetuneConfig:
    """A LoRA finetuning run. model: a checkpoint folder or hub id (``from_pretrained``), or a zoo YAML
    together with a ``pretrain`` section. tokenizer: for jsonl data (None: the checkpoint's, else 'byte')."""

    model: str
    data: DataSection
    output_dir: str = "runs/finetune"
    tokenizer: str | None = None
    pretrain: PretrainSection | None = None
    lora: LoraSection = field(default_factory=LoraSection)
    train: LoopSection = field(default_factory=LoopSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))

    def to_dict(self) -> dict[str, Any]:
        def plain(value):
            if isinstance(value, tuple):
                return list(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))


def _validate_run(section: Any, prefix: str) -> None:
    section.data.validate(f"{prefix}data")
    section.train.validate(f"{prefix}train")
    o, s, steps = section.optim, section.schedule, section.train.max_steps
    # zoo train's checks of these sections (validate_config): betas, eps and fused failed in torch's AdamW only when
    # the phase began (the finetune's after the whole pretrain phase), and a decay_fraction out of (0, 1] was taken
    checks = [(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}"),
              (all(0 <= b < 1 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}"),
              (o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}"),
              (o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}"),
              # (infinite: lr or weight_decay made every weight inf at the first step, a run on NaN losses; eps every
              # update zero, a run that trained nothing)
              (math.isfinite(o.lr), "optim.lr", f"must be finite, got {o.lr}"),
              (math.isfinite(o.eps), "optim.eps", f"must be finite, got {o.eps}"),
              (math.isfinite(o.weight_decay), "optim.weight_decay", f"must be finite, got {o.weight_decay}"),
              (o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = no clipping), got {o.grad_clip}"),
              (o.fused in (True, False, "auto"), "optim.fused", f"must be true, false or 'auto', got {o.fused!r}"),
              (s.kind in ("cosine", "wsd", "constant"), "schedule.kind", f"unknown {s.kind!r}"),
              (0 <= s.warmup_steps < steps, "schedule.warmup_steps",
               f"must be in [0, train.max_steps={steps}), got {s.warmup_steps}"),
              (0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr={o.lr}], got {s.min_lr}"),
              (0 < s.decay_fraction <= 1, "schedule.decay_fraction", f"must be in (0, 1], got {s.decay_fraction}")]
    for ok, name, message in checks:
        if not ok:
            raise ValueError(f"{prefix}{name}: {message}")


def _check_lora_targets(lora: LoraSection, model: nn.Module) -> None:
    """Refuse lora.target_modules entries that match no module of `model`, either side of an output layer tied to the
    input embeddings (finetune merges the adapter), or (in a zoo model) a module LoRA cannot wrap, and
    lora.modules_to_save entries that match none; its skeleton on the meta device will do."""
    from transformers.pytorch_utils import Conv1D

    _check_modules_to_save(model, lora.modules_to_save, "lora.modules_to_save")
    targets = lora.target_modules
    if targets is None:
        return
    missing = unmatched_targets(model, targets)
    if missing:
        raise ValueError(f"lora.target_modules: {missing} match no module of {type(model).__name__} (a string is a "
                         f"regular expression over whole module names, a list holds names or name suffixes); module "
                         f"names look like {_example_targets(model)}")
    matched = [(n, m) for n, m in _unwrap(model).named_modules() if n and targets != "all-linear" and (
        re.fullmatch(targets, n) if isinstance(targets, str) else any(n == t or n.endswith("." + t) for t in targets))]
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = [head, embeddings] if head is not None and head.weight is embeddings.weight else []
    adapted_tied = [(n, m) for n, m in matched if any(m is t for t in tied)]
    if adapted_tied:
        # the adapted model adds the adapter to one side of the tie alone, merge_and_unload to the shared weight (the
        # other side too): the run trained in full, then failed its round-trip check ('all-linear' leaves both out)
        name, module = adapted_tied[0]
        other = "input embeddings" if module is head else "output layer (lm_head)"
        raise ValueError(f"lora.target_modules: matches {name}, which is tied to the {other} "
                         f"(tie_word_embeddings): merging its adapter would change the shared weight, the {other} "
                         f"too, and the merged model would not be the adapted one; leave {name} out, or train it whole "
                         f"with lora.modules_to_save: [{name}] (its trained copy is saved untied)")
    if targets == "all-linear" or getattr(getattr(model, "config", None), "model_type", None) != "zoo":
        return  # (PEFT's dispatch also wraps quantized layers another model may hold)
    layer_types = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    other = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, layer_types)]
    if other:
        raise ValueError(f"lora.target_modules: matches {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, "
                         f"which LoRA cannot adapt: name their projections (nn.Linear), e.g. "
                         f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:2]}")


def _check_state_passing(model: nn.Module, field: str) -> None:
    """Refuse `field` (a section's train.state_passing) for a model whose layers are not all recurrent, as
    `_state_passing_step` does at the phase's first step (after the phases and the evaluation before it); its skeleton
    on the meta device will do."""
    from zoo.cache import RecurrentLayer, ZooCache

    base = _unwrap(model)
    if getattr(getattr(base, "config", None), "model_type", None) != "zoo":
        raise ValueError(f"{field}: needs a zoo model whose layers are all recurrent (mamba, mamba2, gla); "
                         f"{type(base).__name__} is not a zoo model")
    layers = ZooCache.for_model(base).layers
    other = [i for i, layer in enumerate(layers) if not isinstance(layer, RecurrentLayer)]
    if other:
        names = ", ".join(f"model.layers.{i}.mixer" for i in other[:3]) + (" ..." if len(other) > 3 else "")
        raise ValueError(f"{field}: needs a model whose layers are all recurrent (mamba, mamba2, gla); "
                         f"{type(base).__name__} has attention (KV) layers ({names}), whose keys and values are no "
                         f"state to pass on; set {field}: false")


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a finetune config (YAML) and apply ``section.field=value`` overrides (values parsed as YAML)."""
    cfg = _build(FinetuneConfig, read_yaml(path, overrides), "")
    # '~/ckpt' in a YAML file is not expanded by a shell: the model was taken for an invalid hub id and
    # output_dir made a folder named '~' in the working directory
    cfg.model, cfg.output_dir = os.path.expanduser(cfg.model), os.path.expanduser(cfg.output_dir)
    if cfg.tokenizer is not None:
        cfg.tokenizer = os.path.expanduser(cfg.tokenizer)
    if not cfg.output_dir:  # (--output_dir=$OUT with OUT unset) wrote base/, adapter/ and merged/ into the working dir
        raise ValueError("output_dir: empty; name the run directory")
    _validate_run(cfg, "")
    if cfg.lora.r < 1:
        raise ValueError(f"lora.r: must be >= 1, got {cfg.lora.r}")
    # scale alpha / r: at 0 the adapter is a no-op whose gradients are zero, trained in vain; at .inf its scale made
    # every adapted output inf, and the run trained on NaN losses
    if not (math.isfinite(cfg.lora.alpha) and cfg.lora.alpha > 0):
        raise ValueError(f"lora.alpha: must be a finite number > 0 (the adapter's scale is alpha / r), "
                         f"got {cfg.lora.alpha}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ValueError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.lora.target_modules is not None and not cfg.lora.target_modules:
        raise ValueError("lora.target_modules: empty; leave it out for the mixers' lora_targets")
    if isinstance(cfg.lora.target_modules, str) and cfg.lora.target_modules != "all-linear":
        try:  # a string is a regular expression: a malformed one failed with re.error's traceback, the model loaded
            re.compile(cfg.lora.target_modules)
        except re.error as e:
            raise ValueError(f"lora.target_modules: {cfg.lora.target_modules!r} is not a regular expression ({e}); "
                             f"a string is one over whole module names, a list holds names or name suffixes") from None
    if cfg.lora.target_modules is not None and cfg.lora.include_mlp:
        raise ValueError("lora.include_mlp: only applies to the default targets (lora.target_modules left out); add "
                         "the MLP projections (gate_proj, up_proj, down_proj) to lora.target_modules instead")
    is_yaml = cfg.model.endswith((".yaml", ".yml"))
    if cfg.pretrain is not None:
        if not is_yaml:
            raise ValueError("pretrain: only applies when model is a zoo YAML (a fresh model to pretrain); "
                             "drop it to finetune the checkpoint")
        _validate_run(cfg.pretrain, "pretrain.")
        if cfg.pretrain.train.precision not in ("auto", cfg.train.precision):  # it was ignored without a word
            raise ValueError(f"pretrain.train.precision: {cfg.pretrain.train.precision}, but one accelerator runs both "
                             f"phases in the top-level train.precision ({cfg.train.precision}); set train.precision "
                             f"instead and leave pretrain.train.precision out")
        if cfg.pretrain.data.task is None:
            raise ValueError("pretrain.data.task: pretraining here is on a synthetic task; pretrain on text with "
                             "`zoo train` and finetune its checkpoint")
        try:  # else it failed after the run folder was made, naming no field
            find_config(cfg.model, "models")
        except FileNotFoundError as e:
            raise ValueError(f"model: no such model config {cfg.model!r} ({e})") from None
        # a mistyped target failed in wrap_lora, after the whole pretrain phase: checked on the model's skeleton
        from transformers import AutoModelForCausalLM

        from zoo.config import ZooConfig

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(cfg.model))
            _check_lora_targets(cfg.lora, skeleton)
            # (the finetune's first step came after the whole pretrain phase)
            for section, field in ((cfg.pretrain.train, "pretrain.train.state_passing"),
                                   (cfg.train, "train.state_passing")):
                if section.state_passing:
                    _check_state_passing(skeleton, field)
    elif is_yaml:
        raise ValueError(f"model: {cfg.model!r} is a zoo YAML (random weights); give a checkpoint folder, or add "
                         f"a pretrain section to train the base model first")
    else:
        from zoo.hub import check_model_ref

        check_model_ref(cfg.model)  # a missing folder, or an adapter folder (stacking a second LoRA is not supported)
        base = Path(cfg.model)
        for sub in ("merged", "adapter"):
            if base.is_dir() and base.resolve() == (Path(cfg.output_dir) / sub).resolve():
                # the run saved its merged model over its own base: the adapter it saved, which names that folder as
                # its base, then loaded onto the merged model and applied its change twice, without a word
                raise ValueError(f"output_dir: {cfg.output_dir!r} would write its {sub}/ over the base model "
                                 f"{cfg.model!r}, which the saved adapter names as its base; give another output_dir")
    return cfg


class ListDataset(Dataset):
    """Rows ``{"input_ids": LongTensor [T], "labels": LongTensor [T]}`` held in memory."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _jsonl_files(source: str | list[str], field: str = "data.source") -> list[str]:
    """The files that jsonl path(s) or glob(s) name, sorted, each once (a file matched under two spellings, such as
    './rows.jsonl' and the glob '*.jsonl', or through a symlink, is read once, as data.source's local files are).

    A path or glob that matches no file is refused by name (`field`, the config field), as zoo train's data.source
    refuses it: one of a list was dropped without a word, and the run trained on the other files' rows alone. Folders
    are no files (their jsonl files are named by glob)."""
    from zoo.data.text import distinct_files, matching_files

    patterns = [source] if isinstance(source, str) else list(source)
    files: list[str] = []
    for pattern in patterns:
        matches = matching_files(pattern)
        if not matches:  # (a folder, or a glob that matches folders only such as 'data/**', ended in IsADirectoryError)
            folder = f"; it is a folder: name its files ({os.path.join(pattern, '*.jsonl')!r})" \
                if os.path.isdir(os.path.expanduser(pattern)) else ""
            raise ValueError(f"{field}: no file matches {pattern!r}{folder}" + (
                "" if isinstance(source, str) else f" (of {list(source)!r})"))
        files.extend(matches)
    return distinct_files(files)


def read_jsonl(source: str | list[str], field: str = "data.source") -> list[dict[str, Any]]:
    """Rows of jsonl file(s) (paths or globs, sorted), each ``{"text"}`` or ``{"prompt", "completion"}`` (a row with
    the fields of both is refused); `field` (the config field that named them) is what errors name.

    A row whose text (or completion) is empty or only whitespace holds nothing to learn, so it is skipped, with a
    warning that counts them (it trained the model to end a text right after ``<bos>``, or a prompt at once); files
    that hold no other row are refused."""
    from zoo.data.text import DECOMPRESSION_ERRORS, open_data_file

    files = _jsonl_files(source, field)
    rows, empty = [], []
    for file in files:
        # lines end at "\n" alone (JSON Lines): str.splitlines also broke a row at the U+2028, U+2029 or U+0085 that a
        # JSON string holds unescaped (json.dumps(..., ensure_ascii=False) writes them so)
        try:
            with open_data_file(file) as f:  # decompressed: a rows.jsonl.gz was "not UTF-8 text (... byte 0x8b)"
                raw = f.read()
        except DECOMPRESSION_ERRORS as e:  # named as compressed but not so, cut short, or corrupt (zlib.error)
            raise ValueError(f"{file}: cannot read it ({type(e).__name__}: {e})") from e
        try:
            # utf-8-sig: a UTF-8 file that begins with a byte order mark (as Windows tools write one) was refused at
            # its first line, "Unexpected UTF-8 BOM", though datasets (data.source of zoo train) reads it
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:  # it said "'utf-8' codec can't decode byte 0xe9 in position 13", no file
            lineno = e.object[:e.start].count(b"\n") + 1  # (the bytes decoded: the file's, less a byte order mark)
            raise ValueError(f"{file}:{lineno}: not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); a jsonl "
                             f"file is UTF-8: re-encode it (e.g. from Latin-1)") from None
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # it said "line 1 column 9", the line of the row's own text
                raise ValueError(f"{file}:{lineno}: not a JSON object ({e.msg} at column {e.colno}); each line of "
                                 f"a jsonl file is one row such as {{\"text\": ...}}") from None
            if not isinstance(row, dict):  # it printed the whole value: a file's rows, for a one-line JSON array
                value = f"a JSON array of {len(row)} items" if isinstance(row, list) else f"{type(row).__name__} " \
                    f"{line.strip()[:40]!r}"
                raise ValueError(f"{file}:{lineno}: {value}, not a JSON object; a jsonl file holds one object per "
                                 f"line, such as {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}}")
            if not ({"text"} <= row.keys() or {"prompt", "completion"} <= row.keys()):
                raise ValueError(f"{file}:{lineno}: expected {{\"text\": ...}} or {{\"prompt\": ..., "
                                 f"\"completion\": ...}}, got keys {sorted(row)}")
            if "text" in row and row.keys() & {"prompt", "completion"}:  # it trained on the text alone, without a word,
                # where TRL's SFTTrainer takes such a row as prompt/completion (and appends eos to its text)
                both = sorted(row.keys() & {"prompt", "completion"})
                raise ValueError(f"{file}:{lineno}: holds both 'text' and {' and '.join(map(repr, both))}, so it is "
                                 f"neither a text row (loss on every token) nor a prompt/completion row (loss on the "
                                 f"completion only) for sure; keep the fields of one kind")
            for key in ("text",) if "text" in row else ("prompt", "completion"):  # a null one failed in the tokenizer
                if not isinstance(row[key], str):
                    raise ValueError(f"{file}:{lineno}: {key!r} must be a string, got {row[key]!r}")
                try:  # a lone surrogate escape (an emoji cut in half, '\ud83d') is no text: a tokenizer other than
                    row[key].encode("utf-8")  # 'byte' failed in "TypeError: TextEncodeInput must be Union[...]"
                except UnicodeEncodeError as e:
                    raise ValueError(f"{file}:{lineno}: {key!r} holds a lone surrogate {row[key][e.start]!r} at "
                                     f"character {e.start}, which is no text (half of a character cut in two; datasets "
                                     f"refuses it too): remove or repair it") from None
            if not row["text" if "text" in row else "completion"].strip():
                empty.append(f"{file}:{lineno}")
                continue
            rows.append(row)
    what = "'text' / 'completion'"
    if not rows:
        none = f" with text: all {len(empty)} have an empty or whitespace-only {what} (first {empty[0]})" \
            if empty else ""
        raise ValueError(f"{field}: {files} hold no rows{none}")
    if empty and os.environ.get("RANK", "0") == "0":  # once per launch: every process builds the datasets
        warnings.warn(f"{field}: skipped {len(empty)} of {len(rows) + len(empty)} rows whose {what} is empty or only "
                      f"whitespace, nothing to learn (first {empty[0]})", stacklevel=2)
    return rows


def encode_rows(rows: list[dict[str, Any]], tokenizer, seq_len: int | None = None, add_bos: bool = True,
                add_eos: bool = True) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Tokenize jsonl rows into training rows; labels are -100 on bos and on the prompt of prompt/completion
    rows (the loss is on the completion and eos only). Rows are cut to seq_len tokens; a row left with no
    target is dropped.

    The prompt is tokenized alone (as a prompt is at generation), the completion as the rest of prompt + completion
    (as TRL's SFTTrainer does) where the prompt's tokens begin those of the whole text; where they do not (a token
    that spans the boundary), the completion is tokenized alone, with a warning that counts such rows. Text that spells
    a special token stays text (`zoo.data.text.encode_texts`): rows whose text or completion ends in the eos token's
    text are counted in a warning.

    Returns:
        (rows of ``input_ids`` and ``labels`` LongTensor [T_i], number of rows dropped).
    """
    from zoo.data.text import document_wrap, encode_texts

    bos, eos = document_wrap(tokenizer, add_bos, add_eos)
    prompts = encode_texts(tokenizer, [r.get("prompt", "") if "text" not in r else "" for r in rows])
    bodies = encode_texts(tokenizer, [r["text"] if "text" in r else r["completion"] for r in rows])
    # a completion tokenized alone began as a text begins: a SentencePiece tokenizer (Llama's, Mistral's) put its
    # prefix space before it, and "2+2=" + "4" trained "2+2= 4", "A: " + "Paris" a second space before "Paris"
    paired = [i for i, r in enumerate(rows) if "text" not in r]
    wholes = encode_texts(tokenizer, [rows[i]["prompt"] + rows[i]["completion"] for i in paired])
    split = 0
    for i, whole in zip(paired, wholes):
        n = len(prompts[i])
        if len(whole) > n and whole[:n].tolist() == prompts[i].tolist():
            bodies[i] = whole[n:]
        else:
            split += 1
    if split and os.environ.get("RANK", "0") == "0":  # once per launch: every process builds the datasets
        warnings.warn(f"data: in {split} of {len(paired)} prompt/completion rows a token of prompt + completion spans "
                      f"the boundary (the prompt's tokens do not begin the whole text's), so the completion is "
                      f"tokenized alone: end the prompt before a space rather than with it ('A:' + ' Paris')",
                      stacklevel=2)
    # rows written for TRL's SFTTrainer may end in the eos token's text, which it takes for the eos token (and appends
    # none): here special-token spellings stay text, and the model learned to write '</s>' out before its eos
    eos_text = getattr(tokenizer, "eos_token", None)
    spelled = [r for r in rows if eos_text and (r["text"] if "text" in r else r["completion"]).rstrip().endswith(
        eos_text)]
    if spelled and os.environ.get("RANK", "0") == "0":
        warnings.warn(f"data: {len(spelled)} of {len(rows)} rows end in {eos_text!r}, the eos token's text, which is "
                      f"tokenized as plain text, not as the eos token"
                      + (" (data.add_eos appends that after it)" if eos else "") + ": the model learns to write it "
                      "out; remove it from the rows" + ("" if eos else " and set data.add_eos: true"), stacklevel=2)
    out, dropped = [], 0
    for prompt, body in zip(prompts, bodies):
        ids = bos + prompt.tolist() + body.tolist() + eos
        labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + body.tolist() + eos
        if seq_len is not None:
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            continue
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return out, dropped


def pad_collate(rows: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: input_ids, labels (-100 on pads) and attention_mask [B, T]; rows of equal
    length get no attention_mask."""
    lengths = [len(r["input_ids"]) for r in rows]
    T = max(lengths)
    if min(lengths) == T:
        return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        input_ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """What a jsonl row trains on (its text, or its prompt and completion), other fields left out: rows equal in it
    are copies."""
    return (row["text"],) if "text" in row else (row["prompt"], row["completion"])


def build_datasets(data: DataSection, tokenizer=None, n_train: int = 0) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets of `data`; a synthetic task gets n_train fresh rows (one per row trained on)."""
    if data.task is not None:
        kwargs = dict(seq_len=data.seq_len, **data.task_kwargs)
        train = SyntheticDataset(data.task, max(1, n_train), seed=data.seed, **kwargs)
        evaluation = SyntheticDataset(data.task, data.n_eval, seed=data.seed + 1, **kwargs)
        train[0]  # noqa: B018  (invalid task arguments raise here, naming the argument)
        return train, evaluation
    if tokenizer is None:
        raise ValueError("data.source: jsonl data needs a tokenizer")
    rows = read_jsonl(data.source)
    if data.eval_source is not None:
        eval_rows = read_jsonl(data.eval_source, "data.eval_source")
    else:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(data.seed)).tolist()
        n_eval = max(1, round(data.holdout * len(rows))) if data.holdout > 0 and len(rows) > 1 else 0
        if n_eval >= len(rows) > 1:  # it said "data.source: no training rows with a target left"
            raise ValueError(f"data.holdout: {data.holdout} of {len(rows)} rows holds out all of them, leaving none to "
                             f"train on; lower it, add rows, or give data.eval_source")
        eval_rows = [rows[i] for i in order[:n_eval]]
        # a row repeated in the file was held out and trained on (its copies), so the evaluation measured rows the
        # model had learned: copies of a held-out row are held out of training too, as pretraining's holdout (keyed
        # by the text) holds out every copy of a document
        held = {_row_key(r) for r in eval_rows}
        kept = [rows[i] for i in order[n_eval:] if _row_key(rows[i]) not in held]
        if not kept and n_eval:
            raise ValueError(f"data.holdout: the {len(rows) - n_eval} rows not held out of {data.source!r} are all "
                             f"copies of held-out rows, leaving none to train on; add distinct rows, or give "
                             f"data.eval_source")
        if len(kept) < len(rows) - n_eval and os.environ.get("RANK", "0") == "0":  # (once per launch)
            warnings.warn(f"data.holdout: {len(rows) - n_eval - len(kept)} of the {len(rows) - n_eval} rows not held "
                          f"out of {data.source!r} are copies of held-out rows and are not trained on (the "
                          f"evaluation would measure rows the model learned)", stacklevel=2)
        rows = kept
    train, dropped = encode_rows(rows, tokenizer, data.seq_len, data.add_bos, data.add_eos)
    # (evaluation rows were dropped without a word: the accuracy before and after was measured on fewer rows than held)
    evaluation, dropped_eval = encode_rows(eval_rows, tokenizer, data.seq_len, data.add_bos, data.add_eos)
    if (dropped or dropped_eval) and os.environ.get("RANK", "0") == "0":  # once per launch: every process builds them
        rows_dropped = " and ".join(f"{n} of {len(held)} {kind} rows" for n, held, kind in (
            (dropped, rows, "training"), (dropped_eval, eval_rows, "evaluation")) if n)
        # (without a seq_len, only a row of one token is left without a target: it said "past seq_len=None")
        print(f"data: dropped {rows_dropped} whose completion lies past seq_len={data.seq_len}" if data.seq_len else
              f"data: dropped {rows_dropped} of one token, which leave nothing to predict (data.add_bos and add_eos "
              f"are off)")
    if not train:
        raise ValueError("data.source: no training rows with a target left")
    if not evaluation:
        raise ValueError("data.eval_source: no evaluation rows with a target" if data.eval_source is not None else
                         f"data.holdout: no evaluation rows held out of {len(rows) + len(eval_rows)} rows (at least "
                         f"2 rows and a holdout above 0 are needed); add rows or give data.eval_source")
    return ListDataset(train), ListDataset(evaluation)


def task_vocab_size(data: DataSection) -> int | None:
    """The vocabulary a synthetic task draws from (None for jsonl data)."""
    if data.task is None:
        return None
    import inspect

    return data.task_kwargs.get("vocab_size", inspect.signature(TASKS[data.task]).parameters["vocab_size"].default)


# ---- training and evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str) -> dict[str, float]:
    """Teacher-forced cross-entropy and accuracy over the supervised targets (labels != -100) of every batch:
    for a synthetic task the recall accuracy, for prompt/completion rows the completion-token accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        # an output object also where the config's return_dict is False (a base saved with it): its tuple has no .logits
        logits = model(**batch, use_cache=False, **_dict_output(model)).logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not keep.any():
            continue
        chosen = logits[keep].float()  # (targets, V)
        correct += int((chosen.argmax(-1) == targets[keep]).sum())
        total += int(keep.sum())
        loss_sum += float(F.cross_entropy(chosen, targets[keep], reduction="sum"))
    model.train(was_training)
    return {"loss": loss_sum / max(1, total), "accuracy": correct / max(1, total), "n_targets": total}


def _cycle(loader) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class TrainingStopped(KeyboardInterrupt):
    """A finetune phase stopped by SIGTERM or Ctrl-C after saving its last completed step (`checkpoint`)."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"stopped after step {step}" + (f", saved in {checkpoint}; the same command continues "
                                                         f"from there" if checkpoint else ""))
        self.checkpoint, self.step = checkpoint, step


_CHECKPOINT = "state.pt"


def _load_checkpoint(folder: Path | None, stamp: Any, accelerator, desc: str) -> dict[str, Any] | None:
    """The checkpoint a stopped run of this phase left in `folder`, if it was made with the same `stamp`."""
    file = folder / _CHECKPOINT if folder is not None else None
    if file is None or not file.is_file():
        return None
    from zoo.hub import readable_weights

    # (a file copied in part or corrupted: torch's traceback, naming no file)
    unreadable = {"names": re.compile(r"state\.pt|rng-\d+\.pt"), "fix": f"remove {folder} to start the phase over"}
    with readable_weights(folder, **unreadable):
        saved = torch.load(file, map_location="cpu", weights_only=True)
    now = json.loads(json.dumps(stamp))
    if saved.get("stamp") != now:
        # which settings differ: a jsonl file only touched (copied, checked out) or an older version's checkpoint was
        # "another config" too, and the user could not tell why the stopped run's steps were being thrown away
        was = saved.get("stamp")
        old, new = (_flat(was), _flat(now)) if isinstance(was, dict) and isinstance(now, dict) else ({}, {})
        missing = object()
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
        what = {"data_files": "data_files (the jsonl files' paths, sizes or modification times)",
                "base": "base (the base model's path or weight files' sizes or modification times)"}
        named = [what.get(k, k) for k in changed[:6]] + ([f"{len(changed) - 6} more"] if len(changed) > 6 else [])
        accelerator.print(f"{desc}: {folder} holds a checkpoint of another config; starting over"
                          + (f" (it differs in {', '.join(named)})" if named else ""))
        return None
    if "world" in saved and saved["world"] != accelerator.num_processes:  # (checkpoints before it are not checked)
        # each process reads its own share of the rows: another count replayed the wrong rows, without a word
        raise ValueError(f"{desc}: {folder} was written by {saved['world']} processes, this run has "
                         f"{accelerator.num_processes}; the data order is per process: continue with the same number "
                         f"of processes, or remove {folder} to start the phase over")
    rng = folder / f"rng-{accelerator.process_index}.pt"
    with readable_weights(folder, **unreadable):
        saved["rng"] = torch.load(rng, weights_only=True) if rng.is_file() else None
    if saved["rng"] is not None and saved["rng"].get("step", saved["step"]) != saved["step"]:
        # each process writes its RNG file before the main process renames the checkpoint into place: a run killed
        # between the two left RNG states of a later step than the weights, and the resumed run drew other dropout
        # masks than an uninterrupted one, without a word
        warnings.warn(f"{desc}: {rng.name} holds the RNG state of step {saved['rng']['step']}, the checkpoint step "
                      f"{saved['step']} (a save was interrupted): continuing with the current RNG, so LoRA dropout "
                      f"draws other masks than an uninterrupted run would", stacklevel=2)
        saved["rng"] = None
    return saved


def run_training(accelerator, model: nn.Module, dataset: Dataset, section: Any, pad_id: int, desc: str,
                 checkpoint: Path | None = None, stamp: Any = None) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train the parameters of `model` that require grad: AdamW (`zoo.train.build_optimizer`), the warmup +
    cosine/wsd schedule of `zoo.train.lr_at`, gradient clipping, gradient accumulation, a tqdm bar.

    checkpoint: a folder for the phase's checkpoint (`LoopSection.checkpoint_every`, and the last step, which the
    caller removes once the phase's result is saved; None: none). A checkpoint found there with the same `stamp` (the
    settings that define the phase) is continued from; one of another stamp is left for this run to overwrite.

    Returns:
        (the unwrapped model, logged rows {"step", "loss", "lr"}, and "aux_loss" for an MoE model: `loss` is the cross
        entropy alone, `aux_loss` the load-balancing part of the objective, coef · aux loss, as zoo train logs them).

    Raises:
        TrainingStopped (a KeyboardInterrupt) after saving, when SIGTERM or Ctrl-C stopped the phase.
    """
    from zoo.train import _set_torch_rng_state, _StopRequest, _torch_rng_state

    t = section.train
    inputs = ModelInputs.of(_unwrap(model))  # a PeftModel's forward hides which fields the model takes
    resumed = _load_checkpoint(checkpoint, stamp, accelerator, desc)
    # a checkpoint saved before NO_DECAY_NAMES were exempt by name (modules_to_save over a transformers Mamba mixer,
    # whose A_log was decayed) continues as it trained: its optimizer state is for those groups
    by_name = resume_by_name(model, section.optim, None if resumed is None
                             else [len(g["params"]) for g in resumed["optimizer"]["param_groups"]])
    if not by_name:
        accelerator.print(f"{desc}: {checkpoint}'s run decayed the parameters named {', '.join(NO_DECAY_NAMES)} (it "
                          f"was saved before they were exempt by name), and goes on decaying them, as its optimizer "
                          f"state holds them")
    optimizer = build_optimizer(model, section.optim, by_name=by_name)
    generator = torch.Generator().manual_seed(section.data.seed)
    loader = DataLoader(dataset, batch_size=t.micro_batch_size, shuffle=isinstance(dataset, ListDataset),
                        generator=generator, collate_fn=lambda rows: pad_collate(rows, pad_id))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    named = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    params = list(named.values())
    batches = _cycle(loader)
    log: list[dict[str, float]] = []
    # the steps' (cross entropy, MoE aux part) since the last log, on the device (read back when the window is logged or
    # saved: no host sync per step for them); a resumed run's as floats
    window: list[torch.Tensor | list[float]] = []
    # an MoE objective adds coef · its load-balancing loss: `loss` logs the cross entropy alone, `aux_loss` that part
    base = _unwrap(accelerator.unwrap_model(model))
    has_aux = _has_aux_loss(base)
    start = 0
    if resumed is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(resumed["params"][n])
        optimizer.load_state_dict(resumed["optimizer"])
        if accelerator.scaler is not None and resumed.get("scaler") is not None:  # fp16's loss scale: it restarted at
            # its initial value, and the steps its overflows skip differed from an uninterrupted run's
            accelerator.scaler.load_state_dict(resumed["scaler"])
        start, log = resumed["step"], resumed["log"]
        # (a checkpoint before the aux part was logged apart kept the objective alone)
        window = [v if isinstance(v, list) else [v, 0.0] for v in resumed["window"]]
        for _ in range(start * t.grad_accum):  # the same rows in the same order as an uninterrupted run
            next(batches)
        if resumed["rng"] is not None:
            torch.set_rng_state(resumed["rng"]["cpu"])
            if torch.cuda.is_available() and resumed["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])
        accelerator.print(f"{desc}: continuing from step {start} of {t.max_steps} ({checkpoint})")

    def save(completed: int) -> None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state(), "step": completed,
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
        torch.save(rng, rng_file.with_name(f".{rng_file.name}.tmp"))
        os.replace(rng_file.with_name(f".{rng_file.name}.tmp"), rng_file)
        state = optimizer.state_dict()  # (a collective under some distributed optimizers: every process)
        kept = _window_values(window, accelerator.device) if window else None
        if accelerator.num_processes > 1 and window:  # each process holds its share of the steps' losses: the
            # resumed processes all load this one list, so it keeps their mean, as the log step takes it
            kept = accelerator.reduce(kept, reduction="mean")
        kept = kept.tolist() if kept is not None else []
        if accelerator.is_main_process:  # written beside and renamed: an interrupted save keeps the last one
            tmp = checkpoint / f".{_CHECKPOINT}.tmp"
            torch.save({"stamp": json.loads(json.dumps(stamp)), "step": completed, "world": accelerator.num_processes,
                        "window": kept,
                        "params": {n: p.detach().cpu() for n, p in named.items()}, "optimizer": state,
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                        "log": log}, tmp)
            os.replace(tmp, checkpoint / _CHECKPOINT)
        accelerator.wait_for_everyone()

    bar = None
    if t.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=start, desc=desc, dynamic_ncols=True)
    carried = None  # state_passing: the cache of the previous micro-batch
    world = accelerator.num_processes
    completed, updating = start, False
    step_rng: tuple[int, dict[str, Any]] | None = None
    model.train()
    try:
        with _StopRequest() as stop:
            for step in range(start, t.max_steps):
                step_rng = (completed, _torch_rng_state())  # for a save interrupted mid-step: the last step's RNG
                lr = lr_at(step, section)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [next(batches) for _ in range(t.grad_accum)]
                counts = [count_targets(b["labels"]) for b in micro]
                if world == 1:
                    scale: float | torch.Tensor = 1.0 / max(1, sum(counts))
                else:  # a mean over every process's targets (DDP averages the gradients, hence world / all), as
                    # transformers' Trainer averages tokens across devices; each process's own count weighed a
                    # short row's tokens above a long row's
                    n_all = accelerator.reduce(torch.tensor(float(sum(counts)), device=accelerator.device),
                                               reduction="sum")
                    scale = world / n_all.clamp(min=1.0)
                loss = torch.zeros((), device=accelerator.device)
                aux_parts: list[torch.Tensor] = []
                for i, batch in enumerate(micro):
                    if t.state_passing:
                        with contextlib.nullcontext() if i == t.grad_accum - 1 else accelerator.no_sync(model):
                            step_loss, carried = _state_passing_step(model, batch, scale, inputs, carried,
                                                                     aux=aux_parts)
                            accelerator.backward(step_loss)
                        loss += step_loss.detach()
                        continue
                    loss += forward_backward(model, batch, scale, inputs,
                                             backward=lambda tensors, grads: accelerator.backward(tensors[0]),
                                             no_sync=lambda: accelerator.no_sync(model),
                                             sync_last=i == t.grad_accum - 1, n_targets=counts[i], aux=aux_parts)
                step_aux = sum(aux_parts, torch.zeros((), device=accelerator.device))
                updating = True
                if section.optim.grad_clip:
                    accelerator.clip_grad_norm_(params, section.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                updating, completed = False, step + 1
                # this process's share (the processes' mean is the all-token mean): the cross entropy, the aux part
                window.append(torch.stack([loss - step_aux, step_aux.to(loss)]))
                if completed % t.log_every == 0 or completed == t.max_steps:
                    mean, aux_mean = accelerator.reduce(_window_values(window, accelerator.device).mean(0),
                                                        reduction="mean").tolist()
                    log.append({"step": completed, "loss": mean, "lr": lr}
                               | ({"aux_loss": aux_mean} if has_aux else {}))
                    window = []
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if checkpoint is not None and t.checkpoint_every and completed % t.checkpoint_every == 0 \
                        and completed < t.max_steps:
                    save(completed)
                requested = stop.requested
                if accelerator.num_processes > 1:  # the processes stop at the same step
                    flag = torch.tensor(float(requested), device=accelerator.device)
                    requested = accelerator.reduce(flag, reduction="sum").item() > 0
                if requested and completed < t.max_steps:
                    if checkpoint is not None:
                        save(completed)
                    raise TrainingStopped(checkpoint, completed)
            if checkpoint is not None and completed > start:
                # the last step too, which the caller removes once it saved the phase's result: a stop in the
                # evaluation before that (Ctrl-C, or SIGTERM under main's sigterm_interrupts) left at best the last
                # checkpoint_every step, or nothing, and the same command trained the phase again
                save(completed)
    except TrainingStopped:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step
        if checkpoint is None or updating:  # parameters may be half-updated: keep the last checkpoint
            raise
        optimizer.zero_grad(set_to_none=True)
        if step_rng is not None and step_rng[0] == completed:  # the unfinished step's LoRA dropout drew from the RNG,
            # and the resumed run, which redoes that step, drew other masks than an uninterrupted one
            _set_torch_rng_state(step_rng[1])
        save(completed)
        raise TrainingStopped(checkpoint, completed) from None
    finally:
        if bar is not None:
            bar.close()
    # without accelerate's autocast wrapper: evaluation, the round-trip check and saving see the fp32 model, as
    # the evaluation before training did (with it, bf16 logits failed the check against the reloaded adapter)
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.free_memory()  # drop the accelerator's references to this phase's model and optimizer
    return unwrapped, log


def _state_passing_step(model: nn.Module, batch: dict[str, torch.Tensor], scale: float | torch.Tensor,
                        inputs: ModelInputs, carried: Any, aux: list[torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, Any]:
    """One micro-batch from the previous one's final states (zeros for the first, or when the row count
    changes); returns (the weighted loss to back-propagate, the detached cache for the next). scale: the weight
    of one target, as in `zoo.train.forward_backward` (a 0-d device tensor under several processes); aux, as
    forward_backward's, gets an MoE model's load-balancing part of the loss (weighted and scaled), detached."""
    from zoo.cache import ZooCache

    rows = batch["input_ids"].shape[0]
    if carried is not None and carried[1] != rows:
        carried = None
    out = model(**inputs.kwargs(batch), **{inputs.cache: carried[0] if carried is not None else None}, use_cache=True)
    cache = output_cache(out)
    if not isinstance(cache, ZooCache) or not cache.recurrent_only():
        raise ValueError("train.state_passing: needs a model whose layers are all recurrent (mamba, mamba2, gla); "
                         f"this one returned {type(cache).__name__} with attention (KV) layers or none")
    cache.detach_()
    n = count_targets(batch["labels"])
    if aux is not None and (part := _aux_part(model, out, n)) is not None:
        aux.append(part * scale)
    return _weighted_loss(out, n) * scale, (cache, rows)


def _window_values(window: list, device) -> torch.Tensor:
    """The logged steps' (cross entropy, aux part) as one [steps, 2] tensor on `device` (a host sync where they are
    on the device: once per log or save)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in window])


def _eval_loader(dataset: Dataset, batch_size: int, pad_id: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda rows: pad_collate(rows, pad_id))


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}, use_cache=False,
                **_dict_output(model)).logits.float()
    model.train(was_training)
    return out


def _check_vocab(model: nn.Module, data: DataSection, prefix: str) -> None:
    need = task_vocab_size(data)
    have = model.get_input_embeddings().num_embeddings
    if need is not None and need > have:
        raise ValueError(f"{prefix}data.task_kwargs.vocab_size: the task draws from {need} tokens but the model "
                         f"has {have} embeddings; set vocab_size <= {have}")


def _check_positions(model: nn.Module, datasets: tuple[Dataset, ...], data: DataSection) -> None:
    """Refuse rows longer than the absolute positions the model learns (`zoo.train.position_table`: GPT-2's wpe,
    OPT's embed_positions): its first forward failed on them with "IndexError: index out of range in self"."""
    table = position_table(model)
    if table is None:
        return
    # (a task's rows all have its length; jsonl rows are held in memory)
    longest = max(max(len(r["input_ids"]) for r in d.rows) if isinstance(d, ListDataset) else len(d[0]["input_ids"])
                  for d in datasets if len(d))
    if longest > table[1]:
        fix = f"lower data.seq_len to <= {table[1]}" if data.seq_len is not None or data.task is not None else \
            f"set data.seq_len <= {table[1]} to cut the rows to them"
        raise ValueError(f"data.seq_len: rows of up to {longest} tokens, but {type(model).__name__} learns {table[1]} "
                         f"absolute positions ({table[0]}, config max_position_embeddings); {fix}")


def pretrain_base(cfg: FinetuneConfig, accelerator, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Train a fresh model from the zoo YAML cfg.model on cfg.pretrain (every parameter) and save it to
    out_dir/base, or reuse the base a previous run saved with the same pretrain section."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig
    from zoo.data.synthetic import shared_item

    p = cfg.pretrain
    n_rows = p.train.max_steps * p.train.micro_batch_size * p.train.grad_accum * accelerator.num_processes
    # the finetune holds out the rows of seed data.seed + 1: under pretrain.data.seed = data.seed + 1 they were the
    # first rows the base pretrained on, and the accuracy before and after was measured on its training rows
    shared = shared_item(p.data.seed, n_rows, cfg.data.seed + 1, cfg.data.n_eval) \
        if cfg.data.task is not None and cfg.data.task == p.data.task else None
    if shared is not None:
        raise ValueError(f"pretrain.data.seed: {p.data.seed} pretrains on the {cfg.data.task} rows that the finetune "
                         f"holds out to evaluate (seed data.seed + 1 = {cfg.data.seed + 1}: its row {shared[1]} is "
                         f"pretraining row {shared[0]} of {n_rows}), so the accuracy before and after would be "
                         f"measured on rows the base trained on; set pretrain.data.seed and data.seed a few apart, "
                         f"the pretrain's other than data.seed + 1")
    base_dir = out_dir / "base"
    # the top-level train.precision runs the pretrain phase too (one accelerator): a base pretrained in another
    # precision was reused; the one it resolved to, as auto takes the launch's (a bf16 launch's base was reused by fp32)
    stamp = {"model": cfg.model, "model_yaml": find_config(cfg.model, "models").read_text(),
             "pretrain": cfg.to_dict()["pretrain"], "precision": _effective_precision(accelerator)}
    stamp_file = base_dir / "pretrain_config.json"

    def phase(settings: dict[str, Any]) -> dict[str, Any]:
        # less the settings of logging (a rerun with another log_every or progress bar pretrained the same base again)
        # and the model YAML's path as typed, which its text stands for ('jamba-tiny.yaml', the packaged name, after
        # 'configs/models/jamba-tiny.yaml', or the path from another working directory, pretrained the base again)
        return {k: v for k, v in _phase_stamp(settings).items() if k != "model"}

    if stamp_file.is_file() and phase(json.loads(stamp_file.read_text())) == phase(stamp):
        accelerator.print(f"pretrain: reusing {base_dir} (same model, pretrain section and precision)")
        return base_dir, json.loads((base_dir / "pretrain_result.json").read_text())
    set_seed(p.train.seed)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(cfg.model)).float().to(accelerator.device)
    _check_vocab(model, p.data, "pretrain.")
    train_set, eval_set = build_datasets(p.data, n_train=n_rows)
    eval_loader = _eval_loader(eval_set, p.train.eval_batch_size, 0)
    t0 = time.perf_counter()
    model, log = run_training(accelerator, model, train_set, p, 0, "pretrain", out_dir / "pretrain-checkpoint",
                              phase(stamp))
    result = {"seconds": time.perf_counter() - t0, "log": log,
              "eval": evaluate(model, eval_loader, accelerator.device)}
    accelerator.print(f"pretrain: {p.train.max_steps} steps in {result['seconds']:.0f}s, accuracy on its own task "
                      f"{result['eval']['accuracy']:.1%}")
    if accelerator.is_main_process:
        # the earlier base's stamp goes first: a save interrupted after the weights were overwritten left it, and a
        # rerun of the earlier pretrain section reused this run's weights as its own
        stamp_file.unlink(missing_ok=True)
        from zoo.eval.common import write_text_atomically

        model.save_pretrained(base_dir, safe_serialization=True)
        # written beside and renamed over: a stamp cut short by a stop mid-write stopped every rerun at reading it
        # (JSONDecodeError, naming no file), and a result cut short behind a whole stamp would have too
        write_text_atomically(json.dumps(result, indent=1), base_dir / "pretrain_result.json")
        write_text_atomically(json.dumps(stamp, indent=1), stamp_file)
        shutil.rmtree(out_dir / "pretrain-checkpoint", ignore_errors=True)  # the base is saved: done with it
    accelerator.wait_for_everyone()
    return base_dir, result


def _checkpoint_dtype(base_path: str | Path) -> torch.dtype | None:
    """The floating dtype a checkpoint's config records (None: none recorded)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(str(base_path)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _base_identity(base_path: str | Path) -> Any:
    """A base model as a finetune checkpoint records it: a local folder by its weight files' names, sizes and
    modification times (a base pretrained again is another base), a hub id by its name."""
    folder = Path(base_path)
    if not folder.is_dir():
        return str(base_path)
    return [str(folder), *([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
                           if f.suffix in (".safetensors", ".bin"))]


def _effective_precision(accelerator) -> str:
    """The precision a run trains in, in train.precision's words (auto resolved to the launch's or the device's): what
    the stamps of its base and checkpoints record (a stamp of auto matched runs in any precision)."""
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision


def _phase_stamp(settings: dict[str, Any]) -> dict[str, Any]:
    """What a phase's checkpoint must agree on to be continued: its settings less those of logging and saving
    (a rerun with another log_every or progress bar continues)."""
    out = json.loads(json.dumps(settings))
    # the sections: the settings, their dicts and the dicts of their lists (train_synthetic's curriculum phases)
    nested = [v for v in out.values() if isinstance(v, dict)]
    nested += [p for v in out.values() if isinstance(v, list) for p in v if isinstance(p, dict)]
    for section in [out, *nested]:
        train = section.get("train")
        if isinstance(train, dict):
            for key in ("log_every", "progress_bar", "checkpoint_every", "eval_batch_size"):
                train.pop(key, None)
    return out


def _refuse_fsdp(accelerator, command: str) -> None:
    """Raise under FSDP: `run_training`'s callers save the trained model (and its checkpoints) from the main process
    alone, and gathering FSDP-sharded weights takes every process (the main process waited for the others forever)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(f"processes: {command} does not run under FSDP (accelerate's distributed_type FSDP, as "
                         f"configs/accelerate/fsdp.yaml sets): it saves from the main process alone; launch it with "
                         f"configs/accelerate/ddp.yaml")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run a finetune config end to end (see the module docstring); returns what finetune_result.json holds."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
    from zoo.hub import load_model_not_adapter, peft_wrapping

    reset_accelerate_state()  # a run may follow another in the same process with other settings
    accelerator = Accelerator(mixed_precision=_run_precision(cfg.train.precision))  # the launch's under auto
    _refuse_fp16_without_autocast(accelerator, cfg.train.precision)
    device = accelerator.device
    out_dir = Path(cfg.output_dir)
    _refuse_lone_processes(accelerator, out_dir, "finetune and save")  # (raced writes of adapter/, merged/)
    _progress_bars_on_main_only(accelerator)
    _refuse_fsdp(accelerator, "zoo finetune")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "finetune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t_start = time.perf_counter()
    result: dict[str, Any] = {"model": cfg.model}
    if cfg.pretrain is not None:
        base_path, result["pretrain"] = pretrain_base(cfg, accelerator, out_dir)
        base_path = base_path.resolve()  # the saved adapter names its base by this path: loadable from anywhere
    else:
        base_path = Path(cfg.model).resolve() if Path(cfg.model).is_dir() else cfg.model

    tokenizer = None
    if cfg.data.source is not None or cfg.tokenizer is not None:
        from zoo.data.text import load_tokenizer, special_id_outside
        from zoo.hub import holds_tokenizer

        # a hub id is the checkpoint's tokenizer too (it fell back to 'byte': a 50K-token model trained on byte ids); a
        # folder's is any tokenizer file, as zoo train takes it (a folder of tokenizer.json alone finetuned on bytes)
        has_own = not Path(base_path).is_dir() or holds_tokenizer(base_path)
        tokenizer = load_tokenizer(cfg.tokenizer or (str(base_path) if has_own else "byte"))
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    saved_tokenizer = tokenizer  # what adapter/ and merged/ hold: a synthetic task's run left the base's out
    if saved_tokenizer is None and Path(base_path).is_dir():
        from zoo.hub import load_folder_tokenizer

        saved_tokenizer = load_folder_tokenizer(base_path)

    set_seed(cfg.train.seed)
    # a hub adapter repo loaded as its base model with the adapter in it, and failed after training (no config.json)
    model = load_model_not_adapter(str(base_path), dtype=torch.float32).to(device)
    _check_vocab(model, cfg.data, "")
    _check_lora_targets(cfg.lora, model)
    if cfg.train.state_passing:
        _check_state_passing(model, "train.state_passing")
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"tokenizer: has {len(tokenizer)} tokens but the model only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings")
    if tokenizer is not None and (outside := special_id_outside(tokenizer,
                                                                model.get_input_embeddings().num_embeddings)):
        raise ValueError(f"tokenizer: {outside[0]}: the rows would end or be padded with it; give the tokenizer "
                         f"the model was trained with")
    n_rows = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
    train_set, eval_set = build_datasets(cfg.data, tokenizer, n_train=n_rows)
    _check_positions(model, (train_set, eval_set), cfg.data)
    eval_loader = _eval_loader(eval_set, cfg.train.eval_batch_size, pad_id)
    probe_batch = next(iter(_eval_loader(eval_set, min(8, len(eval_set)), pad_id)))
    result["before"] = evaluate(model, eval_loader, device)
    accelerator.print(f"before: accuracy {result['before']['accuracy']:.1%}, loss {result['before']['loss']:.4f} "
                      f"({result['before']['n_targets']} targets)")

    lora = cfg.lora
    with accelerator.autocast():  # the bypass check runs the kernels training will run
        model = wrap_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                          target_modules=lora.target_modules, include_mlp=lora.include_mlp,
                          check_forward=lora.check_forward, verbose=accelerator.is_main_process,
                          use_rslora=lora.use_rslora, use_dora=lora.use_dora, modules_to_save=lora.modules_to_save)
    result["coverage"] = {k: v for k, v in model.zoo_lora_report.items() if k != "adapted"}
    t0 = time.perf_counter()
    stamp = cfg.to_dict() | {"base": _base_identity(base_path)}  # another base's checkpoint is not continued
    if cfg.data.source is not None:  # nor one trained on rows edited since: the replayed order fell on other rows
        stamp["data_files"] = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns]
                               for f in _jsonl_files(cfg.data.source)]
    # but the folders and files as spelled: the checkpoint lies in output_dir, the base and the rows are named by their
    # resolved paths above, the evaluation rows train nothing (only whether they are held out of data.source does), and
    # a tokenizer folder by its resolved path ('--output_dir=runs/x/' after a stop of '--output_dir=runs/x', or
    # './rows.jsonl' after 'rows.jsonl', started the phase over, overwriting the checkpoint)
    del stamp["output_dir"], stamp["model"], stamp["data"]["source"]
    stamp["data"]["eval_source"] = cfg.data.eval_source is not None
    if cfg.tokenizer is not None and Path(cfg.tokenizer).is_dir():
        stamp["tokenizer"] = str(Path(cfg.tokenizer).resolve())
    # nor what only evaluates or checks, which a resumed run redoes in full: a rerun with another data.n_eval (the
    # evaluation rows of a task) or lora.check_forward started the phase over, overwriting the checkpoint
    del stamp["data"]["n_eval"], stamp["lora"]["check_forward"]
    stamp["train"]["precision"] = _effective_precision(accelerator)  # nor one trained in another precision
    checkpoint = out_dir / "finetune-checkpoint"
    model, result["log"] = run_training(accelerator, model, train_set, cfg, pad_id, "finetune", checkpoint,
                                        _phase_stamp(stamp))
    result["train_seconds"] = time.perf_counter() - t0
    result["adapted"] = evaluate(model, eval_loader, device)
    trained_logits = _logits(model, probe_batch, device)

    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    if accelerator.is_main_process:
        from zoo.hub import ADAPTER_DATA_FILE, TOKENIZER_FAMILY

        # an earlier run's into the same output_dir: its tokenizer files (this run saving none, or others) and its rows'
        # record stayed beside this adapter, and zoo generate and zoo eval read them as this adapter's
        for name in (*TOKENIZER_FAMILY, ADAPTER_DATA_FILE):
            (adapter_dir / name).unlink(missing_ok=True)
        model.save_pretrained(adapter_dir)
        if saved_tokenizer is not None:
            saved_tokenizer.save_pretrained(adapter_dir)
        if cfg.data.source is not None:  # how its rows began, as merged/'s config records it (zoo.hub.load_causal_lm
            # reads it: zoo generate and zoo eval take the adapter folder too, with its base model's config)
            (adapter_dir / ADAPTER_DATA_FILE).write_text(json.dumps({"add_bos": cfg.data.add_bos}) + "\n")
    accelerator.wait_for_everyone()
    # the saved adapter on a freshly loaded base: what a user of the checkpoint gets
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).to(device)
    with peft_wrapping():
        reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
    reload_logits = _logits(reloaded, probe_batch, device)
    merged = reloaded.merge_and_unload()
    merged_logits = _logits(merged, probe_batch, device)
    result["reload_max_abs_diff"] = (reload_logits - trained_logits).abs().max().item()
    result["merge_max_abs_diff"] = (merged_logits - reload_logits).abs().max().item()
    scale = trained_logits.abs().max().item()
    # not (diff <= tol): a NaN difference (a diverged run's NaN or inf logits) passed `diff > tol`, and the run saved a
    # NaN merged model and reported success
    if not (result["reload_max_abs_diff"] <= 1e-4 * max(1.0, scale)
            and result["merge_max_abs_diff"] <= 1e-3 * max(1.0, scale)):
        why = "" if math.isfinite(scale) and math.isfinite(result["reload_max_abs_diff"]) else \
            " (non-finite logits: the training diverged; lower optim.lr)"
        raise RuntimeError(f"adapter round trip changed the logits: reload {result['reload_max_abs_diff']:.3e}, "
                           f"merge {result['merge_max_abs_diff']:.3e} (max |logit| {scale:.2f}){why}")
    # trained and checked in fp32; saved (and evaluated) in the base checkpoint's own dtype, as a user reloads it: a
    # bf16 base's merged checkpoint was fp32, twice its size, and loaded as fp32
    base_dtype = _checkpoint_dtype(base_path)
    if base_dtype is not None and base_dtype != torch.float32:
        # but for what a zoo model keeps in fp32 in a half model (Mamba's A_log and D), as from_pretrained keeps it:
        # the cast rounded a bf16 base's fp32 A_log, which no adapter trains, to bf16
        keep = merged.keep_in_fp32_names() if hasattr(merged, "keep_in_fp32_names") else []
        kept = {name: merged.get_parameter(name).data for name in keep}
        merged = merged.to(base_dtype)
        for name, data in kept.items():
            merged.get_parameter(name).data = data
        result["merged_dtype"] = str(base_dtype).removeprefix("torch.")
    if cfg.data.source is not None:  # how its rows began, for zoo generate's prompt (zoo.eval.common.trained_with_bos)
        merged.config.add_bos = cfg.data.add_bos
    if accelerator.is_main_process:  # the tokenizer's eos / pad / bos fill the config's unset ones (generate stops at
        # the eos the finetune appended) and the folder appears whole
        from zoo.hub import save_model_folder

        save_model_folder(merged, merged_dir, saved_tokenizer)
    accelerator.wait_for_everyone()
    result["after"] = evaluate(merged, eval_loader, device)
    result["seconds"] = time.perf_counter() - t_start
    result["adapter_dir"], result["merged_dir"] = str(adapter_dir), str(merged_dir)
    if accelerator.is_main_process:
        (out_dir / "finetune_result.json").write_text(json.dumps(result, indent=1))
        # done with it only now: a stop in the reload, merge or save above left no checkpoint, and the same command
        # trained the phase again
        shutil.rmtree(checkpoint, ignore_errors=True)
    b, a = result["before"], result["after"]
    task = cfg.data.task or "completion tokens"
    accelerator.print(f"\n| {task} accuracy | loss | targets |\n| --- | --- | --- |\n"
                      f"| before: {b['accuracy']:.1%} | {b['loss']:.4f} | {b['n_targets']} |\n"
                      f"| after (merged): {a['accuracy']:.1%} | {a['loss']:.4f} | {a['n_targets']} |\n\n"
                      f"adapter {adapter_dir}, merged checkpoint {merged_dir}; reload max |Δlogit| "
                      f"{result['reload_max_abs_diff']:.1e}, merge {result['merge_max_abs_diff']:.1e}; "
                      f"{result['seconds']:.0f}s in all")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``zoo finetune CONFIG [--section.field=value ...]`` (also scripts/finetune.py under accelerate)."""
    parser = argparse.ArgumentParser(
        prog="zoo finetune", allow_abbrev=False,
        description="LoRA-finetune a causal LM with PEFT, save the adapter and a merged checkpoint. Overrides: "
                    "--section.field=value (e.g. --train.max_steps=50 --lora.r=16 --output_dir=runs/x).")
    parser.add_argument("config", help="finetune config YAML (configs/train/finetune-*.yaml), or a packaged one's "
                                       "name")
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}; overrides look like --section.field=value")
    try:
        cfg = load_finetune_config(args.config, [item[2:] for item in rest])
    except ValueError as e:
        parser.error(str(e))
    from zoo.eval.common import sigterm_interrupts

    # SIGTERM (a scheduler's, accelerate launch's) outside a phase's training (the evaluations, the adapter's reload,
    # merge and save) stops the run as Ctrl-C does, in one line and exit status 130, the phase's checkpoint kept: it
    # killed the process there without a word (run_training's own handler saves and stops while a phase trains)
    with sigterm_interrupts():
        return finetune(cfg)


__all__ = ["DataSection", "FinetuneConfig", "LoopSection", "LoraSection", "PretrainSection", "build_datasets",
           "check_lora_reached", "default_lora_targets", "encode_rows", "evaluate", "finetune",
           "format_lora_report", "load_finetune_config", "lora_report", "main", "pad_collate", "read_jsonl",
           "run_training", "unmatched_targets", "wrap_lora"]
