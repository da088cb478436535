"""The mixer contract, run on every registered mixer (STYLE.md #3)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from zoo.registry import get_mixer, list_mixers

D_MODEL = 32
TOL = 1e-5  # references compute in fp32
# One small spec per mixer (plus variants that exercise grouped B/C, GQA and sliding windows).
SPECS = {
    "mamba": {"d_state": 8, "d_conv": 4, "expand": 2},
    "mamba2": {"d_state": 8, "d_conv": 4, "expand": 2, "head_dim": 16, "chunk_size": 8},
    "mamba2-grouped": {"type": "mamba2", "d_state": 8, "expand": 2, "head_dim": 8, "n_groups": 2, "chunk_size": 8},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "attention-window": {"type": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 5},
    "gla": {"n_heads": 2, "chunk_size": 8},
}


def build(name: str) -> torch.nn.Module:
    spec = dict(SPECS[name])
    mixer_type = spec.pop("type", name)
    torch.manual_seed(0)
    mixer = get_mixer(mixer_type)(D_MODEL, 0, **spec).double()
    with torch.no_grad():  # move parameters off their init so every path is exercised
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer.eval()


def run(mixer, x, cache=None, **kw):
    return mixer(x, cache=cache, **kw)


def test_every_registered_mixer_has_a_spec():
    assert set(list_mixers()) <= set(SPECS), "add the new mixer to SPECS so the contract runs on it"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parallel_equals_steps(name):
    mixer = build(name)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    full = run(mixer, x)
    cache = mixer.init_state(2, x.dtype, x.device)
    steps = torch.cat([run(mixer, x[:, t:t + 1], cache) for t in range(x.shape[1])], dim=1)
    assert_close("steps", steps, full, TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunked_prefill_equals_whole(name):
    mixer = build(name)
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    full = run(mixer, x)
    cache = mixer.init_state(2, x.dtype, x.device)
    parts = [run(mixer, x[:, a:b], cache) for a, b in ((0, 9), (9, 10), (10, 21))]
    assert_close("chunks", torch.cat(parts, 1), full, TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_packed_equals_separate(name):
    mixer = build(name)
    a = torch.randn(1, 7, D_MODEL, dtype=torch.float64)
    b = torch.randn(1, 10, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 7 + [1] * 10], dtype=torch.int32)
    packed = run(mixer, torch.cat([a, b], 1), seq_idx=seq_idx)
    assert_close("doc a", packed[:, :7], run(mixer, a), TOL)
    assert_close("doc b", packed[:, 7:], run(mixer, b), TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_left_padding_equals_alone(name):
    mixer = build(name)
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    pad = torch.randn(1, 4, D_MODEL, dtype=torch.float64)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    position_ids = torch.arange(9)[None]
    padded = run(mixer, torch.cat([pad, x], 1), attention_mask=mask,
                 position_ids=torch.cat([torch.zeros(1, 4, dtype=torch.long), position_ids], 1))
    assert_close("padded row", padded[:, 4:], run(mixer, x, position_ids=position_ids), TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pads_after_tokens_are_skipped(name):
    """Pads after tokens (PEFT's prompt tuning lays a left-padded row out as [virtual tokens, pads, prompt]), in one
    call or after a carried state, change nothing: each row's tokens get the outputs of the row without its pads,
    and decoding goes on from the same state. A pad decayed the recurrent states and put zeros in the conv windows;
    a sliding window counted pads as positions (its window of 5 held 5 - pads tokens) and its cache kept the last
    window - 1 positions, pads among them, dropping tokens the window still covers."""
    _check_pads_after_tokens(build(name), torch.float64, "cpu", TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pads_after_tokens_need_no_position_ids(name):
    """A mixer used alone (no ZooModel to count positions) with an attention_mask and no position_ids: a pad after
    tokens is no position, in one call and through a cache, so each row's tokens get the outputs of the row alone.
    Attention counted the pads (past length + arange): the tokens after them met the earlier keys at RoPE distances
    longer by the pads (10% off)."""
    mixer = build(name)
    x = torch.randn(2, 15, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 5 + [0] * 3 + [1] * 7, [0] * 2 + [1] * 3 + [0] + [1] * 9])
    whole = run(mixer, x, attention_mask=mask)
    cache = mixer.init_state(2, x.dtype, x.device)
    chunks = torch.cat([run(mixer, x[:, a:b], cache, attention_mask=mask[:, :b])
                        for a, b in ((0, 6), (6, 13), (13, 14), (14, 15))], 1)
    for r in range(2):
        keep = mask[r].bool()
        alone = run(mixer, x[r:r + 1, keep])
        assert_close(f"row {r}", whole[r:r + 1, keep], alone, TOL)
        assert_close(f"row {r} in chunks", chunks[r:r + 1, keep], alone, TOL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["mamba", "mamba2", "mamba2-grouped", "gla"])
def test_pads_after_tokens_are_skipped_on_the_cuda_kernels(name):
    """The same on the GPU's conv and scan kernels (fp32; the laid-out conv input carries seq_idx there)."""
    _check_pads_after_tokens(build(name).float().cuda(), torch.float32, "cuda", 2e-3)


def _check_pads_after_tokens(mixer, dtype, device, tol):
    x = torch.randn(2, 15, D_MODEL, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.tensor([[1] * 5 + [0] * 3 + [1] * 7, [0] * 2 + [1] * 3 + [0] + [1] * 9], device=device)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    alone = [run(mixer, x[r:r + 1, mask[r].bool()], position_ids=torch.arange(int(mask[r].sum()), device=device)[None])
             for r in range(2)]
    whole = run(mixer, x[:, :14], attention_mask=mask[:, :14], position_ids=position_ids[:, :14])
    cache = mixer.init_state(2, x.dtype, x.device)
    parts = [run(mixer, x[:, a:b], cache, attention_mask=mask[:, :b], position_ids=position_ids[:, a:b])
             for a, b in ((0, 6), (6, 14), (14, 15))]
    chunks = torch.cat(parts, 1)
    for r in range(2):
        keep = mask[r].bool()
        assert_close(f"row {r}", whole[r:r + 1, keep[:14]], alone[r][:, :-1], tol)
        assert_close(f"row {r} in chunks", chunks[r:r + 1, keep], alone[r], tol)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_lora_targets_change_output(name):
    mixer = build(name)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    base = run(mixer, x)
    assert mixer.lora_targets, "a mixer must name the nn.Linear children LoRA may adapt"
    for target in mixer.lora_targets:
        module = mixer.get_submodule(target)
        assert isinstance(module, torch.nn.Linear), f"{target} is not an nn.Linear"
        with torch.no_grad():
            module.weight.add_(0.1 * torch.randn_like(module.weight))
        changed = run(mixer, x)
        assert (changed - base).abs().max() > 1e-6, f"perturbing {target} left the output unchanged"
        base = changed


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradients_flow_through_carried_state(name):
    mixer = build(name)
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64, requires_grad=True)
    cache = mixer.init_state(1, x.dtype, x.device)
    y1 = run(mixer, x[:, :6], cache)
    y2 = run(mixer, x[:, 6:], cache)
    (y2.sum()).backward()
    assert x.grad[:, :6].abs().sum() > 0, "the second chunk's loss did not reach the first chunk's inputs"
    whole = x.detach().clone().requires_grad_(True)
    run(mixer, whole)[:, 6:].sum().backward()
    assert_close("grad through state", x.grad, whole.grad, TOL)
    assert y1.shape == (1, 6, D_MODEL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradients_through_single_steps_equal_the_forward(name):
    """Decoding token by token with autograd on gives every parameter the gradient of one forward over the same
    tokens: a step's in-place state update must not overwrite what the backward of an earlier step needs."""
    mixer = build(name)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    run(mixer, x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    cache = mixer.init_state(2, x.dtype, x.device)
    torch.cat([run(mixer, x[:, t:t + 1], cache) for t in range(5)], dim=1).square().sum().backward()
    for n, p in mixer.named_parameters():
        assert_close(f"grad {n}", p.grad, want[n], TOL)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_a_width_one_conv_keeps_no_view_of_the_prefill(name):
    """At d_conv 1 a prefill's conv state is an empty view of the conv's input, contiguous, so the cache kept it (and
    the input with it); the next step's in-place update then bumped the version of that input, which the backward
    had saved: truncated BPTT whose last chunk is one token failed in backward."""
    spec = dict(SPECS[name], d_conv=1)
    torch.manual_seed(0)
    mixer = get_mixer(name)(D_MODEL, 0, **spec).double()
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    run(mixer, x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    cache = mixer.init_state(2, x.dtype, x.device)
    y = run(mixer, x[:, :4], cache)
    assert cache.conv_state._base is None, "the cache keeps a view of the prefill's conv input"
    torch.cat([y, run(mixer, x[:, 4:], cache)], dim=1).square().sum().backward()
    for n, p in mixer.named_parameters():
        assert_close(f"grad {n}", p.grad, want[n], TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_state_size_positive_and_monotone(name):
    mixer = build(name)
    small, large = mixer.state_size(16), mixer.state_size(4096)
    assert 0 < small <= large
    if name.startswith(("mamba", "gla")):
        assert small == large, "a recurrent state does not grow with the sequence"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_packed_documents_across_carried_cache(name):
    """A chunk boundary inside a packed row: the second chunk must not see the first chunk's other documents."""
    mixer = build(name)
    x = torch.randn(1, 16, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4], dtype=torch.int32)
    whole = run(mixer, x, seq_idx=seq_idx)
    cache = mixer.init_state(1, x.dtype, x.device)
    parts = [run(mixer, x[:, a:b], cache, seq_idx=seq_idx[:, a:b]) for a, b in ((0, 8), (8, 16))]
    assert_close("packed chunks", torch.cat(parts, 1), whole, TOL)


@pytest.mark.parametrize("cuts", [(5, 12), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)],
                         ids=["chunks", "one-token-calls"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunk_boundary_on_a_document_boundary(name, cuts):
    """A chunk that starts a new document (its seq_idx differs from the last token of the chunk before) must not
    inherit the carried state: each document gives the outputs of that document run alone."""
    mixer = build(name)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 12 + [4] * 4], dtype=torch.int32)
    alone = [torch.cat([run(mixer, x[r:r + 1, a:b]) for a, b in docs], 1)
             for r, docs in enumerate((((0, 5), (5, 12), (12, 16)), ((0, 12), (12, 16))))]
    cache = mixer.init_state(2, x.dtype, x.device)
    bounds = (0, *cuts, 16)
    parts = torch.cat([run(mixer, x[:, a:b], cache, seq_idx=seq_idx[:, a:b]) for a, b in zip(bounds, bounds[1:])], 1)
    assert_close("row 0", parts[:1], alone[0], TOL)
    assert_close("row 1", parts[1:], alone[1], TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_document_boundary_at_a_pad_beside_a_chunk_boundary(name):
    """Packed rows with pads where a document changes, cut into chunks next to the pad: the pad closes a chunk with
    the next document's seq_idx (row 0), or opens one with the last document's (row 1). Each document's tokens give
    the outputs of that document alone. The conv window carried its old document's inputs into the new one in both
    rows (the scans had restarted: the conv counted document changes between tokens only)."""
    mixer = build(name)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    mask = torch.tensor([[1] * 4 + [0] + [1] * 6, [1] * 5 + [0] + [1] * 5])
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [0] * 6 + [1] * 5], dtype=torch.int32)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4]])
    cache = mixer.init_state(2, x.dtype, x.device)
    out = torch.cat([run(mixer, x[:, a:b], cache, attention_mask=mask[:, :b], seq_idx=seq_idx[:, a:b],
                         position_ids=position_ids[:, a:b]) for a, b in ((0, 5), (5, 11))], 1)
    for r, docs in enumerate((((0, 4), (5, 11)), ((0, 5), (6, 11)))):
        for a, b in docs:
            alone = run(mixer, x[r:r + 1, a:b], position_ids=torch.arange(b - a)[None])
            assert_close(f"row {r} tokens {a}..{b - 1}", out[r:r + 1, a:b], alone, TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_calls_without_seq_idx_continue_the_last_packed_document(name):
    """After a packed chunk, a chunk or decode step without seq_idx continues the row's last document (the only
    one a recurrent state carries): attention must not attend to the earlier documents' cached keys, and a later
    chunk with ids must line up with the cached keys' ids."""
    mixer = build(name)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 12, [0] * 2 + [1] * 3 + [2] * 11], dtype=torch.int32)
    cache = mixer.init_state(2, x.dtype, x.device)
    parts = [run(mixer, x[:, :6], cache, seq_idx=seq_idx[:, :6]), run(mixer, x[:, 6:9], cache)]
    parts += [run(mixer, x[:, t:t + 1], cache) for t in (9, 10)]
    parts.append(run(mixer, x[:, 11:], cache, seq_idx=seq_idx[:, 11:]))
    out = torch.cat(parts, 1)
    assert_close("row 0", out[:1, 4:], run(mixer, x[:1, 4:]), TOL)
    assert_close("row 1", out[1:, 5:], run(mixer, x[1:, 5:]), TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_chunk_of_no_tokens_with_seq_idx_after_a_cache_changes_nothing(name):
    """A chunk of no tokens (a chunked prefill's empty remainder) with seq_idx [B, 0], after a chunk run without ids,
    gives [B, 0, D] and leaves the cache as it was: the chunks after it give the outputs of one forward. Attention
    gave the keys cached without ids the chunk's first id, which an empty chunk has not ('The expanded size of the
    tensor (6) must match the existing size (0)')."""
    mixer = build(name)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    seq_idx = torch.zeros(2, 9, dtype=torch.int32)
    cache = mixer.init_state(2, x.dtype, x.device)
    parts = [run(mixer, x[:, :6], cache), run(mixer, x[:, 6:6], cache, seq_idx=seq_idx[:, 6:6])]
    assert parts[1].shape == (2, 0, D_MODEL)
    parts += [run(mixer, x[:, 6:7], cache), run(mixer, x[:, 7:], cache, seq_idx=seq_idx[:, 7:])]
    assert_close("chunks", torch.cat(parts, 1), run(mixer, x), TOL)


@pytest.mark.parametrize("variant", ["plain", "bias", "inner_norms", "mask", "documents", "cache", "batch1"])
def test_mamba_channels_first_equals_row_major(variant, monkeypatch):
    """Mamba's channels-first sequence forward (projections straight into the conv/scan layout, Δ's bias in the
    scan) equals the row-major one (linear layers, then transposes), output, cache and every gradient; and a
    LoRA-wrapped or hooked mixer takes the row-major path."""
    from zoo.mixers.mamba import Mamba

    spec = dict(SPECS["mamba"], bias=variant == "bias", inner_norms=variant == "inner_norms")
    torch.manual_seed(0)
    mixer = Mamba(D_MODEL, 0, **spec).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = 1 if variant == "batch1" else 2
    x = torch.randn(batch, 17, D_MODEL, dtype=torch.float64)
    kw = {}
    if variant == "mask":
        kw["attention_mask"] = torch.ones(batch, 17).index_fill_(1, torch.tensor([0, 1, 2]), 0)
    if variant == "documents":
        kw["seq_idx"] = torch.tensor([[0] * 6 + [1] * 11, [0] * 12 + [1] * 5])

    def forward_backward(channels_first):
        monkeypatch.setattr(Mamba, "_channels_first", lambda self: channels_first)
        mixer.zero_grad()
        xx = x.clone().requires_grad_()
        cache = mixer.init_state(batch, x.dtype, x.device) if variant == "cache" else None
        out = mixer(xx, cache=cache, **kw)
        out.pow(2).sum().backward()
        state = (cache.conv_state, cache.recurrent_state) if cache is not None else ()
        return out.detach(), xx.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}, state

    out_cf, dx_cf, grads_cf, state_cf = forward_backward(True)
    out_rm, dx_rm, grads_rm, state_rm = forward_backward(False)
    assert_close("out", out_cf, out_rm, TOL)
    assert_close("dx", dx_cf, dx_rm, TOL)
    for name, g in grads_rm.items():
        assert_close(f"grad {name}", grads_cf[name], g, TOL)
    for a, b in zip(state_cf, state_rm):
        assert_close("cache", a, b, TOL)
    monkeypatch.undo()
    assert mixer._channels_first()
    mixer.state_probe = lambda *a, **k: None
    assert not mixer._channels_first()


