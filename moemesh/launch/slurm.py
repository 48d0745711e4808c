"""SLURM submission, decided before anything is submitted.

``python train.py -m cluster=slurm parallel=ep8_dp2,ep2_dp8`` goes through the Hydra
launcher in ``hydra_plugins/moemesh_launcher``; this module holds what it decides:

  * each job's **allocation**: ``nodes x tasks_per_node`` = the layout's world size, one
    task per rank (and per GPU), ``tasks_per_node = min(world size, cluster.gpus_per_node)``.
    Ranks are numbered node by node, so tensor-parallel peers and EP groups (innermost in
    the rank order) stay inside a node whenever they fit in one.
  * the **sweep's groups**: Hydra fixes launcher settings before a sweep's jobs are
    composed, so one job array cannot give its jobs different node counts. Every job of
    the sweep is composed and validated here first; jobs with the same allocation share
    one job array, and a sweep that needs several allocations is split into one array per
    allocation (``cluster.slurm.mixed_allocations=split``) or rejected before anything is
    submitted (``reject``).
  * **a lost node**: the rank that finds a whole other host gone (``launch.heartbeat``) asks
    SLURM to requeue the job (``requeue_job``), as SLURM itself does on a node failure it
    notices: the requeued attempt resumes from the last checkpoint once nodes are back.
  * the **requeue signal**: submitit asks SLURM for SIGUSR2 ``signal_delay_s`` before the
    time limit; the ranks turn it into a stop request, save at the next step boundary, and
    the launcher's task then lets submitit requeue the job, and the requeued attempt resumes
    from its own run directory (``resume_setting``; what each task does: ``after_task``).

Nothing here imports torch: the launcher runs on login nodes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError

MIXED_ALLOCATIONS = ("split", "reject")
TASK_MARKER = "MOEMESH_SUBMITIT_TASK"  # set in the launcher's tasks: train.py accepts -m there


@dataclass(frozen=True)
class Allocation:
    """What sbatch is asked for; jobs with equal allocations share one job array."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0: no GPUs requested
    time_min: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    signal_delay_s: int = 120
    max_timeouts: int = 3
    additional: tuple = field(default=())  # sorted (key, value) pairs
    setup: tuple = field(default=())
    interface: str | None = None  # cluster.interface: MASTER_ADDR is the first node's address on it

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        extra = [
            f"{k}={v}"
            for k, v in (
                ("partition", self.partition),
                ("account", self.account),
                ("qos", self.qos),
                ("constraint", self.constraint),
            )
            if v
        ]
        if self.time_min:
            extra.append(f"time {self.time_min} min")
        return f"{self.world_size} ranks = {nodes} x {self.tasks_per_node} tasks" + (
            f" ({', '.join(extra)})" if extra else ""
        )

    def executor_parameters(
        self, *, name: str, python_path: str | None = None, python: str = "python"
    ) -> dict[str, Any]:
        """Keyword arguments for ``submitit.AutoExecutor.update_parameters``. ``python``: the
        interpreter the batch script runs (it prints cluster.interface's address there)."""
        params: dict[str, Any] = {
            "name": name,
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "timeout_min": self.time_min,
            "slurm_signal_delay_s": self.signal_delay_s,
            # A rank that dies takes the step down with it: no rank waits out the collective timeout.
            # Block distribution: ranks fill a node before the next, as the mesh assumes.
            "slurm_srun_args": ["--kill-on-bad-exit=1", "--distribution=block"],
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
            # Since SLURM 22.05 srun no longer inherits sbatch's --cpus-per-task.
            params["slurm_srun_args"].append(f"--cpus-per-task={self.cpus_per_task}")
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        # --requeue: a node failure or preemption puts the job back in the queue, and it resumes.
        # requeue=false is --no-requeue: leaving --requeue out is not enough, SLURM's default
        # (JobRequeue=1) requeues a batch job anyway. Any other flag set to false is left out.
        extra = dict(self.additional)
        on, off = extra.pop("requeue", True), extra.pop("no-requeue", False)
        requeue = on is not False and off is not True
        extra = {k: v for k, v in extra.items() if v is not False}
        params["slurm_additional_parameters"] = {"requeue": True, **extra} if requeue else {"no-requeue": True, **extra}
        # The submitting shell's environment reaches the job (sbatch --export=ALL): rank
        # variables left in it must not override the ones each task derives.
        setup = ["unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT", *self.setup]
        if self.interface:
            # The batch script runs on the first node, rank 0's: its address on the interface is
            # where rank 0's store listens and every rank connects.
            query = f"{shlex.quote(python)} -m moemesh.launch.store address {shlex.quote(self.interface)}"
            setup.insert(1, f"MASTER_ADDR=$({query}) || exit 2; export MASTER_ADDR")
        if python_path:  # the tasks import this repository's packages wherever sbatch starts them
            setup.insert(0, f"export PYTHONPATH={python_path}${{PYTHONPATH:+:$PYTHONPATH}}")
        if setup:
            params["slurm_setup"] = setup
        return params


def allocation_for(run: RunConfig, world_size: int) -> Allocation:
    """The allocation one job needs; ConfigError when SLURM cannot give it evenly."""
    s, per_node = run.cluster.slurm, run.cluster.gpus_per_node
    if world_size <= per_node:
        nodes, tasks = 1, world_size
    elif world_size % per_node:
        raise ConfigError(
            f"parallel={run.parallel.name} needs {world_size} ranks, not a multiple of cluster.gpus_per_node="
            f"{per_node}: the nodes would hold unequal numbers of ranks; valid: a layout of at most "
            f"{per_node} ranks or a multiple of {per_node}"
        )
    else:
        nodes, tasks = world_size // per_node, per_node
    return Allocation(
        nodes=nodes,
        tasks_per_node=tasks,
        gpus_per_node=tasks if s.request_gpus else 0,
        time_min=s.time_min,
        partition=s.partition,
        account=s.account,
        qos=s.qos,
        constraint=s.constraint,
        cpus_per_task=s.cpus_per_task,
        mem_gb=s.mem_gb,
        signal_delay_s=s.signal_delay_s,
        max_timeouts=s.max_timeouts,
        additional=_additional(s.additional_parameters),
        setup=tuple(s.setup),
        interface=run.cluster.interface,
    )


# sbatch options moemesh sets itself (as sbatch spells them), and where each comes from. One in
# cluster.slurm.additional_parameters would override the derived allocation behind the
# launcher's back (--ntasks-per-node=1 for an 8-rank layout: every rank but one missing).
DERIVED_OPTIONS = {
    **dict.fromkeys(
        ("nodes", "ntasks", "ntasks-per-node", "gpus", "gpus-per-node", "gpus-per-task"),
        "it follows the layout: choose the layout (parallel=...) and cluster.gpus_per_node",
    ),
    "time": "set cluster.slurm.time_min instead",
    "signal": "set cluster.slurm.signal_delay_s instead",
    "cpus-per-task": "set cluster.slurm.cpus_per_task instead",
    "mem": "set cluster.slurm.mem_gb instead",
    **{key: f"set cluster.slurm.{key} instead" for key in ("partition", "account", "qos", "constraint")},
    **dict.fromkeys(("job-name", "output", "error", "open-mode", "array", "wckey"), "the launcher needs its own"),
}


def _additional(parameters: Mapping[str, Any]) -> tuple:
    """cluster.slurm.additional_parameters as sorted (option, value) pairs, option spelled as sbatch
    does (mail_type: mail-type); ConfigError for an option moemesh derives itself."""
    pairs = {}
    for key, value in parameters.items():
        option = str(key).replace("_", "-")
        if option in DERIVED_OPTIONS:
            raise ConfigError(
                f"cluster.slurm.additional_parameters.{key}={value}: moemesh sets --{option} itself; "
                f"{DERIVED_OPTIONS[option]}"
            )
        pairs[option] = _sbatch_value(value)
    return tuple(sorted(pairs.items()))


def _sbatch_value(value):
    """A value sbatch can take and the allocation can be compared by: lists become a,b,c."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        raise ConfigError(
            f"cluster.slurm.additional_parameters: {value} is a mapping; sbatch options take a "
            "value, a list (joined with commas) or true/false"
        )
    return value


def validate_slurm(run: RunConfig) -> None:
    s = run.cluster.slurm
    if s.mixed_allocations not in MIXED_ALLOCATIONS:
        raise ConfigError(
            f"cluster.slurm.mixed_allocations={s.mixed_allocations!r} is not one of {', '.join(MIXED_ALLOCATIONS)}"
        )
    if s.time_min < 1:
        raise ConfigError(f"cluster.slurm.time_min={s.time_min} must be a positive number of minutes")
    if not 0 <= s.signal_delay_s < s.time_min * 60:
        raise ConfigError(
            f"cluster.slurm.signal_delay_s={s.signal_delay_s} must be in [0, time_min*60="
            f"{s.time_min * 60}): the save-and-requeue signal comes this long before the limit"
        )
    if s.max_timeouts < 0:
        raise ConfigError(f"cluster.slurm.max_timeouts={s.max_timeouts} must be >= 0")
    for key in ("cpus_per_task", "mem_gb"):
        value = getattr(s, key)
        if value is not None and value < 1:
            raise ConfigError(f"cluster.slurm.{key}={value} must be a positive integer or null")


@dataclass
class SweepJob:
    index: int  # Hydra's job number
    overrides: Sequence[str]  # the job's overrides, as the user would type them
    allocation: Allocation
    layout: str = ""  # parallel.name, for the SLURM job name
    # every override of the job, the sweep's common ones too: a command that reruns it (overrides if empty)
    all_overrides: Sequence[str] = ()


def job_name(jobs: Sequence[SweepJob]) -> str:
    """What squeue shows: moemesh-<layout> for one job or one layout, moemesh-sweep otherwise."""
    layouts = {j.layout for j in jobs}
    return f"moemesh-{layouts.pop()}" if len(layouts) == 1 and "" not in layouts else "moemesh-sweep"


def group_jobs(jobs: Sequence[SweepJob]) -> dict[Allocation, list[SweepJob]]:
    """Jobs by allocation, in the order of their first job."""
    groups: dict[Allocation, list[SweepJob]] = {}
    for job in jobs:
        groups.setdefault(job.allocation, []).append(job)
    return groups


def mixed_allocation_error(groups: dict[Allocation, list[SweepJob]], command: str = "python train.py -m") -> str:
    """One line: what the allocations are and the sweeps that would each have one."""
    parts, commands = [], []
    for alloc, jobs in groups.items():
        parts.append(
            f"{alloc.describe()} for job{'s' if len(jobs) > 1 else ''} {', '.join('#' + str(j.index) for j in jobs)}"
        )
        commands.append(f"{command} {_swept_command(jobs)}")
    return (
        f"cluster.slurm.mixed_allocations=reject and this sweep needs {len(groups)} different allocations: "
        f"{'; '.join(parts)}. Split it into one sweep per allocation: {'  and  '.join(commands)} "
        f"(or set cluster.slurm.mixed_allocations=split: one job array per allocation)"
    )


def _swept_command(jobs: Sequence[SweepJob]) -> str:
    """Every override of these jobs folded back into one sweep (k=a,b where they differ), the
    sweep's common ones (cluster=slurm, trainer.steps=...) too, quoted for a shell."""
    keys: dict[str, list[str]] = {}
    for job in jobs:
        for item in job.all_overrides or job.overrides:
            key, _, value = item.partition("=")
            values = keys.setdefault(key, [])
            if value not in values:
                values.append(value)
    return " ".join(shlex.quote(f"{k}={','.join(v)}") for k, v in keys.items())


def after_task(*, completed: bool, rank: int, received: Sequence[int], stopped_early: bool, requeue_sig: int) -> str:
    """What a SLURM task does once its rank's training returned.

    fail: the rank raised; exit non-zero so srun (--kill-on-bad-exit) stops the other
      ranks now instead of after the collective timeout, and the job is marked FAILED.
    requeue: task 0 after a stop for the time-limit signal (every rank has saved):
      hand over to submitit, which requeues the job.
    interrupted: stopped and saved for another signal (SIGTERM: preemption or scancel):
      exit non-zero, so the submitter does not mistake the saved run for a finished one;
      a preempted job is requeued by SLURM and resumes.
    done: finished (or a rank > 0 after the time-limit stop: task 0 requeues).
    """
    if not completed:
        return "fail"
    if not stopped_early:
        return "done"
    if requeue_sig in received:
        return "requeue" if rank == 0 else "done"
    return "interrupted"


def resume_setting(resume: str | None, restart_count: int, own_checkpoints: bool) -> str | None:
    """``resume`` for one attempt of a SLURM job: a requeued attempt (restart count > 0)
    resumes from its own directory's checkpoint when there is one; a first attempt keeps
    the user's setting, so a reused sweep directory is never resumed by surprise (and a fresh
    run there is refused before step 1: parallel.checkpoint.owner_conflict)."""
    if restart_count > 0 and own_checkpoints:
        return "auto"
    return resume


def requeue_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (SIGUSR2 unless overridden)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, "SIG" + name.removeprefix("SIG"))


def requeue_job(environ: Mapping[str, str] = os.environ, timeout_s: float = 15.0) -> str:
    """After a lost node: requeue this SLURM batch job (``scontrol requeue``; SLURM refuses a job
    submitted with --no-requeue, or an interactive one). Returns the clause the report line
    ends with; "" outside a SLURM job step."""
    job = environ.get("SLURM_JOB_ID")
    if not job or "SLURM_STEP_ID" not in environ:
        return ""
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"; SLURM job {job} could not be requeued ({type(err).__name__}: {err})"
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[0]
        return f"; SLURM job {job} was not requeued ({reason})"
    return f"; SLURM job {job} requeued: it resumes from its last checkpoint"
