"""Gated RMSNorm forward in one Triton kernel (inference): Mamba-2's and GLA's output norm during decoding.

y = rmsnorm_g(x · silu(z)) · w (norm_before_gate=False) or rmsnorm_g(x) · w · silu(z) (True), the RMS taken over
groups of `group_size` channels, computed in fp32 and rounded once to x's dtype. The torch formula runs about ten
kernels (casts, silu, products, the mean, rsqrt) per call: at one token per step they are most of a layer's
launches. Forward only (no autograd): `zoo.layers.GatedRMSNorm` uses it when autograd is off on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_norm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, s_x, s_z, s_y, group_size, eps,
                       BLOCK: tl.constexpr, HAS_Z: tl.constexpr, BEFORE_GATE: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < group_size
    x = tl.load(x_ptr + row.to(tl.int64) * s_x + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row.to(tl.int64) * s_z + offs, mask=m, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / group_size + eps)
    y = x * rstd * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        if BEFORE_GATE:
            y = y * gate
    tl.store(y_ptr + row.to(tl.int64) * s_y + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
                   norm_before_gate: bool) -> torch.Tensor:
    """x, z [..., d] (copied where the last dimension is not unit-stride), weight [d]; returns y [..., d] in x's
    dtype."""
    d = x.shape[-1]
    if d % group_size:
        raise ValueError(f"gated_rms_norm: {d} channels are not a multiple of group_size {group_size}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z {tuple(z.shape)} vs x {tuple(x.shape)}")
    if weight.shape != (d,):
        raise ValueError(f"gated_rms_norm: weight {tuple(weight.shape)} does not match {d} channels")
    # the kernel reads a row's channels, and the weight, at unit stride
    x2 = x.reshape(-1, d)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    z2 = z.reshape(-1, d) if z is not None else x2
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    weight = weight.contiguous()
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    _gated_norm_kernel[(x2.shape[0], d // group_size)](
        x2, z2, weight, y, x2.stride(0), z2.stride(0), y.stride(0), group_size, float(eps),
        BLOCK=triton.next_power_of_2(group_size), HAS_Z=z is not None, BEFORE_GATE=bool(norm_before_gate),
        num_warps=4 if group_size <= 1024 else 8,
    )
    return y.view(x.shape)


__all__ = ["gated_rms_norm"]
