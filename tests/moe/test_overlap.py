"""All-to-All overlap computes what the plain path computes: outputs and every gradient.

With one chunk the overlapped path runs the same GEMMs on the same rows: bitwise equal.
With more chunks each expert GEMM gets fewer rows, and this CPU's BLAS computes a row of a
GEMM with fewer than 8 rows with another kernel, in another summation order, than the
same row in a larger GEMM (measured: up to 1.4e-6 apart for O(5) values, D=24; 0 at 8+
rows). So the forward output differs too, by rounding only. The bound below is what
rounding allows: each of the three chained GEMMs (w1/w3, w2, the combine's weighted sum)
of inner length n may move a result by n*u relative to the magnitude it sums (u = 2**-24,
fp32), twice (two orders): 2*3*n*u of the output's scale, element by element.

The shared expert runs while the first dispatch, or the last combine, is in flight, or after
the combine (``shared_expert_overlap``): each placement gives the plain path's numbers, and a
hook on the shared expert checks from the meter which exchanges had been waited for when it ran.

The fast tier checks the chunking on one in-process gloo rank, where the exchanges are copies.
"""

import pytest
import torch

from moemesh.fields import SharedExpertOverlap
from moemesh.moe.config import ModelConfig
from moemesh.moe.layer import MoELayer
from moemesh.parallel.comm import CommMeter
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh
from moemesh.trainer.parallelize import apply_ep, apply_instrumentation, apply_load_balance_group
from tests.dist_utils import run_on_ranks

U32 = 2.0**-24  # fp32 unit roundoff


def _rounding_tol(n: int) -> float:
    """Relative (to the output's scale) difference two summation orders may produce."""
    return 2 * 3 * n * U32


def _close_in_norm(a, b, name, tol):
    """Relative in the L2 norm: chunking changes only the order of additions (GEMM rows
    per call, and the rows of different chunks summed into the expert weight gradients)."""
    assert float((a - b).norm()) <= tol * float(b.norm()) + 1e-12, (name, float((a - b).norm()), float(b.norm()))


PLACEMENTS = tuple(SharedExpertOverlap)


def _waited_when_shared_ran(layer, seen):
    """Record, as the shared expert starts, whether any dispatch / combine wait had run."""
    meter = layer.dispatcher.meter

    def before(mod, args):
        seen.append((meter.seconds["dispatch"] > 0, meter.seconds["combine"] > 0))

    layer.shared.register_forward_pre_hook(before)


def _layers(cfg, pm, chunks):
    """The plain path, then the overlapped one with the shared expert at each placement."""
    layers = []
    for n, at in ((0, SharedExpertOverlap.combine), *((chunks, at) for at in PLACEMENTS)):
        torch.manual_seed(0)
        layer = MoELayer(cfg=cfg)
        apply_ep(layer, pm.ep_group, overlap_chunks=n, shared_overlap=at)
        apply_load_balance_group(layer, pm.ep_group)
        apply_instrumentation(layer, CommMeter())
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + p.numel())) * 0.3)
        layers.append(layer)
    return layers


def _check(rank, world, ep, chunks, capacity):
    pm = build_mesh(ParallelDims(dp=world // ep, ep=ep), "cpu")
    cfg = ModelConfig(
        name="t",
        hidden_size=24,
        num_experts=8,
        top_k=2,
        moe_ffn_hidden_size=20,
        shared_expert_ffn_size=12,
        capacity_factor=capacity,
        aux_loss_factor=1.0,
    )
    plain, *overlapped = _layers(cfg, pm, chunks)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(rank))
    g = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(100 + rank))
    results, seen = [], []
    for layer in overlapped:
        _waited_when_shared_ran(layer, seen)
    for layer in (plain, *overlapped):
        xi = x.clone().requires_grad_()
        out, st = layer(xi)
        (out * g).sum().backward()  # and the layer's weighted balance losses, attached to out
        results.append((out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}, layer.dispatcher.meter))
    # (dispatch waited, combine waited) as the shared expert started, per placement.
    assert seen == [(True, True), (False, False), (True, False)], (PLACEMENTS, seen)
    for at, result in zip(PLACEMENTS, results[1:]):
        _equal_to_plain(results[0], result, cfg, (ep, chunks, capacity, at))


def _equal_to_plain(plain, overlapped, cfg, case):
    (o0, x0, g0, m0), (o1, x1, g1, m1) = plain, overlapped
    if case[1] == 1:  # one chunk: the same reductions in the same order: bitwise
        assert torch.equal(o1, o0) and torch.equal(x1, x0)
        assert all(torch.equal(g1[n], g0[n]) for n in g0), [n for n in g0 if not torch.equal(g1[n], g0[n])]
    tol = _rounding_tol(max(cfg.hidden_size, cfg.moe_ffn_hidden_size))
    scale = float(o0.abs().max())
    worst = float((o1 - o0).abs().max())
    assert worst <= tol * scale, (case, worst, tol * scale)
    _close_in_norm(x1, x0, "input", tol)
    for name in g0:
        _close_in_norm(g1[name], g0[name], name, tol)
    # The same bytes cross the network either way (forward and backward exchanges).
    assert (m1.bytes_sent, m1.bytes_recv, m1.min_bytes) == (m0.bytes_sent, m0.bytes_recv, m0.min_bytes)


def _all(rank, world):
    for ep in (2, 4):
        for chunks in (1, 3):
            _check(rank, world, ep, chunks, None)
    _check(rank, world, 4, 2, 1.0)  # capacity mode works with overlap


@pytest.mark.slow  # spawns 2 and 4 gloo ranks
def test_overlap_equals_the_plain_path_at_ep2_and_ep4():
    run_on_ranks(_all, 4)


def test_chunked_path_on_one_rank_equals_the_plain_path_exactly():
    """One gloo rank in this process (no spawn): the exchanges are copies, so what is left is the
    chunking itself: 10 tokens in 3 uneven chunks, dropped pairs, each chunk's counts and weights,
    the experts' rows per expert, and the gradient that _Start/_Wait carry back. Experts that scale
    each row by its expert's id + 1 make every number exact: equal to the plain path bit for bit."""
    from moemesh.moe.dispatcher import AllToAllDispatcher
    from moemesh.moe.overlap import overlapped_moe

    E, K, T, D = 4, 2, 10, 6
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    ids[torch.rand(T, K, generator=gen) < 0.25] = -1
    x, w = torch.randn(T, D, generator=gen), torch.rand(T, K, generator=gen)
    g_out = torch.randn(T, D, generator=gen)
    scale_E = torch.arange(1.0, E + 1)

    def experts(rows, tokens_per_expert_e):
        return rows * scale_E.repeat_interleave(tokens_per_expert_e, output_size=rows.shape[0])[:, None]

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        d = AllToAllDispatcher(num_experts=E, ep_group=torch.distributed.group.WORLD)
        results = []
        for chunks in (0, 3):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            if chunks:
                out, shared_out = overlapped_moe(d, xi, ids, wi, experts, chunks=chunks)
                assert shared_out is None
            else:
                rows, meta = d.dispatch(xi, ids)
                out = d.combine(experts(rows, meta.tokens_per_expert_e), wi, meta)
            (out * g_out).sum().backward()
            results.append((out, xi.grad, wi.grad))
    finally:
        torch.distributed.destroy_process_group()
    kept_w = w * (ids >= 0) * scale_E[ids.clamp(min=0)]
    torch.testing.assert_close(results[0][0], x * kept_w.sum(1, keepdim=True))
    for plain, chunked in zip(*results, strict=True):
        assert torch.equal(chunked, plain)
