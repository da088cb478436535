"""The Hugging Face model: Auto classes, save/load, loss, generate (greedy, sampling, beams), padding."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import PositionwiseMixer, assert_close
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import zoo
from zoo import ZooCache, ZooConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
TINY = ["mamba", "mamba2", "transformerpp", "gla", "jamba"]


def tiny(name: str) -> zoo.ZooForCausalLM:
    torch.manual_seed(0)
    cfg = ZooConfig.from_yaml(CONFIGS / f"{name}-tiny.yaml")
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_builds_small_model(name):
    model = tiny(name)
    assert isinstance(model, zoo.ZooForCausalLM)
    n = sum(p.numel() for p in model.parameters())
    assert n < 2_000_000, f"{name}-tiny has {n} parameters"


@pytest.mark.parametrize("name", TINY)
def test_save_and_load_identical_logits(name, tmp_path):
    model = tiny(name)
    ids = torch.randint(0, 512, (2, 17))
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "zoo"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, logits)
    assert getattr(loaded.model.layers[0].norm.weight, "_no_weight_decay", False)



@pytest.mark.parametrize("auto", [AutoModelForCausalLM, AutoModel], ids=["causal-lm", "base"])
def test_output_loading_info_returns_the_model_and_what_loading_found(auto, tmp_path):
    # from_pretrained(..., output_loading_info=True) returns (model, info) in transformers; zoo's override marked
    # no-weight-decay parameters on what it got back and failed with "'tuple' object has no attribute ..."
    model = tiny("mamba")
    model.save_pretrained(tmp_path)
    loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is (zoo.ZooModel if auto is AutoModel else zoo.ZooForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base = loaded if auto is AutoModel else loaded.model
    assert getattr(base.layers[0].norm.weight, "_no_weight_decay", False)
    assert torch.equal(base.layers[0].mixer.A_log, model.model.layers[0].mixer.A_log)

@pytest.mark.parametrize("name", TINY)
def test_greedy_generate_equals_argmax_of_full_forwards(name):
    model = tiny(name)
    prompt = torch.randint(0, 512, (2, 6))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("name", TINY)
def test_left_padded_batch_generates_like_each_row(name):
    model = tiny(name)
    a, b = torch.randint(1, 512, (1, 7)), torch.randint(1, 512, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, alone in ((0, a), (1, b)):
        single = model.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
        assert torch.equal(out[row, -5:], single[0, -5:]), f"row {row} differs from its generation alone"


@pytest.mark.parametrize("name", TINY)
def test_left_padding_longer_than_a_chunk_decodes_each_row_as_alone_whatever_the_decoding(name):
    """Padding longer than the Mamba-2 / GLA chunk (16 in the tiny configs) and Mamba's conv window, through the ways
    generate runs a prompt: the default cache (each step's logits too), no cache, a chunked prefill, beams returning
    several sequences."""
    model = tiny(name)
    rows = [torch.randint(1, 512, (1, n), generator=torch.Generator().manual_seed(n)) for n in (20, 3)]
    batch = torch.cat([F.pad(row, (20 - row.shape[1], 0), value=7) for row in rows])
    mask = (batch != 7).long()
    mask[0] = 1
    kw = dict(max_new_tokens=4, pad_token_id=7, return_dict_in_generate=True, output_logits=True)
    out = model.generate(batch, attention_mask=mask, do_sample=False, **kw)
    for i, row in enumerate(rows):
        alone = model.generate(row, do_sample=False, **kw)
        assert torch.equal(out.sequences[i, -4:], alone.sequences[0, -4:]), f"row {i}"
        for step, (logits, logits_alone) in enumerate(zip(out.logits, alone.logits)):
            assert_close(f"row {i} step {step}", logits[i], logits_alone[0], 1e-5)
    for settings in ({"use_cache": False}, {"prefill_chunk_size": 6}, {"num_beams": 2, "num_return_sequences": 2}):
        kw = dict(max_new_tokens=4, pad_token_id=7, do_sample=False, **settings)
        got = model.generate(batch, attention_mask=mask, **kw)[:, -4:]
        alone = torch.cat([model.generate(row, **kw)[:, -4:] for row in rows])
        assert torch.equal(got, alone), settings


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_right_padded_prompt_warns(cuda_graph):
    """A row whose attention_mask ends in padding (a tokenizer padding on the right) gets its first new token from
    the logits at a pad and its new tokens after the pads: other tokens than the row alone. transformers warns only
    when it knows a pad_token_id and finds it in the last column (a zoo config sets none): with the mask alone it
    decoded those tokens silently, through the static decode too. The mask's last column is read: it now warns."""
    from zoo.decode import static_generate

    model = tiny("mamba")
    a, b = torch.randint(1, 512, (1, 7)), torch.randint(1, 512, (1, 4))
    batch = torch.cat([a, torch.cat([b, torch.full((1, 3), 5)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 4:] = 0
    generate = partial(static_generate, model, graph=False) if cuda_graph else model.generate
    with pytest.warns(UserWarning, match=r"right padding.*row\(s\) \[1\].*padding_side = 'left'"):
        out = generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert not torch.equal(out[1, -3:], model.generate(b, max_new_tokens=3, do_sample=False)[0, -3:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(batch.flip(1), attention_mask=mask.flip(1), max_new_tokens=3, do_sample=False)  # left padding


@pytest.mark.parametrize("name", ["jamba", "mamba2", "gla"])
def test_beam_search_and_sampling_run(name):
    model = tiny(name)
    prompt = torch.randint(0, 512, (2, 5))
    mask = torch.ones_like(prompt)
    beams = model.generate(prompt, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                           pad_token_id=0)
    assert beams.shape == (2, 11)
    one_beam = model.generate(prompt, attention_mask=mask, max_new_tokens=6, num_beams=1, do_sample=False,
                              pad_token_id=0)
    greedy = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(one_beam, greedy)
    sampled = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20,
                             pad_token_id=0)
    assert sampled.shape == (2, 11)


def test_beam_search_scores_match_full_forward():
    """Beam reordering must keep each beam's cache: the returned sequence scores equal recomputed ones."""
    model = tiny("jamba")
    prompt = torch.randint(0, 512, (1, 5))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, num_beams=4,
                         do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         length_penalty=0.0, num_return_sequences=4, early_stopping=True)
    with torch.no_grad():
        logp = model(out.sequences, use_cache=False).logits.log_softmax(-1)
    gen = out.sequences[:, 5:]
    recomputed = logp[:, 4:-1].gather(-1, gen[..., None]).squeeze(-1).sum(-1)
    assert_close("beam scores", out.sequences_scores, recomputed, 1e-4)


def test_get_seq_length_tracks_tokens():
    model = tiny("mamba")
    cache = ZooCache.for_model(model)
    model(torch.randint(0, 512, (1, 7)), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 7
    model(torch.randint(0, 512, (1, 1)), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("name", TINY)
def test_a_reset_cache_takes_a_new_sequence_of_any_batch_size(name):
    """ZooCache.reset() then a new prompt: the recurrent layers kept their zeroed states (transformers' reset zeroes in
    place), so the reset cache refused a batch of another size, naming batch_repeat_interleave; an attention layer
    kept the old packed prompt's document ids and failed with a broadcast error."""
    model = tiny(name)
    cache = ZooCache.for_model(model)
    old, new, step = torch.randint(1, 512, (2, 9)), torch.randint(1, 512, (3, 5)), torch.randint(1, 512, (3, 1))
    with torch.no_grad():
        model(old, position_ids=torch.cat([torch.arange(4), torch.arange(5)])[None].expand(2, -1),
              past_key_values=cache, use_cache=True)
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.batch_size is None
        out = torch.cat([model(new, past_key_values=cache, use_cache=True).logits,
                         model(step, past_key_values=cache, use_cache=True).logits], 1)
        ref = model(torch.cat([new, step], 1), use_cache=False).logits
    assert_close("logits after reset", out, ref, 1e-5)


def test_labels_give_loss_with_moe_aux():
    model = tiny("jamba").train()
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ce + 1e-3 * out.aux_loss, atol=1e-5)
    out.loss.backward()
    assert model.model.layers[1].ffn.router.weight.grad is not None


def test_moe_aux_loss_takes_router_logits_of_layers_on_different_devices():
    """Under a device_map that splits the layers, each MoE layer's router logits are on its own device: the aux loss
    mixed them (and the mask, moved to the first layer's device) and raised "Tensor on device ... is not on the
    expected device", so every forward but generate's failed; transformers' load_balancing_loss_func moves each
    layer's logits to the first's. (CPU only here: the first layer's logits on meta stand for another device.)"""
    from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

    from zoo.layers import load_balancing_loss

    logits = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    split = load_balancing_loss([logits[0].to("meta"), *logits[1:]], 4, 2, mask)
    assert split.device.type == "meta" and split.shape == ()
    ref = load_balancing_loss_func(tuple(logits), 4, 2, mask)
    torch.testing.assert_close(load_balancing_loss(logits, 4, 2, mask), ref)


def test_eval_loss_of_a_moe_model_is_the_cross_entropy_alone():
    """The load-balancing loss was added in eval mode too, so zoo train's eval/loss, eval/ppl and bits_per_byte and
    the Trainer's eval_loss of a MoE model were CE + aux_loss_coef * aux, not the held-out cross-entropy."""
    model = tiny("jamba").eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0  # still reported
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    with torch.no_grad():
        trained = model.train()(ids, labels=ids)
    torch.testing.assert_close(trained.loss, ce + 1e-3 * trained.aux_loss)


def test_a_moe_expert_no_token_chose_still_gets_a_gradient_so_ddp_can_train(tmp_path):
    """An expert that no token of the batch chose got no gradient (.grad None), so a MoE model under DDP (zoo train on
    several GPUs, accelerate, the Trainer with gradient checkpointing) failed at its second step: "Expected to have
    finished reduction in the prior iteration ... parameters that were not used in producing loss"."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from zoo.layers import MoE, load_balancing_loss

    torch.manual_seed(0)
    moe = MoE(8, 16, n_experts=4, top_k=1)
    with torch.no_grad():  # every token of a positive input goes to expert 0
        moe.router.weight.zero_()
        moe.router.weight[0].fill_(1.0)
    x = torch.rand(2, 3, 8) + 0.1
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(moe)
        for _ in range(2):
            out, logits = model(x)
            (out.square().sum() + load_balancing_loss([logits], 4, 1)).backward()
    finally:
        dist.destroy_process_group()
    for e in (1, 2, 3):
        assert all(p.grad is not None and not p.grad.any() for p in moe.experts[e].parameters())
    assert moe.experts[0].down_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # inference still skips the experts that no token chose
        assert torch.equal(moe(x)[0], out)


def _moe_per_expert_nonzero(moe, x):
    """MoE.forward's dispatch before it grouped the choices with one sort: a `(chosen == e).nonzero()` (a host sync
    on CUDA) per expert. The reference the grouped dispatch must match bit for bit."""
    shape = x.shape
    logits = moe.router(x).float().reshape(-1, moe.n_experts)
    x = x.reshape(-1, shape[-1])
    weights, chosen = logits.softmax(-1).topk(moe.top_k, dim=-1)
    if moe.normalize_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        if not (token.numel() or torch.is_grad_enabled()):
            continue
        out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
    return out.reshape(shape), logits


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("grad", [False, True])
def test_moe_dispatch_by_one_sort_matches_the_per_expert_nonzero_bit_for_bit(top_k, grad):
    """MoE.forward groups every expert's (token, slot) pairs with one stable sort and one count (one host sync per
    layer; eager decoding on CUDA waited once per expert): the same pairs in the same order as the per-expert
    nonzero, so the same sums in the same order: equal outputs, router logits and gradients, decode (1 token) and
    longer inputs, with experts that no token chose."""
    from zoo.layers import MoE

    torch.manual_seed(0)
    moe = MoE(8, 16, n_experts=6, top_k=top_k, normalize_topk=top_k > 1)
    for shape in [(1, 1, 8), (3, 1, 8), (2, 7, 8), (4, 33, 8)]:
        x = torch.randn(shape, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out, logits = moe(x)
            ref, ref_logits = _moe_per_expert_nonzero(moe, x)
        assert torch.equal(out, ref) and torch.equal(logits, ref_logits)
        if grad:
            got = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()], allow_unused=True)
            want = torch.autograd.grad(ref.square().sum(), [x, *moe.parameters()], allow_unused=True)
            assert all((g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want))


def test_top_1_routing_with_renormalized_weights_warns_that_the_router_learns_only_from_the_aux_loss():
    """With top_k 1 and normalize_topk (the default) the chosen expert's weight is p / p = 1: the router got no
    gradient from the language-model loss, only from the aux loss, and nothing said so."""
    import warnings

    from zoo.layers import MoE

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match="moe.normalize_topk: with top_k 1"):
        moe = MoE(8, 16, n_experts=4, top_k=1)
    moe(x)[0].square().sum().backward()
    assert moe.router.weight.grad.abs().max() < 1e-6  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        switch = MoE(8, 16, n_experts=4, top_k=1, normalize_topk=False)
        MoE(8, 16, n_experts=4, top_k=2)
    switch(x)[0].square().sum().backward()
    assert switch.router.weight.grad.abs().max() > 1e-3


def test_num_hidden_layers_follows_layers_set_after_the_config_was_made():
    """cfg.layers = ... then from_config built the new layers while config.num_hidden_layers (what transformers,
    PEFT and probing scripts read) kept the old count."""
    config = ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml")
    config.layers = "MA"
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.num_hidden_layers == len(model.model.layers) == 2
    ids = torch.randint(0, 512, (1, 5))
    assert len(model(ids, output_hidden_states=True).hidden_states) == model.config.num_hidden_layers + 1


def test_output_hidden_states():
    model = tiny("transformerpp")
    out = model(torch.randint(0, 512, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == len(model.model.layers) + 1


@pytest.mark.parametrize("name", ["jamba", "mamba2"])
def test_gradient_checkpointing_same_gradients(name):
    model = tiny(name).train()
    ids = torch.randint(0, 512, (2, 12))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in ref:
            assert_close(n, p.grad, ref[n], 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_packed_rows_equal_separate_documents(name):
    model = tiny(name)
    a, b = torch.randint(0, 512, (1, 6)), torch.randint(0, 512, (1, 9))
    seq_idx = torch.tensor([[0] * 6 + [1] * 9])
    position_ids = torch.cat([torch.arange(6), torch.arange(9)])[None]
    packed = model(torch.cat([a, b], 1), seq_idx=seq_idx, position_ids=position_ids, use_cache=False).logits
    assert_close("doc a", packed[:, :6], model(a, use_cache=False).logits, 1e-5)
    assert_close("doc b", packed[:, 6:], model(b, use_cache=False).logits, 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_rows_packed_by_position_ids_alone_with_one_token_documents(name):
    """Documents packed by position_ids alone (transformers' DataCollatorWithFlattening): a one-token document is a
    restart at 0 right after another 0, not a decrease. Each document's logits are its own, the one-token ones
    included."""
    model = tiny(name)
    docs = [torch.randint(0, 512, (1, n)) for n in (1, 1, 5, 1, 4)]
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
    assert_close("packed by position_ids", packed, alone, 1e-5)


@pytest.mark.parametrize("name,target,tol", [("mamba", 130e6, 0.03), ("transformerpp", 125e6, 0.03),
                                             ("mamba", 370e6, 0.03), ("transformerpp", 350e6, 0.05)])
def test_paper_sizes(name, target, tol):
    size = "130m" if target < 200e6 else "370m"
    cfg = ZooConfig.from_yaml(CONFIGS / f"{name}-{size}.yaml")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - target) / target < tol, f"{name}-{size}: {n / 1e6:.1f}M parameters"


@pytest.mark.parametrize("keep_fp32", [True, False])
def test_residual_in_fp32_keeps_the_stream_in_fp32_for_bf16_weights(keep_fp32):
    config = ZooConfig.from_yaml(CONFIGS / "jamba-tiny.yaml")
    config.residual_in_fp32 = keep_fp32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
        dtypes = []
        hooks = [block.register_forward_hook(lambda m, i, o: dtypes.append(o[0].dtype)) for block in model.model.layers]
        bf16 = model.to(torch.bfloat16)(input_ids=ids).logits
        for h in hooks:
            h.remove()
    assert set(dtypes) == {torch.float32 if keep_fp32 else torch.bfloat16}
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert (bf16.float() - fp32).abs().max() < 0.1 * fp32.abs().max()  # the same model, in bf16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_on_cuda_equals_the_cpu_formula(dtype):
    from zoo.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(768)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (torch.randn(4, 300, 768) * 3).to(dtype)
    gy = torch.randn(4, 300, 768).to(dtype)
    outs = {}
    for device in ("cpu", "cuda"):
        n = norm.to(device).to(dtype)
        xi = x.detach().clone().to(device).requires_grad_(True)  # a leaf on each device (x.to("cpu") is x itself)
        y = n(xi)
        y.backward(gy.to(device))
        outs[device] = (y.float().cpu(), xi.grad.float().cpu(), n.weight.grad.float().cpu())
        n.weight.grad = None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for what, a, b in zip(("y", "dx", "dweight"), outs["cuda"], outs["cpu"]):
        assert_close(f"rmsnorm {what} {dtype}", a, b, tol)


def test_outputs_keep_the_cache_under_the_installed_transformers_field():
    """transformers 5.2x renamed the outputs' `past_key_values` to `cache` (the old name warns, and goes in 5.40):
    zoo outputs fill the field the installed class has, and zoo.cache.output_cache reads it."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from zoo.cache import output_cache

    model = tiny("mamba")
    out = model(input_ids=torch.randint(0, 64, (1, 5)), use_cache=True)
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    assert isinstance(out[field], ZooCache) and output_cache(out) is out[field]
    assert output_cache(model(input_ids=torch.randint(0, 64, (1, 5)), use_cache=False)) is None


def test_the_cache_comes_back_under_the_name_the_forward_takes_it_by():
    """ZooForCausalLM.forward names `cache` beside past_key_values, so zoo.decode.cache_argument says 'cache' on every
    transformers: on one from before the outputs' rename (5.17, whose MoeCausalLMOutputWithPast has past_key_values)
    output_cache(out, 'cache') read None, and zoo's prefill (generate's static path, zoo eval, passkey) failed with
    "'NoneType' object has no attribute 'to_static'". An output class of either era gives its cache back."""
    from transformers.utils import ModelOutput

    from zoo.cache import output_cache
    from zoo.decode import cache_argument, prefill

    @dataclasses.dataclass
    class Old(ModelOutput):  # an output class from before transformers renamed the field
        logits: torch.Tensor | None = None
        past_key_values: object = None

    cache = ZooCache.for_model(tiny("mamba"))
    assert output_cache(Old(logits=torch.zeros(1), past_key_values=cache), "cache") is cache
    model = tiny("mamba")
    arg = cache_argument(model)
    out = model(input_ids=torch.randint(0, 64, (1, 5)), use_cache=True, **{arg: None})
    assert isinstance(output_cache(out, arg), ZooCache)
    assert isinstance(prefill(model, torch.randint(0, 64, (1, 5))).cache, ZooCache)


# ---- transformers' API details: crop, assisted decoding, tuples, config defaults, checkpointing options ----------

def test_crop_rolls_back_the_keys_and_the_positions():
    model = tiny("transformerpp")
    ids = torch.randint(0, 512, (1, 9))
    nxt = torch.randint(0, 512, (1, 1))
    with torch.no_grad():
        reference = model(torch.cat([ids[:, :6], nxt], 1), use_cache=False).logits[:, -1]
        for crop in (-3, 6):  # transformers' forms: tokens to remove, and the length to keep
            cache = zoo.cache.output_cache(model(ids, use_cache=True))
            cache.crop(crop)
            assert cache.get_seq_length() == 6
            assert_close("logits after crop", model(nxt, past_key_values=cache, use_cache=True).logits[:, -1],
                         reference, 1e-5)
        # crop(0) keeps nothing, as transformers' DynamicCache.crop(0) does (it removed nothing)
        cache = zoo.cache.output_cache(model(ids, use_cache=True))
        cache.crop(0)
        assert cache.get_seq_length() == 0
        assert_close("logits after crop(0)", model(nxt, past_key_values=cache, use_cache=True).logits[:, -1],
                     model(nxt, use_cache=False).logits[:, -1], 1e-5)


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_crop_and_assisted_decoding_are_refused_with_recurrent_layers(name):
    model = tiny(name)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        cache = zoo.cache.output_cache(model(ids, use_cache=True))
    cache.crop(9)  # the length it holds: nothing to remove
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens .assisted decoding."):
        model.generate(torch.cat([ids, ids], 1), prompt_lookup_num_tokens=3, max_new_tokens=4)
    # transformers 5 fetches contrastive search from the Hub (offline: an error about trust_remote_code)
    with pytest.raises(ValueError, match=r"penalty_alpha \(contrastive search\) rolls the cache back"):
        model.generate(ids, penalty_alpha=0.6, top_k=4, max_new_tokens=4)


@pytest.mark.parametrize("kwargs", [dict(do_sample=True, top_k=4), dict(num_beams=2, top_k=4), dict(top_k=1),
                                    dict(top_k=None)])
def test_a_penalty_alpha_beside_another_search_is_not_refused(kwargs):
    """transformers runs contrastive search only for penalty_alpha > 0 with greedy decoding and top_k > 1; beside
    sampling, beams or top_k 1 or None it samples / searches as asked, so a recurrent model generates as before."""
    model, ids = tiny("mamba"), torch.randint(0, 512, (1, 6))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=3, penalty_alpha=0.6, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, **kwargs))


@pytest.mark.parametrize("where", ["model", "kwarg"])
def test_prompt_lookup_or_a_recurrent_assistant_beside_beams_is_not_refused(where):
    """transformers runs assisted decoding only from greedy decoding or sampling: beside beams it warns and runs
    beam search, ignoring prompt_lookup_num_tokens or the assistant_model (a checkpoint's generation_config may hold
    the first). zoo refused them on a recurrent model, or a recurrent assistant, as if they were used."""
    x = torch.randint(0, 512, (1, 6))
    ids = torch.cat([x, x], 1)
    beams = dict(num_beams=2, max_new_tokens=4, do_sample=False)
    model = tiny("mamba")
    reference = model.generate(ids, **beams)
    if where == "model":
        model.generation_config.prompt_lookup_num_tokens = 3
        assert torch.equal(model.generate(ids, **beams), reference)
    else:
        assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **beams), reference)
    main = tiny("transformerpp")
    assert torch.equal(main.generate(ids, assistant_model=tiny("mamba"), **beams), main.generate(ids, **beams))


