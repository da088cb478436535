"""y = x · Wᵀ (+ b) for a decode step's few rows (M ≤ 64), hiding the weight's load behind the previous kernel.

Inside a CUDA-graph decode step every projection took 3.4-5 us on an H200 (cuBLAS and the Triton skinny kernel
alike, benchmarks/RESULTS.md) against ~1-1.5 us for its weight's bytes: launch ramp and DRAM round trips, not
bandwidth. csrc/pdl_linear.cu is launched as a programmatic dependent (PDL) of the stream's previous kernel: its CTAs
start while that kernel still runs, load their slices of the weight (which no kernel of a step writes) into
registers, and only then wait for that kernel and read x. It lets the next kernel launch at its own start, so a
chain of such projections streams one weight after another. Compute capability 9.0 and newer (griddepcontrol,
thread-block clusters); its own small JIT build, like the fused Mamba step's (zoo_kernels.selective_scan.cuda).

`pdl_linear_ref` is the specification (F.linear in fp32). `supported` says whether a call may take the kernel.

Caller's contract: the weight is read before the kernel waits for the previous one, so the weight must not be
written by the stream's kernel just before (nor by the kernel before a run of these launches): true of parameters in
a decode step; after writing a weight, synchronize or launch any other kernel before the projection. x and bias are
read after the wait and may be the previous kernel's outputs. $ZOO_PDL_LINEAR_PDL=0 launches without the PDL
attribute (plain stream order, for A/B runs).

When the next kernel may launch: by default once this one has waited for its predecessor (the late trigger), so a
dependent's early loads overlap this kernel alone. The fused Mamba step, which follows in_proj, loads the layer's
states before its own wait: with an early trigger it could start while the kernel two launches back (a copy that
step_states makes of the states, say) still runs. $ZOO_PDL_LINEAR_TRIGGER=early triggers at the kernel's start (for
A/B runs: benchmarks/decode_linear.py --chain measures both).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo_kernels._device import sm_count
from zoo_kernels._env import bad_value, env_choice, env_flag
from zoo_kernels.selective_scan.cuda import JitExtension

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("pdl_linear_api.cpp", "pdl_linear.cu")
_HEADERS = ("pdl_linear.h",)
_DTYPES = (torch.bfloat16, torch.float16)
MAX_ROWS = 64
FEATURE_TILES = (1, 2, 4, 8)  # 16-feature tiles per cluster (csrc/pdl_linear.h)
CLUSTERS = (1, 2, 4, 8)  # CTAs splitting K

_EXTENSION = JitExtension("PDL decode linear", _SOURCES, _HEADERS, _CSRC, "zoo_pdl_linear", (9, 0),
                          "the PDL linear needs programmatic dependent launch and clusters,")

available, why_unavailable, _module = _EXTENSION.available, _EXTENSION.why_unavailable, _EXTENSION.module


def _problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernel cannot take these tensors' shapes, dtypes and layouts (None: it can); reads no device."""
    if x.dtype not in _DTYPES:
        return f"x must be bf16 or fp16, got {x.dtype}"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"weight and bias must be in x's dtype {x.dtype}"
    if x.dim() < 1 or weight.dim() != 2:
        return f"x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
    N, K = weight.shape
    if x.shape[-1] != K:
        return f"x [..., {x.shape[-1]}] does not match weight [{N}, {K}]"
    if K == 0 or K % 32:
        return f"K = {K} must be a positive multiple of 32"
    if N == 0 or N % 16:
        return f"N = {N} must be a positive multiple of 16"
    if N * K >= 2**31:
        return f"the weight [{N}, {K}] has 2^31 elements or more"
    rows = x.numel() // K
    if rows > MAX_ROWS:
        return f"{rows} rows; at most {MAX_ROWS} (use F.linear)"
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        return "weight must be contiguous and 16-byte aligned"
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous() or bias.data_ptr() % 16):
        return f"bias must be [{N}], contiguous and 16-byte aligned"
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        return "x, weight and bias must be on one device"
    return None


