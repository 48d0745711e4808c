"""The training loop, in the order things happen: ``build_training`` sets up once and returns
a ``TrainState``; ``train_step`` runs one optimizer step (LR -> micro-steps (forward,
backward) -> gradient reduction -> clip -> optimizer step -> metrics all-reduce) and returns
a ``StepResult``; the outer loop (``run_training``) evaluates, logs, checkpoints and stops.

Host syncs of a step, each marked "host sync" where it happens: the gradient norm's
finiteness (every step, where the host decides: on the CPU, and with
trainer.on_nonfinite=skip; on CUDA with stop it is a device-side assert ordered before
the update, no sync; ``trainer.nonfinite``), the reduced metrics and the stop flag (every
step), the gradient norm's value, the slowest rank's times and the bias ranges (logged
steps), the validation loss (evaluation steps). Outside this file: the All-to-All's split
sizes (moe/dispatcher.py, per MoE layer and micro-step), checkpoint saves and, on CUDA,
PhaseTimer's phase edges (a synchronize at each phase's start and end). The clip
(parallel/grads.py) stays on the device on CUDA; off CUDA it reads its scale (free there)
to skip a no-op multiply.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moemesh.config.schema import RunConfig
from moemesh.config.validate import batch_plan, config_warnings
from moemesh.fields import Dtype
from moemesh.kernels import get_ops
from moemesh.launch import RankContext
from moemesh.moe.config import is_moe_layer
from moemesh.moe.layer import MoELayer
from moemesh.moe.model import Transformer
from moemesh.moe.param_count import model_flops_per_token
from moemesh.parallel.comm import CommMeter, all_reduce_
from moemesh.parallel.dims import layout_name
from moemesh.parallel.fsdp import reshard_all
from moemesh.parallel.grads import GradReducer, clip_grads_, global_grad_norm
from moemesh.parallel.mesh import ParallelMesh
from moemesh.parallel.pipeline import evaluate_pipeline
from moemesh.runs.records import PeakBytes, RunSummary, StepRecord
from moemesh.trainer.checkpointing import Checkpointer
from moemesh.trainer.data import TokenData
from moemesh.trainer.host import machine, peak_memory_bytes, reset_peak, resident_bytes
from moemesh.trainer.metrics import MetricsLogger, StepSample
from moemesh.trainer.nonfinite import NonFinitePolicy
from moemesh.trainer.optim import build_optimizer, lr_at
from moemesh.trainer.parallelize import (
    ParamGroups,
    Sharded,
    build_model,
    grad_reducer,
    load_hf_weights,
    param_groups,
    pipeline_schedule,
    pipeline_stage_modules,
    shard_model,
    tied_embedding_sync,
)
from moemesh.trainer.step_stats import (
    RankTimes,
    ReducedStats,
    StepShape,
    StepStats,
    bias_ranges,
    grad_bytes,
    memory_report,
    step_record,
)


def _autocast(run: RunConfig, device: torch.device):
    dtype = run.trainer.dtype
    if dtype == Dtype.bf16 or (dtype == Dtype.auto and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rank_batch(batch, micro_start, micro: int, accum: int):
    """This data rank's micro-batches, concatenated in micro-step order (for the pipeline)."""
    parts = [batch(start=micro_start(i), count=micro) for i in range(accum)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _pipeline_step(pipe, model: Transformer, x, y, losses, *, train: bool = True) -> None:
    """One schedule pass: the first stage feeds tokens, the last gets targets and losses."""
    args = (x,) if model.first else ()
    kwargs = {"target": y, "losses": losses} if model.last else {}
    (pipe.step if train else functools.partial(evaluate_pipeline, pipe))(*args, **kwargs)


class PhaseTimer:
    """Wall-clock seconds per phase of one step; on CUDA it synchronises at phase edges
    (observability costs a little speed there; the step's numbers need it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _stop_signal(ctx, group, device) -> int:
    """The largest stop signal's number any rank received (0: none), so that every rank stops after
    the same step and names a signal another rank got (the exit code is 128 + it)."""
    mine = max((int(getattr(signal, name, signal.SIGTERM)) for name in ctx.stop_signals()), default=0)
    if ctx.stop_requested() and not mine:
        mine = int(signal.SIGTERM)
    t = torch.tensor([float(mine)], device=device)
    all_reduce_(t, group, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())  # host sync: the host decides whether to save and stop


@dataclass
class TrainState:
    """Everything a rank trains with, built once by ``build_training``."""

    run: RunConfig
    ctx: RankContext
    model: Transformer
    optimizer: torch.optim.Optimizer
    data: TokenData
    log: MetricsLogger
    ckpt: Checkpointer
    meter: CommMeter  # the All-to-All's bytes and time, the experts' and attention core's time
    groups: ParamGroups  # parameters by how their gradients reduce and count in the norm
    reducer: GradReducer | None  # None under parallel.sharding: FSDP2 reduces in the backward
    tied: Callable[[], None] | None  # tied embeddings under PP: the first and last stages' gradients summed
    sharded: Sharded | None
    pipe: Any  # the pipeline schedule, None without PP
    micro: int  # sequences per forward on one data rank
    accum: int  # micro-steps per optimizer step
    micro_start: Callable[[int], int]  # micro-step i -> its first global sample on this data rank
    shape: StepShape
    local_moe: dict[int, MoELayer]  # this stage's MoE layers by their slot in the global statistics
    nonfinite: NonFinitePolicy
    start: int  # the first step to run (a resumed run's checkpoint step)
    start_bytes: int  # what the rank held before the model: the memory report's baseline
    # The most gradient bytes [expert, non-expert] this rank held after a step's backward and
    # reduction (its FSDP shards in the sharded modes): the memory report's, measured.
    grad_bytes: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def mesh(self) -> ParallelMesh:
        return self.ctx.mesh


@dataclass
class StepResult:
    """One optimizer step, as the outer loop needs it."""

    lr: float
    grad_norm: torch.Tensor  # on the device: read (a host sync) only on logged steps
    updated: bool  # False: skipped for a non-finite gradient norm (trainer.on_nonfinite=skip)
    stats: ReducedStats  # the loss terms and per-layer statistics summed over every rank
    times: RankTimes  # this rank's phase times and All-to-All bytes


def train(run: RunConfig, ctx: RankContext) -> RunSummary:
    """Train on this rank; rank 0 also owns the experiment tracker, finished on every exit. The
    tracker starts once the run knows whether it resumed: a resumed run continues its wandb run,
    a fresh one in the same directory starts another."""
    state = build_training(run, ctx)
    tracker = None
    try:
        if ctx.rank == 0 and run.logger.wandb:
            from moemesh.trainer.wandb_tracker import WandbTracker

            tracker = WandbTracker(run, ctx.mesh.dims, ctx.output_dir, resumed=state.start > 0)
            state.log.tracker = tracker
            if tracker.note:
                state.log.message(f"moemesh: {tracker.note}")
        summary = run_training(state)
    except BaseException:
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    if tracker is not None:
        tracker.finish(exit_code=0)
    return summary


def build_training(run: RunConfig, ctx: RankContext) -> TrainState:
    """The model laid out for this rank (``trainer.parallelize``), sharded, the optimizer, the
    data, the logger and the checkpointer; resumed from a checkpoint when ``resume`` is set."""
    t, m, mesh, device = run.trainer, run.model, ctx.mesh, ctx.device
    dims = mesh.dims
    torch.manual_seed(t.seed)
    reset_peak(device)
    start_bytes = resident_bytes(device)  # before the model: the memory report's baseline
    meter = CommMeter(device)
    model = build_model(run, mesh, device, meter=meter)
    # Sharded modes: FSDP2 reduce-scatters each block's gradients during the backward;
    # otherwise the reducer all-reduces them after it. (Sharding replaces the parameters:
    # group them after it.)
    stages = pipeline_stage_modules(run, mesh, model)  # under PP: one module per stage this rank runs
    sharded = shard_model(run, mesh, model, device, stages)
    groups = param_groups(model)
    optimizer = build_optimizer(model, t)
    log = MetricsLogger(
        ctx.output_dir,
        enabled=ctx.rank == 0,
        console=run.logger.console,
        jsonl=run.logger.jsonl,
        total_steps=t.steps,
    )
    plan = batch_plan(run)
    micro, accum = plan.micro_batch_size, plan.micro_steps
    moe_layers = [l for l in range(m.num_layers) if is_moe_layer(m, l)]
    shape = StepShape(
        tokens=t.global_batch_size * t.seq_len,
        samples=t.global_batch_size,
        num_experts=m.num_experts,
        moe_layers=moe_layers,
        flops_per_token=model_flops_per_token(m, t.seq_len),
        peak_flops=run.cluster.peak_flops,
        world_size=dims.world_size,
        loss_norm=dims.data_size * accum,
    )
    log.message(
        f"moemesh: {layout_name(dims)} ({dims.describe()}), model={m.name}, "
        f"{sum(p.numel() for p in model.parameters()):,} params on rank 0, "
        f"global batch {t.global_batch_size} x {t.seq_len} tokens, micro batch {micro} x {accum} accumulation, "
        f"kernels={get_ops(run.kernels.backend, device.type, m.num_experts).name}"
    )
    data = TokenData(ctx.data_paths, seed=t.seed)  # reads ahead in a thread of its own (moemesh.data)
    ckpt = Checkpointer(
        run, model, optimizer, mesh, Path(run.checkpoint.dir or Path(ctx.output_dir) / "checkpoints"), data=data
    )
    need = ckpt.preflight(ctx.output_dir)  # writable, room for one checkpoint: found now, not at the first save
    start = ckpt.resume(log) if run.resume else 0
    space = ckpt.space_warning(need, start)  # room for the saves still to come, checkpoint.keep of them at once
    if m.hf_path is not None and start == 0:  # a released model: its weights in place of the init
        log.message(load_hf_weights(run, model, ckpt.tp_mesh, ckpt.fsdp_tp_mesh))
    log.begin(start)
    for warning in config_warnings(run) + ([space] if space else []):
        log.message(f"moemesh: warning: {warning}")
    return TrainState(
        run=run,
        ctx=ctx,
        model=model,
        optimizer=optimizer,
        data=data,
        log=log,
        ckpt=ckpt,
        meter=meter,
        groups=groups,
        reducer=grad_reducer(groups, mesh) if sharded is None else None,
        tied=tied_embedding_sync(model, mesh),
        sharded=sharded,
        pipe=pipeline_schedule(run, mesh, model, device, stages),
        micro=micro,
        accum=accum,
        # The global batch is cut into micro-steps first, then over the data ranks (BatchPlan).
        micro_start=functools.partial(plan.micro_start, data_rank=mesh.data_rank),
        shape=shape,
        # Where each of this stage's MoE layers goes in the global per-layer statistics.
        local_moe={moe_layers.index(l): moe for l, moe in model.stage_moe_layers().items()},
        nonfinite=NonFinitePolicy(t.on_nonfinite, t.max_skipped_steps),
        start=start,
        start_bytes=start_bytes,
    )


def train_step(state: TrainState, step: int) -> StepResult:
    """One optimizer step: forward and backward over this data rank's slice of the global batch,
    the gradient reduction, the clip and the update (unless the gradient norm is not finite),
    then the step's statistics summed over every rank."""
    s, t, dims = state, state.run.trainer, state.mesh.dims
    t0 = time.perf_counter()
    timer = PhaseTimer(s.device)
    s.meter.reset()
    lr = lr_at(step, t)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    # The loss terms and per-layer MoE statistics add up on the device until the all-reduce
    # below (no host sync per micro-step).
    stats = StepStats(len(s.shape.moe_layers), s.shape.num_experts, s.device, top_k=s.run.model.top_k)
    batch = functools.partial(s.data.micro_batch, "train", step, global_batch=t.global_batch_size, seq_len=t.seq_len)
    slots = list(s.local_moe)
    if s.pipe is None:
        for i in range(s.accum):
            with timer.phase("data"):  # read ahead by moemesh.data's thread: only the wait
                b = batch(start=s.micro_start(i), count=s.micro)
            with timer.phase("forward"), _autocast(s.run, s.device):
                # Each MoE layer's weighted balance losses ride on its output: the backward
                # of the cross-entropy carries them too, scaled by the same 1/accum.
                x, y = b.inputs.to(s.device), b.targets.to(s.device)
                out = s.model(x, y, loss_scale=1 / s.accum, **b.model_kwargs(s.device))
            with timer.phase("backward"):
                (out.loss / s.accum).backward()
            stats.add_loss(out.loss, tp=dims.tp)
            stats.add_moe(out.moe_stats, slots)
    else:
        with timer.phase("data"):
            x, y = _rank_batch(batch, s.micro_start, s.micro, s.accum)  # the schedule cuts it into micro-batches
        losses: list[torch.Tensor] = []
        with timer.phase("pipeline"), _autocast(s.run, s.device):
            _pipeline_step(s.pipe, s.model, x.to(s.device), y.to(s.device), losses)
        if s.model.last:
            stats.add_loss(torch.stack(losses).sum(), tp=dims.tp)
        for record in s.model.stage_records:  # one per stage call: {global layer: its MoE statistics}
            stats.add_moe(list(record.values()), [s.shape.moe_layers.index(l) for l in record])
        s.model.stage_records.clear()

    _reduce_gradients(s, timer)
    with timer.phase("optimizer"):
        g = s.groups
        grad_norm = global_grad_norm(
            replicated=g.replicated,
            tp_sharded=g.tp_sharded,
            expert=g.expert,
            tp_group=s.mesh.tp_group,
            ep_group=s.mesh.ep_group,
            pp_group=s.mesh.pp_group,
        )
        updated = s.nonfinite.update_allowed(grad_norm, step + 1)
        if updated:
            clip_grads_(s.model.parameters(), grad_norm, t.grad_clip)  # no host sync on CUDA
            s.optimizer.step()
        else:
            s.nonfinite.skipped(step + 1, s.log.message)
        s.grad_bytes = [max(a, b) for a, b in zip(s.grad_bytes, grad_bytes(s.model))]
        s.optimizer.zero_grad(set_to_none=True)

    # The loss terms and per-layer statistics summed over every rank: one flat tensor,
    # all-reduced, then on the host (a host sync, every step).
    reduced = stats.reduce(s.mesh.data_tp_group, s.mesh.pp_group, loss_norm=s.shape.loss_norm)
    s.nonfinite.check_loss(reduced.loss, step + 1)
    # Aux-loss-free balancing: every rank moves its layers' biases by the same global counts
    # (not on a skipped step: it changes no state).
    if updated:
        for slot, moe in s.local_moe.items():
            moe.router.update_bias(reduced.counts_LE[slot])
    times = RankTimes.measure(timer.seconds, s.meter.collect(), time.perf_counter() - t0)  # before eval
    return StepResult(lr=lr, grad_norm=grad_norm, updated=updated, stats=reduced, times=times)


def _reduce_gradients(s: TrainState, timer: PhaseTimer) -> None:
    """The gradient reduction: the reducer's all-reduces, or under parallel.sharding the time
    FSDP2's reduce-scatters (run inside the backward) held the rank up, moved out of it."""
    if s.reducer is not None:
        with timer.phase("grad_reduce"):
            s.reducer.reduce()
    else:
        assert s.sharded is not None
        waited = s.sharded.timer.collect()
        inside = "pipeline" if s.pipe is not None else "backward"
        timer.seconds[inside] = timer.seconds.get(inside, 0.0) - waited
        timer.seconds["grad_reduce"] = waited
    if s.tied is not None:
        with timer.phase("grad_reduce"):
            s.tied()


def run_training(state: TrainState) -> RunSummary:
    """The outer loop: a step, then evaluation, the log, a checkpoint or a stop."""
    s, t = state, state.run.trainer
    steps_run, final_val, stopped_by = 0, None, None
    record: StepRecord | dict = {}  # the last logged step's ({} until one is logged)
    if s.start >= t.steps:  # resumed at or past the end: say so, rather than finish silently
        s.log.message(
            f"moemesh: the checkpoint is at step {s.start} and trainer.steps={t.steps}: nothing left to train "
            f"(raise trainer.steps to train on)"
        )
    for step in range(s.start, t.steps):
        result = train_step(s, step)
        steps_run += 1
        last = step == t.steps - 1
        val = None
        if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
            val = final_val = evaluate(s.model, s.data, s.run, s.mesh, s.device, s.micro_start, s.pipe)
            s.nonfinite.check_val_loss(val, step + 1)
            for root in s.sharded.roots if s.sharded is not None else ():
                reshard_all(root)  # zero2 keeps an evaluated unit gathered
        if step % t.log_every == 0 or last or val is not None:
            record = _log_step(s, step, result, val)
        # Preemption: SIGTERM/SIGUSR1 on any rank stops every rank after this step, with a save.
        got = _stop_signal(s.ctx, s.mesh.world_group, s.device)
        stop = got > 0 and not last
        every = s.run.checkpoint.every
        if (every and (step + 1) % every == 0) or (last and s.run.checkpoint.save_final) or stop:
            path = s.ckpt.save(step + 1)
            s.log.message(f"moemesh: checkpoint after step {step + 1}: {path}")
        if stop:
            stopped_by = s.ctx.stop_signals() or [signal.Signals(got).name]  # another rank's
            s.ctx.on_stop()
            s.log.message(
                f"moemesh: stop requested ({', '.join(stopped_by)}); stopped after step {step + 1}; "
                "resume with resume=auto (same run dir) or resume=<checkpoint dir>"
            )
            break
    summary = _summary(
        s.run,
        s.model,
        s.optimizer,
        s.mesh,
        s.device,
        last_record=record,
        steps_run=steps_run,
        val_loss=final_val,
        sample=s.log.sample,
        start=s.start,
        stopped_by=stopped_by,
        run_start_bytes=s.start_bytes,
        grads=s.grad_bytes,
    )
    summary = s.log.write_summary(summary)  # a run resumed at its end keeps the summary it had
    s.log.close()
    s.data.close()
    return summary


def _log_step(s: TrainState, step: int, result: StepResult, val: float | None) -> StepRecord:
    """The step's record (metrics.jsonl, console, wandb): times and bytes are the slowest rank's
    (one small MAX all-reduce over the world)."""
    slowest = result.times.max_over(s.mesh.world_group, s.device)
    biases = {slot: moe.router.expert_bias_E for slot, moe in s.local_moe.items()}
    record = step_record(
        step=step + 1,
        lr=result.lr,
        grad_norm=float(result.grad_norm),  # host sync (logged steps): the value for the record
        stats=result.stats,
        shape=s.shape,
        times=slowest,
        biases=bias_ranges(biases, len(s.shape.moe_layers), s.mesh, s.device),
    )
    if val is not None:
        record["val_loss"] = val
    if not result.updated:
        record["skipped"] = True
    s.log.log(record)
    return record


@torch.no_grad()
def evaluate(model, data, run: RunConfig, mesh: ParallelMesh, device, micro_start, pipe=None) -> float:
    t = run.trainer
    model.eval()
    plan = batch_plan(run)
    micro, accum = plan.micro_batch_size, plan.micro_steps
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for b in range(t.eval_batches):
        batch = functools.partial(data.micro_batch, "val", b, global_batch=t.global_batch_size, seq_len=t.seq_len)
        if pipe is not None:
            x, y = _rank_batch(batch, micro_start, micro, accum)
            losses: list[torch.Tensor] = []
            with _autocast(run, device):
                _pipeline_step(pipe, model, x.to(device), y.to(device), losses, train=False)
            model.stage_records.clear()
            if model.last:
                total += torch.stack(losses).sum().double()
            continue
        for i in range(accum):  # the training micro-batch size bounds eval memory too
            mb = batch(start=micro_start(i), count=micro)
            with _autocast(run, device):
                total += model(mb.inputs.to(device), mb.targets.to(device), **mb.model_kwargs(device)).loss.double()
    model.train()
    all_reduce_(total, mesh.data_group)
    all_reduce_(total, mesh.pp_group)  # only the last stage holds losses
    return float(total) / (t.eval_batches * accum * mesh.dims.data_size)  # host sync (evaluation steps)


def _summary(
    run,
    model,
    optimizer,
    mesh,
    device,
    *,
    last_record,
    steps_run,
    val_loss,
    sample: StepSample,
    start,
    stopped_by,
    run_start_bytes: int = 0,
    grads: list[int] | None = None,
) -> RunSummary:
    dims = mesh.dims
    memory = memory_report(
        model, optimizer, peak_memory_bytes(device), mesh.world_group, device, start_bytes=run_start_bytes, grads=grads
    )
    # Step times as logged (the slowest rank's), so every rank's summary agrees; the first
    # step pays for warm-up. None: nothing logged (resumed at the end).
    medians = sample.medians()
    step_s = medians["time.step"] if medians else None
    tokens_per_step = run.trainer.global_batch_size * run.trainer.seq_len
    return {
        "machine": machine(device, mesh.world_group),
        "parallel": layout_name(dims),  # what ran, whatever the config called it
        "dp": dims.dp,
        "ep": dims.ep,
        "tp": dims.tp,
        "pp": dims.pp,
        "world_size": dims.world_size,
        "sharding": run.parallel.sharding,
        "activation_checkpointing": run.trainer.activation_checkpointing,
        "model": run.model.name,
        "steps": steps_run,
        "final_loss": last_record.get("loss"),
        "final_val_loss": val_loss,
        "median_tokens_per_s": tokens_per_step / step_s if step_s else None,
        "median_step_s": step_s,
        "peak_memory_bytes": PeakBytes(
            **memory["peak_bytes"], kind="cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        ),
        "param_bytes_per_rank": memory["param_bytes"],
        "memory_per_rank": memory,
        **sample.summary(),
        # Where this attempt began and whether a signal cut it short (a requeued job resumes from here).
        "start_step": start,
        "stopped_by_signal": stopped_by,
    }
