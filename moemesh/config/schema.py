"""Typed configuration: the schema Hydra checks every composed config against.

Hydra stays at the edge: ``train.py`` turns the composed ``DictConfig`` into the
dataclasses below (``to_run_config``) and validates them (``conf.validate``);
``moe/``, ``parallel/``, ``kernels/`` and ``trainer/`` only ever see these
dataclasses. Because the schema backs every group, a misspelled key in a YAML
file or on the command line is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moemesh import fields
from moemesh.data.config import DataConfig
from moemesh.errors import ConfigError, cause_of, first_line
from moemesh.fields import (
    SEED_MAX,
    CommBackend,
    Compile,
    Device,
    Dtype,
    KernelBackend,
    Launcher,
    NonFinite,
    OutputAccess,
    PipelineSchedule,
    Recompute,
    Sharding,
    SharedExpertOverlap,
)
from moemesh.moe.config import ModelConfig
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.pipeline import stages_problem


@dataclass
class CommOptimizationConfig:
    # The seed's flag: pipeline each MoE layer's All-to-All with the expert compute.
    all_to_all_overlap: bool = False
    overlap_chunks: int = 2  # token chunks per MoE layer when overlapping
    # With the overlap on, the exchange the shared expert hides: the last chunk's combine
    # (combine), the first chunk's dispatch (dispatch), or none (computed after the combine).
    shared_expert_overlap: SharedExpertOverlap = SharedExpertOverlap.combine

    def __post_init__(self) -> None:
        fields.choice(self, "parallel.comm_optimization.", "shared_expert_overlap", SharedExpertOverlap)
        if self.overlap_chunks < 1:
            raise ConfigError(f"parallel.comm_optimization.overlap_chunks={self.overlap_chunks} must be >= 1")


@dataclass
class ParallelConfig:
    name: str = MISSING
    data_parallel_size: int = 1
    expert_parallel_size: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # TP only: shard the residual stream (norms, dropout-free adds) over the sequence,
    # with reduce-scatter / all-gather in place of the all-reduces around attention and MLP.
    sequence_parallel: bool = False
    # PP only: 1f1b | gpipe | interleaved_1f1b | interleaved_zero_bubble | zbv | dualpipev
    # (torch.distributed.pipelining's; docs/layouts.md); stages per rank (virtual stages; null:
    # the schedule's own, 1 for gpipe and 1f1b, else 2); layers per stage, pp x stages per rank
    # of them (null: balanced by layer count).
    pipeline_schedule: PipelineSchedule = PipelineSchedule["1f1b"]
    pp_stages_per_rank: int | None = None
    pipeline_split: list[int] | None = None
    # How much training state each rank keeps (FSDP2 over the ranks that hold the same
    # weights): none (whole parameters, gradients, AdamW state) | zero2 (gradients and
    # optimizer state sharded) | zero3 (parameters sharded too, gathered per block).
    sharding: Sharding = Sharding.none
    comm_optimization: CommOptimizationConfig = field(default_factory=CommOptimizationConfig)

    def __post_init__(self) -> None:
        fields.choice(self, "parallel.", "pipeline_schedule", PipelineSchedule)
        fields.choice(self, "parallel.", "sharding", Sharding)
        ParallelDims.from_config(self)  # each degree a positive integer (ParallelDims checks when built)
        if self.pipeline_split is not None and self.pipeline_parallel_size == 1:
            raise ConfigError(
                f"parallel.pipeline_split={list(self.pipeline_split)} needs parallel.pipeline_parallel_size > 1"
            )
        fields.positive_or_null(self, "parallel.", "pp_stages_per_rank")
        problem = stages_problem(self.pipeline_schedule, self.pp_stages_per_rank)
        if problem:
            raise ConfigError(problem)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims.from_config(self)


@dataclass
class SlurmConfig:
    """Submission with ``python train.py -m cluster=slurm ...`` (hydra_plugins/moemesh_launcher).

    Nodes and tasks are not set here: each job gets ``nodes x tasks_per_node`` = its
    layout's world size, ``tasks_per_node = min(world size, cluster.gpus_per_node)``.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60  # --time of one attempt (a requeued attempt gets it again)
    request_gpus: bool = True  # --gpus-per-node = tasks per node (false: CPU-only nodes)
    cpus_per_task: int | None = None
    mem_gb: int | None = None  # per node
    # SIGUSR2 this long before the time limit: every rank finishes its step, saves, and the
    # job requeues itself and resumes (at most max_timeouts times; preemptions do not count).
    signal_delay_s: int = 120
    max_timeouts: int = 3
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra --key=value for sbatch
    setup: list[str] = field(default_factory=list)  # shell lines run in the batch script before srun
    # A sweep whose jobs need different allocations: split (one job array per allocation)
    # or reject (before anything is submitted).
    # (A str checked by launch.slurm.validate_slurm: a StrEnum member named "split" would hide str.split.)
    mixed_allocations: str = "split"
    wait: bool = True  # false: print the job ids and return once submitted


