"""Text for pretraining: tokenizers, document sources, and packing into fixed-length rows.

A run reads documents from one source: the built-in corpus (the running Python's own standard library
``.py`` files, present on every machine, no download), a Hugging Face hub dataset (streamed), or local
txt/jsonl/parquet files through `datasets`. Documents are tokenized (``<bos>`` + text + ``<eos>``) and
packed into rows of ``seq_len`` tokens. Each row carries

- ``input_ids`` [L] and ``labels`` [L] (Hugging Face convention: the model shifts; -100 is ignored),
- ``seq_idx`` [L] int32: which document of the row each token belongs to, counted from 0,
- ``position_ids`` [L]: restart at 0 at every document of the row,

so no mixer, convolution or attention crosses a document boundary, and ``labels`` is -100 at the first
token of every document after the first, the one target that would be predicted across a boundary.
With ``packing: false`` a row holds one piece of one document, right-padded, with an ``attention_mask``.
Bytes that are not UTF-8 in a built-in corpus file, a local .txt file or a memory-mapped document read as
U+FFFD.

Everything is deterministic: a rank's document order is a function of (seed, epoch, rank, world size),
and an iterator's position is a small dict (epoch, document, token offset; for an unshuffled streamed dataset
also `datasets`' own position, so a resumed run reads on from there rather than re-reading what came before)
from which a resumed run continues with exactly the same rows.
"""

from __future__ import annotations

import functools
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import platform
import re
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IGNORE_INDEX = -100
# documents tokenized per call: large enough for the Rust tokenizer's batch parallelism, small enough that
# a resumed run re-reads little
_TOKENIZE_GROUP = 32
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# one-file compressions that `datasets` decompresses as it reads a file (its SINGLE_FILE_COMPRESSION_EXTENSION_TO_
# PROTOCOL; .zst and .lz4 need the zstandard / lz4 package): 'corpus.jsonl.gz' is a .jsonl file, by path or in a folder
_COMPRESSION_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz", ".zst", ".zstd", ".lz4")


def local_builder(path: str | Path) -> str | None:
    """The `datasets` builder ('text', 'json' or 'parquet') that reads a local data file, by its name's suffix, under
    a compression suffix for a text or JSON file (``corpus.jsonl.gz`` -> 'json', as datasets' folder loader takes it;
    its parquet reader takes no compressed file); None for another file."""
    name = Path(path).name.lower()
    compressed = name.endswith(_COMPRESSION_SUFFIXES)
    builder = _LOCAL_BUILDERS.get(Path(Path(name).stem).suffix if compressed else Path(name).suffix)
    return None if compressed and builder == "parquet" else builder


# what reading a file through open_data_file raises for a file that is not what its name says, cut short or corrupt:
# gzip's BadGzipFile and bz2's OSError, EOFError, lzma's LZMAError, zlib.error (a gzip stream's corrupt deflate data)
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def open_data_file(path: str | Path):
    """A local data file opened for reading bytes (a context manager), decompressed where its name says it is
    compressed (``rows.jsonl.gz``: by fsspec's decompressors, the ones a streamed `datasets` source is read through).
    A ValueError names a compression that cannot be read here (.zst / .lz4 without the zstandard / lz4 package); a
    file that does not hold what its suffix says, or is cut short or corrupt, raises the decompressor's error as it is
    read, one of DECOMPRESSION_ERRORS. The path is a local file's, never a URL: fsspec.open read 'a::b.jsonl' as a chain
    of URLs and 'file:rows.jsonl' as 'rows.jsonl'."""
    import fsspec
    from fsspec.core import OpenFile
    from fsspec.implementations.local import LocalFileSystem

    name = Path(path).name.lower()
    suffix = next((c for c in _COMPRESSION_SUFFIXES if name.endswith(c)), None)
    compression = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}.get(suffix, (suffix or "")[1:])
    if suffix is not None and compression not in fsspec.available_compressions():
        package = {"zstd": "zstandard", "lz4": "lz4"}.get(compression, compression)
        raise ValueError(f"{path}: compressed as {suffix}, which needs the {package!r} package: pip install {package}, "
                         f"or decompress the file")
    return OpenFile(LocalFileSystem(), os.path.abspath(os.fspath(path)), "rb",
                    compression=compression if suffix is not None else None)


def broken_compressed_file(files: list[str]) -> tuple[str, BaseException] | None:
    """(the first of `files` named as compressed that cannot be read through, its decompressor's error), or None: what a
    source's DECOMPRESSION_ERRORS came from, which datasets raises naming no file. Read only once such an error was
    raised (a file cut short fails at its end)."""
    for f in files:
        if not Path(f).name.lower().endswith(_COMPRESSION_SUFFIXES):
            continue
        try:
            with open_data_file(f) as raw:
                while raw.read(1 << 24):
                    pass
        except (*DECOMPRESSION_ERRORS, ValueError) as e:  # (ValueError: a compression without its package)
            return f, e
    return None


def _decompression_error(error: BaseException, files: list[str], source: Any) -> ValueError | None:
    """A ValueError naming the compressed file of `files` that `error` (one of DECOMPRESSION_ERRORS, or datasets' error
    caused by one, raised while it read `source`) came from, and what to do; None where no file of them fails to
    decompress."""
    found = broken_compressed_file(files)
    if found is None:
        return None
    f, e = found
    what = f"data.source ({source!r})" if f != source else "data.source"
    return ValueError(f"{what}: cannot read {f!r} ({type(e).__name__}: {e}): it is not compressed as its name says, or "
                      f"is cut short or corrupt; decompress it again from its origin, or leave it out of the source")


# ---- tokenizers --------------------------------------------------------------------------------------------

class ByteTokenizer(PreTrainedTokenizerFast):
    """UTF-8 bytes as tokens, needing no download: ids 0..255 are the bytes, 256 ``<pad>``, 257 ``<bos>``,
    258 ``<eos>`` (``len(tokenizer) == 259``; a model needs ``vocab_size >= 259``).

    A `tokenizers` byte-level BPE without merges, so it saves as ``tokenizer.json`` and
    ``AutoTokenizer.from_pretrained(folder)`` loads it offline anywhere (as a generic fast tokenizer with
    the same ids). Text that spells a special token (``"<eos>"``) encodes as its bytes in training data
    (`encode_texts` splits special tokens).
    """

    pad_token_text, bos_token_text, eos_token_text = "<pad>", "<bos>", "<eos>"

    def __init__(self, **kwargs: Any):
        if kwargs.get("tokenizer_object") is None and kwargs.get("tokenizer_file") is None:
            kwargs["tokenizer_object"] = self._build()
        kwargs.setdefault("pad_token", self.pad_token_text)
        kwargs.setdefault("bos_token", self.bos_token_text)
        kwargs.setdefault("eos_token", self.eos_token_text)
        super().__init__(**kwargs)

    @classmethod
    def _build(cls):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_chars = bytes_to_unicode()  # byte -> printable unicode stand-in (GPT-2's table)
        vocab = {byte_chars[b]: b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
        # use_regex=False: no word splitting, every byte is one token
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (cls.pad_token_text, cls.bos_token_text, cls.eos_token_text)])
        return tok


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``"byte"`` -> `ByteTokenizer`; anything else -> ``AutoTokenizer.from_pretrained(name_or_path)``.

    A tokenizer without a pad token gets its eos as pad (unpacked rows need one); one without an eos is
    refused, since documents are separated by it. A missing local folder, or a tokenizer transformers cannot load,
    raises a ValueError that names the field (transformers calls a missing folder an invalid hub id).
    """
    if name_or_path == "byte":
        return ByteTokenizer()
    from zoo.hub import check_tokenizer_ref

    check_tokenizer_ref(name_or_path)
    folder = Path(name_or_path).expanduser()  # '~/tok' from a config file or a quoted argument: transformers took it
    where = str(folder) if folder.is_dir() else name_or_path  # for an invalid hub id (zoo.hub.load_folder_tokenizer)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        if json.loads(config_file.read_text()).get("tokenizer_class") == "ByteTokenizer":
            return ByteTokenizer.from_pretrained(where)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:  # a hub id not found or not reachable offline, a folder without tokenizer
        raise ValueError(f"tokenizer: {name_or_path!r}: {' '.join(str(e).split())}") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer: {name_or_path!r} has no eos token; documents are separated by it — "
                         f"choose a tokenizer with one, or 'byte'")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added; special-token spellings stay plain text).

    Returns int64 arrays. `ByteTokenizer` takes a numpy path (UTF-8 bytes are the ids), 1000x faster than
    the general one and equal to it (tested).
    """
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int64) for t in texts]
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


