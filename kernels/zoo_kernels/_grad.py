"""Which single-step decode kernels may run: they have no backward, so a call that needs gradients takes the
differentiable torch reference instead of silently dropping them."""

from __future__ import annotations

import torch


def needs_grad(*tensors) -> bool:
    """True when autograd is on and one of the tensors requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
