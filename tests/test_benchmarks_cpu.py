"""The GPU benchmarks and probes (benchmarks/*.py) on a machine without one: each ends in one line that says so
(SystemExit with the message), never in a traceback from deep inside its first CUDA call."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, Terminated, load_script, sigterm_raises_terminated

GPU_ONLY = ["argmax", "attention", "conv1d", "cross_entropy", "decode_attention", "decode_linear", "generate", "gla",
            "mamba_layers", "mamba_step", "probe_linear_ncu", "probe_mamba_step_phases", "probe_packed_flex",
            "probe_packed_nested", "probe_split_decode", "probe_split_parts", "probe_split_streams", "profile_decode",
            "scan_split", "selective_scan", "ssd", "train_throughput"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_benchmark_on_cpu_ends_in_one_line(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their neighbours, as when run
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    script = load_script(f"benchmarks/{name}.py")
    with pytest.raises(SystemExit) as e:
        script.main()
    assert isinstance(e.value.code, str) and "CUDA" in e.value.code and "\n" not in e.value.code, e.value.code


@pytest.mark.parametrize("name, flags", [
    ("argmax", ["--batches", "1,x"]), ("cross_entropy", ["--rows", "0"]), ("decode_linear", ["--rows", "16;64"]),
    ("mamba_layers", ["--batches", ","]), ("mamba_step", ["--batches", "1,-4"]),
    ("mamba_step", ["--shapes", "1536:16"]), ("profile_decode", ["--batches", "64x"]),
    ("probe_split_decode", ["--splits", "2,x"]), ("probe_split_streams", ["--splits", "0"]),
    ("probe_linear_ncu", ["--configs", "2,1;3"]), ("probe_linear_ncu", ["--configs", "2,x"]),
    ("probe_mamba_step_phases", ["--cases", "1:1,64"]), ("probe_mamba_step_phases", ["--cases", "64:0"]),
    ("probe_mamba_step_phases", ["--shape", "1536:16"]), ("probe_mamba_step_phases", ["--shape", "8:1:1,8:1:1"])])
def test_gpu_benchmark_refuses_a_bad_size_list_in_one_line_naming_the_option(name, flags, monkeypatch, capsys):
    """The comma lists were split and int()ed after the CUDA check and the card's ceilings: a bad item ended in a
    traceback on a GPU, a 0 or negative one timed nothing or divided by zero. argparse refuses them now, first."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags])
    script = load_script(f"benchmarks/{name}.py")
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2 and f"argument {flags[0]}:" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["64,2176,12,0,64", "64,2176,x,4,64", "64,2176,12,4"])
def test_decode_attention_refuses_a_bad_shape_before_looking_for_a_gpu(shape, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["decode_attention.py", "--shapes", shape])
    script = load_script("benchmarks/decode_attention.py")
    with pytest.raises(SystemExit) as e:
        script.main()
    assert isinstance(e.value.code, str) and e.value.code.startswith("--shapes: B,S,H,Hkv,D"), e.value.code


