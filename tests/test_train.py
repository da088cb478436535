"""The pretraining loop: loss drops, bit-exact resume, atomic checkpoints, named config errors, exact TBPTT."""

from __future__ import annotations

import contextlib
import copy
import csv
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    accelerate_launch,
    assert_close,
    cpu_launch_env,
    ctrl_c_on_call,
    kill_group,
    launch_fsdp_on_cpu,
    run_launch,
    save_letter_tokenizer,
    stream_reads,
)

from zoo.data.text import IGNORE_INDEX
from zoo.train import (
    ModelInputs,
    OptimConfig,
    config_from_dict,
    count_targets,
    forward_backward,
    latest_checkpoint,
    load_config,
    lr_at,
    main,
    param_groups,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 256}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: intra-op threads only add synchronization (seconds per step on a loaded 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_dict(tmp_path: Path, **sections) -> dict:
    """A tiny Llama run on the built-in corpus (~0.1M parameters, 256 tokens per step)."""
    base = {"model": LLAMA, "output_dir": str(tmp_path / "run"), "data": {"seq_len": 64},
            "train": {"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2},
            "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
            "log": {"every": 2, "trackers": ["csv"], "progress_bar": False}}
    return _merge(base, sections)


def rewrite_trainer_state(output_dir, edit) -> None:
    """Apply `edit` to the newest checkpoint's trainer_state.json (a checkpoint of another version or machine)."""
    path = latest_checkpoint(output_dir) / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def test_tiny_run_loss_drops_through_the_cli(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path)))
    assert main([str(path), "--train.max_steps=30", "--log.every=5", "--log.trackers=[csv, tensorboard]",
                 "--eval.every=30", "--eval.batches=2"]) == 0
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert first > 5.0 and last < first - 1.0, f"loss {first:.3f} -> {last:.3f}"
    assert float(rows[-1]["tokens"]) == 30 * 256 and float(rows[-1]["tokens_per_s"]) > 0
    assert any((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_00000030"
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    assert model.config.eos_token_id == tokenizer.eos_token_id == 258


@pytest.mark.parametrize("model", ["configs/models/jamba-tiny.yaml", "llama"])
def test_the_saved_model_loads_with_auto_classes_and_gives_the_trained_models_logits(tmp_path, monkeypatch, model):
    """The final checkpoint's model/ is the trained model: AutoModelForCausalLM.from_pretrained gives the weights and
    logits of the model in memory at the end of the run (a zoo hybrid with tied embeddings, MoE and attention; a
    transformers model), in fp32."""
    from accelerate.utils import extract_model_from_parallel
    from transformers import AutoModelForCausalLM

    import zoo.train as zt

    built = []
    build = zt.build_model
    monkeypatch.setattr(zt, "build_model", lambda *args: built.append(build(*args)) or built[-1])
    data = run_dict(tmp_path, train={"max_steps": 3})
    if model != "llama":
        data |= {"model": model, "model_overrides": {"vocab_size": 260}}
    result = train(config_from_dict(data))
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint / "model").eval()
    # on a GPU the run's model is on the card behind accelerate's autocast wrapper: compare its fp32 weights on the CPU
    trained = extract_model_from_parallel(built[0], keep_fp32_wrapper=False).cpu().eval()
    assert next(loaded.parameters()).dtype == torch.float32
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)


def test_a_model_folder_trains_with_its_own_tokenizer_unless_another_is_named(tmp_path):
    """Continued pretraining of a model folder that holds its tokenizer (a 31-token character tokenizer here) reads the
    data with that tokenizer and saves it beside the weights, as zoo finetune does: the run config's tokenizer
    defaulted to 'byte' whatever the model, so the model was trained on byte ids, and its checkpoints saved the byte
    tokenizer with it, without a word. A zoo YAML or a config mapping still train on bytes, and a tokenizer named in
    the config is the one used."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(97 + i): i + 2 for i in range(26)}, " ": 28, "\n": 29, "<bos>": 30}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    chars.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})) \
        .save_pretrained(base)
    PreTrainedTokenizerFast(tokenizer_object=chars, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>") \
        .save_pretrained(base)

    def tokenizer_of(name: str, **sections) -> tuple[str, int]:
        run = run_dict(tmp_path / name, train={"max_steps": 1}, schedule={"warmup_steps": 0}, **sections)
        train(config_from_dict(run))
        info = json.loads((tmp_path / name / "run" / "run_info.json").read_text())
        saved = AutoTokenizer.from_pretrained(latest_checkpoint(tmp_path / name / "run") / "model")
        return info["tokenizer"], len(saved)

    assert tokenizer_of("folder", model=str(base)) == (str(base), 31)
    assert tokenizer_of("named", model=str(base), tokenizer="byte") == ("byte", 259)
    assert tokenizer_of("mapping") == ("byte", 259)
    # a model that does not load is named as the model, not as the tokenizer it would have brought
    with pytest.raises(ValueError, match=r"^model: '.*missing': no such model folder$"):
        train(config_from_dict(run_dict(tmp_path / "missing", model=str(tmp_path / "missing"))))


def test_a_run_config_without_a_tokenizer_resumes_a_checkpoint_trained_before_it_meant_the_models_own(tmp_path):
    """The unset tokenizer was 'byte' whatever the model, and train_config.yaml recorded it so; it is now the model
    folder's own. Resumed with the same run config (no tokenizer field), such a run was refused ("tokenizer: 'byte' ->
    '<folder>'"): it continues with the tokenizer its checkpoint was trained with, and says so. A tokenizer the run
    config names is still compared."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})) \
        .save_pretrained(base)
    vocab = {"<unk>": 0, "<eos>": 1, **{chr(97 + i): i + 2 for i in range(26)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(base)
    run = run_dict(tmp_path, model=str(base), train={"max_steps": 2}, schedule={"warmup_steps": 0})
    train(config_from_dict({**run, "tokenizer": "byte"}))  # yesterday's run: its unset tokenizer was 'byte'
    resumed = train(config_from_dict(_merge(run, {"train": {"max_steps": 4}})), resume="auto")
    assert resumed.step == 4 and len(AutoTokenizer.from_pretrained(resumed.checkpoint / "model")) == 259
    assert yaml.safe_load((resumed.checkpoint / "train_config.yaml").read_text())["tokenizer"] == "byte"
    with pytest.raises(ValueError, match=r"tokenizer: 'byte' -> "):
        train(config_from_dict(_merge(run, {"tokenizer": str(base), "train": {"max_steps": 6}})), resume="auto")


def test_a_model_trained_with_another_tokenizer_than_its_own_takes_that_ones_special_ids(tmp_path):
    """A model folder trained with a tokenizer the run config names learns that tokenizer's <bos>, <eos> and <pad>:
    the checkpoint's config and generation_config say so, so that generate stops at the <eos> that ends its training
    documents. They kept the folder's ids (a Llama's eos 2: the byte 0x02 under the byte tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zoo.data.text import ByteTokenizer

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})) \
        .save_pretrained(base)
    run = run_dict(tmp_path, model=str(base), tokenizer="byte", train={"max_steps": 1}, schedule={"warmup_steps": 0})
    saved = AutoModelForCausalLM.from_pretrained(train(config_from_dict(run)).checkpoint / "model")
    byte = ByteTokenizer()
    for holder in (saved.config, saved.generation_config):
        ids = [holder.bos_token_id, holder.eos_token_id, holder.pad_token_id]
        assert ids == [byte.bos_token_id, byte.eos_token_id, byte.pad_token_id], (type(holder).__name__, ids)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    steps = 6
    full: dict[int, float] = {}
    train(config_from_dict(run_dict(tmp_path / "a")), on_step=lambda s, m: full.__setitem__(s, m["loss"]))

    def interrupt(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves after this step and stops

    cfg = config_from_dict(run_dict(tmp_path / "b", checkpoint={"every": 2}))
    first = train(cfg, on_step=interrupt)
    assert first.stopped and first.step == 3 and latest_checkpoint(cfg.output_dir).name == "step_00000003"
    resumed: dict[int, float] = {}
    second = train(cfg, resume="auto", on_step=lambda s, m: resumed.__setitem__(s, m["loss"]))
    assert second.step == steps and list(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], (resumed, full)
    from safetensors.torch import load_file

    a = load_file(latest_checkpoint(tmp_path / "a" / "run") / "model" / "model.safetensors")
    b = load_file(second.checkpoint / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ after resume"


def stop_after_step_3(how: str):
    """An on_step that stops a training after its step 3: SIGTERM (the loop saves after the step and stops) or a
    second Ctrl-C between steps (KeyboardInterrupt)."""

    def interrupt(step, metrics):
        if step == 3:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

    return interrupt


@pytest.mark.parametrize("how", ["sigterm", "second-ctrl-c"])
def test_a_stopped_run_says_the_command_that_continues_it_and_that_command_does(how, tmp_path, monkeypatch, capsys):
    """zoo train stopped by SIGTERM (or a first Ctrl-C) said only 'checkpoint: <folder>', and after a second Ctrl-C
    'zoo train: interrupted': neither said how to continue, and the same command again is refused (output_dir
    already holds checkpoints) where every other command's stop says 'the same command continues'. It names the
    command now, --resume added, and that command trains the run to its end."""
    import shlex

    import zoo.train as train_module
    from zoo import cli

    real = train_module.train

    interrupt = stop_after_step_3(how)

    monkeypatch.setattr(train_module, "train", lambda cfg, resume=None: real(cfg, resume=resume, on_step=interrupt))
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path)))
    assert cli._run("zoo train", train_module.main, [str(path), "--log.every=3"]) == 130
    err = capsys.readouterr().err
    said = re.search(r"(zoo train .*) continues it$", err.strip())
    assert said, err
    argv = shlex.split(said.group(1))[2:]
    assert argv == [str(path), "--log.every=3", "--resume"], argv
    monkeypatch.setattr(train_module, "train", real)
    assert cli._run("zoo train", train_module.main, argv) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step_00000006"


@pytest.mark.parametrize("how", ["sigterm", "second-ctrl-c"])
def test_a_stopped_run_closes_its_progress_bar_before_saying_so(how, tmp_path, monkeypatch):
    """SIGTERM (or a first Ctrl-C) printed 'stop requested: saving step N and exiting' with the progress bar still
    open, and a second Ctrl-C its 'interrupted: saving ...': in a terminal the line was glued to the end of the bar's,
    and the bar drawn again below it as it closed (zoo compare's trainings too, above its 'interrupted' line). The bar
    is closed first now: its last line, then the message, and no bar after it."""
    import io

    shared = io.StringIO()  # stdout (the message) and stderr (the bar) as a terminal shows them, in one stream
    monkeypatch.setattr(sys, "stdout", shared)
    monkeypatch.setattr(sys, "stderr", shared)

    interrupt = stop_after_step_3(how)

    cfg = config_from_dict(run_dict(tmp_path, log={"progress_bar": True}))
    if how == "sigterm":
        assert train(cfg, on_step=interrupt).stopped
    else:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, on_step=interrupt)
    message = "stop requested: saving step 3 and exiting\n" if how == "sigterm" else \
        "interrupted: saving the last completed step 3\n"
    before, said, after = shared.getvalue().partition(message)
    assert said and "/6 [" in before.rsplit("\n", 2)[-2] and before.endswith("\n"), shared.getvalue()
    assert "train:" not in after, shared.getvalue()


def test_resume_after_a_ctrl_c_mid_step_draws_the_uninterrupted_runs_dropout(tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt) mid-step saves the last completed step, but with the RNG state that the
    unfinished step's dropout had advanced: the resumed run redid that step with other masks than an uninterrupted
    run. The save now holds the RNG of the step before."""
    import zoo.train as zt

    sections = {"model": {"attention_dropout": 0.3}, "train": {"max_steps": 4}}
    full: dict[int, float] = {}
    train(config_from_dict(run_dict(tmp_path / "a", **sections)), on_step=lambda s, m: full.__setitem__(s, m["loss"]))
    real = zt.forward_backward
    # the 6th call: step 3's second micro-batch, after its first one drew dropout masks
    monkeypatch.setattr(zt, "forward_backward", ctrl_c_on_call(real, 6))
    cfg = config_from_dict(run_dict(tmp_path / "b", **sections))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert latest_checkpoint(cfg.output_dir).name == "step_00000002"
    monkeypatch.setattr(zt, "forward_backward", real)
    resumed: dict[int, float] = {}
    train(cfg, resume="auto", on_step=lambda s, m: resumed.__setitem__(s, m["loss"]))
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)], (resumed, full)


@pytest.mark.parametrize("killed", [False, True], ids=["resumed", "resumed-killed-resumed"])
def test_a_ctrl_c_during_an_evaluation_leaves_it_to_the_resumed_run(tmp_path, monkeypatch, killed):
    # a first Ctrl-C waits for the evaluation to end; a second one cut it short: the last completed step was saved,
    # and the resumed run went on from the step after it, so that step's eval/loss was never logged. killed: the
    # resumed run, which logs that evaluation first, is killed before its next checkpoint; the run resumed again from
    # the same checkpoint evaluated the step again, and metrics.csv held its eval row twice
    import zoo.train as zt

    def metrics(run):
        with open(run / "metrics.csv") as f:
            # (less what is measured, not trained: the speed, the MFU from it and the peak memory, which differ
            # between runs on a GPU)
            measured = ("mfu", "mfu_6n", "peak_mem_gib")
            return [{k: v for k, v in r.items() if not k.endswith("tokens_per_s") and k not in measured}
                    for r in csv.DictReader(f)]

    sections = {"train": {"max_steps": 4}, "eval": {"every": 2, "batches": 2}, "log": {"every": 1}}
    full = train(config_from_dict(run_dict(tmp_path / "a", **sections)))
    real, armed = zt._weighted_loss, []

    def ctrl_c_in_eval(*args, **kwargs):
        if armed and not torch.is_grad_enabled():  # the evaluation's forward (training's keeps a graph)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(zt, "_weighted_loss", ctrl_c_in_eval)
    cfg = config_from_dict(run_dict(tmp_path / "b", **sections))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=lambda s, m: armed.append(s) if s == 2 else None)
    assert latest_checkpoint(cfg.output_dir).name == "step_00000002"
    monkeypatch.setattr(zt, "_weighted_loss", real)
    if killed:
        def kill(step, _):
            if step == 3:
                raise _Killed

        with pytest.raises(_Killed):  # after the resumed evaluation of step 2, before a checkpoint
            train(cfg, resume="auto", on_step=kill)
        assert latest_checkpoint(cfg.output_dir).name == "step_00000002"
        assert [r["step"] for r in metrics(tmp_path / "b" / "run") if r.get("eval/loss")] == ["2"]
    resumed = train(cfg, resume="auto")
    assert [e["step"] for e in resumed.evals] == [2, 4]
    assert resumed.evals == full.evals
    assert metrics(tmp_path / "b" / "run") == metrics(tmp_path / "a" / "run")


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c_mid_step"])
def test_a_run_stopped_between_two_logs_logs_the_steps_since_the_last_one(tmp_path, monkeypatch, how):
    # log.every 2, stopped after step 3: step 3 was never logged (the loop saved and exited; the resumed run logs from
    # step 4 on), so metrics.csv had no row covering it; a second Ctrl-C in step 4 (KeyboardInterrupt) still left it out
    import zoo.train as zt

    losses: dict[int, float] = {}

    def interrupt(step, metrics):
        losses[step] = metrics["loss"]
        if step == 3 and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)

    real, calls = zt.forward_backward, []

    def ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # step 4's first micro-batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cfg = config_from_dict(run_dict(tmp_path, log={"every": 2}))
    if how == "sigterm":
        assert train(cfg, on_step=interrupt).stopped
    else:
        monkeypatch.setattr(zt, "forward_backward", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, on_step=interrupt)
        monkeypatch.setattr(zt, "forward_backward", real)
    train(cfg, resume="auto", on_step=lambda s, m: losses.__setitem__(s, m["loss"]))
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
    assert list(rows) == [2, 3, 4, 6]
    assert rows[3] == pytest.approx(losses[3]) and rows[4] == pytest.approx(losses[4])
    assert rows[2] == pytest.approx((losses[1] + losses[2]) / 2)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import zoo.train as zt

    def die_mid_write(root):
        if "step_00000004" in str(root):  # the second save: leave a half-written file, then die
            weights = next(root.rglob("model.safetensors"))
            weights.write_bytes(weights.read_bytes()[:100])
            os.kill(os.getpid(), signal.SIGKILL)

    zt._fsync_tree = die_mid_write
    zt.main([sys.argv[1]])
