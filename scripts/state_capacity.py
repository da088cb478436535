"""State-capacity sweep (Stuffed Mamba): train models of several state sizes at several lengths, find for each the
shortest training length past which no state collapse appears, and fit a line of that length against state size.

    python scripts/state_capacity.py configs/train/state-capacity.yaml
    python scripts/state_capacity.py configs/train/state-capacity.yaml --dry-run        # list runs and sizes
    python scripts/state_capacity.py configs/train/state-capacity.yaml --fit-only       # re-judge and re-fit
    python scripts/state_capacity.py configs/train/state-capacity.yaml --only d_state16 --train_lengths=[128,1024]

Every (model, training length L) is a ``zoo.train`` run on text (``run`` holds the run config; each length
gets batch_tokens / L rows per step, in ``run.train.grad_accum`` micro batches, and tokens_per_run / batch_tokens
steps, so every run sees the same tokens; ``run.schedule.warmup_steps``, 100 by default, is capped at a tenth of
those steps) in ``output_dir/<model>-L<L>/``. Each trained model is evaluated with
``zoo.eval.length`` (per-position loss on long documents, state carried chunk to chunk) without and with every
``eval.mitigations`` spec (``{L}`` in a spec is replaced by the training length, e.g. ``window:r={L}``;
``norm-calibrated:factor=F`` caps each head's state norm at F times its largest norm over the documents' first L
tokens).

Collapse at L: some log-spaced position bin in [L, factor·L) has a mean loss above the mean loss of the tokens
in the bins that start in [L, 2L) (the first positions past the training length) by more than ``margin`` nats.
The capacity length of a model is the shortest trained L such that neither L nor any longer trained length
collapses (only bounded, "<= L", when that is the shortest trained length: such models are left out of the fit).
The fit is ``L* (K tokens, K = 1024) = a · S + b`` with S the recurrent state in millions of floats (SSM states
only, no conv buffers: n_heads·head_dim·d_state per mamba2 layer, as the paper counts), compared with the paper's
5.172 · S − 4.469. Writes summary.md, summary.json, capacity.png (collapse map, fit and the paper's line) and one
length-curve PNG per run.
A rerun reuses a run's evaluation when evaluations-settings.json records the same model (done.json) and curve
settings; curves saved under other settings are left out of the table, the fit and the collapse report. An evaluation
saves its finished documents as it goes (``<run>/length-<spec>.partial.pt``, as ``zoo eval length`` does), so a rerun
after an interruption resumes it at its next document.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import yaml

K = 1024  # tokens per "K" (the paper's 8K, 16K, 64K training lengths are powers of two)
PAPER_LINE = (5.172, -4.469)  # Stuffed Mamba v1 Fig. 12: L* (K tokens) = 5.172 · S (M floats) − 4.469
# the name its usage, its errors and its 'interrupted' line give (the latter said 'state_capacity', the others the
# file's name)
PROG = "state_capacity.py"
SAVE_EVERY = 30.0  # seconds between saves of an evaluation's finished documents
SWEEP_FIELDS = ("output_dir", "tokens_per_run", "batch_tokens", "train_lengths", "run", "models", "eval")
# set by the sweep for each run: the run section giving them was silently overruled
RUN_SET_BY_SWEEP = {"model": "models", "output_dir": "output_dir", "data.seq_len": "train_lengths",
                    "train.max_steps": "tokens_per_run / batch_tokens", "train.micro_batch_size": "batch_tokens / L"}
EVAL_DEFAULTS = {"max_len": 16384, "n_docs": 8, "chunk_size": 2048, "batch_size": 4, "bins_per_octave": 2,
                 "factor": 8, "margin": 0.1, "mitigations": [], "seed": 0, "start": "document"}


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The sweep YAML with ``key.sub=value`` overrides, its eval defaults filled in and every run config checked."""
    from zoo.train import read_yaml

    data = read_yaml(path, overrides)
    for key in data:  # a misspelt output_dir left the runs in the default folder, without a word
        if key not in SWEEP_FIELDS:
            close = difflib.get_close_matches(str(key), SWEEP_FIELDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"{key}: unknown field{hint} (fields: {', '.join(SWEEP_FIELDS)})")
    missing = [k for k in ("run", "models", "train_lengths", "tokens_per_run", "batch_tokens") if k not in data]
    if missing:
        raise ValueError(f"state-capacity sweep: missing {missing}")
    run = data["run"]
    # the sweep writes into run and its data, train and schedule sections: another value (run: null, a section
    # given a number) ended in a TypeError or AttributeError traceback
    if not isinstance(run, dict):
        raise ValueError(f"run: expected a mapping of run config sections, got {run!r}")
    for section in ("data", "train", "schedule"):
        if section in run and not isinstance(run[section], dict):
            raise ValueError(f"run.{section}: expected a mapping of fields, got {run[section]!r}")
    for key, by in RUN_SET_BY_SWEEP.items():
        section, _, field = key.rpartition(".")
        holder = run.get(section) if section and isinstance(run, dict) else run
        if isinstance(holder, dict) and field in holder:
            raise ValueError(f"run.{key}: the sweep sets it for each run (from {by}); leave it out of run")
    unknown = set(data.get("eval", {})) - set(EVAL_DEFAULTS)
    if unknown:
        raise ValueError(f"eval: unknown keys {sorted(unknown)}; known: {sorted(EVAL_DEFAULTS)}")
    data["eval"] = {**EVAL_DEFAULTS, **data.get("eval", {})}
    for name, spec in list(data["models"].items()):
        if isinstance(spec, str):
            data["models"][name] = yaml.safe_load(Path(spec).read_text())
    data.setdefault("output_dir", "runs/state-capacity")
    if not isinstance(data["output_dir"], str) or not data["output_dir"]:  # "" trained into the working directory
        raise ValueError(f"output_dir: expected the name of the folder of the runs, got {data['output_dir']!r}")
    lengths = data["train_lengths"]
    if not isinstance(lengths, list) or not lengths or not all(_is_int(x) and x >= 1 for x in lengths):
        raise ValueError(f"train_lengths: expected a list of positive integers (tokens per row), got {lengths!r}")
    data["train_lengths"] = sorted(lengths)
    for key in ("tokens_per_run", "batch_tokens"):
        if not (_is_int(data[key]) and data[key] >= 1):
            raise ValueError(f"{key}: expected a positive integer (tokens), got {data[key]!r}")
    check_eval(data["eval"])
    check_judgeable(data["train_lengths"], data["eval"])
    check_mitigations(data["eval"]["mitigations"])
    expand_runs(data)  # every run config must validate
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_eval(ev: dict) -> None:
    """The ``eval`` section's values, checked at load: a wrong type would otherwise surface only after training,
    in the evaluation or the collapse verdict (and that run's evaluation would be lost)."""
    for key in ("max_len", "n_docs", "chunk_size", "batch_size"):
        lowest = 2 if key == "max_len" else 1
        if key == "chunk_size" and ev[key] is None:  # one forward per document (zoo.eval.length)
            continue
        if not (_is_int(ev[key]) and ev[key] >= lowest):
            raise ValueError(f"eval.{key}: expected an integer >= {lowest}, got {ev[key]!r}")
    for key, lowest in (("bins_per_octave", 0), ("factor", 0), ("margin", None)):
        value = ev[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (lowest is not None and value <= lowest) or (lowest is None and value < 0):
            bound = "> 0" if lowest is not None else ">= 0 (nats)"
            raise ValueError(f"eval.{key}: expected a number {bound}, got {value!r}")
    if not _is_int(ev["seed"]):
        raise ValueError(f"eval.seed: expected an integer, got {ev['seed']!r}")
    if ev["start"] not in ("document", "random"):
        raise ValueError(f"eval.start: expected 'document' or 'random', got {ev['start']!r}")


def check_judgeable(lengths: list[int], ev: dict) -> None:
    """Refuse training lengths whose evaluation has no position bin in [L, 2L) (the reference of judge_collapse):
    eval.max_len <= L (or just above it) leaves such a length never judged, so no model gets a capacity length at
    or below it (a length not judged ends every model's run of lengths free of collapse), and with the longest
    length none at all and no fit: that used to show only after every run had trained."""
    from zoo.eval.length import log_bins

    starts = [lo for lo, _ in log_bins(ev["max_len"] - 1, ev["bins_per_octave"])]
    blind = [L for L in lengths if not any(L <= s < 2 * L for s in starts)]
    if not blind:
        return
    # the bins' edges do not depend on max_len (it only cuts them off): the first edge in [L, 2L) of each length
    edges = [lo for lo, _ in log_bins(2 * max(blind), ev["bins_per_octave"])]
    firsts = [min((s for s in edges if L <= s < 2 * L), default=None) for L in blind]
    if None in firsts:
        key, fix = "eval.bins_per_octave", "eval.bins_per_octave >= 1"
        why = f"at {ev['bins_per_octave']} the bins skip [L, 2L)"
    else:
        key, fix = "eval.max_len", f"eval.max_len >= {max(firsts) + 1} (the recipes evaluate to eval.factor · L)"
        why = f"{ev['max_len']} ends the evaluation before a bin in [L, 2L) starts"
    lost = "no model gets a capacity length" + ("" if max(lengths) in blind else " at or below them")
    raise ValueError(f"{key}: {why} for train_lengths {blind} (the reference of the collapse verdict), so collapse "
                     f"there cannot be judged and {lost}; give {fix}, or leave out those lengths")


def check_mitigations(specs: list) -> None:
    """Parse every ``eval.mitigations`` spec now, so that a typo fails before training, not after it."""
    from zoo.state import parse_mitigation

    if not isinstance(specs, list):
        raise ValueError(f"eval.mitigations: expected a list of specs, got {specs!r}")
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"eval.mitigations: {spec!r} is not a spec string (e.g. 'window:r={{L}}')")
        if norm_calibration_factor(spec) is None:
            try:
                parse_mitigation(spec.replace("{L}", "1"))
            except ValueError as e:  # float() of a bad value does not name the spec
                raise ValueError(f"eval.mitigations: {spec!r}: {e}") from None