# the places transformers' generate merges its settings from (`_prepare_generation_config`): the model's
# generation_config (beside a passed one that leaves them unset), a generation_config passed by keyword or
# positionally, and keyword arguments over both
PLACES = ["model", "given", "positional", "kwarg"]


def _generate_with(model, where: str, settings: dict, prompt=None, generation=None, **inputs):
    """model.generate with generation `settings` held in place `where`; `generation` (other settings) goes with them
    into the generation_config passed, or into the keyword arguments; `inputs` (model inputs) go by keyword."""
    from transformers import GenerationConfig

    generation = generation or {}
    if where == "model":
        for name, value in settings.items():
            setattr(model.generation_config, name, value)
        return model.generate(prompt, generation_config=GenerationConfig(**generation), **inputs)
    if where == "given":
        return model.generate(prompt, generation_config=GenerationConfig(**settings, **generation), **inputs)
    if where == "positional":
        return model.generate(prompt, GenerationConfig(**settings, **generation), **inputs)
    return model.generate(prompt, **settings, **generation, **inputs)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("settings", [dict(prompt_lookup_num_tokens=3), dict(assistant_early_exit=1),
                                      dict(penalty_alpha=0.6, top_k=4)], ids=lambda s: next(iter(s)))
def test_assisted_decoding_and_contrastive_search_are_refused_wherever_generate_reads_them(where, settings):
    """The refusal read the generation_config passed, or else the model's: a setting held by the model's
    generation_config beside a passed one (or a generation_config passed positionally) got past it, and generate
    failed later with transformers' "Assisted decoding requires a cache that can be cropped", the layer count of an
    early exit, or a Hub fetch of contrastive search."""
    model = tiny("mamba")
    x = torch.randint(0, 512, (1, 9))
    name = next(iter(settings))
    with pytest.raises(ValueError, match=rf"generate: {name} \((assisted decoding|contrastive search)\)"):
        _generate_with(model, where, settings, torch.cat([x, x], 1), dict(max_new_tokens=4))


