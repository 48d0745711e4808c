"""Where ranks come from, and the start/stop of one rank's process group.

Three ways in, decided once per process:
  * torchrun (or any env:// launcher): RANK, WORLD_SIZE, MASTER_ADDR are set; join.
  * srun: SLURM_PROCID, SLURM_NTASKS (and a step id) are set; map them to the
    env:// variables and join.
  * bare `python train.py`: spawn world_size local ranks. They rendezvous through
    a file store (nothing listens on the network) and gloo talks over loopback.
If any spawned rank fails, the others are terminated and the parent exits non-zero.
"""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from conf.schema import ConfigError, RunConfig
from kernels import backend_problem
from parallel.dims import ParallelDims
from parallel.mesh import build_mesh


@dataclass(frozen=True)
class LauncherEnv:
    kind: str  # "torchrun" | "srun"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def detect_launcher_env(environ: Mapping[str, str] = os.environ) -> LauncherEnv | None:
    if "RANK" in environ and "WORLD_SIZE" in environ and "MASTER_ADDR" in environ:
        return LauncherEnv(
            kind="torchrun",
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
        )
    # An srun task has a step id; the batch script itself (also SLURM_PROCID=0) does not.
    # A one-task step (an interactive `srun --pty bash`) is a shell, not a launcher: spawn there.
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        ntasks = int(environ["SLURM_NTASKS"])
        return LauncherEnv(
            kind="srun",
            rank=int(environ["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            local_world_size=_slurm_tasks_on_this_node(environ, ntasks),
        )
    return None


def _slurm_tasks_on_this_node(environ, ntasks: int) -> int:
    # e.g. "4(x2)" or "4,2": the first entry is enough to share this node's cores fairly.
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key, "").split("(")[0].split(",")[0]
        if value.isdigit():
            return int(value)
    return ntasks


def strip_local_rank_args(argv: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """argv without the ``--local_rank=N`` / ``--local-rank=N`` (or ``--local_rank N``) that
    deepspeed's and torch.distributed.launch's launchers insert; the value must agree with
    ``LOCAL_RANK`` when both are given (the environment is what this process joins with)."""
    kept, seen, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value, e.g. {name}=0")
                value, i = argv[i + 1], i + 1
            if not value.isdigit():
                raise ConfigError(f"{name}={value}: expected a non-negative integer")
            seen = int(value)
        else:
            kept.append(arg)
        i += 1
    if seen is not None and "LOCAL_RANK" in environ and int(environ["LOCAL_RANK"]) != seen:
        raise ConfigError(f"--local_rank={seen} disagrees with LOCAL_RANK={environ['LOCAL_RANK']} from the launcher's "
                          "environment; start ranks with deepspeed, torchrun or srun, not by hand")
    return kept


def launcher_rank(environ: Mapping[str, str] = os.environ) -> int:
    env = detect_launcher_env(environ)
    return env.rank if env else 0


def check_launcher(run: RunConfig, env: LauncherEnv | None, dims: ParallelDims) -> None:
    """The cluster config and the environment must agree; raises ConfigError."""
    launcher = run.cluster.launcher
    if launcher == "torchrun" and (env is None or env.kind != "torchrun"):
        raise ConfigError(
            f"cluster.launcher=torchrun but this process has no torchrun environment (RANK, WORLD_SIZE, "
            f"MASTER_ADDR); run: torchrun --nproc_per_node={dims.world_size} train.py parallel={run.parallel.name}"
        )
    in_slurm_job = "SLURM_JOB_ID" in os.environ
    if launcher == "slurm" and not ((env is not None and env.kind == "srun") or (in_slurm_job and dims.world_size == 1)):
        raise ConfigError(
            "cluster=slurm but this process is not an srun task of a SLURM job: submit with -m, "
            f"python train.py -m cluster=slurm parallel={run.parallel.name} (one task per rank), or inside "
            f"an allocation run srun -n {dims.world_size} python train.py cluster=slurm parallel={run.parallel.name}"
        )
    if run.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; valid here: auto, cpu")
    problem = backend_problem(run.kernels.backend, "cuda" if _use_cuda(run) else "cpu")
    if problem:
        raise ConfigError(f"kernels.backend={run.kernels.backend} {problem}")
    if run.cluster.backend == "nccl" and not _use_cuda(run):
        raise ConfigError("cluster.backend=nccl needs CUDA devices; valid here: auto, gloo")
    if _use_cuda(run) and env is None and dims.world_size > torch.cuda.device_count():
        raise ConfigError(
            f"parallel={run.parallel.name} needs {dims.world_size} ranks, one GPU each, but this machine has "
            f"{torch.cuda.device_count()} GPUs; launch across nodes (srun/torchrun) or set trainer.device=cpu"
        )


def _use_cuda(run: RunConfig) -> bool:
    return run.trainer.device == "cuda" or (run.trainer.device == "auto" and torch.cuda.is_available())


def _cpu_threads(local_world_size: int, environ: Mapping[str, str] = os.environ) -> int:
    """Threads per CPU rank: SLURM's --cpus-per-task for an srun task, else the CPUs this
    process may run on (affinity/cgroup aware, unlike os.cpu_count()) over the local ranks."""
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and "SLURM_STEP_ID" in environ:
        return max(1, int(per_task))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // local_world_size)


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # Without scontrol: "node[01-04,07],gpu5" -> "node01".
        head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0]
        if "[" not in head:
            return head
        prefix, ranges = head.split("[", 1)
        return prefix + ranges.split(",")[0].split("-")[0]


def _export_srun_env(environ=os.environ) -> None:
    """Map srun's variables to the env:// ones torch.distributed reads."""
    env = detect_launcher_env(environ)
    environ["RANK"], environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    environ["LOCAL_RANK"] = str(env.local_rank)
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = _first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    job, step = int(environ.get("SLURM_JOB_ID", "0")), int(environ.get("SLURM_STEP_ID", "0") or 0)
    # Below the ephemeral port range (32768+) that outgoing connections draw from.
    environ.setdefault("MASTER_PORT", str(10000 + (job * 16 + step) % 22000))


Worker = Callable[..., dict]


def run_ranks(run: RunConfig, dims: ParallelDims, env: LauncherEnv | None, output_dir: str, data_paths, worker: Worker):
    """Run ``worker(run, ctx)`` on every rank of this job; return rank 0's result where it is here."""
    if env is not None:
        if env.kind == "srun":
            _export_srun_env()
        return _run_rank(run, dims, env.rank, env.local_rank, env.local_world_size, "env://", output_dir,
                         data_paths, worker)
    if dims.world_size == 1:
        return _run_rank(run, dims, 0, 0, 1, None, output_dir, data_paths, worker)
    return _spawn(run, dims, output_dir, data_paths, worker)


class _Terminated(Exception):
    """The launcher was asked to stop (SIGTERM, or the first Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopFlag:
    """Set by a signal; the training loop polls it once per step (and tells the other ranks)."""

    def __init__(self):
        self.received: list[int] = []  # in arrival order
        self.stopped_early = False  # the training loop stopped before its last step because of it

    def set(self, signum, frame):
        if signum not in self.received:
            self.received.append(signum)

    def get(self) -> bool:
        return bool(self.received)

    def names(self) -> list[str]:
        return [signal.Signals(s).name for s in self.received]

    def mark_stopped(self) -> None:
        self.stopped_early = True


# SIGTERM: preemption or scancel; SIGUSR1/SIGUSR2: SLURM's warning before the time limit
# (--signal; submitit asks for SIGUSR2); SIGINT: Ctrl-C. Each means: finish this step, save, stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
_STOP = _StopFlag()


def _interrupt_twice(signum, frame):
    """A lone process: the first Ctrl-C asks for a save; the second one stops it now."""
    if signal.SIGINT in _STOP.received:
        raise KeyboardInterrupt
    _STOP.set(signum, frame)


def install_stop_handlers(*, second_interrupt_exits: bool = False) -> _StopFlag:
    """Turn the stop signals into a request the training loop acts on at a step boundary.

    One flag per process, so a signal that arrives while the process is still starting
    (before the loop) is not lost. A Ctrl-C reaches every process of the terminal's group:
    ranks under a parent (spawned, torchrun, srun) take any number of SIGINTs as one request
    and leave the second Ctrl-C to the parent, which stops them at once; a process without
    a parent launcher (``second_interrupt_exits``) stops itself on the second.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _STOP.set)
    if second_interrupt_exits:
        signal.signal(signal.SIGINT, _interrupt_twice)
    return _STOP


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def _interrupt_now(signum, frame):
    raise KeyboardInterrupt


