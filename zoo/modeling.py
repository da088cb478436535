"""ZooModel, ZooForCausalLM, ZooForSequenceClassification: Hugging Face models of interchangeable mixers."""

from __future__ import annotations

import contextvars
import copy
import inspect
import logging
import math
import re
import warnings
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from zoo_kernels.cross_entropy import cross_entropy

from zoo.cache import (
    KVCacheFull,
    RecurrentLayer,
    ZooCache,
    output_cache,
    require_init_state,
    require_positionwise,
    wrapped_mixer,
)
from zoo.config import ZooConfig, check_mixer_options, coerce_mixer_options
from zoo.layers import (
    Block,
    Linear,
    MixedAdapterBatchError,
    MoE,
    RMSNorm,
    SwiGLU,
    add_then_norm,
    drop_adapter_names_hooks,
    fused_add_norm,
    in_decoding,
    last_columns,
    load_balancing_loss,
    mark_no_weight_decay,
    new_sequence,
)
from zoo.registry import get_mixer, is_dotted_path

try:  # the keyword generate() keeps the cache under: "cache" from transformers 5.2x on, "past_key_values" before
    from transformers.generation.utils import ALL_CACHE_NAMES as _CACHE_NAMES

    GENERATE_CACHE_KWARG = _CACHE_NAMES[0]
except ImportError:  # pragma: no cover - older layouts
    GENERATE_CACHE_KWARG = "past_key_values"


# the outputs' cache field: `cache` from transformers 5.2x on (`past_key_values` warns there, and goes in 5.40)
_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _the_cache(past_key_values, kwargs: dict):
    """`cache=` (transformers' new name, what generate passes from 5.2x on) or `past_key_values=`."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        if not (isinstance(cache, ZooCache) and isinstance(past_key_values, ZooCache)):  # generate's and PEFT's
            raise _not_a_zoo_cache(past_key_values if isinstance(cache, ZooCache) else cache)
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _not_a_zoo_cache(cache) -> TypeError:
    return TypeError(f"past_key_values must be a ZooCache (got {type(cache).__name__}); build one with "
                     f"ZooCache.for_model(model). A transformers cache holds attention keys and values only, not "
                     f"recurrent states, so methods that prepend keys and values through one (PEFT's prefix tuning) "
                     f"do not apply to zoo models; PEFT's prompt tuning (PromptTuningConfig) prepends virtual tokens "
                     f"instead and works")


def packed_seq_idx(position_ids: torch.Tensor) -> torch.Tensor | None:
    """seq_idx [B, T] of rows packed the way transformers' padding-free collator packs them (DataCollatorWithFlattening:
    position_ids restart at each document, no attention_mask): a step other than +1 begins a document, as in
    transformers' masking_utils.find_packed_sequence_indices. None when no row restarts (outside torch.compile)."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    seq_idx = (step != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and not (seq_idx.shape[1] and seq_idx[:, -1].any()):  # (T = 0: none)
        return None
    return seq_idx


