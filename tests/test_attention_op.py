"""CPU tests of the attention op: reference vs a per-query loop, the SDPA path, packing, padding, decode,
compile, checkpointing, the varlen packing logic, and backend selection."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import zoo_kernels.attention as attn
from torch.utils.checkpoint import checkpoint
from zoo_kernels.attention import BackendUnavailable, attention, attention_ref


def naive_attention(q, k, v, *, causal=True, window=None, seq_idx=None, key_padding_mask=None, scale=None):
    """One query at a time, straight from the contract (fp64): the oracle of attention_ref. With a key_padding_mask
    the window counts real tokens (a pad is no position)."""
    batch, tq, hq, dim = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, tq, hq, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        doc = [0] * tk
        for j in range(1, tk):
            same = seq_idx is None or seq_idx[b, j] == seq_idx[b, j - 1]
            doc[j] = doc[j - 1] + (0 if same else 1)
        rank = list(range(tk)) if key_padding_mask is None else key_padding_mask[b].long().cumsum(0).tolist()
        for i in range(tq):
            p = tk - tq + i
            keys = [j for j in range(tk)
                    if (not causal or j <= p) and (window is None or rank[p] - rank[j] < window) and doc[j] == doc[p]
                    and (key_padding_mask is None or (key_padding_mask[b, j] and key_padding_mask[b, p]))]
            if not keys:
                continue
            for h in range(hq):
                g = h // (hq // hkv)
                s = torch.stack([(q[b, i, h].double() * k[b, j, g].double()).sum() * scale for j in keys])
                w = torch.softmax(s, 0)
                out[b, i, h] = (w[:, None] * v[b, keys, g].double()).sum(0)
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_close(name, out, ref, tol):
    err = rel_err(out, ref)
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err < tol, f"{name}: ||out-ref||/||ref|| = {err:.2e} >= {tol:.0e}"


def make_inputs(batch=2, tq=23, tk=23, hq=4, hkv=2, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tq, hq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, tk, hkv, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, tk, hkv, dim, generator=gen, dtype=dtype)
    return q, k, v


def packed_seq_idx(batch, t, seed=0):
    """Rows of 1..4 documents with random boundaries, ids increasing."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        n_cuts = int(torch.randint(0, 4, (1,), generator=gen))
        cuts = sorted(torch.randperm(t - 1, generator=gen)[:n_cuts] + 1)
        row = torch.zeros(t, dtype=torch.long)
        for c in cuts:
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


CASES = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "window": dict(window=5),
    "window_noncausal": dict(causal=False, window=4),
    "packed": dict(seq_idx="packed"),
    "padded": dict(key_padding_mask="left"),
    "padded_right": dict(key_padding_mask="right"),
    "packed_padded_window": dict(seq_idx="packed", key_padding_mask="left", window=6),
    # pads after tokens (PEFT prompt tuning's [virtual tokens, pads, prompt]): the window counts tokens, not pads
    "middle_padded_window": dict(key_padding_mask="middle", window=4),
}


