"""generate(cuda_graph=True): zoo.decode.static_generate and its TokenPicker, against transformers' generate.

On CPU the static step runs eagerly (graph=False, StaticDecoder: the step a CUDA graph captures); the cuda tests
replay it in a graph."""

from __future__ import annotations

import pytest
import torch
from test_static_decode import tiny as tiny_model
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from zoo.decode import TokenPicker, static_generate

FAMILIES = ("mamba", "mamba2", "gla", "transformerpp", "jamba")


def tiny(family: str, device: str = "cpu"):
    model = tiny_model(family, device)  # configs/models/<family>-tiny.yaml, seed 0, eval
    model.generation_config.pad_token_id = 0
    return model


def context_sensitive(model):
    """The tiny model with its matrices redrawn at twice the 1/sqrt(fan_in) scale: the seed-0 tiny models decode
    nearly as a function of the last token (their greedy tokens ignore a prompt's padding), these do not."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2 * p.shape[1] ** -0.5)
    return model


def prompt(batch: int = 3, length: int = 10, device: str = "cpu") -> torch.Tensor:
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_generate(family):
    model, ids = tiny(family), prompt()
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    got = static_generate(model, ids, graph=False, attention_mask=torch.ones_like(ids), max_new_tokens=12)
    assert got.shape == (3, 22) and got.dtype == torch.long
    assert torch.equal(got, ref), family


@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_a_config_with_return_dict_false_decodes_as_generate(family):
    # transformers' return_dict=False (from_pretrained(..., return_dict=False), for exports) makes the forward return
    # a tuple; generate asks each step for an output object, and so must the static decode, its prefill and the
    # eager decoder: they read out.logits and failed with "'tuple' object has no attribute 'logits'"
    from zoo.decode import EagerDecoder, prefill

    model, ids = tiny(family), prompt()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    first = prefill(model, ids)
    eager = torch.cat([first.next_ids, EagerDecoder(model, first).decode(4)], dim=1)
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)
    got = static_generate(model, ids, graph=False, attention_mask=mask, max_new_tokens=5, prefill_chunk_size=4)
    assert torch.equal(got, ref), family
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)
    state = prefill(model, ids)
    assert torch.equal(torch.cat([state.next_ids, EagerDecoder(model, state).decode(4)], dim=1), eager)


@pytest.mark.parametrize("check_every", [1, 8])
@pytest.mark.parametrize("family", ["mamba", "transformerpp"])
def test_eos_pads_and_stops_as_generate(family, check_every):
    model, ids = tiny(family), prompt()
    free = model.generate(ids, max_new_tokens=12, do_sample=False)[:, 10:]
    # row 0 ends at its 3rd new token, row 1 at its 5th (unless those tokens come sooner), row 2 never: no early stop
    eos = [int(free[0, 2]), int(free[1, 4])]
    for eos_ids in (eos, [*eos, int(free[2, 6])]):  # then every row ends: the output stops where the last one does
        kwargs = dict(max_new_tokens=12, eos_token_id=eos_ids, pad_token_id=7)
        ref = model.generate(ids, do_sample=False, **kwargs)
        got = static_generate(model, ids, graph=False, check_every=check_every, **kwargs)
        assert torch.equal(got, ref), (family, eos_ids, got, ref)
    assert got.shape[1] < 22 and (got[0, 10 + 3:] == 7).all()


def test_max_length_counts_the_prompt():
    model, ids = tiny("mamba"), prompt()
    assert static_generate(model, ids, graph=False, max_length=15).shape == (3, 15)
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_generate(model, ids, graph=False, max_length=10)


def test_no_length_anywhere_gives_twenty_new_tokens_as_generate():
    """With no max_length or max_new_tokens (in the call, a given generation_config or the model's), generate
    decodes 20 new tokens after the prompt, not 20 in all, and no more than the config's max_position_embeddings
    in all; a prompt that leaves no room is refused by both."""
    model = tiny("mamba")
    for length in (10, 25):
        ids = prompt(3, length)
        ref = model.generate(ids, do_sample=False)
        assert ref.shape == (3, length + 20)
        assert torch.equal(static_generate(model, ids, graph=False), ref), length
    model.config.max_position_embeddings = 30
    ref = model.generate(ids, do_sample=False)
    assert ref.shape == (3, 30)
    assert torch.equal(static_generate(model, ids, graph=False), ref)
    model.config.max_position_embeddings = 25
    for run in (lambda: model.generate(ids, do_sample=False), lambda: static_generate(model, ids, graph=False)):
        with pytest.raises(ValueError, match="max_length"):
            run()


def test_top_k_one_is_greedy():
    model, ids = tiny("gla"), prompt()
    greedy = static_generate(model, ids, graph=False, max_new_tokens=8)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=8, do_sample=True, top_k=1), greedy)


def test_seeded_sampling_repeats():
    model, ids = tiny("jamba"), prompt()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(static_generate(model, ids, graph=False, max_new_tokens=10, do_sample=True, temperature=1.5))
    assert torch.equal(*runs)
    torch.manual_seed(124)
    assert not torch.equal(static_generate(model, ids, graph=False, max_new_tokens=10, do_sample=True,
                                           temperature=1.5), runs[0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.5)])
def test_filtering_equals_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 1, 300, generator=torch.Generator().manual_seed(2)) * 3
    picker = TokenPicker(6, "cpu", do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    ref = logits[:, -1].float()
    for warper in (TemperatureLogitsWarper(temperature) if temperature != 1.0 else None,
                   TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1.0 else None):
        if warper is not None:
            ref = warper(None, ref)
    got = picker.scores(logits)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.allclose(got[~torch.isinf(got)], ref[~torch.isinf(ref)])
    if top_k:
        assert (~torch.isinf(got)).sum(-1).max() <= top_k


def test_samples_follow_the_softmax():
    """20000 draws from one row's logits: each token's frequency within 0.015 of its probability (the binomial
    standard deviation is at most 0.0036), and a token filtered by top-k is never drawn."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20000
    picker = TokenPicker(rows, "cpu", do_sample=True, temperature=0.8, top_k=4)
    out = torch.empty(rows, 1, dtype=torch.long)
    picker(logits.expand(rows, 1, 6), out)
    freq = torch.bincount(out[:, 0], minlength=6).float() / rows
    probs = torch.zeros(6)
    probs[:4] = (logits[:4] / 0.8).softmax(-1)
    assert (freq - probs).abs().max() <= 0.015, (freq, probs)
    assert freq[4:].sum() == 0


def test_finished_rows_get_pad():
    picker = TokenPicker(2, "cpu", eos_token_id=[3], pad_token_id=9)
    out = torch.empty(2, 1, dtype=torch.long)
    logits = torch.full((2, 1, 5), -1.0)
    logits[0, 0, 3] = 1.0  # row 0 picks eos
    logits[1, 0, 1] = 1.0
    picker(logits, out)
    assert out.tolist() == [[3], [1]] and picker.finished.tolist() == [[True], [False]]
    picker(logits, out)
    assert out.tolist() == [[9], [1]]


class Recorder:
    """transformers' streamer protocol (put, end), keeping what it is given."""

    def __init__(self):
        self.seen: list = []

    def put(self, value):
        self.seen.append(value.clone())

    def end(self):
        self.seen.append("end")


@pytest.mark.parametrize("eos", [None, "row"])
def test_a_streamer_sees_what_generate_shows_it(eos):
    model, ids = tiny("mamba2"), prompt(1, 6)
    kwargs = dict(max_new_tokens=9)
    if eos:
        kwargs.update(eos_token_id=int(model.generate(ids, max_new_tokens=9)[0, 6 + 4]), pad_token_id=3)
    ref, got = Recorder(), Recorder()
    model.generate(ids, do_sample=False, streamer=ref, **kwargs)
    static_generate(model, ids, graph=False, streamer=got, **kwargs)
    assert len(got.seen) == len(ref.seen) == (7 if eos else 11)
    for a, b in zip(got.seen, ref.seen):
        assert (a == b) if isinstance(a, str) else torch.equal(a, b), (a, b)


def test_num_return_sequences_repeats_each_row_as_generate():
    model, ids = tiny("transformerpp"), prompt(2, 8)
    kwargs = dict(max_new_tokens=7, do_sample=True, num_return_sequences=3)
    got = static_generate(model, ids, graph=False, top_k=1, **kwargs)
    assert got.shape == (6, 15)
    assert torch.equal(got, model.generate(ids, top_k=1, **kwargs))  # top_k=1 draws the greedy token
    torch.manual_seed(0)
    hot = static_generate(model, ids, graph=False, temperature=5.0, top_k=0, **kwargs)
    assert torch.equal(hot[:, :8], ids.repeat_interleave(3, dim=0))
    assert not torch.equal(hot[0], hot[1])  # each copy samples on its own (512 tokens at temperature 5)


def test_the_picker_is_graph_safe():
    """Sampling with top-k, top-p and eos inside the static step: two steps run the same ops with the same
    arguments and read nothing back on the host (what a CUDA graph capture needs)."""
    from test_static_decode import OpRecorder

    from zoo.decode import DecodeState, StaticDecoder

    model, ids = tiny("transformerpp"), prompt()
    out = model(input_ids=ids, use_cache=True)
    picker = TokenPicker(3, "cpu", do_sample=True, temperature=0.9, top_k=20, top_p=0.8, eos_token_id=[4, 5],
                         pad_token_id=0)
    first = picker(out.logits, torch.empty(3, 1, dtype=torch.long))
    decoder = StaticDecoder(model, DecodeState(out.past_key_values, first, "past_key_values"), max_new_tokens=4,
                            pick=picker)
    decoder._step_body()
    runs, recorder = [], OpRecorder()
    for _ in range(2):
        recorder.calls = []
        with recorder:
            decoder._step_body()
        runs.append(recorder.calls)
    assert runs[0] == runs[1]
    assert not recorder.syncs, sorted(set(recorder.syncs))
    assert any("isin" in name or "eq" in name for name, _ in runs[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=2), "num_beams"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    (dict(num_return_sequences=2), "num_return_sequences"),  # (transformers' own check, or ours)
    (dict(stopping_criteria=[]), "stopping_criteria"),
    (dict(seq_idx=torch.zeros(3, 10, dtype=torch.long)), "seq_idx"),
    (dict(attention_mask=torch.ones(3, 10, dtype=torch.long).index_fill_(1, torch.tensor([9]), 0)), "left padding"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
])
def test_unsupported_settings_raise(kwargs, match):
    model, ids = tiny("transformerpp"), prompt()
    with pytest.raises(ValueError, match=match):
        static_generate(model, ids, graph=False, **kwargs)


def test_empty_suppress_lists_are_off():
    """suppress_tokens=[] (a Hub generation_config may carry it) suppresses nothing in generate: not refused; a
    non-empty list still is."""
    model, ids = tiny("mamba"), prompt()
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    got = static_generate(model, ids, graph=False, max_new_tokens=6, suppress_tokens=[], begin_suppress_tokens=[])
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="suppress_tokens"):
        static_generate(model, ids, graph=False, max_new_tokens=6, suppress_tokens=[7])


