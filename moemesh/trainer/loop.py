"""The training loop, top to bottom in the order things happen each step:
LR -> micro-steps (forward, backward) -> gradient reduction -> clip -> optimizer
step -> metrics all-reduce -> eval -> log -> checkpoint / stop.

Host syncs of a step, each marked "host sync" where it happens: the gradient norm's
finiteness (every step, where the host decides: on the CPU, and with
trainer.on_nonfinite=skip; on CUDA with stop it is a device-side assert ordered before
the update, no sync), the reduced metrics and the stop flag (every step), the gradient
norm's value, the slowest rank's times and the bias ranges (logged steps), the
validation loss (evaluation steps). Outside this file: the All-to-All's split sizes
(moe/dispatcher.py, per MoE layer and micro-step), checkpoint saves and, on CUDA,
PhaseTimer's phase edges (a synchronize at each phase's start and end). The clip
(parallel/grads.py) stays on the device on CUDA; off CUDA it reads its scale (free there)
to skip a no-op multiply.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import time
from pathlib import Path

import torch

from moemesh.config.schema import RunConfig
from moemesh.config.validate import config_warnings, grad_accum_steps, micro_batch_size
from moemesh.kernels import get_ops
from moemesh.launch import RankContext
from moemesh.moe.config import is_moe_layer
from moemesh.moe.model import Transformer
from moemesh.moe.param_count import model_flops_per_token
from moemesh.parallel.comm import CommMeter, all_reduce_, group_size
from moemesh.parallel.dims import layout_name
from moemesh.parallel.fsdp import reshard_all
from moemesh.parallel.grads import clip_grads_, global_grad_norm
from moemesh.parallel.mesh import ParallelMesh
from moemesh.trainer.checkpointing import Checkpointer
from moemesh.trainer.data import TokenData
from moemesh.trainer.metrics import MetricsLogger, StepSample
from moemesh.trainer.optim import build_optimizer, lr_at
from moemesh.trainer.parallelize import build_model, grad_reducer, param_groups, pipeline_schedule, shard_model
from moemesh.trainer.records import RunSummary, StepRecord
from moemesh.trainer.step_stats import RankTimes, StepShape, StepStats, bias_ranges, memory_report, step_record


def _autocast(run: RunConfig, device: torch.device):
    dtype = run.trainer.dtype
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resident_bytes(device: torch.device) -> int:
    """What the rank holds now: CUDA tensors, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _reset_peak(device: torch.device) -> None:
    """Start the peak over again here, so it is the training's, not the imports' or the data's:
    CUDA's allocator statistics; on Linux the process's VmHWM (``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the lifetime peak below


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # VmHWM: the peak since _reset_peak
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _micro_start(i: int, *, micro: int, data_size: int, data_rank: int) -> int:
    """First global sample of micro-step i on this data rank.

    The global batch is cut into micro-steps first, then each micro-step over the data
    ranks: micro-step i is the same set of samples on every layout with the same number
    of micro-steps, so the load-balance statistics (reduced per micro-step) agree too.
    """
    return i * micro * data_size + data_rank * micro


def _rank_batch(batch, micro_start, micro: int, accum: int):
    """This data rank's micro-batches, concatenated in micro-step order (for the pipeline)."""
    parts = [batch(start=micro_start(i), count=micro) for i in range(accum)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _pipeline_step(pipe, model: Transformer, x, y, losses, *, train: bool = True) -> None:
    """One schedule pass: the first stage feeds tokens, the last gets targets and losses."""
    args = (x,) if model.first else ()
    kwargs = {"target": y, "losses": losses} if model.last else {}
    (pipe.step if train else pipe.eval)(*args, **kwargs)


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


def _any_rank(flag: bool, group, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_(t, group, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())  # host sync: the host decides whether to save and stop


def _update_allowed(grad_norm: torch.Tensor, step: int, on_nonfinite: str, *, on_device: bool | None = None) -> bool:
    """Whether this step updates the weights: False for a non-finite gradient norm with
    trainer.on_nonfinite=skip; with stop, the one-line FloatingPointError naming step and value
    (on CUDA a device-side assert naming the step, below).

    The norm is the same number on every rank (reduced gradients), so every rank decides
    alike and none is left waiting in a collective.

    Stop mode on CUDA (``on_device``, None: whether the norm is on CUDA) asks nothing of the
    host: ``torch._assert_async`` puts the check on the stream before the clip and the
    optimizer's kernels, so a non-finite norm fails there and the update never lands. The
    error surfaces at the next sync (PhaseTimer's edge at the end of this phase) as a
    device-side assert, which leaves the CUDA context unusable (the stop saves nothing
    anyway) and whose message names the step but not the value: reading the value would be
    the sync this avoids. Elsewhere the check is a host sync, kept on purpose: on the CPU
    the assert would be one too, and skip needs the answer on the host to run
    ``optimizer.step()`` or not (masking the update on the device instead, e.g. a zero
    learning rate, would still step AdamW's moments and step count, so it is not a skip).
    """
    if on_device is None:
        on_device = grad_norm.is_cuda
    if on_device and on_nonfinite == "stop":
        msg = (
            f"non-finite gradient norm at step {step} (its value is not read back: that would be a host sync): "
            "stopped before the update; trainer.on_nonfinite=skip skips such steps"
        )
        torch._assert_async(torch.isfinite(grad_norm), msg)  # no host sync: ordered on the device
        return True
    if bool(torch.isfinite(grad_norm)):  # host sync (every step; CPU, or skip mode): the decision above
        return True
    if on_nonfinite == "stop":
        raise FloatingPointError(
            f"non-finite gradient norm {float(grad_norm)} at step {step}: stopped before the update; "
            f"the last good checkpoint is kept (trainer.on_nonfinite=skip skips such steps)"
        )
    return False


def train(run: RunConfig, ctx: RankContext) -> RunSummary:
    """Train on this rank; rank 0 also owns the experiment tracker, finished on every exit."""
    tracker = None
    if ctx.rank == 0 and run.logger.wandb:
        from moemesh.trainer.wandb_tracker import WandbTracker

        tracker = WandbTracker(run, ctx.mesh.dims, ctx.output_dir)
    try:
        summary = _train(run, ctx, tracker)
    except BaseException:
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    if tracker is not None:
        tracker.finish(exit_code=0)
    return summary


def _train(run: RunConfig, ctx: RankContext, tracker) -> RunSummary:
    t, m, mesh, device = run.trainer, run.model, ctx.mesh, ctx.device
    dims = mesh.dims
    torch.manual_seed(t.seed)
    _reset_peak(device)
    start_bytes = _resident_bytes(device)  # before the model: the memory report's baseline
    meter = CommMeter(device)
    model = build_model(run, mesh, device, meter=meter)
    # Sharded modes: FSDP2 reduce-scatters each block's gradients during the backward;
    # otherwise the reducer all-reduces them after it. (Sharding replaces the parameters:
    # group them after it.)
    sharded = shard_model(run, mesh, model, device)
    groups = param_groups(model)
    reducer = grad_reducer(groups, mesh) if sharded is None else None
    optimizer = build_optimizer(model, t)
    data = TokenData(ctx.data_paths, seed=t.seed)
    log = MetricsLogger(
        ctx.output_dir,
        enabled=ctx.rank == 0,
        console=run.logger.console,
        jsonl=run.logger.jsonl,
        total_steps=t.steps,
        tracker=tracker,
    )
    micro, accum = micro_batch_size(run), grad_accum_steps(run)
    micro_start = functools.partial(_micro_start, micro=micro, data_size=dims.data_size, data_rank=mesh.data_rank)
    moe_layers = [l for l in range(m.num_layers) if is_moe_layer(m, l)]
    # Where each of this stage's MoE layers goes in the global per-layer statistics.
    local_moe = {moe_layers.index(l): moe for l, moe in model.stage_moe_layers().items()}
    slots = list(local_moe)
    pipe = pipeline_schedule(run, mesh, model, device, sharded.root if sharded else None)  # None without PP
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
        f"kernels={get_ops(run.kernels.backend, device.type).name}"
    )

    ckpt = Checkpointer(run, model, optimizer, mesh, Path(run.checkpoint.dir or Path(ctx.output_dir) / "checkpoints"))
    ckpt.preflight(ctx.output_dir)  # writable, room for one checkpoint: found now, not at the first save
    start = ckpt.resume(log) if run.resume else 0
    log.begin(start)
    for warning in config_warnings(run):
        log.message(f"moemesh: warning: {warning}")
    if tracker is not None and tracker.note:
        log.message(f"moemesh: {tracker.note}")
    steps_run, skipped_in_a_row, final_val, stopped_by = 0, 0, None, None
    record: StepRecord | dict = {}  # the last logged step's ({} until one is logged)
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        timer = PhaseTimer(device)
        meter.reset()
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Forward and backward over this data rank's slice of the global batch. The loss terms
        # and per-layer MoE statistics add up on the device until the all-reduce below (no
        # host sync per micro-step).
        stats = StepStats(len(moe_layers), m.num_experts, device)
        batch = functools.partial(data.batch, "train", step, global_batch=t.global_batch_size, seq_len=t.seq_len)
        if pipe is None:
            for i in range(accum):
                x, y = batch(start=micro_start(i), count=micro)
                with timer.phase("forward"), _autocast(run, device):
                    # Each MoE layer's weighted balance losses ride on its output: the backward
                    # of the cross-entropy carries them too, scaled by the same 1/accum.
                    out = model(x.to(device), y.to(device), loss_scale=1 / accum)
                with timer.phase("backward"):
                    (out.loss / accum).backward()
                stats.add_loss(out.loss, tp=dims.tp)
                stats.add_moe(out.moe_stats, slots)
        else:
            x, y = _rank_batch(batch, micro_start, micro, accum)  # the schedule cuts it into `accum` micro-batches
            losses: list[torch.Tensor] = []
            with timer.phase("pipeline"), _autocast(run, device):
                _pipeline_step(pipe, model, x.to(device), y.to(device), losses)
            if model.last:
                stats.add_loss(torch.stack(losses).sum(), tp=dims.tp)
            for micro_batch_stats in model.stage_records:
                stats.add_moe(micro_batch_stats, slots)
            model.stage_records.clear()

        if reducer is not None:
            with timer.phase("grad_reduce"):
                reducer.reduce()
        else:  # sharded: the reduction ran inside the backward; report what it held the rank up
            assert sharded is not None
            waited = sharded.timer.collect()
            inside = "pipeline" if pipe is not None else "backward"
            timer.seconds[inside] = timer.seconds.get(inside, 0.0) - waited
            timer.seconds["grad_reduce"] = waited
        with timer.phase("optimizer"):
            grad_norm = global_grad_norm(
                replicated=groups.replicated,
                tp_sharded=groups.tp_sharded,
                expert=groups.expert,
                tp_group=mesh.tp_group,
                ep_group=mesh.ep_group,
                pp_group=mesh.pp_group,
            )
            finite = _update_allowed(grad_norm, step, t.on_nonfinite)
            if finite:
                clip_grads_(model.parameters(), grad_norm, t.grad_clip)  # no host sync on CUDA
                optimizer.step()
                skipped_in_a_row = 0
            else:
                skipped_in_a_row += 1
                log.message(
                    f"moemesh: step {step}: non-finite gradient norm, update skipped "
                    f"({skipped_in_a_row} in a row; trainer.max_skipped_steps={t.max_skipped_steps})"
                )
                if skipped_in_a_row >= t.max_skipped_steps:
                    # The weights have not changed since the first of these steps, so the next
                    # steps would most likely be skipped too: a run that only skips is not training.
                    raise FloatingPointError(
                        f"{skipped_in_a_row} steps in a row skipped for a non-finite gradient norm (steps "
                        f"{step + 1 - skipped_in_a_row}..{step}, trainer.max_skipped_steps={t.max_skipped_steps}): "
                        "stopped; the last good checkpoint is kept"
                    )
            optimizer.zero_grad(set_to_none=True)

        # The loss terms and per-layer statistics summed over every rank: one flat tensor,
        # all-reduced, then on the host (a host sync, every step).
        reduced = stats.reduce(mesh.data_tp_group, mesh.pp_group, loss_norm=shape.loss_norm)
        if not math.isfinite(reduced.loss) and t.on_nonfinite == "stop":
            raise FloatingPointError(f"non-finite training loss {reduced.loss} at step {step}")
        # Aux-loss-free balancing: every rank moves its layers' biases by the same global counts
        # (not on a skipped step: it changes no state).
        if finite:
            for slot, moe in local_moe.items():
                moe.router.update_bias(reduced.counts_LE[slot])
        step_s = time.perf_counter() - t0
        steps_run += 1
        times = RankTimes.measure(timer.seconds, meter.collect(), step_s)  # before eval touches the meter

        last = step == t.steps - 1
        val = None
        if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
            val = final_val = evaluate(model, data, run, mesh, device, micro_start, pipe)
            if sharded is not None:
                reshard_all(sharded.root)  # zero2 keeps an evaluated unit gathered
        if step % t.log_every == 0 or last or val is not None:
            # Times and bytes: the slowest rank's (one small MAX all-reduce over the world).
            slowest = times.max_over(mesh.world_group, device)
            biases = {slot: moe.router.expert_bias_E for slot, moe in local_moe.items()}
            record = step_record(
                step=step + 1,
                lr=lr,
                grad_norm=float(grad_norm),  # host sync (logged steps): the value for the record
                stats=reduced,
                shape=shape,
                times=slowest,
                biases=bias_ranges(biases, len(moe_layers), mesh, device),
            )
            if val is not None:
                record["val_loss"] = val
            if not finite:
                record["skipped"] = True
            log.log(record)

        # Preemption: SIGTERM/SIGUSR1 on any rank stops every rank after this step, with a save.
        stop = _any_rank(ctx.stop_requested(), mesh.world_group, device) and not last
        every = run.checkpoint.every
        if (every and (step + 1) % every == 0) or (last and run.checkpoint.save_final) or stop:
            path = ckpt.save(step + 1)
            log.message(f"moemesh: checkpoint after step {step + 1}: {path}")
        if stop:
            stopped_by = ctx.stop_signals() or ["a signal on another rank"]
            ctx.on_stop()
            log.message(
                f"moemesh: stop requested ({', '.join(stopped_by)}); stopped after step {step + 1}; "
                "resume with resume=auto (same run dir) or resume=<checkpoint dir>"
            )
            break

    summary = _summary(
        run,
        model,
        optimizer,
        mesh,
        device,
        last_record=record,
        steps_run=steps_run,
        val_loss=final_val,
        sample=log.sample,
        start=start,
        stopped_by=stopped_by,
        run_start_bytes=start_bytes,
    )
    log.write_summary(summary)
    log.close()
    return summary


@torch.no_grad()
def evaluate(model, data, run: RunConfig, mesh: ParallelMesh, device, micro_start, pipe=None) -> float:
    t = run.trainer
    model.eval()
    micro, accum = micro_batch_size(run), grad_accum_steps(run)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for b in range(t.eval_batches):
        batch = functools.partial(data.batch, "val", b, global_batch=t.global_batch_size, seq_len=t.seq_len)
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
            x, y = batch(start=micro_start(i), count=micro)
            with _autocast(run, device):
                total += model(x.to(device), y.to(device)).loss.double()
    model.train()
    all_reduce_(total, mesh.data_group)
    all_reduce_(total, mesh.pp_group)  # only the last stage holds losses
    return float(total) / (t.eval_batches * accum * mesh.dims.data_size)  # host sync (evaluation steps)


def _machine(device: torch.device, world_group=None) -> dict:
    """Where the run ran, for charts that compare runs (scripts/compare.py's subtitles), and
    on which hosts: every rank's host name, gathered over ``world_group`` (one collective)."""
    import platform
    import socket

    if device.type == "cuda":
        name, count = torch.cuda.get_device_name(device), torch.cuda.device_count()
    else:
        name, count = platform.processor() or platform.machine(), 1
        try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
            models = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
            name = models[0] if models else name
        except OSError:
            pass
    hostname = socket.gethostname()
    rank_hosts: list = [hostname]
    if group_size(world_group) > 1:
        rank_hosts = [None] * group_size(world_group)
        torch.distributed.all_gather_object(rank_hosts, hostname, group=world_group)
    return {
        "hostname": hostname,
        "hosts": list(dict.fromkeys(rank_hosts)),  # every host of the run, in rank order
        "rank_hosts": rank_hosts,  # rank r ran on rank_hosts[r]
        "device": name,
        "count": count,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


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
) -> RunSummary:
    dims = mesh.dims
    memory = memory_report(
        model, optimizer, _peak_memory_bytes(device), mesh.world_group, device, start_bytes=run_start_bytes
    )
    # Step times as logged (the slowest rank's), so every rank's summary agrees; the first
    # step pays for warm-up. None: nothing logged (resumed at the end).
    medians = sample.medians()
    step_s = medians["time.step"] if medians else None
    tokens_per_step = run.trainer.global_batch_size * run.trainer.seq_len
    return {
        "machine": _machine(device, mesh.world_group),
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
        "peak_memory_bytes": {
            **memory["peak_bytes"],
            "kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
        },
        "param_bytes_per_rank": memory["param_bytes"],
        "memory_per_rank": memory,
        **sample.summary(),
        # Where this attempt began and whether a signal cut it short (a requeued job resumes from here).
        "start_step": start,
        "stopped_by_signal": stopped_by,
    }
