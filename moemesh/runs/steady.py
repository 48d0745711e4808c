"""The one warm-up rule of moemesh, and the medians a run is summarised by.

A run's steady state is the logged steps of its last attempt (a resumed run's records after
``start_step``) after the first ``WARMUP_RECORDS`` of them, steps whose update was skipped left
out; where none is left, the warm-up records themselves. The trainer's summary.json
(``trainer.metrics``), ``scripts/compare.py``, the layout sweeper's table and the planner's
calibration all read medians through this module, so one run shows the same medians in every
tool. Torch-free.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

# The first logged step pays for lazy initialisation, the allocator's growth and (on a GPU)
# kernel compilation and autotuning.
WARMUP_RECORDS = 1


def steady(records: Sequence[Mapping[str, Any]], *, start_step: int = 0, warmup: int = WARMUP_RECORDS) -> list:
    """The records the medians are taken over: the last attempt's timed, not skipped records
    after the first ``warmup``; where none is left, those ``warmup`` records."""
    attempt = [r for r in records if r.get("step", 0) > start_step and "time" in r and not r.get("skipped")]
    return attempt[warmup:] or attempt


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class StepSample:
    """The numbers the summary's medians need, from a bounded, evenly spaced sample of the logged steps.

    A record is kilobytes (per-layer load statistics); a week of steps is millions. This keeps
    a handful of floats per kept step (one array per column), at most ``capacity`` steps: every
    logged step until it is full, then every 2nd, 4th, ... (each time it fills, every other kept
    step goes and the spacing doubles), so the sample always spans the whole run evenly.
    Medians are exact up to ``capacity`` logged steps. Every rank is fed the same (reduced)
    records in the same order, so every rank keeps the same sample and the same summary.
    """

    def __init__(self, capacity: int = 4096, warmup: int = WARMUP_RECORDS):
        if capacity < 2:
            raise ValueError(f"capacity={capacity} must be >= 2")
        self.capacity, self.warmup = capacity, warmup
        self.stride = 1  # steady record i (0: the one after warm-up) is kept iff i % stride == 0
        self.seen = 0  # logged records with timings (skipped steps not counted), warm-up included
        self.names: tuple[str, ...] = ()
        self.first: list[list[float]] = []  # the warm-up records: the medians' source only when alone
        self.columns: list[array] = []
        self.last: Mapping[str, Any] = {}  # the last record (its load statistics end the summary)

    def _values(self, r: Mapping[str, Any]) -> list[float]:
        t = r["time"]
        if not self.names:
            self.names = (
                *(f"time.{k}" for k in t),
                "a2a_share",
                "a2a_bytes_sent",
                "samples_per_s",
                "flops_per_s",
                "mfu",
            )
            self.columns = [array("d") for _ in self.names]
        a2a, step = _number(t.get("a2a")), _number(t.get("step"))
        return [
            *(_number(t.get(k[5:])) for k in self.names[:-5]),
            a2a / step if step else 0.0,  # NaN where either is missing (NaN is true)
            _number((r.get("a2a") or {}).get("bytes_sent")),
            _number(r.get("samples_per_s")),
            _number(r.get("flops_per_s")),
            _number(r.get("mfu")),
        ]

    def add(self, record: Mapping[str, Any]) -> None:
        self.last = record
        if "time" not in record or record.get("skipped"):
            return
        index, self.seen = self.seen, self.seen + 1
        values = self._values(record)  # the first call also names the columns
        if index < self.warmup:
            self.first.append(values)
            return
        steady = index - self.warmup
        if steady % self.stride:
            return
        if len(self.columns[0]) == self.capacity:  # full: keep every other step, twice the spacing
            self.columns = [column[::2] for column in self.columns]
            self.stride *= 2
            if steady % self.stride:
                return
        for column, value in zip(self.columns, values):
            column.append(value)

    def __len__(self) -> int:
        """Steps the medians are taken over."""
        return len(self.columns[0]) if self.columns and self.columns[0] else len(self.first)

    def medians(self) -> dict[str, float] | None:
        """Each column's median over the steps that recorded it (NaN where none did)."""
        if self.columns and self.columns[0]:
            return {name: _median_of_known(column) for name, column in zip(self.names, self.columns)}
        if not self.first:
            return None
        return {name: _median_of_known(values) for name, values in zip(self.names, zip(*self.first))}

    def summary(self) -> dict:
        """The summary's medians over the steady steps (``WARMUP_RECORDS``); None for a value no
        step recorded (an offline summary of records a reader dropped values of)."""
        med = self.medians()
        if med is None:
            return {}
        known = {name: None if math.isnan(v) else v for name, v in med.items()}
        return {
            "time_breakdown": {name[5:]: v for name, v in known.items() if name.startswith("time.") and v is not None},
            "a2a_share": known["a2a_share"],
            "a2a_bytes_sent_per_step": known["a2a_bytes_sent"],
            "median_samples_per_s": known["samples_per_s"],
            "median_flops_per_s": known["flops_per_s"],
            "mfu": known["mfu"],
            "load_cv_final": {layer: v["cv"] for layer, v in self.last.get("load", {}).items()},
            "median_over_steps": len(self),  # logged steps behind the medians (evenly sampled past capacity)
        }


def _number(value) -> float:
    """A recorded number, or NaN for one the record lacks (``runs.reader`` drops a value of the
    wrong type as if it had not been recorded)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _median_of_known(values) -> float:
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def summarize_records(records: list[dict], warmup: int = WARMUP_RECORDS) -> dict:
    """summary.json's medians from one attempt's records (every one kept: exact medians)."""
    sample = StepSample(capacity=max(2, len(records)), warmup=warmup)
    for r in records:
        sample.add(r)
    return sample.summary()
