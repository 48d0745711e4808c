"""Run and sweep directories, read as untrusted files: a run directory holds summary.json and
metrics.jsonl (``python train.py``); a sweep directory (``-m``) holds one run directory per job.

Every read is bounded before it is parsed (``moemesh.untrusted``): a summary of at most
``MAX_SUMMARY_BYTES``, a metrics.jsonl of at most ``MAX_METRICS_BYTES`` read line by line, each
line at most ``MAX_LINE_BYTES``; regular files only. A line cut short (a killed run's last) is
skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moemesh.runs.steady import steady, summarize_records
from moemesh.untrusted import bounded_size, read_json_object

MAX_SUMMARY_BYTES = 16 << 20
MAX_METRICS_BYTES = 1 << 30  # about 50k steps of a 16-layer, 64-expert model's records
MAX_LINE_BYTES = 4 << 20


class RunReadError(ValueError):
    """A run directory that cannot be read: one line naming the file and why."""


def read_json(path: Path, cap: int = MAX_SUMMARY_BYTES) -> dict:
    """A JSON object from a regular file of at most ``cap`` bytes; RunReadError otherwise."""
    return read_json_object(Path(path), cap, error=RunReadError)


def read_summary(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / "summary.json")


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, in order ([] without the file)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    bounded_size(path, MAX_METRICS_BYTES, error=RunReadError)
    records = []
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(line) > MAX_LINE_BYTES:
                raise RunReadError(f"{path}: line {n} is longer than {MAX_LINE_BYTES:,} bytes")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short when a run was killed
            if isinstance(record, dict):
                records.append(record)
    return records


@dataclass
class Run:
    """One run directory: its summary (``{}`` when the job did not finish) and its records."""

    dir: Path
    summary: dict
    records: list[dict]
    label: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def steady(self) -> list[dict]:
        """The records the medians are taken over (``runs.steady``)."""
        return steady(self.records, start_step=self.summary.get("start_step", 0) or 0)

    def medians(self) -> dict[str, Any]:
        """summary.json's medians (``time_breakdown``, ``a2a_share``, ...), recomputed from
        metrics.jsonl by the same rule ({} without a timed record)."""
        return summarize_records(self.steady, warmup=0)


def load_run(run_dir: Path, *, require_summary: bool = True) -> Run:
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if require_summary or (run_dir / "summary.json").exists() else {}
    return Run(run_dir, summary, read_records(run_dir))


def _job_order(d: Path):
    head = d.name.split("_")[0]
    return (0, int(head), d.name) if head.isdigit() else (1, 0, d.name)


def expand(paths: list[Path]) -> list[Path]:
    """Run directories named by ``paths``: a run directory (it holds summary.json) itself, a sweep
    directory its subdirectories that hold one, in job order; ValueError naming the first path
    that holds none."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ValueError(f"{p}: no such directory")
        found = (
            [p]
            if (p / "summary.json").is_file()
            else sorted((d for d in p.iterdir() if (d / "summary.json").is_file()), key=_job_order)
        )
        if not found:
            raise ValueError(f"{p}: no summary.json in it or in its direct subdirectories")
        runs += found
    return runs
