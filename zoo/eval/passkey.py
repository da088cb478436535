"""Passkey retrieval over a grid of context lengths x needle depths (Stuffed Mamba / InfiniteBench style).

A prompt is ``PREFIX + filler ... NEEDLE ... filler + SUFFIX`` built to a target number of tokens with any
tokenizer that has ``encode(text) -> ids`` and ``decode(ids) -> text``. The model decodes greedily a few
tokens and is right only if the first number it writes is exactly the 5-digit key. ``main(argv)`` is
``zoo eval passkey``: accuracy table (CSV, markdown, JSON) and a heatmap PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.cache import output_cache
from zoo.eval.common import (
    accepts_argument,
    add_device_arguments,
    check_positions,
    check_token_ids,
    check_tokenizer,
    chunk_positions,
    encode_with_bos,
    format_size,
    interruption_says,
    load_model,
    load_tokenizer,
    markdown_table,
    model_device,
    model_fingerprint,
    number_list,
    positive_int,
    pyplot,
    resume,
    save_figure,
    sigterm_interrupts,
    tokenizer_fingerprint,
    tokenizer_name,
    trained_with_bos,
    write_json,
    write_rows,
    write_text_atomically,
)

# template of Stuffed Mamba (Chen et al. 2024, arXiv:2410.07145; after InfiniteBench); the filler is the
# landmark-attention "garbage" InfiniteBench repeats, cycled one sentence at a time so the needle can sit between
# any two
PREFIX = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey.\n"
SUFFIX = "\nWhat is the pass key? The passkey is"
FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)


@dataclass
class PasskeyPrompt:
    """One prompt: its text, token ids [T], the key, and where the needle went."""

    text: str
    input_ids: list[int]
    key: int
    depth: float
    n_filler: int  # filler sentences in the prompt
    needle_after: int  # filler sentences before the needle


def passkey_text(key: int, n_filler: int, needle_after: int, filler: Sequence[str] = FILLER) -> str:
    """The prompt text with ``n_filler`` filler sentences and the needle after the first ``needle_after``."""
    sentences = [filler[i % len(filler)] for i in range(n_filler)]
    before = "".join(s + " " for s in sentences[:needle_after])
    after = " ".join(sentences[needle_after:])
    return PREFIX + before + NEEDLE.format(key=key) + after + SUFFIX


def build_passkey_prompt(
    tokenizer, context_length: int, depth: float, key: int, filler: Sequence[str] = FILLER,
    n_filler: int | None = None, add_bos: bool = True,
) -> PasskeyPrompt:
    """A prompt of at most ``context_length`` tokens (as close as whole filler sentences allow).

    Args:
        tokenizer: has ``encode(text)`` and ``decode(ids)``; the prompt starts with its BOS token when it
            has one (``encode_with_bos``), and every token counts towards the length.
        context_length: target prompt length in tokens.
        depth: needle position as a fraction of the filler, 0 (start) .. 1 (end).
        key: the 5-digit passkey.
        filler: sentences cycled to fill the context.
        n_filler: start the search here (the count found for another key at the same length).
        add_bos: False for a model trained without BOS (``zoo.eval.common.trained_with_bos``): none is put first.

    Returns:
        the prompt; ``len(input_ids) <= context_length``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")

    def length(n: int) -> int:
        return len(encode_with_bos(tokenizer, passkey_text(key, n, round(depth * n), filler), add_bos))

    base = length(0)
    if base > context_length:
        raise ValueError(f"context_length={context_length} is shorter than the bare template ({base} tokens)")
    per_sentence = max((length(64) - base) / 64, 1.0)  # a filler sentence costs at least one token
    n = max(n_filler if n_filler is not None else int((context_length - base) / per_sentence), 0)
    # secant steps on the measured length, then walk to the largest count that fits
    for _ in range(4):
        current = length(n)
        if n > 0:
            per_sentence = max((current - base) / n, 1.0)
        step = int((context_length - current) / per_sentence)
        if step == 0:
            break
        n = max(n + step, 0)
    while n > 0 and length(n) > context_length:
        n -= 1
    while length(n + 1) <= context_length:
        n += 1
    needle_after = round(depth * n)
    text = passkey_text(key, n, needle_after, filler)
    return PasskeyPrompt(text, encode_with_bos(tokenizer, text, add_bos), key, depth, n, needle_after)


