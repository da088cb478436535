"""Plot: decode step time of every family against batch size and prompt length, from benchmarks/results.jsonl.

Reads the newest `generate/<model>/B<batch>[/P<prompt>]` row of each name (benchmarks/generate.py writes them; rows
of one figure should come from one call: the script prints the date and note of each point it uses), of one card:
the card of the newest such row unless --card names another (the title says which), and draws two
panels: ms per decode step against batch at a 2K prompt, and the speed-up over Transformer++ at the largest batch
against the prompt length (the issue's 5x line drawn in), each measured in its model's own run (`same_run_speedup`).
Writes one PNG.

    python benchmarks/plot_decode.py --out results/gpu-2026-12-03/decode.png
    python benchmarks/plot_decode.py --card H200 --out decode-h200.png    # one card's rows only
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^generate/([\w-]+)/B(\d+)(?:/P(\d+))?$")
COLOR = {"transformerpp": "C0", "mamba": "C1", "jamba": "C2", "gla": "C3", "mamba2": "C4", "hf-llama": "C5",
         "hf-mamba": "C6"}
LABEL = {"transformerpp": "Transformer++", "mamba": "Mamba", "jamba": "Jamba-style", "gla": "GLA",
         "mamba2": "Mamba-2", "hf-llama": "transformers Llama", "hf-mamba": "transformers Mamba"}


def _rows(path: Path):
    """results.jsonl's rows; a line the plot cannot read is refused with its number: not JSON, not a JSON object, a
    name, card or date that is not text, a generate row's ours_ms or vs_transformerpp that is not a number. Such
    lines ended in a traceback from the middle of the plot (a speed-up that is not a number was drawn as a category)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:  # (a traceback before)
        raise SystemExit(f"plot_decode: --results {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"plot_decode: --results {path} line {n}: not JSON ({e.msg}); fix or remove the line") \
                from None
        if not isinstance(row, dict):
            wrong = f"a JSON {type(row).__name__}, not an object"
        else:
            text = [key for key in ("name", "card", "date") if key in row and not isinstance(row[key], str)]
            generate = not text and NAME.match(row.get("name", ""))
            numbers = [key for key in ("ours_ms", "vs_transformerpp") if generate and row.get(key) is not None
                       and (isinstance(row[key], bool) or not isinstance(row[key], (int, float)))]
            wrong = "; ".join([f"its {key} {json.dumps(row[key])} is not text" for key in text]
                              + [f"its {key} {json.dumps(row[key])} is not a number" for key in numbers])
        if wrong:
            raise SystemExit(f"plot_decode: --results {path} line {n}: {wrong}; fix or remove the line")
        yield row


def cards(path: Path) -> list[str]:
    """The cards of the file's generate rows, sorted."""
    return sorted({row.get("card") or "" for row in _rows(path) if NAME.match(row.get("name", ""))})


def load(path: Path, card: str | None = None) -> dict[tuple[str, int, int], dict]:
    """(model, batch, prompt) -> the newest row of that name with a time (later lines win; the dict is in line order,
    newest last), of the card named `card` (case-insensitive; the whole name) when given."""
    points = {}
    for row in _rows(path):
        m = NAME.match(row.get("name", ""))
        if card is not None and (row.get("card") or "").lower() != card.lower():
            continue
        if m and row.get("ours_ms"):
            key = (m[1], int(m[2]), int(m[3] or 2048))
            points.pop(key, None)
            points[key] = row
    return points


def same_run_speedup(row: dict, transformerpp: dict | None) -> float | None:
    """The row's speed-up over Transformer++ measured in its own run: its vs_transformerpp (generate.py divides by
    the Transformer++ row of the same call), else the Transformer++ row's time where that row came from the same
    command on the same day, else None. The newest Transformer++ row may come from another run or card: dividing by
    it would pair times that were never measured side by side."""
    if row.get("vs_transformerpp"):
        return row["vs_transformerpp"]
    if transformerpp is not None and (transformerpp.get("command"), transformerpp.get("date"), transformerpp.get(
            "card")) == (row.get("command"), row.get("date"), row.get("card")):
        return transformerpp["ours_ms"] / row["ours_ms"]
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results.jsonl"))
    p.add_argument("--models", nargs="+", default=["transformerpp", "mamba", "jamba", "gla", "mamba2"])
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--card", help="only the rows of this card: its name as the rows give it, or a part of one name "
                   "only (case aside: e.g. H200); default: the card of the newest generate row")
    args = p.parse_args(argv)
    if args.card is not None:
        # the card of that whole name, else the one card whose name holds it; a part of several names is refused (it
        # took them all: --card H100 drew an "H100 NVL"'s rows beside an "H100"'s)
        held = cards(Path(args.results))
        named = [c for c in held if c.lower() == args.card.lower()] or [c for c in held
                                                                         if args.card.lower() in c.lower()]
        if len(named) != 1:
            what = "no generate rows of that card" if not named else f"part of {len(named)} cards' names"
            raise SystemExit(f"plot_decode: --card {args.card!r}: {what} in {args.results}; its cards: "
                             f"{', '.join(map(repr, held)) or 'none'}")
        args.card = named[0]
    points = load(Path(args.results), args.card)
    newest = ""
    if args.card is None and points:
        # the newest row of each name could come from different cards: one line held an H100's batch 64 beside an
        # H200's smaller batches, absolute times of two cards; draw the newest row's card alone
        card = next(reversed(points.values())).get("card", "")
        points = load(Path(args.results), card)
        newest = ", the newest rows' card"
        print(f"card {card!r} (the newest row's; --card for another)")
    if not any(k[0] == "transformerpp" for k in points):
        which = f" of the card {args.card!r}" if args.card else ""
        raise SystemExit(f"no generate/transformerpp rows in {args.results}{which}: run benchmarks/generate.py first")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in args.models:
        at_2k = sorted((b, r["ours_ms"]) for (m, b, prompt), r in points.items() if m == model and prompt == 2048)
        if at_2k:
            left.plot(*zip(*at_2k), marker="o", color=COLOR.get(model), label=LABEL.get(model, model))
    left.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step", title="prompt 2048")
    left.set_xticks([1, 4, 16, 64], labels=["1", "4", "16", "64"])
    left.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    left.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    left.xaxis.set_minor_formatter(NullFormatter())
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    batch = max(b for (m, b, _) in points if m == "transformerpp")
    base = {prompt: r for (m, b, prompt), r in points.items() if m == "transformerpp" and b == batch}
    for model in args.models:
        if model == "transformerpp":
            continue
        speedup = sorted((prompt, ratio) for (m, b, prompt), r in points.items()
                         if m == model and b == batch and (ratio := same_run_speedup(r, base.get(prompt))))
        if speedup:
            right.plot(*zip(*speedup), marker="o", color=COLOR.get(model), label=LABEL.get(model, model))
    right.axhline(5, color="grey", linestyle="--", linewidth=1, label="5x")
    right.set(xscale="log", xlabel="prompt length", ylabel="decode speed-up over Transformer++",
              title=f"batch {batch}")
    right.set_xticks(sorted(base), labels=[str(p) for p in sorted(base)])  # (prompts Transformer++ ran)
    right.xaxis.set_minor_formatter(NullFormatter())
    right.grid(True, alpha=0.3)
    right.legend()
    used = sorted({(r.get("date", "?"), r.get("card", "?"), r.get("note") or "") for r in points.values()})
    fig.suptitle(f"decode, 130M models, bf16, CUDA graphs ({'; '.join(sorted({u[1] for u in used}))}{newest})")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    for key in sorted(points):
        r = points[key]
        note = r.get("note") or ""
        print(f"{key[0]:14s} B{key[1]:<3d} prompt {key[2]:5d}: {r['ours_ms']:.3f} ms  {r.get('date', '?')}  {note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
