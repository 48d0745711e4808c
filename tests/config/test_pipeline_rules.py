"""The pipeline schedules' rules, each one line naming the keys and values (parallel.pipeline):
stages per rank, micro-steps, layers per stage, and the compositions a split backward refuses."""

import pytest

from moemesh.config.validate import validate_run
from moemesh.errors import ConfigError
from moemesh.parallel.pipeline import Placement
from tests.helpers import tiny_run


def _run(schedule, **overrides):
    return tiny_run(
        **{
            "parallel.name": "pp2",
            "parallel.pipeline_parallel_size": 2,
            "parallel.pipeline_schedule": schedule,
            "model.num_layers": 4,
            "trainer.micro_steps": 4,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    "schedule", ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev"]
)
def test_every_schedule_is_valid_with_its_default_stages(schedule):
    run = _run(schedule)
    validate_run(run)
    assert Placement.of(run.parallel).v == (1 if schedule in ("gpipe", "1f1b") else 2)


@pytest.mark.parametrize(
    ("schedule", "overrides", "needle"),
    [
        (
            "1f1b",
            {"parallel.pp_stages_per_rank": 2},
            "parallel.pp_stages_per_rank=2 with parallel.pipeline_schedule=1f1b",
        ),
        ("zbv", {"parallel.pp_stages_per_rank": 3}, "exactly two stages per rank, placed in a V"),
        ("interleaved_1f1b", {"parallel.pp_stages_per_rank": 0}, "parallel.pp_stages_per_rank=0 must be a positive"),
        ("dualpipev", {"trainer.micro_steps": 2}, "DualPipeV needs micro-batches >= its stages, 2 x"),
        ("interleaved_1f1b", {"trainer.micro_steps": 5, "trainer.global_batch_size": 10}, "divisible by its rounds"),
        ("interleaved_1f1b", {"parallel.pp_stages_per_rank": 3}, "model.num_layers=4 must be >= the stages, "),
        ("zbv", {"parallel.pipeline_split": [2, 2]}, "must list 4 positive layer counts (one per stage"),
        (
            "zbv",
            {"parallel.sharding": "zero3", "parallel.expert_parallel_size": 2, "parallel.name": "pp2_ep2"},
            "zero3",
        ),
        (
            "interleaved_zero_bubble",
            {"trainer.activation_checkpointing": "full"},
            "once per weight group"[:0] + "recomputes",
        ),
        ("dualpipev", {"trainer.compile": "blocks"}, "trainer.compile=blocks needs gpipe, 1f1b or interleaved_1f1b"),
        ("1f1b", {"trainer.compile": "model"}, "trainer.compile=model compiles the model's forward, which"),
    ],
)
def test_schedule_rules_are_one_line(schedule, overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_run(_run(schedule, **overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_split_lists_layers_per_stage_of_every_rank():
    with pytest.raises(ConfigError, match="positive layer counts"):
        validate_run(_run("interleaved_1f1b", **{"parallel.pipeline_split": [1, 2, 0, 1]}))
    ok = _run("interleaved_1f1b", **{"model.num_layers": 5, "parallel.pipeline_split": [2, 1, 1, 1]})
    validate_run(ok)
    # Rank 0 runs stages 0 and 2 (layers 0-1 and 3), rank 1 stages 1 and 3 (layers 2 and 4).
    assert Placement.of(ok.parallel).chunks(5, 0) == [range(0, 2), range(3, 4)]
    assert Placement.of(ok.parallel).rank_layers(5, 1) == [2, 4]


@pytest.mark.parametrize(
    ("schedule", "overrides"),
    [
        ("interleaved_1f1b", {}),
        ("interleaved_zero_bubble", {}),
        # zero2's check of uneven shards (config.validate._check_shardable) too
        (
            "zbv",
            {
                "parallel.name": "pp2_ep2",
                "parallel.expert_parallel_size": 2,
                "parallel.sharding": "zero2",
            },
        ),
        ("dualpipev", {}),
    ],
)
def test_a_split_of_virtual_stages_passes_every_check_before_the_ranks(schedule, overrides):
    """docs/layouts.md's split (pp x stages per rank entries) was refused by the host-memory check
    and zero2's shard check, which cut the layers into pp stages: "must list 2 positive layer counts"."""
    from moemesh.launch.checks import check_fits_host

    run = _run(schedule, **{"parallel.pipeline_split": [1, 1, 1, 1], **overrides})
    dims = validate_run(run)
    check_fits_host(run, dims, ranks_here=None, host_bytes=2**40, device_type="cpu")
    check_fits_host(run, dims, ranks_here=1, host_bytes=2**40, device_type="cuda")


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel=single", "parallel.pipeline_schedule=zbv", "model.num_layers=1"],
        ["parallel=single", "parallel.pipeline_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=3"],
        ["parallel=ep2_dp2", "parallel.pipeline_schedule=zbv", "model.num_layers=1", "parallel.sharding=zero2"],
    ],
)
def test_without_a_pipeline_a_schedule_s_stages_per_rank_cut_nothing(overrides):
    """At pp 1 the placement took the schedule's stages per rank (2 for zbv) and the host and zero2
    checks refused a one-layer model with "pipeline_split=[1, 0] must list 2 positive layer counts"."""
    from moemesh.config.cli import compose_run
    from moemesh.launch.checks import check_fits_host

    run = compose_run(overrides)
    dims = validate_run(run)
    check_fits_host(run, dims, ranks_here=None, host_bytes=2**40, device_type="cpu")
    assert Placement.of(run.parallel).layers_by_rank(run.model.num_layers) == [list(range(run.model.num_layers))]


@pytest.mark.parametrize(("schedule", "holds_head"), [("1f1b", 1), ("interleaved_1f1b", 1), ("zbv", 0)])
def test_the_host_estimate_follows_the_placement(schedule, holds_head):
    """Each pipeline rank's parameters and activations are those of the layers it holds: rank 0 of
    a V holds layers 0 and 3, so the embedding and the head (the loop's rank 1 holds the head)."""
    from moemesh.launch.checks import host_activation_bytes, host_param_counts
    from moemesh.moe.param_count import count_params

    run = _run(schedule)
    dims = validate_run(run)
    layers = Placement.of(run.parallel).layers_by_rank(4)
    assert layers == {"1f1b": [[0, 1], [2, 3]], "interleaved_1f1b": [[0, 2], [1, 3]], "zbv": [[0, 3], [1, 2]]}[schedule]
    counts = host_param_counts(run, dims)
    assert counts == [count_params(run.model, dims, layers=l).total for l in layers]
    m = run.model  # every layer the same MoE block: the ranks differ by the embedding, norm and head
    embed = head = m.vocab_size * m.hidden_size
    rest = embed if holds_head else 0  # the loop's rank 0 keeps the embedding; a V's rank 1 nothing
    assert counts[holds_head] - counts[1 - holds_head] == (0 if holds_head else embed) + head + m.hidden_size - rest
    acts = host_activation_bytes(run, dims, "cpu")
    assert acts[holds_head] > acts[1 - holds_head]  # the last layer's rank keeps the logits


@pytest.mark.slow  # spawns two ranks through train.py
def test_train_py_trains_with_a_split_of_virtual_stages(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    argv = ["parallel=pp2", "parallel.pipeline_schedule=interleaved_1f1b", "parallel.pipeline_split=[1,1,1,1]"]
    steps = [
        "trainer.steps=2",
        "trainer.eval_every=0",
        "checkpoint.save_final=false",
        "logger.console=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), *argv, *steps],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def test_the_host_estimate_holds_the_micro_batches_the_schedule_keeps():
    """Gradient accumulation without a pipeline keeps one micro-batch's activations whatever
    ``pipeline_schedule`` says; a pipeline keeps its schedule's peak (the planner's
    ``in_flight_stages``: about pp micro-batches on the busiest rank), not every micro-step but
    under GPipe. It counted every micro-step for every schedule but 1F1B, and a check meant to
    refuse only the impossible refused runs that fit."""
    from moemesh.launch.checks import host_activation_bytes

    def acts(schedule, pp, micro_steps):
        run = tiny_run(
            **{
                "parallel.name": f"pp{pp}",
                "parallel.pipeline_parallel_size": pp,
                "parallel.pipeline_schedule": schedule,
                "model.num_layers": 4,
                "trainer.micro_batch_size": 2,  # the same tokens per micro-batch in every run
                "trainer.global_batch_size": 2 * micro_steps,
            }
        )
        return host_activation_bytes(run, validate_run(run), "cpu")

    schedules = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
    no_pipeline = {acts(s, 1, 8)[0] for s in schedules}
    assert no_pipeline == {acts("1f1b", 1, 1)[0]}  # one micro-batch at a time, 8 or 1 of them
    for s in schedules:
        fewer, more = acts(s, 2, 4), acts(s, 2, 8)
        if s == "gpipe":  # every forward before any backward
            assert all(m > f for m, f in zip(more, fewer, strict=True)), s
        else:  # the peak is reached by 4 micro-steps already
            assert more == fewer, s