def check_passkey(generated: str, key: int) -> bool:
    """Exact check: the first number in ``generated`` must be the key, digit for digit."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group() == str(key)


# A checkpoint's generation_config.json applies to every generate() call: these would turn greedy decoding into beam
# search or penalise the digits the prompt already holds (the key is written twice in the needle), so they are reset.
GREEDY = {"num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
          "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
          "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
          "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
          "guidance_scale": None, "penalty_alpha": None, "dola_layers": None, "diversity_penalty": None,
          "watermarking_config": None, "stop_strings": None, "token_healing": None,
          # more tokens per prompt, a clock that cuts the decoding short, and methods generate switches to (constrained
          # beams from the Hub, drafted tokens: refused by recurrent models, or a missing MTP head)
          "num_return_sequences": 1, "max_time": None, "constraints": None, "force_words_ids": None,
          "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "use_mtp": False,
          # an output object instead of the token ids, which the new tokens are sliced from
          "return_dict_in_generate": False,
          # what only that object returned, kept at every step (zoo models refuse output_attentions)
          "output_attentions": False, "output_hidden_states": False}


def greedy_overrides(model) -> dict:
    """The ``GREEDY`` keyword arguments this transformers' ``GenerationConfig`` knows (none for a stand-in model
    without a ``generation_config``)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return {key: value for key, value in GREEDY.items() if hasattr(config, key)}