def seq_idx_from_cu_seqlens(kwargs: dict, seq_idx: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """seq_idx [1, T] from the cu_seq_lens_q / cu_seq_lens_k that transformers' DataCollatorWithFlattening gives with
    return_flash_attn_kwargs=True (popped from `kwargs` with max_length_q / _k): with return_position_ids=False they
    were the only mark of the documents, and were ignored, so the packed documents attended to and carried states
    into each other. `seq_idx`, given, wins."""
    cu = kwargs.pop("cu_seq_lens_q", None)
    cu_k = kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    if cu is None:
        cu = cu_k
    if cu is None or seq_idx is not None:
        return seq_idx
    if cu_k is not None and not torch.equal(cu_k.to(cu.device), cu):
        raise ValueError("cu_seq_lens_k: differs from cu_seq_lens_q; zoo models take packed documents for causal "
                         "self-attention only (one boundary list for queries and keys)")
    batch, tokens = shape
    if batch != 1 or cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != tokens:
        raise ValueError(f"cu_seq_lens_q: expected the document boundaries [0, ..., {tokens}] of one packed row "
                         f"[1, {tokens}], got {cu.tolist()} for input rows of shape [{batch}, {tokens}]; or pass "
                         f"seq_idx [batch, tokens] (the document of each token)")
    positions = torch.arange(tokens, device=cu.device)
    return torch.bucketize(positions, cu[1:].to(positions.dtype), right=True)[None].to(torch.int32)


def _refuse_restarts_after_a_cache(position_ids: torch.Tensor, past: int) -> None:
    """A chunk that continues a cache cannot tell from position_ids alone where a packed document begins: its first
    token's step is from a position the cache does not keep, and the layers' cached keys and states carry no
    document ids to match. Such a chunk was run as one document (attention saw the earlier documents' keys, the
    recurrent layers carried their states over); it is refused instead, naming seq_idx, which does continue."""
    if (position_ids[:, 0] == 0).any() or (torch.diff(position_ids, dim=-1) != 1).any():
        raise ValueError(f"position_ids restart in a chunk that continues a cache ({past} tokens cached): documents "
                         f"packed by position_ids alone are told apart only in the chunk that starts the cache. "
                         f"Pass seq_idx [batch, tokens] (the document of each token, continuing the earlier "
                         f"chunks' numbering) for every chunk instead")


def _check_cache(model: ZooModel, cache: ZooCache, batch: int) -> None:
    """Raise, in one line, when `cache` was made for another model (layer count, kinds, or the mixers that
    ZooCache.for_model recorded differ; checked once per cache and model) or holds states for another number of rows
    than the input's: without this a mismatch failed deep in a mixer with a shape error, or (GLA) broadcast a state
    of one row to the batch, or the batch to the cache's rows, without an error."""
    checked = cache.__dict__.get("_checked_for")
    if checked is None or checked() is not model:
        require_init_state(model)  # a custom mixer without init_state: no cache fits this model
        mixers = [type(block.mixer).__name__ for block in model.layers]
        if len(cache.layers) != len(mixers):
            raise ValueError(f"past_key_values: the cache has {len(cache.layers)} layers but this model has "
                             f"{len(mixers)}; it was made for another model: build one with ZooCache.for_model(model)")
        recorded = getattr(cache, "mixer_types", None)
        for i, (block, layer) in enumerate(zip(model.layers, cache.layers)):
            wanted = recorded[i] if recorded is not None else None
            expected = type(block.mixer.init_state(1, torch.float32, "cpu"))
            if expected is type(None):
                require_positionwise(block.mixer, i, model.config.d_model)
            kind_ok = isinstance(layer, RecurrentLayer) == issubclass(expected, RecurrentLayer)
            if not kind_ok or (wanted is not None and wanted != mixers[i]):
                made = f"a {wanted} mixer" if wanted else f"a {type(layer).__name__}"
                raise ValueError(f"past_key_values: layer {i} of the cache was made for {made} but this model's "
                                 f"layer {i} is {mixers[i]}; the cache was made for another model: build one with "
                                 f"ZooCache.for_model(model)")
        cache._checked_for = weakref.ref(model)  # a kept cache does not keep the model alive
    rows = cache.batch_size
    if rows is not None and rows != batch:
        raise ValueError(f"past_key_values: the cache holds states of {rows} rows but the input has {batch}; pass "
                         f"one row per cached row (cache.batch_repeat_interleave(n) repeats each row n times, "
                         f"cache.batch_select_indices(rows) keeps some)")


def _pads_of(mask: torch.Tensor, cache: ZooCache) -> bool:
    """Whether `mask` (over the cached and new tokens) pads exactly the left padding that the static cache hides
    (to_static(pads=)): the mask generate extends, given or inferred from pad_token_id, for the continuation of a
    left-padded batch. Its positions are then the pads' (each row's from its first token)."""
    pads = getattr(cache, "pads", None)
    if pads is None:
        return False
    positions = torch.arange(mask.shape[1], device=mask.device)
    return bool(torch.equal(mask.bool(), positions[None] >= pads.to(mask.device)[:, None]))


def _check_static_step(cache: ZooCache, tokens: int, attention_mask: torch.Tensor | None,
                       seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """Refuse, before any layer runs, a chunk that a static cache's attention layers (ZooCache.to_static) cannot
    take: several tokens, padding or packed documents, or more tokens than they have room for. Each attention layer
    refused it on its own, after the layers before it had run: in a hybrid the Mamba / Mamba-2 / GLA states were
    already advanced by the refused tokens while the token count was not, so the cache, kept for a retry, gave
    wrong logits without an error. A mask short of the tokens so far is refused too (it gave the step a wrong
    position). Returns the attention_mask, None where it is all ones or pads the cache's pads (what the static step
    reads of it; the layers then need not read it again)."""
    layers = cache.static_layers()
    if not layers or tokens == 0:
        return attention_mask
    if tokens != 1:
        raise ValueError(f"a static KV cache (ZooCache.to_static) decodes one token per step, got {tokens}; run "
                         f"longer chunks (a prompt's uncached tokens) on the default dynamic cache and convert it "
                         f"after")
    past = cache.get_seq_length()
    if attention_mask is not None and attention_mask.shape[-1] != past + tokens:
        # the step's positions are read from the mask (its count of tokens): a mask of the new token alone, or of
        # the last few, put it at another position than the cache's (RoPE), with wrong logits and no error
        raise ValueError(f"attention_mask: covers {attention_mask.shape[-1]} positions but the static KV cache holds "
                         f"{past} tokens and this step has {tokens}; pass the mask of every token so far, [batch, "
                         f"past + {tokens}] = [{attention_mask.shape[0]}, {past + tokens}], as transformers' generate "
                         f"does, or none")
    if seq_idx is not None or (attention_mask is not None and not bool(attention_mask.all())
                               and not _pads_of(attention_mask, cache)):
        raise ValueError("a static KV cache decodes unpadded, unpacked rows: pass no attention_mask with padding "
                         "other than the left padding the cache was made static with (to_static(pads=)), and no "
                         "seq_idx")
    for layer in layers:
        layer.check_room(tokens)
    return None


def _check_mask_covers_cached_keys(model: ZooModel, cache: ZooCache, mask: torch.Tensor | None, tokens: int) -> None:
    """Each attention layer's check that the mask covers its cached keys and the chunk's, made for every one before
    any layer runs: made by the layer alone, a mask of the new tokens only (or fewer than all so far) was refused
    after the Mamba / Mamba-2 / GLA layers before it had advanced their states by the chunk, while the token count
    was not, so the cache, kept for a retry with the right mask, gave wrong logits without an error."""
    if mask is None:
        return
    from zoo.mixers.attention import Attention

    for block, layer in zip(model.layers, cache.layers):
        if isinstance(block.mixer, Attention):
            block.mixer.check_mask_covers_keys(layer, mask, tokens)


def _check_attention_mask(mask: torch.Tensor, batch: int, tokens: int, past: int) -> None:
    """Raise, naming the shape zoo takes, for a mask that is not [batch (or 1), up to past + tokens]: a 4-D mask (a
    packing recipe's block-diagonal one, which transformers' attention models take) failed with a bare broadcast
    error, and one longer than past + tokens (with a cache or without) shifted the positions its cumsum gives, so RoPE
    read the new tokens at the wrong positions without an error (transformers' models read positions from the cache);
    one shorter than the chunk failed with a bare broadcast error."""
    if mask.dim() != 2 or mask.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask: expected [batch, tokens] = [{batch}, {past + tokens}] with 1 for a token "
                         f"and 0 for padding, got shape {tuple(mask.shape)}; zoo's recurrent layers take no "
                         f"per-query (4-D) mask: mark packed documents with seq_idx [batch, tokens] or with "
                         f"position_ids that restart at each document")
    if not tokens <= mask.shape[1] <= past + tokens:
        held = (f"the cache holds {past} tokens and this chunk has {tokens}" if past
                else f"the input has {tokens} tokens")
        raise ValueError(f"attention_mask: covers {mask.shape[1]} positions but {held}; pass the mask of every "
                         f"token so far, [batch, past + tokens] = [{batch}, {past + tokens}], as transformers' "
                         f"generate does")


def _check_position_ids(position_ids: torch.Tensor, batch: int, tokens: int, past: int) -> None:
    """Raise, naming the shape zoo takes, for position_ids that are not [batch (or 1), tokens]: the positions of every
    token so far (as an attention_mask covers them) given for a one-token step made RoPE rotate it at each of them
    (then 'attention shapes disagree'), a recurrent model ignored them without a word, and a 1-D tensor failed with a
    bare IndexError."""
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != tokens:
        after = f"{past} + arange({tokens}) after the {past} cached tokens" if past else f"arange({tokens})"
        raise ValueError(f"position_ids: expected [batch, tokens] = [{batch}, {tokens}], the positions of this "
                         f"chunk's tokens alone (e.g. {after}), got shape {tuple(position_ids.shape)}")


def _check_seq_idx(seq_idx: torch.Tensor, batch: int, tokens: int, past: int, device: torch.device) -> torch.Tensor:
    """Raise, naming the shape zoo takes, for a seq_idx that is not [batch (or 1), tokens]; returns it [batch, tokens]
    (a single row serves every row, as position_ids' and attention_mask's do). Unchecked, a 1-D seq_idx failed with a
    bare IndexError in the cache (or a kernel's shape error naming its own arguments), one of the tokens so far in a
    chunk that continues a cache ran an attention model with wrong logits and no error (its layers read the chunk's
    ids from the end of it), and a single row ran an attention model but failed in a recurrent layer's kernel. Float
    ids are refused too: they were cast to int32, so ids 0.25 and 0.75 were one document (wrong logits, no error);
    and ids on another device than the input (`device`: input_ids' or inputs_embeds', which accelerate's hooks move
    with them), which failed in a layer's kernel or the cache with a bare device error."""
    if seq_idx.dim() != 2 or seq_idx.shape[0] not in (1, batch) or seq_idx.shape[1] != tokens:
        alone = f", not the {past} cached ones" if past else ""
        raise ValueError(f"seq_idx: expected [batch, tokens] = [{batch}, {tokens}] (or [1, {tokens}] for every row), "
                         f"the document of each of this chunk's tokens{alone}, got shape {tuple(seq_idx.shape)}")
    if seq_idx.is_floating_point() or seq_idx.is_complex():
        raise ValueError(f"seq_idx: expected integer document ids (torch.int32 or torch.long), got {seq_idx.dtype}; "
                         f"zoo casts them to int32, which would merge ids that differ only after the point")
    if seq_idx.device != device:
        raise ValueError(f"seq_idx: on {seq_idx.device} but the input is on {device}; put the document ids on the "
                         f"input's device")
    return seq_idx.expand(batch, tokens)


def _refuse_output_attentions(config, kwargs: dict) -> None:
    """transformers' output_attentions (argument or config default): zoo models have no attention weights to return,
    so asking for them raises rather than giving None."""
    asked = kwargs.pop("output_attentions", None)
    if asked or (asked is None and getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions: zoo models return no attention weights (attention runs in fused SDPA / "
                         "flash kernels, Mamba, Mamba-2 and GLA layers have none); use output_hidden_states, or "
                         "zoo.state's recorder for the recurrent states")


# a forward keyword that prepare_inputs_for_generation sets: the step's output gets no aux_loss (generate drops it)
_SKIP_AUX_LOSS = "_zoo_skip_aux_loss"
_MASK_VERDICT = "_zoo_mask_verdict"  # (weakref to generate's attention_mask, all ones?): read once per generate call

# set while ZooForCausalLM.from_pretrained(..., trust_remote_code=True) builds its model
_TRUSTED_LOAD: contextvars.ContextVar[bool] = contextvars.ContextVar("zoo_trusted_load", default=False)


def _return_dict(config, return_dict) -> bool:
    """A ModelOutput unless the caller (or the config's return_dict) asks for transformers' tuple."""
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


class _AuxBesideRouterLogits:
    """to_tuple of zoo's outputs: the non-None fields in order, aux_loss only beside router_logits, as
    MixtralForCausalLM's (whose aux_loss is None without them): without output_router_logits an MoE model's tuple is
    a dense model's, and `out[0]`, `out[1]` index the output as its `return_dict=False` tuple."""

    def to_tuple(self) -> tuple:
        if self.get("router_logits") is None:
            return tuple(v for k, v in self.items() if k != "aux_loss")
        return super().to_tuple()


@dataclass
class ZooModelOutput(_AuxBesideRouterLogits, MoeModelOutputWithPast):
    """ZooModel's output: transformers' MoE model output (last_hidden_state, cache, hidden_states, attentions,
    router_logits, as MixtralModel's) plus the MoE load-balancing loss, last, so that the tuple of
    `return_dict=False` carries it beside the router logits (an attribute set on a BaseModelOutputWithPast was no
    field: the tuple dropped it)."""

    aux_loss: torch.FloatTensor | None = None


@dataclass
class ZooCausalLMOutput(_AuxBesideRouterLogits, MoeCausalLMOutputWithPast):
    """transformers' MoeCausalLMOutputWithPast (loss, aux_loss, logits, cache, hidden_states, attentions,
    router_logits, MixtralForCausalLM's fields in its order): `loss` includes the MoE load-balancing loss, times
    moe.aux_loss_coef, in training mode only. As a tuple (`return_dict=False`) it follows MixtralForCausalLM's:
    aux_loss (second, after the loss) and router_logits (last) are in it when output_router_logits is on, so that
    without them the tuple starts (loss, logits) as every causal LM's."""


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    config: ZooConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, trust_remote_code: bool = False, **kwargs):
        # Dotted-path mixers in a config from disk import code: only with trust_remote_code (registry.get_mixer), for
        # ZooModel (AutoModel) as for ZooForCausalLM.
        # The flag holds while this load builds the model, whatever form the path, config and overrides take.
        token = _TRUSTED_LOAD.set(True) if trust_remote_code else None
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        finally:
            if token is not None:
                _TRUSTED_LOAD.reset(token)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        model.mark_no_weight_decay()  # loading replaced the Parameter objects that carried the flags
        _refuse_offloaded_mixers(model)
        model._checked_device_map = model.__dict__.get("hf_device_map")
        return loaded

    def mark_no_weight_decay(self) -> None:
        """Set `_no_weight_decay` on every parameter a module lists in `_no_weight_decay_params`."""
        for module in self.modules():
            names = getattr(module, "_no_weight_decay_params", ())
            if names:
                mark_no_weight_decay(module, *names)

    def keep_in_fp32_names(self) -> list[str]:
        """The parameters that modules list in `_keep_in_fp32_params` (Mamba's A_log and D, Mamba-2's D): fp32 in
        a bf16 or fp16 model, as mamba_ssm keeps them."""
        return [f"{prefix}.{name}" if prefix else name for prefix, module in self.named_modules()
                for name in getattr(module, "_keep_in_fp32_params", ()) if hasattr(module, name)]

    def keep_fp32_parameters(self) -> None:
        """Upcast the `keep_in_fp32_names` parameters that are fp16 or bf16 to fp32 (in place, flags kept): what
        `from_pretrained` / `from_config` with a half dtype do; a plain `.to(dtype)` casts them too, as in
        transformers."""
        for name in self.keep_in_fp32_names():
            param = self.get_parameter(name)
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()

    def post_init(self) -> None:
        super().post_init()
        # transformers' keep-in-fp32 (read by from_pretrained's dtype plan, by name, for fp16 and bf16): one
        # anchored pattern per parameter, so that a custom mixer's "D" is kept only where it asks for it
        self._keep_in_fp32_modules_strict = set(self._keep_in_fp32_modules_strict or ()) | {
            rf"(?:^|\.){re.escape(name)}$" for name in self.keep_in_fp32_names()}
        self.keep_fp32_parameters()  # a mixer built under a half default dtype (from_config(dtype=...))
        self.mark_no_weight_decay()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.mark_no_weight_decay()  # copy.deepcopy made new Parameters without the flags (Parameter.__deepcopy__)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """transformers' check of attn_implementation, except that flash_attention_2 / _3 (what many load calls
        pass) is taken as the default with a warning: zoo's attention already runs flash-attn when it is installed,
        chosen per mixer by attn_backend. transformers refused it as 'does not support Flash Attention 2 yet'."""
        if isinstance(requested_attention, str) and re.fullmatch(r"flash_attention_\d", requested_attention):
            warnings.warn(f"attn_implementation={requested_attention!r} does not change zoo's attention: each "
                          f"attention mixer picks its kernel from its spec's attn_backend; 'auto' (the default) runs "
                          f"flash-attn when it is installed, else SDPA's fastest backend. To require flash-attn, set "
                          f"it there, e.g. mixers: {{A: {{type: attention, attn_backend: flash_attn}}}}", stacklevel=2)
            requested_attention = None
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        """transformers' hook for `activation_checkpointing_enable` / `gradient_checkpointing_enable`: the
        ZooModel checkpoints every `every_n_layers`-th block with the function transformers built from the user's
        kwargs (`use_reentrant`, `offload`); by default torch's non-reentrant checkpoint."""
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
        base = self if isinstance(self, ZooModel) else self.model
        base.gradient_checkpointing = enable
        base._gradient_checkpointing_func = gradient_checkpointing_func or partial(checkpoint, use_reentrant=False)
        base._checkpoint_every = every_n_layers if enable else None
        base._checkpointed = {i for i in range(len(base.layers)) if enable and i % every_n_layers == 0}

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """transformers' per-module init, which in a custom-code model skips a module with no parameters or buffers
        of its own (its test that all it holds was loaded is vacuously true): a custom mixer whose weights all live
        in nn.Linear children never had its reset_parameters called, so its own init was lost to the children's
        N(0, initializer_range). Such a module with reset_parameters is initialized here unless a parameter below it
        was loaded (from_pretrained marks those), after its children as before.

        A module with reset_parameters that a checkpoint filled in part (some weights below it loaded, some missing)
        runs it too, and gets its loaded weights back after: transformers skipped a module whose own parameters all
        loaded, so a Mamba mixer's missing dt_proj.bias or conv bias kept the generic init of its nn.Linear / Conv1d
        (dt = softplus(0), a drawn conv bias), not the mixer's; and where the mixer's init did run, a write that
        bypasses torch.nn.init (which transformers guards) overwrote the loaded weights."""
        if (not getattr(module, "_is_hf_initialized", False) and hasattr(module, "reset_parameters")
                and not isinstance(module, (nn.Linear, nn.Embedding))):
            params = list(module.parameters())
            loaded = [p for p in params if getattr(p, "_is_hf_initialized", False)]
            if loaded and len(loaded) < len(params):
                kept = [(p, p.detach().clone()) for p in loaded]
                self._init_weights(module)
                with torch.no_grad():
                    for p, value in kept:
                        p.copy_(value)
                module._is_hf_initialized = True
                return
            if (not loaded and next(module.parameters(recurse=False), None) is None
                    and next(module.buffers(recurse=False), None) is None):
                self._init_weights(module)
                module._is_hf_initialized = True
                return
        super()._initialize_weights(module, is_custom_code)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this per module, children before parents (_initialize_weights above: parameterless
        # modules with reset_parameters too); a Block has neither, so what its layers need is set on the layers
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            branches = getattr(module, "_residual_branches", None)
            if branches and self.config.rescale_prenorm_residual:
                # GPT-2 / mamba_ssm scheme: residual output projections scaled by 1/sqrt(N residual branches)
                std = std / math.sqrt(branches)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:  # a mixer sets its own after (Mamba's dt_proj bias: children come first)
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif hasattr(module, "reset_parameters") and not isinstance(module, (nn.Linear, nn.Embedding)):
            module.reset_parameters()  # mixers and norms know their own init (S4D-real A, dt, conv)


def _residual_outputs(block: Block) -> list[nn.Linear]:
    """The projections that write a block's residual branches: the mixer's output_projections, the ffn's
    down_proj (every expert's in a MoE)."""
    projections = [block.mixer.get_submodule(n) for n in getattr(block.mixer, "output_projections", ())]
    if isinstance(block.ffn, SwiGLU):
        projections.append(block.ffn.down_proj)
    elif isinstance(block.ffn, MoE):
        projections.extend(e.down_proj for e in block.ffn.experts)
    return projections


class ZooModel(ZooPreTrainedModel):
    """Embedding -> Blocks (mixer + ffn) -> final RMSNorm."""

    def __init__(self, config: ZooConfig):
        # fields set on the config after it was made (config.vocab_size = 0, config.moe = {...}) are checked as the
        # constructor checks them: they were built as they were, or failed deep in a layer naming no field
        config.validate_zoo()
        super().__init__(config)
        trust = not getattr(config, "_from_disk", False) or _TRUSTED_LOAD.get()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model, padding_idx=None)
        layers = []
        pattern = [c for c in config.layers if not c.isspace()] if isinstance(config.layers, str) else None
        for i, spec in enumerate(config.layer_specs()):
            kwargs = {k: v for k, v in spec.items() if k not in ("type", "ffn")}
            cls = get_mixer(spec["type"], trust_remote_code=trust)
            if is_dotted_path(spec["type"]):  # imported only now: its options are checked here, not by the config
                at = f"mixers.{pattern[i]}" if pattern else f"layers[{i}]"
                kwargs = coerce_mixer_options(cls, kwargs, at)
                check_mixer_options(cls, {**spec, **kwargs}, config.d_model, at, f"layers[{i}]")
            mixer = cls(config.d_model, i, **kwargs)
            if spec["ffn"] == "swiglu":
                ffn = SwiGLU(config.d_model, config.ffn_spec()["hidden"])
            elif spec["ffn"] == "moe":
                moe = config.moe_spec()
                ffn = MoE(config.d_model, moe["hidden"], moe["n_experts"], moe["top_k"], moe["normalize_topk"])
            else:
                ffn = None
            layers.append(Block(mixer, config.d_model, ffn, config.norm_eps, config.residual_in_fp32))
        self.layers = nn.ModuleList(layers)
        # one residual branch per mixer and per ffn (mamba_ssm's n_residuals_per_layer: 1 without an MLP, 2 with):
        # their output projections start at initializer_range / sqrt(branches) (_init_weights)
        branches = sum(1 + (block.ffn is not None) for block in layers)
        for block in layers:
            for proj in _residual_outputs(block):
                proj._residual_branches = branches
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        self._checkpointed = set(range(len(self.layers)))  # which blocks checkpoint when it is on (every_n_layers)
        self._checkpoint_every = 1
        self.post_init()

    def __setattr__(self, name: str, value) -> None:
        if name == "layers" and "layers" in self._modules and isinstance(value, nn.ModuleList):
            self._follow_replicated_layers(value)
        super().__setattr__(name, value)

    def _follow_replicated_layers(self, blocks: nn.ModuleList) -> None:
        """PEFT's layer_replication (LoraConfig) puts a new list of blocks here, copies of the model's own sharing
        their weights (blocks [0, 4) then [2, 8), say), then sets config.num_hidden_layers to its length: the config's
        `layers` is made the list of the copied blocks' specs (their ffn included), so that the count agrees, a saved
        config builds that stack, and gradient checkpointing covers the new blocks. Without it the count was refused
        as disagreeing with `layers` ("drop num_hidden_layers"), with the model's blocks already replaced. Any other
        list (not copies of these blocks) is left as it is."""
        old = list(self._modules["layers"])
        if len(blocks) == len(old) and all(a is b for a, b in zip(blocks, old)):
            return
        owner = {id(p): i for i, block in enumerate(old) for p in block.parameters()}
        sources = []
        for block in blocks:
            found = {owner.get(id(p)) for p in block.parameters()}
            if len(found) != 1 or None in found:
                return
            sources.append(found.pop())
        specs = self.config.layer_specs()
        self.config.layers = [dict(specs[i]) for i in sources]
        every = getattr(self, "_checkpoint_every", 1)
        self._checkpointed = {i for i in range(len(blocks)) if every is not None and i % every == 0}

    def _has_attention(self) -> bool:
        """Whether a layer's mixer is zoo's attention (packed rows then take the varlen kernels' cu_seqlens)."""
        from zoo.mixers.attention import Attention

        return any(isinstance(block.mixer, Attention) for block in self.layers)

    def _cacheable(self) -> bool:
        """Whether every mixer makes a cache entry (`init_state`): a custom mixer may define none, and the model then
        runs without a cache (ZooCache.for_model names the mixer when one is asked for)."""
        return all(hasattr(block.mixer, "init_state") for block in self.layers)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, seq_idx=None, return_dict=None,
                output_router_logits=None, **kwargs) -> ZooModelOutput | tuple:
        """input_ids [B, T]; attention_mask [B, past+T] (1 = token); seq_idx [B, T] marks packed documents (without
        it, position_ids that restart mark them, or cu_seq_lens_q, as transformers' padding-free collator gives
        them).

        seq_idx: integer ids [B, T] (or [1, T] for every row) on the input's device, of this chunk's tokens alone.
        Each run of equal consecutive ids is one document: only a change from one token to the next starts one, so
        the values themselves mean nothing (negative ones included) and an id met again after another starts a new
        document. mamba_ssm's kernels differ (they compare ids by value and read negative ids as padding); zoo has
        no padding id: mark padding with attention_mask. With a cache, each row's first run continues the cache
        (its states and cached keys) unless the chunk before it ran with seq_idx and ended on another id; then it
        starts a new document. Its shape, dtype and device are checked here, never its values (on a GPU that would
        cost a device sync per call), on CPU and GPU alike.

        The cache (a ZooCache) comes as `past_key_values` or, as transformers now names it, `cache`.
        output_hidden_states, output_router_logits and return_dict default to the config's, as in transformers.
        The output's aux_loss is the MoE load-balancing loss (None without MoE layers); router_logits, asked for,
        the MoE layers' router logits ([B * T, n_experts] each), as transformers' Jamba gives them."""
        past_key_values = _the_cache(past_key_values, kwargs)
        _refuse_offloaded_mixers_once(self)
        # generate's steps (prepare_inputs_for_generation) and zoo.decode's (`decoding()`) never read it
        skip_aux_loss = kwargs.pop(_SKIP_AUX_LOSS, False) or in_decoding()
        _refuse_output_attentions(self.config, kwargs)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        Bsz, T = x.shape[:2]
        seq_idx = seq_idx_from_cu_seqlens(kwargs, seq_idx, x.shape[:2])
        if use_cache is None:  # the config default caches for inference only; training asks explicitly (TBPTT)
            use_cache = self.config.use_cache and not self.training and self._cacheable()
        if use_cache and past_key_values is None:
            past_key_values = ZooCache.for_model(self)
        if past_key_values is not None and not isinstance(past_key_values, ZooCache):
            raise _not_a_zoo_cache(past_key_values)
        if past_key_values is not None:
            if getattr(past_key_values, "rows_lost", None):
                raise ValueError(past_key_values.rows_lost)
            past_key_values.apply_pending_reorder()  # beam search's, held back for its last step (_beam_search)
            _check_cache(self, past_key_values, Bsz)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past == 0 and not torch.compiler.is_compiling():  # (traced, the count would recompile every call)
            new_sequence()  # the mixers' decoded constants follow weights changed through .data since the last one
        if attention_mask is not None:
            _check_attention_mask(attention_mask, Bsz, T, past)
            # a [1, T] mask serves every row: made [B, T] here (a view), as the MoE aux loss reads one entry per token
            attention_mask = attention_mask.expand(Bsz, -1)
        if position_ids is not None:
            _check_position_ids(position_ids, Bsz, T, past)
        if seq_idx is not None:
            given = input_ids if input_ids is not None else inputs_embeds
            seq_idx = _check_seq_idx(seq_idx, Bsz, T, past, given.device)
        if seq_idx is None and attention_mask is None and position_ids is not None and past == 0:
            seq_idx = packed_seq_idx(position_ids.expand(Bsz, T))  # documents packed by position_ids alone
        elif seq_idx is None and attention_mask is None and position_ids is not None and T > 1 \
                and not torch.compiler.is_compiling():
            _refuse_restarts_after_a_cache(position_ids.expand(Bsz, T), past)
        if position_ids is None:
            if attention_mask is not None:
                # left padding: each row's positions start at its first real token
                position_ids = last_columns((attention_mask.long().cumsum(-1) - 1).clamp(min=0), T)
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(Bsz, T)
                pads = getattr(past_key_values, "pads", None)
                if pads is not None:  # a static cache of left-padded rows (to_static(pads=)): from each first token
                    position_ids = position_ids - pads.to(x.device)[:, None]
        if past_key_values is not None:
            attention_mask = _check_static_step(past_key_values, T, attention_mask, seq_idx)
            _check_mask_covers_cached_keys(self, past_key_values, attention_mask, T)
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()  # (a row expanded to every row: made whole once here)
            if x.is_cuda and past == 0 and attention_mask is None and self._has_attention() \
                    and not torch.compiler.is_compiling():
                # packed attention's one device sync (cu_seqlens), taken now while the device's queue is short: in
                # a hybrid the first attention layer would otherwise drain it mid-forward; the layers reuse it
                from zoo_kernels.attention import varlen_meta

                varlen_meta(seq_idx, None, T, T)
        hidden_states = [x] if output_hidden_states else None
        router_logits = []  # the MoE layers'
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and past_key_values is not None and not getattr(self, "_warned_cache_checkpointing", False) \
                and any(past_key_values.layers[i] is not None for i in self._checkpointed):
            self._warned_cache_checkpointing = True  # once per model: truncated BPTT meets this every chunk
            warnings.warn("gradient checkpointing does not apply to the blocks that carry a cache (use_cache=True or "
                          "past_key_values in training, as truncated BPTT's chunks run): rerun in the backward, they "
                          "would update their cache entries a second time, so they keep their activations. Pass "
                          "use_cache=False to checkpoint them", stacklevel=3)
        fusable = x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16)  # the kernel adds in fp32
        add_norm = fused_add_norm() if fusable and not torch.is_grad_enabled() and not output_hidden_states else None
        try:
            if add_norm is not None:  # inference on CUDA: each residual add runs inside the next norm's kernel
                pending = None
                for i, block in enumerate(self.layers):
                    layer_cache = past_key_values.layers[i] if past_key_values is not None else None
                    x, pending, logits = block.forward_pending(x, pending, add_norm, layer_cache, seq_idx, position_ids,
                                                               attention_mask)
                    if logits is not None:
                        router_logits.append(logits)
                x = add_then_norm(add_norm, self.norm_f, x, pending, self.norm_f.weight.dtype)[1]
            else:
                for i, block in enumerate(self.layers):
                    layer_cache = past_key_values.layers[i] if past_key_values is not None else None
                    if checkpointing and layer_cache is None and i in self._checkpointed:
                        x, logits = self._gradient_checkpointing_func(block, x, None, seq_idx, position_ids,
                                                                      attention_mask)
                    else:
                        x, logits = block(x, layer_cache, seq_idx, position_ids, attention_mask)
                    if logits is not None:
                        router_logits.append(logits)
                    if output_hidden_states:
                        hidden_states.append(x)
                x = self.norm_f(x.to(self.norm_f.weight.dtype))  # a residual kept in fp32 returns to the weights' dtype
        except MixedAdapterBatchError:
            # PEFT removes the adapter_names hooks of a mixed batch only when the call returns: left on, they made
            # every later call of the model a mixed batch of those rows
            drop_adapter_names_hooks(self)
            raise
        if output_hidden_states:
            hidden_states[-1] = x
        if past_key_values is not None:
            past_key_values.seen_tokens += T
        aux_loss = None
        if router_logits and not skip_aux_loss:  # padding counts for no expert
            moe = self.config.moe_spec()
            mask = last_columns(attention_mask, T)
            aux_loss = load_balancing_loss(router_logits, moe["n_experts"], moe["top_k"], mask)
        out = ZooModelOutput(last_hidden_state=x, **{_OUTPUT_CACHE: past_key_values},
                             hidden_states=tuple(hidden_states) if hidden_states else None,
                             router_logits=tuple(router_logits) if output_router_logits else None, aux_loss=aux_loss)
        return out if _return_dict(self.config, return_dict) else out.to_tuple()

