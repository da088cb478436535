"""Causal depthwise conv1d in plain PyTorch: the specification, the CPU path and the oracle of the kernel.

One shifted multiply-add per kernel tap (W of them, vectorized over batch, channels and time). With
seq_idx, an input from another document than the output's position counts as zero, so no document sees
its neighbour; the carried state (the inputs before x) belongs to the first document of each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo_kernels._checks import first_problem, raise_if, shape_problem
from zoo_kernels._fp32 import no_autocast


def _document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """[batch, L] -> [batch, L] long, 0 for the first document and +1 wherever seq_idx changes."""
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return starts.cumsum(dim=1)


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")


def conv_shape_problem(x, weight, bias=None, seq_idx=None, initial_state=None) -> str | None:
    """Why these inputs do not have causal_conv1d's shapes (None: they do). Without it the reference broadcast a
    weight of one row or a bias of size 1 over every channel where the CUDA kernel refuses them (cuda._problem)."""
    if x.dim() != 3:
        return f"x must be [batch, D, L], got {tuple(x.shape)}"
    if weight.dim() != 2:
        return f"weight must be [D, W], got {tuple(weight.shape)}"
    batch, dim, length = x.shape
    width = weight.shape[1]
    return first_problem(
        shape_problem(weight, "weight", (dim, width)), shape_problem(bias, "bias", (dim,)),
        shape_problem(seq_idx, "seq_idx", (batch, length)),
        shape_problem(initial_state, "initial_state", (batch, dim, width - 1)))


def update_shape_problem(conv_state, x, weight, bias=None) -> str | None:
    """Why these inputs do not have causal_conv1d_update's shapes (None: they do; cuda._update_problem on CUDA)."""
    if x.dim() != 2:
        return f"x must be [batch, D], got {tuple(x.shape)}"
    if weight.dim() != 2:
        return f"weight must be [D, W], got {tuple(weight.shape)}"
    batch, dim = x.shape
    width = weight.shape[1]
    return first_problem(
        shape_problem(weight, "weight", (dim, width)), shape_problem(bias, "bias", (dim,)),
        shape_problem(conv_state, "conv_state", (batch, dim, width - 1)))


@no_autocast
def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y[:, d, t] = act(bias[d] + Σ_w weight[d, w] · x[:, d, t - W + 1 + w]), zero before the start.

    x: [batch, D, L]; weight: [D, W]; bias: [D]; initial_state: [batch, D, W-1], the inputs just before
    x (zero if None); seq_idx: [batch, L] int, inputs of another document than position t count as zero
    for t (initial_state only feeds the first document); activation: None, "silu" or "swish".
    Returns y [batch, D, L] in x's dtype, and with return_final_state also the last W-1 inputs
    [batch, D, W-1] in fp32 (the state to carry; entries before the last document are zero, and
    initial_state's entries are kept when L < W-1). Differentiable in every input.
    """
    _activate(x.new_zeros(()), activation)  # reject an unknown activation before doing any work
    raise_if("causal_conv1d", conv_shape_problem(x, weight, bias, seq_idx, initial_state))
    batch, dim, length = x.shape
    width = weight.shape[1]
    w32 = weight.float()
    if initial_state is None:
        history = x.new_zeros(batch, dim, width - 1, dtype=torch.float32)
    else:
        history = initial_state.float()
    xp = torch.cat([history, x.float()], dim=2)  # (batch, D, W-1+L): padded position j is time j-(W-1)
    doc = None
    if seq_idx is not None:
        # The carried inputs belong to document 0, the first document's.
        carried_doc = torch.zeros(batch, width - 1, dtype=torch.long, device=x.device)
        doc = torch.cat([carried_doc, _document_ids(seq_idx)], dim=1)

    y = x.new_zeros(batch, dim, length, dtype=torch.float32) if bias is None else bias.float()[:, None]
    for w in range(width):
        tap = xp[:, :, w : w + length]  # x[:, :, t - (W-1) + w] for every t
        if doc is not None:
            tap = tap * (doc[:, w : w + length] == doc[:, width - 1 :])[:, None]
        y = y + w32[:, w, None] * tap
    out = _activate(y, activation).to(x.dtype)
    if not return_final_state:
        return out
    final_state = xp[:, :, xp.shape[2] - (width - 1) :]
    if doc is not None:
        final_state = final_state * (doc[:, doc.shape[1] - (width - 1) :] == doc[:, -1:])[:, None]
    return out, final_state


@no_autocast
def causal_conv1d_update_ref(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step: y = act(bias + Σ_w weight[:, w] · [conv_state, x][:, :, w]); x enters the state.

    conv_state: [batch, D, W-1], updated in place (the last W-1 inputs); x: [batch, D]; weight: [D, W];
    bias: [D]. Returns y [batch, D] in x's dtype. Stepping a sequence through this function equals
    causal_conv1d_ref on it.
    """
    raise_if("causal_conv1d_update", update_shape_problem(conv_state, x, weight, bias))
    window = torch.cat([conv_state.float(), x.float()[:, :, None]], dim=2)  # (batch, D, W)
    y = (window * weight.float()).sum(dim=2)
    if bias is not None:
        y = y + bias.float()
    out = _activate(y, activation).to(x.dtype)
    conv_state.copy_(window[:, :, 1:])
    return out
