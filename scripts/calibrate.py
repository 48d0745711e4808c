"""Calibrate the planner on measured runs: fit its constants to a layout sweep's phase times.

    python train.py -m hydra/sweeper=layouts cluster.gpus=4 trainer.steps=30 hydra.sweeper.top=0 \\
        hydra.sweep.dir=multirun/layouts4
    python scripts/calibrate.py multirun/layouts4 [more sweep dirs] --name mycpu
    python scripts/plan.py cluster=calibrated/mycpu cluster.gpus=4       # plans with the fitted constants

Each finished job of the sweeps (``layouts.json``, written by the layout sweeper) is planned again
with the planner (``moemesh.planning.cost.plan_one``: FLOPs, bytes and message steps of each collective kind); the
constants (``moemesh/planning/calibration.py``: achieved FLOP/s, GB/s and latency per collective kind and link
class, optimizer s/GB, per-step overhead) are fitted by least squares to the jobs' median phase
times. Then:

* leave-one-out: for each job, the constants fitted to the others predict its step time; the
  median error is printed beside the uncalibrated planner's (the cluster's prior constants);
* ``--check SWEEP``: the jobs of other sweeps (another model, batch or rank count), predicted with
  the constants fitted on all jobs, and with one compute rate (the experts' and the attention
  core's times put back into compute): what the per-type rates carry to work they were not
  fitted on;
* the fitted constants (from all jobs) are written to ``conf/cluster/calibrated/<name>.yaml``, a
  cluster config on top of the jobs' own (``cluster=calibrated/<name>``), with the errors and the
  sweeps it came from in its header. ``--name``: letters, digits, _ and -; a file that exists (the
  shipped cpu4) is replaced only with ``--force``.

Bandwidth and latency of one collective kind separate only when message sizes and counts vary
independently across the jobs: sweeps at more than one batch size or rank count help. Collectives
that a run times only inside another phase (TP inside forward/backward, point-to-point inside the
pipeline) are fitted beside the compute and stay uncertain when their share of it is small.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
import typing
from pathlib import Path
from typing import NoReturn, TypedDict

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: moemesh without pip install

from moemesh.config.cli import compose_run  # noqa: E402
from moemesh.config.schema import CalibrationConfig  # noqa: E402
from moemesh.errors import ConfigError, first_line  # noqa: E402
from moemesh.parallel.dims import ParallelDims, layout_name  # noqa: E402
from moemesh.planning import calibration as cal  # noqa: E402
from moemesh.planning.cost import plan_one  # noqa: E402
from moemesh.runs.reader import MAX_OVERRIDES_BYTES, conform, read_json  # noqa: E402
from moemesh.untrusted import read_bounded, yaml_without_aliases  # noqa: E402


@dataclasses.dataclass
class Job:
    name: str
    terms: cal.Terms  # the slowest pipeline stage's under the prior constants
    stages: list[cal.Terms]  # every stage's (the slowest under fitted constants may be another)
    phases: dict[str, float]
    before_s: float  # the uncalibrated planner's step time
    prior: cal.Constants
    cluster: str  # the job's cluster config name (the base of the calibrated one)
    sweep: str = ""


class _LayoutJob(TypedDict, total=False):
    """A job of layouts.json (the layout sweeper writes it) as calibrate.py reads it."""

    dir: str
    overrides: list[str]
    dims: dict[str, int]
    phases: dict[str, float | None]  # a run's median time.* (None: a phase it did not time)


class _BenchRow(TypedDict, total=False):
    """A result of scripts/bench_comm.py --out."""

    kind: str
    n: int
    bytes: float
    sent: float  # the bytes that left the timed rank (an All-to-All's own split)
    s: float
    link: str


def _wrong_types(value, kind) -> list[str]:
    """The keys of dict ``value`` that do not hold the type ``kind`` gives them (runs.reader.conform's
    rules: finite numbers, no bools), or ["the whole"] where it is no dict."""
    if not isinstance(value, dict):
        return ["the whole"]
    kept = conform(value, kind)
    hints = typing.get_type_hints(kind)
    return [k for k in value if k in hints and (k not in kept or kept[k] != value[k])]


def _job_problem(j) -> str | None:
    """Why a finished job of layouts.json cannot be calibrated on, or None."""
    wrong = _wrong_types(j, _LayoutJob)
    if wrong:
        return f"{', '.join(wrong)} of the wrong type (dir a string, dims whole numbers, phases finite seconds)"
    missing = [k for k in ("dir", "dims") if k not in j]
    if missing:
        return f"no {' or '.join(missing)}"
    axes = [f.name for f in dataclasses.fields(ParallelDims)]
    if set(j["dims"]) - set(axes):
        return f"dims {j['dims']}: keys are {', '.join(axes)}"
    try:
        ParallelDims(**j["dims"])
    except ValueError as err:
        return f"dims {j['dims']}: {first_line(err)}"
    negative = [f"{k}={v}" for k, v in j["phases"].items() if v is not None and v < 0]
    if negative:
        return f"negative phase times ({', '.join(negative)})"
    return None


def _overrides(job_dir: Path, j: dict) -> list[str]:
    """The job's overrides: its .hydra/overrides.yaml (bounded), else layouts.json's; ValueError naming
    a file that cannot be read as a list of strings."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        if "overrides" not in j:
            raise ValueError(f"no {path} and no overrides in layouts.json")
        return j["overrides"]
    try:
        data = yaml_without_aliases(read_bounded(path, MAX_OVERRIDES_BYTES, error=ValueError))
    except (yaml.YAMLError, RecursionError) as err:  # a !!python/object tag: ConstructorError
        raise ValueError(f"{path} is not plain YAML ({first_line(err)})") from None
    if not isinstance(data, list) or not all(isinstance(o, str) for o in data):
        raise ValueError(f"{path} holds no list of overrides (strings)")
    return data


