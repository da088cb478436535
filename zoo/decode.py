"""Greedy decoding loops without host synchronization, eager or with one step captured in a CUDA graph.

A decode step of a 130M model is a few hundred small kernel launches: at small batch the GPU waits on the
CPU that launches them. Capturing the step in a CUDA graph replays all of them in one launch. That needs
every tensor the step reads and writes at a fixed address and no host value that changes between steps:

- recurrent layers (Mamba, Mamba-2, GLA) keep constant-size conv and SSM / GLA states, copied into static
  buffers after every step;
- attention layers keep a growing KV cache, so `GraphDecoder` first makes the prefilled cache static
  (`ZooCache.to_static`, room for `max_new_tokens` more tokens): preallocated key/value buffers written in
  place at a device-side length. With the auto backend on CUDA the step attends with a split-key Triton kernel
  that reads that length on the device (zoo_kernels.attention.decode); a forced SDPA backend reads the whole
  buffer under a key padding mask built on the device;
- recurrent mixers update their states in place with single-step kernels (conv update, selective-scan state
  update, SSD step, GLA step), so a replay continues from the last one without copies;
- positions come from a device tensor the step advances (position_ids), not from the cache's host counter;
  host counters (seen tokens) are advanced outside the graph and only serve capacity checks, made before each
  replay (`KVCacheFull` instead of a write out of bounds).

So every zoo model, attention and hybrids included, decodes in a graph on CUDA:

    state = prefill(model, prompt)                      # cache + first greedy token, [B, 1]
    if graphable(state.cache):
        decoder = GraphDecoder(model, state, max_new_tokens=128)
    else:
        decoder = EagerDecoder(model, state)
    tokens = decoder.decode(128)                        # [B, 128] greedy tokens, one sync at the end

`StaticDecoder` runs the very step the graph captures, eagerly (any device: tests on CPU). `EagerDecoder`
works on any Hugging Face causal LM (zoo models, transformers' Llama and Mamba): the cache travels through
``past_key_values`` or, for models whose forward names it so, ``cache_params``.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from zoo_kernels._env import env_flag, read_at_import

from zoo.cache import KVCacheFull, RecurrentLayer, StaticKVLayer, ZooCache, output_cache
from zoo.layers import decoding, optional_kernel

# ZOO_DECODE_ARGMAX=0 keeps torch.argmax for the greedy token on CUDA (benchmarks compare the two)
with read_at_import():
    ARGMAX_KERNEL = env_flag("ZOO_DECODE_ARGMAX", True)


def greedy(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy next tokens [B, 1] (int64) of logits [B, T, V] (the last position's), written into `out` [B, 1]
    when given (a graph's fixed token buffer). On CUDA zoo_kernels.argmax (two Triton kernels: torch.argmax's
    choice, the first index among ties, written in place), else torch.argmax."""
    last = logits[:, -1]
    kernel = optional_kernel("argmax", "argmax_rows") if ARGMAX_KERNEL and last.is_cuda else None
    if kernel is None:
        ids = last.argmax(-1, keepdim=True)
        return ids if out is None else out.copy_(ids)
    if out is None:
        return kernel(last).unsqueeze(1)
    kernel(last, out[:, 0])
    return out


class TokenPicker:
    """Each row's next token from a step's logits [B, T, V] (the last position's), written in place into a fixed
    [B, 1] buffer, with nothing read back on the host: a CUDA graph captures it with the step.

    Greedy (`greedy`), or sampled as transformers' generate samples: the logits in fp32, divided by temperature,
    then top-k, then top-p filtering (transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper), then one draw from the softmax of what is left. The draw is the Gumbel-max trick,
    argmax(scores - log(-log(U))) with U uniform from torch's default generator: the same distribution as
    transformers' torch.multinomial, not the same random stream (seeded runs differ from transformers' tokens).
    With eos_token_id a row that has produced one of them is finished: every later token of it is pad_token_id,
    as in transformers. `finished` [B, 1] is the picker's state (`buffers`: what a graph's warm-up must restore).
    """

    def __init__(self, batch: int, device: torch.device | str, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None):
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}; for greedy decoding pass "
                             f"do_sample=False")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (0: no top-k filtering), got {top_k!r}")
        if top_p is not None and not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if eos and pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id: the token a finished row gets after its eos")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, float(temperature), top_k, top_p
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad = pad_token_id
        self.finished = torch.zeros(batch, 1, dtype=torch.bool, device=device)

    def buffers(self) -> list[torch.Tensor]:
        return [self.finished]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The last position's fp32 scores [B, V] after temperature, top-k and top-p (removed tokens at -inf)."""
        scores = logits[:, -1].float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
            drop = ordered.softmax(-1).cumsum(-1) <= 1.0 - self.top_p
            drop[:, -1] = False  # the likeliest token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.do_sample:
            scores = self.scores(logits)
            u = torch.rand_like(scores)
            out.copy_((scores - torch.log(-torch.log(u))).argmax(-1, keepdim=True))  # u = 0 gives -inf: never
        else:
            greedy(logits, out=out)
        if self.eos is not None:
            out.copy_(torch.where(self.finished, self.pad, out))
            self.finished |= torch.isin(out, self.eos)
        return out


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _dict_output(model: nn.Module) -> dict:
    """``{"return_dict": True}`` where ``model.forward`` takes it (by name, or through ``**kwargs`` as transformers'
    models do), as transformers' generate passes it to every step: a config with return_dict=False (transformers'
    option, e.g. ``from_pretrained(..., return_dict=False)`` for an export) made the forward return a tuple, and these
    loops, which read ``out.logits`` and the output's cache, failed with "'tuple' object has no attribute 'logits'"
    where generate decodes."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    takes = "return_dict" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"return_dict": True} if takes else {}


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its cache, and the output attribute that returns it:
    'cache_params' (transformers' Mamba before 5.2x), 'cache' (transformers' models from 5.2x on, which
    renamed both; ZooForCausalLM, which takes either name) or 'past_key_values' (ZooModel, older transformers
    models)."""
    if _accepts(model, "cache_params"):
        return "cache_params"
    return "cache" if _accepts(model, "cache") else "past_key_values"


