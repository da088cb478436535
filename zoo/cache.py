"""One hybrid cache built on transformers' cache API.

Attention layers hold keys/values in a `DynamicLayer` (or `DynamicSlidingWindowLayer` with a window);
mamba / mamba2 / gla layers hold a conv state and a recurrent state in a `RecurrentLayer`, a
`LinearAttentionLayer` whose states are *assigned* rather than copied in place, so that a cache carried
between training chunks stays connected to the autograd graph (truncated BPTT).

For CUDA-graph decoding (zoo.decode.GraphDecoder) a prefilled cache is made static with `ZooCache.to_static`:
each attention layer becomes a `StaticKVLayer` (preallocated key/value buffers at fixed addresses and a
device-side length that the decode step advances; a ring of twice the window for a sliding-window layer),
recurrent layers stay as they are.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
)


def _grad_leaf(t: torch.Tensor | None) -> bool:
    """Whether t is a leaf that requires grad, or a view of one: tensors autograd refuses to update in place.
    requires_grad first: every decoding step asks it of every layer's states (reading `_base` first cost ~2 us a
    layer and step in eager decoding)."""
    if t is None or not t.requires_grad:
        return False
    base = t if t._base is None else t._base
    return base.is_leaf and base.requires_grad


class RecurrentLayer(LinearAttentionLayer):
    """Conv state [batch, channels, d_conv - 1] (fp32) and recurrent state of one recurrent mixer. A prefill leaves
    the recurrent state in fp32; decoding steps keep it in `state_dtype` (fp32 unless the cache was made for a
    model with decode_state_dtype "model" and a mixer whose step takes it: ZooCache.for_model)."""

    is_compileable = False
    is_croppable = False  # the mixers keep no per-token history to roll back to (ZooCache.crop)

    def __init__(self, state_dtype: torch.dtype = torch.float32):
        super().__init__(number_of_states=1)
        self.state_dtype = state_dtype
        self.last_seq_idx: torch.Tensor | None = None  # [B]: seq_idx of the last token run with seq_idx

    @property
    def conv_state(self) -> torch.Tensor | None:
        return self.conv_states[0]

    @property
    def recurrent_state(self) -> torch.Tensor | None:
        return self.recurrent_states[0]

    @property
    def has_state(self) -> bool:
        return self.recurrent_states[0] is not None

    def set(self, conv_state: torch.Tensor | None = None, recurrent_state: torch.Tensor | None = None) -> None:
        if conv_state is not None:
            if not conv_state.is_contiguous() or conv_state._base is not None:
                # a prefill's conv state is a strided view of the conv's whole (padded) input: kept as it is, the
                # cache would hold [B, channels, T + d_conv - 1] per layer, growing with the prompt like a KV cache,
                # and a step's in-place update would bump the version of that input, which the backward saved. At
                # d_conv 1 the view is empty, hence contiguous (and .contiguous() returns it): it is copied too
                conv_state = conv_state.clone(memory_format=torch.contiguous_format)
            self.conv_states[0] = conv_state
            self.is_conv_states_initialized[0] = True
            self.conv_kernel_size[0] = conv_state.shape[-1]
            self.device, self.dtype = conv_state.device, conv_state.dtype
        if recurrent_state is not None:
            self.recurrent_states[0] = recurrent_state
            self.is_recurrent_states_initialized[0] = True
            self.device = recurrent_state.device
        self.has_previous_state[0] = True

    def initial_states(self, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv_state, recurrent_state) that a sequence chunk starts from ((None, None) before the first). With
        seq_idx [B, T], a row whose first token belongs to another document than the last token of the chunk before
        it (recorded by the call that ran that chunk with seq_idx) starts from zeros: a packed document never
        inherits its predecessor's state where a chunk boundary falls on a document boundary. Records this chunk's
        last seq_idx."""
        conv, rec = (self.conv_states[0], self.recurrent_states[0]) if self.has_state else (None, None)
        if seq_idx is None or seq_idx.shape[1] == 0:  # (an empty chunk records nothing)
            return conv, rec
        last, self.last_seq_idx = self.last_seq_idx, seq_idx[:, -1].clone()
        if rec is not None and last is not None:
            same = seq_idx[:, 0] == last.to(seq_idx.device)  # (B,)
            rec = rec * same.view(-1, *[1] * (rec.dim() - 1)).to(rec.dtype)
            if conv is not None:
                conv = conv * same.view(-1, *[1] * (conv.dim() - 1)).to(conv.dtype)
        return conv, rec

    def step_states(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv_state, recurrent_state) for a one-token step that updates them in place and `set`s them back: the
        layer's own tensors, made contiguous in fp32 (conv) and `state_dtype` (recurrent) once (a prefill may leave
        a strided fp32 view) and kept, so a CUDA graph replaying the step finds them at the same address. A leaf that
        requires grad (load_state_tensors' leaves: exact truncated BPTT's chunk states, a learned initial state), or a
        view of one, is copied first: autograd refuses an in-place update of it."""
        out = [t.to(dtype).contiguous() if t is not None and (t.dtype != dtype or not t.is_contiguous()) else t
               for t, dtype in ((self.conv_states[0], torch.float32), (self.recurrent_states[0], self.state_dtype))]
        conv, state = out
        return conv.clone() if _grad_leaf(conv) else conv, state.clone() if _grad_leaf(state) else state

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.conv_states[0], self.recurrent_states[0]) if t is not None]

    def load_tensors(self, tensors: list[torch.Tensor]) -> None:
        it = iter(tensors)
        conv = next(it) if self.conv_states[0] is not None else None
        rec = next(it) if self.recurrent_states[0] is not None else None
        self.set(conv, rec)

    def detach_(self) -> None:
        self.load_tensors([t.detach() for t in self.tensors()])

    def _rows_of_extras(self, rows) -> None:
        """Apply a batch reordering `rows` (tensor -> tensor) to the per-row tensors kept beside the states: the
        last seq_idx, and the window mitigation's carried inputs (`window_carry`, zoo.state.mitigation: (r, tuple
        of [B, <= r - 1, ...])). Left behind, beams read another beam's carry and a repeated cache met inputs of
        other rows (a size mismatch)."""
        if self.last_seq_idx is not None:
            self.last_seq_idx = rows(self.last_seq_idx)
        carry = getattr(self, "window_carry", None)
        if carry is not None:
            self.window_carry = (carry[0], tuple(rows(t) for t in carry[1]))

    # transformers' layers define these on DynamicLayer only (LinearAttentionLayer lacks them): ZooCache's
    # batch_repeat_interleave / batch_select_indices, and generate continuing a cache with beams, need them here
    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.tensors():
            self.load_tensors([t.repeat_interleave(repeats, dim=0) for t in self.tensors()])
        self._rows_of_extras(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.tensors():
            self.load_tensors([t[indices, ...] for t in self.tensors()])
        self._rows_of_extras(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows_of_extras(lambda t: t[beam_idx.to(t.device)])

    def reset(self) -> None:
        """Drop the states, as DynamicLayer.reset drops its keys: the layer is as new, for a sequence of any batch
        size. (transformers' reset zeroed them in place and kept them, so a reset cache still held the old batch
        size and refused another, and the window mitigation's carry fed the old sequence's inputs to the new one.)"""
        for i in range(self.number_of_states):
            self.conv_states[i] = self.recurrent_states[i] = None
            self.is_conv_states_initialized[i] = self.is_recurrent_states_initialized[i] = False
        super().reset()
        self.last_seq_idx = None
        self.window_carry = None


def _rows_of_kv_seq_idx(layer, rows) -> None:
    """Apply a batch reordering `rows` to an attention layer's kv_seq_idx [B, keys], where it has one."""
    ids = getattr(layer, "kv_seq_idx", None)
    if ids is not None:
        layer.kv_seq_idx = rows(ids)


