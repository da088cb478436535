"""Next-token cross-entropy straight from the logits' own dtype: fp32 math, no fp32 copy of the logits.

`cross_entropy(logits, targets, ignore_index=-100)` is `F.cross_entropy(logits.float(), targets, ignore_index=...)`
(the mean over the targets that are not ignored) for logits [N, V] in bf16, fp16 or fp32 with unit-stride rows.
A target outside [0, V) that is not ignore_index makes the loss and its row's gradient NaN (torch raises; the
kernels cannot without a sync).
On CUDA with Triton it runs two kernels, one program per row:

- forward: one pass over the row in blocks of BLOCK logits, an online max and sum of exponentials in fp32, the
  target's logit picked on the way; it keeps each row's max, log of the sum, and 1 − p(target) summed over the
  other classes (3N floats) for the backward;
- backward: one pass that writes (softmax − one-hot) · dloss / n in the logits' dtype, the target's entry as
  −(1 − p(target)): a target at p = 1 − 1e-7 keeps fp32's relative precision, where p − 1 would cancel.

What it saves (a language-model head at 16K tokens and a 50K vocabulary): the fp32 copy of the logits (3.3 GB
written, then read by log_softmax), log_softmax's fp32 output, NLL's zero-filled fp32 gradient and its cast back to
bf16; per token it reads the bf16 logits twice and writes their gradient once. Elsewhere (CPU, no Triton, autograd
through a non-float dtype) it is the torch formula above, and so is a backward under create_graph (a second
derivative needs a gradient with a graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formula
    triton = None

BLOCK = 4096  # logits per step of a row's loop (16 fp32 registers per thread at 8 warps)


if triton is not None:

    @triton.jit
    def _ce_fwd_kernel(x_ptr, t_ptr, loss_ptr, max_ptr, log_s_ptr, rest_ptr, stride, V, ignore_index,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(t_ptr + row).to(tl.int64)
        base = x_ptr + row * stride
        offs = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)  # running max, sum of exp(x - max) off the target
        s_rest = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)
        picked = tl.zeros([BLOCK], dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            # a block of -inf only (masked tokens) before any finite logit: exp(-inf - -inf) would be NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            e = tl.exp(x - m_safe)  # one exp per logit
            s_rest = s_rest * tl.exp(m - m_safe) + tl.sum(tl.where(cols == target, 0.0, e), 0)
            m = m_new
            picked += tl.where(cols == target, x, 0.0)
        x_target = tl.sum(picked, 0)
        valid = (target >= 0) & (target < V)
        s = s_rest + tl.where(valid, tl.exp(x_target - tl.where(m == float("-inf"), 0.0, m)), 0.0)
        log_s = tl.log(s)
        # the max and log(s) apart, as torch's x - max - log(s): their sum (the log-sum-exp) rounds off |max| * 2^-24,
        # which the loss and every probability took up (at 1e6: 0.03, 3% of a probability; at 3e38 a loss of 0)
        tl.store(max_ptr + row, m)
        tl.store(log_s_ptr + row, log_s)
        # 1 - p(target) as the other classes' share: p - 1 from p = exp(x - lse) would cancel
        # (a target at p = 1 - 1e-6 got a gradient of 0 or -2e-6 at lse ~ 25)
        tl.store(rest_ptr + row, s_rest / s)
        # a target outside [0, V) (not ignore_index): NaN, where torch raises (a check on the host would sync)
        loss = tl.where(valid, (m - x_target) + log_s, float("nan"))
        tl.store(loss_ptr + row, tl.where(target != ignore_index, loss, 0.0))

    @triton.jit
    def _ce_bwd_kernel(x_ptr, t_ptr, max_ptr, log_s_ptr, rest_ptr, g_ptr, dx_ptr, stride, dx_stride, V,
                       ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(t_ptr + row).to(tl.int64)
        scale = tl.where((target >= 0) & (target < V), tl.load(g_ptr), float("nan"))  # dloss / n (NaN: bad target)
        scale = tl.where(target != ignore_index, scale, 0.0)  # 0 for an ignored row
        m = tl.load(max_ptr + row)
        log_s = tl.load(log_s_ptr + row)
        rest = tl.load(rest_ptr + row)  # 1 - p(target)
        base = x_ptr + row * stride
        out = dx_ptr + row * dx_stride
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp((x - m) - log_s)
            grad = tl.where(cols == target, -rest, p) * scale
            tl.store(out + cols, grad.to(dx_ptr.dtype.element_ty), mask=mask)


def _fused(logits: torch.Tensor) -> bool:
    return (triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16) and not torch.compiler.is_compiling())


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        n_rows, vocab = logits.shape
        targets = targets.contiguous()
        loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        row_max, log_s, rest = torch.empty(3, n_rows, device=logits.device, dtype=torch.float32)
        if n_rows:
            _ce_fwd_kernel[(n_rows,)](logits, targets, loss, row_max, log_s, rest, logits.stride(0), vocab,
                                      ignore_index, BLOCK=BLOCK, num_warps=8)
        # in int64 as the kernels compare: in uint8, `!= -100` wraps -100 to 156 and drops class 156 from the count
        count = (targets.long() != ignore_index).sum()
        ctx.save_for_backward(logits, targets, row_max, log_s, rest, count)
        ctx.ignore_index = ignore_index
        return loss.sum() / count  # nan without a target, as F.cross_entropy's mean

    @staticmethod
    def backward(ctx, grad):
        logits, targets, row_max, log_s, rest, count = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (a second derivative): the torch formula, whose gradient has one
            with torch.enable_grad():
                loss = F.cross_entropy(logits.float(), targets.long(), ignore_index=ctx.ignore_index)
                return torch.autograd.grad(loss, logits, grad, create_graph=True)[0], None, None
        n_rows, vocab = logits.shape
        dlogits = torch.empty_like(logits)
        scale = (grad.float() / count).reshape(1)
        if n_rows:
            _ce_bwd_kernel[(n_rows,)](logits, targets, row_max, log_s, rest, scale, dlogits, logits.stride(0),
                                      dlogits.stride(0), vocab, ctx.ignore_index, BLOCK=BLOCK, num_warps=8)
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the targets != ignore_index (module docstring); logits [N, V], targets [N] of any
    integer dtype (class indices: int64, int32, uint16 token ids alike, on every path)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits [N, V] and targets [N], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        # the kernel would truncate them to indices; F.cross_entropy would read [N] probabilities as an error
        raise ValueError(f"cross_entropy: targets must be integer class indices, got {targets.dtype}")
    if _fused(logits):
        return _CrossEntropy.apply(logits, targets, ignore_index)
    # F.cross_entropy takes int64 (and uint8) indices only; the kernel reads any integer dtype
    return F.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_index)


__all__ = ["cross_entropy"]
