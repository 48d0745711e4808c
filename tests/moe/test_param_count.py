"""Memory follows the split: per-rank parameters of the real model equal the config's count,
and ``param_specs`` lists every parameter with its real name, shape and tags.

Each layout's model is built on the meta device for every rank, under a fake
process group (one process plays each rank in turn).
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from moemesh.moe.config import ModelConfig
from moemesh.moe.model import Transformer
from moemesh.moe.param_count import count_params, model_flops_per_token, param_specs, stage_flops_per_token
from moemesh.parallel.dims import MeshAxis, ParallelDims
from moemesh.parallel.mesh import build_mesh
from moemesh.parallel.pipeline import stage_layers
from moemesh.parallel.tags import EXPERT_SHARD, GRAD_GROUP, TP_SHARD
from moemesh.trainer.parallelize import apply_pp
from tests.helpers import laid_out

CFG = ModelConfig(
    name="t",
    vocab_size=250,
    hidden_size=64,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    ffn_hidden_size=96,
    moe_ffn_hidden_size=40,
    num_experts=8,
    top_k=2,
    moe_every_k_layers=2,
    shared_expert_ffn_size=32,
)
# Every option the released families need (moemesh/interop/hf), in two models: a head dim of its
# own, qk-norm over the projection, q/k/v biases, a gated shared expert, tied embeddings, RoPE on
# halves, a dense layer among the MoE ones; qk-norm per head, the first layers dense.
OPTIONS_A = dataclasses.replace(
    CFG,
    name="options_a",
    head_dim=16,
    qk_norm="full",
    qkv_bias=True,
    shared_expert_gate=True,
    tie_embeddings=True,
    rope_pairing="half",
    moe_every_k_layers=1,
    dense_layers=[1],
)
OPTIONS_B = dataclasses.replace(CFG, name="options_b", qk_norm="head", moe_every_k_layers=1, first_k_dense_layers=1)
CONFIGS = {"base": CFG, "options_a": OPTIONS_A, "options_b": OPTIONS_B}
LAYOUTS = {  # dp, ep, tp, pp
    "single": (1, 1, 1, 1),
    "ep2": (1, 2, 1, 1),
    "ep4_dp2": (2, 4, 1, 1),
    "tp2": (1, 1, 2, 1),
    "tp4": (1, 1, 4, 1),
    "tp2_ep2_dp2": (2, 2, 2, 1),
    "tp2_ep4": (1, 4, 2, 1),
    "pp2": (1, 1, 1, 2),
    "pp4": (1, 1, 1, 4),
    "pp2_tp2_ep2": (1, 2, 2, 2),
    "pp2_tp2_ep2_dp2": (2, 2, 2, 2),
}


def _meta_model(dims: ParallelDims, rank: int, *, sequence_parallel: bool = False, cfg=CFG) -> Transformer:
    """``rank``'s model of the layout, on the meta device."""
    stage = dims.coords(rank)[MeshAxis.PP]
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        pm = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = Transformer(cfg)
        apply_pp(model, stage_layers(cfg.num_layers, dims.pp)[stage])
        return laid_out(
            model,
            ep_group=pm.ep_group,
            stats_group=pm.data_tp_group,
            tp_group=pm.tp_group,
            sequence_parallel=sequence_parallel,
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_per_rank_parameters_are_the_expected_share(name, config):
    CFG = CONFIGS[config]
    dp, ep, tp, pp = LAYOUTS[name]
    dims = ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp)
    full = count_params(CFG)
    stages = [count_params(CFG, dims, stage=s) for s in range(pp)]
    for rank in range(dims.world_size):
        expected = stages[dims.coords(rank)[MeshAxis.PP]]
        model = _meta_model(dims, rank, cfg=CFG)
        expert = sum(p.numel() for p in model.expert_parameters())
        sharded = sum(p.numel() for p in model.non_expert_parameters() if getattr(p, TP_SHARD, None) is not None)
        replicated = sum(p.numel() for p in model.non_expert_parameters() if getattr(p, TP_SHARD, None) is None)
        assert (expert, sharded, replicated) == (expected.expert, expected.tp_sharded, expected.replicated), rank
    # The split itself: experts by EP (and layers by PP), the TP-sharded part by TP (vocab padded
    # to a multiple of tp), replicated norms and routers by layer.
    assert sum(s.expert for s in stages) * ep == full.expert
    # A tied embedding is held by the first and the last stage (the lookup and the head).
    tied_copy = CFG.vocab_size * CFG.hidden_size if CFG.tie_embeddings and pp > 1 else 0
    assert sum(s.replicated for s in stages) == full.replicated
    pad = (-CFG.vocab_size) % tp
    vocab_tensors = 1 if CFG.tie_embeddings else 2
    assert sum(
        s.tp_sharded for s in stages
    ) * tp == full.tp_sharded + vocab_tensors * pad * CFG.hidden_size + tied_copy + (
        pad * CFG.hidden_size if tied_copy else 0
    )


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("name", LAYOUTS)
def test_param_specs_are_the_real_parameters_with_their_tags(name, sp, config):
    """Names, order, shapes and the three tags of every parameter, on the first rank of each stage."""
    CFG = CONFIGS[config]
    dp, ep, tp, pp = LAYOUTS[name]
    dims = ParallelDims(dp=dp, ep=ep, tp=tp, pp=pp)
    for stage in range(pp):
        rank = next(r for r in range(dims.world_size) if dims.coords(r)[MeshAxis.PP] == stage)
        real = [
            (
                n,
                tuple(p.shape),
                hasattr(p, EXPERT_SHARD),
                (getattr(p, TP_SHARD, None) or (None,))[0],
                getattr(p, GRAD_GROUP, "data") == "data_tp",
            )
            for n, p in _meta_model(dims, rank, sequence_parallel=sp, cfg=CFG).named_parameters()
        ]
        specs = param_specs(CFG, dims, stage=stage, sequence_parallel=sp)
        assert [(s.name, s.shape, s.expert, s.tp_dim, s.data_tp) for s in specs] == real
        assert all(s.layer == (int(s.name.split(".")[1]) if s.name.startswith("layers.") else None) for s in specs)


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_stage_flops_add_up_to_the_models_and_the_experts_are_theirs(pp):
    from moemesh.moe.param_count import model_flops_per_token, stage_flops_per_token

    stages = [stage_flops_per_token(CFG, 32, pp, s) for s in range(pp)]
    assert sum(f.total for f in stages) == pytest.approx(model_flops_per_token(CFG, 32), rel=1e-12)
    # Routed experts: 6 x top-k of E experts' SwiGLU weights, in the MoE blocks (1 and 3) only.
    per_block = 6 * 3 * CFG.hidden_size * CFG.moe_ffn_hidden_size * CFG.top_k
    blocks = [stage_layers(CFG.num_layers, pp)[s] for s in range(pp)]
    assert [f.experts for f in stages] == [per_block * sum(l % 2 == 1 for l in b) for b in blocks]
    # The attention core: PaLM's 12 x hidden x sequence per block.
    assert [f.attention_core for f in stages] == [12 * CFG.hidden_size * 32 * len(b) for b in blocks]
    if pp > 1:  # the head makes the last stage the busiest
        assert stages[-1].total > stages[0].total


@pytest.mark.parametrize("name", CONFIGS)
def test_the_stages_flops_add_up_to_the_models(name):
    """The model's training FLOPs per token (the input embedding a lookup, unless tied, when it is
    also the head) are what its pipeline stages count, added up, on every split."""
    cfg, S = CONFIGS[name], 32
    whole = model_flops_per_token(cfg, S)
    for pp in (1, 2, 4):
        stages = [stage_flops_per_token(cfg, S, pp, s).total for s in range(pp)]
        assert sum(stages) == pytest.approx(whole, rel=1e-12), pp
