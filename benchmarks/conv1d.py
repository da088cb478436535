"""Benchmark: our causal depthwise conv1d CUDA kernel vs Dao-AILab's causal_conv1d, cuDNN and the memory floor.

Shapes of the Mamba-1 130M / 370M layers' conv (D = 1536 / 2048, W = 4, bias, SiLU, bf16 x) at B·L = 16K
tokens, and L = 8192; our op gets fp32 weight and bias (the mixer's parameters), cuDNN bf16 ones.
cuDNN is timed the two ways a torch user writes it (pad by W-1 then convolve, or convolve with
padding=W-1 and drop the tail), each followed by SiLU; the faster one is the baseline. The floor is the
bytes that must move (fwd: x in, y out; fwd+bwd adds x and dy in, dx out) over the measured
device-to-device copy bandwidth; "of floor" = floor / time, the fraction of bandwidth reached. Every time is one
call's share of 10 calls replayed from a CUDA graph (`bench`): the GPU's time, not the host's launches.

The causal_conv1d baseline (the package mamba_ssm uses) is called as mamba_ssm calls it: causal_conv1d_fn(x,
weight, bias, activation="silu") with the same fp32 weight and bias as ours. It needs causal_conv1d-1.7.0.tar.gz
in BASELINES (copied from /work/shared/baselines; unpacked into BASELINES/cc/ on first use) and its extension:
BASELINES/cc/prebuilt/causal_conv1d_cuda.so if present (benchmarks/prebuild_causal_conv1d.sh builds it on a
machine with nvcc against the GPU machine's torch wheel: building its 4 sources on that machine took more than 7
minutes), else built here for the present GPU with its setup.py's flags. Without the sdist the row is skipped.

    python benchmarks/conv1d.py [--baselines .baselines] [--out benchmarks/results.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tarfile
import time
import types

import torch
import torch.nn.functional as F
from ceilings import rows_kept_on_interrupt  # benchmarks/ceilings.py (the script's folder is on sys.path)

SHAPES = [("130M", 8, 1536, 2048), ("370M", 8, 2048, 2048), ("130M L=8192", 2, 1536, 8192)]
WIDTH = 4
CAUSAL_CONV1D = "causal_conv1d-1.7.0"


def load_causal_conv1d(root: str):
    """causal_conv1d_fn from the sdist under ROOT, its extension built here (cached in ROOT/cc/build), imported
    without the package's __init__; None when ROOT has no sdist."""
    tar = os.path.join(root, f"{CAUSAL_CONV1D}.tar.gz")
    if not os.path.exists(tar):
        return None
    own = os.path.join(root, "cc")
    src = os.path.join(own, CAUSAL_CONV1D)
    if not os.path.isdir(os.path.join(src, "csrc")):
        with tarfile.open(tar) as f:
            f.extractall(own, filter="data")
    prebuilt = os.path.join(own, "prebuilt", "causal_conv1d_cuda.so")  # benchmarks/prebuild_causal_conv1d.sh
    if os.path.exists(prebuilt):
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.ExtensionFileLoader("causal_conv1d_cuda", prebuilt)
        ext = importlib.util.module_from_spec(importlib.util.spec_from_loader("causal_conv1d_cuda", loader))
        loader.exec_module(ext)
        print(f"causal_conv1d: the extension prebuilt by benchmarks/prebuild_causal_conv1d.sh ({prebuilt})")
        return _interface(ext, src)
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    flags = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
             "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
             "-gencode", f"arch=compute_{major}{minor},code=sm_{major}{minor}"]  # its setup.py's flags
    csrc = os.path.join(src, "csrc")
    build = os.path.join(own, "build")
    os.makedirs(build, exist_ok=True)
    t0 = time.time()
    ext = load(name="causal_conv1d_cuda", extra_cflags=["-O3"], extra_cuda_cflags=flags, extra_include_paths=[csrc],
               sources=[os.path.join(csrc, n) for n in ("causal_conv1d.cpp", "causal_conv1d_fwd.cu",
                                                         "causal_conv1d_bwd.cu", "causal_conv1d_update.cu")],
               build_directory=build)
    print(f"causal_conv1d built or loaded in {time.time() - t0:.0f}s")
    return _interface(ext, src)


def _interface(ext, src: str):
    """The package's causal_conv1d_fn over the extension EXT, imported without the package's __init__."""
    sys.modules["causal_conv1d_cuda"] = ext
    pkg = types.ModuleType("causal_conv1d")
    pkg.__path__ = [os.path.join(src, "causal_conv1d")]
    sys.modules["causal_conv1d"] = pkg
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn

    return causal_conv1d_fn


def bench(fn, graph: bool = True, reps: int = 10) -> float:
    """Median ms of one call of FN. With GRAPH, REPS calls are captured in one CUDA graph and timed replayed: a
    call here is 30-300 us of GPU work, so timing it eagerly measured the host's launches (torch.autograd.grad over
    a custom Function), not the kernels; the first runs of this benchmark had ours slower at the 130M shape's
    fwd+bwd than at the larger 370M shape's for that reason."""
    import triton

    fn()
    torch.cuda.synchronize()
    if not graph:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(g.replay, warmup=20, rep=300, return_mode="median") / reps


