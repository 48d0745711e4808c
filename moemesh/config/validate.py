"""Checks that need more than one key: run before any process starts.

Every failure is a ``ConfigError`` whose one-line message names the keys, their
values and what would be valid; ``train.py`` prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from moemesh.config.schema import RunConfig
from moemesh.errors import ConfigError
from moemesh.parallel.dims import ParallelDims, layout_name

_CHOICES = {
    "model.load_balance_scope": ("global", "local"),
    "model.score_func": ("softmax", "sigmoid"),
    "kernels.backend": ("auto", "triton", "torch"),
    "parallel.pipeline_schedule": ("1f1b", "gpipe"),
    "parallel.sharding": ("none", "zero2", "zero3"),
    "trainer.activation_checkpointing": ("none", "full", "selective"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "cluster.launcher": ("local", "torchrun", "slurm"),
    "cluster.backend": ("auto", "gloo", "nccl"),
    "data.kind": ("stdlib", "tokens", "memmap", "synthetic"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.dtype": ("auto", "fp32", "bf16"),
}


# torch.manual_seed takes 0 .. 2**64-1 (negatives wrap), numpy's default_rng (synthetic data)
# refuses negatives; every seed derived from it is reduced into the generator's range.
SEED_MAX = 2**64 - 1
# Below this, an expert takes under a tenth of its even share of the routed (token, expert)
# pairs: over 90% of them are dropped even when routing is perfectly balanced, and the MoE
# layers are mostly skipped (their output is zero for a dropped pair).
CAPACITY_FACTOR_MIN = 0.1

_gt0 = (lambda v: v > 0, "a finite number > 0")
_ge0 = (lambda v: v >= 0, "a finite number >= 0")
# Float keys with a range, and what is valid (NaN fails every comparison, so "not ok(v)" refuses
# it); every other float key only has to be finite (_float_keys).
_NUMBERS = {
    "trainer.lr": _gt0,
    "trainer.min_lr": _ge0,
    "trainer.grad_clip": (lambda v: v >= 0, "a finite number >= 0 (0: no clipping)"),
    "trainer.weight_decay": _ge0,
    "model.init_std": (lambda v: v > 0, "a finite number > 0 (the weights' standard deviation)"),
    "model.rope_theta": (lambda v: v > 0, "a finite number > 0 (the rotary base, usually 10000)"),
    "model.norm_eps": (lambda v: v > 0, "a finite number > 0 (added to the mean square before its root)"),
    "model.aux_loss_factor": (lambda v: v >= 0, "a finite number >= 0 (0: off)"),
    "model.z_loss_factor": (lambda v: v >= 0, "a finite number >= 0 (0: off)"),
    "model.seq_aux_loss_factor": (lambda v: v >= 0, "a finite number >= 0 (0: off)"),
    "model.expert_bias_update_rate": (lambda v: v >= 0, "a finite number >= 0 (0: off)"),
    "cluster.peak_flops": (lambda v: v > 0, "a finite number > 0 (FLOP/s per device) or null"),
    "cluster.gpu_memory_gb": _gt0,
    "cluster.intra_node_gbps": _gt0,
    "cluster.inter_node_gbps": _gt0,
    "cluster.latency_us": _ge0,
    "logger.init_timeout_s": (lambda v: v > 0, "a finite number of seconds > 0"),
}
# Durations in whole seconds: a negative one is a typo, not a setting.
_SECONDS = {
    "cluster.collective_timeout_s": (lambda v: v >= 1, "a positive number of seconds"),
    "cluster.preempt_grace_s": (lambda v: v >= 0, "a number of seconds >= 0 (the time to save after a stop signal)"),
}


def _get(run: RunConfig, dotted: str):
    obj = run
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _float_keys(obj, prefix: str = ""):
    """(dotted key, value) of every float in the config: none may be NaN or infinite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def _check_numbers(run: RunConfig) -> None:
    for key, (ok, valid) in {**_NUMBERS, **_SECONDS}.items():
        value = _get(run, key)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{key}={value} must be {valid}")
    seed = run.trainer.seed
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(
            f"trainer.seed={seed} must be in [0, 2**64-1 = {SEED_MAX}] (the range of torch's and numpy's generators)"
        )
    cf = run.model.capacity_factor
    if cf is not None and not (math.isfinite(cf) and cf >= CAPACITY_FACTOR_MIN):
        raise ConfigError(
            f"model.capacity_factor={cf} must be null (dropless) or a finite number >= {CAPACITY_FACTOR_MIN}: "
            f"below it an expert keeps under {CAPACITY_FACTOR_MIN:.0%} of its even share of the routed tokens, so "
            f"over {1 - CAPACITY_FACTOR_MIN:.0%} are dropped even when routing is perfectly balanced"
        )
    for key, value in _float_keys(run):  # the keys above say more; this covers every other float
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")


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