def test_cuda_graph_needs_cuda():
    model, ids = tiny("mamba"), prompt()
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(ids, max_new_tokens=4, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_generate_equals_generate(family):
    model, ids = tiny(family, "cuda"), prompt(4, 40, "cuda")
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)
    got = model.generate(ids, max_new_tokens=16, cuda_graph=True)
    assert torch.equal(got, ref), family
    eos = [int(ref[0, 45]), int(ref[1, 47]), int(ref[2, 43]), int(ref[3, 50])]
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=5)
    got = model.generate(input_ids=ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=5, cuda_graph=True)
    assert torch.equal(got, ref), family


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_generate_of_left_padded_rows_equals_generate(family):
    """Left padding in the graph: the decode-attention kernel hides each row's pad slots (its start argument)."""
    model, ids = context_sensitive(tiny(family)).cuda(), prompt(4, 40, "cuda")
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    mask[3, :5] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert not torch.equal(ref, model.generate(ids, max_new_tokens=16, do_sample=False))  # the pads matter
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16, cuda_graph=True), ref), family


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_cuda_graph_sampling_repeats_with_the_seed(family):
    """Sampling inside the graph: a seed repeats its tokens, another seed changes them, and top_k=1 is greedy.
    (The graph's warm-up steps draw numbers too, so its stream is not StaticDecoder's.)"""
    model, ids = tiny(family, "cuda"), prompt(4, 20, "cuda")
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(model.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.9, cuda_graph=True))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]), family
    greedy = model.generate(ids, max_new_tokens=12, cuda_graph=True)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, cuda_graph=True), greedy)

