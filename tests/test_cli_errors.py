"""Bad input ends in one clear line: config typos, wrong checkpoint formats, missing folders, bad CLI options."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import adapter_without_tokenizer, offline_hub_repo, save_letter_tokenizer, save_trained_adapter
from transformers import AutoModelForCausalLM

import zoo
from zoo import cli
from zoo.compare import load_compare_config, resolve_models
from zoo.convert import convert
from zoo.data.synthetic import mqar_batch
from zoo.hub import save_model_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "mamba-tiny.yaml"


def _yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, names", [
    ("d_modle: 128\n", ("d_modle", "did you mean 'd_model'")),
    ("d_model: 64\nffn: {type: swiglu, hiden: 128}\n", ("ffn.hiden", "did you mean 'hidden'")),
    ("d_model: 64\nlayers: MA\nmixers: {M: {type: mamba}, A: {type: attention, n_heads: 2}}\n"
     "moe: {n_expert: 4}\n", ("moe.n_expert", "did you mean 'n_experts'")),
    ("tie_embeddings: 'no'\n", ("tie_embeddings", "true or false")),
])
def test_a_yaml_config_with_an_unknown_or_mistyped_field_is_refused_by_name(tmp_path, text, names):
    with pytest.raises(ValueError) as e:
        zoo.ZooConfig.from_yaml(_yaml(tmp_path, text))
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("text, what", [("", "an empty file"), ("# only a comment\n", "an empty file"),
                                        ("- d_model\n", "list")])
def test_a_model_yaml_without_a_mapping_of_fields_is_refused(tmp_path, text, what):
    # an empty model YAML (a file saved before it was written) built the default 768-wide model, and a comparison
    # naming it compared that model, without a word
    with pytest.raises(ValueError, match=rf"model.yaml: expected a YAML mapping of config fields, got {what}"):
        zoo.ZooConfig.from_yaml(_yaml(tmp_path, text))
    path = tmp_path / "compare.yaml"
    path.write_text(f"models:\n  m: {_yaml(tmp_path, text)}\n")
    cfg, folder = load_compare_config(path)
    with pytest.raises(ValueError, match=r"models\.m: '.*model.yaml' does not hold a mapping of config fields"):
        resolve_models(cfg, folder)


def test_every_shipped_model_config_loads_and_hf_fields_are_accepted(tmp_path):
    for path in sorted((ROOT / "configs" / "models").glob("*.yaml")):
        zoo.ZooConfig.from_yaml(path)
    config = zoo.ZooConfig.from_yaml(_yaml(tmp_path, "model_type: zoo\nd_model: 64\nhidden_size: 64\n"))
    assert config.d_model == 64


def test_a_comparison_override_with_a_typo_names_the_model_and_the_field(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(f"models:\n  m:\n    config: {TINY}\n    overrides: {{layrs: MMMM}}\n")
    cfg, folder = load_compare_config(path)
    with pytest.raises(ValueError, match=r"models\.m: layrs: unknown field; did you mean 'layers'"):
        resolve_models(cfg, folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "mamba-tiny"
    save_model_folder(AutoModelForCausalLM.from_config(zoo.ZooConfig.from_yaml(TINY)), folder, "byte")
    return folder


def test_convert_refuses_a_from_format_the_folder_is_not_and_writes_nothing(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="holds a zoo checkpoint.*not hf-mamba"):
        convert(tiny_folder, tmp_path / "out", from_format="hf-mamba")
    assert not (tmp_path / "out").exists()


def test_convert_from_mismatch_suggests_only_a_format_that_from_takes(tiny_folder, tmp_path):
    # a zoo folder read with --from hf-mamba: `--from zoo` is no choice of the flag (argparse refuses it)
    with pytest.raises(ValueError) as e:
        convert(tiny_folder, tmp_path / "out", from_format="hf-mamba")
    assert "--from zoo" not in str(e.value) and "leave --from out" in str(e.value)
    convert(tiny_folder, tmp_path / "hf", to_format="hf-mamba")
    with pytest.raises(ValueError, match="not hf-mamba2; pass --from hf-mamba or leave --from out"):
        convert(tmp_path / "hf", tmp_path / "out", from_format="hf-mamba2")


def test_convert_refuses_to_overwrite_its_source(tiny_folder):
    before = (tiny_folder / "config.json").read_text()
    with pytest.raises(ValueError, match="is the source folder"):
        convert(tiny_folder, tiny_folder / ".." / tiny_folder.name, to_format="hf-mamba")
    assert (tiny_folder / "config.json").read_text() == before


def test_convert_to_mamba_ssm_refuses_a_max_shard_size_it_cannot_honour(tiny_folder, tmp_path, capsys):
    # mamba_ssm's from_pretrained reads one pytorch_model.bin: --max-shard-size was ignored without a word, and the
    # folder held one file of any size
    from zoo.convert import main

    with pytest.raises(SystemExit) as e:
        main([str(tiny_folder), str(tmp_path / "out"), "--to", "mamba_ssm", "--max-shard-size", "20KB"])
    assert e.value.code == 2
    assert "--max-shard-size: --to mamba_ssm writes one pytorch_model.bin" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--to mamba_ssm writes one pytorch_model.bin"):
        convert(tiny_folder, tmp_path / "out", to_format="mamba_ssm", max_shard_size="5GB")
    assert not (tmp_path / "out").exists()
    main([str(tiny_folder), str(tmp_path / "out"), "--to", "mamba_ssm"])  # without the flag, as before
    assert (tmp_path / "out" / "pytorch_model.bin").is_file()
    main([str(tiny_folder), str(tmp_path / "hf"), "--to", "hf-mamba", "--max-shard-size", "20KB"])  # sharded
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("size, message", [
    ("lots", "'lots' is not a size: give a number of bytes or one with a unit"),
    ("5GiB", "'5GiB' is not a size"),  # (huggingface_hub, which save_pretrained shards with, reads KB to TB only)
    ("0", "'0': a shard holds at least one byte"),  # (it wrote one file per tensor)
    ("-5GB", "'-5GB': a shard holds at least one byte"),
])
def test_a_bad_max_shard_size_is_refused_before_any_work(tiny_folder, tmp_path, capsys, size, message):
    # `zoo convert` and `zoo graft` took any --max-shard-size: one save_pretrained cannot read failed only once the
    # model was loaded and converted (minutes, for a large one), and one under a byte wrote a file per tensor
    from zoo.convert import main as convert_main
    from zoo.surgery import main as graft_main

    for main, args in ((convert_main, [str(tiny_folder), str(tmp_path / "out"), "--to", "hf-mamba"]),
                       (graft_main, [str(tmp_path / "out"), "--base", str(tiny_folder), "--pattern", "AAAA"])):
        with pytest.raises(SystemExit) as e:
            main([*args, f"--max-shard-size={size}"])
        assert e.value.code == 2
        assert f"argument --max-shard-size: {message}" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_cli_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["info", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo info: ") and "nope.yaml" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "missing': no such model folder" in capsys.readouterr().err
    monkeypatch.setenv("ZOO_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["info", str(tmp_path / "nope.yaml")])


def test_zoo_traceback_takes_the_usual_spellings(tmp_path, capsys, monkeypatch):
    """ZOO_TRACEBACK=0 (or false, off) showed the traceback, as any value did; a value that is no boolean is refused
    in one line before the command runs."""
    for value in ("0", "false", "OFF", ""):
        monkeypatch.setenv("ZOO_TRACEBACK", value)
        with pytest.raises(SystemExit) as e:
            cli.main(["info", str(tmp_path / "nope.yaml")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("zoo info: ") and "Traceback" not in err
    for value in ("true", "yes"):
        monkeypatch.setenv("ZOO_TRACEBACK", value)
        with pytest.raises(FileNotFoundError):
            cli.main(["info", str(tmp_path / "nope.yaml")])
    monkeypatch.setenv("ZOO_TRACEBACK", "please")
    with mock.patch.object(cli, "info") as info:
        with pytest.raises(SystemExit) as e:
            cli.main(["info", str(TINY)])
    assert e.value.code == 2 and not info.called
    assert capsys.readouterr().err == ("zoo info: $ZOO_TRACEBACK='please': expected 1/true/yes/on or 0/false/no/off "
                                       "(unset: 0)\n")


class PathMixer(torch.nn.Module):
    def __init__(self, d_model, layer_idx, **options):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x)


def test_info_refuses_a_saved_dotted_mixer_path_before_printing_the_table(tmp_path, capsys, monkeypatch):
    # a saved folder's dotted mixer path is refused (untrusted) at the model's construction, after the configs load:
    # the table's header went out first, and the error after it
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    monkeypatch.delenv("ZOO_TRUST_MIXER_PATHS", raising=False)
    zoo.ZooConfig(vocab_size=32, d_model=16, layers="MX", ffn="none",
                  mixers={"M": {"type": "mamba"}, "X": {"type": f"{__name__}.PathMixer"}}).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["info", str(TINY), str(tmp_path)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "ZOO_TRUST_MIXER_PATHS" in err and out == ""


@pytest.mark.parametrize("args, message", [
    (["hi", "--num-beams", "0"], "--num-beams must be at least 1"),
    (["hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ([""], "the prompt is empty"),
    (["hi", "--temperature", "0.7", "--seed", "1"], "--temperature, --seed: sampling options; add --sample"),
    (["hi", "--sample", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["hi", "--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["hi", "--sample", "--seed", str(2**64)], "--seed must be an integer in [-2**63, 2**64)"),
    (["hi", "--sample", "--top-k", "-1"], "--top-k must be at least 0 (0: no top-k filtering)"),
    (["hi", "--cuda-graph", "--device", "cpu"], "--cuda-graph: CUDA graphs need a CUDA device"),
    (["hi", "--cuda-graph", "--device", "cuda", "--num-beams", "2"], "beam search (--num-beams) runs without it"),
    (["hi", "--stop", ""], "--stop: an empty string would stop at once"),
])
def test_generate_checks_its_options_before_loading(tiny_folder, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_generate_says_when_a_folder_has_no_tokenizer_and_takes_one(tiny_folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(tiny_folder).save_pretrained(bare)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(bare), "hi"])
    assert e.value.code == 2 and "holds no tokenizer files" in capsys.readouterr().err
    cli.main(["generate", str(bare), "hi", "--tokenizer", "byte", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("hi")


def test_a_tokenizer_folder_without_tokenizer_files_is_named_not_the_model_or_dropped(tiny_folder, tmp_path, capsys):
    # zoo generate blamed the model folder ("holds no tokenizer files; pass --tokenizer") for a --tokenizer folder
    # without tokenizer files, and zoo convert saved the model without a tokenizer, without a word
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "hi", "--tokenizer", str(empty)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"tokenizer: '{empty}' is a folder without tokenizer files" in err and str(tiny_folder) not in err
    with pytest.raises(ValueError, match=f"tokenizer: '{empty}' is a folder without tokenizer files"):
        convert(tiny_folder, tmp_path / "out", tokenizer=str(empty))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_generate_runs_a_dora_adapter_as_peft_loads_it(tmp_path, capsys, monkeypatch, where):
    # zoo generate loaded a hub adapter with transformers' from_pretrained, which leaves out DoRA's magnitudes (the
    # model generated from was not the finetuned one, behind a load report), and refused an adapter folder
    from zoo.modeling import ZooForCausalLM

    ref = "someone/tiny-jamba-dora" if where == "hub" else str(tmp_path / "adapter")
    folder = offline_hub_repo(monkeypatch, tmp_path / "hub", ref) if where == "hub" else Path(ref)
    adapted = save_trained_adapter(tmp_path / "base", folder, use_dora=True)
    ids = torch.tensor([[257, ord("h"), ord("i")]])
    seen = {}
    original = ZooForCausalLM.generate

    def generate(self, *args, **kwargs):
        with torch.no_grad():
            seen["logits"] = self(ids).logits
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    # on the CPU, where `adapted` is (a GPU machine would load the model onto the card)
    cli.main(["generate", ref, "hi", "--tokenizer", "byte", "--max-new-tokens", "2", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("hi")
    with torch.no_grad():
        torch.testing.assert_close(seen["logits"], adapted(input_ids=ids).logits)


def test_generate_refuses_a_tokenizer_larger_than_the_models_vocabulary(tiny_folder, tmp_path, capsys):
    # a prompt token past the model's embeddings (another model's tokenizer) ended in a traceback,
    # 'IndexError: index out of range in self'
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(600)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path / "tok")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "w599", "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "2"])
    assert e.value.code == 2
    assert "has 603 tokens, more than the model's 512 embeddings" in capsys.readouterr().err


def test_generate_refuses_a_tokenizer_whose_pad_id_lies_past_the_models_embeddings(tiny_folder, tmp_path, capsys):
    # a tokenizer of 30 tokens whose <pad> has id 600 passed the check of its size against the model's 512
    # embeddings: two prompts, left-padded with that id, failed in the embedding, 'IndexError: index out of range in
    # self'
    save_letter_tokenizer(tmp_path / "tok", bos_token=("<s>", 28), pad_token=("<pad>", 600))
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "hi", "--prompt", "hello there", "--tokenizer", str(tmp_path / "tok"),
                  "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 2
    assert "its pad_token_id 600 is outside the model's vocabulary (vocab_size 512: ids 0..511), though the " \
           "tokenizer has 30 tokens (its ids have gaps)" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["pad_token", "eos_token"])
def test_generate_runs_one_prompt_with_a_tokenizer_whose_pad_or_eos_id_lies_past_the_models_embeddings(
        tiny_folder, tmp_path, capsys, role):
    # one prompt is not padded (and stops when it ends: no pad follows), and an eos past the embeddings is never
    # generated, so neither id reaches the embedding; both were refused all the same, and such a tokenizer could not
    # generate at all. They are warned about now
    specials = {"bos_token": ("<s>", 28), "pad_token": ("<pad>", 29), "eos_token": ("</s>", 30), role: ("<x>", 600)}
    save_letter_tokenizer(tmp_path / "tok", **specials)
    for beams in ("1", "2"):
        with pytest.warns(UserWarning, match=f"its {role}_id 600 is outside the model's vocabulary .*; this run does "
                                             f"not feed it to the model"):
            cli.main(["generate", str(tiny_folder), "hi", "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "3",
                      "--num-beams", beams, "--device", "cpu"])
        assert capsys.readouterr().out.startswith("h i")


@pytest.mark.parametrize("specials, prompts, name", [
    ({"bos_token": ("<s>", 600)}, ["hi"], "bos_token_id"),  # put in front of the prompt
    ({"bos_token": ("<s>", 28), "eos_token": ("</s>", 600)}, ["hi", "hello"], "eos_token_id"),  # the pad, none given
    ({"bos_token": ("<s>", 28), "eos_token": ("</s>", 600)}, ["hi</s>"], "eos_token_id"),
])
def test_generate_still_refuses_a_special_id_past_the_embeddings_that_it_would_feed_to_them(
        tiny_folder, tmp_path, capsys, specials, prompts, name):
    save_letter_tokenizer(tmp_path / "tok", **specials)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), *[f"--prompt={text}" for text in prompts], "--tokenizer",
                  str(tmp_path / "tok"), "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 2
    assert f"its {name} 600 is outside the model's vocabulary" in capsys.readouterr().err


def test_generate_refuses_a_prompt_token_past_the_models_embeddings_that_is_no_pad_bos_or_eos(
        tiny_folder, tmp_path, capsys):
    # a <t> (the tokenizer's sep_token) at id 600 of a 29-token tokenizer passed the checks of its size and of its
    # pad, bos and eos ids: a prompt that wrote it failed in the embedding, 'IndexError: index out of range in self'
    save_letter_tokenizer(tmp_path / "tok", bos_token=("<s>", 28), sep_token=("<t>", 600))
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "hi<t>", "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "2",
                  "--device", "cpu"])
    assert e.value.code == 2
    assert "the prompt holds token id 600 ('<t>'), outside the model's vocabulary (vocab_size 512: ids 0..511)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("prompts", [["   "], ["w1 w2", "   "]])
def test_generate_refuses_a_prompt_that_encodes_to_no_tokens(tiny_folder, tmp_path, capsys, prompts):
    # spaces, to a tokenizer that splits on whitespace and has no bos token, are no tokens: one such prompt failed in
    # the embedding ("Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, Int;
    # but got torch.FloatTensor"), and the second of two generated from its pads alone, with a right-padding warning
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "w1", "w2"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "tok")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), *[f"--prompt={text}" for text in prompts], "--tokenizer",
                  str(tmp_path / "tok"), "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 2
    what = "the prompt" if len(prompts) == 1 else "prompt 2"
    assert f"{what} ('   ') encodes to no tokens with --tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["classifier", "base model"])
def test_generate_refuses_a_checkpoint_without_weights_for_its_untied_lm_head(tmp_path, capsys, kind):
    # a sequence classifier's folder (score, no lm_head) or a ZooModel's (no head at all) of untied embeddings loaded as
    # a causal LM with a newly initialized lm_head, and zoo generate printed random tokens behind transformers' load
    # report alone
    config = zoo.ZooConfig.from_yaml(TINY)
    config.tie_word_embeddings = False
    config.num_labels, config.pad_token_id = 3, 0
    model = zoo.ZooForSequenceClassification(config) if kind == "classifier" else zoo.ZooModel(config)
    folder = save_model_folder(model, tmp_path / "m", "byte")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(folder), "hi", "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 2
    what = "ZooForSequenceClassification" if kind == "classifier" else "ZooModel"
    assert f"holds no weights for the causal LM's output layer lm_head.weight (a {what} checkpoint" \
        in capsys.readouterr().err


def test_generate_refuses_a_chat_template_that_refuses_a_lone_user_message_before_loading_the_model(
        tiny_folder, tmp_path, capsys, monkeypatch):
    # a template that asks for a system message first (its raise_exception) ended in a traceback after the model had
    # loaded, 'jinja2.exceptions.TemplateError: a system message must come first'
    from transformers import AutoTokenizer

    save_letter_tokenizer(tmp_path / "tok", bos_token=("<s>", 28), eos_token=("</s>", 29))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come "
                         "first') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(tmp_path / "tok")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # refused before the model loads
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "hi", "--chat", "--tokenizer", str(tmp_path / "tok"),
                  "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 2
    assert "chat template refuses a prompt as a lone user message: a system message must come first" \
        in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["caf\udce9"], "the prompt is not UTF-8 text (b'caf\\xe9')"),
                                           (["hi", "--stop", "\udce9"], "--stop b'\\xe9' is not UTF-8 text")])
def test_generate_refuses_a_prompt_or_stop_of_command_line_bytes_that_are_not_utf8(tiny_folder, capsys, monkeypatch,
                                                                                     args, message):
    # 'caf\xe9' in Latin-1 under a UTF-8 locale reaches sys.argv as 'caf\udce9' (a lone surrogate): the tokenizer
    # failed on such a prompt after the model had loaded, 'TypeError: TextEncodeInput must be Union[TextInputSequence,
    # ...]', and on such a --stop mid-run, after the prompt had been printed ("'utf-8' codec can't encode character")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # refused before the model loads
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), *args, "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_a_prompt_and_text_past_a_models_learned_positions(tmp_path, capsys):
    # a GPT-2 of 16 learned positions ran <bos> + 'hello there' (12 tokens) and 10 new tokens into its position
    # embedding: 'IndexError: index out of range in self', after the streamer had printed part of the text
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=260, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    folder = save_model_folder(gpt2, tmp_path / "gpt2", "byte")
    argv = ["generate", str(folder), "hello there", "--device", "cpu", "--max-new-tokens"]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "10"])
    assert e.value.code == 2
    assert "the prompt has 12 tokens and --max-new-tokens is 10, but " in (err := capsys.readouterr().err)
    assert "learns 16 absolute positions (transformer.wpe, config max_position_embeddings); lower --max-new-tokens " \
           "to <= 5" in err
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "1", "--prompt", "hello there, my friend"])
    assert e.value.code == 2
    assert "the longest prompt has 23 tokens and --max-new-tokens is 1, but " in capsys.readouterr().err
    # 17 tokens in all: the last new one is not fed back, so the positions fed are the 16 it learned (5 was refused:
    # 'lower --max-new-tokens to <= 4')
    cli.main([*argv, "5"])
    assert capsys.readouterr().out.startswith("hello there")


@pytest.mark.parametrize("command", [["zoo.cli", "info", str(TINY)], ["zoo", "--help"], ["zoo", "eval", "--help"]],
                         ids=["info", "help", "eval-help"])
def test_output_to_a_closed_pipe_ends_quietly(tmp_path, command):
    # `zoo info configs/models/*.yaml | head -1`: the reader left and zoo reported its own output as bad input, exit
    # status 2 and 'zoo info: [Errno 32] Broken pipe' (then a traceback from the flush at exit); `zoo --help | head -1`
    # ended in a BrokenPipeError traceback (and `python -m zoo` did not run: zoo had no __main__)
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    env.pop("ZOO_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", *command], stdout=write, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=120)
    os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_an_interrupted_train_exits_130(monkeypatch):
    import zoo.train as train_module

    def stopped(cfg, resume=None):
        return train_module.TrainResult(step=3, losses={}, evals=[], checkpoint=None, stopped=True, tokens=0)

    monkeypatch.setattr(train_module, "train", stopped)
    assert train_module.main([str(ROOT / "configs" / "train" / "demo.yaml")]) == 130
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(ROOT / "configs" / "train" / "demo.yaml")])
    assert e.value.code == 130


def test_a_train_sent_sigterm_before_its_loop_exits_130_in_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's, accelerate launch's) before zoo train's loop (building the model, reading the data)
    killed the process without a word, while Ctrl-C there ends in one line and 130, as a SIGTERM in the loop does (it
    saves and stops). It stops as Ctrl-C does now, the handler before the command back afterwards."""
    import os
    import signal

    from helpers import sigterm_raises_terminated

    import zoo.train as train_module

    real = train_module.build_model

    def build_model(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_model", build_model)
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    argv = [str(ROOT / "configs" / "train" / "demo.yaml"), f"--output_dir={tmp_path}", "--log.progress_bar=false"]
    with sigterm_raises_terminated() as handler:
        assert cli._run("zoo train", train_module.main, argv) == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    # (no checkpoint yet: the same command, without --resume, continues it)
    assert capsys.readouterr().err.endswith(f"zoo train: interrupted: zoo train {' '.join(argv)} continues it\n")
    assert not list(tmp_path.glob("checkpoints/*"))


def test_a_stopped_finetune_under_accelerate_launch_says_so_once(monkeypatch, capsys):
    # every process of `accelerate launch scripts/finetune.py` raises TrainingStopped at the step they agreed on, and
    # each printed the same 'zoo finetune: interrupted: stopped after step N, saved in ...' line
    from zoo.finetune import TrainingStopped

    def stopped(argv):
        raise TrainingStopped(None, 3)

    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert cli._run("zoo finetune", stopped, []) == 130
        assert ("zoo finetune: interrupted: stopped after step 3" in capsys.readouterr().err) == said, rank


def test_train_resume_without_a_config_names_the_runs_own(tmp_path, capsys):
    # `zoo train --resume runs/demo` (as --resume's help reads: a run directory) said only that config is required
    # (the usage shows it optional); the run directory keeps the config it was started with
    (tmp_path / "train_config.yaml").write_text("model: mamba-tiny.yaml\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"(to continue that run: zoo train {tmp_path / 'train_config.yaml'} --resume " \
                                 f"{tmp_path})" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(tmp_path / "nowhere")])
    assert capsys.readouterr().err.rstrip().endswith("the following arguments are required: config")


def test_train_usage_shows_the_config_as_required(capsys):
    # `zoo train --help` and every usage error printed `zoo train [-h] [--resume [DIR]] [config]`, the config in
    # brackets as if optional, where the README's `zoo train CONFIG` and the command itself require it
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "[config]" not in usage and re.search(r"zoo train \[-h\] config\b", usage), usage


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "--steps must be at least 1"),
                                           # AdamW's message named no option
                                           (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
                                           # it trained all its steps to a NaN loss
                                           (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
                                           (["--threads", "0"], "--threads must be at least 1"),
                                           # torch's 'Overflow when unpacking long long', naming no option
                                           (["--seed", str(2 ** 64)], "--seed must be in [0, 2**32), got "
                                                                      "18446744073709551616"),
                                           # mqar_batch's message, naming no option, after the model was built
                                           (["--n-kv", "20"], "--n-kv 20 needs --seq-len >= 4 * 20 = 80")])
def test_demo_refuses_impossible_options(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_refuses_more_pairs_than_its_models_vocabulary_holds_keys(capsys):
    """jamba-tiny's 512 tokens hold 255 keys: --n-kv 300 ended in mqar_batch's 'vocab_size=512 has 255 keys', naming
    neither the option nor the model config it came from."""
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--n-kv", "300", "--seq-len", "1200"])
    assert e.value.code == 2 and ("--n-kv 300: configs/models/jamba-tiny.yaml's vocab_size 512 holds 255 keys; "
                                  "give --n-kv 255 or less") in capsys.readouterr().err


@pytest.mark.parametrize("command, defaults", [
    ("demo", {"--config": "configs/models/jamba-tiny.yaml", "--steps": "200", "--batch-size": "16", "--seq-len": "64",
              "--n-kv": "4", "--lr": "3e-3", "--seed": "0", "--threads": "1"}),
    ("generate", {"--max-new-tokens": "64", "--num-beams": "1"}),
    ("info", {"--seq-len": "2048"}),
    ("eval synthetic", {"--n-samples": "256", "--batch-size": "64", "--seed": "1000003"}),
    ("eval passkey", {"--lengths": "1K,2K,4K,8K", "--depths": "0,0.25,0.5,0.75,1", "--n-samples": "5", "--seed": "0",
                      "--max-new-tokens": "8", "--out": "results/passkey"}),
    ("eval length", {"--chunk-size": "2048", "--batch-size": "1", "--bins-per-octave": "4", "--seed": "0",
                     "--out": "results/length"}),
    ("eval state", {"--n-docs": "4", "--max-len": "16384", "--chunk-size": "1024", "--points-per-octave": "2",
                    "--group-size": "64", "--norm-factor": "1.0", "--norm-chunk": "64", "--seed": "0",
                    "--out": "results/state"}),
])
def test_help_says_what_each_option_does_and_its_default(capsys, command, defaults):
    # `zoo demo --help` listed its options bare, and `zoo generate --help` --max-new-tokens and --num-beams: what they
    # set and their defaults (200 steps, 64 new tokens, ...) were in the code alone
    import re

    with pytest.raises(SystemExit) as e:
        cli.main([*command.split(), "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in defaults.items():
        found = re.search(rf"{option} [A-Z_]+ (.*?)(?= --[a-z]|$)", text)
        assert found and f"default{default}" in found.group(1).replace(" ", ""), (option, text)  # (wrapped at a -)


def test_demo_summary_of_a_short_run_compares_its_first_and_last_steps(capsys):
    # the summary averaged the first 20 and the last 20 losses: under 40 steps the windows overlapped, and under 21
    # they were the same steps, so `zoo demo --steps 10` printed 'loss 6.224 -> 6.224' whatever training did
    # (and it trains on --threads threads, default 1, and gives the caller's setting back: two threads of a tiny
    # model beside other jobs on a 2-core machine stalled steps for seconds)
    from zoo import demo

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a caller's setting, other than the demo's default
    seen = []
    try:
        with mock.patch.object(demo, "mqar_batch", side_effect=lambda *a, **k: seen.append(torch.get_num_threads())
                               or mqar_batch(*a, **k)):
            result = demo.main(["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--n-kv", "2"])
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2, seen
    finally:
        torch.set_num_threads(threads)
    assert result["first_loss"] != result["last_loss"], result
    assert f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, text", [
    (["bogus"], 2, "unknown command 'bogus'"),
    (["evl"], 2, "did you mean 'eval'"),
    (["eval"], 2, "usage: zoo eval"),
    (["eval", "mqar"], 2, "unknown evaluation 'mqar'"),
    (["eval", "-h"], 0, ""),
    (["info", "--seq-len", "-5", str(TINY)], 2, "--seq-len must be at least 1"),
    (["generate", "/no/such/folder", "hi"], 2, "model: '/no/such/folder': no such model folder"),
])
def test_cli_usage_mistakes_exit_2_with_one_line(argv, code, text, capsys):
    try:
        cli.main(argv)
        rc = 0
    except SystemExit as e:
        rc = e.code
    assert rc == code
    assert text in capsys.readouterr().err


def test_a_device_the_machine_lacks_is_a_user_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(AssertionError) as e:
        torch.zeros(1, device="cuda")
    assert cli._user_error(e.value)
    with pytest.raises(RuntimeError) as e:
        torch.device("cdua")
    assert cli._user_error(e.value)
    assert not cli._user_error(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_device_backend_torch_lacks_is_one_line(tiny_folder, capsys, monkeypatch):
    # `zoo generate --device mps` where torch has no MPS (Linux) ended in a traceback, 'RuntimeError: PyTorch is not
    # linked with support for mps devices'
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "hi", "--device", "mps", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "zoo generate: " in err and "mps" in err and "Traceback" not in err


@pytest.mark.parametrize("cuda, hip, why", [
    ("12.8", None, "no GPU is visible"),
    (None, "6.4.0", "no GPU is visible"),
    (None, None, "is built without CUDA"),
], ids=["cuda-build", "rocm-build", "cpu-build"])
def test_a_cuda_device_on_a_torch_built_for_gpus_that_sees_none_says_no_gpu_is_visible(monkeypatch, cuda, hip, why):
    # a ROCm build (torch.version.cuda None, torch.version.hip set: its GPUs run as cuda) that saw no GPU was said to
    # be "built without CUDA", sending its user to reinstall a torch that runs them
    import torch

    from zoo.eval.common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    with pytest.raises(ValueError, match=rf"^--device 'cuda': torch sees no CUDA device \(.*{why}"):
        resolve_device("cuda")


@pytest.mark.parametrize("gpus, device, message", [
    (2, "cuda:2", "--device 'cuda:2': this machine has 2 CUDA devices visible to torch (cuda:0 .. cuda:1)"),
    (1, "cuda:1", "--device 'cuda:1': this machine has 1 CUDA device visible to torch (cuda:0)"),
    (0, "cuda", "--device 'cuda': torch sees no CUDA device"),
    (0, "cuda:0", "--device 'cuda:0': torch sees no CUDA device"),
    (0, "meta", "--device 'meta': the meta device holds no data"),
])
@pytest.mark.parametrize("command", ["generate", "passkey", "synthetic", "length", "state"])
def test_a_device_past_the_gpus_torch_sees_is_refused_in_one_line_before_the_model_loads(tiny_folder, tmp_path, capsys,
                                                                                      monkeypatch, command, gpus,
                                                                                      device, message):
    # `--device cuda:N` past the GPUs of the machine went as far as moving the weights and ended there in a traceback
    # ('RuntimeError: CUDA error: invalid device ordinal'), as did `cuda` where the driver sees no GPU ('No CUDA GPUs
    # are available'); neither said how many GPUs there are
    import torch

    import zoo.hub

    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build: the GPUs are what is missing
    loaded = []
    monkeypatch.setattr(zoo.hub, "load_causal_lm", lambda *a, **k: loaded.append(a))
    out = ["--out", str(tmp_path / "o")]
    argv = {"generate": ["generate", str(tiny_folder), "hi", "--max-new-tokens", "2"],
            "passkey": ["eval", "passkey", "--model", str(tiny_folder), "--lengths", "64", *out],
            "synthetic": ["eval", "synthetic", "--model", str(tiny_folder), "--vocab-size", "64", "--seq-lens", "16",
                          *out],
            "length": ["eval", "length", "--model", str(tiny_folder), "--max-len", "32", *out],
            "state": ["eval", "state", "--model", str(TINY), *out]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and message in err, err
    assert not loaded and not (tmp_path / "o").exists()


def test_model_references_that_name_a_missing_or_wrong_local_folder_are_refused(tmp_path, monkeypatch, tiny_folder):
    from zoo.hub import check_model_ref

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.safetensors").write_text("")
    check_model_ref(tiny_folder)
    check_model_ref("org/name")  # a hub id: left to transformers
    for ref, text in [("runs/nope", "no such model folder"), ("./nope", "no such model folder"),
                      (str(tmp_path / "nope"), "no such model folder"), ("runs", "no config.json"),
                      ("weights.safetensors", "is a file")]:
        with pytest.raises(ValueError, match=text):
            check_model_ref(ref)
    (tmp_path / "runs" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter"):
        check_model_ref("runs")
    check_model_ref("runs", adapter_ok=True)


def test_graft_refuses_to_overwrite_its_base(tiny_folder, capsys):
    from zoo.surgery import main as graft_main

    with pytest.raises(SystemExit) as e:
        graft_main([str(tiny_folder), "--base", str(tiny_folder), "--pattern", "MM"])
    assert e.value.code == 2 and "is the --base folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "demo"], "output_dir: empty; name the run directory"),
    (["finetune", "finetune-mqar"], "output_dir: empty; name the run directory"),
    (["compare", "demo"], "output_dir: empty; name the results directory"),
], ids=["train", "finetune", "compare"])
def test_an_empty_output_dir_is_refused_not_taken_as_the_working_directory(tmp_path, capsys, monkeypatch, argv,
                                                                           message):
    # `--output_dir=$OUT` with OUT unset: zoo train refused it, while zoo finetune trained into the working directory
    # (base/, adapter/, merged/ beside the user's files) and zoo compare wrote its results there
    import zoo.compare
    import zoo.finetune

    monkeypatch.chdir(tmp_path)
    ran = []  # (nothing trains here, on any code: a command that takes the config records its call instead)
    monkeypatch.setattr(zoo.finetune, "finetune", lambda cfg: ran.append(cfg.output_dir))
    monkeypatch.setattr(zoo.compare, "run_comparison", lambda cfg, *a, **k: ran.append(cfg.output_dir))
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--output_dir="])
    assert ran == []
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_info_without_embeddings_leaves_out_an_untied_lm_head(tmp_path, capsys):
    # 'without embeddings' subtracted the input embedding only: an untied model's LM head (V x d) was counted as a
    # non-embedding parameter, so zoo info disagreed with zoo compare's non_embedding count for the same config
    from zoo.compare import parameter_counts

    tied = tmp_path / "tied.yaml"
    tied.write_text(TINY.read_text().replace("vocab_size: 512", "vocab_size: 50000"))
    untied = _yaml(tmp_path, tied.read_text() + "tie_embeddings: false\n")
    cli.main(["info", "--seq-len", "16", str(tied), str(untied)])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    tied_without, untied_without = rows[0][4], rows[1][4]
    assert untied_without == tied_without, rows
    counts = parameter_counts(zoo.ZooConfig.from_yaml(untied))
    assert untied_without == f"{counts['non_embedding'] / 1e6:.1f}M"


def test_info_takes_a_saved_model_folder(tiny_folder, tmp_path, capsys, monkeypatch):
    # a model folder (what zoo train, finetune and convert write) ended in 'zoo info: [Errno 21] Is a directory'
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    cli.main(["info", str(TINY)])
    from_yaml = capsys.readouterr().out.splitlines()[2]
    cli.main(["info", f"{tiny_folder}/"])
    assert capsys.readouterr().out.splitlines()[2] == from_yaml.replace("| mamba-tiny |", f"| {tiny_folder.name} |")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    for folder, text in [(tmp_path, "is a folder but not a model folder"), (tmp_path / "llama", "'llama' model")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["info", str(folder)])
        assert e.value.code == 2 and text in capsys.readouterr().err


def test_generate_starts_the_prompt_with_bos_as_the_model_was_trained(tiny_folder, capsys, monkeypatch):
    # zoo train wraps every document in <bos> ... <eos>; zoo generate fed the prompt's bytes alone, so a trained
    # model continued a prompt from a start it had never seen (the evaluations' prompts start with <bos>)
    from zoo.modeling import ZooForCausalLM

    seen = {}
    original = ZooForCausalLM.generate

    def generate(self, input_ids=None, **kwargs):
        seen["input_ids"] = input_ids.tolist()
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    cli.main(["generate", str(tiny_folder), "hi", "--max-new-tokens", "2"])
    assert seen["input_ids"] == [[257, ord("h"), ord("i")]]
    assert capsys.readouterr().out.startswith("hi")  # the <bos> is not printed


def test_generate_takes_a_device_and_a_dtype(tiny_folder, capsys, monkeypatch):
    # zoo generate had neither: it always ran on the CPU in the checkpoint's dtype, a GPU machine's GPU unused
    from zoo.modeling import ZooForCausalLM

    seen = {}
    original = ZooForCausalLM.generate

    def generate(self, input_ids=None, **kwargs):
        seen.update(dtype=self.dtype, device=self.device.type, ids_device=input_ids.device.type)
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    cli.main(["generate", str(tiny_folder), "hi", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "bf16"])
    assert seen == {"dtype": torch.bfloat16, "device": "cpu", "ids_device": "cpu"}
    assert capsys.readouterr().out.startswith("hi")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), "hi", "--device", "cdua"])
    assert e.value.code == 2 and "--device 'cdua'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["info", str(TINY)], ["eval", "state", "--model", str(TINY)]])
