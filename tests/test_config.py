"""ZooConfig: parsing, YAML, and validation that names the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import load_script
from torch import nn

from zoo import ZooConfig, list_mixers

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


def test_registry_lists_builtin_mixers():
    assert {"mamba", "mamba2", "attention", "gla"} <= set(list_mixers())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_validates(path):
    cfg = ZooConfig.from_yaml(path)
    assert cfg.num_hidden_layers == len(cfg.layer_specs()) > 0


def test_pattern_and_list_forms_agree():
    a = ZooConfig(d_model=64, layers="MA M", mixers={"M": {"type": "mamba"}, "A": {"type": "attention",
                                                                                     "n_heads": 4}})
    b = ZooConfig(d_model=64, layers=[{"type": "mamba"}, {"type": "attention", "n_heads": 4}, {"type": "mamba"}],
                  mixers={})
    assert [s["type"] for s in a.layer_specs()] == [s["type"] for s in b.layer_specs()]


def test_moe_every_second_layer():
    cfg = ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml")
    assert [s["ffn"] for s in cfg.layer_specs()] == ["swiglu", "moe"] * 4


def test_an_empty_moe_section_takes_the_jamba_defaults():
    """`moe: {}` asks for the defaults (every 2nd layer, 16 experts, top-2, aux 0.001): it read as no MoE (an empty
    dict is falsy), so no layer got experts, and a layer with `ffn: moe` got them without their aux loss."""
    import torch

    from zoo import ZooForCausalLM
    from zoo.compare import parameter_counts

    cfg = ZooConfig(vocab_size=32, d_model=16, layers="MMMM", mixers={"M": {"type": "mamba"}}, moe={})
    assert [s["ffn"] for s in cfg.layer_specs()] == ["swiglu", "moe"] * 2
    counts = parameter_counts(cfg)
    assert counts["active"] == counts["total"] - 2 * (16 - 2) * 3 * 16 * cfg.moe_spec()["hidden"]
    override = ZooConfig(vocab_size=32, d_model=16, layers=[{"type": "mamba"}, {"type": "mamba", "ffn": "moe"}],
                         mixers={}, moe={})
    model = ZooForCausalLM(override).train()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, use_cache=False)
    assert out.aux_loss is not None and out.aux_loss > 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + 1e-3 * out.aux_loss)


@pytest.mark.parametrize("fields", [
    dict(layers="M", mixers={"M": {"type": "mamba"}}, moe={"n_experts": 4}),  # offset 1 of a single layer
    dict(layers="MMM", mixers={"M": {"type": "mamba"}}, moe={"every": 4, "offset": 3}),
    dict(layers=[{"type": "mamba", "ffn": "swiglu"}, {"type": "mamba", "ffn": "swiglu"}], mixers={}, moe={}),
], ids=["one-layer", "offset-past-the-end", "every-layer-sets-its-ffn"])
def test_a_moe_section_that_picks_no_layer_is_refused(fields):
    # the model was built without a single expert and trained as a dense one, silently
    with pytest.raises(ValueError, match=r"moe: none of the \d+ layers gets experts .*moe.every .*moe.offset"):
        ZooConfig(**fields)


def test_roundtrip_dict():
    cfg = ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml")
    again = ZooConfig.from_dict(cfg.to_dict())
    assert again.layer_specs() == cfg.layer_specs()


BAD = [
    ("unknown-mixer", dict(layers="X", mixers={"X": {"type": "lstm"}}), "lstm"),
    ("letter-without-spec", dict(layers="MZ", mixers={"M": {"type": "mamba"}}), "'Z'"),
    ("heads-not-dividing", dict(d_model=64, layers="A", mixers={"A": {"type": "attention", "n_heads": 5}}),
     "n_heads"),
    ("kv-heads-not-dividing", dict(d_model=64, layers="A",
                                   mixers={"A": {"type": "attention", "n_heads": 4, "n_kv_heads": 3}}), "n_kv_heads"),
    ("negative-d-model", dict(d_model=-8), "d_model"),
    ("zero-vocab", dict(vocab_size=0), "vocab_size"),
    ("negative-d-state", dict(layers="M", mixers={"M": {"type": "mamba", "d_state": -1}}), "d_state"),
    ("top-k-over-experts", dict(layers="MM", mixers={"M": {"type": "mamba"}},
                                moe={"n_experts": 2, "top_k": 3}), "top_k"),
    ("bad-ffn-type", dict(ffn={"type": "gelu-mlp"}), "ffn.type"),
    ("negative-ffn-hidden", dict(ffn={"type": "swiglu", "hidden": -3}), "ffn.hidden"),
    ("empty-pattern", dict(layers="  ", mixers={"M": {"type": "mamba"}}), "layers"),
    ("spec-without-type", dict(layers="M", mixers={"M": {"d_state": 4}}), "mixers.M"),
    ("head-dim-not-dividing", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba2", "head_dim": 48}}),
     "head_dim"),
    ("groups-not-dividing", dict(d_model=64, layers="M",
                                 mixers={"M": {"type": "mamba2", "head_dim": 16, "n_groups": 3}}), "n_groups"),
    ("mamba2-A-init-range", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba2", "head_dim": 16,
                                                                      "A_init_range": [-1, 16]}}), "A_init_range"),
    ("mamba2-dt-min", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba2", "head_dim": 16, "dt_min": 0}}),
     "dt_min"),
    ("mamba2-dt-range", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba2", "head_dim": 16, "dt_min": 0.2}}),
     "dt_min/dt_max"),
    ("mamba-dt-scale", dict(layers="M", mixers={"M": {"type": "mamba", "dt_scale": -1.0}}), "dt_scale"),
    ("mamba-dt-floor", dict(layers="M", mixers={"M": {"type": "mamba", "dt_init_floor": -1e-4}}), "dt_init_floor"),
    # Mamba-2 took the negative floor that Mamba refused
    ("mamba2-dt-floor", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba2", "head_dim": 16,
                                                                  "dt_init_floor": -1e-4}}), "dt_init_floor"),
    ("gla-heads", dict(d_model=64, layers="G", mixers={"G": {"type": "gla", "n_heads": 3}}), "n_heads"),
    ("window-zero", dict(d_model=64, layers="A", mixers={"A": {"type": "attention", "n_heads": 4, "window": 0}}),
     "window"),
    ("moe-layer-without-moe", dict(layers=[{"type": "mamba", "ffn": "moe"}], mixers={}), "moe"),
    ("unknown-ffn-per-layer", dict(layers=[{"type": "mamba", "ffn": "relu"}], mixers={}), "ffn"),
    ("layers-wrong-type", dict(layers=42), "layers"),
    ("norm-eps", dict(norm_eps=0.0), "norm_eps"),
    ("unknown-mixer-option", dict(layers="MA", mixers={"M": {"type": "mamba"}, "A": {"type": "mamba", "d_sate": 16}}),
     "mixers.A.d_sate: unknown option for mixer 'mamba'; did you mean 'd_state'?"),
    ("unknown-per-layer-option", dict(layers=[{"type": "mamba"}, {"type": "attention", "n_kv_head": 1}]),
     "layers[1].n_kv_head: unknown option for mixer 'attention'; did you mean 'n_kv_heads'?"),
    ("unknown-mixer-names-its-field", dict(layers="MX", mixers={"M": {"type": "mamba"}, "X": {"type": "lstm"}}),
     "mixers.X.type: unknown mixer 'lstm'; registered mixers: attention, gla, mamba, mamba2"),
    # a misspelt mixer name gets the closest registered one, as a misspelt field or option does
    ("misspelt-mixer-name", dict(layers="X", mixers={"X": {"type": "Mamba2"}}),
     "mixers.X.type: unknown mixer 'Mamba2'; did you mean 'mamba2'? registered mixers:"),
    ("misspelt-per-layer-mixer-name", dict(layers=[{"type": "atention"}], d_model=64),
     "layers[0].type: unknown mixer 'atention'; did you mean 'attention'?"),
    ("unknown-per-layer-mixer", dict(layers=[{"type": "mamba"}, {"type": "lstm"}]), "layers[1].type: unknown mixer"),
    # a spare letter no layer uses: its type was never checked (a misspelling passed until a pattern took it)
    ("unknown-mixer-of-an-unused-letter", dict(layers="MM", mixers={"M": {"type": "mamba"}, "X": {"type": "mambo"}}),
     "mixers.X.type: unknown mixer 'mambo'"),
    ("mixer-type-not-a-string", dict(layers=[{"type": 3}]), "layers[0].type: expected a mixer name"),
    ("ffn-a-list", dict(ffn=[1]), "ffn: expected"),
    ("ffn-a-number", dict(ffn=5), "ffn: expected"),
    # YAML's .nan / .inf: every training loss of the model was NaN / inf
    ("moe-aux-coef-nan", dict(layers="MM", mixers={"M": {"type": "mamba"}}, moe={"aux_loss_coef": float("nan")}),
     "moe.aux_loss_coef: must be a finite number"),
    ("moe-aux-coef-inf", dict(layers="MM", mixers={"M": {"type": "mamba"}}, moe={"aux_loss_coef": float("inf")}),
     "moe.aux_loss_coef: must be a finite number"),
    # a pattern's layer names the mixers entry that sets its ffn (it read layers[2].ffn, a field nobody wrote)
    ("unknown-ffn-of-a-letter", dict(layers="MMA", mixers={"M": {"type": "mamba"}, "A": {"type": "attention",
                                                                                        "ffn": "mlp"}}),
     "mixers.A.ffn: unknown 'mlp'"),
    ("moe-ffn-of-a-letter-without-moe", dict(layers="MMA", mixers={"M": {"type": "mamba"}, "A": {"type": "attention",
                                                                                                "ffn": "moe"}}),
     "mixers.A.ffn: 'moe' needs a top-level `moe:` section"),
    ("swiglu-ffn-of-a-letter-without-ffn", dict(layers="MA", ffn="none", mixers={"M": {"type": "mamba"},
                                                                                 "A": {"type": "attention",
                                                                                       "ffn": "swiglu"}}),
     "mixers.A.ffn: 'swiglu' needs"),
]


@pytest.mark.parametrize("kwargs,field", [(k, f) for _, k, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        ZooConfig(**kwargs)
    assert field in str(info.value), str(info.value)


@pytest.mark.parametrize("d_model,spec,message", [
    (200, {}, r"n_heads: 3 does not divide d_model = 200 \(no n_heads given: the default, one head per 64 channels, "
              r"is 3\); choose n_heads"),
    (130, {}, r"head_dim = d_model / n_heads = 65 must be even for RoPE \(no n_heads given: .* is 2\)"),
    (64, {"n_kv_heads": 2}, r"n_kv_heads: 2 does not divide n_heads = 1 \(no n_heads given: .* is 1\)"),
], ids=["not-dividing", "odd-head-dim", "kv-heads"])
def test_an_attention_spec_without_n_heads_says_the_refused_count_is_the_default(d_model, spec, message):
    """An attention spec without n_heads takes one head per 64 channels; where that count did not fit, the refusal
    read 'n_heads: 3 does not divide d_model = 200', a setting the config never gave."""
    with pytest.raises(ValueError, match=message):
        ZooConfig(vocab_size=8, d_model=d_model, layers="A", mixers={"A": {"type": "attention", **spec}})
    with pytest.raises(ValueError, match=r"n_heads: 3 does not divide d_model = 200; choose"):
        ZooConfig(vocab_size=8, d_model=200, layers="A", mixers={"A": {"type": "attention", "n_heads": 3}})


def test_dotted_mixer_from_disk_needs_trust(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ZooConfig(d_model=32, vocab_size=64, layers="X", ffn="none",
                    mixers={"X": {"type": "zoo.mixers.mamba.Mamba", "d_state": 4}})
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded.model.layers[0].mixer).__name__ == "Mamba"


def test_a_dotted_mixer_checkpoint_loads_in_the_command_line_tools_when_trusted_by_environment(tmp_path, monkeypatch,
                                                                                                  capsys):
    """zoo generate / eval / finetune take no trust_remote_code, and the refusal told the user to pass it (or to
    call a Python function): a checkpoint of a custom mixer given by import path could not be used from any zoo
    command. ZOO_TRUST_MIXER_PATHS names the paths they may import; the refusal names it, and, for from_config (which
    drops trust_remote_code), trust_mixer_path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.cli import main

    path = "zoo.mixers.mamba.Mamba"
    cfg = ZooConfig(d_model=32, vocab_size=300, layers="X", ffn="none", mixers={"X": {"type": path, "d_state": 4}})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    monkeypatch.delenv("ZOO_TRUST_MIXER_PATHS", raising=False)
    argv = ["generate", str(tmp_path), "hi", "--tokenizer", "byte", "--max-new-tokens", "2"]
    with pytest.raises(SystemExit):
        main(argv)
    assert f"ZOO_TRUST_MIXER_PATHS={path}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=rf"trust_mixer_path\('{path}'\)"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), trust_remote_code=True)
    monkeypatch.setenv("ZOO_TRUST_MIXER_PATHS", f"other.Mixer, {path}")
    main(argv)
    assert capsys.readouterr().out.startswith("hi")


