"""A run of Mamba-1 blocks without MLPs decoding one token, in one persistent CUDA launch (Hopper and newer).

Each block is the residual add and RMSNorm, in_proj, the conv, x_proj, dt_proj, the state update and gate, and
out_proj. Decoding them block by block is four dependent kernels per block (add_norm, in_proj, the fused step,
out_proj); at batch 64 their launches and tails, not their bytes, are the cost (27 us per block on an H200 against
~5 us of DRAM traffic). csrc/mamba_layers.cu runs a whole run of blocks in one launch of d_inner / 16 CTAs (one per
SM, all resident), three grid barriers per block (benchmarks/NOTES_selective_scan.md).

`MambaLayers(layers, batch, ...)` holds the kernel's workspace and its table of the layers' tensors;
`run(x, pending, mask)` returns the residual stream after the run (what the next block's add_norm takes, with no
pending output). `mamba_layers_ref` is the same computation in torch, block by block, from the unfused references.
`problem(...)` says why the kernel cannot take a run (None when it can). Forward only: it refuses tensors that need
gradients while autograd is on.

Experimental: it is correct (tests/test_mamba_layers.py) but slower than the model's own chain at every batch on an
H200 (42.2 against 27.8 us per block at batch 64, 15.8 against 10.9 at batch 1; benchmarks/RESULTS.md, fourteenth
session), so the model does not take it. benchmarks/mamba_layers.py measures it, with its phases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo_kernels._checks import shape_problem
from zoo_kernels.selective_scan.cuda import JitExtension
from zoo_kernels.selective_scan.fused_step import mamba_step_ref

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("mamba_layers_api.cpp", "mamba_layers.cu")
_HEADERS = ("mamba_layers.h", "decode_common.cuh", "selective_scan_kernels.cuh", "selective_scan.h")
_EXTENSION = JitExtension("persistent Mamba layers", _SOURCES, _HEADERS, _CSRC, "zoo_mamba_layers", (9, 0),
                          "the persistent Mamba layers kernel needs thread-block clusters,")
available, why_unavailable, _module = _EXTENSION.available, _EXTENSION.why_unavailable, _EXTENSION.module

CLUSTER = 8      # CTAs per cluster (x_proj's sums go through distributed shared memory within one)
CHANNELS = 16    # d_inner channels per CTA (csrc/mamba_layers.h: kCh)
FEATURES = 8     # d_model features of out_proj per CTA (kFeat)
MAX_BATCH = 64
_SS_ROWS = 64    # kSsRows


@dataclass
class MambaLayerTensors:
    """One Mamba block's tensors as the kernel reads them (activation dtype T: bf16 or fp16)."""

    norm_w: torch.Tensor       # [D] T
    in_w: torch.Tensor         # [2E, D] T
    conv_w: torch.Tensor       # [E, W] fp32
    conv_b: torch.Tensor | None  # [E] fp32
    x_w: torch.Tensor          # [R + 2N, E] T
    dt_w: torch.Tensor         # [E, R] T
    dt_b: torch.Tensor | None  # [E] fp32
    A: torch.Tensor            # [E, N] fp32
    D: torch.Tensor | None     # [E] fp32
    out_w: torch.Tensor        # [D, E] T
    conv_state: torch.Tensor   # [batch, E, W - 1] fp32, contiguous (updated in place)
    state: torch.Tensor        # [batch, E, N] fp32 or T, contiguous (updated in place)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.norm_w, self.in_w, self.conv_w, self.conv_b, self.x_w, self.dt_w, self.dt_b, self.A, self.D,
                self.out_w, self.conv_state, self.state)