# the special token ids a tokenizer and a model config both name
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def special_id_outside(tokenizer: PreTrainedTokenizerBase, n_embed: int,
                       names: tuple[str, ...] = SPECIAL_IDS) -> tuple[str, int] | None:
    """Why the tokenizer's pad, bos or eos id is no row of a model's `n_embed` embeddings ("its eos_token_id 500 is
    outside the model's vocabulary (vocab_size 64: ids 0..63), though the tokenizer has 29 tokens (its ids have
    gaps)"), with the vocab_size its special ids need; None where they all are rows. A tokenizer whose ids have gaps
    (a special token saved with its own id) has such an id past len(tokenizer), which a check of its size alone
    passed: training then failed in the embedding at the first row holding it ('IndexError: index out of range in
    self'; on a GPU a device-side assert). `names`: the special ids to check (the vocab_size is the one all need)."""
    ids = {name: getattr(tokenizer, name, None) for name in SPECIAL_IDS}
    ids = {name: value for name, value in ids.items() if isinstance(value, int)}
    for name, value in ids.items():
        if name not in names:
            continue
        if not 0 <= value < n_embed:
            return (f"its {name} {value} is outside the model's vocabulary (vocab_size {n_embed}: ids "
                    f"0..{n_embed - 1}), though the tokenizer has {len(tokenizer)} tokens (its ids have gaps)",
                    max(ids.values()) + 1)
    return None


def document_wrap(tokenizer: PreTrainedTokenizerBase, add_bos: bool, add_eos: bool) -> tuple[list[int], list[int]]:
    """([bos] or [], [eos] or []): the tokens that wrap each document. Asked for on a tokenizer that has no such
    token (Qwen's has no bos, for one), it is left out with a warning; it used to be left out silently. The warning is
    the first process's alone (RANK 0), as the data's other warnings are: every process of a launch wraps its data."""
    out = []
    for what, asked in (("bos", add_bos), ("eos", add_eos)):
        token = getattr(tokenizer, f"{what}_token_id", None) if asked else None
        if asked and token is None and os.environ.get("RANK", "0") == "0":  # once per launch, not once per process
            warnings.warn(f"data.add_{what}: the tokenizer ({type(tokenizer).__name__}) has no {what} token, so "
                          f"documents are not wrapped in one; set add_{what}: false to say so, or set the "
                          f"tokenizer's {what}_token", stacklevel=2)
        out.append([token] if token is not None else [])
    return out[0], out[1]


# ---- the built-in corpus -----------------------------------------------------------------------------------

def stdlib_root() -> Path:
    """The running Python's standard library folder (the built-in corpus lives there)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _in_holdout(key: str, holdout: float) -> bool:
    """Stable split by a CRC32 of a key (a built-in corpus file's path, or a document's text): the same on every
    machine and run."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % 1_000_000 < holdout * 1_000_000


def stdlib_files(split: str = "train", holdout: float = 0.01) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, without third-party site-packages.

    ``split="eval"`` gives the holdout: files whose relative path hashes into the `holdout` fraction;
    ``"train"`` the rest. About 1,800 files / 31 MB on CPython 3.11 (the corpus follows the Python
    version, so runs compare only on the same one; ``zoo train --resume`` says when it is another).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    root = stdlib_root()
    return [root / rel for rel in _stdlib_relative_paths() if _in_holdout(rel, holdout) == (split == "eval")]


def stdlib_version() -> dict[str, Any]:
    """What the built-in corpus is made of: the running Python's version and the number of its files (a checkpoint
    records it, so that ``--resume`` can say when another Python's corpus orders the documents otherwise)."""
    return {"python": platform.python_version(), "files": len(_stdlib_relative_paths())}


@functools.cache
def _stdlib_relative_paths() -> tuple[str, ...]:
    root = stdlib_root()
    out = []
    for folder, dirs, files in os.walk(root):
        if folder == str(root):
            dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(folder).relative_to(root)
        out.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return tuple(sorted(out))


# ---- configuration -----------------------------------------------------------------------------------------

SAMPLE_BY = ("document", "paragraph", "line")  # datasets' text builder: a whole file, blank-line paragraphs, lines