# the names generate takes the cache a generation continues under, in its order: transformers 5.2x renames its
# deprecated past_key_values and cache_params to cache where cache is not given (and drops them where it is)
_GENERATE_CACHE_NAMES = ("cache", "past_key_values", "cache_params") if GENERATE_CACHE_KWARG == "cache" \
    else ("past_key_values",)


def _generate_cache(kwargs: dict):
    """The cache generate's keyword arguments give it to continue (None: none), under whichever name it reads.
    zoo's checks read cache and past_key_values alone: a cache passed as cache_params (transformers' Mamba's name)
    got past them, and a cache holding the whole prompt then failed on packed documents and seq_idx."""
    return next((kwargs[name] for name in _GENERATE_CACHE_NAMES if name in kwargs), None)


def _refuse_a_cache_that_holds_the_whole_prompt(args: tuple, kwargs: dict) -> None:
    """generate continues a cache by running the prompt's tokens past the cached ones (transformers slices
    input_ids[:, cached:] when the attention_mask, or none, is as long as input_ids); a cache that already holds
    every prompt token left nothing to run: transformers then feeds the whole prompt again (LlamaForCausalLM appends
    its keys a second time, silently), and the forward refused it with a message about packed documents and seq_idx.
    Raise, naming the fix."""
    cache = _generate_cache(kwargs)
    if not isinstance(cache, ZooCache) or not cache.get_seq_length():
        return
    prompt = kwargs.get("inputs_embeds")
    if prompt is None:
        prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    mask = kwargs.get("attention_mask")
    if not torch.is_tensor(prompt) or (mask is not None and mask.shape[-1] != prompt.shape[1]):
        return  # new tokens alone, with a mask over the cached and new ones: transformers runs them all
    cached = cache.get_seq_length()
    if prompt.shape[1] <= cached:
        raise ValueError(f"generate: past_key_values already holds {cached} tokens and the prompt has "
                         f"{prompt.shape[1]}; generate takes the cached tokens and the new ones as input_ids and runs "
                         f"those past the cache, so at least the last prompt token must be uncached (the cache keeps "
                         f"no logits to pick the next token from). Build the cache from input_ids[:, :-1], or pass "
                         f"the new tokens alone with an attention_mask over the cached and new tokens")


