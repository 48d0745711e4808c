"""``hydra/launcher=moemesh_slurm``: SLURM submission for moemesh sweeps (``cluster=slurm`` selects it).

A subclass of hydra-submitit-launcher's SLURM launcher that differs where a
distributed-training sweep needs it to:

* **Allocation per job.** Before anything is submitted, every job of the sweep is
  composed and validated (the same checks as a local run), and its allocation is
  derived from its layout: ``nodes x tasks_per_node`` = world size, one task per rank.
  Jobs that need the same allocation share one job array; a sweep that needs several is
  split into one array per allocation, or rejected (``cluster.slurm.mixed_allocations``).
  Any invalid job stops the whole sweep with one line and exit code 2.
* **Settings from the cluster config.** Partition, account, time limit, constraint,
  extra sbatch parameters and setup lines come from ``cluster.slurm`` of each job, not
  from ``hydra.launcher`` (which Hydra fixes for the whole sweep).
* **Requeue that resumes.** SIGUSR2 before the time limit becomes a save at the next
  step boundary on every rank, after which task 0 hands over to submitit, which requeues
  the job (at most ``cluster.slurm.max_timeouts`` times); a requeued attempt resumes from
  the newest checkpoint in its own run directory (``launch.slurm.resume_setting``).
* **Honest endings.** A rank that raises fails its task (srun then stops the others); a
  SIGTERM stop (preemption, scancel) exits non-zero after saving, so the submitter never
  mistakes it for a finished run (``launch.slurm.after_task``).

The decisions live in ``moemesh/launch/slurm.py``; whether this process is a rank of a launched
job is ``moemesh.launch.env.detect_launcher_env``, the rule train.py and the ranks use. This
module is the Hydra/submitit glue: Hydra and submitit are imported here, never in moemesh.launch.
"""

import contextlib
import io
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class MoemeshSlurmConf:
    _target_: str = "hydra_plugins.moemesh_launcher.launcher.MoemeshSlurmLauncher"
    # submitit's pickles and every task's stdout/stderr (%j: the SLURM job id)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"


ConfigStore.instance().store(group="hydra/launcher", name="moemesh_slurm", node=MoemeshSlurmConf, provider="moemesh")


class _Rejected(Exception):
    """The sweep cannot be submitted; the message is one line."""


class MoemeshSlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    # ---- on the login node -------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            jobs, mixed_policy, wait = self._plan(job_overrides, initial_job_idx)
        except _Rejected as err:
            print(f"moemesh: config error: {err}", file=sys.stderr)
            sys.exit(2)
        from moemesh.launch.slurm import group_jobs, mixed_allocation_error

        groups = group_jobs([j for j, _ in jobs])
        if len(groups) > 1 and mixed_policy == "reject":
            print(f"moemesh: config error: {mixed_allocation_error(groups)}", file=sys.stderr)
            sys.exit(2)
        return self._submit(groups, dict((j.index, full) for j, full in jobs), wait)

    def _plan(self, job_overrides, initial_job_idx):
        """Compose and validate every job; raise _Rejected (one line) before any submission."""
        from moemesh.config.schema import to_run_config
        from moemesh.config.validate import validate_run
        from moemesh.errors import ConfigError
        from moemesh.fields import Launcher
        from moemesh.launch.env import detect_launcher_env
        from moemesh.launch.slurm import SweepJob, allocation_for, validate_slurm

        if detect_launcher_env() is not None:
            raise _Rejected(
                "-m cluster=slurm inside srun/torchrun tasks would submit the sweep once per task; "
                "submit from a shell on the login node"
            )
        if shutil.which("sbatch") is None:
            raise _Rejected(
                "cluster=slurm: sbatch is not on PATH; submit from a SLURM login node (or run here with cluster=local)"
            )
        jobs, problems, runs = [], [], []
        for i, overrides in enumerate(job_overrides):
            index, shown = initial_job_idx + i, _varying(job_overrides, overrides)
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                run = to_run_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
                if run.cluster.launcher != Launcher.slurm:
                    raise ConfigError(
                        f"cluster.launcher={run.cluster.launcher}: this sweep is submitted to SLURM; "
                        "every job needs cluster=slurm"
                    )
                validate_slurm(run)
                dims = validate_run(run)
                alloc = allocation_for(run, dims.world_size)
                sweep_job = SweepJob(index, shown, alloc, run.parallel.name, filter_overrides(list(overrides)))
                jobs.append((sweep_job, list(overrides)))
                runs.append((index, run))
            except ConfigError as err:
                problems.append(f"job #{index} ({' '.join(shown)}): {err}")
            except HydraException as err:  # an unknown preset or key: Hydra's first line, and the choices
                options = getattr(err, "options", None)
                problems.append(
                    f"job #{index} ({' '.join(shown)}): {str(err).strip().splitlines()[0]}"
                    + (f"; valid: {', '.join(options)}" if options else "")
                )
        shared: dict[str, list[int]] = {}
        for job, run in runs:
            if run.checkpoint.dir:
                shared.setdefault(str(Path(run.checkpoint.dir).resolve()), []).append(job)
        for path, indices in shared.items():
            if len(indices) > 1:
                problems.append(
                    f"jobs {', '.join('#' + str(i) for i in indices)} share checkpoint.dir={path}: they would "
                    "overwrite and resume each other's checkpoints; leave it null (each job's run directory)"
                )
        if problems:
            raise _Rejected(
                f"nothing was submitted; {len(problems)} problem(s) in this sweep of "
                f"{len(job_overrides)} job(s): " + " | ".join(problems)
            )
        slurm_cfg = self.config.cluster.slurm
        return jobs, slurm_cfg.mixed_allocations, bool(slurm_cfg.wait)

    def _submit(self, groups, full_overrides: dict[int, list[str]], wait: bool) -> list[JobReturn]:
        import submitit

        from moemesh.launch.slurm import job_name

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        handles = {}
        for alloc, jobs in groups.items():
            executor = submitit.AutoExecutor(
                folder=self.params["submitit_folder"], cluster="slurm", slurm_max_num_timeout=alloc.max_timeouts
            )
            executor.update_parameters(
                **alloc.executor_parameters(name=job_name(jobs), python_path=str(REPO_ROOT), python=sys.executable)
            )
            args = [
                (full_overrides[j.index], "hydra.sweep.dir", j.index, f"job_id_for_{j.index}", Singleton.get_state())
                for j in jobs
            ]
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's error; ours says it
                    submitted = executor.map_array(self, *zip(*args))
            except submitit.core.utils.UncompletedJobError as err:  # sbatch refused (FailedJobError)
                self._refused(alloc, jobs, err, [h for _, h in handles.values()])
            for job, handle in zip(jobs, submitted):
                handles[job.index] = (job, handle)
                print(
                    f"moemesh: job #{job.index} ({' '.join(job.overrides)}): SLURM job {handle.job_id}, "
                    f"{alloc.describe()}",
                    flush=True,
                )
        print(
            f"moemesh: sweep directory {sweep_dir} (one subdirectory per job; logs in {sweep_dir}/.submitit)",
            flush=True,
        )
        if not wait:
            print(
                "moemesh: cluster.slurm.wait=false: not waiting; follow with squeue, then compare with "
                f"python scripts/compare.py {sweep_dir}",
                flush=True,
            )
            return [
                JobReturn(overrides=full_overrides[i], status=JobStatus.COMPLETED, _return_value=h.job_id)
                for i, (_, h) in sorted(handles.items())
            ]
        return self._wait(handles)

    def _wait(self, handles: dict) -> list[JobReturn]:
        """Until every job has ended: each job's outcome in one line, the failed ones last (exit 1).
        Ctrl-C stops the waiting, not the jobs (exit 130)."""
        import submitit

        failures: dict[int, str] = {}
        returns: list[JobReturn] = []
        collected: set[int] = set()
        try:
            failures = self._watch(handles)
            for index, (job, handle) in sorted(handles.items()):
                if index in failures:
                    continue
                try:
                    ret = handle.results()[0]
                except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError) as err:
                    failures[index] = (
                        f"job #{index} ({' '.join(job.overrides)}), SLURM job {handle.job_id}: "
                        f"{_first_moemesh_line(handle, err)}"
                    )
                    continue
                returns.append(ret)
                collected.add(index)
                print(f"moemesh: job #{index} ({' '.join(job.overrides)}): {_outcome(ret)}", flush=True)
        except KeyboardInterrupt:
            # Ctrl-C stops the waiting, not the jobs: say so here, before train.py's handler
            # would report a stopped training run.
            ended = set(failures) | collected
            print(
                _stopped_waiting([h.job_id for i, (_, h) in sorted(handles.items()) if i not in ended]), file=sys.stderr
            )
            sys.exit(130)
        for _, line in sorted(failures.items()):
            print(f"moemesh: failed: {line}", file=sys.stderr)
        if failures:
            sys.exit(1)
        return returns

    @staticmethod
    def _watch(handles: dict) -> dict[int, str]:
        """Until every job has left the queue: print each job's state when it changes, and
        cancel a job SLURM can never start (``_never_starts``). Returns {job index: failure line}
        for those. Polls squeue every 2 s at first, slowing to once a minute after 20 minutes."""
        import subprocess
        import time

        shown, failures, partitions = {}, {}, {}
        waiting, started = dict(handles), time.monotonic()
        while waiting:
            ids = ",".join(h.job_id for _, h in waiting.values())
            out = subprocess.run(
                ["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%r|%P|%D|%c"], capture_output=True, text=True, timeout=60
            )
            if out.returncode != 0 and "Invalid job id" not in out.stderr:
                time.sleep(10)  # the controller is busy or restarting: ask again
                continue
            queue = {f[0]: f[1:] for f in (l.split("|") for l in out.stdout.splitlines()) if len(f) == 6}
            for index, (job, handle) in list(waiting.items()):
                state, reason, partition, nodes, cpus = queue.get(handle.job_id, ("", "", "", "", ""))
                if not state:  # left the queue: finished, failed or cancelled; results() says which
                    del waiting[index]
                    continue
                never = _never_starts(state, reason, partition, nodes, cpus, partitions)
                if never:
                    subprocess.run(["scancel", handle.job_id], capture_output=True, timeout=60)
                    failures[index] = (
                        f"job #{index} ({' '.join(job.overrides)}), SLURM job {handle.job_id}: "
                        f"can never start ({never}); cancelled it"
                    )
                    del waiting[index]
                    continue
                label = state if state != "PENDING" or reason in ("", "None") else f"{state} ({reason})"
                if shown.get(index) != label:
                    shown[index] = label
                    print(f"moemesh: job #{index} ({' '.join(job.overrides)}): {label}", flush=True)
            if waiting:
                time.sleep(min(60.0, 2.0 + (time.monotonic() - started) / 20))
        return failures

    @staticmethod
    def _refused(alloc, jobs, err: Exception, earlier: list) -> None:
        """sbatch refused a submission: cancel what this sweep already submitted, one line, exit 1."""
        reason = " ".join(str(err).split()) or type(err).__name__
        hint = ""
        if "gres" in reason.lower() or "gpu" in reason.lower():
            hint = "; on nodes without GPUs set cluster.slurm.request_gpus=false"
        elif "node configuration is not available" in reason.lower():
            hint = f"; check that the partition has {alloc.nodes} node(s) with {alloc.tasks_per_node} task slots each"
        cancelled = ""
        if earlier:
            import subprocess

            ids = [h.job_id for h in earlier]
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
            cancelled = f"; cancelled this sweep's jobs already submitted ({', '.join(ids)})"
        print(
            f"moemesh: sbatch refused job{'s' if len(jobs) > 1 else ''} {', '.join('#' + str(j.index) for j in jobs)} "
            f"({alloc.describe()}): {reason}{hint}{cancelled}",
            file=sys.stderr,
        )
        sys.exit(1)

    # ---- in each SLURM task (one per rank) ----------------------------------------------
    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Singleton],
    ) -> JobReturn:
        import submitit

        from moemesh.launch.env import launcher_rank
        from moemesh.launch.signals import install_stop_handlers
        from moemesh.launch.slurm import TASK_MARKER, after_task, requeue_signal

        os.environ[TASK_MARKER] = "1"
        requeue_sig = requeue_signal()
        submitit_handler = signal.getsignal(requeue_sig)  # checkpoint() + scontrol requeue + exit
        stop = install_stop_handlers()  # from now on the signal means: save at the next step, then requeue

        Singleton.set_state(singleton_state)
        setup_globals()
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        with open_dict(config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            job.num = job_num
        run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        rank = launcher_rank()  # the rule train.py uses: this task's SLURM_PROCID
        checkpoints = (Path(config.checkpoint.dir) if config.checkpoint.dir else run_dir / "checkpoints").absolute()
        _resume_requeued_attempt(config, checkpoints)
        if rank == 0:  # summary.json must describe this attempt
            (run_dir / "summary.json").unlink(missing_ok=True)
        try:
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=config,
                job_dir_key=job_dir_key,
                job_subdir_key="hydra.sweep.subdir",
            )
        except SystemExit as end:  # train.py's own one-line refusals and stops (its reason is logged)
            if end.code not in (None, 0):
                _leave_failure_for_submitit(f"moemesh: rank {rank} exited with status {end.code}")
            raise

        action = after_task(
            completed=ret.status == JobStatus.COMPLETED,
            rank=rank,
            received=stop.received,
            stopped_early=stop.stopped_early,
            requeue_sig=requeue_sig,
        )
        if action == "fail":
            err = ret._return_value
            first = (str(err).strip().splitlines() or [""])[0]
            line = f"moemesh: error: rank {rank} failed: {type(err).__name__}: {first}"
            print(line, file=sys.stderr, flush=True)
            _leave_failure_for_submitit(line)
            sys.exit(1)
        if action == "interrupted":
            print(_interrupted_line(rank, stop.names(), checkpoints), file=sys.stderr, flush=True)
            sys.exit(128 + stop.received[0])
        if action == "requeue" and callable(submitit_handler):
            # The requeue cancels this job step, and SLURM's SIGTERM to the step could reach
            # submitit's `scontrol requeue` child before it returned: the job was requeued, but
            # the task ended in a CalledProcessError traceback instead of "Requeued job". Nothing
            # is left to save: SIGTERM is ignored from here, by the child too (it inherits that).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _requeue(submitit_handler, requeue_sig, checkpoints, config.cluster.slurm.max_timeouts)
        return ret