def test_an_interruption_while_a_command_imports_exits_130_in_one_line(argv, capsys, monkeypatch):
    # the command's module (torch, transformers: seconds) was imported outside the interruption handler, so a Ctrl-C
    # right after starting a command printed a traceback instead of 'zoo <command>: interrupted'
    import importlib

    def interrupted(name, package=None):
        raise KeyboardInterrupt

    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as e:
        try:
            cli.main(argv)
        except KeyboardInterrupt:  # (escaping, it would stop pytest itself)
            pytest.fail("the KeyboardInterrupt escaped zoo's handler (a traceback for the user)")
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_generate_samples_with_a_seed_and_the_given_settings(tiny_folder, capsys, monkeypatch):
    # --sample took transformers' defaults (top-k 50, temperature 1) and another text every run: no seed, no
    # temperature, top-k or top-p
    from zoo.modeling import ZooForCausalLM

    seen = {}
    original = ZooForCausalLM.generate

    def generate(self, input_ids=None, **kwargs):
        seen.update({k: kwargs.get(k) for k in ("do_sample", "temperature", "top_k", "top_p")})
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    argv = ["generate", str(tiny_folder), "hi", "--max-new-tokens", "8", "--sample", "--seed", "3",
            "--temperature", "1.5", "--top-k", "20", "--top-p", "0.9"]
    texts = []
    for _ in range(2):
        cli.main(argv)
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and seen == {"do_sample": True, "temperature": 1.5, "top_k": 20, "top_p": 0.9}


