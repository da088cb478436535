"""Softmax attention on the fastest kernel the device has, with its fp32 reference.

`attention(q, k, v, ...)` takes q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D] (the layout a projection gives,
no transposes needed) and runs one of these backends:

| name | kernel | causal, window, GQA | packed (seq_idx) / padding |
| --- | --- | --- | --- |
| flash_attn_cute | FA4 (`flash_attn.cute`), Hopper/Blackwell | native | varlen (cu_seqlens) |
| flash_attn | FA2 (`flash_attn`) | native | varlen (cu_seqlens) |
| sdpa_cudnn | torch SDPA, cuDNN kernel | is_causal; window/padding via a mask | dense mask |
| sdpa_flash | torch's built-in FA2 (`aten._flash_attention_forward`) | native | varlen (cu_seqlens) |
| sdpa_efficient | torch SDPA, memory-efficient kernel (fp32 too) | mask | dense mask |
| flex | `flex_attention` with a block mask (blocks with no visible key are skipped) | mask_mod | mask_mod |
| math | torch SDPA math (CPU: torch picks its CPU kernel) | mask | dense mask |

`backend="auto"` takes the fastest available one (`select_backend`, decided once per device and shape class
and cached), falls back with one warning per (backend, reason), and routes features a kernel lacks to one
that has them; an explicitly named backend that cannot run raises `BackendUnavailable` with the install line.

Packed rows that need no gradient (no_grad / inference_mode, or no input requiring grad) on Hopper, where the
varlen kernel at hand is FlashAttention-2's, go to flex with 64-token mask blocks and 64 x 64 forward tiles
(`FLEX_PACKED_FWD`): on an H200 it ran packed (8, 2048, 16 x 128) rows 1.5x faster than FA2 varlen
(benchmarks/NOTES_attention.md). Calls that need gradients keep FA2 varlen.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo_kernels.attention.ref import _check_shapes, attention_ref, document_ids, visible_mask

BACKENDS = ("flash_attn_cute", "flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "math")
INSTALL = {
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "flash_attn_cute": "pip install flash-attn-4",
}
# backends built on FlashAttention's interface: native causal (bottom-right aligned), window and GQA, varlen
_FLASH_FAMILY = ("flash_attn_cute", "flash_attn", "sdpa_flash")
_SDPA_FAMILY = ("sdpa_cudnn", "sdpa_efficient", "math")
_HALF = (torch.float16, torch.bfloat16)
# packed sequences without flash-attn: order measured in benchmarks/NOTES_attention.md
PACKED_ORDER = ("sdpa_flash", "flex", "sdpa_efficient")
# flex for packed rows without autograd on sm90 (fp16/bf16, head_dim <= 128): mask blocks of 64 tokens (fewer
# wasted keys at document edges than flex's default 128) and 64 x 64 forward tiles with 4 warps, 3 stages.
# H200, (8, 2048, 16 x 128), 43 documents, forward: 0.214 ms vs FA2 varlen 0.324, unpacked rows (cuDNN) 0.267;
# 128-token blocks with flex's default tiles 0.275 (benchmarks/probe_packed_flex.py, NOTES_attention.md)
FLEX_PACKED_FWD = {"block": 64, "kernel_options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4,
                                                   "fwd_num_stages": 3}}
FLEX_PACKED_MAX_HEAD_DIM = 128


class BackendUnavailable(RuntimeError):
    """An explicitly requested attention backend cannot run here; `install` is the line that fixes it."""

    def __init__(self, backend: str, reason: str, install: str | None = None):
        self.backend, self.reason, self.install = backend, reason, install
        hint = f"; install it with `{install}`" if install else ""
        super().__init__(f"attention backend {backend!r} is unavailable: {reason}{hint}")


_WARNED: set[tuple[str, str]] = set()


def warn_once(backend: str, reason: str, fallback: str = "") -> None:
    """Warn once per (backend, reason) that auto selection skipped `backend`."""
    if (backend, reason) in _WARNED:
        return
    _WARNED.add((backend, reason))
    install = f" (install: `{INSTALL[backend]}`)" if backend in INSTALL else ""
    instead = f"; using {fallback!r} instead" if fallback else ""
    warnings.warn(f"attention backend {backend!r} skipped: {reason}{install}{instead}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------
# availability (optional imports happen here, once)

_IMPORTS: dict[str, Any] = {}


def _import(backend: str) -> Any:
    """The flash-attn module of `backend`, or None when it does not import (missing or broken build)."""
    if backend not in _IMPORTS:
        name = "flash_attn.cute" if backend == "flash_attn_cute" else "flash_attn"
        try:
            mod = importlib.import_module(name)
            _IMPORTS[backend] = mod if hasattr(mod, "flash_attn_varlen_func") else None
        except Exception:  # a wheel built for another torch fails with OSError/RuntimeError, not ImportError
            _IMPORTS[backend] = None
    return _IMPORTS[backend]


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` at all, or None when it can (shape limits are checked later)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    if backend == "math":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    major = _capability(device)[0]
    if backend in ("flash_attn", "flash_attn_cute") and _import(backend) is None:
        return f"{'flash_attn.cute' if backend == 'flash_attn_cute' else 'flash_attn'} is not importable"
    if backend == "flash_attn_cute" and major not in (9, 10):
        return f"FA4 needs Hopper or Blackwell (sm90/sm100), got sm{major}x"
    if backend in ("flash_attn", "sdpa_flash", "sdpa_cudnn") and major < 8:
        return f"needs sm80 or newer, got sm{major}x"
    if backend == "sdpa_cudnn" and not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    if backend == "flex" and importlib.util.find_spec("triton") is None:
        return "flex_attention needs triton"
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, fastest first (shape limits aside)."""
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable_reason(b, device) is None]


