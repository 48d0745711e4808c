import os

# Triton kernels run on this CPU only through the interpreter, which must be chosen
# before triton is imported. A GPU run sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

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
