"""The contract of a run's outputs: one metrics.jsonl record per logged step (``StepRecord``)
and summary.json (``RunSummary``), with the phase and time keys they use, defined here once.

``scripts/compare.py`` reads runs through these types; ``trainer.step_stats`` fills the record,
``trainer.metrics`` writes it. Every number in a record is global: reduced over the ranks that
share it (loss and load statistics summed over the data ranks, TP peers and pipeline stages;
times and bytes as the slowest rank's, since the slowest rank sets the step time).
"""

from __future__ import annotations

from typing import TypedDict

# The sequential phases of a step, as timed (time.<phase>; data: waiting for this rank's
# micro-batches, read ahead by a thread; pipeline: the PP schedule's forward and backward together).
PHASES = ("data", "forward", "backward", "pipeline", "grad_reduce", "optimizer")
# The phases the All-to-All runs inside (its time is part of theirs, never added to them).
A2A_PHASES = ("forward", "backward", "pipeline")
# All-to-All seconds: both directions (a2a), then each.
A2A_TIMES = ("a2a", "a2a_dispatch", "a2a_combine")
# Computations timed apart, forward and backward (recompute included), also inside A2A_PHASES
# and never added to them; the planner's calibration prices each at a rate of its own: the routed
# experts, and the attention core (softmax(QK^T)V, without the projections).
COMPUTE_TIMES = ("experts", "attention_core")


class TimeRecord(TypedDict):
    """``time`` in a record: seconds of the step, each the slowest rank's."""

    data: float
    forward: float
    backward: float
    pipeline: float
    grad_reduce: float
    optimizer: float
    a2a: float
    a2a_dispatch: float
    a2a_combine: float
    experts: float
    attention_core: float
    step: float


TIME_KEYS: tuple[str, ...] = tuple(TimeRecord.__annotations__)  # (*PHASES, *A2A_TIMES, *COMPUTE_TIMES, "step")


class _A2ARecord(TypedDict):
    bytes_sent: int
    bytes_recv: int
    min_bytes: int  # what a dropless exchange of the same routing must send
    ratio: float | None  # bytes_sent / min_bytes; None without an All-to-All


class A2ARecord(_A2ARecord, total=False):
    """``a2a`` in a record: All-to-All bytes of one step, the busiest rank's, and the fan-out
    behind them: over every token of the global batch and every MoE layer, the EP ranks its kept
    (token, k) pairs reach (1 without EP; at most model.max_ranks_per_token when that is set)."""

    fanout_mean: float
    fanout_max: int


class _LoadRecord(TypedDict):
    tokens_per_expert: list[int]
    cv: float  # std / mean of tokens_per_expert
    max_over_mean: float
    min: int
    mean_score: list[float]
    entropy: float  # router entropy per token (nats)
    dropped_fraction: float
    aux_loss: float
    z_loss: float


class LoadRecord(_LoadRecord, total=False):
    """``load["layer<i>"]`` in a record: MoE layer i's balance over the global batch."""

    seq_aux_loss: float  # only when the sequence-wise balance loss is on
    expert_bias_range: list[float]  # [min, max]; only with aux-loss-free balancing
    fanout_mean: float  # EP ranks a token's kept pairs reach in this layer, mean over tokens
    fanout_max: int  # and the most any token reached


class _StepRecord(TypedDict):
    step: int  # completed optimizer steps (1 for the first)
    loss: float  # cross-entropy, mean per token over the global batch
    lr: float
    grad_norm: float
    aux_loss: float
    z_loss: float
    seq_aux_loss: float
    tokens_per_s: float
    samples_per_s: float
    step_s: float
    flops_per_s: float
    mfu: float | None  # None without cluster.peak_flops
    dropped_fraction: float
    time: TimeRecord
    a2a: A2ARecord
    load: dict[str, LoadRecord]  # "layer<i>" for each MoE layer i


class StepRecord(_StepRecord, total=False):
    """One line of metrics.jsonl: a logged step, every number global (reduced over the ranks)."""

    val_loss: float  # on evaluation steps
    skipped: bool  # True on a step whose update was skipped (trainer.on_nonfinite=skip)


class MinMax(TypedDict):
    """A number over the ranks: its least and its most."""

    min: int
    max: int


class PeakBytes(MinMax, total=False):
    """``peak_memory_bytes``: the peak over the ranks, and how it was measured."""

    kind: str  # cuda_max_allocated | cpu_peak_rss


class SplitBytes(TypedDict):
    """Bytes per rank, expert and non-expert, over the ranks."""

    expert: MinMax
    non_expert: MinMax


class MemoryRecord(TypedDict):
    """``memory_per_rank`` in summary.json (trainer.step_stats.memory_report)."""

    param_bytes: SplitBytes
    grad_bytes: SplitBytes
    optimizer_bytes: SplitBytes
    peak_bytes: MinMax
    peak_above_start_bytes: MinMax


class _RunSummary(TypedDict):
    # hostname, hosts and rank_hosts (rank r ran on rank_hosts[r]), device, count, cpus, python,
    # torch (a string in older runs)
    machine: dict | str
    parallel: str  # the layout's name (parallel.dims.layout_name)
    dp: int
    ep: int
    tp: int
    pp: int
    world_size: int
    sharding: str  # parallel.sharding: none | zero2 | zero3
    activation_checkpointing: str  # trainer.activation_checkpointing: none | full | selective
    model: str
    steps: int  # steps this attempt ran
    final_loss: float | None
    final_val_loss: float | None
    median_tokens_per_s: float | None  # None: no step logged
    median_step_s: float | None
    peak_memory_bytes: PeakBytes
    param_bytes_per_rank: SplitBytes
    memory_per_rank: MemoryRecord
    start_step: int
    stopped_by_signal: list[str] | None


class RunSummary(_RunSummary, total=False):
    """summary.json. The medians (over the logged steps after the first) are there when a step
    was logged."""

    time_breakdown: TimeRecord
    a2a_share: float
    a2a_bytes_sent_per_step: float
    median_samples_per_s: float
    median_flops_per_s: float
    mfu: float | None
    load_cv_final: dict[str, float]  # "layer<i>": load CV at the last logged step
    median_over_steps: int