@pytest.mark.parametrize("flags", [["--sweep"], ["--shapes", "mamba.in_proj"]], ids=["sweep", "shapes"])
def test_decode_linear_chain_refuses_the_single_projection_options_it_ignores(monkeypatch, capsys, flags):
    """--chain times its own Mamba-130M-like layers: --shapes and --sweep were taken and did nothing."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["decode_linear.py", "--chain", *flags])
    script = load_script("benchmarks/decode_linear.py")
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2 and f"{flags[0]}: options of the single projections" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the probe")
def test_mqar_probe_runs_the_demos_models_on_the_cpu(tmp_path, monkeypatch):
    # how many MQAR steps the demo's tiny models need is a CPU question (the demo trains them 100); it was GPU-only
    import json

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.chdir(ROOT)
    script = load_script("benchmarks/mqar_probe.py")
    assert script.main(["--config", "configs/compare/demo.yaml", "--batch-size", "4", "gla:32:32:4:3e-3:3"]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "mqar-probe.jsonl").read_text().splitlines()]
    assert row["name"] == "gla" and row["steps"] == 3 and 0 <= row["acc"] <= 1 and len(row["train_losses"]) == 3


def test_mqar_probe_trains_every_run_afresh(tmp_path, monkeypatch, capsys):
    """Every run trained in /tmp/mqar-probe, where phase_mqar keeps its finished training for zoo compare to resume: a
    run of the same spec (in the same probe, a later one, or another user's) loaded that model instead of training,
    and its row reported another run's model, trained in no time."""
    import json

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.chdir(ROOT)
    script = load_script("benchmarks/mqar_probe.py")
    spec = "gla:32:32:4:3e-3:2"
    assert script.main(["--config", "configs/compare/demo.yaml", "--batch-size", "4", spec, spec]) == 0
    assert script.main(["--config", "configs/compare/demo.yaml", "--batch-size", "4", spec]) == 0
    assert "continuing" not in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "mqar-probe.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["train_losses"]) == 2 for r in rows)


@pytest.mark.parametrize("spec, message", [
    ("gla:32:32:16:3e-3:3", "run 'gla:32:32:16:3e-3:3': mqar: n_kv=16 needs seq_len >= 4 * n_kv = 64, got seq_len=32"),
    ("gla:8:32:4:3e-3:3", "run 'gla:8:32:4:3e-3:3': mqar: vocab_size=8 has 3 keys, fewer than n_kv=4; pass "
                          "vocab_size >= 2 * n_kv + 2 = 10"),
    ("gla:32:32:4:3e-3:0", "run 'gla:32:32:4:3e-3:0': steps must be >= 1 and lr > 0"),
], ids=["seq_len", "vocab", "steps"])
def test_mqar_probe_refuses_a_run_it_cannot_build_before_any_run_trains(tmp_path, monkeypatch, capsys, spec, message):
    """A run whose MQAR rows cannot be built ended the probe in a traceback (ValueError from mqar_batch at its first
    step, or from phase_mqar for 0 steps), after the runs before it had trained."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.chdir(ROOT)
    script = load_script("benchmarks/mqar_probe.py")
    with pytest.raises(SystemExit) as stop:
        script.main(["--config", "configs/compare/demo.yaml", "--batch-size", "4", "gla:32:32:4:3e-3:2", spec])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "mqar-probe.jsonl").exists()  # nothing trained


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


def test_report_keeps_only_the_later_of_two_calls_of_one_command_on_one_day():
    """Card, date and command do not tell apart two calls of one command on one day: the fourteenth session ran
    benchmarks/mamba_layers.py twice (calls 6 and 8), the second against a baseline labelled otherwise, and the
    rendered table kept call 6's superseded rows beside call 8's as if one run had measured both. A run writes a
    figure's rows one after the other, so a row of that name after other rows starts a new run."""
    report = load_script("benchmarks/report.py")

    def row(name, baseline, ms):
        return {"name": name, "card": "H200", "date": "2026-12-03", "command": "python benchmarks/mamba_layers.py",
                "baseline": baseline, "ours_ms": ms}

    rows = [row("layers/B1", "per block", 0.475), row("layers/B64", "per block", 0.959),
            row("layers/B1", "the model's chain", 0.380), row("layers/B64", "the model's chain", 1.013)]
    assert [(r["name"], r["ours_ms"]) for r in report.newest(rows)] == [("layers/B1", 0.380), ("layers/B64", 1.013)]


def test_report_keeps_a_note_with_a_bar_or_a_line_break_in_its_cell():
    """A note is one cell of a markdown table: the scan_split rows' "|split - unsplit|" ended the cell there, and the
    rest of the note fell past the table's last column, where GitHub shows nothing; "|" is escaped, lines joined."""
    report = load_script("benchmarks/report.py")
    note = "so |split - unsplit| printed 0;\nfloor corrected"
    rows = [{"name": "scan_split fwd", "card": "H200", "date": "2026-12-04", "command": "python s.py", "ours_ms": 1.0,
             "baseline": "unsplit | S=1", "note": note}]
    lines = [line for line in report.render(rows).splitlines() if line.startswith("|")]
    head, row = (re.split(r"(?<!\\)\|", line) for line in (lines[0], lines[2]))
    assert len(lines) == 3 and len(row) == len(head), lines
    assert row[-2].strip() == r"so \|split - unsplit\| printed 0; floor corrected"
    assert row[4].strip() == r"unsplit \| S=1"


def test_report_leaves_the_note_of_a_row_whose_note_is_null_empty():
    """generate.py wrote "note": null in some rows (lines 738-739 of results.jsonl): as the newest row of its name the
    note column said "None"."""
    report = load_script("benchmarks/report.py")
    rows = [{"name": "generate/jamba/B64", "card": "H200", "date": "2026-12-05", "command": "python g.py",
             "ours_ms": 0.5, "note": None}]
    (line,) = [line for line in report.render(rows).splitlines() if line.startswith("| generate/")]
    assert line.endswith("| 0.5 | — | — | — | — |  |") and "None" not in line, line


def decode_row(name: str, card: str, ms: float, floor: float, vs: float) -> dict:
    """A generate.py row at a 2K prompt, of one run per card."""
    return {"name": name, "card": card, "date": "2026-12-04", "command": f"python g.py # {card}", "ours_ms": ms,
            "floor_ms": floor, "vs_transformerpp": vs, "prompt_len": 2048}


def test_report_rows_name_the_run_that_measured_them():
    """A group's table listed its runs (card, date, command) above rows that did not say which was theirs: the
    generate table mixed H100 and H200 rows, floors from two bandwidths, with nothing to tell them apart; the 5x
    table gave a date and no card. Each run is numbered and each row names its number; the 5x table names the card."""
    report = load_script("benchmarks/report.py")

    rows = [decode_row("generate/transformerpp/B64", "H200", 2.0, 1.2, 1.0),
            decode_row("generate/mamba/B64", "H200", 0.5, 0.1, 4.0),
            decode_row("generate/transformerpp/B1", "H100", 3.0, 1.8, 1.0)]
    lines = report.render(rows).splitlines()
    runs = dict(line.removeprefix("- run ").split(": ", 1) for line in lines if line.startswith("- run "))
    head = lines.index(next(line for line in lines if line.startswith("| name")))
    assert lines[head].split(" | ")[1] == "run"
    card_of = {cells[0][2:]: runs[cells[1]].split(",")[0] for cells in (line.split(" | ") for line in lines[head + 2:])
               if len(cells) > 2}
    assert card_of == {"generate/transformerpp/B64": "H200", "generate/mamba/B64": "H200",
                       "generate/transformerpp/B1": "H100"}
    (mamba,) = [line.split(" | ") for line in report.decode_bounds(rows).splitlines() if line.startswith("| mamba")]
    assert mamba[3] == "H200, 2026-12-04", mamba


@pytest.mark.parametrize("results, out, says", [
    (None, None, "--results {tmp}/absent.jsonl: No such file or directory"),
    ('{"name": "a", "card": "H200", "date": "2026-12-04", "command": "c"}\n{"name": "b"', None, "line 2: not JSON"),
    ('{"name": "a", "date": "2026-12-04", "command": "c", "ours_ms": 1.0}', None, "line 1: no card;"),
    ('{"name": "a", "card": "H200", "date": "2026-12-04", "command": "c"}', "# R\n<!-- results:begin -->\nold\n",
     "no <!-- results:end -->"),
    ('{"name": "generate/transformerpp/B64", "card": "H200", "date": "2026-12-04", "command": "c", "ours_ms": 2.0, '
     '"floor_ms": 1.2}\n{"name": "generate/mamba/B64", "card": "H200", "date": "2026-12-04", "command": "c", '
     '"ours_ms": "0.5", "floor_ms": 0.1, "vs_transformerpp": 4.0}', None, 'line 2: its ours_ms "0.5" is not a number')],
    ids=["no-file", "bad-json", "no-card", "no-end-marker", "text-time"])
def test_report_refuses_bad_inputs_in_one_line(results, out, says, tmp_path):
    """A missing results file, a line that is not JSON or a row without its name ended in tracebacks; a row without
    card, date or command was rendered as 'None, None: `None`'; an --out whose end marker was lost, an IndexError; a
    generate row's time given as text, a ValueError in the 5x table."""
    report = load_script("benchmarks/report.py")
    path = tmp_path / ("absent.jsonl" if results is None else "results.jsonl")
    if results is not None:
        path.write_text(results)
    target = tmp_path / "RESULTS.md"
    if out is not None:
        target.write_text(out)
    with pytest.raises(SystemExit) as e:
        report.main(["--results", str(path), "--out", str(target)])
    assert isinstance(e.value.code, str) and says.format(tmp=tmp_path) in e.value.code, e.value.code
    assert out is None or target.read_text() == out


@pytest.mark.parametrize("text, says", [(None, "No such file or directory"), ('{"name": "generate/mamba/B1"\n',
                                                                                "line 1: not JSON")])
def test_plot_decode_refuses_a_missing_or_broken_results_file_in_one_line(text, says, tmp_path):
    plot = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as e:
        plot.main(["--results", str(path), "--out", str(tmp_path / "decode.png")])
    assert isinstance(e.value.code, str) and f"--results {path}" in e.value.code and says in e.value.code, e.value.code


@pytest.mark.parametrize("row, says", [
    ([1, 2], "line 2: a JSON list, not an object"),
    ({"name": None, "card": "c", "date": "d"}, "line 2: its name null is not text"),
    ({"name": "generate/mamba/B1", "card": 3, "date": "d", "ours_ms": 1.0}, "line 2: its card 3 is not text"),
    ({"name": "generate/mamba/B1", "card": "c", "date": "d", "ours_ms": "0.5"}, "line 2: its ours_ms \"0.5\" is not"),
    ({"name": "generate/mamba/B1", "card": "c", "date": "d", "ours_ms": 0.5, "vs_transformerpp": "2x"},
     "line 2: its vs_transformerpp \"2x\" is not a number")])
def test_plot_decode_refuses_a_row_it_cannot_read_in_one_line_naming_it(row, says, tmp_path):
    """A line that is JSON but not an object, a null name, a card that is not text or a time that is not a number
    ended in a traceback (AttributeError, TypeError) from the middle of the plot, and a speed-up that is not a number
    was drawn as matplotlib's category "2x" on the log axis; each is refused naming its line."""
    plot = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    good = {"name": "generate/transformerpp/B1", "card": "c", "date": "d", "ours_ms": 1.0}
    path.write_text(f"{json.dumps(good)}\n{json.dumps(row)}\n")
    with pytest.raises(SystemExit) as e:
        plot.main(["--results", str(path), "--out", str(tmp_path / "decode.png")])
    assert isinstance(e.value.code, str) and f"--results {path} {says}" in e.value.code, e.value.code


def test_plot_decode_draws_a_generate_row_without_a_date(tmp_path, capsys):
    """A generate row without a date ended in KeyError: 'date' after the PNG was drawn; its date reads '?'."""
    plot = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"name": "generate/transformerpp/B1", "card": "c", "ours_ms": 1.0}) + "\n")
    plot.main(["--results", str(path), "--out", str(tmp_path / "decode.png")])
    assert "1.000 ms  ?" in capsys.readouterr().out


