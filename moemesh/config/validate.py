"""Checks that need more than one config group: run before any process starts.

Each group's own fields are checked where they are defined (``__post_init__`` of its
dataclass, ``moemesh.fields``), so a ``RunConfig`` that exists has valid fields; what is left
here are the rules between groups (the model against the layout, the batch against the data
ranks, the data source against the model). Every failure is a ``ConfigError`` whose one-line
message names the keys, their values and what would be valid; ``train.py`` prints it and exits
with code 2.
"""

from __future__ import annotations

from pathlib import Path

from moemesh.config.batch import BatchPlan
from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError
from moemesh.fields import Compile, DataKind, PipelineSchedule, Recompute, Sharding
from moemesh.moe.config import is_moe_layer
from moemesh.parallel.dims import ParallelDims, layout_name


def config_warnings(run: RunConfig) -> list[str]:
    """Settings that are valid but probably not meant: one line each, logged when the run starts."""
    out = []
    cf = run.model.capacity_factor
    if cf is not None and cf < 1:
        out.append(
            f"model.capacity_factor={cf:g} < 1: an expert keeps at most {cf:g} x its even share of the routed "
            f"(token, expert) pairs, so about {1 - cf:.0%} or more of them are dropped even when routing is "
            "perfectly balanced (see dropped_fraction in metrics.jsonl; null: dropless)"
        )
    p = run.parallel
    ignored = [
        (p.sequence_parallel and p.tensor_parallel_size == 1, "parallel.sequence_parallel=true", "tp = 1"),
        (
            p.comm_optimization.all_to_all_overlap and p.expert_parallel_size == 1,
            "parallel.comm_optimization.all_to_all_overlap=true",
            "ep = 1: no All-to-All to overlap",
        ),
        (
            p.pipeline_schedule != PipelineSchedule["1f1b"] and p.pipeline_parallel_size == 1,
            f"parallel.pipeline_schedule={p.pipeline_schedule}",
            "pp = 1: no pipeline",
        ),
        (
            run.model.upcycle.num_experts > 0 and run.model.hf_path is None,
            f"model.upcycle.num_experts={run.model.upcycle.num_experts}",
            "upcycling reads a dense model.hf_path, and none is set",
        ),
    ]
    out += [f"{key} has no effect on this run ({why})" for unused, key, why in ignored if unused]
    return out


def check_layout_name(run: RunConfig, dims: ParallelDims, presets=()) -> None:
    """The name is the layout: ``parallel.name`` must be the name of the degrees it runs.

    It labels the run directory, summary.json and the wandb run; a preset whose degrees were
    overridden (``parallel=ep4 parallel.expert_parallel_size=2``) would label an ep2 run ep4.
    """
    name, actual = run.parallel.name, layout_name(dims)
    if name == actual:
        return
    fix = f"parallel={actual}" if actual in presets else f"parallel.name={actual} with these degrees"
    raise ConfigError(
        f"parallel.name={name} but the degrees are dp{dims.dp}·ep{dims.ep}·tp{dims.tp}·pp{dims.pp}, whose name is "
        f"{actual}: use {fix} (the name labels the run directory, summary.json and wandb, so it must say what ran)"
    )


def batch_plan(run: RunConfig) -> BatchPlan:
    """The run's batch arithmetic (``BatchPlan``): micro-steps, micro-batch, data ranks."""
    return BatchPlan.of(run.trainer, run.parallel.dims)