def build_case(case, batch, tk):
    kw = dict(CASES[case])
    if kw.get("seq_idx") == "packed":
        kw["seq_idx"] = packed_seq_idx(batch, tk)
    if kw.get("key_padding_mask") in ("left", "right", "middle"):
        kpm = torch.ones(batch, tk, dtype=torch.bool)
        for b in range(batch):
            n = 2 + 3 * b
            if kw["key_padding_mask"] == "left":
                kpm[b, :n] = False
            elif kw["key_padding_mask"] == "middle":
                kpm[b, 3 + b:3 + b + n] = False
            else:
                kpm[b, tk - n:] = False
        kw["key_padding_mask"] = kpm
    return kw


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("tq,tk", [(13, 13), (5, 13), (1, 13)], ids=["train", "prefill", "decode"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_ref_matches_per_query_loop(case, tq, tk, heads):
    q, k, v = make_inputs(tq=tq, tk=tk, hq=heads[0], hkv=heads[1], dim=8)
    kw = build_case(case, 2, tk)
    assert_close(case, attention_ref(q, k, v, **kw), naive_attention(q, k, v, **kw), 1e-5)


@pytest.mark.parametrize("backend", ["auto"])  # auto is "math" on CPU; test_auto_is_math_on_cpu checks it
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("tq", [23, 7, 1], ids=["train", "prefill", "decode"])
def test_cpu_backend_output_and_grads(backend, case, tq):
    tk = 23
    q, k, v = make_inputs(tq=tq, tk=tk, hq=4, hkv=2, dim=16, seed=1)
    kw = build_case(case, 2, tk)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, backend=backend, **kw)
    ref = attention_ref(*refs, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close("out", out, ref, 1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for name, a, b in zip("qkv", leaves, refs):
        assert_close(f"d{name}", a.grad, b.grad, 1e-5)


def test_auto_is_math_on_cpu():
    q, k, v = make_inputs(seed=11)
    assert attn.resolve_backend("auto", q.device, dtype=q.dtype, head_dim=16) == "math"
    assert torch.equal(attention(q, k, v, window=4), attention(q, k, v, window=4, backend="math"))


def test_bf16_cpu_matches_ref():
    q, k, v = make_inputs(dtype=torch.bfloat16, seed=2)
    out = attention(q, k, v, window=7)
    assert out.dtype == torch.bfloat16
    assert_close("bf16", out, attention_ref(q, k, v, window=7), 2e-2)


def test_packed_equals_separate():
    q, k, v = make_inputs(batch=1, tq=30, tk=30, seed=3)
    seq_idx = torch.tensor([[0] * 11 + [1] * 12 + [2] * 7])
    out = attention(q, k, v, seq_idx=seq_idx)
    for lo, hi in [(0, 11), (11, 23), (23, 30)]:
        alone = attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
        assert_close(f"doc {lo}:{hi}", out[:, lo:hi], alone, 1e-5)


def test_left_padded_row_equals_row_alone_and_pad_rows_are_zero():
    q, k, v = make_inputs(batch=1, tq=20, tk=20, seed=4)
    pad = 6
    kpm = torch.ones(1, 20, dtype=torch.bool)
    kpm[:, :pad] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, key_padding_mask=kpm)
    alone = attention(q[:, pad:], k[:, pad:], v[:, pad:])
    assert_close("real rows", out[:, pad:], alone, 1e-5)
    assert out[:, :pad].abs().max() == 0
    out.square().sum().backward()
    for name, t in zip("qkv", leaves):
        assert torch.isfinite(t.grad).all(), f"d{name} not finite"
        assert t.grad[:, :pad].abs().max() == 0, f"d{name} leaks into padded positions"


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = make_inputs(batch=2, tq=9, tk=9, seed=5)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 4:] = True
    out = attention(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0 and out[1, :4].abs().max() == 0 and out[1, 4:].abs().max() > 0


def test_decode_steps_equal_parallel():
    q, k, v = make_inputs(batch=2, tq=16, tk=16, seed=6)
    full = attention(q, k, v, window=5)
    for t in range(16):
        step = attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], window=5)
        assert_close(f"step {t}", step, full[:, t : t + 1], 1e-5)
    chunk = attention(q[:, 10:], k, v, window=5)  # prefill after a cache of 10
    assert_close("chunk", chunk, full[:, 10:], 1e-5)


def test_scale_argument():
    q, k, v = make_inputs(seed=7)
    assert_close("scale", attention(q, k, v, scale=0.3), attention_ref(q, k, v, scale=0.3), 1e-5)
    assert rel_err(attention(q, k, v, scale=0.3), attention(q, k, v)) > 1e-3


def test_under_torch_compile(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(attn, "_RESOLVED", {})  # the first resolution happens inside the traced call
    q, k, v = make_inputs(seed=8)
    seq_idx = packed_seq_idx(2, 23, seed=8)

    def fn(q, k, v):
        return attention(q, k, v, window=9, seq_idx=seq_idx, backend="math")

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
    out.square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*refs, window=9, seq_idx=seq_idx)
    ref.square().sum().backward()
    assert_close("compiled out", out, ref, 1e-5)
    for name, a, b in zip("qkv", leaves, refs):
        assert_close(f"compiled d{name}", a.grad, b.grad, 1e-5)


def test_under_gradient_checkpointing():
    q, k, v = make_inputs(seed=9)
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    ckpt = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*plain, window=6).sin().sum().backward()
    out = checkpoint(lambda a, b, c: attention(a, b, c, window=6), *ckpt, use_reentrant=False)
    out.sin().sum().backward()
    for name, a, b in zip("qkv", ckpt, plain):
        assert_close(f"checkpointed d{name}", a.grad, b.grad, 1e-6)


