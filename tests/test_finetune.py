"""LoRA finetuning: adapters reach every targeted projection of every mixer (CPU reference paths)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (
    accelerate_launch,
    assert_close,
    cpu_launch_env,
    ctrl_c_on_call,
    ctrl_c_on_step,
    launch_fsdp_on_cpu,
    run_launch,
)
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import zoo  # noqa: F401  (registers the Auto classes)
from zoo.cache import RecurrentLayer, output_cache
from zoo.config import ZooConfig
from zoo.finetune import (
    check_lora_reached,
    default_lora_targets,
    encode_rows,
    load_finetune_config,
    main,
    pad_collate,
    wrap_lora,
)
from zoo.hub import load_folder_tokenizer
from zoo.layers import MoE, SwiGLU

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["mamba", "mamba2", "transformerpp", "gla", "jamba"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small run fastest on one thread (and several threads thrash on a busy CI machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{name}-tiny.yaml"))


def mqar_finetune_runs(tmp_path: Path, train: dict, lora: dict | None = None, optim: dict | None = None):
    """A tiny Mamba base saved in tmp_path and an MQAR finetune config of it (train / lora / optim sections on top of
    the usual ones); returns run(name, *overrides), which runs `zoo finetune` into tmp_path / name."""
    from zoo.cli import _run

    tiny("mamba").save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"progress_bar": False, **train}, "lora": {"r": 4, **(lora or {})},
              "optim": {"lr": 1e-2, **(optim or {})}, "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))

    def run(name: str, *extra: str):
        return _run("zoo finetune", main, [str(tmp_path / "ft.yaml"), f"--output_dir={tmp_path / name}", *extra])

    return run


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def randomize_lora_b(model: nn.Module, std: float = 0.2) -> None:
    """PEFT initializes B to zero (the adapter starts as a no-op); give it values so it changes things."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)


def wrapped(name: str, **kwargs) -> nn.Module:
    model = wrap_lora(tiny(name), r=4, alpha=8, include_mlp=True, verbose=False, **kwargs)
    randomize_lora_b(model)
    return model.eval()


def batch(vocab: int = 512, B: int = 2, T: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_default_targets_are_the_mixers_lora_targets(name):
    model = tiny(name)
    mixer_names, mlp_names = set(), set()
    for i, block in enumerate(model.model.layers):
        mixer_names |= {f"model.layers.{i}.mixer.{t}" for t in block.mixer.lora_targets}
        if isinstance(block.ffn, SwiGLU):
            mlp_names |= {f"model.layers.{i}.ffn.{t}" for t in SwiGLU.lora_targets}
        elif isinstance(block.ffn, MoE):
            mlp_names |= {f"model.layers.{i}.ffn.experts.{e}.{t}" for e in range(block.ffn.n_experts)
                          for t in SwiGLU.lora_targets}
    assert set(default_lora_targets(model)) == mixer_names
    assert set(default_lora_targets(model, include_mlp=True)) == mixer_names | mlp_names
    assert len(default_lora_targets(model, include_mlp=True)) == len(mixer_names | mlp_names)


@pytest.mark.parametrize("name", MODELS)
def test_every_adapted_module_and_the_model_output_change(name):
    model = wrapped(name)
    modules = lora_modules(model)
    assert set(modules) == set(default_lora_targets(model, include_mlp=True))
    deltas: dict[str, float] = {}

    def hook(module, args, out, name):
        with torch.no_grad():  # this module's own LoRA contribution, on the input it actually got
            deltas[name] = max(deltas.get(name, 0.0), (out - module.base_layer(args[0])).abs().max().item())

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in modules.items()]
    ids = batch()
    with torch.no_grad():
        adapted = model(input_ids=ids, use_cache=False).logits
        parallel = dict(deltas)
        cache = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
        deltas.clear()
        step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits  # the decode path
        decode = dict(deltas)
    for h in handles:
        h.remove()
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids, use_cache=False).logits
    assert not set(modules) - set(parallel), f"adapted modules that never ran: {sorted(set(modules) - set(parallel))}"
    unchanged = [n for n, d in parallel.items() if d < 1e-6]
    assert not unchanged, f"adapters that did not change their module's output: {unchanged}"
    mixer_modules = {n for n in modules if ".mixer." in n}  # (a decode step reaches only the routed experts)
    assert mixer_modules <= set(decode), f"never ran in a decode step: {sorted(mixer_modules - set(decode))}"
    unchanged = [n for n, d in decode.items() if d < 1e-6]
    assert not unchanged, f"adapters that did not change their module's output in a decode step: {unchanged}"
    assert (adapted - plain).abs().max() > 1e-4, "the adapters left the model output unchanged"
    assert_close("decode step vs parallel (adapted)", step[:, -1], adapted[:, -1], 1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_lora_parameter(name):
    model = wrapped(name).train()
    ids = batch()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(lora_modules(model))
    no_grad = [n for n, p in lora.items() if p.grad is None or p.grad.abs().max() == 0]
    assert not no_grad, f"LoRA parameters without a gradient: {no_grad}"
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n), "base weights not frozen"


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unload_equals_adapted(name):
    model = wrapped(name)
    ids = batch()
    with torch.no_grad():
        adapted = model(input_ids=ids, use_cache=False).logits
        merged = model.merge_and_unload()
        assert not lora_modules_in(merged)
        assert_close("merged logits", merged(input_ids=ids, use_cache=False).logits, adapted, 1e-5)


def lora_modules_in(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if "lora_" in n]


@pytest.mark.parametrize("name", MODELS)
def test_adapter_save_reload_gives_identical_logits(name, tmp_path):
    from peft import PeftModel

    tiny(name).save_pretrained(tmp_path / "base")
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), r=4, include_mlp=True, verbose=False)
    randomize_lora_b(model)
    model.eval().save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    saved, loaded = dict(model.named_parameters()), dict(reloaded.named_parameters())
    assert saved.keys() == loaded.keys()
    changed = [n for n in saved if not torch.equal(saved[n], loaded[n])]
    assert not changed, f"reloaded weights differ: {changed}"
    ids = batch()
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False).logits
        b = reloaded(input_ids=ids, use_cache=False).logits
    # the same weights; CPU matmul kernels may still round differently with the tensors' memory alignment (about
    # 1.5e-7 per layer, 1.1e-6 after jamba-tiny's 8 layers; a lost adapter is off by order 1)
    assert_close("reloaded logits", b, a, 1e-5)


def test_all_linear_adapts_every_mixer_projection():
    model = wrap_lora(tiny("jamba"), target_modules="all-linear", verbose=False)
    report = model.zoo_lora_report
    for row in report["layers"]:
        assert not row["not_adapted"], f"layer {row['layer']}: {row['not_adapted']} not adapted"
        assert set(row["mixer_modules"]) >= set(model.get_base_model().model.layers[row["layer"]].mixer.lora_targets)
    assert "lm_head" not in report["adapted"]  # PEFT leaves the (tied) output layer alone
    assert report["probe"]["phases"] == ["train forward", "prefill", "decode step"]


@pytest.mark.parametrize("targets, bad", [
    (["nonexistent_proj"], ["nonexistent_proj"]),
    (["in_proj", "q_prj"], ["q_prj"]),
    (r".*\.mixer\.nothing", [r".*\.mixer\.nothing"]),
], ids=["none", "one-of-two", "regex"])
def test_targets_that_match_nothing_raise(targets, bad):
    with pytest.raises(ValueError, match="match no module") as info:
        wrap_lora(tiny("jamba"), target_modules=targets, verbose=False)
    assert str(bad) in str(info.value)
    # the names it shows are of modules LoRA wraps (the projections), not the model's outer containers
    assert "'model.layers.0.mixer.in_proj'" in str(info.value) and "'model.embeddings'" not in str(info.value)


def test_targets_that_match_nothing_name_gpt2s_conv1d_projections():
    # GPT-2's projections are transformers' Conv1D, not nn.Linear: the examples were an empty list
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="match no module") as info:
        wrap_lora(model, target_modules=["nope"], verbose=False)
    assert "'transformer.h.0.attn.c_attn'" in str(info.value)


def test_include_mlp_with_explicit_targets_raises():
    with pytest.raises(ValueError, match="include_mlp"):
        wrap_lora(tiny("mamba"), target_modules=["in_proj"], include_mlp=True, verbose=False)


class WeightReadingMixer(nn.Module):
    """A mixer whose out_proj is applied by reading .weight, as a fused kernel would (on `fused_on` paths)."""

    lora_targets = ("in_proj", "out_proj")

    def __init__(self, d_model: int, fused_on: str):
        super().__init__()
        self.fused_on = fused_on
        self.in_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size, dtype, device, max_len=None):
        return RecurrentLayer()

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        h = F.silu(self.in_proj(x))
        stepping = cache is not None and x.shape[1] == 1
        if self.fused_on == "all" or (self.fused_on == "decode" and stepping) or (self.fused_on == "eval"
                                                                                 and not self.training):
            return F.linear(h, self.out_proj.weight)  # the adapter on out_proj is silently skipped
        return self.out_proj(h)


@pytest.mark.parametrize("fused_on, phase", [("all", "train forward"), ("decode", "decode step")],
                         ids=["every-path", "decode-only"])
def test_an_adapter_bypassed_by_a_weight_reading_kernel_raises(fused_on, phase):
    model = tiny("transformerpp")
    model.model.layers[1].mixer = WeightReadingMixer(model.config.d_model, fused_on)
    with pytest.raises(ValueError, match="bypassed") as info:
        wrap_lora(model, target_modules=["mixer.in_proj", "mixer.out_proj"], verbose=False)
    message = str(info.value)
    assert "model.layers.1.mixer.out_proj" in message and phase in message
    assert "model.layers.1.mixer.in_proj" not in message and "layers.0" not in message


def test_every_expert_is_reached_by_the_check():
    model = wrap_lora(tiny("jamba"), include_mlp=True, check_forward=False, verbose=False)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.top_k = 1  # with top-1 routing, a probe of two tokens reaches at most two of the four experts
    probe = check_lora_reached(model, seq_len=2, batch_size=1)
    assert probe["modules"] == len(lora_modules(model))
    assert all(m.top_k == 1 for m in model.modules() if isinstance(m, MoE)), "routing not restored"


