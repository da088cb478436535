"""Hybrid surgery: grafted layers compute what they computed in their source, and the hybrid trains."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

import zoo  # noqa: F401  (registers the Auto classes)
from zoo import ZooConfig, ZooForCausalLM
from zoo.convert import from_hf_llama, from_hf_mamba
from zoo.surgery import graft, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
FRESH = {"N": {"type": "mamba2", "d_state": 16, "head_dim": 16, "chunk_size": 8}}


def perturbed(config: ZooConfig, seed: int) -> ZooForCausalLM:
    torch.manual_seed(seed)
    model = ZooForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model.eval()


@pytest.fixture(scope="module")
def base() -> ZooForCausalLM:
    return perturbed(ZooConfig.from_yaml(CONFIGS / "transformerpp-tiny.yaml", layers="AAAA"), 0)


@pytest.fixture(scope="module")
def donor() -> ZooForCausalLM:
    return perturbed(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml"), 1)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_grafted_layers_equal_their_sources(base, donor):
    hybrid = graft(base, "AM AM", donor, donor_layers=[3, 0]).eval()
    assert [s["type"] for s in hybrid.config.layer_specs()] == ["attention", "mamba", "attention", "mamba"]
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        for i, source in ((0, base.model.layers[0].mixer), (1, donor.model.layers[3].mixer),
                          (2, base.model.layers[2].mixer), (3, donor.model.layers[0].mixer)):
            assert torch.equal(hybrid.model.layers[i].mixer(x), source(x)), f"layer {i} mixer differs"
        for i in range(4):  # norms and MLPs are the base's everywhere
            for part in ("norm", "ffn_norm", "ffn"):
                assert same(getattr(hybrid.model.layers[i], part), getattr(base.model.layers[i], part)), (i, part)
        for i in (0, 2):  # kept layers are the base's whole blocks
            assert torch.equal(hybrid.model.layers[i](x)[0], base.model.layers[i](x)[0])
    assert same(hybrid.model.embeddings, base.model.embeddings) and same(hybrid.model.norm_f, base.model.norm_f)
    assert same(hybrid.lm_head, base.lm_head)


def test_keep_all_is_the_base_and_sources_are_untouched(base, donor):
    before = {k: v.clone() for k, v in donor.state_dict().items()}
    ids = torch.randint(0, 512, (2, 10))
    kept = graft(base, "AAAA")
    assert not kept.training  # the base's mode (an eval base gave a hybrid in train mode, dropout on)
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, base(ids).logits)
    hybrid = graft(base, "MMMM", donor, mixer_norm="donor")
    with torch.no_grad():
        for p in hybrid.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in before.items())
    assert torch.equal(graft(base, "MAAA", donor, mixer_norm="donor").model.layers[0].norm.weight,
                       donor.model.layers[0].norm.weight)


def test_fresh_mixers_replace_attention(base):
    torch.manual_seed(0)
    hybrid = graft(base, "ANAN", mixers=FRESH, seed=3).eval()
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after), "graft(seed=) must leave the caller's RNG where it was"
    again = graft(base, "ANAN", mixers=FRESH, seed=3)
    assert same(hybrid, again), "the seed must fix the fresh mixers"
    assert [s["type"] for s in hybrid.config.layer_specs()] == ["attention", "mamba2", "attention", "mamba2"]
    assert not same(hybrid, graft(base, "ANAN", mixers=FRESH, seed=4))
    assert same(hybrid.model.layers[0], base.model.layers[0]) and same(hybrid.model.layers[1].ffn,
                                                                       base.model.layers[1].ffn)
    assert same(hybrid.model.layers[1].norm, base.model.layers[1].norm)  # a fresh mixer keeps the base's norm


def test_hybrid_trains(base, donor):
    # a grafted Mamba and a fresh Mamba-1 (the chunked Mamba-2 reference is slow to differentiate on CPU)
    hybrid = graft(base, "AMAN", donor, mixers={"N": {"type": "mamba", "d_state": 8}}).train()
    opt = torch.optim.AdamW(hybrid.parameters(), lr=3e-3)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    losses = []
    for _ in range(6):
        loss = hybrid(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], f"loss did not drop: {losses}"


@pytest.mark.parametrize("args,message", [
    (("AMA",), "3 letters"),
    (("AMAM",), "no donor"),
    (("AXAM", "donor"), "'X'"),
    (("AMAM", "donor", [0]), "donor_layers"),
    (("AMAM", "narrow"), "d_model"),
    (("ANAN", "fresh-A"), "'A' means keep"),  # it built the layer's spec but copied the base's weights into it
    (("AAAA", "fresh"), "'N' is no letter of the pattern 'AAAA'"),  # it wrote the base back, the mixer dropped
    # a fresh mixer's own ffn was replaced by the base layer's without a word (the hybrid kept the MLP asked away)
    (("ANAN", "fresh-ffn"), r"mixers.N: ffn 'none' differs from the base's feed-forward at layer 1 \('swiglu'\)"),
], ids=["length", "no-donor", "letter", "donor-layers", "width", "fresh-keep-letter", "fresh-unused", "fresh-ffn"])
def test_bad_surgery_is_a_named_error(base, donor, args, message):
    narrow = perturbed(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", d_model=32), 2)
    pattern, *rest = args
    kwargs = {}
    if rest == ["fresh-A"]:
        rest, kwargs["mixers"] = [], FRESH | {"A": {"type": "attention", "n_heads": 2}}
    if rest == ["fresh"]:
        rest, kwargs["mixers"] = [], FRESH
    if rest == ["fresh-ffn"]:
        rest, kwargs["mixers"] = [], {"N": FRESH["N"] | {"ffn": "none"}}
    if rest:
        kwargs["donor"] = donor if rest[0] == "donor" else narrow
    if len(rest) > 1:
        kwargs["donor_layers"] = rest[1]
    with pytest.raises(ValueError, match=message):
        graft(base, pattern, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"donor_layers": [3, -1]}, r"index -1 \(for layer 3\) is outside the donor's 4 layers"),
    ({"donor_layers": [3, 4]}, r"index 4 \(for layer 3\) is outside the donor's 4 layers"),
    ({"mixers": {"M": FRESH["N"]}}, "'M' means the donor's mixer"),
    ({"pattern": "AAAA", "donor": None, "donor_layers": [0]}, "donor_layers: given without a donor"),
    ({"donor": "other-eps", "mixer_norm": "donor"}, r"mixer_norm: 'donor' needs equal norm_eps \(donor 0.001"),
    ({"pattern": "AAAA", "donor": None, "mixer_norm": "donor"}, r"mixer_norm: 'donor' .* 'AAAA' grafts none"),
    ({"pattern": "ANAN", "mixers": FRESH, "mixer_norm": "donor"}, r"mixer_norm: 'donor' .* 'ANAN' grafts none"),
], ids=["negative-layer", "layer-past-end", "fresh-M-with-donor", "layers-without-donor", "donor-norm-eps",
        "donor-norm-without-donor", "donor-norm-nothing-grafted"])
def test_bad_donor_choices_are_named_errors(base, donor, kwargs, message):
    # without each check the graft went on: a KeyError or IndexError of the donor's layers, a fresh 'M' instead of
    # the donor's, donor_layers ignored, the donor's norm used with the base's epsilon, mixer_norm='donor' ignored
    # where no layer comes from the donor
    kwargs = {"donor": donor} | kwargs
    if kwargs["donor"] == "other-eps":
        kwargs["donor"] = perturbed(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", norm_eps=1e-3), 2)
    with pytest.raises(ValueError, match=message):
        graft(base, kwargs.pop("pattern", "AMAM"), **kwargs)


def test_cli_grafts_transformers_checkpoints(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    mamba = MambaForCausalLM(MambaConfig(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=8)).eval()
    llama.save_pretrained(tmp_path / "llama")
    mamba.save_pretrained(tmp_path / "mamba")
    main([str(tmp_path / "hybrid"), "--base", str(tmp_path / "llama"), "--donor", str(tmp_path / "mamba"),
          "--pattern", "AMAM", "--donor-layers", "2,6"])
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    zoo_llama, zoo_mamba = from_hf_llama(llama), from_hf_mamba(mamba)
    assert same(hybrid.model.layers[1].mixer, zoo_mamba.model.layers[2].mixer)
    assert same(hybrid.model.layers[3].mixer, zoo_mamba.model.layers[6].mixer)
    assert same(hybrid.model.layers[2], zoo_llama.model.layers[2])
    assert same(hybrid.model.embeddings, zoo_llama.model.embeddings)
    # a bf16 base with an fp32 donor: the hybrid is fp32 (nothing rounded) unless --dtype asks for the base's
    llama.to(torch.bfloat16).save_pretrained(tmp_path / "llama16")
    for dtype, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main([str(tmp_path / f"hybrid-{dtype}"), "--base", str(tmp_path / "llama16"), "--donor",
                  str(tmp_path / "mamba"), "--pattern", "AMAM", f"--dtype={dtype}"])
        # the widening warning's advice (cast with --dtype) only where --dtype was not given
        assert sum("graft: the hybrid is" in str(w.message) for w in caught) == (dtype == "auto"), dtype
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / f"hybrid-{dtype}", dtype="auto")
        assert next(saved.parameters()).dtype == expected, dtype
        # Mamba's A_log and D stay fp32 in the file too, as from_pretrained keeps them (--dtype cast them)
        from safetensors import safe_open

        with safe_open(str(tmp_path / f"hybrid-{dtype}" / "model.safetensors"), "pt") as f:
            kept = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith((".A_log", ".D"))}
        assert kept and set(kept.values()) == {"F32"}, kept


def test_graft_keeps_the_base_generation_config(base, donor):
    # the hybrid's generation config was rebuilt from the config: the base's extra eos ids and sampling defaults
    # were lost
    from transformers import GenerationConfig

    base.generation_config = GenerationConfig(eos_token_id=[2, 7], do_sample=True, top_p=0.9)
    try:
        generation = graft(base, "AMAM", donor).generation_config
        assert generation.eos_token_id == [2, 7] and generation.do_sample and generation.top_p == 0.9
        generation.top_p = 0.5  # a copy: the hybrid's settings are not the base's
        assert base.generation_config.top_p == 0.9
    finally:
        base.generation_config = GenerationConfig.from_model_config(base.config)


def test_cli_max_shard_size_in_bytes(tmp_path):
    # save_pretrained takes a byte count as well as '5GB'; the CLI passed '20000' on as a string ("Unit '00'")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    MambaForCausalLM(MambaConfig(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=2)
                     ).save_pretrained(tmp_path / "mamba")
    main([str(tmp_path / "hybrid"), "--base", str(tmp_path / "llama"), "--donor", str(tmp_path / "mamba"),
          "--pattern", "AM", "--max-shard-size", "20000"])
    assert (tmp_path / "hybrid" / "model.safetensors.index.json").is_file()


def test_cli_refuses_a_donor_the_pattern_takes_nothing_from(tmp_path, capsys):
    # --donor with a pattern of no 'M' (keep-only, or fresh mixers only) loaded the donor and wrote the hybrid without
    # any of its layers, without a word
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    MambaForCausalLM(MambaConfig(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=2)
                     ).save_pretrained(tmp_path / "mamba")
    folders = ["--base", str(tmp_path / "llama"), "--donor", str(tmp_path / "mamba")]
    for pattern, extra in (("AA", []), ("AN", ["--mixers", "{N: {type: mamba, d_state: 8}}"])):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "hybrid"), *folders, "--pattern", pattern, *extra])
        assert e.value.code == 2
        assert f"--donor: the pattern '{pattern}' has no 'M'" in capsys.readouterr().err
        assert not (tmp_path / "hybrid").exists()
    main([str(tmp_path / "hybrid"), *folders, "--pattern", "AM"])  # a pattern that takes a donor layer
    assert (tmp_path / "hybrid" / "config.json").is_file()


def test_cli_refuses_a_seed_without_fresh_mixers(tmp_path, capsys):
    # --seed seeds the fresh mixers alone: without --mixers it was taken and changed nothing
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    base = ["--base", str(tmp_path / "llama")]
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "hybrid"), *base, "--pattern", "AA", "--seed", "3"])
    assert e.value.code == 2 and "--seed seeds the fresh mixers of --mixers" in capsys.readouterr().err
    assert not (tmp_path / "hybrid").exists()
    fresh = ["--pattern", "AN", "--mixers", "{N: {type: mamba, d_state: 8}}"]
    for name, seed in (("a", ["--seed", "3"]), ("b", ["--seed", "3"]), ("c", ["--seed", "4"]), ("d", [])):
        main([str(tmp_path / name), *base, *fresh, *seed])
    a, b, c, d = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in "abcd")
    assert same(a, b) and not same(a, c)  # the seed still chooses the fresh mixers' weights
    assert same(d, graft(from_hf_llama(LlamaForCausalLM.from_pretrained(tmp_path / "llama")), "AN",
                         mixers={"N": {"type": "mamba", "d_state": 8}}, seed=0))  # by default, seed 0 as before


def test_cli_names_bad_donor_layers(tmp_path, capsys):
    # `--donor-layers x` ended in "invalid literal for int() with base 10: 'x'", naming no option
    with pytest.raises(SystemExit):
        main([str(tmp_path / "hybrid"), "--base", str(tmp_path), "--pattern", "AM", "--donor-layers", "1,x"])
    assert "--donor-layers: expected comma-separated layer indices" in capsys.readouterr().err


def test_mixers_file_that_does_not_exist_is_named(tmp_path):
    # a missing --mixers file was parsed as a YAML string: "expected {letter: {type: ...}}, got 'mixers.yaml'"
    from zoo.surgery import _read_mixers

    with pytest.raises(ValueError, match=r"--mixers: no such file '.*mixers\.yaml'"):
        _read_mixers(str(tmp_path / "mixers.yaml"))
    (tmp_path / "mixers.yaml").write_text("M: {type: mamba, d_state: 8}\n")
    assert _read_mixers(str(tmp_path / "mixers.yaml")) == {"M": {"type": "mamba", "d_state": 8}}
    assert _read_mixers("{M: {type: mamba}}") == {"M": {"type": "mamba"}}  # inline YAML as before
    (tmp_path / "model.yaml").write_text("d_model: 64\nmixers: {M: {type: mamba, d_state: 8}}\n")  # a model config
    assert _read_mixers(str(tmp_path / "model.yaml")) == {"M": {"type": "mamba", "d_state": 8}}



def test_long_inline_mixers_are_read_as_yaml():
    # inline --mixers YAML longer than a file name may be (255 bytes) ended in OSError: [Errno 36] File name too long
    from zoo.surgery import _read_mixers

    specs = {letter: {"type": "mamba2", "d_state": 16, "head_dim": 16, "chunk_size": 8, "dt_min": 0.001,
                      "dt_max": 0.1, "conv_bias": True, "bias": False} for letter in "NPQ"}
    text = "{" + ", ".join(f"{k}: {{" + ", ".join(f"{n}: {str(v).lower()}" for n, v in spec.items()) + "}"
                           for k, spec in specs.items()) + "}"
    assert len(text) > 255
    assert _read_mixers(text) == specs

def test_an_fp32_donor_is_not_rounded_to_a_bf16_base(base, donor):
    # the hybrid took the base's dtype: a bf16 base rounded the donor's A_log, D, dt bias and projections to bf16
    # without a word, so a grafted mixer no longer computed what it computed in the donor
    base16 = ZooForCausalLM(base.config).to(torch.bfloat16)
    base16.load_state_dict(base.state_dict())
    with pytest.warns(UserWarning, match=r"graft: the hybrid is torch.float32 .* cast it with .to\(torch.bfloat16\)"):
        hybrid = graft(base16.eval(), "AMAM", donor).eval()
    assert hybrid.dtype == torch.float32
    assert same(hybrid.model.layers[1].mixer, donor.model.layers[1].mixer)
    assert same(hybrid.model.layers[0], copy.deepcopy(base16.model.layers[0]).float())  # bf16 -> fp32 is exact
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        assert torch.equal(hybrid.model.layers[3].mixer(x), donor.model.layers[3].mixer(x))
    with warnings.catch_warnings():  # a donor no wider than the base changes nothing, and says nothing
        warnings.simplefilter("error")
        assert graft(base, "AMAM", copy.deepcopy(donor).to(torch.bfloat16)).dtype == torch.float32
        assert graft(base16, "AAAA", donor).dtype == torch.bfloat16  # nothing grafted: the base's dtype
        # a bf16 donor keeps A_log and D in fp32 (as from_pretrained loads it): they do not widen the hybrid
        donor16 = copy.deepcopy(donor).to(torch.bfloat16)
        donor16.keep_fp32_parameters()
        assert graft(base16, "AMAM", donor16).dtype == torch.bfloat16
    # a fresh Mamba in a bf16 hybrid keeps A_log and D in fp32, as from_pretrained would
    fresh = graft(base16, "ANAN", mixers={"N": {"type": "mamba", "d_state": 8}})
    assert fresh.dtype == torch.bfloat16 and fresh.model.layers[1].mixer.A_log.dtype == torch.float32


@pytest.mark.parametrize("spec,message", [
    ({"type": "mamba2", "d_stat": 16}, r"^mixers\.N\.d_stat: unknown option for mixer 'mamba2'; did you mean"),
    ({"type": "mamba2", "head_dim": 48}, r"^mixers\.N \(mamba2\): head_dim: 48 does not divide"),
    ({"type": "mambaa"}, r"^mixers\.N\.type: unknown mixer 'mambaa'"),
], ids=["option", "value", "type"])
def test_a_bad_fresh_mixer_is_named_by_its_letter(base, spec, message):
    # the error named layers[1], a field of the hybrid's config that the user of --mixers never wrote
    with pytest.raises(ValueError, match=message):
        graft(base, "ANAN", mixers={"N": spec})


def test_a_spare_fresh_letter_beside_a_used_one_is_left_unused(base):
    # one mixers file (or a model config's mixers) serves several patterns: a letter this pattern does not use is
    # spare, while a pattern that uses none of them would save the base back unchanged (refused above)
    spare = FRESH | {"G": {"type": "gla", "n_heads": 2}}
    hybrid = graft(base, "ANAN", mixers=spare, seed=3)
    assert same(hybrid, graft(base, "ANAN", mixers=FRESH, seed=3))


def test_a_digit_names_fresh_mixers(base):
    # YAML reads {1: {...}} with the number 1 as key: `--mixers "{1: {type: mamba2}}" --pattern A1A1` ended in
    # "TypeError: sequence item 0: expected str instance, int found"
    from zoo.surgery import _read_mixers

    mixers = _read_mixers("{1: {type: mamba2, d_state: 16, head_dim: 16, chunk_size: 8}}")
    assert [s["type"] for s in graft(base, "A1A1", mixers=mixers).config.layer_specs()] == \
           ["attention", "mamba2", "attention", "mamba2"]


def test_a_fresh_mixer_may_name_the_base_layers_own_ffn(base):
    hybrid = graft(base, "ANAN", mixers={"N": FRESH["N"] | {"ffn": "swiglu"}})
    assert [spec["ffn"] for spec in hybrid.config.layer_specs()] == ["swiglu"] * 4
