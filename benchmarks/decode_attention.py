"""Benchmark: single-query decode attention over a static KV buffer (zoo_kernels.attention.decode) — the per-head
split kernel against the grouped one (a program per KV head), over splits and launch configurations.

For each shape (B, S, H, Hkv, D), with --length visible keys (bf16 by default), every variant is timed inside a
CUDA graph (`triton.testing.do_bench_cudagraph`, median), the way a graph-captured decode step runs it:
the per-head kernel over splits x block_n x num_warps (its num_stages left to Triton), the grouped kernel over
those x num_stages. The captured calls cycle through copies of the keys and values that together hold at least
three times the L2 cache, so that a small batch reads them from HBM as a decode step does (where the other layers'
weights and caches pass through L2 between two calls of one layer), not from L2. Configurations that resolve to
the same launch (splits=auto and the number it picks, splits that round to the same chunks) are timed once.

Each variant's output is checked against `reference` (fp32 torch) first: the max abs error is printed, and one
whose relative error ‖o - ref‖ / ‖ref‖ is over --tol is flagged and not ranked; a configuration that does not
build or launch (shared memory, registers) is reported and skipped. The floor is the K and V bytes of the visible
keys over the copy bandwidth measured in the same run (benchmarks/ceilings.py); "floor/time" is the fraction of
it reached. Kernels compile first in --jobs worker processes (they fill Triton's cache; the sweep then loads
them): the full grid builds about 130 kernels, at 0.3-0.7 s each for sm_90 on one CPU core.

Rows (--out, JSON lines in benchmarks/results.jsonl's format), one per timed variant, name
decode_attention/<shape>/<variant>: ours_ms, baseline = the per-head kernel at its defaults (auto splits),
baseline_ms (timed in the same run), ratio = baseline_ms / ours_ms, floor_ms; --keep limits them to the fastest N
per kernel and shape (appending a whole sweep to results.jsonl would put every variant into RESULTS.md).

    python benchmarks/decode_attention.py                           # the full grid (meant to fit in 2 min on an H200)
    python benchmarks/decode_attention.py --quick --out benchmarks/results.jsonl --keep 3
    python benchmarks/decode_attention.py --shapes 64,2176,12,4,64 --kernels grouped
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import torch
import triton
from ceilings import (  # benchmarks/ceilings.py (the script's folder is on sys.path)
    copy_bandwidth,
    floor_ms,
    rows_kept_on_interrupt,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))

from zoo_kernels.attention.decode import chunking, decode_attention, reference, splits_for  # noqa: E402

# (B, S, H, Hkv, D): the 130M Transformer++ (12 heads of 64) and Jamba (12 query heads, 4 KV heads) after a 2K
# prompt (2100 keys in a 2176-slot buffer) at batch 64, 16 and 1, and heads of 128
SHAPES = [(64, 2176, 12, 12, 64), (64, 2176, 12, 4, 64), (16, 2176, 12, 12, 64), (1, 2176, 12, 12, 64),
          (64, 2176, 16, 16, 128)]
GRID = {"splits": ["auto", 1, 2, 4, 8, 16], "block_n": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}
QUICK = {"splits": ["auto", 1, 4, 16], "block_n": [64, 128], "num_warps": [4, 8], "num_stages": [2, 3]}
KERNELS = ("per_head", "grouped")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


BASELINE = ("per_head", "auto", None, None, None)  # the per-head kernel at its defaults (the default before)


def variants(kernels, grid: dict) -> list[tuple]:
    """(kernel, splits asked, block_n, num_warps, num_stages) of the sweep; the per-head kernel's stages stay
    Triton's (its loop is not pipelined)."""
    return [(kernel, *launch) for kernel in kernels
            for launch in itertools.product(grid["splits"], grid["block_n"], grid["num_warps"],
                                            grid["num_stages"] if kernel == "grouped" else [None])]