def _seq_idx_of_a_prompt_packed_by_position_ids(args: tuple, kwargs: dict, config) -> None:
    """generate with prefill_chunk_size over a prompt packed by position_ids alone: each chunk after the first
    continues the cache, where position_ids no longer tell the documents apart (ZooModel.forward refuses a chunk
    that restarts them, and a chunk of one token, whose check would cost every decode step a device sync, ran as a
    continuation of the document before it: wrong tokens, no error). The prompt's documents are given as seq_idx
    instead (what the forward derives from them for the whole prompt), which every chunk and decode step follows."""
    position_ids = kwargs.get("position_ids")
    chunked = getattr(config, "prefill_chunk_size", None)  # generate's merged settings
    if not torch.is_tensor(position_ids) or not chunked or kwargs.get("seq_idx") is not None:
        return
    if _generate_cache(kwargs) is not None:
        return  # a cache made without seq_idx has no document ids to continue
    prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    mask = kwargs.get("attention_mask")
    if not torch.is_tensor(prompt) or prompt.shape[-1] != position_ids.shape[-1]:
        return
    if mask is not None and not bool(mask.all()):
        return  # padding: the forward reads no documents from position_ids either
    seq_idx = packed_seq_idx(position_ids.expand(prompt.shape[0], -1))
    if seq_idx is not None:
        kwargs["seq_idx"] = seq_idx


