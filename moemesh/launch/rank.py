"""One rank's life, however it was started: device and threads, the process group, the
heartbeat watch, the mesh, the stop handlers, then the training function with a
``RankContext``; the process group is destroyed whatever happens."""

from __future__ import annotations

import datetime
import importlib
import os
import sys
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from moemesh.fields import CommBackend
from moemesh.launch.checks import INTERFACE_VARS, use_cuda
from moemesh.launch.context import RankContext
from moemesh.launch.heartbeat import PeerWatch
from moemesh.launch.signals import install_stop_handlers
from moemesh.parallel.mesh import build_mesh

# The training function: ``worker(run, ctx)`` on every rank; rank 0's result (a summary) is returned.
# Given as the function, or by name, "package.module:function": imported where it runs, so a
# launcher that only spawns the ranks (their fork server preloads the module) never imports it.
Worker = Callable[..., dict] | str


def worker_module(worker: Worker) -> str:
    """The module that defines ``worker``."""
    return worker.partition(":")[0] if isinstance(worker, str) else worker.__module__


def resolve_worker(worker: Worker) -> Callable[..., dict]:
    """The function ``worker`` names (itself if it is one)."""
    if not isinstance(worker, str):
        return worker
    module, sep, name = worker.partition(":")
    if not (sep and module and name):
        raise ValueError(f"the training function {worker!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def _cpu_threads(local_world_size: int, environ: Mapping[str, str] = os.environ) -> int:
    """Threads per CPU rank: SLURM's --cpus-per-task for an srun task, else the CPUs this
    process may run on (affinity/cgroup aware, unlike os.cpu_count()) over the local ranks."""
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and "SLURM_STEP_ID" in environ:
        return max(1, int(per_task))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // local_world_size)


def _device(run, local_rank: int, local_world_size: int) -> torch.device:
    """This rank's device: a GPU by local rank, or the CPU with its share of the threads."""
    if use_cuda(run):
        # srun --gpus-per-task (or a bound CUDA_VISIBLE_DEVICES) may show each task one GPU.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(run.trainer.threads_per_rank or _cpu_threads(local_world_size))
    return torch.device("cpu")


def run_rank(run, dims, rank, local_rank, local_world_size, init_method, output_dir, data_paths, worker, store=None):
    """Run ``worker(run, ctx)`` as ``rank``; join the process group through ``init_method``
    (``env://``, a spawned job's ``file://`` store, or None: a lone rank), or ``store``.
    ``data_paths`` is passed through to the training function untouched."""
    worker = resolve_worker(worker)
    device = _device(run, local_rank, local_world_size)
    if init_method == "env://" and run.cluster.interface:  # checks.check_launcher: no other one was set
        for var in INTERFACE_VARS:
            os.environ[var] = run.cluster.interface
    backend = run.cluster.backend
    if backend == CommBackend.auto:
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
                watch = PeerWatch(run, rank, dims.world_size)
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
    except Exception as err:
        if watch is not None:
            watch.after_failure(err)  # a whole other host gone: one line, exit 1
        raise
    finally:
        if watch is not None:
            watch.finish(finished=finished)
        if dist.is_initialized():
            dist.destroy_process_group()
