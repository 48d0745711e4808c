"""All-to-All overlap computes what the plain path computes: outputs and every gradient."""
import torch

from conf.schema import ModelConfig
from moe.layer import MoELayer
from parallel.comm import CommMeter
from parallel.dims import ParallelDims
from parallel.mesh import build_mesh
from tests.dist_utils import run_on_ranks

TOL = dict(rtol=1e-6, atol=1e-6)


def _close_in_norm(a, b, name):
    """1e-6 relative in the L2 norm: chunking changes only the order of the additions
    into the expert weight gradients (rows of different chunks)."""
    assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-12, (name, float((a - b).norm()), float(b.norm()))


def _pair(cfg, pm, chunks):
    layers = []
    for n in (0, chunks):
        torch.manual_seed(0)
        layer = MoELayer(cfg=cfg, ep_rank=pm.ep_rank, ep_group=pm.ep_group, stats_group=pm.ep_group,
                         overlap_chunks=n, meter=CommMeter())
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + p.numel())) * 0.3)
        layers.append(layer)
    return layers


def _check(rank, world, ep, chunks, capacity):
    pm = build_mesh(ParallelDims(dp=world // ep, ep=ep), "cpu")
    cfg = ModelConfig(name="t", hidden_size=24, num_experts=8, top_k=2, moe_ffn_hidden_size=20,
                      shared_expert_ffn_size=12, capacity_factor=capacity)
    plain, overlapped = _pair(cfg, pm, chunks)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(rank))
    g = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(100 + rank))
    results = []
    for layer in (plain, overlapped):
        xi = x.clone().requires_grad_()
        out, st = layer(xi)
        ((out * g).sum() + st.losses.aux_loss).backward()
        results.append((out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}, layer.dispatcher.meter))
    (o0, x0, g0, m0), (o1, x1, g1, m1) = results
    if chunks == 1:  # the same reductions in the same order: bitwise
        assert torch.equal(o1, o0) and torch.equal(x1, x0)
        assert all(torch.equal(g1[n], g0[n]) for n in g0), [n for n in g0 if not torch.equal(g1[n], g0[n])]
    torch.testing.assert_close(o1, o0, **TOL)
    _close_in_norm(x1, x0, "input")
    for name in g0:
        _close_in_norm(g1[name], g0[name], name)
    # The same bytes cross the network either way (forward and backward exchanges).
    assert m1.bytes_sent == m0.bytes_sent and m1.min_bytes == m0.min_bytes


def _all(rank, world):
    for ep in (2, 4):
        for chunks in (1, 3):
            _check(rank, world, ep, chunks, None)
    _check(rank, world, 4, 2, 1.0)  # capacity mode works with overlap


def test_overlap_equals_the_plain_path_at_ep2_and_ep4():
    run_on_ranks(_all, 4)
