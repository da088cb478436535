"""Benchmark: our Triton SSD scan vs mamba_ssm's mamba_chunk_scan_combined (and fla's chunk_simple_gla fwd).

Shapes of the Mamba-2 130M (d_model 768: H=24) and 370M (d_model 1024: H=32) layers, P=64, N=128, G=1,
chunk 256, bf16, with D, dt_bias and softplus and no z (the mixer gates in its RMSNorm), at B·L = 16K
tokens for L = 2048 (B=8) and L = 8192 (B=2), plus one packed row set (seq_idx, 4 documents per row).

Baselines come from /work/shared/baselines copied to .baselines/ (git-ignored):
    .baselines/mamba_ssm-2.3.2.post1  (sdist, unpacked: only its Triton SSD code is imported, through a
                                       bare `mamba_ssm` package module so its CUDA extension is not needed)
    .baselines/fla                    (pip install --no-deps --target .baselines/fla fla_core + einops)

    python benchmarks/ssd.py [--baselines .baselines] [--out benchmarks/results.jsonl]

Each row: ours_ms, baseline_ms (mamba_ssm) and ratio = baseline_ms / ours_ms (> 1: ours is faster),
the physical floor (max of bytes / copy bandwidth and FLOPs / bf16 matmul rate, both measured at start-up:
benchmarks/ceilings.py), and fla's forward for reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import types

import torch
import triton
from ceilings import describe, floor_ms  # benchmarks/ceilings.py (the script's folder is on sys.path)


def load_baselines(root: str):
    fla_dir = os.path.join(root, "fla")
    if os.path.isdir(fla_dir):
        sys.path.insert(0, fla_dir)
    mamba, fla = None, None
    mamba_root = os.path.join(root, "mamba_ssm-2.3.2.post1", "mamba_ssm")
    if os.path.isdir(mamba_root):
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [mamba_root]
        sys.modules["mamba_ssm"] = pkg
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba
        except Exception as exc:  # noqa: BLE001 - a baseline that fails to import is reported, not fatal
            print(f"mamba_ssm not usable: {exc!r}")
    try:
        from zoo_kernels.gla.fast import import_fla

        fla = import_fla("fla.ops.simple_gla").chunk_simple_gla
    except Exception as exc:  # noqa: BLE001
        print(f"fla not usable: {exc!r}")
    return mamba, fla


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def floors(batch, L, H, P, N, G, T):
    """(fwd, fwd+bwd) lower bounds in ms: bf16 tensors read/written once, the chunked algorithm's FLOPs."""
    tok = batch * L
    fwd_bytes = 2 * tok * (2 * H * P + 2 * G * N + H)  # x, out, B, C, dt
    bwd_bytes = fwd_bytes + 2 * tok * (2 * H * P + 2 * G * N + H)  # + dout, dx, dB, dC, ddt
    # per token: C·Bᵀ (causal, per group), scores·x (causal), chunk state and state output (per head)
    fwd_flops = 2 * tok * (G * T * N / 2 + H * T * P / 2 + 2 * H * P * N)
    f = floor_ms(fwd_bytes, fwd_flops)
    b = floor_ms(bwd_bytes, 3 * fwd_flops)
    return f, b


