"""Launch: environment detection, and a failing rank never leaves the others hanging."""

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from moemesh.errors import ConfigError
from moemesh.launch.env import detect_launcher_env, strip_local_rank_args
from moemesh.launch.rank import resolve_worker, worker_module
from moemesh.launch.run import run_ranks
from moemesh.launch.signals import install_stop_handlers
from moemesh.parallel.dims import ParallelDims
from tests.helpers import tiny_run
from tests.launch._processes import children, descendants


@pytest.mark.slow
def test_detects_torchrun_srun_and_bare():
    assert detect_launcher_env({}) is None
    tr = detect_launcher_env({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "LOCAL_RANK": "1"})
    assert (tr.kind, tr.rank, tr.world_size, tr.local_rank) == ("torchrun", 3, 4, 1)
    srun = detect_launcher_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_STEP_ID": "0",
            "SLURM_NTASKS_PER_NODE": "4(x2)",
        }
    )
    assert (srun.kind, srun.rank, srun.world_size, srun.local_rank, srun.local_world_size) == ("srun", 5, 8, 1, 4)
    # The batch script of an sbatch job is not a rank.
    assert detect_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) is None


def test_local_rank_arguments_of_deepspeed_and_torch_launch_are_accepted():
    args = ["parallel=ep2", "trainer.steps=2"]
    for form in (["--local_rank=1"], ["--local-rank=1"], ["--local_rank", "1"]):
        assert strip_local_rank_args([*form, *args], {"LOCAL_RANK": "1"}) == args
        assert strip_local_rank_args([args[0], *form, args[1]], {}) == args  # anywhere in argv
    with pytest.raises(ConfigError, match="--local_rank=0 disagrees with LOCAL_RANK=1"):
        strip_local_rank_args(["--local_rank=0", *args], {"LOCAL_RANK": "1"})
    with pytest.raises(ConfigError, match="--local-rank=x: expected a non-negative integer"):
        strip_local_rank_args(["--local-rank=x"], {})


def test_the_training_function_is_given_itself_or_by_name():
    from moemesh.trainer.loop import train

    assert resolve_worker("moemesh.trainer.loop:train") is train
    assert resolve_worker(train) is train
    assert worker_module("moemesh.trainer.loop:train") == worker_module(train) == "moemesh.trainer.loop"
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        resolve_worker("moemesh.trainer.loop.train")


def test_second_ctrl_c_stops_a_lone_process_at_once():
    import signal

    previous = signal.getsignal(signal.SIGINT)
    flag = install_stop_handlers(second_interrupt_exits=True)
    try:
        flag.received.clear()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.get() and flag.names() == ["SIGINT"]  # the first: save at the step boundary
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        flag.received.clear()
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, previous)


def _processes_of_this_test():
    """Every process below this one but multiprocessing's own helpers (its resource tracker, and
    a fork server: the one tests/dist_utils.py keeps for the session, or the one run_ranks starts
    and stops). Ranks forked by a server are its children: they count."""
    found = []
    for kid, cmd in children(os.getpid()):
        if not (b"resource_tracker" in cmd or b"multiprocessing.forkserver" in cmd):
            found.append(kid)
        found += descendants(kid)
    return found


def _report_environment(run, ctx):
    report = {"mark": os.environ.get("MOEMESH_TEST_MARK"), "cwd": os.getcwd(), "parent": os.getppid()}
    report["imported_before_the_fork"] = _IMPORTED_BY != os.getpid()
    Path(ctx.output_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report))
    return {}


# The process that imported this module: in a rank forked from a server that had imported it
# (with torch and the rank's code) before the fork, the server; in a spawned rank, the rank.
_IMPORTED_BY = os.getpid()


def _fail_on_rank_1(run, ctx):
    if ctx.rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # the other ranks wait here for a peer that will never come
    return {}


@pytest.mark.slow
def test_failing_rank_stops_every_rank(tmp_path, capsys):
    run = tiny_run(**{"parallel.data_parallel_size": 4, "cluster.collective_timeout_s": 600})
    # Children an earlier test in this process left on purpose (wandb's service lives as long as
    # the process that started it) are not this job's.
    before = set(_processes_of_this_test())
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        run_ranks(run, ParallelDims(dp=4), None, str(tmp_path), None, _fail_on_rank_1)
    assert exc.value.code == 1
    assert time.monotonic() - start < 60  # far below the collective timeout: no hang
    assert "rank 1 failed: RuntimeError: boom on rank 1" in capsys.readouterr().err
    assert set(_processes_of_this_test()) - before == set()


@pytest.mark.slow
def test_abandoned_rendezvous_dirs_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from moemesh.launch.spawn import remove_abandoned_rendezvous

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    old = time.time() - 3600

    def rdzv(name, owner, idle=True):
        d = tmp_path / f"moemesh-rdzv-{name}"
        d.mkdir()
        (d / "beat0").write_text("1 1\n")
        if owner is not None:
            (d / "owner").write_text(f"{owner}\n")
        if idle:
            for f in [*d.iterdir(), d]:
                os.utime(f, (old, old))
        return d

    abandoned = rdzv("abandoned", gone.pid)
    live_owner = rdzv("live", os.getpid())
    still_beating = rdzv("beating", gone.pid, idle=False)  # its ranks outlived the launcher
    no_owner = rdzv("starting", None)  # just created, owner not written yet
    assert remove_abandoned_rendezvous(tmp_path) == [abandoned]
    assert not abandoned.exists() and live_owner.exists() and still_beating.exists() and no_owner.exists()


