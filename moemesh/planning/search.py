"""The layout search behind ``python train.py -m hydra/sweeper=layouts``: which splits a sweep
runs, and how their measurements are read, ranked and tabled. Torch-free (Hydra glue lives in
``hydra_plugins/moemesh_layouts``; the constants fitted to the measurements in ``calibration.py``).

Choice of candidates (``choose``), from the planner's ranking (``cost.make_plan``):

1. every valid split of ``cluster.gpus``, ranked by predicted step time (fitting ones first);
2. drop the splits that do not fit ``cluster.gpu_memory_gb``;
3. ``include``: keep only the splits that match at least one selector; ``exclude``: drop every
   split that matches one. A selector is a layout name in the presets' naming (``ep2_dp2``,
   ``single``) or one or more axis constraints joined by ``&`` (``ep>=2``, ``tp==1&pp==1``;
   axes dp ep tp pp; operators == != >= <= > <), all of which must hold;
4. keep the first ``top`` (0: all).

With ``schedules`` (pipeline schedules, ``hydra.sweeper.schedules``) each split with pp > 1 is a
candidate once per schedule, ranked among the others by its own predicted step time (its bubble
and messages, ``planning/schedules.py``); ``top`` counts these candidates.

Reading a run (``measure``): the medians over its steady steps by the one rule of
``moemesh.runs.steady`` (the logged steps after the first ``warmup_steps``, default
``WARMUP_RECORDS``: step time, tokens/s, All-to-All share of the step and each phase), peak
memory and final loss from summary.json. A job directory without summary.json is a failed job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.errors import ConfigError
from moemesh.fields import PipelineSchedule, choice_error
from moemesh.parallel.dims import ParallelDims, layout_name
from moemesh.parallel.pipeline import SCHEDULES
from moemesh.runs.reader import RunReadError, load_run, read_summary
from moemesh.runs.steady import WARMUP_RECORDS, median, steady

AXES = ("dp", "ep", "tp", "pp")
OBJECTIVES = ("tokens_per_s", "step_s", "peak_memory")
_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
_CONSTRAINT = re.compile(r"^\s*([a-z]+)\s*(==|!=|>=|<=|>|<|=)\s*(-?\d+)\s*$")
_PART = re.compile(r"^(pp|tp|ep|dp)([1-9]\d*)$")


@dataclass(frozen=True)
class Selector:
    """A layout name, or a conjunction of axis constraints (axis, operator, value)."""

    text: str
    name: str | None = None
    constraints: tuple[tuple[str, str, int], ...] = ()

    def matches(self, dims: ParallelDims) -> bool:
        if self.name is not None:
            return layout_name(dims) == self.name
        return all(_OPS[op](getattr(dims, axis), value) for axis, op, value in self.constraints)


def _is_layout_name(text: str) -> bool:
    """Spelled as layout_name spells it: degrees above 1 in the order pp tp ep dp, or "single"."""
    if text == "single":
        return True
    parts = [_PART.match(p) for p in text.split("_")]
    if not all(parts):
        return False
    degrees = {m.group(1): int(m.group(2)) for m in parts if m}
    return len(degrees) == len(parts) and layout_name(ParallelDims(**degrees)) == text


def parse_selector(text: str, key: str = "hydra.sweeper.include") -> Selector:
    """``ep2_dp2`` / ``single`` or ``ep>=2`` / ``tp==1&pp==1``; ConfigError (one line) otherwise."""
    text = str(text).strip()
    if _is_layout_name(text):
        return Selector(text, name=text)
    constraints = []
    for part in text.split("&"):
        m = _CONSTRAINT.match(part)
        if not m:
            raise ConfigError(
                f"{key}: {text!r} is neither a layout name (e.g. ep2_dp2, single) nor an axis constraint "
                f"(e.g. 'ep>=2', 'tp==1&pp==1'; axes {', '.join(AXES)}; operators {' '.join(_OPS)})"
            )
        axis, op, value = m.groups()
        if axis not in AXES:
            raise ConfigError(f"{key}: {text!r}: no axis {axis!r} (axes: {', '.join(AXES)})")
        constraints.append((axis, "==" if op == "=" else op, int(value)))
    return Selector(text, constraints=tuple(constraints))


@dataclass(frozen=True)
class SearchSettings:
    """``hydra.sweeper.*``, checked (``settings``)."""

    top: int = 6
    include: tuple[Selector, ...] = ()
    exclude: tuple[Selector, ...] = ()
    warmup_steps: int = WARMUP_RECORDS
    objective: str = "tokens_per_s"
    schedules: tuple[str, ...] = ()  # pipeline schedules to try on each split with pp > 1


def settings(
    *,
    top=6,
    include=(),
    exclude=(),
    warmup_steps=WARMUP_RECORDS,
    objective="tokens_per_s",
    schedules=(),
    steps: int | None = None,
) -> SearchSettings:
    """The sweeper's keys as given, checked: ConfigError (one line) on the first bad one.
    ``steps``: trainer.steps of the jobs (warm-up must leave steps to time)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"hydra.sweeper.top={top}: expected a count >= 0 (0: every fitting split)")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"hydra.sweeper.warmup_steps={warmup_steps}: expected a count >= 0")
    if steps is not None and warmup_steps >= steps:
        raise ConfigError(
            f"hydra.sweeper.warmup_steps={warmup_steps} leaves no timed step of trainer.steps={steps}: "
            f"set trainer.steps above {warmup_steps} or fewer warm-up steps"
        )
    if objective not in OBJECTIVES:
        raise ConfigError(f"hydra.sweeper.objective={objective}: expected one of {', '.join(OBJECTIVES)}")
    as_list = {"include": include, "exclude": exclude}
    parsed = {}
    for key, value in as_list.items():
        items = [value] if isinstance(value, str) else list(value or ())
        parsed[key] = tuple(parse_selector(v, f"hydra.sweeper.{key}") for v in items)
    return SearchSettings(top, parsed["include"], parsed["exclude"], warmup_steps, objective, _schedules(schedules))


