"""Every attention backend available on this GPU vs the fp32 reference: outputs and gradients, bf16/fp16,
head dims 64/128/256, causal, GQA, sliding window, packed, padded, prefill and decode."""

from __future__ import annotations

import pytest
import torch
import zoo_kernels.attention as attn
from zoo_kernels.attention import BackendUnavailable, attention, attention_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DEVICE = "cuda"
# (tq, tk, hq, hkv, extra kwargs); T = 200 is no multiple of any kernel's block
CASES = {
    "causal": (200, 200, 4, 4, {}),
    "gqa": (200, 200, 8, 2, {}),
    "window_gqa": (200, 200, 4, 2, {"window": 37}),
    "noncausal": (200, 200, 4, 2, {"causal": False}),
    "packed_gqa": (200, 200, 4, 2, {"seq_idx": "packed"}),
    "padded": (200, 200, 4, 2, {"key_padding_mask": "left"}),
    "prefill": (48, 200, 4, 2, {}),
    "decode": (1, 200, 4, 2, {}),
    "decode_padded": (1, 200, 4, 2, {"key_padding_mask": "left"}),
    # pads after tokens inside the window: it counts a row's tokens, not its pads (flash's varlen drops the pads,
    # SDPA's and flex's masks count them out)
    "window_mid_padded": (200, 200, 4, 2, {"window": 37, "key_padding_mask": "middle"}),
}
# flex compiles per mask and head dim: a smaller matrix keeps the suite within minutes
FLEX_CASES = ("causal", "packed_gqa", "padded", "window_mid_padded")
TOL = {torch.bfloat16: (1.5e-2, 3e-2), torch.float16: (4e-3, 1e-2)}  # (output, gradients) relative error


def make_kwargs(spec, batch, tk):
    kw = dict(spec)
    if kw.get("seq_idx") == "packed":
        bounds = [[0, 31, 90, 91, 150], [0, 120]]  # a one-token document included
        seq = torch.zeros(batch, tk, dtype=torch.int32)
        for b in range(batch):
            for i, lo in enumerate(bounds[b % 2]):
                seq[b, lo:] = i
        kw["seq_idx"] = seq.to(DEVICE)
    if kw.get("key_padding_mask") in ("left", "middle"):
        kpm = torch.ones(batch, tk, dtype=torch.bool)
        for b in range(batch):
            if kw["key_padding_mask"] == "left":
                kpm[b, : 7 + 29 * b] = False
            else:
                kpm[b, 60 + 9 * b: 90 + 29 * b] = False
        kw["key_padding_mask"] = kpm.to(DEVICE)
    return kw


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def params():
    out = []
    backends = attn.available_backends(DEVICE) if torch.cuda.is_available() else []
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float16):
            for dim in (64, 128, 256):
                for case in CASES:
                    if backend == "flex" and (dtype != torch.bfloat16 or (dim != 128 and case != "causal")
                                              or case not in FLEX_CASES):
                        continue
                    if backend == "math" and dim != 128:
                        continue
                    out.append(pytest.param(backend, dtype, dim, case,
                                            id=f"{backend}-{str(dtype)[6:]}-d{dim}-{case}"))
    return out


