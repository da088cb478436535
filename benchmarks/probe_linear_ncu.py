"""Probe for Nsight Compute: one decode projection per backend at M rows, so `ncu` can say where a kernel's time goes.

Runs, for each shape, F.linear (cuBLAS) and zoo_kernels.pdl_linear (its default tiling, then each --configs tiling)
`--repeat` times on random bf16 data, with a synchronize between backends; nothing is timed here (ncu times and
counts each launch). On the GPU machine:

    ncu --clock-control none --set full -k regex:'pdl_linear|gemm|sm90|cutlass' -o $OUT/lin64 \\
        python benchmarks/probe_linear_ncu.py --rows 64
    ncu --import $OUT/lin64.ncu-rep --page details > $OUT/lin64.txt
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

SHAPES = {"in_proj": (768, 3072), "out_proj": (1536, 768)}  # Mamba-130M: name -> (K, N)


def tilings(text: str) -> list[tuple[int, int]]:
    """--configs as argparse's type: 'tiles,cluster' items split by ';', each of pdl_linear's tilings (a bad one
    failed in a traceback after the kernels were loaded on the GPU)."""
    from zoo_kernels.pdl_linear import CLUSTERS, FEATURE_TILES

    try:
        configs = [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        configs = [()]
    if any(len(c) != 2 or c[0] not in FEATURE_TILES or c[1] not in CLUSTERS for c in configs):
        raise argparse.ArgumentTypeError(f"expected 'tiles,cluster' items split by ';' with tiles in {FEATURE_TILES} "
                                         f"and cluster in {CLUSTERS}, such as 2,1;4,2, got {text!r}")
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--configs", type=tilings, default=[], help="extra pdl_linear tilings 'tiles,cluster;tiles,cluster'")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_linear_ncu.py needs a CUDA GPU")
    from zoo_kernels.pdl_linear import _config, pdl_linear

    configs = args.configs
    for name, (K, N) in SHAPES.items():
        x = torch.randn(args.rows, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        ref = F.linear(x, w)
        print(name, "default tiling", _config(args.rows, N, K, x.device), flush=True)
        for _ in range(args.repeat):
            F.linear(x, w)
        torch.cuda.synchronize()
        for config in [None, *configs]:
            for _ in range(args.repeat):
                y = pdl_linear(x, w, config=config)
            torch.cuda.synchronize()
            print(name, config, "max |err|", float((y.float() - ref.float()).abs().max()), flush=True)


if __name__ == "__main__":
    main()