def _seq_idx_of_every_row(args: tuple, kwargs: dict) -> None:
    """generate(input_ids [B, T], seq_idx [1, T]): the forward takes one row of ids for every row, but generate
    repeats each row's keyword tensors for beams and num_return_sequences (repeat_interleave), which made [n, T] of
    the one row for the B * n rows, refused naming a shape the caller never passed. The row is given to every prompt
    row first."""
    seq_idx = kwargs.get("seq_idx")
    prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
    if torch.is_tensor(seq_idx) and torch.is_tensor(prompt) and seq_idx.dim() == 2 and seq_idx.shape[0] == 1 \
            and prompt.dim() >= 2:
        kwargs["seq_idx"] = seq_idx.expand(prompt.shape[0], -1)


def _refuse_a_chunked_prefill_of_inputs_embeds(args: tuple, kwargs: dict, config) -> None:
    """transformers' chunked prefill (prefill_chunk_size) splits input_ids into chunks and hands each the whole
    inputs_embeds: given embeddings alone (input_ids then [B, 0]) or beside ids longer than one chunk, the forward met
    a chunk's mask and positions beside the whole prompt's embeddings and failed inside ("The expanded size of the
    tensor (7) must match the existing size (0)"); transformers' Llama fails likewise, and its Mamba-2 and Jamba
    prefill the whole prompt or decode from the wrong embeddings. Raise, naming the fix."""
    chunk = getattr(config, "prefill_chunk_size", None)  # generate's merged settings
    if chunk is None or kwargs.get("inputs_embeds") is None:
        return
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if torch.is_tensor(ids) and ids.dim() == 2 and 0 < ids.shape[1] <= chunk:
        return  # one chunk: the prompt's ids and embeddings run together
    raise ValueError(f"generate: prefill_chunk_size={chunk} with inputs_embeds: transformers' chunked prefill splits "
                     f"input_ids into chunks and passes the whole inputs_embeds with each, so the chunks cannot run; "
                     f"generate from input_ids to prefill in chunks, or drop prefill_chunk_size")


# transformers' chunked prefill starts at the cache's length from 5.21 on; before, at the prompt's first token
_CHUNKS_PAST_THE_CACHE = Version(transformers.__version__).release[:2] >= (5, 21)  # (5.21.0rc1, 5.22.0.dev0 too)


def _refuse_a_chunked_prefill_over_a_cache(kwargs: dict, config) -> None:
    """transformers before 5.21 splits the whole prompt into prefill_chunk_size chunks from its first token, also
    where the given cache (past_key_values) already holds the first ones, and runs every chunk past the cache: the
    cached tokens went into it a second time, so a Mamba / Mamba-2 / GLA model decoded from states that had read them
    twice (wrong logits, no error: 0.07 on the tiny GLA's first step) and a model with attention layers was refused
    naming a mask shorter than its keys. Raise there, naming the fix; later transformers run the uncached tokens
    alone."""
    if _CHUNKS_PAST_THE_CACHE or getattr(config, "prefill_chunk_size", None) is None:
        return
    cache = _generate_cache(kwargs)
    if isinstance(cache, ZooCache) and cache.get_seq_length():
        raise ValueError(f"generate: prefill_chunk_size={config.prefill_chunk_size} with a cache that holds "
                         f"{cache.get_seq_length()} tokens: transformers {transformers.__version__} prefills the "
                         f"prompt in chunks from its first token, running the cached tokens into the cache again. "
                         f"Drop prefill_chunk_size (the uncached tokens then run in one forward), or use "
                         f"transformers >= 5.21")


def _in_prompt_learning(model) -> bool:
    """Whether PEFT's prompt learning (prompt tuning, P-tuning) runs this generate call: its generate swaps its own
    prepare_inputs_for_generation onto the model for the call, which prepends the virtual tokens while the cache is
    empty (LoRA's generate swaps it onto its tuner wrapper, not onto the model)."""
    swapped = model.__dict__.get("prepare_inputs_for_generation")
    peft = getattr(swapped, "__self__", None)
    return peft is not None and peft is not model \
        and bool(getattr(getattr(peft, "active_peft_config", None), "is_prompt_learning", False))


def _refuse_a_filled_cache_with_prompt_learning(model, kwargs: dict) -> None:
    """A cache that holds tokens, given to generate through PEFT's prompt learning: it counts the virtual tokens PEFT
    prepended when it was filled, which transformers takes for prompt tokens, so it runs the new tokens from the wrong
    place (transformers' Llama decodes other tokens without an error; zoo failed in transformers' check of the
    keyword arguments, "not used by the model: ['cache']", or named a cache holding the whole prompt). Raise, naming
    the fix."""
    cache = _generate_cache(kwargs)
    if isinstance(cache, ZooCache) and cache.get_seq_length() and _in_prompt_learning(model):
        raise ValueError(f"generate: past_key_values holds {cache.get_seq_length()} tokens, given with PEFT's prompt "
                         f"learning (prompt tuning / P-tuning): the cache counts the virtual tokens PEFT prepended, "
                         f"which generate takes for prompt tokens, so it would run the new tokens from the wrong "
                         f"place. Generate from the whole sequence without the cache (an empty one, "
                         f"ZooCache.for_model(model), is taken)")


def _refuse_a_chunked_prefill_of_prompt_learning(model, args: tuple, kwargs: dict, config) -> None:
    """PEFT's prompt learning (prompt tuning, P-tuning) swaps in its prepare_inputs_for_generation for the call, which
    prepends the virtual tokens while the cache is empty: with prefill_chunk_size, to the first chunk. The cache then
    counts them, so transformers' chunked prefill took the later chunks for cached tokens and ran one token of each:
    most of the prompt was skipped (other logits, no error; with an attention_mask zoo refused the step, naming a mask
    length). transformers' Llama decodes wrongly too. A prompt that fits one chunk (its tokens less the last, which
    the first decode step takes) is not split and decodes right. Raise where it is split, naming the fix."""
    chunk = getattr(config, "prefill_chunk_size", None)  # generate's merged settings
    if chunk is None or not _in_prompt_learning(model):
        return
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if torch.is_tensor(ids) and ids.dim() == 2 and ids.shape[1] - 1 <= chunk:
        return
    raise ValueError(f"generate: prefill_chunk_size={chunk} with PEFT's prompt learning (prompt tuning / P-tuning): "
                     f"the virtual tokens it prepends to the first chunk count in the cache, so transformers' chunked "
                     f"prefill takes the later chunks as cached and skips most of their tokens. Drop "
                     f"prefill_chunk_size, or make it at least the prompt's length")


# generate's own parameters, in order (after self): its other keyword arguments are generation settings or model inputs
_GENERATE_PARAMETERS = tuple(name for name, p in inspect.signature(GenerationMixin.generate).parameters.items()
                             if p.kind is p.POSITIONAL_OR_KEYWORD and name != "self")


def _generate_arguments(model, args: tuple, kwargs: dict) -> tuple[dict, object]:
    """generate's named arguments (those given positionally too) and the generation settings it will run with,
    merged by transformers' own `_prepare_generation_config`: the generation_config passed (positionally or not; a
    blank one if none), what it leaves unset taken from model.generation_config, then generate's keyword arguments
    over both. zoo's checks read these: one that read the generation_config passed or else the model's missed a
    setting that only the model's held beside a passed one (and one passed positionally), which then failed further
    on with transformers' generic error ("Assisted decoding requires a cache that can be cropped", a Hub fetch of
    contrastive search, a shape error of a chunked prefill) or ran wrongly."""
    named = dict(zip(_GENERATE_PARAMETERS, args))
    named.update((name, kwargs[name]) for name in _GENERATE_PARAMETERS if name in kwargs)
    # what generate takes out of its keyword arguments before it reads the settings
    settings = {name: value for name, value in kwargs.items() if name not in _GENERATE_PARAMETERS
                and name not in ("trust_remote_code", "tokenizer", "assistant_tokenizer")}
    config, _ = model._prepare_generation_config(named.get("generation_config"), **settings)
    return named, config