@pytest.mark.parametrize("where", ["model", "given", "positional"])
def test_a_penalty_alpha_beside_sampling_from_the_models_generation_config_is_not_refused(where):
    """generate samples where the model's generation_config says do_sample and a passed one leaves it unset
    (penalty_alpha then means no contrastive search): the check read the passed one alone and refused it."""
    model, ids = tiny("mamba"), torch.randint(0, 512, (1, 6))
    model.generation_config.do_sample = True
    torch.manual_seed(0)
    out = _generate_with(model, where, dict(penalty_alpha=0.6), ids, dict(top_k=4, max_new_tokens=3))
    torch.manual_seed(0)
    assert torch.equal(out, _generate_with(model, where, {}, ids, dict(top_k=4, max_new_tokens=3)))


@pytest.mark.parametrize("where", PLACES)
def test_prefill_chunks_of_inputs_embeds_are_refused_wherever_generate_reads_prefill_chunk_size(where):
    """prefill_chunk_size held by the model's generation_config beside a passed one, or in one passed positionally,
    got past the refusal, and the chunked prefill failed inside on a position_ids shape."""
    model = tiny("transformerpp")
    ids = torch.randint(1, 512, (2, 7))
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="prefill_chunk_size=3 with inputs_embeds.*generate from input_ids"):
        _generate_with(model, where, dict(prefill_chunk_size=3), None, dict(max_new_tokens=3, do_sample=False),
                       inputs_embeds=embeds, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("name", ["mamba2", "jamba"])
def test_prefill_chunks_of_a_prompt_packed_by_position_ids_wherever_generate_reads_prefill_chunk_size(name, where):
    """The packed prompt's documents were given to the chunks as seq_idx only where prefill_chunk_size was in the
    generation_config passed by keyword, or the model's with none passed: held by the model's beside a passed one,
    or in one passed positionally, a chunk of one token continued the document before it (wrong logits, no error)
    and one of several was refused naming seq_idx."""
    model = tiny(name)
    a, b = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 4))
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    generation = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    alone = model.generate(b, **generation)
    for chunk in (1, 3):
        packed = _generate_with(model, where, dict(prefill_chunk_size=chunk), torch.cat([a, b], 1), generation,
                                position_ids=position_ids)
        assert_close(f"logits, prefill chunks of {chunk} ({where})", torch.stack(packed.logits),
                     torch.stack(alone.logits), 1e-5)


@pytest.mark.parametrize("drop", [1, 2])
def test_load_state_tensors_of_the_wrong_number_raises_and_changes_nothing(drop):
    model = tiny("jamba")  # recurrent layers (two tensors each) and attention layers (keys, values)
    with torch.no_grad():
        cache = zoo.cache.output_cache(model(torch.randint(0, 512, (1, 5)), use_cache=True))
    before = cache.state_tensors()
    with pytest.raises(ValueError, match=f"expected {len(before)} tensors, got {len(before) - drop}"):
        cache.load_state_tensors([t.clone() for t in before[:-drop]])  # ended in StopIteration / IndexError
    assert all(a is b for a, b in zip(cache.state_tensors(), before))
    with pytest.raises(ValueError, match=f"got {len(before) + 1}"):
        cache.load_state_tensors([*before, before[0]])


def test_assisted_decoding_of_an_attention_model_equals_greedy():
    model = tiny("transformerpp")
    x = torch.randint(0, 512, (1, 12))
    ids = torch.cat([x, x, x], 1)  # repeats, so prompt lookup proposes tokens, some of them rejected
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)
    assisted = model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=16, do_sample=False)
    assert torch.equal(assisted, greedy)


def test_an_assistant_with_a_sliding_window_drafts_past_its_window():
    """transformers marks the cache it makes for an assistant to record its past, so that the rejected drafts can be
    cropped; zoo makes its own cache and left it unmarked, so a sliding-window assistant's crop raised ("does not
    track past states") once its window was full and a draft was partly accepted."""
    def attention_model(seed, layers, **spec):
        torch.manual_seed(seed)
        config = ZooConfig(vocab_size=64, d_model=16, layers=layers, ffn="none", initializer_range=0.6,
                           mixers={"A": {"type": "attention", "n_heads": 2, **spec}})
        return zoo.ZooForCausalLM(config).eval()

    model, draft = attention_model(0, "AA"), attention_model(1, "A", window=3)
    torch.manual_seed(2)
    ids = torch.randint(0, 63, (1, 6))
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, assistant_model=draft, max_new_tokens=12, do_sample=False)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_return_dict_false_gives_transformers_tuple(name):
    model = tiny(name)
    ids = torch.randint(0, 512, (2, 7))
    out = model(ids, labels=ids)
    loss, logits = model(ids, labels=ids, return_dict=False)[:2]
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert isinstance(model.model(ids, return_dict=False), tuple)
    model.config.return_dict = False
    assert torch.equal(model(ids)[0], out.logits)


def test_return_dict_false_keeps_the_moe_aux_loss_as_mixtral_does():
    """ZooModel's tuple dropped the MoE aux loss (set as an attribute, not a field), and ZooForCausalLM's put it after
    the logits and cache where MixtralForCausalLM's tuple has it second, beside the router logits."""
    model = tiny("jamba").train()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    base = model.model(ids)
    hidden, router, aux = model.model(ids, output_router_logits=True, return_dict=False)
    assert torch.equal(hidden, base.last_hidden_state) and torch.equal(aux, base.aux_loss) and aux > 0
    assert len(router) == 4
    hidden, cache = model.model(ids, use_cache=True, return_dict=False)  # without router logits: a dense model's
    assert torch.equal(hidden, base.last_hidden_state) and cache is not None
    out = model(ids, labels=ids, output_router_logits=True)
    loss, aux, logits, router_logits = model(ids, labels=ids, output_router_logits=True, return_dict=False)
    assert torch.equal(aux, out.aux_loss) and torch.equal(logits, out.logits)
    assert torch.allclose(loss, out.loss) and len(router_logits) == len(out.router_logits) == 4
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce + 1e-3 * aux)  # the loss includes it, as Mixtral's
    loss, logits = model(ids, labels=ids, return_dict=False)  # without router logits: (loss, logits), as Mixtral's
    torch.testing.assert_close(loss, ce + 1e-3 * aux)
    assert torch.equal(logits, out.logits)


def test_an_moe_models_output_indexes_as_before_and_as_its_tuple():
    """ZooCausalLMOutput took MoeCausalLMOutputWithPast's field order (aux_loss second) and an MoE model fills
    aux_loss without output_router_logits: indexing the returned output (`model(ids)[0]`, `out[1]` with labels) gave
    the aux loss where it gave the logits, unlike return_dict=False's tuple and MixtralForCausalLM's output."""
    model = tiny("jamba").eval()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    assert out.aux_loss is not None and torch.equal(out[0], out.logits)
    out = model(ids, labels=ids)
    assert torch.equal(out[1], out.logits)
    assert [torch.equal(a, b) for a, b in zip(out.to_tuple()[:2], model(ids, labels=ids, return_dict=False)[:2])] \
        == [True, True]
    out = model(ids, labels=ids, output_router_logits=True)  # beside the router logits: second, as Mixtral's
    assert torch.equal(out[1], out.aux_loss) and torch.equal(out[2], out.logits)


def test_config_output_hidden_states_is_the_default():
    model = tiny("mamba")
    model.config.output_hidden_states = True
    out = model(torch.randint(0, 512, (1, 5)))
    assert out.hidden_states is not None and len(out.hidden_states) == len(model.model.layers) + 1
    assert model(torch.randint(0, 512, (1, 5)), output_hidden_states=False).hidden_states is None


def test_checkpointing_takes_transformers_function_and_every_n_layers():
    model = tiny("jamba").train()
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or "every_n_layers" not in __import__("inspect").signature(enable).parameters:
        pytest.skip("this transformers has no activation_checkpointing_enable(every_n_layers=...)")
    ids = torch.randint(0, 512, (2, 12))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable(every_n_layers=2)
    calls = []
    func = model.model._gradient_checkpointing_func
    model.model._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or func(*a, **k)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == (len(model.model.layers) + 1) // 2
    for n, p in model.named_parameters():
        if n in ref:
            assert_close(n, p.grad, ref[n], 1e-5)


def test_checkpointing_that_a_cache_turns_off_says_so():
    """Blocks that carry a cache run unchecked (a rerun would update the cache twice): with truncated BPTT (zoo
    train's tbptt_chunk, or any training call with use_cache=True) gradient checkpointing saved nothing, silently."""
    model = tiny("jamba").train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 512, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(ids, labels=ids).loss.backward()  # no cache: checkpointed, nothing to say
    with pytest.warns(UserWarning, match="gradient checkpointing does not apply.*use_cache=False"):
        out = model(ids[:, :6], use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True)  # said once


StatelessMixer = PositionwiseMixer  # a custom mixer without a cache entry (`init_state` returns None)


def test_a_stateless_mixer_decodes_with_beams_and_several_sequences():
    model = tiny("mamba")
    model.model.layers[1].mixer = StatelessMixer(model.config.d_model)
    prompt = torch.randint(0, 512, (2, 6))
    out = model.generate(prompt, max_new_tokens=5, num_beams=2, num_return_sequences=2, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (4, 11)


class ShiftingStatelessMixer(StatelessMixer):
    """Claims no cache entry (init_state returns None) but adds the previous token's projection: not position-wise."""

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        h = self.proj(x)
        return h + torch.nn.functional.pad(h, (0, 0, 1, 0))[:, :-1]


def test_a_stateless_mixer_that_mixes_tokens_is_refused_before_decoding():
    """A mixer whose init_state returns None gets the new token alone at each decode step; one that mixes tokens
    anyway (here a token shift) decoded other tokens than a full rerun without an error. The first use of a cache
    now probes such mixers and names the one that breaks the contract; position-wise ones still decode."""
    model = tiny("mamba").eval()
    model.model.layers[1].mixer = ShiftingStatelessMixer(model.config.d_model)
    prompt = torch.randint(0, 512, (2, 6))
    with pytest.raises(ValueError, match=r"layer 1's mixer ShiftingStatelessMixer returns no cache entry"):
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="ShiftingStatelessMixer"):
        model(prompt, use_cache=True)
    model.model.layers[1].mixer = StatelessMixer(model.config.d_model).train()
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    assert model.model.layers[1].mixer.training  # the probe restores the mixer's mode


class CausalMeanMixer(torch.nn.Module):
    """A custom mixer with no cache support (no `init_state`): each position averages the projections before it."""

    lora_targets = ("proj",)

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        return self.proj(x).cumsum(1) / steps[:, None]


def test_a_mixer_without_init_state_trains_evaluates_and_generates_without_a_cache():
    """A custom mixer that defines no init_state failed at model construction (AttributeError: no attribute
    'init_state'), so it could not even be trained. The model now builds, trains and evaluates without a cache,
    generate reruns the whole sequence each step (with a warning) and matches greedy decoding by hand, and asking
    for a cache names the mixer and use_cache=False."""
    config = ZooConfig(d_model=32, vocab_size=64, layers="MA", ffn="none",
                       mixers={"M": {"type": f"{__name__}.CausalMeanMixer"}, "A": {"type": "attention", "n_heads": 2}})
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, 64, (2, 6))
    model(ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 6, 64)
    with pytest.warns(UserWarning, match="CausalMeanMixer defines no init_state"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="CausalMeanMixer defines no init_state.*use_cache=False"):
        model(ids, use_cache=True)
    with pytest.raises(ValueError, match="CausalMeanMixer defines no init_state"):
        model.generate(ids, max_new_tokens=2, use_cache=True, pad_token_id=0)


