"""The models as users of transformers' Trainer and of PEFT call them, with those libraries' defaults."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, assert_close
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments

from zoo import ZooConfig
from zoo.finetune import default_lora_targets

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
TINY = ["mamba", "mamba2", "transformerpp", "gla", "jamba"]


def tiny(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ZooConfig.from_yaml(CONFIGS / f"{name}-tiny.yaml"))


class Rows(Dataset):
    """Four rows of 12 tokens; the last two are mostly ignored (-100), so micro-batches hold unequal targets."""

    def __init__(self):
        self.ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        if i >= 2:
            labels[:9] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def _one_sgd_step(name: str, batch_size: int, accumulation: int, tmp_path) -> torch.Tensor:
    model = tiny(name).train()
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path / f"{batch_size}x{accumulation}"), max_steps=1,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                             optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Rows()).train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


@pytest.mark.parametrize("name", ["mamba", "transformerpp"])
def test_trainer_gradient_accumulation_equals_one_large_batch(name, tmp_path):
    # The Trainer passes num_items_in_batch to a forward that takes **kwargs and then leaves the loss unscaled: a
    # model that ignored it took accumulation-steps times the step, with micro-batches weighted equally
    whole = _one_sgd_step(name, 4, 1, tmp_path)
    accumulated = _one_sgd_step(name, 2, 2, tmp_path)
    err = ((accumulated - whole).norm() / whole.norm()).item()
    assert err < 1e-4, f"‖Δ(2x2) − Δ(4x1)‖/‖Δ(4x1)‖ = {err:.3e}"


def test_num_items_in_batch_makes_the_loss_a_share_of_the_batch_sum():
    model = tiny("jamba").eval()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[1, :6] = -100
    mean = model(ids, labels=labels).loss
    share = model(ids, labels=labels, num_items_in_batch=torch.tensor(26)).loss
    n_targets = 9 + 4  # the shifted targets labels[:, 1:] that are not -100 (what the Trainer counts)
    torch.testing.assert_close(share, mean * n_targets / 26)


def test_a_micro_batch_without_targets_adds_zero_under_num_items_in_batch_as_in_llama():
    """SFT rows whose targets were all truncated away: under gradient accumulation the Trainer passes the whole
    batch's count, and such a micro-batch must add 0 to the loss and the gradients (its mean is NaN)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))
    model = tiny("jamba").train()
    ids = torch.randint(0, 512, (2, 10))
    labels = torch.full_like(ids, -100)
    for m in (llama, model):
        loss = m(ids, labels=labels, num_items_in_batch=torch.tensor(26)).loss
        assert loss.item() == 0.0, f"{type(m).__name__}: {loss}"
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TINY)
def test_lora_config_without_target_modules_adapts_the_mixer_projections(name):
    # PEFT looks its default targets up by model_type; without an entry for "zoo" it raised "Please specify
    # `target_modules`"
    model = tiny(name)
    expected = set(default_lora_targets(model))
    peft_model = get_peft_model(model, LoraConfig(r=4))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected


class TokenShift(torch.nn.Module):
    """A custom mixer whose projections share no name with the built-in mixers' (y_t = wo(wx(x_t) + wx(x_t-1))).
    It reads the previous token, so it defines no init_state (no cache): None would claim it is position-wise
    (zoo.cache.require_positionwise refuses that at the first cached step)."""

    lora_targets = ("wx", "wo")

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.wx = torch.nn.Linear(d_model, d_model, bias=False)
        self.wo = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        h = self.wx(x)
        return self.wo(h + torch.nn.functional.pad(h, (0, 0, 1, 0))[:, :-1])


@pytest.fixture
def registry_restored(monkeypatch):
    """The mixer registry and PEFT's default targets for "zoo" as they were before the test."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from zoo import registry

    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))
    saved = list(defaults["zoo"])
    yield registry
    defaults["zoo"][:] = saved  # in place: the registry keeps this list current


@pytest.mark.parametrize("how", ["registered", "dotted-path"])
def test_lora_config_without_target_modules_adapts_a_custom_mixer(registry_restored, how):
    # PEFT's default targets for "zoo" were the built-in mixers' names, fixed at `import zoo`: a mixer registered
    # after it (or named by its import path) was left without adapters
    if how == "registered":
        registry_restored.register_mixer("token_shift")(TokenShift)
    mixer_type = "token_shift" if how == "registered" else f"{__name__}.TokenShift"
    config = ZooConfig(vocab_size=64, d_model=32, layers="SA", ffn="none",
                       mixers={"S": {"type": mixer_type}, "A": {"type": "attention", "n_heads": 2}})
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=4))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(default_lora_targets(model))
    assert {"model.layers.0.mixer.wx", "model.layers.0.mixer.wo"} <= adapted


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_trainable_tokens_of_a_tied_embedding_reach_the_lm_head_and_merge_exactly(name):
    # PEFT reads tie_word_embeddings from config.to_dict() to give the tied lm_head the new token rows too; the dict
    # lacked it, so the adapted model's head kept the old rows and merge_and_unload changed the logits (|Δ| ~ 30)
    model = tiny(name).eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, trainable_token_indices={"embeddings": [1, 2, 3]}))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
        ids = torch.tensor([[5, 1, 7, 2, 3], [3, 9, 2, 11, 1]])
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert_close("merged vs adapted logits", merged, adapted, 1e-5)


def test_merging_a_trained_copy_of_a_tied_lm_head_unties_the_config(tmp_path):
    # PEFT marks the merged config untied when the lm_head trained apart from the embedding (modules_to_save), if
    # config.to_dict() names tie_word_embeddings; it stayed tied, and an export re-tied the head (|Δlogit| 0.7)
    from zoo.convert import convert

    peft_model = get_peft_model(tiny("transformerpp").eval(), LoraConfig(r=4, modules_to_save=["lm_head"]))
    ids = torch.randint(1, 512, (2, 5))
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
        adapted = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    assert merged.config.tie_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    convert(tmp_path / "merged", tmp_path / "llama", to_format="hf-llama")
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")(ids).logits
    assert_close("exported vs adapted logits", exported, adapted, 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_padding_free_collator_rows_equal_separate_documents(name):
    # DataCollatorWithFlattening packs documents into one row marked only by position_ids that restart (no seq_idx,
    # no attention_mask), as transformers' models read them; the documents used to leak into each other
    model = tiny(name).eval()
    docs = [torch.randint(0, 512, (n,)).tolist() for n in (7, 5, 9)]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    separate = torch.cat([model(torch.tensor([d])).logits[0] for d in docs])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_padding_free_collator_with_flash_attn_kwargs_keeps_documents_apart(name):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False) marks the documents only
    by cu_seq_lens_q / _k, which the Trainer passes on with the batch: they were ignored and the documents leaked."""
    model = tiny(name).eval()
    docs = [torch.randint(0, 512, (n,)).tolist() for n in (7, 5, 9)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
        [{"input_ids": d} for d in docs])
    assert "cu_seq_lens_q" in batch and "position_ids" not in batch
    separate = torch.cat([model(torch.tensor([d])).logits[0] for d in docs])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[0], separate, atol=1e-5, rtol=1e-5)
        hidden = model.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden)[0], separate, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cu_seq_lens_q: expected the document boundaries"):
        model(input_ids=batch["input_ids"].expand(2, -1), cu_seq_lens_q=batch["cu_seq_lens_q"])