def test_decode_bounds_pair_each_model_with_transformerpp_and_its_floor():
    """The 5x table: a model's bound is the same run's Transformer++ time over the model's floor; a model whose
    state bytes alone keep it under 5x at its floor is marked unreachable; baselines and other variants are left
    out, and a variant pairs with Transformer++'s same variant."""
    report = load_script("benchmarks/report.py")

    def row(name, ms, floor, vs=None, date="2026-12-04"):
        return {"name": name, "card": "H200", "date": date, "command": "python g.py", "ours_ms": ms,
                "floor_ms": floor, "vs_transformerpp": vs, "prompt_len": 8192 if "P8192" in name else 2048}

    rows = [row("generate/transformerpp/B64", 2.0, 1.2, 1.0), row("generate/mamba/B64", 0.5, 0.1, 4.0),
            row("generate/mamba2/B64", 1.0, 0.5, 2.0), row("generate/hf-mamba/B64", 9.0, 0.1),
            row("generate/mamba/B1", 0.3, 0.1, 2.0), row("generate/mamba/B64/skinny", 0.4, 0.1, 5.0),
            row("generate/transformerpp/B64/P8192", 5.0, 4.0, 1.0), row("generate/gla/B64/P8192", 1.0, 0.2, 5.0)]
    table = report.decode_bounds(rows)
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == ["mamba", "mamba2", "gla"]  # B1, hf, skinny left out
    mamba, mamba2, gla = (line.split(" | ") for line in lines)
    assert mamba[6] == "2.000" and mamba[8] == "4.00x" and mamba[9] == "20.00x" and mamba[10] == "12.00x"
    assert mamba[11] == "yes |" and mamba2[9] == "4.00x" and mamba2[11] == "no |"
    assert gla[1] == "8192" and gla[9] == "25.00x" and gla[10] == "20.00x"
    assert report.decode_bounds([row("generate/mamba/B64", 0.5, 0.1, 4.0)]) == ""  # no Transformer++: nothing


@pytest.mark.parametrize("flags", [["--batches", "1,x"], ["--batches", "0"], ["--batches", ","],
                                   ["--new-tokens", "0"], ["--prompt-len", "0"], ["--warmup", "-1"]],
                         ids=["not-a-number", "zero-batch", "no-batch", "no-tokens", "no-prompt", "negative-warmup"])
def test_generate_refuses_bad_sizes_in_one_line_naming_the_option(flags, monkeypatch, capsys):
    """--batches was split and int()ed after the CUDA check (a traceback on a GPU, after nothing had been measured),
    and 0 new tokens divided by zero after each model's prefill: all are argparse's one-line errors now."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/generate.py")
    with pytest.raises(SystemExit) as e:
        script.main(flags)
    assert e.value.code == 2 and f"argument {flags[0]}:" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--models", "mamba", "gla", "mamba"], ["--batches", "1,16,1"]])
def test_generate_refuses_a_model_or_batch_named_twice(flags, monkeypatch, capsys):
    """--models mamba mamba measured the model twice, and an interruption's 'after N of M measurements' counted
    the repeat: a name given twice is refused before the CUDA check."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/generate.py")
    with pytest.raises(SystemExit) as e:
        script.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flags[0]}: {flags[1].split(',')[0]} given more than once" in err, err


class _HostEvent:
    """torch.cuda.Event's timing interface on the host clock (generate.measure on the CPU)."""

    def __init__(self, enable_timing: bool = False):
        self.t = 0.0

    def record(self):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3


def _generate_on_cpu(monkeypatch):
    """benchmarks/generate.py with its CUDA calls made host no-ops and floor_ms returning the bytes it is given."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/generate.py")
    for attr, fn in {"synchronize": lambda *a: None, "empty_cache": lambda: None, "Event": _HostEvent,
                     "reset_peak_memory_stats": lambda *a: None, "max_memory_allocated": lambda *a: 0}.items():
        monkeypatch.setattr(torch.cuda, attr, fn)
    monkeypatch.setattr(script, "floor_ms", lambda nbytes, flops=0.0: float(nbytes))
    return script


def _tiny(name: str):
    from transformers import AutoModelForCausalLM

    import zoo

    torch.manual_seed(0)
    config = zoo.ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{name}.yaml")
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.skipif(torch.cuda.is_available(), reason="generate.measure with its CUDA calls stubbed, on the CPU")
def test_generate_floor_counts_a_hybrids_recurrent_states_read_and_written(monkeypatch):
    """A decode step reads every layer's cache and writes every recurrent layer's states back. The floor counted
    the writes only when every layer was recurrent, so a hybrid's (Jamba-style) Mamba states were read but never
    written: its floor, and the 5x table's bounds derived from it, came out too fast. The keys and values were
    counted at the prompt's length, not at the longer contexts the timed steps read."""
    from zoo.cache import RecurrentLayer
    from zoo.decode import prefill

    script = _generate_on_cpu(monkeypatch)
    for name in ("jamba-tiny", "mamba-tiny", "transformerpp-tiny"):
        model = _tiny(name)
        prompt = torch.randint(0, 512, (2, 8))
        cache = prefill(model, prompt).cache
        states = sum(t.nbytes for layer in cache.layers if isinstance(layer, RecurrentLayer) for t in layer.tensors())
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
                 if not isinstance(layer, RecurrentLayer))
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        row = script.measure(model, name.split("-")[0], batch=2, prompt_len=8, n_tokens=2, warmup=1, graph="off")
        # the keys and values at the timed steps' mean context, 8 + 1 + (2 + 1) / 2 tokens, not the prompt's 8
        growth = round(kv * ((8 + 1 + 1.5) / 8 - 1))
        assert row["mode"] == "eager" and row["floor_ms"] == params + row["cache_mib"] * 2**20 + states + growth, name
        assert (states > 0) == (name != "transformerpp-tiny") and (kv > 0) == (name != "mamba-tiny")
        # read after the eager timing (off) or after one untimed step (only), the cache had other lengths
        only = script.measure(model, name.split("-")[0], batch=2, prompt_len=8, n_tokens=2, warmup=1, graph="only")
        assert (only["floor_ms"], only["cache_mib"]) == (row["floor_ms"], row["cache_mib"]), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="generate.measure with its CUDA calls stubbed, on the CPU")
def test_generate_graph_only_times_eagerly_where_the_graph_fails(monkeypatch):
    """--graph only skips the eager timing of graphable models; where the capture then fails (caught, kept as
    graph_error) the model had no timing at all and min() of nothing ended the whole run in a ValueError, every
    row measured so far unwritten. It is timed eagerly instead, the capture's error kept."""
    script = _generate_on_cpu(monkeypatch)  # GraphDecoder refuses a model that is not on CUDA
    row = script.measure(_tiny("mamba-tiny"), "mamba", batch=2, prompt_len=8, n_tokens=2, warmup=1, graph="only")
    assert row["graphable"] and "CUDA" in row["graph_error"]
    assert row["mode"] == "eager" and row["ms"] == row["eager_ms"] > 0 and row["tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="generate.measure with its CUDA calls stubbed, on the CPU")
def test_generate_reports_the_graph_decodes_own_peak_memory(monkeypatch):
    """decode_peak_gib is read over the eager decode, before the CUDA-graph decoder exists, so a row whose figure is
    the graph's left out its static caches and memory pool. The graph decode's peak is its own field now."""
    script = _generate_on_cpu(monkeypatch)
    peaks = iter([3 * 2**30, 5 * 2**30])  # the eager decode's, then the graph decode's
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))
    monkeypatch.setattr(script, "GraphDecoder", lambda model, state, max_new_tokens: script.EagerDecoder(model, state))
    row = script.measure(_tiny("mamba-tiny"), "mamba", batch=2, prompt_len=8, n_tokens=2, warmup=1, graph="auto")
    assert row["decode_peak_gib"] == 3 and row["graph_peak_gib"] == 5 and row["graph_ms"] > 0
    rows = script.make_rows({("mamba", 2): row}, "cpu", "test", prompt_len=8, n_tokens=2)
    assert rows[0]["graph_peak_gib"] == 5 and "| 5.00 |" in script.markdown_table(rows)

