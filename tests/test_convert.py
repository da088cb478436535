"""Checkpoint conversion: transformers Mamba / Mamba-2 / Llama / Jamba and mamba_ssm <-> zoo, both ways.

Each source is a tiny random model made by its own library (for mamba_ssm, which does not install on CPU, a
state dict with its key layout and its config dict), saved, converted, and compared: logits within 1e-5 in
fp32, identical tensors after the round trip, the same greedy tokens (left-padded rows, with the cache and
without), the loss and every parameter's gradient. In fp32: the zoo's scans compute in fp32 whatever the model's
dtype, and transformers' Jamba experts refuse fp64.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    JambaConfig,
    JambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

import zoo  # noqa: F401  (registers the Auto classes)
from zoo import ZooConfig, ZooForCausalLM
from zoo.convert import (
    _LLAMA_KEYS,
    _MAMBA_KEYS,
    UnmappableError,
    _jamba_fuse_experts,
    _jamba_keys,
    _rename,
    convert,
    detect_format,
    from_hf_jamba,
    from_hf_llama,
    from_hf_mamba,
    from_hf_mamba2,
    from_mamba_ssm,
    hf_mamba2_norm_groups,
    load_as_zoo,
    load_mamba_ssm,
    main,
    save_mamba_ssm,
    to_hf_jamba,
    to_hf_llama,
    to_hf_mamba,
    to_hf_mamba2,
    to_mamba_ssm,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
VOCAB = 300
ATOL = 1e-5


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its init (norms off 1, D off 1, ...) so that a misplaced tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model.eval()


def assert_logits(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs().max().item()
    assert err <= ATOL, f"{name}: max |logits - source logits| = {err:.3e} > {ATOL:.0e}"


def assert_same_tensors(name: str, a: dict, b: dict) -> None:
    assert set(a) == set(b), f"{name}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}: {key} differs"


def greedy(model, ids: torch.Tensor, n: int = 5) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)


# ---- transformers sources ------------------------------------------------------------------------------------

HF_SOURCES = {  # case -> (format, class, config)
    "hf-mamba": ("hf-mamba", MambaForCausalLM, lambda: MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)),
    "hf-mamba-bias-untied": ("hf-mamba", MambaForCausalLM, lambda: MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        time_step_rank=5, use_bias=True, use_conv_bias=False, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
        time_step_scale=2.0, time_step_min=0.01, time_step_max=0.2, time_step_floor=1e-3, residual_in_fp32=False,
        initializer_range=0.05)),
    "hf-mamba2": ("hf-mamba2", Mamba2ForCausalLM, lambda: Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2, head_dim=16, num_heads=4,
        n_groups=2, chunk_size=8)),
    "hf-mamba2-bias-tied-groups4": ("hf-mamba2", Mamba2ForCausalLM, lambda: Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, head_dim=8, num_heads=8,
        n_groups=4, chunk_size=4, use_bias=True, use_conv_bias=False, tie_word_embeddings=True,
        residual_in_fp32=False, layer_norm_epsilon=1e-6)),
    "hf-llama": ("hf-llama", LlamaForCausalLM, lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "hf-llama-tied-headdim": ("hf-llama", LlamaForCausalLM, lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "hf-jamba": ("hf-jamba", JambaForCausalLM, lambda: JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False)),
}


@pytest.mark.parametrize("case", list(HF_SOURCES))
def test_hf_source_converts_with_same_logits_generation_and_round_trip(case, tmp_path):
    fmt, cls, make_config = HF_SOURCES[case]
    torch.manual_seed(0)
    source = perturb(cls(make_config()))
    source.save_pretrained(tmp_path / "src")
    assert detect_format(tmp_path / "src") == fmt

    main([str(tmp_path / "src"), str(tmp_path / "zoo"), "--from", fmt])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert isinstance(model, ZooForCausalLM)
    assert (tmp_path / "zoo" / "generation_config.json").is_file()

    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert_logits(case, model(ids).logits, source(ids, use_cache=False).logits)
        prompt = ids[:1, :6]
        assert torch.equal(greedy(model, prompt), greedy(source, prompt)), f"{case}: greedy tokens differ"

    main([str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", fmt])
    back = cls.from_pretrained(tmp_path / "back").eval()
    assert_same_tensors(case, back.state_dict(), source.state_dict())
    # the config too, init-only options (time steps, initializer_range) included; Jamba's layer periods may come
    # back as the shortest that places the same layers
    skip = {"_name_or_path", "dtype", "transformers_version", "attn_layer_period", "attn_layer_offset",
            "expert_layer_period", "expert_layer_offset"}
    theirs, ours = source.config.to_dict(), back.config.to_dict()
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}
    if fmt == "hf-jamba":
        assert back.config.layers_block_type == source.config.layers_block_type
        assert back.config.layers_num_experts == source.config.layers_num_experts


IMPORTERS = {"hf-mamba": from_hf_mamba, "hf-mamba2": from_hf_mamba2, "hf-llama": from_hf_llama,
             "hf-jamba": from_hf_jamba}


def grads_as_source(fmt: str, model: ZooForCausalLM) -> dict[str, torch.Tensor]:
    """The zoo model's parameter gradients under the source format's names (and fused layout)."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    if fmt == "hf-jamba":
        kinds = [spec["type"] for spec in model.config.layer_specs()]
        return _jamba_fuse_experts(_rename(grads, _jamba_keys(kinds), True, fmt))
    return _rename(grads, {"hf-mamba": _MAMBA_KEYS, "hf-mamba2": _MAMBA_KEYS, "hf-llama": _LLAMA_KEYS}[fmt], True, fmt)


