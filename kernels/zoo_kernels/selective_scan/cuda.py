"""Our Mamba-1 selective-scan CUDA kernels: JIT build, autograd Function, single-step decode update.

The sources in csrc/ are compiled at first use with nvcc through `torch.utils.cpp_extension.load`
(ninja), for the present GPU's architecture only, into cache_dir()/zoo_selective_scan/<key> (a user cache
folder, never the package's own, which an installed wheel may not let us write), the key hashing the sources
with the torch and CUDA versions and the architecture (so a rebuild happens only when one of them changes).
`available()` never raises: when there is no nvcc, no ninja or the build fails it
returns False and `why_unavailable()` says why.

Kernel design (csrc/selective_scan_kernels.cuh): every lane of a warp runs the recurrence of a channel's
states (two per lane in the forward from N = 8, one in the backward below N = 64) sequentially over time
in registers; chunks of 64 steps are staged in shared memory; the forward keeps the state after every
chunk, the backward re-runs each chunk's forward from it and then the reverse (adjoint) recurrence, with
dh_final injected at the end and dh0 returned at the start.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from zoo_kernels._checks import device_problem, first_problem, raise_if, require_cuda, shape_problem
from zoo_kernels._env import env_flag
from zoo_kernels._grad import needs_grad

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (
    "selective_scan_api.cpp",
    "selective_scan_fwd.cu",
    "selective_scan_bwd_fp32.cu",
    "selective_scan_bwd_bf16.cu",
    "selective_scan_bwd_fp16.cu",
    "selective_state_update.cu",
)
_HEADERS = ("selective_scan.h", "selective_scan_kernels.cuh")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STATE = 64

def cache_dir() -> Path:
    """Root of the JIT build cache: $ZOO_KERNELS_CACHE, else hybrid-zoo/ in $XDG_CACHE_HOME or ~/.cache (where torch
    keeps its own extensions). An empty variable counts as unset (it was the working directory), and ~ is expanded
    (a variable set in an env file, not by a shell, made a folder named ~)."""
    own = os.environ.get("ZOO_KERNELS_CACHE")
    if own:
        return Path(own).expanduser().absolute()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hybrid-zoo"


def build_extension(sources: tuple[str, ...], headers: tuple[str, ...], csrc: Path, prefix: str,
                    defines: tuple[str, ...] = ()):
    """JIT-builds csrc/sources for the current GPU's architecture; returns the loaded module.

    defines: preprocessor names set for every source (-DNAME), part of the build's cache key.

    Raises RuntimeError with the reason (no nvcc, no ninja, compiler error) when it cannot; $ZOO_KERNELS_VERBOSE=1
    prints the build's commands.
    """
    from torch.utils import cpp_extension

    verbose = env_flag("ZOO_KERNELS_VERBOSE", False)

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        raise RuntimeError(
            "nvcc not found: install the CUDA toolkit matching torch.version.cuda "
            f"({torch.version.cuda}) or set CUDA_HOME"
        )
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja not found: pip install ninja")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    digest = hashlib.sha256()
    for name in sources + headers:
        digest.update(name.encode())
        digest.update((csrc / name).read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|sm_{arch}".encode())
    if defines:  # (no defines: the key of every earlier build, so their caches stay valid)
        digest.update(("|" + ",".join(defines)).encode())
    name = f"{prefix}_{digest.hexdigest()[:16]}"
    flags = [f"-D{d}" for d in defines]
    build_dir = cache_dir() / prefix / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot write the build folder ({e}): set ZOO_KERNELS_CACHE to a writable folder") from e
    return cpp_extension.load(
        name=name,
        sources=[str(csrc / s) for s in sources],
        build_directory=str(build_dir),
        extra_cflags=["-O3", *flags],
        extra_cuda_cflags=["-O3", "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-lineinfo", *flags],
        verbose=verbose,
    )


class JitExtension:
    """A CUDA extension built with build_extension at its first use, once per process, for every caller.

    `available()` never raises (but for a bad $ZOO_KERNELS_VERBOSE): without a CUDA device, below `min_capability`,
    or when the build fails it returns False and `why_unavailable()` says why; `module()` returns the extension or
    raises with that reason."""

    def __init__(self, what: str, sources: tuple[str, ...], headers: tuple[str, ...], csrc: Path, prefix: str,
                 min_capability: tuple[int, int] | None = None, needs: str = "", defines: tuple[str, ...] = ()):
        self.what, self.sources, self.headers, self.csrc, self.prefix = what, sources, headers, csrc, prefix
        self.min_capability, self.needs, self.defines = min_capability, needs, defines
        self._ext = None
        self._why: str | None = None
        self._lock = threading.Lock()

    def available(self) -> bool:
        """True when the extension is built (building it on first call); never raises."""
        if self._ext is not None:
            return True
        if self._why is not None:
            return False
        with self._lock:
            if self._ext is None and self._why is None:
                env_flag("ZOO_KERNELS_VERBOSE", False)  # a bad value raises here, not as a kernel unavailable for good
                try:
                    if not torch.cuda.is_available():
                        raise RuntimeError("no CUDA device")
                    if self.min_capability and torch.cuda.get_device_capability() < self.min_capability:
                        major, minor = self.min_capability
                        raise RuntimeError(f"{self.needs} compute capability {major}.{minor} or newer")
                    self._ext = build_extension(self.sources, self.headers, self.csrc, self.prefix, self.defines)
                except Exception as exc:  # noqa: BLE001 - any build failure means "not available", with the reason
                    self._why = f"{self.what} unavailable: {exc}"
        return self._ext is not None

    def why_unavailable(self) -> str | None:
        """The reason `available()` returned False (None if it did not, or was not called yet)."""
        return self._why

    def module(self):
        if not self.available():
            raise RuntimeError(self._why)
        return self._ext


_EXTENSION = JitExtension("selective-scan CUDA extension", _SOURCES, _HEADERS, _CSRC, "zoo_selective_scan",
                          (8, 0), "the selective-scan kernel needs")


available, why_unavailable, _module = _EXTENSION.available, _EXTENSION.why_unavailable, _EXTENSION.module


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def backward_smem_bytes(nstate: int) -> int:
    """Dynamic shared memory of one block of the backward kernel at N = nstate, in bytes: bwd_smem_bytes of
    csrc/selective_scan_kernels.cuh for N padded to 4, 8, 16, 32 or 64 (mirrored here; a static_assert there pins the
    values): 97,936 up to N = 32, 150,096 at N = 33..64, more than compute capability 8.6, 8.9 and 12.x allow."""
    npad = max(4, 1 << (nstate - 1).bit_length())
    states = 2 if npad == 64 else 1  # per lane
    channels_per_warp = 32 // (npad // states)
    warps = 16 // channels_per_warp if channels_per_warp >= 2 else 8
    channels = warps * channels_per_warp
    pitch, red_pitch, tile, dbc_pitch = 68, 36, 16, 17
    return 4 * (4 * channels * pitch + 2 * npad * pitch + warps * 2 * tile * red_pitch
                + warps * 2 * states * 32 * dbc_pitch + 2 * channels + 4)


_SMEM_OPTIN: dict[int, int | None] = {}


def smem_optin(device: torch.device) -> int | None:
    """The shared memory a block may opt in to on a CUDA device, in bytes (cached per device); None off CUDA or where
    torch does not report it."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM_OPTIN:
        _SMEM_OPTIN[index] = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    return _SMEM_OPTIN[index]