def test_decode_bounds_take_transformerpps_floor_from_the_models_own_run():
    """"both at floors" divides Transformer++'s floor by the model's: both from one run. The newest Transformer++
    row was taken instead, so re-measuring Transformer++ alone (on another card: another bandwidth; or eagerly: a
    longer KV cache) changed every model's bound against a floor its row was never measured beside."""
    report = load_script("benchmarks/report.py")

    rows = [decode_row("generate/transformerpp/B64", "H200", 2.0, 1.2, 1.0),
            decode_row("generate/mamba/B64", "H200", 0.5, 0.1, 4.0),
            decode_row("generate/transformerpp/B64", "H100", 3.0, 1.8, 1.0)]
    (mamba,) = [line.split(" | ") for line in report.decode_bounds(rows).splitlines() if line.startswith("| mamba")]
    assert mamba[7] == "1.200" and mamba[10] == "12.00x", mamba


def test_decode_bounds_take_transformerpp_from_the_models_own_call_of_a_command_run_twice_a_day():
    """Keyed by card, date and command, a model's Transformer++ was the last one of that command that day: a second
    call cut short after Transformer++ (generate measures it first) paired its Transformer++ with the first call's
    model rows, beside their vs_transformerpp measured against the first call's."""
    report = load_script("benchmarks/report.py")

    def row(name, ms, floor, vs):
        return {"name": name, "card": "H200", "date": "2026-12-04", "command": "python g.py", "ours_ms": ms,
                "floor_ms": floor, "vs_transformerpp": vs, "prompt_len": 2048}

    rows = [row("generate/transformerpp/B64", 2.0, 1.2, 1.0), row("generate/mamba/B64", 0.5, 0.1, 4.0),
            row("generate/transformerpp/B64", 3.0, 1.8, 1.0)]
    (mamba,) = [line.split(" | ") for line in report.decode_bounds(rows).splitlines() if line.startswith("| mamba")]
    assert mamba[6] == "2.000" and mamba[7] == "1.200" and mamba[9] == "20.00x", mamba


def test_decode_bounds_take_transformerpps_time_from_its_row_not_from_the_rounded_ratio():
    """"Transformer++ ms (same run)" and "at its floor" used the model's vs_transformerpp x ours_ms, both rounded, in
    place of the Transformer++ row measured beside it: one run's Transformer++ showed as 5.094-5.098 ms on four
    lines (its row: 5.095), and Mamba-2's bound at a 2K prompt as 2.86x (1.552 x 1.194 / 0.6489) where the run's
    1.852 ms gives 2.85x. The rows below are the thirteenth session's final call's (results.jsonl)."""
    report = load_script("benchmarks/report.py")

    def row(name, ms, floor, vs):
        return {"name": name, "card": "NVIDIA H200", "date": "2026-12-03", "command": "python g.py", "ours_ms": ms,
                "floor_ms": floor, "vs_transformerpp": vs, "prompt_len": 2048}

    rows = [row("generate/transformerpp/B64", 1.852, 1.2035, 1.0), row("generate/mamba2/B64", 1.194, 0.6489, 1.552)]
    (mamba2,) = [line.split(" | ") for line in report.decode_bounds(rows).splitlines() if line.startswith("| mamba2")]
    assert mamba2[6] == "1.852" and mamba2[8] == "1.55x" and mamba2[9] == "2.85x" and mamba2[10] == "1.85x", mamba2


def _half_ulp(x: float) -> float:
    """Half a unit in the last decimal place of x as stored (json keeps the shortest repr): its rounding."""
    mantissa, _, exponent = repr(float(x)).lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def test_every_results_row_names_its_run_and_its_ratio_is_its_baseline_over_ours():
    """benchmarks/results.jsonl, every row: its card, date and command; the baseline fields (null where the script
    measured none); a ratio only beside the baseline it divides, equal to baseline_ms / ours_ms to the rounding of
    the three stored figures; a ratio against zoo's Transformer++ equal to the row's vs_transformerpp; no row twice."""
    import json
    import re

    lines = [line for line in (ROOT / "benchmarks" / "results.jsonl").read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    seen = {}
    for n, row in enumerate(rows, 1):
        where = f"results.jsonl line {n} ({row.get('name')})"
        for key in ("name", "card", "command"):
            assert isinstance(row.get(key), str) and row[key].strip(), f"{where}: no {key}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(row.get("date"))), f"{where}: date {row.get('date')!r}"
        for key in ("ours_ms", "baseline", "baseline_ms", "ratio", "floor_ms"):
            assert key in row, f"{where}: no {key} field"
        base, base_ms, ours, ratio = row["baseline"], row["baseline_ms"], row["ours_ms"], row["ratio"]
        assert (base is None) == (base_ms is None), f"{where}: baseline {base!r} with baseline_ms {base_ms!r}"
        if ratio is not None:
            assert base_ms is not None and ours, f"{where}: a ratio without the two times it divides"
            lo = (base_ms - _half_ulp(base_ms)) / (ours + _half_ulp(ours)) - _half_ulp(ratio)
            hi = (base_ms + _half_ulp(base_ms)) / (ours - _half_ulp(ours)) + _half_ulp(ratio)
            assert lo <= ratio <= hi, f"{where}: ratio {ratio} but baseline_ms / ours_ms = {base_ms / ours:.4f}"
            if str(base).startswith("zoo transformerpp") and row.get("vs_transformerpp") is not None:
                assert row["vs_transformerpp"] == ratio, f"{where}: vs_transformerpp {row['vs_transformerpp']}"
        key = json.dumps(row, sort_keys=True)
        assert key not in seen, f"{where}: the same row as line {seen[key]}"
        seen[key] = n


def test_train_throughput_command_takes_a_script_outside_the_repository(monkeypatch, tmp_path):
    """The rows' command took the script's path relative_to the repository: started by an absolute path outside it
    (a copy, or the repository through a symlink) it failed with a ValueError after the CUDA check."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/train_throughput.py")
    outside = tmp_path / "train_throughput.py"
    assert script.command_line([str(outside), "--steps", "5"]) == f"python {outside} --steps 5"
    (tmp_path / "repo").symlink_to(ROOT)
    linked = tmp_path / "repo" / "benchmarks" / "train_throughput.py"
    assert script.command_line([str(linked), "--models", "mamba"]) == \
        "python benchmarks/train_throughput.py --models mamba"
    assert script.command_line(["benchmarks/train_throughput.py"]) == "python benchmarks/train_throughput.py"


def test_train_throughput_mfu_counts_the_active_parameters_as_zoo_train_does():
    """The benchmark's MFU and floor were 6 · all parameters · tokens/s, zoo.train's 6 · active parameters: a MoE
    model's two MFUs disagreed. Both now leave out the experts a token skips (mfu_6n, floor_ms_6n)."""
    script = load_script("benchmarks/train_throughput.py")
    r = {"params": 4_000_000, "active_params": 1_000_000, "tokens_per_step": 1000, "step_ms": 10.0,
         "tokens_per_s": 1e5, "packing": True, "micro_batch": 1, "grad_accum": 1, "steps_timed": 2,
         "peak_mem_gib": 1.0, "loss_first": 5.0, "loss_last": 4.0, "backend": {},
         "flops_per_token": 9e6, "mfu_formula": "3x_forward"}
    base = dict(r, active_params=4_000_000, params=4_000_000, tokens_per_s=2e5, flops_per_token=3e7)
    rows = {row["model"]: row for row in script.make_rows({("jamba", 8): r, ("hf-llama", 8): base}, "cpu", "test",
                                                          peak=1.0, compile_=False)}
    ours, theirs = rows[script.LABEL["jamba"]], rows[script.LABEL["hf-llama"]]
    assert ours["mfu_6n"] == pytest.approx(6 * 1e6 * 1e5 / 1e12, rel=1e-3)
    assert ours["floor_ms_6n"] == pytest.approx(6 * 1e6 * 1000 / 1e12 * 1e3, rel=1e-2)
    assert ours["baseline_mfu_6n"] == pytest.approx(theirs["mfu_6n"]) == pytest.approx(6 * 4e6 * 2e5 / 1e12, rel=1e-3)
    assert (ours["params"], ours["active_params"]) == (4_000_000, 1_000_000)


def test_train_throughput_mfu_counts_zoo_trains_training_flops_with_the_6n_figure_beside_it():
    """The benchmark's mfu was 6 · active parameters · tokens/s / peak, which leaves attention's FLOPs out (1.6 x 6N
    for the 130M Transformer++ at L = 8192). It is zoo.train's mfu now: the run's training FLOPs per token
    (run_info.json's flops_per_token, named by mfu_formula) · tokens/s / peak, and floor_ms follows the same FLOPs;
    mfu_6n keeps the old figure, and the table says which is which."""
    script = load_script("benchmarks/train_throughput.py")
    r = {"params": 4_000_000, "active_params": 1_000_000, "tokens_per_step": 1000, "step_ms": 10.0,
         "tokens_per_s": 1e5, "packing": True, "micro_batch": 1, "grad_accum": 1, "steps_timed": 2,
         "peak_mem_gib": 1.0, "loss_first": 5.0, "loss_last": 4.0, "backend": {},
         "flops_per_token": 9e6, "mfu_formula": "3x_forward"}
    base = dict(r, active_params=4_000_000, params=4_000_000, tokens_per_s=2e5, flops_per_token=2.4e7,
                mfu_formula="6n_active")
    rows = script.make_rows({("jamba", 8): r, ("hf-llama", 8): base}, "cpu", "test", peak=1.0, compile_=False)
    by_model = {row["model"]: row for row in rows}
    ours, theirs = by_model[script.LABEL["jamba"]], by_model[script.LABEL["hf-llama"]]
    assert ours["mfu"] == pytest.approx(9e6 * 1e5 / 1e12, rel=1e-3) and ours["mfu_formula"] == "3x_forward"
    assert ours["floor_ms"] == pytest.approx(9e6 * 1000 / 1e12 * 1e3, rel=1e-2)
    assert ours["baseline_mfu"] == pytest.approx(theirs["mfu"]) == pytest.approx(2.4e7 * 2e5 / 1e12, rel=1e-3)
    assert ours["baseline_mfu_formula"] == theirs["mfu_formula"] == "6n_active"
    table = script.markdown_table(rows).splitlines()
    assert "MFU (3x forward FLOPs)" in table[0] and "MFU (6N)" in table[0]
    assert len({line.count("|") for line in table}) == 1, "every line has the header's columns"


@pytest.mark.parametrize("flags", [["--seq-lens", "0"], ["--steps", "0"], ["--warmup", "-1"], ["--grad-accum", "0"],
                                   ["--peak-tflops", "0"], ["--hf-mamba-seq-lens", "-2048"]],
                         ids=["zero-length", "no-steps", "negative-warmup", "no-accumulation", "no-peak",
                              "negative-hf-length"])
def test_train_throughput_refuses_bad_sizes_in_one_line_naming_the_option(flags, monkeypatch, capsys):
    """L = 0 divided by zero and --steps 0 failed on 'no timed steps' after training the first model's warmup, both in
    tracebacks on a GPU; --peak-tflops 0 was taken for the card's own peak. argparse refuses them in one line now."""
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", *flags])
    script = load_script("benchmarks/train_throughput.py")
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2 and f"argument {flags[0]}:" in capsys.readouterr().err


def fake_training_card(monkeypatch) -> None:
    """torch.cuda as train_throughput.py reads it, on a CPU: a card named 'test card' whose peak memory is 1 GiB."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "test card")
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 2 ** 30)


def write_run_info(cfg) -> None:
    """The run_info.json a zoo.train run of `cfg` writes, as train_throughput.py reads it (stub figures)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / "run_info.json").write_text(json.dumps({
        "params": 1000, "tokens_per_step": 4096, "flops_per_token": 6000.0, "mfu_formula": "3x_forward",
        "backend": {}}))


