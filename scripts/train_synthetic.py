"""Train and evaluate models on a synthetic recall task: the small-scale reproductions of the Mamba and Zoology papers.

    python scripts/train_synthetic.py configs/train/induction.yaml              # mamba vs attention, to 2^20
    python scripts/train_synthetic.py configs/train/mqar-sweep.yaml --only mamba --dry-run
    python scripts/train_synthetic.py configs/train/induction-cpu.yaml --train.max_steps=200

zoo.train pretrains on text; this runs the same pieces on ``zoo.data.synthetic`` rows instead: the AdamW
groups, warmup + ``schedule.kind`` learning-rate schedule and gradient clipping of ``zoo.train`` through
``zoo.finetune.run_training`` (fresh rows every step, under accelerate), then ``zoo.eval.synthetic.evaluate_synthetic``
over a grid of lengths (long rows in chunks with the state carried). A recipe names several ``models`` (zoo config
fields, or a zoo YAML) and optionally a ``sweep`` grid of dotted keys (``model.d_model``, ``optim.lr``, ...); every
(model, grid point) is one run in ``output_dir/<run>/`` (``model/``, ``trained.json``, ``result.json``). A
trained model is saved before its evaluation and reused when the model and training settings match; a
result.json with the same settings throughout is reused as it is. Ctrl-C or SIGTERM saves the phase in training
(``<run>/checkpoints/``, also every ``train.checkpoint_every`` steps) and the same command continues it; the
evaluation saves each finished cell (``<run>/result.partial.json``) and the same command runs only the others. The
runs of one call share one precision (``train.precision``). The summary keeps, per model and grid
point, the best run over ``select_over`` (the learning rate, as Zoology reports; where --only kept another model's
saved runs of some of the sweep's learning rates only, its row names the missing ones), and writes ``summary.md``,
``summary.json``, ``accuracy_vs_length.png`` and ``accuracy_vs_state.png`` (accuracy against the recurrent
state size, or the KV cache for attention, at the plotted sequence length).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import itertools
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.data.synthetic import COUNT_ARGUMENT
from zoo.eval.common import markdown_table, parse_int, sigterm_interrupts
from zoo.finetune import DataSection, LoopSection, PretrainSection
from zoo.train import OptimConfig, ScheduleConfig, _build, _set_dotted, read_yaml

PROG = "train_synthetic.py"  # the name its usage, its errors and its 'interrupted' line give


@dataclass
class EvalSection:
    """After training: accuracy over seq_lens × n_kv (None: the task's own count), n_samples rows per cell in
    batches of batch_size; rows longer than chunk_size run in chunks with the cache carried (constant memory
    for recurrent models). max_len: per model name, the longest seq_len to test (attention's KV cache and cost
    grow with the row). plot_seq_len / plot_count: the cell of the accuracy-vs-state plot (default: training); the
    summary's acc@T columns and accuracy_vs_length.png read each length at plot_count, which must be one of the
    grid's counts (n_kv, or the trained count without it); a plot_seq_len given must be one of every model's lengths
    (eval.seq_lens up to its max_len)."""

    seq_lens: list[int | str] = field(default_factory=list)
    n_kv: list[int] | None = None
    n_samples: int = 256
    batch_size: int = 32
    chunk_size: int | None = None
    max_len: dict[str, int] = field(default_factory=dict)
    plot_seq_len: int | None = None
    plot_count: int | None = None


@dataclass
class Recipe:
    """models: name -> zoo model config fields (a mapping) or a zoo YAML path. sweep: dotted key -> values
    (``model.<field>`` sets a model config field, e.g. model.d_model or model.mixers.M.d_state; other keys set
    run fields, e.g. optim.lr); select_over: sweep keys the summary maximises over. curriculum: phases
    {seq_len, max_steps[, micro_batch_size][, lr]} trained in order before the main phase (data.seq_len,
    train.max_steps), each a fresh run of the recipe's schedule (schedule.kind, cosine or wsd or constant, over the
    phase's max_steps from the phase's lr), its warmup capped at a tenth of its steps and min_lr at most its lr;
    phases may not be longer than data.seq_len, so the model never sees a row longer than the training length.
    model_overrides: model name -> {dotted run key: value}, applied to that model's runs after the sweep point
    (e.g. {mamba: {train.state_passing: true}}: settings only one family can take, such as state passing, which
    attention refuses); the keys that decide the evaluated rows (EVAL_ROW_KEYS: data.task, data.task_kwargs, data.seed,
    data.n_eval, eval.n_samples) are refused there, so that every model is evaluated on the same rows."""

    models: dict[str, Any]
    data: DataSection
    output_dir: str = "runs/synthetic"
    sweep: dict[str, Any] = field(default_factory=dict)
    select_over: list[str] = field(default_factory=lambda: ["optim.lr"])
    train: LoopSection = field(default_factory=LoopSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=100))
    eval: EvalSection = field(default_factory=EvalSection)
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Run:
    name: str
    model_name: str
    model_config: dict[str, Any]
    section: PretrainSection
    eval: EvalSection
    point: dict[str, Any]
    output_dir: Path
    phases: list[PretrainSection] = field(default_factory=list)  # the curriculum, then section


# the run keys that decide which rows a model is evaluated on (held out at the training length and over the grid)
EVAL_ROW_KEYS = ("data.task", "data.task_kwargs", "data.seed", "data.n_eval", "eval.n_samples")


def _dotted_keys(sweep: dict) -> dict:
    """Sweep keys as dotted paths: an override ``--sweep.optim.lr=[...]`` arrives nested, as {optim: {lr: [...]}}."""
    out: dict = {}
    for key, values in sweep.items():
        if isinstance(values, dict):
            out.update({f"{key}.{sub}": v for sub, v in _dotted_keys(values).items()})
        else:
            out[key] = values
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The recipe YAML as a dict with ``section.field=value`` overrides applied, validated by building it; an
    override also replaces that key in every model's ``model_overrides``."""
    data = read_yaml(path, overrides)
    # a run key given on the command line is the user's last word: it also replaces a model's own value for that
    # key (induction.yaml's mamba: {train.max_steps: 20000} had kept --train.max_steps=50 from shortening it)
    given = {item.partition("=")[0].strip().lstrip("-") for item in overrides or []}
    for name, own in (data.get("model_overrides") or {}).items():
        if isinstance(own, dict):
            # a section given as a mapping ({train: {max_steps: 5}}, as --model_overrides.mamba.train.max_steps=5
            # arrives) sets its fields: it replaced the whole section, the recipe's other train fields with their
            # defaults, without a word
            own = data["model_overrides"][name] = {
                **{k: v for k, v in own.items() if "." in k or not isinstance(v, dict)},
                **{f"{k}.{sub}": v for k, section in own.items() if "." not in k and isinstance(section, dict)
                   for sub, v in _dotted_keys(section).items()}}
            for key in given & set(own):
                del own[key]
    if isinstance(data.get("sweep"), dict):
        data["sweep"] = _dotted_keys(data["sweep"])
    for name, spec in list(data.get("models", {}).items()):
        if isinstance(spec, str):  # a zoo YAML: read it so that sweeps can change its fields
            data["models"][name] = yaml.safe_load(Path(spec).read_text())
    if not _build(Recipe, data, "").output_dir:  # (--output_dir=$OUT with OUT unset) trained into the working dir
        raise ValueError("output_dir: empty; name the folder of the runs")
    return data


