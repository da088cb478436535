"""Mamba-2 mixer: in_proj -> (z, xBC, dt); causal conv on xBC -> SiLU -> SSD scan -> gated RMSNorm -> out_proj."""

from __future__ import annotations

import math

import torch
from torch import nn
from zoo_kernels import causal_conv1d, causal_conv1d_update, ssd_chunk_scan, ssd_state_update
from zoo_kernels.ssd import MIN_CHUNK_SIZE

from zoo import backends
from zoo.cache import RecurrentLayer
from zoo.layers import (
    PAD_DT,
    GatedRMSNorm,
    Linear,
    check_norm_eps,
    decoded_constants,
    init_copy_,
    keep_rows_,
    last_columns,
    lay_out_past_pads,
    mark_no_weight_decay,
    refuse_skipped_adapter,
    scaled_width,
    step_pad_rows,
)
from zoo.registry import register_mixer


@register_mixer("mamba2")
class Mamba2(nn.Module):
    """The Mamba-2 block (Dao & Gu): multi-head SSM with a scalar decay per head and grouped B/C.

    Args: d_model; d_state N (128); d_conv (4); expand (2); head_dim P (64): n_heads = expand·d_model / P;
    n_groups G of B/C (1); A_init_range ((1, 16)); dt_min/dt_max/dt_init_floor; chunk_size (256);
    conv_bias (True); bias (False); norm_groups: groups of the gated RMSNorm (None: n_groups, as mamba_ssm and
    transformers' Mamba2 since 5.2x; 1: one group over d_inner, as transformers' Mamba2 before:
    zoo.convert.hf_mamba2_norm_groups tells the installed one's); scan_backend ("auto" | "triton" | "ref").
    """

    lora_targets = ("in_proj", "out_proj")
    output_projections = ("out_proj",)
    # no weight decay on the SSM parameters (mamba_ssm) nor on any bias (as mamba_ssm's and transformers' trainers)
    _no_weight_decay_params = ("dt_bias", "A_log", "D", "conv1d.bias", "in_proj.bias", "out_proj.bias")
    # fp32 in a bf16 / fp16 model too, as mamba_ssm's Mamba2 makes it; its A_log and dt_bias take the model's dtype
    # there (ZooPreTrainedModel: transformers' keep-in-fp32)
    _keep_in_fp32_params = ("D",)
    # kernels take conv1d's weight without calling the module, so accelerate's offload hooks, which load a module's
    # weights in its own forward, cannot serve it (from_pretrained)
    offloadable = False
    mitigation: dict | None = None  # inference-time state-collapse mitigation (zoo.state.apply_mitigation)
    state_probe = None  # callable(mixer, **tensors) set by zoo.state's recorder

    def __init__(self, d_model: int, layer_idx: int = 0, *, d_state: int = 128, d_conv: int = 4, expand: float = 2,
                 head_dim: int = 64, n_groups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, chunk_size: int = 256,
                 conv_bias: bool = True, bias: bool = False, norm_eps: float = 1e-5, norm_groups: int | None = None,
                 scan_backend: str = "auto"):
        super().__init__()
        self.check_spec(d_model, d_state=d_state, d_conv=d_conv, expand=expand, head_dim=head_dim,
                        n_groups=n_groups, A_init_range=A_init_range, dt_min=dt_min, dt_max=dt_max,
                        dt_init_floor=dt_init_floor, chunk_size=chunk_size, norm_eps=norm_eps, norm_groups=norm_groups,
                        scan_backend=scan_backend)
        self.d_model, self.layer_idx = d_model, layer_idx
        self.d_state, self.d_conv, self.head_dim, self.n_groups = d_state, d_conv, head_dim, n_groups
        self.d_inner = scaled_width(d_model, expand)
        self.n_heads = self.d_inner // head_dim
        self.chunk_size, self.scan_backend = chunk_size, scan_backend
        self.A_init_range, self.dt_min, self.dt_max, self.dt_init_floor = A_init_range, dt_min, dt_max, dt_init_floor
        self.conv_dim = self.d_inner + 2 * n_groups * d_state

        self.in_proj = Linear(d_model, 2 * self.d_inner + 2 * n_groups * d_state + self.n_heads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps, group_size=self.d_inner // (norm_groups or n_groups))
        self.out_proj = Linear(self.d_inner, d_model, bias=bias)
        mark_no_weight_decay(self, *self._no_weight_decay_params)
        self.reset_parameters()

    @staticmethod
    def check_spec(d_model: int, *, d_state: int = 128, d_conv: int = 4, expand: float = 2, head_dim: int = 64,
                   n_groups: int = 1, A_init_range=(1.0, 16.0), dt_min: float = 0.001, dt_max: float = 0.1,
                   dt_init_floor: float = 1e-4, chunk_size: int = 256, norm_eps: float = 1e-5,
                   norm_groups: int | None = None, scan_backend: str = "auto", **_) -> None:
        backends.check_name("ssd", scan_backend)
        check_norm_eps(norm_eps)
        if isinstance(expand, bool) or not isinstance(expand, (int, float)):
            raise ValueError(f"expand: must be a number, got {expand!r}")
        d_inner = scaled_width(d_model, expand) if expand > 0 else None
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("head_dim", head_dim),
                            ("n_groups", n_groups), ("chunk_size", chunk_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if d_inner is None:
            raise ValueError(f"expand: must be > 0 with expand·d_model an integer, got {expand!r}")
        if int(d_inner) % head_dim:
            raise ValueError(f"head_dim: {head_dim} does not divide expand·d_model = {int(d_inner)}; "
                             f"choose a head_dim that divides it")
        n_heads = int(d_inner) // head_dim
        if n_heads % n_groups:
            raise ValueError(f"n_groups: {n_groups} does not divide n_heads = {n_heads}")
        if norm_groups is not None and not (isinstance(norm_groups, int) and norm_groups >= 1
                                            and int(d_inner) % norm_groups == 0):
            raise ValueError(f"norm_groups: must be a positive integer dividing expand·d_model = {int(d_inner)}, "
                             f"got {norm_groups!r}")
        # A = -exp(A_log) with A_log = log(uniform(A_init_range)): a bound <= 0 gives NaN or -inf parameters
        if not (isinstance(A_init_range, (list, tuple)) and len(A_init_range) == 2
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in A_init_range)
                and 0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"A_init_range: must be two numbers [low, high] with 0 < low <= high (A is drawn "
                             f"uniformly in it, its log stored), got {A_init_range!r}")
        for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: must be a number, got {value!r}")
        if not dt_init_floor >= 0:  # the clamp of the initial dt (as Mamba's check_spec refuses it)
            raise ValueError(f"dt_init_floor: must be >= 0 (the initial dt is clamped at it), got {dt_init_floor}")
        if not 0 < dt_min <= dt_max < math.inf:  # an infinite dt_max: the initial dt, and the logits, were NaN
            raise ValueError(f"dt_min/dt_max: need 0 < dt_min <= dt_max < inf, got {dt_min}, {dt_max}")
        if d_state > 256:
            raise ValueError(f"d_state: at most 256 is supported, got {d_state}")

    def reset_parameters(self) -> None:
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        init_copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        lo, hi = self.A_init_range
        init_copy_(self.A_log, torch.log(torch.empty(self.n_heads).uniform_(lo, hi)))
        nn.init.ones_(self.D)
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            nn.init.zeros_(self.conv1d.bias)

    # ---- contract -----------------------------------------------------------------------------------------
    # the step kernel reads and writes the state in its own dtype (fp32 math): a cache may keep it in the model's
    # dtype (ZooConfig.decode_state_dtype = "model")
    low_precision_state = True

    def init_state(self, batch_size: int, dtype: torch.dtype, device, max_len: int | None = None) -> RecurrentLayer:
        return RecurrentLayer()

    def state_size(self, seq_len: int) -> int:
        return self.n_heads * self.head_dim * self.d_state + self.conv_dim * (self.d_conv - 1)

    def recurrent_state_size(self, seq_len: int) -> int:
        """The floats of state_size in the recurrent (SSM) state, which decode_state_dtype "model" keeps in the
        model's dtype; the conv window's stay fp32."""
        return self.n_heads * self.head_dim * self.d_state

    def backend_name(self) -> str:
        return self._chunk_backend(backends.resolve("ssd", self.scan_backend, self.A_log.device))

    def _chunk_backend(self, backend: str) -> str:
        """The chunked scan's backend: `backend`, unless the Triton scan cannot take this layer's chunk_size (below
        MIN_CHUNK_SIZE = 16): then the reference, with one warning under scan_backend "auto" (backends.fit). The
        decode step's kernel does not depend on chunk_size."""
        problem = None
        if backend == "triton" and self.chunk_size < MIN_CHUNK_SIZE:
            problem = (f"chunk_size = {self.chunk_size} (at least {MIN_CHUNK_SIZE}; set chunk_size >= "
                       f"{MIN_CHUNK_SIZE} or scan_backend: ref)")
        return backends.fit("ssd", self.scan_backend, backend, problem)

    def _decode_constants(self, refresh: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The conv weight [conv_dim, d_conv] and bias, D and dt_bias in fp32, kept across decode steps while the
        parameters do not change (decoded_constants; `refresh`: made again, at a prefill)."""
        return decoded_constants(
            self, "_step_constants", (self.conv1d.weight, self.conv1d.bias, self.D, self.dt_bias),
            lambda: (self.conv1d.weight[:, 0, :].float().contiguous(),
                     None if self.conv1d.bias is None else self.conv1d.bias.float(), self.D.float(),
                     self.dt_bias.float()), refresh)

    def forward(self, x: torch.Tensor, *, cache: RecurrentLayer | None = None, seq_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d_model] -> [B, T, d_model]."""
        refuse_skipped_adapter(self, "conv1d")  # the conv kernels take conv1d.weight
        Bsz, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        mask = None if attention_mask is None else last_columns(attention_mask, T).to(x.dtype)
        z, xBC, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, H], dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None]
        w = self.conv1d.weight[:, 0, :]  # (conv_dim, d_conv)
        step = cache is not None and cache.has_state and T == 1 and seq_idx is None
        # kept for decoding only, and made again at each prefill or chunk (refresh): a layer used outside ZooModel
        # (no new_sequence) otherwise kept an A_log written through .data (an EMA copy) stale
        A = -torch.exp(self.A_log.float()) if cache is None else \
            decoded_constants(self, "_A", (self.A_log,), lambda: -torch.exp(self.A_log.float()), not step)  # (H,)
        backend = backends.resolve("ssd", self.scan_backend, x.device)
        conv_backend = backends.follow(self.scan_backend)  # scan_backend ref keeps the conv on the reference too

        if step:
            conv_state, state = cache.step_states()  # updated in place below, then set back
            # a pad's row (step_pad_rows) keeps its conv window and state (dt = PAD_DT), as in the sequence forward;
            # its output is the prefill's at a pad (xBC = 0: D·x and C·h are 0)
            tokens = step_pad_rows(attention_mask)
            saved = None if tokens is None else conv_state.clone()
            w32, b32, D32, bias32 = self._decode_constants()
            xBC = causal_conv1d_update(conv_state, xBC[:, 0], w32, b32, "silu", backend=conv_backend)  # (B, conv_dim)
            keep_rows_(conv_state, saved, tokens)
            if tokens is not None:
                dt = dt.masked_fill(~tokens[:, None, None], PAD_DT)
            if mask is not None:
                xBC = xBC * mask[:, 0, None]
            xs, B, C = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
            if self.mitigation or self.state_probe is not None:
                from zoo.state.mitigation import mamba2_step

                state = state.clone()
                y = mamba2_step(self, state, xs.view(Bsz, H, P), dt[:, 0], A, B.view(Bsz, G, N), C.view(Bsz, G, N),
                                cache, backend, tokens)
            else:
                y = ssd_state_update(state, xs.view(Bsz, H, P), dt[:, 0], A, B.view(Bsz, G, N), C.view(Bsz, G, N),
                                     D32, None, bias32, True, backend=backend)
            cache.set(conv_state, state)
            y = y.reshape(Bsz, 1, self.d_inner).to(x.dtype)
        else:
            if cache is not None and "_step_constants" in self.__dict__ and not torch.is_grad_enabled():
                # a prefill: the step constants an earlier sequence kept are made afresh into their tensors, which a
                # kept CUDA graph (generate(cuda_graph="reuse")) reads in steps that run no Python (A is made above)
                self._decode_constants(refresh=True)
            conv_init, ssm_init = cache.initial_states(seq_idx) if cache is not None else (None, None)
            if mask is None:
                xBC, conv_final = causal_conv1d(xBC.transpose(1, 2), w, self.conv1d.bias, seq_idx, conv_init, "silu",
                                                True, backend=conv_backend)
                xBC = xBC.transpose(1, 2)  # (B, T, conv_dim)
            else:  # each token's window skips the pads (lay_out_past_pads), and a pad is no step of the scan (PAD_DT)
                laid, laid_ids, back, carry = lay_out_past_pads(xBC.transpose(1, 2), mask, conv_init, self.d_conv,
                                                                seq_idx)
                out, conv_final = causal_conv1d(laid, w, self.conv1d.bias, laid_ids, None, "silu", True,
                                                backend=conv_backend)
                if carry is not None:
                    conv_final = conv_final * carry[:, None, None]
                xBC = out.gather(2, back[:, None].expand(Bsz, self.conv_dim, T)).transpose(1, 2) * mask[..., None]
                dt = dt.masked_fill(mask[..., None] == 0, PAD_DT)
            xs, B, C = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
            backend = self._chunk_backend(backend)
            if self.mitigation or self.state_probe is not None:
                from zoo.state.mitigation import mamba2_scan

                out = mamba2_scan(self, xs.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)),
                                  C.unflatten(-1, (G, N)), ssm_init, seq_idx, cache, backend, mask)
            else:
                out = ssd_chunk_scan(xs.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)),
                                     self.chunk_size, self.D.float(), None, self.dt_bias.float(), True, ssm_init,
                                     seq_idx, cache is not None, backend=backend)
            if cache is not None:
                y, final = out
                cache.set(conv_final, final)
            else:
                y = out
            y = y.flatten(-2)  # (B, T, d_inner)
        return self.out_proj(self.norm(y, z))


__all__ = ["Mamba2"]