@pytest.mark.parametrize("case", list(HF_SOURCES))
def test_hf_source_gradients_are_transformers_own(case):
    # training a converted checkpoint: the loss and the gradient of every parameter are the source's
    fmt, cls, make_config = HF_SOURCES[case]
    torch.manual_seed(0)
    source = perturb(cls(make_config()))
    model = IMPORTERS[fmt](copy.deepcopy(source))  # (a converted model shares the source's tensors)
    ids = torch.randint(0, VOCAB, (2, 13))
    ref, out = source(ids, labels=ids, use_cache=False), model(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    grads = grads_as_source(fmt, model)
    theirs = dict(source.named_parameters())
    assert set(grads) == set(theirs), f"{case}: parameters differ: {sorted(set(grads) ^ set(theirs))[:6]}"
    for name, p in theirs.items():
        assert_close(f"{case}: grad of {name}", grads[name], p.grad, 1e-5)


@pytest.mark.parametrize("case", list(HF_SOURCES))
def test_hidden_states_follow_transformers_llama(case):
    # output_hidden_states as LlamaForCausalLM gives them: n_layers + 1 entries, the embeddings first, the last after
    # the final norm; transformers' Jamba gives the same and so does its Mamba-2 in 5.25, its Mamba (and 5.17's Mamba-2)
    # leaves the embeddings out and adds the last layer's output before the norm (as from_hf_mamba's docstring says)
    fmt, cls, make_config = HF_SOURCES[case]
    torch.manual_seed(0)
    source = perturb(cls(make_config()))
    model = IMPORTERS[fmt](source)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        theirs = source(ids, use_cache=False, output_hidden_states=True).hidden_states
        out = model(ids, use_cache=False, output_hidden_states=True)
        ours = out.hidden_states
        assert len(ours) == len(theirs) == source.config.num_hidden_layers + 1
        torch.testing.assert_close(ours[0], model.get_input_embeddings()(ids))
        torch.testing.assert_close(model.lm_head(ours[-1]), out.logits)  # after the final norm
        # transformers' Mamba-2 took Llama's convention after 5.17 (5.25 has it); 5.17's is its Mamba's
        mamba_style = fmt == "hf-mamba" or (fmt == "hf-mamba2" and not torch.equal(theirs[0], ours[0]))
        if mamba_style:
            torch.testing.assert_close(source.backbone.norm_f(theirs[-2]), theirs[-1])
            theirs = (ours[0], *theirs[:-2], theirs[-1])  # what Llama's convention makes of them
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(f"{case}: hidden_states[{i}]", a.float(), b.float(), 1e-5)


@pytest.mark.parametrize("case", list(HF_SOURCES))
def test_hf_source_greedy_tokens_with_left_padding(case):
    # rows left-padded by different amounts (and one not), with the cache and without: each row's greedy tokens are
    # the source's on that row alone. (Not the source's on the padded batch: transformers' Mamba and Mamba-2 zero
    # the pads' activations, which an in_proj bias or a conv without bias then carries into the real tokens; the
    # zoo's pads are nothing, its logits the unpadded row's.)
    fmt, cls, make_config = HF_SOURCES[case]
    torch.manual_seed(0)
    source = perturb(cls(make_config()))
    model = IMPORTERS[fmt](source)
    ids = torch.randint(3, VOCAB, (3, 7))
    pads = [3, 1, 0]
    mask = (torch.arange(7) >= torch.tensor(pads)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    for use_cache in (True, False):
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=use_cache)
        with torch.no_grad():
            ours = model.generate(ids, attention_mask=mask, **kwargs)[:, 7:]
            for row, pad in enumerate(pads):
                alone = ids[row:row + 1, pad:]
                theirs = source.generate(alone, attention_mask=torch.ones_like(alone), **kwargs)[0, 7 - pad:]
                assert torch.equal(ours[row], theirs), f"{case} row {row} cache {use_cache}: {ours[row]} != {theirs}"


@pytest.mark.parametrize("fmt", ["hf-mamba", "hf-mamba2"])
def test_hf_mamba_folder_with_rescale_prenorm_residual_converts_its_weights(fmt, tmp_path):
    # transformers' from_pretrained divides a Mamba's out_proj by sqrt(num_hidden_layers) when the config turns
    # rescale_prenorm_residual on (its _init_weights runs on loaded weights too): zoo convert loaded the folder so and
    # wrote a zoo model 0.15 off the checkpoint's logits
    _, cls, make_config = HF_SOURCES[fmt]
    torch.manual_seed(0)
    config = make_config()
    config.rescale_prenorm_residual = True
    source = perturb(cls(config))
    source.save_pretrained(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "zoo")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert_logits(fmt, model(ids).logits, source(ids, use_cache=False).logits)
    assert model.config.rescale_prenorm_residual


def test_dtypes_survive_a_round_trip(tmp_path):
    torch.manual_seed(0)
    source = perturb(MambaForCausalLM(HF_SOURCES["hf-mamba"][2]())).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "zoo")])
    main([str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", "hf-mamba"])
    back = MambaForCausalLM.from_pretrained(tmp_path / "back", dtype="auto")
    assert_same_tensors("bf16", back.state_dict(), source.state_dict())
    # mamba_ssm keeps A_log and D in fp32 inside bf16 models; in memory every tensor keeps its dtype
    config = MAMBA_SSM_CASES["mamba1-tied-padded"]
    sd = {k: v if k.endswith(("A_log", ".D")) else v.bfloat16() for k, v in mamba_ssm_checkpoint(config).items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    assert_same_tensors("mixed", to_mamba_ssm(from_mamba_ssm(config, sd))[1], sd)


@pytest.mark.parametrize("fmt", ["hf-mamba", "hf-mamba2", "hf-jamba"])
def test_fp32_tensors_of_a_half_checkpoint_survive_a_round_trip_through_folders(fmt, tmp_path):
    # a bf16 zoo model keeps Mamba's A_log and D in fp32 and --to hf-* writes them so; reading that folder back, the
    # zoo loaded it with transformers' from_pretrained(dtype="auto"), which casts every tensor to bf16: the fp32
    # tensors came back rounded and the logits moved by ~5e-3
    export, make_config = EXPORTS[fmt]
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(make_config())).to(torch.bfloat16)
    model.keep_fp32_parameters()
    with torch.no_grad():
        for name in model.keep_in_fp32_names():  # off the bf16 grid
            model.get_parameter(name).add_(torch.rand_like(model.get_parameter(name)) * 1e-3)
    assert model.keep_in_fp32_names()
    model.save_pretrained(tmp_path / "zoo")
    sharded = fmt == "hf-jamba"  # (one folder in shards: the files its index names are read)
    main([str(tmp_path / "zoo"), str(tmp_path / "hf"), "--to", fmt, *(["--max-shard-size", "20KB"] if sharded else [])])
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    main([str(tmp_path / "hf"), str(tmp_path / "back")])
    back = ZooForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_tensors(fmt, back.state_dict(), model.state_dict())
    assert back.get_input_embeddings().weight.dtype == torch.bfloat16


def test_a_checkpoint_stored_in_another_dtype_than_its_config_loads_in_one_dtype(tmp_path):
    # only fp32 tensors of a half checkpoint keep their stored dtype: a folder whose files are bf16 while its config
    # says float32 (common in the field) loads in fp32 throughout, not as bf16 weights among fp32 buffers
    torch.manual_seed(0)
    fmt, cls, make_config = HF_SOURCES["hf-mamba"]
    cls(make_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config})
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_as_zoo(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(torch.tensor([[1, 2, 3]]))


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    HF_SOURCES["hf-llama"][1](HF_SOURCES["hf-llama"][2]()).save_pretrained(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "zoo"), "--tokenizer", "byte"])
    main([str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", "hf-llama"])
    for folder in ("zoo", "back"):
        tok = AutoTokenizer.from_pretrained(tmp_path / folder)
        assert tok("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())
    assert AutoConfig.from_pretrained(tmp_path / "zoo").pad_token_id == tok.pad_token_id  # filled from the tokenizer


def test_from_format_refuses_other_architectures_and_weights_that_do_not_fit(tmp_path):
    # Qwen2 is Llama with q/k/v biases: LlamaForCausalLM.from_pretrained loaded it with a warning, dropping the
    # biases, and the "converted" model's logits were off by ~0.6 (likewise a Mistral's sliding window was lost)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match="model_type='qwen2'.*--from hf-llama"):
        convert(tmp_path / "qwen2", tmp_path / "out", from_format="hf-llama")
    # without --from, detection said "cannot tell the format; pass --from one of ...", which then refused it as above
    with pytest.raises(ValueError, match="model_type='qwen2'.*not read.*'llama'") as refused:
        convert(tmp_path / "qwen2", tmp_path / "out")
    assert "pass --from" not in str(refused.value)
    assert not (tmp_path / "out").exists()
    # a config.json without model_type is taken at --from's word, but its weights must fit: none dropped, none
    # left at random
    LlamaForCausalLM(HF_SOURCES["hf-llama"][2]()).save_pretrained(tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    del config["model_type"]
    for extra_layers, match in ((0, "unexpected keys.*'model.layers.1"), (1, "missing keys.*'model.layers.2")):
        (tmp_path / "llama" / "config.json").write_text(json.dumps(
            config | {"num_hidden_layers": 1 + 2 * extra_layers}))
        with pytest.raises(UnmappableError, match=match):
            convert(tmp_path / "llama", tmp_path / "out", from_format="hf-llama")
    assert not (tmp_path / "out").exists()



def test_a_zoo_folder_whose_weights_do_not_fit_is_refused(tmp_path):
    # a zoo folder was read with ZooForCausalLM.from_pretrained and nothing else: a classifier's folder (no lm_head,
    # a score head) or one whose config names more layers than its weights hold was exported, and re-saved, with
    # the missing weights at random after only transformers' load report (the same folder in a transformers format
    # was refused)
    from zoo import ZooForSequenceClassification

    torch.manual_seed(0)
    config = ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", vocab_size=VOCAB, tie_embeddings=False)
    config.num_labels = 3
    ZooForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", vocab_size=VOCAB)).save_pretrained(tmp_path / "lm")
    saved = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps(saved | {"layers": "M" * 5}))
    for src, match in (("classifier", r"missing keys \['lm_head.weight'\]"), ("lm", r"missing keys.*'model.layers.4")):
        for to_format in (None, "hf-mamba", "mamba_ssm"):
            with pytest.raises(UnmappableError, match=rf"zoo: .*{src} does not fit ZooForCausalLM: {match}"):
                convert(tmp_path / src, tmp_path / "out", to_format=to_format)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["hf-mamba", "hf-llama", "mamba_ssm"])
def test_zoo_from_pretrained_of_another_models_folder_names_the_converter(case, tmp_path):
    # ZooForCausalLM.from_pretrained of a transformers Mamba / Llama folder (or a mamba_ssm one) built zoo's default
    # model from its config.json, with every weight at random, after only transformers' log line and load report
    torch.manual_seed(0)
    if case == "mamba_ssm":
        source = ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", vocab_size=VOCAB)).eval()
        save_mamba_ssm(*to_mamba_ssm(source), tmp_path)
    else:
        fmt, cls, make_config = HF_SOURCES[case]
        source = cls(make_config()).eval()
        source.save_pretrained(tmp_path)
    for load in (ZooForCausalLM.from_pretrained, zoo.ZooModel.from_pretrained, ZooConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"not a zoo model's.*zoo convert SRC DST"):
            load(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 7))
    assert_logits(case, load_as_zoo(tmp_path)(ids).logits, source(ids).logits)  # the route the message names

@pytest.mark.parametrize("src", ["nosuch", "org/nosuch"])
def test_convert_names_a_source_that_is_no_folder(src, tmp_path, monkeypatch):
    # a mistyped source (or a hub id: zoo convert reads folders only) went to the hub for its tokenizer and ended in
    # "We couldn't connect to 'https://huggingface.co'" (offline) or a missing-repo error, naming no folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"source: '{src}': no such model folder; zoo convert reads a local folder"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folders_given_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    # a quoted '~/out' (or one a script passes) was taken as it stands: zoo convert wrote the model into a folder
    # named '~' in the working directory, and zoo graft --base '~/model' found 'no config.json'
    from zoo.surgery import main as graft_main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    LlamaForCausalLM(HF_SOURCES["hf-llama"][2]()).save_pretrained(tmp_path / "home" / "src")
    main(["~/src", "~/zoo"])
    main(["~/zoo", "~/back", "--to", "hf-llama"])
    graft_main(["~/hybrid", "--base", "~/zoo", "--pattern", "AN", "--mixers", "{N: {type: mamba, d_state: 4}}"])
    for folder in ("zoo", "back", "hybrid"):
        assert (tmp_path / "home" / folder / "config.json").is_file(), folder
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("text,problem", [("{oops", "not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_a_config_json_that_is_no_json_object_is_named(text, problem, tmp_path):
    # json's "Expecting property name ..." named neither the file nor the folder; a list ended in a traceback
    # (AttributeError: 'list' object has no attribute 'get')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(text)
    for from_format in (None, "mamba_ssm"):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'src' / 'config.json'}: {problem}")):
            convert(tmp_path / "src", tmp_path / "out", from_format=from_format)


def test_convert_names_a_destination_that_is_a_file(tmp_path):
    # every way out (zoo folder, transformers, mamba_ssm) ended in a traceback: AssertionError or FileExistsError
    LlamaForCausalLM(HF_SOURCES["hf-llama"][2]()).save_pretrained(tmp_path / "llama")
    (tmp_path / "file").write_text("")
    for to_format in (None, "hf-llama", "mamba_ssm"):
        with pytest.raises(ValueError, match="is a file; give a folder"):
            convert(tmp_path / "llama", tmp_path / "file", to_format=to_format)


def test_export_over_a_folder_leaves_no_stale_weights_nor_a_partial_folder(tmp_path):
    # --to hf-* wrote with save_pretrained straight into DST: a one-file export re-saved sharded kept the old
    # model.safetensors beside the new shards, and from_pretrained loaded the old model without a word; a failed
    # save (a bad --max-shard-size) left a config.json-only folder that passes for a model folder
    torch.manual_seed(0)
    old, new = (LlamaForCausalLM(HF_SOURCES["hf-llama"][2]()) for _ in range(2))
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    convert(tmp_path / "old", tmp_path / "out", to_format="hf-llama")
    convert(tmp_path / "new", tmp_path / "out", to_format="hf-llama", max_shard_size="20KB")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert_same_tensors("re-export", LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict(), new.state_dict())
    with pytest.raises(ValueError):
        convert(tmp_path / "new", tmp_path / "bad", to_format="hf-llama", max_shard_size="lots")
    assert not (tmp_path / "bad").exists()


def test_max_shard_size_in_bytes(tmp_path):
    # save_pretrained takes a byte count as well as '5GB', but the CLI passed '20000' on as a string, refused as
    # "Unit '00' not supported"
    LlamaForCausalLM(HF_SOURCES["hf-llama"][2]()).save_pretrained(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "zoo"), "--max-shard-size", "20000"])
    assert (tmp_path / "zoo" / "model.safetensors.index.json").is_file()


def test_generation_config_travels_with_the_checkpoint(tmp_path):
    # generation_config.json (Llama-3's eos list, sampling defaults) was rebuilt from config.json on the way in and
    # out, so generate no longer stopped at the ids only it listed, nor sampled as the source did
    from transformers import GenerationConfig

    torch.manual_seed(0)
    source = LlamaForCausalLM(HF_SOURCES["hf-llama"][2]())
    source.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], do_sample=True, temperature=0.6,
                                                top_p=0.9)
    source.save_pretrained(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "zoo")])
    main([str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", "hf-llama"])
    for folder in ("zoo", "back"):
        generation = GenerationConfig.from_pretrained(tmp_path / folder)
        assert generation.eos_token_id == [2, 7] and generation.do_sample and generation.temperature == 0.6, folder


@pytest.mark.parametrize("add_bos", [False, True])
def test_a_finetunes_add_bos_travels_with_the_checkpoint(add_bos, tmp_path):
    # zoo finetune records how its rows began in the merged model's config (add_bos), which zoo generate and zoo eval
    # read to prompt it as it trained: both directions rebuilt the config without it, so a model finetuned without
    # <bos> (add_bos false) was prompted with one once converted
    from zoo.eval.common import trained_with_bos

    torch.manual_seed(0)
    source = LlamaForCausalLM(HF_SOURCES["hf-llama"][2]())
    source.config.add_bos = add_bos
    source.save_pretrained(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "zoo")])
    main([str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", "hf-llama"])
    for folder in ("zoo", "back"):
        config = AutoConfig.from_pretrained(tmp_path / folder)
        assert config.add_bos is add_bos and trained_with_bos(config) is add_bos, folder


def test_a_mamba_ssm_export_says_it_drops_add_bos_false():
    # mamba_ssm's MambaConfig has no field for it: dropped without a word, the model came back prompted with <bos>
    torch.manual_seed(0)
    model = ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml"))
    to_mamba_ssm(model)  # (nothing to say where it is not recorded)
    model.config.add_bos = False
    with pytest.warns(UserWarning, match="add_bos=False .* is dropped"):
        config, _ = to_mamba_ssm(model)
    assert "add_bos" not in config


def test_llama_rope_tables_are_transformers_own_at_far_positions():
    # the zoo took RoPE's inverse frequencies as theta^-(i/Dh), one ulp off transformers' 1/theta^(i/Dh) in some
    # entries: an angle error growing with the position (cos 4e-3 off at 100k, logits 1.3e-5 off, 60x the error
    # near 0)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    source = perturb(LlamaForCausalLM(config))
    model = from_hf_llama(source)
    ids = torch.randint(0, VOCAB, (1, 32))
    far = torch.arange(100_000, 100_032)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 32, 32), far)
    ours = model.model.layers[0].mixer.rope_tables(far)
    assert torch.equal(ours[0][:, :, 0], cos) and torch.equal(ours[1][:, :, 0], sin)
    with torch.no_grad():
        err = (model(ids, position_ids=far).logits - source(ids, position_ids=far, use_cache=False).logits).abs().max()
    assert err <= 1e-6, f"logits at positions from 100k: max error {err:.3e}"


