"""Shared layers: RMSNorm, gated RMSNorm, SwiGLU MLP, Jamba-style MoE, and the pre-norm residual Block."""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from zoo_kernels._env import env_flag, env_int, read_at_import
from zoo_kernels.pdl_linear import MAX_ROWS as PDL_KERNEL_ROWS


def init_copy_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy an init value into a parameter unless transformers already loaded it from a checkpoint."""
    if getattr(param, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        param.copy_(value)


def mark_no_weight_decay(module: nn.Module, *names: str) -> None:
    """Flag parameters that the optimizer builder must not decay (metadata lives on the parameter).

    Modules list such names in `_no_weight_decay_params` too, so that the flags are set again on the new
    Parameter objects that checkpoint loading creates (see ZooPreTrainedModel.mark_no_weight_decay).
    """
    for name in names:
        try:
            module.get_parameter(name)._no_weight_decay = True
        except AttributeError:
            pass  # an optional parameter (a bias that is off)


def no_weight_decay_ids(model: nn.Module) -> set[int]:
    """The ids of `model`'s parameters that no optimizer group of zoo's decays: those flagged `_no_weight_decay`, and
    the trained copies PEFT's modules_to_save makes of them (ModulesToSaveWrapper: `original_module` keeps the
    flags, while its copies in `modules_to_save` are deep copies, whose new Parameters lost them)."""
    flagged = {id(p) for p in model.parameters() if getattr(p, "_no_weight_decay", False)}
    for wrapper in model.modules():
        original, copies = getattr(wrapper, "original_module", None), getattr(wrapper, "modules_to_save", None)
        if not isinstance(original, nn.Module) or not isinstance(copies, nn.ModuleDict):
            continue
        names = [name for name, p in original.named_parameters() if getattr(p, "_no_weight_decay", False)]
        for copy in copies.values():
            for name in names:
                try:
                    flagged.add(id(copy.get_parameter(name)))
                except AttributeError:
                    pass  # (a copy without it)
    return flagged


def mark_saved_copies(model: nn.Module) -> None:
    """Flag `_no_weight_decay` on the modules_to_save copies of flagged parameters (see `no_weight_decay_ids`), so
    that an optimizer built from the flags alone leaves them undecayed too."""
    flagged = no_weight_decay_ids(model)
    for p in model.parameters():
        if id(p) in flagged:
            p._no_weight_decay = True


# counts the sequences begun (new_sequence): decoded constants kept from an earlier one are refreshed
_SEQUENCES = [0]


def new_sequence() -> None:
    """Mark the start of a sequence (a forward with nothing cached, a call of generate): `decoded_constants` kept from
    before are made afresh at their next use. A change through `.data` (PEFT's merge_and_unload, an EMA copy of the
    weights) keeps a parameter's storage and version, so between sequences only this tells the kept constants they
    are old."""
    _SEQUENCES[0] += 1


def decoded_constants(module: nn.Module, key: str, params: tuple, make, refresh: bool = False):
    """``make()`` (tensors derived from ``params``, e.g. fp32 copies), kept on ``module`` while none of the
    parameters changes (same storage, same version) and autograd is off, within a sequence (`new_sequence`): a
    decode step then launches no kernel to recompute them. `refresh` (a prefill or chunk, which runs before the steps
    that read them) makes them again whatever those checks say: a write through .data (an EMA copy, PEFT's merge) and
    a fused optimizer step (fused=True Adam / AdamW) keep a parameter's storage and version, and a mixer used outside
    ZooModel has no `new_sequence`. When they are made again, the new values are written into the kept tensors where
    shapes and dtypes allow: a kept CUDA graph (generate(cuda_graph="reuse")) reads them there, and an optimizer step
    between two calls keeps its graph. With autograd on it is computed afresh (the result must stay in the graph), and
    so it is when traced by torch.compile (a few fused ops in the compiled graph; the storage checks below would break
    it in pieces)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return make()
    # (a parameter made under inference_mode, a model built there, tracks no version: its in-place changes are seen
    # at the next sequence or prefill, as those through .data are)
    stamp = tuple((p.data_ptr(), None if p.is_inference() else p._version, p.device) for p in params if p is not None)
    cached = module.__dict__.get(key)
    if not refresh and cached is not None and cached[0] == stamp and cached[2] == _SEQUENCES[0]:
        return cached[1]
    fresh = make()
    if cached is not None and _write_into(cached[1], fresh, cached[3]):
        fresh = cached[1]
    storages = {p.untyped_storage().data_ptr() for p in params if p is not None}
    own = tuple(t is not None and t.untyped_storage().data_ptr() not in storages for t in _items(fresh))
    module.__dict__[key] = (stamp, fresh, _SEQUENCES[0], own)
    return fresh


def _items(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _write_into(kept, fresh, own: tuple[bool, ...]) -> bool:
    """Copy `fresh` into the tensors of `kept` (decoded_constants' earlier values), all or none: False when one
    cannot take it (another shape, dtype or device; a tensor made under inference_mode, outside it; or a kept
    tensor that is a parameter itself, `own` False, whose fresh value is not that same parameter)."""
    kept, fresh = _items(kept), _items(fresh)
    if len(kept) != len(fresh):
        return False
    pairs = []
    for k, v, mine in zip(kept, fresh, own):
        if k is None or v is None:
            if k is not v:
                return False
        elif not mine:  # a parameter itself (no copy was made): fine while it still is the fresh value
            if k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr() or k.shape != v.shape:
                return False
        elif (k.shape, k.dtype, k.device) != (v.shape, v.dtype, v.device) or \
                (k.is_inference() and not torch.is_inference_mode_enabled()):
            return False
        elif k.data_ptr() != v.data_ptr():
            pairs.append((k, v))
    for k, v in pairs:
        k.copy_(v)
    return True


def refuse_skipped_adapter(owner: nn.Module, name: str) -> None:
    """Raise when PEFT put an active, unmerged adapter on ``owner.<name>`` (LoRA's target_modules, or
    target_parameters), a module whose weight `owner`'s kernels read without calling it: the adapter would be skipped
    without a word (no effect on the output, no gradient, and merge_and_unload would then change the logits).
    modules_to_save is fine: its wrapper hands out the trained copy's weight, the active adapter's, which is why a
    mixed-adapter batch (PEFT's adapter_names) whose rows ask for other copies (another adapter's, or ``__base__``'s
    original) raises too: every row got the active adapter's weight, without a word."""
    layer = getattr(owner, name)
    _refuse_mixed_rows(owner, name, layer)
    if not hasattr(layer, "get_base_layer") or getattr(layer, "disable_adapters", False) or \
            getattr(layer, "merged", False):
        return
    raise ValueError(f"{name}: a PEFT adapter ({type(layer).__name__}) is on {type(owner).__name__}.{name}, but the "
                     f"{type(owner).__name__} kernels read {name}.weight without calling {name}, so the adapter would "
                     f"be skipped. Leave {name} out of target_modules / target_parameters; to train it, list it in "
                     f"modules_to_save instead (its trained copy's weight is read)")


class MixedAdapterBatchError(ValueError):
    """A PEFT mixed-adapter batch (adapter_names) that a zoo kernel cannot serve row by row."""


def _is_adapter_names_hook(hook) -> bool:
    """Whether a forward pre-hook is the one PEFT puts on each of its layers for a mixed-adapter batch."""
    return getattr(getattr(hook, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook"


def _mixed_batch_adapters(layer: nn.Module) -> list[str] | None:
    """The adapter_names of the PEFT mixed-adapter batch running now (PEFT hooks them onto each of its layers' forward
    for the call), or None."""
    for hook in getattr(layer, "_forward_pre_hooks", {}).values():
        if _is_adapter_names_hook(hook):
            return list(hook.keywords.get("adapter_names") or [])
    return None


def drop_adapter_names_hooks(model: nn.Module) -> None:
    """Remove the hooks PEFT put on `model`'s layers for a mixed-adapter batch. PEFT removes them once the call returns,
    but not when it raises: they stayed, and every later call of the model ran as a mixed batch of those rows."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_pre_hooks.items() if _is_adapter_names_hook(hook)]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _refuse_mixed_rows(owner: nn.Module, name: str, layer: nn.Module) -> None:
    """Raise when a mixed-adapter batch asks `layer` (a modules_to_save wrapper whose weight the kernels read) for
    another weight on some rows than the one read for all of them."""
    names = _mixed_batch_adapters(layer)
    if not names:  # (no mixed batch: the common case, checked first on every forward)
        return
    copies = getattr(layer, "modules_to_save", None)
    original = getattr(layer, "original_module", None)
    if not isinstance(copies, nn.ModuleDict) or original is None or getattr(layer, "disable_adapters", False):
        return  # (with the adapters disabled PEFT's wrapper runs the original for every row, as the kernels read it)
    read = layer.weight  # the active adapter's copy
    others = sorted({n for n in names if (copies[n] if n in copies else original).weight is not read})
    if others:
        raise MixedAdapterBatchError(
            f"{name}: a mixed-adapter batch (adapter_names) gives rows of {others} their own {name} (modules_to_save), "
            f"but the {type(owner).__name__} kernels read one {name}.weight for every row (the active adapter's); run "
            f"each adapter's rows apart (set_adapter), or merge them into separate models")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's where it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _RowsToChannels(torch.autograd.Function):
    """y_i[b] = W_i x[b]ᵀ (+ bias_i) for the `parts` equal row blocks W_i of W: x [B, T, K] -> `parts` tensors
    [B, N / parts, T], each contiguous in the channels-first layout of the conv and scan kernels. x (and W) are cast
    to the matmul dtype once for all parts; backward: dx [B, T, K] in x's layout (the parts' products accumulated in
    one buffer) and dW written block by block: no transposing copy, no zero-filled slice gradients."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, parts):
        dtype = _compute_dtype(x)
        x_, w_ = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_, weight)
        ctx.has_bias, ctx.parts = bias is not None, parts
        outs = []
        for w_i, b_i in zip(w_.chunk(parts), (None,) * parts if bias is None else bias.chunk(parts)):
            y = torch.bmm(w_i.expand(x.shape[0], *w_i.shape), x_.transpose(1, 2))
            outs.append(y if b_i is None else y.add_(b_i.to(y.dtype)[:, None]))
        return tuple(outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *dys):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        batch, dtype = x.shape[0], x.dtype
        w_parts = weight.to(dtype).chunk(ctx.parts)
        dys = [torch.zeros(batch, w.shape[0], x.shape[1], dtype=dtype, device=x.device) if dy is None
               else dy.to(dtype) for dy, w in zip(dys, w_parts)]
        dx = dw = db = None
        if need[0]:
            for dy, w in zip(dys, w_parts):
                term = (dy.transpose(1, 2), w.expand(batch, *w.shape))
                dx = torch.bmm(*term) if dx is None else dx.baddbmm_(*term)
        if need[1]:
            dw = torch.empty(weight.shape, dtype=dtype if batch == 1 else torch.float32, device=x.device)
            for dy, rows in zip(dys, dw.chunk(ctx.parts)):
                if batch == 1:
                    torch.mm(dy[0], x[0], out=rows)
                else:
                    rows.copy_(torch.bmm(dy, x).float().sum(0))
        if ctx.has_bias and need[2]:
            db = torch.cat([dy.float().sum((0, 2)) for dy in dys])
        return dx, dw, db, None


class _ChannelsToRows(torch.autograd.Function):
    """out[b] = y[b]ᵀ Wᵀ (+ bias): y [B, K, T] (channels first) -> out [B, T, N], contiguous. Backward: dy
    [B, K, T] in y's layout, so the scan's backward reads it without a transposing copy."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, y, weight, bias):
        ctx.save_for_backward(y, weight)
        ctx.has_bias = bias is not None
        out = torch.bmm(y.transpose(1, 2), weight.t().expand(y.shape[0], *weight.t().shape))
        return out if bias is None else out.add_(bias.to(out.dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        y, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight = weight.to(dout.dtype)  # a CPU autocast forward ran in dout's dtype (custom_bwd covers CUDA only)
        dy = torch.bmm(weight.t().expand(dout.shape[0], *weight.t().shape), dout.transpose(1, 2)) if need[0] else None
        dw = _batch_sum(torch.bmm(dout.transpose(1, 2), y.to(dout.dtype).transpose(1, 2))) if need[1] else None
        db = dout.sum((0, 1)) if ctx.has_bias and need[2] else None
        return dy, dw, db


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-row weight gradients [B, N, K] summed over the batch (in fp32 where B > 1)."""
    return t[0] if t.shape[0] == 1 else t.float().sum(0)


def rows_to_channels(x: torch.Tensor, linear: nn.Linear, parts: int = 1) -> tuple[torch.Tensor, ...]:
    """``linear(x).transpose(1, 2).chunk(parts, 1)`` as contiguous tensors: x [B, T, K] -> `parts` tensors
    [B, N / parts, T] (the conv/scan layout)."""
    return _RowsToChannels.apply(x, linear.weight, linear.bias, parts)


def channels_to_rows(y: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(y.transpose(1, 2))`` for channels-first y [B, K, T] -> [B, T, N], whose gradient comes back
    channels-first (no transposing copy either way)."""
    return _ChannelsToRows.apply(y, linear.weight, linear.bias)


def channels_linear(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W y[b] for channels-first y [B, K, T] -> [B, N, T], contiguous (a batched matmul; autograd as it is)."""
    return torch.bmm(weight.expand(y.shape[0], *weight.shape), y)


# A pad's Δ (Mamba) or dt (Mamba-2) before its bias and softplus: softplus(-1e4 + bias) is 0 in fp32, so a pad is no
# step of the scan (decay exp(0·A) = 1, no input) and leaves the state as the tokens before it left it
PAD_DT = -1e4


def last_columns(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The last n columns of an attention_mask [B, past + T] (None stays None): the mask of a chunk's n tokens, or of
    the n keys an attention layer sees. Not ``mask[:, -n:]``, which is the whole mask at n = 0 (a chunk of no tokens,
    a sliding window that keeps no past key)."""
    return None if mask is None else mask[:, mask.shape[1] - n:]


def lay_out_past_pads(x: torch.Tensor, mask: torch.Tensor, initial_state: torch.Tensor | None, width: int,
                      seq_idx: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """A causal conv's input with each row's pads moved out of the way: x [B, C, T] (zero at the pads, mask [B, T]
    0) and the carried inputs initial_state [B, C, width - 1] (None: zeros) laid out as [pads, carried inputs,
    tokens] [B, C, width - 1 + T], so that a conv over it from a zero state gives each token the window of the
    tokens before it, as if the pads were not there, and its final state the last width - 1 of those. A pad after a
    token happens: PEFT's prompt tuning puts [virtual tokens, left pads, prompt] in one row. Documents are counted as
    the scans count them, over every position: a change of seq_idx at a pad starts one too. Returns (the laid-out
    input, its document ids (pads and carried inputs in the first position's document) or None, back [B, T]: where
    each position's output is in the conv's, carry [B] bool or None: False where the row's last position is in
    another document than its last input (pads that start a document end the row), whose conv state is then
    zeros)."""
    batch, channels, length = x.shape
    history = x.new_zeros(batch, channels, width - 1) if initial_state is None else initial_state.to(x.dtype)
    if length == 0:  # no tokens: the carried inputs alone, which the conv's final state then keeps as they are
        ids = None if seq_idx is None else seq_idx.new_zeros(batch, width - 1, dtype=torch.long)
        carry = None if seq_idx is None else torch.ones(batch, dtype=torch.bool, device=x.device)
        return history, ids, torch.zeros(batch, 0, dtype=torch.long, device=x.device), carry
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # (B, T): the pads, then the tokens in order
    n_pad = (mask == 0).sum(1, keepdim=True)  # (B, 1)
    j = torch.arange(length + width - 1, device=x.device)[None]  # (1, width - 1 + T): laid-out positions
    carried = (j >= n_pad) & (j < n_pad + width - 1)
    rank = torch.where(j < n_pad, j, j - (width - 1)).clamp(0, length - 1)  # a pad's or token's place in `order`
    index = torch.where(carried, j - n_pad, width - 1 + order.gather(1, rank))  # into cat([carried, x])
    laid = torch.cat([history, x], dim=2).gather(2, index[:, None].expand(batch, channels, -1))
    laid_ids = carry = None
    if seq_idx is not None:
        doc = torch.zeros_like(seq_idx, dtype=torch.long)
        doc[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long().cumsum(1)  # (B, T): 0 for position 0's document
        laid_ids = torch.where(j < n_pad + width - 1, 0, doc.gather(1, order.gather(1, rank)))
        carry = laid_ids[:, -1] == doc[:, -1]
    return laid, laid_ids, width - 1 + torch.argsort(order, dim=1), carry


_STEP_VERDICT: tuple | None = None  # (weakref to the last attention_mask step_pad_rows read, its version, all ones?)


def step_pad_rows(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """For a one-token step of a recurrent layer: tokens [B] (bool), False for the rows whose new position is a pad
    (attention_mask's last column 0), or None where none is (no mask, or a last column of ones: the step's fast path
    as it was). A pad is no step: the layer leaves that row's state and conv window as they are. The column is read
    on the device once per mask tensor and version (a model's layers all get the same one; an inference-mode
    tensor, which has no version, at each call), not under CUDA graph capture or torch.compile, where the rows are
    returned unread (the layers then take their masked path: correct, without the fused Mamba step)."""
    global _STEP_VERDICT
    if attention_mask is None:
        return None
    tokens = attention_mask[:, -1] != 0
    if torch.compiler.is_compiling() or _graph_capturing(tokens):
        return tokens
    # (an inference-mode tensor has no version counter: read each time, as one changed in place may be)
    version = None if attention_mask.is_inference() else attention_mask._version
    known = _STEP_VERDICT
    if version is not None and known is not None and known[0]() is attention_mask and known[1] == version:
        ones = known[2]
    else:
        ones = bool(tokens.all())
        _STEP_VERDICT = (weakref.ref(attention_mask), version, ones) if version is not None else None
    return None if ones else tokens


def keep_rows_(state: torch.Tensor, saved: torch.Tensor, tokens: torch.Tensor | None) -> None:
    """Put back, in place, the rows of `state` [B, ...] whose step was a pad (tokens [B] False) from `saved`."""
    if tokens is not None:
        state.copy_(torch.where(tokens.view(-1, *[1] * (state.dim() - 1)), state, saved))


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32. x: [..., d]."""

    _no_weight_decay_params = ("weight",)

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        mark_no_weight_decay(self, "weight")

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel each way (aten::_fused_rms_norm) instead of five pointwise/reduction ones
            if x.dtype == self.weight.dtype:  # bf16/fp16 in: the kernel computes in fp32 and rounds once at the end
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


@functools.cache
def optional_kernel(module: str, name: str):
    """``zoo_kernels.<module>.<name>``, an inference kernel written in Triton, or None where Triton does not import
    (the callers then run their torch formula)."""
    try:
        return getattr(importlib.import_module(f"zoo_kernels.{module}"), name)
    except ImportError:
        return None


def _fused_gated_norm():
    return optional_kernel("gated_norm", "gated_rms_norm")


def _skinny_linear():
    return optional_kernel("skinny_linear", "skinny_linear")


def _pdl_linear():
    return optional_kernel("pdl_linear", "pdl_linear"), optional_kernel("pdl_linear", "supported")


# ZOO_DECODE_LINEAR=0 keeps cuBLAS for every projection (benchmarks compare the two); ZOO_DECODE_PDL=0 keeps the
# decode step's kernels off programmatic dependent launch (zoo_kernels.pdl_linear, add_norm)
with read_at_import():  # (a bad value: one line from a command that imports zoo, not a traceback)
    DECODE_LINEAR = env_flag("ZOO_DECODE_LINEAR", True)
    DECODE_PDL = env_flag("ZOO_DECODE_PDL", True)
    PDL_MAX_ROWS = env_int("ZOO_PDL_MAX_ROWS", 32, low=0, high=PDL_KERNEL_ROWS,  # the env override is for benchmarks
                           what="rows up to which decode projections take the PDL kernel")
_DECODING = 0  # > 0 inside `decoding()`


def in_decoding() -> bool:
    """Whether a decode step of zoo.decode's loops is running (`decoding()`)."""
    return _DECODING > 0


@contextlib.contextmanager
def decoding():
    """Marks the forward of a decode step (zoo.decode's loops). Only there do projections take the PDL kernel: it
    reads its weight before it waits for the kernel launched just before it, which in a decode step is always a
    kernel of the model (never one writing that weight), but need not be elsewhere (a weight copied in, then the
    layer called)."""
    global _DECODING
    _DECODING += 1
    try:
        yield
    finally:
        _DECODING -= 1


class Linear(nn.Linear):
    """nn.Linear whose inference forward on CUDA sends a decode step's few rows (zoo.decode's loops, `decoding()`)
    through kernels of ours.

    - In a decode step (`decoding()`) on Hopper and newer, up to PDL_MAX_ROWS = 32 rows in fp16/bf16 (K % 32,
      N % 16): zoo_kernels.pdl_linear, launched as a programmatic dependent of the kernel before it, so that its
      weight loads overlap that kernel.
      In CUDA-graph chains of projections on the H200 (benchmarks/decode_linear.py --chain) it took 2.8 us per
      projection at 16 rows against cuBLAS's 4.8, and 6.5 against 5.0 at 64; whole decode steps
      (benchmarks/generate.py) were faster with it up to 32 rows and no faster at 64, so more rows stay on cuBLAS
      (benchmarks/RESULTS.md, thirteenth session).
    - Else in a decode step, one row with K >= N: zoo_kernels.skinny_linear (Triton); there, inside a CUDA graph on
      the H200, it beat cuBLAS (Mamba-130M's out_proj 4.3 vs 5.7 us, a SwiGLU down_proj 5.1 vs 7.2 us; seventh
      session). Not outside zoo.decode's loops: transformers' eager generate() is bound by the host, where a Triton
      launch costs several times cuBLAS's (cProfile on an H100, thirtieth session: ~100 against ~35 us per call).
    cuBLAS keeps every other case: training, prefill, CPU, fp32, autocast, torch.compile. PEFT wraps it as it wraps
    nn.Linear (a LoRA layer calls the base layer, then adds its adapter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (_DECODING first: outside a decode step every other check is host time spent for nothing)
        if (_DECODING and DECODE_LINEAR and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and x.dtype == self.weight.dtype and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda") and not torch.compiler.is_compiling()):
            if DECODE_PDL and x.numel() <= PDL_MAX_ROWS * x.shape[-1]:
                kernel, supported = _pdl_linear()
                if kernel is not None and supported(x, self.weight, self.bias):
                    return kernel(x, self.weight, self.bias)
            if x.numel() == x.shape[-1] and x.shape[-1] >= self.weight.shape[0] and self.weight.stride(-1) == 1:
                kernel = _skinny_linear()
                if kernel is not None:
                    return kernel(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class GatedRMSNorm(nn.Module):
    """Mamba-2 / GLA output norm. norm_before_gate=False: rmsnorm(x * silu(z)); True: rmsnorm(x) * silu(z).

    Normalizes over groups of `group_size` channels (Mamba-2 normalizes per B/C group). x, z: [..., d].
    """

    _no_weight_decay_params = ("weight",)

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or d, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))
        mark_no_weight_decay(self, "weight")

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda and not torch.is_grad_enabled() and _fused_gated_norm() is not None and x.stride(-1) == 1 \
                and (z is None or z.stride(-1) == 1):  # inference (decode): one kernel instead of about ten
            return _fused_gated_norm()(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
        dtype = x.dtype
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        groups = xf.unflatten(-1, (-1, self.group_size))  # (..., n_groups, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        y = groups.flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.float())
        return y.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Transformer++)."""

    lora_targets = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(d_model, hidden, bias=False)
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _graph_capturing(x: torch.Tensor) -> bool:
    """Whether x's ops are being captured into a CUDA graph (where nonzero / host syncs are not allowed)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_norm_eps(value: object, field: str = "norm_eps") -> None:
    """Raise ValueError naming `field` unless `value` is a finite number > 0: an RMSNorm's epsilon (a negative one
    takes the root of a negative mean square where the activations are small: NaN outputs; 0 divides a zero row
    by zero)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{field}: must be a finite number > 0 (an RMSNorm's epsilon), got {value!r}")


def scaled_width(d_model: int, factor: float) -> int | None:
    """factor·d_model (a mixer's expand) as an int where it is a whole number up to float rounding, else None. A
    budget-matched expand = d_inner / d_model times d_model can land a hair off (232 / 56 · 56 = 232.00000000000003),
    and such a width used to be refused, or truncated by int() to one less where it landed a hair below."""
    width = factor * d_model
    if not abs(width) < float("inf"):  # YAML's .inf (or .nan): round() raised OverflowError, naming no field
        return None
    nearest = round(width)
    return int(nearest) if abs(width - nearest) <= 1e-9 * max(1.0, abs(width)) else None


class MoE(nn.Module):
    """Jamba-style mixture of SwiGLU experts with a top-k softmax router and a load-balancing aux loss.

    forward returns (output, router logits [tokens, n_experts] in fp32); the model computes the load-balancing aux
    loss over the logits of all its MoE layers at once (`load_balancing_loss`), as transformers' Jamba and Mixtral do.
    normalize_topk: rescale the k chosen probabilities to sum to 1 (False: use them as they are, as Jamba does).
    With top_k 1 that rescaled weight is always 1, so the router learns from the aux loss alone (a warning says so;
    Switch Transformer's top-1 weighs the expert by its probability: normalize_topk False).
    """

    lora_targets = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int, normalize_topk: bool = True):
        super().__init__()
        if top_k == 1 and normalize_topk:
            warnings.warn("moe.normalize_topk: with top_k 1 the renormalized expert weight is always 1, so the "
                          "router gets no gradient from the model's loss, only from the load-balancing aux loss; set "
                          "moe.normalize_topk: false to weigh the expert by its router probability (Switch "
                          "Transformer, Jamba), or use top_k >= 2", UserWarning, stacklevel=2)
        self.n_experts, self.top_k, self.normalize_topk = n_experts, top_k, normalize_topk
        self.router = Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(n_experts))

    def _experts_wrapped(self) -> bool:
        """Whether an expert or one of its projections is wrapped (a PEFT LoRA layer or modules_to_save copy)."""
        # read through _modules: nn.Module's __getattr__ made this loop 60 us per MoE layer and forward at 16 experts
        return any(type(expert) is not SwiGLU or not all(type(m) is Linear for m in expert._modules.values())
                   for expert in self.experts._modules.values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        # the router and the experts see the batch's rows first: PEFT's mixed-adapter batches (adapter_names, one
        # per row) split a wrapped module's input by its first dim, so (tokens, d) failed PEFT's length check
        logits = self.router(x).float().reshape(-1, self.n_experts)
        x = x.reshape(-1, shape[-1])  # (tokens, d)
        probs = logits.softmax(-1)  # (tokens, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (tokens, k)
        if self.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        if _graph_capturing(x):  # CUDA-graph decoding: no data-dependent shapes, every expert sees every token
            dense = torch.zeros_like(probs, dtype=x.dtype).scatter(-1, chosen, weights)  # (tokens, E)
            for e, expert in enumerate(self.experts):
                out = out + expert(x.reshape(shape)).reshape(x.shape) * dense[:, e, None]
            return out.reshape(shape), logits
        # an adapted expert at inference runs on its tokens laid out as [rows, most tokens of one row, d] (zero
        # padded), so that each token keeps its row's adapter in a PEFT mixed batch
        by_row = not self.training and len(shape) > 2 and self._experts_wrapped()
        per_row = x.shape[0] // shape[0] if by_row else 0
        # each expert's (token, slot) pairs in the row-major order `(chosen == e).nonzero()` gives them, for all the
        # experts at once: a stable sort of the flat choices groups them by expert, keeping that order in a group.
        # One host sync (the counts) per layer instead of one nonzero per expert (eager decoding on CUDA waited
        # n_experts times per MoE layer and token)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        per_expert = torch.bincount(flat, minlength=self.n_experts).tolist()
        tokens, slots = (order // chosen.shape[-1]).split(per_expert), (order % chosen.shape[-1]).split(per_expert)
        for e, expert in enumerate(self.experts):
            token, slot = tokens[e], slots[e]
            # with autograd on, an expert that no token chose still runs (on no rows): its parameters get zero
            # gradients rather than none, which DDP needs of every parameter in every backward ("Expected to
            # have finished reduction in the prior iteration" otherwise, without find_unused_parameters)
            if not (token.numel() or torch.is_grad_enabled()):
                continue
            if by_row:
                row = token // per_row  # token is sorted, so each row's tokens are contiguous
                counts = torch.bincount(row, minlength=shape[0])
                col = torch.arange(token.numel(), device=x.device) - (counts.cumsum(0) - counts)[row]
                rows = x.new_zeros(shape[0], int(counts.max()), shape[-1])
                rows[row, col] = x[token]
                y = expert(rows)[row, col]
            else:
                y = expert(x[token])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(shape), logits


def load_balancing_loss(router_logits: Sequence[torch.Tensor], n_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balancing aux loss of Switch Transformer over the router logits ([tokens, n_experts] each) of all
    MoE layers at once, as transformers defines it for Jamba and Mixtral: n_experts · Σ_e c_e · p_e, with c_e the
    top-k assignments to expert e per routed token and p_e the mean router probability of e, both over every
    layer's tokens; top_k when balanced. So moe.aux_loss_coef means what Jamba's router_aux_loss_coef means (0.001)
    whatever the number of MoE layers. token_mask [tokens] (1 = token): padding counts for neither."""
    counts, probs, rows = load_balancing_sums(router_logits, n_experts, top_k, token_mask)
    rows = rows.clamp(min=1) if isinstance(rows, torch.Tensor) else max(rows, 1)  # (no host copy: graph capture)
    return n_experts * ((counts / rows) * (probs / rows)).sum()


def load_balancing_sums(router_logits: Sequence[torch.Tensor], n_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None):
    """The sums `load_balancing_loss` is made of, over every layer's (unmasked) tokens: the top-k assignments per
    expert [n_experts] (no gradient), the router probabilities per expert [n_experts], and the routed tokens. They
    add up over the chunks of a row, so the whole row's loss is n_experts · Σ_e C_e · P_e / rows² of the sums."""
    counts = router_logits[0].new_zeros(n_experts, dtype=torch.float32)  # (bf16 counts were exact to 256 only)
    probs = router_logits[0].new_zeros(n_experts, dtype=torch.float32)
    keep = token_mask.reshape(-1).to(counts) if token_mask is not None else None
    rows = 0
    for logits in router_logits:
        # each layer's on its own device under a device_map that splits the layers (as transformers' Jamba moves them)
        p = logits.to(counts.device).float().softmax(-1)
        chosen = p.topk(top_k, dim=-1).indices  # (tokens, k)
        slots = keep[:, None].expand_as(chosen) if keep is not None else torch.ones_like(chosen, dtype=counts.dtype)
        counts = counts.scatter_add(0, chosen.reshape(-1), slots.reshape(-1))
        probs = probs + (p * keep[:, None] if keep is not None else p).sum(0)
        rows = rows + (keep.sum() if keep is not None else p.shape[0])
    return counts, probs, rows


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) unless the ffn is 'none'.

    residual_in_fp32: the residual stream x is kept in fp32 whatever the weights' dtype (as mamba_ssm and
    transformers' Mamba do); the norms hand the mixer and the ffn their input in the weights' dtype. With fp32
    weights (training under autocast included) it changes nothing."""

    def __init__(self, mixer: nn.Module, d_model: int, ffn: nn.Module | None, norm_eps: float,
                 residual_in_fp32: bool = False):
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(d_model, norm_eps) if ffn is not None else None
        self.ffn = ffn
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, x, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        dtype = self.norm.weight.dtype
        residual = x.float() if self.residual_in_fp32 else x
        x = residual + self.mixer(self.norm(x.to(dtype)), cache=cache, seq_idx=seq_idx, position_ids=position_ids,
                                  attention_mask=attention_mask)
        router_logits = None  # a MoE's, for the model's load-balancing loss
        if self.ffn is not None:
            h = self.ffn(self.ffn_norm(x.to(dtype)))
            if isinstance(h, tuple):  # a MoE's (output, router logits), also under a wrapper (PEFT's modules_to_save)
                h, router_logits = h
            x = x + h
        return x, router_logits

    def forward_pending(self, x, pending, add_norm, cache=None, seq_idx=None, position_ids=None,
                        attention_mask=None):
        """Inference form of `forward` with the residual adds fused into the norms (`add_norm`:
        zoo_kernels.add_norm.add_rms_norm): x is the residual stream *before* `pending`, the previous block's
        last output, is added to it. Returns (residual, this block's last output, a MoE's router logits or None): its
        add is left to the next block's norm (or the final norm), one kernel per seam instead of four. Same numbers as
        `forward`."""
        dtype = self.norm.weight.dtype
        res_dtype = torch.float32 if self.residual_in_fp32 else x.dtype
        if pending is not None:
            res_dtype = torch.promote_types(res_dtype, pending.dtype)
        x, h = add_then_norm(add_norm, self.norm, x, pending, dtype, res_dtype)
        out = self.mixer(h, cache=cache, seq_idx=seq_idx, position_ids=position_ids, attention_mask=attention_mask)
        router_logits = None
        if self.ffn is not None:
            x, h = add_then_norm(add_norm, self.ffn_norm, x, out, dtype, torch.promote_types(x.dtype, out.dtype))
            out = self.ffn(h)
            if isinstance(out, tuple):  # a MoE's, as in `forward`
                out, router_logits = out
        return x, out, router_logits


def add_then_norm(add_norm, norm: nn.Module, residual: torch.Tensor, delta: torch.Tensor | None, dtype: torch.dtype,
                  res_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, norm of it in `dtype`): `add_norm` (`fused_add_norm`'s kernel) with the weight of `norm` where
    it is zoo's RMSNorm itself; a norm PEFT wrapped (LN tuning's LNTuningLayer, a modules_to_save copy) is called
    instead, after the add: the kernel took the wrapper's `.weight` and `.eps`, which LN tuning's layer lacks (an
    AttributeError) or hands out from its base layer (the tuned norm skipped), and a modules_to_save wrapper gives for
    its active adapter alone (a mixed-adapter batch's other rows)."""
    if type(norm) is RMSNorm:
        return add_norm(residual, delta, norm.weight, norm.eps, dtype, res_dtype)
    if res_dtype is None:
        res_dtype = residual.dtype if delta is None else torch.promote_types(residual.dtype, delta.dtype)
    total = residual.to(res_dtype) if delta is None else residual.to(res_dtype) + delta.to(res_dtype)
    return total, norm(total.to(dtype)).to(dtype)


def fused_add_norm():
    """zoo_kernels.add_norm.add_rms_norm where Triton imports, else None."""
    return optional_kernel("add_norm", "add_rms_norm")


__all__ = ["add_then_norm", "decoded_constants", "drop_adapter_names_hooks", "fused_add_norm", "lay_out_past_pads",
           "optional_kernel", "PAD_DT", "RMSNorm", "GatedRMSNorm", "SwiGLU", "MoE", "Block", "init_copy_", "keep_rows_",
           "mark_no_weight_decay", "mark_saved_copies", "MixedAdapterBatchError", "new_sequence", "no_weight_decay_ids",
           "step_pad_rows"]