def test_prompt_completion_loss_is_on_the_completion_only():
    from zoo.data.text import ByteTokenizer

    tok = ByteTokenizer()
    rows, dropped = encode_rows([{"prompt": "ab", "completion": "xyz"}, {"text": "hi"},
                                 {"prompt": "long prompt", "completion": "c"}], tok, seq_len=8)
    assert dropped == 1  # the last row's completion lies past seq_len
    pc, text = rows
    assert pc["input_ids"].tolist() == [tok.bos_token_id, *b"abxyz", tok.eos_token_id]
    assert pc["labels"].tolist() == [-100, -100, -100, *b"xyz", tok.eos_token_id]
    assert text["labels"].tolist() == [-100, *b"hi", tok.eos_token_id]
    padded = pad_collate(rows, pad_id=tok.pad_token_id)
    assert padded["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert padded["labels"][1, 4:].tolist() == [-100] * 3


def _sentencepiece_like_tokenizer():
    """One token per character, after a Metaspace prefix space ('▁') at the start of a text as Llama's and Mistral's
    SentencePiece tokenizers put one, and one merge, 'a' + 'b' -> 'ab'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:+=?"]
    vocab = {c: i for i, c in enumerate([*chars, "ab", "<s>", "</s>"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="always", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.mark.parametrize("prompt,completion", [("2+2=", "4"), ("Capital? A: ", "Paris"), ("Capital? A:", " Paris")],
                         ids=["no-space", "prompt-ends-in-space", "completion-begins-with-space"])
def test_a_completion_is_tokenized_as_the_rest_of_prompt_and_completion(prompt, completion):
    # tokenized alone, the completion began as a text begins: a SentencePiece tokenizer put its prefix space before
    # it, and the row trained "2+2= 4" (a space the text does not hold), "A:  Paris" (two)
    tok = _sentencepiece_like_tokenizer()
    whole = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    (row,), _ = encode_rows([{"prompt": prompt, "completion": completion}], tok)
    assert row["input_ids"].tolist() == [tok.bos_token_id, *whole, tok.eos_token_id]
    assert row["labels"].tolist() == [-100] * (1 + n) + whole[n:] + [tok.eos_token_id]
    assert tok.decode(row["input_ids"], skip_special_tokens=True) == prompt + completion


def test_a_token_across_the_prompt_completion_boundary_is_counted():
    tok = _sentencepiece_like_tokenizer()
    rows = [{"prompt": "xa", "completion": "b"}, {"prompt": "xa", "completion": "c"}, {"text": "ab"}]
    with pytest.warns(UserWarning, match=r"data: in 1 of 2 prompt/completion rows a token of prompt \+ completion "
                                         r"spans the boundary"):
        spanned, plain, text = encode_rows(rows, tok)[0]
    # the prompt as a prompt is tokenized at generation, the completion alone (its prefix space and all)
    alone = tok("b", add_special_tokens=False)["input_ids"]
    assert spanned["labels"].tolist()[-len(alone) - 1:-1] == alone
    assert plain["labels"].tolist()[-2:] == [tok.convert_tokens_to_ids("c"), tok.eos_token_id]


@pytest.mark.parametrize("add_eos", [True, False])
def test_rows_that_end_in_the_eos_tokens_text_are_counted(add_eos):
    # rows written for TRL's SFTTrainer, which takes a completion's trailing '</s>' for the eos token, trained the
    # model to write the token's text out (special-token spellings in data stay text), without a word
    from zoo.data.text import ByteTokenizer

    tok = ByteTokenizer()
    rows = [{"prompt": "q", "completion": "a<eos>"}, {"text": "b<eos>\n"}, {"prompt": "q", "completion": "c"}]
    then = r" \(data.add_eos appends that after it\)" if add_eos else r".*set data.add_eos: true"
    with pytest.warns(UserWarning, match=r"data: 2 of 3 rows end in '<eos>', the eos token's text, which is tokenized "
                                         r"as plain text, not as the eos token" + then):
        encoded, _ = encode_rows(rows, tok, add_eos=add_eos)
    assert encoded[0]["input_ids"].tolist() == [tok.bos_token_id, *b"qa<eos>"] + [tok.eos_token_id] * add_eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_rows(rows[2:], tok, add_eos=add_eos)


def test_finetune_command_on_prompt_completion_rows(tmp_path, monkeypatch):
    from zoo.data.text import ByteTokenizer

    base = tmp_path / "base"
    tiny("mamba").save_pretrained(base)
    ByteTokenizer().save_pretrained(base)
    rows = [{"prompt": f"{w} reversed:", "completion": f" {w[::-1]}"} for w in
            ["abc", "hello", "zoo", "mamba", "lora", "state", "token", "merge", "adapter", "layer"]]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)  # the model given relative to the working directory
    config = {"model": "base", "output_dir": str(tmp_path / "run"),
              "data": {"source": str(tmp_path / "data.jsonl"), "holdout": 0.2, "seq_len": 64},
              "train": {"max_steps": 4, "micro_batch_size": 4, "progress_bar": False, "log_every": 2},
              "optim": {"lr": 1e-2}, "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    result = main([str(tmp_path / "ft.yaml"), "--lora.r=4"])
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())  # loadable from any directory
    assert result["after"]["n_targets"] == result["before"]["n_targets"] > 0
    assert result["after"]["loss"] < result["before"]["loss"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert not lora_modules_in(merged)
    assert json.loads((tmp_path / "run" / "finetune_result.json").read_text())["merge_max_abs_diff"] < 1e-3


def test_zoo_generate_prompts_a_finetune_without_bos_as_its_rows_began(tmp_path, monkeypatch, capsys):
    # data.add_bos false trains on rows without <bos>, but merged/ did not say so and zoo generate started every
    # prompt with <bos> (257 of the byte tokenizer), a start the finetuned model never saw
    from zoo import cli
    from zoo.data.text import ByteTokenizer
    from zoo.modeling import ZooForCausalLM

    base = tmp_path / "base"
    tiny("mamba").save_pretrained(base)
    ByteTokenizer().save_pretrained(base)
    rows = [{"prompt": f"{w} reversed:", "completion": f" {w[::-1]}"} for w in ["abc", "hello", "zoo", "lora"]]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seen = []
    original = ZooForCausalLM.generate

    def generate(self, input_ids=None, **kwargs):
        seen.append(input_ids[0].tolist())
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(ZooForCausalLM, "generate", generate)
    for add_bos in (False, True):
        config = {"model": str(base), "output_dir": str(tmp_path / f"run-{add_bos}"),
                  "data": {"source": str(tmp_path / "data.jsonl"), "holdout": 0.25, "add_bos": add_bos},
                  "train": {"max_steps": 1, "micro_batch_size": 2, "progress_bar": False},
                  "schedule": {"warmup_steps": 0}}
        (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
        main([str(tmp_path / "ft.yaml")])
        cli.main(["generate", str(tmp_path / f"run-{add_bos}" / "merged"), "hi", "--max-new-tokens", "1"])
        # the adapter folder alike (zoo generate takes it, onto its base model's config, which says nothing of it)
        cli.main(["generate", str(tmp_path / f"run-{add_bos}" / "adapter"), "hi", "--max-new-tokens", "1"])
    assert seen == [[ord("h"), ord("i")]] * 2 + [[257, ord("h"), ord("i")]] * 2
    assert capsys.readouterr().out.splitlines()[-1].startswith("hi")


def test_shipped_mqar_recipe_runs_shortened(tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}", "pretrain.train.max_steps=3", "train.max_steps=3",
                 "pretrain.schedule.warmup_steps=1", "schedule.warmup_steps=1", "data.n_eval=16",
                 "pretrain.data.n_eval=16", "train.progress_bar=false", "pretrain.train.progress_bar=false",
                 "pretrain.train.micro_batch_size=8", "train.micro_batch_size=8"]
    cfg = load_finetune_config(ROOT / "configs" / "train" / "finetune-mqar.yaml", overrides)
    assert cfg.pretrain is not None and cfg.data.task == "mqar"
    argv = [str(ROOT / "configs" / "train" / "finetune-mqar.yaml"), *[f"--{o}" for o in overrides]]
    result = main(argv)
    weights = tmp_path / "run" / "base" / "model.safetensors"
    assert weights.is_file()
    assert result["before"]["n_targets"] == 16 * cfg.data.task_kwargs["n_kv"]
    assert 0.0 <= result["after"]["accuracy"] <= 1.0
    written = weights.stat().st_mtime_ns
    # same pretrain section but for its logging: the base is reused
    again = main([*argv, "--train.max_steps=2", "--lora.r=2", "--pretrain.train.log_every=1",
                  "--pretrain.train.progress_bar=true", "--pretrain.train.eval_batch_size=4"])
    assert weights.stat().st_mtime_ns == written and again["pretrain"] == result["pretrain"]
    assert again["before"] == result["before"]
    precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"  # auto's here
    main([*argv, f"--train.precision={precision}"])  # the precision auto ran in: the same base
    assert weights.stat().st_mtime_ns == written


def short_mqar_finetune(tmp_path) -> list[str]:
    """`zoo finetune` arguments of configs/train/finetune-mqar.yaml cut to a 2-step pretrain and a 1-step finetune."""
    overrides = [f"output_dir={tmp_path / 'run'}", "pretrain.train.max_steps=2", "train.max_steps=1",
                 "pretrain.schedule.warmup_steps=1", "schedule.warmup_steps=0", "data.n_eval=4",
                 "pretrain.data.n_eval=4", "train.progress_bar=false", "pretrain.train.progress_bar=false",
                 "pretrain.train.micro_batch_size=4", "train.micro_batch_size=4"]
    return [str(ROOT / "configs" / "train" / "finetune-mqar.yaml"), *[f"--{o}" for o in overrides]]


def test_a_pretrain_seed_that_draws_the_finetunes_held_out_rows_is_refused(tmp_path):
    """The finetune holds out the rows of data.seed + 1: a pretrain section with that seed (and the finetune's task
    settings) pretrained the base on them, and the accuracy before and after was measured on its training rows."""
    from zoo.data.synthetic import shared_item
    from zoo.finetune import build_datasets

    same = ["--pretrain.data.seq_len=32", "--pretrain.data.task_kwargs.n_kv=4"]  # the finetune's settings
    with pytest.raises(ValueError, match=r"^pretrain\.data\.seed: 2 pretrains on the mqar rows that the finetune holds "
                                         r"out to evaluate \(seed data\.seed \+ 1 = 2: its row 0 is pretraining row 0 "
                                         r"of 8\)"):
        main([*short_mqar_finetune(tmp_path), *same, "--pretrain.data.seed=2"])
    assert not (tmp_path / "run" / "base").exists()  # refused before the pretrain phase
    # what it refuses: the held-out rows were the pretraining rows themselves
    args = short_mqar_finetune(tmp_path)
    cfg = load_finetune_config(args[0], [a[2:] for a in [*args[1:], *same, "--pretrain.data.seed=2"]])
    pretrained, _ = build_datasets(cfg.pretrain.data, n_train=8)
    _, held_out = build_datasets(cfg.data)
    assert torch.equal(pretrained[0]["input_ids"], held_out[0]["input_ids"])
    # seeds a few apart share no row, nor do the shipped recipe's (pretrain seed 0; finetune rows of seed 1, held out 2)
    assert shared_item(0, 10**6, 2, 10**6) is None and shared_item(3, 5, 5, 5) is None
    assert shared_item(7, 1, 7, 1) == (0, 0) and shared_item(0, 2**32, 2, 1) is not None  # (every item seed, drawn)


def test_a_pretrained_base_is_reused_only_in_the_precision_it_was_trained_in(tmp_path, monkeypatch):
    # the stamp recorded train.precision's name: under auto, a base pretrained by a bf16 launch was reused by an fp32
    # one (and the reverse)
    argv = short_mqar_finetune(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    main(argv)
    weights = tmp_path / "run" / "base" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    main(argv)
    assert weights.stat().st_mtime_ns == written, "the same launch: the same base"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a plain launch: auto is fp32 on CPU
    if torch.cuda.is_available():
        argv.append("--train.precision=fp32")
    main(argv)
    assert weights.stat().st_mtime_ns != written, "a bf16 base reused by an fp32 run"
    written = weights.stat().st_mtime_ns
    main([*argv, "--train.precision=fp32"])
    assert weights.stat().st_mtime_ns == written, "fp32 by name: the same base"
    main([*argv, "--train.precision=bf16"])
    assert weights.stat().st_mtime_ns != written, "an fp32 base reused by a bf16 run"


def test_a_pretrained_base_is_reused_when_its_model_yaml_is_named_otherwise(tmp_path, monkeypatch, capsys):
    """The base's stamp held the model YAML's path as typed: the packaged name 'jamba-tiny.yaml' after the path
    'configs/models/jamba-tiny.yaml' (or the path from another working directory) pretrained the same base again, and
    an interrupted pretrain phase started over. The YAML's text (in the stamp too) is what names the model."""
    import zoo.finetune as ft
    from zoo.cli import _run

    argv = [*short_mqar_finetune(tmp_path), "--pretrain.train.max_steps=3", "--pretrain.train.checkpoint_every=1"]
    real = ft.lr_at

    def stop_pretrain_at_step_2(step, section):
        if step == 2 and getattr(section, "lora", None) is None:
            raise KeyboardInterrupt
        return real(step, section)

    monkeypatch.setattr(ft, "lr_at", stop_pretrain_at_step_2)
    assert _run("zoo finetune", main, argv) == 130
    monkeypatch.setattr(ft, "lr_at", real)
    capsys.readouterr()
    main([*argv, "--model=jamba-tiny.yaml"])
    assert "pretrain: continuing from step 2 of 3" in capsys.readouterr().out
    weights = tmp_path / "run" / "base" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    copy = tmp_path / "mine.yaml"
    copy.write_text((ROOT / "configs" / "models" / "jamba-tiny.yaml").read_text())
    main([*argv, f"--model={copy}"])
    assert "pretrain: reusing" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == written
    copy.write_text(copy.read_text().replace("n_experts: 4", "n_experts: 2"))
    main([*argv, f"--model={copy}"])
    assert weights.stat().st_mtime_ns != written, "another model: another base"


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "configs/models/mamba-tiny.yaml", "data": {"task": "mqar"}}))
    with pytest.raises(ValueError, match="pretrain section"):
        load_finetune_config(path)
    path.write_text(yaml.safe_dump({"model": "x", "data": {"task": "mqar", "source": "a.jsonl"}}))
    with pytest.raises(ValueError, match="exactly one"):
        load_finetune_config(path)
    path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "mamba-tiny.yaml"),
                                    "data": {"task": "mqar"},
                                    "pretrain": {"data": {"task": "mqar"}, "train": {"precision": "bf16"}}}))
    with pytest.raises(ValueError, match=r"pretrain\.train\.precision: bf16, but one accelerator runs both phases in "
                                         r"the top-level train\.precision \(auto\)"):
        load_finetune_config(path)  # the pretrain phase ran in fp32 (the top-level auto's, on CPU) without a word
    path.write_text(yaml.safe_dump({"model": "x", "data": {"task": "mqar"}, "lora": {"alpah": 4}}))
    with pytest.raises(ValueError, match="lora.alpah: unknown field; did you mean lora.alpha"):
        load_finetune_config(path)
    for alpha in (0, -1.0, float("inf"), float("nan")):  # 0: a no-op adapter, zero gradients, and a run that reported
        # success; inf: every adapted output inf, a run on NaN losses
        path.write_text(yaml.safe_dump({"model": "x", "data": {"task": "mqar"}, "lora": {"alpha": alpha}}))
        with pytest.raises(ValueError, match=r"lora\.alpha: must be a finite number > 0"):
            load_finetune_config(path)



def test_a_base_saved_with_return_dict_false_finetunes(tmp_path):
    # transformers' return_dict=False (from_pretrained(..., return_dict=False), kept in an exported config.json) makes
    # the forward return a tuple: the evaluation, the training loss and the round-trip check read .logits / .loss of it
    # and failed ("'tuple' object has no attribute 'logits'"); they ask for an output object, as generate does
    model = tiny("mamba")
    model.config.return_dict = False
    model.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["return_dict"] is False
    config = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"max_steps": 2, "micro_batch_size": 2, "progress_bar": False}, "lora": {"r": 4},
              "optim": {"lr": 1e-2}, "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    result = main([str(tmp_path / "ft.yaml")])
    assert result["after"]["n_targets"] == result["before"]["n_targets"] > 0 and result["log"][-1]["step"] == 2
    assert result["merge_max_abs_diff"] < 1e-3
    assert result["coverage"]["probe"]["phases"] == ["train forward", "prefill", "decode step"]  # (its tuple held no
    # cache: the decode step went unprobed)


def test_a_diverged_run_fails_its_round_trip_check_instead_of_saving_a_nan_merged_model(tmp_path):
    # lr 1e30 makes the adapted model's logits NaN: the check `diff > tol` let the NaN differences pass, and the run
    # saved a NaN merged model and reported success
    run = mqar_finetune_runs(tmp_path, {"max_steps": 2, "micro_batch_size": 2}, optim={"lr": 1e30})
    with pytest.raises(RuntimeError, match=r"adapter round trip changed the logits: reload nan.*non-finite logits"):
        run("run")
    assert not (tmp_path / "run" / "merged").exists()


def test_a_malformed_regular_expression_in_target_modules_is_named_when_the_config_is_read(tmp_path):
    # a string target is a regular expression: a malformed one failed with re.error's traceback once the model loaded
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"model": "x", "data": {"task": "mqar"},
                                    "lora": {"target_modules": "model.layers.[0.mixer.in_proj"}}))
    with pytest.raises(ValueError, match=r"lora\.target_modules: 'model\.layers\.\[0\.mixer\.in_proj' is not a regular "
                                         r"expression \(unterminated character set"):
        load_finetune_config(path)


