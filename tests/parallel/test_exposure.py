"""What a run writes (run dir, .hydra, train.log, metrics.jsonl, checkpoints) is private by
default whatever the shell's umask; cluster.output_access=group lets the group read it."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL

pytestmark = pytest.mark.slow  # runs train.py end to end

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_PROCID")


def _run(tmp_path, *overrides, where=None):
    """train.py with the small model for 2 steps, from a shell with a common umask (0755
    directories, 0644 files); ``where`` replaces hydra.run.dir=<tmp_path>/run (a sweep's dir)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *(where or [f"hydra.run.dir={tmp_path / 'run'}"]),
            *SMALL,
            "trainer.steps=2",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        umask=0o022,
    )
    return proc, tmp_path / "run"


def _modes(run: Path) -> dict[str, int]:
    (ckpt,) = (run / "checkpoints").iterdir()
    paths = {
        "run dir": run,
        "checkpoints": run / "checkpoints",
        ".hydra/config.yaml": run / ".hydra" / "config.yaml",
        "train.log": run / "train.log",
        "metrics.jsonl": run / "metrics.jsonl",
        "summary.json": run / "summary.json",
        "checkpoint dir": ckpt,
        "checkpoint meta": ckpt / "meta.json",
    }
    paths.update({f"checkpoint {f.name}": f for f in ckpt.iterdir() if f.suffix == ".distcp"})
    return {name: stat.S_IMODE(p.stat().st_mode) for name, p in paths.items()}


def test_outputs_are_private_by_default(tmp_path):
    proc, run = _run(tmp_path, "parallel=dp2")  # rank 1 writes its own checkpoint shard
    assert proc.returncode == 0, proc.stderr
    modes = _modes(run)
    assert sum(name.startswith("checkpoint __") for name in modes) == 2
    open_to_others = {name: oct(m) for name, m in modes.items() if m & 0o077}
    assert open_to_others == {}


def test_output_access_group_lets_the_group_read(tmp_path):
    proc, run = _run(tmp_path, "cluster.output_access=group")
    assert proc.returncode == 0, proc.stderr
    for name, mode in _modes(run).items():
        is_dir = name in ("run dir", "checkpoints", "checkpoint dir")
        assert mode & 0o070 == (0o050 if is_dir else 0o040), (name, oct(mode))
        assert mode & 0o007 == 0, (name, oct(mode))


def test_each_job_of_a_sweep_writes_with_its_own_access(tmp_path):
    """The jobs' ranks fork from one server, started under the sweep's most private umask: each
    launch gives its ranks the umask of its own job (rank 1 writes its own checkpoint shard).
    Hydra creates every job's directory and .hydra/ under that umask, before the job starts."""
    sweep = tmp_path / "sweep"
    proc, _ = _run(
        tmp_path, "parallel=dp2", "cluster.output_access=private,group", where=["-m", f"hydra.sweep.dir={sweep}"]
    )
    assert proc.returncode == 0, proc.stderr
    (private,) = sweep.glob("0_*")
    (group,) = sweep.glob("1_*")
    assert {n: oct(m) for n, m in _modes(private).items() if m & 0o077} == {}
    modes = {n: m for n, m in _modes(group).items() if n not in ("run dir", ".hydra/config.yaml", "train.log")}
    assert sum(name.startswith("checkpoint __") for name in modes) == 2
    for name, mode in modes.items():
        is_dir = name in ("checkpoints", "checkpoint dir")
        assert mode & 0o070 == (0o050 if is_dir else 0o040), (name, oct(mode))


def test_output_access_is_checked_before_anything_is_created(tmp_path):
    proc, run = _run(tmp_path, "cluster.output_access=world")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "moemesh: config error: cluster.output_access='world' is not one of private, group, "
        "inherit (private: 0700/0600; group: group may read, 0750/0640; inherit: the "
        "shell's umask)"
    )
    assert not run.exists()
