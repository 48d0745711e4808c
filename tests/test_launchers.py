"""The launchers users start moemesh with all start the same run.

python train.py (spawn) and torchrun are covered in test_train_cli.py; here deepspeed,
both as its real launcher (installed by .ci/run; MOEMESH_REQUIRE_DEEPSPEED=1 makes its
absence a failure) and as the exact argv and environment it gives each rank, and
torchrun in the explicit multi-node form of the seed's scripts.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL

pytestmark = pytest.mark.slow  # train.py under real launchers (deepspeed, torchrun)

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["trainer.steps=2", "logger.console=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    drop = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _losses(run_dir: Path):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run spawned by plain python: what every launcher must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp / 'run'}", "parallel=ep2", *SMALL, *STEPS],
        cwd=tmp,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return _losses(tmp / "run")


def test_deepspeed_argv_and_environment(tmp_path, reference):
    """What `deepspeed --num_gpus=2 train.py ...` runs: `python -u train.py --local_rank=N ...`
    with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (launcher/launch.py)."""
    port, out = _free_port(), tmp_path / "run"
    procs = []
    for rank in range(2):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_SIZE="2",
            CROSS_RANK="0",
            CROSS_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        argv = [
            sys.executable,
            "-u",
            str(ROOT / "train.py"),
            f"--local_rank={rank}",
            "parallel=ep2",
            f"hydra.run.dir={out}",
            *SMALL,
            *STEPS,
        ]
        procs.append(
            subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert _losses(out) == pytest.approx(reference, rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_the_real_deepspeed_launcher(tmp_path, reference):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        if os.environ.get("MOEMESH_REQUIRE_DEEPSPEED") == "1":
            pytest.fail("MOEMESH_REQUIRE_DEEPSPEED=1 but no deepspeed launcher is installed")
        pytest.skip("deepspeed is not installed (.ci/run installs it: see its deepspeed line)")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            launcher,
            "--num_gpus=2",
            f"--master_port={_free_port()}",
            str(ROOT / "train.py"),
            "parallel=ep2",
            f"hydra.run.dir={out}",
            *SMALL,
            *STEPS,
        ],
        cwd=tmp_path,
        env=_env(DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _losses(out) == pytest.approx(reference, rel=1e-5)


def test_torchrun_in_the_explicit_multi_node_form(tmp_path, reference):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            torchrun,
            "--nnodes=1",
            "--node_rank=0",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            "parallel=ep2",
            "cluster=torchrun",
            f"hydra.run.dir={out}",
            *SMALL,
            *STEPS,
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(out) == pytest.approx(reference, rel=1e-5)