def train_length(data: DataSection) -> int:
    """The row length the main phase trains at: data.seq_len, or the task's own default when it is None."""
    from zoo.eval.synthetic import task_default

    return data.seq_len if data.seq_len is not None else task_default(data.task, "seq_len")


def _section(data: dict) -> tuple[PretrainSection, EvalSection, list[PretrainSection]]:
    from zoo.finetune import _validate_run

    recipe = _build(Recipe, data, "")
    section = PretrainSection(data=recipe.data, train=recipe.train, optim=recipe.optim, schedule=recipe.schedule)
    _validate_run(section, "")
    phases = []
    for i, phase in enumerate(recipe.curriculum):
        unknown = set(phase) - {"seq_len", "max_steps", "micro_batch_size", "lr"}
        if unknown or not {"seq_len", "max_steps"} <= set(phase):
            raise ValueError(f"curriculum[{i}]: give seq_len and max_steps (optional micro_batch_size, lr), "
                             f"got {sorted(phase)}")
        if phase["seq_len"] > train_length(recipe.data):
            raise ValueError(f"curriculum[{i}].seq_len: {phase['seq_len']} exceeds data.seq_len "
                             f"{train_length(recipe.data)}; a curriculum only trains shorter rows")
        steps = int(phase["max_steps"])
        train = dataclasses.replace(recipe.train, max_steps=steps,
                                    micro_batch_size=int(phase.get("micro_batch_size", recipe.train.micro_batch_size)))
        optim = dataclasses.replace(recipe.optim, lr=float(phase.get("lr", recipe.optim.lr)))
        schedule = dataclasses.replace(recipe.schedule, warmup_steps=min(recipe.schedule.warmup_steps, steps // 10),
                                       min_lr=min(recipe.schedule.min_lr, optim.lr))
        data_ = dataclasses.replace(recipe.data, seq_len=int(phase["seq_len"]), seed=recipe.data.seed + 1000 * (i + 1))
        phase_section = PretrainSection(data=data_, train=train, optim=optim, schedule=schedule)
        _validate_run(phase_section, f"curriculum[{i}].")
        phases.append(phase_section)
    ev = recipe.eval
    ev.seq_lens = [parse_int(str(s)) for s in ev.seq_lens] or [train_length(recipe.data)]
    ev.max_len = {name: parse_int(str(limit)) for name, limit in ev.max_len.items()}  # 2^14 or 16K, as seq_lens
    return section, ev, phases


# a number in exponent form without a dot (1e-3), which YAML 1.1 reads as a string
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_float(value: Any) -> Any:
    """`value`, a float where it is a string YAML should have read as one (`--sweep.optim.lr=[1e-3]`): the run trained
    at 0.001 all the same, but its name and the summary kept '1e-3', and 1e-3 and 1.0e-3 were two runs of one point."""
    return float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) else value


