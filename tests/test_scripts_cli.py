"""The research scripts (scripts/train_synthetic.py, state_capacity.py, collapse.py) refuse bad input before they
train anything: one `prog: error: message` line and exit status 2, as zoo train does. Nothing here trains more
than two steps, but the resume test (five)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import launch_fsdp_on_cpu, load_script

ROOT = Path(__file__).resolve().parents[1]


def _refused(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["train", "dry-run"])
def test_train_synthetic_only_with_an_unknown_model_is_refused_by_name(capsys, dry_run):
    script = load_script("scripts/train_synthetic.py")
    err = _refused(script.main, [str(ROOT / "configs/train/induction-cpu.yaml"), "--only", "mambaa", *dry_run], capsys)
    assert "--only: no model named 'mambaa'" in err and "did you mean 'mamba'?" in err
    assert "models: mamba, attention" in err


def test_train_synthetic_state_passing_on_attention_is_refused_before_training(capsys):
    script = load_script("scripts/train_synthetic.py")
    recipe = ROOT / "configs/train/induction-cpu.yaml"
    with pytest.raises(ValueError, match="train.state_passing: model 'attention' has attention layers"):
        script.expand_runs(script.load_recipe(recipe, ["train.state_passing=true"]))
    err = _refused(script.main, [str(recipe), "--train.state_passing=true", "--dry-run"], capsys)
    assert "model 'attention'" in err and "model_overrides" in err
    # the recurrent model alone, or state passing set for it only, is fine
    runs = script.expand_runs(script.load_recipe(recipe, ["train.state_passing=true"]), only=["mamba"])
    assert [r.model_name for r in runs] == ["mamba"] and runs[0].section.train.state_passing
    runs = script.expand_runs(script.load_recipe(recipe, ["model_overrides={mamba: {train.state_passing: true}}"]))
    assert {r.model_name: r.section.train.state_passing for r in runs} == {"mamba": True, "attention": False}


def test_train_synthetic_command_line_override_beats_model_overrides(capsys):
    # induction.yaml gives mamba {train.state_passing: true, train.max_steps: 20000}: a newcomer shortening the run
    # with --train.max_steps=50 got 50 steps for attention and still 20000 for mamba
    script = load_script("scripts/train_synthetic.py")
    recipe = ROOT / "configs/train/induction.yaml"
    runs = script.expand_runs(script.load_recipe(recipe, ["--train.max_steps=50", "--schedule.warmup_steps=5"]))
    assert {r.model_name: r.section.train.max_steps for r in runs} == {"mamba": 50, "attention": 50}
    assert {r.model_name: r.section.train.state_passing for r in runs} == {"mamba": True, "attention": False}
    runs = script.expand_runs(script.load_recipe(recipe, ["train.state_passing=false"]), only=["mamba"])
    assert not runs[0].section.train.state_passing and runs[0].section.train.max_steps == 20000
    assert script.main([str(recipe), "--dry-run", "--train.max_steps=50", "--schedule.warmup_steps=5"]) == 0
    assert "mamba: 66,496 parameters, 50 steps" in capsys.readouterr().out


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["train", "dry-run"])
def test_train_synthetic_task_vocabulary_larger_than_the_model_is_refused_before_training(tmp_path, capsys, dry_run):
    """mqar's 8192 tokens on a 16-token model trained until the embedding raised IndexError (a CUDA assert on a GPU)."""
    script = load_script("scripts/train_synthetic.py")
    recipe = [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path}", "--data.task=mqar",
              "--data.task_kwargs={n_kv: 4}", "--data.seq_len=64", "--curriculum=[]", "--train.max_steps=2",
              "--schedule.warmup_steps=0"]
    err = _refused(script.main, [*recipe, *dry_run], capsys)
    assert ("data.task_kwargs.vocab_size: the mqar task draws from 8192 tokens but model 'mamba' has vocab_size 16; "
            "set data.task_kwargs.vocab_size <= 16 or the model's vocab_size >= 8192") in err
    assert not any(tmp_path.iterdir())
    runs = script.expand_runs(script.load_recipe(recipe[0], [a[2:] for a in recipe[2:]]
                                                 + ["data.task_kwargs.vocab_size=16"]))
    assert [r.model_name for r in runs] == ["mamba", "attention"]  # a vocabulary that fits is fine


@pytest.mark.parametrize("override, message", [
    ("--eval.n_kv=[4, 8]", "eval.n_kv: task 'induction_heads' has no count to vary; leave eval.n_kv unset"),
    ("--eval.seq_lens=[2, 3]", "eval.seq_lens / eval.n_kv: no cell of the induction_heads grid can be built for "
                               "model 'mamba' (seq_len=2: induction heads: seq_len=2 must be >= 4; seq_len=3:"),
    ("--eval.max_len={mamba: 32}", "eval.max_len.mamba: 32 leaves none of eval.seq_lens [64, 128"),
    ("--eval.n_samples=0", "eval.n_samples: must be >= 1, got 0"),
    ("--eval.batch_size=-1", "eval.batch_size: must be >= 1, got -1"),
    ("--eval.chunk_size=0", "eval.chunk_size: must be >= 1, got 0 (null runs each row in one forward)"),
], ids=["n_kv", "seq_lens", "max_len", "n_samples", "batch_size", "chunk_size"])
def test_train_synthetic_evaluation_grid_it_cannot_run_is_refused_before_training(tmp_path, capsys, override, message):
    """An eval grid the task cannot build raised in evaluate_synthetic after the model had trained (max_len leaving
    no length gave an empty result without a word; eval.n_samples / batch_size / chunk_size below 1 a traceback from
    evaluate_synthetic or the chunked forward); --dry-run passed."""
    script = load_script("scripts/train_synthetic.py")
    err = _refused(script.main, [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path}",
                                 override, "--only", "mamba", "--dry-run"], capsys)
    assert message in err
    assert not any(tmp_path.iterdir())


def test_train_synthetic_plot_count_the_grid_does_not_evaluate_is_refused_before_training(tmp_path, capsys):
    """The summary's acc@T columns, accuracy_vs_length.png and the plot cell read the plot count's cells only (the
    trained count by default): a model trained at n_kv 4 and tested at eval.n_kv [2, 8] got a summary of '-' only,
    after its training; eval.plot_count on a task without counts did the same."""
    script = load_script("scripts/train_synthetic.py")
    recipe = [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path}", "--only", "mamba",
              "--dry-run", "--data.task=mqar", "--data.task_kwargs={n_kv: 4, vocab_size: 16}", "--data.seq_len=64",
              "--curriculum=[]"]
    err = _refused(script.main, [*recipe, "--eval.n_kv=[2, 8]"], capsys)
    assert ("eval.plot_count: the trained n_kv (eval.plot_count's default) is 4, which the grid does not evaluate "
            "(n_kv [2, 8])") in err
    err = _refused(script.main, [*recipe, "--eval.n_kv=[2, 4]", "--eval.plot_count=8"], capsys)
    assert "eval.plot_count: eval.plot_count is 8, which the grid does not evaluate (n_kv [2, 4])" in err
    err = _refused(script.main, [*recipe[:5], "--eval.plot_count=4"], capsys)
    assert "eval.plot_count: task 'induction_heads' has no count of items; leave eval.plot_count unset" in err
    assert not any(tmp_path.iterdir())
    for grid in (["--eval.n_kv=[2, 4]"], ["--eval.n_kv=[2, 4]", "--eval.plot_count=2"], []):  # the count is tested
        assert script.main([*recipe, *grid]) == 0


def test_train_synthetic_plot_length_a_model_is_not_tested_at_is_refused_before_training(tmp_path, capsys):
    """eval.plot_seq_len outside a model's lengths (eval.seq_lens, up to its eval.max_len) was taken: every run's plot
    accuracy read None, accuracy_vs_state.png came out empty and the best run was picked over the grid, after
    training; eval.plot_count's cell was already checked."""
    script = load_script("scripts/train_synthetic.py")
    recipe = [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path}", "--dry-run"]
    err = _refused(script.main, [*recipe, "--eval.plot_seq_len=1000"], capsys)
    assert ("eval.plot_seq_len: 1000 is not a length model 'mamba' is tested at ([64, 128, 256, 512, 1024, 2048, "
            "4096, 8192, 16384, 32768, 65536]), so its accuracy-vs-state point would be empty; set "
            "eval.plot_seq_len to one of them or add it to eval.seq_lens") in err
    err = _refused(script.main, [*recipe, "--eval.plot_seq_len=32768"], capsys)  # past attention's max_len
    assert "eval.plot_seq_len: 32768 is not a length model 'attention' is tested at" in err
    assert "or raise eval.max_len.attention" in err
    assert not any(tmp_path.iterdir())
    assert script.main([*recipe, "--eval.plot_seq_len=1024"]) == 0


