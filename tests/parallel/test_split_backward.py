"""Activation checkpointing under a split backward (the zero-bubble pipeline schedules: torch's
``stage_backward_input`` then, later, ``stage_backward_weight``).

The input step is a backward of its own, and the weight step is one backward per weight group
(torch's ``get_param_groups``: the parameters whose gradients meet the input's path at the same
nodes; in an MoE block wq, wk, wv, wo, two norms, the router and the experts: w1, w3 and w2
apart on the grouped GEMMs, 10 groups; one group on the per-expert loop, a CPU's default, whose
one autograd node computes only the gradients each pass asks for, 8 groups).
Torch's non-reentrant checkpoint recomputes a region once per backward that needs it, so a
checkpointed MoE block runs its forward 12 times instead of 2. The gradients are right (each
recompute replays the recorded collectives: the tape restarts, ``parallel.comm.replaying``), the
cost is not: ``config.validate`` refuses the zero-bubble schedules with activation checkpointing
and names this test.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from moemesh.moe.model import Block, rope_tables
from moemesh.parallel.recompute import checkpoint_module
from tests.helpers import tiny_run


def _block(mode: str | None, grouped: bool) -> Block:
    run = tiny_run()
    torch.manual_seed(0)
    block = Block(run.model, 0)  # an MoE block
    block.moe.experts.use_grouped_mm = grouped
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if mode is not None:
        checkpoint_module(block, mode)
    return block


def _forward(block: Block, calls: list[int]):
    block.attn.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32, requires_grad=True)
    cos, sin = rope_tables(8, 16, 10000.0)
    out, _stats = block(x, cos, sin)
    return x, out


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("mode", ["full"])
def test_a_split_backward_recomputes_once_per_weight_group_and_the_gradients_are_whole(mode, grouped):
    ref = _block(None, grouped)
    x_ref, out_ref = _forward(ref, [])
    g = torch.randn_like(out_ref)
    out_ref.backward(g)

    block, calls = _block(mode, grouped), []
    x, out = _forward(block, calls)
    assert len(calls) == 1
    params = list(block.parameters())
    dinputs, groups = stage_backward_input([out], [g], [x], iter(params))
    assert len(calls) == 2  # the input step's recompute
    assert all(p.grad is None for p in params)  # weights wait for their own step
    stage_backward_weight(iter(params), groups)
    assert len(calls) == 2 + len(groups) and len(groups) == (10 if grouped else 8)  # again for each weight group
    torch.testing.assert_close(dinputs[0], x_ref.grad, rtol=1e-5, atol=1e-7)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)