@pytest.mark.parametrize("override,message", [
    ("schedule.decay_fraction=20", r"schedule\.decay_fraction: must be in \(0, 1\], got 20"),
    ("pretrain.schedule.decay_fraction=0", r"pretrain\.schedule\.decay_fraction: must be in \(0, 1\], got 0"),
    ("optim.eps=0", r"optim\.eps: must be > 0, got 0"),
    ("optim.betas=[0.9, 1.0]", r"optim\.betas: each must be in \[0, 1\), got \[0\.9, 1\.0\]"),
    ("optim.fused=yes please", r"optim\.fused: must be true, false or 'auto', got 'yes please'"),
    ("optim.lr=.inf", r"^optim\.lr: must be finite, got inf"),
    ("pretrain.optim.weight_decay=.inf", r"^pretrain\.optim\.weight_decay: must be finite, got inf"),
    ("optim.eps=.inf", r"^optim\.eps: must be finite, got inf"),
    ("train.seed=-1", r"^train\.seed: must be in \[0, 2\*\*32\), got -1"),
    ("pretrain.train.seed=4294967296", r"^pretrain\.train\.seed: must be in \[0, 2\*\*32\), got 4294967296"),
], ids=["decay_fraction", "pretrain-decay_fraction", "eps", "betas", "fused", "lr-inf", "pretrain-weight_decay-inf",
        "eps-inf", "seed", "pretrain-seed"])
def test_optimizer_and_schedule_settings_are_checked_as_zoo_train_checks_them(tmp_path, override, message):
    # a decay_fraction out of (0, 1] was taken (20, meant as percent, decayed wsd from the end of the warmup), and
    # bad betas or eps failed in torch's AdamW naming no field, the top-level ones after the whole pretrain phase;
    # a seed outside numpy's range failed in accelerate's set_seed ("Seed must be between 0 and 2**32 - 1", naming
    # no field), the top-level one after the whole pretrain phase too; an infinite lr or weight_decay trained on NaN
    # (the round-trip check failed the run once it had trained), an infinite eps trained nothing
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "mamba-tiny.yaml"),
                                    "data": {"task": "mqar"}, "pretrain": {"data": {"task": "mqar"}}}))
    with pytest.raises(ValueError, match=message):
        load_finetune_config(path, [override])

@pytest.mark.parametrize("data", [
    {"task": "mqar", "seq_len": 32, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
    {"source": "rows.jsonl"},
], ids=["task", "jsonl"])
def test_rows_longer_than_a_bases_learned_positions_are_refused_before_anything_trains(tmp_path, monkeypatch, data):
    # a GPT-2 base learns n_positions absolute positions (wpe): rows longer than that failed in its first forward, the
    # accuracy before finetuning, with "IndexError: index out of range in self" naming nothing (zoo train refuses a
    # data.seq_len past them up front); now refused naming data.seq_len and the base's positions
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=16,
                               bos_token_id=257, eos_token_id=258)).save_pretrained("base")
    Path("rows.jsonl").write_text("".join(json.dumps({"text": "x" * n}) + "\n" for n in (8, 40, 9, 10, 11)))
    config = {"model": "base", "output_dir": "run", "tokenizer": "byte", "data": data,
              "train": {"max_steps": 2, "micro_batch_size": 2, "progress_bar": False},
              "lora": {"r": 4, "target_modules": "all-linear"}, "schedule": {"warmup_steps": 1}}
    if "task" in data:
        del config["tokenizer"]
    Path("ft.yaml").write_text(yaml.safe_dump(config))
    longest = 32 if "task" in data else 42  # (the jsonl row of 40 bytes between its bos and eos)
    with pytest.raises(ValueError, match=rf"^data\.seq_len: rows of up to {longest} tokens, but GPT2LMHeadModel learns "
                                         rf"16 absolute positions \(transformer\.wpe"):
        main(["ft.yaml"])
    assert not Path("run/merged").exists()
    if "source" in data:  # rows cut to the positions it has: it finetunes
        Path("ft.yaml").write_text(yaml.safe_dump({**config, "data": {**data, "seq_len": 16}}))
        assert main(["ft.yaml"])["log"][-1]["step"] == 2


def test_data_and_model_mistakes_are_refused_before_anything_trains(tmp_path):
    path = tmp_path / "ft.yaml"

    def load(data: dict, model: str = "x", **rest):
        path.write_text(yaml.safe_dump({"model": model, "data": data, **rest}))
        return load_finetune_config(path)

    with pytest.raises(ValueError, match=r"data\.task_kwargs\.n_kvv: not an argument of task 'mqar'; did you mean "
                                         r"'n_kv'"):
        load({"task": "mqar", "task_kwargs": {"n_kvv": 4}})
    with pytest.raises(ValueError, match=r"data\.task_kwargs: task 'mqar' cannot build a row"):
        load({"task": "mqar", "task_kwargs": {"n_kv": 64, "vocab_size": 32}})
    with pytest.raises(ValueError, match=r"pretrain\.data\.task_kwargs\.n_tokenz: not an argument"):
        load({"task": "mqar"}, model="configs/models/mamba-tiny.yaml",
             pretrain={"data": {"task": "selective_copying", "task_kwargs": {"n_tokenz": 4}}})
    with pytest.raises(ValueError, match=r"data\.holdout: 0 leaves no evaluation rows"):
        load({"source": "a.jsonl", "holdout": 0})
    with pytest.raises(ValueError, match=r"model: '/no/such/folder': no such model folder"):
        load({"task": "mqar"}, model="/no/such/folder")
    with pytest.raises(ValueError, match=r"model: no such model config 'configs/models/nope-tiny.yaml'"):
        load({"task": "mqar"}, model="configs/models/nope-tiny.yaml", pretrain={"data": {"task": "mqar"}})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a PEFT adapter, not a model"):
        load({"task": "mqar"}, model=str(adapter))


def test_a_run_that_would_save_its_merged_model_over_its_base_is_refused(tmp_path, monkeypatch):
    """Finetuning a run's merged/ again into the same output_dir saved the new merged model over the base, which the
    new adapter names as its base: the adapter, loaded onto it, applied its change twice, without a word."""
    tiny("mamba").save_pretrained(tmp_path / "run" / "merged")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"model": "run/merged", "data": {"task": "mqar"}}))
    for out in ("run", str(tmp_path / "run") + "/", "./run/merged/.."):
        with pytest.raises(ValueError, match=r"output_dir: .* would write its merged/ over the base model "
                                             r"'run/merged'.*give another output_dir"):
            load_finetune_config(tmp_path / "ft.yaml", [f"output_dir={out}"])
    load_finetune_config(tmp_path / "ft.yaml", ["output_dir=run2"])  # another folder is taken


def test_a_hub_adapter_repo_as_the_base_model_is_refused_before_training(tmp_path, monkeypatch):
    """A hub repo holding a PEFT adapter, given as the model to finetune: transformers loaded its base model with the
    adapter in its layers, a LoRA was trained over it, and the run failed after training for want of the repo's
    config.json; an adapter folder was refused as one already. The hub is a cache read offline."""
    from helpers import offline_hub_repo, save_trained_adapter

    save_trained_adapter(tmp_path / "base", offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/lora"), False)
    config = {"model": "someone/lora", "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 4},
              "train": {"max_steps": 1, "micro_batch_size": 2, "progress_bar": False}, "schedule": {"warmup_steps": 0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"^model: 'someone/lora' holds a PEFT adapter, not a model; give its base "
                                         r"model or the merged model$"):
        main([str(tmp_path / "ft.yaml")])
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "finetune-checkpoint").exists()


def test_lora_target_mistakes_are_refused_before_the_pretrain_phase(tmp_path):
    """A mistyped lora.target_modules failed in wrap_lora, after the whole pretrain phase had run (400 steps of the
    shipped recipe), naming `target_modules`; it is now refused when the config is read, naming the field."""
    path = tmp_path / "ft.yaml"

    def load(lora: dict):
        path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "jamba-tiny.yaml"),
                                        "data": {"task": "mqar"}, "pretrain": {"data": {"task": "mqar"}},
                                        "lora": lora}))
        return load_finetune_config(path)

    with pytest.raises(ValueError, match=r"lora\.target_modules: \['v_prj'\] match no module"):
        load({"target_modules": ["q_proj", "v_prj"]})
    with pytest.raises(ValueError, match=r"lora\.target_modules: \['q_proj'\] match no module.*regular expression"):
        load({"target_modules": "q_proj"})  # a string is a regex over whole names, as PEFT reads it
    with pytest.raises(ValueError, match=r"lora\.target_modules: matches model\.layers\.0\.mixer \(Mamba\).*which LoRA "
                                         r"cannot adapt"):
        load({"target_modules": ["mixer"]})  # PEFT's 'Target module Mamba(...) is not supported', after pretraining
    with pytest.raises(ValueError, match=r"lora\.target_modules: empty"):
        load({"target_modules": []})
    with pytest.raises(ValueError, match=r"lora\.include_mlp: only applies to the default targets"):
        load({"target_modules": ["q_proj"], "include_mlp": True})
    assert load({"target_modules": ["q_proj", "experts.0.up_proj"]}).lora.target_modules == ["q_proj",
                                                                                           "experts.0.up_proj"]
    assert load({"target_modules": r".*\.mixer\.(q|v)_proj"}).pretrain is not None


def test_jsonl_data_too_small_to_hold_rows_out_is_refused(tmp_path):
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets

    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}))
    with pytest.raises(ValueError, match=r"data\.holdout: no evaluation rows held out of 1 rows"):
        build_datasets(DataSection(source=str(tmp_path / "one.jsonl")), ByteTokenizer())
    (tmp_path / "three.jsonl").write_text("\n".join([json.dumps({"prompt": "a", "completion": "b"})] * 3))
    with pytest.raises(ValueError, match=r"data\.holdout: 0\.9 of 3 rows holds out all of them"):  # round(2.7) rows
        build_datasets(DataSection(source=str(tmp_path / "three.jsonl"), holdout=0.9), ByteTokenizer())


def test_copies_of_a_held_out_jsonl_row_are_not_trained_on(tmp_path):
    # the holdout split the rows by index, so a row repeated in the file was held out and its copies trained on: the
    # evaluation measured rows the model had learned
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets

    rows = [{"prompt": f"q{i % 5}", "completion": f"a{i % 5}", "id": i} for i in range(40)]  # 5 rows, 8 copies each
    rows += [{"text": f"distinct row {i}"} for i in range(10)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"data\.holdout: \d+ of the 40 rows not held out of .*rows\.jsonl' are "
                                         r"copies of held-out rows and are not trained on"):
        train, evaluation = build_datasets(DataSection(source=str(tmp_path / "rows.jsonl"), holdout=0.2),
                                           ByteTokenizer())
    trained = {tuple(r["input_ids"].tolist()) for r in train}
    evaluated = {tuple(r["input_ids"].tolist()) for r in evaluation}
    assert evaluated and trained and not trained & evaluated
    assert len(evaluation) == 10  # the rows held out are as many as before


def test_jsonl_rows_that_are_all_copies_of_held_out_rows_are_refused(tmp_path):
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets

    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": "the same"}) + "\n" for _ in range(10)))
    with pytest.raises(ValueError, match=r"data\.holdout: the 9 rows not held out of .*same\.jsonl' are all copies "
                                         r"of held-out rows"):
        build_datasets(DataSection(source=str(tmp_path / "same.jsonl"), holdout=0.1), ByteTokenizer())


# ---- state passing (train.state_passing) ---------------------------------------------------------------------

def _tiny_recurrent(kind: str) -> nn.Module:
    torch.manual_seed(0)
    mixer = {"mamba": {"type": "mamba", "d_state": 8}, "mamba2": {"type": "mamba2", "d_state": 16, "head_dim": 16},
             "gla": {"type": "gla", "n_heads": 2}, "attention": {"type": "attention", "n_heads": 2}}[kind]
    return AutoModelForCausalLM.from_config(ZooConfig(vocab_size=16, d_model=32, layers="MM", mixers={"M": mixer},
                                                      ffn="none"))


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gla"])
def test_state_passing_starts_each_batch_from_the_previous_final_states(kind):
    from zoo.data.synthetic import induction_heads_batch
    from zoo.finetune import _state_passing_step
    from zoo.train import ModelInputs, count_targets

    model = _tiny_recurrent(kind)
    inputs = ModelInputs.of(model)
    g = torch.Generator().manual_seed(1)
    b1, b2 = induction_heads_batch(3, 24, 16, g), induction_heads_batch(3, 24, 16, g)
    for b in (b1, b2):  # every position scored, so that the first ones of b2 show what b1 left behind
        b["labels"] = b["input_ids"].clone()
    loss1, carried = _state_passing_step(model, b1, 1.0, inputs, None)
    assert_close("first batch from zero states", loss1, model(**b1).loss * count_targets(b1["labels"]), 1e-6)
    assert all(not t.requires_grad for t in carried[0].state_tensors())
    with torch.no_grad():  # the reference: the second rows continue the first ones (one long row each)
        whole = model(input_ids=torch.cat([b1["input_ids"], b2["input_ids"]], 1)).logits[:, 24:]
    ref = F.cross_entropy(whole[:, :-1].reshape(-1, 16), b2["labels"][:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum")
    loss2, carried = _state_passing_step(model, b2, 1.0, inputs, carried)
    assert_close("second batch continues the first", loss2, ref, 1e-4)
    no_carry, _ = _state_passing_step(model, b2, 1.0, inputs, None)
    assert (loss2 - no_carry).abs() > 1e-6  # the carried states changed the answer
    b3 = induction_heads_batch(2, 24, 16, g)  # fewer rows: starts from zeros again
    loss3, carried = _state_passing_step(model, b3, 1.0, inputs, carried)
    assert_close("new row count restarts", loss3, model(**b3).loss * count_targets(b3["labels"]), 1e-6)
    assert carried[1] == 2


def test_state_passing_refuses_a_kv_cache():
    from zoo.data.synthetic import induction_heads_batch
    from zoo.finetune import _state_passing_step
    from zoo.train import ModelInputs

    model = _tiny_recurrent("attention")
    with pytest.raises(ValueError, match="state_passing"):
        _state_passing_step(model, induction_heads_batch(2, 16, 16), 1.0, ModelInputs.of(model), None)


@pytest.mark.parametrize("field", ["train", "pretrain.train"])
def test_state_passing_on_a_model_with_attention_layers_is_refused_before_the_pretrain_phase(tmp_path, field):
    # refused only at the phase's first step: the finetune's came after the whole pretrain phase (and the accuracy
    # before finetuning), on a base whose layers the zoo YAML already showed were not all recurrent
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "jamba-tiny.yaml"),
                                    "data": {"task": "mqar"}, "pretrain": {"data": {"task": "mqar", "seed": 5}}}))
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}\.state_passing: needs a model whose layers are all "
                                         rf"recurrent \(mamba, mamba2, gla\); ZooForCausalLM has attention \(KV\) "
                                         rf"layers \(model\.layers\.2\.mixer"):
        load_finetune_config(path, [f"{field}.state_passing=true"])
    load_finetune_config(path, [f"{field}.state_passing=true", f"model={ROOT / 'configs/models/mamba-tiny.yaml'}"])


