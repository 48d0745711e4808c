"""The planner prices each pipeline schedule as torch builds it: its bubble and its activations
(``moemesh/planning/schedules.py``) against torch's own action order of each schedule (torch 2.13,
built here for every rank without a process group), run with one unit of time per forward, input
backward and weight backward of a stage (1/v of that with v stages per rank)."""

import pytest
import torch.distributed.pipelining.schedules as S

from moemesh.parallel.pipeline import (
    Placement,
    microbatch_problem,
    stage_ids,
    stage_layers,
    stages_problem,
    traits,
)
from moemesh.planning.schedules import bubble_fraction, in_flight_stages

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev")


class _Stage:
    """What a schedule's constructor reads off a PipelineStage."""

    def __init__(self, index, num_stages, pp, rank):
        self.stage_index, self.num_stages, self.group_size, self.group_rank = index, num_stages, pp, rank
        self.is_first, self.is_last, self.submod = index == 0, index == num_stages - 1, None


def torch_order(schedule: str, pp: int, v: int, m: int) -> dict[int, list]:
    """Every rank's compute actions, as torch's schedule class orders them."""
    t = traits(schedule)
    cls = getattr(S, t.torch_class)
    if schedule == "1f1b":  # Schedule1F1B._step_microbatches' order (its _get_pipeline_order, for plots, differs)
        return {r: _one_f_one_b(r, pp, m) for r in range(pp)}
    if not t.multi:
        obj = cls.__new__(cls)
        obj._num_stages, obj._n_microbatches = pp, m
        return obj._get_pipeline_order()
    stages = [_Stage(i, pp * v, pp, 0) for i in stage_ids(schedule, pp, v, 0)]
    return cls(stages, m, loss_fn=lambda out, target: out).pipeline_order


def _one_f_one_b(rank: int, pp: int, m: int) -> list:
    """Torch's 1F1B on stage ``rank``: min(m, pp - rank) forwards, then a backward and a forward
    in turn, then the backwards left."""
    F, B = S._ComputationType.FORWARD, S._ComputationType.FULL_BACKWARD
    warmup = min(m, pp - rank)
    out = [S._Action(rank, F, i) for i in range(warmup)]
    for i in range(m - warmup):
        out += [S._Action(rank, B, i), S._Action(rank, F, warmup + i)]
    return out + [S._Action(rank, B, i) for i in range(m - warmup, m)]


def simulate(order: dict[int, list], pp: int, v: int, m: int) -> tuple[float, float]:
    """(bubble fraction, the most micro-batches of a rank's layers any rank holds) of ``order``."""
    n, unit = pp * v, 1.0 / v
    cost = {"F": unit, "I": unit, "W": unit, "B": 2 * unit}
    queues = {}
    for rank, actions in order.items():
        flat = [sub for a in actions if a is not None for sub in (a.sub_actions or (a,))]
        queues[rank] = [a for a in flat if a.computation_type.value in cost]
    done: dict[tuple, float] = {}
    clock = dict.fromkeys(queues, 0.0)
    held = {r: [] for r in queues}  # (time, +/- unit) as forwards start and weight gradients end
    while any(queues.values()):
        moved = False
        for r, q in queues.items():
            while q:
                s, kind, mb = q[0].stage_index, q[0].computation_type.value, q[0].microbatch_index
                if kind == "F":
                    deps = [(s - 1, "F", mb)] if s else []
                elif kind in "IB":
                    deps = [(s, "F", mb)] + ([(s + 1, "back", mb)] if s < n - 1 else [])
                else:
                    deps = [(s, "back", mb)]
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = start + cost[kind]
                done[(s, "back" if kind in "IB" else kind, mb)] = clock[r]
                if kind == "F":
                    held[r].append((start, unit))
                elif kind in "BW":
                    held[r].append((clock[r], -unit))
                q.pop(0)
                moved = True
        assert moved, "the order deadlocks"
    span = max(clock.values())
    peak = max(max(_running(sorted(h))) for h in held.values())
    return 1 - 3 * m / span, peak


def _running(events):
    total = 0.0
    for _, delta in events:
        total += delta
        yield total


CASES = [
    (schedule, pp, v, m)
    for pp in (2, 4)
    for schedule, vs in (
        ("gpipe", (1,)),
        ("1f1b", (1,)),
        ("interleaved_1f1b", (1, 2, 3)),
        ("interleaved_zero_bubble", (1, 2, 3)),
        ("zbv", (2,)),
        ("dualpipev", (2,)),
    )
    for v in vs
    for m in (2 * pp, 4 * pp)
]


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), CASES)
def test_bubble_and_activations_are_torchs_orders(schedule, pp, v, m):
    bubble, peak = simulate(torch_order(schedule, pp, v, m), pp, v, m)
    assert bubble_fraction(schedule, pp, v, m) == pytest.approx(bubble, abs=0.006)
    assert in_flight_stages(schedule, pp, v, m) == pytest.approx(peak)


