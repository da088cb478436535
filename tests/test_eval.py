"""Evaluation: synthetic accuracy, passkey prompts and checks, chunked per-position loss == full forward."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import interrupt_after, offline_hub_repo, save_trained_adapter
from transformers import LlamaConfig, LlamaForCausalLM

from zoo.data.synthetic import make_batch
from zoo.eval import (
    build_passkey_prompt,
    check_passkey,
    evaluate_length,
    evaluate_passkey,
    evaluate_synthetic,
    greedy_generate,
    log_bins,
    per_position_loss,
    plot_length_curves,
    plot_passkey_heatmap,
    predict_answers,
)
from zoo.eval.passkey import FILLER, NEEDLE, PREFIX, SUFFIX, markdown_grid, passkey_text

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(vocab_size: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


class InductionOracle(torch.nn.Module):
    """Predicts the token that followed the previous occurrence of the current token.

    That solves MQAR and induction heads exactly, so any accuracy below 1 is an alignment bug in the
    evaluation. Its "cache" is the token history, so chunked evaluation is exercised too. ``shift`` makes
    it answer a wrong token on purpose.
    """

    def __init__(self, vocab_size: int, shift: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.shift = shift
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids, past_key_values=None, use_cache=False, **kwargs):
        history = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], dim=1)
        total, new = history.shape[1], input_ids.shape[1]
        s = torch.arange(total)
        t = torch.arange(total - new, total)
        seen = (history[:, total - new :, None] == history[:, None, :]) & (s[None, :] < t[:, None])  # [B,c,T]
        last = torch.where(seen, s, -1).max(dim=-1).values  # [B, c]
        follower = history.gather(1, (last + 1).clamp(max=total - 1))
        follower = (follower + self.shift) % self.config.vocab_size
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits.scatter_(2, follower[..., None], torch.where(last >= 0, 1.0, 0.0)[..., None])
        return SimpleNamespace(logits=logits, past_key_values=history if use_cache else None)


class SlicingOracle(InductionOracle):
    """The oracle with Hugging Face's ``logits_to_keep`` (int k: logits of the last k positions only)."""

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        out = super().forward(input_ids, past_key_values, use_cache)
        self.kept = logits_to_keep
        if logits_to_keep:
            out.logits = out.logits[:, -logits_to_keep:]
        return out


# ---------------------------------------------------------------- synthetic accuracy


@pytest.mark.parametrize("task", ["mqar", "induction_heads"])
def test_predict_answers_paths_agree_and_oracle_is_perfect(task):
    kwargs = {"n_kv": 8, "vocab_size": 512} if task == "mqar" else {}
    batch = make_batch(task, 6, 96, torch.Generator().manual_seed(0), **kwargs)
    vocab = 512 if task == "mqar" else 16
    results = [predict_answers(model, batch["input_ids"], batch["labels"], chunk)
               for model, chunk in [(InductionOracle(vocab), None), (SlicingOracle(vocab), None),
                                    (InductionOracle(vocab), 7)]]
    for predictions, targets, asked in results:
        assert predictions.shape == targets.shape == asked.shape
        assert torch.equal(predictions[asked], targets[asked])
        assert torch.equal(predictions, results[0][0]) and torch.equal(asked, results[0][2])
    shifted = InductionOracle(vocab, shift=1)
    wrong, targets, asked = predict_answers(shifted, batch["input_ids"], batch["labels"])
    assert not (wrong == targets)[asked].any()


def test_evaluate_synthetic_mqar_grid():
    with pytest.warns(UserWarning, match="skipping seq_len=64 n_kv=32"):
        result = evaluate_synthetic(SlicingOracle(1024), "mqar", seq_lens=[64, 128], n_kv=[4, 8, 32],
                                    n_samples=20, batch_size=8, vocab_size=1024)
    cells = [(r["seq_len"], r["n_kv"]) for r in result["rows"]]
    assert cells == [(64, 4), (64, 8), (128, 4), (128, 8), (128, 32)]
    assert all(r["accuracy"] == 1.0 and r["seq_accuracy"] == 1.0 for r in result["rows"])
    assert [r["n_answers"] for r in result["rows"]] == [80, 160, 80, 160, 640]
    assert {r["seq_len"]: r["n_answers"] for r in result["by_seq_len"]} == {64: 240, 128: 880}
    assert {r["n_kv"] for r in result["by_count"]} == {4, 8, 32}

    slicer = SlicingOracle(16)
    evaluate_synthetic(slicer, "induction_heads", seq_lens=[64], n_samples=2)
    assert slicer.kept == 2  # only the last two positions' logits were computed
    wrong = evaluate_synthetic(InductionOracle(1024, shift=1), "mqar", seq_lens=[64], n_kv=[4],
                               n_samples=8, vocab_size=1024)
    assert wrong["rows"][0]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="smaller than the task's vocab_size=8192"):
        evaluate_synthetic(InductionOracle(64), "mqar", seq_lens=[64], n_samples=2)


