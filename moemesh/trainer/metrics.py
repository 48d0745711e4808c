"""What a run reports: metrics.jsonl (one record per logged step), train.log, the console's
live progress line, summary.json's medians and the one-screen end-of-run summary.

The records come from ``trainer.step_stats.step_record``; their keys are the contract in
``runs.records``. Every rank feeds the same reduced records, so every rank computes the same
summary; only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO, cast

from moemesh.runs.reader import RunReadError, read_summary
from moemesh.runs.records import PHASES, RunSummary, StepRecord
from moemesh.runs.steady import StepSample


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_summary(s: Mapping[str, Any]) -> str:
    """The one-screen end-of-run summary."""
    m = s.get("memory_per_rank", {})
    lines = [
        f"── moemesh run summary: {s['parallel']} (dp{s['dp']}·ep{s['ep']}·tp{s['tp']}·pp{s['pp']} = "
        f"{s['world_size']} rank{'s' if s['world_size'] != 1 else ''}), model={s['model']}, {s['steps']} steps",
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
        if start_step > 0 and path.is_file():
            # Streamed into a new file, then swapped in: a long run's history is never held in
            # memory whole, and a kill in the middle leaves the old file as it was.
            tmp = path.with_name(".metrics.jsonl.tmp")
            with open(path, "rb") as old, open(tmp, "wb") as new:
                for line in _lines(old):
                    step = _step_of(line)
                    if step is not None and step <= start_step:
                        new.write(line.rstrip(b"\n") + b"\n")
            os.replace(tmp, path)
            self._file = open(path, "a")
        else:
            self._file = open(path, "w")

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

    def write_summary(self, summary: RunSummary) -> RunSummary:
        """Write summary.json (rank 0) and return it. An attempt that ran no step (resumed at the
        end: "nothing left to train") has no numbers of its own: it keeps the summary.json of the
        attempt that trained, clearing only its ``stopped_by_signal`` (the run is complete now);
        without a readable one, it writes its own."""
        if not self.enabled:
            return summary
        path = self.dir / "summary.json"
        trained = bool(summary.get("steps"))
        if not trained and path.exists():
            with contextlib.suppress(RunReadError):
                kept = read_summary(self.dir)
                if kept.get("steps"):
                    summary = cast(RunSummary, {**kept, "stopped_by_signal": None})
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if self.tracker is not None:
            self.tracker.summary(summary)
        if trained:
            self.message(format_summary(summary))
        return summary

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._log is not None:
            self._log.close()
            self._log = None


_MAX_RECORD = 1 << 20  # one metrics.jsonl line: a record is a few KiB; a longer line is not ours


def _lines(f):
    """``f``'s lines, each at most _MAX_RECORD bytes; a longer one is skipped in bounded pieces."""
    while True:
        line = f.readline(_MAX_RECORD + 1)
        if not line:
            return
        if len(line) > _MAX_RECORD and not line.endswith(b"\n"):
            while (more := f.readline(_MAX_RECORD)) and not more.endswith(b"\n"):
                pass
            continue
        yield line


def _step_of(line: bytes) -> int | None:
    """The ``step`` of a metrics.jsonl record, or None for a line that is not one (a line cut short
    when the last attempt was killed, another writer's text)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None