def _shape_reason(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                  gqa: bool) -> str | None:
    """Why `backend` cannot take this dtype/head_dim on `device`, or None."""
    if backend in _FLASH_FAMILY or backend == "sdpa_cudnn":
        if dtype not in _HALF:
            return f"needs fp16/bf16, got {dtype}"
        if head_dim > 256 or head_dim % 8:
            return f"needs head_dim <= 256 and a multiple of 8, got {head_dim}"
    if backend == "sdpa_efficient":
        # torch's memory-efficient kernel: fp16/bf16/fp32 only, head_dim a multiple of 16 bytes' worth of elements
        # (sdp_utils' check_head_dim_size_mem_efficient); else SDPA raises "No available kernel" at the call
        if dtype not in (*_HALF, torch.float32):
            return f"needs fp16/bf16/fp32, got {dtype}"
        align = 4 if dtype == torch.float32 else 8
        if head_dim % align:
            return f"needs head_dim a multiple of {align} for {dtype}, got {head_dim}"
    if backend == "sdpa_cudnn" and not _sdpa_probe("sdpa_cudnn", device, dtype, head_dim, gqa=False):
        return f"cuDNN SDPA does not run fwd+bwd correctly for {dtype}, head_dim {head_dim} here"
    if backend == "flex" and head_dim < 16:
        return f"needs head_dim >= 16, got {head_dim}"
    return None


_PROBES: dict[tuple, bool] = {}


def _sdpa_kind(backend: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend]