def test_hf_mamba2_grouped_norm_is_what_transformers_computes():
    # transformers' Mamba2 normalized the gated RMSNorm over all of d_inner whatever n_groups was, and per B/C
    # group (as mamba_ssm) from 5.2x on; the import must reproduce the installed version, and the other
    # grouping must differ from it.
    torch.manual_seed(0)
    source = perturb(Mamba2ForCausalLM(HF_SOURCES["hf-mamba2"][2]()))
    n_groups = source.config.n_groups
    assert n_groups > 1
    model = from_hf_mamba2(source)
    mixer = model.model.layers[0].mixer
    assert mixer.d_inner // mixer.norm.group_size == hf_mamba2_norm_groups(n_groups)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        ref = source(ids, use_cache=False).logits
        assert_logits("import", model(ids).logits, ref)
        other_config = copy.deepcopy(model.config)
        if "norm_groups" in other_config.mixers["M"]:
            del other_config.mixers["M"]["norm_groups"]  # back to the zoo's per-group default
        else:
            other_config.mixers["M"]["norm_groups"] = 1
        other = ZooForCausalLM(other_config).eval()
        other.load_state_dict(model.state_dict())
        assert (other(ids).logits - ref).abs().max() > 1e-3


def test_jamba_router_weights_are_not_renormalized():
    torch.manual_seed(0)
    source = perturb(JambaForCausalLM(HF_SOURCES["hf-jamba"][2]()))
    model = from_hf_jamba(source)
    assert model.config.moe_spec()["normalize_topk"] is False
    assert model.config.layer_specs()[2]["rope"] is False and model.config.layer_specs()[0]["inner_norms"]
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        ref = source(ids, use_cache=False).logits
        for block in model.model.layers:
            if hasattr(block.ffn, "normalize_topk"):
                block.ffn.normalize_topk = True
        assert (model(ids).logits - ref).abs().max() > 1e-3, "renormalizing should change the logits"



def test_jamba_aux_loss_and_router_logits_are_transformers_own():
    """The MoE aux loss was summed over layers, each ~1 when balanced, so the router_aux_loss_coef that convert
    carries over from Jamba pulled n_moe_layers / top_k times harder than in transformers. A converted Jamba now
    gives transformers' aux loss and router logits, and its training loss, with padding and without."""
    torch.manual_seed(0)
    config = JambaConfig(  # 4 MoE layers: a sum over layers would be ~2x off
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
        attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_dt_rank=4)
    source = perturb(JambaForCausalLM(config)).train()
    model = from_hf_jamba(source).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        with torch.no_grad():
            ref = source(ids, labels=ids, output_router_logits=True, use_cache=False, **kwargs)
            out = model(ids, labels=ids, output_router_logits=True, use_cache=False, **kwargs)
        assert len(out.router_logits) == len(ref.router_logits) == 4
        real = mask.reshape(-1).bool() if kwargs else slice(None)  # (padded positions' outputs differ)
        for ours, theirs in zip(out.router_logits, ref.router_logits):
            torch.testing.assert_close(ours[real], theirs.float()[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss.float(), rtol=1e-5, atol=1e-6)
        if not kwargs:  # (transformers' loss counts targets under padding; the aux terms agree above)
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert model(ids, use_cache=False).router_logits is None  # only when asked for, as in transformers


def test_jamba_output_router_logits_travels_both_ways():
    # a Jamba whose config turns output_router_logits on returns its router logits without being asked; the import
    # and the export dropped the flag, so the converted model returned none (router_logits=None) and its export
    # none either
    torch.manual_seed(0)
    source = perturb(JambaForCausalLM(JambaConfig(**{**HF_SOURCES["hf-jamba"][2]().to_dict(),
                                                     "output_router_logits": True}))).train()
    model = from_hf_jamba(source).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref, out = source(ids, labels=ids, use_cache=False), model(ids, labels=ids, use_cache=False)
    assert out.router_logits is not None and len(out.router_logits) == len(ref.router_logits)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert to_hf_jamba(model).config.output_router_logits is True


# ---- zoo models exported -------------------------------------------------------------------------------------

JAMBA_STYLE = dict(vocab_size=VOCAB, d_model=32, layers="MMAM", ffn={"type": "swiglu", "hidden": 64},
                   mixers={"M": {"type": "mamba", "d_state": 8, "inner_norms": True, "inner_norm_eps": 1e-6},
                           "A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "rope": False}},
                   moe={"every": 2, "offset": 1, "n_experts": 4, "top_k": 2, "normalize_topk": False},
                   norm_eps=1e-6)
EXPORTS = {
    "hf-mamba": (to_hf_mamba, lambda: ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")),
    "hf-mamba2": (to_hf_mamba2, lambda: ZooConfig.from_yaml(CONFIGS / "mamba2-tiny.yaml")),
    "hf-llama": (to_hf_llama, lambda: ZooConfig.from_yaml(CONFIGS / "transformerpp-tiny.yaml")),
    "hf-jamba": (to_hf_jamba, lambda: ZooConfig(**JAMBA_STYLE)),
}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_zoo_model_exports_with_same_logits(fmt):
    export, make_config = EXPORTS[fmt]
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(make_config()))
    target = export(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        assert_logits(fmt, target(ids, use_cache=False).logits, model(ids).logits)


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_zoo_model_round_trips_through_transformers(fmt):
    # zoo -> transformers -> zoo: the same tensors and the same options, init-only ones included where transformers
    # has them and reads them right (not rescale_prenorm_residual: test_zoo_export_loads_in_transformers)
    export, make_config = EXPORTS[fmt]
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(make_config()))
    exported = export(model)
    back = IMPORTERS[fmt](exported)
    assert_same_tensors(fmt, back.state_dict(), model.state_dict())
    assert export(back).config.to_dict() == exported.config.to_dict()
    fields = ["vocab_size", "d_model", "norm_eps", "tie_embeddings", "initializer_range"]
    if fmt in ("hf-mamba", "hf-mamba2"):  # (Llama and Jamba have neither: add the residual in the model's dtype)
        fields += ["residual_in_fp32"]
    assert {f: getattr(back.config, f) for f in fields} == {f: getattr(model.config, f) for f in fields}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_zoo_export_loads_in_transformers(fmt, tmp_path):
    # a zoo model (rescale_prenorm_residual on, the zoo's default) exported and loaded by transformers' own
    # from_pretrained: written with rescale_prenorm_residual true, transformers' Mamba and Mamba-2 divided every
    # loaded out_proj by sqrt(num_hidden_layers)
    export, make_config = EXPORTS[fmt]
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(make_config()))
    assert model.config.rescale_prenorm_residual
    exported = export(model)
    exported.save_pretrained(tmp_path)
    loaded = type(exported).from_pretrained(tmp_path).eval()
    assert_same_tensors(fmt, loaded.state_dict(), exported.state_dict())


INT_FLOATS = {  # float options written as whole numbers, as a YAML config gives them (dt_scale: 2)
    "hf-mamba": (dict(norm_eps=1, initializer_range=1), {"dt_scale": 2, "dt_min": 1, "dt_max": 2, "dt_init_floor": 1},
                 {"layer_norm_epsilon": 1.0, "initializer_range": 1.0, "time_step_scale": 2.0,
                  "time_step_min": 1.0, "time_step_max": 2.0, "time_step_floor": 1.0}),
    "hf-mamba2": (dict(norm_eps=1, initializer_range=1), {"dt_min": 1, "dt_max": 2, "dt_init_floor": 1, "norm_eps": 1},
                  {"layer_norm_epsilon": 1.0, "initializer_range": 1.0, "time_step_min": 1.0, "time_step_max": 2.0,
                   "time_step_floor": 1.0}),
    "hf-llama": (dict(norm_eps=1, initializer_range=1), {}, {"rms_norm_eps": 1.0, "initializer_range": 1.0}),
    "hf-jamba": (dict(norm_eps=1, initializer_range=1, moe={**JAMBA_STYLE["moe"], "aux_loss_coef": 0}),
                 {"inner_norm_eps": 1}, {"rms_norm_eps": 1.0, "initializer_range": 1.0, "router_aux_loss_coef": 0.0}),
}


@pytest.mark.parametrize("fmt", list(INT_FLOATS))
def test_float_options_given_as_integers_export(fmt):
    # transformers' configs are strict dataclasses: an int where a float is typed (time_step_scale=2) raised
    # StrictDataclassFieldValidationError, so a valid zoo model with dt_scale: 2 or aux_loss_coef: 0 did not export
    export, make_config = EXPORTS[fmt]
    top, mixer, expected = INT_FLOATS[fmt]
    config = make_config()
    letter = "A" if fmt == "hf-llama" else "M"
    config = ZooConfig(**{**config.to_dict(), **top, "mixers": {**config.mixers, letter: {**config.mixers[letter],
                                                                                          **mixer}}})
    with torch.device("meta"):
        model = ZooForCausalLM(config)
    exported = export(model).config
    assert {name: getattr(exported, name) for name in expected} == expected


def test_a_jamba_style_model_with_experts_on_every_layer_and_no_mlp_exports():
    # ffn: none with a MoE on every layer (Jamba's expert_layer_period 1, intermediate_size the experts'): the export
    # read the dense ffn's hidden size first and failed with a bare KeyError: 'hidden'
    torch.manual_seed(0)
    config = ZooConfig(**{**JAMBA_STYLE, "ffn": "none", "moe": {**JAMBA_STYLE["moe"], "every": 1, "offset": 0,
                                                                 "hidden": 48}})
    model = perturb(ZooForCausalLM(config))
    exported = to_hf_jamba(model)
    assert exported.config.intermediate_size == 48 and exported.config.layers_num_experts == [4] * 4
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert_logits("hf-jamba", exported(ids, use_cache=False).logits, model(ids).logits)
    assert_same_tensors("hf-jamba", from_hf_jamba(exported).state_dict(), model.state_dict())


@pytest.mark.parametrize("case,hint", [
    ("moe", "no other format has a MoE"),
    ("swiglu", "--to mamba_ssm (ffn none or swiglu)"),
    ("plain", "--to mamba_ssm (ffn none or swiglu) or --to hf-mamba"),
])
def test_a_model_without_attention_layers_is_refused_by_the_jamba_export(case, hint):
    # an all-Mamba model exported to a JambaForCausalLM that transformers cannot run: its forward and generate with the
    # default cache raise "`get_mask_sizes` can only be called on Attention layers" (the cache sizes the mask from an
    # attention layer); the export now refuses it up front, naming the format that fits
    norms = {"inner_norms": True, "inner_norm_eps": 1e-6} if case != "plain" else {}
    mamba = {"type": "mamba", "d_state": 8, **norms}
    config = ZooConfig(**{**JAMBA_STYLE, "layers": "MMMM", "mixers": {"M": mamba}, "moe": JAMBA_STYLE["moe"]
                          if case == "moe" else None, "ffn": "none" if case == "plain" else JAMBA_STYLE["ffn"]})
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(config))
    with pytest.raises(UnmappableError, match=r"hf-jamba: layers='MMMM' .*JambaForCausalLM cannot run a model without "
                                              r"an attention layer.*" + re.escape(hint) + "$"):
        to_hf_jamba(model)
    if case == "plain":  # the format it names runs the model, with its cache
        exported = to_hf_mamba(model)
        ids = torch.randint(0, VOCAB, (1, 5))
        with torch.no_grad():
            assert_logits("hf-mamba", exported(ids).logits, model(ids).logits)
            assert exported.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("fmt", ["hf-llama", "hf-jamba"])