def _sweep_jobs(sweep: Path) -> tuple[list[tuple[int, dict]], str]:
    """layouts.json's finished jobs that can be calibrated on, with their index (each other one is
    named on stderr and skipped), and the device they ran on; ValueError for a file without a list of jobs."""
    path = sweep / "layouts.json"
    if not path.is_file():
        raise ValueError(f"{sweep}: no layouts.json (run a layout sweep: python train.py -m hydra/sweeper=layouts)")
    record = read_json(path)
    jobs, device = record.get("jobs"), record.get("device", "cpu")
    if not isinstance(jobs, list) or not isinstance(device, str):
        raise ValueError(f"{path}: no list of jobs and device name (the layout sweeper writes them)")
    kept = []
    for i, j in enumerate(jobs):
        if isinstance(j, dict) and (j.get("error") or not j.get("phases")):
            continue  # failed or unfinished
        problem = "not a JSON object" if not isinstance(j, dict) else _job_problem(j)
        if problem:
            print(f"calibrate.py: {path}: job {i}: {problem}; skipped", file=sys.stderr)
        else:
            kept.append((i, j))
    return kept, device


def load_jobs(sweeps: list[Path], options: cal.PlannerOptions) -> list[Job]:
    """Every finished job of these sweeps, planned again; ValueError naming what is missing. A job
    whose record or overrides cannot be read is named on stderr and skipped."""
    jobs = []
    for sweep in sweeps:
        records, device = _sweep_jobs(sweep)
        for i, j in records:
            job_dir = Path(j["dir"])
            if not job_dir.is_dir():  # the sweep directory was moved or copied: its own subdirectory
                job_dir = sweep / job_dir.name
            try:
                overrides, phases = _overrides(job_dir, j), _phases(j["phases"], job_dir)
            except ValueError as err:
                print(f"calibrate.py: {sweep / 'layouts.json'}: job {i}: {err}; skipped", file=sys.stderr)
                continue
            run = compose_run([*overrides, f"trainer.device={device}"])
            uncalibrated = dataclasses.replace(
                run, cluster=dataclasses.replace(run.cluster, calibration=CalibrationConfig())
            )
            dims = ParallelDims(**j["dims"])
            p = plan_one(uncalibrated, dims, options)
            if p.problem is not None or p.terms is None:
                raise ValueError(f"{job_dir}: the planner refuses this job's layout now: {p.problem}")
            jobs.append(
                Job(
                    f"{layout_name(dims)}" + (f" ({sweep.name})" if len(sweeps) > 1 else ""),
                    p.terms,
                    p.stage_terms,
                    phases,
                    p.step_s,
                    cal.cluster_constants(uncalibrated.cluster, options),
                    run.cluster.name,
                    str(sweep),
                )
            )
    if len(jobs) < 2:
        raise ValueError(f"{len(jobs)} finished job(s) in {', '.join(map(str, sweeps))}: calibration needs at least 2")
    return jobs


