"""Apply the run's layout to the model, once, from the mesh and the run's config.

Everything the model needs to know about the layout is decided here and nowhere
else: which layers this pipeline stage holds, the process groups (EP, TP, the
group the load-balance statistics are reduced over), the kernels, the All-to-All
overlap; then how each parameter's gradient is reduced. The model receives it as
one ``ParallelContext``; its forward reads as the math.

The model is built on the meta device (no memory, no initialisation), materialised
on the run's device, then initialised by (seed, global parameter name): every
layout starts from the same weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moemesh.config.schema import RunConfig
from moemesh.config.validate import grad_accum_steps, micro_batch_size
from moemesh.kernels import get_ops
from moemesh.moe.context import ParallelContext
from moemesh.moe.model import Transformer
from moemesh.parallel.comm import CommMeter
from moemesh.parallel.dims import MeshAxis
from moemesh.parallel.fsdp import ExposedReduceTimer, apply_fsdp
from moemesh.parallel.grads import GradReducer
from moemesh.parallel.mesh import ParallelMesh
from moemesh.parallel.pipeline import build_schedule, stage_layers, stage_module_of
from moemesh.parallel.recompute import apply_activation_checkpointing
from moemesh.parallel.tags import GRAD_GROUP, TP_SHARD, expert_first_id
from moemesh.parallel.tp import vocab_parallel_cross_entropy


def parallel_context(
    run: RunConfig, mesh: ParallelMesh, device: torch.device, meter: CommMeter | None = None
) -> ParallelContext:
    """The layout as the model sees it on this rank."""
    comm = run.parallel.comm_optimization
    return ParallelContext(
        ep_group=mesh.ep_group,
        tp_group=mesh.tp_group,
        sequence_parallel=run.parallel.sequence_parallel,
        stats_group=mesh.data_tp_group if run.model.load_balance_scope == "global" else None,
        ops=get_ops(run.kernels.backend, device.type),
        meter=meter,
        overlap_chunks=comm.overlap_chunks if comm.all_to_all_overlap else 0,
    )


def stage_layer_ids(run: RunConfig, mesh: ParallelMesh) -> range:
    """The global layer ids this rank's pipeline stage holds (all of them without PP)."""
    if mesh.dims.pp == 1:
        return range(run.model.num_layers)
    return stage_layers(run.model.num_layers, mesh.dims.pp, run.parallel.pipeline_split)[mesh.coords[MeshAxis.PP]]


def build_model(
    run: RunConfig, mesh: ParallelMesh, device: torch.device, meter: CommMeter | None = None
) -> Transformer:
    """This rank's part of the model, laid out for ``mesh`` and initialised from ``run.trainer.seed``."""
    with torch.device("meta"):
        model = Transformer(
            run.model, parallel=parallel_context(run, mesh, device, meter), layers=stage_layer_ids(run, mesh)
        )
    materialize(model, device)
    model.init_weights(run.trainer.seed)
    apply_activation_checkpointing(model.layers, run.trainer.activation_checkpointing)
    return model


def compute_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the run computes in it (trainer.dtype bf16, or auto on CUDA); None: fp32."""
    dtype = run.trainer.dtype
    return torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and device.type == "cuda") else None


@dataclass
class Sharded:
    """What the sharded modes add: the FSDP root (the model, or with PP the stage module the
    schedule calls) and the timer of the exposed gradient reduction."""

    root: torch.nn.Module
    timer: ExposedReduceTimer


def shard_model(run: RunConfig, mesh: ParallelMesh, model: Transformer, device: torch.device) -> Sharded | None:
    """Apply ``parallel.sharding`` (zero2 / zero3 on FSDP2; see ``parallel.fsdp``); None for none.

    Under mixed precision (bf16 on CUDA) the gathered parameters are bf16 for compute; the
    sharded master weights, the gradient reduction and AdamW's state stay fp32.
    """
    if run.parallel.sharding == "none":
        return None
    root = stage_module_of(model) if mesh.dims.pp > 1 else model
    timer = ExposedReduceTimer(device)
    apply_fsdp(
        root,
        list(model.layers.values()),
        mesh.shard_meshes(),
        mode=run.parallel.sharding,
        param_dtype=compute_dtype(run, device),
        timer=timer,
        force_sum=device.type != "cuda",
    )
    return Sharded(root, timer)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model's tensors on ``device`` (values unset), keeping the
    parameter tags (``parallel.tags``): ``to_empty`` makes new Parameter objects."""
    tags = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        for key, value in tags[name].items():
            setattr(p, key, value)


@dataclass
class ParamGroups:
    """The model's parameters by how their gradients are reduced and counted (from their tags)."""

    data: list  # summed over dp x ep
    data_tp: list  # summed over dp x ep x tp (router; sequence-parallel norms)
    expert: list  # summed over dp x tp
    tp_sharded: list  # for the grad norm: sharded over tp
    replicated: list  # for the grad norm: whole on every rank, not experts


def param_groups(model: Transformer) -> ParamGroups:
    params = list(model.parameters())
    expert = [p for p in params if expert_first_id(p) is not None]
    rest = [p for p in params if expert_first_id(p) is None]
    data_tp = [p for p in rest if getattr(p, GRAD_GROUP, "data") == "data_tp"]
    data = [p for p in rest if getattr(p, GRAD_GROUP, "data") == "data"]
    tp_sharded = [p for p in rest if getattr(p, TP_SHARD, None) is not None and model.tp_group is not None]
    sharded_ids = {id(p) for p in tp_sharded}
    replicated = [p for p in rest if id(p) not in sharded_ids]
    return ParamGroups(data, data_tp, expert, tp_sharded, replicated)


def grad_reducer(groups: ParamGroups, mesh: ParallelMesh) -> GradReducer:
    """The gradient-reduction plan: each parameter group summed over its process group."""
    return GradReducer(
        [(groups.data, mesh.data_group), (groups.data_tp, mesh.data_tp_group), (groups.expert, mesh.expert_grad_group)],
        data_size=mesh.dims.data_size,
    )


def _stage_loss(logits, target, *, model: Transformer):
    return vocab_parallel_cross_entropy(
        logits.flatten(0, 1), target.flatten(), group=model.tp_group, vocab_size=model.cfg.vocab_size
    )


def pipeline_schedule(run: RunConfig, mesh: ParallelMesh, model: Transformer, device: torch.device, stage_module=None):
    """This stage's pipeline schedule over the rank's micro-steps, or None without PP."""
    if mesh.dims.pp == 1:
        return None
    seq_len = run.trainer.seq_len
    return build_schedule(
        model,
        schedule=run.parallel.pipeline_schedule,
        pp_rank=mesh.coords[MeshAxis.PP],
        pp_size=mesh.dims.pp,
        pp_group=mesh.pp_group,
        device=device,
        n_microbatches=grad_accum_steps(run),
        micro_batch=micro_batch_size(run),
        seq_len=seq_len,
        hidden_seq=seq_len // mesh.dims.tp if model.sp else seq_len,  # with SP a stage sends its sequence shard
        loss_fn=functools.partial(_stage_loss, model=model),
        stage_module=stage_module,
    )