def backward_problem(nstate: int, optin: int | None) -> str | None:
    """Why the backward kernel cannot run at N = nstate on a GPU whose blocks may have `optin` bytes of shared memory
    (None: unknown, taken as enough); None where it can."""
    need = backward_smem_bytes(nstate)
    if optin is None or need <= optin:
        return None
    return (f"the backward kernel at N = {nstate} needs {need} bytes of shared memory per block and this GPU allows "
            f"{optin}: N <= 32 fits, selective_scan_ref takes any N")


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus,
                return_final_state):
        ext = _module()
        dtype = u.dtype
        u_ = u.contiguous()
        delta_ = delta.to(dtype).contiguous()
        B_ = (B if B.dim() == 4 else B.unsqueeze(1)).to(dtype).contiguous()  # (batch, G, N, L)
        C_ = (C if C.dim() == 4 else C.unsqueeze(1)).to(dtype).contiguous()
        z_ = None if z is None else z.to(dtype).contiguous()
        A_, D_, bias_, h0 = _f32(A), _f32(D), _f32(delta_bias), _f32(initial_state)
        seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        save = any(ctx.needs_input_grad)
        out, final_state, ckpt, y_save = ext.fwd(u_, delta_, A_, B_, C_, D_, z_, bias_, bool(delta_softplus),
                                                 h0, seq, save, bool(return_final_state), 1)
        if save:
            ctx.save_for_backward(u_, delta_, A_, B_, C_, D_, z_, bias_, h0, seq, ckpt,
                                  y_save if z is not None else None)
            ctx.softplus = bool(delta_softplus)
            ctx.in_dtypes = tuple(None if t is None else t.dtype
                                  for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
            ctx.bc_dims = (B.dim(), C.dim())
        ctx.set_materialize_grads(False)
        return (out, final_state) if return_final_state else out

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        u, delta, A, B, C, D, z, bias, h0, seq, ckpt, y_save = ctx.saved_tensors
        dout = grads[0]
        dfinal = grads[1] if len(grads) > 1 else None
        dout = torch.zeros_like(u) if dout is None else dout.to(u.dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        need = ctx.needs_input_grad
        du, ddelta, dA, dB, dC, dD, dz, ddb, dh0 = _module().bwd(
            u, delta, A, B, C, D, z, bias, ctx.softplus, h0, seq, ckpt, y_save, dout, dfinal,
            h0 is not None and need[8], 1,
        )
        L = u.shape[-1]
        dB, dC = dB[..., :L], dC[..., :L]
        if ctx.bc_dims[0] == 3:
            dB = dB.squeeze(1)
        if ctx.bc_dims[1] == 3:
            dC = dC.squeeze(1)
        grads_in = (du, ddelta, dA, dB, dC, dD, dz, ddb, dh0)
        out = []
        for i, (g, dt) in enumerate(zip(grads_in, ctx.in_dtypes)):
            out.append(g.to(dt) if need[i] and dt is not None else None)
        return (*out, None, None, None)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, seq_idx=None, return_final_state=False):
    """Selective scan on our CUDA kernel; same arguments, shapes and results as `selective_scan_ref`.

    u, delta, z: [batch, D, L] (fp32, bf16 or fp16; delta and z are cast to u's dtype); A: [D, N] with
    N <= 64; B, C: [batch, N, L] or [batch, G, N, L]; D, delta_bias: [D]; initial_state: [batch, D, N];
    seq_idx: [batch, L] int. Returns out [batch, D, L] in u's dtype, and with return_final_state the
    final state [batch, D, N] fp32. Differentiable in every tensor input, the final state included.
    Raises TypeError for u's dtype, ValueError for other arguments the kernel does not take (`check_scan`),
    RuntimeError off CUDA or where the extension is unavailable.
    """
    check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                                  delta_softplus, return_final_state)


