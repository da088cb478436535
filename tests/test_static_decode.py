"""Static KV caches (zoo.cache.StaticKVLayer) and the decode step GraphDecoder captures, run eagerly on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import PositionwiseMixer, assert_close
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import zoo.layers
from zoo import ZooCache, ZooConfig
from zoo.cache import KVCacheFull, StaticKVLayer
from zoo.decode import DecodeState, EagerDecoder, GraphDecoder, StaticDecoder, graphable, prefill

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
# transformerpp-tiny and jamba-tiny have GQA (4 query heads, 2 kv heads); "window" is transformerpp-tiny with a
# 6-token sliding window, which the prompt outgrows
CASES = ("transformerpp", "jamba", "window")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and a busy second core slows them down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(case: str, device: str = "cpu"):
    torch.manual_seed(0)
    if case == "window":
        cfg = ZooConfig.from_yaml(CONFIGS / "transformerpp-tiny.yaml", mixers={
            "A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "rope_theta": 10000, "window": 6}})
    else:
        cfg = ZooConfig.from_yaml(CONFIGS / f"{case}-tiny.yaml")
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def record_logits(model) -> tuple[list[torch.Tensor], object]:
    logits: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: logits.append(out.detach().clone()))
    return logits, handle


@pytest.mark.parametrize("case", CASES)
def test_static_steps_equal_eager(case):
    model = tiny(case)
    prompt = torch.randint(0, 512, (3, 19))
    n = 9
    logits, handle = record_logits(model)
    ref = EagerDecoder(model, prefill(model, prompt, chunk_size=8)).decode(n)
    ref_logits = torch.cat(logits[-n:], dim=1)
    logits.clear()

    state = prefill(model, prompt, chunk_size=8)
    assert graphable(state.cache)
    decoder = StaticDecoder(model, state, max_new_tokens=n + 2)
    cache = state.cache
    static = cache.static_layers()
    assert static and all(isinstance(layer, StaticKVLayer) for layer in static)
    assert all(layer.capacity == 19 + n + 2 and layer.seen == 19 for layer in static)
    ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.length.data_ptr()) for layer in static]
    state_ptrs = [t.data_ptr() for t in decoder.states]
    got = decoder.decode(n)
    handle.remove()
    got_logits = torch.cat(logits[-n:], dim=1)

    assert torch.equal(got, ref), case
    err = (got_logits - ref_logits).abs().max().item()
    assert err <= 1e-5, f"{case}: max |logit difference| {err:.2e}"
    # never reallocated: the graph would keep reading the addresses it was captured with
    assert ptrs == [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.length.data_ptr()) for layer in static]
    assert state_ptrs == [t.data_ptr() for t in decoder.states]
    assert cache.seen_tokens == 19 + n and all(layer.seen == 19 + n for layer in static)
    assert all(int(layer.length) == 19 + n for layer in static)
    assert torch.equal(decoder.pos, torch.full_like(decoder.pos, 19 + n))
    assert cache.room() == 2


@pytest.mark.parametrize("max_len", [11, 40], ids=["slots", "ring"])
def test_static_layer_keeps_prompt_keys(max_len):
    """A windowed layer's prompt keys at their positions' slots, or (window 6 < max_len / 2) in a ring of 12 slots:
    position t at slots t % 6 and t % 6 + 6."""
    model = tiny("window")
    state = prefill(model, torch.randint(0, 512, (2, 10)))
    dynamic = state.cache.layers[0]
    keys = dynamic.keys.transpose(1, 2).clone()  # (B, 5 = window - 1, Hkv, D)
    state.cache.to_static(max_len)
    layer = state.cache.layers[0]
    assert layer.window == 6 and layer.keys.shape[1] == 16  # max_len 40 without the ring: 48 slots
    if max_len == 11:
        assert torch.equal(layer.keys[:, 5:10], keys)
    else:
        assert torch.equal(layer.keys[:, [5, 0, 1, 2, 3]], keys) and torch.equal(layer.keys[:, [11, 6, 7, 8, 9]], keys)
    assert int(layer.length) == 10 and layer.seen == 10


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_a_windowed_static_layer_is_a_ring_of_twice_the_window(padded):
    """A 6-token sliding-window layer made static for 19 + 40 tokens holds 16 slots (a ring of 2 x 6, rounded up),
    as transformers' static sliding layers cap theirs at the window; it held 64 (the capacity). Each row's greedy
    tokens equal those of the row alone decoded with the dynamic cache, and the step logits those of one forward
    over the whole row (the window mask), with left padding too (pads reaching into the window)."""
    model = tiny("window")
    n, width = 40, 19
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 512, (k,), generator=gen) for k in ((19, 3, 11) if padded else (19, 19, 19))]
    pads = torch.tensor([width - r.shape[0] for r in rows])
    ids = torch.stack([torch.cat([torch.zeros(int(p), dtype=torch.long), r]) for p, r in zip(pads, rows)])
    mask = (torch.arange(width)[None] >= pads[:, None]).long()
    logits, handle = record_logits(model)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        first = logits[-1][:, -1:].argmax(-1)
        cache.to_static(width + n, pads=pads if padded else None)
        assert [layer.keys.shape[1] for layer in cache.static_layers()] == [16, 16]
        logits.clear()
        got = StaticDecoder(model, DecodeState(cache, first, "past_key_values")).decode(n)
        got_logits = torch.cat(logits, dim=1)  # (B, n, V)
        handle.remove()
        for b, row in enumerate(rows):
            ref = EagerDecoder(model, prefill(model, row[None])).decode(n)
            assert torch.equal(got[b], ref[0]), b
            full = model(torch.cat([row, first[b], got[b, :-1]])[None]).logits[:, -n:]
            assert_close(f"row {b} step logits", got_logits[b:b + 1], full, 1e-5)


def left_padded_static(model, rows: list[torch.Tensor]) -> tuple[ZooCache, torch.Tensor]:
    """The rows left-padded to one length, prefilled with their mask and made static with their pads."""
    width = max(r.shape[0] for r in rows)
    pads = torch.tensor([width - r.shape[0] for r in rows])
    ids = torch.stack([torch.cat([torch.zeros(int(p), dtype=torch.long), r]) for p, r in zip(pads, rows)])
    mask = (torch.arange(width)[None] >= pads[:, None]).long()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    return cache.to_static(width + 4, pads=pads), pads


def test_a_step_on_left_padded_static_rows_counts_positions_from_each_first_token():
    """A step on a static cache of left-padded rows (to_static(pads=)) without position_ids: each row's position
    counts from its first token, as the decoders count it. The model gave every row past + t, its pads counted, so a
    padded row's RoPE position was off by its padding (logits off by about 1e-3, no error)."""
    model = tiny("transformerpp")
    rows = [torch.randint(1, 512, (n,)) for n in (7, 4)]
    nxt = torch.randint(1, 512, (2, 1))
    cache, _ = left_padded_static(model, rows)
    with torch.no_grad():
        out = model(nxt, past_key_values=cache).logits[:, -1]
        ref = torch.cat([model(torch.cat([r, n])[None]).logits[:, -1] for r, n in zip(rows, nxt)])
    assert_close("step logits", out, ref, 1e-5)


