"""Running ``train.py`` (or any command) from a script so that stopping the script stops it.

``subprocess.run`` leaves its child running when the script is stopped: ``timeout`` or a
scheduler sends SIGTERM, which ends Python at once, and Ctrl-C reaches the child's ranks only
when they share the terminal's process group. ``run`` starts the command in its own process
group (a session: the ranks a train.py forks are in it too), turns SIGTERM into an exception
while it waits, and on any exception (SIGTERM, Ctrl-C, a timeout) stops the whole group: SIGTERM
first (train.py then saves and exits), SIGKILL after ``grace_s``. The exception then goes on, so a
``TemporaryDirectory`` around the call is removed as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # what is left of the group: ranks that did not follow
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(
    cmd: list[str], *, timeout: float | None = None, grace_s: float = 20.0, **kwargs
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout, **kwargs)`` whose command, and every process it
    starts, ends when this call ends: normally, or by an exception (module doc)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    if main:
        signal.signal(signal.SIGTERM, on_term)
    proc = subprocess.Popen(cmd, start_new_session=True, **_popen_args(kwargs))
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _stop_group(proc, grace_s)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _popen_args(kwargs: dict) -> dict:
    """``subprocess.run``'s conveniences (capture_output) as Popen's arguments."""
    kwargs = dict(kwargs)
    if kwargs.pop("capture_output", False):
        kwargs["stdout"], kwargs["stderr"] = subprocess.PIPE, subprocess.PIPE
    if kwargs.pop("check", False):
        raise TypeError("run(check=True) is not supported: test returncode")
    return kwargs


if __name__ == "__main__":  # a manual check: python scripts/_child.py sleep 30, then kill the script
    print(run(sys.argv[1:]).returncode)
