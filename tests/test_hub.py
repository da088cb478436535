"""Complete model folders: config, (sharded) safetensors, generation config and tokenizer, readable by
clients that only know transformers (AutoModelForCausalLM, AutoTokenizer, pipeline) after `import zoo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

import zoo  # noqa: F401  (registers the Auto classes)
from zoo import ZooConfig, ZooForCausalLM
from zoo.data.text import ByteTokenizer
from zoo.hub import load_folder_tokenizer, load_model_folder, save_model_folder

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
TEXTS = ["plain ascii", "héllo wörld ✓ 🤖 漢字", "tabs\tnew\nlines\r\n  spaces ", "".join(map(chr, range(1, 256)))]


def tiny(name: str = "jamba", vocab_size: int = 320) -> ZooForCausalLM:
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / f"{name}-tiny.yaml", vocab_size=vocab_size)).eval()


def assert_loads_the_model(loaded, model) -> None:
    """`loaded` holds `model`'s weights, bit for bit, and gives its logits. The logits to fp32 rounding, not exactly:
    weights that from_pretrained reads from a safetensors file can sit at 8-byte offsets, on which CPU matmuls take
    another vector path (3e-7 apart from the same weights 64-byte aligned)."""
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_model_folder(tiny(), tmp_path_factory.mktemp("zoo") / "model", ByteTokenizer())


def test_folder_is_complete(folder):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (folder / name).is_file(), f"{name} missing"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "zoo"
    generation = GenerationConfig.from_pretrained(folder)
    tok = ByteTokenizer()
    assert (generation.pad_token_id, generation.bos_token_id, generation.eos_token_id) == \
           (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)


def test_auto_tokenizer_round_trips_bytes_exactly(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == len(ByteTokenizer())
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8")), f"{text[:20]!r}: ids are not the UTF-8 bytes"
        assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>"]) == [256, 257, 258]


def test_pipeline_generates_from_folder(folder):
    pipe = pipeline("text-generation", model=str(folder))
    prompt = "def f(x):"
    out = pipe(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)
    model, tok = load_model_folder(folder)
    ids = tok(prompt, return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert len(expected) == 6
    assert out[0]["generated_text"] == tok.decode(expected, skip_special_tokens=True)


def test_sharded_folder_loads_the_same_model(tmp_path):
    model = tiny("mamba2")
    save_model_folder(model, tmp_path, "byte", max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_loads_the_model(loaded, model)


def test_tokenizer_must_fit_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        save_model_folder(tiny("mamba", vocab_size=200), tmp_path, ByteTokenizer())


def test_folder_without_tokenizer(tmp_path):
    save_model_folder(tiny("mamba"), tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "generation_config.json").is_file()
    assert load_folder_tokenizer(tmp_path) is None


def test_bad_tokenizer_or_destination_is_named(tmp_path):
    # a missing local tokenizer folder was reported by transformers as "Repo id must be in the form ...", and a
    # destination that is a file as a bare AssertionError (a traceback from the CLI)
    for ref in (tmp_path / "nope", tmp_path / "file.json", "./nope"):
        Path(tmp_path / "file.json").write_text("{}")
        with pytest.raises(ValueError, match="no such tokenizer folder"):
            load_folder_tokenizer(ref)
    with pytest.raises(ValueError, match="is a file; give a folder"):
        save_model_folder(tiny("mamba"), tmp_path / "file.json")


def test_a_tokenizer_folder_without_tokenizer_files_is_refused_not_dropped(tmp_path):
    # a tokenizer named as a folder that holds none of the tokenizer files (the model folder of a save without one)
    # was read as "no tokenizer": the model was saved without one, into an existing folder beside the tokenizer of
    # an earlier save, without an error
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"'.*not-a-tokenizer' is a folder without tokenizer files"):
        save_model_folder(tiny("mamba"), tmp_path / "model", empty)
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="is a folder without tokenizer files"):
        save_model_folder(tiny("mamba"), tmp_path / "model", str(empty))


@pytest.mark.parametrize("name,text,problem", [
    ("tokenizer_config.json", "[1, 2]", "holds a JSON list"), ("tokenizer_config.json", "{oops", "not valid JSON"),
    ("tokenizer.json", "{oops", "not valid JSON"), ("special_tokens_map.json", "{oops", "not valid JSON"),
])
def test_a_tokenizer_file_that_is_no_json_object_is_named(name, text, problem, tmp_path):
    # a tokenizer_config.json holding a list ended in "AttributeError: 'list' object has no attribute 'get'" (a
    # traceback from zoo convert, zoo generate, ...), and invalid JSON in any tokenizer file in json's message alone
    # ("Expecting property name enclosed in double quotes"), naming no file
    ByteTokenizer().save_pretrained(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: {problem}"):
        load_folder_tokenizer(tmp_path)


def test_a_classifier_and_a_bare_model_save_as_folders_too(tmp_path):
    # transformers 5 gives only generating models a generation_config: save_model_folder read it unconditionally and
    # raised AttributeError for a ZooForSequenceClassification or a ZooModel
    from transformers import AutoModel, AutoModelForSequenceClassification

    from zoo import ZooForSequenceClassification, ZooModel

    config = ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", vocab_size=320, num_labels=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    for cls, auto, name in [(ZooForSequenceClassification, AutoModelForSequenceClassification, "cls"),
                            (ZooModel, AutoModel, "bare")]:
        model = cls(ZooConfig.from_dict(config.to_dict())).eval()
        folder = save_model_folder(model, tmp_path / name, ByteTokenizer())
        assert not (folder / "generation_config.json").exists()
        loaded = auto.from_pretrained(folder).eval()
        assert loaded.config.pad_token_id == ByteTokenizer().pad_token_id  # filled from the tokenizer
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids)[0], model(ids)[0])
        assert load_folder_tokenizer(folder)("hi", add_special_tokens=False)["input_ids"] == list(b"hi")


def test_a_failed_save_leaves_no_partial_folder(tmp_path):
    # `zoo convert ... --max-shard-size abc` (or a full disk, or Ctrl-C) failed after save_pretrained had created the
    # destination and written into it: a partial folder that from_pretrained would take for a model
    model = tiny()
    dst = tmp_path / "new" / "model"
    with pytest.raises(ValueError):
        save_model_folder(model, dst, "byte", max_shard_size="abc")
    assert not dst.exists() and [p.name for p in (tmp_path / "new").iterdir()] == [], "nothing left behind"
    assert (save_model_folder(model, dst, "byte") / "config.json").is_file()  # a good save writes the folder
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["model"]
    assert save_model_folder(model, dst, "byte") == dst  # an existing folder is written into, as before


def test_a_save_killed_earlier_leaves_nothing_for_the_next_one(tmp_path):
    # the save was written into `.NAME.tmp-PID` beside the folder, a name a killed save (the OOM killer, SIGKILL) left
    # behind and the next run reused when it had the same pid (as processes in a fresh container do): that save went
    # into the leftover folder and moved its files in too, here an old model.safetensors beside the new shards, which
    # from_pretrained loaded (the old model) without a word
    import os

    old, new = tiny("mamba"), tiny("mamba")
    with torch.no_grad():
        new.model.norm_f.weight.mul_(2.0)
    save_model_folder(old, tmp_path / f".m.tmp-{os.getpid()}", "byte")
    save_model_folder(new, tmp_path / "m", "byte", max_shard_size="200KB")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_loads_the_model(loaded, new)


@pytest.mark.parametrize("first,second", [("5GB", "200KB"), ("200KB", "5GB")], ids=["then-sharded", "then-one-file"])
def test_saving_over_a_folder_leaves_no_stale_weights(tmp_path, first, second):
    # a save into an existing folder left the earlier save's weights: its model.safetensors beside new shards was
    # what from_pretrained loaded (the old model, silently), and an old shard index stayed beside a new single file
    old, new = tiny("mamba"), tiny("mamba2")
    save_model_folder(old, tmp_path / "m", "byte", max_shard_size=first)
    (tmp_path / "m" / "notes.txt").write_text("mine")
    (tmp_path / "m" / "model.safetensors.bak").write_text("mine")  # named like weights, but not a weight file
    save_model_folder(new, tmp_path / "m", "byte", max_shard_size=second)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors.bak" in names
    sharded = second == "200KB"
    assert ("model.safetensors" in names) != sharded and ("model.safetensors.index.json" in names) == sharded
    assert "notes.txt" in names and not any(n.startswith(".") for n in (p.name for p in tmp_path.iterdir()))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_loads_the_model(loaded, new)


def test_saving_over_a_folder_replaces_its_tokenizer_or_warns_that_it_keeps_it(tmp_path):
    # a save into an existing folder kept the earlier save's tokenizer files beside the new ones (an old
    # tokenizer.model is what a slow tokenizer loads), and a save without a tokenizer kept the old one silently:
    # zoo generate then decoded with another model's tokenizer
    dst = tmp_path / "m"
    save_model_folder(tiny("mamba"), dst, "byte")
    (dst / "tokenizer.model").write_bytes(b"an older tokenizer")
    (dst / "notes.txt").write_text("mine")
    save_model_folder(tiny("mamba"), dst, "byte")
    names = {p.name for p in dst.iterdir()}
    assert "tokenizer.model" not in names and {"notes.txt", "tokenizer_config.json"} <= names
    with pytest.warns(UserWarning, match=r"keeps the tokenizer files of an earlier save \(.*tokenizer_config\.json"):
        save_model_folder(tiny("mamba"), dst)
    assert "tokenizer_config.json" in {p.name for p in dst.iterdir()}


def test_a_folder_under_home_given_with_a_tilde_loads(tmp_path, monkeypatch):
    # check_model_ref expanded '~' and passed it, then transformers took '~/model' for an invalid hub id ("Repo id
    # must use alphanumeric chars"), for the model and the tokenizer alike
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tiny("mamba")
    save_model_folder(model, tmp_path / "model", "byte")
    loaded, tokenizer = load_model_folder("~/model")
    assert isinstance(tokenizer, ByteTokenizer) and isinstance(load_folder_tokenizer("~/model"), ByteTokenizer)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_tokenizer_fills_only_unset_special_ids_and_fits_exactly(tmp_path):
    # the ids the model already has stay (a config's eos, a generation config's extra eos ids); the tokenizer
    # fills the rest; a tokenizer of exactly vocab_size tokens fits, one token more does not
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="vocab_size"):
        save_model_folder(tiny("mamba", vocab_size=len(tok) - 1), tmp_path / "small", tok)
    model = tiny("mamba", vocab_size=len(tok))
    model.config.eos_token_id = 5
    model.generation_config = GenerationConfig(eos_token_id=[5, 7])
    save_model_folder(model, tmp_path / "m", tok)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(tmp_path / "m")
    assert config["eos_token_id"] == 5 and config["pad_token_id"] == tok.pad_token_id
    assert generation.eos_token_id == [5, 7] and generation.pad_token_id == tok.pad_token_id
    # a folder whose tokenizer is in tokenizer_config.json without tokenizer.json still has one
    (tmp_path / "m" / "tokenizer.json").unlink()
    assert isinstance(load_folder_tokenizer(tmp_path / "m"), ByteTokenizer)


def test_saving_into_a_peft_adapter_folder_is_refused(tmp_path):
    # transformers' from_pretrained finds an adapter_config.json in a model folder and loads that adapter on top of the
    # model: a model saved (zoo convert, zoo graft) into a folder holding a LoRA adapter was loaded with the stale
    # adapter applied, another model's logits, without a word
    from peft import LoraConfig, get_peft_model

    base, model = tiny("mamba"), tiny("mamba")
    with torch.no_grad():
        model.model.norm_f.weight.mul_(2.0)
    save_model_folder(base, tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(target_modules=["in_proj"], r=2))
    peft_model.save_pretrained(tmp_path / "adapter")
    before = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    with pytest.raises(ValueError, match=r"holds a PEFT adapter \(adapter_config.json\)"):
        save_model_folder(model, tmp_path / "adapter", "byte")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == before  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # nor beside it


def test_a_model_with_adapter_layers_is_refused_and_its_merge_saves_whole(tmp_path):
    """What zoo.hub.load_causal_lm makes of an adapter (its base model with the adapter in its layers) was written by
    save_model_folder as base_layer / lora_A / lora_B weights, which from_pretrained does not load: the folder came back
    with the adapted projections newly initialized (a load report only). It is refused; the merged model saves whole."""
    from helpers import save_trained_adapter
    from peft import PeftModel

    from zoo.hub import load_causal_lm

    save_trained_adapter(tmp_path / "base", tmp_path / "adapter", use_dora=False)
    ids = torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    adapted = load_causal_lm(tmp_path / "adapter").eval()
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers \(model\.layers\.0\.mixer\.in_proj.*merge_"):
        save_model_folder(adapted, tmp_path / "out", "byte")
    assert not (tmp_path / "out").exists()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    save_model_folder(merged.merge_and_unload(), tmp_path / "out", "byte")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits,
                                   adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_an_adapter_holding_a_tokenizer_stops_at_its_eos_as_its_merged_model_does(tmp_path):
    """zoo finetune saves the tokenizer it trained with beside the adapter, and its merged model takes that tokenizer's
    eos into its (generation) config (save_model_folder). Of a base model saved without special ids, zoo generate of
    the merged folder stopped at the eos the finetune's rows end with, while of the adapter folder (load_causal_lm: the
    base's config) it ran on past it, another text for the same finetune."""
    from peft import LoraConfig, get_peft_model

    from zoo.hub import TOKENIZER_FAMILY, load_causal_lm

    torch.manual_seed(0)
    ZooForCausalLM(ZooConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "models" / "mamba-tiny.yaml")
                   ).save_pretrained(tmp_path / "base")  # no tokenizer, no eos in its config
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                             LoraConfig(r=2, target_modules=["in_proj"]))
    adapted.save_pretrained(tmp_path / "adapter")
    tok = ByteTokenizer()
    tok.save_pretrained(tmp_path / "adapter")
    save_model_folder(adapted.merge_and_unload(), tmp_path / "merged", tok)
    merged = load_model_folder(tmp_path / "merged")[0]
    assert merged.generation_config.eos_token_id == tok.eos_token_id
    loaded = load_causal_lm(tmp_path / "adapter")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(loaded.generation_config, name) == getattr(merged.generation_config, name) is not None
        assert getattr(loaded.config, name) == getattr(merged.config, name)
    # an adapter without tokenizer files keeps its base's config as it is
    for name in TOKENIZER_FAMILY:
        (tmp_path / "adapter" / name).unlink(missing_ok=True)
    assert load_causal_lm(tmp_path / "adapter").generation_config.eos_token_id is None
