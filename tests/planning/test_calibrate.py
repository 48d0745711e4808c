"""Calibration: least squares recovers the planner's constants from measurements that the planner's
own model generates (with noise), stays put when a layout is left out, keeps the prior for what no
layout exercises; the planner prices its steps with the calibrated constants and says which it used."""

import copy
import dataclasses
import random
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

from moemesh.config.cli import compose_run  # noqa: E402
from moemesh.config.schema import CalibrationConfig  # noqa: E402
from moemesh.planning import calibration as cal  # noqa: E402
from moemesh.planning import cost as plan  # noqa: E402
from tests.helpers import yaml_alias_bomb  # noqa: E402

ARGS = cal.PlannerOptions()


@pytest.fixture(autouse=True, scope="module")
def _each_job_composed_once():
    """calibrate.py composes every job of a sweep (about 0.1 s each); the tests here load the same
    sweeps' jobs again and again. Each override list is composed once, and each caller gets a copy."""
    from scripts import calibrate

    composed: dict[tuple[str, ...], object] = {}

    def compose_once(overrides):
        key = tuple(overrides)
        if key not in composed:
            composed[key] = compose_run(list(key))
        return copy.deepcopy(composed[key])

    patch = pytest.MonkeyPatch()
    patch.setattr(calibrate, "compose_run", compose_once)
    yield
    patch.undo()


# Magnitudes like this 2-core CPU's under gloo (scripts/calibrate.py on a real sweep): GFLOP/s,
# sub-GB/s collectives with latencies of hundreds of microseconds.
TRUE = cal.Constants(
    flops_per_s=5e9,
    expert_flops_per_s=2e9,  # grouped GEMMs of a few rows each run slower than the dense matmuls
    attention_core_flops_per_s=1e9,
    gbps={"a2a_intra": 0.5, "sync_intra": 0.5, "tp_intra": 0.2, "p2p_intra": 0.1},
    latency_us={"a2a_intra": 300.0, "sync_intra": 300.0, "tp_intra": 50.0, "p2p_intra": 200.0},
    optimizer_s_per_gb=0.4,
    step_overhead_s=0.02,
    bubble_factor=0.5,
)
PRIOR = cal.prior_constants(989e12 * 0.4, 450.0, 50.0, 10.0)
# The constants whose phase a run times on its own (compute, time.a2a, time.grad_reduce, optimizer,
# the rest). TP and point-to-point collectives are timed only inside the compute phase, where at
# these sizes they are a few ms of ~500 ms: 1% noise on the phase hides them (checked noise-free).
SEPARATE = [
    "flops_per_s",
    "expert_flops_per_s",
    "attention_core_flops_per_s",
    "gbps.a2a_intra",
    "latency_us.a2a_intra",
    "gbps.sync_intra",
    "latency_us.sync_intra",
]
SEPARATE += ["optimizer_s_per_gb", "step_overhead_s", "bubble_factor"]


def _value(c: cal.Constants, name: str) -> float:
    if "." in name:
        table, key = name.split(".")
        return getattr(c, table)[key]
    return getattr(c, name)


@pytest.fixture(scope="module")
def layouts():
    """Every valid split of the tiny model at 8 and 4 ranks and three batch sizes (bandwidth and
    latency separate only when message sizes and counts vary apart): (names, Terms)."""
    names, terms = [], []
    for gpus, batch in ((8, 16), (8, 32), (8, 64), (4, 16), (4, 32)):
        run = compose_run(
            [
                f"cluster.gpus={gpus}",
                "trainer.device=cpu",
                "trainer.micro_steps=2",
                f"trainer.global_batch_size={batch}",
            ]
        )
        valid, _ = plan.make_plan(run, gpus, ARGS)
        names += [f"{plan.layout_name(p.dims)}@{gpus}x{batch}" for p in valid]
        terms += [p.terms for p in valid]
    assert len(terms) >= 40
    return names, terms


def _measure(terms, noise: float, seed: int = 0):
    """Each phase as the true constants predict it, times (1 + noise x N(0, 1))."""
    rng = random.Random(seed)
    out = []
    for t in terms:
        ph = {k: v * (1 + noise * rng.gauss(0, 1)) for k, v in TRUE.phases(t).items()}
        ph["step"] = sum(ph.values())
        out.append(ph)
    return out


def test_recovers_every_constant_without_noise(layouts):
    _, terms = layouts
    f = cal.fit(terms, _measure(terms, 0.0), PRIOR)
    names = [*SEPARATE, "gbps.tp_intra", "latency_us.tp_intra", "gbps.p2p_intra", "latency_us.p2p_intra"]
    for name in names:
        assert _value(f.constants, name) == pytest.approx(_value(TRUE, name), rel=1e-6), name
        assert f.measured[name]
    assert f.residual < 1e-9


def test_recovers_the_separately_timed_constants_within_5_percent_under_noise(layouts):
    _, terms = layouts
    f = cal.fit(terms, _measure(terms, 0.01), PRIOR)
    for name in SEPARATE:
        assert _value(f.constants, name) == pytest.approx(_value(TRUE, name), rel=0.05), name
    # What the fit cannot separate it still prices right in sum: every step within 2%.
    for t in terms:
        assert f.constants.step_s(t) == pytest.approx(TRUE.step_s(t), rel=0.02)


def test_stable_with_one_layout_left_out(layouts):
    names, terms = layouts
    phases = _measure(terms, 0.01)
    for i in range(len(terms)):
        rest = [j for j in range(len(terms)) if j != i]
        f = cal.fit([terms[j] for j in rest], [phases[j] for j in rest], PRIOR)
        for name in SEPARATE:
            assert _value(f.constants, name) == pytest.approx(_value(TRUE, name), rel=0.05), (names[i], name)
    loo = cal.leave_one_out(names, terms, phases, PRIOR, [PRIOR.step_s(t) for t in terms])
    assert loo.median_after < 0.02
    assert loo.median_before > 0.99  # the GPU priors price a CPU step at almost nothing