def continues_chunks_exactly(model: nn.Module) -> bool:
    """False for transformers' Mamba, FalconMamba and Jamba: their scan of a chunk of several tokens after a cache
    ignores the carried SSM state (2.2e-3 logit error on a tiny Mamba with transformers 5.24; Jamba's source says
    "does not take the past state, it is WRONG if the cache is not empty"; only single-token steps continue
    exactly), so per-position evaluation must run each document in one forward."""
    if cache_argument(model) == "cache_params":
        return False
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) not in ("mamba", "falcon_mamba", "jamba")


def warn_if_right_padded(mask: torch.Tensor | None) -> None:
    """Warn when a row's attention_mask [B, T] ends in padding (a tokenizer padding on the right): its first new
    token comes from the logits at a pad, and its new tokens follow the pads, unlike the row alone's. (transformers
    warns only where it knows a pad_token_id and finds it in the last column; a zoo config sets none.)"""
    if not torch.is_tensor(mask) or mask.dim() != 2 or not mask.shape[1]:
        return
    rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if rows:
        warnings.warn(f"generate: the attention_mask ends in padding (right padding) in row(s) {rows[:8]}"
                      f"{' ...' if len(rows) > 8 else ''}: a decoder-only model picks each row's next token at its "
                      f"last position, so those rows continue from a pad, with other tokens than unpadded; pad on the "
                      f"left (tokenizer.padding_side = 'left')", stacklevel=3)


@dataclass
class DecodeState:
    """A prefilled cache and the next input token of every row (ids [B, 1] on the model's device)."""

    cache: Any
    next_ids: torch.Tensor
    cache_argument: str


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, chunk_size: int | None = None) -> DecodeState:
    """Run the prompt [B, T] through the model (in chunks of chunk_size tokens with the cache carried, if
    given), keeping only the last position's logits; returns the cache and the greedy next token."""
    if chunk_size is not None and chunk_size < input_ids.shape[1] and not continues_chunks_exactly(model):
        raise ValueError(f"prefill: chunk_size={chunk_size} below the prompt's {input_ids.shape[1]} tokens, but "
                         f"{type(model).__name__} cannot continue a multi-token chunk from its cache exactly (the "
                         f"earlier chunks' state would be lost); prefill it in one chunk (chunk_size=None)")
    from zoo.eval.common import chunk_positions

    arg = cache_argument(model)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache, logits = None, None
    step = chunk_size or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        chunk = input_ids[:, start:start + step]
        # (chunk_positions: transformers' Bamba counts a chunk's positions from 0 unless given them)
        out = model(input_ids=chunk, use_cache=True, **{arg: cache}, **keep, **chunk_positions(model, chunk, start),
                    **_dict_output(model))
        cache, logits = output_cache(out, arg), out.logits[:, -1:]
    return DecodeState(cache, greedy(logits), arg)


def graphable(cache: Any) -> bool:
    """Whether a CUDA graph can replay decode steps of a cache: a prefilled zoo cache whose layers are recurrent
    (constant-size states), attention layers that are static or can be made so (`ZooCache.to_static`), or None (a
    position-wise custom mixer, whose init_state gives no entry: it holds nothing)."""
    def ok(layer) -> bool:
        if layer is None:
            return True
        if isinstance(layer, RecurrentLayer):
            return layer.has_state
        if isinstance(layer, StaticKVLayer):
            return True
        return isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None

    return isinstance(cache, ZooCache) and bool(cache.layers) and all(ok(layer) for layer in cache.layers)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by the tensors of a cache (zoo or transformers), each storage counted once."""
    seen: dict[int, int] = {}

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth)
        elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, nn.Module):
            for item in vars(value).values():
                visit(item, depth + 1)

    visit(cache)
    return sum(seen.values())


class EagerDecoder:
    """Greedy decoding step by step through the model's forward; the tokens stay on the device."""

    def __init__(self, model: nn.Module, state: DecodeState):
        self.model, self.state = model, state
        self._dict = _dict_output(model)  # once: reading the forward's signature takes tens of us, each step

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed the current token, return the next ones [B, 1] (no host synchronization)."""
        s = self.state
        with decoding():
            out = self.model(input_ids=s.next_ids, use_cache=True, **{s.cache_argument: s.cache}, **self._dict)
        s.cache = output_cache(out, s.cache_argument)
        s.next_ids = greedy(out.logits)
        return s.next_ids

    @torch.no_grad()
    def decode(self, n_tokens: int) -> torch.Tensor:
        """n_tokens greedy tokens [B, n_tokens]; the first is the one after the prefill's."""
        ids = self.state.next_ids
        out = torch.empty(ids.shape[0], n_tokens, dtype=ids.dtype, device=ids.device)
        for i in range(n_tokens):
            out[:, i:i + 1] = self.step()
        return out