""")


def test_latest_names_the_newest_checkpoint(tmp_path):
    # save_checkpoint's loop over the weights (tied ones stored once) reused the checkpoint's `name`: `latest` held the
    # last weight's name (lm_head.weight), and latest_checkpoint found the newest by sorting the folders instead
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, checkpoint={"every": 2})))
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_a_run_resumed_from_an_older_checkpoint_deletes_the_abandoned_newer_ones_at_its_first_save(tmp_path,
                                                                                                     capsys):
    # the abandoned run's step_6 stayed, and pruning (checkpoint.keep 2) deleted the resumed run's step_4 instead:
    # step_5 and the stale step_6 were left, step_6 the newest by name (latest_checkpoint's fallback)
    sections = {"checkpoint": {"every": 2, "keep": 2}, "schedule": {"warmup_steps": 1}}
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 6}, **sections)))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    capsys.readouterr()
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 5}, **sections)), resume=str(root / "step_00000004"))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000005"]
    out = capsys.readouterr().out
    assert "older than the run's step_00000006" in out
    assert "checkpoints: deleting step_00000006, newer than step_00000005" in out
    assert (root / "latest").read_text() == "step_00000005"
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005"


def test_a_resume_from_another_runs_checkpoint_into_a_run_directory_with_checkpoints_is_refused(tmp_path):
    """`--resume` from another run's checkpoint with an output_dir that holds checkpoints of its own run: the first save
    took output_dir's newer checkpoints for an abandoned run's and deleted them (its newest, step 4, here), and
    checkpoint.keep pruned the rest. It is refused, naming both, and nothing is deleted; into a new output_dir it
    continues."""
    sections = {"checkpoint": {"every": 2, "keep": 2}, "schedule": {"warmup_steps": 1}}
    other = tmp_path / "other" / "run" / "checkpoints" / "step_00000002"
    train(config_from_dict(run_dict(tmp_path / "other", train={"max_steps": 2}, **sections)))
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4}, **sections)))
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(ValueError, match=r"--resume: .*step_00000002' is not a checkpoint of output_dir .*newest "
                                         r"step_00000004"):
        train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, **sections)), resume=str(other))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004"]
    result = train(config_from_dict(run_dict(tmp_path / "branch", train={"max_steps": 3}, **sections)),
                   resume=str(other))
    assert result.step == 3 and result.checkpoint.parent == tmp_path / "branch" / "run" / "checkpoints"


@pytest.mark.parametrize("model, damaged", [(LLAMA, "accelerate/model.safetensors"),
                                            (LLAMA, "accelerate/optimizer.bin"),
                                            ("configs/models/mamba-tiny.yaml", "model/model.safetensors")],
                         ids=["accelerate-weights", "optimizer", "zoo-model-weights"])
def test_a_resume_from_a_checkpoint_whose_file_is_cut_short_is_refused_naming_it(tmp_path, model, damaged):
    # a checkpoint copied in part (or corrupted) ended --resume in safetensors' "SafetensorError: Error while
    # deserializing header: incomplete metadata" or torch's "RuntimeError: PytorchStreamReader failed reading zip
    # archive", naming no file: in accelerate's load_state, or (a zoo model) in resume_weight_changes before it
    sections = {"checkpoint": {"every": 2}, "schedule": {"warmup_steps": 1}}
    run = run_dict(tmp_path, train={"max_steps": 2}, **sections)
    run["model"] = model
    train(config_from_dict(run))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    path = checkpoint / damaged
    path.write_bytes(path.read_bytes()[:3000])
    run["train"]["max_steps"] = 3
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path.parent))}: its weights \({path.name}\) cannot be "
                                         rf"read .*resume from another checkpoint of the run"):
        train(config_from_dict(run), resume="auto")


def test_atomic_checkpoint_survives_a_kill_mid_write(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 4}, checkpoint={"every": 2})))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step_00000002", "the half-written checkpoint must not be published"
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()
    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_00000002" / "model")  # intact
    result = train(load_config(path), resume="auto")
    assert result.step == 4 and latest_checkpoint(run).name == "step_00000004"
    assert not list((run / "checkpoints").glob(".tmp-*")), "the stale temporary folder is cleaned up"


class _Killed(BaseException):
    """A kill (SIGKILL) that the test survives: no handler of the loop catches it."""


def test_a_kill_while_a_resumed_run_replaces_a_checkpoint_leaves_latest_complete(tmp_path, monkeypatch):
    # a run resumed from an older checkpoint (a rollback) re-saves the steps the abandoned run saved: the abandoned
    # step_4, which `latest` named, was deleted in place before the new one was renamed in, and a kill mid-delete left
    # step_4 with its trainer_state.json but without its weights, which --resume took as the newest complete checkpoint
    import shutil

    from safetensors.torch import load_file

    sections = {"train": {"max_steps": 4}, "checkpoint": {"every": 2, "keep": 3}}
    cfg = config_from_dict(run_dict(tmp_path, **sections))
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    real = shutil.rmtree

    def die_mid_delete(path, *args, **kwargs):
        path = Path(path)
        if "step_00000004" in path.name and (path / "model").is_dir():
            real(path / "model")  # part of the folder is gone, its trainer_state.json not yet
            raise _Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", die_mid_delete)
    with pytest.raises(_Killed):
        train(cfg, resume=str(root / "step_00000002"))
    monkeypatch.setattr(shutil, "rmtree", real)
    newest = latest_checkpoint(tmp_path / "run")
    assert (newest / "model" / "model.safetensors").is_file(), f"{newest.name} is published without its weights"
    load_file(newest / "model" / "model.safetensors")
    assert train(cfg, resume="auto").step == 4
    assert not list(root.glob(".tmp-*")), "the folder set aside is cleaned up"


def test_resume_from_a_half_written_checkpoint_folder_is_refused(tmp_path):
    # a save killed mid-write leaves .tmp-step_X with its trainer_state.json (written before the files are flushed and
    # the folder renamed): --resume of the run skips it, but --resume naming it loaded it as a complete checkpoint
    import shutil

    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 1})))
    root = tmp_path / "run" / "checkpoints"
    half = root / ".tmp-step_00000004"
    shutil.copytree(root / "step_00000002", half)
    weights = half / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    more = config_from_dict(run_dict(tmp_path, train={"max_steps": 4}))
    with pytest.raises(ValueError, match=r"--resume: .*\.tmp-step_00000004' is a checkpoint folder left by a save"):
        train(more, resume=str(half))
    assert half.is_dir() and latest_checkpoint(tmp_path / "run").name == "step_00000002"


@pytest.mark.parametrize("extra,field", [
    ({"train": {"max_step": 5}}, r"train\.max_step: unknown field; did you mean train\.max_steps"),
    ({"optim": {"lr": -1.0}}, r"optim\.lr"),
    ({"optim": {"betas": [0.9]}}, r"optim\.betas"),
    ({"train": {"tbptt_chunk": 30}}, r"train\.tbptt_chunk"),
    ({"train": {"tbptt_chunk": 1}}, r"train\.tbptt_chunk: 1 cannot keep packed documents apart"),
    ({"train": {"tbptt_mode": "full"}}, r"train\.tbptt_mode"),
    ({"schedule": {"warmup_steps": 10}}, r"schedule\.warmup_steps"),
    ({"schedule": {"kind": "linear"}}, r"schedule\.kind"),
    ({"train": {"precision": "fp8"}}, r"train\.precision"),
    ({"train": {"micro_batch_size": 0}}, r"train\.micro_batch_size"),
    ({"train": {"batch_tokens": 512}}, r"train\.batch_tokens: set either"),
    ({"data": {"seq_len": 1}}, r"data\.seq_len"),
    ({"log": {"every": "often"}}, r"log\.every: expected an integer"),
    ({"checkpoint": {"keep": 0}}, r"checkpoint\.keep"),
    ({"train": {"max_steps": 0}}, r"^train\.max_steps: must be >= 1"),
    ({"train": {"seed": -1}}, r"^train\.seed: must be in \[0, 2\*\*32\), got -1"),
    ({"train": {"seed": 2 ** 32}}, r"^train\.seed: must be in \[0, 2\*\*32\)"),
    # infinite ones were taken: lr or weight_decay .inf made every weight inf at the first step (a run on NaN losses),
    # eps .inf made every update zero (a run that trained nothing), without a word
    ({"optim": {"lr": math.inf}}, r"^optim\.lr: must be finite, got inf"),
    ({"optim": {"eps": math.inf}}, r"^optim\.eps: must be finite, got inf"),
    ({"optim": {"weight_decay": math.inf}}, r"^optim\.weight_decay: must be finite, got inf"),
], ids=["unknown", "lr", "betas", "tbptt_chunk", "tbptt_chunk_1", "tbptt_mode", "warmup", "kind", "precision",
        "micro_batch", "batch_tokens", "seq_len", "type", "keep", "max_steps", "seed", "seed_too_large", "lr_inf",
        "eps_inf", "weight_decay_inf"])
def test_bad_run_config_names_the_field(tmp_path, extra, field):
    with pytest.raises(ValueError, match=field):
        config_from_dict(run_dict(tmp_path, **extra))


@pytest.mark.parametrize("model,overrides,field", [
    ({**LLAMA, "hidden_sise": 32}, {}, r"model\.hidden_sise: unknown field of LlamaConfig .*'hidden_size'"),
    (LLAMA, {"num_hiden_layers": 1}, r"model_overrides\.num_hiden_layers: .*did you mean 'num_hidden_layers'"),
    ({"model_type": "zoo", "d_modl": 32}, {}, r"model\.d_modl: unknown field of ZooConfig .*'d_model'"),
], ids=["llama-field", "llama-override", "zoo-mapping"])
def test_a_misspelled_model_field_is_refused_by_name(tmp_path, model, overrides, field):
    # transformers keeps an unknown keyword as an attribute: the model was built with the default the field meant to
    # replace (hidden_size 4096 for the Llama: a 1.3B-parameter model instead of a 0.04M one)
    from zoo.train import build_model

    run = run_dict(tmp_path, model_overrides=overrides)
    run["model"] = model  # as given (run_dict would merge the Llama's fields into a zoo mapping)
    with pytest.raises(ValueError, match=field):
        build_model(config_from_dict(run))
    ok = config_from_dict(run_dict(tmp_path, model={**LLAMA, "rope_theta": 5e5}))  # taken, though not an attribute
    assert build_model(ok).config.rope_parameters["rope_theta"] == 5e5


@pytest.mark.parametrize("model,overrides,message", [
    ({**LLAMA, "hidden_size": 30}, {}, r"^model: The hidden size \(30\) is not a multiple of the number of attention "
                                       r"heads \(4\)"),
    ({**LLAMA, "hidden_size": "wide"}, {}, r"^model: Field 'hidden_size' expected int, got str"),
    ("folder", {"hidden_size": "wide"}, r"^model_overrides: Field 'hidden_size' expected int, got str"),
], ids=["heads", "string-width", "folder-override"])
def test_a_model_config_transformers_refuses_is_one_error_naming_the_section(tmp_path, model, overrides, message):
    # transformers' field checks raise huggingface_hub's StrictDataclassError, no ValueError: zoo train ended in a
    # traceback (zoo compare refused the same config in one line)
    from transformers import AutoConfig

    from zoo.train import build_model

    if model == "folder":
        AutoConfig.for_model(**LLAMA).save_pretrained(tmp_path / "config-only")
        model = str(tmp_path / "config-only")
    run = run_dict(tmp_path, model_overrides=overrides)
    run["model"] = model
    with pytest.raises(ValueError, match=message):
        build_model(config_from_dict(run))


_MAMBA_FIELDS = {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 260}


@pytest.mark.parametrize("model,overrides,message", [
    ({**_MAMBA_FIELDS, "state_size": -1}, {},
     r"^model: the mamba model \(MambaConfig\) cannot be built from its config: RuntimeError: Trying to create tensor "
     r"with negative dimension -1: \[64, -1\]; check the values of its fields \(state_size=-1, hidden_size=32, "),
    ({**_MAMBA_FIELDS, "hidden_size": 0}, {},
     r"^model: the mamba model \(MambaConfig\) cannot be built from its config: ValueError: groups must be a positive "
     r"integer; check the values of its fields \(hidden_size=0, "),
    ("folder", {"time_step_rank": -3},
     r"^model: .*/config-only: the mamba model \(MambaConfig\) cannot be built from its config: RuntimeError: .*"
     r"negative dimension -3.*\(time_step_rank=-3\)$"),
], ids=["state-size", "hidden-size", "folder-override"])
def test_a_transformers_config_whose_model_cannot_be_built_is_one_error_naming_the_model_and_fields(tmp_path, model,
                                                                                                 overrides, message):
    # a field value transformers' checks of the config let through failed in the model's layers: a Mamba's state_size
    # -1 ended zoo train in torch's traceback ("RuntimeError: Trying to create tensor with negative dimension -1"), and
    # its hidden_size 0 in torch's one line "groups must be a positive integer", naming neither the model nor a field
    from transformers import AutoConfig

    from zoo.train import build_model

    if model == "folder":
        AutoConfig.for_model(**_MAMBA_FIELDS).save_pretrained(tmp_path / "config-only")
        model = str(tmp_path / "config-only")
    run = run_dict(tmp_path, model_overrides=overrides)
    run["model"] = model
    with pytest.raises(ValueError, match=message) as e:
        build_model(config_from_dict(run))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model,overrides,message", [
    ({**_MAMBA_FIELDS, "conv_kernel": 0}, {}, r"^model: conv_kernel: 0 is no kernel size for the causal convolution of "
                                              r"the mamba model's Mamba layers"),
    ({**_MAMBA_FIELDS, "model_type": "mamba2", "num_heads": 4, "head_dim": 16, "n_groups": 1, "conv_kernel": -2}, {},
     r"^model: conv_kernel: -2 is no kernel size .* of the mamba2 model's"),
    ("folder", {"conv_kernel": 0}, r"^model: .*/config-only: conv_kernel: 0 is no kernel size"),
    ("weights", {}, r"^model: .*/weights: conv_kernel: 0 is no kernel size"),
], ids=["mamba", "mamba2-negative", "folder-override", "saved-model"])
def test_a_transformers_mamba_whose_conv_kernel_is_below_one_is_refused_before_training(tmp_path, model, overrides,
                                                                                        message):
    # transformers builds a Mamba of conv_kernel 0 (its Conv1d holds no weights): zoo train built it and failed at the
    # first step in "RuntimeError: negative padding is not supported" (Mamba-2: "The size of tensor a (0) must match
    # the size of tensor b"), naming no field
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.train import build_model

    if model == "folder":
        AutoConfig.for_model(**_MAMBA_FIELDS).save_pretrained(tmp_path / "config-only")
        model = str(tmp_path / "config-only")
    elif model == "weights":
        config = AutoConfig.for_model(**{**_MAMBA_FIELDS, "conv_kernel": 0})
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "weights")
        model = str(tmp_path / "weights")
    run = run_dict(tmp_path, model_overrides=overrides)
    run["model"] = model
    with pytest.raises(ValueError, match=message):
        build_model(config_from_dict(run))


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 4503599627370496 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["gpu", "cpu"])
def test_a_transformers_model_too_large_for_memory_keeps_its_out_of_memory_error(tmp_path, monkeypatch, error):
    # model_build_errors took a failed allocation for a config error: a model too large for the machine (a GPU's
    # OutOfMemoryError, the CPU allocator's RuntimeError) was one ValueError saying it "cannot be built from its
    # config" and to "check the values of its fields", which were right, and ended zoo train as bad input (exit 2)
    import transformers

    from zoo.train import build_model

    def from_config(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    run = run_dict(tmp_path)
    run["model"] = dict(_MAMBA_FIELDS)
    with pytest.raises(RuntimeError) as e:
        build_model(config_from_dict(run))
    assert e.value is error


def test_an_error_building_a_transformers_model_that_its_default_config_meets_too_keeps_its_type_and_traceback(
        tmp_path, monkeypatch):
    # model_build_errors took any error of the model's build for one of its config's values: a bug inside transformers
    # or torch that any Mamba meets (here an IndexError in its mixer's __init__) was one ValueError telling the user to
    # "check the values of its fields", which were right, its traceback hidden behind exit status 2
    from transformers.models.mamba import modeling_mamba

    from zoo.train import build_model

    bug = IndexError("list index out of range")

    def init(self, *args, **kwargs):
        raise bug

    monkeypatch.setattr(modeling_mamba.MambaMixer, "__init__", init)
    run = run_dict(tmp_path)
    run["model"] = {**_MAMBA_FIELDS, "state_size": 4}
    with pytest.raises(IndexError) as e:
        build_model(config_from_dict(run))
    assert e.value is bug


def test_a_misspelled_override_of_a_config_folders_model_is_refused_by_name(tmp_path):
    # a folder holding only a config.json (a fresh model from it): AutoConfig.from_pretrained drops the keyword it has
    # no field for, so num_hiden_layers: 1 built the config's 2 layers without a word (the field check saw no attribute)
    from transformers import AutoConfig

    from zoo.train import build_model

    AutoConfig.for_model(**LLAMA).save_pretrained(tmp_path / "config-only")
    run = run_dict(tmp_path, model_overrides={"num_hiden_layers": 1})
    run["model"] = str(tmp_path / "config-only")
    with pytest.raises(ValueError, match=r"model_overrides\.num_hiden_layers: .* of LlamaConfig \(llama\); did you "
                                         r"mean 'num_hidden_layers'"):
        build_model(config_from_dict(run))
    run["model_overrides"] = {"num_hidden_layers": 1, "attention_dropout": 0.1}
    model = build_model(config_from_dict(run))
    assert (model.config.num_hidden_layers, model.config.attention_dropout) == (1, 0.1)
    # a folder with weights: the dropped keyword reached the model's __init__, a TypeError naming neither section
    model.save_pretrained(tmp_path / "weights")
    run["model"], run["model_overrides"] = str(tmp_path / "weights"), {"attention_dropuot": 0.1}
    with pytest.raises(ValueError, match=r"model_overrides\.attention_dropuot: .* of LlamaConfig \(llama\); did you "
                                         r"mean 'attention_dropout'"):
        build_model(config_from_dict(run))


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded"])
def test_a_model_folder_of_pytorch_model_bin_weights_trains_from_its_weights(tmp_path, layout):
    # a folder without a *.safetensors file was taken for one of config.json alone: a model of pytorch_model.bin (an
    # older save, or a download holding .bin files only) was built fresh from its config, its weights never loaded,
    # and trained from a random init without a word
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.train import build_model

    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA))
    folder = tmp_path / "bin"
    saved.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in saved.state_dict().items()}
    if layout == "sharded":
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for name, keys in shards.items():
            torch.save({k: state[k] for k in keys}, folder / name)
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    run = run_dict(tmp_path)
    run["model"] = str(folder)
    torch.manual_seed(1)
    model = build_model(config_from_dict(run))
    loaded = model.state_dict()
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(loaded[name], value, msg=name)


@pytest.mark.parametrize("peft", [True, False], ids=["peft", "no-peft"])
def test_a_hub_adapter_repo_as_the_model_is_refused_as_an_adapter(tmp_path, monkeypatch, peft):
    """A hub repo holding a PEFT adapter, given as the model: transformers (with peft) loaded its base model with the
    adapter in its layers, to be trained on and saved as the adapter alone, or (without) failed for want of a
    config.json; an adapter folder was refused as one already. The hub is a cache read offline."""
    import shutil

    import transformers.models.auto.auto_factory as auto_factory
    from helpers import offline_hub_repo, save_trained_adapter

    import zoo.hub
    from zoo.train import build_model

    save_trained_adapter(tmp_path / "base", offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/lora"), False)
    if not peft:
        monkeypatch.setattr(auto_factory, "is_peft_available", lambda: False)
    run = run_dict(tmp_path)
    run["model"] = "someone/lora"
    with pytest.raises(ValueError, match=r"^model: 'someone/lora' holds a PEFT adapter, not a model; give its base "
                                         r"model or the merged model$"):
        build_model(config_from_dict(run))
    # a model's id loads, and is not looked up for an adapter beyond from_pretrained's own look
    shutil.copytree(tmp_path / "base", offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/model"))
    monkeypatch.setattr(zoo.hub, "adapter_config_file", lambda ref: pytest.fail(f"looked up {ref} for an adapter"))
    run["model"] = "someone/model"
    assert build_model(config_from_dict(run)).config.model_type == "zoo"


def test_whole_numbers_written_as_yaml_strings_or_floats_fill_integer_fields(tmp_path):
    # YAML reads 1e5 (no dot) as the string '1e5', and a quoted "2048" stays a string
    cfg = config_from_dict(run_dict(tmp_path, train={"max_steps": "1e5"}, data={"seq_len": "64"},
                                    log={"every": 10.0}))
    assert (cfg.train.max_steps, cfg.data.seq_len, cfg.log.every) == (100_000, 64, 10)
    assert all(type(v) is int for v in (cfg.train.max_steps, cfg.data.seq_len, cfg.log.every))
    with pytest.raises(ValueError, match=r"data\.seq_len: expected an integer, got '64\.5'"):
        config_from_dict(run_dict(tmp_path, data={"seq_len": "64.5"}))


def test_bad_run_setups_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^model: required"):
        config_from_dict({k: v for k, v in run_dict(tmp_path).items() if k != "model"})
    small_vocab = run_dict(tmp_path, model={"vocab_size": 100})
    with pytest.raises(ValueError, match=r"model\.vocab_size.*259"):
        train(config_from_dict(small_vocab))
    uneven = run_dict(tmp_path, train={"grad_accum": None, "batch_tokens": 200})
    with pytest.raises(ValueError, match=r"train\.batch_tokens.*multiple"):
        train(config_from_dict(uneven))
    with pytest.raises(ValueError, match=r"config: no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"--resume: no checkpoint"):
        train(config_from_dict(run_dict(tmp_path)), resume=str(tmp_path / "nowhere"))
    cfg = config_from_dict(run_dict(tmp_path, train={"max_steps": 1}, schedule={"warmup_steps": 0}))
    train(cfg)
    with pytest.raises(ValueError, match=r"output_dir: .* already holds checkpoints"):
        train(cfg)


@pytest.mark.parametrize("model", [LLAMA, "configs/models/mamba-tiny.yaml"])
def test_a_tokenizer_whose_pad_or_eos_id_lies_past_the_models_embeddings_is_refused_before_training(tmp_path, model):
    # a tokenizer of 30 tokens whose <pad> and <eos> have ids 700 and 701 passed the check of its size against the
    # model's embeddings: a Llama failed to build ('Padding_idx must be within num_embeddings'), a zoo model trained
    # until the first row holding an <eos>, which failed in the embedding ('IndexError: index out of range in self';
    # on a GPU a device-side assert)
    save_letter_tokenizer(tmp_path / "tok", pad_token=("<pad>", 700), eos_token=("<eos>", 701))
    run = run_dict(tmp_path, tokenizer=str(tmp_path / "tok"), data={"add_bos": False})
    run["model"] = model
    vocab_size = 260 if isinstance(model, dict) else 512
    steps: list[int] = []
    with pytest.raises(ValueError, match=rf"tokenizer: its pad_token_id 700 is outside the model's vocabulary "
                                         rf"\(vocab_size {vocab_size}: ids 0\.\.{vocab_size - 1}\), though the "
                                         rf"tokenizer has 30 tokens .*; set model_overrides\.vocab_size >= 702"):
        train(config_from_dict(run), on_step=lambda s, m: steps.append(s))
    assert not steps


@pytest.mark.parametrize("model, overrides, message", [
    ({**LLAMA, "pad_token_id": 300}, {}, r"model\.pad_token_id: 300 is outside the model's vocabulary \(vocab_size "
                                         r"260: ids 0\.\.259\)"),
    ("configs/models/mamba-tiny.yaml", {"eos_token_id": 600}, r"model_overrides\.eos_token_id: 600 is outside the "
                                                              r"model's vocabulary \(vocab_size 512: ids 0\.\.511\)")])
def test_a_model_config_naming_a_special_id_past_its_vocabulary_is_refused_before_training(tmp_path, model, overrides,
                                                                                          message):
    # a Llama config with pad_token_id 300 of 260 embeddings failed to build ('Padding_idx must be within
    # num_embeddings'), and a zoo model with eos_token_id 600 of 512 trained and saved a config whose eos generate
    # never meets, without a word of zoo's (transformers warned at the save)
    run = run_dict(tmp_path, model_overrides=overrides, train={"max_steps": 1}, schedule={"warmup_steps": 0})
    run["model"] = model
    steps: list[int] = []
    with pytest.raises(ValueError, match=message):
        train(config_from_dict(run), on_step=lambda s, m: steps.append(s))
    assert not steps


def test_a_config_folders_special_ids_that_the_tokenizers_replace_are_not_refused(tmp_path):
    # a GPT-2 config.json (bos and eos 50256) under model_overrides.vocab_size 260 and the byte tokenizer was refused
    # for its ids past the vocabulary ('model.bos_token_id: 50256 is outside the model's vocabulary'), though the
    # tokenizer's ids replace them after the build: the run trained before the check of config ids
    from transformers import GPT2Config

    from zoo.data.text import ByteTokenizer

    GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    run = run_dict(tmp_path, train={"max_steps": 1}, schedule={"warmup_steps": 0})
    run["model"] = str(tmp_path / "gpt2")
    result = train(config_from_dict(run))
    config = json.loads((result.checkpoint / "model" / "config.json").read_text())
    tok = ByteTokenizer()
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)


@pytest.mark.parametrize("packing", [False, True])
def test_rows_longer_than_a_models_learned_positions_are_refused_before_training(tmp_path, packing):
    # a GPT-2 with 32 learned positions trained on rows of 64: IndexError "index out of range in self" in the first
    # step's forward, naming neither data.seq_len nor the model's position table
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 260, "n_positions": 32}
    run = run_dict(tmp_path, data={"packing": packing})
    run["model"] = gpt2
    steps: list[int] = []
    with pytest.raises(ValueError, match=r"data\.seq_len: 64 tokens per row, but GPT2LMHeadModel learns 32 absolute "
                                         r"positions \(transformer\.wpe"):
        train(config_from_dict(run), on_step=lambda s, m: steps.append(s))
    assert not steps
    run["model"] = {**gpt2, "n_positions": 64}  # rows that fit train
    run["train"]["max_steps"] = 3
    assert train(config_from_dict(run)).step == 3


def test_weight_decay_groups_read_the_parameter_flags():
    from transformers import AutoModelForCausalLM

    import zoo

    model = AutoModelForCausalLM.from_config(zoo.ZooConfig.from_yaml(ROOT / "configs/models/mamba-tiny.yaml"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = (g["params"] for g in param_groups(model, OptimConfig()))
    flagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert {names[id(p)] for p in no_decay} == flagged
    assert any(n.endswith("A_log") for n in flagged) and any(n.endswith(".D") for n in flagged)
    groups = param_groups(model, OptimConfig(no_decay_1d=True, no_decay_embeddings=True))
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert all(p is not model.get_input_embeddings().weight for p in groups[0]["params"])
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_biases_norms_and_ssm_parameters_are_not_decayed_matrices_are():
    """No weight decay on any bias (the convs', Mamba's optional linear biases, GLA's gate bias), norm weight, A_log,
    D or dt bias (mamba_ssm's _no_weight_decay flags); decay on every projection, conv and embedding weight, as
    transformers' Trainer (flash-attention's training code, which the Mamba paper's runs used, leaves embeddings out:
    optim.no_decay_embeddings)."""
    from transformers import AutoModelForCausalLM

    import zoo

    config = zoo.ZooConfig(vocab_size=64, d_model=32, layers="MSAG", ffn={"type": "swiglu", "hidden": 64},
                           mixers={"M": {"type": "mamba", "d_state": 4, "bias": True, "inner_norms": True},
                                   "S": {"type": "mamba2", "d_state": 4, "head_dim": 16, "bias": True},
                                   "A": {"type": "attention", "n_heads": 2}, "G": {"type": "gla", "n_heads": 2}},
                           moe={"every": 2, "n_experts": 2, "top_k": 1})
    model = AutoModelForCausalLM.from_config(config)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, OptimConfig()))
    kept = {n for n in names.values() if n.endswith(("bias", "A_log", ".D", "norm.weight", "layernorm.weight",
                                                       "norm_f.weight"))}
    assert {n for n in kept if n.endswith("bias")} >= {"model.layers.0.mixer.conv1d.bias",
                                                      "model.layers.0.mixer.in_proj.bias",
                                                      "model.layers.1.mixer.conv1d.bias",
                                                      "model.layers.1.mixer.dt_bias",
                                                      "model.layers.3.mixer.gk_proj.1.bias"}
    assert no_decay == kept, f"decayed: {sorted(kept - no_decay)}; not decayed: {sorted(no_decay - kept)}"
    assert decay == set(names.values()) - kept


def test_a_transformers_models_biases_and_norms_are_not_decayed_by_default(tmp_path):
    """A transformers model carries no _no_weight_decay flags: its RMSNorm weights and biases were decayed toward 0
    by the default run config (transformers' Trainer and mamba_ssm exempt them), unlike the zoo models' in the same
    comparison. By default 1-D parameters are not decayed; no_decay_1d: false decays them unless flagged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in LLAMA.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", attention_bias=True, **fields))
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = config_from_dict(run_dict(tmp_path))
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, cfg.optim))
    flat = {n for n, p in model.named_parameters() if p.ndim < 2}
    assert "model.norm.weight" in flat and "model.layers.0.self_attn.q_proj.bias" in flat
    assert no_decay == flat and decay == set(names.values()) - flat
    cfg = config_from_dict(run_dict(tmp_path, optim={"no_decay_1d": False}))
    assert {names[id(p)] for p in param_groups(model, cfg.optim)[0]["params"]} == set(names.values())