def norm_calibration_factor(spec: str) -> float | None:
    """F of a ``norm-calibrated[:factor=F]`` spec (1.0 when not given); None for any other kind of spec. Raises
    ValueError naming the spec for a key other than factor, or a factor that is not a number > 0."""
    kind, _, args = spec.strip().partition(":")
    if kind.strip() != "norm-calibrated":
        return None
    factor = 1.0
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if key.strip() != "factor" or not sep:
            raise ValueError(f"eval.mitigations: {spec!r}: norm-calibrated takes only factor=F, got {item!r}")
        try:
            factor = float(value)
        except ValueError:
            raise ValueError(f"eval.mitigations: {spec!r}: factor must be a number, got {value.strip()!r}") from None
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"eval.mitigations: {spec!r}: factor must be > 0, got {factor:g}")
    return factor


def check_only(only: list[str] | None, models: dict) -> None:
    """Refuse ``--only`` names that are not models of the sweep (training nothing would look like success)."""
    unknown = [name for name in only or [] if name not in models]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(models), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"--only: no model named {', '.join(map(repr, unknown))}{hint}; "
                         f"models: {', '.join(models)}")


def expand_runs(sweep: dict) -> list[dict]:
    """One run per (model, training length): {name, model, train_length, config (a zoo.train TrainConfig)}."""
    from zoo.train import config_from_dict

    runs = []
    for model_name, model_config in sweep["models"].items():
        for L in sweep["train_lengths"]:
            if sweep["batch_tokens"] % L:
                raise ValueError(f"batch_tokens: {sweep['batch_tokens']} is not a multiple of train length {L}")
            run = copy.deepcopy(sweep["run"])
            run["model"] = copy.deepcopy(model_config)
            run["output_dir"] = str(Path(sweep["output_dir"]) / f"{model_name}-L{L}")
            run.setdefault("data", {})["seq_len"] = L
            train = run.setdefault("train", {})
            if train.get("batch_tokens") is not None:
                raise ValueError("run.train.batch_tokens: the sweep's batch_tokens sets each step's tokens; leave it "
                                 "out (run.train.grad_accum splits a step into that many micro batches)")
            # a step of batch_tokens in grad_accum micro batches: rows of batch_tokens / L per micro batch took
            # grad_accum times the tokens per step and per run, for every length alike
            accum = train.get("grad_accum") or 1
            accum = accum if _is_int(accum) and accum >= 1 else 1  # (a bad value is refused by config_from_dict)
            if sweep["batch_tokens"] % (L * accum):
                raise ValueError(f"batch_tokens: {sweep['batch_tokens']} is not a multiple of train length {L} x "
                                 f"run.train.grad_accum {accum}")
            train["micro_batch_size"] = sweep["batch_tokens"] // (L * accum)
            train["max_steps"] = max(1, sweep["tokens_per_run"] // sweep["batch_tokens"])
            schedule = run.setdefault("schedule", {})
            schedule["warmup_steps"] = min(schedule.get("warmup_steps", 100), train["max_steps"] // 10)
            try:
                config = config_from_dict(run)
            except ValueError as e:
                raise ValueError(run_error(str(e), model_name, L)) from None
            runs.append({"name": f"{model_name}-L{L}", "model": model_name, "train_length": L, "config": config})
    return runs


def run_error(message: str, model_name: str, L: int) -> str:
    """zoo.train's refusal of one run's config (``field: why``), its field named as the sweep spells it: a field of
    the run section as ``run.field`` (and its suggestion, 'did you mean run.train.max_steps?'), one the sweep fills
    in by the sweep's own key. zoo.train names its fields bare: 'train.max_stpes: unknown field; did you mean
    train.max_steps?' named neither the override the user typed (--run.train.max_stpes) nor one the sweep takes."""
    field, sep, why = message.partition(": ")
    if field == "model" or field.startswith("model."):  # (the model is models.<name>'s, not run's)
        return f"models.{model_name}{field[len('model'):]}{sep}{why}"
    if field == "data.seq_len":
        return f"train_lengths: at L={L} (each run's data.seq_len){sep}{why}"
    if field in RUN_SET_BY_SWEEP:
        return f"{field} (set by the sweep from {RUN_SET_BY_SWEEP[field]}){sep}{why}"
    head, hint, rest = why.partition("; did you mean ")
    if hint:
        close, _, tail = rest.partition("?")
        by = RUN_SET_BY_SWEEP.get(close)  # a near field the sweep sets itself: run.<it> is refused in turn
        note = f" (the sweep sets it for each run, from {by})" if by else ""
        why = f"{head}; did you mean run.{close}?{note}{tail}"
    return f"run.{field}{sep}{why}"


def ssm_state_floats(model_config: dict) -> int:
    """Recurrent (SSM / GLA) state floats per sequence of a zoo model config, conv buffers excluded."""
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig
    from zoo.mixers.gla import GLA
    from zoo.mixers.mamba import Mamba
    from zoo.mixers.mamba2 import Mamba2

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ZooConfig(**model_config))
    total = 0
    for block in model.model.layers:
        m = block.mixer
        if isinstance(m, Mamba2):
            total += m.n_heads * m.head_dim * m.d_state
        elif isinstance(m, Mamba):
            total += m.d_inner * m.d_state
        elif isinstance(m, GLA):
            total += m.n_heads * m.head_k * m.head_v
    return total


def judge_collapse(bins: list[dict], train_length: int, factor: float, margin: float) -> dict:
    """Collapse when a bin in [L, factor·L) is worse than the reference by > margin nats. The reference is the
    mean loss over [L, 2L), the first positions past the training length: [L/2, L) is lower for every model,
    collapsing or not (in-distribution positions), so it would call a model that stays flat past L collapsed
    (scripts/collapse.py judges the same way). A bin past L whose loss is not finite (it overflowed) is collapse;
    such bins used to be dropped, so a run that blew up could be judged free of collapse."""
    def mean(lo: float, hi: float) -> float | None:  # token-weighted mean loss of the bins starting in [lo, hi)
        rows = [(b["mean_loss"], b.get("n_tokens", b["end"] - b["start"])) for b in bins
                if lo <= b["start"] < hi and math.isfinite(b["mean_loss"])]
        return sum(x * n for x, n in rows) / sum(n for _, n in rows) if rows else None

    reference = mean(train_length, 2 * train_length)
    after = [b for b in bins if train_length <= b["start"] < factor * train_length]
    blown = [b for b in after if not math.isfinite(b["mean_loss"])]
    if blown:  # the loss overflowed (NaN / inf) past L: collapse, whatever the reference
        return {"collapsed": True, "reference": reference, "worst": math.inf, "worst_at": blown[0]["start"]}
    if reference is None or not after:
        return {"collapsed": None, "reference": None, "worst": None, "worst_at": None}
    worst = max(after, key=lambda b: b["mean_loss"])
    return {"collapsed": worst["mean_loss"] > reference + margin, "reference": reference,
            "worst": worst["mean_loss"], "worst_at": worst["start"]}


def shortest_without_collapse(collapsed: dict[tuple[str, int], bool | None], sizes: dict[str, float],
                              lengths: list[int]) -> dict[str, int | None]:
    """Per model, the shortest trained length L such that every trained length >= L was judged free of collapse
    (None: the longest collapses or was not judged)."""
    out = {}
    for model in sizes:
        best = None
        for L in sorted(lengths, reverse=True):
            if collapsed.get((model, L)) is not False:  # collapsed, or not judged: nothing shorter counts
                break
            best = L
        out[model] = best
    return out


def paper_capacity(s: float) -> float | None:
    """The paper's capacity length (K tokens) at a state of S M floats; None where its line is <= 0 (S <= 4.469 /
    5.172 = 0.86M floats, far below the paper's models): the fit does not reach so small a state, and extrapolated
    there it gave a negative number of tokens (-4.30K for the recipe's d_state16)."""
    length = PAPER_LINE[0] * s + PAPER_LINE[1]
    return length if length > 0 else None


PAPER_BELOW = (f"none (the paper's fit does not reach so small a state: its line is <= 0 below "
               f"S = {-PAPER_LINE[1] / PAPER_LINE[0]:.3f}M floats)")


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of ys against xs; None with fewer than two distinct xs."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def train_run(run: dict) -> Path:
    """Train one run (or reuse it when done.json records the same config); returns its model folder."""
    from zoo.eval.common import write_text_atomically
    from zoo.train import latest_checkpoint, resume_changes, train

    cfg = run["config"]
    out = Path(cfg.output_dir)
    done = out / "done.json"
    settings = json.loads(json.dumps(cfg.to_dict()))
    # (another run.log or run.checkpoint section trains the same model: done.json of one was not taken for the other's,
    # the training resumed at its last step, done.json was rewritten and every curve of the run evaluated again)
    record = json.loads(done.read_text()) if done.is_file() else None
    if record is not None and model_settings(record["config"]) == model_settings(settings):
        # a checkpoint's model short of the last step is no trained run: the sweep before the stop check below wrote
        # done.json for a training that SIGTERM or a first Ctrl-C had stopped, and every rerun kept that model
        step = re.fullmatch(r"step_(\d+)", Path(record["model"]).parent.name)
        if step is None or int(step.group(1)) >= cfg.train.max_steps:
            return Path(record["model"])
        print(f"{run['name']}: {done} names a model of step {int(step.group(1))} of {cfg.train.max_steps} (a training "
              f"stopped early): training continues")
    latest = latest_checkpoint(out)
    if latest is not None:  # continued only under the same settings (but for logging and saving)
        # (a run finished or stopped under another optim.lr, schedule or tokens_per_run was continued from its last
        # step: a finished one trained no more, and done.json recorded its model as trained under the new settings)
        try:
            changed = [line for line in resume_changes(latest, cfg)
                       if not line.split(":")[0].startswith(("log.", "checkpoint.", "train.prefetch"))]
        except ValueError as e:  # another model, tokenizer or data order: its message's list of them
            changed = [(m := re.search(r"data order \((.*)\); resume", str(e))) and m.group(1) or str(e)]
        if changed:
            raise ValueError(f"{run['name']}: {out} holds a training under other settings ({'; '.join(changed)}); "
                             f"continuing it would mix them: remove that folder to train the run anew under these, or "
                             f"give another output_dir")
    start = time.perf_counter()
    result = train(cfg, resume="auto" if latest is not None else None)
    if result.stopped:  # SIGTERM or a first Ctrl-C: zoo.train saved the step and returned; the run is not trained
        # (done.json recorded the half-trained model as the run's, the sweep evaluated it and trained on, and every
        # rerun kept it)
        raise KeyboardInterrupt(f"{run['name']}: training stopped at step {result.step} of {cfg.train.max_steps}, "
                                f"saved in {out}; the same command continues it")
    model_dir = result.checkpoint / "model"
    write_text_atomically(json.dumps({"config": settings, "model": str(model_dir),
                                      "seconds": time.perf_counter() - start, "tokens": result.tokens}, indent=1), done)
    return model_dir


def interrupted_message(e: KeyboardInterrupt, out: Path) -> str:
    """What a sweep interrupted by Ctrl-C or SIGTERM kept, and how to go on: the message of a stopped training (its
    step, where it saved) or, for a bare interruption, what each stage saves as it goes."""
    if str(e):
        return str(e)
    return (f"trained runs (done.json), evaluated runs (evaluations.json) and an evaluation's finished documents "
            f"(length-*.partial.pt) are kept in {out}; the same command continues")


def evaluation_partials(run: dict, ev: dict) -> dict[str, Path]:
    """Each curve of the run's evaluation (its mitigation spec, {L} filled in) and the file where its finished
    documents are saved as it goes, in the run's folder."""
    specs = [spec.replace("{L}", str(run["train_length"])) for spec in ["none", *ev["mitigations"]]]
    folder = Path(run["config"].output_dir)
    return {text: folder / f"length-{re.sub(r'[^0-9A-Za-z=._-]+', '_', text)}.partial.pt" for text in specs}


def remove_evaluation_partials(run: dict) -> None:
    """Delete every partial file of the run's evaluations once its curves are saved: those of the listed curves and
    those an interrupted earlier evaluation left for specs no longer in eval.mitigations (no rerun resumes them), with
    the temporary files of interrupted saves."""
    for file in Path(run["config"].output_dir).glob("length-*.partial.pt*"):
        file.unlink(missing_ok=True)


def evaluate_run(run: dict, model_dir: Path, documents: list[torch.Tensor], ev: dict) -> dict:
    """Length curves of the trained model without and with each mitigation, and their collapse verdicts. Each curve's
    finished documents are saved as it goes (``evaluation_partials``) and kept complete, so a rerun of the same model
    and curve settings resumes an interrupted evaluation; the caller removes them once the curves are saved."""
    from zoo.eval.common import load_model
    from zoo.eval.length import document_provenance, evaluate_length
    from zoo.state import apply_mitigation, calibrate_norm_threshold

    L = run["train_length"]
    # how much of the built-in corpus's documents is text the run trained on (each curve records it)
    provenance = document_provenance(documents, run["name"], run["config"].data.source == "stdlib")
    model = load_model(str(model_dir))
    out = {}
    earlier = {"curves": evaluation_settings(run, ev), "model": done_stamp(run)}
    stamp = shaping(earlier)
    for text, partial in evaluation_partials(run, ev).items():
        adopt_earlier_partial(partial, documents, ev, earlier | {"mitigation": text}, stamp | {"mitigation": text})
        factor = norm_calibration_factor(text)
        if factor is not None:  # state normalization with thresholds measured on the first L tokens
            apply_mitigation(model, None)
            prefix = torch.stack([d[:L] for d in documents]).to(next(model.parameters()).device)
            # the cap acts where evaluate_length's forwards of ev chunk_size end (the calibration's own default is 1024)
            calibrate_norm_threshold(model, prefix, factor, chunk=min(64, L), chunk_size=ev["chunk_size"] or L)
        else:
            apply_mitigation(model, text)
        # (a bar over the documents' tokens: the evaluations of a run, long documents under every mitigation, ran
        # for minutes to hours without a line)
        res = evaluate_length(model, documents, ev["chunk_size"], ev["batch_size"], ev["bins_per_octave"],
                              progress=True, partial=partial, partial_key=stamp | {"mitigation": text},
                              save_every=SAVE_EVERY, label=f"{run['name']} [{text}]", keep_partial=True)
        out[text] = {"bins": res["bins"], **judge_collapse(res["bins"], L, ev["factor"], ev["margin"])}
        if provenance is not None:
            out[text]["documents"] = provenance
    return out


def adopt_earlier_partial(partial: Path, documents: list[torch.Tensor], ev: dict, earlier: dict, key: dict) -> None:
    """An evaluation's partial file saved under `earlier` (the key before it left out the training's log and checkpoint
    settings, `shaping`) is saved under `key`, the one evaluate_length resumes it under now: it was taken for a partial
    run of other settings and its finished documents evaluated again."""
    from zoo.eval.common import save_atomically
    from zoo.eval.length import partial_settings

    if earlier == key or not Path(partial).is_file():
        return
    try:
        saved = torch.load(partial, weights_only=True)
    except Exception:  # (read_partial says why, and starts over)
        return
    docs = list(documents) if not isinstance(documents, torch.Tensor) else list(documents.unbind(0))
    if isinstance(saved, dict) and saved.get("settings") == partial_settings(docs, ev["batch_size"],
                                                                            ev["chunk_size"], earlier):
        save_atomically({**saved, "settings": partial_settings(docs, ev["batch_size"], ev["chunk_size"], key)},
                        partial)


def evaluation_settings(run: dict, ev: dict) -> dict:
    """What a run's saved curves depend on: its training config, the eval settings that shape a curve (margin
    and factor only judge it, so they may change without a new evaluation) and how the built-in corpus's documents
    are built (``zoo.eval.length.CORPUS_LAYOUT``)."""
    from zoo.eval.length import CORPUS_LAYOUT

    curve = {k: v for k, v in ev.items() if k not in ("factor", "margin")}
    return json.loads(json.dumps({"train": run["config"].to_dict(), "eval": curve, "layout": CORPUS_LAYOUT}))


def done_stamp(run: dict) -> dict | None:
    """The run's done.json (its config, model folder, seconds): a model retrained in place has another."""
    done = Path(run["config"].output_dir) / "done.json"
    return json.loads(done.read_text()) if done.is_file() else None


# the sections and fields of a zoo.train config that do not change the model it trains (what it logs and saves)
NOT_SHAPING = {"log": None, "checkpoint": None, "train": ("prefetch",)}


def model_settings(config: dict) -> dict:
    """A zoo.train config (as a dict) less what does not change the trained model: its log and checkpoint sections and
    train.prefetch."""
    out = {k: v for k, v in config.items() if k not in NOT_SHAPING or NOT_SHAPING[k] is not None}
    for section, fields in NOT_SHAPING.items():
        if fields and isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in fields}
    return out