class StaticDecoder(EagerDecoder):
    """Greedy decoding through the step `GraphDecoder` captures, run eagerly (any device; tests, debugging).

    The cache is made static if it is not (`ZooCache.to_static` with room for max_new_tokens more tokens;
    attention layers become `StaticKVLayer`s, in place). Every tensor the step reads or writes then has a fixed
    address: the recurrent states are copied into static buffers (`states`), the fed tokens live in `ids` and
    their positions in `pos` ([B, 1] on the device, advanced by the step itself and passed as position_ids, so
    no position comes from a host counter), and the KV layers are written in place at their device-side length.
    Host-side counters (ZooCache.seen_tokens, StaticKVLayer.seen) only serve capacity checks, made before a step.
    Raises ValueError when the cache is not `graphable`, or has KV layers to convert and no max_new_tokens.
    """

    def __init__(self, model: nn.Module, state: DecodeState, max_new_tokens: int | None = None,
                 pick: TokenPicker | None = None):
        super().__init__(model, state)
        self.pick = pick  # None: greedy
        cache = state.cache
        if not graphable(cache):
            raise ValueError("the cache cannot be decoded with static buffers (not a prefilled zoo cache); "
                             "decode with EagerDecoder")
        if any(isinstance(layer, DynamicLayer) for layer in cache.layers):
            if max_new_tokens is None:
                raise ValueError("the cache holds growing KV layers: pass max_new_tokens (the tokens to decode) "
                                 "so that they can be made static with that room")
            cache.to_static(cache.seen_tokens + max_new_tokens)
        elif max_new_tokens is not None and cache.static_layers():
            cache.to_static(cache.seen_tokens + max_new_tokens)  # checks that the existing capacity suffices
        self.recurrent = [layer for layer in cache.layers if isinstance(layer, RecurrentLayer)]
        self.static = cache.static_layers()
        # static buffers, contiguous: the decode kernels update contiguous states in place (a strided clone of a
        # prefill view would be re-laid out, i.e. copied, on every step)
        # (in the dtypes the steps keep: fp32 conv states, recurrent states in the layer's state_dtype)
        self.states = [t.clone(memory_format=torch.contiguous_format) for layer in self.recurrent
                       for t in layer.step_states() if t is not None]
        self._load_states()
        self.ids = state.next_ids.clone()
        self.pos = torch.full_like(self.ids, cache.seen_tokens)  # position of the token in `ids`
        if getattr(cache, "pads", None) is not None:  # left-padded rows count from their first token
            self.pos -= cache.pads.to(self.pos.device)[:, None]

    @torch.no_grad()
    def reload(self, cache: ZooCache, next_ids: torch.Tensor, pads: torch.Tensor | None = None) -> None:
        """Decode another prompt with this decoder's buffers (and so with a graph captured on them): copy the
        prefilled `cache` (a fresh one, of the same model and batch, not static) into them in place, the recurrent
        states, the keys and values with their lengths, and take `next_ids` [B, 1] as the next input. pads: each
        row's left padding, given exactly when this decoder was made with it. Raises ValueError when the cache does
        not fit: other layers or rows, more tokens than the static layers hold, padding given or not unlike before;
        then the decoder is left as it was.
        """
        own = self.state.cache
        if not isinstance(cache, ZooCache) or len(cache.layers) != len(own.layers) \
                or next_ids.shape != self.ids.shape:
            raise ValueError("reload: the prefilled cache is not of this decoder's model and batch")
        if (pads is None) != (getattr(own, "pads", None) is None):
            raise ValueError("reload: left padding given for one prompt and not the other; capture again")
        seen = cache.seen_tokens
        # every layer is checked before any buffer is written: a cache that does not fit leaves the decoder as it was
        states, copies, kv, carries = iter(self.states), [], [], []
        for i, (mine, new) in enumerate(zip(own.layers, cache.layers)):
            if isinstance(mine, RecurrentLayer) and isinstance(new, RecurrentLayer) and new.has_state:
                dsts = [next(states) for _ in mine.tensors()]
                srcs = [t for t in new.step_states() if t is not None]
                if [d.shape for d in dsts] != [t.shape for t in srcs]:
                    raise ValueError(f"reload: layer {i}'s states {[tuple(t.shape) for t in srcs]} do not fit this "
                                     f"decoder's {[tuple(d.shape) for d in dsts]} (another model's cache)")
                copies.extend(zip(dsts, srcs))
                # the window mitigation's carried inputs (zoo.state.mitigation), this prompt's: the steps read the
                # last call's, so a kept decoder continued the new prompt with the old one's last r - 1 tokens
                carries.append((mine, getattr(new, "window_carry", None)))
            elif isinstance(mine, StaticKVLayer) and isinstance(new, DynamicLayer) and new.keys is not None:
                kept = new.keys.shape[-2]
                if seen > mine.capacity or kept > seen or new.keys.shape[0] != mine.keys.shape[0]:
                    raise ValueError(f"reload: layer {i} holds {seen} tokens; the static layer takes "
                                     f"{mine.capacity} of {mine.keys.shape[0]} rows")
                if new.keys.shape[1:2] + new.keys.shape[3:] != mine.keys.shape[2:]:
                    raise ValueError(f"reload: layer {i}'s keys {tuple(new.keys.shape)} do not fit this decoder's "
                                     f"static layer (another model's cache)")
                kv.append((mine, new))
            elif not (mine is None and new is None):
                raise ValueError(f"reload: layer {i} of the prefilled cache does not match this decoder's")
        for dst, src in copies:
            dst.copy_(src)
        for mine, carry in carries:
            mine.window_carry = carry
        for mine, new in kv:
            mine.load(new.keys, new.values, seen)
            if pads is not None:
                mine.start.copy_(pads)
        own.seen_tokens = seen
        if pads is not None:
            own.pads = pads
        self.ids.copy_(next_ids)
        self.pos.fill_(seen)
        if pads is not None:
            self.pos -= pads.to(self.pos.device)[:, None]
        self.state.next_ids = self.ids
        self._load_states()

    def _load_states(self) -> None:
        """Point the recurrent layers at the static state buffers (mixers assign new tensors every step)."""
        i = 0
        for layer in self.recurrent:
            n = len(layer.tensors())
            layer.load_tensors(self.states[i:i + n])
            i += n

    @torch.no_grad()
    def _step_body(self) -> None:
        """The step a graph captures: fixed-address inputs and outputs, no host read of device values."""
        self._load_states()
        with decoding():
            out = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.state.cache,
                             use_cache=True, return_dict=True)
        for dst, src in zip(self.states, (t for layer in self.recurrent for t in layer.tensors())):
            dst.copy_(src)
        if self.pick is None:
            greedy(out.logits, out=self.ids)
        else:
            self.pick(out.logits, self.ids)
        self.pos.add_(1)

    def room(self) -> int | None:
        """Tokens the static KV layers can still take (None: no KV layer, no limit)."""
        return self.state.cache.room()

    def check_room(self, n_tokens: int = 1) -> None:
        """Raise KVCacheFull (host-side, before any step) unless n_tokens more steps fit."""
        for layer in self.static:
            layer.check_room(n_tokens)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        self.check_room(1)
        self._step_body()  # the forward advances seen_tokens and every StaticKVLayer.seen
        self.state.next_ids = self.ids
        return self.ids

    @torch.no_grad()
    def decode(self, n_tokens: int) -> torch.Tensor:
        self.check_room(n_tokens)  # fail before the first step rather than midway
        return super().decode(n_tokens)


