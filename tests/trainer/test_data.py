import os

import numpy as np
import pytest
import torch

from moemesh.config.schema import DataConfig
from moemesh.errors import ConfigError
from moemesh.trainer.data import TokenData, prepare_data


def test_memmap_file_is_read_and_sliced_by_global_sample_index(tmp_path):
    tokens = (np.arange(5000) % 300).astype(np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    paths = prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=300)
    data = TokenData(paths, seed=1)
    assert len(data.train) + len(data.val) == 5000 and len(data.val) == 50
    x, y = data.batch("train", 3, global_batch=8, seq_len=16, start=0, count=8)
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 300, torch.ones(8, 15, dtype=torch.long))  # contiguous windows
    # Any slicing of the global batch gives the same samples: layouts see the same data.
    parts = [data.batch("train", 3, global_batch=8, seq_len=16, start=s, count=2)[0] for s in range(0, 8, 2)]
    assert torch.equal(torch.cat(parts), x)
    assert not torch.equal(data.batch("train", 4, global_batch=8, seq_len=16, start=0, count=8)[0], x)


def test_memmap_too_short_or_missing_is_reported(tmp_path):
    path = tmp_path / "short.bin"
    np.zeros(100, dtype=np.uint16).tofile(path)
    with pytest.raises(ConfigError, match=r"data.path=.*short.bin holds 100 tokens: .* splits have 99/1 tokens"):
        prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=300)
    with pytest.raises(ConfigError, match="no such file"):
        prepare_data(DataConfig(name="m", kind="memmap", path=str(tmp_path / "nope.bin")), seq_len=16, vocab_size=300)


def test_memmap_path_that_is_not_a_file_says_what_it_is(tmp_path):
    """A directory or a FIFO was "no such file"; a prepared directory names data=tokens."""
    prepared = tmp_path / "corpus"
    prepared.mkdir()
    (prepared / "moemesh-data.json").write_text("{}")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        tmp_path: "a directory (data=memmap reads one uint16 token .bin file)",
        prepared: f"a directory prepared by scripts/prepare_data.py: use data=tokens data.path={prepared} (",
        tmp_path / "fifo": "not a regular file (a FIFO, socket or device)",
    }
    for path, says in cases.items():
        with pytest.raises(ConfigError) as err:
            prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=300)
        assert str(err.value).startswith(f"data.path={path}: {says}"), str(err.value)


def test_stdlib_corpus_is_bytes_of_python_sources():
    paths = prepare_data(DataConfig(name="s", kind="stdlib"), seq_len=16, vocab_size=256)
    data = TokenData(paths, seed=0)
    assert len(data.train) > 1_000_000 and int(np.max(data.train[:100000])) < 256
    assert b"def " in bytes(np.asarray(data.train[:200000], dtype=np.uint8))


def test_exactly_seq_len_plus_one_tokens_is_enough(tmp_path):
    train, val = tmp_path / "t.bin", tmp_path / "v.bin"
    np.arange(17, dtype=np.uint16).tofile(train)
    np.arange(17, dtype=np.uint16).tofile(val)
    paths = prepare_data(
        DataConfig(name="m", kind="memmap", path=str(train), val_path=str(val)), seq_len=16, vocab_size=300
    )
    x, y = TokenData(paths, seed=0).batch("val", 0, global_batch=2, seq_len=16, start=0, count=2)
    assert x[0].tolist() == list(range(16)) and y[0].tolist() == list(range(1, 17))


def test_token_ids_beyond_the_vocab_are_rejected(tmp_path):
    path = tmp_path / "t.bin"
    np.full(5000, 300, dtype=np.uint16).tofile(path)
    with pytest.raises(ConfigError, match="holds token id 300 >= model.vocab_size=256"):
        prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=256)


def test_a_stream_whose_length_is_a_multiple_of_seq_len_has_no_window_past_its_end():
    """A window is seq_len + 1 tokens (inputs and the shifted targets), windows seq_len apart."""
    from moemesh.data.reader import Segment, Stream

    for n, windows in ((64, 3), (65, 4), (16, 0), (17, 1)):
        stream = Stream([Segment(np.arange(n), 0, n, None, 0)])
        assert stream.windows(16) == windows, n
        for w in range(windows):
            assert len(stream.read(w * 16, 17)) == 17, (n, w)


def test_resume_on_new_data_reads_the_new_data_from_its_first_window(tmp_path):
    """data.resume_on_new_data=true: a checkpoint's position from other data is set aside and the
    step after it reads this data's first samples, as the message says."""
    tokens = (np.arange(5000) % 300).astype(np.uint16)
    tokens.tofile(tmp_path / "a.bin")
    np.roll(tokens, 7).tofile(tmp_path / "b.bin")
    spec = {
        k: prepare_data(DataConfig(name="m", kind="memmap", path=str(tmp_path / k)), seq_len=16, vocab_size=300)
        for k in ("a.bin", "b.bin")
    }
    old = TokenData(spec["a.bin"], seed=1)
    position = old.position(10, global_batch=8, seq_len=16)
    new = TokenData(spec["b.bin"], seed=1)
    assert new.resume_at(10, position, seq_len=16) == "new data: reading it from its first window"
    fresh = TokenData(spec["b.bin"], seed=1)
    x, _ = new.batch("train", 10, global_batch=8, seq_len=16, start=0, count=8)
    first, _ = fresh.batch("train", 0, global_batch=8, seq_len=16, start=0, count=8)
    assert torch.equal(x, first)
    for data in (old, new, fresh):
        data.close()


def test_a_token_id_equal_to_the_vocab_size_is_rejected(tmp_path):
    path = tmp_path / "t.bin"
    np.full(5000, 255, dtype=np.uint16).tofile(path)
    prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=256)  # ids < 256
    path = tmp_path / "u.bin"
    np.full(5000, 256, dtype=np.uint16).tofile(path)
    with pytest.raises(ConfigError, match="holds token id 256 >= model.vocab_size=256"):
        prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=256)


def test_a_split_of_exactly_seq_len_plus_one_tokens_is_enough(tmp_path):
    """data.val_fraction=0.5 of 34 tokens: 17 train, 17 validate, each one window of seq_len=16."""
    path = tmp_path / "t.bin"
    np.arange(34, dtype=np.uint16).tofile(path)
    spec = prepare_data(
        DataConfig(name="m", kind="memmap", path=str(path), val_fraction=0.5), seq_len=16, vocab_size=300
    )
    data = TokenData(spec, seed=0)
    assert data.windows("train", 16) == data.windows("val", 16) == [1]
    np.arange(33, dtype=np.uint16).tofile(path)
    with pytest.raises(ConfigError, match="the train/validation splits have 17/16 tokens"):
        prepare_data(DataConfig(name="m", kind="memmap", path=str(path), val_fraction=0.5), seq_len=16, vocab_size=300)


def test_validation_token_ids_beyond_the_vocab_are_rejected(tmp_path):
    train, val = tmp_path / "t.bin", tmp_path / "v.bin"
    np.full(100, 5, dtype=np.uint16).tofile(train)
    np.full(100, 300, dtype=np.uint16).tofile(val)
    with pytest.raises(ConfigError, match=r"data.val_path=.*v.bin holds token id 300 >= model.vocab_size=256"):
        prepare_data(
            DataConfig(name="m", kind="memmap", path=str(train), val_path=str(val)), seq_len=16, vocab_size=256
        )
