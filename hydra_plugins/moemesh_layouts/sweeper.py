"""``hydra/sweeper=layouts``: run the planner's best layouts for ``cluster.gpus`` and rank them by measurement.

    python train.py -m hydra/sweeper=layouts cluster.gpus=4 trainer.steps=30 [hydra.sweeper.top=6]
    python train.py -m hydra/sweeper=layouts cluster.gpus=4 'hydra.sweeper.include=[ep>=2]' cluster=slurm ...

Hydra glue only. The planner (``moemesh.planning.cost``) ranks every valid split of ``cluster.gpus``;
``moemesh.planning.search`` picks the candidates (``hydra.sweeper.top``, ``include``,
``exclude``), reads each finished job (medians after ``warmup_steps``) and makes the table;
whatever launcher the command selects (the basic one, ``cluster=slurm``'s) runs the jobs.

Every job gets the ordinary overrides of the command plus its split as explicit degrees and a
generated ``parallel.name`` (no preset file needed), and one micro-step count for all layouts
(the largest any of them needs), unless the command sets ``trainer.micro_steps`` or
``trainer.micro_batch_size`` itself; a chosen layout that cannot run at that count is left out
for the next runnable one the planner ranks. A job whose directory already holds a finished
summary.json is not run again (restart a sweep with the same ``hydra.sweep.dir``). A job that
fails is a row with its one-line reason, and the sweep goes on. After the runs: one table
(also ``layouts.md`` and ``layouts.json`` in the sweep directory), the winner by
``hydra.sweeper.objective`` with the command that trains it, and ``moemesh.runs.compare``'s charts
in ``<sweep dir>/compare/``.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module outside
# sys.modules, where a dataclass with string annotations cannot be built.
import contextlib
import dataclasses
import io
import json
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict

from moemesh.config.schema import to_run_config
from moemesh.config.validate import batch_plan
from moemesh.errors import ConfigError
from moemesh.fields import Device
from moemesh.planning import search
from moemesh.planning.cost import SPLIT_KEYS, check_gpus, make_plan, plan_one, train_command, with_dims, with_schedule
from moemesh.runs.steady import WARMUP_RECORDS


@dataclass
class LayoutSweeperConf:
    _target_: str = "hydra_plugins.moemesh_layouts.sweeper.LayoutSweeper"
    top: int = 6  # the planner's best this many fitting splits (0: all)
    include: list[str] = field(default_factory=list)  # layout names or constraints like "ep>=2"
    exclude: list[str] = field(default_factory=list)
    warmup_steps: int = WARMUP_RECORDS  # logged steps left out of the timing medians (moemesh.runs.steady)
    objective: str = "tokens_per_s"  # tokens_per_s | step_s | peak_memory
    charts: bool = True  # moemesh.runs.compare's charts into <sweep dir>/compare/
    # Pipeline schedules to try on each split with pp > 1 (e.g. [1f1b,interleaved_1f1b,zbv]): each
    # is a candidate of its own, ranked by the planner with its bubble; []: the run's schedule.
    schedules: list[str] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="layouts", node=LayoutSweeperConf, provider="moemesh")

_USER_SET_MICRO = ("trainer.micro_steps", "trainer.micro_batch_size")


def _refuse(message: str) -> None:
    from moemesh.config.cli import refuse

    refuse(message)


class _Tee(io.TextIOBase):
    """Writes through to the real stream and keeps the lines that start with "moemesh:"."""

    def __init__(self, stream):
        self.stream, self.lines, self._part = stream, [], ""

    def write(self, s: str) -> int:
        self.stream.write(s)
        self._part += s
        *done, self._part = self._part.split("\n")
        self.lines += [l.strip() for l in done if l.strip().startswith("moemesh:")]
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class LayoutSweeper(Sweeper):
    def __init__(
        self,
        top=6,
        include=(),
        exclude=(),
        warmup_steps=WARMUP_RECORDS,
        objective="tokens_per_s",
        charts=True,
        schedules=(),
    ):
        self.keys = dict(
            top=top,
            include=include,
            exclude=exclude,
            warmup_steps=warmup_steps,
            objective=objective,
            schedules=schedules,
        )
        self.charts = charts
        self.config: Any = None
        self.launcher: Any = None
        self.hydra_context: Any = None
        self.planned_device = "cpu"

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---- before anything runs -----------------------------------------------------------------
    def _jobs(self, arguments: list[str]):
        """(run config, search settings, candidates, per-job overrides); exits 2 with one line."""
        parsed = OverridesParser.create().parse_overrides(arguments)
        swept = [o.input_line for o in parsed if o.is_sweep_override()]
        if swept:
            _refuse(
                f"{swept[0]}: hydra/sweeper=layouts chooses the layouts itself; give every other key one value "
                "(sweep other keys with separate commands)"
            )
        fixed = [o.input_line for o in parsed if o.key_or_group in ("parallel", *SPLIT_KEYS)]
        if fixed:  # each job's layout would replace it: say so rather than ignore it
            _refuse(
                f"{fixed[0]}: hydra/sweeper=layouts chooses each job's layout itself; to measure only some, "
                """name them: 'hydra.sweeper.include=[ep4]' or 'hydra.sweeper.include=["ep>=2&pp==1"]'"""
            )
        run = to_run_config(OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"]))
        try:
            s = search.settings(**{k: _plain(v) for k, v in self.keys.items()}, steps=run.trainer.steps)
            check_gpus(run.cluster.gpus or 0)  # no more than the planner splits (cost.MAX_GPUS)
        except ConfigError as err:
            _refuse(str(err))
        gpus = run.cluster.gpus
        if not gpus or gpus < 1:
            _refuse("hydra/sweeper=layouts needs cluster.gpus: the number of ranks to split, e.g. cluster.gpus=4")
        planned = run
        if run.trainer.device == Device.auto:  # plan for the device the jobs will run on
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            planned = dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, device=device))
        valid, invalid = make_plan(planned, gpus, schedules=s.schedules)
        unknown = search.unknown_names(valid, s)
        if unknown:
            names = ", ".join(search.layout_name(p.dims) for p in valid)
            _refuse(f"{unknown[0]}: not a valid split of cluster.gpus={gpus} for this model (valid: {names})")
        choice = search.choose(valid, s)
        if not choice.chosen:
            why = f"{len(valid)} valid, {len(choice.not_fitting)} do not fit, {len(choice.filtered)} left out by "
            why += "include/exclude"
            _refuse(f"no layout of cluster.gpus={gpus} to run ({why}; {len(invalid)} cannot run)")
        own = [a for a in arguments if a.split("=", 1)[0].lstrip("+~") not in SPLIT_KEYS]
        held = []
        if not any(a.split("=", 1)[0].lstrip("+~") in _USER_SET_MICRO for a in arguments):
            counts = [batch_plan(with_dims(run, c.dims)).micro_steps for c in choice.chosen]
            if len(set(counts)) > 1:  # the balance loss is per micro-step: hold the objective equal
                held = [f"trainer.micro_steps={max(counts)}"]
        if held:  # price what will run: every layout at the held count
            count = dataclasses.replace(planned.trainer, micro_steps=int(held[0].split("=")[1]))
            planned = dataclasses.replace(planned, trainer=count)
            ranked = search.choose(valid, dataclasses.replace(s, top=0)).chosen  # all, in the planner's order
            _keep_runnable(choice, ranked, run, count.micro_steps, s.top)
            for c in choice.chosen:
                p = plan_one(with_schedule(planned, c.schedule), c.dims)
                c.predicted_step_s, c.predicted_bytes = p.step_s, p.total_bytes
        jobs = [[*train_command(run, own, c.dims, c.schedule)[2:], *held] for c in choice.chosen]
        self.planned_device = planned.trainer.device
        return run, s, choice, jobs, own + held

    def _job_dir(self, overrides: list[str], num: int) -> Path:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = num
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    # ---- the sweep ----------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        try:
            run, s, choice, jobs, own = self._jobs(arguments)
            dirs = [self._job_dir(j, i) for i, j in enumerate(jobs)]
        except HydraException as err:
            _refuse(str(err).strip().splitlines()[0])
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        names = [c.label for c in choice.chosen]
        print(
            f"moemesh: layout sweep of cluster.gpus={run.cluster.gpus}: {', '.join(names)} "
            f"(the planner's best {len(names)} of {len(names) + len(choice.cut) + len(choice.filtered)} fitting; "
            f"objective {s.objective})",
            flush=True,
        )
        reasons: dict[int, str] = {}
        pending = []
        for i, d in enumerate(dirs):
            if search.finished(d, run.trainer.steps):
                print(f"moemesh: job #{i} ({names[i]}): finished before ({d / 'summary.json'}); not run again")
            else:
                pending.append(i)
                jobs[i] = _continuing(jobs[i], d, run)
        # The basic launcher runs jobs one after another in this process: one at a time, so a
        # failing job (its SystemExit) cannot end the sweep. Others (SLURM) get all at once.
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        # Job numbers name the job directories (hydra.sweep.subdir): each batch is a contiguous run.
        batches: list[list[int]] = []
        for i in pending:
            if batches and batches[-1][-1] == i - 1 and not isinstance(self.launcher, BasicLauncher):
                batches[-1].append(i)
            else:
                batches.append([i])
        for batch in batches:
            started = time.time()
            ran = self._launch(batch, [jobs[i] for i in batch], lambda i: search.finished(dirs[i], run.trainer.steps))
            if isinstance(self.launcher, BasicLauncher):  # the job ran in this process: so did its signal
                self._stop_if_signalled(batch, dirs, names, started)
            for i in sorted(ran):  # as each batch ends: under the basic launcher, right after the job
                line = f"moemesh: job #{i} ({names[i]}) failed: {ran[i]}; the sweep goes on"
                print(line, file=sys.stderr, flush=True)
            reasons.update(ran)
        measured = []
        for i, d in enumerate(dirs):
            m = search.measure(d, s.warmup_steps)
            if not m.ok and i in reasons:
                m.error = reasons[i]
            measured.append(m)
        rows = search.rank_rows(choice.chosen, measured, s.objective)
        self._report(rows, run, own, s, sweep_dir, dirs, jobs)
        if reasons:  # the table ranks the others; a script running the sweep must see it is short
            failed = ", ".join(f"#{i} ({names[i]})" for i in sorted(reasons))
            print(
                f"moemesh: {len(reasons)} of {len(dirs)} jobs failed: {failed}; {sweep_dir / 'layouts.md'} ranks the "
                "others; run the same command again to retry the failed ones",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1)
        return rows

    @staticmethod
    def _stop_if_signalled(batch: list[int], dirs: list[Path], names: list[str], started: float) -> None:
        """Under the basic launcher (jobs run in this process), a job that a signal stopped (SIGTERM,
        SIGUSR1/2, Ctrl-C: it saved and left) was asked to stop, as was the sweep: end it there, as
        train.py ends (128 + the signal's number), and say how to go on. Only a summary this batch
        wrote counts, not an earlier attempt's. (Under SLURM a signal reaches one job, its time
        limit or a scancel: that job is a failed row and the sweep reports the rest.)"""
        for i in batch:
            signals = search.stopped_by(dirs[i], since=started)
            if signals:
                print(
                    f"moemesh: the sweep was stopped by {'/'.join(signals)} during job #{i} ({names[i]}); "
                    "run the same command again (same hydra.sweep.dir) to go on: finished jobs are not run again",
                    file=sys.stderr,
                    flush=True,
                )
                name = signals[0] if signals[0].startswith("SIG") else "SIGTERM"
                raise SystemExit(128 + int(getattr(signal, name, signal.SIGTERM)))

    def _launch(self, batch: list[int], overrides: list[list[str]], finished) -> dict[int, str]:
        """Run these jobs; {job index: one-line reason} for those that failed. A launcher that
        fails the whole batch (SLURM's exits non-zero when any job failed) fails only the jobs
        that did not finish (``finished(index)``)."""
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        tee = _Tee(sys.stderr)
        reasons: dict[int, str] = {}
        failure = None
        try:
            with contextlib.redirect_stderr(tee):
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0])
            for i, ret in zip(batch, returns):
                if ret.status == JobStatus.FAILED:
                    err = ret._return_value
                    reasons[i] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        except KeyboardInterrupt:
            raise
        except SystemExit as err:
            failure = f"exit code {err.code}"
        except Exception as err:  # noqa: BLE001 - one job's failure is a row, not the sweep's end
            failure = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        for i in batch:
            mine = [l for l in tee.lines if f"job #{i} " in l] if len(batch) > 1 else tee.lines
            errors = [l for l in mine if not l.startswith(("moemesh: every layout", "moemesh: job #"))]
            # A job that ran here and ended without its summary failed, whether the launcher said
            # so or not: train.py returns from a local sweep's failed job so the sweep goes on.
            # (A SLURM job without one may only be queued: cluster.slurm.wait=false.)
            ended_here = isinstance(self.launcher, BasicLauncher) or failure is not None
            if (ended_here and not finished(i)) or i in reasons:
                reasons[i] = _one_line(errors[-1] if errors else reasons.get(i) or failure or "failed")
        return reasons

    def _report(self, rows, run, own: list[str], s, sweep_dir: Path, dirs: list[Path], jobs) -> None:
        md = search.table(rows)
        best = search.winner(rows)
        lines = [md, ""]
        if best is None:
            lines.append("no job finished: nothing to rank")
        else:
            cmd = shlex.join(train_command(run, own, best.candidate.dims, best.candidate.schedule))
            lines.append(f"winner by {s.objective}: {best.candidate.label}; train with it:")
            lines.append(f"  {cmd}")
        text = "\n".join(lines)
        print("\n" + text, flush=True)
        (sweep_dir / "layouts.md").write_text(text + "\n")
        record = [
            {
                "layout": r.candidate.name,
                "schedule": r.candidate.schedule,
                "dir": str(d),
                "overrides": overrides,
                "dims": dataclasses.asdict(r.candidate.dims),
                "predicted_step_s": r.candidate.predicted_step_s,
                "predicted_bytes": r.candidate.predicted_bytes,
                "planner_rank": r.candidate.planner_rank,
                "measured_rank": r.measured_rank,
                "predicted_rank": r.predicted_rank,
                **dataclasses.asdict(r.measured),
            }
            for r, d, overrides in zip(rows, dirs, jobs)
        ]
        # What scripts/calibrate.py needs to plan each job again: its overrides and the device planned for.
        out = {"objective": s.objective, "warmup_steps": s.warmup_steps, "device": self.planned_device, "jobs": record}
        (sweep_dir / "layouts.json").write_text(json.dumps(out, indent=1))
        if self.charts and best is not None:
            _draw_charts(sweep_dir, sweep_dir / "compare")


def _draw_charts(sweep_dir: Path, out: Path) -> None:
    """moemesh.runs.compare's table and charts of the sweep, in this process (its output kept
    quiet: the sweep's own table was printed); the table stands without charts when they fail."""
    from moemesh.runs import compare

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            compare.main([str(sweep_dir), "--out", str(out)])
    except (Exception, SystemExit) as err:  # matplotlib missing, an unreadable run: say so, keep the table
        why = " ".join(str(err).split()) or type(err).__name__
        print(f"moemesh: charts not drawn: {why}", file=sys.stderr)
        return
    print(f"moemesh: charts in {out}/", flush=True)


def _continuing(job: list[str], job_dir: Path, run) -> list[str]:
    """A job that an earlier attempt of this sweep stopped after saving (a signal, a crash)
    goes on from its checkpoint: a fresh run into a directory that holds checkpoints is
    refused (moemesh.parallel.checkpoint.owner_conflict)."""
    from moemesh.parallel.checkpoint import complete_checkpoints

    root = Path(run.checkpoint.dir) if run.checkpoint.dir else job_dir / "checkpoints"
    if run.resume is None and complete_checkpoints(root) and not any(o.startswith("resume=") for o in job):
        return [*job, "resume=auto"]
    return job


def _keep_runnable(choice, ranked: list, run, micro_steps: int, top: int) -> None:
    """The held micro-step count can break a chosen layout's batch arithmetic (global_batch_size
    must be divisible by micro_steps*dp*ep): each launcher would refuse it (SLURM's the whole
    batch). Leave such layouts out, with a note, and take the next runnable ones the planner
    ranks in their place (``top``; 0: all). Only layouts that are valid at their own count and
    not at the held one are left out: any other refusal stays the job's own."""
    from moemesh.config.validate import validate_run

    held = dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, micro_steps=micro_steps))

    def refusal(r, c) -> str | None:
        try:
            validate_run(with_dims(with_schedule(r, c.schedule), c.dims))
        except ConfigError as err:
            return str(err)
        return None

    kept, dropped = [], []
    for c in ranked:
        if top and len(kept) == top:
            break
        why = refusal(held, c)
        if why is not None and refusal(run, c) is None:
            dropped.append((c, why))
        elif c in choice.chosen or why is None:  # a chosen one keeps its own refusal for its row
            kept.append(c)
    if not dropped:
        return
    choice.chosen = kept
    taken = {c.label for c in kept} | {c.label for c, _ in dropped}
    choice.cut = [c.label for c in ranked if c.label not in taken]
    choice.filtered += [c.label for c, _ in dropped]
    print(
        f"moemesh: left out {', '.join(c.label for c, _ in dropped)}: they cannot run at the sweep's "
        f"trainer.micro_steps={micro_steps} (one count for every layout): {dropped[0][1]}; set "
        "trainer.micro_steps or trainer.micro_batch_size to choose another",
        flush=True,
    )


def _one_line(reason: str) -> str:
    """A failed job's reason for its row: one line, without the launcher's repeat of the job's
    overrides ("moemesh: failed: job #1 (parallel.name=... ...), SLURM job 7_1: <reason>")."""
    reason = " ".join(reason.split())
    m = re.match(r"moemesh: failed: job #\d+ \(.*?\), (SLURM job \S+: .*)$", reason)
    return m.group(1) if m else reason


def _plain(value):
    """A DictConfig/ListConfig value as plain Python."""
    from omegaconf import Container

    return OmegaConf.to_container(value) if isinstance(value, Container) else value