def assert_png(path: Path) -> None:
    """``path`` is a PNG that decodes, of nonzero size."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 0
        image.verify()


def test_accuracy_series_draws_each_line_from_its_own_rows_in_order():
    """The plotted lines of zoo eval synthetic's figure, from hand-made rows out of order, a cell skipped (4 * n_kv > T
    for n_kv=32 at T=64) and the marginal rows (no line column)."""
    from zoo.eval.synthetic import accuracy_series

    rows = [{"seq_len": 128, "n_kv": 8, "accuracy": 0.5}, {"seq_len": 64, "n_kv": 8, "accuracy": 0.75},
            {"seq_len": 128, "n_kv": 32, "accuracy": 0.0}, {"seq_len": 64, "n_kv": 4, "accuracy": 1.0},
            {"seq_len": 128, "n_kv": 4, "accuracy": 0.9}]
    assert accuracy_series(rows, "seq_len", "n_kv") == {4: [(64, 1.0), (128, 0.9)], 8: [(64, 0.75), (128, 0.5)],
                                                        32: [(128, 0.0)]}
    assert accuracy_series(rows, "n_kv", "seq_len") == {64: [(4, 1.0), (8, 0.75)],
                                                        128: [(4, 0.9), (8, 0.5), (32, 0.0)]}
    assert list(accuracy_series(rows, "seq_len", "n_kv")) == [4, 8, 32]  # legend order: by the count, not the rows'
    marginal = [{"seq_len": 256, "accuracy": 0.25}, {"seq_len": 64, "accuracy": 0.5}]
    assert accuracy_series(marginal, "seq_len", None) == {None: [(64, 0.5), (256, 0.25)]}


@pytest.mark.parametrize("task, count", [("mqar", {"n_kv": 4}), ("selective_copying", {"n_tokens": 4}),
                                         ("induction_heads", {})], ids=["mqar", "selective_copying", "induction_heads"])
def test_chance_accuracy_is_one_over_the_answers_the_generator_draws(task, count):
    from zoo.eval.synthetic import chance_accuracy

    batch = make_batch(task, 512, 64, torch.Generator().manual_seed(0), vocab_size=16, **count)
    answers = batch["labels"][batch["labels"] != -100].unique()
    assert chance_accuracy(task, {"vocab_size": 16}) == 1 / len(answers)
    assert chance_accuracy("mqar") == 1 / 4096  # the paper's vocabulary of 8192: values from its upper half


def test_plot_synthetic_accuracy_of_a_task_without_a_count(tmp_path):
    from zoo.eval.synthetic import plot_synthetic_accuracy

    result = {"task": "induction_heads", "count_name": None, "task_kwargs": {},
              "rows": [{"seq_len": 2**k, "accuracy": 1 - k / 20} for k in (6, 8, 10)], "by_seq_len": [], "by_count": []}
    assert_png(plot_synthetic_accuracy(result, tmp_path / "ih.png", "induction_heads: m"))


def test_plot_synthetic_accuracy_of_an_interrupted_grids_json(checkpoint, tmp_path, monkeypatch):
    """The mqar.json an interrupted zoo eval synthetic leaves (saved after every cell) names no count_name, and its
    figure drew the cells of every n_kv as one line, joined up at each length; it draws a line per count, as the
    complete grid's figure does."""
    from zoo.eval import synthetic

    real = synthetic.predict_answers

    def predict(model, input_ids, *args, **kwargs):  # Ctrl-C at the 64-token cells
        if input_ids.shape[1] >= 64:
            raise KeyboardInterrupt
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    with pytest.raises(KeyboardInterrupt):
        synthetic.main(["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "16,32,64", "--n-kv", "2,4",
                        "--vocab-size", "256", "--n-samples", "2", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mqar.json").read_text())
    assert saved["complete"] is False and len(saved["rows"]) == 4
    figures = []
    monkeypatch.setattr(synthetic, "save_figure", lambda fig, path: figures.append(fig) or Path(path))
    synthetic.plot_synthetic_accuracy(saved, tmp_path / "partial.png")
    by_length, by_count = figures[0].axes[:2]
    assert sorted(line.get_label() for line in by_length.get_lines()[:2]) == ["n_kv=2", "n_kv=4"]
    assert [list(line.get_xdata()) for line in by_length.get_lines()[:2]] == [[16, 32], [16, 32]]
    assert by_count.get_xlabel() == "n_kv (items to recall)"


class RecordingOracle(InductionOracle):
    """The oracle, keeping every row it was given."""

    def forward(self, input_ids, past_key_values=None, use_cache=False, **kwargs):
        self.rows = [*getattr(self, "rows", []), *input_ids.clone()]
        return super().forward(input_ids, past_key_values, use_cache)


@pytest.mark.parametrize("task", ["mqar", "selective_copying", "induction_heads"])
def test_evaluate_synthetic_rows_do_not_depend_on_the_batch_size(task):
    """--batch-size is a memory knob: the rows scored (and so the accuracy) must be the same for any value."""
    kwargs = {"n_kv": [4], "vocab_size": 64} if task == "mqar" else {}
    seen = []
    for batch_size in (16, 3, 1):
        model = RecordingOracle(64 if task == "mqar" else 16)
        evaluate_synthetic(model, task, seq_lens=[64], n_samples=16, batch_size=batch_size, seed=5, **kwargs)
        seen.append(torch.stack(model.rows))
    assert seen[0].shape[0] == 16 and torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    other = RecordingOracle(64 if task == "mqar" else 16)
    evaluate_synthetic(other, task, seq_lens=[64], n_samples=16, batch_size=16, seed=6, **kwargs)
    assert not torch.equal(torch.stack(other.rows), seen[0])  # another seed, other rows
    assert len({tuple(row.tolist()) for row in seen[0]}) == 16  # no two rows alike


class ShortRowOracle(InductionOracle):
    """The oracle on rows of at most 64 tokens, wrong on longer ones (an accuracy that depends on the length)."""

    def forward(self, input_ids, past_key_values=None, use_cache=False, **kwargs):
        self.shift = 0 if input_ids.shape[1] <= 64 else 1
        return super().forward(input_ids, past_key_values, use_cache)


def test_evaluate_synthetic_runs_a_cell_given_twice_once():
    """--seq-lens 64,128,2^7 ran the 128 cell twice on the same rows: a second row of it, its answers counted twice in
    n_answers, and the count's marginal weighed T=128 double (accuracy 1/3 instead of 1/2 here)."""
    result = evaluate_synthetic(ShortRowOracle(64), "mqar", seq_lens=[64, 128, 128], n_kv=[4, 4], n_samples=8,
                                vocab_size=64)
    assert [(r["seq_len"], r["n_kv"], r["accuracy"]) for r in result["rows"]] == [(64, 4, 1.0), (128, 4, 0.0)]
    assert result["by_count"] == [{"n_kv": 4, "accuracy": 0.5, "n_answers": 64}]
    assert [(r["seq_len"], r["n_answers"]) for r in result["by_seq_len"]] == [(64, 32), (128, 32)]


def test_evaluate_synthetic_reports_the_count_the_rows_had():
    """A count passed as a task argument (selective copying's n_tokens) is the one in the row, not the default 16."""
    result = evaluate_synthetic(SlicingOracle(16), "selective_copying", seq_lens=[64], n_samples=4, n_tokens=8)
    assert result["rows"][0]["n_tokens"] == 8 and result["rows"][0]["n_answers"] == 4 * 8
    assert [(r["n_tokens"], r["n_answers"]) for r in result["by_count"]] == [(8, 32)]


@pytest.mark.parametrize("task", ["mqar", "selective_copying", "induction_heads"])
def test_evaluate_synthetic_leaves_the_global_random_state_as_it_was(task):
    """Each cell was checked by drawing a row from torch's global generator: a training loop that evaluated synthetic
    accuracy every N steps drew other dropout masks and batches after it than one that did not. The rows come from
    generators of their own; the global one is left as it was."""
    kwargs = {"n_kv": [4], "vocab_size": 64} if task == "mqar" else {}
    torch.manual_seed(0)
    expected = torch.rand(8)
    torch.manual_seed(0)
    evaluate_synthetic(InductionOracle(64 if task == "mqar" else 16), task, seq_lens=[64], n_samples=2, **kwargs)
    assert torch.equal(torch.rand(8), expected)


@pytest.mark.parametrize("grid", [{"seq_lens": []}, {"seq_lens": [64], "n_kv": []}], ids=["no-lengths", "no-counts"])
def test_evaluate_synthetic_refuses_an_empty_grid(grid):
    """An empty list of lengths or counts returned a result with no rows (and empty marginals) without a word, which a
    caller averaging the rows' accuracy divided by zero; evaluate_passkey refuses its empty grid likewise."""
    with pytest.raises(ValueError, match=r"evaluate_synthetic: no cells"):
        evaluate_synthetic(InductionOracle(64), "mqar", n_samples=2, vocab_size=64, **grid)


def test_evaluate_synthetic_gives_the_model_back_in_training_mode_when_a_cell_fails():
    """A model in training mode was put back in it only when the grid completed: a cell that failed (out of memory at
    the longest rows), which a training loop caught to go on, left it training in eval mode (no dropout, no MoE
    load-balancing loss)."""

    class FailsOnLongRows(InductionOracle):
        def forward(self, input_ids, *args, **kwargs):
            if input_ids.shape[1] > 64:
                raise RuntimeError("out of memory")
            return super().forward(input_ids, *args, **kwargs)

    model = FailsOnLongRows(64).train()
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_synthetic(model, "mqar", seq_lens=[64, 128], n_kv=[4], n_samples=2, vocab_size=64)
    assert model.training
    evaluate_synthetic(model, "mqar", seq_lens=[64], n_kv=[4], n_samples=2, vocab_size=64)
    assert model.training
    model.eval()
    evaluate_synthetic(model, "mqar", seq_lens=[64], n_kv=[4], n_samples=2, vocab_size=64)
    assert not model.training


def test_evaluate_synthetic_induction_long_rows_in_chunks():
    result = evaluate_synthetic(InductionOracle(16), "induction_heads", seq_lens=[64, 2048], n_samples=4,
                                batch_size=2, chunk_size=256)
    assert [r["accuracy"] for r in result["rows"]] == [1.0, 1.0]
    # a random transformer: chunked (with its KV cache) and full evaluation make the same predictions
    model = tiny_llama(vocab_size=16)
    full = evaluate_synthetic(model, "induction_heads", seq_lens=[48], n_samples=16, batch_size=8)
    chunked = evaluate_synthetic(model, "induction_heads", seq_lens=[48], n_samples=16, batch_size=8,
                                 chunk_size=10)
    assert full["rows"] == chunked["rows"]


# ---------------------------------------------------------------- passkey


class ByteTokenizer:
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A small byte-level BPE tokenizer with a BOS post-processor, built in memory (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [PREFIX, SUFFIX, " ".join(FILLER)] + [NEEDLE.format(key=k) for k in range(10000, 100000, 997)]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


FILLER_RE = re.compile("|".join(re.escape(s) for s in FILLER))


@pytest.mark.parametrize("which", ["plain", "hf", "zoo-byte"])
@pytest.mark.parametrize("length", [200, 1000, 3000])
def test_passkey_prompt_length_and_depth(which, length, hf_tokenizer):
    from zoo.data.text import ByteTokenizer as ZooByteTokenizer

    tokenizer = {"plain": ByteTokenizer, "hf": lambda: hf_tokenizer, "zoo-byte": ZooByteTokenizer}[which]()
    longest_sentence = max(len(tokenizer.encode(" " + s)) for s in FILLER)
    bos = getattr(tokenizer, "bos_token_id", None)
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        prompt = build_passkey_prompt(tokenizer, length, depth, key=48213)
        text = prompt.text
        body = list(tokenizer.encode(text))
        assert prompt.input_ids == (body if bos is None or body[0] == bos else [bos] + body)
        assert length - longest_sentence - 2 <= len(prompt.input_ids) <= length
        assert text.startswith(PREFIX) and text.endswith(SUFFIX)
        needle = NEEDLE.format(key=48213)
        assert text.count(needle) == 1 and text.count("48213") == 2
        at = text.index(needle)
        before = len(FILLER_RE.findall(text[len(PREFIX) : at]))
        total = len(FILLER_RE.findall(text))
        assert total == prompt.n_filler and before == prompt.needle_after
        assert abs(before - depth * total) <= 1, (depth, before, total)
        if bos is not None:
            assert prompt.input_ids[0] == bos and tokenizer.decode(prompt.input_ids[1:]) == text
    with pytest.raises(ValueError, match="shorter than the bare template"):
        build_passkey_prompt(tokenizer, 10, 0.5, 12345)


def test_passkey_prompt_is_the_longest_that_fits():
    """The prompt holds as many filler sentences as fit in context_length (one more does not), its needle after the
    nearest whole sentence to depth; a template one token longer than the length is refused, and so is a depth
    outside [0, 1]."""
    tokenizer = ByteTokenizer()
    bare = len(tokenizer.encode(passkey_text(48213, 0, 0)))
    with pytest.raises(ValueError, match="shorter than the bare template"):
        build_passkey_prompt(tokenizer, bare - 1, 0.5, 48213)
    assert len(build_passkey_prompt(tokenizer, bare, 0.5, 48213).input_ids) == bare
    for length in range(bare + 1, bare + 150):
        for depth in (0.0, 0.3, 0.7, 1.0):
            prompt = build_passkey_prompt(tokenizer, length, depth, 48213)
            n = prompt.n_filler
            more = passkey_text(48213, n + 1, round(depth * (n + 1)))
            assert len(prompt.input_ids) <= length < len(tokenizer.encode(more)), (length, depth)
            assert abs(prompt.needle_after - depth * n) <= 0.5, (length, depth)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            build_passkey_prompt(tokenizer, 300, depth, 48213)


def test_passkey_prompt_drops_an_eos_the_tokenizer_appends(hf_tokenizer):
    """A tokenizer that appends EOS on encode (add_eos_token, a '$A </s>' template) made every passkey prompt end
    '... The passkey is</s>': the model was asked to continue after the end of a document."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(hf_tokenizer.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                ("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert tokenizer.encode("x")[-1] == tokenizer.eos_token_id
    prompt = build_passkey_prompt(tokenizer, 300, 0.5, key=48213)
    assert prompt.input_ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in prompt.input_ids
    assert prompt.input_ids == build_passkey_prompt(hf_tokenizer, 300, 0.5, key=48213).input_ids


def test_check_passkey_is_exact():
    assert check_passkey(" 48213. Remember", 48213)
    assert check_passkey("48213", 48213)
    for text in ["482130", " 4821", " 48214.", "", " the key", "4 8213"]:
        assert not check_passkey(text, 48213), text


class EchoModel:
    """Stands in for a model: 'generates' the key it finds in the prompt, plus ``offset``."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, offset: int = 0) -> None:
        self.tokenizer, self.offset = tokenizer, offset

    def generate(self, input_ids, max_new_tokens, **kwargs):
        key = int(re.search(r"The passkey is (\d{5})", self.tokenizer.decode(input_ids[0].tolist())).group(1))
        new = self.tokenizer.encode(f" {key + self.offset}. Done")[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_evaluate_passkey_with_fake_models(tmp_path):
    tokenizer = ByteTokenizer()
    grid = {"lengths": [300, 600], "depths": [0.0, 0.5, 1.0], "n_samples": 3}
    right = evaluate_passkey(EchoModel(tokenizer), tokenizer, **grid)
    wrong = evaluate_passkey(EchoModel(tokenizer, offset=1), tokenizer, **grid)
    assert len(right["rows"]) == 6 and all(r["accuracy"] == 1.0 for r in right["rows"])
    assert all(r["accuracy"] == 0.0 for r in wrong["rows"])
    assert len({s["key"] for s in right["samples"]}) > 1  # fresh keys per prompt
    assert all(250 < r["tokens"] <= r["length"] for r in right["rows"])
    table = markdown_grid(right["rows"])
    assert "| depth | 300 | 600 |" in table and "| mean | 1.00 | 1.00 |" in table
    png = plot_passkey_heatmap(right["rows"], tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def record_progress(monkeypatch) -> list:
    """Replaces tqdm's bar with one that records its total (or its iterable's length) and every update, in a list."""
    import tqdm

    updates = []

    class Bar:
        def __init__(self, iterable=None, total=None, **kwargs):
            self.iterable = iterable
            updates.append(("total", total if iterable is None else len(iterable)))

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    return updates


def test_evaluate_passkey_gives_the_model_back_in_the_mode_it_came_in():
    """evaluate_passkey put the model in eval mode and left it there (evaluate_synthetic and evaluate_length give the
    mode back): a training loop that evaluated passkey went on training without dropout, and a zoo MoE without its
    load-balancing loss (added in training mode only). It decodes in eval mode, and a model in training mode is back
    in it afterwards, also when the evaluation fails."""
    tokenizer = ByteTokenizer()

    class Module(torch.nn.Module):
        def __init__(self, fail: bool = False) -> None:
            super().__init__()
            self.echo, self.fail, self.modes = EchoModel(tokenizer), fail, []

        def generate(self, input_ids, max_new_tokens, **kwargs):
            self.modes.append(self.training)
            if self.fail:
                raise RuntimeError("out of memory")
            return self.echo.generate(input_ids, max_new_tokens, **kwargs)

    for fail in (False, True):
        model = Module(fail).train()
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            evaluate_passkey(model, tokenizer, [300], [0.5], n_samples=2)
        assert model.modes and not any(model.modes) and model.training, fail
    model = Module().eval()
    evaluate_passkey(model, tokenizer, [300], [0.5], n_samples=2)
    assert not model.training


def test_evaluate_passkey_runs_a_cell_given_twice_once():
    """--lengths 300,300 --depths 0,0.0,1 ran cells twice: a second row of the same cell, which a mean over the rows
    (zoo compare's passkey accuracy) counted twice."""
    tokenizer = ByteTokenizer()
    calls = []

    class Counting(EchoModel):
        def generate(self, input_ids, max_new_tokens, **kwargs):
            calls.append(input_ids.shape[1])
            return super().generate(input_ids, max_new_tokens, **kwargs)

    result = evaluate_passkey(Counting(tokenizer), tokenizer, lengths=[300, 600, 300], depths=[0, 0.0, 1.0],
                              n_samples=2)
    assert [(r["length"], r["depth"]) for r in result["rows"]] == [(300, 0.0), (300, 1.0), (600, 0.0), (600, 1.0)]
    assert len(calls) == len(result["samples"]) == 8


def test_evaluate_passkey_progress_advances_with_every_prompt(monkeypatch):
    """zoo eval passkey's bar counted cells: one cell of five 1M-token prompts stood still for minutes. It counts
    the prompts now."""
    updates = record_progress(monkeypatch)
    tokenizer = ByteTokenizer()
    evaluate_passkey(EchoModel(tokenizer), tokenizer, [300], [0.0, 1.0], n_samples=3, progress=True)
    assert updates == [("total", 6)] + [1] * 6


def test_passkey_prompts_a_model_trained_without_bos_without_it():
    """A model trained with data.add_bos false (recorded in its config as add_bos) got every passkey prompt with the
    tokenizer's BOS in front, a start its documents never had, as zoo generate did."""
    from types import SimpleNamespace

    from zoo.data.text import ByteTokenizer as ZooByteTokenizer

    tokenizer = ZooByteTokenizer()  # (its BOS is 257)
    firsts = {}
    for add_bos in (True, False):
        model = EchoModel(tokenizer)
        model.config = SimpleNamespace(add_bos=add_bos)
        real = model.generate
        model.generate = lambda input_ids, *a, real=real, add_bos=add_bos, **k: (
            firsts.setdefault(add_bos, set()).add(int(input_ids[0, 0])), real(input_ids, *a, **k))[1]
        result = evaluate_passkey(model, tokenizer, lengths=[300], depths=[0.5], n_samples=2)
        assert result["rows"][0]["accuracy"] == 1.0
    assert firsts[True] == {tokenizer.bos_token_id} and tokenizer.bos_token_id not in firsts[False]


def test_passkey_cells_do_not_depend_on_the_rest_of_the_grid():
    """The keys came from one generator drawn cell after cell: the 600-token cells of --lengths 300,600 had other keys
    (and so another accuracy) than the same cells of --lengths 600, and a sweep grown by one length changed them all."""
    tokenizer = ByteTokenizer()

    def keys(result, length):
        return [(s["depth"], s["key"]) for s in result["samples"] if s["length"] == length]

    both = evaluate_passkey(EchoModel(tokenizer), tokenizer, lengths=[300, 600], depths=[0.0, 0.5], n_samples=3)
    alone = evaluate_passkey(EchoModel(tokenizer), tokenizer, lengths=[600], depths=[0.5, 0.0], n_samples=3)
    assert sorted(keys(both, 600)) == sorted(keys(alone, 600))
    assert len({k for _, k in keys(both, 600)}) == 6  # still fresh keys per prompt
    fewer = evaluate_passkey(EchoModel(tokenizer), tokenizer, lengths=[600], depths=[0.5], n_samples=2)
    assert keys(fewer, 600) == keys(alone, 600)[:2]


def test_passkey_keys_of_a_cell_are_distinct():
    """A cell's keys were drawn independently, so a key could come twice (seed 99's 1K-token cell at depth 0.5: its 26th
    key was its first): the same prompt was scored twice and weighed double in the accuracy. A repeat is drawn again;
    the keys before it are as they were (a saved cell's prompts still match)."""
    from zoo.eval.passkey import cell_generator, cell_keys

    generator = cell_generator(99, 1024, 0.5)
    independent = [int(torch.randint(10000, 100000, (1,), generator=generator)) for _ in range(27)]
    assert independent[25] == independent[0]  # the draw that repeats
    keys = cell_keys(99, 1024, 0.5, 26)
    assert len(set(keys)) == 26 and keys[:25] == independent[:25] and keys[25] == independent[26]
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="n_samples=90001 must be >= 1 and <= 90000"):
        evaluate_passkey(EchoModel(tokenizer), tokenizer, lengths=[300], depths=[0.5], n_samples=90001)


def test_passkey_resume_of_a_cell_with_a_repeated_key_runs_it_again_from_the_repeat(monkeypatch):
    """A passkey.json of an older zoo, whose cells' keys could repeat, was resumed with its finished cells as they were:
    a cell with a prompt scored twice stayed beside cells of distinct keys. Such a cell continues from its repeat, the
    prompts before it kept."""
    from zoo.eval import passkey

    def independent(seed, length, depth, n_samples):  # the older zoo's keys
        generator = passkey.cell_generator(seed, length, depth)
        return [int(torch.randint(10000, 100000, (1,), generator=generator)) for _ in range(n_samples)]

    tokenizer = ByteTokenizer()
    grid = {"lengths": [1024], "depths": [0.5], "n_samples": 26, "seed": 99}
    with monkeypatch.context() as m:
        m.setattr(passkey, "cell_keys", independent)
        old = evaluate_passkey(EchoModel(tokenizer, offset=1), tokenizer, **grid)  # every answer wrong
    assert old["rows"][0]["accuracy"] == 0.0 and len({s["key"] for s in old["samples"]}) == 25
    result = evaluate_passkey(EchoModel(tokenizer), tokenizer, **grid, done=old)
    assert [s["key"] for s in result["samples"]] == passkey.cell_keys(99, 1024, 0.5, 26)
    assert [s["correct"] for s in result["samples"]] == [False] * 25 + [True]  # the 25 before the repeat kept
    assert result["rows"][0]["accuracy"] == pytest.approx(1 / 26)


def test_passkey_refuses_max_new_tokens_too_few_to_write_the_key():
    """--max-new-tokens 5 with the byte tokenizer cut every answer " 12345" (6 tokens) to " 1234": a model that wrote
    every key right scored 0 in every cell, without a word."""
    from zoo.eval.passkey import longest_answer

    tokenizer = ByteTokenizer()
    grid = {"lengths": [300], "depths": [0.0, 1.0], "n_samples": 2}
    assert longest_answer(tokenizer, 0, {(300, 0.0), (300, 1.0)}, 2) == 6  # a space and five digits
    with pytest.raises(ValueError, match=r"max_new_tokens=5: an answer .* takes up to 6 tokens.*--max-new-tokens 6"):
        evaluate_passkey(EchoModel(tokenizer), tokenizer, max_new_tokens=5, **grid)
    right = evaluate_passkey(EchoModel(tokenizer), tokenizer, max_new_tokens=6, **grid)
    assert all(r["accuracy"] == 1.0 for r in right["rows"])


def test_evaluate_passkey_checks_the_grid_before_the_first_cell():
    """--depths 0,25,50 (percent, as other needle tools take it) ran the depth-0 cells and then failed as
    'depth=25.0 must be in [0, 1]', naming no option; a length below the template failed the same way late."""
    tokenizer = ByteTokenizer()
    calls = []

    class Counting(EchoModel):
        def generate(self, input_ids, max_new_tokens, **kwargs):
            calls.append(input_ids.shape[1])
            return super().generate(input_ids, max_new_tokens, **kwargs)

    model = Counting(tokenizer)
    with pytest.raises(ValueError, match=r"depths: 25 is not a fraction .*--depths .*25% is 0.25"):
        evaluate_passkey(model, tokenizer, lengths=[300], depths=[0, 25, 50], n_samples=1)
    with pytest.raises(ValueError, match=r"lengths: 100 tokens is shorter than the bare passkey template \(\d+ tokens"):
        evaluate_passkey(model, tokenizer, lengths=[300, 100], depths=[0.5], n_samples=1)
    bare = len(tokenizer.encode(passkey_text(10000, 0, 0)))  # a length one short of the template, a depth past 1
    with pytest.raises(ValueError, match=rf"lengths: {bare - 1} tokens is shorter than the bare passkey template"):
        evaluate_passkey(model, tokenizer, lengths=[300, bare - 1], depths=[0.5], n_samples=1)
    with pytest.raises(ValueError, match=r"depths: 1.2 is not a fraction"):
        evaluate_passkey(model, tokenizer, lengths=[300], depths=[0, 1.2], n_samples=1)
    with pytest.raises(ValueError, match=r"no cells.*--depths"):
        evaluate_passkey(model, tokenizer, lengths=[300], depths=[], n_samples=1)
    assert calls == []


def test_evaluate_passkey_checks_the_template_with_every_key_of_a_length(hf_tokenizer):
    """The template check measured it with key 10000 only; a BPE tokenizer writes other keys in more tokens, so a
    length between the two passed the check, ran the cells before it and failed at its first longer key as
    'context_length=... is shorter than the bare template', naming no option."""
    from zoo.eval.common import encode_with_bos
    from zoo.eval.passkey import cell_keys

    def bare(key: int) -> int:
        return len(encode_with_bos(hf_tokenizer, passkey_text(key, 0, 0)))

    low = bare(10000)
    length = next(n for n in range(low, low + 8) if any(bare(k) > n for k in cell_keys(0, n, 0.5, 4)))
    calls = []

    class Counting(EchoModel):
        def generate(self, input_ids, max_new_tokens, **kwargs):
            calls.append(input_ids.shape[1])
            return super().generate(input_ids, max_new_tokens, **kwargs)

    need = max(bare(k) for k in cell_keys(0, length, 0.5, 4))
    with pytest.raises(ValueError, match=rf"lengths: {length} tokens is shorter than the bare passkey template "
                                         rf"\({need} tokens.*at least {need}"):
        evaluate_passkey(Counting(hf_tokenizer), hf_tokenizer, lengths=[300, length], depths=[0.5], n_samples=4)
    assert calls == []


def test_chunked_greedy_decoding_matches_generate():
    model = tiny_llama()
    input_ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(1))
    eos = model.generation_config.eos_token_id
    reference = greedy_generate(model, input_ids, max_new_tokens=6, eos_token_id=eos)
    chunked = greedy_generate(model, input_ids, max_new_tokens=6, prefill_chunk_size=16, eos_token_id=eos)
    assert reference.shape[1] >= 1 and torch.equal(reference, chunked)
    first = int(chunked[0, 0])  # decoding stops at the end-of-sequence token, the chunked path too
    for chunk_size in (None, 16):
        assert torch.equal(greedy_generate(model, input_ids, 6, chunk_size, eos_token_id=first), chunked[:, :1])


def test_chunked_greedy_decoding_counts_positions_on():
    """Each prefill chunk and decoding step is given the positions it has in the sequence (the first chunk counts from
    0 by itself). A step one position off gave the same greedy tokens on the tiny Llama: only its positions show it."""
    model = tiny_llama()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("position_ids")),
                                    with_kwargs=True)
    input_ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(1))
    greedy_generate(model, input_ids, max_new_tokens=4, prefill_chunk_size=16)
    positions = torch.cat([p[0] for p in seen[1:]]).tolist()  # the chunks from 16 on, then the steps from 50 on
    assert seen[0] is None and len(positions) >= 37 and positions == list(range(16, 16 + len(positions)))


