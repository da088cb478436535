"""Kernels of hybrid-zoo and their pure-PyTorch references.

Each op is a function with a `backend` argument ("auto", a fast backend's name, or "ref"). The reference
(`*_ref`) is the specification: fp32 math, runs on CPU, same signature. This package never imports `zoo`.
"""

from __future__ import annotations

from zoo_kernels.conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from zoo_kernels.gla import chunk_gla, chunk_gla_ref, gla_state_update
from zoo_kernels.selective_scan import selective_scan, selective_scan_ref, selective_state_update
from zoo_kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_state_update

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "chunk_gla",
    "chunk_gla_ref",
    "gla_state_update",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "ssd_chunk_scan",
    "ssd_chunk_scan_ref",
    "ssd_state_update",
]