class HeadsMixer(torch.nn.Module):
    """A custom mixer with an option and a `check_spec` (n_heads must divide d_model)."""

    def __init__(self, d_model: int, layer_idx: int = 0, *, n_heads: int = 2):
        super().__init__()
        self.check_spec(d_model, n_heads=n_heads)
        self.proj = torch.nn.Linear(d_model, d_model)

    @staticmethod
    def check_spec(d_model: int, *, n_heads: int = 2) -> None:
        if d_model % n_heads:
            raise ValueError(f"n_heads: {n_heads} does not divide d_model {d_model}")

    def init_state(self, batch_size, dtype, device, max_len=None):
        return None

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x)


@pytest.mark.parametrize("option,message", [
    ({"n_head": 4}, r"mixers\.H\.n_head: unknown option .*did you mean 'n_heads'"),
    ({"n_heads": 5}, r"layers\[1\] \(.*HeadsMixer\): n_heads: 5 does not")])
def test_a_dotted_path_mixers_options_are_checked_naming_the_field(option, message):
    """A mixer named by import path is imported only when the model is built, so the config could not check its
    options: a typo failed in the constructor as a bare TypeError (HeadsMixer.__init__() got an unexpected keyword
    argument 'n_head'), naming no config field, and check_spec never ran. The build now checks them as the config
    checks a registered mixer's."""
    config = ZooConfig(d_model=32, vocab_size=64, layers="AH", ffn="none",
                       mixers={"H": {"type": f"{__name__}.HeadsMixer", **option}, "A": {"type": "attention",
                                                                                        "n_heads": 2}})
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config(config)


def test_trusted_load_takes_overrides_and_a_keyword_path(tmp_path):
    cfg = ZooConfig(d_model=32, vocab_size=64, layers="X", ffn="none",
                    mixers={"X": {"type": "zoo.mixers.mamba.Mamba", "d_state": 4}})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, use_cache=False)
    assert loaded.config.use_cache is False and type(loaded.model.layers[0].mixer).__name__ == "Mamba"
    loaded = zoo.ZooForCausalLM.from_pretrained(pretrained_model_name_or_path=tmp_path, trust_remote_code=True)
    assert type(loaded.model.layers[0].mixer).__name__ == "Mamba"
    with pytest.raises(ValueError, match="trust_remote_code"):  # the trust ends with the load
        zoo.ZooForCausalLM.from_pretrained(tmp_path)


def test_the_base_model_takes_trust_remote_code_too(tmp_path):
    """AutoModel.from_pretrained(..., trust_remote_code=True) (a ZooModel, for embeddings or a custom head) refused the
    dotted-path mixer, telling the user to pass trust_remote_code=True: only ZooForCausalLM honoured the flag."""
    from transformers import AutoModel

    cfg = ZooConfig(d_model=32, vocab_size=64, layers="X", ffn="none",
                    mixers={"X": {"type": "zoo.mixers.mamba.Mamba", "d_state": 4}})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert isinstance(base, zoo.ZooModel) and type(base.layers[0].mixer).__name__ == "Mamba"
    assert getattr(base.layers[0].norm.weight, "_no_weight_decay", False)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", TINY)
def test_generate_continues_a_cache_with_beams_and_several_sequences(name, static):
    """generate(past_key_values=...) with num_beams or num_return_sequences > 1 repeats each cached row as its input
    row (transformers repeats the tensors only: the cache of B rows met B·n inputs and the first step failed); a
    static cache (ZooCache.to_static) too: its attention layers had no batch_repeat_interleave (AttributeError)."""
    model = tiny(name)
    prompt = torch.randint(1, 512, (2, 7))
    first = model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = zoo.cache.output_cache(first)
    if static:
        cache = cache.to_static(32)
    beams = model.generate(first.sequences, past_key_values=cache, max_new_tokens=3, num_beams=2,
                           num_return_sequences=2, do_sample=False, pad_token_id=0)
    fresh = model.generate(first.sequences, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(beams, fresh)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("name", ["mamba", "gla", "jamba"])
def test_generate_from_a_cache_of_the_whole_prompt_is_refused_naming_the_fix(name, with_mask):
    """A cache of every prompt token (model(prompt, use_cache=True)) left generate nothing to run past it: it fed the
    whole prompt again, which the forward refused with a message about packed documents and seq_idx."""
    model = tiny(name)
    prompt = torch.randint(1, 512, (1, 8))
    mask = {"attention_mask": torch.ones_like(prompt)} if with_mask else {}
    fresh = model.generate(prompt, max_new_tokens=4, do_sample=False, **mask)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"already holds 8 tokens.*input_ids\[:, :-1\]"):
        model.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False, **mask)
    with torch.no_grad():  # what the error says to do
        cache = model(prompt[:, :-1], use_cache=True).past_key_values
    assert torch.equal(model.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False, **mask), fresh)


@pytest.mark.parametrize("where", ["argument", "config"])
@pytest.mark.parametrize("name", ["mamba", "transformerpp"])
def test_generate_with_a_cache_and_use_cache_false_is_refused_before_the_cache_is_touched(name, where):
    """use_cache=False (passed, or a training checkpoint's config.use_cache=False, which generation_config follows)
    beside a given cache: transformers fed every step the whole sequence, which the forward ran past the cache, so the
    prompt went into the cache and the next step was refused with a message about position_ids and packed documents.
    Refused up front naming use_cache, the cache untouched."""
    model = tiny(name)
    prompt = torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    fresh = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = model(prompt[:, :5], use_cache=True).past_key_values
    off = {"use_cache": False} if where == "argument" else {}
    if where == "config":
        model.generation_config.use_cache = False
    with pytest.raises(ValueError, match=r"use_cache is False.*use_cache=True"):
        model.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0, **off)
    assert cache.get_seq_length() == 5
    assert torch.equal(model.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                      use_cache=True), fresh)


@pytest.mark.skipif(zoo.modeling.GENERATE_CACHE_KWARG != "cache",
                    reason="transformers before 5.2x takes no cache_params in generate for a zoo model")
@pytest.mark.parametrize("name", ["mamba", "jamba"])
def test_a_cache_given_to_generate_as_cache_params_is_checked_as_one_given_as_past_key_values(name):
    """transformers 5.2x's generate takes the cache as cache_params too (its Mamba's name, renamed to cache): zoo's
    checks read cache and past_key_values alone, so a cache of the whole prompt given so was not refused and failed
    with a message about documents packed by position_ids and seq_idx."""
    model = tiny(name)
    prompt = torch.randint(1, 512, (1, 8))
    fresh = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"already holds 8 tokens.*input_ids\[:, :-1\]"):
        model.generate(prompt, cache_params=cache, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        cache = model(prompt[:, :-1], use_cache=True).past_key_values
    assert torch.equal(model.generate(prompt, cache_params=cache, max_new_tokens=4, do_sample=False), fresh)


@pytest.mark.parametrize("legacy", [tuple, list])
def test_a_legacy_tuple_cache_given_to_generate_is_refused_naming_zoo_cache(legacy):
    """transformers 4's cache format, a tuple of (keys, values) per layer: generate marked it as the user's cache and
    failed with "'tuple' object has no attribute '_is_user_defined'" (transformers' Llama refuses a tuple by name)."""
    model = tiny("transformerpp")
    prompt = torch.randint(1, 512, (1, 6))
    with torch.no_grad():
        cache = model(prompt[:, :-1], use_cache=True).past_key_values
    legacy_cache = legacy((layer.keys, layer.values) for layer in cache.layers)
    for name in dict.fromkeys((zoo.modeling.GENERATE_CACHE_KWARG, "past_key_values")):
        with pytest.raises(TypeError, match=r"must be a ZooCache \(got " + legacy.__name__):
            model.generate(prompt, max_new_tokens=2, do_sample=False, **{name: legacy_cache})


@pytest.mark.parametrize("name", ["mamba", "transformerpp"])
def test_an_attention_mask_zoo_cannot_read_is_refused_naming_the_shape(name):
    """A 4-D mask (packing recipes build block-diagonal ones for transformers' attention models) failed with a bare
    broadcast error; a mask longer than past + tokens (after a cache or without one) moved RoPE's positions without an
    error; one shorter than the input failed with a bare broadcast error."""
    model = tiny(name)
    ids = torch.randint(0, 512, (2, 8))
    mask4 = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None].expand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"attention_mask: expected \[batch, tokens\] = \[2, 8\].*seq_idx"):
        model(ids, attention_mask=mask4)
    for length in (5, 11):  # without a cache: a bare broadcast error (5); positions shifted without a word (11)
        with pytest.raises(ValueError, match=rf"attention_mask: covers {length} positions but the input has 8 "
                                             r"tokens.*\[2, 8\]"):
            model(ids, attention_mask=torch.ones(2, length, dtype=torch.long))
    with torch.no_grad():
        cache = model(ids[:, :7], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"attention_mask: covers 10 positions.*\[2, 8\]"):
            model(ids[:, 7:], attention_mask=torch.ones(2, 10, dtype=torch.long), past_key_values=cache)
        step = model(ids[:, 7:], attention_mask=torch.ones(2, 8, dtype=torch.long), past_key_values=cache).logits
        assert_close("step", step[:, -1], model(ids).logits[:, -1], 1e-5)
        assert torch.equal(model(ids, attention_mask=torch.ones(1, 8)).logits, model(ids).logits)  # [1, T] broadcasts


