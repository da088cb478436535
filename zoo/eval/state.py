"""``zoo eval state``: state statistics over position (state-collapse diagnosis), with or without a mitigation.

    zoo eval state --model DIR --max-len 64K --chunk-size 2048 --train-length 2048
    zoo eval state --model DIR --max-len 64K --train-length 2048 --mitigation forget:c_alpha=0.999,c_b=0.7
    zoo eval state --model DIR --max-len 64K --train-length 2048 --norm-calibrate 2048 --norm-factor 1.0
    zoo eval state --model DIR --task induction_heads --vocab-size 16 --max-len 2^16 --train-length 256
    zoo eval state --model DIR --task mqar --vocab-size 32 --n-kv 4 --max-len 4K --train-length 64

Rows come from a ``.pt`` file (``--tokens``), the built-in corpus (default; ``zoo.eval.length``'s
documents), or a synthetic task (``--task``). Writes ``state.json`` (every statistic), one PNG per
statistic with the training length marked (see ``zoo.state.recorder``), and prints per layer the largest
head RMS at log-spaced positions next to the loss. ``--compare`` also runs the unmitigated model and
overlays both in the plots. A run saves its progress as it goes (``state.partial.pt``, every ``SAVE_EVERY`` seconds
at most), so a rerun of the same model files and settings after an interruption resumes it at its next chunk.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from zoo.cache import ZooCache
from zoo.eval.common import (
    add_device_arguments,
    check_token_ids,
    check_tokenizer,
    int_option,
    interruption_says,
    load_model,
    load_tokenizer,
    markdown_table,
    model_fingerprint,
    non_negative_int,
    positive_int,
    rekey_partial,
    remove_partial,
    sigterm_interrupts,
    tokenizer_name,
    trained_with_bos,
    write_json,
)
from zoo.eval.length import document_provenance, recipe_holdout
from zoo.state import (
    add_mitigation_argument,
    apply_mitigation,
    calibrate_norm_threshold,
    check_recurrent,
    format_spec,
    is_neutral,
    parse_mitigation,
    plot_state_statistics,
    record_state_statistics,
)
from zoo.state.mitigation import DEFAULTS, names_group_size, recurrent_kinds

# seconds between saves of a run's progress (a small run is not slowed by the writes)
SAVE_EVERY = 30.0
# the options (argparse dests) that set the mitigation, which the unmitigated run of --compare does not depend on
MITIGATION_OPTIONS = ("mitigation", "norm_calibrate", "norm_factor", "norm_chunk")


def task_arguments(args) -> dict:
    """The synthetic task's arguments from the command line (as ``zoo eval synthetic`` takes them)."""
    from zoo.data.synthetic import COUNT_ARGUMENT, TASKS

    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: unknown synthetic task; choose one of {sorted(TASKS)}")
    # (--vocab-size 0 was taken as not given: the task's default vocabulary, without a word)
    kwargs = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
    count_name = COUNT_ARGUMENT[args.task]
    if args.n_kv is not None:
        if count_name is None:
            raise ValueError(f"--n-kv: task {args.task!r} has no count of items to recall; leave it out")
        kwargs[count_name] = args.n_kv
    if args.task == "mqar":
        if args.power_a is not None:
            kwargs["power_a"] = args.power_a
        if args.random_non_queries:
            kwargs["random_non_queries"] = True
    elif args.power_a is not None or args.random_non_queries:
        raise ValueError(f"--power-a and --random-non-queries are mqar arguments, not {args.task}'s; leave them out")
    return kwargs


