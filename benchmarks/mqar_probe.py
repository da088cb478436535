"""Find an MQAR step budget and learning rate for a comparison's models (how configs/compare/130m.yaml's
eval.mqar was chosen): fresh copies, built exactly as `zoo compare` builds them, are trained on MQAR cells,
with the training loss every 25 steps and the recall accuracy at the end. Rows are appended to
OUT/mqar-probe.jsonl (OUT: the environment variable, else the working directory).

    python benchmarks/mqar_probe.py RUN [RUN ...] [--config C] [--budget-s S] [--batch-size B] [--device D]

RUN is name:vocab:seq_len:n_kv:lr:steps, name a model of the config, e.g.
    python benchmarks/mqar_probe.py transformerpp:8192:256:16:3e-4:500 mamba:8192:256:16:1e-3:500
Runs start while the whole probe is under --budget-s seconds; a run stops early once its loss is below 0.05.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="name:vocab:seq_len:n_kv:lr:steps")
    ap.add_argument("--config", default="configs/compare/130m.yaml")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("mqar_probe: needs a CUDA GPU (or --device cpu with a small --config)")
    if not args.runs:
        ap.error("give at least one run, name:vocab:seq_len:n_kv:lr:steps")
    runs = []
    for spec in args.runs:
        parts = spec.split(":")
        if len(parts) != 6:
            ap.error(f"run {spec!r}: expected name:vocab:seq_len:n_kv:lr:steps")
        runs.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), float(parts[4]), int(parts[5])))

    from zoo.compare import _autocast, _fresh_model, load_compare_config, resolve_models
    from zoo.data.synthetic import mqar_batch
    from zoo.eval.synthetic import evaluate_synthetic
    from zoo.train import build_optimizer

    cfg, folder = load_compare_config(args.config)
    entries = {e.name: e for e in resolve_models(cfg, folder)}
    unknown = {r[0] for r in runs} - set(entries)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; the config has {sorted(entries)}")
    out = Path(os.environ.get("OUT", ".")) / "mqar-probe.jsonl"
    dev = torch.device(args.device)
    t_all = time.time()
    for name, vocab, seq, nkv, lr, steps in runs:
        if time.time() - t_all > args.budget_s:
            break
        tcfg, model = _fresh_model(cfg, entries[name], cfg.recipe.get("data", {}).get("seq_len", seq),
                                   Path("/tmp/mqar-probe"), dev)
        opt = build_optimizer(model, dataclasses.replace(tcfg.optim, lr=lr))
        gen = torch.Generator().manual_seed(0)
        warm = max(1, steps // 10)  # linear warmup over 10%, cosine to lr / 10
        log, t0 = [], time.time()
        model.train()
        for step in range(steps):
            f = (step + 1) / warm if step < warm else \
                0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
            for group in opt.param_groups:
                group["lr"] = lr * f
            batch = mqar_batch(args.batch_size, seq, nkv, vocab, 0.01, generator=gen)
            with _autocast(dev):
                loss = model(**{k: v.to(dev) for k, v in batch.items()}).loss
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 25 == 24:
                log.append((step + 1, round(loss.item(), 3), round(time.time() - t0, 1)))
                print(name, vocab, seq, nkv, lr, log[-1], flush=True)
                if loss.item() < 0.05 or time.time() - t_all > args.budget_s:
                    break
        model.eval()
        with _autocast(dev):
            res = evaluate_synthetic(model, "mqar", [seq], [nkv], 256, 64, seed=1_000_003, vocab_size=vocab,
                                     power_a=0.01)
        acc = sum(r["n_correct"] for r in res["rows"]) / max(1, sum(r["n_answers"] for r in res["rows"]))
        rec = dict(name=name, vocab=vocab, seq=seq, nkv=nkv, lr=lr, steps=steps, log=log, acc=acc,
                   secs=round(time.time() - t0, 1))
        print(json.dumps(rec), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
