import os

# Triton kernels run on this CPU only through the interpreter, which must be chosen
# before triton is imported. A GPU run sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# The fast tier (-m "not slow") runs on every core, up to two, through pytest-xdist: its
# ~1,000 tests are independent and single-process, and one worker per core with one BLAS
# thread each halves its time on the 2-core machines this project is tested on. The full
# suite stays in one process: its multi-rank tests time hangs and heartbeats, and a second
# worker beside them would be a second job on the same two cores. -n N on the command line
# (-n 0: one process) always wins; MOEMESH_TEST_WORKERS=N sets the default.
FAST_TIER = ("not", "slow")


def _fast_tier_workers(config) -> int:
    if hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ:
        return 0  # a worker: its -n is unset too, and it must not start workers of its own
    if tuple((config.option.markexpr or "").split()) != FAST_TIER:
        return 0
    if getattr(config.option, "numprocesses", 0) is not None or not config.pluginmanager.hasplugin("xdist"):
        return 0  # -n given, or pytest-xdist absent (or disabled with -p no:xdist)
    if config.option.collectonly or config.getoption("usepdb", False):
        return 0
    wanted = os.environ.get("MOEMESH_TEST_WORKERS", "")
    if wanted:
        return int(wanted) if wanted.isdigit() else 0
    return min(2, len(os.sched_getaffinity(0)))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Runs before pytest-xdist reads -n (a conftest's tryfirst hook is called before an
    installed plugin's): the fast tier gets its workers here."""
    workers = _fast_tier_workers(config)
    if workers > 1:
        config.option.numprocesses = workers
        # One BLAS thread per worker: two workers of two threads each on two cores are slower
        # than one process. Inherited by the workers, which start after this hook.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")


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