def check_row_options(args) -> None:
    """Refuse options of a row source that is not the one in use: --task's rows ignored --tokens, the corpus's
    ignored --n-kv, --vocab-size, --power-a and --random-non-queries, a --tokens file's --seed and --tokenizer, and a
    task's --tokenizer, without a word."""
    if args.task and args.tokens:
        raise ValueError(f"--tokens and --task {args.task}: give one source of rows, a token file or a synthetic task")
    given = [name for name, value in (("--n-kv", args.n_kv), ("--vocab-size", args.vocab_size),
                                      ("--power-a", args.power_a),
                                      ("--random-non-queries", args.random_non_queries or None)) if value is not None]
    if given and not args.task:
        rows = "the --tokens documents" if args.tokens else "the built-in corpus"
        raise ValueError(f"{', '.join(given)}: options of a synthetic task, but the rows are {rows}; add --task NAME "
                         f"or leave them out")
    # (ignored without a word: a --tokens file's rows are taken as they are, and a task's are token ids already)
    unused = [name for name, value, used in (("--tokenizer", args.tokenizer, not (args.tokens or args.task)),
                                             ("--seed", args.seed, not args.tokens))
              if value is not None and not used]
    if unused:
        rows = "the --tokens documents, taken as they are" if args.tokens else f"--task {args.task}'s token ids"
        raise ValueError(f"{', '.join(unused)}: not used, the rows are {rows}; leave "
                         f"{'them' if len(unused) > 1 else 'it'} out")