def _generation_mode(config, assistant_model) -> GenerationMode:
    """The decoding method generate will run with these settings: transformers' own choice. (It refused assisted
    decoding and contrastive search by its own reading of the settings, also where transformers runs another method:
    prompt lookup or an assistant beside beams, which beam search ignores, or penalty_alpha with top_k=None, greedy.)
    Its warning about flags it ignores is left to generate's own call."""
    log = logging.getLogger(type(config).__module__)
    was, log.disabled = log.disabled, True
    try:
        return config.get_generation_mode(assistant_model)
    finally:
        log.disabled = was


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """ZooModel with a language-modelling head (tied to the embedding when config.tie_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        # recurrent states cannot be rolled back, so assisted decoding is refused (generate)
        self._is_stateful = any(isinstance(b.mixer.init_state(1, torch.float32, "cpu"), RecurrentLayer)
                                for b in self.model.layers if hasattr(b.mixer, "init_state"))
        if getattr(config, "_attn_implementation", None) == "eager":
            warnings.warn("attn_implementation='eager' does not change zoo's attention: each attention mixer picks "
                          "its kernel from its spec's attn_backend ('auto' by default; 'math' is the plain "
                          "reference), e.g. mixers: {A: {type: attention, attn_backend: math}}", stacklevel=2)
        self.post_init()

    def generate(self, *args, cuda_graph: bool | str = False, **kwargs):
        """transformers' generate; assisted decoding (assistant_model, prompt_lookup_num_tokens) is refused on a
        model with Mamba, Mamba-2 or GLA layers: it rolls rejected tokens back out of the cache, and their states
        keep no per-token history (attention-only models take it).

        cuda_graph=True (as mamba_ssm's generate(cg=True)): decode with each step captured in a CUDA graph and the
        KV cache made static (zoo.decode.static_generate), for greedy decoding or sampling with temperature, top_k
        and top_p up to max_new_tokens or eos, on left-padded or unpadded rows; returns the sequences [B, T + n].
        An eager decode step of a small model is bound by the host's kernel launches; the graph replays them in
        one. Settings it has no equivalent for raise ValueError. cuda_graph="reuse" also keeps the graph and its
        buffers on the model for the next call with the same batch and settings (as mamba_ssm keeps its decoding
        cache), which then skips the warm-up and the capture; `release_cuda_graph()` frees them."""
        if cuda_graph not in (False, True, "reuse"):
            raise ValueError(f"cuda_graph must be False, True or 'reuse', got {cuda_graph!r}")
        self.__dict__.pop(_MASK_VERDICT, None)  # a mask changed in place between two calls is read again
        # the decoded constants follow weights written through .data since the last call, also where it continues
        # a kept cache (past > 0: the forward starts no new sequence), as transformers' models run on the weights
        new_sequence()
        if cuda_graph:
            from zoo.decode import static_generate

            if len(args) > 2:
                raise ValueError("generate(cuda_graph=True): pass input_ids and generation_config positionally and "
                                 "the rest by keyword")
            if len(args) == 2:  # generate's second parameter
                if "generation_config" in kwargs:
                    raise TypeError("generate() got multiple values for argument 'generation_config'")
                args, kwargs["generation_config"] = args[:1], args[1]
            own = type(self).prepare_inputs_for_generation
            swapped = self.__dict__.get("prepare_inputs_for_generation")
            if swapped is not None and getattr(swapped, "__func__", None) is not own:
                # PEFT's prompt learning swaps in its own preparation for the call, which adds the virtual tokens
                # (or the prefix's keys and values) at each step; the static decode calls the model directly
                raise ValueError("generate(cuda_graph=True): this model's prepare_inputs_for_generation is replaced "
                                 "for this call (PEFT prompt, prefix or P-tuning adds its virtual tokens there), "
                                 "which the static decode does not run; generate without cuda_graph")
            names = [name for name in ("inputs", "input_ids") if kwargs.get(name) is not None]
            prompts = list(args[:1]) + [kwargs.pop(name) for name in names]
            if len(prompts) > 1:
                raise ValueError(f"generate(cuda_graph=True): the prompt is given twice ({', '.join(names)}"
                                 f"{' and positionally' if args else ''}); pass it once")
            input_ids = prompts[0] if prompts else None
            return static_generate(self, input_ids, kwargs.pop("generation_config", None), graph=True,
                                   reuse=cuda_graph == "reuse", **kwargs)
        named, config = _generate_arguments(self, args, kwargs)
        draft = named.get("assistant_model")
        mode = _generation_mode(config, draft)
        if self._is_stateful and mode == GenerationMode.ASSISTED_GENERATION:
            names = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")
            asked = ["assistant_model"] if draft is not None else []
            asked += [n for n in names if getattr(config, n, None) not in (None, False)]
            raise ValueError(f"generate: {asked[0] if asked else mode.value} (assisted decoding) needs a cache that "
                             f"can roll back rejected tokens; this model's Mamba / Mamba-2 / GLA states cannot. "
                             f"Generate without it")
        if self._is_stateful and mode == GenerationMode.CONTRASTIVE_SEARCH:
            # transformers 5 fetches contrastive search from the Hub, whose code refuses stateful models
            raise ValueError("generate: penalty_alpha (contrastive search) rolls the cache back after scoring "
                             "each step's top_k candidates, which this model's Mamba / Mamba-2 / GLA states "
                             "cannot; generate without it (greedy, sampling or beams)")
        if mode == GenerationMode.ASSISTED_GENERATION and getattr(draft, "_is_stateful", False) is True:
            # a zoo model (or a PEFT model of one) with recurrent layers
            raise ValueError("generate: the assistant_model has recurrent (Mamba / Mamba-2 / GLA) layers; assisted "
                             "decoding rolls the assistant's cache back past the drafted tokens the main model "
                             "rejects, which their states cannot. Use an assistant of attention layers only, or "
                             "generate without one")
        if config.use_cache is False and _generate_cache(kwargs) is not None and kwargs.get("inputs_embeds") is None:
            # transformers then feeds every step the whole sequence, which the forward ran past the given cache: the
            # prompt went into it and the next step was refused naming packed documents (position_ids restart); a
            # model whose config.use_cache is False (a training checkpoint's) meets it when continuing a chat
            raise ValueError("generate: a cache is given (past_key_values / cache) but use_cache is False (passed, "
                             "or the model's generation_config.use_cache, which follows config.use_cache): each step "
                             "would rerun the whole sequence past the cache. Pass use_cache=True to continue the "
                             "cache, or generate without it")
        _refuse_a_filled_cache_with_prompt_learning(self, kwargs)
        _refuse_a_cache_that_holds_the_whole_prompt(args, kwargs)
        from zoo.decode import warn_if_right_padded

        warn_if_right_padded(kwargs.get("attention_mask"))
        _seq_idx_of_a_prompt_packed_by_position_ids(args, kwargs, config)
        _seq_idx_of_every_row(args, kwargs)
        _refuse_a_chunked_prefill_of_inputs_embeds(args, kwargs, config)
        _refuse_a_chunked_prefill_over_a_cache(kwargs, config)
        _refuse_a_chunked_prefill_of_prompt_learning(self, args, kwargs, config)
        if not self.model._cacheable() and kwargs.get("use_cache") is None and config.use_cache is not False \
                and _generate_cache(kwargs) is None:
            # a custom mixer without init_state keeps no cache: each step reruns the whole sequence (correct, slower)
            mixer = next(b.mixer for b in self.model.layers if not hasattr(b.mixer, "init_state"))
            missing = type(mixer).__name__
            if (wrapped := wrapped_mixer(mixer)) is not None:
                warnings.warn(f"generate: mixer {wrapped}, so the model keeps no cache and each new token reruns the "
                              f"whole sequence; merge the adapter (merge_and_unload) to decode step by step",
                              stacklevel=2)
            else:
                warnings.warn(f"generate: mixer {missing} defines no init_state, so the model keeps no cache and "
                              f"each new token reruns the whole sequence; give {missing} init_state(batch_size, "
                              f"dtype, device, max_len=None) to decode step by step", stacklevel=2)
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        """Refused: transformers' continuous batching (init_continuous_batching, generate_batch, and generate with
        cache_implementation="paged", which switches to it) keeps every layer's keys and values in its paged cache,
        which holds no Mamba / Mamba-2 / GLA states and which zoo's attention does not read. It failed after setting
        the model's generation_config.eos_token_id to -1, naming a config field ("num_key_value_heads or
        num_attention_heads could not be found in the config")."""
        raise ValueError("continuous batching (generate_batch, init_continuous_batching, or generate with "
                         "cache_implementation='paged') is not supported by zoo models: transformers' paged cache "
                         "holds attention keys and values only, not the recurrent (Mamba / Mamba-2 / GLA) states, and "
                         "zoo's attention layers keep their own cache. Use generate on a left-padded batch (with its "
                         "attention_mask) without cache_implementation='paged'")

    def release_cuda_graph(self) -> bool:
        """Free the CUDA graph and static buffers that generate(cuda_graph="reuse") kept; whether there were any."""
        from zoo.decode import release_graph

        return release_graph(self)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """transformers' preparation, plus the seq_idx of a packed prompt (generate(input_ids, seq_idx=...)):
        transformers forwards it unchanged to every step, so a decode step of one token met the prompt's [B, T]
        ids (wrong logits, or a shape error in Mamba-2). Each step gets the ids of the positions it runs (past the
        cache: a continued cache, prefill_chunk_size's chunks), the new tokens continuing the prompt's last
        document."""
        if self._mask_is_all_ones(kwargs):
            # an all-ones mask (what transformers 5.17 passes for unpadded rows; 5.2x drops it itself) says
            # nothing: without it each attention layer runs its causal kernel instead of building a dense key mask
            # (on flash-attn, packing the rows: a device sync), and the recurrent layers skip multiplying by 1
            kwargs["attention_mask"] = None
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get(GENERATE_CACHE_KWARG) if GENERATE_CACHE_KWARG != "past_key_values" else None
        if isinstance(cache, ZooCache) and cache.get_seq_length():
            # a filled cache also under the old name, which PEFT's prompt learning reads from these inputs (peft
            # 0.21): without it, prompt tuning / P-tuning prepended the virtual tokens again at every decode step
            # (wrong tokens, no error)
            inputs.setdefault("past_key_values", cache)
        seq_idx = inputs.get("seq_idx")
        rows = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if torch.is_tensor(seq_idx) and rows is not None:
            cache = inputs.get(GENERATE_CACHE_KWARG, inputs.get("past_key_values"))
            past = cache.get_seq_length() if isinstance(cache, ZooCache) else 0
            tokens, held = rows.shape[1], seq_idx.shape[-1]
            if past or tokens != held:  # without a cache each step reruns the prompt and the tokens so far
                at = torch.arange(past, past + tokens, device=seq_idx.device).clamp(max=held - 1)
                inputs["seq_idx"] = seq_idx[:, at]
        # generate reads the logits and the cache of each step's output, never its aux_loss: the MoE layers'
        # load-balancing loss (a softmax, top-k and scatter per MoE layer) is not computed for it
        inputs[_SKIP_AUX_LOSS] = True
        return inputs

    # generate checks its keyword arguments (cache=, attention_mask=, ...) against this signature: keep transformers'
    prepare_inputs_for_generation.__signature__ = inspect.signature(GenerationMixin.prepare_inputs_for_generation)

    def _mask_is_all_ones(self, kwargs: dict) -> bool:
        """Whether generate's attention_mask for this step is all ones. Read on the device once per generate call
        (one sync, at its first step): each later step's mask is the one `_update_model_kwargs_for_generation`
        extended with ones, known by identity. transformers from 5.2x drops such a mask itself before the first
        step (after deriving position_ids from it, as 5.17 does too): without a mask, position_ids that restart mark
        packed documents, as they then do on those versions."""
        mask = kwargs.get("attention_mask")
        if not torch.is_tensor(mask) or mask.dim() != 2 or torch.compiler.is_compiling():
            return False
        known = self.__dict__.get(_MASK_VERDICT)
        if known is not None and known[0]() is mask:
            return known[1]
        ones = bool(mask.all())
        self.__dict__[_MASK_VERDICT] = (weakref.ref(mask), ones)
        return ones

    def __getstate__(self) -> dict:
        """The model's state for pickle / torch.save / deepcopy, without the mask verdict of the last generate: it
        holds a weakref, which cannot be pickled (and a copy reads its own masks again)."""
        state = dict(super().__getstate__())
        state.pop(_MASK_VERDICT, None)
        return state

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """transformers' update, which appends ones to the attention_mask: the verdict on the old mask carries over
        to the new one (see `_mask_is_all_ones`)."""
        old = model_kwargs.get("attention_mask")
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        new = model_kwargs.get("attention_mask")
        known = self.__dict__.get(_MASK_VERDICT)
        if known is not None and old is not None and known[0]() is old and torch.is_tensor(new) and new is not old:
            self.__dict__[_MASK_VERDICT] = (weakref.ref(new), known[1])
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None,
                                      **model_kwargs):
        """transformers' expansion of the inputs for beams and num_return_sequences, plus the cache a generation
        continues from (past_key_values): transformers repeats the tensors only, so a cache of B rows met B·n inputs
        and the first step failed. Each cached row is repeated as its input row is."""
        cache = model_kwargs.get(GENERATE_CACHE_KWARG, model_kwargs.get("past_key_values"))
        if expand_size > 1 and isinstance(cache, ZooCache) and input_ids is not None \
                and cache.batch_size == input_ids.shape[0]:
            cache.batch_repeat_interleave(expand_size)
        return super()._expand_inputs_for_generation(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                                     input_ids=input_ids, **model_kwargs)

    def _beam_search(self, input_ids, *args, **kwargs):
        """transformers' beam search, returning (return_dict_in_generate) a cache whose rows are those of the returned
        sequences, each the sequence less its last token, so that generate continues it with them: transformers
        reorders the cache after every step, the last one included, so it returned the rows of the beams still
        running, in their order (LlamaForCausalLM's too): a continuation read other beams' states and keys, or failed
        on the row count. Here the reorders are applied at the next step's forward (ZooCache.defer_reorders), and
        after the last step each returned sequence takes the row of the beam it extended (its beam_indices). A
        sequence that ended before the last step (eos) has no such row left: the cache then refuses to continue.
        A cache the caller passed (past_key_values) outlives the call, so it is treated so without
        return_dict_in_generate too (the dict is made for its beam_indices; the sequences are returned)."""
        config = kwargs.get("generation_config")
        cache = kwargs.get(GENERATE_CACHE_KWARG, kwargs.get("past_key_values"))
        if not isinstance(cache, ZooCache) or config is None:
            return super()._beam_search(input_ids, *args, **kwargs)
        sequences_only = not config.return_dict_in_generate
        if sequences_only:
            if not getattr(cache, "_is_user_defined", False):  # generate's own cache, dropped with the call
                return super()._beam_search(input_ids, *args, **kwargs)
            kwargs["generation_config"] = config = copy.copy(config)
            config.return_dict_in_generate = True
        cache.defer_reorders(True)
        try:
            out = super()._beam_search(input_ids, *args, **kwargs)
            steps = cache.deferred_reorders
        except BaseException:  # (a Ctrl-C between a step's reorder and the next forward): leave it reordered, as
            cache.defer_reorders(False)  # transformers leaves it, not with a reorder pending
            cache.apply_pending_reorder()
            raise
        finally:
            cache.defer_reorders(False)
        pending, cache.pending_rows = cache.pending_rows, None
        indices = getattr(out, "beam_indices", None)
        if pending is None or indices is None:
            cache.apply_pending_reorder()
            return out.sequences if sequences_only else out
        generated = (indices >= 0).sum(1)
        if bool((generated == steps).all()):
            cache.batch_select_indices(indices[:, steps - 1].to(torch.long))
        else:
            cache.reorder_cache(pending)  # as transformers leaves it; its rows are no returned sequence's
            cache.rows_lost = (f"past_key_values: this cache comes from a beam search, and a returned sequence "
                               f"ended (eos) {int(steps - generated.min())} step(s) before beam search's last: the "
                               f"cache holds no row for it (its rows went on with the beams that ran to the end), so "
                               f"it cannot be continued. Generate from the sequences without past_key_values")
        return out.sequences if sequences_only else out

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        if type(value) is nn.Linear:  # resize_token_embeddings builds a plain one: zoo's adds only a forward
            value.__class__ = Linear  # (its decode kernels), so the head keeps them
        self.lm_head = value

    def backend_report(self) -> dict[str, str]:
        """Which implementation each mixer runs on its device (logged by training and benchmarks)."""
        from zoo.backends import report

        return report(self)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, seq_idx=None,
                logits_to_keep: int | torch.Tensor = 0, return_dict=None, output_router_logits=None, cache=None,
                **kwargs) -> ZooCausalLMOutput | tuple:
        """Labels [B, T] are the input ids (shifted inside); -100 is ignored. In training mode the MoE aux loss
        (times moe.aux_loss_coef) is added; in eval mode `loss` is the cross-entropy alone (an eval loss, a
        perplexity), and `aux_loss` gives the aux loss in both. output_router_logits: also return the MoE layers'
        router logits (`router_logits`), as transformers' Jamba does.

        `num_items_in_batch` (what transformers' Trainer passes under gradient accumulation): the targets of the
        whole accumulated batch; the loss is then this micro-batch's sum over that count, as transformers' losses.

        A one-token step with a filled cache reads copies of Mamba / Mamba-2 weights (A, D, conv, dt) kept since
        the cache's prefill or chunk. A write through `.data` (an EMA copy, PEFT's merge_and_unload) or a fused
        optimizer step keeps a parameter's storage and version, so steps of your own loop that continue a cache
        after one read the old values until the next prefill, chunk or generate call: call
        `zoo.layers.new_sequence()` after such a write (generate and a forward from an empty cache do it).

        seq_idx (packed documents) is as ZooModel.forward describes it: integer ids [B, T], a document per run of
        equal consecutive ids."""
        # `cache` named in the signature, as transformers' models name it: generate checks its keyword arguments
        # against the forward's where a prepare_inputs_for_generation of PEFT's prompt learning replaces zoo's
        if cache is not None:
            kwargs["cache"] = cache
        past_key_values = _the_cache(past_key_values, kwargs)
        _refuse_offloaded_mixers_once(self)
        skip_aux_loss = kwargs.pop(_SKIP_AUX_LOSS, False) and labels is None
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        _refuse_output_attentions(self.config, kwargs)
        rows = input_ids if input_ids is not None else inputs_embeds
        if rows is not None:  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s boundaries
            seq_idx = seq_idx_from_cu_seqlens(kwargs, seq_idx, rows.shape[:2])
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, seq_idx=seq_idx, return_dict=True,
                             output_router_logits=output_router_logits, **{_SKIP_AUX_LOSS: skip_aux_loss})
        except MixedAdapterBatchError:
            drop_adapter_names_hooks(self)  # the head's too (ZooModel's forward dropped its own)
            raise
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:  # a tensor of positions, as transformers allows
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        aux = out.aux_loss
        if labels is not None:
            # next-token targets aligned with every position (the last has none), so the logits are read in place
            # by zoo_kernels.cross_entropy (fp32 math without an fp32 copy of the logits on CUDA); padded before the
            # shift, as transformers' ForCausalLMLoss: labels [B, 0] give no target (shifted first, they gave B)
            targets = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:].reshape(-1)
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-100)
            if aux is not None and self.training:  # a training regularizer, not part of an eval loss
                # (the aux loss is on the first MoE layer's device, the loss on lm_head's: a device_map may differ)
                loss = loss + self.config.moe_spec()["aux_loss_coef"] * aux.to(loss.device)
            if num_items_in_batch is not None:
                # the Trainer leaves the loss unscaled for accumulation when the model takes this count: the
                # micro-batches' losses must add up to the accumulated batch's mean, each weighted by its targets
                # a micro-batch without a target (all -100) adds 0, as transformers' sum-reduced loss does: its mean
                # is NaN, and NaN * 0 made the whole accumulated step's loss and gradients NaN
                count = (targets != -100).sum()
                share = loss * count / torch.as_tensor(num_items_in_batch, device=loss.device)
                loss = torch.where(count > 0, share, torch.zeros_like(share))
        result = ZooCausalLMOutput(loss=loss, logits=logits, **{_OUTPUT_CACHE: output_cache(out)},
                                   hidden_states=out.hidden_states, aux_loss=aux, router_logits=out.router_logits)
        # MixtralForCausalLM's tuple: aux_loss only beside the router logits (ZooCausalLMOutput.to_tuple)
        return result if _return_dict(self.config, return_dict) else result.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        user_cache = model_kwargs.get(GENERATE_CACHE_KWARG, model_kwargs.get("past_key_values"))
        implementation = getattr(generation_config, "cache_implementation", None)
        caching = user_cache is not None or generation_config.use_cache is not False
        if implementation not in (None, "dynamic") and caching:
            # also beside a cache of the caller's (transformers refuses a cache_implementation beside one): it was
            # ignored there without a word
            warnings.warn(f"cache_implementation={implementation!r} is ignored: zoo models decode with their own "
                          f"ZooCache (attention keys and values with recurrent states); for a static cache with each "
                          f"step in a CUDA graph, pass cuda_graph=True to generate (the model on CUDA)", stacklevel=3)
        if user_cache is not None:
            if not isinstance(user_cache, ZooCache):
                # a legacy tuple (or list) of keys and values per layer took generate's mark and failed with
                # "'tuple' object has no attribute '_is_user_defined'", naming nothing the caller passed
                raise _not_a_zoo_cache(user_cache)
            user_cache._is_user_defined = True
            room = [layer.capacity for layer in user_cache.static_layers()]
            if room and min(room) < max_cache_length:
                # checked before the first step: a full static layer raised KVCacheFull midway, losing the tokens
                # generated so far and leaving the user's cache full, so the call could not be retried with it
                raise KVCacheFull(f"generate: past_key_values is a static cache (ZooCache.to_static) with room for "
                                  f"{min(room)} tokens in all, but this call may need {max_cache_length} (the prompt "
                                  f"and max_new_tokens, less one); lower max_new_tokens (max_length), or make the "
                                  f"dynamic cache static with ZooCache.to_static(max_len >= {max_cache_length}): a "
                                  f"static cache cannot grow")
            return
        if generation_config.use_cache is False:
            return
        cache = ZooCache.for_model(self)
        if getattr(generation_config, "is_assistant", False) and hasattr(cache, "activate_past_recording"):
            # as transformers marks an assistant's new cache: a sliding-window layer then keeps the keys that cropping
            # the rejected drafts needs (without them transformers' crop raised once the window was full)
            # (transformers 5.17's takes no argument and keeps every key)
            keep = inspect.signature(cache.activate_past_recording).parameters
            cache.activate_past_recording(**({"recurrent_states_to_keep": generation_config.num_assistant_tokens}
                                             if "recurrent_states_to_keep" in keep else {}))
        model_kwargs[GENERATE_CACHE_KWARG] = cache


