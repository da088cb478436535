"""Benchmark: our selective-scan CUDA kernel vs mamba_ssm selective_scan_cuda, the torch reference, a floor.

Shapes of the Mamba-1 130M and 370M layers (d_inner D = 1536 and 2048, N = 16) at B·L = 16K tokens, and
L = 8192 (B = 2); bf16 with D, z, delta_bias and softplus, B and C per token — the mixer's call. "fwd" runs
without autograd (inference: neither kernel keeps anything for a backward pass except mamba_ssm, which
always writes its chunk states); "fwd+bwd" is the forward with grad and torch.autograd.grad of every input.

The mamba_ssm baseline is built here from its sdist (its 10 selective_scan sources, for the present GPU
only, ~150 s at MAX_JOBS=16), in a background process started first, while ours and the reference are
timed; it is then imported without running mamba_ssm/__init__.py:

    python benchmarks/selective_scan.py [--baselines .baselines] [--out benchmarks/results.jsonl]
    python benchmarks/selective_scan.py --build-mamba .baselines   # only the baseline build (background)

.baselines/ holds mamba_ssm-2.3.2.post1.tar.gz (copied from /work/shared/baselines; unpacked into
.baselines/ss_mamba/ on first use).

Floor: max(bytes / measured copy bandwidth, exponentials / measured ex2 rate), the bytes being each pass's
inputs read and outputs written once (fwd: u, delta, z, B, C in, out out; the backward reads u, delta, z, B, C
again with dout, and writes du, ddelta, dz, dB, dC: a training step's minimum, as conv1d.py counts it) and the
exponentials B·L·D·N per pass over the recurrence (1 forward,
2 forward+backward: the backward needs exp(delta A) again or memory for it). The ex2 rate is timed with
an ex2.approx kernel (CuPy, NVRTC); the copy bandwidth with a 1 GiB device-to-device copy.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import tarfile
import time
import types

import torch
from ceilings import rows_kept_on_interrupt  # benchmarks/ceilings.py (the script's folder is on sys.path)

MAMBA = "mamba_ssm-2.3.2.post1"
SHAPES = [  # label, batch, length, dim
    ("130M", 8, 2048, 1536),
    ("370M", 8, 2048, 2048),
    ("130M L=8192", 2, 8192, 1536),
]
N_STATE = 16


# --------------------------------------------------------------------------------------------------
# mamba_ssm baseline build (runs in its own process)

def mamba_paths(root: str) -> tuple[str, str]:
    """(unpacked sdist, build directory), both under ROOT/ss_mamba (unpacked here on first use)."""
    own = os.path.join(root, "ss_mamba")
    src = os.path.join(own, MAMBA)
    if not os.path.isdir(os.path.join(src, "csrc", "selective_scan")):
        with tarfile.open(os.path.join(root, f"{MAMBA}.tar.gz")) as tar:
            tar.extractall(own, filter="data")
    return src, os.path.join(own, "build")


def load_mamba_extension(root: str, verbose: bool = False):
    """Builds (or, when up to date, just loads) mamba_ssm's selective_scan_cuda for this GPU."""
    from torch.utils.cpp_extension import load

    src, build_dir = mamba_paths(root)
    csrc = os.path.join(src, "csrc", "selective_scan")
    names = ["selective_scan.cpp"] + [f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + [
        f"selective_scan_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")]
    major, minor = torch.cuda.get_device_capability()
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
             "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
             "-gencode", f"arch=compute_{major}{minor},code=sm_{major}{minor}"]  # mamba_ssm's setup.py flags
    return load(name="selective_scan_cuda", sources=[os.path.join(csrc, n) for n in names],
                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=flags, extra_include_paths=[csrc],
                build_directory=build_dir, verbose=verbose)


def build_mamba_main(root: str) -> None:
    _, build_dir = mamba_paths(root)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "BUILDING"), "w") as f:  # this process's id: a waiter sees whether it lives
        f.write(str(os.getpid()))
    marker = os.path.join(build_dir, "STATUS")
    t0 = time.time()
    try:
        load_mamba_extension(root, verbose=True)
        status = f"ok {time.time() - t0:.0f}s"
    except Exception as exc:  # noqa: BLE001 - the benchmark reports a failed baseline instead of dying
        status = f"failed {time.time() - t0:.0f}s: {exc!r}"
    with open(marker, "w") as f:
        f.write(status)
    print(status)


def build_running(build_dir: str) -> bool:
    """Whether the process named in BUILD_DIR/BUILDING, a build of mamba_ssm's extension, is still running. A build
    killed before writing STATUS (Ctrl-C, `timeout`'s SIGTERM to the process group) left BUILDING behind, and every
    later run waited for its STATUS forever; a marker without a process id (written before it held one) is stale."""
    try:
        with open(os.path.join(build_dir, "BUILDING")) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that id
        return True
    return True