def validate_run(run: RunConfig, launcher_world_size: int | None = None) -> ParallelDims:
    """The rules between groups; return the run's parallel dims."""
    m, t = run.model, run.trainer
    if run.resume not in (None, "auto"):
        from moemesh.parallel.checkpoint import resolve

        if not resolve(run.resume, Path(run.resume)):
            inside = Path(run.resume) / "checkpoints"  # a run directory named instead of its checkpoints
            hint = f"; did you mean resume={inside}?" if resolve(str(inside), inside) else ""
            raise ConfigError(
                f"resume={run.resume}: no complete checkpoint there (a step_NNNNNN directory with "
                f"meta.json, or a directory of them); valid: null, auto, such a path{hint}"
            )
    dims = run.parallel.dims
    dims.validate(launcher_world_size)
    if m.num_experts % dims.ep:
        raise ConfigError(
            f"model.num_experts={m.num_experts} must be divisible by parallel.expert_parallel_size={dims.ep}"
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"trainer.seq_len={t.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    _check_data_source(run)
    _check_nodes(run, dims)
    if run.model.limit_key is not None:
        _check_routing_limit(run, dims)
    if dims.tp > 1:
        _check_tensor_parallel(run, dims)
    if run.parallel.sharding != Sharding.none and dims.data_size == 1:
        raise ConfigError(
            f"parallel.sharding={run.parallel.sharding} shards over the ranks that hold the same weights "
            f"(dp*ep), and this layout has dp*ep = {dims.dp}*{dims.ep} = 1: nothing to shard; use "
            "parallel.sharding=none, or a layout with dp*ep > 1 (e.g. parallel=ep2_dp2)"
        )
    plan = batch_plan(run)
    if dims.pp > 1:
        _check_pipeline(run, dims, plan)
    if dims.tp > 1 and not run.parallel.sequence_parallel and plan.micro_tokens % dims.tp:
        raise ConfigError(
            f"micro_batch_size*trainer.seq_len = {plan.micro_batch_size}*{t.seq_len} tokens must be divisible by "
            f"parallel.tensor_parallel_size={dims.tp} (TP peers route disjoint token slices)"
        )
    if run.parallel.sharding != Sharding.none:
        _check_shardable(run, dims)
    overlap = run.parallel.comm_optimization
    routed = plan.micro_tokens // dims.tp  # the tokens one rank routes per forward (TP peers split them)
    if overlap.all_to_all_overlap and dims.ep > 1 and overlap.overlap_chunks > routed:  # ep 1: ignored (a warning)
        raise ConfigError(
            f"parallel.comm_optimization.overlap_chunks={overlap.overlap_chunks} must be <= the {routed} tokens "
            f"each rank routes per forward (micro_batch_size*trainer.seq_len/tp = {plan.micro_batch_size}*"
            f"{t.seq_len}/{dims.tp}); every chunk beyond them is an empty All-to-All. 2 to 4 chunks is usual"
        )
    return dims


def _check_data_source(run: RunConfig) -> None:
    """The data against the model and the layout (the data keys among themselves: DataConfig)."""
    d = run.data
    if d.kind == DataKind.stdlib and run.model.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} must be >= 256 for byte-level data.kind=stdlib")
    pp = run.parallel.pipeline_parallel_size
    if d.document_mask and pp > 1:
        raise ConfigError(
            f"data.document_mask=true with parallel.pipeline_parallel_size={pp}: the document ids would "
            "have to travel between pipeline stages with the activations, which the pipeline does not carry; "
            "use a layout without pp, or data.document_mask=false"
        )


