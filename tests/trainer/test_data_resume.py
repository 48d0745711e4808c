"""Exact resume: a run stopped at step k and resumed on another layout reads bitwise the same
batches as the uninterrupted run (a mixture of two prepared directories, document masks on),
and trains the same steps."""

import hashlib
import json
from pathlib import Path

import pytest

from moemesh.data import TokenData, prepare_data
from moemesh.parallel.dims import ParallelDims
from tests.data._corpus import write_corpus
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run, train_rank
from tests.same_math import assert_same_run, read_metrics

pytestmark = pytest.mark.slow  # trains two layouts on 4 spawned gloo ranks

STEPS, STOP = 6, 3


class RecordingData(TokenData):
    """Every training row this rank reads, by (step, global sample): written when the run closes it."""

    out: Path

    def micro_batch(self, split, step, *, global_batch, seq_len, start, count):
        b = super().micro_batch(split, step, global_batch=global_batch, seq_len=seq_len, start=start, count=count)
        if split == "train":
            rows = getattr(self, "rows", {})
            for j in range(count):
                parts = (b.inputs[j], b.targets[j], b.documents[j])
                rows[f"{step}:{start + j}"] = hashlib.sha256(b"".join(t.numpy().tobytes() for t in parts)).hexdigest()
            self.rows = rows
        return b

    def close(self):
        super().close()
        if getattr(self, "rows", None):
            with open(self.out, "a") as f:
                f.write(json.dumps(self.rows) + "\n")


def _cfg(root: Path, name: str, dp: int, ep: int, **extra):
    return tiny_run(
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "trainer.steps": STEPS,
            "trainer.seed": 5,
            "checkpoint.every": STOP,
            "checkpoint.dir": str(root / f"ckpt_{name}"),
            "data.name": "tokens",
            "data.kind": "tokens",
            "data.sources": [{"path": str(root / "a"), "weight": 0.7}, {"path": str(root / "b"), "weight": 0.3}],
            "data.val_fraction": 0.2,
            "data.document_mask": True,
            **extra,
        }
    )


def _worker(rank, world, root, paths):
    import moemesh.trainer.loop as loop

    root = Path(root)
    # In this spawned rank only: the loop builds its data through the recording subclass.
    loop.TokenData = RecordingData  # type: ignore[misc]
    for name, dp, ep, extra in (
        ("ep2_dp2", 2, 2, {}),
        ("dp4", 4, 1, {"resume": str(root / "ckpt_ep2_dp2" / f"step_{STOP:06d}")}),
    ):
        RecordingData.out = root / name / f"rows_{rank}.jsonl"
        (root / name).mkdir(exist_ok=True)
        train_rank(_cfg(root, name, dp, ep, **extra), rank, ParallelDims(dp=dp, ep=ep), root / name, paths)


def _rows(d: Path) -> dict:
    rows: dict = {}
    for f in sorted(d.glob("rows_*.jsonl")):
        for line in f.read_text().splitlines():
            rows.update(json.loads(line))
    return rows


def test_a_run_resumed_on_another_layout_reads_and_trains_like_the_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "a", [[37, 50, 13, 90] * 8, [61, 22] * 12], vocab_size=256)
    write_corpus(tmp_path / "b", [[45, 70] * 10], vocab_size=256, start=123)
    run = _cfg(tmp_path, "ep2_dp2", 2, 2)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    run_on_ranks(_worker, 4, str(tmp_path), paths)

    whole, resumed = _rows(tmp_path / "ep2_dp2"), _rows(tmp_path / "dp4")
    G = run.trainer.global_batch_size
    assert len(whole) == STEPS * G and len(resumed) == (STEPS - STOP) * G
    assert resumed == {k: v for k, v in whole.items() if int(k.split(":")[0]) >= STOP}  # bitwise, row by row
    meta = json.loads((tmp_path / "ckpt_ep2_dp2" / f"step_{STOP:06d}" / "meta.json").read_text())
    assert meta["data"]["samples"] == STOP * G and [s["weight"] for s in meta["data"]["sources"]] == [0.7, 0.3]
    log = (tmp_path / "dp4" / "train.log").read_text()
    assert f"data resumed at global sample {STOP * G}" in log

    a, b = read_metrics(tmp_path / "ep2_dp2"), read_metrics(tmp_path / "dp4")
    assert [r["step"] for r in b] == list(range(STOP + 1, STEPS + 1))
    assert_same_run(a[STOP:], b, "dp4 resumed", min_steps=2)
