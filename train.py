"""moemesh entry point: compose the config, validate it, start the ranks, train.

    python train.py                               # tiny MoE, one process, CPU
    python train.py parallel=ep2_dp2              # spawns 4 local ranks
    torchrun --nproc_per_node=4 train.py parallel=ep2_dp2
    deepspeed --num_gpus=4 train.py parallel=ep2_dp2
    python train.py -m parallel=ep4,ep2_dp2,dp4   # a local sweep
    python train.py -m cluster=slurm parallel=ep8_dp2,ep2_dp8   # one SLURM job each

Before Hydra creates a directory or a rank starts, every job of the command is composed
and checked (``conf.cli.preflight``): a mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moemesh.config.cli import needs_preflight, preflight, refuse, repeated_keys
from moemesh.config.schema import register_schema, to_run_config
from moemesh.config.validate import batch_plan, validate_run
from moemesh.errors import CheckpointError, ConfigError, DataError, RanksFailed, first_line
from moemesh.fields import Launcher
from moemesh.launch import forkserver
from moemesh.launch.access import set_output_umask
from moemesh.launch.env import detect_launcher_env, launcher_rank, leftover_hint, strip_local_rank_args
from moemesh.launch.signals import install_stop_handlers
from moemesh.launch.slurm import TASK_MARKER

# Nothing above imports torch: a command that spawns ranks here starts their fork server first
# (_start_rank_server), and the server imports torch and the trainer while this process does,
# in the functions below that need them. TRAIN names the training function: a launcher that
# spawns the ranks never imports its module (the server does), nor, on a fresh run, DCP.
TRAINER = "moemesh.trainer.loop"
TRAIN = f"{TRAINER}:train"

register_schema()
# Under torchrun/srun every rank runs Hydra: only rank 0 gets the dated run directory,
# .hydra/ and the log file; the others resolve to harmless values (see conf/config.yaml).
OmegaConf.register_new_resolver(
    "moemesh_rank0", lambda if_rank0, otherwise=None: if_rank0 if launcher_rank() == 0 else otherwise, replace=True
)


def _refuse(message: str) -> None:
    refuse(message)  # one line, exit 2, no environment variable's value (cli.hide_env)


def _validate(run, env):
    """validate_run; a world size that only the launcher's variables contradict also says
    what to unset when no launcher set them (leftovers in a shell)."""
    try:
        return validate_run(run, env.world_size if env else None)
    except ConfigError as err:
        if env is None:
            raise
        try:
            validate_run(run, None)
        except ConfigError:
            raise err from None
        raise ConfigError(f"{err}{leftover_hint(env)}") from None


def _local_world_sizes(command, env) -> list[int]:
    """The world size of each job of this command that trains on this machine without a launcher
    (bare train.py, cluster.launcher=local); none under one. Empty if a job's arithmetic fails."""
    if env is not None:
        return []
    sizes = []
    for job in command.jobs:
        if job.run.cluster.launcher != Launcher.local:
            continue
        try:
            sizes.append(validate_run(job.run, None).world_size)
        except ConfigError:
            return []  # refused below, with every job's problem
    return sizes


