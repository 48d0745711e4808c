"""Routing of current models, each option off by default and each tested: DeepSeek-V3's
group-limited top-k and routed scaling factor against transformers' DeepseekV3TopkRouter (the
same expert ids and weights on the same weights and inputs), in the torch reference and the Triton
kernel (interpreted here) with their gradients; the EP-rank- and node-limited routing's groups;
the fan-out statistic; and the one-line refusals."""

from __future__ import annotations

import pytest
import torch

from moemesh.config.validate import routing_groups, validate_run
from moemesh.errors import ConfigError
from moemesh.kernels import TORCH_OPS, TRITON_OPS
from moemesh.kernels._triton import can_run_triton, interpreting
from moemesh.kernels.gating import gating_reference, gating_triton
from moemesh.moe.config import ModelConfig
from moemesh.moe.dispatcher import AllToAllDispatcher
from moemesh.moe.router import Router
from moemesh.parallel.dims import ParallelDims
from tests.helpers import tiny_run

# The Triton kernel runs interpreted on this CPU (TRITON_INTERPRET=1, tests/conftest.py) and
# compiled on a GPU with TRITON_INTERPRET=0, where its cases carry the gpu marker (`-m gpu`).
DEVICE = "cpu" if interpreting() else "cuda"
TRITON_HERE = can_run_triton(DEVICE)
GPU = [pytest.mark.gpu] if DEVICE == "cuda" else []
on_gpu_marked = pytest.mark.gpu if DEVICE == "cuda" else (lambda f: f)
BACKENDS = [pytest.param(TORCH_OPS, id="torch")] + (
    [pytest.param(TRITON_OPS, id="triton", marks=GPU)] if TRITON_HERE else []
)


def _hf_router(E=16, K=4, groups=4, topk_groups=2, scale=2.5, D=32):
    pytest.importorskip("transformers")  # a GPU check's machine may not have it
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_group=groups,
        topk_group=topk_groups,
        norm_topk_prob=True,
        routed_scaling_factor=scale,
    )
    router = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.05)
    return router


