"""Faults, for real: a killed rank, preemption signals, a non-finite loss."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moemesh.parallel import checkpoint
from tests.helpers import SMALL
from tests.launch._processes import ranks_of, wait_for_steps

pytestmark = pytest.mark.slow  # signals and kills against train.py's ranks

ROOT = Path(__file__).resolve().parents[2]


def _start(tmp_path, *overrides, new_session=False, env=None):
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID")},
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *SMALL, *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,  # its own process group: a "terminal" Ctrl-C reaches only it
    )


def _stop_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("moemesh:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_killed_rank_stops_the_others_quickly(tmp_path):
    proc = _start(tmp_path, "parallel=dp4", "trainer.steps=100000", "cluster.collective_timeout_s=600")
    wait_for_steps(tmp_path, 2, proc)
    ranks = ranks_of(proc.pid)
    assert len(ranks) == 4
    os.kill(ranks[2], signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 30  # bounded, far below the 600 s collective timeout
    assert "was killed by SIGKILL (on Linux, the kernel's out-of-memory killer sends it" in err
    assert not any(
        Path(f"/proc/{r}").exists() and "Z" not in Path(f"/proc/{r}/stat").read_text().split()[2] for r in ranks
    )  # no rank left running


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(tmp_path):
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000", "cluster.preempt_grace_s=60")
    wait_for_steps(tmp_path, 2, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    # Saved, not finished: non-zero (128 + SIGTERM), one line with the resume command.
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - t0 < 60
    line = _stop_line(err)
    assert "stopped by SIGTERM after step" in line and "resume=auto" in line
    assert f"hydra.run.dir={tmp_path / 'run'}" in line
    (ckpt,) = checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert step >= 2
    # A requeued job with the same run directory picks it up.
    resumed = _start(tmp_path, "parallel=dp2", f"trainer.steps={step + 2}", "resume=auto")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resumed from {ckpt}" in out and f"at step {step}" in out


@pytest.mark.shares_cores
def test_sigusr1_on_a_single_process_saves_and_stops(tmp_path):
    proc = _start(tmp_path, "trainer.steps=100000")
    wait_for_steps(tmp_path, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    assert "stop requested (SIGUSR1)" in out and "stopped by SIGUSR1" in _stop_line(err)
    assert checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_by_signal"] == ["SIGUSR1"]


@pytest.mark.shares_cores
def test_a_non_finite_gradient_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    proc = _start(tmp_path, "trainer.steps=20", "trainer.lr=1e30", "trainer.warmup_steps=0", "checkpoint.every=1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    lines = [l for l in err.splitlines() if l.startswith("moemesh:")]
    assert len(lines) == 1 and "non-finite gradient norm" in lines[0] and "stopped before the update" in lines[0]
    assert "Traceback" not in err
    kept = checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept and json.loads((kept[-1] / "meta.json").read_text())["step"] >= 1


def test_a_sweep_job_stopped_by_a_signal_says_how_to_resume_that_job(tmp_path):
    """``-m`` ignores ``hydra.run.dir``: the line names the job's own overrides as a single run in
    its directory, and that command continues it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "trainer.lr=1e-3,2e-3", "trainer.steps=100000"]
        + [f"hydra.sweep.dir={sweep}", *SMALL],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(tmp_path, 2, proc, metrics=sweep / "0_single" / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = _stop_line(err)
    assert line.endswith("resume=auto (the sweep's later jobs did not start)"), line
    command = line.split("resume with: ", 1)[1].rsplit(" (", 1)[0]
    argv = shlex.split(command)
    assert "-m" not in argv and "trainer.lr=0.001" in argv  # the job's value, as Hydra gives it
    assert f"hydra.run.dir={sweep / '0_single'}" in argv
    assert not (sweep / "1_single").exists()
    steps = json.loads((sweep / "0_single" / "summary.json").read_text())["steps"]
    argv[argv.index("trainer.steps=100000")] = f"trainer.steps={steps + 1}"
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv[2:]], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {steps}" in resumed.stdout


@pytest.mark.shares_cores
def test_skip_mode_skips_non_finite_steps(tmp_path):
    proc = _start(tmp_path, "trainer.steps=4", "trainer.lr=1e30", "trainer.warmup_steps=0", "trainer.on_nonfinite=skip")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") for r in records) and "update skipped" in out


