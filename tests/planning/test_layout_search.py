"""The layout search's choice of candidates and its reading of runs: pure, torch-free, table-driven."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from moemesh.errors import ConfigError
from moemesh.parallel.dims import ParallelDims
from moemesh.planning import search

ROOT = Path(__file__).resolve().parents[2]


def _plan(name: str, step_s: float, fits: bool = True, total: int = 1):
    degrees = {"dp": 1, "ep": 1, "tp": 1, "pp": 1}
    if name != "single":
        for part in name.split("_"):
            degrees[part[:2]] = int(part[2:])
    return SimpleNamespace(dims=ParallelDims(**degrees), step_s=step_s, fits=fits, total_bytes=total)


# The planner's ranked list (fitting first, by step time), as make_plan returns it.
PLANS = [
    _plan("pp4", 1.0),
    _plan("pp2_dp2", 1.1),
    _plan("dp4", 1.2),
    _plan("pp2_ep2", 1.3),
    _plan("ep2_dp2", 1.4),
    _plan("tp2_dp2", 1.5),
    _plan("ep4", 1.6),
    _plan("tp2_ep2", 1.7),
    _plan("tp4", 9.0, fits=False),
]


@pytest.mark.parametrize(
    ("top", "include", "exclude", "chosen"),
    [
        (3, (), (), ["pp4", "pp2_dp2", "dp4"]),
        (0, (), (), ["pp4", "pp2_dp2", "dp4", "pp2_ep2", "ep2_dp2", "tp2_dp2", "ep4", "tp2_ep2"]),
        (0, ("ep>=2",), (), ["pp2_ep2", "ep2_dp2", "ep4", "tp2_ep2"]),
        (2, ("ep>=2",), (), ["pp2_ep2", "ep2_dp2"]),
        (0, ("ep>=2&pp==1",), (), ["ep2_dp2", "ep4", "tp2_ep2"]),
        (0, ("ep>=2", "dp4"), (), ["dp4", "pp2_ep2", "ep2_dp2", "ep4", "tp2_ep2"]),
        (0, (), ("pp>1", "tp!=1"), ["dp4", "ep2_dp2", "ep4"]),
        (2, (), ("pp>=2",), ["dp4", "ep2_dp2"]),
        (0, ("ep=4",), (), ["ep4"]),
        (0, ("ep4", "tp4"), (), ["ep4"]),  # tp4 does not fit: never chosen
        (0, ("dp>4",), (), []),
    ],
)
def test_choose(top, include, exclude, chosen):
    s = search.settings(top=top, include=list(include), exclude=list(exclude))
    choice = search.choose(PLANS, s)
    assert [c.name for c in choice.chosen] == chosen
    assert choice.not_fitting == ["tp4"]
    # Everything fitting is accounted for exactly once: chosen, filtered or cut.
    fitting = [search.layout_name(p.dims) for p in PLANS if p.fits]
    assert sorted(chosen + choice.filtered + choice.cut) == sorted(fitting)


def test_choose_keeps_the_planners_rank():
    choice = search.choose(PLANS, search.settings(top=0, include=["ep>=2"]))
    assert [(c.name, c.planner_rank, c.predicted_step_s) for c in choice.chosen][:2] == [
        ("pp2_ep2", 4, 1.3),
        ("ep2_dp2", 5, 1.4),
    ]


@pytest.mark.parametrize(
    ("text", "name", "constraints"),
    [
        ("ep2_dp2", "ep2_dp2", ()),
        ("single", "single", ()),
        ("pp2_tp2_ep2_dp2", "pp2_tp2_ep2_dp2", ()),
        ("ep>=2", None, (("ep", ">=", 2),)),
        (" tp == 1 & pp<2 ", None, (("tp", "==", 1), ("pp", "<", 2))),
        ("dp=2", None, (("dp", "==", 2),)),
    ],
)
def test_parse_selector(text, name, constraints):
    s = search.parse_selector(text)
    assert (s.name, s.constraints) == (name, constraints)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top": -1}, "hydra.sweeper.top=-1: expected a count >= 0"),
        ({"top": "3"}, "hydra.sweeper.top=3: expected a count"),
        ({"objective": "mfu"}, "hydra.sweeper.objective=mfu: expected one of tokens_per_s, step_s, peak_memory"),
        ({"warmup_steps": -2}, "hydra.sweeper.warmup_steps=-2"),
        ({"warmup_steps": 5, "steps": 5}, "leaves no timed step of trainer.steps=5"),
        ({"include": ["xp>=2"]}, "hydra.sweeper.include: 'xp>=2': no axis 'xp'"),
        ({"exclude": ["ep=>2"]}, "hydra.sweeper.exclude: 'ep=>2' is neither a layout name"),
        ({"include": ["ep2dp2"]}, "is neither a layout name"),
        ({"include": ["dp2_ep2"]}, "is neither a layout name"),  # the presets name ep before dp
    ],
)
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        search.settings(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_names_are_found():
    s = search.settings(include=["ep8", "ep4"], exclude=["pp8"])
    assert search.unknown_names(PLANS, s) == ["ep8", "pp8"]


def _job(tmp_path: Path, name: str, steps: list[tuple[float, float, float]], **summary) -> Path:
    """A job directory: metrics.jsonl with (step_s, tokens_per_s, a2a_s) per step, and summary.json."""
    d = tmp_path / name
    d.mkdir()
    lines = [
        {"step": i, "step_s": s, "tokens_per_s": t, "time": {"step": s, "a2a": a, "forward": s / 2}}
        for i, (s, t, a) in enumerate(steps, 1)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    base = {"final_loss": 2.5, "peak_memory_bytes": {"min": 1, "max": 3 * 2**20}, "steps": len(steps)}
    (d / "summary.json").write_text(json.dumps({**base, **summary}))
    return d


def test_measure_skips_warmup(tmp_path):
    d = _job(tmp_path, "0_ep4", [(9.0, 10.0, 9.0), (1.0, 100.0, 0.5), (2.0, 50.0, 0.5), (3.0, 30.0, 0.3)])
    m = search.measure(d, warmup_steps=1)
    assert (m.step_s, m.tokens_per_s, m.timed_steps) == (2.0, 50.0, 3)
    assert m.a2a_share == pytest.approx(0.25)  # median of 0.5, 0.25, 0.1
    assert m.phases["forward"] == 1.0
    assert (m.peak_memory_bytes, m.final_loss, m.ok) == (3 * 2**20, 2.5, True)


def test_measure_failed_and_finished(tmp_path):
    (tmp_path / "1_dp4").mkdir()
    m = search.measure(tmp_path / "1_dp4", 2)
    assert not m.ok and "no summary.json" in m.error
    assert not search.finished(tmp_path / "1_dp4")
    d = _job(tmp_path, "0_ep4", [(1.0, 1.0, 0.0)] * 3)
    assert search.finished(d, steps=3) and not search.finished(d, steps=4)
    assert "no step after the 3 warm-up steps" in search.measure(d, 3).error
    stopped = _job(tmp_path, "2_ep4", [(1.0, 1.0, 0.0)] * 3, stopped_by_signal=["SIGTERM"])
    assert not search.finished(stopped, steps=3)
    assert search.stopped_by(stopped) == ["SIGTERM"] and search.stopped_by(d) is None
    # summary.json is untrusted: a count written as text ("steps": "10") was int + str, a TypeError
    import json

    s = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**s, "steps": "10", "stopped_by_signal": "SIGTERM"}))
    assert not search.finished(d, steps=3) and search.stopped_by(d) is None


@pytest.mark.parametrize(
    ("objective", "measured_ranks", "predicted_ranks"),
    [
        ("tokens_per_s", [2, None, 1, 3], [1, None, 2, 3]),
        ("step_s", [2, None, 1, 3], [1, None, 2, 3]),
        ("peak_memory", [1, None, 3, 1], [3, None, 2, 1]),
    ],
)
def test_rank_rows(objective, measured_ranks, predicted_ranks):
    cands = [
        search.Candidate(ParallelDims(dp=4), 1.0, 30, 1),
        search.Candidate(ParallelDims(ep=4), 1.5, 20, 2),
        search.Candidate(ParallelDims(ep=2, dp=2), 2.0, 20, 3),
        search.Candidate(ParallelDims(pp=4), 3.0, 10, 4),
    ]
    measured = [
        search.Measured(step_s=0.5, tokens_per_s=200.0, peak_memory_bytes=5),
        search.Measured(error="crashed"),
        search.Measured(step_s=0.4, tokens_per_s=250.0, peak_memory_bytes=9),
        search.Measured(step_s=0.9, tokens_per_s=110.0, peak_memory_bytes=5),
    ]
    rows = search.rank_rows(cands, measured, objective)
    assert [r.measured_rank for r in rows] == measured_ranks
    assert [r.predicted_rank for r in rows] == predicted_ranks
    md = search.table(rows)
    assert "| ep4 | 1.5 | - | - |" in md and "crashed |" in md


def test_planning_is_torch_free():
    """The planner, the search and the calibration import with torch unimportable (a laptop plans)."""
    code = "import sys; sys.modules['torch'] = None; "
    code += "import moemesh.planning.cost, moemesh.planning.search, moemesh.planning.calibration; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_resumed_job_is_finished_by_its_last_step(tmp_path):
    d = _job(tmp_path, "0_ep4", [(1.0, 1.0, 0.0)] * 2, start_step=2)  # steps 3 and 4 of a resumed run
    assert search.finished(d, steps=4) and not search.finished(d, steps=5)


@pytest.mark.parametrize(("objective", "best"), [("tokens_per_s", "ep2_dp2"), ("peak_memory", "dp4")])
def test_the_winner_has_the_best_measured_rank(objective, best):
    """Ties (peak_memory: dp4 and pp4) go to the earlier job."""
    cands = [search.Candidate(ParallelDims(dp=4), 1.0, 30, 1), search.Candidate(ParallelDims(ep=2, dp=2), 2.0, 20, 2)]
    cands.append(search.Candidate(ParallelDims(pp=4), 3.0, 10, 3))
    measured = [
        search.Measured(step_s=0.5, tokens_per_s=200.0, peak_memory_bytes=5),
        search.Measured(step_s=0.4, tokens_per_s=250.0, peak_memory_bytes=9),
        search.Measured(step_s=0.9, tokens_per_s=110.0, peak_memory_bytes=5),
    ]
    assert search.winner(search.rank_rows(cands, measured, objective)).candidate.name == best