@pytest.mark.parametrize("name", ["mamba", "transformerpp"])
def test_position_ids_of_another_shape_are_refused_naming_the_shape(name):
    """position_ids of every token so far for a one-token step (as an attention_mask covers them) made RoPE rotate the
    token at each position ('attention shapes disagree: q (2, 8, ...)'), and a recurrent model ignored them without
    a word; a 1-D tensor failed with a bare IndexError, a shorter one with a bare expand error. [1, T] serves every
    row."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 8))
    with torch.no_grad():
        cache = model(ids[:, :7], use_cache=True).past_key_values
        for bad in (torch.arange(8)[None].expand(2, 8), torch.tensor([7])):
            with pytest.raises(ValueError, match=r"position_ids: expected \[batch, tokens\] = \[2, 1\].*7 \+ "
                                                 r"arange\(1\) after the 7 cached tokens"):
                model(ids[:, 7:], position_ids=bad, past_key_values=cache)
        for bad in (torch.arange(4)[None], torch.arange(8)[None].expand(3, 8)):
            with pytest.raises(ValueError, match=r"position_ids: expected \[batch, tokens\] = \[2, 8\]"):
                model(ids, position_ids=bad)
        step = model(ids[:, 7:], position_ids=torch.tensor([[7]]), past_key_values=cache).logits
        assert_close("step", step[:, -1], model(ids).logits[:, -1], 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_seq_idx_of_another_shape_is_refused_naming_the_shape(name):
    """seq_idx was passed to the layers unchecked: a 1-D one failed with a bare IndexError in the cache, others with a
    kernel's shape error naming its own arguments, and a chunk continuing a cache given the ids of every token so far
    ran an attention model with wrong logits and no error. Refused before any layer runs, naming [batch, tokens]."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 9))
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [1] * 3])
    with torch.no_grad():
        for bad in (seq_idx[0], seq_idx[:, :-1], seq_idx[:, :, None], seq_idx.repeat(2, 1)):
            for use_cache in (False, True):
                with pytest.raises(ValueError, match=r"seq_idx: expected \[batch, tokens\] = \[2, 9\]"):
                    model(ids, seq_idx=bad, use_cache=use_cache)
        cache = model(ids[:, :5], seq_idx=seq_idx[:, :5], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"seq_idx: expected \[batch, tokens\] = \[2, 4\].*not the 5 cached"):
            model(ids[:, 5:], seq_idx=seq_idx, past_key_values=cache)
        rest = model(ids[:, 5:], seq_idx=seq_idx[:, 5:], past_key_values=cache).logits
        whole = model(ids, seq_idx=seq_idx, use_cache=False).logits
    assert_close("a chunk continuing a packed cache", rest, whole[:, 5:], 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_seq_idx_follows_the_conventions_the_forward_documents(name):
    """ZooModel.forward's docstring: each run of equal consecutive ids is one document, whatever the values (an id met
    again is a new document, negative ids are no padding), and a continuing chunk's first run continues the cache
    unless the chunk before ran with seq_idx and ended on another id."""
    model = tiny(name)
    ids = torch.randint(1, 512, (1, 12))
    runs = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4])
    with torch.no_grad():
        whole = model(ids, seq_idx=runs, use_cache=False).logits
        for other in ([0] * 4 + [1] * 4 + [0] * 4, [5] * 4 + [-1] * 4 + [-3] * 4):
            assert_close(f"runs {other}", model(ids, seq_idx=torch.tensor([other]), use_cache=False).logits, whole,
                         1e-5)
        alone = model(ids[:, 6:], use_cache=False).logits
        for before, after, expected in (([0] * 4 + [1] * 2, [1] * 2 + [2] * 4, whole[:, 6:]), ([0] * 6, [7] * 6, alone),
                                        (None, [3] * 2 + [4] * 4, model(ids, seq_idx=torch.tensor([[0] * 8 + [1] * 4]),
                                                                        use_cache=False).logits[:, 6:])):
            cache = ZooCache.for_model(model)
            model(ids[:, :6], seq_idx=None if before is None else torch.tensor([before]), past_key_values=cache)
            got = model(ids[:, 6:], seq_idx=torch.tensor([after]), past_key_values=cache).logits
            assert_close(f"after {before}: {after}", got, expected, 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_float_seq_idx_is_refused(name):
    """Float ids were cast to int32: 0.25 and 0.75 became one document, whose tokens then attended to and carried
    states into each other (wrong logits, no error). Integer ids (any integer dtype) run as before."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 9))
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [1] * 3])
    with torch.no_grad():
        for bad in (seq_idx * 0.5 + 0.25, seq_idx.double(), seq_idx.half()):
            with pytest.raises(ValueError, match=rf"seq_idx: expected integer document ids.*got {bad.dtype}"):
                model(ids, seq_idx=bad)
        ref = model(ids, seq_idx=seq_idx).logits
        for good in (seq_idx.int(), seq_idx.to(torch.int16), seq_idx - 7):  # any integers, negative ones too
            assert torch.equal(model(ids, seq_idx=good).logits, ref)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("embeds", [False, True], ids=["input_ids", "inputs_embeds"])
def test_seq_idx_on_another_device_is_refused(name, embeds):
    """seq_idx on another device than the input (here the meta device, the other device a CPU machine has; on a GPU
    machine, ids left on the CPU) failed in a layer's kernel or the cache with a bare device error."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 9))
    given = {"inputs_embeds": model.get_input_embeddings()(ids)} if embeds else {"input_ids": ids}
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [1] * 3])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"seq_idx: on meta but the input is on cpu"):
            model(**given, seq_idx=seq_idx.to("meta"))
        assert torch.equal(model(**given, seq_idx=seq_idx).logits, model(ids, seq_idx=seq_idx).logits)


@pytest.mark.parametrize("name", TINY)
def test_one_row_of_seq_idx_serves_every_row(name):
    """seq_idx [1, T] for a batch of rows packed alike, as position_ids [1, T] serves every row: an attention model
    ran it, a recurrent one failed in its kernel ('seq_idx has shape (1, 9), expected (2, 9)')."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 9))
    one = torch.tensor([[0] * 4 + [1] * 5])
    with torch.no_grad():
        for use_cache in (False, True):
            out = model(ids, seq_idx=one, use_cache=use_cache).logits
            assert torch.equal(out, model(ids, seq_idx=one.repeat(2, 1), use_cache=use_cache).logits)
        second = model(ids[:, 4:], use_cache=False).logits
    assert_close("the second document of each row", out[:, 4:], second, 1e-5)
    for kw in ({}, {"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}):  # generate repeats rows
        torch.manual_seed(0)
        got = model.generate(ids, seq_idx=one, max_new_tokens=3, **kw)
        torch.manual_seed(0)
        assert torch.equal(got, model.generate(ids, seq_idx=one.repeat(2, 1), max_new_tokens=3, **kw)), kw


@pytest.mark.parametrize("name", TINY)
def test_a_chunk_of_no_tokens_gives_empty_logits_and_leaves_the_cache(name):
    """An input of no tokens [B, 0] (a chunked prefill's empty remainder) gives logits [B, 0, V] in every family, with
    or without a mask, cache, seq_idx or position_ids, and leaves a cache as it was. With a mask, `[:, -T:]` read the
    whole mask at T = 0 (a size mismatch after a cache; lay_out_past_pads' 'index -1 is out of bounds' before one),
    and seq_idx / position_ids [B, 0] read their last entry."""
    model = tiny(name)
    ids, nxt = torch.randint(1, 512, (2, 6)), torch.randint(1, 512, (2, 1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    full = torch.cat([mask, torch.ones_like(nxt)], 1)
    none = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for use_cache in (False, True):
            for kw in ({}, {"attention_mask": none}, {"seq_idx": none}, {"position_ids": none}):
                assert model(ids[:, :0], use_cache=use_cache, **kw).logits.shape == (2, 0, 512), kw
        prefill = model(ids, attention_mask=mask, use_cache=True)
        ref = model(nxt, attention_mask=full, past_key_values=prefill.past_key_values).logits
        for chunk_mask in (None, mask):  # after a cache: the mask of the tokens so far, or none
            cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
            assert model(ids[:, :0], attention_mask=chunk_mask, past_key_values=cache).logits.shape == (2, 0, 512)
            assert cache.get_seq_length() == 6
            assert torch.equal(model(nxt, attention_mask=full, past_key_values=cache).logits, ref)
        cache = ZooCache.for_model(model)  # before one: the prefill after it is the plain prefill
        model(ids[:, :0], attention_mask=none, past_key_values=cache, use_cache=True)
        assert torch.equal(model(ids, attention_mask=mask, past_key_values=cache).logits, prefill.logits)


@pytest.mark.parametrize("name", TINY)
def test_labels_of_no_tokens_give_the_loss_of_transformers(name):
    """input_ids and labels [B, 0] give the loss transformers' ForCausalLMLoss gives: NaN (no target, a mean), 0 under
    num_items_in_batch. The labels were shifted before padding, so [B, 0] made B targets for 0 logits (a shape
    error in the cross-entropy)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = tiny(name)
    none = torch.zeros(2, 0, dtype=torch.long)
    for kw in ({}, {"num_items_in_batch": torch.tensor(3)}):
        out = model(none, labels=none, **kw)
        ref = ForCausalLMLoss(out.logits, none, 512, **kw)
        torch.testing.assert_close(out.loss, ref, equal_nan=True)


@pytest.mark.parametrize("name", ["transformerpp", "jamba"])
def test_a_chunk_of_no_tokens_on_a_static_cache_gives_empty_logits_and_leaves_it(name):
    """A static KV cache (ZooCache.to_static) refused a chunk of no tokens ('decodes one token per step, got 0'),
    which a dynamic cache and the recurrent layers take as a no-op."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 7))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values.to_static(16)
        assert model(ids[:, :0], past_key_values=cache).logits.shape == (2, 0, 512)
        assert cache.get_seq_length() == 6
        assert_close("next", model(ids[:, 6:], past_key_values=cache).logits[:, -1], model(ids).logits[:, -1], 1e-5)


def test_a_chunk_of_no_tokens_after_a_cache_of_no_keys_gives_empty_logits():
    """An attention layer of window 1 keeps no past keys, so a chunk of no tokens attends to none (S = 0): its key
    mask, attention_mask[:, -S:], was the whole mask ('key_padding_mask must be [B, Tk] = [2, 0]')."""
    torch.manual_seed(0)
    config = ZooConfig(vocab_size=64, d_model=32, layers="AA", ffn="none",
                       mixers={"A": {"type": "attention", "n_heads": 2, "window": 1}})
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, nxt = torch.randint(1, 64, (2, 6)), torch.randint(1, 64, (2, 1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    full = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        assert model(ids[:, :0], attention_mask=mask, past_key_values=cache).logits.shape == (2, 0, 64)
        assert_close("next", model(nxt, attention_mask=full, past_key_values=cache).logits[:, -1],
                     model(torch.cat([ids, nxt], 1), attention_mask=full).logits[:, -1], 1e-5)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_a_model_built_under_inference_mode_generates(name):
    """Parameters made under torch.inference_mode are inference tensors, which track no version: the decode step's
    kept constants read theirs ('Inference tensors do not track version counter') and generate failed."""
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    want = tiny(name).generate(ids, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        model = tiny(name)
        assert model.model.layers[0].mixer.A_log.is_inference()
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_generate_continuing_a_kept_cache_reads_weights_written_through_data(name):
    """generate continuing a kept cache (past > 0: no new sequence starts) after the SSM weights were written through
    .data (an EMA copy, PEFT's merge), which keeps their storage and version: its steps read the decoded constants
    (A = -exp(A_log), ...) an earlier generate kept, while every other weight was the new one. As transformers' models
    do, the continuation now runs on the weights as they are."""
    model = tiny(name).double()  # (fp64 weights: the fp32 constants are copies, not the parameters themselves)
    ids = torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    continued = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)  # keeps the decoded constants
        cache = model(ids[:, :7], use_cache=True).past_key_values
        kept = copy.deepcopy(cache)
        for block in model.model.layers:
            block.mixer.A_log.data.add_(1.0)
            block.mixer.D.data.fill_(2.0)
            block.mixer.conv1d.weight.data.mul_(2.0)
    fresh = AutoModelForCausalLM.from_config(model.config).double().eval()
    fresh.load_state_dict(model.state_dict())
    want = fresh.generate(ids, past_key_values=kept, **continued).logits
    got = model.generate(ids, past_key_values=cache, **continued).logits
    for step, (a, b) in enumerate(zip(got, want)):
        assert_close(f"step {step}", a, b, 1e-5)


def test_a_one_row_attention_mask_serves_every_row_of_a_moe_model():
    """A [1, T] attention_mask (accepted: it broadcasts over the batch) crashed the MoE load-balancing loss, which read
    one mask entry per token ('The expanded size of the tensor (20) must match the existing size (10)'), in
    training and eval alike; it now gives the [B, T] mask's logits, loss and aux loss."""
    model = tiny("jamba")
    ids = torch.randint(0, 512, (2, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :3] = 0
    for training in (False, True):
        model.train(training)
        out = model(ids, attention_mask=mask, labels=ids)
        ref = model(ids, attention_mask=mask.expand(2, -1), labels=ids)
        assert torch.equal(out.logits, ref.logits)
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.aux_loss, ref.aux_loss)


@pytest.mark.parametrize("name", TINY)
def test_cache_rows_can_be_repeated_and_selected(name):
    model = tiny(name)
    prompt, more = torch.randint(1, 512, (2, 6)), torch.randint(1, 512, (2, 2))
    cache = ZooCache.for_model(model)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([2, 3]))  # both copies of row 1
        out = model(more, past_key_values=cache, use_cache=True).logits
        ref = model(torch.cat([prompt[1:].expand(2, -1), more], 1), use_cache=False).logits[:, -2:]
    assert_close("logits after repeat + select", out, ref, 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_decoding_after_a_packed_prompt_continues_its_last_document(name):
    """A prompt packed by position_ids (documents a, b) then decoded without ids, its cache rows repeated and
    selected as beam search does: the next tokens' logits are those of b alone (attention layers saw a's keys)."""
    model = tiny(name)
    a, b, more = torch.randint(1, 512, (2, 5)), torch.randint(1, 512, (2, 4)), torch.randint(1, 512, (2, 2))
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None].expand(2, -1)
    cache = ZooCache.for_model(model)
    with torch.no_grad():
        model(torch.cat([a, b], 1), position_ids=position_ids, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([3, 2, 1, 0]))
        steps = [model(more[[1, 1, 0, 0], t:t + 1], position_ids=torch.full((4, 1), 4 + t), past_key_values=cache,
                       use_cache=True).logits for t in range(2)]
        ref = model(torch.cat([b, more], 1), use_cache=False).logits[:, -2:]
    assert_close("logits after a packed prompt", torch.cat(steps, 1), ref[[1, 1, 0, 0]], 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_repeated_rows_keep_their_own_packing(name):
    """Two rows packed differently (row 0: documents a, b; row 1: one document), their cache rows repeated as
    generate repeats them (each row twice in a row) and selected: each copy continues its own row's last document.
    An attention layer's cached document ids repeated as a whole batch ([r0, r1, r0, r1]) gave a copy of row 0 the
    ids of row 1."""
    model = tiny(name)
    a, b, c = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 4)), torch.randint(1, 512, (1, 9))
    more = torch.randint(1, 512, (2, 2))
    position_ids = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.arange(9)])
    cache = ZooCache.for_model(model)
    with torch.no_grad():
        model(torch.cat([torch.cat([a, b], 1), c]), position_ids=position_ids, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([3, 1, 2, 0]))  # rows 1, 0, 1, 0
        rows = [1, 0, 1, 0]
        steps = [model(more[rows, t:t + 1], position_ids=torch.tensor([[9 + t], [4 + t], [9 + t], [4 + t]]),
                       past_key_values=cache, use_cache=True).logits for t in range(2)]
        ref_b = model(torch.cat([b, more[:1]], 1), use_cache=False).logits[:, -2:]
        ref_c = model(torch.cat([c, more[1:]], 1), use_cache=False).logits[:, -2:]
    assert_close("logits of repeated rows", torch.cat(steps, 1), torch.cat([ref_c, ref_b, ref_c, ref_b]), 1e-5)