def test_trainer_label_smoothing_shifts_the_labels(tmp_path):
    # the Trainer pops the labels and smooths the loss itself, shifting them only for models it knows as causal LMs
    model = tiny("mamba").eval()
    rows = Rows()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, label_smoothing_factor=1e-6,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    smoothed = Trainer(model=model, args=args).evaluate(rows)["eval_loss"]
    batch = torch.stack([rows[i]["labels"] for i in range(len(rows))])
    expected = model(rows.ids, labels=batch).loss.item()
    assert abs(smoothed - expected) < 1e-3, (smoothed, expected)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "jamba"])
def test_offloading_a_mamba_layer_is_refused_at_load(name, tmp_path):
    # accelerate's offload hooks load a module's weights in its own forward; Mamba's kernels read conv1d.weight
    # directly, so the forward failed with "Tensor on device cpu is not on the expected device meta!"
    tiny(name).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"offloads model\.layers\.0\.mixer \(Mamba2?\) to 'disk'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": "disk"},
                                             offload_folder=str(tmp_path / "offload"))



@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_offloading_a_mamba_layer_through_dispatch_model_is_refused_at_the_first_forward(name, tmp_path):
    # accelerate's own big-model loading (init_empty_weights, then load_checkpoint_and_dispatch) never passes through
    # from_pretrained's refusal: the forward failed with "Tensor on device cpu is not on the expected device meta!"
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    model = tiny(name).eval()
    model.save_pretrained(tmp_path / "model")
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config)
    device_map = {"model.embeddings": "cpu", "model.norm_f": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(len(model.model.layers))})
    empty.tie_weights()
    dispatched = load_checkpoint_and_dispatch(empty, str(tmp_path / "model"), device_map=device_map,
                                              offload_folder=str(tmp_path / "offload")).eval()
    ids = torch.randint(0, 512, (2, 9))
    with pytest.raises(ValueError, match=r"dispatch_model: the device_map offloads model\.layers\.1\.mixer \(Mamba\)"):
        dispatched(ids)
    device_map["model.layers.1"] = "cpu"  # the same model kept whole runs as before
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config)
    empty.tie_weights()
    kept = load_checkpoint_and_dispatch(empty, str(tmp_path / "model"), device_map=device_map).eval()
    with torch.no_grad():
        assert_close("kept whole", kept(ids).logits, model(ids).logits, 1e-6)

def test_offloading_attention_layers_of_a_hybrid_still_loads_and_runs(tmp_path):
    model = tiny("jamba").eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embeddings": "cpu", "model.norm_f": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in (2, 6) else "cpu" for i in range(8)})  # the "A" layers
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(offloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", TINY)
def test_cpu_bf16_autocast_training_gives_the_fp32_gradients(name):
    # Trainer(bf16=True) and Accelerator(mixed_precision="bf16") on CPU train under torch.autocast("cpu"); Mamba's
    # channels-first out_proj failed in backward there (an fp32 weight against the bf16 gradient)
    model = tiny(name).train()
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    # one norm over every gradient: a single small norm weight's gradient rounds by ~20% in bf16 on some CPUs
    # (torch 2.11 on the GPU machine), while a dtype error fails the backward or puts every gradient far off
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert_close("all gradients", torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref]), 0.05)


def test_eager_attn_implementation_says_it_changes_nothing():
    from zoo import ZooConfig

    path = ROOT / "configs" / "models" / "transformerpp-tiny.yaml"
    with pytest.warns(UserWarning, match="attn_implementation='eager' does not change zoo's attention"):
        AutoModelForCausalLM.from_config(ZooConfig.from_yaml(path), attn_implementation="eager")
    config = ZooConfig.from_yaml(path)  # from_config wrote the choice into the config it was given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_config(config)  # the default (sdpa) says nothing of it
    assert not [w for w in caught if "attn_implementation" in str(w.message)]
    spec = {**config.mixers["A"], "attn_backend": "math"}  # what the warning tells to do works
    model = AutoModelForCausalLM.from_config(ZooConfig(**{**config.to_dict(), "mixers": {"A": spec}}))
    assert {m.attn_backend for m in model.modules() if hasattr(m, "attn_backend")} == {"math"}
    model(torch.randint(0, config.vocab_size, (1, 8)))


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
def test_flash_attn_implementation_loads_and_says_zoo_picks_flash_attn_itself(implementation, tmp_path):
    """from_pretrained(..., attn_implementation="flash_attention_2"), the usual load call, was refused with
    transformers' 'does not support Flash Attention 2 yet, request support on the hub page'."""
    from zoo import ZooConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml")).eval()
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=f"attn_implementation='{implementation}' does not change.*attn_backend"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_output_attentions_is_refused_not_answered_with_none():
    # the forward took output_attentions in **kwargs and returned attentions=None (generate: a tuple of Nones)
    model = tiny("jamba").eval()
    ids = torch.randint(0, 512, (1, 5))
    with pytest.raises(ValueError, match="output_attentions: zoo models return no attention weights"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    assert model(ids, output_attentions=False).logits.shape == (1, 5, 512)


def test_trainer_predictions_of_a_moe_model_are_the_logits(tmp_path):
    # the MoE aux loss came back as a second prediction, so compute_metrics saw a tuple (logits, aux per batch)
    model = tiny("jamba").eval()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    predictions = Trainer(model=model, args=args).predict(Rows()).predictions
    assert not isinstance(predictions, tuple) and predictions.shape == (4, 12, 512)


def test_output_router_logits_is_a_config_field_that_from_pretrained_sets(tmp_path):
    # the forward defaults to config.output_router_logits, but the config had no such field, so
    # from_pretrained(..., output_router_logits=True) (as Mixtral's and Jamba's take it) passed the keyword to the
    # model's __init__: TypeError
    tiny("jamba").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, output_router_logits=True).eval()
    assert model.config.output_router_logits is True
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    assert model(ids).router_logits is not None
    assert model.generate(ids, max_new_tokens=2, pad_token_id=0).shape == (1, 7)
    assert AutoModelForCausalLM.from_pretrained(tmp_path)(ids).router_logits is None


