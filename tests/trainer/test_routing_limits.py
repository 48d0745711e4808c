"""EP-rank-limited routing over a training run (4 gloo ranks): with model.max_ranks_per_token=2 on
ep4 no token reaches more than 2 EP ranks in any step (the run's own metrics, a2a.fanout_max), and
the All-to-All sends fewer bytes than unlimited routing, which does reach more; and the limit
routes the same on every layout with the same EP degree (ep2_dp2 and pp2_ep2 train identically,
the latter with selective recompute).
In the same spawn: the by-rank dispatch the limit uses (moe/rank_dispatch.py) computes what the
pair-by-pair dispatcher computes (output, every gradient; dropless and with drops) and sends fewer
bytes."""

import json
from pathlib import Path

import pytest

from moemesh.parallel.dims import ParallelDims
from moemesh.trainer.data import prepare_data
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run
from tests.same_math import assert_same_run

pytestmark = pytest.mark.slow  # spawns gloo ranks

# name: (dp, ep, pp, max_ranks_per_token)
RUNS = {
    "ep4_m2": (1, 4, 1, 2),
    "ep4": (1, 4, 1, None),
    "ep2_dp2_m1": (2, 2, 1, 1),
    "pp2_ep2_m1": (1, 2, 2, 1),
    "ep4_n1": (1, 4, 1, None),  # node-limited: 1 of 2 nodes of cluster.gpus_per_node=2
}


def _cfg(name, dp, ep, pp, limit):
    return tiny_run(
        **{
            "parallel.name": name.removesuffix("_m2").removesuffix("_m1").removesuffix("_n1"),
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.pipeline_parallel_size": pp,
            "model.top_k": 4,  # so that unlimited routing can reach more than 2 of 4 EP ranks
            "model.max_ranks_per_token": limit,
            # pp2_ep2 also recomputes (selective): the by-rank dispatch's exchanges are replayed
            "trainer.activation_checkpointing": "selective" if pp > 1 else "none",
            "trainer.micro_steps": 2,
            "trainer.steps": 3,
            "data.name": "stdlib",
            "data.kind": "stdlib",
            **({"model.max_nodes_per_token": 1, "cluster.gpus_per_node": 2} if name.endswith("_n1") else {}),
        }
    )


def _by_rank_equals_pairs(rank, world, capacity):
    import torch

    from moemesh.moe.config import ModelConfig
    from moemesh.moe.layer import MoELayer
    from moemesh.parallel.comm import CommMeter
    from moemesh.parallel.mesh import build_mesh
    from moemesh.trainer.parallelize import apply_ep, apply_instrumentation, apply_load_balance_group

    pm = build_mesh(ParallelDims(ep=world), "cpu")
    cfg = ModelConfig(
        name="t", hidden_size=24, num_experts=8, top_k=4, moe_ffn_hidden_size=20, capacity_factor=capacity
    )
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(rank))
    g = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(100 + rank))
    results = []
    for by_rank in (False, True):
        torch.manual_seed(0)
        layer = MoELayer(cfg=cfg)
        apply_ep(layer, pm.ep_group)
        apply_load_balance_group(layer, pm.ep_group)
        apply_instrumentation(layer, CommMeter())
        layer.limit_routing(world, 2, by_rank=by_rank)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) + p.numel())) * 0.3)
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        (out * g).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results.append((out, xi.grad, grads, layer.dispatcher.meter.bytes_sent))
    (o0, x0, g0, b0), (o1, x1, g1, b1) = results
    # Only the order of additions into a token's output changes (by rank): fp32 rounding.
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
    assert b1 < b0, (b1, b0)  # each token once per rank, not once per pair


def _worker(rank, world, root, paths):
    from tests.helpers import train_rank

    for capacity in (None, 1.0):
        _by_rank_equals_pairs(rank, world, capacity)
    for name, (dp, ep, pp, limit) in RUNS.items():
        out = Path(root) / name
        out.mkdir(exist_ok=True)
        train_rank(_cfg(name, dp, ep, pp, limit), rank, ParallelDims(dp=dp, ep=ep, pp=pp), out, paths)


def _read(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_rank_limited_routing_caps_the_fanout_and_is_the_same_on_every_layout_of_its_ep(tmp_path):
    run = _cfg("ep4", 1, 4, 1, None)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    run_on_ranks(_worker, 4, str(tmp_path), paths)
    limited, free = _read(tmp_path / "ep4_m2"), _read(tmp_path / "ep4")
    assert all(r["a2a"]["fanout_max"] <= 2 for r in limited)
    assert all(r["load"][l]["fanout_max"] <= 2 for r in limited for l in r["load"])
    assert max(r["a2a"]["fanout_max"] for r in free) > 2  # the limit is doing something
    assert limited[0]["a2a"]["fanout_mean"] < free[0]["a2a"]["fanout_mean"]
    assert sum(r["a2a"]["bytes_sent"] for r in limited) < sum(r["a2a"]["bytes_sent"] for r in free)
    # One node of two EP ranks: each token's experts on at most 2 ranks, those of one node.
    assert all(r["a2a"]["fanout_max"] <= 2 for r in _read(tmp_path / "ep4_n1"))
    a, b = _read(tmp_path / "ep2_dp2_m1"), _read(tmp_path / "pp2_ep2_m1")
    # Two layouts: per step while routing is identical, stopping at a rounding flip (same_math).
    n = assert_same_run(a, b, "pp2_ep2_m1", min_steps=2, keys=("loss", "aux_loss", "grad_norm"))
    assert all(r["a2a"]["fanout_max"] == 1 for r in a + b)
    for x, y in zip(a[:n], b[:n], strict=True):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
        for layer, stats in x["load"].items():
            assert y["load"][layer]["tokens_per_expert"] == stats["tokens_per_expert"], (x["step"], layer)
            for key in ("aux_loss", "z_loss", "entropy", "fanout_mean"):
                assert y["load"][layer][key] == pytest.approx(stats[key], rel=1e-5), (x["step"], layer, key)