def _schedules(value) -> tuple[str, ...]:
    """``hydra.sweeper.schedules`` checked: each one of torch's pipeline schedules, once."""
    items = [value] if isinstance(value, str) else list(value or ())
    for item in items:
        if item not in SCHEDULES:
            raise ConfigError(choice_error("hydra.sweeper.schedules", item, PipelineSchedule))
    if len(set(items)) != len(items):
        raise ConfigError(f"hydra.sweeper.schedules={items}: a schedule is listed twice")
    return tuple(str(i) for i in items)


@dataclass
class Candidate:
    dims: ParallelDims
    predicted_step_s: float
    predicted_bytes: int  # the planner's per-GPU total (what `fits` compares)
    planner_rank: int  # 1-based among the fitting valid splits, as plan.py prints them
    schedule: str | None = None  # the pipeline schedule, when the sweep tries several

    @property
    def name(self) -> str:
        return layout_name(self.dims)

    @property
    def label(self) -> str:
        """The layout, and its schedule when the sweep tries several: ``pp4 zbv``."""
        return self.name if self.schedule is None else f"{self.name} {self.schedule}"


@dataclass
class Choice:
    chosen: list[Candidate]
    not_fitting: list[str] = field(default_factory=list)  # names of valid splits dropped for memory
    filtered: list[str] = field(default_factory=list)  # names dropped by include / exclude
    cut: list[str] = field(default_factory=list)  # names beyond `top`


def choose(valid, search: SearchSettings) -> Choice:
    """The splits a sweep runs, from ``cost.make_plan``'s ranked valid plans (objects with
    ``dims``, ``fits``, ``step_s``, ``total_bytes``), in the planner's order."""
    fitting = [p for p in valid if p.fits]
    choice = Choice([], not_fitting=[layout_name(p.dims) for p in valid if not p.fits])
    kept = []
    for rank, p in enumerate(fitting, 1):
        wanted = not search.include or any(s.matches(p.dims) for s in search.include)
        if wanted and not any(s.matches(p.dims) for s in search.exclude):
            kept.append(
                Candidate(
                    p.dims, p.step_s, p.total_bytes, rank, getattr(p, "schedule", None) if search.schedules else None
                )
            )
        else:
            choice.filtered.append(layout_name(p.dims))
    cut = len(kept) if search.top == 0 else search.top
    choice.chosen, rest = kept[:cut], kept[cut:]
    choice.cut = [c.label for c in rest]
    return choice


def unknown_names(valid, search: SearchSettings) -> list[str]:
    """Selectors naming a layout that is no valid split here (likely a typo or the wrong size)."""
    names = {layout_name(p.dims) for p in valid}
    return [s.text for s in (*search.include, *search.exclude) if s.name is not None and s.name not in names]


# ---- reading the runs --------------------------------------------------------------------


@dataclass
class Measured:
    """One job's outcome: the numbers, or why there are none."""

    step_s: float | None = None
    tokens_per_s: float | None = None
    a2a_share: float | None = None
    peak_memory_bytes: int | None = None
    final_loss: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # median time.<key> over the timed steps
    timed_steps: int = 0
    error: str | None = None  # a failed job's one-line reason

    @property
    def ok(self) -> bool:
        return self.error is None


def finished(job_dir: Path, steps: int | None = None) -> bool:
    """A job that need not run again: summary.json exists, it was not stopped early and (when
    ``steps`` is given) it reached that step."""
    try:
        s = read_summary(job_dir)  # held to RunSummary's types: "steps": "10" is not a number
    except RunReadError:
        return False
    if s.get("stopped_by_signal"):
        return False
    return steps is None or s.get("start_step", 0) + s.get("steps", 0) >= steps


