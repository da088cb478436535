"""configs/train/collapse.yaml and scripts/collapse.py (issue 8: state collapse and mitigations), on the CPU."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import interrupt_after, load_script

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



def test_a_loss_that_overflows_past_the_training_length_is_collapse():
    """Bins whose loss is NaN or inf (a state that overflowed) were dropped: a run that blew up past L read as "no
    collapse", and a mitigation that blew up as flat. Now they are the worst there is, in both scripts."""
    import math

    collapse = load_script("scripts/collapse.py")
    capacity = load_script("scripts/state_capacity.py")
    L = 64
    edges = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

    def curve(loss_at):
        return [{"start": a, "end": b, "mean_loss": loss_at(a), "n_tokens": b - a} for a, b in zip(edges, edges[1:])]

    for bad in (math.nan, math.inf):
        blown = curve(lambda s, bad=bad: 2.0 if s < 256 else bad)
        judged = capacity.judge_collapse(blown, L, 8, 0.1)
        assert judged["collapsed"] is True and judged["worst"] == math.inf and judged["worst_at"] == 256
        v = collapse.verdicts({"none": blown, "window:r=64": curve(lambda s: 2.0), "forget:c_dt=0.5": blown},
                              L, 8, 0.1)
        assert v["rises"] and v["worst_at"] == 256
        assert v["flat"] == {"window:r=64": True, "forget:c_dt=0.5": False} and v["passed"]
        # overflowed from L on: no finite reference, the mitigations are judged against [L/2, L)
        early = curve(lambda s, bad=bad: 2.0 if s < 64 else bad)
        assert capacity.judge_collapse(early, L, 8, 0.1)["collapsed"] is True
        v = collapse.verdicts({"none": early, "window:r=64": curve(lambda s: 2.0)}, L, 8, 0.1)
        assert v["rises"] and v["reference"] is None and v["flat"] == {"window:r=64": True}
        assert collapse.verdict_word(v) == "PASS"

@pytest.mark.parametrize("bad", ["eval.mitigations=[forget:c_alpha=2]", "eval.nope=1",
                                 "eval.mitigations=[norm-calibrated:factr=2]",
                                 "eval.mitigations=[norm-calibrated:factor=x]"])
def test_collapse_recipe_rejects_bad_eval(bad):
    capacity = load_script("scripts/state_capacity.py")
    with pytest.raises(ValueError):
        capacity.load_sweep(ROOT / "configs/train/collapse.yaml", [bad])


@pytest.mark.parametrize("max_len, factor", [(64, 16), (1024, 1)], ids=["evaluated-to-L", "factor-1"])
def test_collapse_report_without_bins_past_L_is_not_judged(tmp_path, capsys, max_len, factor):
    """An evaluation that stops at L, or a factor of 1, leaves nothing to judge: the report says so (it used to
    crash formatting the missing reference)."""
    collapse = load_script("scripts/collapse.py")
    edges = [e for e in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if e <= max_len]
    bins = [{"start": a, "end": b, "mean_loss": 2.0, "n_tokens": b - a} for a, b in zip(edges, edges[1:])]
    evaluations = {"slow_decay-L64": {spec: {"bins": bins} for spec in ("none", "window:r=64")}}
    (tmp_path / "evaluations.json").write_text(json.dumps(evaluations))
    rc = collapse.main([str(ROOT / "configs/train/collapse.yaml"), "--report-only", f"--output_dir={tmp_path}",
                        f"--eval.factor={factor}"])
    assert rc == 1  # nothing passed
    text = (tmp_path / "collapse.md").read_text()
    assert "**not judged (no bins past L)**" in text and "reference [L, 2L) -" in text
    summary = json.loads((tmp_path / "collapse.json").read_text())
    assert summary["slow_decay-L64"]["rises"] is None and not summary["slow_decay-L64"]["passed"]
    assert "not judged" in capsys.readouterr().out


@pytest.mark.parametrize("config", ["collapse.yaml", "state-capacity.yaml"])
def test_margin_comment_names_the_reference_the_code_uses(config):
    """judge_collapse / verdicts compare against the mean loss of [L, 2L); the recipe's comment says the same."""
    capacity = load_script("scripts/state_capacity.py")
    bins = [{"start": s, "end": 2 * s, "mean_loss": v} for s, v in ((32, 1.0), (64, 2.0), (128, 2.05))]
    assert capacity.judge_collapse(bins, 64, 4, 0.1)["reference"] == 2.0  # [L/2, L) would be 1.0
    margin = next(line for line in (ROOT / "configs/train" / config).read_text().splitlines()
                  if line.strip().startswith("margin:"))
    assert "[L, 2L)" in margin and "before L" not in margin