HF_MAMBA = {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 260, "state_size": 4}


@pytest.mark.parametrize("model_type, fields", [
    ("mamba", {"state_size": 4}),
    ("jamba", {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_d_state": 4,
               "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
               "num_experts": 2, "mamba_dt_rank": 4}),
    ("mamba2", {"state_size": 4, "num_heads": 4, "head_dim": 16, "n_groups": 1}),
])
def test_a_transformers_ssms_a_log_d_and_dt_bias_are_not_decayed(model_type, fields):
    """mamba_ssm never decays A_log, D and the dt bias (its _no_weight_decay flags), nor do zoo's mixers; transformers'
    Mamba and Jamba keep A_log 2-D ([d_inner, d_state]) and flag nothing, so `zoo train` decayed it toward 0 (A toward
    -1). They are exempt by name, with no_decay_1d false too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2,
                                                                  vocab_size=64, **fields))
    names = {id(p): n for n, p in model.named_parameters()}
    ssm = {n for n in names.values() if n.rpartition(".")[2] in ("A_log", "D", "dt_bias")}
    assert any(n.endswith("A_log") for n in ssm) and any(n.endswith(".D") for n in ssm)
    for cfg in (OptimConfig(), OptimConfig(no_decay_1d=False)):
        decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, cfg))
        assert ssm <= no_decay and not ssm & decay, sorted(ssm & decay)
    assert decay == set(names.values()) - ssm  # (no_decay_1d false: the names alone are exempt)


def adamw_steps(monkeypatch, what) -> list[list]:
    """A list that gets, at each AdamW step, `what(group)` of each of its param groups."""
    seen = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([what(g) for g in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_a_run_that_decayed_a_transformers_mambas_a_log_resumes_as_it_trained(tmp_path, monkeypatch, capsys):
    """A checkpoint of a transformers Mamba written while A_log was decayed (its optimizer state holds those groups)
    resumes, saying so, with A_log still decayed, as its run trained: refused, it could not be continued at all."""
    import zoo.train as zt

    def run(steps):
        data = run_dict(tmp_path, data={"packing": False}, train={"max_steps": steps})
        return config_from_dict(data | {"model": HF_MAMBA})

    monkeypatch.setattr(zt, "NO_DECAY_NAMES", ())  # the rule before the names were exempt
    train(run(3))
    monkeypatch.undo()
    sizes = adamw_steps(monkeypatch, lambda group: len(group["params"]))
    capsys.readouterr()
    assert train(run(4), resume="auto").step == 4
    assert "decayed the parameters named A_log, D, dt_bias" in capsys.readouterr().out
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["param_groups"]
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in HF_MAMBA.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", **fields))
    decayed = [len(g["params"]) for g in param_groups(model, OptimConfig(), by_name=False)]
    assert sizes == [saved] == [decayed] and decayed != [len(g["params"]) for g in param_groups(model, OptimConfig())]


def _mfu_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("mfu")]


@pytest.mark.parametrize("name", ["transformerpp-tiny", "mamba-tiny"], ids=["transformerpp", "mamba"])
def test_mfu_counts_three_forwards_of_compare_accounting(tmp_path, name):
    """mfu was 6 · active parameters · tokens/s / peak: attention's L-dependent FLOPs and the scans' left out, so
    at long rows a Transformer++'s MFU was understated against a Mamba's (its training FLOPs are 1.6 x 6N at 130M
    and L = 8192). mfu counts 3 × zoo.compare's forward FLOPs per token at the rows' length now, computed once
    (run_info.json has it and its formula); mfu_6n keeps the old figure."""
    from zoo import ZooConfig
    from zoo.compare import account

    path = str(ROOT / "configs" / "models" / f"{name}.yaml")
    run = run_dict(tmp_path, train={"max_steps": 2, "grad_accum": 1}, schedule={"warmup_steps": 0},
                   log={"every": 1, "peak_tflops": 1.0})
    run["model"] = path
    train(config_from_dict(run))
    forward = account(ZooConfig.from_yaml(path), [64])["per_length"][0]["flops_per_token"]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    rows = _mfu_rows(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        tps = float(row["tokens_per_s"])
        assert math.isclose(float(row["mfu"]), 3 * forward * tps / 1e12, rel_tol=1e-6)
        assert math.isclose(float(row["mfu_6n"]), 6 * info["active_params"] * tps / 1e12, rel_tol=1e-6)
        assert not math.isclose(float(row["mfu"]), float(row["mfu_6n"]), rel_tol=1e-3)
    assert info["mfu_formula"] == "3x_forward" and math.isclose(info["flops_per_token"], 3 * forward)


def test_mfu_of_rows_trained_in_chunks_counts_attention_over_the_row_and_the_scans_per_chunk(tmp_path):
    """With train.tbptt_chunk a token's attention still sees the row's earlier keys (the KV cache carried from
    chunk to chunk), while Mamba-2's chunked scan starts afresh in every chunk: the hybrid's attention term is
    counted at the row's 64 tokens, its SSD term at the chunk's 16 (its chunk_size, 32, is cut to 16)."""
    from zoo import ZooConfig
    from zoo.compare import layer_costs, training_flops_per_token

    model = {"vocab_size": 260, "d_model": 32, "layers": "AM", "ffn": "none",
             "mixers": {"A": {"type": "attention", "n_heads": 2},
                        "M": {"type": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 32}}}
    run = run_dict(tmp_path, train={"max_steps": 1, "grad_accum": 1, "tbptt_chunk": 16},
                   schedule={"warmup_steps": 0}, log={"every": 1})
    run["model"] = {"model_type": "zoo", **model}
    train(config_from_dict(run))
    config = ZooConfig(**model)
    attention, ssd = layer_costs(config)
    weights = attention.weights + ssd.weights + 260 * 32
    expected = 3 * (2 * weights + attention.seq_flops(64) + ssd.seq_flops(16))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert math.isclose(info["flops_per_token"], expected) and info["mfu_formula"] == "3x_forward"
    assert math.isclose(training_flops_per_token(config, 64, 16), expected)
    assert not math.isclose(expected, training_flops_per_token(config, 64), rel_tol=1e-3)
    assert not math.isclose(expected, training_flops_per_token(config, 16), rel_tol=1e-3)


def test_mfu_of_a_model_compare_cannot_account_falls_back_to_6n_and_says_so(tmp_path, capsys):
    """A transformers model zoo.compare's accounting cannot count (Mixtral: a MoE) gets mfu = 6 · active
    parameters, said once at the start and recorded in run_info.json (mfu_formula '6n_active')."""
    mixtral = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "num_local_experts": 4,
               "num_experts_per_tok": 2, "max_position_embeddings": 256}
    run = run_dict(tmp_path, train={"max_steps": 2, "grad_accum": 1}, schedule={"warmup_steps": 0},
                   log={"every": 1, "peak_tflops": 1.0})
    run["model"] = mixtral
    train(config_from_dict(run))
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mfu:")]
    assert len(notices) == 1 and "MixtralForCausalLM" in notices[0] and "6 · active parameters" in notices[0]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["mfu_formula"] == "6n_active" and info["flops_per_token"] == 6 * info["active_params"]
    rows = _mfu_rows(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        six_n = 6 * info["active_params"] * float(row["tokens_per_s"]) / 1e12
        assert math.isclose(float(row["mfu"]), six_n, rel_tol=1e-6)
        assert math.isclose(float(row["mfu_6n"]), six_n, rel_tol=1e-6)


def test_mfu_of_a_zoo_model_the_accounting_cannot_build_falls_back_to_6n(monkeypatch):
    """The accounting builds a zoo model on the meta device: a custom mixer that cannot be built there stopped
    zoo train at its start (for a metric); it now gets 6 · active parameters, with the reason."""
    import torch.nn as nn

    from zoo import ZooConfig, ZooForCausalLM, registry
    from zoo.train import mfu_flops_per_token

    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))

    @registry.register_mixer("no_meta_mixer")
    class NoMeta(nn.Module):
        def __init__(self, d_model, layer_idx=None):
            super().__init__()
            if torch.empty(0).is_meta:
                raise RuntimeError("no meta tensors here")
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
            return self.proj(x)

    config = ZooConfig(vocab_size=50, d_model=16, layers="XA", ffn="none",
                       mixers={"X": {"type": "no_meta_mixer"}, "A": {"type": "attention", "n_heads": 2}})
    model = ZooForCausalLM(config)
    flops, formula, why = mfu_flops_per_token(model, 32)
    assert formula == "6n_active" and flops == 6 * sum(p.numel() for p in model.parameters())
    assert "no meta tensors here" in why


def test_mfu_of_a_moe_model_counts_the_routed_experts_only(tmp_path):
    """MFU was 6 · all parameters · tokens/s: a MoE's n_experts - top_k experts that a token skips counted as work
    done, so a Jamba-style model's MFU was overstated (here 1.5x; more with 16 experts and top-2)."""
    from zoo import ZooConfig, ZooForCausalLM
    from zoo.compare import account
    from zoo.train import active_parameters, count_parameters

    model = {"model_type": "zoo", "vocab_size": 260, "d_model": 32, "layers": "MM", "ffn": {"hidden": 64},
             "mixers": {"M": {"type": "mamba", "d_state": 4}},
             "moe": {"every": 2, "n_experts": 4, "top_k": 1, "normalize_topk": False}}
    run = run_dict(tmp_path, train={"max_steps": 3, "grad_accum": 1}, log={"every": 1, "peak_tflops": 1.0})
    run["model"] = model  # the zoo fields alone (run_dict would merge the Llama's into them: unknown to ZooConfig)
    cfg = config_from_dict(run)
    train(cfg)
    rows = _mfu_rows(tmp_path / "run")
    fields = {k: v for k, v in model.items() if k != "model_type"}
    built = ZooForCausalLM(ZooConfig(**fields))
    active = count_parameters(built) - 3 * 3 * 32 * 64  # three of the four experts skipped
    assert active_parameters(built) == active < count_parameters(built)
    assert rows and all(math.isclose(float(r["mfu_6n"]), 6 * active * float(r["tokens_per_s"]) / 1e12,
                                     rel_tol=1e-4) for r in rows)
    # mfu's accounting touches the router and top_k experts only, too
    forward = account(ZooConfig(**fields), [64])["per_length"][0]["flops_per_token"]
    assert all(math.isclose(float(r["mfu"]), 3 * forward * float(r["tokens_per_s"]) / 1e12, rel_tol=1e-4)
               for r in rows)
    # run_info says both counts: benchmarks/train_throughput.py's MFU reads the active one from it
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (info["params"], info["active_params"]) == (count_parameters(built), active)


