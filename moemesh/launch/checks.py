"""Before a rank starts: the cluster config and this process's environment must agree
(launcher, devices, kernel backend), the training state must fit this machine's memory, and
the run's files get the access it asks for."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from moemesh.config.schema import RunConfig
from moemesh.config.validate import batch_plan
from moemesh.errors import ConfigError
from moemesh.fields import CommBackend, Device, Dtype, Launcher
from moemesh.kernels import backend_problem
from moemesh.launch.access import output_umask
from moemesh.launch.env import LauncherEnv, stale_launcher_env
from moemesh.moe.config import head_dim
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.pipeline import Placement
from moemesh.planning.memory import activation_bytes
from moemesh.planning.schedules import in_flight_stages


def check_launcher(run: RunConfig, env: LauncherEnv | None, dims: ParallelDims) -> None:
    """The cluster config and the environment must agree; raises ConfigError."""
    for key in ("hang_timeout_s", "rendezvous_timeout_s"):
        if getattr(run.cluster, key) <= 0:
            raise ConfigError(f"cluster.{key}={getattr(run.cluster, key)}: must be > 0 seconds")
    output_umask(run)
    check_interface(run, env)
    stale = stale_launcher_env(env)
    if stale:
        raise ConfigError(stale)
    launcher = run.cluster.launcher
    if launcher == Launcher.torchrun and (env is None or env.kind != "torchrun"):
        raise ConfigError(
            f"cluster.launcher=torchrun but this process has no torchrun environment (RANK, WORLD_SIZE, "
            f"MASTER_ADDR); run: torchrun --nproc_per_node={dims.world_size} train.py parallel={run.parallel.name}"
        )
    in_slurm_job = "SLURM_JOB_ID" in os.environ
    if launcher == Launcher.slurm and not (
        (env is not None and env.kind == "srun") or (in_slurm_job and dims.world_size == 1)
    ):
        raise ConfigError(
            "cluster=slurm but this process is not an srun task of a SLURM job: submit with -m, "
            f"python train.py -m cluster=slurm parallel={run.parallel.name} (one task per rank), or inside "
            f"an allocation run srun -n {dims.world_size} python train.py cluster=slurm parallel={run.parallel.name}"
        )
    if run.trainer.device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; valid here: auto, cpu")
    problem = backend_problem(run.kernels.backend, "cuda" if use_cuda(run) else "cpu", run.model.num_experts)
    if problem:
        raise ConfigError(f"kernels.backend={run.kernels.backend} {problem}")
    if run.cluster.backend == CommBackend.nccl and not use_cuda(run):
        raise ConfigError("cluster.backend=nccl needs CUDA devices; valid here: auto, gloo")
    if use_cuda(run) and env is None and dims.world_size > torch.cuda.device_count():
        raise ConfigError(
            f"parallel={run.parallel.name} needs {dims.world_size} ranks, one GPU each, but this machine has "
            f"{torch.cuda.device_count()} GPUs; launch across nodes (srun/torchrun) or set trainer.device=cpu"
        )


# Where gloo and NCCL find the interface to use (cluster.interface sets both for a launched job).
INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def check_interface(run: RunConfig, env: LauncherEnv | None, environ=os.environ) -> None:
    """cluster.interface must exist on this node and agree with an interface already chosen
    in the environment. Spawned ranks (no launcher) talk over loopback: not checked."""
    name = run.cluster.interface
    if name is None or env is None:
        return
    import socket

    have = [n for _, n in socket.if_nameindex()]
    if name not in have:
        raise ConfigError(
            f"cluster.interface={name}: no such network interface on {socket.gethostname()}; valid here: "
            f"{', '.join(have)}"
        )
    for var in INTERFACE_VARS:
        if environ.get(var, name) != name:
            raise ConfigError(
                f"cluster.interface={name} but {var}={environ[var]} is set: they choose the network two ways; "
                f"unset {var} or set cluster.interface={environ[var]}"
            )


def use_cuda(run: RunConfig) -> bool:
    return run.trainer.device == Device.cuda or (run.trainer.device == Device.auto and torch.cuda.is_available())


def host_memory_bytes() -> int:
    """This machine's memory, or the cgroup's limit (a SLURM job, a container) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_type(run: RunConfig) -> str:
    if run.trainer.device != Device.auto:
        return run.trainer.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def state_bytes_per_param(device_type: str) -> int:
    """Host bytes per parameter while training: fp32 weights, gradients and AdamW's two moments on
    CPU; on CUDA the model is still built in host memory (fp32) before it moves to the GPU."""
    return 16 if device_type == "cpu" else 4


def host_activation_bytes(run: RunConfig, dims: ParallelDims, device_type: str) -> list[int]:
    """Host bytes one rank of each pipeline rank's position needs for its micro-batches (for the
    layers of all its stages: ``Placement.layers_by_rank``): on CPU the planner's activations
    (moemesh.planning.memory.activation_bytes, for the micro-batches the schedule holds at its
    peak: ``in_flight_stages``, one without a pipeline; fp32 unless trainer.dtype=bf16); on a
    GPU, whose activations live there, the micro-batch's token ids (inputs and targets, int64)
    that the host reads before they move."""
    t = run.trainer
    plan = batch_plan(run)
    T = plan.micro_batch_size * t.seq_len  # tokens per micro-batch per data rank
    placement = Placement.of(run.parallel)
    layers = placement.layers_by_rank(run.model.num_layers)
    if device_type != "cpu":
        return [16 * T] * dims.pp
    in_flight = in_flight_stages(run.parallel.pipeline_schedule, dims.pp, placement.v, plan.micro_steps)
    sp = run.parallel.sequence_parallel and dims.tp > 1
    c = 2 if t.dtype == Dtype.bf16 else 4
    ckpt = t.activation_checkpointing
    return [16 * T + activation_bytes(run.model, r, T, dims, sp, ckpt, in_flight, c) for r in layers]


