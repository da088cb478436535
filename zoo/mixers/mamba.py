"""Mamba-1 mixer: in_proj -> causal conv -> SiLU -> selective scan (Δ, B, C from x_proj/dt_proj) -> gate -> out_proj."""

from __future__ import annotations

import math

import torch
from torch import nn
from zoo_kernels import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from zoo_kernels._env import env_flag
from zoo_kernels._grad import needs_grad
from zoo_kernels.selective_scan.cuda import MAX_STATE, backward_problem, smem_optin

from zoo import backends
from zoo.cache import RecurrentLayer
from zoo.layers import (
    PAD_DT,
    Linear,
    RMSNorm,
    channels_linear,
    channels_to_rows,
    check_norm_eps,
    decoded_constants,
    init_copy_,
    keep_rows_,
    last_columns,
    lay_out_past_pads,
    mark_no_weight_decay,
    refuse_skipped_adapter,
    rows_to_channels,
    scaled_width,
    step_pad_rows,
)
from zoo.registry import register_mixer


def _plain(*projections: nn.Module) -> bool:
    """Whether every projection is a plain nn.Linear or zoo's Linear, whose weight a kernel or batched matmul may
    use in its place: a PEFT/LoRA wrapper's adapter lives in its forward, which that would bypass."""
    return all(type(p) in (nn.Linear, Linear) for p in projections)


