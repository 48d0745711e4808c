"""trainer.on_nonfinite=skip stops a run that only skips: N steps in a row without an update
end it with one FloatingPointError line and exit 1 (it ran to the end with exit 0 and a NaN
final loss before)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.shares_cores]  # runs train.py end to end

from tests.helpers import SMALL  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# lr 1e30: the first update makes the weights huge, every later gradient norm is non-finite.
DIVERGES = ["trainer.lr=1e30", "trainer.warmup_steps=0", "trainer.on_nonfinite=skip"]


def _train(tmp_path, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *SMALL, *DIVERGES, *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("limit", [None, 3])
def test_consecutive_skipped_steps_stop_the_run_in_one_line(tmp_path, limit):
    over = [] if limit is None else [f"trainer.max_skipped_steps={limit}"]
    proc = _train(tmp_path, "trainer.steps=40", *over)
    n = limit or 10  # the default
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moemesh:")]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith(
        f"moemesh: FloatingPointError: {n} steps in a row skipped for a non-finite gradient norm (steps "
    ), lines
    assert f"trainer.max_skipped_steps={n}): stopped" in lines[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("skipped")) for r in records) == n - 1  # the n-th stops before it is logged
    assert records[-1]["step"] < 40


def test_a_run_with_fewer_skips_than_the_limit_still_finishes(tmp_path):
    proc = _train(tmp_path, "trainer.steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "update skipped (1 in a row; trainer.max_skipped_steps=10)" in proc.stdout