def test_chunked_greedy_decoding_does_not_feed_its_last_new_token():
    """The chunked path fed its last new token through the model too, a forward whose logits nothing read: a GPT-2 of
    as many learned positions as the prompt and the new tokens before the last (what generate takes, and what
    passkey's position check allows) failed in its wpe, 'IndexError: index out of range in self'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=40, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None)).eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    input_ids = torch.randint(0, 64, (1, 35), generator=torch.Generator().manual_seed(1))  # 35 + 6 - 1 = 40 positions
    reference = greedy_generate(model, input_ids, max_new_tokens=6)
    calls.clear()
    chunked = greedy_generate(model, input_ids, max_new_tokens=6, prefill_chunk_size=16)
    assert reference.shape[1] == 6 and torch.equal(chunked, reference)
    assert calls == [16, 16, 3, 1, 1, 1, 1, 1]  # the prefill, then the first five new tokens


@pytest.mark.parametrize("setting", [{"repetition_penalty": 3.0}, {"no_repeat_ngram_size": 1}, {"num_beams": 3},
                                     {"do_sample": True, "num_return_sequences": 2}, {"max_time": 1e-9},
                                     {"force_words_ids": [[5]]}, {"use_mtp": True}, {"return_dict_in_generate": True},
                                     {"output_attentions": True, "output_hidden_states": True}],
                         ids=lambda setting: "+".join(setting))
@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_greedy_generate_ignores_the_checkpoints_generation_settings(setting, family):
    """generate() took the checkpoint's generation_config.json: a repetition penalty (the key is twice in the prompt)
    or beams made passkey's 'greedy' decoding something else, and the chunked path (plain argmax) disagreed;
    num_return_sequences of a sampling config, constraints or MTP failed, max_time cut the decoding short, and
    return_dict_in_generate made generate return an output object, which failed to slice ('tuple indices must be
    integers or slices, not tuple'); output_attentions failed a zoo model, which returns no attention weights."""
    model = tiny_llama() if family == "llama" else tiny_zoo_model("mamba")
    input_ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(1))
    plain = greedy_generate(model, input_ids, max_new_tokens=8)
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    assert torch.equal(greedy_generate(model, input_ids, max_new_tokens=8), plain)
    assert torch.equal(greedy_generate(model, input_ids, max_new_tokens=8, prefill_chunk_size=16), plain)


@pytest.mark.parametrize("setting", [{"prompt_lookup_num_tokens": 3}, {"assistant_early_exit": 1}],
                         ids=lambda setting: next(iter(setting)))
def test_greedy_generate_of_a_recurrent_model_ignores_the_checkpoints_assisted_decoding(setting):
    """A generation_config asking for assisted decoding (whose greedy tokens are greedy decoding's) made passkey's
    decoding of a recurrent model fail: its states cannot roll back drafted tokens."""
    model = tiny_zoo_model("mamba")
    input_ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(1))
    plain = greedy_generate(model, input_ids, max_new_tokens=8)
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    assert torch.equal(greedy_generate(model, input_ids, max_new_tokens=8), plain)


# ---------------------------------------------------------------- per-position loss


def full_forward_loss(model, input_ids):
    logits = model(input_ids=input_ids).logits
    targets = input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 39, None], ids=str)
def test_chunked_loss_equals_full_forward_llama(chunk_size):
    model = tiny_llama()
    input_ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = full_forward_loss(model, input_ids)
        hf_loss = model(input_ids=input_ids, labels=input_ids).loss
    losses = per_position_loss(model, input_ids, chunk_size)
    assert losses.shape == (2, 39)
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.mean(), hf_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_position_loss(model, input_ids[0], chunk_size), reference[0], rtol=1e-5,
                               atol=1e-5)


def test_chunked_evaluation_counts_positions_on_for_transformers_bamba():
    """transformers' Bamba takes position_ids arange(c) for a chunk when none are passed (generate passes them), so
    zoo eval length's chunks and passkey's chunked prefill / decode steps gave its attention the RoPE positions of a
    document's start: per-position losses 3.6e-3 off the one-forward ones, silently. The chunks pass their
    positions now."""
    import transformers

    if not hasattr(transformers, "BambaForCausalLM"):
        pytest.skip("this transformers has no Bamba")
    config = transformers.BambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, mamba_n_heads=4, mamba_d_head=32,
                                      mamba_d_state=16, mamba_chunk_size=8, attn_layer_indices=[1])
    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    reference = per_position_loss(model, input_ids, None)
    for chunk_size in (1, 7):
        torch.testing.assert_close(per_position_loss(model, input_ids, chunk_size), reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # greedy steps from one forward over the growing row
        row, expected = input_ids[:1], []
        for _ in range(4):
            expected.append(int(model(input_ids=row).logits[0, -1].argmax()))
            row = torch.cat([row, torch.tensor([[expected[-1]]])], dim=1)
    for chunk_size in (None, 30, 7):
        assert greedy_generate(model, input_ids[:1], 4, chunk_size)[0].tolist() == expected, chunk_size
    from zoo.decode import continues_chunks_exactly, prefill  # the benchmarks' prefill too

    assert continues_chunks_exactly(model)
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.logits[:, -1]))
    with torch.no_grad():
        whole = model(input_ids=input_ids).logits[:, -1]
    for chunk_size in (7, 1):
        seen.clear()
        prefill(model, input_ids, chunk_size)
        torch.testing.assert_close(seen[-1], whole, rtol=1e-5, atol=1e-5)
    hook.remove()


def test_chunked_loss_refuses_transformers_mamba_but_full_forward_works():
    """transformers' Mamba cannot continue a multi-token chunk from cache_params exactly: a clear error, not
    silently wrong per-position losses; the one-forward path still works."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=64)).eval()
    input_ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="chunk_size=None"):
        per_position_loss(model, input_ids, 8)
    with torch.no_grad():
        reference = full_forward_loss(model, input_ids)
    torch.testing.assert_close(per_position_loss(model, input_ids, None), reference, rtol=1e-5, atol=1e-5)


def test_chunked_loss_refuses_transformers_jamba():
    """transformers' Jamba scans a multi-token chunk from a zero SSM state even with a cache (its source: 'does not
    take the past state, it is WRONG if the cache is not empty'): zoo eval length's default --chunk-size 2048 gave
    silently wrong curves (logits 1.4e-3 off the one-forward ones on a tiny slow-decay model; the error grows with
    how much the state carries). Now refused, with the CLI's fix."""
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(
        hidden_size=32, num_hidden_layers=2, vocab_size=64, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=2, mamba_d_state=8)).eval()
    input_ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"JambaForCausalLM cannot continue.*--chunk-size 24 or more"):
        per_position_loss(model, input_ids, 8)
    with pytest.raises(ValueError, match=r"JambaForCausalLM cannot continue.*--prefill-chunk-size"):
        greedy_generate(model, input_ids[:1], max_new_tokens=2, prefill_chunk_size=8)
    with torch.no_grad():
        reference = full_forward_loss(model, input_ids)
    for chunk_size in (None, 24):  # one forward per document
        torch.testing.assert_close(per_position_loss(model, input_ids, chunk_size), reference, rtol=1e-5, atol=1e-5)


def test_chunked_passkey_prefill_refuses_transformers_mamba():
    """The same model in passkey's chunked prefill used to run silently: every chunk after the first dropped the
    carried SSM state (its last logits off the one-forward ones), so a needle in an earlier chunk was lost."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=64)).eval()
    input_ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"MambaForCausalLM cannot continue.*--prefill-chunk-size"):
        greedy_generate(model, input_ids, max_new_tokens=2, prefill_chunk_size=16)
    # one chunk holding the whole prompt is exact, and so is generate
    reference = greedy_generate(model, input_ids, max_new_tokens=3)
    assert torch.equal(greedy_generate(model, input_ids, max_new_tokens=3, prefill_chunk_size=40), reference)


def test_greedy_generate_resets_the_checkpoints_prefill_chunks_for_transformers_mamba():
    """Without prefill_chunk_size greedy_generate calls generate, which took a prefill_chunk_size from the checkpoint's
    generation_config: transformers' Mamba was prefilled in chunks that drop the earlier chunks' state (its logits off
    the one-forward ones), while the guard on the argument saw nothing. Its prefill is now one forward, as without
    the setting."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=64)).eval()
    input_ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(4))
    reference = greedy_generate(model, input_ids, max_new_tokens=3)
    model.generation_config.prefill_chunk_size = 8
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        assert torch.equal(greedy_generate(model, input_ids, max_new_tokens=3), reference)
    finally:
        hook.remove()
    assert seen == [40, 1, 1]  # the whole prompt in one forward, then one token a step


@pytest.mark.parametrize("name", ["gla", "jamba"])
def test_evaluations_of_a_config_with_return_dict_false(name):
    """transformers' return_dict=False (from_pretrained(..., return_dict=False), for exports) makes the forward return
    a tuple: the chunked and one-forward logits, passkey's chunked prefill and decode, the synthetic tasks' answers
    and the state statistics read .logits of it and failed ("'tuple' object has no attribute 'logits'"); they ask for
    an output object, as generate does, and give what they give with the default."""
    from zoo.eval.common import iter_chunk_logits
    from zoo.state import apply_mitigation, calibrate_norm_threshold, record_state_statistics

    model = tiny_zoo_model(name)
    batch = make_batch("mqar", 2, 64, torch.Generator().manual_seed(0), n_kv=4, vocab_size=64)
    ids = batch["input_ids"]

    def run() -> list:
        chunked = torch.cat([logits for _, logits in iter_chunk_logits(model, ids, 16)], dim=1)
        whole = next(iter_chunk_logits(model, ids))[1]
        answers = [predict_answers(model, ids, batch["labels"], chunk) for chunk in (None, 16)]
        passkey = greedy_generate(model, ids[:1], max_new_tokens=4, prefill_chunk_size=16)
        state = record_state_statistics(model, ids, chunk_size=32) if name == "gla" else {}
        caps = calibrate_norm_threshold(model, ids[:, :40], chunk_size=32) if name == "gla" else {}
        apply_mitigation(model, None)  # (the calibration sets the cap)
        return [chunked, whole, answers, passkey, state.get("loss"), caps]

    reference = run()
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)
    got = run()
    for a, b in zip(got[:2], reference[:2]):
        assert torch.equal(a, b)
    assert all(torch.equal(x, y) for a, b in zip(got[2], reference[2]) for x, y in zip(a, b))
    assert torch.equal(got[3], reference[3]) and got[4] == reference[4]
    assert got[5].keys() == reference[5].keys() and all(torch.equal(got[5][k], v) for k, v in reference[5].items())


def tiny_zoo_model(name: str):
    config_path = ROOT / "configs" / "models" / f"{name}-tiny.yaml"
    if not config_path.exists():
        pytest.skip(f"{config_path.name} is not written yet")
    pytest.importorskip("zoo.modeling")
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type)
    from zoo.config import ZooConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ZooConfig.from_yaml(str(config_path))).eval()


def test_zoo_model_synthetic_and_generation_paths_agree():
    model = tiny_zoo_model("mamba")
    full = evaluate_synthetic(model, "induction_heads", seq_lens=[40], n_samples=8, batch_size=4)
    chunked = evaluate_synthetic(model, "induction_heads", seq_lens=[40], n_samples=8, batch_size=4,
                                 chunk_size=9)
    assert full["rows"] == chunked["rows"]
    input_ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    reference = greedy_generate(model, input_ids, max_new_tokens=5)
    assert reference.shape == (1, 5)
    assert torch.equal(greedy_generate(model, input_ids, max_new_tokens=5, prefill_chunk_size=8), reference)


@pytest.mark.parametrize("name,chunk_sizes", [("mamba", (1, 7)), ("mamba2", (1, 7)), ("gla", (1, 7)),
                                               ("transformerpp", (7,)), ("jamba", (7,))])
def test_chunked_loss_equals_full_forward_zoo_model(name, chunk_sizes):
    model = tiny_zoo_model(name)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = full_forward_loss(model, input_ids)
    for chunk_size in chunk_sizes:
        torch.testing.assert_close(per_position_loss(model, input_ids, chunk_size), reference, rtol=1e-4,
                                   atol=1e-4)


def test_a_zoo_yaml_loads_as_the_same_model_every_time(tmp_path):
    """load_model drew a zoo YAML's random weights from the global RNG, so each zoo eval run of one YAML evaluated
    another model (logits 0.9 apart on the tiny Mamba): its numbers did not reproduce, and a rerun that resumes by
    the YAML's text kept the finished cells of other weights as its own. They come from a fixed seed now, and the
    caller's RNG is left as it was."""
    from zoo.eval.common import load_model

    config = ROOT / "configs" / "models" / "mamba-tiny.yaml"
    torch.manual_seed(1)
    first = load_model(str(config), "cpu")
    after_first = torch.rand(3)
    torch.manual_seed(2)
    second = load_model(str(config), "cpu")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)  # loading drew nothing from the global RNG
    half = load_model(str(config), "cpu", "bf16")  # as from_pretrained(dtype=bf16): A_log and D stay fp32
    assert half.model.layers[0].mixer.A_log.dtype == torch.float32 and half.lm_head.weight.dtype == torch.bfloat16
    docs = [torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))]
    curves = [evaluate_length(model, docs, chunk_size=None)["bins"] for model in (first, second)]
    assert curves[0] == curves[1]


