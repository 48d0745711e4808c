"""What a run reports: metrics.jsonl (one record per logged step), train.log, the console's
live progress line, summary.json's medians and the one-screen end-of-run summary.

The records come from ``trainer.step_stats.step_record``; their keys are the contract in
``trainer.records``. Every rank feeds the same reduced records, so every rank computes the same
summary; only rank 0 writes files and prints.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from moemesh.trainer.records import PHASES, RunSummary, StepRecord


class StepSample:
    """The numbers the summary's medians need, from a bounded, evenly spaced sample of the logged steps.

    A record is kilobytes (per-layer load statistics); a week of steps is millions. This keeps
    a handful of floats per kept step (one array per column), at most ``capacity`` steps: every
    logged step until it is full, then every 2nd, 4th, ... (each time it fills, every other kept
    step goes and the spacing doubles), so the sample always spans the whole run evenly.
    Medians are exact up to ``capacity`` logged steps. Every rank is fed the same (reduced)
    records in the same order, so every rank keeps the same sample and the same summary.
    """

    def __init__(self, capacity: int = 4096):
        if capacity < 2:
            raise ValueError(f"capacity={capacity} must be >= 2")
        self.capacity = capacity
        self.stride = 1  # steady record i (0: the one after warm-up) is kept iff i % stride == 0
        self.seen = 0  # logged records with timings, the warm-up one included
        self.names: tuple[str, ...] = ()
        self.first: list[float] | None = None  # the warm-up step: the medians' source only when alone
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
        mfu = r.get("mfu")
        return [
            *(t.get(k[5:], 0.0) for k in self.names[:-5]),
            t["a2a"] / t["step"] if t["step"] else 0.0,
            r["a2a"]["bytes_sent"],
            r["samples_per_s"],
            r["flops_per_s"],
            math.nan if mfu is None else mfu,
        ]

    def add(self, record: Mapping[str, Any]) -> None:
        self.last = record
        if "time" not in record:
            return
        index, self.seen = self.seen, self.seen + 1
        if index == 0:
            self.first = self._values(record)
            return
        steady = index - 1
        if steady % self.stride:
            return
        if len(self.columns[0]) == self.capacity:  # full: keep every other step, twice the spacing
            self.columns = [column[::2] for column in self.columns]
            self.stride *= 2
            if steady % self.stride:
                return
        for column, value in zip(self.columns, self._values(record)):
            column.append(value)

    def __len__(self) -> int:
        """Steps the medians are taken over."""
        return len(self.columns[0]) if self.columns and self.columns[0] else int(self.first is not None)

    def medians(self) -> dict[str, float] | None:
        if self.columns and self.columns[0]:
            return {name: statistics.median(column) for name, column in zip(self.names, self.columns)}
        return None if self.first is None else dict(zip(self.names, self.first))

    def summary(self) -> dict:
        """The summary's medians over the logged steps after the first (warm-up)."""
        med = self.medians()
        if med is None:
            return {}
        mfu = med["mfu"]
        return {
            "time_breakdown": {name[5:]: v for name, v in med.items() if name.startswith("time.")},
            "a2a_share": med["a2a_share"],
            "a2a_bytes_sent_per_step": med["a2a_bytes_sent"],
            "median_samples_per_s": med["samples_per_s"],
            "median_flops_per_s": med["flops_per_s"],
            "mfu": None if math.isnan(mfu) else mfu,
            "load_cv_final": {layer: v["cv"] for layer, v in self.last.get("load", {}).items()},
            "median_over_steps": len(self),  # logged steps behind the medians (evenly sampled past capacity)
        }


