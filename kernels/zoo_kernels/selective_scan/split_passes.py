"""Triton kernels of the split scan's two cheap passes (zoo_kernels.selective_scan.split): per segment, the state
it leaves when entered from zero, and the gradient of the state entering it; no outputs, no state per step.

One program per (segment, block of channels inside one B/C group) walks its segment in chunks of BT steps: the
chunk's [BT, BD, BN] terms, one exp2 per (t, d, n), summed over time, with the sum of Δ carried between chunks.
With seq_idx (HAS_SEQ, a constexpr: without it the kernels are unchanged) the final state counts only the tokens
from the segment's last document start on and the entering adjoint only those before its first; the decay sums
stay whole (split.py zeroes the decay of a segment with a document start inside). All math in fp32. Imported
only where Triton is (CUDA machines; CPU tests run it through Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
CHUNK = 32  # time steps per iteration
TILE = 4096  # elements of a [BT, BD, BN] term: 32 fp32 registers per thread for each one at 4 warps


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(e) with e = exp(-|x|); log1p(e) = log(w) e / (w - 1), w = 1 + e, keeps tiny e exact
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    return tl.maximum(x, 0.0) + tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))


@triton.jit
def _program(a_ptr, bias_ptr, N, dim_per_group, blocks_per_group, count, first,
             HAS_BIAS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """(batch row, segment, group, channels, channel mask, states, state mask, A·log2(e) [BD, BN], Δ-bias [BD])."""
    pid = tl.program_id(0)
    row = pid // count
    seg = first + pid % count
    grp = tl.program_id(1) // blocks_per_group
    local = (tl.program_id(1) % blocks_per_group) * BD + tl.arange(0, BD)
    md = local < dim_per_group
    offs_d = grp * dim_per_group + local
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    A2 = tl.load(a_ptr + offs_d[:, None] * N + offs_n[None, :], mask=md[:, None] & mn[None, :], other=0.0) * LOG2E
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    # int64 offsets: a channel's offset (d x L in place, seg x D x T copied) passes 2^31 from D x L = 2^31 on
    return row.to(tl.int64), seg.to(tl.int64), grp.to(tl.int64), offs_d.to(tl.int64), md, offs_n, mn, A2, bias


@triton.jit
def _delta_chunk(ptrs, mask, bias, SOFTPLUS: tl.constexpr):
    """Δ of a [BT, BD] chunk as the scan computes it, 0 past the segment's end."""
    dt = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _document_starts(seq_base, offs_t, mt):
    """[BT] bool: True where a document starts inside the segment (seq_idx changes; never at its position 0)."""
    inside = mt & (offs_t > 0)
    cur = tl.load(seq_base + offs_t, mask=inside, other=0)
    prev = tl.load(seq_base + offs_t - 1, mask=inside, other=0)
    return inside & (cur != prev)