def test_unexercised_constants_keep_the_prior(layouts):
    names, terms = layouts
    no_ep = [t for n, t in zip(names, terms) if "ep" not in n.split("@")[0]]
    f = cal.fit(no_ep, _measure(no_ep, 0.0), PRIOR)
    assert "gbps.a2a_intra" not in f.measured and "latency_us.a2a_intra" not in f.measured
    assert f.constants.gbps["a2a_intra"] == PRIOR.gbps["a2a_intra"]
    assert f.constants.gbps["a2a_inter"] == PRIOR.gbps["a2a_inter"]  # one node: nothing crosses
    fields = cal.as_cluster_fields(f.constants, f.measured)
    assert "a2a_intra" not in fields["gbps"] and fields["gbps"]["sync_intra"] == pytest.approx(0.5, rel=1e-5)


def test_unknowns_stay_non_negative():
    # The All-to-All phase shrinks as its bytes grow: unconstrained least squares would give a
    # negative bandwidth inverse; it is held at 0 and the latency refitted. A bandwidth held at 0
    # (infinite) is not resolved by these runs: the prior's stays, reported as not measured.
    terms = [cal.Terms(1e9, {"a2a_intra": (b, 10.0)}) for b in (1e6, 2e6, 3e6)]
    phases = [
        {"compute": 0.2, "a2a": a, "sync": 0.0, "optimizer": 0.0, "other": 0.0, "step": 0.2 + a}
        for a in (0.012, 0.011, 0.010)
    ]
    f = cal.fit(terms, phases, PRIOR)
    assert f.constants.gbps["a2a_intra"] == PRIOR.gbps["a2a_intra"] and not f.measured.get("gbps.a2a_intra")
    assert f.constants.latency_us["a2a_intra"] == pytest.approx(1100.0, rel=0.05)
    assert "a2a_intra" not in cal.as_cluster_fields(f.constants, f.measured)["gbps"]


def test_without_the_typed_times_one_rate_prices_every_flop(layouts):
    """Runs from before time.experts and time.attention_core: their time is inside compute. On
    one model every layout has the same mix of expert, attention core and other FLOPs, so one
    rate prices them all; the typed rates are not measured, not written, and the planner prices
    those FLOPs at the one rate."""
    _, terms = layouts
    folded = []
    for ph in _measure(terms, 0.0):
        ph = dict(ph)
        ph["compute"] += ph.pop("experts") + ph.pop("attention_core")
        folded.append(ph)
    f = cal.fit(terms, folded, PRIOR)
    assert f.measured["flops_per_s"]
    assert not {"expert_flops_per_s", "attention_core_flops_per_s"} & set(f.measured)
    assert f.constants.expert_flops_per_s is None and f.constants.rate("experts") == f.constants.flops_per_s
    assert TRUE.rate("attention_core") < f.constants.flops_per_s < TRUE.flops_per_s  # a blend
    fields = cal.as_cluster_fields(f.constants, f.measured)
    assert fields["expert_flops_per_s"] is None and fields["attention_core_flops_per_s"] is None
    for t in terms:
        assert f.constants.step_s(t) == pytest.approx(TRUE.step_s(t), rel=1e-6)
    # Timed apart, the same runs give each its rate.
    apart = cal.fit(terms, _measure(terms, 0.0), PRIOR)
    fields = cal.as_cluster_fields(apart.constants, apart.measured)
    assert fields["expert_flops_per_s"] == pytest.approx(2e9)
    assert fields["attention_core_flops_per_s"] == pytest.approx(1e9)


def test_runs_that_timed_a_kind_mixed_with_runs_that_did_not_fit_as_one_rate(layouts):
    """An older sweep without time.experts calibrated with a newer one: the experts are priced at
    the rest's rate in every run, so the runs that timed them count that time as compute."""
    _, terms = layouts
    timed = _measure(terms, 0.0)
    mixed = [
        ph if i % 2 else {k: v for k, v in ph.items() if k != "experts"} | {"compute": ph["compute"] + ph["experts"]}
        for i, ph in enumerate(timed)
    ]
    folded = [
        {k: v for k, v in ph.items() if k != "experts"} | {"compute": ph["compute"] + ph["experts"]} for ph in timed
    ]
    a, b = cal.fit(terms, mixed, PRIOR), cal.fit(terms, folded, PRIOR)
    assert "expert_flops_per_s" not in a.measured and a.constants.expert_flops_per_s is None
    assert a.constants == b.constants and a.residual == pytest.approx(b.residual)
    assert a.constants.attention_core_flops_per_s == pytest.approx(1e9, rel=1e-6)


def test_measured_phases_take_the_typed_computations_out_of_compute():
    t = {"forward": 0.2, "backward": 0.3, "pipeline": 0.0, "a2a": 0.1, "experts": 0.15, "attention_core": 0.05}
    ph = cal.measured_phases({**t, "grad_reduce": 0.05, "optimizer": 0.04, "step": 0.62})
    assert ph["compute"] == pytest.approx(0.2) and ph["experts"] == 0.15 and ph["attention_core"] == 0.05
    assert ph["other"] == pytest.approx(0.03)
    assert not {"experts", "attention_core"} & set(cal.measured_phases({"forward": 0.2, "step": 0.3}))


def test_measured_phases_keep_a_typed_time_of_zero():
    """A run that timed its routed experts at 0 s timed them (a dense model's): the phase is there,
    so the runs of a sweep that mixes it with MoE runs still fit the experts' rate apart."""
    ph = cal.measured_phases({"forward": 0.2, "experts": 0.0, "attention_core": 0.05, "step": 0.3})
    assert ph["experts"] == 0.0 and ph["compute"] == pytest.approx(0.15)


def test_cluster_peak_flops_overrides_the_flag_and_an_uncalibrated_rate_is_the_prior():
    """``--peak-flops`` is only for a cluster without ``peak_flops``; a calibration that fitted
    links but no compute rate says the compute rate it prices with is the prior's."""
    run = compose_run(["cluster.gpus=4", "trainer.device=cpu"])
    calibration = CalibrationConfig(source="links", gbps={"a2a_intra": 0.5}, latency_us={"a2a_intra": 300.0})
    cluster = dataclasses.replace(run.cluster, peak_flops=2e12, calibration=calibration)
    assert cal.cluster_constants(cluster, ARGS).flops_per_s == pytest.approx(2e12 * ARGS.mfu, rel=1e-12)
    line = cal.constants_line(cluster, ARGS)
    assert line.startswith("constants: calibrated (links): compute 800 GFLOP/s (prior), routed experts at the same")