def test_reordering_left_padded_static_rows_moves_their_pads():
    """reorder_cache with rows of different padding: each static layer's hidden slots (start) and the cache's pads
    follow their rows, so a reordered row still hides its own pads and sees its own prompt."""
    model = tiny("transformerpp")
    rows = [torch.randint(1, 512, (n,)) for n in (7, 4)]
    nxt = torch.randint(1, 512, (2, 1))
    cache, pads = left_padded_static(model, rows)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.pads, pads[[1, 0]])
    with torch.no_grad():
        out = model(nxt, past_key_values=cache, position_ids=torch.tensor([[4], [7]])).logits[:, -1]
        ref = torch.cat([model(torch.cat([rows[r], nxt[i]])[None]).logits[:, -1] for i, r in enumerate((1, 0))])
    assert_close("step logits after the reorder", out, ref, 1e-5)


def test_to_static_below_length_raises():
    model = tiny("transformerpp")
    state = prefill(model, torch.randint(0, 512, (2, 12)))
    with pytest.raises(ValueError, match="below the 12 tokens"):
        state.cache.to_static(11)
    state.cache.to_static(12)  # exactly full is allowed
    assert state.cache.room() == 0
    with pytest.raises(ValueError, match="already static"):
        state.cache.to_static(20)


def test_capacity_exceeded_raises():
    model = tiny("jamba")
    prompt = torch.randint(0, 512, (2, 12))
    state = prefill(model, prompt)
    decoder = StaticDecoder(model, state, max_new_tokens=3)
    decoder.decode(3)
    with pytest.raises(KVCacheFull, match="cannot take 1 more"):
        decoder.step()
    # the model's own forward checks too (on the host, before writing)
    with pytest.raises(KVCacheFull):
        model(input_ids=decoder.ids, past_key_values=state.cache, use_cache=True)
    # decode(n) beyond the room fails before the first step
    state = prefill(model, prompt)
    decoder = StaticDecoder(model, state, max_new_tokens=3)
    with pytest.raises(KVCacheFull):
        decoder.decode(4)
    assert state.cache.seen_tokens == 12 and all(int(layer.length) == 12 for layer in state.cache.static_layers())


