"""Hang detection: every rank beats; the one whose beats stop is named and the job stopped.

Every rank beats from a daemon thread, which keeps beating while the rank computes,
saves, evaluates or waits in a collective for a peer (the collective releases the GIL), and
stops only when the whole process stops running: SIGSTOP, a debugger, a native call that
holds the GIL. So the rank whose beats stop is the stalled one, never a peer it blocks.
Spawned ranks beat into files in the rendezvous directory (``beat_into_file``), which the
parent watches (``HangWatch``); under torchrun/srun/deepspeed each rank beats into the job's
store and watches the next rank's beats (``PeerWatch``). Silence for
``cluster.hang_timeout_s`` names the rank and stops the job.

A whole node lost (its processes killed, its link down) is told apart from one stopped rank:
the rank that notices (a silent peer, or a collective that failed) reads every rank's beats
twice, ``LOST_WINDOW`` apart; a host other than its own whose ranks all stopped, none of them
having finished, is lost. One line names the host and its ranks; under SLURM the job is then
requeued (``launch.slurm.requeue_job``) and resumes from its last checkpoint. Every surviving
rank counts itself in before any leaves (the store's host must outlive the others' reads); a
survivor that waits in a collective for the rank that spoke counts itself in from its watch
thread once the loss is announced in the store, so neither waits for the other.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch.distributed as dist

from moemesh.config.schema import RunConfig


def beat_interval(hang_timeout_s: float) -> float:
    return min(1.0, hang_timeout_s / 10)


def beat_into_file(path: Path, interval: float) -> threading.Event:
    """A spawned rank's heartbeat: rewrite ``path`` (pid and a count) every ``interval``
    seconds from a daemon thread, until the returned event is set or the process ends."""
    stop = threading.Event()

    def beat():
        count = 0
        while True:
            count += 1
            try:
                path.write_text(f"{os.getpid()} {count}\n")
            except OSError:  # the launcher removed the directory: it is going away
                return
            if stop.wait(interval):
                return

    threading.Thread(target=beat, name="moemesh-heartbeat", daemon=True).start()
    return stop


class Stalled(Exception):
    def __init__(self, rank: int, silent_s: float, started: bool):
        super().__init__(rank)
        self.rank, self.silent_s, self.started = rank, silent_s, started


class HangWatch:
    """The launcher's view of its spawned ranks' heartbeat files.

    A rank is stalled when its beats stop for hang_timeout_s while it is alive. A rank that
    has not beaten yet is still importing; it is stalled once it has been silent for a whole
    timeout while another rank was already beating (the ranks start the same code). If this
    process itself did not run for a while (Ctrl-Z stops the launcher and its ranks
    together), every clock starts again: silence the watcher did not watch proves nothing.
    """

    def __init__(self, rendezvous: str, world_size: int, timeout_s: float):
        self.files = [Path(rendezvous, f"beat{r}") for r in range(world_size)]
        self.timeout = timeout_s
        self.interval = beat_interval(timeout_s)
        self.started = self.polled = time.monotonic()
        self.content: list[str | None] = [None] * world_size
        self.changed: list[float | None] = [None] * world_size  # monotonic time of the last new beat
        self.first_beat: float | None = None

    def check(self, alive: list[bool]) -> None:
        now = time.monotonic()
        if now - self.polled > 5 * self.interval + 2:
            self.started = now
            self.changed = [None if c is None else now for c in self.changed]
            self.first_beat = None if self.first_beat is None else now
        self.polled = now
        for r, f in enumerate(self.files):
            try:
                text = f.read_text()
            except OSError:
                continue
            if text != self.content[r]:
                self.content[r], self.changed[r] = text, now
                self.first_beat = self.first_beat or now
        silent = {}
        for r, changed in enumerate(self.changed):
            if not alive[r]:
                continue  # exited: ProcessContext.join reports it
            if changed is not None:
                silent[r] = now - changed
            elif self.first_beat is not None and now - self.first_beat > self.timeout:
                silent[r] = now - self.started
        stalled = {r: t for r, t in silent.items() if t > self.timeout}
        if stalled:
            rank = max(stalled, key=lambda r: stalled[r])  # the one that stopped first
            raise Stalled(rank, stalled[rank], started=self.changed[rank] is not None)


def lost_hosts(hosts: dict[int, str], stopped: set[int], done: set[int], me: str) -> dict[str, list[int]]:
    """{host: its ranks} for every host other than ``me`` whose ranks all ``stopped`` beating
    without one of them being ``done``. ``hosts``: each rank's "hostname, pid N"."""
    by_host: dict[str, list[int]] = {}
    for rank, where in sorted(hosts.items()):
        by_host.setdefault(where.partition(", pid ")[0], []).append(rank)
    return {
        host: ranks
        for host, ranks in by_host.items()
        if host != me and all(r in stopped for r in ranks) and not any(r in done for r in ranks)
    }