def test_a_checkpoint_of_a_registered_mixer_says_to_register_it_before_loading(tmp_path):
    """A model saved with a mixer registered in code (type: ema) names it by its short name; loaded in a process that
    had not registered it, the refusal listed the built-in mixers and suggested a dotted path, not the fix (import
    the module that registers it). It now says so."""
    import json

    from transformers import AutoModelForCausalLM

    cfg = ZooConfig(d_model=32, vocab_size=64, layers="A", ffn="none", mixers={"A": {"type": "attention"}})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["mixers"]["A"]["type"] = "my_unregistered_ema"  # as saved by a process that registered it
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"mixers\.A\.type: .*register_mixer\('my_unregistered_ema'\).*import the "
                                         r"module that registers it"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_yaml_config_may_give_num_labels_for_a_classification_head(tmp_path):
    """num_labels is transformers' config keyword for the classification head (ZooConfig(num_labels=3) takes it), but
    a YAML config giving it was refused as 'num_labels: unknown field', so a YAML could not describe a classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = tmp_path / "classifier.yaml"
    path.write_text((CONFIGS / "mamba-tiny.yaml").read_text() + "num_labels: 3\npad_token_id: 0\n")
    config = ZooConfig.from_yaml(path)
    assert config.num_labels == 3
    model = AutoModelForSequenceClassification.from_config(config)
    assert model(torch.randint(1, 512, (2, 5))).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="num_label: unknown field"):
        ZooConfig.from_yaml(path, num_label=3)


class _Proj(nn.Module):
    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)


class NoMaskMixer(_Proj):
    """DESIGN.md's contract block as written: forward without attention_mask."""

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None):
        return self.proj(x)


