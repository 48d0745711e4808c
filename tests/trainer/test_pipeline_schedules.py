"""Every pipeline schedule trains like single: torch's gpipe, 1f1b, interleaved_1f1b,
interleaved_zero_bubble, zbv and dualpipev, on pp2 and on pp2_ep2 (two stages per rank where a
schedule has several), with the same micro-steps. Per step the loss, aux and z losses and the
gradient norm equal single's to 1e-5 relative, the tokens per expert exactly, and the final
validation loss (the forward-only pass, ``parallel.pipeline.evaluate_pipeline``) to 1e-5.

On pp2_ep2 the schedules also carry the compositions they allow (``config.validate`` refuses the
rest in one line): sharding (zero2; zero3 where the backward is not split), activation
checkpointing (full, selective; where the backward is not split), trainer.compile=blocks (with
interleaved_1f1b, zero2 and full recompute), and one TP layout with
sequence parallelism under zbv, so a schedule that broke with one of them fails here.

Tied embeddings on pp2: zbv and dualpipev (rank 0 holds the first and the last stage, the lookup
and the head of one matrix; zbv with zero2 on pp2_ep2) and 1f1b (two copies on two ranks) against a tied single.
"""

import json
from pathlib import Path

import pytest
import torch

from moemesh.parallel.dims import ParallelDims
from moemesh.trainer.data import prepare_data
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run, train_rank, train_single
from tests.same_math import assert_same_run

pytestmark = pytest.mark.slow  # spawns gloo ranks

STEPS = 3
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev")
# name: (dp, ep, tp, pp, schedule, extra overrides)
PP2 = {f"pp2_{s}": (1, 1, 1, 2, s, {}) for s in SCHEDULES}
PP2_EP2 = {
    "pp2_ep2_gpipe_zero3_full": (
        1,
        2,
        1,
        2,
        "gpipe",
        {"parallel.sharding": "zero3", "trainer.activation_checkpointing": "full"},
    ),
    "pp2_ep2_1f1b_selective": (1, 2, 1, 2, "1f1b", {"trainer.activation_checkpointing": "selective"}),
    "pp2_ep2_interleaved_1f1b_zero2_full": (
        1,
        2,
        1,
        2,
        "interleaved_1f1b",
        {"parallel.sharding": "zero2", "trainer.activation_checkpointing": "full", "trainer.compile": "blocks"},
    ),
    "pp2_ep2_interleaved_zero_bubble": (1, 2, 1, 2, "interleaved_zero_bubble", {}),
    "pp2_ep2_zbv_zero2": (1, 2, 1, 2, "zbv", {"parallel.sharding": "zero2"}),
    "pp2_ep2_dualpipev_zero2": (1, 2, 1, 2, "dualpipev", {"parallel.sharding": "zero2"}),
    "pp2_tp2_zbv_sp": (1, 1, 2, 2, "zbv", {"parallel.sequence_parallel": True}),
}


def _cfg(name, dp=1, ep=1, tp=1, pp=1, schedule="1f1b", extra=None):
    layout = "_".join(p for p in name.split("_") if p[:2] in ("pp", "tp", "ep", "dp") and p[2:].isdigit())
    return tiny_run(
        **{
            "parallel.name": layout or "single",
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.pipeline_parallel_size": pp,
            "parallel.pipeline_schedule": schedule,
            "model.num_layers": 4,  # pp2 x 2 stages per rank: a layer per stage
            "model.shared_expert_ffn_size": 16,
            "trainer.micro_steps": 4,  # dualpipev on pp2 needs 2 x pp
            "trainer.steps": STEPS,
            "data.name": "stdlib",
            "data.kind": "stdlib",
            **(extra or {}),
        }
    )


def _worker(rank, world, root, paths, layouts):
    for name, (dp, ep, tp, pp, schedule, extra) in layouts.items():
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        run = _cfg(name, dp, ep, tp, pp, schedule, extra)
        train_rank(run, rank, ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp), out, paths)


def _read(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(ref, got, name):
    """Per step to 1e-5 while routing is identical, stopping at a rounding flip (at least 2 of
    the STEPS compared: tests/same_math.py); the final validation loss too where no step flipped."""
    if assert_same_run(ref, got, name, min_steps=2) == len(ref):
        assert got[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-5), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedules")
    run = _cfg("single")
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    (root / "single").mkdir()
    torch.set_num_threads(2)
    train_single(run, root / "single", paths)
    ref = _read(root / "single")
    assert ref[-1]["loss"] < ref[0]["loss"]  # learning, not only agreeing
    return root, paths, ref


def test_every_schedule_on_pp2_trains_like_single(reference):
    root, paths, ref = reference
    run_on_ranks(_worker, 2, str(root), paths, PP2)
    for name in PP2:
        _assert_same_run(ref, _read(root / name), name)


def test_every_schedule_on_pp2_ep2_with_sharding_and_recompute_trains_like_single(reference):
    root, paths, ref = reference
    run_on_ranks(_worker, 4, str(root), paths, PP2_EP2)
    for name, (_dp, ep, *_rest) in PP2_EP2.items():
        got = _read(root / name)
        _assert_same_run(ref, got, name)
        assert (got[-1]["a2a"]["bytes_sent"] > 0) == (ep > 1), name  # the All-to-All ran inside the stages


TIED = {"model.tie_embeddings": True}
# V schedules put the first and the last stage on rank 0: the tied embedding is the lookup of one
# and the head of the other, and the split backward's weight step must still count the head.
PP2_TIED = {
    "pp2_zbv_tied": (1, 1, 1, 2, "zbv", TIED),
    "pp2_dualpipev_tied": (1, 1, 1, 2, "dualpipev", TIED),
    "pp2_1f1b_tied": (1, 1, 1, 2, "1f1b", TIED),  # the two copies on two ranks, summed after
}
# zero2: the last stage's FSDP root leaves the matrix to the first stage's, which reduces it whole
PP2_EP2_TIED = {"pp2_ep2_zbv_zero2_tied": (1, 2, 1, 2, "zbv", {**TIED, "parallel.sharding": "zero2"})}


def test_tied_embeddings_under_v_schedules_train_like_single(tmp_path):
    run = _cfg("single", extra=TIED)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    (tmp_path / "single").mkdir()
    torch.set_num_threads(2)
    train_single(run, tmp_path / "single", paths)
    ref = _read(tmp_path / "single")
    run_on_ranks(_worker, 2, str(tmp_path), paths, PP2_TIED)
    run_on_ranks(_worker, 4, str(tmp_path), paths, PP2_EP2_TIED)
    for name in {**PP2_TIED, **PP2_EP2_TIED}:
        _assert_same_run(ref, _read(tmp_path / name), name)