def state_bytes_per_param(device_type: str) -> int:
    """Host bytes per parameter while training: fp32 weights, gradients and AdamW's two moments on
    CPU; on CUDA the model is still built in host memory (fp32) before it moves to the GPU."""
    return 16 if device_type == "cpu" else 4


def check_fits_host(
    run: RunConfig, dims: ParallelDims, *, ranks_here: int | None, host_bytes: int, device_type: str
) -> None:
    """Refuse a model whose training state cannot fit this machine's memory (before a rank starts).

    ``ranks_here``: None when this process spawns every rank here; else the ranks a launcher
    starts on this machine (counted at the smallest stage's size: a lower bound, so a run that
    might fit is never refused). Activations are not counted: this catches the impossible,
    not the tight; scripts/plan.py sizes layouts for GPUs.
    """
    from moemesh.moe.param_count import count_params

    per_stage = [
        count_params(run.model, dims, stage=s, split=run.parallel.pipeline_split).total for s in range(dims.pp)
    ]
    if ranks_here is None:
        params = sum(per_stage) * (dims.world_size // dims.pp)
        ranks = dims.world_size
    else:
        params = min(per_stage) * ranks_here
        ranks = ranks_here
    per_param = state_bytes_per_param(device_type)
    need = params * per_param
    if need > host_bytes:
        what = (
            "weights, gradients and AdamW state"
            if device_type == "cpu"
            else "weights, built in host memory before they move to the GPU"
        )
        raise ConfigError(
            f"model={run.model.name} (hidden_size={run.model.hidden_size}, num_layers={run.model.num_layers}, "
            f"num_experts={run.model.num_experts}) needs {need / 2**30:,.1f} GiB of this machine's memory for "
            f"{what} ({params:,} parameters on its {ranks} rank(s) x {per_param} bytes), more than its "
            f"{host_bytes / 2**30:,.1f} GiB; use a smaller model, or spread the layout over more machines "
            "(scripts/plan.py sizes one)"
        )


def micro_steps(run: RunConfig) -> int:
    """Micro-steps (forward/backward passes per data rank) in one optimizer step.

    ``trainer.micro_steps`` if set; else from ``trainer.micro_batch_size``; else 1, or pp
    with pipeline parallelism (the fewest that keep every stage of a 1F1B schedule busy).
    """
    t = run.trainer
    if t.micro_steps is not None:
        return t.micro_steps
    dims = ParallelDims.from_config(run.parallel)
    if t.micro_batch_size is not None:
        return t.global_batch_size // (t.micro_batch_size * dims.data_size)
    return dims.pp


def micro_batch_size(run: RunConfig) -> int:
    """Sequences per forward on one data rank."""
    dims = ParallelDims.from_config(run.parallel)
    return run.trainer.global_batch_size // (micro_steps(run) * dims.data_size)


def grad_accum_steps(run: RunConfig) -> int:
    """The same number as ``micro_steps`` (the name the training loop's arithmetic uses)."""
    return micro_steps(run)


def validate_run(run: RunConfig, launcher_world_size: int | None = None) -> ParallelDims:
    """Validate the whole run; return its parallel dims."""
    m, t = run.model, run.trainer
    for key, valid in _CHOICES.items():
        value = _get(run, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")

    positive = [
        "model.vocab_size",
        "model.hidden_size",
        "model.num_layers",
        "model.num_heads",
        "model.num_kv_heads",
        "model.ffn_hidden_size",
        "model.moe_ffn_hidden_size",
        "model.num_experts",
        "model.moe_every_k_layers",
        "model.max_seq_len",
        "trainer.steps",
        "trainer.global_batch_size",
        "trainer.seq_len",
        "trainer.eval_batches",
        "trainer.log_every",
        "trainer.max_skipped_steps",
        "cluster.gpus_per_node",
    ]
    for key in positive:
        value = _get(run, key)
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    _check_numbers(run)
    if run.cluster.gpus is not None and run.cluster.gpus < 1:
        raise ConfigError(f"cluster.gpus={run.cluster.gpus} must be a positive integer or null")
    if run.resume not in (None, "auto"):
        from moemesh.parallel.checkpoint import resolve

        if not resolve(run.resume, Path(run.resume)):
            raise ConfigError(
                f"resume={run.resume}: no complete checkpoint there (a step_NNNNNN directory with "
                "meta.json, or a directory of them); valid: null, auto, such a path"
            )
    for key in ("checkpoint.every", "checkpoint.keep"):
        if _get(run, key) < 0:
            raise ConfigError(f"{key}={_get(run, key)} must be >= 0")
    non_negative = ["model.shared_expert_ffn_size", "trainer.warmup_steps", "trainer.eval_every"]
    for key in non_negative:
        value = _get(run, key)
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key in ("trainer.beta1", "trainer.beta2"):
        if not 0 <= _get(run, key) < 1:
            raise ConfigError(f"{key}={_get(run, key)} must be in [0, 1)")
    if t.threads_per_rank is not None and t.threads_per_rank < 1:
        raise ConfigError(f"trainer.threads_per_rank={t.threads_per_rank} must be a positive integer or null")
    if t.min_lr > t.lr:
        raise ConfigError(f"trainer.min_lr={t.min_lr} must be <= trainer.lr={t.lr}")
    if not 0 < run.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={run.data.val_fraction} must be in (0, 1)")

    dims = ParallelDims.from_config(run.parallel)
    dims.validate(launcher_world_size)

    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    if (m.hidden_size // m.num_heads) % 2:
        raise ConfigError(
            f"model.hidden_size/model.num_heads = {m.hidden_size}/{m.num_heads} = "
            f"{m.hidden_size // m.num_heads} must be even (rotary embedding)"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}")
    if not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(f"model.top_k={m.top_k} must be between 1 and model.num_experts={m.num_experts}")
    if m.num_experts % dims.ep:
        raise ConfigError(
            f"model.num_experts={m.num_experts} must be divisible by parallel.expert_parallel_size={dims.ep}"
        )
    if m.num_layers % m.moe_every_k_layers:
        raise ConfigError(
            f"model.num_layers={m.num_layers} must be divisible by "
            f"model.moe_every_k_layers={m.moe_every_k_layers} (an MoE layer every k layers)"
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"trainer.seq_len={t.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    _check_data_keys(run, dims)

    if dims.tp > 1:
        for key in ("model.num_heads", "model.num_kv_heads", "model.ffn_hidden_size", "model.shared_expert_ffn_size"):
            if _get(run, key) % dims.tp:
                raise ConfigError(
                    f"{key}={_get(run, key)} must be divisible by parallel.tensor_parallel_size={dims.tp}"
                )
        if run.parallel.sequence_parallel and t.seq_len % dims.tp:
            raise ConfigError(
                f"trainer.seq_len={t.seq_len} must be divisible by parallel.tensor_parallel_size={dims.tp} "
                "with parallel.sequence_parallel=true"
            )

    if run.parallel.sharding != "none" and dims.data_size == 1:
        raise ConfigError(
            f"parallel.sharding={run.parallel.sharding} shards over the ranks that hold the same weights "
            f"(dp*ep), and this layout has dp*ep = {dims.dp}*{dims.ep} = 1: nothing to shard; use "
            "parallel.sharding=none, or a layout with dp*ep > 1 (e.g. parallel=ep2_dp2)"
        )
    mb, ms = t.micro_batch_size, t.micro_steps
    if mb is not None and mb < 1:
        raise ConfigError(f"trainer.micro_batch_size={mb} must be a positive integer or null")
    if ms is not None and ms < 1:
        raise ConfigError(f"trainer.micro_steps={ms} must be a positive integer or null")
    if ms is not None and mb is not None and ms * mb * dims.data_size != t.global_batch_size:
        raise ConfigError(
            f"trainer.micro_steps={ms} and trainer.micro_batch_size={mb} disagree: micro_steps*micro_batch_size*dp*ep "
            f"= {ms}*{mb}*{dims.dp}*{dims.ep} != trainer.global_batch_size={t.global_batch_size}; set only one"
        )
    if mb is not None:
        unit = mb * dims.data_size
        if t.global_batch_size % unit:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} must be divisible by "
                f"micro_batch_size*dp*ep = {mb}*{dims.dp}*{dims.ep} = {unit}"
            )
    else:
        steps = micro_steps(run)
        unit = steps * dims.data_size
        if t.global_batch_size % unit:
            which = f"trainer.micro_steps={steps}" if ms is not None else f"{steps} micro-steps (pp={dims.pp})"
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} must be divisible by micro_steps*dp*ep = "
                f"{steps}*{dims.dp}*{dims.ep} = {unit} ({which}; or set trainer.micro_batch_size)"
            )
    co = run.parallel.comm_optimization
    if co.overlap_chunks < 1:
        raise ConfigError(f"parallel.comm_optimization.overlap_chunks={co.overlap_chunks} must be >= 1")
    if dims.pp > 1:
        from moemesh.parallel.pipeline import stage_layers

        if m.num_layers < dims.pp:
            raise ConfigError(
                f"model.num_layers={m.num_layers} must be >= parallel.pipeline_parallel_size={dims.pp} "
                "(every stage needs a layer)"
            )
        stage_layers(m.num_layers, dims.pp, run.parallel.pipeline_split)
        if run.parallel.pipeline_schedule == "1f1b" and micro_steps(run) < dims.pp:
            raise ConfigError(
                f"1F1B needs micro-batches >= parallel.pipeline_parallel_size={dims.pp}, got "
                f"{micro_steps(run)} (trainer.micro_steps); set trainer.micro_steps >= {dims.pp} "
                "or parallel.pipeline_schedule=gpipe"
            )
    elif run.parallel.pipeline_split is not None:
        raise ConfigError(
            f"parallel.pipeline_split={list(run.parallel.pipeline_split)} needs parallel.pipeline_parallel_size > 1"
        )
    if dims.tp > 1 and not run.parallel.sequence_parallel and (micro_batch_size(run) * t.seq_len) % dims.tp:
        raise ConfigError(
            f"micro_batch_size*trainer.seq_len = {micro_batch_size(run)}*{t.seq_len} tokens must be divisible by "
            f"parallel.tensor_parallel_size={dims.tp} (TP peers route disjoint token slices)"
        )
    if run.parallel.sharding != "none":
        _check_shardable(run, dims)
    return dims