def test_a_reload_that_does_not_fit_raises_and_leaves_the_decoder_as_it_was():
    model = tiny("jamba")  # recurrent layers before its first attention layer
    decoder = StaticDecoder(model, prefill(model, torch.randint(0, 512, (2, 6))), max_new_tokens=4)
    states, ids = [t.clone() for t in decoder.states], decoder.ids.clone()
    longer = prefill(model, torch.randint(0, 512, (2, 12)))  # more tokens than the static layers hold
    with pytest.raises(ValueError, match="layer 2 holds 12 tokens"):
        decoder.reload(longer.cache, longer.next_ids)
    # the recurrent layers before the refused one were overwritten with the longer prompt's states
    assert all(torch.equal(a, b) for a, b in zip(decoder.states, states)) and torch.equal(decoder.ids, ids)
    assert decoder.state.cache.seen_tokens == 6
    torch.manual_seed(0)
    mamba = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).eval()
    other = tiny("mamba2")  # as many recurrent layers, other state shapes: copy_ raised a RuntimeError
    decoder = StaticDecoder(mamba, prefill(mamba, torch.randint(0, 512, (2, 6))))
    state = prefill(other, torch.randint(0, 512, (2, 6)))
    with pytest.raises(ValueError, match="another model's cache"):
        decoder.reload(state.cache, state.next_ids)


def test_static_cache_misuse_raises():
    model = tiny("transformerpp")
    state = prefill(model, torch.randint(0, 512, (2, 8)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticDecoder(model, state)  # growing KV layers and no room given
    state.cache.to_static(20)
    with pytest.raises(ValueError, match="one token per step"):
        model(input_ids=torch.randint(0, 512, (2, 3)), past_key_values=state.cache, use_cache=True)
    with pytest.raises(ValueError, match="prefill"):
        ZooCache.for_model(model).to_static(8)  # nothing cached yet: shapes unknown
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, prefill(model, torch.randint(0, 512, (2, 8))), max_new_tokens=4)


def test_graphable():
    for case in ("transformerpp", "jamba", "mamba"):
        model = tiny(case) if case != "mamba" else AutoModelForCausalLM.from_config(
            ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).eval()
        state = prefill(model, torch.randint(0, 512, (1, 5)))
        assert graphable(state.cache), case
        assert not graphable(ZooCache.for_model(model)), case  # empty: nothing to make static
    assert not graphable(None)


def test_graph_decoder_refuses_a_cache_with_the_window_mitigations_carry():
    # the carry (zoo.state.mitigation's last r - 1 inputs per row) is rebound on the cache layer at every step: a CUDA
    # graph would replay the captured tensors (stale inputs, no error); refused before the device check, so on CPU too
    from zoo.state import apply_mitigation

    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).eval()
    apply_mitigation(model, "window:r=4")
    with pytest.raises(ValueError, match="window mitigation.*StaticDecoder or EagerDecoder"):
        GraphDecoder(model, prefill(model, torch.randint(0, 512, (1, 5))), max_new_tokens=4)


@pytest.mark.parametrize("case", ["transformerpp", "jamba", "mamba"])
def test_a_position_wise_custom_mixer_decodes_with_static_buffers(case):
    """A custom mixer whose init_state returns None (position-wise: the README's contract) leaves its cache layer
    None; graphable() took that for an unprefilled cache, so StaticDecoder and GraphDecoder refused the model with
    'not a prefilled zoo cache'."""
    model = tiny(case) if case != "mamba" else AutoModelForCausalLM.from_config(
        ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).eval()
    model.model.layers[1].mixer = PositionwiseMixer(model.config.d_model)
    prompt = torch.randint(1, 512, (2, 6))
    ref = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, 6:]
    state = prefill(model, prompt)
    assert graphable(state.cache)
    tokens = torch.cat([state.next_ids, StaticDecoder(model, state, max_new_tokens=4).decode(4)], 1)
    assert torch.equal(tokens, ref)


