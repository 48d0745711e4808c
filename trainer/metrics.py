"""Rank 0's outputs: metrics.jsonl, summary.json and the console progress line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes one JSON object per logged step; prints a live progress line.

    Only rank 0 constructs one with ``enabled=True``; other ranks get a silent one.
    """

    def __init__(self, output_dir: str, *, enabled: bool, console: bool, jsonl: bool, total_steps: int):
        self.enabled, self.console, self.total_steps = enabled, console and enabled, total_steps
        self.dir = Path(output_dir)
        self._file = open(self.dir / "metrics.jsonl", "w") if enabled and jsonl else None
        self._tty = sys.stdout.isatty()
        self._last_print = 0.0
        self._start = time.perf_counter()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.console and "loss" in record:
            self._progress(record)

    def _progress(self, r: dict) -> None:
        now = time.perf_counter()
        step = r["step"] + 1
        last = step == self.total_steps
        if not (self._tty or last or now - self._last_print >= 5.0 or step == 1):
            return
        self._last_print = now
        elapsed = now - self._start
        eta = elapsed / step * (self.total_steps - step)
        line = (
            f"step {step:>5}/{self.total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s | ETA {_fmt_duration(eta)}"
        )
        if "val_loss" in r:
            line += f" | val {r['val_loss']:.4f}"
        if self._tty:
            sys.stdout.write("\r" + line + ("\n" if last else ""))
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.console:
            if self._tty:
                sys.stdout.write("\r\033[K")
            print(text, flush=True)

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