def test_mamba_lora_takes_the_row_major_path():
    """PEFT's LoRA layers wrap in_proj/x_proj/dt_proj; their adapters live in the wrapper's forward, which the
    channels-first path would bypass: a wrapped mixer must take the row-major path (and its adapter must act)."""
    peft = pytest.importorskip("peft")
    from zoo.mixers.mamba import Mamba

    torch.manual_seed(0)
    mixer = Mamba(D_MODEL, 0, **SPECS["mamba"]).double()
    wrapped = peft.get_peft_model(torch.nn.Sequential(mixer), peft.LoraConfig(
        r=4, target_modules=["in_proj", "x_proj", "dt_proj", "out_proj"], init_lora_weights=False))
    inner = wrapped.base_model.model[0]
    assert not inner._channels_first()
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        with_adapter = inner(x)
        with wrapped.disable_adapter():
            without = inner(x)
    assert (with_adapter - without).abs().max() > 1e-3


@pytest.fixture
def fast_kernels(monkeypatch):
    """zoo.backends answering as on a CUDA machine with every fast kernel built ('cuda' selective scan, 'triton' SSD),
    while the mixers run on CPU tensors: a call that reaches a fast kernel fails (they need CUDA), one that the
    mixer's guard sends to the reference runs."""
    from zoo import backends

    names = {"selective_scan": "cuda", "ssd": "triton"}
    monkeypatch.setattr(backends, "_fast_backend", lambda op, device: (names.get(op), "no such kernel"))
    monkeypatch.setattr(backends, "_WARNED", set())