def test_train_synthetic_select_over_a_key_the_sweep_does_not_vary_is_refused(tmp_path, capsys):
    """A misspelt select_over key (optim.lrr) maximised over nothing: every learning rate of mqar-sweep.yaml was kept
    as a "best" run, and accuracy_vs_state.png drew the learning rates as points of a state-size sweep."""
    script = load_script("scripts/train_synthetic.py")
    recipe = [str(ROOT / "configs/train/mqar-sweep.yaml"), f"--output_dir={tmp_path}", "--only", "mamba", "--dry-run"]
    err = _refused(script.main, [*recipe, "--select_over=[optim.lrr]"], capsys)
    assert ("select_over: 'optim.lrr' is not a sweep key (did you mean 'optim.lr'?); the summary keeps the best run "
            "over sweep keys only (sweep: model.d_model, optim.lr)") in err
    assert not any(tmp_path.iterdir())
    for fine in (["--select_over=[optim.lr]"], ["--select_over=[model.d_model, optim.lr]"], ["--select_over=[]"],
                 ["--sweep={}"]):  # (no sweep: the default select_over has nothing to maximise over, and is fine)
        assert script.main([*recipe, *fine]) == 0


def test_train_synthetic_eval_max_len_takes_the_forms_of_seq_lens_and_names_only_models(tmp_path, capsys):
    """eval.max_len {attention: 2^14} (the form eval.seq_lens takes beside it) failed with a TypeError traceback
    ('<=' between int and str); a misspelt model name there was ignored, so that model ran the whole length grid."""
    script = load_script("scripts/train_synthetic.py")
    recipe = ROOT / "configs/train/induction-cpu.yaml"
    for limit in ("2^14", "16K", "16384"):
        runs = script.expand_runs(script.load_recipe(recipe, [f"eval.max_len={{attention: {limit}}}"]))
        assert [r.eval.max_len for r in runs] == [{"attention": 16384}] * 2
    err = _refused(script.main, [str(recipe), f"--output_dir={tmp_path}", "--eval.max_len={atention: 16384}",
                                 "--dry-run"], capsys)
    assert "eval.max_len: no model named ['atention'] (models: ['attention', 'mamba'])" in err


def test_state_capacity_only_with_an_unknown_model_is_refused_by_name(capsys):
    script = load_script("scripts/state_capacity.py")
    err = _refused(script.main, [str(ROOT / "configs/train/state-capacity.yaml"), "--only", "d_state_16",
                                 "--dry-run"], capsys)
    assert "--only: no model named 'd_state_16'" in err and "did you mean 'd_state16'?" in err


@pytest.mark.parametrize("report_only", [[], ["--report-only"]], ids=["train", "report-only"])
def test_collapse_only_with_an_unknown_model_is_refused_by_name(tmp_path, capsys, report_only):
    collapse = load_script("scripts/collapse.py")
    err = _refused(collapse.main, [str(ROOT / "configs/train/collapse.yaml"), "--only", "slow_decy",
                                   f"--output_dir={tmp_path}", *report_only], capsys)
    assert "--only: no model named 'slow_decy'" in err and "did you mean 'slow_decay'?" in err
    assert not any(tmp_path.iterdir())  # nothing trained, no report


@pytest.mark.parametrize("spec, message", [
    ("norm-calibrated:factr=2", "norm-calibrated takes only factor=F, got 'factr=2'"),
    ("norm-calibrated:factor=abc", "factor must be a number, got 'abc'"),
    ("norm-calibrated:factor=0", "factor must be > 0"),
    ("forget:c_alpha=abc", "could not convert"),
], ids=["unknown-key", "not-a-number", "zero", "forget-not-a-number"])
def test_state_capacity_mitigation_specs_are_checked_at_load(capsys, spec, message):
    script = load_script("scripts/state_capacity.py")
    with pytest.raises(ValueError) as e:
        script.load_sweep(ROOT / "configs/train/state-capacity.yaml", [f"eval.mitigations=[{spec!r}]"])
    assert f"eval.mitigations: {spec!r}" in str(e.value) and message in str(e.value)
    err = _refused(script.main, [str(ROOT / "configs/train/state-capacity.yaml"), f"--eval.mitigations=[{spec!r}]",
                                 "--dry-run"], capsys)
    assert spec in err


@pytest.mark.parametrize("script_name, config", [("state_capacity", "state-capacity"), ("collapse", "collapse")])
@pytest.mark.parametrize("override, message", [
    ("--output_dirr=runs/x", "output_dirr: unknown field; did you mean output_dir?"),
    ("--tokens_per_runn=4096", "tokens_per_runn: unknown field; did you mean tokens_per_run?"),
    ("--run.train.max_steps=5", "run.train.max_steps: the sweep sets it for each run (from tokens_per_run / "
                                "batch_tokens)"),
    ("--run.train.micro_batch_size=2", "run.train.micro_batch_size: the sweep sets it for each run"),
    ("--run.data.seq_len=32", "run.data.seq_len: the sweep sets it for each run (from train_lengths)"),
    ("--run.output_dir=runs/x", "run.output_dir: the sweep sets it for each run (from output_dir)"),
], ids=["output_dir-typo", "tokens_per_run-typo", "max_steps", "micro_batch_size", "seq_len", "run-output_dir"])
def test_sweep_field_it_would_ignore_is_refused_before_training(tmp_path, capsys, monkeypatch, script_name, config,
                                                                override, message):
    """A misspelt top-level field of a state-capacity or collapse sweep was read as nothing (--output_dirr left the
    runs in the recipe's folder), and a run.train.max_steps, micro_batch_size, data.seq_len or output_dir was
    replaced by the sweep's own without a word: each is refused by name, in --dry-run too."""
    script = load_script(f"scripts/{script_name}.py")
    capacity = script._state_capacity() if script_name == "collapse" else script
    trained = []
    monkeypatch.setattr(capacity, "train_run", lambda run: trained.append(run["name"]))
    with pytest.raises(ValueError, match=re.escape(message)):
        capacity.load_sweep(ROOT / f"configs/train/{config}.yaml", [override[2:]])
    for dry_run in ([], ["--dry-run"]) if script_name == "state_capacity" else ([],):
        err = _refused(script.main, [str(ROOT / f"configs/train/{config}.yaml"), f"--output_dir={tmp_path}",
                                     override, *dry_run], capsys)
        assert message in err
    assert trained == [] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("script_name, config, model", [("state_capacity", "state-capacity", "d_state16"),
                                                        ("collapse", "collapse", "slow_decay")])
@pytest.mark.parametrize("override, message", [
    ("--run.train.max_stpes=3", "run.train.max_stpes: unknown field; did you mean run.train.max_steps? (the sweep "
                                "sets it for each run, from tokens_per_run / batch_tokens)"),
    ("--run.optim.lr=-1", "run.optim.lr: must be > 0, got -1.0"),
    ("--train_lengths=[1,64]", "train_lengths: at L=1 (each run's data.seq_len): must be an integer >= 2, got 1"),
    ("--models.{model}=3", "models.{model}: 3 matches none of"),
], ids=["run-typo", "run-value", "train_lengths", "models"])
def test_a_refused_run_config_names_the_field_as_the_sweep_spells_it(tmp_path, capsys, script_name, config, model,
                                                                     override, message):
    """A run config zoo.train refused was named by zoo.train's own fields: --run.train.max_stpes=3 was answered
    'train.max_stpes: unknown field; did you mean train.max_steps?', neither the override typed nor one the sweep
    takes, and a field the sweep fills in was named as a run field ('data.seq_len: must be an integer >= 2' for
    train_lengths [1, 64], 'model: ...' for a bad models entry). A run field is named run.<field> (its suggestion
    too), one the sweep fills in by the sweep key it came from."""
    script = load_script(f"scripts/{script_name}.py")
    capacity = script._state_capacity() if script_name == "collapse" else script
    override, message = override.format(model=model), message.format(model=model)
    with pytest.raises(ValueError, match=re.escape(message)):
        capacity.load_sweep(ROOT / f"configs/train/{config}.yaml", [override[2:]])
    err = _refused(script.main, [str(ROOT / f"configs/train/{config}.yaml"), f"--output_dir={tmp_path}", override,
                                 "--dry-run"], capsys)
    assert message in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("script_name, config", [("state_capacity", "state-capacity"), ("collapse", "collapse")])
@pytest.mark.parametrize("override, message", [
    ("--run=null", "run: expected a mapping of run config sections, got None"),
    ("--run.train=3", "run.train: expected a mapping of fields, got 3"),
    ("--run.data=null", "run.data: expected a mapping of fields, got None"),
], ids=["run", "train", "data"])
def test_a_run_section_that_is_not_a_mapping_is_refused_by_name(tmp_path, capsys, script_name, config, override,
                                                                 message):
    """The sweep writes into run and its data, train and schedule sections: run: null or a section given another
    value (--run.train=3) ended in a TypeError or AttributeError traceback, not a refusal naming the section."""
    script = load_script(f"scripts/{script_name}.py")
    capacity = script._state_capacity() if script_name == "collapse" else script
    with pytest.raises(ValueError, match=re.escape(message)):
        capacity.load_sweep(ROOT / f"configs/train/{config}.yaml", [override[2:]])
    err = _refused(script.main, [str(ROOT / f"configs/train/{config}.yaml"), f"--output_dir={tmp_path}", override,
                                 "--dry-run"], capsys)
    assert message in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("script_name, config, only", [("state_capacity", "state-capacity", "d_state64"),
                                                       ("collapse", "collapse", "slow_decay")])
