"""Which implementation of each op runs: the one place where zoo chooses, warns and reports.

Each op has a reference (plain PyTorch, CPU) next to its fast paths. `auto` takes the fastest path available
on the device and falls back to the reference with one loud warning; an explicitly requested backend that is
missing raises with the install line. Optional third-party kernels (flash-attn, fla) are probed inside
zoo_kernels, which cannot import zoo.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger("zoo")

_WARNED: set[tuple] = set()

INSTALL = {
    ("selective_scan", "cuda"): "a CUDA toolkit (nvcc) matching torch.version.cuda plus `pip install ninja`; "
                                "the kernel is built at first use",
    ("conv1d", "cuda"): "a CUDA toolkit (nvcc) matching torch.version.cuda plus `pip install ninja`",
    ("ssd", "triton"): "`pip install triton` (ships with CUDA builds of torch)",
    ("gla", "fla"): "`pip install 'hybrid-zoo[fla]'` (fla-core) on a Triton version fla supports",
}


def check_name(op: str, requested: object, field: str = "scan_backend") -> None:
    """Raise ValueError naming `field` when `requested` is no backend of `op`: "auto", "ref" or a fast path named
    in INSTALL (a mixer's check_spec: a config refuses it when built, not at the first forward with a message that
    names no field)."""
    choices = ("auto", "ref", *(name for o, name in INSTALL if o == op))
    if requested not in (*choices, "reference"):
        raise ValueError(f"{field}: unknown backend {requested!r}; choose one of {', '.join(choices)}")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend is not available here."""


def warn_once(key: tuple, message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def _fast_backend(op: str, device: torch.device) -> tuple[str | None, str]:
    """(name of the fastest non-reference backend on device or None, reason when None)."""
    if device.type != "cuda":
        return None, "not a CUDA device"
    if op == "selective_scan":
        from zoo_kernels.selective_scan import cuda_available

        if cuda_available():
            return "cuda", ""
        from zoo_kernels.selective_scan import cuda as cuda_mod

        return None, cuda_mod.why_unavailable()
    if op == "conv1d":
        from zoo_kernels.conv1d import cuda_available

        return ("cuda", "") if cuda_available() else (None, "conv1d CUDA path unavailable")
    if op == "ssd":
        from zoo_kernels.ssd import triton_available

        return ("triton", "") if triton_available() else (None, "triton is not importable")
    if op == "gla":
        from zoo_kernels.gla import fast_backend

        name = fast_backend(device)
        return (name, "") if name else (None, "fla-core's chunk_gla is not importable here, or failed its "
                                              "self-check; zoo's own Triton GLA kernel covers the decode step only")
    raise ValueError(f"unknown op {op!r}")


def _install_hint(op: str) -> str:
    """What to install for `op`'s fast path (GLA's is fla-core)."""
    return INSTALL.get((op, "cuda")) or INSTALL.get((op, "fla")) or INSTALL.get((op, "triton"), "a CUDA build of torch")


def follow(requested: str) -> str:
    """The backend of an op that follows a mixer's scan_backend (its causal conv, GLA's decode step): the
    reference where the mixer asks for it, else auto (the op's fastest)."""
    return "ref" if requested in ("ref", "reference") else "auto"


def resolve(op: str, requested: str, device: torch.device | str) -> str:
    """The backend name to pass to zoo_kernels for `op` on `device` ('ref' for the reference)."""
    device = torch.device(device)
    if requested in ("ref", "reference"):
        return "ref"
    if requested == "auto":
        name, why = _fast_backend(op, device)
        if name is not None:
            return name
        if device.type == "cuda":
            warn_once((op, "fallback", str(device)),
                      f"hybrid-zoo: no fast {op} kernel on {device} ({why}); running the PyTorch reference, "
                      f"which is much slower. Install {_install_hint(op)}.")
        return "ref"
    name, why = _fast_backend(op, device)
    if device.type != "cuda" or name is None or (op == "gla" and requested != name and requested == "fla"):
        raise BackendUnavailable(f"{op} backend {requested!r} is not available on {device} ({why or 'not sound'}); "
                                 f"it needs {INSTALL.get((op, requested), 'a CUDA device')}")
    return requested


def fit(op: str, requested: str, name: str, problem: str | None) -> str:
    """`name` (what `resolve` gave for `requested`) where its kernel takes the layer's shapes and dtype; where it does
    not (`problem`, naming the config field), the reference: with one warning for "auto", a ValueError for a backend
    requested explicitly. The kernels' own checks would refuse such a layer with an error that names the kernel."""
    if problem is None or name == "ref":
        return name
    if requested == "auto":
        warn_once((op, "fit", problem), f"hybrid-zoo: the {name} {op} kernel cannot take {problem}; running the "
                                        f"PyTorch reference, which is much slower.")
        return "ref"
    raise ValueError(f"{op} backend {requested!r} cannot take {problem}")


def report(model) -> dict[str, str]:
    """Backend that each mixer layer will use on its current device, e.g. {'layers.0.mamba': 'cuda'}."""
    base = getattr(model, "model", model)
    out = {}
    for i, block in enumerate(getattr(base, "layers", [])):
        mixer = block.mixer
        fn = getattr(mixer, "backend_name", None)
        out[f"layers.{i}.{getattr(mixer, 'mixer_type', type(mixer).__name__)}"] = fn() if fn else "torch"
    return out


__all__ = ["BackendUnavailable", "fit", "resolve", "report", "warn_once"]
