"""trainer/optim.lr_at: linear warmup that never gives lr 0, then cosine from lr at the first step
after warmup to exactly min_lr at the last step (a shifted curve trained as well, so only the
numbers show it)."""

import math

import pytest
import torch

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


def test_adamw_decays_matrices_only_with_the_configured_betas():
    from moemesh.trainer.optim import build_optimizer

    overrides = {"trainer.weight_decay": 0.25, "trainer.beta1": 0.8, "trainer.beta2": 0.99, "trainer.lr": 2e-3}
    t = tiny_run(**overrides).trainer
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    decay, no_decay = build_optimizer(model, t).param_groups
    assert decay["params"] == [model[0].weight, model[2].weight] and decay["weight_decay"] == 0.25
    assert no_decay["params"] == [model[0].bias, model[1].weight, model[1].bias] and no_decay["weight_decay"] == 0.0
    for group in (decay, no_decay):
        assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.8, 0.99), 1e-8)