class GraphDecoder(StaticDecoder):
    """Greedy decoding with one step captured in a CUDA graph (every zoo model on CUDA).

    The step is `StaticDecoder`'s: the recurrent states are copied into static buffers, attention layers are
    made static (`max_new_tokens` of room; required when the cache still has growing KV layers) and written in
    place at their device-side length, positions come from a device tensor the step advances. The mixers write
    new recurrent states into fresh tensors of the graph's pool, which the step copies back into the static
    buffers, so every replay continues from the last. Host-side counters (ZooCache.seen_tokens,
    StaticKVLayer.seen) are advanced by `step` after each replay, and the room left is checked before it:
    a step past the capacity raises KVCacheFull instead of writing out of bounds.
    Raises ValueError when the cache is not `graphable` or the model is not on CUDA.
    """

    def __init__(self, model: nn.Module, state: DecodeState, warmup: int = 2, max_new_tokens: int | None = None,
                 pick: TokenPicker | None = None):
        if not graphable(state.cache):
            raise ValueError("GraphDecoder: the cache is not a prefilled zoo cache; decode with EagerDecoder")
        if any(getattr(layer, "window_carry", None) is not None for layer in state.cache.layers):
            # the carry is a host attribute rebound every step: a replay would read the capture's tensors (stale
            # inputs, no error), and the warm-up's restore does not rewind it
            raise ValueError("GraphDecoder: the cache carries the window mitigation's inputs (zoo.state "
                             "apply_mitigation 'window'), which a CUDA graph cannot replay; decode with "
                             "StaticDecoder or EagerDecoder")
        if state.next_ids.device.type != "cuda":
            raise ValueError("GraphDecoder: CUDA graphs need the model on a CUDA device")
        super().__init__(model, state, max_new_tokens, pick)
        self.check_room(1)  # the warm-up and the capture write one slot (overwritten by the first real step)
        saved = self._snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, Triton compiles, probes)
            for _ in range(warmup):
                self._step_body()
                self._restore(saved)  # each warm-up step starts from the real state: it needs one slot only
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step_body()
        self._restore(saved)  # the capture ran no kernel but advanced the host counters
        self._load_states()

    def _snapshot(self) -> tuple:
        cache = self.state.cache
        picked = self.pick.buffers() if self.pick is not None else []
        return ([t.clone() for t in self.states], self.ids.clone(), self.pos.clone(),
                [layer.length.clone() for layer in self.static], cache.seen_tokens,
                [layer.seen for layer in self.static], [t.clone() for t in picked])

    def _restore(self, saved: tuple) -> None:
        states, ids, pos, lengths, seen_tokens, seen, picked = saved
        for dst, src in zip(self.states, states):
            dst.copy_(src)
        for dst, src in zip(self.pick.buffers() if self.pick is not None else [], picked):
            dst.copy_(src)
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        for layer, length, n in zip(self.static, lengths, seen):
            layer.length.copy_(length)
            layer.seen = n
        self.state.cache.seen_tokens = seen_tokens
        self._load_states()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        self.check_room(1)
        self.graph.replay()
        self.state.cache.seen_tokens += 1
        for layer in self.static:
            layer.seen += 1
        self.state.next_ids = self.ids
        return self.ids


