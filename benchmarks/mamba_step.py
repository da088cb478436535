"""Benchmark: the fused Mamba-1 decode step (one launch) against the unfused step (three launches) it replaces.

The unfused step after in_proj is what the Mamba mixer ran before: the conv-update kernel, the x_proj GEMM (cuBLAS)
and the state-update kernel with dt_proj folded in. The fused kernel (zoo_kernels.selective_scan.fused_step) does
the three in one launch of 8-CTA clusters. Both are timed inside a CUDA graph (`triton.testing.do_bench_cudagraph`),
as a graph-captured decode step runs them, on the 130M shapes (d_inner 1536, N 16, dt_rank 48, width 4) by default,
in bf16; the fused kernel also launched without programmatic dependent launch (ZOO_MAMBA_STEP_PDL=0), and at every
rows per CTA that fits (ZOO_MAMBA_STEP_ROWS), with the number of resident clusters the occupancy API allows for it.
Where the kernel's rule (one wave of clusters) finds no rows per CTA the mixer runs the unfused step: `ours_ms` is
then the best forced rows, and the row says so. Each call is checked against the torch reference first. The floor is
the bytes the step must move (fp32 states and conv states read and written, the weights, x, z and y) over the copy
bandwidth measured in the same run. Rows go to --out (JSON lines).

    python benchmarks/mamba_step.py --batches 1,16,64 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date

import torch
import triton
from ceilings import copy_bandwidth, floor_ms  # benchmarks/ceilings.py (the script's folder is on sys.path)


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def step_args(batch: int, dim: int, nstate: int, rank: int, width: int, dtype=torch.bfloat16) -> tuple:
    """Random inputs of one fused step on CUDA, in `mamba_step`'s order: x, z (column halves of one in_proj
    output), conv_state, conv_w, conv_b, x_proj_w, dt_w, dt_bias, A, D, state."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g) * scale

    xz = rnd(batch, 2 * dim).to(dtype)
    conv_state, conv_w, conv_b = rnd(batch, dim, width - 1), rnd(dim, width, scale=0.5), rnd(dim, scale=0.1)
    wx = rnd(rank + 2 * nstate, dim, scale=dim ** -0.5).to(dtype)
    wdt, dt_bias = rnd(dim, rank, scale=rank ** -0.5).to(dtype), rnd(dim, scale=0.5) - 3
    A = -torch.arange(1, nstate + 1, device=dev, dtype=torch.float32).repeat(dim, 1)
    D, state = rnd(dim), rnd(batch, dim, nstate, scale=0.3)
    return xz[:, :dim], xz[:, dim:], conv_state, conv_w, conv_b, wx, wdt, dt_bias, A, D, state


