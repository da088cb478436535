"""Probe: where the time of one fused Mamba decode step goes, phase by phase, per CTA.

`benchmarks/mamba_step.py` found that a CTA's time grows by ~1.7 us for every further batch row it takes, even rows
past the batch (no loads, no stores). This builds a copy of the kernel with -DZOO_MS_PHASES (thread 0 of every CTA
stores clock64() at each phase boundary, the globaltimer at its start and end, and its SM; the shipped build has
none of it), launches it once per (batch, rows per CTA), and prints per phase the median and the slowest CTA's
time in us (cycles converted with each CTA's own clock64 / globaltimer ratio), plus when the CTAs started relative
to the first (waves) and how many SMs they used.

    python benchmarks/probe_mamba_step_phases.py --cases 1:1,1:2,1:4,1:8,16:1,64:1,64:4,64:8
    python benchmarks/probe_mamba_step_phases.py --kernel rows --cases 1:2,16:2,64:4

--kernel rows times the register-rows kernel (states in registers; its phases: weights' copies and the states' loads
issued, the wait, conv, x_proj part, cluster sync, cluster sum, dt, state update and gate, exit wait).
"""

from __future__ import annotations

import argparse
import sys

import torch
from mamba_step import step_args  # benchmarks/mamba_step.py (the script's folder is on sys.path)

PHASES = ("copies issued", "grid-dep wait", "conv", "x_proj part", "cluster sync", "cluster sum + wait",
          "dt + wait", "state update", "cluster exit wait")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="1:1,1:2,1:4,1:8,16:1,64:1,64:2,64:4,64:8", help="batch:rows, comma-separated")
    p.add_argument("--shape", default="1536:16:48", help="d_inner:N:dt_rank (130M: 1536:16:48)")
    p.add_argument("--pdl", type=int, default=0, help="launch as a programmatic dependent (1) or plainly (0)")
    p.add_argument("--kernel", choices=["slots", "rows"], default="slots")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("needs a CUDA GPU with compute capability 9.0+")
    from zoo_kernels.selective_scan import fused_step
    from zoo_kernels.selective_scan.cuda import JitExtension
    from zoo_kernels.selective_scan.fused_step import mamba_step_ref

    ext = JitExtension("fused Mamba step (phase timing)", fused_step._SOURCES, fused_step._HEADERS,
                       fused_step._CSRC, "zoo_mamba_step_phases", (9, 0), "clusters need",
                       defines=("ZOO_MS_PHASES",)).module()
    dim, nstate, rank = (int(v) for v in args.shape.split(":"))
    kernel = fused_step.KERNELS[args.kernel]
    width = 4
    print(f"{torch.cuda.get_device_name()}: {args.kernel} kernel, d_inner {dim} N {nstate} R {rank}, bf16, pdl "
          f"{args.pdl}", flush=True)
    for case in args.cases.split(","):
        batch, rows = (int(v) for v in case.split(":"))
        x, z, conv_state, conv_w, conv_b, wx, wdt, dt_bias, A, D, state = step_args(batch, dim, nstate, rank, width)
        ref = mamba_step_ref(x, z, conv_state.clone(), conv_w, conv_b, wx, wdt, dt_bias, A, D, state.clone())
        try:
            y = ext.step(x, z, conv_state, conv_w, conv_b, wx, wdt, dt_bias, A, D, state, None, bool(args.pdl), rows,
                         kernel)
        except RuntimeError as exc:
            print(f"batch {batch} rows {rows}: {exc}")
            continue
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        for _ in range(3):  # the stamps of the last of a few launches (warm caches, as in a decode loop)
            ext.step(x, z, conv_state, conv_w, conv_b, wx, wdt, dt_bias, A, D, state, None, bool(args.pdl), rows,
                     kernel)
        torch.cuda.synchronize()
        st = ext.phases()
        ctas = 8 * -(-batch // rows)
        st = st[: min(ctas, st.shape[0])].double()
        clocks, t0, t1, sm = st[:, :10], st[:, 10], st[:, 11], st[:, 12]
        ghz = (clocks[:, 9] - clocks[:, 0]) / (t1 - t0).clamp(min=1)  # cycles per ns, per CTA
        dur = (clocks[:, 1:] - clocks[:, :-1]) / ghz[:, None] / 1e3  # us
        total = (t1 - t0) / 1e3
        start = (t0 - t0.min()) / 1e3
        print(f"batch {batch:3d} rows/CTA {rows}: {ctas} CTAs on {int(sm.unique().numel())} SMs, rel. error "
              f"{err:.1e}; CTA time median {total.median():.2f} us, max {total.max():.2f}; CTA starts "
              f"0..{start.max():.2f} us; kernel span {(t1.max() - t0.min()) / 1e3:.2f} us; clock "
              f"{ghz.median():.2f} GHz", flush=True)
        for name, col in zip(PHASES, dur.T):
            print(f"    {name:20s} median {col.median():6.2f} us  max {col.max():6.2f}")


if __name__ == "__main__":
    main()
