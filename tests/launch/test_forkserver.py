"""Bare train.py starts its ranks' fork server before it imports torch itself, keeps it for every
job of a local sweep, and leaves nothing of it behind, a refused command included."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID")

# train.py as a script in a fresh interpreter (nothing imported yet), with moemesh's server start
# watched: each start records whether torch was imported then and the server's pid after it.
_WATCHED = """
import json, os, runpy, sys
sys.path.insert(0, {root!r})
sys.argv = ["train.py", *{argv!r}]
from moemesh.launch import forkserver

starts = []
start = forkserver.start

def watched(module):
    torch_before = "torch" in sys.modules
    start(module)
    starts.append({{"torch_before": torch_before, "pid": forkserver._pid(), "module": module}})

forkserver.start = watched
if os.environ.get("TEST_SIGTERM_AFTER_EARLY_START"):
    import signal, threading
    early = forkserver.early

    def early_then_sigterm(module):
        # While the launcher imports torch (seconds), before any rank exists.
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return early(module)

    forkserver.early = early_then_sigterm
code = 0
try:
    runpy.run_path({root!r} + "/train.py", run_name="__main__")
except SystemExit as e:
    code = e.code
left = [s["pid"] for s in starts if os.path.exists(f"/proc/{{s['pid']}}")]
imported = [m for m in ("moemesh.trainer.loop", "torch.distributed.checkpoint") if m in sys.modules]
seen = {{"code": code, "starts": starts, "left": left, "after": forkserver._pid(), "imported": imported}}
print("WATCHED " + json.dumps(seen))
"""


def _watched(tmp_path, *argv, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | extra_env
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHED.format(root=str(ROOT), argv=list(argv))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("WATCHED ")]
    return json.loads(line.removeprefix("WATCHED ")), proc


@pytest.mark.slow
def test_a_local_sweep_has_one_server_started_before_torch_and_reaped_at_the_end(tmp_path):
    seen, proc = _watched(
        tmp_path, "-m", "parallel=dp2,ep2", "trainer.steps=2", *SMALL, f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert seen["code"] == 0, proc.stderr[-3000:]
    starts = seen["starts"]
    # Once before the launcher imported torch (train.py's early start), once per job's launch.
    assert len(starts) == 3, starts
    assert starts[0]["torch_before"] is False and starts[0]["module"] == "moemesh.trainer.loop"
    assert len({s["pid"] for s in starts}) == 1 and starts[0]["pid"] is not None  # the one server
    assert seen["left"] == [] and seen["after"] is None  # stopped and reaped when the command ended
    # The launcher named the training function: only the server imported it (and DCP, with it).
    assert seen["imported"] == [], seen["imported"]
    for job in ("0_dp2", "1_ep2"):
        assert json.loads((tmp_path / "sweep" / job / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_a_command_refused_after_the_server_started_leaves_no_process(tmp_path):
    # dp2's arithmetic holds, so the server starts; the CUDA check (it needs torch) then refuses.
    seen, proc = _watched(tmp_path, "parallel=dp2", "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}")
    assert seen["code"] == 2
    assert proc.stderr.strip() == (
        "moemesh: config error: trainer.device=cuda but no CUDA device is available; valid here: auto, cpu"
    )
    assert [s["torch_before"] for s in seen["starts"]] == [False]
    assert seen["left"] == [] and seen["after"] is None  # killed and reaped before the exit
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_no_server_for_a_single_rank_or_a_refused_layout(tmp_path):
    seen, proc = _watched(tmp_path, "trainer.steps=1", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert seen["code"] == 0 and seen["starts"] == [], proc.stderr[-3000:]
    assert "moemesh.trainer.loop" in seen["imported"]  # one rank trains in this process
    seen, proc = _watched(tmp_path, "parallel=dp2", "trainer.global_batch_size=3", f"hydra.run.dir={tmp_path / 'r2'}")
    assert seen["code"] == 2 and seen["starts"] == [], proc.stderr  # its arithmetic fails first


@pytest.mark.slow
def test_sigterm_before_the_ranks_exist_stops_the_server_too(tmp_path):
    seen, proc = _watched(
        tmp_path, "parallel=dp2", *SMALL, f"hydra.run.dir={tmp_path / 'run'}", TEST_SIGTERM_AFTER_EARLY_START="1"
    )
    assert seen["code"] == 128 + 15, proc.stderr[-3000:]
    assert len(seen["starts"]) == 1 and seen["starts"][0]["torch_before"] is False
    assert seen["left"] == [] and seen["after"] is None
    assert not (tmp_path / "run").exists()  # before Hydra made the run directory


@pytest.mark.slow
def test_in_process_cli_leaves_the_callers_sigterm_handler_and_no_server(tmp_path, monkeypatch, capsys):
    import signal

    from moemesh.launch import forkserver
    from tests.helpers import refused_cli

    before = signal.getsignal(signal.SIGTERM)
    code, _, err = refused_cli(["parallel=dp2", "trainer.device=cuda"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "trainer.device=cuda but no CUDA device is available" in err
    assert signal.getsignal(signal.SIGTERM) is before
    assert forkserver._pid() is None


def test_under_a_long_tmpdir_the_servers_socket_goes_under_tmp(tmp_path):
    """<TMPDIR>/pymp-X/listener-X must fit an AF_UNIX path (107 bytes): under a 95-character
    TMPDIR the server could not listen, and a bare multi-rank launch failed with a traceback."""
    long = tmp_path / ("x" * max(1, 95 - len(str(tmp_path)) - 1))
    long.mkdir()
    code = (
        "from multiprocessing import util\n"
        "from moemesh.launch import forkserver\n"
        "forkserver._short_socket_dir()\n"
        "from multiprocessing import forkserver as f\n"
        "f.ensure_running()\n"  # listens: this is what failed
        "print(util.get_temp_dir())\n"
    )
    env = {**os.environ, "TMPDIR": str(long), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    made = Path(proc.stdout.strip())
    assert made.parent == Path("/tmp") and made.name.startswith("pymp-") and not made.exists()  # removed at exit
