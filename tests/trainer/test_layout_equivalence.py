"""The product's core promise: every layout computes the same training run.

Same seed, same global batch: per-step loss (and aux loss, grad norm) of single,
dp4, ep2_dp2 and ep4 agree to 1e-5 relative over 10 steps in fp32 on CPU.
"""

import json
from pathlib import Path

import pytest
import torch

from moemesh.parallel.dims import ParallelDims
from moemesh.trainer.data import prepare_data
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run, train_rank, train_single

pytestmark = pytest.mark.slow  # trains every layout on spawned gloo ranks

LAYOUTS = {"dp4": (4, 1), "ep2_dp2": (2, 2), "ep4": (1, 4)}
STEPS = 10


def _run_cfg(name, dp, ep, tp=1, sp=False, steps=STEPS):
    return tiny_run(
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.sequence_parallel": sp,
            "trainer.steps": steps,
            "model.shared_expert_ffn_size": 16,
            "data.name": "stdlib",
            "data.kind": "stdlib",
        }
    )


def _read(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _layouts_worker(rank, world, root, paths):
    for name, (dp, ep) in LAYOUTS.items():
        dims = ParallelDims(dp=dp, ep=ep)
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        train_rank(_run_cfg(name, dp, ep), rank, dims, out, paths)


def _train_single(out, steps=STEPS):
    run = _run_cfg("single", 1, 1, steps=steps)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    out.mkdir()
    torch.set_num_threads(2)
    train_single(run, out, paths)
    return paths


def _assert_same_run(ref, got, name):
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (name, a["step"], key)
        for layer in a["load"]:  # routing is identical, so the counts are exact
            assert b["load"][layer]["tokens_per_expert"] == a["load"][layer]["tokens_per_expert"]


def test_single_dp4_ep2dp2_ep4_train_identically(tmp_path):
    paths = _train_single(tmp_path / "single")
    run_on_ranks(_layouts_worker, 4, str(tmp_path), paths)

    ref = _read(tmp_path / "single")
    assert len(ref) == STEPS
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.5  # it is learning, not only agreeing
    for name in LAYOUTS:
        got = _read(tmp_path / name)
        _assert_same_run(ref, got, name)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        dp, ep = LAYOUTS[name]
        assert (summary["dp"], summary["ep"], summary["world_size"]) == (dp, ep, 4)
        # EP divides the expert bytes per rank; non-expert bytes are replicated.
        single = json.loads((tmp_path / "single" / "summary.json").read_text())
        e_single = single["param_bytes_per_rank"]["expert"]["max"]
        assert summary["param_bytes_per_rank"]["expert"]["max"] == e_single // ep
        assert summary["param_bytes_per_rank"]["non_expert"] == single["param_bytes_per_rank"]["non_expert"]


# name: dp, ep, tp, pp, sequence_parallel, schedule, micro batch. Every layout runs two
# micro-steps per step, like the reference (single with micro batch 4).
MESH_LAYOUTS = {
    "tp2_ep2_dp2": (2, 2, 2, 1, False, "1f1b", 1),
    "tp2_dp4_sp": (4, 1, 2, 1, True, "1f1b", 1),
    "pp2_tp2_ep2": (1, 2, 2, 2, False, "1f1b", 2),
    "pp2_dp4_gpipe": (4, 1, 1, 2, False, "gpipe", 1),
    "pp2_dp4_1f1b": (4, 1, 1, 2, False, "1f1b", 1),
}
MESH_STEPS = 5


def _mesh_cfg(name, dp, ep, tp, pp, sp, schedule, micro, steps=MESH_STEPS):
    return tiny_run(
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.pipeline_parallel_size": pp,
            "parallel.sequence_parallel": sp,
            "parallel.pipeline_schedule": schedule,
            "trainer.micro_batch_size": micro,
            "trainer.steps": steps,
            "model.shared_expert_ffn_size": 16,
            "data.name": "stdlib",
            "data.kind": "stdlib",
        }
    )


def _mesh_worker(rank, world, root, paths, layouts, steps):
    for name, spec in layouts.items():
        dp, ep, tp, pp = spec[:4]
        dims = ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp)
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        train_rank(_mesh_cfg(name, *spec, steps=steps), rank, dims, out, paths)


def test_tensor_and_pipeline_parallel_layouts_train_like_single(tmp_path):
    """8 ranks: TP with EP and DP, TP with sequence parallelism, PP with TP and EP, PP under
    both schedules; per-step loss, aux, z and grad norm equal single's to 1e-5."""
    ref_cfg = _mesh_cfg("single", 1, 1, 1, 1, False, "1f1b", 4)
    paths = prepare_data(ref_cfg.data, seq_len=ref_cfg.trainer.seq_len, vocab_size=ref_cfg.model.vocab_size)
    (tmp_path / "single").mkdir()
    torch.set_num_threads(2)
    train_single(ref_cfg, tmp_path / "single", paths)
    run_on_ranks(_mesh_worker, 8, str(tmp_path), paths, MESH_LAYOUTS, MESH_STEPS)
    ref = _read(tmp_path / "single")
    single = json.loads((tmp_path / "single" / "summary.json").read_text())["param_bytes_per_rank"]
    for name, (_dp, ep, tp, pp, *_) in MESH_LAYOUTS.items():
        _assert_same_run(ref, _read(tmp_path / name), name)
        per_rank = json.loads((tmp_path / name / "summary.json").read_text())["param_bytes_per_rank"]
        assert per_rank["expert"]["max"] <= single["expert"]["max"] // ep
        assert per_rank["non_expert"]["max"] < single["non_expert"]["max"] or (tp, pp) == (1, 1)


def test_sixteen_rank_preset_trains(tmp_path):
    """pp2 x tp2 x ep2 x dp2 = 16 ranks, 2 steps, with sequence parallelism."""
    cfg = _mesh_cfg("pp2_tp2_ep2_dp2", 2, 2, 2, 2, True, "1f1b", 1, steps=2)
    paths = prepare_data(cfg.data, seq_len=cfg.trainer.seq_len, vocab_size=cfg.model.vocab_size)
    run_on_ranks(_mesh_worker, 16, str(tmp_path), paths, {"p16": (2, 2, 2, 2, True, "1f1b", 1)}, 2)
    records = _read(tmp_path / "p16")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(5.55, abs=0.1)
    assert json.loads((tmp_path / "p16" / "summary.json").read_text())["world_size"] == 16