def _check_data_keys(run: RunConfig, dims: ParallelDims) -> None:
    """The data keys against each other and the layout (files are checked by moemesh.data.check_data)."""
    d = run.data
    if d.kind == "stdlib" and run.model.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} must be >= 256 for byte-level data.kind=stdlib")
    # A key the chosen data source does not read is a mistake, not a setting (data.path
    # with the default stdlib corpus would train on the wrong data and say nothing).
    reads = {
        "stdlib": ("cache_dir",),
        "tokens": ("path", "sources", "val_path"),
        "memmap": ("path", "val_path"),
        "synthetic": (),
    }
    for key in ("path", "sources", "val_path", "cache_dir"):
        value = getattr(d, key)
        if value is not None and key not in reads.get(d.kind, ()):
            users = [k for k, keys in reads.items() if key in keys]
            raise ConfigError(
                f"data.{key}={value} is ignored by data={d.kind}; "
                f"it is read by data={' or data='.join(users)} (e.g. data={users[0]} data.{key}=...)"
            )
    if d.kind == "memmap" and not d.path:
        raise ConfigError("data.path is required for data.kind=memmap (a uint16 token .bin file)")
    if d.kind == "tokens":
        if (d.path is None) == (d.sources is None):
            raise ConfigError(
                "data=tokens reads exactly one of data.path=DIR or data.sources=[{path: DIR, weight: W}, ...]"
                + (" (both are set)" if d.path is not None else " (neither is set)")
            )
        if d.sources is not None:
            if not d.sources:
                raise ConfigError("data.sources=[] is empty; valid: a list of {path: DIR, weight: W}")
            for i, src in enumerate(d.sources):
                if not src.path:
                    raise ConfigError(f"data.sources[{i}].path is empty; valid: a directory of scripts/prepare_data.py")
                if not (math.isfinite(src.weight) and src.weight > 0):
                    raise ConfigError(f"data.sources[{i}].weight={src.weight} must be a finite number > 0")
            total = sum(s.weight for s in d.sources)
            small = [i for i, s in enumerate(d.sources) if s.weight / total * 4096 < 1]
            if small:
                raise ConfigError(
                    f"data.sources[{small[0]}].weight={d.sources[small[0]].weight} is under 1/4096 of the total "
                    f"{total:g}: it would get no window in a mixture block of 4096 samples"
                )
    if d.prefetch_steps < 0:
        raise ConfigError(f"data.prefetch_steps={d.prefetch_steps} must be >= 0 (0: read when needed)")
    if d.document_mask:
        if d.kind not in ("stdlib", "tokens"):
            raise ConfigError(
                f"data.document_mask=true needs document boundaries, which data={d.kind} does not have; "
                "valid: data=tokens (scripts/prepare_data.py) or data=stdlib"
            )
        if dims.pp > 1:
            raise ConfigError(
                f"data.document_mask=true with parallel.pipeline_parallel_size={dims.pp}: the document ids would "
                "have to travel between pipeline stages with the activations, which the pipeline does not carry; "
                "use a layout without pp, or data.document_mask=false"
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
