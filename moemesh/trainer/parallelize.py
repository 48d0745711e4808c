"""Apply the run's layout to the model, once, from outside, in this order:

    Transformer(cfg) on the meta device        the whole model, global shapes, no memory
    apply_pp      this pipeline stage's layers (and the embedding / head if first / last)
    apply_tp      TP shards of attention, dense FFNs, embedding, head; MoE token split
    apply_ep      this EP rank's experts, the dispatcher's All-to-All group, overlap
    apply_routing_limit   EP-rank- or node-limited routing (the experts' groups by layout)
    apply_load_balance_group   the group the balance statistics are reduced over
    apply_kernels the token-path kernels and the expert GEMMs
    apply_compile torch.compile of each block's compute (trainer.compile)
    materialize + init_weights   on the run's device, by (seed, global parameter name); with
                  model.hf_path only the buffers: the trainer reads the weights after apply_fsdp
                  (``load_hf_weights``), each rank its own boxes
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from moemesh.config.schema import RunConfig
from moemesh.config.validate import batch_plan, routing_groups
from moemesh.fields import Compile, Dtype, LoadBalanceScope, Sharding, SharedExpertOverlap
from moemesh.kernels import KernelOps, get_ops
from moemesh.moe.experts import GroupedExperts
from moemesh.moe.layer import MoELayer
from moemesh.moe.model import AttentionCore, Block, Transformer
from moemesh.parallel.comm import CommMeter, time_module
from moemesh.parallel.dims import MeshAxis, padded_vocab
from moemesh.parallel.fsdp import ExposedReduceTimer, apply_fsdp
from moemesh.parallel.grads import GradReducer
from moemesh.parallel.mesh import ParallelMesh
from moemesh.parallel.pipeline import Placement, StageShapes, build_pipeline, stage_module
from moemesh.parallel.recompute import apply_activation_checkpointing
from moemesh.parallel.tags import GRAD_GROUP, TP_SHARD, expert_first_id
from moemesh.parallel.tp import vocab_parallel_cross_entropy


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_pp(model: Transformer, layers) -> None:
    """Keep this pipeline rank's layers (global ids: one stage's range, or with virtual stages the
    union of the rank's stages): all of them is a no-op."""
    layers = list(layers)
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


def apply_ep(
    model: nn.Module,
    ep_group,
    *,
    overlap_chunks: int = 0,
    shared_overlap: SharedExpertOverlap = SharedExpertOverlap.combine,
) -> None:
    """Expert parallelism over ``ep_group``: each MoE layer keeps this EP rank's run of
    experts and routes over the group; ``overlap_chunks`` > 0 pipelines the All-to-All with
    the experts (``moe.overlap``), the shared expert hiding the exchange ``shared_overlap`` names."""
    for moe in _moe_layers(model):
        moe.shard_experts(ep_group, overlap_chunks=overlap_chunks, shared_overlap=shared_overlap)


def apply_routing_limit(model: nn.Module, groups: tuple[int, int] | None) -> None:
    """EP-rank- or node-limited routing: each token's experts within at most ``groups[1]`` of
    ``groups[0]`` runs of experts (``config.validate.routing_groups``: the EP ranks' or the nodes'
    experts), the same on every layout with the same groups; None: no limit. Each token then
    travels once per EP rank it reaches (moe/rank_dispatch.py; the pair-by-pair All-to-All where
    comm.all_to_all_overlap is on), so the cap cuts the All-to-All's bytes too."""
    if groups is None:
        return
    for moe in _moe_layers(model):
        moe.limit_routing(*groups, by_rank=True)


def apply_load_balance_group(model: nn.Module, stats_group) -> None:
    """Reduce each MoE layer's balance statistics f_i over ``stats_group`` (the data x tp
    group for the "global" scope, so every layout optimises the same loss; None: per rank)."""
    for moe in _moe_layers(model):
        moe.stats_group = stats_group