def expand_runs(data: dict, only: list[str] | None = None) -> list[Run]:
    """One Run per (model, sweep grid point), in recipe order; raises ValueError for ``only`` names that are not
    models of the recipe and for state passing on a model that cannot carry its state (before anything trains)."""
    keys = list(data.get("sweep", {}))
    grid = [dict(zip(keys, map(_yaml_float, values)))
            for values in itertools.product(*(data["sweep"][k] for k in keys))] or [{}]
    runs = []
    unknown = set(data.get("model_overrides") or {}) - set(data["models"])
    if unknown:
        raise ValueError(f"model_overrides: no model named {sorted(unknown)} (models: {sorted(data['models'])})")
    # the rows every model is evaluated on: one model's own seed, task arguments or row count evaluated it on other
    # rows than the others, and the summary compared them as if on the same ones
    for model_name, own in (data.get("model_overrides") or {}).items():
        rows = [key for key in own or {} if any(key == k or key.startswith(f"{k}.") for k in EVAL_ROW_KEYS)]
        if rows:
            raise ValueError(f"model_overrides.{model_name}: {', '.join(rows)} decides the rows every model is "
                             f"evaluated on, which must be the same for all of them: set it at the top level "
                             f"(or sweep it), or run that model from a recipe of its own")
    unknown = set((data.get("eval") or {}).get("max_len") or {}) - set(data["models"])
    if unknown:  # a misspelt name lifted that model's limit without a word
        raise ValueError(f"eval.max_len: no model named {sorted(unknown)} (models: {sorted(data['models'])})")
    # a select_over key that is no sweep key maximised over nothing: a misspelt optim.lr kept every learning rate as a
    # "best" run, and accuracy_vs_state.png drew them as points of a state-size sweep
    unknown = [key for key in data.get("select_over") or [] if keys and key not in keys]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"select_over: {unknown[0]!r} is not a sweep key{hint}; the summary keeps the best run over "
                         f"sweep keys only (sweep: {', '.join(keys)}): give some of them, or select_over=[]")
    unknown = [name for name in only or [] if name not in data["models"]]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(data["models"]), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"--only: no model named {', '.join(map(repr, unknown))}{hint}; "
                         f"models: {', '.join(data['models'])}")
    for model_name, model_config in data["models"].items():
        if only and model_name not in only:
            continue
        for point in grid:
            run_data = copy.deepcopy({k: v for k, v in data.items()
                                      if k not in ("models", "sweep", "model_overrides")})
            config = copy.deepcopy(model_config)
            own = (data.get("model_overrides") or {}).get(model_name) or {}
            for key, value in [*point.items(), *own.items()]:
                if key.startswith("model."):
                    _set_dotted(config, key[len("model."):], value)
                else:
                    _set_dotted(run_data, key, value)
            section, ev, phases = _section({**run_data, "models": {model_name: config}})
            _check_vocab(model_name, config, section)
            _check_eval_grid(model_name, section, ev)
            if any(s.train.state_passing for s in [*phases, section]):
                _check_state_passing(model_name, config)
            suffix = "".join(f"-{k.split('.')[-1]}={v}" for k, v in point.items())
            name = f"{model_name}{suffix}"
            runs.append(Run(name, model_name, config, section, ev, point,
                            Path(data.get("output_dir", "runs/synthetic")) / name, phases))
    return runs


def _check_vocab(model_name: str, model_config: dict, section: PretrainSection) -> None:
    """The task's tokens must be the model's: a larger task vocabulary failed mid-training as an embedding
    IndexError (a device-side assert on a GPU)."""
    from zoo.config import ZooConfig
    from zoo.finetune import task_vocab_size

    need = task_vocab_size(section.data)
    have = model_config.get("vocab_size", ZooConfig.vocab_size)
    if need is not None and need > have:
        raise ValueError(f"data.task_kwargs.vocab_size: the {section.data.task} task draws from {need} tokens but "
                         f"model {model_name!r} has vocab_size {have}; set data.task_kwargs.vocab_size <= {have} "
                         f"or the model's vocab_size >= {need}")


