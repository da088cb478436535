"""zoo_kernels.cross_entropy (the language-model loss without an fp32 copy of the logits) against F.cross_entropy on
fp32 logits: the loss and the logits' gradient, ignored targets, vocabularies not a multiple of the kernel's block
and smaller than it; the Triton kernels through Triton's interpreter on CPU and on the GPU (cuda). And the model's
loss, which uses it, against the shifted cross-entropy written out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, patch_triton_interpreter, run_in_interpreter

CASES = [  # rows, vocabulary, dtype, ignored rows
    (7, 5000, torch.float32, (1,)),
    (5, 9000, torch.bfloat16, (0, 4)),
    (3, 100, torch.float16, ()),
    (4, 4096, torch.bfloat16, (2,)),
]


def _check(fn, rows, vocab, dtype, ignored, device="cpu", scale=2.5):
    g = torch.Generator(device=device).manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=g, device=device) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g, device=device)
    targets[list(ignored)] = -100
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    (grad_ref,) = torch.autograd.grad(ref * scale, logits)
    loss = fn(logits, targets)
    (grad,) = torch.autograd.grad(loss * scale, logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    # the reference rounds its fp32 gradient to the logits' dtype as ours does: at most one rounding apart
    assert_close("dlogits", grad.float(), grad_ref.float(), 1e-6 if dtype == torch.float32 else 1e-2)


def _kernel(logits, targets):
    from zoo_kernels.cross_entropy import _CrossEntropy

    return _CrossEntropy.apply(logits, targets, -100)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{str(c[2])[6:]}")
def test_fallback_matches_torch(case):
    from zoo_kernels.cross_entropy import cross_entropy

    _check(cross_entropy, *case)


def test_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    run_in_interpreter(__file__)


def test_the_check_fails_on_a_wrong_loss():
    """_check must catch a kernel that ignores the ignored rows (so the cases above cannot pass vacuously)."""
    def wrong(logits, targets):
        return F.cross_entropy(logits.float(), targets.clamp(min=0))

    with pytest.raises(AssertionError):
        _check(wrong, *CASES[1])


def test_bad_shapes_raise():
    from zoo_kernels.cross_entropy import cross_entropy

    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_integer_targets_of_any_dtype(dtype):
    """Targets of int32/int16 (token ids kept small, as data loaders store them): the Triton kernels read any integer
    dtype on CUDA, the CPU path raised "expected target dtype to be Long or Byte, but got Int"; a model's loss with
    such labels ran on a GPU and failed on CPU. Now both take them, as int64 indices."""
    from zoo_kernels.cross_entropy import cross_entropy

    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 2, 9, 0])
    want = F.cross_entropy(logits, targets)
    assert math.isclose(cross_entropy(logits, targets.to(dtype)).item(), want.item(), rel_tol=1e-6)
    if dtype != torch.uint8:
        ignored = torch.tensor([1, -100, 9, 0])
        want = F.cross_entropy(logits, ignored, ignore_index=-100)
        assert math.isclose(cross_entropy(logits, ignored.to(dtype)).item(), want.item(), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_non_integer_targets_are_refused_naming_them(dtype):
    """Float targets were truncated to indices by the kernel on CUDA (a loss on other classes, no error); refused
    on every path now, naming the argument."""
    from zoo_kernels.cross_entropy import cross_entropy

    with pytest.raises(ValueError, match="targets must be integer class indices"):
        cross_entropy(torch.randn(4, 10), torch.tensor([1.0, 2.5, 0.0, 3.0]).to(dtype))


def test_model_loss_is_the_shifted_cross_entropy():
    """ZooForCausalLM's loss: position t predicts labels[t + 1], -100 ignored, mean over the predicted targets."""
    from transformers import AutoModelForCausalLM

    from zoo import ZooConfig

    torch.manual_seed(0)
    config = ZooConfig(vocab_size=64, d_model=32, layers="MA", mixers={
        "M": {"type": "mamba", "d_state": 4}, "A": {"type": "attention", "n_heads": 2}}, ffn="none")
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[0, 4] = labels[1, 0] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.float()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES + [(64, 50280, torch.bfloat16, (3, 63))],
                         ids=lambda c: f"{c[0]}x{c[1]}-{str(c[2])[6:]}")
def test_kernels_on_the_gpu(case):
    from zoo_kernels.cross_entropy import _fused, cross_entropy

    assert _fused(torch.empty(1, 8, device="cuda"))
    _check(cross_entropy, *case, device="cuda")


@pytest.mark.cuda
def test_no_target_gives_nan_as_torch():
    from zoo_kernels.cross_entropy import cross_entropy

    logits = torch.randn(3, 50, device="cuda", requires_grad=True)
    targets = torch.full((3,), -100, device="cuda")
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))


def _check_masked_block():
    """A row whose first BLOCK logits are all -inf (masked tokens): the online max stays -inf through that block,
    where exp(-inf - -inf) made the loss and the gradient NaN; torch's are finite."""
    from zoo_kernels.cross_entropy import BLOCK

    logits = torch.randn(3, BLOCK + 300, generator=torch.Generator().manual_seed(3))
    logits[:2, :BLOCK] = float("-inf")
    logits[2, BLOCK + 10:] = float("-inf")
    targets = torch.tensor([BLOCK + 7, BLOCK + 299, 5])
    results = []
    for fn in (_kernel, lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-100)):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    (loss, grad), (ref, grad_ref) = results
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    assert_close("dlogits of masked blocks", grad, grad_ref, 1e-6)


