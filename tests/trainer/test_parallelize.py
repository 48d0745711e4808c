"""The layout is applied from outside (trainer/parallelize.py): the model is built whole with
global shapes on the meta device, and apply_pp/tp/ep slice it, without allocating memory, to
exactly the shapes and tags each rank holds. No constructor under moemesh/moe takes a layout."""

import dataclasses
import inspect

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from moemesh.moe import dispatcher, experts, layer, model, router
from moemesh.moe.config import ModelConfig
from moemesh.moe.model import Transformer
from moemesh.parallel.dims import MeshAxis, ParallelDims
from moemesh.parallel.mesh import build_mesh
from moemesh.parallel.tags import EXPERT_SHARD, GRAD_GROUP, TP_SHARD
from moemesh.trainer.parallelize import apply_ep, apply_pp, apply_tp, grad_reducer, param_groups

CFG = ModelConfig(
    name="t",
    vocab_size=101,
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=64,
    moe_ffn_hidden_size=24,
    num_experts=8,
    top_k=2,
    moe_every_k_layers=2,
    max_seq_len=16,
)


def test_no_module_constructor_under_moe_takes_a_layout():
    """The modules are built from the model config alone (the dispatcher, not a module, is the
    All-to-All's own object and may be handed its group)."""
    for mod in (model, layer, experts, router, dispatcher):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and issubclass(cls, torch.nn.Module):
                params = set(inspect.signature(cls.__init__).parameters)
                assert not params & {"parallel", "ep_group", "tp_group", "meter", "stats_group", "ops"}, (cls, params)


def _rank_model(dims: ParallelDims, rank: int, sequence_parallel: bool = False) -> Transformer:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        pm = build_mesh(dims, "cpu")
        with torch.device("meta"):
            m = Transformer(CFG)
        assert all(p.is_meta for p in m.parameters())
        apply_pp(
            m,
            range(0, 2) if pm.coords[MeshAxis.PP] == 0 and dims.pp == 2 else range(2, 4) if dims.pp == 2 else range(4),
        )
        apply_tp(m, pm.tp_group, sequence_parallel=sequence_parallel)
        apply_ep(m, pm.ep_group)
        return m
    finally:
        dist.destroy_process_group()


def test_whole_model_has_global_shapes():
    with torch.device("meta"):
        m = Transformer(CFG)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["embed.weight"] == (101, 32) and shapes["head.weight"] == (101, 32)
    assert shapes["layers.1.moe.experts.w1_eDF"] == (8, 32, 24)
    assert shapes["layers.0.attn.wk.weight"] == (16, 32)  # 2 kv heads x 8


def test_tp2_ep2_pp2_slices_on_the_meta_device():
    dims = ParallelDims(ep=2, tp=2, pp=2)
    last = dims.rank_of({MeshAxis.PP: 1, MeshAxis.DP: 0, MeshAxis.EP: 1, MeshAxis.TP: 1})
    m = _rank_model(dims, last)
    assert all(p.is_meta for p in m.parameters())
    assert sorted(m.layers) == ["2", "3"] and m.embed is None and m.head is not None and not m.first and m.last
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["head.weight"] == (51, 32)  # vocab 101 padded to 102, half of it
    assert getattr(m.head.weight, TP_SHARD) == (0, 101)
    assert shapes["layers.3.moe.experts.w1_eDF"] == (4, 32, 24)  # experts 4..7 of 8
    assert getattr(m.layers["3"].moe.experts.w2_eFD, EXPERT_SHARD) == 4
    assert shapes["layers.2.attn.wq.weight"] == (16, 32) and shapes["layers.2.attn.wo.weight"] == (32, 16)
    assert (m.layers["2"].attn.H, m.layers["2"].attn.G) == (2, 1)
    assert shapes["layers.2.ffn.w2.weight"] == (32, 32)
    assert getattr(m.layers["3"].moe.router.weight_ED, GRAD_GROUP) == "data_tp"
    assert m.layers["3"].moe.dispatcher.ep_size == 2 and m.layers["3"].moe.tp == 2


def test_sequence_parallel_marks_the_norms():
    m = _rank_model(ParallelDims(tp=2), 0, sequence_parallel=True)
    norms = [p for n, p in m.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(getattr(p, GRAD_GROUP, None) == "data_tp" for p in norms)
    assert m.sp


def test_gradients_seen_by_one_tp_rank_are_summed_over_tp_too():
    """The router and the sequence-parallel norms see a TP rank's slice of the tokens: their
    gradients go over dp x ep x tp; the rest over dp x ep, the experts over their own group."""
    dims = ParallelDims(dp=2, tp=2)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world_size)
    try:
        pm = build_mesh(dims, "cpu")
        with torch.device("meta"):
            m = Transformer(CFG)
        apply_tp(m, pm.tp_group, sequence_parallel=True)
        apply_ep(m, pm.ep_group)
        reduced: dict[int, object] = {}
        for bucket, group in grad_reducer(param_groups(m), pm).plan:
            reduced.update((id(p), group) for p in bucket)
        assert len(reduced) == len(list(m.parameters()))
        block = m.layers["1"]
        assert reduced[id(block.moe.router.weight_ED)] is pm.data_tp_group
        assert reduced[id(block.attn_norm.weight)] is pm.data_tp_group
        assert reduced[id(block.attn.wq.weight)] is pm.data_group
        assert reduced[id(block.moe.experts.w1_eDF)] is pm.expert_grad_group
        assert pm.data_tp_group is not pm.data_group
    finally:
        dist.destroy_process_group()


def test_the_grad_norm_counts_a_tied_embedding_once_under_pp():
    """Under PP the last stage holds the tied matrix as its head and the first as its lookup:
    counted on both, the norm (and so the clipping) would see its gradient twice."""
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    with torch.device("meta"):
        last, first = Transformer(cfg), Transformer(cfg)
    apply_pp(last, range(2, 4))
    apply_pp(first, range(0, 2))
    assert last.tied_copy and last.embed is not None
    counted = param_groups(last)
    assert all(p is not last.embed.weight for p in counted.replicated + counted.tp_sharded)
    assert any(p is last.embed.weight for p in counted.data)  # still reduced, as the head's share
    counted = param_groups(first)
    assert any(p is first.embed.weight for p in counted.replicated)