def _check_eval_grid(model_name: str, section: PretrainSection, ev: EvalSection) -> None:
    """The evaluation grid must have a cell the task can build, and its row counts and chunk size must be positive:
    evaluate_synthetic raised only after training."""
    from zoo.data.synthetic import make_batch

    task, count_name = section.data.task, COUNT_ARGUMENT[section.data.task]
    for name in ("n_samples", "batch_size", "chunk_size"):  # evaluate_synthetic refused them after training
        if getattr(ev, name) is not None and getattr(ev, name) < 1:
            raise ValueError(f"eval.{name}: must be >= 1, got {getattr(ev, name)}"
                             + (" (null runs each row in one forward)" if name == "chunk_size" else ""))
    if ev.n_kv is not None and count_name is None:
        raise ValueError(f"eval.n_kv: task {task!r} has no count to vary; leave eval.n_kv unset")
    limit = ev.max_len.get(model_name)
    seq_lens = [s for s in ev.seq_lens if limit is None or s <= limit]
    if not seq_lens:
        raise ValueError(f"eval.max_len.{model_name}: {limit} leaves none of eval.seq_lens {ev.seq_lens} to test")
    # the plot cell's length, as plot_count: one the model does not test read as None for every run, so
    # accuracy_vs_state.png came out empty and the best run was picked over the grid instead, after training
    if ev.plot_seq_len is not None and ev.plot_seq_len not in seq_lens:
        fix = f"raise eval.max_len.{model_name}" if ev.plot_seq_len in ev.seq_lens else "add it to eval.seq_lens"
        raise ValueError(f"eval.plot_seq_len: {ev.plot_seq_len} is not a length model {model_name!r} is tested at "
                         f"({sorted(seq_lens)}), so its accuracy-vs-state point would be empty; set "
                         f"eval.plot_seq_len to one of them or {fix}")
    kwargs = dict(section.data.task_kwargs)
    trained = kwargs.pop(count_name, None) if count_name else None
    counts = ev.n_kv if ev.n_kv is not None else [trained]
    # the summary's acc@T columns, accuracy_vs_length.png and the plot cell read the cells of the plot count only: one
    # the grid does not evaluate left them all empty ('-'), after training, and the best run was picked over the grid
    if ev.plot_count is not None and count_name is None:
        raise ValueError(f"eval.plot_count: task {task!r} has no count of items; leave eval.plot_count unset")
    if count_name is not None:
        from zoo.eval.synthetic import task_default

        plot_count = ev.plot_count if ev.plot_count is not None else (
            trained if trained is not None else task_default(task, count_name))
        evaluated = [c if c is not None else task_default(task, count_name) for c in counts]
        if plot_count not in evaluated:
            given = "eval.plot_count" if ev.plot_count is not None else \
                f"the trained {count_name} (eval.plot_count's default)"
            raise ValueError(f"eval.plot_count: {given} is {plot_count}, which the grid does not evaluate ("
                             f"{count_name} {sorted(set(evaluated))}): the summary's acc@T columns and its plots would "
                             f"be empty; set eval.plot_count to one of them or add {plot_count} to eval.n_kv")
    errors = []
    for seq_len, count in itertools.product(seq_lens, counts):
        try:
            make_batch(task, 1, seq_len, **kwargs, **({count_name: count} if count is not None else {}))
            return
        except ValueError as e:
            errors.append(f"seq_len={seq_len}: {e}")
    raise ValueError(f"eval.seq_lens / eval.n_kv: no cell of the {task} grid can be built for model {model_name!r} "
                     f"({'; '.join(errors)}); choose lengths and counts that fit")