class KVCacheFull(RuntimeError):
    """A static KV layer has no slot left for the next token (raised on the host, before any write)."""


class StaticKVLayer(CacheLayerMixin):
    """Keys and values of one attention layer in buffers that never move, for decoding in a CUDA graph.

    keys, values: [B, slots, Hkv, D] (the layout of the attention op, no transposes); slot t < capacity holds
    the token at position t, the last slot holds the token of the current step. The op puts the query at the
    last key position and treats a query whose own slot is padding as padding (zero output), so the current
    token's key/value goes to its slot `length` (for the later steps) and to the last slot, and the step
    attends to slots `< length` plus the last one (`append`). slots is capacity + 1 rounded up to a multiple of
    16 (the memory-efficient SDPA kernel's mask alignment); the extra slots are never visible.
    With a window w below half the capacity the layer is a ring (`ring` = w) of 2w slots, as transformers'
    static sliding layers cap theirs at the window: position t goes to slots t % w and t % w + w, so a step's
    last w tokens lie in consecutive slots (those before the current token's second copy, `slot_of`), which the
    mask and the decode kernel's [length - w, length) read; the cache then no longer grows with max_len.

    length: int64 [1] on the device, the tokens stored; written only by device ops, so a captured step reads
    the current value on every replay. seen: the same count on the host, for capacity checks outside a graph
    (a graph replay does not run Python: the decoder advances it, as it does ZooCache.seen_tokens).
    start: None, or int64 [B] on the device for left-padded rows: row b's first start[b] slots hold its prompt's
    pads, which no step sees (`from_dynamic(..., pads=)`).
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, batch_size: int, capacity: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device, window: int | None = None):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"StaticKVLayer: capacity must be >= 1 token, got {capacity}")
        self.capacity, self.window = capacity, window
        self.ring = window if window is not None and 2 * window < capacity else None
        slots = -(-((capacity if self.ring is None else 2 * self.ring) + 1) // 16) * 16
        self.keys = torch.zeros(batch_size, slots, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = torch.zeros(1, dtype=torch.long, device=device)
        self.seen = 0
        self.start: torch.Tensor | None = None
        self._slot = torch.arange(slots, device=device)
        self._current = self._slot == slots - 1
        self._copies = torch.tensor([0] if self.ring is None else [0, self.ring], device=device)
        self.dtype, self.device, self.is_initialized = dtype, self.keys.device, True

    @classmethod
    def from_dynamic(cls, layer: DynamicLayer, capacity: int, seen: int, pads: torch.Tensor | None = None
                     ) -> StaticKVLayer:
        """A static copy of a prefilled dynamic layer ([B, Hkv, S, D] keys of the last S of `seen` tokens). pads:
        int64 [B], the left padding of each row's prompt (its first pads[b] slots are never visible)."""
        if not layer.is_initialized or layer.keys is None:
            raise ValueError("to_static: an attention layer holds no keys yet; prefill the prompt first")
        if capacity < seen:
            raise ValueError(f"to_static: capacity {capacity} is below the {seen} tokens the cache already holds")
        window = getattr(layer, "sliding_window", None) if isinstance(layer, DynamicSlidingWindowLayer) else None
        batch, heads, kept, dim = layer.keys.shape
        if kept > seen or (window is None and kept != seen):
            raise ValueError(f"to_static: the layer holds {kept} keys but the cache has seen {seen} tokens")
        out = cls(batch, capacity, heads, dim, dtype=layer.keys.dtype, device=layer.keys.device, window=window)
        out.load(layer.keys, layer.values, seen)
        if pads is not None:
            out.start = pads.to(device=out.device, dtype=torch.long).clone()
        return out

    def slot_of(self, position: torch.Tensor) -> torch.Tensor:
        """The slot holding the token at `position` (a device tensor) for the step at that position: the position
        itself, or in a ring its second copy, below which lie the copies of the window's earlier tokens."""
        return position if self.ring is None else position % self.ring + self.ring

    def load(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Hold the keys/values [B, Hkv, kept, D] of the last kept of `seen` tokens (a prefilled dynamic layer's);
        a ring takes only the last `window` of them (no step sees older ones)."""
        kept = keys.shape[2]
        if self.ring is not None:
            kept = min(kept, self.ring)
            keys, values = keys[:, :, keys.shape[2] - kept:], values[:, :, values.shape[2] - kept:]
        positions = torch.arange(seen - kept, seen, device=self.device)
        slots = (self.slot_of(positions)[None] - self._copies[:, None]).flatten()  # (copies * kept,)
        for buf, new in ((self.keys, keys), (self.values, values)):
            new = new.transpose(1, 2).to(buf.dtype)
            buf.index_copy_(1, slots, new.repeat(1, len(self._copies), 1, 1))
        self.length.fill_(seen)
        self.seen = seen

    def kernel_view(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(length, start) for zoo_kernels.attention.decode after `write`: the slots to read are [length - window,
        length) without those below start[b]. A ring's length is the current token's slot + 1 and its start hides
        the slots of positions before row b's first token (or before 0). Device ops only."""
        if self.ring is None:
            return self.length, self.start
        length = self.slot_of(self.length - 1) + 1
        first = self.start if self.start is not None else torch.zeros_like(self.length)
        return length, (first - (self.length - length)).expand(self.keys.shape[0]).contiguous()

    def check_room(self, n_tokens: int = 1) -> None:
        """Raise KVCacheFull unless n_tokens more tokens fit (host-side: reads `seen`, no device sync)."""
        if self.seen + n_tokens > self.capacity:
            raise KVCacheFull(f"static KV cache full: it holds {self.seen} of {self.capacity} tokens and cannot take "
                              f"{n_tokens} more; make it static with a larger capacity (ZooCache.to_static(max_len), "
                              f"GraphDecoder(..., max_new_tokens=...))")

    def append(self, key: torch.Tensor, value: torch.Tensor, window: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store one step's key/value [B, 1, Hkv, D] at its slot (`write`) and the last slot, advance `length`.

        Returns the whole buffers [B, slots, Hkv, D] and the key padding mask [B, slots] (True = visible): the
        stored tokens (with a window w only the last w - 1 of them) and the last slot, the current token. Only
        device ops: no host read of `length`, so the same calls serve every replay of a captured step.
        """
        if key.shape[1] != 1:
            raise ValueError(f"StaticKVLayer takes one token per step (decode), got {key.shape[1]}; prefill with "
                             f"the default dynamic cache, then convert it (ZooCache.to_static)")
        if self.ring is not None and window != self.ring:
            raise ValueError(f"StaticKVLayer: this ring holds a window of {self.ring} tokens, asked for {window}")
        self.check_room(1)
        current = self.slot_of(self.length)  # computed before `write` advances the length (stream order)
        offset = self.length - current  # the position of slot s is s + offset
        visible = self._slot < current
        if window is not None:
            visible = visible & (self._slot > current - window)
        if self.start is not None:
            visible = visible & (self._slot >= (self.start - offset)[:, None])  # [B, slots]
        elif self.ring is not None:
            visible = visible & (self._slot >= -offset)  # no slot of a position below 0 (not yet written)
        visible = (visible | self._current).expand(key.shape[0], -1)
        for buf, new in ((self.keys, key), (self.values, value)):
            buf[:, -1:].copy_(new.to(buf.dtype))
        self.write(key, value)
        return self.keys, self.values, visible

    def write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one step's key/value [B, 1, Hkv, D] at slot `length` (a ring: its two slots) and advance `length`
        (device ops only): the decode-attention kernel (zoo_kernels.attention.decode) then reads the slots of
        `kernel_view` itself, so neither the last-slot copy nor the mask of `append` is needed."""
        if key.shape[1] != 1:
            raise ValueError(f"StaticKVLayer takes one token per step (decode), got {key.shape[1]}")
        self.check_room(1)
        slots = self.slot_of(self.length) - self._copies  # (copies,)
        for buf, new in ((self.keys, key), (self.values, value)):
            buf.index_copy_(1, slots, new.to(buf.dtype).expand(-1, len(slots), -1, -1))
        self.length.add_(1)
        self.seen += 1

    # ---- transformers' layer interface --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("StaticKVLayer is built from a prefilled layer (StaticKVLayer.from_dynamic)")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("StaticKVLayer is written by the attention mixer's decode step "
                                  "(StaticKVLayer.append), not through Cache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[1], 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.length.zero_()
        self.seen = 0
        if self.start is not None:
            self.start.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to(self.device)
        self.keys.copy_(self.keys.index_select(0, beam_idx))  # in place: the addresses stay
        self.values.copy_(self.values.index_select(0, beam_idx))
        if self.start is not None:
            self.start.copy_(self.start.index_select(0, beam_idx))

    # generate continuing a static cache with beams or several sequences per prompt changes the batch: new buffers
    # (a CUDA graph captured on the old ones must be captured again; GraphDecoder makes its own cache)
    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        if self.start is not None:
            self.start = self.start.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = self.keys[indices.to(self.device), ...]
        self.values = self.values[indices.to(self.device), ...]
        if self.start is not None:
            self.start = self.start[indices.to(self.device)]


def wrapped_mixer(mixer) -> str | None:
    """How PEFT wrapped a mixer whole, or None: LoRA's target_parameters on a parameter the mixer itself holds
    (Mamba's A_log) puts the mixer inside a ParamWrapper, which has none of the mixer's decoding methods
    (init_state), so the model keeps no cache."""
    if not hasattr(mixer, "get_base_layer") or not hasattr(mixer.get_base_layer(), "init_state"):
        return None
    names, layer = [], mixer
    while hasattr(layer, "get_base_layer") and hasattr(layer, "base_layer"):
        if getattr(layer, "parameter_name", None):
            names.append(layer.parameter_name)
        layer = layer.base_layer
    targets = f"LoRA's target_parameters on its {', '.join(names)}" if names else "a PEFT adapter on the mixer itself"
    return (f"{type(mixer.get_base_layer()).__name__} is wrapped whole by PEFT's {type(mixer).__name__} ({targets}), "
            f"which zoo's cache does not see through")


def require_init_state(base) -> None:
    """Raise, naming the mixer, when a layer of `base` (a ZooModel) has a mixer without `init_state`: a custom mixer
    may leave it out, and the model then keeps no cache; or PEFT wrapped the mixer whole (`wrapped_mixer`)."""
    for i, block in enumerate(base.layers):
        if (wrapped := wrapped_mixer(block.mixer)) is not None:
            raise ValueError(f"layer {i}'s mixer {wrapped}, so this model keeps no cache: run it with "
                             f"use_cache=False (generate does so by itself when use_cache is not given, rerunning the "
                             f"whole sequence for each new token), or merge the adapter (merge_and_unload) to decode "
                             f"with a cache")
        if not hasattr(block.mixer, "init_state"):
            name = type(block.mixer).__name__
            raise ValueError(f"layer {i}'s mixer {name} defines no init_state, so this model keeps no cache: run "
                             f"it with use_cache=False (generate does so by itself when use_cache is not given), "
                             f"or give {name} init_state(batch_size, dtype, device, max_len=None) returning its "
                             f"cache entry (a zoo.cache.RecurrentLayer for a recurrent state; None only for a "
                             f"mixer that mixes no information across tokens)")


def require_positionwise(mixer, layer: int, d_model: int) -> None:
    """Raise, naming the mixer, when a mixer whose `init_state` returns None (no cache entry: the contract's claim
    that its output at a position depends on that position's input alone) mixes across tokens. Decoding gives
    such a layer the new token alone, so a mixer that broke the claim (a token shift, a short conv) produced other
    tokens without an error. The probe: the mixer's output at the last of 4 positions, computed with and without
    the 3 before it (fixed inputs, eval mode, no RNG drawn). Skipped while a CUDA graph is being captured (it reads
    a result on the host); checked once per mixer."""
    if getattr(mixer, "_zoo_positionwise", False):
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    param = next(mixer.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    steps = torch.arange(4 * d_model, device=device, dtype=torch.float32).view(1, 4, d_model)
    x = torch.sin(steps * 0.7311 + 0.25).to(dtype)
    positions = torch.arange(4, device=device)[None]
    was_training = mixer.training
    mixer.eval()
    try:
        with torch.no_grad():
            kw = dict(cache=None, seq_idx=None, attention_mask=None)
            full = mixer(x, position_ids=positions, **kw)[:, -1].float()
            alone = mixer(x[:, -1:], position_ids=positions[:, -1:], **kw)[:, -1].float()
    finally:
        mixer.train(was_training)
    if not bool((full - alone).abs().max() <= 0.05 * full.abs().max() + 1e-6):
        name = type(mixer).__name__
        raise ValueError(f"layer {layer}'s mixer {name} returns no cache entry (init_state gives None), which says "
                         f"its output at a position depends on that position's input alone, but its output at the "
                         f"last of 4 positions changes when the 3 before it are left out: decoding with a cache "
                         f"gives the layer the new token alone and would produce other tokens. Give {name} an "
                         f"init_state returning a zoo.cache.RecurrentLayer that carries what it reads of earlier "
                         f"tokens (and use it in forward when cache is given), or define no init_state: generate "
                         f"then reruns the whole sequence each step")
    mixer._zoo_positionwise = True


class ZooCache(Cache):
    """Per-layer cache entries made by each mixer's `init_state`; counts the tokens it has seen."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)
        self.seen_tokens = 0
        self.pads: torch.Tensor | None = None  # left padding per row, given to to_static (static decoding)
        # beam search (ZooForCausalLM._beam_search): reorders held back to the next forward, so that the cache after
        # the last step still holds the rows the returned sequences came from (`defer_reorders`)
        self.deferred_reorders: int | None = None
        self.pending_rows: torch.Tensor | None = None
        self.rows_lost: str | None = None  # why this cache cannot be continued (a forward with it raises)

    @classmethod
    def for_model(cls, model, batch_size: int = 1, dtype=None, device=None, max_len: int | None = None) -> ZooCache:
        """An empty cache for `model` (a ZooModel or ZooForCausalLM). With the config's decode_state_dtype
        "model", the recurrent layers of mixers whose steps take low-precision states (`low_precision_state`:
        Mamba, Mamba-2, GLA) keep their states in `dtype` (the model's) while decoding."""
        base = getattr(model, "model", model)
        if not hasattr(base, "layers"):  # a wrapper: PEFT's PeftModel, whose .model is the adapted ZooForCausalLM
            from zoo.modeling import ZooModel

            base = next((m for m in model.modules() if isinstance(m, ZooModel)), None)
            if base is None:
                raise TypeError(f"ZooCache.for_model: {type(model).__name__} holds no zoo model; pass a "
                                f"ZooForCausalLM, a ZooModel, or a PEFT model of one")
        param = next(base.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        require_init_state(base)
        layers = [block.mixer.init_state(batch_size, dtype, device, max_len) for block in base.layers]
        if getattr(getattr(base, "config", None), "decode_state_dtype", "float32") == "model":
            for block, layer in zip(base.layers, layers):
                if isinstance(layer, RecurrentLayer) and getattr(block.mixer, "low_precision_state", False):
                    layer.state_dtype = dtype
        cache = cls(layers)
        cache.mixer_types = [type(block.mixer).__name__ for block in base.layers]  # checked by ZooModel.forward
        return cache

    def __getstate__(self) -> dict:
        """The cache's state for pickle / torch.save, without the weakref to the model it was last checked for
        (ZooModel.forward's check, which a copy runs again)."""
        state = dict(super().__getstate__())
        state.pop("_checked_for", None)
        return state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int | None:
        """The rows the cache holds states for (None while it holds none). A property, as transformers' Cache has
        it (5.25; its generate is to read it in cache-reuse checks): a method here gave them a bound method."""
        for layer in self.layers:
            if isinstance(layer, RecurrentLayer):
                tensors = layer.tensors()
                if tensors:
                    return tensors[0].shape[0]
            elif getattr(layer, "keys", None) is not None:
                return layer.keys.shape[0]
        return None

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    # a stateless mixer's `init_state` may return None: its layer holds nothing, so these skip it. An attention
    # layer's `kv_seq_idx` (the packed documents of its cached keys, zoo.mixers.attention) follows its rows
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if getattr(self, "deferred_reorders", None) is not None:
            pending = getattr(self, "pending_rows", None)
            self.pending_rows = beam_idx.clone() if pending is None else pending[beam_idx.to(pending.device)]
            self.deferred_reorders += 1
            return
        for layer in self.layers:
            if layer is not None:
                layer.reorder_cache(beam_idx)
                _rows_of_kv_seq_idx(layer, lambda ids: ids[beam_idx.to(ids.device)])
        if self.pads is not None:
            self.pads = self.pads[beam_idx.to(self.pads.device)]

    def defer_reorders(self, on: bool) -> None:
        """Hold `reorder_cache` back until `apply_pending_reorder` (which ZooModel.forward calls first), counting the
        reorders (`deferred_reorders`); off, it applies each at once again. Beam search reorders the cache after
        every step, its last one included: held back, the last reorder can be replaced by the rows that the returned
        sequences came from."""
        self.deferred_reorders = 0 if on else None

    def apply_pending_reorder(self) -> None:
        rows = getattr(self, "pending_rows", None)
        if rows is not None:
            self.pending_rows, deferred = None, self.deferred_reorders
            self.deferred_reorders = None
            try:
                self.reorder_cache(rows)
            finally:
                self.deferred_reorders = deferred

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.batch_repeat_interleave(repeats)
                _rows_of_kv_seq_idx(layer, lambda ids: ids.repeat_interleave(repeats, dim=0))
        if self.pads is not None:
            self.pads = self.pads.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.batch_select_indices(indices)
                _rows_of_kv_seq_idx(layer, lambda ids: ids[indices.to(ids.device)])
        if self.pads is not None:
            self.pads = self.pads[indices.to(self.pads.device)]

    def reset(self) -> None:
        for layer in self.layers:
            if layer is not None:
                if isinstance(layer, DynamicLayer):  # keys dropped, as newer transformers' reset drops them: 5.17's
                    layer.keys = layer.values = None  # zeroed them in place, keeping the old batch and length that
                    layer.is_initialized = False  # `update` then concatenated onto
                layer.reset()
                if getattr(layer, "kv_seq_idx", None) is not None:
                    layer.kv_seq_idx = None  # the dropped keys' document ids
        self.seen_tokens = 0
        self.pads = None
        self.pending_rows = self.rows_lost = None

    @property
    def is_croppable(self) -> bool:
        return all(layer is None or isinstance(layer, DynamicLayer) for layer in self.layers)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens from every attention layer's keys/values and from the count of tokens seen (so the
        next step's positions follow): `crop(-n)` removes n tokens; a value >= 0 is the length to keep, as in
        transformers' caches (`crop(0)` keeps none: it used to remove none). Raises ValueError on a cache with
        recurrent (Mamba, Mamba-2, GLA) or static layers: their states hold no per-token history to roll back to, so
        assisted or speculative decoding cannot use them."""
        remove = -tokens_to_remove if tokens_to_remove < 0 else max(self.seen_tokens - tokens_to_remove, 0)
        if remove == 0:
            return
        if remove > self.seen_tokens:
            raise ValueError(f"crop: cannot remove {remove} tokens from a cache that has seen {self.seen_tokens}")
        if not self.is_croppable:
            kinds = sorted({type(layer).__name__ for layer in self.layers
                            if layer is not None and not isinstance(layer, DynamicLayer)})
            raise ValueError(f"crop: this cache holds {', '.join(kinds)} layers, whose states cannot be rolled "
                             f"back token by token (assisted / speculative decoding needs that)")
        for layer in self.layers:
            if layer is not None:
                layer.crop(-remove)
                _rows_of_kv_seq_idx(layer, lambda ids: ids[:, :max(ids.shape[1] - remove, 0)])
        self.seen_tokens -= remove

    # ---- static decoding -----------------------------------------------------------------------------------
    def to_static(self, max_len: int, pads: torch.Tensor | None = None) -> ZooCache:
        """Make every attention layer a StaticKVLayer with room for max_len tokens in all (those already seen
        included), copying the cached keys/values in; recurrent layers are unchanged. In place; returns self.
        pads: int64 [B], the left padding of each row of a prompt prefilled with an attention_mask: those slots stay
        invisible, and `pads` is kept (the decoders count each row's positions from its first token).
        Raises ValueError when max_len is below the tokens seen or an attention layer is still empty."""
        if max_len < self.seen_tokens:
            raise ValueError(f"to_static: max_len {max_len} is below the {self.seen_tokens} tokens the cache holds")
        for i, layer in enumerate(self.layers):
            if isinstance(layer, StaticKVLayer):
                if layer.capacity < max_len:
                    raise ValueError(f"to_static: layer {i} is already static with capacity {layer.capacity} "
                                     f"< {max_len}")
            elif isinstance(layer, DynamicLayer):
                ids = getattr(layer, "kv_seq_idx", None)
                if ids is not None and bool((ids != ids[:, -1:]).any()):
                    # a static layer has no per-key document ids: the earlier documents' keys would stay visible
                    raise ValueError(f"to_static: layer {i} holds the keys of several packed documents (seq_idx); "
                                     f"a static cache decodes one document per row: prefill the last document "
                                     f"alone, or decode with the dynamic cache")
                self.layers[i] = StaticKVLayer.from_dynamic(layer, max_len, self.seen_tokens, pads)
        if pads is not None:
            self.pads = pads
        return self

    def static_layers(self) -> list[StaticKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, StaticKVLayer)]

    def room(self) -> int | None:
        """Tokens the static KV layers can still take (None: no static layer, no limit)."""
        layers = self.static_layers()
        return min(layer.capacity - layer.seen for layer in layers) if layers else None

    # ---- truncated BPTT, state passing -------------------------------------------------------------------
    def recurrent_only(self) -> bool:
        """True when every layer is a recurrent one (a fixed-size state, no keys/values)."""
        return bool(self.layers) and all(isinstance(layer, RecurrentLayer) for layer in self.layers)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache carries, in a fixed order (conv, recurrent, keys, values per layer)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, RecurrentLayer):
                out.extend(layer.tensors())
            elif isinstance(layer, CacheLayerMixin) and layer.is_initialized and layer.keys is not None:
                out.extend([layer.keys, layer.values])
        return out

    def load_state_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Replace the carried tensors (same order and shapes as `state_tensors`), e.g. by leaves requiring grad.
        Raises ValueError, changing nothing, when their number is not that of `state_tensors`."""
        tensors = list(tensors)
        expected = len(self.state_tensors())
        if len(tensors) != expected:  # checked first: too few would fail midway, some layers already replaced
            raise ValueError(f"load_state_tensors: expected {expected} tensors, got {len(tensors)}")
        i = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentLayer):
                n = len(layer.tensors())
                layer.load_tensors(tensors[i:i + n])
                i += n
            elif isinstance(layer, CacheLayerMixin) and layer.is_initialized and layer.keys is not None:
                layer.keys, layer.values = tensors[i], tensors[i + 1]
                i += 2

    def detach_(self) -> ZooCache:
        """Cut the autograd graph at the carried states (classic truncated BPTT)."""
        self.load_state_tensors([t.detach() for t in self.state_tensors()])
        return self


def output_cache(out, name: str = "past_key_values"):
    """The cache a model's output returns (None if none): its `cache` field where the output class has one
    (transformers renamed the field in 5.2x; reading the old name warns and goes in 5.40), else `name`
    (past_key_values, or cache_params for older transformers' Mamba). `name` 'cache' (zoo.decode.cache_argument's for
    ZooForCausalLM, whose forward takes either name) on an output class from before the rename reads its
    past_key_values: it read None there, and zoo's prefill, eval and passkey decodes lost the cache."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    if "cache" in fields:
        return out.cache
    if name == "cache" and "past_key_values" in fields:
        return out.past_key_values
    return getattr(out, name, None)


__all__ = ["KVCacheFull", "RecurrentLayer", "StaticKVLayer", "ZooCache", "output_cache",
           "require_init_state", "require_positionwise"]
