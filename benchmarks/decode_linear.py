"""Benchmark: the projections of a decode step (M = 1..64 rows) — cuBLAS (F.linear) vs zoo_kernels.skinny_linear.

Each call is timed inside a CUDA graph (`triton.testing.do_bench_cudagraph`), the way a graph-captured decode step
runs it, so launch gaps count as they do there. Shapes are the 130M models' projections (d_model 768). For each
shape: F.linear, F.linear with its output transposed (cuBLAS given the weight as the left operand), the kernel
at its default configuration, and the best of a sweep of configurations (--sweep). The floor is the weight's
bytes over the copy bandwidth measured in the same run. Rows go to --out (JSON lines).

    python benchmarks/decode_linear.py --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import date

import torch
import torch.nn.functional as F
import triton
from ceilings import copy_bandwidth, floor_ms  # benchmarks/ceilings.py (the script's folder is on sys.path)

SHAPES = {  # name: (K, N, bias)
    "mamba.in_proj": (768, 3072, False),
    "mamba.x_proj": (1536, 80, False),
    "mamba.dt_proj": (48, 1536, True),
    "mamba.out_proj": (1536, 768, False),
    "mamba2.in_proj": (768, 3352, False),
    "attn.qkv": (768, 2304, False),
    "attn.o": (768, 768, False),
    "mlp.gate_up": (768, 4096, False),
    "mlp.down": (2048, 768, False),
    "lm_head": (768, 50280, False),
}


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def measure(name: str, M: int, sweep: bool, dev: torch.device, card: str) -> dict:
    """Times one projection at M rows; returns its results.jsonl row."""
    from zoo_kernels.skinny_linear import _config, skinny_linear

    K, N, has_bias = SHAPES[name]
    gen = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(N, K, device=dev, generator=gen) / K**0.5).to(torch.bfloat16)
    b = torch.randn(N, device=dev, generator=gen).to(torch.bfloat16) if has_bias else None
    x = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = skinny_linear(x, w, b)
    err = ((got.float() - ref).norm() / ref.norm()).item()
    if err > 2e-2:
        raise RuntimeError(f"skinny_linear wrong at {name} M={M}: relative error {err:.3g}")

    def swapped():
        return (torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())).t()

    t = {
        "cublas": timed(lambda: F.linear(x, w, b)),
        "cublas_swapped": timed(swapped),
        "skinny": timed(lambda: skinny_linear(x, w, b)),
    }
    best_cfg = _config(M, N, K, dev)
    if sweep:
        bm = best_cfg[0]
        for bn, bk, warps, stages in itertools.product((16, 32, 64), (64, 128, 256), (4,), (2, 4)):
            if bk * (bm + bn) * 2 * stages > 200_000:  # shared memory of the pipelined tiles
                continue
            cfg = (bm, bn, bk, warps, stages)
            try:
                ms = timed(lambda cfg=cfg: skinny_linear(x, w, b, config=cfg))
            except Exception as e:  # noqa: BLE001 - a config Triton cannot build is skipped
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            if ms < t.get("skinny_best", float("inf")):
                t["skinny_best"], best_cfg = ms, cfg
    floor = floor_ms((N * K + M * (K + N)) * 2)  # weight, x and y once
    line = "  ".join(f"{k} {v * 1e3:6.1f} us" for k, v in t.items())
    print(f"{name:15s} M={M:3d}: {line}  floor {floor * 1e3:.1f} us  best cfg {best_cfg}  err {err:.1e}",
          flush=True)
    return {
        "name": f"decode_linear/{name}/M{M}", "card": card, "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "shape": {"M": M, "K": K, "N": N, "bias": has_bias, "dtype": "bf16"},
        "ours_ms": round(t["skinny"], 5), "baseline": "cuBLAS (F.linear)", "baseline_ms": round(t["cublas"], 5),
        "ratio": round(t["cublas"] / t["skinny"], 3), "floor_ms": round(floor, 5),
        "cublas_swapped_ms": round(t["cublas_swapped"], 5),
        "best_ms": round(t["skinny_best"], 5) if "skinny_best" in t else None,
        "default_config": list(_config(M, N, K, dev)), "best_config": list(best_cfg),
        "note": "inside a CUDA graph (do_bench_cudagraph)",
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time a sweep of launch configurations")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_linear.py needs a CUDA GPU")
    dev = torch.device("cuda")
    bw = copy_bandwidth()  # bytes/s, read + write counted
    card = torch.cuda.get_device_name(dev)
    print(f"{card}: copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in args.shapes:
        for M in (int(m) for m in args.rows.split(",")):
            rows.append(measure(name, M, args.sweep, dev, card))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
