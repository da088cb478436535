"""Accuracy on the synthetic recall tasks, per sequence length and per number of items to recall.

``evaluate_synthetic(model, "mqar", seq_lens=[64, 128, 256], n_kv=[4, 8, 16])`` generates ``n_samples``
fresh rows per (length, count) cell with ``zoo.data.synthetic`` and scores the argmax prediction at every
answer position (labels != -100; the prediction for ``labels[:, t]`` is read at position ``t - 1``).
``plot_synthetic_accuracy`` draws accuracy against the sequence length (a line per count of items) and against the
count (a line per length), with the task's chance level. ``main(argv)`` is ``zoo eval synthetic``: it prints the
tables and writes CSV, JSON and that PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zoo.data.synthetic import COUNT_ARGUMENT, IGNORE_INDEX, TASKS, SyntheticDataset, make_batch
from zoo.eval.common import (
    accepts_argument,
    add_device_arguments,
    check_positions,
    format_size,
    interruption_says,
    iter_chunk_logits,
    load_model,
    markdown_table,
    model_device,
    model_fingerprint,
    number_list,
    parse_list,
    positive_int,
    pyplot,
    resume,
    save_figure,
    sigterm_interrupts,
    write_json,
    write_rows,
)

# the rows `zoo eval synthetic` draws by default: SyntheticDataset(seed) is what zoo finetune trains on (data.seed,
# 0 by default) and seed + 1 what it holds out; zoo compare evaluates MQAR at its seed + EVAL_SEED likewise
EVAL_SEED = 1_000_003


@torch.no_grad()
def predict_answers(
    model, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy predictions at the answer positions of a batch.

    When the model takes ``logits_to_keep``, only the logits from the first answering position on are
    computed, so a long row with its answers at the end does not materialise [B, T, V].

    Args:
        model: a causal LM.
        input_ids: LongTensor [B, T] on the model's device.
        labels: LongTensor [B, T] (Hugging Face alignment, -100 where nothing is asked).
        chunk_size: run the rows in chunks of this many tokens, carrying the cache (long rows).

    Returns:
        ``(predictions, targets, asked)``, each [B, P] over the P positions where any row has an answer;
        ``asked`` marks the entries that are real answers.
    """
    from zoo.decode import _dict_output

    asked_all = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position p answers labels[:, p + 1]
    positions = asked_all.any(dim=0).nonzero().squeeze(1)  # [P]
    targets = labels[:, 1:][:, positions]
    seq_len = input_ids.shape[1]
    if chunk_size is None or chunk_size >= seq_len:
        kwargs = {}
        if accepts_argument(model, "logits_to_keep") and len(positions):
            # an int (keep the last k positions) is what every implementation of logits_to_keep accepts
            kwargs["logits_to_keep"] = seq_len - int(positions[0])
        # an output object also where the config's return_dict is False (transformers' option): its tuple has no .logits
        logits = model(input_ids=input_ids, use_cache=False, **kwargs, **_dict_output(model)).logits
        logits = logits[:, positions - (seq_len - logits.shape[1])]
    else:
        pieces = []
        for start, chunk_logits in iter_chunk_logits(model, input_ids, chunk_size):
            inside = (positions >= start) & (positions < start + chunk_logits.shape[1])
            pieces.append(chunk_logits[:, positions[inside] - start])
        logits = torch.cat(pieces, dim=1)
    return logits.argmax(dim=-1), targets, targets != IGNORE_INDEX