def test_ctrl_c_on_spawned_ranks_saves_like_sigterm_and_says_how_to_resume(tmp_path):
    """A terminal's Ctrl-C reaches every process of its group: the launcher and each rank.
    Every rank finishes its step, saves and writes the summary; exit 130, one line."""
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000", new_session=True)
    wait_for_steps(tmp_path, 2, proc)
    ranks = ranks_of(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    line = _stop_line(err)
    assert "stopped by SIGINT after step" in line and "resume=auto" in line, line
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by_signal"] == ["SIGINT"]
    (ckpt,) = checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert json.loads((ckpt / "meta.json").read_text())["step"] == summary["steps"]
    assert not any(
        Path(f"/proc/{r}").exists() and "Z" not in Path(f"/proc/{r}/stat").read_text().split()[2] for r in ranks
    )  # no rank left running


def test_a_signal_on_one_rank_stops_all_and_is_named_by_rank_0(tmp_path):
    """SIGUSR1 to rank 1 only: every rank saves and stops; rank 0 names the signal it did not get
    (it said "a signal on another rank") and the exit code is 128 + SIGUSR1, not + SIGTERM."""
    proc = _start(tmp_path, "parallel=ep2", "trainer.steps=100000")
    wait_for_steps(tmp_path, 2, proc)
    ranks = ranks_of(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1 after step" in _stop_line(err)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_by_signal"] == ["SIGUSR1"]


def test_ctrl_c_sent_to_the_launcher_alone_reaches_its_ranks(tmp_path):
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000")
    wait_for_steps(tmp_path, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in _stop_line(err)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_by_signal"] == ["SIGINT"]


def test_ctrl_c_while_the_ranks_start_stops_them_all_once_they_exist(tmp_path):
    """A Ctrl-C that reaches the ranks while they import (before they have handlers) used to
    kill them with KeyboardInterrupt tracebacks: it is held until they can act on it, and
    every rank saves after its first step, like any first Ctrl-C."""
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000", new_session=True)
    deadline = time.monotonic() + 60
    while len(ranks_of(proc.pid)) < 2:  # spawned, still importing
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    ranks = ranks_of(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped by SIGINT after step" in _stop_line(err)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_by_signal"] == ["SIGINT"]
    assert checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert not any(
        Path(f"/proc/{r}").exists() and "Z" not in Path(f"/proc/{r}/stat").read_text().split()[2] for r in ranks
    )


def test_sigterm_while_the_ranks_start_reaches_every_rank(tmp_path):
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000")
    deadline = time.monotonic() + 60
    while len(ranks_of(proc.pid)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in _stop_line(err)


def test_a_sigkilled_launchers_rendezvous_dir_is_removed_by_the_next_start(tmp_path):
    """No `finally` runs in a SIGKILLed launcher: its directory names its owner, and a later
    launcher removes it once the owner is gone and nothing was written there for 10 min."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env_tmp = {"TMPDIR": str(tmp)}
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000", "cluster.preempt_grace_s=30", env=env_tmp)
    wait_for_steps(tmp_path, 2, proc)
    ranks = ranks_of(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60  # its ranks see it gone, get SIGINT, save and leave
    while any(Path(f"/proc/{r}").exists() for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{r}").exists() for r in ranks)
    (left,) = tmp.glob("moemesh-rdzv-*")
    assert int((left / "owner").read_text()) == proc.pid
    old = time.time() - 3600
    for f in [*left.iterdir(), left]:
        os.utime(f, (old, old))
    (tmp_path / "again").mkdir()
    done = _start(tmp_path / "again", "trainer.steps=1", "parallel=dp2", env=env_tmp)
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert list(tmp.glob("moemesh-rdzv-*")) == []  # the leftover, and the finished run's own


def test_ranks_of_a_launcher_sigkilled_while_they_start_do_not_train_on(tmp_path):
    """A launcher SIGKILLed while its ranks start (forked, not yet joined): each rank must notice
    its launcher is gone and leave at once, not train on as an orphan, nor wait out the
    rendezvous for a peer that has left (spawn._watch_launcher)."""
    proc = _start(tmp_path, "parallel=dp2", "trainer.steps=100000")
    deadline = time.monotonic() + 60
    while len(ranks := ranks_of(proc.pid)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()  # the ranks exist and are still starting
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{r}").exists() for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{r}").exists() for r in ranks), "ranks left running without their launcher"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # none of them trained