def _sdpa_probe(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    """Whether SDPA `backend` runs causal fwd+bwd (with enable_gqa if `gqa`) and matches the reference."""
    key = (backend, str(device), dtype, head_dim, gqa)
    if key not in _PROBES:
        _PROBES[key] = _run_probe(backend, device, dtype, head_dim, gqa)
    return _PROBES[key]


@torch.compiler.disable
def _run_probe(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    # the first attention call may come under no_grad or inference_mode: the probe needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        return _probe_fwd_bwd(backend, device, dtype, head_dim, gqa)


def _probe_fwd_bwd(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 4, 160, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    kv = [torch.randn(1, 2 if gqa else 4, 160, head_dim, device=device, dtype=dtype, generator=gen)
          .requires_grad_() for _ in range(2)]
    try:
        with warnings.catch_warnings(), sdpa_kernel(_sdpa_kind(backend)):
            warnings.simplefilter("ignore")
            out = F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=gqa)
            out.float().square().sum().backward()
    except RuntimeError:
        return False
    ref = attention_ref(*(t.transpose(1, 2) for t in (q, *kv))).transpose(1, 2)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    return bool(err < 2e-2) and all(bool(t.grad.isfinite().all()) for t in (q, *kv))


# ---------------------------------------------------------------------------------------------------------
# selection

_SELECTED: dict[tuple, str] = {}


def _candidates(device: torch.device, dtype: torch.dtype, packed: bool) -> list[str]:
    """Backends to try for `device`, fastest first (measured on H100: benchmarks/NOTES_attention.md)."""
    if device.type != "cuda":
        return ["math"]
    if dtype not in _HALF:
        return ["sdpa_efficient", "math"]
    major = _capability(device)[0]
    fa4 = ["flash_attn_cute"] if major in (9, 10) else []
    if packed:
        return [*fa4, "flash_attn", *PACKED_ORDER, "math"]
    if major == 9:
        # on H100 cuDNN's kernel (483 TFLOP/s causal fwd+bwd) beats FA2 (~285): flash_attn goes after it
        return [*fa4, "sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "math"]
    return [*fa4, "flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"]


def select_backend(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, *,
                   packed: bool = False) -> str:
    """The fastest backend available for (device, dtype, head_dim, packed or not); decided once and cached.

    Skipped faster backends are reported with `warn_once`.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype, head_dim, packed)
    if key not in _SELECTED:
        skipped = []
        for name in _candidates(device, dtype, packed):
            reason = _unavailable_reason(name, device) or _shape_reason(name, device, dtype, head_dim, False)
            if reason is None:
                for skipped_name, skipped_reason in skipped:
                    warn_once(skipped_name, skipped_reason, fallback=name)
                _SELECTED[key] = name
                break
            skipped.append((name, reason))
    return _SELECTED[key]


_RESOLVED: dict[tuple, str] = {}


def resolve_backend(requested: str, device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16,
                    head_dim: int = 128, gqa: bool = False, packed: bool = False, padded: bool = False,
                    window: bool = False, tq: int | None = None, tk: int | None = None, grad: bool = True) -> str:
    """The backend one call runs on.

    An explicit `requested` name is checked (BackendUnavailable with the install line if it cannot run);
    "auto" takes `select_backend` and moves calls that the chosen kernel would serve badly (cuDNN with a
    sliding window, padding or Tq != Tk) to a kernel that has the feature natively, and packed calls that need
    no gradient (grad=False) to flex where `flex_takes_packed_forward` says so. Answers are cached, so a call
    under torch.compile costs one dict lookup.
    """
    shape = "decode" if tq == 1 else "square" if tq == tk else "rect"
    key = (requested, str(device), dtype, head_dim, gqa, packed, padded, window, shape, grad)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(requested, torch.device(device), dtype, head_dim, gqa, packed, padded,
                                  window, tq, tk, grad)
    return _RESOLVED[key]


def _flex_packed_tiles_fit(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """FLEX_PACKED_FWD's measured case: sm90, fp16/bf16, head_dim <= FLEX_PACKED_MAX_HEAD_DIM."""
    return (device.type == "cuda" and dtype in _HALF and head_dim <= FLEX_PACKED_MAX_HEAD_DIM
            and _capability(device)[0] == 9)


def flex_takes_packed_forward(device: torch.device, dtype: torch.dtype, head_dim: int, selected: str) -> bool:
    """Whether packed rows without autograd go to flex with FLEX_PACKED_FWD's tiles instead of `selected`: in its
    measured case (_flex_packed_tiles_fit), when the varlen kernel at hand is FlashAttention-2's (flash_attn or
    torch's built-in; FA4 is not displaced) and flex can run."""
    return (selected in ("flash_attn", "sdpa_flash") and _flex_packed_tiles_fit(device, dtype, head_dim)
            and _unavailable_reason("flex", device) is None
            and _shape_reason("flex", device, dtype, head_dim, False) is None)


def _resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, gqa: bool, packed: bool,
             padded: bool, window: bool, tq: int | None, tk: int | None, grad: bool = True) -> str:
    if requested != "auto":
        reason = (_unavailable_reason(requested, device)
                  or _shape_reason(requested, device, dtype, head_dim, gqa))
        if reason is not None:
            raise BackendUnavailable(requested, reason, INSTALL.get(requested))
        return requested
    name = select_backend(device, dtype, head_dim, packed=packed)
    if (packed and not grad and not padded and not window and tq == tk
            and flex_takes_packed_forward(device, dtype, head_dim, name)):
        return "flex"
    decode = tq == 1
    if name in _FLASH_FAMILY and padded and not packed and decode:
        # one query per row: a dense mask costs nothing, the varlen path would sync on every step
        return "sdpa_efficient"
    # decode goes to FA2 too: cuDNN builds an execution plan per (Tq, Tk), and Tk grows by one every step
    # (H100, 130M Transformer++, batch 1 after a 2K prompt: 103 ms per decode step with decode on cuDNN)
    if name == "sdpa_cudnn" and (window or padded or decode or (tq is not None and tk is not None and tq != tk)):
        if _shape_reason("sdpa_flash", device, dtype, head_dim, gqa) is None and not (padded and decode):
            return "sdpa_flash"
        return "sdpa_efficient"
    return name


# ---------------------------------------------------------------------------------------------------------
# the op


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    seq_idx: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention; same contract as `attention_ref`, on the backend `backend` resolves to.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D], Tk >= Tq, Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv)); the queries are the last Tq positions of the keys (training Tq == Tk, prefill after a
    cache, decoding Tq == 1). causal: key j visible to the query at position p iff j <= p; window: also
    p - j < window, counted in real tokens where a key_padding_mask is given (a pad is no position). seq_idx
    [B, Tk] int: documents are runs of equal values, attention stays inside one.
    key_padding_mask [B, Tk] bool, True = real token: padded keys are never visible and padded queries
    return zeros. A query with no visible key returns zeros. scale defaults to D**-0.5.
    Returns o [B, Tq, Hq, D] in q's dtype.
    """
    _check_shapes(q, k, v, seq_idx, key_padding_mask)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of keys or None, got {window}")
    batch, tq, hq, dim = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    # a [1, Tk] mask serves every row: the varlen kernels' packing (varlen_meta) reads one row per batch row
    seq_idx = seq_idx.expand(batch, tk) if seq_idx is not None and seq_idx.shape[0] != batch else seq_idx
    if key_padding_mask is not None and key_padding_mask.shape[0] != batch:
        key_padding_mask = key_padding_mask.expand(batch, tk)
    scale = dim**-0.5 if scale is None else float(scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(backend, q.device, dtype=q.dtype, head_dim=dim, gqa=hq != hkv,
                           packed=seq_idx is not None, padded=key_padding_mask is not None,
                           window=window is not None, tq=tq, tk=tk, grad=grad)
    if name in _FLASH_FAMILY:
        return _run_flash_family(name, q, k, v, causal, window, seq_idx, key_padding_mask, scale)
    if name == "flex":
        # (flex is the backend here, so it can run: only the measured case's conditions are left to check)
        tuned = (seq_idx is not None and causal and not grad and window is None and key_padding_mask is None
                 and tq == tk and _flex_packed_tiles_fit(q.device, q.dtype, dim))
        return _run_flex(q, k, v, causal, window, seq_idx, key_padding_mask, scale,
                         FLEX_PACKED_FWD if tuned else None)
    return _run_sdpa(name, q, k, v, causal, window, seq_idx, key_padding_mask, scale)


def _run_sdpa(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None,
              seq_idx: Tensor | None, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """torch SDPA on one kernel: is_causal where it suffices, else an explicit boolean mask."""
    tq, hq, tk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views, no copies
    mask, empty = None, None
    plain = window is None and seq_idx is None and key_padding_mask is None
    if plain and (not causal or tq == tk or tq == 1):
        is_causal = causal and tq > 1  # a single last query sees every key
    else:
        is_causal = False
        mask = visible_mask(tq, tk, causal=causal, window=window, seq_idx=seq_idx,
                            key_padding_mask=key_padding_mask, device=q.device)
        if key_padding_mask is not None:
            # rows with no visible key attend everywhere (no NaN in any kernel) and are zeroed after
            empty = ~mask.any(dim=-1, keepdim=True)  # (B, Tq, 1)
            mask = mask | empty
        mask = mask[:, None]  # (B|1, 1, Tq, Tk)
    gqa = hq != hkv
    if gqa and not (name == "math" or _sdpa_probe(name, q.device, q.dtype, q.shape[-1], gqa=True)):
        # this kernel rejects enable_gqa: give it one kv head per query head
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
        gqa = False
    args = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if name == "math" and q.device.type != "cuda":
        out = F.scaled_dot_product_attention(qt, kt, vt, **args)  # torch's CPU kernels are exact in fp32
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_sdpa_kind(name)):
            out = F.scaled_dot_product_attention(qt, kt, vt, **args)
    out = out.transpose(1, 2)  # (B, Tq, Hq, D)
    if empty is not None:
        out = torch.where(empty[..., None], out.new_zeros(()), out)
    return out


# ---------------------------------------------------------------------------------------------------------
# FlashAttention family: dense [B, T, H, D] or varlen [total, H, D] with cu_seqlens


@dataclass
class VarlenMeta:
    """Packed layout of one call: cu_seqlens per document, and the kept rows when tokens are dropped."""

    cu_q: Tensor  # (docs + 1,) int32
    cu_k: Tensor  # (docs + 1,) int32
    max_q: int
    max_k: int
    q_rows: Tensor | None  # (total_q,) rows of q.reshape(B * Tq, ...) kept, None = all
    k_rows: Tensor | None  # (total_k,) rows of k.reshape(B * Tk, ...) kept, None = all


def _last_result(store: dict, name: str, refs: tuple, *extra):
    """The result `name` kept in `store` by `_keep_result` for these very tensors (`refs`, None entries allowed)
    unchanged since (same identities and version counters) and the same `extra`; else None. Inference tensors
    have no version counter (reading it raises) and are never cached; nothing is cached under torch.compile."""
    key = _result_key(refs, extra)
    if key is None or store.get("key") != key or any(a is not b for a, b in zip(store["refs"], refs)):
        return None
    return store[name]


def _keep_result(store: dict, name: str, refs: tuple, value, *extra) -> None:
    """Keep `value` in `store` as the result of `refs` (see `_last_result`); the previous one is dropped."""
    key = _result_key(refs, extra)
    if key is not None:
        store.clear()
        store.update(key=key, refs=refs, **{name: value})


def _result_key(refs: tuple, extra: tuple):
    if torch.compiler.is_compiling() or any(t is not None and t.is_inference() for t in refs):
        return None
    return (*(id(t) for t in refs), *(getattr(t, "_version", 0) for t in refs), *extra)


_META_CACHE: dict[str, Any] = {}


def varlen_meta(seq_idx: Tensor | None, key_padding_mask: Tensor | None, tq: int, tk: int) -> VarlenMeta:
    """cu_seqlens for FlashAttention's varlen kernels: one segment per (row, document), pads dropped.

    Documents are runs of equal seq_idx. Padded tokens are removed, so a sliding window counts real tokens
    (exact for left or right padding). The last call's result is reused while the same tensors come back
    unchanged (every attention layer of a forward pass packs the same way); this syncs with the device.
    """
    ref = seq_idx if seq_idx is not None else key_padding_mask
    meta = _last_result(_META_CACHE, "meta", (seq_idx, key_padding_mask), tq, tk)
    if meta is not None:
        return meta
    batch, device = ref.shape[0], ref.device
    start = torch.zeros(batch, tk, dtype=torch.bool, device=device)
    start[:, 0] = True
    if seq_idx is not None:
        start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = start.flatten()
    if key_padding_mask is None and tq == tk:
        starts = start.nonzero().squeeze(1)
        cu = F.pad(starts, (0, 1), value=batch * tk).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        meta = VarlenMeta(cu, cu, max_len, max_len, None, None)
    else:
        doc = start.long().cumsum(0) - 1  # (B * Tk,) document of each token
        n_docs = int(doc[-1]) + 1
        keep_k = torch.ones_like(start) if key_padding_mask is None else key_padding_mask.bool().flatten()
        is_q = torch.zeros(batch, tk, dtype=torch.bool, device=device)
        is_q[:, tk - tq:] = True
        keep_q = keep_k & is_q.flatten()
        k_pos = keep_k.nonzero().squeeze(1)
        q_pos = keep_q.nonzero().squeeze(1)
        count_k = torch.bincount(doc[k_pos], minlength=n_docs)
        count_q = torch.bincount(doc[q_pos], minlength=n_docs)
        max_q, max_k = torch.stack([count_q.max(), count_k.max()]).tolist()
        q_rows = q_pos - (q_pos // tk + 1) * (tk - tq)  # position in q.reshape(B * Tq, ...)
        meta = VarlenMeta(F.pad(count_q.cumsum(0), (1, 0)).to(torch.int32),
                          F.pad(count_k.cumsum(0), (1, 0)).to(torch.int32), int(max_q), int(max_k),
                          q_rows, None if key_padding_mask is None else k_pos)
    _keep_result(_META_CACHE, "meta", (seq_idx, key_padding_mask), meta, tq, tk)
    return meta


def _window_sizes(causal: bool, window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right) window, -1 = unbounded: key j visible iff p - left <= j <= p + right."""
    return (-1 if window is None else window - 1), (0 if causal else -1)