def _start_rank_server(sizes: list[int]) -> bool:
    """If a job of this command spawns ranks on this machine (more than one rank), start their
    fork server now, once the jobs are composed and their arithmetic holds: it imports torch and
    the trainer while this process does the same and runs the checks that need them. A command
    refused after this stops it (forkserver.session, in cli). Returns whether it started."""
    if not any(n > 1 for n in sizes) or not forkserver.early(TRAINER):
        return False
    # Until the ranks exist (spawn_ranks takes SIGTERM over), SIGTERM ends this process through
    # the session's cleanup, which stops the server, not around it.
    signal.signal(signal.SIGTERM, _terminated)
    return True


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _check_command(argv: list[str]) -> list[str]:
    """Compose and validate every job of this command; return argv, completed where a sweep
    needs it (one micro-step count for all its layouts). Exits 2 with one line on a mistake."""
    env = detect_launcher_env()
    command = preflight(argv, launched=env is not None)
    if launcher_rank() == 0:
        for warning in repeated_keys(argv):
            print(f"moemesh: warning: {warning}", file=sys.stderr)
    # Before Hydra creates the run directory: who may read what this command writes.
    set_output_umask([job.run for job in command.jobs])
    if env is not None and command.multirun and not os.environ.get(TASK_MARKER):
        # A sweep started under torchrun/srun would run once per rank. The SLURM launcher's
        # own tasks are the exception: there each task is one rank of one sweep job.
        raise ConfigError(
            f"-m (multirun) under {env.kind}: every rank would run the sweep on its own; "
            "start sweeps from a plain shell (python train.py -m ...), which spawns each job's ranks, "
            "or submit them with python train.py -m cluster=slurm ..."
        )
    sizes = _local_world_sizes(command, env)
    started = _start_rank_server(sizes)
    from moemesh.launch.checks import check_fits_host, check_launcher, device_type, host_memory_bytes
    from moemesh.trainer.data import check_data

    problems = []
    common = set.intersection(*(set(job.overrides) for job in command.jobs)) if len(command.jobs) > 1 else set()
    host = None
    for i, job in enumerate(command.jobs):
        try:
            dims = _validate(job.run, env)
            if job.run.cluster.launcher == Launcher.slurm and command.multirun:
                # What the SLURM launcher checks, found before Hydra makes the sweep directory.
                from moemesh.launch.slurm import allocation_for, validate_slurm

                validate_slurm(job.run)
                allocation_for(job.run, dims.world_size)
            else:  # it trains on this machine
                check_launcher(job.run, env, dims)
                # The ranks this machine will hold: all of them when this process spawns them, else
                # the launcher's ranks here (LOCAL_WORLD_SIZE, SLURM's tasks on this node).
                host = host or host_memory_bytes()
                check_fits_host(
                    job.run,
                    dims,
                    ranks_here=env.local_world_size if env else None,
                    host_bytes=host,
                    device_type=device_type(job.run),
                )
            spec = check_data(job.run.data, seq_len=job.run.trainer.seq_len, vocab_size=job.run.model.vocab_size)
            if job.run.resume not in (None, "auto"):  # another model, past the steps, another data position
                from moemesh.trainer.checkpointing import check_resume

                check_resume(job.run, spec)
        except ConfigError as err:
            if not command.multirun:
                raise
            shown = [o for o in job.overrides if o not in common] or list(job.overrides)
            problems.append(f"job #{i} ({' '.join(shown)}): {err}")
    if problems:
        verb = "submitted" if any(job.run.cluster.launcher == Launcher.slurm for job in command.jobs) else "run"
        raise ConfigError(
            f"nothing was {verb}; {len(problems)} problem(s) in this sweep of {len(command.jobs)} "
            "job(s): " + " | ".join(problems)
        )
    if started and 1 in sizes:
        # A job of this sweep trains in this process: import the trainer now, while the server
        # imports it too, not later on its own (a spawning job never imports it here).
        importlib.import_module(TRAINER)
    return _held_micro_steps(argv, command)


def _held_micro_steps(argv: list[str], command) -> list[str]:
    """A sweep whose layouts would take different micro-step counts: argv with the largest held for
    all (one objective), unless the user chose a count; a warning where none divides."""
    if not (command.multirun and len(command.jobs) > 1):
        return argv
    counts = {job.run.parallel.name: batch_plan(job.run).micro_steps for job in command.jobs}
    if len(set(counts.values())) > 1:
        # The balance loss is computed per micro-step: different counts, different objectives.
        chosen = any(
            o.split("=", 1)[0].lstrip("+") in ("trainer.micro_steps", "trainer.micro_batch_size")
            for job in command.jobs
            for o in job.overrides
        )
        unset = all(j.run.trainer.micro_steps is None and j.run.trainer.micro_batch_size is None for j in command.jobs)
        if unset and not chosen:
            # Held equal by default: every layout takes the largest count any of them needs.
            held = [*argv, f"trainer.micro_steps={max(counts.values())}"]
            try:
                held = _check_command(held)
            except ConfigError:
                pass  # the global batch does not divide: say so below instead
            else:
                print(
                    f"moemesh: every layout of this sweep takes {max(counts.values())} micro-steps per optimizer "
                    f"step (trainer.micro_steps), so all optimise the same objective"
                )
                return held
        shown = ", ".join(f"{name}: {n}" for name, n in counts.items())
        print(
            f"moemesh: warning: this sweep mixes micro-step counts ({shown}), so its layouts optimise "
            "different balance losses; set trainer.micro_steps=N to compare like with like",
            file=sys.stderr,
        )
    return argv