def apply_kernels(model: nn.Module, ops: KernelOps, *, use_grouped_mm: bool | None = None) -> None:
    """The token-path kernels (Triton or the torch reference) and the expert GEMMs
    (``torch._grouped_mm``, or a per-expert loop; None: the grouped GEMMs on a GPU, the loop
    on a CPU, where it is faster: ``moe/experts.py``)."""
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


def compiled_regions(model: Transformer) -> Iterator[nn.Module]:
    """The modules ``trainer.compile=blocks`` compiles: in each block, the norms, the attention,
    the dense FFN, the router and the shared expert. Their shapes are fixed by the micro-batch, so
    nothing recompiles per step; the routed path (dispatch, the experts' data-dependent row counts,
    combine) and every pipeline exchange run eagerly between them."""
    for block in model.layers.values():
        assert isinstance(block, Block)
        yield from (block.attn_norm, block.attn, block.ffn_norm)
        if block.ffn is not None:
            yield block.ffn
        if block.moe is not None:
            yield block.moe.router
            if block.moe.shared is not None:
                yield block.moe.shared


def apply_compile(model: Transformer, mode: str) -> None:
    """``trainer.compile``: none; ``blocks`` (``compiled_regions``); or ``model`` (the whole
    forward, graph-broken where each MoE layer's routed path runs eagerly: ``MoELayer._routed``).
    Modules compile in place, so parameter names, checkpoints and FSDP's roots do not change.
    Collectives inside a region (TP's all-reduce) break its graph there and run eagerly."""
    if mode == Compile.none:
        return
    for module in compiled_regions(model) if mode == Compile.blocks else [model]:
        module.compile()


def apply_ac(model: Transformer, mode: str) -> None:
    """Activation checkpointing per transformer block: none | full | selective."""
    apply_activation_checkpointing(model.layers, mode)


def stage_layer_ids(run: RunConfig, mesh: ParallelMesh) -> list[int]:
    """The global layer ids this pipeline rank holds, over all its stages (every layer without PP)."""
    if mesh.dims.pp == 1:
        return list(range(run.model.num_layers))
    return Placement.of(run.parallel).rank_layers(run.model.num_layers, mesh.coords[MeshAxis.PP])


def pipeline_stage_modules(run: RunConfig, mesh: ParallelMesh, model: Transformer) -> list[nn.Module]:
    """One module per pipeline stage this rank runs, in stage order (none without PP). Each holds
    the stage's blocks (and the embedding, or the final norm and head, where the stage has them),
    shared with ``model``, and runs ``model.stage_forward`` over them (``parallel.pipeline``)."""
    if mesh.dims.pp == 1:
        return []
    modules = []
    chunks = Placement.of(run.parallel).chunks(run.model.num_layers, mesh.coords[MeshAxis.PP])
    held_first = any(c.start == 0 for c in chunks)
    for chunk in chunks:
        parts: dict[str, nn.Module] = {"layers": nn.ModuleDict({str(l): model.layers[str(l)] for l in chunk})}
        # A tied embedding is also the last stage's head, so a part of that stage: a split backward's
        # weight step computes gradients for its stage's own parameters only, and would drop the
        # head's share. Where this rank's first stage holds it too (a V), that stage, whose
        # backward runs last, scales and reduces its gradient: the last stage leaves it ``shared``.
        tied_head = run.model.tie_embeddings and chunk.stop == run.model.num_layers
        shared: tuple[str, ...] = ()
        if chunk.start == 0 or tied_head:
            parts["embed"] = model.embed  # type: ignore[assignment]
            if chunk.start != 0 and held_first:
                shared = ("embed.weight",)
        if chunk.stop == run.model.num_layers:
            parts["norm"], parts["head"] = model.norm, model.head  # type: ignore[assignment]
        modules.append(stage_module(functools.partial(model.stage_forward, layers=chunk), parts, shared=shared))
    return modules


