"""The fused Mamba-1 decode step: conv update, x_proj, dt_proj, state update and gate in one CUDA launch.

A Mamba layer's unfused decode step after in_proj is the conv-update kernel, the x_proj GEMM and the state
update (dt_proj folded in): three launches, each bound by its launch and its own round trips to DRAM rather
than by its bytes. csrc/mamba_step.cu does the three in one launch of 8-CTA thread-block clusters (compute
capability 9.0 and newer): the CTAs of a cluster split the channels of the same batch rows and add their parts
of x_proj through distributed shared memory; weights and states are loaded before the step's first dependent load. Two
kernels: the register-rows kernel (2 or 4 rows per CTA, states in registers, x_proj on the tensor cores; fp16/bf16,
N = 16, where it fits: the faster at every batch on the H200) and the slots kernel (states in shared memory, any
shapes the checks allow, one row per CTA in the plan). It is a separate extension from the scan's (its own small
JIT build, same cache).

`mamba_step_ref` is the same step in torch from the unfused kernels' references: what the fused kernel must
equal, and what runs where it cannot (CPU, older GPUs, shapes it does not take).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from zoo_kernels._env import env_choice, env_flag, env_int
from zoo_kernels.conv1d.ref import causal_conv1d_update_ref
from zoo_kernels.selective_scan.cuda import JitExtension
from zoo_kernels.selective_scan.ref import selective_state_update_ref

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("mamba_step_api.cpp", "mamba_step.cu")
_HEADERS = ("mamba_step.h", "decode_common.cuh", "selective_scan_kernels.cuh", "selective_scan.h")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLUSTER = 8  # CTAs per cluster (csrc/mamba_step.h)

_EXTENSION = JitExtension("fused Mamba step", _SOURCES, _HEADERS, _CSRC, "zoo_mamba_step", (9, 0),
                          "the fused step needs thread-block clusters,")


available, why_unavailable, _module = _EXTENSION.available, _EXTENSION.why_unavailable, _EXTENSION.module


def supported(x: torch.Tensor, conv_weight: torch.Tensor, x_proj_weight: torch.Tensor, A: torch.Tensor,
              state_dtype: torch.dtype = torch.float32) -> bool:
    """Whether `mamba_step` takes these shapes: x [batch, d_inner] on CUDA in fp32/bf16/fp16 with d_inner a
    multiple of 64; conv width <= 4; N four times a power of two (<= 128); dt_rank a multiple of 16 bytes'
    elements; the extension builds; and one of its kernels runs the batch in one wave of resident clusters: the
    slots kernel's one-row CTAs (the occupancy API's count: batch <= 30 at the 130M shapes on an H200), else the
    register-rows kernel's 2 or 4 rows per CTA (fp16/bf16, N = 16, d_inner 1024, 1536 or 2048: up to 4 rows
    times the resident clusters). Beyond that the unfused step runs (csrc/mamba_step_api.cpp, `plan`). A state in
    x's dtype (`state_dtype`; ZooConfig.decode_state_dtype "model") needs the register-rows kernel. Cheap after the
    first call."""
    if not x.is_cuda or x.dtype not in _DTYPES or x.dim() != 2 or state_dtype not in (torch.float32, x.dtype):
        return False
    dim, nstate = A.shape
    rank = x_proj_weight.shape[0] - 2 * nstate
    lanes = nstate // 4
    if not (dim % (8 * CLUSTER) == 0 and conv_weight.shape[-1] <= 4 and nstate % 4 == 0 and 1 <= lanes <= 32
            and lanes & (lanes - 1) == 0 and rank >= 1 and rank % (16 // x.element_size()) == 0 and available()):
        return False
    width, elem, ext = conv_weight.shape[-1], x.element_size(), _module()
    if _forced_rows():
        return True
    if _forced_kernel() == KERNELS["rows"] or state_dtype != torch.float32:
        return ext.register_rows_for(x.shape[0], dim, nstate, rank, width, elem) > 0
    return ext.plan(x.shape[0], dim, nstate, rank, width, elem)[1] > 0


def mamba_step(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D, state, mask=None):
    """One token of a Mamba-1 mixer after in_proj, in one launch; returns y [batch, d_inner] (before out_proj).

    x, z: [batch, d_inner] (the halves of in_proj's output; unit stride over channels); conv_state [batch,
    d_inner, W-1] (fp32) and state [batch, d_inner, N] (fp32, or x's dtype: see `supported`), contiguous, updated in
    place; conv_weight [d_inner, W], conv_bias, dt_bias, D [d_inner] and A [d_inner, N] in fp32; x_proj_weight
    [R + 2N, d_inner] and dt_weight [d_inner, R] in x's dtype; mask [batch] in x's dtype (1 = token, 0 = padding)
    or None. Same arguments and results as `mamba_step_ref` (call `supported` first).

    The kernel is launched as a programmatic dependent of the stream's previous kernel (in the mixer: in_proj), so
    that its copies of weights and states overlap that kernel's end; ZOO_MAMBA_STEP_PDL=0 launches it plainly.
    Hence the caller's contract: the kernel launched just before this call must not write the states, the conv
    weights, x_proj_weight, dt_weight, dt_bias, A or D (the mixer prepares them all before in_proj); x, z and mask
    are read after the wait and may be that kernel's outputs.
    $ZOO_MAMBA_STEP_KERNEL (slots / rows) and $ZOO_MAMBA_STEP_ROWS force the kernel and its rows per CTA
    (benchmarks and tests)."""
    pdl, rows, kernel = env_flag("ZOO_MAMBA_STEP_PDL", True), _forced_rows(), _forced_kernel()
    if kernel == KERNELS["rows"] and rows not in (0, 2, 4):  # (the extension's own refusal formats numbers)
        raise ValueError(f"$ZOO_MAMBA_STEP_ROWS={rows} with $ZOO_MAMBA_STEP_KERNEL=rows: the register-rows kernel "
                         "takes 2 or 4 rows per CTA")
    conv_weight, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D = (
        _aligned(t) for t in (conv_weight, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D))
    return _module().step(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D, state,
                          mask, pdl, rows, kernel)


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a copy of it where its data is not 16-byte aligned (the kernel copies weights with 16-byte cp.async;
    parameters are their own allocations, but a view into a flat buffer need not be)."""
    return t if t is None or t.data_ptr() % 16 == 0 else t.clone()


def _forced_rows() -> int:
    """$ZOO_MAMBA_STEP_ROWS: batch rows per CTA forced (1, 2, 4 or 8; benchmarks), else 0: the kernel's choice."""
    return env_int("ZOO_MAMBA_STEP_ROWS", 0, choices=(0, 1, 2, 4, 8), what="batch rows per CTA; 0: the kernel's choice")


KERNELS = {"slots": 1, "rows": 2}  # csrc/mamba_step.h: kSlots, kRegisterRows


def _forced_kernel() -> int:
    """$ZOO_MAMBA_STEP_KERNEL: "slots" (states in shared memory, any rows per CTA) or "rows" (states in registers,
    2 or 4 rows per CTA) forced, else 0: the launcher's plan."""
    return KERNELS.get(env_choice("ZOO_MAMBA_STEP_KERNEL", "", tuple(KERNELS)), 0)


def mamba_step_ref(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D, state,
                   mask=None):
    """The unfused step in torch: conv update (u rounded to x's dtype), x_proj in x's dtype, then the state update
    with dt = softplus(dt_low dt_weight^T + dt_bias) in fp32; conv_state and state updated in place. mask [batch]
    zeroes x and u of padding rows (as the mixer's step does)."""
    if mask is not None:
        x = x * mask[:, None]
    u = causal_conv1d_update_ref(conv_state, x, conv_weight, conv_bias, "silu")
    if mask is not None:
        u = u * mask[:, None]
    x_dbl = F.linear(u, x_proj_weight)
    nstate = A.shape[1]
    dt_low, B, C = torch.split(x_dbl, [x_dbl.shape[-1] - 2 * nstate, nstate, nstate], dim=-1)
    return selective_state_update_ref(state, u, dt_low, A, B, C, D, z, dt_bias, True, dt_weight)


__all__ = ["available", "why_unavailable", "supported", "mamba_step", "mamba_step_ref"]
