"""Render benchmarks/RESULTS.md's measured tables from benchmarks/results.jsonl (one JSON row per figure).

Every row names its card, date and command and the baseline measured in the same run. Of the rows with the same
name only the newest run's are kept (the file is append-only; a run may write one row per baseline); rows with a
"note" show it, so a void figure says why.
Usage: python benchmarks/report.py [--results benchmarks/results.jsonl] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return cell(str(value))


def cell(text: str) -> str:
    """Text as one markdown table cell: its "|" escaped, its line breaks made spaces. A note that said
    "|split - unsplit|" ended its cell there, and the rest of the note fell past the table's last column (unshown)."""
    return " ".join(text.replace("|", "\\|").splitlines())


# per benchmark group, the row fields worth a column of their own (label, field)
EXTRA = {
    "train_throughput": [("tokens/s", "tokens_per_s"), ("MFU", "mfu"), ("peak GiB", "peak_mem_gib"),
                         ("loss first", "loss_first"), ("loss last", "loss_last"),
                         ("vs transformerpp", "vs_transformerpp")],
    "generate": [("mode", "mode"), ("tokens/s", "tokens_per_s"), ("prefill ms", "prefill_ms"),
                 ("decode peak GiB", "decode_peak_gib"), ("graph peak GiB", "graph_peak_gib"),
                 ("cache MiB", "cache_mib"),
                 ("vs transformerpp", "vs_transformerpp")],
}


def _run(row: dict) -> tuple:
    return row.get("card"), row.get("date"), row.get("command")


def newest(rows: list[dict]) -> list[dict]:
    """Per name, every row of the newest run (card, date, command) that wrote it, oldest name first.

    One run may write a figure several times, once per baseline measured beside it (the selective scan's
    mamba_ssm row and its floor row): those are kept together, where keeping only the last row dropped the
    side-by-side baseline. A run writes a figure's rows one after the other, so a row of that name after other
    rows starts a new run even where card, date and command are the same (two calls of one command on one day:
    the later call's rows replace the earlier's, whatever their baselines are called)."""
    latest: OrderedDict[str, list[dict]] = OrderedDict()
    previous = None
    for row in rows:
        kept = latest.pop(row["name"], [])
        if kept and kept[-1] is previous and _run(kept[-1]) == _run(row):  # the same run: its last row per baseline
            kept = [r for r in kept if r.get("baseline") != row.get("baseline")]
        else:
            kept = []
        latest[row["name"]] = kept + [row]
        previous = row
    return [row for kept in latest.values() for row in kept]


def render(rows: list[dict]) -> str:
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for row in newest(rows):
        groups.setdefault(row["name"].split("/", 1)[0], []).append(row)
    out = []
    for group, items in groups.items():
        out.append(f"### {group}\n")
        # numbered, and every row names its number: a group holds runs of several cards and days, and a row's
        # figures (its floor: that card's bandwidth) mean something only beside the run that measured them
        runs = {run: n for n, run in enumerate(sorted({_run(r) for r in items}), 1)}
        for (card, date, command), n in runs.items():
            out.append(f"- run {n}: {card}, {date}: `{command}`")
        out.append("")
        extra = [(label, key) for label, key in EXTRA.get(group, [])
                 if any(r.get(key) is not None for r in items)]  # a field no row has yet: no column of dashes
        out.append("| name | run | ours ms | baseline | baseline ms | ratio (baseline/ours) | floor ms | "
                   + "".join(f"{label} | " for label, _ in extra) + "note |")
        out.append("| --- " * (8 + len(extra)) + "|")
        for r in items:
            out.append(f"| {cell(r['name'])} | {runs[_run(r)]} | {fmt(r.get('ours_ms'))} | {fmt(r.get('baseline'))} | "
                       f"{fmt(r.get('baseline_ms'))} | {fmt(r.get('ratio'))} | {fmt(r.get('floor_ms'))} | "
                       + "".join(f"{fmt(r.get(key))} | " for _, key in extra) + f"{cell(str(r.get('note') or ''))} |")
        out.append("")
    return "\n".join(out)