@pytest.mark.parametrize("where", ["folder", "hub"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_an_adapter_loads_as_peft_applies_it(tmp_path, monkeypatch, use_dora, where):
    """zoo eval takes a PEFT adapter, a folder or a hub id, as --model; transformers' from_pretrained of it left out a
    DoRA adapter's magnitudes (zoo finetune's lora.use_dora), so the model evaluated was not the finetuned one
    (logits 0.6 apart on the tiny Jamba), with a load report only. A hub id went that way after folders no longer
    did. The hub is a cache read offline (offline_hub_repo)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zoo.eval.common import load_model

    ref = "someone/tiny-jamba-adapter" if where == "hub" else str(tmp_path / "adapter")
    folder = offline_hub_repo(monkeypatch, tmp_path / "hub", ref) if where == "hub" else Path(ref)
    adapted = save_trained_adapter(tmp_path / "base", folder, use_dora)
    ids = torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                             ref).eval()(input_ids=ids).logits
        loaded = load_model(ref, "cpu")
        torch.testing.assert_close(reloaded, expected)
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert type(loaded).__name__ == "ZooForCausalLM" and not loaded.training
    half = load_model(ref, "cpu", "bf16")
    assert half.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_an_adapter_without_a_tokenizer_takes_its_base_models(tmp_path, monkeypatch, where):
    """An adapter as PEFT saves it holds no tokenizer files: zoo eval's tokenizer was read from the adapter alone and
    refused ('has no tokenizer; pass --tokenizer'), where PEFT's users take its base model's. An adapter with a
    tokenizer of its own (zoo finetune saves one) keeps it."""
    from helpers import adapter_without_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from zoo.data.text import ByteTokenizer
    from zoo.eval.common import load_tokenizer

    ref = adapter_without_tokenizer(tmp_path, monkeypatch, where)
    base = load_tokenizer(None, ref)  # (from the hub: the byte tokenizer's tokenizer.json, as a generic one)
    assert len(base) == len(ByteTokenizer()) and base.encode("hi", add_special_tokens=False) == [104, 105]
    if where == "hub":
        return
    words = ["<unk>", "<s>", "</s>", "hello"]
    own = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    own.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=own, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(ref)
    assert len(load_tokenizer(None, ref)) == len(words)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_a_prompt_learning_adapter_is_refused_not_dropped(tmp_path, capsys, method):
    """A prompt-tuning or P-tuning adapter's virtual tokens are added by the PeftModel around the model; zoo eval and
    zoo generate loaded it through PEFT and kept the model inside (get_base_model), so they evaluated and generated
    from the base model alone, without a word."""
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zoo import cli
    from zoo.config import ZooConfig
    from zoo.data.text import ByteTokenizer
    from zoo.eval.common import load_model

    torch.manual_seed(0)
    yaml = Path(__file__).resolve().parents[1] / "configs" / "models" / "mamba-tiny.yaml"
    AutoModelForCausalLM.from_config(ZooConfig.from_yaml(yaml)).save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(tmp_path / "base")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if method == "prompt-tuning" else \
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config).save_pretrained(tmp_path / "pt")
    name = "PROMPT_TUNING" if method == "prompt-tuning" else "P_TUNING"
    with pytest.raises(ValueError, match=f"{name} adapter.*base model alone.*PeftModel.from_pretrained"):
        load_model(str(tmp_path / "pt"), "cpu")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tmp_path / "pt"), "hi", "--max-new-tokens", "2"])
    assert e.value.code == 2 and f"{name} adapter" in capsys.readouterr().err


def test_an_adapter_trained_with_added_tokens_loads_onto_its_resized_base(tmp_path):
    """An adapter trained after tokens were added to the tokenizer holds the resized embeddings (PEFT saves them);
    PEFT's users resize the base model to them before loading it. zoo eval and zoo generate loaded the base as it was
    saved, and failed in PEFT's load_state_dict ('size mismatch for ... embeddings')."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig
    from zoo.eval.common import load_model

    torch.manual_seed(0)
    yaml = Path(__file__).resolve().parents[1] / "configs" / "models" / "jamba-tiny.yaml"
    AutoModelForCausalLM.from_config(ZooConfig.from_yaml(yaml)).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(520)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["in_proj"], modules_to_save=["embeddings"],
                                               init_lora_weights=False))
    with torch.no_grad():
        adapted.base_model.model.model.embeddings.modules_to_save["default"].weight[512:].normal_()
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 515, 7, 519, 3]])  # added tokens among them
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        resized = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        resized.resize_token_embeddings(520)
        reloaded = PeftModel.from_pretrained(resized, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        loaded = load_model(str(tmp_path / "adapter"), "cpu")
        assert loaded.get_input_embeddings().num_embeddings == 520 and loaded.config.vocab_size == 520
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_a_classifiers_adapter_is_refused_as_a_causal_lm(tmp_path):
    """A SEQ_CLS adapter (a LoRA of a zoo classifier, its score head in modules_to_save) was loaded onto the causal LM
    without a word: zoo eval measured a model whose head the adapter never trained, its own head dropped."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from zoo.config import ZooConfig
    from zoo.eval.common import load_model

    torch.manual_seed(0)
    yaml = Path(__file__).resolve().parents[1] / "configs" / "models" / "mamba-tiny.yaml"
    AutoModelForCausalLM.from_config(ZooConfig.from_yaml(yaml)).save_pretrained(tmp_path / "base")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3, pad_token_id=0)
    get_peft_model(classifier, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["in_proj"])).save_pretrained(
        tmp_path / "cls")
    with pytest.raises(ValueError, match="task_type SEQ_CLS.*not a causal LM's.*AutoModelForSequenceClassification"):
        load_model(str(tmp_path / "cls"), "cpu")


def test_an_adapter_loads_onto_the_base_revision_it_names(tmp_path, monkeypatch):
    """An adapter records the hub revision of its base model it was trained on (adapter_config.json's revision, set
    by get_peft_model(..., revision=)), and PEFT's AutoPeftModel loads that revision; zoo eval and zoo generate
    loaded the base's newest one, another model, without a word. The hub is a cache read offline."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig
    from zoo.eval.common import load_model

    yaml = Path(__file__).resolve().parents[1] / "configs" / "models" / "jamba-tiny.yaml"
    newest = offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/tiny-jamba")  # the main branch's snapshot
    pinned = newest.parent / ("1" * 40)  # an earlier commit, the adapter's base
    for seed, folder in ((0, newest), (1, pinned)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(ZooConfig.from_yaml(yaml)).save_pretrained(folder)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(pinned),
                             LoraConfig(r=2, target_modules=["in_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"base_model_name_or_path": "someone/tiny-jamba",
                                                "revision": pinned.name}))
    ids = torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "adapter"), "cpu")(ids).logits,
                                   adapted.eval()(input_ids=ids).logits)


def test_evaluate_length_averages_over_documents(tmp_path):
    model = tiny_llama()
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 64, (40,), generator=g), torch.randint(0, 64, (25,), generator=g),
            torch.randint(0, 64, (40,), generator=g)]
    result = evaluate_length(model, docs, chunk_size=8, batch_size=2, bins_per_octave=2)
    with torch.no_grad():
        per_doc = [full_forward_loss(model, d[None])[0].double() for d in docs]
    expected = torch.full((40,), math.nan, dtype=torch.float64)
    expected[1:25] = sum(p[:24] for p in per_doc) / 3
    expected[25:40] = (per_doc[0][24:] + per_doc[2][24:]) / 2
    torch.testing.assert_close(result["mean"], expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert result["count"][1:25].eq(3).all() and result["count"][25:].eq(2).all()
    assert sum(b["n_tokens"] for b in result["bins"]) == 39 + 24 + 39
    assert result["bins"][0]["start"] == 1 and result["bins"][-1]["end"] == 40
    total = sum(b["mean_loss"] * b["n_tokens"] for b in result["bins"])
    torch.testing.assert_close(total, sum(p.sum().item() for p in per_doc), rtol=1e-6, atol=1e-6)
    png = plot_length_curves({"llama": result}, tmp_path / "curve.png", train_length=16)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model.train()
    evaluate_length(model, docs[:1], chunk_size=8)
    assert model.training  # evaluated in eval mode, then given back as it came


def test_evaluate_length_progress_advances_with_every_chunk(monkeypatch):
    """zoo eval length's bar counted batches of documents: one 1M-token document stood at 0/1 until it was done. It
    counts the documents' tokens now, advanced after every chunk."""
    updates = record_progress(monkeypatch)
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 64, (40,), generator=g), torch.randint(0, 64, (25,), generator=g),
            torch.randint(0, 64, (40,), generator=g)]
    evaluate_length(tiny_llama(), docs, chunk_size=16, batch_size=2, progress=True)
    assert updates == [("total", 105), 32, 32, 16, 16, 9]


def interrupt_forwards_after(monkeypatch, forwards: int) -> tuple[list, list]:
    """Makes zoo.state.recorder's ``output_cache`` (called after each forward of a state run) raise KeyboardInterrupt
    on its call after ``forwards`` calls (stop[0]; None: never); returns (calls, stop) to count and rearm."""
    from zoo.state import recorder

    real = recorder.output_cache
    calls, stop = [], [forwards]

    def step(out):
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return real(out)

    monkeypatch.setattr(recorder, "output_cache", step)
    return calls, stop


def test_evaluate_length_resumes_an_interrupted_run_at_its_next_document(tmp_path, monkeypatch, capsys):
    """An interrupted evaluate_length (Ctrl-C, a preempted job) lost every document it had finished: eight 1M-token
    documents are hours. The sums of the finished batches are saved as it goes (partial=), and a rerun of the same
    documents and sizes resumes at the next batch, to exactly the uninterrupted result; other settings start over."""
    from zoo.eval import length

    model = tiny_llama()
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 64, (n,), generator=g) for n in (40, 25, 40, 40, 25)]  # batches of 2: 0+2, 3, 1+4
    whole = evaluate_length(model, docs, chunk_size=16, batch_size=2)
    partial = tmp_path / "run.partial.pt"
    calls, stop = interrupt_after(monkeypatch, length, 2)
    with pytest.raises(KeyboardInterrupt):
        evaluate_length(model, docs, chunk_size=16, batch_size=2, partial=partial, partial_key={"model": "m"},
                        save_every=0)
    assert partial.is_file() and not partial.with_name(partial.name + ".tmp").exists()
    capsys.readouterr()
    calls[:], stop[0] = [], None
    resumed = evaluate_length(model, docs, chunk_size=16, batch_size=2, partial=partial, partial_key={"model": "m"},
                              save_every=0, label="m")
    assert "resuming m from document 4 of 5" in capsys.readouterr().out
    assert calls == [2]  # the last batch only
    torch.testing.assert_close(resumed["mean"], whole["mean"], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(resumed["count"], whole["count"]) and resumed["bins"] == whole["bins"]
    assert not partial.exists()  # removed once the run is complete

    for other in ({"batch_size": 1}, {"chunk_size": 8}, {"partial_key": {"model": "n"}}, {"docs": docs[::-1]}):
        stop[0], calls[:] = 1, []
        with pytest.raises(KeyboardInterrupt):
            evaluate_length(model, docs, chunk_size=16, batch_size=2, partial=partial, partial_key={"model": "m"},
                            save_every=0)
        stop[0] = None
        settings = {"chunk_size": 16, "batch_size": 2, "partial_key": {"model": "m"}} | other
        again = evaluate_length(model, settings.pop("docs", docs), partial=partial, save_every=0, label="m",
                                **settings)
        differ = {"partial_key": "model", "docs": "documents"}.get(next(iter(other)), next(iter(other)))
        assert f"m: {partial} holds a partial run of other settings ({differ} differ); starting over" in \
            capsys.readouterr().out
        assert sum(calls) == 2 + 5  # the first batch (saved, then interrupted), then every document
        assert again["bins"] and not partial.exists()
    stop[0] = 0  # interrupted before any batch finished: nothing to save
    with pytest.raises(KeyboardInterrupt):
        evaluate_length(model, docs, chunk_size=16, batch_size=2, partial=partial)
    assert not partial.exists()


def test_eval_length_resumes_an_interrupted_run(checkpoint, tmp_path, monkeypatch, capsys):
    """zoo eval length saved a model's curve only once all its documents were done; an interrupted run is resumed now
    at its next document, and the outputs are those of an uninterrupted run."""
    from zoo.eval import length

    torch.save(torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0)), tmp_path / "docs.pt")
    argv = ["--model", str(checkpoint), str(checkpoint), "--label", "a", "b", "--tokens", str(tmp_path / "docs.pt"),
            "--chunk-size", "16", "--device", "cpu"]
    whole = length.main([*argv, "--out", str(tmp_path / "whole")])
    monkeypatch.setattr(length, "SAVE_EVERY", 0, raising=False)
    calls, stop = interrupt_after(monkeypatch, length, 3 + 2)  # a's three documents, two of b's
    with pytest.raises(KeyboardInterrupt):
        length.main([*argv, "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "b.partial.pt").is_file()
    capsys.readouterr()
    stop[0], calls[:] = None, []
    resumed = length.main([*argv, "--out", str(tmp_path / "out")])
    assert "resuming b from document 3 of 3" in capsys.readouterr().out and calls == [1]
    assert resumed == whole and not (tmp_path / "out" / "b.partial.pt").exists()
    for name in ("a-per-position.pt", "b-per-position.pt"):
        saved, expected = torch.load(tmp_path / "out" / name), torch.load(tmp_path / "whole" / name)
        torch.testing.assert_close(saved, expected, rtol=0, atol=0, equal_nan=True)
    assert (tmp_path / "out" / "b.csv").read_text() == (tmp_path / "whole" / "b.csv").read_text()


def test_eval_length_interrupted_before_length_json_keeps_the_finished_curve(checkpoint, tmp_path, monkeypatch,
                                                                             capsys):
    """zoo eval length removed a model's partial file as its last document finished, before its CSV and length.json
    were written: an interruption in between lost the whole run. The partial file is kept, complete, until length.json
    holds the curve, so the rerun writes the curve without a forward."""
    from zoo.eval import length

    torch.save(torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0)), tmp_path / "docs.pt")
    argv = ["--model", str(checkpoint), str(checkpoint), "--label", "a", "b", "--tokens", str(tmp_path / "docs.pt"),
            "--chunk-size", "16", "--device", "cpu"]
    whole = length.main([*argv, "--out", str(tmp_path / "whole")])
    real = length.write_rows

    def interrupted(rows, path):  # b's documents are done; Ctrl-C before its outputs are written
        if Path(path).name == "b.csv":
            raise KeyboardInterrupt
        return real(rows, path)

    monkeypatch.setattr(length, "write_rows", interrupted)
    calls, _ = interrupt_after(monkeypatch, length, None)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        length.main([*argv, "--out", str(out)])
    assert calls == [1] * 6 and sorted(p.name for p in out.glob("*.partial.pt*")) == ["b.partial.pt"]
    monkeypatch.setattr(length, "write_rows", real)
    capsys.readouterr()
    calls[:] = []
    resumed = length.main([*argv, "--out", str(out)])
    assert calls == [] and f"b: every document is done in {out / 'b.partial.pt'}" in capsys.readouterr().out
    assert resumed == whole and not list(out.glob("*.partial.pt*"))
    assert (out / "b.csv").read_text() == (tmp_path / "whole" / "b.csv").read_text()
    saved, expected = torch.load(out / "b-per-position.pt"), torch.load(tmp_path / "whole" / "b-per-position.pt")
    torch.testing.assert_close(saved, expected, rtol=0, atol=0, equal_nan=True)


def save_after_every_forward(monkeypatch, state) -> None:
    """zoo eval state saves its progress after a forward once SAVE_EVERY seconds and SAVE_COST_FACTOR times the last
    save's time have passed: both 0 make that every forward, whatever the machine's speed (a slow save skipped the
    next saves, and a test's resume point moved)."""
    from zoo.state import recorder

    monkeypatch.setattr(state, "SAVE_EVERY", 0, raising=False)
    monkeypatch.setattr(recorder, "SAVE_COST_FACTOR", 0)