def _phases(time: dict, job_dir: Path) -> dict[str, float]:
    try:
        return cal.measured_phases(time)
    except ValueError as err:
        raise ValueError(f"{job_dir}: {err}") from None


def report(jobs: list[Job], loo: cal.LeaveOneOut, fitted: cal.Fit) -> str:
    lines = [
        "| layout | measured step s | uncalibrated s | error | calibrated (left out) s | error |",
        "|---|---|---|---|---|---|",
    ]
    for j, m, b, a, eb, ea in zip(
        jobs, loo.measured_s, loo.before_s, loo.after_s, loo.errors_before, loo.errors_after, strict=True
    ):
        lines.append(f"| {j.name} | {m:.4f} | {b:.4g} | {eb:.0%} | {a:.4f} | {ea:.1%} |")
    lines.append(
        f"\nleave-one-out step-time error: median {loo.median_before:.0%} uncalibrated, "
        f"{loo.median_after:.1%} calibrated (max {max(loo.errors_after):.1%}); {len(jobs)} jobs"
    )
    c = fitted.constants
    shown = [f"compute {c.flops_per_s / 1e9:.4g} GFLOP/s"]
    for kind, (_, key) in cal.TYPED.items():
        if fitted.measured.get(key):
            shown.append(f"{kind} {c.rate(kind) / 1e9:.4g} GFLOP/s")
        else:
            shown.append(f"{kind} at the compute rate (the runs did not time it apart: time.{kind})")
    for key in sorted(c.gbps):
        if fitted.measured.get(f"gbps.{key}"):
            shown.append(f"{key} {c.gbps[key]:.4g} GB/s")
        if fitted.measured.get(f"latency_us.{key}"):
            shown.append(f"{key} latency {c.latency_us[key]:.4g} us")
    shown += [f"optimizer {c.optimizer_s_per_gb:.4g} s/GB", f"overhead {c.step_overhead_s * 1e3:.4g} ms/step"]
    if fitted.measured.get("bubble_factor"):
        shown.append(f"pipeline bubble x{c.bubble_factor:.3g}")
    lines.append("fitted on all jobs: " + ", ".join(shown))
    lines.append(f"rms weighted residual {fitted.residual:.1%} of a phase")
    for sweep in dict.fromkeys(j.sweep for j in jobs):  # each sweep's layouts compete with each other
        mine = [i for i, j in enumerate(jobs) if j.sweep == sweep]
        for label, key in (
            ("uncalibrated", lambda i: loo.before_s[i]),
            ("calibrated (left out)", lambda i: loo.after_s[i]),
        ):
            best_measured = min(mine, key=lambda i: loo.measured_s[i])
            pick = min(mine, key=key)
            gap = loo.measured_s[pick] / loo.measured_s[best_measured] - 1
            lines.append(
                f"{sweep}: the {label} planner picks {jobs[pick].name}, measured best {jobs[best_measured].name} "
                f"(the pick is {gap:.1%} slower)"
            )
    return "\n".join(lines)


