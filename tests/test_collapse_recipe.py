"""configs/train/collapse.yaml and scripts/collapse.py (issue 8: state collapse and mitigations), on the CPU."""

from pathlib import Path

import pytest
import torch
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_collapse_recipe_parses():
    capacity = load_script("scripts/state_capacity.py")
    sweep = capacity.load_sweep(ROOT / "configs/train/collapse.yaml")
    runs = capacity.expand_runs(sweep)
    assert {r["model"] for r in runs} == set(sweep["models"]) and "slow_decay" in sweep["models"]
    ev = sweep["eval"]
    for run_ in runs:
        L = run_["train_length"]
        assert run_["config"].data.seq_len == L and L & (L - 1) == 0  # octave bins are exact
        assert ev["max_len"] >= ev["factor"] * L >= 8 * L  # judged to at least 8x the training length
    assert float(ev["bins_per_octave"]).is_integer()
    assert ev["mitigations"] and all("{L}" not in m or m.startswith("window") for m in ev["mitigations"])
    for name, cfg in sweep["models"].items():
        with torch.device("meta"):
            assert capacity.ssm_state_floats(cfg) > 0, name
    # the CPU check's overrides validate too
    small = capacity.load_sweep(ROOT / "configs/train/collapse.yaml",
                                ["tokens_per_run=3145728", "output_dir=runs/collapse-cpu"])
    assert capacity.expand_runs(small)[0]["config"].train.max_steps == 3145728 // small["batch_tokens"]


def test_collapse_report_bins_and_verdicts():
    collapse = load_script("scripts/collapse.py")
    L = 64
    edges = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

    def curve(loss_at):
        return [{"start": a, "end": b, "mean_loss": loss_at(a), "n_tokens": b - a} for a, b in zip(edges, edges[1:])]

    rising = curve(lambda s: 2.0 if s < 256 else 3.0)
    flat = curve(lambda s: 2.0)
    worse = curve(lambda s: 2.5)  # flat against itself, but worse than the unmitigated reference everywhere
    octaves = collapse.octave_bins(rising, L)
    assert [o["octave"] for o in octaves] == ["<L", "1L-2L", "2L-4L", "4L-8L", "8L-16L"]
    assert [o["mean_loss"] for o in octaves] == [2.0, 2.0, 2.0, 3.0, 3.0]
    v = collapse.verdicts({"none": rising, "window:r=64": flat, "forget:c_dt=0.5": worse}, L, 8, 0.1)
    assert v["rises"] and v["flat"] == {"window:r=64": True, "forget:c_dt=0.5": False} and v["passed"]
    assert collapse.verdict_word(v) == "PASS"
    v = collapse.verdicts({"none": flat, "window:r=64": flat}, L, 8, 0.1)
    assert not v["rises"] and not v["passed"]
    assert collapse.verdict_word(v) == "no collapse (nothing to mitigate)"
    # the loss still falls with context past L: a later rise counts from [L, 2L)
    late = curve(lambda s: 2.4 if s < 64 else 2.1 if s < 128 else 2.25)
    v = collapse.verdicts({"none": late, "window:r=64": curve(lambda s: 2.4 if s < 64 else 2.1)}, L, 8, 0.1)
    assert v["rises"] and v["reference"] == 2.1 and v["flat"] == {"window:r=64": True}
    # in-distribution positions [L/2, L) lower than everything past L is not collapse: the curve is flat past L
    dip = curve(lambda s: 1.9 if 32 <= s < 64 else 2.05)
    v = collapse.verdicts({"none": dip, "window:r=64": dip}, L, 16, 0.1)
    assert not v["rises"] and v["reference"] == 2.05 and v["inside"] == 1.9
    # and the mitigated curve is judged against [L, 2L) + margin: 2.2 at 8L-16L is not flat
    v = collapse.verdicts({"none": rising, "window:r=64": curve(lambda s: 2.2 if s >= 512 else 2.0)}, L, 16, 0.1)
    assert v["rises"] and v["flat"] == {"window:r=64": False} and not v["passed"]


@pytest.mark.parametrize("bad", ["eval.mitigations=[forget:c_alpha=2]", "eval.nope=1"])
def test_collapse_recipe_rejects_bad_eval(bad):
    capacity = load_script("scripts/state_capacity.py")
    with pytest.raises(ValueError):
        capacity.load_sweep(ROOT / "configs/train/collapse.yaml", [bad])