@pytest.mark.parametrize("model_type,experts", [
    ("mixtral", {"num_local_experts": 8}),
    ("jamba", {"num_experts": 8, "expert_layer_period": 2, "expert_layer_offset": 1}),  # MLP layers between
    ("qwen2_moe", {"num_experts": 8, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40}),
])
def test_active_parameters_of_a_transformers_moe_leave_out_the_skipped_experts(model_type, experts):
    """A transformers MoE trained by zoo train (whose accounting cannot count it) falls back to MFU = 6 · active
    parameters per token, and run_info's active_params: every expert counted as active (Mixtral's 8 experts
    and top-2: MFU 3x too high here). Its routed experts (transformers keeps them as [num_experts, ...] tensors)
    now count top_k of num_experts; a shared expert stays active."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.train import active_parameters, count_parameters, mfu_flops_per_token

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_experts_per_tok=2, **experts)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed > 0
    active = count_parameters(model) - routed * 6 // 8  # six of the eight experts skipped
    assert active_parameters(model) == active
    flops, formula, why = mfu_flops_per_token(model, 32)
    assert formula == "6n_active" and why is not None and flops == 6 * active


def test_peak_memory_under_several_processes_is_the_largest_not_process_0s(monkeypatch):
    """The logged peak_mem_gib was process 0's torch.cuda.max_memory_allocated; under FSDP or uneven batches another
    process can hold more, and the run needs what the largest one holds."""
    from zoo.train import peak_memory_gib

    class Accelerator:  # process 0 of two: gather stacks the processes' values
        num_processes = 2

        def gather(self, t):
            return torch.cat([t, torch.tensor([3.0])])

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 ** 30)
    assert peak_memory_gib(Accelerator(), torch.device("cpu")) == 3.0
    Accelerator.num_processes = 1
    assert peak_memory_gib(Accelerator(), torch.device("cpu")) == 1.0


def test_schedules():
    cfg = config_from_dict({"model": LLAMA, "train": {"max_steps": 100},
                            "optim": {"lr": 1e-3}, "schedule": {"warmup_steps": 10, "min_lr": 1e-5}})
    assert math.isclose(lr_at(0, cfg), 1e-4) and math.isclose(lr_at(9, cfg), 1e-3)
    assert math.isclose(lr_at(99, cfg), 1e-5)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs)), "cosine decays monotonically"
    cfg.schedule.kind, cfg.schedule.decay_fraction = "wsd", 0.2
    assert lr_at(79, cfg) == 1e-3 and lr_at(80, cfg) < 1e-3 and math.isclose(lr_at(99, cfg), 1e-5)
    # the last 7% of 100 steps is 7 steps, though 0.07 · 100 is 7.000000000000001 in floating point (it took 8)
    for fraction, n in ((0.07, 100), (0.14, 200), (0.55, 100)):
        cfg.schedule.decay_fraction, cfg.train.max_steps = fraction, n
        k = round(fraction * n)
        assert lr_at(n - k - 1, cfg) == 1e-3 and lr_at(n - k, cfg) < 1e-3, (fraction, n)
    cfg.schedule.decay_fraction, cfg.train.max_steps = 0.2, 100
    # a warmup that reaches into the last 20%: the peak at its end, then an even linear decay to min_lr (the decay began
    # under the warmup, so step 90 dropped from 1e-3 to 4.6e-4 and the steps after it by 5e-5 each)
    cfg.schedule.warmup_steps = 90
    lrs = [lr_at(s, cfg) for s in range(89, 100)]
    assert lrs[0] == 1e-3 and math.isclose(lrs[-1], 1e-5)
    drops = [a - b for a, b in itertools.pairwise(lrs)]
    assert all(math.isclose(d, drops[0]) for d in drops), drops
    # one step after the warmup (zoo compare's MQAR caps the warmup at steps - 1): it is the last, at min_lr (the
    # cosine's progress was 0 there, so the run ended at the peak)
    cfg.schedule.kind, cfg.schedule.warmup_steps = "cosine", 99
    assert math.isclose(lr_at(98, cfg), 1e-3) and math.isclose(lr_at(99, cfg), 1e-5)


def test_a_transformers_model_under_flash_attention_keeps_the_documents_of_packed_rows_apart(tmp_path, monkeypatch):
    # transformers' flash attention tells packed documents apart by position_ids only in a batch of one row: in a
    # micro-batch of several, each row ran in one causal pass and every document attended to those before it in its
    # row. flash-attn is stood in for by the same attention in PyTorch (a causal pass per row; per document for varlen)
    import torch.nn.functional as F
    import transformers.modeling_flash_attention_utils as flash
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.data.text import ByteTokenizer, DataConfig, TextStream

    def causal(q, k, v, scale):  # [T, H, D] each
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), is_causal=True,
                                              scale=scale).transpose(0, 1)

    def flash_fn(q, k, v, softmax_scale=None, **_):  # [B, T, H, D]
        return torch.stack([causal(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])

    def varlen_fn(q, k, v, cu_seqlens_q=None, softmax_scale=None, **_):  # [tokens, H, D]
        bounds = cu_seqlens_q.tolist()
        return torch.cat([causal(q[a:b], k[a:b], v[a:b], softmax_scale) for a, b in zip(bounds[:-1], bounds[1:])])

    def kwargs_fn(**kw):
        return {"softmax_scale": kw.get("softmax_scale")}

    # transformers 5.2x returns the kwargs builders of the varlen and the kvcache functions; 5.17 the varlen one alone
    builders = (kwargs_fn, kwargs_fn) if hasattr(flash, "_process_with_kvcache_kwargs_fn") else kwargs_fn
    monkeypatch.setattr(flash, "lazy_import_flash_attention",
                        lambda *a, **k: ((flash_fn, varlen_fn, None, None, None), builders))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})).eval()
    model.config._attn_implementation = "flash_attention_2"
    inputs = ModelInputs.of(model)
    pytest.importorskip("datasets")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}: " + "ab" * (i % 7 * 4)}) + "\n" for i in range(30)))
    stream = TextStream(DataConfig(source=str(docs), seq_len=96, holdout=0.0, shuffle=False), ByteTokenizer())
    batch, _ = next(stream.batches(3))
    assert (batch["seq_idx"][:, -1] > 0).all(), "the case: every row packs several documents"
    with torch.no_grad():
        logits = model(**inputs.kwargs(batch, labels=False), use_cache=False).logits
        for row in range(3):  # each document of the row alone
            for doc in batch["seq_idx"][row].unique().tolist():
                at = batch["seq_idx"][row] == doc
                alone = model(input_ids=batch["input_ids"][row, at][None], use_cache=False).logits[0]
                assert_close(f"row {row} document {doc}", logits[row, at], alone, 1e-5)


JAMBA = {"model_type": "jamba", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "attn_layer_period": 2,
         "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2,
         "mamba_d_state": 8, "mamba_dt_rank": 4}
BAMBA = {"model_type": "bamba", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "mamba_n_heads": 4,
         "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 8, "attn_layer_indices": [1]}
ZOO_MAMBA = {"model_type": "zoo", "vocab_size": 260, "d_model": 32, "layers": "M*", "ffn": {"hidden": 64},
             "mixers": {"M": {"type": "mamba", "d_state": 4}, "*": {"type": "attention", "n_heads": 4}}}


@pytest.mark.parametrize("model", [LLAMA, JAMBA, BAMBA, ZOO_MAMBA], ids=["llama", "jamba", "bamba", "zoo"])
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_the_packing_probe_tells_the_models_whose_packed_documents_meet(model, attention):
    # transformers' hybrids take position_ids (the loop's packed documents restart them) but their Mamba layers ignore
    # them: a packed document's logits differ from the document's alone. The probe says so, and only for them
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.train import PACKING_LEAK_TOLERANCE, packed_documents_leak

    torch.manual_seed(0)
    fields = {k: v for k, v in model.items() if k != "model_type"}
    built = AutoModelForCausalLM.from_config(AutoConfig.for_model(model["model_type"], **fields)).float().train()
    built.config._attn_implementation = attention
    leak = packed_documents_leak(built, ModelInputs.of(built))
    assert built.training and built.config._attn_implementation == attention  # left as it was
    batch = _packed_batch([[10, 14], [6, 18]])
    built.config._attn_implementation = "sdpa"  # flash attention's stand-in on the CPU (it ran with the bounds)
    built.eval()
    inputs, moved = ModelInputs.of(built), 0.0
    with torch.no_grad():
        logits = built(**inputs.kwargs(batch, labels=False), use_cache=False).logits
        for row, at in itertools.product(range(2), range(2)):
            doc = batch["seq_idx"][row] == at
            alone = built(input_ids=batch["input_ids"][row, doc][None], use_cache=False).logits[0]
            moved = max(moved, ((logits[row, doc] - alone).abs().max() / alone.abs().max()).item())
    meet = moved > PACKING_LEAK_TOLERANCE
    assert meet == (model in (JAMBA, BAMBA)), f"the case: packed documents meet in {model['model_type']}: {moved:.1e}"
    assert (leak > PACKING_LEAK_TOLERANCE) == meet, (leak, moved)


@pytest.mark.parametrize("model,packing,warned", [(JAMBA, True, True), (JAMBA, False, False), (LLAMA, True, False),
                                                  (ZOO_MAMBA, True, False)], ids=["jamba", "jamba-unpacked", "llama",
                                                                                  "zoo"])
def test_a_packed_run_of_a_model_whose_documents_meet_is_warned(tmp_path, capsys, model, packing, warned):
    # a transformers Jamba's packed documents met in its Mamba layers (state and convolution carried across), with no
    # word: the run now says so and names data.packing: false
    run = run_dict(tmp_path, data={"packing": packing}, train={"max_steps": 1, "grad_accum": 1},
                   schedule={"warmup_steps": 0})
    run["model"] = model
    train(config_from_dict(run))
    out = capsys.readouterr().out
    told = re.search(r"data\.packing: \w+ does not keep the documents of packed rows apart.*set data\.packing: false",
                     out)
    assert bool(told) == warned, out
    assert "could not check" not in out


def _tbptt_model(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import zoo

    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    else:  # MoE routing without its aux loss (test_moe_aux_loss_under_tbptt_equals_the_whole_rows checks that)
        extra = {"moe": {"every": 2, "offset": 1, "n_experts": 4, "top_k": 2, "aux_loss_coef": 0.0}} \
            if name == "jamba-tiny" else {}
        config = zoo.ZooConfig.from_yaml(ROOT / f"configs/models/{name}.yaml", vocab_size=260, **extra)
    return AutoModelForCausalLM.from_config(config).train()


def _grads(model, batch, chunk_len, mode):
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, batch, 1.0 / count_targets(batch["labels"]), ModelInputs.of(model),
                            chunk_len=chunk_len, mode=mode)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed_batch(lengths: list[list[int]]) -> dict[str, torch.Tensor]:
    """Rows of random documents with the given lengths, laid out as TextStream packs them."""
    rows = []
    for row in lengths:
        ids = torch.randint(0, 256, (sum(row),))
        seq_idx = torch.repeat_interleave(torch.arange(len(row), dtype=torch.int32), torch.tensor(row))
        position_ids = torch.cat([torch.arange(n) for n in row])
        labels = torch.where(position_ids == 0, IGNORE_INDEX, ids)
        rows.append({"input_ids": ids, "labels": labels, "seq_idx": seq_idx, "position_ids": position_ids})
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# the cache goes under the keyword the model's forward names (transformers' `cache` from 5.2x on: its deprecated
# `past_key_values` warns, and goes in 5.40)
@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("name,layout", [("llama", "one"), ("mamba-tiny", "one"), ("jamba-tiny", "one"),
                                         ("mamba-tiny", "packed"), ("jamba-tiny", "packed")],
                         ids=["llama", "mamba", "jamba", "mamba-packed", "jamba-packed"])
def test_exact_tbptt_gradients_equal_whole_row_gradients(name, layout):
    model, L, chunk = _tbptt_model(name), 48, 16
    if layout == "one":  # one document per row
        ids = torch.randint(0, 256, (2, L))
        batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(L).repeat(2, 1),
                 "seq_idx": torch.zeros(2, L, dtype=torch.int32)}
    else:  # packed rows: documents meet inside chunks (never at a chunk start, as TextStream ensures)
        batch = _packed_batch([[10, 25, 13], [30, 18]])
    loss, whole = _grads(model, batch, None, "exact")
    chunk_loss, exact = _grads(model, batch, chunk, "exact")
    assert_close("loss", chunk_loss, loss, 1e-6)
    assert exact.keys() == whole.keys()
    for n in whole:
        assert_close(n, exact[n], whole[n], 2e-5)
    detach_loss, detached = _grads(model, batch, chunk, "detach")
    assert_close("loss (detach)", detach_loss, loss, 1e-6)
    worst = max(((detached[n] - whole[n]).norm() / whole[n].norm()).item() for n in whole)
    assert worst > 1e-3, "detached chunks must lose the gradient through the carried state"


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("name", ["mamba-tiny", "mamba2-tiny", "gla-tiny", "jamba-tiny"])
def test_exact_tbptt_in_one_token_chunks_equals_whole_rows(name):
    """Rows without seq_idx (the synthetic tasks' batches) in chunks of one token (tbptt_chunk 1, allowed without
    packing): every chunk after the first is a decoding step from the leaf copies of its entering states. The
    recurrent layers' step updates its states in place, which autograd refuses on a leaf that requires grad: exact
    truncated BPTT ended in 'a leaf Variable that requires grad is being used in an in-place operation'."""
    model, L = _tbptt_model(name), 5
    ids = torch.randint(0, 256, (2, L))
    batch = {"input_ids": ids, "labels": ids.clone()}
    loss, whole = _grads(model, batch, None, "exact")
    chunk_loss, exact = _grads(model, batch, 1, "exact")
    assert_close("loss", chunk_loss, loss, 1e-6)
    assert exact.keys() == whole.keys()
    for n in whole:
        assert_close(n, exact[n], whole[n], 2e-5)


def test_exact_tbptt_recomputes_each_chunk_with_the_dropout_masks_of_its_first_forward():
    """The exact mode ran each chunk twice (without a graph for the boundary states, then again with one) and drew new
    dropout masks the second time: the gradients were of neither forward, with boundary states from other masks than
    the chunk's. Each recompute now restores the RNG state its first forward started from (as torch's checkpoint does):
    the gradients of one forward of the chunks with the graph kept across them, the RNG left where that forward leaves
    it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zoo.cache import output_cache
    from zoo.train import _chunk_loss

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}, attention_dropout=0.3)
    model, L, chunk = AutoModelForCausalLM.from_config(config).train(), 48, 16
    inputs = ModelInputs.of(model)
    ids = torch.randint(0, 256, (2, L))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(L).repeat(2, 1)}
    torch.manual_seed(1)
    cache, total = None, 0.0
    for start in range(0, L, chunk):  # the reference: one forward of the chunks, the graph kept across them
        out = model(**inputs.kwargs(batch, slice(start, start + chunk)), **{inputs.cache: cache}, use_cache=True)
        total = total + _chunk_loss(out, batch, start, start + chunk)[0]
        cache = output_cache(out)
    (total / count_targets(batch["labels"])).backward()
    kept = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng_after = torch.get_rng_state()
    torch.manual_seed(1)
    _, exact = _grads(model, batch, chunk, "exact")
    for n in kept:
        assert_close(n, exact[n], kept[n], 2e-5)
    assert torch.equal(torch.get_rng_state(), rng_after), "the next micro-batch draws what it would after one forward"


def test_moe_aux_loss_under_tbptt_equals_the_whole_rows(monkeypatch):
    """Each chunk added its own load-balancing loss times its inner targets: a regularizer of each chunk's balance
    (not the row's), the boundary targets' weight left out. The chunks now add up to the whole row's aux loss (loss
    and gradients, exact mode; the loss in detach mode), pads of an unpacked row counting for no expert."""
    import zoo

    torch.manual_seed(0)
    config = zoo.ZooConfig.from_yaml(ROOT / "configs/models/jamba-tiny.yaml", vocab_size=260,
                                     moe={"every": 2, "offset": 1, "n_experts": 4, "top_k": 2, "aux_loss_coef": 1.0})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).train()
    L, chunk = 48, 16
    ids = torch.randint(0, 256, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 37:] = 0  # an unpacked row's right pads
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
             "position_ids": torch.arange(L).repeat(2, 1), "seq_idx": torch.zeros(2, L, dtype=torch.int32)}
    loss, whole = _grads(model, batch, None, "exact")
    chunk_loss, exact = _grads(model, batch, chunk, "exact")
    assert_close("loss", chunk_loss, loss, 1e-6)
    for n in whole:
        assert_close(n, exact[n], whole[n], 2e-5)
    detach_loss, _ = _grads(model, batch, chunk, "detach")
    assert_close("loss (detach)", detach_loss, loss, 1e-6)


@pytest.mark.parametrize("mode", ["exact", "detach"])
def test_moe_aux_loss_under_tbptt_leaves_out_the_pads_that_keep_documents_off_chunk_boundaries(mode):
    """A packed row trained in chunks holds a pad wherever a document would start on a chunk boundary (TextStream's
    chunk_len): no target and predicting none, it is out of the cross entropy, but the rows have no attention_mask, so
    the router's balancing statistics (_RowAux) counted it as a token. Now its aux loss is the one over the row's
    other tokens (loss and, in exact mode, gradients)."""
    from transformers import AutoModelForCausalLM

    import zoo
    from zoo.layers import load_balancing_loss

    torch.manual_seed(0)
    config = zoo.ZooConfig.from_yaml(ROOT / "configs/models/jamba-tiny.yaml", vocab_size=260,
                                     moe={"every": 1, "n_experts": 4, "top_k": 1, "aux_loss_coef": 1.0,
                                          "normalize_topk": False})
    model = AutoModelForCausalLM.from_config(config).train()
    with torch.no_grad():  # decisive routing: a random router spreads the tokens almost evenly at any count of them
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(20)
    L, chunk = 48, 8
    # as TextStream lays out a packed row with chunk_len 8: documents of 8, 15 and 7 tokens each end on a chunk
    # boundary, so a pad (labels -100, in the ending document) starts the chunk and the next document follows it; the
    # last document runs to the row's end
    docs, pads = [8, 15, 7, 16], [8, 24, 32]
    ids = torch.randint(0, 256, (1, L))
    seq_idx = torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), torch.tensor(docs) + 1)[:L]
    position_ids = torch.cat([torch.arange(n + 1) for n in docs])[:L]
    ids[0, pads] = 256  # the byte tokenizer's pad
    labels = torch.where(position_ids == 0, IGNORE_INDEX, ids)
    labels[0, pads] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "seq_idx": seq_idx[None], "position_ids": position_ids[None]}
    n = count_targets(labels)

    model.zero_grad(set_to_none=True)  # the objective with the pads out of the balancing statistics
    out = model(input_ids=ids, labels=labels, seq_idx=batch["seq_idx"], position_ids=batch["position_ids"],
                output_router_logits=True)
    routed = torch.ones(1, L)
    routed[0, pads] = 0
    spec = config.moe_spec()
    aux_ref = load_balancing_loss(out.router_logits, spec["n_experts"], spec["top_k"], routed)
    assert abs(aux_ref - out.aux_loss) > 1e-4, "the pads move the aux loss (beyond the tolerance below)"
    (out.loss - out.aux_loss + aux_ref).backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    aux: list[torch.Tensor] = []
    forward_backward(model, batch, 1.0 / n, ModelInputs.of(model), chunk_len=chunk, mode=mode, aux=aux)
    assert_close("aux part", sum(aux), aux_ref.detach(), 1e-5)
    if mode == "exact":
        for name in ref:
            if "router" in name:
                assert_close(name, model.get_parameter(name).grad, ref[name], 2e-5)


