"""Which slow tests leave the cores idle: per test, its wall seconds and the machine's busy
core-seconds over the same span (from /proc/stat), to find tests that could share the cores.

    python -m pytest -q -p scripts.suite_cpu -m "slow and not shares_cores"   # the solo group, one process
    python scripts/suite_cpu.py                                                # the table, most idle first

As a pytest plugin it appends one JSON line per test (setup, call and teardown together) to
``$SUITE_CPU_OUT`` (default ``suite_cpu.jsonl``). Run it on an otherwise idle machine: busy time
is the whole machine's. A test whose utilisation (busy ÷ cores ÷ wall) stays near 1/cores or
below is waiting, or running one process on one core; if it is also one process with no tight
clock that writes only under its tmp_path, it may be marked ``shares_cores``
(docs/testing.md). "Saved" estimates what moving it beside the fast tests would take off the
solo group: its wall time less what its busy time adds to two saturated workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest  # requirements-dev.txt: a test tool, as the suite it measures

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)

_HZ = os.sysconf("SC_CLK_TCK")


def _out() -> Path:
    return Path(os.environ.get("SUITE_CPU_OUT", "suite_cpu.jsonl"))


def _busy_s() -> float:
    """Core-seconds the machine has spent busy since boot (all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _HZ


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0, b0 = time.monotonic(), _busy_s()
    yield
    record = {"id": item.nodeid, "wall": round(time.monotonic() - t0, 2), "busy": round(_busy_s() - b0, 2)}
    with _out().open("a") as f:
        f.write(json.dumps(record) + "\n")


def report(path: Path, cores: int, top: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    wall, busy = sum(r["wall"] for r in rows), sum(r["busy"] for r in rows)
    lines = [
        f"{len(rows)} tests: {wall:.0f} s wall, {busy:.0f} busy core-seconds, "
        f"utilisation {busy / cores / max(wall, 1e-9):.2f} of {cores} cores",
        f"{'wall s':>7} {'busy s':>7} {'util':>5} {'saved s':>7}  test",
    ]
    rows.sort(key=lambda r: -(r["wall"] - r["busy"] / cores))
    for r in rows[:top]:
        util = r["busy"] / cores / max(r["wall"], 1e-9)
        lines.append(f"{r['wall']:7.1f} {r['busy']:7.1f} {util:5.2f} {r['wall'] - r['busy'] / cores:7.1f}  {r['id']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=_out())
    parser.add_argument("--cores", type=positive_int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=positive_int, default=40)
    args = parser.parse_args(argv)
    if not args.path.is_file():
        raise SystemExit(f"suite_cpu: {args.path}: no such file; run pytest with -p scripts.suite_cpu first")
    print("\n".join(report(args.path, args.cores, args.top)))


if __name__ == "__main__":
    main()