def test_generate_takes_top_k_zero_as_generate_does(tiny_folder, capsys, monkeypatch):
    # generate's top_k=0 turns top-k filtering off, the one way to sample from the whole vocabulary where the
    # generation config holds top_k=50; --top-k 0 was refused ("--top-k must be at least 1")
    from zoo.modeling import ZooForCausalLM

    seen = {}
    original = ZooForCausalLM.generate

    def generate(self, input_ids=None, **kwargs):
        seen["top_k"] = kwargs.get("top_k")
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    cli.main(["generate", str(tiny_folder), "hi", "--max-new-tokens", "4", "--sample", "--seed", "1", "--top-k", "0"])
    assert seen == {"top_k": 0} and capsys.readouterr().out.startswith("hi")



@pytest.mark.cuda
def test_generate_with_cuda_graph_prints_what_generate_prints(tiny_folder, capsys):
    argv = ["generate", str(tiny_folder), "hi", "--max-new-tokens", "12", "--device", "cuda"]
    cli.main(argv)
    eager = capsys.readouterr().out
    cli.main([*argv, "--cuda-graph"])
    assert capsys.readouterr().out == eager


@pytest.mark.parametrize("extra", [[], ["--sample", "--seed", "4"], ["--num-beams", "2"]])
def test_generate_prints_the_text_generate_returns(tiny_folder, capsys, monkeypatch, extra):
    """The text is streamed as it is generated (transformers' TextStreamer, beams excepted); what is printed is the
    decoded sequence generate returns, prompt included and <bos> left out, as before streaming."""
    from zoo.modeling import ZooForCausalLM

    returned = {}
    original = ZooForCausalLM.generate

    def generate(self, *args, **kwargs):
        returned["ids"] = original(self, *args, **kwargs)
        returned["tok"] = kwargs["streamer"].tokenizer if kwargs.get("streamer") is not None else None
        return returned["ids"]

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    cli.main(["generate", str(tiny_folder), "hi there", "--max-new-tokens", "24", *extra])
    printed = capsys.readouterr().out
    from zoo.hub import load_folder_tokenizer

    tok = load_folder_tokenizer(str(tiny_folder))
    assert printed == tok.decode(returned["ids"][0], skip_special_tokens=True) + "\n"
    assert (returned["tok"] is None) == ("--num-beams" in extra)


