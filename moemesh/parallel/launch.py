"""Where ranks come from, and the start/stop of one rank's process group.

Three ways in, decided once per process:
  * torchrun (or any env:// launcher): RANK, WORLD_SIZE, MASTER_ADDR are set; join.
  * srun: SLURM_PROCID, SLURM_NTASKS (and a step id) are set; map them to the
    env:// variables and join.
  * bare `python train.py`: spawn world_size local ranks. They rendezvous through
    a file store (nothing listens on the network) and gloo talks over loopback.
If any spawned rank fails, the others are terminated and the parent exits non-zero.

Stale variables. RANK/WORLD_SIZE/MASTER_ADDR (or SLURM_PROCID/SLURM_NTASKS) left in a shell
would make a plain ``python train.py`` wait for peers that never come. A launcher leaves
marks of its own (``launcher_markers``); ranks without any must meet within
``cluster.rendezvous_timeout_s`` or the run is refused in one line naming what to unset, and
a shell inside an interactive srun step (``SLURM_PTY_PORT``, its parent not slurmstepd) is
refused at once.

Hangs. Every rank beats from a daemon thread, which keeps beating while the rank computes,
saves, evaluates or waits in a collective for a peer (the collective releases the GIL), and
stops only when the whole process stops running: SIGSTOP, a debugger, a native call that
holds the GIL. So the rank whose beats stop is the stalled one, never a peer it blocks.
Spawned ranks beat into files in the rendezvous directory, which the parent watches; under
torchrun/srun/deepspeed each rank beats into the job's store and watches the next rank's
beats. Silence for ``cluster.hang_timeout_s`` names the rank and stops the job.
"""

from __future__ import annotations

import datetime
import functools
import operator
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError
from moemesh.kernels import backend_problem
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh


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


# Variables a launcher sets beside RANK/WORLD_SIZE and a shell's leftovers rarely carry.
_MARKERS = (
    ("torchrun", ("TORCHELASTIC_RUN_ID",)),
    ("deepspeed", ("LOCAL_SIZE", "CROSS_RANK")),  # deepspeed/launcher/launch.py sets both
    ("mpirun", ("OMPI_COMM_WORLD_SIZE",)),
    ("mpirun", ("PMI_SIZE",)),
    ("mpirun", ("PMIX_RANK",)),
    ("srun", ("SLURM_STEP_ID",)),  # srun tasks; submitit's export maps them to RANK/WORLD_SIZE
)
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _parent_name() -> str:
    try:
        return Path(f"/proc/{os.getppid()}/comm").read_text().strip()
    except OSError:
        return ""


def _interactive_step(environ: Mapping[str, str], parent: str) -> bool:
    """A shell that `srun --pty` (or salloc's interactive step) started: it carries the step's
    SLURM_PROCID/SLURM_NTASKS, but no srun started this process (slurmstepd starts tasks)."""
    return "SLURM_PTY_PORT" in environ and parent != "slurmstepd"


def launcher_markers(environ: Mapping[str, str] = os.environ, parent: str | None = None) -> str | None:
    """The launcher whose own variables this process carries (torchrun, deepspeed, mpirun,
    srun), or None: RANK/WORLD_SIZE were set by hand, a script, or are left over in a shell."""
    for name, keys in _MARKERS:
        if all(k in environ for k in keys):
            if name == "srun" and _interactive_step(environ, _parent_name() if parent is None else parent):
                continue
            return name
    return None


def _leftovers(environ: Mapping[str, str], keys=_ENV_VARS) -> tuple[str, str]:
    """('RANK=0, WORLD_SIZE=4, ...', 'unset RANK WORLD_SIZE ...') for the keys that are set."""
    present = [k for k in keys if k in environ]
    return ", ".join(f"{k}={environ[k]}" for k in present), "unset " + " ".join(present)