def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    return peft_model.eval()


def test_a_peft_model_passes_cuda_graph_through():
    """PEFT's generate hands cuda_graph to the zoo model's (on CPU: the refusal that names CUDA), and the static
    step decodes through the LoRA layers as generate does."""
    model, ids = lora(tiny("mamba")), prompt()
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(input_ids=ids, max_new_tokens=4, cuda_graph=True)
    ref = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(static_generate(model.get_base_model(), ids, graph=False, max_new_tokens=6), ref)


@pytest.mark.cuda
def test_cuda_graph_generate_through_peft():
    model, ids = lora(tiny("jamba", "cuda")), prompt(2, 16, "cuda")
    ref = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=10, cuda_graph=True), ref)


def test_prompt_tuning_is_refused_rather_than_dropped():
    """PEFT's prompt learning adds its virtual tokens in the prepare_inputs_for_generation it swaps in for the call;
    the static decode would run without them (other tokens, no error)."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny("transformerpp"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt, prefix or P-tuning"):
        model.generate(input_ids=prompt(), max_new_tokens=4, cuda_graph=True)
    # PEFT puts the model's own method back on the instance: the model alone decodes in a graph again
    base = model.get_base_model()
    assert base.__dict__["prepare_inputs_for_generation"].__func__ is type(base).prepare_inputs_for_generation
    with pytest.raises(ValueError, match="CUDA"):
        base.generate(input_ids=prompt(), max_new_tokens=4, cuda_graph=True)


@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_prefill_in_chunks_decodes_the_same(family):
    model, ids = tiny(family), prompt(2, 23)
    whole = static_generate(model, ids, graph=False, max_new_tokens=6)
    widths = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    chunked = static_generate(model, ids, graph=False, max_new_tokens=6, prefill_chunk_size=8)
    handle.remove()
    assert widths == [8, 8, 7, 1, 1, 1, 1, 1] and torch.equal(chunked, whole)


def test_a_given_generation_config_takes_the_models_unset_settings_as_generate():
    from transformers import GenerationConfig

    model, ids = tiny("gla"), prompt()
    free = model.generate(ids, max_new_tokens=10, do_sample=False)[:, 10:]
    model.generation_config.eos_token_id = [int(free[0, 1]), int(free[1, 3]), int(free[2, 2])]
    given = GenerationConfig(max_new_tokens=10)  # no eos: the model's applies
    ref = model.generate(ids, generation_config=given)
    got = static_generate(model, ids, given, graph=False)
    assert torch.equal(got, ref) and got.shape[1] < 20


@pytest.mark.parametrize("form", ["int", "list", "tensor", "0-d tensor"])
def test_eos_token_id_as_generate_takes_it(form):
    """generate takes eos_token_id as an int, a list or a tensor (1-d or 0-d), with or without pad_token_id (then
    eos[0] pads)."""
    model, ids = tiny("transformerpp"), prompt()
    free = model.generate(ids, max_new_tokens=6, do_sample=False)[:, 10:]
    first, second = int(free[0, 2]), int(free[1, 0])
    eos = {"int": first, "list": [first, second], "tensor": torch.tensor([first, second]),
           "0-d tensor": torch.tensor(first)}[form]
    for pad in (7, None):
        model.generation_config.pad_token_id = pad
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos)
        assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=6, eos_token_id=eos), ref), pad


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, top_h=0.3), "top_h"),  # generate samples from the Top-H set
    (dict(do_sample=True, min_p=0.1), "min_p"),  # (greedy decoding ignores these: see below)
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),  # contrastive search (from the Hub)
    (dict(dola_layers="high"), "dola_layers"),  # DoLa (from the Hub)
    (dict(force_words_ids=[[5]]), "force_words_ids"),  # constrained beam search (from the Hub)
    (dict(constraints=[]), "constraints"),
    (dict(use_mtp=True), "use_mtp"),  # multi-token-prediction assisted decoding
    (dict(token_healing=True), "token_healing"),  # rewrites the prompt's tail
])
def test_settings_generate_honours_are_refused_not_ignored(kwargs, match):
    """Each of these changes what generate does (or makes it refuse); the static decode would silently run plain
    greedy decoding or sampling instead."""
    model, ids = tiny("transformerpp"), prompt()
    with pytest.raises(ValueError, match=match):
        static_generate(model, ids, graph=False, max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("given", [{}, {"top_k": None}, {"top_k": 5}, {"top_k": 0}])
def test_sampling_keeps_the_top_k_generate_keeps(given, monkeypatch):
    """generate fills an unset top_k with its default (50) before the keyword arguments: top_k=None passed to it
    means no top-k filtering, not the default's."""
    import transformers.generation.utils as generation

    import zoo.decode

    kept = {}

    class TopK(generation.TopKLogitsWarper):
        def __init__(self, top_k, **kwargs):
            kept["generate"] = top_k
            super().__init__(top_k, **kwargs)

    class Picker(TokenPicker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            kept["static"] = self.top_k or 0

    monkeypatch.setattr(generation, "TopKLogitsWarper", TopK)
    monkeypatch.setattr(zoo.decode, "TokenPicker", Picker)
    model, ids = tiny("mamba"), prompt()
    model.generate(ids, max_new_tokens=2, do_sample=True, **given)
    static_generate(model, ids, graph=False, max_new_tokens=2, do_sample=True, **given)
    assert kept["static"] == kept.get("generate", 0), kept


@pytest.mark.parametrize("kwargs", [dict(typical_p=0.9), dict(min_p=0.1), dict(epsilon_cutoff=1e-3),
                                    dict(eta_cutoff=1e-3), dict(top_h=0.3),
                                    dict(do_sample=True, top_k=1, min_p=0.0)])  # min_p=0 keeps every token
def test_warpers_that_change_nothing_are_taken(kwargs):
    """generate applies these warpers only when sampling (a model's generation_config may set them, and a greedy
    call leave them there): greedy decoding ignores them, as does a min_p of 0."""
    model, ids = tiny("gla"), prompt()
    ref = model.generate(ids, max_new_tokens=5, **kwargs)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=5, **kwargs), ref)