def test_generate_stops_at_a_stop_string(tiny_folder, capsys):
    """--stop TEXT (generate's stop_strings with the folder's tokenizer; \\n a newline): the printed text ends where
    it first ends with TEXT. The stop string is taken from the unstopped text, so it is met."""
    argv = ["generate", str(tiny_folder), "hi", "--max-new-tokens", "24"]
    cli.main(argv)
    full = capsys.readouterr().out
    new = full[len("hi"):]  # the printed text starts with the prompt
    stop = new[3:5]
    assert len(stop) == 2
    cli.main([*argv, "--stop", stop.replace("\n", "\\n")])
    stopped = capsys.readouterr().out
    # the first text, prompt included (as generate matches), that ends with it
    cut = next("hi" + new[:k] for k in range(1, len(new) + 1) if ("hi" + new[:k]).endswith(stop))
    assert stopped.rstrip("\n") == cut.rstrip("\n") and len(stopped) < len(full)


def test_several_prompts_each_end_at_their_stop_string_without_an_eos_token(tmp_path, capsys):
    """transformers pads a row that met a stop string only where there is an eos_token_id: with a tokenizer and model
    that have none, a row that met --stop ran on while another row decoded, and its text was printed past the stop.
    Each prompt of the batch prints what its own call prints."""
    from zoo.hub import load_folder_tokenizer

    tok = load_folder_tokenizer("byte")
    tok.eos_token = None
    torch.manual_seed(0)
    folder = save_model_folder(AutoModelForCausalLM.from_config(zoo.ZooConfig.from_yaml(TINY)), tmp_path / "m", tok)
    assert load_folder_tokenizer(str(folder)).eos_token_id is None
    def argv(text: str) -> list[str]:
        return ["generate", str(folder), text, "--max-new-tokens", "12", "--device", "cpu"]

    cli.main(argv("hi"))
    first = capsys.readouterr().out[len("hi"):].rstrip("\n")
    cli.main(argv("hello there"))
    other = capsys.readouterr().out
    stop = first[:2]
    assert len(stop) == 2 and stop not in other[len("hello there"):]  # one row meets it, the other runs to the end
    singles = []
    for text in ("hi", "hello there"):
        cli.main([*argv(text), "--stop", stop])
        singles.append(capsys.readouterr().out)
    assert len(singles[0]) < len(first) + len("hi")
    cli.main([*argv("hi"), "--prompt", "hello there", "--stop", stop])
    assert capsys.readouterr().out == "".join(f"==> prompt {i + 1} <==\n{text}" for i, text in enumerate(singles))