@dataclass
class CalibrationConfig:
    """Planner constants fitted to measured runs (``scripts/calibrate.py`` writes them into
    ``conf/cluster/calibrated/<name>.yaml``); unset ones keep the priors of ClusterConfig.
    Keys of ``gbps`` and ``latency_us``: ``<kind>_<link>``, kind a2a | sync (gradients over the
    data and expert groups: all-reduce, or zero2/zero3's reduce-scatter) | gather (zero2/zero3's
    weight all-gathers) | tp | p2p, link intra | inter (node) (``fields.COLLECTIVE_KEYS``). Rates and
    bandwidths are > 0, latencies and the optimizer and overhead terms >= 0, bubble_factor in [0, 1]."""

    source: str | None = None  # what they were fitted from
    flops_per_s: float | None = None  # achieved training FLOP/s per device (replaces peak x --mfu)
    expert_flops_per_s: float | None = None  # the routed experts' own rate (null: flops_per_s)
    attention_core_flops_per_s: float | None = None  # softmax(QK^T)V's own rate (null: flops_per_s)
    gbps: dict[str, float] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)
    optimizer_s_per_gb: float = 0.0  # optimizer step per GB of state a rank updates
    step_overhead_s: float = 0.0  # the rest of a measured step (data, statistics, logging)
    bubble_factor: float | None = None  # share of the pipeline bubble that costs time (null: 1, idle devices)

    def __post_init__(self) -> None:
        p = "cluster.calibration."
        fields.finite_floats(self, p)
        for name in ("flops_per_s", "expert_flops_per_s", "attention_core_flops_per_s"):
            fields.number(self, p, name, lambda v: v > 0, "a finite number > 0 (FLOP/s per device) or null")
        fields.at_least_zero(self, p, "optimizer_s_per_gb", "step_overhead_s")
        fields.number(self, p, "bubble_factor", lambda v: 0 <= v <= 1, "between 0 and 1 (1: idle devices) or null")
        fields.per_collective(self, p, "gbps", lambda v: v > 0, "a finite number > 0 (GB/s)")
        fields.per_collective(self, p, "latency_us", lambda v: v >= 0, "a finite number >= 0 (microseconds)")