class NoLayerIdxMixer(nn.Module):
    def __init__(self, d_model: int, *, width: int = 2):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x)


class RequiredOptionMixer(_Proj):
    def __init__(self, d_model: int, layer_idx: int, *, n_heads: int):
        super().__init__(d_model, layer_idx)

    def forward(self, x, **kwargs):
        return self.proj(x)


class NotAModule:
    def __init__(self, d_model, layer_idx):
        pass


class KeywordsMixer(_Proj):
    def forward(self, x, **kwargs):  # takes every keyword the model passes
        return self.proj(x)


@pytest.fixture
def registry_restored(monkeypatch):
    from zoo import registry

    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))
    saved = list(registry.LORA_TARGETS)
    yield registry
    registry.LORA_TARGETS[:] = saved


@pytest.mark.parametrize("cls,spec,message", [
    (NoMaskMixer, {}, r"forward\(x, \*, cache=None, seq_idx=None, position_ids=None, attention_mask=None\).*"
                      r"'attention_mask'"),
    (NoLayerIdxMixer, {}, r"NoLayerIdxMixer\(d_model, layer_idx, \*\*options\)"),
    (RequiredOptionMixer, {}, r"missing a required (keyword-only )?argument: 'n_heads'"),  # (3.12 says keyword-only)
    (NotAModule, {}, "is not an nn.Module class"),
], ids=["forward-without-attention-mask", "init-without-layer-idx", "required-option-left-out", "not-a-module"])
def test_a_mixer_that_breaks_the_contract_is_refused_naming_what_it_lacks(registry_restored, cls, spec, message):
    """A custom mixer the model cannot build or call was taken by the config and failed later with a bare TypeError:
    a forward without attention_mask (the signature of DESIGN.md's contract block) at the first forward ('got an
    unexpected keyword argument'), an __init__ without layer_idx or with a required option left out at model
    construction, a class that is no nn.Module with 'takes no arguments'. The config (for a registered mixer) or the
    model's construction (for a dotted path, imported only then) now refuses it, naming the call the model makes."""
    from transformers import AutoModelForCausalLM

    registry_restored.register_mixer("custom_contract")(cls)
    fields = dict(vocab_size=32, d_model=16, layers="MX", ffn="none")
    with pytest.raises(ValueError, match=rf"mixers\.X\.type: mixer 'custom_contract' does not follow the mixer "
                                         rf"contract: .*{message}"):
        ZooConfig(**fields, mixers={"M": {"type": "mamba"}, "X": {"type": "custom_contract", **spec}})
    config = ZooConfig(**fields, mixers={"M": {"type": "mamba"}, "X": {"type": f"{__name__}.{cls.__name__}", **spec}})
    with pytest.raises(ValueError, match=rf"mixer '{__name__}\.{cls.__name__}' .*{message}"):
        AutoModelForCausalLM.from_config(config)