@pytest.mark.parametrize("models, mamba_note, tpp_note", [
    (["mamba", "transformerpp"], "transformers MambaForCausalLM 130M not in --models",
     "transformers LlamaForCausalLM 125M not in --models"),
    (["mamba", "transformerpp", "hf-mamba", "hf-llama"], "transformers MambaForCausalLM 130M not timed at L = 2048 "
     "(per-token scan loop; see --hf-mamba-seq-lens)", None)], ids=["baselines-left-out", "hf-mamba-at-another-L"])
def test_train_throughput_rows_say_why_their_baseline_is_missing(models, mamba_note, tpp_note, tmp_path, monkeypatch):
    """A Mamba row without transformers' Mamba said it was not timed at this length, see --hf-mamba-seq-lens, also
    where --models had left it out; a Transformer++ or Jamba row without Llama said nothing of its missing baseline."""
    from types import SimpleNamespace

    script = load_script("benchmarks/train_throughput.py")

    def train(cfg, on_step):
        write_run_info(cfg)
        for step in range(1, cfg.train.max_steps + 1):
            on_step(step, {"loss": 5.0, "real_tokens": 4096})
        return SimpleNamespace(stopped=False, step=cfg.train.max_steps)

    monkeypatch.setattr(script, "train", train)
    fake_training_card(monkeypatch)
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(sys, "argv", ["benchmarks/train_throughput.py", "--models", *models, "--seq-lens", "2048",
                                      "--hf-mamba-seq-lens", "8192", "--warmup", "1", "--steps", "2",
                                      "--peak-tflops", "1", "--out", str(out)])
    script.main()
    rows = {row["name"]: row for row in map(json.loads, out.read_text().splitlines())}
    mamba, tpp = rows["train_throughput/mamba/L2048"], rows["train_throughput/transformerpp/L2048"]
    assert mamba["baseline"] is None and mamba["note"] == f"no baseline: {mamba_note}", mamba["note"]
    assert tpp.get("note") == (tpp_note and f"no baseline: {tpp_note}"), tpp.get("note")


@pytest.mark.parametrize("bare", [False, True], ids=["stopped-training", "bare-ctrl-c"])
def test_train_throughput_interrupted_writes_the_rows_it_measured(bare, tmp_path, monkeypatch, capsys):
    """train_throughput appended its rows only after the last measurement: a Ctrl-C or `timeout`'s SIGTERM (which
    zoo.train takes as a request to stop, returning normally) lost every finished one. Worse, the stopped model was
    timed on the steps it had done as if complete (or failed on too few) and the next model trained on, so one
    interruption stopped nothing. A stopped training now ends the run, and the finished measurements are written,
    each row's note saying the run was cut short (a bare Ctrl-C, as a second one mid-step raises, is named: the note
    read 'run interrupted ()')."""
    from types import SimpleNamespace

    script = load_script("benchmarks/train_throughput.py")
    trained = []

    def train(cfg, on_step):  # zoo.train on a signal after 3 of the 25 steps: saved, stopped, returned
        trained.append(cfg.model)
        write_run_info(cfg)
        steps = 3 if len(trained) == 3 else cfg.train.max_steps
        if bare and len(trained) == 3:
            raise KeyboardInterrupt
        for step in range(1, steps + 1):
            on_step(step, {"loss": 5.0 - step / 100, "real_tokens": 4096})
        return SimpleNamespace(stopped=steps < cfg.train.max_steps, step=steps)

    monkeypatch.setattr(script, "train", train)
    fake_training_card(monkeypatch)
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(sys, "argv", ["benchmarks/train_throughput.py", "--models", "mamba", "transformerpp", "jamba",
                                      "hf-llama", "--seq-lens", "2048", "--peak-tflops", "1", "--out", str(out)])
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        script.main()
    assert signal.getsignal(signal.SIGTERM) is handler  # (zoo.eval.common.sigterm_interrupts' for the run, then back)
    assert e.value.code == 130 and len(trained) == 3  # jamba's stopped training ended the run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["name"] for row in rows] == ["train_throughput/mamba/L2048", "train_throughput/transformerpp/L2048"]
    note = (f"run interrupted ({'Ctrl-C' if bare else 'jamba L=2048 stopped after 3 of 25 steps'}) after 2 of 4 "
            f"measurements")
    assert all(row["note"] == note for row in rows), rows
    assert note in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--new-tokens", "0"], ["--prompt-len", "0"], ["--repeats", "0"],
                                   ["--threads", "0"], ["--device", "cpux"]])
