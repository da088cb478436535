"""Probe (issue 9): one decode step of the batch split into k row groups whose steps run side by side on k streams
of one CUDA graph, against the whole batch's step, for the 130M models at batch 64 after a 2K prompt.

A batch-64 Mamba step is a chain of latency-bound kernels (a layer's add_norm, in_proj, fused step and out_proj
each wait on the one before); two half-batch chains on two streams can fill each other's gaps. Each group is
prefilled on its own rows and decoded by its own `StaticDecoder` (the step GraphDecoder captures); the probe
captures the k steps in one graph, forked from the capturing stream and joined back, and times replays with CUDA
events. Timing only: the tokens are not compared here.

    python benchmarks/probe_split_streams.py --models mamba jamba transformerpp --splits 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ceilings import sizes  # noqa: E402
from generate import build  # noqa: E402

from zoo.decode import StaticDecoder, prefill  # noqa: E402


def split_graph(model, prompt: torch.Tensor, k: int, steps: int, warmup: int = 2):
    """Capture the k row groups' steps on k streams of one graph; returns (graph, decoders)."""
    groups = prompt.chunk(k)
    decoders = [StaticDecoder(model, prefill(model, g), max_new_tokens=steps + warmup + 4) for g in groups]
    streams = [torch.cuda.Stream() for _ in decoders]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for d in decoders:
                d._step_body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        main = torch.cuda.current_stream()
        for s, d in zip(streams, decoders):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                d._step_body()
        for s in streams:
            main.wait_stream(s)
    return graph, decoders


def time_graph(graph, steps: int) -> float:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mamba", "jamba", "transformerpp"])
    p.add_argument("--splits", type=sizes, default="1,2,4", help="micro-batches k, comma-separated")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--state-dtype", default="model")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_split_streams.py needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    for name in args.models:
        model = build(name, torch.bfloat16, device, args.state_dtype)
        gen = torch.Generator().manual_seed(1234)
        prompt = torch.randint(0, 50280, (args.batch, args.prompt_len), generator=gen).to(device)
        for k in args.splits:
            graph, decoders = split_graph(model, prompt, k, args.steps + 8)
            ms = time_graph(graph, args.steps)
            row = {"model": name, "batch": args.batch, "prompt_len": args.prompt_len, "splits": k, "ms": round(ms, 4)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del graph, decoders
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