@pytest.mark.parametrize("kwargs", [dict(output_scores=True), dict(output_logits=True),
                                    dict(output_hidden_states=True)])
def test_output_flags_without_a_dict_output_are_taken(kwargs):
    """generate collects scores, logits and hidden states only for a GenerateOutput: without
    return_dict_in_generate it returns the same tensor of ids (a Hub generation_config may carry these flags)."""
    model, ids = tiny("mamba"), prompt()
    ref = model.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)
    assert torch.is_tensor(ref)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=4, **kwargs), ref)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        static_generate(model, ids, graph=False, max_new_tokens=4, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("given", [False, True])
def test_a_legacy_hybrid_cache_implementation_of_the_checkpoint_is_dropped_as_generate_drops_it(given):
    """A Gemma-2 checkpoint's generation_config.json carries cache_implementation="hybrid" (zoo.surgery copies the
    base's generation_config onto the hybrid): generate's merge of the settings drops it and decodes, the static
    decode merged them by hand and refused it ("does not support cache_implementation='hybrid'")."""
    from transformers import GenerationConfig

    model, ids = tiny("jamba"), prompt()
    model.generation_config.cache_implementation = "hybrid"
    config = GenerationConfig(max_new_tokens=5, do_sample=False) if given else None
    kwargs = {} if given else dict(max_new_tokens=5, do_sample=False)
    ref = model.generate(ids, generation_config=config, **kwargs)
    assert torch.equal(static_generate(model, ids, config, graph=False, **kwargs), ref)


def test_arguments_given_as_none_are_not_given():
    """generate treats an argument passed as None as one not passed (its own: logits_processor, stopping_criteria,
    ...; the model's: past_key_values, inputs_embeds, ...), as wrappers that forward every argument pass them."""
    model, ids = tiny("mamba2"), prompt()
    nones = dict(logits_processor=None, stopping_criteria=None, prefix_allowed_tokens_fn=None, synced_gpus=None,
                 assistant_model=None, negative_prompt_ids=None, custom_generate=None, past_key_values=None,
                 inputs_embeds=None, position_ids=None, labels=None)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, **nones)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=5, **nones), ref)


def test_min_length_without_eos_changes_nothing():
    """generate's min_length and min_new_tokens only hold back eos: without one it decodes as if they were unset;
    with one they are refused (the static decode does not mask eos)."""
    model, ids = tiny("mamba"), prompt()
    for kwargs in (dict(min_length=14), dict(min_new_tokens=3)):
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, **kwargs)
        assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=5, **kwargs), ref), kwargs
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            static_generate(model, ids, graph=False, max_new_tokens=5, eos_token_id=3, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(min_length=10), dict(min_length=14, min_new_tokens=0)])
def test_a_min_length_the_prompt_already_reaches_is_taken(kwargs):
    """generate holds eos back only while the sequence, prompt included, is shorter than min_length (and a set
    min_new_tokens replaces min_length by the prompt's length plus it): here the first new token may be eos."""
    model, ids = tiny("mamba"), prompt()
    eos = int(model.generate(ids, max_new_tokens=5, do_sample=False)[0, 10])  # row 0 ends at once
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=7, **kwargs)
    assert ref[0, 11] == 7
    got = static_generate(model, ids, graph=False, max_new_tokens=5, eos_token_id=eos, pad_token_id=7, **kwargs)
    assert torch.equal(got, ref)


