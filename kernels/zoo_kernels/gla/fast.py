"""Fast GLA chunk kernels: fla-core's `chunk_gla` where it runs correctly, behind a self-check.

fla's Triton kernels are sound on most GPU + Triton pairs but not all (on Hopper with Triton 3.6 its
`chunk_simple_gla` backward refuses to run). Before fla is used on a device, `fla_verdict` runs one tiny
forward + backward (dense and packed) against `chunk_gla_ref`, at the dtype and head sizes of the first
call so that it shares fla's autotuning with that call; the verdict is cached per device and per fla function
(one imported later in the process is judged anew), and a failing fla is reported once and never used again,
so no caller crashes on it.
"""

from __future__ import annotations

import warnings

import torch

from zoo_kernels._checks import raise_if
from zoo_kernels.gla.ref import chunk_gla_ref, chunk_shape_problem

FLA_INSTALL = "pip install 'fla-core>=0.6' (the [fla] extra of hybrid-zoo)"

_VERDICTS: dict[torch.device, tuple] = {}  # device (with its index) -> (the fla chunk_gla judged, (usable, reason))


_FLA: list = []  # fla's chunk_gla once imported (a failed import is retried: fla may join sys.path later)


def _auto_config_registry():
    """transformers' AutoConfig mapping (model type -> config class) where transformers is imported, else None."""
    import sys

    auto = sys.modules.get("transformers.models.auto.configuration_auto")
    mapping = getattr(auto, "CONFIG_MAPPING", None)
    extra, builtin = getattr(mapping, "_extra_content", None), getattr(mapping, "_mapping", None)
    return (extra, builtin) if isinstance(extra, dict) and builtin is not None else None


def import_fla(module: str):
    """Import `module` (a part of fla), keeping transformers' own classes for the model types transformers ships.

    Importing any part of fla runs fla's package init, which registers fla's configs for "mamba", "mamba2" and
    "bitnet" with AutoConfig (exist_ok=True): afterwards `AutoModelForCausalLM.from_pretrained` of a transformers
    Mamba checkpoint, or `from_config(MambaConfig(...))`, would build fla's model, which differs and runs its
    Triton kernels on CPU tensors. hybrid-zoo uses fla's GLA ops only, so registrations that the import made for
    built-in model types are undone (one the user made before stays).
    """
    import importlib

    registry = _auto_config_registry()
    before = dict(registry[0]) if registry else {}
    try:
        return importlib.import_module(module)
    finally:  # an import that fails halfway may have registered already
        registry = _auto_config_registry()
        if registry is not None:
            extra, builtin = registry
            for model_type in [t for t in extra if t in builtin and extra[t] is not before.get(t)]:
                if model_type in before:
                    extra[model_type] = before[model_type]
                else:
                    del extra[model_type]


def _fla_chunk_gla():
    """fla's chunk_gla, or None where fla-core is not importable."""
    if not _FLA:
        try:
            chunk_gla = import_fla("fla.ops.gla").chunk_gla
        except Exception:  # noqa: BLE001 - fla failing at import on this Triton counts as unavailable
            return None
        _FLA.append(chunk_gla)
    return _FLA[0]