@dataclass
class ClusterConfig:
    name: str = MISSING
    # local: spawn the ranks here unless a launcher (torchrun, srun) already started them;
    # torchrun: require torchrun's environment; slurm: submit with -m (one SLURM task per
    # rank), or, inside an allocation, be one of those srun tasks.
    launcher: Launcher = Launcher.local
    backend: CommBackend = CommBackend.auto  # auto: nccl with CUDA, gloo otherwise
    gpus_per_node: int = 8
    # The nodes every job's layout must span (null: whatever its world size needs). Not a
    # setting: a job's nodes follow from its ranks and gpus_per_node; this only states them,
    # so a command that expects 2 nodes is refused when its layout would take another number.
    nodes: int | None = None
    collective_timeout_s: int = 300
    preempt_grace_s: int = 120  # after SIGTERM/SIGUSR1: time to save a checkpoint and stop
    # A rank whose heartbeat (a thread, beating while the process is scheduled at all, also
    # during a long step, a save, an eval or a collective that waits on a peer) stops for this
    # long is named and the job is stopped: a stopped (SIGSTOP, debugger) or frozen process.
    # It must exceed the longest a live rank holds Python's GIL in one native call.
    hang_timeout_s: int = 120
    # Ranks whose RANK/WORLD_SIZE/MASTER_ADDR no known launcher set (no torchrun, deepspeed,
    # srun or mpirun markers) must all meet within this; else the variables are taken for
    # leftovers in the shell and the run is refused (a launcher's ranks keep collective_timeout_s).
    rendezvous_timeout_s: int = 30
    # The network a multi-node run uses (e.g. ib0): gloo and NCCL talk and listen on it
    # (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), and the job's store listens on MASTER_ADDR, which
    # must be one of its addresses (cluster=slurm sets MASTER_ADDR to the first node's). null: the
    # addresses the nodes' host names resolve to. Nothing listens on every address either way.
    interface: str | None = None
    # Who may read what the run writes (run dir, logs, metrics, checkpoints): private (umask
    # 077: 0700/0600), group (umask 027: group may read), inherit (the shell's umask).
    output_access: OutputAccess = OutputAccess.private
    peak_flops: float | None = None  # per device, for MFU; unknown on CPU
    # For scripts/plan.py (planning only; training reads the real machine):
    gpus: int | None = None  # GPUs to plan for
    gpu_memory_gb: float = 80.0
    intra_node_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU between nodes (400 Gb/s InfiniBand)
    latency_us: float = 10.0  # alpha: per message step
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # fitted constants (plan.py)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # cluster=slurm submission

    def __post_init__(self) -> None:
        p = "cluster."
        fields.choice(self, p, "launcher", Launcher)
        fields.choice(self, p, "backend", CommBackend)
        fields.choice(self, p, "output_access", OutputAccess)
        fields.positive(self, p, "gpus_per_node")
        fields.positive_or_null(self, p, "nodes")
        fields.positive_or_null(self, p, "gpus")
        fields.number(self, p, "peak_flops", lambda v: v > 0, "a finite number > 0 (FLOP/s per device) or null")
        fields.greater_than_zero(self, p, "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps")
        fields.at_least_zero(self, p, "latency_us")
        fields.number(self, p, "collective_timeout_s", lambda v: v >= 1, "a positive number of seconds")
        fields.number(
            self,
            p,
            "preempt_grace_s",
            lambda v: v >= 0,
            "a number of seconds >= 0 (the time to save after a stop signal)",
        )
        fields.finite_floats(self, p)


# What wandb 0.31 accepts, checked here so that a mistake is one line before anything starts,
# not a traceback from wandb.init on rank 0 once the ranks run: a project name (wandb's
# Settings.validate_project; the entity is the same URL path's first part, so the same rule),
# and WANDB_MODE (Settings.mode's values).
WANDB_NAME_CHARS = "/\\#?%:"
WANDB_NAME_MAX = 128
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
WANDB_DEFAULT_PROJECT = "moemesh"


def _wandb_name_problem(value: str) -> str | None:
    bad = sorted({c for c in value if c in WANDB_NAME_CHARS})
    if bad:
        return f"cannot hold {' '.join(bad)} (wandb refuses any of {' '.join(WANDB_NAME_CHARS)})"
    if not value.strip() or len(value) > WANDB_NAME_MAX:
        return f"must be 1 to {WANDB_NAME_MAX} characters, not all blank"
    return None


