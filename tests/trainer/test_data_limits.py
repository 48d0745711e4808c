"""Data a long run would trip over at step N is refused before any rank starts; every seed
the validator accepts draws batches."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moemesh.config.schema import DataConfig
from moemesh.data import resolve as data_mod
from moemesh.errors import ConfigError
from moemesh.trainer.data import TokenData, max_token_id, prepare_data
from tests.helpers import SMALL  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _file_with_one_bad_token(path: Path, n: int = 5_000_000, bad: int = 300) -> Path:
    """Valid ids below 256, and one id >= vocab in the middle: beyond any head/tail sample."""
    tokens = (np.arange(n) % 251).astype(np.uint16)
    tokens[n // 2] = bad
    tokens.tofile(path)
    return path


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` with ``overrides`` into ``tmp_path/run``, its cache under tmp_path."""
    env = {**os.environ, "MOEMESH_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={tmp_path / 'run'}", *SMALL],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_bad_token_mid_file_is_one_line_exit_2_before_training(tmp_path):
    path = _file_with_one_bad_token(tmp_path / "train.bin")
    proc = _train(tmp_path, "data=memmap", f"data.path={path}", "trainer.steps=2000")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0] == (
        f"moemesh: config error: data.path={path} holds token id 300 >= model.vocab_size=256; "
        "valid: model.vocab_size >= 301, or a file tokenised for this vocabulary"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran


def _corpus_past_its_vocabulary(tmp_path: Path) -> Path:
    """A prepared directory whose metadata says vocab_size 512 and whose tokens reach 9,000:
    every check before the start reads the metadata, so only the reader finds the ids."""
    import json

    from tests.data._corpus import write_corpus

    out = write_corpus(tmp_path / "corpus", [[200] * 40], vocab_size=70000, start=1000)
    meta = json.loads((out / "moemesh-data.json").read_text())
    meta["vocab_size"] = 512
    (out / "moemesh-data.json").write_text(json.dumps(meta))
    return out


@pytest.mark.slow
@pytest.mark.shares_cores
def test_an_id_past_the_vocabulary_found_while_reading_is_one_line_exit_1(tmp_path):
    """A one-rank run trains in train.py's own process, where the reader's ValueError was a
    Hydra traceback; it is a DataError now, one line naming the source, as on spawned ranks."""
    out = _corpus_past_its_vocabulary(tmp_path)
    proc = _train(tmp_path, "data=tokens", f"data.path={out}", "model.vocab_size=512", "trainer.steps=2")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("moemesh: DataError")]
    assert f"in the train data of {out} >= model.vocab_size=512" in line and "prepare it again" in line


def test_every_token_is_checked_once_and_remembered_by_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    path = _file_with_one_bad_token(tmp_path / "train.bin", bad=299)
    assert max_token_id(str(path)) == 299
    reads = []
    real = np.memmap
    monkeypatch.setattr(data_mod.np, "memmap", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert max_token_id(str(path)) == 299 and reads == []  # remembered: not read again
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[10] = 1000
    tokens.tofile(path)
    os.utime(path, ns=(1, 1))  # a changed file (size may be equal): read again
    assert max_token_id(str(path)) == 1000 and len(reads) == 1
    with pytest.raises(ConfigError, match=r"holds token id 1000 >= model.vocab_size=512"):
        prepare_data(DataConfig(name="m", kind="memmap", path=str(path)), seq_len=16, vocab_size=512)


def test_an_unwritable_cache_only_costs_a_second_read(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MOEMESH_CACHE", str(blocker / "cache"))  # a path under a file: never writable
    path = _file_with_one_bad_token(tmp_path / "train.bin", n=10_000, bad=7)
    assert max_token_id(str(path)) == 250


PINNED_WINDOWS = [71764, 93998, 75755, 70265]  # global samples 28..31 of seed 1234, seq_len 8


def test_the_data_order_is_pinned():
    """The order is a contract (a resumed run re-derives it): step 7's windows for seed 1234,
    written down when the sampler was introduced. A change here reorders every run's data."""
    data = TokenData(prepare_data(DataConfig(name="s", kind="synthetic"), seq_len=8, vocab_size=256), seed=1234)
    got = data.batch("train", 7, global_batch=4, seq_len=8, start=0, count=4)[0]
    _, _, windows = data.locate("train", np.arange(28, 32), 8)
    train = data.train
    want = torch.stack([torch.from_numpy(np.asarray(train[w * 8 : w * 8 + 8], dtype=np.int64)) for w in windows])
    assert torch.equal(got, want)
    assert windows.tolist() == PINNED_WINDOWS