def test_dry_run_lists_only_the_runs_of_only(capsys, script_name, config, only):
    """--dry-run ("list the runs") with --only listed every model's runs and state size, those --only skips too, as
    though they would train."""
    script = load_script(f"scripts/{script_name}.py")
    assert script.main([str(ROOT / f"configs/train/{config}.yaml"), "--only", only, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [line for line in lines if " steps of " in line]
    assert runs and all(line.startswith(f"{only}-L") for line in runs), lines
    sizes = [line for line in lines if "M floats; " in line]
    assert sizes and all(line.startswith(f"{only}: S = ") for line in sizes), lines


@pytest.mark.parametrize("script_name, config, flags, message", [
    ("collapse", "collapse", ["--report-only", "--only", "slow_decay"], "--only: --report-only trains nothing"),
    ("collapse", "collapse", ["--report-only", "--dry-run"], "--dry-run: --report-only trains nothing"),
    ("state_capacity", "state-capacity", ["--fit-only", "--dry-run"], "--dry-run lists the runs to train, and --fit"),
], ids=["report-only-only", "report-only-dry-run", "fit-only-dry-run"])
def test_flags_the_other_flag_would_ignore_are_refused(tmp_path, capsys, monkeypatch, script_name, config, flags,
                                                       message):
    """collapse.py --report-only took --only (reporting every saved model) and --dry-run (listing the runs instead of
    the report), and state_capacity.py --dry-run took --fit-only, each ignoring one of them without a word."""
    script = load_script(f"scripts/{script_name}.py")
    capacity = script._state_capacity() if script_name == "collapse" else script
    trained = []
    monkeypatch.setattr(capacity, "train_run", lambda run: trained.append(run["name"]))
    err = _refused(script.main, [str(ROOT / f"configs/train/{config}.yaml"), f"--output_dir={tmp_path}", *flags],
                   capsys)
    assert message in err and trained == [] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("script_name, config, message", [
    ("train_synthetic", "induction", "output_dir: empty; name the folder of the runs"),
    ("state_capacity", "state-capacity", "output_dir: expected the name of the folder of the runs, got ''"),
    ("collapse", "collapse", "output_dir: expected the name of the folder of the runs, got ''"),
])
def test_an_empty_output_dir_is_refused_not_taken_as_the_working_directory(tmp_path, capsys, monkeypatch,
                                                                           script_name, config, message):
    # `--output_dir=$OUT` with OUT unset put every run's folder into the working directory, as zoo train refuses to
    monkeypatch.chdir(tmp_path)
    script = load_script(f"scripts/{script_name}.py")
    err = _refused(script.main, [str(ROOT / f"configs/train/{config}.yaml"), "--output_dir=", "--dry-run"], capsys)
    assert message in err
    assert not any(tmp_path.iterdir())


def test_state_capacity_norm_calibration_factor_is_the_one_given():
    script = load_script("scripts/state_capacity.py")
    assert script.norm_calibration_factor("norm-calibrated:factor=2") == 2.0
    assert script.norm_calibration_factor("norm-calibrated: factor = 0.5") == 0.5
    assert script.norm_calibration_factor("norm-calibrated") == 1.0
    assert script.norm_calibration_factor("window:r=64") is None
    sweep = script.load_sweep(ROOT / "configs/train/collapse.yaml")
    assert [script.norm_calibration_factor(s) for s in sweep["eval"]["mitigations"]].count(1.0) == 1


@pytest.mark.parametrize("overrides, message", [
    (["--eval.max_len=2048"], "eval.max_len: 2048 ends the evaluation before a bin in [L, 2L) starts for "
                              "train_lengths [2048]"),
    (["--eval.max_len=128", "--train_lengths=[64,96]", "--batch_tokens=32256"],
     "train_lengths [96] (the reference of the collapse verdict), so collapse there cannot be judged and no model gets "
     "a capacity length; give eval.max_len >= 129"),
    (["--eval.bins_per_octave=0.5"], "eval.bins_per_octave: at 0.5 the bins skip [L, 2L) for train_lengths [128, 512,"),
], ids=["max_len-is-L", "max_len-past-L-before-its-bin", "coarse-bins"])
def test_state_capacity_sweep_that_cannot_judge_a_length_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                                                    overrides, message):
    """An evaluation that ends before a bin in [L, 2L) starts (eval.max_len <= the longest training length) judges no
    collapse there, so no model got a capacity length and there was no fit, which showed only after every run had
    trained: refused at load, in --dry-run too. A max_len one past the needed bin judges it."""
    script = load_script("scripts/state_capacity.py")
    trained = []
    monkeypatch.setattr(script, "train_run", lambda run: trained.append(run["name"]))
    config = str(ROOT / "configs/train/state-capacity.yaml")
    for dry_run in (["--dry-run"], []):
        err = _refused(script.main, [config, f"--output_dir={tmp_path}", *overrides, *dry_run], capsys)
        assert message in err
    assert trained == [] and not any(tmp_path.iterdir())
    script.load_sweep(config, ["eval.max_len=2049"])
    script.load_sweep(config, ["eval.max_len=129", "train_lengths=[64,96]", "batch_tokens=32256"])


def test_train_synthetic_sweep_override_replaces_one_dotted_key(capsys):
    # mqar-sweep.yaml's own example: `--sweep.optim.lr=[1.0e-3]` arrives nested ({optim: {lr: [...]}})
    script = load_script("scripts/train_synthetic.py")
    recipe = script.load_recipe(ROOT / "configs/train/mqar-sweep.yaml", ["sweep.optim.lr=[1.0e-3]"])
    assert recipe["sweep"] == {"model.d_model": [64, 128, 256, 512], "optim.lr": [1.0e-3]}
    script.main([str(ROOT / "configs/train/mqar-sweep.yaml"), "--only", "mamba2", "--sweep.optim.lr=[1.0e-3]",
                 "--dry-run"])
    assert capsys.readouterr().out.count("-lr=0.001:") == 4


def test_train_synthetic_mqar_sweep_evaluates_its_count_grid(tmp_path):
    """mqar-sweep.yaml trains with data.task_kwargs.n_kv and tests an eval.n_kv grid: the grid's evaluation used
    to get n_kv twice (TypeError after the first run had trained). Shrunk to two steps of a small model."""
    from accelerate import Accelerator

    script = load_script("scripts/train_synthetic.py")
    run = tiny_mqar_run(script, tmp_path)
    assert run.section.data.task_kwargs["n_kv"] == 16
    result = script.train_and_evaluate(run, Accelerator(cpu=True))
    assert [(r["seq_len"], r["n_kv"]) for r in result["rows"]] == [(64, 4), (64, 8), (128, 4), (128, 8)]
    assert [r["n_answers"] for r in result["rows"]] == [16, 32, 16, 32]
    # without a grid the evaluation keeps the training count, and the rows say so
    run.eval.n_kv = None
    run.eval.seq_lens = [128]
    result = script.train_and_evaluate(run, Accelerator(cpu=True))
    assert [(r["seq_len"], r["n_kv"], r["n_answers"]) for r in result["rows"]] == [(128, 16, 64)]


def tiny_mqar_run(script, tmp_path, overrides=()):
    """mqar-sweep.yaml's mamba2 run, shrunk to two steps of a small model and a grid of four cells."""
    recipe = script.load_recipe(ROOT / "configs/train/mqar-sweep.yaml", [
        f"output_dir={tmp_path}", "sweep={}", "train.max_steps=2", "train.micro_batch_size=4",
        "schedule.warmup_steps=0", "data.n_eval=4", "data.seq_len=64", "data.task_kwargs.vocab_size=64",
        "eval.seq_lens=[64, 128]", "eval.n_kv=[4, 8]", "eval.n_samples=4", "eval.batch_size=4",
        "eval.plot_seq_len=64", "eval.plot_count=4", "train.progress_bar=false", *overrides])
    for model in recipe["models"].values():
        model["vocab_size"] = 64
    return script.expand_runs(recipe, only=["mamba2"])[0]


def test_train_synthetic_evaluation_stopped_in_a_cell_keeps_its_finished_batches(tmp_path, monkeypatch, capsys):
    """An evaluation stopped in a cell (Ctrl-C, SIGTERM) kept only the cells before it: the cell's finished batches
    (an hour of them at induction.yaml's 2^20-token rows) were lost. They are saved with the cells now, and the rerun
    evaluates only the cell's other rows, to the result of an uninterrupted run."""
    from accelerate import Accelerator

    import zoo.eval.synthetic as synthetic

    script = load_script("scripts/train_synthetic.py")
    batches = ["eval.batch_size=2"]  # two batches of the four rows of each cell
    whole = script.train_and_evaluate(tiny_mqar_run(script, tmp_path / "whole", batches), Accelerator(cpu=True))
    run = tiny_mqar_run(script, tmp_path / "out", batches)
    real, calls, stop = synthetic.predict_answers, [], [5]

    def predict(model, input_ids, *args, **kwargs):  # Ctrl-C at the call after stop[0]
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append(input_ids.shape[1])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    with pytest.raises(KeyboardInterrupt):  # the two 64-token cells, then the first batch of the third
        script.train_and_evaluate(run, Accelerator(cpu=True))
    saved = json.loads((run.output_dir / "result.partial.json").read_text())
    assert len(saved["rows"]) == 2 and (saved["started"]["seq_len"], saved["started"]["next"]) == (128, 2)
    stop[0], calls[:] = None, []
    capsys.readouterr()
    result = script.train_and_evaluate(run, Accelerator(cpu=True))
    assert "the 2 cells in" in capsys.readouterr().out and calls == [128, 128, 128]
    assert result["rows"] == whole["rows"] and not (run.output_dir / "result.partial.json").exists()


def interrupt_at_length(monkeypatch, length: int):
    """zoo.eval.synthetic.predict_answers raising KeyboardInterrupt (Ctrl-C) at its first rows of `length` tokens or
    more; returns (the row lengths it answered, [the stop length]: set it to None to let every call through)."""
    import zoo.eval.synthetic as synthetic

    real, lengths, stop = synthetic.predict_answers, [], [length]

    def predict(model, input_ids, *args, **kwargs):
        if stop[0] is not None and input_ids.shape[1] >= stop[0]:
            raise KeyboardInterrupt
        lengths.append(input_ids.shape[1])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    return lengths, stop


def test_train_synthetic_resumes_an_evaluation_partial_keyed_by_the_whole_settings(tmp_path, monkeypatch, capsys):
    """result.partial.json keyed the finished cells by the run's whole settings (logging and the plot cell included)
    before the key became the reusable ones (_result_stamp): an evaluation interrupted under that key was taken for
    another's on the rerun, and its finished cells evaluated again. Such a partial is resumed."""
    from accelerate import Accelerator

    script = load_script("scripts/train_synthetic.py")
    run = tiny_mqar_run(script, tmp_path)
    lengths, stop = interrupt_at_length(monkeypatch, 128)
    with pytest.raises(KeyboardInterrupt):
        script.train_and_evaluate(run, Accelerator(cpu=True))
    path = run.output_dir / "result.partial.json"
    saved = json.loads(path.read_text())
    saved["key"]["settings"] = json.loads(json.dumps(script._run_settings(run)[1]))  # the earlier version's key
    assert "plot_count" in saved["key"]["settings"]["eval"]
    path.write_text(json.dumps(saved))
    stop[0], lengths[:] = None, []
    capsys.readouterr()
    script.train_and_evaluate(run, Accelerator(cpu=True))
    assert "resuming the evaluation; the 2 cells" in capsys.readouterr().out and lengths == [128, 128]


@pytest.mark.parametrize("file", ["trained.json", "result.json"])
def test_train_synthetic_interrupted_while_writing_its_stamp_reruns(tmp_path, monkeypatch, capsys, file):
    """trained.json (the saved model's stamp) and result.json were written in place: a Ctrl-C mid-write left them cut
    short, and every rerun stopped at reading them (JSONDecodeError) until the file was found and deleted. They are
    written beside and renamed over now: the rerun trains (from its checkpoints) or evaluates again and completes."""
    from accelerate import Accelerator

    script = load_script("scripts/train_synthetic.py")
    run = tiny_mqar_run(script, tmp_path)
    real = Path.write_text

    def interrupted(self, text, *args, **kwargs):  # half of the file reaches the disk, then Ctrl-C
        if self.name.startswith(file):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.train_and_evaluate(run, Accelerator(cpu=True))
    monkeypatch.setattr(Path, "write_text", real)
    result = script.train_and_evaluate(run, Accelerator(cpu=True))
    assert [(r["seq_len"], r["n_kv"]) for r in result["rows"]] == [(64, 4), (64, 8), (128, 4), (128, 8)]
    assert json.loads((run.output_dir / "result.json").read_text())["rows"] == result["rows"]
    assert json.loads((run.output_dir / "trained.json").read_text())["log"] == result["log"]
    assert not list(run.output_dir.glob("*.tmp"))


def test_train_synthetic_interrupted_evaluation_keeps_its_finished_cells(tmp_path, monkeypatch, capsys):
    """A run's evaluation grid (induction.yaml's runs to 2^20 tokens, hours) wrote result.json only once every cell was
    done: a Ctrl-C at its longest rows lost every cell, and the rerun evaluated them all again. Each finished cell is
    saved now (result.partial.json) and the rerun evaluates only the others, to the result of an uninterrupted run; the
    cells of a model trained before (trained.json gone, the model retrained) are not kept."""
    from accelerate import Accelerator

    script = load_script("scripts/train_synthetic.py")
    whole = script.train_and_evaluate(tiny_mqar_run(script, tmp_path / "whole"), Accelerator(cpu=True))
    run = tiny_mqar_run(script, tmp_path / "out")
    lengths, stop = interrupt_at_length(monkeypatch, 128)
    with pytest.raises(KeyboardInterrupt):
        script.train_and_evaluate(run, Accelerator(cpu=True))
    saved = json.loads((run.output_dir / "result.partial.json").read_text())["rows"]
    assert [(r["seq_len"], r["n_kv"]) for r in saved] == [(64, 4), (64, 8)] and lengths == [64, 64]
    stop[0], lengths[:] = None, []
    capsys.readouterr()
    result = script.train_and_evaluate(run, Accelerator(cpu=True))
    assert "resuming the evaluation; the 2 cells" in capsys.readouterr().out and lengths == [128, 128]
    assert result["rows"] == whole["rows"] and not (run.output_dir / "result.partial.json").exists()

    (run.output_dir / "result.json").unlink()
    stop[0], lengths[:] = 128, []
    with pytest.raises(KeyboardInterrupt):
        script.train_and_evaluate(run, Accelerator(cpu=True))
    (run.output_dir / "trained.json").unlink()  # the model is trained again: its cells are evaluated again
    stop[0], lengths[:] = None, []
    script.train_and_evaluate(run, Accelerator(cpu=True))
    assert lengths == [64, 64, 128, 128]


@pytest.mark.parametrize("script_name", ["state_capacity", "collapse"])
def test_sweep_model_without_recurrent_layers_is_refused_before_training(tmp_path, capsys, script_name):
    """An attention-only model in a sweep with eval.mitigations passed --dry-run (S = 0) and, once trained, the first
    spec raised a traceback from apply_mitigation (that evaluation lost); now one line naming the model."""
    script = load_script(f"scripts/{script_name}.py")
    attention = ROOT / "configs/models/transformerpp-tiny.yaml"
    err = _refused(script.main, [str(ROOT / "configs/train/collapse.yaml"), f"--models.attn={attention}",
                                 f"--output_dir={tmp_path}", "--dry-run"], capsys)
    assert "models.attn: has no recurrent layer" in err and "eval.mitigations" in err
    # without mitigations it is an unmitigated baseline, as before
    assert script.main([str(ROOT / "configs/train/collapse.yaml"), f"--models.attn={attention}",
                        "--eval.mitigations=[]", f"--output_dir={tmp_path}", "--dry-run"]) == 0
    # a hybrid has a state and is taken
    hybrid = ROOT / "configs/models/jamba-tiny.yaml"
    assert script.main([str(ROOT / "configs/train/collapse.yaml"), f"--models.attn={hybrid}",
                        f"--output_dir={tmp_path}", "--dry-run"]) == 0


def test_train_synthetic_as_lone_processes_of_a_multi_process_launch_is_refused(tmp_path, capsys, monkeypatch):
    # a launch accelerate cannot join (no GPU, ACCELERATE_USE_CPU unset) runs each process alone: each trained and
    # evaluated every run and wrote the same model/, result.json and summary files
    script = load_script("scripts/train_synthetic.py")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _refused(script.main, [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path / 'out'}",
                                 "--curriculum=[]", "--train.max_steps=2", "--schedule.warmup_steps=0",
                                 "--eval.seq_lens=[64]", "--eval.n_samples=8", "--data.n_eval=8", "--only", "mamba"],
                   capsys)
    assert "processes: launched as 2 processes" in err and "ACCELERATE_USE_CPU=1" in err
    assert not (tmp_path / "out").exists()


