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