def _versions() -> tuple[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        fla_version = getattr(import_fla("fla"), "__version__", "?")
    except ImportError:
        fla_version = "none"
    return triton_version, fla_version


def _slot(device: torch.device) -> torch.device:
    """`device` with its index, the verdict's key: cheap, as every chunk_gla call looks its verdict up."""
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _describe(device: torch.device) -> str:
    """The device, Triton and fla behind a verdict, for its warning."""
    name = str(device)
    if device.type == "cuda":
        index = _slot(device).index
        name = f"{torch.cuda.get_device_name(index)} (sm {torch.cuda.get_device_capability(index)})"
    triton_version, fla_version = _versions()
    return f"{name}, Triton {triton_version}, fla {fla_version}"


def _probe(fn, device: torch.device, dtype: torch.dtype, key_dim: int, value_dim: int) -> str:
    """Empty string when `fn` (fla's chunk_gla API) matches the reference on a tiny fwd+bwd, else why not."""
    gen = torch.Generator().manual_seed(0)
    batch, length, heads = 2, 83, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    inputs = {
        "q": rnd(batch, length, heads, key_dim).to(dtype),
        "k": rnd(batch, length, heads, key_dim).to(dtype),
        "v": rnd(batch, length, heads, value_dim).to(dtype),
        "g": torch.nn.functional.logsigmoid(rnd(batch, length, heads, key_dim) + 3).to(dtype),
        "h0": rnd(batch, heads, key_dim, value_dim),
    }
    seq_idx = torch.zeros(batch, length, dtype=torch.int32)
    seq_idx[0, 30:] = 1
    seq_idx[1, 70:] = 5
    seq_idx = seq_idx.to(device)
    # fla keeps bf16 intermediates and uses tf32 products; garbage or a wrong gate convention is far above
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 5e-3
    for packed in (False, True):
        results = []
        for impl in ("fla", "ref"):
            leaves = {k: t.detach().clone().requires_grad_(True) for k, t in inputs.items()}
            args = (leaves["q"], leaves["k"], leaves["v"], leaves["g"], None, leaves["h0"],
                    seq_idx if packed else None, True)
            o, final = _run_fla(fn, *args) if impl == "fla" else chunk_gla_ref(*args)
            gen_cot = torch.Generator().manual_seed(1)
            loss = (o.float() * torch.randn(o.shape, generator=gen_cot).to(device)).sum() + final.float().sum()
            results.append([o, final, *torch.autograd.grad(loss, list(leaves.values()))])
        for name, got, ref in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dh0"], *results):
            if not torch.isfinite(got).all():
                return f"{name} not finite (packed={packed})"
            err = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
            if err > tol:
                return f"{name} off by ‖Δ‖/‖ref‖ = {err:.2e} (packed={packed})"
    return ""


def fla_verdict(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, key_dim: int = 64, value_dim: int = 64
) -> tuple[bool, str]:
    """(usable, reason): is fla's chunk_gla importable and correct on `device`? Probed once per device.

    The probe uses the dtype and head sizes given (chunk_gla_fast passes its first call's), so that
    fla's autotuning for the probe is the autotuning the real call needs anyway.
    """
    return _verdict(_fla_chunk_gla(), torch.device(device), dtype, key_dim, value_dim)


def _verdict(fn, device: torch.device, dtype: torch.dtype, key_dim: int, value_dim: int) -> tuple[bool, str]:
    """fla_verdict for fla's function `fn` (None: not importable); a verdict taken for another `fn` is redone."""
    slot = _slot(device)
    cached = _VERDICTS.get(slot)
    if cached is not None and cached[0] is fn:
        return cached[1]
    if fn is None:
        reason = f"fla-core is not installed ({FLA_INSTALL})"
    else:
        try:
            # the first GLA call may come under torch.inference_mode (a benchmark's, a user's generate): its
            # tensors cannot be saved for the probe's backward, and the probe failed, leaving fla off for the process
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                reason = _probe(fn, device, dtype, key_dim, value_dim)
        except Exception as exc:  # noqa: BLE001 - any failure of fla means: do not use fla here
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if reason:
            warnings.warn(
                f"fla chunk_gla failed its self-check on {_describe(device)} ({reason}); the torch reference "
                "runs instead",
                stacklevel=3,
            )
    _VERDICTS[slot] = (fn, (not reason, reason))
    return _VERDICTS[slot][1]


def cap_fla_autotuning(n_configs: int):
    """Makes every autotuner of the imported fla modules try only its first `n_configs` configs.

    fla's Triton kernels autotune over many configs for each new shape; on a fresh machine that took minutes
    per shape (over 440 s for benchmarks/gla.py's shapes on an H100). Results do not depend on the config, so
    tests keep one; a benchmark that caps says so in its rows. Returns a function that restores the configs.
    """
    import sys

    from triton.runtime.autotuner import Autotuner

    saved = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("fla."):
            continue
        for obj in list(vars(module).values()):
            for _ in range(4):  # heuristics / jit wrappers around the autotuner
                if isinstance(obj, Autotuner) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, Autotuner) and len(obj.configs) > n_configs and all(o is not obj for o, _ in saved):
                saved.append((obj, obj.configs))
                obj.configs = obj.configs[:n_configs]

    def restore():
        for obj, configs in saved:
            obj.configs = configs

    return restore


def best_backend(device: torch.device) -> str | None:
    """ "fla" where fla's chunk_gla is installed and not known to fail on `device`, else None.

    The self-check runs on the first chunk_gla_fast call per device, before fla computes anything.
    """
    device = torch.device(device)
    fn = _fla_chunk_gla()
    if device.type != "cuda" or fn is None:
        return None
    cached = _VERDICTS.get(_slot(device))
    return "fla" if cached is None or cached[0] is not fn or cached[1][0] else None


