"""The host-memory check counts the ranks by launch.env's one rule (detect_launcher_env):
train.py hands it the launcher's ranks on this machine, or None where it spawns them all."""

import pytest

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
    "SLURM_NTASKS",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_NTASKS_PER_NODE",
)


class _Seen(Exception):
    pass


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),  # plain python train.py: it spawns every rank here
        ({"RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, 2),  # no LOCAL_WORLD_SIZE: the launcher's fallback
        ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, 4),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, None),  # a batch script, not an srun task: it spawns
        ({"RANK": "0"}, None),  # a leftover RANK alone launches nothing
    ],
)
def test_train_passes_the_launchers_ranks_here(environ, expected, monkeypatch):
    import train

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    seen = {}

    def fake_check(run, dims, *, ranks_here, host_bytes, device_type):
        seen["ranks_here"] = ranks_here
        raise _Seen

    # The launcher's world size is not the default run's: only the ranks-here rule is under test.
    monkeypatch.setattr(train, "_validate", lambda run, env: run.parallel.dims)
    # _check_command imports these where it uses them (train.py imports no torch at its top).
    monkeypatch.setattr("moemesh.launch.checks.check_launcher", lambda run, env, dims: None)
    monkeypatch.setattr("moemesh.launch.checks.check_fits_host", fake_check)
    with pytest.raises(_Seen):
        train._check_command([])
    assert seen["ranks_here"] == expected