def load_rows(args, add_bos: bool = True, holdout: float = 0.01,
              model=None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``(rows, documents)``: rows, a LongTensor [n_docs, max_len], from --tokens, a synthetic --task, or the
    built-in corpus (its documents with BOS first or not: ``add_bos``, as the model trained,
    ``zoo.eval.common.trained_with_bos``; the held-out files of data.holdout ``holdout`` first, as
    ``zoo.eval.length.recipe_holdout`` reads it for a zoo checkpoint); documents, those the rows were cut from (a
    ``CorpusDocuments`` for the built-in corpus, which ``zoo.eval.length.document_provenance`` reads; its counts are
    of the whole documents, before a cut to the shortest), None for a task's rows. With ``model``, the corpus's
    tokenizer is refused before the documents are built where it is not the model's (`check_tokenizer`)."""
    if args.task:
        from zoo.data.synthetic import COUNT_ARGUMENT, make_batch

        kwargs = task_arguments(args)
        generator = torch.Generator().manual_seed(args.seed)
        try:
            return make_batch(args.task, args.n_docs, args.max_len, generator, **kwargs)["input_ids"], None
        except ValueError as error:
            # the options this task takes: induction_heads has no count (--n-kv, named for it too, is refused for it);
            # a given --power-a may be the value at fault (it was not named)
            options = (["--n-kv"] if COUNT_ARGUMENT[args.task] else []) + ["--vocab-size", "--max-len"] + \
                (["--power-a"] if args.power_a is not None else [])
            raise ValueError(f"--task {args.task}: {error}; change {', '.join(options[:-1])} or {options[-1]}") \
                from None
    from zoo.eval.length import corpus_special_ids, load_documents

    tokenizer = None if args.tokens else load_tokenizer(args.tokenizer, args.model)
    if tokenizer is not None and model is not None:
        # (a tokenizer whose eos or pad id lay past the model's embeddings gave statistics of rows the model was not
        # trained on, without a word)
        check_tokenizer(model, tokenizer, tokenizer_name(args.tokenizer, args.model),
                        corpus_special_ids(tokenizer, add_bos))
    docs = load_documents(args.tokens, args.n_docs, args.max_len, tokenizer, args.seed, add_bos=add_bos,
                          holdout=holdout)
    length = min(len(d) for d in docs)
    if any(len(d) > length for d in docs):
        print(f"note: documents cut to the shortest, {length} tokens")
    elif length < args.max_len:
        # (documents of equal length, none cut, were reported "cut to the shortest" too: a --tokens file of rows shorter
        # than the default --max-len 16384)
        print(f"note: the rows are {length} tokens, fewer than --max-len {args.max_len}: the documents are no longer")
    return torch.stack([d[:length] for d in docs]), docs


def check_rows(model, rows: torch.Tensor, args) -> None:
    """Refuse rows holding ids outside the model's vocabulary, with the option that fixes it."""
    if args.task:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", "V")
        fix = f"pass --vocab-size {vocab_size} or less (the model's vocabulary)"
        check_token_ids(model, rows, f"--task {args.task} rows", fix)
    else:
        check_token_ids(model, rows, "--tokens documents" if args.tokens else "the built-in corpus documents",
                        "tokenize with the model's tokenizer (--tokenizer)")


def check_mitigation_options(args) -> None:
    """--mitigation, --norm-calibrate, --norm-factor, --norm-chunk and --compare checked (the norm settings' defaults
    filled in) before the model runs: a bad spec used to surface only after the --compare run had gone through every
    row, and --norm-calibrate 0 was taken as off."""
    try:
        spec = parse_mitigation(args.mitigation)
    except ValueError as error:
        raise ValueError(f"--mitigation: {error}") from None
    if args.norm_calibrate is None:  # (they were dropped without a word)
        given = [name for name, value in (("--norm-factor", args.norm_factor), ("--norm-chunk", args.norm_chunk))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: settings of --norm-calibrate, which is not given; add "
                             f"--norm-calibrate LEN or leave them out (--mitigation norm:threshold=T,chunk=C caps at a "
                             f"fixed threshold)")
    else:
        args.norm_factor = 1.0 if args.norm_factor is None else args.norm_factor
        args.norm_chunk = 64 if args.norm_chunk is None else args.norm_chunk
        if args.norm_calibrate < 1:
            raise ValueError(f"--norm-calibrate: the reference prefix must be >= 1 token, got {args.norm_calibrate}; "
                             f"leave it out for no state normalization")
        if not (math.isfinite(args.norm_factor) and args.norm_factor > 0):
            raise ValueError(f"--norm-factor: must be a number > 0 (the cap is this times the prefix's largest "
                             f"head norm), got {args.norm_factor:g}")
        if spec is not None and (spec["window"] is not None or math.isfinite(spec["threshold"])):
            raise ValueError("--norm-calibrate: sets the state-norm cap itself, so --mitigation may add forget:... "
                             f"only, not {args.mitigation!r} (norm does not combine with window, nor with a second "
                             "threshold)")
        if spec is not None and (spec["chunk"], spec["group_size"]) != (DEFAULTS["chunk"], DEFAULTS["group_size"]):
            # (the calibrated cap took --norm-chunk and --group-size in their place, without a word)
            raise ValueError(f"--norm-calibrate: give the cap's chunk and heads as --norm-chunk and --group-size, not "
                             f"in --mitigation {args.mitigation!r}")
    if spec is not None and math.isfinite(spec["threshold"]) and spec["group_size"] != args.group_size \
            and names_group_size(args.mitigation):  # (a fixed cap acts on --group-size's heads)
        raise ValueError(f"--mitigation {args.mitigation!r}: its group_size={spec['group_size']} differs from "
                         f"--group-size {args.group_size}, the heads the statistics are recorded on; give one of them")
    if args.compare and (spec is None or is_neutral(spec)) and args.norm_calibrate is None:
        # a neutral spec (forget:c_alpha=1) is no mitigation: both runs were named 'none' and state.json kept one
        given = f"--mitigation {args.mitigation!r} changes nothing, so there is " if spec is not None else ""
        raise ValueError(f"--compare: {given}nothing to compare the unmitigated run with; give --mitigation SPEC or "
                         f"--norm-calibrate LEN")


def summary_rows(result: dict, per_octave: int = 1) -> list[dict]:
    """Per log-spaced sample: position, loss, and per layer the largest head state RMS (3 significant digits)."""
    positions = result["positions"]
    picked, next_power = [], 1
    for i, p in enumerate(positions):
        if p >= next_power or i == len(positions) - 1:
            picked.append(i)
            while next_power <= p:
                next_power *= 2 ** (1 / per_octave)
    rows = []
    for i in picked:
        row = {"position": positions[i], "loss": result["loss"][i]}
        for layer, s in result["layers"].items():
            row[f"L{layer} rms"] = f"{max(s['state_rms'][i]):.3g}"
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    """``zoo eval state --model DIR [--mitigation SPEC] --max-len 64K --train-length 2048``."""
    parser = argparse.ArgumentParser(prog="zoo eval state", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id, or a zoo model YAML")
    parser.add_argument("--tokens", default=None, help=".pt LongTensor [N, T]; default: built-in corpus")
    parser.add_argument("--tokenizer", default=None, help="for the built-in corpus: path, hub id or 'byte' "
                        "(default: the model's; 'byte' for a zoo model YAML)")
    parser.add_argument("--task", default=None, help="synthetic rows instead: mqar | selective_copying | "
                        "induction_heads")
    parser.add_argument("--vocab-size", type=int, default=None, help="synthetic task vocabulary (default: the "
                        "task's; at most the model's vocab_size)")
    parser.add_argument("--n-kv", type=int, default=None, help="synthetic: key-value pairs per row (mqar) or "
                        "tokens to copy (selective_copying); mqar needs --vocab-size >= 2 * n_kv + 2")
    parser.add_argument("--power-a", type=float, default=None, help="mqar: query-gap power law exponent")
    parser.add_argument("--random-non-queries", action="store_true", help="mqar: random filler tokens")
    parser.add_argument("--n-docs", type=positive_int, default=4, help="rows, run as one batch (default 4)")
    parser.add_argument("--max-len", type=positive_int, default=16384, help="tokens per row (default 16384)")
    parser.add_argument("--chunk-size", type=positive_int, default=1024, help="tokens per forward above the "
                        "log-spaced start; the state is sampled at every chunk end (default 1024)")
    parser.add_argument("--points-per-octave", type=non_negative_int, default=2,
                        help="log-spaced samples below chunk-size (default 2; 0: none, every chunk-size tokens)")
    parser.add_argument("--group-size", type=positive_int, default=None,
                        help="mamba layers: channels per head (default 64; mamba2 and gla layers have heads of their "
                             "own)")
    parser.add_argument("--train-length", type=positive_int, default=None, help="marked on the plots")
    add_mitigation_argument(parser)
    parser.add_argument("--norm-calibrate", type=int_option, default=None, metavar="LEN",
                        help="cap each head's state norm at --norm-factor x its largest norm over the first LEN "
                             "tokens of the rows (state normalization calibrated on a reference prefix)")
    parser.add_argument("--norm-factor", type=float, default=None,
                        help="of the calibrated cap: this times the prefix's largest norm (default 1.0)")
    parser.add_argument("--norm-chunk", type=positive_int, default=None,
                        help="of the calibrated cap: tokens between caps in a prefill (default 64)")
    parser.add_argument("--compare", action="store_true", help="also run without the mitigation and overlay")
    parser.add_argument("--seed", type=int, default=None, help="of the rows of the built-in corpus or a task "
                        "(default 0)")
    add_device_arguments(parser)
    parser.add_argument("--out", default="results/state", help="output directory (default results/state)")
    args = parser.parse_args(argv)
    check_row_options(args)
    group_size_given, args.group_size = args.group_size is not None, args.group_size or 64
    args.seed = 0 if args.seed is None else args.seed
    check_mitigation_options(args)

    out = Path(args.out)
    # SIGTERM stops the run as Ctrl-C does (it killed the process without a word), and either ends in one line saying
    # what is kept (zoo.cli._run prints it)
    kept = ("the runs' progress as last saved (state-none.partial.pt, then state.partial.pt; state.json once the "
            "unmitigated run is done)" if args.compare else "the run's progress as last saved (state.partial.pt)")
    with sigterm_interrupts(), interruption_says(f"{kept} is kept in {out}; the same command continues"):
        model = load_model(args.model, args.device, args.dtype)
        check_recurrent(model, f"--model {args.model}")
        # --mitigation's group_size too (a dict here, which apply_mitigation does not check): with --group-size refused
        # alone, its leaving out was refused in turn ('differs from --group-size 64; give one of them'), and a spec's
        # group_size of the default was taken and ignored
        named = [f"--group-size {args.group_size}"] if group_size_given else []
        if args.mitigation and names_group_size(args.mitigation):
            named.append(f"the group_size of --mitigation {args.mitigation!r}")
        if named and "mamba" not in (kinds := recurrent_kinds(model)):
            # (it was taken and ignored: mamba2 and gla heads are the model's own, and state.json recorded the given
            # group_size beside statistics of the very same heads)
            raise ValueError(f"{' and '.join(named)}: group{'s' if len(named) == 1 else ''} the channels of mamba "
                             f"layers into heads, but {args.model} has none (its {' and '.join(sorted(kinds))} "
                             f"layers' heads are their own); leave {'it' if len(named) == 1 else 'them'} out")
        # a zoo checkpoint trained on the built-in corpus: its run's held-out files first (its train_config.yaml), and
        # the share of its training text in the rows said and recorded, as zoo eval length does; the held-out files of
        # 0.01 were taken whatever the run's data.holdout, and the share went unrecorded
        holdout = None if args.tokens or args.task else recipe_holdout(args.model)
        rows, documents = load_rows(args, trained_with_bos(getattr(model, "config", None)),
                                    0.01 if holdout is None else holdout, model)
        provenance = document_provenance(documents, f"zoo eval state {args.model}", holdout is not None)
        saved = {"model": args.model} | ({"documents": provenance} if provenance is not None else {})
        check_rows(model, rows, args)
        if args.norm_calibrate and args.norm_calibrate > rows.shape[1]:
            raise ValueError(f"--norm-calibrate {args.norm_calibrate}: longer than the rows ({rows.shape[1]} tokens); "
                             f"the reference prefix must be a part of them, give at most {rows.shape[1]}")
        record = dict(chunk_size=args.chunk_size, points_per_octave=args.points_per_octave,
                      group_size=args.group_size, train_length=args.train_length, progress=True, save_every=SAVE_EVERY)
        # each run saved as it goes (state.partial.pt; the unmitigated run of --compare: state-none.partial.pt), so a
        # rerun of the same model files and settings resumes an interrupted one
        stat = Path(args.tokens).stat() if args.tokens else None
        key = {k: v for k, v in vars(args).items() if k not in ("out", "train_length", "compare", "device")} | {
            "weights": model_fingerprint(args.model), "tokens_file": [stat.st_size, stat.st_mtime_ns] if stat else None}
        runs = []
        if args.compare:
            apply_mitigation(model, None)
            # kept complete until the mitigated run is done: a rerun after an interruption there does not run it again
            # under the settings it depends on: the mitigation's (recorded per mixer, as none) are no part of it, so a
            # rerun that changes only them (another --norm-calibrate or --mitigation after an interruption) keeps it
            none_key = {k: v for k, v in key.items() if k not in MITIGATION_OPTIONS}
            # (one an earlier version saved under the whole key, the mitigation's included: resumed under this one)
            fresh = ZooCache.for_model(model, rows.shape[0])
            rekey_partial(out / "state-none.partial.pt", key, none_key,
                          [type(fresh), *{type(layer) for layer in fresh.layers}])
            none = record_state_statistics(model, rows, **record, partial=out / "state-none.partial.pt",
                                           partial_key=none_key, label="the unmitigated run", keep_partial=True)
            runs.append(("none", none))
            # saved now: an interrupted mitigated run (as long again) keeps the unmitigated one
            write_json(saved | {"runs": dict(runs)}, out / "state.json")
        spec = parse_mitigation(args.mitigation)
        if spec is not None and math.isfinite(spec["threshold"]):
            # a fixed cap acts on the heads the statistics are recorded on (--group-size): it took the spec's default of
            # 64 channels, so a Mamba layer recorded in heads of 32 was capped in groups of 64
            spec["group_size"] = args.group_size
        apply_mitigation(model, spec)
        if args.norm_calibrate:
            calibrate_norm_threshold(model, rows[:, :args.norm_calibrate], args.norm_factor, args.norm_chunk,
                                     args.chunk_size, args.group_size, args.points_per_octave)
        label = format_spec(next((m.mitigation for m in model.modules() if getattr(m, "mitigation", None)), None))
        if args.norm_calibrate:
            label = label.replace("per-head", f"{args.norm_factor:g}x prefix {args.norm_calibrate}")
        # kept complete, as the unmitigated one, until state.json holds the run
        result = record_state_statistics(model, rows, **record, partial=out / "state.partial.pt", partial_key=key,
                                         label=f"the {label} run" if args.compare else "the run", keep_partial=True)
        result["mitigation"] = label
        runs.append((label, result))

        for name, res in runs:
            print(f"## {args.model}, mitigation {name}: {res['batch']} rows of {res['positions'][-1]} tokens\n")
            print(markdown_table(summary_rows(res)))
            print()
        write_json(saved | {"runs": dict(runs)}, out / "state.json")
        remove_partial(out / "state.partial.pt")
        remove_partial(out / "state-none.partial.pt")
        pngs = plot_state_statistics(runs if len(runs) > 1 else result, out, args.train_length)
        print(f"wrote {out / 'state.json'} and {len(pngs)} PNGs in {out}")
        return result


if __name__ == "__main__":
    main()