class PlainOptionsMixer(_Proj):
    """Options written without `*` (positional-or-keyword): the model passes them by keyword all the same."""

    def __init__(self, d_model: int, layer_idx: int = 0, alpha: float = 0.5, width: int = 4):
        super().__init__(d_model, layer_idx)

    def forward(self, x, **kwargs):
        return self.proj(x)


class NoOptionsMixer(_Proj):
    def forward(self, x, **kwargs):
        return self.proj(x)


@pytest.mark.parametrize("cls,spec,message", [
    (PlainOptionsMixer, {"alph": 1}, r"mixers\.X\.alph: unknown option for mixer 'custom_options'; did you mean "
                                     r"'alpha'\? valid options: alpha, width$"),
    (PlainOptionsMixer, {"layer_idx": 1}, r"mixers\.X\.layer_idx: unknown option .*valid options: alpha, width$"),
    (NoOptionsMixer, {"alpha": 1}, r"mixers\.X\.alpha: unknown option .*valid options: none \(it takes no options\)$"),
], ids=["positional-or-keyword-options", "layer-idx-is-no-option", "no-options"])
def test_an_unknown_option_of_a_custom_mixer_names_its_valid_options(registry_restored, cls, spec, message):
    """Options of a custom mixer's __init__ written without `*` (def __init__(self, d_model, layer_idx=0, alpha=0.5))
    are options (the model passes them by keyword), yet a misspelt one read 'valid options: ' with nothing after it and
    no did-you-mean: only keyword-only parameters were listed."""
    registry_restored.register_mixer("custom_options")(cls)
    fields = dict(vocab_size=32, d_model=16, layers="X", ffn="none")
    with pytest.raises(ValueError, match=message):
        ZooConfig(**fields, mixers={"X": {"type": "custom_options", **spec}})
    if cls is PlainOptionsMixer:
        config = ZooConfig(**fields, mixers={"X": {"type": "custom_options", "alpha": "0.25"}})
        assert config.mixers["X"]["alpha"] == 0.25


