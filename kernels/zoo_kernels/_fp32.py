"""References compute in fp32 whatever autocast region they are called from."""

from __future__ import annotations

import functools

import torch


def no_autocast(fn):
    """Run `fn` with autocast off on CUDA and CPU, so its einsums and matmuls stay in fp32 (and a bf16 region
    cannot turn an fp32 mask fill into an overflow)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")) \
                and not torch.compiler.is_compiling():
            # autocast is off already: entering and leaving two disabled regions changes nothing (their cast cache
            # is filled only where autocast is on), and cost an eager CPU decode step ~4 us per call
            return fn(*args, **kwargs)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapped
