"""Text data: byte tokenizer, built-in corpus, packing with document boundaries, resumable streams."""

from __future__ import annotations

import itertools
import json
import os
import re
import string
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stream_reads

from zoo.data.text import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataConfig,
    StreamState,
    TextStream,
    _datasets_at_least,
    collate,
    encode_texts,
    load_tokenizer,
    open_documents,
    stdlib_files,
)
from zoo.train import _routed_tokens


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def letter_docs(tmp_path):
    """A local jsonl corpus whose document i is one letter repeated (lengths 1..90): a mixed segment shows."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    rng = np.random.default_rng(0)
    docs = [string.ascii_letters[i % 52] * int(rng.integers(1, 90)) for i in range(120)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path), docs


def test_byte_tokenizer_ids_and_offline_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    text = "héllo <eos> wörld 🙂\x00"
    ids = encode_texts(tok, [text])[0]
    assert ids.tolist() == list(text.encode("utf-8")), "ids must be the UTF-8 bytes (special spellings too)"
    general = tok([text], add_special_tokens=False, split_special_tokens=True)["input_ids"][0]
    assert general == ids.tolist(), "the numpy fast path must equal the tokenizer's own encoding"
    assert (len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (259, 256, 257, 258)
    assert tok.decode(ids.tolist()) == text
    tok.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert again(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids.tolist()
        assert again.eos_token_id == 258 and again.pad_token_id == 256
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


def test_a_tokenizer_that_cannot_load_is_named_as_the_tokenizer(tmp_path, monkeypatch):
    # transformers called a missing folder an invalid hub id, and an empty folder's error named no field
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "nope"), "./nope"):
        with pytest.raises(ValueError, match=rf"^tokenizer: '{re.escape(missing)}': no such tokenizer folder"):
            load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^tokenizer: 'empty': "):
        load_tokenizer("empty")


def test_a_tokenizer_folder_under_home_spelled_with_a_tilde_loads(tmp_path, monkeypatch):
    # '~/tok' (a config file's tokenizer:, or a quoted argument) passed the folder check, which expands it, and then
    # reached transformers unexpanded, which refused it as an invalid hub id
    monkeypatch.setenv("HOME", str(tmp_path))
    ByteTokenizer().save_pretrained(tmp_path / "byte")
    ByteTokenizer().save_pretrained(tmp_path / "generic")  # the same ids, loaded by AutoTokenizer
    config = tmp_path / "generic" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert isinstance(load_tokenizer("~/byte"), ByteTokenizer)
    generic = load_tokenizer("~/generic")
    assert not isinstance(generic, ByteTokenizer) and generic.eos_token_id == 258
    assert generic("hé", add_special_tokens=False)["input_ids"] == list("hé".encode())


def test_stdlib_corpus_split_is_disjoint_sorted_and_stable():
    train, held = stdlib_files("train", 0.05), stdlib_files("eval", 0.05)
    assert len(train) > 500 and 0 < len(held) < len(train) / 5
    assert not set(train) & set(held)
    assert train == sorted(train, key=lambda p: p.as_posix()) and train == stdlib_files("train", 0.05)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in train + held)


def _segments(row: dict[str, np.ndarray]):
    """(start, stop) of each seq_idx segment of a row, checking the segment bookkeeping on the way."""
    seq_idx = row["seq_idx"]
    assert seq_idx[0] == 0 and set(np.diff(seq_idx).tolist()) <= {0, 1}, "seq_idx counts documents from 0"
    starts = [0] + (np.flatnonzero(np.diff(seq_idx)) + 1).tolist()
    stops = starts[1:] + [len(seq_idx)]
    for a, b in zip(starts, stops):
        assert row["position_ids"][a:b].tolist() == list(range(b - a)), "positions restart at each document"
        assert row["labels"][a] == IGNORE_INDEX, "a document's first token is never a target"
    return list(zip(starts, stops))


def test_packed_rows_never_mix_documents(tok, letter_docs):
    source, docs = letter_docs
    cfg = DataConfig(source=source, seq_len=64, holdout=0.0, shuffle=True, seed=3)
    stream = TextStream(cfg, tok)
    rows = [row for row, _ in itertools.islice(stream.rows(), 60)]
    pieces = []
    for row in rows:
        assert "attention_mask" not in row, "packed rows are full"
        for a, b in _segments(row):
            body = [t for t in row["input_ids"][a:b].tolist() if t < 256]
            assert len(set(body)) <= 1, f"segment [{a}, {b}) mixes documents: {bytes(body)!r}"
            pieces.append(row["input_ids"][a:b])
        inner = (row["labels"] != IGNORE_INDEX)
        assert (row["labels"][inner] == row["input_ids"][inner]).all()
    # every token of the epoch's documents, in order, exactly once: bos + text + eos per document
    order = open_documents(cfg, "train")
    expected = np.concatenate([np.concatenate([[257], encode_texts(tok, [d])[0], [258]])
                               for d in order.iter_docs(0, 0)])
    got = np.concatenate(pieces)
    assert np.array_equal(got, expected[:len(got)])


@pytest.mark.parametrize("packing,chunk_len", [(True, None), (True, 3), (False, None)],
                         ids=["packed", "packed-chunks", "unpacked"])
@pytest.mark.parametrize("bos,eos", [(True, True), (False, False)], ids=["wrapped", "bare"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_token_of_an_epoch_comes_out_once_and_only_text_is_scored(tok, tmp_path, packing, chunk_len, bos, eos,
                                                                        world_size):
    """An independent count: the tokens of each process's documents (empty ones, one longer than three rows, UTF-8
    of several widths among them), epoch after epoch in its own order, are the real tokens of its rows in order, none
    lost or doubled at a row or epoch boundary; unpacked rows end each epoch exactly. Every label is its token but at
    a document's first token, a pad or a chunk filler; seq_idx and position_ids restart at every document."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    rng = np.random.default_rng(5)
    docs = ["".join(rng.choice(list("ab é€🙂\n"), size=int(rng.integers(0, 30)))) for _ in range(37)]
    docs[4], docs[9], docs[20] = "", "long " * 12, "🙂"
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    L = 16
    cfg = DataConfig(source=str(path), seq_len=L, holdout=0.0, packing=packing, add_bos=bos, add_eos=eos, seed=9)
    wrap = ([tok.bos_token_id] if bos else [], [tok.eos_token_id] if eos else [])
    every = []
    for rank in range(world_size):
        share = open_documents(cfg, "train", rank, world_size)
        expected = [[t for d in share.iter_docs(epoch, 0) if d for t in wrap[0] + list(d.encode()) + wrap[1]]
                    for epoch in range(3)]
        assert expected[0] != expected[1], "reshuffled per epoch"
        out: list[int] = []
        per_epoch = [0, 0, 0]
        for row, state in TextStream(cfg, tok, rank=rank, world_size=world_size, chunk_len=chunk_len).rows():
            if state.epoch == 2:
                break
            ids, labels = row["input_ids"], row["labels"]
            real = row.get("attention_mask", np.ones(L, dtype=np.int64)).astype(bool)
            filler = real & (ids == tok.pad_token_id)  # chunk fillers: the byte tokenizer's text holds no pad
            assert bool(filler.any()) <= (chunk_len is not None)
            starts = {a for a, _ in _segments(row)}
            for i in range(L):
                scored = real[i] and not filler[i] and i not in starts
                assert labels[i] == (ids[i] if scored else IGNORE_INDEX), (i, ids.tolist(), labels.tolist())
            kept = ids[real & ~filler].tolist()
            out += kept
            per_epoch[state.epoch] += len(kept)
        assert out == (expected[0] + expected[1] + expected[2])[:len(out)]
        assert len(out) >= len(expected[0]) + len(expected[1]) - L, "every token of two epochs came out"
        if not packing:  # a document never shares a row, so an epoch ends with a row
            assert per_epoch[:2] == [len(expected[0]), len(expected[1])]
        every += list(share.iter_docs(0, 0))
    assert sorted(every) == sorted(docs), "the processes' shares are the documents, each once"