def test_chunked_run_matches_whole_row_run(tmp_path):
    """The trainer's exact-TBPTT path (chunked training + chunked evaluation) follows whole-row training."""
    runs = {}
    for name, chunk in (("whole", None), ("chunked", 16)):
        cfg = config_from_dict(run_dict(tmp_path / name, data={"packing": False},
                                        train={"max_steps": 3, "tbptt_chunk": chunk, "precision": "fp32"},
                                        eval={"every": 3, "batches": 1}))
        losses: dict[int, float] = {}
        result = train(cfg, on_step=lambda s, m, out=losses: out.__setitem__(s, m["loss"]))
        runs[name] = ([losses[s] for s in (1, 2, 3)], result.evals[-1]["eval/loss"])
    (whole, whole_eval), (chunked, chunked_eval) = runs["whole"], runs["chunked"]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(whole, chunked)), (whole, chunked)
    assert math.isclose(whole_eval, chunked_eval, rel_tol=1e-5)


def test_chunks_under_gradient_checkpointing_are_refused_where_the_layers_drop_their_cache(tmp_path):
    """transformers' checkpointed layers drop the cache in a training forward (use_cache=False, cache=None): rows in
    chunks failed at the first step, in the model (a mask longer than the chunk) or with a message blaming the model's
    cache. Now refused before training, naming both fields; zoo models keep their state under checkpointing."""
    sections = {"data": {"packing": False}, "train": {"max_steps": 1, "tbptt_chunk": 16, "precision": "fp32",
                                                      "gradient_checkpointing": True},
                "schedule": {"warmup_steps": 0}}
    with pytest.raises(ValueError, match=r"train\.gradient_checkpointing: LlamaForCausalLM's layers "
                                         r"\(LlamaDecoderLayer\) drop their cache.*tbptt_chunk: null"):
        train(config_from_dict(run_dict(tmp_path / "llama", **sections)))
    losses = []
    for checkpointing in (False, True):
        cfg = config_from_dict(run_dict(tmp_path / f"zoo-{checkpointing}", **_merge(sections, {
            "model": "configs/models/mamba-tiny.yaml", "model_overrides": {"vocab_size": 260},
            "train": {"gradient_checkpointing": checkpointing}})))
        train(cfg, on_step=lambda s, m: losses.append(m["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_resume_of_a_checkpoint_from_before_the_text_keyed_holdout_says_it_is_not_exact(tmp_path, capsys):
    # The held-out documents of local files were chosen by row index, now by text: a checkpoint written before that
    # resumes on another split and another document at its saved position, which is said (its trainer_state has no
    # holdout_key); a checkpoint of this version, or a run on the built-in corpus (split by file), resumes silently.

    pytest.importorskip("datasets")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    cfg = config_from_dict(run_dict(tmp_path, data={"source": str(docs), "holdout": 0.2},
                                    train={"max_steps": 2}, schedule={"warmup_steps": 0}, checkpoint={"every": 2}))
    train(cfg)
    state_path = latest_checkpoint(cfg.output_dir) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state.pop("holdout_key") == "text"
    capsys.readouterr()
    cfg.train.max_steps = 3
    train(cfg, resume="auto")
    assert "predates the held-out split" not in capsys.readouterr().out
    rewrite_trainer_state(cfg.output_dir, lambda state: state.pop("holdout_key"))
    cfg.train.max_steps = 4
    train(cfg, resume="auto")
    assert "predates the held-out split keyed by each document's text" in capsys.readouterr().out


def test_resume_refuses_another_data_order_and_names_the_other_changes(tmp_path):
    from zoo.train import resume_changes

    cfg = config_from_dict(run_dict(tmp_path))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert resume_changes(ckpt, config_from_dict(run_dict(tmp_path / "elsewhere"))) == []  # output_dir ignored
    longer = config_from_dict(run_dict(tmp_path, train={"max_steps": 12}, data={"seq_len": 128}))
    assert resume_changes(ckpt, longer) == ["data.seq_len: 64 -> 128", "train.max_steps: 6 -> 12"]
    # train.seed was listed as though it applied, but load_state restores the run's random state over it
    reseeded = config_from_dict(run_dict(tmp_path, train={"seed": 7}))
    assert resume_changes(ckpt, reseeded) == ["train.seed: 0 -> 7 (no effect: the checkpoint's weights and random "
                                              "state are restored)"]
    # streaming changes a dataset's document order (a buffer shuffle, not a permutation), which the saved doc indexes
    for sections, field in [({"data": {"seed": 1}}, "data.seed"), ({"tokenizer": "gpt2"}, "tokenizer"),
                            ({"data": {"streaming": False}}, "data.streaming"),
                            ({"model": dict(LLAMA, hidden_size=64)}, "model.hidden_size")]:
        with pytest.raises(ValueError, match=rf"another model, tokenizer or data order \({field}: "):
            resume_changes(ckpt, config_from_dict(run_dict(tmp_path, **sections)))
    assert resume_changes(tmp_path, cfg) == []  # no saved config: nothing to compare


def test_resume_reads_a_field_added_since_the_checkpoint_as_its_default(tmp_path):
    """A checkpoint written before a data field existed (data.sample_by) lacks it: read as "<unset>", every such
    checkpoint was refused as trained with another data order. It reads as the field's default now; set otherwise,
    it is still a change of data order."""
    from zoo.train import resume_changes

    cfg = config_from_dict(run_dict(tmp_path))
    saved = cfg.to_dict()
    del saved["data"]["sample_by"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "train_config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert resume_changes(ckpt, cfg) == []
    with pytest.raises(ValueError, match=r"data order \(data\.sample_by: 'document' -> 'line'"):
        resume_changes(ckpt, config_from_dict(run_dict(tmp_path, data={"sample_by": "line"})))


def test_one_txt_file_too_short_to_hold_out_names_sample_by(tmp_path):
    """One .txt file is one document: the held-out split has nothing to divide, and the refusal says which setting
    splits it."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    text = tmp_path / "input.txt"
    text.write_text("\n".join(f"line {i} of the only file" for i in range(200)))
    cfg = config_from_dict(run_dict(tmp_path, data={"source": str(text), "holdout": 0.2}, eval={"every": 2}))
    with pytest.raises(ValueError, match=r"data\.sample_by 'paragraph' or 'line' splits them"):
        train(cfg)
    cfg = config_from_dict(run_dict(tmp_path, data={"source": str(text), "holdout": 0.2, "sample_by": "line"},
                                    eval={"every": 2}))
    train(cfg)  # 200 one-line documents: about 40 held out, enough for a row


def test_resume_refuses_a_model_changed_behind_its_yaml_path(tmp_path, capsys):
    """The run names its model by a YAML path, as every shipped config does: editing that file in place changes
    no run field, so the weights are compared (before, the resumed run crashed loading the state dict). The same
    model under another path resumes, and says the path changed."""
    model = {"vocab_size": 259, "d_model": 32, "layers": "MA", "ffn": "none",
             "mixers": {"M": {"type": "mamba", "d_state": 4}, "A": {"type": "attention", "n_heads": 2}}}
    model_path, moved = tmp_path / "model.yaml", tmp_path / "moved.yaml"
    model_path.write_text(yaml.safe_dump(model))
    moved.write_text(yaml.safe_dump(model))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, model=str(model_path), train={"max_steps": 1},
                                            schedule={"warmup_steps": 0})))
    assert main([str(path)]) == 0
    model_path.write_text(yaml.safe_dump({**model, "d_model": 48}))
    with pytest.raises(ValueError, match=r"was trained with another model: \d+ weights differ \(model\.embeddings"
                                         r"\.weight: \[259, 32\] -> \[259, 48\]"):
        main([str(path), "--resume", "--train.max_steps=2"])
    capsys.readouterr()
    assert main([str(path), "--resume", "--train.max_steps=2", f"--model={moved}"]) == 0
    assert "moved.yaml" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"


def test_resume_with_other_weight_decay_groups_names_the_option(tmp_path):
    # A run saved with no_decay_1d false (the old default) resumed under the new default: torch's load_state_dict
    # said only "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, optim={"no_decay_1d": False})))
    with pytest.raises(ValueError, match=r"--resume: .*optim\.no_decay_1d=true.*\(optim\.no_decay_1d: false, "
                                         r"optim\.no_decay_embeddings: false\)"):
        train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4})), resume="auto")
    result = train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4}, optim={"no_decay_1d": False})),
                   resume="auto")
    assert result.step == 4


def test_resume_applies_changed_weight_decay_betas_and_eps(tmp_path, monkeypatch):
    # --resume listed "optim.weight_decay: 0.1 -> 0.0" among the changes it accepted, but loading the optimizer state
    # restored the checkpoint's weight decay, betas and eps, and the run went on with those (lr alone was re-set)
    steps = {"warmup_steps": 0}
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule=steps)))
    seen = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, schedule=steps,
                                    optim={"weight_decay": 0.05, "betas": [0.8, 0.9], "eps": 1e-6})), resume="auto")
    assert seen == [[(0.05, (0.8, 0.9), 1e-6), (0.0, (0.8, 0.9), 1e-6)]], seen


@pytest.mark.parametrize("before, after", [(False, True), (True, False)])
def test_resume_applies_a_changed_fused_adamw(tmp_path, monkeypatch, capsys, before, after):
    # --resume listed "optim.fused: False -> True" and run_info.json said fused_adamw true, but loading the optimizer
    # state restored the checkpoint's groups' fused flag, and the run stepped as the checkpoint's had (as it did when a
    # run saved on one device resumed on another under 'auto')
    steps = {"warmup_steps": 0}
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule=steps, optim={"fused": before})))
    seen = adamw_steps(monkeypatch, lambda group: bool(group["fused"]))
    capsys.readouterr()
    result = train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4}, schedule=steps,
                                             optim={"fused": after})), resume="auto")
    assert f"optim.fused: {before} -> {after}" in capsys.readouterr().out
    assert result.step == 4 and seen == [[after, after]] * 2, seen
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["fused_adamw"] is after
    assert all(math.isfinite(v) for v in result.losses.values())


def test_resume_past_max_steps_is_refused_naming_it(tmp_path):
    # a checkpoint at step 4 resumed with max_steps 3 returned at once: nothing trained or saved, and no word
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4})))
    with pytest.raises(ValueError, match=r"train\.max_steps: 3 is below the step of .*step_00000004 \(4\)"):
        train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3})), resume="auto")
    assert train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4})), resume="auto").step == 4  # done: fine


def test_resume_of_a_run_with_no_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 1}, schedule={"warmup_steps": 0})))
    assert main([str(path), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step_00000001"


def test_a_checkpoint_trained_without_bos_is_prompted_without_it(tmp_path, monkeypatch, capsys):
    # data.add_bos false trains on documents without <bos>, but the checkpoint did not say so and zoo generate started
    # every prompt with <bos> (257 of the byte tokenizer), a start the model never saw
    from transformers import LlamaForCausalLM

    from zoo import cli

    seen = []
    original = LlamaForCausalLM.generate

    def generate(self, input_ids=None, **kwargs):
        seen.append(input_ids[0].tolist())
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    for add_bos in (False, True):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run_dict(tmp_path, output_dir=str(tmp_path / f"run-{add_bos}"),
                                                data={"add_bos": add_bos}, train={"max_steps": 1},
                                                schedule={"warmup_steps": 0})))
        assert main([str(path)]) == 0
        model = latest_checkpoint(tmp_path / f"run-{add_bos}") / "model"
        cli.main(["generate", str(model), "hi", "--max-new-tokens", "1", "--device", "cpu"])
    assert seen == [[ord("h"), ord("i")], [257, ord("h"), ord("i")]]


def test_resume_flag_before_the_config_takes_the_config(tmp_path, capsys):
    """`zoo train --resume CONFIG`: --resume's optional DIR swallowed the YAML, and argparse said 'config required'.
    A .yaml given as the resume folder is the config; the run resumes its newest checkpoint."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 1}, schedule={"warmup_steps": 0})))
    assert main(["--resume", str(path)]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step_00000001"
    with pytest.raises(SystemExit):
        main(["--resume"])
    assert "required: config" in capsys.readouterr().err


def test_trackers_are_checked_before_the_run(tmp_path):
    import importlib.util

    with pytest.raises(ValueError, match=r"log\.trackers: unknown tracker 'tensorbord'"):
        config_from_dict(run_dict(tmp_path, log={"trackers": ["csv", "tensorbord"]}))
    # (a tracker twice: two TensorBoard trackers wrote every event twice into one folder)
    with pytest.raises(ValueError, match=r"log\.trackers: 'tensorboard' given more than once"):
        config_from_dict(run_dict(tmp_path, log={"trackers": ["tensorboard", "csv", "tensorboard"]}))
    missing = next((t for t in ("wandb", "mlflow", "aim", "clearml") if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("every tracker tried is installed here")
    with pytest.raises(ValueError, match=rf"log\.trackers: '{missing}' needs `pip install {missing}`"):
        config_from_dict(run_dict(tmp_path, log={"trackers": [missing]}))


def test_resume_after_a_kill_past_the_last_checkpoint_logs_each_step_once(tmp_path):
    # checkpoint at step 4, metrics logged to step 6, then (as after a kill) the run resumes from step 4
    cfg = config_from_dict(run_dict(tmp_path, log={"every": 1}, checkpoint={"every": 4, "final": False}))
    assert train(cfg).checkpoint.name == "step_00000004"
    train(cfg, resume="auto")
    with open(tmp_path / "run" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6], "steps 5 and 6 logged by the killed run must not appear twice"


@pytest.mark.parametrize("when", ["new_column", "resume"])
def test_a_kill_while_metrics_csv_is_rewritten_keeps_its_rows(tmp_path, monkeypatch, when):
    # metrics.csv is rewritten whole when a metric first appears (the first eval's columns) and when a resumed run
    # drops the rows past its checkpoint: rewritten in place, a kill mid-write left it empty but for the header
    from zoo.train import _csv_tracker_class, _drop_metrics_after

    path = tmp_path / "metrics.csv"
    tracker = _csv_tracker_class()(path)
    for step in (1, 2, 3):
        tracker.log({"loss": 1.0 / step}, step=step)
    before = path.read_text()

    def killed(self, rows):
        raise _Killed

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(_Killed):
        if when == "new_column":
            tracker.log({"eval/loss": 0.5}, step=3)
        else:
            _drop_metrics_after(path, 2)
    monkeypatch.undo()
    assert path.read_text() == before
    with open(path, newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_resume_hides_the_killed_runs_tensorboard_steps_past_its_checkpoint(tmp_path):
    # as above, for TensorBoard: its event files are only appended to, so the resumed run must mark steps >= 5 of
    # the first run's file as purged (SummaryWriter's purge_step), or every curve has steps 5 and 6 twice
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict(run_dict(tmp_path, log={"every": 1, "trackers": ["tensorboard"]},
                                    checkpoint={"every": 4, "final": False}))
    train(cfg)
    first = {e.step: e.value for e in _tb_scalars(tmp_path, EventAccumulator)}
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    train(cfg, resume="auto")
    events = _tb_scalars(tmp_path, EventAccumulator)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6], "each step once, the resumed run's 5 and 6"
    assert [e.value for e in events] == [first[s] for s in range(1, 7)], "resume is bit-exact on CPU"


def test_a_run_started_again_without_a_checkpoint_hides_the_killed_runs_tensorboard_steps(tmp_path, capsys):
    # killed before its first checkpoint, a run started again from step 0 (--resume finds none, and says so):
    # metrics.csv dropped the killed run's rows, but TensorBoard showed every step twice, the killed run's beside the
    # new one's
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict(run_dict(tmp_path, log={"every": 1, "trackers": ["csv", "tensorboard"]},
                                    checkpoint={"every": 0, "final": False}))
    assert not train(cfg).checkpoint
    first = {e.step: e.value for e in _tb_scalars(tmp_path, EventAccumulator)}
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert main([str(_write_yaml(tmp_path, cfg)), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    events = _tb_scalars(tmp_path, EventAccumulator)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6], "each step once, the new run's"
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def _write_yaml(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _tb_scalars(tmp_path, accumulator_class):
    acc = accumulator_class(str(tmp_path / "run" / "tensorboard"))  # the scalars' event files (hparams: subfolders)
    acc.Reload()
    return acc.Scalars("loss")


def test_held_out_text_shorter_than_a_row_is_refused_before_training(tmp_path):
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    docs = tmp_path / "docs.jsonl"  # 20 documents of 3 bytes: the 5 held out (bos + eos: 25 tokens) fill no row
    docs.write_text("".join(f'{{"text": "d{i:02d}"}}\n' for i in range(20)))
    cfg = config_from_dict(run_dict(tmp_path, data={"source": str(docs), "holdout": 0.2}, eval={"every": 2}))
    steps: list[int] = []
    with pytest.raises(ValueError, match=r"data: the evaluation documents fill no row of data\.seq_len=64"):
        train(cfg, on_step=lambda s, m: steps.append(s))
    assert steps == [], "refused before the first step, not reported as eval/loss 0"


def test_train_script_reports_bad_input_in_one_line_like_zoo_train(tmp_path):
    # `accelerate launch scripts/train.py CONFIG` runs this file; a bad data source fails at run time, past argparse
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, data={"source": str(tmp_path / "missing.jsonl")})))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "zoo train: data.source: no file matches" in proc.stderr and "Traceback" not in proc.stderr


def test_a_multi_process_launch_that_accelerate_runs_as_lone_processes_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --config_file configs/accelerate/ddp.yaml` (or torchrun) on a machine without GPUs: each
    # process saw a world of 1 and trained the whole run into the same output_dir (duplicated metrics, raced saves)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"processes: launched as 2 processes .* ACCELERATE_USE_CPU=1"):
        train(config_from_dict(run_dict(tmp_path)))
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_accelerate_launch_cpu_with_several_processes_started_alone_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --cpu --num_processes 2` starts one process (its simple launcher, which leaves the others to
    # mpirun), with ACCELERATE_USE_CPU and MASTER_ADDR set and no WORLD_SIZE: the run trained alone at half the batch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match=r"processes: `accelerate launch --cpu --num_processes N` started this process "
                                         r"alone .* configs/accelerate/ddp\.yaml"):
        train(config_from_dict(run_dict(tmp_path)))
    assert not (tmp_path / "run").exists(), "refused before anything is written"
    monkeypatch.delenv("MASTER_ADDR")  # `accelerate launch --cpu` (one process) trains
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3})))
    # and so does a plain `ACCELERATE_USE_CPU=1 zoo train` in a shell that exports MASTER_ADDR (a cluster job's):
    # not launched by accelerate, whose launcher writes its --cpu flag as "True"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    train(config_from_dict(run_dict(tmp_path / "plain", train={"max_steps": 3})))


def test_a_resume_under_fp16_of_a_run_without_a_loss_scale_starts_a_new_one(tmp_path, monkeypatch, capsys):
    # a run trained in bf16 (or fp32) and resumed under fp16 (`accelerate launch --mixed_precision fp16` under auto, on
    # a GPU) died in accelerate's load_state: FileNotFoundError for the checkpoint's scaler.pt, which it never saved.
    # (This CPU machine has no fp16 autocast: the resumed run's Accelerator is given a loss scaler as fp16's is. Both
    # runs on the CPU, a GPU machine's too: there the first one trained in bf16, under auto.)
    import accelerate

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 1})))

    class WithScaler(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(accelerate, "Accelerator", WithScaler)
    capsys.readouterr()
    result = train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, schedule={"warmup_steps": 1})),
                   resume="auto")
    assert result.step == 3
    assert "holds no fp16 loss scale (its run trained in fp32): the loss scale starts at its initial value" in \
        capsys.readouterr().out
    assert (latest_checkpoint(tmp_path / "run") / "accelerate" / "scaler.pt").is_file()  # the next resume loads it


