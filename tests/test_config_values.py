"""ZooConfig field values: YAML's numeric strings, transformers' field names, types, and load-time overrides."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from zoo import ZooConfig
from zoo.mixers.attention import Attention
from zoo.mixers.gla import GLA
from zoo.mixers.mamba import Mamba
from zoo.mixers.mamba2 import Mamba2

# PyYAML reads a float without a dot (1e-5) as the string '1e-5'
EXPONENTS = """\
vocab_size: 64
d_model: 32
norm_eps: 1e-5
initializer_range: 2e-2
layers: MAG
mixers:
  M: {type: mamba, d_state: 4, dt_min: 1e-3, dt_max: 1e-1}
  A: {type: attention, n_heads: 2, rope_theta: 1e4}
  G: {type: gla, n_heads: 2, gate_logit_normalizer: 16e0}
ffn: {type: swiglu, hidden: 64}
moe: {every: 2, n_experts: 2, top_k: 1, aux_loss_coef: 1e-3}
"""


def _yaml(tmp_path, text: str):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def _tiny(**fields) -> ZooConfig:
    return ZooConfig(**{"vocab_size": 64, "d_model": 32, "layers": "M", "ffn": "none",
                        "mixers": {"M": {"type": "mamba", "d_state": 4}}} | fields)


def test_yaml_exponents_become_numbers_and_stay_numbers_in_config_json(tmp_path):
    config = ZooConfig.from_yaml(_yaml(tmp_path, EXPONENTS))
    assert config.norm_eps == 1e-5 and config.initializer_range == 0.02
    assert config.mixers["M"]["dt_min"] == 1e-3 and config.mixers["A"]["rope_theta"] == 1e4
    assert config.mixers["G"]["gate_logit_normalizer"] == 16.0 and config.moe["aux_loss_coef"] == 1e-3
    AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["norm_eps"] == 1e-5 and saved["mixers"]["A"]["rope_theta"] == 1e4
    assert saved["mixers"]["M"]["dt_min"] == 1e-3 and saved["moe"]["aux_loss_coef"] == 1e-3
    again = ZooConfig.from_pretrained(tmp_path / "saved")
    assert again.layer_specs() == config.layer_specs() and again.norm_eps == config.norm_eps


def test_an_integer_where_a_float_is_expected_is_kept_as_written():
    config = _tiny(mixers={"M": {"type": "mamba", "d_state": 4, "expand": 2}})
    assert config.mixers["M"]["expand"] == 2 and isinstance(config.mixers["M"]["expand"], int)


def test_a_whole_number_written_as_a_string_or_float_fills_an_integer_field(tmp_path):
    config = ZooConfig.from_yaml(_yaml(tmp_path, "d_model: 64\nvocab_size: 5e2\nmixers:\n  M: {type: mamba, "
                                                 "d_state: '16', d_conv: 4.0}\n"))
    assert (config.vocab_size, config.mixers["M"]["d_state"], config.mixers["M"]["d_conv"]) == (500, 16, 4)
    assert all(type(v) is int for v in (config.vocab_size, config.mixers["M"]["d_state"], config.mixers["M"]["d_conv"]))


NOT_NUMBERS = [
    ("norm-eps", "norm_eps: tiny\n", "norm_eps"),
    ("initializer-range", "initializer_range: [0.02]\n", "initializer_range"),
    ("dt-min", "mixers:\n  M: {type: mamba, dt_min: fast}\n", "mixers.M.dt_min"),
    ("rope-theta", "layers: A\nmixers:\n  A: {type: attention, n_heads: 4, rope_theta: 1e4x}\n",
     "mixers.A.rope_theta"),
    ("aux-loss-coef", "moe: {n_experts: 4, aux_loss_coef: some}\n", "moe.aux_loss_coef"),
    ("int-not-whole", "mixers:\n  M: {type: mamba, d_state: '16.5'}\n", "mixers.M.d_state"),
    ("int-as-word", "mixers:\n  M: {type: mamba, d_conv: four}\n", "mixers.M.d_conv"),
    ("list-layers", "layers:\n  - {type: mamba, dt_max: big}\n", "layers[0].dt_max"),
]


@pytest.mark.parametrize("text,field", [(t, f) for _, t, f in NOT_NUMBERS], ids=[n for n, _, _ in NOT_NUMBERS])
def test_a_non_numeric_value_where_a_number_is_expected_is_refused_by_name(tmp_path, text, field):
    with pytest.raises(ValueError) as info:
        ZooConfig.from_yaml(_yaml(tmp_path, "d_model: 64\n" + text))
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_mixers_built_directly_refuse_strings_by_name():
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(32, dt_min="1e-3")
    with pytest.raises(ValueError, match="rope_theta"):
        Attention(32, n_heads=2, rope_theta="1e4")
    with pytest.raises(ValueError, match="expand_k"):
        GLA(32, n_heads=2, expand_k="0.5")


# ---- transformers' names of zoo fields ------------------------------------------------------------------

def test_tie_word_embeddings_is_tie_embeddings(tmp_path):
    config = _tiny(tie_word_embeddings=False)
    assert config.tie_embeddings is False and config.tie_word_embeddings is False
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is not model.model.embeddings.weight
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tie_embeddings"] is False and "tie_word_embeddings" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight is not loaded.model.embeddings.weight
    tied = AutoModelForCausalLM.from_config(_tiny())
    assert tied.config.tie_word_embeddings is True and tied.lm_head.weight is tied.model.embeddings.weight


def test_tie_word_embeddings_and_tie_embeddings_stay_one_field():
    config = _tiny()
    config.tie_word_embeddings = False
    assert config.tie_embeddings is False
    config.tie_embeddings = True
    assert config.tie_word_embeddings is True
    assert _tiny(tie_embeddings=False, tie_word_embeddings=False).tie_embeddings is False
    with pytest.raises(ValueError, match="tie_word_embeddings.*tie_embeddings"):
        _tiny(tie_embeddings=True, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings: expected true or false"):
        _tiny(tie_word_embeddings="no")


def test_a_config_json_with_both_tie_names_still_loads(tmp_path):
    data = _tiny(tie_embeddings=False).to_dict() | {"tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert AutoConfig.from_pretrained(tmp_path).tie_embeddings is False


def test_num_hidden_layers_must_agree_with_the_pattern(tmp_path):
    assert _tiny(layers="MMM", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match=r"num_hidden_layers: 7 disagrees with layers 'MMM' \(3 layers\)"):
        _tiny(layers="MMM", num_hidden_layers=7)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ZooConfig.from_yaml(_yaml(tmp_path, "layers: MM\nnum_hidden_layers: 4\n"))


def test_hidden_size_is_d_model():
    assert _tiny(d_model=None, hidden_size=48).d_model == 48
    assert ZooConfig(hidden_size=64, d_model=64).hidden_size == 64
    assert ZooConfig().d_model == 768 and ZooConfig().tie_embeddings is True
    with pytest.raises(ValueError, match="hidden_size: 32 disagrees with d_model: 64"):
        ZooConfig(hidden_size=32, d_model=64)


# ---- types and ranges ---------------------------------------------------------------------------------

BAD = [
    ("gla-chunk-zero", dict(d_model=32, layers="G", mixers={"G": {"type": "gla", "n_heads": 2, "chunk_size": 0}}),
     "chunk_size"),
    ("gla-chunk-negative", dict(d_model=32, layers="G",
                                mixers={"G": {"type": "gla", "n_heads": 2, "chunk_size": -4}}), "chunk_size"),
    ("gla-chunk-string", dict(d_model=32, layers="G",
                              mixers={"G": {"type": "gla", "n_heads": 2, "chunk_size": "16.5"}}), "chunk_size"),
    ("normalize-topk", dict(moe={"n_experts": 4, "normalize_topk": "no"}), "moe.normalize_topk"),
    ("moe-offset-string", dict(moe={"n_experts": 4, "offset": "one"}), "moe.offset"),
    ("residual-in-fp32", dict(residual_in_fp32="no"), "residual_in_fp32"),
    ("rescale-prenorm", dict(rescale_prenorm_residual=1), "rescale_prenorm_residual"),
    ("attention-zero-heads", dict(d_model=64, layers="A", mixers={"A": {"type": "attention", "n_heads": 0}}),
     "n_heads"),
    ("rope-flag", dict(d_model=64, layers="A", mixers={"A": {"type": "attention", "rope": "no"}}), "rope"),
    ("vocab-string", dict(vocab_size="512 tokens"), "vocab_size"),
    # the log decay divides by it: 0 gave NaN logits, a negative one a growing state
    ("gla-zero-gate-normalizer", dict(d_model=64, layers="G",
                                      mixers={"G": {"type": "gla", "gate_logit_normalizer": 0}}),
     "gate_logit_normalizer: must be > 0"),
    ("gla-negative-gate-normalizer", dict(d_model=64, layers="G",
                                          mixers={"G": {"type": "gla", "gate_logit_normalizer": -1.0}}),
     "gate_logit_normalizer: must be > 0"),
    # a backend name was only read at the first forward: on CPU 'cuda2' read "not available on cpu ... needs a CUDA
    # device", and neither that nor attention's "unknown attention backend" named the field
    ("mamba-unknown-backend", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba", "scan_backend": "cuda2"}}),
     "scan_backend: unknown backend 'cuda2'"),
    ("mamba2-unknown-backend", dict(d_model=64, layers="M", mixers={"M": {"type": "mamba2", "scan_backend": "fla"}}),
     "scan_backend: unknown backend 'fla'"),
    ("gla-unknown-backend", dict(d_model=64, layers="G", mixers={"G": {"type": "gla", "scan_backend": "cuda"}}),
     "scan_backend: unknown backend 'cuda'"),
    # GLA has no Triton chunk kernel of zoo's (its Triton kernel is the decode step's): 'triton' was accepted and
    # failed at the first forward on a GPU ("this build has 'fla' only"), on CPU at the first forward too
    ("gla-triton-backend", dict(d_model=64, layers="G", mixers={"G": {"type": "gla", "scan_backend": "triton"}}),
     "scan_backend: unknown backend 'triton'; choose one of auto, ref, fla"),
    ("attention-unknown-backend", dict(d_model=64, layers="A",
                                       mixers={"A": {"type": "attention", "attn_backend": "flash"}}),
     "attn_backend: unknown backend 'flash'"),
]


@pytest.mark.parametrize("kwargs,field", [(k, f) for _, k, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_value_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        ZooConfig(**kwargs)
    assert field in str(info.value), str(info.value)


def test_gla_refuses_a_bad_chunk_size_or_gate_normalizer_when_built_directly():
    with pytest.raises(ValueError, match="chunk_size"):
        GLA(32, n_heads=2, chunk_size=0)
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        GLA(32, n_heads=2, gate_logit_normalizer=0)


# ---- overrides given at load time ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo-config")
    AutoModelForCausalLM.from_config(_tiny()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("override,field", [
    (dict(decode_state_dtype="bf16"), "decode_state_dtype"),
    (dict(norm_eps="small"), "norm_eps"),
    (dict(num_hidden_layers=3), "num_hidden_layers"),
    (dict(d_model=-1), "d_model"),
    (dict(mixers={"M": {"type": "mamba", "d_state": 0}}), "d_state"),
], ids=["decode-state-dtype", "norm-eps", "num-hidden-layers", "d-model", "mixer-spec"])
def test_a_bad_override_at_load_time_is_refused(saved, override, field):
    with pytest.raises(ValueError, match=field):
        AutoConfig.from_pretrained(saved, **override)
    with pytest.raises(ValueError, match=field):
        AutoModelForCausalLM.from_pretrained(saved, **override)


def test_a_good_override_at_load_time_is_applied_and_coerced(saved):
    config = AutoConfig.from_pretrained(saved, norm_eps="1e-6", decode_state_dtype="model", num_hidden_layers=1)
    assert config.norm_eps == 1e-6 and config.decode_state_dtype == "model" and config.num_hidden_layers == 1
    model = AutoModelForCausalLM.from_pretrained(saved, tie_word_embeddings=False)
    assert model.config.tie_embeddings is False


def test_num_hidden_layers_set_on_a_made_config_is_refused_not_ignored():
    """config.num_hidden_layers = 2 before from_config (transformers' way to shrink a model) was kept and ignored:
    the model got every layer of `layers` and the count was reset to it. It is refused at the assignment, naming
    the field; the count follows a `layers` set later at once, not only when a model is built."""
    config = _tiny(layers="MMMM")
    with pytest.raises(ValueError, match=r"num_hidden_layers: 2 disagrees with layers 'MMMM' \(4 layers\)"):
        config.num_hidden_layers = 2
    config.num_hidden_layers = 4  # the same count is taken
    config.layers = "MM"
    assert config.num_hidden_layers == 2
    assert len(AutoModelForCausalLM.from_config(config).model.layers) == 2


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 0, "vocab_size: must be a positive integer"),
    ("ffn", {"type": "swiglu", "hidden": -5}, "ffn.hidden: must be a positive integer"),
    ("moe", {"n_experts": 2, "every": 2, "offset": 5}, "moe.offset: must be in"),
    ("decode_state_dtype", "bf16", "decode_state_dtype: must be one of"),
], ids=["vocab-size", "ffn-hidden", "moe-offset", "decode-state-dtype"])
def test_a_field_set_on_a_made_config_is_checked_when_a_model_is_built(field, value, message):
    """transformers' users edit a config before from_config; zoo checked the fields only in the constructor, so
    vocab_size 0 built an empty embedding, a moe offset past every built no expert, a bad decode_state_dtype was
    kept, and a negative ffn hidden failed in torch naming no field."""
    config = _tiny()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("spec,field", [
    ({"type": "gla", "n_heads": 2, "norm_eps": -1.0}, "norm_eps"),
    ({"type": "gla", "n_heads": 2, "norm_eps": 0}, "norm_eps"),
    ({"type": "mamba2", "head_dim": 16, "d_state": 16, "norm_eps": -1e-5}, "norm_eps"),
    ({"type": "mamba", "inner_norms": True, "inner_norm_eps": -1.0}, "inner_norm_eps"),
    ({"type": "mamba", "inner_norms": True, "inner_norm_eps": float("nan")}, "inner_norm_eps"),
], ids=["gla-negative", "gla-zero", "mamba2-negative", "mamba-inner-negative", "mamba-inner-nan"])
def test_a_mixers_norm_eps_must_be_positive(spec, field):
    """The mixers' own RMSNorm epsilons were not checked (the top-level norm_eps was): a negative one built a model
    whose logits were NaN, without a word."""
    with pytest.raises(ValueError, match=f"{field}: must be a finite number > 0"):
        ZooConfig(vocab_size=64, d_model=32, layers="X", mixers={"X": spec})
    cls = {"gla": GLA, "mamba": Mamba, "mamba2": Mamba2}[spec["type"]]
    with pytest.raises(ValueError, match=field):
        cls(32, **{k: v for k, v in spec.items() if k != "type"})


def test_a_yaml_override_under_transformers_name_replaces_the_field(tmp_path):
    """from_yaml(path, hidden_size=128) (a run's model_overrides) was refused as disagreeing with the file's d_model
    ('give one of them'), though overrides replace fields, and AutoConfig.from_pretrained(folder, hidden_size=128)
    takes it."""
    path = _yaml(tmp_path, "vocab_size: 64\nd_model: 32\nlayers: M\nffn: none\nmixers: {M: {type: mamba}}\n"
                           "tie_embeddings: true\n")
    assert ZooConfig.from_yaml(path, hidden_size=48).d_model == 48
    assert ZooConfig.from_yaml(path, tie_word_embeddings=False).tie_embeddings is False
    with pytest.raises(ValueError, match="hidden_size: 48 disagrees with d_model: 40"):
        ZooConfig.from_yaml(path, hidden_size=48, d_model=40)  # both given as overrides: still one field


@pytest.mark.parametrize("kwargs", [dict(hidden_size=48, d_model=40), dict(d_model=40, hidden_size=48),
                                    dict(tie_word_embeddings=True, tie_embeddings=False)], ids=str)
def test_from_pretrained_refuses_a_field_and_its_alias_that_disagree(tmp_path, kwargs):
    """from_pretrained(folder, hidden_size=48, d_model=40) kept whichever keyword came last without a word (transformers
    sets them one after the other), where the constructor refuses the two; the same values under both names load."""
    config = ZooConfig(vocab_size=64, d_model=32, layers="M", ffn="none", mixers={"M": {"type": "mamba"}})
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="disagrees with"):
        ZooConfig.from_pretrained(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="disagrees with"):
        ZooConfig.from_dict(ZooConfig.from_pretrained(tmp_path).to_dict(), **kwargs)
    assert ZooConfig.from_pretrained(tmp_path, hidden_size=48, d_model=48).d_model == 48


INF = float("inf")


@pytest.mark.parametrize("fields,message", [
    (dict(layers="M", mixers={"M": {"type": "mamba", "expand": INF}}), "expand: must be > 0 with expand·d_model"),
    (dict(layers="M", mixers={"M": {"type": "mamba2", "head_dim": 16, "d_state": 16, "expand": INF}}),
     "expand: must be > 0 with expand·d_model"),
    (dict(layers="G", mixers={"G": {"type": "gla", "n_heads": 2, "expand_v": INF}}), "expand_v: d_model·expand_v"),
    (dict(layers="M", mixers={"M": {"type": "mamba", "dt_max": INF}}), "dt_min/dt_max: need"),
    (dict(layers="M", mixers={"M": {"type": "mamba2", "head_dim": 16, "d_state": 16, "dt_max": INF}}),
     "dt_min/dt_max: need"),
    (dict(initializer_range=INF), "initializer_range: must be a finite number > 0"),
    (dict(norm_eps=INF), "norm_eps: must be a finite number > 0"),
], ids=["mamba-expand", "mamba2-expand", "gla-expand-v", "mamba-dt-max", "mamba2-dt-max", "initializer-range",
        "norm-eps"])
def test_an_infinite_value_is_refused_naming_the_field(fields, message):
    """YAML's .inf: an infinite expand raised OverflowError naming no field; an infinite dt_max or initializer_range
    built a model whose logits were NaN, an infinite norm_eps one whose normalized inputs were all zero."""
    with pytest.raises(ValueError, match=message):
        ZooConfig(**{"vocab_size": 64, "d_model": 32} | fields)


def test_save_pretrained_refuses_a_field_set_to_a_bad_value(tmp_path):
    """transformers validates a config before save_pretrained writes it; zoo's checks were not among its
    validators, so config.json was written with vocab_size 0 and the folder then failed to load."""
    config = _tiny()
    config.vocab_size = 0
    with pytest.raises(ValueError, match="vocab_size: must be a positive integer"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    config.vocab_size = 64
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == 64