def test_export_of_a_half_model_with_residual_in_fp32_warns_that_llama_and_jamba_drop_it(fmt):
    # neither class has residual_in_fp32: a bf16 zoo model's residual stream, added in fp32, was added in bf16 by the
    # export, whose bf16 logits differed from the zoo model's without a word
    import warnings

    export, make_config = EXPORTS[fmt]
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(make_config()))
    assert model.config.residual_in_fp32  # the zoo's default
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*residual_in_fp32")  # in fp32 it changes nothing: no warning
        export(model)
    with pytest.warns(UserWarning, match=rf"{fmt}: residual_in_fp32=True is dropped: .* adds the residual stream in "
                                         r"bfloat16, so its bfloat16 logits differ from this model's"):
        export(model.bfloat16())
    model.config.residual_in_fp32 = False
    for block in model.model.layers:
        block.residual_in_fp32 = False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*residual_in_fp32")  # added in the weights' dtype: nothing dropped
        export(model)


MAMBA_SSM_HYBRID = dict(vocab_size=64, d_model=32, ffn={"type": "swiglu", "hidden": 128}, mixers={
    "M": {"type": "mamba", "d_state": 4}, "N": {"type": "mamba2", "d_state": 8, "head_dim": 16},
    "A": {"type": "attention", "n_heads": 4}, "B": {"type": "attention", "n_heads": 2},
    "W": {"type": "attention", "n_heads": 4, "window": 8}, "G": {"type": "gla"}})
UNMAPPABLE_EXPORTS = [
    ("hf-jamba", to_hf_jamba, lambda: ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml"), "inner_norms"),
    ("hf-jamba", to_hf_jamba, lambda: ZooConfig(**{**JAMBA_STYLE, "moe": {**JAMBA_STYLE["moe"],
                                                                          "normalize_topk": True}}), "normalize_topk"),
    ("hf-jamba", to_hf_jamba, lambda: ZooConfig(**{**JAMBA_STYLE, "layers": "MAAM"}), "attn_layer_period"),
    # a one-expert MoE: transformers' Jamba makes that layer a plain MLP, and the export failed on its weight names
    ("hf-jamba", to_hf_jamba, lambda: ZooConfig(**{**JAMBA_STYLE, "moe": {**JAMBA_STYLE["moe"], "n_experts": 1,
                                                                          "top_k": 1}}), "moe.n_experts"),
    # the gated norm's grouping transformers cannot express: per group before 5.2x, over all d_inner after
    ("hf-mamba2", to_hf_mamba2, lambda: ZooConfig.from_yaml(
        CONFIGS / "mamba2-tiny.yaml", mixers={"M": {"type": "mamba2", "d_state": 16, "head_dim": 16, "n_groups": 2,
                                                   **({"norm_groups": 1} if hf_mamba2_norm_groups(2) == 2 else {})}}),
     "norm_groups"),
    ("hf-llama", to_hf_llama, lambda: ZooConfig.from_yaml(
        CONFIGS / "transformerpp-tiny.yaml", mixers={"A": {"type": "attention", "n_heads": 4, "window": 8}}), "window"),
    ("hf-mamba", to_hf_mamba, lambda: ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml"), "moe"),
    ("hf-mamba", to_hf_mamba, lambda: ZooConfig.from_yaml(CONFIGS / "mamba2-tiny.yaml"), "layers[0].type"),
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", norm_eps=1e-6), "norm_eps"),
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig.from_yaml(
        CONFIGS / "mamba-tiny.yaml", ffn={"type": "swiglu", "hidden": 100}), "ffn.hidden"),
    # hybrids: one ssm_cfg, one attn_cfg and one d_intermediate for every layer; MHA has no sliding window
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig(**MAMBA_SSM_HYBRID, layers="MAMN"), r"layers[3].type='mamba2'"),
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig(**MAMBA_SSM_HYBRID, layers="MAMB"), r"layers[3]="),
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig(**MAMBA_SSM_HYBRID, layers="MWMW"), "window"),
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig(**MAMBA_SSM_HYBRID, layers=[
        "M", "A", "M", {"type": "attention", "n_heads": 4, "ffn": "none"}]), "layers[3].ffn"),
    ("mamba_ssm", to_mamba_ssm, lambda: ZooConfig(**MAMBA_SSM_HYBRID, layers="MAMG"), "layers[3].type='gla'"),
]


@pytest.mark.parametrize("fmt,export,make_config,option", UNMAPPABLE_EXPORTS,
                         ids=[f"{c[0]}-{c[3]}" for c in UNMAPPABLE_EXPORTS])
def test_unmappable_export_is_a_named_error(fmt, export, make_config, option):
    with torch.device("meta"):
        model = ZooForCausalLM(make_config())
    with pytest.raises(UnmappableError, match=option.replace("[", r"\[").replace("]", r"\]")):
        export(model)


UNMAPPABLE_IMPORTS = [
    (from_hf_mamba2, lambda: Mamba2ForCausalLM(Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, head_dim=16, num_heads=4, n_groups=1, state_size=8,
        time_step_limit=(0.0, 10.0))), "time_step_limit"),
    (from_hf_llama, lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})), "rope_type"),
    (from_hf_llama, lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        attention_bias=True)), "attention_bias"),
    # the RoPE variants of Llama 3, YaRN and a pre-5.0 rope_scaling dict (dynamic NTK): plain RoPE only
    (from_hf_llama, lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})), "llama3"),
    (from_hf_llama, lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})), "yarn"),
    (from_hf_llama, lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        rope_scaling={"type": "dynamic", "factor": 2.0})), "dynamic"),
    (from_hf_jamba, lambda: JambaForCausalLM(JambaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
        attention_dropout=0.1, use_mamba_kernels=False)), "attention_dropout"),
    (from_hf_mamba, lambda: MambaForCausalLM(MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8, hidden_act="gelu")), "hidden_act"),
]