def test_measured_phases_add_up_to_the_step():
    t = {"forward": 0.2, "backward": 0.3, "pipeline": 0.0, "a2a": 0.1, "grad_reduce": 0.05, "optimizer": 0.04}
    ph = cal.measured_phases({**t, "step": 0.62})
    assert ph["compute"] == pytest.approx(0.4) and ph["a2a"] == 0.1 and ph["other"] == pytest.approx(0.03)
    assert sum(v for k, v in ph.items() if k != "step") == pytest.approx(ph["step"])


def test_planner_prices_with_the_calibrated_constants_and_says_so():
    run = compose_run(["cluster.gpus=4", "trainer.device=cpu"])
    before, _ = plan.make_plan(run, 4, ARGS)
    assert "constants: uncalibrated" in cal.constants_line(run.cluster, ARGS)
    calibration = CalibrationConfig(
        source="test",
        flops_per_s=5e9,
        expert_flops_per_s=2e9,
        attention_core_flops_per_s=1e9,
        gbps={"a2a_intra": 0.5, "sync_intra": 0.5},
        latency_us={"a2a_intra": 300.0, "sync_intra": 300.0},
        optimizer_s_per_gb=0.4,
        step_overhead_s=0.02,
    )
    calibrated = dataclasses.replace(run, cluster=dataclasses.replace(run.cluster, calibration=calibration))
    after, _ = plan.make_plan(calibrated, 4, ARGS)
    k = cal.cluster_constants(calibrated.cluster, ARGS)
    for p in after:
        assert p.step_s == pytest.approx(k.step_s(p.terms), rel=1e-12)
        assert p.step_s > 0.05  # a CPU's step, not a GPU's
    assert [p.dims for p in after] != [p.dims for p in before]  # the ranking follows the constants
    line = cal.constants_line(calibrated.cluster, ARGS)
    assert line.startswith(
        "constants: calibrated (test): compute 5 GFLOP/s, routed experts 2 GFLOP/s, attention core 1 GFLOP/s"
    )
    for p in after:  # the routed experts' and the attention core's FLOPs at their rates, the rest at the other
        e, a = p.terms.expert_flops, p.terms.attention_core_flops
        assert 0 < e and 0 < a and e + a < p.terms.flops
        work = p.terms.flops - p.terms.bubble_flops  # the bubble (factor 1 here) stretches every kind alike
        expected = ((work - e - a) / 5e9 + e / 2e9 + a / 1e9) * p.terms.flops / work
        assert p.compute_s == pytest.approx(expected, rel=1e-9)
    assert "a2a_intra 0.5 GB/s" in line and "the rest (a2a_inter" in line and "tp_intra" in line
    # Uncalibrated, the planner's own prices: compute at --mfu of peak, one bandwidth per link class.
    prior = cal.cluster_constants(run.cluster, ARGS)
    for p in before:
        assert p.other_s == 0.0 and p.compute_s == pytest.approx(p.terms.flops / (989e12 * 0.4), rel=1e-12)
        assert p.step_s == pytest.approx(prior.step_s(p.terms), rel=1e-12)


def test_phases_timed_on_different_slowest_ranks_are_scaled_to_the_step():
    # Each time.* is its slowest rank's: here they add up to 0.70 s for a 0.56 s step.
    t = {"forward": 0.2, "backward": 0.3, "pipeline": 0.0, "a2a": 0.1, "grad_reduce": 0.15, "optimizer": 0.05}
    ph = cal.measured_phases({**t, "step": 0.56})
    assert ph["compute"] == pytest.approx(0.4 * 0.8) and ph["sync"] == pytest.approx(0.15 * 0.8)
    assert ph["other"] == 0.0 and sum(v for k, v in ph.items() if k != "step") == pytest.approx(0.56)
    with pytest.raises(ValueError, match="no time.step"):
        cal.measured_phases(t)


def test_collectives_measured_apart_stay_fixed(layouts):
    # --calibrate-from a bench_comm.py file: its bandwidths and latencies are kept, the rest fitted.
    _, terms = layouts
    fixed = frozenset(f"{t}.{k}_intra" for t in ("gbps", "latency_us") for k in ("a2a", "sync"))
    prior = dataclasses.replace(
        PRIOR, gbps={**PRIOR.gbps, **TRUE.gbps}, latency_us={**PRIOR.latency_us, **TRUE.latency_us}
    )
    f = cal.fit(terms, _measure(terms, 0.0), prior, fixed)
    assert not fixed & set(f.measured)
    assert f.constants.gbps["a2a_intra"] == 0.5 and f.constants.latency_us["sync_intra"] == 300.0
    for name in ("flops_per_s", "gbps.tp_intra", "latency_us.p2p_intra", "optimizer_s_per_gb", "step_overhead_s"):
        assert _value(f.constants, name) == pytest.approx(_value(TRUE, name), rel=1e-6), name


def test_leave_one_out_predicts_each_layout_from_the_others_only():
    """Two overhead-only layouts: left out, each is predicted by the other's overhead alone (a fit
    that saw the layout it predicts would land between the two), and its error is relative to what
    was measured, not to the prediction."""
    terms = [cal.Terms(0.0), cal.Terms(0.0)]
    phases = [{"compute": 0.0, "other": o, "step": o} for o in (0.01, 0.03)]
    loo = cal.leave_one_out(["a", "b"], terms, phases, PRIOR, [0.0, 0.0])
    assert loo.after_s == pytest.approx([0.03, 0.01], rel=1e-9)
    assert loo.errors_after == pytest.approx([2.0, 2 / 3], rel=1e-9)
    assert loo.errors_before == [1.0, 1.0]


