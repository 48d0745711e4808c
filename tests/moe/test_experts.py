"""The routed experts (moe/experts.py): SwiGLU and the down projection in one autograd node that
keeps gate and up only. Outputs and every gradient equal the formula written with autograd
(F.silu(x w1) * (x w3)) w2, per expert, to fp32 rounding, on the grouped GEMMs and on the
per-expert loop, with empty experts and ragged counts; the tensors kept for the backward drop
from D + 4F to D + 2F per routed row, as planning/memory.py counts them."""

import pytest
import torch
import torch.nn.functional as F

from moemesh.moe.experts import GroupedExperts

# fp32, the same GEMMs in another association (the fused path multiplies the recomputed h):
# rounding of inner length F, far below a wrong expert (O(1)).
TOL = dict(rtol=1e-5, atol=1e-5)
COUNTS = [5, 0, 12, 3, 0, 7]


def _experts(grouped: bool, D=16, Fh=24):
    torch.manual_seed(0)
    e = GroupedExperts(num_experts=len(COUNTS), hidden_size=D, ffn_size=Fh)
    e.init_weights(seed=1, prefix="layers.0.moe", std=0.2, out_std=0.2)
    e.use_grouped_mm = grouped
    return e


def _autograd_formula(e: GroupedExperts, x, counts):
    outs = []
    for j, xe in enumerate(torch.split(x, counts)):
        outs.append((F.silu(xe @ e.w1_eDF[j]) * (xe @ e.w3_eDF[j])) @ e.w2_eFD[j])
    return torch.cat(outs)


@pytest.mark.parametrize("grouped", [True, False])
def test_outputs_and_every_gradient_equal_the_autograd_formula(grouped):
    e = _experts(grouped)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), 16)
    dy = torch.randn(sum(COUNTS), 16)
    results = []
    for run in (lambda xi: e(xi, counts), lambda xi: _autograd_formula(e, xi, COUNTS)):
        e.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(dy)
        results.append([y.detach(), xi.grad, *(p.grad.clone() for p in e.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_an_expanded_gradient_and_no_rows_at_all():
    e = _experts(True)
    x = torch.randn(sum(COUNTS), 16, requires_grad=True)
    e(x, torch.tensor(COUNTS)).sum().backward()  # y.sum(): a stride-0 gradient
    assert torch.isfinite(x.grad).all() and e.w2_eFD.grad[1].abs().sum() == 0  # expert 1 has no rows
    empty = torch.zeros(0, 16, requires_grad=True)
    e(empty, torch.zeros(len(COUNTS), dtype=torch.int64)).sum().backward()
    assert empty.grad.shape == (0, 16)


@pytest.mark.parametrize("grouped", [True, False])
def test_kept_tensors_per_routed_row_drop_from_d_plus_4f_to_d_plus_2f(grouped):
    D, Fh = 16, 24
    e = _experts(grouped, D, Fh)
    counts = torch.tensor(COUNTS)
    M = sum(COUNTS)
    x = torch.randn(M, D, requires_grad=True)

    def kept_per_row(run) -> float:
        """Bytes of the activations kept for the backward, per routed row, in fp32 values: each
        storage once (per-expert slices of x share x's), weights and the int counts left out."""
        weights = {p.untyped_storage().data_ptr() for p in e.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if t.is_floating_point() and ptr not in weights:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(seen.values()) / 4 / M

    fused = kept_per_row(lambda: e(x, counts))
    before = kept_per_row(lambda: _autograd_formula(e, x, COUNTS))
    assert fused == D + 2 * Fh  # x, gate, up
    assert before == D + 4 * Fh  # x, gate, silu(gate), up, h
    assert fused / before <= 2 / 3
