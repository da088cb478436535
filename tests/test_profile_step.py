"""The step profiler (benchmarks/profile_step.py) runs on CPU and sorts kernels into classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_classify_kernel_names():
    ps = load_script("benchmarks/profile_step.py")
    assert ps.classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert ps.classify("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert ps.classify("void selective_scan_fwd_kernel<...>") == "scan"
    assert ps.classify("void causal_conv1d_fwd_kernel<...>") == "conv"
    assert ps.classify("void at::native::(anonymous namespace)::cunn_SoftMaxForward<...>") == "loss"
    assert ps.classify("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer"
    assert ps.classify("something_unheard_of") == "other"


def test_packed_batch_restarts_positions_per_document():
    import torch

    ps = load_script("benchmarks/profile_step.py")
    batch = ps.packed_batch(2, 1024, 100, torch.device("cpu"))
    for b in range(2):
        seq_idx, pos = batch["seq_idx"][b], batch["position_ids"][b]
        starts = torch.nonzero(torch.diff(seq_idx)).flatten() + 1
        assert len(starts) >= 1 and (pos[starts] == 0).all() and pos[0] == 0
        assert (torch.diff(seq_idx) >= 0).all()


def test_profile_step_runs_on_cpu(tmp_path, capsys):
    ps = load_script("benchmarks/profile_step.py")
    out = tmp_path / "report.md"
    ps.main(["--model", str(ROOT / "configs/models/mamba-tiny.yaml"), "--seq-len", "64", "--micro-batch", "1",
             "--warmup", "1", "--steps", "1", "--top", "5", "--out", str(out)])
    text = out.read_text()
    assert "tokens/s" in text and "| class | ms per step | share |" in text and "matmul" in text


@pytest.mark.parametrize("flag, value", [("--seq-len", "0"), ("--micro-batch", "-1"), ("--steps", "0"),
                                         ("--warmup", "-1"), ("--top", "0")])
def test_bad_arguments_are_refused_before_building_the_model(flag, value, capsys):
    ps = load_script("benchmarks/profile_step.py")
    with pytest.raises(SystemExit) as e:
        ps.main(["--model", "nosuch", flag, value])  # refused before the model name is even looked up
    assert e.value.code == 2 and f"{flag} must be at least" in capsys.readouterr().err