def test_each_phase_counts_by_its_relative_error_and_a_tiny_one_as_1_percent_of_the_step():
    """One unknown (the overhead) over three steps of 1 s whose "other" took 5, 10 and 30 ms:
    each equation is divided by its phase's time, floored at 1% of the step (10 ms), so the fit is
    the mean weighted by 1 / floored time squared (unweighted it would be 15 ms). A fit that
    exercised no compute keeps the prior's rates, its own rates for the routed experts included."""
    others = (0.005, 0.01, 0.03)
    prior = dataclasses.replace(PRIOR, expert_flops_per_s=2e9)
    f = cal.fit([cal.Terms(0.0)] * 3, [{"compute": 0.0, "other": o, "step": 1.0} for o in others], prior)
    w2 = [1 / max(o, 0.01) ** 2 for o in others]
    expected = sum(w * o for w, o in zip(w2, others)) / sum(w2)
    assert f.constants.step_overhead_s == pytest.approx(expected, rel=1e-9)
    assert f.measured == {"step_overhead_s": True}
    assert f.constants.flops_per_s == prior.flops_per_s and f.constants.expert_flops_per_s == 2e9


def test_a_collective_that_took_no_time_keeps_the_prior_latency():
    """An All-to-All phase of 0 s: bandwidth held at infinity and latency at 0 say nothing about the
    link, so the prior's latency stays and is reported as not measured (not a free collective)."""
    terms = [cal.Terms(1e9, {"a2a_intra": (b, 10.0)}) for b in (1e6, 2e6, 3e6)]
    phases = [{"compute": 0.2, "a2a": 0.0, "other": 0.0, "step": 0.2}] * 3
    f = cal.fit(terms, phases, PRIOR)
    assert f.constants.latency_us["a2a_intra"] == PRIOR.latency_us["a2a_intra"]
    assert not f.measured["latency_us.a2a_intra"] and "gbps.a2a_intra" not in f.measured


def test_only_fitted_constants_are_written_to_the_cluster_config():
    """Nothing measured: no rate, no bandwidth, no latency and no bubble factor is written (the
    prior's would pass for calibrated ones)."""
    fields = cal.as_cluster_fields(PRIOR, {})
    assert fields["flops_per_s"] is None and fields["bubble_factor"] is None
    assert fields["expert_flops_per_s"] is None and fields["attention_core_flops_per_s"] is None
    assert fields["gbps"] == {} and fields["latency_us"] == {}


def test_a_pipeline_step_is_its_slowest_stage_under_the_fitted_constants():
    """Per stage, a compute-heavy stage and an All-to-All-heavy one: the GPU prior prices the
    All-to-All one slower, the measured (CPU) constants the compute one. The stage a step measures
    is chosen under the fitted constants, so the fit recovers them; ``predict`` takes the slowest."""
    true = dataclasses.replace(
        PRIOR,
        flops_per_s=5e9,
        gbps={**PRIOR.gbps, "a2a_intra": 0.5},
        latency_us={**PRIOR.latency_us, "a2a_intra": 300.0},
        step_overhead_s=0.02,
    )
    light = cal.Terms(1e6, {"a2a_intra": (5e7, 3)})
    heavy = [cal.Terms(f, {"a2a_intra": (b, s)}) for f, b, s in ((1e9, 1e6, 3), (2e9, 4e6, 7), (1.5e9, 2e6, 12))]
    layouts = [[light, t] for t in heavy]
    phases = [true.phases(t) | {"step": true.step_s(t)} for t in heavy]
    assert all(PRIOR.step_s(t) < PRIOR.step_s(light) for t in heavy)
    f, chosen = cal.fit_staged(layouts, phases, PRIOR)
    assert chosen == heavy
    for name in ("flops_per_s", "gbps.a2a_intra", "latency_us.a2a_intra", "step_overhead_s"):
        assert _value(f.constants, name) == pytest.approx(_value(true, name), rel=1e-6), name
    for x, t in zip(layouts, heavy):
        assert cal.predict(f.constants, x) == pytest.approx(true.step_s(t), rel=1e-6) and true.step_s(t) > true.step_s(
            light
        )


def test_one_link_adds_inter_node_bytes_and_steps_to_the_intra_node_ones():
    """The one-link model: each kind's traffic over both links under its intra-node key."""
    t = cal.Terms(1e9, {"a2a_intra": (1e6, 3.0), "a2a_inter": (2e6, 4.0), "sync_inter": (5e5, 6.0)})
    assert cal.one_link(t).comm == {"a2a_intra": (3e6, 7.0), "sync_intra": (5e5, 6.0)}


def test_latency_only_inter_node_traffic_crosses_nodes():
    """Messages between nodes with no bytes counted (only their steps) still cross the inter-node
    link; nothing on it does not."""
    assert cal.crosses_nodes(cal.Terms(1e9, {"a2a_inter": (0.0, 3.0)}))
    assert cal.crosses_nodes(cal.Terms(1e9, {"sync_inter": (1e6, 0.0)}), "sync")
    assert not cal.crosses_nodes(cal.Terms(1e9, {"a2a_intra": (1e6, 3.0), "a2a_inter": (0.0, 0.0)}))


def _fake_sweep(tmp_path: Path, batch: int, extra: tuple[str, ...] = (), name: str = "") -> Path:
    """A layout sweep's files (layouts.json, each job's .hydra/overrides.yaml) whose phase times
    are TRUE's prediction for every valid 4-rank split of the tiny model."""
    import json

    sweep = tmp_path / (name or f"sweep{batch}")
    base = ["cluster.gpus=4", "trainer.micro_steps=4", f"trainer.global_batch_size={batch}", *extra]
    run = compose_run([*base, "trainer.device=cpu"])
    valid, _ = plan.make_plan(run, 4, ARGS)
    jobs = []
    for i, p in enumerate(valid):
        d = sweep / f"{i}_{plan.layout_name(p.dims)}"
        (d / ".hydra").mkdir(parents=True)
        overrides = [*plan.train_command(run, base, p.dims)[2:]]
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        ph = TRUE.phases(p.terms)
        inside = ph["compute"] + ph["experts"] + ph["attention_core"]
        time = {"forward": inside / 2, "backward": inside / 2 + ph["a2a"], "a2a": ph["a2a"]}
        time |= {"experts": ph["experts"], "attention_core": ph["attention_core"]}
        time |= {"pipeline": 0.0, "grad_reduce": ph["sync"], "optimizer": ph["optimizer"], "step": sum(ph.values())}
        dims = dataclasses.asdict(p.dims)
        jobs.append({"layout": plan.layout_name(p.dims), "dir": str(d), "dims": dims, "phases": time, "error": None})
    (sweep / "layouts.json").write_text(json.dumps({"device": "cpu", "jobs": jobs}))
    return sweep