def test_chunk_boundaries_never_start_a_document(tok):
    cfg = DataConfig(seq_len=256, holdout=0.01)
    stream = TextStream(cfg, tok, chunk_len=32)
    for row, _ in itertools.islice(stream.rows(), 40):
        segments = _segments(row)
        starts = {a for a, _ in segments}
        assert not {k for k in range(32, 256, 32)} & starts
        for a, _ in segments[1:]:  # the filler before a boundary-adjacent start is not a target
            assert row["labels"][a] == IGNORE_INDEX


def test_the_pads_that_keep_documents_off_chunk_boundaries_are_no_targets(tok, letter_docs):
    """Short documents (letter_docs) with chunks of 4 tokens: about one document in four would start on a chunk
    boundary, so the stream puts a pad before it. No document starts on a boundary, and no pad is a target (the pad
    is not text: the row never predicts it). The built-in corpus's long files reach a boundary too rarely to show
    either."""
    source, _ = letter_docs
    stream = TextStream(DataConfig(source=source, seq_len=64, holdout=0.0), tok, chunk_len=4)
    fillers = 0
    for row, _ in itertools.islice(stream.rows(), 8):
        starts = {a for a, _ in _segments(row)}
        assert not starts & set(range(4, 64, 4)), "a document starts on a chunk boundary"
        pads = row["input_ids"] == tok.pad_token_id
        fillers += int(pads.sum())
        assert (row["labels"][pads] == IGNORE_INDEX).all(), "a filler pad is a target"
        # an MoE's load-balancing statistics under truncated BPTT leave out these pads and only these (zoo.train)
        routed = _routed_tokens(collate([row]))[0].numpy()
        assert np.array_equal(routed, (~pads).astype(np.int64)), "the router counts exactly the row's other tokens"
    assert fillers >= 4  # the rows needed fillers


def test_a_one_document_corpus_repeats_its_document_every_epoch(tok, tmp_path):
    """Packed training rows over a corpus of one short document: each epoch's copy of it follows the last, from its
    first token (the offset into the document restarts with the epoch, though the document's number is the same)."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "abcdef"}) + "\n")
    stream = TextStream(DataConfig(source=str(path), seq_len=16, holdout=0.0), tok)
    documents = stream._documents
    stream._documents = lambda state: itertools.islice(documents(state), 8)  # 8 epochs, then the stream ends
    rows = [row for row, _ in stream.rows()]
    doc = [tok.bos_token_id, *encode_texts(tok, ["abcdef"])[0].tolist(), tok.eos_token_id]
    assert len(rows) == 4
    for row in rows:
        assert row["input_ids"].tolist() == doc * 2 and row["seq_idx"].tolist() == [0] * 8 + [1] * 8


def test_chunks_of_one_token_are_refused_for_packed_rows(tok):
    # every position of a row is a multiple of 1: the pad put before a document was a chunk of its own and the
    # document started the next one, carrying the previous document's state into it
    with pytest.raises(ValueError, match=r"chunk_len: must be an integer >= 2 for packed rows"):
        TextStream(DataConfig(seq_len=64), tok, chunk_len=1)
    row, _ = next(TextStream(DataConfig(seq_len=64, packing=False), tok, chunk_len=1).rows())  # one document a row
    assert (row["seq_idx"] == 0).all()


def test_unpacked_rows_hold_one_padded_document(tok, letter_docs):
    source, _ = letter_docs
    stream = TextStream(DataConfig(source=source, seq_len=48, packing=False, holdout=0.0), tok)
    batch, _ = next(stream.batches(16))
    assert set(batch) == {"input_ids", "labels", "seq_idx", "position_ids", "attention_mask"}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
        assert len({t for t in ids[:n].tolist() if t < 256}) <= 1
    assert (batch["seq_idx"] == 0).all()


def test_resumed_stream_continues_with_the_same_rows(tok):
    cfg = DataConfig(seq_len=96, seed=7)
    stream = TextStream(cfg, tok)
    first = list(itertools.islice(stream.batches(3), 12))
    state = first[5][1].as_dict()
    resumed = TextStream(cfg, tok).batches(3, StreamState(**json.loads(json.dumps(state))))
    for (expect, expect_state), (got, got_state) in zip(first[6:], resumed):
        assert all(torch.equal(expect[k], got[k]) for k in expect)
        assert got_state == expect_state


def test_shuffle_depends_on_seed_and_epoch_only(tok):
    def first(cfg, epoch=0, n=6, **kw):
        return list(itertools.islice(open_documents(cfg, "train", **kw).iter_docs(epoch, 0), n))

    cfg = DataConfig(seed=1)
    a = first(cfg)
    assert a == first(cfg)
    assert a != first(cfg, epoch=1)
    assert a != first(DataConfig(seed=2))
    ranks = [first(cfg, n=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0] == a[0::2] and ranks[1] == a[1::2], "ranks split one order, disjointly"


@pytest.mark.parametrize("field,value", [("seq_len", 1), ("holdout", 1.0), ("shuffle_buffer", 0),
                                         ("source", ""), ("sample_by", "word")],
                         ids=["seq_len", "holdout", "shuffle_buffer", "source", "sample_by"])
def test_bad_data_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        DataConfig(**{field: value}).validate()


def test_missing_text_column_names_the_field(tok, letter_docs):
    source, _ = letter_docs
    with pytest.raises(ValueError, match=r"data\.text_field.*'content'"):
        TextStream(DataConfig(source=source, text_field="content"), tok)


def test_streamed_documents_are_deterministic_and_resumable(letter_docs):
    import datasets

    from zoo.data.text import _StreamedDocs

    source, docs = letter_docs
    stream = datasets.load_dataset("json", data_files=source, split="train", streaming=True)
    streamed = _StreamedDocs(stream, "text", seed=4, shuffle=True, buffer=16)
    epoch0 = list(streamed.iter_docs(0, 0))
    assert sorted(epoch0) == sorted(docs) and epoch0 != docs, "a shuffled pass over every document"
    assert list(streamed.iter_docs(0, 0)) == epoch0 and list(streamed.iter_docs(1, 0)) != epoch0
    with pytest.warns(UserWarning, match=r"re-reads and skips 37 documents: .*shuffle buffer"):
        assert list(streamed.iter_docs(0, 37)) == epoch0[37:], "resuming a shuffled stream skips the consumed documents"


def test_a_stream_of_unknown_columns_without_the_text_field_names_the_field():
    # open_documents checks data.text_field against the dataset's columns, but a stream whose features are not known
    # before it is read (column_names None: datasets 3's streamed json, a generator) ended in a bare KeyError: 'text'
    datasets = pytest.importorskip("datasets", reason="streams are read with `datasets` (the data extra)")
    from zoo.data.text import _StreamedDocs

    def records():
        yield from ({"content": f"doc {i}"} for i in range(3))

    stream = datasets.IterableDataset.from_generator(records)
    assert stream.column_names is None  # (so the check before reading cannot see it)
    docs = _StreamedDocs(stream, "text", seed=0, shuffle=False, buffer=4, source="generated")
    with pytest.raises(ValueError, match=r"data\.text_field: the streamed dataset 'generated' has no column 'text': "
                                         r"the document at position 0 of epoch 0 .* has columns \['content'\]"):
        next(docs.iter_docs(0, 0))
    assert list(_StreamedDocs(stream, "content", 0, False, 4, "generated").iter_docs(0, 0)) == ["doc 0", "doc 1",
                                                                                                "doc 2"]
    held = stream.filter(lambda text: True, input_columns="text")  # (as open_documents holds documents out)
    with pytest.raises(ValueError, match=r"data\.text_field: the streamed dataset 'generated' has no column 'text'"):
        next(_StreamedDocs(held, "text", seed=0, shuffle=False, buffer=4, source="generated").iter_docs(0, 0))


@pytest.mark.parametrize("contents, message", [
    ("", r"data\.source: cannot read .*empty\.jsonl' as json \(no records\)"),
    ('{"text": "a"}\nnot json\n', r"data\.source: cannot read .*empty\.jsonl' as json \(DatasetGenerationError"),
    ('{"text": 5}\n', r"data\.text_field: document 0 of .* holds int 5 in 'text', not text"),
    ('{"text": null}\n', r"data\.text_field: document 0 of .* holds NoneType None in 'text', not text"),
    ("\n \n\n", r"data\.source: cannot read .*empty\.jsonl' as json \(no records\)"),
    ('{"text": ""}\n{"text": ""}\n', r"data\.source: no documents for rank 0 of 1 in .* \(split train\): the 2 it "
                                   r"holds are empty \('text' is ''\)"),
], ids=["empty", "malformed", "number", "null", "blank-lines", "empty-texts"])
def test_unreadable_jsonl_names_the_field(tok, tmp_path, contents, message):
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    path = tmp_path / "empty.jsonl"
    path.write_text(contents)
    with pytest.raises(ValueError, match=message):
        next(TextStream(DataConfig(source=str(path), holdout=0), tok).rows())


@pytest.mark.parametrize("how", ["file", "folder"])
def test_a_document_that_is_not_text_is_refused_as_the_source_opens_not_when_reached(tok, tmp_path, how):
    # a null (or a record without the field) far into a memory-mapped source was refused only when the stream reached
    # it: hours into a run over a large shuffled corpus, and again on every resume
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"text": f"document {i} " * 4} for i in range(100)]
    rows[70] = {"text": None}
    rows[80] = {"other": "no text field"}
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = str(folder) if how == "folder" else str(folder / "docs.jsonl")
    cfg = DataConfig(source=source, holdout=0.0, streaming=False)  # (memory-mapped: a stream is not read ahead)
    with pytest.raises(ValueError, match=r"data\.text_field: document 70 of .* holds NoneType None in 'text', not text "
                                         r"\(a record without the field reads as None\) \(1 more are null too\)"):
        TextStream(cfg, tok)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(5))}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"document 0 of .* holds int 0 in 'text', not text \(the column's type is "
                                         r"int64\)"):
        TextStream(DataConfig(source=str(tmp_path / "numbers.parquet"), holdout=0.2), tok, "eval")


def test_a_malformed_file_of_a_local_folder_names_the_source(tok, tmp_path):
    # local files were refused by name, but the same file in a folder (datasets' folder loader) raised datasets' own
    # DatasetGenerationError 'An error occurred while generating the dataset', naming neither the field nor the file
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"data\.source: cannot open '.*corpus' .*DatasetGenerationError.*JSON"):
        TextStream(DataConfig(source=str(folder), streaming=False, holdout=0), tok)


@pytest.mark.parametrize("source", ["stdlib", "local"])
def test_a_split_of_a_one_split_source_is_refused_by_name(tok, letter_docs, source):
    # local files and the built-in corpus are one split: eval_split was ignored, so with holdout 0 the evaluation
    # documents were the training documents, and with a holdout it silently was the holdout
    source = letter_docs[0] if source == "local" else source
    for holdout in (0.0, 0.1):
        with pytest.raises(ValueError, match=r"^data\.eval_split: 'validation' applies to hub datasets and local "
                                             r"folders.*data\.holdout"):
            TextStream(DataConfig(source=source, eval_split="validation", holdout=holdout), tok, "eval")
    with pytest.raises(ValueError, match=r"^data\.split: 'test' applies to hub datasets and local folders"):
        TextStream(DataConfig(source=source, split="test"), tok)


@pytest.mark.parametrize("split", ["validation", "test", "Eval"])
def test_a_stream_split_other_than_train_or_eval_is_refused(tok, letter_docs, split):
    """TextStream(cfg, tok, 'validation') read the training documents (all but the held-out ones, as 'train' does, in
    one unshuffled pass) of local files and hub datasets without a word: an evaluation on the training text. Only
    'train' and 'eval' are streams' splits; a dataset's own are data.split and data.eval_split."""
    source, _ = letter_docs
    cfg = DataConfig(source=source, seq_len=16, holdout=0.25)
    with pytest.raises(ValueError, match=rf"split: expected 'train' or 'eval' .*got '{split}'"):
        TextStream(cfg, tok, split)
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'eval'"):
        open_documents(cfg, split)
    assert next(TextStream(cfg, tok, "eval").rows())[0]["input_ids"].shape == (16,)


def test_an_eval_split_equal_to_the_training_split_is_refused(tok):
    # a hub dataset read with eval_split == split evaluated on the training documents (no holdout is taken when an
    # eval_split is given), silently reporting training loss as held-out loss
    for source in ("someone/corpus", "stdlib"):
        cfg = DataConfig(source=source, split="train", eval_split="train")
        with pytest.raises(ValueError, match=r"^data\.eval_split: 'train' is data\.split too.*data\.holdout"):
            TextStream(cfg, tok, "eval")
    with pytest.raises(ValueError, match=r"^pretrain\.data\.eval_split: 'valid' is pretrain\.data\.split too"):
        DataConfig(source="someone/corpus", split="valid", eval_split="valid").validate("pretrain.data")
    DataConfig(source="someone/corpus", split="train", eval_split="validation").validate()


def test_a_jsonl_document_that_is_not_utf8_reads_with_replacement_characters(tok, tmp_path):
    # pyarrow's json reader keeps invalid UTF-8 in the text column, and reading that one document raised a bare
    # UnicodeDecodeError when the stream reached it (mid-run), naming neither the file nor the document
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    docs = list(open_documents(DataConfig(source=str(path), holdout=0, shuffle=False), "train").iter_docs(0, 0))
    assert docs == ["fine", "caf\ufffd au lait"]
    cfg = DataConfig(source=str(path), holdout=0, shuffle=False, seq_len=8, packing=False, add_bos=False)
    rows = [row["input_ids"].tolist() for row, _ in itertools.islice(TextStream(cfg, tok).rows(), 4)]
    assert bytes(rows[1][:8]) == "caf\ufffd a".encode()


@pytest.mark.parametrize("how", ["file", "folder", "streamed folder"])
def test_a_txt_file_that_is_not_utf8_reads_with_replacement_characters(tok, tmp_path, how):
    # datasets' text builder decodes strictly: a .txt file with one Latin-1 byte failed to load as a whole, and a
    # streamed folder holding it ended mid-run in a bare UnicodeDecodeError when the stream reached the file
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"fine\n")
    (folder / "b.txt").write_bytes(b"caf\xe9 au lait\nok\n")
    source = str(folder / "*.txt") if how == "file" else str(folder)
    cfg = DataConfig(source=source, holdout=0, shuffle=False, sample_by="line", streaming=how == "streamed folder",
                     seq_len=8, packing=False, add_bos=False)
    docs = [d for d in open_documents(cfg, "train").iter_docs(0, 0) if d]
    assert docs == ["fine", "caf\ufffd au lait", "ok"]
    rows = [row["input_ids"].tolist() for row, _ in itertools.islice(TextStream(cfg, tok).rows(), 3)]
    assert bytes(rows[1]) == "caf\ufffd a".encode()


@pytest.mark.parametrize("holdout", [0.0, 0.5])
def test_a_streamed_jsonl_document_that_is_not_utf8_names_the_source_and_the_way_out(tok, tmp_path, holdout):
    # pyarrow's json reader keeps the bytes, and the stream ended mid-run in a bare UnicodeDecodeError (naming neither
    # the source nor what to do); memory-mapped, the same files read with U+FFFD
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    cfg = DataConfig(source=str(folder), holdout=holdout, shuffle=False, seq_len=8)
    with pytest.raises(ValueError, match=rf"^data\.source: the streamed dataset '{re.escape(str(folder))}' holds text "
                                         r"that is not UTF-8 .*data\.streaming: false"):
        list(itertools.islice(TextStream(cfg, tok).rows(), 4))
    cfg.streaming = False
    read = [d for split in ("train", "eval")[:1 + (holdout > 0)] for d in open_documents(cfg, split).iter_docs(0, 0)]
    assert sorted(read) == ["caf\ufffd au lait", "fine"]


def test_local_path_matching_no_file_is_named_not_tried_on_the_hub(tok, tmp_path, letter_docs):
    source, _ = letter_docs
    for missing in (str(tmp_path / "missing.txt"), str(tmp_path / "*.parquet"), "./missing.jsonl"):
        with pytest.raises(ValueError, match=rf"data\.source: no file matches '{re.escape(missing)}'"):
            TextStream(DataConfig(source=missing), tok)
    typo = str(tmp_path / "doc.jsonl")  # one of a list that matches nothing is not silently dropped
    with pytest.raises(ValueError, match=rf"data\.source: no file matches '{re.escape(typo)}'"):
        TextStream(DataConfig(source=[source, typo]), tok)
    for named in ("someone/corpus", "stdlib", str(tmp_path)):  # a list of one that is no file (a TypeError in datasets)
        with pytest.raises(ValueError, match=rf"data\.source: no file matches '{re.escape(named)}'; .*a hub dataset, "
                                             r"a local folder or 'stdlib' is given as one string, not in a list"):
            TextStream(DataConfig(source=[named]), tok)


def test_a_file_whose_name_holds_glob_characters_is_read_as_named(tmp_path):
    # a path is a glob too: 'shard[0].jsonl' matched 'shard0.jsonl' only (read in its place without a word, or, with no
    # such file, refused as matching nothing), and datasets, which reads data_files as globs, read no records from it
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    named, other = tmp_path / "shard[0].jsonl", tmp_path / "shard0.jsonl"
    named.write_text("".join(json.dumps({"text": f"named {i}"}) + "\n" for i in range(4)))
    other.write_text(json.dumps({"text": "the other file"}) + "\n")
    for source in (str(named), [str(named)]):
        docs = list(open_documents(DataConfig(source=source, holdout=0, shuffle=False), "train").iter_docs(0, 0))
        assert docs == [f"named {i}" for i in range(4)], source
    both = open_documents(DataConfig(source=str(tmp_path / "*.jsonl"), holdout=0, shuffle=False), "train")
    assert sorted(both.iter_docs(0, 0)) == sorted([f"named {i}" for i in range(4)] + ["the other file"])


def test_a_file_named_twice_in_the_source_is_read_once(tok, tmp_path, monkeypatch, letter_docs):
    # the file list was deduplicated by spelling: the same file as an absolute and a relative path (or through a
    # symlink, or by two globs spelled differently) was read twice, so every document of it was trained on twice
    source, docs = letter_docs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.jsonl").symlink_to(source)
    for spelled in ([source, "docs.jsonl"], [source, "./*.jsonl"], [str(tmp_path / "*.jsonl")]):
        shared = open_documents(DataConfig(source=spelled, holdout=0, shuffle=False), "train")
        assert sorted(shared.iter_docs(0, 0)) == sorted(docs), spelled


def test_without_datasets_a_file_source_says_how_to_install_it(tok, tmp_path, monkeypatch):
    """`datasets` is the data extra: without it a file or hub source names the install, a path matching nothing
    is still refused by name, and the built-in corpus needs nothing."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "abc"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    for source in (str(path), "some-user/some-dataset"):
        with pytest.raises(ImportError, match=r"data\.source: reading .* needs the `datasets` package.*"
                                              r"hybrid-zoo\[data\]"):
            TextStream(DataConfig(source=source), tok)
    with pytest.raises(ValueError, match=r"data\.source: no file matches"):
        TextStream(DataConfig(source=str(tmp_path / "missing.jsonl")), tok)
    assert next(TextStream(DataConfig(source="stdlib", seq_len=64), tok).rows())[0]["input_ids"].shape[-1] == 64


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".txt.gz"])
@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streaming-set"])
def test_a_compressed_file_named_by_path_is_read_as_in_a_folder(tmp_path, suffix, streaming):
    # datasets' folder loader reads 'corpus.jsonl.gz' in a folder (it decompresses it), while the same file named by
    # path (or glob) was refused: "local files must all be one of .txt, .jsonl/.json or .parquet; got suffixes ['.gz']"
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    import bz2
    import gzip
    import lzma

    docs = [f"document {i} " + string.ascii_lowercase[i % 26] * (i + 1) for i in range(40)]
    if suffix.startswith(".txt"):
        raw = "".join(d + "\n" for d in docs).encode()
    else:
        raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[os.path.splitext(suffix)[1]]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / f"part{suffix}").write_bytes(compress(raw))
    sample_by = "line" if suffix.startswith(".txt") else "document"  # a folder of .txt files is read by line

    def documents(source) -> list[str]:
        cfg = DataConfig(source=source, holdout=0.0, shuffle=False, streaming=streaming, sample_by=sample_by)
        return [d for d in open_documents(cfg, "train").iter_docs(0, 0) if d]

    assert documents(str(folder)) == docs
    assert documents(str(folder / f"part{suffix}")) == docs
    assert documents(str(folder / "*")) == docs
    if suffix.startswith(".txt"):  # a whole file is one document, as an uncompressed .txt file named by path is
        from zoo.train import _txt_files

        cfg = DataConfig(source=str(folder / f"part{suffix}"), holdout=0.0)
        assert list(open_documents(cfg, "train").iter_docs(0, 0)) == ["".join(d + "\n" for d in docs)]
        assert _txt_files(cfg)  # the hint when the evaluation documents fill no row names data.sample_by


@pytest.mark.parametrize("damage", ["not compressed", "cut short"])
@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("how", ["by path", "folder", "folder streamed"])
def test_a_compressed_file_that_does_not_decompress_is_named(tok, tmp_path, damage, suffix, how):
    # datasets' own decompressor error escaped, naming neither the source nor the file: 'BadGzipFile: Not a gzipped
    # file', 'EOFError: Compressed file ended before the end-of-stream marker was reached', 'LZMAError: ...'; a folder
    # streamed reached the broken file mid-run, after the good one before it
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(100)).encode()
    (folder / f"a.jsonl{suffix}").write_bytes(compress(rows))
    broken = folder / f"b.jsonl{suffix}"
    broken.write_bytes(rows if damage == "not compressed" else compress(rows)[:-40])
    source = str(folder) if how.startswith("folder") else [str(folder / f"a.jsonl{suffix}"), str(broken)]
    cfg = DataConfig(source=source, seq_len=64, holdout=0.0, shuffle=False, streaming=how == "folder streamed")
    with pytest.raises(ValueError, match=rf"data\.source.*: cannot read '{re.escape(str(broken))}' \(.*\): it is not "
                                         rf"compressed as its name says, or is cut short or corrupt"):
        list(itertools.islice(TextStream(cfg, tok).rows(), 1000))  # (about 380 rows a file)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
