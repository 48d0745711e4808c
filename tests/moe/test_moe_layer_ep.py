"""The MoE layer and dispatcher at EP=2 and EP=4 against EP=1: outputs and all gradients."""

import pytest
import torch
import torch.distributed as dist

from moemesh.kernels import TORCH_OPS, TRITON_OPS
from moemesh.kernels._triton import can_run_triton
from moemesh.moe.config import ModelConfig
from moemesh.moe.dispatcher import AllToAllDispatcher
from moemesh.moe.layer import MoELayer
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh
from tests.dist_utils import run_on_ranks
from tests.helpers import laid_out

pytestmark = pytest.mark.slow  # spawns 2 and 4 gloo ranks

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; a wrong expert or a lost row is off by O(0.1)


def _layer(cfg, ep_group, stats_group, ops=TORCH_OPS):
    torch.manual_seed(0)
    layer = laid_out(MoELayer(cfg=cfg), ep_group=ep_group, stats_group=stats_group, ops=ops)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "experts" not in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        layer.experts.init_weights(seed=3, prefix="moe", std=0.3, out_std=0.3)
    return layer


def _check_layer(rank, world, ep, shared, ops=TORCH_OPS, hosts=None):
    dims = ParallelDims(dp=world // ep, ep=ep)
    pm = build_mesh(dims, "cpu")
    if hosts:  # where the ranks "run": EP groups across hosts exchange with receives first
        from moemesh.parallel import comm

        comm.set_rank_hosts(hosts)
        assert comm._receives_first(pm.ep_group)
    ep_ranks = dist.get_process_group_ranks(pm.ep_group)
    cfg = ModelConfig(
        name="t",
        hidden_size=24,
        num_experts=8,
        top_k=2,
        moe_ffn_hidden_size=20,
        shared_expert_ffn_size=12 if shared else 0,
        aux_loss_factor=0.5,  # large enough that a wrong balance-loss gradient shows
        z_loss_factor=0.1,
    )
    B, S, D = 2, 5, cfg.hidden_size  # 10 tokens per rank: an odd split over 8 experts
    gen = torch.Generator().manual_seed(7)
    x_all = torch.randn(ep * B, S, D, generator=gen)
    g_all = torch.randn(ep * B, S, D, generator=gen)
    me = ep_ranks.index(rank)
    # Reference: one EP=1 layer on the whole EP group's batch.
    ref = _layer(cfg, None, None)
    x_ref = x_all.clone().requires_grad_()
    out_ref, st_ref = ref(x_ref)
    (out_ref * g_all).sum().backward()  # and the weighted balance losses attached to out_ref
    # EP layer on this rank's slice; statistics over the EP group.
    lay = _layer(cfg, pm.ep_group, pm.ep_group, ops)
    sl = slice(me * B, (me + 1) * B)
    x = x_all[sl].clone().requires_grad_()
    # Mean of the per-rank surrogates is the global aux loss; z is a per-rank mean: the
    # balance losses enter each rank's backward with 1/ep.
    out, st = lay(x, loss_scale=1 / ep)
    (out * g_all[sl]).sum().backward()

    torch.testing.assert_close(out, out_ref[sl], **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad[sl], **TOL)
    aux = st.losses.aux_loss.detach().clone()
    dist.all_reduce(aux, group=pm.ep_group)
    torch.testing.assert_close(aux / ep, st_ref.losses.aux_loss.detach(), **TOL)
    e = cfg.num_experts // ep
    own = slice(pm.ep_rank * e, (pm.ep_rank + 1) * e)
    for name in ("w1_eDF", "w3_eDF", "w2_eFD"):
        torch.testing.assert_close(getattr(lay.experts, name).grad, getattr(ref.experts, name).grad[own], **TOL)
    for (name, p), (_, p_ref) in zip(lay.named_parameters(), ref.named_parameters()):
        if "experts" in name:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad, group=pm.ep_group)  # what the data-group reduction does
        torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def _check_dispatcher(rank, world, ep, K, route):
    dims = ParallelDims(dp=world // ep, ep=ep)
    pm = build_mesh(dims, "cpu")
    E, T, D = 8, 9, 4
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    if route == "all_to_expert_0":
        ids = torch.zeros(T, K, dtype=torch.long) + torch.arange(K)  # experts 0..K-1 only
    else:  # uneven, rank-dependent
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        ids[: rank + 1] = torch.arange(K)  # pile extra load on the first experts
    w = torch.rand(T, K, generator=gen, requires_grad=True)
    disp = AllToAllDispatcher(num_experts=E, ep_group=pm.ep_group)
    rows, meta = disp.dispatch(x, ids)
    e = E // ep
    local_ids = torch.repeat_interleave(torch.arange(e), meta.tokens_per_expert_e)
    scale = (pm.ep_rank * e + local_ids + 1).float().unsqueeze(1)  # expert j multiplies by j+1
    out = disp.combine(rows * scale, w, meta)
    expected = (w.unsqueeze(-1) * (ids + 1).float().unsqueeze(-1) * x.unsqueeze(1)).sum(1)
    torch.testing.assert_close(out, expected, **TOL)
    g = torch.randn(T, D, generator=gen)
    (out * g).sum().backward()
    x_r, w_r = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ((w_r.unsqueeze(-1) * (ids + 1).float().unsqueeze(-1) * x_r.unsqueeze(1)).sum(1) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_r.grad, **TOL)
    torch.testing.assert_close(w.grad, w_r.grad, **TOL)
    if route == "all_to_expert_0" and pm.ep_rank > 0 and K <= e:
        assert int(meta.tokens_per_expert_e.sum()) == 0  # experts with zero tokens


def _check_exchange(rank, world):
    """exchange_rows against all_to_all_single: uneven splits with zeros, several exchanges in
    flight at once (each its own tag). Across hosts (two "hosts" here, by the names given to
    set_rank_hosts) every receive is posted before any send; on one host it is torch's
    collective."""
    from unittest import mock

    from moemesh.parallel import comm

    gen = torch.Generator().manual_seed(11)
    splits = torch.randint(0, 4, (world, world), generator=gen).tolist()  # splits[i][j]: rows i sends j
    splits[0][1] = splits[1][0] = 0
    ins, outs = splits[rank], [splits[j][rank] for j in range(world)]
    xs = [torch.randn(sum(ins), 3, generator=torch.Generator().manual_seed(rank * 10 + k)) for k in range(3)]
    expected = []
    for x in xs:
        y = x.new_empty(sum(outs), 3)
        dist.all_to_all_single(y, x, outs, ins)
        expected.append(y)
    ranks = list(range(world))
    for group, hosts in ((None, [f"h{r % 2}" for r in ranks]), (dist.new_group(ranks), ["h"] * world)):
        comm.set_rank_hosts(hosts)
        calls = []
        real = {name: getattr(dist, name) for name in ("isend", "irecv")}
        spies = {
            name: lambda *a, _n=name, _calls=calls, _real=real, **k: _calls.append(_n) or _real[_n](*a, **k)
            for name in real
        }
        with (
            mock.patch.object(dist, "isend", spies["isend"]),
            mock.patch.object(dist, "irecv", spies["irecv"]),
        ):
            got = [x.new_empty(sum(outs), 3) for x in xs]
            works = [comm.exchange_rows(y, x, outs, ins, group, async_op=True) for y, x in zip(got, xs)]
        for work in reversed(works):
            work.wait()
        for y, e in zip(got, expected):
            assert torch.equal(y, e)
        if group is not None:
            assert calls == []  # one host: all_to_all_single
            continue
        per_exchange = len(calls) // len(xs)
        peers = [j for j in range(world) if j != rank]
        assert per_exchange == sum(1 for j in peers if outs[j]) + sum(1 for j in peers if ins[j])
        for k in range(len(xs)):
            one = calls[k * per_exchange : (k + 1) * per_exchange]
            assert one == sorted(one, key=lambda c: c != "irecv"), one  # receives first


def _all_checks(rank, world):
    _check_exchange(rank, world)
    _check_layer(rank, world, 4, True, hosts=["n1", "n1", "n2", "n2"])
    for ep in (2, 4):
        for shared in (False, True):
            _check_layer(rank, world, ep, shared)
        for K in (1, 4):
            for route in ("uneven", "all_to_expert_0"):
                _check_dispatcher(rank, world, ep, K, route)


def test_moe_layer_and_dispatcher_ep2_ep4_equal_ep1():
    run_on_ranks(_all_checks, 4)


def _triton_checks(rank, world):
    _check_layer(rank, world, 2, True, TRITON_OPS)


@pytest.mark.skipif(not can_run_triton("cpu"), reason="Triton kernels need TRITON_INTERPRET=1 on CPU")
def test_moe_layer_ep2_with_triton_kernels_equals_ep1_torch():
    run_on_ranks(_triton_checks, 2)
