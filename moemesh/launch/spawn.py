"""Bare ``python train.py``: spawn world_size local ranks and see them through.

The ranks rendezvous through a file store in a private temporary directory (nothing
listens on the network) and gloo talks over loopback. If any rank fails, the others are
terminated and the parent exits 1 naming the rank that failed first; a rank whose heartbeat
stops is named and every rank stopped; a stop signal reaches every rank, which saves after
its step; a directory left by a launcher that was SIGKILLed is removed by a later start.

The ranks fork from multiprocessing's fork server, which imports torch and the training code
once, instead of each rank importing them again after a spawn (about 2 s of CPU a rank: on a
2-core machine most of a small 4-rank run's start); ``launch/forkserver.py`` starts it, early
where train.py can, and stops it. The server has run nothing but those imports (no Python
thread, no CUDA context, no OpenMP pool), which is what makes forking it safe where forking the
launcher would not be. A rank's parent is then the server, not the launcher: each rank watches
the launcher itself (``_watch_launcher``) and stops, as after a signal, when it dies.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

import torch

from moemesh.errors import RanksFailed, first_line
from moemesh.launch import forkserver
from moemesh.launch.heartbeat import HangWatch, Stalled, beat_interval, beat_into_file
from moemesh.launch.rank import resolve_worker, run_rank, worker_module
from moemesh.launch.signals import STOP_SIGNALS, install_stop_handlers


class _Terminated(Exception):
    """The launcher was asked to stop (SIGTERM, or the first Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt_now(signum, frame):
    raise KeyboardInterrupt


RENDEZVOUS_PREFIX = "moemesh-rdzv-"


def spawn_ranks(run, dims, output_dir, data_paths, worker):
    import torch.multiprocessing as mp

    remove_abandoned_rendezvous(Path(tempfile.gettempdir()))
    rendezvous = tempfile.mkdtemp(prefix=RENDEZVOUS_PREFIX)  # 0700
    Path(rendezvous, "owner").write_text(f"{os.getpid()}\n")  # a later start removes it if this one is SIGKILLed
    # SIGTERM, SIGUSR1/2 or a first Ctrl-C: every rank saves after its step (_graceful_stop);
    # a second Ctrl-C stops them at once. One that arrives while the ranks start is kept
    # until they exist, and acted on by the loop below.
    pending: list[int] = []
    ctx = None
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in STOP_SIGNALS}
    try:
        # The ranks start with the stop signals blocked: the fork server starts inside that mask,
        # which survives its exec and the forks of the ranks (launch/forkserver.py, where train.py
        # may have started it already). A terminal's Ctrl-C that reaches a rank while it starts
        # stays pending until the rank has its handlers (_spawned_rank) instead of killing it with
        # a KeyboardInterrupt. The mask below covers a server that died since and is restarted.
        forkserver.start(worker_module(worker))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            ctx = mp.start_processes(
                _spawned_rank,
                args=(
                    run,
                    dims,
                    f"file://{rendezvous}/store",
                    output_dir,
                    data_paths,
                    worker,
                    os.getpid(),
                    dict(os.environ),
                    os.getcwd(),
                    _umask(),
                ),
                nprocs=dims.world_size,
                join=False,
                start_method="forkserver",
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        watch = HangWatch(rendezvous, dims.world_size, run.cluster.hang_timeout_s)
        # When a rank fails, join() stops the others with a warning line per rank ("Terminating
        # process N via signal SIGTERM"); the reason line below says so once.
        torch_spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = torch_spawn_log.level
        torch_spawn_log.setLevel(logging.ERROR)
        try:
            while not ctx.join(timeout=watch.interval):
                if pending:
                    raise _Terminated(pending[0])
                watch.check([p.is_alive() for p in ctx.processes])
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # ProcessContext.join has already terminated the other ranks. The rank it names
            # is the first it noticed, often a peer whose collective broke: report the root
            # cause, the rank that failed earliest (or was killed).
            reason, kind = _root_cause(rendezvous, e)
            print(f"moemesh: {reason}", file=sys.stderr)
            raise RanksFailed(reason, kind) from None
        except Stalled as hung:
            # Its peers wait in a collective for it: nothing can be saved. SIGKILL reaches a
            # stopped process too.
            _stop_all(ctx.processes, timeout=0, kill=True)
            what = (
                f"no heartbeat for {hung.silent_s:.0f} s"
                if hung.started
                else f"it never started beating ({hung.silent_s:.0f} s) while the others ran"
            )
            reason = (
                f"rank {hung.rank} (pid {ctx.processes[hung.rank].pid}) stopped responding: {what} "
                f"(cluster.hang_timeout_s="
                f"{run.cluster.hang_timeout_s}); it was stopped (SIGSTOP, a debugger) or is frozen; every rank "
                "was stopped without saving (the last checkpoint is kept)"
            )
            print(f"moemesh: {reason}", file=sys.stderr)
            raise RanksFailed(reason) from None
        except _Terminated as stop:
            # Preemption or Ctrl-C: pass the signal on; the ranks save a checkpoint after
            # their current step and exit. Whoever is still running after the grace period
            # is killed.
            try:
                return _graceful_stop(ctx, run.cluster.preempt_grace_s, stop.signum)
            except KeyboardInterrupt:
                _stop_all(ctx.processes, timeout=0, kill=True)
                print("moemesh: SIGINT again: every rank was stopped without saving", file=sys.stderr)
                raise SystemExit(130) from None
        finally:
            torch_spawn_log.setLevel(level)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(rendezvous, ignore_errors=True)
        if ctx is not None:
            forkserver.release(ctx.processes)
    return None


def _umask() -> int:
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _watch_launcher(local_rank: int, launcher_pid: int, joined: threading.Event) -> None:
    """What a spawned child gets from the kernel's PDEATHSIG, for a rank whose parent is the fork
    server: when the launcher dies, a rank that has joined its peers gets SIGINT (a stop request:
    save after the step, leave, with every rank); one that has not (still starting, or waiting
    for a peer that saw the launcher gone and left) leaves at once, not an orphan that trains on
    or waits out the rendezvous timeout. The rank watches the launcher's end of the pipe
    multiprocessing gave it."""
    launcher = multiprocessing.parent_process()
    if launcher is None or not launcher.is_alive():
        _leave(local_rank, launcher_pid)

    def _on_launcher_exit():
        wait([launcher.sentinel])
        if not joined.is_set():
            _leave(local_rank, launcher_pid)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=_on_launcher_exit, name="moemesh-launcher-watch", daemon=True).start()