@pytest.mark.slow  # end to end (a script, or a fresh interpreter): a few seconds
def test_calibrate_script_fits_a_sweep_and_writes_a_cluster_config(tmp_path, capsys):
    from scripts import calibrate

    sweeps = [_fake_sweep(tmp_path, 16), _fake_sweep(tmp_path, 32)]
    name = f"test-{tmp_path.name}"
    out = ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml"
    try:
        calibrate.main([*map(str, sweeps), "--name", name])
        text, err = capsys.readouterr()
        assert "warning" not in err, err  # more jobs than constants
        assert "leave-one-out step-time error: median 100% uncalibrated, 0.0% calibrated" in text
        assert f"wrote conf/cluster/calibrated/{name}.yaml" in text
        run = compose_run([f"cluster=calibrated/{name}", "cluster.gpus=4", "trainer.device=cpu"])
        assert run.cluster.launcher == "local" and run.cluster.calibration.flops_per_s == pytest.approx(5e9)
        assert run.cluster.calibration.gbps["a2a_intra"] == pytest.approx(0.5, rel=1e-5)
        assert cal.constants_line(run.cluster, ARGS).startswith("constants: calibrated (")
    finally:
        out.unlink(missing_ok=True)


def test_fewer_jobs_than_fitted_constants_are_warned_about(tmp_path, capsys):
    import json

    from scripts import calibrate

    sweep = _fake_sweep(tmp_path, 16)
    listing = json.loads((sweep / "layouts.json").read_text())
    listing["jobs"] = listing["jobs"][:3]
    (sweep / "layouts.json").write_text(json.dumps(listing))
    calibrate.main([str(sweep)])
    out, err = capsys.readouterr()
    assert "3 jobs" in out
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and " constants fitted to 3 job(s); with fewer jobs than constants" in warning[0], err


@pytest.mark.parametrize(("mode", "ratio"), [("zero2", 1), ("zero3", 2)])
def test_sharded_plans_price_weight_gathers_inside_compute(mode, ratio):
    """zero2/zero3: the gradients' reduce-scatter is "sync" (a run's time.grad_reduce), the weights'
    all-gathers are "gather", which runs inside forward and backward: the fit prices it as compute."""
    from moemesh.parallel.dims import ParallelDims

    run = compose_run(["parallel=ep2_dp2", f"parallel.sharding={mode}", "cluster.gpus=4", "trainer.device=cpu"])
    p = plan.plan_one(run, ParallelDims(dp=2, ep=2), ARGS)
    (sync_b, sync_steps), (gather_b, gather_steps) = p.terms.comm["sync_intra"], p.terms.comm["gather_intra"]
    # fp32 on the CPU: each gather moves the 4-byte weights the reduce-scatter moves as 4-byte gradients.
    assert gather_b == pytest.approx(ratio * sync_b) and gather_steps == ratio * sync_steps
    k = cal.prior_constants(5e9, 1.0, 1.0, 100.0)
    phases = k.phases(p.terms)
    assert phases["sync"] == pytest.approx(k.collective_s("sync_intra", sync_b, sync_steps))
    without = dataclasses.replace(p.terms, comm={key: v for key, v in p.terms.comm.items() if key != "gather_intra"})
    gathered = k.collective_s("gather_intra", gather_b, gather_steps)
    assert phases["compute"] == pytest.approx(k.phases(without)["compute"] + gathered)