def summarize_records(records: list[dict]) -> dict:
    """Medians over the logged steps after the first (warm-up), for summary.json."""
    sample = StepSample(capacity=max(2, len(records)))
    for r in records:
        sample.add(r)
    return sample.summary()


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_summary(s: Mapping[str, Any]) -> str:
    """The one-screen end-of-run summary."""
    m = s.get("memory_per_rank", {})
    lines = [
        f"── moemesh run summary: {s['parallel']} (dp{s['dp']}·ep{s['ep']}·tp{s['tp']}·pp{s['pp']} = "
        f"{s['world_size']} ranks), model={s['model']}, {s['steps']} steps",
        f"loss {s['final_loss']:.4f}" + (f", validation {s['final_val_loss']:.4f}" if s.get("final_val_loss") else ""),
        f"throughput  {s['median_tokens_per_s']:,.0f} tokens/s, {s.get('median_samples_per_s') or 0:,.1f} samples/s, "
        f"step {s['median_step_s'] * 1e3:,.1f} ms" + (f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") else ""),
    ]
    tb = s.get("time_breakdown")
    if tb:
        parts = ", ".join(f"{k} {100 * v / tb['step']:.0f}%" for k, v in tb.items() if k in PHASES and v)
        parts += " (slowest rank per phase)"
        lines.append(f"step time   {parts}")
        lines.append(
            f"All-to-All  {100 * (s.get('a2a_share') or 0):.1f}% of the step (inside forward/backward), "
            f"{_mib(s.get('a2a_bytes_sent_per_step') or 0)} sent per rank per step"
        )
        if tb.get("experts") or tb.get("attention_core"):
            shares = [f"{100 * (tb.get(k) or 0) / tb['step']:.1f}% {k}" for k in ("experts", "attention_core")]
            lines.append(f"timed apart {', '.join(shares)} of the step (forward + backward)")
    if m:

        def both(kind: str) -> str:
            return f"{_mib(m[kind]['expert']['max'])} + {_mib(m[kind]['non_expert']['max'])}"

        sharding = f", {s['sharding']}" if s.get("sharding", "none") != "none" else ""
        lines.append(
            f"memory/rank expert + non-expert: params {both('param_bytes')}, grads {both('grad_bytes')}, "
            f"optimizer {both('optimizer_bytes')}; peak {_mib(m['peak_bytes']['max'])} (max over ranks{sharding})"
        )
    cv = s.get("load_cv_final")
    if cv:
        lines.append("load CV     " + ", ".join(f"{k} {v:.2f}" for k, v in cv.items()))
    return "\n".join(lines)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes one JSON object per logged step; prints a live progress line.

    Only rank 0 constructs one with ``enabled=True``; other ranks get a silent one.
    """

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        console: bool,
        jsonl: bool,
        total_steps: int,
        tracker=None,
        sample_capacity: int = 4096,
    ):
        self.enabled, self.console, self.total_steps = enabled, console and enabled, total_steps
        self.tracker = tracker if enabled else None
        # Not the records (kilobytes each, every step of a long run): the sample the summary needs.
        self.sample = StepSample(sample_capacity)
        self.dir = Path(output_dir)
        self._jsonl = enabled and jsonl
        self._file: TextIO | None = None  # opened by begin(), once the first step is known
        self._tty = sys.stdout.isatty()
        # Every line the run prints, also on file (rank 0; appended across resumed attempts).
        self._log = open(self.dir / "train.log", "a") if enabled else None
        self._last_print = 0.0
        self._start = time.perf_counter()

    def begin(self, start_step: int) -> None:
        """Open metrics.jsonl. A run resumed in its own directory (a requeued SLURM job)
        keeps the records of the ``start_step`` steps completed before and appends after them.
        A record's ``step`` counts completed optimizer steps (1 for the first, as on the
        console and in ``checkpoints/step_N``)."""
        if not self._jsonl or self._file is not None:
            return
        path = self.dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", start_step + 1) <= start_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:  # a line cut short when the last attempt was killed
                    continue
        self._file = open(path, "w")
        self._file.writelines(kept)

    def log(self, record: StepRecord) -> None:
        self.sample.add(record)  # on every rank: the summary is the same everywhere
        if not self.enabled:
            return
        if self.tracker is not None:
            self.tracker.log(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if "loss" in record:
            self._progress(record)

    def _progress(self, r: StepRecord) -> None:
        """The live progress line: redrawn in place on a terminal; otherwise, and in
        train.log, the first and last steps and one line every 5 s."""
        now = time.perf_counter()
        step = r["step"]
        last = step == self.total_steps
        due = last or step == 1 or now - self._last_print >= 5.0
        if not (due or (self.console and self._tty)):
            return
        elapsed = now - self._start
        eta = elapsed / step * (self.total_steps - step)
        done = int(20 * step / self.total_steps)
        line = (
            f"[{'#' * done}{'.' * (20 - done)}] step {step:>5}/{self.total_steps} | loss {r['loss']:.4f} | "
            f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | ETA {_fmt_duration(eta)}"
        )
        if "val_loss" in r:
            line += f" | val {r['val_loss']:.4f}"
        if self.console and self._tty:
            sys.stdout.write("\r" + line + ("\n" if last else ""))
            sys.stdout.flush()
        elif self.console and due:
            print(line, flush=True)
        if due:
            self._last_print = now
            self._to_file(line)

    def message(self, text: str) -> None:
        if self.console:
            if self._tty:
                sys.stdout.write("\r\033[K")
            print(text, flush=True)
        self._to_file(text)

    def _to_file(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    def write_summary(self, summary: RunSummary) -> None:
        if self.enabled:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.tracker is not None:
                self.tracker.summary(summary)
            if summary.get("steps"):
                self.message(format_summary(summary))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._log is not None:
            self._log.close()
            self._log = None