@pytest.mark.parametrize("layout", ["channels_first", "row_major"])
@pytest.mark.parametrize("d_state,dtype,problem", [(80, torch.float32, "d_state = 80"),
                                                   (8, torch.float64, "torch.float64 activations")])
def test_mamba_scan_takes_the_reference_where_the_cuda_scan_cannot(fast_kernels, monkeypatch, layout, d_state, dtype,
                                                                    problem):
    """The CUDA selective scan takes N <= 64 and fp32/bf16/fp16 (check_scan refuses the rest with a ValueError /
    TypeError): with scan_backend "auto" a Mamba layer with d_state 80, or run in fp64, on a GPU scans on the
    reference with one warning (before, its forward raised "N = 80 > 64"); "cuda" asked explicitly raises, naming
    the field. d_state 64 keeps the kernel."""
    from zoo.mixers.mamba import Mamba

    if layout == "row_major":
        monkeypatch.setattr(Mamba, "_channels_first", lambda self: False)
    torch.manual_seed(0)
    mixer = Mamba(D_MODEL, 0, d_state=d_state).to(dtype)
    ref = Mamba(D_MODEL, 0, d_state=d_state, scan_backend="ref").to(dtype)
    ref.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 9, D_MODEL, dtype=dtype)
    with pytest.warns(RuntimeWarning, match=problem):
        out = mixer(x)
    assert_close("out", out, ref(x), TOL)
    assert mixer.backend_name() == "ref"
    with pytest.raises(ValueError, match=problem):
        Mamba(D_MODEL, 0, d_state=d_state, scan_backend="cuda")._scan_backend("cuda", dtype)
    assert Mamba(D_MODEL, 0, d_state=64)._scan_backend("cuda", torch.bfloat16) == "cuda"