def _interrupted_line(rank: int, signals: Sequence[str], checkpoints: Path) -> str:
    """A rank saved and stopped for a signal other than the time-limit one (SIGTERM: scancel,
    or preemption). The task cannot tell which: a preempted job SLURM requeues resumes by itself,
    a cancelled one is not requeued."""
    return (
        f"moemesh: rank {rank} saved and stopped for {'/'.join(signals)}: not finished; a job SLURM "
        f"requeues (preemption) resumes by itself, a cancelled one is not requeued: continue it with "
        f"resume={checkpoints}"
    )


def _requeue(handler, sig: signal.Signals, checkpoints: Path, max_timeouts: int) -> None:
    """Task 0 after the time-limit stop, every rank saved: submitit's handler pickles
    checkpoint(), requeues the job and exits; once cluster.slurm.max_timeouts requeues are used
    up it raises instead, and the task ends with one line saying how to continue."""
    import submitit

    try:
        handler(sig, None)
    except submitit.core.utils.UncompletedJobError as err:
        why = str(err).split("because:", 1)[-1].strip(" .") or "submitit refused"
        line = (
            f"moemesh: stopped by {sig.name} before the time limit and saved, not requeued: {why} "
            f"(cluster.slurm.max_timeouts={max_timeouts}); continue with resume={checkpoints}"
        )
        print(line, file=sys.stderr, flush=True)
        _leave_failure_for_submitit(line)
        sys.exit(1)
    except SystemExit:  # requeued: submitit exits the task
        log.info("moemesh: stopped by %s before the time limit, every rank saved: requeued", sig.name)
        raise