def test_hang_watch_names_the_rank_that_stopped_beating(tmp_path):
    from moemesh.launch.heartbeat import HangWatch, Stalled

    watch = HangWatch(str(tmp_path), 3, timeout_s=0.5)
    beat = lambda r, n: (tmp_path / f"beat{r}").write_text(f"{100 + r} {n}\n")  # noqa: E731
    for n in range(1, 5):
        beat(0, n), beat(1, n), beat(2, n)
        watch.check([True] * 3)
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    with pytest.raises(Stalled) as hung:
        n = 5
        while time.monotonic() < deadline:  # ranks 0 and 2 wait in a collective, and keep beating
            beat(0, n), beat(2, n)
            n += 1
            watch.check([True] * 3)
            time.sleep(0.1)
    assert (hung.value.rank, hung.value.started) == (1, True) and hung.value.silent_s > 0.5
    # A rank that left (its exit code is ProcessContext.join's business) is not a hang.
    watch.check([True, False, True])


def test_hang_watch_a_rank_that_never_beats_and_a_watcher_that_was_stopped_itself(tmp_path):
    from moemesh.launch.heartbeat import HangWatch, Stalled

    watch = HangWatch(str(tmp_path), 2, timeout_s=0.5)
    watch.check([True, True])
    time.sleep(0.7)
    watch.check([True, True])  # nobody beats yet: still importing, nobody to blame
    (tmp_path / "beat0").write_text("100 1\n")
    watch.check([True, True])
    # Ctrl-Z stopped the launcher with its ranks: the silence it did not watch proves nothing.
    watch.polled -= 60
    watch.started -= 60
    watch.check([True, True])
    time.sleep(0.6)
    (tmp_path / "beat0").write_text("100 2\n")
    with pytest.raises(Stalled) as hung:
        watch.check([True, True])
    assert (hung.value.rank, hung.value.started) == (1, False)


def test_cluster_timeouts_and_output_access_are_checked():
    from moemesh.launch.checks import check_launcher, output_umask

    for key in ("cluster.hang_timeout_s", "cluster.rendezvous_timeout_s"):
        with pytest.raises(ConfigError, match=f"{key}=0: must be > 0 seconds"):
            check_launcher(tiny_run(**{key: 0}), None, ParallelDims())
    with pytest.raises(
        ConfigError,
        match=r"cluster.output_access='public' is not one of private, group, inherit \(private: 0700/0600; group: "
        r"group may read, 0750/0640; inherit: the shell's umask\)",
    ):
        output_umask(tiny_run(**{"cluster.output_access": "public"}))
    assert [output_umask(tiny_run(**{"cluster.output_access": a})) for a in ("private", "group", "inherit")] == [
        0o077,
        0o027,
        None,
    ]


@pytest.mark.slow
def test_ranks_fork_from_a_server_with_the_launchers_environment_and_leave_nothing(tmp_path, monkeypatch):
    """Bare train.py's ranks fork from multiprocessing's fork server (torch imported once, before
    the fork), yet each has the environment and directory of its launcher at the launch, even
    in a process that launches twice; and no process is left behind."""
    run = tiny_run(**{"parallel.data_parallel_size": 2})
    before = set(_processes_of_this_test())
    for mark in ("first", "second"):
        (tmp_path / mark).mkdir()
        monkeypatch.setenv("MOEMESH_TEST_MARK", mark)
        monkeypatch.chdir(tmp_path / mark)
        run_ranks(run, ParallelDims(dp=2), None, str(tmp_path / mark), None, _report_environment)
        for rank in (0, 1):
            report = json.loads((tmp_path / mark / f"rank{rank}.json").read_text())
            assert report["mark"] == mark and report["cwd"] == str(tmp_path / mark)
            assert report["parent"] != os.getpid()  # forked by the server, not by this process
            assert report["imported_before_the_fork"] is True
        assert set(_processes_of_this_test()) - before == set()


def test_hang_watch_blames_the_rank_silent_longest_when_several_are(tmp_path):
    """Two ranks silent past the timeout at one poll (the launcher was slow to look): the one
    that stopped first is named, not the later one it may have blocked."""
    from moemesh.launch.heartbeat import HangWatch, Stalled

    watch = HangWatch(str(tmp_path), 3, timeout_s=0.5)
    for r in range(3):
        (tmp_path / f"beat{r}").write_text(f"{100 + r} 1\n")
    watch.check([True] * 3)
    watch.changed[1] -= 2.0  # rank 1 last beat 2 s ago, rank 2 1 s ago
    watch.changed[2] -= 1.0
    (tmp_path / "beat0").write_text("100 2\n")
    with pytest.raises(Stalled) as hung:
        watch.check([True] * 3)
    assert hung.value.rank == 1 and hung.value.started and hung.value.silent_s >= 2.0