@pytest.mark.parametrize("backend,dtype,dim,case", params())
def test_backend_matches_reference(backend, dtype, dim, case):
    tq, tk, hq, hkv, spec = CASES[case]
    batch = 2
    gen = torch.Generator(device=DEVICE).manual_seed(hash((backend, dim, case)) % 2**31)
    q = torch.randn(batch, tq, hq, dim, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(batch, tk, hkv, dim, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(batch, tk, hkv, dim, device=DEVICE, dtype=dtype, generator=gen)
    kw = make_kwargs(spec, batch, tk)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    try:
        out = attention(*leaves, backend=backend, **kw)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    refs = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*refs, **kw)
    tol_out, tol_grad = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite output"
    err = rel_err(out, ref)
    assert err < tol_out, f"out: ||out-ref||/||ref|| = {err:.2e}"
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.float())
    for name, a, b in zip("qkv", leaves, refs):
        if b.grad.abs().max() == 0:
            assert a.grad is None or a.grad.abs().max() == 0, f"d{name} should be zero"
            continue
        assert torch.isfinite(a.grad).all(), f"d{name} non-finite"
        err = rel_err(a.grad, b.grad)
        assert err < tol_grad, f"d{name}: ||grad-ref||/||ref|| = {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_choice_is_recorded_and_correct(dtype):
    q = torch.randn(2, 256, 8, 128, device=DEVICE, dtype=dtype)
    k = torch.randn(2, 256, 2, 128, device=DEVICE, dtype=dtype)
    v = torch.randn(2, 256, 2, 128, device=DEVICE, dtype=dtype)
    print("auto:", attn.select_backend(q.device, dtype, 128), "packed:",
          attn.select_backend(q.device, dtype, 128, packed=True), "available:",
          attn.available_backends(DEVICE))
    assert rel_err(attention(q, k, v), attention_ref(q, k, v)) < TOL[dtype][0]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_selection_is_the_same_when_the_first_call_has_no_autograd(monkeypatch, mode):
    # the cuDNN probe runs fwd+bwd: a first call under no_grad once made it fail and auto fell to flash
    expected = attn.select_backend(DEVICE, torch.bfloat16, 128)
    monkeypatch.setattr(attn, "_PROBES", {})
    monkeypatch.setattr(attn, "_SELECTED", {})
    monkeypatch.setattr(attn, "_RESOLVED", {})
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        q = torch.randn(1, 64, 2, 128, device=DEVICE, dtype=torch.bfloat16)
        attention(q, q, q)
    assert attn.select_backend(DEVICE, torch.bfloat16, 128) == expected


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,hq,hkv", [(64, 4, 4), (128, 8, 2)], ids=["d64", "d128-gqa"])
def test_packed_rows_without_gradients_match_the_reference(mode, dtype, dim, hq, hkv):
    """Packed rows that need no gradient: on sm90 auto takes flex with 64-token mask blocks and 64 x 64 tiles
    (FLEX_PACKED_FWD); the output matches the fp32 reference (T = 200: no multiple of a block; a one-token
    document), and a second call with the same seq_idx reuses the block mask."""
    batch, t = 2, 200
    gen = torch.Generator(device=DEVICE).manual_seed(dim + hq)
    q = torch.randn(batch, t, hq, dim, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(batch, t, hkv, dim, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(batch, t, hkv, dim, device=DEVICE, dtype=dtype, generator=gen)
    kw = make_kwargs({"seq_idx": "packed"}, batch, t)
    name = attn.resolve_backend("auto", q.device, dtype=dtype, head_dim=dim, gqa=hq != hkv, packed=True, tq=t,
                                tk=t, grad=False)
    if torch.cuda.get_device_capability()[0] == 9:
        assert name == "flex"
    ref = attention_ref(q.float(), k.float(), v.float(), **kw)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        out = attention(q, k, v, **kw)
        again = attention(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype][0]
    assert torch.equal(out, again)


def test_fp32_on_gpu_runs():
    q, k, v = (torch.randn(2, 100, 4, 64, device=DEVICE) for _ in range(3))
    assert rel_err(attention(q, k, v, window=17), attention_ref(q, k, v, window=17)) < 1e-4


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_under_torch_compile_on_gpu(packed):
    torch._dynamo.reset()
    q = torch.randn(2, 256, 8, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 256, 2, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 256, 2, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    seq_idx = (torch.arange(256, device=DEVICE) // 100).expand(2, 256).contiguous() if packed else None

    def fn(q, k, v):
        return attention(q, k, v, seq_idx=seq_idx)

    out = torch.compile(fn, backend="aot_eager")(q, k, v)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*refs, seq_idx=seq_idx)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1.5e-2
    for g, r in zip(grads, refs):
        assert rel_err(g, r.grad) < 3e-2


def test_checkpointing_on_gpu():
    from torch.utils.checkpoint import checkpoint

    base = [torch.randn(2, 128, 4, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    plain = [t.clone().requires_grad_() for t in base]
    ckpt = [t.clone().requires_grad_() for t in base]
    attention(*plain).float().sum().backward()
    checkpoint(lambda a, b, c: attention(a, b, c), *ckpt, use_reentrant=False).float().sum().backward()
    for a, b in zip(plain, ckpt):
        assert torch.equal(a.grad, b.grad)
