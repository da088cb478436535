"""Benchmark: the projections of a decode step (M = 1..64 rows) — cuBLAS (F.linear) vs zoo_kernels.skinny_linear
and zoo_kernels.pdl_linear.

Each call is timed inside a CUDA graph (`triton.testing.do_bench_cudagraph`), the way a graph-captured decode step
runs it, so launch gaps count as they do there. Shapes are the 130M models' projections (d_model 768). For each
shape: F.linear, F.linear with its output transposed (cuBLAS given the weight as the left operand), the kernel
at its default configuration, and the best of a sweep of configurations (--sweep); then, where it takes the shape,
the PDL kernel with and without the PDL launch attribute (`pdl`, `pdl_nopdl`; with --sweep also its best tiling).
The graph repeats the one call, so each PDL launch is a dependent of the one before and the weight stays in L2, as
it does for every column. The floor is the weight's bytes over the copy bandwidth measured in the same run. Rows go
to --out (JSON lines).

--chain times, instead, dependent chains where PDL's overlap shows: per graph 24 layers of a Mamba-130M-like pair,
in_proj (768 -> 3072) then out_proj (1536 -> 768) on the first half of in_proj's output, each layer with its own
weights (170 MB in all: read from DRAM, as in a decode step). `direct`: the projections back to back (each PDL launch
follows a PDL launch); `op`: silu on the slice before out_proj and a residual add after it (each projection follows
an ordinary kernel, as in a mixer). Per backend, us per projection (graph time / 48): cuBLAS, the Triton skinny
kernel, the PDL kernel (its default: the late trigger), without the PDL attribute, and with the early trigger
(ZOO_PDL_LINEAR_TRIGGER=early).

    python benchmarks/decode_linear.py --out benchmarks/results.jsonl
    python benchmarks/decode_linear.py --chain --rows 1,16,64 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from datetime import date

import torch
import torch.nn.functional as F
from ceilings import (  # benchmarks/ceilings.py (the script's folder is on sys.path)
    copy_bandwidth,
    floor_ms,
    graph_ms,
    rows_kept_on_interrupt,
    sizes,
)

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


def timed(fn, rep: int = 20) -> float:
    return graph_ms(fn, rep)


@contextlib.contextmanager
def env(**values: str):
    """Sets environment variables for the block (the PDL kernel reads its switches at each call, so at capture)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


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
    pdl = measure_pdl(x, w, b, ref, sweep, t)
    floor = floor_ms((N * K + M * (K + N) + (N if has_bias else 0)) * 2)  # weight, x, y (and the bias) once
    line = "  ".join(f"{k} {v * 1e3:6.1f} us" for k, v in t.items())
    pdl_note = f"  pdl cfg {pdl['config']} best {pdl['best_config']} err {pdl['err']:.1e}" if pdl else ""
    print(f"{name:15s} M={M:3d}: {line}  floor {floor * 1e3:.1f} us  best cfg {best_cfg}  err {err:.1e}{pdl_note}",
          flush=True)
    row = {
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
    if pdl:
        row.update({
            "pdl_ms": round(t["pdl"], 5), "pdl_nopdl_ms": round(t["pdl_nopdl"], 5),
            "pdl_best_ms": round(t["pdl_best"], 5) if "pdl_best" in t else None,
            "pdl_config": list(pdl["config"]), "pdl_best_config": list(pdl["best_config"]),
        })
    return row


def measure_pdl(x, w, b, ref, sweep: bool, t: dict) -> dict | None:
    """Times zoo_kernels.pdl_linear into t (pdl, pdl_nopdl, with --sweep pdl_best) where it takes the shape; returns
    its tiling, best tiling and error, or None."""
    from zoo_kernels.pdl_linear import CLUSTERS, FEATURE_TILES, _config, pdl_linear, supported

    if not supported(x, w, b):
        return None
    M, K, N = x.shape[0], x.shape[1], w.shape[0]
    err = rel_err(pdl_linear(x, w, b), ref)
    if err > 2e-2:
        raise RuntimeError(f"pdl_linear wrong at M={M} K={K} N={N}: relative error {err:.3g}")
    config = best = _config(x.shape[0], N, x.shape[1], x.device)
    t["pdl"] = timed(lambda: pdl_linear(x, w, b))
    with env(ZOO_PDL_LINEAR_PDL="0"):
        t["pdl_nopdl"] = timed(lambda: pdl_linear(x, w, b))
    if sweep:
        for cfg in itertools.product(FEATURE_TILES, CLUSTERS):
            if N % (16 * cfg[0]) or cfg[1] > K // 32:
                continue
            ms = timed(lambda cfg=cfg: pdl_linear(x, w, b, config=cfg))
            if ms < t.get("pdl_best", float("inf")):
                t["pdl_best"], best = ms, cfg
    return {"config": config, "best_config": best, "err": err}


CHAIN_LAYERS = 24
CHAIN_SHAPES = {"in_proj": (768, 3072), "out_proj": (1536, 768)}  # (K, N) of a Mamba-130M layer's pair


def chain(M: int, dev: torch.device, card: str) -> list[dict]:
    """Times CHAIN_LAYERS layers of (in_proj, out_proj on in_proj's first half) per graph, `direct` and with
    elementwise ops between (`op`), for every backend; returns the results.jsonl rows."""
    from zoo_kernels.pdl_linear import pdl_linear, supported
    from zoo_kernels.skinny_linear import skinny_linear

    gen = torch.Generator(device=dev).manual_seed(0)
    (k_in, n_in), (k_out, n_out) = CHAIN_SHAPES["in_proj"], CHAIN_SHAPES["out_proj"]
    layers = [((torch.randn(n_in, k_in, device=dev, generator=gen) / k_in**0.5).to(torch.bfloat16),
               (torch.randn(n_out, k_out, device=dev, generator=gen) / k_out**0.5).to(torch.bfloat16))
              for _ in range(CHAIN_LAYERS)]
    x = torch.randn(M, k_in, device=dev, generator=gen).to(torch.bfloat16)
    torch.cuda.synchronize()  # the PDL kernel reads weights before its wait: not right after the kernels writing them
    if not supported(x, layers[0][0]) or not supported(x.new_empty(M, n_in)[:, :k_out], layers[0][1]):
        print(f"chain M={M}: pdl_linear does not take these shapes here", flush=True)
        return []

    def run(linear, with_ops: bool):
        def fn():
            h = x
            for w_in, w_out in layers:
                xz = linear(h, w_in)  # (M, 3072)
                u = F.silu(xz[:, :k_out]) if with_ops else xz[:, :k_out]  # (M, 1536): a column slice when direct
                y = linear(u, w_out)  # (M, 768)
                h = h + y if with_ops else y
            return h
        return fn

    backends = {
        "cublas": (F.linear, {}), "skinny": (skinny_linear, {}), "pdl": (pdl_linear, {}),
        "pdl_nopdl": (pdl_linear, {"ZOO_PDL_LINEAR_PDL": "0"}),
        "pdl_early": (pdl_linear, {"ZOO_PDL_LINEAR_TRIGGER": "early"}),
    }
    projections = 2 * CHAIN_LAYERS
    weight_bytes = CHAIN_LAYERS * (k_in * n_in + k_out * n_out) * 2
    floor = floor_ms(weight_bytes + CHAIN_LAYERS * M * (k_in + n_in + k_out + n_out) * 2) / projections
    rows = []
    for variant, with_ops in (("direct", False), ("op", True)):
        ref = run(F.linear, with_ops)()
        t, errs = {}, {}
        for name, (linear, switches) in backends.items():
            with env(**switches):
                fn = run(linear, with_ops)
                errs[name] = rel_err(fn(), ref)
                t[name] = timed(fn, rep=10) / projections  # (a graph of ~50 chains: ~5000 nodes)
            if errs[name] > 0.1:
                raise RuntimeError(f"chain {variant} M={M}: {name} differs from cuBLAS by {errs[name]:.3g}")
        line = "  ".join(f"{k} {v * 1e3:5.2f}" for k, v in t.items())
        print(f"chain {variant:6s} M={M:3d}: us per projection  {line}  floor {floor * 1e3:.2f}  "
              f"(err vs cuBLAS: pdl {errs['pdl']:.1e}, skinny {errs['skinny']:.1e})", flush=True)
        rows.append({
            "name": f"decode_linear/chain-{variant}/M{M}", "card": card, "date": date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
            "shape": {"M": M, "layers": CHAIN_LAYERS, "in_proj": [k_in, n_in], "out_proj": [k_out, n_out],
                      "dtype": "bf16"},
            "ours_ms": round(t["pdl"], 5), "baseline": "cuBLAS (F.linear)", "baseline_ms": round(t["cublas"], 5),
            "ratio": round(t["cublas"] / t["pdl"], 3), "floor_ms": round(floor, 5),
            "skinny_ms": round(t["skinny"], 5), "pdl_nopdl_ms": round(t["pdl_nopdl"], 5),
            "pdl_early_ms": round(t["pdl_early"], 5), "err_vs_cublas": {k: round(v, 5) for k, v in errs.items()},
            "note": f"per projection: one CUDA graph of {CHAIN_LAYERS} layers (in_proj, out_proj on its first half"
                    + (", silu before out_proj, residual add after" if with_ops else ", back to back")
                    + "), each layer its own weights; graph time / " + str(projections),
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=sizes, default="1,16,64")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time a sweep of launch configurations")
    p.add_argument("--chain", action="store_true",
                   help="instead, time chains of dependent projections (24 Mamba-130M-like layers per graph)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    ignored = [flag for flag, given in (("--shapes", args.shapes != p.get_default("shapes")), ("--sweep", args.sweep))
               if given]
    if args.chain and ignored:  # (they were taken and did nothing: the chains have their own shapes and launches)
        p.error(f"{', '.join(ignored)}: options of the single projections, which --chain does not time (its chains are "
                f"Mamba-130M-like in_proj / out_proj layers); leave {'them' if len(ignored) > 1 else 'it'} out")
    if not torch.cuda.is_available():
        sys.exit("decode_linear.py needs a CUDA GPU")
    dev = torch.device("cuda")
    bw = copy_bandwidth()  # bytes/s, read + write counted
    card = torch.cuda.get_device_name(dev)
    print(f"{card}: copy {bw / 1e12:.2f} TB/s", flush=True)
    # Ctrl-C or SIGTERM: the rows measured are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "decode_linear.py") as rows:
        if args.chain:
            for M in args.rows:
                rows.extend(chain(M, dev, card))
        else:
            for name in args.shapes:
                for M in args.rows:
                    rows.append(measure(name, M, args.sweep, dev, card))


if __name__ == "__main__":
    main()
