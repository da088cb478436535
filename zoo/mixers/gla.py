"""Gated linear attention mixer (Yang et al. 2024): per-key data-dependent decay, output gate and norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from zoo_kernels import chunk_gla, gla_state_update

from zoo import backends
from zoo.cache import RecurrentLayer
from zoo.layers import (
    GatedRMSNorm,
    Linear,
    check_norm_eps,
    last_columns,
    mark_no_weight_decay,
    scaled_width,
    step_pad_rows,
)
from zoo.registry import register_mixer


@register_mixer("gla")
class GLA(nn.Module):
    """S_t = diag(α_t) S_{t-1} + k_tᵀ v_t, o_t = q_t S_t / sqrt(d_k); α_t = exp(logsigmoid(gk(x_t)) / normalizer).

    Args: d_model; n_heads (4); expand_k (0.5), expand_v (1): key/value widths relative to d_model;
    gate_low_rank_dim (16); gate_logit_normalizer (16); chunk_size (64); norm_eps; scan_backend
    ("auto" | "fla" | "ref"; the decode step runs zoo's Triton kernel on CUDA unless "ref").
    """

    lora_targets = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")
    output_projections = ("o_proj",)
    _no_weight_decay_params = ("gk_proj.1.bias",)  # biases are not decayed (mamba_ssm's, transformers' trainers)
    mitigation: dict | None = None  # inference-time state-collapse mitigation (zoo.state.apply_mitigation)
    state_probe = None  # callable(mixer, **tensors) set by zoo.state's recorder

    def __init__(self, d_model: int, layer_idx: int = 0, *, n_heads: int = 4, expand_k: float = 0.5,
                 expand_v: float = 1.0, gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0,
                 chunk_size: int = 64, norm_eps: float = 1e-5, scan_backend: str = "auto"):
        super().__init__()
        self.check_spec(d_model, n_heads=n_heads, expand_k=expand_k, expand_v=expand_v,
                        gate_low_rank_dim=gate_low_rank_dim, gate_logit_normalizer=gate_logit_normalizer,
                        chunk_size=chunk_size, norm_eps=norm_eps, scan_backend=scan_backend)
        self.d_model, self.layer_idx, self.n_heads = d_model, layer_idx, n_heads
        self.key_dim, self.value_dim = scaled_width(d_model, expand_k), scaled_width(d_model, expand_v)
        self.head_k, self.head_v = self.key_dim // n_heads, self.value_dim // n_heads
        self.gate_logit_normalizer, self.chunk_size, self.scan_backend = gate_logit_normalizer, chunk_size, scan_backend

        self.q_proj = Linear(d_model, self.key_dim, bias=False)
        self.k_proj = Linear(d_model, self.key_dim, bias=False)
        self.v_proj = Linear(d_model, self.value_dim, bias=False)
        self.g_proj = Linear(d_model, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(Linear(d_model, gate_low_rank_dim, bias=False),
                                     Linear(gate_low_rank_dim, self.key_dim, bias=True))
        self.g_norm = GatedRMSNorm(self.head_v, eps=norm_eps, norm_before_gate=True)
        self.o_proj = Linear(self.value_dim, d_model, bias=False)
        mark_no_weight_decay(self, *self._no_weight_decay_params)

    @staticmethod
    def check_spec(d_model: int, *, n_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0,
                   gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, chunk_size: int = 64,
                   norm_eps: float = 1e-5, scan_backend: str = "auto", **_) -> None:
        backends.check_name("gla", scan_backend)
        check_norm_eps(norm_eps)
        for name, value in (("n_heads", n_heads), ("chunk_size", chunk_size)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name, e in (("expand_k", expand_k), ("expand_v", expand_v)):
            if isinstance(e, bool) or not isinstance(e, (int, float)):
                raise ValueError(f"{name}: must be a number, got {e!r}")
            width = scaled_width(d_model, e) if e > 0 else None
            if width is None or width % n_heads:
                raise ValueError(f"{name}: d_model·{name} = {d_model * e:g} must be a positive integer divisible by "
                                 f"n_heads = {n_heads}")
        if not (isinstance(gate_low_rank_dim, int) and gate_low_rank_dim >= 1):
            raise ValueError(f"gate_low_rank_dim: must be a positive integer, got {gate_low_rank_dim!r}")
        # the log decay is logsigmoid / normalizer: 0 divides by zero (NaN outputs), a negative one makes it grow
        if isinstance(gate_logit_normalizer, bool) or not isinstance(gate_logit_normalizer, (int, float)) \
                or not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer: must be > 0, got {gate_logit_normalizer!r}")

    # ---- contract -----------------------------------------------------------------------------------------
    # the step kernel reads and writes the state in its own dtype (fp32 math): a cache may keep it in the model's
    # dtype (ZooConfig.decode_state_dtype = "model")
    low_precision_state = True

    def init_state(self, batch_size: int, dtype: torch.dtype, device, max_len: int | None = None) -> RecurrentLayer:
        return RecurrentLayer()

    def state_size(self, seq_len: int) -> int:
        return self.n_heads * self.head_k * self.head_v

    def recurrent_state_size(self, seq_len: int) -> int:
        """The floats of state_size that decode_state_dtype "model" keeps in the model's dtype: all (no conv)."""
        return self.state_size(seq_len)

    def backend_name(self) -> str:
        return backends.resolve("gla", self.scan_backend, self.o_proj.weight.device)

    def forward(self, x: torch.Tensor, *, cache: RecurrentLayer | None = None, seq_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d_model] -> [B, T, d_model]."""
        Bsz, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x).unflatten(-1, (H, self.head_k))  # (B, T, H, K)
        k = self.k_proj(x).unflatten(-1, (H, self.head_k))
        v = self.v_proj(x).unflatten(-1, (H, self.head_v))  # (B, T, H, V)
        gk = (F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer).unflatten(-1, (H, self.head_k))
        mask = last_columns(attention_mask, T)
        if mask is not None:  # a pad adds nothing to the state (k = 0) and keeps it (log decay 0)
            k = k * mask[..., None, None].to(k.dtype)
            gk = gk * mask[..., None, None].to(gk.dtype)
        initial = cache.initial_states(seq_idx)[1] if cache is not None else None
        if cache is not None and initial is not None and T == 1 and seq_idx is None:
            if self.mitigation or self.state_probe is not None:
                from zoo.state.mitigation import gla_step

                # the step's state in the cache's state_dtype (step_states), as the unmitigated step's: the prefill's
                # fp32 state kept as it was stayed fp32 under decode_state_dtype "model"
                state = cache.step_states()[1].clone()
                # a pad's row (step_pad_rows: k and log decay 0 above) is no step of the window, c_α or the cap
                o = gla_step(self, state, q[:, 0], k[:, 0], v[:, 0], gk[:, 0], self.head_k ** -0.5, cache,
                             step_pad_rows(attention_mask))[:, None]
            else:  # in place (RecurrentLayer.step_states): a CUDA graph replay finds the state at the same address
                # (a pad's k and log decay are 0 above: the step keeps its row's state, as the sequence scan does)
                state = cache.step_states()[1]
                # scan_backend "ref" keeps the step on the reference too (auto takes the Triton step kernel on CUDA)
                o = gla_state_update(state, q[:, 0], k[:, 0], v[:, 0], gk[:, 0], self.head_k ** -0.5,
                                     backend=backends.follow(self.scan_backend))[:, None]
            cache.set(recurrent_state=state)
        else:
            backend = backends.resolve("gla", self.scan_backend, x.device)
            if self.mitigation or self.state_probe is not None:
                from zoo.state.mitigation import gla_scan

                out = gla_scan(self, q, k, v, gk, self.head_k ** -0.5, initial, seq_idx, cache, backend, mask)
            else:
                out = chunk_gla(q, k, v, gk, self.head_k ** -0.5, initial, seq_idx, cache is not None,
                                self.chunk_size, backend=backend)
            if cache is not None:
                o, final = out
                cache.set(recurrent_state=final)
            else:
                o = out
        g = self.g_proj(x).unflatten(-1, (H, self.head_v))
        o = self.g_norm(o.to(x.dtype), g)  # rmsnorm(o) * silu(g), per head
        return self.o_proj(o.flatten(-2))


__all__ = ["GLA"]
