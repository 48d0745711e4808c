"""Two hosts on this machine: SLURM and torchrun across them, a lost host survived, what listens where.

The cluster is `.ci/multinode/up.sh`'s: hosts n1 and n2, each its own network namespace (address,
/etc/hosts) and hostname, joined by a bridge; slurmctld on n1, one slurmd per host. `.ci/run`
starts it and sets MOEMESH_REQUIRE_MULTINODE=1; without it this module starts one itself where it
can (root, `ip`) and stops it afterwards, or skips saying why (a failure under
MOEMESH_REQUIRE_MULTINODE=1). Every run is ep2_dp2 with two ranks on each host, and every one
must reproduce, loss for loss, the same layout spawned on one host.
"""

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import SMALL

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci" / "multinode"
BASE = Path(os.environ.get("MULTINODE_BASE", "/tmp/moemesh-multinode"))
STEPS = 60  # the faults come < 0.5 s after step 10's checkpoint is seen, 50 steps (>= 3 s here) before the end
HANG_S = 10
MARGIN_S = 20  # after the loss is seen: reading every rank's beats (2.5 s), the requeue, SLURM's KillWait (5 s)
RUN = [
    "parallel=ep2_dp2",
    *SMALL,
    f"trainer.steps={STEPS}",
    "trainer.threads_per_rank=1",
    "logger.console=false",
    "checkpoint.every=10",
    f"cluster.hang_timeout_s={HANG_S}",
]


def _unavailable(reason: str):
    if os.environ.get("MOEMESH_REQUIRE_MULTINODE") == "1":
        pytest.fail(f"MOEMESH_REQUIRE_MULTINODE=1 but {reason}")
    pytest.skip(reason)


@dataclass
class Cluster:
    hosts: list[str]
    addrs: dict[str, str]  # host -> its address on the cluster interface
    iface: str
    netns: dict[str, str]
    links: dict[str, str]  # host -> its link's end on this machine (ip link set ... down)
    slurm_conf: str

    def on(self, host: str, *cmd: str) -> list[str]:
        return ["bash", str(CI / "on.sh"), host, *cmd]

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns[host]], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def run_pids(self, host: str) -> list[int]:
        """The processes of a run on the host: ranks, torchrun, submitit tasks (not SLURM's daemons)."""
        return [p for p in self.pids(host) if re.search(rb"train\.py|submitit|torchrun", _cmdline(p))]

    def env(self) -> dict[str, str]:
        drop = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "GLOO_"))}
        return {**env, "SLURM_CONF": self.slurm_conf}


def _read_env(path: Path) -> dict[str, str]:
    """up.sh's description of the cluster (KEY=value lines)."""
    pairs = (line.partition("=") for line in path.read_text().splitlines())
    return {k: v.strip('"') for k, eq, v in pairs if eq}


def _cluster_from(env: dict[str, str]) -> Cluster:
    hosts = env["MULTINODE_HOSTS"].split()
    pairs = lambda key: dict(zip(hosts, env[key].split()))  # noqa: E731
    return Cluster(
        hosts,
        pairs("MULTINODE_ADDRS"),
        env["MULTINODE_IFACE"],
        pairs("MULTINODE_NETNS"),
        pairs("MULTINODE_LINKS"),
        env["MULTINODE_SLURM_CONF"],
    )


def _idle(c: Cluster) -> bool:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t %D"], env=c.env(), capture_output=True, text=True, timeout=20
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out == ["idle", "2"]


