"""One GLA decoding step in one Triton kernel: S = diag(exp(g)) S + kᵀv, o = scale · q S, S updated in place.

The torch reference runs five kernels that each pass over the state (exp, scale, outer product, add, the output
contraction, the copy back); here each program loads a [K, BV] tile of one (batch row, head) state once, updates
it, stores it and reduces it against q. Imported only where Triton is (CUDA machines; CPU tests run it through
Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gla_step_kernel(
    st_ptr, q_ptr, k_ptr, v_ptr, g_ptr, o_ptr,
    K, V, scale,
    s_st_b, s_st_h, s_st_k, s_q_b, s_q_h, s_k_b, s_k_h, s_v_b, s_v_h, s_g_b, s_g_h, s_o_b, s_o_h,
    BK: tl.constexpr, BV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    q = tl.load(q_ptr + b * s_q_b + h * s_q_h + offs_k, mask=mk, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + b * s_k_b + h * s_k_h + offs_k, mask=mk, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * s_g_b + h * s_g_h + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * s_v_b + h * s_v_h + offs_v, mask=mv, other=0.0).to(tl.float32)
    off = b.to(tl.int64) * s_st_b + h * s_st_h + offs_k[:, None] * s_st_k + offs_v[None, :]
    m = mk[:, None] & mv[None, :]
    s = tl.load(st_ptr + off, mask=m, other=0.0).to(tl.float32)
    s = s * tl.exp(g)[:, None] + k[:, None] * v[None, :]
    tl.store(st_ptr + off, s.to(st_ptr.dtype.element_ty), mask=m)
    o = tl.sum(s * q[:, None], 0)
    tl.store(o_ptr + b * s_o_b + h * s_o_h + offs_v, o.to(o_ptr.dtype.element_ty), mask=mv)


def supported(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> bool:
    """The kernel's layout: [batch, H, ·] inputs with unit stride in the last dimension, a state [batch, H, K, V]
    with unit stride over V (it is updated in place)."""
    return (state.dim() == 4 and state.stride(-1) == 1 and all(t.dim() == 3 and t.stride(-1) == 1
                                                                for t in (q, k, v, g)))


def gla_state_update_triton(state, q, k, v, g, scale=None) -> torch.Tensor:
    """Same contract as `gla_state_update_ref`: state [batch, H, K, V] updated in place; returns o [batch, H, V]
    in q's dtype."""
    batch, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    o = torch.empty(batch, H, V, device=q.device, dtype=q.dtype)
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 8192 // BK))  # a [BK, BV] fp32 tile of at most 32 KB
    _gla_step_kernel[(batch, H, triton.cdiv(V, BV))](
        state, q, k, v, g, o, K, V, float(scale),
        state.stride(0), state.stride(1), state.stride(2), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), g.stride(0), g.stride(1), o.stride(0), o.stride(1),
        BK=BK, BV=BV, num_warps=4,
    )
    return o


__all__ = ["gla_state_update_triton", "supported"]