def wanted_splits(kernel: str, asked, shape, sms: int) -> int:
    """The splits decode_attention asks for with `asked` (auto: splits_for over the kernel's programs)."""
    B, S, H, Hkv, _ = shape
    return splits_for(B * (Hkv if kernel == "grouped" else H), S, sms) if asked == "auto" else asked


def call(kernel: str, q, keys, values, length, window, asked, block_n, num_warps, num_stages):
    return decode_attention(q, keys, values, length, window, splits=None if asked == "auto" else asked,
                            grouped=kernel == "grouped", block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def _warm(jobs: list[tuple]) -> None:
    """Worker: builds (compiles, launches once) each (shape, dtype, window, kernel, splits, launch) at batch 1 —
    the kernels' arguments and their specialization do not depend on the batch — so that Triton's on-disk cache
    holds them when the sweep asks; failures are left for the sweep to report."""
    for (S, H, Hkv, D), dtype, window, kernel, splits, block_n, num_warps, num_stages in jobs:
        q = torch.randn(1, 1, H, D, device="cuda").to(DTYPES[dtype])
        keys = torch.randn(1, S, Hkv, D, device="cuda").to(DTYPES[dtype])
        try:
            call(kernel, q, keys, keys, torch.tensor([S], device="cuda"), window, splits, block_n, num_warps,
                 num_stages)
        except Exception:  # noqa: BLE001 - the sweep reports it
            pass
    torch.cuda.synchronize()


def precompile(shapes, args, grid, sms: int) -> float:
    """Compiles every launch of the sweep in args.jobs processes; returns the seconds it took."""
    t0 = time.perf_counter()
    todo = sorted({((S, H, Hkv, D), args.dtype, args.window, kernel,
                    wanted_splits(kernel, asked, (B, S, H, Hkv, D), sms), bn, warps, stages)
                   for B, S, H, Hkv, D in shapes
                   for kernel, asked, bn, warps, stages in [BASELINE, *variants(args.kernels, grid)]}, key=str)
    chunks = [todo[i::args.jobs] for i in range(args.jobs)]
    try:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            list(pool.map(_warm, chunks))
    except Exception as e:  # noqa: BLE001 - the sweep then compiles as it goes
        print(f"precompilation failed ({type(e).__name__}: {e}); compiling during the sweep", flush=True)
    return time.perf_counter() - t0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def shape_name(shape, length: int, window) -> str:
    B, S, H, Hkv, D = shape
    return f"B{B}_S{S}_H{H}_KV{Hkv}_D{D}_L{length}" + (f"_W{window}" if window else "")


def variant_name(key: tuple, asked: list) -> str:
    kernel, _, _, block_n, num_warps, num_stages = key
    return (f"{kernel}-splits_{'_'.join(map(str, asked))}-n{block_n}-w{num_warps}"
            + ("" if num_stages is None else f"-st{num_stages}"))


def sweep_shape(shape, args, grid, sms: int, card: str) -> list[dict]:
    """Checks and times every variant of one shape; prints its table and returns its rows."""
    B, S, H, Hkv, D = shape
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 1, H, D, device="cuda", generator=gen).to(dtype)
    keys = torch.randn(B, S, Hkv, D, device="cuda", generator=gen).to(dtype)
    values = torch.randn(B, S, Hkv, D, device="cuda", generator=gen).to(dtype)
    length = torch.tensor([args.length], device="cuda")
    ref = reference(q, keys, values, args.length, args.window)
    visible = min(args.length, args.window) if args.window else args.length
    nbytes = 2 * B * visible * Hkv * D * keys.element_size()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    copies = min(64, max(1, math.ceil(3 * l2 / nbytes)))
    kv = [(keys, values)] + [(keys.clone(), values.clone()) for _ in range(copies - 1)]
    floor = floor_ms(nbytes)

    def measure(kernel, asked, block_n, num_warps, num_stages) -> dict:
        """Max abs and relative error against the reference, then the median ms in a graph; or the error."""
        try:
            o = call(kernel, q, keys, values, length, args.window, asked, block_n, num_warps, num_stages)
            out = {"max_abs_err": (o.float() - ref.float()).abs().max().item(), "rel_err": rel_err(o, ref)}
            turn = itertools.cycle(kv)

            def step():
                k, v = next(turn)
                call(kernel, q, k, v, length, args.window, asked, block_n, num_warps, num_stages)

            out["ms"] = triton.testing.do_bench_cudagraph(step, rep=args.rep, return_mode="median")
            return out
        except Exception as e:  # noqa: BLE001 - a launch Triton cannot build is reported, not fatal
            torch.cuda.synchronize()
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}

    t0 = time.perf_counter()
    base = measure(*BASELINE)
    if "ms" not in base:
        raise RuntimeError(f"{shape}: the per-head kernel at its defaults failed: {base}")
    results = {}  # (kernel, chunk, splits run, block_n, num_warps, num_stages) -> (splits asked, measurement)
    for kernel, asked, block_n, num_warps, num_stages in variants(args.kernels, grid):
        key = (kernel, *chunking(S, wanted_splits(kernel, asked, shape, sms), block_n), block_n, num_warps,
               num_stages)
        if key in results:
            results[key][0].append(asked)
        else:
            results[key] = ([asked], measure(kernel, asked, block_n, num_warps, num_stages))

    ok = sorted(((k, a, r) for k, (a, r) in results.items() if "ms" in r and r["rel_err"] <= args.tol),
                key=lambda x: x[2]["ms"])
    bad = [(k, a, r) for k, (a, r) in results.items() if "ms" in r and r["rel_err"] > args.tol]
    failed = [(k, a, r) for k, (a, r) in results.items() if "ms" not in r]
    name = shape_name(shape, args.length, args.window)
    print(f"\n== {name}: {len(results)} launches in {time.perf_counter() - t0:.1f} s; floor {floor * 1e3:.1f} us "
          f"({nbytes / 1e6:.0f} MB of K+V), per-head defaults {base['ms'] * 1e3:.1f} us ({floor / base['ms']:.0%} "
          f"of the floor); {copies} KV cop{'y' if copies == 1 else 'ies'} against L2", flush=True)
    print(f"{'rank':>4} {'us':>8} {'floor/time':>10} {'vs base':>8}  {'kernel':8} {'splits asked':>14} "
          f"{'run':>4} {'block_n':>7} {'warps':>5} {'stages':>6} {'max abs err':>11}")
    for rank, ((kernel, _, run, bn, warps, stages), asked, r) in enumerate(ok[:args.show], 1):
        print(f"{rank:>4} {r['ms'] * 1e3:8.1f} {floor / r['ms']:10.0%} {base['ms'] / r['ms']:7.2f}x  {kernel:8} "
              f"{','.join(map(str, asked)):>14} {run:>4} {bn:>7} {warps:>5} {stages or '-':>6} "
              f"{r['max_abs_err']:11.2e}")
    if len(ok) > args.show:
        print(f"     ... {len(ok) - args.show} slower launches (--show)")
    for key, asked, r in bad:
        print(f"  WRONG (relative error {r['rel_err']:.2e} > {args.tol:g}, max abs err {r['max_abs_err']:.2e}): "
              f"{variant_name(key, asked)} {r['ms'] * 1e3:.1f} us")
    for key, asked, r in failed:
        print(f"  FAILED: {variant_name(key, asked)}: {r['error']}")

    common = {"card": card, "date": date.today().isoformat(), "command": shlex.join(["python", *sys.argv]),
              "torch": torch.__version__, "triton": triton.__version__,
              "shape": {"B": B, "S": S, "H": H, "Hkv": Hkv, "D": D, "length": args.length, "window": args.window,
                        "dtype": args.dtype},
              "baseline": "per_head kernel at its defaults (auto splits)", "baseline_ms": round(base["ms"], 5),
              "ratio_is": "baseline_ms / ours_ms (> 1: faster than the per-head kernel's defaults)",
              "floor_ms": round(floor, 5)}
    timed_note = (f"inside a CUDA graph (do_bench_cudagraph, median); {copies} KV copies cycled against L2; "
                  f"floor = K+V bytes of the visible keys / copy bandwidth")

    def row(key, asked, r, rank, note) -> dict:
        kernel, _, run, bn, warps, stages = key
        return {"name": f"decode_attention/{name}/{variant_name(key, asked)}", **common, "kernel": kernel,
                "rank": rank, "config": {"splits_asked": asked, "splits": run, "block_n": bn, "num_warps": warps,
                                         "num_stages": stages},
                "ours_ms": round(r["ms"], 5) if "ms" in r else None,
                "ratio": round(base["ms"] / r["ms"], 3) if rank else None,
                "floor_fraction": round(floor / r["ms"], 3) if rank else None,
                "max_abs_err": r.get("max_abs_err"), "rel_err": r.get("rel_err"), "note": note}

    rows, kept = [], dict.fromkeys(args.kernels, 0)
    for rank, (key, asked, r) in enumerate(ok, 1):
        if not args.keep or kept[key[0]] < args.keep:
            kept[key[0]] += 1
            rows.append(row(key, asked, r, rank, timed_note))
    rows += [row(key, asked, r, None, f"wrong: relative error {r['rel_err']:.2e} > {args.tol:g}")
             for key, asked, r in bad]
    rows += [row(key, asked, r, None, f"did not run: {r['error']}") for key, asked, r in failed]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES],
                   help="B,S,H,Hkv,D each (default: the five of the sweep)")
    p.add_argument("--length", type=int, default=2100, help="visible keys (slots [0, length) of S)")
    p.add_argument("--window", type=int, default=None, help="sliding window (default: none)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--kernels", nargs="*", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--quick", action="store_true",
                   help=f"the smaller grid {QUICK} instead of {GRID}")
    p.add_argument("--rep", type=float, default=5.0, help="ms of kernel time per timed graph replay")
    p.add_argument("--tol", type=float, default=1e-2, help="largest relative error that ranks")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="compile worker processes (0: compile during the sweep)")
    p.add_argument("--show", type=int, default=25, help="table rows printed per shape")
    p.add_argument("--keep", type=int, default=0, help="rows written per kernel and shape, fastest first (0: all)")
    p.add_argument("--out", default=None, help="append the rows here (JSON lines)")
    args = p.parse_args()
    # checked before the CUDA check: int() of a bad item failed in a traceback on a GPU, and Hkv = 0 divided by zero
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    except ValueError:
        shapes = [()]
    if any(len(s) != 5 or min(s) < 1 or s[2] % s[3] or args.length > s[1] for s in shapes):
        sys.exit("--shapes: B,S,H,Hkv,D each >= 1, with H a multiple of Hkv and S >= --length")
    if args.window is not None and args.window < 1:
        sys.exit("--window: at least 1 (leave it out for none)")
    if not torch.cuda.is_available():
        sys.exit("decode_attention.py needs a CUDA GPU (it times the kernels inside CUDA graphs)")
    grid = QUICK if args.quick else GRID
    t0 = time.perf_counter()
    card = torch.cuda.get_device_name(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{card}: copy {copy_bandwidth() / 1e12:.2f} TB/s; {args.dtype}, {args.length} visible keys, "
          f"window {args.window}; grid {grid}", flush=True)
    if args.jobs > 0:
        print(f"compiled in {precompile(shapes, args, grid, sms):.1f} s ({args.jobs} processes)", flush=True)
    # Ctrl-C or SIGTERM: the shapes swept are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "decode_attention.py") as rows:
        for shape in shapes:
            rows += sweep_shape(shape, args, grid, sms, card)
    if args.out:
        print(f"\nwrote {len(rows)} rows to {args.out}")
    print(f"\nsweep took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
