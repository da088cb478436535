"""Benchmark: a run of Mamba-1 blocks decoding one token in one persistent launch, against the block-by-block
chain the model runs otherwise.

The chain per block is what a graph-captured decode step of zoo's Mamba runs: the residual add and RMSNorm
(zoo_kernels.add_norm, PDL), in_proj and out_proj as zoo.layers.Linear inside `zoo.layers.decoding()` (the PDL
projection kernel up to 32 rows, cuBLAS beyond), and the fused step (zoo_kernels.selective_scan.fused_step).
The persistent kernel (zoo_kernels.selective_scan.fused_layers) runs the whole run in one launch after a small
input kernel. Both are timed inside a CUDA graph (`triton.testing.do_bench_cudagraph`) on random
130M-shaped blocks (d_model 768, d_inner 1536, N 16, dt_rank 48, width 4; 24 blocks) in bf16, each after being
checked against the torch reference (`mamba_layers_ref`) over three steps (the states carry over). The floor is
the bytes a step must move (the blocks' weights, fp32 states and conv states read and written) over the copy
bandwidth measured in the same run. Rows go to --out (JSON lines).

    python benchmarks/mamba_layers.py --batches 16,32,64 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch
from ceilings import (  # benchmarks/ceilings.py (the script's folder is on sys.path)
    copy_bandwidth,
    floor_ms,
    graph_ms,
    rows_kept_on_interrupt,
    sizes,
)


def timed(fn) -> float:
    return graph_ms(fn, 50)


def random_layers(n: int, batch: int, d_model: int = 768, rank: int = 48, nstate: int = 16, width: int = 4,
                  dtype=torch.bfloat16, state_dtype=torch.float32, seed: int = 0):
    """n blocks' tensors with the scales of a trained model's (so that the stream stays O(1) over the run)."""
    from zoo_kernels.selective_scan.fused_layers import MambaLayerTensors

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    E = 2 * d_model

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g) * scale

    layers = []
    for _ in range(n):
        layers.append(MambaLayerTensors(
            norm_w=(1 + rnd(d_model, scale=0.1)).to(dtype), in_w=rnd(2 * E, d_model, scale=d_model ** -0.5).to(dtype),
            conv_w=rnd(E, width, scale=0.5), conv_b=rnd(E, scale=0.1),
            x_w=rnd(rank + 2 * nstate, E, scale=E ** -0.5).to(dtype), dt_w=rnd(E, rank, scale=rank ** -0.5).to(dtype),
            dt_b=rnd(E, scale=0.5) - 3, A=-torch.arange(1, nstate + 1, device=dev, dtype=torch.float32).repeat(E, 1),
            D=rnd(E), out_w=rnd(d_model, E, scale=0.3 * E ** -0.5).to(dtype),
            conv_state=rnd(batch, E, width - 1), state=rnd(batch, E, nstate, scale=0.3).to(state_dtype)))
    return layers


def clone_states(layers):
    return [(t.conv_state.clone(), t.state.clone()) for t in layers]


def restore_states(layers, saved):
    for t, (cs, st) in zip(layers, saved):
        t.conv_state.copy_(cs)
        t.state.copy_(st)


PHASES = ("stage+norm", "in_proj", "conv+x_proj", "cluster_sync", "atomics", "barrier1", "x_proj_sums_read",
          "x_proj_sums_convert", "state_update", "y_gather", "out_proj_part", "barrier2", "out_proj_sum+epilogue",
          "barrier3")


def measure(batch: int, n_layers: int, card: str, eps: float = 1e-5, stamp_phases: bool = False) -> dict:
    from zoo_kernels.add_norm import add_rms_norm
    from zoo_kernels.selective_scan import fused_step
    from zoo_kernels.selective_scan.fused_layers import MambaLayers, mamba_layers_ref, problem

    from zoo.layers import Linear, decoding

    dtype = torch.bfloat16
    layers = random_layers(n_layers, batch)
    why = problem(layers, batch, dtype)
    if why is not None:
        sys.exit(f"the persistent kernel does not take batch {batch}: {why}")
    dev = layers[0].in_w.device
    E = layers[0].in_w.shape[0] // 2
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(batch, 768, device=dev, generator=g)
    pending = torch.randn(batch, 768, device=dev, generator=g).to(dtype)
    saved = clone_states(layers)

    # correctness: three steps of the kernel against three of the reference, from the same states
    run = MambaLayers(layers, batch, dtype, eps)
    outs = []
    for _ in range(3):
        outs.append(run.run(x, pending).clone())
    got_states = clone_states(layers)
    restore_states(layers, saved)
    want = [mamba_layers_ref(x, pending, layers, eps) for _ in range(3)]
    want_states = clone_states(layers)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

    err_out = max(rel(a, b) for a, b in zip(outs, want))
    err_state = max(max(rel(a[0], b[0]), rel(a[1], b[1])) for a, b in zip(got_states, want_states))
    restore_states(layers, saved)

    t_kernel = timed(lambda: run.run(x, pending))
    phases = None
    if stamp_phases:
        stamps = torch.zeros(n_layers, E // 16, run.ext.stamps_per_layer(), device=dev, dtype=torch.int64)
        run.run(x, pending, stamps=stamps)
        torch.cuda.synchronize()
        st = stamps.double()
        mid = st[1:-1]  # (the first layer waits for the input, the last has no third barrier)
        steps = (mid[:, :, 1:] - mid[:, :, :-1]) / 1e3  # us between consecutive stamps, per layer and CTA
        phases = {name: [round(steps[..., i].median().item(), 3), round(steps[..., i].max().item(), 3)]
                  for i, name in enumerate(PHASES)}
        print("    phases (median, max over layers 1..n-2 and CTAs, us): " + "  ".join(
            f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in phases.items()), flush=True)
        skew = (st[1:-1, :, 0].max(-1).values - st[1:-1, :, 0].min(-1).values).median().item() / 1e3
        whole = (st[2:-1, 0, 0] - st[1:-2, 0, 0]).median().item() / 1e3
        print(f"    layer start skew across CTAs {skew:.2f} us; whole layer {whole:.2f} us", flush=True)
    restore_states(layers, saved)

    consts = [(fused_step._aligned(t.conv_w), t.conv_b, t.x_w, t.dt_w, t.dt_b, t.A, t.D) for t in layers]
    fused_ok = fused_step.supported(x.to(dtype), layers[0].conv_w, layers[0].x_w, layers[0].A)
    projections = []
    for t in layers:
        pair = (Linear(t.in_w.shape[1], t.in_w.shape[0], bias=False, device=dev, dtype=dtype),
                Linear(t.out_w.shape[1], t.out_w.shape[0], bias=False, device=dev, dtype=dtype))
        with torch.no_grad():
            pair[0].weight.copy_(t.in_w)
            pair[1].weight.copy_(t.out_w)
        projections.append(pair)

    def chain():
        with decoding(), torch.no_grad():
            return chain_steps()

    def chain_steps():
        res, pend = x, pending
        for t, (cw, cb, xw, dtw, dtb, A, D), (in_proj, out_proj) in zip(layers, consts, projections):
            res, h = add_rms_norm(res, pend, t.norm_w, eps, dtype, torch.float32)
            xz = in_proj(h)
            xs, z = xz[:, :E], xz[:, E:]
            if fused_ok:
                y = fused_step.mamba_step(xs, z, t.conv_state, cw, cb, xw, dtw, dtb, A, D, t.state)
            else:
                y = fused_step.mamba_step_ref(xs, z, t.conv_state, cw, cb, xw, dtw, dtb, A, D, t.state)
            pend = out_proj(y)
        return add_rms_norm(res, pend, layers[-1].norm_w, eps, dtype, torch.float32)[0]

    t_chain = timed(chain)
    restore_states(layers, saved)
    per = layers[0]
    weights = sum(t.numel() * t.element_size() for t in (per.norm_w, per.in_w, per.out_w, per.x_w, per.dt_w,
                                                         per.conv_w, per.conv_b, per.dt_b, per.A, per.D))
    states = 2 * sum(t.numel() * t.element_size() for t in (per.state, per.conv_state))  # read and written
    floor = floor_ms(n_layers * (weights + states))
    print(f"batch {batch:3d}, {n_layers} blocks: persistent {t_kernel * 1e3:7.1f} us ({t_kernel * 1e3 / n_layers:5.2f} "
          f"per block)  chain {t_chain * 1e3:7.1f} us ({t_chain * 1e3 / n_layers:5.2f})  {t_chain / t_kernel:.2f}x  "
          f"floor {floor * 1e3:6.1f} us  rel err out {err_out:.2e} states {err_state:.2e}", flush=True)
    return {
        "name": f"mamba_layers/130m_x{n_layers}/B{batch}", "card": card, "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "shape": {"batch": batch, "layers": n_layers, "d_model": 768, "d_inner": E, "N": 16, "dt_rank": 48,
                  "dtype": "bf16", "state": "fp32"},
        "ours_ms": round(t_kernel, 5),
        "baseline": "per block as the model decodes: add_norm + zoo Linear in_proj (PDL kernel <= 32 rows, else "
                    "cuBLAS) + fused step + zoo Linear out_proj",
        "baseline_ms": round(t_chain, 5), "ratio": round(t_chain / t_kernel, 3), "floor_ms": round(floor, 5),
        "rel_err_out": err_out, "rel_err_states": err_state, "phases_us_median_max": phases,
        "note": "inside a CUDA graph (do_bench_cudagraph); fused step " + ("on" if fused_ok else "off (reference)"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=sizes, default="16,32,64")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--phases", action="store_true", help="stamp the kernel's phases once (the global timer)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("mamba_layers.py needs a CUDA GPU with compute capability 9.0+ (thread-block clusters)")
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy_bandwidth() / 1e12:.2f} TB/s", flush=True)
    # Ctrl-C or SIGTERM: the rows measured are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "mamba_layers.py") as rows:
        for b in args.batches:
            rows.append(measure(b, args.layers, card, stamp_phases=args.phases))


if __name__ == "__main__":
    main()