def _rows_aligned(x2: torch.Tensor) -> bool:
    """Whether x2 [M, K]'s rows can be read as they lie: unit stride over K, data and row stride 16-byte aligned."""
    return (x2.stride(-1) == 1 and x2.data_ptr() % 16 == 0
            and (x2.shape[0] <= 1 or x2.stride(0) * x2.element_size() % 16 == 0))


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `pdl_linear` takes x [..., K] and weight [N, K] as they are: CUDA, compute capability 9.0+, bf16/fp16
    (weight and bias in x's dtype), at most 64 rows, K % 32 == 0, N % 16 == 0, the weight (and bias) contiguous,
    16-byte aligned data and row strides, unit stride over K, no gradient asked of it (forward only), and the
    extension builds. Cheap after the first call."""
    if not x.is_cuda or _problem(x, weight, bias) is not None:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    try:
        x2 = x.view(-1, x.shape[-1])  # (no copy: rows that are no view of x would be copied by a kernel)
    except RuntimeError:
        return False
    return _rows_aligned(x2) and available()


# The kernel's per-chunk sizes (csrc/pdl_linear.cu: blocks_per_warp, n_tiles), mirrored here for the tiling rule
# (tests/test_pdl_linear.py checks the mirror against the extension's smem_bytes on the GPU)
_MAX_WEIGHT_BLOCKS, _FRAGMENT_REGS, _X_SMEM_BYTES, _WARPS, _BLOCK_K = 8, 80, 100 * 1024, 8, 32


def _chunk_blocks(M: int, feature_tiles: int) -> int:
    """32-wide k blocks of one chunk (x in shared memory, W in registers) for M rows: a CTA whose K range is longer
    loads its later chunks' weights after the wait."""
    rows = 8 * (1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8)
    kgroups = _WARPS // feature_tiles
    per_warp = min(_MAX_WEIGHT_BLOCKS, (_FRAGMENT_REGS - rows // 2) // 8,
                   _X_SMEM_BYTES // (rows * kgroups * _BLOCK_K * 2))
    return kgroups * per_warp


@functools.lru_cache(maxsize=1024)
def _config_for(N: int, sms: int, K: int | None = None, M: int = 1) -> tuple[int, int]:
    """(feature_tiles, cluster).

    Up to 16 rows: no cluster (every CTA its whole K), and the fewest 16-feature tiles per CTA that keep the grid at
    most one CTA per SM (else the most tiles that divide N). The sweep of every tiling on the H200
    (benchmarks/decode_linear.py --sweep, inside a CUDA graph, twelfth session) picked exactly these at 1 and 16 rows
    for Mamba-130M's in_proj (2, 1: 2.3 us against the cluster-split (8, 4)'s 2.9), its out_proj (1, 1: 2.1 vs 3.0),
    a qkv (2, 1) and a gate_up (2, 1) projection.
    More rows: the same, but a CTA's K range must fit one chunk (all its weight loaded before the wait); where no
    cluster-free tiling does, the fewest CTAs of a cluster split of K that does (out_proj 1536 -> 768: (1, 2))."""
    legal = [t for t in FEATURE_TILES if N % (16 * t) == 0]
    if K is not None and M > 16:
        for cluster in CLUSTERS:
            for tiles in legal:
                range_blocks = -(-K // _BLOCK_K // cluster)
                if N // (16 * tiles) * cluster <= sms and range_blocks <= _chunk_blocks(M, tiles):
                    return tiles, cluster
    for tiles in legal:
        if N // (16 * tiles) <= sms:
            return tiles, 1
    return legal[-1], 1


def _config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    return _config_for(N, sm_count(device), K, M)


def pdl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               config: tuple[int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] with at most 64 rows, on the PDL kernel; y [..., N] contiguous.

    x: bf16 or fp16, unit stride over K (rows may be strided: a column slice is read in place; a row layout the
    kernel cannot read is copied first); weight [N, K] contiguous, bias [N] or None, in x's dtype; K % 32 == 0,
    N % 16 == 0. Sums in fp32. The weight must not be written by the stream's previous kernel (see the module's
    docstring). Forward only: the result has no gradient. `config` = (feature_tiles, cluster) overrides the tiling
    (benchmarks/decode_linear.py sweeps it).
    Raises ValueError for shapes the kernel does not take, RuntimeError off CUDA or where the kernel is unavailable.
    """
    forced = None if config else _forced_config()
    config = config or forced
    pdl = env_flag("ZOO_PDL_LINEAR_PDL", True)  # (the switches first: a bad value is refused on any device)
    late = env_choice("ZOO_PDL_LINEAR_TRIGGER", "late", ("late", "early")) == "late"
    problem = _problem(x, weight, bias) or (config and _config_problem(weight.shape[0], config))
    if problem is not None:
        raise ValueError(f"pdl_linear: {problem}" + (" (set by $ZOO_PDL_LINEAR_CONFIG)" if forced else ""))
    if not x.is_cuda:
        raise RuntimeError("pdl_linear: needs CUDA tensors (pdl_linear_ref is the CPU path)")
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if not _rows_aligned(x2):
        x2 = x2.clone(memory_format=torch.contiguous_format)
    tiles, cluster = config or _config(x2.shape[0], N, K, x.device)
    out = _module().linear(x2, weight, bias, tiles, cluster, pdl, late)
    return out.view(*x.shape[:-1], N)


def _config_problem(N: int, config: tuple[int, int]) -> str | None:
    """Why the kernel cannot take this tiling (None: it can). Checked here, before the extension sees it: its own
    checks (TORCH_CHECK) are a backstop, and on the GPU machine's image a refusal raised there whose message formats
    a number crashed the process (a segfault in libstdc++'s stream code compiled into the extension; thirteenth
    session, benchmarks/NOTES_selective_scan.md)."""
    tiles, cluster = config
    if tiles not in FEATURE_TILES or cluster not in CLUSTERS:
        return f"config {config}: feature tiles in {FEATURE_TILES}, cluster in {CLUSTERS}"
    if N % (16 * tiles) or N // (16 * tiles) > 65535:
        return f"config {config}: N = {N} must be a multiple of {16 * tiles} with at most 65535 tiles"
    return None


def _forced_config() -> tuple[int, int] | None:
    """$ZOO_PDL_LINEAR_CONFIG = "feature_tiles,cluster" forces the tiling of every call (benchmarks), else None;
    tiles and cluster are checked here, whether they fit N by pdl_linear (_config_problem)."""
    return _parse_config(os.environ.get("ZOO_PDL_LINEAR_CONFIG", ""))


@functools.lru_cache(maxsize=64)
def _parse_config(value: str) -> tuple[int, int] | None:
    if not value.strip():
        return None
    expected = f"'feature_tiles,cluster' with feature tiles in {FEATURE_TILES} and cluster in {CLUSTERS}"
    try:
        tiles, cluster = (int(v) for v in value.split(","))
    except ValueError:
        raise bad_value("ZOO_PDL_LINEAR_CONFIG", value, expected) from None
    if tiles not in FEATURE_TILES or cluster not in CLUSTERS:
        raise bad_value("ZOO_PDL_LINEAR_CONFIG", value, expected)
    return tiles, cluster


def pdl_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: F.linear in fp32, rounded to x's dtype. x [..., K], weight [N, K], bias [N] -> [..., N]."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


__all__ = ["MAX_ROWS", "available", "why_unavailable", "supported", "pdl_linear", "pdl_linear_ref"]