def _capture_generate(monkeypatch) -> dict:
    from zoo.modeling import ZooForCausalLM

    seen = {}
    original = ZooForCausalLM.generate

    def generate(self, *args, **kwargs):
        seen.update(kwargs)
        seen["out"] = original(self, *args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    return seen


def test_generate_takes_several_prompts_as_one_left_padded_batch(tiny_folder, tmp_path, capsys, monkeypatch):
    """zoo generate took one prompt per call: --prompt (repeatable) and --prompts-file (one per line) add more, run
    as one batch with left padding; each is printed under its number, as its own call prints it."""
    from zoo.hub import load_folder_tokenizer

    tok = load_folder_tokenizer(str(tiny_folder))
    prompts = ["hi", "hello there", "a", "the last one"]
    singles = []
    for text in prompts:
        cli.main(["generate", str(tiny_folder), text, "--max-new-tokens", "8"])
        singles.append(capsys.readouterr().out)
    seen = _capture_generate(monkeypatch)
    (tmp_path / "prompts.txt").write_text("a\n\nthe last one\n")
    cli.main(["generate", str(tiny_folder), "hi", "--prompt", "hello there", "--prompts-file",
              str(tmp_path / "prompts.txt"), "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert printed == "".join(f"==> prompt {i + 1} <==\n{single}" for i, single in enumerate(singles))
    ids, mask = seen["input_ids"], seen["attention_mask"]
    lengths = [len(tok.encode(text)) + 1 for text in prompts]  # <bos> + text
    assert ids.shape == (4, max(lengths)) and mask.sum(1).tolist() == lengths
    for row, n in enumerate(lengths):  # pads on the left, the prompt right-aligned
        assert not mask[row, : ids.shape[1] - n].any() and mask[row, ids.shape[1] - n:].all()
        assert (ids[row, : ids.shape[1] - n] == tok.pad_token_id).all() and ids[row, -n] == tok.bos_token_id
    assert seen["streamer"] is None
    cli.main(["generate", str(tiny_folder), "--prompt", "hi", "--max-new-tokens", "8"])  # one --prompt: as before
    assert capsys.readouterr().out == singles[0]


def test_generate_takes_the_prompt_after_options(tiny_folder, capsys):
    """The prompt may follow options, as `zoo generate DIR --max-new-tokens 8 "text"`: argparse matched the optional
    prompt empty at the model and refused the text after the options ('unrecognized arguments')."""
    cli.main(["generate", str(tiny_folder), "hi there", "--max-new-tokens", "8"])
    first = capsys.readouterr().out
    cli.main(["generate", str(tiny_folder), "--max-new-tokens", "8", "hi there"])
    assert capsys.readouterr().out == first


def test_generate_reads_a_prompts_file_without_its_byte_order_mark(tiny_folder, tmp_path, capsys, monkeypatch):
    """A prompts file saved with a UTF-8 byte-order mark (Windows editors): the mark went into the first prompt's
    tokens."""
    seen = _capture_generate(monkeypatch)
    for name, data in (("plain.txt", b"hi\nhello there\n"), ("bom.txt", b"\xef\xbb\xbfhi\nhello there\n")):
        (tmp_path / name).write_bytes(data)
        cli.main(["generate", str(tiny_folder), "--prompts-file", str(tmp_path / name), "--max-new-tokens", "1"])
        seen[name] = (seen["input_ids"].tolist(), capsys.readouterr().out)
    assert seen["bom.txt"] == seen["plain.txt"]


@pytest.mark.parametrize("args, message", [
    ([], "no prompt: give one after the model, or --prompt TEXT"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompts-file", "EMPTY"], "holds no prompt (one per line)"),
    (["--prompts-file", "MISSING"], "missing.txt': [Errno 2] No such file"),
    (["hi", "--chat"], "--chat: TINY's tokenizer has no chat template"),
])
def test_generate_refuses_no_prompt_and_chat_without_a_template(tiny_folder, tmp_path, capsys, monkeypatch, args,
                                                               message):
    (tmp_path / "empty.txt").write_text("\n\n")
    args = [{"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "missing.txt")}.get(a, a) for a in args]
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # refused before the model loads
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tiny_folder), *args])
    assert e.value.code == 2 and message.replace("TINY", str(tiny_folder)) in capsys.readouterr().err


@pytest.mark.parametrize("several", [False, True])
def test_generate_chat_applies_the_tokenizers_chat_template(tiny_folder, tmp_path, capsys, monkeypatch, several):
    """--chat wraps each prompt as a user message in the tokenizer's chat template, the assistant's turn opened, and
    prints the reply alone."""
    from zoo.hub import load_folder_tokenizer

    tok = load_folder_tokenizer(str(tiny_folder))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tmp_path / "chat-tok")
    seen = _capture_generate(monkeypatch)
    prompts = ["hi", "how are you"] if several else ["hi"]
    extra = ["--prompt", prompts[1]] if several else []
    cli.main(["generate", str(tiny_folder), prompts[0], *extra, "--chat", "--tokenizer", str(tmp_path / "chat-tok"),
              "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    rows = [[tok.bos_token_id, *tok.encode(f"<user>{text}\n<assistant>")] for text in prompts]
    width = max(map(len, rows))
    assert seen["input_ids"].tolist() == [[tok.pad_token_id] * (width - len(r)) + r for r in rows]
    replies = [tok.decode(row[width:], skip_special_tokens=True) for row in seen["out"]]
    if several:
        assert printed == "".join(f"==> prompt {i + 1} <==\n{reply}\n" for i, reply in enumerate(replies))
    else:  # streamed, the prompt skipped
        assert seen["streamer"] is not None and printed == replies[0] + "\n"


def _with_generation_config(folder: Path, tmp_path: Path, **settings) -> Path:
    """A copy of the model folder whose generation_config.json also holds ``settings``."""
    import json
    import shutil

    copy = tmp_path / f"{folder.name}-generation-config"
    shutil.copytree(folder, copy)
    path = copy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return copy


@pytest.mark.parametrize("extra", [[], ["--sample", "--seed", "2"], ["--prompt", "ho"]])
def test_generate_prints_one_text_a_prompt_whatever_the_checkpoints_num_return_sequences(tiny_folder, tmp_path,
                                                                                          capsys, extra):
    # a generation_config.json with num_return_sequences 2: greedy decoding failed ('Greedy methods ... do not
    # support num_return_sequences'), --sample failed in the one-row streamer, and several prompts had their rows
    # printed against the wrong prompts
    argv = ["hi", "--max-new-tokens", "6", *extra]
    cli.main(["generate", str(tiny_folder), *argv])
    expected = capsys.readouterr().out
    folder = _with_generation_config(tiny_folder, tmp_path, num_return_sequences=2, do_sample=True)
    cli.main(["generate", str(folder), *argv])
    assert capsys.readouterr().out == expected


def test_generate_is_not_cut_short_by_the_checkpoints_max_time(tiny_folder, tmp_path, capsys):
    # a generation_config.json with a max_time: generate stopped at that clock, and the text came out shorter than
    # --max-new-tokens without a word
    argv = ["hi", "--max-new-tokens", "16"]
    cli.main(["generate", str(tiny_folder), *argv])
    expected = capsys.readouterr().out
    cli.main(["generate", str(_with_generation_config(tiny_folder, tmp_path, max_time=1e-9)), *argv])
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("extra", [[], ["--stop", "zz"]])
def test_generate_stops_at_its_own_stop_strings_not_the_checkpoints(tiny_folder, tmp_path, capsys, extra):
    # a generation_config.json with stop_strings: without --stop, generate failed ('... could not locate a
    # tokenizer'); with it, the checkpoint's were replaced, as --stop's are the only ones the command knows
    argv = ["hi", "--max-new-tokens", "16", *extra]
    cli.main(["generate", str(tiny_folder), *argv])
    expected = capsys.readouterr().out
    cli.main(["generate", str(_with_generation_config(tiny_folder, tmp_path, stop_strings=["h", "o"])), *argv])
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("settings", [{"repetition_penalty": 5.0}, {"no_repeat_ngram_size": 1},
                                      {"suppress_tokens": list(range(256))}])
@pytest.mark.parametrize("extra", [[], ["--sample", "--seed", "1"], ["--num-beams", "2"]])
def test_generate_decodes_as_its_options_say_whatever_the_checkpoints_penalties(tiny_folder, tmp_path, capsys,
                                                                                  settings, extra):
    # a generation_config.json with a repetition penalty, an n-gram ban or suppressed tokens: generate applied it
    # under the command's options, and its greedy decoding (or sampling, or beam search) was not
    argv = ["hi", "--max-new-tokens", "16", *extra]
    cli.main(["generate", str(tiny_folder), *argv])
    expected = capsys.readouterr().out
    cli.main(["generate", str(_with_generation_config(tiny_folder, tmp_path, **settings)), *argv])
    assert capsys.readouterr().out == expected


def test_generate_prefills_transformers_mamba_in_one_forward_whatever_the_checkpoints_chunks(tmp_path, capsys,
                                                                                              monkeypatch):
    # a transformers Mamba whose generation_config.json holds a prefill_chunk_size: generate prefilled the prompt in
    # those chunks, and transformers' Mamba drops the state of the earlier chunks (zoo.decode.continues_chunks_exactly)
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=300)).save_pretrained(
        tmp_path / "mamba")
    folder = _with_generation_config(tmp_path / "mamba", tmp_path, prefill_chunk_size=4)
    seen = []
    original = MambaForCausalLM.generate

    def generate(self, *args, **kwargs):
        hook = self.register_forward_pre_hook(lambda module, a, kw: seen.append(kw["input_ids"].shape[1]),
                                              with_kwargs=True)
        try:
            return original(self, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(MambaForCausalLM, "generate", generate)
    cli.main(["generate", str(folder), "a prompt of many bytes", "--tokenizer", "byte", "--max-new-tokens", "3",
              "--device", "cpu"])
    assert seen[1:] == [1, 1] and seen[0] > 4  # the whole prompt in one forward, then one token a step


@pytest.mark.parametrize("extra", [["--num-beams", "2"], ["--prompt", "ho"]])
def test_generate_prints_the_texts_whatever_the_checkpoints_return_dict_in_generate(tiny_folder, tmp_path, capsys,
                                                                                     extra):
    # a generation_config.json with return_dict_in_generate: generate returned an output object, and decoding its
    # rows failed ('TypeError: Can't extract `str` to `Vec`') where the text is printed after generate
    argv = ["hi", "--max-new-tokens", "6", *extra]
    cli.main(["generate", str(tiny_folder), *argv])
    expected = capsys.readouterr().out
    folder = _with_generation_config(tiny_folder, tmp_path, return_dict_in_generate=True, output_scores=True)
    cli.main(["generate", str(folder), *argv])
    assert capsys.readouterr().out == expected


def test_demo_logs_the_cross_entropy_of_its_moe_model_not_the_objective(tmp_path):
    """The demo's Jamba-style model is an MoE: its out.loss adds moe.aux_loss_coef times the load-balancing loss. The
    printed and returned losses are the cross entropy alone, as zoo train's metrics.csv logs it (with a large coef the
    objective sat far above it)."""
    import yaml

    from zoo import demo
    from zoo.config import ZooConfig
    from zoo.data.synthetic import mqar_batch

    spec = yaml.safe_load((ROOT / "configs" / "models" / "jamba-tiny.yaml").read_text())
    spec["moe"]["aux_loss_coef"] = 50.0
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = demo.main(["--config", str(path), "--steps", "1", "--batch-size", "4", "--seq-len", "32"])
    # the first step's cross entropy, on the demo's own model and first batch (same seed)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(path)).train()
    batch = mqar_batch(4, generator=torch.Generator().manual_seed(0), seq_len=32, n_kv=4,
                       vocab_size=model.config.vocab_size)
    out = model(**batch)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
    assert out.loss.item() > ce.item() + 1e-3  # the objective's aux part is there to be left out
    assert abs(result["first_loss"] - ce.item()) < 1e-5


def test_a_bare_packaged_model_name_read_as_a_hub_id_says_so(tmp_path, monkeypatch, capsys):
    """`--model jamba-tiny` (the packaged config's name without .yaml) is a hub id, as the README says; offline its
    failure read only "We couldn't connect to 'https://huggingface.co'", nothing pointing at jamba-tiny.yaml. A
    command whose model may be a zoo YAML adds the hint; one that takes saved folders only (zoo generate) does not."""
    monkeypatch.chdir(tmp_path)  # no folder named after a packaged config here
    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    hint = "('jamba-tiny' was read as a hub id: a model argument takes a packaged model config with its .yaml, " \
           "jamba-tiny.yaml)"
    with mock.patch("transformers.AutoModelForCausalLM.from_pretrained", side_effect=offline):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "demo", "--model=jamba-tiny", f"--output_dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'jamba-tiny' is not a zoo YAML, a model folder or a hub id" in err and hint in err

    def load(argv):
        raise offline

    assert cli._run("zoo eval synthetic", load, ["--model", "gla-tiny"]) == 2
    assert "('gla-tiny' was read as a hub id" in capsys.readouterr().err
    assert cli._run("zoo generate", load, ["gla-tiny", "hello"]) == 2  # a saved folder or hub id only: no YAML
    assert cli._run("zoo eval synthetic", load, ["--model", "org/gla-tiny"]) == 2
    assert "read as a hub id" not in capsys.readouterr().err


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_generate_takes_an_adapters_tokenizer_from_its_base_model(tmp_path, capsys, monkeypatch, where):
    # an adapter as PEFT saves it holds no tokenizer files: zoo generate refused a folder ('holds no tokenizer files;
    # pass --tokenizer') and failed on a hub repo in AutoTokenizer, never reading the base model's, as PEFT's users do
    ref = adapter_without_tokenizer(tmp_path, monkeypatch, where)
    cli.main(["generate", ref, "hi", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("hi")
    if where == "folder":  # an adapter whose base model has no tokenizer either is refused naming both
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / "base" / name).unlink()
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", ref, "hi", "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is a PEFT adapter without tokenizer files, and its base model" in err


def test_a_folder_of_named_adapters_says_which_subfolder_to_give(tmp_path, capsys):
    # PEFT's save_pretrained writes an adapter named other than 'default' into a subfolder of its name, and a zoo
    # finetune run folder holds adapter/ and merged/: the folder was refused as 'a folder but not a model folder (no
    # config.json)', with no word of what it holds
    from peft import LoraConfig, get_peft_model

    from zoo.data.text import ByteTokenizer
    from zoo.hub import check_model_ref

    AutoModelForCausalLM.from_config(zoo.ZooConfig.from_yaml(TINY)).save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # (the adapter names it as its base)
    get_peft_model(base, LoraConfig(r=2, target_modules=["in_proj"]), adapter_name="mine").save_pretrained(
        tmp_path / "saved")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tmp_path / "saved"), "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "its subfolders hold PEFT adapters (mine)" in err
    assert f"give one of them, such as {str(tmp_path / 'saved' / 'mine')!r}" in err
    with pytest.raises(ValueError, match=r"subfolders hold PEFT adapters \(mine\): give their base model or the"):
        check_model_ref(tmp_path / "saved")
    cli.main(["generate", str(tmp_path / "saved" / "mine"), "hi", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("hi")
    (tmp_path / "base").rename(tmp_path / "saved" / "merged")  # a finetune run's folder: merged/ beside the adapter
    with pytest.raises(ValueError, match=r"subfolders hold models \(merged\) and PEFT adapters \(mine\): give one of "
                                         r"them, such as '.*merged'"):
        check_model_ref(tmp_path / "saved")


def test_an_adapter_whose_base_model_folder_is_gone_says_so(tmp_path, monkeypatch, capsys):
    # an adapter names its base by the path it was trained from (zoo finetune: the resolved folder): once that folder
    # moved, loading the adapter failed in transformers as "Repo id must be in the form 'repo_name' or
    # 'namespace/repo_name': '/.../base'", and its tokenizer (the base's) as 'no such tokenizer folder'
    from zoo.hub import load_causal_lm

    ref = adapter_without_tokenizer(tmp_path, monkeypatch, "folder")
    (tmp_path / "base").rename(tmp_path / "moved")
    message = "the base model of the PEFT adapter .*base_model_name_or_path.*base'?: no such model folder"
    with pytest.raises(ValueError, match=message):
        load_causal_lm(ref)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", ref, "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the base model of the PEFT adapter" in err and "no such model folder" in err


@pytest.mark.parametrize("other", ["mamba", "mamba2"])
def test_an_adapter_whose_base_folder_now_holds_another_model_is_refused(tmp_path, capsys, other):
    # an adapter names its base by its folder; where that folder came to hold another model, zoo generate and zoo eval
    # (load_causal_lm) ran it with part of the adapter: a Jamba adapter on a Mamba base lost its attention layers'
    # weights without a word (PEFT warns only of the base's adapted modules it found no weights for, left a no-op), and
    # on a Mamba-2 base it ended in load_state_dict's traceback of 'size mismatch' lines
    from zoo.config import ZooConfig
    from zoo.hub import load_causal_lm

    save_trained_adapter(tmp_path / "base", tmp_path / "adapter", use_dora=False)  # the tiny Jamba's
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{other}-tiny.yaml")
                                     ).save_pretrained(tmp_path / "base")
    why = ("its weights .*layers\\.2\\.mixer\\.q_proj.* match no module of the base; it holds no weights for the "
           "base's adapted .*layers\\.2\\.mixer\\.in_proj" if other == "mamba" else
           "its weights do not fit the base's shapes \\(.*in_proj")
    with pytest.warns(UserWarning) if other == "mamba" else contextlib.nullcontext():  # (PEFT's missing keys)
        with pytest.raises(ValueError, match=f"adapter is a PEFT adapter of another model than its base model "
                                             f".*base: {why}.*; give the base model it was trained on"):
            load_causal_lm(tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tmp_path / "adapter"), "hi", "--max-new-tokens", "2", "--tokenizer", "byte"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a PEFT adapter of another model than its base model" in err


def test_loading_an_adapter_reads_its_weights_once_the_fit_check_taking_their_names_alone(tmp_path):
    # the check that an adapter fits its base (load_causal_lm) took the names of its weights from PEFT's
    # load_peft_weights, which read every weight a second time after PeftModel.from_pretrained had, onto the GPU where
    # there is one (an adapter of a resized vocabulary holds its whole embeddings)
    import peft.peft_model
    import peft.utils
    import peft.utils.save_and_load

    from zoo.hub import load_causal_lm

    save_trained_adapter(tmp_path / "base", tmp_path / "adapter", use_dora=False)
    real, reads = peft.utils.save_and_load.load_peft_weights, []

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    with mock.patch.object(peft.utils.save_and_load, "load_peft_weights", counted), \
            mock.patch.object(peft.utils, "load_peft_weights", counted), \
            mock.patch.object(peft.peft_model, "load_peft_weights", counted):
        model = load_causal_lm(tmp_path / "adapter")
    assert len(reads) == 1  # PeftModel.from_pretrained's own
    assert any("lora_" in name for name, _ in model.named_parameters())


def _weights_lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")


def _weights_cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


def _weights_bin_of_other_bytes(path: Path) -> None:
    path.unlink()
    (path.parent / "pytorch_model.bin").write_text("these are not the weights\n" * 10)


@pytest.mark.parametrize("damage, message", [(_weights_lfs_pointer, r"model.safetensors is a Git LFS pointer, not the "
                                                                    r"weights it stands for .*git lfs pull"),
                                             (_weights_cut_short, r"its weights \(model.safetensors\) cannot be read "
                                                                  r".*cut short or corrupted"),
                                             (_weights_bin_of_other_bytes, r"its weights \(pytorch_model.bin\) cannot "
                                                                           r"be read \(not a checkpoint torch.load")],
                         ids=["lfs-pointer", "cut-short", "bin-of-other-bytes"])
@pytest.mark.parametrize("command", ["generate", "eval", "train", "finetune"])
def test_a_model_folder_whose_weights_cannot_be_read_is_refused_in_one_line(tiny_folder, tmp_path, capsys, monkeypatch,
                                                                           command, damage, message):
    # a folder cloned without git-lfs (a pointer file in place of model.safetensors) or copied in part was refused so
    # by zoo convert and zoo graft only: zoo generate, zoo eval, zoo train and zoo finetune ended in safetensors'
    # traceback ("SafetensorError: Error while deserializing header: ..."), naming no file and no fix
    # (a pytorch_model.bin of other bytes than a checkpoint, text here, ended each command in the traceback of a bare
    # "KeyError: 101" from torch.load's unpickler)
    import shutil

    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    folder = tmp_path / "cloned"
    shutil.copytree(tiny_folder, folder)
    damage(folder / "model.safetensors")
    argv = {"generate": ["generate", str(folder), "hi", "--max-new-tokens", "2", "--device", "cpu"],
            "eval": ["eval", "synthetic", "--model", str(folder), "--vocab-size", "64", "--n-samples", "2",
                     "--seq-lens", "16", "--device", "cpu"],
            "train": ["train", "demo", f"--model={folder}", "--train.max_steps=1",
                      "--schedule.warmup_steps=0", f"--output_dir={tmp_path / 'run'}"],
            "finetune": ["finetune", "finetune-mqar", f"--model={folder}", "--pretrain=null", "--train.max_steps=1",
                         "--schedule.warmup_steps=0", f"--output_dir={tmp_path / 'run'}"]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback (most recent call last)" not in err and "Error:" not in err, err
    named = re.escape(f"{folder}/") + message if damage is _weights_lfs_pointer else re.escape(f"{folder}: ") + message
    assert re.search(rf"^zoo {command}[a-z ]*: (error: )?{named}", err, re.MULTILINE), err


@pytest.mark.parametrize("kind", ["pointers", "pointer-and-cut-short"])
def test_a_model_folder_with_several_unreadable_weights_files_is_refused_naming_each(tmp_path, capsys, monkeypatch,
                                                                                   kind):
    # zoo.hub.readable_weights named the first Git LFS pointer it found and no other file: a sharded clone made without
    # git-lfs (every shard a pointer) was refused naming one shard, and a folder holding a pointer beside a shard cut
    # short named the pointer alone, with no word of the shard to download again
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    folder = tmp_path / "sharded"
    save_model_folder(AutoModelForCausalLM.from_config(zoo.ZooConfig.from_yaml(TINY)), folder, "byte",
                      max_shard_size="50KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 4
    if kind == "pointers":
        for shard in shards:
            _weights_lfs_pointer(shard)
        named = (rf"its weights \({', '.join(re.escape(s.name) for s in shards[:3])} and {len(shards) - 3} more\) are "
                 rf"Git LFS pointers, not the weights they stand for \(a clone made without git-lfs\): fetch them "
                 rf"\(`git lfs pull`")
    else:
        _weights_lfs_pointer(shards[0])
        _weights_cut_short(shards[2])
        named = (rf"its weights \({re.escape(shards[0].name)}\) is a Git LFS pointer, .*`git lfs pull`.*; and its "
                 rf"weights \({re.escape(shards[2].name)}\) cannot be read .*cut short or corrupted")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(folder), "hi", "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" not in err, err
    assert re.search(rf"^zoo generate: {re.escape(str(folder))}: {named}", err, re.MULTILINE), err
    assert len([line for line in err.splitlines() if line.startswith("zoo generate")]) == 1, err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_model_folder_that_lacks_a_weight_is_refused_naming_it(tiny_folder, tmp_path, capsys, monkeypatch, command):
    # a checkpoint without one of its model's weights (a key lost, another version's layout) loaded with that weight
    # newly initialized: zoo generate printed, and zoo eval scored, a partly random model behind transformers' load
    # report alone (zoo convert refused it)
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    folder = tmp_path / "partial"
    shutil.copytree(tiny_folder, folder)
    weights = load_file(folder / "model.safetensors")
    lost = sorted(k for k in weights if ".mixer." in k)[0]
    save_file({k: v for k, v in weights.items() if k != lost}, folder / "model.safetensors", metadata={"format": "pt"})
    argv = {"generate": ["generate", str(folder), "hi", "--max-new-tokens", "2", "--device", "cpu"],
            "eval": ["eval", "synthetic", "--model", str(folder), "--vocab-size", "64", "--n-samples", "2",
                     "--seq-lens", "16", "--device", "cpu"]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" not in err, err
    assert re.search(rf"^zoo {command}[a-z ]*: {re.escape(str(folder))} holds no weights for {re.escape(lost)}: "
                     rf"loaded, they would be newly initialized", err, re.MULTILINE), err


@pytest.mark.parametrize("content, message", [(lambda text: text[:40], "not valid JSON ("),
                                              (lambda text: "[1, 2]", "holds a JSON list, not a weights index")],
                         ids=["cut", "list"])
@pytest.mark.parametrize("command", ["generate", "convert"])
def test_a_model_folder_whose_shards_index_is_not_json_is_refused_naming_the_index(tmp_path, capsys, monkeypatch,
                                                                                  command, content, message):
    # a model.safetensors.index.json cut short or edited by hand ended zoo generate, eval, train, finetune and convert
    # in json's message alone ("zoo generate: Expecting property name enclosed in double quotes: line 1 column 2"),
    # naming no file; one holding another JSON value than an object (a list), though valid JSON, still ended in a
    # traceback ("TypeError: list indices must be integers or slices, not str"), the index checked on json's error alone
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    folder = tmp_path / "sharded"
    save_model_folder(AutoModelForCausalLM.from_config(zoo.ZooConfig.from_yaml(TINY)), folder, "byte",
                      max_shard_size="50KB")
    index = folder / "model.safetensors.index.json"
    index.write_text(content(index.read_text()))
    argv = {"generate": ["generate", str(folder), "hi", "--max-new-tokens", "2", "--device", "cpu"],
            "convert": ["convert", str(folder), str(tmp_path / "out")]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" not in err, err
    assert f"\nzoo {command}: {index}: {message}" in f"\n{err}", err


@pytest.mark.parametrize("damage, message", [(_weights_lfs_pointer, r"/model.safetensors is a Git LFS pointer, not the "
                                                                    r"weights it stands for \(the copy of someone/tiny "
                                                                    r"in the Hugging Face cache\).*hf download "
                                                                    r"someone/tiny"),
                                             (_weights_cut_short, r"someone/tiny \(its copy in the Hugging Face cache, "
                                                                  r".*\): its weights \(model.safetensors\) cannot be "
                                                                  r"read .*hf download someone/tiny --force-download")],
                         ids=["lfs-pointer", "cut-short"])
@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_hub_model_whose_cached_weights_cannot_be_read_is_refused_in_one_line(tiny_folder, tmp_path, capsys,
                                                                               monkeypatch, command, damage, message):
    # zoo.hub.readable_weights looked into local folders only: a hub repo whose copy in the Hugging Face cache is a
    # Git LFS pointer (or cut short) ended zoo generate and zoo eval (load_causal_lm), zoo train and zoo finetune
    # (load_model_not_adapter) in safetensors' traceback "Error while deserializing header: header too large"
    import shutil

    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    snapshot = offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/tiny")
    shutil.copytree(tiny_folder, snapshot)
    damage(snapshot / "model.safetensors")
    argv = {"generate": ["generate", "someone/tiny", "hi", "--max-new-tokens", "2", "--device", "cpu"],
            "train": ["train", "demo", "--model=someone/tiny", "--train.max_steps=1", "--schedule.warmup_steps=0",
                      f"--output_dir={tmp_path / 'run'}"]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" not in err and "Error:" not in err, err
    assert re.search(rf"^zoo {command}[a-z ]*: .*{message}", err, re.MULTILINE), err


@pytest.mark.parametrize("damaged", ["adapter", "base"])
def test_a_peft_adapter_or_its_base_whose_weights_are_an_lfs_pointer_is_refused_in_one_line(tmp_path, capsys,
                                                                                           monkeypatch, damaged):
    # an adapter folder cloned without git-lfs (adapter_model.safetensors a pointer file), or the base folder it names,
    # ended zoo generate (zoo.hub.load_causal_lm) in safetensors' traceback, naming no file
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    save_trained_adapter(tmp_path / "base", tmp_path / "adapter", use_dora=False)
    weights = tmp_path / damaged / ("adapter_model.safetensors" if damaged == "adapter" else "model.safetensors")
    _weights_lfs_pointer(weights)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tmp_path / "adapter"), "hi", "--tokenizer", "byte", "--max-new-tokens", "2",
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback (most recent call last)" not in err, err
    assert f"\nzoo generate: {weights} is a Git LFS pointer, not the weights it stands for" in f"\n{err}", err