@pytest.mark.parametrize("name", TINY)
def test_generate_from_a_packed_prompt_with_seq_idx_continues_its_last_document(name):
    """generate(input_ids, seq_idx=...): transformers forwarded the prompt's seq_idx unchanged to every decode step,
    which gave wrong logits (the step read the prompt's ids) or, in Mamba-2, a shape error."""
    model = tiny(name)
    a, b = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 4))
    seq_idx = torch.tensor([[0] * 5 + [1] * 4])
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    packed = model.generate(torch.cat([a, b], 1), seq_idx=seq_idx, **kw)
    alone = model.generate(b, **kw)
    assert_close("logits", torch.stack(packed.logits), torch.stack(alone.logits), 1e-5)
    chunked = model.generate(torch.cat([a, b], 1), seq_idx=seq_idx, prefill_chunk_size=3, **kw)
    assert_close("logits, chunked prefill", torch.stack(chunked.logits), torch.stack(alone.logits), 1e-5)
    beams = model.generate(torch.cat([a, b], 1), seq_idx=seq_idx, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(beams[:, 5:], model.generate(b, max_new_tokens=4, num_beams=2, do_sample=False))


@pytest.mark.parametrize("name", TINY)
def test_a_continuing_chunk_whose_position_ids_restart_is_refused(name):
    """Documents packed by position_ids alone, prefilled in two chunks: the second chunk was run as one document
    (it attended to, or carried the state of, the documents before it) with no error. It is refused now, naming
    seq_idx; with seq_idx the same chunks give the whole row's logits, and a continuing chunk whose positions do not
    restart still runs."""
    model = tiny(name)
    ids = torch.randint(1, 512, (1, 12))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    seq_idx = torch.cat([torch.zeros(5), torch.ones(7)]).int()[None]
    with torch.no_grad():
        whole = model(ids, position_ids=position_ids, use_cache=False).logits
        for cut in (3, 5):  # a restart inside the second chunk; at its first token
            cache = ZooCache.for_model(model)
            model(ids[:, :cut], position_ids=position_ids[:, :cut], past_key_values=cache, use_cache=True)
            with pytest.raises(ValueError, match="seq_idx"):
                model(ids[:, cut:], position_ids=position_ids[:, cut:], past_key_values=cache, use_cache=True)
            cache = ZooCache.for_model(model)
            first = model(ids[:, :cut], position_ids=position_ids[:, :cut], seq_idx=seq_idx[:, :cut],
                          past_key_values=cache, use_cache=True).logits
            second = model(ids[:, cut:], position_ids=position_ids[:, cut:], seq_idx=seq_idx[:, cut:],
                           past_key_values=cache, use_cache=True).logits
            assert_close(f"chunks cut at {cut} with seq_idx", torch.cat([first, second], 1), whole, 1e-5)
        cache = ZooCache.for_model(model)
        model(ids[:, :7], position_ids=position_ids[:, :7], past_key_values=cache, use_cache=True)
        model(ids[:, 7:], position_ids=position_ids[:, 7:], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("name", TINY)
def test_generate_with_prefill_chunks_from_a_prompt_packed_by_position_ids_continues_its_last_document(name):
    """generate(ids, position_ids=..., prefill_chunk_size=k) over documents packed by position_ids alone: a chunk of
    several tokens that restarted them was refused (naming seq_idx), and a chunk of one token ran as a continuation of
    the document before it (wrong tokens, no error). generate gives the chunks the prompt's documents as seq_idx."""
    model = tiny(name)
    a, b = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 4))
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    alone = model.generate(b, **kw)
    for chunk in (1, 3):
        packed = model.generate(torch.cat([a, b], 1), position_ids=position_ids, prefill_chunk_size=chunk, **kw)
        assert_close(f"logits, prefill chunks of {chunk}", torch.stack(packed.logits), torch.stack(alone.logits), 1e-5)