class ScaledMixer(_Proj):
    def __init__(self, d_model: int, layer_idx: int = 0, *, scale: float = 1.0, width: int = 2):
        super().__init__(d_model, layer_idx)
        self.scale, self.width = scale, width

    def forward(self, x, **kwargs):
        return self.proj(x) * self.scale


def test_a_dotted_path_mixers_yaml_numbers_reach_it_as_numbers(tmp_path):
    """YAML reads 1e-3 (no dot) as the string '1e-3'; a registered mixer's options are coerced by their type hints,
    but a dotted-path mixer, imported only when the model is built, got the string: its forward failed ('only integer
    tensors ... can be converted to an index') or, for a str * int, repeated text. Its options are coerced at the
    model's construction now, naming the field when they cannot be."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path / "dotted.yaml"
    text = (f"vocab_size: 32\nd_model: 16\nlayers: XX\nffn: none\n"
            f"mixers: {{X: {{type: {__name__}.ScaledMixer, scale: 1e-3, width: '3'}}}}\n")
    path.write_text(text)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(path))
    mixer = model.model.layers[0].mixer
    assert (mixer.scale, mixer.width) == (1e-3, 3) and type(mixer.width) is int
    assert model(torch.randint(0, 32, (1, 4))).logits.shape == (1, 4, 32)
    path.write_text(text.replace("1e-3", "abc"))
    with pytest.raises(ValueError, match=r"mixers\.X\.scale: expected a number, got 'abc'"):
        AutoModelForCausalLM.from_config(ZooConfig.from_yaml(path))


class PartlyHintedMixer(ScaledMixer):
    # a hint that does not resolve at run time (a name imported under TYPE_CHECKING only)
    def __init__(self, d_model: int, layer_idx: int = 0, *, scale: float = 1.0, width: int = 2,
                 helper: UndefinedHelper | None = None):  # noqa: F821
        super().__init__(d_model, layer_idx, scale=scale, width=width)


def test_a_mixer_with_one_unresolvable_hint_gets_its_other_options_coerced(registry_restored):
    """One type hint of a mixer's __init__ that did not resolve dropped the hints of all its options: YAML's 1e-3 (no
    dot) reached `scale: float` as the string '1e-3'. Each hint is resolved on its own now."""
    registry_restored.register_mixer("partly_hinted")(PartlyHintedMixer)
    for mixer in ("partly_hinted", f"{__name__}.PartlyHintedMixer"):
        config = ZooConfig(vocab_size=32, d_model=16, layers="X", ffn="none",
                           mixers={"X": {"type": mixer, "scale": "1e-3", "width": "3"}})
        if mixer == "partly_hinted":
            assert config.mixers["X"]["scale"] == 1e-3 and config.mixers["X"]["width"] == 3
        from zoo import ZooForCausalLM

        built = ZooForCausalLM(config).model.layers[0].mixer
        assert (built.scale, built.width) == (1e-3, 3) and type(built.width) is int


def test_a_mixer_that_takes_the_models_keywords_through_kwargs_is_accepted(registry_restored):
    import torch

    from zoo import ZooForCausalLM

    registry_restored.register_mixer("custom_keywords")(KeywordsMixer)
    model = ZooForCausalLM(ZooConfig(vocab_size=32, d_model=16, layers="X", ffn="none",
                                     mixers={"X": {"type": "custom_keywords"}}))
    ids = torch.randint(0, 32, (1, 5))
    assert model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.shape == (1, 5, 32)


def test_register_mixer_without_a_name_is_refused(registry_restored):
    """`@register_mixer` without its name (a common slip for a decorator that takes one) replaced the class with the
    decorator's inner function and registered nothing: a config naming the mixer then read 'unknown mixer ... import
    the module that registers it', though that module had run."""
    with pytest.raises(TypeError, match=r"write @register_mixer\('keywordsmixer'\) above class KeywordsMixer"):
        registry_restored.register_mixer(KeywordsMixer)
    with pytest.raises(TypeError, match="non-empty string"):
        registry_restored.register_mixer("")


