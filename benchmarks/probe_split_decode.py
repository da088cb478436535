"""Probe: decode a batch as k independent micro-batches whose CUDA-graph steps run concurrently on k streams.

At batch 64 a 130M recurrent model's decode step is a chain of small latency-bound kernels (~27 us per Mamba layer
against a ~5 us byte floor). Its rows are independent, so the batch can be split into k micro-batches, each with
its own cache and its own captured step, and the k steps replayed on k streams at once: one chain's kernels fill
the SMs the other's leave idle while they wait. This probe times, for each model, the whole batch in one graph
against the same batch split k ways (separate graphs on k streams, and one graph forking into k branches), and
checks the split decode gives the unsplit decode's tokens.

    python benchmarks/probe_split_decode.py --models mamba transformerpp --batch 64 --splits 2,4
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

from zoo.decode import GraphDecoder, StaticDecoder, prefill  # noqa: E402


def timed(step, n_tokens: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n_tokens):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n_tokens


def fork_join(streams, calls) -> None:
    """Run each call on its own stream after the current stream's work, and make the current stream wait for all."""
    cur = torch.cuda.current_stream()
    for s, call in zip(streams, calls):
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            call()
    for s in streams:
        cur.wait_stream(s)


def streams_step(decoders, streams):
    """A step of k decoders, each replaying its own graph on its own stream."""
    return lambda: fork_join(streams, [d.step for d in decoders])


def fork_graph(decoders: list[StaticDecoder]):
    """One CUDA graph whose k branches are the k micro-batches' steps."""
    streams = [torch.cuda.Stream() for _ in decoders]
    saved = [GraphDecoder._snapshot(d) for d in decoders]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for d, s in zip(decoders, saved):
            d._step_body()
            GraphDecoder._restore(d, s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fork_join(streams, [d._step_body for d in decoders])
    for d, s in zip(decoders, saved):
        GraphDecoder._restore(d, s)

    def step():
        graph.replay()
        for d in decoders:
            d.state.cache.seen_tokens += 1
            for layer in d.static:
                layer.seen += 1
    return step, decoders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mamba", "transformerpp"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--splits", type=sizes, default="2,4", help="micro-batches k, comma-separated")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_split_decode.py needs a CUDA GPU")
    room = 3 * (args.warmup + args.new_tokens) + 16  # the whole decode and three timings per split
    for name in args.models:
        model = build(name, torch.bfloat16, torch.device("cuda"))
        vocab = model.get_input_embeddings().num_embeddings
        prompt = torch.randint(0, vocab, (args.batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(1)).cuda()
        whole = GraphDecoder(model, prefill(model, prompt), max_new_tokens=room)
        ref_tokens = whole.decode(8)
        ms = timed(whole.step, args.new_tokens, args.warmup)
        row = {"model": name, "batch": args.batch, "whole_ms": ms}
        del whole
        for k in args.splits:
            parts = prompt.chunk(k)
            decs = [GraphDecoder(model, prefill(model, part), max_new_tokens=room) for part in parts]
            tokens = torch.cat([d.decode(8) for d in decs])
            row[f"match_k{k}"] = (tokens == ref_tokens).float().mean().item()
            row[f"streams_k{k}_ms"] = timed(streams_step(decs, [torch.cuda.Stream() for _ in decs]),
                                            args.new_tokens, args.warmup)
            row[f"serial_k{k}_ms"] = timed(lambda decs=decs: [d.step() for d in decs], args.new_tokens, args.warmup)
            del decs
            decs = [StaticDecoder(model, prefill(model, part), max_new_tokens=room) for part in parts]
            step, _ = fork_graph(decs)
            row[f"fork_k{k}_ms"] = timed(step, args.new_tokens, args.warmup)
            del decs, step
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
