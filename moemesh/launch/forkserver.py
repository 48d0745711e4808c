"""The fork server bare ``train.py``'s ranks fork from: started once, as early as it can be.

The server (multiprocessing's) imports torch and the training code, then forks each rank, so
the ranks skip those imports (``launch/spawn.py``). Importing takes seconds of one core; so
does the launcher's own import of torch and its checks. ``train.py`` therefore starts the
server as soon as the command is composed and its arithmetic checked (``early``), before it
imports torch itself: the two imports run side by side, and a launch on a machine with two
free cores is seconds shorter. Nothing here imports torch.

The server is a helper, not a rank: it creates no directory and runs nothing but imports. A
command refused after it started (a check that needs torch, a file that is gone) prints its
one line, then kills and reaps it before it exits (``session``, ``stop``): it never outlives
the launcher.
One ``session`` keeps it for every job of a local sweep; outside a session (a test calling
``spawn_ranks``), each launch starts and stops its own. ``_stop``/``_forkserver_pid`` are the
standard library's own (Python 3.8-3.13); without them the server leaves by itself once the
launcher and its ranks have closed their end of its pipe.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import signal
import sys
from multiprocessing import forkserver as _mp_forkserver
from multiprocessing import resource_tracker

from moemesh.launch.signals import STOP_SIGNALS

SPAWN = "moemesh.launch.spawn"  # the rank's life: imports torch
_started: tuple[int | None, tuple[str, ...]] | None = None  # (pid, preload) of the server this module started
_session = 0  # > 0 inside session(): spawn_ranks leaves the server running for the next job


def preload(worker_module: str) -> list[str]:
    """What the server imports before it forks a rank: the rank's life (torch) and the module of
    the training function (the trainer, FSDP, DCP). Never ``__main__``: the server would run the
    launching script again."""
    return [SPAWN, *([worker_module] if worker_module not in (SPAWN, "__main__") else [])]


def start(worker_module: str) -> None:
    """Start the server for ``worker_module`` unless it runs already; one started by someone else
    or for another training function is stopped first.

    It starts with the stop signals blocked, a mask its forks keep: a Ctrl-C that reaches a rank
    while it starts stays pending until the rank has its handlers (``spawn._spawned_rank``); the
    server itself ignores SIGINT and keeps SIGTERM blocked. The resource tracker starts first:
    starting it unblocks SIGINT and SIGTERM in this process. The launcher's umask is the
    server's, so it must be set before (``train.py`` sets it first); the ranks take the
    launcher's environment, directory and umask at each launch (``spawn._spawned_rank``)."""
    global _started
    wanted = tuple(preload(worker_module))
    if _started is not None and _started == (_pid(), wanted) and _running():
        return
    stop()
    _short_socket_dir()
    resource_tracker.ensure_running()
    multiprocessing.set_forkserver_preload(list(wanted))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with _server_imports(wanted):
            _mp_forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _started = (_pid(), wanted)


# The server listens on a socket in the process's multiprocessing directory, made under TMPDIR
# as <TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX: 32 bytes past TMPDIR, and an AF_UNIX path holds
# at most 107.
_SOCKET_DIR_ROOM = 107 - 32


def _short_socket_dir() -> None:
    """Under a long TMPDIR (a job-private one on a cluster, a test's) the server could not listen
    (OSError: AF_UNIX path too long): make this process's multiprocessing directory under /tmp
    instead. multiprocessing keeps the first one it makes, and removes it at exit."""
    import tempfile
    from multiprocessing import util

    if len(tempfile.gettempdir()) <= _SOCKET_DIR_ROOM or not os.path.isdir("/tmp"):
        return
    saved = tempfile.tempdir
    tempfile.tempdir = "/tmp"
    try:
        util.get_temp_dir()
    finally:
        tempfile.tempdir = saved


def stop(processes=()) -> None:
    """Kill the server (SIGKILL: one that is still importing would finish first) and reap it,
    unless one of ``processes``, ranks it forked, is alive: the server reaps its ranks, so it is
    then left to leave by itself once they have."""
    global _started
    stop_server = getattr(getattr(_mp_forkserver, "_forkserver", None), "_stop", None)
    if stop_server is None or any(p.is_alive() for p in processes):
        return
    pid = _pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stop_server()
    _started = None


def release(processes) -> None:
    """After a launch: stop the server, unless a ``session`` keeps it for the next job."""
    if not _session:
        stop(processes)


@contextlib.contextmanager
def session():
    """One command: a server started in it (``early``, or by the first launch) serves every job
    of a local sweep and is stopped, and reaped, when the command ends however it ends."""
    global _session
    _session += 1
    try:
        yield
    finally:
        _session -= 1
        if not _session:
            stop()


def early(worker_module: str) -> bool:
    """``start``, for a command known to spawn ranks here, before the launcher imports torch.
    Returns whether it started one."""
    try:
        start(worker_module)
    except OSError as err:  # no fork server on this system: spawn_ranks reports it when it runs
        print(f"moemesh: could not start the fork server early ({err}); starting it with the ranks", file=sys.stderr)
        return False
    return True


def _pid() -> int | None:
    return getattr(getattr(_mp_forkserver, "_forkserver", None), "_forkserver_pid", None)


def _running() -> bool:
    pid = _pid()
    if pid is None:
        return False
    try:  # WNOWAIT: the standard library reaps it, and keeps its own state
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


@contextlib.contextmanager
def _server_imports(modules):
    """The preloaded modules' directories on PYTHONPATH while the server starts: it does not take
    this process's ``sys.path`` (Python 3.11 ignores the path multiprocessing hands it), and
    moemesh need not be installed. (A preload the server cannot import is skipped silently, and
    each rank imports it after the fork.) Found without importing them."""
    roots: list[str] = []
    for name in modules:
        spec = importlib.util.find_spec(name.split(".")[0])  # an imported one's own spec, else found
        where = list(spec.submodule_search_locations or []) if spec else []
        origin = spec.origin if spec else None
        # a package: the directory above it; a module: its own
        found = [os.path.dirname(os.path.abspath(d)) for d in where] or (
            [os.path.dirname(os.path.abspath(origin))] if origin and spec and spec.has_location else []
        )
        for root in found:
            if root not in roots:
                roots.append(root)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*roots, *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