@pytest.mark.parametrize("importer,make_source,option", UNMAPPABLE_IMPORTS, ids=[c[2] for c in UNMAPPABLE_IMPORTS])
def test_unmappable_import_is_a_named_error(importer, make_source, option):
    with pytest.raises(UnmappableError, match=option):
        importer(make_source())


@pytest.mark.parametrize("case,field", [("hf-mamba", "conv_kernel"), ("hf-mamba2", "conv_kernel"),
                                        ("hf-jamba", "mamba_d_conv")])
def test_a_transformers_source_whose_conv_kernel_is_below_one_is_refused_naming_its_field(case, field, tmp_path):
    # transformers builds a Mamba of conv_kernel 0 (its Conv1d holds no weights), which fails at its first step
    # ("negative padding is not supported"); the conversion refused it only through the zoo's own d_conv ("layers[0]
    # (mamba): d_conv: must be a positive integer, got 0"), naming no field of the source's config, from a model and
    # from a folder alike
    fmt, cls, make_config = HF_SOURCES[case]
    config = make_config()
    setattr(config, field, 0)
    source = cls(config)
    message = rf"^{fmt}: {field}: 0 is no kernel size for the causal convolution of the \w+ model's Mamba layers"
    with pytest.raises(ValueError, match=message):
        IMPORTERS[fmt](source)
    source.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        load_as_zoo(tmp_path / "src")


# ---- mamba_ssm -----------------------------------------------------------------------------------------------
# The layout below is read from mamba_ssm 2.3.2 (models/mixer_seq_simple.py, modules/block.py, modules/mlp.py,
# modules/mamba_simple.py, modules/mamba2.py, modules/mha.py): MixerModel.embedding (note: singular), layers.{i}.norm /
# mixer / norm2 / mlp.fc1 / mlp.fc2, norm_f; RMSNorm eps 1e-5; GatedMLP fc1 = [y, gate], hidden rounded up to 128;
# MHA in_proj = [q, k, v].

def mamba_ssm_d_state(ssm: dict) -> int:
    return ssm.get("d_state", 16 if ssm.get("layer", "Mamba1") == "Mamba1" else 128)  # Mamba's, Mamba2's default


def mamba_ssm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every key of MambaLMHeadModel(MambaConfig(**config)).state_dict() with its shape, hand-listed from mamba_ssm
    2.3.2's source: models/mixer_seq_simple.py (MambaLMHeadModel: backbone, lm_head, the vocabulary padded up to
    pad_vocab_size_multiple; MixerModel: embedding, layers, norm_f; create_block: an MHA where the layer index is in
    attn_layer_idx, else Mamba or Mamba2 by ssm_cfg["layer"]), modules/block.py (Block: norm, mixer, and norm2 + mlp
    when d_intermediate > 0), ops/triton/layer_norm.py (RMSNorm: weight only, bias registered as None),
    modules/mlp.py (GatedMLP), modules/mamba_simple.py (Mamba), modules/mamba2.py (Mamba2; RMSNormGated of
    ops/triton/layernorm_gated.py: weight only) and modules/mha.py (MHA; flash_attn's RotaryEmbedding keeps inv_freq
    non-persistent, so rotary adds no key)."""
    d, multiple = config["d_model"], config.get("pad_vocab_size_multiple", 8)
    vocab = -(-config["vocab_size"] // multiple) * multiple
    ssm, attn = dict(config.get("ssm_cfg") or {}), dict(config.get("attn_cfg") or {})
    shapes = {"backbone.embedding.weight": (vocab, d)}
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        if i in (config.get("attn_layer_idx") or []):  # MHA(d, **attn_cfg)
            heads = attn["num_heads"]
            kv_heads = attn.get("num_heads_kv") or heads
            head_dim = attn.get("head_dim") or d // heads
            mlp_dim = -(-attn.get("mlp_dim", 0) // 256) * 256
            qkv_dim = head_dim * (heads + 2 * kv_heads)
            shapes[p + "mixer.in_proj.weight"] = (qkv_dim + mlp_dim, d)
            if attn.get("qkv_proj_bias", True):
                shapes[p + "mixer.in_proj.bias"] = (qkv_dim + mlp_dim,)
            if attn.get("d_conv", 0) > 0:
                shapes[p + "mixer.conv1d.weight"] = (qkv_dim, 1, attn["d_conv"])
                shapes[p + "mixer.conv1d.bias"] = (qkv_dim,)
            shapes[p + "mixer.out_proj.weight"] = (d, heads * head_dim + mlp_dim // 2)
            if attn.get("out_proj_bias", True):
                shapes[p + "mixer.out_proj.bias"] = (d,)
        elif ssm.get("layer", "Mamba1") == "Mamba1":  # Mamba(d, **ssm_cfg)
            d_state, d_conv, d_inner = mamba_ssm_d_state(ssm), ssm.get("d_conv", 4), int(ssm.get("expand", 2) * d)
            dt_rank = ssm.get("dt_rank", "auto")
            dt_rank = -(-d // 16) if dt_rank == "auto" else dt_rank
            shapes |= {p + "mixer.in_proj.weight": (2 * d_inner, d), p + "mixer.conv1d.weight": (d_inner, 1, d_conv),
                       p + "mixer.x_proj.weight": (dt_rank + 2 * d_state, d_inner),
                       p + "mixer.dt_proj.weight": (d_inner, dt_rank), p + "mixer.dt_proj.bias": (d_inner,),
                       p + "mixer.A_log": (d_inner, d_state), p + "mixer.D": (d_inner,),
                       p + "mixer.out_proj.weight": (d, d_inner)}
            if ssm.get("conv_bias", True):
                shapes[p + "mixer.conv1d.bias"] = (d_inner,)
            if ssm.get("bias", False):
                shapes |= {p + "mixer.in_proj.bias": (2 * d_inner,), p + "mixer.out_proj.bias": (d,)}
        else:  # Mamba2(d, **ssm_cfg): in_proj rows [z, x, B, C, dt]
            d_state, d_conv, d_inner = mamba_ssm_d_state(ssm), ssm.get("d_conv", 4), ssm.get("expand", 2) * d
            groups, d_ssm = ssm.get("ngroups", 1), ssm.get("d_ssm") or d_inner
            heads, conv_dim = d_ssm // ssm.get("headdim", 64), d_ssm + 2 * ssm.get("ngroups", 1) * d_state
            shapes |= {p + "mixer.in_proj.weight": (2 * d_inner + 2 * groups * d_state + heads, d),
                       p + "mixer.conv1d.weight": (conv_dim, 1, d_conv), p + "mixer.dt_bias": (heads,),
                       p + "mixer.A_log": (heads,), p + "mixer.D": (d_ssm if ssm.get("D_has_hdim") else heads,),
                       p + "mixer.out_proj.weight": (d, d_inner)}
            if ssm.get("rmsnorm", True):
                shapes[p + "mixer.norm.weight"] = (d_ssm,)
            if ssm.get("conv_bias", True):
                shapes[p + "mixer.conv1d.bias"] = (conv_dim,)
            if ssm.get("bias", False):
                shapes |= {p + "mixer.in_proj.bias": shapes[p + "mixer.in_proj.weight"][:1],
                           p + "mixer.out_proj.bias": (d,)}
        if config.get("d_intermediate", 0):  # GatedMLP(d, hidden_features=d_intermediate, out_features=d)
            hidden = -(-config["d_intermediate"] // 128) * 128
            shapes |= {p + "norm2.weight": (d,), p + "mlp.fc1.weight": (2 * hidden, d),
                       p + "mlp.fc2.weight": (d, hidden)}
    return shapes | {"backbone.norm_f.weight": (d,), "lm_head.weight": (vocab, d)}


def mamba_ssm_checkpoint(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes MambaLMHeadModel(config) has (`mamba_ssm_shapes`)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in mamba_ssm_shapes(config).items():
        x = torch.randn(*shape, generator=g)
        if key == "lm_head.weight" and config["tie_embeddings"]:
            x = sd["backbone.embedding.weight"]
        elif key in ("backbone.embedding.weight", "lm_head.weight"):
            x = x * 0.5
        elif key.endswith("A_log") and len(shape) == 2:  # Mamba's A = -exp(A_log) = -[1 .. d_state] per channel
            x = torch.log(torch.arange(1, shape[1] + 1.0)).repeat(shape[0], 1) + x * 0.1
        elif key.endswith(("norm.weight", "norm2.weight", "norm_f.weight", ".D", "A_log")):
            x = x * 0.1 + 1.0
        elif key.endswith(("dt_proj.bias", "dt_bias")):
            x = x * 0.1 - 3.0
        else:
            x = x * 0.1
        sd[key] = x
    return sd


def mamba_ssm_mha(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, attn: dict, d: int) -> torch.Tensor:
    """MHA.forward of mamba_ssm 2.3.2 (modules/mha.py) without a cache, transcribed: in_proj -> q | k, v (the kv
    part "(two hkv d)"), flash_attn's RotaryEmbedding (GPT-NeoX halves over the first rotary_emb_dim channels,
    positions 0..T-1), k and v repeated per query head group, SDPA (is_causal=causal), out_proj."""
    heads = attn["num_heads"]
    kv_heads = attn.get("num_heads_kv") or heads
    head_dim = attn.get("head_dim") or d // heads
    qkv = F.linear(x, sd[prefix + "in_proj.weight"], sd.get(prefix + "in_proj.bias"))
    q, kv = qkv.split([heads * head_dim, 2 * kv_heads * head_dim], dim=-1)
    q = q.unflatten(-1, (heads, head_dim))
    k, v = kv.unflatten(-1, (2, kv_heads, head_dim)).unbind(-3)
    rot = attn.get("rotary_emb_dim", 0)
    if rot:
        inv_freq = 1.0 / attn.get("rotary_emb_base", 10000.0) ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
        freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv_freq)[:, None]  # (T, 1, rot / 2)

        def rotary(t):
            a, b = t[..., :rot // 2], t[..., rot // 2:rot]
            return torch.cat([a * freqs.cos() - b * freqs.sin(), a * freqs.sin() + b * freqs.cos(), t[..., rot:]], -1)

        q, k = rotary(q), rotary(k)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
    context = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=attn.get("causal", False),
                                             scale=attn.get("softmax_scale")).transpose(1, 2)
    return F.linear(context.flatten(-2), sd[prefix + "out_proj.weight"], sd.get(prefix + "out_proj.bias"))


def hf_equivalent(config: dict):
    """transformers' model for a mamba_ssm config, as its conversion scripts build it (padded vocabulary)."""
    ssm = config["ssm_cfg"]
    multiple = config["pad_vocab_size_multiple"]
    vocab = -(-config["vocab_size"] // multiple) * multiple
    if ssm.get("layer", "Mamba1") == "Mamba1":
        expand = ssm.get("expand", 2)
        hf_config = MambaConfig(vocab_size=vocab, hidden_size=config["d_model"], state_size=mamba_ssm_d_state(ssm),
                                num_hidden_layers=config["n_layer"], expand=int(expand),
                                conv_kernel=ssm.get("d_conv", 4), time_step_rank=ssm.get("dt_rank", "auto"),
                                use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True),
                                tie_word_embeddings=config["tie_embeddings"])
        # mamba_ssm's Mamba: d_inner = int(expand * d_model), a float expand included (MambaConfig takes an int one)
        hf_config.intermediate_size = int(expand * config["d_model"])
        return MambaForCausalLM, hf_config
    d_inner = ssm.get("expand", 2) * config["d_model"]
    return Mamba2ForCausalLM, Mamba2Config(vocab_size=vocab, hidden_size=config["d_model"],
                                           state_size=mamba_ssm_d_state(ssm), num_hidden_layers=config["n_layer"],
                                           expand=ssm.get("expand", 2),
                                           head_dim=ssm["headdim"], num_heads=d_inner // ssm["headdim"],
                                           n_groups=ssm.get("ngroups", 1), chunk_size=ssm.get("chunk_size", 256),
                                           conv_kernel=ssm.get("d_conv", 4), use_bias=ssm.get("bias", False),
                                           use_conv_bias=ssm.get("conv_bias", True),
                                           tie_word_embeddings=config["tie_embeddings"])