def test_a_parquet_file_without_rows_beside_others_is_no_document(tok, tmp_path, streaming):
    # an empty shard (a parquet file of no rows, as a preprocessing job writes one) failed datasets' read of every file
    # with it: "BatchSize must be greater than 0, got 0"; in a folder streamed, a bare ArrowInvalid mid-run
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    import pyarrow as pa

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), folder / "a.parquet")
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(8)]}), folder / "b.parquet")
    files = [str(folder / "a.parquet"), str(folder / "b.parquet")]
    for source in (files, str(folder / "*.parquet")):
        cfg = DataConfig(source=source, holdout=0.0, shuffle=False, streaming=streaming)
        assert list(open_documents(cfg, "train").iter_docs(0, 0)) == [f"document {i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"cannot read '.*a\.parquet' as parquet \(no records\)"):
        open_documents(DataConfig(source=files[0], holdout=0.0), "train")
    with pytest.raises(ValueError, match=r"holds parquet files without rows \(a\.parquet\), which datasets cannot "
                                         r"read: delete them, or name the folder's files by glob"):
        TextStream(DataConfig(source=str(folder), holdout=0.0, streaming=streaming), tok)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
@pytest.mark.parametrize("how", ["by path", "folder"])
def test_a_utf16_or_utf32_txt_file_is_refused_naming_it_and_its_encoding(tok, tmp_path, encoding, how):
    # a text file saved as "Unicode" (Windows' Notepad: UTF-16 with a byte order mark) read as UTF-8 with replacement,
    # and trained as a NUL byte between every two characters, without a word; a UTF-32 one was called UTF-16 text
    # (iconv -f UTF-16 of it keeps a NUL between its characters), and a big-endian one was not caught at all
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("a UTF-8 file\n")
    text = "hello from notepad\n"
    bom = {"utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff"}.get(encoding, b"")  # (the others write one)
    (folder / "b.txt").write_bytes(bom + text.encode(encoding))
    source = str(folder) if how == "folder" else str(folder / "*.txt")
    name = encoding[:6].upper()
    with pytest.raises(ValueError, match=rf"data\.source: '.*b\.txt' is {name} text \(it begins with a {name} byte "
                                         rf"order mark\).*: re-encode it as UTF-8 \(iconv -f {name} -t UTF-8"):
        TextStream(DataConfig(source=source, holdout=0.0, sample_by="line"), tok)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("how", ["by path", "folder"])
def test_a_utf16_or_utf32_txt_file_without_a_byte_order_mark_is_refused_naming_its_encoding(tok, tmp_path, encoding,
                                                                                           how):
    # only a byte order mark was looked for: UTF-16 or UTF-32 text without one (Python's utf-16-le and utf-32-le write
    # none) read as UTF-8 and trained one or three NUL bytes between every two characters, without a word
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("a UTF-8 file, ünïcode and 一二三\n" * 300)  # (no NUL byte: read as it was)
    (folder / "b.txt").write_bytes("hello from a script, ünïcode and 一二三\n".encode(encoding) * 300)
    source = str(folder) if how == "folder" else str(folder / "*.txt")
    name = encoding.upper().replace("-LE", "LE").replace("-BE", "BE")
    with pytest.raises(ValueError, match=rf"data\.source: '.*b\.txt' is {name} text without a byte order mark .*: "
                                         rf"re-encode it as UTF-8 \(iconv -f {name} -t UTF-8"):
        TextStream(DataConfig(source=source, holdout=0.0, sample_by="line"), tok)
    (folder / "b.txt").unlink()
    TextStream(DataConfig(source=source, holdout=0.0, sample_by="line"), tok)


def test_compressed_local_files_with_mixed_columns_name_each_files_columns(tmp_path):
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    import gzip

    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    a.write_bytes(gzip.compress(json.dumps({"text": "doc " * 8, "id": 1}).encode() + b"\n"))
    b.write_bytes(gzip.compress(json.dumps({"text": "other " * 8, "url": "u"}).encode() + b"\n"))
    with pytest.raises(ValueError, match=r"columns \['id', 'text'\]; .*columns \['text', 'url'\]"):
        open_documents(DataConfig(source=str(tmp_path / "*.jsonl.gz"), holdout=0.0), "train")


def test_a_file_that_is_no_data_file_names_its_suffix_and_the_compressions(tmp_path):
    for name in ("notes.md", "notes.md.gz", "table.parquet.gz"):  # (datasets reads no compressed parquet file)
        (tmp_path / name).write_text("x")
        suffix = name[name.index("."):]
        with pytest.raises(ValueError, match=rf"possibly compressed: \.gz, .*got suffixes \['{re.escape(suffix)}'\]"):
            open_documents(DataConfig(source=str(tmp_path / name), holdout=0.0), "train")


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
def test_a_folder_of_several_kinds_of_data_file_says_that_some_are_left_out(tok, tmp_path, streaming):
    # datasets' folder loader reads the files of its most common kind only: a folder of part0.jsonl, part2.jsonl and
    # part1.txt was read as the .jsonl files alone, and one of part0.jsonl, part1.txt and part2.txt as the .txt files
    # alone, without a word (a tie is broken differently by datasets' versions: .txt in 3.0, .jsonl in 5, so the folder
    # holds more of one kind)
    pytest.importorskip("datasets", reason="local folders are read with `datasets` (the data extra)")
    folder = tmp_path / "mixed"
    folder.mkdir()
    for part in (0, 2):
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": f"json doc {part}.{i}"}) + "\n"
                                                          for i in range(2)))
    (folder / "part1.txt").write_text("text doc\n")
    (folder / "README.md").write_text("# about\n")  # (no data file: not counted)
    cfg = DataConfig(source=str(folder), holdout=0.0, shuffle=False, streaming=streaming)
    with pytest.warns(UserWarning, match=r"holds data files of several kinds \(2 json file\(s\): part0\.jsonl, "
                                         r"part2\.jsonl; 1 text file\(s\): part1\.txt\); datasets' folder loader "
                                         r"reads the files of one kind only"):
        documents = list(open_documents(cfg, "train").iter_docs(0, 0))
    # (what datasets reads: part1.txt is left out)
    assert sorted(documents) == [f"json doc {part}.{i}" for part in (0, 2) for i in range(2)]
    (folder / "part1.txt").unlink()
    (folder / "dataset_info.json").write_text("{}")  # (a file datasets takes for no data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one kind: no notice
        assert list(open_documents(cfg, "train").iter_docs(0, 0)) == documents


def test_local_folder_goes_to_the_datasets_folder_loader(tmp_path):
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    # a directory is neither a file nor a glob: datasets.load_dataset reads the data files in it, as documented
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"document {i} " * 20 for i in range(12)]
    (folder / "part.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for streaming in (False, True):
        got = list(open_documents(DataConfig(source=str(folder), holdout=0, shuffle=False, streaming=streaming),
                                  "train").iter_docs(0, 0))
        assert sorted(got) == sorted(docs), streaming


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streaming-set"])
def test_a_dataset_saved_with_save_to_disk_is_read_as_one_split(tok, tmp_path, streaming):
    # datasets.load_dataset refuses a folder written by Dataset.save_to_disk ("Please use `load_from_disk` instead"),
    # which no data config can do: such a folder is read with load_from_disk, memory-mapped, one split as local files
    datasets = pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    from zoo.train import _shuffle_version

    docs = [f"document {i} " + "é" * (i % 4) for i in range(60)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": docs, "n": list(range(60))}).save_to_disk(str(folder))
    cfg = DataConfig(source=str(folder), text_field="body", holdout=0.25, streaming=streaming, seq_len=16)
    train = list(open_documents(cfg, "train").iter_docs(0, 0))
    held = list(open_documents(cfg, "eval").iter_docs(0, 0))
    assert held and not set(train) & set(held) and sorted(train + held) == sorted(docs)
    shares = [list(open_documents(cfg, "train", rank, 2).iter_docs(0, 0)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(train) and not set(shares[0]) & set(shares[1])
    row, _ = next(TextStream(cfg, tok).rows())
    assert row["input_ids"].shape == (16,) and bytes(row["input_ids"][1:9].tolist()) == b"document"
    assert _shuffle_version(cfg) is None, "read memory-mapped: no shuffle buffer's order to pin"
    with pytest.raises(ValueError, match=r"^data\.eval_split: 'validation' .*a dataset saved with "
                                         r"Dataset\.save_to_disk is one split"):
        open_documents(DataConfig(source=str(folder), text_field="body", eval_split="validation"), "eval")
    with pytest.raises(ValueError, match=r"^data\.text_field: the dataset has no column 'text'; its columns are "
                                         r"\['body', 'n'\]"):
        open_documents(DataConfig(source=str(folder)), "train")


def test_a_streamed_source_with_mixed_columns_names_the_source_and_the_columns(tok, tmp_path):
    """A streamed dataset whose files have different columns ended the stream mid-run in datasets' bare CastError
    ("Couldn't cast ... because column names don't match"), naming neither the source nor the fix."""
    datasets = pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 8, "id": i}) + "\n" for i in range(4)))
    (folder / "b.jsonl").write_text(json.dumps({"text": "another doc " * 8, "url": "https://example.org"}) + "\n")
    try:  # datasets before 4.1 (at least) stream such files with the missing columns as None: no error to name
        list(datasets.load_dataset("json", data_files=sorted(str(f) for f in folder.iterdir()), split="train",
                                   streaming=True))
    except Exception:  # noqa: BLE001  (this datasets fails on them: zoo's message is checked below)
        pass
    else:
        pytest.skip(f"datasets {datasets.__version__} streams files of different columns without an error")
    message = (rf"data\.source: the streamed dataset '{re.escape(str(folder))}' mixes columns: a file of it has "
               r"column\(s\) \['url'\] .*\['text', 'id'\].*data\.text_field \('text'\).*same columns")
    for holdout, shuffle in ((0.0, False), (0.5, True)):  # read through the holdout filter and the shuffle too
        cfg = DataConfig(source=str(folder), holdout=holdout, shuffle=shuffle, streaming=True, seq_len=16)
        with pytest.raises(ValueError, match=message):
            list(open_documents(cfg, "train").iter_docs(0, 0))
        with pytest.raises(ValueError, match=message):
            list(itertools.islice(TextStream(cfg, tok).rows(), 100))
    from zoo.data.text import _StreamedDocs

    files = sorted(str(f) for f in folder.iterdir())
    stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    with pytest.raises(ValueError, match=r"data\.source: the streamed dataset 'files' mixes columns"):
        list(_StreamedDocs(stream, "text", seed=0, shuffle=False, buffer=4, source="files").iter_docs(0, 0))


