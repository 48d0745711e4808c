"""The job's store listens on one address, never on all; a lost host is named from every rank's
beats; a lost node requeues the SLURM job; cluster.interface is checked and reaches sbatch."""

import datetime
import gc
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from moemesh.errors import ConfigError
from moemesh.launch import store
from moemesh.launch.checks import check_interface
from moemesh.launch.env import LauncherEnv
from moemesh.launch.heartbeat import PeerWatch, lost_hosts
from moemesh.launch.slurm import allocation_for, requeue_job
from tests.helpers import tiny_run


def _listening(port: int) -> list[str]:
    """The local addresses of this machine's listening TCP sockets on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            address, hexport = f[1].split(":")
            if f[3] == "0A" and int(hexport, 16) == port:
                out.append(address)
    return out


def test_the_store_listens_on_its_address_only():
    """torch's TCPStore server listens on [::] for any host name; the job's store on 127.0.0.1."""
    s = store.job_store("127.0.0.1", 0, 1, is_master=True, timeout_s=10, spans_nodes=False)
    assert _listening(s.port) == ["0100007F"]  # 127.0.0.1, little-endian hex; nothing on [::] or 0.0.0.0
    client = store.job_store("127.0.0.1", s.port, 1, is_master=False, timeout_s=10, spans_nodes=False)
    client.set("k", "v")
    assert s.get("k") == b"v"


def test_addresses_the_other_nodes_cannot_reach_are_refused():
    with pytest.raises(ConfigError, match=r"MASTER_ADDR=n1 resolves to 127.0.1.1 on rank 0's node, but the job spans"):
        store.check_store_address("n1", "127.0.1.1", spans_nodes=True, interface=None)
    store.check_store_address("localhost", "127.0.0.1", spans_nodes=False, interface=None)  # one node: fine
    with pytest.raises(ConfigError, match=r"MASTER_ADDR=0.0.0.0: the store would listen on every address"):
        store.check_store_address("0.0.0.0", "0.0.0.0", spans_nodes=False, interface=None)
    with pytest.raises(ConfigError, match=r"not an address of cluster.interface=lo \(127.0.0.1"):
        store.check_store_address("n1", "10.0.0.1", spans_nodes=True, interface="lo")
    store.check_store_address("localhost", "127.0.0.1", spans_nodes=False, interface="lo")


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=rf"rank 0 cannot listen on 127.0.0.1 port {port}: Address already in use"
        ):
            store.listen_on("127.0.0.1", port, spans_nodes=False)


def test_interface_addresses_and_the_cli(capsys):
    assert "127.0.0.1" in store.interface_addresses("lo")
    assert store.interface_addresses("no-such-if0") == []
    assert store.main(["address", "lo"]) == 0 and capsys.readouterr().out.strip() == "127.0.0.1"
    assert store.main(["address", "no-such-if0"]) == 2
    assert "cluster.interface=no-such-if0: no IPv4 address" in capsys.readouterr().err
    assert store.main(["serve", "nonsense"]) == 2


HOSTS = {0: "n1, pid 10", 1: "n1, pid 11", 2: "n2, pid 20", 3: "n2, pid 21"}


@pytest.mark.parametrize(
    "stopped, done, me, expected",
    [
        ({2, 3}, set(), "n1", {"n2": [2, 3]}),  # n2 gone
        ({2}, set(), "n1", {}),  # one rank stopped (SIGSTOP, a debugger): not a host
        ({2, 3}, {3}, "n1", {}),  # rank 3 finished: n2 is leaving, not lost
        ({0, 1, 2, 3}, set(), "n1", {"n2": [2, 3]}),  # this host's own ranks never make it lost
        ({0, 1}, set(), "n2", {"n1": [0, 1]}),
    ],
)
def test_a_host_is_lost_when_all_its_ranks_stopped_and_none_finished(stopped, done, me, expected):
    assert lost_hosts(HOSTS, stopped, done, me) == expected


def _fake_scontrol(tmp_path, monkeypatch, body: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_lost_node_requeues_the_batch_job(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    _fake_scontrol(tmp_path, monkeypatch, f'echo "$@" >> {calls}')
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"}
    assert requeue_job(env) == "; SLURM job 42 requeued: it resumes from its last checkpoint"
    assert calls.read_text() == "requeue 42\n"
    assert requeue_job({}) == "" and requeue_job({"SLURM_JOB_ID": "42"}) == ""  # not a task of a job step
    _fake_scontrol(
        tmp_path, monkeypatch, 'echo "scontrol: error: Requested operation is presently disabled" >&2; exit 1'
    )
    assert (
        requeue_job(env)
        == "; SLURM job 42 was not requeued (scontrol: error: Requested operation is presently disabled)"
    )


def test_cluster_interface_is_checked_on_each_node_and_sets_master_addr_under_slurm(monkeypatch):
    env = LauncherEnv(kind="srun", rank=0, world_size=4, local_rank=0, local_world_size=2)
    run = tiny_run(**{"cluster.interface": "no-such-if0"})
    with pytest.raises(
        ConfigError, match=r"cluster.interface=no-such-if0: no such network interface on .*; valid here: .*lo"
    ):
        check_interface(run, env, {})
    check_interface(run, None, {})  # spawned ranks talk over loopback: not checked
    run = tiny_run(**{"cluster.interface": "lo"})
    check_interface(run, env, {"GLOO_SOCKET_IFNAME": "lo"})
    with pytest.raises(ConfigError, match=r"cluster.interface=lo but NCCL_SOCKET_IFNAME=ib0 is set"):
        check_interface(run, env, {"NCCL_SOCKET_IFNAME": "ib0"})
    slurm = tiny_run(**{"cluster.name": "slurm", "cluster.launcher": "slurm", "cluster.interface": "ib0"})
    setup = allocation_for(slurm, 16).executor_parameters(name="t", python="/venv/bin/python")["slurm_setup"]
    assert setup[:2] == [
        "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT",
        "MASTER_ADDR=$(/venv/bin/python -m moemesh.launch.store address ib0) || exit 2; export MASTER_ADDR",
    ]
    assert not any(
        "MASTER_ADDR=$" in l for l in allocation_for(tiny_run(), 16).executor_parameters(name="t")["slurm_setup"]
    )


def _n1_watches(server) -> list[PeerWatch]:
    """The watches of ranks 0 and 1, on host n1 of a 4-rank job on n1 and n2, as they are once
    every rank's host is in the store (built without their threads)."""
    import torch.distributed as dist

    watches = []
    for rank in (0, 1):
        w = object.__new__(PeerWatch)
        w.rank, w.world_size, w.timeout, w.host, w.hosts = rank, 4, 10, "n1", {}
        w.LOST_WINDOW = 0.3
        w.keys = {k: f"t/{k}/" for k in ("beat", "done", "host", "lost", "ended")}
        w.counted, w.count_lock = False, threading.Lock()
        w.store = dist.TCPStore(
            "127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=10), wait_for_workers=False
        )
        watches.append(w)
    for r, host in enumerate(["n1", "n1", "n2", "n2"]):
        server.set(f"t/host/{r}", f"{host}, pid {100 + r}")
    return watches