def test_eager_decode_overhead_refuses_bad_counts_and_devices_in_one_line(flags, capsys):
    """0 new tokens, an empty prompt, 0 repeats, 0 threads or a misspelt device each ended in a traceback from deep
    inside transformers, the prompt, statistics.median or torch, after the model was built."""
    script = load_script("benchmarks/eager_decode_overhead.py")
    with pytest.raises(SystemExit) as e:
        script.main(["--families", "mamba", *flags])
    assert e.value.code == 2 and f"{flags[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("gpus, device, message", [
    (1, "cuda:1", "--device 'cuda:1': this machine has 1 CUDA device visible to torch (cuda:0)"),
    (0, "cuda", "--device 'cuda': torch sees no CUDA device"),
])
def test_eager_decode_overhead_refuses_a_gpu_the_machine_lacks_in_one_line(gpus, device, message, capsys,
                                                                           monkeypatch):
    # cuda:N past the GPUs torch sees passed its check of the device ('cuda' and a GPU visible) and built the model
    # there, ending in a traceback ('CUDA error: invalid device ordinal')
    script = load_script("benchmarks/eager_decode_overhead.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(SystemExit) as e:
        script.main(["--families", "mamba", "--device", device])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eager_decode_overhead_times_a_family_on_the_cpu(capsys):
    import json

    script = load_script("benchmarks/eager_decode_overhead.py")
    script.main(["--families", "gla", "--new-tokens", "2", "--repeats", "1", "--json"])
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert list(result) == ["gla"] and result["gla"] > 0
    if not torch.cuda.is_available():  # (refused in one line by zoo.eval.common.resolve_device, exit status 2)
        with pytest.raises(SystemExit) as e:
            script.main(["--device", "cuda"])
        assert e.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--profile", "torch", "--cuda-graph"], "--cuda-graph: options of the timing, which --profile does not run"),
    (["--dump", "x.pt", "--json", "--repeats", "3"], "--json, --repeats: options of the timing, which --dump"),
    (["--profile", "cprofile", "--dump", "x.pt"], "--profile and --dump: each runs on its own"),
])
def test_eager_decode_overhead_refuses_timing_options_that_profile_and_dump_ignore(tmp_path, monkeypatch, capsys,
                                                                                  flags, message):
    """--profile (and --dump) run one plain generate() per family and return: --cuda-graph, --json and --repeats were
    taken and did nothing, so a `--profile torch --cuda-graph` run profiled the eager call without a word."""
    monkeypatch.chdir(tmp_path)
    script = load_script("benchmarks/eager_decode_overhead.py")
    monkeypatch.setattr(script, "build", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as e:
        script.main(["--families", "gla", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="generate.measure with its CUDA calls stubbed, on the CPU")
def test_generate_floor_counts_low_precision_states_at_their_dtype(monkeypatch):
    """With decode_state_dtype "model" a bf16 model's steps read and write bf16 recurrent states, but the prefill
    leaves them in fp32: the floor counted the prefill's fp32 bytes, twice too many (0.205 against 0.110 ms for
    Mamba-130M at batch 64 on the H100). The conv states stay fp32."""
    from transformers import AutoModelForCausalLM

    import zoo
    from zoo.cache import RecurrentLayer
    from zoo.decode import cache_nbytes, prefill

    script = _generate_on_cpu(monkeypatch)
    floors = {}
    for state_dtype in ("float32", "model"):
        torch.manual_seed(0)
        config = zoo.ZooConfig.from_yaml(ROOT / "configs" / "models" / "mamba-tiny.yaml",
                                         decode_state_dtype=state_dtype)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
        cache = prefill(model, torch.randint(0, 512, (2, 8))).cache
        recurrent = [layer for layer in cache.layers if isinstance(layer, RecurrentLayer)]
        assert all(layer.recurrent_state.dtype == torch.float32 for layer in recurrent)  # as the prefill leaves it
        kept = sum(layer.conv_state.numel() * 4 + layer.recurrent_state.numel() * (4 if state_dtype == "float32"
                                                                                  else 2) for layer in recurrent)
        assert sum(map(script.step_state_nbytes, recurrent)) == kept
        floors[state_dtype] = script.measure(model, "mamba", batch=2, prompt_len=8, n_tokens=2, warmup=1,
                                             graph="off")["floor_ms"]
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        other = cache_nbytes(cache) - cache_nbytes([layer.tensors() for layer in recurrent])  # the cache's rest
        assert floors[state_dtype] == params + other + 2 * kept, state_dtype
    assert floors["model"] < floors["float32"]


def test_scan_split_floor_counts_the_exponentials_as_the_selective_scan_benchmark_does(monkeypatch):
    """scan_split.py's floor was the bytes over the copy bandwidth alone. The scan is bound by its exponentials
    (one ex2 per token, channel and state, twice with the backward): on the H200 its 130M B=8 L=2048 rows read a
    0.0477 ms forward floor where selective_scan.py's rows of the same kernel and shape read 0.0972, so every
    scan_split row was put at about twice its distance from the floor."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their neighbours, as when run
    script = load_script("benchmarks/scan_split.py")
    scan = load_script("benchmarks/selective_scan.py")
    bw, ex2 = 4.24e12, 4.14e12  # the H200's copy bandwidth and ex2 rate in selective_scan.py's rows
    monkeypatch.setattr(script, "copy_bandwidth", lambda: bw)
    fwd, both = script.floors(8, 2048, 1536, ex2)
    exps = 8 * 2048 * 1536 * 16
    assert (fwd, both) == pytest.approx((exps / ex2 * 1e3, 2 * exps / ex2 * 1e3))  # the exponentials bind here
    assert (fwd, both) == pytest.approx(scan.floors(8, 2048, 1536, bw, ex2))
    fwd, both = script.floors(8, 2048, 1536, 1e30)  # with exponentials for free, the bytes bind
    assert (fwd, both) == pytest.approx(scan.floors(8, 2048, 1536, bw, 1e30)) and fwd > 0.04


def test_generate_rows_say_why_their_baseline_is_missing(monkeypatch):
    """A zoo Mamba row without transformers' Mamba (left out of --models, or out of memory) had a null baseline and
    ratio and no word of why, where train_throughput's rows say it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/generate.py")
    r = {"batch": 64, "prefill_ms": 5.0, "graphable": True, "cache_mib": 1.0, "ms": 1.0, "tokens_per_s": 64e3,
         "graph_ms": 1.0, "mode": "graph"}
    tpp = {**r, "ms": 2.0, "graph_ms": 2.0}
    results = {("transformerpp", 64): tpp, ("mamba", 64): r}
    rows = script.make_rows(results, "cpu", "test", 2048, 128, models=["transformerpp", "mamba"])
    assert {row["name"]: row["note"] for row in rows} == {
        "generate/mamba/B64": "no baseline: transformers MambaForCausalLM 130M not in --models",
        "generate/transformerpp/B64": "no baseline: transformers LlamaForCausalLM 125M not in --models"}
    oom = {"batch": 64, "ms": None, "tokens_per_s": None, "note": "out of memory"}
    (row,) = [row for row in script.make_rows({**results, ("hf-mamba", 64): oom}, "cpu", "test", 2048, 128,
                                              models=["transformerpp", "mamba", "hf-mamba", "hf-llama"])
              if row["name"] == "generate/mamba/B64"]
    assert row["note"] == "no baseline: transformers MambaForCausalLM 130M out of memory"


def test_generate_rows_keep_the_graph_error_beside_an_out_of_memory_note(monkeypatch):
    """--graph only: a model whose capture failed is timed eagerly, and where that runs out of memory the row's
    "out of memory" note replaced the capture's error, so the row no longer said why it had no graph figure."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/generate.py")
    r = {"batch": 64, "prefill_ms": 5.0, "graphable": True, "cache_mib": 1.0, "graph_error": "RuntimeError: capture",
         "ms": None, "tokens_per_s": None, "note": "out of memory"}
    row, = script.make_rows({("mamba", 64): r}, "cpu", "test", prompt_len=2048, n_tokens=128)
    assert row["note"] == "RuntimeError: capture; out of memory"
    r = {**r, "ms": 1.0, "tokens_per_s": 64e3, "eager_ms": 1.0, "mode": "eager"}
    del r["note"]
    row, = script.make_rows({("mamba", 64): r}, "cpu", "test", prompt_len=2048, n_tokens=128)
    assert row["note"] == "RuntimeError: capture"


def test_generate_rows_say_when_the_transformerpp_ratio_mixes_decode_modes(monkeypatch):
    """vs_transformerpp divided Transformer++'s faster mode by each model's: where Transformer++'s capture failed, its
    eager step (a KV cache grown by concatenation) stood beside a recurrent model's graph step without a word. The
    row names Transformer++'s mode, notes a mix, and keeps the graph-against-graph ratio where both have one."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/generate.py")
    mamba = {"batch": 64, "prefill_ms": 5.0, "graphable": True, "cache_mib": 1.0, "ms": 1.0, "tokens_per_s": 64e3,
             "eager_ms": 3.0, "graph_ms": 1.0, "mode": "graph"}
    tpp = {**mamba, "ms": 4.0, "eager_ms": 4.0, "graph_ms": None, "mode": "eager", "graph_error": "RuntimeError: x"}
    rows = {r["model"]: r for r in script.make_rows({("mamba", 64): mamba, ("transformerpp", 64): tpp}, "cpu",
                                                     "test", prompt_len=2048, n_tokens=128)}
    row = rows[script.LABEL["mamba"]]
    assert row["vs_transformerpp"] == 4.0 and row["transformerpp_mode"] == "eager"
    assert "vs_transformerpp_graph" not in row and "graph step with Transformer++'s eager step" in row["note"]
    tpp = {**tpp, "ms": 2.0, "graph_ms": 2.0, "mode": "graph"}
    rows = {r["model"]: r for r in script.make_rows({("mamba", 64): mamba, ("transformerpp", 64): tpp}, "cpu",
                                                     "test", prompt_len=2048, n_tokens=128)}
    row = rows[script.LABEL["mamba"]]
    assert row["vs_transformerpp"] == row["vs_transformerpp_graph"] == 2.0 and "note" not in row


# micro-benchmarks whose rows go through ceilings.rows_kept_on_interrupt: argv, and whether `measure` returns a list
KEPT_ROWS = {"argmax": (["--batches", "1,2,3,4"], False), "cross_entropy": (["--rows", "1,2,3,4"], True),
             "decode_linear": (["--rows", "1,2,3,4", "--shapes", "in_proj"], False),
             "mamba_layers": (["--batches", "1,2,3,4"], False), "mamba_step": (["--batches", "1,2,3,4"], False)}


def _fake_card_run(name: str, stop_at: int | None, how: str, tmp_path, monkeypatch):
    """benchmarks/<name>.py's main on a pretended CUDA card, its measure() replaced by one that gives a row per call
    and is interrupted (Ctrl-C, or SIGTERM as `timeout` sends it) at call `stop_at`; returns (exit code, rows)."""
    import os

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script(f"benchmarks/{name}.py")
    argv, listed = KEPT_ROWS[name]
    calls = []

    def measure(*args, **kwargs):
        calls.append(args)
        if len(calls) == stop_at:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        row = {"name": f"{name}/{len(calls)}", "note": "as measured" if len(calls) == 1 else None}
        return [row] if listed else row

    monkeypatch.setattr(script, "measure", measure)
    for helper in ("describe", "copy_bandwidth"):
        if hasattr(script, helper):
            monkeypatch.setattr(script, helper, lambda: 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "test card")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *argv, "--out", str(out)])
    code = 0
    try:
        script.main()
    except SystemExit as e:
        code = e.code
    return code, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
