"""scripts/ab_bench.py: both sides run in their own worktree, interleaved; --wall times each run."""

import re

import pytest

from scripts import ab_bench


@pytest.mark.slow  # seconds of one process: shares the cores with the slow tier
@pytest.mark.shares_cores
def test_wall_times_each_side_start_up_included(capsys):
    ab_bench.main(
        ["--before", "HEAD", "--after", "HEAD", "--wall", "--rounds", "2", "--", "-c", "import time; time.sleep(0.3)"]
    )
    out = capsys.readouterr().out
    rounds = re.findall(r"round (\d) (before|after): ([\d.]+)", out)
    assert [(r, side) for r, side, _ in rounds] == [("1", "before"), ("1", "after"), ("2", "after"), ("2", "before")]
    assert all(0.3 <= float(s) < 30 for _, _, s in rounds)
    assert re.search(r"after / before = [\d.]+", out)