def _check_bad_targets():
    """A target outside [0, V) that is not ignore_index (labels padded with -1, a token id past the head): torch
    raises; the kernel returned a finite loss (the row's log-sum-exp, or inf for V <= target < BLOCK) and trained
    on it. Now the loss and that row's gradient are NaN; the other rows' gradients stay finite."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    for bad in (-1, 50, 5000):
        x = logits.clone().requires_grad_()
        loss = _kernel(x, torch.tensor([3, bad, -100]))
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isnan(loss), (bad, loss.item())
        assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all(), bad
        with pytest.raises(IndexError):
            F.cross_entropy(logits, torch.tensor([3, bad, -100]))


def _check_unsigned_targets():
    """uint8 targets (a byte-level model's labels): 156 is a class there, not ignore_index -100, but torch's
    `targets != -100` wraps -100 to 156 in uint8, so the mean divided by one target fewer than the kernel summed
    (1.5x the loss here). Now every target counts as the CPU path (targets.long()) counts it."""
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(5), requires_grad=True)
    targets = torch.tensor([156, 7, 255], dtype=torch.uint8)
    loss = _kernel(logits, targets)
    want = F.cross_entropy(logits, targets.long(), ignore_index=-100)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()), (loss.item(), want.item())
    grad, grad_ref = (torch.autograd.grad(value, logits)[0] for value in (loss, want))
    assert_close("dlogits of uint8 targets", grad, grad_ref, 1e-6)


def _check_confident_targets():
    """Rows whose target holds p = 1 - 1e-5 ... 1 - 1e-9 of the probability (a model sure of its token), logits at
    0 and at 30: the backward's p - 1 with p = exp(x - lse) kept |lse| * 2^-24 of it, so the target's gradient was
    0 or -2e-6 where it is -1e-6 (torch's fp32 softmax - one-hot cancels as well, from 1 - p ~ 1e-7 down). Now it is
    the other classes' share of the row, to fp32 (bf16: one rounding) of the fp64 gradient; the others' stay so."""
    vocab, target = 3000, 17
    rest = torch.randn(vocab, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rest[target] = float("-inf")
    rows = []
    for offset in (0.0, 30.0):
        for eps in (1e-5, 1e-6, 1e-7, 1e-8, 1e-9):  # the target's logit for p(target) = 1 - eps
            row = rest.clone()
            row[target] = rest.exp().sum().log() + math.log((1 - eps) / eps)
            rows.append(row + offset)
    targets = torch.full((len(rows),), target)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        logits = torch.stack(rows).to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad(_kernel(logits, targets), logits)
        exact = logits.detach().double().requires_grad_()
        (grad_ref,) = torch.autograd.grad(F.cross_entropy(exact, targets), exact)
        err = ((grad[:, target].double() - grad_ref[:, target]) / grad_ref[:, target]).abs()
        assert err.max() <= tol, (dtype, err.tolist())
        assert_close(f"dlogits of confident rows ({dtype})", grad.double(), grad_ref, tol)


def _check_large_logits():
    """Rows at 1e4, 1e6 and 3e38 (a diverging run's head; the last row's logits all round to one value): the kernels
    kept max + log(sum) as one fp32 log-sum-exp, which rounds to |max| * 2^-24, and took the loss and every
    probability from it (up to 3% off at 1e6; a loss of 0 for the uniform row). Now, as torch, x - max - log(sum)."""
    vocab = 300
    noise = torch.randn(3, vocab, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    logits = (noise + torch.tensor([[1e4], [1e6], [3e38]], dtype=torch.float64)).float().requires_grad_()
    targets = torch.tensor([5, 77, 299])
    loss = _kernel(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    exact = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(exact, targets)
    (grad_ref,) = torch.autograd.grad(ref, exact)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    assert_close("dlogits of large logits", grad.double(), grad_ref, 1e-5)


def _check_second_derivative():
    """A gradient differentiated again (a gradient penalty, a meta-learning inner step): the kernel's backward wrote
    its gradient without a graph, so the second derivative lacked the loss's Hessian term, silently. Now the
    backward under create_graph is torch's, and so is the second derivative."""
    g = torch.Generator().manual_seed(8)
    h0 = torch.randn(4, 8, generator=g)
    weight = torch.randn(8, 10, generator=g, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 9])
    results = []
    for fn in (_kernel, lambda x, t: F.cross_entropy(x, t, ignore_index=-100)):
        h = h0.clone().requires_grad_()
        (grad_weight,) = torch.autograd.grad(fn(h @ weight, targets), weight, create_graph=True)
        results.append(torch.autograd.grad(grad_weight.square().sum(), h)[0])
    assert_close("second derivative", *results, 1e-6)


def _interpreter_main():
    for case in CASES:
        _check(_kernel, *case)
    _check_masked_block()
    _check_bad_targets()
    _check_unsigned_targets()
    _check_confident_targets()
    _check_large_logits()
    _check_second_derivative()
    print("interpreter: cross-entropy kernels match torch")


if __name__ == "__main__":
    patch_triton_interpreter()
    _interpreter_main()