def test_a_mixer_name_with_a_dot_is_refused_at_registration(registry_restored, tmp_path):
    """register_mixer("team.ema") was taken, and a model saved with it named type 'team.ema': loaded in a process that
    had not registered it (the case the refusal of an unregistered name explains), it read as a dotted import path:
    'loading it runs code. Pass trust_remote_code=True', and with that, 'No module named team'."""
    with pytest.raises(ValueError, match=r"register_mixer: 'team\.ema' has a '\.', .*dotted import path.*'team_ema'"):
        registry_restored.register_mixer("team.ema")(KeywordsMixer)
    assert "team.ema" not in registry_restored.list_mixers()


def test_lora_targets_given_as_a_string_are_refused_at_registration(registry_restored):
    """A mixer with lora_targets = "proj" (a string, not a tuple) was registered and its letters joined PEFT's default
    LoRA targets for every zoo model one by one ('p', 'r', 'o', 'j'): LoraConfig() without target_modules matched
    none of them and left the mixer's projection unadapted without a word."""

    class StringTargets(KeywordsMixer):
        lora_targets = "proj"

    before = list(registry_restored.LORA_TARGETS)
    with pytest.raises(ValueError, match=r"StringTargets\.lora_targets: expected a tuple .* e\.g\. \('proj',\)"):
        registry_restored.register_mixer("string_targets")(StringTargets)
    assert registry_restored.LORA_TARGETS == before and "string_targets" not in registry_restored.list_mixers()


