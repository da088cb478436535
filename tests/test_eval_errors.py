"""`zoo eval` on bad input: one-line ValueErrors that name the option and the fix (exit 2 through the CLI),
never a silent empty result or a bare IndexError deep in a forward."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAMBA_TINY = ROOT / "configs" / "models" / "mamba-tiny.yaml"  # vocab_size 512


def zoo_yaml(tmp_path: Path, vocab_size: int, name: str = "tiny.yaml") -> str:
    """mamba-tiny with another vocabulary, as a zoo model YAML (random weights, no checkpoint to save)."""
    config = yaml.safe_load(MAMBA_TINY.read_text())
    config["vocab_size"] = vocab_size
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def save_tiny_checkpoint(path: Path, vocab_size: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``zoo ARGV`` in-process: (exit status, stderr)."""
    from zoo.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------- 1. token files


def test_flat_token_file_is_refused_not_split_into_one_token_documents(tmp_path, capsys):
    from zoo.eval import length, state

    flat = tmp_path / "flat.pt"
    torch.save(torch.randint(0, 256, (2000,)), flat)
    common = ["--tokens", str(flat), "--max-len", "64", "--device", "cpu", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"--tokens .*shape \[2000\].*\[N, T\].*t\[None\]"):
        length.main(["--model", str(MAMBA_TINY), *common])
    with pytest.raises(ValueError, match=r"--tokens .*shape \[2000\]"):
        state.main(["--model", str(MAMBA_TINY), "--chunk-size", "16", *common])
    assert not (tmp_path / "out").exists()
    code, err = run_cli(["eval", "length", "--model", str(MAMBA_TINY), *common], capsys)
    assert code == 2 and err.startswith("zoo eval length: --tokens") and "shape [2000]" in err