def test_bad_shapes_raise():
    q, k, v = make_inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v = make_inputs(tq=9, tk=5)
    with pytest.raises(ValueError, match="Tk >= Tq"):
        attention(q, k, v)
    q, k, v = make_inputs()
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)


@pytest.mark.parametrize("name", ["seq_idx", "key_padding_mask"])
@pytest.mark.parametrize("shape", [(2, 1), (7,), (2, 8), (3, 7)], ids=["new-tokens-only", "1d", "long", "batch-3"])
def test_masks_of_another_shape_than_the_keys_are_refused(name, shape):
    """seq_idx and key_padding_mask have one entry per key, [B, Tk] (or [1, Tk] for every row). A mask of the new
    tokens only (decode, [B, 1]) crashed in a broadcast deep in the mask code ('output with shape ... doesn't match
    the broadcast shape'), a 1-d one in an IndexError; now every path names the argument."""
    q, k, v = make_inputs(batch=2, tq=1, tk=7)
    mask = torch.ones(shape, dtype=torch.bool) if name == "key_padding_mask" else torch.zeros(shape, dtype=torch.long)
    for fn in (attention, attention_ref):
        with pytest.raises(ValueError, match=rf"attention: {name} must be \[B, Tk\] = \[2, 7\] or \[1, Tk\]"):
            fn(q, k, v, **{name: mask})


@pytest.mark.parametrize("name", ["seq_idx", "key_padding_mask"])
def test_one_row_mask_serves_every_row_on_the_varlen_path(monkeypatch, name):
    """A [1, Tk] seq_idx or key_padding_mask (the model takes a [1, T] attention_mask for every row) broadcasts on the
    math path and in the reference; the flash family's varlen packing read it as the packing of one row and left the
    other rows' outputs zero (emulated varlen kernel). Now it is expanded to every row first."""
    monkeypatch.setattr(attn, "_flash_varlen", emulated_flash_varlen)
    monkeypatch.setattr(attn, "resolve_backend", lambda *a, **kw: "sdpa_flash")
    attn._META_CACHE.clear()
    q, k, v = make_inputs(batch=2, tq=7, tk=7)
    mask = {"seq_idx": torch.tensor([[0, 0, 0, 1, 1, 1, 1]]),
            "key_padding_mask": torch.tensor([[False, False, True, True, True, True, True]])}[name]
    out = attention(q, k, v, **{name: mask})
    assert_close("one-row mask", out, attention_ref(q, k, v, **{name: mask.expand(2, 7)}), 1e-5)


# --- the varlen (flash-family) packing logic, run on CPU with an emulated FlashAttention varlen kernel


def emulated_flash_varlen(name, q, k, v, meta, causal, left, right, scale):
    """FlashAttention's varlen contract (bottom-right causal per segment, window (left, right))."""
    assert meta.cu_q.dtype == torch.int32 and meta.cu_k.dtype == torch.int32
    out = q * 0  # keeps the graph even when every query row is padded (v's head dim equals q's here)
    cu_q, cu_k = meta.cu_q.tolist(), meta.cu_k.tolist()
    assert max(b - a for a, b in zip(cu_q, cu_q[1:])) == meta.max_q
    assert max(b - a for a, b in zip(cu_k, cu_k[1:])) == meta.max_k
    for s in range(len(cu_q) - 1):
        if cu_q[s + 1] == cu_q[s]:
            continue
        seg = [t[None, lo:hi] for t, lo, hi in ((q, cu_q[s], cu_q[s + 1]), (k, cu_k[s], cu_k[s + 1]),
                                                 (v, cu_k[s], cu_k[s + 1]))]
        assert right == (0 if causal else -1)
        out[cu_q[s] : cu_q[s + 1]] = attention_ref(*seg, causal=causal, window=None if left < 0 else left + 1,
                                                   scale=scale)[0]
    return out