def test_the_prompt_given_twice_is_refused():
    model, ids = tiny("mamba"), prompt()
    with pytest.raises(ValueError, match="given twice"):
        model.generate(ids, input_ids=ids, max_new_tokens=3, cuda_graph=True)
    with pytest.raises(ValueError, match="given twice"):
        model.generate(inputs=ids, input_ids=ids, max_new_tokens=3, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):  # once, by any name: on to the device check
        model.generate(inputs=ids, max_new_tokens=3, cuda_graph=True)


def test_a_generation_config_passed_positionally_is_read():
    """generate(inputs, generation_config, ...): cuda_graph=True read the second positional argument as an error."""
    from transformers import GenerationConfig

    model, ids = tiny("mamba"), prompt()
    with pytest.raises(ValueError, match="num_beams=2"):  # read before the device check
        model.generate(ids, GenerationConfig(num_beams=2, max_new_tokens=3), cuda_graph=True)
    with pytest.raises(TypeError, match="multiple values"):
        model.generate(ids, GenerationConfig(), generation_config=GenerationConfig(), cuda_graph=True)


@pytest.mark.parametrize("max_time", [0.0, 1e6])
def test_max_time_stops_as_generate(max_time):
    """generate's MaxTimeCriteria reads the clock after each token, the first included: max_time=0 gives one."""
    model, ids = tiny("mamba"), prompt()
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, max_time=max_time)
    got = static_generate(model, ids, graph=False, max_new_tokens=6, max_time=max_time)
    assert got.shape[1] == ids.shape[1] + (1 if max_time == 0 else 6)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("kwargs", [dict(penalty_alpha=0.6, do_sample=True), dict(penalty_alpha=0.6, top_k=1),
                                    dict(synced_gpus=False), dict(tokenizer=object())])
def test_settings_generate_ignores_here_are_taken(kwargs):
    """penalty_alpha means contrastive search only for greedy decoding with top_k > 1; synced_gpus=False is
    generate's default; a tokenizer serves stop_strings alone. generate decodes as without them."""
    model, ids = tiny("transformerpp"), prompt()
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "tokenizer"}  # (generate wants a real one)
    ref = model.generate(ids, max_new_tokens=4, **ref_kwargs) if "do_sample" not in kwargs else None
    got = static_generate(model, ids, graph=False, max_new_tokens=4, **kwargs)
    assert got.shape == (3, 14)
    if ref is not None:
        assert torch.equal(got, ref)


def ascii_prompt(batch: int = 4, length: int = 6) -> torch.Tensor:
    """Printable ASCII bytes (the ByteTokenizer's ids): the seed-0 tiny models then repeat each row's last byte."""
    return torch.randint(32, 127, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["mamba", "transformerpp"])
@pytest.mark.parametrize("check_every", [1, 8])
def test_stop_strings_stop_rows_as_generate(family, check_every):
    """stop_strings with a tokenizer, as generate's StopStringCriteria: a row whose text (its prompt's included)
    ends with one has ended. Without an eos_token_id generate pads no row and stops when every row has ended; with
    one, an ended row's later tokens are pad_token_id. Without the tokenizer it is refused, as generate refuses."""
    from zoo.data import ByteTokenizer

    model, ids, tok = tiny(family), ascii_prompt(), ByteTokenizer()
    free = model.generate(ids, max_new_tokens=16, do_sample=False)[:, 6:]
    text = [tok.decode(row) for row in free]
    one = [text[1][:3]]  # row 1 only, at its third new token
    every = [text[0][:1] * 2, text[1][:3], text[2][:5], text[3][:4]]  # every row (some meet their prompt's end)
    cases = [dict(stop_strings=one), dict(stop_strings=every),
             dict(stop_strings=one, eos_token_id=tok.eos_token_id, pad_token_id=7),
             dict(stop_strings="".join(every[2]), eos_token_id=tok.eos_token_id, pad_token_id=7)]
    for kwargs in cases:
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, tokenizer=tok, **kwargs)
        got = static_generate(model, ids, graph=False, check_every=check_every, max_new_tokens=16, tokenizer=tok,
                              **kwargs)
        assert torch.equal(got, ref), (family, kwargs, got, ref)
    assert got.shape == (4, 6 + 16) and (got[2, 6 + 5:] == 7).all()  # the last case: row 2 padded after its hit
    short = static_generate(model, ids, graph=False, max_new_tokens=16, tokenizer=tok, stop_strings=every)
    assert short.shape[1] < 6 + 16  # every row ended: stopped where the last one did (equal to generate's above)
    with pytest.raises(ValueError, match="tokenizer"):
        static_generate(model, ids, graph=False, max_new_tokens=4, stop_strings=one)


@pytest.mark.parametrize("stops", [[""], ""])
def test_an_empty_stop_string_stops_at_once_as_generate(stops):
    # generate's StopStringCriteria finds an empty stop string at every step, so each row ends at its first token; the
    # static decode read a window of maximum_token_len = 0 tokens and failed in the criterion ('amax(): Expected
    # reduction dim 1 to have non-zero size')
    from zoo.data import ByteTokenizer

    model, ids, tok = tiny("mamba"), ascii_prompt(), ByteTokenizer()
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, tokenizer=tok, stop_strings=stops)
    got = static_generate(model, ids, graph=False, max_new_tokens=8, tokenizer=tok, stop_strings=stops)
    assert ref.shape[1] == ids.shape[1] + 1 and torch.equal(got, ref)


@pytest.mark.parametrize("kwargs,match", [(dict(synced_gpus=True), "synced_gpus"),
                                          (dict(prefill_chunk_size=0), "prefill_chunk_size")])