def test_a_token_file_torch_cannot_load_is_refused_in_one_line(tmp_path, capsys):
    """A --tokens file that torch.save did not write (text, a NumPy .npy, a truncated .pt) ended zoo eval length and
    zoo eval state in a traceback from torch's unpickler (KeyError: 101, UnpicklingError 'Weights only load failed'),
    which read as a bug of zoo rather than a wrong file."""
    import numpy as np

    from zoo.eval import length, state

    text, npy, cut = tmp_path / "docs.txt", tmp_path / "docs.npy", tmp_path / "cut.pt"
    text.write_text("hello world\n")
    np.save(npy, np.arange(100).reshape(2, 50))
    torch.save(torch.zeros(2, 64, dtype=torch.long), cut)
    cut.write_bytes(cut.read_bytes()[:100])
    for bad in (text, npy, cut):
        common = ["--tokens", str(bad), "--max-len", "32", "--device", "cpu", "--out", str(tmp_path / "out")]
        with pytest.raises(ValueError, match=rf"--tokens {re.escape(str(bad))}: not a file torch.save wrote"):
            length.main(["--model", str(MAMBA_TINY), *common])
        with pytest.raises(ValueError, match=r"not a file torch.save wrote .*torch.save\(t.long\(\), path\)"):
            state.main(["--model", str(MAMBA_TINY), "--chunk-size", "16", *common])
    code, err = run_cli(["eval", "length", "--model", str(MAMBA_TINY), "--tokens", str(text), "--out",
                         str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("zoo eval length: --tokens") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_token_file_saved_from_a_gpu_is_read_on_the_cpu(tmp_path, monkeypatch):
    """Token ids saved from CUDA tensors (a batch's input_ids on a GPU machine) could not be evaluated on a machine
    without one: torch.load restored them to cuda:0 and refused ('Attempting to deserialize object on a CUDA device');
    they are read on the CPU, and go to the model's device with each batch."""
    import torch.serialization

    from zoo.eval.length import load_documents

    with monkeypatch.context() as patch:  # the file a GPU machine writes: storages tagged cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(torch.arange(20).view(2, 10), tmp_path / "gpu.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    docs = load_documents(str(tmp_path / "gpu.pt"), None, None)
    assert [d.tolist() for d in docs] == [list(range(10)), list(range(10, 20))]
    assert all(d.device.type == "cpu" for d in docs)


def test_load_documents_takes_the_documented_shapes_only(tmp_path):
    from zoo.eval.length import load_documents

    def saved(obj) -> str:
        torch.save(obj, tmp_path / "t.pt")
        return str(tmp_path / "t.pt")

    docs = load_documents(saved(torch.arange(30).view(3, 10).int()), 2, 8)
    assert [d.tolist() for d in docs] == [list(range(8)), list(range(10, 18))] and docs[0].dtype == torch.long
    docs = load_documents(saved([torch.arange(5), torch.arange(9)]), 4, 8)
    assert [len(d) for d in docs] == [5, 8]
    for bad, match in [(torch.zeros(2, 3, 4, dtype=torch.long), r"shape \[2, 3, 4\]"),
                       (torch.rand(2, 10), "float32 values"),
                       (torch.ones(2, 10, dtype=torch.bool), "bool values"),
                       ([torch.zeros(2, 5, dtype=torch.long)], r"holds \[\[2, 5\]\]"),
                       ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, "holds dict"),
                       (torch.zeros(0, 5, dtype=torch.long), "no documents"),
                       (torch.zeros(3, 1, dtype=torch.long), "at least 2 tokens")]:
        with pytest.raises(ValueError, match=match):
            load_documents(saved(bad), 4, 8)


# ---------------------------------------------------------------- 2. vocabulary checks, state --task arguments


def test_passkey_refuses_a_tokenizer_beyond_the_model_vocabulary(tmp_path, capsys):
    from zoo.eval import passkey

    model = zoo_yaml(tmp_path, vocab_size=100)  # a YAML model gets the byte tokenizer: ids up to 258
    argv = ["--model", model, "--lengths", "200", "--depths", "0", "--n-samples", "1", "--device", "cpu",
            "--out", str(tmp_path / "pk")]
    # refused before the first cell, by the tokenizer's size (the first prompt's ids were refused before)
    with pytest.raises(ValueError, match=r"the byte tokenizer \(a zoo YAML model's, .*\) has 259 tokens, more than "
                                         r"the model's 100 embeddings; .*--tokenizer"):
        passkey.main(argv)
    code, err = run_cli(["eval", "passkey", *argv], capsys)
    assert code == 2 and "more than the model's 100 embeddings" in err and "IndexError" not in err


@pytest.mark.parametrize("command", ["passkey", "length", "state"])
@pytest.mark.parametrize("tokenizer", ["bos-past", "larger"])
def test_a_tokenizer_not_the_models_is_refused_before_any_evaluation(command, tokenizer, tmp_path, capsys):
    # a tokenizer whose bos id (700, which every prompt and document starts with) lay past mamba-tiny's 512
    # embeddings, or one of 603 tokens whose ids in the prompts and documents stayed below 512 (mostly <unk>), was
    # evaluated without a word: a passkey grid, a length curve and state statistics of a model scored on text
    # tokenized as it never was trained; zoo generate, train and finetune refuse such a tokenizer
    from helpers import save_letter_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from zoo.eval import length, passkey, state

    folder = tmp_path / "tok"
    if tokenizer == "bos-past":
        save_letter_tokenizer(folder, bos_token=("<s>", 700), eos_token=("<eos>", 28))
        message = (r"--tokenizer '.*tok': its bos_token_id 700 is outside the model's vocabulary "
                   r"\(vocab_size 512: ids 0\.\.511\), though the tokenizer has 30 tokens \(its ids have gaps\); "
                   r"give the tokenizer the model was trained with \(--tokenizer\)")
    else:
        words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(600)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(folder)
        message = r"--tokenizer '.*tok' has 603 tokens, more than the model's 512 embeddings; .*\(--tokenizer\)"
    out = tmp_path / "out"
    argv = ["--model", str(MAMBA_TINY), "--tokenizer", str(folder), "--device", "cpu", "--out", str(out)]
    argv += {"passkey": ["--lengths", "200", "--depths", "0", "--n-samples", "1"],
             "length": ["--n-docs", "1", "--max-len", "64", "--chunk-size", "32"],
             "state": ["--n-docs", "1", "--max-len", "64", "--chunk-size", "32"]}[command]
    main = {"passkey": passkey.main, "length": length.main, "state": state.main}[command]
    with pytest.raises(ValueError, match=message):
        main(argv)
    assert not out.exists()
    code, err = run_cli(["eval", command, *argv], capsys)
    assert code == 2 and err.startswith(f"zoo eval {command}: --tokenizer ") and "Traceback" not in err


@pytest.mark.parametrize("command", ["passkey", "length", "state"])
@pytest.mark.parametrize("role", ["pad_token", "eos_token"])
def test_an_evaluation_runs_with_a_tokenizer_whose_unfed_pad_or_eos_id_lies_past_the_embeddings(command, role,
                                                                                             tmp_path, capsys):
    # the evaluations refused a pad or eos id past the model's embeddings though none of them feeds it to the model
    # (no prompt or document is padded or holds an eos, and the model never generates an id it has no logit for):
    # such a tokenizer could not be evaluated at all, where zoo generate warns and runs. They warn and run too
    from helpers import save_letter_tokenizer

    from zoo.eval import length, passkey, state

    specials = {"bos_token": ("<s>", 28), "pad_token": ("<pad>", 29), "eos_token": ("</s>", 30), role: ("<x>", 700)}
    save_letter_tokenizer(tmp_path / "tok", **specials)
    argv = ["--model", str(MAMBA_TINY), "--tokenizer", str(tmp_path / "tok"), "--device", "cpu",
            "--out", str(tmp_path / "out")]
    argv += {"passkey": ["--lengths", "200", "--depths", "0", "--n-samples", "1"],
             "length": ["--n-docs", "1", "--max-len", "64", "--chunk-size", "32"],
             "state": ["--n-docs", "1", "--max-len", "64", "--chunk-size", "32"]}[command]
    main = {"passkey": passkey.main, "length": length.main, "state": state.main}[command]
    with pytest.warns(UserWarning, match=rf"its {role}_id 700 is outside the model's vocabulary .*; this run does not "
                                         rf"feed it to the model"):
        main(argv)
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("command, argv, message", [
    ("length", ["--max-len", "65", "--n-docs", "1", "--chunk-size", "32"],
     "max_len: documents of up to 65 tokens, but GPT2LMHeadModel learns 64 absolute positions (transformer.wpe, "
     "config max_position_embeddings); give --max-len of at most 64"),
    ("passkey", ["--lengths", "200", "--depths", "0", "--n-samples", "1"],
     "lengths: at least 195 positions (a prompt of at least 188 tokens at length 200, then 8 new tokens, the last not "
     "fed back), but GPT2LMHeadModel learns 64 absolute positions (transformer.wpe, config max_position_embeddings); "
     "no --lengths fit in them: passkey's shortest prompt (without filler) takes 188 tokens, 195 positions with the "
     "new tokens"),
    ("synthetic", ["--vocab-size", "64", "--seq-lens", "64,128", "--n-samples", "2"],
     "seq_lens: rows of up to 128 tokens, but GPT2LMHeadModel learns 64 absolute positions (transformer.wpe, config "
     "max_position_embeddings); give --seq-lens of at most 64"),
])
def test_an_evaluation_past_a_models_learned_positions_is_refused_in_one_line(command, argv, message, tmp_path,
                                                                              capsys):
    # a model of learned absolute positions (GPT-2's wpe) has no row for a position past them: documents, passkey
    # prompts or synthetic rows longer than its 64 positions failed in that embedding in a traceback, 'IndexError:
    # index out of range in self' (zoo generate and zoo train refuse them)
    from transformers import GPT2Config, GPT2LMHeadModel

    from zoo.eval.common import check_positions
    from zoo.hub import save_model_folder

    # (no special ids of GPT-2's 50257-token vocabulary: transformers' warning about them, logged to a stream an
    # earlier test's capture had closed, printed a 'Logging error' traceback under pytest-xdist)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    check_positions(model, 64, "64 positions", str)  # (as many as it learns: no refusal)
    save_model_folder(model, tmp_path / "gpt2", "byte")
    code, err = run_cli(["eval", command, "--model", str(tmp_path / "gpt2"), *argv, "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"zoo eval {command}: {message}\n" in err and "Traceback" not in err, err


def test_passkey_runs_a_model_whose_learned_positions_hold_its_real_prompts(tmp_path):
    # the position check took a prompt to be as long as its length, and refused a GPT-2 whose positions held every
    # prompt it builds (a few tokens shorter: whole filler sentences) and the new tokens it feeds back
    from transformers import GPT2Config, GPT2LMHeadModel

    from zoo.eval.common import load_tokenizer
    from zoo.eval.passkey import build_passkey_prompt, cell_keys, evaluate_passkey

    tokenizer = load_tokenizer("byte", None)
    longest = max(len(build_passkey_prompt(tokenizer, 300, depth, key).input_ids)
                  for depth in (0.0, 1.0) for key in cell_keys(0, 300, depth, 2))
    assert longest < 300
    for chunk in (None, 64):  # generate, and the chunked prefill
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=longest + 5, n_embd=32, n_layer=1, n_head=2,
                                           bos_token_id=None, eos_token_id=None))
        result = evaluate_passkey(model, tokenizer, [300], [0, 1], 2, max_new_tokens=6, prefill_chunk_size=chunk)
        assert [row["n_samples"] for row in result["rows"]] == [2, 2]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=longest + 4, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    with pytest.raises(ValueError, match=rf"lengths: at least {longest + 5} positions \(a prompt of at least "
                                         rf"{longest} tokens at length 300, then 6 new tokens, the last not fed "
                                         rf"back\), but GPT2LMHeadModel "
                                         rf"learns {longest + 4} absolute positions .*; give --lengths of at most "
                                         rf"{longest - 1}$"):
        evaluate_passkey(model, tokenizer, [250, 300], [0, 1], 2, max_new_tokens=6)


def test_passkey_refuses_a_length_far_past_learned_positions_without_building_its_prompts(monkeypatch):
    # the check built the prompts of every length past the positions to measure them: --lengths 1M took ~10 s (and
    # GPT-2's tokenizer ~7 s) to refuse a GPT-2 of 1024 positions, tokenizing a million-token prompt several times.
    # Only prompts of about the positions are built now, and a length whose prompts fit is still run (above)
    from transformers import GPT2Config, GPT2LMHeadModel

    from zoo.eval import passkey
    from zoo.eval.common import encode_with_bos, load_tokenizer

    built = []

    def counted(tokenizer, text, add_bos=True):
        ids = encode_with_bos(tokenizer, text, add_bos)
        built.append(len(ids))
        return ids

    monkeypatch.setattr(passkey, "encode_with_bos", counted)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=256, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    with pytest.raises(ValueError, match=r"lengths: at least \d+ positions \(a prompt of at least \d+ tokens at length "
                                         r"1000000, .* learns 256 absolute positions .*; give --lengths of at most "
                                         r"249$"):
        passkey.evaluate_passkey(model, load_tokenizer("byte", None), [1_000_000], [0, 0.5, 1], 2)
    # (the prompts of 256 positions, and the 64 filler sentences build_passkey_prompt measures a sentence's cost on)
    assert built and max(built) < 2000, max(built)


class OddKeyTokenizer:
    """A character a token (its byte), but a number whose first digit is odd one token (300): a passkey prompt of
    such a key is 8 tokens shorter than one of another key, as a BPE tokenizer writes some keys in fewer tokens."""

    bos_token_id = eos_token_id = None

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r"\d+|\D", text)
        return [i for piece in pieces for i in ([300] if piece[0] in "13579" else [ord(c) % 256 for c in piece])]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i < 256)