@pytest.mark.parametrize("case", ["packed", "padded", "padded_right", "packed_padded_window", "middle_padded_window"])
@pytest.mark.parametrize("tq", [19, 6, 1], ids=["train", "prefill", "decode"])
def test_varlen_packing_logic(monkeypatch, case, tq):
    monkeypatch.setattr(attn, "_flash_varlen", emulated_flash_varlen)
    attn._META_CACHE.clear()
    tk = 19
    q, k, v = make_inputs(batch=3, tq=tq, tk=tk, seed=10)
    kw = build_case(case, 3, tk)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn._run_flash_family("sdpa_flash", *leaves, kw.get("causal", True), kw.get("window"),
                                 kw.get("seq_idx"), kw.get("key_padding_mask"), 16**-0.5)
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*refs, **kw)
    assert_close(case, out, ref, 1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)  # gradients flow back through the gather/scatter of kept rows
    ref.backward(grad)
    for name, a, b in zip("qkv", leaves, refs):
        if b.grad.abs().max() > 0:
            assert_close(f"d{name}", a.grad, b.grad, 1e-5)
        else:
            assert a.grad is None or a.grad.abs().max() == 0
    again = attn.varlen_meta(kw.get("seq_idx"), kw.get("key_padding_mask"), tq, tk)
    assert again is attn._META_CACHE["meta"], "the packing of the same tensors is reused"


# --- selection


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend to be on an sm90 GPU where flash-attn and FA4 are missing and cuDNN passes its probe."""
    missing = {"flash_attn": "flash_attn is not importable",
               "flash_attn_cute": "flash_attn.cute is not importable"}

    original = attn._unavailable_reason

    def reason(backend, device):
        if device.type != "cuda" or backend not in attn.BACKENDS:
            return original(backend, device)
        return missing.get(backend)

    monkeypatch.setattr(attn, "_unavailable_reason", reason)
    monkeypatch.setattr(attn, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(attn, "_sdpa_probe", lambda *a, **k: True)
    monkeypatch.setattr(attn, "_SELECTED", {})
    monkeypatch.setattr(attn, "_RESOLVED", {})
    monkeypatch.setattr(attn, "_WARNED", set())
    return torch.device("cuda", 0)


def test_auto_falls_back_with_one_warning(fake_cuda):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = attn.select_backend(fake_cuda, torch.bfloat16, 128)
        attn._SELECTED.clear()  # a second decision (another process, say) must not warn again
        second = attn.select_backend(fake_cuda, torch.bfloat16, 128)
        packed = attn.select_backend(fake_cuda, torch.bfloat16, 128, packed=True)
    assert first == second == "sdpa_cudnn"
    assert packed == attn.PACKED_ORDER[0]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # FA4 once, flash_attn once (packed); never repeated
    assert sum("flash_attn_cute" in m for m in messages) == 1
    assert any("pip install flash-attn --no-build-isolation" in m for m in messages)


@pytest.mark.filterwarnings("ignore:attention backend")
def test_auto_routes_features_cudnn_lacks(fake_cuda):
    common = dict(dtype=torch.bfloat16, head_dim=128)
    assert attn.resolve_backend("auto", fake_cuda, **common, tq=64, tk=64) == "sdpa_cudnn"
    assert attn.resolve_backend("auto", fake_cuda, **common, window=True, tq=64, tk=64) == "sdpa_flash"
    assert attn.resolve_backend("auto", fake_cuda, **common, tq=16, tk=64) == "sdpa_flash"
    assert attn.resolve_backend("auto", fake_cuda, **common, tq=1, tk=64) == "sdpa_flash"  # cuDNN: a plan per Tk
    assert attn.resolve_backend("auto", fake_cuda, **common, padded=True, tq=1, tk=64) == "sdpa_efficient"
    assert attn.resolve_backend("auto", fake_cuda, dtype=torch.float32, head_dim=128) == "sdpa_efficient"
    assert attn.resolve_backend("auto", torch.device("cpu"), **common) == "math"


@pytest.mark.filterwarnings("ignore:attention backend")
def test_head_dims_the_efficient_kernel_rejects_go_to_math(fake_cuda):
    """torch's memory-efficient kernel needs head_dim a multiple of 8 in fp16/bf16 (4 in fp32) and raises "No
    available kernel" otherwise: the demo's tiny Transformer++ (head_dim 22) crashed on a GPU before this."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert attn.resolve_backend("auto", fake_cuda, dtype=dtype, head_dim=22, tq=64, tk=64) == "math"
        assert attn.resolve_backend("auto", fake_cuda, dtype=dtype, head_dim=22, tq=16, tk=64) == "math"
    assert attn.resolve_backend("auto", fake_cuda, dtype=torch.float32, head_dim=20) == "sdpa_efficient"
    assert attn.resolve_backend("auto", fake_cuda, dtype=torch.bfloat16, head_dim=20) == "math"
    assert attn.resolve_backend("auto", fake_cuda, dtype=torch.float64, head_dim=64) == "math"
    with pytest.raises(BackendUnavailable, match="multiple of 8"):
        attn.resolve_backend("sdpa_efficient", fake_cuda, dtype=torch.bfloat16, head_dim=22)


