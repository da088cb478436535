"""Benchmark: the Mamba selective scan with its rows cut into S segments (zoo_kernels.selective_scan, seq_split).

The CUDA kernel runs one block per 16 channels and row; at batch 1 a 130M layer fills 96 blocks, fewer than the
card has multiprocessors, each walking the whole row. seq_split=S runs S segments per row in parallel
(zoo_kernels/selective_scan/split.py: Triton passes for the segment boundary states and adjoints, then one
kernel fwd and one bwd over the segment rows). This times S = 1 (the unsplit kernel: the baseline, same run),
2, 4, 8 and 16 at the shapes of a training step, bf16
with D, z, Δ-bias and softplus, forward and forward+backward, and the floor of benchmarks/selective_scan.py (the
larger of the bytes over the copy bandwidth and the exponentials over the ex2 rate, both measured at start: the
exponentials bind at these shapes). The printed |split - unsplit| is
near 0 here because these random decays forget a segment's worth of state; correctness is the tests'
(tests/test_scan_split.py, tests/test_kernel_refs.py, tests/test_selective_scan_cuda.py). Rows: ".../S=1" for
the unsplit kernel and ".../split/S=k" for the split (results.jsonl's ".../S=k", k > 1, are the earlier two-pass
split, removed since); every row has "scheme".

    python benchmarks/scan_split.py [--out benchmarks/results.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import triton
from ceilings import copy_bandwidth, describe  # benchmarks/ceilings.py (the script's folder is on sys.path)
from selective_scan import ex2_rate
from selective_scan import floors as scan_floors

SHAPES = [  # (label, batch, length, channels)
    ("130M B=1 L=16384", 1, 16384, 1536),
    ("370M B=1 L=16384", 1, 16384, 2048),
    ("130M B=2 L=8192", 2, 8192, 1536),
    ("130M B=8 L=2048", 8, 2048, 1536),
]
SPLITS = [1, 2, 4, 8, 16]


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results.jsonl")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("scan_split.py needs a CUDA GPU")
    import importlib

    ss = importlib.import_module("zoo_kernels.selective_scan")
    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    command = "python " + " ".join(sys.argv)
    ex2, ex2_how = ex2_rate()
    print(f"{card}: {describe()}, ex2 {ex2 / 1e12:.2f} T/s ({ex2_how})", flush=True)
    for label, batch, length, dim in SHAPES:
        times = time_shape(ss, label, batch, length, dim)
        shape_floors = floors(batch, length, dim, ex2)
        base = times["unsplit", 1]
        for (scheme, split), (t_f, t_fb) in times.items():
            for what, ours, base_ms, floor in (("fwd", t_f, base[0], shape_floors[0]),
                                                  ("fwd+bwd", t_fb, base[1], shape_floors[1])):
                row = {
                    "name": f"scan_split {what} {label}/{'split/' if scheme == 'split' else ''}S={split}",
                    "card": card, "date": date,
                    "command": command, "ours_ms": round(ours, 4), "baseline": "unsplit kernel (S=1), same run",
                    "baseline_ms": round(base_ms, 4), "ratio": round(base_ms / ours, 3), "floor_ms": round(floor, 4),
                    "seq_split": split, "scheme": scheme,
                    "shape": {"batch": batch, "L": length, "D": dim, "N": 16, "dtype": "bf16"},
                }
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        print(" | ".join(f"{k[0]} S={k[1]}: {v[0]:.3f}/{v[1]:.3f} ms" for k, v in times.items()), flush=True)
        torch.cuda.empty_cache()


def floors(batch, length, dim, ex2) -> tuple[float, float]:
    """(fwd, fwd+bwd) floors in ms of one shape: selective_scan.py's, so that the two benchmarks of one kernel give
    one floor. Bytes alone put it under the exponentials' time (on the H200 at 130M B=8 L=2048: 0.048 against
    0.097 ms forward, 0.131 against 0.194 forward+backward)."""
    return scan_floors(batch, length, dim, copy_bandwidth(), ex2)


def time_shape(ss, label, batch, length, dim):
    """{(scheme, split): (fwd ms, fwd+bwd ms)} of one shape."""
    N, bf = 16, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    u, z = rnd(batch, dim, length).to(bf), rnd(batch, dim, length).to(bf)
    delta = (rnd(batch, dim, length) - 2).to(bf)
    B, C = rnd(batch, N, length).to(bf), rnd(batch, N, length).to(bf)
    A = -torch.exp(rnd(dim, N) * 0.5)
    D, bias = rnd(dim), rnd(dim) * 0.1
    leaves = [t.requires_grad_(True) for t in (u, delta, B, C, z)]
    dy = rnd(batch, dim, length).to(bf)

    from zoo_kernels.selective_scan.split import split_scan

    def fwd(scheme, split):
        if scheme == "split":  # called directly, as selective_scan's seq_split does
            return split_scan("cuda", split, u, delta, A, B, C, D, z, bias, True, None, None, False)
        return ss.selective_scan(u, delta, A, B, C, D, z, bias, True, backend="cuda", seq_split=1)

    times = {}
    for split in SPLITS:
        if length % (split * 64) or (split > 1 and length // split < 256):
            continue
        for scheme in ("unsplit",) if split == 1 else ("split",):
            with torch.no_grad():
                t_f = bench(lambda scheme=scheme, split=split: fwd(scheme, split))
            t_fb = bench(lambda scheme=scheme, split=split: torch.autograd.grad(fwd(scheme, split), leaves, dy))
            times[scheme, split] = (t_f, t_fb)
            if split != 1:
                with torch.no_grad():
                    err = (fwd(scheme, split).float() - fwd("unsplit", 1).float()).abs().max().item()
                print(f"{label} {scheme} S={split}: max |split - unsplit| = {err:.3g}", flush=True)
    return times


if __name__ == "__main__":
    main()