def test_eval_state_resumes_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """zoo eval state saved its run only at the end: an interrupt after hours of a 1M-token run left nothing. The
    statistics so far and the model's cache (a hybrid's attention keys and values, a window's carry) are saved as it
    goes, and a rerun of the same settings resumes at the next chunk, to the state.json of an uninterrupted run."""
    from zoo.eval import state

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])  # (seconds of matplotlib)
    torch.save(torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
    argv = ["--model", str(ROOT / "configs" / "models" / "jamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
            "--max-len", "96", "--chunk-size", "16", "--device", "cpu", "--mitigation", "window:r=8"]
    state.main([*argv, "--out", str(tmp_path / "whole")])  # 6 forwards of 16 tokens
    save_after_every_forward(monkeypatch, state)
    calls, stop = interrupt_forwards_after(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        state.main([*argv, "--out", str(out)])
    assert (out / "state.partial.pt").is_file()  # saved after the first forward, then once 10 times as long has passed
    capsys.readouterr()
    stop[0], calls[:] = None, []
    state.main([*argv, "--out", str(out)])
    done = len(calls)
    assert f"resuming the run from token {96 - 16 * done} of 96" in capsys.readouterr().out and 3 <= done <= 5
    assert (out / "state.json").read_text() == (tmp_path / "whole" / "state.json").read_text()
    assert not (out / "state.partial.pt").exists()

    stop[0], calls[:] = 3, []
    with pytest.raises(KeyboardInterrupt):
        state.main([*argv, "--out", str(out)])
    stop[0], calls[:] = None, []
    state.main([*argv[:-1], "window:r=4", "--out", str(out)])
    assert "holds a partial run of other settings (mitigation differ); starting over" in capsys.readouterr().out
    assert len(calls) == 6 and not (out / "state.partial.pt").exists()


def test_a_state_run_saved_on_a_gpu_is_refused_on_a_cpu_machine_as_of_another_device(tmp_path, monkeypatch, capsys):
    """A state run's partial file holds the model's cache on its device, and its settings name that device. One saved
    on a GPU could not be loaded at all on a machine without one ('Attempting to deserialize object on a CUDA
    device'), and the rerun said it was "not a readable partial run (RuntimeError)"; it is read onto the model's
    device and refused for what it is, a run of another device."""
    import torch.serialization

    from zoo.eval.common import load_model
    from zoo.state.recorder import record_state_statistics

    model = load_model(str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), "cpu")
    rows, partial = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0)), tmp_path / "p.pt"
    record_state_statistics(model, rows, chunk_size=16, partial=partial, keep_partial=True)
    saved = torch.load(partial, weights_only=False)
    saved["settings"]["device"] = "cuda:0"
    with monkeypatch.context() as patch:  # the file a GPU machine writes: storages tagged cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved, partial)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    record_state_statistics(model, rows, chunk_size=16, partial=partial, label="the run")
    assert "the run: " + str(partial) + " holds a partial run of other settings (device differ); starting over" in \
        capsys.readouterr().out


def test_eval_state_caps_the_heads_it_records(tmp_path, monkeypatch):
    """--mitigation norm:threshold=T caps each Mamba head of --group-size channels, the heads the statistics are
    recorded on: the cap took the spec's default of 64 channels, so with --group-size 16 the plotted heads were
    capped four at a time. A group_size in the spec other than --group-size is refused."""
    from zoo.eval import state
    from zoo.state import recurrent_mixers

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])
    seen = []
    real = state.record_state_statistics

    def record(model, *args, **kwargs):
        seen.append({m.mitigation["group_size"] for m in recurrent_mixers(model)})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(state, "record_state_statistics", record)
    torch.save(torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
    argv = ["--model", str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
            "--max-len", "32", "--chunk-size", "16", "--device", "cpu", "--group-size", "16", "--out", str(tmp_path)]
    result = state.main([*argv, "--mitigation", "norm:threshold=1e-4,chunk=4"])
    assert seen == [{16}] and result["group_size"] == 16
    for stats in result["layers"].values():  # each recorded head is capped, at every sample (a forward's end)
        assert max(max(row) for row in stats["state_norm"]) <= 1e-4 * (1 + 1e-5)
    with pytest.raises(ValueError, match="group_size=32 differs from --group-size 16"):
        state.main([*argv, "--mitigation", "norm:threshold=1e-4,group_size=32"])


def test_eval_state_compare_keeps_its_finished_unmitigated_run_for_a_rerun(tmp_path, monkeypatch):
    """zoo eval state --compare interrupted in its mitigated run: the rerun ran the finished unmitigated run again
    from its first token (its partial file was removed as it completed), then resumed the mitigated one. It is kept
    complete until the mitigated run is done, so the rerun runs only the mitigated run's remaining chunks."""
    from zoo.eval import state

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])
    save_after_every_forward(monkeypatch, state)
    torch.save(torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
    argv = ["--model", str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
            "--max-len", "96", "--chunk-size", "16", "--device", "cpu", "--mitigation", "forget:c_alpha=0.9",
            "--compare"]
    state.main([*argv, "--out", str(tmp_path / "whole")])  # 6 forwards of each run
    calls, stop = interrupt_forwards_after(monkeypatch, 9)  # the unmitigated run, then 3 of the mitigated run's 6
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        state.main([*argv, "--out", str(out)])
    stop[0], calls[:] = None, []
    state.main([*argv, "--out", str(out)])
    # the mitigated run's remaining chunks only (from its last save: a save is skipped until 10 times the last one's
    # duration has passed, so on a loaded machine up to all 6); the unmitigated run again would add its 6
    assert len(calls) <= 6
    assert (out / "state.json").read_text() == (tmp_path / "whole" / "state.json").read_text()
    assert not list(out.glob("*.partial.pt*"))


def test_eval_state_compare_resumes_an_unmitigated_run_saved_under_the_whole_key(tmp_path, monkeypatch, capsys):
    """zoo eval state --compare's unmitigated run was saved under the whole key, the mitigation options included,
    until its key left them out: a run an earlier version interrupted in its mitigated run, rerun as it was, took the
    finished unmitigated run's file for one of other settings and ran it again from its first token. It is kept."""
    from zoo.eval import state

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])
    save_after_every_forward(monkeypatch, state)
    torch.save(torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
    argv = ["--model", str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
            "--max-len", "96", "--chunk-size", "16", "--device", "cpu", "--mitigation", "forget:c_alpha=0.9",
            "--compare"]
    state.main([*argv, "--out", str(tmp_path / "whole")])
    calls, stop = interrupt_forwards_after(monkeypatch, 9)  # the unmitigated run, then 3 of the mitigated run's 6
    out = tmp_path / "out"
    options = state.MITIGATION_OPTIONS
    monkeypatch.setattr(state, "MITIGATION_OPTIONS", ())  # the key as the earlier version saved it
    with pytest.raises(KeyboardInterrupt):
        state.main([*argv, "--out", str(out)])
    monkeypatch.setattr(state, "MITIGATION_OPTIONS", options)
    capsys.readouterr()
    stop[0], calls[:] = None, []
    state.main([*argv, "--out", str(out)])
    said = capsys.readouterr().out
    assert f"the unmitigated run: every chunk is done in {out / 'state-none.partial.pt'}" in said
    assert len(calls) == 3 and (out / "state.json").read_text() == (tmp_path / "whole" / "state.json").read_text()


def test_eval_state_compare_keeps_its_unmitigated_run_when_only_the_mitigation_changes(tmp_path, monkeypatch, capsys):
    """zoo eval state --compare interrupted in its mitigated run, rerun with another --norm-calibrate (or
    --mitigation): the unmitigated run's saved file was keyed by the mitigation options too, so the rerun ran the
    unmitigated run, which none of them touch, again from its first token. Only the mitigated run starts over now;
    the unmitigated one is kept, and both are those of an uninterrupted run of the new settings."""
    from zoo.eval import state

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])
    save_after_every_forward(monkeypatch, state)
    torch.save(torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
    argv = ["--model", str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
            "--max-len", "96", "--chunk-size", "16", "--device", "cpu", "--mitigation", "forget:c_alpha=0.9",
            "--compare", "--norm-calibrate"]
    state.main([*argv, "32", "--out", str(tmp_path / "whole")])
    # the unmitigated run's 6 forwards, the calibration's 1 (16 tokens), then 3 of the mitigated run's 6
    calls, stop = interrupt_forwards_after(monkeypatch, 10)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        state.main([*argv, "16", "--out", str(out)])
    capsys.readouterr()
    stop[0], calls[:] = None, []
    state.main([*argv, "32", "--out", str(out)])
    said = capsys.readouterr().out
    # the calibration's 2 forwards (16 and 32 tokens) and the mitigated run's 6; the unmitigated run again added 6
    assert len(calls) == 8 and f"the unmitigated run: every chunk is done in {out / 'state-none.partial.pt'}" in said
    assert "holds a partial run of other settings (mitigation, norm_calibrate differ); starting over" in said
    assert (out / "state.json").read_text() == (tmp_path / "whole" / "state.json").read_text()
    assert not list(out.glob("*.partial.pt*"))


def test_eval_state_interrupted_before_state_json_keeps_the_finished_run(tmp_path, monkeypatch, capsys):
    """zoo eval state removed its run's partial file as the last chunk finished, before state.json was written: an
    interruption in between lost the whole run. It is kept, complete, until state.json holds the run, so the rerun
    writes state.json without a forward."""
    from zoo.eval import state

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])
    torch.save(torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
    argv = ["--model", str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
            "--max-len", "96", "--chunk-size", "16", "--device", "cpu", "--mitigation", "forget:c_alpha=0.9"]
    state.main([*argv, "--out", str(tmp_path / "whole")])
    real = state.summary_rows

    def interrupted(result, *args):  # every chunk is done; Ctrl-C before state.json is written
        raise KeyboardInterrupt

    monkeypatch.setattr(state, "summary_rows", interrupted)
    calls, _ = interrupt_forwards_after(monkeypatch, None)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        state.main([*argv, "--out", str(out)])
    assert len(calls) == 6 and not (out / "state.json").exists()
    monkeypatch.setattr(state, "summary_rows", real)
    calls[:] = []
    state.main([*argv, "--out", str(out)])
    assert calls == [] and f"the run: every chunk is done in {out / 'state.partial.pt'}" in capsys.readouterr().out
    assert (out / "state.json").read_text() == (tmp_path / "whole" / "state.json").read_text()
    assert not list(out.glob("*.partial.pt*"))


def test_log_bins_cover_positions():
    for max_position in (1, 2, 39, 1000, 2**20):
        bins = log_bins(max_position, 4)
        assert bins[0][0] == 1 and bins[-1][1] == max_position + 1
        assert all(a[1] == b[0] for a, b in zip(bins, bins[1:]))
        assert all(lo < hi for lo, hi in bins)
    assert len(log_bins(2**20, 4)) <= 4 * 20 + 1


# ---------------------------------------------------------------- command lines


@pytest.fixture
def checkpoint(tmp_path, hf_tokenizer):
    model = tiny_llama(vocab_size=len(hf_tokenizer))
    path = tmp_path / "llama"
    model.save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    return path


def test_eval_synthetic_by_default_draws_no_row_finetune_trains_on(checkpoint, tmp_path, monkeypatch):
    """zoo eval synthetic's rows were SyntheticDataset(seed=0)'s by default, the very rows zoo finetune trains on with
    its default data seed 0: a finetuned model was scored on its first training rows. The default is EVAL_SEED now."""
    from zoo.data.synthetic import SyntheticDataset
    from zoo.eval import synthetic

    seen = []
    real = synthetic.SyntheticDataset

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(synthetic, "SyntheticDataset", spy)
    synthetic.main(["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32", "--n-kv", "4", "--vocab-size",
                    "64", "--n-samples", "8", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "syn")])
    trained = SyntheticDataset("mqar", 8, 32, 0, n_kv=4, vocab_size=64)  # finetune's training rows at data.seed 0
    assert len(seen) == 1 and seen[0].seed == synthetic.EVAL_SEED
    assert not any(torch.equal(seen[0][i]["input_ids"], trained[i]["input_ids"]) for i in range(8))


