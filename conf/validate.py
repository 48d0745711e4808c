"""Checks that need more than one key: run before any process starts.

Every failure is a ``ConfigError`` whose one-line message names the keys, their
values and what would be valid; ``train.py`` prints it and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path

from conf.schema import ConfigError, RunConfig
from parallel.dims import ParallelDims

_CHOICES = {
    "model.load_balance_scope": ("global", "local"),
    "model.score_func": ("softmax", "sigmoid"),
    "kernels.backend": ("auto", "triton", "torch"),
    "parallel.pipeline_schedule": ("1f1b", "gpipe"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "cluster.launcher": ("local", "torchrun", "slurm"),
    "cluster.backend": ("auto", "gloo", "nccl"),
    "data.kind": ("stdlib", "memmap", "synthetic"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.dtype": ("auto", "fp32", "bf16"),
}


def _get(run: RunConfig, dotted: str):
    obj = run
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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
        "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
        "model.num_kv_heads", "model.ffn_hidden_size", "model.moe_ffn_hidden_size",
        "model.num_experts", "model.moe_every_k_layers", "model.max_seq_len",
        "trainer.steps", "trainer.global_batch_size", "trainer.seq_len", "trainer.eval_batches",
        "trainer.log_every", "cluster.gpus_per_node", "cluster.collective_timeout_s",
    ]
    for key in positive:
        value = _get(run, key)
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if run.resume not in (None, "auto"):
        from parallel.checkpoint import resolve

        if not resolve(run.resume, Path(run.resume)):
            raise ConfigError(f"resume={run.resume}: no complete checkpoint there (a step_NNNNNN directory with "
                              "meta.json, or a directory of them); valid: null, auto, such a path")
    for key in ("checkpoint.every", "checkpoint.keep"):
        if _get(run, key) < 0:
            raise ConfigError(f"{key}={_get(run, key)} must be >= 0")
    non_negative = ["model.shared_expert_ffn_size", "model.aux_loss_factor", "model.z_loss_factor",
                    "trainer.warmup_steps", "trainer.weight_decay", "trainer.grad_clip",
                    "trainer.eval_every", "trainer.min_lr", "model.init_std",
                    "model.seq_aux_loss_factor", "model.expert_bias_update_rate"]
    for key in non_negative:
        value = _get(run, key)
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key in ("trainer.beta1", "trainer.beta2"):
        if not 0 <= _get(run, key) < 1:
            raise ConfigError(f"{key}={_get(run, key)} must be in [0, 1)")
    if t.threads_per_rank is not None and t.threads_per_rank < 1:
        raise ConfigError(f"trainer.threads_per_rank={t.threads_per_rank} must be a positive integer or null")
    if not t.lr > 0:
        raise ConfigError(f"trainer.lr={t.lr} must be > 0")
    if t.min_lr > t.lr:
        raise ConfigError(f"trainer.min_lr={t.min_lr} must be <= trainer.lr={t.lr}")
    if not 0 < run.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={run.data.val_fraction} must be in (0, 1)")
    if m.capacity_factor is not None and not m.capacity_factor > 0:
        raise ConfigError(f"model.capacity_factor={m.capacity_factor} must be > 0 or null (dropless)")

    dims = ParallelDims.from_config(run.parallel)
    dims.validate(launcher_world_size)

    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}"
        )
    if (m.hidden_size // m.num_heads) % 2:
        raise ConfigError(
            f"model.hidden_size/model.num_heads = {m.hidden_size}/{m.num_heads} = "
            f"{m.hidden_size // m.num_heads} must be even (rotary embedding)"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}"
        )
    if not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(
            f"model.top_k={m.top_k} must be between 1 and model.num_experts={m.num_experts}"
        )
    if m.num_experts % dims.ep:
        raise ConfigError(
            f"model.num_experts={m.num_experts} must be divisible by "
            f"parallel.expert_parallel_size={dims.ep}"
        )
    if m.num_layers % m.moe_every_k_layers:
        raise ConfigError(
            f"model.num_layers={m.num_layers} must be divisible by "
            f"model.moe_every_k_layers={m.moe_every_k_layers} (an MoE layer every k layers)"
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"trainer.seq_len={t.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    if run.data.kind == "stdlib" and m.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 256 for byte-level data.kind=stdlib")
    # A key the chosen data source does not read is a mistake, not a setting (data.path
    # with the default stdlib corpus would train on the wrong data and say nothing).
    reads = {"stdlib": ("cache_dir",), "memmap": ("path", "val_path"), "synthetic": ()}
    for key in ("path", "val_path", "cache_dir"):
        value = getattr(run.data, key)
        if value is not None and key not in reads.get(run.data.kind, ()):
            users = [k for k, keys in reads.items() if key in keys]
            raise ConfigError(f"data.{key}={value} is ignored by data={run.data.kind}; "
                              f"it is read by data={' or data='.join(users)} (e.g. data={users[0]} data.{key}=...)")
    if run.data.kind == "memmap" and not run.data.path:
        raise ConfigError("data.path is required for data.kind=memmap (a uint16 token .bin file)")

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
        from parallel.pipeline import stage_layers

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
        raise ConfigError(f"parallel.pipeline_split={list(run.parallel.pipeline_split)} needs "
                          "parallel.pipeline_parallel_size > 1")
    if dims.tp > 1 and not run.parallel.sequence_parallel and (micro_batch_size(run) * t.seq_len) % dims.tp:
        raise ConfigError(
            f"micro_batch_size*trainer.seq_len = {micro_batch_size(run)}*{t.seq_len} tokens must be divisible by "
            f"parallel.tensor_parallel_size={dims.tp} (TP peers route disjoint token slices)"
        )
    return dims
