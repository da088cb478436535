"""Pretraining under accelerate: one loop for any Hugging Face causal LM, zoo model or not.

The loop knows nothing about architectures: it calls ``model(**batch).loss`` (passing ``seq_idx`` only to
models whose forward takes it, else ``position_ids`` that restart at every packed document), reads
``_no_weight_decay`` flags off parameters, and for truncated BPTT uses only the cache that
``model(..., past_key_values=cache, use_cache=True)`` returns (``cache=`` for transformers models that name it so).
A model fed position_ids alone is probed once before training (`packed_documents_leak`): transformers' hybrids keep
packed documents apart in their attention layers only, and a packed run of one is warned of it.

    zoo train configs/train/demo.yaml --train.max_steps=100          # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py CONFIG [--resume [DIR]]

Recipe (the Mamba paper, Gu & Dao 2023, arXiv:2312.00752): AdamW (0.9, 0.95), weight decay 0.1 except flagged and 1-D
parameters and those named A_log, D or dt_bias, grad clip 1.0, linear warmup then cosine to a floor (or WSD), bf16
autocast on GPU, gradient accumulation, optional torch.compile and gradient checkpointing, fused AdamW on CUDA.

Long rows (``train.tbptt_chunk``) are trained in chunks with each layer's state carried to the next chunk:
``detach`` cuts the graph between chunks (classic truncated BPTT); ``exact`` runs the chunks forward without
a graph keeping only the states at chunk boundaries, then recomputes them in reverse, each from a leaf copy
of its initial state (and the dropout masks of its first forward), back-propagating the state gradient received from
the chunk after it: gradients equal to whole-row training in the activation memory of one chunk, plus the
states kept at the boundaries (for an attention layer a boundary cache holds every key before it, so these grow with
the square of the number of chunks).

A run directory holds ``train_config.yaml``, ``run_info.json``, ``metrics.csv``, ``tensorboard/`` and
``checkpoints/step_XXXXXXXX/{model/, accelerate/, trainer_state.json}`` (model/ is a ``save_pretrained``
folder with the tokenizer; accelerate/ the optimizer and RNG states), with ``checkpoints/latest`` naming the
newest. Checkpoints are written to a temporary folder and renamed, so a kill mid-write leaves the previous
one intact. ``--resume`` continues bit-exactly: same data order, same next losses (on CPU); a shuffled stream only under
the `datasets` version that wrote the checkpoint (its shuffle buffer draws differently across versions), which
``--resume`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from zoo.cache import output_cache
from zoo.data.text import (
    IGNORE_INDEX,
    SPECIAL_IDS,
    ByteTokenizer,
    DataConfig,
    StreamState,
    TextStream,
    load_tokenizer,
    local_source_files,
    source_data_file,
    special_id_outside,
    stdlib_version,
)
from zoo.layers import no_weight_decay_ids

CHECKPOINT_PREFIX = "step_"

# Dense bf16 tensor-core peaks (TFLOP/s, spec sheets) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0}
# (matched in this order by substring of the device name: the longer names first, so an L40 is not taken for an L4)


# ---- run config --------------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    """AdamW. weight_decay applies to every parameter except those flagged ``_no_weight_decay``, those named as
    mamba_ssm's undecayed SSM parameters (`NO_DECAY_NAMES`), all 1-D parameters (biases, norm weights: unflagged in
    transformers models; exempt as in transformers' Trainer and mamba_ssm) unless no_decay_1d is false, and all
    embeddings when asked. grad_clip 0 disables clipping. fused: 'auto' = on CUDA."""

    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    no_decay_1d: bool = True
    no_decay_embeddings: bool = False
    fused: bool | str = "auto"


@dataclass
class ScheduleConfig:
    """Linear warmup over warmup_steps, then 'cosine' to min_lr at the last step, 'wsd' (constant, then a
    linear decay to min_lr over the last decay_fraction of the steps, or the steps after the warmup if fewer) or
    'constant'."""

    kind: str = "cosine"
    warmup_steps: int = 100
    min_lr: float = 1e-5
    decay_fraction: float = 0.2


@dataclass
class LoopConfig:
    """The ``train:`` section. Tokens per optimizer step = micro_batch_size · data.seq_len · grad_accum ·
    processes; give batch_tokens instead of grad_accum to derive it. precision: auto (the launch's `accelerate
    launch --mixed_precision` when it names one, else bf16 on a GPU that has it, else fp32) | bf16 | fp16 (GPU
    only) | fp32; another than the launch's is refused. tbptt_chunk: train rows in chunks of this many tokens with the
    state carried (tbptt_mode 'exact' or 'detach', see the module docstring)."""

    seed: int = 0
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int | None = None
    batch_tokens: int | None = None
    precision: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    tbptt_chunk: int | None = None
    tbptt_mode: str = "exact"
    prefetch: int = 4


@dataclass
class EvalConfig:
    """Evaluate on held-out rows every `every` steps (0 = never) and at the end; `batches` batches of
    micro_batch_size rows (default: train's) per process (the fewest any process's share fills), the same rows
    each time."""

    every: int = 0
    batches: int = 8
    micro_batch_size: int | None = None


@dataclass
class CheckpointConfig:
    """Save every `every` steps (0 = never periodically), at the end (unless final is false) and on
    interruption, keeping the newest `keep`."""

    every: int = 0
    keep: int = 2
    final: bool = True


@dataclass
class LogConfig:
    """Log every `every` steps to the progress bar and trackers ('csv' -> metrics.csv, 'tensorboard' ->
    OUTPUT_DIR/tensorboard, or any accelerate tracker name). project: the project the other trackers log the run
    under (wandb's project, mlflow's experiment, ...). peak_tflops: the per-GPU peak for MFU (default: the card's
    dense bf16); MFU is training FLOPs per token (`mfu_flops_per_token`: 3 × zoo.compare's forward accounting,
    attention and the scans included) · tokens/s over it; mfu_6n, the figure of earlier runs, counts 6 · active
    parameters (a MoE's routed experts only: active_parameters) per token."""

    every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    project: str = "hybrid-zoo"
    peak_tflops: float | None = None
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """A run. model: a zoo YAML (configs/models/*.yaml), a model folder or hub id (weights are loaded:
    continued pretraining), or a mapping of config fields with a `model_type` ('zoo' by default, or any
    transformers type such as 'llama'). model_overrides: fields replaced in the model config (vocab_size,
    ...). tokenizer: 'byte' or any AutoTokenizer path; unset, the model's own (`run_tokenizer`): a model folder's
    tokenizer files or a hub id's tokenizer, else 'byte'. output_dir: the run directory."""

    model: str | dict[str, Any]
    output_dir: str = "runs/run"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against type hint `tp` (YAML scalars; '6e-4' read as a string becomes a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[-1] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if tp is Any:
        return value
    if tp in (bool, int, float, str):
        from zoo.config import coerce_scalar

        return coerce_scalar(value, tp, where, int_as_float=True)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{where}: unsupported config type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ValueError(f"{prefix + '.' if prefix else ''}{key}: unknown field{hint} "
                             f"(fields: {', '.join(names)})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in data:
            raise ValueError(f"{prefix + '.' if prefix else ''}{name}: required")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def validate_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the field (and the fix) for every impossible setting."""
    o, s, t, e, c, lg = cfg.optim, cfg.schedule, cfg.train, cfg.eval, cfg.checkpoint, cfg.log
    if isinstance(cfg.model, str) and not cfg.model:
        raise ValueError("model: empty; give a zoo YAML, a model folder or a mapping of config fields")
    if not cfg.output_dir:
        raise ValueError("output_dir: empty; name the run directory")
    cfg.data.validate("data")
    checks = [
        (o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}"),
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
        (t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}"),  # before warmup, checked against it
        # accelerate's set_seed seeds numpy too, which refused it mid-setup without naming the field
        (0 <= t.seed < 2 ** 32, "train.seed", f"must be in [0, 2**32), got {t.seed}"),
        (s.kind in ("cosine", "wsd", "constant"), "schedule.kind",
         f"unknown {s.kind!r}; use cosine, wsd or constant"),
        (0 <= s.warmup_steps < t.max_steps, "schedule.warmup_steps",
         f"must be in [0, train.max_steps={t.max_steps}), got {s.warmup_steps}"),
        (0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr={o.lr}], got {s.min_lr}"),
        (0 < s.decay_fraction <= 1, "schedule.decay_fraction", f"must be in (0, 1], got {s.decay_fraction}"),
        (t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}"),
        (t.grad_accum is None or t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}"),
        (t.batch_tokens is None or t.batch_tokens >= 1, "train.batch_tokens",
         f"must be >= 1, got {t.batch_tokens}"),
        (t.precision in ("auto", "bf16", "fp16", "fp32", "no"), "train.precision",
         f"unknown {t.precision!r}; use auto, bf16, fp16 or fp32"),
        (t.tbptt_mode in ("exact", "detach"), "train.tbptt_mode",
         f"unknown {t.tbptt_mode!r}; use exact or detach"),
        (t.prefetch >= 1, "train.prefetch", f"must be >= 1, got {t.prefetch}"),
        (e.every >= 0, "eval.every", f"must be >= 0 (0 = never), got {e.every}"),
        (e.batches >= 1, "eval.batches", f"must be >= 1, got {e.batches}"),
        (e.micro_batch_size is None or e.micro_batch_size >= 1, "eval.micro_batch_size",
         f"must be >= 1, got {e.micro_batch_size}"),
        (c.every >= 0, "checkpoint.every", f"must be >= 0 (0 = only at the end), got {c.every}"),
        (c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}"),
        (lg.every >= 1, "log.every", f"must be >= 1, got {lg.every}"),
        (lg.peak_tflops is None or lg.peak_tflops > 0, "log.peak_tflops",
         f"must be > 0, got {lg.peak_tflops}"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ValueError(f"{name}: {message}")
    if t.grad_accum is not None and t.batch_tokens is not None:
        raise ValueError("train.batch_tokens: set either train.batch_tokens or train.grad_accum, not both")
    if t.tbptt_chunk is not None:
        L = cfg.data.seq_len
        if not (isinstance(t.tbptt_chunk, int) and 1 <= t.tbptt_chunk < L and L % t.tbptt_chunk == 0):
            raise ValueError(f"train.tbptt_chunk: must divide data.seq_len={L} and be smaller, got "
                             f"{t.tbptt_chunk}; or null to train whole rows")
        if t.tbptt_chunk == 1 and cfg.data.packing:  # every position starts a chunk: so would every document
            raise ValueError("train.tbptt_chunk: 1 cannot keep packed documents apart (a document must not start a "
                             "chunk, and every token does); use 2 or more, or data.packing: false")
    twice = sorted({t for t in lg.trackers if lg.trackers.count(t) > 1})
    if twice:  # (two TensorBoard trackers wrote every event twice into one folder; two csv trackers, one file)
        raise ValueError(f"log.trackers: {', '.join(map(repr, twice))} given more than once; name each tracker once")
    for tracker in lg.trackers:
        if tracker == "csv":
            continue
        if tracker not in _TRACKER_MODULES:
            raise ValueError(f"log.trackers: unknown tracker {tracker!r}; choose from "
                             f"{['csv', *_TRACKER_MODULES]}")
        if importlib.util.find_spec(_TRACKER_MODULES[tracker]) is None:
            raise ValueError(f"log.trackers: {tracker!r} needs `pip install {_TRACKER_MODULES[tracker]}`; "
                             f"or drop it")


# accelerate's trackers, by the module each needs (checked before the run starts, not at its first log)
_TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio",
                    "swanlab": "swanlab"}


def run_tokenizer(cfg: TrainConfig) -> str:
    """The tokenizer a run trains with: cfg.tokenizer when set, else the model's own, as zoo finetune takes it: a
    model folder's when it holds tokenizer files, a hub id's, and 'byte' for a zoo YAML, a mapping of config fields or
    a folder without one. It was 'byte' whatever the model: a pretrained model (a folder or hub id with a 50K-token
    tokenizer) was trained on byte ids without a word, and its checkpoints saved the byte tokenizer beside it."""
    from zoo.hub import holds_tokenizer

    if cfg.tokenizer is not None:
        return cfg.tokenizer
    spec = cfg.model
    if isinstance(spec, dict) or spec.endswith((".yaml", ".yml")):
        return "byte"
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not holds_tokenizer(folder):
            return "byte"
        config_file = folder / "tokenizer_config.json"  # a zoo train checkpoint's model/: 'byte', as its run named it
        if config_file.is_file() and json.loads(config_file.read_text()).get("tokenizer_class") == "ByteTokenizer":
            return "byte"
        return spec
    return spec


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a mapping (a parsed YAML run config); an unset tokenizer is `run_tokenizer`'s."""
    cfg = _build(TrainConfig, data, "")
    validate_config(cfg)
    if cfg.tokenizer is None:
        cfg.tokenizer = run_tokenizer(cfg)
        cfg._tokenizer_unset = True  # (train: a resumed run keeps its checkpoint's, `_resumed_tokenizer`)
    return cfg


def _resumed_tokenizer(cfg: TrainConfig, checkpoint: Path) -> str | None:
    """The tokenizer a run config that leaves it unset resumes `checkpoint` with, where it is not `run_tokenizer`'s:
    'byte' where its train_config.yaml records that. The unset tokenizer was 'byte' before it became the model's own,
    so the run config of a run that continued a model folder or hub id, resumed as it was written, was refused as
    changing the tokenizer ('byte' -> the model's); None where the checkpoint records another or the same (another,
    a model folder's that moved: resume_changes names the change)."""
    saved_path = checkpoint / "train_config.yaml"
    saved = (yaml.safe_load(saved_path.read_text()) or {}).get("tokenizer") if saved_path.is_file() else None
    return saved if saved == "byte" and saved != cfg.tokenizer else None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{key}: {part!r} is not a section (it holds {child!r})")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path, overrides: list[str] | None = None, kind: str = "train") -> dict[str, Any]:
    """A YAML config file as a dict, with ``section.field=value`` overrides applied (values parsed as YAML; a
    leading ``--`` is allowed). Every config reader of the zoo (train, finetune, compare, the research scripts)
    goes through here. path: a file, or a packaged config of `kind` by name (zoo.config_files' rule)."""
    from zoo.config_files import find_config

    try:
        path = find_config(path, kind)
    except FileNotFoundError as e:
        raise ValueError(f"config: {e}") from None
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {str(path)!r} must hold a YAML mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected section.field=value")
        _set_dotted(data, key.strip().lstrip("-"), yaml.safe_load(raw) if raw else "")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a run config (YAML) and apply ``section.field=value`` overrides (values parsed as YAML)."""
    data = read_yaml(path, overrides)
    try:
        return config_from_dict(data)
    except ValueError as e:
        # configs/train/ holds other tools' recipes too (scripts/train_synthetic.py, zoo finetune, ...): their
        # sections failed as unknown fields of a run config, without saying which command the file is for
        tool = _recipe_command(path)
        if tool is None or "unknown field" not in str(e):
            raise
        raise ValueError(f"{e}\n{path} is a recipe for `{tool}` (its header says so), not a zoo train run "
                         f"config: run that command") from e


def _recipe_command(path: str | Path) -> str | None:
    """The other command a recipe's header comments name for it (`zoo finetune FILE`, `scripts/NAME.py FILE`), or
    None: zoo train's own recipes name `zoo train`."""
    from zoo.config_files import find_config

    try:
        lines = find_config(path, "train").read_text().splitlines()
    except OSError:
        return None
    name = re.escape(Path(path).name)
    for line in lines:
        if not line.startswith("#"):
            break
        found = re.search(rf"((?:zoo [a-z-]+)|(?:\S*scripts/[\w-]+\.py)) \S*{name}", line)
        if found and found.group(1) not in ("zoo train", "scripts/train.py"):
            return f"{found.group(1)} {path}"
    return None


# ---- model, optimizer, schedule ----------------------------------------------------------------------------

@contextlib.contextmanager
def config_field_errors():
    """transformers' checks of a config's fields (a hidden size that is not a multiple of the heads, a string width)
    raise huggingface_hub's StrictDataclassError, no ValueError: as a ValueError of its cause's one line (the command
    ended in a traceback)."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except StrictDataclassError as e:
        raise ValueError(str(e.__cause__ or e)) from e


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is an allocation that failed: torch.OutOfMemoryError (a GPU's), or the CPU allocator's plain
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                         and "DefaultCPUAllocator" in str(error))


@contextlib.contextmanager
def model_build_errors(config, given: dict[str, Any] = (), where: str = ""):
    """Around the build of a model from the transformers `config` (its layers, on the meta device or not): a field
    value transformers' checks of the config let through (a Mamba's state_size -1, a hidden_size 0) failed in the
    model's layers, in torch's traceback ("RuntimeError: Trying to create tensor with negative dimension -1: [64, -1]")
    or a one-line ValueError naming neither the model nor a field ("groups must be a positive integer"): as a
    ValueError naming the model type, the error and the numeric fields among `given` (those the user set), those of a
    value below one first, prefixed by `where`. A zoo config's errors are left as they are (ZooConfig checks its own
    fields, and its model's errors are zoo's own), and so is an allocation that failed (out_of_memory): a model too
    large for the machine's memory is not a config error to fix in its fields. So is an error the model of the
    config class's defaults meets as well (`_defaults_build`, on the meta device): it does not come from the config's
    values (a bug in transformers or torch, a model that cannot be built here), and keeps its type and traceback. A
    value that builds and fails only at the model's first step (a Mamba's conv_kernel 0: `check_conv_kernel`) is
    refused before the build."""
    from zoo.config import ZooConfig

    check_conv_kernel(config, where)  # (a value that builds, then fails at the model's first step)
    try:
        yield
    except (RuntimeError, ValueError, TypeError, ArithmeticError, IndexError, AssertionError) as e:
        if isinstance(config, ZooConfig) or out_of_memory(e) or not _defaults_build(config):
            raise
        numbers = {k: v for k, v in dict(given).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "model_type"}
        listed = [f"{k}={v}" for k, v in sorted(numbers.items(), key=lambda kv: kv[1] >= 1)]
        check = ("; check the values of its fields (" + (", ".join(listed[:6]) + (f" and {len(listed) - 6} more"
                 if len(listed) > 6 else "")) + ")") if listed else "; check the values of its config's fields"
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{where}the {getattr(config, 'model_type', '?')} model ({type(config).__name__}) cannot be "
                         f"built from its config: {type(e).__name__}: {first}{check}") from e


def _defaults_build(config) -> bool:
    """Whether the transformers model of `config`'s class with the class's default fields builds, on the meta device
    (no memory: a default Llama is 7B parameters): where it does, an error building `config`'s comes from the values
    that differ from them. False where the defaults cannot be told (a class that needs arguments)."""
    from transformers import AutoModelForCausalLM

    try:
        default = type(config)()
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(default)
    except Exception:
        return False
    return True


def check_config_fields(config, given: dict[str, Any], where: str, dropped: Any = ()) -> None:
    """Raise ValueError naming the first key of `given` (the fields a transformers `config` was built from) that is not
    a field of its class: transformers keeps a key its config class does not take as an attribute, so a misspelled
    field built the model with the default it meant to replace (a Llama with hidden_sise: 32 was 4096 wide).
    `dropped`: the keys that AutoConfig.from_pretrained left unused (it drops a misspelled one instead)."""
    try:
        default = type(config)()
    except Exception:  # a config class that cannot be built without arguments: left to transformers
        default = None
    for key in given:
        if key in dropped or (default is not None and key != "model_type" and hasattr(config, key)
                              and not hasattr(default, key)):
            known = sorted(k for k in (default or config).to_dict() if not k.startswith("_"))
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            what = "unknown field" if key not in dropped else "a field that transformers' from_pretrained left " \
                "unapplied (the model would be built without it), not a field"
            raise ValueError(f"{where}{key}: {what} of {type(config).__name__} "
                             f"({config.model_type}); {hint}fields: {', '.join(known)}")


def check_conv_kernel(config, where: str = "") -> None:
    """Raise ValueError, prefixed by `where`, where a transformers `config` sets the kernel of its Mamba layers' causal
    convolution below 1 (conv_kernel: Mamba, Mamba-2, FalconMamba; mamba_d_conv: Jamba): transformers builds the
    model from it (a Conv1d of kernel 0 holds no weights) and the model failed at its first step, in "RuntimeError:
    negative padding is not supported" (Mamba) or "The size of tensor a (0) must match the size of tensor b (3)"
    (Mamba-2, Jamba), naming no field."""
    for name in ("conv_kernel", "mamba_d_conv"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{where}{name}: {value} is no kernel size for the causal convolution of the "
                             f"{getattr(config, 'model_type', '?')} model's Mamba layers, which mixes each channel's "
                             f"last {name} inputs (the current one included); give an integer >= 1 (transformers' "
                             f"default is 4)")


def check_special_ids(config, names=SPECIAL_IDS, where: Callable[[str], str] = lambda name: "") -> None:
    """Raise ValueError for a special id of `names` that the model `config` names (an int, or a list of them) past its
    vocab_size, prefixed by `where(name)` (the field's section)."""
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for name in names:
        value = getattr(config, name, None)
        for one in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(one, int) and not isinstance(one, bool) and one >= vocab:
                raise ValueError(f"{where(name)}{name}: {one} is outside the model's vocabulary (vocab_size {vocab}: "
                                 f"ids 0..{vocab - 1}); give an id below {vocab}, or leave it unset to take the "
                                 f"tokenizer's")


def build_model(cfg: TrainConfig, tokenizer=None) -> nn.Module:
    """The causal LM named by cfg.model (fresh weights from a config, or loaded weights from a folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import zoo  # noqa: F401  (registers model_type 'zoo' with the Auto classes)

    spec, overrides = cfg.model, dict(cfg.model_overrides)
    # a fresh model takes the tokenizer's special ids unless its config names them
    special = {name: getattr(tokenizer, name) for name in SPECIAL_IDS} \
        if tokenizer is not None else {}
    def check_vocab(n_embed: int | None) -> None:
        if tokenizer is not None and n_embed is not None and n_embed < len(tokenizer):
            raise ValueError(f"model.vocab_size: the model has {n_embed} embeddings but the tokenizer has "
                             f"{len(tokenizer)} tokens; set model_overrides.vocab_size >= {len(tokenizer)}")
        if tokenizer is not None and n_embed is not None and (outside := special_id_outside(tokenizer, n_embed)):
            raise ValueError(f"tokenizer: {outside[0]}; set model_overrides.vocab_size >= {outside[1]}, or give the "
                             f"tokenizer special tokens with ids below {n_embed}")

    # a folder's config trained with another tokenizer than its own: the tokenizer's special ids replace the config's
    # after the build (below)
    other = isinstance(spec, str) and not spec.endswith((".yaml", ".yml")) and run_tokenizer(cfg) != spec

    def check_config_ids(config) -> None:
        # a special id the model config names (the tokenizer's are checked by check_vocab) past its vocabulary: a Llama
        # failed to build ('Padding_idx must be within num_embeddings'), a zoo model trained and saved a config whose
        # eos generate never meets and whose pad fails in the embedding (transformers' warning said so at the save).
        # Not an id the tokenizer's replaces after the build: a GPT-2 config.json (bos and eos 50256) under
        # model_overrides.vocab_size 260 and the byte tokenizer was refused for ids the run never kept (a pad is
        # checked still: a Llama builds its embedding's padding_idx from the config's)
        names = [name for name in SPECIAL_IDS
                 if not (other and special.get(name) is not None and name != "pad_token_id")]
        check_special_ids(config, names, lambda name: "model_overrides." if name in overrides else "model.")

    config = None
    if isinstance(spec, dict):
        fields_ = {**special, **spec, **overrides}
        model_type = fields_.pop("model_type", "zoo")
        try:
            with config_field_errors():
                config = AutoConfig.for_model(model_type, **fields_)
        except ValueError as e:
            raise ValueError(f"model: {e}") from e
        check_config_fields(config, spec, "model.")
        check_config_fields(config, overrides, "model_overrides.")
    elif spec.endswith((".yaml", ".yml")):
        from zoo.config_files import find_config

        try:
            spec = str(find_config(spec, "models"))
        except FileNotFoundError as e:
            raise ValueError(f"model: no such model config {spec!r} ({e})") from None
        with open(spec) as f:
            named = set(yaml.safe_load(f) or {})
        extra = {k: v for k, v in special.items() if k not in named}
        config = zoo.ZooConfig.from_yaml(spec, **{**extra, **overrides})
    else:
        from zoo.hub import check_model_ref, holds_weights

        check_model_ref(spec)
        folder = Path(spec)
        # (a folder of config.json alone: a fresh model of that architecture; one of pytorch_model.bin was built so too,
        # its weights not loaded, and trained from a random init without a word)
        if folder.is_dir() and not holds_weights(folder) and (folder / "config.json").is_file():
            try:
                with config_field_errors():
                    config, unused = AutoConfig.from_pretrained(spec, return_unused_kwargs=True, **overrides)
            except ValueError as e:
                raise ValueError(f"model_overrides: {e}") from e
            check_config_fields(config, overrides, "model_overrides.", dropped=unused)
    if config is not None:
        check_vocab(getattr(config, "vocab_size", None))
        check_config_ids(config)
        given, where = ({**spec, **overrides}, "model: ") if isinstance(spec, dict) else (overrides, f"model: {spec}: ")
        with model_build_errors(config, given, where):
            model = AutoModelForCausalLM.from_config(config)
    else:
        from zoo.hub import load_model_not_adapter

        try:  # (a hub adapter repo loaded as its base model with the adapter in it: refused)
            model = load_model_not_adapter(spec, dtype=torch.float32, **overrides)
            check_conv_kernel(model.config, f"model: {spec}: ")
        except OSError as e:
            raise ValueError(f"model: {spec!r} is not a zoo YAML, a model folder or a hub id: {e}") from e
        except TypeError as e:  # an override the loaded config has no field for goes on to the model's __init__
            bad = [k for k in overrides if re.search(rf"unexpected keyword argument '{re.escape(str(k))}'", str(e))]
            if not bad:
                raise
            config = AutoConfig.from_pretrained(spec)
            check_config_fields(config, overrides, "model_overrides.", dropped=bad)
            raise
    if tokenizer is not None:
        check_vocab(model.get_input_embeddings().num_embeddings)
        # a loaded model keeps its ids and gets the missing ones; trained with another tokenizer than its own (one the
        # run config names), it learns that one's, which replace its own: the checkpoints' config and generation_config
        # kept the old vocabulary's eos, so generate did not stop at the documents' end the model was trained on
        for name, value in special.items():
            for holder in (model.config, getattr(model, "generation_config", None)):
                if holder is not None and (getattr(holder, name, None) is None or (other and value is not None)):
                    setattr(holder, name, value)
    return model.float()


# mamba_ssm's parameters that are never decayed (its _no_weight_decay flags), by the names transformers' Mamba, Mamba-2,
# FalconMamba, Jamba, Bamba, Zamba2, ... give them too, which flag nothing: their Mamba and Jamba A_log ([d_inner,
# d_state]) is 2-D, and was decayed toward 0 (A toward -1)
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def param_groups(model: nn.Module, cfg: OptimConfig, by_name: bool = True) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed, and not decayed (``param._no_weight_decay`` and PEFT's modules_to_save copies of
    such parameters: `no_weight_decay_ids`; with by_name, those whose name ends in `.NAME` for a NAME of
    `NO_DECAY_NAMES`; plus all 1-D parameters with no_decay_1d, the default, and all embeddings with
    no_decay_embeddings). Shared (tied) parameters appear once."""
    embeddings: set[int] = set()
    if cfg.no_decay_embeddings:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            embeddings.add(id(out.weight))
    flagged = no_weight_decay_ids(model)  # PEFT's modules_to_save copies of flagged parameters too
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = id(p) in flagged or (by_name and name.rpartition(".")[2] in NO_DECAY_NAMES) \
            or (cfg.no_decay_1d and p.ndim < 2) or id(p) in embeddings
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume_by_name(model: nn.Module, cfg: OptimConfig, saved: list[int] | None) -> bool:
    """`param_groups`' by_name for a run resumed from an optimizer state whose groups held `saved` parameters each
    (None: not known): False when those are the sizes of the grouping before `NO_DECAY_NAMES` were exempt by name (a
    transformers Mamba's or Jamba's 2-D A_log decayed) and not this one's, so that its state loads (torch refused it:
    "a parameter group that doesn't match the size") and the run goes on as it trained; else True."""
    if saved is None:
        return True
    now, before = ([len(g["params"]) for g in param_groups(model, cfg, named)] for named in (True, False))
    return not (saved != now and saved == before)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | None = None,
                    by_name: bool = True) -> torch.optim.AdamW:
    """AdamW over `param_groups` (by_name: its argument); fused when cfg.fused is true, or 'auto' and the parameters
    train on CUDA: on `device` when given (under FSDP the optimizer is built before accelerate moves the weights to
    their GPU), else where every parameter lies now."""
    groups = param_groups(model, cfg, by_name)
    params = [p for g in groups for p in g["params"]]
    on_cuda = device.type == "cuda" if device is not None else all(p.is_cuda for p in params)
    fused = cfg.fused if isinstance(cfg.fused, bool) else bool(params) and on_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


class NoWeightDecayMixin:
    """For transformers' Trainer (or a subclass: ``class MyTrainer(NoWeightDecayMixin, Trainer)``): also exempts
    from weight decay every parameter flagged ``_no_weight_decay`` (Mamba's and Mamba-2's A_log and D, every norm
    weight, the final norm_f included, and PEFT's modules_to_save copies of them) and every parameter named as
    `NO_DECAY_NAMES` (a transformers Mamba's or Jamba's 2-D A_log, which flags nothing), as `param_groups` does. The
    Trainer's own rule goes by names and layer types only (biases, nn.LayerNorm, names with "norm" as a word), so
    it decayed those."""

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        ids = no_weight_decay_ids(model)  # PEFT's modules_to_save copies of flagged parameters too
        flagged = {name for name, p in model.named_parameters()
                   if id(p) in ids or name.rpartition(".")[2] in NO_DECAY_NAMES}
        return [name for name in super().get_decay_parameter_names(model) if name not in flagged]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine / wsd / constant."""
    s, lr, n = cfg.schedule, cfg.optim.lr, cfg.train.max_steps
    if step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    floor = s.min_lr / lr
    if s.kind == "cosine":
        # the last step is at min_lr, also when it is the only step after the warmup
        progress = min(1.0, (step - s.warmup_steps) / (n - 1 - s.warmup_steps)) if n - 1 > s.warmup_steps else 1.0
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if s.kind == "wsd":
        # a warmup that reaches into the last decay_fraction ends at the peak, and the decay takes the steps after it
        # (it used to start under the warmup, so the first step after it dropped to where that decay had got to)
        # (rounded first: 0.07 · 100 is 7.000000000000001 in floating point, whose ceil made the decay 8 steps long)
        start = max(n - max(1, math.ceil(round(s.decay_fraction * n, 9))), s.warmup_steps)
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / (n - start))
        return lr * (1 - (1 - floor) * progress)
    return lr


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device (PEAK_BF16_TFLOPS), None elsewhere or for unknown cards."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def mfu_flops_per_token(model: nn.Module, seq_len: int, chunk_len: int | None = None
                        ) -> tuple[float, str, str | None]:
    """Training FLOPs per token that MFU counts: (flops, formula, why the fallback or None).

    '3x_forward': zoo.compare.training_flops_per_token of the model's config, 3 × its forward FLOPs per token
    (matmuls with the LM head, causal attention over the keys a token sees, the scans' terms) at the rows' length
    seq_len; chunk_len (train.tbptt_chunk): attention still sees the row's earlier keys through its cache, so its
    term stays at seq_len, while the chunked scans count chunks of chunk_len. Neither recomputation (gradient
    checkpointing, the exact mode's second forward) nor packed documents' masks are counted: a token counts the
    keys before it in its row, whatever their document (a causal kernel's work over the row; PaLM's and nanoGPT's
    12 · layers · heads · head_dim · T count every key of the row, twice that). '6n_active': 6 · active
    parameters, for a transformers model the accounting cannot count (a MoE, a hybrid, an unknown type)."""
    from zoo.compare import training_flops_per_token
    from zoo.config import ZooConfig

    config = getattr(model, "config", None)
    try:
        return training_flops_per_token(config, seq_len, chunk_len), "3x_forward", None
    except Exception as e:  # an architecture the accounting does not know may fail in its own way, and a zoo model
        # with a custom mixer the accounting cannot build (it builds on the meta device): MFU is no reason to stop
        what = "a zoo model's mixers" if isinstance(config, ZooConfig) else type(model).__name__
        why = f"{what} not counted by zoo.compare's accounting ({type(e).__name__}: {e})"
    return 6.0 * active_parameters(model), "6n_active", why


def _holdout_by_row_before(data) -> bool:
    """Whether checkpoints older than the text-keyed held-out split held out other documents of this source: local
    files and non-streamed hub datasets with a holdout (the built-in corpus is split by file, streams by text)."""
    from zoo.data.text import _looks_local

    sources = data.source if isinstance(data.source, list) else [data.source]
    indexed = any(_looks_local(s) for s in sources) or not data.streaming
    return data.holdout > 0 and data.eval_split is None and data.source != "stdlib" and indexed


def _shuffle_version(data) -> str | None:
    """The installed `datasets` version when training reads a shuffled stream (a hub dataset or local folder with
    data.streaming; local files are indexed), else None: such a stream's order is datasets' shuffle buffer's, which
    draws differently across its versions (3.0 and 5.2 do)."""
    from zoo.data.text import _import_datasets, _local_files, _saved_to_disk

    try:
        local = _local_files(data.source) if data.source != "stdlib" else []
    except ValueError:  # the stream refuses it when it is built
        return None
    if not (data.shuffle and data.streaming and local is None) or _saved_to_disk(data.source):  # (that one: indexed)
        return None
    return _import_datasets(data.source).__version__


def source_record(data, source_files: dict[str, list[int]] | None, stream: TextStream) -> dict[str, Any]:
    """What the run's documents were read from, as its checkpoints record it for --resume (resume_source_changes and
    the shuffled stream's check): a local source's files as the run opened them (`local_source_files`), the hub
    commit of a hub dataset where it is known (`open_documents`), the `datasets` version whose shuffle ordered a
    shuffled stream, the Python whose files the built-in corpus is; what does not apply is left out."""
    record = {"source_files": source_files, "source_commit": stream._docs.commit,
              "datasets": _shuffle_version(data), "stdlib": stdlib_version() if data.source == "stdlib" else None}
    return {key: value for key, value in record.items() if value is not None}


def peak_memory_gib(accelerator, device: torch.device) -> float:
    """The largest `torch.cuda.max_memory_allocated` of any process, in GiB (a collective: every process calls it).
    Under FSDP or uneven batches the processes differ, and the run needs the most any of them held."""
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2 ** 30], device=device)
    return float(accelerator.gather(peak).max()) if accelerator.num_processes > 1 else float(peak)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def active_parameters(model: nn.Module) -> int:
    """count_parameters less the experts a token skips: n_experts - top_k of the n_experts (equal-sized) experts of
    each MoE layer, zoo's and transformers' (a module `experts` whose tensors hold its num_experts experts along
    their first dimension, top_k the config's num_experts_per_tok: Mixtral, Jamba, Qwen-MoE, OLMoE, DeepSeek's
    routed experts; shared experts are active)."""
    from zoo.layers import MoE

    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    inactive = 0
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            inactive += sum(p.numel() for p in m.experts.parameters()) * (m.n_experts - m.top_k) // m.n_experts
        elif name.rpartition(".")[2] == "experts" and isinstance(n := getattr(m, "num_experts", None), int) \
                and isinstance(top_k, int) and 0 < top_k < n:
            inactive += sum(p.numel() for p in m.parameters() if p.dim() and p.shape[0] == n) * (n - top_k) // n
    return count_parameters(model) - inactive


# ---- forward and backward of one micro-batch ---------------------------------------------------------------

@dataclass
class ModelInputs:
    """Which of the batch's fields a model's forward takes (read once from its signature)."""

    seq_idx: bool
    position_ids: bool
    use_cache: bool
    cache: str = "past_key_values"  # the keyword the forward takes its cache under (zoo.decode.cache_argument)
    output_router_logits: bool = False  # a MoE's: transformers' add the aux loss to `loss` in eval mode too
    # a transformers model under flash attention, which tells packed documents apart by position_ids only in a batch of
    # one row: packed rows also get the documents' cu_seq_lens, as transformers' DataCollatorWithFlattening gives them
    varlen: bool = False
    # return_dict=True where the forward takes it (zoo.decode._dict_output): a config with return_dict False
    # (transformers' option, e.g. a checkpoint exported with it) returned tuples, which have no .loss or .logits
    return_dict: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> ModelInputs:
        from zoo.decode import _dict_output, cache_argument

        params = inspect.signature(model.forward).parameters
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        varlen = "seq_idx" not in params and "position_ids" in params and isinstance(attention, str) \
            and "flash" in attention and any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        return cls(seq_idx="seq_idx" in params, position_ids="position_ids" in params,
                   use_cache="use_cache" in params, cache=cache_argument(model),
                   output_router_logits="output_router_logits" in params, varlen=varlen,
                   return_dict=bool(_dict_output(model)))

    def kwargs(self, batch: dict[str, torch.Tensor], sl: slice | None = None, labels: bool = True
               ) -> dict[str, Any]:
        """Model keyword arguments for the tokens `sl` of the batch (attention_mask covers everything up to
        the slice's end, as a cache-carrying forward expects)."""
        sl = sl or slice(None)
        out: dict[str, Any] = {"input_ids": batch["input_ids"][:, sl]}
        if self.return_dict:
            out["return_dict"] = True
        if labels:
            out["labels"] = batch["labels"][:, sl]
        if self.seq_idx and "seq_idx" in batch:
            out["seq_idx"] = batch["seq_idx"][:, sl]
        if self.position_ids and "position_ids" in batch:
            out["position_ids"] = batch["position_ids"][:, sl]
        if "attention_mask" in batch:
            out["attention_mask"] = batch["attention_mask"][:, :sl.stop]
        elif self.varlen and "position_ids" in out and sl == slice(None) and out["input_ids"].shape[0] > 1:
            # transformers' flash attention ran each row of several in one causal pass, every document of a packed row
            # attending to the ones before it; the documents' bounds (each begins at position 0) keep them apart
            from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

            (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(out["position_ids"])
            out |= {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": max_q, "max_length_k": max_k}
        return out


# fp32 rounding moves logits by ~1e-7 of their scale; a tiny random Jamba's documents meet at ~1e-3 of it
PACKING_LEAK_TOLERANCE = 1e-5


def packed_documents_leak(model: nn.Module, inputs: ModelInputs, doc_len: int = 8) -> float:
    """How far the logits of a packed row's second document move with the first document (relative to their largest
    magnitude; 0.0 for a model that keeps packed documents apart as the loop feeds them).

    A behavioural probe, for a model fed position_ids without seq_idx: transformers' hybrids (Jamba, Bamba, Zamba2,
    FalconH1, NemotronH, Lfm2, ...) take position_ids, which keep their attention layers' documents apart, while their
    Mamba, convolution and linear-attention layers ignore them and carry their state across. One forward, in eval mode
    and without grad, of two rows (two documents each) that differ only in their first document: the second
    document's logits are the same (to rounding) where nothing crosses the boundary. Under flash attention the probe
    runs SDPA (the loop hands flash attention the documents' bounds, which keep its documents apart); the torch RNG
    and the model's mode are left as they were."""
    config = getattr(model, "config", None)
    configs = [c for c in (config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))) if
               c is not None and hasattr(c, "_attn_implementation_internal")]
    saved = [c._attn_implementation_internal for c in configs]
    flash = [c for c in configs if isinstance(c._attn_implementation_internal, str)
             and "flash" in c._attn_implementation_internal]
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (2, doc_len), generator=g)
    second = torch.randint(0, vocab, (1, doc_len), generator=g).expand(2, -1)
    batch = {"input_ids": torch.cat([first, second], dim=1), "position_ids": torch.arange(doc_len).repeat(2, 2),
             "seq_idx": torch.arange(2, dtype=torch.int32).repeat_interleave(doc_len).expand(2, -1)}
    batch = {k: v.to(param.device) for k, v in batch.items()}
    extra = ({"use_cache": False} if inputs.use_cache else {}) \
        | ({"output_router_logits": False} if inputs.output_router_logits else {})
    training = model.training
    try:
        for c in flash:
            c._attn_implementation_internal = "sdpa"
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            logits = model(**dataclasses.replace(inputs, varlen=False).kwargs(batch, labels=False),
                           **extra).logits[:, doc_len:].float()
    finally:
        model.train(training)
        for c, value in zip(configs, saved):
            c._attn_implementation_internal = value
    scale = logits.abs().max().item()
    return (logits[0] - logits[1]).abs().max().item() / scale if scale > 0 else 0.0


def position_table(model: nn.Module) -> tuple[str, int] | None:
    """(name, positions) of a model's learned absolute position embeddings, or None: an nn.Embedding besides the input
    embeddings sized as the config's max_position_embeddings (GPT-2's and GPT-Neo's wpe; OPT's embed_positions, 2 more
    for its offset). Rotary and ALiBi models have none, and zoo models neither: their rows may be any length."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    inputs = model.get_input_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is not inputs and n <= module.num_embeddings <= n + 2:
            return name, n
    return None


def count_targets(labels: torch.Tensor) -> int:
    """Tokens predicted from labels [B, L] under the Hugging Face shift (labels[:, 1:] that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The real tokens of a batch: its attention_mask's ones (an unpacked row is right-padded), else every position
    (packed rows have no pads). Read from the batch on the host, it costs no device sync."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def count_byte_targets(labels: torch.Tensor) -> int:
    """The targets that are text bytes under the byte tokenizer (ids 0..255; not its <bos> / <eos> / <pad>): the
    bytes bits per byte divides by. Every document's <eos> target counted as a byte made it too low."""
    targets = labels[:, 1:]
    return int(((targets >= 0) & (targets < 256)).sum())


def _torch_rng_state() -> dict[str, Any]:
    """torch's CPU generator state and the current CUDA device's, the ones a training step draws from (dropout); a
    host-side copy (no device sync), CUDA's only once CUDA is in use (none is started for it)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def _set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


def _cache_states(cache) -> list[torch.Tensor]:
    """The tensors a cache carries: `state_tensors()` (zoo), else the keys/values of a transformers cache."""
    if hasattr(cache, "state_tensors"):
        return list(cache.state_tensors())
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        raise ValueError(f"train.tbptt_chunk: the model's cache ({type(cache).__name__}) exposes neither "
                         f"state_tensors() nor per-layer keys/values; train whole rows (tbptt_chunk: null)")
    return [t for layer in layers for t in (layer.keys, layer.values)]


def _load_cache_states(cache, tensors: list[torch.Tensor]) -> None:
    if hasattr(cache, "load_state_tensors"):
        cache.load_state_tensors(tensors)
        return
    for layer, i in zip(cache.layers, range(0, len(tensors), 2)):
        layer.keys, layer.values = tensors[i], tensors[i + 1]


def _cache_dropping_layers(model: nn.Module) -> list[str]:
    """Class names of the checkpointed layers that drop the cache in a training forward with gradients: transformers'
    GradientCheckpointingLayer sets use_cache=False and cache=None there, unless the layer only reads it."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
                   and m.gradient_checkpointing and not getattr(m, "_can_checkpoint_with_cache", False)})


def _detach_cache(cache) -> None:
    if hasattr(cache, "detach_"):
        cache.detach_()
    else:
        _load_cache_states(cache, [t.detach() for t in _cache_states(cache)])


def _weighted_loss(out, n: int) -> torch.Tensor:
    """out.loss (a mean over n targets) times n; with no target, a zero still connected to the graph (the
    mean over zero targets is NaN, and so would be its gradient)."""
    if n:
        return out.loss * n
    if out.logits is not None:
        return out.logits.float().sum() * 0.0
    return out.loss.nan_to_num() * 0.0


def _chunk_loss(out, batch: dict[str, torch.Tensor], start: int, stop: int) -> tuple[torch.Tensor, int]:
    """Summed loss of the targets of chunk [start, stop): the model's mean over the chunk's inner targets
    times their count, plus the target just after the chunk predicted from its last position (so the
    chunks' targets are exactly the whole row's)."""
    labels = batch["labels"]
    n = count_targets(labels[:, start:stop])
    total = _weighted_loss(out, n)
    if stop < labels.shape[1]:
        nxt = labels[:, stop]
        n_next = int((nxt != IGNORE_INDEX).sum())
        if n_next:
            if out.logits is None:
                raise ValueError("train.tbptt_chunk: the model returned no logits; chunked training needs "
                                 "them for the target that crosses each chunk boundary")
            total = total + F.cross_entropy(out.logits[:, -1].float(), nxt.to(out.logits.device),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
            n += n_next
    return total, n


def _aux_coef(model: nn.Module) -> float:
    """The factor of `out.aux_loss` in a training forward's `out.loss`: zoo's moe.aux_loss_coef; for transformers'
    MoE models (which add it when they return an aux_loss) the model's own attribute its forward multiplies by,
    router_aux_loss_coef (config.router_aux_loss_coef, DBRX's ffn_config.moe_loss_weight) or JetMoE's aux_loss_coef,
    else config.router_aux_loss_coef; else 0."""
    spec = _moe_spec(model)
    if spec is not None:
        return spec["aux_loss_coef"]
    for _ in range(4):
        config = getattr(model, "config", None)
        if config is not None:
            for name in ("router_aux_loss_coef", "aux_loss_coef"):
                value = getattr(model, name, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
            return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            break
    return 0.0


def _has_aux_loss(model: nn.Module) -> bool:
    """Whether a training forward's objective adds an MoE load-balancing loss (logged apart as `aux_loss`): a zoo MoE,
    or a transformers MoE with output_router_logits on, whose factor is not 0."""
    return _aux_coef(model) > 0 and (_moe_spec(model) is not None
                                     or bool(getattr(getattr(model, "config", None), "output_router_logits", 0)))


def _aux_part(model: nn.Module, out, n: int | torch.Tensor) -> torch.Tensor | None:
    """The aux-loss part of `_weighted_loss(out, n)` (coef · aux_loss · n), detached; None without one. n, the
    targets, may be a count on the device (no host sync): the part is then 0 where it is 0, as `_weighted_loss`'s."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or (isinstance(n, int) and not n):
        return None
    part = (_aux_coef(model) * aux.detach().float() * n).reshape(())
    return part if isinstance(n, int) else torch.where(n > 0, part, torch.zeros_like(part))


def _moe_spec(model: nn.Module) -> dict | None:
    """The MoE spec of a zoo model with MoE layers, whose training loss adds moe.aux_loss_coef times the aux loss
    (through accelerate's / torch's wrappers), else None."""
    for _ in range(4):
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "moe_spec"):
            return config.moe_spec() if getattr(config, "moe", None) is not None else None
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def _routed_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The tokens [B, L] (1 = token) a row's MoE load-balancing statistics count under truncated BPTT: its
    attention_mask's, less the pads TextStream puts before a document that would start on a chunk boundary (a
    position that is no target, continues its document and ends it: the next position starts another, or the row
    ends). Such a pad is out of the cross entropy both ways, and packed rows have no attention_mask to leave it out
    of the router's counts. The attention_mask (None: every position) where the batch tells no documents apart."""
    mask = batch.get("attention_mask")
    doc = batch.get("seq_idx")
    if doc is None:
        doc = batch.get("position_ids")
        starts = doc == 0 if doc is not None else None
    else:
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    if starts is None or "labels" not in batch:
        return mask
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    keep = (batch["labels"] != IGNORE_INDEX) | starts | ~ends  # (on the device, no host sync)
    return (keep if mask is None else keep & mask.bool()).to(torch.long)


class _RowAux:
    """The MoE load-balancing aux loss of whole rows trained in chunks. It is not a sum of the chunks' aux losses
    (each chunk's balance, weighted by its targets, penalised a row balanced over its length but not within a
    chunk, and left the boundary targets' weight out): from the whole row's expert counts C and routed tokens R
    (routing sums that add up over chunks), chunk k adds n_E · Σ_e C_e · P_e^k / R², the part of the whole row's
    loss made of its router probabilities P^k (C has no gradient), so the chunks add up to the whole row's aux
    loss, times its targets as the whole row's loss weighs it."""

    def __init__(self, spec: dict, batch: dict[str, torch.Tensor], bounds: list[tuple[int, int]], n_row: int):
        self.spec, self.batch, self.bounds, self.n_row = spec, batch, bounds, n_row
        self.counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.routed = _routed_tokens(batch)

    def _sums(self, out, k: int):
        from zoo.layers import load_balancing_sums

        start, stop = self.bounds[k]
        mask = self.routed
        return load_balancing_sums(out.router_logits, self.spec["n_experts"], self.spec["top_k"],
                                   mask[:, start:stop] if mask is not None else None)

    def record(self, out, k: int) -> None:
        """Keep chunk k's expert counts and routed tokens (from a forward with router logits)."""
        counts, _, rows = self._sums(out, k)
        self.counts[k] = (counts.detach(), torch.as_tensor(rows, device=counts.device).detach())

    def replace(self, out, k: int, loss: torch.Tensor) -> torch.Tensor:
        """The chunk's summed loss (`_chunk_loss`) with its own aux loss swapped for its share of the row's; every
        chunk's counts recorded first."""
        coef = self.spec["aux_loss_coef"]
        start, stop = self.bounds[k]
        n_inner = count_targets(self.batch["labels"][:, start:stop])
        if n_inner:  # out.loss = the inner targets' mean CE + coef · the chunk's aux loss (training mode)
            loss = loss - coef * out.aux_loss * n_inner
        self.share = None
        if not self.n_row:  # the whole row's loss adds no aux loss without a target (_weighted_loss)
            return loss
        _, probs, _ = self._sums(out, k)
        counts = sum(c for c, _ in self.counts.values())
        rows = sum(r for _, r in self.counts.values()).clamp(min=1)
        share = coef * self.n_row * self.spec["n_experts"] * (counts * probs).sum() / rows ** 2
        self.share = share.detach().float()  # the aux part of the returned loss
        return loss + share


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], scale: float | torch.Tensor,
                     inputs: ModelInputs, *,
                     chunk_len: int | None = None, mode: str = "exact",
                     backward: Callable[[list[torch.Tensor], list[torch.Tensor | None]], None] | None = None,
                     no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                     sync_last: bool = True, n_targets: int | None = None,
                     aux: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients accumulate into the parameters' .grad.

    Args:
        model: the (possibly wrapped) causal LM, in train mode.
        batch: tensors [B, L] on the model's device (input_ids, labels, seq_idx, position_ids, ...).
        scale: weight of one target: the loss back-propagated is sum over targets of CE · scale (1 / targets
            of the optimizer step gives the step's mean; a 0-d device tensor too, as processes / all processes'
            targets is under DDP, which averages the processes' gradients).
        inputs: which batch fields the model takes.
        chunk_len: None trains the whole rows; else chunks of chunk_len tokens with the state carried.
        mode: 'exact' or 'detach' (module docstring).
        backward: backward(tensors, grad_tensors) (default torch.autograd.backward; the trainer's applies
            the fp16 grad scaler).
        no_sync: a context in which gradients are not synchronized across processes (DDP/FSDP); every
            backward but the last runs in it, and the last too unless sync_last.
        n_targets: count_targets of the batch's labels when the caller has it (from the rows on the host):
            counting the device labels waits for the device between the forward and the backward, which
            leaves the GPU idle while the backward's first kernels are launched.
        aux: a list that gets the MoE load-balancing part of the returned loss (coef · aux loss, weighted and scaled
            as the loss), detached, so that the cross entropy alone can be logged.

    Returns:
        the detached weighted loss (sum of CE · scale, plus an MoE model's weighted aux loss), a 0-d tensor.
    """
    backward = backward or (lambda tensors, grads: torch.autograd.backward(tensors, grads))
    no_sync = no_sync or contextlib.nullcontext

    def ctx(last: bool):
        return contextlib.nullcontext() if (last and sync_last) else no_sync()

    if chunk_len is None:
        with ctx(True):
            out = model(**inputs.kwargs(batch), **({"use_cache": False} if inputs.use_cache else {}))
            n = count_targets(batch["labels"]) if n_targets is None else n_targets
            loss = _weighted_loss(out, n) * scale
            backward([loss], [None])
        if aux is not None and (part := _aux_part(model, out, n)) is not None:
            aux.append(part * scale)
        return loss.detach()

    L = batch["input_ids"].shape[1]
    bounds = [(s, min(s + chunk_len, L)) for s in range(0, L, chunk_len)]
    total = torch.zeros((), device=batch["input_ids"].device)
    moe = _moe_spec(model) if len(bounds) > 1 else None
    row_aux = None
    if moe is not None:
        row_aux = _RowAux(moe, batch, bounds, count_targets(batch["labels"]) if n_targets is None else n_targets)
    router = {"output_router_logits": True} if row_aux is not None else {}

    def _chunk_aux(out, start: int, stop: int) -> None:
        """Chunk [start, stop)'s aux part of its loss into `aux`: its share of the row's (`_RowAux`), else its own
        (weighted by the chunk's inner targets, counted on the device: no host sync per chunk)."""
        if aux is None or getattr(out, "aux_loss", None) is None:  # (no count of the targets for a model without one)
            return
        if row_aux is not None:
            part = row_aux.share
        else:
            part = _aux_part(model, out, (batch["labels"][:, start + 1:stop] != IGNORE_INDEX).sum())
        if part is not None:
            aux.append(part * scale)

    def run(k: int, cache, labels: bool = True):
        start, stop = bounds[k]
        out = model(**inputs.kwargs(batch, slice(start, stop), labels), **{inputs.cache: cache}, use_cache=True,
                    **router)
        if output_cache(out) is None and k < len(bounds) - 1:
            raise ValueError("train.tbptt_chunk: the model returned no cache with use_cache=True in training "
                             "mode; truncated BPTT needs model(..., use_cache=True).past_key_values")
        return out

    if mode == "detach":
        if row_aux is not None:  # the row's expert counts before the first chunk's backward: a forward without a graph
            with torch.no_grad():
                cache = None
                for k in range(len(bounds)):
                    out = run(k, cache, labels=False)
                    row_aux.record(out, k)
                    cache = output_cache(out)
        cache = None
        for k, (start, stop) in enumerate(bounds):
            last = k == len(bounds) - 1
            with ctx(last):
                out = run(k, cache)
                loss, _ = _chunk_loss(out, batch, start, stop)
                if row_aux is not None:
                    loss = row_aux.replace(out, k, loss)
                _chunk_aux(out, start, stop)
                loss = loss * scale
                backward([loss], [None])
            total = total + loss.detach()
            if not last:
                cache = output_cache(out)
                _detach_cache(cache)
        return total

    # exact: boundary caches without a graph, then chunks in reverse from leaf copies of their initial states, each
    # recomputed from the RNG state its first forward started from (the same dropout masks, as torch's checkpoint does)
    entering: list[Any] = [None]
    rngs: list[dict[str, Any]] = []
    with torch.no_grad():
        cache = None
        for k in range(len(bounds) - 1):
            rngs.append(_torch_rng_state())
            out = run(k, cache, labels=False)
            if row_aux is not None:
                row_aux.record(out, k)
            cache = output_cache(out)
            entering.append(copy.deepcopy(cache))
    rngs.append(_torch_rng_state())
    after = None  # the RNG state after the last chunk: where one forward of the chunks in order leaves it
    state_grads: list[torch.Tensor | None] | None = None
    for k in reversed(range(len(bounds))):
        cache, leaves = entering[k], []
        if cache is not None:
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in _cache_states(cache)]
            _load_cache_states(cache, leaves)
        _set_torch_rng_state(rngs[k])
        with ctx(k == 0):
            out = run(k, cache)
            if after is None:
                after = _torch_rng_state()
            loss, _ = _chunk_loss(out, batch, *bounds[k])
            if row_aux is not None:
                if k == len(bounds) - 1:  # the last chunk's counts: from this forward, before any backward
                    row_aux.record(out, k)
                loss = row_aux.replace(out, k, loss)
            _chunk_aux(out, *bounds[k])
            loss = loss * scale
            tensors: list[torch.Tensor] = [loss]
            grads: list[torch.Tensor | None] = [None]
            if state_grads is not None:
                for t, g in zip(_cache_states(output_cache(out)), state_grads):
                    if g is not None and t.requires_grad:
                        tensors.append(t)
                        grads.append(g)
            backward(tensors, grads)
        total = total + loss.detach()
        state_grads = [leaf.grad if leaf.requires_grad else None for leaf in leaves]
        entering[k] = None  # free the boundary state as soon as it is used
    _set_torch_rng_state(after)
    return total


# ---- logging -----------------------------------------------------------------------------------------------

def _csv_tracker_class():
    from accelerate.tracking import GeneralTracker, on_main_process

    class CSVTracker(GeneralTracker):
        """Metrics to one CSV file, a row per logged step; a new metric name rewrites the header."""

        name = "csv"
        requires_logging_directory = False

        def __init__(self, path: str | Path):
            super().__init__()
            self.path = Path(path)
            self.columns: list[str] = []
            if self.path.is_file():  # a resumed run appends
                with open(self.path) as f:
                    header = f.readline().strip()
                self.columns = header.split(",") if header else []

        @property
        def tracker(self):
            return self.path

        @on_main_process
        def store_init_configuration(self, values: dict) -> None:
            pass

        @on_main_process
        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            import csv

            row = {"step": step, **{k: v for k, v in values.items() if isinstance(v, (int, float, str))}}
            new = [k for k in row if k not in self.columns]
            if new:
                old_rows = []
                if self.path.is_file() and self.columns:
                    with open(self.path, newline="") as f:
                        old_rows = list(csv.DictReader(f))
                self.columns = self.columns + new
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _rewrite_csv(self.path, self.columns, old_rows)
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    return CSVTracker


def _drop_metrics_after(path: Path, step: int, eval_due: bool = False) -> None:
    """Drop metrics.csv rows past `step`: those of a run killed after its last checkpoint, which the resumed run
    logs again (or all rows, for a new run in an old run's directory). `eval_due`: the resumed run evaluates `step`
    itself (its checkpoint's evaluation was cut short), so an evaluation row at `step` goes too: one that an earlier
    resume logged before it was killed."""
    import csv

    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []

    def evaluation(row: dict) -> bool:
        return any(k.startswith("eval/") and v not in (None, "") for k, v in row.items())

    kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step
            and not (eval_due and int(r["step"]) == step and evaluation(r))]
    if len(kept) < len(rows):
        _rewrite_csv(path, columns, kept)


def _rewrite_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Replace a CSV file by `rows` under the header `columns`, atomically: written beside it, then renamed over it
    (rewritten in place, a kill mid-write left the file empty or cut, and the run's logged history with it)."""
    import csv

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"section.field": scalar} (lists and None as strings) for tracker hyperparameters."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


# ---- checkpoints -------------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    """Flush every file under root to disk so the rename that publishes it cannot outrun the data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint folder to a temporary name (one atomic step) and return where it went, so that a kill while
    it is then removed leaves no folder under a checkpoint's name with its trainer_state.json but part of its files
    (which latest_checkpoint took as complete); the next run cleans the temporary one up. Where a leftover that could
    not be removed is in the way, `path` itself."""
    aside = path.with_name(f".tmp-deleted-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(path, aside)
    except OSError:
        return path
    return aside


def _delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: moved aside first (`_move_aside`), then removed."""
    shutil.rmtree(_move_aside(path), ignore_errors=True)


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint folder named by `path`: a checkpoint itself, a run directory or its checkpoints/
    folder (-> the newest complete checkpoint), or None when there is none."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.is_file():
            candidate = root / pointer.read_text().strip()
            if (candidate / "trainer_state.json").is_file():
                return candidate
        done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file())
        if done:
            return done[-1]
    return None


# what a resumed run may not change: the weights' shapes and vocabulary, and where the data stream's saved position
# (document, token offset, epoch) points (data.seq_len and packing only cut the same tokens differently; streaming
# shuffles, shards and holds out a dataset's documents otherwise)
_RESUME_FIXED = ("model.", "model_overrides", "tokenizer", "data.")  # "model" alone: a YAML path, may move
_RESUME_FREE_DATA = ("data.seq_len", "data.packing")


def _txt_files(data: DataConfig) -> bool:
    """Whether the data source is local .txt files (each one document unless data.sample_by splits them)."""
    from zoo.data.text import _local_files, local_builder

    try:
        files = _local_files(data.source) if data.source != "stdlib" else None
    except ValueError:
        return False
    return bool(files) and all(local_builder(f) == "text" for f in files)


def resume_changes(checkpoint: str | Path, cfg: TrainConfig, precision: str | None = None) -> list[str]:
    """The run-config fields that differ from the checkpoint's train_config.yaml, as "field: old -> new"
    (output_dir is ignored), and, given the resumed run's mixed precision (accelerate's: no, bf16, fp16), the run's
    if the checkpoint's trainer_state.json records another (train.precision auto takes the launch's, so the same
    config may train in another). Raises ValueError for a change that the checkpoint cannot continue under:
    the model, its overrides, the tokenizer, or the data's source and order (anything in `data` but
    seq_len and packing; data.revision may pin an unset one to the commit the run read, trainer_state's
    source_commit). Checkpoints without a saved config (or precision) are not checked."""
    state_path = Path(checkpoint) / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    was = state.get("precision")
    ran = [f"mixed precision (the run's, the launch's under train.precision auto): {was!r} -> {precision!r}"] \
        if precision is not None and was is not None and was != precision else []
    saved_path = Path(checkpoint) / "train_config.yaml"
    if not saved_path.is_file():
        return ran
    saved, now = _flat(yaml.safe_load(saved_path.read_text()) or {}), _flat(cfg.to_dict())
    defaults = _flat(TrainConfig(model="").to_dict())
    changed, fixed = [], []
    for key in sorted(set(saved) | set(now)):
        # a field added since the checkpoint was written (data.sample_by) reads as its default there
        old, new = saved.get(key, defaults.get(key, "<unset>")), now.get(key, "<unset>")
        if key == "output_dir" or old == new:
            continue
        if key == "data.revision" and old == "None" and new == state.get("source_commit"):  # _flat's None
            continue  # pinned to the very commit that the run read its hub dataset's default branch at
        line = f"{key}: {old!r} -> {new!r}"
        if key == "train.seed":  # it seeds the fresh model and the random state, which the checkpoint's replace
            line += " (no effect: the checkpoint's weights and random state are restored)"
        if key.startswith(_RESUME_FIXED) and key not in _RESUME_FREE_DATA:
            fixed.append(line)
        else:
            changed.append(line)
    if fixed:
        raise ValueError(f"--resume: {Path(checkpoint)} was trained with another model, tokenizer or data order ("
                         + "; ".join(fixed) + "); resume with the run's own settings, or start a new run from "
                         "its weights (model: <checkpoint>/model)")
    return changed + ran


def resume_source_changes(checkpoint: str | Path, state: dict[str, Any], files: dict[str, list[int]] | None,
                          stream: TextStream) -> str | None:
    """The --resume notice, or None, for a local source that changed under the run: its files differ from those the
    checkpoint's run opened (trainer_state's source_files: sizes and modification times; a checkpoint without them is
    not compared), which orders the documents of every epoch otherwise; or a process's saved document lies past the
    documents its share now holds, from where the stream would go on at the next epoch without a word; or a hub
    dataset read at another commit than the checkpoint's run read it at (trainer_state's source_commit: where `datasets`
    cached a non-streamed one, what the hub answered for a streamed one), its default branch having moved under an
    unset data.revision; or
    the built-in corpus of another Python (trainer_state's stdlib: its version and number of files)."""
    from zoo.data.text import _IndexedDocs
    from zoo.hub import _named

    what = []
    was, now = state.get("source_commit"), stream._docs.commit
    if was is not None and now is not None and was != now:
        what.append(f"{stream.cfg.source!r} was read at hub commit {was} by {Path(checkpoint).name}'s run, this run "
                    f"reads commit {now}, which orders every epoch's documents otherwise than the run did "
                    f"(--data.revision={was} reads the run's)")
    was, now = state.get("stdlib"), stdlib_version() if stream.cfg.source == "stdlib" else None
    if was is not None and now is not None and was != now:
        what.append(f"the built-in corpus 'stdlib' is Python {now['python']}'s ({now['files']} files), "
                    f"{Path(checkpoint).name}'s run read Python {was['python']}'s ({was['files']} files), which orders "
                    f"every epoch's documents otherwise than the run did")
    saved = state.get("source_files")
    if saved is not None:  # a checkpoint written before local_source_files left a folder's non-data files out
        saved = {name: v for name, v in saved.items() if source_data_file(stream.cfg.source, name)}
    if saved is not None and files is not None and saved != files:
        added, removed = sorted(files.keys() - saved.keys()), sorted(saved.keys() - files.keys())
        both = sorted(saved.keys() & files.keys())
        resized = [f"{f} ({saved[f][0]} -> {files[f][0]} bytes)" for f in both if saved[f][0] != files[f][0]]
        touched = [f for f in both if saved[f][0] == files[f][0] and saved[f][1] != files[f][1]]
        parts = [f"{len(names)} {how}: {_named(names, shown=4)}" for names, how in (
            (added, "added"), (removed, "removed"), (resized, "with another size"),
            (touched, "modified at the same size")) if names]
        what.append(f"the files of data.source changed since {Path(checkpoint).name} ({'; '.join(parts)}), which "
                    f"orders every epoch's documents otherwise than the run did")
    docs, world = stream._docs, stream.world_size
    if isinstance(docs, _IndexedDocs):  # a stream cannot tell its size without reading it
        for rank, position in enumerate(state["data_states"]):
            share = len(range(rank, docs.n, world))
            if position["doc"] >= share:
                who = f"process {rank}'s" if world > 1 else "the"
                what.append(f"{who} saved data position (document {position['doc']} of epoch {position['epoch']}) is "
                            f"past the end of {'its share of ' if world > 1 else ''}the source, now {share} "
                            f"document{'s' if share != 1 else ''}, so the run goes on from the start of epoch "
                            f"{position['epoch'] + 1}")
    if not what:
        return None
    return f"--resume: {'; '.join(what)}. This resume is not exact: documents may be read twice or not at all"


# the files of a checkpoint's model/ and accelerate/ folders that torch.load or safetensors reads (accelerate's
# random_states_*.pkl is read with weights_only=False: not checked as weights)
_CHECKPOINT_FILES = re.compile(r".+\.(safetensors|bin|pt)")


def _resume_elsewhere(checkpoint: str | Path) -> str:
    """The advice where a file of the checkpoint `checkpoint` cannot be read (copied in part, or corrupted)."""
    return (f"resume from another checkpoint of the run (--resume {Path(checkpoint).parent}/{CHECKPOINT_PREFIX}...), "
            f"or copy this one again")


def resume_weight_changes(checkpoint: str | Path, model: nn.Module) -> None:
    """Raises ValueError, naming the weights, when the checkpoint's model (the headers of its model/*.safetensors)
    and `model` differ in a weight's name or shape: the run's model was changed behind a path that resume_changes
    cannot see into (a YAML config edited in place, or another file or folder). Tied weights the checkpoint stores
    once are not missing. Only zoo models are checked: transformers may save other models' weights under other
    names than their state dict's (its conversions of MoE experts, for one). Checkpoints without saved weights are
    not checked."""
    from safetensors import safe_open

    from zoo.hub import readable_weights

    files = sorted((Path(checkpoint) / "model").glob("*.safetensors"))
    if not files or getattr(getattr(model, "config", None), "model_type", None) != "zoo":
        return
    saved: dict[str, list[int]] = {}
    with readable_weights(Path(checkpoint) / "model", names=_CHECKPOINT_FILES, fix=_resume_elsewhere(checkpoint)):
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                saved |= {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
    now = model.state_dict()
    stored = {now[k].data_ptr() for k in now if k in saved}
    lines = [f"{k}: {saved[k]} -> {list(now[k].shape)}" for k in sorted(saved.keys() & now.keys())
             if saved[k] != list(now[k].shape)]
    lines += [f"{k}: {saved[k]} -> <absent>" for k in sorted(saved.keys() - now.keys())]
    lines += [f"{k}: <absent> -> {list(now[k].shape)}" for k in sorted(now.keys() - saved.keys())
              if now[k].data_ptr() not in stored]
    if lines:
        shown = "; ".join(lines[:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
        raise ValueError(f"--resume: {Path(checkpoint)} was trained with another model: {len(lines)} weights "
                         f"differ ({shown}); resume with the run's own model config, or start a new run from "
                         f"its weights (model: <checkpoint>/model)")


@contextlib.contextmanager
def _no_tied_weights_note(model: nn.Module):
    """accelerate's save_state stores a tensor shared under two names (the lm_head tied to the embeddings) once, and
    logged at every checkpoint of such a model "Removed shared tensor {'lm_head.weight'} while saving. This should be
    OK, but check by verifying that you don't receive any warning while reloading": --resume loads it back into the
    one Parameter both names hold, so the note is dropped while the names it lists are all such aliases."""
    seen: dict[int, str] = {}
    shared: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            shared |= {name, seen[id(param)]}
        seen.setdefault(id(param), name)

    def keep(record: logging.LogRecord) -> bool:
        found = re.search(r"Removed shared tensor \{(.*)\} while saving", record.getMessage())
        names = re.findall(r"'([^']*)'", found.group(1)) if found else []
        return not names or not all(any(n == s or n.endswith("." + s) for s in shared) for n in names)

    logger = logging.getLogger("accelerate.utils.other")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def save_checkpoint(accelerator, model: nn.Module, tokenizer, cfg: TrainConfig, step: int, tokens: int,
                    data_state: StreamState, optimizer: torch.optim.Optimizer | None = None,
                    data_record: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step_<step>/ atomically: everything goes to a temporary folder that is renamed
    into place once complete, then `latest` is repointed and old checkpoints beyond checkpoint.keep go.
    trainer_state.json records the sizes of the optimizer's parameter groups and `data_record` (source_record(): what
    the run's documents were read from), which --resume compares."""
    from accelerate.utils import gather_object

    root = Path(cfg.output_dir) / "checkpoints"
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    data_states = gather_object([data_state.as_dict()])
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _no_tied_weights_note(accelerator.unwrap_model(model, keep_torch_compile=False)):
        accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()  # every process's files (its RNG state) are in tmp before it is published
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers its shards)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}  # torch.compile's wrapper
        # tied weights (lm_head = embeddings) as one tensor, which save_pretrained stores once: FSDP gathers every name
        # into a tensor of its own, and model/ held the embedding twice
        first: dict[int, str] = {}
        for key, param in unwrapped.named_parameters(remove_duplicate=False):
            if key in state_dict:
                state_dict[key] = state_dict[first.setdefault(id(param), key)]
        unwrapped.config.add_bos = cfg.data.add_bos  # for zoo generate's prompt (zoo.eval.common.trained_with_bos)
        unwrapped.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state = {"step": step, "tokens": tokens, "world_size": accelerator.num_processes,
                 "data_states": data_states, "holdout_key": "text",
                 "precision": accelerator.mixed_precision}  # the run's (the launch's under auto): see --resume
        if optimizer is not None:
            state["param_groups"] = [len(g["params"]) for g in optimizer.param_groups]
        state.update(data_record or {})
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        # saved at this step before (by a run resumed from an older checkpoint, which `latest` may name): moved aside,
        # and deleted once the new one is published (deleted in place, a kill mid-delete left `latest` naming a folder
        # with its trainer_state.json but not all of its weights)
        replaced = _move_aside(final) if final.exists() else None
        if replaced == final:  # (it could not be renamed: deleted in place, as before)
            shutil.rmtree(final)
            replaced = None
        os.replace(tmp, final)
        _write_atomic(root / "latest", name)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        # a run resumed from an older checkpoint owns the steps after it: newer checkpoints are the abandoned run's, and
        # were kept as the newest (latest_checkpoint's fallback) while pruning deleted the resumed run's own
        newer = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.name > name)
        if newer:
            accelerator.print(f"checkpoints: deleting {', '.join(p.name for p in newer)}, newer than {name}: this run "
                              f"resumed from an older checkpoint, and they are the abandoned run's")
            for old in newer:
                _delete_checkpoint(old)
        done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p != final)
        for old in done[:max(0, len(done) - (cfg.checkpoint.keep - 1))]:
            _delete_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


# ---- the loop ----------------------------------------------------------------------------------------------

class _StopRequest:
    """SIGTERM or a first Ctrl-C asks the loop to save and stop after the current step; a second Ctrl-C
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Prefetch:
    """Micro-batches made by a background thread (tokenization overlaps the GPU), in order."""

    _END = object()

    def __init__(self, batches: Iterator, depth: int, pin: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches, pin), daemon=True)
        self._thread.start()

    def _fill(self, batches: Iterator, pin: bool) -> None:
        try:
            for batch, state in batches:
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, state), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as e:  # re-raised in the training thread
            self._queue.put(e)

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class TrainResult:
    """What a run did: the last completed step, every step's loss (this invocation), evaluations, the
    last checkpoint, whether it stopped early on a signal."""

    step: int
    losses: dict[int, float]
    evals: list[dict[str, float]]
    checkpoint: Path | None
    stopped: bool
    tokens: int


def _mixed_precision(name: str) -> str:
    if name == "auto":
        # bf16 where the run is on a GPU: not one pinned to the CPU on a GPU machine (ACCELERATE_USE_CPU=1, which
        # `accelerate launch --cpu` sets), which trained under CPU bf16 autocast
        from accelerate.utils import parse_flag_from_env

        on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    return "no" if name == "fp32" else name


def reset_accelerate_state() -> None:
    """Forget the accelerate state an earlier run in this process left, which may have had other settings: the
    AcceleratorState (mixed precision, plugins) and, outside a launched process group, the PartialState too, whose
    device the first run fixed (a run asking for the CPU, ACCELERATE_USE_CPU=1, after one on the GPU was refused
    with "AcceleratorState has already been initialized and cannot be changed"). A process group's state is kept:
    accelerate would set the group up a second time."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=not (dist.is_available() and dist.is_initialized()))


def _run_precision(name: str) -> str:
    """accelerate's mixed_precision for train.precision `name`, with the launch's (`accelerate launch
    --mixed_precision`, or its config file's, in ACCELERATE_MIXED_PRECISION) under 'auto'; a launch that asks for
    another one than an explicit train.precision is refused (the Accelerator's argument overrides the launch's)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched == "no":
        return _mixed_precision(name)
    if name == "auto":
        return launched
    if _mixed_precision(name) != launched:
        raise ValueError(f"train.precision: {name}, but the launch asks for {launched} (ACCELERATE_MIXED_PRECISION, "
                         f"set by accelerate launch from --mixed_precision, its --config_file, or the machine's "
                         f"default config, `accelerate env` shows it); set train.precision: {launched}, or launch "
                         f"with the precision the run config gives")
    return launched


def _refuse_fp16_without_autocast(accelerator, name: str) -> None:
    """Raise when the accelerator runs fp16 (train.precision `name`, or the launch's under 'auto') where accelerate
    has no autocast for it: accelerate takes fp16 on CPU without autocast or a grad scaler, so the run trained in
    fp32 and said fp16."""
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        what = "fp16" if name == "fp16" else f"{name} takes the launch's fp16, which"
        raise ValueError(f"train.precision: {what} has no autocast on {accelerator.device.type} (accelerate would "
                         f"train in fp32 and call it fp16); use bf16 (autocast on CPU too) or fp32")


def _refuse_lone_processes(accelerator, out_dir: str | Path, runs: str = "train the whole run") -> None:
    """Raise when a multi-process launch left this process alone: accelerate runs each process of a launch it
    cannot join (no GPU, ACCELERATE_USE_CPU unset) by itself, so each would do all the work into `out_dir`; and
    `accelerate launch --cpu --num_processes N` starts one process only (it leaves the others to mpirun)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes == 1 and launched > 1:
        raise ValueError(f"processes: launched as {launched} processes (WORLD_SIZE), but accelerate runs this one "
                         f"alone (on {accelerator.device.type}), so each would {runs} into {str(out_dir)!r}; "
                         f"on CPU launch with ACCELERATE_USE_CPU=1 set, or run one process")
    # accelerate launch's simple launcher writes its --cpu flag as str(bool), "True"; a user's ACCELERATE_USE_CPU=1
    # on a plain `zoo train`, in a shell that exports MASTER_ADDR (a cluster job's), is one process asked for one
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU") == "True"
    if accelerator.num_processes == 1 and cpu_launch and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # the launcher sets MASTER_ADDR for more than one process only: the run went on alone, at one process's batch
        raise ValueError(f"processes: `accelerate launch --cpu --num_processes N` started this process alone "
                         f"(accelerate leaves the others to mpirun), so it would {runs} at one process's batch; "
                         f"on CPU launch ACCELERATE_USE_CPU=1 accelerate launch --config_file "
                         f"configs/accelerate/ddp.yaml --num_processes N (gloo), or run one process")


def _progress_bars_on_main_only(accelerator) -> None:
    """Turn off transformers' progress bars (from_pretrained's "Loading weights") in every process of a launch but the
    main one: each process loads the same weights, and each drew its own bar."""
    if not accelerator.is_main_process:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def train(cfg: TrainConfig, resume: str | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run (or resume) a training run.

    Args:
        cfg: the run config (`load_config`).
        resume: None starts fresh (refused if the run directory has checkpoints); 'auto' continues from the
            run's newest checkpoint if there is one; a path continues from that checkpoint or run directory.
        on_step: called after every optimizer step with (step, {"loss", "lr", "grad_norm", "real_tokens"}) (a
            device sync per step; for tests and benchmarks); real_tokens: the step's tokens that are not pads,
            over all processes.

    Logged throughput: ``tokens_per_s`` (and ``mfu``, ``mfu_6n``) count the real tokens only (an unpacked row's
    pads are no work done); ``padded_tokens_per_s`` counts every position of the rows (the same with packed rows).
    ``tokens`` counts positions (micro-batch rows x seq_len), as the checkpoints' data position does. ``mfu``
    counts `mfu_flops_per_token` (3 × zoo.compare's forward FLOPs, attention included; its formula and value are
    in run_info.json), ``mfu_6n`` 6 · active parameters per token (the mfu of earlier runs).

    Returns:
        a TrainResult.
    """
    from accelerate import Accelerator
    from accelerate.utils import SCALER_NAME, DistributedType, TorchDynamoPlugin, set_seed

    validate_config(cfg)
    tokenizer_unset = cfg.tokenizer is None or getattr(cfg, "_tokenizer_unset", False)
    if cfg.tokenizer is None:  # (a TrainConfig built directly; config_from_dict resolves it)
        cfg = dataclasses.replace(cfg, tokenizer=run_tokenizer(cfg))
    reset_accelerate_state()  # a run may follow another in the same process with other settings
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    trackers: list[Any] = [t for t in cfg.log.trackers if t != "csv"]
    if "csv" in cfg.log.trackers:
        trackers.append(_csv_tracker_class()(out_dir / "metrics.csv"))
    accelerator = Accelerator(
        mixed_precision=_run_precision(cfg.train.precision), log_with=trackers or None,
        project_dir=str(out_dir),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.train.compile else None,
        step_scheduler_with_optimizer=False)
    world, device = accelerator.num_processes, accelerator.device
    _refuse_lone_processes(accelerator, out_dir)
    _progress_bars_on_main_only(accelerator)
    _refuse_fp16_without_autocast(accelerator, cfg.train.precision)
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate takes FSDP on accelerators only (and several processes): elsewhere it runs the launch as DDP
        accelerator.print(f"processes: the launch config asks for FSDP, but accelerate runs this launch as "
                          f"{accelerator.distributed_type.value} ({world} process(es) on {device.type}): the weights "
                          f"are not sharded, and checkpoints are not FSDP's (a resume under FSDP refuses them)")

    start_ckpt = None
    if resume is not None:
        start_ckpt = latest_checkpoint(out_dir if resume == "auto" else resume)
        if start_ckpt is None and resume != "auto":
            raise ValueError(f"--resume: no checkpoint in {resume!r}")
        if start_ckpt is not None and start_ckpt.name.startswith(".tmp-"):  # its trainer_state.json is written before
            # the files are flushed and the folder renamed into place: one named so may be cut anywhere
            raise ValueError(f"--resume: {str(start_ckpt)!r} is a checkpoint folder left by a save or a deletion that "
                             f"did not finish (a run killed mid-write), not a complete checkpoint; resume from the run "
                             f"directory (its newest complete checkpoint) or a {CHECKPOINT_PREFIX}* folder")
        own = latest_checkpoint(out_dir)
        if start_ckpt is not None and own is not None and start_ckpt.parent.resolve() != ckpt_root.resolve():
            # its checkpoints are another run's: the first save took the newer ones for an abandoned run's and deleted
            # them, and checkpoint.keep pruned the older ones, all of output_dir's own run lost
            raise ValueError(f"--resume: {str(start_ckpt)!r} is not a checkpoint of output_dir {str(out_dir)!r}, "
                             f"which holds checkpoints of its own run (newest {own.name}) that this run's saves would "
                             f"delete; continue {start_ckpt.name} into another output_dir, or resume output_dir's own "
                             f"run (--resume without a folder)")
    elif latest_checkpoint(out_dir) is not None:
        raise ValueError(f"output_dir: {str(out_dir)!r} already holds checkpoints; pass --resume to continue "
                         f"that run, or choose another output_dir")

    L, B = cfg.data.seq_len, cfg.train.micro_batch_size
    if cfg.train.batch_tokens is not None:
        per_micro = B * L * world
        if cfg.train.batch_tokens % per_micro:
            raise ValueError(f"train.batch_tokens: {cfg.train.batch_tokens} is not a multiple of "
                             f"micro_batch_size · seq_len · processes = {per_micro}")
        accum = cfg.train.batch_tokens // per_micro
    else:
        accum = cfg.train.grad_accum or 1
    tokens_per_step = B * L * accum * world

    if tokenizer_unset and start_ckpt is not None and (saved := _resumed_tokenizer(cfg, start_ckpt)) is not None:
        accelerator.print(f"--resume: tokenizer unset in the run config: continuing with {saved!r}, the one "
                          f"{start_ckpt.name} was trained with (not the model's own, {cfg.tokenizer!r})")
        cfg = dataclasses.replace(cfg, tokenizer=saved)
    set_seed(cfg.train.seed)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except ValueError as e:
        if cfg.tokenizer != cfg.model:
            raise
        # the model's own (run_tokenizer): a hub id that does not load is the model's failure, not a tokenizer field's
        build_model(cfg)  # its own error first where it has one (not found, an adapter repo)
        raise ValueError(f"model: {cfg.model!r} is not a zoo YAML, a model folder or a hub id with a tokenizer that "
                         f"loads (an unset tokenizer is the model's own; set tokenizer: byte or another to name "
                         f"one): {e}") from e.__cause__
    model = build_model(cfg, tokenizer)
    if start_ckpt is not None:
        resume_weight_changes(start_ckpt, model)
    inputs = ModelInputs.of(model)
    chunk = cfg.train.tbptt_chunk
    if (table := position_table(model)) is not None and L > table[1]:
        # the rows' positions run to seq_len - 1 (within a packed row's long document too): an IndexError ("index out
        # of range in self") at the first step's forward, naming nothing
        raise ValueError(f"data.seq_len: {L} tokens per row, but {type(model).__name__} learns {table[1]} absolute "
                         f"positions ({table[0]}, config max_position_embeddings); lower data.seq_len to <= "
                         f"{table[1]}, or, for a model built from a config, raise max_position_embeddings in it")
    if cfg.data.packing and not (inputs.seq_idx or inputs.position_ids):
        raise ValueError("data.packing: the model's forward takes neither seq_idx nor position_ids, so "
                         "packed documents would see each other; set data.packing=false")
    if chunk is not None and cfg.data.packing and not inputs.seq_idx:
        raise ValueError("train.tbptt_chunk: with packed rows the model must take seq_idx (documents meet "
                         "inside a chunk, where a carried cache cannot tell them apart); "
                         "set data.packing=false")
    if cfg.data.packing and inputs.position_ids and not inputs.seq_idx and accelerator.is_main_process:
        # a warning, not a refusal: packed rows whose state runs on across documents is GPT-style concatenated
        # training, a choice some runs make, and the probe runs the eval path on the CPU, not the training kernels
        try:
            leak = packed_documents_leak(model, inputs)
        except Exception as e:  # a model that cannot run a forward on the device it was loaded on: say so, train on
            accelerator.print(f"data.packing: could not check that {type(model).__name__} keeps the documents of "
                              f"packed rows apart ({type(e).__name__}: {e}); data.packing: false trains on one "
                              f"padded document per row")
        else:
            if leak > PACKING_LEAK_TOLERANCE:
                accelerator.print(
                    f"WARNING data.packing: {type(model).__name__} does not keep the documents of packed rows apart: "
                    f"a document's logits change with the document before it in its row (by {leak:.1e} of their "
                    f"scale), as transformers' Mamba, convolution and linear-attention layers ignore the position_ids "
                    f"that restart at each document and carry their state across. Its training and eval/loss see "
                    f"across document boundaries (not comparable with a model that keeps them apart); set "
                    f"data.packing: false to train on one right-padded document piece per row")
    if cfg.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers' name from 5.2x on (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        dropping = _cache_dropping_layers(model) if chunk is not None else []
        if dropping:
            raise ValueError(f"train.gradient_checkpointing: {type(model).__name__}'s layers ({', '.join(dropping)}) "
                             f"drop their cache when checkpointed in training (transformers' "
                             f"GradientCheckpointingLayer), so train.tbptt_chunk={chunk} could carry no state between "
                             f"chunks; set gradient_checkpointing: false, or tbptt_chunk: null")
    config = getattr(model, "config", None)
    if chunk is not None and not hasattr(config, "moe_spec") and getattr(config, "output_router_logits", False):
        accelerator.print(f"train.tbptt_chunk: {type(model).__name__} adds its load-balancing aux loss chunk by chunk "
                          f"(each chunk's own balance, weighted by its targets), not the whole row's as a zoo MoE "
                          f"does, so rows trained in chunks of {chunk} are not trained as whole rows even in "
                          f"tbptt_mode exact; set the model's output_router_logits: false to train without it")
    n_params, model_class = count_parameters(model), type(model).__name__
    n_active = active_parameters(model)  # mfu_6n's FLOPs per token follow them
    # an MoE objective adds a load-balancing loss: metrics.csv gets it as aux_loss, and `loss` the cross entropy alone
    has_aux = _has_aux_loss(model)
    flops_per_token, mfu_formula, why = mfu_flops_per_token(model, L, chunk)  # once: the rows' length is fixed
    if why is not None:
        accelerator.print(f"mfu: {why}; mfu falls back to 6 · active parameters per token (mfu_6n's)")

    if accelerator.distributed_type != DistributedType.FSDP:
        model = model.to(device)  # fused AdamW needs the parameters on the GPU when it is built
    by_name = True
    if start_ckpt is not None:
        # a checkpoint written before NO_DECAY_NAMES were exempt by name (a transformers Mamba's or Jamba's 2-D A_log
        # decayed): its run resumes as it trained, its optimizer state being for those groups
        saved_groups = json.loads((start_ckpt / "trainer_state.json").read_text()).get("param_groups")
        by_name = resume_by_name(model, cfg.optim, saved_groups)
        if not by_name:
            accelerator.print(f"--resume: {start_ckpt}'s run decayed the parameters named {', '.join(NO_DECAY_NAMES)} "
                              f"(it was saved before zoo train exempted them by name, as mamba_ssm does), and this run "
                              f"goes on decaying them, as its optimizer state holds them; a new run from its weights "
                              f"(model: {start_ckpt / 'model'}) does not")
    optimizer = build_optimizer(model, cfg.optim, device=torch.device(device), by_name=by_name)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # which kernels each mixer runs, resolved on the device the model now lives on, in the autocast dtype
    with accelerator.autocast():
        backend = unwrapped.backend_report() if hasattr(unwrapped, "backend_report") else {}

    step, tokens, data_state = 0, 0, StreamState()
    if start_ckpt is not None:
        changed = resume_changes(start_ckpt, cfg, accelerator.mixed_precision)
        if changed:
            accelerator.print(f"--resume: changed since {start_ckpt.name}: " + "; ".join(changed))
        state = json.loads((start_ckpt / "trainer_state.json").read_text())
        if "holdout_key" not in state and _holdout_by_row_before(cfg.data):
            accelerator.print(f"--resume: {start_ckpt} predates the held-out split keyed by each document's text "
                              f"(it was keyed by the row's index for {cfg.data.source!r}): the held-out documents, "
                              f"and the training documents at the saved data position, differ from the run's, so "
                              f"this resume is not exact and may train on documents the run held out")
        # under another datasets, the documents that a resumed shuffled stream skips (the first of its epoch in its own
        # order) are not those the run read
        now = _shuffle_version(cfg.data)
        if now is not None and state.get("datasets", now) != now:
            accelerator.print(f"--resume: {start_ckpt} read its shuffled stream with datasets {state['datasets']}, "
                              f"this run has {now}, whose shuffle may order the documents otherwise: the resumed run "
                              f"skips the documents before the saved one in its own order, so this resume is not "
                              f"exact (documents of the epoch may be read twice or not at all); pip install "
                              f"'datasets=={state['datasets']}' resumes exactly")
        if state["world_size"] != world:
            raise ValueError(f"--resume: {start_ckpt} was written by {state['world_size']} processes, this "
                             f"run has {world}; the data order is per process: resume with the same number")
        # accelerate's FSDP state (sharded weights and optimizer) and its DDP / one-process state are other files: a
        # switch of launch config failed in accelerate's load_state (a file not found, or a CheckpointException)
        was_fsdp = any((start_ckpt / "accelerate").glob("pytorch_model_fsdp*"))
        if was_fsdp != (accelerator.distributed_type == DistributedType.FSDP):
            then = ("under FSDP (sharded states: accelerate/pytorch_model_fsdp_0, optimizer_0)" if was_fsdp
                    else "without FSDP (whole model and optimizer files in accelerate/)")
            raise ValueError(f"--resume: {start_ckpt} was saved {then}; this run is under "
                             f"{accelerator.distributed_type.value} (accelerate's distributed_type), which cannot "
                             f"load them: resume under the launch config the run was trained with"
                             + (" (configs/accelerate/fsdp.yaml)" if was_fsdp else "")
                             + f", or start a new run from its weights (model: {start_ckpt / 'model'})")

        def other_groups() -> ValueError:
            saved_path = start_ckpt / "train_config.yaml"
            saved = (yaml.safe_load(saved_path.read_text()) or {}).get("optim", {}) if saved_path.is_file() else {}
            was = ", ".join(f"optim.{k}: {str(saved[k]).lower()}" for k in ("no_decay_1d", "no_decay_embeddings")
                            if k in saved)
            return ValueError(f"--resume: {start_ckpt}'s optimizer state has other weight-decay groups than this "
                              f"run's optim.no_decay_1d={str(cfg.optim.no_decay_1d).lower()}, optim.no_decay_"
                              f"embeddings={str(cfg.optim.no_decay_embeddings).lower()} make; resume with the "
                              f"checkpoint's" + (f" ({was})" if was else "")
                              + " (no_decay_1d defaulted to false before it became true)")

        # compared before loading: FSDP's sharded optimizer state loads into other groups without an error, leaving
        # groups without their hyperparameters (KeyError: 'betas' at the first step) or with another weight decay
        groups = [len(g["params"]) for g in optimizer.param_groups]
        if state.get("param_groups", groups) != groups:
            raise other_groups()
        scaler = accelerator.scaler
        if scaler is not None and not (start_ckpt / "accelerate" / SCALER_NAME).is_file():
            # fp16's loss scale, where the checkpoint's run trained in bf16 or fp32 and saved none: accelerate's
            # load_state failed on the missing file
            was = {"no": "fp32", None: "another precision"}.get(state.get("precision"), state.get("precision"))
            accelerator.print(f"--resume: {start_ckpt} holds no fp16 loss scale (its run trained in {was}): the loss "
                              f"scale starts at its initial value")
            accelerator.scaler = None
        from zoo.hub import readable_weights

        try:
            with readable_weights(start_ckpt / "accelerate", names=_CHECKPOINT_FILES,
                                  fix=_resume_elsewhere(start_ckpt)):  # (a cut file: safetensors' or torch's traceback)
                accelerator.load_state(str(start_ckpt / "accelerate"))
        except ValueError as e:  # torch's optimizer: the weight-decay groups hold other numbers of parameters
            if "parameter group" not in str(e):
                raise
            raise other_groups() from e
        finally:
            accelerator.scaler = scaler
        # loading restored the saved groups' weight decay, betas and eps: this run's (a change is listed above) apply
        for group, decay in zip(optimizer.param_groups, (cfg.optim.weight_decay, 0.0)):
            group.update(weight_decay=decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        # and its fused flag: a resume with another optim.fused (or under 'auto' on another device) stepped as the
        # checkpoint's run did, while it listed the change and run_info.json's fused_adamw said this run's. The step
        # counts go where that kernel keeps them (torch's load policy: on the parameter's device when fused, else as
        # they were saved, for a non-fused one on the CPU)
        built = getattr(optimizer, "optimizer", optimizer).defaults
        for group in optimizer.param_groups:
            if bool(group.get("fused")) == bool(built.get("fused")):
                continue
            group.update(fused=built.get("fused"), foreach=built.get("foreach"))
            on_device = bool(built.get("fused")) or bool(group.get("capturable"))
            for p in group["params"]:
                kept = optimizer.state.get(p, {})
                if torch.is_tensor(kept.get("step")):
                    kept["step"] = kept["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu")
        step, tokens = state["step"], state["tokens"]
        newer = sorted(p.name for p in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*")
                       if p.name > f"{CHECKPOINT_PREFIX}{step:08d}")
        if newer:  # save_checkpoint deletes them
            accelerator.print(f"--resume: {start_ckpt} is older than the run's {', '.join(newer)}: this run's first "
                              f"checkpoint deletes them (the steps after {step} are this run's)")
        if step > cfg.train.max_steps:  # the loop would not run: nothing trained, nothing saved, no word
            raise ValueError(f"train.max_steps: {cfg.train.max_steps} is below the step of {start_ckpt} ({step}); "
                             f"resume with train.max_steps >= {step}, or use {start_ckpt / 'model'} as it is")
        data_state = StreamState(**state["data_states"][accelerator.process_index])
    # the checkpoint's evaluation was cut short (a second Ctrl-C during it): this run does it first
    eval_due = start_ckpt is not None and state.get("eval_due") == step and bool(cfg.eval.every)

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        _drop_metrics_after(out_dir / "metrics.csv", step, eval_due)
        (out_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        info = {"model_class": model_class, "params": n_params, "active_params": n_active,
                "flops_per_token": flops_per_token, "mfu_formula": mfu_formula,
                "fused_adamw": bool(getattr(optimizer, "optimizer", optimizer).defaults.get("fused")),
                "backend": backend, "tokenizer": cfg.tokenizer, "vocab": len(tokenizer), "processes": world,
                "device": str(device), "precision": accelerator.mixed_precision, "grad_accum": accum,
                "tokens_per_step": tokens_per_step, "torch": torch.__version__}
        (out_dir / "run_info.json").write_text(json.dumps(info, indent=1))
    accelerator.wait_for_everyone()
    hparams = _flat(cfg.to_dict()) | {"params": n_params}
    hparams |= {f"backend/{k}": str(v) for k, v in backend.items()}
    # a resumed run hides what a killed run logged past its last checkpoint (metrics.csv drops those rows above);
    # TensorBoard's purge_step (the first step this run logs) does it for its event files, which are only appended to.
    # From step 0 too: a run killed before its first checkpoint and started again (--resume finds none) left its steps
    # in TensorBoard beside the new run's, each step twice, while metrics.csv dropped them
    tensorboard_kwargs = {"purge_step": step + 1}
    # TensorBoard writes into OUTPUT_DIR/tensorboard whatever the project: accelerate names that folder after the
    # project it hands every tracker, so it is built here and the others get log.project (every wandb run used to
    # land in a project called 'tensorboard')
    from accelerate.tracking import TensorBoardTracker

    accelerator.log_with = [TensorBoardTracker("tensorboard", accelerator.logging_dir, **tensorboard_kwargs)
                            if str(t) == "tensorboard" else t for t in accelerator.log_with]
    accelerator.init_trackers(cfg.log.project, config=hparams)
    accelerator.print(f"model {model_class}: {n_params / 1e6:.2f}M "
                      f"parameters; backends {backend or 'n/a'}; {tokens_per_step} tokens/step "
                      f"({world} x {B} x {L} x {accum}); precision {accelerator.mixed_precision}")

    eval_batches: list[dict[str, torch.Tensor]] = []
    if cfg.eval.every:  # read before the first step, so that too little held-out text fails the run at once
        eval_stream = TextStream(cfg.data, tokenizer, "eval", accelerator.process_index, world,
                                 chunk_len=chunk if cfg.data.packing else None)
        it = eval_stream.batches(cfg.eval.micro_batch_size or B)
        eval_batches = [b for b, _ in itertools.islice(it, cfg.eval.batches)]
        # every process evaluates as many batches, the fewest any process has (each reads its own share of the
        # held-out documents): under FSDP every forward gathers the weights, and one process more would hang
        fewest = int(accelerator.gather(torch.tensor([len(eval_batches)], device=device)).min())
        eval_batches = eval_batches[:fewest]
        n_eval = torch.tensor(float(sum(count_targets(b["labels"]) for b in eval_batches)), device=device)
        if accelerator.reduce(n_eval, reduction="sum").item() == 0:  # else eval/loss 0, perplexity 1
            share = f" in the share of one of the {world} processes" if world > 1 else ""
            one_file = " (each .txt file is one document: data.sample_by 'paragraph' or 'line' splits them)" \
                if _txt_files(cfg.data) and cfg.data.sample_by == "document" else ""
            raise ValueError(f"data: the evaluation documents fill no row of data.seq_len={L} tokens{share}; raise "
                             f"data.holdout{one_file}, lower data.seq_len, or set eval.every=0")
    source_files = local_source_files(cfg.data.source)  # as the stream opens them: the checkpoints record them
    stream = TextStream(cfg.data, tokenizer, "train", accelerator.process_index, world,
                        chunk_len=chunk if cfg.data.packing else None)
    if start_ckpt is not None and (notice := resume_source_changes(start_ckpt, state, source_files, stream)):
        accelerator.print(notice)
    record = source_record(cfg.data, source_files, stream)
    batches = _Prefetch(stream.batches(B, data_state), cfg.train.prefetch * accum, pin=device.type == "cuda")

    def evaluate() -> dict[str, float]:
        model.eval()
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # nats, targets, byte targets
        if isinstance(tokenizer, ByteTokenizer):
            sums[2] = float(sum(count_byte_targets(b["labels"]) for b in eval_batches))
        # the cross-entropy alone: a transformers MoE (Mixtral, Jamba, ...) configured with output_router_logits adds
        # its aux loss to `loss` in eval mode too, which eval/loss, eval/ppl and bits per byte counted as nats
        no_aux = {"output_router_logits": False} if inputs.output_router_logits else {}
        with torch.no_grad():
            for batch in eval_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                if chunk is None:
                    n = count_targets(batch["labels"])
                    out = model(**inputs.kwargs(batch), **({"use_cache": False} if inputs.use_cache else {}), **no_aux)
                    sums[:2] += torch.stack([_weighted_loss(out, n).double(),
                                             torch.tensor(float(n), device=device)])
                    continue
                cache = None
                for start in range(0, L, chunk):
                    out = model(**inputs.kwargs(batch, slice(start, start + chunk)), **{inputs.cache: cache},
                                use_cache=True, **no_aux)
                    loss, n = _chunk_loss(out, batch, start, start + chunk)
                    sums[:2] += torch.stack([loss.double(), torch.tensor(float(n), device=device)])
                    cache = output_cache(out)
        model.train()
        sums = accelerator.reduce(sums, reduction="sum")
        mean = (sums[0] / sums[1]).item()
        metrics = {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0))}
        if isinstance(tokenizer, ByteTokenizer) and sums[2] > 0:
            metrics["eval/bits_per_byte"] = (sums[0] / sums[2]).item() / math.log(2)
        return metrics

    def backward(tensors, grads):
        if accelerator.scaler is not None:
            tensors = [accelerator.scaler.scale(tensors[0])] + list(tensors[1:])
        torch.autograd.backward(tensors, grads)

    peak = cfg.log.peak_tflops or peak_tflops(device)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if cfg.log.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True)
    losses: dict[int, float] = {}
    # (step, [cross entropy, MoE aux part]) not yet read back from the device: `loss` logs the cross entropy alone (an
    # MoE model's objective adds coef · its load-balancing loss, which eval_loss and the other models' losses lack)
    pending: list[tuple[int, torch.Tensor]] = []
    evals: list[dict[str, float]] = []
    last_ckpt: Path | None = start_ckpt
    saved_step = step if start_ckpt is not None else -1
    window_time, window_tokens, window_real, stopped, updating = 0.0, 0, 0, False, False
    # processes agree to stop at the same step: every step's flags are summed on the host (a gloo group: no device
    # sync), read one step later; checked only at log steps, a launcher's SIGTERM met its SIGKILL 30 s on, unsaved
    vote_group, vote = None, None
    step_rng: tuple[int, dict[str, Any]] | None = None
    if world > 1:
        import torch.distributed as dist

        vote_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save(extra: dict[str, Any] | None = None) -> None:
        nonlocal last_ckpt, saved_step
        if saved_step != step:
            last_ckpt = save_checkpoint(accelerator, model, tokenizer, cfg, step, tokens, data_state, optimizer,
                                        record | (extra or {}))
            saved_step = step

    def log_eval() -> None:
        metrics = evaluate()
        evals.append({"step": step, **metrics})
        accelerator.log(metrics, step=step)
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def flush() -> list[float]:
        """Read the pending step losses back (averaged over processes) into `losses`."""
        nonlocal pending
        if not pending:
            return []
        values = accelerator.reduce(torch.stack([v for _, v in pending]), reduction="mean").tolist()
        losses.update({s: v[0] for (s, _), v in zip(pending, values)})
        pending = []
        return values

    def log_window(grad_norm: torch.Tensor, t0: float | None) -> None:
        """Log the steps since the last log at `step`: their mean loss, real (not pad) tokens/s over their time
        (the current step's from t0 when given), MFU of those tokens (mfu, and mfu_6n: 6 · active parameters), and
        padded_tokens_per_s (every position)."""
        nonlocal window_time, window_tokens, window_real
        values = flush()  # the device sync that makes the window's time honest
        if t0 is not None:
            window_time += time.perf_counter() - t0
        real = window_real  # this process's, counted on the host: summed over processes once per log
        if world > 1:
            real = accelerator.reduce(torch.tensor(float(real), device=device), reduction="sum").item()
        tps = real / max(window_time, 1e-9)
        metrics = {"loss": sum(v[0] for v in values) / len(values), "lr": lr_at(step - 1, cfg),
                   "grad_norm": float(grad_norm), "tokens": tokens, "tokens_per_s": tps,
                   "padded_tokens_per_s": window_tokens / max(window_time, 1e-9)}
        if has_aux:  # the load-balancing part of the objective (coef · aux loss), beside the cross entropy `loss`
            metrics["aux_loss"] = sum(v[1] for v in values) / len(values)
        if peak is not None:
            metrics["mfu"] = flops_per_token * tps / world / (peak * 1e12)
            metrics["mfu_6n"] = 6 * n_active * tps / world / (peak * 1e12)  # earlier runs' mfu
        if device.type == "cuda":
            metrics["peak_mem_gib"] = peak_memory_gib(accelerator, device)
        accelerator.log(metrics, step=step)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        window_time, window_tokens, window_real = 0.0, 0, 0

    evaluating = False  # a second Ctrl-C during an evaluation: the checkpoint asks the resumed run to do it
    with _StopRequest() as stop:
        try:
            if eval_due:
                log_eval()  # the evaluation of the checkpoint's step, interrupted: an uninterrupted run logged it
            while step < cfg.train.max_steps:
                t0 = time.perf_counter()
                step_rng = (step, _torch_rng_state())  # for a save interrupted mid-step: the RNG of the step before
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                micro = [next(batches) for _ in range(accum)]
                counts = [count_targets(b["labels"]) for b, _ in micro]  # on the host rows: no device sync
                step_real = sum(count_tokens(b) for b, _ in micro)  # not pads (throughput, MFU)
                if world == 1:
                    scale: float | torch.Tensor = 1.0 / max(1, sum(counts))
                else:  # a mean over every process's targets: DDP/FSDP average the gradients, hence world / all
                    n_all = accelerator.reduce(torch.tensor(float(sum(counts)), device=device), reduction="sum")
                    scale = world / n_all.clamp(min=1.0)
                step_loss = torch.zeros((), device=device)
                aux_parts: list[torch.Tensor] = []
                for i, (batch, _) in enumerate(micro):
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    step_loss += forward_backward(
                        model, batch, scale, inputs, chunk_len=chunk, mode=cfg.train.tbptt_mode,
                        backward=backward, no_sync=lambda: accelerator.no_sync(model),
                        sync_last=i == accum - 1, n_targets=counts[i], aux=aux_parts)
                step_aux = sum(aux_parts, torch.zeros((), device=device))
                step_loss = step_loss - step_aux  # the cross entropy alone
                updating = True
                grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += tokens_per_step
                data_state = micro[-1][1]
                updating = False
                pending.append((step, torch.stack([step_loss, step_aux.to(step_loss)])))
                window_tokens += tokens_per_step
                window_real += step_real
                if on_step is not None:
                    step_mean = step_loss if world == 1 else accelerator.reduce(step_loss, reduction="mean")
                    real_all = step_real if world == 1 else int(accelerator.reduce(
                        torch.tensor(float(step_real), device=device), reduction="sum").item())
                    on_step(step, {"loss": float(step_mean), "lr": lr_at(step - 1, cfg),
                                   "grad_norm": float(grad_norm), "real_tokens": real_all})
                log_now = step % cfg.log.every == 0 or step == cfg.train.max_steps
                if log_now:
                    log_window(grad_norm, t0)
                else:
                    window_time += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.max_steps):
                    evaluating = True
                    log_eval()
                    evaluating = False
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    save()
                if world == 1:
                    requested = stop.requested
                else:
                    requested = False
                    if vote is not None:  # the sum of the flags sent after the previous step
                        vote[0].wait()
                        requested, vote = vote[1].item() > 0, None
                    if not requested and step < cfg.train.max_steps:
                        flag = torch.tensor([float(stop.requested)])
                        vote = (dist.all_reduce(flag, group=vote_group, async_op=True), flag)
                if requested:
                    if pending:  # the steps since the last log: the resumed run starts after them
                        log_window(grad_norm, None)
                    stopped = True
                    if bar is not None:  # closed before the line: left open, the line was glued to its end and the
                        bar.close()      # bar drawn again below it as it closed
                    accelerator.print(f"stop requested: saving step {step} and exiting")
                    break
            flush()
            if stopped or cfg.checkpoint.final:
                save()
        except KeyboardInterrupt:
            stopped = True
            if bar is not None:  # (closed before the lines below, as at a stop request)
                bar.close()
            losses.update({s: float(v[0]) for s, v in pending})
            if updating:  # parameters may be half-updated: keep the previous checkpoint
                accelerator.print(f"interrupted during the optimizer step: not saving; last checkpoint "
                                  f"{last_ckpt}")
            else:
                optimizer.zero_grad(set_to_none=True)
                if step_rng is not None and step_rng[0] == step:  # the unfinished step's dropout drew from the RNG, and
                    # the resumed run, which redoes that step, drew other masks than an uninterrupted one
                    _set_torch_rng_state(step_rng[1])
                if pending:  # the steps since the last log, as a stop request logs them: the resumed run starts after
                    log_window(grad_norm, None)
                accelerator.print(f"interrupted: saving the last completed step {step}"
                                  + (" (its evaluation, cut short, is run by the resumed run)" if evaluating else ""))
                save({"eval_due": step} if evaluating else None)
            raise
        finally:
            batches.close()
            if bar is not None:
                bar.close()
            accelerator.end_training()
    return TrainResult(step=step, losses=losses, evals=evals, checkpoint=last_ckpt, stopped=stopped,
                       tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    """``zoo train CONFIG [--section.field=value ...] [--resume [DIR]]`` (also scripts/train.py)."""
    parser = argparse.ArgumentParser(
        prog="zoo train", allow_abbrev=False,
        # config is nargs="?" only so that `--resume CONFIG` can hand it back; it is required
        usage="zoo train [-h] config [--section.field=value ...] [--resume [DIR]]",
        description="Pretrain a causal LM under accelerate. Overrides: --section.field=value "
                    "(e.g. --train.max_steps=100 --data.seq_len=512 --output_dir=runs/x).")
    parser.add_argument("config", nargs="?", help="run config YAML (configs/train/*.yaml), or a packaged one's name")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR",
                        help="continue from DIR (a checkpoint or run directory), or from the run's newest "
                             "checkpoint")
    args, rest = parser.parse_known_args(argv)
    if args.config is None and args.resume is not None and Path(args.resume).suffix in (".yaml", ".yml"):
        args.config, args.resume = args.resume, "auto"  # `--resume CONFIG`: the flag took the config as its DIR
    if args.config is None:
        saved = Path(args.resume or "") / "train_config.yaml"  # a run or checkpoint directory keeps its config
        hint = f" (to continue that run: zoo train {saved} --resume {args.resume})" if args.resume and \
            saved.is_file() else ""
        parser.error(f"the following arguments are required: config{hint}")
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}; overrides look like --section.field=value")
    try:
        cfg = load_config(args.config, [item[2:] for item in rest])
    except ValueError as e:
        parser.error(str(e))
    if args.resume == "auto" and latest_checkpoint(cfg.output_dir) is None and os.environ.get("RANK", "0") == "0":
        print(f"--resume: no checkpoint in {cfg.output_dir!r} yet; starting the run from step 0")
    from zoo.eval.common import sigterm_interrupts

    # SIGTERM (a scheduler's, accelerate launch's) before the loop (the model built, the data read, a checkpoint
    # loaded) stops the run as Ctrl-C does, in one line and exit status 130: it killed the process there without a
    # word (the loop's own handler, which saves and stops, takes precedence while it is set)
    try:
        with sigterm_interrupts():
            result = train(cfg, resume=args.resume)
    except KeyboardInterrupt as e:  # a second Ctrl-C, or a signal before the loop: zoo.cli says 'interrupted: ...'
        raise KeyboardInterrupt("; ".join(filter(None, [str(e), _how_to_continue(args.config, rest, args.resume,
                                                                                cfg.output_dir)]))) from None
    from accelerate import PartialState

    if result.checkpoint is not None and PartialState().is_main_process:
        print(f"checkpoint: {result.checkpoint}", file=sys.stderr)
        if result.stopped:
            print(f"stopped at step {result.step}; "
                  f"{_how_to_continue(args.config, rest, args.resume, cfg.output_dir)}", file=sys.stderr)
    return 130 if result.stopped else 0  # stopped by a signal (saved, resumable): not a finished run


def _how_to_continue(config: str, overrides: list[str], resume: str | None, output_dir: str | Path) -> str:
    """The command that continues a stopped run: its own with --resume (its newest checkpoint) when output_dir holds
    one, else its own as given (a --resume DIR from another run's checkpoint kept). A stopped run said only where it
    saved, and the same command without --resume is refused (output_dir already holds checkpoints)."""
    import shlex

    if latest_checkpoint(output_dir) is not None:
        resume = "auto"
    argv = [config, *overrides] + ([] if resume is None else ["--resume"] if resume == "auto" else ["--resume", resume])
    script = Path(sys.argv[0]).name == "train.py"  # scripts/train.py, under accelerate launch: its own launch line
    return (f"the same launch of {shlex.join([sys.argv[0], *argv])} continues it" if script
            else f"{shlex.join(['zoo', 'train', *argv])} continues it")


__all__ = ["NO_DECAY_NAMES", "CheckpointConfig", "EvalConfig", "LogConfig", "LoopConfig", "ModelInputs",
           "NoWeightDecayMixin", "OptimConfig", "ScheduleConfig", "TrainConfig", "TrainResult", "active_parameters",
           "build_model", "build_optimizer", "config_from_dict", "count_parameters", "count_targets", "count_tokens",
           "forward_backward", "latest_checkpoint", "load_config", "lr_at", "main", "mfu_flops_per_token",
           "packed_documents_leak", "param_groups", "peak_tflops", "resume_by_name", "resume_changes",
           "resume_source_changes", "resume_weight_changes", "run_tokenizer", "save_checkpoint", "train",
           "validate_config"]