def test_a_survivor_blocked_on_the_rank_that_spoke_counts_in_from_its_watch(capsys, monkeypatch):
    """Host n2 is lost. Rank 1 sees it (a collective with rank 3 failed), says so and waits for
    every survivor to count in. Rank 0 waits in a collective for rank 1 and sees nothing: its
    watch thread counts it in once rank 1 has announced the loss, so neither waits for the other
    until the deadline (LOST_WINDOW + 10 s), and rank 0 says nothing more."""
    import torch.distributed as dist

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    watches = _n1_watches(server)
    assert not watches[0].end_if_announced()  # nothing announced yet
    result: dict[str, float] = {}

    def rank1() -> None:
        t0 = time.monotonic()
        assert watches[1].node_lost("rank 1's error")
        result["rank 1 left after"] = time.monotonic() - t0

    t = threading.Thread(target=rank1)
    t.start()
    deadline = time.monotonic() + 20
    while not watches[0].end_if_announced():  # rank 0's watch thread, one tick after another
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t.join(30)
    assert result["rank 1 left after"] < watches[1].LOST_WINDOW + 3, result  # not the 10 s more of the deadline
    assert int(server.add("t/lost/", 0)) == 2  # each survivor counted once
    assert not watches[1].end_if_announced()  # the speaker's own watch thread: counted already, stays
    assert int(server.add("t/lost/", 0)) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("moemesh:")]
    assert len(lines) == 1 and lines[0].startswith("moemesh: host n2 lost: its ranks 2, 3 stopped (rank 1's error")