def test_train_synthetic_after_a_gpu_run_in_the_same_process_takes_accelerate_use_cpu(tmp_path, capsys, monkeypatch):
    # it reset accelerate's AcceleratorState but kept the PartialState, whose device an earlier run fixed (zoo train's
    # reset_accelerate_state forgets both): ACCELERATE_USE_CPU=1 after a run on the GPU ran on the GPU. (On this CPU
    # machine the earlier run's GPU device is written into the PartialState; fp16, which has no autocast on the CPU,
    # is refused naming the device, before anything trains.)
    from accelerate.state import AcceleratorState, PartialState

    script = load_script("scripts/train_synthetic.py")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    try:
        PartialState()
        PartialState._shared_state["device"] = torch.device("cuda", 0)
        err = _refused(script.main, [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path}",
                                     "--curriculum=[]", "--train.max_steps=2", "--schedule.warmup_steps=0",
                                     "--train.precision=fp16", "--only", "mamba"], capsys)
        assert "train.precision: fp16 has no autocast on cpu" in err, err
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains under autocast on a GPU")
def test_train_synthetic_refuses_fp16_on_cpu_and_a_precision_the_launch_contradicts(tmp_path, capsys, monkeypatch):
    # its Accelerator took finetune's own mapping: fp16 on CPU trained in fp32 under the name fp16, and the launch's
    # --mixed_precision was overridden
    script = load_script("scripts/train_synthetic.py")
    argv = [str(ROOT / "configs/train/induction-cpu.yaml"), f"--output_dir={tmp_path / 'out'}", "--curriculum=[]",
            "--train.max_steps=2", "--schedule.warmup_steps=0", "--eval.seq_lens=[64]", "--eval.n_samples=8",
            "--data.n_eval=8", "--only", "mamba"]
    err = _refused(script.main, [*argv, "--train.precision=fp16"], capsys)
    assert "train.precision: fp16 has no autocast on cpu" in err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    err = _refused(script.main, [*argv, "--train.precision=fp32"], capsys)
    assert "train.precision: fp32, but the launch asks for bf16" in err
    assert not (tmp_path / "out").exists()