@pytest.mark.parametrize("name", TINY)
def test_prefix_tuning_is_refused_when_the_adapter_is_added_naming_the_mixers(name, tmp_path):
    """PEFT's prefix tuning hands the model a transformers cache of virtual keys and values for every layer. On a zoo
    model without attention layers (Mamba, Mamba-2, GLA) it crashed inside PEFT's get_prompt at the first forward
    ("unsupported operand type(s) for //: 'int' and 'NoneType'"); on one with attention layers the forward refused
    the cache. It is refused when the adapter is added (get_peft_model, PeftModel.from_pretrained, zoo eval's
    loading), naming the model's mixers and what works instead."""
    from peft import PeftModel, PrefixTuningConfig

    from zoo.hub import load_causal_lm

    mixers = ", ".join(dict.fromkeys(spec["type"] for spec in tiny(name).config.layer_specs()))
    why = "no attention layers" if "attention" not in mixers else "ZooCache"
    match = rf"^(?=.*{why})(?=.*mixers: {mixers}\)).*PREFIX_TUNING.*LoRA.*prompt tuning"
    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny(name), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    # an adapter saved elsewhere (a transformers model's, retargeted) meets the same refusal when loaded
    tiny(name).save_pretrained(tmp_path / "base")
    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, base_model_name_or_path=str(tmp_path / "base"),
                       num_layers=2, token_dim=64, num_attention_heads=4).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny(name), tmp_path / "adapter")
    with pytest.raises(ValueError, match="PREFIX_TUNING adapter"):  # (zoo eval's, refused as any prompt learning)
        load_causal_lm(tmp_path / "adapter")
    # LoRA on the same model is untouched
    assert get_peft_model(tiny(name), LoraConfig(r=2)).active_peft_config.peft_type == "LORA"


def test_a_cache_implementation_generate_cannot_honour_warns():
    """generate(cache_implementation="static") builds no transformers cache for a zoo model: it says so and decodes
    the same tokens with the ZooCache."""
    model = tiny("mamba").eval()
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="cache_implementation='static' is ignored"):
        static = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(plain, static)


def test_a_cache_implementation_beside_a_cache_of_the_callers_warns_too():
    """transformers refuses cache_implementation beside a cache passed to generate; zoo decodes with the cache passed
    and ignored the setting without a word there, while it warns without a cache."""
    from zoo import ZooCache

    model = tiny("jamba").eval()
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="cache_implementation='static' is ignored"):
        static = model.generate(ids, past_key_values=ZooCache.for_model(model), max_new_tokens=3, do_sample=False,
                                pad_token_id=0, cache_implementation="static")
    assert torch.equal(plain, static)


@pytest.mark.parametrize("name", ["mamba", "transformerpp"])
def test_continuous_batching_is_refused_naming_it_and_leaves_the_generation_config(name):
    """generate(cache_implementation="paged") switches to transformers' continuous batching, whose paged cache holds
    no recurrent state and which zoo's attention does not read: it failed naming a config field ("num_key_value_heads
    or num_attention_heads could not be found"), after setting the model's generation_config.eos_token_id to -1."""
    model = tiny(name).eval()
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="continuous batching .* not supported by zoo models"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="paged")
    with pytest.raises(ValueError, match="continuous batching .* not supported by zoo models"):
        model.generate_batch(inputs=ids.tolist(), max_new_tokens=3)
    assert model.generation_config.eos_token_id is None
    plain = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert plain.shape == (2, 9)


