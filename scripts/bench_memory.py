"""Memory and step time of each sharding mode x activation-checkpointing setting, as ratios to none.

    python scripts/bench_memory.py [--layout ep2_dp2] [--steps 6] [--rounds 1] [extra overrides...]

Runs `python train.py` once per (parallel.sharding, trainer.activation_checkpointing)
pair on the same layout, model, data and batch (interleaved over --rounds), reads each
run's summary.json and prints a markdown table per rank (max over ranks):
  * parameter + gradient + optimizer bytes at rest (exact: what the rank keeps);
  * the peak above what the rank held before building the model (on the CPU, the
    resident set less the interpreter, torch and process groups; on CUDA, allocated
    tensors), and that peak's ratio to none x none;
  * median step time (steps after the first) and its ratio to none x none.
The defaults make activations dominate (long sequences, a narrow model), so the
checkpointing columns show what recomputation saves and costs. On this 2-core CPU with
4 ranks the step time measures contention as much as work; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # scripts._child without pip install

from scripts._child import run as run_child  # noqa: E402  (stopping the script stops train.py)

MODES = ("none", "zero2", "zero3")
CHECKPOINTING = ("none", "full", "selective")
# A model whose activations outweigh its state: 4 layers of width 128, 1,024-token sequences.
DEFAULTS = [
    "model=tiny",
    "trainer.seq_len=1024",
    "model.max_seq_len=1024",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
    "checkpoint.save_final=false",
    "logger.console=false",
]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def run_one(layout: str, mode: str, ckpt: str, steps: int, extra: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"parallel={layout}",
        f"parallel.sharding={mode}",
        f"trainer.activation_checkpointing={ckpt}",
        f"trainer.steps={steps}",
        *DEFAULTS,
        *extra,
        f"hydra.run.dir={out}",
    ]
    proc = run_child(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"bench_memory: {mode} x {ckpt} failed: {' '.join(tail)}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="ep2_dp2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1, help="runs of every pair, interleaved; medians are reported")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = p.parse_args(argv)
    pairs = [(m, c) for m in MODES for c in CHECKPOINTING]
    results: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    with tempfile.TemporaryDirectory(prefix="moemesh-bench-memory-") as tmp:
        for r in range(a.rounds):
            for mode, ckpt in pairs:
                out = Path(tmp) / f"{mode}-{ckpt}-{r}"
                results[(mode, ckpt)].append(run_one(a.layout, mode, ckpt, a.steps, a.overrides, out))
                print(f"  ran {mode} x {ckpt} (round {r + 1}/{a.rounds})", file=sys.stderr)

    def state(s: dict) -> int:
        m = s["memory_per_rank"]
        return sum(m[k][part]["max"] for k in ("param_bytes", "grad_bytes", "optimizer_bytes") for part in m[k])

    def peak(s: dict) -> int:
        return s["memory_per_rank"]["peak_above_start_bytes"]["max"]

    med = {
        pair: {
            "state": statistics.median(state(s) for s in runs),
            "peak": statistics.median(peak(s) for s in runs),
            "step_s": statistics.median(s["median_step_s"] for s in runs),
        }
        for pair, runs in results.items()
    }
    ref = med[("none", "none")]
    first = results[("none", "none")][0]
    print(
        f"\n{a.layout}, {a.steps} steps x {a.rounds} round(s), {first['machine']['device']} "
        f"({first['machine']['cpus']} cores), torch {first['machine']['torch']}, python {platform.python_version()}"
    )
    print(f"overrides: {' '.join(DEFAULTS + a.overrides)}\n")
    print(
        "| sharding | checkpointing | state MiB/rank | state ratio | peak above start MiB | peak ratio | "
        "step s | step ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode, ckpt in pairs:
        r = med[(mode, ckpt)]
        print(
            f"| {mode} | {ckpt} | {_mib(r['state'])} | {r['state'] / ref['state']:.3f} | {_mib(r['peak'])} | "
            f"{r['peak'] / ref['peak']:.2f} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
