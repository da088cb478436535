"""The demo: train a tiny Jamba-style hybrid on multi-query associative recall, on CPU, in about a minute."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from zoo.config import ZooConfig
from zoo.data.synthetic import mqar_batch


@torch.no_grad()
def recall_accuracy(model, batch: dict[str, torch.Tensor]) -> float:
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="zoo demo", description=__doc__)
    p.add_argument("--config", default="configs/models/jamba-tiny.yaml",  # found from any directory: from_yaml
                   help="zoo model YAML, or a packaged model config's name (default configs/models/jamba-tiny.yaml)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="MQAR rows per step (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row (default 64)")
    p.add_argument("--n-kv", type=int, default=4, help="key-value pairs to recall per row (default 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="of the weights and the rows (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: at this size extra intra-op threads only add synchronization, and "
                        "beside other jobs on the same cores they stalled steps for seconds)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "n_kv", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 32:  # (torch's 'Overflow when unpacking long long' named no option)
        p.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if not 0 < args.lr < math.inf:  # (inf trained every step to a NaN loss)
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if 4 * args.n_kv > args.seq_len:  # (mqar_batch's own message named neither option, after the model was built)
        p.error(f"--n-kv {args.n_kv} needs --seq-len >= 4 * {args.n_kv} = {4 * args.n_kv} (the pairs, then a query "
                f"slot of two tokens per pair), got {args.seq_len}")

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a caller's (main() called from Python) setting, as it was


def _run(args) -> dict:
    from zoo.train import _aux_part

    torch.manual_seed(args.seed)
    config = ZooConfig.from_yaml(args.config)
    if args.n_kv > config.vocab_size // 2 - 1:  # keys are the lower half of the model's vocabulary, 0 left out
        raise ValueError(f"--n-kv {args.n_kv}: {args.config}'s vocab_size {config.vocab_size} holds "
                         f"{config.vocab_size // 2 - 1} keys; give --n-kv {config.vocab_size // 2 - 1} or less")
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {Path(args.config).stem}: {n_params / 1e6:.2f}M parameters, layers {config.layers!r}")
    task = dict(seq_len=args.seq_len, n_kv=args.n_kv, vocab_size=config.vocab_size)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = mqar_batch(256, generator=torch.Generator().manual_seed(10_000 + args.seed), **task)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.eval()
    start_acc = recall_accuracy(model, held_out)
    model.train()
    losses, t0 = [], time.time()
    bar = tqdm(range(args.steps), desc=f"demo: {Path(args.config).stem} on MQAR", dynamic_ncols=True)
    for step in bar:
        batch = mqar_batch(args.batch_size, generator=gen, **task)
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        # the cross entropy alone: an MoE model's (the default Jamba-style's) loss adds coef · its load-balancing loss
        aux = _aux_part(model, out, 1)
        losses.append((out.loss.detach() - aux if aux is not None else out.loss).item())
        if step % 25 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            tqdm.write(f"step {step:4d}  loss {losses[-1]:.4f}")
    model.eval()
    end_acc = recall_accuracy(model, held_out)
    window = max(1, min(20, len(losses) // 2))  # the first and last steps' mean loss, windows apart when they can be
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"loss {first:.3f} -> {last:.3f} in {time.time() - t0:.0f}s; "
          f"MQAR recall accuracy {start_acc:.1%} -> {end_acc:.1%}")
    return {"first_loss": first, "last_loss": last, "start_acc": start_acc, "end_acc": end_acc}


if __name__ == "__main__":
    main()