def test_local_jsonl_files_with_mixed_columns_name_each_files_columns(tmp_path):
    """Local .jsonl files given as data.source (read whole, not streamed) whose columns differ failed in "cannot read
    ... as json (DatasetGenerationError: Couldn't cast ...)", naming neither the columns that differ nor the fix."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"doc {i} " * 8, "id": i}) + "\n" for i in range(4)))
    b.write_text(json.dumps({"text": "another doc " * 8, "url": "https://example.org"}) + "\n")
    message = (r"data\.source: the json files of the source have different columns.*"
               rf"'{re.escape(str(a))}': columns \['id', 'text'\]; '{re.escape(str(b))}': columns \['text', 'url'\]"
               r".*same columns \(e\.g\. keep only 'text'")
    for source in (str(tmp_path / "*.jsonl"), [str(a), str(b)]):
        with pytest.raises(ValueError, match=message):
            open_documents(DataConfig(source=source, holdout=0.0), "train")


@pytest.mark.parametrize("chunk_len", [None, 4], ids=["whole", "chunked"])
def test_resuming_at_the_end_of_a_document_continues_with_the_same_rows(tok, tmp_path, chunk_len):
    # a state whose offset is its document's length made the resumed row start with an empty piece: seq_idx from 1,
    # and with chunk_len a pad at position 0 that shifted every later token of the row
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": c * 6}) + "\n" for c in "abcdefgh"))
    cfg = DataConfig(source=str(path), seq_len=8, holdout=0.0, seed=5)  # bos + 6 + eos: each row ends a document
    first = list(itertools.islice(TextStream(cfg, tok, chunk_len=chunk_len).rows(), 6))
    assert first[2][1].offset == 8
    resumed = TextStream(cfg, tok, chunk_len=chunk_len).rows(first[2][1].as_dict())
    for (expect, expect_state), (got, got_state) in zip(first[3:], resumed):
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in expect.items()}
        assert got_state == expect_state


def test_streamed_holdout_is_disjoint_and_the_same_for_any_number_of_processes(tmp_path):
    # keyed by the stream's index, the held-out documents followed the shard order: the shuffle moved evaluation
    # documents into training (and dropped others), and two processes held out other documents than one
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"document {i}" for i in range(80)]
    for part in range(4):
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                          for d in docs[part * 20:(part + 1) * 20]))
    cfg = DataConfig(source=str(folder), holdout=0.3, streaming=True, shuffle_buffer=4)
    held = sorted(open_documents(cfg, "eval").iter_docs(0, 0))
    assert 0 < len(held) < len(docs)
    for world in (1, 2):
        shares = [open_documents(cfg, split, rank, world) for split in ("eval", "train") for rank in range(world)]
        evaluated = sorted(d for share in shares[:world] for d in share.iter_docs(0, 0))
        trained = sorted(d for share in shares[world:] for d in share.iter_docs(1, 0))
        assert evaluated == held, world
        assert sorted(trained + held) == sorted(docs), world


def test_a_tokenizer_without_pad_and_eos_is_refused_by_the_stream(letter_docs):
    # load_tokenizer refuses one; a tokenizer handed to TextStream directly crashed mid-row with
    # "int() argument must be ... not 'NoneType'"
    class NoSpecials(ByteTokenizer):
        pad_token_id = eos_token_id = None

    with pytest.raises(ValueError, match=r"^tokenizer: NoSpecials has neither a pad nor an eos token"):
        TextStream(DataConfig(source=letter_docs[0], holdout=0), NoSpecials())


def test_a_tokenizer_without_bos_warns_where_documents_would_be_wrapped(letter_docs):
    """add_bos on a tokenizer with no bos token (Qwen's, for one) left the documents unwrapped without a word; it
    warns now, in the stream and in finetuning's rows, and add_bos: false is quiet."""
    import warnings

    from zoo.finetune import encode_rows

    class NoBos(ByteTokenizer):
        bos_token_id = None

    with pytest.warns(UserWarning, match="data.add_bos: the tokenizer .NoBos. has no bos token"):
        stream = TextStream(DataConfig(source=letter_docs[0], holdout=0), NoBos())
    assert stream._prefix.tolist() == [] and stream._suffix.tolist() == [NoBos().eos_token_id]
    with pytest.warns(UserWarning, match="no bos token"):
        rows, _ = encode_rows([{"text": "hi"}], NoBos())
    assert rows[0]["input_ids"].tolist() == [*b"hi", NoBos().eos_token_id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextStream(DataConfig(source=letter_docs[0], holdout=0, add_bos=False), NoBos())


def test_a_tokenizer_without_bos_warns_on_the_first_process_only(letter_docs, monkeypatch):
    """Under accelerate every process builds its data: the no-bos warning came once per process, where the data's
    other warnings come from RANK 0 alone."""
    import warnings

    from zoo.data.text import document_wrap
    from zoo.finetune import encode_rows

    class NoBos(ByteTokenizer):
        bos_token_id = None

    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = TextStream(DataConfig(source=letter_docs[0], holdout=0), NoBos())
        rows, _ = encode_rows([{"text": "hi"}], NoBos())
    assert stream._prefix.tolist() == [] and rows[0]["input_ids"].tolist() == [*b"hi", NoBos().eos_token_id]
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match="no bos token"):
        assert document_wrap(NoBos(), True, True) == ([], [NoBos().eos_token_id])


def test_indexed_holdout_is_keyed_by_text_so_it_stays_when_the_source_grows(tmp_path):
    # keyed by the row index, a file sorted in before the others moved held-out documents into training, the same
    # files held out other documents as a streamed folder than as local files, and a repeated document was on both sides
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"document {i} " + "é" * (i % 3) for i in range(80)]
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def split_of(source, split, **kw):
        return sorted(open_documents(DataConfig(source=source, holdout=0.3, **kw), split).iter_docs(0, 0))

    held = split_of(str(folder / "b.jsonl"), "eval")
    assert 0 < len(held) < len(docs)
    assert held == split_of(str(folder), "eval", streaming=True), "the same documents streamed and not"
    added = [f"new {i}" for i in range(30)] + docs[:20]  # sorts first; repeats 20 documents
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in added))
    grown_eval = split_of(str(folder / "*.jsonl"), "eval")
    grown_train = split_of(str(folder / "*.jsonl"), "train")
    assert [d for d in grown_eval if d in docs] == sorted(held + [d for d in held if d in docs[:20]])
    assert not set(grown_eval) & set(grown_train), "no document both trained on and evaluated"
    assert sorted(grown_eval + grown_train) == sorted(docs + added)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_record_without_the_text_field_is_named_by_its_place_in_the_file(tok, tmp_path, world_size):
    # the message numbered the document in the process's shuffled order, so "document 17" sent the user to a good
    # record of the file; the bad one was record 7
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    records = [{"text": f"doc {i}"} for i in range(50)]
    records[7] = {"content": "the text under another key"}
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(source=str(path), seq_len=8, holdout=0.0, seed=1)
    message = (r"data\.text_field: document 7 of .*docs\.jsonl' \(counted from 0.* holds NoneType None in 'text', "
               r"not text \(a record without the field")
    with pytest.raises(ValueError, match=message):
        for rank in range(world_size):
            list(itertools.islice(TextStream(cfg, tok, rank=rank, world_size=world_size).rows(), 100))