def test_settings_that_would_change_the_decode_are_refused(kwargs, match):
    model, ids = tiny("mamba"), prompt()
    with pytest.raises(ValueError, match=match):
        static_generate(model, ids, graph=False, max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("family", ["mamba", "mamba2", "gla"])
def test_left_padded_rows_of_a_recurrent_model_decode_as_generate(family, chunk):
    """A recurrent step has no position: once the prefill has kept the pads out of the states (their inputs
    zeroed, as generate's prefill does), left-padded rows decode together. The tokens equal generate's."""
    model, ids = context_sensitive(tiny(family)), prompt()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    # (the pads keep random tokens: a pad that reached a state would change the tokens after it)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, prefill_chunk_size=chunk)
    assert not torch.equal(ref, model.generate(ids, max_new_tokens=8, do_sample=False))  # the pads matter
    got = static_generate(model, ids, graph=False, attention_mask=mask, max_new_tokens=8, prefill_chunk_size=chunk)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("family", ["transformerpp", "jamba"])
def test_left_padded_rows_with_attention_decode_as_generate(family, window):
    """The static KV cache hides each row's pad slots (StaticKVLayer.start) and its positions count from the row's
    first token (the decoder's pos): the tokens equal generate's with the same mask, with a sliding window too."""
    model, ids = context_sensitive(tiny(family)), prompt()
    if window:
        for block in model.model.layers:
            if hasattr(block.mixer, "window"):
                block.mixer.window = window
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :9] = 0  # one real token
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert not torch.equal(ref, model.generate(ids, max_new_tokens=8, do_sample=False))  # the pads matter
    got = static_generate(model, ids, graph=False, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", ["mamba", "transformerpp"])
def test_pad_tokens_of_a_prompt_without_attention_mask_are_masked_as_generate(family):
    """generate given no attention_mask infers one from the prompt's pad_token_id tokens, unless the pad is an eos
    (then it cannot tell them apart and masks nothing)."""
    model, ids = context_sensitive(tiny(family)), prompt()
    ids[0, :4] = 0  # tiny's pad_token_id
    kwargs = dict(max_new_tokens=8, do_sample=False)
    masked = model.generate(ids, attention_mask=(ids != 0).long(), **kwargs)
    unmasked = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert not torch.equal(masked, unmasked)  # the pads matter
    assert torch.equal(model.generate(ids, **kwargs), masked)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=8), masked)
    ref = model.generate(ids, eos_token_id=0, **kwargs)
    assert not torch.equal(ref, model.generate(ids, attention_mask=(ids != 0).long(), eos_token_id=0, **kwargs))
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=8, eos_token_id=0), ref)


@pytest.mark.parametrize("family", ["jamba", "transformerpp"])
def test_padding_after_tokens_with_attention_is_refused(family):
    model, ids = tiny(family), prompt()
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        static_generate(model, ids, graph=False, attention_mask=mask, max_new_tokens=3)


def _kept(model):
    from zoo.decode import _GRAPH_ENTRY

    return model.__dict__.get(_GRAPH_ENTRY)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kept_decoder_decodes_later_prompts_as_a_fresh_one(family):
    """reuse=True (generate(cuda_graph="reuse")): the second and third calls reload the first call's buffers in
    place (the addresses a graph replays) and give the tokens a fresh decoder gives."""
    model = context_sensitive(tiny(family))
    first = None
    for seed, length in ((1, 10), (2, 7), (3, 12)):
        ids = torch.randint(1, 512, (3, length), generator=torch.Generator().manual_seed(seed))
        want = static_generate(model, ids, graph=False, max_new_tokens=6)
        got = static_generate(model, ids, graph=False, max_new_tokens=6, reuse=True)
        assert torch.equal(got, want), (family, seed)
        entry = _kept(model)
        addresses = [t.data_ptr() for t in entry.decoder.states] + \
            [t.data_ptr() for layer in entry.decoder.static for t in (layer.keys, layer.values, layer.length)]
        if first is None:
            first = (entry, addresses)
        assert entry is first[0] and addresses == first[1], "the kept decoder and its buffers serve every call"