def test_state_passing_on_a_base_with_attention_layers_is_refused_before_its_first_evaluation(tmp_path, capsys):
    # it was refused at the first training step, after the evaluation before finetuning and the bypass check
    tiny("transformerpp").save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"max_steps": 2, "micro_batch_size": 2, "progress_bar": False, "state_passing": True},
              "lora": {"r": 4}, "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"^train\.state_passing: needs a model whose layers are all recurrent"):
        main([str(tmp_path / "ft.yaml")])
    assert "before:" not in capsys.readouterr().out


def test_a_folder_with_tokenizer_json_alone_finetunes_with_it(tmp_path, monkeypatch):
    """A model folder whose tokenizer is a tokenizer.json alone (no tokenizer_config.json) was finetuned on byte ids:
    zoo finetune looked for tokenizer_config.json only, where zoo train and zoo generate take any tokenizer file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<s>", "</s>", "abc", "cba", "hello", "olleh", "zoo", "ooz", "reversed:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    base = tmp_path / "base"
    tiny("mamba").save_pretrained(base)
    tok.save(str(base / "tokenizer.json"))
    rows = [{"prompt": f"{w} reversed:", "completion": f" {w[::-1]}"} for w in ["abc", "hello", "zoo"] * 3]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)
    config = {"model": str(base), "output_dir": str(tmp_path / "run"),
              "data": {"source": str(tmp_path / "data.jsonl"), "holdout": 0.3, "add_bos": False},
              "train": {"max_steps": 1, "micro_batch_size": 4, "progress_bar": False},
              "schedule": {"warmup_steps": 0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    # its own tokenizer is taken: here refused for naming no eos (byte ids trained before, without a word)
    with pytest.raises(ValueError, match=f"tokenizer: '{base}' has no eos token"):
        main([str(tmp_path / "ft.yaml")])


def test_a_tokenizer_whose_pad_or_eos_id_lies_past_the_models_embeddings_is_refused_before_training(tmp_path):
    # a tokenizer of 6 tokens whose </s> (its eos and pad) has id 500 passed the check of its size against the model's
    # 300 embeddings: the rows ended and were padded with 500, and the first evaluation failed in the embedding
    # ('IndexError: index out of range in self'; on a GPU a device-side assert)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "abc": 1, "cba": 2, "hello": 3, "reversed:": 4, "</s>": 500}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    base = tmp_path / "base"
    config = ZooConfig.from_yaml(ROOT / "configs" / "models" / "mamba-tiny.yaml", vocab_size=300)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>",
                            pad_token="</s>").save_pretrained(base)
    rows = [{"prompt": f"{w} reversed:", "completion": f" {w[::-1]}"} for w in ["abc", "cba"] * 3]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = {"model": str(base), "output_dir": str(tmp_path / "run"),
           "data": {"source": str(tmp_path / "data.jsonl"), "holdout": 0.3, "add_bos": False},
           "train": {"max_steps": 1, "micro_batch_size": 2, "progress_bar": False},
           "schedule": {"warmup_steps": 0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(run))
    with pytest.raises(ValueError, match=r"tokenizer: its pad_token_id 500 is outside the model's vocabulary "
                                         r"\(vocab_size 300: ids 0\.\.299\)"):
        main([str(tmp_path / "ft.yaml")])
    assert not (tmp_path / "run" / "finetune-checkpoint").exists()


def test_a_hub_checkpoint_finetunes_with_its_own_tokenizer(tmp_path, monkeypatch):
    # a model given as a hub id was tokenized with the byte tokenizer (only a local folder's tokenizer was looked
    # for): a checkpoint with its own vocabulary trained on byte ids, without a word
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "abc", "cba", "hello", "olleh", "zoo", "ooz", "reversed:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hub = tmp_path / "hub-snapshot"  # what `org/tiny` resolves to
    tiny("mamba").save_pretrained(hub)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(hub)
    for cls in (AutoModelForCausalLM, AutoTokenizer, AutoConfig):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(
            lambda c, name, *a, real=real, **k: real(c, str(hub) if str(name) == "org/tiny" else name, *a, **k)))
    rows = [{"prompt": f"{w} reversed:", "completion": f" {w[::-1]}"} for w in ["abc", "hello", "zoo"] * 3]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)
    config = {"model": "org/tiny", "output_dir": str(tmp_path / "run"),
              "data": {"source": str(tmp_path / "data.jsonl"), "holdout": 0.3},
              "train": {"max_steps": 2, "micro_batch_size": 4, "progress_bar": False},
              "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    result = main([str(tmp_path / "ft.yaml")])
    saved = json.loads((tmp_path / "run" / "merged" / "tokenizer_config.json").read_text())
    assert saved.get("tokenizer_class") != "ByteTokenizer"
    assert result["before"]["n_targets"] == 3 * 2  # one word and eos per held-out completion, not its bytes
    # the finetune taught the model to end with the tokenizer's eos: merged/ names it, so generate stops there (the
    # base's config had none, and merged/config.json kept eos_token_id null)
    assert json.loads((hub / "config.json").read_text()).get("eos_token_id") is None
    merged = json.loads((tmp_path / "run" / "merged" / "config.json").read_text())
    generation = json.loads((tmp_path / "run" / "merged" / "generation_config.json").read_text())
    assert merged["eos_token_id"] == 2 and generation["eos_token_id"] == 2


def test_rows_dropped_past_seq_len_are_said_once_per_launch(tmp_path, monkeypatch, capsys):
    # every process of `accelerate launch scripts/finetune.py` builds the datasets, and each printed the line
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets

    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "x" * 20, "completion": "y"}) + "\n"
                                         + json.dumps({"text": "ab"}) + "\n")
    data = DataSection(source=str(tmp_path / "rows.jsonl"), eval_source=str(tmp_path / "rows.jsonl"), seq_len=8)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        build_datasets(data, ByteTokenizer())
        assert ("data: dropped 1 of 2 training rows and 1 of 2 evaluation rows whose completion lies past seq_len=8"
                in capsys.readouterr().out) == said, rank
    monkeypatch.setenv("RANK", "0")  # without a seq_len, a row is left without a target by being one token long
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "ab"}) + "\n")
    build_datasets(DataSection(source=str(tmp_path / "rows.jsonl"), eval_source=str(tmp_path / "rows.jsonl"),
                               add_bos=False, add_eos=False), ByteTokenizer())
    assert "data: dropped 1 of 2 training rows and 1 of 2 evaluation rows of one token, which leave nothing to " \
           "predict" in capsys.readouterr().out


def test_evaluation_rows_dropped_past_seq_len_are_said(tmp_path, capsys):
    # an evaluation row whose completion lies past seq_len was dropped without a word (the training rows' were counted),
    # and the accuracy before and after was measured on fewer rows than data.eval_source holds
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets

    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "x" * 20, "completion": "y"}) + "\n"
                                         + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    _, evaluation = build_datasets(DataSection(source=str(tmp_path / "train.jsonl"),
                                               eval_source=str(tmp_path / "eval.jsonl"), seq_len=8), ByteTokenizer())
    assert len(evaluation) == 1
    assert "data: dropped 1 of 2 evaluation rows whose completion lies past seq_len=8" in capsys.readouterr().out


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    # a line that is not JSON raised json's "Expecting ',' delimiter: line 1 column 11", naming neither the file nor
    # its line (line 1 is the row's own text)
    from zoo.finetune import read_jsonl

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a"}\n\n{"text": "b" "c"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: not a JSON object \(Expecting ',' delimiter at column 14\)"):
        read_jsonl(str(data))


def test_a_json_array_file_is_refused_briefly_as_not_jsonl(tmp_path):
    # a file holding its rows as one JSON array was refused with the whole array in its message ("got keys [{...}]")
    from zoo.finetune import read_jsonl

    data = tmp_path / "rows.json"
    rows = [{"text": f"row {i} " + "x" * 50} for i in range(200)]
    data.write_text(json.dumps(rows) + "\n")
    with pytest.raises(ValueError) as refused:
        read_jsonl(str(data))
    assert str(refused.value).startswith(f"{data}:1: a JSON array of 200 items, not a JSON object; a jsonl file holds "
                                         f"one object per line")
    assert len(str(refused.value)) < len(str(data)) + 200 and "row 0" not in str(refused.value)
    data.write_text('{"text": "fine"}\n' + json.dumps("x" * 500) + "\n")  # any other value: its type, cut short
    with pytest.raises(ValueError, match=r"rows\.json:2: str '\"x{39}', not a JSON object"):
        read_jsonl(str(data))


def test_a_jsonl_file_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    # a Latin-1 byte raised "'utf-8' codec can't decode byte 0xe9 in position 31", naming neither the file (one of a
    # glob's) nor its line
    from zoo.finetune import read_jsonl

    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: not UTF-8 text \(invalid continuation byte: byte 0xe9\)"):
        read_jsonl(str(tmp_path / "*.jsonl"))


def test_a_jsonl_file_that_begins_with_a_byte_order_mark_is_read(tmp_path):
    # a UTF-8 file that a Windows tool wrote with a byte order mark was refused at line 1 ("Unexpected UTF-8 BOM"),
    # though datasets, which reads zoo train's data.source and a transformers user's json files, reads it
    from zoo.finetune import read_jsonl

    rows = [{"text": "first"}, {"prompt": "p", "completion": "c"}]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(row) + "\r\n" for row in rows).encode())
    assert read_jsonl(str(data)) == rows
    data.write_bytes(b"\xef\xbb\xbf" + b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # (its lines are counted as before)
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not UTF-8 text \(invalid continuation byte: byte 0xe9\)"):
        read_jsonl(str(data))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_a_compressed_jsonl_file_is_read_as_zoo_train_reads_it(tmp_path, suffix):
    # rows.jsonl.gz was refused as "not UTF-8 text (invalid start byte: byte 0x8b); re-encode it (e.g. from Latin-1)",
    # though zoo train's data.source reads it (and a folder of such files)
    import bz2
    import gzip
    import lzma

    import fsspec

    from zoo.finetune import read_jsonl

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    rows = [{"text": "first"}, {"prompt": "p", "completion": "c\u00e9"}]
    (tmp_path / f"rows.jsonl{suffix}").write_bytes(compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert read_jsonl(str(tmp_path / f"rows.jsonl{suffix}")) == rows
    assert read_jsonl(str(tmp_path / "*.jsonl*")) == rows
    (tmp_path / f"bad.jsonl{suffix}").write_text('{"text": "not compressed"}\n')  # its name says otherwise
    with pytest.raises(ValueError, match=rf"bad\.jsonl{re.escape(suffix)}: cannot read it"):
        read_jsonl(str(tmp_path / f"bad.jsonl{suffix}"))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "cut short"}\n')[:-12])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: cannot read it \(EOFError"):
        read_jsonl(str(tmp_path / "cut.jsonl.gz"))
    if "zstd" not in fsspec.available_compressions():  # (a compression without its package is named, not misread)
        (tmp_path / "rows.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ValueError, match=r"rows\.jsonl\.zst: compressed as \.zst, which needs the 'zstandard'"):
            read_jsonl(str(tmp_path / "rows.jsonl.zst"))


def test_a_corrupt_gzip_jsonl_file_is_named(tmp_path):
    # a .jsonl.gz whose deflate data is damaged (a bad download or copy) failed in a bare zlib.error, 'Error -3 while
    # decompressing data: invalid ...', naming no file (a traceback from zoo finetune, not its one-line error)
    import gzip

    from zoo.finetune import read_jsonl

    data = bytearray(gzip.compress("".join(json.dumps({"text": f"row {i} " * 50}) + "\n" for i in range(200)).encode()))
    data[40:80] = bytes(b ^ 0xFF for b in data[40:80])
    (tmp_path / "rows.jsonl.gz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rows\.jsonl\.gz: cannot read it \(error: Error -3 while decompressing"):
        read_jsonl(str(tmp_path / "rows.jsonl.gz"))

def test_a_jsonl_file_whose_name_holds_glob_characters_is_read_as_named(tmp_path):
    # a path is a glob too: 'rows[0].jsonl' matched 'rows0.jsonl' only, whose rows were trained on in its place
    from zoo.finetune import read_jsonl

    (tmp_path / "rows[0].jsonl").write_text(json.dumps({"text": "named"}) + "\n")
    (tmp_path / "rows0.jsonl").write_text(json.dumps({"text": "the other file"}) + "\n")
    assert read_jsonl(str(tmp_path / "rows[0].jsonl")) == [{"text": "named"}]
    assert len(read_jsonl(str(tmp_path / "*.jsonl"))) == 2


@pytest.mark.parametrize("name", ["rows::v2.jsonl", "file:rows.jsonl", "rows::v2.jsonl.gz"])
def test_a_jsonl_file_whose_name_reads_as_a_url_is_read_as_named(tmp_path, monkeypatch, name):
    # the file was opened through fsspec.open, which took 'rows::v2.jsonl' for a chain of URLs and 'file:rows.jsonl'
    # for rows.jsonl: a file that exists was refused, 'cannot read it (FileNotFoundError ...)'
    import gzip

    from zoo.finetune import read_jsonl

    monkeypatch.chdir(tmp_path)
    text = (json.dumps({"text": "named"}) + "\n").encode()
    (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "the other file"}) + "\n")
    assert read_jsonl(name) == [{"text": "named"}]
    assert read_jsonl(str(tmp_path / name)) == [{"text": "named"}]

def test_a_jsonl_file_named_under_two_spellings_is_read_once(tmp_path, monkeypatch):
    # a file named as it is was taken as spelled ('./rows.jsonl'), beside the glob's spelling of it ('rows.jsonl'): its
    # rows were read, and trained on, twice
    from zoo.finetune import read_jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "once"}) + "\n")
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "other"}) + "\n")
    assert sorted(r["text"] for r in read_jsonl(["./rows.jsonl", "*.jsonl"])) == ["once", "other"]
    assert read_jsonl(["./rows.jsonl", str(tmp_path / "rows.jsonl")]) == [{"text": "once"}]


def test_a_jsonl_string_holding_a_unicode_line_separator_is_one_row(tmp_path):
    # str.splitlines broke a line at the U+2028, U+2029 or U+0085 that a JSON string may hold unescaped (json.dumps with
    # ensure_ascii=False writes them so), and the valid row was refused as "not a JSON object"
    from zoo.finetune import read_jsonl

    rows = [{"text": "a\u2028b"}, {"prompt": "c\x85", "completion": "d\u2029e"}, {"text": "f"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert read_jsonl(str(data)) == rows


@pytest.mark.parametrize("row,message", [
    ({"prompt": "a", "completion": None}, "'completion' must be a string, got None"),
    ({"text": 5}, "'text' must be a string, got 5"),
    ({"prompt": ["a"], "completion": "b"}, r"'prompt' must be a string, got \['a'\]"),
    ({"prompt": "a", "completion": "b\ud83d!"}, r"'completion' holds a lone surrogate '\\ud83d' at character 1"),
], ids=["null-completion", "number-text", "list-prompt", "lone-surrogate"])
def test_a_jsonl_field_that_is_not_text_is_named(tmp_path, row, message):
    # a null completion (or a number, a list) ended in "AttributeError: 'NoneType' object has no attribute 'encode'"
    # from the tokenizer, a traceback naming no file or line (a lone surrogate escape, in a fast tokenizer's
    # "TypeError: TextEncodeInput must be Union[...]")
    from zoo.finetune import read_jsonl

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: " + message):
        read_jsonl(str(data))


def test_jsonl_rows_with_nothing_to_learn_are_skipped_with_a_count(tmp_path, monkeypatch):
    # a row {"text": ""} (or whitespace, or a prompt with an empty completion) trained <bos> -> <eos> (the prompt ->
    # <eos>), and a file of nothing else trained on those alone, without a word
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets, read_jsonl

    rows = [{"text": "fine"}, {"text": ""}, {"text": " \n\t"}, {"prompt": "q", "completion": ""},
            {"prompt": "q", "completion": "  "}, {"prompt": "", "completion": "answer"}, {"text": "also fine"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(UserWarning, match=r"data\.source: skipped 4 of 7 rows whose .* is empty or only whitespace.*"
                                         r"first .*rows\.jsonl:2\)"):
        assert read_jsonl(str(data)) == [rows[0], rows[5], rows[6]]
    with pytest.warns(UserWarning, match=r"skipped 4 of 7 rows"):
        train, evaluation = build_datasets(DataSection(source=str(data), eval_source=str(data)), ByteTokenizer())
    assert len(train) == len(evaluation) == 3
    for row in list(train) + list(evaluation):  # every row has a target besides <eos>
        assert (row["labels"][:-1] != -100).any()
    data.write_text("".join(json.dumps(row) + "\n" for row in rows[1:5]))
    with pytest.raises(ValueError, match=r"data\.eval_source: .* hold no rows with text: all 4 have an empty or "
                                         r"whitespace-only"):
        read_jsonl(str(data), "data.eval_source")


def test_a_jsonl_path_of_a_list_that_matches_no_file_is_refused_by_name(tmp_path, monkeypatch):
    # data.source: [rows.jsonl, typo.jsonl] trained on rows.jsonl alone, without a word (zoo train's data.source
    # refuses such a list by name)
    from zoo.finetune import read_jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    assert read_jsonl(["rows.jsonl", "*.jsonl"]) == [{"text": "abc"}]
    for field in ("data.source", "data.eval_source"):
        with pytest.raises(ValueError, match=rf"^{re.escape(field)}: no file matches 'typo\.jsonl' "
                                             r"\(of \['rows\.jsonl', 'typo\.jsonl'\]\)"):
            read_jsonl(["rows.jsonl", "typo.jsonl"], field)
        with pytest.raises(ValueError, match=rf"^{re.escape(field)}: no file matches 'more/\*\.jsonl' \(of"):
            read_jsonl(["*.jsonl", "more/*.jsonl"], field)


def test_a_folder_named_as_jsonl_rows_is_refused_by_name(tmp_path, monkeypatch):
    # a folder (or a glob such as 'data/**' that matched it) ended in "IsADirectoryError: [Errno 21] Is a directory"
    from zoo.finetune import read_jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "part").mkdir(parents=True)
    (tmp_path / "data" / "part" / "rows.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(ValueError, match=r"^data\.source: no file matches 'data'; it is a folder: name its files "
                                         r"\('data/\*\.jsonl'\)"):
        read_jsonl("data")
    assert read_jsonl("data/**") == read_jsonl("data/*/*.jsonl") == [{"text": "abc"}]  # the files it matches


def test_a_missing_eval_source_is_named_as_such(tmp_path):
    # a data.eval_source that matched no file was reported as "data.source: no file matches ...", the other field
    from zoo.data.text import ByteTokenizer
    from zoo.finetune import DataSection, build_datasets

    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    data = DataSection(source=str(tmp_path / "train.jsonl"), eval_source=str(tmp_path / "eval*.jsonl"))
    with pytest.raises(ValueError, match=r"^data\.eval_source: no file matches .*eval\*\.jsonl"):
        build_datasets(data, ByteTokenizer())
    data.eval_source = str(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"^data\.eval_source: .*empty\.jsonl.* hold no rows"):
        build_datasets(data, ByteTokenizer())


def test_a_synthetic_task_run_keeps_the_base_tokenizer_beside_the_merged_model(tmp_path):
    # the tokenizer was loaded (and saved) for jsonl data only: finetuning a checkpoint that has a tokenizer on a
    # synthetic task wrote adapter/ and merged/ without it, so AutoTokenizer / pipeline could not use merged/
    from zoo.data.text import ByteTokenizer

    tiny("mamba").save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"max_steps": 2, "micro_batch_size": 4, "progress_bar": False},
              "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    main([str(tmp_path / "ft.yaml")])
    for folder in ("adapter", "merged"):
        assert isinstance(load_folder_tokenizer(tmp_path / "run" / folder), ByteTokenizer), folder


def test_an_adapter_saved_over_an_earlier_runs_keeps_none_of_its_tokenizer_or_rows_record(tmp_path):
    """A run into the output_dir of an earlier one (jsonl rows without bos, a byte tokenizer) saved its adapter beside
    the earlier tokenizer files and zoo_finetune.json: zoo generate and zoo eval took that tokenizer and add_bos as the
    new adapter's, though its base holds no tokenizer and its rows were a task's."""
    from zoo.data.text import ByteTokenizer
    from zoo.hub import ADAPTER_DATA_FILE, holds_tokenizer, load_causal_lm, tokenizer_source

    run = mqar_finetune_runs(tmp_path, {"max_steps": 2, "micro_batch_size": 2})
    earlier = tmp_path / "run" / "adapter"
    ByteTokenizer().save_pretrained(earlier)
    (earlier / ADAPTER_DATA_FILE).write_text(json.dumps({"add_bos": False}))
    run("run")
    assert not holds_tokenizer(earlier) and not (earlier / ADAPTER_DATA_FILE).exists()
    assert tokenizer_source(earlier) == str(tmp_path / "base")
    assert getattr(load_causal_lm(earlier).config, "add_bos", None) is None

def test_a_pretrain_stopped_while_writing_its_stamp_is_continued_by_the_rerun(tmp_path, monkeypatch, capsys):
    # base/pretrain_config.json was written in place: a Ctrl-C mid-write left it cut short, and every rerun stopped at
    # reading it (JSONDecodeError) until the file was found and deleted
    argv = short_mqar_finetune(tmp_path)
    real = Path.write_text

    def interrupted(self, text, *args, **kwargs):  # half of the file reaches the disk, then Ctrl-C
        if "pretrain_config.json" in self.name:
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(Path, "write_text", real)
    capsys.readouterr()
    main(argv)
    assert "pretrain: continuing from step 2 of 2" in capsys.readouterr().out
    stamp = json.loads((tmp_path / "run" / "base" / "pretrain_config.json").read_text())
    assert stamp["pretrain"]["train"]["max_steps"] == 2
    assert not list((tmp_path / "run" / "base").glob("*.tmp"))


def test_a_pretrain_save_interrupted_leaves_no_stamp_of_the_earlier_base(tmp_path, monkeypatch):
    # a save of a new pretrained base into output_dir/base that was interrupted after the weights were written kept
    # the earlier base's pretrain_config.json: a rerun of the earlier pretrain section took these weights for its own
    from transformers import PreTrainedModel

    argv = short_mqar_finetune(tmp_path)
    main(argv)
    stamp = tmp_path / "run" / "base" / "pretrain_config.json"
    assert stamp.is_file()
    real = PreTrainedModel.save_pretrained

    def interrupted(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--pretrain.optim.lr=1e-3"])  # another pretrain section: a new base is trained and saved
    assert not stamp.exists(), "the earlier base's stamp stayed beside this run's weights"


@pytest.mark.parametrize("data,message", [
    ({"source": "rows.jsonl", "n_eval": 100}, r"data\.n_eval: applies to a synthetic task only; drop it \(jsonl "
                                              r"data holds out data\.holdout"),
    ({"source": "rows.jsonl", "eval_source": "ev.jsonl", "holdout": 0.3}, r"data\.holdout: applies to jsonl data "
                                                                          r"without data\.eval_source"),
    ({"source": "rows.jsonl", "task_kwargs": {"n_kv": 4}}, r"data\.task_kwargs: applies to a synthetic task"),
    ({"task": "mqar", "eval_source": "ev.jsonl"}, r"data\.eval_source: applies to jsonl data"),
    ({"task": "mqar", "holdout": 0.2}, r"data\.holdout: applies to jsonl data"),
    ({"task": "mqar", "add_bos": False}, r"data\.add_bos: applies to jsonl data only; drop it \(a task's rows hold no "
                                         r"bos\)"),
    ({"task": "mqar", "add_eos": False}, r"data\.add_eos: applies to jsonl data only"),
], ids=["n_eval-jsonl", "holdout-eval_source", "task_kwargs-jsonl", "eval_source-task", "holdout-task", "add_bos-task",
        "add_eos-task"])
def test_data_options_of_the_other_kind_of_data_are_refused(tmp_path, data, message):
    # they were ignored without a word: n_eval: 100 on jsonl rows still held out 10% of them
    model = tmp_path / "model"
    tiny("mamba").save_pretrained(model)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"model": str(model), "data": data}))
    with pytest.raises(ValueError, match=message):
        load_finetune_config(tmp_path / "ft.yaml")


def test_paths_under_home_in_a_finetune_config(tmp_path, monkeypatch):
    # a YAML file's '~' is not expanded by a shell: model '~/base' passed the folder check, then from_pretrained took
    # it for an invalid hub id; output_dir '~/run' made a folder named '~' in the working directory
    from zoo.data.text import ByteTokenizer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    tiny("mamba").save_pretrained(tmp_path / "home" / "base")
    ByteTokenizer().save_pretrained(tmp_path / "home" / "tok")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": w}) for w in ["abc", "hello", "zoo", "lora"]))
    config = {"model": "~/base", "tokenizer": "~/tok", "output_dir": "~/run",
              "data": {"source": str(tmp_path / "data.jsonl"), "holdout": 0.25},
              "train": {"max_steps": 1, "micro_batch_size": 2, "progress_bar": False},
              "schedule": {"warmup_steps": 0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    main([str(tmp_path / "ft.yaml")])
    assert (tmp_path / "home" / "run" / "merged" / "config.json").is_file() and not (tmp_path / "~").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains under autocast on a GPU")
def test_fp16_on_cpu_and_a_precision_the_launch_contradicts_are_refused_as_zoo_train_refuses_them(tmp_path,
                                                                                                   monkeypatch):
    # zoo finetune mapped train.precision by itself: fp16 on CPU (no autocast, no grad scaler in accelerate) trained in
    # fp32 under the name fp16, and `accelerate launch --mixed_precision` was overridden by the Accelerator's argument
    # shortened as test_shipped_mqar_recipe_runs_shortened's, should a refusal fail to come
    argv = [str(ROOT / "configs" / "train" / "finetune-mqar.yaml"), "--pretrain.train.max_steps=2",
            "--train.max_steps=2", "--pretrain.schedule.warmup_steps=1", "--schedule.warmup_steps=1",
            "--data.n_eval=16", "--pretrain.data.n_eval=16", "--train.progress_bar=false",
            "--pretrain.train.progress_bar=false", "--pretrain.train.micro_batch_size=8", "--train.micro_batch_size=8"]
    with pytest.raises(ValueError, match=r"train\.precision: fp16 has no autocast on cpu .* use bf16"):
        main([*argv, f"--output_dir={tmp_path / 'fp16'}", "--train.precision=fp16"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match=r"train\.precision: fp32, but the launch asks for bf16"):
        main([*argv, f"--output_dir={tmp_path / 'fp32'}", "--train.precision=fp32"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # the launch's fp16, taken under auto
    with pytest.raises(ValueError, match=r"train\.precision: auto takes the launch's fp16, which has no autocast"):
        main([*argv, f"--output_dir={tmp_path / 'auto'}"])
    assert not any(tmp_path.iterdir()), "refused before anything is written"


def test_an_interrupted_finetune_continues_exactly_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a finetune lost the whole phase (no checkpoint). Now it saves the last completed step and the same
    command continues from it: the adapter equals an uninterrupted run's, the checkpoint is gone once the adapter
    is saved, and a checkpoint of another config is not continued."""
    import os
    import signal

    from safetensors.torch import load_file
    # on the CPU, where two runs are bitwise alike (a GPU's Mamba backward sums with atomics: not in the last bits)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")

    import zoo.finetune as ft

    run = mqar_finetune_runs(tmp_path, {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 2, "log_every": 2,
                                        "checkpoint_every": 2}, lora={"dropout": 0.1})
    whole = run("whole")
    real = ft.lr_at

    def stop_at_step_3(step, section):
        if step == 3 and section is not None and getattr(section, "lora", None) is not None:
            raise KeyboardInterrupt
        return real(step, section)

    monkeypatch.setattr(ft, "lr_at", stop_at_step_3)
    assert run("cut") == 130
    assert "stopped after step 3" in capsys.readouterr().err
    saved = torch.load(tmp_path / "cut" / "finetune-checkpoint" / "state.pt", weights_only=True)
    assert saved["step"] == 3 and len(saved["log"]) == 1
    monkeypatch.setattr(ft, "lr_at", real)
    resumed = run("cut")
    assert "continuing from step 3 of 6" in capsys.readouterr().out
    assert resumed["log"] == whole["log"]
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "finetune-checkpoint").exists()

    def sigterm_at_step_3(step, section):  # as a scheduler's time limit: the step finishes, then it saves
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, section)

    monkeypatch.setattr(ft, "lr_at", sigterm_at_step_3)
    assert run("term") == 130
    assert "stopped after step 4" in capsys.readouterr().err
    monkeypatch.setattr(ft, "lr_at", real)
    assert run("term")["log"] == whole["log"]
    c = load_file(tmp_path / "term" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)

    monkeypatch.setattr(ft, "lr_at", stop_at_step_3)
    assert run("other") == 130
    monkeypatch.setattr(ft, "lr_at", real)
    other = run("other", "--lora.r=2")  # another config: starts over, naming what differs
    assert "holds a checkpoint of another config; starting over (it differs in lora.r)" in capsys.readouterr().out
    assert len(other["log"]) == 3