def _run_flash_family(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None,
                      seq_idx: Tensor | None, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    batch, tq, hq, dim = q.shape
    tk = k.shape[1]
    left, right = _window_sizes(causal, window)
    if seq_idx is None and key_padding_mask is None:
        return _flash_dense(name, q, k, v, causal, left, right, scale)
    meta = varlen_meta(seq_idx, key_padding_mask, tq, tk)
    qf = q.reshape(batch * tq, hq, dim)
    kf, vf = k.reshape(batch * tk, *k.shape[2:]), v.reshape(batch * tk, *v.shape[2:])
    if meta.q_rows is not None:
        qf = qf.index_select(0, meta.q_rows)
    if meta.k_rows is not None:
        kf, vf = kf.index_select(0, meta.k_rows), vf.index_select(0, meta.k_rows)
    out = _flash_varlen(name, qf, kf, vf, meta, causal, left, right, scale)
    if meta.q_rows is None:
        return out.view(batch, tq, hq, v.shape[-1])
    # padded queries get zeros
    full = out.new_zeros(batch * tq, hq, v.shape[-1]).index_copy(0, meta.q_rows, out)
    return full.view(batch, tq, hq, v.shape[-1])


def _flash_dense(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, left: int, right: int,
                 scale: float) -> Tensor:
    if name == "sdpa_flash":
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False, scale=scale,
            window_size_left=None if left < 0 else left, window_size_right=None if right < 0 else right)[0]
    elif name == "flash_attn":
        out = _import(name).flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                            window_size=(left, right))
    else:
        out = _import(name).flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                            window_size=_cute_window(left, right))
    return out[0] if isinstance(out, tuple) else out


