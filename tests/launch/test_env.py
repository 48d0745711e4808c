"""How many ranks a launcher starts on this machine (the host-memory check and thread counts use it)."""

import pytest

from moemesh.launch.env import detect_launcher_env

BASE = {"RANK": "3", "WORLD_SIZE": "16", "MASTER_ADDR": "node0"}


@pytest.mark.parametrize(
    "extra, local",
    [
        ({"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
        ({"LOCAL_SIZE": "8", "CROSS_RANK": "0"}, 8),  # deepspeed's per-node launcher
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),  # mpirun
        ({}, 16),  # no per-node count: every rank may be here
    ],
)
def test_ranks_on_this_machine_under_each_launcher(extra, local):
    assert detect_launcher_env({**BASE, **extra}).local_world_size == local


@pytest.mark.parametrize(
    "per_node, node, local",
    [("4(x2),2", "0", 4), ("4(x2),2", "1", 4), ("4(x2),2", "2", 2), ("8", "0", 8), ("3,5", "1", 5)],
)
def test_srun_counts_this_nodes_tasks(per_node, node, local):
    env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "10", "SLURM_NODEID": node}
    env["SLURM_STEP_TASKS_PER_NODE"] = per_node
    assert detect_launcher_env(env).local_world_size == local