def test_eval_synthetic_with_an_empty_seq_lens_evaluates_the_tasks_default_lengths(checkpoint, tmp_path):
    """--seq-lens "" (a script's unset $LENS) took the task's default lengths, as an empty --n-kv takes its default
    count; parsed into a list at argparse time it became [], and the command wrote empty results without a word."""
    from zoo.eval import synthetic

    def lengths(out: str, *argv: str) -> list[int]:
        argv = ["--model", str(checkpoint), "--task", "mqar", *argv, "--vocab-size", "64", "--n-samples", "2",
                "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / out)]
        result = synthetic.main(argv)
        return sorted({r["seq_len"] for r in result["rows"]})

    default = lengths("default")
    assert default and lengths("empty", "--seq-lens", "", "--n-kv", "") == default


def test_main_commands(checkpoint, tmp_path):
    from zoo.eval import length, passkey, synthetic

    out = tmp_path / "out"
    result = synthetic.main(["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32,64",
                             "--n-kv", "4", "--vocab-size", "256", "--n-samples", "8", "--batch-size", "4",
                             "--device", "cpu", "--out", str(out / "syn")])
    assert [(r["seq_len"], r["n_kv"]) for r in result["rows"]] == [(32, 4), (64, 4)]
    assert (out / "syn" / "mqar.csv").exists() and (out / "syn" / "mqar.json").exists()

    passkey.main(["--model", str(checkpoint), "--lengths", "128,256", "--depths", "0,1", "--n-samples", "1",
                  "--device", "cpu", "--out", str(out / "pk")])
    for name in ("passkey.csv", "passkey.md", "passkey.json", "passkey.png"):
        assert (out / "pk" / name).stat().st_size > 0

    torch.save(torch.randint(0, 64, (2, 80)), tmp_path / "docs.pt")
    docs = str(tmp_path / "docs.pt")
    summary = length.main(["--model", str(checkpoint), "--label", "tiny", "--tokens", docs,
                           "--n-docs", "2", "--max-len", "64", "--chunk-size", "16", "--train-length", "32",
                           "--device", "cpu", "--out", str(out / "len")])
    assert summary["tiny"]["max_len"] == 64 and summary["tiny"]["n_documents"] == 2
    for name in ("tiny.csv", "tiny-per-position.pt", "length.json", "length.png"):
        assert (out / "len" / name).stat().st_size > 0
    # the built-in corpus (Python stdlib sources) through zoo's byte tokenizer
    summary = length.main(["--model", str(checkpoint), "--tokenizer", "byte", "--n-docs", "2", "--max-len",
                           "300", "--chunk-size", "128", "--device", "cpu", "--out", str(out / "corpus")])
    assert summary[str(checkpoint)]["n_documents"] == 2 and summary[str(checkpoint)]["max_len"] == 300


def test_corpus_documents_are_disjoint_and_start_with_bos():
    from zoo.data.text import ByteTokenizer as ZooByteTokenizer
    from zoo.eval.length import corpus_documents

    tokenizer = ZooByteTokenizer()
    docs = corpus_documents(tokenizer, 3, 5000, seed=0)
    assert [d.shape[0] for d in docs] == [5000] * 3
    assert all(int(d[0]) == tokenizer.bos_token_id for d in docs)
    texts = [tokenizer.decode(d[1:].tolist()) for d in docs]
    assert texts[0][:200] not in texts[1] and texts[1][:200] not in texts[2]
    assert torch.equal(corpus_documents(tokenizer, 1, 500, seed=0)[0], docs[0][:500])


def _tiny_corpus(tmp_path, monkeypatch, held: list[int], trained: list[int]) -> tuple[str, str]:
    """The built-in corpus replaced by small files: held-out ones of lowercase text (``held``: their lengths) and
    training ones of uppercase text, each opening with '#'; returns the held-out and the training text, each file
    followed by a blank line."""
    import zoo.data.text as text

    paths = {"eval": [], "train": []}
    for split, lengths, letter in (("eval", held, ord("a")), ("train", trained, ord("A"))):
        for i, n in enumerate(lengths):
            path = tmp_path / f"{split}{i}.py"
            path.write_text("#" + "".join(chr(letter + (i + k) % 26) for k in range(n - 1)))
            paths[split].append(path)
    monkeypatch.setattr(text, "stdlib_files", lambda split="train", holdout=0.01: list(paths[split]))
    return ("".join(p.read_text() + "\n\n" for p in paths["eval"]),
            "".join(p.read_text() + "\n\n" for p in paths["train"]))


@pytest.mark.parametrize("start", ["document", "random"])
def test_corpus_documents_keep_the_rest_of_a_held_out_file(tmp_path, monkeypatch, start):
    """The rest of a file that did not fit in a document was thrown away, so the held-out files ran out after a few
    documents and the rest were training text (configs/train/collapse.yaml's eval: 53 of 64 documents, 83% of the
    tokens). Now every held-out token goes into some document before any training file's, documents stay disjoint,
    and the result counts the training files' tokens."""
    from zoo.data.text import ByteTokenizer as ZooByteTokenizer
    from zoo.eval.length import corpus_documents

    held, trained = _tiny_corpus(tmp_path, monkeypatch, [130, 75, 210, 40, 95], [500] * 8)
    tokenizer = ZooByteTokenizer()
    docs = corpus_documents(tokenizer, 12, 64, seed=3, start=start)
    assert [len(d) for d in docs] == [64] * 12 and all(int(d[0]) == tokenizer.bos_token_id for d in docs)
    texts = [bytes(d[1:].tolist()).decode() for d in docs]
    letters = "".join(texts)
    # every held-out character exactly once (each file's letters are its own run of the alphabet), and no more
    # training text than the documents need once the held-out text is used up
    text_chars = lambda s, lower: sorted(c for c in s if c.isalpha() and c.islower() == lower)  # noqa: E731
    assert text_chars(letters, True) == text_chars(held, True)
    used = len(held) // 63  # documents of held-out text only
    assert all(not any(c.isupper() for c in t) for t in texts[:used]) and any(c.isupper() for c in texts[used + 1])
    assert docs.tokens == 12 * 64 and docs.train_tokens == 12 * 63 - len(held)
    assert docs.train_documents == sum(any(c.isupper() for c in t) for t in texts)
    assert docs.provenance()["train_share"] == docs.train_tokens / docs.tokens
    assert all(torch.equal(a, b) for a, b in zip(docs, corpus_documents(tokenizer, 12, 64, seed=3, start=start)))
    if start == "document":  # the first 5 documents begin at a held-out file's start
        assert sorted(t[:2] for t in texts[:5]) == ["#a", "#b", "#c", "#d", "#e"]
    else:  # each document begins inside its first file (seeded offsets)
        assert sum(t.startswith("#") for t in texts[:5]) <= 1


def test_length_and_state_give_a_model_trained_without_bos_documents_without_it(gla_checkpoint, tmp_path, monkeypatch):
    """The built-in corpus's documents always started with BOS, also for a model trained with data.add_bos false
    (recorded in its config as add_bos), whose passkey prompts and zoo generate already went without it. Now each
    model of zoo eval length gets its own, in one call, and zoo eval state too."""
    from transformers import AutoModelForCausalLM

    from zoo.eval import length, state
    from zoo.eval.length import corpus_documents

    bare = tmp_path / "bare"
    model = AutoModelForCausalLM.from_pretrained(gla_checkpoint)
    model.config.add_bos = False
    model.save_pretrained(bare)
    length.load_tokenizer(None, str(gla_checkpoint)).save_pretrained(bare)
    seen = []
    real = length.evaluate_length

    def spy(model, documents, *args, **kwargs):
        seen.append((getattr(model.config, "add_bos", True), [d.clone() for d in documents]))
        return real(model, documents, *args, **kwargs)

    monkeypatch.setattr(length, "evaluate_length", spy)
    length.main(["--model", str(gla_checkpoint), str(bare), "--n-docs", "2", "--max-len", "64", "--chunk-size", "32",
                 "--device", "cpu", "--out", str(tmp_path / "len")])
    tokenizer = length.load_tokenizer(None, str(gla_checkpoint))
    bos = tokenizer.bos_token_id
    assert bos is not None and [flag for flag, _ in seen] == [True, False]
    assert all(int(d[0]) == bos for d in seen[0][1]) and all(int(d[0]) != bos for d in seen[1][1])
    without = corpus_documents(tokenizer, 2, 64, add_bos=False)
    assert all(torch.equal(a, b) for a, b in zip(seen[1][1], without))
    assert all(torch.equal(a[1:], b[:63]) for a, b in zip(seen[0][1], without))  # the same text after the BOS
    rows = []
    real_load_rows = state.load_rows

    def rows_spy(args, *more):
        got = real_load_rows(args, *more)
        rows.append(got[0])
        return got

    monkeypatch.setattr(state, "load_rows", rows_spy)
    state.main(["--model", str(bare), "--n-docs", "1", "--max-len", "64", "--chunk-size", "32", "--device", "cpu",
                "--out", str(tmp_path / "state")])
    assert int(rows[0][0, 0]) != bos and torch.equal(rows[0][0], without[0])


def test_corpus_documents_with_random_starts_begin_inside_a_file():
    from zoo.data.text import ByteTokenizer as ZooByteTokenizer
    from zoo.eval.length import corpus_documents

    tokenizer = ZooByteTokenizer()
    docs = corpus_documents(tokenizer, 3, 400, seed=1, start="random")
    assert [d.shape[0] for d in docs] == [400] * 3
    assert all(int(d[0]) == tokenizer.bos_token_id for d in docs)
    # the same file order: the first document is BOS + its first file from an offset > 0, then the next files
    stream = bytes(corpus_documents(tokenizer, 1, 200_000, seed=1)[0][1:].tolist())
    offset = stream.find(bytes(docs[0][1:].tolist()))
    assert offset > 0, offset
    assert not torch.equal(docs[0], corpus_documents(tokenizer, 1, 400, seed=1)[0])
    assert torch.equal(corpus_documents(tokenizer, 3, 400, seed=1, start="random")[2], docs[2])  # seeded
    with pytest.raises(ValueError, match="start must be"):
        corpus_documents(tokenizer, 1, 100, start="middle")


def test_eval_commands_take_mitigations(tmp_path, monkeypatch):
    """zoo eval length runs each model once per --mitigation (a neutral spec reproduces 'none', a window
    changes the curve past it); synthetic and passkey accept one; a bad spec fails before any evaluation."""
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type)
    from zoo.config import ZooConfig
    from zoo.eval import length, synthetic

    torch.manual_seed(0)
    config = ZooConfig.from_yaml(ROOT / "configs" / "models" / "mamba-tiny.yaml")
    model_dir = tmp_path / "mamba"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    torch.save(torch.randint(0, 64, (2, 48)), tmp_path / "docs.pt")
    summary = length.main(["--model", str(model_dir), "--label", "m", "--tokens", str(tmp_path / "docs.pt"),
                           "--n-docs", "2", "--max-len", "48", "--chunk-size", "16", "--device", "cpu",
                           "--mitigation", "none", "forget:c_alpha=1.0", "window:r=8",
                           "--out", str(tmp_path / "len")])
    assert list(summary) == ["m [none]", "m [forget:c_alpha=1.0]", "m [window:r=8]"]
    assert [summary[k]["mitigation"] for k in summary] == ["none", "forget:c_alpha=1.0", "window:r=8"]
    curves = {k: torch.load(tmp_path / "len" / f"m-{k.split('[')[1][:-1].replace(':', '_')}-per-position.pt")
              for k in summary}
    none, neutral, window = curves.values()
    torch.testing.assert_close(neutral["mean"], none["mean"], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.allclose(window["mean"][1:8], none["mean"][1:8], atol=1e-6)  # the window changes nothing before r
    # a random tiny model barely reads its state (the window moves its loss by < 1e-6), so the wiring is checked
    # on the mixers themselves; the mitigations' maths is tested in test_state.py
    from zoo.state.mitigation import recurrent_mixers

    seen = []
    real = length.evaluate_length

    def spy(model, *args, **kwargs):
        seen.append([m.mitigation and m.mitigation.get("window") for m in recurrent_mixers(model)])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(length, "evaluate_length", spy)
    length.main(["--model", str(model_dir), "--tokens", str(tmp_path / "docs.pt"), "--max-len", "48",
                 "--device", "cpu", "--mitigation", "none", "window:r=8", "--out", str(tmp_path / "len2")])
    assert seen == [[None] * 4, [8] * 4]
    with pytest.raises(ValueError):
        length.main(["--model", str(model_dir), "--tokens", str(tmp_path / "docs.pt"), "--mitigation", "bogus:x=1",
                     "--out", str(tmp_path / "bad")])
    result = synthetic.main(["--model", str(model_dir), "--task", "mqar", "--seq-lens", "32", "--n-kv", "2",
                             "--vocab-size", "64", "--n-samples", "4", "--batch-size", "4", "--device", "cpu",
                             "--mitigation", "window:r=8", "--out", str(tmp_path / "syn")])
    assert len(result["rows"]) == 1


def test_decode_prefill_in_chunks_refuses_transformers_mamba():
    """zoo.decode.prefill (the benchmarks' and GraphDecoder's prefill) had no such check: with chunk_size below the
    prompt, transformers' Mamba's later chunks dropped the carried state and the decode continued from a wrong one."""
    from transformers import MambaConfig, MambaForCausalLM

    from zoo.decode import prefill

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=64)).eval()
    input_ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"chunk_size=16 below the prompt's 40 tokens.*MambaForCausalLM"):
        prefill(model, input_ids, chunk_size=16)
    assert prefill(model, input_ids, chunk_size=40).next_ids.shape == (1, 1)  # one chunk: the whole prompt