def _spawn(run, dims, output_dir, data_paths, worker):
    import torch.multiprocessing as mp

    rendezvous = tempfile.mkdtemp(prefix="moemesh-rdzv-")
    # SIGTERM or a first Ctrl-C: every rank saves after its step (_graceful_stop); a second
    # Ctrl-C stops them at once. One that arrives while the ranks start is kept until they exist.
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ctx = mp.start_processes(
            _spawned_rank,
            args=(run, dims, f"file://{rendezvous}/store", output_dir, data_paths, worker),
            nprocs=dims.world_size,
            join=False,
            start_method="spawn",
        )
        for sig in previous:
            signal.signal(sig, _raise_terminated)
        try:
            if pending:
                raise _Terminated(pending[0])
            while not ctx.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # ProcessContext.join has already terminated the other ranks. The rank it names
            # is the first it noticed, often a peer whose collective broke: report the root
            # cause, the rank that failed earliest (or was killed).
            print(f"moemesh: {_root_cause(rendezvous, e)}", file=sys.stderr)
            raise SystemExit(1) from None
        except _Terminated as stop:
            # Preemption or Ctrl-C: pass the signal on; the ranks save a checkpoint after
            # their current step and exit. Whoever is still running after the grace period
            # is killed.
            try:
                return _graceful_stop(ctx, run.cluster.preempt_grace_s, stop.signum)
            except KeyboardInterrupt:
                _stop_all(ctx.processes, timeout=0, kill=True)
                print("moemesh: SIGINT again: every rank was stopped without saving", file=sys.stderr)
                raise SystemExit(130) from None
        except KeyboardInterrupt:
            _stop_all(ctx.processes, timeout=10)
            raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(rendezvous, ignore_errors=True)
    return None