def write_ssm_weights_through_data(model) -> None:
    """New A and Δ bias for every Mamba / Mamba-2 layer, written through .data as PEFT's merge and EMA copies write
    (address and version kept); long steps, so that A matters."""
    for block in model.model.layers:
        if hasattr(block.mixer, "A_log"):
            block.mixer.A_log.data.fill_(-3.0)
            bias = block.mixer.dt_bias if hasattr(block.mixer, "dt_bias") else block.mixer.dt_proj.bias
            bias.data.fill_(2.0)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_a_kept_decoder_reads_weights_written_through_data(family):
    """Weights written through .data (PEFT's merge, an EMA copy) keep their addresses and versions: the kept decoder's
    next prefill (a new sequence) writes the decoded constants (Mamba's A, Mamba-2's A) afresh where its step reads
    them. The cuda test below checks the same through a kept graph."""
    model = context_sensitive(tiny(family))
    ids = torch.randint(1, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    static_generate(model, ids, graph=False, max_new_tokens=6, reuse=True)
    entry = _kept(model)
    write_ssm_weights_through_data(model)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    want = static_generate(fresh, ids, graph=False, max_new_tokens=6)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=6, reuse=True), want), family
    assert _kept(model) is entry, "the same kept decoder served the call"


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_an_in_place_update_is_written_into_the_kept_decoded_constants(family):
    """An optimizer step between two cuda_graph="reuse" calls updates parameters in place (same address, new
    version): the kept graph stays, so the decoded constants it reads (Mamba's step constants, Mamba-2's A) must be
    written where they are, not made anew elsewhere (the graph would read the old tensor, freed)."""
    model = context_sensitive(tiny(family))
    ids = torch.randint(1, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    static_generate(model, ids, graph=False, max_new_tokens=6, reuse=True)
    key = "_A" if family == "mamba2" else "_step_constants"
    mixer = model.model.layers[0].mixer
    kept = [t for t in (mixer.__dict__[key][1] if family == "mamba" else (mixer.__dict__[key][1],)) if t is not None]
    with torch.no_grad():
        for block in model.model.layers:
            block.mixer.A_log.add_(1.5)  # as an optimizer step: in place, the version moves
            bias = block.mixer.dt_bias if family == "mamba2" else block.mixer.dt_proj.bias
            bias.fill_(2.0)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    want = static_generate(fresh, ids, graph=False, max_new_tokens=6)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=6, reuse=True), want), family
    now = mixer.__dict__[key][1]
    assert all(a is b for a, b in zip(kept, now if family == "mamba" else (now,))), "the same tensors, rewritten"


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_prefill_writes_the_kept_step_constants_afresh(family):
    """A kept CUDA graph replays the steps without their Python: between two cuda_graph="reuse" calls only the
    prefill runs, so it must write the step constants (Mamba's A, D and conv weight, Mamba-2's conv weight, D and
    dt_bias in fp32) afresh into the tensors the graph reads. Only the steps made them, so after an optimizer step or
    writes through .data the graph read the old ones. (fp64 weights: Mamba-2's fp32 constants are copies.)"""
    model = context_sensitive(tiny(family)).double()
    ids = torch.randint(1, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    static_generate(model, ids, graph=False, max_new_tokens=4, reuse=True)
    mixers = [block.mixer for block in model.model.layers]
    kept = [m.__dict__["_step_constants"][1] for m in mixers]
    with torch.no_grad():
        for m in mixers:
            m.A_log.add_(0.5)  # as an optimizer step: in place, the version moves
            m.D.data.fill_(0.5)  # as PEFT's merge or an EMA copy: same storage, same version
            m.conv1d.weight.data.mul_(2.0)
            bias = m.dt_bias if family == "mamba2" else m.dt_proj.bias
            bias.data.fill_(2.0)
        model(ids, use_cache=True)  # the prefill: all a kept graph's call runs before its replays
    for m, before in zip(mixers, kept):
        now = m.__dict__["_step_constants"][1]
        assert all(a is b for a, b in zip(before, now)), "the tensors a graph reads, rewritten in place"
        w = m.conv1d.weight[:, 0, :].float()
        want = ((-torch.exp(m.A_log.float()), m.D.float(), w) if family == "mamba"
                else (w, m.conv1d.bias.float(), m.D.float(), m.dt_bias.float()))
        for name, got, value in zip(("first", "second", "third", "fourth"), now, want):
            assert torch.equal(got, value), f"{family}: the {name} step constant is the old weights'"


@pytest.mark.parametrize("family", ["transformerpp", "jamba"])
def test_a_kept_decoder_reloaded_with_other_left_padding_decodes_as_a_fresh_one(family):
    """Two left-padded calls with reuse=True, their rows padded differently: the second reloads the first's decoder
    (its pads' slots hidden, each row's positions counted from its first token again) and gives a fresh decoder's
    tokens."""
    model, ids = context_sensitive(tiny(family)), prompt()
    first = None
    for padded in ({0: 3}, {1: 5, 2: 2}):
        mask = torch.ones_like(ids)
        for row, pads in padded.items():
            mask[row, :pads] = 0
        want = static_generate(model, ids, graph=False, attention_mask=mask, max_new_tokens=6)
        got = static_generate(model, ids, graph=False, attention_mask=mask, max_new_tokens=6, reuse=True)
        assert torch.equal(got, want), padded
        first = first or _kept(model)
        assert _kept(model) is first, "the kept decoder served both calls"


def test_a_kept_decoder_is_replaced_when_the_call_needs_another():
    """More tokens than its room, another batch, padding, other sampling settings or a replaced parameter each
    capture anew; an in-place weight update is read by the kept step (its address is unchanged)."""
    from zoo.decode import release_graph

    model, ids = context_sensitive(tiny("jamba")), prompt()
    static_generate(model, ids, graph=False, max_new_tokens=4, reuse=True)
    entry = _kept(model)
    assert entry.room == 256
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for kwargs in (dict(max_new_tokens=250), dict(input_ids=ids[:2]), dict(attention_mask=mask),
                   dict(do_sample=True, top_k=3)):
        kwargs = {"max_new_tokens": 4, **kwargs}
        call_ids = kwargs.pop("input_ids", ids)
        want = static_generate(model, call_ids, graph=False, **kwargs)
        torch.manual_seed(0)
        got = static_generate(model, call_ids, graph=False, reuse=True, **kwargs)
        if not kwargs.get("do_sample"):
            assert torch.equal(got, want), kwargs
        assert _kept(model) is not entry, kwargs
        entry = _kept(model)
    static_generate(model, ids, graph=False, max_new_tokens=4, reuse=True)
    entry = _kept(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # in place: the kept step reads the new weights
    want = static_generate(model, ids, graph=False, max_new_tokens=4)
    assert torch.equal(static_generate(model, ids, graph=False, max_new_tokens=4, reuse=True), want)
    assert _kept(model) is entry
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # replaced: captured anew
    static_generate(model, ids, graph=False, max_new_tokens=4, reuse=True)
    assert _kept(model) is not entry
    assert release_graph(model) and _kept(model) is None and not release_graph(model)


def test_a_kept_decoder_starts_each_call_with_no_row_finished():
    """The picker's eos state belongs to the call: rows that ended in one call start the next one unfinished."""
    model, ids = tiny("mamba"), prompt()
    ref = static_generate(model, ids, graph=False, max_new_tokens=8)
    eos = int(ref[0, 11])  # row 0's second new token ends it
    for _ in range(2):
        want = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=5)
        got = static_generate(model, ids, graph=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=5,
                              reuse=True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "gla", "jamba"])
