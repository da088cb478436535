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

--in-model MODEL times the kernel where it runs in a decode step: the model (configs/models/MODEL.yaml, bf16, random
weights) is prefilled with --prompt-len tokens at each case's batch, its step captured in a CUDA graph
(zoo.decode.GraphDecoder) with the phase-timing build in place of the shipped one, and replayed --steps times; the
stamps are then those of the step's last Mamba layer, which ran between its in_proj and out_proj like any other,
with the states it read coming from DRAM. The rows per CTA are the launcher's (the case's rows are ignored).

    python benchmarks/probe_mamba_step_phases.py --kernel rows --in-model mamba-130m --cases 64:4,1:2
"""

from __future__ import annotations

import argparse
import sys

import torch
from ceilings import int_tuples  # benchmarks/ceilings.py (the script's folder is on sys.path)
from mamba_step import step_args, step_shapes  # benchmarks/mamba_step.py

PHASES = ("copies issued", "grid-dep wait", "conv", "x_proj part", "cluster sync", "cluster sum + wait",
          "dt + wait", "state update", "cluster exit wait")


def batch_rows(text: str) -> list[tuple[int, int]]:
    """--cases as argparse's type: batch:rows items, each >= 1 (a bad one failed in a traceback after the CUDA check
    and the phase-timing build)."""
    return int_tuples(text, 2, "batch:rows items >= 1 such as 1:1,64:4")


def one_shape(text: str) -> tuple[int, int, int]:
    """--shape as argparse's type: one d_inner:N:dt_rank (int()ed after the CUDA check and the phase-timing build,
    a bad one failed in a traceback)."""
    shapes = step_shapes(text)
    if len(shapes) != 1:
        raise argparse.ArgumentTypeError(f"expected one d_inner:N:dt_rank such as 1536:16:48, got {text!r}")
    return shapes[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=batch_rows, default="1:1,1:2,1:4,1:8,16:1,64:1,64:2,64:4,64:8",
                   help="batch:rows, comma-separated")
    p.add_argument("--shape", type=one_shape, default="1536:16:48", help="d_inner:N:dt_rank (130M: 1536:16:48)")
    p.add_argument("--pdl", type=int, default=0, help="launch as a programmatic dependent (1) or plainly (0)")
    p.add_argument("--kernel", choices=["slots", "rows"], default="slots")
    p.add_argument("--in-model", metavar="MODEL", help="time it inside a captured decode step of this model config")
    p.add_argument("--prompt-len", type=int, default=2048, help="--in-model: the prompt prefilled before the steps")
    p.add_argument("--steps", type=int, default=8, help="--in-model: graph replays before the stamps are read")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("needs a CUDA GPU with compute capability 9.0+")
    from zoo_kernels.selective_scan import fused_step
    from zoo_kernels.selective_scan.cuda import JitExtension
    from zoo_kernels.selective_scan.fused_step import mamba_step_ref

    ext = JitExtension("fused Mamba step (phase timing)", fused_step._SOURCES, fused_step._HEADERS,
                       fused_step._CSRC, "zoo_mamba_step_phases", (9, 0), "clusters need",
                       defines=("ZOO_MS_PHASES",)).module()
    if args.in_model:
        in_model(args, ext)
        return
    dim, nstate, rank = args.shape
    kernel = fused_step.KERNELS[args.kernel]
    width = 4
    print(f"{torch.cuda.get_device_name()}: {args.kernel} kernel, d_inner {dim} N {nstate} R {rank}, bf16, pdl "
          f"{args.pdl}", flush=True)
    for batch, rows in args.cases:
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
        report(ext.phases(), batch, rows, f"rel. error {err:.1e}")


def report(st: torch.Tensor, batch: int, rows: int, note: str) -> None:
    """Print the stamps of the last launch at `batch` with `rows` rows per CTA: per phase the median CTA's time and
    the slowest's, when the CTAs started relative to the first, and how many SMs they ran on."""
    ctas = 8 * -(-batch // rows)
    st = st[: min(ctas, st.shape[0])].double()
    clocks, t0, t1, sm = st[:, :10], st[:, 10], st[:, 11], st[:, 12]
    ghz = (clocks[:, 9] - clocks[:, 0]) / (t1 - t0).clamp(min=1)  # cycles per ns, per CTA
    dur = (clocks[:, 1:] - clocks[:, :-1]) / ghz[:, None] / 1e3  # us
    total = (t1 - t0) / 1e3
    start = (t0 - t0.min()) / 1e3
    print(f"batch {batch:3d} rows/CTA {rows}: {ctas} CTAs on {int(sm.unique().numel())} SMs, {note}; CTA time median "
          f"{total.median():.2f} us, max {total.max():.2f}; CTA starts 0..{start.max():.2f} us; kernel span "
          f"{(t1.max() - t0.min()) / 1e3:.2f} us; clock {ghz.median():.2f} GHz", flush=True)
    for name, col in zip(PHASES, dur.T):
        print(f"    {name:20s} median {col.median():6.2f} us  max {col.max():6.2f}")


def in_model(args, ext) -> None:
    """The phases of the fused step inside a captured decode step of --in-model (see the module docstring)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    from zoo_kernels.selective_scan import fused_step

    import zoo
    from zoo.decode import GraphDecoder, prefill
    from zoo.mixers.mamba import Mamba

    root = Path(__file__).resolve().parents[1]
    config = zoo.ZooConfig.from_yaml(root / "configs" / "models" / f"{args.in_model}.yaml")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    fused_step._module = lambda: ext  # the phase-timing build in place of the shipped one (same entry points)
    mixer = next(m for m in model.modules() if isinstance(m, Mamba))
    print(f"{torch.cuda.get_device_name()}: {args.in_model}, prompt {args.prompt_len}, bf16, the fused step inside "
          f"a captured decode step (its last Mamba layer)", flush=True)
    for batch, _ in args.cases:
        prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(batch)).cuda()
        with torch.no_grad():
            decoder = GraphDecoder(model, prefill(model, prompt), max_new_tokens=args.steps + 4)
            decoder.decode(args.steps)
        torch.cuda.synchronize()
        rows = int(ext.plan(batch, mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.conv1d.weight.shape[-1], 2)[1])
        report(ext.phases(), batch, rows, f"{args.steps} replays")
        del decoder
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
