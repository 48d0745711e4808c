"""Before a rank starts: the cluster config and this process's environment must agree
(launcher, devices, kernel backend), and the run's files get the access it asks for."""

from __future__ import annotations

import functools
import operator
import os

import torch

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError
from moemesh.kernels import backend_problem
from moemesh.launch.env import LauncherEnv, stale_launcher_env
from moemesh.parallel.dims import ParallelDims


def check_launcher(run: RunConfig, env: LauncherEnv | None, dims: ParallelDims) -> None:
    """The cluster config and the environment must agree; raises ConfigError."""
    for key in ("hang_timeout_s", "rendezvous_timeout_s"):
        if getattr(run.cluster, key) <= 0:
            raise ConfigError(f"cluster.{key}={getattr(run.cluster, key)}: must be > 0 seconds")
    output_umask(run)
    check_interface(run, env)
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
    problem = backend_problem(run.kernels.backend, "cuda" if use_cuda(run) else "cpu")
    if problem:
        raise ConfigError(f"kernels.backend={run.kernels.backend} {problem}")
    if run.cluster.backend == "nccl" and not use_cuda(run):
        raise ConfigError("cluster.backend=nccl needs CUDA devices; valid here: auto, gloo")
    if use_cuda(run) and env is None and dims.world_size > torch.cuda.device_count():
        raise ConfigError(
            f"parallel={run.parallel.name} needs {dims.world_size} ranks, one GPU each, but this machine has "
            f"{torch.cuda.device_count()} GPUs; launch across nodes (srun/torchrun) or set trainer.device=cpu"
        )


# Where gloo and NCCL find the interface to use (cluster.interface sets both for a launched job).
INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def check_interface(run: RunConfig, env: LauncherEnv | None, environ=os.environ) -> None:
    """cluster.interface must exist on this node and agree with an interface already chosen
    in the environment. Spawned ranks (no launcher) talk over loopback: not checked."""
    name = run.cluster.interface
    if name is None or env is None:
        return
    import socket

    have = [n for _, n in socket.if_nameindex()]
    if name not in have:
        raise ConfigError(
            f"cluster.interface={name}: no such network interface on {socket.gethostname()}; valid here: "
            f"{', '.join(have)}"
        )
    for var in INTERFACE_VARS:
        if environ.get(var, name) != name:
            raise ConfigError(
                f"cluster.interface={name} but {var}={environ[var]} is set: they choose the network two ways; "
                f"unset {var} or set cluster.interface={environ[var]}"
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


def use_cuda(run: RunConfig) -> bool:
    return run.trainer.device == "cuda" or (run.trainer.device == "auto" and torch.cuda.is_available())
