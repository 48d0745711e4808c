"""The pipeline schedule as a dimension of the planner and the layout sweep
(``hydra.sweeper.schedules``): each split with pp > 1 is planned and chosen once per schedule,
priced with its own bubble, and its job runs it."""

import pytest

from moemesh.errors import ConfigError
from moemesh.parallel.dims import ParallelDims
from moemesh.planning import cost, search
from tests.helpers import tiny_run

SCHEDULES = ("1f1b", "interleaved_1f1b", "zbv", "dualpipev")


def _run(**overrides):
    return tiny_run(**{"model.num_layers": 8, "trainer.micro_steps": 8, "trainer.global_batch_size": 32, **overrides})


def test_each_pipeline_split_is_planned_once_per_schedule():
    valid, invalid = cost.make_plan(_run(), 4, schedules=SCHEDULES)
    by_split: dict[str, set] = {}
    for p in valid:
        by_split.setdefault(search.layout_name(p.dims), set()).add(p.schedule)
    assert by_split["pp4"] == set(SCHEDULES) and by_split["pp2_dp2"] == set(SCHEDULES)
    assert by_split["dp4"] == {None}  # no pipeline: no schedule
    # dualpipev needs micro-steps >= 2 pp: refused on no split here (8 >= 2 x 4), with 4 it is.
    _, invalid = cost.make_plan(
        _run(**{"trainer.micro_steps": 4, "trainer.global_batch_size": 16}), 4, schedules=SCHEDULES
    )
    assert any(p.schedule == "dualpipev" and "DualPipeV needs" in (p.problem or "") for p in invalid)


def test_the_bubble_ranks_the_schedules_under_the_priors():
    """Uncalibrated (idle devices), zbv's smaller bubble makes pp4 faster than under 1F1B."""
    run = _run()
    plans = {s: cost.plan_one(cost.with_schedule(run, s), ParallelDims(pp=4)) for s in SCHEDULES}
    assert plans["1f1b"].bubble == pytest.approx(3 / 11)
    assert plans["interleaved_1f1b"].bubble == pytest.approx(3 / 19)
    assert plans["zbv"].bubble == pytest.approx(3 / 51)
    assert plans["zbv"].compute_s < plans["interleaved_1f1b"].compute_s < plans["1f1b"].compute_s
    # Activations: interleaved 1F1B holds p + (p-1)/v micro-batches of a rank's layers, 1F1B p.
    assert plans["interleaved_1f1b"].act_bytes > plans["1f1b"].act_bytes


def test_candidates_carry_their_schedule_and_the_command_runs_it():
    s = search.settings(top=0, include=["pp4"], schedules=["1f1b", "zbv"])
    valid, _ = cost.make_plan(_run(), 4, schedules=s.schedules)
    choice = search.choose(valid, s)
    assert sorted(c.label for c in choice.chosen) == ["pp4 1f1b", "pp4 zbv"]
    zbv = next(c for c in choice.chosen if c.schedule == "zbv")
    cmd = cost.train_command(_run(), ["parallel.pipeline_schedule=gpipe", "trainer.steps=3"], zbv.dims, zbv.schedule)
    assert "parallel.pipeline_schedule=zbv" in cmd and "parallel.pipeline_schedule=gpipe" not in cmd
    assert "trainer.steps=3" in cmd


@pytest.mark.parametrize(
    ("schedules", "message"),
    [
        (["zbv", "zb"], "hydra.sweeper.schedules='zb' is not one of 1f1b, gpipe"),
        (["zbv", "zbv"], "a schedule is listed twice"),
    ],
)
def test_bad_schedules_are_one_line(schedules, message):
    with pytest.raises(ConfigError) as err:
        search.settings(schedules=schedules)
    assert message in str(err.value) and "\n" not in str(err.value)