@pytest.mark.parametrize("name", ["transformerpp", "jamba"])
def test_generate_with_prefill_chunks_of_inputs_embeds_is_refused_naming_input_ids(name):
    """transformers' chunked prefill splits input_ids and passes the whole inputs_embeds with each chunk: from
    embeddings alone (or beside ids longer than a chunk) the forward failed inside with "The expanded size of the
    tensor (7) must match the existing size (0)". Refused, naming the fix; ids and embeddings in one chunk still run."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 7))
    embeds = model.get_input_embeddings()(ids) * 1.5  # not the ids' own embeddings
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    for given in ({"inputs_embeds": embeds}, {"input_ids": ids, "inputs_embeds": embeds}):
        with pytest.raises(ValueError, match="prefill_chunk_size=3 with inputs_embeds.*generate from input_ids"):
            model.generate(**given, prefill_chunk_size=3, **kw)
    one_chunk = model.generate(input_ids=ids, inputs_embeds=embeds, prefill_chunk_size=7, **kw)
    assert torch.equal(one_chunk, model.generate(input_ids=ids, inputs_embeds=embeds, **kw))



@pytest.mark.parametrize("name", ["mamba2", "jamba"])
def test_a_chunked_prefill_past_a_cache_continues_it_or_is_refused_where_transformers_reruns_the_cached_tokens(name):
    """transformers before 5.21 splits the whole prompt into prefill_chunk_size chunks from its first token, also past
    a cache that holds the first tokens, which then ran into it twice: Mamba-2 decoded from states that had read them
    twice (wrong logits) without an error, Jamba was refused naming a mask shorter than its keys. Refused there naming
    the fix; later transformers continue the cache with the uncached tokens alone."""
    model = tiny(name)
    prompt = torch.randint(1, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    with torch.no_grad():
        cache = model(prompt[:, :9], attention_mask=mask[:, :9], use_cache=True).past_key_values
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if zoo.modeling._CHUNKS_PAST_THE_CACHE:
        chunked = model.generate(prompt, past_key_values=cache, prefill_chunk_size=4, **kw)
        assert torch.equal(chunked, model.generate(prompt, **kw))
    else:
        with pytest.raises(ValueError, match=r"prefill_chunk_size=4 with a cache that holds 9 tokens.*>= 5\.21"):
            model.generate(prompt, past_key_values=cache, prefill_chunk_size=4, **kw)
        assert cache.get_seq_length() == 9  # refused before any step

@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_weights_written_through_data_reach_the_next_generate(name):
    """PEFT's merge_and_unload and EMA copies write weights through .data, which keeps a parameter's storage and
    version: the constants the mixers keep for decoding (Mamba's A; Mamba-2's A, which its sequence forward reads too)
    were those of the weights before, in every later call without autograd."""
    model = tiny(name)
    ids = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    model.generate(ids, **kw)
    for block in model.model.layers:
        block.mixer.A_log.data.fill_(-3.0)
        block.mixer.D.data.zero_()
        bias = block.mixer.dt_bias if name == "mamba2" else block.mixer.dt_proj.bias
        bias.data.fill_(2.0)  # long steps: A matters
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    out, ref = model.generate(ids, **kw), fresh.generate(ids, **kw)
    assert_close("logits after weights written through .data", torch.cat(out.logits), torch.cat(ref.logits), 1e-6)
    with torch.no_grad():
        assert_close("forward", model(out.sequences).logits, fresh(out.sequences).logits, 1e-6)


def test_crop_after_a_packed_prompt_keeps_the_document_ids_aligned():
    """crop drops the cropped tokens' document ids with their keys: the ids kept for a packed prompt (documents a,
    b) stayed as long as before, so the next steps' ids slid onto earlier keys and showed a's last keys to b."""
    model = tiny("transformerpp")
    a, b, more = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 4)), torch.randint(1, 512, (1, 3))
    cache = ZooCache.for_model(model)

    def steps(ids, start):
        return [model(ids[:, t:t + 1], position_ids=torch.tensor([[start + t]]), past_key_values=cache,
                      use_cache=True).logits for t in range(ids.shape[1])]

    with torch.no_grad():
        model(torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(5), torch.arange(4)])[None],
              past_key_values=cache, use_cache=True)
        steps(torch.randint(1, 512, (1, 3)), 4)  # a draft, rejected
        cache.crop(-3)
        out = torch.cat(steps(more, 4), 1)
        ref = model(torch.cat([b, more], 1), use_cache=False).logits[:, -3:]
    assert_close("logits after crop", out, ref, 1e-5)


def test_to_static_refuses_a_cache_of_packed_documents():
    """A static KV layer keeps no document ids, so its steps attended to every packed document of the prompt (the
    dynamic cache continues the last one only): to_static refuses such a cache, naming seq_idx; one document
    converts."""
    model = tiny("transformerpp")
    cache = ZooCache.for_model(model)
    with torch.no_grad():
        model(torch.randint(1, 512, (1, 9)), position_ids=torch.cat([torch.arange(5), torch.arange(4)])[None],
              past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="packed documents"):
        cache.to_static(16)
    single = ZooCache.for_model(model)
    with torch.no_grad():
        model(torch.randint(1, 512, (1, 9)), seq_idx=torch.zeros(1, 9, dtype=torch.int32), past_key_values=single,
              use_cache=True)
    single.to_static(16)


@pytest.mark.parametrize("name", TINY)
def test_a_cache_of_another_batch_size_is_refused(name):
    """A batch-2 cache fed one row raised a shape error deep in a mixer, or (GLA) broadcast the row over both cached
    states and returned 2 rows of logits for 1 input row."""
    model = tiny(name)
    cache = ZooCache.for_model(model)
    model(torch.randint(1, 512, (2, 5)), past_key_values=cache, use_cache=True)
    for rows, length in ((1, 1), (3, 1), (3, 4)):
        with pytest.raises(ValueError, match="cache holds states of 2 rows but the input has"):
            model(torch.randint(1, 512, (rows, length)), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize(("maker", "user"), [("mamba", "mamba2"), ("mamba", "jamba"), ("gla", "transformerpp"),
                                             ("transformerpp", "gla")])
def test_a_cache_of_another_model_is_refused(maker, user):
    model = tiny(maker)
    cache = ZooCache.for_model(model)
    model(torch.randint(1, 512, (1, 5)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"past_key_values: .*ZooCache.for_model\(model\)"):
        tiny(user)(torch.randint(1, 512, (1, 1)), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("name", ["transformerpp", "jamba"])
def test_a_static_step_takes_an_all_ones_mask_and_refuses_padding(name):
    # transformers 5.17's generate passes an all-ones attention_mask with beams: a static cache refused any mask, so
    # generate from a static cache failed there (it passed on later transformers, which pass none)
    model = tiny(name)
    prompt, step = torch.randint(1, 512, (2, 6)), torch.randint(1, 512, (2, 1))
    with torch.no_grad():
        ref = model(torch.cat([prompt, step], 1), use_cache=False).logits[:, -1:]
        cache = zoo.cache.output_cache(model(prompt, use_cache=True)).to_static(16)
        out = model(step, past_key_values=cache, attention_mask=torch.ones(2, 7, dtype=torch.long), use_cache=True)
        assert_close("static step with an all-ones mask", out.logits, ref, 1e-5)
        padded = torch.ones(2, 8, dtype=torch.long)
        padded[0, 0] = 0
        with pytest.raises(ValueError, match="a static KV cache decodes unpadded, unpacked rows"):
            model(step, past_key_values=cache, attention_mask=padded, use_cache=True)


@pytest.mark.parametrize("covered", [1, 5])
@pytest.mark.parametrize("name", ["transformerpp", "jamba"])
def test_a_static_step_refuses_a_mask_short_of_the_tokens_so_far(name, covered):
    """A static cache's step reads its position from the attention_mask's count of tokens: a mask of the new token
    alone (or of the last few) put it at another position than the cache's, and RoPE gave wrong logits without an
    error (a dynamic cache's attention layers refuse such a mask). It is refused, naming the shape."""
    model = tiny(name)
    ids = torch.randint(1, 512, (2, 9))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits[:, -1:]
        cache = zoo.cache.output_cache(model(ids[:, :8], use_cache=True)).to_static(16)
        with pytest.raises(ValueError, match=rf"covers {covered} positions .* \[batch, past \+ 1\] = \[2, 9\]"):
            model(ids[:, 8:], past_key_values=cache, attention_mask=torch.ones(2, covered, dtype=torch.long),
                  use_cache=True)
        out = model(ids[:, 8:], past_key_values=cache, attention_mask=torch.ones(2, 9, dtype=torch.long),
                    use_cache=True).logits
    assert_close("the step with the whole mask", out, ref, 1e-5)


@pytest.mark.parametrize("given", ["mask", "inferred_mask", "beams"])
@pytest.mark.parametrize("name", ["transformerpp", "jamba"])
def test_generate_continues_a_static_cache_of_left_padded_rows(name, given):
    """A static cache of a left-padded batch (to_static(pads=)) hides the pads itself, but its step refused any mask
    with padding: generate, which extends the batch's mask (given, or inferred from pad_token_id), could not continue
    it. A mask whose padding is the cache's pads is taken now; other padding is still refused."""
    model = tiny(name)
    prompt = torch.randint(1, 512, (3, 9))
    mask = torch.ones_like(prompt)
    mask[1, :4] = mask[2, :1] = 0
    prompt[mask == 0] = 0
    kw = dict(do_sample=False, pad_token_id=0)
    first = model.generate(prompt, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **kw)
    cache = zoo.cache.output_cache(first).to_static(32, pads=(mask == 0).sum(1))
    whole = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
    extra = {"num_beams": 2} if given == "beams" else {}
    passed = {} if given == "inferred_mask" else {"attention_mask": whole}
    out = model.generate(first.sequences, past_key_values=cache, max_new_tokens=5, **passed, **extra, **kw)
    assert torch.equal(out, model.generate(first.sequences, attention_mask=whole, max_new_tokens=5, **extra, **kw))
    with torch.no_grad():
        cache = zoo.cache.output_cache(model(prompt, attention_mask=mask, use_cache=True))
    cache.to_static(32, pads=(mask == 0).sum(1))
    other = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    other[0, 0] = 0
    with pytest.raises(ValueError, match="a static KV cache decodes unpadded, unpacked rows"):
        model(torch.randint(1, 512, (3, 1)), past_key_values=cache, attention_mask=other, use_cache=True)


@pytest.mark.parametrize("covered", [1, 4], ids=["new_tokens_only", "some_cached_tokens"])
def test_a_mask_short_of_the_cached_keys_leaves_a_hybrids_states_as_they_were(covered):
    """A mask of fewer positions than the cached and new tokens, with a cache, was refused by the first attention
    layer, after the Mamba layers before it had advanced their states by the chunk: the cache, kept for a retry
    with the whole mask, then gave wrong logits without an error. Refused before any layer runs, the retry is
    exact."""
    model = tiny("jamba")  # MMAM MMAM: two Mamba layers before the first attention layer
    ids = torch.randint(1, 512, (2, 8))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits[:, -2:]
        cache = zoo.cache.output_cache(model(ids[:, :6], use_cache=True))
        with pytest.raises(ValueError, match=r"attention_mask: covers \d+ positions but this attention layer attends"):
            model(ids[:, 6:], past_key_values=cache, attention_mask=torch.ones(2, covered + 1, dtype=torch.long),
                  use_cache=True)
        assert cache.get_seq_length() == 6
        out = model(ids[:, 6:], past_key_values=cache, attention_mask=torch.ones(2, 8, dtype=torch.long),
                    use_cache=True).logits
    assert_close("the retried chunk", out, ref, 1e-5)


@pytest.mark.parametrize("refused", ["two_tokens", "padding", "full"])
def test_a_chunk_a_static_cache_refuses_leaves_a_hybrids_states_as_they_were(refused):
    """A static cache (ZooCache.to_static) takes one unpadded token per step with room for it; each attention layer
    refused anything else on its own, after the Mamba layers before it had advanced their states by the refused
    tokens: the cache, kept for a retry (generate continuing it from a prompt with two uncached tokens, a caught
    KVCacheFull), then gave wrong logits without an error. Refused before any layer runs, the retry is exact."""
    model = tiny("jamba")  # MMAM MMAM: two Mamba layers before the first attention layer
    ids = torch.randint(1, 512, (2, 8))
    held = 6 if refused == "full" else 5
    with torch.no_grad():
        ref = model(ids[:, :held + 1], use_cache=False).logits[:, -1:]
        room = held if refused == "full" else 16
        cache = zoo.cache.output_cache(model(ids[:, :held], use_cache=True)).to_static(room)
        if refused == "two_tokens":
            with pytest.raises(ValueError, match="decodes one token per step, got 2"):
                model(ids[:, held:held + 2], past_key_values=cache, use_cache=True)
        elif refused == "padding":
            padded = torch.ones(2, held + 1, dtype=torch.long)
            padded[0, 0] = 0
            with pytest.raises(ValueError, match="a static KV cache decodes unpadded, unpacked rows"):
                model(ids[:, held:held + 1], past_key_values=cache, attention_mask=padded, use_cache=True)
        else:
            with pytest.raises(zoo.cache.KVCacheFull, match="holds 6 of 6 tokens"):
                model(ids[:, held:held + 1], past_key_values=cache, use_cache=True)
            # a full static layer cannot grow: the recurrent states are compared with those of a fresh prefill
            fresh = zoo.cache.output_cache(model(ids[:, :held], use_cache=True))
            for layer, want in zip(cache.layers, fresh.layers):
                if isinstance(layer, zoo.cache.RecurrentLayer):
                    assert_close("recurrent state", layer.recurrent_state, want.recurrent_state, 1e-6)
            return
        assert cache.get_seq_length() == held
        out = model(ids[:, held:held + 1], past_key_values=cache, use_cache=True).logits
    assert_close("the retried step", out, ref, 1e-5)
    with pytest.raises(ValueError, match="decodes one token per step, got 2"):  # generate: before its first step
        model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == held + 1


@pytest.mark.parametrize("name", ["transformerpp", "jamba"])
def test_generate_from_a_static_cache_too_small_is_refused_before_the_first_step(name):
    """A static cache (ZooCache.to_static) without room for max_new_tokens raised KVCacheFull at the step that found
    it full: the tokens generated until then were lost and the user's cache was left full, so the call could not be
    retried with it. It is refused before the first step now, naming the room needed; a cache of exactly that room
    generates what a dynamic one does."""
    model = tiny(name)
    first = model.generate(torch.randint(1, 512, (2, 7)), max_new_tokens=2, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True)
    kw = dict(do_sample=False, pad_token_id=0)
    cache = zoo.cache.output_cache(first).to_static(16)  # 8 tokens held, 8 more fit
    with pytest.raises(zoo.cache.KVCacheFull, match=r"room for 16 tokens.*may need 17.*to_static\(max_len >= 17\)"):
        model.generate(first.sequences, past_key_values=cache, max_new_tokens=9, **kw)
    assert cache.get_seq_length() == 8  # untouched: the same cache generates the tokens that fit
    out = model.generate(first.sequences, past_key_values=cache, max_new_tokens=8, **kw)
    assert torch.equal(out, model.generate(first.sequences, max_new_tokens=8, **kw))


class OwnInitMixer(StatelessMixer):
    """A custom mixer whose init lives in reset_parameters (the weights 0.5, the bias 1) and a twin that sets the
    same values in __init__ only."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model)

    def reset_parameters(self):
        torch.nn.init.constant_(self.proj.weight, 0.5)
        torch.nn.init.ones_(self.proj.bias)


class InitOnlyMixer(StatelessMixer):
    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model)
        OwnInitMixer.reset_parameters(self)


def test_a_custom_mixers_reset_parameters_survives_the_models_init_and_its_constructor_init_does_not(tmp_path):
    """What the README's custom-mixer paragraph promises: the model's init draws every nn.Linear from
    N(0, initializer_range) with zero biases (as transformers' models do), then calls each module's
    reset_parameters, children first, so a mixer's own init belongs there. A mixer whose weights all live in
    nn.Linear children had its reset_parameters skipped (transformers skips parameterless modules in custom-code
    models); it runs now, and a load keeps the saved weights."""
    def build(cls):
        config = ZooConfig(d_model=32, vocab_size=64, layers="XA", ffn="none",
                           mixers={"X": {"type": f"{__name__}.{cls.__name__}"},
                                   "A": {"type": "attention", "n_heads": 2}})
        return AutoModelForCausalLM.from_config(config)

    model = build(OwnInitMixer)
    kept = model.model.layers[0].mixer.proj
    assert torch.all(kept.weight == 0.5) and torch.all(kept.bias == 1)
    drawn = build(InitOnlyMixer).model.layers[0].mixer.proj
    assert not torch.all(drawn.weight == 0.5) and torch.all(drawn.bias == 0)
    with torch.no_grad():
        kept.weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).model.layers[0].mixer.proj
    assert torch.all(loaded.weight == 0.25) and torch.all(loaded.bias == 1)


class ScaledOwnInitMixer(OwnInitMixer):
    """OwnInitMixer with a parameter of its own (`scale`), its init written straight into the tensors (no
    torch.nn.init, which transformers guards against overwriting loaded weights while it initializes)."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model)
        self.scale = torch.nn.Parameter(torch.empty(d_model))

    def reset_parameters(self):
        with torch.no_grad():
            self.proj.weight.fill_(0.5)
            self.proj.bias.fill_(1.0)
            self.scale.fill_(2.0)

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x) * self.scale


def test_weights_missing_from_a_checkpoint_get_their_mixers_init_and_the_loaded_ones_stay(tmp_path):
    """A checkpoint that lacks some of a mixer's weights (a changed option, a partial conversion, a dropped key): the
    missing ones are initialized as a fresh model's are, by the mixer's reset_parameters, and the loaded ones stay.
    transformers skips a custom-code module whose own parameters all loaded, so a Mamba mixer with A_log and D loaded
    left a missing dt_proj.bias at the generic zero (dt = softplus(0) = 0.69, far above dt_max) and a missing conv
    bias at torch's uniform draw instead of 0; a custom mixer's missing bias kept the generic 0 instead of its own
    init. And where the mixer's init did run, writes that bypass torch.nn.init overwrote its loaded weights."""
    from safetensors.torch import load_file, save_file

    config = ZooConfig(d_model=32, vocab_size=64, layers="MDXY", ffn="none",
                       mixers={"M": {"type": "mamba"}, "D": {"type": "mamba2", "head_dim": 16},
                               "X": {"type": f"{__name__}.OwnInitMixer"},
                               "Y": {"type": f"{__name__}.ScaledOwnInitMixer"}})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)  # values no init gives
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    missing = ["model.layers.0.mixer.dt_proj.bias", "model.layers.0.mixer.conv1d.bias",
               "model.layers.1.mixer.conv1d.bias", "model.layers.2.mixer.proj.bias", "model.layers.3.mixer.scale"]
    save_file({k: v for k, v in state.items() if k not in missing}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    params = dict(loaded.named_parameters())
    for name, value in state.items():
        if name not in missing:
            assert torch.equal(params[name], value), f"{name}: the loaded weight was overwritten"
    mamba = loaded.model.layers[0].mixer
    dt = F.softplus(mamba.dt_proj.bias.detach().double())
    low = max(mamba.dt_min, mamba.dt_init_floor)
    assert low * (1 - 1e-4) <= dt.min() and dt.max() <= mamba.dt_max * (1 + 1e-4), (dt.min(), dt.max())
    assert torch.all(mamba.conv1d.bias == 0) and torch.all(loaded.model.layers[1].mixer.conv1d.bias == 0)
    assert torch.all(loaded.model.layers[2].mixer.proj.bias == 1)
    assert torch.all(loaded.model.layers[3].mixer.scale == 2)


def test_resizing_an_untied_models_vocabulary_keeps_zoos_head_class():
    """resize_token_embeddings builds a plain nn.Linear head for an untied model, which lost zoo.layers.Linear's
    decode kernels (same numbers, slower steps on CUDA). The head is zoo's again, its old rows kept."""
    from zoo.layers import Linear

    config = ZooConfig.from_yaml(CONFIGS / "mamba-tiny.yaml")
    config.tie_embeddings = False
    model = AutoModelForCausalLM.from_config(config)
    old, vocab = model.lm_head.weight.detach().clone(), config.vocab_size
    model.resize_token_embeddings(vocab + 16)
    assert type(model.lm_head) is Linear and model.lm_head.weight.shape[0] == vocab + 16
    assert torch.equal(model.lm_head.weight[:vocab], old)
    assert model(torch.randint(0, vocab + 16, (1, 5))).logits.shape[-1] == vocab + 16


def test_generate_skips_the_moe_aux_loss_that_it_drops(monkeypatch):
    """generate reads each step's logits and cache, never its aux_loss: prepare_inputs_for_generation asks the
    forward not to compute the MoE load-balancing loss (a softmax, top-k and scatter per MoE layer and step). A plain
    forward, eval or train, with or without labels, still returns it, and generate's tokens do not change."""
    import zoo.modeling as modeling

    model = tiny("jamba")
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    calls = []
    real = modeling.load_balancing_loss
    monkeypatch.setattr(modeling, "load_balancing_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert not calls
        assert model(ids).aux_loss is not None and model(ids, labels=ids).aux_loss is not None
        inputs = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids))
        assert model(**inputs).aux_loss is None  # what a generate step gets
        assert model(**inputs, labels=ids).aux_loss is not None  # a loss asked for keeps its aux term
    prepare = type(model).prepare_inputs_for_generation

    def as_before(self, *args, **kwargs):  # the steps as they ran before: the aux loss computed and dropped
        inputs = prepare(self, *args, **kwargs)
        del inputs[modeling._SKIP_AUX_LOSS]
        return inputs

    monkeypatch.setattr(type(model), "prepare_inputs_for_generation", as_before)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), out) and len(calls) == 4