def _flash_varlen(name: str, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, causal: bool, left: int,
                  right: int, scale: float) -> Tensor:
    if name == "sdpa_flash":
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, 0.0, causal, False, scale=scale,
            window_size_left=None if left < 0 else left, window_size_right=None if right < 0 else right)[0]
    elif name == "flash_attn":
        out = _import(name).flash_attn_varlen_func(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                                                   softmax_scale=scale, causal=causal,
                                                   window_size=(left, right))
    else:
        out = _import(name).flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=meta.cu_q, cu_seqlens_k=meta.cu_k, max_seqlen_q=meta.max_q,
            max_seqlen_k=meta.max_k, softmax_scale=scale, causal=causal,
            window_size=_cute_window(left, right))
    return out[0] if isinstance(out, tuple) else out


def _cute_window(left: int, right: int) -> tuple[int | None, int | None]:
    """FA4 spells an unbounded side None rather than -1."""
    return (None if left < 0 else left), (None if right < 0 else right)


# ---------------------------------------------------------------------------------------------------------
# flex_attention: any mask, blocks without a visible key skipped

_FLEX: dict[str, Any] = {}
_FLEX_MASK: dict[str, Any] = {}  # the block mask of the last seq_idx / padding mask (`_keep_result`)


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled once; a new shape recompiles (then dynamic), the eager fallback materializes scores
        _FLEX["fn"] = torch.compile(flex_attention)
    return _FLEX["fn"]