def test_collectives_held_from_a_benchmark_are_written_with_the_fit(tmp_path, capsys):
    """--calibrate-from with sweeps: the benchmark's bandwidths and latencies, held fixed in the fit,
    are written beside the fitted constants (a latency fitted next to a bandwidth needs it)."""
    import json

    from scripts import calibrate

    results = []
    for kind, key in (("a2a", "a2a_intra"), ("all_reduce", "sync_intra")):
        for nbytes in (2**16, 2**20, 2**22):
            row = {"kind": kind, "n": 2, "bytes": nbytes, "sent": nbytes // 2 if kind == "a2a" else nbytes}
            b, steps = cal.bench_row_terms(row)
            t = b / (TRUE.gbps[key] * 1e9) + steps * TRUE.latency_us[key] * 1e-6
            results.append({**row, "s": t, "shape": "consecutive2"})
    bench = tmp_path / "comm.json"
    bench.write_text(json.dumps({"results": results}))
    name = f"test-bench-{tmp_path.name}"
    out = ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml"
    try:
        calibrate.main([str(_fake_sweep(tmp_path, 16)), "--calibrate-from", str(bench), "--name", name])
        capsys.readouterr()
        run = compose_run([f"cluster=calibrated/{name}", "cluster.gpus=4", "trainer.device=cpu"])
        got = run.cluster.calibration
        assert got.gbps["sync_intra"] == pytest.approx(0.5, rel=1e-4)  # from the benchmark, as fitted on
        assert got.latency_us["a2a_intra"] == pytest.approx(300.0, rel=1e-3)
        # From the sweep; within 5%: the benchmark's all-reduce also fixes TP's collectives, which
        # TRUE prices apart, and the compute absorbs the difference.
        assert got.flops_per_s == pytest.approx(5e9, rel=0.05)
    finally:
        out.unlink(missing_ok=True)


DATA = ROOT / "benchmarks" / "data" / "layouts4_2026-12-02"  # README's two sweeps, as they ran


@pytest.mark.slow  # end to end (a script, or a fresh interpreter): a few seconds
@pytest.mark.shares_cores
def test_this_machines_calibration_is_what_its_sweeps_give():
    """conf/cluster/calibrated/cpu4.yaml is scripts/calibrate.py's fit to the two sweeps kept in
    benchmarks/data (README "Which layout should I use?"): refitting them gives the same constants,
    and the leave-one-out error README and RESULTS state."""
    import yaml

    from scripts import calibrate

    jobs = calibrate.load_jobs([DATA / "b16", DATA / "b32"], ARGS)
    stages, phases = [j.stages for j in jobs], [j.phases for j in jobs]
    fitted, _ = cal.fit_staged(stages, phases, jobs[0].prior)
    written = yaml.safe_load((ROOT / "conf" / "cluster" / "calibrated" / "cpu4.yaml").read_text())["calibration"]
    again = cal.as_cluster_fields(fitted.constants, fitted.measured)
    assert {k: v for k, v in again.items() if v is not None} == {
        k: v for k, v in written.items() if k != "source" and v is not None
    }
    loo = cal.leave_one_out([j.name for j in jobs], stages, phases, jobs[0].prior, [j.before_s for j in jobs])
    assert len(jobs) == 20 and round(loo.median_after * 100, 1) == 14.6
    # The runs timed the experts and the attention core apart: each has its own measured rate.
    assert written["expert_flops_per_s"] and written["attention_core_flops_per_s"]
    # The check sweep (top-4 of 8 experts, sequences of 256) that README quotes, predicted.
    checked = calibrate.load_jobs([DATA / "topk4_seq256"], ARGS)
    one, _ = cal.fit_staged(stages, [cal.folded(p) for p in phases], jobs[0].prior)
    for fit, median in ((fitted, 11.4), (one, 12.7)):
        errors = [abs(cal.predict(fit.constants, j.stages) / j.phases["step"] - 1) for j in checked]
        assert len(checked) == 6 and round(statistics.median(errors) * 100, 1) == median


def test_this_machines_calibration_composes_and_plans():
    run = compose_run(["cluster=calibrated/cpu4", "cluster.gpus=4", "trainer.device=cpu", "trainer.micro_steps=4"])
    line = cal.constants_line(run.cluster, ARGS)
    assert line.startswith("constants: calibrated (benchmarks/data/layouts4_2026-12-02/b16, "), line
    valid, _ = plan.make_plan(run, 4, ARGS)
    assert plan.layout_name(valid[0].dims) == "pp4" and 0.1 < valid[0].step_s < 2.0


def test_a_calibration_of_runs_that_used_one_sits_on_the_same_base():
    from scripts import calibrate

    assert calibrate._base_of("calibrated/cpu4") == "local"
    assert calibrate._base_of("calibrated/no-such-file") == "local"


def test_only_optimizer_and_overhead_calibrated_is_still_said_to_be_calibrated():
    run = compose_run(["cluster.gpus=4", "cluster.calibration.optimizer_s_per_gb=0.5"])
    assert cal.constants_line(run.cluster, ARGS).startswith("constants: calibrated (")


@pytest.mark.slow  # seconds of one process: shares the cores with the slow tier
@pytest.mark.shares_cores
def test_the_rates_per_computation_type_carry_to_another_model(tmp_path, capsys):
    """--check: sweeps of the tiny model calibrate; a sweep of a model with another mix (top-4 of 8
    experts, sequences twice as long: more expert and attention FLOPs per token) is predicted.
    With a rate per computation type its steps come out as measured; one compute rate, fitted on
    the tiny model's mix, misprices them."""
    from scripts import calibrate

    sweeps = [_fake_sweep(tmp_path, 16), _fake_sweep(tmp_path, 32)]
    other = ("model.top_k=4", "model.max_seq_len=256", "trainer.seq_len=256")
    check = _fake_sweep(tmp_path, 16, other, name="other")
    calibrate.main([*map(str, sweeps), "--check", str(check)])
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("checked on "))
    typed, one = (float(x) for x in re.findall(r"median step-time error ([\d.]+)%.* ([\d.]+)% with one", line)[0])
    assert typed < 0.1 and one > 2.0, line
    assert "checked: the planner with per-type rates picks" in text


def test_two_link_classes_fit_a_two_node_sweep_that_one_link_cannot():
    """Layouts of 4 ranks on 2 nodes of 2 (EP inside a node or across) and of 2 ranks on one node,
    measured with an inter-node link 20x slower than the intra-node one: the planner's two link
    classes recover both bandwidths and predict the left-out layouts whose All-to-All crosses
    nodes; one link class for both (calibration.one_link) cannot."""
    true = dataclasses.replace(
        TRUE,
        gbps={**TRUE.gbps, "a2a_inter": 0.025, "sync_inter": 0.025, "tp_inter": 0.01, "p2p_inter": 0.005},
        latency_us={**TRUE.latency_us, "a2a_inter": 600.0, "sync_inter": 600.0, "tp_inter": 100.0, "p2p_inter": 400.0},
    )
    names, stages = [], []
    for gpus, batch in ((4, 16), (4, 32), (4, 64), (2, 16), (2, 32)):
        run = compose_run(
            [
                f"cluster.gpus={gpus}",
                "cluster.gpus_per_node=2",
                "trainer.device=cpu",
                "trainer.micro_steps=2",
                f"trainer.global_batch_size={batch}",
            ]
        )
        valid, _ = plan.make_plan(run, gpus, ARGS)
        names += [f"{plan.layout_name(p.dims)}@{gpus}x{batch}" for p in valid if p.dims.pp == 1]
        stages += [p.terms for p in valid if p.dims.pp == 1]
    rng = random.Random(1)
    phases = []
    for t in stages:
        ph = {k: v * (1 + 0.01 * rng.gauss(0, 1)) for k, v in true.phases(t).items()}
        phases.append({**ph, "step": sum(ph.values())})
    inter = [i for i, t in enumerate(stages) if cal.crosses_nodes(t)]
    assert len(inter) >= 5 and len(inter) < len(stages)  # ep4 (and tp2_ep2) cross; ep2_dp2 keeps EP inside
    before = [PRIOR.step_s(t) for t in stages]
    two = cal.leave_one_out(names, stages, phases, PRIOR, before)
    one = cal.leave_one_out(names, [cal.one_link(t) for t in stages], phases, PRIOR, before)
    err_two = statistics.median(two.errors_after[i] for i in inter)
    err_one = statistics.median(one.errors_after[i] for i in inter)
    assert err_two < 0.03 and err_one > 3 * err_two, (err_two, err_one)
    fitted = cal.fit(stages, phases, PRIOR).constants
    assert fitted.gbps["a2a_inter"] == pytest.approx(0.025, rel=0.1)
    assert fitted.gbps["a2a_intra"] == pytest.approx(0.5, rel=0.1)
    merged = cal.one_link(stages[inter[0]])
    assert not any(k.endswith("_inter") for k in merged.comm)
    assert sum(b for b, _ in merged.comm.values()) == pytest.approx(sum(b for b, _ in stages[inter[0]].comm.values()))