def test_a_cpu_run_after_a_gpu_run_in_the_same_process_trains(tmp_path, monkeypatch):
    # train() forgot the AcceleratorState of an earlier run but kept its PartialState, whose device the first run fixed:
    # ACCELERATE_USE_CPU=1 after a run on the GPU (a notebook, the test suite on a GPU machine) was refused with
    # "AcceleratorState has already been initialized and cannot be changed". (On this CPU machine the earlier run's
    # GPU device is written into the PartialState that a run on the GPU would have left.)
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    try:
        PartialState()
        PartialState._shared_state["device"] = torch.device("cuda", 0)
        result = train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3})))
        assert result.step == 3 and PartialState().device.type == "cpu"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains under autocast on a GPU")
def test_fp16_on_cpu_is_refused_not_trained_in_fp32_under_its_name(tmp_path):
    # accelerate takes mixed_precision fp16 on CPU without autocast or a grad scaler: the run trained in fp32 (the
    # same losses as precision fp32) while its banner and run_info.json said fp16
    with pytest.raises(ValueError, match=r"train\.precision: fp16 has no autocast on cpu .* use bf16"):
        train(config_from_dict(run_dict(tmp_path, train={"precision": "fp16"})))
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_the_launchs_mixed_precision_is_taken_under_auto_and_another_explicit_one_refused(tmp_path, monkeypatch):
    # `accelerate launch --mixed_precision bf16` (or its config file's mixed_precision) hands the processes
    # ACCELERATE_MIXED_PRECISION; the Accelerator's argument overrode it, so the launch's bf16 trained in fp32 unsaid
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    train(config_from_dict(run_dict(tmp_path / "auto", train={"max_steps": 3})))
    assert json.loads((tmp_path / "auto" / "run" / "run_info.json").read_text())["precision"] == "bf16"
    with pytest.raises(ValueError, match=r"train\.precision: fp32, but the launch asks for bf16"):
        train(config_from_dict(run_dict(tmp_path / "fp32", train={"max_steps": 3, "precision": "fp32"})))
    assert not (tmp_path / "fp32").exists(), "refused before anything is written"
    if not torch.cuda.is_available():  # the launch's fp16 under auto: refused on CPU as train.precision fp16 is
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        with pytest.raises(ValueError, match=r"train\.precision: auto takes the launch's fp16, which has no autocast"):
            train(config_from_dict(run_dict(tmp_path / "fp16", train={"max_steps": 3})))


def test_a_resume_under_another_launch_precision_names_the_change(tmp_path, monkeypatch, capsys):
    # train.precision auto takes the launch's: a run trained under `accelerate launch --mixed_precision bf16` and
    # resumed under `--mixed_precision no` went on in fp32 without a word (its train_config.yaml said auto both times)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 1})))
    assert json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["precision"] == "bf16"
    capsys.readouterr()
    # (a launch's "no" is fp32 on a CPU; on a GPU, where auto is bf16 and accelerate launch writes "no" when it is not
    # given a precision, the launch asks for fp16 instead)
    other = "fp16" if torch.cuda.is_available() else "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", other)
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, schedule={"warmup_steps": 1})), resume="auto")
    out = capsys.readouterr().out
    assert re.search(rf"--resume: changed since step_00000002: .*mixed precision .*'bf16' -> '{other}'", out), out
    assert "train.max_steps: 2 -> 3" in out
    capsys.readouterr()
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 4}, schedule={"warmup_steps": 1})),
          resume="auto")  # the same precision again: not listed
    assert "mixed precision" not in capsys.readouterr().out


