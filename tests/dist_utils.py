"""Run a function on N gloo ranks on this CPU. Assertions inside workers fail the test."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, store_dir, fn, args):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_dir}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown, as moemesh/launch/'s ranks do. A
    # finished rank here once aborted at static destruction ("terminate called without an
    # active exception", CI 2026-12-01, test_plan's 2-rank run), failing a passed test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned ranks; re-raises the first failure."""
    store_dir = tempfile.mkdtemp(prefix="moemesh-test-")
    try:
        mp.start_processes(_entry, args=(world, store_dir, fn, args), nprocs=world, start_method="spawn")
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
