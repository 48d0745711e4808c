"""Compare training runs side by side: the offline twin of a wandb dashboard.

    python scripts/compare.py RUN_OR_SWEEP_DIR... [--out DIR] [--coincide-tol 1e-4]

(The layout sweeper draws the same charts in-process, with ``main``.)

A run directory holds train.py's summary.json and metrics.jsonl; a sweep directory
(`train.py -m`) expands to its subdirectories that hold a summary.json, in job order.
Writes compare.md (also printed) and PNG charts into --out (default: compare/ inside
the first argument if it is a sweep, else ./compare). Values come from summary.json,
else from medians over metrics.jsonl's steady steps (``moemesh.runs.steady``, the same rule as
summary.json's); "–" where neither has them; a chart no run has data for is skipped with a note. Every chart
carries a subtitle naming the model, the steps and the machine (summary.json's
`machine`; "machine: unknown" when the runs did not record it).

Step breakdown: the sequential phases of a step (forward, backward or pipeline,
grad_reduce, optimizer) plus "other", the rest of the measured step, add up to the
step time and their percentages to exactly 100 (largest-remainder rounding). Each
phase is the slowest rank's, so their sum can exceed the step (the sum of maxima is
not the maximum of sums); such a run's phases are scaled down to the step, and the
table notes and the chart say by how much. The All-to-All (a2a) runs inside forward and
backward, so it is drawn over them, never stacked on top or counted twice.

Loss curves that coincide (max |Δ| below --coincide-tol over their common steps) are
named in a note on the chart and on stdout; every curve has its own dash pattern and
staggered markers, so none hides another.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moemesh.runs.reader import Run, expand, jobs_never_started, load_run
from moemesh.runs.records import A2A_PHASES, PHASES
from moemesh.runs.steady import median

__all__ = ["A2A_PHASES", "PHASES", "Run", "expand", "load_run", "main"]

MIB = 2**20
DASH = "–"
STATE = ("param_bytes", "grad_bytes", "optimizer_bytes")
OTHER = "other"  # the part of the measured step that no phase accounts for
COINCIDE_TOL = 1e-4  # nats/token: loss curves closer than this everywhere are drawn on top of each other
PHASE_COLORS = {  # one per phase of PHASES, and OTHER
    "data": "tab:brown",
    "forward": "tab:blue",
    "backward": "tab:orange",
    "pipeline": "tab:purple",
    "grad_reduce": "tab:green",
    "optimizer": "tab:red",
    OTHER: "lightgray",
}


def run_name(summary: dict, fallback: str) -> str:
    """The layout, plus the sharding mode and checkpointing where they are not none
    ("ep2_dp2 zero3+full"), so runs of one layout in different modes tell apart."""
    name = summary.get("parallel") or fallback
    modes = [m for m in (summary.get("sharding"), summary.get("activation_checkpointing")) if m and m != "none"]
    if summary.get("activation_checkpointing") not in (None, "none") and summary.get("sharding") in (None, "none"):
        modes = ["ckpt-" + summary["activation_checkpointing"]]
    return f"{name} {'+'.join(modes)}" if modes else name


def _effective(overrides) -> set[str]:
    """The overrides a run was given, as it used them: a key given twice counts with its last
    value (Hydra's rule), Hydra's own and the parallel preset left out."""
    last: dict[str, str] = {}
    for o in overrides:
        if o.startswith(("hydra.", "parallel=")) or "=" not in o:
            continue
        key = o.split("=", 1)[0].lstrip("+")
        last.pop(key, None)  # keep the order of the last occurrence
        last[key] = o
    return set(last.values())


def assign_labels(runs: list[Run]) -> None:
    """Each run's label: its name (``run_name``); runs that share one add what tells them apart:
    the command-line overrides that differ between them (a sweep over ``trainer.lr``), else the
    shortest end of their paths that differs (``0_ep4`` of two sweeps: ``a/0_ep4``, ``b/0_ep4``)."""
    names = [run_name(r.summary, r.dir.name) for r in runs]
    for name in set(names):
        group = [r for r, n in zip(runs, names) if n == name]
        if len(group) == 1:
            group[0].label = name
            continue
        overrides = [_effective(r.overrides()) for r in group]
        shared = set.intersection(*overrides)
        tags = [", ".join(sorted(o - shared)) for o in overrides]
        if len(set(tags)) < len(group) or not all(tags):
            parts = [r.dir.resolve().parts for r in group]
            depth = next(
                (k for k in range(1, max(map(len, parts)) + 1) if len({p[-k:] for p in parts}) == len(group)), None
            )
            tags = ["/".join(p[-depth:]) if depth else f"#{i}" for i, p in enumerate(parts)]
        for r, tag in zip(group, tags):
            r.label = f"{name} ({tag})"


def steady(run: Run, key: str) -> list:
    """``key`` of the run's steady records (``moemesh.runs.steady``)."""
    return [r[key] for r in run.steady if r.get(key) is not None]


def time_breakdown(run: Run) -> dict[str, float]:
    if run.summary.get("time_breakdown"):
        return run.summary["time_breakdown"]
    return run.medians().get("time_breakdown", {})


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


def largest_remainder(values: list[float], total: float = 100.0, decimals: int = 1) -> list[float]:
    """`values` as shares of `total`, rounded to `decimals` places so that the rounded
    shares add up to exactly `total` (largest-remainder method; ties go to the earlier)."""
    values = [max(v, 0.0) for v in values]
    whole = sum(values)
    if not values or whole <= 0:
        return [0.0] * len(values)
    unit = 10**decimals
    exact = [v / whole * total * unit for v in values]
    floors = [math.floor(x) for x in exact]
    left = round(total * unit) - sum(floors)
    for i in sorted(range(len(exact)), key=lambda i: (floors[i] - exact[i], i))[:left]:
        floors[i] += 1
    return [f / unit for f in floors]


@dataclass
class Breakdown:
    """One run's step split into segments (phases and "other") that add up to the step."""

    step_s: float  # the measured (median) step
    segments: dict[str, float]  # seconds per phase the run has (PHASES order), then OTHER; sum == step_s
    percent: dict[str, float]  # the same keys, one decimal, summing to exactly 100
    a2a_s: float | None  # inside forward/backward/pipeline, on the same scale as the segments
    phase_sum_share: float  # measured phases / step: above 1 when the slowest ranks' phases overlap
    scale: float  # what the phases were multiplied by: 1, or 1 / phase_sum_share when that exceeds 1

    @property
    def scaled(self) -> bool:
        return self.scale < 1.0


def step_breakdown(tb: dict, step_s: float | None) -> Breakdown | None:
    """Phases of `tb` (time_breakdown, seconds) plus "other" = the rest of `step_s`.

    a2a is not a segment: it runs inside forward and backward (or pipeline). When the
    phases (each the slowest rank's) add up to more than the step, they are scaled to
    fit and "other" is 0. None without a step time or a phase."""
    phases = {p: max(float(tb[p]), 0.0) for p in PHASES if tb.get(p) is not None}
    if not step_s or step_s <= 0 or not phases:
        return None
    measured = sum(phases.values())
    scale = step_s / measured if measured > step_s else 1.0
    segments = {p: v * scale for p, v in phases.items()}
    segments[OTHER] = 0.0 if scale < 1.0 else step_s - measured
    a2a = tb.get("a2a")
    percent = dict(zip(segments, largest_remainder(list(segments.values()))))
    return Breakdown(
        step_s=step_s,
        segments=segments,
        percent=percent,
        a2a_s=None if a2a is None else a2a * scale,
        phase_sum_share=measured / step_s,
        scale=scale,
    )


def compute_stats(run: Run) -> dict:
    s, tb, cv = run.summary, time_breakdown(run), final_load_cv(run)
    share = s.get("a2a_share")
    if share is None and tb.get("a2a") is not None and tb.get("step"):
        share = tb["a2a"] / tb["step"]
    step = s.get("median_step_s") or tb.get("step") or median(steady(run, "step_s"))
    return dict(
        tps=s.get("median_tokens_per_s") or median(steady(run, "tokens_per_s")),
        tb=tb,
        a2a_share=share,
        step=step,
        breakdown=step_breakdown(tb, tb.get("step") or step),
        peak=max_bytes(s, "peak_bytes"),
        peak_kind=s.get("peak_memory_bytes", {}).get("kind", "peak"),
        state={(k, p): max_bytes(s, k, p) for k in STATE for p in ("expert", "non_expert")},
        cv=cv,
        mean_cv=statistics.fmean(cv.values()) if cv else None,
        final_loss=s.get("final_loss", run.records[-1].get("loss") if run.records else None),
    )


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return DASH if value is None else format(value * scale, spec)


def table(runs: list[Run]) -> str:
    base = runs[0].stats["tps"]
    head = (
        f"| run | world | dp/ep/tp/pp | tokens/s | ratio to {runs[0].label} | step ms | data % | fwd % | bwd % | "
        "pipeline % | grad reduce % | optim % | other % | a2a % | peak MiB/rank | expert param MiB/rank | "
        "non-expert param MiB/rank | load CV | final loss |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        st, s = r.stats, r.summary
        pct = st["breakdown"].percent if st["breakdown"] else {}
        degrees = "/".join(str(s.get(k, "?")) for k in ("dp", "ep", "tp", "pp"))
        cells = [
            r.label,
            str(s.get("world_size", DASH)),
            degrees,
            fmt(st["tps"], ",.0f"),
            fmt(st["tps"] and base and st["tps"] / base, ".2f"),
            fmt(st["step"], ".1f", 1e3),
            *(fmt(pct.get(p), ".1f") for p in (*PHASES, OTHER)),
            fmt(st["a2a_share"], ".1f", 100),
            fmt(st["peak"], ",.0f", 1 / MIB),
            fmt(st["state"]["param_bytes", "expert"], ".2f", 1 / MIB),
            fmt(st["state"]["param_bytes", "non_expert"], ".2f", 1 / MIB),
            fmt(st["mean_cv"], ".3f"),
            fmt(st["final_loss"], ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NOTES = (
    "\nMedians skip the warm-up step (moemesh.runs.steady). Phase % (fwd, bwd, pipeline, grad reduce, optim, "
    "other) are shares of the median step and add up to 100; other is the part of the step no phase covers. "
    "a2a % is the All-to-All's share of the step, which lies inside fwd/bwd/pipeline (not added to them). "
    "Memory: max over ranks. Load CV: std/mean of tokens per expert, mean over MoE layers at the last logged step.\n"
)


def scaled_notes(runs: list[Run]) -> list[str]:
    """One line per run whose measured phases add up to more than its step (by more than the
    0.05% that a percentage with one decimal would show as 100.0%)."""
    return [
        f"{r.label}: the phases (each the slowest rank's median) add up to {100 * b.phase_sum_share:.1f}% of the "
        f"step, more than the step itself; scaled by {b.scale:.3f} so that they make 100% (other 0%)"
        for r in runs
        if (b := r.stats["breakdown"]) and b.phase_sum_share >= 1.0005
    ]


# ---- chart context and loss coincidence (pure: tested without drawing) ----


def machine_of(summary: dict) -> str | None:
    """summary.json's `machine`: a string, or {"hostname", "device"[, "count"]}; None when absent."""
    m = summary.get("machine")
    if not m:
        return None
    if isinstance(m, str):
        return m
    if isinstance(m, dict):
        host = m.get("hostname") or m.get("host")
        device = m.get("device") or m.get("gpu") or m.get("cpu")
        if device and m.get("count") and m["count"] != 1:
            device = f"{m['count']} × {device}"
        text = ", ".join(str(x) for x in (host, device) if x)
        return text or None
    return str(m)


def _device_kind(summary: dict) -> str | None:
    """What the run itself recorded about its device: the kind of its peak-memory number."""
    kind = (summary.get("peak_memory_bytes") or {}).get("kind", "")
    return "CUDA" if kind.startswith("cuda") else "CPU" if kind.startswith("cpu") else None


def _steps_text(run: Run) -> str:
    s = run.summary
    n = s.get("steps")
    if n is None and run.records:
        n = max(r.get("step", 0) for r in run.records)  # a record's step counts completed steps
    if n is None:
        return "? steps"
    start = s.get("start_step") or 0
    return f"steps {start}–{start + n}" if start else f"{n} steps"


def _per_run(runs: list[Run], texts: list[str]) -> str:
    """One text when every run has it, else "text (labels); ..." in first-seen order."""
    groups: dict[str, list[str]] = {}
    for r, t in zip(runs, texts):
        groups.setdefault(t, []).append(r.label)
    if len(groups) == 1:
        return texts[0]
    return "; ".join(f"{t} ({', '.join(labels)})" for t, labels in groups.items())


def chart_subtitle(runs: list[Run]) -> str:
    """Model, steps and machine of the runs compared, said once when they agree."""
    models = [f"model {r.summary.get('model') or 'unknown'}" for r in runs]
    machines = []
    for r in runs:
        name, kind = machine_of(r.summary), _device_kind(r.summary)
        machines.append(
            f"machine: {name}" if name else f"machine: unknown ({kind} run)" if kind else "machine: unknown"
        )
    return " · ".join(
        (_per_run(runs, models), _per_run(runs, [_steps_text(r) for r in runs]), _per_run(runs, machines))
    )


def loss_curve(run: Run) -> dict[int, float]:
    """{step: training loss} of the logged steps."""
    return {x["step"]: x["loss"] for x in run.records if x.get("loss") is not None and "step" in x}


def coinciding_losses(runs: list[Run], tol: float = COINCIDE_TOL) -> list[tuple[list[str], float, int]]:
    """Groups of runs whose loss curves coincide: (labels, max |Δ| within the group over the
    steps all of them logged, how many such steps). Two runs coincide when they share at
    least one logged step and differ by less than `tol` on every shared step; in a group every
    two runs coincide (a run joins the first group, in run order, whose every member it
    coincides with), so no two runs of a group differ by `tol` or more."""
    curves = [(r.label, loss_curve(r)) for r in runs]
    curves = [(label, c) for label, c in curves if c]

    def close(a: dict, b: dict) -> bool:
        common = a.keys() & b.keys()
        return bool(common) and max(abs(a[s] - b[s]) for s in common) < tol

    groups: list[list[int]] = []
    for i, (_, curve) in enumerate(curves):
        home = next((g for g in groups if all(close(curves[j][1], curve) for j in g)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    out = []
    for members in groups:
        if len(members) < 2:
            continue
        common = set.intersection(*(set(curves[i][1]) for i in members))
        diff = max(
            (abs(curves[i][1][s] - curves[j][1][s]) for s in common for i in members for j in members), default=0.0
        )
        out.append(([curves[i][0] for i in members], diff, len(common)))
    return out


def coincidence_notes(groups) -> list[str]:
    def names(labels):
        return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]

    return [f"{names(labels)} coincide (max |Δ| {diff:.1g} over {n} common steps)" for labels, diff, n in groups]


# ---- charts ----


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
    """Stacked phases + other = the median step; percentages inside the segments that have room."""
    done = [r for r in runs if r.stats["breakdown"]]
    if not done:
        return "no run has a step time and phase times (time_breakdown in summary.json or time in metrics.jsonl)"
    labels, bds = [r.label for r in done], [r.stats["breakdown"] for r in done]
    steps = [1e3 * b.step_s for b in bds]
    bottom = [0.0] * len(done)
    for phase in (*PHASES, OTHER):
        ms = [1e3 * b.segments.get(phase, 0.0) for b in bds]
        if not any(ms):
            continue
        bars = ax.bar(labels, ms, bottom=bottom, label=phase, color=PHASE_COLORS.get(phase))
        room = 0.05 * max(steps)  # label a segment only where its text fits
        ax.bar_label(
            bars,
            labels=[f"{b.percent[phase]:.1f}%" if m >= room else "" for b, m in zip(bds, ms)],
            label_type="center",
            fontsize=7,
        )
        bottom = [b + m for b, m in zip(bottom, ms)]
    # a2a lies inside forward/backward/pipeline: drawn over them from 0, never beyond them.
    inside = [sum(b.segments.get(p, 0.0) for p in A2A_PHASES) for b in bds]
    a2a = [1e3 * min(b.a2a_s or 0.0, span) for b, span in zip(bds, inside)]
    if any(a2a):  # a narrow hatched bar along the right edge of the stack, clear of the percentages
        right = [p.get_x() + p.get_width() for p in ax.containers[0].patches]
        ax.bar(
            right,
            a2a,
            width=-0.16,
            align="edge",
            fill=False,
            hatch="//",
            edgecolor="black",
            label="a2a (inside forward,\nbackward, pipeline)",
        )
    tops = [f"{s:,.1f} ms" + (f"\nphases ×{b.scale:.2f}" if b.scaled else "") for s, b in zip(steps, bds)]
    ax.bar_label(ax.bar(labels, steps, fill=False, linewidth=0), labels=tops, padding=2, fontsize=8)
    ax.set_ylim(0, 1.15 * max(steps))
    run_axis(ax, "time per step (ms, median)", "Step time breakdown (phases + other = step)")
    if any(b.scaled for b in bds):
        ax.text(
            0.0,
            -0.24,
            "×: the phases (each the slowest rank's) add up to more than the step; scaled to fit",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
        )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_memory(runs, ax):
    ax_state, ax_peak = ax
    labels, bottom = [r.label for r in runs], [0.0] * len(runs)
    for kind in STATE:
        for part in ("expert", "non_expert"):
            mib = [(r.stats["state"][kind, part] or 0.0) / MIB for r in runs]
            if any(mib):
                ax_state.bar(
                    labels, mib, bottom=bottom, label=f"{kind.removesuffix('_bytes')}, {part.replace('_', '-')}"
                )
                bottom = [b + m for b, m in zip(bottom, mib)]
    run_axis(ax_state, "MiB per rank (max over ranks)", "Model state per rank")
    if ax_state.get_legend_handles_labels()[0]:
        ax_state.legend(fontsize=8)
    bar_chart(
        ax_peak,
        labels,
        [(r.stats["peak"] or 0.0) / MIB for r in runs],
        f"MiB ({runs[0].stats['peak_kind']}, max over ranks)",
        "Peak memory per rank",
        ",.0f",
    )


def plot_load_cv(runs, ax):
    done = [r for r in runs if r.stats["cv"]]
    if not done:
        return "no run logged load statistics"
    for r in done:
        ax.plot(list(r.stats["cv"]), list(r.stats["cv"].values()), marker="o", label=r.label)
    ax.set_xticks(sorted({layer for r in done for layer in r.stats["cv"]}))
    ax.set(
        xlabel="MoE layer (model layer index)",
        ylabel="load CV (std / mean of tokens per expert)",
        title="Expert load imbalance at the last logged step",
    )
    ax.legend(fontsize=8)


DASHES = ["-", (0, (6, 3)), (0, (2, 2)), (0, (8, 3, 2, 3)), (0, (1, 3)), (0, (4, 2, 1, 2, 1, 2))]
MARKERS = "osD^vP*X"


def plot_loss(runs, ax, tol: float = COINCIDE_TOL):
    """Training loss per run, each with its own dash pattern and staggered markers (so a
    curve drawn over another leaves it visible); validation as open circles; a note names
    the curves that coincide."""
    done = [r for r in runs if loss_curve(r)]
    if not done:
        return "no run logged a loss"
    for i, r in enumerate(done):
        curve = loss_curve(r)
        steps = sorted(curve)
        every = max(1, len(steps) // 8)
        (line,) = ax.plot(
            steps,
            [curve[s] for s in steps],
            label=r.label,
            linestyle=DASHES[i % len(DASHES)],
            marker=MARKERS[i % len(MARKERS)],
            markersize=4,
            markevery=(i * every // len(done) % every, every),
            zorder=2 + len(done) - i,
        )
        val = [x for x in r.records if x.get("val_loss") is not None]
        if val:
            ax.plot([x["step"] for x in val], [x["val_loss"] for x in val], "o", mfc="none", color=line.get_color())
    ax.set(
        xlabel="step", ylabel="loss (cross-entropy, nats/token)", title="Loss (lines: train, open circles: validation)"
    )
    ax.legend(fontsize=8, loc="upper right")
    notes = coincidence_notes(coinciding_losses(done, tol))
    if notes:
        ax.text(
            0.02,
            0.02,
            "\n".join(notes),
            transform=ax.transAxes,
            fontsize=8,
            va="bottom",
            ha="left",
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, edgecolor="gray"),
        )


CHARTS: dict[
    str, tuple[Callable[..., str | None], int]
] = {  # file name: (plot(runs, ax) -> None, or why it was skipped; number of panels)
    "throughput.png": (
        functools.partial(
            plot_stat,
            key="tps",
            scale=1,
            ylabel="tokens/s (median)",
            spec=",.0f",
            title="Training throughput per run",
            missing="no run has tokens/s",
        ),
        1,
    ),
    "step_breakdown.png": (plot_step_breakdown, 1),
    "memory.png": (plot_memory, 2),
    "a2a_share.png": (
        functools.partial(
            plot_stat,
            key="a2a_share",
            scale=100,
            ylabel="% of step time",
            spec=".1f",
            title="All-to-All share of the step",
            missing="no run has a2a_share or time.a2a",
        ),
        1,
    ),
    "load_cv.png": (plot_load_cv, 1),
    "loss.png": (plot_loss, 1),
}


def draw(name: str, runs: list[Run], tol: float = COINCIDE_TOL):
    """(figure, None) for chart `name`, or (figure, why it was skipped); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot, panels = CHARTS[name]
    if plot is plot_loss:
        plot = functools.partial(plot_loss, tol=tol)
    fig, ax = plt.subplots(1, panels, figsize=(6.4 * panels, 4.8))
    skipped = plot(runs, ax)
    if not skipped:
        fig.suptitle(textwrap.fill(chart_subtitle(runs), width=int(95 * panels)), fontsize=9, color="dimgray")
    return fig, skipped


def write_charts(runs: list[Run], out: Path, tol: float = COINCIDE_TOL) -> list[str]:
    """Draws every chart into `out`; returns one note per chart skipped for lack of data."""
    import matplotlib.pyplot as plt

    notes = []
    for name in CHARTS:
        fig, skipped = draw(name, runs, tol)
        if skipped:
            notes.append(f"skipped {name}: {skipped}")
        else:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return notes


def never_started_notes(paths: list[Path]) -> list[str]:
    """A note for each sweep directory whose later jobs left no directory (a sweep a signal
    stopped, or a SLURM sweep whose jobs are still queued): missing from the comparison, not failed."""
    notes = []
    for p in paths:
        found = jobs_never_started(p) if not (p / "summary.json").is_file() else None
        if found and found[1]:
            total, missing = found
            shown = ", ".join(f"#{i}" for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
            notes.append(
                f"{p}: {len(missing)} of its {total} jobs left no directory ({shown}), so are not compared: "
                "still queued, or the sweep was stopped (its stop line gives the command that runs them)"
            )
    return notes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own prints the usage first)
        print(f"compare.py: {message}", file=sys.stderr)
        sys.exit(2)


def _path(text: str) -> Path:
    if not text.strip():  # Path("") is the current directory
        raise argparse.ArgumentTypeError("an empty path; give a directory")
    return Path(text)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, e.g. {COINCIDE_TOL:g}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0, e.g. {COINCIDE_TOL:g}")
    return value


def main(argv=None) -> None:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=_path, help="run directories and/or sweep directories")
    p.add_argument("--out", type=_path, help="output directory (default: see above)")
    p.add_argument(
        "--coincide-tol",
        type=_tolerance,
        default=COINCIDE_TOL,
        help=f"loss curves closer than this on every common step are reported as coinciding (default {COINCIDE_TOL:g})",
    )
    a = p.parse_args(argv)
    unfinished: list[Path] = []
    runs, left_out = [], []
    try:
        for d in expand(a.paths, unfinished):
            try:
                runs.append(load_run(d))
            except ValueError as err:  # one unreadable run: the others are still compared
                left_out.append(f"{d}: left out: {err}")
    except ValueError as err:
        print(f"compare.py: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    left_out += [
        f"{d}: left out: no summary.json, the job failed or has not finished (see its train.log)" for d in unfinished
    ]
    left_out += never_started_notes(a.paths)
    if not runs:
        print(f"compare.py: no run could be read: {'; '.join(left_out)}", file=sys.stderr)
        raise SystemExit(2)
    assign_labels(runs)
    for run in runs:
        run.stats = compute_stats(run)
    first_is_sweep = not (a.paths[0] / "summary.json").is_file()
    out = a.out or (a.paths[0] / "compare" if first_is_sweep else Path("compare"))
    md = table(runs)
    notes = [
        *left_out,
        *run_notes(runs),
        *scaled_notes(runs),
        *(f"loss: {n}" for n in coincidence_notes(coinciding_losses(runs, a.coincide_tol))),
    ]
    context = chart_subtitle(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md + NOTES + "".join(f"\n{n}\n" for n in [context, *notes]))
    except OSError as err:
        print(f"compare.py: --out {out}: cannot write there: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(md)
    print(context)
    for note in notes:
        print(note)
    for note in write_charts(runs, out, a.coincide_tol):
        print(note)
    print(f"wrote {out / 'compare.md'} and charts to {out}/")


def run_notes(runs: list[Run]) -> list[str]:
    """What a reader must know about a run before comparing it: a run a signal stopped (its
    losses and medians are a shorter run's) and lines of metrics.jsonl that were not records."""
    notes = []
    for r in runs:
        stopped = r.summary.get("stopped_by_signal")
        if stopped:
            done = (r.summary.get("start_step") or 0) + (r.summary.get("steps") or 0)
            notes.append(
                f"{r.label}: stopped by {'/'.join(stopped)} after step {done}, not finished: its final loss and "
                "medians are those of a shorter run"
            )
        if r.skipped_lines:
            first = ", ".join(map(str, r.skipped_lines[:5])) + (", ..." if len(r.skipped_lines) > 5 else "")
            notes.append(
                f"{r.label}: {len(r.skipped_lines)} line(s) of metrics.jsonl not a JSON record, skipped (line {first})"
            )
    return notes