def flex_block_mask(batch: int, tq: int, tk: int, *, causal: bool, window: int | None, seq_idx: Tensor | None,
                    key_padding_mask: Tensor | None, device: torch.device, block: int = 128):
    """The BlockMask of `visible_mask` in blocks of `block` tokens (packed causal rows through
    `packed_block_mask`). Data-free masks are cached by shape; a mask
    of seq_idx / key_padding_mask is reused while the same tensors come back unchanged (every attention layer of
    a forward pass packs the same way; inference tensors have no version counter and are not cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    data_free = seq_idx is None and key_padding_mask is None
    key = ("bm", batch if not data_free else None, tq, tk, causal, window, str(device), block)
    if data_free and key in _FLEX:
        return _FLEX[key]
    if not data_free:
        block_mask = _last_result(_FLEX_MASK, "mask", (seq_idx, key_padding_mask), key)
        if block_mask is not None:
            return block_mask
    if seq_idx is not None and causal and window is None and key_padding_mask is None and tq == tk:
        # the common packed case, without create_block_mask's cost and _visible_mod's host-to-device copies
        block_mask = packed_block_mask(seq_idx, block)
    else:
        block_mask = create_block_mask(_visible_mod(tq, tk, causal, window, seq_idx, key_padding_mask, device),
                                       None if data_free else batch, None, tq, tk, device=device, BLOCK_SIZE=block,
                                       _compile=True)  # compiled: never materializes the (B, Tq, Tk) mask
    if data_free:
        _FLEX[key] = block_mask
    else:
        _keep_result(_FLEX_MASK, "mask", (seq_idx, key_padding_mask), block_mask, key)
    return block_mask


def _visible_mod(tq: int, tk: int, causal: bool, window: int | None, seq_idx: Tensor | None,
                 key_padding_mask: Tensor | None, device: torch.device):
    """`visible_mask` as a flex mask_mod."""
    # 0-dim tensors, not Python ints: a new decode offset or window must not recompile the kernel
    offset = torch.tensor(tk - tq, device=device)
    window_t = torch.tensor(window if window is not None else tk, device=device)
    doc = document_ids(seq_idx) if seq_idx is not None else None
    keep = key_padding_mask.bool() if key_padding_mask is not None else None
    # with padding the window counts real tokens (a pad is no position), as visible_mask does
    rank = keep.long().cumsum(dim=1) if keep is not None and window is not None else None

    def mask_mod(b, h, qi, kj):
        pos = qi + offset
        visible = kj <= pos if causal else kj >= 0
        if window is not None:
            visible = visible & ((pos - kj if rank is None else rank[b, pos] - rank[b, kj]) < window_t)
        if doc is not None:
            visible = visible & (doc[b, pos] == doc[b, kj])
        if keep is not None:
            visible = visible & keep[b, kj] & keep[b, pos]
        return visible

    return mask_mod


def packed_block_mask(seq_idx: Tensor, block: int = 128):
    """The BlockMask of causal attention inside the documents of packed rows (runs of equal seq_idx [B, T]), in
    blocks of `block` tokens, built from each query block's document starts with a few tensor ops on seq_idx's
    device: no mask_mod is evaluated over the blocks, nothing is compiled and no list is transposed
    (create_block_mask took 1.7 ms at (8, 2048) on an H200, 64-token blocks, compiled, and BlockMask.from_kv_blocks
    about as long on the GPU: benchmarks/NOTES_attention.md). Same blocks as `create_block_mask` of that mask, both
    ways (tests/test_attention_op.py compares them).

    Query block i covers queries [i b, (i + 1) b); its first query's document starts at s0, its last one's at s1
    (starts only grow along a row). Key blocks before lo = s0 // b are invisible to all its queries; key block j
    with f = ceil(s1 / b) <= j < i lies inside every query's document and before every query: full (no mask_mod);
    the blocks in between and the diagonal block i are partial (and every block of a last query block that the
    row's end cuts short, as create_block_mask has it). lo and f never decrease with i, so the query blocks of a
    key block j are ranges too: full for j < i <= (the last i with f <= j), partial for i = j and for the i above
    both j and (the last i with f <= j) up to (the last i with lo <= j)."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, length = seq_idx.shape
    dev = seq_idx.device
    n_blocks = -(-length // block)
    pos = torch.arange(length, device=dev)
    is_start = torch.ones(batch, length, dtype=torch.bool, device=dev)
    is_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start = torch.where(is_start, pos, 0).cummax(dim=1).values  # (B, T) where each token's document starts
    i = torch.arange(n_blocks, device=dev)
    first, last = i * block, (i * block + block - 1).clamp(max=length - 1)
    lo = (start[:, first] // block).contiguous()  # (B, nb) the first key block any query of the block sees
    full_lo = ((start[:, last] + block - 1) // block).contiguous()  # the first key block all of them see whole
    if length % block:  # a last query block cut short by the row's end takes no full blocks (as create_block_mask)
        full_lo[:, -1] = n_blocks - 1
    part_hi = torch.minimum(full_lo, i)  # partial key blocks of query block i: [lo, part_hi) and the diagonal i
    t = torch.arange(n_blocks, device=dev)
    kv_part = torch.where(t < (part_hi - lo)[..., None], lo[..., None] + t, i[:, None])  # (B, nb, nb)
    kv_full = (full_lo[..., None] + t).clamp(max=n_blocks - 1)  # entries past the count are never read
    # the transposed lists, per key block j
    j = i.expand(batch, n_blocks).contiguous()
    last_full = torch.searchsorted(full_lo, j, right=True) - 1  # the last query block with f <= j
    last_lo = torch.searchsorted(lo, j, right=True) - 1  # the last query block with lo <= j
    q_full_n = (last_full - j).clamp(min=0)
    q_part_lo = torch.maximum(j, last_full) + 1
    q_part_n = 1 + (last_lo - q_part_lo + 1).clamp(min=0)
    q_part = torch.where(t == 0, j[..., None], (q_part_lo[..., None] + t - 1).clamp(max=n_blocks - 1))
    q_full = (j[..., None] + 1 + t).clamp(max=n_blocks - 1)
    doc = document_ids(seq_idx)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (doc[b, qi] == doc[b, kj])

    def heads(x):  # (B, nb[, nb]) -> (B, 1, ...) int32
        return x.to(torch.int32)[:, None].contiguous()

    kv = dict(kv_num_blocks=heads(part_hi - lo + 1), kv_indices=heads(kv_part),
              full_kv_num_blocks=heads((i - full_lo).clamp(min=0)), full_kv_indices=heads(kv_full))
    try:
        return BlockMask(seq_lengths=(length, length), **kv, q_num_blocks=heads(q_part_n), q_indices=heads(q_part),
                         full_q_num_blocks=heads(q_full_n), full_q_indices=heads(q_full), BLOCK_SIZE=(block, block),
                         mask_mod=mask_mod)
    except TypeError:  # a torch whose BlockMask takes other arguments: let it transpose the lists itself
        return BlockMask.from_kv_blocks(**kv, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(length, length))


def _run_flex(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, seq_idx: Tensor | None,
              key_padding_mask: Tensor | None, scale: float, tiles: dict | None = None) -> Tensor:
    """flex_attention, compiled; tiles: {"block": mask block size, "kernel_options": ...} (FLEX_PACKED_FWD) or
    None for flex's defaults (128-token blocks, its own tiles)."""
    batch, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    block = tiles["block"] if tiles else 128
    block_mask = None
    if causal or window is not None or seq_idx is not None or key_padding_mask is not None:
        block_mask = flex_block_mask(batch, tq, tk, causal=causal, window=window, seq_idx=seq_idx,
                                     key_padding_mask=key_padding_mask, device=q.device, block=block)
    extra = {"kernel_options": tiles["kernel_options"]} if tiles else {}
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           scale=scale, enable_gqa=hq != hkv, **extra)
    return out.transpose(1, 2)  # (B, Tq, Hq, D); flex's fully masked rows are already zero


__all__ = [
    "BACKENDS",
    "INSTALL",
    "BackendUnavailable",
    "VarlenMeta",
    "attention",
    "attention_ref",
    "available_backends",
    "document_ids",
    "flex_block_mask",
    "packed_block_mask",
    "resolve_backend",
    "select_backend",
    "varlen_meta",
    "visible_mask",
    "warn_once",
]
