"""Benchmark: the fused Mamba-1 decode step (one launch) against the unfused step (three launches) it replaces.

The unfused step after in_proj is what the Mamba mixer ran before: the conv-update kernel, the x_proj GEMM (cuBLAS)
and the state-update kernel with dt_proj folded in. The fused kernel (zoo_kernels.selective_scan.fused_step) does
the three in one launch of 8-CTA clusters. Both are timed inside a CUDA graph (`triton.testing.do_bench_cudagraph`),
as a graph-captured decode step runs them, on the 130M shapes (d_inner 1536, N 16, dt_rank 48, width 4) by default,
in bf16; the fused step at each of its two kernels (ZOO_MAMBA_STEP_KERNEL: the slots kernel, states in shared memory,
and the register-rows kernel) and every rows per CTA that fits (ZOO_MAMBA_STEP_ROWS), with the number of resident
clusters the occupancy API allows for it, and the best of them without programmatic dependent launch
(ZOO_MAMBA_STEP_PDL=0). Where the launcher's plan (one wave of clusters) finds no kernel the mixer runs the unfused
step: `ours_ms` is then the best forced, and the row says so. Each call is checked against the torch reference
first. The floor is the bytes the step must move (fp32 states and conv states read and written, the weights, x, z
and y) over the copy bandwidth measured in the same run. Rows go to --out (JSON lines).

    python benchmarks/mamba_step.py --batches 1,16,64 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date

import torch
from ceilings import (  # benchmarks/ceilings.py (the script's folder is on sys.path)
    copy_bandwidth,
    floor_ms,
    graph_ms,
    int_tuples,
    rows_kept_on_interrupt,
    sizes,
)


def timed(fn) -> float:
    return graph_ms(fn, 30)


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
    ext = fused_step._module()
    kernel, rows = ext.plan(batch, dim, nstate, rank, width, 2)  # (0, 0): the mixer runs the unfused step
    names = {fused_step.KERNELS["slots"]: "slots", fused_step.KERNELS["rows"]: "rows"}

    def forced(name: str, r: int, pdl: bool = True):
        os.environ["ZOO_MAMBA_STEP_KERNEL"], os.environ["ZOO_MAMBA_STEP_ROWS"] = name, str(r)
        os.environ["ZOO_MAMBA_STEP_PDL"] = "1" if pdl else "0"

    def unforced():
        for k in ("ZOO_MAMBA_STEP_KERNEL", "ZOO_MAMBA_STEP_ROWS", "ZOO_MAMBA_STEP_PDL"):
            os.environ.pop(k, None)

    # every (kernel, rows per CTA) that fits, forced (the variables are read at each call), each checked first
    per_rows, capacity = {}, {}
    for name, choices in (("slots", (1, 2, 4, 8)), ("rows", (2, 4))):
        for r in choices:
            capacity[f"{name}{r}"] = ext.cluster_capacity(dim, nstate, rank, width, 2, r, fused_step.KERNELS[name])
            if not capacity[f"{name}{r}"]:
                continue
            forced(name, r)
            ref_args = tuple(a.clone() if a is conv_state or a is state else a for a in args)
            try:
                y = mamba_step(*args).float()
            except RuntimeError:  # its shared memory does not fit
                continue
            finally:
                unforced()
            y_ref = mamba_step_ref(*ref_args).float()
            err = ((y - y_ref).norm() / y_ref.norm()).item()
            if err > 2e-2:
                raise RuntimeError(f"fused step ({name}, {r} rows) wrong at batch {batch}: relative error {err:.3g}")
            forced(name, r)
            per_rows[f"{name}{r}"] = timed(lambda: mamba_step(*args))
            unforced()
    best = min(per_rows, key=per_rows.get)
    forced(best.rstrip("0123456789"), int(best.lstrip("slotrw")), pdl=False)
    t_plain = timed(lambda: mamba_step(*args))  # the best launched without PDL
    unforced()
    chosen = f"{names[kernel]}{rows}" if rows else best
    t_fused = per_rows[chosen]

    def unfused():
        u = causal_conv1d_update(conv_state, x, conv_w, conv_b, "silu")
        x_dbl = F.linear(u, wx)
        dt_low, B, C = torch.split(x_dbl, [rank, nstate, nstate], dim=-1)
        return selective_state_update(state, u, dt_low, A, B, C, D, z, dt_bias, True, wdt)

    t_unfused = timed(unfused)
    nbytes = (2 * 4 * batch * dim * (nstate + width - 1)  # fp32 states and conv states, read and written
              + sum(t.numel() * t.element_size() for t in (wx, wdt, conv_w, conv_b, dt_bias, A, D))  # weights
              + 2 * batch * dim * 3)  # x, z, y
    floor = floor_ms(nbytes)
    sweep = "  ".join(f"{k}: {t * 1e3:.2f} us ({-(-batch // int(k.lstrip('slotrw')))} of {capacity[k]} clusters)"
                      for k, t in per_rows.items())
    print(f"batch {batch:3d} d_inner {dim} N {nstate} R {rank}: fused {t_fused * 1e3:6.2f} us at {chosen} "
          f"({'the plan' if rows else 'forced; the mixer runs unfused'}; best {best} without PDL "
          f"{t_plain * 1e3:6.2f})  unfused {t_unfused * 1e3:6.2f} us  ({t_unfused / t_fused:.2f}x)  "
          f"floor {floor * 1e3:.2f} us\n    kernel and rows per CTA: {sweep}", flush=True)
    return {
        "name": f"mamba_step/d{dim}_N{nstate}_R{rank}/B{batch}", "card": card, "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "shape": {"batch": batch, "d_inner": dim, "N": nstate, "dt_rank": rank, "width": width, "dtype": "bf16"},
        "ours_ms": round(t_fused, 5), "baseline": "unfused step (conv update + cuBLAS x_proj + state update)",
        "baseline_ms": round(t_unfused, 5), "ratio": round(t_unfused / t_fused, 3), "floor_ms": round(floor, 5),
        "best_without_pdl_ms": round(t_plain, 5), "plan": chosen if rows else None,
        "per_kernel_rows_ms": {k: round(t, 5) for k, t in per_rows.items()},
        "cluster_capacity": capacity,
        "note": "inside a CUDA graph (do_bench_cudagraph)" + (
            "" if rows else f"; the mixer runs the unfused step here (no kernel fits one wave): ours_ms is the "
            f"best forced ({best})"),
    }


def step_shapes(text: str) -> list[tuple[int, int, int]]:
    """--shapes as argparse's type: d_inner:N:dt_rank items, each >= 1 (a bad one failed in a traceback after the
    copy bandwidth was measured)."""
    return int_tuples(text, 3, "d_inner:N:dt_rank items such as 1536:16:48")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=sizes, default="1,16,64")
    p.add_argument("--shapes", type=step_shapes, default="1536:16:48",
                   help="d_inner:N:dt_rank, comma-separated (130M: 1536:16:48)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("mamba_step.py needs a CUDA GPU with compute capability 9.0+ (thread-block clusters)")
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy_bandwidth() / 1e12:.2f} TB/s", flush=True)
    # Ctrl-C or SIGTERM: the rows measured are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "mamba_step.py") as rows:
        for dim, nstate, rank in args.shapes:
            for batch in args.batches:
                rows.append(measure(batch, dim, nstate, rank, 4, card))


if __name__ == "__main__":
    main()
