"""Find an MQAR step budget and learning rate for a comparison's models (how configs/compare/130m.yaml's
eval.mqar was chosen): each run is the comparison's own MQAR phase (zoo.compare.phase_mqar: a fresh copy built
as `zoo compare` builds it, warmup over 10% of the steps, cosine to lr / 10) on one MQAR cell, evaluated on
that cell. Rows, with the training-loss curve (50 points), accuracy and seconds, are appended to
OUT/mqar-probe.jsonl (OUT: the environment variable, else the working directory).

    python benchmarks/mqar_probe.py RUN [RUN ...] [--config C] [--budget-s S] [--batch-size B]

RUN is name:vocab:seq_len:n_kv:lr:steps, name a model of the config, e.g.
    python benchmarks/mqar_probe.py transformerpp:8192:256:16:3e-4:500 mamba:8192:256:16:1e-3:500
A run starts only while the whole probe is under --budget-s seconds. Without a GPU it runs on the CPU, e.g. how
many steps the demo's tiny models need (configs/compare/demo.yaml trains them 100):
    python benchmarks/mqar_probe.py --config configs/compare/demo.yaml --budget-s 3600 mamba:32:32:4:3e-3:2000
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="name:vocab:seq_len:n_kv:lr:steps")
    ap.add_argument("--config", default="configs/compare/130m.yaml")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():  # zoo.compare runs on CUDA when there is one, else here on the CPU
        print("mqar_probe: no CUDA GPU, running on the CPU (tiny configs such as configs/compare/demo.yaml)",
              file=sys.stderr)
    if not args.runs:
        ap.error("give at least one run, name:vocab:seq_len:n_kv:lr:steps")
    runs = []
    for spec in args.runs:
        parts = spec.split(":")
        if len(parts) != 6:
            ap.error(f"run {spec!r}: expected name:vocab:seq_len:n_kv:lr:steps")
        runs.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), float(parts[4]), int(parts[5])))

    from zoo.compare import MQARConfig, _device, _mqar_cell_error, load_compare_config, phase_mqar, resolve_models

    # before any run trains: a spec whose rows cannot be built (4 * n_kv > seq_len, more pairs than half the
    # vocabulary holds) ended the probe in a traceback at its first step, after the runs before it
    for spec, (_, vocab, seq, nkv, lr, steps) in zip(args.runs, runs):
        problem = _mqar_cell_error(seq, nkv, MQARConfig(vocab_size=vocab))
        if problem is None and not (steps >= 1 and lr > 0):
            problem = f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}"
        if problem is not None:
            ap.error(f"run {spec!r}: {problem}")

    cfg, folder = load_compare_config(args.config)
    if not torch.cuda.is_available() and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    entries = {e.name: e for e in resolve_models(cfg, folder)}
    unknown = {r[0] for r in runs} - set(entries)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; the config has {sorted(entries)}")
    out = Path(os.environ.get("OUT", ".")) / "mqar-probe.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)  # (a run ended in FileNotFoundError after its first model)
    seq_len = cfg.recipe.get("data", {}).get("seq_len", 2048)  # the length the comparison builds models for
    t_all = time.time()
    for name, vocab, seq, nkv, lr, steps in runs:
        if time.time() - t_all > args.budget_s:
            print(f"mqar_probe: --budget-s {args.budget_s:.0f} spent; {name} and later runs skipped", file=sys.stderr)
            break
        mqar = MQARConfig(steps=steps, batch_size=args.batch_size, seq_len=seq, n_kv=nkv, vocab_size=vocab, lr=lr,
                          warmup_steps=max(1, steps // 10), eval_samples=256)
        run_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, mqar=mqar))
        t0 = time.time()
        # a folder of its own: phase_mqar keeps its finished training there (for zoo compare to resume), and in one
        # shared folder a run of the same spec, in this probe or a later one, reused it instead of training
        with tempfile.TemporaryDirectory(prefix="mqar-probe-") as run_dir:
            res = phase_mqar(run_cfg, entries[name], seq_len, Path(run_dir), None, _device())
        rec = dict(name=name, vocab=vocab, seq=seq, nkv=nkv, lr=lr, steps=steps, train_losses=res["train_losses"],
                   final_train_loss=res["final_train_loss"], acc=res["accuracy"], secs=round(time.time() - t0, 1))
        print(json.dumps(rec), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