def host_param_counts(run: RunConfig, dims: ParallelDims) -> list[int]:
    """Parameters one rank of each pipeline rank's position holds: the layers of all its stages
    (virtual ones included) as the trainer lays them out (``Placement.layers_by_rank``), with the
    embedding where it holds layer 0 and the head where it holds the last (both on a V's rank 0)."""
    from moemesh.moe.param_count import count_params

    placement = Placement.of(run.parallel)
    return [count_params(run.model, dims, layers=l).total for l in placement.layers_by_rank(run.model.num_layers)]


def check_fits_host(
    run: RunConfig, dims: ParallelDims, *, ranks_here: int | None, host_bytes: int, device_type: str
) -> None:
    """Refuse a run whose training state and micro-batches cannot fit this machine's memory
    (before a rank starts).

    ``ranks_here``: None when this process spawns every rank here; else the ranks a launcher
    starts on this machine (counted at the smallest stage's size: a lower bound, so a run that
    might fit is never refused). Activations are the planner's estimate (host_activation_bytes):
    this catches the impossible, not the tight; scripts/plan.py sizes layouts for GPUs.
    """
    per_stage = host_param_counts(run, dims)
    acts = host_activation_bytes(run, dims, device_type)
    per_param = state_bytes_per_param(device_type)
    if ranks_here is None:
        params = sum(per_stage) * (dims.world_size // dims.pp)
        act = sum(acts) * (dims.world_size // dims.pp)
        ranks = dims.world_size
    else:
        smallest = min(range(dims.pp), key=lambda s: per_stage[s] * per_param + acts[s])
        params, act = per_stage[smallest] * ranks_here, acts[smallest] * ranks_here
        ranks = ranks_here
    state = params * per_param
    # Each rank's rotary tables, cos and sin for every position to model.max_seq_len (fp32, and
    # their angles while they are built): a long max_seq_len is not in the weights' count.
    rope = 3 * run.model.max_seq_len * (head_dim(run.model) // 2) * 4 * ranks
    if state + rope + act <= host_bytes:
        return
    what = (
        "weights, gradients and AdamW state"
        if device_type == "cpu"
        else "weights, built in host memory before they move to the GPU"
    )
    if rope > max(state, act):
        raise ConfigError(
            f"model.max_seq_len={run.model.max_seq_len:,} needs {rope / 2**30:,.1f} GiB of this machine's memory for "
            f"the rotary tables on {ranks} rank(s) (every position, fp32), plus {(state + act) / 2**30:,.1f} GiB for "
            f"the {what} and micro-batches, more than its {host_bytes / 2**30:,.1f} GiB; set model.max_seq_len to "
            f"the longest sequence you train or evaluate on (trainer.seq_len={run.trainer.seq_len})"
        )
    # The tables are named where they count, so that the parts printed add up to more than the host.
    tables = f" and {rope / 2**30:,.1f} GiB for the rotary tables" if rope >= 2**30 / 20 else ""
    if act > state and state + rope <= host_bytes:  # the batch is what does not fit
        t = run.trainer
        plan = batch_plan(run)
        kind = "activations and token ids" if device_type == "cpu" else "token ids"
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} (a micro-batch of {plan.micro_batch_size:,} x "
            f"{t.seq_len} tokens per data rank, {plan.micro_steps} micro-step(s)) needs {act / 2**30:,.1f} GiB of "
            f"this machine's memory for its {kind} on {ranks} rank(s), plus {state / 2**30:,.1f} GiB for {what}"
            f"{tables}, more than its {host_bytes / 2**30:,.1f} GiB; use a smaller trainer.global_batch_size or "
            "trainer.seq_len, or more "
            "trainer.micro_steps (scripts/plan.py sizes a layout)"
        )
    raise ConfigError(
        f"model={run.model.name} ({_largest_part(run)}) needs {state / 2**30:,.1f} GiB of this machine's memory for "
        f"{what} ({params:,} parameters on its {ranks} rank(s) x {per_param} bytes, plus "
        f"{act / 2**30:,.1f} GiB for the micro-batches{tables}), more than its {host_bytes / 2**30:,.1f} GiB; use a "
        "smaller model, or spread the layout over more machines (scripts/plan.py sizes one)"
    )


def _largest_part(run: RunConfig) -> str:
    """The keys that size the model's largest part, for a message that says what to make smaller."""
    from moemesh.moe.param_count import param_specs

    m = run.model
    parts = {
        f"model.vocab_size={m.vocab_size:,}, model.hidden_size={m.hidden_size:,}": ("embed.", "head."),
        f"model.num_experts={m.num_experts}, model.moe_ffn_hidden_size={m.moe_ffn_hidden_size:,}": (".experts.",),
        f"model.shared_expert_ffn_size={m.shared_expert_ffn_size:,}": (".shared.",),
        f"model.ffn_hidden_size={m.ffn_hidden_size:,}": (".ffn.",),
    }
    sizes = dict.fromkeys(parts, 0)
    rest = 0
    for spec in param_specs(m):
        n = math.prod(spec.shape)
        key = next((k for k, marks in parts.items() if any(mark in f".{spec.name}" for mark in marks)), None)
        if key is None:
            rest += n
        else:
            sizes[key] += n
    key, n = max(sizes.items(), key=lambda kv: kv[1])
    if n < rest:
        return f"model.hidden_size={m.hidden_size:,}, model.num_layers={m.num_layers}"
    return f"most of it: {key}"
