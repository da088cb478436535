"""One hybrid cache built on transformers' cache API.

Attention layers hold keys/values in a `DynamicLayer` (or `DynamicSlidingWindowLayer` with a window);
mamba / mamba2 / gla layers hold a conv state and a recurrent state in a `RecurrentLayer`, a
`LinearAttentionLayer` whose states are *assigned* rather than copied in place, so that a cache carried
between training chunks stays connected to the autograd graph (truncated BPTT).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer


class RecurrentLayer(LinearAttentionLayer):
    """Conv state [batch, channels, d_conv - 1] and recurrent state (fp32) of one recurrent mixer."""

    is_compileable = False

    def __init__(self):
        super().__init__(number_of_states=1)

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
            self.conv_states[0] = conv_state
            self.is_conv_states_initialized[0] = True
            self.conv_kernel_size[0] = conv_state.shape[-1]
            self.device, self.dtype = conv_state.device, conv_state.dtype
        if recurrent_state is not None:
            self.recurrent_states[0] = recurrent_state
            self.is_recurrent_states_initialized[0] = True
            self.device = recurrent_state.device
        self.has_previous_state[0] = True

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.conv_states[0], self.recurrent_states[0]) if t is not None]

    def load_tensors(self, tensors: list[torch.Tensor]) -> None:
        it = iter(tensors)
        conv = next(it) if self.conv_states[0] is not None else None
        rec = next(it) if self.recurrent_states[0] is not None else None
        self.set(conv, rec)

    def detach_(self) -> None:
        self.load_tensors([t.detach() for t in self.tensors()])


class ZooCache(Cache):
    """Per-layer cache entries made by each mixer's `init_state`; counts the tokens it has seen."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)
        self.seen_tokens = 0

    @classmethod
    def for_model(cls, model, batch_size: int = 1, dtype=None, device=None, max_len: int | None = None) -> ZooCache:
        """An empty cache for `model` (a ZooModel or ZooForCausalLM)."""
        base = getattr(model, "model", model)
        param = next(base.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        return cls([block.mixer.init_state(batch_size, dtype, device, max_len) for block in base.layers])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    # ---- truncated BPTT ----------------------------------------------------------------------------------
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
        """Replace the carried tensors (same order and shapes as `state_tensors`), e.g. by leaves requiring grad."""
        tensors = list(tensors)
        i = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentLayer):
                n = len(layer.tensors())
                layer.load_tensors(tensors[i:i + n])
                i += n
            elif isinstance(layer, CacheLayerMixin) and layer.is_initialized and layer.keys is not None:
                layer.keys, layer.values = tensors[i], tensors[i + 1]
                i += 2
        if i != len(tensors):
            raise ValueError(f"load_state_tensors: expected {i} tensors, got {len(tensors)}")

    def detach_(self) -> ZooCache:
        """Cut the autograd graph at the carried states (classic truncated BPTT)."""
        self.load_state_tensors([t.detach() for t in self.state_tensors()])
        return self


__all__ = ["RecurrentLayer", "ZooCache"]