def test_a_stopped_finetune_continues_with_another_evaluation_size_or_bypass_check(tmp_path, monkeypatch, capsys):
    """data.n_eval (a task's evaluation rows) and lora.check_forward were in the checkpoint's stamp, though a resumed
    run evaluates and checks afresh and trains the same: a rerun with a smaller evaluation, or without the check,
    started the phase over, overwriting the checkpoint. It now continues, to the uninterrupted run's adapter."""
    # on the CPU, where two runs are bitwise alike (a GPU's Mamba backward sums with atomics: not in the last bits)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    from safetensors.torch import load_file

    import zoo.finetune as ft

    run = mqar_finetune_runs(tmp_path, {"max_steps": 4, "micro_batch_size": 4, "log_every": 1},
                             lora={"dropout": 0.1})
    whole = run("whole")
    real = ft.lr_at

    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real, 2))
    assert run("cut") == 130
    monkeypatch.setattr(ft, "lr_at", real)
    capsys.readouterr()
    resumed = run("cut", "--data.n_eval=4", "--lora.check_forward=false")
    out = capsys.readouterr().out
    assert "continuing from step 2 of 4" in out and "another config" not in out
    assert resumed["log"] == whole["log"] and resumed["before"]["n_targets"] == 4 * 2
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_finetune_on_jsonl_rows_edited_since_starts_over(tmp_path, monkeypatch, capsys):
    """The checkpoint's stamp named the jsonl files by their paths alone: rows added or fixed after a stop were
    trained on from the old rows' checkpoint, the replayed order falling on other rows, and the run said it continued
    exactly. Now the files' sizes and modification times are in the stamp: unchanged (spelled otherwise too), it
    continues; edited, it starts over."""
    import zoo.finetune as ft
    from zoo.cli import _run
    from zoo.data.text import ByteTokenizer

    tiny("mamba").save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "rows.jsonl"
    words = ["abc", "hello", "zoo", "mamba", "lora", "state", "token", "merge"]
    data.write_text("\n".join(json.dumps({"prompt": f"{w}:", "completion": w[::-1]}) for w in words))
    config = {"model": str(tmp_path / "base"), "data": {"source": str(data), "holdout": 0.25},
              "tokenizer": str(tmp_path / "base"),
              "train": {"max_steps": 4, "micro_batch_size": 2, "progress_bar": False}, "lora": {"r": 4},
              "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    real = ft.lr_at

    def run(name: str, *extra: str):
        return _run("zoo finetune", main, [str(tmp_path / "ft.yaml"), f"--output_dir={tmp_path / name}", *extra])

    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real, 2))
    assert run("same") == 130 and run("edited") == 130
    monkeypatch.setattr(ft, "lr_at", real)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    run("same", "--data.source=./rows.jsonl", "--tokenizer=base/")  # the same files, spelled otherwise: continued
    assert "continuing from step 2 of 4" in capsys.readouterr().out
    data.write_text(data.read_text() + "\n" + json.dumps({"prompt": "added:", "completion": "dedda"}))
    run("edited")
    out = capsys.readouterr().out
    assert "holds a checkpoint of another config; starting over" in out and "continuing from step" not in out
    assert "(it differs in data_files (the jsonl files' paths, sizes or modification times))" in out