def test_a_record_without_the_text_field_in_the_second_file_is_named_by_its_file_and_line(tok, tmp_path):
    # the message numbered the record across all the files ("document 12 of [...] (counted from 0, files in sorted
    # order)"), with the blank lines datasets skips left out of the count: the user had to count records through
    # every file before it to find line 5 of b.jsonl
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}", "content": ""}) + "\n"
                                              for i in range(10)))  # (the same columns as b.jsonl: one table)
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n\n{"content": "no text field"}\n'
                                      '{"text": "z"}\n')
    cfg = DataConfig(source=str(tmp_path / "*.jsonl"), seq_len=8, holdout=0.0)
    with pytest.raises(ValueError, match=r"data\.text_field: document 12 of .* \(counted from 0, files in sorted "
                                         r"order: line 5 of '.*b\.jsonl'\) holds NoneType None in 'text'"):
        TextStream(cfg, tok)


@pytest.mark.parametrize("source", ["stdlib", "local"])
def test_a_config_name_of_a_source_without_configurations_is_refused_by_name(tok, letter_docs, source):
    # config_name applies to hub datasets only: with the built-in corpus or local files it was ignored without a word
    source = letter_docs[0] if source == "local" else source
    with pytest.raises(ValueError, match=r"^data\.config_name: 'en' names a hub dataset's configuration; .* read "
                                         r"without one, so it would be ignored: unset config_name"):
        TextStream(DataConfig(source=source, config_name="en"), tok)


@pytest.mark.parametrize("source", ["stdlib", "local", "folder"])
def test_a_revision_of_a_source_not_on_the_hub_is_refused_by_name(tok, letter_docs, source):
    # revision applies to hub datasets only: datasets ignores it for a local folder, and the built-in corpus and local
    # files are read as they are
    source = {"local": letter_docs[0], "folder": os.path.dirname(letter_docs[0])}.get(source, source)
    with pytest.raises(ValueError, match=r"^data\.revision: 'v1' names a hub dataset's branch, tag or commit; .*so "
                                         r"it would be ignored: unset revision"):
        TextStream(DataConfig(source=source, revision="v1"), tok)