# generate settings a static decode has no equivalent for, with the value that means "off" (None is off too)
_NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
            "min_length": 0, "min_new_tokens": 0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "bad_words_ids": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": 0.0,
            "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
            "renormalize_logits": False, "remove_invalid_values": False, "guidance_scale": 1.0,
            "watermarking_config": None, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
            "output_hidden_states": False, "output_attentions": False, "prompt_lookup_num_tokens": None,
            "assistant_early_exit": None, "cache_implementation": None,
            # newer or Hub-loaded modes generate switches to (absent from older GenerationConfigs: read as None):
            # Top-H sampling, contrastive search, DoLa, constrained beams, MTP assisted decoding, token healing
            "top_h": None, "penalty_alpha": 0.0, "dola_layers": None, "constraints": None, "force_words_ids": None,
            "use_mtp": False, "token_healing": False}
# warpers generate applies only when sampling: greedy decoding ignores them (with a warning), so a model's
# generation_config made for sampling still decodes greedily
_SAMPLING_ONLY = ("typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "top_h")
# generate's minimum lengths only hold back eos: without an eos_token_id they change nothing
_EOS_ONLY = ("min_length", "min_new_tokens")
# what generate collects only for a GenerateOutput: without return_dict_in_generate it returns the same tensor
_DICT_ONLY = ("output_scores", "output_logits", "output_hidden_states")


# token lists whose processor is a no-op when empty (transformers builds it and it suppresses nothing)
_EMPTY_IS_OFF = ("suppress_tokens", "begin_suppress_tokens")


def _is_neutral(name: str, value: Any) -> bool:
    neutral = _NEUTRAL[name]
    if name in _EMPTY_IS_OFF and isinstance(value, (list, tuple)) and not value:
        return True
    return value is None or value == neutral


def _changes_decoding(config, name: str, prompt_len: int) -> bool:
    """Whether generation setting `name` of `config` would make generate decode otherwise than the static decode
    of a prompt of prompt_len tokens."""
    if _is_neutral(name, getattr(config, name, None)):
        return False
    if name in _SAMPLING_ONLY and not config.do_sample:
        return False  # greedy decoding does not apply these warpers
    if name in _EOS_ONLY and config.eos_token_id is None:
        return False
    if name in _DICT_ONLY and not config.return_dict_in_generate:
        return False
    if name == "min_length" and (config.min_new_tokens is not None or config.min_length <= prompt_len):
        # generate replaces min_length by the prompt's length plus min_new_tokens where that is set, and holds eos
        # back only while the sequence, prompt included, is shorter than min_length
        return False
    if name == "penalty_alpha":  # contrastive search is greedy decoding with top_k > 1 and penalty_alpha > 0
        return not config.do_sample and config.top_k is not None and config.top_k > 1
    return True


def _seconds_since(started: float, device: torch.device) -> float:
    """Wall seconds since `started` once the device has finished what is queued (generate reads its clock after
    each step's token exists)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.time() - started


_GRAPH_ENTRY = "_zoo_graph_entry"  # where static_generate(reuse=True) keeps its decoder on the model


@dataclass
class _GraphEntry:
    """A decoder kept by static_generate(reuse=True): its graph replays on its buffers for another prompt."""

    key: tuple
    decoder: StaticDecoder
    picker: TokenPicker
    room: int  # tokens its static KV layers hold (prompt and new ones)


def _graph_key(model: nn.Module, call: tuple) -> tuple:
    """What a captured step depends on beyond its buffers: the call's (graph, batch, device, picker settings,
    padding), every parameter's and buffer's storage (a replaced tensor is not read by the graph), the mode, the
    ZOO_ settings the step reads when it is traced, and the recurrent mixers' state-collapse mitigations and state
    probes (zoo.state), which the step's Python reads when it is traced: a mitigation set, changed or cleared after
    the capture was not seen by the kept graph's steps, while the call's prefill took it."""
    tensors = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("ZOO_")))
    state_tools = tuple((_mitigation_key(m.mitigation), m.state_probe) for m in model.modules()
                        if hasattr(type(m), "mitigation") and hasattr(type(m), "state_probe"))
    return (*call, tensors, model.training, env, state_tools)


def _mitigation_key(spec) -> tuple | None:
    """A mixer's mitigation spec (dict, a per-head threshold tensor maybe) as a comparable tuple; None stays None."""
    if not spec:
        return None
    return tuple(sorted((k, tuple(v.flatten().tolist()) if isinstance(v, torch.Tensor) else v)
                        for k, v in spec.items()))


