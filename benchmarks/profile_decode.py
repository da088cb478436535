"""Where a decode step's time goes: the kernels of one greedy step of a 130M model, and the graph's step time.

The step is the one `zoo.decode.GraphDecoder` captures (`StaticDecoder`, run eagerly here so that the profiler
sees every kernel): after a --prompt-len prefill, --steps steps run under torch.profiler. Printed and written:
kernels per step, device time per step (the sum of kernel times: what a CUDA graph cannot remove), the top
kernels by device time, and the same step replayed from a CUDA graph (CUDA events over --steps replays), so that
"graph ms - kernel ms" is what is left between kernels.

    python benchmarks/profile_decode.py --models mamba transformerpp --batches 1,64
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import batch_list, build, cap_fla_autotuning, time_decode  # noqa: E402

from zoo.decode import GraphDecoder, StaticDecoder, prefill  # noqa: E402


def graph_ms(model, prompt, steps: int) -> float:
    """ms per step of the step replayed from a CUDA graph (generate.py's timing, after 4 warm-up steps)."""
    return time_decode(GraphDecoder(model, prefill(model, prompt), max_new_tokens=steps + 8), steps, 4)


def profile(model, prompt, steps: int, top: int) -> tuple[str, dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    decoder = StaticDecoder(model, prefill(model, prompt), max_new_tokens=steps + 8)
    decoder.decode(3)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.decode(steps)
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.time_range.elapsed_us()
            count[e.name] += 1
    kernels = sum(count.values()) / steps
    device_us = sum(total.values()) / steps
    lines = [f"  kernels/step {kernels:.0f}, device time/step {device_us:.1f} us"]
    for name in sorted(total, key=total.get, reverse=True)[:top]:
        lines.append(f"  {total[name] / steps:9.1f} us  x{count[name] / steps:5.1f}  {name[:150]}")
    return "\n".join(lines), {"kernels_per_step": kernels, "device_us_per_step": device_us}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mamba", "transformerpp"])
    p.add_argument("--batches", type=batch_list, default="1,64")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--fla-autotune-configs", type=int, default=2,
                   help="as benchmarks/generate.py: fla's autotuners (GLA's prefill) try only their first N configs "
                        "(0: all); uncapped, the GLA profile outlasted its device call")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/profile_decode.py needs a CUDA GPU")
    cap_fla_autotuning(args.models, args.fla_autotune_configs)
    report = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, prompt {args.prompt_len}"]
    for name in args.models:
        model = build(name, torch.bfloat16, torch.device("cuda"))
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch, args.prompt_len),
                                   generator=g).cuda()
            text, stats = profile(model, prompt, args.steps, args.top)
            ms = graph_ms(model, prompt, 64)
            head = (f"{name} B={batch}: graph {ms * 1e3:.1f} us/step, kernels {stats['device_us_per_step']:.1f} "
                    f"us/step ({stats['kernels_per_step']:.0f} kernels); between kernels "
                    f"{ms * 1e3 - stats['device_us_per_step']:.1f} us")
            report += [head, text]
            print(head, "\n" + text, flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