def link_report(jobs: list[Job], two: cal.LeaveOneOut, one: cal.LeaveOneOut) -> str:
    """Multi-node jobs: the leave-one-out step-time error with intra- and inter-node links priced
    apart (the planner's model) against one link class for both (``calibration.one_link``)."""
    inter = [i for i, j in enumerate(jobs) if cal.crosses_nodes(j.terms)]
    lines = [
        "",
        "| layout | All-to-All crosses nodes | measured step s | two links (left out) s | error | one link s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, j in enumerate(jobs):
        m = two.measured_s[i]
        lines.append(
            f"| {j.name} | {'yes' if i in inter else 'no'} | {m:.4f} | {two.after_s[i]:.4f} | "
            f"{two.errors_after[i]:.1%} | {one.after_s[i]:.4f} | {one.errors_after[i]:.1%} |"
        )
    lines.append(
        f"\nleave-one-out step-time error, median over all {len(jobs)} jobs: two link classes "
        f"{two.median_after:.1%}, one link class {one.median_after:.1%}"
    )
    if inter:
        two_inter = statistics.median(two.errors_after[i] for i in inter)
        one_inter = statistics.median(one.errors_after[i] for i in inter)
        lines.append(
            f"over the {len(inter)} jobs whose All-to-All crosses nodes: two link classes {two_inter:.1%}, "
            f"one link class {one_inter:.1%}"
        )
    return "\n".join(lines)


def write_cluster(
    name: str, jobs: list[Job], fitted: cal.Fit, loo: cal.LeaveOneOut, sources: list[Path], bench: dict | None = None
) -> Path:
    """The fitted constants, and ``bench``'s collectives that were held fixed in the fit (they are
    part of what the fit assumed: a latency fitted beside a benchmarked bandwidth needs that bandwidth)."""
    bases = sorted({j.cluster for j in jobs})
    if len(bases) > 1:
        raise ValueError(f"the jobs ran under different cluster configs ({', '.join(bases)}): calibrate each apart")
    base, seen = bases[0], set()
    while base.startswith("calibrated/") and base not in seen:  # calibrated again: on what that one sits on
        seen.add(base)
        base = _base_of(base)
    base = "local" if base.startswith("calibrated/") else base
    note = [
        f"# {len(jobs)} measured jobs. Leave-one-out step-time error: median {loo.median_before:.0%} uncalibrated, "
        f"{loo.median_after:.1%} calibrated."
    ]
    fields = cal.as_cluster_fields(fitted.constants, fitted.measured)
    for part in ("gbps", "latency_us"):
        fields[part] = {**(bench or {}).get(part, {}), **fields[part]}
    return write_fields(name, base, fields, sources, note)


def _base_of(name: str) -> str:
    """The cluster config a calibrated one sits on (its defaults' /cluster/<base>@_here_)."""
    path = ROOT / "conf" / "cluster" / f"{name}.yaml"
    try:
        defaults = yaml.safe_load(path.read_text()).get("defaults") or []
    except (OSError, AttributeError, yaml.YAMLError):
        return "local"
    bases = [d.split("@", 1)[0].removeprefix("/cluster/") for d in defaults if isinstance(d, str) and "@" in d]
    return bases[0] if bases else "local"


def check_report(checked: list[Job], fitted: cal.Fit, one_rate: cal.Fit) -> str:
    """Jobs no constant was fitted on, predicted by the fit (a rate per computation type) and by
    the fit with one compute rate."""
    lines = [
        "",
        "| checked job | measured step s | predicted s | error | one compute rate s | error |",
        "|---|---|---|---|---|---|",
    ]
    errors: dict[str, list[float]] = {"typed": [], "one": []}
    for j in checked:
        m = j.phases["step"]
        a, b = cal.predict(fitted.constants, j.stages), cal.predict(one_rate.constants, j.stages)
        errors["typed"].append(abs(a - m) / m)
        errors["one"].append(abs(b - m) / m)
        lines.append(
            f"| {j.name} | {m:.4f} | {a:.4f} | {errors['typed'][-1]:.1%} | {b:.4f} | {errors['one'][-1]:.1%} |"
        )
    med = {k: statistics.median(v) for k, v in errors.items()}
    lines.append(
        f"\nchecked on {len(checked)} jobs not fitted on: median step-time error {med['typed']:.1%} with a rate per "
        f"computation type (max {max(errors['typed']):.1%}), {med['one']:.1%} with one compute rate "
        f"(max {max(errors['one']):.1%})"
    )
    best = min(checked, key=lambda j: j.phases["step"])
    for label, fit in (("per-type rates", fitted), ("one rate", one_rate)):
        pick = min(checked, key=lambda j: cal.predict(fit.constants, j.stages))
        gap = pick.phases["step"] / best.phases["step"] - 1
        lines.append(
            f"checked: the planner with {label} picks {pick.name}, measured best {best.name} ({gap:.1%} slower)"
        )
    return "\n".join(lines)


NAME = re.compile(r"[A-Za-z0-9_-]+")


def output_path(name: str, force: bool) -> Path:
    """conf/cluster/calibrated/<name>.yaml for ``--name``: ValueError for a name that is not one file
    name of letters, digits, _ and - (``../local`` would write over conf/cluster/local.yaml), or for
    a file that exists unless ``force`` (a shipped preset such as cpu4 is replaced only on request)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: letters, digits, _ and - only (it names conf/cluster/calibrated/NAME.yaml)")
    out = ROOT / "conf" / "cluster" / "calibrated" / f"{name}.yaml"
    if out.exists() and not force:
        raise ValueError(f"--name {name}: {out.relative_to(ROOT)} exists; --force replaces it, or choose another name")
    return out


def write_fields(name: str, base: str, fields: dict, sources: list[Path], note: list[str]) -> Path:
    """conf/cluster/calibrated/<name>.yaml: the base cluster config with these calibration fields
    (main refused an existing file unless --force before any work)."""
    out = output_path(name, force=True)
    body = {"name": f"calibrated/{name}", "calibration": {"source": ", ".join(map(str, sources)), **fields}}
    try:  # what plan.py would refuse (an infinite bandwidth, a negative latency) is not written
        CalibrationConfig(**body["calibration"])
    except ConfigError as err:
        raise ValueError(f"--name {name}: nothing written: the constants are not a valid calibration: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# Planner constants fitted by scripts/calibrate.py from {', '.join(map(str, sources))}.",
        *note,
        f"# Use: python scripts/plan.py cluster=calibrated/{name} ... (keys: schema.py CalibrationConfig)",
        "defaults:",
        f"  - /cluster/{base}@_here_",
        "  - _self_",
        "",
    ]
    out.write_text("\n".join(header) + yaml.safe_dump(body, sort_keys=False))
    return out


def _bench(path: Path) -> tuple[dict, frozenset[str]]:
    """scripts/bench_comm.py's output as calibration fields, and their names (fixed in a fit);
    ValueError naming --calibrate-from for a file that cannot be read or a result that is no timing."""
    try:
        results = read_json(path).get("results")
    except ValueError as err:
        raise ValueError(f"--calibrate-from: {err}") from None
    if not isinstance(results, list):
        raise ValueError(f"--calibrate-from {path}: no list of results (scripts/bench_comm.py --out writes one)")
    for i, row in enumerate(results):
        wrong = [f"{k} of the wrong type" for k in _wrong_types(row, _BenchRow)]
        if not wrong and not all(k in row for k in ("kind", "n", "bytes", "s")):
            wrong = ["kind, n, bytes or s missing"]
        if not wrong and not (row["n"] >= 1 and row["bytes"] >= 0 and row.get("sent", 0) >= 0 and row["s"] > 0):
            wrong = [f"n={row['n']}, bytes={row['bytes']}, sent={row.get('sent')}, s={row['s']} out of range"]
        if not wrong and row.get("link", "intra") not in cal.LINKS:
            wrong = [f"link={row['link']!r} (intra or inter)"]
        if wrong:
            raise ValueError(f"--calibrate-from {path}: results[{i}] is no timing ({', '.join(wrong)})")
    fitted, unresolved = cal.constants_from_bench(results)
    why = "the larger messages took no longer than the smaller (no bandwidth to fit)"
    if unresolved and not fitted["gbps"]:
        raise ValueError(
            f"--calibrate-from {path}: nothing to fit: {', '.join(unresolved)}: {why}; rerun "
            "scripts/bench_comm.py with larger --sizes or more --repeats"
        )
    if unresolved:
        print(
            f"calibrate.py: warning: --calibrate-from {path}: {', '.join(unresolved)}: {why}, so these keep the "
            "prior's bandwidth and latency; rerun scripts/bench_comm.py with larger --sizes or more --repeats "
            "to measure them",
            file=sys.stderr,
        )
    # Plain floats at 6 significant digits, as the fitted constants are written (numpy's would not
    # go into YAML).
    fields = {part: {k: float(f"{float(v):.6g}") for k, v in fitted[part].items()} for part in ("gbps", "latency_us")}
    names = {f"gbps.{k}" for k in fields["gbps"]} | {f"latency_us.{k}" for k in fields["latency_us"]}
    return fields, frozenset(names)


def _collectives_only(args: argparse.Namespace, bench: dict) -> None:
    """--calibrate-from without sweeps: the benchmark's collectives, written alone with --name."""
    print(f"from {args.calibrate_from}: " + ", ".join(f"{k} {v:.4g} GB/s" for k, v in bench["gbps"].items()))
    print("  latency: " + ", ".join(f"{k} {v:.4g} us" for k, v in bench["latency_us"].items()))
    if args.name:
        fields = {"flops_per_s": None, **{key: None for _, key in cal.TYPED.values()}, **bench}
        fields |= {"optimizer_s_per_gb": 0.0, "step_overhead_s": 0.0}
        path = write_fields(args.name, "local", fields, [args.calibrate_from], ["# Collectives only (no runs)."])
        print(f"wrote {path.relative_to(ROOT)}")


def _refuse(err: Exception, what: str = "") -> NoReturn:
    print(f"calibrate.py: {what}{err}", file=sys.stderr)
    raise SystemExit(2)


def _arguments(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="*", type=Path, help="layout sweep directories (hydra/sweeper=layouts)")
    ap.add_argument(
        "--name", help="write conf/cluster/calibrated/NAME.yaml (letters, digits, _ and -; default: only report)"
    )
    ap.add_argument("--force", action="store_true", help="replace conf/cluster/calibrated/NAME.yaml if it exists")
    ap.add_argument(
        "--check",
        nargs="+",
        type=Path,
        default=[],
        metavar="SWEEP",
        help="layout sweeps not fitted on (another model, batch, rank count): predict their jobs",
    )
    ap.add_argument(
        "--calibrate-from",
        type=Path,
        metavar="BENCH_JSON",
        help="scripts/bench_comm.py --out's file: its bandwidths and latencies are kept as measured "
        "(alone: only those are written; with sweeps: the rest is fitted to the runs)",
    )
    defaults = cal.PlannerOptions()
    ap.add_argument("--mfu", type=float, default=defaults.mfu, help="the uncalibrated planner's MFU")
    ap.add_argument("--peak-flops", type=float, default=defaults.peak_flops, help="the uncalibrated planner's peak")
    args = ap.parse_args(argv)
    if not args.sweeps and not args.calibrate_from:
        ap.error("give layout sweep directories, --calibrate-from BENCH_JSON, or both")
    try:  # before any work: a name that cannot be written, or a prior no plan takes, at once
        cal.PlannerOptions(args.mfu, args.peak_flops)
        if args.name is not None:
            output_path(args.name, args.force)
    except ValueError as err:
        _refuse(err)
    return args


def main(argv=None) -> None:
    args = _arguments(argv)
    try:
        bench, fixed = _bench(args.calibrate_from) if args.calibrate_from else ({}, frozenset())
        if not args.sweeps:
            _collectives_only(args, bench)
            return
        jobs = load_jobs(args.sweeps, cal.PlannerOptions(args.mfu, args.peak_flops))
    except ValueError as err:
        _refuse(err)
    stages, phases = [j.stages for j in jobs], [j.phases for j in jobs]
    prior = jobs[0].prior
    if bench:
        prior = dataclasses.replace(
            prior, gbps={**prior.gbps, **bench["gbps"]}, latency_us={**prior.latency_us, **bench["latency_us"]}
        )
    fitted, _ = cal.fit_staged(stages, phases, prior, fixed)
    loo = cal.leave_one_out([j.name for j in jobs], stages, phases, prior, [j.before_s for j in jobs], fixed)
    print(report(jobs, loo, fitted))
    fitted_n = sum(1 for v in fitted.measured.values() if v)
    if len(jobs) < fitted_n:
        print(
            f"calibrate.py: warning: {fitted_n} constants fitted to {len(jobs)} job(s); with fewer jobs than "
            "constants a fit can match these runs and misprice other layouts: the leave-one-out errors above "
            "are the only check (sweep more layouts to tighten it)",
            file=sys.stderr,
        )
    if any(cal.crosses_nodes(t, kind) for j in jobs for t in j.stages for kind in cal.KINDS):
        merged = [[cal.one_link(t) for t in j.stages] for j in jobs]
        one = cal.leave_one_out([j.name for j in jobs], merged, phases, prior, [j.before_s for j in jobs], fixed)
        print(link_report(jobs, loo, one))
    if args.check:
        try:
            checked = load_jobs(args.check, cal.PlannerOptions(args.mfu, args.peak_flops))
        except ValueError as err:
            _refuse(err, "--check: ")
        one_rate, _ = cal.fit_staged(stages, [cal.folded(p) for p in phases], prior, fixed)
        print(check_report(checked, fitted, one_rate))
    if bench:
        print(f"collectives as measured by {args.calibrate_from} (not fitted): {', '.join(sorted(fixed))}")
    if args.name:
        try:
            path = write_cluster(
                args.name, jobs, fitted, loo, [*args.sweeps, *([args.calibrate_from] if bench else [])], bench
            )
        except ValueError as err:
            _refuse(err)
        print(f"wrote {path.relative_to(ROOT)}: python scripts/plan.py cluster=calibrated/{args.name} ...")


if __name__ == "__main__":
    main()
