"""trainer.on_nonfinite=skip stops a run that only skips: N steps in a row without an update
end it with one FloatingPointError line and exit 1 (it ran to the end with exit 0 and a NaN
final loss before)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.shares_cores]  # runs train.py end to end

from tests.helpers import SMALL  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# lr 1e30: the first update makes the weights huge, every later gradient norm is non-finite.
DIVERGES = ["trainer.lr=1e30", "trainer.warmup_steps=0", "trainer.on_nonfinite=skip"]
# lr 1e12, stop (the default): the first update makes the weights non-finite.
BREAKS = ["trainer.lr=1e12", "trainer.warmup_steps=0"]


def _train(tmp_path, *overrides, diverges=DIVERGES):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *SMALL, *diverges, *overrides],
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


def test_stop_mode_names_the_step_as_the_log_does_and_saves_no_non_finite_weights(tmp_path):
    """With one step, only the final evaluation sees what the update did: it ended exit 0 with
    "val nan" and a checkpoint of non-finite weights. With more, the step the message names is
    the log's (it said the step before)."""
    for name in ("one", "three"):
        (tmp_path / name).mkdir()
    one = _train(tmp_path / "one", "trainer.steps=1", diverges=BREAKS)
    assert one.returncode == 1, one.stderr[-2000:]
    last = one.stderr.strip().splitlines()[-1]  # nan or inf: which one depends on the CPU's sums
    assert re.match(
        r"moemesh: FloatingPointError: non-finite validation loss (nan|inf) after step 1: its update made the "
        r"weights non-finite; stopped before saving them",
        last,
    ), last
    assert not list((tmp_path / "one" / "run").glob("checkpoints/step_*"))
    three = _train(tmp_path / "three", "trainer.steps=3", diverges=BREAKS)
    assert three.returncode == 1, three.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "three" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert re.search(r"non-finite gradient norm (nan|inf) at step 2: stopped before the update", three.stderr)


def test_a_skipped_step_leaves_the_expert_biases_as_they_were(tmp_path):
    """Aux-loss-free balancing moves each layer's bias by the step's counts after the update; a
    skipped step changes no state, so its logged bias range is the step before's."""
    proc = _train(tmp_path, "trainer.steps=4", "model.expert_bias_update_rate=0.01")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not records[0].get("skipped") and all(r.get("skipped") for r in records[1:]), records
    ranges = [{n: layer["expert_bias_range"] for n, layer in r["load"].items()} for r in records]
    assert any(v != [0.0, 0.0] for v in ranges[0].values())  # step 1 moved them
    assert all(r == ranges[0] for r in ranges[1:]), ranges
