"""Apply the run's layout to the model, once, from outside, in this order:

    Transformer(cfg) on the meta device        the whole model, global shapes, no memory
    apply_pp      this pipeline stage's layers (and the embedding / head if first / last)
    apply_tp      TP shards of attention, dense FFNs, embedding, head; MoE token split
    apply_ep      this EP rank's experts, the dispatcher's All-to-All group, overlap
    apply_load_balance_group   the group the balance statistics are reduced over
    apply_kernels the token-path kernels and the expert GEMMs
    materialize + init_weights   on the run's device, by (seed, global parameter name)
    apply_instrumentation   timing hooks (experts, attention core) and the All-to-All meter
    apply_ac      activation checkpointing, per block
    apply_fsdp    (shard_model) zero2 / zero3, after the optimizer's parameters exist

Each ``apply_*`` takes a model and the group (or setting) it applies, calls the modules'
own ``shard*`` methods, and is a no-op for a group of one rank; the model's constructors
know nothing of the layout (OLMo-core's ``parallelize_model``, torchtitan's
``apply_moe_ep_tp``). Then how each parameter's gradient is reduced (``param_groups``,
``grad_reducer``) and, under PP, the schedule.

Every layout starts from the same weights: the layout is applied before initialisation,
and initialisation is keyed by global names and global expert ids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from moemesh.config.schema import RunConfig
from moemesh.config.validate import batch_plan
from moemesh.fields import Dtype, LoadBalanceScope, Sharding
from moemesh.kernels import KernelOps, get_ops
from moemesh.moe.experts import GroupedExperts
from moemesh.moe.layer import MoELayer
from moemesh.moe.model import AttentionCore, Transformer
from moemesh.parallel.comm import CommMeter, time_module
from moemesh.parallel.dims import MeshAxis
from moemesh.parallel.fsdp import ExposedReduceTimer, apply_fsdp
from moemesh.parallel.grads import GradReducer
from moemesh.parallel.mesh import ParallelMesh
from moemesh.parallel.pipeline import build_schedule, stage_layers, stage_module_of
from moemesh.parallel.recompute import apply_activation_checkpointing
from moemesh.parallel.tags import GRAD_GROUP, TP_SHARD, expert_first_id
from moemesh.parallel.tp import vocab_parallel_cross_entropy


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_pp(model: Transformer, layers: range) -> None:
    """Keep this pipeline stage's layers (global ids): all of them is a no-op."""
    if len(layers) < model.cfg.num_layers:
        model.keep_layers(layers)


def apply_tp(model: nn.Module, tp_group, *, sequence_parallel: bool = False) -> None:
    """Tensor parallelism over ``tp_group``: column/row-parallel attention and dense FFNs,
    vocabulary-parallel embedding and head, each MoE layer's tokens split over the TP peers
    (the routed experts stay EP's); with ``sequence_parallel`` the residual stream and the
    norms are sharded over the sequence. ``model``: a Transformer or one MoE layer."""
    if isinstance(model, Transformer):
        model.shard(tp_group, sequence_parallel=sequence_parallel)
        return
    for moe in _moe_layers(model):
        moe.shard_tokens(tp_group, sequence_parallel=sequence_parallel)


def apply_ep(model: nn.Module, ep_group, *, overlap_chunks: int = 0) -> None:
    """Expert parallelism over ``ep_group``: each MoE layer keeps this EP rank's run of
    experts and routes over the group; ``overlap_chunks`` > 0 pipelines the All-to-All with
    the experts (``moe.overlap``)."""
    for moe in _moe_layers(model):
        moe.shard_experts(ep_group, overlap_chunks=overlap_chunks)


def apply_load_balance_group(model: nn.Module, stats_group) -> None:
    """Reduce each MoE layer's balance statistics f_i over ``stats_group`` (the data x tp
    group for the "global" scope, so every layout optimises the same loss; None: per rank)."""
    for moe in _moe_layers(model):
        moe.stats_group = stats_group


def apply_kernels(model: nn.Module, ops: KernelOps, *, use_grouped_mm: bool = True) -> None:
    """The token-path kernels (Triton or the torch reference) and the expert GEMMs
    (``torch._grouped_mm``, or a per-expert loop)."""
    for moe in _moe_layers(model):
        moe.set_kernels(ops, use_grouped_mm=use_grouped_mm)


def apply_instrumentation(model: nn.Module, meter: CommMeter | None) -> None:
    """Count the All-to-All's bytes and time on ``meter`` and time the routed experts and the
    attention core (``time.experts``, ``time.attention_core``) with forward hooks. Before
    ``apply_fsdp``: the hooks must sit inside FSDP's (``parallel.comm.time_module``)."""
    if meter is None:
        return
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.dispatcher.meter = meter
        elif isinstance(module, GroupedExperts):
            time_module(module, meter, "experts")
        elif isinstance(module, AttentionCore):
            time_module(module, meter, "attention_core")


def apply_ac(model: Transformer, mode: str) -> None:
    """Activation checkpointing per transformer block: none | full | selective."""
    apply_activation_checkpointing(model.layers, mode)


def stage_layer_ids(run: RunConfig, mesh: ParallelMesh) -> range:
    """The global layer ids this rank's pipeline stage holds (all of them without PP)."""
    if mesh.dims.pp == 1:
        return range(run.model.num_layers)
    return stage_layers(run.model.num_layers, mesh.dims.pp, run.parallel.pipeline_split)[mesh.coords[MeshAxis.PP]]


def build_model(
    run: RunConfig, mesh: ParallelMesh, device: torch.device, meter: CommMeter | None = None
) -> Transformer:
    """This rank's part of the model, laid out for ``mesh`` and initialised from ``run.trainer.seed``."""
    comm = run.parallel.comm_optimization
    with torch.device("meta"):
        model = Transformer(run.model)
    apply_pp(model, stage_layer_ids(run, mesh))
    apply_tp(model, mesh.tp_group, sequence_parallel=run.parallel.sequence_parallel)
    apply_ep(model, mesh.ep_group, overlap_chunks=comm.overlap_chunks if comm.all_to_all_overlap else 0)
    apply_load_balance_group(
        model, mesh.data_tp_group if run.model.load_balance_scope == LoadBalanceScope["global"] else None
    )
    apply_kernels(model, get_ops(run.kernels.backend, device.type))
    materialize(model, device)
    if device.type != "meta":  # on the meta device (the planner's tests) there is nothing to draw
        model.init_weights(run.trainer.seed)
    apply_instrumentation(model, meter)
    apply_ac(model, run.trainer.activation_checkpointing)
    return model


def compute_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the run computes in it (trainer.dtype bf16, or auto on CUDA); None: fp32."""
    dtype = run.trainer.dtype
    return torch.bfloat16 if dtype == Dtype.bf16 or (dtype == Dtype.auto and device.type == "cuda") else None


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
    if run.parallel.sharding == Sharding.none:
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
        n_microbatches=batch_plan(run).micro_steps,
        micro_batch=batch_plan(run).micro_batch_size,
        seq_len=seq_len,
        hidden_seq=seq_len // mesh.dims.tp if model.sp else seq_len,  # with SP a stage sends its sequence shard
        loss_fn=functools.partial(_stage_loss, model=model),
        stage_module=stage_module,
    )