def test_a_stopped_finetune_continues_when_its_folders_are_spelled_otherwise(tmp_path, monkeypatch, capsys):
    """The checkpoint's stamp held output_dir and model as typed: '--output_dir=runs/x/' (a shell's completion) after a
    stop of '--output_dir=runs/x', or the base as './base', was 'a checkpoint of another config', and the phase
    started over, overwriting it. The same folders, spelled otherwise, now continue it."""
    # on the CPU, where two runs are bitwise alike (a GPU's Mamba backward sums with atomics: not in the last bits)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    from safetensors.torch import load_file

    import zoo.finetune as ft
    from zoo.cli import _run

    run = mqar_finetune_runs(tmp_path, {"max_steps": 4, "micro_batch_size": 4, "log_every": 1})
    whole = run("whole")
    real = ft.lr_at

    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real, 2))
    assert run("cut") == 130
    monkeypatch.setattr(ft, "lr_at", real)
    monkeypatch.chdir(tmp_path)
    resumed = _run("zoo finetune", main, [str(tmp_path / "ft.yaml"), "--output_dir=cut/", "--model=./base/"])
    out = capsys.readouterr().out
    assert "continuing from step 2 of 4" in out and "another config" not in out
    assert resumed["log"] == whole["log"]
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finetune_checkpoint_is_not_continued_in_another_precision(tmp_path, monkeypatch, capsys):
    # its stamp held train.precision's name: under auto, a checkpoint of a bf16 launch was continued in fp32
    import zoo.finetune as ft

    run = mqar_finetune_runs(tmp_path, {"max_steps": 4, "micro_batch_size": 4, "checkpoint_every": 2})
    real = ft.lr_at

    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real, 3))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert run("cut") == 130
    monkeypatch.setattr(ft, "lr_at", real)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    fp32 = ["--train.precision=fp32"] if torch.cuda.is_available() else []  # auto is fp32 on CPU
    run("cut", *fp32)
    out = capsys.readouterr().out
    assert "holds a checkpoint of another config; starting over" in out and "continuing from step" not in out
    assert "(it differs in train.precision)" in out


def test_a_resumed_finetune_continues_the_fp16_loss_scale(tmp_path, monkeypatch):
    """Under fp16 (a GPU's GradScaler) the checkpoint kept no loss scale: a resumed run restarted it at its initial
    value, so the steps its overflows skip were not an uninterrupted run's and the adapters differed. A CPU GradScaler
    stands in for accelerate's (which it makes for GPUs only), its scale doubled every step to overflow soon."""
    # on the CPU, where two runs are bitwise alike (a GPU's Mamba backward sums with atomics: not in the last bits)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    from accelerate import Accelerator
    from safetensors.torch import load_file

    import zoo.finetune as ft

    run = mqar_finetune_runs(tmp_path, {"max_steps": 6, "micro_batch_size": 4, "checkpoint_every": 0},
                             optim={"grad_clip": 0})
    scalers, real_init, real_lr = [], Accelerator.__init__, ft.lr_at

    def with_scaler(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120, growth_interval=1)
        scalers.append(self.scaler)

    monkeypatch.setattr(Accelerator, "__init__", with_scaler)
    run("whole")
    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real_lr, 3))
    assert run("cut") == 130
    monkeypatch.setattr(ft, "lr_at", real_lr)
    run("cut")
    assert scalers[-1].get_scale() == scalers[0].get_scale()
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_number_of_processes_is_not_continued(tmp_path, monkeypatch, capsys):
    """Each process trains on its own share of the rows, and a resumed run replays the rows its processes read: a
    checkpoint written by two processes was continued by one (or the other way round) from another data position,
    training some rows twice, without a word. It is now refused, naming both counts (as zoo train's --resume)."""
    import zoo.finetune as ft
    from zoo.cli import _run

    tiny("mamba").save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"max_steps": 4, "micro_batch_size": 4, "progress_bar": False, "checkpoint_every": 0},
              "lora": {"r": 4}, "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    real_lr = ft.lr_at

    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real_lr, 2))
    assert _run("zoo finetune", main, [str(tmp_path / "ft.yaml")]) == 130
    monkeypatch.setattr(ft, "lr_at", real_lr)
    file = tmp_path / "run" / "finetune-checkpoint" / "state.pt"
    saved = torch.load(file, weights_only=True)
    torch.save(saved | {"world": 2}, file)  # as two processes of `accelerate launch` write it
    capsys.readouterr()
    assert _run("zoo finetune", main, [str(tmp_path / "ft.yaml")]) == 2
    assert "was written by 2 processes, this run has 1" in capsys.readouterr().err
    assert file.is_file() and saved["world"] == 1  # kept for a launch with two processes; one process wrote 1


def test_the_merged_checkpoint_of_a_bf16_base_is_bf16(tmp_path):
    """The base is trained in fp32; merged/ was saved in fp32 whatever the base's dtype (a bf16 checkpoint's merge
    twice its size, loading as fp32). It now takes the base's dtype, and 'after' evaluates what was saved; but for
    Mamba's A_log and D, which a bf16 zoo model keeps in fp32: they were rounded to bf16, which no adapter trains."""
    from safetensors.torch import load_file

    tiny("mamba").save_pretrained(tmp_path / "fp32")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)  # A_log and D kept fp32
    base.save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"max_steps": 2, "micro_batch_size": 4, "progress_bar": False},
              "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    result = main([str(tmp_path / "ft.yaml")])
    weights = load_file(tmp_path / "run" / "merged" / "model.safetensors")
    kept = set(base.keep_in_fp32_names())
    assert kept and result["merged_dtype"] == "bfloat16"
    assert {t.dtype for k, t in weights.items() if k not in kept} == {torch.bfloat16}
    before = load_file(tmp_path / "base" / "model.safetensors")
    for name in kept:
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], before[name]), name
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert next(merged.parameters()).dtype == torch.bfloat16



