"""Per-position loss on long documents: the length-extrapolation curve.

``per_position_loss`` runs a document through the model in chunks, carrying the model's cache (KV for
attention, conv + SSM state for recurrent mixers) from chunk to chunk through the generic Hugging Face API,
so a recurrent model reaches 1M tokens in constant memory; only one chunk's logits exist at a time.
``evaluate_length`` averages the loss over documents at every position and in log-spaced bins;
``plot_length_curves`` draws the curve (log x) with the training length marked; ``main(argv)`` is
``zoo eval length``, which saves each run's finished documents as it goes (``<stem>.partial.pt``, every
``SAVE_EVERY`` seconds at most, and when Ctrl-C or SIGTERM stops it), so a rerun after an interruption resumes the
run at its next document.

Position convention: ``loss[t]`` (t >= 1) is ``-log p(x_t | x_0 .. x_{t-1})``, the loss on the token at
position t with t tokens of context.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.eval.common import (
    add_device_arguments,
    check_model_path,
    check_positions,
    check_token_ids,
    check_tokenizer,
    interruption_says,
    iter_chunk_logits,
    load_model,
    load_tokenizer,
    markdown_table,
    model_device,
    model_fingerprint,
    positive_int,
    pyplot,
    read_partial,
    remove_partial,
    resolve_device,
    save_atomically,
    save_figure,
    sigterm_interrupts,
    tokenizer_fingerprint,
    tokenizer_name,
    tokens_digest,
    trained_with_bos,
    write_json,
    write_rows,
)


@torch.no_grad()
def per_position_loss(model, input_ids: torch.Tensor, chunk_size: int | None = 2048,
                      on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """Next-token loss at every position of ``input_ids``, computed chunk by chunk with the cache carried.

    Args:
        model: a causal LM (Hugging Face interface).
        input_ids: LongTensor [B, T] or [T], on the model's device.
        chunk_size: tokens per forward; None runs one forward over the whole document.
        on_chunk: called after every forward with the tokens it ran (rows x chunk length), e.g. a progress bar's
            update.

    Returns:
        float32 tensor [B, T - 1] (or [T - 1]) on the CPU: entry ``t - 1`` is the loss on token ``t``.
    """
    squeeze = input_ids.dim() == 1
    if squeeze:
        input_ids = input_ids[None]
    batch_size, seq_len = input_ids.shape
    losses = torch.empty(batch_size, max(seq_len - 1, 0), dtype=torch.float32)
    for start, logits in iter_chunk_logits(model, input_ids, chunk_size):
        if on_chunk is not None:
            on_chunk(batch_size * logits.shape[1])
        # logit p predicts token p + 1, so a chunk's last logit scores the next chunk's first token
        targets = input_ids[:, start + 1 : start + logits.shape[1] + 1]
        n = targets.shape[1]
        if n == 0:
            continue
        loss = F.cross_entropy(logits[:, :n].float().flatten(0, 1), targets.flatten(), reduction="none")
        losses[:, start : start + n] = loss.view(batch_size, n).cpu()
    return losses[0] if squeeze else losses


def log_bins(max_position: int, bins_per_octave: int = 4) -> list[tuple[int, int]]:
    """Half-open position bins ``[lo, hi)`` covering ``1 .. max_position``, log-spaced (distinct integers)."""
    edges = sorted({round(2 ** (k / bins_per_octave))
                    for k in range(int(math.log2(max(max_position, 1)) * bins_per_octave) + 2)})
    edges = [e for e in edges if e <= max_position] + [max_position + 1]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def partial_settings(docs: Sequence[torch.Tensor], batch_size: int, chunk_size: int | None,
                     key: Mapping | None) -> dict:
    """What a partial run of ``evaluate_length`` is resumed under: ``key`` (the caller's settings), the documents in
    order (a SHA-256 of their tokens), the batch and chunk sizes."""
    return json.loads(json.dumps({"key": dict(key or {}), "documents": tokens_digest(docs), "n_documents": len(docs),
                                  "batch_size": batch_size, "chunk_size": chunk_size}))


@torch.no_grad()
def evaluate_length(
    model,
    documents: torch.Tensor | Sequence[torch.Tensor],
    chunk_size: int | None = 2048,
    batch_size: int = 1,
    bins_per_octave: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
    partial: str | Path | None = None,
    partial_key: Mapping | None = None,
    save_every: float = 30.0,
    label: str = "length eval",
    keep_partial: bool = False,
) -> dict:
    """Per-position loss averaged over documents, and binned, for the length-extrapolation curve.

    Args:
        model: a causal LM.
        documents: LongTensor [N, T], or a sequence of LongTensor [T_i] (documents of equal length are
            batched together, ``batch_size`` at a time).
        chunk_size: tokens per forward (the cache carries the rest); None: one forward per document.
        batch_size: documents per forward.
        bins_per_octave: resolution of the log-spaced bins.
        device: where the tokens go; default the model's device.
        progress: show a tqdm bar over the documents' tokens, advanced after every chunk (a 1M-token document is many
            forwards).
        partial: a file where the sums of the documents finished so far are saved (atomically) after a batch, at most
            every ``save_every`` seconds, and when a KeyboardInterrupt (Ctrl-C, SIGTERM under ``sigterm_interrupts``)
            stops the run, so an interrupted run resumes there: a call with the same ``partial_key``
            (what else the losses depend on: the model, its mitigation, dtype), documents (in order), ``batch_size``
            and ``chunk_size`` starts at the next unfinished batch and gives the result an uninterrupted run gives; a
            file of other settings is replaced. Removed when the run completes, unless ``keep_partial``.
        label: names the run in the messages about ``partial``.
        keep_partial: save ``partial`` complete instead, so that a rerun returns the result without a forward until the
            caller, having written the result, removes it (``remove_partial``).

    Returns:
        dict with ``mean`` (float64 [T_max] mean loss at position t, NaN at t = 0 or where no document
        reaches), ``count`` (documents reaching each position), ``bins`` (rows: start, end, mean_loss,
        n_tokens) and ``n_documents``, ``max_len``, ``chunk_size``.
    """
    device = torch.device(device) if device is not None else model_device(model)
    docs = list(documents) if not isinstance(documents, torch.Tensor) else list(documents.unbind(0))
    if not docs:
        raise ValueError("evaluate_length needs at least one document")
    check_token_ids(model, docs, "documents", "tokenize with the model's tokenizer")
    max_len = max(int(d.shape[-1]) for d in docs)
    check_positions(model, max_len, f"max_len: documents of up to {max_len} tokens",
                    lambda n: f"give --max-len of at most {n}")
    sums = torch.zeros(max_len, dtype=torch.float64)
    counts = torch.zeros(max_len, dtype=torch.float64)
    by_length: dict[int, list[torch.Tensor]] = {}
    for d in docs:
        by_length.setdefault(int(d.shape[-1]), []).append(d.reshape(-1))
    batches = [group[i : i + batch_size]
               for group in by_length.values() for i in range(0, len(group), batch_size)]
    done = 0  # batches finished
    if partial is not None:
        partial = Path(partial)
        key = partial_settings(docs, batch_size, chunk_size, partial_key)
        saved = read_partial(partial, key, label)
        if saved is not None:
            done, sums, counts = saved["batches"], saved["sums"], saved["counts"]
            print(f"resuming {label} from document {sum(map(len, batches[:done])) + 1} of {len(docs)} ({partial})"
                  if done < len(batches) else f"{label}: every document is done in {partial}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(int(d.shape[-1]) for d in docs), desc="length eval", unit="tok", unit_scale=True,
                   initial=sum(int(d.shape[-1]) for group in batches[:done] for d in group))
    was_training = getattr(model, "training", False)
    model.eval()
    last_save = time.monotonic()
    # the batches finished and their sums, replaced in one assignment: an interruption sees them whole
    finished, saved_n = (done, sums, counts), done
    try:
        # the bar closed on the way out, an interruption's too: left open, it was drawn again below the 'interrupted'
        # line
        with contextlib.closing(bar) if bar is not None else contextlib.nullcontext():
            for n, group in enumerate(batches[done:], done + 1):
                input_ids = torch.stack(group).to(device)
                on_chunk = None if bar is None else bar.update
                losses = per_position_loss(model, input_ids, chunk_size, on_chunk).double()  # [b, T-1]
                length = losses.shape[1]
                sums, counts = sums.clone(), counts.clone()
                sums[1 : length + 1] += losses.sum(dim=0)
                counts[1 : length + 1] += losses.shape[0]
                finished = (n, sums, counts)
                if partial is not None and n < len(batches) and time.monotonic() - last_save >= save_every:
                    save_atomically({"settings": key, "batches": n, "sums": sums, "counts": counts}, partial)
                    last_save, saved_n = time.monotonic(), n
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the batches finished since the last save are saved too (they were lost, up to save_every
        # seconds of them)
        n, finished_sums, finished_counts = finished
        if partial is not None and n > saved_n:
            save_atomically({"settings": key, "batches": n, "sums": finished_sums, "counts": finished_counts}, partial)
        raise
    finally:
        if was_training:
            model.train()
    if partial is not None and keep_partial and done < len(batches):
        save_atomically({"settings": key, "batches": len(batches), "sums": sums, "counts": counts}, partial)
    elif partial is not None and not keep_partial:
        remove_partial(partial)
    mean = sums / counts  # NaN where no document reaches (and at t = 0)
    bins = []
    for lo, hi in log_bins(max_len - 1, bins_per_octave):
        n_tokens = counts[lo:hi].sum().item()
        if n_tokens:
            bins.append({"start": lo, "end": hi, "mean_loss": sums[lo:hi].sum().item() / n_tokens,
                         "n_tokens": int(n_tokens)})
    return {"mean": mean, "count": counts, "bins": bins, "n_documents": len(docs), "max_len": max_len,
            "chunk_size": chunk_size}


def plot_length_curves(
    results: Mapping[str, dict], path: str | Path, train_length: int | Sequence[int] | None = None,
    title: str | None = None
) -> Path:
    """Loss against position (log x), one binned curve per result, with the training length(s) marked.

    Args:
        results: label -> ``evaluate_length`` result.
        path: PNG to write.
        train_length: draws a vertical line there; a list (models trained at several lengths) draws one line per
            length, each in its own line style.
        title: figure title.
    """
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for label, result in results.items():
        centers = [math.sqrt(b["start"] * max(b["end"] - 1, b["start"])) for b in result["bins"]]
        ax.plot(centers, [b["mean_loss"] for b in result["bins"]], marker="o", markersize=3, label=label)
    marks = [train_length] if isinstance(train_length, int) else list(train_length or [])
    for i, length in enumerate(dict.fromkeys(L for L in marks if L)):
        ax.axvline(length, color="black", linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                   label=f"train length {length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "per-position loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


class CorpusDocuments(list):
    """``corpus_documents``'s documents (a list of LongTensors) with where their tokens came from: ``holdout`` (the
    data.holdout whose held-out files came first), ``tokens`` (every token of the documents, BOS included),
    ``held_tokens`` (those from the held-out files), ``train_tokens`` (those from the files a run with that
    data.holdout trains on) and ``train_documents`` (the documents holding any of them); ``train_share`` is
    ``train_tokens / tokens``."""

    holdout: float = 0.01
    tokens: int = 0
    held_tokens: int = 0
    train_tokens: int = 0
    train_documents: int = 0

    @property
    def train_share(self) -> float:
        return self.train_tokens / self.tokens if self.tokens else 0.0

    def provenance(self) -> dict:
        """What a results file records of the documents: holdout, n_documents, tokens, held_tokens, train_tokens,
        train_documents and train_share."""
        return {"holdout": self.holdout, "n_documents": len(self), "tokens": self.tokens,
                "held_tokens": self.held_tokens, "train_tokens": self.train_tokens,
                "train_documents": self.train_documents, "train_share": self.train_share}


# how corpus_documents builds documents from its settings: 2 carries the rest of a file into a later document (1 threw
# it away, so the held-out files ran out early); results saved with their settings record it, so that results of
# other documents are not kept
CORPUS_LAYOUT = 2


def document_provenance(documents: Sequence[torch.Tensor], what: str, trained_on_corpus: bool) -> dict | None:
    """Where the built-in corpus's documents came from, for a results file (``CorpusDocuments.provenance`` and
    ``trained_on_corpus``); None for other documents (a ``--tokens`` file). Warns when ``trained_on_corpus`` (the
    model trained on the built-in corpus with the documents' data.holdout) and any token comes from the training
    files: the model's loss there is not a held-out loss. ``what`` names the evaluation in the warning."""
    if not isinstance(documents, CorpusDocuments):
        return None
    if trained_on_corpus and documents.train_tokens:
        warnings.warn(f"{what}: {documents.train_documents} of {len(documents)} documents "
                      f"({documents.train_share:.1%} of their {documents.tokens} tokens) are text of the built-in "
                      f"corpus's training files, which the model was trained on: the held-out files of data.holdout "
                      f"{documents.holdout:g} gave only {documents.held_tokens} tokens, so its loss on the rest is not "
                      f"a held-out loss; evaluate fewer or shorter documents, or train with a larger data.holdout "
                      f"(train_share in the results records it)", stacklevel=2)
    return documents.provenance() | {"trained_on_corpus": trained_on_corpus}


def corpus_documents(tokenizer, n_documents: int, max_len: int, seed: int = 0,
                     start: str = "document", add_bos: bool = True, holdout: float = 0.01) -> CorpusDocuments:
    """Long documents from the built-in corpus (``zoo.data.text``: the Python standard library sources).

    Files are taken in a seeded random order, the held-out (eval) files first and then the training
    files (as a run with data.holdout ``holdout`` splits them: 0.01, zoo train's default; give the data.holdout the
    model trained with), and concatenated with a blank line between them into ``n_documents`` disjoint documents of
    ``max_len`` tokens, each starting with the tokenizer's BOS token as zoo models are trained (``add_bos`` False:
    without it, for a model trained with data.add_bos false: ``zoo.eval.common.trained_with_bos``). Few
    single files are long, so past a few thousand tokens a document is a run of source files, the way
    long-context evaluations concatenate books.

    No token is thrown away: each document is BOS, its first file, then the pieces earlier documents left (the rest
    of a file that did not fit in a document, the opening a random start skipped), then the next files. Every
    held-out token is used before any training file's: a document begins with a left piece (inside a file) only
    when every held-out file has begun a document, and with a training file only when no held-out text is left.
    The result says how many tokens came from training files (``CorpusDocuments.train_tokens``): past about 150K
    characters of held-out text (data.holdout 0.01 of CPython 3.11's library) the documents are partly training
    text, which a model trained on this corpus has seen.

    ``start="random"`` begins each document at a seeded random offset into its first file (BOS, then the
    text from there), as packed training rows begin. Every file opens the same way (licence, docstring,
    imports), so with ``start="document"`` the loss at position t is also the loss of "the t-th byte of a
    file", and a per-position curve carries that shape (a byte model: higher loss at 64-128 in the
    docstrings); random starts leave only the effect of the context length.

    Returns:
        ``n_documents`` LongTensors [max_len] (fewer or shorter only if the corpus runs out), as a
        ``CorpusDocuments`` list.
    """
    from collections import deque

    import numpy as np

    from zoo.data.text import encode_texts, stdlib_files

    if start not in ("document", "random"):
        raise ValueError(f"corpus_documents: start must be 'document' or 'random', got {start!r}")
    rng = np.random.default_rng(seed)
    splits = ("eval", "train")
    files = {split: deque(rng.permutation(np.array(stdlib_files(split, holdout), object))) for split in splits}
    ready = {split: deque() for split in splits}  # pieces left by earlier documents
    later = {split: deque() for split in splits}  # pieces left by this document (the next one's ready)

    def read(split: str) -> np.ndarray:
        text = files[split].popleft().read_bytes().decode("utf-8", "replace") + "\n\n"
        return encode_texts(tokenizer, [text])[0]

    def next_piece(first: bool) -> tuple[str, np.ndarray] | None:
        for split in splits:  # held-out text before any training file's
            if first and files[split]:  # a document begins at a file's start while files are left to begin one
                return split, read(split)
            if ready[split]:
                return split, ready[split].popleft()
            if files[split]:
                return split, read(split)
            if later[split]:
                return split, later[split].popleft()
        return None

    bos = getattr(tokenizer, "bos_token_id", None)
    documents = CorpusDocuments()
    documents.holdout = holdout
    for _ in range(n_documents):
        for split in splits:
            ready[split].extend(later[split])
            later[split].clear()
        pieces = [np.array([bos], dtype=np.int64)] if bos is not None and add_bos else []
        total, held_tokens, train_tokens, first = len(pieces), 0, 0, True
        while total < max_len:
            taken = next_piece(first)
            if taken is None:
                break
            split, ids = taken
            if first and start == "random" and len(ids) > 1:
                offset = int(rng.integers(0, len(ids) - 1))
                if offset:
                    later[split].append(ids[:offset])  # the opening it skipped goes into a later document
                ids = ids[offset:]
            first = False
            if total + len(ids) > max_len:  # the rest of the piece goes into a later document
                later[split].append(ids[max_len - total:])
                ids = ids[: max_len - total]
            pieces.append(ids)
            total += len(ids)
            train_tokens += len(ids) if split == "train" else 0
            held_tokens += len(ids) if split == "eval" else 0
        if total < 2:
            break
        documents.append(torch.from_numpy(np.concatenate(pieces)).long())
        documents.tokens += total
        documents.held_tokens += held_tokens
        documents.train_tokens += train_tokens
        documents.train_documents += train_tokens > 0
    return documents


# seconds between saves of a zoo eval length run's finished documents (a small run is not slowed by the writes)
SAVE_EVERY = 30.0

# the built-in corpus's defaults; a --tokens file is evaluated whole unless --n-docs / --max-len say otherwise
CORPUS_DOCUMENTS, CORPUS_LENGTH = 4, 16384


def corpus_special_ids(tokenizer, add_bos: bool) -> set:
    """The pad, bos and eos ids the built-in corpus's documents (`corpus_documents`) hold: the BOS each starts with
    where ``add_bos``, no other (the text is encoded without special tokens, their spellings in it as plain text)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return {bos} if add_bos and bos is not None else set()


def load_documents(
    source: str | None, n_documents: int | None, max_len: int | None, tokenizer=None, seed: int = 0,
    start: str = "document", add_bos: bool = True, holdout: float = 0.01
) -> list[torch.Tensor]:
    """Documents for ``zoo eval length``: a ``.pt`` file holding an integer tensor [N, T] or a list of integer
    tensors [T_i] (the first ``n_documents``, each cut to ``max_len``; None: all of them, whole), or, with
    ``source=None``, ``corpus_documents`` (``n_documents`` None: 4, ``max_len`` None: 16384; ``add_bos`` and
    ``holdout``, the data.holdout of a run that trained on the corpus: theirs; a file's documents are taken as they
    are).

    Anything else in the file (a flat [T] stream, [N, T, ...], floats, documents under 2 tokens) is refused
    with a ValueError that says how to save it: guessing where a flat stream's documents end would be wrong.
    """
    if source is None:
        if tokenizer is None:
            raise ValueError("load_documents: the built-in corpus needs a tokenizer")
        if max_len is not None and max_len < 2:  # (the corpus gave no document: 'needs at least one document')
            raise ValueError(f"--max-len {max_len}: a document of fewer than 2 tokens has no next token to score; give "
                             f"--max-len 2 or more")
        return corpus_documents(tokenizer, n_documents or CORPUS_DOCUMENTS, max_len or CORPUS_LENGTH, seed, start,
                                add_bos, holdout)
    expected = "an integer tensor [N, T] (N documents of T tokens) or a list of 1-D integer tensors [T_i]"
    try:
        # on the CPU: token ids saved from a GPU (a batch's input_ids) are read on any machine, and go to the model's
        # device with each batch (a CPU-only machine refused them: 'Attempting to deserialize object on a CUDA device')
        loaded = torch.load(source, weights_only=True, map_location="cpu")
    except OSError:  # a missing file, a folder: their own message names the path
        raise
    except Exception as error:  # (a .txt or .npy file, a pickle of other objects: a traceback from torch's unpickler)
        raise ValueError(f"--tokens {source}: not a file torch.save wrote holding {expected} (torch.load failed: "
                         f"{type(error).__name__}); save the token ids with torch.save(t.long(), path)") from None
    if isinstance(loaded, torch.Tensor):
        if loaded.dim() != 2:
            fix = (f"save one document as t[None] ([1, {loaded.shape[0]}]) or a stream cut into N as "
                   f"t[: len(t) // N * N].view(N, -1)" if loaded.dim() == 1 else "reshape it to [N, T]")
            raise ValueError(f"--tokens {source}: holds a tensor of shape {list(loaded.shape)}, expected "
                             f"{expected}; {fix}")
        docs = list(loaded.unbind(0))
    elif isinstance(loaded, (list, tuple)) and all(isinstance(d, torch.Tensor) and d.dim() == 1 for d in loaded):
        docs = list(loaded)
    else:
        shapes = ([list(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__ for d in loaded[:3]]
                  if isinstance(loaded, (list, tuple)) else type(loaded).__name__)
        raise ValueError(f"--tokens {source}: holds {shapes}, expected {expected}")
    if not docs:
        raise ValueError(f"--tokens {source}: holds no documents; expected {expected}")
    if any(d.is_floating_point() or d.is_complex() or d.dtype == torch.bool for d in docs):
        raise ValueError(f"--tokens {source}: holds {docs[0].dtype} values, expected token ids in {expected}; "
                         f"save t.long()")
    docs = [d[:max_len].long() for d in docs[:n_documents]]  # (None: all, whole)
    short = min(len(d) for d in docs)
    if short < 2:
        raise ValueError(f"--tokens {source}: a document of {short} token(s) has no next token to score; "
                         f"every document needs at least 2 tokens (and --max-len >= 2)")
    return docs


def output_stems(labels: Sequence[str]) -> list[str]:
    """File stems for the curves' outputs: each label's base name (a model path's folder, ``.yaml`` dropped),
    with parent folders prepended (joined by '-') until the stems are distinct, so ``A/merged B/merged``
    write ``A-merged.csv`` and ``B-merged.csv`` while a lone model keeps its base name; stems no parent
    separates get ``-2``, ``-3``, ...."""
    parts = []
    for label in labels:
        path = Path(label)
        names = [p for p in path.parts if p not in (path.anchor, ".")]
        if names and names[-1].endswith((".yaml", ".yml")):
            names[-1] = names[-1].removesuffix(".yaml").removesuffix(".yml")
        parts.append([p for p in names if p] or ["model"])
    depth = [1] * len(labels)
    while True:
        stems = ["-".join(names[-d:]) for names, d in zip(parts, depth)]
        clashing = [i for i, s in enumerate(stems) if stems.count(s) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, s in enumerate(stems):
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            stems[i] = f"{s}-{seen[s]}"
    return stems


def recipe_holdout(path: str) -> float | None:
    """The data.holdout of the zoo train run that saved the checkpoint ``path`` (its ``train_config.yaml``, beside
    ``model/``) when the run trained on the built-in corpus; None otherwise (another source, a hub id, a YAML)."""
    import yaml

    file = Path(path).parent / "train_config.yaml"
    if not Path(path).is_dir() or not file.is_file():
        return None
    try:
        data = (yaml.safe_load(file.read_text()) or {}).get("data") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    return float(data.get("holdout", 0.01)) if data.get("source", "stdlib") == "stdlib" else None


def main(argv: Sequence[str] | None = None) -> dict:
    """``zoo eval length --model DIR [DIR ...] --max-len 1M --train-length 2048``."""
    parser = argparse.ArgumentParser(prog="zoo eval length", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True, help="checkpoint dirs, hub ids or zoo YAMLs")
    parser.add_argument("--label", nargs="*", default=None, help="curve labels (default: model paths)")
    parser.add_argument("--tokens", default=None, help=".pt LongTensor [N, T]; default: built-in corpus (a zoo "
                        "checkpoint's held-out files first; length.json records the share of training text)")
    parser.add_argument("--tokenizer", default=None, help="for the built-in corpus: path, hub id or 'byte' "
                        "(default: the first model's)")
    parser.add_argument("--n-docs", type=positive_int, default=None,
                        help=f"documents (default: every one of --tokens, else {CORPUS_DOCUMENTS})")
    parser.add_argument("--max-len", type=positive_int, default=None, help="tokens per document, 1M allowed (default: "
                        f"--tokens documents whole, else {CORPUS_LENGTH})")
    parser.add_argument("--chunk-size", type=positive_int, default=2048, help="tokens per forward (default 2048)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="documents per forward (default 1)")
    parser.add_argument("--train-length", type=positive_int, default=None, help="marked on the plot")
    parser.add_argument("--bins-per-octave", type=positive_int, default=4,
                        help="position bins per octave of the curve (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="built-in corpus: of the documents (default 0)")
    parser.add_argument("--start", choices=["document", "random"], default=None,
                        help="built-in corpus: documents begin at a file's start (default), or at a random offset "
                             "into it")
    add_device_arguments(parser)
    parser.add_argument("--out", default="results/length", help="output directory (default results/length)")
    parser.add_argument("--mitigation", nargs="*", default=None, metavar="SPEC",
                        help="evaluate each model once per training-free mitigation, curves on one plot: "
                             "none | forget:c_alpha=0.999,c_b=0.7 | norm:threshold=10 | window:r=512 | a+b")
    args = parser.parse_args(argv)
    labels = args.label or args.model
    if len(labels) != len(args.model):
        parser.error(f"--label needs one label per --model ({len(args.model)})")
    if len(set(labels)) != len(labels):
        parser.error("every curve needs its own label: give each --model once, or distinct --label values")
    corpus_only = [name for name, value in (("--tokenizer", args.tokenizer), ("--seed", args.seed),
                                            ("--start", args.start)) if value is not None]
    if args.tokens and corpus_only:  # (they were ignored without a word: a --tokens file's documents are taken whole)
        parser.error(f"{', '.join(corpus_only)}: options of the built-in corpus, but the documents are the --tokens "
                     f"file's, taken as they are; leave them out, or leave out --tokens")
    args.seed = 0 if args.seed is None else args.seed
    args.start = args.start or "document"

    resolve_device(args.device)  # (a device this machine lacks: before the documents are built, not at the first model)
    for path in args.model:  # a mistyped --model fails here, not as the first model's missing tokenizer
        check_model_path(path)
    tokenizer = None if args.tokens else load_tokenizer(args.tokenizer, args.model[0])
    built: dict[bool, list[torch.Tensor]] = {}  # the built-in corpus's documents, with BOS or not, as each model
    # was trained (zoo.eval.common.trained_with_bos); a --tokens file's are every model's as they are
    # zoo checkpoints trained on the built-in corpus: the files every one of them held out come first (a smaller
    # data.holdout holds out a subset of a larger one's files), the same documents for every curve
    holdouts = {} if args.tokens else {path: recipe_holdout(path) for path in args.model}
    holdout = min((h for h in holdouts.values() if h is not None), default=0.01)

    def documents_for(model) -> list[torch.Tensor]:
        add_bos = True if args.tokens else trained_with_bos(getattr(model, "config", None))
        if add_bos not in built:
            built[add_bos] = load_documents(args.tokens, args.n_docs, args.max_len, tokenizer, args.seed, args.start,
                                            add_bos, holdout)
        return built[add_bos]

    if args.tokens:
        documents_for(None)  # a bad file is refused before any model loads
    out = Path(args.out)
    results, summary = {}, {}
    from zoo.state.mitigation import apply_mitigation, parse_mitigation, splits_matter

    specs = args.mitigation or [None]
    for spec in specs:  # bad specs fail before any model is loaded
        parse_mitigation(spec)
    runs = [(label, path, stem, spec) for label, path, stem in zip(labels, args.model, output_stems(labels))
            for spec in specs]
    # what a curve depends on; a rerun keeps the curves length.json holds for the same (chunk and batch sizes, the
    # device: how, not what, except the chunk size under a norm cap)
    stat = Path(args.tokens).stat() if args.tokens else None
    documents_from = {"tokens": args.tokens, "tokens_file": [stat.st_size, stat.st_mtime_ns] if stat else None,
                      "tokenizer": args.tokenizer,
                      "tokenizer_of": None if args.tokens or args.tokenizer else args.model[0],
                      "n_docs": args.n_docs, "max_len": args.max_len, "seed": args.seed, "start": args.start,
                      "dtype": args.dtype, "bins_per_octave": args.bins_per_octave}
    if not args.tokens:
        # the tokenizer by what it does: another one saved into --tokenizer's folder (or the first model's) since kept
        # the curves of the old one, taken for the same settings by name
        documents_from |= {"holdout": holdout, "layout": CORPUS_LAYOUT,
                           "tokenizer_digest": tokenizer_fingerprint(tokenizer)}
    previous = {}
    if (out / "length.json").is_file():
        try:
            previous = json.loads((out / "length.json").read_text())
        except ValueError:
            previous = {}
    # SIGTERM stops the evaluation as Ctrl-C does (it killed the process without a word), and either ends in one line
    # saying what is kept (zoo.cli._run prints it)
    kept_message = (f"finished curves (length.json, *.csv) and the finished documents of an evaluation (*.partial.pt) "
                    f"are kept in {out}; the same command continues")
    with sigterm_interrupts(), interruption_says(kept_message):
        for base, path, stem, spec in runs:
            label = f"{base} [{spec}]" if args.mitigation else base
            if args.mitigation:
                stem = re.sub(r"[^0-9A-Za-z=._-]+", "_", f"{stem}-{spec}")
            partial = out / f"{stem}.partial.pt"
            # a norm cap acts at every chunk's end, so its curve also depends on --chunk-size
            chunking = {"chunk_size": args.chunk_size} if splits_matter(spec) else {}
            config = json.loads(json.dumps(documents_from | {"model": path, "weights": model_fingerprint(path),
                                                             "mitigation": spec} | chunking))
            kept = previous.get(label) if isinstance(previous, dict) else None
            if isinstance(kept, dict) and kept.get("config") == config and "bins" in kept:
                print(f"## {label}: kept from {out / 'length.json'} (same model and settings; delete it, or give "
                      f"another --out, to evaluate it again)\n")
                results[label], summary[label] = kept, kept
                write_json(summary, out / "length.json")
                remove_partial(partial)  # (of a run interrupted between writing its curve and removing it)
                continue
            if isinstance(kept, dict):
                print(f"{label}: {out / 'length.json'} holds its curve under other settings; evaluating it again")
            model = load_model(path, args.device, args.dtype)
            if tokenizer is not None:  # the built-in corpus's: refused before its documents are built for the model
                # (one whose eos or pad id lay past the model's embeddings gave a curve without a word)
                check_tokenizer(model, tokenizer, tokenizer_name(args.tokenizer, args.model[0]),
                                corpus_special_ids(tokenizer, trained_with_bos(getattr(model, "config", None))))
            config["weights"] = model_fingerprint(path)  # a hub model is downloaded now: its commit is known
            if spec is not None:
                apply_mitigation(model, spec)
            # the documents finished so far, saved as the run goes: a rerun of the same settings resumes there; kept
            # complete until length.json holds the curve, so that an interruption before then loses nothing
            documents = documents_for(model)
            provenance = document_provenance(documents, f"zoo eval length {path}", holdouts.get(path) is not None)
            result = evaluate_length(model, documents, args.chunk_size, args.batch_size, args.bins_per_octave,
                                     progress=True, partial=partial, partial_key=config, save_every=SAVE_EVERY,
                                     label=label, keep_partial=True)
            del model
            results[label] = result
            print(f"## {label}: {result['n_documents']} documents of up to {result['max_len']} tokens\n")
            print(markdown_table(result["bins"]))
            print()
            write_rows(result["bins"], out / f"{stem}.csv")
            torch.save({"mean": result["mean"], "count": result["count"]}, out / f"{stem}-per-position.pt")
            summary[label] = {k: v for k, v in result.items() if k not in ("mean", "count")} | {
                "model": path, "mitigation": spec, "config": config}
            if provenance is not None:  # the built-in corpus: how much of it is text the model trained on
                summary[label]["documents"] = provenance
            write_json(summary, out / "length.json")  # after every run: an interrupted sweep keeps what it finished
            remove_partial(partial)
    png = plot_length_curves(results, out / "length.png", args.train_length)
    print(f"wrote {out}/*.csv, length.json and {png}")
    return summary