def test_mamba_scan_with_gradients_takes_the_reference_where_its_backward_does_not_fit(fast_kernels, monkeypatch):
    """A block may have 99 KB of shared memory on compute capability 8.6, 8.9 and 12.x (RTX 30xx/40xx/50xx) and the
    CUDA scan's backward needs 150 KB at d_state 33..64: training such a layer ran the forward on the kernel, then
    the backward failed to launch ("invalid argument"). With gradients, scan_backend "auto" now scans it on the
    reference with one warning and "cuda" raises naming d_state; without gradients, or at d_state 32, the kernel
    stays."""
    from zoo.mixers import mamba as mamba_module
    from zoo.mixers.mamba import Mamba

    monkeypatch.setattr(mamba_module, "smem_optin", lambda device: 101376)  # an RTX 4090's opt-in limit
    torch.manual_seed(0)
    mixer = Mamba(D_MODEL, 0, d_state=64)
    ref = Mamba(D_MODEL, 0, d_state=64, scan_backend="ref")
    ref.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 9, D_MODEL)
    with pytest.warns(RuntimeWarning, match="d_state = 64 with gradients"):
        out = mixer(x)
    assert_close("out", out, ref(x), TOL)
    out.sum().backward()
    assert mixer._scan_backend("cuda", torch.bfloat16) == "cuda"
    assert Mamba(D_MODEL, 0, d_state=32)._scan_backend("cuda", torch.bfloat16, grad=True) == "cuda"
    with pytest.raises(ValueError, match="d_state = 64 with gradients.*150096 bytes.*101376"):
        Mamba(D_MODEL, 0, d_state=64, scan_backend="cuda")._scan_backend("cuda", torch.float32, grad=True)

def test_mamba2_chunk_scan_takes_the_reference_below_the_triton_chunk(fast_kernels):
    """The Triton SSD scan refuses chunks below MIN_CHUNK_SIZE = 16 ("chunk_size must be at least 16"), which the
    CPU configs use (chunk_size 8): with scan_backend "auto" such a Mamba-2 layer on a GPU scans on the reference with
    one warning; "triton" asked explicitly raises, naming the field. chunk_size 16 keeps the kernel."""
    from zoo.mixers.mamba2 import Mamba2

    spec = {"d_state": 8, "head_dim": 16, "chunk_size": 8}
    torch.manual_seed(0)
    mixer = Mamba2(D_MODEL, 0, **spec)
    ref = Mamba2(D_MODEL, 0, **spec, scan_backend="ref")
    ref.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 19, D_MODEL)
    with pytest.warns(RuntimeWarning, match="chunk_size = 8"):
        out = mixer(x)
    assert_close("out", out, ref(x), TOL)
    assert mixer.backend_name() == "ref"
    with pytest.raises(ValueError, match="chunk_size = 8"):
        Mamba2(D_MODEL, 0, **spec, scan_backend="triton")._chunk_backend("triton")
    assert Mamba2(D_MODEL, 0, **{**spec, "chunk_size": 16})._chunk_backend("triton") == "triton"