class _CausalMean(nn.Module):
    """A custom mixer with the least a researcher writes: no init_state (no cache), no lora_targets."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.mix = nn.Linear(d_model, d_model)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.mix(x).cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]


class _PositionwiseCached(_CausalMean):
    """A cache entry of None, which the contract allows only a mixer that mixes nothing across tokens (the cumsum of
    _CausalMean would be refused at the first cached prefill: zoo.cache.require_positionwise)."""

    def init_state(self, batch_size, dtype, device, max_len=None):
        return None

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.mix(x)


@pytest.mark.parametrize("mixer", ["_CausalMean", "_PositionwiseCached"])
def test_wrap_lora_names_a_custom_mixer_without_lora_targets_and_probes_a_model_without_a_cache(mixer):
    """A hybrid whose custom mixer declares no lora_targets got adapters on its attention layers only, said only by
    a '-' in the report table: the custom mixer trained frozen. wrap_lora now warns, naming the mixer, its
    projections and the fix. And the probe ran a cached prefill on a model whose mixer keeps no cache (no
    init_state), which raised; it runs that prefill without a cache."""
    config = ZooConfig(d_model=32, vocab_size=64, layers="MA", ffn="none",
                       mixers={"M": {"type": f"{__name__}.{mixer}"}, "A": {"type": "attention", "n_heads": 2}})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mixer \(.*\) declares no lora_targets.*\('mix',\)"):
        peft_model = wrap_lora(model, r=2, verbose=False)
    assert peft_model.zoo_lora_report["probe"]["phases"][:2] == ["train forward", "prefill"]


@pytest.mark.parametrize("state_passing", [False, True])
def test_an_moe_base_logs_the_cross_entropy_as_its_loss_and_the_aux_part_apart(tmp_path, state_passing):
    # zoo finetune logged an MoE base's whole objective, CE + moe.aux_loss_coef · load-balancing loss, as its `loss`,
    # where zoo train logs the cross entropy alone and the aux part as aux_loss. The first step's loss is the base's
    # before any update: the same cross entropy whatever aux_loss_coef, its aux part in proportion to the coefficient.
    logs = {}
    for coef in (0.01, 10.0):
        torch.manual_seed(0)
        config = ZooConfig(vocab_size=32, d_model=32, layers="MM", mixers={"M": {"type": "mamba", "d_state": 8}},
                           ffn={"type": "swiglu", "hidden": 64},
                           moe={"every": 1, "n_experts": 4, "top_k": 2, "aux_loss_coef": coef})
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / f"base{coef}")
        path = tmp_path / f"ft{coef}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tmp_path / f"base{coef}"), "output_dir": str(tmp_path / f"run{coef}"),
            "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
            "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "progress_bar": False, "log_every": 1,
                      "state_passing": state_passing}, "lora": {"r": 4}, "optim": {"lr": 1e-2},
            "schedule": {"warmup_steps": 1}}))
        logs[coef] = main([str(path)])["log"]
    low, high = logs[0.01][0], logs[10.0][0]
    assert high["loss"] == pytest.approx(low["loss"], rel=1e-5), (low, high)
    assert [row["step"] for row in logs[10.0]] == [1, 2, 3] and all("aux_loss" in row for row in logs[10.0])
    assert high["aux_loss"] > 0.1 and high["aux_loss"] == pytest.approx(low["aux_loss"] * 1000, rel=1e-4)


@pytest.mark.parametrize("state_passing", [False, True])
def test_two_processes_weigh_every_target_token_alike_as_one_process_does(tmp_path, state_passing):
    # The loss and its gradient are means over the step's target tokens of all processes (transformers' Trainer with
    # average_tokens_across_devices): each process divided by its own targets and DDP averaged the processes, so the
    # 2 completion targets of a prompt-masked row weighed as much as a 47-target row's whole row (23x a token) and
    # the logged loss was a mean of per-process means. Two processes with one row each (`accelerate launch
    # scripts/finetune.py` on CPU, gloo) train and log as one process with both rows in its batch. The rows are of
    # one length (48 tokens): no padding, so state_passing carries the same final states either way.

    from zoo.data.text import ByteTokenizer

    pytest.importorskip("accelerate")
    base = tmp_path / "base"
    tiny("mamba").save_pretrained(base)
    ByteTokenizer().save_pretrained(base)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "question " * 5, "completion": "a"}) + "\n"
                                          + json.dumps({"text": "ab" * 23}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "question ", "completion": "b"}) + "\n")

    def config(name: str, micro_batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(base), "output_dir": str(tmp_path / name),
            "data": {"source": str(tmp_path / "train.jsonl"), "eval_source": str(tmp_path / "eval.jsonl")},
            "train": {"max_steps": 3, "micro_batch_size": micro_batch_size, "progress_bar": False, "log_every": 1,
                      "checkpoint_every": 0, "state_passing": state_passing},
            "optim": {"lr": 3e-2}, "schedule": {"kind": "constant", "warmup_steps": 0}, "lora": {"r": 4}}))
        return path

    def losses(name: str) -> list[float]:
        return [row["loss"] for row in json.loads((tmp_path / name / "finetune_result.json").read_text())["log"]]

    with pytest.MonkeyPatch.context() as mp:  # the one process on the CPU too (a GPU's sums differ past rel 1e-4)
        mp.setenv("ACCELERATE_USE_CPU", "1")
        main([str(config("one", 2))])
    env = cpu_launch_env()
    proc = run_launch(accelerate_launch("ddp", str(ROOT / "scripts" / "finetune.py"), str(config("two", 1))), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses("one")) == 3
    assert losses("two") == pytest.approx(losses("one"), rel=1e-4), (losses("two"), losses("one"))


def test_two_processes_draw_the_weight_loading_bars_of_one(tmp_path, capsys):
    # each process of `accelerate launch scripts/finetune.py` loads the base (and reloads it under the saved adapter),
    # and each drew transformers' "Loading weights" bar: the launch showed every bar once per process
    import re

    from zoo.data.text import ByteTokenizer

    base = tmp_path / "base"
    tiny("mamba").save_pretrained(base)
    ByteTokenizer().save_pretrained(base)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": "ab" * (i + 2)}) + "\n" for i in range(8)))

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(base), "output_dir": str(tmp_path / name),
            "data": {"source": str(tmp_path / "rows.jsonl"), "eval_source": str(tmp_path / "rows.jsonl")},
            "train": {"max_steps": 1, "micro_batch_size": 1, "progress_bar": False, "checkpoint_every": 0},
            "schedule": {"warmup_steps": 0}, "lora": {"r": 2, "check_forward": False}}))
        return path

    def bars(err: str) -> int:
        return len(re.findall(r"Loading weights:\s+0%", err))

    main([str(config("one"))])
    one = bars(capsys.readouterr().err)
    assert one >= 2, "the case: the base is loaded, then reloaded under the saved adapter"
    env = cpu_launch_env()
    proc = run_launch(accelerate_launch("ddp", str(ROOT / "scripts" / "finetune.py"), str(config("two"))), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bars(proc.stderr) == one, proc.stderr[-3000:]


@pytest.mark.parametrize("kwargs", [{"trainable_token_indices": [1, 2]}, {"target_modules": ["embeddings", "in_proj"]},
                                    {"modules_to_save": ["embeddings"]}], ids=["trainable-tokens", "lora", "saved"])
def test_wrap_lora_probes_a_model_whose_embedding_peft_wrapped(kwargs):
    # the coverage check read get_input_embeddings().num_embeddings, which PEFT's wrappers of the embedding lack:
    # wrap_lora(..., trainable_token_indices=[...]) (or LoRA on the embedding) failed with an AttributeError
    model = wrap_lora(tiny("mamba"), r=4, verbose=False, **kwargs)
    assert model.zoo_lora_report["probe"]["phases"] == ["train forward", "prefill", "decode step"]


def test_wrap_lora_takes_peft_names_of_its_arguments_with_a_message_and_task_type_causal_lm():
    # LoraConfig's lora_alpha / lora_dropout / task_type, passed through **lora_kwargs, failed with a bare TypeError
    # ("LoraConfig() got multiple values for keyword argument 'lora_alpha'")
    from peft import TaskType

    for name, ours in (("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        with pytest.raises(ValueError, match=f"{name} is wrap_lora's {ours}; pass {ours}=0.5"):
            wrap_lora(tiny("mamba"), verbose=False, check_forward=False, **{name: 0.5})
    with pytest.raises(ValueError, match="task_type: wrap_lora makes a causal-LM PeftModel"):
        wrap_lora(tiny("mamba"), verbose=False, check_forward=False, task_type="SEQ_CLS")
    for task_type in ("CAUSAL_LM", TaskType.CAUSAL_LM):
        model = wrap_lora(tiny("mamba"), verbose=False, check_forward=False, task_type=task_type)
        assert model.peft_config["default"].task_type == "CAUSAL_LM"


def tiny_classifier(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{name}-tiny.yaml")
    for key, value in {"num_labels": 2, "pad_token_id": 0, **overrides}.items():
        setattr(config, key, value)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("name", ["transformerpp", "mamba"])
def test_wrap_lora_on_a_classifier_trains_the_adapters_and_the_score(name):
    # wrap_lora made every model a CAUSAL_LM PeftModel: a ZooForSequenceClassification failed inside PEFT with
    # "AttributeError: 'ZooForSequenceClassification' object has no attribute 'prepare_inputs_for_generation'"
    from peft import PeftModelForSequenceClassification

    model = wrap_lora(tiny_classifier(name), r=4, alpha=8, verbose=False)
    assert isinstance(model, PeftModelForSequenceClassification)
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    report = model.zoo_lora_report
    assert report["adapted"] == default_lora_targets(tiny_classifier(name))
    assert report["probe"]["phases"] == ["train forward", "eval forward"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * len(report["adapted"])
    assert trainable - lora == {"base_model.model.score.modules_to_save.default.weight"}
    score = model.base_model.model.score.original_module.weight.detach().clone()
    ids = torch.randint(1, 512, (4, 10), generator=torch.Generator().manual_seed(1))
    ids[1, 6:] = 0  # padded
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.base_model.model.score.original_module.weight, score)


def test_wrap_lora_probes_a_classifier_without_a_pad_token_id_one_row_at_a_time():
    model = wrap_lora(tiny_classifier("gla", pad_token_id=None), r=2, verbose=False)
    assert model.zoo_lora_report["probe"]["phases"] == ["train forward", "eval forward"]


def test_an_adapter_a_classifier_bypasses_in_eval_mode_raises():
    model = tiny_classifier("transformerpp")
    model.model.layers[1].mixer = WeightReadingMixer(model.config.d_model, "eval")
    with pytest.raises(ValueError, match=r"bypassed.*\(eval forward: model\.layers\.1\.mixer\.out_proj\)"):
        wrap_lora(model, target_modules=["mixer.in_proj", "mixer.out_proj"], verbose=False)


def test_wrap_lora_refuses_a_model_that_is_neither_a_causal_lm_nor_a_classifier_and_a_task_type_of_another():
    # a model without prepare_inputs_for_generation failed inside PEFT with an AttributeError naming that method
    with pytest.raises(ValueError, match=r"a ZooModel is neither a causal LM .* nor a zoo\.ZooForSequenceClass"):
        wrap_lora(tiny("mamba").model, verbose=False)
    with pytest.raises(ValueError, match=r"task_type: wrap_lora makes a sequence-classification PeftModel "
                                         r"\(task_type 'SEQ_CLS'\) of a ZooForSequenceClassification, got 'CAUSAL_LM'"):
        wrap_lora(tiny_classifier("mamba"), verbose=False, check_forward=False, task_type="CAUSAL_LM")
    model = wrap_lora(tiny_classifier("mamba"), verbose=False, check_forward=False, task_type="SEQ_CLS")
    assert model.peft_config["default"].task_type == "SEQ_CLS"


def test_a_multi_process_launch_that_accelerate_runs_as_lone_processes_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --config_file configs/accelerate/ddp.yaml scripts/finetune.py` on a machine without GPUs and
    # without ACCELERATE_USE_CPU=1: accelerate runs each process alone, and each finetuned the whole run and wrote
    # adapter/, merged/ and finetune_result.json into the same folder at the same time, with no word (zoo train refuses)
    tiny("mamba").save_pretrained(tmp_path / "base")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({
        "model": str(tmp_path / "base"), "output_dir": str(tmp_path / "out"), "data": {"task": "mqar"},
        "train": {"max_steps": 2, "progress_bar": False}, "schedule": {"warmup_steps": 0}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"processes: launched as 2 processes .* finetune and save into .* "
                                         r"ACCELERATE_USE_CPU=1"):
        main([str(tmp_path / "ft.yaml")])
    assert not (tmp_path / "out").exists(), "refused before anything is written"


@pytest.mark.parametrize("damaged", ["state.pt", "rng-0.pt"])
def test_a_checkpoint_whose_file_is_cut_short_is_refused_naming_it(tmp_path, damaged):
    # a finetune checkpoint copied in part (or corrupted) ended the resumed run in torch's "RuntimeError:
    # PytorchStreamReader failed reading zip archive: failed finding central directory", naming no file
    import types

    from zoo.finetune import _CHECKPOINT, _load_checkpoint

    stamp = {"phase": "finetune"}
    torch.save({"stamp": stamp, "step": 4, "window": [], "params": {}, "optimizer": {}, "log": []},
               tmp_path / _CHECKPOINT)
    torch.save({"cpu": torch.get_rng_state(), "cuda": None, "step": 4}, tmp_path / "rng-0.pt")
    (tmp_path / damaged).write_bytes((tmp_path / damaged).read_bytes()[:500])
    accelerator = types.SimpleNamespace(process_index=0, print=print)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: its weights \({damaged}\) cannot be read "
                                         rf".*remove {re.escape(str(tmp_path))} to start the phase over"):
        _load_checkpoint(tmp_path, stamp, accelerator, "finetune")


def test_a_checkpoint_whose_rng_file_is_of_another_step_resumes_with_a_warning(tmp_path):
    """Each process writes its RNG file before the main process renames the checkpoint into place; a run killed
    between the two left RNG states of a later step than the weights, and the resume restored them silently (other
    LoRA dropout masks than an uninterrupted run). The RNG file now names its step, and one of another step is set
    aside with a warning."""
    import types

    from zoo.finetune import _CHECKPOINT, _load_checkpoint

    stamp = {"phase": "finetune"}
    torch.save({"stamp": stamp, "step": 4, "window": [], "params": {}, "optimizer": {}, "log": []},
               tmp_path / _CHECKPOINT)
    accelerator = types.SimpleNamespace(process_index=0, print=print)
    torch.save({"cpu": torch.get_rng_state(), "cuda": None, "step": 4}, tmp_path / "rng-0.pt")
    assert _load_checkpoint(tmp_path, stamp, accelerator, "finetune")["rng"]["step"] == 4
    torch.save({"cpu": torch.get_rng_state(), "cuda": None, "step": 6}, tmp_path / "rng-0.pt")
    with pytest.warns(UserWarning, match="rng-0.pt holds the RNG state of step 6, the checkpoint step 4"):
        assert _load_checkpoint(tmp_path, stamp, accelerator, "finetune")["rng"] is None


def test_a_finetune_stopped_by_ctrl_c_mid_step_resumes_with_the_uninterrupted_runs_dropout(tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt) mid-step saved the last completed step with the RNG state that the unfinished
    step's LoRA dropout had advanced: the resumed run redid that step with other masks than an uninterrupted run. The
    checkpoint now holds the RNG of the step before."""
    import zoo.finetune as ft

    run = mqar_finetune_runs(tmp_path, {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1,
                                        "checkpoint_every": 0}, lora={"dropout": 0.1})
    whole = run("whole")
    real = ft.forward_backward
    # the 6th call: step 3's second micro-batch, after its first one drew dropout masks
    monkeypatch.setattr(ft, "forward_backward", ctrl_c_on_call(real, 6))
    assert run("cut") == 130
    monkeypatch.setattr(ft, "forward_backward", real)
    assert run("cut")["log"] == whole["log"]


def test_a_launch_under_fsdp_is_refused_naming_the_ddp_config(tmp_path):
    # `accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/finetune.py`: the main process alone saved
    # the phase's model from FSDP-sharded weights, which takes every process, so the run waited forever after training
    tiny("mamba").save_pretrained(tmp_path / "base")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({
        "model": str(tmp_path / "base"), "output_dir": str(tmp_path / "out"),
        "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 16},
        "train": {"max_steps": 2, "micro_batch_size": 4, "progress_bar": False}, "schedule": {"warmup_steps": 0}}))
    proc = launch_fsdp_on_cpu(tmp_path, "scripts/finetune.py", str(tmp_path / "ft.yaml"), timeout=120)
    assert proc.returncode != 0
    assert "zoo finetune does not run under FSDP" in proc.stderr and "configs/accelerate/ddp.yaml" in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "refused before anything is written"