def test_with_too_few_micro_batches_the_bubble_is_bounded_by_1f1bs():
    for schedule in SCHEDULES:
        for pp, v, m in ((4, 2, 4), (4, 2, 6), (4, 3, 5), (2, 2, 3)):
            if (traits(schedule).stages_per_rank or v) != v or microbatch_problem(schedule, pp, m):
                continue
            bubble, _ = simulate(torch_order(schedule, pp, v, m), pp, v, m)
            assert bubble <= bubble_fraction(schedule, pp, v, m) + 1e-9, (schedule, pp, v, m)


def test_every_micro_batch_count_torch_runs_is_held_within_the_planned_activations():
    """Inside the formulas' regime and outside it (an interleaved schedule's m not a multiple of p
    ran 7 micro-batches at p = 4, v = 2 where 5.5 were planned; fewer than the pipeline fills): the
    peak of torch's order is never above in_flight_stages, nor is its bubble above the planned one."""
    for schedule in SCHEDULES:
        for pp in (2, 3, 4):
            for v in (traits(schedule).stages_per_rank,) if traits(schedule).stages_per_rank else (1, 2, 3):
                for m in range(1, 3 * pp + 2):
                    if microbatch_problem(schedule, pp, m):
                        continue
                    try:
                        order = torch_order(schedule, pp, v, m)
                    except ValueError:  # a relation torch checks that the trainer refuses elsewhere
                        continue
                    bubble, peak = simulate(order, pp, v, m)
                    assert peak <= in_flight_stages(schedule, pp, v, m) + 1e-9, (schedule, pp, v, m, peak)
                    assert bubble <= bubble_fraction(schedule, pp, v, m) + 0.006, (schedule, pp, v, m, bubble)


def test_no_pipeline_no_bubble():
    assert bubble_fraction("gpipe", 1, 1, 8) == 0.0 and in_flight_stages("gpipe", 1, 1, 8) == 1.0


@pytest.mark.parametrize(
    ("schedule", "v", "chunks"),
    [
        ("1f1b", 1, [[0, 1], [2, 3], [4, 5], [6, 7]]),
        ("interleaved_1f1b", 2, [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("zbv", 2, [[0, 7], [1, 6], [2, 5], [3, 4]]),
    ],
)
def test_placement_is_torchs(schedule, v, chunks):
    """8 layers on pp4: stage s holds layers of the split; rank r the stages torch places on it."""
    place = Placement(schedule, 4, v)
    layers_per_stage = 8 // place.stages
    for rank, stages in enumerate(chunks):
        got = place.chunks(8, rank)
        if v == 1:
            assert [list(c) for c in got] == [stages]
            continue
        assert [c.start // layers_per_stage for c in got] == stages
    if schedule == "zbv":
        assert S.generate_rank_to_stage_mapping(4, 8, style="v") == {r: c for r, c in enumerate(chunks)}


def test_microbatch_rules_are_torchs():
    """Each rule refuses exactly what the schedule's constructor refuses."""
    for schedule, pp, v in (("1f1b", 4, 1), ("interleaved_1f1b", 4, 2), ("interleaved_zero_bubble", 4, 2)):
        for m in range(1, 13):
            try:
                torch_order(schedule, pp, v, m)
                torch_ok = not (schedule == "1f1b" and m < pp)  # Schedule1F1B checks in __init__
            except ValueError:
                torch_ok = False
            assert (microbatch_problem(schedule, pp, m) is None) == torch_ok, (schedule, m)
    for m in range(1, 10):
        stages = [_Stage(i, 8, 4, 0) for i in stage_ids("dualpipev", 4, 2, 0)]
        try:
            S.ScheduleDualPipeV(stages, m, loss_fn=lambda out, target: out)
            torch_ok = True
        except ValueError:
            torch_ok = False
        assert (microbatch_problem("dualpipev", 4, m) is None) == torch_ok, m


def test_with_fewer_micro_batches_than_ranks_a_rank_holds_at_most_all_of_them():
    """A step of m micro-batches never holds more than m, however deep the schedule's warm-up."""
    for schedule, pp, v, m in (("interleaved_1f1b", 4, 2, 2), ("interleaved_1f1b", 4, 2, 3), ("gpipe", 4, 1, 2)):
        _, peak = simulate(torch_order(schedule, pp, v, m), pp, v, m)
        assert peak <= in_flight_stages(schedule, pp, v, m) <= m, (schedule, pp, v, m)


def test_uneven_layers_go_to_the_earlier_stages():
    assert [list(r) for r in stage_layers(10, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


def test_a_schedules_own_stages_per_rank_is_no_problem():
    assert stages_problem("1f1b", 1) is None and stages_problem("zbv", 2) is None
    assert stages_problem("1f1b", 2) is not None and stages_problem("zbv", 3) is not None