def test_passkey_past_learned_positions_advises_a_length_the_template_check_takes():
    # the refusal advised --lengths of at most the positions less the new tokens but one, whatever that length's
    # keys: where they made a prompt without filler longer than it, the length advised was refused in turn ('shorter
    # than the bare passkey template'), and below the template of every key (a GPT-2 of 64 positions, above) no
    # length could ever be taken. It is now the longest one the template check takes, or the refusal says none fits
    from transformers import GPT2Config, GPT2LMHeadModel

    from zoo.eval.passkey import cell_keys, evaluate_passkey, passkey_text

    tokenizer = OddKeyTokenizer()
    short = len(tokenizer.encode(passkey_text(11111, 0, 0)))  # the prompt without filler of a key of odd first digit
    assert len(tokenizer.encode(passkey_text(22222, 0, 0))) == short + 8

    def odd(seed: int, length: int) -> bool:
        return str(cell_keys(seed, length, 0.0, 1)[0])[0] in "13579"

    fits = short + 7  # the longest prompt the model holds with 8 new tokens
    # a seed whose key at length `fits` makes a prompt without filler longer than it, and one length below it does not
    seed = next(seed for seed in range(100) if not odd(seed, fits) and any(odd(seed, n) for n in range(short, fits)))
    longest = max(n for n in range(short, fits) if odd(seed, n))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=fits + 7, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    with pytest.raises(ValueError, match=rf"learns {fits + 7} absolute positions .*; give --lengths of at most "
                                         rf"{longest}$"):
        evaluate_passkey(model, tokenizer, [short + 200], [0], 1, seed=seed)
    with pytest.raises(ValueError, match="shorter than the bare passkey template"):  # (what was advised)
        evaluate_passkey(model, tokenizer, [fits], [0], 1, seed=seed)
    assert [row["length"] for row in evaluate_passkey(model, tokenizer, [longest], [0], 1, seed=seed)["rows"]] == \
        [longest]


def test_state_checks_the_vocabulary_and_takes_task_arguments(tmp_path):
    from zoo.eval import state

    common = ["--model", str(MAMBA_TINY), "--n-docs", "2", "--max-len", "64", "--chunk-size", "32",
              "--device", "cpu", "--out", str(tmp_path / "state")]
    with pytest.raises(ValueError, match=r"--task mqar rows hold token id \d+ but the model's vocab_size is 512; "
                                         r"pass --vocab-size 512 or less"):
        state.main([*common, "--task", "mqar"])  # the task's default vocabulary is 8192
    with pytest.raises(ValueError, match=r"--task mqar: .*fewer than n_kv=16.*--n-kv"):
        state.main([*common, "--task", "mqar", "--vocab-size", "32"])
    result = state.main([*common, "--task", "mqar", "--vocab-size", "32", "--n-kv", "4", "--power-a", "1.0"])
    assert result["positions"][-1] == 64 and all(x == x for x in result["loss"])  # no NaN
    with pytest.raises(ValueError, match="--n-kv: task 'induction_heads' has no count"):
        state.main([*common, "--task", "induction_heads", "--n-kv", "4"])
    torch.save(torch.full((2, 64), 600), tmp_path / "big.pt")
    with pytest.raises(ValueError, match="--tokens documents hold token id 600 but the model's vocab_size is 512"):
        state.main([*common, "--tokens", str(tmp_path / "big.pt")])


