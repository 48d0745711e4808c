"""wandb never stops a run for being offline: an API key on a node without network (every job
on an air-gapped cluster) cost 109 s in wandb.init and then a traceback. Now: a connection probe
and a short init timeout, then offline logging and one note; a malformed key is one note too."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moemesh.parallel.dims import ParallelDims
from moemesh.trainer.wandb_tracker import WandbTracker, unreachable
from tests.helpers import SMALL, tiny_run

ROOT = Path(__file__).resolve().parents[2]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # well-formed, unknown to any server


def _wandb_env(tmp_path, **extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WANDB_") and k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")
    }
    env.update(
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        **extra,
    )
    return env


def _train(tmp_path, env):
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "logger=wandb",
            "trainer.steps=3",
            f"hydra.run.dir={tmp_path / 'run'}",
            *SMALL,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    return proc, time.monotonic() - start


PROXIES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def _closed_port() -> int:
    """A local port that refuses connections: bound, then released, nothing listens there."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return port


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_key_without_network_logs_offline_with_one_note_and_finishes_quickly(tmp_path):
    # No network, on any machine: the server is a local port nothing listens on (and no proxy).
    env = _wandb_env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}")
    for k in PROXIES:
        env.pop(k, None)
    proc, seconds = _train(tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("moemesh: wandb: ")]
    assert len(notes) == 1 and "cannot reach" in notes[0] and "; logging offline to " in notes[0], proc.stdout
    assert "wandb sync" in notes[0] and "Traceback" not in proc.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert seconds < 60, seconds  # start-up, 3 steps and wandb's offline finish: about 10 s here
    assert FAKE_KEY not in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_malformed_key_is_one_note_at_start_and_the_run_goes_on(tmp_path):
    proc, _ = _train(tmp_path, _wandb_env(tmp_path, WANDB_API_KEY="not-a-key"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (note,) = [line for line in proc.stdout.splitlines() if line.startswith("moemesh: wandb: ")]
    assert note.startswith("moemesh: wandb: WANDB_API_KEY is not a valid key (API key must have 40+ characters")
    assert "logging offline" in note and "not-a-key" not in note
    log = (tmp_path / "run" / "train.log").read_text()
    assert note in log.splitlines()[:4]  # said at the start, and kept in the run's log


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers (a firewall that drops, a hung proxy)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    srv.close()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_server_that_never_answers_costs_the_init_timeout_then_offline(tmp_path, monkeypatch, silent_server):
    # WANDB_SERVICE is wandb's own: the address of this process's wandb service, which the
    # fallback's teardown replaces. Restoring an old value would point later subprocesses
    # (they inherit it) at a stopped service.
    for k in [k for k in os.environ if k.startswith("WANDB_") and k != "WANDB_SERVICE"]:
        monkeypatch.delenv(k)
    for k, v in _wandb_env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=silent_server).items():
        if k.startswith("WANDB_"):
            monkeypatch.setenv(k, v)
    run = tiny_run(**{"logger.wandb": True, "logger.init_timeout_s": 3.0})
    start = time.monotonic()
    tracker = WandbTracker(run, ParallelDims(), str(tmp_path))
    seconds = time.monotonic() - start
    try:
        assert tracker.note is not None and "; logging offline to " in tracker.note, tracker.note
        assert tracker.run.offline and "\n" not in tracker.note
        # The 3 s timeout plus wandb's own start and teardown (about 18 s here), not its default 90 s.
        assert seconds < 45, seconds
    finally:
        tracker.finish()


def test_the_probe_says_why_a_server_cannot_be_reached(monkeypatch, silent_server):
    for k in PROXIES:
        monkeypatch.delenv(k, raising=False)
    assert unreachable(silent_server, 2.0) is None
    port = _closed_port()
    why = unreachable(f"https://127.0.0.1:{port}", 2.0)
    assert why.startswith(f"cannot reach 127.0.0.1:{port} (") and "refused" in why.lower()
    assert unreachable("https://host.invalid", 2.0).startswith("cannot reach host.invalid:443 (")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")  # wandb would connect through it
    assert unreachable(silent_server, 2.0).startswith(f"cannot reach proxy 127.0.0.1:{port} (")
