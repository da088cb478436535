"""The decode plot (benchmarks/plot_decode.py) reads generate rows, the newest per name, and writes a PNG."""

from __future__ import annotations

import json

import pytest
from helpers import load_script


def _row(name, ms, note=None):
    return {"name": name, "ours_ms": ms, "date": "2026-12-03", "card": "test card", "note": note}


def test_newest_row_per_name_and_prompt_suffix(tmp_path):
    pd = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    rows = [_row("generate/mamba/B64", 0.9, "old"), _row("generate/mamba/B64", 0.78, "new"),
            _row("generate/mamba/B64/P8192", 0.79), _row("generate/mamba/B16", None), _row("attention/x", 1.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    points = pd.load(path)
    assert set(points) == {("mamba", 64, 2048), ("mamba", 64, 8192)}  # no time, other benchmarks: left out
    assert points[("mamba", 64, 2048)]["note"] == "new"


def test_writes_the_png_and_needs_the_baseline(tmp_path):
    pd = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    rows = [_row(f"generate/{m}/B{b}{p}", ms) for m, scale in (("transformerpp", 2.0), ("mamba", 0.5))
            for b in (1, 64) for p, ms in (("", scale * b ** 0.2), ("/P8192", scale * 2 * b ** 0.2))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))  # mamba only
    with pytest.raises(SystemExit, match="transformerpp"):
        pd.main(["--results", str(path), "--out", str(tmp_path / "x.png")])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plots" / "decode.png"
    pd.main(["--results", str(path), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_up_pairs_each_model_with_transformerpp_of_its_own_run():
    """The right panel divided by the newest Transformer++ row, which may come from another run or card: a model
    measured beside Transformer++ on an H100 was drawn against a later Transformer++ row from an H200. It takes the
    row's own vs_transformerpp, or a Transformer++ row of the same command, day and card, else nothing."""
    pd = load_script("benchmarks/plot_decode.py")
    mamba = {**_row("generate/mamba/B64", 0.75), "command": "run 1", "vs_transformerpp": 3.17}
    other = {**_row("generate/transformerpp/B64", 1.85), "command": "run 2"}
    assert pd.same_run_speedup(mamba, other) == 3.17  # not 1.85 / 0.75
    bare = {k: v for k, v in mamba.items() if k != "vs_transformerpp"}
    assert pd.same_run_speedup(bare, other) is None
    assert pd.same_run_speedup(bare, {**other, "command": "run 1", "ours_ms": 2.4}) == pytest.approx(3.2)
    assert pd.same_run_speedup(bare, None) is None


def test_card_keeps_one_cards_rows(tmp_path):
    """--card draws one card's rows: by default the newest row of each name is drawn whatever its card, so a
    figure could mix an H100's batch 64 with an H200's smaller batches."""
    pd = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    rows = [{**_row("generate/mamba/B64", 0.70), "card": "NVIDIA H200"},
            {**_row("generate/mamba/B64", 0.75), "card": "NVIDIA H100 80GB HBM3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pd.load(path)[("mamba", 64, 2048)]["ours_ms"] == 0.75
    assert pd.load(path, "nvidia h200")[("mamba", 64, 2048)]["ours_ms"] == 0.70
    assert pd.load(path, "A100") == {}
    with pytest.raises(SystemExit, match="of the card 'NVIDIA H200'"):
        pd.main(["--results", str(path), "--card", "NVIDIA H200", "--out", str(tmp_path / "x.png")])


def test_card_takes_the_card_of_that_whole_name_and_refuses_one_the_file_lacks(tmp_path, capsys):
    """--card took every card whose name contained it: --card H100 also drew an "H100 NVL"'s rows beside an "H100"'s.
    It takes the card of that name (case aside), or the one card whose name holds it, and refuses a part of several
    names or a name no generate row has, naming the cards the file has."""
    pd = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    rows = [{**_row("generate/transformerpp/B64", 1.85), "card": "NVIDIA H100"},
            {**_row("generate/transformerpp/B64", 1.60), "card": "NVIDIA H100 NVL"},
            {**_row("generate/transformerpp/B64", 1.55), "card": "NVIDIA H200"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pd.load(path, "nvidia h100")[("transformerpp", 64, 2048)]["ours_ms"] == 1.85  # not the NVL's 1.60
    for card in ("H100", "A100", "NVIDIA H10"):  # a part of two names, of none
        with pytest.raises(SystemExit) as e:
            pd.main(["--results", str(path), "--card", card, "--out", str(tmp_path / "x.png")])
        assert f"--card {card!r}" in e.value.code, e.value.code
        assert "'NVIDIA H100', 'NVIDIA H100 NVL', 'NVIDIA H200'" in e.value.code, e.value.code
    assert not (tmp_path / "x.png").exists()
    for card, ms in (("nvidia h100", "1.850"), ("NVL", "1.600"), ("h200", "1.550")):  # a whole name, one name's part
        pd.main(["--results", str(path), "--card", card, "--out", str(tmp_path / "x.png")])
        assert f"transformerpp  B64  prompt  2048: {ms} ms" in capsys.readouterr().out


def test_without_card_draws_the_newest_rows_card_alone(tmp_path, capsys):
    """Without --card each name's newest row was drawn whatever its card: one line held an H200's batch 64 beside an
    H100's batch 1, absolute times of two cards. It draws the card of the newest row, including that card's older
    rows that another card's row had superseded."""
    pd = load_script("benchmarks/plot_decode.py")
    path = tmp_path / "results.jsonl"
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    rows = [{**_row("generate/transformerpp/B64", 1.85), "card": h100},
            {**_row("generate/transformerpp/B64", 1.55), "card": h200},
            {**_row("generate/transformerpp/B1", 0.61), "card": h100}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.main(["--results", str(path), "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert "1.850 ms" in out and "0.610 ms" in out and "1.550" not in out
    assert h100 in out
