"""Field checks for the config dataclasses: each dataclass checks its own fields in
``__post_init__`` with these, so a rule sits beside the field it guards and holds however the
dataclass is built (Hydra's compose, a test, the planner's ``dataclasses.replace``). Rules
that cross groups live in ``moemesh.config.validate``.

Every failure is one ``ConfigError`` line naming the dotted key, its value and what would be
valid. Choices are ``StrEnum``s: a plain string is turned into its member here, so code
compares members, and a str / f-string of a member is its value.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
from collections.abc import Callable
from typing import Any, TypeVar

from moemesh.errors import ConfigError

E = TypeVar("E", bound=enum.StrEnum)

# torch.manual_seed takes 0 .. 2**64-1 (negatives wrap), numpy's default_rng (synthetic data)
# refuses negatives; every seed derived from it is reduced into the generator's range.
SEED_MAX = 2**64 - 1


def choice(obj: Any, prefix: str, name: str, cls: type[E]) -> None:
    """``obj.name`` as a member of ``cls`` (from its value); else one line with the valid ones."""
    value = getattr(obj, name)
    if isinstance(value, cls):
        return
    try:
        setattr(obj, name, cls(value))
    except ValueError:
        raise ConfigError(choice_error(f"{prefix}{name}", value, cls)) from None


def choice_error(key: str, value: Any, cls: type[enum.StrEnum]) -> str:
    """The one line for a value that is none of ``cls``'s: the valid ones, what they mean where
    the names alone do not say (``NOTES``), and the closest one."""
    valid = [m.value for m in cls]
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    note = f" ({NOTES[cls]})" if cls in NOTES else ""
    return f"{key}={value!r} is not one of {', '.join(valid)}{note}{hint}"


def positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{prefix}{name}={value} must be a positive integer")


def positive_or_null(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"{prefix}{name}={value} must be a positive integer or null")


def non_negative(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{prefix}{name}={value} must be >= 0")


def number(obj: Any, prefix: str, name: str, ok: Callable[[float], bool], valid: str) -> None:
    """A float key with a range (None passes: a nullable key); NaN fails every comparison."""
    value = getattr(obj, name)
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{prefix}{name}={value} must be {valid}")


def greater_than_zero(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        number(obj, prefix, name, lambda v: v > 0, "a finite number > 0")


def at_least_zero(obj: Any, prefix: str, *names: str, valid: str = "a finite number >= 0") -> None:
    for name in names:
        number(obj, prefix, name, lambda v: v >= 0, valid)


def finite_floats(obj: Any, prefix: str) -> None:
    """Every float field of ``obj`` (not nested dataclasses: they check their own) is finite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}={value} must be a finite number")


# The planner's collective kinds and link classes (planning/calibration.py prices them):
# cluster.calibration.gbps and latency_us are keyed "<kind>_<link>".
COLLECTIVE_KINDS = ("a2a", "sync", "gather", "tp", "p2p")
LINKS = ("intra", "inter")
COLLECTIVE_KEYS = tuple(f"{k}_{l}" for k in COLLECTIVE_KINDS for l in LINKS)


def per_collective(obj: Any, prefix: str, name: str, ok: Callable[[float], bool], valid: str) -> None:
    """A dict field keyed by COLLECTIVE_KEYS: each key one of them (the closest named), each value
    finite and ``ok``."""
    for key, value in getattr(obj, name).items():
        if key not in COLLECTIVE_KEYS:
            close = difflib.get_close_matches(str(key), COLLECTIVE_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"{prefix}{name}.{key} is no collective: keys are <kind>_<link>, kind "
                f"{' | '.join(COLLECTIVE_KINDS)}, link {' | '.join(LINKS)}{hint}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{prefix}{name}.{key}={value} must be {valid}")


# ---- the choices the config offers (each implemented where its comment says) ----------------
# OmegaConf refuses any other value when Hydra composes (it looks members up by name, so a
# member's name is its value; "1f1b" and "global" are no Python names, hence the functional
# form). Torch-free, at the bottom of the layers, so that the planner and the model's config
# can name them too.


class ScoreFunc(enum.StrEnum):
    """model.score_func (moe/router.py): softmax over the experts, or a sigmoid per expert."""

    softmax = "softmax"
    sigmoid = "sigmoid"


class QKNorm(enum.StrEnum):
    """model.qk_norm (moe/model.py): RMSNorm of the queries and keys before RoPE: none, per head
    (over each head's Dh, one weight [Dh] shared by the heads: Qwen3), or over the whole
    projection (every head at once, one weight [H*Dh] and [G*Dh]: OLMoE)."""

    none = "none"
    head = "head"
    full = "full"


