"""GradReducer's buckets and global_grad_norm's arithmetic on one process (the fast tier): the
sums over real groups are tests/parallel/test_grads.py's (slow: it spawns gloo ranks)."""

import pytest
import torch

from moemesh.parallel.grads import GradReducer, _buckets, clip_grads_, global_grad_norm


def _params(sizes, seed=0, missing=()):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(n, 3)) for n in sizes]
    for i, p in enumerate(ps):
        if i not in missing:
            p.grad = torch.randn(p.shape, generator=g)
    return ps


@pytest.mark.parametrize(
    ("sizes", "bucket_bytes"),
    [((4, 1, 7, 2, 6), b) for b in (1, 12 * 4, 12 * 4 + 1, 60 * 4, 2**20)] + [((1, 1, 1, 1, 1), 2 * 12)],
)
def test_buckets_keep_order_and_bound_and_hold_every_parameter_once(sizes, bucket_bytes):
    ps = _params(sizes)  # 3 floats a row
    buckets = _buckets(ps, bucket_bytes)
    assert [p for b in buckets for p in b] == ps
    for b in buckets:  # a bucket over the bound holds a single parameter larger than it
        assert len(b) == 1 or sum(p.numel() * 4 for p in b) <= bucket_bytes
    for a, b in zip(buckets, buckets[1:]):  # a bucket closes only when the next parameter would not fit
        assert sum(p.numel() * 4 for p in a) + b[0].numel() * 4 > bucket_bytes


@pytest.mark.parametrize("bucket_bytes", [1, 40 * 4, 2**20])
def test_one_rank_groups_divide_every_gradient_by_the_data_ranks_in_place(bucket_bytes):
    """A one-rank group still divides by the data ranks (experts under pure EP); a missing
    gradient becomes zeros; every gradient lands back on its own parameter, whatever the buckets."""
    ps = _params([4, 1, 7, 2], missing=(1,))
    want = [torch.zeros_like(p) if p.grad is None else p.grad / 4 for p in ps]
    grads = [p.grad for p in ps]
    GradReducer([(ps[:2], None), (ps[2:], None)], data_size=4, bucket_bytes=bucket_bytes).reduce()
    for p, w, g in zip(ps, want, grads):
        assert torch.equal(p.grad, w)
        assert g is None or p.grad is g  # in place: the optimizer holds these tensors
    one = _params([3])
    before = one[0].grad.clone()
    reducer = GradReducer([(one, None)], data_size=1)
    assert reducer.plan == []  # one rank, one data rank: nothing to do
    reducer.reduce()
    assert torch.equal(one[0].grad, before)


def test_the_norm_counts_every_kind_once_and_skips_missing_gradients():
    rep, tp, ex = _params([2, 3], seed=1), _params([4], seed=2), _params([1, 5], seed=3, missing=(0,))
    norm = global_grad_norm(replicated=rep, tp_sharded=tp, expert=ex, tp_group=None, ep_group=None)
    grads = [p.grad for p in rep + tp + ex if p.grad is not None]
    want = torch.cat([g.reshape(-1) for g in grads]).double().norm().float()
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    assert norm.dtype == torch.float32
    assert global_grad_norm(replicated=[], tp_sharded=[], expert=[], tp_group=None, ep_group=None) == 0


def test_half_precision_gradients_are_squared_in_float32():
    ps = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float16)) for _ in range(2)]
    for p in ps:
        p.grad = torch.full((4,), 300.0, dtype=torch.float16)  # 300**2 overflows float16 (max 65504)
    norm = global_grad_norm(replicated=ps[:1], tp_sharded=[], expert=ps[1:], tp_group=None, ep_group=None)
    torch.testing.assert_close(norm, torch.full((8,), 300.0).double().norm().float(), rtol=1e-6, atol=0)


def test_a_group_of_several_ranks_is_reduced_even_with_one_data_rank():
    """tp2 alone: router and expert gradients still sum over their TP peers (a fake two-rank group)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    ps = _params([4, 1])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        tp = dist.group.WORLD
        plan = GradReducer([(ps, tp), (_params([2]), None)], data_size=1).plan
    finally:
        dist.destroy_process_group()
    assert plan == [(ps, tp)]  # the one-rank group with one data rank: nothing to do


@pytest.fixture
def one_rank_mesh():
    """A one-process gloo group and its 1-D mesh: DTensor gradients (parallel.sharding) without spawning."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharded_gradients_count_in_the_norm_beside_whole_ones_and_are_clipped_in_place(one_rank_mesh):
    from torch.distributed.tensor import DTensor, Shard

    rep, ex = _params([2, 3], seed=4), _params([4, 5], seed=5)
    shard = ex[0].grad
    ex[0].grad = DTensor.from_local(shard, one_rank_mesh, [Shard(0)], run_check=False)  # beside a whole ex[1]
    norm = global_grad_norm(replicated=rep, tp_sharded=[], expert=ex, tp_group=None, ep_group=None)
    grads = [p.grad for p in rep] + [shard, ex[1].grad]
    want = torch.cat([g.reshape(-1) for g in grads]).double().norm().float()
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    before = [g.clone() for g in grads]
    clip_grads_(rep + ex, norm, 0.5)
    scale = 0.5 / (norm.double() + 1e-6)
    for g, b in zip(grads, before):  # the DTensor's own shard among them: scaled where it lies
        torch.testing.assert_close(g, (b.double() * scale).float(), rtol=1e-6, atol=0)