@dataclass
class DataConfig:
    """Where the text comes from and how rows are made (the ``data:`` section of a run config).

    source: ``"stdlib"`` (built-in corpus), a hub dataset name (``"HuggingFaceFW/fineweb-edu"``), local
    file path(s)/glob(s) of one kind: ``.txt`` (one document per file; see sample_by), ``.jsonl``/``.json`` (each of
    them possibly compressed, ``corpus.jsonl.gz``, ``book.txt.gz``: .gz, .bz2, .xz, or .zst / .lz4 with their
    package), ``.parquet``, or a
    local folder, which goes to ``datasets.load_dataset`` as a hub name would (its folder loader reads the data
    files inside; split, config_name and streaming apply), or a folder written by ``Dataset.save_to_disk`` (read
    with ``datasets.load_from_disk``, memory-mapped, one split as local files are).
    config_name: the hub dataset's configuration. revision: the hub dataset's branch, tag or commit sha to read (None:
    its default branch, as it stands when the run opens it; a commit sha pins the data across a stop and a resume).
    split / eval_split: dataset splits for training and evaluation, two different ones (of a hub dataset or local
    folder; the built-in corpus and local files are one split, refused otherwise); without an eval_split, a `holdout`
    fraction of the training documents is held out, chosen by a stable hash (CRC32) of their text, or for the
    built-in corpus by one of each file's path relative to the stdlib. text_field: the column holding the text.
    streaming: stream hub datasets (local files are always memory-mapped). seq_len: tokens per row. packing: pack
    documents into full rows (else one padded document piece per row). shuffle / shuffle_buffer: document order
    per epoch (a buffer for streamed sources; a shuffled stream resumes by re-reading the documents before its saved
    position, an unshuffled one reads on from it). add_bos / add_eos: wrap each document. seed: of the document order.
    sample_by: what a document is in local .txt files: "document" (a whole file), "paragraph" (text between blank
    lines) or "line" (datasets' text builder's sample_by). One large file (a nanoGPT-style input.txt) is one
    document by default, which the held-out split cannot divide: give it "paragraph" or "line". A local folder of
    .txt files is read as datasets' folder loader reads it, one line per document (with a notice), or as "paragraph"
    says; name its files by glob (``folder/*.txt``) to read each as one document.
    """

    source: str | list[str] = "stdlib"
    config_name: str | None = None
    revision: str | None = None
    split: str = "train"
    eval_split: str | None = None
    holdout: float = 0.01
    text_field: str = "text"
    streaming: bool = True
    seq_len: int = 2048
    packing: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 10_000
    add_bos: bool = True
    add_eos: bool = True
    seed: int = 0
    sample_by: str = "document"

    def validate(self, prefix: str = "data") -> None:
        """Raise ValueError naming the field for an impossible setting."""
        if not self.source:
            raise ValueError(f"{prefix}.source: empty; use 'stdlib', a hub dataset name or local file paths")
        if not (isinstance(self.seq_len, int) and self.seq_len >= 2):
            raise ValueError(f"{prefix}.seq_len: must be an integer >= 2, got {self.seq_len!r}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"{prefix}.holdout: must be in [0, 1), got {self.holdout!r}")
        if not (isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 1):
            raise ValueError(f"{prefix}.shuffle_buffer: must be a positive integer, "
                             f"got {self.shuffle_buffer!r}")
        if self.eval_split is not None and self.eval_split == self.split:
            raise ValueError(f"{prefix}.eval_split: {self.eval_split!r} is {prefix}.split too, so the evaluation would "
                             f"read the training documents; name another split, or unset eval_split to hold out "
                             f"{prefix}.holdout of the training documents")
        if not self.text_field:
            raise ValueError(f"{prefix}.text_field: empty; name the dataset column that holds the text")
        if not (isinstance(self.seed, int) and self.seed >= 0):  # numpy and datasets refuse it mid-run, naming nothing
            raise ValueError(f"{prefix}.seed: must be an integer >= 0 (the document order's seed), got {self.seed!r}")
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"{prefix}.sample_by: must be one of {SAMPLE_BY} (what a document of a .txt file is), "
                             f"got {self.sample_by!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---- document sources --------------------------------------------------------------------------------------

class _IndexedDocs:
    """Documents addressable by index (built-in corpus, local files, non-streamed datasets).

    A rank's order in an epoch is ``permutation(seed, epoch)[rank::world_size]``, so resuming at
    document d of epoch e is a slice.
    """

    commit: str | None = None  # the hub commit a non-streamed hub dataset was read at (`_hub_commit`)

    def __init__(self, n: int, get_text: Callable[[int], str], seed: int, shuffle: bool, rank: int,
                 world_size: int, source_row: Callable[[int], int] = int):
        self.n, self.get_text, self.seed, self.shuffle = n, get_text, seed, shuffle
        self.rank, self.world_size, self.source_row = rank, world_size, source_row

    def _order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        return order[self.rank::self.world_size]

    def iter_docs(self, epoch: int, start: int) -> Iterator[str]:
        for i in self._order(epoch)[start:]:
            yield self.get_text(int(i))

    def iter_positioned(self, epoch: int, start: int, resume: dict | None = None
                        ) -> Iterator[tuple[str, None]]:
        """(text, None): an index is the whole position (`_StreamedDocs.iter_positioned`'s interface)."""
        for text in self.iter_docs(epoch, start):
            yield text, None

    def describe(self, epoch: int, position: int, source: Any) -> str:
        """The document at `position` of this rank's order in `epoch`, as the source numbers it."""
        row = self.source_row(int(self._order(epoch)[position]))
        return f"document {row} of {source!r} (counted from 0, files in sorted order)"


class _StreamedDocs:
    """Documents of a streamed (iterable) dataset.

    Resuming at document d continues from `datasets`' own saved position (``IterableDataset.state_dict``, which
    `iter_positioned` hands out with every document) without reading the first d documents again. Where that
    position would not give the same documents, resuming re-reads and skips d documents, with a one-line notice:
    a shuffled stream (datasets saves where its shards stand, not its shuffle buffer's content, so the order
    after the resume point would differ), a position saved without one (by an older zoo), or a `datasets`
    that cannot continue from its saved position (before 3.4). A shuffled stream's order is that of the installed
    `datasets` (its shuffle buffer draws differently across versions: 3.0 and 5.2 do), so re-reading it resumes
    exactly only under the version that read it (``zoo train --resume`` says when it is another).
    """

    commit: str | None = None  # the hub commit read, which open_documents asked the hub for and pinned the stream to

    def __init__(self, dataset, text_field: str, seed: int, shuffle: bool, buffer: int, source: Any = None):
        self.dataset, self.text_field = dataset, text_field
        self.seed, self.shuffle, self.buffer = seed, shuffle, buffer
        self.source = source  # named in errors

    @property
    def resumable(self) -> bool:
        """Whether the stream's position can be saved and continued from (see the class docstring): datasets 3.4+
        (3.0-3.3 save a state their load_state_dict does not take back)."""
        return not self.shuffle and hasattr(self.dataset, "state_dict") and hasattr(self.dataset, "load_state_dict") \
            and _datasets_at_least("3.4")

    def iter_docs(self, epoch: int, start: int) -> Iterator[str]:
        for text, _ in self.iter_positioned(epoch, start):
            yield text

    def iter_positioned(self, epoch: int, start: int, resume: dict | None = None
                        ) -> Iterator[tuple[str, dict | None]]:
        """(text, the stream's position at the start of that document, or None) from document `start` of `epoch`
        on. `resume`: the position saved at document `start` (from an earlier pass), to continue from without
        re-reading; without a usable one, the first `start` documents are read and skipped."""
        from datasets.table import CastError

        ds = self.dataset
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(epoch)  # datasets reseeds the shuffle with seed + epoch
        track = self.resumable
        skip = start
        if start > 0:
            why = self._why_not_resumable(ds, epoch, resume)
            if why is None:
                ds.load_state_dict(resume)
                skip = 0
            else:
                warnings.warn(f"data: resuming the stream of {self.source!r} at document {start} of epoch {epoch} "
                              f"re-reads and skips {start} documents: {why}", stacklevel=2)
        read = start - skip  # documents of this epoch read so far (those before a loaded position too)
        examples = iter(ds)
        try:
            try:
                first = next(examples, None)  # datasets applies a loaded position as the iteration starts
            finally:
                if start > 0 and skip == 0:
                    ds.load_state_dict(None)  # later passes over the dataset start at their beginning
            if first is None:
                return
            before = resume if skip == 0 and start > 0 else None
            for example in itertools.chain([first], examples):
                after = ds.state_dict() if track else None  # the position after this example
                read += 1
                if self.text_field not in example:  # a stream whose columns were not known before it was read (a
                    # dataset without features: open_documents could not check the field) ended in a bare KeyError
                    raise ValueError(f"data.text_field: the streamed dataset {self.source!r} has no column "
                                     f"{self.text_field!r}: {self.describe(epoch, read - 1, self.source)} has "
                                     f"columns {sorted(example)}")
                if skip:
                    skip -= 1
                else:
                    yield example[self.text_field], before
                before = after
        except CastError as e:  # datasets' own said neither the source nor what to do
            raise _mixed_columns_error(e, self.source, self.text_field) from e
        except KeyError as e:  # the held-out split's filter reading the field of such a stream (see above)
            if e.args != (self.text_field,):
                raise
            raise ValueError(f"data.text_field: the streamed dataset {self.source!r} has no column "
                             f"{self.text_field!r} (past the first {read} documents of epoch {epoch} of this "
                             f"process's stream)") from e
        except DECOMPRESSION_ERRORS as e:  # a compressed file of the source cut short or corrupt, as datasets reads it
            broken = _decompression_error(e, _folder_files(self.source), self.source)  # (a local folder's)
            if broken is not None:
                raise broken from e
            if not isinstance(e, (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)):
                raise  # (bz2's is a bare OSError, as a network failure is)
            raise ValueError(
                f"data.source: the streamed dataset {self.source!r} holds a compressed file that is cut short or "
                f"corrupt ({type(e).__name__}: {e}), past the first {read} documents of epoch {epoch} of this "
                f"process's stream: decompress it again from its origin, or leave it out of the source") from e
        except UnicodeDecodeError as e:  # pyarrow's json reader keeps such bytes; datasets decodes them strictly
            raise ValueError(
                f"data.source: the streamed dataset {self.source!r} holds text that is not UTF-8 ({e}), past the "
                f"first {read} documents of epoch {epoch} of this process's stream: re-encode its files as UTF-8, or "
                f"set data.streaming: false to read them memory-mapped, where such bytes read as U+FFFD") from e

    def _why_not_resumable(self, ds, epoch: int, resume: dict | None) -> str | None:
        """None when `resume` continues `ds` in `epoch` exactly, else why not (for the notice)."""
        if self.shuffle:
            return ("datasets saves a shuffled stream's shard position but not its shuffle buffer, so continuing "
                    "from it would give other documents (data.shuffle: false continues without re-reading)")
        if not self.resumable:
            import datasets

            return (f"datasets {datasets.__version__} cannot continue a stream from its saved position "
                    f"(IterableDataset.state_dict / load_state_dict, 3.4+)")
        if resume is None:
            return "the checkpoint holds no saved stream position (written by an older zoo)"
        if resume.get("epoch") != epoch or not _same_layout(resume.get("examples_iterable"),
                                                           ds.state_dict().get("examples_iterable")):
            return "the saved stream position is not one of this dataset's"
        return None

    def describe(self, epoch: int, position: int, source: Any) -> str:
        """The document at `position` of this process's order in `epoch` (a stream numbers no documents)."""
        return f"the document at position {position} of epoch {epoch} of this process's stream of {source!r}"


def _datasets_at_least(version: str) -> bool:
    import datasets
    from packaging.version import Version

    return Version(datasets.__version__) >= Version(version)


def _same_layout(saved: Any, fresh: Any) -> bool:
    """Whether a saved `datasets` iteration state has the nesting of a fresh one (the same keys and iterable types;
    the counts may differ, and a None placeholder matches anything)."""
    if saved is None or fresh is None:
        return True
    if isinstance(saved, dict) and isinstance(fresh, dict):
        return (saved.keys() == fresh.keys() and saved.get("type") == fresh.get("type")
                and all(_same_layout(saved[k], fresh[k]) for k in saved))
    if isinstance(saved, list) and isinstance(fresh, list):
        return len(saved) == len(fresh) and all(map(_same_layout, saved, fresh))
    return isinstance(saved, dict) == isinstance(fresh, dict) and isinstance(saved, list) == isinstance(fresh, list)


def _mixed_columns_error(error, source: Any, text_field: str) -> ValueError:
    """A streamed dataset casts every record to the columns of its first file (or its card's features), so a file
    with other columns ends the stream mid-run in datasets' CastError ("Couldn't cast ... because column names
    don't match"): the same, naming the source, the columns and what to do."""
    found = list(getattr(error, "table_column_names", []) or [])
    expected = list(getattr(error, "requested_column_names", []) or [])
    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    what = "; ".join(part for part in (f"column(s) {extra} that the first file has not" if extra else "",
                                       f"no column(s) {missing}" if missing else "") if part)
    return ValueError(
        f"data.source: the streamed dataset {source!r} mixes columns: a file of it has {what or 'other columns'} "
        f"(its columns {found}; the stream's, taken from its first file or its card, {expected}). datasets casts "
        f"each record of a stream to one set of columns, whatever data.text_field ({text_field!r}) reads. Give "
        f"every file of the source the same columns (e.g. keep only {text_field!r}), or point data.source at "
        f"files that share their columns (a folder holding only those; for a hub dataset, a data.config_name or "
        f"data.split whose files agree)")


def _file_columns(path: str, builder: str, records: int = 1000) -> list[str] | None:
    """The columns of one local file: a .parquet file's schema, else the keys of the first `records` JSON lines
    (None where they cannot be read: a .json file holding one document rather than JSON lines)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    keys: dict[str, None] = {}
    try:
        with open_data_file(path) as raw:  # (a compressed one decompressed: corpus.jsonl.gz)
            f = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
            for line in itertools.islice((line for line in f if line.strip()), records):
                record = json.loads(line)
                if not isinstance(record, dict):
                    return None
                keys.update(dict.fromkeys(record))
    except (*DECOMPRESSION_ERRORS, ValueError):
        return None
    return list(keys)


def _mixed_local_columns_error(error, files: list[str], builder: str, text_field: str) -> ValueError:
    """datasets reads local .jsonl / .parquet files as one table with the columns of its first file, and a file with
    other columns fails in a CastError that names neither the file nor what to do: the same, naming each file's
    columns (grouped by their columns) and the fix."""
    groups: dict[tuple[str, ...] | None, list[str]] = {}
    for f in files:
        columns = _file_columns(f, builder)
        groups.setdefault(tuple(sorted(columns)) if columns is not None else None, []).append(f)
    expected = list(getattr(error, "requested_column_names", []) or []) or list(_file_columns(files[0], builder) or [])

    def named(paths: list[str]) -> str:
        return ", ".join(repr(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

    per_file = "; ".join(f"{named(paths)}: columns {list(cols) if cols is not None else '(not read)'}"
                         for cols, paths in groups.items())
    return ValueError(
        f"data.source: the {builder} files of the source have different columns, which datasets cannot read as one "
        f"table (it casts every file to the columns of the first, {expected}). Columns by file: "
        f"{per_file}. Give every file the same columns (e.g. keep only {text_field!r}, the column "
        f"data.text_field reads), or point data.source at files that share their columns")


def _looks_local(pattern: str) -> bool:
    """A path or glob rather than a hub name: absolute, ./ or ~ relative, a wildcard, or a data-file suffix."""
    return (os.path.isabs(pattern) or pattern.startswith((".", "~")) or any(c in pattern for c in "*?[")
            or local_builder(pattern) is not None)


def _local_files(source: str | list[str]) -> list[str] | None:
    """The sorted local files named by `source` (paths or globs), each once, or None if it names none (a hub name).

    A path or glob that matches no file is refused by name rather than tried as a hub dataset (or, in a list,
    silently dropped); so is any item of a list that matches no file (a list names files: a hub dataset, a local folder
    or 'stdlib' in a list reached load_dataset as the list, which failed in a TypeError). A file matched under two
    spellings (absolute and relative, through a symlink) is read once."""
    patterns = [source] if isinstance(source, str) else list(source)
    files: list[str] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        matches = matching_files(pattern)
        if not matches and (not isinstance(source, str) or (_looks_local(pattern) and not os.path.isdir(path))):
            listed = "" if isinstance(source, str) else \
                "; a hub dataset, a local folder or 'stdlib' is given as one string, not in a list"
            raise ValueError(f"data.source: no file matches {pattern!r}; local sources are .txt, .jsonl/.json (or "
                             f"compressed: .txt.gz, ...) or .parquet files (paths or globs){listed}")
        files.extend(matches)
    return distinct_files(files) or None


def matching_files(pattern: str) -> list[str]:
    """The files a path or glob names, sorted: the path itself where it is a file, though its name holds glob
    characters ('shard[0].jsonl' matched 'shard0.jsonl' only), else the glob's matches (recursive), folders left out."""
    path = os.path.expanduser(pattern)
    return [path] if os.path.isfile(path) else [m for m in sorted(glob.glob(path, recursive=True)) if os.path.isfile(m)]


def distinct_files(files: list[str]) -> list[str]:
    """`files` sorted, each once: a file matched under two spellings (absolute and relative, './rows.jsonl' and the
    glob '*.jsonl', through a symlink) keeps its first spelling in sorted order."""
    unique: dict[str, str] = {}  # the real path -> the first spelling in sorted order
    for f in sorted(set(files)):
        unique.setdefault(os.path.realpath(f), f)
    return list(unique.values())


def _saved_to_disk(source: str | list[str]) -> bool:
    """Whether `source` is a local folder written by ``Dataset.save_to_disk`` (its state.json; one split, read
    memory-mapped with ``datasets.load_from_disk``). A DatasetDict's folder is one of split folders, which
    `datasets.load_dataset` reads as a local folder of data files."""
    folder = os.path.expanduser(source) if isinstance(source, str) else None
    return folder is not None and os.path.isfile(os.path.join(folder, "state.json"))


# the file names datasets' folder loader takes for metadata (FolderBasedBuilder.METADATA_FILENAMES): left out when it
# picks the kind of a folder's data files, and read as data only where they are of that kind
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def _folder_kinds(source: str | list[str]) -> dict[str, list[str]]:
    """The data files of a local folder `source` by the builder that reads them ('text', 'json', 'parquet'; paths
    relative to it, hidden ones and those datasets takes for no data, README.md or dataset_info.json, skipped as
    datasets skips them); {} for another source."""
    folder = os.path.expanduser(source) if isinstance(source, str) else None
    if folder is None or not os.path.isdir(folder):
        return {}
    try:
        from datasets.data_files import FILES_TO_IGNORE as ignored
    except ImportError:  # (reading the folder then says how to install datasets)
        ignored = []
    kinds: dict[str, list[str]] = {}
    metadata: dict[str, list[str]] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for n in sorted(names):
            if not n.startswith(".") and n not in ignored and (builder := local_builder(n)) is not None:
                # (an image folder's metadata.jsonl beside .txt files: datasets picks the kind of the other files and
                # reads no metadata file of another kind; the folder was said to hold several kinds, and was no .txt
                # folder: data.sample_by was refused, and a .txt file that is not UTF-8 failed to load)
                which = metadata if n in _METADATA_FILES else kinds
                which.setdefault(builder, []).append(Path(root, n).relative_to(folder).as_posix())
    for builder, names in metadata.items():  # read as data where they are of the files' kind (or are all there is)
        if builder in kinds or not kinds:
            kinds[builder] = sorted(kinds.get(builder, []) + names)
    return kinds


def _folder_files(source: Any) -> list[str]:
    """The data files of a local folder `source` (`_folder_kinds`'), as paths; [] for another source."""
    folder = os.path.expanduser(source) if isinstance(source, str) else None
    return [os.path.join(folder, name) for names in _folder_kinds(source).values() for name in names] if folder else []


def _parquet_rows(path: str) -> int | None:
    """The rows of a .parquet file as its footer says, or None: not a parquet file by name, or one whose footer does
    not read (datasets then says so)."""
    if local_builder(path) != "parquet":
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError):  # (pyarrow's ArrowInvalid is a ValueError)
        return None


