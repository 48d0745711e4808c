"""After reduction, every rank's gradients equal single-process gradients on the global batch,
parameter by parameter (shards compared with the matching slice)."""

from unittest import mock

import pytest
import torch

import moemesh.parallel.tp as tp_module
from moemesh.parallel.dims import MeshAxis, ParallelDims
from moemesh.parallel.grads import global_grad_norm
from moemesh.parallel.mesh import build_mesh, single_rank_mesh
from moemesh.parallel.tp import TP_SHARD
from moemesh.trainer.data import TokenData, prepare_data
from moemesh.trainer.parallelize import build_model, grad_reducer, param_groups
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run

pytestmark = pytest.mark.slow  # spawns gloo ranks

TOL = dict(rtol=1e-5, atol=1e-6)
# Under bf16 autocast: each gradient within this share of its largest entry of the same layout's
# with TP's collectives at the tensors' own widths (the backward's bf16 sums round; a collective
# lost or summed twice is 0.5 or more).
BF16_SHARE = 3e-2


def _grads(run, mesh, data_rank, data_size):
    model = build_model(run, mesh, torch.device("cpu"))
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    per_rank = run.trainer.global_batch_size // data_size
    x, y = TokenData(paths, seed=1).batch(
        "train",
        0,
        global_batch=run.trainer.global_batch_size,
        seq_len=run.trainer.seq_len,
        start=data_rank * per_rank,
        count=per_rank,
    )
    out = model(x, y)
    out.loss.backward()  # the MoE layers' weighted balance losses ride on their outputs
    g = param_groups(model)
    assert mesh.dims.data_size == data_size
    grad_reducer(g, mesh).reduce()
    norm = global_grad_norm(
        replicated=g.replicated,
        tp_sharded=g.tp_sharded,
        expert=g.expert,
        tp_group=mesh.tp_group,
        ep_group=mesh.ep_group,
    )
    return model, norm, out.loss.detach()


def _check(rank, world, dp, ep, tp, sp, gate=False, bf16=False, shared=True):
    over = {
        "model.shared_expert_ffn_size": 16 if shared else 0,
        "model.shared_expert_gate": gate,
        "model.aux_loss_factor": 0.5,  # large enough that a wrong balance-loss gradient shows
        "model.z_loss_factor": 0.1,
        "trainer.global_batch_size": 4,
        "data.name": "stdlib",
        "data.kind": "stdlib",
    }
    dims = ParallelDims(dp=dp, ep=ep, tp=tp)
    mesh = build_mesh(dims, "cpu")
    run = tiny_run(
        **over,
        **{
            "parallel.data_parallel_size": dp,
            "parallel.expert_parallel_size": ep,
            "parallel.tensor_parallel_size": tp,
            "parallel.sequence_parallel": sp,
        },
    )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model, norm, loss = _grads(run, mesh, mesh.data_rank, dims.data_size)
        if bf16:  # the same layout, TP's collectives at the tensors' own widths (no routing flip)
            with mock.patch.object(tp_module, "wire_dtype", new=lambda x: None):
                ref, ref_norm, ref_loss = _grads(run, mesh, mesh.data_rank, dims.data_size)
        else:
            ref, ref_norm, ref_loss = _grads(tiny_run(**over), single_rank_mesh(), 0, 1)
    ref_params = dict(ref.named_parameters())
    c = dims.coords(rank)
    if bf16:
        assert loss == ref_loss  # the forward's values are the same: a bf16 gather carries what the products read
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        if bf16:
            share = ((p.grad - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()  # rows no token reads: 0
            assert p.grad.dtype == torch.float32 and share < BF16_SHARE, (name, share)
            continue
        if ".experts." in name:
            e = p.shape[0]
            r = r[c[MeshAxis.EP] * e : (c[MeshAxis.EP] + 1) * e]
        elif getattr(p, TP_SHARD, None) is not None and tp > 1:
            dim = getattr(p, TP_SHARD)[0]
            r = r.chunk(tp, dim=dim)[c[MeshAxis.TP]]
        torch.testing.assert_close(p.grad, r, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(norm, ref_norm, **(dict(rtol=1e-3, atol=0.0) if bf16 else TOL))


# tp2 without SP: the shared expert's collectives carry the routed rows' (parallel.tp:
# split_and_copy_to_tp, reduce_with_rows), gated or not (a gate's gradient is then partial over tp).
@pytest.mark.parametrize(
    "dp,ep,tp,sp,gate",
    [(1, 1, 2, False, False), (1, 1, 2, False, True), (1, 1, 2, True, False), (1, 2, 1, False, False)],
)
def test_reduced_gradients_equal_single_process(dp, ep, tp, sp, gate):
    run_on_ranks(_check, dp * ep * tp, dp, ep, tp, sp, gate)


# Under bf16 autocast TP's collectives of what the residual stream's readers read move in bf16
# (parallel.tp.wire_dtype): the forward's values are the same, the backward's sums rounded.
@pytest.mark.parametrize(
    ("sp", "shared"), [(False, False), (False, True), (True, True)], ids=["tp2", "tp2_gated", "tp2_sp_gated"]
)
def test_bf16_tp_collectives_keep_the_forward_and_round_only_the_backwards_sums(sp, shared):
    run_on_ranks(_check, 2, 1, 1, 2, sp, shared, True, shared)