class ZooForSequenceClassification(ZooPreTrainedModel):
    """ZooModel with a `score` head (Linear d_model -> config.num_labels, no bias) read at each row's last token, as
    transformers' LlamaForSequenceClassification: the rightmost token that is not config.pad_token_id (left or right
    padding); without a pad_token_id only batches of one row. From inputs_embeds, the rightmost position the
    attention_mask marks. A causal LM's checkpoint loads into it: the backbone's weights, a new `score`, no lm_head.

    `loss` (labels given) follows config.problem_type as transformers' does: regression (MSE),
    single_label_classification (cross-entropy over labels [B]) or multi_label_classification (BCE over float labels
    [B, num_labels]); unset, it is inferred from num_labels and the labels' dtype. The MoE load-balancing loss is not
    added (transformers' Mixtral and Jamba classifiers add none); the output has no cache unless use_cache=True."""

    # an unused lm_head of a causal LM's checkpoint is expected here: no "weights not used" notice for it
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    # the loss is a mean over this batch's rows: transformers' Trainer divides it for gradient accumulation only when
    # the model does not take its num_items_in_batch (a forward with **kwargs is taken to)
    accepts_loss_kwargs = False

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ZooModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                **kwargs) -> SequenceClassifierOutputWithPast | tuple:
        """logits [B, num_labels] of each row's last token; labels [B] (class ids, or floats for regression) or
        [B, num_labels] (multi-label, floats). Other keywords (seq_idx, cache) go to ZooModel."""
        _refuse_offloaded_mixers_once(self)
        rows = input_ids if input_ids is not None else inputs_embeds
        if rows is None:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        batch, tokens = rows.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError(f"config.pad_token_id is None, so the last token of each of the {batch} rows cannot be "
                             f"told from padding; set it (from_pretrained(..., pad_token_id=tokenizer.pad_token_id), "
                             f"or model.config.pad_token_id = ...) or pass one row at a time")
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=bool(use_cache), output_hidden_states=output_hidden_states, return_dict=True,
                             **kwargs, **{_SKIP_AUX_LOSS: True})
        except MixedAdapterBatchError:
            drop_adapter_names_hooks(self)  # the score head's too (ZooModel's forward dropped its own)
            raise
        h = out.last_hidden_state
        positions = torch.arange(tokens, device=h.device)
        if pad is not None and input_ids is not None:  # the rightmost non-pad token: left and right padding alike
            last = (positions * (input_ids.to(h.device) != pad)).argmax(-1)
        elif pad is not None and attention_mask is not None:
            last = (positions * last_columns(attention_mask, tokens).to(h.device).bool()).argmax(-1)
        else:
            if pad is not None:
                warnings.warn("ZooForSequenceClassification: inputs_embeds without an attention_mask, so padding "
                              "cannot be found: each row is read at its last position", stacklevel=2)
            last = torch.full((batch,), tokens - 1, device=h.device)
        logits = self.score(h[torch.arange(batch, device=h.device), last])  # pooled first: one row each to score
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        result = SequenceClassifierOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE: output_cache(out)},
                                                  hidden_states=out.hidden_states)
        return result if _return_dict(self.config, return_dict) else result.to_tuple()