def selective_state_update_cuda(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                dt_weight=None):
    """One decoding step in one kernel launch; updates `state` [batch, D, N] in place, returns y [batch, D].

    x, dt, z: [batch, D]; B, C: [batch, N] or [batch, G, N]; A: [D, N]; D, dt_bias: [D]. dt_weight [D, R]: dt is
    then [batch, R] (a batch stride is taken as it is) and the kernel uses dt @ dt_weight.T (fp32 sums) before
    dt_bias and softplus. The weight is read in x's dtype (cast here if it is not: keep it so across calls).
    Raises ValueError for shapes the kernel does not take (`_update_problem`), RuntimeError off CUDA or where the
    extension is unavailable.
    """
    raise_if("selective_state_update_cuda", _update_problem(state, x, dt, A, B, C, D, z, dt_bias, dt_weight))
    require_cuda("selective_state_update_cuda", x, "selective_state_update_ref")
    ext = _module()
    dtype = x.dtype if x.dtype in _DTYPES else torch.float32

    def unit_stride(t):
        t = t.to(dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    def rows(t):  # [batch, G, N] with unit stride over N and groups N apart; a batch stride is taken as it is
        t = (t if t.dim() == 3 else t.unsqueeze(1)).to(dtype)
        return t if t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2]) else t.contiguous()

    B3, C3 = rows(B), rows(C)
    work = state if state.dtype == torch.float32 and state.is_contiguous() else state.float().contiguous()
    weight = None if dt_weight is None else dt_weight.to(dtype).contiguous()
    y = ext.state_update(work, unit_stride(x), unit_stride(dt), _f32(A), B3, C3, _f32(D),
                         None if z is None else unit_stride(z), _f32(dt_bias), bool(dt_softplus), weight)
    if work is not state:
        state.copy_(work)
    return y.to(x.dtype)


def _bc4(t: torch.Tensor) -> tuple[int, ...]:
    """B's or C's shape as the kernel sees it: [batch, G, N, L] (a [batch, N, L] one gets G = 1)."""
    return tuple(t.shape) if t.dim() == 4 else (t.shape[0], 1, *t.shape[1:])


