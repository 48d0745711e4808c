"""Run a function on N gloo ranks on this CPU. Assertions inside workers fail the test."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server process that has imported torch once, instead of each spawned rank
# importing it again (about 2 s of CPU each; most of a small 4-rank test). A forked rank starts
# with the server's environment and directory, so _entry sets the caller's. The preload list is
# set before each use: moemesh's launcher (launch/forkserver.py) sets its own, and stops its
# server, when a test in this process launches ranks through it.
PRELOAD = ["torch", "torch.distributed", "tests.dist_utils"]


def _entry(rank, world, store_dir, fn, args, environ, cwd):
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
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
    multiprocessing.set_forkserver_preload(PRELOAD)
    try:
        mp.start_processes(
            _entry,
            args=(world, store_dir, fn, args, dict(os.environ), os.getcwd()),
            nprocs=world,
            start_method="forkserver",
        )
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