def _refuse_offloaded_mixers(model: nn.Module, where: str = "from_pretrained") -> None:
    """Raise when a device_map leaves a mixer that is not `offloadable` (Mamba, Mamba-2) to accelerate's offload
    hooks: on "disk", or on "cpu" while the model runs on an accelerator. Its forward would meet meta or host
    tensors ("Tensor on device cpu is not on the expected device meta!")."""
    device_map = getattr(model, "hf_device_map", None) or {}
    runs_elsewhere = any(str(d) not in ("cpu", "disk") for d in device_map.values())
    offloaded = {"disk", "cpu"} if runs_elsewhere else {"disk"}
    for name, module in model.named_modules():
        if getattr(module, "offloadable", True):
            continue
        key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        if key is not None and str(device_map[key]) in offloaded:
            raise ValueError(f"{where}: the device_map offloads {name} ({type(module).__name__}) to "
                             f"{device_map[key]!r}; accelerate's offload hooks load a module's weights only when its "
                             f"forward runs, and this mixer's kernels read its conv weights directly. Keep these "
                             f"layers on the device the model runs on (more max_memory there, or a device_map without "
                             f"'disk'/'cpu' for them)")


def _refuse_offloaded_mixers_once(model: nn.Module) -> None:
    """_refuse_offloaded_mixers at the first forward under a device_map that from_pretrained did not check:
    accelerate's dispatch_model (load_checkpoint_and_dispatch) sets hf_device_map too, and such a model failed in
    its first Mamba layer with accelerate's "Tensor on device cpu is not on the expected device meta!"."""
    device_map = model.__dict__.get("hf_device_map")
    if device_map is not None and model.__dict__.get("_checked_device_map") is not device_map \
            and not torch.compiler.is_compiling():
        _refuse_offloaded_mixers(model, "dispatch_model")
        model._checked_device_map = device_map


__all__ = ["ZooModel", "ZooForCausalLM", "ZooForSequenceClassification", "ZooPreTrainedModel", "ZooModelOutput",
           "ZooCausalLMOutput"]