@dataclass
class LoggerConfig:
    name: str = MISSING
    console: bool = True
    jsonl: bool = True
    wandb: bool = False  # a wandb run from rank 0 (offline unless credentials are present)
    project: str | None = None  # null: WANDB_PROJECT if set, else "moemesh"
    entity: str | None = None  # null: WANDB_ENTITY if set, else the key's default entity
    group: str | None = None  # null: the sweep directory's name under -m, else none
    job_type: str = "train"
    # wandb online: seconds to reach the server at start; then the run logs offline (one note),
    # never stops. An unreachable host is found sooner, by a connection probe.
    init_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        fields.number(self, "logger.", "init_timeout_s", lambda v: v > 0, "a finite number of seconds > 0")
        for name in ("project", "entity"):
            value = getattr(self, name)
            if value is not None and (problem := _wandb_name_problem(value)):
                raise ConfigError(f"logger.{name}={value!r} {problem}")
        if self.wandb:  # what wandb will read from the environment, checked before anything starts
            env = os.environ
            mode = env.get("WANDB_MODE")
            if mode and mode not in WANDB_MODES:
                raise ConfigError(f"WANDB_MODE={mode!r} is not one of {', '.join(WANDB_MODES)} (logger=wandb)")
            for name, var in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")):
                value = env.get(var)
                if getattr(self, name) is None and value and (problem := _wandb_name_problem(value)):
                    raise ConfigError(f"{var}={value!r} {problem} (logger.{name} is null: wandb reads {var})")

    @property
    def wandb_project(self) -> str:
        """The project a wandb run goes to: logger.project, else WANDB_PROJECT, else "moemesh"."""
        return self.project or os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT


@dataclass
class TrainerConfig:
    steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all data ranks
    # Micro-steps per optimizer step: the global batch is cut into this many micro-steps first,
    # then each over the data ranks. The balance loss is computed per micro-step, so layouts
    # compare the same objective only with the same count (a sweep holds it equal).
    # None: from micro_batch_size if set, else 1 (pipeline layouts: pp, for a full 1F1B).
    micro_steps: int | None = None
    micro_batch_size: int | None = None  # sequences per forward on one data rank; None: from micro_steps
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 4
    log_every: int = 1
    seed: int = 1234  # 0 .. 2**64-1 (torch and numpy generators)
    device: Device = Device.auto  # auto | cpu | cuda
    dtype: Dtype = Dtype.auto  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    threads_per_rank: int | None = None  # CPU: None splits the cores over local ranks
    # Recompute each transformer block's activations in backward: none | full (keep only the
    # block's input and its collectives' outputs) | selective (keep the attention output and
    # the expert matmul outputs too). Never repeats an All-to-All or a TP collective: the
    # recompute replays their recorded outputs (moemesh/parallel/recompute.py).
    activation_checkpointing: Recompute = Recompute.none
    on_nonfinite: NonFinite = NonFinite.stop  # a non-finite loss or gradient norm: stop | skip (the step)
    # torch.compile: none | blocks (each block's compute: norms, attention, dense FFN, router,
    # shared expert) | model (the whole forward; not with pp); the All-to-All, the routed experts,
    # every other collective and the pipeline schedule stay outside the compiled regions
    # (trainer/parallelize.py: apply_compile).
    compile: Compile = Compile.none
    # on_nonfinite=skip: stop (FloatingPointError, exit 1) after this many skipped steps in a
    # row; the weights do not change while steps are skipped, so more would rarely recover.
    max_skipped_steps: int = 10

    def __post_init__(self) -> None:
        p = "trainer."
        for name, cls in (
            ("device", Device),
            ("dtype", Dtype),
            ("activation_checkpointing", Recompute),
            ("on_nonfinite", NonFinite),
            ("compile", Compile),
        ):
            fields.choice(self, p, name, cls)
        fields.positive(self, p, "steps", "global_batch_size", "seq_len", "eval_batches", "log_every")
        fields.positive(self, p, "max_skipped_steps")
        fields.positive_or_null(self, p, "micro_steps", "micro_batch_size", "threads_per_rank")
        fields.non_negative(self, p, "warmup_steps", "eval_every")
        fields.greater_than_zero(self, p, "lr")
        fields.at_least_zero(self, p, "min_lr", "weight_decay")
        fields.at_least_zero(self, p, "grad_clip", valid="a finite number >= 0 (0: no clipping)")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(
                f"trainer.seed={self.seed} must be in [0, 2**64-1 = {SEED_MAX}] "
                "(the range of torch's and numpy's generators)"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be in [0, 1)")
        fields.finite_floats(self, p)
        if self.min_lr > self.lr:
            raise ConfigError(f"trainer.min_lr={self.min_lr} must be <= trainer.lr={self.lr}")


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end)
    keep: int = 3  # complete checkpoints kept (older ones are deleted)
    save_final: bool = True
    dir: str | None = None  # null: <run dir>/checkpoints

    def __post_init__(self) -> None:
        fields.non_negative(self, "checkpoint.", "every", "keep")