def stale_launcher_env(
    env: LauncherEnv | None, environ: Mapping[str, str] = os.environ, parent: str | None = None
) -> str | None:
    """Why this process's launcher variables cannot describe a job that will form, where that
    is known before any rendezvous; None otherwise (unmarked env:// variables are judged by a
    bounded rendezvous when the rank starts: ``_unlaunched_store``)."""
    if env is None:
        return None
    parent = _parent_name() if parent is None else parent
    if env.kind == "srun" and _interactive_step(environ, parent):
        shown, _ = _leftovers(environ, ("SLURM_PROCID", "SLURM_NTASKS"))
        return (
            f"{shown} describe task {env.rank} of a {env.world_size}-task srun step, but this process was "
            f"started from the step's interactive shell (SLURM_PTY_PORT is set, its parent is "
            f"{parent or 'unknown'}, not slurmstepd), so no other task will join; spawn the ranks here with "
            f"env -u SLURM_PROCID python train.py ..., or start them as tasks: srun -n {env.world_size} "
            "python train.py ..."
        )
    if env.kind == "torchrun" and launcher_markers(environ, parent) is None and "MASTER_PORT" not in environ:
        shown, unset = _leftovers(environ)
        return (
            f"{shown} are set but MASTER_PORT is not, and no launcher (torchrun, deepspeed, srun, mpirun) "
            f"started this process; if they are left over in this shell: {unset} (python train.py spawns "
            "the ranks itself)"
        )
    return None


def leftover_hint(env: LauncherEnv | None, environ: Mapping[str, str] = os.environ) -> str:
    """For an error about the launcher's world size: what to unset if no launcher set it."""
    if env is None or launcher_markers(environ) is not None:
        return ""
    if env.kind == "srun":
        return "; if SLURM_PROCID/SLURM_NTASKS are left over here: env -u SLURM_PROCID python train.py ..."
    unset = _leftovers(environ)[1]
    return f"; no launcher started this process: if these variables are left over in this shell, {unset}"


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
        raise ConfigError(
            f"--local_rank={seen} disagrees with LOCAL_RANK={environ['LOCAL_RANK']} from the launcher's "
            "environment; start ranks with deepspeed, torchrun or srun, not by hand"
        )
    return kept


def launcher_rank(environ: Mapping[str, str] = os.environ) -> int:
    env = detect_launcher_env(environ)
    return env.rank if env else 0


def check_launcher(run: RunConfig, env: LauncherEnv | None, dims: ParallelDims) -> None:
    """The cluster config and the environment must agree; raises ConfigError."""
    for key in ("hang_timeout_s", "rendezvous_timeout_s"):
        if getattr(run.cluster, key) <= 0:
            raise ConfigError(f"cluster.{key}={getattr(run.cluster, key)}: must be > 0 seconds")
    output_umask(run)
    stale = stale_launcher_env(env)
    if stale:
        raise ConfigError(stale)
    launcher = run.cluster.launcher
    if launcher == "torchrun" and (env is None or env.kind != "torchrun"):
        raise ConfigError(
            f"cluster.launcher=torchrun but this process has no torchrun environment (RANK, WORLD_SIZE, "
            f"MASTER_ADDR); run: torchrun --nproc_per_node={dims.world_size} train.py parallel={run.parallel.name}"
        )
    in_slurm_job = "SLURM_JOB_ID" in os.environ
    if launcher == "slurm" and not (
        (env is not None and env.kind == "srun") or (in_slurm_job and dims.world_size == 1)
    ):
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


# What each cluster.output_access lets others do with the run's files: the process umask.
OUTPUT_UMASKS = {"private": 0o077, "group": 0o027, "inherit": None}


def output_umask(run: RunConfig) -> int | None:
    access = run.cluster.output_access
    if access not in OUTPUT_UMASKS:
        raise ConfigError(
            f"cluster.output_access={access}: valid: {', '.join(OUTPUT_UMASKS)} (private: 0700/0600; "
            "group: group may read, 0750/0640; inherit: the shell's umask)"
        )
    return OUTPUT_UMASKS[access]


def set_output_umask(runs) -> None:
    """Set the process umask before Hydra creates the run directory: checkpoints, metrics
    and logs may hold data or paths others must not read. Several runs (a sweep): the most
    private of them. Ranks inherit it (spawn, and torchrun's/srun's ranks run this too)."""
    masks = [output_umask(run) for run in runs]
    if all(m is None for m in masks):
        return
    current = os.umask(0)
    os.umask(functools.reduce(operator.or_, (current if m is None else m for m in masks)))


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
        store = None
        if env.kind == "torchrun" and launcher_markers() is None:
            store = _unlaunched_store(run, env)
        return _run_rank(
            run,
            dims,
            env.rank,
            env.local_rank,
            env.local_world_size,
            "env://",
            output_dir,
            data_paths,
            worker,
            store=store,
        )
    if dims.world_size == 1:
        return _run_rank(run, dims, 0, 0, 1, None, output_dir, data_paths, worker)
    return _spawn(run, dims, output_dir, data_paths, worker)


