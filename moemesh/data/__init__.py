"""Token data: prepare a corpus, read it in a fixed order, resume exactly where it stopped.

- ``prepare``: tokenise text, jsonl, parquet or a saved Hugging Face dataset into shards of
  token ids plus a document index and a metadata file (``format``), in parallel, restartably
  (``scripts/prepare_data.py``). The only module that imports transformers/tokenizers, lazily.
- ``sampler``: the order, a pure function of the global sample index: a seeded permutation of
  fixed-length windows without replacement, epoch after epoch; mixtures by a fixed schedule.
- ``reader``: ``TokenData``, the batches a rank reads (read ahead by a thread), and the data
  position a checkpoint records.
- ``resolve``: ``data.*`` to a ``DataSpec``, checked before any rank starts (``check_data``,
  ``prepare_data``); the stdlib corpus (bytes, one document per file) is built here.

This package sits below ``moemesh.config`` (whose schema registers ``config.DataConfig``)
and imports nothing of the trainer, launch or planning; ``docs/data.md`` is its user guide.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moemesh.data.config import DataConfig, DataSourceConfig

if TYPE_CHECKING:
    from moemesh.data.reader import Batch, DataSpec, SourceSpec, TokenData
    from moemesh.data.resolve import build_stdlib_corpus, check_data, max_token_id, prepare_data

# Imported when first used (PEP 562): prepare's worker processes, which import
# moemesh.data.prepare, then start without torch.
_LAZY = {
    "Batch": "reader",
    "DataSpec": "reader",
    "SourceSpec": "reader",
    "TokenData": "reader",
    "build_stdlib_corpus": "resolve",
    "check_data": "resolve",
    "max_token_id": "resolve",
    "prepare_data": "resolve",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"moemesh.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moemesh.data' has no attribute {name!r}")


__all__ = [
    "Batch",
    "DataConfig",
    "DataSourceConfig",
    "DataSpec",
    "SourceSpec",
    "TokenData",
    "build_stdlib_corpus",
    "check_data",
    "max_token_id",
    "prepare_data",
]