def mamba_ssm_logits(config: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """MambaLMHeadModel.forward of mamba_ssm 2.3.2, transcribed (Block: Add -> RMSNorm -> mixer, GatedMLP,
    rms_norm_ref), with transformers' MambaMixer / Mamba2Mixer for the Mamba mixers and mamba_ssm's grouped gated
    RMSNorm (group_size = d_ssm // ngroups) in place of transformers' ungrouped one, `mamba_ssm_mha` for the MHA
    layers (attn_layer_idx)."""
    cls, hf_config = hf_equivalent(config)
    ssm = config["ssm_cfg"]

    def rms(x, w, eps=1e-5):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w

    h, residual = F.embedding(ids, sd["backbone.embedding.weight"]), None
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        if i in (config.get("attn_layer_idx") or []):
            mixer = functools.partial(mamba_ssm_mha, sd=sd, prefix=p + "mixer.", attn=config["attn_cfg"],
                                      d=config["d_model"])
        else:
            mixer = (MambaMixer if cls is MambaForCausalLM else Mamba2Mixer)(hf_config, layer_idx=i)
            mixer.load_state_dict({k.removeprefix(p + "mixer."): v for k, v in sd.items()
                                   if k.startswith(p + "mixer.")})
            if cls is Mamba2ForCausalLM:
                weight, group = mixer.norm.weight, mixer.intermediate_size // ssm.get("ngroups", 1)

                def grouped(x, z, weight=weight, group=group):
                    x = (x * F.silu(z)).unflatten(-1, (-1, group))
                    return rms(x, 1.0).flatten(-2) * weight

                mixer.norm.forward = grouped
        residual = h + residual if residual is not None else h
        h = mixer(rms(residual, sd[p + "norm.weight"]))
        if config.get("d_intermediate", 0):
            residual = h + residual
            y, gate = F.linear(rms(residual, sd[p + "norm2.weight"]), sd[p + "mlp.fc1.weight"]).chunk(2, dim=-1)
            h = F.linear(y * F.silu(gate), sd[p + "mlp.fc2.weight"])
    return F.linear(rms(h + residual, sd["backbone.norm_f.weight"]), sd["lm_head.weight"])


MAMBA_SSM_CASES = {
    "mamba1-tied-padded": {"d_model": 32, "n_layer": 2, "vocab_size": 250, "pad_vocab_size_multiple": 16,
                           "tie_embeddings": True, "ssm_cfg": {"d_state": 8}},
    "mamba2-untied": {"d_model": 32, "n_layer": 2, "vocab_size": 256, "pad_vocab_size_multiple": 8,
                      "tie_embeddings": False,
                      "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}},
    "mamba2-groups-mlp": {"d_model": 32, "n_layer": 2, "vocab_size": 250, "pad_vocab_size_multiple": 8,
                          "tie_embeddings": True, "d_intermediate": 100, "rms_norm": True, "residual_in_fp32": True,
                          "fused_add_norm": True, "attn_layer_idx": [], "attn_cfg": {},
                          "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8,
                                      "d_ssm": 64, "rmsnorm": True, "norm_before_gate": False}},
    "mamba1-mlp": {"d_model": 32, "n_layer": 2, "vocab_size": 256, "pad_vocab_size_multiple": 8,
                   "tie_embeddings": False, "d_intermediate": 128, "ssm_cfg": {"d_state": 4, "d_conv": 3}},
    # hybrids: MHA layers at attn_layer_idx (causal, no biases; RoPE over the whole head, or none)
    "mamba2-hybrid-rope-gqa-mlp": {"d_model": 32, "n_layer": 4, "vocab_size": 256, "pad_vocab_size_multiple": 8,
                                   "tie_embeddings": True, "d_intermediate": 128, "attn_layer_idx": [1, 3],
                                   "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "causal": True,
                                                "qkv_proj_bias": False, "out_proj_bias": False, "rotary_emb_dim": 8,
                                                "rotary_emb_base": 500.0},
                                   "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}},
    "mamba1-hybrid-norope-headdim": {"d_model": 32, "n_layer": 3, "vocab_size": 250, "pad_vocab_size_multiple": 8,
                                     "tie_embeddings": False, "attn_layer_idx": [0],
                                     "attn_cfg": {"num_heads": 2, "head_dim": 8, "causal": True, "qkv_proj_bias": False,
                                                  "out_proj_bias": False, "softmax_scale": 8 ** -0.5},
                                     "ssm_cfg": {"d_state": 4}},
}


def test_mamba_ssm_transcription_matches_transformers_model():
    # the hand transcription used as the oracle for MLP/group cases equals transformers' model where both apply
    for case in ("mamba1-tied-padded", "mamba2-untied"):
        config = MAMBA_SSM_CASES[case]
        sd = mamba_ssm_checkpoint(config)
        cls, hf_config = hf_equivalent(config)
        hf = cls(hf_config).eval()
        hf.load_state_dict(sd)  # transformers' load hook reads mamba_ssm's `embedding.` key
        ids = torch.randint(0, config["vocab_size"], (2, 13))
        with torch.no_grad():
            assert_logits(case, mamba_ssm_logits(config, sd, ids), hf(ids, use_cache=False).logits)


@pytest.mark.parametrize("case", list(MAMBA_SSM_CASES))
def test_mamba_ssm_converts_with_same_logits_and_round_trip(case, tmp_path):
    config = MAMBA_SSM_CASES[case]
    sd = mamba_ssm_checkpoint(config)
    save_mamba_ssm(config, sd, tmp_path / "src")
    assert detect_format(tmp_path / "src") == "mamba_ssm"
    convert(tmp_path / "src", tmp_path / "zoo")  # format detected from config.json
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    multiple = config["pad_vocab_size_multiple"]
    assert model.config.vocab_size == -(-config["vocab_size"] // multiple) * multiple
    ids = torch.randint(0, config["vocab_size"], (2, 13))
    with torch.no_grad():
        assert_logits(case, model(ids).logits, mamba_ssm_logits(config, sd, ids))
    if not config.get("d_intermediate") and config["ssm_cfg"].get("ngroups", 1) == 1 \
            and not config.get("attn_layer_idx"):
        cls, hf_config = hf_equivalent(config)
        hf = cls(hf_config).eval()
        hf.load_state_dict(sd)
        with torch.no_grad():
            assert torch.equal(greedy(model, ids[:1, :5]), greedy(hf, ids[:1, :5])), f"{case}: greedy tokens differ"

    convert(tmp_path / "zoo", tmp_path / "back", to_format="mamba_ssm")
    back_config, back_sd = load_mamba_ssm(tmp_path / "back")
    assert_same_tensors(case, back_sd, sd)
    again = from_mamba_ssm(back_config, back_sd)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_mamba_ssm_writes_what_mamba_ssm_reads(tmp_path):
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba2-tiny.yaml")))
    config, sd = to_mamba_ssm(model)
    save_mamba_ssm(config, sd, tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert set(on_disk) <= {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                            "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                            "tie_embeddings"}
    assert on_disk["ssm_cfg"]["layer"] == "Mamba2" and on_disk["ssm_cfg"]["headdim"] == 16
    assert "backbone.embedding.weight" in sd and "backbone.layers.3.mixer.dt_bias" in sd
    ids = torch.randint(0, 512, (1, 11))
    with torch.no_grad():
        assert_logits("mamba2-tiny", mamba_ssm_logits(on_disk, sd, ids), model(ids).logits)


# the keyword arguments mamba_ssm 2.3.2 takes: MambaConfig's fields (models/config_mamba.py), and ssm_cfg / attn_cfg,
# which create_block (models/mixer_seq_simple.py) passes to Mamba (modules/mamba_simple.py; "layer" popped first),
# Mamba2 (modules/mamba2.py) and MHA (modules/mha.py)
MAMBA_SSM_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                           "tie_embeddings"}
MAMBA_SSM_MAMBA1_ARGS = {"layer", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                         "dt_init_floor", "conv_bias", "bias", "use_fast_path"}
MAMBA_SSM_MAMBA2_ARGS = {"layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups",
                         "A_init_range", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max",
                         "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size", "use_mem_eff_path",
                         "sequence_parallel"}
MAMBA_SSM_MHA_ARGS = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
                      "softmax_scale", "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base",
                      "rotary_emb_interleaved"}
ZOO_TO_MAMBA_SSM = {
    "mamba1-bias-dt_rank": lambda: ZooConfig(vocab_size=250, d_model=32, layers="MM", ffn="none", mixers={
        "M": {"type": "mamba", "d_state": 8, "dt_rank": 3, "bias": True, "conv_bias": False}}),
    "mamba2-groups-mlp": lambda: ZooConfig(
        vocab_size=256, d_model=32, layers="MM", ffn={"type": "swiglu", "hidden": 128},
        mixers={"M": {"type": "mamba2", "d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 8}}),
    "hybrid-mamba2-attention-rope-gqa-mlp": lambda: ZooConfig(
        vocab_size=256, d_model=32, layers="MAMA", ffn={"type": "swiglu", "hidden": 128},
        mixers={"M": {"type": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 8},
                "A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0}}),
    "hybrid-mamba1-attention-norope": lambda: ZooConfig(
        vocab_size=256, d_model=32, layers="AMM", ffn="none", tie_embeddings=False,
        mixers={"M": {"type": "mamba", "d_state": 4}, "A": {"type": "attention", "n_heads": 2, "head_dim": 8,
                                                             "rope": False}}),
}


@pytest.mark.parametrize("case", list(ZOO_TO_MAMBA_SSM))
def test_mamba_ssm_export_has_the_keys_and_shapes_mamba_ssm_builds(case, tmp_path):
    # --to mamba_ssm of each kind it takes (Mamba, Mamba-2, hybrids with attention layers at attn_layer_idx) writes a
    # config.json MambaConfig(**...) and its mixers accept, and a state dict with exactly the keys and shapes
    # MambaLMHeadModel builds from it (load_state_dict is strict), computing the zoo model's logits
    torch.manual_seed(0)
    model = perturb(ZooForCausalLM(ZOO_TO_MAMBA_SSM[case]()))
    save_mamba_ssm(*to_mamba_ssm(model), tmp_path)
    config, sd = load_mamba_ssm(tmp_path)
    assert set(config) == MAMBA_SSM_CONFIG_FIELDS
    layer = config["ssm_cfg"].get("layer", "Mamba1")
    assert set(config["ssm_cfg"]) <= (MAMBA_SSM_MAMBA1_ARGS if layer == "Mamba1" else MAMBA_SSM_MAMBA2_ARGS)
    assert set(config["attn_cfg"]) <= MAMBA_SSM_MHA_ARGS
    kinds = [spec["type"] for spec in model.config.layer_specs()]
    assert config["attn_layer_idx"] == [i for i, kind in enumerate(kinds) if kind == "attention"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == mamba_ssm_shapes(config)
    ids = torch.randint(0, 250, (2, 11))
    with torch.no_grad():
        assert_logits(case, mamba_ssm_logits(config, sd, ids), model(ids).logits)
    assert_same_tensors(case, from_mamba_ssm(config, sd).state_dict(), model.state_dict())


def test_mamba_ssm_export_writes_an_expand_mamba_ssm_can_build(tmp_path):
    # mamba_ssm's Mamba2 takes d_inner = (expand * d_model) // world_size as it comes: the export wrote a float expand
    # as it was (2.0 from a config.json, zoo compare's budget-matched d_inner / d_model), a float width its
    # nn.Linear cannot be built with; and its Mamba truncates int(expand * d_model), one below the zoo's width for
    # 15 / 11 at d_model 11 (the zoo rounds it to 15)
    torch.manual_seed(0)
    mamba2 = {"type": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 8}
    model = perturb(ZooForCausalLM(ZooConfig(vocab_size=64, d_model=32, layers="MM", ffn="none",
                                             mixers={"M": {**mamba2, "expand": 2.0}})))
    config, sd = to_mamba_ssm(model)
    save_mamba_ssm(config, sd, tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    d_inner = (on_disk["ssm_cfg"]["expand"] * on_disk["d_model"]) // 1  # mamba2.Mamba2.__init__, world_size 1
    torch.nn.Linear(on_disk["d_model"], d_inner)  # (TypeError for a float width)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert_logits("expand 2.0", mamba_ssm_logits(on_disk, sd, ids), model(ids).logits)
    with torch.device("meta"):
        halves = ZooForCausalLM(ZooConfig(vocab_size=64, d_model=32, layers="MM", ffn="none",
                                          mixers={"M": {**mamba2, "expand": 1.5}}))
        truncated = ZooForCausalLM(ZooConfig(vocab_size=64, d_model=11, layers="M", ffn="none",
                                             mixers={"M": {"type": "mamba", "d_state": 4, "expand": 15 / 11}}))
        fine = ZooForCausalLM(ZooConfig(vocab_size=64, d_model=32, layers="M", ffn="none",
                                        mixers={"M": {"type": "mamba", "d_state": 4, "expand": 1.5}}))
    with pytest.raises(UnmappableError, match=r"expand=1\.5.*Mamba2 needs an integer"):
        to_mamba_ssm(halves)
    with pytest.raises(UnmappableError, match=r"expand=.*int\(expand·d_model\) = 14, not 15"):
        to_mamba_ssm(truncated)
    assert to_mamba_ssm(fine)[0]["ssm_cfg"]["expand"] == 1.5  # int(1.5 · 32) = 48: mamba_ssm's Mamba builds it


@pytest.mark.parametrize("d_model,expand,d_inner", [(33, 1.5, 49), (50, 2.3, 114)])
def test_a_mamba_ssm_mamba_whose_expand_times_d_model_is_not_whole_converts(d_model, expand, d_inner):
    # mamba_ssm's Mamba builds d_inner = int(expand·d_model): 49 for 1.5 at 33, which the zoo's mixer refused
    # ("expand·d_model an integer"), and 114 for 2.3 at 50 (114.99999999999999), which it rounded to 115, so that
    # the in_proj of 228 rows did not fit
    config = {"d_model": d_model, "n_layer": 2, "vocab_size": 64, "pad_vocab_size_multiple": 8,
              "tie_embeddings": True, "ssm_cfg": {"d_state": 4, "expand": expand}}
    sd = mamba_ssm_checkpoint(config)
    assert sd["backbone.layers.0.mixer.in_proj.weight"].shape[0] == 2 * d_inner
    model = from_mamba_ssm(config, sd)
    assert model.model.layers[0].mixer.d_inner == d_inner
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert_logits(f"expand {expand}", model(ids).logits, mamba_ssm_logits(config, sd, ids))
    back, back_sd = to_mamba_ssm(model)
    assert int(back["ssm_cfg"]["expand"] * d_model) == d_inner  # what mamba_ssm builds from the export
    assert_same_tensors("round trip", back_sd, sd)


def test_mamba_ssm_export_over_a_model_folder_leaves_no_stale_weights(tmp_path):
    # --to mamba_ssm wrote config.json and pytorch_model.bin into DST and left the rest: over an earlier export's
    # folder the old model.safetensors stayed, and load_mamba_ssm (zoo convert DST ...) read it, the old model's
    # weights under the new config, while mamba_ssm reads pytorch_model.bin
    config = MAMBA_SSM_CASES["mamba1-tied-padded"]
    old, new = (mamba_ssm_checkpoint(config, seed) for seed in (0, 1))
    save_mamba_ssm(config, old, tmp_path / "old")
    save_mamba_ssm(config, new, tmp_path / "new")
    convert(tmp_path / "old", tmp_path / "out", to_format="hf-mamba")
    convert(tmp_path / "new", tmp_path / "out", to_format="mamba_ssm")
    assert_same_tensors("re-export", load_mamba_ssm(tmp_path / "out")[1], new)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("to_format", [None, "mamba_ssm"])
@pytest.mark.parametrize("foreign", ['{"editor": {"tabSize": 4}, "name": "my project"}', "[1, 2]", "not json"],
                         ids=["other-object", "list", "invalid"])
def test_convert_into_a_folder_whose_config_json_is_not_a_models_is_refused_and_writes_nothing(tmp_path, capsys,
                                                                                                to_format, foreign):
    # zoo convert SRC DST (and save_model_folder, zoo graft) into an existing folder holding another tool's
    # config.json replaced it with the model's without a word, as it replaces an earlier save's
    torch.manual_seed(0)
    ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).save_pretrained(tmp_path / "src")
    dst = tmp_path / "project"
    dst.mkdir()
    (dst / "config.json").write_text(foreign)
    (dst / "notes.txt").write_text("mine")
    argv = [str(tmp_path / "src"), str(dst)] + (["--to", to_format] if to_format else [])
    with pytest.raises(ValueError, match=r"holds a config.json that is not a model's config .*which the model saved "
                                         r"here would replace"):
        main(argv)
    assert (dst / "config.json").read_text() == foreign and sorted(p.name for p in dst.iterdir()) == \
        ["config.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "src"]  # nor written beside it
    (dst / "config.json").unlink()  # a folder of other files alone is written into, its files kept
    main(argv)
    assert "notes.txt" in {p.name for p in dst.iterdir()} and detect_format(dst) == (to_format or "zoo")
    main(argv)  # and so is an earlier save's folder


MHA_MAPPABLE = {"num_heads": 4, "causal": True, "qkv_proj_bias": False, "out_proj_bias": False, "rotary_emb_dim": 8}
MAMBA_SSM_UNMAPPABLE = [
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "d_ssm": 32}}, "d_ssm"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "dt_limit": [0.0, 0.5]}}, "dt_limit"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "D_has_hdim": True}}, "D_has_hdim"),
    ({"ssm_cfg": {"d_state": 8}, "rms_norm": False}, "rms_norm"),
    # MHA options the zoo's attention has one value of; MHA's defaults (biases on, causal off) included
    *[({"ssm_cfg": {"d_state": 8}, "attn_layer_idx": [1], "attn_cfg": {**MHA_MAPPABLE, **cfg}}, option)
      for cfg, option in [({"qkv_proj_bias": None}, r"attn_cfg.qkv_proj_bias=True .*leaves it at MHA's default"),
                          ({"out_proj_bias": True}, r"attn_cfg.out_proj_bias=True"),
                          ({"causal": None}, r"attn_cfg.causal=False .*leaves it at MHA's default"),
                          ({"d_conv": 4}, r"attn_cfg.d_conv=4"), ({"mlp_dim": 64}, r"attn_cfg.mlp_dim=64"),
                          ({"softmax_scale": 0.5}, r"attn_cfg.softmax_scale=0.5"),
                          ({"rotary_emb_dim": 4}, r"attn_cfg.rotary_emb_dim=4 .*whole head \(head_dim 8\)"),
                          ({"rotary_emb_interleaved": True}, r"attn_cfg.rotary_emb_interleaved=True"),
                          ({"num_heads": None}, r"attn_cfg.num_heads=None"),
                          ({"foo": 1}, r"attn_cfg.foo=1 .*unknown MHA option")]],
    ({"ssm_cfg": {"d_state": 8, "foo": 1}}, "ssm_cfg.foo"),
]


@pytest.mark.parametrize("override,option", MAMBA_SSM_UNMAPPABLE,
                         ids=[re.split(r"[= ]", c[1])[0] for c in MAMBA_SSM_UNMAPPABLE])
def test_mamba_ssm_unmappable_is_a_named_error(override, option):
    config = {"d_model": 32, "n_layer": 2, "vocab_size": 64, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
              **override}
    if "attn_cfg" in config:  # (None: left out, at MHA's default)
        config["attn_cfg"] = {k: v for k, v in config["attn_cfg"].items() if v is not None}
    with pytest.raises(UnmappableError, match=option):
        from_mamba_ssm(config, {})


def test_mamba_ssm_state_dict_of_another_layout_is_a_named_error():
    # a MixerModel's state dict (no `backbone.` prefix) ended in KeyError: 'backbone.embedding.weight' (a traceback)
    config = MAMBA_SSM_CASES["mamba1-tied-padded"]
    sd = {k.removeprefix("backbone."): v for k, v in mamba_ssm_checkpoint(config).items()}
    with pytest.raises(UnmappableError, match="no 'backbone.embedding.weight'.*MambaLMHeadModel"):
        from_mamba_ssm(config, sd)


@pytest.mark.parametrize("weights,what", [(lambda sd: sd["lm_head.weight"], "a Tensor"),
                                          (lambda sd: list(sd.values()), "a list"),
                                          (lambda sd: {"model": sd, "step": 3}, r"a dict of .*under 'model'")],
                         ids=["tensor", "list", "training-checkpoint"])
def test_mamba_ssm_weights_that_are_no_state_dict_are_named(weights, what, tmp_path):
    # a pytorch_model.bin holding a bare tensor ended in "TypeError: cannot convert dictionary update sequence" (a
    # traceback), a list in "no 'backbone.embedding.weight' (its first keys: [tensor(...)])", and a training
    # checkpoint ({"model": state dict, "step": ...}) named its keys with no word of where the state dict was
    config = MAMBA_SSM_CASES["mamba1-tied-padded"]
    with pytest.raises(UnmappableError, match=rf"the weights are {what}.*not a state dict"):
        from_mamba_ssm(config, weights(mamba_ssm_checkpoint(config)))


def test_mamba_ssm_config_with_a_null_ssm_cfg_converts():
    # mamba_ssm's create_block takes ssm_cfg None as {} (Mamba1 with its defaults): a config.json with "ssm_cfg": null
    # builds in mamba_ssm, and from_mamba_ssm ended in TypeError: 'NoneType' object is not iterable
    config = {**MAMBA_SSM_CASES["mamba1-tied-padded"], "ssm_cfg": {}}
    sd = mamba_ssm_checkpoint(config)
    model = from_mamba_ssm({**config, "ssm_cfg": None, "attn_layer_idx": None, "attn_cfg": None}, sd)
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    with torch.no_grad():
        assert_logits("ssm_cfg null", model(ids).logits, mamba_ssm_logits(config, sd, ids))


@pytest.mark.parametrize("field,value,what", [
    ("pad_vocab_size_multiple", 0, "an integer above 0"), ("n_layer", "2", "an integer above 0"),
    ("vocab_size", "64", "an integer above 0"), ("d_model", True, "an integer above 0"),
    ("d_intermediate", None, "an integer of at least 0"), ("d_intermediate", -128, "an integer of at least 0"),
    ("attn_layer_idx", 1, "a list of layer indices"), ("attn_layer_idx", ["1"], "a list of layer indices"),
    ("ssm_cfg", "Mamba2", "an object of keyword arguments"), ("rms_norm", "true", "true or false"),
])
def test_a_mamba_ssm_config_field_of_another_type_is_named(field, value, what):
    # a hand-edited config.json ended in a traceback naming no field: ZeroDivisionError (pad_vocab_size_multiple 0),
    # TypeError ("n_layer": "2", "attn_layer_idx": 1), or a dict() error ("dictionary update sequence element #0");
    # d_intermediate null converted as no MLP, where mamba_ssm's GatedMLP(hidden_features=None) takes its default
    config = {"d_model": 32, "n_layer": 2, "vocab_size": 64, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
              field: value}
    with pytest.raises(ValueError, match=rf"config.json's {field}=.* is not {what}"):
        from_mamba_ssm(config, {})


def test_a_mamba_ssm_config_with_whole_floats_converts():
    # "n_layer": 2.0 ended in TypeError: 'float' object cannot be interpreted as an integer (range)
    config = {**MAMBA_SSM_CASES["mamba1-tied-padded"], "ssm_cfg": {}}
    sd = mamba_ssm_checkpoint(config)
    model = from_mamba_ssm({**config, "d_model": float(config["d_model"]), "n_layer": float(config["n_layer"])}, sd)
    assert model.config.d_model == config["d_model"] and isinstance(model.config.d_model, int)


def test_load_mamba_ssm_reads_the_weights_file_mamba_ssm_reads(tmp_path):
    # MambaLMHeadModel.from_pretrained reads pytorch_model.bin only; load_mamba_ssm preferred a model.safetensors beside
    # it, so save_mamba_ssm into a folder an earlier save had left one in was read back (and converted) as the old model
    from safetensors.torch import save_file

    config = MAMBA_SSM_CASES["mamba1-mlp"]
    old, new = (mamba_ssm_checkpoint(config, seed) for seed in (0, 1))
    save_mamba_ssm(config, new, tmp_path)
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "model.safetensors")
    assert_same_tensors("bin beside safetensors", load_mamba_ssm(tmp_path)[1], new)
    (tmp_path / "pytorch_model.bin").unlink()  # a folder with safetensors alone still loads
    assert_same_tensors("safetensors alone", load_mamba_ssm(tmp_path)[1], old)


def test_save_mamba_ssm_leaves_no_partial_folder_nor_earlier_weights(tmp_path, monkeypatch):
    # save_mamba_ssm wrote config.json, then pytorch_model.bin, into the folder itself: an interrupted save left a
    # config.json without weights (or a bin cut short), and into a folder of an earlier hf export its model.safetensors
    # stayed beside the new bin
    from safetensors.torch import save_file

    config = MAMBA_SSM_CASES["mamba1-mlp"]
    old, new = (mamba_ssm_checkpoint(config, seed) for seed in (0, 1))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_mamba_ssm(config, new, tmp_path / "new")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "old" / "model.safetensors")
    save_mamba_ssm(config, new, tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["config.json", "pytorch_model.bin"]


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


def _lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")


@pytest.mark.parametrize("fmt", ["hf-mamba", "zoo", "mamba_ssm"])
@pytest.mark.parametrize("damage,message", [(_lfs_pointer, "is a Git LFS pointer, not the weights"),
                                            (_cut_short, "cannot be read .*cut short or corrupted"),
                                            (lambda path: path.write_bytes(b""), "cannot be read"),
                                            (lambda path: path.write_text("not the weights\n" * 10), "cannot be read")],
                         ids=["lfs-pointer", "cut-short", "empty", "other-bytes"])
def test_a_weights_file_that_cannot_be_read_is_named(fmt, damage, message, tmp_path):
    # a clone without git-lfs (pointer files in place of the weights) or an interrupted download ended in
    # safetensors' SafetensorError, torch's RuntimeError (PytorchStreamReader), EOFError or pickle's UnpicklingError
    # (advising weights_only=False), each a traceback naming no file
    # (a pytorch_model.bin of other bytes, text here, in a bare "KeyError: 101" of torch.load's unpickler, from
    # load_mamba_ssm too)
    torch.manual_seed(0)
    model = ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml"))
    src = tmp_path / "src"
    if fmt == "mamba_ssm":
        save_mamba_ssm(*to_mamba_ssm(model), src)
        weights = src / "pytorch_model.bin"
    else:
        (to_hf_mamba(model) if fmt == "hf-mamba" else model).save_pretrained(src)
        weights = src / "model.safetensors"
    damage(weights)
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    if fmt == "mamba_ssm":
        with pytest.raises(ValueError, match=message):
            load_mamba_ssm(src)


def test_the_download_command_an_error_advises_is_one_huggingface_hub_installs(tmp_path, monkeypatch):
    # the advice for a hub id given as zoo convert's source, and for a Git LFS pointer in place of the weights, was
    # `huggingface-cli download ...`, a command huggingface_hub no longer installs (its CLI is `hf` since 1.0)
    # (huggingface_hub 1.x still installs `huggingface-cli`, as a stub that says it no longer works and runs nothing:
    # counted as installed, the old advice passed under the lowest supported huggingface_hub)
    import importlib.metadata

    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")
               if e.value.startswith("huggingface_hub") and "deprecated" not in e.value}
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ZooForCausalLM(ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")).save_pretrained(tmp_path / "src")
    _lfs_pointer(tmp_path / "src" / "model.safetensors")
    for src in ("org/nosuch", tmp_path / "src"):
        with pytest.raises(ValueError) as e:
            convert(src, tmp_path / "out")
        commands = re.findall(r"`(\S+) download ", str(e.value))
        assert commands and set(commands) <= scripts, (str(e.value), scripts)


def test_a_folder_holding_a_peft_adapter_beside_its_model_is_refused(tmp_path):
    # from_pretrained applies an adapter_config.json it finds in the folder: load_as_zoo (zoo convert, zoo graft) gave a
    # model with LoRA layers, which zoo convert then failed to save ("The version of PEFT ...") or, for a transformers
    # folder, refused as weights that do not fit, naming lora_A keys
    import shutil

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    HF_SOURCES["hf-llama"][1](HF_SOURCES["hf-llama"][2]()).save_pretrained(tmp_path / "llama")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "llama"),
                                LoraConfig(target_modules=["q_proj"], r=2))
    peft_model.save_pretrained(tmp_path / "adapter")
    convert(tmp_path / "llama", tmp_path / "zoo")
    for folder in ("llama", "zoo"):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(tmp_path / "adapter" / name, tmp_path / folder / name)
        with pytest.raises(ValueError, match=r"holds a PEFT adapter \(adapter_config.json\) beside its model"):
            load_as_zoo(tmp_path / folder)
