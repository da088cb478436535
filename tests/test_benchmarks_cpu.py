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


def test_report_keeps_every_baseline_of_the_newest_run_only():
    """A run may write one figure once per baseline (the selective scan: mamba_ssm, then the floor); the rendered
    table keeps each of them, of the newest run of that name only, and a run's repeated row once (its last)."""
    report = load_script("benchmarks/report.py")

    def row(run, baseline, ms):
        return {"name": "scan fwd 130M", "card": "H200", "date": "2026-12-0" + run, "command": "python s.py",
                "baseline": baseline, "ours_ms": ms}

    rows = [row("3", "mamba_ssm", 1.0), row("3", "floor", 1.0), row("4", "mamba_ssm", 2.0), row("4", "floor", 2.5),
            row("4", "floor", 3.0)]
    kept = report.newest(rows)
    assert [(r["date"], r["baseline"], r["ours_ms"]) for r in kept] == [
        ("2026-12-04", "mamba_ssm", 2.0), ("2026-12-04", "floor", 3.0)]
    table = report.render(rows)
    assert "| mamba_ssm | " in table and "| floor | " in table and "2026-12-03" not in table