def decode_bounds(rows: list[dict], batch: int = 64, target: float = 5.0) -> str:
    """Issue 9's decode target against what the bytes allow: for each zoo recurrent or hybrid model's newest
    generate row at BATCH (and each variant, e.g. /state-model), its speed-up over Transformer++ as measured in
    the same run, and the speed-up it would show decoding at its floor (weights and state bytes over the copy
    bandwidth) against that run's Transformer++, and against that run's Transformer++ at its floor too (a later
    run's Transformer++ floor may come from another card's bandwidth or another KV length). A bound below TARGET
    means no kernel can meet the target for that model at that size and prompt: the state is too many bytes."""
    latest = {r["name"]: r for r in newest(rows)}
    # a row's Transformer++: the one the same call wrote. A call's rows are contiguous and name each figure once, so a
    # name seen again starts the next call even where card, date and command are the same: keyed by run alone, a
    # later call of the command (cut short after Transformer++, or re-run) paired its Transformer++ with the earlier
    # call's models, whose vs_transformerpp was measured against another
    call, seen, of_call, call_of = 0, set(), {}, {}
    for i, r in enumerate(rows):
        if not i or _run(r) != _run(rows[i - 1]) or r["name"] in seen:
            call, seen = call + 1, set()
        seen.add(r["name"])
        of_call[r["name"], call] = r
        call_of[id(r)] = call
    out = []
    for name, r in latest.items():
        parts = name.split("/")
        if parts[0] != "generate" or len(parts) < 3 or parts[2] != f"B{batch}":
            continue
        model, variant = parts[1], "/".join(parts[3:])
        if not re.fullmatch(r"(P\d+/?)?(state-model)?", variant):  # the prompt and state dtype variants only
            continue
        tpp = of_call.get(("/".join(["generate", "transformerpp", f"B{batch}", *parts[3:]]).rstrip("/"),
                           call_of[id(r)]))
        if model == "transformerpp" or model.startswith("hf-") or tpp is None:
            continue
        ms, floor, vs = r.get("ours_ms"), r.get("floor_ms"), r.get("vs_transformerpp")
        tpp_ms = tpp.get("ours_ms")  # Transformer++ in the same run, as measured (vs x ms carries both roundings)
        if not (ms and floor and vs and tpp_ms and tpp.get("floor_ms")):
            continue
        at_floor, both = tpp_ms / floor, tpp["floor_ms"] / floor
        prompt = f"{r.get('prompt_len', '?')}"
        states = "bf16" if "state-model" in variant else "fp32"
        out.append((variant, f"| {model} | {prompt} | {states} | {r['card']}, {r['date']} | {ms:.3f} | {floor:.3f} | "
                   f"{tpp_ms:.3f} | {tpp['floor_ms']:.3f} | {vs:.2f}x | {at_floor:.2f}x | {both:.2f}x | "
                   f"{'yes' if at_floor >= target else 'no'} |"))
    if not out:
        return ""
    head = [f"### generate at batch {batch}: the {target:g}x decode target against the floors\n",
            "Derived from the generate rows below (ms per step; floor = weights + cache bytes, states read and "
            "written, over the copy bandwidth measured in the run). \"measured\" is the row's own speed-up over "
            "Transformer++ in the same run; \"at its floor\" is what the model would show decoding at its floor "
            "against that Transformer++; \"both at floors\" puts Transformer++ at its floor too. Where \"at its "
            f"floor\" is under {target:g}x, no kernel reaches the target for that model: its state is too large.\n",
            "| model | prompt | states | card, date | ms | floor ms | Transformer++ ms (same run) | "
            f"Transformer++ floor ms | measured | at its floor | both at floors | {target:g}x reachable |",
            "| --- " * 12 + "|"]
    return "\n".join(head + [line for _, line in sorted(out, key=lambda v: v[0])]) + "\n"


# the fields decode_bounds computes with (the others are shown as they are)
NUMBERS = ("ours_ms", "floor_ms", "vs_transformerpp")


def load(path: Path) -> list[dict]:
    """results.jsonl's rows; a line that is no JSON object naming its figure and its run (name, card, date, command)
    is refused with its number: it ended in a traceback (bad JSON, no name) or rendered as 'None, None: `None`'; so is
    one whose ours_ms, floor_ms or vs_transformerpp is there but not a number."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"report: --results {path}: {e.strerror or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"report: --results {path} line {n}: not JSON ({e.msg}); fix or remove the line") from None
        absent = [key for key in ("name", "card", "date", "command")
                  if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip()]
        if absent:
            raise SystemExit(f"report: --results {path} line {n}: no {', '.join(absent)}; every row names its figure "
                             f"and the run that measured it")
        # (decode_bounds ended in a ValueError or TypeError at a generate row's time given as text: "0.5")
        wrong = [key for key in NUMBERS if row.get(key) is not None
                 and (isinstance(row[key], bool) or not isinstance(row[key], (int, float)))]
        if wrong:
            raise SystemExit(f"report: --results {path} line {n}: "
                             + "; ".join(f"its {key} {json.dumps(row[key])} is not a number" for key in wrong)
                             + "; fix or remove the line")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    rows = load(Path(args.results))
    table = render(rows)
    bounds = decode_bounds(rows)
    if bounds:
        table = f"{bounds}\n{table}"
    path = Path(args.out)
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    if END not in rest:  # (an IndexError before): the text after the marker is not known to be the old tables
        raise SystemExit(f"report: --out {path} has {BEGIN} but no {END} after it; put it back where the tables end")
    tail = rest.split(END, 1)[1]
    try:
        path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    except OSError as e:
        raise SystemExit(f"report: --out {path}: {e.strerror or e}") from None
    print(f"wrote {len(rows)} rows into {path}")


if __name__ == "__main__":
    main()