def _launch_two(config: Path, *extra: str, launcher: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py CONFIG` on CPU (gloo); with
    `launcher`, a script that runs scripts/train.py (its first argument) after patching the processes."""
    env = cpu_launch_env()
    cmd = accelerate_launch("ddp", *([str(launcher)] if launcher else []), str(ROOT / "scripts" / "train.py"),
                            str(config), *extra)
    return run_launch(cmd, env)


def test_two_processes_train_and_resume_exactly_under_accelerate_launch(tmp_path):
    # The README's multi-process command on CPU (gloo): both processes join one run (2 x the tokens per step), and
    # a run stopped at step 3 and resumed with --resume logs the same losses and ends with the same weights as the
    # uninterrupted run (each process's data position restored).

    from safetensors.torch import load_file

    pytest.importorskip("datasets")  # a local .jsonl source is read with it (the dev extra installs it)

    import random

    rng = random.Random(0)  # short documents of unequal lengths, so the two processes stand at different places
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "".join(rng.choices("abcdefgh \n", k=rng.randint(20, 200)))}) + "\n"
                            for _ in range(400)))

    def config(name: str, steps: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run_dict(tmp_path / name, train={"max_steps": steps},
                                                data={"source": str(docs)},
                                                schedule={"kind": "constant", "warmup_steps": 2},
                                                log={"every": 1}, checkpoint={"every": 3})))
        return path

    full = _launch_two(config("full", 6))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "512 tokens/step (2 x 2 x 64 x 2)" in full.stdout + full.stderr
    info = json.loads((tmp_path / "full" / "run" / "run_info.json").read_text())
    assert info["processes"] == 2 and info["tokens_per_step"] == 512
    part = config("part", 3)
    first = _launch_two(part)
    assert first.returncode == 0, first.stderr[-3000:]
    part.write_text(part.read_text().replace("max_steps: 3", "max_steps: 6"))
    second = _launch_two(part, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]

    def losses(name):
        with open(tmp_path / name / "run" / "metrics.csv") as f:
            return [(int(r["step"]), float(r["loss"]), int(float(r["tokens"]))) for r in csv.DictReader(f)]

    assert [s for s, _, _ in losses("full")] == [1, 2, 3, 4, 5, 6]
    assert losses("part") == losses("full")
    a = load_file(latest_checkpoint(tmp_path / "full" / "run") / "model" / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "part" / "run") / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ after a two-process resume"


_SLOW_RANK_1 = """
import runpy, sys, time
import accelerate.accelerator as acc

_save = acc.save_accelerator_state


def slow(output_dir, *args, **kwargs):  # process 1 writes its part of the accelerate state 3 s late
    if args[4] == 1:  # process_index
        time.sleep(3)
    return _save(output_dir, *args, **kwargs)


acc.save_accelerator_state = slow
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def test_a_checkpoint_is_published_once_every_process_has_written_its_part(tmp_path):
    # accelerate's save_state ends without a barrier: the main process renamed the temporary folder into place and
    # pointed `latest` at it while another process was still writing its RNG state there (that process then failed
    # on the vanished folder, and the published checkpoint lacked its random_states_1.pkl, so no resume could load it)
    launcher = tmp_path / "slow_rank_1.py"
    launcher.write_text(_SLOW_RANK_1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 3})))
    proc = _launch_two(path, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = latest_checkpoint(tmp_path / "run") / "accelerate"
    assert sorted(p.name for p in saved.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]


def test_two_processes_evaluate_as_many_batches_each(tmp_path):
    # Each process reads its own share of the held-out documents, so their eval rows differ in number: a process
    # with more batches ran more forwards, which under FSDP (every forward gathers the weights) waits forever for
    # the others. Every process now evaluates the fewest batches any has: eval/loss is the mean over those rows.

    from transformers import AutoModelForCausalLM

    from zoo.data.text import TextStream, _in_holdout, load_tokenizer

    pytest.importorskip("datasets")

    def text(i: int, long: bool, held_out: bool) -> str:  # the holdout is keyed by the text: salt it to one side
        return next(t for salt in itertools.count()
                    if _in_holdout(t := f"{i}.{salt} " + "xy" * (150 if long else 10), 0.3) == held_out)

    held = [i for i in range(60) if _in_holdout(str(i), 0.3)]
    docs = tmp_path / "docs.jsonl"  # long held-out documents in process 0's share, short ones in process 1's
    docs.write_text("".join(json.dumps({"text": text(i, i in held[0::2], i in held)}) + "\n" for i in range(60)))
    run = run_dict(tmp_path, data={"source": str(docs), "holdout": 0.3, "shuffle": False},
                   eval={"every": 4, "batches": 8}, train={"max_steps": 4})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    cfg = config_from_dict(run)
    tokenizer = load_tokenizer("byte")
    shares = [list(TextStream(cfg.data, tokenizer, "eval", rank, 2).batches(2)) for rank in range(2)]
    fewest = min(len(s) for s in shares)
    assert fewest < cfg.eval.batches < len(shares[0]), "the case: process 0 has more eval batches than process 1"

    proc = _launch_two(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.csv") as f:
        logged = [float(r["eval/loss"]) for r in csv.DictReader(f) if r["eval/loss"]]
    model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "run") / "model").eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch, _ in [b for share in shares for b in share[:fewest]]:
            k = count_targets(batch["labels"])
            # use_cache=False as the run's eval: transformers keeps packed documents apart (position_ids that
            # restart) only without a cache; with one, attention crosses documents (2e-4 off on these rows)
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        use_cache=False)
            total, n = total + float(out.loss) * k, n + k
    # the reloaded model's loss is the run's to float rounding; all 8 of process 0's batches: 1.5e-3 off
    assert logged == [pytest.approx(total / n, rel=1e-5)], (logged, total / n)


def test_two_processes_weigh_every_target_token_alike_as_one_process_does(tmp_path):
    # The loss and its gradient are means over the step's target tokens of all processes (transformers' Trainer with
    # average_tokens_across_devices): each process divided by its own targets and DDP averaged the processes, so a
    # short document's tokens weighed as much as a long one's whole row (here 4x) and the logged loss was a mean of
    # per-process means. Two processes with one row each train as one process with both rows in its batch.

    pytest.importorskip("datasets")
    docs = tmp_path / "docs.jsonl"  # unpacked rows: process 0 gets the short documents, process 1 the long ones
    docs.write_text("".join(json.dumps({"text": "ab" * (2 if i % 2 == 0 else 24)}) + "\n" for i in range(40)))

    def run(name: str, micro_batch_size: int) -> dict:
        return run_dict(tmp_path / name, data={"source": str(docs), "holdout": 0.0, "shuffle": False,
                                               "packing": False},
                        train={"max_steps": 3, "micro_batch_size": micro_batch_size, "grad_accum": 1},
                        schedule={"kind": "constant", "warmup_steps": 0}, log={"every": 1})

    def losses(name: str) -> list[float]:
        with open(tmp_path / name / "run" / "metrics.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    train(config_from_dict(run("one", 2)))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(run("two", 1)))
    proc = _launch_two(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses("two") == pytest.approx(losses("one"), rel=1e-4), (losses("two"), losses("one"))


def test_grad_accum_weighs_every_target_token_alike_as_one_micro_batch_does(tmp_path):
    """The step's loss and gradient are a mean over the targets of all its micro-batches: two micro-batches of one
    row each (a short document, then a long one) train as one micro-batch holding both rows. A step scaled by one
    micro-batch's targets, or a mean of the micro-batches' means (the short document's few tokens weighing as much as
    the long one's), logs and trains otherwise."""
    pytest.importorskip("datasets")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "ab" * (2 if i % 2 == 0 else 24)}) + "\n" for i in range(40)))

    def losses(name: str, micro_batch_size: int, grad_accum: int) -> list[float]:
        run = run_dict(tmp_path / name, data={"source": str(docs), "holdout": 0.0, "shuffle": False,
                                              "packing": False},
                       train={"max_steps": 3, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum},
                       schedule={"kind": "constant", "warmup_steps": 0}, log={"every": 1})
        train(config_from_dict(run))
        with open(tmp_path / name / "run" / "metrics.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    assert losses("accumulated", 1, 2) == pytest.approx(losses("one", 2, 1), rel=1e-4)


def test_two_processes_train_resume_and_save_under_fsdp2(tmp_path):
    # configs/accelerate/fsdp.yaml (FSDP2 over the Blocks, sharded accelerate state) on two CPU processes, on the
    # MoE hybrid with tied embeddings: a run resumed from its step-2 checkpoint (sharded weights and optimizer) logs the
    # same losses and ends with the same weights as the uninterrupted run, and model/ (gathered on the main process)
    # reloads with from_pretrained, tied, equal to the sharded training weights. FSDP gathered the tied lm_head and
    # embedding weights into two tensors, and model/ stored the embedding twice (DDP's save stores it once).
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    def config(name: str, steps: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run_dict(
            tmp_path / name, model=str(ROOT / "configs" / "models" / "jamba-tiny.yaml"), data={"seq_len": 32},
            train={"max_steps": steps, "prefetch": 1}, schedule={"kind": "constant", "warmup_steps": 1},
            log={"every": 1, "trackers": ["csv"], "progress_bar": False}, checkpoint={"every": 2})))
        return path

    def losses(name):
        with open(tmp_path / name / "run" / "metrics.csv") as f:
            return {int(r["step"]): (float(r["loss"]), float(r["grad_norm"])) for r in csv.DictReader(f)}

    full = launch_fsdp_on_cpu(tmp_path, "scripts/train.py", str(config("full", 4)))
    assert full.returncode == 0, full.stderr[-3000:]
    step2, step4 = (tmp_path / "full" / "run" / "checkpoints" / f"step_0000000{k}" for k in (2, 4))
    assert (step4 / "accelerate" / "pytorch_model_fsdp_0" / ".metadata").is_file(), "not run as FSDP"
    part = launch_fsdp_on_cpu(tmp_path, "scripts/train.py", str(config("part", 4)), f"--resume={step2}")
    assert part.returncode == 0, part.stderr[-3000:]
    assert list(losses("part")) == [3, 4] and all(losses("part")[k] == losses("full")[k] for k in (3, 4))
    assert all(norm > 1.0 for _, norm in losses("full").values()), "the case: gradients clipped (grad_clip 1.0)"
    a = load_file(step4 / "model" / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "part" / "run") / "model" / "model.safetensors")
    assert "lm_head.weight" not in a, "the tied embedding saved twice"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after an FSDP resume"
    dcp_to_torch_save(step4 / "accelerate" / "pytorch_model_fsdp_0", tmp_path / "sharded.pt")
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)["model"]
    model = AutoModelForCausalLM.from_pretrained(step4 / "model")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    state = model.state_dict()
    assert sharded.keys() <= state.keys() and all(torch.equal(state[k], v) for k, v in sharded.items())


def test_fused_adamw_auto_follows_the_training_device_not_where_the_weights_lie_when_built():
    """Under FSDP the optimizer is built before accelerate moves the weights to their GPU: 'auto' read the weights'
    device (the CPU), so FSDP runs trained with the unfused AdamW. It now follows the device the run trains on."""
    from zoo.train import OptimConfig, build_optimizer

    model = torch.nn.Linear(4, 4)  # on the CPU, as under FSDP before accelerate.prepare
    assert build_optimizer(model, OptimConfig(), device=torch.device("cuda", 0)).defaults["fused"] is True
    assert not build_optimizer(model, OptimConfig(), device=torch.device("cpu")).defaults["fused"]
    assert not build_optimizer(model, OptimConfig()).defaults["fused"], "no device: where the weights lie"
    assert not build_optimizer(model, OptimConfig(fused=False), device=torch.device("cuda")).defaults["fused"]


@pytest.mark.cuda
@pytest.mark.parametrize("gpus", [1, 2], ids=["one_gpu", "two_gpus"])
def test_fsdp_on_gpus_trains_fused_and_resumes_exactly(tmp_path, gpus):
    # configs/accelerate/fsdp.yaml on the GPUs (NCCL, a process per GPU): the path the CPU tests reach only through
    # gloo. The run trains with fused AdamW (run_info.json says so), writes sharded checkpoints (one shard per
    # process), and a resume from step 2 logs the losses of the uninterrupted run.
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, this machine has {torch.cuda.device_count()}")
    def config(name: str, steps: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run_dict(
            tmp_path / name, model=str(ROOT / "configs" / "models" / "jamba-tiny.yaml"), data={"seq_len": 64},
            train={"max_steps": steps, "precision": "bf16"}, schedule={"kind": "constant", "warmup_steps": 1},
            log={"every": 1, "trackers": ["csv"], "progress_bar": False}, checkpoint={"every": 2})))
        return path

    def launch(*args: str) -> subprocess.CompletedProcess:
        cmd = accelerate_launch("fsdp", "--num_processes", str(gpus), str(ROOT / "scripts" / "train.py"), *args)
        return run_launch(cmd, timeout=300)

    def losses(name):
        with open(tmp_path / name / "run" / "metrics.csv") as f:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}

    full = launch(str(config("full", 4)))
    assert full.returncode == 0, full.stderr[-3000:]
    step2 = tmp_path / "full" / "run" / "checkpoints" / "step_00000002"
    assert (step2 / "accelerate" / "pytorch_model_fsdp_0" / ".metadata").is_file(), "not run as FSDP"
    shards = list((step2 / "accelerate" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert len(shards) == gpus, shards  # each process wrote its own shard
    info = json.loads((tmp_path / "full" / "run" / "run_info.json").read_text())
    assert info["fused_adamw"] is True and info["device"].startswith("cuda"), info
    part = launch(str(config("part", 4)), f"--resume={step2}")
    assert part.returncode == 0, part.stderr[-3000:]
    assert list(losses("part")) == [3, 4] and all(losses("part")[k] == losses("full")[k] for k in (3, 4)), \
        (losses("part"), losses("full"))


def test_fsdp_resume_with_other_weight_decay_groups_names_the_option(tmp_path):
    # Under FSDP accelerate loads the sharded optimizer state into other weight-decay groups without an error (torch's
    # size check is the plain optimizer's): the groups lost their hyperparameters and the resumed run died at its first
    # step with "KeyError: 'betas'". The checkpoint's group sizes are now compared before loading, as under DDP.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 1, "grad_accum": 1, "prefetch": 1},
                                            optim={"no_decay_1d": False}, schedule={"warmup_steps": 0},
                                            log={"trackers": ["csv"], "progress_bar": False})))
    first = launch_fsdp_on_cpu(tmp_path, "scripts/train.py", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (latest_checkpoint(tmp_path / "run") / "accelerate" / "optimizer_0" / ".metadata").is_file()
    second = launch_fsdp_on_cpu(tmp_path, "scripts/train.py", str(path), "--resume", "--train.max_steps=2",
                                "--optim.no_decay_1d=true")
    assert second.returncode != 0
    assert "optim.no_decay_1d=true" in second.stderr and "(optim.no_decay_1d: false" in second.stderr, \
        second.stderr[-3000:]


def test_fsdp_config_run_by_accelerate_as_ddp_on_cpu_says_so(tmp_path):
    # accelerate takes FSDP on accelerators only: `accelerate launch --config_file configs/accelerate/fsdp.yaml` on CPU
    # processes (ACCELERATE_USE_CPU=1) trained as plain DDP, unsharded, with DDP's checkpoints, and no word of it
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 1, "grad_accum": 1, "prefetch": 1},
                                            schedule={"warmup_steps": 0}, checkpoint={"final": False})))
    env = cpu_launch_env()
    proc = run_launch(accelerate_launch("fsdp", str(ROOT / "scripts" / "train.py"), str(path)), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the launch config asks for FSDP, but accelerate runs this launch as MULTI_CPU" in proc.stdout, proc.stdout


def test_resume_under_another_launch_config_than_fsdp_names_it(tmp_path):
    # accelerate saves FSDP's states sharded (accelerate/pytorch_model_fsdp_0, optimizer_0) and DDP's as whole files:
    # a DDP run resumed under configs/accelerate/fsdp.yaml died in torch's checkpoint loader ("CheckpointException ...
    # metadata is None ... pytorch_model_fsdp_0/.metadata"), an FSDP run resumed under DDP with "No such file or
    # directory: .../pytorch_model.bin". The launch config is now named before loading.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 1, "grad_accum": 1, "prefetch": 1},
                                            schedule={"warmup_steps": 0})))
    first = _launch_two(path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch_fsdp_on_cpu(tmp_path, "scripts/train.py", str(path), "--resume", "--train.max_steps=2")
    assert second.returncode != 0
    assert "was saved without FSDP" in second.stderr and "this run is under FSDP" in second.stderr, \
        second.stderr[-3000:]


@pytest.mark.parametrize("recipe,command", [("induction.yaml", "scripts/train_synthetic.py"),
                                            ("finetune-mqar.yaml", "zoo finetune")])
def test_another_tools_recipe_given_to_zoo_train_names_its_command(recipe, command):
    """configs/train/ holds the recipes of other commands too; `zoo train` on one failed with 'models: unknown
    field; did you mean model?', not saying the file is another command's. The error names the command its header
    gives."""
    with pytest.raises(ValueError, match=rf"unknown field[\s\S]*is a recipe for `{command} \S*{recipe}`"):
        load_config(ROOT / "configs" / "train" / recipe)


def test_bits_per_byte_divides_by_the_texts_bytes_not_the_eos_targets(tmp_path):
    """eval/bits_per_byte was the mean loss per target over ln 2, so every document's <eos> target counted as a byte
    of text (with 20-byte documents, 1 in 21 targets): the figure came out low. It is the nats over the byte
    targets' count now; eval/loss stays the mean over every target."""

    from zoo.data.text import TextStream, load_tokenizer
    from zoo.train import count_byte_targets, count_targets

    pytest.importorskip("datasets")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i:03d} abcdefghijk"}) + "\n" for i in range(80)))
    run = run_dict(tmp_path, data={"source": str(docs), "holdout": 0.3, "shuffle": False},
                   eval={"every": 3, "batches": 2}, train={"max_steps": 3, "grad_accum": 1})
    cfg = config_from_dict(run)
    result = train(cfg)
    batches = [b for b, _ in itertools.islice(TextStream(cfg.data, load_tokenizer("byte"), "eval", 0, 1).batches(2), 2)]
    targets = sum(count_targets(b["labels"]) for b in batches)
    text_bytes = sum(count_byte_targets(b["labels"]) for b in batches)
    assert text_bytes < targets  # the rows hold <eos> targets
    metrics = result.evals[-1]
    assert metrics["eval/bits_per_byte"] == pytest.approx(metrics["eval/loss"] * targets / text_bytes / math.log(2),
                                                          rel=1e-9)



@pytest.mark.parametrize("data,loop", [({}, {}), ({"packing": False}, {"tbptt_chunk": 16})], ids=["rows", "tbptt"])
def test_eval_loss_of_a_transformers_moe_is_the_cross_entropy_without_its_aux_loss(tmp_path, data, loop):
    """transformers' MoE models (Mixtral, Jamba, Qwen-MoE, ...) with output_router_logits on, as training with their
    load-balancing loss needs, add router_aux_loss_coef times it to `loss` in eval mode too: eval/loss (and eval/ppl,
    bits per byte) counted it as nats, 2.0 too high here. It is the held-out targets' cross-entropy, as a zoo MoE's."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from zoo.data.text import TextStream, load_tokenizer

    mixtral = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
               "output_router_logits": True, "router_aux_loss_coef": 1.0}
    cfg = config_from_dict(run_dict(tmp_path, model=mixtral, data=data, train={"max_steps": 2, **loop},
                                    schedule={"warmup_steps": 1}, eval={"every": 2, "batches": 2}))
    result = train(cfg)
    model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(cfg.output_dir) / "model").eval()
    inputs, nats, targets = ModelInputs.of(model), 0.0, 0
    with torch.no_grad():
        for b, _ in itertools.islice(TextStream(cfg.data, load_tokenizer("byte"), "eval").batches(2), 2):
            logits = model(**inputs.kwargs(b, labels=False), use_cache=False).logits[:, :-1]
            nats += F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum").item()
            targets += count_targets(b["labels"])
    assert result.evals[-1]["eval/loss"] == pytest.approx(nats / targets, rel=1e-5)


def test_a_transformers_moe_trained_in_chunks_is_told_its_aux_loss_is_per_chunk(tmp_path, capsys):
    """A zoo MoE's aux loss under tbptt_chunk is the whole row's (_RowAux); transformers' MoE models add each chunk's
    own (a tiny Mixtral: loss 5.99 in chunks against 6.17 in whole rows), which the run now says."""
    mixtral = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
               "output_router_logits": True, "router_aux_loss_coef": 1.0}
    for router_logits in (True, False):
        run = run_dict(tmp_path / str(router_logits), model={**mixtral, "output_router_logits": router_logits},
                       data={"packing": False}, train={"max_steps": 1, "grad_accum": 1, "tbptt_chunk": 16},
                       schedule={"warmup_steps": 0})
        train(config_from_dict(run))
        told = "adds its load-balancing aux loss chunk by chunk" in capsys.readouterr().out
        assert told == router_logits


def test_a_launch_past_its_timeout_is_killed_with_the_processes_it_started(tmp_path):
    # the launches of these tests ran under subprocess.run(timeout=...), which killed the launcher alone: its workers
    # (stuck in a rendezvous, say) ran on beside the rest of the suite. run_launch kills the launcher's process group.
    import time

    pid = tmp_path / "worker.pid"
    worker = (f"import os, subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pid)!r}, 'w').write(str(w.pid)); time.sleep(120)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_launch([sys.executable, "-c", worker], timeout=5)
    assert pid.is_file(), "the launcher started its worker"

    def running() -> bool:  # (a killed worker whose parent is gone may stay a zombie until init reaps it)
        stat = Path(f"/proc/{pid.read_text()}/stat")
        with contextlib.suppress(OSError):
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(), "the worker outlived the launch's timeout"


def test_two_processes_save_and_stop_soon_after_the_launcher_is_sent_sigterm(tmp_path):
    # `accelerate launch` (torchrun) passes a SIGTERM on to its processes and kills them 30 s later. The processes
    # agreed to stop only at log steps, so with log.every far off (100 steps of 1 s) they met the kill unsaved: no
    # checkpoint, the steps since the last one lost. They now agree every step and save within a step or two.
    import time

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_dict(tmp_path, train={"max_steps": 100000, "grad_accum": 1},
                                            log={"every": 100000})))
    env = cpu_launch_env()
    cmd = accelerate_launch("ddp", str(ROOT / "scripts" / "train.py"), str(path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "run_info.json").is_file():  # written just before the loop starts
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc)  # (its output, read to the end below, waited on 100000 steps)
                pytest.fail(proc.communicate()[0][-3000:])
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        kill_group(proc)
    assert "stop requested: saving step" in output, output[-3000:]
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None, output[-3000:]
    step = int(ckpt.name.removeprefix("step_"))
    assert step >= 1
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [step], "the steps since the last log are logged once"


@pytest.mark.parametrize("card, peak", [("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
                                        ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0)])
def test_peak_tflops_reads_the_card_by_its_longest_matching_name(monkeypatch, card, peak):
    # an L40 matched "L4" first (121 TFLOP/s against its 181): MFU came out 1.5x too high
    from zoo.train import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    assert peak_tflops(torch.device("cuda")) == peak


@pytest.mark.parametrize("project", [None, "my-project"])
def test_trackers_log_under_the_runs_project_and_tensorboard_stays_in_its_folder(tmp_path, monkeypatch, project):
    """accelerate hands every tracker the project of init_trackers, which was 'tensorboard' (so that TensorBoard's
    files went to OUTPUT_DIR/tensorboard): every wandb / mlflow run landed in a project called 'tensorboard'."""
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator

    seen = []
    real = Accelerator.init_trackers
    monkeypatch.setattr(Accelerator, "init_trackers",
                        lambda self, name, *a, **k: seen.append(name) or real(self, name, *a, **k))
    log = {"trackers": ["csv", "tensorboard"]} | ({"project": project} if project else {})
    train(config_from_dict(run_dict(tmp_path, train={"max_steps": 3}, log=log)))
    assert seen == [project or "hybrid-zoo"]
    assert any((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def test_throughput_and_mfu_count_real_tokens_not_the_pads_of_unpacked_rows(tmp_path):
    """tokens_per_s (and MFU) counted every position of the rows: an unpacked run's right pads, no work for the
    model, inflated both. They count the rows' real tokens now; padded_tokens_per_s keeps every position."""
    from zoo.data.text import TextStream
    from zoo.train import count_tokens

    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    text = tmp_path / "lines.txt"
    text.write_text("".join(f"line {i} " + "x" * (i % 23) + "\n" for i in range(400)))
    run = run_dict(tmp_path, data={"source": str(text), "sample_by": "line", "packing": False, "holdout": 0.0},
                   train={"max_steps": 3, "grad_accum": 1}, log={"every": 1, "peak_tflops": 1.0})
    cfg = config_from_dict(run)
    real: list[int] = []
    train(cfg, on_step=lambda s, m: real.append(m["real_tokens"]))
    from zoo.data.text import load_tokenizer

    stream = TextStream(cfg.data, load_tokenizer(cfg.tokenizer), "train")
    expected = [count_tokens(b) for b, _ in itertools.islice(stream.batches(2), 3)]
    assert real == expected and all(0 < n < 2 * 64 for n in expected)  # short lines: mostly pads
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    assert len(rows) == 3
    for row, n in zip(rows, expected):
        tps, padded = float(row["tokens_per_s"]), float(row["padded_tokens_per_s"])
        assert math.isclose(tps / padded, n / (2 * 64), rel_tol=1e-6)
        info = json.loads((tmp_path / "run" / "run_info.json").read_text())
        assert math.isclose(float(row["mfu"]), info["flops_per_token"] * tps / 1e12, rel_tol=1e-4)
        assert math.isclose(float(row["mfu_6n"]), 6 * info["active_params"] * tps / 1e12, rel_tol=1e-4)


def _jsonl_folder(tmp_path: Path, parts: int, per_part: int) -> Path:
    """A folder of jsonl files (a stream's shards, or one table not streamed), documents of three lengths."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for part in range(parts):
        docs = [f"part {part} document {i} " * (1 + i % 3) for i in range(per_part)]
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


def test_resume_of_a_streamed_dataset_reads_on_from_the_saved_position(tmp_path, monkeypatch):
    # a streamed dataset's run resumed at document d re-read and skipped d documents (for a large hub corpus, hours
    # of download and tokenizing); the checkpoint now holds datasets' own stream position, and the resumed run reads
    # on from it, with the uninterrupted run's losses
    datasets = pytest.importorskip("datasets")
    from zoo.data.text import _datasets_at_least, open_documents

    if not _datasets_at_least("3.4"):
        pytest.skip(f"datasets {datasets.__version__} cannot continue a stream from its saved position (3.4+)")

    folder = _jsonl_folder(tmp_path, parts=4, per_part=14)
    sections = {"data": {"source": str(folder), "streaming": True, "shuffle": False, "holdout": 0.0}}
    full: dict[int, float] = {}
    train(config_from_dict(run_dict(tmp_path / "a", **sections)), on_step=lambda s, m: full.__setitem__(s, m["loss"]))

    def interrupt(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves after this step and stops

    cfg = config_from_dict(run_dict(tmp_path / "b", checkpoint={"every": 2}, **sections))
    assert train(cfg, on_step=interrupt).step == 3
    saved = json.loads((latest_checkpoint(cfg.output_dir) / "trainer_state.json").read_text())["data_states"][0]
    assert saved["epoch"] == 0 and saved["doc"] > 14 and "source" in saved, saved
    order = list(open_documents(cfg.data, "train").iter_docs(0, 0))

    seen = stream_reads(monkeypatch)
    resumed: dict[int, float] = {}
    assert train(cfg, resume="auto", on_step=lambda s, m: resumed.__setitem__(s, m["loss"])).step == 6
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], (resumed, full)
    assert seen[0] == order[saved["doc"]], "the resumed run starts reading at the saved document"
    # (read ahead, the stream goes on into epoch 1, which reads every document again: only epoch 0's rest is checked)
    assert not set(seen[:len(order) - saved["doc"]]) & set(order[:saved["doc"]]), "no earlier document read again"


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "indexed"])
def test_resume_of_a_shuffled_dataset_in_a_later_epoch_trains_on_the_uninterrupted_runs_batches(tmp_path, monkeypatch,
                                                                                                  streaming):
    # a shuffled stream cannot continue from datasets' saved position (it saves no shuffle buffer): the resumed run
    # reads its epoch again from the start and skips the documents before the saved one, saying how many; an indexed
    # dataset takes the saved document of the epoch's permutation. Either gives every micro-batch (grad_accum 2) of
    # the uninterrupted run from the saved step on, past the epoch boundaries before and after it
    pytest.importorskip("datasets")
    import zoo.train as zt

    folder = _jsonl_folder(tmp_path, parts=3, per_part=6)  # about 3 steps an epoch
    sections = {"data": {"source": str(folder), "streaming": streaming, "shuffle": True, "shuffle_buffer": 4,
                         "holdout": 0.0}, "train": {"max_steps": 8}}
    real = zt.forward_backward

    def reading(into: list[torch.Tensor]):
        def forward_backward(model, batch, *args, **kwargs):
            into.append(batch["input_ids"].clone())
            return real(model, batch, *args, **kwargs)
        return forward_backward

    full_batches: list[torch.Tensor] = []
    full: dict[int, float] = {}
    monkeypatch.setattr(zt, "forward_backward", reading(full_batches))
    train(config_from_dict(run_dict(tmp_path / "a", **sections)), on_step=lambda s, m: full.__setitem__(s, m["loss"]))

    def interrupt(step, metrics):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves after this step and stops

    monkeypatch.setattr(zt, "forward_backward", real)
    cfg = config_from_dict(run_dict(tmp_path / "b", **sections))
    assert train(cfg, on_step=interrupt).step == 5
    saved = json.loads((latest_checkpoint(cfg.output_dir) / "trainer_state.json").read_text())["data_states"][0]
    assert saved["epoch"] >= 1 and saved["doc"] > 0, saved  # inside a later epoch, past some of its documents
    batches: list[torch.Tensor] = []
    resumed: dict[int, float] = {}
    monkeypatch.setattr(zt, "forward_backward", reading(batches))
    skipped = rf"at document {saved['doc']} of epoch {saved['epoch']} re-reads and skips {saved['doc']} documents"
    notice = pytest.warns(UserWarning, match=skipped) if streaming else contextlib.nullcontext()
    with notice:
        train(cfg, resume="auto", on_step=lambda s, m: resumed.__setitem__(s, m["loss"]))
    expected = full_batches[5 * 2:]
    assert len(batches) == len(expected) == 3 * 2
    assert all(torch.equal(a, b) for a, b in zip(batches, expected)), "the resumed run read other micro-batches"
    assert [resumed[s] for s in (6, 7, 8)] == [full[s] for s in (6, 7, 8)], (resumed, full)


def test_resume_of_a_shuffled_stream_under_another_datasets_version_says_it_is_not_exact(tmp_path, capsys):
    # datasets' shuffle buffer orders a stream otherwise across its versions (3.0 and 5.2 do): a resumed run skips the
    # first documents of its epoch in its own order, not those the run read, and resumed silently. The checkpoint now
    # records the version, and a resume under another one says so; under the same one, or unshuffled, it is silent.
    pytest.importorskip("datasets")
    folder = _jsonl_folder(tmp_path, parts=2, per_part=6)

    def resumed_under_another_version(shuffle: bool) -> str:
        cfg = config_from_dict(run_dict(tmp_path / str(shuffle), train={"max_steps": 2}, schedule={"warmup_steps": 0},
                                        data={"source": str(folder), "streaming": True, "shuffle": shuffle,
                                              "shuffle_buffer": 4, "holdout": 0.0}))
        train(cfg)
        capsys.readouterr()
        cfg.train.max_steps = 3
        train(cfg, resume="auto")
        assert "read its shuffled stream with datasets" not in capsys.readouterr().out, "the same version"
        rewrite_trainer_state(cfg.output_dir, lambda state: state.update(datasets="2.21.0"))
        cfg.train.max_steps = 4
        train(cfg, resume="auto")
        return capsys.readouterr().out

    out = resumed_under_another_version(shuffle=True)
    assert re.search(r"read its shuffled stream with datasets 2\.21\.0, this run has \S+, whose shuffle may order "
                     r"the documents otherwise.*not exact.*pip install 'datasets==2\.21\.0' resumes exactly", out), out
    assert "read its shuffled stream" not in resumed_under_another_version(shuffle=False), "an unshuffled stream"


def test_resume_says_when_the_local_sources_files_changed_under_the_run(tmp_path, capsys):
    # only data.* was compared: a file of a local folder added, removed or edited between the stop and the resume
    # ordered every epoch's documents otherwise, and a source shrunk below the saved document moved the run on to the
    # next epoch, both without a word. The checkpoint records the files' sizes and modification times, and a resume
    # names what changed; an unchanged source, or a checkpoint written before the record, resumes silently
    pytest.importorskip("datasets")
    folder = _jsonl_folder(tmp_path, parts=3, per_part=6)
    cfg = config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 0},
                                    data={"source": str(folder), "streaming": False, "holdout": 0.0}))
    train(cfg)
    state_path = latest_checkpoint(cfg.output_dir) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert sorted(state["source_files"]) == ["part0.jsonl", "part1.jsonl", "part2.jsonl"]
    capsys.readouterr()

    def resumed() -> str:
        cfg.train.max_steps += 1
        train(cfg, resume="auto")
        return capsys.readouterr().out

    assert "not exact" not in resumed(), "an unchanged source"
    # files the folder loader reads no data from: a README edited, or recorded by a checkpoint that listed every file
    (folder / "README.md").write_text("# notes\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jsonl").write_text("{}\n")
    assert "not exact" not in resumed(), "a README added"
    (folder / "README.md").write_text("# notes, longer\n")
    rewrite_trainer_state(cfg.output_dir, lambda state: state["source_files"].update(
        {"README.md": [1, 0], "dataset_info.json": [2, 0]}))
    assert "not exact" not in resumed(), "a README edited, or recorded by an earlier checkpoint"
    (folder / ".cache" / "x.jsonl").unlink()
    (folder / ".cache").rmdir()
    part1 = (folder / "part1.jsonl").read_text()
    (folder / "part0.jsonl").unlink()
    (folder / "part1.jsonl").write_text(part1 + part1)
    (folder / "part3.jsonl").write_text(part1)
    out = resumed()
    assert re.search(r"--resume: the files of data\.source changed since step_00000005 \(1 added: part3\.jsonl; "
                     rf"1 removed: part0\.jsonl; 1 with another size: part1\.jsonl \({len(part1)} -> {2 * len(part1)} "
                     r"bytes\)\), which orders every epoch's documents otherwise.*This resume is not exact", out), out
    os.utime(folder / "part2.jsonl", ns=(0, 0))  # rewritten in place: the same size, another modification time
    assert "1 modified at the same size: part2.jsonl" in resumed()

    # shrunk below the saved document: one document left
    saved = json.loads((latest_checkpoint(cfg.output_dir) / "trainer_state.json").read_text())["data_states"][0]
    for f in folder.iterdir():
        f.unlink()
    (folder / "part0.jsonl").write_text(json.dumps({"text": "one document " * 40}) + "\n")
    out = resumed()
    assert re.search(rf"3 removed: part1\.jsonl, part2\.jsonl, part3\.jsonl.*; the saved data position \(document "
                     rf"{saved['doc']} of epoch {saved['epoch']}\) is past the end of the source, now 1 document, "
                     rf"so the run goes on from the start of epoch {saved['epoch'] + 1}\. This resume is not exact",
                     out), out

    rewrite_trainer_state(cfg.output_dir, lambda state: state.pop("source_files"))  # as written before the record
    (folder / "part1.jsonl").write_text(part1)
    assert "not exact" not in resumed(), "a checkpoint without the source's files"


def test_a_hub_datasets_revision_is_read_and_a_moved_default_branch_said_on_resume(tmp_path, monkeypatch, capsys):
    # a hub dataset could not be pinned: load_dataset read its default branch, so one updated between the stop and the
    # resume trained the resumed run on other data without a word. data.revision goes to every load_dataset of the
    # source (the eval split too), a change of it is a change of data order, and a non-streamed dataset's commit (the
    # folder datasets caches it under) is recorded: a resume that reads another one says so, and pinning the
    # run's commit resumes silently
    datasets = pytest.importorskip("datasets")
    head, calls = ["a" * 40], []

    def load_dataset(path, name=None, split=None, streaming=False, revision=None, **kwargs):  # the hub, offline
        calls.append((path, split, revision))
        commit = revision or head[0]
        folder = tmp_path / "hub-cache" / commit  # as datasets caches it: .../<name>/<config>/<version>/<commit>/
        if not folder.exists():
            datasets.Dataset.from_list([{"text": f"{commit[:4]} document {i} " * 20} for i in range(40)]
                                       ).save_to_disk(str(folder))
        return datasets.load_from_disk(str(folder))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 0},
                                    eval={"every": 2, "batches": 1},
                                    data={"source": "someone/corpus", "streaming": False, "eval_split": "validation"}))
    train(cfg)
    assert sorted(set(calls)) == [("someone/corpus", "train", None), ("someone/corpus", "validation", None)]
    state = json.loads((latest_checkpoint(cfg.output_dir) / "trainer_state.json").read_text())
    assert state["source_commit"] == "a" * 40
    capsys.readouterr()

    head[0] = "b" * 40  # the default branch moved
    cfg.train.max_steps = 3
    train(cfg, resume="auto")
    assert re.search(rf"--resume: 'someone/corpus' was read at hub commit {'a' * 40} by step_00000002's run, this "
                     rf"run reads commit {'b' * 40}, which orders every epoch's documents otherwise than the run did "
                     rf"\(--data\.revision={'a' * 40} reads the run's\)\. This resume is not exact",
                     capsys.readouterr().out)

    calls.clear()
    cfg.data.revision, cfg.train.max_steps = "b" * 40, 4  # pinned to the commit step_3's run read: no change
    train(cfg, resume="auto")
    assert "not exact" not in capsys.readouterr().out
    assert sorted(set(calls)) == [("someone/corpus", "train", "b" * 40), ("someone/corpus", "validation", "b" * 40)]
    cfg.data.revision, cfg.train.max_steps = "a" * 40, 5
    with pytest.raises(ValueError, match=rf"another model, tokenizer or data order \(data\.revision: '{'b' * 40}' "
                                         rf"-> '{'a' * 40}'\)"):
        train(cfg, resume="auto")


def test_a_streamed_hub_datasets_commit_is_asked_of_the_hub_read_and_a_moved_branch_said_on_resume(
        tmp_path, monkeypatch, capsys):
    # a streamed hub dataset's commit was not recorded (datasets does not tell it), so a default branch that moved
    # between the stop and the resume trained the resumed run on other data without a word. The run asks the hub
    # (HfApi.dataset_info, with a timeout) which commit the revision is at, streams that commit, and records it
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    head, calls, asked = ["a" * 40], [], []

    def load_dataset(path, name=None, split=None, streaming=False, revision=None, **kwargs):  # the hub, offline
        calls.append((split, streaming, revision))
        commit = revision if revision in ("a" * 40, "b" * 40) else head[0]
        return datasets.Dataset.from_list([{"text": f"{commit[:4]} {split} document {i} " * 20} for i in range(40)]
                                          ).to_iterable_dataset()

    def dataset_info(self, repo_id, *, revision=None, timeout=None, **kwargs):
        asked.append((repo_id, revision, timeout))
        return huggingface_hub.hf_api.DatasetInfo(id=repo_id, sha=head[0] if revision is None else revision)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # the hub is this test's: on a machine set offline
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    cfg = config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 0},
                                    eval={"every": 2, "batches": 1},
                                    data={"source": "someone/corpus", "streaming": True, "shuffle": False,
                                          "eval_split": "validation"}))
    train(cfg)
    assert asked and all(a[:2] == ("someone/corpus", None) and 0 < a[2] <= 30 for a in asked), asked
    assert sorted(set(calls)) == [("train", True, "a" * 40), ("validation", True, "a" * 40)], "the commit is read"
    assert json.loads((latest_checkpoint(cfg.output_dir) / "trainer_state.json").read_text())["source_commit"] \
        == "a" * 40
    capsys.readouterr()

    head[0] = "b" * 40  # the default branch moved
    cfg.train.max_steps = 3
    train(cfg, resume="auto")
    assert re.search(rf"--resume: 'someone/corpus' was read at hub commit {'a' * 40} by step_00000002's run, this "
                     rf"run reads commit {'b' * 40}, which orders every epoch's documents otherwise.*This resume is "
                     r"not exact", capsys.readouterr().out)
    cfg.train.max_steps = 4  # unmoved since step_3's run
    train(cfg, resume="auto")
    assert "not exact" not in capsys.readouterr().out



def test_resume_says_when_the_built_in_corpus_is_another_pythons(tmp_path, capsys):
    # the built-in corpus is the running Python's standard library: a run resumed under another Python trained on
    # another file list (another document order every epoch) without a word. The checkpoint records the Python
    # version and the number of files, and a resume under another says the resume is not exact
    from zoo.data.text import stdlib_version

    cfg = config_from_dict(run_dict(tmp_path, train={"max_steps": 2}, schedule={"warmup_steps": 0}))
    train(cfg)
    state_path = latest_checkpoint(cfg.output_dir) / "trainer_state.json"
    assert json.loads(state_path.read_text())["stdlib"] == stdlib_version()
    capsys.readouterr()
    cfg.train.max_steps = 3
    train(cfg, resume="auto")
    assert "not exact" not in capsys.readouterr().out, "the same Python"
    rewrite_trainer_state(cfg.output_dir, lambda state: state.update(stdlib={"python": "3.9.0", "files": 1234}))
    cfg.train.max_steps = 4
    train(cfg, resume="auto")
    now = stdlib_version()
    assert re.search(rf"--resume: the built-in corpus 'stdlib' is Python {re.escape(now['python'])}'s \({now['files']} "
                     r"files\), step_00000003's run read Python 3\.9\.0's \(1234 files\), which orders every epoch's "
                     r"documents otherwise than the run did\. This resume is not exact", capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["zoo", "jetmoe"])
def test_logged_loss_of_a_moe_model_is_the_cross_entropy_and_its_aux_loss_a_column_apart(tmp_path, kind):
    """An MoE model's metrics.csv `loss` (and compare's loss.png, final_train_loss) was its objective, the cross
    entropy plus moe.aux_loss_coef · the load-balancing loss, while eval/loss and the other models' losses are the
    cross entropy alone. Now `loss` is the cross entropy (the same at any aux_loss_coef before the first update) and
    `aux_loss` the objective's aux part; a transformers MoE's too (JetMoE: its factor is config.aux_loss_coef)."""
    rows, seen = {}, {}
    for coef in (0.0, 1.0):
        if kind == "zoo":
            model = {"model_type": "zoo", "vocab_size": 260, "d_model": 32, "layers": "MM", "ffn": {"hidden": 64},
                     "mixers": {"M": {"type": "mamba", "d_state": 4}},
                     "moe": {"every": 2, "n_experts": 4, "top_k": 2, "aux_loss_coef": coef}}
        else:
            model = {"model_type": "jetmoe", "vocab_size": 260, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_key_value_heads": 2, "kv_channels": 8, "intermediate_size": 64, "num_local_experts": 4,
                     "num_experts_per_tok": 2, "max_position_embeddings": 256, "output_router_logits": True,
                     "aux_loss_coef": coef}
        run = run_dict(tmp_path / str(coef), train={"max_steps": 1, "grad_accum": 1, "precision": "fp32"},
                       log={"every": 1}, schedule={"warmup_steps": 0})
        run["model"] = model
        if kind != "zoo" and not rows:
            from transformers import AutoConfig, AutoModelForCausalLM

            _skip_without_router_logits(AutoModelForCausalLM.from_config(AutoConfig.for_model(**model)), kind)
        train(config_from_dict(run), on_step=lambda s, m, c=coef: seen.__setitem__(c, m["loss"]))
        with open(tmp_path / str(coef) / "run" / "metrics.csv") as f:
            rows[coef] = next(csv.DictReader(f))
    # the first step's loss is computed before any update: the same weights and rows at both coefficients
    assert math.isclose(float(rows[1.0]["loss"]), float(rows[0.0]["loss"]), rel_tol=1e-5)
    assert math.isclose(seen[1.0], seen[0.0], rel_tol=1e-5)
    assert "aux_loss" not in rows[0.0]  # no aux loss in the objective at aux_loss_coef 0
    assert float(rows[1.0]["aux_loss"]) > 0.5  # the aux loss of a layer of top-2 routing is about 2


def _moe_model(kind: str):
    """A tiny MoE causal LM in training mode whose loss adds 0.5 (zoo's: 1) · its aux loss: zoo's Jamba-style
    ('zoo'), or transformers' Mixtral, JetMoE or DBRX, their aux loss returned and added through output_router_logits
    (the factor: router_aux_loss_coef, JetMoE's aux_loss_coef, DBRX's ffn_config.moe_loss_weight)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import zoo

    torch.manual_seed(0)
    sizes = {"vocab_size": 260, "max_position_embeddings": 256, "output_router_logits": True}
    if kind == "zoo":
        config = zoo.ZooConfig.from_yaml(ROOT / "configs/models/jamba-tiny.yaml", vocab_size=260, moe={
            "every": 2, "offset": 1, "n_experts": 4, "top_k": 2, "aux_loss_coef": 1.0})
    elif kind == "mixtral":
        config = AutoConfig.for_model("mixtral", **{k: v for k, v in LLAMA.items() if k != "model_type"},
                                      num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                      router_aux_loss_coef=0.5)
    elif kind == "jetmoe":
        config = AutoConfig.for_model("jetmoe", hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                      kv_channels=8, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                      aux_loss_coef=0.5, **sizes)
    else:
        sizes.pop("max_position_embeddings")
        config = AutoConfig.for_model("dbrx", d_model=32, n_heads=4, n_layers=2, max_seq_len=256, **sizes,
                                      attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                      ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2,
                                                  "moe_loss_weight": 0.5})
    model = AutoModelForCausalLM.from_config(config).train()
    if kind != "zoo":
        _skip_without_router_logits(model, kind)
    return model


def _skip_without_router_logits(model, kind: str) -> None:
    """Skip where the installed transformers' `kind` adds no aux loss to a training forward whose config sets
    output_router_logits (as zoo train calls it): transformers 5.17's JetMoE reads only the argument, and its DBRX
    fails on the router logits it did not collect."""
    import transformers

    try:
        with torch.no_grad():
            aux = model(input_ids=torch.randint(0, 256, (1, 8))).aux_loss
    except AttributeError:
        aux = None
    if not isinstance(aux, torch.Tensor):
        pytest.skip(f"transformers {transformers.__version__}'s {kind} returns no router logits")


@pytest.mark.parametrize("kind,chunk_len,mode", [("zoo", None, "exact"), ("zoo", 16, "exact"), ("zoo", 16, "detach"),
                                                 ("zoo", 48, "exact"), ("mixtral", None, "exact"),
                                                 ("mixtral", 16, "exact"), ("jetmoe", None, "exact"),
                                                 ("dbrx", None, "exact")])
def test_forward_backward_gives_the_aux_part_of_a_moe_loss(kind, chunk_len, mode):
    """forward_backward's loss minus the aux part it reports is the cross entropy (an eval-mode loss), whole rows
    or in chunks (zoo's 16: the row's aux loss shared over the chunks; 48, and Mixtral's: each chunk's own).
    JetMoE's and DBRX's factor is no config.router_aux_loss_coef: their aux part was 0, their logged loss the
    objective."""
    model = _moe_model(kind)
    L = 48
    ids = torch.randint(0, 256, (2, L))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(L).repeat(2, 1),
             "seq_idx": torch.zeros(2, L, dtype=torch.int32)}
    n = count_targets(batch["labels"])
    aux: list[torch.Tensor] = []
    loss = forward_backward(model, batch, 1.0 / n, ModelInputs.of(model), chunk_len=chunk_len, mode=mode, aux=aux)
    with torch.no_grad():
        model.eval()
        ce = model(input_ids=ids, labels=ids, output_router_logits=False).loss
        whole = model(input_ids=ids, labels=ids, output_router_logits=True).aux_loss
    assert_close("cross entropy", loss - sum(aux), ce, 1e-5)
    if kind == "zoo" or chunk_len is None:  # (Mixtral's chunks: each its own aux loss, not the row's)
        assert_close("aux part", sum(aux), (1.0 if kind == "zoo" else 0.5) * whole, 1e-5)


@pytest.mark.parametrize("chunk_len,mode", [(None, "exact"), (16, "exact"), (16, "detach")])
def test_a_config_with_return_dict_false_trains_as_the_default(chunk_len, mode):
    """transformers' return_dict=False (from_pretrained(..., return_dict=False), kept in an exported config.json)
    makes the forward return a tuple: the training step read .loss / .logits of it and failed ("'tuple' object has no
    attribute 'loss'"), and so did the packing check and the evaluation, which take the same ModelInputs. They ask for
    an output object where the forward takes return_dict, as generate does: the same loss, aux part and gradients."""
    from zoo.train import packed_documents_leak

    model = _moe_model("zoo")  # (transformers' Mixtral fails on it itself: its model's tuple has no last_hidden_state)
    L = 48
    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(L).repeat(2, 1),
             "seq_idx": torch.zeros(2, L, dtype=torch.int32)}
    n = count_targets(batch["labels"])

    def step():
        model.zero_grad(set_to_none=True)
        aux: list[torch.Tensor] = []
        with torch.random.fork_rng(devices=[]):
            loss = forward_backward(model, batch, 1.0 / n, ModelInputs.of(model), chunk_len=chunk_len, mode=mode,
                                    aux=aux)
        return loss, sum(aux), [p.grad.clone() for p in model.parameters() if p.grad is not None], \
            packed_documents_leak(model, ModelInputs.of(model))

    reference = step()
    model.config.return_dict = False
    assert isinstance(model(input_ids=ids), tuple)
    got = step()
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]) and got[3] == reference[3]
    assert len(got[2]) == len(reference[2]) and all(torch.equal(a, b) for a, b in zip(got[2], reference[2]))


@pytest.mark.parametrize("kind,chunk_len,mode", [("zoo", None, "exact"), ("zoo", 16, "exact"), ("zoo", 16, "detach"),
                                                 ("zoo", 48, "exact"), ("mixtral", 16, "exact")])
def test_forward_backward_reports_the_aux_part_without_reading_the_device(monkeypatch, kind, chunk_len, mode):
    """The aux list counted each chunk's targets with int() of device labels: a host sync per chunk that the
    trainer's forward_backward has no other reason for. forward_backward with `aux` reads no more tensor values
    back to the host (item, int, float, bool, tolist) than without it, whole rows or in chunks (zoo's 16: the row's
    aux loss shared over the chunks; 48, and Mixtral's: each chunk's own)."""
    model = _moe_model(kind)
    L = 48
    ids = torch.randint(0, 256, (2, L))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(L).repeat(2, 1),
             "seq_idx": torch.zeros(2, L, dtype=torch.int32)}
    n = count_targets(batch["labels"])
    reads = [0]

    def counting(read):
        def counted(self, *args, **kwargs):
            reads[0] += 1
            return read(self, *args, **kwargs)
        return counted

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    counts = {}
    for with_aux in (False, True):
        aux: list[torch.Tensor] | None = [] if with_aux else None
        reads[0] = 0
        forward_backward(model, batch, 1.0 / n, ModelInputs.of(model), chunk_len=chunk_len, mode=mode, n_targets=n,
                         aux=aux)
        counts[with_aux] = reads[0]
        model.zero_grad(set_to_none=True)
    monkeypatch.undo()
    assert aux, "the MoE model's aux part was not reported"
    assert counts[True] == counts[False], counts


def test_a_checkpoint_of_tied_embeddings_saves_and_resumes_without_accelerates_shared_tensor_note(tmp_path, caplog):
    """accelerate's save_state logged "Removed shared tensor {'lm_head.weight'} while saving. This should be OK, but
    check by verifying that you don't receive any warning while reloading" at every checkpoint of a zoo model (its
    lm_head tied to the embeddings): a note for accelerate's users to check, which --resume does check."""
    import logging

    from transformers import AutoModelForCausalLM

    def run(steps: int) -> dict:
        return config_from_dict(run_dict(tmp_path, model=str(ROOT / "configs" / "models" / "mamba-tiny.yaml"),
                                         train={"max_steps": steps, "grad_accum": 1}, schedule={"warmup_steps": 0},
                                         checkpoint={"every": 1}))

    with caplog.at_level(logging.INFO):
        train(run(2))
        resumed = train(run(3), resume="auto")
    assert resumed.step == 3
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    model = AutoModelForCausalLM.from_pretrained(resumed.checkpoint / "model")
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the tie the note was about


def test_auto_precision_of_a_run_pinned_to_the_cpu_on_a_gpu_machine_is_fp32(monkeypatch):
    # train.precision auto asked for bf16 wherever a GPU was present, also for a run pinned to the CPU
    # (ACCELERATE_USE_CPU=1, `accelerate launch --cpu`): it trained under CPU bf16 autocast (the README's test command
    # on the H100's machine, forty-fourth session: "precision bf16" in CPU runs' headers, and their losses off)
    from zoo.train import _mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert _mixed_precision("auto") == "bf16"
    for flag in ("1", "true", "yes"):
        monkeypatch.setenv("ACCELERATE_USE_CPU", flag)
        assert _mixed_precision("auto") == "no"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")
    assert _mixed_precision("auto") == "bf16"
    assert _mixed_precision("bf16") == "bf16"  # (an explicit precision is the run's)