COMM4 = DATA / "comm4.json"  # scripts/bench_comm.py's output: --calibrate-from alone writes in a blink


@pytest.mark.parametrize("name", ["../local", "../../../../tmp/x", "a b", "", "x.yaml"])
def test_a_name_that_is_not_one_plain_file_name_is_refused_before_anything_is_written(name, capsys):
    from scripts import calibrate

    path = ROOT / "conf" / "cluster" / "local.yaml"
    local = path.read_text()
    try:
        with pytest.raises(SystemExit) as e:
            calibrate.main(["--calibrate-from", str(COMM4), "--name", name])
        assert path.read_text() == local
    finally:  # without the check "../local" writes over it
        path.write_text(local)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert err.startswith(f"calibrate.py: --name {name!r}: letters, digits, _ and - only"), err


@pytest.mark.parametrize("flag, value", [("--mfu", "0"), ("--mfu", "nan"), ("--peak-flops", "-1")])
def test_a_prior_no_plan_takes_is_refused_whatever_else_is_given(flag, value, tmp_path, capsys):
    """With --calibrate-from alone the priors were never read, so --mfu 0 passed without a word."""
    from scripts import calibrate

    name = f"test-prior-{tmp_path.name}"
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--calibrate-from", str(COMM4), "--name", name, flag, value])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith(f"calibrate.py: {flag} "), err
    assert not (ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml").exists()


def test_an_existing_calibration_is_replaced_only_with_force(tmp_path, capsys):
    from scripts import calibrate

    shipped = (ROOT / "conf" / "cluster" / "calibrated" / "cpu4.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--calibrate-from", str(COMM4), "--name", "cpu4"])
    assert e.value.code == 2
    assert "--name cpu4: conf/cluster/calibrated/cpu4.yaml exists; --force replaces it" in capsys.readouterr().err
    assert (ROOT / "conf" / "cluster" / "calibrated" / "cpu4.yaml").read_text() == shipped
    name = f"test-force-{tmp_path.name}"
    out = ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml"
    try:
        calibrate.main(["--calibrate-from", str(COMM4), "--name", name])
        out.write_text("# edited\n")
        with pytest.raises(SystemExit):
            calibrate.main(["--calibrate-from", str(COMM4), "--name", name])
        assert out.read_text() == "# edited\n"
        calibrate.main(["--calibrate-from", str(COMM4), "--name", name, "--force"])
        assert "gbps:" in out.read_text()
    finally:
        out.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("cluster.calibration.flops_per_s=0", "cluster.calibration.flops_per_s=0.0 must be a finite number > 0"),
        ("cluster.calibration.expert_flops_per_s=-5e9", "expert_flops_per_s=-5000000000.0 must be a finite number > 0"),
        ("cluster.calibration.optimizer_s_per_gb=-1", "optimizer_s_per_gb=-1.0 must be a finite number >= 0"),
        ("cluster.calibration.step_overhead_s=-0.1", "step_overhead_s=-0.1 must be a finite number >= 0"),
        ("cluster.calibration.bubble_factor=7", "bubble_factor=7.0 must be between 0 and 1"),
        ("cluster.calibration.bubble_factor=-1", "bubble_factor=-1.0 must be between 0 and 1"),
        ("+cluster.calibration.gbps.a2a_intra=0", "cluster.calibration.gbps.a2a_intra=0.0 must be a finite number > 0"),
        ("+cluster.calibration.gbps.a2a_intra=-2", "gbps.a2a_intra=-2.0 must be a finite number > 0"),
        ("+cluster.calibration.latency_us.tp_inter=-3", "latency_us.tp_inter=-3.0 must be a finite number >= 0"),
        ("+cluster.calibration.gbps.a2a_itnra=1", "gbps.a2a_itnra is no collective: keys are <kind>_<link>"),
        ("+cluster.calibration.latency_us.a2a=1", "latency_us.a2a is no collective"),
    ],
)
def test_impossible_planner_constants_are_refused_in_one_line(override, needle):
    """A rate of 0 fell back to the prior, a negative one priced negative steps that ranked first,
    a bandwidth of 0 divided by zero, a misspelled collective was ignored."""
    from moemesh.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_run(["cluster.gpus=4", override])
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    if "itnra" in override:
        assert str(err.value).endswith("did you mean a2a_intra?")


def test_a_kind_whose_larger_messages_ran_faster_keeps_the_prior(tmp_path, capsys):
    """A benchmark whose larger message was timed faster fits no bandwidth (an infinite one, which a
    plan would refuse): that kind is left out with a one-line warning and keeps the prior's
    constants, the others are written; when no kind is left, one line, exit 2, nothing written."""
    import json

    from scripts import calibrate

    faster = [{"kind": "a2a", "n": 2, "bytes": b, "sent": b, "s": s} for b, s in ((2**16, 2e-3), (2**22, 1e-3))]
    slower = [{"kind": "all_gather", "n": 2, "bytes": b, "s": s} for b, s in ((2**16, 1e-3), (2**22, 9e-3))]
    bench = tmp_path / "comm.json"
    name = f"test-inf-{tmp_path.name}"
    out = ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml"
    try:
        bench.write_text(json.dumps({"results": faster + slower}))
        calibrate.main(["--calibrate-from", str(bench), "--name", name])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"calibrate.py: warning: --calibrate-from {bench}: a2a_intra: "), err
        assert "keep the prior's bandwidth and latency" in err
        run = compose_run([f"cluster=calibrated/{name}"])  # a config the plan composes
        assert set(run.cluster.calibration.gbps) == {"gather_intra"} == set(run.cluster.calibration.latency_us)
        out.unlink()
        bench.write_text(json.dumps({"results": faster}))
        with pytest.raises(SystemExit) as e:
            calibrate.main(["--calibrate-from", str(bench), "--name", name])
        assert not out.exists()
    finally:
        out.unlink(missing_ok=True)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"calibrate.py: --calibrate-from {bench}: nothing to fit: a2a_intra: the larger"), err


