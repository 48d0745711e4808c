"""Which runs get pytest-xdist workers (tests/conftest.py): the fast tier only, never a worker
itself (a worker's -n is unset too: without that guard every worker started two more)."""

import os
from types import SimpleNamespace

import pytest

from tests import conftest


class _PluginManager:
    def __init__(self, xdist: bool):
        self.xdist = xdist

    def hasplugin(self, name):
        return self.xdist and name == "xdist"


def _config(markexpr="not slow", numprocesses=None, xdist=True, collectonly=False):
    option = SimpleNamespace(markexpr=markexpr, numprocesses=numprocesses, collectonly=collectonly, usepdb=False)
    return SimpleNamespace(
        option=option,
        pluginmanager=_PluginManager(xdist),
        getoption=lambda name, default=None: getattr(option, name, default),
    )


def test_the_fast_tier_gets_a_worker_per_core_and_nothing_else_does(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("MOEMESH_TEST_WORKERS", raising=False)
    cores = min(2, len(os.sched_getaffinity(0)))
    assert conftest._fast_tier_workers(_config()) == cores
    assert conftest._fast_tier_workers(_config(markexpr="  not   slow ")) == cores
    assert conftest._fast_tier_workers(_config(markexpr="")) == 0  # the full suite: one process
    assert conftest._fast_tier_workers(_config(markexpr="slow")) == 0
    assert conftest._fast_tier_workers(_config(numprocesses=0)) == 0  # -n 0
    assert conftest._fast_tier_workers(_config(xdist=False)) == 0  # -p no:xdist, or not installed
    assert conftest._fast_tier_workers(_config(collectonly=True)) == 0
    worker = _config()
    worker.workerinput = {}
    assert conftest._fast_tier_workers(worker) == 0  # a worker never starts workers of its own
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert conftest._fast_tier_workers(_config()) == 0
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    monkeypatch.setenv("MOEMESH_TEST_WORKERS", "3")
    assert conftest._fast_tier_workers(_config()) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_the_hook_sets_n_only_when_it_gives_workers(monkeypatch, workers):
    monkeypatch.setattr(conftest, "_fast_tier_workers", lambda config: workers)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")  # a user's own setting is kept (and this test's env restored)
    config = _config()
    conftest.pytest_cmdline_main(config)
    assert config.option.numprocesses == (workers or None)
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "7"
