"""Under CI=true a skip is a failure (tests/conftest.py), except for a test marked gpu: CI runs
every test it can, and says which ones it could not."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
CASES = """
import pytest

def test_skips():
    pytest.skip("no tool here")

@pytest.mark.skipif(True, reason="a condition")
def test_skipif():
    pass

@pytest.mark.gpu
def test_gpu():
    pytest.skip("no GPU here")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
"""


@pytest.fixture(autouse=True)
def _bare(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the inner runs need no plugin


def test_a_skip_fails_under_ci_but_a_gpu_one(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    # test_skips fails, test_skipif errors (its skip is taken in setup), test_gpu still skips.
    assert (outcomes.get("failed"), outcomes.get("errors"), outcomes.get("skipped")) == (1, 1, 1), outcomes
    assert outcomes.get("xfailed") == 1
    result.stdout.fnmatch_lines(["*CI=true: test_cases.py::test_skips may not skip here*no tool here*"])
    result.stdout.fnmatch_lines(["*test_cases.py::test_skipif may not skip here*a condition*"])


def test_a_module_that_skips_whole_fails_under_ci(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    module = 'import pytest\npytest.importorskip("no_such_module_here")\n\ndef test_x():\n    pass\n'
    pytester.makepyfile(test_mod=module)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*CI=true: test_mod.py may not skip here*no_such_module_here*"])
    assert result.ret != 0