@pytest.mark.parametrize("L, bins_per_octave", [(64, 2), (48, 1), (96, 2)], ids=["L64-half-octaves", "L48", "L96"])
def test_state_capacity_and_collapse_judge_alike(L, bins_per_octave):
    """state_capacity.judge_collapse and collapse.verdicts take the same reference, the token-weighted mean loss
    of the bins starting in [L, 2L). judge_collapse used to average bin means (unequal bins: 2.075 instead of
    2.087) and to keep only bins ending by 2L, so a training length off the bin edges (48) was never judged."""
    from zoo.eval.length import log_bins

    capacity = load_script("scripts/state_capacity.py")
    collapse = load_script("scripts/collapse.py")
    bins = [{"start": a, "end": b, "mean_loss": 2.0 if a < 91 else 2.15 if a < 256 else 3.0, "n_tokens": 4 * (b - a)}
            for a, b in log_bins(16 * L - 1, bins_per_octave)]
    judged = capacity.judge_collapse(bins, L, 8, 0.1)
    v = collapse.verdicts({"none": bins}, L, 8, 0.1)
    assert judged["reference"] is not None and judged["collapsed"] is True
    assert judged["reference"] == pytest.approx(v["reference"]) and judged["collapsed"] == v["rises"]
    assert judged["worst"] == v["worst"] and judged["worst_at"] == v["worst_at"]


@pytest.mark.parametrize("bad, message", [
    ("eval.factor=abc", "eval.factor: expected a number > 0, got 'abc'"),
    ("eval.margin=-0.1", "eval.margin: expected a number >= 0 (nats), got -0.1"),
    ("eval.margin=0.1nats", "eval.margin: expected a number"),
    ("eval.batch_size=0", "eval.batch_size: expected an integer >= 1, got 0"),
    ("eval.max_len=1.5", "eval.max_len: expected an integer >= 2, got 1.5"),
    ("eval.bins_per_octave=0", "eval.bins_per_octave: expected a number > 0, got 0"),
    ("eval.start=randm", "eval.start: expected 'document' or 'random', got 'randm'"),
    ("train_lengths=[0]", "train_lengths: expected a list of positive integers"),
    ("train_lengths=[64,abc]", "train_lengths: expected a list of positive integers"),
])
def test_sweep_eval_values_are_checked_at_load(capsys, bad, message):
    """A wrong eval value used to pass load_sweep (and --dry-run) and fail only after training: eval.factor=abc or
    eval.margin=0.1nats raised a TypeError in the collapse verdict once the run was trained and evaluated (that
    evaluation never reached evaluations.json), train_lengths=[0] a ZeroDivisionError traceback."""
    capacity = load_script("scripts/state_capacity.py")
    with pytest.raises(ValueError) as e:
        capacity.load_sweep(ROOT / "configs/train/collapse.yaml", [bad])
    assert message in str(e.value)
    with pytest.raises(SystemExit) as e:
        capacity.main([str(ROOT / "configs/train/collapse.yaml"), f"--{bad}", "--dry-run"])
    assert e.value.code == 2 and message in capsys.readouterr().err
    # the recipes' own values, and a chunk_size of null (one forward per document), still load
    capacity.load_sweep(ROOT / "configs/train/state-capacity.yaml", ["eval.chunk_size=null"])


def test_sweep_rerun_keeps_evaluations_and_leaves_out_curves_of_other_settings(tmp_path, monkeypatch, capsys):
    """A rerun of the sweep (after an interruption, or to add a model with --only) evaluated every trained run again
    (training was skipped through done.json, the long evaluations were not), and curves saved under other eval
    settings stayed in evaluations.json and went into the table, fit and collapse report beside the new ones."""
    collapse = load_script("scripts/collapse.py")
    capacity = collapse._state_capacity()
    evaluated = []
    edges = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

    def train_run(run):
        out = Path(run["config"].output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "done.json").is_file():
            (out / "done.json").write_text(json.dumps({"model": str(out), "seconds": 1.0}))
        return out

    def evaluate_run(run, model_dir, documents, ev):
        evaluated.append((run["name"], ev["max_len"]))
        bins = [{"start": a, "end": b, "mean_loss": 2.0, "n_tokens": b - a}
                for a, b in zip(edges, edges[1:]) if b <= ev["max_len"]]
        return {spec: {"bins": bins} for spec in ["none", *ev["mitigations"]]}

    monkeypatch.setattr(capacity, "train_run", train_run)
    monkeypatch.setattr(capacity, "evaluate_run", evaluate_run)
    config = str(ROOT / "configs/train/collapse.yaml")
    base = [config, f"--output_dir={tmp_path}", "--eval.n_docs=1"]
    collapse.main(base)
    assert sorted(evaluated) == [("default-L64", 1024), ("slow_decay-L64", 1024)]
    evaluated.clear()
    collapse.main(base)
    assert evaluated == [] and "evaluation kept" in capsys.readouterr().out
    collapse.main([*base, "--eval.margin=0.2"])  # judging only: nothing to evaluate again
    assert evaluated == []
    collapse.main([*base, "--only", "slow_decay", "--eval.max_len=512"])
    assert evaluated == [("slow_decay-L64", 512)]
    assert "default-L64: left out" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "collapse.json").read_text())) == ["slow_decay-L64"]
    evaluated.clear()
    (tmp_path / "slow_decay-L64" / "done.json").write_text(json.dumps({"model": "x", "seconds": 2.0}))  # retrained
    collapse.main([*base, "--only", "slow_decay", "--eval.max_len=512"])
    assert evaluated == [("slow_decay-L64", 512)]


def test_norm_calibrated_runs_calibrate_where_the_sweeps_forwards_cap(monkeypatch, tmp_path):
    """A norm-calibrated mitigation's thresholds are measured at the points where the evaluation's cap acts: its
    forwards are eval.chunk_size tokens, and calibrate_norm_threshold was called with its own default (1024), so with
    a chunk_size that is not a multiple of 64 the cap acted at points the calibration had not looked at."""
    import zoo.eval.common
    import zoo.eval.length
    import zoo.state

    capacity = load_script("scripts/state_capacity.py")
    seen = []
    monkeypatch.setattr(zoo.eval.common, "load_model", lambda path: torch.nn.Linear(1, 1))
    monkeypatch.setattr(zoo.state, "apply_mitigation", lambda model, spec: None)
    monkeypatch.setattr(zoo.state, "calibrate_norm_threshold", lambda *a, **k: seen.append(k))
    monkeypatch.setattr(zoo.eval.length, "evaluate_length", lambda *a, **k: {"bins": []})
    monkeypatch.setattr(capacity, "judge_collapse", lambda *a, **k: {})
    ev = {"mitigations": ["norm-calibrated:factor=1"], "chunk_size": 96, "batch_size": 1, "bins_per_octave": 2,
          "factor": 8, "margin": 0.1}
    run = {"train_length": 64, "name": "r", "config": capacity.expand_runs(capacity.load_sweep(
        ROOT / "configs/train/collapse.yaml", [f"output_dir={tmp_path}"]))[0]["config"]}
    capacity.evaluate_run(run, Path("unused"), [torch.arange(200)], ev)
    assert [k["chunk_size"] for k in seen] == [96]


def sweep_stopped_at_step_2(tmp_path, monkeypatch):
    """scripts/state_capacity.py (loaded), collapse.yaml's first run at 4 steps, and a switch (`stop["on"]`) that makes
    its training receive SIGTERM at the second step, as `timeout` or a cluster's preemption sends it."""
    import os
    import signal

    import zoo.train

    capacity = load_script("scripts/state_capacity.py")
    real, stop = zoo.train.train, {"on": True}

    def train(cfg, **kwargs):
        def on_step(step, metrics):
            if stop["on"] and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, on_step=on_step, **kwargs)

    monkeypatch.setattr(zoo.train, "train", train)
    sweep = capacity.load_sweep(ROOT / "configs/train/collapse.yaml", [
        f"output_dir={tmp_path}", "tokens_per_run=1024", "batch_tokens=256", "run.schedule.warmup_steps=0",
        "run.log.every=1", "run.log.progress_bar=false"])
    return capacity, capacity.expand_runs(sweep)[0], stop


def test_sweep_training_stopped_by_a_signal_is_not_taken_for_a_trained_run(tmp_path, monkeypatch):
    """zoo.train answers SIGTERM or a first Ctrl-C by saving the step and returning (stopped): train_run wrote done.json
    for that half-trained model, the sweep evaluated it as the run's and went on to the next run, and every rerun kept
    it. The stop now ends the sweep, and the rerun continues the training to its last step."""
    capacity, run, stop = sweep_stopped_at_step_2(tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt, match="training stopped at step 2 of 4"):
        capacity.train_run(run)
    assert not (tmp_path / run["name"] / "done.json").exists()
    stop["on"] = False
    model_dir = capacity.train_run(run)
    done = json.loads((tmp_path / run["name"] / "done.json").read_text())
    assert done["tokens"] == 1024 and model_dir.parent.name == "step_00000004"