@torch.no_grad()
def evaluate_synthetic(
    model,
    task: str = "mqar",
    seq_lens: Sequence[int] = (64, 128, 256),
    n_kv: Sequence[int] | None = None,
    n_samples: int = 256,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    seed: int = EVAL_SEED,
    chunk_size: int | None = None,
    progress: bool = False,
    on_cell: Callable[[list[dict]], None] | None = None,
    done: Sequence[dict] | None = None,
    on_stop: Callable[[list[dict], dict], None] | None = None,
    started: dict | None = None,
    **task_kwargs,
) -> dict:
    """Accuracy of ``model`` on ``task`` for every (sequence length, count) cell.

    Args:
        model: a causal LM whose vocabulary covers the task's.
        task: 'mqar', 'selective_copying' or 'induction_heads'.
        seq_lens: row lengths T to test (one given twice is tested once).
        n_kv: numbers of items to recall (MQAR key-value pairs, selective-copying tokens); None: the task
            default; one given twice is tested once. Cells the task cannot build (e.g. 4 * n_kv > T for MQAR)
            are skipped with a warning; a ValueError when no cell can be built.
        n_samples: rows per cell.
        batch_size: rows per forward.
        device: where the inputs go; default the model's device (the model is not moved).
        seed: row i of every cell is item i of ``SyntheticDataset(task, n_samples, T, seed)`` (its own seed), so
            results are reproducible and do not depend on ``batch_size``. The default, ``EVAL_SEED``, draws no
            training row of a small data seed (zoo finetune trains on ``SyntheticDataset(seed=data.seed)``: with
            seed 0, the rows of data seed 0 were evaluated on the rows the model trained on first).
        chunk_size: evaluate rows in chunks of this many tokens, carrying the cache (for 2^20-token rows).
        progress: show a tqdm bar over the evaluated tokens (long rows take minutes), with each cell's accuracy.
        on_cell: called after every cell with the ``rows`` so far, e.g. to save them, so a grid stopped at its
            longest rows (out of memory, a lost job) keeps the cells it finished.
        done: rows of a saved result of the same model and settings: those of this grid's cells are kept and not run
            again (a rerun after an interruption); the rows are those of one uninterrupted run of this grid.
        on_stop: called when a KeyboardInterrupt (Ctrl-C, SIGTERM under ``sigterm_interrupts``) stops a cell after
            some of its batches, with the ``rows`` so far and that cell's progress (a dict of plain values), e.g. to
            save them beside the rows: a cell of 2^20-token rows is an hour of batches.
        started: the progress ``on_stop`` gave, saved with ``done``: its cell's rows up to there are counted and not
            run again (ignored unless it is a cell of this grid with the same ``n_samples``).
        task_kwargs: other task arguments (``vocab_size``, ``power_a``, ``random_non_queries``).

    Returns:
        dict with ``task``, ``count_name``, ``rows`` (one per cell: seq_len, count, accuracy = fraction of
        answers right, seq_accuracy = fraction of rows with every answer right, n_answers, n_samples),
        ``by_seq_len`` and ``by_count`` (answer-weighted marginals).
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"evaluate_synthetic: n_samples={n_samples} and batch_size={batch_size} must be >= 1")
    count_name = COUNT_ARGUMENT[task]
    if n_kv is not None and count_name is None:
        raise ValueError(f"task {task!r} has no count to vary; leave n_kv unset")
    # a cell given twice (--seq-lens 128,2^7) is run once: its copy drew the same rows and counted them twice in
    # n_answers and in the marginals, which weighed that length (or count) double
    seq_lens = list(dict.fromkeys(seq_lens))
    n_kv = list(dict.fromkeys(n_kv)) if n_kv is not None else None
    if not seq_lens or n_kv == []:  # (it returned a result of no rows, whose marginals are empty, without a word)
        raise ValueError(f"evaluate_synthetic: no cells (seq_lens={seq_lens}, n_kv={n_kv}); give at least one length"
                         f"{' and one count (or n_kv=None for the default)' if n_kv == [] else ''}")
    device = torch.device(device) if device is not None else model_device(model)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    task_vocab = task_kwargs.get("vocab_size", task_default(task, "vocab_size"))
    if vocab_size is not None and vocab_size < task_vocab:
        raise ValueError(f"model vocab_size={vocab_size} is smaller than the task's vocab_size={task_vocab} (its rows "
                         f"would hold ids the model has no embedding for); give the task a vocab_size (--vocab-size) "
                         f"of at most {vocab_size}")
    check_positions(model, max(seq_lens), f"seq_lens: rows of up to {max(seq_lens)} tokens",
                    lambda n: f"give --seq-lens of at most {n}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()

    rows, skipped = [], []
    # a saved cell outside this grid is not this run's (it made a grid with no buildable cell look like a result)
    finished = {(r["seq_len"], r.get(count_name)): r for r in done or []}
    bar = None
    if progress:
        from tqdm import tqdm

        cells = len(n_kv) if n_kv is not None else 1
        bar = tqdm(total=sum(seq_lens) * n_samples * cells, desc=f"{task} eval", unit="tok", unit_scale=True)
    resumed = None  # the cell an interruption stopped in, as far as it went
    if isinstance(started, dict) and started.get("n_samples") == n_samples and 0 < started.get("next", 0) < n_samples:
        resumed = started
    progress_of_cell = None  # the cell in progress, after its last finished batch
    try:  # the model given back in the mode it came in, also when a cell fails (out of memory at the longest rows)
        # the bar closed on the way out, an interruption's too: left open, it was drawn again below the 'interrupted'
        # line
        with contextlib.closing(bar) if bar is not None else contextlib.nullcontext():
            for seq_len in seq_lens:
                for count in n_kv if n_kv is not None else [None]:
                    kwargs = dict(task_kwargs)
                    if count is not None:
                        kwargs[count_name] = count
                    key = (seq_len, kwargs.get(count_name, task_default(task, count_name)) if count_name else None)
                    if key in finished:
                        rows.append(finished[key])
                        if bar is not None:
                            bar.update(seq_len * n_samples)
                        continue
                    try:  # only the task's own validation may skip a cell, never an error of the model
                        # (from a generator of its own: the global one's draws were used up, so a training loop that
                        # evaluated drew other dropout masks and batches afterwards than one that did not)
                        make_batch(task, 1, seq_len, generator=torch.Generator().manual_seed(0), **kwargs)
                    except ValueError as error:
                        cell = f"seq_len={seq_len}" + (f" {count_name}={count}" if count_name is not None else "")
                        skipped.append(f"{cell}: {error}")
                        warnings.warn(f"skipping {skipped[-1]}", stacklevel=2)
                        if bar is not None:
                            bar.update(seq_len * n_samples)
                        continue
                    # one generator per row: the rows (and so the accuracy) must not depend on the batch size
                    dataset = SyntheticDataset(task, n_samples, seq_len, seed, **kwargs)
                    correct = total = rows_right = begin = 0
                    if resumed is not None and (resumed["seq_len"], resumed["count"]) == key:
                        begin, correct, total, rows_right = (resumed[k] for k in
                                                             ("next", "correct", "total", "rows_right"))
                        if bar is not None:
                            bar.update(seq_len * begin)
                    for start in range(begin, n_samples, batch_size):
                        items = [dataset[i] for i in range(start, min(start + batch_size, n_samples))]
                        input_ids = torch.stack([item["input_ids"] for item in items]).to(device)
                        labels = torch.stack([item["labels"] for item in items]).to(device)
                        predictions, targets, asked = predict_answers(model, input_ids, labels, chunk_size)
                        right = (predictions == targets) & asked
                        correct += int(right.sum())
                        total += int(asked.sum())
                        rows_right += int((right == asked).all(dim=1).sum())
                        # one assignment: an interruption sees the cell's counts whole
                        progress_of_cell = {"seq_len": seq_len, "count": key[1], "n_samples": n_samples,
                                            "next": start + len(items), "correct": correct, "total": total,
                                            "rows_right": rows_right}
                        if bar is not None:
                            bar.update(seq_len * input_ids.shape[0])
                            bar.set_postfix(T=seq_len, acc=f"{correct / max(total, 1):.3f}", refresh=False)
                    row = {"seq_len": seq_len}
                    if count_name is not None:  # the count the rows had
                        row[count_name] = kwargs.get(count_name, task_default(task, count_name))
                    row.update(accuracy=correct / total, seq_accuracy=rows_right / n_samples,
                               n_correct=correct, n_answers=total, n_samples=n_samples)
                    rows.append(row)
                    progress_of_cell = None
                    if on_cell is not None:
                        on_cell(rows)
    except KeyboardInterrupt:
        if on_stop is not None and progress_of_cell is not None:
            on_stop(rows, progress_of_cell)
        raise
    finally:
        if was_training:
            model.train()
    if skipped and not rows:
        raise ValueError(f"no cell of the {task} grid can be built ({'; '.join(skipped)}); choose sequence "
                         f"lengths, counts and vocab_size that fit (--seq-lens, --n-kv, --vocab-size)")

    def marginal(key: str) -> list[dict]:
        groups: dict[int, list[int]] = {}
        for row in rows:
            right_total = groups.setdefault(row[key], [0, 0])
            right_total[0] += row["n_correct"]
            right_total[1] += row["n_answers"]
        return [{key: k, "accuracy": r / t, "n_answers": t} for k, (r, t) in groups.items()]

    return {
        "task": task,
        "count_name": count_name,
        "task_kwargs": task_kwargs,
        "rows": rows,
        "by_seq_len": marginal("seq_len"),
        "by_count": marginal(count_name) if count_name is not None else [],
    }


def task_default(task: str, name: str):
    """The default of argument ``name`` of ``task``'s generator (e.g. its vocab_size)."""
    return inspect.signature(TASKS[task]).parameters[name].default