def test_the_config_asks_for_rslora_dora_and_modules_to_save(tmp_path):
    """The lora section had no fields for peft.LoraConfig's use_rslora, use_dora and modules_to_save (refused as
    unknown fields): they reached wrap_lora only from Python. The saved adapter carries them and reloads exactly
    (finetune checks the reload and the merge against the trained model)."""
    tiny("mamba").save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"), "output_dir": str(tmp_path / "run"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"max_steps": 2, "micro_batch_size": 4, "progress_bar": False},
              "schedule": {"warmup_steps": 1},
              "lora": {"use_rslora": True, "use_dora": True, "modules_to_save": ["norm_f"]}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    main([str(tmp_path / "ft.yaml")])
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["use_dora"] and saved["modules_to_save"] == ["norm_f"]
    from safetensors.torch import load_file

    names = list(load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any("norm_f" in n for n in names) and any("lora_magnitude_vector" in n for n in names), names[:8]


def test_modules_to_save_that_match_no_module_are_refused(tmp_path):
    """PEFT skips a modules_to_save entry that matches no module without a word: a mistyped 'lm_haed' finetuned the
    adapters alone, and the run said nothing. wrap_lora and the config now refuse it, the config before the pretrain
    phase."""
    with pytest.raises(ValueError, match=r"modules_to_save: \['lm_haed'\] match no module of ZooForCausalLM"):
        wrap_lora(tiny("mamba"), verbose=False, modules_to_save=["norm_f", "lm_haed"])
    model = wrap_lora(tiny("mamba"), verbose=False, modules_to_save=["norm_f"])  # a name's end, as PEFT matches it
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {"base_model.model.model.norm_f.modules_to_save.default.weight"}, trained
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "jamba-tiny.yaml"),
                                    "data": {"task": "mqar"}, "pretrain": {"data": {"task": "mqar"}},
                                    "lora": {"modules_to_save": ["norm_ff"]}}))
    with pytest.raises(ValueError, match=r"lora\.modules_to_save: \['norm_ff'\] match no module"):
        load_finetune_config(path)


def test_a_model_holding_an_adapter_is_refused_rather_than_reset(tmp_path):
    """wrap_lora of a model that already holds PEFT adapter layers (zoo.hub.load_causal_lm of an adapter, a
    PeftModel's base model) set up their adapter 'default' afresh: the trained adapter was lost and the model gave its
    base's outputs, without a word."""
    from helpers import save_trained_adapter

    from zoo.hub import load_causal_lm

    adapted = save_trained_adapter(tmp_path / "base", tmp_path / "adapter", use_dora=False)
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers \(model\.layers\.0\.mixer\.in_proj.*merge"):
        wrap_lora(load_causal_lm(tmp_path / "adapter"), verbose=False)
    with pytest.raises(ValueError, match="holds PEFT adapter layers"):
        wrap_lora(adapted.get_base_model(), verbose=False)
    wrap_lora(adapted.merge_and_unload(), verbose=False)  # merged, it takes a new adapter


def test_modules_to_save_as_a_string_is_refused():
    """modules_to_save='norm_f' (a string, not a list): PEFT took each of its characters for an entry and trained a
    copy of every module whose name ends in one (each mixer, 'r'), and the check then said LoRA was bypassed."""
    with pytest.raises(ValueError, match=r"modules_to_save: a list of module names, got the string 'norm_f'; pass "
                                         r"\['norm_f'\]"):
        wrap_lora(tiny("mamba"), verbose=False, modules_to_save="norm_f")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_finetune_stopped_after_its_last_step_does_not_train_again(how, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a scheduler's SIGTERM) after the last step, in the evaluation before the adapter is saved, left no
    checkpoint (none is saved at the last step, and with checkpoint_every above max_steps none before it): the same
    command trained the whole phase again. The last step is now kept until the adapter is saved. SIGTERM there (outside
    the training loop's own handler) killed the process without a word: it stops as Ctrl-C does now, in one line and
    exit status 130, the handler before the command back afterwards."""
    import os
    import signal

    from helpers import sigterm_raises_terminated

    import zoo.finetune as ft
    # on the CPU, where two runs are bitwise alike (a GPU's Mamba backward sums with atomics: not in the last bits)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")

    run = mqar_finetune_runs(tmp_path, {"max_steps": 4, "micro_batch_size": 4, "log_every": 1,
                                        "checkpoint_every": 100}, lora={"dropout": 0.1})
    whole = run("whole")
    real = ft.evaluate
    calls = []

    def ctrl_c_in_the_evaluation_after_training(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first: the base model's, before training
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "evaluate", ctrl_c_in_the_evaluation_after_training)
    monkeypatch.delenv("ZOO_TRACEBACK", raising=False)
    capsys.readouterr()
    with sigterm_raises_terminated() as handler:
        assert run("cut") == 130
        assert signal.getsignal(signal.SIGTERM) is handler
    assert capsys.readouterr().err.endswith("zoo finetune: interrupted\n")
    monkeypatch.setattr(ft, "evaluate", real)
    resumed = run("cut")
    assert "continuing from step 4 of 4" in capsys.readouterr().out
    assert resumed["log"] == whole["log"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "finetune-checkpoint").exists()


def test_lora_on_a_tied_lm_head_is_refused_before_anything_trains(tmp_path):
    """lora.target_modules with lm_head on a model whose head is tied to the input embeddings (zoo's default): the
    adapted model adds the adapter to the head alone, merge_and_unload adds it to the shared weight (the embeddings
    too), so the whole run trained and then failed its round-trip check ('adapter round trip changed the logits').
    Now refused when the config is read; an untied head takes it."""
    from zoo.finetune import LoraSection, _check_lora_targets

    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "mamba-tiny.yaml"),
                                    "data": {"task": "mqar"}, "pretrain": {"data": {"task": "mqar"}},
                                    "lora": {"target_modules": ["in_proj", "lm_head"]}}))
    with pytest.raises(ValueError, match=r"lora\.target_modules: matches lm_head, which is tied to the input "
                                         r"embeddings.*modules_to_save"):
        load_finetune_config(path)
    untied = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(ROOT / "configs" / "models" / "mamba-tiny.yaml",
                                                                  tie_embeddings=False))
    _check_lora_targets(LoraSection(target_modules=["in_proj", "lm_head"]), untied)
    model = wrap_lora(untied, verbose=False, target_modules=["in_proj", "lm_head"])
    randomize_lora_b(model)
    model.eval()
    x = batch()
    with torch.no_grad():
        adapted = model(x).logits
        assert_close("merged", model.merge_and_unload()(x).logits, adapted, 1e-5)


def test_lora_on_tied_input_embeddings_is_refused_before_anything_trains(tmp_path):
    """lora.target_modules with the input embeddings of a model whose lm_head is tied to them: the adapted model adds
    the adapter to the embedding lookup alone, merge_and_unload to the shared weight (the lm_head too), so the whole
    run trained and then failed its round-trip check, as with a tied lm_head. Now refused when the config is read;
    modules_to_save trains a copy that merges as adapted, and an untied model takes the adapter."""
    from zoo.finetune import LoraSection, _check_lora_targets

    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"model": str(ROOT / "configs" / "models" / "mamba-tiny.yaml"),
                                    "data": {"task": "mqar"}, "pretrain": {"data": {"task": "mqar"}},
                                    "lora": {"target_modules": ["embeddings", "in_proj"]}}))
    with pytest.raises(ValueError, match=r"lora\.target_modules: matches model\.embeddings, which is tied to the "
                                         r"output layer \(lm_head\).*modules_to_save: \[model\.embeddings\]"):
        load_finetune_config(path)
    with pytest.raises(ValueError, match=r"matches model\.embeddings, which is tied"):
        _check_lora_targets(LoraSection(target_modules=r".*\.embeddings"), tiny("mamba"))
    x = batch()
    # what the refusal saves the user from: on the tied model the merged logits are not the adapted ones
    model = wrap_lora(tiny("mamba"), verbose=False, target_modules=["embeddings"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding" in name:  # PEFT starts an embedding's A at zero
                p.normal_(0.0, 0.2)
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        assert (model.merge_and_unload()(x).logits - adapted).abs().max() > 1.0
    saved = wrap_lora(tiny("mamba"), verbose=False, modules_to_save=["embeddings"])
    with torch.no_grad():
        next(p for n, p in saved.named_parameters() if "modules_to_save" in n).add_(0.1)
    saved.eval()
    with torch.no_grad():
        adapted = saved(x).logits
        assert_close("merged copy", saved.merge_and_unload()(x).logits, adapted, 1e-5)
    untied = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(ROOT / "configs" / "models" / "mamba-tiny.yaml",
                                                                  tie_embeddings=False))
    _check_lora_targets(LoraSection(target_modules=["embeddings", "in_proj"]), untied)


def test_a_finetune_stopped_while_saving_the_merged_model_does_not_train_again(tmp_path, monkeypatch, capsys):
    """The checkpoint was removed as soon as the adapter was saved: Ctrl-C (or SIGTERM) in the reload, merge or save of
    merged/ after it left none, and the same command trained the whole phase again. It now goes with the result."""
    import zoo.hub

    run = mqar_finetune_runs(tmp_path, {"max_steps": 3, "micro_batch_size": 4, "checkpoint_every": 100})
    real = zoo.hub.save_model_folder

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo.hub, "save_model_folder", ctrl_c)
    assert run("cut") == 130
    assert (tmp_path / "cut" / "adapter").is_dir() and not (tmp_path / "cut" / "merged").exists()
    monkeypatch.setattr(zoo.hub, "save_model_folder", real)
    capsys.readouterr()
    run("cut")
    assert "continuing from step 3 of 3" in capsys.readouterr().out
    assert (tmp_path / "cut" / "merged" / "config.json").is_file()
    assert not (tmp_path / "cut" / "finetune-checkpoint").exists()


@pytest.mark.parametrize("row,named", [
    ({"text": "t", "prompt": "p", "completion": "c"}, "'completion' and 'prompt'"),
    ({"text": "t", "prompt": "p"}, "'prompt'"),
    ({"completion": "c", "text": "t"}, "'completion'"),
], ids=["all-three", "text-and-prompt", "text-and-completion"])
def test_a_jsonl_row_with_both_text_and_prompt_completion_fields_is_refused(tmp_path, row, named):
    # {"text", "prompt", "completion"} trained on the text alone (loss on every token, the prompt's too), without a
    # word, where TRL's SFTTrainer takes it as a prompt/completion row
    from zoo.finetune import read_jsonl

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c", "id": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"rows\.jsonl:2: holds both 'text' and {named}, .*keep the fields of one"):
        read_jsonl(str(data))
    data.write_text(json.dumps({"text": "t", "id": 1}) + "\n")  # other fields alongside one kind's are fine
    assert read_jsonl(str(data)) == [{"text": "t", "id": 1}]


def test_a_finetune_checkpoint_that_decayed_a_transformers_mambas_a_log_continues_as_it_trained(tmp_path, monkeypatch,
                                                                                                capsys):
    """A stopped finetune of a transformers Mamba with its mixers in modules_to_save, saved while their 2-D A_log was
    decayed (before NO_DECAY_NAMES were exempt by name), failed to continue: torch refused its optimizer state
    ("a parameter group that doesn't match the size"). It continues now, saying so, with A_log still decayed."""
    from transformers import AutoConfig

    import zoo.finetune as ft
    import zoo.train as zt
    from zoo.cli import _run

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2,
                                                                 vocab_size=64, state_size=4))
    base.save_pretrained(tmp_path / "base")
    config = {"model": str(tmp_path / "base"),
              "data": {"task": "mqar", "seq_len": 16, "task_kwargs": {"n_kv": 2, "vocab_size": 32}, "n_eval": 8},
              "train": {"progress_bar": False, "max_steps": 4, "micro_batch_size": 4, "checkpoint_every": 1},
              "lora": {"r": 4, "target_modules": ["layers.0.mixer.x_proj"], "modules_to_save": ["layers.1.mixer"]},
              "optim": {"lr": 1e-2}, "schedule": {"warmup_steps": 1}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    run = lambda: _run("zoo finetune", ft.main, [str(tmp_path / "ft.yaml"), f"--output_dir={tmp_path / 'run'}"])
    real = ft.lr_at

    monkeypatch.setattr(zt, "NO_DECAY_NAMES", ())  # the rule before the names were exempt
    monkeypatch.setattr(ft, "lr_at", ctrl_c_on_step(real, 2))
    assert run() == 130
    monkeypatch.undo()
    saved = torch.load(tmp_path / "run" / "finetune-checkpoint" / "state.pt", weights_only=True)
    decayed = [len(g["params"]) for g in saved["optimizer"]["param_groups"]]
    sizes = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: sizes.append(
        [len(g["params"]) for g in self.param_groups]) or adamw_step(self, *a, **k))
    capsys.readouterr()
    run()
    out = capsys.readouterr().out
    assert "continuing from step 2 of 4" in out and "decayed the parameters named A_log, D, dt_bias" in out
    assert sizes == [decayed] * 2 and (tmp_path / "run" / "adapter").is_dir()


def test_wrapping_and_reloading_an_adapter_print_no_deprecation_of_peft(tmp_path):
    """PEFT 0.21 reads a model's `is_gradient_checkpointing` as it wraps it, which transformers 5.2x deprecates: every
    zoo finetune (wrap_lora) and every zoo generate or zoo eval of an adapter folder (zoo.hub.load_causal_lm) printed a
    FutureWarning naming an attribute neither zoo nor the user had called."""
    from peft import PeftModel

    from zoo.hub import load_causal_lm

    tiny("mamba").save_pretrained(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), r=4, verbose=False,
                  check_forward=False).save_pretrained(tmp_path / "adapter")
        load_causal_lm(tmp_path / "adapter")
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
    deprecated = hasattr(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "is_activation_checkpointing")
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing") if deprecated else warnings.catch_warnings():
        # PEFT's own call, outside zoo, warns as it did: only zoo's wrapping hides it
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
