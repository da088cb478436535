"""Where a training step's time goes: torch.profiler over a few optimizer steps of one model.

One micro-batch of random tokens (packed into documents with seq_idx, as the trainer's rows are), bf16
autocast on CUDA (fp32 on CPU), loss on every position, fused AdamW on CUDA, grad clip 1.0: the trainer's
step without its data pipeline. After --warmup steps, --steps steps run under the profiler; the top kernels
by device time (self CPU time on a CPU) are printed and written, and every kernel is put in a coarse class
(matmul, attention, scan, conv, norm/elementwise, loss, optimizer, other) to say what bounds the step.

    python benchmarks/profile_step.py --model mamba --seq-len 2048 --micro-batch 8
    python benchmarks/profile_step.py --model configs/models/jamba-130m.yaml --seq-len 16384 --micro-batch 1 \
        --out $OUT/profile_jamba_16k.txt --trace $OUT/jamba_16k.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = [  # first match wins; patterns over lower-case kernel / op names
    ("attention", r"flash|fmha|cudnn.*attn|attention|sdpa|efficient_attention"),
    ("scan", r"selective_scan|ssd|chunk_|scan_|state_pass|gla"),
    ("conv", r"conv1d|causal_conv"),
    ("matmul", r"gemm|sm90_xmma|cutlass|ampere_.*_tn|aten::mm|aten::addmm|aten::bmm|matmul|nvjet"),
    ("loss", r"cross_entropy|_ce_fwd|_ce_bwd|log_softmax|nll_loss|softmax"),
    ("optimizer", r"adam|multi_tensor|foreach|clip|norm_kernel|l2norm"),
    ("norm/elementwise", r"elementwise|vectorized|reduce|rms|mul|add|silu|sigmoid|exp|copy|cat|fill|where|index"),
]


def classify(name: str) -> str:
    low = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, low):
            return label
    return "other"


def model_config(name: str):
    import zoo

    path = Path(name)
    if not path.is_file():
        path = ROOT / "configs" / "models" / f"{name}-130m.yaml"
    if not path.is_file():
        raise SystemExit(f"profile_step: no model config {name!r} (a YAML path or a family name)")
    return zoo.ZooConfig.from_yaml(path)


def packed_batch(batch: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0) -> dict:
    """Random tokens cut into documents of 128..seq_len/2 tokens (seq_idx per row, positions restart)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    seq_idx = torch.zeros(batch, seq_len, dtype=torch.int32)
    pos = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        start, doc = 0, 0
        while start < seq_len:
            n = int(torch.randint(128, max(129, seq_len // 2), (1,), generator=g))
            seq_idx[b, start:start + n] = doc
            pos[b, start:start + n] = torch.arange(min(n, seq_len - start))
            start, doc = start + n, doc + 1
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "labels": ids.clone(), "seq_idx": seq_idx, "position_ids": pos}.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mamba", help="family name (its 130M config) or a model YAML")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--trace", default=None, help="write a Chrome trace (JSON) here")
    p.add_argument("--time-only", action="store_true",
                   help="no profiler: time --steps steps (one device sync at the end) and print ms per step")
    args = p.parse_args(argv)
    for flag, value, least in (("--seq-len", args.seq_len, 2), ("--micro-batch", args.micro_batch, 1),
                               ("--warmup", args.warmup, 0), ("--steps", args.steps, 1), ("--top", args.top, 1)):
        if value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args.model)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = packed_batch(args.micro_batch, args.seq_len, model.config.vocab_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if args.time_only:  # the step's own wall time, no profiler: compare with the profiler's device time
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3
        tokens = args.micro_batch * args.seq_len
        print(f"{args.model}: {wall_ms:.1f} ms per step ({tokens / wall_ms * 1e3:,.0f} tokens/s), no profiler")
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    if args.trace:
        prof.export_chrome_trace(args.trace)

    on_device = device.type == "cuda"
    events = [e for e in prof.key_averages()]
    if on_device:  # the device's own events (kernels, copies) only: an op or autograd Function on the CPU side
        # (aten::*, _SelectiveScanFn, ...) reports the time of the kernels it launched, which would count them twice
        rows = [(e.key, e.self_device_time_total / 1e3 / args.steps, e.count // args.steps) for e in events
                if e.self_device_time_total > 0 and getattr(e, "device_type", None) != DeviceType.CPU]
    else:
        rows = [(e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps) for e in events
                if e.key.startswith("aten::")]
    rows.sort(key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in rows)
    by_class: dict[str, float] = defaultdict(float)
    launches = 0
    for name, ms, count in rows:
        by_class[classify(name)] += ms
        launches += count
    tokens = args.micro_batch * args.seq_len
    kind = "device" if on_device else "CPU (self)"
    lines = [f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
             f"{args.micro_batch} x {args.seq_len} tokens, {torch.cuda.get_device_name() if on_device else 'CPU'}",
             f"wall {wall_ms:.1f} ms per step ({tokens / wall_ms * 1e3:,.0f} tokens/s); {kind} time "
             f"{total:.1f} ms per step in {launches} {'kernels' if on_device else 'ops'}",
             "", "| class | ms per step | share |", "| --- | --- | --- |"]
    for label, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {ms:.2f} | {ms / max(total, 1e-9):.0%} |")
    lines += ["", f"| top {args.top} | class | ms per step | calls per step |", "| --- | --- | --- | --- |"]
    for name, ms, count in rows[:args.top]:
        short = name if len(name) < 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {classify(name)} | {ms:.3f} | {count} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
