"""Which runs get pytest-xdist workers (tests/conftest.py): README's two test commands only (the
fast tier, and the full suite with its slow tests in one group, last), never a worker itself (a
worker's -n is unset too: without that guard every worker started two more)."""

import os
from types import SimpleNamespace

import pytest

from tests import conftest


class _PluginManager:
    def __init__(self, xdist: bool):
        self.xdist = xdist

    def hasplugin(self, name):
        return self.xdist and name == "xdist"


def _config(markexpr="not slow", numprocesses=None, xdist=True, collectonly=False, named=False):
    option = SimpleNamespace(markexpr=markexpr, numprocesses=numprocesses, collectonly=collectonly, usepdb=False)
    return SimpleNamespace(
        option=option,
        args_source=pytest.Config.ArgsSource.ARGS if named else pytest.Config.ArgsSource.TESTPATHS,
        pluginmanager=_PluginManager(xdist),
        getoption=lambda name, default=None: getattr(option, name, default),
    )


def test_readmes_two_commands_get_a_worker_per_core_and_nothing_else_does(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("MOEMESH_TEST_WORKERS", raising=False)
    cores = min(2, len(os.sched_getaffinity(0)))
    assert conftest._workers(_config()) == cores
    assert conftest._workers(_config(markexpr="  not   slow ")) == cores
    assert conftest._workers(_config(named=True)) == cores  # -m "not slow" tests/moe
    assert conftest._workers(_config(markexpr="")) == cores  # the full suite
    assert conftest._workers(_config(markexpr="", named=True)) == 0  # pytest tests/launch: one process
    assert conftest._workers(_config(markexpr="slow")) == 0
    assert conftest._workers(_config(numprocesses=0)) == 0  # -n 0
    assert conftest._workers(_config(xdist=False)) == 0  # -p no:xdist, or not installed
    assert conftest._workers(_config(collectonly=True)) == 0
    worker = _config()
    worker.workerinput = {}
    assert conftest._workers(worker) == 0  # a worker never starts workers of its own
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert conftest._workers(_config()) == 0
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    monkeypatch.setenv("MOEMESH_TEST_WORKERS", "3")
    assert conftest._workers(_config()) == 3


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("markexpr", ["not slow", ""])
def test_the_hook_sets_n_only_when_it_gives_workers(monkeypatch, workers, markexpr):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(conftest, "_workers", lambda config, mode=None: workers)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")  # a user's own setting is kept (and this test's env restored)
    config = _config(markexpr=markexpr)
    conftest.pytest_cmdline_main(config)
    assert config.option.numprocesses == (workers or None)
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "7"
    full = bool(workers) and not markexpr
    assert getattr(config.option, "dist", None) == ("loadgroup" if full else None)
    assert getattr(config, "moemesh_solo", False) == full


class _Item:
    def __init__(self, name, *marks):
        self.name, self.marks = name, list(marks)

    def get_closest_marker(self, name):
        return next((m for m in self.marks if m.name == name), None)

    def add_marker(self, mark):
        self.marks.append(mark.mark)


def test_a_full_suite_worker_runs_the_solo_group_last_and_the_shared_slow_tests_first():
    slow, shared = pytest.mark.slow.mark, pytest.mark.shares_cores.mark
    items = [_Item("fast1"), _Item("multirank", slow), _Item("cli", slow, shared), _Item("fast2"), _Item("slurm", slow)]
    worker = SimpleNamespace(workerinput={"moemesh_solo": True}, option=SimpleNamespace(loadgroup=False))
    conftest.pytest_collection_modifyitems(worker, items)
    assert [i.name for i in items] == ["cli", "fast1", "fast2", "multirank", "slurm"]
    assert worker.option.loadgroup  # xdist's own hook, after this one, names the group in the node ids
    grouped = [i.name for i in items if (m := i.get_closest_marker("xdist_group")) and m.args == (conftest.SOLO,)]
    assert grouped == ["multirank", "slurm"]
    # The fast tier's workers, and a run in one process, keep pytest's order.
    for config in (SimpleNamespace(workerinput={}), SimpleNamespace()):
        before = [_Item("a"), _Item("b", slow)]
        conftest.pytest_collection_modifyitems(config, before)
        assert [i.name for i in before] == ["a", "b"] and not before[1].get_closest_marker("xdist_group")