def _scan_problem(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, seq_idx=None) -> str | None:
    """Why csrc/selective_scan_api.cpp's make_params (nseg = 1) would refuse these inputs once _SelectiveScanFn has
    cast and laid them out (it makes the dtypes and contiguity; u's dtype is check_scan's): their shapes and
    devices; None: it takes them. Reads no device."""
    if u.dim() != 3:
        return f"u must be [batch, D, L], got {tuple(u.shape)}"
    if B.dim() not in (3, 4) or C.dim() not in (3, 4):
        return f"B and C must be [batch, N, L] or [batch, G, N, L], got {tuple(B.shape)} and {tuple(C.shape)}"
    batch, dim, length = u.shape
    _, groups, nstate, _ = _bc4(B)
    if not 1 <= nstate <= MAX_STATE:
        return f"N = {nstate} must be in 1..{MAX_STATE} (use backend='ref')"
    if groups < 1 or dim % groups:
        return f"D = {dim} is not divisible by G = {groups}"
    if length < 1:
        return "empty sequence"
    bc = (batch, groups, nstate, length)
    problem = first_problem(
        shape_problem(delta, "delta", (batch, dim, length)), shape_problem(A, "A", (dim, nstate)),
        None if _bc4(B) == bc else f"B has shape {tuple(B.shape)}, expected {bc} or {bc[:1] + bc[2:]} with G = 1",
        None if _bc4(C) == bc else f"C has shape {tuple(C.shape)}, expected B's {tuple(B.shape)}",
        shape_problem(D, "D", (dim,)), shape_problem(z, "z", (batch, dim, length)),
        shape_problem(delta_bias, "delta_bias", (dim,)),
        shape_problem(initial_state, "initial_state", (batch, dim, nstate)),
        shape_problem(seq_idx, "seq_idx", (batch, length)))
    return problem or device_problem("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                                     initial_state=initial_state, seq_idx=seq_idx)


def check_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, seq_idx=None) -> None:
    """Raises where the kernel would refuse these inputs of selective_scan_cuda (or of the split scan, which passes
    initial_state=None: it makes the segments' own): TypeError for u's dtype, ValueError for N > 64 and every
    other check of the extension (`_scan_problem`), RuntimeError off CUDA; ValueError where a gradient is asked and
    the backward kernel's shared memory exceeds the GPU's (`backward_problem`: N > 32 on compute capability 8.6, 8.9
    and 12.x)."""
    if u.dtype not in _DTYPES:
        raise TypeError(f"selective_scan_cuda: u must be fp32, bf16 or fp16, got {u.dtype}")
    if A.dim() == 2 and A.shape[1] > MAX_STATE:
        raise ValueError(f"selective_scan_cuda: N = {A.shape[1]} > {MAX_STATE}; use backend='ref'")
    raise_if("selective_scan_cuda", _scan_problem(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx))
    require_cuda("selective_scan_cuda", u, "selective_scan_ref")
    if needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state):  # (the backward's launch would fail)
        raise_if("selective_scan_cuda", backward_problem(B.shape[-2], smem_optin(u.device)))


def _update_problem(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_weight=None) -> str | None:
    """Why csrc/selective_scan_api.cpp's state_update would refuse these inputs once selective_state_update_cuda
    has cast and laid them out (it makes the dtypes and strides): their shapes and devices; None: it takes them.
    dt, B, C and z included: the extension does not check their devices (a CPU one was read as device memory)."""
    if x.dim() != 2:
        return f"x must be [batch, D], got {tuple(x.shape)}"
    if B.dim() not in (2, 3) or C.dim() not in (2, 3):
        return f"B and C must be [batch, N] or [batch, G, N], got {tuple(B.shape)} and {tuple(C.shape)}"
    batch, dim = x.shape
    B3, C3 = ((t.shape[0], 1, t.shape[1]) if t.dim() == 2 else tuple(t.shape) for t in (B, C))
    if B3 != C3:
        return f"B and C must have one shape, got {tuple(B.shape)} and {tuple(C.shape)}"
    groups, nstate = B3[1], B3[2]
    if groups < 1 or dim % groups:  # (G = 0: the extension would divide by zero)
        return f"D = {dim} is not divisible by G = {groups}"
    if dt_weight is not None and (dt.dim() != 2 or dt.shape[0] != batch):
        return f"with dt_weight, dt must be [{batch}, R], got {tuple(dt.shape)}"
    problem = first_problem(
        shape_problem(state, "state", (batch, dim, nstate)), shape_problem(A, "A", (dim, nstate)),
        shape_problem(dt_weight, "dt_weight", (dim, dt.shape[-1])) if dt_weight is not None
        else shape_problem(dt, "dt", (batch, dim)),
        shape_problem(z, "z", (batch, dim)), shape_problem(D, "D", (dim,)), shape_problem(dt_bias, "dt_bias", (dim,)))
    return problem or device_problem("x", x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                                     dt_weight=dt_weight)


__all__ = ["available", "why_unavailable", "selective_scan_cuda", "selective_state_update_cuda", "cache_dir",
           "check_scan", "backward_problem", "backward_smem_bytes", "smem_optin"]
