"""State collapse and its training-free mitigations in one command (Stuffed Mamba; issue 8, second reproduction).

    python scripts/collapse.py configs/train/collapse.yaml                      # train, evaluate, report
    python scripts/collapse.py configs/train/collapse.yaml --only slow_decay    # one model of the recipe
    python scripts/collapse.py configs/train/collapse.yaml --report-only        # re-read evaluations.json
    python scripts/collapse.py configs/train/collapse.yaml --dry-run            # list the runs, train nothing

The recipe is a ``scripts/state_capacity.py`` sweep (same keys; usually one short training length): each
model is trained at L tokens per row on the built-in corpus, then its per-position loss on long documents is
measured without and with every ``eval.mitigations`` spec (``state_capacity.evaluate_run``). This script runs
that sweep and writes ``collapse.md`` / ``collapse.json`` in its output_dir: per run and mitigation the mean
loss in the position bins [1, L), [L, 2L), [2L, 4L), ... up to the evaluated length, and two verdicts with the
recipe's ``eval.margin`` (nats) and ``eval.factor``:

- rises: the unmitigated curve has a bin in [L, factor·L) whose mean loss is above the reference by more than
  margin; the reference is the unmitigated mean loss on [L, 2L), the first positions past the training length
  (``state_capacity.judge_collapse`` agrees). [L/2, L) is reported beside it but is not the reference: on the
  H100 run of 2026-11-25 it sat 0.08-0.09 nats under [L, 2L) for every model, the non-collapsing default init
  included, so it measures how much better a model is at in-distribution positions, not whether its loss rises
  with position;
- flat: every bin of the mitigated curve in [L, factor·L) stays within margin of that *unmitigated* reference
  (so a mitigation that is flat only because it is worse everywhere does not count).

A run passes when it rises and at least one mitigation is flat; the exit code is 0 when some run passes.
Octave bins are exact when L is a power of two and ``eval.bins_per_octave`` is a whole number (log bins have
power-of-two edges); otherwise a log bin counts towards the octave its start lies in.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

# the name its usage, its errors and its 'interrupted' line give (the latter said 'collapse', the others 'collapse.py')
PROG = "collapse.py"


def _state_capacity():
    """scripts/state_capacity.py as a module (scripts/ is not a package)."""
    name = "state_capacity"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def octave_bins(bins: list[dict], train_length: int) -> list[dict]:
    """Log bins (start, end, mean_loss, n_tokens) merged into [1, L), [L, 2L), [2L, 4L), ... (token-weighted)."""
    out: dict[int, list[float]] = {}
    for b in bins:
        if not math.isfinite(b["mean_loss"]):
            continue
        k = -1 if b["start"] < train_length else int(math.floor(math.log2(b["start"] / train_length)))
        acc = out.setdefault(k, [0.0, 0.0, b["start"], b["end"]])
        n = b.get("n_tokens", b["end"] - b["start"])
        acc[0] += b["mean_loss"] * n
        acc[1] += n
        acc[2], acc[3] = min(acc[2], b["start"]), max(acc[3], b["end"])
    return [{"octave": "<L" if k < 0 else f"{2 ** k}L-{2 ** (k + 1)}L", "start": s, "end": e, "mean_loss": t / n}
            for k, (t, n, s, e) in sorted(out.items()) if n]


def verdicts(curves: dict[str, list[dict]], train_length: int, factor: float, margin: float) -> dict:
    """rises (unmitigated collapse), flat mitigations (judged against the unmitigated reference), passed.

    A bin past L whose loss is not finite (it overflowed) is the worst there is: the unmitigated curve rises, a
    mitigation is not flat. Such bins used to be dropped, so a blow-up could read as no collapse, or as flat."""
    def loss(b):
        return b["mean_loss"] if math.isfinite(b["mean_loss"]) else math.inf

    def mean(bins, lo, hi):  # token-weighted mean loss of the bins starting in [lo, hi)
        rows = [(b["mean_loss"], b.get("n_tokens", b["end"] - b["start"])) for b in bins
                if lo <= b["start"] < hi and math.isfinite(b["mean_loss"])]
        return sum(x * n for x, n in rows) / sum(n for _, n in rows) if rows else None

    def after(bins):
        return [b for b in bins if train_length <= b["start"] < factor * train_length]

    none = curves["none"]
    reference = mean(none, train_length, 2 * train_length)
    inside = mean(none, train_length / 2, train_length)
    if not after(none) or (reference is None and all(math.isfinite(loss(b)) for b in after(none))):
        return {"rises": None, "reference": None, "inside": inside, "worst": None, "worst_at": None, "flat": {},
                "passed": False}
    worst = max(after(none), key=loss)
    # (with [L, 2L) overflowed everywhere, the mitigations are judged against the last positions inside L)
    bar = (reference if reference is not None else inside if inside is not None else -math.inf) + margin
    flat = {spec: bool(after(bins)) and max(loss(b) for b in after(bins)) <= bar
            for spec, bins in curves.items() if spec != "none"}
    rises = loss(worst) > bar
    return {"rises": rises, "reference": reference, "inside": inside, "worst": loss(worst),
            "worst_at": worst["start"],
            "flat": flat, "passed": rises and any(flat.values())}


def verdict_word(v: dict) -> str:
    """PASS (collapses, and some mitigation stays flat), FAIL (collapses, none does), or no collapse."""
    if v["rises"] is None:
        return "not judged (no bins past L)"
    if not v["rises"]:
        return "no collapse (nothing to mitigate)"
    return "PASS" if v["passed"] else "FAIL"


def _loss(value: float | None) -> str:
    """A mean loss for the report; '-' where the evaluation has no bin there (e.g. none past L)."""
    return "-" if value is None else f"{value:.4f}"


def report(sweep: dict) -> tuple[str, dict]:
    """collapse.md text and its JSON from the sweep's saved evaluations."""
    from zoo.eval.common import markdown_table

    out = Path(sweep["output_dir"])
    ev = sweep["eval"]
    evaluations = _state_capacity().current_evaluations(out, _state_capacity().expand_runs(sweep), ev)
    text = f"# state collapse and mitigations: {out}\n\n"
    summary = {}
    for run in _state_capacity().expand_runs(sweep):
        saved = evaluations.get(run["name"])
        if saved is None:
            continue
        L = run["train_length"]
        curves = {spec: e["bins"] for spec, e in saved.items()}
        rows = []
        for spec, bins in curves.items():
            row = {"mitigation": spec}
            row.update({o["octave"]: round(o["mean_loss"], 4) for o in octave_bins(bins, L)})
            rows.append(row)
        v = verdicts(curves, L, ev["factor"], ev["margin"])
        documents = next((e["documents"] for e in saved.values() if "documents" in e), None)
        # (with the verdicts' margin and factor: --report-only --eval.margin=... re-judges the same curves)
        summary[run["name"]] = {"train_length": L, "octaves": {s: octave_bins(b, L) for s, b in curves.items()}, **v,
                                "margin": ev["margin"], "factor": ev["factor"], "documents": documents}
        flat = [s for s, ok in v["flat"].items() if ok]
        text += (f"## {run['name']} (L = {L}; mean loss, nats/token, by position)\n\n{markdown_table(rows)}\n\n"
                 f"rises past L: {v['rises']} (reference [L, 2L) {_loss(v['reference'])}; [L/2, L) "
                 f"{_loss(v['inside'])}; worst bin in [L, {ev['factor']:g}L) {_loss(v['worst'])} at "
                 f"{v['worst_at']}; margin {ev['margin']})  \n"
                 f"flat to {ev['factor']:g}L: {', '.join(flat) or 'none'}  \n"
                 f"**{verdict_word(v)}**\n\n")
        if documents and documents["trained_on_corpus"] and documents["train_tokens"]:
            text += (f"**warning**: {documents['train_documents']} of {documents['n_documents']} documents "
                     f"({documents['train_share']:.1%} of the tokens) are text of the training files (data.holdout "
                     f"{documents['holdout']:g}), which the model trained on\n\n")
    return text, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0] + " Overrides: --section.field=value (e.g. "
        "--tokens_per_run=3145728 --output_dir=runs/x).", allow_abbrev=False)
    parser.add_argument("config", help="sweep YAML (configs/train/collapse.yaml)")
    parser.add_argument("--report-only", action="store_true", help="only re-read evaluations.json and report")
    parser.add_argument("--only", nargs="*", default=None, help="model names to train and evaluate")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs, steps and state sizes (state_capacity.py's --dry-run); nothing trains")
    args, rest = parser.parse_known_args(argv)
    script = _state_capacity()
    # every argument is checked here, under this script's name and usage: state_capacity.main's parser printed its
    # own usage (--fit-only, no --report-only) under collapse.py's name, and took its --fit-only undocumented
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            hint = " (--report-only re-reads the saved evaluations)" if item == "--fit-only" else ""
            parser.error(f"unrecognized argument {item!r}; overrides look like --key.sub=value{hint}")
    overrides = [item[2:] for item in rest]
    try:
        sweep = script.check_sweep(args.config, overrides, args.only)[0]
    except ValueError as e:
        parser.error(str(e))
    if args.report_only:  # (each was taken and ignored: the report covers every saved model, and nothing is listed)
        given = [name for name, value in (("--only", args.only is not None), ("--dry-run", args.dry_run)) if value]
        if given:
            parser.error(f"{', '.join(given)}: --report-only trains nothing and reports every saved model; leave "
                         f"{'them' if len(given) > 1 else 'it'} out, or leave out --report-only")
    only = [] if args.only is None else ["--only", *args.only]
    if args.dry_run:
        return script.main([args.config, *only, "--dry-run", *rest])
    if not args.report_only:
        script.main([args.config, *only, *rest])
    out = Path(sweep["output_dir"])
    if args.report_only and not (out / "evaluations.json").is_file():  # (it wrote an empty report there)
        parser.error(f"--report-only: no saved evaluations in {out} (evaluations.json); run without --report-only "
                     f"first, or point --output_dir at the folder a run wrote")
    text, summary = report(sweep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collapse.md").write_text(text)
    (out / "collapse.json").write_text(json.dumps(summary, indent=1))
    print(text)
    print(f"wrote {out / 'collapse.md'}, collapse.json")
    return 0 if any(s["passed"] for s in summary.values()) else 1


if __name__ == "__main__":  # an interruption of the sweep ends in one line saying what is kept, and exit status 130
    from zoo.cli import _exit, _run

    _exit(_run(PROG, main, sys.argv[1:]))