@torch.no_grad()
def greedy_generate(
    model, input_ids: torch.Tensor, max_new_tokens: int = 8, prefill_chunk_size: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` [1, T]; returns the new tokens [1, <= max_new_tokens].

    Without ``prefill_chunk_size`` this is ``model.generate(do_sample=False)``, with the checkpoint's generation
    settings that would change the argmax (beams, repetition penalties, ...) reset (``GREEDY``). With it, the prompt is
    prefilled in chunks that carry the cache (constant memory for recurrent models at 1M tokens) and
    decoding continues token by token from that cache. A model that cannot continue a chunk exactly from its
    cache (transformers' Mamba, ``zoo.decode.continues_chunks_exactly``) raises ValueError; a ``prefill_chunk_size`` in
    its checkpoint's generation_config is reset for it (generate would prefill in those chunks, inexactly).
    """
    from zoo.decode import _dict_output, cache_argument, continues_chunks_exactly

    if prefill_chunk_size is None:
        kwargs = {"pad_token_id": eos_token_id, "eos_token_id": eos_token_id} if eos_token_id is not None else {}
        # the checkpoint's chunked prefill: generate takes it, and transformers' Mamba / Jamba dropped the state of
        # the earlier chunks (slightly wrong tokens, silently), which the argument's check below refuses
        chunk = getattr(getattr(model, "generation_config", None), "prefill_chunk_size", None)
        if chunk is not None and chunk < input_ids.shape[1] and not continues_chunks_exactly(model):
            kwargs["prefill_chunk_size"] = None
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, **greedy_overrides(model), **kwargs)
        return out[:, input_ids.shape[1] :]
    if prefill_chunk_size < input_ids.shape[1] and not continues_chunks_exactly(model):
        raise ValueError(f"{type(model).__name__} cannot continue a multi-token chunk from its cache exactly (a "
                         f"chunked prefill would lose the state of the earlier chunks, the needle with it); leave "
                         f"prefill_chunk_size (--prefill-chunk-size) unset for it")
    arg = cache_argument(model)  # past_key_values, or cache (transformers 5.2x) / cache_params (its old Mamba)
    cache, last = None, None
    keep_last = accepts_argument(model, "logits_to_keep")  # prefill needs only the last position's logits
    output = _dict_output(model)  # an output object also where the config's return_dict is False (as generate asks)
    for start in range(0, input_ids.shape[1], prefill_chunk_size):
        chunk = input_ids[:, start : start + prefill_chunk_size]
        out = model(input_ids=chunk, use_cache=True, **{arg: cache}, **chunk_positions(model, chunk, start),
                    **({"logits_to_keep": 1} if keep_last else {}), **output)
        cache, last = output_cache(out, arg), out.logits[:, -1]
    new_tokens = []
    for step in range(max_new_tokens):
        token = last.argmax(dim=-1, keepdim=True)  # [1, 1]
        new_tokens.append(token)
        # the last new token is not fed back: nothing reads its logits (generate does not feed it either), and its
        # forward was a wasted step that took one position more than the prompt and the tokens before it (a GPT-2 of
        # just those positions failed in its wpe, 'IndexError: index out of range in self')
        if step == max_new_tokens - 1 or (eos_token_id is not None and int(token) == eos_token_id):
            break
        out = model(input_ids=token, use_cache=True, **{arg: cache},
                    **chunk_positions(model, token, input_ids.shape[1] + step), **output)
        cache, last = output_cache(out, arg), out.logits[:, -1]
    return torch.cat(new_tokens, dim=1)


def cell_generator(seed: int, length: int, depth: float) -> torch.Generator:
    """The generator of the keys of cell (length, depth): one per cell, so adding a length to a sweep (or running
    a cell alone) leaves every other cell's keys, and so its accuracy, as they were."""
    import numpy as np

    entropy = [seed % 2**64, int(length), round(float(depth) * 10**9)]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))


# the 5-digit keys
KEYS = range(10000, 100000)


def cell_keys(seed: int, length: int, depth: float, n_samples: int) -> list[int]:
    """The ``n_samples`` distinct 5-digit keys of cell (length, depth), from ``cell_generator``: a draw that repeats
    one of the cell's keys is drawn again (a repeat was the same prompt scored twice, which weighed it double in the
    accuracy: about one cell in three of 256 prompts had one), so the keys before the first repeat are as they were."""
    if not 1 <= n_samples <= len(KEYS):
        raise ValueError(f"n_samples={n_samples}: a cell has 1 to {len(KEYS)} prompts, one per distinct 5-digit key")
    generator = cell_generator(seed, length, depth)
    keys: dict[int, None] = {}
    while len(keys) < n_samples:
        keys.setdefault(int(torch.randint(KEYS.start, KEYS.stop, (1,), generator=generator)))
    return list(keys)


def answer_tokens(tokenizer, key: int) -> int:
    """Tokens the answer ``" {key}"`` takes after the prompt's closing "The passkey is" (as the needle writes it)."""
    return (len(encode_with_bos(tokenizer, SUFFIX + f" {key}", add_bos=False))
            - len(encode_with_bos(tokenizer, SUFFIX, add_bos=False)))


def longest_answer(tokenizer, seed: int, cells, n_samples: int) -> int:
    """The most tokens an answer of the grid's ``cells`` ((length, depth) pairs, ``n_samples`` keys each) takes: a
    ``max_new_tokens`` below it cuts those keys short (the byte tokenizer's " 12345" is 6 tokens: 2 or 5 new tokens
    write " 1" or " 1234"), and their prompts are scored wrong whatever the model writes."""
    return max(answer_tokens(tokenizer, key) for length, depth in sorted(cells)
               for key in cell_keys(seed, length, depth, n_samples))


def bare_template_tokens(tokenizer, seed: int, cells, n_samples: int, add_bos: bool = True) -> dict[int, int]:
    """Per length of the grid's ``cells`` ((length, depth) pairs, ``n_samples`` keys each), the most tokens the prompt
    without filler takes with one of its keys: the shortest prompt of that length. A BPE tokenizer writes some 5-digit
    keys in more tokens than others (10000 in fewer than most), so every key is measured."""
    bare: dict[int, int] = {}
    for length, depth in sorted(cells):
        for key in cell_keys(seed, length, depth, n_samples):
            size = len(encode_with_bos(tokenizer, passkey_text(key, 0, 0), add_bos))
            bare[length] = max(bare.get(length, 0), size)
    return bare


def least_over(tokenizer, fits: int, depth: float, key: int, add_bos: bool, n_filler: int | None = None
               ) -> tuple[int, int | None]:
    """(the tokens of the shortest prompt of ``key`` at ``depth`` longer than ``fits`` tokens, the filler sentences of
    the longest that fits or None when none does). A prompt's tokens grow with its filler sentences, and
    ``build_passkey_prompt`` takes as many as its length holds: a length below the first count is given the prompt
    of ``fits`` (it fits), one of at least it a prompt of at least as many tokens (it does not). Only the prompts
    ``build_passkey_prompt`` measures for ``fits`` are built (``n_filler``: where its search starts)."""

    def length(n: int) -> int:
        return len(encode_with_bos(tokenizer, passkey_text(key, n, round(depth * n)), add_bos))

    if (base := length(0)) > fits:
        return base, None
    m = build_passkey_prompt(tokenizer, fits, depth, key, n_filler=n_filler, add_bos=add_bos).n_filler
    return length(m + 1), m


def first_prompt_over(tokenizer, seed: int, lengths, depths, n_samples: int, add_bos: bool, fits: int
                      ) -> tuple[int, int] | None:
    """(length, tokens) of the grid's first length (ascending; ``depths``, ``n_samples`` keys a cell, as
    ``evaluate_passkey`` builds its prompts) with a prompt longer than ``fits`` tokens, and at least how many tokens
    that prompt takes; None when every prompt fits. A prompt takes as many whole filler sentences as its length holds,
    a few tokens fewer than the length: those of lengths up to ``fits`` fit, and those of a longer length fit unless
    one filler sentence more than the prompt of ``fits`` holds also fits the length (``least_over``). Only the
    prompts of ``fits`` are built: those of each length were, and --lengths 1M took seconds to be refused for a GPT-2
    of 1024 positions (a model of learned positions was refused a length whose prompts it held before)."""
    for length in sorted({int(n) for n in lengths}):
        if length <= fits:
            continue
        n_filler = None
        for depth in dict.fromkeys(float(d) for d in depths):
            for key in cell_keys(seed, length, depth, n_samples):
                least, n_filler = least_over(tokenizer, fits, depth, key, add_bos, n_filler)
                if least <= length:
                    return length, least
    return None


def longest_length_within(tokenizer, seed: int, depths, n_samples: int, add_bos: bool, fits: int
                          ) -> tuple[int | None, int]:
    """(the longest length of at most ``fits`` tokens whose keys' prompts without filler fit it, as
    ``evaluate_passkey``'s template check asks, or None when none does; the tokens of the prompt without filler of
    length ``fits``, the most over its keys). Such a length's prompts take at most ``fits`` tokens. A BPE tokenizer
    writes some keys in fewer tokens than others, and the keys change with the length, so the ``SEARCH`` lengths
    below ``fits`` are tried too."""

    def bare(length: int) -> int:
        return max(len(encode_with_bos(tokenizer, passkey_text(key, 0, 0), add_bos)) for depth in
                   dict.fromkeys(float(d) for d in depths) for key in cell_keys(seed, length, depth, n_samples))

    shortest = bare(fits)
    if shortest <= fits:
        return fits, shortest
    return next((n for n in range(fits - 1, max(fits - SEARCH, 0), -1) if bare(n) <= n), None), shortest


SEARCH = 64  # lengths below the positions tried for one the template check takes (keys differ by a few tokens)


def positions_refusal(tokenizer, seed: int, lengths, depths, n_samples: int, add_bos: bool, max_new_tokens: int,
                      positions: int, option: str) -> tuple[int, str, str, int | None] | None:
    """Whether a model of ``positions`` learned absolute positions (GPT-2's wpe) holds the grid's prompts (as
    ``evaluate_passkey`` builds them, keys of seed ``seed``) and the new tokens it feeds back (all but the last of
    ``max_new_tokens``): None when it does, else (the least positions of the first prompt over them, what takes them,
    the fix naming ``option``, the lengths' option: '--lengths' for zoo eval passkey, 'lengths' for zoo compare's
    eval.passkey; None, or the positions passkey's shortest prompt takes where no length fits the model). The one
    check of both (they were written twice, in two wordings)."""
    fits = positions - max_new_tokens + 1
    over = first_prompt_over(tokenizer, seed, lengths, depths, n_samples, add_bos, fits)
    if over is None:
        return None
    need = over[1] + max_new_tokens - 1
    what = (f"at least {need} positions (a prompt of at least {over[1]} tokens at length {over[0]}, then "
            f"{max_new_tokens} new tokens, the last not fed back)")
    # the length advised is one the template check takes: 'give --lengths of at most 57' was advised for a model of
    # 64 positions, below the 188 tokens of the prompt without filler, which no length goes under
    length, shortest = longest_length_within(tokenizer, seed, depths, n_samples, add_bos, max(fits, 1))
    if length is not None:
        return need, what, f"give {option} of at most {length}", None
    least = shortest + max_new_tokens - 1
    return (need, what, f"no {option} fit in them: passkey's shortest prompt (without filler) takes {shortest} "
                        f"tokens, {least} positions with the new tokens", least)


def evaluate_passkey(
    model,
    tokenizer,
    lengths: Sequence[int] = (1024, 2048, 4096, 8192),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_samples: int = 5,
    seed: int = 0,
    max_new_tokens: int = 8,
    prefill_chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    on_cell: Callable[[dict], None] | None = None,
    done: dict | None = None,
) -> dict:
    """Passkey accuracy for every (context length, depth) cell.

    Args:
        model: a causal LM with ``generate`` (or any HF-interface model when ``prefill_chunk_size`` is set).
        tokenizer: ``encode``/``decode`` (any transformers tokenizer, zoo's byte tokenizer included).
        lengths: target prompt lengths in tokens (one given twice is run once).
        depths: needle depths in [0, 1] (one given twice is run once).
        n_samples: prompts (distinct random keys) per cell.
        seed: the keys of a cell come from a generator seeded by (seed, length, depth) (``cell_generator``), so a
            cell's prompts do not depend on which other cells the grid holds.
        max_new_tokens: greedy tokens to decode.
        prefill_chunk_size: prefill in chunks carrying the cache instead of calling ``generate``.
        device: where the prompt goes; default the model's device.
        progress: show a tqdm bar over the prompts.
        on_cell: called after every cell with the result so far (``rows``, ``samples``), e.g. to save it, so
            a sweep stopped at its longest lengths (out of memory, a lost job) keeps the cells it finished; and when a
            KeyboardInterrupt (Ctrl-C, SIGTERM under ``sigterm_interrupts``) stops a cell, with the samples of its
            finished prompts.
        done: a saved result of the same model and settings (``rows``, ``samples``): those of its cells that are in
            this grid are kept and not run again (a rerun after an interruption), and so are the finished prompts of
            a cell it stopped in (and of a cell an older zoo scored with a repeated key, up to the repeat); others
            are dropped.

    Returns:
        dict with ``rows`` (length, depth, accuracy, n_samples, tokens = mean prompt length) and
        ``samples`` (every prompt's key, generated text and verdict).

    Raises:
        ValueError: a prompt holds a token id outside the model's vocabulary (a tokenizer not the model's), or
            ``max_new_tokens`` is too few to write a key (``longest_answer``), before the first cell runs.
    """
    if not 1 <= n_samples <= len(KEYS):  # (more prompts than keys would draw keys forever)
        raise ValueError(f"evaluate_passkey: n_samples={n_samples} must be >= 1 and <= {len(KEYS)} (prompts per cell, "
                         f"each with its own 5-digit key)")
    # the whole grid is checked before the first cell runs (a bad depth used to fail after the cells before it)
    if not lengths or not depths:
        raise ValueError(f"evaluate_passkey: no cells (lengths={list(lengths)}, depths={list(depths)}); give at "
                         f"least one of each (--lengths, --depths)")
    # a cell given twice (--lengths 1K,1024) is run once: its copy was a second row of the same cell, which the
    # table showed once but a mean over the rows (zoo compare's passkey accuracy) counted twice
    lengths = list(dict.fromkeys(int(length) for length in lengths))
    depths = list(dict.fromkeys(float(depth) for depth in depths))
    bad_depths = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        raise ValueError(f"depths: {bad_depths[0]:g} is not a fraction of the filler in [0, 1]; give --depths such as "
                         f"0,0.25,0.5,0.75,1 (a depth of 25% is 0.25)")
    # the prompt starts as the model's training documents did: with BOS unless it recorded add_bos false
    add_bos = trained_with_bos(getattr(model, "config", None))
    grid = {(int(length), float(depth)) for length in lengths for depth in depths}
    # with each of a length's keys (a length that fit the template of key 10000 ran the cells before it, then failed
    # at its first longer key)
    bare = bare_template_tokens(tokenizer, seed, grid, n_samples, add_bos)
    short = [n for n in lengths if n < bare[n]]
    if short:
        raise ValueError(f"lengths: {short[0]} tokens is shorter than the bare passkey template ({bare[short[0]]} "
                         f"tokens with this tokenizer and the keys of that length); give --lengths of at least "
                         f"{bare[short[0]]}")
    device = torch.device(device) if device is not None else model_device(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    need = longest_answer(tokenizer, seed, grid, n_samples)
    if max_new_tokens < need:  # a perfect model scored 0: every answer was cut before its last digit
        raise ValueError(f"max_new_tokens={max_new_tokens}: an answer \" <5-digit key>\" takes up to {need} tokens "
                         f"with this tokenizer, so its prompts would be scored wrong whatever the model writes; give "
                         f"--max-new-tokens {need} or more")

    from zoo.train import position_table

    # a model of learned positions takes the prompts, a few tokens shorter than their lengths (whole filler sentences),
    # and the new tokens but the last, which is never fed back: a length above its positions less max_new_tokens - 1
    # was refused though every prompt of it fit
    if (table := position_table(model)) is not None and (refusal := positions_refusal(
            tokenizer, seed, lengths, depths, n_samples, add_bos, max_new_tokens, table[1], "--lengths")) is not None:
        need, what, fix, _ = refusal
        check_positions(model, need, f"lengths: {what}", lambda n: fix)

    def in_grid(entry: dict) -> bool:  # a saved cell outside this grid is not this run's result
        return (int(entry["length"]), float(entry["depth"])) in grid

    def at(entry: dict) -> tuple[int, float]:
        return int(entry["length"]), float(entry["depth"])

    samples = [s for s in done["samples"] if in_grid(s)] if done else []
    saved_keys: dict[tuple[int, float], list[int]] = {}
    for sample in samples:
        saved_keys.setdefault(at(sample), []).append(sample["key"])
    # a finished cell is kept where its keys are this version's: an older zoo drew a key twice in about one cell in
    # three, and such a cell (a prompt scored twice) continues below from its first repeat, as a started one
    rows = [r for r in done["rows"] if in_grid(r) and saved_keys.get(at(r)) == cell_keys(seed, *at(r), n_samples)
            ] if done else []
    finished = {at(r) for r in rows}
    cells = [(length, depth) for length in lengths for depth in depths if (int(length), float(depth)) not in finished]
    # the prompts of a cell an interruption stopped in, saved then (its first keys, in order): not run again
    started: dict[tuple[int, float], list[dict]] = {}
    for sample in samples:
        cell = (int(sample["length"]), float(sample["depth"]))
        if cell not in finished:
            started.setdefault(cell, []).append(sample)
    samples = [s for s in samples if (int(s["length"]), float(s["depth"])) in finished]
    for (length, depth), kept in list(started.items()):  # (the saved prompts up to the first that is not this cell's)
        keys = cell_keys(seed, length, depth, n_samples)
        same = next((i for i, (s, key) in enumerate(zip(kept, keys)) if s["key"] != key), min(len(kept), len(keys)))
        started[(length, depth)] = kept[:same]
    bar = None
    if progress:  # by prompt: a cell of 1M-token prompts takes minutes
        from tqdm import tqdm

        bar = tqdm(total=len(cells) * n_samples, desc="passkey", unit="prompt",
                   initial=sum(len(kept) for kept in started.values()))
    # the mode the model came in is given back (evaluate_synthetic and evaluate_length do): a training loop that
    # evaluated passkey went on training in eval mode, without dropout and without an MoE's aux loss
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    n_filler: dict[int, int] = {}
    unsaved = False  # prompts finished since on_cell's last call
    try:
        # the bar closed on the way out, an interruption's too: left open, it was drawn again below the 'interrupted'
        # line
        with contextlib.closing(bar) if bar is not None else contextlib.nullcontext():
            for length, depth in cells:
                kept = started.get((int(length), float(depth)), [])
                samples.extend(kept)
                right, tokens = sum(s["correct"] for s in kept), sum(s["tokens"] for s in kept)
                for key in cell_keys(seed, length, depth, n_samples)[len(kept):]:
                    prompt = build_passkey_prompt(tokenizer, length, depth, key, n_filler=n_filler.get(length),
                                                  add_bos=add_bos)
                    n_filler[length] = prompt.n_filler
                    input_ids = torch.tensor([prompt.input_ids], dtype=torch.long)
                    check_token_ids(model, input_ids, "passkey prompts",
                                    "use the tokenizer the model was trained with (--tokenizer)")
                    input_ids = input_ids.to(device)
                    new = greedy_generate(model, input_ids, max_new_tokens, prefill_chunk_size, eos)
                    text = tokenizer.decode(new[0].tolist())
                    correct = check_passkey(text, key)
                    right += correct
                    tokens += len(prompt.input_ids)
                    unsaved = True
                    samples.append({"length": length, "depth": depth, "key": key, "generated": text,
                                    "correct": correct, "tokens": len(prompt.input_ids)})
                    if bar is not None:
                        bar.update(1)
                rows.append({"length": length, "depth": depth, "accuracy": right / n_samples,
                             "n_samples": n_samples, "tokens": tokens / n_samples})
                if on_cell is not None:
                    on_cell({"rows": rows, "samples": samples})
                    unsaved = False
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM in a cell: its finished prompts are saved too (a cell of 1M-token prompts is minutes of
        # them; they were lost), and the rerun runs only the others
        if on_cell is not None and unsaved:
            on_cell({"rows": rows, "samples": samples})
        raise
    finally:
        if was_training:
            model.train()
    return {"rows": rows, "samples": samples}


def accuracy_grid(rows: Sequence[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, accuracy[depth][length]) from ``evaluate_passkey`` rows."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    table = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
    return lengths, depths, [[table.get((n, d), float("nan")) for n in lengths] for d in depths]


def markdown_grid(rows: Sequence[dict]) -> str:
    """Depth x length accuracy table in markdown, plus the mean per length."""
    lengths, depths, grid = accuracy_grid(rows)
    table = [{"depth": f"{d:g}"} | {format_size(n): grid[i][j] for j, n in enumerate(lengths)}
             for i, d in enumerate(depths)]
    means = {format_size(n): sum(row[j] for row in grid) / len(depths) for j, n in enumerate(lengths)}
    return markdown_table(table + [{"depth": "mean"} | means], digits=2)


def plot_passkey_heatmap(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Heatmap PNG: needle depth (y) x context length (x), colour = accuracy."""
    plt = pyplot()
    lengths, depths, grid = accuracy_grid(rows)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.8 * len(lengths)), max(3.0, 1.2 + 0.5 * len(depths))))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_size(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or "passkey retrieval")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """``zoo eval passkey --model DIR --lengths 1K,2K,4K --depths 0,0.25,0.5,0.75,1``."""
    parser = argparse.ArgumentParser(prog="zoo eval passkey", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id, or a zoo model YAML")
    parser.add_argument("--tokenizer", default=None, help="path / hub id, or 'byte' (default: the model's)")
    parser.add_argument("--lengths", type=number_list, default="1K,2K,4K,8K",
                        help="comma list of prompt lengths in tokens (default 1K,2K,4K,8K)")
    parser.add_argument("--depths", type=lambda text: number_list(text, float), default="0,0.25,0.5,0.75,1",
                        help="comma list of needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--n-samples", type=positive_int, default=5, help="prompts per cell (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="of the passkeys (default 0)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8,
                        help="tokens generated per answer (default 8)")
    parser.add_argument("--prefill-chunk-size", type=positive_int, default=None,
                        help="prefill long prompts in chunks of this many tokens, carrying the cache (default: the "
                             "checkpoint's generation_config prefill_chunk_size, if any, else the whole prompt)")
    add_device_arguments(parser)
    parser.add_argument("--out", default="results/passkey", help="output directory (default results/passkey)")
    from zoo.state.mitigation import add_mitigation_argument, apply_mitigation, splits_matter

    add_mitigation_argument(parser)
    args = parser.parse_args(argv)

    out = Path(args.out)
    # SIGTERM stops the sweep as Ctrl-C does (it killed the process without a word), and either ends in one line
    # saying what is kept (zoo.cli._run prints it)
    kept = f"the finished cells (passkey.csv, passkey.md, passkey.json) are kept in {out}; the same command continues"
    with sigterm_interrupts(), interruption_says(kept):
        model = load_model(args.model, args.device, args.dtype)  # first: a wrong --model is not a tokenizer problem
        tokenizer = load_tokenizer(args.tokenizer, args.model)
        # (a tokenizer whose eos or pad id lay past the model's embeddings ran every cell, scoring a model on a
        # tokenizer it was not trained with, without a word)
        # the special ids it feeds the model: those of a prompt (its bos, as the model trained); the eos it stops at
        # and the pad of the one-row generate never go in
        add_bos = trained_with_bos(getattr(model, "config", None))
        fed = encode_with_bos(tokenizer, passkey_text(KEYS.start, 0, 0), add_bos)
        check_tokenizer(model, tokenizer, tokenizer_name(args.tokenizer, args.model), fed)
        if args.mitigation is not None:
            apply_mitigation(model, args.mitigation)
        # what a cell's result depends on: a rerun with the same keeps the cells passkey.json holds
        # (the tokenizer by what it does too: the cells of another one saved into --tokenizer's folder were kept)
        config = {"model": args.model, "weights": model_fingerprint(args.model), "tokenizer": args.tokenizer,
                  "tokenizer_digest": tokenizer_fingerprint(tokenizer), "dtype": args.dtype, "seed": args.seed,
                  "n_samples": args.n_samples, "max_new_tokens": args.max_new_tokens, "mitigation": args.mitigation}
        if splits_matter(args.mitigation):  # a norm cap acts at every prefill chunk's end
            config["prefill_chunk_size"] = args.prefill_chunk_size
        done = resume(out / "passkey.json", config, "zoo eval passkey")

        def save(result: dict) -> None:  # after every cell: an interrupted sweep keeps what it finished
            write_rows(result["rows"], out / "passkey.csv")
            write_text_atomically(markdown_grid(result["rows"]) + "\n", out / "passkey.md")
            write_json({"rows": result["rows"], "samples": result["samples"], "model": args.model, "config": config},
                       out / "passkey.json")

        result = evaluate_passkey(model, tokenizer, args.lengths, args.depths,
                                  args.n_samples, args.seed, args.max_new_tokens, args.prefill_chunk_size,
                                  progress=True, on_cell=save, done=done)
        result["model"] = args.model
        print(f"## passkey: {args.model}\n")
        print(markdown_grid(result["rows"]))
        save(result)
        png = plot_passkey_heatmap(result["rows"], out / "passkey.png", title=f"passkey: {Path(args.model).name}")
        print(f"\nwrote {out}/passkey.csv, passkey.md, passkey.json and {png}")
        return result
