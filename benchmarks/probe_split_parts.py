"""Probe: where the split scan's time goes (B=1, L=16K, D=1536, S=4, bf16, with and without 12 documents per
row), against the unsplit kernel at B=1 x 16K and B=4 x 4K (the same tokens in 384 blocks, what the split's full
scans see). Prints fwd and fwd+bwd times, then torch.profiler's kernel table of 5 split fwd+bwd calls (the scan
kernels, the two Triton passes and the small torch ops). Findings: benchmarks/NOTES_selective_scan.md ("The split
scans its segments in place"); logs: results/gpu-2026-12-03/split-parts-*.txt.

    python benchmarks/probe_split_parts.py
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

CASES = [  # label, batch, length, segments, documents
    ("unsplit B4x4K", 4, 4096, 1, False),
    ("unsplit B4x4K docs", 4, 4096, 1, True),
    ("unsplit B1x16K", 1, 16384, 1, False),
    ("split4 B1x16K", 1, 16384, 4, False),
    ("split4 B1x16K docs", 1, 16384, 4, True),
]


def inputs(gen, batch, length, docs, dim=1536, n_state=16):
    """bf16 scan inputs with gradients on u, Δ, B, C, z; seq_idx with 12 random document starts per row."""
    bf = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    u, z, delta = rnd(batch, dim, length).to(bf), rnd(batch, dim, length).to(bf), (rnd(batch, dim, length) - 2).to(bf)
    B, C = rnd(batch, n_state, length).to(bf), rnd(batch, n_state, length).to(bf)
    A, D, bias = -torch.exp(rnd(dim, n_state) * 0.5), rnd(dim), rnd(dim) * 0.1
    seq = None
    if docs:
        cuts = torch.sort(torch.randint(1, length, (batch, 12), device="cuda", generator=gen), -1).values
        seq = (torch.arange(length, device="cuda")[None, :, None] >= cuts[:, None, :]).sum(-1).int()
    leaves = [t.requires_grad_(True) for t in (u, delta, B, C, z)]
    return (u, delta, A, B, C, D, z, bias), seq, leaves, rnd(batch, dim, length).to(bf)


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_split_parts.py needs a CUDA GPU")
    ss = importlib.import_module("zoo_kernels.selective_scan")
    from zoo_kernels.selective_scan.split import split_scan

    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, batch, length, n_seg, docs in CASES:
        args, seq, leaves, dy = inputs(gen, batch, length, docs)
        if n_seg > 1:
            def fwd(args=args, seq=seq, n_seg=n_seg):
                return split_scan("cuda", n_seg, *args, True, None, seq, False)
        else:
            def fwd(args=args, seq=seq):
                return ss.selective_scan(*args, True, seq_idx=seq, backend="cuda", seq_split=1)

        def fwd_bwd(fwd=fwd, leaves=leaves, dy=dy):
            return torch.autograd.grad(fwd(), leaves, dy)

        with torch.no_grad():
            t_f = bench(fwd)
        print(f"== {label}: fwd {t_f:.3f} ms  fwd+bwd {bench(fwd_bwd):.3f} ms", flush=True)
        if n_seg > 1:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd_bwd()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
                  flush=True)


if __name__ == "__main__":
    main()