def _shape_problem(layers: list[MambaLayerTensors], batch: int, dtype: torch.dtype) -> str | None:
    """Why these layers' shapes, dtypes or layouts do not fit the kernel, or why they need autograd, which it has not
    (None when they fit); no device call."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"activations in {dtype} (the kernel takes bf16 or fp16)"
    if not 1 <= batch <= MAX_BATCH:
        return f"batch {batch} (the kernel takes 1..{MAX_BATCH})"
    if not layers:
        return "no layers"
    first = layers[0]
    two_e, d_model = first.in_w.shape
    E = two_e // 2
    R = first.dt_w.shape[1]
    N = first.A.shape[1]
    W = first.conv_w.shape[1]
    ctas = E // CHANNELS
    if E % CHANNELS or ctas % CLUSTER or ctas > 16 * CLUSTER:
        return f"d_inner {E} (a multiple of {CHANNELS * CLUSTER}, at most {16 * CHANNELS * CLUSTER})"
    if d_model != FEATURES * ctas:
        return f"d_model {d_model} with d_inner {E} (the kernel needs expand 2: d_model = d_inner / 2)"
    if d_model % 128:
        return f"d_model {d_model} (a multiple of 128)"
    if N != 16:
        return f"d_state {N} (the kernel takes 16)"
    if R % 8 or not 8 <= R <= 64:
        return f"dt_rank {R} (a multiple of 8 up to 64)"
    if not 2 <= W <= 4:
        return f"d_conv {W} (2..4)"
    P = R + 2 * N
    for i, t in enumerate(layers):
        want = {"norm_w": ((d_model,), dtype), "in_w": ((2 * E, d_model), dtype), "conv_w": ((E, W), torch.float32),
                "conv_b": ((E,), torch.float32), "x_w": ((P, E), dtype), "dt_w": ((E, R), dtype),
                "dt_b": ((E,), torch.float32), "A": ((E, N), torch.float32), "D": ((E,), torch.float32),
                "out_w": ((d_model, E), dtype), "conv_state": ((batch, E, W - 1), torch.float32),
                "state": ((batch, E, N), None)}
        for name, (shape, dt) in want.items():
            v = getattr(t, name)
            if v is None:
                if name in ("conv_b", "dt_b", "D"):
                    continue
                return f"layer {i}: {name} missing"
            why = shape_problem(v, f"layer {i}: {name}", shape)
            if why is not None:
                return why
            if dt is not None and v.dtype != dt:
                return f"layer {i}: {name} is {v.dtype}, expected {dt}"
        if t.state.dtype not in (torch.float32, dtype):
            return f"layer {i}: state is {t.state.dtype} (fp32 or the activations' {dtype})"
        if t.state.dtype != first.state.dtype:
            return f"layer {i}: state dtype differs from layer 0's"
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for t in layers for v in t.tensors()):
        return "a tensor needs gradients (the kernel is forward only: decoding without autograd)"
    for i, t in enumerate(layers):
        for name, v in zip(_NAMES, t.tensors()):
            if v is not None and (not v.is_cuda or not v.is_contiguous() or v.data_ptr() % 16):
                return f"layer {i}: {name} must be a contiguous, 16-byte aligned CUDA tensor"
    return None


_NAMES = ("norm_w", "in_w", "conv_w", "conv_b", "x_w", "dt_w", "dt_b", "A", "D", "out_w", "conv_state", "state")


def problem(layers: list[MambaLayerTensors], batch: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take this run (None when it can): the shapes (_shape_problem), the extension, the
    shared memory and whether every CTA can be resident at once (the grid barriers need it)."""
    why = _shape_problem(layers, batch, dtype)
    if why is not None:
        return why
    if not available():
        return why_unavailable()
    ext = _module()
    E, D = layers[0].in_w.shape[0] // 2, layers[0].in_w.shape[1]
    R, W = layers[0].dt_w.shape[1], layers[0].conv_w.shape[1]
    rows = ext.rows_for(batch)
    smem = ext.smem_bytes(rows, D, E, R, W)
    if smem > ext.smem_optin():
        return f"{smem} bytes of shared memory per CTA (the device allows {ext.smem_optin()})"
    key = (dtype, layers[0].state.dtype != torch.float32, rows, smem, torch.cuda.current_device())
    if key not in _RESIDENT:
        _RESIDENT[key] = ext.max_active_clusters(dtype == torch.bfloat16, key[1], rows, smem)
    ctas = E // CHANNELS
    if _RESIDENT[key] * CLUSTER < ctas:
        return f"{ctas} CTAs do not fit at once ({_RESIDENT[key]} clusters of {CLUSTER} resident)"
    return None


_RESIDENT: dict[tuple, int] = {}


