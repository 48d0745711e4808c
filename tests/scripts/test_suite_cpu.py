"""scripts/suite_cpu.py: the per-test busy-time plugin records each test, and the report ranks
them by the wall time they would take off the solo group."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import suite_cpu

ROOT = Path(__file__).resolve().parents[2]


def test_report_ranks_the_waiting_test_first(tmp_path):
    path = tmp_path / "cpu.jsonl"
    rows = [
        {"id": "t::busy", "wall": 10.0, "busy": 20.0},  # both cores all along: nothing to gain
        {"id": "t::waits", "wall": 8.0, "busy": 1.0},  # a rendezvous timeout
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = suite_cpu.report(path, cores=2, top=5)
    assert lines[0] == "2 tests: 18 s wall, 21 busy core-seconds, utilisation 0.58 of 2 cores"
    assert lines[2].endswith("t::waits") and "   7.5  " in lines[2]  # 8 s less 1 core-second over 2 cores
    assert lines[3].endswith("t::busy") and "   0.0  " in lines[3]


def test_busy_time_grows_with_work():
    before = suite_cpu._busy_s()
    end = sum(i * i for i in range(3_000_000))  # ~0.2 s of one core
    assert end and suite_cpu._busy_s() > before


@pytest.mark.slow
@pytest.mark.shares_cores
def test_the_plugin_writes_one_line_per_test(tmp_path):
    (tmp_path / "test_two.py").write_text("import time\ndef test_a(): time.sleep(0.3)\ndef test_b(): pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUITE_CPU_OUT": str(tmp_path / "out.jsonl")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "scripts.suite_cpu", "-p", "no:cacheprovider", "test_two.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["test_two.py::test_a", "test_two.py::test_b"]
    assert records[0]["wall"] >= 0.3 and all(r["busy"] >= 0 for r in records)
