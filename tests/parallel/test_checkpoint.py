"""Checkpoints that reshard across layouts, atomic saves, fallbacks, and safe loading."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from moemesh.launch import RankContext
from moemesh.parallel import checkpoint
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh, single_rank_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import train
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run, train_single
from tests.same_math import assert_same_run

STEPS = 10


def _cfg(name, dp, ep, **extra):
    return tiny_run(
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "trainer.steps": STEPS,
            "data.name": "stdlib",
            "data.kind": "stdlib",
            "checkpoint.every": 5,
            **extra,
        }
    )


def _ctx(rank, mesh, output_dir, data_paths) -> RankContext:
    return RankContext(
        rank=rank, local_rank=rank, device=torch.device("cpu"), mesh=mesh, output_dir=output_dir, data_paths=data_paths
    )


def _read(d):
    return {r["step"]: r for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines())}


def _four_ranks(rank, world, root, paths):
    # 10 uninterrupted steps under ep2_dp2, saving after 5 and 10 ...
    out = Path(root) / "ep2_dp2"
    out.mkdir(exist_ok=True)
    ctx = _ctx(rank, build_mesh(ParallelDims(dp=2, ep=2), "cpu"), str(out), paths)
    train(_cfg("ep2_dp2", 2, 2), ctx)
    # ... then resume the step-5 checkpoint under ep4.
    out4 = Path(root) / "ep4"
    out4.mkdir(exist_ok=True)
    ctx = _ctx(rank, build_mesh(ParallelDims(ep=4), "cpu"), str(out4), paths)
    train(_cfg("ep4", 1, 4, resume=str(out / "checkpoints" / "step_000005")), ctx)
    # A vocabulary TP pads: 97 rows over tp2 are 49 + 48 and a zero row, which no checkpoint holds.
    out97 = Path(root) / "tp2_dp2_v97"
    out97.mkdir(exist_ok=True)
    ctx = _ctx(rank, build_mesh(ParallelDims(dp=2, tp=2), "cpu"), str(out97), _v97_data())
    train(_v97("tp2_dp2", dp=2, tp=2), ctx)


def _v97_data():
    run = _v97("single")
    return prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)


def _v97(name, dp=1, tp=1, **extra):
    return _cfg(
        name,
        dp,
        1,
        **{
            "parallel.tensor_parallel_size": tp,
            "model.vocab_size": 97,
            "data.name": "synthetic",
            "data.kind": "synthetic",
            "trainer.steps": 4,
            "checkpoint.every": 2,
            **extra,
        },
    )


@pytest.mark.slow
def test_resume_under_another_layout_continues_the_same_run(tmp_path):
    run = _cfg("single", 1, 1)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    run_on_ranks(_four_ranks, 4, str(tmp_path), paths)
    ckpts = tmp_path / "ep2_dp2" / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(ckpts)] == ["step_000005", "step_000010"]
    meta = json.loads((ckpts / "step_000005" / "meta.json").read_text())
    assert (meta["layout"], meta["step"], meta["ep"]) == ("ep2_dp2", 5, 2)
    # ep2_dp2 -> single, in this process.
    (tmp_path / "single").mkdir()
    train(
        _cfg("single", 1, 1, resume=str(ckpts)),  # a directory: the newest inside (step 10) ...
        _ctx(0, single_rank_mesh(), str(tmp_path / "single"), paths),
    )
    assert not (tmp_path / "single" / "metrics.jsonl").read_text().strip()  # ... is already at step 10
    said = "the checkpoint is at step 10 and trainer.steps=10: nothing left to train"
    assert said in (tmp_path / "single" / "train.log").read_text()
    shutil.rmtree(tmp_path / "single")
    (tmp_path / "single").mkdir()
    train(
        _cfg("single", 1, 1, resume=str(ckpts / "step_000005")),
        _ctx(0, single_rank_mesh(), str(tmp_path / "single"), paths),
    )
    whole = _read(tmp_path / "ep2_dp2")
    for name in ("ep4", "single"):
        resumed = _read(tmp_path / name)
        assert sorted(resumed) == list(range(6, STEPS + 1))  # metrics count completed steps: 6..10
        assert_same_run([whole[s] for s in sorted(resumed)], [resumed[s] for s in sorted(resumed)], name, min_steps=3)

    # The padded vocabulary's checkpoint (tp2_dp2, 97 rows) resumes under single, without padding.
    (tmp_path / "single_v97").mkdir()
    ckpt97 = tmp_path / "tp2_dp2_v97" / "checkpoints" / "step_000002"
    train(
        _v97("single", resume=str(ckpt97)),
        _ctx(0, single_rank_mesh(), str(tmp_path / "single_v97"), _v97_data()),
    )
    whole, resumed = _read(tmp_path / "tp2_dp2_v97"), _read(tmp_path / "single_v97")
    assert sorted(resumed) == [3, 4]
    assert_same_run([whole[3], whole[4]], [resumed[3], resumed[4]], "single from tp2_dp2, vocab 97", min_steps=2)


def _tiny_checkpoint(tmp_path, step=3):
    run = _cfg(
        "single",
        1,
        1,
        **{
            "trainer.steps": step,
            "checkpoint.every": 1,
            "checkpoint.keep": 2,
            "data.name": "synthetic",
            "data.kind": "synthetic",
        },
    )
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    train_single(run, tmp_path, paths)
    return tmp_path / "checkpoints", paths


def test_keeps_the_last_k_and_never_picks_a_half_written_one(tmp_path):
    root, _ = _tiny_checkpoint(tmp_path)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_000002", "step_000003"]
    (root / "step_000009.tmp").mkdir()  # a crash during a save
    shutil.copytree(root / "step_000003", root / "step_000008")
    (root / "step_000008" / "meta.json").unlink()  # died before the rename's meta.json
    assert [p.name for p in checkpoint.resolve("auto", root)] == ["step_000003", "step_000002"]
    # resume=PATH: a directory of checkpoints is tried newest first too; one checkpoint alone.
    assert [p.name for p in checkpoint.resolve(str(root), tmp_path)] == ["step_000003", "step_000002"]
    assert checkpoint.resolve(str(root / "step_000002"), tmp_path) == [(root / "step_000002").resolve()]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    root, paths = _tiny_checkpoint(tmp_path)
    (shard,) = (root / "step_000003").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    run = _cfg(
        "single",
        1,
        1,
        **{
            "trainer.steps": 4,
            "resume": "auto",
            "data.name": "synthetic",
            "data.kind": "synthetic",
            "logger.console": True,
        },
    )
    out = tmp_path  # resume=auto looks in <run dir>/checkpoints
    summary = train_single(run, out, paths)
    assert summary["steps"] == 2  # resumed after step 2: ran steps 2 and 3


def test_a_checkpoint_of_another_model_is_refused_with_the_differences(tmp_path):
    root, paths = _tiny_checkpoint(tmp_path)
    run = _cfg(
        "single",
        1,
        1,
        **{
            "trainer.steps": 4,
            "resume": str(root),
            "model.moe_ffn_hidden_size": 40,
            "data.name": "synthetic",
            "data.kind": "synthetic",
        },
    )
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"none of 2 checkpoint.*saved for another model: "
        r"model.moe_ffn_hidden_size=48 \(now 40\)",
    ):
        train_single(run, tmp_path, paths)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    root, _ = _tiny_checkpoint(tmp_path)
    target = root / "step_000003" / ".metadata"
    marker = tmp_path / "pwned"
    target.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"\.metadata: refused, not plain DCP metadata: .*GLOBAL "
        r"(posix|os)\.system",
    ):
        checkpoint.read_metadata(root / "step_000003")
    assert not marker.exists()
    # More hostile files, the integrity checks and the fallbacks: test_checkpoint_security.py
    # and test_checkpoint_integrity.py.