def measure(batch: int, dim: int, nstate: int, rank: int, width: int, card: str) -> dict:
    import torch.nn.functional as F
    from zoo_kernels import causal_conv1d_update, selective_state_update
    from zoo_kernels.selective_scan import fused_step
    from zoo_kernels.selective_scan.fused_step import mamba_step, mamba_step_ref

    args = step_args(batch, dim, nstate, rank, width)
    x, z, conv_state, conv_w, conv_b, wx, wdt, dt_bias, A, D, state = args
    ref_args = tuple(a.clone() if a is conv_state or a is state else a for a in args)
    ext = fused_step._module()
    rows = ext.rows_for(batch, dim, nstate, rank, width, 2)  # 0: the mixer runs the unfused step
    os.environ["ZOO_MAMBA_STEP_ROWS"] = str(rows or 1)  # the check runs the kernel even where the mixer would not
    y, y_ref = mamba_step(*args).float(), mamba_step_ref(*ref_args).float()
    del os.environ["ZOO_MAMBA_STEP_ROWS"]
    err = ((y - y_ref).norm() / y_ref.norm()).item()
    if err > 2e-2:
        raise RuntimeError(f"fused step wrong at batch {batch}: relative error {err:.3g}")

    def unfused():
        u = causal_conv1d_update(conv_state, x, conv_w, conv_b, "silu")
        x_dbl = F.linear(u, wx)
        dt_low, B, C = torch.split(x_dbl, [rank, nstate, nstate], dim=-1)
        return selective_state_update(state, u, dt_low, A, B, C, D, z, dt_bias, True, wdt)

    per_rows, capacity = {}, {}
    for r in (1, 2, 4, 8):  # every rows per CTA that fits, forced ($ZOO_MAMBA_STEP_ROWS is read at each call)
        capacity[r] = ext.cluster_capacity(dim, nstate, rank, width, 2, r)
        os.environ["ZOO_MAMBA_STEP_ROWS"] = str(r)
        try:
            per_rows[r] = timed(lambda: mamba_step(*args))
        except RuntimeError:  # its shared memory does not fit
            pass
    del os.environ["ZOO_MAMBA_STEP_ROWS"]
    best = min(per_rows, key=per_rows.get)
    os.environ["ZOO_MAMBA_STEP_ROWS"], os.environ["ZOO_MAMBA_STEP_PDL"] = str(best), "0"
    t_plain = timed(lambda: mamba_step(*args))  # the best rows launched without PDL
    del os.environ["ZOO_MAMBA_STEP_ROWS"], os.environ["ZOO_MAMBA_STEP_PDL"]
    t_fused = per_rows[rows] if rows else per_rows[best]
    t_unfused = timed(unfused)
    nbytes = (2 * 4 * batch * dim * (nstate + width - 1)  # fp32 states and conv states, read and written
              + 2 * (wx.numel() + wdt.numel()) + 4 * (conv_w.numel() + 4 * dim + A.numel())  # weights, constants
              + 2 * batch * dim * 3)  # x, z, y
    floor = floor_ms(nbytes)
    sweep = "  ".join(f"{r}: {t * 1e3:.2f} us ({-(-batch // r)} of {capacity[r]} clusters)"
                      for r, t in per_rows.items())
    print(f"batch {batch:3d} d_inner {dim} N {nstate} R {rank}: fused {t_fused * 1e3:6.2f} us at "
          f"{rows or best} rows per CTA ({'the kernel' if rows else 'forced; the mixer runs unfused'}; best rows "
          f"{best} without PDL {t_plain * 1e3:6.2f})  unfused {t_unfused * 1e3:6.2f} us  "
          f"({t_unfused / t_fused:.2f}x)  floor {floor * 1e3:.2f} us\n    rows per CTA: {sweep}", flush=True)
    return {
        "name": f"mamba_step/d{dim}_N{nstate}_R{rank}/B{batch}", "card": card, "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "shape": {"batch": batch, "d_inner": dim, "N": nstate, "dt_rank": rank, "width": width, "dtype": "bf16"},
        "ours_ms": round(t_fused, 5), "baseline": "unfused step (conv update + cuBLAS x_proj + state update)",
        "baseline_ms": round(t_unfused, 5), "ratio": round(t_unfused / t_fused, 3), "floor_ms": round(floor, 5),
        "best_rows_without_pdl_ms": round(t_plain, 5), "rows_per_cta": rows,
        "per_rows_ms": {str(r): round(t, 5) for r, t in per_rows.items()},
        "cluster_capacity": {str(r): c for r, c in capacity.items()},
        "note": "inside a CUDA graph (do_bench_cudagraph)" + (
            "" if rows else f"; the mixer runs the unfused step here (no rows per CTA fits one wave): ours_ms is the "
            f"best forced rows ({best})"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--shapes", default="1536:16:48", help="d_inner:N:dt_rank, comma-separated (130M: 1536:16:48)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("mamba_step.py needs a CUDA GPU with compute capability 9.0+ (thread-block clusters)")
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy_bandwidth() / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        dim, nstate, rank = (int(v) for v in shape.split(":"))
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(batch, dim, nstate, rank, 4, card))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