@dataclass
class KernelsConfig:
    # auto: Triton on CUDA, the torch reference elsewhere; triton on CPU needs TRITON_INTERPRET=1.
    backend: KernelBackend = KernelBackend.auto

    def __post_init__(self) -> None:
        fields.choice(self, "kernels.", "backend", KernelBackend)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # null: start fresh; auto: the latest complete checkpoint in checkpoint.dir (fresh if
    # none); or a path to one checkpoint or to a directory of them (any layout).
    resume: str | None = None


def schema_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema defines, e.g. ``parallel.expert_parallel_size``."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(schema_keys(type(default), key + "."))
    return keys


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_key(key: str) -> str:
    """``key: no such key`` and the likeliest meant key: a sibling of a close name
    (``trainer.stpes``), else a key of a close name elsewhere (``trainer.capacity_factor`` is
    ``model.capacity_factor``), else the keys of its group when they are few enough to read."""
    keys = schema_keys()
    parent, _, name = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    by_name = {k.rpartition(".")[2]: k for k in siblings}
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
    if not close:  # the same name in another group: the last part alone, never an ancestor of key
        elsewhere = [k for k in keys if not key.startswith(k + ".") and k != key]
        names: dict[str, str] = {}
        for k in elsewhere:
            names.setdefault(k.rpartition(".")[2], k)
        close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.8)
        hint = f"; did you mean {names[close[0]]}?" if close else ""
    else:
        hint = f"; did you mean {by_name[close[0]]}?"
    if not hint and siblings and len(siblings) <= 12:
        hint = f"; valid keys here: {', '.join(by_name)}"
    elif not hint and siblings:
        hint = f"; {parent} has {len(siblings)} keys: `python train.py --cfg job --package {parent}` lists them"
    return f"{key}: no such key{hint}"


_TYPE_NAMES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _choice_types(cls: type = RunConfig, prefix: str = "") -> dict[str, type]:
    """Every choice key of the schema and its StrEnum, e.g. {"parallel.sharding": Sharding}."""
    out: dict[str, type] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
            out[f"{prefix}{name}"] = hint
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out |= _choice_types(hint, f"{prefix}{name}.")
    return out


@functools.cache
def bool_keys(cls: type = RunConfig, prefix: str = "") -> frozenset[str]:
    """Every true-or-false key of the schema, e.g. ``parallel.sequence_parallel``."""
    out: set[str] = set()
    for name, hint in typing.get_type_hints(cls).items():
        if hint is bool:
            out.add(f"{prefix}{name}")
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out |= bool_keys(hint, f"{prefix}{name}.")
    return frozenset(out)


def bool_value_error(key: str, value: Any) -> str | None:
    """OmegaConf takes any number for a bool (``sequence_parallel=2`` became true); a number
    other than 0 or 1 is refused here, one line."""
    if key in bool_keys() and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
        return f"{key}={value}: expected true or false"
    return None


_UNITS = {"_min": "minutes", "_s": "seconds", "_us": "microseconds", "_bytes": "bytes"}