def _reusable_entry(model: nn.Module, call: tuple, tokens: int) -> _GraphEntry | None:
    """The decoder static_generate(reuse=True) kept on `model`, if it serves this call; else None, with a kept one
    that does not released first (its buffers' memory)."""
    if any(type(m).__module__.startswith("peft") for m in model.modules()):
        raise ValueError("generate(cuda_graph='reuse'): the model carries PEFT adapters, whose switches "
                         "(set_adapter, disable_adapter) a kept graph would not see; use cuda_graph=True (a "
                         "graph per call), or merge the adapters (merge_and_unload) first")
    entry = model.__dict__.get(_GRAPH_ENTRY)
    if entry is not None and (entry.key != _graph_key(model, call) or entry.room < tokens):
        release_graph(model)
        entry = None
    return entry


def release_graph(model: nn.Module) -> bool:
    """Free the decoder, buffers and CUDA graph that generate(cuda_graph="reuse") kept on `model`; whether there
    was one."""
    return model.__dict__.pop(_GRAPH_ENTRY, None) is not None


@torch.no_grad()
def static_generate(model: nn.Module, input_ids: torch.Tensor, generation_config=None, *, graph: bool | None = None,
                    check_every: int = 8, reuse: bool = False, **kwargs) -> torch.Tensor:
    """transformers' `generate` for a zoo model, decoding with static buffers: each step in a CUDA graph
    (`GraphDecoder`, graph=True, the default on CUDA) or the same step run eagerly (`StaticDecoder`, graph=False,
    any device). `model.generate(..., cuda_graph=True)` calls it.

    It reads the generation settings as generate does (generation_config or the model's, then the keyword arguments)
    and takes: max_new_tokens / max_length, do_sample with temperature, top_k and top_p, num_return_sequences
    (sampling: each prompt row repeated, as generate does), prefill_chunk_size, max_time (a device sync per step, as
    generate's), eos_token_id and pad_token_id, stop_strings with a tokenizer (transformers' StopStringCriteria after
    each token, between replays; a row that met one has ended, and with an eos_token_id is padded from then on, as
    generate does), a streamer (transformers' TextStreamer protocol: the prompt, then
    each step's tokens, then end()), an attention_mask (left padding; any padding where every layer is recurrent,
    with a warning where a row ends in padding: its tokens then follow the pads).
    Greedy tokens are those of `generate` up to the kernels' rounding (the decode step attends with the static-cache
    kernels); sampling draws from the same distribution with another random stream (`TokenPicker`). Anything else
    generate takes (beams, logits processors, penalties, a stopping_criteria list, returned scores, padding other
    than on the left with attention layers, a given cache) raises ValueError: generate without cuda_graph for it.
    reuse (`generate(cuda_graph="reuse")`): keep the decoder, its static buffers and its graph on the model, and
    decode the next call with them when it has the same batch, settings, padding or not, parameters and room
    (`_GraphEntry`); each call still prefills, but skips the warm-up steps and the capture. The KV room is the
    first call's prompt and new tokens, rounded up to a multiple of 256; `release_graph(model)` frees it.
    Returns the prompt and the new tokens, [B, T + n] (int64); n stops early once every row has produced an eos or
    met a stop string (checked every `check_every` steps, one host read each; every step with a streamer, which reads
    each step's tokens anyway), rows that ended sooner padded with pad_token_id where there is an eos_token_id.
    """
    from transformers import GenerationConfig

    started = time.time()  # max_time counts from here, as generate's MaxTimeCriteria from before its prefill
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise ValueError("generate(cuda_graph=True) takes input_ids [batch, tokens] (no inputs_embeds)")
    own = getattr(model, "generation_config", None)
    prepare = getattr(model, "_prepare_generation_config", None)
    if own is not None and prepare is not None:
        # transformers' own merge, as generate's: the given config, what it leaves unset from the model's, then
        # transformers' defaults, then the keyword arguments; with its fix-ups (a checkpoint's legacy
        # cache_implementation="hybrid", Gemma-2's, is dropped: it was refused here while generate decodes it)
        default_length = kwargs.get("max_length") is None and own.max_length is None \
            and (generation_config is None or generation_config.max_length is None)
        config, leftover = prepare(generation_config, **kwargs)
        for name in ("output_attentions", "output_hidden_states"):  # the config's flags, copied for the forward
            leftover.pop(name, None)  # (_changes_decoding reads them from the config)
        if default_length:
            config.max_length = None  # generate's default then counts 20 new tokens from the prompt (below)
    else:  # a model without transformers' GenerationMixin: the same merge by hand
        config = copy.deepcopy(generation_config if generation_config is not None else own or GenerationConfig())
        if generation_config is not None and own is not None:  # what the given one leaves unset, the model's
            for name, value in own.to_dict().items():
                if value is not None and getattr(config, name, None) is None:
                    setattr(config, name, value)
        # generate fills an unset top_k with its default (50) before it applies the keyword arguments: top_k=None
        # passed to it turns top-k filtering off
        if config.top_k is None:
            config.top_k = 50
        leftover = config.update(**kwargs)
    mask = leftover.pop("attention_mask", None)
    streamer = leftover.pop("streamer", None)
    leftover.pop("use_cache", None)
    if leftover.get("synced_gpus") is False:  # generate's default: nothing to keep in step with
        leftover.pop("synced_gpus")
    tokenizer = leftover.pop("tokenizer", None)  # generate reads it for stop_strings alone
    stops = None
    if getattr(config, "stop_strings", None) is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass tokenizer= to generate (as transformers asks)")
        from transformers.generation.stopping_criteria import StopStringCriteria

        stops = StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings)
    # generate treats an argument passed as None as not passed: None is the default of each of its own, and its
    # check for unused model keywords skips those at None (the forward's default)
    leftover = {name: value for name, value in leftover.items() if value is not None}
    if leftover:
        raise ValueError(f"generate(cuda_graph=True) does not take {sorted(leftover)}: it decodes greedily or "
                         f"samples (temperature, top_k, top_p) up to max_new_tokens or eos; generate without "
                         f"cuda_graph for it")
    refused = [f"{name}={getattr(config, name)!r}" for name in _NEUTRAL
               if _changes_decoding(config, name, input_ids.shape[1])]
    if refused:
        raise ValueError(f"generate(cuda_graph=True) does not support {', '.join(refused)}; generate without "
                         f"cuda_graph for it")
    copies = config.num_return_sequences or 1
    if copies > 1 and not config.do_sample:
        raise ValueError(f"num_return_sequences={copies} without do_sample: greedy decoding would return the same "
                         f"sequence {copies} times (transformers refuses it too); sample, or use beams without "
                         f"cuda_graph")
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("generate(cuda_graph=True): the prompt is empty; pass at least one token per row")
    eos, pad = config.eos_token_id, config.pad_token_id
    if torch.is_tensor(eos):  # generate takes a tensor too: 1-d, or 0-d for one token (tolist gives an int)
        eos = eos.tolist()
    if eos is not None and pad is None:
        pad = eos if isinstance(eos, int) else list(eos)[0]  # what transformers' generate does, with its warning
    if mask is None and pad is not None and pad not in ([eos] if isinstance(eos, int) else list(eos or [])) \
            and bool((input_ids == pad).any()):
        # generate given no attention_mask infers one from the prompt's pad tokens, except where the pad is an eos
        # (it cannot tell padding from a text's end then)
        mask = (input_ids != pad).long()
    if mask is not None:
        if tuple(mask.shape) != (batch, prompt_len):
            raise ValueError(f"attention_mask: expected [{batch}, {prompt_len}] like input_ids, got "
                             f"{tuple(mask.shape)}")
        mask = mask.to(torch.long)
        if bool(mask.all()):
            mask = None  # says nothing
        elif not ZooCache.for_model(model).recurrent_only() and not bool((mask.diff(dim=1) >= 0).all()):
            raise ValueError("generate(cuda_graph=True) takes left padding only (each row's zeros before its "
                             "tokens) on a model with attention layers: the static KV cache hides each row's "
                             "first slots. The attention_mask has zeros after a token: pad on the left "
                             "(tokenizer.padding_side = 'left'), or generate without cuda_graph")
        warn_if_right_padded(mask)
    if config.max_new_tokens is not None:
        n = config.max_new_tokens
    else:
        total = config.max_length
        if total is None:
            # generate's default when no max_length is set anywhere is 20 new tokens after the prompt (not 20 in
            # all), cut to the config's max_position_embeddings in all where it has one
            limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            total = prompt_len + 20 if limit is None else min(prompt_len + 20, limit)
        n = total - prompt_len
        if n < 1:
            raise ValueError(f"max_length {total} leaves no room after the {prompt_len}-token prompt; "
                             f"pass max_new_tokens")
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {n}")
    if copies > 1:
        input_ids = input_ids.repeat_interleave(copies, dim=0)  # generate's order: each row's copies together
        mask = mask.repeat_interleave(copies, dim=0) if mask is not None else None
        batch *= copies
    max_time = getattr(config, "max_time", None)
    if max_time is not None:
        max_time = float(max_time)
    sample = bool(config.do_sample)
    settings = dict(do_sample=sample, temperature=config.temperature if config.temperature is not None else 1.0,
                    top_k=config.top_k if sample else None, top_p=config.top_p if sample else None,
                    eos_token_id=eos, pad_token_id=pad)
    graph = input_ids.is_cuda if graph is None else graph
    if graph and not input_ids.is_cuda:
        raise ValueError("generate(cuda_graph=True) needs the model and input_ids on a CUDA device")
    call = (graph, batch, input_ids.device, repr(settings), mask is not None)  # what a kept decoder must match
    entry = _reusable_entry(model, call, prompt_len + n) if reuse else None
    picker = entry.picker if entry is not None else TokenPicker(batch, input_ids.device, **settings)
    picker.finished.zero_()
    if streamer is not None:
        streamer.put(input_ids.cpu())
        check_every = 1  # each step's tokens are read anyway: stop at the step the last row ends, as generate
    arg = cache_argument(model)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    chunk = getattr(config, "prefill_chunk_size", None)
    if chunk is not None and chunk < 1:
        raise ValueError(f"prefill_chunk_size must be a positive number of tokens, got {chunk}")
    chunk = chunk or prompt_len  # the prompt in chunks, cache carried
    cache = None
    for start in range(0, prompt_len, chunk):
        # a padded row's pads enter no recurrent state (the prefill zeroes their inputs, as generate's does) and
        # no attention (the key mask); after the prompt the steps need no mask (to_static's pads, below)
        padded = {"attention_mask": mask[:, :start + chunk]} if mask is not None else {}
        out = model(input_ids=input_ids[:, start:start + chunk], use_cache=True, **{arg: cache}, **keep, **padded,
                    **_dict_output(model))
        cache = output_cache(out, arg)
    ids = torch.empty(batch, 1, dtype=torch.long, device=input_ids.device)
    picker(out.logits[:, -1:], ids)
    tokens = torch.empty(batch, n, dtype=torch.long, device=input_ids.device)
    tokens[:, :1] = ids
    if streamer is not None:
        streamer.put(ids[:, 0].cpu())
    done = 1
    # stop strings: each row's first token index at which its text ends with one (n: none yet), on the device
    stopped_at = torch.full((batch,), n, dtype=torch.long, device=input_ids.device) if stops is not None else None
    if stops is not None:
        _check_stop_strings(stops, input_ids, tokens, done, stopped_at, picker)
    if n > 1:
        pads = (mask == 0).sum(dim=1) if mask is not None else None  # each row's left padding
        del out
        if entry is not None:
            decoder = entry.decoder
            decoder.reload(cache, ids, pads)
        else:
            # room for this call's tokens (rounded up when the graph is kept, so that longer prompts reuse it)
            room = -(-(prompt_len + n) // 256) * 256 if reuse else prompt_len + n - 1
            if pads is not None or reuse:  # the pads' KV slots stay hidden, their positions count after them
                cache.to_static(room, pads=pads)
            state = DecodeState(cache, ids, arg)
            decoder = (GraphDecoder if graph else StaticDecoder)(model, state, max_new_tokens=n - 1, pick=picker)
            if reuse:
                model.__dict__[_GRAPH_ENTRY] = _GraphEntry(_graph_key(model, call), decoder, picker, room)
        while done < n:
            if done % check_every == 0 and (picker.eos is not None or stops is not None) \
                    and bool(_ended(picker, stopped_at, n).all()):
                break
            if max_time is not None and _seconds_since(started, input_ids.device) > max_time:
                break  # generate's MaxTimeCriteria: checked after each token, the first included
            step = decoder.step()
            tokens[:, done:done + 1] = step
            if streamer is not None:
                streamer.put(step[:, 0].cpu())
            done += 1
            if stops is not None:
                _check_stop_strings(stops, input_ids, tokens, done, stopped_at, picker)
    if streamer is not None:
        streamer.end()
    tokens = tokens[:, :done]
    if picker.eos is not None or stops is not None:
        ends = torch.full((batch,), n, dtype=torch.long, device=tokens.device)  # each row's last token index
        if picker.eos is not None:
            hit = torch.isin(tokens, picker.eos)
            ends = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), ends)
        if stopped_at is not None:
            ends = torch.minimum(ends, stopped_at)
        if bool((ends < n).all()):  # transformers stops at the step the last row ends
            tokens = tokens[:, :int(ends.max()) + 1]
    return torch.cat([input_ids, tokens], dim=1)