def run_case(model, H, L, batch, packed, ssd, mamba, fla, compile_only):
    """Times one shape; returns {what: (ours_ms, mamba_ms, fla_fwd_ms)} and ours-vs-mamba output error."""
    P, N, G, T = 64, 128, 1, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(batch, L, H, P, device=dev, generator=gen).to(bf)
    dt = (torch.randn(batch, L, H, device=dev, generator=gen) * 0.5).to(bf)
    dt_bias = torch.log(torch.expm1(torch.rand(H, device=dev, generator=gen) * 0.099 + 0.001))
    A = -torch.rand(H, device=dev, generator=gen) * 15 - 1
    B = torch.randn(batch, L, G, N, device=dev, generator=gen).to(bf)
    C = torch.randn(batch, L, G, N, device=dev, generator=gen).to(bf)
    D = torch.ones(H, device=dev)
    seq_idx = None
    if packed:  # 4 documents per row
        seq_idx = (torch.arange(L, device=dev) * 4 // L).to(torch.int32)[None].expand(batch, L).contiguous()
    leaves = [t.requires_grad_(True) for t in (x, dt, A, B, C, D, dt_bias)]
    dout = torch.randn(batch, L, H, P, device=dev, generator=gen).to(bf)

    def ours():
        return ssd(x, dt, A, B, C, T, D, None, dt_bias, True, None, seq_idx, False)

    def theirs():
        return mamba(x, dt, A, B, C, T, D=D, z=None, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx)

    def ours_bwd():
        return torch.autograd.grad(ours(), leaves, dout)

    def theirs_bwd():
        return torch.autograd.grad(theirs(), leaves, dout)

    fla_fwd = None
    if fla is not None and not packed:
        with torch.no_grad():  # the same recurrence as simple GLA: q=C, k=B, v=Δx, g=ΔA (prepared untimed)
            dtp = torch.nn.functional.softplus(dt.float() + dt_bias)
            q = C.expand(batch, L, H, N).contiguous()
            k = B.expand(batch, L, H, N).contiguous()
            v = (x.float() * dtp[..., None]).to(bf)
            g = dtp * A

        def fla_fwd():
            return fla(q, k, v, g=g, scale=1.0)

    timer = (lambda fn: fn()) if compile_only else bench
    with torch.no_grad():
        times = {"fwd": [timer(ours), timer(theirs) if mamba else None, timer(fla_fwd) if fla_fwd else None]}
    times["fwd+bwd"] = [timer(ours_bwd), timer(theirs_bwd) if mamba else None, None]
    err = None
    if mamba and not compile_only:
        with torch.no_grad():
            o1, o2 = ours().float(), theirs().float()
        err = ((o1 - o2).norm() / o2.norm()).item()
    shape = dict(
        model=model,
        batch=batch,
        L=L,
        H=H,
        P=P,
        N=N,
        G=G,
        chunk_size=T,
        dtype="bf16",
        packed_docs_per_row=4 if packed else 0,
    )
    return times, err, shape, floors(batch, L, H, P, N, G, T)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baselines", default=".baselines")
    parser.add_argument("--out", default="benchmarks/results.jsonl")
    parser.add_argument(
        "--compile-only", action="store_true", help="run each kernel once (compile, autotune)"
    )
    parser.add_argument("--cases", default="", help="run only cases whose tag contains this, e.g. 130m/L2048")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ssd.py needs a CUDA GPU")
    mamba, fla = load_baselines(args.baselines)
    from zoo_kernels.ssd.triton_ssd import ssd_chunk_scan_triton

    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    command = "python " + " ".join(sys.argv)
    rows = []
    cases = [
        ("130m", 24, 2048, 8, False),
        ("130m", 24, 8192, 2, False),
        ("370m", 32, 2048, 8, False),
        ("370m", 32, 8192, 2, False),
        ("130m", 24, 2048, 8, True),
    ]
    for model, H, L, batch, packed in cases:
        if args.cases not in f"{model}/L{L}xB{batch}" + ("/packed" if packed else ""):
            continue
        times, err, shape, floor = run_case(
            model, H, L, batch, packed, ssd_chunk_scan_triton, mamba, fla, args.compile_only
        )
        if args.compile_only:
            print(f"compiled {model} L={L} packed={packed}", flush=True)
            continue
        tag = f"{model}/L{L}xB{batch}" + ("/packed" if packed else "")
        for (what, (ours_ms, base_ms, fla_ms)), floor_val in zip(times.items(), floor):
            row = {
                "name": f"ssd_{what}/{tag}",
                "card": card,
                "date": date,
                "command": command,
                "ours_ms": round(ours_ms, 4),
                "baseline": "mamba_ssm 2.3.2.post1 mamba_chunk_scan_combined",
                "baseline_ms": None if base_ms is None else round(base_ms, 4),
                "ratio": None if base_ms is None else round(base_ms / ours_ms, 3),
                "floor_ms": round(floor_val, 4),
                "fla_chunk_simple_gla_fwd_ms": None if fla_ms is None else round(fla_ms, 4),
                "rel_err_vs_baseline": err,
                "shape": shape,
                "versions": {"torch": torch.__version__, "triton": triton.__version__},
            }
            rows.append(row)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    if not rows:
        return
    print(f"\n{card}, {date}, `{command}`; ratio = mamba_ssm ms / ours ms (> 1: ours faster); {describe()}\n")
    print(
        "| case | ours ms | mamba_ssm ms | ratio | floor ms | fla simple_gla fwd ms | rel err vs mamba_ssm |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r["ours_ms"], r["baseline_ms"], r["ratio"], r["floor_ms"], r["fla_chunk_simple_gla_fwd_ms"]]
        text = ["—" if v is None else f"{v:.3f}" for v in cells]
        err = "—" if r["rel_err_vs_baseline"] is None else f"{r['rel_err_vs_baseline']:.1e}"
        print(f"| {r['name']} | " + " | ".join(text) + f" | {err} |")


if __name__ == "__main__":
    main()