@register_mixer("mamba")
class Mamba(nn.Module):
    """The Mamba-1 block (Gu & Dao), S4D-real A init and log-uniform dt init.

    Args: d_model; d_state N (16); d_conv (4); expand (2): d_inner = expand·d_model; dt_rank ("auto" =
    ceil(d_model/16)); dt_min/dt_max/dt_init_floor: dt init range; conv_bias (True); bias (False, linear
    layers); inner_norms (False): Jamba's RMSNorms on dt (before dt_proj), B and C, with inner_norm_eps;
    scan_backend ("auto" | "cuda" | "ref").
    """

    lora_targets = ("in_proj", "x_proj", "dt_proj", "out_proj")
    output_projections = ("out_proj",)
    # no weight decay on the SSM parameters (mamba_ssm) nor on any bias (as mamba_ssm's and transformers' trainers)
    _no_weight_decay_params = ("A_log", "D", "dt_proj.bias", "conv1d.bias", "in_proj.bias", "out_proj.bias")
    # fp32 in a bf16 / fp16 model too, as mamba_ssm's Mamba makes them (ZooPreTrainedModel: transformers' keep-in-fp32)
    _keep_in_fp32_params = ("A_log", "D")
    # kernels take conv1d's weight (on some paths x_proj's and dt_proj's too) without calling the module, so
    # accelerate's offload hooks, which load a module's weights in its own forward, cannot serve it (from_pretrained)
    offloadable = False
    mitigation: dict | None = None  # inference-time state-collapse mitigation (zoo.state.apply_mitigation)
    state_probe = None  # callable(mixer, **tensors) set by zoo.state's recorder
    # a cache may keep the recurrent state in the model's dtype (ZooConfig.decode_state_dtype "model", mamba_ssm's
    # default): the fused step's register-rows kernel reads and writes it as it lies (fp32 math); every other step
    # path updates an fp32 copy and writes it back
    low_precision_state = True

    def __init__(self, d_model: int, layer_idx: int = 0, *, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True, bias: bool = False,
                 inner_norms: bool = False, inner_norm_eps: float = 1e-6, scan_backend: str = "auto"):
        super().__init__()
        self.check_spec(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                        dt_max=dt_max, dt_init_floor=dt_init_floor, dt_scale=dt_scale, inner_norm_eps=inner_norm_eps,
                        scan_backend=scan_backend)
        self.d_model, self.layer_idx = d_model, layer_idx
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = scaled_width(d_model, expand)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.scan_backend = scan_backend

        self.in_proj = Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=conv_bias)
        self.x_proj = Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, dtype=torch.float32))
        self.out_proj = Linear(self.d_inner, d_model, bias=bias)
        self.inner_norms = inner_norms
        if inner_norms:  # Jamba: the same names as transformers' JambaMambaMixer
            self.dt_layernorm = RMSNorm(self.dt_rank, inner_norm_eps)
            self.b_layernorm = RMSNorm(d_state, inner_norm_eps)
            self.c_layernorm = RMSNorm(d_state, inner_norm_eps)
        mark_no_weight_decay(self, *self._no_weight_decay_params)
        self.reset_parameters()

    @staticmethod
    def check_spec(d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                   dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                   inner_norm_eps: float = 1e-6, scan_backend: str = "auto", **_) -> None:
        backends.check_name("selective_scan", scan_backend)
        check_norm_eps(inner_norm_eps, "inner_norm_eps")
        if not (isinstance(d_state, int) and d_state >= 1):
            raise ValueError(f"d_state: must be a positive integer, got {d_state!r}")
        if not (isinstance(d_conv, int) and d_conv >= 1):
            raise ValueError(f"d_conv: must be a positive integer, got {d_conv!r}")
        for name, value in (("expand", expand), ("dt_min", dt_min), ("dt_max", dt_max),
                            ("dt_init_floor", dt_init_floor), ("dt_scale", dt_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: must be a number, got {value!r}")
        if not (dt_scale >= 0 and dt_init_floor >= 0):  # dt_proj's init std; the clamp of the initial dt
            raise ValueError(f"dt_scale / dt_init_floor: must be >= 0 (dt_proj's init is uniform in ±dt_scale / "
                             f"sqrt(dt_rank), the initial dt clamped at dt_init_floor), got {dt_scale}, "
                             f"{dt_init_floor}")
        if not (expand > 0 and scaled_width(d_model, expand) is not None):
            raise ValueError(f"expand: must be > 0 with expand·d_model an integer, got {expand!r}")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank >= 1):
            raise ValueError(f"dt_rank: must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max < math.inf:  # an infinite dt_max: the initial dt, and the logits, were NaN
            raise ValueError(f"dt_min/dt_max: need 0 < dt_min <= dt_max < inf, got {dt_min}, {dt_max}")

    def reset_parameters(self) -> None:
        # S4D-real: A[d, n] = -(n + 1), stored as log.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        init_copy_(self.A_log, torch.log(A))
        nn.init.ones_(self.D)
        dt_std = self.dt_rank ** -0.5 * self.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        init_copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            nn.init.zeros_(self.conv1d.bias)

    # ---- contract -----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, dtype: torch.dtype, device, max_len: int | None = None) -> RecurrentLayer:
        return RecurrentLayer()

    def state_size(self, seq_len: int) -> int:
        return self.d_inner * self.d_state + self.d_inner * (self.d_conv - 1)

    def recurrent_state_size(self, seq_len: int) -> int:
        """The floats of state_size in the recurrent (SSM) state, which decode_state_dtype "model" keeps in the
        model's dtype; the conv window's stay fp32."""
        return self.d_inner * self.d_state

    def backend_name(self) -> str:
        return self._scan_backend(backends.resolve("selective_scan", self.scan_backend, self.A_log.device),
                                  self.in_proj.weight.dtype)

    def _scan_backend(self, backend: str, dtype: torch.dtype, grad: bool = False) -> str:
        """The sequence scan's backend: `backend`, unless the CUDA scan cannot take this layer (d_state above its
        MAX_STATE = 64, activations in a dtype other than fp32/bf16/fp16, or with `grad` (a backward to come) d_state
        above 32 on a GPU whose blocks may not have the backward's 150 KB of shared memory: compute capability 8.6,
        8.9, 12.x): then the reference, with one warning under scan_backend "auto" (backends.fit). The decode step's
        kernels take any d_state and cast other dtypes."""
        problem = None
        if backend == "cuda":
            if self.d_state > MAX_STATE:
                problem = (f"d_state = {self.d_state} (at most {MAX_STATE}; set d_state <= {MAX_STATE} or "
                           f"scan_backend: ref)")
            elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
                problem = f"{dtype} activations (fp32, bf16 or fp16)"
            elif grad and (why := backward_problem(self.d_state, smem_optin(self.A_log.device))):
                problem = f"d_state = {self.d_state} with gradients on this GPU ({why}; or set scan_backend: ref)"
        return backends.fit("selective_scan", self.scan_backend, backend, problem)

    def _split_dbc(self, x_dbl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj output [..., dt_rank + 2N] -> (dt [..., d_inner] with bias, B [..., N], C [..., N])."""
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return self.dt_proj(dt), B, C

    def _decode_constants(self, refresh: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A = -exp(A_log), D, the conv weight [d_inner, d_conv] and bias in fp32: kept across decode steps while
        the parameters do not change (without autograd), so a step launches no kernel to recompute them (`refresh`:
        made again, at a prefill)."""
        return decoded_constants(self, "_step_constants", (self.A_log, self.D, self.conv1d.weight, self.conv1d.bias),
                                 lambda: (-torch.exp(self.A_log.float()), self.D.float(),
                                          self.conv1d.weight[:, 0, :].float().contiguous(),
                                          None if self.conv1d.bias is None else self.conv1d.bias.float()), refresh)

    def _folds_dt_proj(self) -> bool:
        """Whether the step may hand dt_proj's weight to the state-update kernel instead of calling dt_proj: only
        for plain projections (_plain) and without Jamba's norm between x_proj and dt_proj."""
        return not self.inner_norms and _plain(self.x_proj, self.dt_proj)

    def _dt_proj_constants(self, dtype: torch.dtype, refresh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """dt_proj's weight in the activations' dtype (the parameter itself unless autocast changed it), which the
        kernel reads like the matmul it replaces did, and its bias in fp32, kept across decode steps as in
        _decode_constants."""
        weight, bias = self.dt_proj.weight, self.dt_proj.bias
        return decoded_constants(self, f"_dt_constants_{dtype}", (weight, bias),
                                 lambda: (weight.to(dtype).contiguous(), bias.float()), refresh)

    def _x_proj_constants(self, dtype: torch.dtype, refresh: bool = False) -> torch.Tensor:
        """x_proj's weight in the activations' dtype, which the fused step reads, kept as in _decode_constants."""
        return decoded_constants(self, f"_x_proj_{dtype}", (self.x_proj.weight,),
                                 lambda: self.x_proj.weight.to(dtype).contiguous(), refresh)

    def _refresh_step_constants(self, x: torch.Tensor) -> None:
        """At a prefill, the step constants kept from an earlier sequence are made afresh into their tensors: a kept
        CUDA graph (generate(cuda_graph="reuse")) replays the steps without their Python, so only here do the
        tensors it reads follow weights changed since (an optimizer step, writes through .data), and a layer used
        outside ZooModel (no new_sequence) reads the weights written through .data since its last sequence. Constants
        no step has kept yet are left to the first step."""
        if torch.is_grad_enabled():
            return
        kind = x.device.type  # the step's activations' dtype (the unfused step keys dt_proj's by it on any device)
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if "_step_constants" in self.__dict__:
            self._decode_constants(refresh=True)
        if f"_dt_constants_{dtype}" in self.__dict__:
            self._dt_proj_constants(dtype, refresh=True)
        if f"_x_proj_{dtype}" in self.__dict__:
            self._x_proj_constants(dtype, refresh=True)

    def _may_fuse(self, t: torch.Tensor, backend: str) -> bool:
        """The fused step's conditions that do not depend on the shapes (the step checks them before in_proj, on its
        input, to prepare the kernel's constants): on CUDA, not turned off by ZOO_MAMBA_FUSED_STEP=0 (kept for
        side-by-side timing), with dt_proj foldable (_folds_dt_proj), without the state tools' hooks (they take the
        unfused step's tensors), and without autograd (the kernel has no backward; a step that needs gradients
        takes the unfused path's references)."""
        if not env_flag("ZOO_MAMBA_FUSED_STEP", True) or backend != "cuda" or not t.is_cuda:  # (a bad value raises)
            return False
        if self.mitigation or self.state_probe is not None:
            return False
        if needs_grad(t, self.conv1d.weight, self.x_proj.weight, self.dt_proj.weight, self.A_log, self.D):
            return False
        return self._folds_dt_proj()

    def _fused_step(self, xs: torch.Tensor, backend: str, state_dtype: torch.dtype = torch.float32) -> bool:
        """Whether the step may run the fused kernel (conv, x_proj, dt_proj, state update and gate in one launch,
        zoo_kernels.selective_scan.fused_step): _may_fuse on in_proj's output, and shapes the kernel takes."""
        if not self._may_fuse(xs, backend):
            return False
        from zoo_kernels.selective_scan import fused_step

        return fused_step.supported(xs, self.conv1d.weight, self.x_proj.weight, self.A_log, state_dtype)

    def _step(self, x: torch.Tensor, cache: RecurrentLayer, mask: torch.Tensor | None, backend: str,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One token [B, 1, d_model] from the cached conv and SSM states, which are updated in place (a CUDA
        graph replaying the step finds them at the same address). On CUDA: in_proj, then the fused step kernel
        where _fused_step allows (else the conv kernel, x_proj and the state-update kernel, dt_proj folded in where
        _folds_dt_proj allows, else a dt_proj matmul before it; its low-rank input, B, C and z read in place from
        the projections), then out_proj. tokens [B] (step_pad_rows): where a row's position is a pad, the step
        leaves its conv window and state as they are (Δ = PAD_DT, the window put back), as the sequence forward
        does; its output is the prefill's at a pad (u = 0, so B = C = 0: zero). Such a step takes the unfused path
        (the fused kernel zeroes a pad's x and u but still decays the state and shifts the window)."""
        A, D, w, conv_bias = self._decode_constants()
        # updated in place below, then set back. Taken before in_proj, as are the fused kernel's constants: that
        # kernel reads states and weights before it waits for the kernel launched just before it (in_proj), so a
        # copy or conversion of them (step_states, decoded_constants) must come earlier
        conv_state, state = cache.step_states()
        fused_constants = None
        if self._may_fuse(x, backend):
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            fused_constants = (dtype, *self._dt_proj_constants(dtype), self._x_proj_constants(dtype))
        xz = self.in_proj(x[:, 0])  # (B, 2·d_inner)
        xs, z = xz[:, :self.d_inner], xz[:, self.d_inner:]
        if tokens is None and fused_constants is not None and fused_constants[0] == xs.dtype \
                and self._fused_step(xs, backend, state.dtype):
            from zoo_kernels.selective_scan.fused_step import mamba_step

            _, dt_weight, dt_bias, x_proj_weight = fused_constants
            mask = None if mask is None else mask[:, 0].to(xs.dtype)  # (read after the kernel's wait)
            y = mamba_step(xs, z, conv_state, w, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D, state, mask)
            cache.set(conv_state, state)
            return self.out_proj(y[:, None, :].to(x.dtype))
        kept, state = state, state.float()  # a low-precision state (decode_state_dtype "model"): fp32 math, then back
        low = kept.dtype != torch.float32
        if mask is not None:
            xs = xs * mask[:, 0, None]
        saved = None if tokens is None else conv_state.clone()  # a pad's row keeps its window
        u = causal_conv1d_update(conv_state, xs, w, conv_bias, "silu", backend=backend)  # (B, d_inner)
        keep_rows_(conv_state, saved, tokens)
        if mask is not None:
            u = u * mask[:, 0, None]
        x_dbl = self.x_proj(u)  # (B, dt_rank + 2N)
        if self.mitigation or self.state_probe is not None:
            from zoo.state.mitigation import mamba_step

            delta, B, C = self._split_dbc(x_dbl)  # delta (B, d_inner), bias included
            if tokens is not None:  # a pad is no step (PAD_DT)
                delta = delta.masked_fill(~tokens[:, None], PAD_DT)
            state = state.clone()
            y = mamba_step(self, state, u, delta, A, B, C, z, cache, backend, tokens)
        elif tokens is not None:  # Δ with dt_proj's bias, PAD_DT at the pads
            delta, B, C = self._split_dbc(x_dbl)
            delta = delta.masked_fill(~tokens[:, None], PAD_DT)
            y = selective_state_update(state, u, delta, A, B, C, D, z, None, True, backend=backend)
        elif self._folds_dt_proj():
            dt_low, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
            weight, dt_bias = self._dt_proj_constants(x_dbl.dtype)
            y = selective_state_update(state, u, dt_low, A, B, C, D, z, dt_bias, True, weight, backend=backend)
        else:
            delta, B, C = self._split_dbc(x_dbl)
            y = selective_state_update(state, u, delta, A, B, C, D, z, None, True, backend=backend)
        if low:
            kept.copy_(state)
        cache.set(conv_state, kept if low else state)
        return self.out_proj(y[:, None, :].to(x.dtype))

    def forward(self, x: torch.Tensor, *, cache: RecurrentLayer | None = None, seq_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d_model] -> [B, T, d_model]. attention_mask [B, ≥T] (1 = token) zeroes pad inputs."""
        refuse_skipped_adapter(self, "conv1d")  # the conv kernels take conv1d.weight
        T = x.shape[1]
        mask = None if attention_mask is None else last_columns(attention_mask, T).to(x.dtype)
        backend = backends.resolve("selective_scan", self.scan_backend, x.device)
        if cache is not None and cache.has_state and T == 1 and seq_idx is None:
            return self._step(x, cache, mask, backend, step_pad_rows(attention_mask))
        if cache is not None:
            self._refresh_step_constants(x)
        grad = self.d_state > 32 and needs_grad(x, *self.parameters())  # (only N > 32 asks: the backward's smem)
        backend = self._scan_backend(backend, x.dtype, grad)  # the sequence scan's limits (the step's have none)
        if self._channels_first():
            return self._forward_channels_first(x, cache, seq_idx, mask, backend)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_inner) each
        if mask is not None:
            xs = xs * mask[..., None]
        xs, z = xs.transpose(1, 2), z.transpose(1, 2)  # (B, d_inner, T)
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        u, conv_final, ssm_init = self._conv(xs, cache, seq_idx, mask)
        x_dbl = self.x_proj(u.transpose(1, 2))  # (B, T, dt_rank + 2N)
        delta, B, C = self._split_dbc(x_dbl)
        delta = delta.transpose(1, 2)  # (B, d_inner, T), bias included
        if mask is not None:  # a pad is no step (PAD_DT)
            delta = delta.masked_fill(mask[:, None, :] == 0, PAD_DT)
        if self.mitigation or self.state_probe is not None:
            from zoo.state.mitigation import mamba_scan

            out = mamba_scan(self, u, delta, A, B.transpose(1, 2), C.transpose(1, 2), z, ssm_init, seq_idx, cache,
                             backend, mask)
        else:
            out = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z, None, True,
                                 ssm_init, seq_idx, cache is not None, backend=backend)
        y = self._store(out, cache, conv_final)
        return self.out_proj(y.transpose(1, 2))

    def _conv(self, xs, cache, seq_idx, mask):
        """The causal conv + SiLU over xs [B, d_inner, T] from the cache's conv state: (u, the conv's final state,
        the cached SSM state or None). With a mask, each token's window skips the pads (lay_out_past_pads)."""
        conv_init, ssm_init = cache.initial_states(seq_idx) if cache is not None else (None, None)
        if mask is None:
            u, conv_final = causal_conv1d(xs, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx, conv_init,
                                          "silu", True, backend=backends.follow(self.scan_backend))
            return u, conv_final, ssm_init
        laid, laid_ids, back, carry = lay_out_past_pads(xs, mask, conv_init, self.d_conv, seq_idx)
        u, conv_final = causal_conv1d(laid, self.conv1d.weight[:, 0, :], self.conv1d.bias, laid_ids, None, "silu",
                                      True, backend=backends.follow(self.scan_backend))
        if carry is not None:
            conv_final = conv_final * carry[:, None, None]
        return u.gather(2, back[:, None].expand_as(xs)) * mask[:, None, :], conv_final, ssm_init

    @staticmethod
    def _store(out, cache, conv_final):
        """The scan's output y; with a cache, its final state and the conv's are stored in it."""
        if cache is None:
            return out
        y, final = out
        cache.set(conv_final, final)
        return y

    def _channels_first(self) -> bool:
        """Whether the sequence forward may compute its projections channels-first (_forward_channels_first): for
        plain in_proj, x_proj and dt_proj (_plain) and without the state tools' hooks, which take the row-major
        path's tensors."""
        return _plain(self.in_proj, self.x_proj, self.dt_proj) and not self.mitigation and self.state_probe is None

    def _forward_channels_first(self, x, cache, seq_idx, mask, backend):
        """The sequence forward with every tensor of the conv and the scan made channels-first [B, C, T] by its
        projection (as mamba_ssm computes it), so that no transposing copy runs either way: in_proj's two halves
        x and z, x_proj's Δ/B/C and dt_proj's Δ (its bias goes to the scan as delta_bias, added in fp32 there),
        and out_proj reads y channels-first and hands its gradient back so. Same results as the row-major path
        (tests/test_mixers.py)."""
        xs, z = rows_to_channels(x, self.in_proj, 2)  # (B, d_inner, T) each
        if mask is not None:
            xs = xs * mask[:, None, :]
        A = -torch.exp(self.A_log.float())
        u, conv_final, ssm_init = self._conv(xs, cache, seq_idx, mask)
        x_dbl = channels_linear(u, self.x_proj.weight)  # (B, dt_rank + 2N, T)
        if self.x_proj.bias is not None:
            x_dbl = x_dbl + self.x_proj.bias.to(x_dbl.dtype)[:, None]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        if self.inner_norms:  # over the channels: the norms see rows (small tensors)
            dt, B, C = (norm(t.transpose(1, 2)).transpose(1, 2) for norm, t in
                        ((self.dt_layernorm, dt), (self.b_layernorm, B), (self.c_layernorm, C)))
        delta = channels_linear(dt, self.dt_proj.weight)  # (B, d_inner, T), bias in the scan
        if mask is not None:  # a pad is no step (PAD_DT)
            delta = delta.masked_fill(mask[:, None, :] == 0, PAD_DT)
        out = selective_scan(u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True, ssm_init,
                             seq_idx, cache is not None, backend=backend)
        y = self._store(out, cache, conv_final)
        if _plain(self.out_proj):
            return channels_to_rows(y, self.out_proj)
        return self.out_proj(y.transpose(1, 2))


__all__ = ["Mamba"]
