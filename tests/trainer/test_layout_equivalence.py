"""The product's core promise: every layout computes the same training run as ``single``.

Same seed, same global batch, the same number of micro-steps: each layout's per-step loss,
aux loss, z loss and gradient norm equal ``single``'s to 1e-5 relative for as long as routing
is identical (a rounding flip ends the comparison, and at least ``MIN_STEPS`` steps must be
compared: tests/same_math.py), and every parameter's gradient at step 1 equals ``single``'s
to 1e-5 of its largest entry, each rank's piece against the same slice of ``single``'s.
The reference trains in this process with the session's thread count (OMP_NUM_THREADS).
"""

import json
from pathlib import Path

import pytest

from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh
from moemesh.trainer.data import prepare_data
from tests.dist_utils import run_on_ranks
from tests.helpers import cpu_context, tiny_run
from tests.same_math import assert_trains_like, read_metrics, train_keeping_grads, train_reference

pytestmark = pytest.mark.slow  # trains every layout on spawned gloo ranks

# name: dp, ep, tp, pp, sequence_parallel, schedule, micro batch.
DATA_LAYOUTS = {
    "dp4": (4, 1, 1, 1, False, "1f1b", 2),
    "ep2_dp2": (2, 2, 1, 1, False, "1f1b", 2),
    "ep4": (1, 4, 1, 1, False, "1f1b", 2),
}
# Every layout runs two micro-steps per step, like the reference (single with micro batch 4).
MESH_LAYOUTS = {
    "tp2_ep2_dp2": (2, 2, 2, 1, False, "1f1b", 1),
    "tp2_dp4_sp": (4, 1, 2, 1, True, "1f1b", 1),
    "pp2_tp2_ep2_sp": (1, 2, 2, 2, True, "1f1b", 2),
    "pp2_dp4_gpipe": (4, 1, 1, 2, False, "gpipe", 1),
    "pp2_dp4_1f1b": (4, 1, 1, 2, False, "1f1b", 1),
}
FOUR_AXES = {"pp2_tp2_ep2_dp2": (2, 2, 2, 2, False, "1f1b", 1)}
# Steps run, and the fewest that must route identically (so be compared) for a pass.
STEPS, MIN_STEPS = 6, 4


def _cfg(name, dp, ep, tp, pp, sp, schedule, micro, steps=STEPS):
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
            # DeepSeek-V3's sequence-wise loss too: its counts are summed over TP peers, its
            # sequences cut by SP and spread over data ranks and micro-steps
            "model.seq_aux_loss_factor": 0.01,
            "data.name": "stdlib",
            "data.kind": "stdlib",
            "checkpoint.save_final": False,
        }
    )


def _worker(rank, world, root, paths, layouts, steps):
    for name, spec in layouts.items():
        dims = ParallelDims(dp=spec[0], ep=spec[1], tp=spec[2], pp=spec[3])
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        ctx = cpu_context(rank, build_mesh(dims, "cpu"), out, paths)
        train_keeping_grads(_cfg(name, *spec, steps=steps), ctx, out / f"grads{rank}.pt")


def _check_layouts(tmp_path, layouts, world, *, ref_micro, steps=STEPS, min_steps=MIN_STEPS):
    """Train ``single`` here and ``layouts`` on ``world`` ranks; each equals ``single``."""
    ref_cfg = _cfg("single", 1, 1, 1, 1, False, "1f1b", ref_micro, steps=steps)
    paths = prepare_data(ref_cfg.data, seq_len=ref_cfg.trainer.seq_len, vocab_size=ref_cfg.model.vocab_size)
    single = train_reference(ref_cfg, tmp_path / "single", paths)
    run_on_ranks(_worker, world, str(tmp_path), paths, layouts, steps)

    ref = read_metrics(tmp_path / "single")
    assert len(ref) == steps
    for name, (dp, ep, tp, pp, *_) in layouts.items():
        out = tmp_path / name
        n, grad_err, rec_err = assert_trains_like(tmp_path / "single", out, world, name, min_steps=min_steps)
        print(f"{name}: {n}/{steps} steps compared, records within {rec_err:.1e}, step-1 gradients {grad_err:.1e}")
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["dp"], summary["ep"], summary["tp"], summary["pp"]) == (dp, ep, tp, pp)
        # EP divides the expert bytes per rank; TP and PP divide the rest.
        per_rank, whole = summary["param_bytes_per_rank"], single["param_bytes_per_rank"]
        if pp == 1:
            assert per_rank["expert"]["max"] == whole["expert"]["max"] // ep, name
        else:
            assert per_rank["expert"]["max"] < whole["expert"]["max"] // ep, name
        if (tp, pp) == (1, 1):
            assert per_rank["non_expert"] == whole["non_expert"], name
        else:
            assert per_rank["non_expert"]["max"] < whole["non_expert"]["max"], name
    return ref


def test_data_and_expert_layouts_train_like_single(tmp_path):
    """4 ranks: dp4, ep2_dp2, ep4 (one micro-step each, as single with micro batch 8)."""
    ref = _check_layouts(tmp_path, DATA_LAYOUTS, 4, ref_micro=8)
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.25  # it is learning, not only agreeing


def test_tensor_and_pipeline_parallel_layouts_train_like_single(tmp_path):
    """8 ranks: TP with EP and DP, TP with sequence parallelism, PP with TP, EP and sequence
    parallelism, PP with DP under both schedules."""
    _check_layouts(tmp_path, MESH_LAYOUTS, 8, ref_micro=4)


def test_all_four_axes_train_like_single(tmp_path):
    """16 ranks: pp2 x tp2 x ep2 x dp2, two micro-steps per step as single's; 4 steps (16 ranks
    share 2 cores here), at least 3 compared."""
    _check_layouts(tmp_path, FOUR_AXES, 16, ref_micro=4, steps=4, min_steps=3)