def build_model(
    run: RunConfig, mesh: ParallelMesh, device: torch.device, meter: CommMeter | None = None
) -> Transformer:
    """This rank's part of the model, laid out for ``mesh`` and initialised from ``run.trainer.seed``."""
    comm = run.parallel.comm_optimization
    with torch.device("meta"):
        model = Transformer(run.model)
    apply_pp(model, stage_layer_ids(run, mesh))
    apply_tp(model, mesh.tp_group, sequence_parallel=run.parallel.sequence_parallel)
    apply_ep(
        model,
        mesh.ep_group,
        overlap_chunks=comm.overlap_chunks if comm.all_to_all_overlap else 0,
        shared_overlap=comm.shared_expert_overlap,
    )
    apply_routing_limit(model, routing_groups(run, mesh.dims))
    apply_load_balance_group(
        model, mesh.data_tp_group if run.model.load_balance_scope == LoadBalanceScope["global"] else None
    )
    apply_kernels(model, get_ops(run.kernels.backend, device.type, run.model.num_experts))
    materialize(model, device)
    # On the meta device (the planner's tests) there is nothing to draw. With model.hf_path the
    # parameters are read from the checkpoint once sharded (load_hf_weights): only the buffers here.
    if device.type != "meta" and run.model.hf_path is None:
        model.init_weights(run.trainer.seed)
    elif device.type != "meta":
        model.init_buffers()
        # The import writes every row a checkpoint holds; the rows that pad a TP-sharded vocabulary
        # to a multiple of tp it never writes, and to_empty left them as whatever memory held.
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    apply_instrumentation(model, meter)
    apply_compile(model, run.trainer.compile)
    apply_ac(model, run.trainer.activation_checkpointing)
    return model


