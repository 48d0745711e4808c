"""Fit the planner's constants to measured step phases (least squares), and say how much it helped.

The planner (``cost.py``; ``scripts/plan.py`` is its command line) prices a step as compute plus
alpha-beta collectives. For one layout it states the work of a step as ``Terms``: training FLOPs
per GPU (bubble and recompute included), and per collective kind and link class the bytes one rank
moves and the message steps (alpha counts). With constants ``Constants`` (achieved FLOP/s of three
kinds of computation that reach different rates: the routed experts' grouped GEMMs, the attention
core, softmax(QK^T)V, and the rest, the dense GEMMs of projections, FFNs, shared experts and head;
per kind and link GB/s and latency; the share of the pipeline bubble that costs time, 1 where idle
devices wait, near 0 where ranks share cores and an idle stage leaves them to the others; and two
terms a GPU plan leaves out but a measured step contains: the optimizer, priced per GB of state a
rank updates, and a fixed per-step overhead) each measured phase is predicted as

    compute   (time.forward + time.backward, or time.pipeline, less time.a2a, time.experts and
              time.attention_core)
              = (FLOPs - expert FLOPs - attention core FLOPs - bubble FLOPs) / rate
                + bubble factor x (bubble FLOPs / work FLOPs) x the work's time (every kind at its rate)
                + TP collectives + (PP) p2p + (zero2/zero3) weight all-gathers
    experts   (time.experts)      = expert FLOPs / expert rate
    attention_core (time.attention_core) = attention core FLOPs / its rate
    a2a       (time.a2a)          = All-to-All bytes / bw + steps x alpha
    sync      (time.grad_reduce)  = weight and gradient collectives over the data/expert groups
    optimizer (time.optimizer)    = state GB x optimizer s/GB
    other     (time.step less the phases above) = overhead

and the step is their sum. Every prediction is linear in the unknowns (1/rate, 1/expert rate,
1/attention core rate, bubble factor/rate, 1/bw, alpha, s/GB, overhead; the bubble's price
holds the typed rates at the previous pass's ratio to the rest's, refitted until they hold still),
so the fit is a least-squares problem over every layout's phases; each equation is divided by the
phase's measured time (timing noise is proportional to what is timed), so a small phase (the
All-to-All, the reduction) counts as much as the compute. Unknowns must be >= 0: one that comes
out negative is fixed at 0 and the rest refitted. An unknown that no measured layout exercises
(no TP layout ran: no TP bandwidth) keeps its prior value and is reported as not measured.

Why those are timed apart: on a sweep of one model every layout gives a rank the same mix of
expert, attention and other FLOPs, so from step phases alone the three rates are not identifiable
(their columns are proportional). A kind that some run did not time apart (metrics from before
time.experts and time.attention_core) is fitted at the one rate of the rest, and its own rate is
reported as not measured.

``leave_one_out`` fits on all layouts but one and predicts the one left out: the step-time error
a new layout can expect, before (the prior constants) and after calibration.

Link classes. Every collective is priced on the link its group uses: ``intra`` (inside a node) or
``inter`` (its group spans nodes), each kind with its own bandwidth and latency per class.
``one_link`` folds a layout's inter-node traffic into the intra-node keys: the one-link model, to
measure what telling the links apart buys on a multi-node sweep (``scripts/calibrate.py``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from moemesh.fields import COLLECTIVE_KINDS, LINKS


@dataclass(frozen=True)
class PlannerOptions:
    """The planner's two priors that are not config keys (``scripts/plan.py --mfu --peak-flops``):
    the model FLOP utilisation compute is assumed to reach, and the per-GPU peak FLOP/s when
    ``cluster.peak_flops`` is unset (an H100's dense bf16)."""

    mfu: float = 0.4
    peak_flops: float = 989e12

    def __post_init__(self) -> None:
        # A rate of 0 divided by zero, a negative one priced negative steps that ranked first,
        # NaN ranked first too: ValueError naming the flag.
        if not (math.isfinite(self.mfu) and 0 < self.mfu <= 1):
            raise ValueError(f"--mfu {self.mfu}: must be a number in (0, 1] (a share of the peak FLOP/s)")
        if not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise ValueError(f"--peak-flops {self.peak_flops}: must be a finite number > 0 (FLOP/s per GPU)")


KINDS = COLLECTIVE_KINDS  # the collective kinds the planner costs
# Computations timed apart (time.<kind>, runs/records.py COMPUTE_TIMES), each priced at a rate of
# its own: the Terms field with its FLOPs, the Constants (and cluster.calibration) key of its rate.
TYPED = {
    "experts": ("expert_flops", "expert_flops_per_s"),
    "attention_core": ("attention_core_flops", "attention_core_flops_per_s"),
}
PHASES = ("compute", *TYPED, "a2a", "sync", "optimizer", "other")
# The phase a run times each kind in: "sync" in time.grad_reduce (the gradients' all-reduce or
# reduce-scatter), the rest inside forward/backward: "gather" (zero2/zero3's weight all-gathers),
# TP's collectives and the pipeline's sends.
_PHASE_OF_KIND = {"a2a": "a2a", "sync": "sync", "gather": "compute", "tp": "compute", "p2p": "compute"}


@dataclass(frozen=True)
class Terms:
    """The work of one step of one layout per GPU of one pipeline stage (a plan's: the stage whose step
    is longest), as the planner counts it."""

    flops: float  # training FLOPs plus recompute, stretched by the pipeline bubble
    comm: dict[str, tuple[float, float]] = field(default_factory=dict)  # "a2a_intra": (bytes, alpha steps)
    state_bytes: float = 0.0  # parameters + gradients + optimizer state at rest: what the optimizer touches
    bubble_flops: float = 0.0  # the part of ``flops`` that is the pipeline bubble's stretch
    # The parts of ``flops`` (recompute included, the bubble's stretch not) in the routed experts
    # and in the attention core:
    expert_flops: float = 0.0
    attention_core_flops: float = 0.0

    def typed(self, kind: str) -> float:
        """The FLOPs of a computation of TYPED."""
        return getattr(self, TYPED[kind][0])


@dataclass(frozen=True)
class Constants:
    """The planner's constants: achieved compute rates, and per "<kind>_<link>" GB/s and latency."""

    flops_per_s: float  # the rest: the dense GEMMs (projections, dense FFN, shared expert, head)
    gbps: dict[str, float]
    latency_us: dict[str, float]
    optimizer_s_per_gb: float = 0.0
    step_overhead_s: float = 0.0
    bubble_factor: float = 1.0  # the share of the pipeline bubble that costs time (idle devices: 1)
    expert_flops_per_s: float | None = None  # the routed experts' (grouped GEMMs); None: flops_per_s
    attention_core_flops_per_s: float | None = None  # softmax(QK^T)V's; None: flops_per_s

    def rate(self, kind: str) -> float:
        """The FLOP/s of a computation of TYPED (the rest's where it has none of its own)."""
        return getattr(self, TYPED[kind][1]) or self.flops_per_s

    def typed_s(self, t: Terms) -> dict[str, float]:
        return {kind: t.typed(kind) / self.rate(kind) for kind in TYPED}

    def collective_s(self, key: str, nbytes: float, steps: float) -> float:
        return nbytes / (self.gbps[key] * 1e9) + steps * self.latency_us[key] * 1e-6

    def work_s(self, t: Terms) -> float:
        """The step's FLOPs without the bubble: the TYPED computations' at their rates, the rest at
        ``flops_per_s``."""
        rest = t.flops - t.bubble_flops - sum(t.typed(kind) for kind in TYPED)
        return rest / self.flops_per_s + sum(self.typed_s(t).values())

    def compute_s(self, t: Terms) -> float:
        """The work, and ``bubble_factor`` of the pipeline bubble: the bubble stretches the work (of
        every kind, at its speed) by bubble FLOPs / work FLOPs."""
        work = t.flops - t.bubble_flops
        stretch = t.bubble_flops / work if work > 0 else 0.0
        return self.work_s(t) * (1 + self.bubble_factor * stretch)

    def comm_s(self, t: Terms) -> float:
        return sum(self.collective_s(key, b, s) for key, (b, s) in t.comm.items())

    def other_s(self, t: Terms) -> float:
        """What a GPU plan leaves out (0 there) and a measured CPU step contains."""
        return t.state_bytes / 1e9 * self.optimizer_s_per_gb + self.step_overhead_s

    def phases(self, t: Terms) -> dict[str, float]:
        """The step as the phases a run times (``measured_phases``)."""
        out = dict.fromkeys(PHASES, 0.0)
        typed = self.typed_s(t)
        out.update(typed)
        out["compute"] = self.compute_s(t) - sum(typed.values())
        for key, (nbytes, steps) in t.comm.items():
            out[_PHASE_OF_KIND[key.split("_")[0]]] += self.collective_s(key, nbytes, steps)
        out["optimizer"] = t.state_bytes / 1e9 * self.optimizer_s_per_gb
        out["other"] = self.step_overhead_s
        return out

    def step_s(self, t: Terms) -> float:
        return self.compute_s(t) + self.comm_s(t) + self.other_s(t)


def one_link(t: Terms) -> Terms:
    """``t`` as a one-link model prices it: each kind's inter-node bytes and steps added to its
    intra-node ones, so one bandwidth and one latency per kind cover every link."""
    comm: dict[str, tuple[float, float]] = {}
    for key, (nbytes, steps) in t.comm.items():
        merged = f"{key.rsplit('_', 1)[0]}_intra"
        b, st = comm.get(merged, (0.0, 0.0))
        comm[merged] = (b + nbytes, st + steps)
    return dataclasses.replace(t, comm=comm)


def crosses_nodes(t: Terms, kind: str = "a2a") -> bool:
    """Whether the layout's ``kind`` collectives run over the inter-node link."""
    nbytes, steps = t.comm.get(f"{kind}_inter", (0.0, 0.0))
    return nbytes > 0 or steps > 0


def prior_constants(flops_per_s: float, intra_gbps: float, inter_gbps: float, latency_us: float) -> Constants:
    """The planner's uncalibrated constants: one bandwidth per link class, one latency."""
    gbps = {f"{k}_{l}": intra_gbps if l == "intra" else inter_gbps for k in KINDS for l in LINKS}
    return Constants(flops_per_s, gbps, dict.fromkeys(gbps, latency_us))


def measured_phases(time: dict[str, float]) -> dict[str, float]:
    """A run's median ``time.*`` (metrics.jsonl) as the phases the model predicts; "step" too;
    a TYPED computation's ("experts", "attention_core") only where the run timed it.

    Each ``time.*`` is its slowest rank's (the metrics contract), and the slowest rank differs
    between phases (one waits in the All-to-All while another computes), so the phases can add up
    to more than the step: by 8-14% on the pipeline layouts of this project's CPU sweeps. The model
    predicts the step as their sum, so such phases are scaled down together to add up to the step
    (the quantity the fit is judged on); "other" is what is left of the step when they do not."""
    get = time.get
    step = get("step", 0.0) or 0.0
    if step <= 0:
        raise ValueError("no time.step: the run's metrics have no step time to calibrate against")
    a2a = get("a2a", 0.0) or 0.0
    # None: metrics from before that kind was timed (the fit prices it at the rest's rate).
    typed = {kind: float(v) for kind in TYPED if (v := get(kind)) is not None}
    compute = (get("forward", 0.0) or 0.0) + (get("backward", 0.0) or 0.0) + (get("pipeline", 0.0) or 0.0) - a2a
    phases = {
        "compute": compute - sum(typed.values()),
        **typed,
        "a2a": a2a,
        "sync": get("grad_reduce", 0.0) or 0.0,
        "optimizer": get("optimizer", 0.0) or 0.0,
    }
    timed = sum(phases.values())
    scale = min(1.0, step / timed) if timed > 0 else 1.0
    return {**{k: v * scale for k, v in phases.items()}, "other": max(0.0, step - timed), "step": step}


def folded(phases: dict[str, float], kinds=tuple(TYPED)) -> dict[str, float]:
    """``phases`` with these TYPED computations' time put back into compute: what a run that did not
    time them apart measured (the fit then prices them at the rest's rate)."""
    out = {k: v for k, v in phases.items() if k not in kinds}
    out["compute"] = phases["compute"] + sum(phases.get(kind, 0.0) for kind in kinds)
    return out


# ---- the fit -------------------------------------------------------------------------------


def _split(terms: list[Terms], phases: list[dict[str, float]]) -> tuple[str, ...]:
    """The TYPED computations that get a rate of their own: every run timed them, some computed any."""
    return tuple(k for k in TYPED if all(k in ph for ph in phases) and any(t.typed(k) > 0 for t in terms))


def _unknowns(terms: list[Terms], fixed: frozenset[str], split: tuple[str, ...]) -> list[tuple[str, str]]:
    """(what, key) of every unknown some layout exercises: ("rate", ""), ("typed", kind) for each
    ``split`` kind, ("bubble", ""), ("beta"/"alpha", kind_link), ("optimizer", ""), ("overhead", "");
    less the ``fixed`` ones ("gbps.<key>", "latency_us.<key>")."""
    out = [("rate", "")] if any(t.flops > 0 for t in terms) else []
    out += [("typed", kind) for kind in split]
    if any(t.bubble_flops > 0 for t in terms):
        out.append(("bubble", ""))
    keys = sorted({k for t in terms for k, (b, s) in t.comm.items() if b > 0 or s > 0})
    for k in keys:
        if f"gbps.{k}" not in fixed and any(t.comm.get(k, (0, 0))[0] > 0 for t in terms):
            out.append(("beta", k))
        if f"latency_us.{k}" not in fixed and any(t.comm.get(k, (0, 0))[1] > 0 for t in terms):
            out.append(("alpha", k))
    if any(t.state_bytes > 0 for t in terms):
        out.append(("optimizer", ""))
    out.append(("overhead", ""))
    return out


def _row(
    t: Terms, phase: str, unknowns: list[tuple[str, str]], split: tuple[str, ...], ratio: dict[str, float]
) -> np.ndarray:
    """Coefficients of the phase's prediction on the unknowns (seconds per unit of each). ``ratio``:
    each split kind's speed against the rest's (rest rate / its rate), from the previous pass, which
    keeps the bubble linear: its unknown is bubble factor / rest rate, its coefficient the bubble's
    FLOPs in rest-rate equivalents."""
    row = np.zeros(len(unknowns))
    for j, (what, key) in enumerate(unknowns):
        if what == "rate" and phase == "compute":
            row[j] = t.flops - t.bubble_flops - sum(t.typed(k) for k in split)
        elif what == "typed" and phase == key:
            row[j] = t.typed(key)
        elif what == "bubble" and phase == "compute":
            work = t.flops - t.bubble_flops
            equivalent = work - sum(t.typed(k) * (1 - ratio[k]) for k in split)
            row[j] = equivalent * t.bubble_flops / work if work > 0 else 0.0
        elif what in ("beta", "alpha") and _PHASE_OF_KIND[key.split("_")[0]] == phase:
            nbytes, steps = t.comm.get(key, (0.0, 0.0))
            row[j] = nbytes if what == "beta" else steps
        elif what == "optimizer" and phase == "optimizer":
            row[j] = t.state_bytes
        elif what == "overhead" and phase == "other":
            row[j] = 1.0
    return row


def _nonneg_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every unknown >= 0: negative ones are fixed at 0 and the rest refitted."""
    free = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    while free.any():
        # Column scaling: the unknowns span ~20 orders of magnitude (s/FLOP against s/step).
        scale = np.linalg.norm(a[:, free], axis=0)
        scale[scale == 0] = 1.0
        sol = np.linalg.lstsq(a[:, free] / scale, b, rcond=None)[0] / scale
        x[:] = 0.0
        x[free] = sol
        if (sol >= 0).all():
            break
        idx = np.flatnonzero(free)
        free[idx[np.argmin(sol)]] = False
    return x


@dataclass(frozen=True)
class Fit:
    constants: Constants
    measured: dict[str, bool]  # each constant's name: fitted from data (True) or the prior kept (False)
    residual: float  # root mean square of the weighted residuals (fraction of a phase)


def _fixed_part(t: Terms, phase: str, prior: Constants, fixed: frozenset[str]) -> float:
    """The seconds of ``phase`` that the ``fixed`` constants (taken from ``prior``) account for."""
    out = 0.0
    for key, (nbytes, steps) in t.comm.items():
        if _PHASE_OF_KIND[key.split("_")[0]] != phase:
            continue
        if f"gbps.{key}" in fixed:
            out += nbytes / (prior.gbps[key] * 1e9)
        if f"latency_us.{key}" in fixed:
            out += steps * prior.latency_us[key] * 1e-6
    return out


def fit(
    terms: list[Terms], phases: list[dict[str, float]], prior: Constants, fixed: frozenset[str] = frozenset()
) -> Fit:
    """Least-squares constants for layouts with these ``terms`` that measured these ``phases``
    (``measured_phases``); unknowns that no layout exercises keep ``prior``'s value, and so do the
    ``fixed`` ones ("gbps.<key>", "latency_us.<key>": measured apart, by scripts/bench_comm.py)."""
    split = _split(terms, phases)
    # A kind some run did not time apart is priced at the rest's rate in every run: where a run
    # did time it, its time goes back into that run's compute.
    unsplit = tuple(k for k in TYPED if k not in split)
    phases = [folded(ph, unsplit) for ph in phases]
    unknowns = _unknowns(terms, fixed, split)
    x, residual = _solve(terms, phases, prior, fixed, unknowns, split)
    return _fitted(unknowns, x, residual, prior, split)


def _solve(terms, phases, prior: Constants, fixed, unknowns, split) -> tuple[np.ndarray, float]:
    """The unknowns' values (non-negative least squares, each phase weighed by 1 / its time) and
    the weighted residual. The bubble's price depends on the rate ratios: refit until they hold."""
    ratio = dict.fromkeys(split, 1.0)
    for _ in range(20):
        rows, rhs = [], []
        for t, ph in zip(terms, phases, strict=True):
            for phase in (p for p in PHASES if p in ph):
                # Timing noise is proportional to what is timed: weigh each phase by 1 / its time
                # (at least 1% of the step, so a phase near 0 cannot dominate).
                w = 1.0 / max(ph[phase], 0.01 * ph.get("step", 0.0), 1e-9)
                rows.append(_row(t, phase, unknowns, split, ratio) * w)
                rhs.append((ph[phase] - _fixed_part(t, phase, prior, fixed)) * w)
        a, b = np.array(rows), np.array(rhs)
        x = _nonneg_lstsq(a, b)
        value = dict(zip(unknowns, x, strict=True))
        rest = value.get(("rate", ""), 0.0)
        new = {k: (value[("typed", k)] / rest if rest > 0 and value[("typed", k)] > 0 else 1.0) for k in split}
        if all(abs(new[k] - ratio[k]) <= 1e-9 * max(1.0, ratio[k]) for k in split):
            break
        ratio = new
    return x, float(np.sqrt(np.mean((a @ x - b) ** 2)))


@dataclass
class _Solved:
    """The constants as the solved unknowns replace the prior's, and which of them were measured."""

    rate: float
    gbps: dict[str, float]
    latency: dict[str, float]
    opt: float
    overhead: float
    typed: dict[str, float | None]
    bubble_s_per_flop: float | None = None
    measured: dict[str, bool] = field(default_factory=dict)

    def take(self, what: str, key: str, value: float) -> bool:
        """One solved unknown (seconds per FLOP or byte) as a rate; False for a bandwidth held at 0
        (infinite: not resolved by these runs), which stays the prior's."""
        if what == "rate" and value > 0:
            self.rate, self.measured["flops_per_s"] = 1.0 / value, True
        elif what == "typed" and value > 0:
            self.typed[key], self.measured[TYPED[key][1]] = 1.0 / value, True
        elif what == "bubble":
            self.bubble_s_per_flop, self.measured["bubble_factor"] = value, True
        elif what == "beta":
            if value <= 0:
                return False
            self.gbps[key], self.measured[f"gbps.{key}"] = 1.0 / value / 1e9, True
        elif what == "alpha":
            self.latency[key], self.measured[f"latency_us.{key}"] = value * 1e6, True
        elif what == "optimizer":
            self.opt, self.measured["optimizer_s_per_gb"] = value * 1e9, True
        elif what == "overhead":
            self.overhead, self.measured["step_overhead_s"] = value, True
        return True


def _fitted(unknowns, x, residual: float, prior: Constants, split) -> Fit:
    """The constants the solved unknowns give; an unknown held at 0 keeps the prior's value and
    is not marked measured."""
    c = _Solved(
        prior.flops_per_s,
        dict(prior.gbps),
        dict(prior.latency_us),
        prior.optimizer_s_per_gb,
        prior.step_overhead_s,
        {kind: getattr(prior, TYPED[kind][1]) for kind in TYPED},
    )
    pinned = {key for (what, key), value in zip(unknowns, x) if not c.take(what, key, value)}
    for key in pinned:  # neither bandwidth nor latency resolved: the kind's cost is the prior's
        if c.latency.get(key) == 0.0 and c.measured.get(f"latency_us.{key}"):
            c.latency[key], c.measured[f"latency_us.{key}"] = prior.latency_us[key], False
    bubble = prior.bubble_factor if c.bubble_s_per_flop is None else c.bubble_s_per_flop * c.rate
    for kind in TYPED:
        if kind not in split and c.measured.get("flops_per_s"):  # fitted at the rest's rate
            c.typed[kind] = None
    rates = {TYPED[kind][1]: v for kind, v in c.typed.items()}
    return Fit(Constants(c.rate, c.gbps, c.latency, c.opt, c.overhead, bubble, **rates), c.measured, residual)


@dataclass(frozen=True)
class LeaveOneOut:
    names: list[str]
    measured_s: list[float]
    before_s: list[float]  # the prior constants' (the uncalibrated planner's) step time
    after_s: list[float]  # fitted without that layout

    @staticmethod
    def _errors(pred: list[float], meas: list[float]) -> list[float]:
        return [abs(p - m) / m for p, m in zip(pred, meas)]

    @property
    def errors_before(self) -> list[float]:
        return self._errors(self.before_s, self.measured_s)

    @property
    def errors_after(self) -> list[float]:
        return self._errors(self.after_s, self.measured_s)

    @property
    def median_before(self) -> float:
        return statistics.median(self.errors_before)

    @property
    def median_after(self) -> float:
        return statistics.median(self.errors_after)


Staged = Terms | list[Terms]  # a layout's work: one Terms, or one per pipeline stage


def _stages(x: Staged) -> list[Terms]:
    return x if isinstance(x, list) else [x]


def predict(c: Constants, x: Staged) -> float:
    """A layout's step under ``c``: its slowest stage's (the pipeline runs at that stage's pace)."""
    return max(c.step_s(t) for t in _stages(x))


def fit_staged(
    layouts: list[Staged], phases: list[dict[str, float]], prior: Constants, fixed: frozenset[str] = frozenset()
) -> tuple[Fit, list[Terms]]:
    """``fit`` for layouts given per pipeline stage: which stage is the slowest (the one a run's
    step measures) depends on the constants, so it is chosen under the prior's, the constants are
    fitted, and the choice and the fit repeated until the choice holds. Returns the fit and the
    stages it chose."""
    chosen = [max(_stages(x), key=prior.step_s) for x in layouts]
    for _ in range(10):
        f = fit(chosen, phases, prior, fixed)
        again = [max(_stages(x), key=f.constants.step_s) for x in layouts]
        if again == chosen:
            break
        chosen = again
    return f, chosen


def leave_one_out(
    names: list[str],
    layouts: list[Staged],
    phases: list[dict[str, float]],
    prior: Constants,
    before: list[float],
    fixed: frozenset[str] = frozenset(),
) -> LeaveOneOut:
    """Each layout's step predicted by constants fitted to the others. ``before``: the planner's
    uncalibrated prediction of each (its own step time, with the prior constants)."""
    after = []
    for i in range(len(layouts)):
        rest = [j for j in range(len(layouts)) if j != i]
        f, _ = fit_staged([layouts[j] for j in rest], [phases[j] for j in rest], prior, fixed)
        after.append(predict(f.constants, layouts[i]))
    return LeaveOneOut(list(names), [p["step"] for p in phases], list(before), after)


def as_cluster_fields(c: Constants, measured: dict[str, bool]) -> dict:
    """The fitted constants as ``cluster.calibration`` keys (only those fitted from data)."""
    out: dict = {"flops_per_s": c.flops_per_s if measured.get("flops_per_s") else None}
    for kind, (_, key) in TYPED.items():
        out[key] = _round(c.rate(kind)) if measured.get(key) else None
    out["gbps"] = {k: _round(v) for k, v in c.gbps.items() if measured.get(f"gbps.{k}")}
    out["latency_us"] = {k: _round(v) for k, v in c.latency_us.items() if measured.get(f"latency_us.{k}")}
    out["optimizer_s_per_gb"] = _round(c.optimizer_s_per_gb)
    out["step_overhead_s"] = _round(c.step_overhead_s)
    out["bubble_factor"] = _round(c.bubble_factor) if measured.get("bubble_factor") else None
    if out["flops_per_s"] is not None:
        out["flops_per_s"] = _round(out["flops_per_s"])
    return out


def _round(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v


def with_calibration(prior: Constants, calibration: dict | None) -> Constants:
    """``prior`` with the keys a ``cluster.calibration`` sets (None / missing: prior kept)."""
    if not calibration:
        return prior
    return dataclasses.replace(
        prior,
        flops_per_s=calibration.get("flops_per_s") or prior.flops_per_s,
        **{key: calibration.get(key) or getattr(prior, key) for _, key in TYPED.values()},
        gbps={**prior.gbps, **(calibration.get("gbps") or {})},
        latency_us={**prior.latency_us, **(calibration.get("latency_us") or {})},
        optimizer_s_per_gb=calibration.get("optimizer_s_per_gb") or 0.0,
        step_overhead_s=calibration.get("step_overhead_s") or 0.0,
        bubble_factor=prior.bubble_factor if calibration.get("bubble_factor") is None else calibration["bubble_factor"],
    )


def cluster_constants(cluster, options: PlannerOptions) -> Constants:
    """The constants a plan prices its steps with: the cluster config's priors (compute at
    ``options.mfu`` of ``cluster.peak_flops`` or ``options.peak_flops``, one bandwidth per link class,
    one latency), with what ``cluster.calibration`` fitted in their place."""
    peak = (cluster.peak_flops or options.peak_flops) * options.mfu
    prior = prior_constants(peak, cluster.intra_node_gbps, cluster.inter_node_gbps, cluster.latency_us)
    return with_calibration(prior, dataclasses.asdict(cluster.calibration))


_LABEL = {"experts": "routed experts", "attention_core": "attention core"}


def constants_line(cluster, options: PlannerOptions) -> str:
    """Which constants priced a plan: the calibrated ones and their source, or the priors."""
    cal, k = cluster.calibration, cluster_constants(cluster, options)
    rates = (cal.flops_per_s, cal.expert_flops_per_s, cal.attention_core_flops_per_s, cal.bubble_factor)
    nothing = all(r is None for r in rates) and not cal.gbps and not cal.latency_us
    if nothing and not cal.optimizer_s_per_gb and not cal.step_overhead_s:
        peak = "cluster.peak_flops" if cluster.peak_flops else "--peak-flops"
        return (
            f"constants: uncalibrated: compute {k.flops_per_s / 1e12:,.4g} TFLOP/s ({peak} x --mfu {options.mfu:g}), "
            f"{cluster.intra_node_gbps:g} GB/s in a node, {cluster.inter_node_gbps:g} GB/s between nodes, "
            f"latency {cluster.latency_us:g} us (cluster=calibrated/<name> after scripts/calibrate.py)"
        )
    parts = [f"compute {k.flops_per_s / 1e9:,.4g} GFLOP/s" + ("" if cal.flops_per_s else " (prior)")]
    for kind, (_, key) in TYPED.items():
        own = f"{k.rate(kind) / 1e9:,.4g} GFLOP/s" if getattr(cal, key) else "at the same rate"
        parts += [f"{_LABEL[kind]} {own}"]
    parts += [f"{key} {cal.gbps[key]:.4g} GB/s" for key in sorted(cal.gbps)]
    parts += [f"{key} latency {cal.latency_us[key]:.4g} us" for key in sorted(cal.latency_us)]
    parts += [f"optimizer {k.optimizer_s_per_gb:.4g} s/GB", f"overhead {k.step_overhead_s * 1e3:.4g} ms/step"]
    parts += [f"bubble x{k.bubble_factor:.3g}"]
    rest = sorted(set(k.gbps) - set(cal.gbps))
    prior = f"; the rest ({', '.join(rest)}) from cluster.*_gbps and latency_us" if rest else ""
    return f"constants: calibrated ({cal.source or 'cluster.calibration'}): {', '.join(parts)}{prior}"


# What scripts/bench_comm.py times, fitted into the planner's constants ------------------------------
# The planner's collective kinds and the collectives each stands for. "sync" reduces gradients: a
# ring all-reduce under parallel.sharding=none, a reduce-scatter under zero2 and zero3, fitted over
# both (each in the planner's bytes and steps for it); "gather": zero2/zero3's weight all-gathers;
# "tp": TP's all-reduces.
BENCH_KINDS = {
    "a2a": ("a2a",),
    "sync": ("all_reduce", "reduce_scatter"),
    "gather": ("all_gather",),
    "tp": ("all_reduce",),
    "p2p": ("p2p",),
}


def collective(kind: str, nbytes: float, n: int) -> tuple[float, int]:
    """(bytes a rank sends, message steps) the planner prices one collective at, over ``n`` ranks:
    a ring all-reduce moves 2 (n-1)/n of the buffer in 2 (n-1) steps, a reduce-scatter or an
    all-gather (n-1)/n in n - 1, an All-to-All the ``nbytes`` that leave the rank in n - 1, a
    point-to-point send its bytes in 1. ``constants_from_bench`` fits scripts/bench_comm.py's times with these."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes, 2 * (n - 1)
    if kind in ("reduce_scatter", "all_gather"):
        return (n - 1) / n * nbytes, n - 1
    if kind == "a2a":
        return nbytes, n - 1
    if kind == "p2p":
        return nbytes, 1
    raise ValueError(f"collective {kind!r}: one of all_reduce, reduce_scatter, all_gather, a2a, p2p")


def fit_link(xs: list[tuple[float, float]], ts: list[float]) -> tuple[float, float]:
    """Least squares ``t = bytes / bw + steps x alpha`` with both >= 0, over (bytes, steps) rows:
    (GB/s, latency us)."""
    a, t = np.array(xs, dtype=float), np.array(ts)
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    inv_bw, alpha = np.linalg.lstsq(a / scale, t, rcond=None)[0] / scale
    if inv_bw < 0:
        inv_bw, alpha = 0.0, float(np.sum(a[:, 1] * t) / np.sum(a[:, 1] ** 2))
    elif alpha < 0:
        inv_bw, alpha = float(np.sum(a[:, 0] * t) / np.sum(a[:, 0] ** 2)), 0.0
    return (1.0 / inv_bw / 1e9 if inv_bw > 0 else float("inf")), float(alpha) * 1e6


def bench_row_terms(row: dict) -> tuple[float, int]:
    """(bytes sent, message steps) the planner prices one timed collective at: the planner's own
    formulas (``cost.collective``) on the bytes that left the timed rank (``sent``; an All-to-All
    keeps its own split, so it sends less than its buffer; ValueError for one without it)."""
    if row["kind"] == "a2a" and "sent" not in row:
        raise ValueError("an a2a result without 'sent' (the bytes that left the timed rank): rerun bench_comm.py")
    return collective(row["kind"], row.get("sent", row["bytes"]), row["n"])


def constants_from_bench(results: list[dict]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``cluster.calibration``'s gbps and latency_us for the planner's kinds and link classes from a
    scripts/bench_comm.py run: per kind and link, one line fitted over every group shape and size of
    its collectives (the shapes vary the steps apart from the bytes); and the kinds left out because
    their larger messages took no longer (no bandwidth to fit: an infinite one, whose latency-only
    line would misprice the prior's bytes), which keep the prior's constants."""
    gbps, latency, unresolved = {}, {}, []
    for link in LINKS:
        for kind, collectives in BENCH_KINDS.items():
            rows = [r for r in results if r["kind"] in collectives and r.get("link", "intra") == link]
            if len(rows) < 2:
                continue
            bw, lat = fit_link([bench_row_terms(r) for r in rows], [r["s"] for r in rows])
            if math.isinf(bw):
                unresolved.append(f"{kind}_{link}")
                continue
            gbps[f"{kind}_{link}"], latency[f"{kind}_{link}"] = bw, lat
    return {"gbps": gbps, "latency_us": latency}, unresolved