def _leave(local_rank: int, launcher_pid: int):
    print(f"moemesh: rank {local_rank}: the launcher (pid {launcher_pid}) is gone; not starting", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def remove_abandoned_rendezvous(tmp: Path, min_idle_s: float = 600.0) -> list[Path]:
    """Remove this user's rendezvous directories left by a launcher that was SIGKILLed (no
    ``finally`` ran): its owner pid is gone and nothing was written there for min_idle_s
    (ranks still running, e.g. saving after their launcher died, beat every second).
    Directories without an owner file are left alone. Returns those removed."""
    removed, now = [], time.time()
    for d in tmp.glob(RENDEZVOUS_PREFIX + "*"):
        try:
            if not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            owner = int((d / "owner").read_text().split()[0])
            if _alive(owner):
                continue
            newest = max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())])
            if now - newest < min_idle_s:
                continue
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process now has that pid
    return True


def _stop_all(processes, timeout: float, kill: bool = False) -> None:
    for p in processes:
        if p.is_alive():
            p.kill() if kill else p.terminate()
    for p in processes:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join()


def _graceful_stop(ctx, grace_s: float, signum: int):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the save short
    signal.signal(signal.SIGINT, _interrupt_now)  # a second Ctrl-C does
    name = signal.Signals(signum).name
    for p in ctx.processes:
        if p.is_alive():
            # A rank the terminal's Ctrl-C also reached may have saved and exited (and been
            # reaped by the fork server) since is_alive(): it needs no signal.
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signum)
    deadline = time.monotonic() + grace_s
    for p in ctx.processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    late = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
    _stop_all(ctx.processes, timeout=5)
    codes = [p.exitcode for p in ctx.processes]
    if late or any(codes):
        print(
            f"moemesh: {name}: ranks {late} did not stop within cluster.preempt_grace_s={grace_s}s"
            if late
            else f"moemesh: {name}: ranks exited with codes {codes}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return None  # every rank saved and wrote the summary; train.py reports the stop


def _root_cause(rendezvous: str, err) -> tuple[str, str | None]:
    """The line that says why the ranks failed, and the type name of the exception the earliest
    failed rank raised (None when none did: a rank killed by a signal or exited)."""
    failures = []
    for f in Path(rendezvous).glob("rank*.err"):
        try:
            stamp, rank_text, message = f.read_text().split("\t", 2)
            failures.append((float(stamp), int(rank_text), message))
        except (OSError, ValueError):  # a rank stopped while writing it
            continue
    if isinstance(err, torch.multiprocessing.ProcessExitedException) and err.signal_name:
        oom = " (on Linux, the kernel's out-of-memory killer sends it: see dmesg)"
        oom = oom if err.signal_name == "SIGKILL" else ""
        return f"rank {err.error_index} was killed by {err.signal_name}{oom}; the other ranks were stopped", None
    if not failures:
        return f"rank {err.error_index} exited with code {getattr(err, 'exit_code', 1)}", None
    _, rank, message = min(failures)
    kind = message.split(":", 1)[0] if ":" in message else None
    return f"rank {rank} failed: {message} (the other ranks were stopped)", kind


def _spawned_rank(
    local_rank, run, dims, init_method, output_dir, data_paths, worker, launcher_pid, environ, cwd, umask
):
    joined = threading.Event()  # set once every rank has joined: the training function runs
    _watch_launcher(local_rank, launcher_pid, joined)
    # The server's environment, directory and umask are the launcher's when it started; a server
    # kept for a sweep's next job, or started before the launcher's last checks, may have others:
    # the launcher's at this launch win.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.umask(umask)
    # This rank started with the stop signals blocked (spawn_ranks): install the handlers, then
    # let through any signal that arrived while it was starting; it becomes a stop request.
    install_stop_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    rendezvous = init_method.removeprefix("file://").rsplit("/", 1)[0]
    beat_into_file(Path(rendezvous, f"beat{local_rank}"), beat_interval(run.cluster.hang_timeout_s))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # spawned ranks talk over loopback only
    try:
        train = resolve_worker(worker)  # the fork server imported its module

        def joined_worker(run, ctx):
            joined.set()
            return train(run, ctx)

        run_rank(run, dims, local_rank, local_rank, dims.world_size, init_method, output_dir, data_paths, joined_worker)
    except BaseException as e:
        first = first_line(str(e))
        Path(rendezvous, f"rank{local_rank}.err").write_text(
            f"{time.time()}\t{local_rank}\t{type(e).__name__}: {first}"
        )
        raise
    # The rank's work is done and written, and its process group destroyed. Leave without
    # the interpreter's teardown: about 1 run in 20 of 2-rank ep2 here, a C++ thread still
    # joinable at static destruction aborted a finished rank ("terminate called without an
    # active exception", no Python frame), which the launcher must then report as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