def test_mamba2_used_alone_reads_a_log_written_through_data():
    """A Mamba-2 layer used outside a ZooModel (nothing calls new_sequence), without a cache and without autograd,
    after A_log was written through .data (an EMA copy), which keeps its storage and version: the forward kept the A
    of the first call."""
    mixer = build("mamba2")
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        mixer(x)
        mixer.A_log.data.add_(2.0)
        out = mixer(x)
    assert_close("after A_log.data changed", out, mixer(x), TOL)  # (autograd on: A made afresh)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
@pytest.mark.parametrize("change", ["data", "fused_adamw"])
def test_a_layer_used_alone_with_a_cache_reads_weights_changed_without_a_new_version(name, change):
    """A Mamba / Mamba-2 layer used outside a ZooModel (nothing calls new_sequence) with a cache, after its weights
    were written through .data (an EMA copy) or by a fused AdamW step, both of which keep a parameter's storage and
    version: the next sequence's prefill (Mamba-2's A) and steps (the step constants) read the constants the first
    sequence kept."""
    mixer = build(name)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)

    def sequence():  # a prefill of 6 tokens, then 3 steps, from a fresh cache
        cache = mixer.init_state(2, x.dtype, x.device)
        return torch.cat([run(mixer, x[:, :6], cache)] + [run(mixer, x[:, t:t + 1], cache) for t in range(6, 9)], 1)

    with torch.no_grad():
        sequence()  # keeps the decoded constants
    if change == "data":
        ssm = [mixer.A_log, mixer.D, mixer.conv1d.weight, mixer.dt_bias if name == "mamba2" else mixer.dt_proj.bias]
        for p in ssm:
            p.data.mul_(0.5).add_(0.3)
    else:
        opt = torch.optim.AdamW(mixer.parameters(), lr=0.05, fused=True)
        mixer(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        out = sequence()
    assert_close("after the change", out, sequence(), TOL)  # (autograd on: every constant made afresh)


def test_a_mamba_layer_used_alone_under_cpu_autocast_reads_dt_proj_written_through_data():
    """The unfused step keeps dt_proj's weight and bias under the activations' dtype (bf16 under CPU autocast), but
    the prefill made afresh only those of CUDA autocast's dtype (or x's): a layer used alone under CPU autocast kept
    a dt_proj written through .data from its first sequence."""
    mixer = build("mamba").float()
    x = torch.randn(2, 9, D_MODEL)

    def sequence(grad=False):  # a prefill of 6 tokens, then 3 steps, from a fresh cache
        cache = mixer.init_state(2, x.dtype, x.device)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            out = [run(mixer, x[:, :6], cache)] + [run(mixer, x[:, t:t + 1], cache) for t in range(6, 9)]
        return torch.cat(out, 1).float().detach()

    sequence()  # keeps the decoded constants
    mixer.dt_proj.weight.data.mul_(10.0)
    mixer.dt_proj.bias.data.add_(5.0)
    assert_close("after the change", sequence(), sequence(grad=True), TOL)  # (autograd on: made afresh)


def test_a_window_of_one_keeps_no_past_keys():
    """Each query sees itself only, so the cache keeps nothing; transformers' sliding layer slices its last
    `window - 1` keys as [-0:], which kept every key: a cache that grew with the sequence (outputs were right)."""
    from transformers import AutoModelForCausalLM

    import zoo

    torch.manual_seed(0)
    config = zoo.ZooConfig(vocab_size=64, d_model=32, layers="AA", ffn="none",
                           mixers={"A": {"type": "attention", "n_heads": 2, "window": 1}})
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        cache, logits = out.cache if hasattr(out, "cache") else out.past_key_values, [out.logits]
        for t in range(6, 10):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert all(layer.keys.shape[-2] == 0 for layer in cache.layers)
    assert torch.allclose(torch.cat(logits, 1), full, atol=1e-5)


@pytest.mark.parametrize("scan_backend,want", [("ref", "ref"), ("auto", "auto")])
def test_gla_decode_step_follows_scan_backend(monkeypatch, scan_backend, want):
    """scan_backend "ref" keeps GLA's decode step on the reference: the step called gla_state_update with its default
    backend "auto", which takes the Triton step kernel on CUDA whatever the layer asked for."""
    import zoo.mixers.gla as gla_module

    seen = []
    real = gla_module.gla_state_update

    def spy(*args, backend="auto"):
        seen.append(backend)
        return real(*args, backend="ref")

    monkeypatch.setattr(gla_module, "gla_state_update", spy)
    mixer = get_mixer("gla")(D_MODEL, 0, n_heads=2, chunk_size=8, scan_backend=scan_backend).eval()
    x = torch.randn(1, 4, D_MODEL)
    cache = mixer.init_state(1, x.dtype, x.device)
    with torch.no_grad():
        mixer(x[:, :3], cache=cache)
        mixer(x[:, 3:], cache=cache)
    assert seen == [want]


@pytest.mark.parametrize("name", ["attention", "attention-window"])
def test_attention_mask_shorter_than_the_keys_is_refused(name):
    """With a cache, attention_mask covers past + T tokens (transformers' convention). A mask of the chunk only
    failed deep in the op with a bare size mismatch, after the chunk's keys had entered the cache; it is refused
    first, naming attention_mask, and the cache is left as it was."""
    mixer = build(name)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    full = run(mixer, x)
    cache = mixer.init_state(2, x.dtype, x.device)
    first = run(mixer, x[:, :6], cache, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"attention_mask: covers 3 positions .* past \+ 3"):
        run(mixer, x[:, 6:], cache, attention_mask=torch.ones(2, 3))
    assert cache.get_seq_length() == 6
    rest = run(mixer, x[:, 6:], cache, attention_mask=torch.ones(2, 9))
    assert_close("after the refused call", torch.cat([first, rest], 1), full, TOL)


@pytest.mark.parametrize("scan_backend,want", [("ref", "ref"), ("auto", "auto")])
@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_causal_conv_follows_scan_backend(monkeypatch, name, scan_backend, want):
    """scan_backend "ref" keeps the causal conv on the reference as well, in the sequence forward and the decode
    step: the sequence conv (and Mamba-2's step conv) took the conv op's default "auto", the CUDA kernel on a GPU,
    whatever the layer asked for."""
    import zoo.mixers.mamba as mamba_module
    import zoo.mixers.mamba2 as mamba2_module

    module = mamba_module if name == "mamba" else mamba2_module
    seen = []

    def spy(real):
        def call(*args, backend="auto"):
            seen.append(backend)
            return real(*args, backend="ref")
        return call

    monkeypatch.setattr(module, "causal_conv1d", spy(module.causal_conv1d))
    monkeypatch.setattr(module, "causal_conv1d_update", spy(module.causal_conv1d_update))
    spec = {k: v for k, v in SPECS[name].items() if k != "type"}
    mixer = get_mixer(name)(D_MODEL, 0, **spec, scan_backend=scan_backend).eval()
    x = torch.randn(1, 4, D_MODEL)
    cache = mixer.init_state(1, x.dtype, x.device)
    with torch.no_grad():
        mixer(x[:, :3], cache=cache)
        mixer(x[:, 3:], cache=cache)
    assert seen[0] == want, "sequence conv"
    if want == "ref":
        assert seen == ["ref", "ref"], "decode step's conv"


def test_attention_without_rope_takes_an_odd_head_dim():
    """The even head_dim that RoPE needs was demanded of attention built with rope=False too (Jamba's attention has no
    position encoding): head_dim 5, or d_model 36 over 4 heads, were refused "for RoPE". With RoPE they still are."""
    from zoo import ZooConfig

    torch.manual_seed(0)
    mixer = get_mixer("attention")(D_MODEL, 0, n_heads=4, n_kv_heads=2, head_dim=5, rope=False).double().eval()
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    cache = mixer.init_state(2, x.dtype, x.device)
    steps = torch.cat([run(mixer, x[:, t:t + 1], cache) for t in range(7)], dim=1)
    assert_close("steps", steps, run(mixer, x), TOL)
    ZooConfig(d_model=36, layers="A", mixers={"A": {"type": "attention", "n_heads": 4, "rope": False}})
    with pytest.raises(ValueError, match="head_dim: must be a positive even integer"):
        get_mixer("attention")(D_MODEL, 0, n_heads=4, head_dim=5)
    with pytest.raises(ValueError, match="must be even for RoPE"):
        ZooConfig(d_model=36, layers="A", mixers={"A": {"type": "attention", "n_heads": 4}})