def test_default_caches_stay_dynamic():
    from transformers.cache_utils import DynamicLayer

    model = tiny("jamba")
    state = prefill(model, torch.randint(0, 512, (1, 5)))
    EagerDecoder(model, state).decode(2)
    assert not state.cache.static_layers()
    assert any(isinstance(layer, DynamicLayer) for layer in state.cache.layers)


def test_moe_dense_dispatch_equals_sparse(monkeypatch):
    """Inside a CUDA-graph capture the MoE runs every expert densely (no nonzero): same output."""
    model = tiny("jamba")
    moe = next(b.ffn for b in model.model.layers if isinstance(b.ffn, zoo.layers.MoE))
    x = torch.randn(5, 1, 64)
    sparse, aux = moe(x)
    monkeypatch.setattr(zoo.layers, "_graph_capturing", lambda t: True)
    dense, aux_dense = moe(x)
    assert (dense - sparse).abs().max().item() <= 1e-6
    assert torch.equal(aux, aux_dense)


class OpRecorder(TorchDispatchMode):
    """Every aten op of a region with its tensor shapes/dtypes and its non-tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.syncs: list[str] = []
        self.in_one_hot = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        self.calls.append((str(func), tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a)
                                            for a in leaves)))
        name = str(func)
        # one_hot reads min/max on the host on CPU only (on CUDA it relies on device asserts)
        if any(k in name for k in ("_local_scalar_dense", "nonzero", "is_nonzero")) and not self.in_one_hot:
            self.syncs.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_step_is_graph_safe(case, monkeypatch):
    """Two consecutive steps run the same ops with the same shapes and the same non-tensor arguments (no host
    value that changes between steps is baked into the step) and read nothing back on the host."""
    monkeypatch.setattr(zoo.layers, "_graph_capturing", lambda t: True)  # the MoE path a capture takes
    model = tiny(case)
    decoder = StaticDecoder(model, prefill(model, torch.randint(0, 512, (2, 11))), max_new_tokens=4)
    recorder = OpRecorder()
    one_hot = torch.nn.functional.one_hot

    def flagged_one_hot(*args, **kwargs):
        recorder.in_one_hot = True
        try:
            return one_hot(*args, **kwargs)
        finally:
            recorder.in_one_hot = False

    monkeypatch.setattr(torch.nn.functional, "one_hot", flagged_one_hot)
    decoder._step_body()  # GraphDecoder's warm-up: first-step work (constants kept across steps) happens here
    runs = []
    for _ in range(2):
        recorder.calls = []
        with recorder:
            decoder._step_body()
        runs.append(recorder.calls)
    assert runs[0] == runs[1], case
    assert not recorder.syncs, f"{case}: host reads in the step: {sorted(set(recorder.syncs))}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
def test_graph_decoder_equals_eager_attention(case):
    model = tiny(case, "cuda")
    prompt = torch.randint(0, 512, (4, 40), device="cuda")
    eager = EagerDecoder(model, prefill(model, prompt)).decode(12)
    state = prefill(model, prompt)
    decoder = GraphDecoder(model, state, max_new_tokens=12)
    graph = torch.cat([decoder.decode(5), decoder.decode(7)], dim=1)  # replays continue across calls
    assert torch.equal(graph, eager), case
    assert state.cache.seen_tokens == 52 and all(int(layer.length) == 52 for layer in state.cache.static_layers())
    with pytest.raises(KVCacheFull):
        decoder.step()


@pytest.mark.parametrize("case", ["mamba", "mamba2", "gla", "jamba"])
def test_decode_state_dtype_model_keeps_low_precision_states(case):
    """decode_state_dtype "model": in a bf16 model, the recurrent states of Mamba, Mamba-2 and GLA stay bf16 while
    decoding (eager and static alike, and the two decode the same tokens); the tokens match the fp32-state
    decode's for the first steps, and so do the logits, closely."""
    torch.manual_seed(0)
    cfg = ZooConfig.from_yaml(CONFIGS / f"{case}-tiny.yaml")
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 512, (2, 13))
    n = 6
    logits, handle = record_logits(model)
    with torch.no_grad():
        ref_state = prefill(model, prompt)
        logits.clear()
        ref = EagerDecoder(model, ref_state).decode(n)
        ref_logits = torch.cat(logits, dim=1).float()
        model.config.decode_state_dtype = "model"
        state = prefill(model, prompt)
        logits.clear()
        got = EagerDecoder(model, state).decode(n)
        got_logits = torch.cat(logits, dim=1).float()
        static_state = prefill(model, prompt)
        static = StaticDecoder(model, static_state, max_new_tokens=n).decode(n)
    handle.remove()

    mixers = [block.mixer for block in model.model.layers]
    for cache in (state.cache, static_state.cache):
        for mixer, layer in zip(mixers, cache.layers):
            if isinstance(layer, zoo.cache.RecurrentLayer):
                want = torch.bfloat16 if getattr(mixer, "low_precision_state", False) else torch.float32
                assert layer.recurrent_state.dtype == want and layer.state_dtype == want, type(mixer).__name__
                assert layer.conv_state is None or layer.conv_state.dtype == torch.float32
    assert torch.equal(static, got)
    same = int((got == ref).all(0).long().cumprod(0).sum())  # steps whose tokens (so far) agree
    assert same >= 2 and got_logits.shape == ref_logits.shape == (2, n, 512)
    err = (got_logits[:, :same] - ref_logits[:, :same]).abs().max() / ref_logits.abs().max()
    assert err < 0.05, f"{case}: logits with bf16 states off by {err:.3f} of their range"