@pytest.mark.parametrize("ops", BACKENDS)
@pytest.mark.parametrize(("groups", "topk_groups", "scale"), [(4, 2, 2.5), (8, 3, 1.0), (1, 1, 1.8), (2, 1, 0.4)])
def test_group_limited_routing_and_scaling_match_deepseek_v3(ops, groups, topk_groups, scale):
    E, K, D, T = 16, 4, 32, 37
    hf = _hf_router(E, K, groups, topk_groups, scale, D)
    ours = Router(
        hidden_size=D,
        num_experts=E,
        top_k=K,
        renormalize=True,
        score_func="sigmoid",
        bias_update_rate=1e-3,  # keeps an expert bias: DeepSeek-V3's e_score_correction_bias
        n_groups=groups,
        topk_groups=topk_groups,
        scale=scale,
    )
    ours.ops = ops
    with torch.no_grad():
        ours.weight_ED.copy_(hf.weight)
        ours.expert_bias_E.copy_(hf.e_score_correction_bias)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    _, hf_weights, hf_ids = hf(x)
    device = DEVICE if ops is TRITON_OPS else "cpu"
    gate, _ = ours.to(device)(x.to(device))
    gate = type(gate)(
        *(t.cpu() for t in (gate.topk_ids_TK, gate.topk_weights_TK, gate.counts_E, gate.score_sum_E, gate.lse_T))
    )
    # transformers' top-k is unsorted: compare each token's (id, weight) pairs by id.
    hf_order, our_order = hf_ids.argsort(dim=1), gate.topk_ids_TK.argsort(dim=1)
    assert torch.equal(hf_ids.gather(1, hf_order), gate.topk_ids_TK.gather(1, our_order))
    torch.testing.assert_close(
        gate.topk_weights_TK.gather(1, our_order), hf_weights.gather(1, hf_order), rtol=1e-5, atol=1e-6
    )
    if groups > 1:  # each token's experts in at most topk_groups groups
        reached = [len(set((ids // (E // groups)).tolist())) for ids in gate.topk_ids_TK]
        assert max(reached) <= topk_groups


@pytest.mark.skipif(not TRITON_HERE, reason=f"Triton cannot run on {DEVICE} here")
@pytest.mark.parametrize(("score", "bias"), [("softmax", False), ("sigmoid", True)])
@on_gpu_marked
def test_the_kernel_and_the_reference_agree_with_groups_and_scale(score, bias):
    """The same ids, weights, statistics and logit gradients (the kernel takes the reference's
    group mask; its weights and their gradient carry the scale)."""
    T, E, K = 29, 32, 6
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=gen).to(DEVICE)
    b = (torch.randn(E, generator=gen) * 0.1).to(DEVICE) if bias else None
    g_w = torch.randn(T, K, generator=gen).to(DEVICE)
    g_s = torch.randn(E, generator=gen).to(DEVICE)  # not all ones: the normalised sigmoid sums to T
    outs = []
    for fn in (gating_reference, gating_triton):
        x = logits.clone().requires_grad_()
        g = fn(x, top_k=K, renormalize=True, score_func=score, expert_bias_E=b, n_groups=8, topk_groups=3, scale=1.7)
        ((g.topk_weights_TK * g_w).sum() + g.lse_T.square().sum() + (g.score_sum_E * g_s).sum()).backward()
        outs.append((g, x.grad))
    (ref, dref), (got, dgot) = outs
    assert torch.equal(got.topk_ids_TK, ref.topk_ids_TK) and torch.equal(got.counts_E, ref.counts_E)
    torch.testing.assert_close(got.topk_weights_TK, ref.topk_weights_TK, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.score_sum_E, ref.score_sum_E, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgot, dref, rtol=1e-4, atol=1e-5)


def test_fanout_counts_the_ep_ranks_a_token_reaches():
    d = AllToAllDispatcher(num_experts=8)
    d.num_local_experts = 2  # as on 4 EP ranks: experts 0-1 on rank 0, 2-3 on rank 1, ...
    ids = torch.tensor([[0, 1, 2], [0, 2, 4], [6, 7, -1], [-1, -1, -1], [1, 3, 5]])
    # reaches: 2 ranks, 3 ranks, 1 rank (a dropped pair reaches none), none, 3 ranks
    assert d.fanout(ids).tolist() == [1, 1, 1, 2]


def test_router_groups_without_a_group_count_allow_every_group_and_a_limit_sets_both():
    """``topk_groups`` unset (model.router_topk_groups: null) means every group: the routing of no
    groups at all. ``limit_groups(n_groups, topk_groups)`` (the EP-rank limit) keeps each token's
    experts in topk_groups of the n_groups runs."""
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    routers = [Router(hidden_size=16, num_experts=8, top_k=2, renormalize=True, n_groups=g) for g in (1, 4)]
    for r in routers:
        with torch.no_grad():
            r.weight_ED.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)))
    plain, every_group = (r(x)[0].topk_ids_TK for r in routers)
    assert torch.equal(every_group, plain)
    limited = routers[0]
    limited.limit_groups(4, 1)  # 4 groups of 2 experts, one group per token
    ids = limited(x)[0].topk_ids_TK
    assert torch.equal(ids[:, 0] // 2, ids[:, 1] // 2)
    assert not torch.equal(plain[:, 0] // 2, plain[:, 1] // 2)  # the limit changed something


def _limited(**overrides):
    return tiny_run(**{"model.num_experts": 8, "model.top_k": 2, **overrides})


def test_rank_and_node_limits_take_their_groups_from_the_layout():
    run = _limited(**{"model.max_ranks_per_token": 2})
    assert routing_groups(run, ParallelDims(ep=4)) == (4, 2)
    assert routing_groups(run, ParallelDims(ep=4, dp=2)) == (4, 2)  # the same on any layout with ep4
    nodes = _limited(**{"model.max_nodes_per_token": 1, "cluster.gpus_per_node": 2})
    assert routing_groups(nodes, ParallelDims(ep=4)) == (2, 1)  # 4 EP ranks on 2 nodes of 2
    assert routing_groups(nodes, ParallelDims(ep=4, tp=2)) == (4, 1)  # tp2: one EP rank per node


@pytest.mark.parametrize(
    ("overrides", "dims", "needle"),
    [
        # one group: no value below it exists, so the fix is the layout (it said "set it below 1")
        ({"model.max_ranks_per_token": 1}, {}, "nothing to limit; it needs a layout with parallel.expert_parallel_s"),
        ({"model.max_ranks_per_token": 2}, {"ep": 2}, "nothing to limit; set it below 2"),
        ({"model.max_ranks_per_token": 1, "model.top_k": 4}, {"ep": 4}, "1 x 2 experts per EP rank = 2 experts"),
        (
            {"model.max_nodes_per_token": 1, "cluster.gpus_per_node": 8},
            {"ep": 4},
            "1 node(s) in its EP group: nothing to limit; it needs an EP group over several nodes (cluster.gpus_per_n",
        ),
        ({"model.max_nodes_per_token": 1, "cluster.gpus_per_node": 3}, {"ep": 4}, "does not split evenly over nodes"),
    ],
)
def test_limits_that_limit_nothing_are_refused_in_one_line(overrides, dims, needle):
    degrees = {"dp": 1, "ep": 1, **dims}
    name = "_".join(f"{a}{n}" for a, n in (("ep", degrees["ep"]), ("dp", degrees["dp"])) if n > 1) or "single"
    run = _limited(
        **{
            "parallel.name": name,
            "parallel.expert_parallel_size": degrees["ep"],
            "parallel.data_parallel_size": degrees["dp"],
            **overrides,
        }
    )
    with pytest.raises(ConfigError) as err:
        validate_run(run)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"router_groups": 3}, "model.router_groups=3 must divide model.num_experts=8"),
        ({"router_groups": 4, "router_topk_groups": 5}, "model.router_topk_groups=5 must be <= model.router_groups=4"),
        ({"router_groups": 8, "router_topk_groups": 1}, "= 1 experts must be >= model.top_k=2"),
        ({"routed_scaling_factor": 0.0}, "model.routed_scaling_factor=0.0 must be a finite number > 0"),
        ({"router_groups": 2, "max_ranks_per_token": 1}, "model.router_groups and model.max_ranks_per_token both"),
    ],
)
def test_routing_fields_are_checked_where_defined(fields, needle):
    with pytest.raises(ConfigError) as err:
        ModelConfig(name="t", num_experts=8, top_k=2, **fields)
    assert needle in str(err.value)


def test_every_option_is_off_by_default():
    cfg = ModelConfig(name="t")
    assert (cfg.router_groups, cfg.router_topk_groups, cfg.routed_scaling_factor) == (1, None, 1.0)
    assert cfg.max_ranks_per_token is None and cfg.max_nodes_per_token is None
    logits = torch.randn(5, 8)
    plain = gating_reference(logits, top_k=2, renormalize=True)
    same = gating_reference(logits, top_k=2, renormalize=True, n_groups=1, topk_groups=1, scale=1.0)
    assert torch.equal(plain.topk_ids_TK, same.topk_ids_TK) and torch.equal(plain.topk_weights_TK, same.topk_weights_TK)