@pytest.mark.parametrize("name", list(KEPT_ROWS))
def test_micro_benchmark_interrupted_writes_the_rows_it_measured(name, how, tmp_path, monkeypatch, capsys):
    """The micro-benchmarks appended their rows to --out only after the last measurement: Ctrl-C or `timeout`'s SIGTERM
    lost every finished one (in a traceback, or silently). The rows measured before are written now, each noted as
    cut short, the run says so in one line and exits 130; SIGTERM's own handler is back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    code, rows = _fake_card_run(name, 3, how, tmp_path, monkeypatch)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert code == 130 and [row["name"] for row in rows] == [f"{name}/1", f"{name}/2"]
    cut = f"run interrupted ({'signal 15' if how == 'sigterm' else 'Ctrl-C'}) after 2 rows"
    assert [row["note"] for row in rows] == [f"as measured; {cut}", cut]
    assert capsys.readouterr().err == f"\n{name}.py: {cut}; 2 rows appended to {tmp_path / 'results.jsonl'}\n"


@pytest.mark.parametrize("name", ["argmax", "mamba_step"])
def test_micro_benchmark_uninterrupted_writes_every_row_once(name, tmp_path, monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGTERM)
    code, rows = _fake_card_run(name, None, "", tmp_path, monkeypatch)
    assert code == 0 and signal.getsignal(signal.SIGTERM) is handler
    assert [row["name"] for row in rows] == [f"{name}/{i}" for i in range(1, 5)]
    assert [row["note"] for row in rows] == ["as measured", None, None, None]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_generate_interrupted_writes_its_rows_and_exits_130(how, tmp_path, monkeypatch, capsys):
    """generate.py writes the rows measured before Ctrl-C or SIGTERM and then leaves through os._exit (the teardown of
    half-built CUDA graphs hung): with status 0, so a run cut short by `timeout` passed for a finished one. 130 now,
    as train_throughput's and the micro-benchmarks'; a bare Ctrl-C is named in the rows' note (it read '()'). SIGTERM
    goes through zoo.eval.common.sigterm_interrupts as the micro-benchmarks' does (generate.py had its own handler,
    left set after main), and its handler is back afterwards."""
    import os

    script = _generate_on_cpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "test card")
    monkeypatch.setattr(script, "build", lambda name, *args: object())
    measured = []

    def measure(model, name, batch, *args):
        if len(measured) == 2:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        measured.append((name, batch))
        return {"name": name, "batch": batch}

    monkeypatch.setattr(script, "measure", measure)
    monkeypatch.setattr(script, "make_rows", lambda results, *args: [{"name": f"{k[0]}/B{k[1]}"} for k in results])
    monkeypatch.setattr(script, "markdown_table", lambda rows: "")

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(script.os, "_exit", exit_now)
    out = tmp_path / "results.jsonl"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        script.main(["--models", "mamba", "--batches", "1,2,4", "--out", str(out)])
    assert signal.getsignal(signal.SIGTERM) is handler
    assert e.value.code == 130
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["name"] for row in rows] == ["mamba/B1", "mamba/B2"]
    said = "signal 15" if how == "sigterm" else "Ctrl-C"
    assert all(row["note"] == f"run interrupted ({said}) after 2 of 3 measurements" for row in rows)


def _selective_scan_run(tmp_path, monkeypatch, stop_at: int | None, how: str = "ctrl-c", mamba: bool = True,
                        building: int | None = None):
    """benchmarks/selective_scan.py's main on a pretended card: its timings return (ours 1, 2), (reference 3, 6) and
    (mamba_ssm 2, 4) ms, the mamba_ssm build found done (or no sdist; or, with `building`, a build's BUILDING marker
    naming that process id, without STATUS), and the timing call `stop_at` is interrupted (Ctrl-C, or SIGTERM as
    `timeout` sends it); returns (exit code, rows written)."""
    import os

    from zoo_kernels.selective_scan import cuda as ss_cuda

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = load_script("benchmarks/selective_scan.py")
    tmp_path.mkdir(exist_ok=True)
    root = tmp_path / "baselines"
    if mamba:  # the sdist unpacked and its build finished: nothing is built or started here
        (root / "ss_mamba" / script.MAMBA / "csrc" / "selective_scan").mkdir(parents=True)
        (root / f"{script.MAMBA}.tar.gz").touch()
        (root / "ss_mamba" / "build").mkdir()
        if building is None:
            (root / "ss_mamba" / "build" / "STATUS").write_text("ok 1s")
        else:
            (root / "ss_mamba" / "build" / "BUILDING").write_text(str(building))

    def mamba_fn(*args):
        return torch.full((4,), 1.01)

    monkeypatch.setattr(script, "import_mamba", lambda root: mamba_fn)
    monkeypatch.setattr(ss_cuda, "available", lambda: True)
    ours_fn = ss_cuda.selective_scan_cuda
    calls = []

    def timings(fn, inp):
        calls.append(fn)
        if len(calls) == stop_at:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return (1.0, 2.0) if fn is ours_fn else (2.0, 4.0) if fn is mamba_fn else (3.0, 6.0)

    monkeypatch.setattr(script, "timings", timings)
    monkeypatch.setattr(script, "call", lambda fn, inp: torch.ones(4) if fn is ours_fn else fn())
    monkeypatch.setattr(script, "make_inputs", lambda *shape: {})
    monkeypatch.setattr(script, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(script, "ex2_rate", lambda: (1e12, "test"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "test card")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(sys, "argv", ["benchmarks/selective_scan.py", "--baselines", str(root), "--out", str(out)])
    code = 0
    with sigterm_raises_terminated() as handler:  # (where the script sets none, SIGTERM would end pytest)
        try:
            script.main()
        except SystemExit as e:
            code = e.code
        except (KeyboardInterrupt, Terminated) as e:  # the script let it through
            code = repr(e)
        assert signal.getsignal(signal.SIGTERM) is handler
    report = load_script("benchmarks/report.py")
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert report.newest(rows) == rows  # a figure's rows one after the other: report.py keeps every one of them
    return code, rows


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_selective_scan_interrupted_writes_the_rows_it_measured(how, tmp_path, monkeypatch, capsys):
    """selective_scan.py built its rows and appended them to --out only after every phase (ours and the torch reference
    on each shape, then the wait for mamba_ssm's build, then mamba_ssm on each shape): Ctrl-C or `timeout`'s SIGTERM
    lost every finished figure. The rows of the figures measured are written now, noted as cut short, exit 130."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports ceilings, as when run
    scan = load_script("benchmarks/selective_scan.py")
    # stopped at mamba_ssm's timing of the second shape: every shape's reference and floor rows, the first's mamba_ssm
    code, rows = _selective_scan_run(tmp_path, monkeypatch, 2 * len(scan.SHAPES) + 2, how)
    cut = f"run interrupted ({'signal 15' if how == 'sigterm' else 'Ctrl-C'}) after {len(rows)} rows"
    assert code == 130 and len(rows) == 3 * 2 * len(scan.SHAPES) - 2 * (len(scan.SHAPES) - 1)
    assert all(row["note"] == cut for row in rows) and cut in capsys.readouterr().err
    first = [row for row in rows if f"{scan.SHAPES[0][0]} (" in row["name"]]
    assert [row["baseline"].split()[0] for row in first] == ["mamba_ssm", "torch", "floor"] * 2
    assert all(row["err_vs_mamba"] == pytest.approx(0.01 / 1.01) for row in first)
    assert [row["ratio"] for row in first if row["baseline"].startswith("mamba_ssm")] == [2.0, 2.0]
    later = [row for row in rows if row not in first]
    assert [row["baseline"].split()[0] for row in later] == ["torch", "floor"] * 2 * (len(scan.SHAPES) - 1)
    assert all(row["err_vs_mamba"] is None for row in later)
    # stopped at the reference's timing of the second shape (no mamba_ssm sdist): the first shape's rows
    code, rows = _selective_scan_run(tmp_path / "2", monkeypatch, 4, how, mamba=False)
    assert code == 130 and [row["baseline"].split()[0] for row in rows] == ["torch", "floor"] * 2
    assert all(f"{scan.SHAPES[0][0]} (" in row["name"] for row in rows)


def test_selective_scan_uninterrupted_writes_every_row_once(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports ceilings, as when run
    scan = load_script("benchmarks/selective_scan.py")
    code, rows = _selective_scan_run(tmp_path, monkeypatch, None)
    assert code == 0 and len(rows) == 3 * 2 * len(scan.SHAPES) and not any("note" in row for row in rows)
    assert [row["baseline"].split()[0] for row in rows] == ["mamba_ssm", "torch", "floor"] * 2 * len(scan.SHAPES)
    assert all(row["err_vs_mamba"] == pytest.approx(0.01 / 1.01) for row in rows)
    out = capsys.readouterr()
    assert out.err == "" and out.out.count("| 1.000 | 2.000 | 2.00x | 3.00 |") == len(scan.SHAPES)


def test_selective_scan_builds_again_where_a_killed_build_left_its_marker(tmp_path, monkeypatch, capsys):
    """A mamba_ssm build killed before it wrote STATUS (Ctrl-C, `timeout`'s SIGTERM to the process group) left its
    BUILDING marker: every later run started no build and waited for that STATUS forever. The marker names the build's
    process now; one whose process is gone is stale, and the run builds again (here: a build that fails)."""
    import subprocess
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id no longer running
    started = []

    class Build:  # the --build-mamba process: its marker, then a failed build's STATUS
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.build = Path(argv[-1]) / "ss_mamba" / "build"
            (self.build / "BUILDING").write_text(str(gone.pid))

        def wait(self):
            (self.build / "STATUS").write_text("failed 0s: test")

    def sleep(seconds):
        raise AssertionError("waited for a build no process runs")

    monkeypatch.setattr(subprocess, "Popen", Build)
    monkeypatch.setattr(time, "sleep", sleep)
    code, rows = _selective_scan_run(tmp_path, monkeypatch, None, building=gone.pid)
    assert code == 0 and len(started) == 1 and "--build-mamba" in started[0]
    assert [row["baseline"].split()[0] for row in rows] == ["torch", "floor"] * 2 * 3
    assert "mamba_ssm build: failed 0s: test" in capsys.readouterr().out
    # the build's process ends without STATUS: the run says so, and does not wait on
    monkeypatch.setattr(Build, "wait", lambda self: None)
    code, rows = _selective_scan_run(tmp_path / "2", monkeypatch, None, building=gone.pid)
    assert code == 0 and len(started) == 2 and len(rows) == 2 * 2 * 3
    assert "mamba_ssm build: failed: the build's process ended without a status" in capsys.readouterr().out
