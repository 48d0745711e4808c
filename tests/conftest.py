import os

# Triton kernels run on this CPU only through the interpreter, which must be chosen
# before triton is imported. A GPU run sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# README's two test commands run on every core, up to two, through pytest-xdist, when no -n is
# given (-n N always wins; -n 0 is one process; MOEMESH_TEST_WORKERS=N sets the default):
# - the fast tier (-m "not slow"): ~1,000 independent single-process tests, one worker per core
#   with one BLAS thread each, about half the time of one process;
# - the full suite (no -m, no paths named): the fast tests and the slow tests marked
#   shares_cores (one process, no tight clock) share the workers first; then every other slow
#   test (multi-rank, SLURM, two hosts: they time hangs and heartbeats, and a second job beside
#   them on the same two cores would be noise in each) runs on one worker, alone, in order. They
#   form one xdist group, SOLO: xdist suffixes their node ids in its reports with "@solo".
# A run that names its tests (a file, a node id) or another -m stays in one process.
FAST_TIER = ("not", "slow")
SOLO = "solo"


def _mode(config) -> str:
    """The run's mode: "fast", "full" or "" (one process), from how pytest was started."""
    if hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ:
        return ""  # a worker: its -n is unset too, and it must not start workers of its own
    if getattr(config.option, "numprocesses", 0) is not None or not config.pluginmanager.hasplugin("xdist"):
        return ""  # -n given, or pytest-xdist absent (or disabled with -p no:xdist)
    if config.option.collectonly or config.getoption("usepdb", False):
        return ""
    markexpr = tuple((config.option.markexpr or "").split())
    if markexpr == FAST_TIER:
        return "fast"
    if not markexpr and config.args_source is pytest.Config.ArgsSource.TESTPATHS:
        return "full"
    return ""


def _workers(config, mode: str | None = None) -> int:
    """How many workers README's two commands get (0: one process)."""
    if not (mode if mode is not None else _mode(config)):
        return 0
    wanted = os.environ.get("MOEMESH_TEST_WORKERS", "")
    if wanted:
        return int(wanted) if wanted.isdigit() else 0
    return min(2, len(os.sched_getaffinity(0)))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Runs before pytest-xdist reads -n (a conftest's tryfirst hook is called before an
    installed plugin's): README's two commands get their workers here."""
    mode = _mode(config)
    workers = _workers(config, mode)
    if workers <= 1:
        return
    config.option.numprocesses = workers
    if mode == "fast":
        # One BLAS thread per worker: two workers of two threads each on two cores are slower
        # than one process. Inherited by the workers, which start after this hook.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        return
    # The full suite: the SOLO group is collected last and handed out in collection order (xdist
    # would otherwise send the biggest group first, beside the fast tests); the workers are told
    # to name the group (a worker parses the command line again, which has no --dist).
    config.option.dist = "loadgroup"
    config.option.loadscopereorder = False
    config.moemesh_solo = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist's controller, for each worker it starts (only called where xdist is installed)."""
    if getattr(node.config, "moemesh_solo", False):
        node.workerinput["moemesh_solo"] = True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """On a worker of the full suite, before xdist names the groups: the slow tests that do not
    share the cores in group SOLO, last; the shares_cores ones first, so that the fast tests are
    what the two workers finish on before the group starts."""
    if not getattr(config, "workerinput", {}).get("moemesh_solo"):
        return
    config.option.loadgroup = True
    slow = [i for i in items if i.get_closest_marker("slow")]
    shared = [i for i in slow if i.get_closest_marker("shares_cores")]
    solo = [i for i in slow if not i.get_closest_marker("shares_cores")]
    for item in solo:
        item.add_marker(pytest.mark.xdist_group(SOLO))
    items[:] = shared + [i for i in items if not i.get_closest_marker("slow")] + solo


@pytest.fixture(autouse=True)
def _one_blas_thread_beside_another_worker(request):
    """On a worker, a test that shares the cores gets one BLAS thread (two workers of two threads
    on two cores are slower than one process); a SOLO test keeps what it would have had."""
    if "PYTEST_XDIST_WORKER" not in os.environ or request.node.get_closest_marker("xdist_group"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Shared helpers (tiny_run, SMALL) live in tests/helpers.py; this file holds fixtures only.


def _skips_fail() -> bool:
    """CI must run every test it can: under ``CI=true`` (``.ci/run`` sets it, as CI services do)
    a skip is a failure, except for tests marked ``gpu`` on a machine without one."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def _as_failure(report, where: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: {where} may not skip here ({reason})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and _skips_fail() and not item.get_closest_marker("gpu"):
        _as_failure(report, item.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips as a whole (``importorskip``, ``allow_module_level``) fails too."""
    report = yield
    if report.skipped and _skips_fail():
        _as_failure(report, collector.nodeid)
    return report


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_umask():
    """train.py sets the process umask (cluster.output_access); a test that runs it in-process
    must not leave that to the tests after it (nor to the daemons a test starts)."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)
