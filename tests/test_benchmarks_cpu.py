"""The GPU benchmarks and probes (benchmarks/*.py) on a machine without one: each ends in one line that says so
(SystemExit with the message), never in a traceback from deep inside its first CUDA call."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import ROOT, load_script

GPU_ONLY = ["attention", "conv1d", "decode_attention", "decode_linear", "generate", "gla", "mamba_layers",
            "mamba_step", "mqar_probe", "probe_mamba_step_phases", "probe_packed_flex", "probe_packed_nested",
            "probe_split_decode", "probe_split_parts", "profile_decode", "scan_split", "selective_scan", "ssd",
            "train_throughput"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_benchmark_on_cpu_ends_in_one_line(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their neighbours, as when run
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    script = load_script(f"benchmarks/{name}.py")
    with pytest.raises(SystemExit) as e:
        script.main()
    assert isinstance(e.value.code, str) and "CUDA" in e.value.code and "\n" not in e.value.code, e.value.code
