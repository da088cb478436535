"""Transformer++ attention mixer: RoPE, grouped-query heads, optional sliding window, no biases, KV cache."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from zoo_kernels.attention import BACKENDS, attention

from zoo.cache import StaticKVLayer
from zoo.layers import Linear, last_columns, optional_kernel
from zoo.registry import register_mixer

# backends whose padded path is a dense mask (no host sync, capturable in a CUDA graph)
_DENSE_MASK_BACKENDS = ("sdpa_cudnn", "sdpa_efficient", "math")


def _decode_kernel():
    """zoo_kernels.attention.decode.decode_attention (split-key single-query attention over a static KV buffer)
    where Triton imports, else None: the auto backend's decode step on CUDA."""
    return optional_kernel("attention.decode", "decode_attention")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _SelfOnlyLayer(DynamicSlidingWindowLayer):
    """The sliding layer of a window of 1 (each query sees itself only): it keeps no past keys. transformers' layer
    keeps the last `window - 1` with a `[-(window - 1):]` slice, which at window 1 is `[0:]`: every key, a cache
    that grew with the sequence."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if not self.record_past:
            self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
        return keys, values


def default_n_heads(d_model: int) -> int:
    """The query heads of an attention layer whose spec gives no n_heads: one per 64 channels."""
    return max(1, d_model // 64)


@register_mixer("attention")
class Attention(nn.Module):
    """Causal multi-head attention with RoPE (Su et al.) and GQA.

    Args: d_model; n_heads (d_model // 64 if not given); n_kv_heads (n_heads); head_dim (d_model // n_heads);
    rope_theta (10000); rope (True; False: no position encoding, as in Jamba's attention layers);
    window (None: full causal; w: each token sees the last w positions);
    attn_backend ("auto" | "flash_attn" | "flash_attn_cute" | "sdpa_cudnn" | "sdpa_flash" | "sdpa_efficient" |
    "flex" | "math").
    """

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    output_projections = ("o_proj",)

    def __init__(self, d_model: int, layer_idx: int = 0, *, n_heads: int | None = None, n_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_theta: float = 10000.0, rope: bool = True,
                 window: int | None = None, attn_backend: str = "auto"):
        super().__init__()
        n_heads = default_n_heads(d_model) if n_heads is None else n_heads
        self.check_spec(d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, rope_theta=rope_theta,
                        rope=rope, window=window, attn_backend=attn_backend)
        self.d_model, self.layer_idx = d_model, layer_idx
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.window, self.attn_backend, self.rope_theta, self.use_rope = window, attn_backend, rope_theta, rope
        self.q_proj = Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, d_model, bias=False)

    @staticmethod
    def check_spec(d_model: int, *, n_heads: int | None = None, n_kv_heads: int | None = None,
                   head_dim: int | None = None, rope_theta: float = 10000.0, rope: bool = True,
                   window: int | None = None, attn_backend: str = "auto", **_) -> None:
        if attn_backend not in ("auto", *BACKENDS):
            raise ValueError(f"attn_backend: unknown backend {attn_backend!r}; choose auto or one of "
                             f"{', '.join(BACKENDS)} (math is the reference)")
        # a default the user never wrote is named as one: 'n_heads: 3 does not divide' read as their own setting
        default = "" if n_heads is not None else (f" (no n_heads given: the default, one head per 64 channels, is "
                                                  f"{default_n_heads(d_model)})")
        n_heads = default_n_heads(d_model) if n_heads is None else n_heads  # 0 is refused, not replaced
        if not (isinstance(n_heads, int) and not isinstance(n_heads, bool) and n_heads >= 1):
            raise ValueError(f"n_heads: must be a positive integer, got {n_heads!r}")
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"n_heads: {n_heads} does not divide d_model = {d_model}{default}; choose n_heads "
                             f"dividing d_model or set head_dim")
        even = 2 if rope else 1  # RoPE rotates pairs; without it any width works
        if head_dim is not None and not (isinstance(head_dim, int) and not isinstance(head_dim, bool)
                                         and head_dim >= even and head_dim % even == 0):
            raise ValueError(f"head_dim: must be a positive even integer (RoPE rotates pairs), got {head_dim!r}" if rope
                             else f"head_dim: must be a positive integer, got {head_dim!r}")
        if rope and head_dim is None and (d_model // n_heads) % 2:
            raise ValueError(f"n_heads: head_dim = d_model / n_heads = {d_model // n_heads} must be even for RoPE"
                             f"{default}")
        if n_kv_heads is not None:
            if not (isinstance(n_kv_heads, int) and n_kv_heads >= 1):
                raise ValueError(f"n_kv_heads: must be a positive integer, got {n_kv_heads!r}")
            if n_heads % n_kv_heads:
                raise ValueError(f"n_kv_heads: {n_kv_heads} does not divide n_heads = {n_heads}{default}")
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
            raise ValueError(f"rope_theta: must be > 0, got {rope_theta!r}")
        if window is not None and not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window: must be a positive integer or null, got {window!r}")

    # ---- contract -----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, dtype: torch.dtype, device, max_len: int | None = None):
        # The sliding layer keeps window - 1 past keys, so a query still sees `window` keys with itself.
        if self.window == 1:
            return _SelfOnlyLayer(sliding_window=1)
        return DynamicSlidingWindowLayer(sliding_window=self.window) if self.window else DynamicLayer()

    def state_size(self, seq_len: int) -> int:
        kept = min(seq_len, self.window - 1) if self.window else seq_len  # init_state's layer keeps window - 1
        return 2 * self.n_kv_heads * self.head_dim * kept

    def backend_name(self) -> str:
        """The kernel of a training-shaped call (Tq == Tk, no padding), in the dtype calls will run in (the
        autocast dtype when autocast is on); where packed rows or decoding take another kernel, it follows in
        brackets, e.g. "sdpa_cudnn (packed: sdpa_flash, decode: sdpa_flash)"."""
        from zoo_kernels.attention import resolve_backend

        device = self.q_proj.weight.device
        if self.attn_backend != "auto":
            return self.attn_backend
        dtype = self.q_proj.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        gqa = self.n_heads != self.n_kv_heads
        common = dict(dtype=dtype, head_dim=self.head_dim, gqa=gqa, window=self.window is not None)
        main = resolve_backend("auto", device, **common, tq=2, tk=2)
        others = {"packed": resolve_backend("auto", device, **common, packed=True, tq=2, tk=2),
                  "packed without gradients": resolve_backend("auto", device, **common, packed=True, tq=2, tk=2,
                                                               grad=False),
                  "decode": resolve_backend("auto", device, **common, tq=1, tk=2)}
        differ = [f"{k}: {v}" for k, v in others.items() if v != main]
        return f"{main} ({', '.join(differ)})" if differ else main

    def rope_inv_freq(self, device) -> torch.Tensor:
        """RoPE's inverse frequencies [Dh/2] fp32, kept per device as a plain attribute, not a buffer: a
        non-persistent buffer would be left uninitialized by meta-device loading. Rounded as transformers' Llama
        rounds them (1 / theta^(i/Dh)): theta^-(i/Dh) is one ulp off in some entries, an angle error that grows with
        the position (4e-3 in cos at 100k)."""
        cache = self.__dict__.setdefault("_inv_freq", {})
        inv_freq = cache.get(device)
        if inv_freq is None:
            exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
            inv_freq = 1.0 / self.rope_theta ** exponents
            cache[device] = inv_freq
        return inv_freq

    def rope_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) [B, T, 1, Dh] in fp32 for position_ids [B, T]; None when the mixer has no RoPE. Computed once
        per forward and shared by q and k."""
        if not self.use_rope:
            return None
        device = position_ids.device
        # kept per device as a plain attribute, not a buffer: a non-persistent buffer would be left uninitialized
        # by meta-device loading
        inv_freq = self.rope_inv_freq(device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, Dh)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: [B, T, H, Dh] rotated by rope_tables' (cos, sin); identity for None."""
        if tables is None:
            return x
        cos, sin = tables
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, Dh]; position_ids: [B, T]. Identity when the mixer was built with rope=False."""
        return self.apply_rope(x, self.rope_tables(position_ids))

    @staticmethod
    def default_positions(attention_mask: torch.Tensor | None, past: int, T: int, batch: int, device) -> torch.Tensor:
        """position_ids [B, T] of a call without them: past + arange, less the pads after each row's first token that
        attention_mask [B, <= past + T] (its last columns) shows. Counting a pad between tokens (PEFT prompt tuning's
        [virtual tokens, pads, prompt]) as a position put the tokens after it at RoPE distances longer by the pads,
        so the row's outputs were not those of the row alone; left pads shift every token alike, which RoPE ignores.
        Pass the mask of every position so far (as check_mask_covers_keys asks): pads before a shorter mask's first
        column are not seen, so keys placed after them in an earlier call end up further from the new tokens."""
        positions = torch.arange(past, past + T, device=device).expand(batch, T)
        if attention_mask is None or T == 0:
            return positions
        mask = attention_mask[:, -(past + T):].bool()  # (B, L <= past + T): the last L positions
        inner_pads = (~mask & (mask.long().cumsum(-1) > 0)).long().cumsum(-1)  # pads after a first token, so far
        return positions - last_columns(inner_pads, T)

    def _cached_seq_idx(self, cache, seq_idx: torch.Tensor, n_keys: int) -> torch.Tensor | None:
        """Document ids of all n_keys visible keys; the cache keeps those of its cached keys alongside them. None for
        a chunk of no tokens after keys cached without ids: it has no first document for them to continue, and
        records nothing (as a recurrent layer's RecurrentLayer.initial_states)."""
        past = getattr(cache, "kv_seq_idx", None)
        if past is None and not seq_idx.shape[1]:
            return None
        if past is None:  # keys cached without ids continue this chunk's first document
            past = seq_idx[:, :1].expand(seq_idx.shape[0], n_keys - seq_idx.shape[1])
        full = torch.cat([past, seq_idx], dim=1)[:, -n_keys:]
        cache.kv_seq_idx = full[:, -(self.window - 1):] if self.window and self.window > 1 else full
        if self.window == 1:
            cache.kv_seq_idx = full[:, :0]
        return full

    def _keep_last_tokens(self, cache: DynamicSlidingWindowLayer, k: torch.Tensor, v: torch.Tensor,
                          key_mask: torch.Tensor, seq_idx: torch.Tensor | None) -> None:
        """Widen what a sliding layer keeps to each row's last window - 1 tokens. transformers' layer keeps the last
        window - 1 positions; the window counts tokens, not pads (zoo_kernels' visible_mask), so a row with pads
        among those positions (PEFT prompt tuning's [virtual tokens, pads, prompt]) needs keys from further back.
        k, v: every key of this call [B, S, Hkv, Dh] (cached ones first); key_mask, seq_idx (None or the keys' ids)
        [B, S]. One host sync."""
        keep = self.window - 1
        S = k.shape[1]
        if S <= keep or cache.record_past:
            return
        after = key_mask.flip(1).long().cumsum(1).flip(1)  # (B, S): tokens at or after each position
        needed = key_mask & (after <= keep)  # a row's last window - 1 tokens
        first = torch.where(needed, torch.arange(S, device=k.device), S).amin()
        kept = max(keep, S - int(first))
        if kept > keep:
            cache.keys, cache.values = k[:, -kept:].transpose(1, 2), v[:, -kept:].transpose(1, 2)
            if seq_idx is not None and getattr(cache, "kv_seq_idx", None) is not None:
                cache.kv_seq_idx = seq_idx[:, -kept:]

    @staticmethod
    def check_mask_covers_keys(cache, attention_mask: torch.Tensor | None, tokens: int) -> None:
        """Raise unless attention_mask covers every key a chunk of `tokens` tokens attends to in this layer: its
        cached keys (a dynamic layer's; a sliding window's keeps fewer than the tokens seen) and its own.
        ZooModel.forward checks every attention layer before any layer runs."""
        if attention_mask is None or cache is None or isinstance(cache, StaticKVLayer):
            return
        held = cache.keys.shape[-2] if getattr(cache, "is_initialized", False) and cache.keys is not None else 0
        if attention_mask.shape[-1] < held + tokens:
            raise ValueError(f"attention_mask: covers {attention_mask.shape[-1]} positions but this attention layer "
                             f"attends to {held + tokens} keys (cached + this chunk); with a cache pass the mask of "
                             f"every token so far, [batch, past + {tokens}], as transformers' generate does")

    def forward(self, x: torch.Tensor, *, cache=None, seq_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d_model] -> [B, T, d_model]. position_ids [B, T] (default: past length + arange, less the pads
        after a row's first token in attention_mask: a pad between tokens is no position)."""
        if isinstance(cache, StaticKVLayer):
            return self._static_step(x, cache, seq_idx, position_ids, attention_mask)
        Bsz, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        self.check_mask_covers_keys(cache, attention_mask, T)  # before the cache grows
        if position_ids is None:
            position_ids = self.default_positions(attention_mask, past, T, Bsz, x.device)
        tables = self.rope_tables(position_ids)
        q = self.apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)), tables)  # (B, T, H, Dh)
        k = self.apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), tables)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        if cache is not None:
            # transformers' layers store [B, H, S, Dh]; the transposes are views
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2))
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, Hkv, Dh)
        S = k.shape[1]
        key_mask = last_columns(attention_mask, S).bool() if attention_mask is not None else None
        past_ids = getattr(cache, "kv_seq_idx", None)
        if seq_idx is None and past_ids is not None and past_ids.shape[1]:
            # a chunk without ids after a packed one continues its last document, as a recurrent layer's state does
            seq_idx = past_ids[:, -1:].expand(Bsz, T)
        if seq_idx is not None and cache is not None:
            seq_idx = self._cached_seq_idx(cache, seq_idx, S)
        if key_mask is not None and isinstance(cache, DynamicSlidingWindowLayer) and self.window > 1:
            self._keep_last_tokens(cache, k, v, key_mask, seq_idx)
        o = attention(q, k, v, causal=True, window=self.window, seq_idx=seq_idx, key_padding_mask=key_mask,
                      backend=self.attn_backend)
        return self.o_proj(o.flatten(-2))

    def _static_step(self, x: torch.Tensor, cache: StaticKVLayer, seq_idx: torch.Tensor | None,
                     position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step on a StaticKVLayer (CUDA-graph decoding): RoPE at position_ids (a device tensor;
        default the layer's device-side length), k/v written in place, attention over the whole buffer with
        the layer's key padding mask. Nothing here reads a device value on the host, except an attention_mask
        if one is given (eager decoding through generate; a captured step gets none)."""
        Bsz, T, _ = x.shape
        if T == 0:  # no tokens: nothing to write or read, as with a dynamic cache
            return x
        if T != 1:
            raise ValueError(f"a static KV cache decodes one token per step, got {T}; prefill with the default "
                             f"dynamic cache and convert it (ZooCache.to_static)")
        # transformers' generate (5.17 with beams, for one) passes an all-ones mask for unpadded rows: read it on the
        # host (eager decoding only: a captured step gets no mask) and drop it; a padded row is refused
        if seq_idx is not None or (attention_mask is not None and not bool(attention_mask.all())):
            raise ValueError("a static KV cache decodes unpadded, unpacked rows: pass no attention_mask with padding, "
                             "and no seq_idx")
        attention_mask = None
        cache.check_room(1)  # host-side, before any write
        if position_ids is None:  # (a left-padded row counts from its first token)
            position_ids = cache.length.expand(Bsz, 1) if cache.start is None else (cache.length - cache.start)[:, None]
        if self.attn_backend == "auto" and x.is_cuda and _decode_kernel() is not None:
            from zoo_kernels.attention.decode import rope_one_token

            q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))  # (B, 1, H, Dh)
            k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
            if self.use_rope:  # one kernel each instead of the tables and the rotation (about 19 in all)
                inv_freq, pos = self.rope_inv_freq(x.device), position_ids.expand(Bsz, 1)  # the kernel reads [B, 1]
                q, k = rope_one_token(q, pos, inv_freq), rope_one_token(k, pos, inv_freq)
            v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
            cache.write(k, v)  # slot `length`, then length + 1: the kernel reads slots [length - window, length)
            length, start = cache.kernel_view()  # (a ring's slots, where the layer is one)
            o = _decode_kernel()(q, cache.keys, cache.values, length, self.window, start=start)
            return self.o_proj(o.flatten(-2))
        tables = self.rope_tables(position_ids)
        q = self.apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)), tables)  # (B, 1, H, Dh)
        k = self.apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), tables)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        k, v, keep = cache.append(k, v, window=self.window)  # (B, slots, Hkv, Dh), (B, slots)
        # the mask says which slots are visible (the window included); backends whose padded path syncs with
        # the host (varlen flash, flex) are replaced by auto, which takes a dense-mask kernel for this call
        backend = self.attn_backend if self.attn_backend in _DENSE_MASK_BACKENDS else "auto"
        o = attention(q, k, v, causal=False, key_padding_mask=keep, backend=backend)
        return self.o_proj(o.flatten(-2))


__all__ = ["Attention", "rotate_half"]
