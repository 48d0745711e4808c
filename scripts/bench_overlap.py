"""All-to-All overlap, measured: step time and the share of All-to-All time hidden.

    python scripts/bench_overlap.py [--steps 15] [--layouts ep2,ep4] [--chunks 2] [overrides...]
    python scripts/bench_overlap.py --placements [--rounds 3] [--steps 12] [--layouts ep2] [overrides...]

For each layout, trains the same run twice with `python train.py` (multi-process,
gloo on CPU): without and with `parallel.comm_optimization.all_to_all_overlap`. Reports
the median step time of each, their ratio, and the share of All-to-All time hidden:
1 - (exposed All-to-All time with overlap) / (All-to-All time without), where exposed
time is the time ranks spend waiting for an exchange to finish (the slowest rank's).

``--placements``: where the shared expert hides an exchange
(`parallel.comm_optimization.shared_expert_overlap`), on a model with a shared expert
(`model.shared_expert_ffn_size`, 512 unless overridden). Runs, interleaved over ``--rounds``
rounds: the plain path; the overlap in ``--chunks`` chunks with the shared expert after the
combine (none), during the first dispatch, during the last combine; and the overlap in one
chunk with it during the combine (the plain path's math, its shared expert hidden). Reports
per variant the median and range over rounds of the step time, the exposed combine wait
(`time.a2a_combine`, forward and backward) and the exposed All-to-All.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # scripts._child without pip install

from scripts._child import run as run_child  # noqa: E402  (stopping the script stops train.py)


def _run(tmp: Path, name: str, layout: str, steps: int, overlap: bool, chunks: int, overrides, extra=()) -> dict:
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
        *extra,
        *overrides,
    ]
    proc = run_child(cmd, capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
        sys.exit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "summary.json").read_text())


def _placement_variants(chunks: int) -> list[tuple[str, bool, int, str]]:
    """(label, overlap, chunks, shared_expert_overlap)."""
    return [
        ("plain (no overlap)", False, chunks, "combine"),
        (f"{chunks} chunks, shared after combine (none)", True, chunks, "none"),
        (f"{chunks} chunks, shared at dispatch", True, chunks, "dispatch"),
        (f"{chunks} chunks, shared at combine", True, chunks, "combine"),
        ("1 chunk, shared at combine", True, 1, "combine"),
    ]


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ({min(values) * 1e3:.1f}–{max(values) * 1e3:.1f})"


def placements(a) -> None:
    overrides = a.overrides
    if not any(o.startswith("model.shared_expert_ffn_size=") for o in overrides):
        overrides = ["model.shared_expert_ffn_size=512", *overrides]
    print(f"{a.steps} steps x {a.rounds} interleaved rounds, {os.cpu_count()} cores, overrides: {' '.join(overrides)}")
    print("ms per step, median (min–max) over rounds; exposed = time ranks wait on an exchange (slowest rank)\n")
    print("| layout | variant | step ms | exposed combine ms | exposed a2a ms |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="moemesh-overlap-") as tmp:
        for layout in a.layouts.split(","):
            variants = _placement_variants(a.chunks)
            seen: dict[str, list[tuple[float, float, float]]] = {v[0]: [] for v in variants}
            for r in range(a.rounds):
                for i, (label, overlap, chunks, at) in enumerate(variants):
                    extra = [f"parallel.comm_optimization.shared_expert_overlap={at}"]
                    s = _run(Path(tmp), f"{layout}_{r}_{i}", layout, a.steps, overlap, chunks, overrides, extra)
                    t = s["time_breakdown"]
                    seen[label].append((s["median_step_s"], t["a2a_combine"], t["a2a"]))
            for label, rows in seen.items():
                cols = [_stat([row[j] for row in rows]) for j in range(3)]
                print(f"| {layout} | {label} | {' | '.join(cols)} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--layouts", default="ep2,ep4")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--placements", action="store_true", help="compare where the shared expert runs")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--placements)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    if a.placements:
        placements(a)
        return
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