@pytest.mark.parametrize("offline", [None, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_streamed_hub_datasets_commit_that_is_not_known_is_said_once_and_not_recorded(tok, monkeypatch, offline):
    # a streamed hub dataset's commit is asked of the hub; offline it is not asked, and a look-up that fails (no
    # network) neither stops the run nor records a commit: the run says once that its resume cannot check the commit.
    # A commit sha needs no look-up
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    calls, asked = [], []

    def load_dataset(path, name=None, split=None, streaming=False, revision=None, **kwargs):  # the hub, offline
        calls.append(revision)
        return datasets.Dataset.from_list([{"text": f"document {i} " * 10} for i in range(20)]).to_iterable_dataset()

    def dataset_info(self, repo_id, *, revision=None, timeout=None, **kwargs):
        asked.append(timeout)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as read at import: a machine set offline
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline:
        monkeypatch.setenv(offline, "1")
    cfg = DataConfig(source="someone/corpus", revision="main", eval_split="validation", seq_len=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        streams = [TextStream(cfg, tok, split) for split in ("train", "eval")]
    said = [str(w.message) for w in caught if "hub commit" in str(w.message)]
    why = "offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if offline else \
        "asking the hub failed: OSError: Network is unreachable"
    assert len(said) == 1 and re.search(rf"^data: the hub commit of 'someone/corpus' at 'main' is not known \({why}\), "
                                        r"so checkpoints do not record it", said[0]), said
    assert asked == ([] if offline else [10, 10]) and calls == ["main", "main"]
    assert [s._docs.commit for s in streams] == [None, None] and next(streams[0].rows())[0]["input_ids"].shape == (16,)

    asked.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = TextStream(DataConfig(source="someone/corpus", revision="c" * 40, seq_len=16), tok)
    assert (stream._docs.commit, asked, calls[-1]) == ("c" * 40, [], "c" * 40)


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_a_data_seed_numpy_cannot_take_is_refused_by_name(tok, seed):
    # accepted by the config, it failed at the first training batch with numpy's "expected non-negative integer"
    # (or "seed must be integer"), naming no field
    with pytest.raises(ValueError, match=r"^data\.seed: must be an integer >= 0 \(the document order's seed\), got"):
        DataConfig(seed=seed).validate()
    with pytest.raises(ValueError, match=r"^data\.seed"):
        next(TextStream(DataConfig(seed=seed, seq_len=16), tok).rows())


@pytest.mark.parametrize("sample_by,count", [("document", 1), ("paragraph", 30), ("line", 90)])
def test_one_txt_file_is_split_into_documents_by_sample_by(tok, tmp_path, sample_by, count):
    """A single .txt file (a nanoGPT-style input.txt) is one document by default, which the held-out split cannot
    divide: `zoo train` on it stopped at "the evaluation documents fill no row". data.sample_by 'paragraph' or
    'line' makes each blank-line paragraph or line a document, and the held-out split then takes some of them."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    path = tmp_path / "input.txt"
    paragraphs = ["\n".join(f"p{p:02d} line {i} " + "xyz" * (p % 5) for i in range(3)) for p in range(30)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    cfg = DataConfig(source=str(path), sample_by=sample_by, holdout=0.2, shuffle=False)
    train_docs = list(open_documents(cfg, "train").iter_docs(0, 0))
    eval_docs = list(open_documents(cfg, "eval").iter_docs(0, 0))
    # (line: the blank lines between paragraphs are empty documents too, which the stream skips)
    assert len([d for d in train_docs + eval_docs if d.strip()]) == count
    assert not {d for d in train_docs if d.strip()} & {d for d in eval_docs if d.strip()}
    if sample_by != "document":
        assert train_docs and eval_docs  # both splits hold documents
    if sample_by == "paragraph":
        assert sorted(d.strip() for d in train_docs + eval_docs) == sorted(p.strip() for p in paragraphs)


@pytest.mark.parametrize("source", ["stdlib", "jsonl"])
def test_sample_by_on_a_source_that_is_not_txt_files_is_refused_by_name(letter_docs, source):
    cfg = DataConfig(source=letter_docs[0] if source == "jsonl" else "stdlib", sample_by="line")
    with pytest.raises(ValueError, match=r"data\.sample_by: 'line' splits"):
        open_documents(cfg, "train")


def txt_folder(tmp_path: Path) -> Path:
    """A folder of two .txt files (four lines, three paragraphs), read with `datasets` (skipped without it)."""
    pytest.importorskip("datasets", reason="local files are read with `datasets` (the data extra)")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("one\ntwo\n\nthree\n")
    (folder / "b.txt").write_text("four\n")
    return folder


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
def test_a_folder_of_txt_files_is_read_as_sample_by_says_or_said_to_be_read_by_line(tmp_path, streaming):
    # datasets' folder loader reads a folder of .txt files one line per document (its text builder's default), while
    # data.sample_by was refused for a folder as if it held no .txt files, telling the user to leave it at 'document',
    # a whole file per document, which the folder was not read as, without a word
    folder = txt_folder(tmp_path)

    def documents(sample_by: str) -> list[str]:
        cfg = DataConfig(source=str(folder), sample_by=sample_by, holdout=0.0, shuffle=False, streaming=streaming)
        return [d.strip() for d in open_documents(cfg, "train").iter_docs(0, 0) if d.strip()]

    assert documents("paragraph") == ["one\ntwo", "three", "four"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said, so no notice
        assert documents("line") == ["one", "two", "three", "four"]
    with pytest.warns(UserWarning, match=r"is a folder of \.txt files, which datasets' folder loader reads one line "
                                         r"per document .*texts/\*\.txt"):
        assert documents("document") == ["one", "two", "three", "four"]


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
def test_a_folder_of_txt_files_beside_a_metadata_file_is_a_folder_of_txt_files(tmp_path, streaming):
    # datasets' folder loader takes metadata.jsonl for metadata: it picks the kind of the other files and reads the .txt
    # files alone; the folder was said to hold files of several kinds, and data.sample_by was refused as if it held
    # no .txt files
    folder = txt_folder(tmp_path)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.txt", "label": 1}) + "\n")
    cfg = DataConfig(source=str(folder), sample_by="paragraph", holdout=0.0, shuffle=False, streaming=streaming)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one kind of data file, sample_by said: no notice
        documents = [d.strip() for d in open_documents(cfg, "train").iter_docs(0, 0) if d.strip()]
    assert documents == ["one\ntwo", "three", "four"]
    # beside .jsonl files it is read as one of them (its other columns fail), and so is no other kind
    (folder / "a.txt").unlink()
    (folder / "b.txt").unlink()
    (folder / "rows.jsonl").write_text(json.dumps({"text": "doc"}) + "\n")
    from zoo.data.text import _folder_kinds

    assert _folder_kinds(str(folder)) == {"json": ["metadata.jsonl", "rows.jsonl"]}


def _needs_resumable_streams() -> None:
    """Skip where datasets cannot continue a stream from its saved position (before 3.4: zoo re-reads, with a
    notice, which test_a_resumed_stream_without_a_saved_position_skips_with_a_notice checks)."""
    pytest.importorskip("datasets", reason="streams are read with `datasets` (the data extra)")
    if not _datasets_at_least("3.4"):
        import datasets

        pytest.skip(f"datasets {datasets.__version__} cannot continue a stream from its saved position (3.4+)")


def _streamed_corpus(tmp_path, parts: int = 4, per_part: int = 12) -> str:
    """A folder of jsonl files (several shards of a stream), each document distinct and of its own length."""
    folder = tmp_path / "streamed"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for part in range(parts):
        docs = [f"doc {part}.{i} " + string.ascii_lowercase[i % 26] * int(rng.integers(5, 60)) for i in range(per_part)]
        (folder / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(folder)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)], ids=["one-process", "rank1-of-2"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_a_resumed_streamed_dataset_reads_on_from_its_saved_position(tok, tmp_path, monkeypatch, rank, world_size,
                                                                    epoch):
    # resuming a streamed dataset at document d re-read and skipped d documents (hours of download and tokenizing
    # for a large corpus); the position now holds datasets' own (IterableDataset.state_dict), read on from there
    _needs_resumable_streams()
    cfg = DataConfig(source=_streamed_corpus(tmp_path), streaming=True, shuffle=False, holdout=0.2, seq_len=32)
    full = list(itertools.islice(TextStream(cfg, tok, rank=rank, world_size=world_size).rows(), 120))
    at = next(i for i, (_, s) in enumerate(full) if s.epoch == epoch and s.doc >= 15)
    state = json.loads(json.dumps(full[at][1].as_dict()))  # as a checkpoint's trainer_state.json holds it
    assert state["epoch"] == epoch and "source" in state, "the stream's own position is saved"
    order = list(open_documents(cfg, "train", rank, world_size).iter_docs(epoch, 0))
    assert state["doc"] < len(order) - 2, "the position is inside the epoch"

    resumed = TextStream(cfg, tok, rank=rank, world_size=world_size)
    seen = stream_reads(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: nothing is re-read
        got = list(itertools.islice(resumed.rows(StreamState(**state)), len(full) - at - 1))
    for (expect, expect_state), (row, row_state) in zip(full[at + 1:], got, strict=True):
        assert all(np.array_equal(expect[k], row[k]) for k in expect)
        assert (row_state.epoch, row_state.doc, row_state.offset) == (expect_state.epoch, expect_state.doc,
                                                                      expect_state.offset)
    assert seen[0] == order[state["doc"]], "the resumed stream starts at the saved document"
    assert not set(seen[:len(order) - state["doc"]]) & set(order[:state["doc"]]), "no earlier document re-read"
    again = json.loads(json.dumps(got[5][1].as_dict()))  # a position saved by the resumed run resumes as well
    for (expect, _), (row, _) in zip(full[at + 7:], TextStream(cfg, tok, rank=rank, world_size=world_size).rows(again)):
        assert all(np.array_equal(expect[k], row[k]) for k in expect)


def test_a_resumed_stream_without_a_saved_position_skips_with_a_notice(tok, tmp_path, monkeypatch):
    # a position saved by an older zoo (no "source"), a shuffled stream (datasets saves no shuffle buffer, so its
    # position would continue with other documents), or a datasets without state_dict: re-read and skip, as before,
    # with the same rows after the resume point, and say so
    datasets = pytest.importorskip("datasets", reason="streams are read with `datasets` (the data extra)")

    source = _streamed_corpus(tmp_path)
    cases = {"older zoo": ({"shuffle": False}, None, r"written by an older zoo"),
             "shuffled": ({"shuffle": True, "shuffle_buffer": 8}, None, r"shuffle buffer"),
             "old datasets": ({"shuffle": False}, "state_dict", r"cannot continue a stream from its saved position")}
    fast = _datasets_at_least("3.4")  # (before 3.4 every unshuffled stream is an old datasets' case)
    for name, (fields_, missing, reason) in cases.items():
        cfg = DataConfig(source=source, streaming=True, holdout=0.0, seq_len=32, **fields_)
        full = list(itertools.islice(TextStream(cfg, tok).rows(), 30))
        state = full[12][1].as_dict()
        assert ("source" in state) == (fast and not cfg.shuffle), name
        if not fast and not cfg.shuffle:
            reason = r"cannot continue a stream from its saved position"
        state.pop("source", None)
        with monkeypatch.context() as patch:
            if missing:
                patch.delattr(datasets.IterableDataset, missing)
            seen = stream_reads(patch)
            with pytest.warns(UserWarning, match=rf"data: resuming the stream of .* at document {state['doc']} of "
                                                 rf"epoch 0 re-reads and skips {state['doc']} documents: .*{reason}"):
                got = list(itertools.islice(TextStream(cfg, tok).rows(state), 17))
        assert len(seen) > state["doc"], name
        for (expect, _), (row, _) in zip(full[13:], got, strict=True):
            assert all(np.array_equal(expect[k], row[k]) for k in expect), name


def test_a_saved_stream_position_of_another_dataset_is_not_loaded(tok, tmp_path):
    # a position whose layout is not this dataset's (e.g. saved with another number of processes) would be loaded
    # by datasets without a word and continue elsewhere: it is skipped to, with a notice
    _needs_resumable_streams()
    cfg = DataConfig(source=_streamed_corpus(tmp_path), streaming=True, shuffle=False, holdout=0.0, seq_len=32)
    full = list(itertools.islice(TextStream(cfg, tok).rows(), 30))
    state = full[12][1].as_dict()
    state["source"] = {"examples_iterable": {"shard_idx": 3, "type": "SomethingElse"}, "epoch": 0}
    with pytest.warns(UserWarning, match=r"re-reads and skips .*not one of this dataset's"):
        got = list(itertools.islice(TextStream(cfg, tok).rows(state), 17))
    for (expect, _), (row, _) in zip(full[13:], got, strict=True):
        assert all(np.array_equal(expect[k], row[k]) for k in expect)
