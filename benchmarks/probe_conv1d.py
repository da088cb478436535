"""Probe: A/B builds of our causal conv1d backward kernel against each other and Dao-AILab's causal_conv1d.

Builds the conv extension once per variant (the source at a git revision, or today's source with -D knobs of
csrc/causal_conv1d.cu such as ZOO_CONV_BWD_CHUNKS=4), in parallel worker processes, then for each variant:
checks forward and every gradient against the torch reference (bf16 and fp32, with documents and an initial
state, lengths that cross block boundaries), and times fwd and fwd+bwd at benchmarks/conv1d.py's shapes from CUDA
graphs, beside causal_conv1d 1.7.0 when BASELINES has it. Results are printed, not written to results.jsonl:
benchmarks/conv1d.py measures the shipped kernel.

    python benchmarks/probe_conv1d.py [--baselines .baselines] [--variant NAME=REV|NAME=-DKNOB=V,...]...
    ncu -k regex:bwd python benchmarks/probe_conv1d.py --profile   # one fwd+bwd per variant (and causal_conv1d)

A variant `old=HEAD~1` takes csrc/ from that revision (git show); `c4=-DZOO_CONV_BWD_CHUNKS=4` today's source with
that define; `new=` today's source as is; `old=PATH` the sources in that folder (a copy of csrc/, for a machine
whose git history is behind).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "kernels"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SOURCES = ("causal_conv1d_api.cpp", "causal_conv1d.cu")
HEADERS = ("causal_conv1d.h",)
CSRC = "kernels/zoo_kernels/conv1d/csrc"


def variant_source(spec: str, scratch: Path, name: str) -> tuple[Path, tuple[str, ...]]:
    """(csrc folder, defines) of a variant spec: '' (today's), 'REV' (git revision), a folder holding the
    sources, or '-DA=1,-DB=2'."""
    if not spec:
        return ROOT / CSRC, ()
    if Path(spec).is_dir():
        return Path(spec).resolve(), ()
    if spec.startswith("-D"):
        return ROOT / CSRC, tuple(d[2:] for d in spec.split(","))
    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in SOURCES + HEADERS:
        text = subprocess.run(["git", "show", f"{spec}:{CSRC}/{f}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (folder / f).write_text(text)
    return folder, ()


def build(csrc: str, defines: tuple[str, ...], prefix: str):
    from zoo_kernels.selective_scan.cuda import build_extension

    return build_extension(SOURCES, HEADERS, Path(csrc), prefix, defines)


def build_quiet(csrc: str, defines: tuple[str, ...], prefix: str) -> str:
    build(csrc, defines, prefix)
    return prefix


@contextlib.contextmanager
def using(conv_cuda, ext):
    """zoo_kernels.conv1d.cuda calls EXT inside the block, forward and backward."""
    saved = conv_cuda._module
    conv_cuda._module = lambda: ext
    try:
        yield
    finally:
        conv_cuda._module = saved


def check(ext, conv_cuda, ref) -> float:
    """Worst relative error over outputs and gradients of a few cases (bf16 and fp32, docs, init)."""
    worst = 0.0
    with using(conv_cuda, ext):
        cases = [(2, 8, 5000, 4, torch.bfloat16, 7), (1, 4, 4500, 4, torch.bfloat16, 1500),
                 (1, 3, 3000, 3, torch.float32, 1000), (2, 16, 2048, 4, torch.bfloat16, 0),
                 (1, 5, 1023, 2, torch.float16, 40), (2, 4, 9, 4, torch.float32, 2)]
        for batch, dim, length, width, dtype, docs in cases:
            g = torch.Generator(device="cuda").manual_seed(length)
            x = torch.randn(batch, dim, length, device="cuda", generator=g).to(dtype).requires_grad_(True)
            w = (torch.randn(dim, width, device="cuda", generator=g) * 0.5).requires_grad_(True)
            b = torch.randn(dim, device="cuda", generator=g).requires_grad_(True)
            h = torch.randn(batch, dim, width - 1, device="cuda", generator=g).requires_grad_(True)
            seq = None
            if docs:
                marks = torch.zeros(batch, length, dtype=torch.int32, device="cuda")
                for r in range(batch):
                    marks[r, torch.randperm(length - 1, device="cuda", generator=g)[:docs] + 1] = 1
                seq = marks.cumsum(1, dtype=torch.int32)
            leaves = (x, w, b, h)
            y = conv_cuda.causal_conv1d_cuda(x, w, b, seq, h, "silu")
            dy = torch.randn_like(y)
            grads = torch.autograd.grad(y, leaves, dy)
            r_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
            y_ref = ref(*r_leaves[:3], seq, r_leaves[3], "silu")
            r_grads = torch.autograd.grad(y_ref, r_leaves, dy)
            for a, e in zip((y, *grads), (y_ref, *r_grads)):
                err = ((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12)).item()
                worst = max(worst, err)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", default=".baselines")
    ap.add_argument("--variant", action="append", default=[], help="NAME=SPEC (see above); default old=HEAD, new=")
    ap.add_argument("--profile", action="store_true", help="one fwd+bwd per variant at the 130M shape, for ncu")
    args = ap.parse_args()
    specs = [v.split("=", 1) for v in (args.variant or ["old=HEAD", "new="])]
    import conv1d as bench_mod
    from zoo_kernels.conv1d import cuda as conv_cuda
    from zoo_kernels.conv1d.ref import causal_conv1d_ref

    scratch = Path(tempfile.mkdtemp(prefix="probe_conv1d_"))
    plan = []
    for name, spec in specs:
        csrc, defines = variant_source(spec, scratch, name)
        plan.append((name, spec, str(csrc), defines, f"zoo_conv_probe_{name}"))
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(plan), mp_context=spawn) as pool:  # the builds, in parallel
        list(pool.map(build_quiet, *zip(*[(c, d, p) for _, _, c, d, p in plan])))
    exts = {name: build(c, d, p) for name, _, c, d, p in plan}

    dao_fn = bench_mod.load_causal_conv1d(args.baselines)

    def ours(x, w, b):
        return conv_cuda.causal_conv1d_cuda(x, w, b, None, None, "silu")

    if args.profile:
        x = torch.randn(8, 1536, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(1536, 4, device="cuda", requires_grad=True)
        b = torch.randn(1536, device="cuda", requires_grad=True)
        for name, ext in exts.items():
            with using(conv_cuda, ext):
                torch.autograd.grad(ours(x, w, b), (x, w, b), torch.randn_like(x))
            torch.cuda.synchronize()
            print(f"{name}: one fwd+bwd done")
        if dao_fn is not None:
            torch.autograd.grad(dao_fn(x, w, b, activation="silu"), (x, w, b), torch.randn_like(x))
            torch.cuda.synchronize()
            print("causal_conv1d: one fwd+bwd done")
        return

    for name, spec, *_ in plan:
        worst = check(exts[name], conv_cuda, causal_conv1d_ref)
        print(f"{name} ({spec or 'today'}): worst relative error vs the reference {worst:.2e}")
    bw = bench_mod.copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; ms per call (of floor), fwd / fwd+bwd, CUDA graphs of 10 calls")
    for label, batch, dim, length in bench_mod.SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, dim, length, device="cuda", generator=g).to(torch.bfloat16)
        w = torch.randn(dim, 4, device="cuda", generator=g) * 0.5
        b = torch.randn(dim, device="cuda", generator=g)
        elems = batch * dim * length
        floor = (2 * 2 * elems / bw * 1e3, 2 * 5 * elems / bw * 1e3)
        runs = [(name, ours, ext) for name, ext in exts.items()]
        if dao_fn is not None:
            runs.append(("causal_conv1d", lambda x, w, b: dao_fn(x, w, b, activation="silu"), None))
        cells = []
        for name, fn, ext in runs:
            with using(conv_cuda, ext) if ext is not None else contextlib.nullcontext():
                t = bench_mod.timings(fn, x, w, b)
            cells.append(f"{name} {t[0]:.4f} ({floor[0] / t[0]:.0%}) / {t[1]:.4f} ({floor[1] / t[1]:.0%})")
        print(f"{label}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
