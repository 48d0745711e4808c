"""Run the training function on every rank of this job: join the launcher's job
(torchrun, srun, deepspeed), run the one rank here, or spawn the local ranks.

Where a rank of this job hosts the job's store (rank 0, unless torchrun's agent hosts it), it
creates it itself, listening on MASTER_ADDR's address only (``launch.store``): torch's own
env:// store would listen on every address of the node."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Mapping

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError, first_line
from moemesh.launch.env import LauncherEnv, export_srun_env, launcher_markers, leftovers
from moemesh.launch.rank import Worker, run_rank
from moemesh.launch.spawn import spawn_ranks
from moemesh.launch.store import job_store
from moemesh.parallel.dims import ParallelDims


def run_ranks(run: RunConfig, dims: ParallelDims, env: LauncherEnv | None, output_dir: str, data_paths, worker: Worker):
    """Run ``worker(run, ctx)`` on every rank of this job; return rank 0's result where it is here.

    ``worker`` is the training function or its name (train.py passes "moemesh.trainer.loop:train",
    which a launcher that spawns the ranks never imports); ``data_paths``
    reaches it as ``ctx.data_paths``, untouched."""
    if env is not None:
        if env.kind == "srun":
            export_srun_env()
        store = None
        if env.kind == "torchrun" and launcher_markers() is None:
            store = _unlaunched_store(run, env)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and env.world_size > 1:
            store = _launched_store(run, env)
        return run_rank(
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
        return run_rank(run, dims, 0, 0, 1, None, output_dir, data_paths, worker)
    return spawn_ranks(run, dims, output_dir, data_paths, worker)


def _unlaunched_store(run: RunConfig, env: LauncherEnv, environ: Mapping[str, str] = os.environ):
    """The rendezvous of ranks whose variables no known launcher set: within
    cluster.rendezvous_timeout_s, or ConfigError (the variables are left over in a shell).
    A launcher's ranks keep env:// and collective_timeout_s: a large job's ranks may take
    minutes to start, and its launcher has timeouts of its own."""
    host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    bound = run.cluster.rendezvous_timeout_s
    shown, unset = leftovers(environ)
    stale = (
        f"{shown} are set, but no launcher (torchrun, deepspeed, srun, mpirun) started this process and "
        "{what} within cluster.rendezvous_timeout_s=" + f"{bound}s; if these variables are left over in this "
        f"shell: {unset} (python train.py spawns the ranks itself)"
    )
    if env.rank != 0 and not _reachable(host, port, bound):
        # Probed from Python: a TCPStore client that cannot connect prints pages of C++ retries.
        raise ConfigError(stale.format(what=f"rank 0 did not answer at {host}:{port}"))
    try:
        store = job_store(
            host,
            port,
            env.world_size,
            is_master=env.rank == 0,
            timeout_s=bound,
            spans_nodes=env.local_world_size < env.world_size,
            interface=run.cluster.interface,
        )
    except RuntimeError as err:  # DistStoreError: not every rank came; DistNetworkError: port taken
        first = first_line(str(err))
        raise ConfigError(stale.format(what=f"the {env.world_size}-rank job did not form ({first})")) from None
    store.set_timeout(datetime.timedelta(seconds=run.cluster.collective_timeout_s))
    return store


def _launched_store(run: RunConfig, env: LauncherEnv, environ: Mapping[str, str] = os.environ):
    """The store of a launcher's job whose rank 0 hosts it (srun, deepspeed, mpirun, torchrun
    with its agent's store turned off): on MASTER_ADDR's address only. The ranks wait for it as
    long as for a collective (a large job's ranks may take minutes to start)."""
    return job_store(
        environ["MASTER_ADDR"],
        int(environ["MASTER_PORT"]),
        env.world_size,
        is_master=env.rank == 0,
        timeout_s=run.cluster.collective_timeout_s,
        spans_nodes=env.local_world_size < env.world_size,
        interface=run.cluster.interface,
    )


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