def test_a_model_pickles_after_generating_with_an_attention_mask():
    """generate kept its verdict on the attention_mask (a weakref to it) on the model, so pickle.dumps / torch.save of
    the model after a generate with a mask raised "cannot pickle 'weakref.ReferenceType' object" (LlamaForCausalLM
    pickles). The copy gives the same logits and generates the same tokens."""
    import io
    import pickle

    model = tiny("jamba")
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    copy = pickle.loads(pickle.dumps(model))
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        assert torch.equal(copy(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert torch.equal(copy.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       out)


@pytest.mark.parametrize("name", ["jamba", "gla"])
def test_a_cache_that_ran_pickles_and_continues(name):
    """A cache that a forward used kept a weakref to the model it was checked for, so pickle.dumps / torch.save of a
    prefilled cache (a prompt cache kept on disk; transformers' DynamicCache pickles) raised "cannot pickle
    'weakref.ReferenceType' object". The loaded copy continues as the cache does."""
    import pickle

    model = tiny(name)
    prompt, step = torch.randint(1, 512, (2, 6)), torch.randint(1, 512, (2, 1))
    with torch.no_grad():
        cache = zoo.cache.output_cache(model(prompt, use_cache=True))
        copy = pickle.loads(pickle.dumps(cache))
        assert copy.get_seq_length() == 6
        assert torch.equal(model(step, past_key_values=copy).logits, model(step, past_key_values=cache).logits)


@pytest.mark.parametrize("name", ["jamba", "mamba2"])
def test_a_deep_copy_keeps_the_no_weight_decay_flags(name):
    """torch's Parameter.__deepcopy__ makes new Parameters without their attributes, so copy.deepcopy(model) (a
    second run from the same initialisation, an EMA copy) lost `_no_weight_decay`, and zoo.train's optimizer decayed
    Mamba's A_log [d_inner, d_state] and the other flagged parameters of the copy; a pickled copy kept them."""
    import copy

    from zoo.train import OptimConfig, param_groups

    model = tiny(name)
    flagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged
    twin = copy.deepcopy(model)
    assert {n for n, p in twin.named_parameters() if getattr(p, "_no_weight_decay", False)} == flagged
    names = {id(p): n for n, p in model.named_parameters()} | {id(p): n for n, p in twin.named_parameters()}
    groups = [[sorted(names[id(p)] for p in g["params"]) for g in param_groups(m, OptimConfig(no_decay_1d=False))]
              for m in (model, twin)]
    assert groups[0] == groups[1]


# mamba_ssm keeps these in fp32 inside a bf16 / fp16 model: Mamba's A_log and D, Mamba-2's D (its A_log and dt_bias
# take the model's dtype); GLA (fla) and attention keep none
KEPT_IN_FP32 = {"Mamba": {"A_log", "D"}, "Mamba2": {"D"}, "GLA": set(), "Attention": set()}


def _kept(model) -> dict[str, torch.dtype]:
    return {f"{type(m).__name__}.{n}": p.dtype for m in model.modules() for n, p in m.named_parameters(recurse=False)
            if type(m).__name__ in KEPT_IN_FP32}


@pytest.mark.parametrize("name", ["jamba", "mamba2", "gla"])
@pytest.mark.parametrize("load", ["dtype", "torch_dtype", "auto", "from_config"])
def test_a_half_model_keeps_the_ssm_parameters_in_fp32_as_mamba_ssm(name, load, tmp_path):
    # from_pretrained(dtype=torch.bfloat16) cast A_log and D to bf16: a mamba_ssm bf16 model, converted and saved
    # (A_log and D fp32 in the file), then gave logits 0.03-0.09 away from its source; now they load as they lie
    half = torch.float16 if load == "torch_dtype" else torch.bfloat16
    model = tiny(name)
    source = model.to(half)
    source.keep_fp32_parameters()
    fp32 = dict(tiny(name).named_parameters())
    for n in source.keep_in_fp32_names():  # mamba_ssm's own fp32 values, not bf16 rounded back up
        source.get_parameter(n).data = fp32[n].detach().clone()
    source.save_pretrained(tmp_path)
    if load == "from_config":
        torch.manual_seed(0)
        loaded = AutoModelForCausalLM.from_config(source.config, dtype=half).eval()
    else:
        kwargs = {"dtype": half} if load == "dtype" else {"torch_dtype": half} if load == "torch_dtype" else {}
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs).eval()
    expected = {f"{type(m).__name__}.{n}": torch.float32 if n in KEPT_IN_FP32[type(m).__name__] else half
                for m in loaded.modules() for n, _ in m.named_parameters(recurse=False)
                if type(m).__name__ in KEPT_IN_FP32}
    assert _kept(loaded) == expected
    assert loaded.dtype == half
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all() and logits.dtype == half
        if load != "from_config":
            assert torch.equal(logits, source(ids).logits)  # the source's function, bit for bit
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 16)
    if load == "dtype":  # kept through another round trip, LoRA and a training step
        loaded.save_pretrained(tmp_path / "again")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=half)
        assert _kept(again) == expected
        assert all(torch.equal(again.get_parameter(n), loaded.get_parameter(n)) for n in loaded.keep_in_fp32_names())
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(again, LoraConfig(r=2))
        peft_model(ids, labels=ids).loss.backward()
        assert _kept(peft_model.base_model.model) == expected


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mamba", "mamba2", "jamba"])
def test_a_bf16_model_with_fp32_ssm_parameters_runs_the_cuda_kernels(name, tmp_path):
    """On a GPU, a bf16 model loaded with from_pretrained keeps A_log / D in fp32: the scan kernels (forward and
    backward), the fused decode step and generate(cuda_graph=True) take them, and the logits stay those of the fp32
    model up to bf16 rounding."""
    reference = tiny(name).cuda().eval()
    reference.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    assert {model.get_parameter(n).dtype for n in model.keep_in_fp32_names()} == {torch.float32}
    ids = torch.randint(0, 128, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits.float()
    assert_close("bf16 model vs fp32", got, want, 5e-2)
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [model.get_parameter(n).grad for n in model.keep_in_fp32_names()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.eval()
    eager = model.generate(ids, max_new_tokens=8, do_sample=False)
    graph = model.generate(ids, max_new_tokens=8, do_sample=False, cuda_graph=True)
    assert graph.shape == eager.shape == (2, 72)
    assert (graph[:, 64:] == eager[:, 64:]).float().mean() >= 0.75  # greedy up to the kernels' bf16 rounding


def _stepwise_logits(model, ids, mask):
    """Logits of feeding ids [B, T] one token at a time through a cache, with the attention_mask so far."""
    cache, out = None, []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            res = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            out.append(res.logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", TINY)
def test_a_pad_fed_as_a_one_token_step_is_no_step(name, device):
    """A pad fed as a one-token step (a padded prompt fed token by token through a cache, or a finished row fed
    pads) leaves the recurrent state and the conv window as the tokens before it left them, as the one-call prefill
    does: the row [tokens, pads, tokens] gives, at its tokens, the logits of the same row in one call and of the
    row without its pads. Such a step decayed the Mamba / Mamba-2 state and shifted a zero into the conv windows."""
    model = tiny(name).float().to(device)  # (on a GPU: the CUDA conv update and state update kernels' masked step)
    tol = 1e-4 if device == "cpu" else 2e-3
    torch.manual_seed(1)
    ids = torch.randint(1, 512, (2, 10), device=device)
    mask = torch.ones_like(ids)
    mask[0, 3:6] = 0  # [tokens, pads, tokens]
    mask[1, 8:] = 0  # a row that has finished, fed pads
    ids = ids.masked_fill(mask == 0, 0)
    stepped = _stepwise_logits(model, ids, mask)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, mask[0].bool()]).logits
    keep = mask[0].bool()
    assert_close("row 0 stepped vs one call", stepped[0, keep], whole[0, keep], tol)
    assert_close("row 0 stepped vs without pads", stepped[0, keep], alone[0], tol)
    # a finished row's pads leave its state: its next token (fed after the pads) continues as without them
    row = torch.cat([ids[1:, :8], ids[1:, 8:9].fill_(7)], 1)
    more = torch.cat([mask[1:], torch.ones(1, 1, dtype=mask.dtype, device=device)], 1)
    with torch.inference_mode():  # (an inference tensor's mask has no version counter: read at each step)
        after = _stepwise_logits(model, torch.cat([ids[1:], row[:, -1:]], 1), more)[:, -1]
        ref = model(row).logits[:, -1]
    assert_close("row 1 after its pads", after, ref, tol)
