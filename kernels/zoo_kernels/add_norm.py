"""Residual add + RMSNorm in one Triton kernel (inference): the seam between two blocks of a decode step.

`add_rms_norm(residual, delta, weight, eps, out_dtype)` returns (r, y) with
    r = residual + delta                     stored in `residual`'s dtype (fp32 with residual_in_fp32)
    y = rmsnorm(r as out_dtype) · weight     in out_dtype (the weights' dtype)
which is what `zoo.layers.Block` computes with four kernels (the fp32 add, the cast of the residual, the norm, the
cast back) on every block of every decode step: at one token per row those launches, not the bytes, are the cost.
The norm reads r rounded to out_dtype first, as the block's `norm(x.to(dtype))` does, so the two paths agree to
the last bit of the add. Forward only (no autograd): zoo.modeling uses it when autograd is off on CUDA.

On Hopper and newer it is launched as a programmatic dependent of the kernel before it (PDL; `ZOO_DECODE_PDL=0`
turns it off): it waits for that kernel's writes, then lets the next kernel (a decode step's in_proj,
zoo_kernels.pdl_linear) start and load its weights while this one runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo_kernels._env import env_flag


@triton.jit
def _add_norm_kernel(res_ptr, delta_ptr, w_ptr, r_ptr, y_ptr, s_res, s_delta, s_r, s_y, d, eps,
                     BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # everything below reads the previous kernel's outputs; the next kernel may start once all have waited
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < d
    r = tl.load(res_ptr + row * s_res + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:
        r = r + tl.load(delta_ptr + row * s_delta + offs, mask=m, other=0.0).to(tl.float32)
    r = r.to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + row * s_r + offs, r, mask=m)
    x = r.to(y_ptr.dtype.element_ty).to(tl.float32)  # the norm sees the residual in the weights' dtype
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / d + eps)
    y = x * rstd * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * s_y + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None, residual_dtype: torch.dtype | None = None):
    """(residual + delta, rmsnorm(residual + delta) · weight); delta None: the norm of `residual` alone.

    residual, delta [..., d] (copied where the last dimension is not unit-stride); weight [d]. The sum is kept in
    `residual_dtype` (default: the promoted dtype of residual and delta), the normalized output in `out_dtype`
    (default weight's dtype).
    """
    d = residual.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} does not match {d} channels")
    weight = weight.contiguous()  # the kernel reads it at unit stride
    if delta is not None and delta.shape != residual.shape:
        raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} vs residual {tuple(residual.shape)}")
    out_dtype = out_dtype or weight.dtype
    if residual_dtype is None:
        residual_dtype = residual.dtype if delta is None else torch.promote_types(residual.dtype, delta.dtype)
    res2 = residual.reshape(-1, d)
    res2 = res2 if res2.stride(-1) == 1 else res2.contiguous()  # e.g. a registered mixer's transposed output
    delta2 = res2 if delta is None else delta.reshape(-1, d)
    delta2 = delta2 if delta2.stride(-1) == 1 else delta2.contiguous()
    r = torch.empty(res2.shape, device=residual.device, dtype=residual_dtype)
    y = torch.empty(res2.shape, device=residual.device, dtype=out_dtype)
    if res2.shape[0]:
        block = triton.next_power_of_2(d)
        pdl = _pdl(residual.device)
        _add_norm_kernel[(res2.shape[0],)](
            res2, delta2, weight, r, y, res2.stride(0), delta2.stride(0), r.stride(0), y.stride(0), d, float(eps),
            BLOCK=block, HAS_DELTA=delta is not None, PDL=pdl, num_warps=max(1, min(8, block // 256)),
            launch_pdl=pdl,
        )
    return r.view(residual.shape), y.view(residual.shape)


_PDL_DEVICES: dict[int, bool] = {}


def _pdl(device: torch.device) -> bool:
    """Whether to launch as a programmatic dependent: compute capability 9.0+ and not ZOO_DECODE_PDL=0."""
    if not env_flag("ZOO_DECODE_PDL", True) or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _PDL_DEVICES[index]


__all__ = ["add_rms_norm"]