def _stop_all(processes, timeout: float, kill: bool = False) -> None:
    for p in processes:
        if p.is_alive():
            p.kill() if kill else p.terminate()
    for p in processes:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join()


def _graceful_stop(ctx, grace_s: float, signum: int):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the save short
    signal.signal(signal.SIGINT, _interrupt_now)  # a second Ctrl-C does
    name = signal.Signals(signum).name
    for p in ctx.processes:
        if p.is_alive():
            os.kill(p.pid, signum)
    deadline = time.monotonic() + grace_s
    for p in ctx.processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    late = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
    _stop_all(ctx.processes, timeout=5)
    codes = [p.exitcode for p in ctx.processes]
    if late or any(codes):
        print(f"moemesh: {name}: ranks {late} did not stop within cluster.preempt_grace_s={grace_s}s"
              if late else f"moemesh: {name}: ranks exited with codes {codes}", file=sys.stderr)
        raise SystemExit(1)
    return None  # every rank saved and wrote the summary; train.py reports the stop


def _root_cause(rendezvous: str, err) -> str:
    failures = []
    for f in Path(rendezvous).glob("rank*.err"):
        try:
            stamp, rank, message = f.read_text().split("\t", 2)
            failures.append((float(stamp), int(rank), message))
        except (OSError, ValueError):  # a rank stopped while writing it
            continue
    if isinstance(err, torch.multiprocessing.ProcessExitedException) and err.signal_name:
        return f"rank {err.error_index} was killed by {err.signal_name}; the other ranks were stopped"
    if not failures:
        return f"rank {err.error_index} exited with code {getattr(err, 'exit_code', 1)}"
    _, rank, message = min(failures)
    return f"rank {rank} failed: {message} (the other ranks were stopped)"


def _spawned_rank(local_rank, run, dims, init_method, output_dir, data_paths, worker):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # spawned ranks talk over loopback only
    try:
        _run_rank(run, dims, local_rank, local_rank, dims.world_size, init_method, output_dir, data_paths, worker)
    except BaseException as e:
        rendezvous = init_method.removeprefix("file://").rsplit("/", 1)[0]
        first_line = (str(e).strip().splitlines() or [""])[0]
        Path(rendezvous, f"rank{local_rank}.err").write_text(
            f"{time.time()}\t{local_rank}\t{type(e).__name__}: {first_line}"
        )
        raise
    # The rank's work is done and written, and its process group destroyed. Leave without
    # the interpreter's teardown: about 1 run in 20 of 2-rank ep2 here, a C++ thread still
    # joinable at static destruction aborted a finished rank ("terminate called without an
    # active exception", no Python frame), which the launcher must then report as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_rank(run, dims, rank, local_rank, local_world_size, init_method, output_dir, data_paths, worker):
    from trainer.loop import RankContext

    if _use_cuda(run):
        # srun --gpus-per-task (or a bound CUDA_VISIBLE_DEVICES) may show each task one GPU.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        threads = run.trainer.threads_per_rank or _cpu_threads(local_world_size)
        torch.set_num_threads(threads)
    backend = run.cluster.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"

    if init_method is not None:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=dims.world_size,
            timeout=datetime.timedelta(seconds=run.cluster.collective_timeout_s),
        )
    try:
        mesh = build_mesh(dims, device.type)
        if init_method is not None:
            # Under torchrun/srun every rank ran Hydra; rank 0's directory is the run's.
            box = [output_dir]
            dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            output_dir = box[0]
        stop = install_stop_handlers(second_interrupt_exits=init_method is None)
        ctx = RankContext(rank=rank, local_rank=local_rank, device=device, mesh=mesh, output_dir=output_dir,
                          data_paths=data_paths, stop_requested=stop.get, stop_signals=stop.names,
                          on_stop=stop.mark_stopped)
        return worker(run, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
