"""Memory follows the split: per-rank parameters of the real model equal the config's count.

Each layout's model is built on the meta device for every rank, under a fake
process group (one process plays each rank in turn).
"""
import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from conf.schema import ModelConfig
from moe.model import Transformer
from moe.param_count import count_params
from parallel.dims import ParallelDims
from parallel.mesh import build_mesh
from parallel.tp import TP_SHARD

CFG = ModelConfig(name="t", vocab_size=250, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4,
                  ffn_hidden_size=96, moe_ffn_hidden_size=40, num_experts=8, top_k=2, moe_every_k_layers=2,
                  shared_expert_ffn_size=32)
LAYOUTS = {"single": (1, 1, 1), "ep2": (1, 2, 1), "ep4_dp2": (2, 4, 1), "tp2": (1, 1, 2),
           "tp4": (1, 1, 4), "tp2_ep2_dp2": (2, 2, 2), "tp2_ep4": (1, 4, 2)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_per_rank_parameters_are_the_expected_share(name):
    dp, ep, tp = LAYOUTS[name]
    dims = ParallelDims(dp=dp, ep=ep, tp=tp)
    expected = count_params(CFG, dims)
    full = count_params(CFG)
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            pm = build_mesh(dims, "cpu")
            with torch.device("meta"):
                model = Transformer(CFG, ep_rank=pm.ep_rank, ep_group=pm.ep_group, stats_group=pm.data_tp_group,
                                    tp_group=pm.tp_group if tp > 1 else None)
        finally:
            dist.destroy_process_group()
        expert = sum(p.numel() for p in model.expert_parameters())
        sharded = sum(p.numel() for p in model.non_expert_parameters() if getattr(p, TP_SHARD, None) is not None)
        replicated = sum(p.numel() for p in model.non_expert_parameters() if getattr(p, TP_SHARD, None) is None)
        assert (expert, sharded, replicated) == (expected.expert, expected.tp_sharded, expected.replicated), rank
    # The split itself: experts by EP, the TP-sharded part by TP (vocab padded to a multiple of tp).
    assert expected.expert * ep == full.expert
    assert expected.replicated == full.replicated
    pad = (-CFG.vocab_size) % tp
    assert expected.tp_sharded * tp == full.tp_sharded + 2 * pad * CFG.hidden_size
