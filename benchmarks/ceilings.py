"""The card's ceilings, measured in the same run as the figures they bound.

Each benchmark's floor is max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) with both rates read off the
present card at start-up (a 1 GiB device-to-device copy, read + write counted; an 8192³ bf16 matmul on random
data), so that a figure taken on an H200 is not bounded by an H100's numbers. About a second per process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's zoo and zoo_kernels (rows_kept_on_interrupt's)


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


def sizes(text: str) -> list[int]:
    """A comma list of sizes >= 1 as argparse's type (--batches, --rows): checked before the CUDA check, where int()
    of a bad item failed in a traceback after the card's ceilings were measured, and a 0 divided by zero."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of sizes >= 1 such as 1,16,64, got {text!r}")
    return values


def int_tuples(text: str, width: int, form: str) -> list[tuple[int, ...]]:
    """Comma-separated items of `width` integers >= 1 joined by ':' (d_inner:N:dt_rank, batch:rows) as argparse's
    type; `form` names the items in the error, e.g. "d_inner:N:dt_rank items such as 1536:16:48"."""
    try:
        items = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        items = []
    if not items or any(len(t) != width or min(t) < 1 for t in items):
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return items


def describe() -> str:
    return f"copy {copy_bandwidth() / 1e12:.2f} TB/s, bf16 matmul {bf16_matmul_rate() / 1e12:.0f} TFLOP/s"


def append_rows(path: str | None, rows: list[dict]) -> None:
    """Append a benchmark's rows to `path` (JSON lines; benchmarks/results.jsonl), if a path is given."""
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


@contextlib.contextmanager
def rows_kept_on_interrupt(path: str | None, prog: str) -> Iterator[list[dict]]:
    """A list for a benchmark's rows, appended to `path` (as `append_rows`) when the block ends, and also when Ctrl-C
    or `timeout`'s SIGTERM cuts it short: the rows measured before are written, each with a note saying the run was
    cut short, the benchmark says so in one line and exits with status 130 (the rows used to be written only after
    the last measurement, and an interruption lost them all, in a traceback)."""
    from zoo.eval.common import sigterm_interrupts  # (here: benchmarks that only read the ceilings skip zoo's import)

    rows: list[dict] = []
    with sigterm_interrupts(name_signal=True):
        try:
            yield rows
        except KeyboardInterrupt as e:
            cut = f"run interrupted ({str(e) or 'Ctrl-C'}) after {len(rows)} rows"
            for row in rows:
                row["note"] = "; ".join(x for x in (row.get("note"), cut) if x)
            append_rows(path, rows)
            kept = f"{len(rows)} rows appended to {path}" if path else "no --out: the rows are not written"
            print(f"\n{prog}: {cut}; {kept if rows else 'no rows to write'}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    append_rows(path, rows)


def graph_ms(fn, rep: int = 30) -> float:
    """Median ms of fn replayed in a CUDA graph (triton's do_bench_cudagraph), after one warm call."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
