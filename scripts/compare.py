"""Compare training runs side by side: the offline twin of a wandb dashboard.

    python scripts/compare.py RUN_OR_SWEEP_DIR... [--out DIR]

A run directory holds train.py's summary.json and metrics.jsonl; a sweep directory
(`train.py -m`) expands to its subdirectories that hold a summary.json, in job order.
Writes compare.md (also printed) and PNG charts into --out (default: compare/ inside
the first argument if it is a sweep, else ./compare). Values come from summary.json,
else from medians over metrics.jsonl after the first (warm-up) record; "–" where
neither has them; a chart no run has data for is skipped with a note. The All-to-All
(a2a) runs inside forward and backward, so it is drawn over them, not stacked on top.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
DASH = "–"
PHASES = ("forward", "backward", "pipeline", "grad_reduce", "optimizer")  # sequential parts of a step (pipeline: PP)
STATE = ("param_bytes", "grad_bytes", "optimizer_bytes")


@dataclass
class Run:
    dir: Path
    summary: dict
    records: list[dict]
    label: str = ""
    stats: dict = field(default_factory=dict)


def _job_order(d: Path):
    head = d.name.split("_")[0]
    return (0, int(head), d.name) if head.isdigit() else (1, 0, d.name)


def expand(paths: list[Path]) -> list[Path]:
    """Run directories named by `paths`; ValueError naming the first path that holds none."""
    runs = []
    for p in paths:
        if not p.is_dir():
            raise ValueError(f"{p}: no such directory")
        found = [p] if (p / "summary.json").is_file() else sorted(
            (d for d in p.iterdir() if (d / "summary.json").is_file()), key=_job_order)
        if not found:
            raise ValueError(f"{p}: no summary.json in it or in its direct subdirectories")
        runs += found
    return runs


def load(path: Path) -> Run:
    metrics = path / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    try:
        return Run(path, json.loads((path / "summary.json").read_text()), [json.loads(l) for l in lines if l.strip()])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from None


def assign_labels(runs: list[Run]) -> None:
    names = [r.summary.get("parallel") or r.dir.name for r in runs]
    for run, name in zip(runs, names):
        run.label = name if names.count(name) == 1 else f"{name} ({run.dir.name})"


def steady(run: Run, key: str) -> list:
    """`key` of every record after the first, which includes warm-up."""
    return [r[key] for r in (run.records[1:] or run.records) if r.get(key) is not None]


def median(values: list) -> float | None:
    return statistics.median(values) if values else None


def time_breakdown(run: Run) -> dict[str, float]:
    if run.summary.get("time_breakdown"):
        return run.summary["time_breakdown"]
    times = steady(run, "time")
    return {k: median([t[k] for t in times if k in t]) for k in (times[0] if times else {})}


def max_bytes(s: dict, kind: str, part: str | None = None) -> float | None:
    """Max over ranks of memory_per_rank[kind][part], falling back to the older summary keys."""
    node = s.get("memory_per_rank", {}).get(kind)
    if node is None:
        node = {"param_bytes": s.get("param_bytes_per_rank"), "peak_bytes": s.get("peak_memory_bytes")}.get(kind)
    if node is not None and part:
        node = node.get(part)
    return node.get("max") if node else None


def final_load_cv(run: Run) -> dict[int, float]:
    """{MoE layer index: load CV} at the last logged step."""
    final = run.summary.get("load_cv_final")
    if final is None:
        loads = [r["load"] for r in run.records if r.get("load")]
        final = {name: v.get("cv") for name, v in (loads[-1] if loads else {}).items()}
    return dict(sorted((int(name.removeprefix("layer")), v) for name, v in final.items() if v is not None))


def compute_stats(run: Run) -> dict:
    s, tb, cv = run.summary, time_breakdown(run), final_load_cv(run)
    share = s.get("a2a_share")
    if share is None and tb.get("a2a") is not None and tb.get("step"):
        share = tb["a2a"] / tb["step"]
    return dict(
        tps=s.get("median_tokens_per_s") or median(steady(run, "tokens_per_s")), tb=tb, a2a_share=share,
        step=s.get("median_step_s") or tb.get("step") or median(steady(run, "step_s")),
        peak=max_bytes(s, "peak_bytes"), peak_kind=s.get("peak_memory_bytes", {}).get("kind", "peak"),
        state={(k, p): max_bytes(s, k, p) for k in STATE for p in ("expert", "non_expert")},
        cv=cv, mean_cv=statistics.fmean(cv.values()) if cv else None,
        final_loss=s.get("final_loss", run.records[-1].get("loss") if run.records else None),
    )


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return DASH if value is None else format(value * scale, spec)


def table(runs: list[Run]) -> str:
    base = runs[0].stats["tps"]
    head = (f"| run | world | dp/ep/tp/pp | tokens/s | ratio to {runs[0].label} | step ms | fwd % | bwd % | "
            "pipeline % | grad reduce % | optim % | a2a % | peak MiB/rank | expert param MiB/rank | "
            "non-expert param MiB/rank | load CV | final loss |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        st, s = r.stats, r.summary
        tb, step = st["tb"], st["tb"].get("step") or st["step"]
        degrees = "/".join(str(s.get(k, "?")) for k in ("dp", "ep", "tp", "pp"))
        cells = [r.label, str(s.get("world_size", DASH)), degrees,
                 fmt(st["tps"], ",.0f"), fmt(st["tps"] and base and st["tps"] / base, ".2f"),
                 fmt(st["step"], ".1f", 1e3), *(fmt(tb.get(p) and step and tb[p] / step, ".1f", 100) for p in PHASES),
                 fmt(st["a2a_share"], ".1f", 100), fmt(st["peak"], ",.0f", 1 / MIB),
                 fmt(st["state"]["param_bytes", "expert"], ".2f", 1 / MIB),
                 fmt(st["state"]["param_bytes", "non_expert"], ".2f", 1 / MIB),
                 fmt(st["mean_cv"], ".3f"), fmt(st["final_loss"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NOTES = ("\nMedians skip the first (warm-up) step. Phase % are shares of the median step; a2a % is the "
         "All-to-All's share, which lies inside fwd/bwd/pipeline. Memory: max over ranks. Load CV: std/mean of tokens "
         "per expert, mean over MoE layers at the last logged step.\n")


def run_axis(ax, ylabel, title):
    ax.set(ylabel=ylabel, title=title)
    ax.set_xticks(ax.get_xticks(), ax.get_xticklabels(), rotation=25, ha="right")


def bar_chart(ax, labels, values, ylabel, title, spec):
    bars = ax.bar(labels, values, color="tab:blue")
    ax.bar_label(bars, labels=[format(v, spec) for v in values], padding=2, fontsize=8)
    run_axis(ax, ylabel, title)


def plot_stat(runs, ax, *, key, scale, ylabel, title, spec, missing):
    """One bar per run that has stats[key]."""
    done = [r for r in runs if r.stats[key] is not None]
    if not done:
        return missing
    bar_chart(ax, [r.label for r in done], [scale * r.stats[key] for r in done], ylabel, title, spec)


def plot_step_breakdown(runs, ax):
    done = [r for r in runs if any(r.stats["tb"].get(p) is not None for p in PHASES)]
    if not done:
        return "no run has time_breakdown in summary.json or time in metrics.jsonl"
    labels, bottom = [r.label for r in done], [0.0] * len(done)
    steps = [1e3 * (r.stats["tb"].get("step") or r.stats["step"] or 0.0) for r in done]
    for phase in (*PHASES, "other"):
        ms = [1e3 * (r.stats["tb"].get(phase) or 0.0) for r in done]
        if phase == "other":  # the part of the step no phase accounts for
            ms = [max(step - b, 0.0) for step, b in zip(steps, bottom)]
        if any(ms):
            ax.bar(labels, ms, bottom=bottom, label=phase, color="lightgray" if phase == "other" else None)
            bottom = [b + m for b, m in zip(bottom, ms)]
    a2a = [1e3 * (r.stats["tb"].get("a2a") or 0.0) for r in done]
    ax.bar(labels, a2a, width=0.4, fill=False, hatch="//", edgecolor="black",
           label="a2a (inside forward,\nbackward, pipeline)")
    run_axis(ax, "time per step (ms, median)", "Step time breakdown")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_memory(runs, ax):
    ax_state, ax_peak = ax
    labels, bottom = [r.label for r in runs], [0.0] * len(runs)
    for kind in STATE:
        for part in ("expert", "non_expert"):
            mib = [(r.stats["state"][kind, part] or 0.0) / MIB for r in runs]
            if any(mib):
                ax_state.bar(labels, mib, bottom=bottom, label=f"{kind.removesuffix('_bytes')}, {part.replace('_', '-')}")
                bottom = [b + m for b, m in zip(bottom, mib)]
    run_axis(ax_state, "MiB per rank (max over ranks)", "Model state per rank")
    ax_state.legend(fontsize=8)
    bar_chart(ax_peak, labels, [(r.stats["peak"] or 0.0) / MIB for r in runs],
              f"MiB ({runs[0].stats['peak_kind']}, max over ranks)", "Peak memory per rank", ",.0f")


def plot_load_cv(runs, ax):
    done = [r for r in runs if r.stats["cv"]]
    if not done:
        return "no run logged load statistics"
    for r in done:
        ax.plot(list(r.stats["cv"]), list(r.stats["cv"].values()), marker="o", label=r.label)
    ax.set_xticks(sorted({layer for r in done for layer in r.stats["cv"]}))
    ax.set(xlabel="MoE layer (model layer index)", ylabel="load CV (std / mean of tokens per expert)",
           title="Expert load imbalance at the last logged step")
    ax.legend(fontsize=8)


def plot_loss(runs, ax):
    done = [r for r in runs if steady(r, "loss")]
    if not done:
        return "no run logged a loss"
    for r in done:
        train = [x for x in r.records if x.get("loss") is not None]
        line, = ax.plot([x["step"] for x in train], [x["loss"] for x in train], label=r.label)
        val = [x for x in r.records if x.get("val_loss") is not None]
        ax.plot([x["step"] for x in val], [x["val_loss"] for x in val], "o--", color=line.get_color())
    ax.set(xlabel="step", ylabel="loss (cross-entropy, nats/token)", title="Loss (solid: train, dashed: validation)")
    ax.legend(fontsize=8)


CHARTS = {  # file name: (plot(runs, ax) -> None, or why it was skipped; number of panels)
    "throughput.png": (functools.partial(plot_stat, key="tps", scale=1, ylabel="tokens/s (median)", spec=",.0f",
                                         title="Training throughput per run", missing="no run has tokens/s"), 1),
    "step_breakdown.png": (plot_step_breakdown, 1), "memory.png": (plot_memory, 2),
    "a2a_share.png": (functools.partial(plot_stat, key="a2a_share", scale=100, ylabel="% of step time", spec=".1f",
                                        title="All-to-All share of the step",
                                        missing="no run has a2a_share or time.a2a"), 1),
    "load_cv.png": (plot_load_cv, 1), "loss.png": (plot_loss, 1),
}


def write_charts(runs: list[Run], out: Path) -> list[str]:
    """Draws every chart into `out`; returns one note per chart skipped for lack of data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes = []
    for name, (plot, panels) in CHARTS.items():
        fig, ax = plt.subplots(1, panels, figsize=(6.4 * panels, 4.8))
        skipped = plot(runs, ax)
        if skipped:
            notes.append(f"skipped {name}: {skipped}")
        else:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return notes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="run directories and/or sweep directories")
    p.add_argument("--out", type=Path, help="output directory (default: see above)")
    a = p.parse_args(argv)
    try:
        runs = [load(d) for d in expand(a.paths)]
    except ValueError as err:
        print(f"compare.py: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    assign_labels(runs)
    for run in runs:
        run.stats = compute_stats(run)
    first_is_sweep = not (a.paths[0] / "summary.json").is_file()
    out = a.out or (a.paths[0] / "compare" if first_is_sweep else Path("compare"))
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    (out / "compare.md").write_text(md + NOTES)
    print(md)
    for note in write_charts(runs, out):
        print(note)
    print(f"wrote {out / 'compare.md'} and charts to {out}/")


if __name__ == "__main__":
    main()