def test_decode_state_dtype_is_checked():
    with pytest.raises(ValueError, match="decode_state_dtype"):
        ZooConfig(decode_state_dtype="bf16")


def test_decode_steps_run_inside_decoding():
    """zoo.decode's steps (eager and static) run the model inside `zoo.layers.decoding()`, the only place projections
    may take the PDL kernel; a prefill does not."""
    import zoo.layers as layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).eval()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda *a: seen.append(layers._DECODING))
    prompt = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        state, static_state = prefill(model, prompt), prefill(model, prompt)
        assert seen and not any(seen)
        seen.clear()
        EagerDecoder(model, state).decode(2)
        StaticDecoder(model, static_state, max_new_tokens=2).decode(2)
    handle.remove()
    assert len(seen) >= 4 and all(seen) and layers._DECODING == 0


@pytest.mark.parametrize("case", ["mamba", "mamba2", "jamba"])
def test_a_prefilled_recurrent_state_does_not_grow_with_the_prompt(case):
    """The conv state a prefill leaves was a strided view of the conv's whole padded input: the cache held
    [B, channels, T + d_conv - 1] per recurrent layer until the first decode step (28x the state after 512 tokens on
    mamba-tiny), and cache_nbytes counted it."""
    from zoo.decode import cache_nbytes

    model = tiny(case)
    short, long = (prefill(model, torch.randint(0, 512, (2, t))).cache for t in (8, 256))
    for cache in (short, long):
        held = sum(t.numel() * t.element_size() for t in cache.state_tensors())
        assert cache_nbytes(cache) < held + 1024, (cache_nbytes(cache), held)
    if case != "jamba":  # no KV layer: the same size after any prompt
        assert cache_nbytes(long) == cache_nbytes(short)


def test_decode_steps_compute_no_aux_loss(monkeypatch):
    """zoo.decode's steps read the logits and the cache, never the MoE load-balancing loss: a StaticDecoder step
    (what a CUDA graph captures and replays) computed it on every token; a plain forward still returns it."""
    import zoo.modeling

    calls = []
    real = zoo.modeling.load_balancing_loss
    monkeypatch.setattr(zoo.modeling, "load_balancing_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny("jamba")
    decoder = StaticDecoder(model, prefill(model, torch.randint(0, 512, (2, 9))), max_new_tokens=4)
    calls.clear()
    decoder.decode(3)
    EagerDecoder(model, prefill(model, torch.randint(0, 512, (2, 9)))).decode(2)
    assert calls == [1]  # the eager decoder's prefill (a plain forward) only
    assert model(torch.randint(0, 512, (2, 5))).aux_loss is not None