class RopePairing(enum.StrEnum):
    """model.rope_pairing (moe/model.py): which dimensions of a head RoPE rotates together:
    interleaved pairs (2i, 2i+1), moemesh's default, or the two halves (i, i + Dh/2), the
    Llama family's (every Hugging Face model moemesh imports)."""

    interleaved = "interleaved"
    half = "half"


# model.load_balance_scope (moe/router.py): "global" reduces the balance statistics over the data
# group (every layout optimises the same loss), "local" keeps them per rank and micro-batch.
LoadBalanceScope = enum.StrEnum("LoadBalanceScope", [("global", "global"), ("local", "local")])


class KernelBackend(enum.StrEnum):
    """kernels.backend (moemesh/kernels): Triton on CUDA and the torch reference elsewhere, or one forced."""

    auto = "auto"
    triton = "triton"
    torch = "torch"


class Sharding(enum.StrEnum):
    """parallel.sharding (parallel/fsdp.py): none (whole parameters, gradients, AdamW state on every
    data rank), zero2 (gradients and optimizer state sharded), zero3 (parameters sharded too)."""

    none = "none"
    zero2 = "zero2"
    zero3 = "zero3"


class SharedExpertOverlap(enum.StrEnum):
    """parallel.comm_optimization.shared_expert_overlap (moe/overlap.py), with all_to_all_overlap on:
    the shared expert runs while the first dispatch is in flight (dispatch), while the last
    combine is (combine), or after the combine (none)."""

    none = "none"
    dispatch = "dispatch"
    combine = "combine"


# parallel.pipeline_schedule (parallel/pipeline.py: torch.distributed.pipelining's schedules): one
# stage per rank (gpipe, 1f1b), several (interleaved_1f1b, interleaved_zero_bubble), two placed in a
# V (zbv, dualpipev); the zero-bubble ones split each backward into input and weight gradients.
PipelineSchedule = enum.StrEnum(
    "PipelineSchedule",
    [
        ("1f1b", "1f1b"),
        ("gpipe", "gpipe"),
        ("interleaved_1f1b", "interleaved_1f1b"),
        ("interleaved_zero_bubble", "interleaved_zero_bubble"),
        ("zbv", "zbv"),
        ("dualpipev", "dualpipev"),
    ],
)


class Recompute(enum.StrEnum):
    """trainer.activation_checkpointing (parallel/recompute.py): none | full (keep only each block's
    input and its collectives' outputs) | selective (also the attention core's and the expert
    GEMMs' outputs)."""

    none = "none"
    full = "full"
    selective = "selective"


class Compile(enum.StrEnum):
    """trainer.compile (trainer/parallelize.py: apply_compile): none | blocks (torch.compile each
    block's compute: norms, attention, dense FFN, router, shared expert) | model (the whole
    model's forward in one call, graph-broken around each MoE layer's routed path); the
    All-to-All, the routed experts, every other collective and the pipeline stay outside."""

    none = "none"
    blocks = "blocks"
    model = "model"


class NonFinite(enum.StrEnum):
    """trainer.on_nonfinite (trainer/nonfinite.py): a non-finite loss or gradient norm stops the run
    or skips the step."""

    stop = "stop"
    skip = "skip"


class Device(enum.StrEnum):
    """trainer.device: auto (CUDA when available), cpu, cuda."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dtype(enum.StrEnum):
    """trainer.dtype: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Launcher(enum.StrEnum):
    """cluster.launcher (moemesh/launch): spawn here, join torchrun's ranks, or SLURM's tasks."""

    local = "local"
    torchrun = "torchrun"
    slurm = "slurm"


class CommBackend(enum.StrEnum):
    """cluster.backend: auto (nccl with CUDA, gloo otherwise), gloo, nccl."""

    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class OutputAccess(enum.StrEnum):
    """cluster.output_access (launch/checks.py): private (umask 077), group (027: group may read),
    inherit (the shell's umask)."""

    private = "private"
    group = "group"
    inherit = "inherit"


class DataKind(enum.StrEnum):
    """data.kind (moemesh/data): the stdlib byte corpus, directories of scripts/prepare_data.py,
    a nanoGPT-style uint16 file, random tokens."""

    stdlib = "stdlib"
    tokens = "tokens"
    memmap = "memmap"
    synthetic = "synthetic"


# What each value of a choice means, where the names alone do not say (in its error line).
NOTES: dict[type, str] = {
    OutputAccess: "private: 0700/0600; group: group may read, 0750/0640; inherit: the shell's umask",
    PipelineSchedule: "docs/layouts.md#pipeline-schedules: what each needs of micro-steps and stages per rank",
}
