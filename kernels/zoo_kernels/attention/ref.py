"""Reference attention: the specification of every attention backend (fp32 math, any device)."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo_kernels._fp32 import no_autocast


def visible_mask(
    tq: int,
    tk: int,
    *,
    causal: bool = True,
    window: int | None = None,
    seq_idx: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Which keys each query may see: bool [B or 1, Tq, Tk], or None when every key is visible.

    Query i sits at absolute position p = Tk - Tq + i. Key j is visible iff (not causal or j <= p),
    (window is None or p - j < window), j and p lie in the same document and key_padding_mask[b, j] and
    key_padding_mask[b, p] are both True (a padded query sees nothing, so its output is zero). A document
    is a run of equal consecutive seq_idx values (packing puts each document in one run). With a
    key_padding_mask the window counts real tokens, not positions: p - j is the number of real tokens after key j
    up to p (a pad is no position, as in FlashAttention's varlen form, which drops them), so a row with pads
    between its tokens (PEFT prompt tuning's [virtual tokens, pads, prompt]) sees the keys the row alone sees.
    """
    if not causal and window is None and seq_idx is None and key_padding_mask is None:
        return None
    pos_q = torch.arange(tk - tq, tk, device=device)[:, None]  # (Tq, 1) absolute query positions
    pos_k = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (pos_k <= pos_q)
    if window is not None and key_padding_mask is None:
        mask = mask & (pos_q - pos_k < window)
    mask = mask[None]  # (1, Tq, Tk)
    if seq_idx is not None:
        doc = document_ids(seq_idx)
        mask = mask & (doc[:, tk - tq :, None] == doc[:, None, :])
    if key_padding_mask is not None:
        keep = key_padding_mask.bool()
        mask = mask & keep[:, None, :] & keep[:, tk - tq :, None]
        if window is not None:  # the window counts real tokens: a pad is no position
            rank = keep.long().cumsum(dim=1)  # (B, Tk)
            mask = mask & (rank[:, tk - tq :, None] - rank[:, None, :] < window)
    return mask


def document_ids(seq_idx: Tensor) -> Tensor:
    """Run index of each token, [B, T] int64: a new document starts at t = 0 and wherever seq_idx changes."""
    start = torch.ones_like(seq_idx, dtype=torch.long)
    start[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return start.cumsum(dim=1)


@no_autocast
def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    seq_idx: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention in fp32, the oracle of every backend.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Tk >= Tq and Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv)); the queries are the last Tq positions of the keys. seq_idx [B, Tk] int (packed
    documents, one run of equal values each), key_padding_mask [B, Tk] bool (True = real token; padded
    queries return zeros). A query with no visible key gets zeros; never NaN.
    Returns o [B, Tq, Hq, D] in q's dtype.
    """
    batch, tq, hq, dim = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    _check_shapes(q, k, v, seq_idx, key_padding_mask)
    groups = hq // hkv
    scale = dim**-0.5 if scale is None else scale
    qf = q.float().reshape(batch, tq, hkv, groups, dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, k.float()) * scale  # (B, Hkv, G, Tq, Tk)
    mask = visible_mask(tq, tk, causal=causal, window=window, seq_idx=seq_idx,
                        key_padding_mask=key_padding_mask, device=q.device)
    if mask is not None:
        mask = mask[:, None, None]  # (B|1, 1, 1, Tq, Tk)
        # a finite fill keeps rows without any visible key NaN-free; the product below zeroes them
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs * mask
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float())
    return out.reshape(batch, tq, hq, v.shape[-1]).to(q.dtype)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor | None = None,
                  key_padding_mask: Tensor | None = None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"attention needs Tk >= Tq (queries are the last Tq keys); got Tq {q.shape[1]}, "
                         f"Tk {k.shape[1]}")
    # one entry per key, cached ones included (a mask of the new tokens alone crashed in a broadcast deep in the
    # mask code); one row for every row, [1, Tk], broadcasts (`attention` expands it for the varlen kernels)
    for name, t in (("seq_idx", seq_idx), ("key_padding_mask", key_padding_mask)):
        if t is not None and (t.dim() != 2 or t.shape[0] not in (1, k.shape[0]) or t.shape[1] != k.shape[1]):
            raise ValueError(f"attention: {name} must be [B, Tk] = [{k.shape[0]}, {k.shape[1]}] or [1, Tk] (one entry "
                             f"per key, cached keys included), got {list(t.shape)}")
