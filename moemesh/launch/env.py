"""Where ranks come from: the launcher's variables, read once per process.

Three ways in:
  * torchrun (or any env:// launcher, deepspeed's included): RANK, WORLD_SIZE,
    MASTER_ADDR are set; join.
  * srun: SLURM_PROCID, SLURM_NTASKS (and a step id) are set; map them to the env://
    variables (``export_srun_env``) and join.
  * bare ``python train.py``: no launcher; spawn world_size local ranks (``spawn``).

``detect_launcher_env`` is the one rule for "is this process a rank of a launched job,
and which": train.py, the ranks and the SLURM launcher plugin all ask it.

Stale variables. RANK/WORLD_SIZE/MASTER_ADDR (or SLURM_PROCID/SLURM_NTASKS) left in a shell
would make a plain ``python train.py`` wait for peers that never come. A launcher leaves
marks of its own (``launcher_markers``); ranks without any must meet within
``cluster.rendezvous_timeout_s`` (``run._unlaunched_store``) or the run is refused in one line
naming what to unset, and a shell inside an interactive srun step (``SLURM_PTY_PORT``, its
parent not slurmstepd) is refused at once (``stale_launcher_env``).

Nothing here imports torch: the SLURM launcher plugin asks these questions on login nodes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import ConfigError


@dataclass(frozen=True)
class LauncherEnv:
    kind: str  # "torchrun" | "srun"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def detect_launcher_env(environ: Mapping[str, str] = os.environ) -> LauncherEnv | None:
    """The launched job this process is a rank of, or None: no launcher started it
    (``python train.py`` spawns the ranks itself, a login shell submits)."""
    if "RANK" in environ and "WORLD_SIZE" in environ and "MASTER_ADDR" in environ:
        return LauncherEnv(
            kind="torchrun",
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            # torchrun sets LOCAL_WORLD_SIZE, deepspeed's per-node launcher LOCAL_SIZE, Open MPI
            # OMPI_COMM_WORLD_LOCAL_SIZE; with none of them, every rank may be on this machine.
            local_world_size=int(
                environ.get(
                    "LOCAL_WORLD_SIZE",
                    environ.get("LOCAL_SIZE", environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", environ["WORLD_SIZE"])),
                )
            ),
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
    """This node's task count: SLURM writes tasks per node as e.g. "4(x2),2" (nodes 0-1 run
    4, node 2 runs 2); SLURM_NODEID picks this node's entry."""
    node = environ.get("SLURM_NODEID", "0")
    node_id = int(node) if node.isdigit() else 0
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        per_node: list[int] = []
        for entry in environ.get(key, "").split(","):
            count, _, repeat = entry.partition("(x")
            if not count.isdigit():
                per_node = []
                break
            times = repeat.rstrip(")")
            per_node += [int(count)] * (int(times) if times.isdigit() else 1)
        if per_node:
            return per_node[min(node_id, len(per_node) - 1)]
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


def leftovers(environ: Mapping[str, str], keys=_ENV_VARS) -> tuple[str, str]:
    """('RANK=0, WORLD_SIZE=4, ...', 'unset RANK WORLD_SIZE ...') for the keys that are set."""
    present = [k for k in keys if k in environ]
    return ", ".join(f"{k}={environ[k]}" for k in present), "unset " + " ".join(present)


def stale_launcher_env(
    env: LauncherEnv | None, environ: Mapping[str, str] = os.environ, parent: str | None = None
) -> str | None:
    """Why this process's launcher variables cannot describe a job that will form, where that
    is known before any rendezvous; None otherwise (unmarked env:// variables are judged by a
    bounded rendezvous when the rank starts: ``run._unlaunched_store``)."""
    if env is None:
        return None
    parent = _parent_name() if parent is None else parent
    if env.kind == "srun" and _interactive_step(environ, parent):
        shown, _ = leftovers(environ, ("SLURM_PROCID", "SLURM_NTASKS"))
        return (
            f"{shown} describe task {env.rank} of a {env.world_size}-task srun step, but this process was "
            f"started from the step's interactive shell (SLURM_PTY_PORT is set, its parent is "
            f"{parent or 'unknown'}, not slurmstepd), so no other task will join; spawn the ranks here with "
            f"env -u SLURM_PROCID python train.py ..., or start them as tasks: srun -n {env.world_size} "
            "python train.py ..."
        )
    if env.kind == "torchrun" and launcher_markers(environ, parent) is None and "MASTER_PORT" not in environ:
        shown, unset = leftovers(environ)
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
    unset = leftovers(environ)[1]
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
    """This process's rank in its launched job; 0 without a launcher."""
    env = detect_launcher_env(environ)
    return env.rank if env else 0


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


def export_srun_env(environ=os.environ) -> None:
    """Map srun's variables to the env:// ones torch.distributed reads."""
    env = detect_launcher_env(environ)
    assert env is not None, "called in srun tasks only"
    environ["RANK"], environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    environ["LOCAL_RANK"] = str(env.local_rank)
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = _first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    job, step = int(environ.get("SLURM_JOB_ID", "0")), int(environ.get("SLURM_STEP_ID", "0") or 0)
    # Below the ephemeral port range (32768+) that outgoing connections draw from.
    environ.setdefault("MASTER_PORT", str(10000 + (job * 16 + step) % 22000))