def test_a_done_json_of_a_stopped_training_is_not_taken_for_a_trained_run(tmp_path, monkeypatch, capsys):
    """Before the stop check, a training stopped by SIGTERM got a done.json naming its last checkpoint's model (step 2
    of 4), and every rerun reused that half-trained model. Such a record is now passed over: the training continues."""
    capacity, run, stop = sweep_stopped_at_step_2(tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        capacity.train_run(run)
    out = tmp_path / run["name"]
    half = out / "checkpoints" / "step_00000002" / "model"
    assert half.is_dir()
    settings = json.loads(json.dumps(run["config"].to_dict()))
    (out / "done.json").write_text(json.dumps({"config": settings, "model": str(half), "seconds": 1.0,
                                               "tokens": 512}))  # as the sweep wrote it before the stop check
    stop["on"] = False
    model_dir = capacity.train_run(run)
    assert model_dir.parent.name == "step_00000004"
    assert "step 2 of 4" in capsys.readouterr().out
    assert json.loads((out / "done.json").read_text())["tokens"] == 1024


def sweep_of_a_saved_model(tmp_path, monkeypatch):
    """scripts/state_capacity.py (loaded) and configs/train/collapse.yaml, its training replaced by a model saved once
    (a run's done.json written as train_run writes it, kept if there is one) and its plots off; saves every document."""
    from transformers import AutoModelForCausalLM

    import zoo.eval.length as length
    from zoo.config import ZooConfig

    capacity = load_script("scripts/state_capacity.py")
    config = ROOT / "configs/train/collapse.yaml"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig(**capacity.load_sweep(config)["models"]["default"]))
    model.save_pretrained(tmp_path / "model")

    def train_run(run):  # a trained model, as train_run gives it
        out = Path(run["config"].output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "done.json").is_file():
            (out / "done.json").write_text(json.dumps({"model": str(tmp_path / "model"), "seconds": 1.0}))
        return tmp_path / "model"

    monkeypatch.setattr(capacity, "train_run", train_run)
    monkeypatch.setattr(capacity, "plot_capacity", lambda *args: None)
    monkeypatch.setattr(length, "plot_length_curves", lambda *args: None)
    monkeypatch.setattr(capacity, "SAVE_EVERY", 0, raising=False)
    return capacity, config