def _ranks_text(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


class PeerWatch:
    """Under torchrun/srun/deepspeed: beat into the job's store and watch the next rank's
    beats (rank r watches r+1, so one rank reports a stalled one and the store sees O(world)
    small requests a second). A silent peer, or a store that stops answering (under srun and
    deepspeed rank 0 hosts it; torchrun's agent hosts it under torchrun), is reported in one
    line, a stopped process on this machine is killed (it cannot act on its launcher's
    SIGTERM), and this process exits 1: the launcher (torchrun; srun -K) stops the job.

    Two threads: one talks to the store; the other only reads the clock, because a call to a
    store whose host is stopped blocks for ever (measured: its timeout does not apply then).

    Where the silent ranks are a whole other host (``lost_hosts``), the line names the host and
    its ranks instead, and under SLURM the job is requeued (``node_lost``; a collective that
    failed asks the same question through ``after_failure``).
    """

    LOST_WINDOW = 2.5  # seconds between the two reads of every rank's beats (> 2 beat intervals)

    def __init__(self, run: RunConfig, rank: int, world_size: int, environ: Mapping[str, str] = os.environ):
        import socket

        self.timeout = run.cluster.hang_timeout_s
        self.interval = beat_interval(self.timeout)
        self.rank, self.peer, self.world_size = rank, (rank + 1) % world_size, world_size
        self.where = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
        # The rank whose process hosts the store: rank 0, unless torchrun's agent hosts it.
        agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE", "True") == "True"
        self.store_host = None if "TORCHELASTIC_RUN_ID" in environ and agent_store else 0
        prefix = f"moemesh/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # torchrun's store outlives a restart
        self.keys = {k: f"{prefix}/{k}/" for k in ("beat", "done", "host", "lost", "ended")}
        self.store = dist.TCPStore(
            environ["MASTER_ADDR"],
            int(environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout),
            wait_for_workers=False,
        )
        self.host = socket.gethostname()
        self.store.set(self.keys["host"] + str(rank), f"{self.host}, pid {os.getpid()}")
        self.hosts: dict[int, str] = {}
        try:  # every rank writes its host as it starts: cache them now, while the store surely answers
            self.store.wait(
                [self.keys["host"] + str(r) for r in range(world_size)], datetime.timedelta(seconds=self.timeout)
            )
            self._cache_hosts()
        except RuntimeError:  # a rank late or gone: the beats retry the cache, and judge that rank
            pass
        self.answered = time.monotonic()  # the last time the store answered a whole round
        self.counted = False  # counted among the survivors of a lost host (once: _count_in)
        self.count_lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._beat_and_watch, name="moemesh-peer-watch", daemon=True),
            threading.Thread(target=self._watch_store, name="moemesh-store-watch", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def finish(self, *, finished: bool) -> None:
        """This rank is leaving: its silence is not a hang. A rank that finished also waits
        (up to hang_timeout_s) until every rank has: under srun and deepspeed rank 0 hosts
        the store, and a peer still watching would see it vanish."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=2 * self.interval + 1)
        try:
            self.store.add(self.keys["done"] + str(self.rank), 1)
            if finished:
                self.store.wait(
                    [self.keys["done"] + str(r) for r in range(self.world_size)],
                    datetime.timedelta(seconds=self.timeout),
                )
        except RuntimeError:
            pass

    def _cache_hosts(self) -> None:
        """Every rank's "hostname, pid N", cached once all have written theirs (one check a
        beat until then): a lost host is named from the cache when the store is gone too."""
        keys = [self.keys["host"] + str(r) for r in range(self.world_size)]
        if len(self.hosts) < self.world_size and self.store.check(keys):
            for r, value in enumerate(self.store.multi_get(keys)):
                self.hosts[r] = value.decode(errors="replace")

    def _stopped(self) -> tuple[set[int], set[int]] | None:
        """(ranks whose beats did not move in LOST_WINDOW, ranks done), read from the store in a
        thread of its own; None if the store did not answer within LOST_WINDOW + 5 s."""
        found: list[tuple[set[int], set[int]]] = []
        ranks = range(self.world_size)

        def read() -> None:
            try:
                self._cache_hosts()
                before = [self.store.add(self.keys["beat"] + str(r), 0) for r in ranks]
                time.sleep(self.LOST_WINDOW)
                after = [self.store.add(self.keys["beat"] + str(r), 0) for r in ranks]
                done = {r for r in ranks if self.store.add(self.keys["done"] + str(r), 0)}
            except RuntimeError:
                return
            found.append(({r for r in ranks if before[r] == after[r] and r != self.rank}, done))

        reader = threading.Thread(target=read, name="moemesh-lost-host", daemon=True)
        reader.start()
        reader.join(self.LOST_WINDOW + 5)
        return found[0] if found else None

    def node_lost(self, why: str) -> bool:
        """If a whole other host has stopped: print one line naming it and its ranks (the
        first rank to see it does; under SLURM it also requeues the job), and return True. The
        caller then exits. ``why``: what this rank saw first."""
        if len(self.hosts) == self.world_size and all(
            w.partition(", pid ")[0] == self.host for w in self.hosts.values()
        ):
            return False  # one host: no other to lose
        seen = self._stopped()
        if seen is None or len(self.hosts) < self.world_size:
            return False
        lost = lost_hosts(self.hosts, *seen, self.host)
        if not lost:
            return False
        survivors = self.world_size - sum(len(r) for r in lost.values())
        if self._count_in():
            try:
                first = self.store.add(self.keys["lost"], 1) == 1
            except RuntimeError:
                first = True
            if first:
                from moemesh.launch.slurm import requeue_job

                hosts = "; ".join(f"host {h} lost: its {_ranks_text(r)} stopped" for h, r in lost.items())
                print(
                    f"moemesh: {hosts} ({why}; none beat in {self.LOST_WINDOW:g} s, cluster.hang_timeout_s="
                    f"{self.timeout}): the host died or its link is down; rank {self.rank} ({self.host}) stops the "
                    f"job{requeue_job()}",
                    file=sys.stderr,
                    flush=True,
                )
                try:  # said: the survivors that wait in a collective count themselves in (end_if_announced)
                    self.store.set(self.keys["ended"], str(survivors))
                except RuntimeError:
                    pass
        self._await_survivors(survivors)
        return True

    def _count_in(self) -> bool:
        """Claim this rank's one count among the survivors (False if it was claimed already: by
        node_lost on one thread, or end_if_announced on the watch thread)."""
        with self.count_lock:
            claimed, self.counted = not self.counted, True
        return claimed

    def end_if_announced(self) -> bool:
        """Another rank has named a lost host and stops the job (its one line is out). This rank
        may never learn it on its own: it can wait in a collective for that very rank, which
        waits for this one to count itself in (_await_survivors). So the watch thread counts it
        in, waits for the other survivors, and returns True: the caller exits 1, quietly."""
        try:
            if not self.store.check([self.keys["ended"]]):
                return False
            survivors = int(self.store.get(self.keys["ended"]))
            if not self._count_in():
                return False  # node_lost has counted this rank in, and exits it
            self.store.add(self.keys["lost"], 1)
        except (RuntimeError, ValueError):
            return False
        self._await_survivors(survivors)
        return True

    def _await_survivors(self, survivors: int) -> None:
        """Wait (at most LOST_WINDOW + 10 s) until every rank on a live host has counted itself
        in: the rank that hosts the store (rank 0 under srun) must not exit and take the store
        with it while another survivor is still reading the beats -- that one would find no
        store, no lost host, and print its own failure as a second line."""
        deadline = time.monotonic() + self.LOST_WINDOW + 10
        while time.monotonic() < deadline:
            try:
                if self.store.add(self.keys["lost"], 0) >= survivors:
                    return
            except RuntimeError:
                return
            time.sleep(0.1)

    def after_failure(self, err: BaseException) -> None:
        """This rank's training raised. If it is because a whole other host is gone (a
        collective's peer vanished), say so in one line and exit 1; else return (the caller
        re-raises)."""
        if not isinstance(err, (RuntimeError, OSError)):
            return
        # gloo's messages start with its source location: "[.../pair.cc:553] Connection closed by peer ..."
        # and go on with advice ("This is typically caused by ... GLHF!"): its first sentence is the fact.
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [""])[0])
        first = first.split(". ")[0][:160]
        if self.node_lost(f"{type(err).__name__}: {first}"):
            os._exit(1)

    def _host(self, rank: int) -> str:
        """'hostname, pid N' of a rank, as it wrote it at its start (cached: the store may stop)."""
        if rank not in self.hosts:
            key = self.keys["host"] + str(rank)
            try:
                if self.store.check([key]):
                    self.hosts[rank] = self.store.get(key).decode()
            except RuntimeError:
                pass
        return self.hosts.get(rank, "host unknown")

    def _stalled(self, rank: int, message: str, ask_store: bool = True) -> None:
        if ask_store and self.node_lost(f"rank {rank}: {message}"):
            os._exit(1)
        where = self.hosts.get(rank, "host unknown")
        self._kill_if_local(rank, where)
        print(
            f"moemesh: rank {rank} ({where}) stopped responding: {message} (cluster.hang_timeout_s={self.timeout}); "
            f"it was stopped (SIGSTOP, a debugger) or is frozen; rank {self.rank} stops the job",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def _kill_if_local(self, rank: int, where: str) -> None:
        """SIGKILL the stalled rank if it runs on this machine and /proc confirms it is that
        rank of this job (its initial environment names the rank and this job's ids)."""
        name, _, pid = where.partition(", pid ")
        if name != self.host or not pid.isdigit():
            return
        try:
            mine = set(Path("/proc/self/environ").read_bytes().split(b"\0"))
            theirs = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            return
        job = {
            v
            for v in mine
            if v.split(b"=", 1)[0] in (b"MASTER_PORT", b"TORCHELASTIC_RUN_ID", b"SLURM_JOB_ID", b"SLURM_STEP_ID")
        }
        ids = {f"RANK={rank}".encode(), f"SLURM_PROCID={rank}".encode()}
        if job and job <= theirs and ids & theirs:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass

    def _tick(self) -> tuple[bool, float, bool]:
        """Wait one interval: (stop requested, now, this process was itself stopped meanwhile,
        e.g. Ctrl-Z, so its clocks start again)."""
        t0 = time.monotonic()
        if self.stop.wait(self.interval):
            return True, t0, False
        now = time.monotonic()
        return False, now, now - t0 > 5 * self.interval + 2

    def _watch_store(self) -> None:
        while True:
            stopped, now, resumed = self._tick()
            if stopped:
                return
            if resumed:
                self.answered = now
            if now - self.answered > self.timeout and not self.stop.is_set():
                silent = f"the job's store at {self.where} did not answer for {now - self.answered:.0f} s"
                if self.store_host is not None and self._store_host_elsewhere():
                    self._store_host_lost(silent)
                if self.store_host is not None:
                    self._stalled(self.store_host, f"{silent} (rank {self.store_host} hosts it)", ask_store=False)
                print(
                    f"moemesh: {silent} (cluster.hang_timeout_s={self.timeout}); rank {self.rank} stops the job",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def _store_host_elsewhere(self) -> bool:
        where = self.hosts.get(self.store_host) if self.store_host is not None else None
        return where is not None and len(self.hosts) == self.world_size and where.partition(", pid ")[0] != self.host

    def _store_host_lost(self, silent: str) -> None:
        """The store's host (rank 0's) stopped answering and it is another host: name it and its
        ranks (from the cache: the store cannot be asked), try to requeue under SLURM, exit 1.
        From here a dead store host and this host cut off look the same, so the line says both."""
        from moemesh.launch.slurm import requeue_job

        host = self.hosts[self.store_host].partition(", pid ")[0]  # type: ignore[index]
        ranks = [r for r, w in sorted(self.hosts.items()) if w.partition(", pid ")[0] == host]
        print(
            f"moemesh: rank {self.rank} ({self.host}) lost the job's store: {silent} (cluster.hang_timeout_s="
            f"{self.timeout}); it is rank {self.store_host}'s, on host {host} ({_ranks_text(ranks)}): {host} died or "
            f"the link between {host} and {self.host} is down; rank {self.rank} stops the job{requeue_job()}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def _beat_and_watch(self) -> None:
        beat, peer_beat = self.keys["beat"] + str(self.rank), self.keys["beat"] + str(self.peer)
        peer_done = self.keys["done"] + str(self.peer)
        seen, changed, watching = None, time.monotonic(), True
        while True:
            stopped, now, resumed = self._tick()
            if stopped:
                return
            if resumed:
                changed = now
            if self.end_if_announced():
                os._exit(1)
            try:
                self.store.add(beat, 1)  # beats on after the peer is done: rank - 1 watches this one
                value = self.store.add(peer_beat, 0) if watching else None
                watching = watching and not self.store.check([peer_done])
                for r in {r for r in (self.peer, self.store_host) if r is not None}:
                    self._host(r)
                self._cache_hosts()
            except RuntimeError:  # refused: the store's host left; _watch_store judges
                continue
            self.answered = time.monotonic()
            if not watching or value != seen:
                seen, changed = value, now
            elif now - changed > self.timeout and not self.stop.is_set():
                self._stalled(self.peer, f"no heartbeat for {now - changed:.0f} s")