def _mended(sweep: Path, mend) -> Path:
    """``sweep`` with ``mend`` applied to its layouts.json record (a dict), in place."""
    import json

    path = sweep / "layouts.json"
    record = json.loads(path.read_text())
    mend(record)
    path.write_text(json.dumps(record))
    return sweep


def _set(*keys_value):
    """A mend that sets record[k0][k1]...[kn] = value."""

    def mend(record):
        *keys, last, value = keys_value
        for k in keys:
            record = record[k]
        record[last] = value

    return mend


@pytest.mark.parametrize(
    ("mend", "hydra_overrides", "needle"),
    [
        (lambda r: r["jobs"][0].pop("dir"), None, "no dir"),
        (_set("jobs", 0, "dims", "zz", 1), None, "keys are dp, ep, tp, pp"),
        (_set("jobs", 0, "dims", "dp4"), None, "dims of the wrong type"),
        (_set("jobs", 0, "dims", "dp", 0), None, "parallel.data_parallel_size=0 must be a positive integer"),
        (_set("jobs", 0, "phases", "forward", "1"), None, "phases of the wrong type"),
        (_set("jobs", 0, "phases", "step", float("nan")), None, "phases of the wrong type"),
        (_set("jobs", 0, "phases", "optimizer", -1.0), None, "negative phase times (optimizer=-1.0)"),
        (None, "- 5\n", "overrides.yaml holds no list of overrides (strings)"),
        (None, "null\n", "overrides.yaml holds no list of overrides (strings)"),
        (None, "- !!python/object:os.system {}\n", "overrides.yaml is not plain YAML (could not determine a"),
        (None, "BIG", "overrides.yaml is 1,048,579 bytes, more than the 1,048,576 allowed"),
    ],
)
def test_a_job_whose_record_cannot_be_read_is_named_and_skipped(tmp_path, capsys, mend, hydra_overrides, needle):
    """Each of these was a traceback (or, for a NaN step, a fit that printed "max nan%" and wrote)."""
    from scripts import calibrate

    sweep = _fake_sweep(tmp_path, 16)
    if mend:
        _mended(sweep, mend)
    if hydra_overrides:
        if hydra_overrides == "BIG":  # past runs.reader.MAX_OVERRIDES_BYTES
            hydra_overrides = "- " + "x" * (1 << 20) + "\n"
        first = sorted(sweep.glob("0_*"))[0]
        (first / ".hydra" / "overrides.yaml").write_text(hydra_overrides)
    good = len(calibrate.load_jobs([_fake_sweep(tmp_path, 16, name="good")], ARGS))
    capsys.readouterr()
    jobs = calibrate.load_jobs([sweep], ARGS)
    err = capsys.readouterr().err.strip()
    assert len(jobs) == good - 1
    assert err.startswith(f"calibrate.py: {sweep / 'layouts.json'}: job 0: ") and err.endswith("; skipped"), err
    assert needle in err and "\n" not in err, err


@pytest.mark.parametrize(
    ("mend", "needle"),
    [
        (lambda r: r.pop("jobs"), "layouts.json: no list of jobs and device name"),
        (_set("jobs", "abc"), "layouts.json: no list of jobs and device name"),
        (_set("jobs", [1, 2]), "0 finished job(s) in"),
    ],
)
def test_a_sweep_without_usable_jobs_ends_in_one_line_and_exit_2(tmp_path, capsys, mend, needle):
    from scripts import calibrate

    sweep = _mended(_fake_sweep(tmp_path, 16), mend)
    with pytest.raises(SystemExit) as e:
        calibrate.main([str(sweep)])
    assert e.value.code == 2 and needle in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "--calibrate-from: {path}: No such file or directory"),
        ("[]", "holds a list, not a JSON object"),
        ("{}", "--calibrate-from {path}: no list of results"),
        ('{"results": "abc"}', "--calibrate-from {path}: no list of results"),
        ('{"results": [5]}', "results[0] is no timing (the whole of the wrong type)"),
        ('{"results": [{"kind": "a2a", "n": 2, "bytes": 8, "s": "x"}]}', "results[0] is no timing (s of the wrong"),
        ('{"results": [{"kind": "a2a", "n": 2, "bytes": 8}]}', "results[0] is no timing (kind, n, bytes or s missing)"),
        ('{"results": [{"kind": "a2a", "n": 2, "bytes": 8, "s": -0.1}]}', "s=-0.1 out of range"),
        ('{"results": [{"kind": "a2a", "n": 2, "bytes": 8, "s": NaN}]}', "s of the wrong type"),
        ('{"results": [{"kind": "a2a", "n": 2, "bytes": 8, "s": 1, "link": "x"}]}', "link='x' (intra or inter)"),
    ],
)
def test_a_benchmark_file_that_is_no_timings_ends_in_one_line_and_exit_2(tmp_path, capsys, text, needle):
    from scripts import calibrate

    path = tmp_path / "comm.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--calibrate-from", str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and needle.format(path=path) in err, err


def test_a_calibrated_preset_with_yaml_aliases_is_refused_before_composing(tmp_path):
    """A preset copied from another cluster is untrusted: 600 bytes of nested aliases hung the
    composition (OmegaConf expands them); it is refused in one line first, by train.py's
    preflight and by the scripts' compose_run alike."""
    from moemesh.config.cli import preflight
    from moemesh.errors import ConfigError

    name = f"test-bomb-{tmp_path.name}"
    path = ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml"
    text = "defaults:\n  - /cluster/local@_here_\n  - _self_\n" + yaml_alias_bomb()
    path.write_text(text)
    first_alias = next(i for i, line in enumerate(text.splitlines(), 1) if "*a0" in line)
    try:
        for compose in (
            lambda: compose_run([f"cluster=calibrated/{name}"]),
            lambda: preflight([f"cluster=calibrated/{name}"]),
        ):
            with pytest.raises(ConfigError) as err:
                compose()
            msg = str(err.value)
            assert msg.startswith(f"cluster=calibrated/{name}: ") and "an alias" in msg and "\n" not in msg, msg
            assert f"{path}, line {first_alias}: " in msg, msg  # the line of the first alias, counted from 1
    finally:
        path.unlink(missing_ok=True)