@pytest.mark.filterwarnings("ignore:attention backend")
def test_packed_rows_without_gradients_go_to_flex_on_hopper(fake_cuda, monkeypatch):
    """Packed rows that need no gradient take flex's tuned forward on sm90 where FA2 is the varlen kernel at hand;
    everything else keeps the packed choice (gradients, other head dims and dtypes, windows, padding, prefill,
    another architecture, FA4 installed)."""
    common = dict(dtype=torch.bfloat16, head_dim=128, packed=True, tq=64, tk=64)
    assert attn.resolve_backend("auto", fake_cuda, **common, grad=False) == "flex"
    assert attn.resolve_backend("auto", fake_cuda, **common) == "sdpa_flash"  # gradients: FA2 varlen
    assert attn.resolve_backend("auto", fake_cuda, **{**common, "head_dim": 64}, grad=False) == "flex"
    assert attn.resolve_backend("auto", fake_cuda, **{**common, "head_dim": 256}, grad=False) == "sdpa_flash"
    assert attn.resolve_backend("auto", fake_cuda, **{**common, "dtype": torch.float32}, grad=False) \
        == "sdpa_efficient"
    assert attn.resolve_backend("auto", fake_cuda, **common, window=True, grad=False) == "sdpa_flash"
    assert attn.resolve_backend("auto", fake_cuda, **common, padded=True, grad=False) == "sdpa_flash"
    assert attn.resolve_backend("auto", fake_cuda, **{**common, "tq": 16}, grad=False) == "sdpa_flash"
    assert attn.resolve_backend("auto", fake_cuda, dtype=torch.bfloat16, head_dim=128, tq=64, tk=64,
                                grad=False) == "sdpa_cudnn"  # unpacked rows: unchanged
    monkeypatch.setattr(attn, "_RESOLVED", {})
    monkeypatch.setattr(attn, "_SELECTED", {})
    monkeypatch.setattr(attn, "_capability", lambda device: (8, 0))
    assert attn.resolve_backend("auto", fake_cuda, **common, grad=False) == "sdpa_flash"
    monkeypatch.setattr(attn, "_RESOLVED", {})
    monkeypatch.setattr(attn, "_SELECTED", {})
    monkeypatch.setattr(attn, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(attn, "_unavailable_reason", lambda backend, device: None)  # FA4 installed
    assert attn.resolve_backend("auto", fake_cuda, **common, grad=False) == "flash_attn_cute"


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode", "no_leaf_requires_grad"])
def test_attention_tells_the_selection_whether_the_call_needs_gradients(monkeypatch, mode):
    seen = []

    def resolve(*args, **kwargs):
        seen.append(kwargs["grad"])
        return "math"

    monkeypatch.setattr(attn, "resolve_backend", resolve)
    q, k, v = make_inputs()
    leaves = [t.requires_grad_(mode != "no_leaf_requires_grad") for t in (q, k, v)]
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with ctx():
        attention(*leaves, seq_idx=torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32))
    assert seen == [mode == "grad"]


