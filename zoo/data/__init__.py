"""Data for training and evaluation.

- `zoo.data.text`: tokenizers (any AutoTokenizer, or the built-in `ByteTokenizer`), document sources (the
  built-in standard-library corpus, hub datasets, local txt/jsonl/parquet) and packing into rows with
  ``seq_idx`` document boundaries, resumable.
- `zoo.data.synthetic`: synthetic recall tasks (MQAR, selective copying, induction heads).
"""

from __future__ import annotations

from zoo.data.text import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataConfig,
    StreamState,
    TextStream,
    collate,
    encode_texts,
    load_tokenizer,
    open_documents,
    stdlib_files,
)

__all__ = ["IGNORE_INDEX", "ByteTokenizer", "DataConfig", "StreamState", "TextStream", "collate", "encode_texts",
           "load_tokenizer", "open_documents", "stdlib_files"]
