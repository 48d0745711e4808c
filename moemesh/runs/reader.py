"""Run and sweep directories, read as untrusted files: a run directory holds summary.json and
metrics.jsonl (``python train.py``); a sweep directory (``-m``) holds one run directory per job.

Every read is bounded before it is parsed (``moemesh.untrusted``): a summary of at most
``MAX_SUMMARY_BYTES``, a metrics.jsonl of at most ``MAX_METRICS_BYTES`` read line by line, each
line at most ``MAX_LINE_BYTES``; regular files only. A line that is not a JSON object (a killed
run's last, cut short) is skipped and counted. What is read is then held to the contract's types
(``runs.records``, ``conform``): a value of the wrong type (a string where a number belongs, a
NaN) is dropped, as if the run had not recorded it, so no reader meets it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moemesh.runs.records import RunSummary, StepRecord
from moemesh.runs.steady import steady, summarize_records
from moemesh.untrusted import bounded_size, read_bounded, read_json_object, yaml_without_aliases

MAX_SUMMARY_BYTES = 16 << 20
MAX_METRICS_BYTES = 1 << 30  # about 50k steps of a 16-layer, 64-expert model's records
MAX_LINE_BYTES = 4 << 20


class RunReadError(ValueError):
    """A run directory that cannot be read: one line naming the file and why."""


def read_json(path: Path, cap: int = MAX_SUMMARY_BYTES) -> dict:
    """A JSON object from a regular file of at most ``cap`` bytes; RunReadError otherwise."""
    return read_json_object(Path(path), cap, error=RunReadError)


_MISSING = object()


def conform(value: Any, kind: Any) -> Any:
    """``value`` held to the type ``kind`` (an annotation of ``runs.records``): a number must be
    a finite int or float (not a bool), a string a str, a TypedDict a dict whose known keys are
    conformed and whose unknown keys are kept; a list or dict of a type has its wrong elements
    dropped. Returns ``_MISSING`` for a value that cannot be one of ``kind``."""
    origin, args, typed = _shape(kind)
    if origin in (typing.Union, types.UnionType):
        return _conform_union(value, args)
    if typed:
        return _conform_typeddict(value, kind)
    if kind in (int, float):
        return value if _number(value, kind) else _MISSING
    if kind in (str, bool):
        return value if isinstance(value, kind) else _MISSING
    if origin is list:  # all or nothing: a list with one element dropped would shift the others
        if not isinstance(value, list):
            return _MISSING
        item = args[0]
        if item in (int, float):  # a record's per-expert lists: most of what it holds
            return value if all(_number(x, item) for x in value) else _MISSING
        kept = [conform(x, item) for x in value]
        return _MISSING if any(v is _MISSING for v in kept) else kept
    if origin is dict:
        if not isinstance(value, dict):
            return _MISSING
        return {k: v for k, x in value.items() if isinstance(k, str) and (v := conform(x, args[1])) is not _MISSING}
    if kind is dict:
        return value if isinstance(value, dict) else _MISSING
    return value


@functools.cache
def _shape(kind) -> tuple[Any, tuple, bool]:
    """What ``conform`` asks of an annotation, once per annotation (a long run's records ask it
    hundreds of times a line)."""
    return typing.get_origin(kind), typing.get_args(kind), typing.is_typeddict(kind)


def _number(value: Any, kind: type) -> bool:
    """A finite int or float (not a bool); for ``int``, one whose value is whole."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:  # an int of 400 digits is no float: OverflowError
        return math.isfinite(value) and (kind is float or float(value).is_integer())
    except OverflowError:
        return False


def _conform_union(value: Any, options: tuple) -> Any:
    if value is None:
        return None if type(None) in options else _MISSING
    for option in options:
        if option is not type(None) and (kept := conform(value, option)) is not _MISSING:
            return kept
    return _MISSING


def _conform_typeddict(value: Any, kind: Any) -> Any:
    if not isinstance(value, dict):
        return _MISSING
    hints = _hints(kind)
    out = {}
    for k, x in value.items():
        v = conform(x, hints[k]) if k in hints else x
        if v is not _MISSING:
            out[k] = v
    return out


@functools.cache
def _hints(kind) -> dict:
    return typing.get_type_hints(kind)


def read_summary(run_dir: Path) -> dict:
    """summary.json, held to ``RunSummary``'s types."""
    return conform(read_json(Path(run_dir) / "summary.json"), RunSummary)