def _check_nodes(run: RunConfig, dims: ParallelDims) -> None:
    """``cluster.nodes``, when given, is the number of nodes the layout takes at gpus_per_node."""
    nodes, per_node = run.cluster.nodes, run.cluster.gpus_per_node
    if nodes is None:
        return
    world = dims.world_size
    takes = -(-world // per_node)
    if nodes != takes:
        # Suggest a gpus_per_node only where it spreads the ranks evenly (the SLURM launcher
        # refuses nodes holding unequal numbers of ranks).
        fix = (
            f"set cluster.gpus_per_node={world // nodes}, or another layout, or drop cluster.nodes"
            if world % nodes == 0
            else f"no cluster.gpus_per_node spreads {world} ranks evenly over {nodes} nodes: choose another "
            "layout or drop cluster.nodes"
        )
        raise ConfigError(
            f"cluster.nodes={nodes} but parallel={run.parallel.name} ({world} ranks) takes {takes} node(s) "
            f"at cluster.gpus_per_node={per_node}: a job's nodes follow from its ranks; {fix}"
        )


def routing_groups(run: RunConfig, dims: ParallelDims) -> tuple[int, int] | None:
    """(groups, the most a token may reach) of the layout-keyed routing limit: the EP ranks
    (model.max_ranks_per_token) or the nodes of an EP group (model.max_nodes_per_token, nodes of
    cluster.gpus_per_node GPUs); None when neither is set. Checked by ``validate_run``."""
    m = run.model
    if m.max_ranks_per_token is not None:
        return dims.ep, m.max_ranks_per_token
    if m.max_nodes_per_token is not None:
        return dims.ep_nodes(run.cluster.gpus_per_node) or 0, m.max_nodes_per_token
    return None


def _check_routing_limit(run: RunConfig, dims: ParallelDims) -> None:
    """The EP-rank- or node-limited routing must limit something, the same way on every layout."""
    m, key = run.model, run.model.limit_key
    groups, limit = routing_groups(run, dims) or (0, 0)
    what = "EP ranks" if key == "max_ranks_per_token" else "nodes"
    if key == "max_nodes_per_token" and groups == 0:
        raise ConfigError(
            f"model.max_nodes_per_token={limit}: an EP group of parallel.expert_parallel_size={dims.ep} ranks, "
            f"{dims.tp} apart (tp), does not split evenly over nodes of cluster.gpus_per_node="
            f"{run.cluster.gpus_per_node}; use model.max_ranks_per_token, or a layout whose EP group does"
        )
    if limit >= groups:
        degree = (
            f"parallel.expert_parallel_size={dims.ep}" if what == "EP ranks" else f"{groups} node(s) in its EP group"
        )
        if groups <= 1:  # no value limits one group: the layout must have several
            fix = (
                "a layout with parallel.expert_parallel_size > 1 (EP = 1: no All-to-All)"
                if what == "EP ranks"
                else f"an EP group over several nodes (cluster.gpus_per_node < {dims.ep * dims.tp})"
            )
            raise ConfigError(
                f"model.{key}={limit} limits the {what} a token reaches, and this layout has {degree}: "
                f"nothing to limit; it needs {fix}, or set it to null"
            )
        raise ConfigError(
            f"model.{key}={limit} limits the {what} a token reaches, and this layout has {degree}: "
            f"nothing to limit; set it below {groups} (and above 0), or null"
        )
    per_group = m.num_experts // groups
    if limit * per_group < m.top_k:
        raise ConfigError(
            f"model.{key}={limit} x {per_group} experts per {what[:-1]} = {limit * per_group} experts must be >= "
            f"model.top_k={m.top_k} (a token needs top_k experts within its {what})"
        )


def _check_tensor_parallel(run: RunConfig, dims: ParallelDims) -> None:
    m = run.model
    # The dense FFN's hidden units are split over TP only where a layer has a dense FFN.
    dense = any(not is_moe_layer(m, l) for l in range(m.num_layers))
    for key, value in (
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.num_kv_heads),
        *((("model.ffn_hidden_size", m.ffn_hidden_size),) if dense else ()),
        ("model.shared_expert_ffn_size", m.shared_expert_ffn_size),
    ):
        if value % dims.tp:
            raise ConfigError(f"{key}={value} must be divisible by parallel.tensor_parallel_size={dims.tp}")
    if run.parallel.sequence_parallel and run.trainer.seq_len % dims.tp:
        raise ConfigError(
            f"trainer.seq_len={run.trainer.seq_len} must be divisible by parallel.tensor_parallel_size={dims.tp} "
            "with parallel.sequence_parallel=true"
        )