@pytest.mark.parametrize("length,block", [(200, 64), (256, 64), (200, 128), (1000, 64), (64, 64), (65, 64)])
def test_packed_block_mask_has_the_blocks_of_create_block_mask(length, block):
    """The block mask built from document starts has create_block_mask's dense mask and the same partial and full
    key blocks per query block (and query blocks per key block, for the backward), for rows of 1 to 7 documents,
    one-token documents, 7-token documents in every block, and lengths no multiple of the block."""
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(length + block)
    seq_idx = torch.zeros(4, length, dtype=torch.int32)
    for b in range(3):
        for cut in torch.randperm(length - 1, generator=gen)[: 3 * b].add(1).tolist():
            seq_idx[b, cut:] += 1
    seq_idx[3] = torch.arange(length) // 7
    seq_idx[2, -1] += 5  # a one-token document at the end
    doc = attn.document_ids(seq_idx)
    want = create_block_mask(lambda b, h, q, k: (k <= q) & (doc[b, q] == doc[b, k]), 4, None, length, length,
                             device="cpu", BLOCK_SIZE=block)
    got = attn.packed_block_mask(seq_idx, block)

    def lists(counts, indices):
        return [[sorted(indices[b, 0, i, :counts[b, 0, i]].tolist()) for i in range(counts.shape[2])]
                for b in range(counts.shape[0])]

    assert torch.equal(got.to_dense(), want.to_dense())
    assert got.q_indices is not None and got.full_q_indices is not None
    for name in ("kv", "full_kv", "q", "full_q"):
        assert lists(getattr(got, f"{name}_num_blocks"), getattr(got, f"{name}_indices")) == \
            lists(getattr(want, f"{name}_num_blocks"), getattr(want, f"{name}_indices")), name
        # in ascending order, as from_kv_blocks lists them (the kernels walk them in order)
        indices, counts = getattr(got, f"{name}_indices"), getattr(got, f"{name}_num_blocks")
        assert all(indices[b, 0, r, :counts[b, 0, r]].tolist() == sorted(indices[b, 0, r, :counts[b, 0, r]].tolist())
                   for b in range(4) for r in range(counts.shape[2])), name


def test_flex_block_mask_of_packed_rows_is_made_once_per_seq_idx(monkeypatch):
    """Every attention layer of a forward pass packs the same way: the block mask of one seq_idx is made once,
    again when seq_idx changes in place or another block size is asked, and never cached for inference tensors."""
    made = []
    monkeypatch.setattr(attn, "packed_block_mask", lambda seq_idx, block: made.append(block) or object())
    monkeypatch.setattr(attn, "_FLEX", {})
    monkeypatch.setattr(attn, "_FLEX_MASK", {})
    seq_idx = torch.zeros(2, 64, dtype=torch.int32)
    seq_idx[:, 40:] = 1

    def mask(s, block=64):
        return attn.flex_block_mask(2, 64, 64, causal=True, window=None, seq_idx=s, key_padding_mask=None,
                                    device=torch.device("cpu"), block=block)

    first = mask(seq_idx)
    assert mask(seq_idx) is first and made == [64]
    seq_idx[:, 50:] = 2  # in place: a new version
    assert mask(seq_idx) is not first and made == [64, 64]
    mask(seq_idx, block=128)
    assert made == [64, 64, 128]
    with torch.inference_mode():
        frozen = torch.zeros(2, 64, dtype=torch.int32)
    mask(frozen)
    mask(frozen)
    assert made == [64, 64, 128, 64, 64]


@pytest.mark.parametrize("backend", ["flash_attn", "flash_attn_cute"])
def test_forced_missing_backend_raises_with_install_line(fake_cuda, backend):
    with pytest.raises(BackendUnavailable, match="not importable") as info:
        attn.resolve_backend(backend, fake_cuda)
    assert info.value.install == attn.INSTALL[backend]
    assert attn.INSTALL[backend] in str(info.value)


def test_forced_gpu_backend_on_cpu_raises():
    q, k, v = make_inputs()
    with pytest.raises(BackendUnavailable, match="CUDA") as info:
        attention(q, k, v, backend="flash_attn")
    assert "pip install flash-attn --no-build-isolation" in str(info.value)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        attention(q, k, v, backend="sdpa_cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="nope")


def test_available_backends_on_cpu():
    assert attn.available_backends("cpu") == ["math"]


def test_varlen_meta_takes_inference_tensors():
    """A seq_idx made under inference_mode has no version counter; the cu_seqlens cache must not read it."""
    with torch.inference_mode():
        seq_idx = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])
        meta = attn.varlen_meta(seq_idx, None, 5, 5)
        again = attn.varlen_meta(seq_idx, None, 5, 5)
    assert meta.cu_q.tolist() == [0, 2, 5, 8, 10] == again.cu_q.tolist() and meta.max_q == 3