# the byte order marks of UTF-32 and UTF-16 text (UTF-32's first: UTF-32LE's begins with UTF-16LE's), and the
# encoding each names
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))


def _bomless_wide(head: bytes) -> str | None:
    """The encoding ("UTF-32LE", "UTF-32BE", "UTF-16LE", "UTF-16BE") of text without a byte order mark whose first
    bytes `head` are UTF-32 or UTF-16 code units (Python's utf-32-le and utf-16-le write no mark), else None. UTF-32:
    every 4-byte unit is a code point (< 0x110000: two NUL bytes at its high end); UTF-16: a quarter or more of the
    bytes NUL, nine in ten of them on one side of their 2-byte units (the high byte of Latin text). UTF-8 text holds
    no NUL byte."""
    if b"\x00" not in head:
        return None
    units = [head[i:i + 4] for i in range(0, len(head) // 4 * 4, 4)]
    if units and all(u[3] == 0 and u[2] <= 0x10 for u in units):
        return "UTF-32LE"
    if units and all(u[0] == 0 and u[1] <= 0x10 for u in units):
        return "UTF-32BE"
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if even + odd >= len(head) / 4:
        if odd >= 9 * even:
            return "UTF-16LE"
        if even >= 9 * odd:
            return "UTF-16BE"
    return None


def _refuse_utf16(files: list[str]) -> None:
    """Refuse a .txt file that begins with a UTF-16 or UTF-32 byte order mark (little- or big-endian), as Windows'
    Notepad saves "Unicode", or whose first bytes are UTF-16 or UTF-32 text without one (`_bomless_wide`): read as
    UTF-8 with replacement, its text trained as NUL bytes between its characters, without a word."""
    for f in files:
        if Path(f).name.lower().endswith(_COMPRESSION_SUFFIXES):
            continue  # (its bytes are the compressor's)
        with open(f, "rb") as raw:
            head = raw.read(4096)
        for bom, encoding in _WIDE_BOMS:
            if head.startswith(bom):
                nuls = "a NUL byte" if encoding == "UTF-16" else "NUL bytes"
                notepad = ", or Notepad's 'Save as' UTF-8" if encoding == "UTF-16" else ""
                raise ValueError(f"data.source: {f!r} is {encoding} text (it begins with a {encoding} byte order "
                                 f"mark), which reads as UTF-8 with {nuls} between its characters: re-encode it as "
                                 f"UTF-8 (iconv -f {encoding} -t UTF-8 IN > OUT{notepad})")
        if encoding := _bomless_wide(head):
            raise ValueError(f"data.source: {f!r} is {encoding} text without a byte order mark (its first "
                             f"{len(head)} bytes are {encoding} code units, NUL bytes between the characters), which "
                             f"reads as UTF-8 with those NUL bytes: re-encode it as UTF-8 (iconv -f {encoding} -t "
                             f"UTF-8 IN > OUT)")


def _text_folder(source: str | list[str]) -> bool:
    """Whether `source` is a local folder whose data files are all .txt files, which `datasets.load_dataset` reads with
    its text builder (one line per document unless given another sample_by)."""
    return set(_folder_kinds(source)) == {"text"}


def local_source_files(source: str | list[str]) -> dict[str, list[int]] | None:
    """What a local source is made of, cheaply: {file: [size in bytes, modification time in ns]} of its local files
    (as `_local_files` lists them), or of a local folder's data files (relative to it, as `source_data_file` picks
    them), else None (the built-in corpus, a hub dataset). A checkpoint records it so that ``--resume`` can say when the
    source changed under the run (its document order with it); the files are not read."""
    folder = os.path.expanduser(source) if isinstance(source, str) else None
    if folder is not None and os.path.isdir(folder):
        files = {}
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            files |= {rel: os.path.join(root, n) for n in names
                      if source_data_file(source, rel := Path(root, n).relative_to(folder).as_posix())}
    else:
        local = None if source == "stdlib" else _local_files(source)
        if local is None:
            return None
        files = {f: f for f in local}
    return {name: [(st := os.stat(path)).st_size, st.st_mtime_ns] for name, path in sorted(files.items())}


def source_data_file(source: str | list[str], name: str) -> bool:
    """Whether `local_source_files` lists file `name` of `source`: for a local folder (not one written by
    ``Dataset.save_to_disk``, whose files are all its data), a file datasets' folder loader may read as data, not a
    hidden one nor README.md, dataset_info.json and the others datasets ignores (a README edited under a run said the
    source changed); every file of another source."""
    if not (isinstance(source, str) and os.path.isdir(os.path.expanduser(source))) or _saved_to_disk(source):
        return True
    try:
        from datasets.data_files import FILES_TO_IGNORE as ignored
    except ImportError:
        ignored = []
    parts = name.split("/")
    return (not any(p.startswith(".") for p in parts) and not any(p.startswith("__") for p in parts[:-1])
            and parts[-1] not in ignored and local_builder(parts[-1]) is not None)


def _import_datasets(source):
    """The `datasets` package, which every source but the built-in 'stdlib' is read with; an ImportError saying how to
    install it where it is missing (it is the `data` extra, not a core dependency)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"data.source: reading {source!r} needs the `datasets` package, which cannot be imported "
                          f"({e}): pip install 'hybrid-zoo[data]' (or 'datasets>=3'). The built-in source 'stdlib' "
                          f"needs nothing.") from e
    return datasets


def _held_out_rows(dataset, text_field: str, holdout: float) -> np.ndarray:
    """Which rows of an indexed dataset are held out, keyed by the document's text as a streamed one is: keyed by the
    row index, a file added or sorted in before the others moved held-out documents into training, the same corpus
    held out other documents streamed than not, and a repeated document was trained on and evaluated."""
    import pyarrow as pa

    column = dataset.with_format("arrow")[:][text_field]  # zero-copy slices of the memory-mapped table
    held = []
    for chunk in column.chunks:
        if pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):  # the UTF-8 bytes, not decoded
            width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
            offsets = np.frombuffer(chunk.buffers()[1], dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
            data = memoryview(chunk.buffers()[2] or b"")
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            keys = (zlib.crc32(data[a:b]) if ok else zlib.crc32(b"None")
                    for a, b, ok in zip(offsets[:-1].tolist(), offsets[1:].tolist(), valid.tolist()))
        else:  # not text: refused when read; keyed as the streamed filter keys it
            keys = (zlib.crc32(str(t).encode("utf-8", "surrogatepass")) for t in chunk.to_pylist())
        held.append(np.fromiter(keys, dtype=np.int64, count=len(chunk)) % 1_000_000 < holdout * 1_000_000)
    return np.concatenate(held) if held else np.zeros(0, dtype=bool)


def _json_line(files: list[str], row: int, text_field: str) -> tuple[str, int] | None:
    """(the file, its line counted from 1) of record `row` (counted from 0 across `files` in their order, blank lines
    skipped as datasets' json reader skips them) of local JSON-lines files, where that line is a record whose
    `text_field` is not text; None where it is not (a .json file holding one JSON document, a file that does not
    read)."""
    seen = 0
    try:
        for f in files:
            with open_data_file(f) as raw:
                for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), 1):
                    if not line.strip():
                        continue
                    if seen == row:
                        record = json.loads(line)
                        found = isinstance(record, dict) and not isinstance(record.get(text_field), str)
                        return (f, number) if found else None
                    seen += 1
    except (*DECOMPRESSION_ERRORS, ValueError):  # (json's JSONDecodeError is a ValueError)
        return None
    return None


def _check_indexed_texts(dataset, cfg: DataConfig, files: list[str] | None = None) -> None:
    """Refuse, as it opens, an indexed dataset whose text column holds a document that is not text: a column of
    another type (numbers, lists), or a null (a record without the field). Such a document was refused only when the
    stream reached it, which in a large shuffled corpus was hours into the run, and again on every resume. `files`:
    the local files read (in their order), whose file and line of a JSON-lines record the message names."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:  # rows selected from a larger table: reading them would copy
        return  # (the stream refuses such a document when it reaches it)
    column = dataset.data.column(cfg.text_field)  # the memory-mapped table's column, not read (its null count is kept)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind) or \
        getattr(pa.types, "is_string_view", lambda _: False)(kind)
    if textual and not column.null_count or not len(column):
        return
    first = int(pc.index(pc.is_null(column), True).as_py()) if textual else 0
    value = column[first].as_py()
    others = f" ({column.null_count - 1} more are null too)" if textual and column.null_count > 1 else \
        f" (the column's type is {column.type})" if not textual else ""
    missing = " (a record without the field reads as None)" if value is None else ""
    # several files, or blank lines, number the documents otherwise than any one file's lines do
    at = _json_line(files, first, cfg.text_field) if files and local_builder(files[0]) == "json" else None
    where = f": line {at[1]} of {at[0]!r}" if at is not None else ""
    raise ValueError(f"data.text_field: document {first} of {cfg.source!r} (counted from 0, files in sorted "
                     f"order{where}) holds {type(value).__name__} {value!r:.40} in {cfg.text_field!r}, not "
                     f"text{missing}{others}")


def _hub_commit(dataset) -> str | None:
    """The hub commit (sha) that `datasets.load_dataset` read a non-streamed hub dataset at, from where it cached the
    dataset (<cache>/<name>/<config>/<version>/<commit>/<name>-<split>.arrow, in datasets 3.0 to 5.2); None where it
    does not tell without asking the hub again: a streamed dataset, or a cache folder not named by a commit sha."""
    files = getattr(dataset, "cache_files", None) or []
    folders = {Path(f["filename"]).parent.name for f in files if "filename" in f}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    return folder if re.fullmatch(r"[0-9a-f]{40}", folder) else None


def _hub_head(source: str, revision: str | None) -> tuple[str | None, str | None]:
    """(the commit sha that `revision` of the hub dataset `source` is at, None), or (None, why it is not known):
    offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or the hub did not answer within 10 s or refused (no network, a
    private or unknown dataset; `datasets.load_dataset` then says what it says). A commit sha is its own answer."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision, None
    import datasets

    if datasets.config.HF_HUB_OFFLINE or any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
                                             for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None, "offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"
    from huggingface_hub import HfApi

    try:
        sha = HfApi().dataset_info(source, revision=revision, timeout=10).sha
    except Exception as e:  # noqa: BLE001 - any failure of the look-up leaves the run as it was, unpinned
        return None, f"asking the hub failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return (sha, None) if sha else (None, "the hub's answer names no commit")


def _check_text_field(columns, cfg: DataConfig) -> None:
    if columns is not None and cfg.text_field not in columns:
        raise ValueError(f"data.text_field: the dataset has no column {cfg.text_field!r}; its columns are "
                         f"{sorted(columns)}")


def _check_one_split(cfg: DataConfig, what: str) -> None:
    """The built-in corpus and local files are one split, held out from by `holdout`: a split or eval_split
    naming another one would be ignored (and an eval_split with holdout 0 evaluated on the training documents)."""
    if cfg.eval_split is not None:
        raise ValueError(f"data.eval_split: {cfg.eval_split!r} applies to hub datasets and local folders (their "
                         f"splits); {what} one split, from which data.holdout holds out the evaluation "
                         f"documents: unset eval_split and set holdout > 0, or put the files in a folder "
                         f"(e.g. train.jsonl and validation.jsonl)")
    if cfg.split != "train":
        raise ValueError(f"data.split: {cfg.split!r} applies to hub datasets and local folders; {what} one "
                         f"split: leave split at 'train'")
    if cfg.config_name is not None:
        raise ValueError(f"data.config_name: {cfg.config_name!r} names a hub dataset's configuration; {what} read "
                         f"without one, so it would be ignored: unset config_name")
    if cfg.revision is not None:
        raise ValueError(f"data.revision: {cfg.revision!r} names a hub dataset's branch, tag or commit; {what} not "
                         f"on the hub, so it would be ignored: unset revision")


def open_documents(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1
                   ) -> _IndexedDocs | _StreamedDocs:
    """This rank's share of the documents of `split` ('train' or 'eval'), in a deterministic order.

    Evaluation documents are never shuffled. Raises ValueError naming the field when the source, split or
    text field does not exist, or when there is no evaluation data (no eval_split and holdout 0).
    """
    if split not in ("train", "eval"):  # any other read the training documents as 'train' does, unshuffled, one pass
        raise ValueError(f"split: expected 'train' or 'eval' (the training or the evaluation documents), got "
                         f"{split!r}; a dataset's own splits are named by data.split and data.eval_split")
    shuffle = cfg.shuffle and split == "train"
    if split == "eval" and cfg.eval_split is None and cfg.holdout == 0:
        raise ValueError("data.holdout: is 0 and data.eval_split is unset, so there is no evaluation data; "
                         "set one, or eval.every=0")
    local = None if cfg.source == "stdlib" else _local_files(cfg.source)
    text_folder = local is None and cfg.source != "stdlib" and _text_folder(cfg.source)
    if local is None and not text_folder and cfg.sample_by != "document":
        raise ValueError(f"data.sample_by: {cfg.sample_by!r} splits local .txt files; {cfg.source!r} is "
                         f"{'the built-in corpus' if cfg.source == 'stdlib' else 'not one'} (leave it at 'document')")
    if cfg.source == "stdlib" or local is not None:
        _check_one_split(cfg, "the built-in corpus 'stdlib' is" if local is None else "local files are")
    if cfg.source == "stdlib":
        files = stdlib_files(split, cfg.holdout)
        return _IndexedDocs(len(files), lambda i: files[i].read_bytes().decode("utf-8", "replace"), cfg.seed,
                            shuffle, rank, world_size)

    if local is not None:
        kinds = {local_builder(f) for f in local}
        if None in kinds or len(kinds) != 1:
            suffixes = sorted({"".join(Path(f).suffixes[-2:] if Path(f).suffix.lower() in _COMPRESSION_SUFFIXES
                                       else Path(f).suffixes[-1:]) for f in local})
            raise ValueError(f"data.source: local files must all be one of .txt, .jsonl/.json (each possibly "
                             f"compressed: {', '.join(_COMPRESSION_SUFFIXES)}) or .parquet; got suffixes {suffixes}")
    datasets = _import_datasets(cfg.source)
    if local is not None:
        builder = kinds.pop()
        if builder != "text" and cfg.sample_by != "document":
            raise ValueError(f"data.sample_by: {cfg.sample_by!r} splits .txt files; {builder} files hold one "
                             f"document per record (leave sample_by at 'document')")
        # a .txt file with a byte that is not UTF-8 (a Latin-1 file) failed to load as a whole
        extra = {"sample_by": cfg.sample_by, "encoding_errors": "replace"} if builder == "text" else {}
        if builder == "text":
            _refuse_utf16(local)
        named = local if len(local) > 1 else local[0]
        if all(os.path.getsize(f) == 0 or _parquet_rows(f) == 0 for f in local):  # (datasets 3.0 and 4 report empty
            raise ValueError(f"data.source: cannot read {named!r} as {builder} (no records)")  # files differently)
        # a parquet file without rows (an empty shard) holds no document, and datasets failed on it, the other files
        # with it: "BatchSize must be greater than 0, got 0"
        local = [f for f in local if _parquet_rows(f) != 0]
        try:
            # datasets reads data_files as globs too: a name's own glob characters are escaped for it
            dataset = datasets.load_dataset(builder, data_files=[glob.escape(f) for f in local], split="train",
                                            **extra)
        except (StopIteration, datasets.exceptions.DatasetGenerationError) as e:  # empty or malformed files
            from datasets.table import CastError

            # files of other columns (datasets before 4.1: a DatasetGenerationCastError, its cause not a CastError)
            if isinstance(e.__cause__, CastError) or type(e).__name__ == "DatasetGenerationCastError":
                cast = e.__cause__ if isinstance(e.__cause__, CastError) else e
                raise _mixed_local_columns_error(cast, local, builder, cfg.text_field) from e
            if isinstance(e.__cause__, DECOMPRESSION_ERRORS) and (
                    broken := _decompression_error(e, local, cfg.source)) is not None:
                raise broken from e
            cause = f": {e.__cause__}" if e.__cause__ is not None else ""
            raise ValueError(f"data.source: cannot read {named!r} as {builder} "
                             f"({'no records' if isinstance(e, StopIteration) else type(e).__name__}{cause})") from e
        except ValueError as e:  # blank lines only: datasets' bare 'Instruction "train" corresponds to no data!'
            what = "no records" if "corresponds to no data" in str(e) else f"{type(e).__name__}: {e}"
            raise ValueError(f"data.source: cannot read {named!r} as {builder} ({what})") from e
        except DECOMPRESSION_ERRORS as e:  # a .gz file that is not gzip, cut short: datasets' own, naming no file
            if (broken := _decompression_error(e, local, cfg.source)) is None:
                raise
            raise broken from e
        streamed = False
    elif _saved_to_disk(cfg.source):  # datasets.load_dataset refuses it ("use load_from_disk"), which no config can
        _check_one_split(cfg, "a dataset saved with Dataset.save_to_disk is")
        try:
            dataset = datasets.load_from_disk(os.path.expanduser(cfg.source))
        except (OSError, ValueError) as e:  # a folder whose arrow files are missing or unreadable
            raise ValueError(f"data.source: cannot open {cfg.source!r}, a dataset saved with save_to_disk: {e}") from e
        streamed = False
    else:
        if cfg.revision is not None and isinstance(cfg.source, str) and os.path.isdir(os.path.expanduser(cfg.source)):
            raise ValueError(f"data.revision: {cfg.revision!r} names a hub dataset's branch, tag or commit; a local "
                             f"folder is read as it is on disk, so it would be ignored: unset revision")
        which = cfg.split if (split == "train" or cfg.eval_split is None) else cfg.eval_split
        # a stream tells no commit: ask the hub which one the revision is at, and read that one
        hub_stream = cfg.streaming and not os.path.isdir(os.path.expanduser(cfg.source))
        commit, unknown = _hub_head(cfg.source, cfg.revision) if hub_stream else (None, None)
        # (not UTF-8: a streamed one ended mid-run in a bare UnicodeDecodeError as it reached the file)
        extra: dict[str, Any] = {"encoding_errors": "replace"} if text_folder else {}
        if text_folder:
            _refuse_utf16(_folder_files(cfg.source))
        if text_folder and cfg.sample_by != "document":
            extra["sample_by"] = cfg.sample_by
        elif text_folder:  # (taking it as "document" now would change the documents of a run resumed on the folder)
            warnings.warn(f"data.source: {cfg.source!r} is a folder of .txt files, which datasets' folder loader reads "
                          f"one line per document (its text builder's default), not one file per document as "
                          f".txt files named by path or glob ({os.path.join(cfg.source, '*.txt')!r}) are read; a "
                          f"new run sets data.sample_by: line to say so, or 'paragraph'", stacklevel=2)
        empty = [name for name in _folder_kinds(cfg.source).get("parquet", [])
                 if _parquet_rows(os.path.join(os.path.expanduser(cfg.source), name)) == 0]
        if empty:  # datasets fails on them, the whole folder with them, in "BatchSize must be greater than 0, got 0"
            raise ValueError(f"data.source: the folder {cfg.source!r} holds parquet files without rows "
                             f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}), which datasets cannot "
                             f"read: delete them, or name the folder's files by glob "
                             f"({os.path.join(cfg.source, '*.parquet')!r}), which leaves files without rows out")
        if len(kinds := _folder_kinds(cfg.source)) > 1:  # datasets reads one kind and leaves the others out unsaid
            held = "; ".join(f"{len(names)} {kind} file(s): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                             for kind, names in sorted(kinds.items()))
            warnings.warn(f"data.source: the folder {cfg.source!r} holds data files of several kinds ({held}); "
                          f"datasets' folder loader reads the files of one kind only (its most common) and leaves "
                          f"the others out: keep one kind of file in it, or name the files to read by glob "
                          f"({os.path.join(cfg.source, '*.jsonl')!r})", stacklevel=2)
        try:
            dataset = datasets.load_dataset(cfg.source, cfg.config_name, split=which, streaming=cfg.streaming,
                                            revision=commit or cfg.revision, **extra)
        except (*DECOMPRESSION_ERRORS, ValueError, datasets.exceptions.DatasetGenerationError) as e:  # the last:
            # malformed files; a compressed file of a local folder that is not what its name says, or is cut short
            if isinstance(e.__cause__ or e, DECOMPRESSION_ERRORS) and (
                    broken := _decompression_error(e, _folder_files(cfg.source), cfg.source)) is not None:
                raise broken from e
            cause = f" ({type(e).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
            raise ValueError(f"data.source: cannot open {cfg.source!r} (config {cfg.config_name!r}, split "
                             f"{which!r}): {e}{cause}") from e
        streamed = cfg.streaming
        if unknown is not None:
            warnings.warn(f"data: the hub commit of {cfg.source!r} at "
                          f"{'its default branch' if cfg.revision is None else repr(cfg.revision)} is not known "
                          f"({unknown}), so checkpoints do not record it and --resume cannot say whether the dataset "
                          f"moved; data.revision set to a commit sha pins it", stacklevel=2)
    _check_text_field(dataset.column_names, cfg)

    use_holdout = local is not None or cfg.eval_split is None
    if streamed:
        if use_holdout and cfg.holdout > 0:
            keep_eval = split == "eval"
            # keyed by the text: a stream's indices follow its shard order, which the shuffle (per epoch) and
            # the split across processes change
            dataset = dataset.filter(lambda text: _in_holdout(str(text), cfg.holdout) == keep_eval,
                                     input_columns=cfg.text_field)
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        docs = _StreamedDocs(dataset, cfg.text_field, cfg.seed, shuffle, cfg.shuffle_buffer, cfg.source)
        docs.commit = commit
        return docs

    _check_indexed_texts(dataset, cfg, local)
    indices = np.arange(len(dataset))
    if use_holdout and cfg.holdout > 0:
        held = _held_out_rows(dataset, cfg.text_field, cfg.holdout)
        indices = indices[held] if split == "eval" else indices[~held]
    column = dataset.select_columns([cfg.text_field])

    def get_text(i: int) -> str:
        try:
            return column[int(indices[i])][cfg.text_field]
        except UnicodeDecodeError:  # pyarrow's json reader keeps invalid UTF-8 in a string column: decode as stdlib
            return column.data.column(cfg.text_field)[int(indices[i])].as_buffer().to_pybytes().decode(
                "utf-8", "replace")

    docs = _IndexedDocs(len(indices), get_text, cfg.seed, shuffle, rank, world_size, lambda i: int(indices[i]))
    docs.commit = None if local is not None else _hub_commit(dataset)
    return docs


# ---- packing -----------------------------------------------------------------------------------------------

@dataclass
class StreamState:
    """Where a stream stands: the next token is token `offset` of document `doc` (this rank's order) of
    `epoch`. JSON-serializable through `as_dict`.

    `source`: for a streamed dataset that can continue from it (`_StreamedDocs`), `datasets`' own position at
    the start of document `doc` (``IterableDataset.state_dict()``), from which a resumed run reads on without
    re-reading the documents before it; None elsewhere (and left out of `as_dict`)."""

    epoch: int = 0
    doc: int = 0
    offset: int = 0
    source: dict | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "doc": self.doc, "offset": self.offset}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass
class TextStream:
    """Rows and batches of a text source for one rank, resumable from a `StreamState`.

    Args:
        cfg: the data config.
        tokenizer: any tokenizer (`load_tokenizer`).
        split: 'train' (shuffled per epoch, endless) or 'eval' (fixed order; `rows` stops after one pass).
        rank, world_size: this process's share of the documents.
        chunk_len: for truncated BPTT: never start a document exactly at a multiple of chunk_len inside a
            row (one pad token is appended to the previous document instead), so a state carried into a
            chunk always belongs to the document that chunk continues.
    """

    cfg: DataConfig
    tokenizer: PreTrainedTokenizerBase
    split: str = "train"
    rank: int = 0
    world_size: int = 1
    chunk_len: int | None = None
    _docs: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.cfg.validate()
        if self.cfg.packing and self.chunk_len is not None and not (isinstance(self.chunk_len, int)
                                                                    and self.chunk_len >= 2):
            # with chunks of 1 token the pad before a document is itself a chunk, and the document starts the next
            raise ValueError(f"chunk_len: must be an integer >= 2 for packed rows (no document may start a chunk), "
                             f"got {self.chunk_len!r}")
        self._docs = open_documents(self.cfg, self.split, self.rank, self.world_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        if self.pad_id is None:  # load_tokenizer refuses such a tokenizer; one built by hand reaches here
            raise ValueError(f"tokenizer: {type(self.tokenizer).__name__} has neither a pad nor an eos token; rows are "
                             f"padded (and documents separated) with one: set tokenizer.pad_token / eos_token, or "
                             f"load it with zoo.data.text.load_tokenizer")
        bos, eos = document_wrap(self.tokenizer, self.cfg.add_bos, self.cfg.add_eos)
        self._prefix = np.array(bos, dtype=np.int64)
        self._suffix = np.array(eos, dtype=np.int64)

    def _documents(self, state: StreamState) -> Iterator[tuple[StreamState, np.ndarray]]:
        """(state at the start of the document, its tokens) from `state` on, crossing epochs for training."""
        epoch, doc, resume = state.epoch, state.doc, state.source
        while True:
            first, produced, empty = doc, False, 0
            texts = self._docs.iter_positioned(epoch, doc, resume)
            resume = None
            while group := list(itertools.islice(texts, _TOKENIZE_GROUP)):
                for i, (text, _) in enumerate(group):
                    if not isinstance(text, str):  # named as the source numbers it: doc + i is this rank's order
                        missing = " (a record without the field reads as None)" if text is None else ""
                        raise ValueError(f"data.text_field: {self._docs.describe(epoch, doc + i, self.cfg.source)} "
                                         f"holds {type(text).__name__} {text!r:.40} in {self.cfg.text_field!r}, "
                                         f"not text{missing}")
                for ids, (_, position) in zip(encode_texts(self.tokenizer, [text for text, _ in group]), group):
                    if len(ids):  # empty documents would only add bos/eos
                        produced = True
                        yield StreamState(epoch, doc, 0, position), np.concatenate([self._prefix, ids, self._suffix])
                    else:
                        empty += 1
                    doc += 1
            if self.split != "train":
                return
            if not produced and first == 0:  # (it said "no documents" of a source whose documents are all empty)
                read = f": the {empty} it holds are empty ({self.cfg.text_field!r} is '')" if empty else ""
                raise ValueError(f"data.source: no documents for rank {self.rank} of {self.world_size} in "
                                 f"{self.cfg.source!r} (split {self.split}){read}")
            epoch, doc = epoch + 1, 0

    def rows(self, state: StreamState | dict | None = None
             ) -> Iterator[tuple[dict[str, np.ndarray], StreamState]]:
        """Rows of `seq_len` tokens and the stream state after each row (see the module docstring)."""
        state = StreamState(**state) if isinstance(state, dict) else (state or StreamState())
        L = self.cfg.seq_len
        docs = self._documents(StreamState(state.epoch, state.doc, 0, state.source))
        current: np.ndarray | None = None
        where, offset = state, state.offset
        while True:
            pieces: list[np.ndarray] = []
            ignore: list[int] = []  # pad tokens that keep document starts off chunk boundaries
            filled = 0
            while filled < L:
                if current is None or offset >= len(current):
                    nxt = next(docs, None)
                    if nxt is None:
                        break
                    start, current = nxt
                    if start.doc != where.doc or start.epoch != where.epoch:
                        offset = 0
                    where = start
                    if offset >= len(current):  # resumed at the very end of a document: none of it is left
                        continue
                if self.cfg.packing and pieces and self.chunk_len and filled % self.chunk_len == 0:
                    pieces[-1] = np.append(pieces[-1], self.pad_id)
                    ignore.append(filled)
                    filled += 1
                    if filled >= L:
                        break
                take = min(L - filled, len(current) - offset)
                pieces.append(current[offset:offset + take])
                offset += take
                filled += take
                if not self.cfg.packing:
                    break
            if not pieces or (self.cfg.packing and filled < L):
                return  # the end of an evaluation pass: packed rows are always full
            yield self._make_row(pieces, ignore), StreamState(where.epoch, where.doc, offset, where.source)

    def _make_row(self, pieces: list[np.ndarray], ignore: list[int]) -> dict[str, np.ndarray]:
        L = self.cfg.seq_len
        lengths = np.array([len(p) for p in pieces])
        n = int(lengths.sum())
        input_ids = np.full(L, self.pad_id, dtype=np.int64)
        input_ids[:n] = np.concatenate(pieces)
        seq_idx = np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        position_ids = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
        labels = input_ids.copy()
        labels[starts] = IGNORE_INDEX  # a document's first token is never predicted from another one
        labels[ignore] = IGNORE_INDEX
        row = {"input_ids": input_ids, "labels": labels}
        if n < L:  # only unpacked rows are padded
            labels[n:] = IGNORE_INDEX
            mask = np.zeros(L, dtype=np.int64)
            mask[:n] = 1
            row["attention_mask"] = mask
            seq_idx = np.concatenate([seq_idx, np.full(L - n, seq_idx[-1], dtype=np.int32)])
            position_ids = np.concatenate([position_ids, np.arange(position_ids[-1] + 1,
                                                                   position_ids[-1] + 1 + L - n)])
        row["seq_idx"] = seq_idx
        row["position_ids"] = position_ids
        return row

    def batches(self, batch_size: int, state: StreamState | dict | None = None
                ) -> Iterator[tuple[dict[str, torch.Tensor], StreamState]]:
        """Batches of `batch_size` rows (tensors [B, L]) and the stream state after each batch.

        ``attention_mask`` is present when some row of the batch is padded (all-ones rows elsewhere).
        An evaluation stream ends with a last, smaller batch; a packed one drops its last, partial row.
        """
        rows = self.rows(state)
        while True:
            chunk = list(itertools.islice(rows, batch_size))
            if not chunk:
                return
            yield collate([r for r, _ in chunk]), chunk[-1][1]


def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into [B, L] tensors; adds an all-ones attention_mask to unpadded rows if any row has one."""
    if any("attention_mask" in r for r in rows):
        for r in rows:
            r.setdefault("attention_mask", np.ones_like(r["input_ids"]))
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


__all__ = ["IGNORE_INDEX", "SPECIAL_IDS", "ByteTokenizer", "DataConfig", "StreamState", "TextStream", "collate",
           "encode_texts", "load_tokenizer", "local_source_files", "open_documents", "source_data_file", "stdlib_files",
           "stdlib_root", "stdlib_version"]