_DOCUMENTS: list = []  # [(weakref to seq_idx, its _version, the result)]: the last conversion


def _documents(seq_idx: torch.Tensor):
    """(begins, cu_seqlens, cu_seqlens on the CPU, row_start, last_of_row) of a [batch, length] seq_idx.

    The conversion syncs with the device (nonzero, the CPU copy fla wants) and every GLA layer of a forward
    (and its backward) gets the same seq_idx tensor: the last result is kept while that tensor is alive and
    unmodified, so a model pays the sync once per batch, not once per layer and pass.
    """
    import weakref

    cacheable = not seq_idx.is_inference()  # an inference tensor has no version counter (reading it raises)
    if _DOCUMENTS and cacheable:
        ref, version, cached = _DOCUMENTS[0]
        if ref() is seq_idx and seq_idx._version == version:
            return cached
    batch, length = seq_idx.shape
    starts = torch.ones(batch, length, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    begins = starts.flatten().nonzero().flatten()  # first token of each document in the flat sequence
    cu_seqlens = torch.cat([begins, begins.new_tensor([batch * length])])
    row_start = begins % length == 0
    first_of_row = row_start.nonzero().flatten()  # document index of each row's first document
    last_of_row = torch.cat([first_of_row[1:] - 1, first_of_row.new_tensor([begins.numel() - 1])])
    result = (begins, cu_seqlens, cu_seqlens.cpu(), row_start, last_of_row)
    if cacheable:
        _DOCUMENTS[:] = [(weakref.ref(seq_idx), seq_idx._version, result)]
    return result


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; the usual no-op conversion skips the dispatcher (~0.6 us of host time per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _run_fla(fn, q, k, v, g, scale, initial_state, seq_idx, return_final_state):
    """Our chunk_gla contract through fla's API; seq_idx becomes cu_seqlens over the flattened batch."""
    batch, length, heads, _ = q.shape
    init = _cast(initial_state, torch.float32) if initial_state is not None else None
    if seq_idx is None:
        o, final = fn(q, k, v, g, scale=scale, initial_state=init, output_final_state=return_final_state)
        return _cast(o, q.dtype), (_cast(final, torch.float32) if return_final_state else None)
    begins, cu_seqlens, cu_seqlens_cpu, row_start, last_of_row = _documents(seq_idx)
    if init is not None:
        # each row's initial state goes to its first document; later documents start from zero
        init = init[begins // length] * row_start.to(init.dtype)[:, None, None, None]
    flat = [t.reshape(1, batch * length, heads, t.shape[-1]) for t in (q, k, v, g)]
    o, final = fn(
        *flat,
        scale=scale,
        initial_state=init,
        output_final_state=return_final_state,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
    )
    o = _cast(o.reshape(batch, length, heads, v.shape[-1]), q.dtype)
    if not return_final_state:
        return o, None
    return o, _cast(final[last_of_row], torch.float32)


def chunk_gla_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "fla",
):
    """chunk_gla on a fast backend; same contract as `chunk_gla_ref` (fla picks its own chunk size).

    q, k, g: [batch, T, H, K]; v: [batch, T, H, V]; initial_state: [batch, H, K, V]; seq_idx: [batch, T].
    Returns o [batch, T, H, V] in q's dtype and, with return_final_state, the final state in fp32.
    """
    if backend != "fla":
        raise ValueError(f"chunk_gla_fast: unknown backend {backend!r}; this build has 'fla' only")
    # the reference's checks, before fla sees the tensors: fla reads them by q's sizes and cu_seqlens, so a seq_idx of
    # one row for several (its documents covered the first row only) or an initial_state of another batch was read
    # as it lay, where the reference raises
    raise_if("chunk_gla", chunk_shape_problem(q, k, v, g, initial_state, seq_idx, chunk_size))
    fn = _fla_chunk_gla()
    if fn is None:
        raise ImportError(f"chunk_gla backend 'fla' needs fla-core: {FLA_INSTALL}")
    if not _verdict(fn, q.device, q.dtype, q.shape[-1], v.shape[-1])[0]:
        # never crash on an unsound fla: this call (and auto-dispatched later ones) take the reference
        return chunk_gla_ref(q, k, v, g, scale, initial_state, seq_idx, return_final_state, chunk_size)
    o, final = _run_fla(fn, q, k, v, g, scale, initial_state, seq_idx, return_final_state)
    return (o, final) if return_final_state else o


__all__ = ["best_backend", "chunk_gla_fast", "fla_verdict"]
