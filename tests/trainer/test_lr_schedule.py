"""trainer/optim.lr_at: linear warmup that never gives lr 0, then cosine from lr at the first step
after warmup to exactly min_lr at the last step (a shifted curve trained as well, so only the
numbers show it)."""

import math

import pytest

from tests.helpers import tiny_run


def _schedule(steps: int, warmup: int, lr=1e-3, min_lr=1e-4) -> list[float]:
    from moemesh.trainer.optim import lr_at

    t = tiny_run(
        **{"trainer.steps": steps, "trainer.warmup_steps": warmup, "trainer.lr": lr, "trainer.min_lr": min_lr}
    ).trainer
    return [lr_at(step, t) for step in range(steps)]


def test_warmup_rises_linearly_from_a_nonzero_lr_to_below_the_peak():
    lrs = _schedule(steps=20, warmup=4)
    assert lrs[:4] == pytest.approx([1e-3 * k / 5 for k in (1, 2, 3, 4)])  # step 0 updates too
    assert lrs[4] == pytest.approx(1e-3)  # the peak: the first step after warmup


def test_cosine_reaches_min_lr_exactly_at_the_last_step_and_halfway_is_the_mean():
    lrs = _schedule(steps=21, warmup=4)  # 16 steps of decay after the peak at step 4
    assert lrs[-1] == pytest.approx(1e-4)
    assert lrs[4 + 8] == pytest.approx((1e-3 + 1e-4) / 2)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # strictly decreasing


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (2, 0), (3, 3), (5, 10)])
def test_short_runs_stay_within_bounds(steps, warmup):
    lrs = _schedule(steps, warmup)
    assert all(0 < x <= 1e-3 and math.isfinite(x) for x in lrs), lrs
