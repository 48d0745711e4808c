"""clip_grads_ keeps its coefficient on the device: bitwise what the host-side arithmetic gave."""

import math

import pytest
import torch

from moemesh.parallel.grads import clip_grads_


def _host_clip(params, total_norm: torch.Tensor, max_norm: float) -> None:
    """The clip as it was: the norm read on the host, the scale a Python float."""
    if max_norm <= 0 or not math.isfinite(float(total_norm)):
        return
    scale = max_norm / (float(total_norm) + 1e-6)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 1, 33)]
    ps[0].grad = torch.randn(7, generator=g) * 3
    ps[2].grad = torch.randn(33, generator=g)
    return ps  # ps[1] has no gradient


NORMS = [0.0, 1e-30, 0.5, 1.0 - 1e-6, 0.9999990463256836, 1.0, 1.0000001, 3.7, 1e30, math.inf, -math.inf, math.nan]
NORMS += torch.rand(200, generator=torch.Generator().manual_seed(1)).mul(4).tolist()
NORMS += torch.rand(200, generator=torch.Generator().manual_seed(2)).mul(2e-6).add(1 - 1e-6).tolist()


@pytest.mark.parametrize("max_norm", [1.0, 0.3, 2.5, 0.0])
def test_clip_is_bitwise_the_host_arithmetic(max_norm):
    for i, norm in enumerate(NORMS):
        a, b = _params(i), _params(i)
        total = torch.tensor(norm, dtype=torch.float32)
        _host_clip(a, total, max_norm)
        clip_grads_(b, total, max_norm)
        for p, q in zip(a, b):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert torch.equal(p.grad.view(torch.int32), q.grad.view(torch.int32)), (max_norm, norm)


def test_clip_off_and_non_finite_leave_gradients_alone():
    for max_norm in (0.0, None):
        ps = _params(0)
        before = [None if p.grad is None else p.grad.clone() for p in ps]
        clip_grads_(ps, torch.tensor(100.0), max_norm)
        assert all(b is None or torch.equal(b, p.grad) for b, p in zip(before, ps))
    for norm in (math.inf, math.nan):
        ps = _params(0)
        before = [None if p.grad is None else p.grad.clone() for p in ps]
        clip_grads_(ps, torch.tensor(norm), 1.0)
        assert all(b is None or torch.equal(b, p.grad) for b, p in zip(before, ps))
    clip_grads_([torch.nn.Parameter(torch.zeros(2))], torch.tensor(5.0), 1.0)  # no gradients at all
