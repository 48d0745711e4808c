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