@pytest.fixture(scope="module")
def cluster():
    """The running cluster (.ci/run's), or one started here and stopped after this module."""
    started = False
    env_file = BASE / "env"
    if env_file.is_file() and Path("/run/netns/mmn-n1").exists():  # up: wait for its hosts to be idle
        running = _cluster_from(_read_env(env_file))
        deadline = time.monotonic() + 120
        while not _idle(running):
            if time.monotonic() > deadline:
                _unavailable(f"the cluster of {env_file} is up but its two hosts are not idle (sinfo)")
            time.sleep(1)
    else:
        if os.geteuid() != 0:
            _unavailable("network namespaces need root (ip netns add); .ci/run runs as root and starts the cluster")
        for tool in ("ip", "tc", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                _unavailable(f"no `{tool}` here: .ci/multinode/up.sh needs iproute2 and util-linux")
        up = subprocess.run(["bash", str(CI / "up.sh")], capture_output=True, text=True, timeout=900)
        if up.returncode != 0:
            _unavailable(f".ci/multinode/up.sh failed: {(up.stdout + up.stderr).strip().splitlines()[-1:]}")
        started = True
    c = _cluster_from(_read_env(env_file))
    yield c
    if started:
        subprocess.run(["bash", str(CI / "down.sh")], capture_output=True, timeout=300)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _listeners(c: Cluster, host: str) -> list[tuple[str, int, bytes]]:
    """(address, port, owner's command line) of every listening TCP socket in the host's namespace,
    read from /proc/<pid>/net/tcp{,6} of a process there (its namespace's tables)."""
    pids = c.pids(host)
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m:
                    owner[m.group(1)] = pid
        except OSError:
            continue
    out = []
    for pid in pids:
        try:
            tables = [Path(f"/proc/{pid}/net/{t}").read_text().splitlines()[1:] for t in ("tcp", "tcp6")]
        except OSError:
            continue
        for line in (l for table in tables for l in table):
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr, port = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per 32-bit word, little-endian
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out.append((str(addr), int(port, 16), _cmdline(owner.get(f[9], 0))))
        break
    return out


class ListenerWatch:
    """Samples what the run's processes listen on, on every host, while a run goes on."""

    def __init__(self, c: Cluster):
        self.c, self.seen, self.stop = c, set(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.wait(0.3):
            for host in self.c.hosts:
                for addr, port, cmd in _listeners(self.c, host):
                    if b"moemesh.launch.store" in cmd:
                        self.seen.add((host, addr, port, "moemesh store"))
                    elif re.search(rb"bin/torchrun ", cmd):
                        self.seen.add((host, addr, port, "torchrun agent"))
                    elif re.search(rb"train\.py|submitit", cmd):
                        self.seen.add((host, addr, port, "rank"))

    def done(self) -> set:
        self.stop.set()
        self.thread.join()
        return self.seen


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same layout spawned on one host (this machine's namespace): the losses every
    multi-host run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *RUN],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(out)
    assert len(losses) == STEPS
    return losses


def _wait(what: str, check, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _squeue_state(c: Cluster, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], env=c.env(), capture_output=True, text=True)
    return out.stdout.strip()


def _assert_bound(c: Cluster, seen: set, allowed_wildcard=()):
    """Every listener of the run is on its host's cluster address; none on 0.0.0.0 or ::."""
    assert {h for h, *_ in seen} == set(c.hosts), seen  # the ranks of both hosts listened (gloo)
    for host, addr, port, kind in seen:
        if (kind, port) in allowed_wildcard:
            assert addr in ("0.0.0.0", "::"), (host, addr, port, kind)
        elif kind == "torchrun agent" and ipaddress.ip_address(addr).is_loopback:
            pass  # torchrun's get_free_port: a socket bound to localhost for an instant, closed at once
        else:
            assert addr == c.addrs[host], f"{kind} on {host} listens on {addr}:{port}, not on {c.addrs[host]}"


def _slurm_fault(c: Cluster, reference, tmp_path, fault: str):
    """A 4-rank SLURM job on both hosts: after its checkpoint of step 10, host n2 is lost (every
    process killed, or its link down). The job must stop within hang_timeout_s + MARGIN_S with one
    line naming n2 and its ranks, leave nothing on n1, be requeued, and resume from the last
    checkpoint to the reference's losses once n2 is back."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "cluster=slurm",
        "cluster.gpus_per_node=2",  # 4 ranks = 2 nodes x 2 tasks
        "cluster.slurm.request_gpus=false",
        "cluster.slurm.time_min=10",
        f"cluster.interface={c.iface}",
        f"hydra.sweep.dir={sweep}",
        *RUN,
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=c.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir, job = sweep / "0_ep2_dp2", None
    watch = ListenerWatch(c)
    try:
        _wait("the checkpoint of step 10", lambda: (run_dir / "checkpoints/step_000010/meta.json").exists(), 240)
        job = next(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
        task = f"{sys.executable} -u -m submitit.core._submit".encode()  # one per rank (srun's own are not)
        ranks_on = {h: len([p for p in c.run_pids(h) if _cmdline(p).startswith(task)]) for h in c.hosts}
        assert ranks_on == {"n1": 2, "n2": 2}, ranks_on  # two ranks on each host
        t0 = time.monotonic()
        if fault == "kill":
            _kill(c.pids("n2"))  # the host dies: slurmd, slurmstepd, its ranks
        else:
            subprocess.run(["ip", "link", "set", c.links["n2"], "down"], check=True)
        _wait("the job's processes on n1 to end", lambda: not c.run_pids("n1"), HANG_S + MARGIN_S + 30)
        lost_s = time.monotonic() - t0
        print(f"\nmultinode: SLURM, host n2 {fault}: the job ended on n1 {lost_s:.1f} s after the loss")
        complete = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "meta.json").exists())
        last = int(complete[-1].split("_")[1])
        seen = watch.done()
        if fault == "link":
            assert lost_s > HANG_S  # noticed by silence
            subprocess.run(["ip", "link", "set", c.links["n2"], "up"], check=True)
        else:
            subprocess.run(c.on("n2", "slurmd"), env=c.env(), check=True, timeout=60)  # the host is back
        assert lost_s < HANG_S + MARGIN_S, lost_s
        _wait("the job to be requeued", lambda: _squeue_state(c, job) == "PD", 120, poll=0.5)
        _wait("n2 back in the partition", lambda: _idle(c), 120, poll=0.5)
        _wait("n2's cut-off ranks to end", lambda: not c.run_pids("n2"), 60, poll=0.5)
        time.sleep(2.5)  # slurmd refuses a launch credential from the second of the revocation
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=c.env(), check=True, timeout=30)
        out, err = proc.communicate(timeout=300)
    finally:
        watch.stop.set()
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", job or "0"], env=c.env(), timeout=30)
        if fault == "link":
            subprocess.run(["ip", "link", "set", c.links["n2"], "up"])
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in sorted((sweep / ".submitit" / job).glob("*_log.err")))
    lines = [l for l in logs.splitlines() if l.startswith("moemesh:")]
    # Cut off, n2's own ranks lose the store on n1; their words reach the logs once the link is
    # back, if they are still alive then (SLURM may end them first: a race, so 0 to 2 such lines).
    # Each names n1 and its ranks from the hosts it cached at its start (the fault comes a second
    # or two after the watch began, before its first beat: the cache must not wait for beats).
    cut_off = [l for l in lines if re.match(r"moemesh: rank [23] \(n2\) lost the job's store: ", l)]
    assert len(cut_off) <= (2 if fault == "link" else 0), lines
    assert all(
        "it is rank 0's, on host n1 (ranks 0, 1): n1 died or the link between n1 and n2 is down" in l for l in cut_off
    )
    # One line, from a rank on n1, names the lost host and its ranks and says the job was requeued.
    rest = [l for l in lines if l not in cut_off]
    assert len(rest) == 1, lines
    (line,) = rest
    assert line.startswith("moemesh: host n2 lost: its ranks 2, 3 stopped ("), line
    assert re.search(
        r"rank [01] \(n1\) stops the job; SLURM job \d+ requeued: it resumes from its last checkpoint$", line
    ), line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == last  # resumed from the last checkpoint written before the loss
    assert summary["machine"]["hosts"] == ["n1", "n2"]
    assert summary["machine"]["rank_hosts"] == ["n1", "n1", "n2", "n2"]
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(reference, rel=1e-6)  # as on one host
    _assert_bound(c, seen)  # the store (rank 0, n1) and every rank's gloo listeners
    return lost_s


def test_slurm_job_on_two_hosts_survives_a_killed_host(cluster, reference, tmp_path):
    _slurm_fault(cluster, reference, tmp_path, "kill")


def test_slurm_job_on_two_hosts_survives_a_host_whose_link_goes_down(cluster, reference, tmp_path):
    _slurm_fault(cluster, reference, tmp_path, "link")


def _with(base: list[str], extra) -> list[str]:
    """``base`` with ``extra``'s keys replaced, not given twice (train.py warns about a repeated key)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [*(b for b in base if b.split("=", 1)[0] not in keys), *extra]


def _torchrun(c: Cluster, host: str, node_rank: int, rendezvous: list[str], run_dir: Path, *extra, env=None):
    cmd = c.on(
        host,
        str(Path(sys.executable).with_name("torchrun")),
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--nproc_per_node=2",
        *rendezvous,
        str(ROOT / "train.py"),
        "cluster=torchrun",
        f"cluster.interface={c.iface}",
        f"hydra.run.dir={run_dir}",
        *_with(RUN, extra),
    )
    return subprocess.Popen(
        cmd,
        cwd=run_dir.parent,
        env={**c.env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_torchrun_in_the_seeds_form_on_two_hosts(cluster, reference, tmp_path):
    """torchrun --nnodes=2 --node_rank=0/1 --master_addr=<n1> from each host: the reference's
    losses; every rank listens on its host's address; torchrun's own store (its agent on n1,
    torch 2.13 has no option to bind it) is the one listener on every address."""
    c, run_dir, port = cluster, tmp_path / "run", 29511
    rdzv = [f"--master_addr={c.addrs['n1']}", f"--master_port={port}"]
    procs = [_torchrun(c, h, i, rdzv, run_dir) for i, h in enumerate(c.hosts)]
    watch = ListenerWatch(c)
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        seen = watch.done()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert _losses(run_dir) == pytest.approx(reference, rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["machine"]["rank_hosts"] == ["n1", "n1", "n2", "n2"]
    assert ("n1", "::", port, "torchrun agent") in seen or ("n1", "0.0.0.0", port, "torchrun agent") in seen, seen
    _assert_bound(c, seen, allowed_wildcard={("torchrun agent", port)})


def test_torchrun_with_a_bound_rendezvous_on_two_hosts_ends_when_a_host_is_killed(cluster, tmp_path):
    """The bound form: moemesh's rendezvous store on n1's address, torchrun's agents as its
    clients, rank 0 hosting the job's store: nothing listens on every address. Then host n2 is
    killed: the job ends on n1 at once, one line names n2 and its ranks, nothing is left on n1."""
    c, run_dir, port = cluster, tmp_path / "run", 29522
    store = subprocess.Popen(
        c.on("n1", sys.executable, "-m", "moemesh.launch.store", "serve", f"{c.addrs['n1']}:{port}"),
        cwd=ROOT,
        env={**c.env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs = []
    watch = ListenerWatch(c)
    try:
        assert "rendezvous store on" in store.stdout.readline()
        for i, h in enumerate(c.hosts):
            rdzv = [
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={c.addrs['n1']}:{port}",
                "--rdzv-conf=is_host=false",
                "--rdzv-id=bound",
                f"--local-addr={c.addrs[h]}",
            ]
            extra = [f"trainer.steps={STEPS * 50}"]
            procs.append(_torchrun(c, h, i, rdzv, run_dir, *extra, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
        _wait("step 5", lambda: (run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= 5, 240)
        time.sleep(1.0)  # a few more samples of the listeners
        seen = watch.done()
        t0 = time.monotonic()
        _kill(c.pids("n2"))
        out, err = procs[0].communicate(timeout=HANG_S + MARGIN_S + 30)
        lost_s = time.monotonic() - t0
        print(f"\nmultinode: torchrun, host n2 killed: the job ended on n1 {lost_s:.1f} s after the loss")
    finally:
        watch.stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
        store.send_signal(signal.SIGTERM)
        store.wait(timeout=30)
        subprocess.run(c.on("n2", "slurmd"), env=c.env(), timeout=60)  # n2 is back for the tests after this
    assert procs[0].returncode != 0
    # A kill is seen at once (a collective's peer is gone), not by silence: the ranks on n1 end
    # without waiting hang_timeout_s, either of them (one may wait in a collective for the other).
    assert lost_s < HANG_S, lost_s
    lines = [l for l in err.splitlines() if l.startswith("moemesh:")]
    assert len(lines) == 1 and lines[0].startswith("moemesh: host n2 lost: its ranks 2, 3 stopped ("), err[-3000:]
    _wait("nothing of the run left on n1", lambda: not c.run_pids("n1"), 10)
    _assert_bound(c, seen)
    assert ("n1", c.addrs["n1"], port, "moemesh store") in seen, seen
    _wait("n2 back in the partition", lambda: _idle(c), 120, poll=0.5)