def _unlaunched_store(run: RunConfig, env: LauncherEnv, environ: Mapping[str, str] = os.environ):
    """The rendezvous of ranks whose variables no known launcher set: within
    cluster.rendezvous_timeout_s, or ConfigError (the variables are left over in a shell).
    A launcher's ranks keep env:// and collective_timeout_s: a large job's ranks may take
    minutes to start, and its launcher has timeouts of its own."""
    host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    bound = run.cluster.rendezvous_timeout_s
    shown, unset = _leftovers(environ)
    stale = (
        f"{shown} are set, but no launcher (torchrun, deepspeed, srun, mpirun) started this process and "
        "{what} within cluster.rendezvous_timeout_s=" + f"{bound}s; if these variables are left over in this "
        f"shell: {unset} (python train.py spawns the ranks itself)"
    )
    if env.rank != 0 and not _reachable(host, port, bound):
        # Probed from Python: a TCPStore client that cannot connect prints pages of C++ retries.
        raise ConfigError(stale.format(what=f"rank 0 did not answer at {host}:{port}"))
    try:
        store = dist.TCPStore(
            host, port, env.world_size, env.rank == 0, timeout=datetime.timedelta(seconds=bound), wait_for_workers=True
        )
    except RuntimeError as err:  # DistStoreError: not every rank came; DistNetworkError: port taken
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(stale.format(what=f"the {env.world_size}-rank job did not form ({first})")) from None
    store.set_timeout(datetime.timedelta(seconds=run.cluster.collective_timeout_s))
    return store


def _reachable(host: str, port: int, within_s: float) -> bool:
    import socket

    deadline = time.monotonic() + within_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _beat_interval(hang_timeout_s: float) -> float:
    return min(1.0, hang_timeout_s / 10)


def _beat_into_file(path: Path, interval: float) -> threading.Event:
    """A spawned rank's heartbeat: rewrite ``path`` (pid and a count) every ``interval``
    seconds from a daemon thread, until the returned event is set or the process ends."""
    stop = threading.Event()

    def beat():
        count = 0
        while True:
            count += 1
            try:
                path.write_text(f"{os.getpid()} {count}\n")
            except OSError:  # the launcher removed the directory: it is going away
                return
            if stop.wait(interval):
                return

    threading.Thread(target=beat, name="moemesh-heartbeat", daemon=True).start()
    return stop


class _Stalled(Exception):
    def __init__(self, rank: int, silent_s: float, started: bool):
        super().__init__(rank)
        self.rank, self.silent_s, self.started = rank, silent_s, started


class _HangWatch:
    """The launcher's view of its spawned ranks' heartbeat files.

    A rank is stalled when its beats stop for hang_timeout_s while it is alive. A rank that
    has not beaten yet is still importing; it is stalled once it has been silent for a whole
    timeout while another rank was already beating (the ranks start the same code). If this
    process itself did not run for a while (Ctrl-Z stops the launcher and its ranks
    together), every clock starts again: silence the watcher did not watch proves nothing.
    """

    def __init__(self, rendezvous: str, world_size: int, timeout_s: float):
        self.files = [Path(rendezvous, f"beat{r}") for r in range(world_size)]
        self.timeout = timeout_s
        self.interval = _beat_interval(timeout_s)
        self.started = self.polled = time.monotonic()
        self.content: list[str | None] = [None] * world_size
        self.changed: list[float | None] = [None] * world_size  # monotonic time of the last new beat
        self.first_beat: float | None = None

    def check(self, alive: list[bool]) -> None:
        now = time.monotonic()
        if now - self.polled > 5 * self.interval + 2:
            self.started = now
            self.changed = [None if c is None else now for c in self.changed]
            self.first_beat = None if self.first_beat is None else now
        self.polled = now
        for r, f in enumerate(self.files):
            try:
                text = f.read_text()
            except OSError:
                continue
            if text != self.content[r]:
                self.content[r], self.changed[r] = text, now
                self.first_beat = self.first_beat or now
        silent = {}
        for r, changed in enumerate(self.changed):
            if not alive[r]:
                continue  # exited: ProcessContext.join reports it
            if changed is not None:
                silent[r] = now - changed
            elif self.first_beat is not None and now - self.first_beat > self.timeout:
                silent[r] = now - self.started
        stalled = {r: t for r, t in silent.items() if t > self.timeout}
        if stalled:
            rank = max(stalled, key=stalled.get)  # the one that stopped first
            raise _Stalled(rank, stalled[rank], started=self.changed[rank] is not None)


