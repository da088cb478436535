"""Device facts the kernels' launch choices read, queried once per device."""

from __future__ import annotations

import torch

_SMS: dict[int, int] = {}  # multiprocessors per CUDA device index


def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count, cached per device index; 132 (an H100's or H200's) off CUDA, where the
    callers only run under Triton's interpreter or decide for a backend that is not there."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]
