"""What the trainer reads off the machine it runs on: the memory a rank holds now and its peak
since training began (CUDA's allocator statistics; on Linux the process's resident set and
VmHWM), and where the run ran (host, CPU or GPU model, Python, torch) for summary.json."""

from __future__ import annotations

import os
import platform
import resource
import socket

import torch

from moemesh.parallel import comm
from moemesh.parallel.comm import group_size


def resident_bytes(device: torch.device) -> int:
    """What the rank holds now: CUDA tensors, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def reset_peak(device: torch.device) -> None:
    """Start the peak over again here, so it is the training's, not the imports' or the data's:
    CUDA's allocator statistics; on Linux the process's VmHWM (``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the lifetime peak below


def peak_memory_bytes(device: torch.device) -> int:
    """The peak since ``reset_peak``: CUDA's max allocated, or VmHWM (getrusage's lifetime peak
    where /proc is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # VmHWM: the peak since reset_peak
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_model() -> str:
    """The CPU's model name (Linux names it in /proc/cpuinfo; platform.processor() often says only
    "x86_64")."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        return models[0] if models else name
    except OSError:
        return name


def machine(device: torch.device, world_group=None) -> dict:
    """Where the run ran, for charts that compare runs (scripts/compare.py's subtitles), and on
    which hosts: every rank's host name, as ``build_mesh`` gathered them at start (gloo), or
    gathered here over ``world_group`` (one collective)."""
    if device.type == "cuda":
        name, count = torch.cuda.get_device_name(device), torch.cuda.device_count()
    else:
        name, count = cpu_model(), 1
    hostname = socket.gethostname()
    rank_hosts: list = [hostname]
    world = group_size(world_group)
    gathered = comm.rank_hosts()
    if world > 1 and gathered is not None and len(gathered) == world:
        rank_hosts = gathered
    elif world > 1:
        rank_hosts = [None] * world
        torch.distributed.all_gather_object(rank_hosts, hostname, group=world_group)
    return {
        "hostname": hostname,
        "hosts": list(dict.fromkeys(rank_hosts)),  # every host of the run, in rank order
        "rank_hosts": rank_hosts,  # rank r ran on rank_hosts[r]
        "device": name,
        "count": count,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
