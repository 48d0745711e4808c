"""Throughput of several layouts of the same training run, as ratios to `single`.

    python scripts/bench_layouts.py [--steps 30] [--layouts single,dp4,ep2_dp2,ep4] [extra overrides...]

Runs `python train.py` once per layout (same model, data and global batch), reads
each run's summary.json and prints a markdown table: median tokens/s over the steps
after the first, and the ratio to `single` measured in the same invocation. On a
machine with fewer cores than ranks the ratios measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # scripts._child without pip install

from scripts._child import run as run_child  # noqa: E402  (stopping the script stops train.py)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layouts", default="single,dp4,ep2_dp2,ep4")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-") as tmp:
        for layout in a.layouts.split(","):
            out = Path(tmp) / layout
            cmd = [
                sys.executable,
                str(ROOT / "train.py"),
                f"parallel={layout}",
                f"trainer.steps={a.steps}",
                "trainer.eval_every=0",
                f"hydra.run.dir={out}",
                *a.overrides,
            ]
            proc = run_child(cmd, capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                sys.exit(f"{layout} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            s = json.loads((out / "summary.json").read_text())
            rows.append(
                (
                    layout,
                    s["world_size"],
                    s["median_tokens_per_s"],
                    s["final_loss"],
                    s["param_bytes_per_rank"]["expert"]["max"],
                    s["peak_memory_bytes"]["max"],
                )
            )
    base = rows[0][2]
    print(f"{a.steps} steps, {os.cpu_count()} cores ({platform.machine()}), overrides: {' '.join(a.overrides) or '-'}")
    print()
    print(f"| layout | ranks | tokens/s | ratio to {rows[0][0]} | final loss | expert bytes/rank | peak RSS/rank |")
    print("|---|---|---|---|---|---|---|")
    for layout, ranks, tps, loss, eb, peak in rows:
        print(
            f"| {layout} | {ranks} | {tps:,.0f} | {tps / base:.2f} | {loss:.4f} | {eb / 2**20:.2f} MiB | "
            f"{peak / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