# The jobs of a local sweep (run in this process, one after another), and those that failed:
# (job directory, reason). cli() names the failed ones once the sweep has ended.
_SWEEP_JOBS: list[str] = []
_SWEEP_FAILED: list[tuple[str, str]] = []


def _resume_line(argv: list[str], output_dir: str, job_overrides: list[str] | None = None) -> str:
    """The command that continues a run a signal stopped. A sweep's job (``job_overrides``, its
    own overrides) continues as a single run in its directory: ``-m`` would ignore
    ``hydra.run.dir`` and start the whole sweep again in a new one."""
    given = argv if job_overrides is None else job_overrides
    kept = [a for a in given if a not in ("-m", "--multirun") and not a.startswith(("resume=", "hydra.run.dir="))]
    line = shlex.join(["python", "train.py", *kept, f"hydra.run.dir={output_dir}", "resume=auto"])
    return line if job_overrides is None else f"{line} (the sweep's later jobs did not start)"


def _stop_message(stopped: list, steps: int, argv: list[str], output_dir: str, job, sweeper: str | None) -> str:
    """The line a run a signal stopped ends with. A job of another sweeper than Hydra's basic one
    (the layout search) gets no resume line: that sweeper says how to go on, the same command again."""
    line = f"moemesh: stopped by {'/'.join(stopped)} after step {steps}; checkpoint saved"
    if sweeper is not None and not sweeper.endswith(".BasicSweeper"):
        return line
    return f"{line}; resume with: {_resume_line(argv, output_dir, job)}"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from moemesh.launch.checks import check_launcher
    from moemesh.launch.run import run_ranks
    from moemesh.trainer.data import prepare_data

    env = detect_launcher_env()
    if env is not None:
        # This process is one rank: a preemption or time-limit signal during start-up must
        # become a stop request too, not kill it (spawned ranks install theirs when they start).
        install_stop_handlers()
    hc = HydraConfig.get()
    output_dir = hc.runtime.output_dir
    # A local sweep runs its jobs here one after another: one job's failure is that job's, and
    # the sweep goes on (under SLURM, or torchrun, this process is a job's own).
    local_sweep = hc.mode == RunMode.MULTIRUN and str(hc.launcher.get("_target_", "")).endswith(".BasicLauncher")
    if local_sweep:
        _SWEEP_JOBS.append(Path(output_dir).name)
    try:
        run = to_run_config(cfg)
        set_output_umask([run])  # this job's (a sweep's may differ)
        dims = _validate(run, env)
        check_launcher(run, env, dims)
        data_paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
        if run.resume not in (None, "auto"):  # its data position, now that the data is known
            from moemesh.trainer.checkpointing import check_resume

            check_resume(run, data_paths)
    except ConfigError as err:
        # Checked before Hydra ran too; what only shows here (a file removed since) leaves
        # nothing behind either.
        _remove_if_untouched(Path(output_dir))
        _refuse(str(err))
    if run.logger.group is None and hc.mode == RunMode.MULTIRUN:
        # A sweep's runs share a wandb group: the sweep directory, e.g. "2026-11-29/06-11-17".
        group = "/".join(Path(hc.sweep.dir).parts[-2:])
        run = dataclasses.replace(run, logger=dataclasses.replace(run.logger, group=group))
    try:
        summary = run_ranks(run, dims, env, output_dir, data_paths, TRAIN)
    except ConfigError as err:  # launcher variables that no job answered (launch.run._unlaunched_store)
        _remove_if_untouched(Path(output_dir))
        _refuse(str(err))
    except (FloatingPointError, CheckpointError, DataError, RanksFailed) as err:  # a reason it can name
        return _job_failed(err, Path(output_dir), local_sweep)
    except Exception as err:
        if not (local_sweep and dims.world_size == 1):
            raise
        # A one-rank job trains in this process: in a sweep its failure is the job's, as a spawned
        # rank's is (one line; the traceback goes to its train.log), and the sweep goes on.
        return _job_failed(err, Path(output_dir), local_sweep)
    if summary is None and launcher_rank() == 0:  # spawned ranks: read rank 0's summary back
        from moemesh.runs.reader import read_json  # size-bounded, a JSON object

        summary = read_json(Path(output_dir) / "summary.json")
    stopped = (summary or {}).get("stopped_by_signal")
    if stopped and not os.environ.get(TASK_MARKER) and launcher_rank() == 0:
        # Saved, not finished: exit non-zero, so no script mistakes this run for a complete one.
        # (A SLURM task leaves this to the launcher plugin, which requeues on the time limit.)
        steps = summary.get("start_step", 0) + summary.get("steps", 0)
        job = list(hc.overrides.task) if hc.mode == RunMode.MULTIRUN else None
        sweeper = str(hc.sweeper.get("_target_", "")) if job is not None else None
        print(_stop_message(stopped, steps, sys.argv[1:], output_dir, job, sweeper), file=sys.stderr)
        name = stopped[0] if stopped[0].startswith("SIG") else "SIGTERM"
        sys.exit(128 + int(getattr(signal, name, signal.SIGTERM)))
    return None if summary is None else summary.get("final_loss")


