"""trainer/host.py:machine(): the run's hosts, rank by rank, gathered once per run. On gloo
build_mesh has gathered them at start (parallel/comm.py), and machine() reuses that list;
otherwise (NCCL) it gathers them itself."""

import pytest
import torch

from moemesh.parallel import comm
from moemesh.trainer import host


@pytest.fixture
def three_ranks(monkeypatch):
    monkeypatch.setattr(host, "group_size", lambda group: 3)
    yield
    comm.set_rank_hosts(None)


def test_hosts_build_mesh_gathered_are_not_gathered_again(monkeypatch, three_ranks):
    comm.set_rank_hosts(["n1", "n1", "n2"])

    def no_gather(*a, **k):
        raise AssertionError("host names gathered a second time")

    monkeypatch.setattr(torch.distributed, "all_gather_object", no_gather)
    m = host.machine(torch.device("cpu"), world_group=object())
    assert m["rank_hosts"] == ["n1", "n1", "n2"] and m["hosts"] == ["n1", "n2"]


def test_without_them_machine_gathers_its_own(monkeypatch, three_ranks):
    comm.set_rank_hosts(None)
    calls = []

    def gather(out, obj, group=None):
        calls.append(group)
        out[:] = ["a", "b", "b"]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    m = host.machine(torch.device("cpu"), world_group="world")
    assert calls == ["world"] and m["rank_hosts"] == ["a", "b", "b"] and m["hosts"] == ["a", "b"]


def test_hosts_are_listed_in_rank_order(monkeypatch, three_ranks):
    comm.set_rank_hosts(["n2", "n2", "n1"])
    m = host.machine(torch.device("cpu"), world_group=object())
    assert m["hosts"] == ["n2", "n1"]


def test_hosts_of_another_world_are_gathered_again(monkeypatch, three_ranks):
    comm.set_rank_hosts(["x", "y"])  # two ranks' names: not this three-rank world's
    monkeypatch.setattr(
        torch.distributed,
        "all_gather_object",
        lambda out, obj, group=None: out.__setitem__(slice(None), ["a", "b", "c"]),
    )
    assert host.machine(torch.device("cpu"), world_group="world")["rank_hosts"] == ["a", "b", "c"]


class _ProcFiles:
    """/proc/self files as ``open`` in trainer/host.py sees them: the given texts, and what is written."""

    def __init__(self, texts):
        self.texts, self.written = texts, {}

    def __call__(self, path, mode="r"):
        import io

        if "w" in mode:
            out = self.written[path] = io.StringIO()
            out.close = lambda: None
            return out
        return io.StringIO(self.texts[path])


def test_cpu_memory_and_model_are_read_from_proc(monkeypatch):
    """On the CPU the rank holds its resident pages (statm's second field, not the first: the
    virtual size), and its peak is VmHWM (not VmRSS, what it holds now) in KiB; the CPU's name is
    /proc/cpuinfo's model name."""
    proc = _ProcFiles(
        {
            "/proc/self/statm": "9000 250 40 1 0 300 0\n",
            "/proc/self/status": "Name:\tpython\nVmPeak:\t 99999 kB\nVmHWM:\t    3000 kB\nVmRSS:\t    1000 kB\n",
            "/proc/cpuinfo": "processor\t: 0\nmodel name\t: Example CPU 9000 @ 3.00GHz\n\nprocessor\t: 1\n",
        }
    )
    monkeypatch.setattr(host, "open", proc, raising=False)
    cpu = torch.device("cpu")
    assert host.resident_bytes(cpu) == 250 * host.os.sysconf("SC_PAGE_SIZE")
    assert host.peak_memory_bytes(cpu) == 3000 * 1024
    host.reset_peak(cpu)
    assert proc.written["/proc/self/clear_refs"].getvalue() == "5"  # 5 resets VmHWM; 4 clears soft-dirty bits
    assert host.cpu_model() == "Example CPU 9000 @ 3.00GHz"  # its model name, not platform's "x86_64"
