"""parallel.sharding (FSDP2 zero2 / zero3) computes the same training run as none.

One spawn of 4 gloo ranks trains every (layout, mode) in turn; each run's per-step loss,
aux loss, z loss and grad norm equal the single-process reference's to 1e-5 relative
over 10 steps, and the per-expert token counts are identical (routing did not change).
Every layout runs two micro-steps per step, so the sharded gradients are also
accumulated over micro-steps.
"""

import json
from pathlib import Path

import pytest
import torch

from moemesh.config.validate import validate_run
from moemesh.errors import ConfigError
from moemesh.launch import RankContext
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import train
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run, train_single

STEPS = 10
# name: (dp, ep, tp, pp, micro batch): two micro-steps per step everywhere (global batch 8).
LAYOUTS = {
    "ep2_dp2": (2, 2, 1, 1, 1),
    "dp4": (4, 1, 1, 1, 1),
    "ep4": (1, 4, 1, 1, 1),
    "tp2_ep2": (1, 2, 2, 1, 2),
    "pp2_ep2": (1, 2, 1, 2, 2),
}
# (layout, sharding, activation checkpointing)
RUNS = [(name, mode, "none") for name in LAYOUTS for mode in ("zero2", "zero3")] + [
    ("ep2_dp2", "zero3", "full"),
    ("tp2_ep2", "zero2", "selective"),
    ("pp2_ep2", "zero3", "selective"),
]


def _cfg(name, dp, ep, tp, pp, micro, sharding="none", ac="none", steps=STEPS):
    return tiny_run(
        **{
            "parallel.name": name,
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.pipeline_parallel_size": pp,
            "parallel.sharding": sharding,
            "trainer.activation_checkpointing": ac,
            "trainer.micro_batch_size": micro,
            "trainer.steps": steps,
            "model.shared_expert_ffn_size": 16,
            "data.name": "stdlib",
            "data.kind": "stdlib",
            "checkpoint.save_final": False,
        }
    )


def _read(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _worker(rank, world, root, paths, runs, steps=STEPS):
    for name, mode, ac in runs:
        dp, ep, tp, pp, micro = LAYOUTS[name]
        out = Path(root) / f"{name}-{mode}-{ac}"
        out.mkdir(exist_ok=True)
        ctx = RankContext(
            rank=rank,
            local_rank=rank,
            device=torch.device("cpu"),
            mesh=build_mesh(ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp), "cpu"),
            output_dir=str(out),
            data_paths=paths,
        )
        train(_cfg(name, dp, ep, tp, pp, micro, mode, ac, steps=steps), ctx)


@pytest.mark.slow
def test_sharded_modes_train_like_single(tmp_path):
    ref_cfg = _cfg("single", 1, 1, 1, 1, 4)
    paths = prepare_data(ref_cfg.data, seq_len=ref_cfg.trainer.seq_len, vocab_size=ref_cfg.model.vocab_size)
    (tmp_path / "single").mkdir()
    torch.set_num_threads(2)
    train_single(ref_cfg, tmp_path / "single", paths)
    run_on_ranks(_worker, 4, str(tmp_path), paths, RUNS)

    ref = _read(tmp_path / "single")
    assert len(ref) == STEPS and ref[-1]["loss"] < ref[0]["loss"] - 0.5
    for name, mode, ac in RUNS:
        label = f"{name}-{mode}-{ac}"
        got = _read(tmp_path / label)
        assert [r["step"] for r in got] == list(range(1, STEPS + 1)), label
        for a, b in zip(ref, got):
            for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (label, a["step"], key)
            for layer in a["load"]:
                assert b["load"][layer]["tokens_per_expert"] == a["load"][layer]["tokens_per_expert"], label
            assert b["time"]["grad_reduce"] >= 0.0, label  # the exposed reduction, inside the backward


@pytest.mark.slow
def test_zero3_divides_state_by_the_sharding_group(tmp_path):
    """ep2_dp2: non-expert state is sharded over dp*ep = 4 ranks, experts over dp = 2."""
    runs = [("ep2_dp2", "none", "none"), ("ep2_dp2", "zero2", "none"), ("ep2_dp2", "zero3", "none")]
    cfg = _cfg("ep2_dp2", *LAYOUTS["ep2_dp2"], steps=2)
    paths = prepare_data(cfg.data, seq_len=cfg.trainer.seq_len, vocab_size=cfg.model.vocab_size)
    run_on_ranks(_worker, 4, str(tmp_path), paths, runs, 2)
    mem = {
        mode: json.loads((tmp_path / f"ep2_dp2-{mode}-none" / "summary.json").read_text())["memory_per_rank"]
        for _, mode, _ in runs
    }
    for mode in ("zero2", "zero3"):
        for kind in ("param_bytes", "grad_bytes"):
            assert mem[mode][kind]["non_expert"]["max"] * 4 == mem["none"][kind]["non_expert"]["max"], (mode, kind)
            assert mem[mode][kind]["expert"]["max"] * 2 == mem["none"][kind]["expert"]["max"], (mode, kind)
        # AdamW: two moments per parameter (sharded) and a 4-byte step per tensor (not sharded).
        for kind, n in (("non_expert", 4), ("expert", 2)):
            none_b, got = mem["none"]["optimizer_bytes"][kind]["max"], mem[mode]["optimizer_bytes"][kind]["max"]
            moments = 2 * mem["none"]["param_bytes"][kind]["max"]
            assert got - moments // n == none_b - moments, (mode, kind)


@pytest.mark.parametrize("layout", ["single", "pp2", "tp2"])
def test_sharding_without_data_ranks_is_refused(layout):
    dims = {"single": {}, "pp2": {"parallel.pipeline_parallel_size": 2}, "tp2": {"parallel.tensor_parallel_size": 2}}
    run = tiny_run(**{"parallel.name": layout, "parallel.sharding": "zero3", **dims[layout]})
    with pytest.raises(ConfigError, match=r"parallel.sharding=zero3 .* dp\*ep = 1\*1 = 1: nothing to shard"):
        validate_run(run)
