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


def test_a_one_task_srun_step_is_a_shell_not_a_launcher():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_PTY_PORT": "4000"}
    assert detect_launcher_env(env) is None
    assert detect_launcher_env({**env, "SLURM_NTASKS": "2"}).kind == "srun"


def test_a_local_rank_argument_must_agree_with_local_rank():
    from moemesh.errors import ConfigError
    from moemesh.launch.env import strip_local_rank_args

    assert strip_local_rank_args(["--local_rank=1", "x=1"], {"LOCAL_RANK": "1"}) == ["x=1"]
    with pytest.raises(ConfigError, match="disagrees with LOCAL_RANK=0"):
        strip_local_rank_args(["--local_rank", "1"], {"LOCAL_RANK": "0"})


def test_an_interface_variable_set_another_way_is_refused():
    import socket

    from moemesh.errors import ConfigError
    from moemesh.launch.checks import check_interface
    from tests.helpers import tiny_run

    name = socket.if_nameindex()[0][1]  # an interface this machine has
    run = tiny_run(**{"cluster.interface": name})
    env = detect_launcher_env(BASE)
    check_interface(run, env, environ={"GLOO_SOCKET_IFNAME": name})
    check_interface(run, env, environ={})
    with pytest.raises(ConfigError, match="NCCL_SOCKET_IFNAME=.* is set"):
        check_interface(run, env, environ={"NCCL_SOCKET_IFNAME": name + "x"})