def stopped_by(job_dir: Path, since: float = 0.0) -> list[str] | None:
    """The signals that stopped the job (its summary.json's ``stopped_by_signal``), for a summary
    written after ``since`` (a time.time()); None when it was not stopped or wrote none since."""
    path = job_dir / "summary.json"
    try:
        if path.stat().st_mtime < since:
            return None
        return read_summary(job_dir).get("stopped_by_signal") or None  # a list of names, as conformed
    except (OSError, RunReadError):
        return None


def measure(job_dir: Path, warmup_steps: int = WARMUP_RECORDS) -> Measured:
    """The job's medians over its steady steps (``moemesh.runs.steady``: the logged steps after the
    first ``warmup_steps``), peak memory and final loss (see the module doc)."""
    try:
        run = load_run(job_dir)
    except RunReadError as err:
        missing = not (job_dir / "summary.json").exists()
        return Measured(error="no summary.json (the job did not finish)" if missing else str(err))
    timed = steady(run.records, start_step=run.summary.get("start_step", 0) or 0, warmup=0)[warmup_steps:]
    if not timed:
        return Measured(error=f"no step after the {warmup_steps} warm-up steps was logged")
    phase_keys = sorted({k for r in timed for k in r.get("time", {})})
    phases = {k: median(r["time"].get(k) for r in timed) for k in phase_keys}
    shares = [r["time"]["a2a"] / r["time"]["step"] for r in timed if r.get("time", {}).get("step")]
    peak = (run.summary.get("peak_memory_bytes") or {}).get("max")
    return Measured(
        step_s=median(r.get("step_s") for r in timed),
        tokens_per_s=median(r.get("tokens_per_s") for r in timed),
        a2a_share=median(shares),
        peak_memory_bytes=peak,
        final_loss=run.summary.get("final_loss"),
        phases={k: v for k, v in phases.items() if v is not None},
        timed_steps=len(timed),
    )


# ---- ranking and the table -----------------------------------------------------------------


def _objective_value(m: Measured, objective: str):
    """Lower is better."""
    if objective == "tokens_per_s":
        return None if m.tokens_per_s is None else -m.tokens_per_s
    if objective == "step_s":
        return m.step_s
    return m.peak_memory_bytes


def ranks(values: list) -> list[int | None]:
    """1-based ranks of ``values`` (lower is better; ties share the lower rank); None stays None."""
    order = sorted(v for v in values if v is not None)
    return [None if v is None else order.index(v) + 1 for v in values]


@dataclass
class Row:
    candidate: Candidate
    measured: Measured
    measured_rank: int | None = None
    predicted_rank: int | None = None


def rank_rows(candidates: list[Candidate], measured: list[Measured], objective: str) -> list[Row]:
    """Rows in the sweep's order, with the measured rank by ``objective`` and the predicted rank
    (step time, or per-GPU bytes for peak_memory) among the jobs that finished."""
    rows = [Row(c, m) for c, m in zip(candidates, measured, strict=True)]
    ok = [r for r in rows if r.measured.ok]
    for r, rank in zip(ok, ranks([_objective_value(r.measured, objective) for r in ok])):
        r.measured_rank = rank
    predicted = [
        r.candidate.predicted_bytes if objective == "peak_memory" else r.candidate.predicted_step_s for r in ok
    ]
    for r, rank in zip(ok, ranks(predicted)):
        r.predicted_rank = rank
    return rows


def winner(rows: list[Row]) -> Row | None:
    done = [(r.measured_rank, i, r) for i, r in enumerate(rows) if r.measured_rank is not None]
    return min(done)[2] if done else None


def _f(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale if scale != 1.0 else value, spec)


def table(rows: list[Row]) -> str:
    """The sweep's one table (markdown): a failed job is a row with its reason."""
    lines = [
        "| layout | predicted step s | measured step s | tokens/s | All-to-All % | peak memory MiB | final loss "
        "| measured rank | predicted rank | note |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        m = r.measured
        lines.append(
            f"| {r.candidate.label} | {r.candidate.predicted_step_s:.4g} | {_f(m.step_s, '.4f')} | "
            f"{_f(m.tokens_per_s, ',.0f')} | {_f(m.a2a_share, '.1f', 100)} | "
            f"{_f(m.peak_memory_bytes, ',.0f', 1 / 2**20)} | {_f(m.final_loss, '.4f')} | "
            f"{_f(r.measured_rank, 'd')} | {_f(r.predicted_rank, 'd')} | {m.error or ''} |"
        )
    return "\n".join(lines)
