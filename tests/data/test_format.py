"""The prepared corpus format at its edges: the token dtype's boundary, an EOS id past the
vocabulary, empty documents, a document index checked in chunks, and the verification memo."""

import json

import numpy as np
import pytest

from moemesh.data.format import META_NAME, _check_offsets, dtype_for, read_meta, verify_shards
from moemesh.errors import ConfigError
from tests.data._corpus import write_corpus


def test_uint16_holds_exactly_65536_ids():
    assert [dtype_for(v) for v in (1, 65535, 65536, 65537)] == ["uint16", "uint16", "uint16", "uint32"]


def test_a_corpus_of_65536_ids_in_uint16_is_read(tmp_path):
    out = write_corpus(tmp_path / "c", [[3, 4]], vocab_size=1 << 16, start=(1 << 16) - 4)
    meta = read_meta(out)
    assert (meta.vocab_size, meta.dtype) == (65536, "uint16")


def test_an_eos_id_equal_to_the_vocab_size_is_refused(tmp_path):
    out = write_corpus(tmp_path / "c", [[3, 4]], vocab_size=1000)
    meta = json.loads((out / META_NAME).read_text())
    meta["eos_id"] = 999
    (out / META_NAME).write_text(json.dumps(meta))
    assert read_meta(out).eos_id == 999
    meta["eos_id"] = 1000
    (out / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"'eos_id' must be null or an id below vocab_size=1000, got 1000"):
        read_meta(out)


def test_empty_documents_are_a_valid_index(tmp_path):
    """Without an EOS (eos_id null) a document can hold no token: equal offsets are fine."""
    out = write_corpus(tmp_path / "c", [[2, 0, 3, 0]], vocab_size=1000)
    assert verify_shards(read_meta(out), cache_dir=str(tmp_path / "cache")) > 0


def test_an_offset_that_decreases_across_a_chunk_boundary_is_found(tmp_path):
    out = write_corpus(tmp_path / "c", [[4, 1, 0]], vocab_size=1000)  # offsets 0, 4, 5, 5
    meta = read_meta(out)
    idx = out / meta.shards[0].index_file
    for chunk in (1, 2, 3, 4):
        _check_offsets(idx, meta.shards[0], "w", chunk=chunk)
    np.asarray([0, 4, 3, 5], dtype=np.uint64).tofile(idx)  # document 2 starts before document 1
    for chunk in (1, 2, 3, 4):
        with pytest.raises(ConfigError, match=r"document 2 starts at 3, before document 1 \(4\)"):
            _check_offsets(idx, meta.shards[0], "w", chunk=chunk)
    np.asarray([0, 4, 6, 5], dtype=np.uint64).tofile(idx)  # the last document starts past the end
    for chunk in (1, 2, 3, 4):
        with pytest.raises(ConfigError, match=r"document 3 starts at 5, before document 2 \(6\)"):
            _check_offsets(idx, meta.shards[0], "w", chunk=chunk)


def test_a_verified_shard_is_hashed_again_when_the_metadata_expects_another_hash(tmp_path):
    """The memo remembers a file checked against one hash; metadata that now says another (a
    directory whose metadata was replaced) is checked, not taken on the memo's word."""
    out = write_corpus(tmp_path / "c", [[3, 4]], vocab_size=1000)
    cache = str(tmp_path / "cache")
    assert verify_shards(read_meta(out), cache_dir=cache) > 0
    assert verify_shards(read_meta(out), cache_dir=cache) == 0  # remembered
    meta = json.loads((out / META_NAME).read_text())
    meta["shards"][0]["tokens_sha256"] = "0" * 64
    (out / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"shard shard_000000.tok has sha256 \w+\.\.\., its metadata says 0000"):
        verify_shards(read_meta(out), cache_dir=cache)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vocab_size", 0, r"'vocab_size' must be an integer in \[1, 4294967296\], got 0"),
        ("documents", 3, r"'tokens'/'documents' are not the sums over its shards"),
        ("tokens", 8, r"'tokens'/'documents' are not the sums over its shards"),
        ("shards", [], r"'shards' must be a non-empty list"),
        ("eos_id", 3.0, r"'eos_id' must be null or an id below vocab_size=1000, got 3.0"),
        ("eos_id", True, r"'eos_id' must be null or an id below vocab_size=1000, got True"),
    ],
)
def test_metadata_whose_fields_disagree_is_refused(tmp_path, field, value, message):
    out = write_corpus(tmp_path / "c", [[3, 4]], vocab_size=1000)
    meta = json.loads((out / META_NAME).read_text())
    assert (meta["tokens"], meta["documents"]) == (7, 2)
    meta[field] = value
    (out / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=message):
        read_meta(out)
