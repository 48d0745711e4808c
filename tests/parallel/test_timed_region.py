"""``comm.timed_region`` and its hook form ``comm.time_module``: the routed experts' forward and
backward time (time.experts), and nothing around them; values and gradients unchanged by the
timing. One process, no ranks."""

from __future__ import annotations

import time

import pytest
import torch

from moemesh.moe.experts import GroupedExperts
from moemesh.parallel.comm import CommMeter, time_module, timed_region


class _Slow(torch.autograd.Function):
    """Identity that sleeps ``fwd`` seconds in forward and ``bwd`` in backward."""

    @staticmethod
    def forward(ctx, x, fwd: float, bwd: float):
        ctx.bwd = bwd
        time.sleep(fwd)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        return g * 2, None, None


def test_the_region_times_its_forward_and_backward_and_nothing_around_it():
    meter = CommMeter()
    x = torch.randn(4, 3, requires_grad=True)
    # Work before and after the region (0.15 s each way) is not the region's.
    before = _Slow.apply(x, 0.15, 0.15)
    y = timed_region(meter, "experts", lambda t: _Slow.apply(t, 0.05, 0.10), before)
    after = _Slow.apply(y, 0.15, 0.15)
    forward_s = meter.seconds["experts"]
    after.sum().backward()
    total = meter.collect()["experts_s"]
    assert 0.05 <= forward_s < 0.12, forward_s
    assert 0.15 <= total < 0.27, total  # 0.05 forward + 0.10 backward, not the 0.6 s around them
    assert torch.equal(x.grad, torch.full_like(x, 8.0))
    assert meter.seconds["dispatch"] == meter.seconds["combine"] == 0.0


class _SlowModule(torch.nn.Module):
    def forward(self, x, scale):
        return _Slow.apply(x, 0.05, 0.10) * scale


def test_a_timed_module_times_its_calls_and_nothing_around_them():
    """The hook form: the same window as timed_region, on every call (twice here), with the
    module's extra arguments passed through."""
    meter = CommMeter()
    module = _SlowModule()
    time_module(module, meter, "experts")
    x = torch.randn(4, 3, requires_grad=True)
    before = _Slow.apply(x, 0.15, 0.15)
    y = module(module(before, 1.0), 0.5)
    after = _Slow.apply(y, 0.15, 0.15)
    forward_s = meter.seconds["experts"]
    after.sum().backward()
    total = meter.collect()["experts_s"]
    assert 0.10 <= forward_s < 0.22, forward_s
    assert 0.30 <= total < 0.50, total  # 2 x (0.05 + 0.10), not the 0.6 s around them
    assert torch.equal(x.grad, torch.full_like(x, 8.0))  # 2 (before) x 2 x 2 x 0.5 x 2 (after)


@pytest.mark.parametrize("grouped", [True, False])
def test_timed_experts_compute_what_untimed_ones_do(grouped):
    torch.manual_seed(0)
    plain, timed = (GroupedExperts(num_experts=3, hidden_size=8, ffn_size=16) for _ in range(2))
    meter = CommMeter()
    time_module(timed, meter, "experts")
    for m in (plain, timed):
        m.use_grouped_mm = grouped
        m.init_weights(seed=1, prefix="layers.0.moe", std=0.1, out_std=0.05)
    counts = torch.tensor([5, 0, 7])
    x = torch.randn(12, 8)
    outs = []
    for m in (plain, timed):
        xi = x.clone().requires_grad_()
        y = m(xi, counts)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2], strict=True))
    assert meter.collect()["experts_s"] > 0


def test_no_meter_is_no_timing():
    x = torch.randn(2, 2, requires_grad=True)
    y = timed_region(None, "experts", lambda t: t * 3, x)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "MulBackward0"


def test_an_input_without_gradient_still_closes_the_backward_clock():
    """Weights that need a gradient under an input that does not: the region's backward runs, so
    it is timed (the entry marker stays in the graph)."""
    meter = CommMeter()
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(4, 3)
    y = timed_region(meter, "experts", lambda t: _Slow.apply(t @ w, 0.0, 0.1), x)
    y.sum().backward()
    assert meter.seconds["experts"] >= 0.1 and w.grad is not None
