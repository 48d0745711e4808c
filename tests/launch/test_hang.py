"""A rank that stops running (SIGSTOP, a debugger, a frozen process) is named and the job
stopped within cluster.hang_timeout_s; ranks that wait in a collective for it are not
blamed, and a whole job stopped and continued (Ctrl-Z, fg) is not a hang."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SMALL
from tests.launch._processes import ranks_of, wait_for_steps

pytestmark = pytest.mark.slow  # stops train.py's ranks and waits for the hang watch

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_PROCID")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp_path / "tmp")  # this run's rendezvous directory, and only it
    return env


def _start(tmp_path, *overrides, launcher=(sys.executable,), new_session=False):
    return subprocess.Popen(
        [*launcher, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *SMALL, *overrides],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def _rank_pids(proc, tmp_path, world_size) -> dict[int, int]:
    """rank -> pid, from the heartbeat files the spawned ranks write (pid and a count); else
    in start order (a launcher without heartbeats)."""
    (rdzv,) = (tmp_path / "tmp").glob("moemesh-rdzv-*")
    if not (rdzv / "beat0").exists():
        return dict(enumerate(ranks_of(proc.pid)))
    return {r: int((rdzv / f"beat{r}").read_text().split()[0]) for r in range(world_size)}


def _running(pids) -> list[int]:
    def state(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"

    return [p for p in pids if state(p) not in ("gone", "Z")]


def _kill(pid):  # what a timed-out test leaves running (a stopped rank does not leave on its own)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _moemesh_lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.startswith("moemesh:")]


def test_a_stopped_spawned_rank_is_named_and_the_job_stopped_within_hang_timeout(tmp_path):
    proc = _start(
        tmp_path,
        "parallel=dp4",
        "trainer.steps=100000",
        "cluster.hang_timeout_s=5",
        "cluster.collective_timeout_s=600",
    )
    wait_for_steps(tmp_path, 2, proc)
    pids = _rank_pids(proc, tmp_path, 4)
    os.kill(pids[1], signal.SIGSTOP)  # ranks 0, 2, 3 now wait for it in a collective
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [*pids.values(), proc.pid]:
            _kill(pid)
        raise
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, err
    (line,) = _moemesh_lines(err)
    assert f"rank 1 (pid {pids[1]}) stopped responding: no heartbeat for" in line, line
    assert "cluster.hang_timeout_s=5" in line and "every rank was stopped without saving" in line, line
    assert "Traceback" not in err
    assert 4.5 < elapsed < 25, elapsed  # the bound, not the 600 s collective timeout
    assert _running(pids.values()) == []  # the stopped rank too
    assert list((tmp_path / "tmp").glob("moemesh-rdzv-*")) == []  # the rendezvous directory is gone


def test_a_whole_job_stopped_and_continued_is_not_a_hang(tmp_path):
    """Ctrl-Z stops the launcher and its ranks together; after fg nobody is to blame."""
    proc = _start(
        tmp_path,
        "parallel=dp2",
        "trainer.steps=100000",
        "cluster.hang_timeout_s=4",
        "cluster.preempt_grace_s=60",
        new_session=True,
    )
    wait_for_steps(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGSTOP)
    time.sleep(12)  # three hang timeouts
    os.killpg(proc.pid, signal.SIGCONT)
    done = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    wait_for_steps(tmp_path, done + 3, proc)  # still training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped responding" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_with_rank(agent_pid: int, rank: int, timeout=120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in ranks_of(agent_pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no torchrun worker with RANK={rank}")


def test_a_stopped_torchrun_rank_is_named_by_its_watching_peer(tmp_path):
    """Under torchrun each rank beats into the job's store and rank r watches rank r+1: rank 0
    names the stopped rank 1 and exits 1, and torchrun stops the job."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    proc = _start(
        tmp_path,
        "parallel=dp2",
        "cluster=torchrun",
        "trainer.steps=100000",
        "cluster.hang_timeout_s=5",
        "cluster.collective_timeout_s=600",
        launcher=(
            torchrun,
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
        ),
    )
    wait_for_steps(tmp_path, 2, proc)
    worker = _worker_with_rank(proc.pid, 1)
    os.kill(worker, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        for pid in [*ranks_of(proc.pid), proc.pid]:
            _kill(pid)
        raise
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    (line,) = [l for l in _moemesh_lines(err) if "stopped responding" in l]
    assert line.startswith("moemesh: rank 1 (") and "no heartbeat for" in line and "rank 0 stops the job" in line, line
    # 5 s to notice; the watching rank SIGKILLs the stopped one (same machine), so torchrun's
    # teardown does not wait out its 30 s SIGTERM grace on a process that cannot act on it.
    assert 4.5 < elapsed < 25, elapsed
    assert _running([worker]) == []


def test_a_stopped_srun_rank_0_which_hosts_the_store_is_named(tmp_path):
    """Under srun rank 0 hosts the job's store, and a call to a stopped store blocks for ever:
    rank 1's clock-only thread names rank 0 once the store has been silent for the bound."""
    if not os.environ.get("SLURM_CONF") or not shutil.which("srun"):
        if os.environ.get("MOEMESH_REQUIRE_SLURM") == "1":
            pytest.fail("MOEMESH_REQUIRE_SLURM=1 but no SLURM here (SLURM_CONF unset or no srun)")
        pytest.skip("no SLURM here (bash .ci/slurm/up.sh starts a local one; .ci/run does)")
    proc = _start(
        tmp_path,
        "parallel=dp2",
        "cluster=slurm",
        "trainer.steps=100000",
        "cluster.hang_timeout_s=5",
        "cluster.collective_timeout_s=600",
        launcher=("srun", "-K", "-n2", sys.executable),
    )
    wait_for_steps(tmp_path, 2, proc, timeout=240)
    rank0, deadline = None, time.monotonic() + 60
    while rank0 is None:
        assert time.monotonic() < deadline, "no srun task with SLURM_PROCID=0"
        for pid in _tasks_of(tmp_path / "run"):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if b"SLURM_PROCID=0" in environ and comm.startswith("python"):
                rank0 = pid
    os.kill(rank0, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        _kill(rank0)
        proc.kill()
        raise
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    (line,) = [l for l in _moemesh_lines(err) if "stopped responding" in l]
    assert line.startswith("moemesh: rank 0 (") and "the job's store at" in line and "rank 0 hosts it" in line, line
    assert "rank 1 stops the job" in line
    assert 4.5 < elapsed < 35, elapsed
    assert _running([rank0]) == []


def _tasks_of(run_dir: Path) -> list[int]:
    """This run's processes, wherever they are (srun's tasks are slurmstepd's children)."""
    needle = f"hydra.run.dir={run_dir}".encode()
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if needle in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(p))
            except OSError:
                continue
    return found