@pytest.mark.parametrize("name, config", [
    ("mamba", {"target_parameters": ["conv1d.weight"]}),
    ("mamba2", {"target_parameters": ["conv1d.weight"]}),
    ("jamba", {"target_parameters": ["conv1d.weight"]}),
    ("mamba", {"target_modules": ["conv1d"], "r": 128}),  # LoRA's Conv1d takes a depthwise conv at r % groups == 0
], ids=["mamba-parameter", "mamba2-parameter", "jamba-parameter", "mamba-conv1d-module"])
def test_an_adapter_on_the_conv_that_the_kernels_would_skip_is_refused(name, config):
    # the conv kernels read conv1d.weight without calling conv1d: an adapter PEFT put there (target_parameters, or
    # LoRA's Conv1d) changed nothing in the forward, got no gradient, and merge_and_unload then changed the logits
    model = tiny(name).eval()
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "target_modules": [], **config},
                                                  init_lora_weights=False)).eval()
    with pytest.raises(ValueError, match=r"conv1d: a PEFT adapter .* kernels read conv1d\.weight"):
        peft_model(input_ids=ids)
    with torch.no_grad(), peft_model.disable_adapter():  # without it active, or merged, the weight read is right
        torch.testing.assert_close(peft_model(input_ids=ids).logits, base)
    if "target_parameters" not in config:
        return  # PEFT merges no Conv1d LoRA of a grouped conv
    peft_model.merge_adapter()
    with torch.no_grad():
        merged = peft_model(input_ids=ids).logits
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(peft_model.merge_and_unload()(ids).logits, merged)


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_lora_on_a_mixers_own_parameter_says_why_the_model_keeps_no_cache(name):
    # target_parameters=["A_log"] puts the whole Mamba mixer inside PEFT's ParamWrapper, which has no init_state: a
    # cached forward said "mixer ParamWrapper defines no init_state ... give ParamWrapper init_state", and generate
    # warned the same, as if ParamWrapper were a custom mixer of the user's. The uncached numbers are right.
    model = tiny(name).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "A_log" not in n:  # weights large enough for A_log to move the logits
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=["A_log"],
                                                  init_lora_weights=False)).eval()
    why = r"Mamba is wrapped whole by PEFT's ParamWrapper \(LoRA's target_parameters on its A_log\)"
    with torch.no_grad():
        with pytest.raises(ValueError, match=why + r".*use_cache=False.*merge_and_unload"):
            peft_model(input_ids=ids, use_cache=True)
        with pytest.warns(UserWarning, match=why + r".*merge_and_unload"):
            out = peft_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(3):  # greedy by full forwards, the adapter applied
            seq = torch.cat([seq, peft_model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert (peft_model(input_ids=ids).logits - base).abs().max() > 1e-3  # the adapter counts
        assert torch.equal(out, seq)
        merged = peft_model.merge_and_unload()
        cached = merged.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_lora_layer_replication_builds_the_stack_it_names(name, tmp_path):
    # LoraConfig(layer_replication=...) replaces the model's blocks with weight-sharing copies and sets
    # config.num_hidden_layers to their count: zoo's config refused the count ("drop num_hidden_layers"), after PEFT had
    # already replaced the blocks of the model passed in
    from peft import PeftModel

    model = tiny(name).eval()
    n = len(model.model.layers)
    plan = [[0, n // 2], [n // 4, n]]
    order = list(range(0, n // 2)) + list(range(n // 4, n))
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    # the stack it names, built as a plain model: its config lists the copied blocks' specs, its weights the sources'
    specs = model.config.layer_specs()
    reference = AutoModelForCausalLM.from_config(ZooConfig(**{**model.config.to_dict(),
                                                              "layers": [specs[i] for i in order]})).eval()
    source = model.state_dict()
    reference.load_state_dict({k: source[k if not k.startswith("model.layers.") else
                                         "model.layers.{}.{}".format(order[int(k.split(".")[2])],
                                                                     ".".join(k.split(".")[3:]))]
                               for k in reference.state_dict()})
    model.gradient_checkpointing_enable({"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["out_proj"], layer_replication=plan)).eval()
    assert len(peft_model.get_base_model().model.layers) == len(order) == peft_model.config.num_hidden_layers
    assert peft_model.get_base_model().model._checkpointed == set(range(len(order)))  # the copies checkpoint too
    with torch.no_grad():  # LoRA starts as the identity: the replicated model is the reference
        torch.testing.assert_close(peft_model(input_ids=ids).logits, reference(ids).logits)
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
        adapted = peft_model(input_ids=ids).logits
        assert (adapted - reference(ids).logits).abs().max() > 1e-3
        seq = ids  # cached generate continues as full forwards do
        for _ in range(3):
            seq = torch.cat([seq, peft_model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(peft_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0), seq)
    peft_model.save_pretrained(tmp_path / "adapter")  # and the adapter reloads onto a fresh base model
    reloaded = PeftModel.from_pretrained(tiny(name), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted)


def test_the_tied_embedding_is_known_to_peft_by_name_as_llama_embed_tokens_is():
    # PEFT recognizes a tied input embedding by its module name (peft.utils.constants.EMBEDDING_LAYER_NAMES:
    # embed_tokens, lm_head); zoo's "embeddings" was not in it: ensure_weight_tying=True was ignored (the embedding's
    # trained copy left the tied lm_head on the base rows, with a warning that no tied module was targeted), and LoRA
    # on the tied embedding (whose merge also moves the head) came without the warning Llama's embed_tokens gets
    model = tiny("transformerpp").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"], modules_to_save=["embeddings"],
                                                      ensure_weight_tying=True)).eval()
    assert not [w for w in caught if "ensure_weight_tying" in str(w.message)]
    ids = torch.randint(1, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_model.base_model.model.model.embeddings.modules_to_save["default"].weight.add_(0.1)
        adapted = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.lm_head.weight, merged.model.embeddings.weight)  # trained as one, as Llama's
    assert_close("merged vs adapted logits", merged(ids).logits, adapted, 1e-5)
    with pytest.warns(UserWarning, match="tie_word_embeddings=True` and a tied layer is part of the adapter"):
        get_peft_model(tiny("transformerpp"), LoraConfig(r=4, target_modules=["embeddings", "o_proj"]))


@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], "all-linear"],
                         ids=["experts", "all-linear"])
def test_a_mixed_adapter_batch_on_moe_experts_gives_each_row_its_adapter(targets):
    # the MoE ran its router on (tokens, d) and each expert on the tokens routed to it, so PEFT's mixed-adapter batch
    # (adapter_names, one per row) failed its length check ("should be the same as the number of inputs, but got 3
    # and 10") in forward and generate whenever LoRA was on the router or the experts
    model = tiny("jamba").eval()
    ids = torch.randint(1, 512, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
                                adapter_name="one")
    peft_model.add_adapter("two", LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    peft_model.eval()
    names = ["one", "two", "__base__"]
    alone = {}
    with torch.no_grad():
        mixed = peft_model(input_ids=ids, adapter_names=names).logits
        for name in ("one", "two"):
            peft_model.set_adapter(name)
            alone[name] = peft_model(input_ids=ids).logits
    assert_close("adapter one", mixed[0], alone["one"][0], 1e-5)
    assert_close("adapter two", mixed[1], alone["two"][1], 1e-5)
    assert_close("base row", mixed[2], base[2], 1e-5)
    assert (alone["one"] - alone["two"]).abs().max() > 1e-3 and (alone["one"][2] - base[2]).abs().max() > 1e-3
    generated = peft_model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                own = peft_model.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
        else:
            peft_model.set_adapter(name)
            own = peft_model.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated[i], own[0]), name


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_a_mixed_adapter_batch_that_would_need_several_conv_copies_is_refused(name):
    # the conv kernels read conv1d.weight, which a modules_to_save wrapper hands out for its active adapter: in a mixed
    # batch (adapter_names) every row got that copy, so an adapter's rows and "__base__" rows came out wrong (0.6 apart
    # on the tiny Mamba) without a word; PEFT's own wrapper, were it called, gives each row its copy
    ids = torch.randint(1, 512, (3, 7), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(tiny(name), LoraConfig(r=4, target_modules=["out_proj"], modules_to_save=["conv1d"],
                                                       init_lora_weights=False), adapter_name="one")
    peft_model.add_adapter("two", LoraConfig(r=4, target_modules=["out_proj"], modules_to_save=["conv1d"],
                                             init_lora_weights=False))
    peft_model.eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".conv1d.modules_to_save." in n:  # each adapter's trained conv
                p.add_(0.3 if ".two." in n else -0.3)
        for names in (["one", "two", "one"], ["one", "__base__", "one"]):
            with pytest.raises(ValueError, match=r"conv1d: a mixed-adapter batch .* read one conv1d\.weight"):
                peft_model(input_ids=ids, adapter_names=names)
            with pytest.raises(ValueError, match="mixed-adapter batch"):
                peft_model.generate(input_ids=ids, adapter_names=names, max_new_tokens=2, do_sample=False)
        # and the refusal left no PEFT hook behind (PEFT drops them only when the call returns): the model runs on
        alone = peft_model(input_ids=ids).logits
        assert_close("after the refusals", peft_model(input_ids=ids[:2]).logits, alone[:2], 1e-6)
        # rows that all take the weight read are served: the active adapter's, or the base's with it disabled
        assert_close("active adapter's rows", peft_model(input_ids=ids, adapter_names=["one"] * 3).logits, alone, 1e-6)
        with peft_model.disable_adapter():  # (where PEFT runs every row on the base, whatever the names)
            base = peft_model(input_ids=ids).logits
            assert_close("base rows", peft_model(input_ids=ids, adapter_names=["__base__"] * 3).logits, base, 1e-6)
            assert_close("rows disabled", peft_model(input_ids=ids, adapter_names=["one", "two", "one"]).logits, base,
                         1e-6)


@pytest.mark.parametrize("name", TINY)
def test_prompt_tuning_trains_and_generates_without_num_attention_heads(name):
    # PEFT's prompt learning reads num_attention_heads from the model config's dict and raised "Please specify
    # `num_attention_heads` in `peft_config`" for every zoo model (prompt tuning and P-tuning never use the value):
    # the config now gives its attention layers' heads, or None where it has none
    from peft import PromptTuningConfig

    model = tiny(name)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    heads = peft_model.peft_config["default"].num_attention_heads
    assert heads == model.config.attention_heads() and (heads is None) == (name in ("mamba", "mamba2", "gla"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # only the virtual tokens trained
    peft_model.eval()
    # each step's logits are those of a whole forward of the tokens so far (the virtual tokens prepended once): on
    # transformers 5.2x, whose generate names the cache `cache`, PEFT's prompt learning looked for past_key_values,
    # found none, and prepended the virtual tokens again at every decode step (other logits, no error)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row too
    out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        for i, logits in enumerate(out.logits):
            whole = peft_model(input_ids=out.sequences[:, :6 + i], attention_mask=F.pad(mask, (0, i), value=1))
            assert_close(f"step {i}", logits, whole.logits[:, -1], 1e-5)


def test_num_attention_heads_follows_the_attention_mixers():
    config = ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml")
    assert config.to_dict()["num_attention_heads"] == 4 and "num_attention_heads" not in config.to_diff_dict()
    assert ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml").to_dict()["num_attention_heads"] is None
    assert ZooConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    # a dict of it fed back with other layers (zoo graft does so) follows the new mixers
    assert ZooConfig(**{**config.to_dict(), "layers": "MM"}).to_dict()["num_attention_heads"] is None


def test_num_attention_heads_counts_the_default_heads_of_a_spec_without_n_heads():
    # an attention spec without n_heads builds d_model // 64 heads; the config's dict said None, as for a model
    # without attention layers
    config = ZooConfig(vocab_size=64, d_model=128, layers="AA", mixers={"A": {"type": "attention"}})
    heads = AutoModelForCausalLM.from_config(config).model.layers[0].mixer.n_heads
    assert config.to_dict()["num_attention_heads"] == heads == 2
    mixed = ZooConfig(vocab_size=64, d_model=128, layers="AB", mixers={"A": {"type": "attention"},
                                                                       "B": {"type": "attention", "n_heads": 2}})
    assert mixed.to_dict()["num_attention_heads"] == 2


def test_modules_to_save_on_a_moe_layer_trains_it_with_its_aux_loss():
    # the block told a MoE from an MLP by its class, so a MoE under PEFT's ModulesToSaveWrapper had its (output,
    # router logits) added to the residual stream: "unsupported operand type(s) for +: 'Tensor' and 'tuple'"
    model = tiny("jamba").train()
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    base = model(input_ids=ids, labels=ids)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["layers.1.ffn"]))
    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids)
    assert_close("aux loss", out.aux_loss, base.aux_loss, 1e-6)
    assert_close("loss", out.loss, base.loss, 1e-6)
    out.loss.backward()
    copy = peft_model.base_model.model.model.layers[1].ffn.modules_to_save["default"]
    assert copy.router.weight.grad is not None and copy.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_a_cache_for_a_peft_model_is_built_from_the_model_it_wraps(name):
    """ZooCache.for_model(peft_model), the cache a PEFT user builds to prefill once and generate from: it read
    peft_model.model (the adapted ZooForCausalLM) as the ZooModel and failed with "'ZooForCausalLM' object has no
    attribute 'layers'"."""
    from zoo import ZooCache

    model = get_peft_model(tiny(name).eval(), LoraConfig(r=4, init_lora_weights=False))
    prompt = torch.randint(1, 512, (2, 7))
    cache = ZooCache.for_model(model)
    with torch.no_grad():
        model(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=prompt, past_key_values=cache, **kw)
    assert torch.equal(out, model.generate(input_ids=prompt, **kw))
    with pytest.raises(TypeError, match="holds no zoo model"):
        ZooCache.for_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("padded", [False, True], ids=["all-ones", "left-padded"])
def test_generate_drops_an_all_ones_attention_mask_and_keeps_padding(padded, monkeypatch):
    """transformers 5.17's generate passes an all-ones mask for unpadded rows, extended by one each step (5.2x drops
    it itself): it says nothing, and each attention layer built a dense key mask from it (on flash-attn, packed the
    rows: a device sync). The forward now gets none for such rows, at every step; a padded mask reaches every step
    as it is. (Fails on the code before on transformers 5.17, the lowest version CI runs.)"""
    model = tiny("jamba").eval()  # attention, Mamba and MoE layers
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    masks = []
    forward = model.model.forward

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert len(masks) == 4
    if padded:
        assert all(m is not None and m.shape == (2, 6 + i) and not m[0, :2].any() for i, m in enumerate(masks))
    else:
        assert all(m is None for m in masks)
    with torch.no_grad():  # each step's logits: those of one whole forward of the tokens so far, with the mask
        for i, logits in enumerate(out.logits):
            whole = model(input_ids=out.sequences[:, :6 + i], attention_mask=F.pad(mask, (0, i), value=1))
            assert_close(f"step {i}", logits, whole.logits[:, -1], 1e-5)


def test_prompt_tuning_generates_through_a_dropped_all_ones_mask():
    """PEFT's prompt learning extends the attention_mask by its virtual tokens in its own preparation, after zoo's
    dropped an all-ones one: each step's logits stay those of a whole forward of the tokens so far."""
    from peft import PromptTuningConfig

    peft_model = get_peft_model(tiny("jamba"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        for i, logits in enumerate(out.logits):
            whole = peft_model(input_ids=out.sequences[:, :6 + i], attention_mask=torch.ones(2, 6 + i).long())
            assert_close(f"step {i}", logits, whole.logits[:, -1], 1e-5)


@pytest.mark.parametrize("where", ["argument", "generation_config"])
def test_prompt_tuning_refuses_a_chunked_prefill(where):
    """PEFT's prompt learning prepares each generate step itself: with prefill_chunk_size it put its virtual tokens
    before the first chunk and cut each later chunk to its last token (its cache already longer than the chunk), so
    the prompt's middle went unread and the logits differed (0.05 on the tiny Jamba), without an error."""
    from peft import PromptTuningConfig

    peft_model = get_peft_model(tiny("jamba"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids = torch.randint(1, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    chunked = {"prefill_chunk_size": 4} if where == "argument" else {}
    if where == "generation_config":
        peft_model.generation_config.prefill_chunk_size = 4
    with pytest.raises(ValueError, match="prefill_chunk_size=4 with PEFT's prompt learning.*Drop prefill_chunk_size"):
        peft_model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, **chunked)
    whole = peft_model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=None)
    assert whole.shape == (2, 9)


@pytest.mark.parametrize("name", ["mamba2", "jamba", "attention-window"])
def test_prompt_tuning_on_a_left_padded_row_equals_the_row_alone(name):
    """PEFT's prompt tuning prepends its virtual tokens to a left-padded row, [virtual tokens, pads, prompt]: the
    pads after the virtual tokens decayed the recurrent states and zeroed the conv windows, so the padded row's
    logits differed from the row alone (Mamba-2's greedy tokens too). On a Transformer++ with a sliding window of 4
    the window counted the pads as positions (the first prompt tokens saw fewer virtual tokens than alone) and the
    cache kept the last 3 positions, pads among them, so the decoded tokens lost keys the window still covers."""
    from peft import PromptTuningConfig

    torch.manual_seed(0)
    if name == "attention-window":
        model = AutoModelForCausalLM.from_config(ZooConfig(
            vocab_size=512, d_model=64, layers="AA", ffn={"type": "swiglu", "hidden": 192},
            mixers={"A": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 4}}))
    else:
        model = tiny(name)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = peft_model(input_ids=ids, attention_mask=mask).logits
        alone = peft_model(input_ids=ids[1:, 3:], attention_mask=mask[1:, 3:]).logits
    assert_close("padded row", padded[1:, -5:], alone[:, -5:], 1e-5)
    out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    out_alone = peft_model.generate(input_ids=ids[1:, 3:], max_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    assert torch.equal(out.sequences[1, -4:], out_alone.sequences[0, -4:])
    for i, (step, step_alone) in enumerate(zip(out.logits, out_alone.logits)):
        assert_close(f"decode step {i}", step[1:], step_alone, 1e-5)


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_prompt_tuning_with_a_prefill_split_in_chunks_is_refused_and_one_chunk_decodes_as_without(name):
    """PEFT's prompt tuning prepends its virtual tokens to the first chunk of a chunked prefill (prefill_chunk_size):
    the cache counts them, so transformers took the later chunks as cached and ran one token of each, skipping most
    of the prompt (other logits, no error; with an attention_mask a refusal naming a mask length). A prompt split in
    chunks is refused; one that fits a chunk (its tokens less the last) decodes as without the setting."""
    from peft import PromptTuningConfig

    peft_model = get_peft_model(tiny(name), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    ids = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="prefill_chunk_size=3 with PEFT's prompt learning"):
        peft_model.generate(input_ids=ids, prefill_chunk_size=3, **kw)
    whole = peft_model.generate(input_ids=ids, **kw)
    one_chunk = peft_model.generate(input_ids=ids, prefill_chunk_size=8, **kw)
    assert torch.equal(one_chunk.sequences, whole.sequences)
    assert_close("one chunk", torch.stack(one_chunk.logits), torch.stack(whole.logits), 1e-5)


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_prompt_tuning_takes_an_empty_cache_and_refuses_a_filled_one_naming_why(name):
    """PEFT's prompt learning replaces prepare_inputs_for_generation for the call, so transformers checked generate's
    keyword arguments against zoo's forward, which did not name `cache`: any cache given to generate failed with "The
    following `model_kwargs` are not used by the model: ['cache']". An empty one now decodes as without it; a filled
    one counts the virtual tokens, which generate would take for prompt tokens (transformers' Llama decodes other
    tokens without an error): it is refused, naming why."""
    from peft import PromptTuningConfig

    from zoo import ZooCache

    peft_model = get_peft_model(tiny(name), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    plain = peft_model.generate(input_ids=ids, **kw)
    cache = ZooCache.for_model(peft_model)
    given = peft_model.generate(input_ids=ids, past_key_values=cache, **kw)
    assert torch.equal(given.sequences, plain.sequences)
    assert_close("with an empty cache", torch.stack(given.logits), torch.stack(plain.logits), 1e-5)
    turn = torch.cat([given.sequences, torch.randint(1, 512, (2, 5), generator=torch.Generator().manual_seed(1))], 1)
    with pytest.raises(ValueError, match="holds 11 tokens, given with PEFT's prompt learning"):
        peft_model.generate(input_ids=turn, past_key_values=cache, **kw)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_trainer_with_the_no_weight_decay_mixin_decays_what_zoo_train_decays(lora, tmp_path):
    # transformers' Trainer exempts biases and names like "norm" only: it decayed A_log, D and norm_f
    from zoo.train import NoWeightDecayMixin, OptimConfig, param_groups

    model = tiny("jamba")
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["in_proj", "q_proj"]))
        for name, p in model.named_parameters():  # the frozen flagged ones too: the Trainer groups them by name
            p.requires_grad_(p.requires_grad or name.endswith(("A_log", ".D", "norm_f.weight")))

    class ZooTrainer(NoWeightDecayMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    trainer = ZooTrainer(model=model, args=args)
    trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    ours = {names[id(p)] for p in param_groups(model, OptimConfig(no_decay_1d=False))[0]["params"]}
    assert decayed and decayed == ours
    assert not any(n.endswith(("A_log", ".D")) or "norm_f" in n for n in decayed)
    plain = Trainer(model=model, args=args)  # without the mixin, as before
    plain.create_optimizer()
    decayed = {names[id(p)] for g in plain.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert any(n.endswith("A_log") for n in decayed) and any(n.endswith("norm_f.weight") for n in decayed)


def test_a_trainer_with_the_no_weight_decay_mixin_does_not_decay_a_transformers_mambas_a_log(tmp_path):
    # transformers' Mamba keeps A_log 2-D ([d_inner, d_state]) and flags nothing: the mixin, reading the flags alone,
    # left it decayed (mamba_ssm never decays it), where zoo train's param_groups exempts it by name
    from transformers import MambaConfig, MambaForCausalLM

    from zoo.train import NoWeightDecayMixin, OptimConfig, param_groups

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4))

    class ZooTrainer(NoWeightDecayMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = []
    for trainer in (Trainer(model=model, args=args), ZooTrainer(model=model, args=args)):
        trainer.create_optimizer()
        decayed.append({names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0
                        for p in g["params"]})
    ssm = {n for n in names.values() if n.rpartition(".")[2] in ("A_log", "D", "dt_bias")}
    assert any(n.endswith(".A_log") for n in ssm) and ssm <= decayed[0], "the Trainer's own rule decays A_log and D"
    # the Trainer's rule for the rest (biases, norms by name), less the names param_groups exempts
    assert decayed[1] == decayed[0] - ssm
    assert not ssm & {names[id(p)] for p in param_groups(model, OptimConfig(no_decay_1d=False))[0]["params"]}


def test_modules_to_save_copies_keep_the_no_weight_decay_flags(tmp_path):
    """PEFT's modules_to_save trains a deep copy of the module (ModulesToSaveWrapper), whose new Parameters lost
    zoo's _no_weight_decay flags: param_groups, build_optimizer and NoWeightDecayMixin decayed the trained norm_f
    and the copied mixer's A_log and D. The wrapper's original_module keeps the flags; the copies now count as
    flagged, and wrap_lora flags them."""
    from zoo.finetune import wrap_lora
    from zoo.train import NoWeightDecayMixin, OptimConfig, param_groups

    saved = ["norm_f", "layers.0.mixer"]
    model = get_peft_model(tiny("jamba"), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=saved))
    names = {id(p): n for n, p in model.named_parameters()}
    copies = [n for n in names.values() if ".modules_to_save." in n]
    assert any(n.endswith("norm_f.modules_to_save.default.weight") for n in copies)
    assert any(n.endswith("mixer.modules_to_save.default.A_log") for n in copies)
    decayed = {names[id(p)] for p in param_groups(model, OptimConfig(no_decay_1d=False))[0]["params"]}
    assert not any(n.endswith(("norm_f.modules_to_save.default.weight", ".A_log", ".D", "dt_proj.bias"))
                   for n in decayed), decayed
    assert any(n.endswith("mixer.modules_to_save.default.in_proj.weight") for n in decayed)  # still decayed

    class ZooTrainer(NoWeightDecayMixin, Trainer):
        pass

    trainer = ZooTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1,
                                                             report_to=[], use_cpu=True))
    trainer.create_optimizer()
    by_trainer = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert by_trainer == decayed

    wrapped = wrap_lora(tiny("jamba"), r=2, target_modules=["q_proj"], modules_to_save=saved, check_forward=False,
                        verbose=False)
    for name, p in wrapped.named_parameters():
        if name.endswith(("norm_f.modules_to_save.default.weight", "modules_to_save.default.A_log")):
            assert getattr(p, "_no_weight_decay", False), name


@pytest.mark.parametrize("returned", [1, 3], ids=["best", "all-beams"])
@pytest.mark.parametrize("name", TINY)
def test_generate_continues_the_cache_that_beam_search_returned(name, returned):
    """generate(num_beams=3, return_dict_in_generate=True) returned its cache in the order of the beams still running
    after the last step (as LlamaForCausalLM's does): continuing from it with the returned sequences failed with a
    row-count error (one sequence per prompt), or with a sequence per beam read another beam's states and keys (other
    tokens, no error). The returned cache now holds one row per returned sequence, that sequence less its last
    token, so generate continues it as it continues a greedy run's cache."""
    from zoo.cache import output_cache

    model = tiny(name).eval()
    prompt = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    beams = model.generate(prompt, num_beams=3, num_return_sequences=returned, return_dict_in_generate=True, **kw)
    cache = output_cache(beams)
    assert cache.batch_size == 2 * returned and cache.get_seq_length() == beams.sequences.shape[1] - 1
    continued = model.generate(beams.sequences, past_key_values=cache, output_logits=True,
                               return_dict_in_generate=True, **kw)
    with torch.no_grad():
        whole = model(continued.sequences, use_cache=False).logits[:, 11:-1]
    assert_close("continued logits", torch.stack(continued.logits, 1), whole, 1e-4)
    assert torch.equal(continued.sequences, model.generate(beams.sequences, **kw))


@pytest.mark.parametrize("name", ["mamba", "transformerpp", "jamba"])
def test_a_cache_passed_to_beam_search_continues_without_return_dict_in_generate(name):
    """A cache the caller passes (past_key_values) outlives the call; beam search without return_dict_in_generate
    left it in the order of the beams still running after the last step, not that of the returned sequences: a
    greedy continuation failed on the row count (naming batch_repeat_interleave, which would not help), and a
    second beam search, whose rows do match, read other beams' states and keys (other tokens, no error). It now
    holds the returned sequences' rows, each that sequence less its last token, as with return_dict_in_generate."""
    from zoo.cache import ZooCache

    model = tiny(name).eval()
    prompt = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cache = ZooCache.for_model(model)
    first = model.generate(prompt, past_key_values=cache, num_beams=3, **kw)
    assert torch.is_tensor(first) and first.shape == (2, 11)
    fresh = ZooCache.for_model(model)
    with torch.no_grad():
        model(first[:, :-1], past_key_values=fresh, use_cache=True)
    assert cache.batch_size == 2 and cache.get_seq_length() == 10
    for got, want in zip(cache.state_tensors(), fresh.state_tensors(), strict=True):
        assert_close("cached state", got, want, 1e-4)
    turn = torch.cat([first, torch.randint(1, 512, (2, 3), generator=torch.Generator().manual_seed(2))], 1)
    assert torch.equal(model.generate(turn, past_key_values=cache, **kw), model.generate(turn, **kw))


def test_a_beam_cache_without_a_row_for_a_returned_sequence_refuses_to_continue():
    """A returned beam that ended (eos) before beam search's last step has no row in the cache, whose rows moved on
    with the beams that ran to the end: continuing from it is refused, naming why, instead of reading another beam."""
    from zoo.cache import output_cache

    model = tiny("mamba").eval()
    prompt = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=3, num_return_sequences=3, return_dict_in_generate=True, max_new_tokens=6, do_sample=False,
              pad_token_id=0, length_penalty=0.0, early_stopping=False)
    eos = int(model.generate(prompt, **kw).sequences[0, 6])  # the best beam's first token: it ends there
    beams = model.generate(prompt, eos_token_id=eos, **kw)
    lengths = (beams.beam_indices >= 0).sum(1)
    assert lengths.min() == 1 and lengths.max() == 6
    with pytest.raises(ValueError, match="beam search"):
        model.generate(beams.sequences, past_key_values=output_cache(beams), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)


@pytest.mark.parametrize("assistant", ["mamba", "jamba"])
def test_an_assistant_model_with_recurrent_layers_is_refused_before_generating(assistant):
    """An assistant (draft) model with Mamba / GLA layers must roll its cache back past the drafted tokens that the
    main model rejects, which its states cannot: with an attention-only main model the refusal covered the main
    model alone, so generate ran until the first rejected draft and failed there in ZooCache.crop (or returned
    normally when every draft happened to be accepted). It is refused up front, naming assistant_model."""
    model = tiny("transformerpp").eval()
    draft = tiny(assistant).eval()
    prompt = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="assistant_model .* recurrent"):
        model.generate(prompt, assistant_model=draft, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt, assistant_model=tiny("transformerpp").eval(), max_new_tokens=4,
                                      do_sample=False), model.generate(prompt, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_a_beam_search_stopped_by_an_exception_leaves_its_cache_reordered(name):
    """Beam search with return_dict_in_generate holds each reorder of the cache back to the next forward
    (ZooCache.defer_reorders). A beam search that an exception ended between a step's reorder and the next forward
    (a KeyboardInterrupt there, a hook that raised) left that reorder pending in the cache: its states were still in
    the order of the step before, so they differed from those transformers leaves, and a batch_select_indices /
    batch_repeat_interleave applied before the pending reorder read other rows. Every reorder is now applied."""
    from zoo.cache import ZooCache

    class Stop(Exception):
        pass

    model = tiny(name).eval()
    prompt = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(1))
    calls = []

    def raise_at_the_fourth(module, args, kwargs):  # before the step's forward runs (a Ctrl-C there)
        calls.append(1)
        if len(calls) == 4:
            raise Stop

    states = {}
    handle = model.model.register_forward_pre_hook(raise_at_the_fourth, with_kwargs=True)
    try:
        for returned in (True, False):  # without return_dict_in_generate the reorders are not held back
            calls.clear()
            cache = ZooCache.for_model(model)
            with pytest.raises(Stop):
                model.generate(prompt, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               past_key_values=cache, return_dict_in_generate=returned)
            assert getattr(cache, "pending_rows", None) is None, "no reorder is left pending"
            states[returned] = [t.clone() for t in cache.state_tensors()]
    finally:
        handle.remove()
    assert len(states[True]) == len(states[False]) > 0
    assert any(not torch.equal(a, a[:1].expand_as(a)) for a in states[False]), "the beams' rows differ"
    for a, b in zip(states[True], states[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["LoHaConfig", "LoKrConfig", "AdaLoraConfig"])
def test_peft_methods_whose_targets_follow_loras_adapt_loras_defaults(method):
    """PEFT's LoHa, LoKr, AdaLoRA (and the other methods whose target tables it copied from LoRA's) failed on a zoo
    model without target_modules ("Please specify target_modules"): only LoRA's table named the zoo's projections.
    They adapt the modules LoRA does, and train."""
    import peft

    def adapted(config):
        model = get_peft_model(tiny("jamba"), config)
        return model, {name for name, module in model.named_modules() if hasattr(module, "base_layer")}

    kwargs = {"total_step": 10} if method == "AdaLoraConfig" else {}
    model, names = adapted(getattr(peft, method)(task_type="CAUSAL_LM", **kwargs))
    assert names and names == adapted(peft.LoraConfig(task_type="CAUSAL_LM"))[1]
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


# what PEFT's (IA)^3 and LN tuning defaults adapt in each tiny model: (IA)^3's modules (those scaled on their input
# marked "ff"), LN tuning's norms, by the last part of their names
IA3_AND_LN_DEFAULTS = {
    "mamba": ({"in_proj", "out_proj ff"}, {"norm", "norm_f"}),
    "mamba2": ({"in_proj", "out_proj ff"}, {"norm", "norm_f"}),  # (norm: each block's and each mixer's gated one)
    "transformerpp": ({"k_proj", "v_proj", "down_proj ff"}, {"norm", "ffn_norm", "norm_f"}),
    "gla": ({"k_proj", "v_proj", "down_proj ff"}, {"norm", "ffn_norm", "norm_f", "g_norm"}),
    "jamba": ({"k_proj", "v_proj", "in_proj", "out_proj ff", "down_proj ff"}, {"norm", "ffn_norm", "norm_f"}),
}


@pytest.mark.parametrize("method", ["IA3Config", "LNTuningConfig"])
@pytest.mark.parametrize("name", TINY)
def test_ia3_and_ln_tuning_without_target_modules_adapt_a_zoo_model_train_save_and_reload(tmp_path, name, method):
    # PEFT's (IA)^3 and LN tuning keep default targets of their own, by model_type, which had none for "zoo":
    # IA3Config() and LNTuningConfig() failed on every zoo model ("Please specify `target_modules` in `peft_config`"),
    # where on a llama they adapt its keys, values and FFN, or its norms
    import peft
    from peft import PeftModel

    from zoo.finetune import check_lora_reached

    model = get_peft_model(tiny(name), getattr(peft, method)(task_type="CAUSAL_LM"))
    adapted = {n: m for n, m in model.named_modules() if hasattr(m, "base_layer")}
    expected = IA3_AND_LN_DEFAULTS[name][method == "LNTuningConfig"]
    assert {n.split(".")[-1] + (" ff" if getattr(m, "is_feedforward", False) else "") for n, m in adapted.items()} \
        == expected
    if name == "mamba2" and method == "LNTuningConfig":
        assert any(n.endswith("mixer.norm") for n in adapted)
    check_lora_reached(model)  # every adapted module runs: training forward, prefill and a decode step
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
    with torch.no_grad():  # an adapter that changes the model, so that its reload is seen
        for p in trained:
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert not torch.allclose(logits, tiny(name)(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny(name), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)


def test_ln_tuning_without_target_modules_tunes_jambas_inner_norms_too():
    # LN tuning's default targets named each block's, the final and the gated output norms, not the RMSNorms a Mamba
    # mixer with Jamba's inner_norms (a zoo convert of a transformers Jamba) puts on dt, B and C: LNTuningConfig()
    # left those three frozen, where the README says it tunes every norm, as on a llama
    import peft

    from zoo.layers import GatedRMSNorm, RMSNorm

    mamba = ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml").mixers["M"]
    config = ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml", mixers={"M": {**mamba, "inner_norms": True}})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    norms = {n for n, m in base.named_modules() if isinstance(m, (RMSNorm, GatedRMSNorm))}
    assert {n.split(".")[-1] for n in norms} == {"norm", "norm_f", "dt_layernorm", "b_layernorm", "c_layernorm"}
    model = get_peft_model(base, peft.LNTuningConfig(task_type="CAUSAL_LM"))
    assert {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "base_layer")} \
        == norms
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    inner = [p for n, p in model.named_parameters() if p.requires_grad and "dt_layernorm" in n]
    assert inner and all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner)


@pytest.mark.parametrize("table", ["TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
                                   "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
                                   "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING"])
def test_registering_the_peft_defaults_survives_a_peft_without_an_ia3_or_ln_tuning_table(monkeypatch, table):
    # `import zoo` looked the (IA)^3 and LN-tuning tables up by attribute: a PEFT release without one of them (peft is
    # not capped above) failed every `import zoo` with an AttributeError, for a default only those methods use
    import peft.utils.constants as peft_constants

    import zoo

    monkeypatch.delattr(peft_constants, table)
    zoo._register_peft_default_targets()
    assert peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["zoo"]