def _unit_hint(key: str, value: str, target: str) -> str:
    """What a number key counts, from its suffix (``time_min``: minutes), and sbatch's
    [D-]HH:MM:SS given to a minutes key converted (``time_min=01:30:00`` is ``time_min=90``)."""
    unit = next((u for suffix, u in _UNITS.items() if key.endswith(suffix)), None)
    if unit is None or key.endswith("_per_s"):  # a rate, not a time
        return _TYPE_NAMES.get(target, target)
    kind = "a whole number" if target == "Integer" else "a number"
    clock = re.fullmatch(r"(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})", value.strip())
    if clock and unit == "minutes":
        days, h, m, sec = (int(x or 0) for x in clock.groups())
        return f"{kind} of {unit} ({key}={days * 1440 + h * 60 + m + (sec > 0)} for {value})"
    return f"{kind} of {unit}"


def explain_omegaconf(cause: OmegaConfBaseException, *, overriding: bool = False, key: str | None = None) -> str:
    """One line for OmegaConf's refusal of a value or key: the key, the value, what would be valid.
    ``overriding``: Hydra's "Could not override" (a key the schema lacks); ``key``: the dotted key
    to name, when the caller knows it better than OmegaConf (an item of a list)."""
    if key is None:
        key = cause.full_key or getattr(cause, "key", "") or ""
    msg = first_line(cause.msg or str(cause))
    if re.match(r"Key '.*' not in '", msg) or overriding:
        return _unknown_key(key)
    m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        value, _, target = m.groups()
        via = ""
        interp = re.search(r"While dereferencing interpolation '([^']*)'", msg)
        if interp and "oc.env" in interp.group(1):  # an environment variable's value may be a secret
            return f"{key}={interp.group(1)}: expected {_TYPE_NAMES.get(target, target)} (its value is not shown)"
        if interp:
            via = f" ({interp.group(1)} resolves to {value!r})"
        return f"{key}={value}{via}: expected {_unit_hint(str(key), value, target)}"
    m = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if m:  # a choice (a StrEnum field) given another value
        value, cls = m.group(1), _choice_types().get(str(key))
        if cls is not None:
            return fields.choice_error(str(key), value, cls)
        valid = [v.strip() for v in m.group(2).split(",")]
        return f"{key}={value!r} is not one of {', '.join(valid)}{did_you_mean(value, valid)}"
    shape = _shape_mistake(key, msg)
    if shape:
        return shape
    if "is not Optional" in msg:
        return f"{key}: cannot be null"
    if "missing mandatory value" in msg:
        return f"{key}: missing a value (a config group's preset may have been removed)"
    return f"{key}: {msg}" if key else msg


def _shape_mistake(key: str, msg: str) -> str | None:
    """A value of the wrong shape: a scalar for a list, a word for a bool, a value for a group."""
    if re.search(r"is not a ListConfig, list or tuple|Cannot merge DictConfig with ListConfig", msg):
        return f"{key}: expected a list in brackets ({key}=[...], comma-separated)"
    m = re.search(r"Value '(.*)' is not a valid bool", msg)
    if m:
        return f"{key}={m.group(1)}: expected true or false"
    m = re.search(r"Invalid type assigned: (\w+) is not a subclass of (\w+)\. value: (.*)$", msg)
    if m:  # a group's whole node given a plain value (kernels=torch for kernels.backend=torch)
        node = _node_types().get(m.group(2))
        leaves = [f.name for f in dataclasses.fields(node)] if node is not None else []
        example = f"{key}.{leaves[0]}={m.group(3)}" if len(leaves) == 1 else f"{key}.<key>=..."
        shown = f" ({', '.join(leaves[:6])}{', ...' if len(leaves) > 6 else ''})" if leaves else ""
        return f"{key}={m.group(3)}: {key} is a group of keys{shown}, not a value; set one: {example}"
    return None