def test_commands_keep_finished_cells_when_a_later_one_fails(checkpoint, tmp_path, monkeypatch):
    """passkey, synthetic and length wrote their tables only after the whole grid: a sweep that ran out of memory
    at its longest length (or a lost job) left nothing. Now every finished cell (length: run) is on disk."""
    from zoo.eval import length, passkey, synthetic

    real_generate = passkey.greedy_generate

    def generate_until_256(model, input_ids, *args, **kwargs):
        if input_ids.shape[1] > 200:
            raise RuntimeError("CUDA out of memory")
        return real_generate(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(passkey, "greedy_generate", generate_until_256)
    with pytest.raises(RuntimeError, match="out of memory"):
        passkey.main(["--model", str(checkpoint), "--lengths", "128,256", "--depths", "0,1", "--n-samples", "1",
                      "--device", "cpu", "--out", str(tmp_path / "pk")])
    saved = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert [(r["length"], r["depth"]) for r in saved["rows"]] == [(128, 0.0), (128, 1.0)]
    assert len(saved["samples"]) == 2 and saved["model"] == str(checkpoint)
    assert (tmp_path / "pk" / "passkey.csv").read_text().count("\n") == 3

    real_predict = synthetic.predict_answers

    def predict_until_64(model, input_ids, *args, **kwargs):
        if input_ids.shape[1] >= 64:
            raise RuntimeError("CUDA out of memory")
        return real_predict(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict_until_64)
    with pytest.raises(RuntimeError, match="out of memory"):
        synthetic.main(["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32,64", "--n-kv", "4",
                        "--vocab-size", "256", "--n-samples", "4", "--device", "cpu", "--out", str(tmp_path / "syn")])
    saved = json.loads((tmp_path / "syn" / "mqar.json").read_text())
    assert [(r["seq_len"], r["n_kv"]) for r in saved["rows"]] == [(32, 4)] and saved["complete"] is False
    assert (tmp_path / "syn" / "mqar.csv").read_text().count("\n") == 2

    real_length = length.evaluate_length
    calls = []

    def second_run_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real_length(*args, **kwargs)

    monkeypatch.setattr(length, "evaluate_length", second_run_fails)
    torch.save(torch.randint(0, 64, (2, 40)), tmp_path / "docs.pt")
    with pytest.raises(RuntimeError, match="out of memory"):
        length.main(["--model", str(checkpoint), str(checkpoint), "--label", "a", "b", "--tokens",
                     str(tmp_path / "docs.pt"), "--max-len", "40", "--device", "cpu", "--out", str(tmp_path / "len")])
    assert list(json.loads((tmp_path / "len" / "length.json").read_text())) == ["a"]


def test_passkey_interrupted_while_rewriting_its_tables_keeps_the_finished_cells(checkpoint, tmp_path, monkeypatch):
    """passkey.csv and passkey.md (as synthetic's and length's CSVs) were rewritten in place after every cell: a Ctrl-C
    mid-write left passkey.csv a bare header and passkey.md half a table, the finished cells' rows gone. They are
    written beside and renamed over now: the tables of the cells before stay whole, and a rerun completes them."""
    import csv

    from zoo.eval import passkey

    argv = ["--model", str(checkpoint), "--lengths", "128", "--depths", "0,1", "--n-samples", "1", "--device", "cpu"]
    whole = tmp_path / "whole"
    passkey.main([*argv, "--out", str(whole)])
    real_rows, real_text = csv.DictWriter.writerows, Path.write_text

    def rows_interrupted(self, rows):  # the second cell's rows: Ctrl-C after the header reached the file
        if len(rows) == 2:
            raise KeyboardInterrupt
        return real_rows(self, rows)

    def text_interrupted(self, text, *args, **kwargs):  # the second cell's passkey.md: half of it, then Ctrl-C
        if self.name.startswith("passkey.md") and text.count("\n") > 4:
            real_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real_text(self, text, *args, **kwargs)

    for name, patched in (("writerows", rows_interrupted), ("write_text", text_interrupted)):
        out = tmp_path / name
        monkeypatch.setattr(csv.DictWriter if name == "writerows" else Path, name, patched)
        with pytest.raises(KeyboardInterrupt):
            passkey.main([*argv, "--out", str(out)])
        monkeypatch.undo()
        first = json.loads((out / "passkey.json").read_text())["rows"]  # (written after the tables)
        assert [(r["length"], r["depth"]) for r in first] == [(128, 0.0)] and not list(out.glob("*.tmp"))
        if name == "writerows":
            table = list(csv.DictReader((out / "passkey.csv").open(newline="")))
            assert [(int(r["length"]), float(r["depth"])) for r in table] == [(128, 0.0)]
        else:
            assert (out / "passkey.md").read_text() == markdown_grid(first) + "\n"
        passkey.main([*argv, "--out", str(out)])
        for file in ("passkey.csv", "passkey.md"):
            assert (out / file).read_text() == (whole / file).read_text()


def test_passkey_rerun_skips_finished_cells_and_notices_changed_settings(checkpoint, tmp_path, monkeypatch, capsys):
    """A rerun of zoo eval passkey after an interruption ran every cell again (hours at 1M tokens), and nothing told
    apart a passkey.json of other settings. Now the finished cells of the same model files and settings are kept and
    only the rest run (same result as one uninterrupted run); other settings or retrained weights start afresh."""
    from zoo.eval import passkey

    real_generate = passkey.greedy_generate
    calls = []

    def generate(model, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[1])
        if fail and input_ids.shape[1] > 200:
            raise RuntimeError("CUDA out of memory")
        return real_generate(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(passkey, "greedy_generate", generate)
    argv = ["--model", str(checkpoint), "--lengths", "128,256", "--depths", "0,1", "--n-samples", "2",
            "--device", "cpu", "--out", str(tmp_path / "pk")]
    fail = False
    whole = passkey.main([*argv[:-1], str(tmp_path / "whole")])
    fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        passkey.main(argv)
    fail, calls[:] = False, []
    resumed = passkey.main(argv)
    assert "resuming" in capsys.readouterr().out
    assert calls and all(n > 200 for n in calls) and len(calls) == 4  # the two 256-token cells only
    assert resumed["rows"] == whole["rows"] and resumed["samples"] == whole["samples"]

    calls[:] = []
    passkey.main([*argv, "--seed", "1"])
    assert "seed differ" in capsys.readouterr().out and len(calls) == 8
    calls[:] = []
    passkey.main([*argv, "--seed", "1"])
    assert calls == []
    weights = next(checkpoint.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # retrained in place: same name, new file
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    passkey.main([*argv, "--seed", "1"])
    assert "weights differ" in capsys.readouterr().out and len(calls) == 8


def test_passkey_stopped_in_a_cell_keeps_its_finished_prompts(checkpoint, tmp_path, monkeypatch, capsys):
    """zoo eval passkey saved a cell only once all its prompts were done: Ctrl-C or SIGTERM in a cell lost its finished
    prompts (a cell of 1M-token prompts is minutes of them). They are saved as it stops now, and the same command runs
    only the cell's other prompts, to the result of an uninterrupted run."""
    from zoo.eval import passkey

    real_generate = passkey.greedy_generate
    calls, stop = [], [None]

    def generate(model, input_ids, *args, **kwargs):  # one call per prompt; Ctrl-C at the call after stop[0]
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return real_generate(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(passkey, "greedy_generate", generate)
    argv = ["--model", str(checkpoint), "--lengths", "128", "--depths", "0,1", "--n-samples", "3", "--device", "cpu"]
    whole = passkey.main([*argv, "--out", str(tmp_path / "whole")])
    out = tmp_path / "out"
    stop[0], calls[:] = 4, []  # the first cell's three prompts, then one of the second's
    with pytest.raises(KeyboardInterrupt):
        passkey.main([*argv, "--out", str(out)])
    saved = json.loads((out / "passkey.json").read_text())
    assert [(r["length"], r["depth"]) for r in saved["rows"]] == [(128, 0.0)]
    assert saved["samples"] == whole["samples"][:4]
    stop[0], calls[:] = None, []
    capsys.readouterr()
    resumed = passkey.main([*argv, "--out", str(out)])
    assert "resuming" in capsys.readouterr().out and len(calls) == 2  # the second cell's last two prompts
    assert resumed["rows"] == whole["rows"] and resumed["samples"] == whole["samples"]
    for file in ("passkey.csv", "passkey.md"):
        assert (out / file).read_text() == (tmp_path / "whole" / file).read_text()


def test_passkey_rerun_of_another_grid_reports_that_grid_only(checkpoint, tmp_path, monkeypatch, capsys):
    """A rerun with the same settings kept every saved cell whatever its grid: --lengths 128 after --lengths 128,256
    reported (and drew in the heatmap and passkey.md) the 256-token cells as its own."""
    from zoo.eval import passkey

    real_generate = passkey.greedy_generate
    calls = []

    def generate(model, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[1])
        return real_generate(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(passkey, "greedy_generate", generate)
    base = ["--model", str(checkpoint), "--depths", "0", "--n-samples", "2", "--device", "cpu", "--out",
            str(tmp_path / "pk")]
    both = passkey.main([*base, "--lengths", "128,256"])
    calls[:] = []
    fewer = passkey.main([*base, "--lengths", "128"])
    assert "resuming" in capsys.readouterr().out and calls == []  # the 128-token cell is kept
    assert fewer["rows"] == both["rows"][:1] and fewer["samples"] == both["samples"][:2]
    assert "256" not in (tmp_path / "pk" / "passkey.md").read_text()


def test_synthetic_rerun_skips_finished_cells_and_notices_changed_settings(checkpoint, tmp_path, monkeypatch, capsys):
    """zoo eval synthetic saved every finished cell but a rerun ran the whole grid again; now the cells of a JSON of
    the same model and settings are kept and only the rest run, while other settings (--seed) start afresh."""
    from zoo.eval import synthetic

    real_predict = synthetic.predict_answers
    lengths = []

    def predict(model, input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        if fail and input_ids.shape[1] >= 64:
            raise RuntimeError("CUDA out of memory")
        return real_predict(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    argv = ["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32,64", "--n-kv", "2,4", "--vocab-size",
            "256", "--n-samples", "4", "--device", "cpu", "--out", str(tmp_path / "syn")]
    fail = False
    whole = synthetic.main([*argv[:-1], str(tmp_path / "whole")])
    fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        synthetic.main(argv)
    fail, lengths[:] = False, []
    resumed = synthetic.main(argv)
    assert "resuming" in capsys.readouterr().out
    assert lengths == [64, 64]  # the two 64-token cells only
    assert resumed["rows"] == whole["rows"] and resumed["by_seq_len"] == whole["by_seq_len"]
    assert json.loads((tmp_path / "syn" / "mqar.json").read_text())["complete"] is True
    lengths[:] = []
    synthetic.main([*argv, "--seed", "1"])
    assert "seed differ" in capsys.readouterr().out and lengths == [32, 32, 64, 64]


def test_synthetic_rerun_of_another_grid_reports_that_grid_only(checkpoint, tmp_path, monkeypatch, capsys):
    """A rerun with the same settings but another grid kept every saved cell: --seq-lens 64 after --seq-lens 32
    reported the 32-token cell (and pooled it into by_count) as its own, and --seq-lens 3 (no buildable cell)
    printed the old cell and exited 0. The rows are now those of one uninterrupted run of the grid asked for."""
    from zoo.eval import synthetic

    real_predict = synthetic.predict_answers
    lengths = []

    def predict(model, input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return real_predict(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    base = ["--model", str(checkpoint), "--task", "mqar", "--n-kv", "2", "--vocab-size", "256", "--n-samples", "4",
            "--device", "cpu"]
    out = ["--out", str(tmp_path / "syn")]
    synthetic.main([*base, "--seq-lens", "32", *out])
    whole = synthetic.main([*base, "--seq-lens", "64,32", "--out", str(tmp_path / "whole")])
    lengths[:] = []
    grown = synthetic.main([*base, "--seq-lens", "64,32", *out])
    assert "resuming" in capsys.readouterr().out and lengths == [64]  # the 32-token cell is kept
    assert grown["rows"] == whole["rows"] and [r["seq_len"] for r in grown["rows"]] == [64, 32]
    fewer = synthetic.main([*base, "--seq-lens", "64", *out])
    assert [r["seq_len"] for r in fewer["rows"]] == [64] and fewer["by_count"][0]["n_answers"] == 8
    with pytest.raises(ValueError, match="no cell of the mqar grid can be built"), pytest.warns(UserWarning):
        synthetic.main([*base, "--seq-lens", "3", *out])


def test_eval_synthetic_writes_its_figure_and_a_resumed_rerun_redraws_it_whole(checkpoint, tmp_path, monkeypatch,
                                                                               capsys):
    """zoo eval synthetic writes mqar.png beside mqar.csv and mqar.json, titled with the task and the model; a rerun
    that resumes finished cells draws them with the new ones, and one with every cell kept draws the figure again."""
    from zoo.eval import synthetic

    real_predict, real_plot = synthetic.predict_answers, synthetic.plot_synthetic_accuracy
    lengths, plotted = [], []

    def predict(model, input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        if fail and input_ids.shape[1] >= 64:
            raise RuntimeError("CUDA out of memory")
        return real_predict(model, input_ids, *args, **kwargs)

    def plot(result, path, title=None):
        plotted.append(([(r["seq_len"], r["n_kv"]) for r in result["rows"]], title))
        return real_plot(result, path, title)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    monkeypatch.setattr(synthetic, "plot_synthetic_accuracy", plot)
    out = tmp_path / "syn"
    argv = ["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32,64", "--n-kv", "2,4", "--vocab-size",
            "256", "--n-samples", "4", "--device", "cpu", "--out", str(out)]
    fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        synthetic.main(argv)
    assert (out / "mqar.json").is_file() and not (out / "mqar.png").exists()
    fail, lengths[:] = False, []
    synthetic.main(argv)
    assert lengths == [64, 64]  # the 32-token cells were kept ...
    grid = [(32, 2), (32, 4), (64, 2), (64, 4)]
    assert plotted == [(grid, f"mqar: {checkpoint}")]  # ... and drawn with the new ones
    assert_png(out / "mqar.png")
    assert f"and {out / 'mqar.png'}" in capsys.readouterr().out
    (out / "mqar.png").write_bytes(b"stale")
    lengths[:] = []
    synthetic.main(argv)
    assert lengths == [] and plotted[-1][0] == grid
    assert_png(out / "mqar.png")


def test_eval_synthetic_stopped_in_a_cell_keeps_its_finished_batches(checkpoint, tmp_path, monkeypatch, capsys):
    """zoo eval synthetic saved a cell only once all its batches were done: Ctrl-C or SIGTERM in a cell lost them (a
    cell of 2^20-token rows is an hour of batches). Its finished batches are saved as it stops now (mqar.json's
    `started`), and the same command runs only the cell's other rows, to the result of an uninterrupted run."""
    from zoo.eval import synthetic

    real_predict = synthetic.predict_answers
    calls, stop = [], [None]

    def predict(model, input_ids, *args, **kwargs):  # one call per batch; Ctrl-C at the call after stop[0]
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append((input_ids.shape[1], input_ids.shape[0]))
        return real_predict(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(synthetic, "predict_answers", predict)
    argv = ["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32,64", "--n-kv", "4", "--vocab-size", "256",
            "--n-samples", "6", "--batch-size", "2", "--device", "cpu"]
    whole = synthetic.main([*argv, "--out", str(tmp_path / "whole")])
    out = tmp_path / "out"
    stop[0], calls[:] = 5, []  # the 32-token cell's three batches, then two of the 64-token cell's
    with pytest.raises(KeyboardInterrupt):
        synthetic.main([*argv, "--out", str(out)])
    saved = json.loads((out / "mqar.json").read_text())
    assert [r["seq_len"] for r in saved["rows"]] == [32] and saved["started"]["next"] == 4
    stop[0], calls[:] = None, []
    resumed = synthetic.main([*argv, "--out", str(out)])
    assert calls == [(64, 2)]  # the 64-token cell's last two rows only
    assert resumed["rows"] == whole["rows"] and "started" not in json.loads((out / "mqar.json").read_text())
    assert (out / "mqar.csv").read_text() == (tmp_path / "whole" / "mqar.csv").read_text()


def test_length_rerun_skips_finished_runs_and_notices_changed_settings(checkpoint, tmp_path, monkeypatch, capsys):
    """zoo eval length wrote length.json after every run, but a rerun evaluated every model again (at 1M tokens, the
    long part of a sweep); now the curves of the same model files and settings are kept and only the rest run."""
    from zoo.eval import length

    real_length = length.evaluate_length
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if fail and len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real_length(*args, **kwargs)

    monkeypatch.setattr(length, "evaluate_length", evaluate)
    torch.save(torch.randint(0, 64, (2, 40)), tmp_path / "docs.pt")
    argv = ["--model", str(checkpoint), str(checkpoint), "--label", "a", "b", "--tokens", str(tmp_path / "docs.pt"),
            "--max-len", "40", "--chunk-size", "16", "--device", "cpu", "--out", str(tmp_path / "len")]
    fail = False
    whole = length.main([*argv[:-1], str(tmp_path / "whole")])
    fail, calls[:] = True, []
    with pytest.raises(RuntimeError, match="out of memory"):
        length.main(argv)
    fail, calls[:] = False, []
    resumed = length.main(argv)
    assert len(calls) == 1 and "a: kept" in capsys.readouterr().out  # b only
    assert [resumed[k]["bins"] for k in "ab"] == [whole[k]["bins"] for k in "ab"]
    assert (tmp_path / "len" / "length.png").stat().st_size > 0
    calls[:] = []
    length.main([*argv, "--bins-per-octave", "2"])
    assert len(calls) == 2 and "under other settings" in capsys.readouterr().out


def test_length_evaluates_every_document_of_a_tokens_file_whole(checkpoint, tmp_path):
    """--n-docs (4) and --max-len (16384) are the built-in corpus's defaults, but they also cut a --tokens file: 6
    held-out documents gave a curve of 4, and documents of 20K tokens were cut to 16K, without a word."""
    from zoo.eval import length

    torch.save(torch.randint(0, 64, (6, 70)), tmp_path / "docs.pt")
    summary = length.main(["--model", str(checkpoint), "--label", "tiny", "--tokens", str(tmp_path / "docs.pt"),
                           "--device", "cpu", "--out", str(tmp_path / "len")])
    assert summary["tiny"]["n_documents"] == 6 and summary["tiny"]["max_len"] == 70
    torch.save([torch.randint(0, 64, (20000,))], tmp_path / "long.pt")
    assert [len(d) for d in length.load_documents(str(tmp_path / "long.pt"), None, None)] == [20000]
    assert [len(d) for d in length.load_documents(str(tmp_path / "long.pt"), 1, 100)] == [100]  # when asked


def test_a_hub_model_is_fingerprinted_by_the_commit_of_its_local_copy(tmp_path, monkeypatch, capsys):
    """A resumed evaluation of a hub id kept the old results after the repository was updated and downloaded again
    (the id was the whole fingerprint); the cached commit of its main revision now identifies the weights."""
    import huggingface_hub.constants

    from zoo.eval.common import model_fingerprint, resume, write_json

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-zoo"

    def download(commit: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    assert model_fingerprint("someone/tiny-zoo") == "someone/tiny-zoo"  # not downloaded: the id alone
    download("a" * 40)
    first = model_fingerprint("someone/tiny-zoo")
    assert first == {"hub": "someone/tiny-zoo", "commit": "a" * 40}
    write_json({"rows": [], "config": {"weights": first}}, tmp_path / "out.json")
    assert resume(tmp_path / "out.json", {"weights": model_fingerprint("someone/tiny-zoo")}, "t") is not None
    download("b" * 40)  # the repository moved on and was downloaded again
    assert resume(tmp_path / "out.json", {"weights": model_fingerprint("someone/tiny-zoo")}, "t") is None
    assert "weights differ" in capsys.readouterr().out


def test_an_adapter_is_fingerprinted_with_its_base_model(tmp_path, monkeypatch, capsys):
    """A resumed evaluation of a PEFT adapter kept the old results when its base model was retrained in place (an
    adapter folder's fingerprint was its own files), or when a hub adapter was updated and downloaded again (the id
    alone: the commit was read off config.json, which an adapter repo does not hold)."""
    import os

    from zoo.eval.common import model_fingerprint, resume, write_json

    folder = tmp_path / "adapter"
    save_trained_adapter(tmp_path / "base", folder, use_dora=False)
    write_json({"rows": [], "config": {"weights": model_fingerprint(str(folder))}}, tmp_path / "out.json")
    assert resume(tmp_path / "out.json", {"weights": model_fingerprint(str(folder))}, "t") is not None
    weights = tmp_path / "base" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the base retrained
    assert resume(tmp_path / "out.json", {"weights": model_fingerprint(str(folder))}, "t") is None
    assert "weights differ" in capsys.readouterr().out

    repo = "someone/tiny-jamba-adapter"
    snapshot = offline_hub_repo(monkeypatch, tmp_path / "hub", repo)
    save_trained_adapter(tmp_path / "base", snapshot, use_dora=False)
    first = model_fingerprint(repo)
    assert first != repo and first["commit"] == snapshot.name
    write_json({"rows": [], "config": {"weights": first}}, tmp_path / "hub.json")
    assert resume(tmp_path / "hub.json", {"weights": model_fingerprint(repo)}, "t") is not None
    updated = snapshot.parent / ("1" * 40)  # the repository moved on and was downloaded again
    snapshot.rename(updated)
    (snapshot.parent.parent / "refs" / "main").write_text(updated.name)
    assert resume(tmp_path / "hub.json", {"weights": model_fingerprint(repo)}, "t") is None


@pytest.fixture
def gla_checkpoint(tmp_path, hf_tokenizer):
    """A zoo GLA model (a recurrent mixer, for the mitigations) saved with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(Path(__file__).parents[1] /
                                                                 "configs/models/gla-tiny.yaml"))
    path = tmp_path / "gla"
    model.save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    return path


def test_eval_length_of_a_checkpoint_trained_on_the_corpus_says_how_much_is_training_text(gla_checkpoint, tmp_path,
                                                                                        monkeypatch):
    """zoo eval length on a zoo checkpoint trained on the built-in corpus took the files held out at 0.01 whatever the
    run's data.holdout, and said nothing when the documents ran past the held-out files into the training files (the
    model's own training text). It takes the run's held-out files first (train_config.yaml beside model/), warns when
    any token is training text, and records the share in length.json; a model not trained on the corpus is not
    warned about."""
    import shutil

    from zoo.eval import length

    held, _ = _tiny_corpus(tmp_path, monkeypatch, [150, 90], [4000] * 3)
    seen, real = [], length.corpus_documents
    monkeypatch.setattr(length, "corpus_documents", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(gla_checkpoint, step / "model")
    (step / "train_config.yaml").write_text("model: x\noutput_dir: run\ndata: {source: stdlib, holdout: 0.002}\n")
    argv = ["--n-docs", "3", "--max-len", "128", "--chunk-size", "64", "--device", "cpu"]
    with pytest.warns(UserWarning, match=r"zoo eval length .*step_00000002/model: [12] of 3 documents .*training"):
        summary = length.main(["--model", str(step / "model"), *argv, "--out", str(tmp_path / "a")])
    documents = summary[str(step / "model")]["documents"]
    assert seen == [0.002] and documents["holdout"] == 0.002 and documents["trained_on_corpus"]
    assert documents["n_documents"] == 3 and 0 < documents["train_tokens"] == documents["tokens"] - 3 - \
        documents["held_tokens"]
    saved = json.loads((tmp_path / "a" / "length.json").read_text())
    assert saved[str(step / "model")]["documents"] == documents
    # the same weights without the run's config: not known to have trained on the corpus, recorded but not warned
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = length.main(["--model", str(gla_checkpoint), *argv, "--out", str(tmp_path / "b")])
    assert seen == [0.01] and not summary[str(gla_checkpoint)]["documents"]["trained_on_corpus"]
    # with documents of held-out text only, nothing is said
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = length.main(["--model", str(step / "model"), "--n-docs", "1", "--max-len", "16", "--device", "cpu",
                               "--out", str(tmp_path / "c")])
    assert summary[str(step / "model")]["documents"]["train_tokens"] == 0 and len(held) > 16


def test_eval_state_of_a_checkpoint_trained_on_the_corpus_says_how_much_is_training_text(gla_checkpoint, tmp_path,
                                                                                       monkeypatch):
    """zoo eval state built the built-in corpus's rows from the files held out at 0.01 whatever the checkpoint's run
    trained with, and said nothing of the training text in them. As zoo eval length, it takes the run's held-out files
    first, warns when any token is training text, and records the documents' provenance in state.json."""
    import shutil

    from zoo.eval import length, state

    _tiny_corpus(tmp_path, monkeypatch, [150, 90], [4000] * 3)
    seen, real = [], length.corpus_documents
    monkeypatch.setattr(length, "corpus_documents", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(gla_checkpoint, step / "model")
    (step / "train_config.yaml").write_text("model: x\noutput_dir: run\ndata: {source: stdlib, holdout: 0.002}\n")
    argv = ["--n-docs", "3", "--max-len", "128", "--chunk-size", "64", "--device", "cpu"]
    with pytest.warns(UserWarning, match=r"zoo eval state .*step_00000002/model: [12] of 3 documents .*training"):
        state.main(["--model", str(step / "model"), *argv, "--out", str(tmp_path / "a")])
    documents = json.loads((tmp_path / "a" / "state.json").read_text())["documents"]
    assert seen == [0.002] and documents["holdout"] == 0.002 and documents["trained_on_corpus"]
    assert documents["n_documents"] == 3 and 0 < documents["train_tokens"] == documents["tokens"] - 3 - \
        documents["held_tokens"]
    # the same weights without the run's config: not known to have trained on the corpus, recorded but not warned
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.main(["--model", str(gla_checkpoint), *argv, "--out", str(tmp_path / "b")])
    documents = json.loads((tmp_path / "b" / "state.json").read_text())["documents"]
    assert seen == [0.01] and not documents["trained_on_corpus"]


def test_a_rerun_with_another_tokenizer_saved_in_its_folder_evaluates_again(tmp_path, monkeypatch, capsys):
    """zoo eval length kept a curve (length.json) and zoo eval passkey its cells (passkey.json) by --tokenizer's name:
    a rerun after another tokenizer was saved into that folder reported the old tokenizer's results as its own
    ("kept from ...", "resuming ...")."""
    from helpers import save_letter_tokenizer

    from zoo.eval import length, passkey

    model, folder = str(ROOT / "configs" / "models" / "mamba-tiny.yaml"), tmp_path / "tok"
    save_letter_tokenizer(folder, bos_token=("<s>", 28), eos_token=("</s>", 29))
    argv = ["--model", model, "--label", "m", "--tokenizer", str(folder), "--n-docs", "1", "--max-len", "96",
            "--chunk-size", "32", "--device", "cpu"]
    first = length.main([*argv, "--out", str(tmp_path / "len")])
    pk_argv = ["--model", model, "--tokenizer", str(folder), "--lengths", "200", "--depths", "0", "--n-samples", "1",
               "--device", "cpu", "--out", str(tmp_path / "pk")]
    passkey.main(pk_argv)
    capsys.readouterr()
    save_letter_tokenizer(folder, bos_token=("<s>", 29), eos_token=("</s>", 28))  # another one, of the same name
    rerun = length.main([*argv, "--out", str(tmp_path / "len")])
    assert "kept from" not in capsys.readouterr().out
    fresh = length.main([*argv, "--out", str(tmp_path / "fresh")])
    assert rerun["m"]["bins"] == fresh["m"]["bins"] != first["m"]["bins"]
    calls = []
    real_generate = passkey.greedy_generate
    monkeypatch.setattr(passkey, "greedy_generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    passkey.main(pk_argv)
    assert calls == [1] and "resuming" not in capsys.readouterr().out
    # the same tokenizer loaded again is the same one: kept
    length.main([*argv, "--out", str(tmp_path / "len")])
    passkey.main(pk_argv)
    assert calls == [1] and capsys.readouterr().out.count("kept from") == 1


def test_a_rerun_under_a_norm_cap_notices_another_chunk_size(gla_checkpoint, tmp_path, monkeypatch, capsys):
    """The norm cap acts at the end of every forward, so under norm:... a curve (zoo eval length --chunk-size) and a
    passkey answer (--prefill-chunk-size) depend on the chunking; a rerun with another chunk size kept the old
    results as its own (a chunk-16 curve reported for --chunk-size 12, 6e-3 nats apart at the tiny GLA)."""
    from zoo.eval import length, passkey

    torch.save(torch.randint(0, 64, (2, 60)), tmp_path / "docs.pt")
    argv = ["--model", str(gla_checkpoint), "--label", "gla", "--tokens", str(tmp_path / "docs.pt"), "--device",
            "cpu", "--bins-per-octave", "8", "--mitigation", "norm:threshold=0.05,chunk=8"]
    length.main([*argv, "--chunk-size", "16", "--out", str(tmp_path / "len")])
    capsys.readouterr()
    rerun = length.main([*argv, "--chunk-size", "12", "--out", str(tmp_path / "len")])
    assert "kept from" not in capsys.readouterr().out
    fresh = length.main([*argv, "--chunk-size", "12", "--out", str(tmp_path / "fresh")])
    key = "gla [norm:threshold=0.05,chunk=8]"
    assert rerun[key]["bins"] == fresh[key]["bins"]
    length.main([*argv[:-2], "--chunk-size", "12", "--out", str(tmp_path / "len")])  # exact mitigations: not asked
    assert "chunk_size" not in json.loads((tmp_path / "len" / "length.json").read_text())["gla"]["config"]

    calls = []
    real_generate = passkey.greedy_generate
    monkeypatch.setattr(passkey, "greedy_generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    argv = ["--model", str(gla_checkpoint), "--lengths", "160", "--depths", "0", "--n-samples", "1", "--max-new-tokens",
            "6", "--device", "cpu", "--out", str(tmp_path / "pk"), "--mitigation", "norm:threshold=0.05,chunk=8"]
    passkey.main([*argv, "--prefill-chunk-size", "16"])
    calls[:] = []
    passkey.main([*argv, "--prefill-chunk-size", "12"])
    assert calls and "prefill_chunk_size differ" in capsys.readouterr().out

    from zoo.eval import synthetic

    argv = ["--model", str(gla_checkpoint), "--task", "mqar", "--seq-lens", "64", "--n-kv", "4", "--n-samples", "2",
            "--vocab-size", "64", "--device", "cpu", "--out", str(tmp_path / "syn"), "--mitigation",
            "norm:threshold=0.05,chunk=8"]
    synthetic.main([*argv, "--chunk-size", "32"])
    capsys.readouterr()
    synthetic.main([*argv, "--chunk-size", "16"])
    assert "chunk_size differ" in capsys.readouterr().out


def test_evaluations_of_a_model_whose_config_says_return_dict_false_read_its_logits():
    """A folder saved from a model loaded with return_dict=False (for an export) keeps it in config.json, and the
    forward returns a tuple: the chunked per-position loss, the passkey's chunked prefill and decode, and the synthetic
    predictions read out.logits and failed with "'tuple' object has no attribute 'logits'" (generate and zoo.decode's
    loops ask every step for an output object, as these now do)."""
    from zoo.data.text import ByteTokenizer

    model = tiny_zoo_model("mamba")
    docs = [torch.randint(1, 200, (64,), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run():
        return (evaluate_length(model, docs, 16, 2)["bins"], evaluate_length(model, docs, None, 2)["bins"],
                evaluate_passkey(model, ByteTokenizer(), [300], [0.5], 1, prefill_chunk_size=64,
                                 max_new_tokens=8)["rows"],
                [evaluate_synthetic(model, "mqar", seq_lens=[64], n_kv=[4], n_samples=2, vocab_size=128,
                                    chunk_size=chunk)["rows"] for chunk in (None, 16)])

    expected = run()
    model.config.return_dict = False
    assert isinstance(model(docs[0][None]), tuple)
    assert run() == expected


def test_eval_length_stopped_by_sigterm_keeps_its_documents_and_says_so(checkpoint, tmp_path, monkeypatch, capsys):
    """SIGTERM (`timeout`'s, a scheduler's) during zoo eval length killed the process without a word (only training
    handled it): it stops as Ctrl-C does now, the finished documents' partial file kept, one line saying what is kept
    and that the same command continues, exit status 130; the handler before the command is back afterwards."""
    import signal

    from helpers import sigterm_after, sigterm_raises_terminated

    from zoo.cli import _run
    from zoo.eval import length

    torch.save(torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0)), tmp_path / "docs.pt")
    out = tmp_path / "out"
    argv = ["--model", str(checkpoint), "--label", "a", "--tokens", str(tmp_path / "docs.pt"), "--chunk-size", "16",
            "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(length, "SAVE_EVERY", 0, raising=False)
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    calls = sigterm_after(monkeypatch, length, 2)
    with sigterm_raises_terminated() as handler:
        assert _run("zoo eval length", length.main, argv) == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    assert calls == [1, 1] and torch.load(out / "a.partial.pt")["batches"] == 2  # the third document's forward stopped
    # the last line, on its own: the progress bar is closed before it (left open, it was drawn again below it)
    assert capsys.readouterr().err.endswith(
        f"\nzoo eval length: interrupted: finished curves (length.json, *.csv) and the finished documents of an "
        f"evaluation (*.partial.pt) are kept in {out}; the same command continues\n")


def test_eval_length_stopped_between_saves_keeps_every_finished_document(checkpoint, tmp_path, monkeypatch, capsys):
    """zoo eval length saved its finished documents at most every SAVE_EVERY (30) seconds: SIGTERM or Ctrl-C lost those
    finished since the last save (every one, in a run stopped within its first 30 s). They are saved as it stops now,
    and the same command goes on at the next document to the uninterrupted run's outputs."""
    from helpers import sigterm_after, sigterm_raises_terminated

    from zoo.cli import _run
    from zoo.eval import length

    torch.save(torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0)), tmp_path / "docs.pt")
    argv = ["--model", str(checkpoint), "--label", "a", "--tokens", str(tmp_path / "docs.pt"), "--chunk-size", "16",
            "--device", "cpu"]
    whole = length.main([*argv, "--out", str(tmp_path / "whole")])
    out = tmp_path / "out"
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    assert length.SAVE_EVERY >= 30  # (no save falls due in this run: only the one at the stop)
    real = length.per_position_loss
    calls = sigterm_after(monkeypatch, length, 2)
    with sigterm_raises_terminated():
        assert _run("zoo eval length", length.main, [*argv, "--out", str(out)]) == 130
    assert calls == [1, 1] and torch.load(out / "a.partial.pt")["batches"] == 2
    monkeypatch.setattr(length, "per_position_loss", real)
    calls, _ = interrupt_after(monkeypatch, length, None)
    capsys.readouterr()
    resumed = length.main([*argv, "--out", str(out)])
    assert "resuming a from document 3 of 3" in capsys.readouterr().out and calls == [1]
    assert resumed == whole and not list(out.glob("*.partial.pt*"))
    saved, expected = torch.load(out / "a-per-position.pt"), torch.load(tmp_path / "whole" / "a-per-position.pt")
    torch.testing.assert_close(saved, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("command", ["state", "synthetic", "passkey"])
def test_eval_stopped_by_sigterm_keeps_what_it_saved_and_says_so(command, checkpoint, tmp_path, monkeypatch, capsys):
    """SIGTERM (`timeout`'s, a scheduler's) during zoo eval state, synthetic or passkey killed the process without a
    word, and Ctrl-C ended them in a bare 'interrupted': they stop as zoo eval length does now, what they saved kept,
    one line naming it and saying that the same command continues, exit status 130, the handler before the command
    back afterwards; and the same command does continue from there."""
    import importlib
    import signal

    from helpers import sigterm_raises_terminated

    from zoo.cli import _run
    from zoo.state import recorder

    module = importlib.import_module(f"zoo.eval.{command}")
    out = tmp_path / "out"
    if command == "state":  # 6 forwards of 16 tokens; SIGTERM at the fourth, its progress saved after each forward
        torch.save(torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0)), tmp_path / "rows.pt")
        argv = ["--model", str(ROOT / "configs" / "models" / "jamba-tiny.yaml"), "--tokens", str(tmp_path / "rows.pt"),
                "--max-len", "96", "--chunk-size", "16", "--device", "cpu"]
        save_after_every_forward(monkeypatch, module)  # (a loaded machine skipped a save and kept 2 chunks)
        monkeypatch.setattr(module, "plot_state_statistics", lambda *args: [])
        owner, name, stop = recorder, "output_cache", 3
        kept = f"the run's progress as last saved (state.partial.pt) is kept in {out}"
    elif command == "synthetic":  # two cells of one forward each; SIGTERM in the second
        argv = ["--model", str(checkpoint), "--task", "mqar", "--seq-lens", "32,64", "--n-kv", "4", "--vocab-size",
                "256", "--n-samples", "4", "--batch-size", "4", "--device", "cpu"]
        owner, name, stop = module, "predict_answers", 1
        kept = f"the finished cells (mqar.csv, mqar.json) are kept in {out}"
    else:  # two cells of one prompt each; SIGTERM in the second
        argv = ["--model", str(checkpoint), "--lengths", "128,256", "--depths", "0", "--n-samples", "1",
                "--device", "cpu"]
        owner, name, stop = module, "greedy_generate", 1
        kept = f"the finished cells (passkey.csv, passkey.md, passkey.json) are kept in {out}"
    argv += ["--out", str(out)]
    real, calls = getattr(owner, name), []

    def step(*args, **kwargs):
        if stop is not None and len(calls) >= stop:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, step)
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    capsys.readouterr()
    with sigterm_raises_terminated() as handler:
        assert _run(f"zoo eval {command}", module.main, argv) == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    # the last line, on its own: the progress bar is closed before it (left open, it was drawn again below it)
    assert capsys.readouterr().err.endswith(f"\nzoo eval {command}: interrupted: {kept}; the same command continues\n")
    if command == "state":
        assert torch.load(out / "state.partial.pt", weights_only=False)["chunks"] == 3
    else:
        table = out / ("mqar.csv" if command == "synthetic" else "passkey.csv")
        assert len(table.read_text().splitlines()) == 2  # the header and the first cell
    stop, done = None, len(calls)
    module.main(argv)
    assert len(calls) - done == (3 if command == "state" else 1)  # the rest only


def test_a_tokenizers_fingerprint_does_not_see_its_last_calls_padding_or_truncation(tmp_path):
    # the fingerprint hashed the backend pipeline whole, with the padding and truncation its last call left set: the
    # same tokenizer called with padding=True (or truncation) gave another digest, and its kept results were redone
    from helpers import save_letter_tokenizer
    from transformers import AutoTokenizer

    from zoo.eval.common import tokenizer_fingerprint

    save_letter_tokenizer(tmp_path / "a", pad_token=("<pad>", 28))
    save_letter_tokenizer(tmp_path / "b", pad_token=("<pad>", 29))
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    before = tokenizer_fingerprint(tok)
    tok(["ab", "abc"], padding=True, truncation=True, max_length=2)
    assert tok.backend_tokenizer.padding is not None or tok.backend_tokenizer.truncation is not None
    assert tokenizer_fingerprint(tok) == before
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "a")) == before
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "b")) != before