def test_a_kept_decoder_decodes_a_new_prompt_with_its_own_window_carry(family):
    """Under the window mitigation a step reads the cache's carried inputs of the last r - 1 tokens
    (zoo.state.mitigation): a kept decoder (reuse=True) reloaded the new prompt's states but kept the previous call's
    carry, so its steps continued the new prompt with the old sequence's last tokens."""
    from zoo.state import apply_mitigation

    model = context_sensitive(tiny(family))
    apply_mitigation(model, "window:r=3")
    first = prompt()
    second = torch.randint(1, 512, first.shape, generator=torch.Generator().manual_seed(7))
    want = static_generate(model, second, graph=False, max_new_tokens=8)
    static_generate(model, first, graph=False, max_new_tokens=8, reuse=True)
    assert torch.equal(static_generate(model, second, graph=False, max_new_tokens=8, reuse=True), want), family
    with torch.no_grad():
        assert torch.equal(model.generate(second, max_new_tokens=8, do_sample=False), want), family


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_a_kept_decoder_is_dropped_when_a_mitigation_changes(family):
    """A kept CUDA graph replays its steps without their Python, so it decodes with the mitigation in effect at its
    capture: one set, changed or cleared afterwards (zoo.state.apply_mitigation) reached the call's prefill but not
    its steps. The kept decoder's key now holds every recurrent mixer's mitigation: such a call captures afresh."""
    from types import SimpleNamespace

    from zoo.decode import _GRAPH_ENTRY, _graph_key, _reusable_entry
    from zoo.state import apply_mitigation, calibrate_norm_threshold, recurrent_mixers

    model, ids = tiny(family), prompt()
    call = (False, ids.shape[0], ids.device, "settings", False)
    for spec in (None, "forget:c_alpha=0.99", "forget:c_alpha=0.9", "norm:threshold=3", "none", "calibrated"):
        if spec == "calibrated":  # a per-head threshold tensor
            calibrate_norm_threshold(model, ids)
        else:
            apply_mitigation(model, spec)
        assert _reusable_entry(model, call, 16) is None, spec  # the one kept under the previous mitigation is dropped
        model.__dict__[_GRAPH_ENTRY] = SimpleNamespace(key=_graph_key(model, call), room=256)
        assert _reusable_entry(model, call, 16) is not None, spec  # the same settings keep it
    with torch.no_grad():
        for mixer in recurrent_mixers(model):
            mixer.mitigation["threshold"] *= 2  # the calibrated thresholds changed in place
    assert _reusable_entry(model, call, 16) is None


def test_reuse_refuses_peft_adapters_and_bad_values():
    model, ids = tiny("mamba"), prompt()
    with pytest.raises(ValueError, match="PEFT adapters"):
        static_generate(lora(model).base_model.model, ids, graph=False, max_new_tokens=3, reuse=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        model.generate(ids, max_new_tokens=3, cuda_graph="yes")


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_reuse_equals_generate_call_after_call(family):
    model = context_sensitive(tiny(family)).cuda()
    for seed, length in ((1, 30), (2, 17), (3, 40)):
        ids = torch.randint(1, 512, (4, length), generator=torch.Generator().manual_seed(seed)).cuda()
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=12, cuda_graph="reuse"), ref), (family, seed)
    assert model.release_cuda_graph()


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_cuda_graph_reuse_reads_weights_written_through_data(family):
    """A kept graph replays with the decoded constants (Mamba's A, Mamba-2's A) its capture read: weights written
    through .data (PEFT's merge, an EMA copy) keep their addresses and versions, and the next call's prefill (a new
    sequence) writes the constants afresh into the tensors the graph reads."""
    model = context_sensitive(tiny(family)).cuda()
    ids = torch.randint(1, 512, (4, 20), generator=torch.Generator().manual_seed(1)).cuda()
    model.generate(ids, max_new_tokens=8, cuda_graph="reuse")
    write_ssm_weights_through_data(model)
    fresh = AutoModelForCausalLM.from_config(model.config).cuda().eval()
    fresh.load_state_dict(model.state_dict())
    ref = fresh.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, cuda_graph="reuse"), ref), family
    with torch.no_grad():  # then as an optimizer step: in place, the versions move, the graph is kept
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.5)
    fresh.load_state_dict(model.state_dict())
    ref = fresh.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, cuda_graph="reuse"), ref), family
    assert model.release_cuda_graph()


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_cuda_graph_stop_strings_equal_generate(family):
    """The stop strings' check runs between graph replays and ORs its rows into the picker's finished buffer, which
    the captured step reads: with eos, a row that met a stop string is padded from its next token on."""
    from zoo.data import ByteTokenizer

    model, ids, tok = tiny(family).cuda(), ascii_prompt().cuda(), ByteTokenizer()
    text = [tok.decode(row) for row in model.generate(ids, max_new_tokens=16, do_sample=False)[:, 6:]]
    for kwargs in (dict(stop_strings=[text[1][:3]], eos_token_id=tok.eos_token_id, pad_token_id=7),
                   dict(stop_strings=[text[0][:2], text[1][:3], text[2][:5], text[3][:4]])):
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, tokenizer=tok, **kwargs)
        got = model.generate(ids, max_new_tokens=16, tokenizer=tok, cuda_graph=True, **kwargs)
        assert torch.equal(got, ref), (family, kwargs)