# ---------------------------------------------------------------- 3. length output names


def test_length_outputs_of_models_sharing_a_folder_name_do_not_collide(tmp_path):
    from zoo.eval import length

    paths = [str(save_tiny_checkpoint(tmp_path / run / "merged")) for run in ("A", "B")]
    torch.save(torch.randint(0, 64, (1, 24)), tmp_path / "docs.pt")
    length.main(["--model", *paths, "--tokens", str(tmp_path / "docs.pt"), "--max-len", "24", "--device", "cpu",
                 "--out", str(tmp_path / "len")])
    written = sorted(p.name for p in (tmp_path / "len").iterdir())
    assert written == ["A-merged-per-position.pt", "A-merged.csv", "B-merged-per-position.pt", "B-merged.csv",
                       "length.json", "length.png"]
    assert list(json.loads((tmp_path / "len" / "length.json").read_text())) == paths


def test_json_outputs_are_strict_json(tmp_path):
    # zoo eval state on one-token rows wrote its NaN loss as a bare NaN, which jq, JavaScript and other strict
    # readers refuse; a non-finite number is now null
    from zoo.eval.common import write_json

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))

    path = write_json({"loss": [float("nan"), 1.5], "best": float("inf"), "rows": ({"acc": -float("inf")},)},
                      tmp_path / "out" / "r.json")
    assert strict(path.read_text()) == {"loss": [None, 1.5], "best": None, "rows": [{"acc": None}]}


def test_write_json_interrupted_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    """write_json wrote over its file in place: an interruption mid-write left a truncated length.json (or
    passkey.json), which the rerun's resume then read as no results, losing every finished curve or cell. It writes a
    temporary file beside it and renames that over it now."""
    from pathlib import Path

    from zoo.eval.common import write_json

    path = write_json({"rows": [1, 2, 3]}, tmp_path / "r.json")
    old = path.read_text()
    real = Path.write_text

    def interrupted(self, text, *args, **kwargs):  # half the text reaches the disk, then Ctrl-C
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json({"rows": [1, 2, 3, 4]}, path)
    monkeypatch.undo()
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert json.loads(write_json({"rows": [4]}, path).read_text()) == {"rows": [4]}


def test_length_refuses_two_curves_of_one_label(capsys):
    """Two curves of one label would write the same files and length.json entry: refused before any model loads."""
    from zoo.eval import length

    with pytest.raises(SystemExit):
        length.main(["--model", "no/such/model", "no/such/model"])
    assert "every curve needs its own label" in capsys.readouterr().err


def test_output_stems():
    from zoo.eval.length import output_stems

    assert output_stems(["runs/x/merged"]) == ["merged"]  # one model: the name it always had
    assert output_stems(["tiny"]) == ["tiny"] and output_stems(["configs/models/mamba-tiny.yaml"]) == ["mamba-tiny"]
    assert output_stems(["runs/A/merged", "runs/B/merged", "runs/C/base"]) == ["A-merged", "B-merged", "base"]
    assert output_stems(["a/x/m", "b/x/m", "m"]) == ["a-x-m", "b-x-m", "m"]
    assert output_stems(["/r/m", "r/m"]) == ["r-m", "r-m-2"]  # nothing left to tell them apart


# ---------------------------------------------------------------- 4. an empty synthetic grid


def test_synthetic_grid_with_no_buildable_cell_fails(tmp_path, capsys):
    from zoo.eval import synthetic

    argv = ["--model", str(MAMBA_TINY), "--seq-lens", "16", "--n-kv", "8", "--vocab-size", "32",
            "--n-samples", "2", "--device", "cpu", "--out", str(tmp_path / "syn")]
    with pytest.warns(UserWarning, match="skipping seq_len=16 n_kv=8"), \
            pytest.raises(ValueError, match=r"no cell of the mqar grid can be built \(seq_len=16 n_kv=8: mqar: "
                                            r"n_kv=8 needs seq_len >= 4 \* n_kv = 32.*--seq-lens"):
        synthetic.main(argv)
    assert not (tmp_path / "syn").exists()
    with pytest.warns(UserWarning):
        code, err = run_cli(["eval", "synthetic", *argv], capsys)
    assert code == 2 and "no cell of the mqar grid" in err
    with pytest.warns(UserWarning, match="skipping seq_len=16 n_kv=8"):  # a partial grid still runs
        result = synthetic.main([*argv[:3], "16,32", *argv[4:]])
    assert [(r["seq_len"], r["n_kv"]) for r in result["rows"]] == [(32, 8)]


def test_synthetic_cell_of_a_task_without_a_count_is_named_by_its_length_only(tmp_path):
    # induction heads has no count argument: its skipped cell read "seq_len=2 None=None"
    from zoo.eval import synthetic

    argv = ["--model", str(MAMBA_TINY), "--task", "induction_heads", "--seq-lens", "2", "--vocab-size", "32",
            "--n-samples", "2", "--device", "cpu", "--out", str(tmp_path / "syn")]
    with pytest.warns(UserWarning, match=r"skipping seq_len=2: "), \
            pytest.raises(ValueError, match=r"no cell of the induction_heads grid can be built \(seq_len=2: ") as e:
        synthetic.main(argv)
    assert "None" not in str(e.value)


@pytest.mark.parametrize("options, reason", [
    (["--n-kv", "0"], "n_kv=0 must be >= 1"), (["--n-kv", "-1"], "n_kv=-1 must be >= 1"),
    (["--power-a", "0"], "power_a=0.0 must be > 0"),
    (["--task", "selective_copying", "--n-kv", "0", "--seq-lens", "64"], "n_tokens=0 must be >= 1"),
])
def test_synthetic_impossible_task_arguments_fail_in_one_line(options, reason, tmp_path, capsys):
    """--n-kv 0 / -1 and --power-a 0 ended in a RuntimeError traceback from torch.multinomial or topk, and selective
    copying with 0 tokens in a ZeroDivisionError after the whole grid ran."""
    argv = ["eval", "synthetic", "--model", str(MAMBA_TINY), "--vocab-size", "64", "--n-samples", "2",
            "--device", "cpu", "--out", str(tmp_path / "syn"), *options]
    with pytest.warns(UserWarning, match=re.escape(reason)):
        code, err = run_cli(argv, capsys)
    assert code == 2 and "no cell of the" in err and reason in err
    assert not (tmp_path / "syn").exists()