def _resume_requeued_attempt(config, ckpt_dir: Path) -> None:
    from moemesh.launch.slurm import resume_setting
    from moemesh.parallel.checkpoint import resolve

    own = ckpt_dir.is_dir() and bool(resolve("auto", ckpt_dir))
    resume = resume_setting(config.get("resume"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), own)
    if resume != config.get("resume"):
        with open_dict(config):
            config.resume = resume


def _stopped_waiting(job_ids: Sequence[str], timeout_s: float = 10.0) -> str:
    """The line for a Ctrl-C while the submitter waits: the jobs go on; which of ``job_ids`` are
    still in the queue (all of them if squeue cannot say) and how to stop them."""
    import subprocess

    queued = list(job_ids)
    if queued:
        try:
            out = subprocess.run(
                ["squeue", "-h", "-r", "-j", ",".join(queued), "-o", "%i"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            if out.returncode == 0 or "Invalid job id" in out.stderr:  # -r: one line per array task
                in_queue = {line.strip() for line in out.stdout.splitlines()}
                queued = [j for j in queued if j in in_queue]
        except (OSError, subprocess.TimeoutExpired):
            pass  # squeue cannot say: name them all
    if not queued:
        return "moemesh: stopped waiting (Ctrl-C); no job of this sweep is still queued or running"
    return (
        f"moemesh: stopped waiting (Ctrl-C); the SLURM jobs go on: {', '.join(queued)} still queued or running "
        f"(follow with squeue -j {','.join(queued)}; stop them with scancel {' '.join(queued)})"
    )


def _never_starts(state: str, reason: str, partition: str, nodes: str, cpus: str, partitions: dict) -> str | None:
    """Why a queued job can never start (an invalid account or QOS; more nodes than its
    partition has; more CPUs on a node than its largest node has), or None. ``partitions``
    caches ``_partition_size`` by name."""
    if state != "PENDING":
        return None
    if reason in ("InvalidAccount", "InvalidQOS"):
        return f"{reason}: check cluster.slurm.account / cluster.slurm.qos"
    if reason not in ("PartitionConfig", "PartitionNodeLimit") or not nodes.isdigit():
        return None
    if partition not in partitions:
        partitions[partition] = _partition_size(partition)
    have = partitions[partition]
    if have is not None and int(nodes) > have[0]:
        return f"{reason}: it needs {nodes} nodes and partition {partition} has {have[0]}"
    if have is not None and have[1] is not None and cpus.isdigit() and int(cpus) > have[1]:
        return (
            f"{reason}: it needs {cpus} CPUs on a node (its tasks per node x cluster.slurm.cpus_per_task) "
            f"and partition {partition}'s nodes have at most {have[1]}"
        )
    return None


def _partition_size(partition: str) -> tuple[int, int | None] | None:
    """(nodes in all, in any state; CPUs of its largest node, None if sinfo cannot say) of a
    partition, or None if sinfo cannot say."""
    import subprocess

    # --exact: one line per distinct node configuration; without it, nodes of different CPU counts
    # in one state are one line whose count is their least followed by "+".
    out = subprocess.run(
        ["sinfo", "-h", "-e", "-p", partition, "-o", "%D|%c"], capture_output=True, text=True, timeout=60
    )
    rows = [line.split("|") for line in out.stdout.split()]
    groups = [(int(n), c) for n, c in (r for r in rows if len(r) == 2) if n.isdigit()]
    if out.returncode != 0 or not groups:
        return None
    # a CPU count this cannot read (e.g. "32+"): no CPU verdict rather than a wrong one
    cpus = max(int(c) for _, c in groups) if all(c.isdigit() for _, c in groups) else None
    return sum(n for n, _ in groups), cpus


def _outcome(ret: JobReturn) -> str:
    """One line from the job's summary.json: loss, steps, how it ended, where it wrote."""
    try:
        from moemesh.runs.reader import read_json  # size-bounded, a JSON object

        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        summary = read_json(run_dir / "summary.json")
    except Exception:  # noqa: BLE001 - a job without a summary still has a status
        return f"status {ret.status.name}"
    steps = summary.get("start_step", 0) + summary.get("steps", 0)
    loss = summary.get("final_loss")
    line = f"{steps} steps, final loss " + (f"{loss:.4f}" if isinstance(loss, float) else str(loss))
    if summary.get("stopped_by_signal"):
        line += f", stopped early by {'/'.join(summary['stopped_by_signal'])} (checkpoint saved; resume=auto)"
    return f"{line} -> {run_dir}"


def _varying(all_overrides: Sequence[Sequence[str]], overrides: Sequence[str]) -> list[str]:
    """The overrides that tell this job apart from the sweep's others (all of them for one job)."""
    shown = filter_overrides(list(overrides))
    if len(all_overrides) < 2:
        return shown
    common = set.intersection(*(set(o) for o in all_overrides))
    return [o for o in shown if o not in common] or shown


def _leave_failure_for_submitit(line: str) -> None:
    """submitit's record of a task that failed: ("error", text) as the task's result file,
    which submitit itself writes only when the task raises. This task exits through
    sys.exit to keep its log to one line, so it writes the record itself: without it the
    launcher's results() waits 15 s (submitit's allowance for a slow shared filesystem) for a
    file that never comes, on every failed job."""
    import submitit

    try:
        path = submitit.JobEnvironment().paths.result_pickle
        with submitit.core.utils.temporary_save_path(path) as tmp:
            submitit.core.utils.cloudpickle_dump(("error", line), tmp)
    except Exception:  # noqa: BLE001 - the record only saves time; the exit code still fails the job
        pass


# What srun says of a task a signal of its own ended (not srun's SIGTERM to the others, not an
# abort that follows a lost peer): the rank that died first, which its peers' errors only lost.
_KILLED = ("Killed", "Out Of Memory", "Segmentation fault", "Bus error")


def _killed_task(lines: Sequence[str]) -> str | None:
    """The one rank srun saw end by SIGKILL, the OOM killer or a memory fault ("srun: error:
    node3: task 1: Killed"), as one line; None otherwise, and where srun names several tasks at
    once ("tasks 0-3: Killed": SLURM ended them all, e.g. past its KillWait)."""
    import re

    for line in lines:
        m = re.match(r"srun: error: (\S+): task (\d+): (.+)$", line.strip())
        if m and m.group(3).startswith(_KILLED):
            node, task, how = m.groups()
            return f"moemesh: rank {task} on {node} ended: {how} (srun); the other ranks were stopped"
    return None


def _first_moemesh_line(handle: Any, err: Exception) -> str:
    """The job's own one-line reason (the first 'moemesh:' line in its tasks' stderr, where
    moemesh writes only errors and stops), else what submitit says, on one line."""
    try:
        lines = (handle.stderr() or "").splitlines()  # every task's stderr
    except Exception:  # noqa: BLE001 - logs may be gone; fall back to submitit's message
        lines = []
    ours = [l for l in lines if l.startswith("moemesh:")]
    text = str(err)
    died = _killed_task(lines)
    if died:  # one rank a signal ended (SIGKILL, the OOM killer): its peers' errors only say they lost it
        reason = died
    elif ours:
        reason = ours[0]
    elif "not requeued because" in text:  # submitit's own limit: cluster.slurm.max_timeouts
        why = text.split("not requeued because", 1)[1].strip().splitlines()[0].strip(" :.")
        reason = (
            f"not requeued again: {why} (cluster.slurm.max_timeouts); the last checkpoint is in the job's "
            "run directory: resubmit with resume=<run dir>/checkpoints"
        )
    else:
        reason = " ".join(text.split())[:300] or type(err).__name__
    return f"{reason} (logs: {handle.paths.stderr.parent})"
