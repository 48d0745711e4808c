"""README's measured numbers hold: scripts/readme_numbers.py re-measures them (one 300-step
run of the default model, about a minute here) and fails on any stale one."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from scripts import readme_numbers  # noqa: E402


def test_stale_numbers_are_named():
    n = {
        "first_loss": "5.5489",
        "final_loss": "1.8824",
        "final_val": "1.8941",
        "steps": "300",
        "step1_16_ranks": "5.5489",
        "tokens_per_s": "1",
        "where": "x, Python 3.11.7",
    }
    good = readme_numbers.render("default_run", n)
    assert all(f in good for f in readme_numbers.CHECKED["default_run"](n))
    stale = good.replace("loss 5.5489 at step 1", "loss 5.5490 at step 1")
    assert [f for f in readme_numbers.CHECKED["default_run"](n) if f not in stale] == ["loss 5.5489 at step 1"]


def test_final_losses_hold_within_the_band_on_another_cpu():
    """README measured 1.8824 / 1.8941 on an AMD EPYC; an Intel Xeon trains to 1.8618 / 1.8729
    (1.1% lower): that is the same code, not a stale README."""
    n = {"first_loss": "5.5489", "final_loss": "1.8824", "final_val": "1.8941", "steps": "300"}
    n |= {"step1_16_ranks": "5.5489", "tokens_per_s": "1", "where": "x, Python 3.11.7"}
    spans = {"default_run": readme_numbers.render("default_run", n)}
    intel = {"final_loss": "1.8618", "final_val": "1.8729"}
    assert readme_numbers.off_band(spans, intel) == []
    stale = {"final_loss": "1.7000", "final_val": "1.8729"}  # 9.7% off: a changed model, not a CPU
    (miss,) = readme_numbers.off_band(spans, stale)
    assert "final_loss 1.7000" in miss and "1.8824" in miss
    assert readme_numbers.off_band({"default_run": "no numbers"}, intel) == [
        "default_run: README states no final_loss",
        "default_run: README states no final_val",
    ]


@pytest.mark.slow
def test_readme_numbers_hold():
    recorded = readme_numbers.recorded_python(readme_numbers.recorded_text())
    if recorded != platform.python_version():
        pytest.skip(
            f"README's numbers were measured with Python {recorded}; this is {platform.python_version()}, "
            "whose standard library (the training corpus) differs"
        )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "readme_numbers.py")], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr
