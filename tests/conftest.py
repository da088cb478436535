from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread: torch 2.13's CPU fp32 exp is, with more than one thread and now and then (about one run in four
# of a 2400-element case), off by ~1e-4 relative on whole chunks of its output (AVX512 machine); fp64 and one
# thread are exact every time. The fp32 references would make tight comparisons flaky. The suite takes as long.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marked cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*no fast .* kernel.*")
    _forget_accelerate_state()
    yield


def _forget_accelerate_state():
    """Each test starts without the accelerate state an earlier test of its worker left: on a GPU machine a run there
    fixed the PartialState's device to the GPU, and a later test's `Accelerator(cpu=True)` (or a run pinned to the CPU,
    ACCELERATE_USE_CPU=1) was refused, "AcceleratorState has already been initialized and cannot be changed" (seven
    tests of the README's test command on the H100, forty-fourth session). Only where accelerate is imported."""
    import sys

    if "accelerate.state" in sys.modules:
        from zoo.train import reset_accelerate_state

        reset_accelerate_state()


@pytest.fixture(scope="session", autouse=True)
def _fla_first_config():
    """fla's Triton kernels autotune over many configs for every new shape: on a fresh machine the GLA tests
    spent over 500 s there and timed out. Parity does not depend on the tile config, so in the tests every fla
    autotuner keeps its first config (no benchmarking); fla's speed is benchmarks/gla.py's business. A no-op
    where fla is not installed (CI) or no GPU is present."""
    if not torch.cuda.is_available():
        yield
        return
    try:
        from zoo_kernels.gla.fast import cap_fla_autotuning, import_fla

        import_fla("fla.ops.gla")  # not a plain import: fla's init would take over transformers' "mamba"
    except Exception:  # noqa: BLE001 - no fla (or no triton): nothing to shorten
        yield
        return
    restore = cap_fla_autotuning(1)
    yield
    restore()
