"""Issue 31's measurements: pipeline schedules, rank-limited routing, compilation.

    python scripts/bench_schedules_routing.py schedules [--steps 12] [--rounds 2] [overrides...]
    python scripts/bench_schedules_routing.py routing [--steps 300] [overrides...]
    python scripts/bench_schedules_routing.py compile [--steps 30] [--rounds 2] [overrides...]

Every run is ``python train.py`` (gloo ranks on the CPU, the tiny model unless overridden);
times are each run's median step (summary.json, after its warm-up steps).

schedules: ``pp4`` with 8 micro-steps (8 layers: 2 stages per rank where a schedule has several),
each of torch's schedules, rounds interleaved; the median step time relative to 1F1B's (median
and range over the rounds) beside the planner's bubble fraction and predicted step time; and
whether the planner's pick among the schedules is within 10 % of the measured best.

routing: ``ep4`` with ``model.max_ranks_per_token=2`` against unlimited routing (top-4 of 8
experts, so unlimited routing can reach 4 ranks): All-to-All bytes per step (median), the
fan-out, and the loss after ``--steps`` steps (mean of the last 10 records) of each.

compile: ``single`` with ``trainer.compile=blocks`` against eager, rounds interleaved: tokens/s
(median after warm-up) and the first step's time, which includes the compilation.
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
sys.path.insert(0, str(ROOT))  # the repository: moemesh without pip install

from scripts._args import Parser, positive_int  # noqa: E402
from scripts._child import run as run_child  # noqa: E402  (stopping the script stops train.py)

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev")
PP4 = ["parallel=pp4", "trainer.micro_steps=8", "model.num_layers=8", "trainer.global_batch_size=32"]


def _train(tmp: Path, name: str, args: list[str]) -> tuple[dict, list[dict]]:
    out = tmp / name
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "trainer.eval_every=0",
        "checkpoint.save_final=false",
        "logger.console=false",
        f"hydra.run.dir={out}",
        *args,
    ]
    proc = run_child(cmd, capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
        sys.exit(f"{name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), records


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def schedules(tmp: Path, steps: int, rounds: int, overrides: list[str]) -> None:
    from moemesh.config.cli import compose_run
    from moemesh.planning.cost import plan_one, with_schedule

    common = [*PP4, f"trainer.steps={steps}", "trainer.log_every=1", *overrides]
    run = compose_run(common)
    m = run.trainer.micro_steps or 8
    step_s: dict[str, list[float]] = {s: [] for s in SCHEDULES}
    for r in range(rounds):
        for s in SCHEDULES:
            summary, _ = _train(tmp, f"r{r}_{s}", [*common, f"parallel.pipeline_schedule={s}"])
            step_s[s].append(summary["median_step_s"])
    predicted = {}
    print(f"pp4, {m} micro-steps, {steps} steps, {rounds} rounds, {os.cpu_count()} cores\n")
    print("| schedule | stages/rank | step ms (median) | ÷ 1F1B: median (range) | planner bubble | planner step ms |")
    print("|---|---|---|---|---|---|")
    for s in SCHEDULES:
        r_s = with_schedule(run, s)
        v = r_s.parallel.pp_stages_per_rank or (1 if s in ("1f1b", "gpipe") else 2)
        plan = plan_one(r_s, r_s.parallel.dims)
        predicted[s] = plan.step_s
        ratios = [a / b for a, b in zip(step_s[s], step_s["1f1b"])]
        print(
            f"| {s} | {v} | {statistics.median(step_s[s]) * 1e3:.0f} | {_spread(ratios)} | "
            f"{plan.bubble:.3f} | {plan.step_s * 1e3:.2f} |"
        )
    best = min(SCHEDULES, key=lambda s: statistics.median(step_s[s]))
    pick = min(SCHEDULES, key=lambda s: predicted[s])
    gap = statistics.median(step_s[pick]) / statistics.median(step_s[best]) - 1
    verdict = "within" if gap <= 0.10 else "NOT within"
    print(f"\nmeasured best: {best}; planner's pick: {pick}, {gap:+.1%} from the best ({verdict} 10 %)")


def routing(tmp: Path, steps: int, overrides: list[str]) -> None:
    common = ["parallel=ep4", "model.top_k=4", f"trainer.steps={steps}", "trainer.log_every=1", *overrides]
    rows = {}
    for name, extra in (("unlimited", []), ("max_ranks_per_token=2", ["model.max_ranks_per_token=2"])):
        _, records = _train(tmp, name.replace("=", "_"), [*common, *extra])
        rows[name] = records
    print(f"ep4, top-4 of 8 experts, {steps} steps, {os.cpu_count()} cores\n")
    print("| routing | a2a bytes/step (median) | ÷ unlimited | fan-out mean | fan-out max | loss (last 10) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r["a2a"]["bytes_sent"] for r in rows["unlimited"])
    for name, records in rows.items():
        sent = statistics.median(r["a2a"]["bytes_sent"] for r in records)
        fan = statistics.mean(r["a2a"]["fanout_mean"] for r in records)
        fan_max = max(r["a2a"]["fanout_max"] for r in records)
        loss = statistics.mean(r["loss"] for r in records[-10:])
        print(f"| {name} | {sent / 1e6:.2f} MB | {sent / base:.2f} | {fan:.2f} | {fan_max} | {loss:.4f} |")


def compile_(tmp: Path, steps: int, rounds: int, overrides: list[str]) -> None:
    common = ["parallel=single", f"trainer.steps={steps}", "trainer.log_every=1", *overrides]
    tps: dict[str, list[float]] = {"none": [], "blocks": []}
    first: dict[str, list[float]] = {"none": [], "blocks": []}
    for r in range(rounds):
        for mode in tps:
            summary, records = _train(tmp, f"r{r}_{mode}", [*common, f"trainer.compile={mode}"])
            tps[mode].append(statistics.median(rec["tokens_per_s"] for rec in records[5:]))
            first[mode].append(records[0]["time"]["step"])
    print(f"single, {steps} steps, {rounds} rounds, {os.cpu_count()} cores\n")
    print("| trainer.compile | tokens/s (median) | ÷ eager: median (range) | first step s (median) |")
    print("|---|---|---|---|")
    for mode in tps:
        ratios = [a / b for a, b in zip(tps[mode], tps["none"])]
        print(
            f"| {mode} | {statistics.median(tps[mode]):,.0f} | {_spread(ratios)} | "
            f"{statistics.median(first[mode]):.1f} |"
        )
    extra = statistics.median(first["blocks"]) - statistics.median(first["none"])
    print(f"\ncompile time (first step compiled - eager): {extra:.1f} s")


def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("schedules", "routing", "compile"))
    p.add_argument("--steps", type=positive_int, help="default: 12 schedules, 300 routing, 30 compile")
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    with tempfile.TemporaryDirectory(prefix="moemesh-i31-") as tmp:
        if a.what == "schedules":
            schedules(Path(tmp), 12 if a.steps is None else a.steps, a.rounds, a.overrides)
        elif a.what == "routing":
            routing(Path(tmp), 300 if a.steps is None else a.steps, a.overrides)
        else:
            compile_(Path(tmp), 30 if a.steps is None else a.steps, a.rounds, a.overrides)


if __name__ == "__main__":
    main()
