"""The card's ceilings, measured in the same run as the figures they bound.

Each benchmark's floor is max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) with both rates read off the
present card at start-up (a 1 GiB device-to-device copy, read + write counted; an 8192³ bf16 matmul on random
data), so that a figure taken on an H200 is not bounded by an H100's numbers. About a second per process.
"""

from __future__ import annotations

import functools
import json

import torch
import triton


@functools.cache
def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    x = torch.empty(1 << 28, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=50, return_mode="median")
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


@functools.cache
def bf16_matmul_rate() -> float:
    """FLOP/s of an 8192³ bf16 matmul on random data."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def floor_ms(nbytes: float, flops: float = 0.0) -> float:
    """The physical floor of work moving `nbytes` through HBM and doing `flops` bf16 FLOPs, in ms."""
    return max(nbytes / copy_bandwidth(), flops / bf16_matmul_rate() if flops else 0.0) * 1e3


def describe() -> str:
    return f"copy {copy_bandwidth() / 1e12:.2f} TB/s, bf16 matmul {bf16_matmul_rate() / 1e12:.0f} TFLOP/s"


def append_rows(path: str | None, rows: list[dict]) -> None:
    """Append a benchmark's rows to `path` (JSON lines; benchmarks/results.jsonl), if a path is given."""
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def graph_ms(fn, rep: int = 30) -> float:
    """Median ms of fn replayed in a CUDA graph (triton's do_bench_cudagraph), after one warm call."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