def compute_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the run computes in it (trainer.dtype bf16, or auto on CUDA); None: fp32."""
    dtype = run.trainer.dtype
    return torch.bfloat16 if dtype == Dtype.bf16 or (dtype == Dtype.auto and device.type == "cuda") else None


@dataclass
class Sharded:
    """What the sharded modes add: the FSDP roots (the model, or with PP each stage module the
    schedule calls) and the timer of the exposed gradient reduction."""

    roots: list[torch.nn.Module]
    timer: ExposedReduceTimer


def shard_model(
    run: RunConfig, mesh: ParallelMesh, model: Transformer, device: torch.device, stages: list[nn.Module] | None = None
) -> Sharded | None:
    """Apply ``parallel.sharding`` (zero2 / zero3 on FSDP2; see ``parallel.fsdp``); None for none.
    ``stages``: under PP, this rank's stage modules (``pipeline_stage_modules``), one root each.

    Under mixed precision (bf16 on CUDA) the gathered parameters are bf16 for compute; the
    sharded master weights, the gradient reduction and AdamW's state stay fp32.
    """
    if run.parallel.sharding == Sharding.none:
        return None
    timer = ExposedReduceTimer(device)
    roots = stages or [model]
    for root in roots:
        named = dict(root.named_parameters(remove_duplicate=False))
        apply_fsdp(
            root,
            [m for m in root.modules() if isinstance(m, Block)],
            mesh.shard_meshes(),
            mode=run.parallel.sharding,
            param_dtype=compute_dtype(run, device),
            timer=timer,
            force_sum=device.type != "cuda",
            # a parameter another stage of this rank shards (a V's tied embedding, as the head)
            ignored={named[n] for n in getattr(root, "shared", ())},
        )
    return Sharded(roots, timer)


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
    data_tp: list  # summed over dp x ep x tp (router, shared gate, q/k/v biases, qk-norms; SP norms)
    expert: list  # summed over dp x tp
    tp_sharded: list  # for the grad norm: sharded over tp
    replicated: list  # for the grad norm: whole on every rank, not experts


def param_groups(model: Transformer) -> ParamGroups:
    params = list(model.parameters())
    expert = [p for p in params if expert_first_id(p) is not None]
    rest = [p for p in params if expert_first_id(p) is None]
    data_tp = [p for p in rest if getattr(p, GRAD_GROUP, "data") == "data_tp"]
    data = [p for p in rest if getattr(p, GRAD_GROUP, "data") == "data"]
    # The grad norm counts a tied embedding once: on the first stage, not as the last stage's head.
    counted = [p for p in rest if not (model.tied_copy and model.embed is not None and p is model.embed.weight)]
    tp_sharded = [p for p in counted if getattr(p, TP_SHARD, None) is not None and model.tp_group is not None]
    sharded_ids = {id(p) for p in tp_sharded}
    replicated = [p for p in counted if id(p) not in sharded_ids]
    return ParamGroups(data, data_tp, expert, tp_sharded, replicated)


def tied_embedding_sync(model: Transformer, mesh: ParallelMesh) -> Callable[[], None] | None:
    """With tied embeddings under PP the first stage (the lookup) and the last (the head) each hold
    the matrix: after the backward and the reduction each adds the other's gradient (one exchange
    between the two stages' ranks of the same dp, ep, tp coordinates), so both copies take the same
    step. None where there is nothing to sum (no tie, no PP, a middle stage, or, with a V-shaped
    schedule's virtual stages, one rank holding both the first and the last layer: one matrix)."""
    if not model.cfg.tie_embeddings or mesh.dims.pp == 1 or not (model.first or model.last):
        return None
    if model.first and model.last:
        return None
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(mesh.pp_group)
    peer = ranks[-1] if model.first else ranks[0]
    assert model.embed is not None

    def sync() -> None:
        assert model.embed is not None
        grad = model.embed.weight.grad
        assert grad is not None
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        theirs = torch.empty_like(local)
        ops = [dist.P2POp(dist.isend, local.contiguous(), peer), dist.P2POp(dist.irecv, theirs, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        local.add_(theirs)

    return sync


def load_hf_weights(run: RunConfig, model: Transformer, tp_mesh=None, fsdp_tp_mesh=None) -> str:
    """Fill the (laid-out, sharded) model from ``model.hf_path``, each rank its own boxes
    (``moemesh.interop.hf.load``); a failure on any rank is raised on every rank. Returns a line
    for the log."""
    import torch.distributed as dist

    from moemesh.interop.hf.load import load_weights
    from moemesh.parallel.checkpoint import CheckpointError

    stats, error = None, None
    try:
        stats = load_weights(model, run.model, seed=run.trainer.seed, tp_mesh=tp_mesh, fsdp_tp_mesh=fsdp_tp_mesh)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        error = f"model.hf_path={run.model.hf_path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise CheckpointError(first)
    assert stats is not None
    return (
        f"moemesh: read {run.model.hf_path} ({run.model.name}): {stats.tensors} tensors, "
        f"{stats.bytes_read / 2**20:,.1f} MiB on rank 0 in {stats.seconds:.1f} s"
        + (
            f", upcycled to {run.model.num_experts} experts top-{run.model.top_k}"
            if run.model.upcycle.num_experts
            else ""
        )
    )


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


def pipeline_schedule(run: RunConfig, mesh: ParallelMesh, model: Transformer, device: torch.device, stages):
    """This rank's pipeline schedule over its ``stages`` (``pipeline_stage_modules``) and
    micro-steps, or None without PP."""
    if mesh.dims.pp == 1:
        return None
    seq_len, plan = run.trainer.seq_len, batch_plan(run)
    return build_pipeline(
        stages,
        placement=Placement.of(run.parallel),
        pp_rank=mesh.coords[MeshAxis.PP],
        pp_group=mesh.pp_group,
        device=device,
        n_microbatches=plan.micro_steps,
        shapes=StageShapes(
            micro_batch=plan.micro_batch_size,
            seq_len=seq_len,
            hidden_seq=seq_len // mesh.dims.tp if model.sp else seq_len,  # with SP a stage sends its sequence shard
            hidden_size=run.model.hidden_size,
            vocab_shard=padded_vocab(run.model.vocab_size, mesh.dims.tp) // mesh.dims.tp,
            hidden_dtype=compute_dtype(run, device) if run.parallel.sharding != Sharding.none else None,
        ),
        loss_fn=functools.partial(_stage_loss, model=model),
    )