@functools.cache
def _node_types() -> dict[str, type]:
    """The schema's dataclasses by name (KernelsConfig -> its class), for a message that lists a
    node's keys."""
    found: dict[str, type] = {}

    def walk(cls: type) -> None:
        if not dataclasses.is_dataclass(cls) or cls.__name__ in found:
            return
        found[cls.__name__] = cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for t in (hints.get(f.name), *typing.get_args(hints.get(f.name))):
                if isinstance(t, type):
                    walk(t)

    walk(RunConfig)
    return found


def register_schema() -> None:
    """Register the schema; config.yaml lists ``moemesh_schema`` first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="moemesh_schema", node=RunConfig)


@functools.cache
def _schema() -> DictConfig:
    """RunConfig as an OmegaConf structured config, built once (half of to_run_config's time)."""
    return OmegaConf.structured(RunConfig)


def to_run_config(cfg: Any, *, full_error: bool = False) -> RunConfig:
    """The composed Hydra config as typed dataclasses (interpolations resolved), every field
    checked (the dataclasses' ``__post_init__``). A refused value or key is a ConfigError, one
    line (``full_error``: OmegaConf's own exception, for HYDRA_FULL_ERROR=1)."""
    if isinstance(cfg, RunConfig):
        return cfg
    try:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg)
        cfg.pop("hydra", None)
        merged = OmegaConf.merge(_schema(), cfg)  # a new config: the cached schema is not changed
        run = OmegaConf.to_object(merged)  # typed as any container; a structured config gives its dataclass
    except ConfigError as err:  # a field's check (__post_init__)
        raise _from_config_json(err, cfg) from None
    except OmegaConfBaseException as err:
        cause = _config_error_inside(err)
        if cause is not None:  # raised by the ${hf:...} resolver: its own line, not OmegaConf's wrapping
            raise cause from None
        if full_error:
            raise
        raise ConfigError(explain_omegaconf(err)) from None
    assert isinstance(run, RunConfig), type(run)
    if run.model.hf_path is not None:  # overrides and tensors against the checkpoint, before anything starts
        from moemesh.interop.hf import check_checkpoint, check_model

        check_model(run.model)
        check_checkpoint(run.model)
    return run


def _from_config_json(err: ConfigError, cfg: Any) -> ConfigError:
    """``err``, saying so where the value it names came from model.hf_path's config.json: the
    user never wrote ``model.num_layers=0``, the checkpoint's num_hidden_layers did."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    found = re.match(r"model\.(\w+)=(\S+)", str(err))
    if not (isinstance(model, dict) and model.get("hf_path") and found):
        return err
    from moemesh.interop.hf.families import read_from_config

    upcycle = model.get("upcycle")
    upcycle_items = tuple(sorted(upcycle.items())) if isinstance(upcycle, dict) else ()
    source = read_from_config(str(model["hf_path"]), found.group(1), model.get(found.group(1)), upcycle_items)
    return ConfigError(f"{err} (read from {source})") if source else err


def _config_error_inside(err: BaseException) -> ConfigError | None:
    """The ConfigError a resolver raised, which OmegaConf wraps (as cause or context, maybe twice)."""
    found = cause_of(err, ConfigError, depth=8)
    return found if isinstance(found, ConfigError) else None


def _hf_field(key: str, *, _root_: Any) -> Any:
    """``${hf:<key>}`` (conf/model/hf.yaml): model field ``key`` read from ``model.hf_path``'s
    config.json when the command is composed (moemesh/interop/hf/families.py), so that validation,
    the planner and the host-memory check see the real shapes."""
    model = _root_.model
    path = OmegaConf.select(model, "hf_path", throw_on_missing=False)
    if path is None or OmegaConf.is_missing(model, "hf_path"):
        raise ConfigError("model.hf_path: missing a value; model=hf reads the model from it (a checkpoint directory)")
    upcycle = OmegaConf.to_container(model.upcycle, resolve=True) if "upcycle" in model else {}
    assert isinstance(upcycle, dict)
    from moemesh.interop.hf import checkpoint_fields

    return checkpoint_fields(str(path), tuple(sorted(upcycle.items())))[key]


OmegaConf.register_new_resolver("hf", _hf_field, replace=True)