def test_the_rank_hosting_the_store_waits_for_the_other_survivors(capsys, monkeypatch):
    """Host n2 (ranks 2, 3) is lost; ranks 0 and 1 on n1 both see it. Rank 0 hosts the store and
    exits once it has reported: it must not take the store away while rank 1 is still reading
    the beats, or rank 1 finds no store and prints its own error as a second line."""
    import torch.distributed as dist

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # in rank 0's process
    watches = _n1_watches(server)
    result: dict[int, bool] = {}

    def rank1() -> None:
        time.sleep(0.2)  # rank 1 sees the loss a little later
        result[1] = watches[1].node_lost("rank 1's error")

    t = threading.Thread(target=rank1)
    t.start()
    result[0] = watches[0].node_lost("rank 0's error")
    del server  # rank 0 exits at once, and the store with it
    gc.collect()
    t.join(30)
    assert result == {0: True, 1: True}
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("moemesh:")]
    assert len(lines) == 1 and lines[0].startswith("moemesh: host n2 lost: its ranks 2, 3 stopped (rank 0's error"), (
        lines
    )


def test_every_rank_caches_all_hosts_as_its_watch_starts(monkeypatch):
    """A host lost a second after the start, before any beat: a cut-off rank must still name the
    store's host and its ranks, so the watch caches every rank's host when it starts."""
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    environ = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master.port)}
    run = tiny_run(**{"cluster.hang_timeout_s": 30})
    watches: dict[int, PeerWatch] = {}

    def start(rank: int) -> None:
        watches[rank] = PeerWatch(run, rank, 2, environ)

    threads = [threading.Thread(target=start, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        me = socket.gethostname()
        for w in watches.values():
            assert sorted(w.hosts) == [0, 1] and all(h.startswith(f"{me}, pid ") for h in w.hosts.values())
    finally:
        for w in watches.values():
            w.stop.set()


def test_the_address_cli_prints_only_an_ipv4_address(monkeypatch, capsys):
    """The SLURM batch script exports what it prints as MASTER_ADDR: an interface with only an
    IPv6 address is refused, and an IPv4 one is printed though an IPv6 one comes first."""
    monkeypatch.setattr(store, "interface_addresses", lambda name: ["fd00::2"])
    assert store.main(["address", "ib0"]) == 2
    assert "cluster.interface=ib0: no IPv4 address" in capsys.readouterr().err
    monkeypatch.setattr(store, "interface_addresses", lambda name: ["fd00::2", "10.0.0.7"])
    assert store.main(["address", "ib0"]) == 0 and capsys.readouterr().out.strip() == "10.0.0.7"


def test_serve_takes_a_bracketed_ipv6_endpoint_apart(monkeypatch):
    seen = []

    def listen_on(host, port, **kw):
        seen.append((host, port))
        raise ConfigError("stop here")

    monkeypatch.setattr(store, "listen_on", listen_on)
    assert store.main(["serve", "[fd00::2]:29400"]) == 2
    assert store.main(["serve", "10.0.0.1:29401"]) == 2
    assert seen == [("fd00::2", 29400), ("10.0.0.1", 29401)]


def test_a_stalled_ranks_pid_on_this_host_is_killed_only_if_it_is_of_this_job():
    """The pid a rank wrote may belong, by now, to another job's rank on this host (the same
    RANK, another MASTER_PORT): that process is not this job's to kill."""
    import subprocess
    import sys

    other_job = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURM_STEP_ID")}
    other_job.update(RANK="1", MASTER_PORT="1", TORCHELASTIC_RUN_ID="another-job")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=other_job)
    try:
        w = object.__new__(PeerWatch)
        w.host = socket.gethostname()
        w._kill_if_local(1, f"{w.host}, pid {proc.pid}")
        time.sleep(0.2)
        assert proc.poll() is None  # still running
    finally:
        proc.kill()
        proc.wait()