@pytest.mark.parametrize("option", [["--power-a", "0.5"], ["--random-non-queries"]], ids=["power-a", "random"])
def test_synthetic_refuses_mqar_arguments_for_another_task(option, tmp_path, capsys):
    """--power-a / --random-non-queries with --task induction_heads were dropped silently (the rows were the
    task's defaults, the table looked like the asked-for variant); zoo eval state already refused them."""
    argv = ["eval", "synthetic", "--model", str(MAMBA_TINY), "--task", "induction_heads", "--seq-lens", "16",
            "--vocab-size", "16", "--n-samples", "2", "--device", "cpu", "--out", str(tmp_path / "syn"), *option]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "--power-a and --random-non-queries are mqar arguments, not induction_heads's" in err
    assert not (tmp_path / "syn").exists()


def test_synthetic_refuses_n_kv_for_a_task_without_a_count(tmp_path, capsys, monkeypatch):
    """--n-kv with --task induction_heads said 'leave n_kv unset' (evaluate_synthetic's argument, not the option), and
    only after the model had loaded."""
    import zoo.eval.synthetic as synthetic

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(synthetic, "load_model", no_model)
    argv = ["eval", "synthetic", "--model", str(MAMBA_TINY), "--task", "induction_heads", "--n-kv", "4",
            "--out", str(tmp_path / "syn")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "--n-kv: task 'induction_heads' has no count of items to recall; leave it out" in err
    assert not (tmp_path / "syn").exists()


# ---------------------------------------------------------------- 5. a missing model, a missing tokenizer


@pytest.mark.parametrize("command", ["passkey", "length", "state", "synthetic"])
def test_missing_model_folder_is_reported_as_such(command, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"zoo.eval.{command}").main
    for missing in (str(tmp_path / "nope"), "/nope", str(tmp_path / "nope.yaml")):
        pattern = rf"--model:? '?{re.escape(missing)}'?: no such (model folder|zoo model YAML)"
        with pytest.raises(ValueError, match=pattern):
            main(["--model", missing, "--device", "cpu", "--out", str(tmp_path / "out")])
    code, err = run_cli(["eval", command, "--model", "/nope"], capsys)
    assert code == 2 and err.startswith(f"zoo eval {command}: --model: '/nope': no such model folder")
    assert "tokenizer" not in err


def test_a_model_without_a_tokenizer_is_a_value_error(tmp_path, capsys):
    from zoo.eval import passkey
    from zoo.eval.common import load_tokenizer

    folder = save_tiny_checkpoint(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"bare has no tokenizer \(.*\); pass --tokenizer PATH\|byte"):
        load_tokenizer(None, str(folder))
    assert load_tokenizer("byte", str(folder)).encode("a")  # --tokenizer still overrides
    code, err = run_cli(["eval", "passkey", "--model", str(folder), "--device", "cpu"], capsys)
    message = err.splitlines()[-2]  # one line (transformers' reason spans several), then the ZOO_TRACEBACK hint
    assert code == 2 and message.startswith("zoo eval passkey: ") and "has no tokenizer (" in message
    assert message.endswith("; pass --tokenizer PATH|byte")
    with pytest.raises(ValueError, match="has no tokenizer"):
        passkey.main(["--model", str(folder), "--device", "cpu", "--out", str(tmp_path / "pk")])


# ---------------------------------------------------------------- 6. counts and sizes below 1


@pytest.mark.parametrize("command, option", [
    ("synthetic", "--n-samples"), ("synthetic", "--batch-size"), ("passkey", "--n-samples"),
    ("passkey", "--max-new-tokens"), ("length", "--batch-size"), ("length", "--bins-per-octave"),
    ("state", "--chunk-size"), ("state", "--n-docs"),
])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_count_below_one_is_refused_by_option(command, option, value, tmp_path, capsys):
    """0 rows divided by zero (synthetic, passkey), -1 passkey samples wrote an empty table and a 0 batch or chunk
    failed as 'range() arg 3 must not be zero': each is now argparse's error naming the option, before loading."""
    code, err = run_cli(["eval", command, "--model", str(MAMBA_TINY), option, value, "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"argument {option}: must be >= 1, got {value}" in err
    assert not (tmp_path / "out").exists()


def test_state_refuses_a_negative_count_of_log_spaced_samples(tmp_path, capsys, monkeypatch):
    """zoo eval state --points-per-octave -1 was taken as 0 (no log-spaced samples below --chunk-size) without a
    word; 0 is that setting, a negative count is argparse's error naming the option, before loading."""
    from zoo.eval import state

    monkeypatch.setattr(state, "plot_state_statistics", lambda *args: [])
    torch.save(torch.randint(0, 64, (1, 32)), tmp_path / "rows.pt")
    argv = ["eval", "state", "--model", str(MAMBA_TINY), "--tokens", str(tmp_path / "rows.pt"), "--max-len", "32",
            "--chunk-size", "16", "--device", "cpu", "--out", str(tmp_path / "out"), "--points-per-octave"]
    code, err = run_cli([*argv, "-1"], capsys)
    assert code == 2 and "argument --points-per-octave: must be >= 0, got -1" in err
    assert not (tmp_path / "out").exists()
    assert state.main([*argv[2:], "0"])["positions"] == [16, 32]  # 0: a sample every --chunk-size tokens only


@pytest.mark.parametrize("command", ["state", "length"])
@pytest.mark.parametrize("value", ["0", "-64"])
def test_a_training_length_below_one_is_refused(command, value, tmp_path, capsys):
    """zoo eval state (and length) --train-length 0 marked nothing on the plots and -64 titled them 'training length
    -64' with no line (a log axis has no place for it), without a word: now argparse's error naming the option, before
    loading."""
    torch.save(torch.randint(0, 64, (1, 32)), tmp_path / "rows.pt")
    code, err = run_cli(["eval", command, "--model", str(MAMBA_TINY), "--tokens", str(tmp_path / "rows.pt"),
                         "--max-len", "32", "--chunk-size", "16", "--train-length", value, "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"argument --train-length: must be >= 1, got {value}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, option, value", [
    ("synthetic", "--seq-lens", "64,abc"), ("synthetic", "--n-kv", "4,x"), ("passkey", "--lengths", "1K,2KB"),
    ("passkey", "--depths", "0,half"), ("synthetic", "--seq-lens", "64,2^-1"),  # (2^-1 was 0.5 tokens)
])
def test_a_comma_list_with_a_non_number_is_refused_by_option(command, option, value, tmp_path, capsys):
    """--seq-lens abc ended in "invalid literal for int() with base 10: 'abc'", naming neither the option nor the
    forms it takes, after the model had loaded: now argparse's error naming the option, before loading."""
    code, err = run_cli(["eval", command, "--model", str(MAMBA_TINY), option, value, "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"argument {option}: expected a comma list of" in err and repr(value) in err
    assert not (tmp_path / "out").exists()


def test_evaluators_refuse_no_rows():
    from zoo.eval import evaluate_passkey, evaluate_synthetic
    from zoo.eval.common import load_model

    model = load_model(str(MAMBA_TINY), "cpu")
    with pytest.raises(ValueError, match="n_samples=0 and batch_size=8 must be >= 1"):
        evaluate_synthetic(model, "mqar", [64], n_samples=0, batch_size=8, vocab_size=64)
    with pytest.raises(ValueError, match="n_samples=0 must be >= 1"):
        evaluate_passkey(model, None, [256], n_samples=0)


def test_state_refuses_a_group_size_on_a_model_without_mamba_layers(tmp_path, capsys):
    """--group-size groups a mamba layer's channels into heads; mamba2 and gla layers have heads of their own, so on
    mamba2-tiny --group-size 16 was taken and ignored: statistics identical to --group-size 64's, under a state.json
    that recorded group_size 16. It is refused there, before any rows are read; a mamba model still takes it, and a
    model without mamba layers runs when it is left out."""
    from zoo.eval import state

    torch.save(torch.randint(0, 512, (2, 32)), tmp_path / "rows.pt")
    common = ["--tokens", str(tmp_path / "rows.pt"), "--max-len", "32", "--chunk-size", "16", "--device", "cpu"]
    for name, kind in (("mamba2-tiny", "mamba2"), ("gla-tiny", "gla")):
        model = str(ROOT / "configs" / "models" / f"{name}.yaml")
        code, err = run_cli(["eval", "state", "--model", model, *common, "--group-size", "16", "--out",
                             str(tmp_path / name)], capsys)
        assert code == 2 and err.startswith("zoo eval state: --group-size 16: groups the channels of mamba layers")
        assert f"its {kind} layers' heads are their own" in err and not (tmp_path / name).exists()
    mamba2 = str(ROOT / "configs" / "models" / "mamba2-tiny.yaml")
    # --mitigation's group_size with it, as the refusal of the two differing asks: it named --group-size alone, whose
    # leaving out was refused again ('differs from --group-size 64; give one of them'); a spec's group_size of the
    # default was taken and ignored
    for given in (["--group-size", "16", "--mitigation", "norm:threshold=5,group_size=16"],
                  ["--mitigation", "norm:threshold=5,group_size=64"]):
        code, err = run_cli(["eval", "state", "--model", mamba2, *common, *given, "--out", str(tmp_path / "g")],
                            capsys)
        assert code == 2 and "group_size" in err.split(": group")[0] and not (tmp_path / "g").exists(), err
        assert "layers' heads are their own); leave " in err
    assert state.main(["--model", mamba2, *common, "--out", str(tmp_path / "plain")])["group_size"] == 64
    result = state.main(["--model", str(MAMBA_TINY), *common, "--group-size", "16", "--out", str(tmp_path / "m")])
    assert result["group_size"] == 16 and result["layers"][0]["channels_per_head"] == 16


def test_state_refuses_a_model_without_recurrent_layers(tmp_path, capsys):
    """zoo eval state on an attention-only model used to write a state.json with no layers and a loss plot alone
    (and --norm-calibrate did nothing): now one line naming --model, before any rows are read."""
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig
    from zoo.state import calibrate_norm_threshold, record_state_statistics

    attention = ROOT / "configs" / "models" / "transformerpp-tiny.yaml"
    argv = ["eval", "state", "--model", str(attention), "--tokenizer", "byte", "--max-len", "32", "--n-docs", "1",
            "--device", "cpu", "--out", str(tmp_path / "state")]
    code, err = run_cli(argv, capsys)
    first = err.splitlines()[0]
    assert code == 2 and first.startswith(f"zoo eval state: --model {attention}: ") and "no recurrent layer" in first
    assert not (tmp_path / "state").exists()
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(attention)).eval()
    ids = torch.randint(0, 512, (1, 16))
    for call in (lambda: record_state_statistics(model, ids, chunk_size=8),
                 lambda: calibrate_norm_threshold(model, ids)):
        with pytest.raises(ValueError, match="no recurrent layer"):
            call()


@pytest.mark.parametrize("options, message", [
    (["--compare", "--mitigation", "forget:c_alpa=0.9"], "--mitigation: mitigation 'forget:c_alpa=0.9': expected"),
    (["--compare"], "--compare: nothing to compare"),
    (["--compare", "--mitigation", "forget:c_alpha=1"], "--compare: --mitigation 'forget:c_alpha=1' changes nothing"),
    (["--norm-calibrate", "0"], "--norm-calibrate: the reference prefix must be >= 1 token, got 0"),
    (["--norm-calibrate", "16", "--norm-factor", "0"], "--norm-factor: must be a number > 0"),
    (["--norm-calibrate", "16", "--mitigation", "window:r=8"], "--norm-calibrate: sets the state-norm cap itself"),
    (["--norm-calibrate", "16", "--mitigation", "norm:threshold=5"], "--norm-calibrate: sets the state-norm cap"),
    (["--norm-calibrate", "4K"], "--norm-calibrate 4096: longer than the rows (32 tokens)"),
    # the rows of --task mqar were evaluated with the --tokens file ignored, and --n-kv 4 without --task was dropped
    (["--task", "mqar", "--vocab-size", "32"], "--tokens and --task mqar: give one source of rows"),
    (["--n-kv", "4", "--random-non-queries"], "--n-kv, --random-non-queries: options of a synthetic task, but the "
                                              "rows are the --tokens documents"),
    # a --tokens file's rows are taken as they are: --seed and --tokenizer were ignored without a word
    (["--seed", "3"], "--seed: not used, the rows are the --tokens documents, taken as they are; leave it out"),
    (["--tokenizer", "byte", "--seed", "0"], "--tokenizer, --seed: not used, the rows are the --tokens documents"),
    # --norm-factor 2 without --norm-calibrate was dropped: the run was unmitigated
    (["--norm-factor", "2", "--norm-chunk", "8"], "--norm-factor, --norm-chunk: settings of --norm-calibrate, which "
                                                  "is not given"),
    # the calibrated cap took --norm-chunk's 64 in place of the spec's chunk=8, without a word
    (["--norm-calibrate", "16", "--mitigation", "forget:c_alpha=0.9+norm:chunk=8"], "--mitigation: mitigation "
                                                                                    "'norm:chunk=8': give the cap"),
], ids=["bad-spec-with-compare", "compare-alone", "compare-neutral", "calibrate-0", "factor-0", "calibrate-window",
        "calibrate-norm", "calibrate-past-rows", "tokens-and-task", "task-options-without-task", "seed-with-tokens",
        "tokenizer-with-tokens", "norm-settings-alone", "calibrate-chunk-in-spec"])
def test_state_mitigation_options_are_checked_before_the_runs(tmp_path, monkeypatch, options, message):
    """A bad --mitigation spec used to fail only after the --compare run had gone through every row;
    --norm-calibrate 0 was taken as off, --compare alone wrote two runs named 'none' (state.json kept one),
    --norm-calibrate with norm:threshold=5 dropped the 5 silently, and one longer than the rows calibrated on the
    whole evaluation."""
    from zoo.eval import state

    runs = []
    real = state.record_state_statistics
    monkeypatch.setattr(state, "record_state_statistics", lambda *a, **k: runs.append(1) or real(*a, **k))
    torch.save(torch.randint(0, 256, (2, 32)), tmp_path / "rows.pt")
    argv = ["--model", str(MAMBA_TINY), "--tokens", str(tmp_path / "rows.pt"), "--max-len", "32", "--chunk-size", "16",
            "--device", "cpu", "--out", str(tmp_path / "state"), *options]
    with pytest.raises(ValueError) as e:
        state.main(argv)
    assert message in str(e.value) and not runs and not (tmp_path / "state").exists()


def test_corpus_options_beside_rows_they_do_not_shape_are_refused(tmp_path, capsys):
    """zoo eval length took --seed, --start and --tokenizer beside --tokens and ignored them (a file's documents are
    taken whole: --start random began none of them at a random offset), and zoo eval state a --tokenizer beside
    --task; they are refused before a model loads."""
    from zoo.eval import length, state

    torch.save(torch.randint(0, 64, (1, 24)), tmp_path / "docs.pt")
    common = ["--model", str(MAMBA_TINY), "--tokens", str(tmp_path / "docs.pt"), "--device", "cpu", "--out",
              str(tmp_path / "len")]
    for options, names in ((["--start", "random"], "--start"), (["--seed", "1"], "--seed"),
                           (["--tokenizer", "byte", "--start", "document"], "--tokenizer, --start")):
        code, err = run_cli(["eval", "length", *common, *options], capsys)
        assert code == 2 and f"{names}: options of the built-in corpus, but the documents are the --tokens" in err
    with pytest.raises(ValueError, match="--tokenizer: not used, the rows are --task mqar's token ids; leave it out"):
        state.main(["--model", str(MAMBA_TINY), "--task", "mqar", "--vocab-size", "32", "--tokenizer", "byte",
                    "--max-len", "32", "--device", "cpu", "--out", str(tmp_path / "state")])
    assert not (tmp_path / "len").exists() and not (tmp_path / "state").exists()
    length.main([*common, "--max-len", "24"])  # the file alone is fine
    assert (tmp_path / "len" / "length.json").is_file()


@pytest.mark.parametrize("task, options, fix", [
    (["induction_heads", "--vocab-size", "1"], [], "change --vocab-size or --max-len"),
    (["mqar", "--vocab-size", "32", "--n-kv", "0"], [], "change --n-kv, --vocab-size or --max-len"),
    (["mqar", "--vocab-size", "32", "--n-kv", "4"], ["--power-a", "-1"], "change --n-kv, --vocab-size, --max-len or "
                                                                         "--power-a")])
def test_state_task_rows_that_cannot_be_built_name_the_options_of_that_task(task, options, fix, tmp_path, capsys):
    # induction_heads rows that could not be built said "change --n-kv, --vocab-size or --max-len", though --n-kv is
    # refused for that task ("has no count of items to recall"); a bad --power-a was not named as a fix
    code, err = run_cli(["eval", "state", "--model", str(MAMBA_TINY), "--task", *task, *options, "--n-docs", "1",
                         "--max-len", "64", "--device", "cpu", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith(f"zoo eval state: --task {task[0]}: ")
    assert err.splitlines()[0].endswith(f"; {fix}")


def test_state_notes_a_cut_only_where_a_document_was_cut(tmp_path, capsys):
    # rows of a --tokens file shorter than the default --max-len (16384) were noted as "documents cut to the
    # shortest, 64 tokens", though every document was whole
    from zoo.eval import state

    torch.save(torch.randint(0, 256, (2, 64)), tmp_path / "even.pt")
    torch.save([torch.randint(0, 256, (80,)), torch.randint(0, 256, (64,))], tmp_path / "uneven.pt")
    common = ["--model", str(MAMBA_TINY), "--chunk-size", "64", "--points-per-octave", "0", "--device", "cpu",
              "--out", str(tmp_path / "out")]
    notes = {}
    for name, more in [("even", []), ("uneven", []), ("even-cut", ["--max-len", "32"])]:
        state.main([*common, "--tokens", str(tmp_path / f"{name.removesuffix('-cut')}.pt"), *more])
        notes[name] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == {"even": ["note: the rows are 64 tokens, fewer than --max-len 16384: the documents are no longer"],
                     "uneven": ["note: documents cut to the shortest, 64 tokens"], "even-cut": []}


def test_state_task_vocabulary_of_zero_is_refused(tmp_path, monkeypatch):
    """zoo eval state --task induction_heads --vocab-size 0 took the 0 as not given and ran the task's default
    vocabulary (16), without a word; the task refuses it, as zoo eval synthetic's does."""
    from zoo.eval import state

    runs = []
    monkeypatch.setattr(state, "record_state_statistics", lambda *a, **k: runs.append(1))
    with pytest.raises(ValueError, match="--task induction_heads: induction heads: vocab_size=0 must be >= 3"):
        state.main(["--model", str(MAMBA_TINY), "--task", "induction_heads", "--vocab-size", "0", "--max-len", "32",
                    "--device", "cpu", "--out", str(tmp_path / "state")])
    assert not runs and not (tmp_path / "state").exists()


def test_state_compare_with_forget_and_calibrated_norm(tmp_path):
    from zoo.eval import state

    torch.save(torch.randint(0, 256, (2, 32)), tmp_path / "rows.pt")
    state.main(["--model", str(MAMBA_TINY), "--tokens", str(tmp_path / "rows.pt"), "--max-len", "32", "--chunk-size",
                "16", "--device", "cpu", "--out", str(tmp_path / "state"), "--compare", "--norm-calibrate", "16",
                "--mitigation", "forget:c_alpha=0.99"])
    saved = json.loads((tmp_path / "state" / "state.json").read_text())["runs"]
    assert list(saved)[0] == "none" and list(saved)[1].startswith("forget:c_alpha=0.99+norm:threshold=1x prefix 16")


def test_synthetic_vocabulary_larger_than_the_model_names_the_option(tmp_path, capsys):
    """zoo eval synthetic on a small-vocabulary model with the task's default vocabulary (MQAR: 8192) said only
    'model vocab_size=64 is smaller than the task's vocab_size=8192', not which option fixes it."""
    model = save_tiny_checkpoint(tmp_path / "llama")
    code, err = run_cli(["eval", "synthetic", "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and re.search(r"vocab_size=8192 .*--vocab-size\) of at most 64", err), err


def test_state_tools_on_a_transformers_mamba_say_to_convert_it(tmp_path, capsys):
    """zoo eval state (and --mitigation of every eval command) on a transformers Mamba checkpoint said
    'MambaForCausalLM has no recurrent layer' / 'the model has no recurrent mixer': wrong for a Mamba, and no way
    forward. They now say its layers are not zoo mixers and name the conversion that brings it into the zoo."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "hf-mamba"
    config = MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    MambaForCausalLM(config).save_pretrained(path)
    torch.save(torch.randint(0, 64, (1, 40)), tmp_path / "docs.pt")
    code, err = run_cli(["eval", "state", "--model", str(path), "--tokens", str(tmp_path / "docs.pt"), "--max-len",
                         "32", "--device", "cpu", "--out", str(tmp_path / "state")], capsys)
    assert code == 2 and "zoo convert SRC DST --from hf-mamba" in err and "no recurrent layer" not in err, err
    code, err = run_cli(["eval", "length", "--model", str(path), "--tokens", str(tmp_path / "docs.pt"), "--mitigation",
                         "forget:c_alpha=0.99", "--device", "cpu", "--out", str(tmp_path / "len")], capsys)
    assert code == 2 and "--mitigation" in err and "zoo convert SRC DST --from hf-mamba" in err, err


@pytest.mark.parametrize("command, option", [("state", "--max-len"), ("state", "--train-length"),
                                             ("length", "--chunk-size"), ("passkey", "--n-samples")])
def test_an_empty_number_is_refused_by_option(command, option, tmp_path, capsys):
    """An empty value (``--max-len "$LEN"`` with LEN unset) ended in a traceback, IndexError: string index out of
    range, from parse_int: now argparse's error naming the option, before loading."""
    code, err = run_cli(["eval", command, "--model", str(MAMBA_TINY), option, "", "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"argument {option}: invalid" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, option", [("state", "--norm-calibrate"), ("state", "--points-per-octave"),
                                             ("length", "--chunk-size"), ("synthetic", "--n-samples")])
@pytest.mark.parametrize("value", ["abc", "2.5"])
def test_a_number_option_given_a_non_integer_says_so_without_naming_a_function(command, option, value, tmp_path,
                                                                               capsys):
    # argparse words a type function's ValueError after the function: "argument --norm-calibrate: invalid parse_int
    # value: 'abc'" (invalid positive_int / non_negative_int value for the others), which named no form the option
    # takes
    code, err = run_cli(["eval", command, "--model", str(MAMBA_TINY), option, value, "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"argument {option}: invalid integer '{value}'; give a whole number such as " in err
    assert "_int value" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["length", "state"])
def test_a_corpus_document_of_one_token_is_refused_by_option(command, tmp_path, capsys):
    """--max-len 1 on the built-in corpus gave no document: zoo eval length said 'evaluate_length needs at least one
    document' and zoo eval state 'min() arg is an empty sequence', neither naming the option."""
    code, err = run_cli(["eval", command, "--model", str(MAMBA_TINY), "--max-len", "1", "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--max-len 1: a document of fewer than 2 tokens has no next token to score" in err, err
    assert not (tmp_path / "out").exists()


def test_state_compare_interrupted_in_its_mitigated_run_keeps_the_unmitigated_one(tmp_path, monkeypatch):
    """zoo eval state --compare wrote state.json once both runs were done: interrupted in the mitigated run, the
    unmitigated run it had finished (as long again) was lost."""
    from zoo.eval import state

    real, calls = state.record_state_statistics, []

    def record(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(state, "record_state_statistics", record)
    torch.save(torch.randint(0, 256, (2, 32)), tmp_path / "rows.pt")
    with pytest.raises(KeyboardInterrupt):
        state.main(["--model", str(MAMBA_TINY), "--tokens", str(tmp_path / "rows.pt"), "--max-len", "32",
                    "--chunk-size", "16", "--device", "cpu", "--out", str(tmp_path / "state"), "--compare",
                    "--mitigation", "forget:c_alpha=0.9"])
    saved = json.loads((tmp_path / "state" / "state.json").read_text())["runs"]
    assert list(saved) == ["none"] and saved["none"]["positions"][-1] == 32