def test_hang_watch_forgets_the_silence_while_the_launcher_itself_was_stopped(tmp_path):
    """Ctrl-Z stops the launcher and its ranks together: every clock the watch holds is then
    stale by the time it was stopped; that silence names nobody."""
    from moemesh.launch.heartbeat import HangWatch

    watch = HangWatch(str(tmp_path), 2, timeout_s=0.5)
    for r in range(2):
        (tmp_path / f"beat{r}").write_text(f"{100 + r} 1\n")
    watch.check([True, True])
    # 60 s pass with this process stopped: nothing it recorded moved, the files did not change.
    watch.polled -= 60
    watch.started -= 60
    watch.first_beat -= 60
    watch.changed = [c - 60 for c in watch.changed]
    watch.check([True, True])  # no Stalled: the clocks start again


def test_a_rank_that_exits_non_zero_after_a_stop_signal_fails_the_launch(capsys):
    """Every rank left within the grace period, but one with a non-zero code (its save failed):
    the launcher must not report the stop as a clean save."""
    import signal

    from moemesh.launch.spawn import _graceful_stop

    class _Gone:
        def __init__(self, code):
            self.exitcode, self.pid = code, -1

        def is_alive(self):
            return False

        def join(self, timeout=None):
            pass

    class _Ctx:
        processes = [_Gone(0), _Gone(1)]

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as exc:
            _graceful_stop(_Ctx(), 1.0, signal.SIGTERM)
        assert exc.value.code == 1
        assert "moemesh: SIGTERM: ranks exited with codes [0, 1]" in capsys.readouterr().err
        _Ctx.processes = [_Gone(0), _Gone(0)]
        assert _graceful_stop(_Ctx(), 1.0, signal.SIGTERM) is None
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_rank_that_exits_as_the_stop_is_passed_on_is_a_clean_stop():
    """Ctrl-C reaches the ranks from the terminal as well as through the launcher: a rank alive
    when the launcher looked may have saved, exited and been reaped (by the fork server) before
    its signal is sent. That is the stop it was asked for, not a crash of the launcher."""
    import signal
    import subprocess
    import sys

    from moemesh.launch.spawn import _graceful_stop

    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()  # its pid is free now: os.kill finds no such process

    class _JustExited:
        pid, exitcode = reaped.pid, 0

        def __init__(self):
            self.looked = False

        def is_alive(self):  # alive when the launcher looks, gone when it signals
            alive, self.looked = not self.looked, True
            return alive

        def join(self, timeout=None):
            pass

    class _Ctx:
        processes = [_JustExited(), _JustExited()]

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert _graceful_stop(_Ctx(), 1.0, signal.SIGINT) is None
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_signal_received_twice_is_one_stop_request_named_once():
    import signal

    from moemesh.launch.signals import StopFlag

    flag = StopFlag()
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        flag.set(s, None)
    assert flag.names() == ["SIGINT", "SIGTERM"]


def test_a_lone_process_saves_on_its_first_ctrl_c_after_a_sigterm():
    """SIGTERM (a save is under way), then one Ctrl-C: still a save; only a second Ctrl-C stops it."""
    import signal

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    flag = install_stop_handlers(second_interrupt_exits=True)
    try:
        flag.received.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C after a SIGTERM stopped the process without a save")
        assert flag.names() == ["SIGTERM", "SIGINT"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        flag.received.clear()
        for s, h in previous.items():
            signal.signal(s, h)


def test_ranks_beat_often_enough_for_the_lost_host_window_at_any_timeout():
    """The lost-host check reads every beat twice LOST_WINDOW apart: a live rank must beat at
    least twice in that window, however long cluster.hang_timeout_s is."""
    from moemesh.launch.heartbeat import PeerWatch, beat_interval

    for timeout in (0.5, 10, 300, 3600):
        assert beat_interval(timeout) <= min(timeout / 10, PeerWatch.LOST_WINDOW / 2), timeout


def test_the_earliest_failed_rank_and_its_exception_type_are_the_root_cause(tmp_path):
    """train.py removes an untouched run directory when the ranks' failure was a refused
    checkpoint: that needs the exception type of the rank that failed first."""
    from types import SimpleNamespace

    from moemesh.launch.spawn import _root_cause

    (tmp_path / "rank3.err").write_text("20.0\t3\tRuntimeError: Connection closed by peer")
    (tmp_path / "rank1.err").write_text("10.0\t1\tCheckpointError: checkpoint of another run: refused")
    (tmp_path / "rank2.err").write_text("15.0\t2")  # cut short while it was written
    reason, kind = _root_cause(str(tmp_path), SimpleNamespace(error_index=3))
    assert (reason, kind) == (
        "rank 1 failed: CheckpointError: checkpoint of another run: refused (the other ranks were stopped)",
        "CheckpointError",
    )