def import_mamba(root: str):
    """selective_scan_fn from the sdist, with the built extension and without mamba_ssm/__init__.py."""
    ext = load_mamba_extension(root)
    sys.modules["selective_scan_cuda"] = ext
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [os.path.join(mamba_paths(root)[0], "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


# --------------------------------------------------------------------------------------------------
# measurement

def bench(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 28, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


EX2_SRC = r"""
extern "C" __global__ void ex2_rate(float* out, int iters) {
  float a[8];
  for (int k = 0; k < 8; ++k) a[k] = -1e-3f * (threadIdx.x + k);
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int k = 0; k < 8; ++k) asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(a[k]));
  }
  float s = 0.f;
  for (int k = 0; k < 8; ++k) s += a[k];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def ex2_rate() -> tuple[float, str]:
    """ex2.approx per second over the whole GPU, timed with CuPy; or the nominal 16/clk/SM rate."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import cupy

        kernel = cupy.RawKernel(EX2_SRC, "ex2_rate")
        blocks, threads, iters = sms * 8, 256, 4096
        out = cupy.empty(blocks * threads, dtype=cupy.float32)
        kernel((blocks,), (threads,), (out, cupy.int32(iters)))
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(5):
            start.record()
            kernel((blocks,), (threads,), (out, cupy.int32(iters)))
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
        ms = sorted(times)[len(times) // 2]
        return blocks * threads * 8 * iters / (ms * 1e-3), "measured (CuPy ex2.approx.ftz kernel)"
    except Exception as exc:  # noqa: BLE001
        return sms * 16 * 1.98e9, f"nominal 16/clk/SM at 1.98 GHz (CuPy unavailable: {exc!r})"


def make_inputs(batch, length, dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(bf)

    A = -torch.arange(1, N_STATE + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)  # S4D-real
    dt = torch.rand(dim, device="cuda", generator=g) * 0.099 + 0.001
    return {
        "u": rnd(batch, dim, length), "delta": rnd(batch, dim, length, scale=0.1), "A": A,
        "B": rnd(batch, N_STATE, length), "C": rnd(batch, N_STATE, length),
        "D": torch.ones(dim, device="cuda"), "z": rnd(batch, dim, length),
        "delta_bias": torch.log(torch.expm1(dt)),  # softplus^-1 of dt in [0.001, 0.1]
    }


def call(fn, inp):
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], True)
    return fn(*args)


def timings(fn, inp) -> tuple[float, float]:
    """(fwd ms without autograd, fwd+bwd ms with torch.autograd.grad of every input)."""
    with torch.no_grad():
        fwd = bench(lambda: call(fn, inp))
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    dout = torch.randn_like(inp["u"])
    params = list(leaves.values())

    def step():
        out = call(fn, leaves)
        torch.autograd.grad(out, params, dout)

    return fwd, bench(step)


def floors(batch, length, dim, bw, ex2) -> tuple[float, float]:
    tok = batch * length
    fwd_bytes = 2 * tok * (4 * dim + 2 * N_STATE)  # u, delta, z in; out; B, C in (bf16)
    # + dout in; du, ddelta, dz out (bf16); dB, dC out (fp32 accumulators)
    bwd_bytes = 2 * tok * (7 * dim + 2 * N_STATE) + 4 * tok * 2 * N_STATE
    exps = tok * dim * N_STATE
    fwd = max(fwd_bytes / bw, exps / ex2) * 1e3
    both = max((fwd_bytes + bwd_bytes) / bw, 2 * exps / ex2) * 1e3
    return fwd, both


def make_rows(results: dict, card: str, date: str, command: str, bw: float, ex2: float) -> list[dict]:
    """results.jsonl's rows of the shapes in `results` (label -> ours, ref, floor: (fwd, fwd+bwd) ms; mamba and
    err_vs_mamba once measured), in SHAPES' order: per shape and pass, ours beside mamba_ssm, the torch reference
    (each where timed) and the floor, one row after the other (benchmarks/report.py reads a figure's rows as one
    run's only when they are)."""
    rows = []
    for label, batch, length, dim in SHAPES:
        r = results.get(label)
        if r is None:
            continue
        for i, what in enumerate(("fwd", "fwd+bwd")):
            ours, floor = r["ours"][i], r["floor"][i]
            mamba = r.get("mamba", (math.nan, math.nan))[i]
            ref = r["ref"][i]
            name = f"selective_scan {what} {label} (B={batch}, L={length}, D={dim}, N={N_STATE}, bf16)"
            extra = {"floor_ms": floor, "ours_over_floor": ours / floor, "copy_TBps": bw / 1e12,
                     "ex2_Tps": ex2 / 1e12, "err_vs_mamba": r.get("err_vs_mamba")}
            common = {"name": name, "card": card, "date": date, "command": command, "ours_ms": ours}
            for baseline, base_ms in ((f"mamba_ssm {MAMBA[10:]} selective_scan_cuda", mamba),
                                      ("torch reference selective_scan_ref", ref)):
                if not math.isnan(base_ms):
                    rows.append({**common, "baseline": baseline, "baseline_ms": base_ms,
                                 "ratio": base_ms / ours, **extra})
            rows.append({**common, "baseline": "floor", "baseline_ms": floor, "ratio": floor / ours, **extra})
    return rows


def table(results: dict) -> list[str]:
    """The markdown table of the shapes in `results`, as make_rows takes them."""
    lines = ["| shape | pass | ours ms | mamba_ssm ms | speedup | torch ref ms | floor ms | ours / floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, _, _, _ in SHAPES:
        r = results.get(label)
        if r is None:
            continue
        for i, what in enumerate(("fwd", "fwd+bwd")):
            ours, floor, ref = r["ours"][i], r["floor"][i], r["ref"][i]
            mamba = r.get("mamba", (math.nan, math.nan))[i]
            lines.append(f"| {label} | {what} | {ours:.3f} | {mamba:.3f} | {mamba / ours:.2f}x | {ref:.2f} | "
                         f"{floor:.3f} | {ours / floor:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", default=".baselines")
    ap.add_argument("--out", default="benchmarks/results.jsonl")
    ap.add_argument("--build-mamba", metavar="ROOT", help="only build mamba_ssm's extension under ROOT")
    ap.add_argument("--skip-ref", action="store_true", help="do not time the torch reference")
    args = ap.parse_args()
    if args.build_mamba:
        build_mamba_main(args.build_mamba)
        return

    root = args.baselines
    builder = None
    status_file = None
    if os.path.exists(os.path.join(root, f"{MAMBA}.tar.gz")):
        _, build_dir = mamba_paths(root)
        status_file = os.path.join(build_dir, "STATUS")
        if not os.path.exists(status_file) and not build_running(build_dir):
            log = open(os.path.join(root, "ss_mamba", "build.log"), "w")
            env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "10"))
            builder = subprocess.Popen([sys.executable, __file__, "--build-mamba", root], stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
    else:
        print(f"no {MAMBA}.tar.gz under {root}: mamba_ssm baseline skipped")

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    from zoo_kernels.selective_scan import cuda as ss_cuda
    from zoo_kernels.selective_scan.ref import selective_scan_ref

    t0 = time.time()
    if not ss_cuda.available():
        raise SystemExit(ss_cuda.why_unavailable())
    print(f"our extension ready in {time.time() - t0:.0f}s")
    card = torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    command = "python " + " ".join(sys.argv)
    bw = copy_bandwidth()
    ex2, ex2_how = ex2_rate()
    print(f"{card}: copy {bw / 1e12:.2f} TB/s; ex2 {ex2 / 1e12:.2f} T/s ({ex2_how})")

    results = {}
    # Ctrl-C or SIGTERM: the rows of every figure measured so far (ours beside the torch reference and the floor, then
    # beside mamba_ssm) are written, noted as cut short, and the run exits 130; they were written only after the last
    # phase (mamba_ssm's build awaited, its timings), and an interruption lost them all
    with rows_kept_on_interrupt(args.out, "selective_scan.py") as rows:
        for label, batch, length, dim in SHAPES:
            inp = make_inputs(batch, length, dim)
            ours = timings(ss_cuda.selective_scan_cuda, inp)
            ref = (float("nan"), float("nan")) if args.skip_ref else timings(selective_scan_ref, inp)
            results[label] = {"ours": ours, "ref": ref, "floor": floors(batch, length, dim, bw, ex2)}
            rows[:] = make_rows(results, card, date, command, bw, ex2)
            print(f"{label}: ours fwd {ours[0]:.3f} ms, fwd+bwd {ours[1]:.3f} ms; "
                  f"ref {ref[0]:.2f} / {ref[1]:.2f} ms")
            del inp
            torch.cuda.empty_cache()

        mamba_fn, mamba_note = None, "not built"
        if status_file is not None:
            if builder is not None:
                builder.wait()
            while not os.path.exists(status_file) and build_running(build_dir):  # a build started by someone else
                time.sleep(2)
            if os.path.exists(status_file):
                status = open(status_file).read()
            else:  # (its process ended without writing STATUS: killed; the next run builds again)
                status = "failed: the build's process ended without a status (killed?)"
            mamba_note = status
            if status.startswith("ok"):
                mamba_fn = import_mamba(root)
            print(f"mamba_ssm build: {status}")
        for label, batch, length, dim in SHAPES:
            if mamba_fn is None:
                break
            inp = make_inputs(batch, length, dim)
            mamba = timings(mamba_fn, inp)
            with torch.no_grad():
                a = call(ss_cuda.selective_scan_cuda, inp).float()
                b = call(mamba_fn, inp).float()
            results[label]["mamba"] = mamba
            results[label]["err_vs_mamba"] = ((a - b).norm() / b.norm()).item()
            rows[:] = make_rows(results, card, date, command, bw, ex2)
            del inp
            torch.cuda.empty_cache()

    lines = table(results)
    print(f"\n{card}, {date}, `{command}`; mamba_ssm: {mamba_note}; floor from copy {bw / 1e12:.2f} TB/s "
          f"and ex2 {ex2 / 1e12:.2f} T/s ({ex2_how})\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