def test_sweep_resumes_an_interrupted_evaluation(tmp_path, monkeypatch, capsys):
    """The sweep saved a run's curves only once every mitigation's evaluation was done: an interruption (after hours
    of long documents) lost them all. Each curve's finished documents are saved as it goes, as zoo eval length's are,
    and a rerun of the same model and settings resumes at the next document, to the curves of an uninterrupted run; a
    retrained model starts over."""
    import zoo.eval.length as length

    capacity, config = sweep_of_a_saved_model(tmp_path, monkeypatch)
    argv = [str(config), "--only", "default", "--eval.n_docs=3", "--eval.max_len=96", "--eval.chunk_size=32",
            "--eval.batch_size=1", "--eval.mitigations=['forget:c_alpha=0.9']", "--eval.start=document"]
    capacity.main([*argv, f"--output_dir={tmp_path / 'whole'}"])
    whole = (tmp_path / "whole" / "evaluations.json").read_text()
    out = tmp_path / "out"
    calls, stop = interrupt_after(monkeypatch, length, 3 + 1)  # the unmitigated curve's documents, one of the other's
    with pytest.raises(KeyboardInterrupt):
        capacity.main([*argv, f"--output_dir={out}"])
    assert sorted(p.name for p in (out / "default-L64").glob("*.partial.pt*")) == [
        "length-forget_c_alpha=0.9.partial.pt", "length-none.partial.pt"]
    capsys.readouterr()
    stop[0], calls[:] = None, []
    capacity.main([*argv, f"--output_dir={out}"])
    printed = capsys.readouterr().out
    assert "default-L64 [none]: every document is done" in printed
    assert "resuming default-L64 [forget:c_alpha=0.9] from document 2 of 3" in printed and calls == [1, 1]
    assert (out / "evaluations.json").read_text() == whole
    assert not list((out / "default-L64").glob("*.partial.pt*"))

    stop[0], calls[:] = 1, []
    (out / "evaluations.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        capacity.main([*argv, f"--output_dir={out}"])
    (out / "default-L64" / "done.json").write_text(json.dumps({"model": str(tmp_path / "model"), "seconds": 2.0}))
    stop[0], calls[:] = None, []
    capacity.main([*argv, f"--output_dir={out}"])
    assert "holds a partial run of other settings (model differ); starting over" in capsys.readouterr().out
    assert len(calls) == 6 and (out / "evaluations.json").read_text() == whole


def test_sweep_resumes_an_evaluation_partial_keyed_by_the_whole_training_config(tmp_path, monkeypatch, capsys):
    """An evaluation's partial file was keyed by the run's whole training config until the key left out its log and
    checkpoint settings (`shaping`): one an interruption left under that key was taken for a partial run of other
    settings on the rerun ("starting over"), and its finished documents evaluated again. It is resumed."""
    import zoo.eval.length as length

    capacity, config = sweep_of_a_saved_model(tmp_path, monkeypatch)
    argv = [str(config), "--only", "default", "--eval.n_docs=3", "--eval.max_len=96", "--eval.chunk_size=32",
            "--eval.batch_size=1", "--eval.mitigations=[]", f"--output_dir={tmp_path}"]
    calls, stop = interrupt_after(monkeypatch, length, 2)
    shaping = capacity.shaping
    monkeypatch.setattr(capacity, "shaping", lambda stamp: stamp)  # the key as the earlier version wrote it
    with pytest.raises(KeyboardInterrupt):
        capacity.main(argv)
    monkeypatch.setattr(capacity, "shaping", shaping)
    capsys.readouterr()
    stop[0], calls[:] = None, []
    capacity.main(argv)
    printed = capsys.readouterr().out
    assert "starting over" not in printed and "from document 3 of 3" in printed and calls == [1]


def test_sweep_evaluation_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    """A run's evaluation (long documents, once per mitigation: minutes to hours) ran without a line after its
    training's bar; it shows a bar over the documents' tokens, one per curve, as zoo eval length does."""
    capacity, config = sweep_of_a_saved_model(tmp_path, monkeypatch)
    capacity.main([str(config), "--only", "default", "--eval.n_docs=2", "--eval.max_len=96", "--eval.chunk_size=32",
                   "--eval.batch_size=1", "--eval.mitigations=['forget:c_alpha=0.9']", f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert err.count("length eval:   0%") == 2 and err.count("length eval: 100%") >= 2 and "192/192" in err, err


def test_sweep_removes_the_partials_of_mitigations_no_longer_listed(tmp_path, monkeypatch):
    """A rerun removed only the partial files of the curves it listed: one of a mitigation dropped from
    eval.mitigations since the interrupted run stayed in the run folder for good, whether the rerun evaluated the run
    or kept its saved curves."""
    import zoo.eval.length as length

    capacity, config = sweep_of_a_saved_model(tmp_path, monkeypatch)
    argv = [str(config), "--only", "default", "--eval.n_docs=2", "--eval.max_len=96", "--eval.chunk_size=32",
            "--eval.batch_size=1", "--eval.start=document", f"--output_dir={tmp_path / 'out'}"]
    folder = tmp_path / "out" / "default-L64"
    dropped = "--eval.mitigations=['forget:c_alpha=0.9']"
    calls, stop = interrupt_after(monkeypatch, length, 2 + 1)  # the unmitigated curve, one document of the other
    with pytest.raises(KeyboardInterrupt):
        capacity.main([*argv, dropped])
    assert (folder / "length-forget_c_alpha=0.9.partial.pt").is_file()
    stop[0] = None
    capacity.main([*argv, "--eval.mitigations=[]"])  # evaluates the run
    assert not list(folder.glob("*.partial.pt*"))

    stop[0], calls[:] = 2 + 1, []
    with pytest.raises(KeyboardInterrupt):
        capacity.main([*argv, dropped])
    stop[0], calls[:] = None, []
    capacity.main([*argv, "--eval.mitigations=[]"])  # keeps the curves evaluations.json holds
    assert calls == [] and not list(folder.glob("*.partial.pt*"))


def sweep_with_trained_runs(monkeypatch):
    """scripts/state_capacity.py (loaded) whose runs count as trained (a done.json, no training), and a flat curve's
    bins for its evaluations."""
    capacity = load_script("scripts/state_capacity.py")
    bins = [{"start": a, "end": 2 * a, "mean_loss": 2.0, "n_tokens": a} for a in (1, 2, 4, 8, 16, 32, 64, 128)]

    def train_run(run):
        out = Path(run["config"].output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "done.json").write_text(json.dumps({"model": str(out)}))
        return out

    monkeypatch.setattr(capacity, "train_run", train_run)
    return capacity, bins


def test_sweep_interrupted_while_writing_evaluations_keeps_them(tmp_path, monkeypatch):
    """evaluations.json was written in place: an interruption mid-write left it truncated, every run's curves were
    lost and the rerun stopped at reading it (JSONDecodeError). It is written beside and renamed over now."""
    capacity, bins = sweep_with_trained_runs(monkeypatch)
    monkeypatch.setattr(capacity, "evaluate_run", lambda run, *args: {"none": {"bins": bins}})
    argv = [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", "--eval.mitigations=[]"]
    capacity.main([*argv, "--only", "default"])
    before = json.loads((tmp_path / "evaluations.json").read_text())
    real = Path.write_text

    def interrupted(self, text, *args, **kwargs):  # half of evaluations.json reaches the disk, then Ctrl-C
        if self.name.startswith("evaluations.json"):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        capacity.main([*argv, "--only", "slow_decay"])
    monkeypatch.setattr(Path, "write_text", real)
    assert json.loads((tmp_path / "evaluations.json").read_text()) == before
    capacity.main([*argv, "--only", "slow_decay"])
    assert sorted(json.loads((tmp_path / "evaluations.json").read_text())) == ["default-L64", "slow_decay-L64"]


def test_sweeps_of_other_models_on_one_output_dir_keep_each_others_evaluations(tmp_path, monkeypatch):
    """Two calls on one output_dir (--only one model each, say on two GPUs): each wrote back the evaluations.json it
    had read at its start, so the one that finished last dropped the curves the other saved meanwhile (hours of
    evaluation, their partial files already removed). A run's curves are added to the file as it is now."""
    capacity, bins = sweep_with_trained_runs(monkeypatch)

    def evaluate_run(run, *args):  # while default's evaluation runs, the other call evaluates slow_decay
        if run["model"] == "default":
            capacity.main([*argv, "--only", "slow_decay"])
        return {"none": {"bins": bins}}

    monkeypatch.setattr(capacity, "evaluate_run", evaluate_run)
    monkeypatch.setattr(capacity, "plot_capacity", lambda *args: None)
    argv = [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", "--eval.mitigations=[]"]
    capacity.main([*argv, "--only", "default"])
    for name in ("evaluations.json", "evaluations-settings.json"):
        assert sorted(json.loads((tmp_path / name).read_text())) == ["default-L64", "slow_decay-L64"]


def test_sweep_says_and_records_how_much_of_its_documents_is_training_text(tmp_path, monkeypatch):
    """The sweep's documents ran past the held-out files into the training files silently (collapse.yaml's eval:
    83% of the tokens, before corpus_documents kept the rest of a file). Each curve in evaluations.json records the
    documents' share of training text now, a run trained on the built-in corpus whose documents hold any is warned
    about, and collapse.md / collapse.json carry it; documents of held-out text only are not."""
    collapse = load_script("scripts/collapse.py")
    capacity, config = sweep_of_a_saved_model(tmp_path, monkeypatch)
    monkeypatch.setattr(collapse, "_state_capacity", lambda: capacity)
    argv = [str(config), "--only", "default", "--eval.n_docs=2", "--eval.max_len=96", "--eval.chunk_size=32",
            "--eval.batch_size=1", "--eval.mitigations=['forget:c_alpha=0.9']"]
    with pytest.warns(UserWarning, match=r"default-L64: 2 of 2 documents \(99\.0% of their 192 tokens\) are text"):
        collapse.main([*argv, "--run.data.holdout=0", f"--output_dir={tmp_path / 'all'}"])
    saved = json.loads((tmp_path / "all" / "evaluations.json").read_text())["default-L64"]
    assert [e["documents"]["train_tokens"] for e in saved.values()] == [190, 190]
    assert json.loads((tmp_path / "all" / "collapse.json").read_text())["default-L64"]["documents"]["train_share"] == \
        190 / 192
    assert "**warning**: 2 of 2 documents (99.0% of the tokens) are text of the training files" in \
        (tmp_path / "all" / "collapse.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        collapse.main([*argv, f"--output_dir={tmp_path / 'held'}"])
    saved = json.loads((tmp_path / "held" / "evaluations.json").read_text())["default-L64"]
    assert [e["documents"]["train_tokens"] for e in saved.values()] == [0, 0]
    assert "**warning**" not in (tmp_path / "held" / "collapse.md").read_text()


def _run_as_command(script: str, argv: list[str], monkeypatch) -> int:
    """scripts/<script> run as `python scripts/<script> ARGV` runs it (its __main__ block); returns the exit status."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / script), *argv])
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    try:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def test_sweep_stopped_by_a_signal_ends_in_one_line_saying_where_it_saved(tmp_path, monkeypatch, capsys):
    """A training of the sweep stopped by SIGTERM or Ctrl-C ended scripts/state_capacity.py in a traceback of the
    KeyboardInterrupt that says where the step is saved: it is that one line now, and exit status 130, as zoo train."""
    sweep_stopped_at_step_2(tmp_path, monkeypatch)
    name = "default-L64"
    argv = [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", "--only", "default",
            "--tokens_per_run=1024", "--batch_tokens=256", "--run.schedule.warmup_steps=0", "--run.log.every=1",
            "--run.log.progress_bar=false"]
    capsys.readouterr()
    assert _run_as_command("state_capacity.py", argv, monkeypatch) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"state_capacity.py: interrupted: {name}: training stopped at step 2 of 4, saved in "
                        f"{tmp_path / name}; the same command continues it\n")
    assert "Traceback" not in err and (tmp_path / name / "checkpoints" / "step_00000002").is_dir()


@pytest.mark.parametrize("script", ["state_capacity.py", "collapse.py"])
def test_sweep_interrupted_ends_in_one_line_saying_what_is_kept(script, tmp_path, monkeypatch, capsys):
    """Ctrl-C anywhere in the sweep (a model loading, a second Ctrl-C mid-step, an evaluation) ended both scripts in a
    bare KeyboardInterrupt traceback: it is one line saying what each stage kept and that the same command goes on,
    and exit status 130; collapse.py writes no report of the unfinished sweep. The line names the script as its
    usage and errors do (it said 'collapse: interrupted' beside 'collapse.py: error')."""
    import zoo.train

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo.train, "train", interrupted)
    argv = [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", "--only", "default"]
    assert _run_as_command(script, argv, monkeypatch) == 130
    err = capsys.readouterr().err
    assert err == (f"{script}: interrupted: trained runs (done.json), evaluated runs "
                   f"(evaluations.json) and an evaluation's finished documents (length-*.partial.pt) are kept in "
                   f"{tmp_path}; the same command continues\n")
    assert not (tmp_path / "collapse.md").exists()
    assert _run_as_command(script, ["--unknown"], monkeypatch) == 2
    assert f"{script}: error: " in capsys.readouterr().err


@pytest.mark.parametrize("script", ["state_capacity", "collapse"])
def test_sweep_evaluation_stopped_by_sigterm_keeps_its_documents_and_says_so(script, tmp_path, monkeypatch, capsys):
    """SIGTERM (`timeout`'s, a scheduler's) during a sweep's evaluation killed both scripts without a word (only the
    training handled it): it stops as Ctrl-C does now, the finished documents' partial file kept, one line saying what
    is kept and that the same command continues, exit status 130; the handler before the command is back afterwards."""
    import signal

    from helpers import sigterm_after, sigterm_raises_terminated

    import zoo.eval.length as length
    from zoo.cli import _run

    capacity, config = sweep_of_a_saved_model(tmp_path, monkeypatch)
    main = capacity.main if script == "state_capacity" else load_script("scripts/collapse.py").main
    out = tmp_path / "out"
    argv = [str(config), "--only", "default", "--eval.n_docs=3", "--eval.max_len=96", "--eval.chunk_size=32",
            "--eval.batch_size=1", "--eval.mitigations=[]", "--eval.start=document", f"--output_dir={out}"]
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    calls = sigterm_after(monkeypatch, length, 2)
    capsys.readouterr()
    with sigterm_raises_terminated() as handler:
        assert _run(script, main, argv) == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    assert calls == [1, 1] and torch.load(out / "default-L64" / "length-none.partial.pt")["batches"] == 2
    assert (f"{script}: interrupted: trained runs (done.json), evaluated runs (evaluations.json) and an evaluation's "
            f"finished documents (length-*.partial.pt) are kept in {out}; the same command continues\n"
            in capsys.readouterr().err)
    assert not (out / "collapse.md").exists() and not (out / "summary.md").exists()


def test_sweep_rerun_with_other_logging_keeps_the_trained_and_evaluated_runs(tmp_path, monkeypatch, capsys):
    """done.json and the saved curves were reused only under the same training config, its log and checkpoint sections
    included: a rerun with another run.log.every (or progress bar, or checkpoint.keep) resumed the training at its last
    step, rewrote done.json and evaluated every curve of the run again (hours on long documents)."""
    import zoo.eval.length as length
    import zoo.train

    capacity = load_script("scripts/state_capacity.py")
    evaluated, trained = [], []
    real = zoo.train.train

    def train(cfg, **kwargs):
        trained.append(cfg.output_dir)
        return real(cfg, **kwargs)

    def evaluate_run(run, model_dir, documents, ev):
        evaluated.append(run["name"])
        bins = [{"start": a, "end": 2 * a, "mean_loss": 2.0, "n_tokens": a} for a in (1, 2, 4, 8, 16, 32, 64, 128)]
        return {spec: {"bins": bins} for spec in ["none", *ev["mitigations"]]}

    monkeypatch.setattr(zoo.train, "train", train)
    monkeypatch.setattr(capacity, "evaluate_run", evaluate_run)
    monkeypatch.setattr(capacity, "plot_capacity", lambda *args: None)
    monkeypatch.setattr(length, "plot_length_curves", lambda *args: None)
    base = [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", "--only", "default",
            "--tokens_per_run=512", "--batch_tokens=256", "--run.schedule.warmup_steps=0", "--eval.max_len=256",
            "--eval.factor=2", "--eval.n_docs=1"]
    assert capacity.main([*base, "--run.log.progress_bar=false"]) == 0
    assert (trained, evaluated) == ([str(tmp_path / "default-L64")], ["default-L64"])
    done = (tmp_path / "default-L64" / "done.json").read_text()
    capsys.readouterr()
    assert capacity.main([*base, "--run.log.every=1", "--run.checkpoint.keep=2"]) == 0
    assert (len(trained), len(evaluated)) == (1, 1)
    out = capsys.readouterr().out
    assert "default-L64: evaluation kept" in out and "default-L64: left out" not in out
    assert (tmp_path / "default-L64" / "done.json").read_text() == done
    with pytest.raises(ValueError, match="other settings"):  # what the model trains on still counts
        capacity.main([*base, "--run.optim.lr=1.0e-3"])


def test_sweep_reports_say_under_which_margin_and_factor_they_judged(tmp_path, monkeypatch):
    """--fit-only / --report-only with another eval.margin or eval.factor re-judge the same curves, and summary.md,
    summary.json and collapse.json did not say under which: two reports of one sweep disagreed without a word why."""
    collapse = load_script("scripts/collapse.py")
    capacity = collapse._state_capacity()
    edges = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

    def train_run(run):
        out = Path(run["config"].output_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def evaluate_run(run, model_dir, documents, ev):
        bins = [{"start": a, "end": b, "mean_loss": 2.0 + 0.1 * (a >= 256), "n_tokens": b - a}
                for a, b in zip(edges, edges[1:])]
        return {spec: {"bins": bins} for spec in ["none", *ev["mitigations"]]}

    monkeypatch.setattr(capacity, "train_run", train_run)
    monkeypatch.setattr(capacity, "evaluate_run", evaluate_run)
    base = [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", "--only", "default"]
    collapse.main(base)
    for margin, collapsed in (("0.05", True), ("0.2", False)):
        assert capacity.main([*base, "--fit-only", f"--eval.margin={margin}", "--eval.factor=8"]) == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["table"][0]["collapsed"] is collapsed
        assert (summary["eval"]["margin"], summary["eval"]["factor"]) == (float(margin), 8)
        assert f"by more than {float(margin):g} nats" in (tmp_path / "summary.md").read_text()
        collapse.main([*base[:2], "--report-only", f"--eval.margin={margin}", "--eval.factor=8"])
        report = json.loads((tmp_path / "collapse.json").read_text())["default-L64"]
        assert (report["rises"], report["margin"], report["factor"]) == (collapsed, float(margin), 8)


def test_capacity_fit_leaves_out_models_free_of_collapse_at_the_shortest_length(tmp_path, monkeypatch):
    """A model free of collapse even at the shortest trained length has a capacity length of at most that length;
    the fit took it for the capacity length itself, so the line was pulled towards that length at small states."""
    capacity = load_script("scripts/state_capacity.py")
    monkeypatch.setattr(capacity, "plot_capacity", lambda *args: None)
    lengths = [64, 128, 256, 512, 1024, 2048]
    first_free = {"d_state16": 64, "d_state64": 256, "d_state256": 1024}

    def curve(L, collapses):  # octave bins to 2^14, the loss rising past 2L where the model collapses
        return [{"start": a, "end": 2 * a, "mean_loss": 3.0 if collapses and a >= 2 * L else 2.0, "n_tokens": a}
                for a in (2 ** k for k in range(14))]

    evaluations = {f"{m}-L{L}": {"none": {"bins": curve(L, L < first)}} for m, first in first_free.items()
                   for L in lengths}
    (tmp_path / "evaluations.json").write_text(json.dumps(evaluations))
    config = str(ROOT / "configs/train/state-capacity.yaml")
    assert capacity.main([config, f"--output_dir={tmp_path}", "--fit-only", "--eval.mitigations=[]"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["shortest"] == first_free and summary["bounded"] == ["d_state16"]
    slope, intercept = summary["fit"]
    for model in ("d_state64", "d_state256"):  # the line through the two measured capacity lengths
        assert slope * summary["sizes"][model] + intercept == pytest.approx(first_free[model] / 1024)
    text = (tmp_path / "summary.md").read_text()
    assert "| d_state16 | 0.0328 | <= 64 |" in text and "left out of the fit: d_state16" in text


def test_sweep_does_not_continue_a_training_of_other_settings(tmp_path, monkeypatch):
    """A run trained (or stopped) under another run.optim.lr, schedule or tokens_per_run was continued from its last
    checkpoint: a finished one trained no further, and done.json recorded its model as trained under the new settings.
    Such a folder is now refused by name; another log section still continues it."""
    capacity, run, stop = sweep_stopped_at_step_2(tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        capacity.train_run(run)

    def run_with(*overrides):
        sweep = capacity.load_sweep(ROOT / "configs/train/collapse.yaml", [
            f"output_dir={tmp_path}", "tokens_per_run=1024", "batch_tokens=256", "run.schedule.warmup_steps=0",
            "run.log.every=1", "run.log.progress_bar=false", *overrides])
        return capacity.expand_runs(sweep)[0]

    with pytest.raises(ValueError, match=r"holds a training under other settings \(optim.lr: 0.004 -> 0.001\)"):
        capacity.train_run(run_with("run.optim.lr=1.0e-3"))  # stopped under another lr
    stop["on"] = False
    assert capacity.train_run(run_with("run.log.every=2")).parent.name == "step_00000004"
    done = (tmp_path / run["name"] / "done.json").read_text()
    with pytest.raises(ValueError, match="optim.lr: 0.004 -> 0.001"):
        capacity.train_run(run_with("run.optim.lr=1.0e-3"))  # finished under another lr
    assert (tmp_path / run["name"] / "done.json").read_text() == done