def _check_pipeline(run: RunConfig, dims: ParallelDims, plan: BatchPlan) -> None:
    from moemesh.parallel.pipeline import Placement, microbatch_problem, stage_layers, traits

    placement = Placement.of(run.parallel)
    stages, per_rank = placement.stages, placement.v
    if run.model.num_layers < stages:
        need = f"parallel.pipeline_parallel_size={dims.pp}"
        if per_rank > 1:
            need = f"the stages, parallel.pipeline_parallel_size x stages per rank = {dims.pp} x {per_rank} = {stages}"
        raise ConfigError(f"model.num_layers={run.model.num_layers} must be >= {need} (every stage needs a layer)")
    stage_layers(run.model.num_layers, stages, run.parallel.pipeline_split)
    problem = microbatch_problem(placement.schedule, dims.pp, plan.micro_steps)
    if problem:
        raise ConfigError(problem)
    split = traits(placement.schedule).split_backward
    if split and run.parallel.sharding == Sharding.zero3:
        raise ConfigError(
            f"parallel.pipeline_schedule={placement.schedule} with parallel.sharding=zero3: the schedule computes a "
            "micro-batch's weight gradients after later micro-batches' forwards, and zero3 reshards each unit after "
            "every forward, so the weights those gradients belong to are gone; use parallel.sharding=zero2 "
            "(or gpipe, 1f1b, interleaved_1f1b)"
        )
    if split and run.trainer.activation_checkpointing != Recompute.none:
        raise ConfigError(
            f"parallel.pipeline_schedule={placement.schedule} with trainer.activation_checkpointing="
            f"{run.trainer.activation_checkpointing}: torch runs a split backward's weight step as a "
            "backward once per weight group, and checkpointing recomputes the block's forward for each (12 forwards "
            "of an MoE block instead of 2, tests/parallel/test_split_backward.py); use "
            "trainer.activation_checkpointing=none, or gpipe, 1f1b, interleaved_1f1b"
        )
    if run.trainer.compile == Compile.model:
        raise ConfigError(
            f"trainer.compile=model compiles the model's forward, which parallel.pipeline_parallel_size={dims.pp} "
            "does not call (each pipeline stage runs its own part): use trainer.compile=blocks with pp"
        )
    if split and run.trainer.compile != Compile.none:
        raise ConfigError(
            f"parallel.pipeline_schedule={placement.schedule} splits each backward into input and weight "
            f"gradients, and a compiled region's backward is one node that computes both (the weight step would "
            f"run it again): trainer.compile={run.trainer.compile} needs gpipe, 1f1b or interleaved_1f1b "
            "(or trainer.compile=none)"
        )


def _check_shardable(run: RunConfig, dims: ParallelDims) -> None:
    """FSDP2 splits a parameter along a dim other than 0 only evenly (parallel/fsdp.py picks
    dim 1 for experts that do not divide over their group, and for TP's dim-0 shards)."""
    from moemesh.moe.param_count import param_specs, shard_dim, shard_group_size, uneven_non_leading_shard
    from moemesh.parallel.pipeline import Placement

    # Each pipeline rank's layers, over all its stages (virtual ones too), as the trainer holds them.
    for layers in Placement.of(run.parallel).layers_by_rank(run.model.num_layers):
        specs = param_specs(run.model, dims, layers=layers, sequence_parallel=run.parallel.sequence_parallel)
        bad = uneven_non_leading_shard(specs, dims)
        if bad is not None:
            dim, k = shard_dim(bad, dims), shard_group_size(bad, dims)
            fix = (
                "experts per rank = model.num_experts/ep divisible by dp*tp"
                if bad.expert
                else f"its dim {dim} ({bad.shape[dim]}) divisible by the {k} ranks that shard it, dp*ep"
            )
            raise ConfigError(
                f"parallel.sharding={run.parallel.sharding}: {bad.name} {list(bad.shape)} would be split along dim "
                f"{dim} ({bad.shape[dim]}) over {k} ranks unevenly, which FSDP2 refuses; use parallel.sharding=none "
                f"or a layout where it divides ({fix})"
            )