def _check_stop_strings(stops, input_ids: torch.Tensor, tokens: torch.Tensor, done: int, stopped_at: torch.Tensor,
                        picker: TokenPicker) -> None:
    """After token `done - 1`: rows whose text now ends with a stop string (transformers' StopStringCriteria, on
    the last tokens it reads) are stopped there (`stopped_at`, first time only); with an eos_token_id they are
    finished too, so that their later tokens are pad_token_id, as generate pads them. No host read."""
    # (an empty stop string alone has a maximum_token_len of 0: generate's criterion then reads every token and finds
    # it at once; an empty window failed in the criterion, 'amax(): Expected reduction dim 1 to have non-zero size')
    width = max(stops.maximum_token_len, 1)
    recent = tokens[:, max(0, done - width):done]
    if recent.shape[1] < width:  # the prompt's last tokens before the first generated ones
        recent = torch.cat([input_ids[:, -(width - recent.shape[1]):], recent], dim=1)
    hit = stops(recent, None).to(torch.bool)
    stopped_at.copy_(torch.where(hit & (stopped_at == tokens.shape[1]), done - 1, stopped_at))
    if picker.eos is not None:
        picker.finished |= hit[:, None]


def _ended(picker: TokenPicker, stopped_at: torch.Tensor | None, n: int) -> torch.Tensor:
    """[B] whether each row has ended: produced an eos (the picker's `finished`) or a stop string."""
    ended = picker.finished[:, 0] if picker.eos is not None else torch.zeros_like(picker.finished[:, 0])
    return ended | (stopped_at < n) if stopped_at is not None else ended


__all__ = ["DecodeState", "EagerDecoder", "GraphDecoder", "KVCacheFull", "StaticDecoder", "TokenPicker",
           "cache_argument", "release_graph", "static_generate",
           "continues_chunks_exactly",
           "cache_nbytes", "graphable", "prefill"]