def read_records(run_dir: Path, skipped: list[int] | None = None) -> list[dict]:
    """metrics.jsonl's records, in order, each held to ``StepRecord``'s types ([] without the
    file). The numbers of lines that are not a JSON object are appended to ``skipped``. Only the
    last record with per-layer load statistics keeps them (what is read of them: the final load),
    so what a long run holds in memory is its scalars, not a list per expert and layer a step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    bounded_size(path, MAX_METRICS_BYTES, error=RunReadError)
    records: list[dict] = []
    with_load: dict | None = None
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(line) > MAX_LINE_BYTES:
                raise RunReadError(f"{path}: line {n} is longer than {MAX_LINE_BYTES:,} bytes")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: [[[[... nested deep
                record = None  # a line cut short when a run was killed, or not JSON at all
            if isinstance(record, dict):
                kept = _known_or_scalar(conform(record, StepRecord))
                if kept.get("load"):
                    if with_load is not None:
                        del with_load["load"]
                    with_load = kept
                records.append(kept)
            elif skipped is not None:
                skipped.append(n)
    return records


def _known_or_scalar(record: dict) -> dict:
    """A record's known keys, and its unknown ones whose value is a plain scalar (a newer
    trainer's number): an unknown list or object is dropped, so what a long metrics.jsonl keeps
    in memory follows StepRecord, not whatever a line holds ([[],[],...] costs 20x its bytes)."""
    known = _hints(StepRecord)
    return {k: v for k, v in record.items() if k in known or v is None or isinstance(v, (str, int, float, bool))}


MAX_OVERRIDES_BYTES = 1 << 20


@dataclass
class Run:
    """One run directory: its summary (``{}`` when the job did not finish) and its records."""

    dir: Path
    summary: dict
    records: list[dict]
    label: str = ""
    stats: dict = field(default_factory=dict)
    skipped_lines: list[int] = field(default_factory=list)  # metrics.jsonl lines that were not records

    @property
    def steady(self) -> list[dict]:
        """The records the medians are taken over (``runs.steady``)."""
        return steady(self.records, start_step=self.summary.get("start_step", 0) or 0)

    def medians(self) -> dict[str, Any]:
        """summary.json's medians (``time_breakdown``, ``a2a_share``, ...), recomputed from
        metrics.jsonl by the same rule ({} without a timed record)."""
        return summarize_records(self.steady, warmup=0)

    def overrides(self) -> list[str]:
        """The command-line overrides the run was started with (Hydra's .hydra/overrides.yaml,
        at most MAX_OVERRIDES_BYTES); [] where it has none or they cannot be read."""
        import yaml

        try:
            data = yaml_without_aliases(read_bounded(self.dir / ".hydra" / "overrides.yaml", MAX_OVERRIDES_BYTES))
        except (ValueError, OSError, RecursionError, yaml.YAMLError):
            return []
        return [x for x in data if isinstance(x, str)] if isinstance(data, list) else []


def load_run(run_dir: Path, *, require_summary: bool = True) -> Run:
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if require_summary or (run_dir / "summary.json").exists() else {}
    skipped: list[int] = []
    records = read_records(run_dir, skipped)
    return Run(run_dir, summary, records, skipped_lines=skipped)


def _job_order(d: Path):
    head = d.name.split("_")[0]
    return (0, int(head), d.name) if head.isascii() and head.isdigit() else (1, 0, d.name)


def _is_job(d: Path) -> bool:
    """A directory a run wrote into: Hydra's .hydra/, train.log or metrics.jsonl."""
    return any((d / name).exists() for name in (".hydra", "train.log", "metrics.jsonl"))


MAX_MULTIRUN_BYTES = 4 << 20


def _values(value: str) -> int | None:
    """How many values a basic sweep override's value gives: 1 for a plain value, N for N
    top-level comma-separated ones, len(range(...)) and choice's arguments; None for what this
    reader does not take apart (glob, interval, quoting it cannot close)."""
    value = value.strip()
    m = re.fullmatch(r"range\(\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?(?:,\s*(-?\d+)\s*)?\)", value)
    if m:
        a, b, step = m.groups()
        bounds = (int(a), int(b)) if b is not None else (0, int(a))
        return len(range(*bounds, int(step) if step else 1)) if step != "0" else None
    m = re.fullmatch(r"choice\((.*)\)", value, re.DOTALL)
    if m:
        value = m.group(1)
    elif re.match(r"\w+\(", value):
        return None
    depth, quote, count = 0, "", 1
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            count += 1
    return None if quote or depth else count


def jobs_never_started(sweep: Path) -> tuple[int, list[int]] | None:
    """(jobs a basic sweep was to run, the numbers of those that left no directory), from its
    multirun.yaml (read bounded, as untrusted): a sweep stopped by a signal never starts its later
    jobs, and a SLURM sweep's queued ones have none yet. None where it cannot be told (no
    multirun.yaml, another sweeper, job directories not named by number, a value it cannot count)."""
    import yaml

    try:
        cfg = yaml_without_aliases(read_bounded(sweep / "multirun.yaml", MAX_MULTIRUN_BYTES))
        hydra = cfg["hydra"]
        if not str(hydra["sweeper"]["_target_"]).endswith(".BasicSweeper"):
            return None
        if not str(hydra["sweep"]["subdir"]).startswith("${hydra.job.num}"):
            return None  # job directories not named by their number first: nothing to match
        task = hydra["overrides"]["task"]
    except (ValueError, OSError, RecursionError, yaml.YAMLError, KeyError, TypeError):
        return None
    total = 1
    for override in task if isinstance(task, list) else []:
        if not isinstance(override, str) or "=" not in override:
            continue
        n = _values(override.split("=", 1)[1])
        if n is None:
            return None
        total *= n
    if total > 1 << 20:
        return None
    heads = (d.name.split("_")[0] for d in sweep.iterdir() if d.is_dir())
    seen = {int(h) for h in heads if h.isascii() and h.isdigit()}  # "²".isdigit(), and int() refuses it
    return total, [i for i in range(total) if i not in seen]


def expand(paths: list[Path], unfinished: list[Path] | None = None) -> list[Path]:
    """Run directories named by ``paths``: a run directory (it holds summary.json) itself, a sweep
    directory its subdirectories that hold one, in job order; ValueError naming the first path
    that holds none. A sweep's job directories without a summary.json (a job that failed, or
    has not finished) are appended to ``unfinished``."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ValueError(f"{p}: no such directory")
        if (p / "summary.json").is_file():
            runs.append(p)
            continue
        subdirs = sorted((d for d in p.iterdir() if d.is_dir()), key=_job_order)
        found = [d for d in subdirs if (d / "summary.json").is_file()]
        left = [d for d in subdirs if d not in found and _is_job(d)]
        if not found:
            jobs = f" ({len(left)} job directories without one: failed or unfinished)" if left else ""
            raise ValueError(f"{p}: no summary.json in it or in its direct subdirectories{jobs}")
        if unfinished is not None:
            unfinished += left
        runs += found
    return runs