SHIPPED = sorted(p for p in (CONFIGS.parent).rglob("*.yaml") if p.parent != CONFIGS)


def _command_of(path: Path) -> str:
    """The command a shipped config is for: its folder's, or, under configs/train/, the first command its header
    comments give it to (`zoo finetune FILE`, `python scripts/NAME.py FILE`; zoo train's own name zoo train)."""
    if path.parent.name != "train":
        return path.parent.name
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        found = re.search(rf"(zoo [a-z-]+|scripts/[\w-]+\.py) \S*{re.escape(path.name)}", line)
        if found:
            return found.group(1)
    return "zoo train"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_loads_with_its_commands_loader(path):
    """test_every_model_config_validates covers configs/models/; the recipes of zoo train (pretrain-130m,
    long-context-tbptt), the accelerate configs (single_gpu) and others were loaded by no test, so a field renamed in
    code would have left a shipped config that its documented command refuses."""
    command = _command_of(path)
    if command == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(str(path)).compute_environment.value == "LOCAL_MACHINE"
    elif command == "compare":
        from zoo.compare import load_compare_config, resolve_models, validate_compare_config

        cfg, folder = load_compare_config(path)
        validate_compare_config(cfg)
        assert resolve_models(cfg, folder)
    elif command in ("zoo train", "scripts/train.py"):
        from zoo.train import load_config

        cfg = load_config(path)
        assert cfg.train.max_steps > 0 and ZooConfig.from_yaml(cfg.model).num_hidden_layers > 0
    elif command == "zoo finetune":
        from zoo.finetune import load_finetune_config

        assert load_finetune_config(path).data is not None
    elif command == "scripts/train_synthetic.py":
        script = load_script(command)
        assert script.expand_runs(script.load_recipe(path))
    elif command in ("scripts/state_capacity.py", "scripts/collapse.py"):
        script = load_script("scripts/state_capacity.py")
        assert script.expand_runs(script.load_sweep(path))
    else:
        pytest.fail(f"{path.relative_to(CONFIGS.parents[1])}: no loader known for its command {command!r}")