def shaping(stamp: dict | None) -> dict | None:
    """An evaluation's stamp ({"curves": evaluation_settings, "model": done_stamp}) less what does not change the
    curves: the log and checkpoint settings of the training config in both (evaluations-settings.json records them)."""
    if not isinstance(stamp, dict):
        return stamp
    out = json.loads(json.dumps(stamp))
    if isinstance(out.get("curves"), dict) and isinstance(out["curves"].get("train"), dict):
        out["curves"]["train"] = model_settings(out["curves"]["train"])
    if isinstance(out.get("model"), dict) and isinstance(out["model"].get("config"), dict):
        out["model"]["config"] = model_settings(out["model"]["config"])
    return out


def read_json(path: Path) -> dict:
    """The JSON object in `path`; {} when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def current_evaluations(out: Path, runs: list[dict], ev: dict) -> dict:
    """evaluations.json's curves of the runs whose recorded settings (evaluations-settings.json) are the sweep's
    current ones; a run evaluated under other settings is left out with a note, so a table, a fit or a collapse
    report never mixes curves of different eval settings or training configs (files written before the settings
    were recorded are taken as they are)."""
    evaluations_file, settings_file = out / "evaluations.json", out / "evaluations-settings.json"
    evaluations, settings = read_json(evaluations_file), read_json(settings_file)
    kept = {}
    for run in runs:
        name = run["name"]
        if name not in evaluations:
            continue
        recorded = settings.get(name)
        if recorded is not None and shaping(recorded)["curves"] != shaping({"curves": evaluation_settings(run, ev)})[
                "curves"]:
            print(f"{name}: left out: its saved curves were evaluated under other settings (the sweep's training "
                  f"config or eval section, or how the documents are built, changed since); run it again to evaluate "
                  f"it")
            continue
        kept[name] = evaluations[name]
    return kept


def plot_capacity(sizes: dict[str, float], lengths: list[int], collapsed: dict, shortest: dict,
                  fit: tuple[float, float] | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, s in sizes.items():
        for L in lengths:
            verdict = collapsed.get((model, L))
            if verdict is not None:  # runs not trained yet, or too short an evaluation to judge, stay blank
                ax.scatter([s], [L / K], marker="x" if verdict else "o", color="tab:red" if verdict else "tab:green",
                           s=30)
        if shortest.get(model):
            ax.scatter([s], [shortest[model] / K], facecolors="none", edgecolors="k", s=120)
    xs = torch.linspace(0, max(sizes.values()) * 1.1, 50)
    if fit is not None:
        ax.plot(xs, fit[0] * xs + fit[1], color="k", label=f"fit: {fit[0]:.3f}·S {fit[1]:+.3f}")
    ax.plot(xs, PAPER_LINE[0] * xs + PAPER_LINE[1], "k--", lw=1, label="paper: 5.172·S − 4.469")
    ax.set_ylim(0, max(lengths) / K * 1.2)
    ax.set_xlabel("recurrent state size S (M floats)")
    ax.set_ylabel("training length (K tokens)")
    ax.set_title("state collapse (x) / none (o); circled: shortest length without collapse", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_sweep(config: str | Path, overrides: list[str], only: list[str] | None) -> tuple[dict, list[dict], dict]:
    """The sweep, its runs and each model's state size (M floats), or ValueError for anything that would fail after a
    training: a bad field or --only name, mitigations of a model without a state (collapse.py checks with it too)."""
    sweep = load_sweep(config, overrides)
    runs = expand_runs(sweep)
    check_only(only, sweep["models"])
    sizes = {name: ssm_state_floats(cfg) / 1e6 for name, cfg in sweep["models"].items()}
    stateless = [name for name, s in sizes.items() if s == 0]
    if stateless and sweep["eval"]["mitigations"]:  # apply_mitigation would refuse it, after its training
        raise ValueError(f"models.{stateless[0]}: has no recurrent layer (mamba, mamba2, gla), so no state for "
                         f"eval.mitigations to act on (S = 0); give models with one (hybrids are fine), or "
                         f"eval.mitigations=[] for an unmitigated baseline")
    from zoo.state.mitigation import names_group_size

    grouped = [spec for spec in sweep["eval"]["mitigations"] if names_group_size(spec)]
    if grouped:  # apply_mitigation refuses a cap grouping channels on a model without mamba layers, after its training
        for name, cfg in sweep["models"].items():
            kinds = recurrent_kinds(cfg)
            if kinds and "mamba" not in kinds:
                raise ValueError(f"eval.mitigations: {grouped[0]!r}: group_size groups the channels of mamba layers "
                                 f"into heads, but models.{name} has none (its {' and '.join(sorted(kinds))} layers' "
                                 f"heads are their own); leave group_size out")
    return sweep, runs, sizes


def recurrent_kinds(model_config: dict) -> set[str]:
    """The kinds ('mamba', 'mamba2', 'gla') of the recurrent layers of a zoo model config."""
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig
    from zoo.state.mitigation import recurrent_kinds as of_model

    with torch.device("meta"):
        return of_model(AutoModelForCausalLM.from_config(ZooConfig(**model_config)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0].replace("\n", " ") + " Overrides: --section.field=value (e.g. "
        "--eval.margin=0.05 --output_dir=runs/x).", allow_abbrev=False)
    parser.add_argument("config", help="sweep YAML (configs/train/state-capacity.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, steps and state sizes")
    parser.add_argument("--fit-only", action="store_true", help="re-judge and re-fit from saved evaluations")
    parser.add_argument("--only", nargs="*", default=None, help="model names to run (the fit uses every saved one)")
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}; overrides look like --key.sub=value")
    if args.dry_run and args.fit_only:  # (--fit-only was taken and ignored: the dry run listed the runs and stopped)
        parser.error("--dry-run lists the runs to train, and --fit-only trains none and re-fits the saved evaluations; "
                     "give one of them")
    try:
        sweep, runs, sizes = check_sweep(args.config, [item[2:] for item in rest], args.only)
    except ValueError as e:  # as zoo train: bad input is one line and exit status 2, before anything trains
        parser.error(str(e))
    out = Path(sweep["output_dir"])
    if args.dry_run:  # the runs --only leaves to train (it listed every model's, those it would skip too)
        for name, s in sizes.items():
            if args.only and name not in args.only:
                continue
            paper = paper_capacity(s)
            print(f"{name}: S = {s:.4f}M floats; paper's capacity length "
                  f"{PAPER_BELOW if paper is None else f'{paper:.2f}K'}")
        for run in runs:
            if args.only and run["model"] not in args.only:
                continue
            c = run["config"]
            accum = f" x {c.train.grad_accum} micro batches" if (c.train.grad_accum or 1) > 1 else ""
            print(f"{run['name']}: {c.train.max_steps} steps of {c.train.micro_batch_size} x {c.data.seq_len}{accum} "
                  f"tokens -> {c.output_dir}")
        return 0
    ev = sweep["eval"]
    evaluations_file, settings_file = out / "evaluations.json", out / "evaluations-settings.json"
    if args.fit_only and not evaluations_file.is_file():  # (it wrote an empty summary there and exited 0)
        parser.error(f"--fit-only: no saved evaluations in {out} ({evaluations_file.name}); run the sweep without "
                     f"--fit-only first, or point --output_dir at the folder a run wrote")
    if not args.fit_only:
        from zoo.data.text import load_tokenizer
        from zoo.eval.common import interruption_says, sigterm_interrupts, write_text_atomically
        from zoo.eval.length import load_documents, plot_length_curves

        tokenizer = load_tokenizer(sweep["run"].get("tokenizer", "byte"))
        built = {}  # with BOS first or not, as each run's data section trained (data.add_bos), and its held-out files

        def documents_for(run: dict) -> list[torch.Tensor]:
            data = run["config"].data
            # the files the run held out of training (data.holdout) first, as zoo compare does; another source's text
            # is not the built-in corpus, any file of it is unseen
            key = (data.add_bos, data.holdout if data.source == "stdlib" else 0.01)
            if key not in built:
                built[key] = load_documents(None, ev["n_docs"], ev["max_len"], tokenizer, ev["seed"], ev["start"], *key)
            return built[key]

        # SIGTERM stops an evaluation as Ctrl-C does (it killed the process without a word; a training's own handler
        # saves and stops it), and either ends in one line saying what is kept (zoo.cli._run prints it)
        with sigterm_interrupts(), interruption_says(interrupted_message(KeyboardInterrupt(), out)):
            for run in runs:
                if args.only and run["model"] not in args.only:
                    continue
                model_dir = train_run(run)  # reused when done.json records the same config
                wanted = {"curves": evaluation_settings(run, ev), "model": done_stamp(run)}
                evaluations, settings = read_json(evaluations_file), read_json(settings_file)
                if run["name"] in evaluations and shaping(settings.get(run["name"])) == shaping(wanted):
                    print(f"{run['name']}: evaluation kept from {evaluations_file} (same model and eval settings)")
                    remove_evaluation_partials(run)  # (of a run interrupted before removing them)
                    continue
                curves = evaluate_run(run, model_dir, documents_for(run), ev)
                # the files as they are now, with this run's curves: another call on this output_dir (--only other
                # models, on another GPU) saves its runs there too, and writing back the copy read before the
                # evaluation (hours) dropped the runs it had saved meanwhile
                evaluations = read_json(evaluations_file) | {run["name"]: curves}
                settings = read_json(settings_file) | {run["name"]: wanted}
                # (a truncated file, written in place, lost every run's curves, and the rerun stopped at reading it)
                write_text_atomically(json.dumps(evaluations, indent=1), evaluations_file)
                write_text_atomically(json.dumps(settings, indent=1), settings_file)
                remove_evaluation_partials(run)  # (kept until the curves are saved)
                curves = {spec: {"bins": e["bins"]} for spec, e in curves.items()}
                plot_length_curves(curves, out / f"{run['name']}-length.png", run["train_length"], run["name"])
    # re-judge from the saved curves (margin and factor may have been overridden)
    evaluations = current_evaluations(out, runs, ev)
    table, collapsed = [], {}
    for run in runs:
        saved = evaluations.get(run["name"])
        if saved is None:
            continue
        for spec, e in saved.items():
            verdict = judge_collapse(e["bins"], run["train_length"], ev["factor"], ev["margin"])
            table.append({"run": run["name"], "S (M floats)": round(sizes[run["model"]], 4),
                          "L": run["train_length"], "mitigation": spec, **verdict})
            if spec == "none":
                collapsed[(run["model"], run["train_length"])] = verdict["collapsed"]
    shortest = shortest_without_collapse(collapsed, sizes, sweep["train_lengths"])
    # free of collapse at the shortest trained length: the capacity length is at most that, which the fit took for the
    # capacity length itself (a line pulled up at small states, the paper's intercept unreachable)
    bounded = [m for m, L in shortest.items() if L is not None and L == min(sweep["train_lengths"])]
    points = [(sizes[m], L / K) for m, L in shortest.items() if L is not None and m not in bounded]
    fit = fit_line([p[0] for p in points], [p[1] for p in points])
    from zoo.eval.common import markdown_table

    text = f"# state capacity: {args.config}\n\n{markdown_table(table)}\n\n## shortest length without collapse\n\n"
    text += markdown_table([{"model": m, "S (M floats)": round(sizes[m], 4),
                             "L*": f"<= {shortest[m]}" if m in bounded else shortest[m],
                             "paper L* (tokens)": PAPER_BELOW if paper_capacity(sizes[m]) is None
                             else round(paper_capacity(sizes[m]) * K)} for m in sizes]) + "\n\n"
    text += (f"fit: L* (K tokens) = {fit[0]:.3f} · S {fit[1]:+.3f}   (paper: 5.172 · S − 4.469)\n" if fit else
             "fit: needs the capacity length of at least two state sizes\n")
    if bounded:
        text += (f"left out of the fit: {', '.join(bounded)} (no collapse at the shortest trained length, "
                 f"{min(sweep['train_lengths'])}: the capacity length is at most that; train shorter to measure it)\n")
    # the verdicts' settings (--fit-only --eval.margin=... re-judges the same curves: the files did not say under what)
    text += (f"\ncollapse at L: a bin in [L, {ev['factor']:g}·L) above the mean loss of [L, 2L) by more than "
             f"{ev['margin']:g} nats (eval: {json.dumps(ev)})\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"table": table, "sizes": sizes, "shortest": shortest,
                                                  "bounded": bounded, "fit": fit, "paper": PAPER_LINE, "eval": ev},
                                                 indent=1))
    plot_capacity(sizes, sweep["train_lengths"], collapsed, shortest, fit, out / "capacity.png")
    print(text)
    print(f"wrote {out / 'summary.md'}, summary.json, capacity.png")
    return 0


if __name__ == "__main__":  # an interruption ends in one line saying what is kept, and exit status 130, as zoo train
    from zoo.cli import _exit, _run

    _exit(_run(PROG, main, sys.argv[1:]))
