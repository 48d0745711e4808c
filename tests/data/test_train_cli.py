"""train.py on prepared data: a vocabulary mismatch is one line before any rank starts; a run
on uint32 shards with document masks trains and reports time.data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data._corpus import write_corpus
from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.shares_cores]  # train.py in a subprocess


def _train(tmp_path, *overrides):
    env = {**os.environ, "MOEMESH_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *SMALL, f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepared_data_through_train_py(tmp_path):
    corpus = write_corpus(tmp_path / "c", [[50, 120, 7, 300] * 10] * 2, vocab_size=70000, start=65000)
    proc = _train(tmp_path, "data=tokens", f"data.path={corpus}")
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0] == (
        f"moemesh: config error: data.path={corpus} was tokenised by test-ids with 70,000 token ids, more than "
        "model.vocab_size=256 can embed; valid: model.vocab_size >= 70000"
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory
    proc = _train(tmp_path, "data=tokens", f"data.path={corpus}", "parallel=pp2", "data.document_mask=true")
    assert proc.returncode == 2 and "data.document_mask=true with parallel.pipeline_parallel_size=2" in proc.stderr

    proc = _train(
        tmp_path,
        "data=tokens",
        f"data.path={corpus}",
        "model.vocab_size=70000",
        "data.document_mask=true",
        "trainer.steps=3",
        "data.val_fraction=0.05",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(0 <= r["time"]["data"] < r["time"]["step"] for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "data" in summary["time_breakdown"]
