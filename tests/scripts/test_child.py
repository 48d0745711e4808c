"""scripts/_child.py: a script stopped by SIGTERM (timeout, a scheduler) or a timeout of its own
stops the train.py it started and every process that one started. With subprocess.run the
training and its four ranks ran on after `timeout 60 python scripts/bench_schedules_routing.py`."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts._child import run

ROOT = Path(__file__).resolve().parents[2]
# a command that starts a grandchild (as train.py starts its ranks), writes its pid, and waits
TREE = (
    "import subprocess, sys, time; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(120)"
)


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie its parent has not reaped is gone too
            if f.read().split(") ", 1)[1].startswith("Z"):
                return True
        time.sleep(0.05)
    return False


def _pid(path: Path) -> int:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(path.read_text())


def test_a_script_stopped_by_sigterm_stops_the_whole_tree(tmp_path):
    pidfile = tmp_path / "pid"
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from scripts._child import run; "
        f"run([sys.executable, '-c', {TREE!r}, {str(pidfile)!r}])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    grandchild = _pid(pidfile)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    try:
        assert proc.returncode == 128 + signal.SIGTERM
        assert _gone(grandchild)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_a_timeout_stops_the_whole_tree_and_raises(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", TREE, str(pidfile)], timeout=3)
    assert _gone(_pid(pidfile))
    done = run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "ok\n")