class _PeerWatch:
    """Under torchrun/srun/deepspeed: beat into the job's store and watch the next rank's
    beats (rank r watches r+1, so one rank reports a stalled one and the store sees O(world)
    small requests a second). A silent peer, or a store that stops answering (under srun and
    deepspeed rank 0 hosts it; torchrun's agent hosts it under torchrun), is reported in one
    line, a stopped process on this machine is killed (it cannot act on its launcher's
    SIGTERM), and this process exits 1: the launcher (torchrun; srun -K) stops the job.

    Two threads: one talks to the store; the other only reads the clock, because a call to a
    store whose host is stopped blocks for ever (measured: its timeout does not apply then).
    """

    def __init__(self, run: RunConfig, rank: int, world_size: int, environ: Mapping[str, str] = os.environ):
        import socket

        self.timeout = run.cluster.hang_timeout_s
        self.interval = _beat_interval(self.timeout)
        self.rank, self.peer, self.world_size = rank, (rank + 1) % world_size, world_size
        self.where = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
        self.store_host = None if "TORCHELASTIC_RUN_ID" in environ else 0  # the rank whose process hosts the store
        prefix = f"moemesh/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # torchrun's store outlives a restart
        self.keys = {k: f"{prefix}/{k}/" for k in ("beat", "done", "host")}
        self.store = dist.TCPStore(
            environ["MASTER_ADDR"],
            int(environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout),
            wait_for_workers=False,
        )
        self.host = socket.gethostname()
        self.store.set(self.keys["host"] + str(rank), f"{self.host}, pid {os.getpid()}")
        self.hosts: dict[int, str] = {}
        self.answered = time.monotonic()  # the last time the store answered a whole round
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._beat_and_watch, name="moemesh-peer-watch", daemon=True),
            threading.Thread(target=self._watch_store, name="moemesh-store-watch", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def finish(self, *, finished: bool) -> None:
        """This rank is leaving: its silence is not a hang. A rank that finished also waits
        (up to hang_timeout_s) until every rank has: under srun and deepspeed rank 0 hosts
        the store, and a peer still watching would see it vanish."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2 * self.interval + 1)
        try:
            self.store.add(self.keys["done"] + str(self.rank), 1)
            if finished:
                self.store.wait(
                    [self.keys["done"] + str(r) for r in range(self.world_size)],
                    datetime.timedelta(seconds=self.timeout),
                )
        except RuntimeError:
            pass

    def _host(self, rank: int) -> str:
        """'hostname, pid N' of a rank, as it wrote it at its start (cached: the store may stop)."""
        if rank not in self.hosts:
            key = self.keys["host"] + str(rank)
            try:
                if self.store.check([key]):
                    self.hosts[rank] = self.store.get(key).decode()
            except RuntimeError:
                pass
        return self.hosts.get(rank, "host unknown")

    def _stalled(self, rank: int, message: str) -> None:
        where = self.hosts.get(rank, "host unknown")
        self._kill_if_local(rank, where)
        print(
            f"moemesh: rank {rank} ({where}) stopped responding: {message} (cluster.hang_timeout_s={self.timeout}); "
            f"it was stopped (SIGSTOP, a debugger) or is frozen; rank {self.rank} stops the job",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def _kill_if_local(self, rank: int, where: str) -> None:
        """SIGKILL the stalled rank if it runs on this machine and /proc confirms it is that
        rank of this job (its initial environment names the rank and this job's ids)."""
        name, _, pid = where.partition(", pid ")
        if name != self.host or not pid.isdigit():
            return
        try:
            mine = set(Path("/proc/self/environ").read_bytes().split(b"\0"))
            theirs = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            return
        job = {
            v
            for v in mine
            if v.split(b"=", 1)[0] in (b"MASTER_PORT", b"TORCHELASTIC_RUN_ID", b"SLURM_JOB_ID", b"SLURM_STEP_ID")
        }
        ids = {f"RANK={rank}".encode(), f"SLURM_PROCID={rank}".encode()}
        if job and job <= theirs and ids & theirs:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass

    def _tick(self) -> tuple[bool, float, bool]:
        """Wait one interval: (stop requested, now, this process was itself stopped meanwhile,
        e.g. Ctrl-Z, so its clocks start again)."""
        t0 = time.monotonic()
        if self.stop.wait(self.interval):
            return True, t0, False
        now = time.monotonic()
        return False, now, now - t0 > 5 * self.interval + 2

    def _watch_store(self) -> None:
        while True:
            stopped, now, resumed = self._tick()
            if stopped:
                return
            if resumed:
                self.answered = now
            if now - self.answered > self.timeout and not self.stop.is_set():
                silent = f"the job's store at {self.where} did not answer for {now - self.answered:.0f} s"
                if self.store_host is not None:
                    self._stalled(self.store_host, f"{silent} (rank {self.store_host} hosts it)")
                print(
                    f"moemesh: {silent} (cluster.hang_timeout_s={self.timeout}); rank {self.rank} stops the job",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def _beat_and_watch(self) -> None:
        beat, peer_beat = self.keys["beat"] + str(self.rank), self.keys["beat"] + str(self.peer)
        peer_done = self.keys["done"] + str(self.peer)
        seen, changed, watching = None, time.monotonic(), True
        while True:
            stopped, now, resumed = self._tick()
            if stopped:
                return
            if resumed:
                changed = now
            try:
                self.store.add(beat, 1)  # beats on after the peer is done: rank - 1 watches this one
                value = self.store.add(peer_beat, 0) if watching else None
                watching = watching and not self.store.check([peer_done])
                for r in {self.peer, self.store_host} - {None}:
                    self._host(r)
            except RuntimeError:  # refused: the store's host left; _watch_store judges
                continue
            self.answered = time.monotonic()
            if not watching or value != seen:
                seen, changed = value, now
            elif now - changed > self.timeout and not self.stop.is_set():
                self._stalled(self.peer, f"no heartbeat for {now - changed:.0f} s")


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


def _interrupt_now(signum, frame):
    raise KeyboardInterrupt


RENDEZVOUS_PREFIX = "moemesh-rdzv-"


def _spawn(run, dims, output_dir, data_paths, worker):
    from multiprocessing import resource_tracker

    import torch.multiprocessing as mp

    remove_abandoned_rendezvous(Path(tempfile.gettempdir()))
    rendezvous = tempfile.mkdtemp(prefix=RENDEZVOUS_PREFIX)  # 0700
    Path(rendezvous, "owner").write_text(f"{os.getpid()}\n")  # a later start removes it if this one is SIGKILLed
    # SIGTERM, SIGUSR1/2 or a first Ctrl-C: every rank saves after its step (_graceful_stop);
    # a second Ctrl-C stops them at once. One that arrives while the ranks start is kept
    # until they exist, and acted on by the loop below.
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in STOP_SIGNALS}
    try:
        # The ranks start with the stop signals blocked (the mask survives spawn's fork and
        # exec): a terminal's Ctrl-C that reaches a rank while it imports stays pending until
        # the rank has its handlers (_spawned_rank) instead of killing it with a
        # KeyboardInterrupt. The resource tracker starts first: starting it unblocks SIGINT
        # and SIGTERM in this process.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            ctx = mp.start_processes(
                _spawned_rank,
                args=(run, dims, f"file://{rendezvous}/store", output_dir, data_paths, worker),
                nprocs=dims.world_size,
                join=False,
                start_method="spawn",
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        watch = _HangWatch(rendezvous, dims.world_size, run.cluster.hang_timeout_s)
        try:
            while not ctx.join(timeout=watch.interval):
                if pending:
                    raise _Terminated(pending[0])
                watch.check([p.is_alive() for p in ctx.processes])
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # ProcessContext.join has already terminated the other ranks. The rank it names
            # is the first it noticed, often a peer whose collective broke: report the root
            # cause, the rank that failed earliest (or was killed).
            print(f"moemesh: {_root_cause(rendezvous, e)}", file=sys.stderr)
            raise SystemExit(1) from None
        except _Stalled as hung:
            # Its peers wait in a collective for it: nothing can be saved. SIGKILL reaches a
            # stopped process too.
            _stop_all(ctx.processes, timeout=0, kill=True)
            what = (
                f"no heartbeat for {hung.silent_s:.0f} s"
                if hung.started
                else f"it never started beating ({hung.silent_s:.0f} s) while the others ran"
            )
            print(
                f"moemesh: rank {hung.rank} (pid {ctx.processes[hung.rank].pid}) stopped responding: {what} "
                f"(cluster.hang_timeout_s="
                f"{run.cluster.hang_timeout_s}); it was stopped (SIGSTOP, a debugger) or is frozen; every rank "
                "was stopped without saving (the last checkpoint is kept)",
                file=sys.stderr,
            )
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(rendezvous, ignore_errors=True)
    return None


def remove_abandoned_rendezvous(tmp: Path, min_idle_s: float = 600.0) -> list[Path]:
    """Remove this user's rendezvous directories left by a launcher that was SIGKILLed (no
    ``finally`` ran): its owner pid is gone and nothing was written there for min_idle_s
    (ranks still running, e.g. saving after their launcher died, beat every second).
    Directories without an owner file are left alone. Returns those removed."""
    removed, now = [], time.time()
    for d in tmp.glob(RENDEZVOUS_PREFIX + "*"):
        try:
            if not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            owner = int((d / "owner").read_text().split()[0])
            if _alive(owner):
                continue
            newest = max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())])
            if now - newest < min_idle_s:
                continue
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process now has that pid
    return True


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
        print(
            f"moemesh: {name}: ranks {late} did not stop within cluster.preempt_grace_s={grace_s}s"
            if late
            else f"moemesh: {name}: ranks exited with codes {codes}",
            file=sys.stderr,
        )
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
    # This rank started with the stop signals blocked (_spawn): install the handlers, then
    # let through any signal that arrived while it was starting; it becomes a stop request.
    install_stop_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    rendezvous = init_method.removeprefix("file://").rsplit("/", 1)[0]
    _beat_into_file(Path(rendezvous, f"beat{local_rank}"), _beat_interval(run.cluster.hang_timeout_s))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # spawned ranks talk over loopback only
    try:
        _run_rank(run, dims, local_rank, local_rank, dims.world_size, init_method, output_dir, data_paths, worker)
    except BaseException as e:
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


def _run_rank(run, dims, rank, local_rank, local_world_size, init_method, output_dir, data_paths, worker, store=None):
    from moemesh.trainer.loop import RankContext

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
            **({"store": store} if store is not None else {"init_method": init_method}),
            rank=rank,
            world_size=dims.world_size,
            timeout=datetime.timedelta(seconds=run.cluster.collective_timeout_s),
        )
    watch, finished = None, False
    try:
        if init_method == "env://" and dims.world_size > 1:
            try:
                watch = _PeerWatch(run, rank, dims.world_size)
            except RuntimeError as err:  # the run goes on; collective_timeout_s still bounds a hang
                print(
                    f"moemesh: warning: rank {rank}: no heartbeat watch ({str(err).splitlines()[0]})", file=sys.stderr
                )
        mesh = build_mesh(dims, device.type)
        if init_method is not None:
            # Under torchrun/srun every rank ran Hydra; rank 0's directory is the run's.
            box = [output_dir]
            dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            output_dir = box[0]
        stop = install_stop_handlers(second_interrupt_exits=init_method is None)
        ctx = RankContext(
            rank=rank,
            local_rank=local_rank,
            device=device,
            mesh=mesh,
            output_dir=output_dir,
            data_paths=data_paths,
            stop_requested=stop.get,
            stop_signals=stop.names,
            on_stop=stop.mark_stopped,
        )
        result = worker(run, ctx)
        finished = True
        return result
    finally:
        if watch is not None:
            watch.finish(finished=finished)
        if dist.is_initialized():
            dist.destroy_process_group()