def test_train_synthetic_under_fsdp_is_refused_naming_the_ddp_config(tmp_path):
    # `accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/train_synthetic.py`: the main process alone
    # saved model/ from FSDP-sharded weights, which takes every process, so the run waited forever after training
    proc = launch_fsdp_on_cpu(tmp_path, "scripts/train_synthetic.py", str(ROOT / "configs/train/induction-cpu.yaml"),
                              f"--output_dir={tmp_path / 'out'}", "--curriculum=[]", "--train.max_steps=2",
                              "--schedule.warmup_steps=0", "--eval.seq_lens=[64]", "--eval.n_samples=8",
                              "--data.n_eval=8", "--only", "mamba", timeout=120)
    assert proc.returncode != 0
    assert "scripts/train_synthetic.py does not run under FSDP" in proc.stderr, proc.stderr[-3000:]
    assert "configs/accelerate/ddp.yaml" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_synthetic_without_data_seq_len_trains_and_reports_at_the_tasks_length(tmp_path, capsys):
    """data.seq_len None trains at the task's own length (mqar: 256): eval.seq_lens defaulted to [None], and the
    evaluation after training failed with 'unsupported operand type(s) for +: int and NoneType'; the summary's plot
    cell (plot_seq_len's default, the training length) was None, so the best learning rate was always the first."""
    import json

    import yaml

    script = load_script("scripts/train_synthetic.py")
    recipe = {"output_dir": str(tmp_path / "out"),
              "models": {"gla": {"vocab_size": 64, "d_model": 32, "layers": "G", "ffn": "none",
                                 "mixers": {"G": {"type": "gla", "n_heads": 2, "chunk_size": 16}}}},
              "sweep": {"optim.lr": [1.0e-4, 1.0e-2]},
              "data": {"task": "mqar", "task_kwargs": {"n_kv": 4, "vocab_size": 64}, "n_eval": 4},
              "train": {"max_steps": 2, "micro_batch_size": 2, "precision": "fp32", "eval_batch_size": 4,
                        "progress_bar": False},
              "schedule": {"warmup_steps": 0}, "eval": {"n_samples": 4, "batch_size": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # a curriculum phase longer than the task's length is refused as one longer than data.seq_len is
    err = _refused(script.main, [str(path), "--curriculum=[{seq_len: 512, max_steps: 2}]", "--dry-run"], capsys)
    assert "curriculum[0].seq_len: 512 exceeds data.seq_len 256" in err
    assert script.main([str(path)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["gla-lr=0.0001", "gla-lr=0.01"]
    assert all(isinstance(r["plot_accuracy"], float) and isinstance(r["acc@256"], float) for r in summary["runs"])


def test_train_synthetic_picks_the_best_run_over_the_grid_when_the_plot_cell_was_not_evaluated():
    """The sweep's best run is the one most accurate at the plot cell (training length by default); where that cell
    is not in the evaluated grid, every run's accuracy there read as None and the first run of the sweep was taken
    without a word. It is now picked over the whole grid, and the row says which."""
    from types import SimpleNamespace

    script = load_script("scripts/train_synthetic.py")

    def run(name, lr):
        data = SimpleNamespace(seq_len=256, task="mqar", task_kwargs={"n_kv": 4})
        return SimpleNamespace(name=name, model_name="gla", point={"optim.lr": lr}, section=SimpleNamespace(data=data),
                               eval=SimpleNamespace(plot_seq_len=None, plot_count=None, seq_lens=[64, 128]))

    def result(correct):
        return {"parameters": 1, "state_floats": 1, "rows": [
            {"seq_len": 64, "n_kv": 4, "n_correct": correct, "n_answers": 10},
            {"seq_len": 128, "n_kv": 4, "n_correct": correct, "n_answers": 10}]}

    table, best = script.summarize({}, [run("a", 1e-4), run("b", 1e-2)], [result(1), result(9)])
    assert [r["run"] for r in best] == ["b"] and best[0]["selected_by"] == "grid"
    assert [r["plot_accuracy"] for r in table] == [None, None]


def test_train_synthetic_best_run_of_a_group_missing_some_learning_rates_names_them():
    """The best run of a model and grid point is picked over select_over (the learning rate); a group of some of the
    sweep's learning rates only (--only keeps the saved runs of the other models, which may lack some) was given its
    best learning rate as if the sweep were complete. Its best row now names the learning rates it lacks."""
    from types import SimpleNamespace

    script = load_script("scripts/train_synthetic.py")

    def run(name, model, lr):
        data = SimpleNamespace(seq_len=64, task="mqar", task_kwargs={"n_kv": 4})
        return SimpleNamespace(name=name, model_name=model, point={"optim.lr": lr}, section=SimpleNamespace(data=data),
                               eval=SimpleNamespace(plot_seq_len=None, plot_count=None, seq_lens=[64]))

    def result(correct):
        return {"parameters": 1, "state_floats": 1,
                "rows": [{"seq_len": 64, "n_kv": 4, "n_correct": correct, "n_answers": 10}]}

    data = {"sweep": {"optim.lr": ["1e-3", 0.01, 0.1]}}  # (a string to YAML is the number, as expand_runs reads it)
    runs = [run("a-lr=0.001", "a", 1e-3), run("a-lr=0.01", "a", 0.01), run("a-lr=0.1", "a", 0.1),
            run("b-lr=0.01", "b", 0.01)]
    _, best = script.summarize(data, runs, [result(1), result(5), result(3), result(9)])
    assert [(r["run"], r.get("missing")) for r in best] == [("a-lr=0.01", None), ("b-lr=0.01", "lr=0.001, lr=0.1")]
    _, best = script.summarize({}, runs[3:], [result(9)])  # no sweep: nothing is missing
    assert "missing" not in best[0]


def test_train_synthetic_summary_says_a_model_with_saved_runs_of_some_learning_rates_is_partial(tmp_path, capsys):
    """--only kept the saved runs of the other models: one whose earlier call ran some of the sweep's learning rates
    had its best learning rate in summary.md as if it had them all. The summary now names the runs it lacks."""
    import yaml

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["models"]["other"] = data["models"]["mamba"]
    recipe.write_text(yaml.safe_dump(data))
    argv = [str(recipe), "--curriculum=[]", "--train.max_steps=1", "--schedule.warmup_steps=0"]
    assert script.main([*argv, "--sweep.optim.lr=[0.001]", "--only", "mamba"]) == 0
    assert script.main([*argv, "--sweep.optim.lr=[0.001, 0.01]", "--only", "other"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {r["model"]: r.get("missing") for r in summary["best"]} == {"mamba": "lr=0.01", "other": None}
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "Partial: the best run of mamba is over part of the sweep's optim.lr only" in text
    assert "--only mamba runs them" in text and "| missing |" in text


def test_train_synthetic_plot_cell_is_the_trained_count_when_task_kwargs_leave_it_to_the_task():
    """plot_count defaults to the count the model trained with; a recipe that left mqar's n_kv to the task (16) had no
    count there, so the plot cell (and the best learning rate) pooled every eval.n_kv cell of the plotted length."""
    from types import SimpleNamespace

    script = load_script("scripts/train_synthetic.py")

    def run(name, lr, task_kwargs):
        data = SimpleNamespace(seq_len=256, task="mqar", task_kwargs=task_kwargs)
        return SimpleNamespace(name=name, model_name="gla", point={"optim.lr": lr}, section=SimpleNamespace(data=data),
                               eval=SimpleNamespace(plot_seq_len=None, plot_count=None, seq_lens=[256]))

    def result(right_at_4, right_at_16):
        return {"parameters": 1, "state_floats": 1, "rows": [
            {"seq_len": 256, "n_kv": 4, "n_correct": right_at_4, "n_answers": 40},
            {"seq_len": 256, "n_kv": 16, "n_correct": right_at_16, "n_answers": 160}]}

    # run a recalls the trained 16 pairs better, run b only the easy 4 (and more answers in all at the length)
    results = [result(0, 80), result(40, 60)]
    for task_kwargs in ({"vocab_size": 64}, {"vocab_size": 64, "n_kv": 16}):
        table, best = script.summarize({}, [run("a", 1e-4, task_kwargs), run("b", 1e-2, task_kwargs)], results)
        assert [r["plot_accuracy"] for r in table] == [0.5, 0.375], task_kwargs
        assert [r["run"] for r in best] == ["a"] and best[0]["selected_by"] == "plot cell"


def test_train_synthetic_acc_at_a_length_reads_the_plot_count_not_every_count_the_length_holds():
    """acc@T pooled every count T could hold: mqar-sweep's T=64 took n_kv 4..16, its T=512 4..64. A model perfect up
    to 16 pairs and at 20% beyond, whatever the length, read 1.0 at 64 and 0.38 at 512, a fall with length that the
    model does not have. acc@T is now the plot count's cell (the trained count by default)."""
    from types import SimpleNamespace

    script = load_script("scripts/train_synthetic.py")
    data = SimpleNamespace(seq_len=256, task="mqar", task_kwargs={"n_kv": 16})
    run = SimpleNamespace(name="a", model_name="gla", point={}, section=SimpleNamespace(data=data),
                          eval=SimpleNamespace(plot_seq_len=None, plot_count=None, seq_lens=[64, 512]))
    rows = [{"seq_len": 64, "n_kv": n, "n_correct": n, "n_answers": n} for n in (4, 8, 16)]
    rows += [{"seq_len": 512, "n_kv": n, "n_correct": n if n <= 16 else n // 5, "n_answers": n} for n in (4, 16, 64)]
    table, _ = script.summarize({}, [run], [{"parameters": 1, "state_floats": 1, "rows": rows}])
    assert table[0]["acc@64"] == 1.0 and table[0]["acc@512"] == 1.0
    run.eval.plot_count = 64  # a length that cannot hold the count has no cell there
    table, _ = script.summarize({}, [run], [{"parameters": 1, "state_floats": 1, "rows": rows}])
    assert table[0]["acc@64"] == "-" and table[0]["acc@512"] == 12 / 64


def _tiny_synthetic_recipe(tmp_path, precision: str = "fp32") -> Path:
    import yaml

    recipe = {"output_dir": str(tmp_path / "out"),
              "models": {"mamba": {"vocab_size": 16, "d_model": 16, "layers": "M", "ffn": "none",
                                   "mixers": {"M": {"type": "mamba", "d_state": 4, "d_conv": 4, "expand": 2}}}},
              "curriculum": [{"seq_len": 16, "max_steps": 2, "micro_batch_size": 4}],
              "data": {"task": "induction_heads", "seq_len": 32, "task_kwargs": {"vocab_size": 16}, "n_eval": 4},
              "train": {"max_steps": 3, "micro_batch_size": 4, "precision": precision, "eval_batch_size": 4,
                        "log_every": 1, "progress_bar": False, "checkpoint_every": 0},
              "schedule": {"warmup_steps": 1},
              "eval": {"seq_lens": [32], "n_samples": 4, "batch_size": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_synthetic_stopped_run_continues_to_the_uninterrupted_model(tmp_path, monkeypatch, capsys):
    """A run stopped by Ctrl-C or SIGTERM lost its training (run_training had no checkpoint folder): the rerun started
    over. Now each phase saves on interruption and the same command continues, to the weights of an uninterrupted
    run, and the checkpoints go once the model is saved."""
    from safetensors.torch import load_file

    import zoo.finetune as ft

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # (bitwise: a GPU's Mamba backward sums with atomics)
    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    assert script.main([str(recipe), f"--output_dir={tmp_path / 'whole'}"]) == 0
    real = ft.lr_at

    def stop_in_the_main_phase(step, section):
        if step == 1 and section.data.seq_len == 32:
            raise KeyboardInterrupt
        return real(step, section)

    monkeypatch.setattr(ft, "lr_at", stop_in_the_main_phase)
    assert script.main([str(recipe), f"--output_dir={tmp_path / 'cut'}"]) == 130
    assert "stopped after step 1" in capsys.readouterr().err
    run_dir = tmp_path / "cut" / "mamba"
    assert torch.load(run_dir / "checkpoints" / "main" / "state.pt", weights_only=True)["step"] == 1
    assert not (run_dir / "model").exists()
    monkeypatch.setattr(ft, "lr_at", real)
    assert script.main([str(recipe), f"--output_dir={tmp_path / 'cut'}"]) == 0
    assert "continuing from step 1 of 3" in capsys.readouterr().out
    a, b = (load_file(tmp_path / d / "mamba" / "model" / "model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (run_dir / "checkpoints").exists()
    whole, cut = (json.loads((tmp_path / d / "mamba" / "trained.json").read_text())["log"] for d in ("whole", "cut"))
    assert whole == cut


def test_train_synthetic_stopped_between_saving_a_retrained_model_and_its_stamp_does_not_reuse_it_as_the_earlier(
        tmp_path, monkeypatch, capsys):
    """A run retrained under other settings saved its model over the earlier one's and then wrote trained.json: a stop
    between the two left the earlier settings' stamp and result.json beside the new weights, and a rerun of the earlier
    settings reused them as its own ('reusing result.json', model/ holding the other run's weights; with another
    evaluation grid, 'reusing the model trained in ...' evaluated them). Stamp and result go before the weights are
    written now, so that rerun trains its model again, to the weights it had."""
    from safetensors.torch import load_file

    import zoo.eval.common as common

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    script = load_script("scripts/train_synthetic.py")
    argv = [str(_tiny_synthetic_recipe(tmp_path)), f"--output_dir={tmp_path / 'out'}"]
    weights = tmp_path / "out" / "mamba" / "model" / "model.safetensors"
    assert script.main(argv) == 0
    first = load_file(weights)
    real = common.write_text_atomically

    def stopped_before_the_stamp(text, path):
        if Path(path).name == "trained.json":
            raise KeyboardInterrupt  # the new weights are saved, their stamp not yet
        return real(text, path)

    monkeypatch.setattr(common, "write_text_atomically", stopped_before_the_stamp)
    assert script.main([*argv, "--optim.lr=0.01"]) == 130
    assert not all(torch.equal(w, first[k]) for k, w in load_file(weights).items())  # the retrained weights
    monkeypatch.setattr(common, "write_text_atomically", real)
    capsys.readouterr()
    assert script.main(argv) == 0
    assert "reusing" not in capsys.readouterr().out
    again = load_file(weights)
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_train_synthetic_stopped_in_training_says_once_that_the_same_command_continues(tmp_path, monkeypatch, capsys):
    """A Ctrl-C in a training said it twice: the stopped phase's message ends in 'the same command continues from
    there', and the 'interrupted' line added '; the same command continues' after it."""
    import zoo.finetune as ft

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    real = ft.lr_at

    def stop(step, section):
        if step == 1:
            raise KeyboardInterrupt
        return real(step, section)

    monkeypatch.setattr(ft, "lr_at", stop)
    assert script.main([str(recipe)]) == 130
    err = capsys.readouterr().err
    line = next(text for text in err.splitlines() if text.startswith("train_synthetic.py: interrupted"))
    assert "stopped after step 1" in line and line.count("the same command continues") == 1, line


def test_train_synthetic_stopped_by_sigterm_in_an_evaluation_says_so_and_keeps_its_model(tmp_path, monkeypatch,
                                                                                         capsys):
    """SIGTERM (a scheduler's, accelerate launch's) in a run's evaluation killed train_synthetic without a word (only
    the training handled it). It stops as Ctrl-C does now: one line, exit status 130, the handler before it back, the
    trained model kept; the same command evaluates it without training again."""
    import os
    import signal

    from helpers import sigterm_raises_terminated

    import zoo.eval.synthetic as synthetic

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    real = synthetic.predict_answers

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", sigterm)
    with sigterm_raises_terminated() as handler:
        assert script.main([str(recipe)]) == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    assert capsys.readouterr().err.endswith("train_synthetic.py: interrupted; the same command continues\n")
    run_dir = tmp_path / "out" / "mamba"
    assert (run_dir / "model").is_dir() and not (run_dir / "result.json").exists()
    monkeypatch.setattr(synthetic, "predict_answers", real)
    assert script.main([str(recipe)]) == 0
    assert (run_dir / "result.json").is_file()
    assert f"mamba: reusing the model trained in {run_dir / 'model'}" in capsys.readouterr().out


def test_train_synthetic_runs_of_different_precisions_are_refused_by_name(tmp_path, capsys):
    """One Accelerator serves every run of a call: a model_overrides precision other than the first run's trained
    at the first run's precision, silently. Now refused, naming each run's."""
    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    err = _refused(script.main, [str(recipe), "--models.other={vocab_size: 16, d_model: 16, layers: M, ffn: none}",
                                 "--model_overrides={other: {train.precision: fp16}}"], capsys)
    assert "share one precision" in err and "mamba no" in err and "other fp16" in err


def test_train_synthetic_phase_stamps_ignore_the_curriculums_logging_and_saving():
    """_phase_stamp dropped log_every / checkpoint_every / progress_bar from the settings' sections, but not from
    train_synthetic's curriculum (a list of phases): a rerun with another train.log_every or checkpoint_every (which
    every phase inherits) found every phase's checkpoint, the main one's too, of another stamp and started over."""
    from zoo.finetune import _phase_stamp

    def settings(log_every, checkpoint_every):
        train = {"max_steps": 3, "log_every": log_every, "checkpoint_every": checkpoint_every}
        return {"model": {"d_model": 16}, "section": {"train": dict(train)},
                "curriculum": [{"train": {**train, "max_steps": 2}}], "phase": "main"}

    assert _phase_stamp(settings(1, 0)) == _phase_stamp(settings(10, 5))
    changed = settings(1, 0)
    changed["curriculum"][0]["train"]["max_steps"] = 4  # what a phase trains still counts
    assert _phase_stamp(changed) != _phase_stamp(settings(1, 0))


def test_state_capacity_prints_no_negative_paper_capacity(tmp_path, capsys, monkeypatch):
    """The paper's line L* = 5.172·S − 4.469 (K tokens) extrapolated below its range gave negative capacities in
    --dry-run and summary.md (-4.30K tokens for d_state16); a state that small is said to be out of its reach, and a
    state the line reaches keeps its value."""
    script = load_script("scripts/state_capacity.py")
    monkeypatch.setattr(script, "plot_capacity", lambda *args: None)
    big = ["--models.d_state256.d_model=2048"]  # 4.2M floats: the line is positive there
    argv = [str(ROOT / "configs/train/state-capacity.yaml"), f"--output_dir={tmp_path}", *big]
    sweep = script.load_sweep(argv[0], [a[2:] for a in argv[1:]])
    sizes = {m: script.ssm_state_floats(c) / 1e6 for m, c in sweep["models"].items()}
    slope, intercept = script.PAPER_LINE
    assert slope * sizes["d_state16"] + intercept < 0 < slope * sizes["d_state256"] + intercept
    assert script.main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in printed[:3]:
        if line.startswith("d_state256:"):
            assert line.endswith(f"paper's capacity length {slope * sizes['d_state256'] + intercept:.2f}K")
        else:
            assert "paper's fit does not reach so small a state" in line and "K" not in line.split(";")[1], line
    (tmp_path / "evaluations.json").write_text("{}")  # --fit-only re-reads a sweep's output; none evaluated yet
    assert script.main([*argv, "--fit-only"]) == 0
    rows = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| d_state")]
    paper = {row.split("|")[1].strip(): row.split("|")[-2].strip() for row in rows}
    assert paper["d_state256"] == str(round((slope * sizes["d_state256"] + intercept) * script.K))
    assert all("does not reach" in paper[m] for m in ("d_state16", "d_state64")), paper


def test_state_capacity_evaluates_on_the_files_its_runs_held_out(tmp_path, monkeypatch):
    """The sweep's documents were built with zoo.eval.length's default data.holdout (0.01) whatever the recipe's
    run.data.holdout: with a smaller one the runs trained on most of those files, and the held-out files a larger one
    kept were not taken first. They are the recipe's held-out files now, as zoo compare's are."""
    import zoo.eval.length as length

    script = load_script("scripts/state_capacity.py")
    seen, real = [], length.corpus_documents

    def corpus_documents(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("holdout", 0.01))
        return real(*args, **kwargs)

    def train_run(run):
        out = Path(run["config"].output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "done.json").write_text(json.dumps({"model": str(out), "seconds": 1.0}))
        return out

    monkeypatch.setattr(length, "corpus_documents", corpus_documents)
    monkeypatch.setattr(length, "plot_length_curves", lambda *args: None)
    monkeypatch.setattr(script, "plot_capacity", lambda *args: None)
    monkeypatch.setattr(script, "train_run", train_run)
    monkeypatch.setattr(script, "evaluate_run", lambda run, model_dir, documents, ev: {"none": {"bins": []}})
    for holdout in (0.05, 0.002):
        seen.clear()
        assert script.main([str(ROOT / "configs/train/collapse.yaml"), "--only", "slow_decay", "--eval.n_docs=2",
                            "--eval.mitigations=[]", f"--run.data.holdout={holdout}",
                            f"--output_dir={tmp_path / str(holdout)}"]) == 0
        assert seen == [holdout]


@pytest.mark.parametrize("script_name, flag", [("state_capacity", "--fit-only"), ("collapse", "--report-only")])
def test_report_only_without_saved_evaluations_is_refused(tmp_path, capsys, script_name, flag):
    """--fit-only (state_capacity.py) and --report-only (collapse.py) re-read output_dir/evaluations.json; with none
    there (no run yet, or an output_dir mistyped) each wrote an empty summary into it and exited as if done."""
    script = load_script(f"scripts/{script_name}.py")
    config = "state-capacity" if script_name == "state_capacity" else "collapse"
    out = tmp_path / "nothing-here"
    err = _refused(script.main, [str(ROOT / f"configs/train/{config}.yaml"), flag, f"--output_dir={out}"], capsys)
    assert f"{flag}: no saved evaluations in {out}" in err
    assert not out.exists()


@pytest.mark.parametrize("script_name, config, override", [
    ("train_synthetic", "induction-cpu", "train.max_steps=200"),
    ("collapse", "collapse", "tokens_per_run=3145728"),
    ("state_capacity", "state-capacity", "eval.margin=0.05"),
])
def test_script_help_names_the_overrides_it_takes(capsys, script_name, config, override):
    """The configs' headers and the README run these scripts with --section.field=value overrides, which each takes
    (parse_known_args), but --help listed only config, --only and its flags: the overrides were nowhere in it."""
    script = load_script(f"scripts/{script_name}.py")
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Overrides: --section.field=value" in text and f"--{override}" in text
    loader = script.load_recipe if script_name == "train_synthetic" else \
        load_script("scripts/state_capacity.py").load_sweep
    assert loader(ROOT / f"configs/train/{config}.yaml", [override])  # the example given is one the script takes


@pytest.mark.parametrize("argv, message", [
    (["--fit-only"], "unrecognized argument '--fit-only'; overrides look like --key.sub=value (--report-only re-reads "
                     "the saved evaluations)"),
    (["stray"], "unrecognized argument 'stray'"),
    (["--models.default.layers=AA", "--models.default.mixers={A: {type: attention, n_heads: 2}}"],
     "models.default: has no recurrent layer"),
    # (the recipe's mamba2 models cap their own heads: group_size was ignored, and is refused by apply_mitigation,
    # which would fail only after the training)
    (["--eval.mitigations=['norm:threshold=1,group_size=16']"],
     "eval.mitigations: 'norm:threshold=1,group_size=16': group_size groups the channels of mamba layers into heads, "
     "but models.slow_decay has none (its mamba2 layers' heads are their own)"),
], ids=["fit-only", "stray", "stateless", "group-size-without-mamba"])
def test_collapse_refuses_bad_arguments_with_its_own_usage(tmp_path, capsys, monkeypatch, argv, message):
    """collapse.py handed what it did not know to state_capacity.main, whose parser printed state_capacity's usage line
    (--fit-only, no --report-only) under collapse.py's name; and --fit-only, which collapse.py's --help does not list,
    was taken (a state-capacity fit written beside the report). Its own parser refuses them now, before anything
    trains; its --help lists --dry-run, which it passes on."""
    collapse = load_script("scripts/collapse.py")
    capacity = collapse._state_capacity()
    trained = []
    monkeypatch.setattr(capacity, "train_run", lambda run: trained.append(run["name"]))
    monkeypatch.setattr(sys, "argv", ["collapse.py"])
    err = _refused(collapse.main, [str(ROOT / "configs/train/collapse.yaml"), f"--output_dir={tmp_path}", *argv],
                   capsys)
    usage = " ".join(err.split("collapse.py: error:")[0].split())
    assert usage.startswith("usage: collapse.py ") and "--report-only" in usage and "--fit-only" not in usage, err
    assert f"collapse.py: error: {message}" in " ".join(err.split()), err
    assert trained == [] and not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        collapse.main(["--help"])
    assert "--dry-run" in capsys.readouterr().out



def test_train_synthetic_rerun_with_other_logging_keeps_the_trained_and_evaluated_runs(tmp_path, capsys, monkeypatch):
    """trained.json and result.json were reused only when every training setting matched, logging included: a rerun
    with another train.log_every, progress_bar, checkpoint_every or eval_batch_size trained and evaluated every run
    again (the phases' checkpoints already ignored them)."""
    import zoo.finetune as ft

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    assert script.main([str(recipe)]) == 0
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(ft, "run_training", no_training)
    assert script.main([str(recipe), "--train.log_every=2", "--train.eval_batch_size=2"]) == 0
    assert "mamba: reusing" in capsys.readouterr().out
    (tmp_path / "out" / "mamba" / "result.json").unlink()  # the model is kept, its evaluation runs again
    assert script.main([str(recipe), "--train.log_every=3", "--train.checkpoint_every=5"]) == 0
    assert "reusing the model trained in" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="trained again"):  # what the model trains on still counts
        script.main([str(recipe), "--train.max_steps=4"])


@pytest.mark.parametrize("short", ["mamba", "other"])
def test_train_synthetic_summary_has_every_runs_lengths_when_a_model_has_its_own(tmp_path, capsys, short):
    """The summary's acc@T columns were those of the first run: a model_overrides eval.seq_lens of the first model
    dropped the other models' lengths from summary.md, and of a later model failed the plot with a KeyError after
    every run had trained."""
    import yaml

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["models"]["other"] = data["models"]["mamba"]
    data["eval"]["seq_lens"] = [32, 64]
    data["model_overrides"] = {short: {"eval.seq_lens": [32]}}
    recipe.write_text(yaml.safe_dump(data))
    argv = [str(recipe), "--curriculum=[]", "--train.max_steps=1", "--schedule.warmup_steps=0"]
    assert script.main(argv) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| run | params | state_floats | acc@32 | acc@64 |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {short} |"))
    assert row.endswith("| - |")  # a length the model was not evaluated at
    assert (tmp_path / "out" / "accuracy_vs_length.png").is_file()


def test_train_synthetic_length_plot_marks_every_training_length(tmp_path, monkeypatch):
    """accuracy_vs_length.png drew the first run's training length alone, labelled 'train length', also over runs
    that trained at another (a model_overrides or sweep data.seq_len)."""
    from matplotlib.axes import Axes

    script = load_script("scripts/train_synthetic.py")
    marked = []
    real = Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x=0, *a, **k: (marked.append((x, k.get("label"))),
                                                                      real(self, x, *a, **k))[1])
    best = [{"run": "a", "model": "a", "acc@64": 1.0, "acc@128": 0.5, "state_floats": 1, "plot_accuracy": 1.0},
            {"run": "b", "model": "b", "acc@64": 1.0, "acc@128": 1.0, "state_floats": 1, "plot_accuracy": 1.0}]
    script.plot_summary(best, [64, 128], tmp_path, [64, 128, 64])
    assert marked == [(64, "train length 64"), (128, "train length 128")]


def test_train_synthetic_dry_run_counts_the_curriculums_steps(capsys):
    """--dry-run gave the main phase's steps alone: induction-cpu.yaml's runs, 300 + 300 + 300 steps, read as 300."""
    script = load_script("scripts/train_synthetic.py")
    assert script.main([str(ROOT / "configs/train/induction-cpu.yaml"), "--only", "mamba", "--dry-run",
                        "--train.max_steps=70", "--curriculum=[{seq_len: 16, max_steps: 5}]"]) == 0
    assert "70 steps at 256 after a curriculum of 5 at 16 -> " in capsys.readouterr().out


def test_train_synthetic_model_override_of_one_field_keeps_the_rest_of_its_section():
    """--model_overrides.mamba.train.max_steps=5000 (or a YAML {mamba: {train: {max_steps: 5000}}}) replaced mamba's
    whole train section: its micro_batch_size, precision and state passing went back to their defaults unsaid."""
    script = load_script("scripts/train_synthetic.py")
    recipe = str(ROOT / "configs/train/induction.yaml")
    plain = script.expand_runs(script.load_recipe(recipe), ["mamba"])[0].section.train
    for override in ("model_overrides.mamba.train.max_steps=5000",
                     "model_overrides={mamba: {train.state_passing: true, train: {max_steps: 5000}}}"):
        train = script.expand_runs(script.load_recipe(recipe, [override]), ["mamba"])[0].section.train
        assert train == dataclasses.replace(plain, max_steps=5000), override
    data = script.load_recipe(recipe, ["model_overrides.mamba.data.seq_len=128"])
    section = script.expand_runs(data, ["mamba"])[0].section.data
    assert section.seq_len == 128 and section.task_kwargs == {"vocab_size": 16}


@pytest.mark.parametrize("override", ["model_overrides.mamba.data.seed=1", "model_overrides.mamba.eval.n_samples=8",
                                      "model_overrides.mamba.data.task_kwargs.vocab_size=12",
                                      "model_overrides={mamba: {data: {n_eval: 8}}}"])
def test_train_synthetic_refuses_a_model_override_of_the_evaluated_rows(override):
    """model_overrides could give one model its own data.seed, task_kwargs or eval.n_samples: it was evaluated on
    other rows than the others, and the summary compared them as if on the same ones, without a word."""
    script = load_script("scripts/train_synthetic.py")
    key = override.split("mamba.")[-1].split("=")[0] if "{" not in override else "data.n_eval"
    with pytest.raises(ValueError, match=rf"model_overrides\.mamba: {re.escape(key)} decides the rows every model is "
                                         r"evaluated on.*set it at the top level"):
        script.expand_runs(script.load_recipe(str(ROOT / "configs/train/induction.yaml"), [override]))


def test_train_synthetic_command_line_ends_bad_input_in_one_line(tmp_path):
    """python scripts/train_synthetic.py ran main bare, unlike the sweeps: a model YAML that is not there ended in a
    traceback (FileNotFoundError) and exit status 1, not one line and status 2."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "ZOO_TRACEBACK"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/train_synthetic.py"),
                           str(ROOT / "configs/train/induction-cpu.yaml"), f"--models.mamba={tmp_path / 'no.yaml'}",
                           "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("train_synthetic.py: [Errno 2] No such file") and "Traceback" not in proc.stderr


def test_train_synthetic_rerun_with_another_plot_cell_keeps_the_evaluated_grid(tmp_path, monkeypatch):
    """eval.plot_seq_len / plot_count only pick the summary's plot cell, but result.json was reused only under the same
    eval section: another plot cell evaluated every run's grid again (hours for a grid to 2^20 tokens). The grid is
    kept, and the memory at the new plot length (an attention model's KV cache) is the one the summary gives."""
    import yaml

    import zoo.eval.synthetic as synthetic

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["models"]["attention"] = {"vocab_size": 16, "d_model": 16, "layers": "A", "ffn": "none",
                                   "mixers": {"A": {"type": "attention", "n_heads": 2}}}
    data["eval"]["seq_lens"] = [16, 32]
    recipe.write_text(yaml.safe_dump(data))
    argv = [str(recipe), "--curriculum=[]", "--train.max_steps=1", "--schedule.warmup_steps=0"]
    assert script.main(argv) == 0

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(synthetic, "evaluate_synthetic", no_evaluation)
    assert script.main([*argv, "--eval.plot_seq_len=16"]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]}
    assert rows["attention"]["state_floats"] == 2 * 16 * 16  # K and V of one layer at 16 tokens, not 32
    with pytest.raises(AssertionError, match="evaluated again"):  # the grid's own settings still count
        script.main([*argv, "--eval.n_samples=8"])


def test_train_synthetic_summary_of_one_model_keeps_the_saved_runs_of_the_others(tmp_path, capsys):
    """--only trained the models it names, and summary.md, summary.json and the plots then covered those alone: a sweep
    run one model per call ended with the last model's summary. The results the output_dir holds for the recipe's other
    models under the same settings are in the summary too; one of other settings is not."""
    import yaml

    script = load_script("scripts/train_synthetic.py")
    recipe = _tiny_synthetic_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["models"]["other"] = data["models"]["mamba"]
    recipe.write_text(yaml.safe_dump(data))
    argv = [str(recipe), "--curriculum=[]", "--train.max_steps=1", "--schedule.warmup_steps=0"]
    assert script.main([*argv, "--only", "mamba"]) == 0
    assert script.main([*argv, "--only", "other"]) == 0
    assert "summary: with the saved results of mamba (not in --only)" in capsys.readouterr().out
    runs = [r["run"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]]
    assert sorted(runs) == ["mamba", "other"]
    assert script.main([*argv, "--only", "other", "--data.seed=1"]) == 0  # mamba's result is of another seed
    runs = [r["run"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]]
    assert runs == ["other"]


def test_train_synthetic_sweep_value_in_exponent_form_without_a_dot_is_a_number(capsys):
    # YAML reads 1e-3 (no dot) as the string '1e-3': the run trained at 0.001, but its name said 'lr=1e-3' and a
    # rerun with 1.0e-3 made a second run of the same point
    script = load_script("scripts/train_synthetic.py")
    script.main([str(ROOT / "configs/train/mqar-sweep.yaml"), "--only", "mamba2", "--sweep.optim.lr=[1e-3]",
                 "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("-lr=0.001:") == 4 and "1e-3" not in out
