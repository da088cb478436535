"""Greedy decoding loops without host synchronization, eager or with one step captured in a CUDA graph.

A decode step of a 130M model is a few hundred small kernel launches: at small batch the GPU waits on the
CPU that launches them. Capturing the step in a CUDA graph replays all of them in one launch. That needs
every tensor the step reads and writes at a fixed address, which a recurrent cache (constant-size conv and
SSM / GLA states) allows and a growing KV cache does not, so `GraphDecoder` takes models whose layers all
keep `RecurrentLayer` states (Mamba, Mamba-2, GLA stacks); attention and hybrid models decode eagerly.

    state = prefill(model, prompt)                      # cache + first greedy token, [B, 1]
    decoder = GraphDecoder(model, state) if graphable(state.cache) else EagerDecoder(model, state)
    tokens = decoder.decode(128)                        # [B, 128] greedy tokens, one sync at the end

Works on any Hugging Face causal LM (zoo models, transformers' Llama and Mamba): the cache travels through
``past_key_values`` or, for models whose forward names it so, ``cache_params``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zoo.cache import RecurrentLayer, ZooCache


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its cache: 'cache_params' (transformers' Mamba) or
    'past_key_values'."""
    return "cache_params" if _accepts(model, "cache_params") else "past_key_values"


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
    arg = cache_argument(model)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache, logits = None, None
    step = chunk_size or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids=input_ids[:, start:start + step], use_cache=True, **{arg: cache}, **keep)
        cache, logits = getattr(out, arg), out.logits[:, -1:]
    return DecodeState(cache, logits.argmax(-1), arg)


def graphable(cache: Any) -> bool:
    """Whether a cache has only constant-size recurrent layers (a CUDA graph can replay its steps)."""
    return isinstance(cache, ZooCache) and bool(cache.layers) and all(
        isinstance(layer, RecurrentLayer) and layer.has_state for layer in cache.layers)


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
        out = self.model(input_ids=s.next_ids, use_cache=True, **{s.cache_argument: s.cache})
        s.cache = getattr(out, s.cache_argument)
        s.next_ids = out.logits[:, -1:].argmax(-1)
        return s.next_ids

    @torch.no_grad()
    def decode(self, n_tokens: int) -> torch.Tensor:
        """n_tokens greedy tokens [B, n_tokens]; the first is the one after the prefill's."""
        ids = self.state.next_ids
        out = torch.empty(ids.shape[0], n_tokens, dtype=ids.dtype, device=ids.device)
        for i in range(n_tokens):
            out[:, i:i + 1] = self.step()
        return out


class GraphDecoder(EagerDecoder):
    """Greedy decoding with one step captured in a CUDA graph (recurrent zoo models on CUDA).

    The cache's state tensors are copied into static buffers; the captured step points the cache at them,
    runs the forward (whose mixers write their new states into fresh tensors of the graph's pool) and copies
    the new states and the argmax token back into the static buffers, so every replay continues from the last.
    Raises ValueError when the cache is not `graphable` or the model is not on CUDA.
    """

    def __init__(self, model: nn.Module, state: DecodeState, warmup: int = 2):
        super().__init__(model, state)
        if not graphable(state.cache):
            raise ValueError("GraphDecoder: the cache holds growing KV layers or is not a zoo cache; "
                             "decode with EagerDecoder")
        if state.next_ids.device.type != "cuda":
            raise ValueError("GraphDecoder: CUDA graphs need the model on a CUDA device")
        cache = state.cache
        self.states = [t.clone() for t in cache.state_tensors()]  # static: the graph reads and writes these
        self.ids = state.next_ids.clone()
        saved = [t.clone() for t in self.states], self.ids.clone(), cache.seen_tokens
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, Triton compiles, allocator)
            for _ in range(warmup):
                self._captured_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._captured_step()
        for dst, src in zip(self.states, saved[0]):  # undo the warm-up steps
            dst.copy_(src)
        self.ids.copy_(saved[1])
        cache.seen_tokens = saved[2]
        cache.load_state_tensors(self.states)

    @torch.no_grad()
    def _captured_step(self) -> None:
        cache = self.state.cache
        cache.load_state_tensors(self.states)
        out = self.model(input_ids=self.ids, past_key_values=cache, use_cache=True)
        for dst, src in zip(self.states, cache.state_tensors()):
            dst.copy_(src)
        self.ids.copy_(out.logits[:, -1:].argmax(-1))

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        self.graph.replay()
        self.state.cache.seen_tokens += 1
        self.state.next_ids = self.ids
        return self.ids


__all__ = ["DecodeState", "EagerDecoder", "GraphDecoder", "cache_argument", "cache_nbytes", "graphable",
           "prefill"]