def _check_state_passing(model_name: str, model_config: dict) -> None:
    """train.state_passing carries the cache from row to row, which only a model whose every layer keeps a
    recurrent state can do (zoo.finetune._state_passing_step's rule, checked on the cache a meta model makes)."""
    from transformers import AutoModelForCausalLM

    from zoo.cache import RecurrentLayer, ZooCache
    from zoo.config import ZooConfig

    config = ZooConfig(**model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cache = ZooCache.for_model(model, device="meta")
    if not cache.recurrent_only():
        kinds = sorted({spec["type"] for spec, layer in zip(config.layer_specs(), cache.layers)
                        if not isinstance(layer, RecurrentLayer)})
        raise ValueError(f"train.state_passing: model {model_name!r} has {'/'.join(kinds)} layers, which keep no "
                         f"recurrent state to pass; state passing needs every layer recurrent (mamba, mamba2, gla). "
                         f"Set it for the recurrent models only: model_overrides: {{<model>: "
                         f"{{train.state_passing: true}}}}")


def build_model(run: Run):
    """A fresh zoo causal LM of the run's model config (fp32)."""
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig

    return AutoModelForCausalLM.from_config(ZooConfig(**run.model_config)).float()


def state_floats(model, seq_len: int) -> int:
    """Floats of memory per sequence after seq_len tokens: recurrent states (and conv) or the KV cache."""
    return sum(block.mixer.state_size(seq_len) for block in model.model.layers)


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _run_settings(run: Run) -> tuple[dict, dict]:
    """(what the run's model is trained under, that and its evaluation's settings), as trained.json and result.json
    record them."""
    trained = {"model": run.model_config, "section": _plain(run.section),
               "curriculum": [_plain(p) for p in run.phases]}
    return trained, {**trained, "eval": _plain(run.eval)}


def _same_settings(saved, wanted: dict) -> bool:
    """Saved settings that agree with `wanted` but for logging and saving (train.log_every, progress_bar,
    checkpoint_every, eval_batch_size) and for the summary's plot cell (eval.plot_seq_len, plot_count): a rerun
    with another log_every retrained and re-evaluated every run, one with another plot_count re-evaluated them."""
    return isinstance(saved, dict) and _result_stamp(saved) == _result_stamp(wanted)


def saved_result(run: Run) -> dict | None:
    """The run's result.json when it was evaluated under the run's settings (None otherwise), with the state size at
    the run's plot length."""
    result_file = run.output_dir / "result.json"
    if not result_file.is_file():
        return None
    result = json.loads(result_file.read_text())
    if not _same_settings(result.get("settings"), _run_settings(run)[1]):
        return None
    plot_len = run.eval.plot_seq_len or train_length(run.section.data)
    if result.get("state_at") != plot_len:  # the memory at the plotted length (an attention model's KV cache)
        with torch.device("meta"):
            result["state_floats"] = state_floats(build_model(run), plot_len)
        result["state_at"] = plot_len
    return result


def train_and_evaluate(run: Run, accelerator) -> dict:
    """Train the run's model on its task (or load it when trained.json records the same model and training
    settings), save model/, then evaluate it on the length grid and write result.json (reused when the
    evaluation settings match too)."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    from zoo.eval.common import remove_partial, write_json, write_text_atomically
    from zoo.eval.synthetic import evaluate_synthetic
    from zoo.finetune import _eval_loader, _phase_stamp, build_datasets, evaluate, run_training

    trained, settings = _run_settings(run)
    result_file, stamp = run.output_dir / "result.json", run.output_dir / "trained.json"
    # the evaluation's finished cells, saved after each: a rerun evaluates only the others (a grid to 2^20 tokens runs
    # for hours, and an interruption at its longest rows lost every cell)
    partial = run.output_dir / "result.partial.json"
    same = _same_settings
    plot_len = run.eval.plot_seq_len or train_length(run.section.data)
    result = saved_result(run)
    if result is not None:
        accelerator.print(f"{run.name}: reusing {result_file}")
        return result
    t = run.section.train

    def rows(section: PretrainSection) -> int:
        return section.train.max_steps * section.train.micro_batch_size * section.train.grad_accum * \
            accelerator.num_processes

    train_set, eval_set = build_datasets(run.section.data, n_train=rows(run.section))
    if stamp.is_file() and same(json.loads(stamp.read_text())["settings"], trained):
        accelerator.print(f"{run.name}: reusing the model trained in {run.output_dir / 'model'}")
        model = AutoModelForCausalLM.from_pretrained(run.output_dir / "model").float().to(accelerator.device)
        saved = json.loads(stamp.read_text())
        log, train_seconds = saved["log"], saved["train_seconds"]
    else:
        set_seed(t.seed)
        model = build_model(run).to(accelerator.device)
        start = time.perf_counter()
        log = []
        # each phase keeps a checkpoint (train.checkpoint_every, and on SIGTERM / Ctrl-C) that a rerun of the same
        # run continues; a stopped later phase reruns the earlier phases from their last checkpoints, in the same
        # data order, so the model is the one an uninterrupted run trains
        checkpoints = run.output_dir / "checkpoints"
        for i, phase in enumerate(run.phases):  # shorter rows first
            phase_set, _ = build_datasets(phase.data, n_train=rows(phase))
            model, phase_log = run_training(accelerator, model, phase_set, phase, 0,
                                            f"{run.name} L={phase.data.seq_len}", checkpoints / f"phase{i}",
                                            _phase_stamp({**trained, "phase": i}))
            log += [{**row, "seq_len": phase.data.seq_len} for row in phase_log]
        model, main_log = run_training(accelerator, model, train_set, run.section, 0, run.name,
                                       checkpoints / "main", _phase_stamp({**trained, "phase": "main"}))
        log += [{**row, "seq_len": run.section.data.seq_len} for row in main_log]
        train_seconds = time.perf_counter() - start
        if accelerator.is_main_process:  # saved before the (possibly long) evaluation
            run.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(partial)  # cells of a model trained before, gone before the new one's stamp is written
            # and that model's stamp and result, before its weights are overwritten: a stop between the save and the
            # new stamp left them beside the new weights, and a rerun of the earlier settings reused them as its own
            stamp.unlink(missing_ok=True)
            result_file.unlink(missing_ok=True)
            model.save_pretrained(run.output_dir / "model", safe_serialization=True)
            # written beside and renamed over (as result.json): a trained.json cut short by an interruption stopped
            # every rerun at reading it (JSONDecodeError)
            write_text_atomically(json.dumps({"settings": trained, "log": log, "train_seconds": train_seconds},
                                             indent=1), stamp)
            shutil.rmtree(checkpoints, ignore_errors=True)  # the model is saved: done with them
        accelerator.wait_for_everyone()
    model.eval()
    held_out = evaluate(model, _eval_loader(eval_set, t.eval_batch_size, 0), accelerator.device)
    accelerator.print(f"{run.name}: held-out accuracy at the training length {held_out['accuracy']:.1%} "
                      f"(trained in {train_seconds:.0f}s)")
    limit = run.eval.max_len.get(run.model_name)
    seq_lens = [s for s in run.eval.seq_lens if limit is None or s <= limit]
    data = run.section.data
    # the count the model trained with (mqar's n_kv) is the grid's counts' default, not a second n_kv argument
    task_kwargs = dict(data.task_kwargs)
    trained_count = task_kwargs.pop(COUNT_ARGUMENT[data.task], None) if COUNT_ARGUMENT[data.task] else None
    counts = run.eval.n_kv if run.eval.n_kv is not None else None if trained_count is None else [trained_count]
    # the cells saved by an interrupted evaluation of this model (its training's seconds tell it from one retrained
    # since) under the same settings
    key = {"settings": _result_stamp(settings), "train_seconds": train_seconds}
    saved = json.loads(partial.read_text()) if partial.is_file() else None
    saved_key = saved.get("key") if isinstance(saved, dict) else None
    # (compared as _same_settings does: a partial of an earlier version keyed by the whole settings, logging and the
    # plot cell's included, was taken for another evaluation's and its cells evaluated again)
    same = isinstance(saved_key, dict) and saved_key.get("train_seconds") == json.loads(json.dumps(train_seconds)) \
        and _same_settings(saved_key.get("settings"), json.loads(json.dumps(settings)))
    done, started = (saved["rows"], saved.get("started")) if same else (None, None)
    if done or started:
        accelerator.print(f"{run.name}: resuming the evaluation; the {len(done)} cells in {partial} are kept"
                          + (f", and {started['next']} rows of the one it stopped in" if started else ""))

    def save(rows: list[dict], started: dict | None = None) -> None:  # after every cell, and the batches finished of
        # the cell a stop came in (`started`, on_stop's)
        if accelerator.is_main_process:
            write_json({"key": key, "rows": rows} | ({"started": started} if started else {}), partial)

    start = time.perf_counter()
    grid = evaluate_synthetic(model, data.task, seq_lens, counts, run.eval.n_samples, run.eval.batch_size,
                              seed=data.seed + 2, chunk_size=run.eval.chunk_size, progress=accelerator.is_main_process,
                              on_cell=save, done=done, on_stop=save, started=started, **task_kwargs)
    eval_seconds = time.perf_counter() - start
    result = {"name": run.name, "model_name": run.model_name, "point": run.point, "settings": settings,
              "parameters": sum(p.numel() for p in model.parameters()),
              "state_floats": state_floats(model, plot_len), "state_at": plot_len,
              "train_seconds": train_seconds, "eval_seconds": eval_seconds, "log": log,
              "held_out": held_out, "rows": grid["rows"], "backends": _backends(model)}
    if accelerator.is_main_process:
        write_text_atomically(json.dumps(result, indent=1), result_file)
        remove_partial(partial)
    accelerator.print(f"{run.name}: evaluated {len(seq_lens)} lengths in {eval_seconds:.0f}s")
    return result


def _result_stamp(settings: dict) -> dict:
    """What a run's result (its evaluated grid) must agree on to be reused: its settings less those of logging and
    saving (``zoo.finetune._phase_stamp``) and of the summary's plot cell, which the summary reads from the recipe."""
    from zoo.finetune import _phase_stamp

    out = _phase_stamp(settings)
    if isinstance(out.get("eval"), dict):
        for key in ("plot_seq_len", "plot_count"):
            out["eval"].pop(key, None)
    return out


def _backends(model) -> dict[str, str]:
    try:
        return model.backend_report()
    except (AttributeError, ImportError):
        return {}


def cell_accuracy(result: dict, seq_len: int, count: int | None = None) -> float | None:
    """Accuracy of the (seq_len, count) cell of a run (count None: the mean over the seq_len's cells)."""
    rows = [r for r in result["rows"] if r["seq_len"] == seq_len]
    if count is not None:
        rows = [r for r in rows if count in (r.get("n_kv"), r.get("n_tokens"))]
    if not rows:
        return None
    return sum(r["n_correct"] for r in rows) / sum(r["n_answers"] for r in rows)


def grid_accuracy(result: dict) -> float | None:
    """Accuracy over every evaluated cell of a run (answers pooled)."""
    rows = result["rows"]
    answers = sum(r["n_answers"] for r in rows)
    return sum(r["n_correct"] for r in rows) / answers if answers else None


def summarize(data: dict, runs: list[Run], results: list[dict]) -> tuple[list[dict], list[dict]]:
    """(all rows, best rows): one row per run with its accuracy per seq_len; best over select_over, by the
    accuracy at the plot cell, or over the whole evaluated grid where that cell was not evaluated (`selected_by`).
    A best row picked among some of the sweep's select_over points only (--only keeps the saved runs of the other
    models, which may lack some) names the others in `missing` ("lr=0.01, lr=0.1")."""
    from zoo.eval.synthetic import task_default

    select = set(data.get("select_over", ["optim.lr"]))
    sweep = data.get("sweep") or {}
    chosen = [key for key in sweep if key in select]  # (in sweep order, as the runs' names)
    wanted = []  # (by equality: a swept value may be a list)
    for point in itertools.product(*([_yaml_float(v) for v in sweep[key]] for key in chosen)):
        wanted += [point] if point not in wanted else []
    # every run gets a column for every length a run of the call evaluates ('-' where it does not): a model_overrides
    # eval.seq_lens dropped the other runs' lengths from the table (those of the first run made the columns) or
    # failed the plot after every run had trained (KeyError)
    seq_lens = summary_lengths(runs)
    table = []
    for run, res in zip(runs, results):
        plot_len = run.eval.plot_seq_len or train_length(run.section.data)
        count_name = COUNT_ARGUMENT[run.section.data.task]
        # the trained count, the task's default where task_kwargs leave it out (None pooled every count's cell)
        count = run.eval.plot_count or (run.section.data.task_kwargs.get(
            count_name, task_default(run.section.data.task, count_name)) if count_name else None)
        row = {"run": run.name, "model": run.model_name, **{k.split(".")[-1]: v for k, v in run.point.items()},
               "params": res["parameters"], "state_floats": res["state_floats"],
               "plot_accuracy": cell_accuracy(res, plot_len, count)}
        # a plot cell outside the grid read as None for every run, and the sweep's first run was taken as its best
        row["selected_by"] = "plot cell" if row["plot_accuracy"] is not None else "grid"
        row["_score"] = row["plot_accuracy"] if row["plot_accuracy"] is not None else grid_accuracy(res)
        # at the plot count: pooled over every count a length can hold, a longer length took in more (and harder)
        # counts than a shorter one, so acc@T fell with T for a model that ignores the length
        for seq_len in seq_lens:
            acc = cell_accuracy(res, seq_len, count) if seq_len in run.eval.seq_lens else None
            row[f"acc@{seq_len}"] = "-" if acc is None else acc
        row["_group"] = (run.model_name, tuple((k, v) for k, v in run.point.items() if k not in select))
        row["_selected"] = tuple(run.point.get(key) for key in chosen)
        table.append(row)
    best: dict[tuple, dict] = {}
    for row in table:
        kept = best.get(row["_group"])
        if kept is None or (row["_score"] or 0) > (kept["_score"] or 0):
            best[row["_group"]] = row
    # a group of some of the select_over points: --only kept another model's saved runs, of one learning rate where
    # its earlier call had run no other, and the summary called it the best learning rate of the sweep
    for group, row in best.items():
        present = [r["_selected"] for r in table if r["_group"] == group]
        missing = [point for point in wanted if point not in present]
        if missing:
            best[group] = {**row, "missing": ", ".join(
                " ".join(f"{key.split('.')[-1]}={value}" for key, value in zip(chosen, point)) for point in missing)}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("_group", "_score", "_selected")} for r in rows]
    return strip(table), strip(best.values())