def chance_accuracy(task: str, task_kwargs: dict | None = None) -> float | None:
    """Accuracy of a uniform guess among the tokens an answer can be, as the task's generator draws them: MQAR's values
    are the upper ``V - V // 2`` tokens, selective copying's data tokens ``1 .. V - 2``, induction heads' answers
    ``0 .. V - 2`` (``V`` the task's vocab_size, given or its default); None for a task it does not know."""
    answers = {"mqar": lambda V: V - V // 2, "selective_copying": lambda V: V - 2, "induction_heads": lambda V: V - 1}
    if task not in answers:
        return None
    vocab_size = (task_kwargs or {}).get("vocab_size", task_default(task, "vocab_size"))
    return 1 / answers[task](vocab_size)


def accuracy_series(rows: Sequence[dict], x: str, line: str | None) -> dict[Any, list[tuple[int, float]]]:
    """The lines of a plot of ``rows`` (``evaluate_synthetic``'s, or its marginals): for each value of column ``line``
    (None: one line, keyed None), the ``(x value, accuracy)`` points sorted by x. A cell the grid skipped is absent
    from its line, not drawn as zero. Lines are in increasing order of their value."""
    lines: dict[Any, list[tuple[int, float]]] = {}
    for row in rows:
        lines.setdefault(row[line] if line is not None else None, []).append((row[x], row["accuracy"]))
    return {key: sorted(lines[key]) for key in sorted(lines, key=lambda k: (k is None, k))}


def _size_axis(ax, values: Sequence[int]) -> None:
    """x axis of lengths or counts: log2 where they are all powers of two (64, 128, 256 evenly apart), ticks at
    the values, written 4K and 1M."""
    values = sorted(set(values))
    if len(values) > 1 and all(v > 0 and v & (v - 1) == 0 for v in values):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(values, [format_size(v) for v in values])


def plot_synthetic_accuracy(result: dict, path: str | Path, title: str | None = None) -> Path:
    """PNG of ``evaluate_synthetic``'s result (or its saved JSON): accuracy against sequence length, a line per count of
    items (n_kv, n_tokens), and, where the grid has several counts, against the count, a line per length; the
    answer-weighted mean over the lines (the marginal tables) dashed where a panel has several, the task's chance
    level (``chance_accuracy``) dotted.

    Args:
        result: dict with ``task``, ``count_name``, ``rows``, ``by_seq_len``, ``by_count`` (``task_kwargs`` for the
            chance level's vocabulary).
        path: PNG to write.
        title: figure title (default: the task).
    """
    plt = pyplot()
    # (the JSON a grid saves after every cell, before it completes, names no count_name: its task's counts were drawn
    # as one line, the cells of every count joined up at each length)
    rows, count_name = result["rows"], result.get("count_name", COUNT_ARGUMENT.get(result["task"]))
    counts = {row[count_name] for row in rows} if count_name else set()
    panels = []  # (x column, line column, marginal rows)
    if len({row["seq_len"] for row in rows}) > 1 or len(counts) < 2:
        panels.append(("seq_len", count_name, result.get("by_seq_len") or []))
    if len(counts) > 1:
        panels.append((count_name, "seq_len", result.get("by_count") or []))
    chance = chance_accuracy(result["task"], result.get("task_kwargs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 4.5), squeeze=False)
    for ax, (x, line, marginal) in zip(axes[0], panels):
        series = accuracy_series(rows, x, line)
        for key, points in series.items():
            label = None if key is None else f"{line}={key}" if line != "seq_len" else f"T={format_size(key)}"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, label=label)
        if len(series) > 1 and marginal:
            (points,) = accuracy_series(marginal, x, None).values()
            ax.plot([p[0] for p in points], [p[1] for p in points], color="black", linestyle="--", linewidth=1,
                    label="all (answer-weighted)")
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"chance 1/{round(1 / chance)}")
        _size_axis(ax, [row[x] for row in rows])
        ax.set_xlabel("sequence length (tokens)" if x == "seq_len" else f"{x} (items to recall)")
        ax.set_ylabel("accuracy (answers right)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a lone line of a task with no count or chance has no label)
            ax.legend(fontsize=8)
    fig.suptitle(title or result["task"])
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """``zoo eval synthetic --model DIR --task mqar --seq-lens 64,128,256 --n-kv 4,8,16``."""
    parser = argparse.ArgumentParser(prog="zoo eval synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id, or a zoo model YAML")
    parser.add_argument("--task", default="mqar", choices=sorted(TASKS), help="the task (default mqar)")
    parser.add_argument("--seq-lens", type=number_list, default=None,
                        help="row lengths in tokens, a comma list; 2^k and 4K forms accepted "
                        "(default: mqar 64,128,256; selective_copying 4096; induction_heads 2^6,2^8,2^10)")
    parser.add_argument("--n-kv", type=number_list, default=None,
                        help="comma list of key-value pairs (mqar) or tokens to copy (selective_copying); "
                        "default: the task's, 16; induction_heads has no count")
    parser.add_argument("--n-samples", type=positive_int, default=256, help="rows per cell (default 256)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="rows per forward (default 64)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED,
                        help=f"of the rows (default {EVAL_SEED}: not the training rows of a small data seed)")
    parser.add_argument("--vocab-size", type=int, default=None, help="task vocabulary (default: the paper's)")
    parser.add_argument("--power-a", type=float, default=None, help="mqar: query-gap power law exponent")
    parser.add_argument("--random-non-queries", action="store_true", help="mqar: random filler tokens")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="evaluate long rows in chunks of this many tokens, "
                        "carrying the cache (default: whole rows)")
    add_device_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default results/synthetic-<task>)")
    from zoo.state.mitigation import add_mitigation_argument, apply_mitigation, splits_matter

    add_mitigation_argument(parser)
    args = parser.parse_args(argv)

    default_lens = {"mqar": "64,128,256", "selective_copying": "4096", "induction_heads": "2^6,2^8,2^10"}
    seq_lens = args.seq_lens or parse_list(default_lens[args.task])  # an empty --seq-lens (an unset $LENS) too
    n_kv = args.n_kv or None
    task_kwargs = {}
    if args.vocab_size is not None:
        task_kwargs["vocab_size"] = args.vocab_size
    if args.task == "mqar":
        if args.power_a is not None:
            task_kwargs["power_a"] = args.power_a
        if args.random_non_queries:
            task_kwargs["random_non_queries"] = True
    elif args.power_a is not None or args.random_non_queries:  # they were dropped without a word
        raise ValueError(f"--power-a and --random-non-queries are mqar arguments, not {args.task}'s; leave them out")
    if n_kv is not None and COUNT_ARGUMENT[args.task] is None:  # (evaluate_synthetic's message named no option,
        # after the model had loaded)
        raise ValueError(f"--n-kv: task {args.task!r} has no count of items to recall; leave it out")

    out = Path(args.out or f"results/synthetic-{args.task}")
    # SIGTERM stops the grid as Ctrl-C does (it killed the process without a word), and either ends in one line saying
    # what is kept (zoo.cli._run prints it)
    kept = f"the finished cells ({args.task}.csv, {args.task}.json) are kept in {out}; the same command continues"
    with sigterm_interrupts(), interruption_says(kept):
        model = load_model(args.model, args.device, args.dtype)
        if args.mitigation is not None:
            apply_mitigation(model, args.mitigation)
        # what a cell's result depends on: a rerun with the same keeps the cells the JSON holds
        config = {"model": args.model, "weights": model_fingerprint(args.model), "dtype": args.dtype, "task": args.task,
                  "task_kwargs": task_kwargs, "n_samples": args.n_samples, "seed": args.seed,
                  "mitigation": args.mitigation}
        if splits_matter(args.mitigation):  # a norm cap acts at every chunk's end
            config["chunk_size"] = args.chunk_size
        done = resume(out / f"{args.task}.json", config, "zoo eval synthetic")

        def save(rows: list[dict], started: dict | None = None) -> None:  # after every cell: an interrupted grid
            # keeps what it finished, and the batches finished of the cell it stopped in (`started`, on_stop's)
            write_rows(rows, out / f"{args.task}.csv")
            write_json({"task": args.task, "task_kwargs": task_kwargs, "rows": rows, "model": args.model,
                        "complete": False, "config": config} | ({"started": started} if started else {}),
                       out / f"{args.task}.json")

        result = evaluate_synthetic(model, args.task, seq_lens, n_kv, args.n_samples, args.batch_size,
                                    seed=args.seed, chunk_size=args.chunk_size, progress=True, on_cell=save,
                                    done=done["rows"] if done else None, on_stop=save,
                                    started=done.get("started") if done else None, **task_kwargs)
        result["model"], result["complete"] = args.model, True  # (the copies saved after each cell say false)
        result["config"] = config
        print(f"## {args.task}: {args.model}\n")
        print(markdown_table(result["rows"]))
        print()
        print(markdown_table(result["by_seq_len"]))
        if result["by_count"]:
            print()
            print(markdown_table(result["by_count"]))
        csv_path = write_rows(result["rows"], out / f"{args.task}.csv")
        json_path = write_json(result, out / f"{args.task}.json")
        # from every row of the grid, those a rerun kept included: the figure is the whole table's
        title = f"{args.task}: {args.model}" + (f" [{args.mitigation}]" if args.mitigation else "")
        png = plot_synthetic_accuracy(result, out / f"{args.task}.png", title)
        print(f"\nwrote {csv_path}, {json_path} and {png}")
        return result
