"""Shared test helpers: tolerant comparison that prints the relative error; a test file run under Triton's
interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: ‖out−ref‖/‖ref‖ = {err:.3e} > {tol:.1e}"


def run_in_interpreter(path: str, timeout: int = 300) -> None:
    """Runs the test file `path` as a script with TRITON_INTERPRET=1 (which must be set before triton is imported,
    hence a subprocess), on one CPU thread as the suite runs, and fails with the end of its output if it fails."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # conftest.py: why
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
