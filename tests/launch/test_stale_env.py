"""Launcher variables left in a shell (RANK/WORLD_SIZE/MASTER_ADDR, or an interactive srun
step's SLURM_PROCID/SLURM_NTASKS) do not turn a plain `python train.py` into one rank of a
job that never forms: one line, exit 2, seconds. A launcher's own ranks still join
(tests/test_launchers.py, tests/test_train_cli.py run torchrun and deepspeed for real)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moemesh.launch.env import detect_launcher_env, launcher_markers, stale_launcher_env
from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[2]
CLEAN = (
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
    "SLURM_JOB_ID",
    "SLURM_PTY_PORT",
    "TORCHELASTIC_RUN_ID",
    "LOCAL_SIZE",
    "CROSS_RANK",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popen(tmp_path, extra_env, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(extra_env)
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"hydra.run.dir={tmp_path / 'run'}",
            "parallel=ep2_dp2",
            *SMALL,
            "trainer.steps=2",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _refused(tmp_path, extra_env, *overrides, within_s):
    t0 = time.monotonic()
    proc = _popen(tmp_path, extra_env, *overrides)
    try:
        _, err = proc.communicate(timeout=within_s + 30)
    finally:
        proc.kill()
        proc.wait()
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("moemesh: config error: "), err
    assert elapsed < within_s, elapsed
    assert not (tmp_path / "run").exists()  # nothing left behind
    return lines[0]


@pytest.mark.slow
@pytest.mark.shares_cores
def test_stale_rank_0_variables_are_refused_after_the_short_rendezvous(tmp_path):
    env = {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "LOCAL_RANK": "0",
    }
    # After cluster.rendezvous_timeout_s (30 s by default, 5 here) plus start-up: not the 300 s
    # collective timeout.
    line = _refused(tmp_path, env, "cluster.rendezvous_timeout_s=5", within_s=45)
    assert "no launcher (torchrun, deepspeed, srun, mpirun) started this process" in line
    assert "the 4-rank job did not form" in line
    assert "unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT" in line


@pytest.mark.slow
@pytest.mark.shares_cores
def test_stale_rank_1_variables_are_refused_when_rank_0_does_not_answer(tmp_path):
    port = _free_port()
    env = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    line = _refused(tmp_path, env, "cluster.rendezvous_timeout_s=5", within_s=45)
    assert f"rank 0 did not answer at 127.0.0.1:{port} within cluster.rendezvous_timeout_s=5s" in line
    assert "unset RANK WORLD_SIZE MASTER_ADDR MASTER_PORT" in line


@pytest.mark.slow
@pytest.mark.shares_cores
def test_stale_variables_without_master_port_are_refused_before_anything_starts(tmp_path):
    line = _refused(tmp_path, {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "localhost"}, within_s=30)
    assert "MASTER_PORT is not" in line and "unset RANK WORLD_SIZE MASTER_ADDR" in line


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_stale_world_size_says_what_to_unset(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    line = _refused(tmp_path, env, within_s=30)
    assert "WORLD_SIZE=2 from the launcher != dp*ep*tp*pp = 2*2*1*1 = 4" in line
    assert "no launcher started this process" in line and "unset RANK WORLD_SIZE MASTER_ADDR MASTER_PORT" in line


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_shell_inside_an_interactive_srun_step_is_refused_at_once(tmp_path):
    """salloc's interactive step or `srun -n4 --pty bash`: the shell carries SLURM_PROCID=0,
    SLURM_NTASKS=4 and a step id, but no srun task will join it."""
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_PTY_PORT": "40000",
    }
    line = _refused(tmp_path, env, within_s=30)
    assert "SLURM_PROCID=0, SLURM_NTASKS=4 describe task 0 of a 4-task srun step" in line
    assert "env -u SLURM_PROCID python train.py" in line


# The other direction: what a launcher's ranks carry is trusted.
TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "h",
    "MASTER_PORT": "1",
    "LOCAL_RANK": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "GROUP_RANK": "0",
}
DEEPSPEED = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "1",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "0",
    "CROSS_SIZE": "1",
}
SRUN_TASK = {
    "SLURM_PROCID": "2",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "7",
    "SLURM_PTY_PORT": "40000",
}  # srun --pty -n4 python train.py: slurmstepd is the parent


@pytest.mark.parametrize(
    "environ, parent, launcher",
    [
        (TORCHRUN, "python", "torchrun"),
        (DEEPSPEED, "python", "deepspeed"),
        ({**DEEPSPEED, "OMPI_COMM_WORLD_SIZE": "2"}, "mpirun", "deepspeed"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "OMPI_COMM_WORLD_SIZE": "2"},
            "orted",
            "mpirun",
        ),
        (SRUN_TASK, "slurmstepd", "srun"),
        ({**SRUN_TASK, "RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "n1"}, "slurmstepd", "srun"),  # submitit's export
    ],
)
def test_a_launchers_ranks_are_trusted(environ, parent, launcher):
    assert launcher_markers(environ, parent) == launcher
    assert stale_launcher_env(detect_launcher_env(environ), environ, parent) is None


@pytest.mark.parametrize(
    "environ, parent",
    [
        ({"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "bash"),
        ({**SRUN_TASK, "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "bash"),
    ],
)
def test_variables_without_a_launcher_are_judged_by_the_short_rendezvous(environ, parent):
    assert launcher_markers(environ, parent) is None
    assert stale_launcher_env(detect_launcher_env(environ), environ, parent) is None  # decided at start


@pytest.mark.slow
def test_a_hand_rolled_launch_without_markers_still_trains(tmp_path):
    """Two processes started by a script with RANK/WORLD_SIZE/MASTER_* and nothing else: they
    meet within cluster.rendezvous_timeout_s and train like a launcher's ranks."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(_popen(tmp_path, env, "parallel=ep2"))
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