def _job_failed(err: BaseException, run_dir: Path, local_sweep: bool) -> None:
    """A job that stopped for a reason it can name: in a local sweep, record it (cli() names it at
    the end) and return, so the sweep goes on; otherwise exit 1."""
    if isinstance(err, RanksFailed):
        reason = err.reason  # the launcher printed it
    elif isinstance(err, (FloatingPointError, CheckpointError, DataError)):
        reason = f"{type(err).__name__}: {err}"
        print(f"moemesh: {reason}", file=sys.stderr)
    else:
        reason = f"rank 0 failed: {type(err).__name__}: {first_line(str(err))}"
        print(f"moemesh: {reason}", file=sys.stderr)
        _append_traceback(run_dir)
    if local_sweep:  # the directory stays: a job without a summary, as compare.py lists it
        _SWEEP_FAILED.append((run_dir.name, reason))
        return None
    refused = isinstance(err, CheckpointError) or (isinstance(err, RanksFailed) and err.kind == "CheckpointError")
    if refused and launcher_rank() == 0:  # a checkpoint refused before step 1 (a resume): nothing trained
        _remove_if_untouched(run_dir)
    sys.exit(1)


def _append_traceback(run_dir: Path) -> None:
    """The exception being handled, as a traceback at the end of the job's train.log."""
    import traceback

    try:
        with open(run_dir / "train.log", "a") as log:
            traceback.print_exc(file=log)
    except OSError:
        pass


def _remove_if_untouched(run_dir: Path) -> None:
    """A refused run leaves no directory: remove it if it holds only Hydra's own files (and the
    checkpoint directory, still empty)."""
    try:
        ckpts = run_dir / "checkpoints"
        if ckpts.is_dir() and not ckpts.is_symlink() and not any(ckpts.iterdir()):
            ckpts.rmdir()
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
            import shutil

            shutil.rmtree(run_dir)
    except OSError:
        pass


def cli() -> None:
    # deepspeed's launcher passes --local_rank=N (torch.distributed.launch, --local-rank=N)
    # before the overrides; the rank comes from the environment it also sets.
    try:
        argv = strip_local_rank_args(sys.argv[1:])
    except ConfigError as err:
        _refuse(str(err))
    sigterm = signal.getsignal(signal.SIGTERM)  # _start_rank_server may replace it
    try:
        # A fork server started for this command's ranks ends with it, however it ends.
        with forkserver.session():
            try:
                if needs_preflight(argv):
                    argv = _check_command(argv)
            except ConfigError as err:
                _refuse(str(err))
            sys.argv = [sys.argv[0], *argv]
            _SWEEP_JOBS.clear()
            _SWEEP_FAILED.clear()
            main()
        if _SWEEP_FAILED:
            failed = "; ".join(f"{job}: {reason}" for job, reason in _SWEEP_FAILED)
            print(
                f"moemesh: {len(_SWEEP_FAILED)} of {len(_SWEEP_JOBS)} sweep jobs failed (the others ran): {failed}",
                file=sys.stderr,
            )
            sys.exit(1)
    except KeyboardInterrupt:
        print("moemesh: SIGINT: stopped at once, nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
    finally:
        if signal.getsignal(signal.SIGTERM) is _terminated and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)  # ours only: a caller in this process (a test) gets its own back


if __name__ == "__main__":
    cli()