def copy_bandwidth() -> float:
    x = torch.empty(1 << 28, device="cuda").normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (bench(lambda: y.copy_(x), graph=False) * 1e-3)


def cudnn_pad(x, w, b):
    return F.silu(F.conv1d(F.pad(x, (WIDTH - 1, 0)), w.unsqueeze(1), b, groups=x.shape[1]))


def cudnn_slice(x, w, b):
    return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=WIDTH - 1, groups=x.shape[1])[..., : x.shape[-1]])


def timings(fn, x, w, b) -> tuple[float, float]:
    with torch.no_grad():
        fwd = bench(lambda: fn(x, w, b))
    xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    dy = torch.randn_like(x)

    def step():
        torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), dy)

    return fwd, bench(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", default=".baselines", help=f"folder with {CAUSAL_CONV1D}.tar.gz")
    ap.add_argument("--out", default="benchmarks/results.jsonl")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    from zoo_kernels.conv1d import cuda as conv_cuda

    if not conv_cuda.available():
        raise SystemExit(conv_cuda.why_unavailable())
    card = torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    command = "python " + " ".join(sys.argv)
    bw = copy_bandwidth()
    dao_fn = load_causal_conv1d(args.baselines)
    if dao_fn is None:
        print(f"no {CAUSAL_CONV1D}.tar.gz under {args.baselines}: the causal_conv1d baseline is skipped")

    def dao(x, w, b):
        return dao_fn(x, w, b, activation="silu")

    def ours(x, w, b):  # fp32 weight and bias, as the mixer's parameters are (cuDNN needs them in x's dtype)
        return conv_cuda.causal_conv1d_cuda(x, w, b, None, None, "silu")

    lines = ["| shape | pass | ours ms | of floor | causal_conv1d ms | of floor | speedup | cuDNN ms (best) | of floor "
             "| speedup | floor ms |", "| --- " * 11 + "|"]
    # Ctrl-C or SIGTERM: the rows measured are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "conv1d.py") as rows:
        for label, batch, dim, length in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(batch, dim, length, device="cuda", generator=g).to(torch.bfloat16)
            w = (torch.randn(dim, WIDTH, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
            b = torch.randn(dim, device="cuda", generator=g).to(torch.bfloat16)
            with torch.no_grad():
                y_ref = cudnn_pad(x, w, b).float()
                err = (ours(x, w, b).float() - y_ref).norm() / y_ref.norm()
                err_dao = None if dao_fn is None else ((dao(x, w.float(), b.float()).float() - y_ref).norm()
                                                       / y_ref.norm()).item()
            t_ours = timings(ours, x, w.float(), b.float())
            t_dao = (float("nan"), float("nan")) if dao_fn is None else timings(dao, x, w.float(), b.float())
            t_pad = timings(cudnn_pad, x, w, b)
            t_slice = timings(cudnn_slice, x, w, b)
            elems = batch * dim * length
            floor = (2 * 2 * elems / bw * 1e3, 2 * 5 * elems / bw * 1e3)
            for i, what in enumerate(("fwd", "fwd+bwd")):
                cudnn = min(t_pad[i], t_slice[i])
                how = "pad+conv" if t_pad[i] <= t_slice[i] else "conv(padding)+slice"
                name = f"causal_conv1d {what} {label} (B={batch}, D={dim}, L={length}, W={WIDTH}, silu, bf16)"
                common = {"name": name, "card": card, "date": date, "command": command, "ours_ms": t_ours[i],
                          "floor_ms": floor[i], "ours_of_floor": floor[i] / t_ours[i], "copy_TBps": bw / 1e12,
                          "err_vs_cudnn": err.item(), "timing": "CUDA graph of 10 calls, per call"}
                rows.append({**common, "baseline": f"cuDNN F.conv1d groups=D ({how}) + silu",
                             "baseline_ms": cudnn, "ratio": cudnn / t_ours[i],
                             "cudnn_of_floor": floor[i] / cudnn})
                rows.append({**common, "baseline": "floor", "baseline_ms": floor[i],
                             "ratio": floor[i] / t_ours[i]})
                if dao_fn is not None:
                    rows.append({**common, "baseline": f"{CAUSAL_CONV1D} causal_conv1d_fn (fp32 weight, silu)",
                                 "baseline_ms": t_dao[i], "ratio": t_dao[i] / t_ours[i],
                                 "baseline_of_floor": floor[i] / t_dao[i], "baseline_err_vs_cudnn": err_dao})
                lines.append(f"| {label} | {what} | {t_ours[i]:.3f} | {floor[i] / t_ours[i]:.0%} | {t_dao[i]:.3f} | "
                             f"{floor[i] / t_dao[i]:.0%} | {t_dao[i] / t_ours[i]:.2f}x | {cudnn:.3f} ({how}) | "
                             f"{floor[i] / cudnn:.0%} | {cudnn / t_ours[i]:.2f}x | {floor[i]:.3f} |")
            del x, w, b
            torch.cuda.empty_cache()
    print(f"\n{card}, {date}, `{command}`; floor from a measured copy at {bw / 1e12:.2f} TB/s\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