def summary_lengths(runs: list[Run]) -> list[int]:
    """The evaluated lengths of the summary's acc@T columns: those of every run (model_overrides may give a model its
    own eval.seq_lens)."""
    return sorted({s for run in runs for s in run.eval.seq_lens})


def plot_summary(best: list[dict], seq_lens: list[int], out: Path, train_lens: list[int]) -> list[Path]:
    """accuracy_vs_length.png (one line per run kept, a dashed line at each training length of the runs) and
    accuracy_vs_state.png (one line per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if len(seq_lens) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in best:
            points = [(s, row[f"acc@{s}"]) for s in seq_lens if row[f"acc@{s}"] != "-"]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=row["run"])
        for train_len in sorted(set(train_lens)):  # (the first run's alone was drawn, for runs of other lengths too)
            ax.axvline(train_len, color="k", ls="--", lw=1, label=f"train length {train_len}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_length.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    models = sorted({r["model"] for r in best})
    if len(best) > len(models):  # several points per model: a state-size sweep
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in models:
            rows = sorted((r for r in best if r["model"] == model), key=lambda r: r["state_floats"])
            ax.plot([r["state_floats"] for r in rows], [r["plot_accuracy"] for r in rows], marker="o", label=model)
        ax.set_xscale("log")
        ax.set_xlabel("state size: floats per sequence (recurrent state and conv window;\n"
                      "attention: KV cache at the plotted length)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(out / "accuracy_vs_state.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0] + " Overrides: --section.field=value (e.g. "
        "--train.max_steps=200 --output_dir=runs/x).", allow_abbrev=False)
    parser.add_argument("config", help="recipe YAML (configs/train/induction.yaml, mqar-sweep.yaml, ...)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="model names to run (the summary keeps the saved runs of the others)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and build their models only")
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}; overrides look like --section.field=value")
    try:
        data = load_recipe(args.config, [item[2:] for item in rest])
        runs = expand_runs(data, args.only)
    except ValueError as e:  # as zoo train: bad input is one line and exit status 2, before anything trains
        parser.error(str(e))
    if args.dry_run:
        for run in runs:
            with torch.device("meta"):
                model = build_model(run)
            # (the curriculum's steps went unsaid: induction-cpu.yaml's 900 steps read as 300)
            phases = "".join(f" + {p.train.max_steps} at {p.data.seq_len}" for p in run.phases)
            steps = run.section.train.max_steps
            print(f"{run.name}: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps"
                  + (f" at {train_length(run.section.data)} after a curriculum of {phases[3:]}" if phases else "")
                  + f" -> {run.output_dir}")
        return 0
    from accelerate import Accelerator

    from zoo.finetune import _refuse_fsdp
    from zoo.train import _refuse_fp16_without_autocast, _refuse_lone_processes, _run_precision, reset_accelerate_state

    try:  # the launch's precision under auto; another explicit one is refused
        precisions = {run.name: {_run_precision(s.train.precision) for s in [*run.phases, run.section]}
                      for run in runs}
    except ValueError as e:
        parser.error(str(e))
    if len(set().union(*precisions.values())) > 1:  # one Accelerator (one autocast) serves every run of the process
        parser.error("train.precision: the runs of one call share one precision, and these differ: " + ", ".join(
            f"{name} {'/'.join(sorted(value))}" for name, value in precisions.items())
            + "; run them in separate calls (--only)")
    # as zoo train's: a run may follow another in the same process (tests); the PartialState too (it kept the device
    # an earlier run fixed: ACCELERATE_USE_CPU=1 after a run on the GPU trained on the GPU)
    reset_accelerate_state()
    accelerator = Accelerator(mixed_precision=_run_precision(runs[0].section.train.precision))
    try:  # each lone process would train every run and write the same model/, result.json and summary
        _refuse_fp16_without_autocast(accelerator, runs[0].section.train.precision)
        _refuse_lone_processes(accelerator, data.get("output_dir", "runs/synthetic"), "train and evaluate every run")
        _refuse_fsdp(accelerator, "scripts/train_synthetic.py")
    except ValueError as e:
        parser.error(str(e))
    try:
        # SIGTERM (a scheduler's, accelerate launch's) outside a training (an evaluation, a model's save) stops the
        # runs as Ctrl-C does: it killed the process there without a word (run_training's own handler saves and stops
        # while a phase trains)
        with sigterm_interrupts():
            results = [train_and_evaluate(run, accelerator) for run in runs]
    except KeyboardInterrupt as e:  # SIGTERM / Ctrl-C: run_training saved the phase; finished runs are kept
        # (a stopped training's message says it already: the line said 'the same command continues' twice)
        said = "the same command continues" in str(e)
        print(f"{PROG}: interrupted{f': {e}' if str(e) else ''}{'' if said else '; the same command continues'}",
              file=sys.stderr)
        return 130
    if not accelerator.is_main_process:
        return 0
    if args.only:  # the summary covers the recipe's other models too, where this output_dir holds their results under
        # the same settings (it covered the models of this call alone: one call per model left the last one's)
        try:
            others = [run for run in expand_runs(data) if run.model_name not in args.only]
        except ValueError:  # (a model this call left out cannot run as the recipe stands)
            others = []
        kept = [(run, result) for run in others if (result := saved_result(run)) is not None]
        if kept:
            print(f"summary: with the saved results of {', '.join(run.name for run, _ in kept)} (not in --only)")
        runs, results = [*runs, *(run for run, _ in kept)], [*results, *(result for _, result in kept)]
    table, best = summarize(data, runs, results)
    out = Path(data.get("output_dir", "runs/synthetic"))
    seq_lens = summary_lengths(runs)
    columns = ["run", "params", "state_floats", *[f"acc@{s}" for s in seq_lens]]
    partial = sorted({row["model"] for row in best if row.get("missing")})
    text = (f"# {args.config}\n\nacc@T: accuracy at T tokens with the plot count of items (plot_count: default the "
            f"trained count; every cell is in summary.json's result rows and each run's result.json)\n\n"
            f"## best per model and grid point\n\n{markdown_table(best, columns + ['missing'] * bool(partial))}\n")
    if partial:
        select = ", ".join(key for key in data.get("select_over", ["optim.lr"]) if key in (data.get("sweep") or {}))
        text += (f"\nPartial: the best run of {', '.join(partial)} is over part of the sweep's {select} only (this "
                 f"output_dir holds no result of the runs 'missing' names under these settings; --only "
                 f"{' '.join(partial)} runs them)\n")
    if len(best) < len(table):
        text += f"\n## every run\n\n{markdown_table(table, columns)}\n"
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in results)
    text += f"\n{len(results)} runs, {seconds / 60:.1f} min of training and evaluation (reused runs included)\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"runs": table, "best": best}, indent=1, default=str))
    pngs = plot_summary(best, seq_lens, out, [train_length(run.section.data) for run in runs])
    print(text)
    print(f"wrote {out / 'summary.md'}, summary.json" + "".join(f", {p.name}" for p in pngs))
    return 0 if all(math.isfinite(r["held_out"]["loss"]) for r in results) else 1


if __name__ == "__main__":  # bad input ends in one line and exit status 2, an interruption in 130, as the sweeps
    from zoo.cli import _exit, _run

    # (it ran main bare: a missing model YAML, or a Ctrl-C before the first run, ended in a traceback)
    _exit(_run(PROG, main, sys.argv[1:]))