@triton.jit
def _final_state_kernel(
    u_ptr, dt_ptr, b_ptr, seq_ptr, a_ptr, bias_ptr, f_ptr, p_ptr,
    T, D, N, dim_per_group, blocks_per_group, count, first,
    su_b, su_s, su_d, sdt_b, sdt_s, sdt_d, sb_b, sb_s, sb_g, sb_n, sq_b, sq_s,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    row, seg, grp, offs_d, md, offs_n, mn, A2, bias = _program(
        a_ptr, bias_ptr, N, dim_per_group, blocks_per_group, count, first, HAS_BIAS, BD, BN)
    u_base = u_ptr + row * su_b + seg * su_s + offs_d[None, :] * su_d
    dt_base = dt_ptr + row * sdt_b + seg * sdt_s + offs_d[None, :] * sdt_d
    b_base = b_ptr + row * sb_b + seg * sb_s + grp * sb_g + offs_n[None, :] * sb_n
    seq_base = seq_ptr + row * sq_b + seg * sq_s
    f = tl.zeros([BD, BN], dtype=tl.float32)
    total = tl.zeros([BD], dtype=tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mt = offs_t < T
        m2 = mt[:, None] & md[None, :]
        dt = _delta_chunk(dt_base + offs_t[:, None], m2, bias, SOFTPLUS)
        u = tl.load(u_base + offs_t[:, None], mask=m2, other=0.0).to(tl.float32)
        b = tl.load(b_base + offs_t[:, None], mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
        chunk_sum = tl.sum(dt, 0)
        later = chunk_sum[None, :] - tl.cumsum(dt, 0)  # Σ Δ over the chunk's later steps, [BT, BD]
        w = tl.exp2(later[:, :, None] * A2[None, :, :])
        dtu = dt * u
        f = f * tl.exp2(chunk_sum[:, None] * A2)
        if HAS_SEQ:  # the state restarts at the chunk's last document start: earlier tokens and f drop out
            last = tl.max(tl.where(_document_starts(seq_base, offs_t, mt), offs_t, -1), 0)
            dtu = tl.where((offs_t >= last)[:, None], dtu, 0.0)
            f = tl.where(last < 0, f, 0.0)
        f += tl.sum(w * dtu[:, :, None] * b[:, None, :], 0)
        total += chunk_sum
    out = (row * count + seg - first) * D + offs_d
    tl.store(f_ptr + out[:, None] * N + offs_n[None, :], f, mask=md[:, None] & mn[None, :])
    tl.store(p_ptr + out, total, mask=md)


@triton.jit
def _entry_adjoint_kernel(
    dout_ptr, z_ptr, dt_ptr, c_ptr, seq_ptr, a_ptr, bias_ptr, g_ptr, p_ptr,
    T, D, N, dim_per_group, blocks_per_group, count, first,
    so_b, so_s, so_d, sz_b, sz_s, sz_d, sdt_b, sdt_s, sdt_d, sc_b, sc_s, sc_g, sc_n, sq_b, sq_s,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    row, seg, grp, offs_d, md, offs_n, mn, A2, bias = _program(
        a_ptr, bias_ptr, N, dim_per_group, blocks_per_group, count, first, HAS_BIAS, BD, BN)
    o_base = dout_ptr + row * so_b + seg * so_s + offs_d[None, :] * so_d
    z_base = z_ptr + row * sz_b + seg * sz_s + offs_d[None, :] * sz_d
    dt_base = dt_ptr + row * sdt_b + seg * sdt_s + offs_d[None, :] * sdt_d
    c_base = c_ptr + row * sc_b + seg * sc_s + grp * sc_g + offs_n[None, :] * sc_n
    seq_base = seq_ptr + row * sq_b + seg * sq_s
    g = tl.zeros([BD, BN], dtype=tl.float32)
    total = tl.zeros([BD], dtype=tl.float32)
    first_start = tl.full([BT], T, dtype=tl.int32)  # the segment's first document start so far (T: none), per lane
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mt = offs_t < T
        m2 = mt[:, None] & md[None, :]
        dt = _delta_chunk(dt_base + offs_t[:, None], m2, bias, SOFTPLUS)
        dy = tl.load(o_base + offs_t[:, None], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_base + offs_t[:, None], mask=m2, other=0.0).to(tl.float32)
            dy = dy * z * tl.sigmoid(z)
        if HAS_SEQ:  # only tokens before the segment's first document start see the entering state
            starts = _document_starts(seq_base, offs_t, mt)
            first_start = tl.minimum(first_start, tl.min(tl.where(starts, offs_t, T), 0))
            dy = tl.where((offs_t < first_start)[:, None], dy, 0.0)
        c = tl.load(c_base + offs_t[:, None], mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
        since = total[None, :] + tl.cumsum(dt, 0)  # Σ Δ from the segment's start up to t included, [BT, BD]
        w = tl.exp2(since[:, :, None] * A2[None, :, :])
        g += tl.sum(w * dy[:, :, None] * c[:, None, :], 0)
        total += tl.sum(dt, 0)
    out = (row * count + seg - first) * D + offs_d
    tl.store(g_ptr + out[:, None] * N + offs_n[None, :], g, mask=md[:, None] & mn[None, :])
    tl.store(p_ptr + out, total, mask=md)


def _launch_shape(dim: int, groups: int, n_state: int):
    """(BD, BN, channel blocks per group): blocks stay inside a group so that one B/C row serves the block."""
    dim_per_group = dim // groups
    BN = triton.next_power_of_2(n_state)
    BD = max(1, min(triton.next_power_of_2(dim_per_group), TILE // (CHUNK * BN)))
    return BD, BN, triton.cdiv(dim_per_group, BD)


def _check(*tensors):
    for t in tensors:
        if t is not None and t.stride(-1) != 1:
            raise ValueError("selective-scan split passes: time must be the unit-stride dimension")


def _seq_args(seq_idx, stand_in):
    """(pointer, batch stride, segment stride) of seq_idx [batch, S, T]; without it a stand-in never read."""
    if seq_idx is None:
        return stand_in, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _outputs(x, bc, A, delta_bias, count):
    """What both passes allocate and derive: the per-segment states and decay sums [batch, count, D, (N)] fp32,
    the launch shape (BD, BN, blocks) and A, Δ-bias in fp32 (A stands in for an absent bias, never read)."""
    batch, _, dim, _ = x.shape
    groups, n_state = bc.shape[2], bc.shape[3]
    states = torch.empty(batch, count, dim, n_state, device=x.device, dtype=torch.float32)
    sums = torch.empty(batch, count, dim, device=x.device, dtype=torch.float32)
    A32 = A.float().contiguous()
    bias = A32 if delta_bias is None else delta_bias.float().contiguous()
    return states, sums, _launch_shape(dim, groups, n_state), A32, bias


def final_states(u, delta, A, B, delta_bias, delta_softplus, first, count, seq_idx=None):
    """Same contract as `split.final_states_ref`: f [batch, count, D, N] and P [batch, count, D], fp32;
    seq_idx [batch, S, T] int or None."""
    _check(u, delta, B, seq_idx)
    batch, _, dim, seg_len = u.shape
    groups, n_state = B.shape[2], B.shape[3]
    f, p, (BD, BN, blocks), A32, bias = _outputs(u, B, A, delta_bias, count)
    seq, sq_b, sq_s = _seq_args(seq_idx, u)
    _final_state_kernel[(batch * count, groups * blocks)](
        u, delta, B, seq, A32, bias, f, p,
        seg_len, dim, n_state, dim // groups, blocks, count, first,
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3), sq_b, sq_s,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq_idx is not None,
        BT=CHUNK, BD=BD, BN=BN, num_warps=4,
    )
    return f, p


def entry_adjoints(dout, z, delta, A, C, delta_bias, delta_softplus, first, count, seq_idx=None):
    """Same contract as `split.entry_adjoints_ref`: g [batch, count, D, N] and P [batch, count, D], fp32;
    seq_idx [batch, S, T] int or None."""
    _check(dout, z, delta, C, seq_idx)
    batch, _, dim, seg_len = dout.shape
    groups, n_state = C.shape[2], C.shape[3]
    g, p, (BD, BN, blocks), A32, bias = _outputs(dout, C, A, delta_bias, count)
    zz = dout if z is None else z
    seq, sq_b, sq_s = _seq_args(seq_idx, dout)
    _entry_adjoint_kernel[(batch * count, groups * blocks)](
        dout, zz, delta, C, seq, A32, bias, g, p,
        seg_len, dim, n_state, dim // groups, blocks, count, first,
        dout.stride(0), dout.stride(1), dout.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        delta.stride(0), delta.stride(1), delta.stride(2), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        sq_b, sq_s,
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_SEQ=seq_idx is not None, BT=CHUNK, BD=BD, BN=BN, num_warps=4,
    )
    return g, p


__all__ = ["final_states", "entry_adjoints"]
