"""All-to-All overlap, measured: step time and the share of All-to-All time hidden.

    python scripts/bench_overlap.py [--steps 15] [--layouts ep2,ep4] [--chunks 2] [overrides...]

For each layout, trains the same run twice with `python train.py` (multi-process,
gloo on CPU): without and with `parallel.comm_optimization.all_to_all_overlap`. Reports
the median step time of each, their ratio, and the share of All-to-All time hidden:
1 - (exposed All-to-All time with overlap) / (All-to-All time without), where exposed
time is the time ranks spend waiting for an exchange to finish (the slowest rank's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, name: str, layout: str, steps: int, overlap: bool, chunks: int, overrides) -> dict:
    out = tmp / name
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"parallel={layout}",
        f"trainer.steps={steps}",
        "trainer.eval_every=0",
        "checkpoint.save_final=false",
        f"hydra.run.dir={out}",
        f"parallel.comm_optimization.all_to_all_overlap={str(overlap).lower()}",
        f"parallel.comm_optimization.overlap_chunks={chunks}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
        sys.exit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--layouts", default="ep2,ep4")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    print(f"{a.steps} steps, {os.cpu_count()} cores, chunks={a.chunks}, overrides: {' '.join(a.overrides) or '-'}\n")
    print(
        "| layout | step ms (plain) | step ms (overlap) | overlap / plain | a2a ms (plain) | exposed a2a ms "
        "(overlap) | a2a hidden |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="moemesh-overlap-") as tmp:
        for layout in a.layouts.split(","):
            plain = _run(Path(tmp), f"{layout}_plain", layout, a.steps, False, a.chunks, a.overrides)
            over = _run(Path(tmp), f"{layout}_overlap", layout, a.steps, True, a.chunks, a.overrides)
            s0, s1 = plain["median_step_s"], over["median_step_s"]
            c0, c1 = plain["time_breakdown"]["a2a"], over["time_breakdown"]["a2a"]
            hidden = 1 - c1 / c0 if c0 else 0.0
            print(
                f"| {layout} | {s0 * 1e3:.1f} | {s1 * 1e3:.1f} | {s1 / s0:.2f} | {c0 * 1e3:.1f} | {c1 * 1e3:.1f} | "
                f"{hidden:.0%} |"
            )


if __name__ == "__main__":
    main()
