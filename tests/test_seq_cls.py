"""ZooForSequenceClassification: a `score` head at each row's last non-pad token, transformers' losses, loading a
causal LM's checkpoint, PEFT LoRA with task_type SEQ_CLS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import zoo
from zoo import ZooConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
TINY = ["mamba", "mamba2", "transformerpp", "gla", "jamba"]
PAD = 0


def classifier(name: str, **overrides) -> zoo.ZooForSequenceClassification:
    torch.manual_seed(0)
    cfg = ZooConfig.from_yaml(CONFIGS / f"{name}-tiny.yaml")
    for key, value in {"num_labels": 3, "pad_token_id": PAD, **overrides}.items():
        setattr(cfg, key, value)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of several lengths padded with PAD on `side`, and their attention_mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, at], mask[i, at] = r, 1
    return ids, mask


@pytest.mark.parametrize("name", TINY)
def test_auto_class_builds_it_and_logits_are_one_row_of_num_labels_per_input_row(name):
    model = classifier(name)
    assert type(model) is zoo.ZooForSequenceClassification
    out = model(torch.randint(1, 512, (4, 11)))
    assert out.logits.shape == (4, 3)
    assert out.loss is None


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", TINY)
def test_each_padded_row_is_read_at_its_last_token_as_the_backbone_reads_it_alone(name, side):
    model = classifier(name)
    rows = [torch.randint(1, 512, (n,)) for n in (13, 6, 9)]
    ids, mask = padded(rows, side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model.score(model.model(row[None]).last_hidden_state[:, -1])
            assert_close(f"{name} {side} row {i}", logits[i : i + 1], alone, 1e-4)
            # and not any other position of the padded row
            other = model.score(model.model(row[None, :-1]).last_hidden_state[:, -1])
            assert (logits[i] - other[0]).abs().max() > 1e-3


def test_inputs_embeds_are_read_at_the_last_position_the_attention_mask_marks():
    model = classifier("mamba")
    ids, mask = padded([torch.randint(1, 512, (n,)) for n in (10, 4)], "right")
    with torch.no_grad():
        by_ids = model(ids, attention_mask=mask).logits
        by_embeds = model(inputs_embeds=model.model.embeddings(ids), attention_mask=mask).logits
    assert_close("inputs_embeds", by_embeds, by_ids, 1e-6)


def test_without_a_pad_token_id_only_one_row_is_taken():
    model = classifier("mamba", pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        model(torch.randint(1, 512, (2, 7)))
    row = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        expected = model.score(model.model(row).last_hidden_state[:, -1])
        assert_close("one row", model(row).logits, expected, 1e-6)


@pytest.mark.parametrize("problem", ["regression", "single_label_classification", "multi_label_classification"])
def test_the_loss_follows_problem_type_as_transformers_does(problem):
    num_labels = 1 if problem == "regression" else 3
    model = classifier("gla", num_labels=num_labels)
    assert model.config.problem_type is None  # inferred from num_labels and the labels' dtype
    ids = torch.randint(1, 512, (4, 8))
    if problem == "regression":
        labels = torch.randn(4)
    elif problem == "single_label_classification":
        labels = torch.tensor([0, 2, 1, 2])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    out = model(ids, labels=labels)
    assert model.config.problem_type == problem
    if problem == "regression":
        expected = F.mse_loss(out.logits.squeeze(-1), labels)
    elif problem == "single_label_classification":
        expected = F.cross_entropy(out.logits, labels)
    else:
        expected = F.binary_cross_entropy_with_logits(out.logits, labels)
    assert_close(problem, out.loss, expected, 1e-6)
    out.loss.backward()
    assert model.score.weight.grad is not None and model.model.embeddings.weight.grad is not None


@pytest.mark.parametrize("name", ["jamba", "mamba2"])
def test_a_causal_lms_folder_loads_its_backbone_and_a_new_score(name, tmp_path):
    torch.manual_seed(0)
    cfg = ZooConfig.from_yaml(CONFIGS / f"{name}-tiny.yaml")
    cfg.tie_embeddings = False  # the checkpoint then holds an lm_head of its own, which the classifier leaves out
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.save_pretrained(tmp_path)
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4, pad_token_id=PAD,
                                                                     output_loading_info=True)
    assert type(model) is zoo.ZooForSequenceClassification and model.score.out_features == 4
    assert info["missing_keys"] == {"score.weight"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    for key, value in lm.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key
    assert getattr(model.model.layers[0].norm.weight, "_no_weight_decay", False)
    assert model.score.weight.std() > 0  # initialised, not left empty
    model.eval()
    assert torch.isfinite(model(torch.randint(1, 512, (2, 9))).logits).all()


@pytest.mark.parametrize("name", TINY)
def test_save_and_load_give_equal_logits(name, tmp_path):
    model = classifier(name)
    ids, mask = padded([torch.randint(1, 512, (n,)) for n in (12, 5)], "left")
    logits = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    assert loaded.config.num_labels == 3 and loaded.config.pad_token_id == PAD
    assert torch.equal(loaded(ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("name", TINY)
def test_peft_lora_seq_cls_trains_the_adapters_and_the_score(name):
    from peft import LoraConfig, get_peft_model

    model = classifier(name, num_labels=2)
    score = model.score.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any("modules_to_save" in n and "score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable), sorted(trainable)
    ids, mask = padded([torch.randint(1, 512, (n,)) for n in (10, 7, 12, 5)], "right")
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.score.original_module.weight, score)  # PEFT trains its copy of the head


def test_the_trainer_divides_the_loss_for_gradient_accumulation(tmp_path):
    # the loss is each micro-batch's mean: it takes no num_items_in_batch, so the Trainer must divide it itself; a
    # forward with **kwargs alone would have told the Trainer that the model scales it
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert Trainer(model=classifier("mamba"), args=args).model_accepts_loss_kwargs is False
