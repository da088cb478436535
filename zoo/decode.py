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

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from zoo.cache import KVCacheFull, RecurrentLayer, StaticKVLayer, ZooCache, output_cache
from zoo.layers import decoding, optional_kernel

# ZOO_DECODE_ARGMAX=0 keeps torch.argmax for the greedy token on CUDA (benchmarks compare the two)
ARGMAX_KERNEL = os.environ.get("ZOO_DECODE_ARGMAX", "1") != "0"


def greedy(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy next tokens [B, 1] (int64) of logits [B, T, V] (the last position's), written into `out` [B, 1]
    when given (a graph's fixed token buffer). On CUDA one Triton kernel (zoo_kernels.argmax: torch.argmax's
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


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its cache, and the output attribute that returns it:
    'cache_params' (transformers' Mamba before 5.2x), 'cache' (transformers' models from 5.2x on, which
    renamed both) or 'past_key_values' (zoo models, older transformers models)."""
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
    arg = cache_argument(model)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache, logits = None, None
    step = chunk_size or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids=input_ids[:, start:start + step], use_cache=True, **{arg: cache}, **keep)
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

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed the current token, return the next ones [B, 1] (no host synchronization)."""
        s = self.state
        with decoding():
            out = self.model(input_ids=s.next_ids, use_cache=True, **{s.cache_argument: s.cache})
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

    def __init__(self, model: nn.Module, state: DecodeState, max_new_tokens: int | None = None):
        super().__init__(model, state)
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
                             use_cache=True)
        for dst, src in zip(self.states, (t for layer in self.recurrent for t in layer.tensors())):
            dst.copy_(src)
        greedy(out.logits, out=self.ids)
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

    def __init__(self, model: nn.Module, state: DecodeState, warmup: int = 2, max_new_tokens: int | None = None):
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
        super().__init__(model, state, max_new_tokens)
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
        return ([t.clone() for t in self.states], self.ids.clone(), self.pos.clone(),
                [layer.length.clone() for layer in self.static], cache.seen_tokens,
                [layer.seen for layer in self.static])

    def _restore(self, saved: tuple) -> None:
        states, ids, pos, lengths, seen_tokens, seen = saved
        for dst, src in zip(self.states, states):
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


__all__ = ["DecodeState", "EagerDecoder", "GraphDecoder", "KVCacheFull", "StaticDecoder", "cache_argument",
           "continues_chunks_exactly",
           "cache_nbytes", "graphable", "prefill"]