class MambaLayers:
    """The workspace and layer table of one run of Mamba blocks at one batch size (build it once, call `run` every
    step: a CUDA graph replaying `run` finds every buffer at the same address).

    layers: the blocks' tensors (MambaLayerTensors, checked with `problem`); eps: the norms' epsilon; res_round:
    the residual stream is kept in the activations' dtype (ZooConfig.residual_in_fp32 off), so every sum is rounded
    to it; pdl: launch the kernels as programmatic dependents of the kernel before (Hopper)."""

    def __init__(self, layers: list[MambaLayerTensors], batch: int, dtype: torch.dtype, eps: float,
                 res_round: bool = False, pdl: bool = True):
        why = problem(layers, batch, dtype)
        if why is not None:
            raise ValueError(f"MambaLayers: {why}")
        self.ext = _module()
        first = layers[0]
        self.batch, self.dtype, self.eps, self.res_round, self.pdl = batch, dtype, float(eps), res_round, pdl
        self.E, self.D = first.in_w.shape[0] // 2, first.in_w.shape[1]
        self.R, self.W = first.dt_w.shape[1], first.conv_w.shape[1]
        self.state_low = first.state.dtype != torch.float32
        rows = self.ext.rows_for(batch)
        dev = first.in_w.device
        P = self.R + 32
        self.res = torch.empty(batch, self.D, device=dev, dtype=torch.float32)
        self.resb = torch.empty(batch, self.D, device=dev, dtype=dtype)
        self.ss = torch.zeros(max(self.E // CHANNELS, 1), _SS_ROWS, device=dev, dtype=torch.float32)
        self.dbc = torch.zeros(rows, P, device=dev, dtype=torch.int64)
        self.outp = torch.zeros(self.E // CHANNELS // CLUSTER, rows, self.D, device=dev, dtype=torch.float32)
        self.barrier = torch.zeros(1, device=dev, dtype=torch.int32)
        self._key: tuple[int, ...] | None = None
        self.table: torch.Tensor | None = None
        self.set_layers(layers)

    def set_layers(self, layers: list[MambaLayerTensors]) -> None:
        """Point the table at these tensors (same shapes); a host-to-device copy only when an address changed, so
        call it before a CUDA graph's capture, not during."""
        key = tuple(0 if t is None else t.data_ptr() for layer in layers for t in layer.tensors())
        if key != self._key:
            if self.table is not None and len(layers) != self.table.shape[0]:
                raise ValueError("MambaLayers.set_layers: the number of layers changed")
            why = _shape_problem(layers, self.batch, self.dtype)
            if why is not None:
                raise ValueError(f"MambaLayers: {why}")
            per = self.ext.ptrs_per_layer()
            table = torch.tensor(key, dtype=torch.int64).view(len(layers), per)
            self.table = table.to(layers[0].in_w.device)
            self._key = key
        self.layers = layers

    def run(self, x: torch.Tensor, pending: torch.Tensor | None = None, mask: torch.Tensor | None = None,
            stamps: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the run: x [batch, D] (fp32 or T: the stream before the first block's add),
        pending [batch, D] (T: the previous block's output, not yet added) or None; mask [batch] (T, 1 = token) or
        None; stamps: an int64 tensor [layers, CTAs, ext.stamps_per_layer()] the kernel fills with the global timer
        at its phase boundaries (benchmarks/mamba_layers.py --phases), or None. Returns a [batch, D] fp32 tensor
        (the workspace's: the next call overwrites it) holding the stream in fp32 (rounded to T with res_round);
        the layers' states are updated in place."""
        B, D = self.batch, self.D
        if x.shape != (B, D) or x.dtype not in (torch.float32, self.dtype) or not x.is_contiguous():
            raise ValueError(f"MambaLayers.run: x must be a contiguous [{B}, {D}] fp32 or {self.dtype} tensor, got "
                             f"{tuple(x.shape)} {x.dtype}")
        if pending is not None and (pending.shape != (B, D) or pending.dtype != self.dtype
                                    or not pending.is_contiguous()):
            raise ValueError(f"MambaLayers.run: pending must be a contiguous [{B}, {D}] {self.dtype} tensor")
        if mask is not None and (mask.shape != (B,) or mask.dtype != self.dtype):
            raise ValueError(f"MambaLayers.run: mask must be a [{B}] {self.dtype} tensor")
        if stamps is not None and (stamps.dtype != torch.int64 or not stamps.is_contiguous() or stamps.shape != (
                len(self.layers), self.E // CHANNELS, self.ext.stamps_per_layer())):
            raise ValueError("MambaLayers.run: stamps must be a contiguous int64 [layers, CTAs, stamps] tensor")
        self.ext.prep(x, pending, self.res, self.resb, self.ss, self.res_round, self.pdl)
        self.ext.layers(self.res, self.resb, self.ss, self.dbc, self.outp, self.barrier, self.table, B, D, self.E,
                        self.R, self.W, len(self.layers), 1, self.eps, self.res_round, self.state_low, mask, self.pdl,
                        stamps)
        return self.res


def mamba_layers_ref(x: torch.Tensor, pending: torch.Tensor | None, layers: list[MambaLayerTensors], eps: float,
                     res_round: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`MambaLayers.run` in torch, block by block: the residual add and RMSNorm as zoo_kernels.add_norm computes
    them (the norm reads the stream rounded to T), in_proj, the fused step's reference (mamba_step_ref), out_proj.
    Returns the fp32 stream after the last block's add; the states are updated in place."""
    dtype = layers[0].in_w.dtype
    res = x.float() if pending is None else x.float() + pending.float()
    for i, t in enumerate(layers):
        if i > 0:
            res = res + out.float()  # noqa: F821 - set by the block before
        if res_round:
            res = res.to(dtype).float()
        xr = res.to(dtype).float()
        rstd = 1.0 / torch.sqrt((xr * xr).mean(-1, keepdim=True) + eps)
        h = (xr * rstd * t.norm_w.float()).to(dtype)
        xz = F.linear(h, t.in_w)
        E = t.in_w.shape[0] // 2
        xs, z = xz[:, :E], xz[:, E:]
        y = mamba_step_ref(xs, z, t.conv_state, t.conv_w, t.conv_b, t.x_w, t.dt_w, t.dt_b, t.A, t.D, t.state, mask)
        out = F.linear(y.to(dtype), t.out_w)
    res = res + out.float()
    if res_round:
        res = res.to(dtype).float()
    return res


__all__ = ["available", "why_unavailable", "problem", "MambaLayerTensors", "MambaLayers", "mamba_layers_ref",
           "MAX_BATCH"]
