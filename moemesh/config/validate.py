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
from moemesh.fields import DataKind, Sharding
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
            raise ConfigError(
                f"resume={run.resume}: no complete checkpoint there (a step_NNNNNN directory with "
                "meta.json, or a directory of them); valid: null, auto, such a path"
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
    takes = -(-dims.world_size // per_node)
    if nodes != takes:
        raise ConfigError(
            f"cluster.nodes={nodes} but parallel={run.parallel.name} ({dims.world_size} ranks) takes {takes} node(s) "
            f"at cluster.gpus_per_node={per_node}: a job's nodes follow from its ranks; set "
            f"cluster.gpus_per_node={-(-dims.world_size // nodes)}, or another layout, or drop cluster.nodes"
        )


def _check_tensor_parallel(run: RunConfig, dims: ParallelDims) -> None:
    m = run.model
    for key, value in (
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.num_kv_heads),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
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
    from moemesh.parallel.pipeline import PipelineSchedule, stage_layers

    if run.model.num_layers < dims.pp:
        raise ConfigError(
            f"model.num_layers={run.model.num_layers} must be >= parallel.pipeline_parallel_size={dims.pp} "
            "(every stage needs a layer)"
        )
    stage_layers(run.model.num_layers, dims.pp, run.parallel.pipeline_split)
    if run.parallel.pipeline_schedule == PipelineSchedule["1f1b"] and plan.micro_steps < dims.pp:
        raise ConfigError(
            f"1F1B needs micro-batches >= parallel.pipeline_parallel_size={dims.pp}, got "
            f"{plan.micro_steps} (trainer.micro_steps); set trainer.micro_steps >= {dims.pp} "
            "or parallel.pipeline_schedule=gpipe"
        )


def _check_shardable(run: RunConfig, dims: ParallelDims) -> None:
    """FSDP2 splits a parameter along a dim other than 0 only evenly (parallel/fsdp.py picks
    dim 1 for experts that do not divide over their group, and for TP's dim-0 shards)."""
    from moemesh.moe.param_count import param_specs, shard_dim, shard_group_size, uneven_non_leading_shard

    for stage in range(dims.pp):
        specs = param_specs(
            run.model,
            dims,
            stage=stage,
            split=run.parallel.pipeline_split,
            sequence_parallel=run.parallel.sequence_parallel,
        )
        bad = uneven_non_leading_shard(specs, dims)
        if bad is not None:
            dim, k = shard_dim(bad, dims), shard_group_size(bad, dims)
            raise ConfigError(
                f"parallel.sharding={run.parallel.sharding}: {bad.name} {list(bad.shape)} would be split along dim "
                f"{dim} ({bad.shape[dim]}) over {k} ranks unevenly, which FSDP2 refuses; use parallel.sharding=none "
                f"or a layout where it divides (experts per rank = model.num_experts/ep divisible by dp*tp)"
            )
