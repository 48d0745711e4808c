"""Pipeline parallelism over the "pp" axis with torch.distributed.pipelining.

The model's layers are cut into ``pp x v`` stages (v = ``parallel.pp_stages_per_rank``,
virtual stages per rank), balanced by layer count (earlier stages take the remainder) or by
``parallel.pipeline_split`` (layers per stage). Which rank runs which stage is torch's
placement for the schedule: stage s on rank s mod pp (loop: gpipe, 1f1b, interleaved_1f1b,
interleaved_zero_bubble), or ranks r and 2 pp - 1 - r for the two stages of rank r (V: zbv,
dualpipev, whose first and last stages both sit on rank 0).

A rank keeps the union of its stages' layers in its one ``Transformer`` (``keep_layers``), so
parameter names stay global (checkpoints, initialisation and the gradient groups do not change
with the placement), and runs each stage through a thin module of its own (``stage_module``)
that holds only that stage's layers (and the embedding / the head if it is the first / the last
stage): ``PipelineStage``, FSDP's root units and the schedule's per-stage gradient scaling see
that stage's parameters and no other's. Shapes are static (shape inference would run the MoE
layers' collectives). EP and TP collectives inside a stage pair up because every rank of a
stage runs the same schedule, so the same micro-batches in the same order.

Everything above ``build_pipeline`` is arithmetic, torch-free: the planner and the config
checks use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moemesh.errors import ConfigError
from moemesh.fields import PipelineSchedule

SCHEDULES = tuple(s.value for s in PipelineSchedule)


@dataclass(frozen=True)
class ScheduleTraits:
    """What a schedule asks of the layout, from torch's own schedules (torch 2.13)."""

    torch_class: str  # in torch.distributed.pipelining
    stages_per_rank: int | None  # fixed (None: any >= 1; the default is ``default_stages``)
    default_stages: int
    v_shape: bool  # two stages per rank placed in a V (rank r: r and 2 pp - 1 - r)
    split_backward: bool  # backward split into input (I) and weight (W) gradients

    @property
    def multi(self) -> bool:
        """Run by torch's multi-stage runtime (``PipelineScheduleMulti``)."""
        return self.stages_per_rank != 1


TRAITS: dict[PipelineSchedule, ScheduleTraits] = {
    PipelineSchedule["gpipe"]: ScheduleTraits("ScheduleGPipe", 1, 1, False, False),
    PipelineSchedule["1f1b"]: ScheduleTraits("Schedule1F1B", 1, 1, False, False),
    PipelineSchedule["interleaved_1f1b"]: ScheduleTraits("ScheduleInterleaved1F1B", None, 2, False, False),
    PipelineSchedule["interleaved_zero_bubble"]: ScheduleTraits("ScheduleInterleavedZeroBubble", None, 2, False, True),
    PipelineSchedule["zbv"]: ScheduleTraits("ScheduleZBVZeroBubble", 2, 2, True, True),
    PipelineSchedule["dualpipev"]: ScheduleTraits("ScheduleDualPipeV", 2, 2, True, True),
}


def traits(schedule: str) -> ScheduleTraits:
    return TRAITS[PipelineSchedule(schedule)]


def stages_per_rank(schedule: str, requested: int | None) -> int:
    """``parallel.pp_stages_per_rank`` as the schedule runs it (null: the schedule's default)."""
    return traits(schedule).default_stages if requested is None else requested


def stages_problem(schedule: str, requested: int | None) -> str | None:
    """Why ``parallel.pp_stages_per_rank`` cannot go with ``schedule`` (None: it can)."""
    t = traits(schedule)
    if requested is None or t.stages_per_rank in (None, requested):
        return None
    why = "one stage per rank" if t.stages_per_rank == 1 else "exactly two stages per rank, placed in a V"
    return (
        f"parallel.pp_stages_per_rank={requested} with parallel.pipeline_schedule={schedule}, which runs {why}: "
        f"set parallel.pp_stages_per_rank={t.stages_per_rank} or null"
        + ("" if t.stages_per_rank != 1 else ", or pick interleaved_1f1b / interleaved_zero_bubble for more")
    )


def microbatch_problem(schedule: str, pp: int, micro_steps: int) -> str | None:
    """Why torch's ``schedule`` cannot run ``micro_steps`` micro-batches on ``pp`` ranks (None: it
    can): the relations its constructor checks, in one line with a fix."""
    s, m = PipelineSchedule(schedule), micro_steps
    rounds = max(1, m // pp)
    if s == PipelineSchedule["1f1b"] and m < pp:
        need, fix = f">= parallel.pipeline_parallel_size={pp}", f">= {pp} or parallel.pipeline_schedule=gpipe"
    elif s == PipelineSchedule["dualpipev"] and m < 2 * pp:
        need = f">= its stages, 2 x parallel.pipeline_parallel_size = {2 * pp}"
        fix = f">= {2 * pp} or parallel.pipeline_schedule=zbv"
    elif s in (PipelineSchedule["interleaved_1f1b"], PipelineSchedule["interleaved_zero_bubble"]) and m % rounds:
        need, fix = f"divisible by its rounds, max(1, micro-batches // {pp}) = {rounds}", f"to a multiple of {pp}"
    else:
        return None
    name = {"1f1b": "1F1B", "dualpipev": "DualPipeV"}.get(s, str(s))
    return f"{name} needs micro-batches {need}, got {m} (trainer.micro_steps); set trainer.micro_steps {fix}"


def stage_layers(num_layers: int, stages: int, split: list[int] | None = None) -> list[range]:
    """The global layer ids of each of ``stages`` pipeline stages (pp x stages per rank of them)."""
    if split is None:
        base, extra = divmod(num_layers, stages)
        split = [base + (1 if s < extra else 0) for s in range(stages)]
    if len(split) != stages or any(n < 1 for n in split) or sum(split) != num_layers:
        raise ConfigError(
            f"parallel.pipeline_split={list(split)} must list {stages} positive layer counts (one per stage: "
            f"pp x stages per rank) summing to model.num_layers={num_layers}"
        )
    starts = [sum(split[:s]) for s in range(stages)]
    return [range(a, a + n) for a, n in zip(starts, split)]


def stage_ids(schedule: str, pp: int, v: int, rank: int) -> list[int]:
    """The stages pipeline rank ``rank`` runs, in order (torch's placement for the schedule)."""
    if traits(schedule).v_shape:
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(v)]


@dataclass(frozen=True)
class Placement:
    """Where a run's pipeline stages sit: ``pp`` ranks of ``v`` stages each under ``schedule``."""

    schedule: str
    pp: int
    v: int = 1
    split: tuple[int, ...] | None = None

    @classmethod
    def of(cls, parallel) -> Placement:
        """From ``parallel.*`` (a ParallelConfig)."""
        v = stages_per_rank(parallel.pipeline_schedule, parallel.pp_stages_per_rank)
        split = tuple(parallel.pipeline_split) if parallel.pipeline_split is not None else None
        return cls(str(parallel.pipeline_schedule), parallel.pipeline_parallel_size, v, split)

    @property
    def stages(self) -> int:
        return self.pp * self.v

    def chunks(self, num_layers: int, rank: int) -> list[range]:
        """The layer ranges of rank ``rank``'s stages, in stage order (without a pipeline, pp 1,
        one range of every layer, whatever the schedule's stages per rank would be)."""
        if self.pp == 1:
            return [range(num_layers)]
        layers = stage_layers(num_layers, self.stages, list(self.split) if self.split is not None else None)
        return [layers[s] for s in stage_ids(self.schedule, self.pp, self.v, rank)]

    def rank_layers(self, num_layers: int, rank: int) -> list[int]:
        """Every layer rank ``rank`` holds (ascending)."""
        return sorted(l for chunk in self.chunks(num_layers, rank) for l in chunk)

    def layers_by_rank(self, num_layers: int) -> list[list[int]]:
        """``rank_layers`` of every pipeline rank, in rank order: what each rank's memory holds (a
        V's rank 0: the first and the last stage, so the embedding and the head)."""
        return [self.rank_layers(num_layers, r) for r in range(self.pp)]


# ---- the schedule, on torch ----------------------------------------------------------------


_STAGE_MODULE: list[type] = []


def stage_module(run_stage, parts: dict, shared: tuple[str, ...] = ()) -> Any:
    """What ``PipelineStage`` calls for one stage: ``run_stage(x)`` (the model's ``stage_forward``
    for the stage's layers), holding ``parts`` (name -> module: the stage's blocks as a ModuleDict
    under "layers", the embedding / final norm / head where the stage has them) as its children, so
    that its parameters are the stage's own, under the model's names.

    ``shared``: names of parameters this stage uses (its backward computes their gradients) that
    another stage of the same rank also holds and whose backward runs later, which alone scales
    them by the micro-batches and reduces them (FSDP): a V's tied embedding on its last stage."""
    import torch.nn as nn

    if not _STAGE_MODULE:

        class StageModule(nn.Module):
            def __init__(self, run_stage, parts, shared):
                super().__init__()
                self.run_stage = run_stage
                self.shared = tuple(shared)
                for name, module in parts.items():
                    self.add_module(name, module)

            def forward(self, x):
                return self.run_stage(x)

        _STAGE_MODULE.append(StageModule)
    return _STAGE_MODULE[0](run_stage, parts, shared)


_PIPELINE_STAGE: list[type] = []


def _pipeline_stage_class() -> type:
    """torch's ``PipelineStage``, scaling a stage's gradients by the micro-batches except those of
    its module's ``shared`` parameters (``stage_module``), which another stage scales once they
    are whole: scaled by both, a V's tied embedding would be divided twice."""
    if not _PIPELINE_STAGE:
        from torch.distributed.pipelining import PipelineStage

        class SharedAwareStage(PipelineStage):
            def scale_grads(self, grad_scale_factor: int) -> None:
                shared = set(getattr(self.submod, "shared", ()))
                if grad_scale_factor != 1:
                    for name, p in self.submod.named_parameters():
                        if p.grad is not None and name not in shared:
                            p.grad.div_(grad_scale_factor)

        _PIPELINE_STAGE.append(SharedAwareStage)
    return _PIPELINE_STAGE[0]


def _check_shared_order(pipe, stages: list, rank: int) -> None:
    """A stage's ``shared`` parameters are scaled and reduced by the rank's first stage, which must
    therefore finish its backward (REDUCE_GRAD) after every other stage of the rank (true of torch
    2.13's V schedules: its backward depends on theirs). Checked on the schedule's own order."""
    if not any(getattr(st.submod, "shared", ()) for st in stages):
        return
    from torch.distributed.pipelining.schedules import _ComputationType

    order = [a for a in pipe.pipeline_order_with_comms[rank] if a is not None]
    done = [a.stage_index for a in order if a.computation_type == _ComputationType.REDUCE_GRAD]
    if not done or done[-1] != 0:
        raise RuntimeError(f"stage 0 must finish its backward last to scale a shared parameter; order: {done}")


@dataclass(frozen=True)
class StageShapes:
    """One micro-batch's tensors between stages (static: PipelineStage infers nothing)."""

    micro_batch: int
    seq_len: int  # tokens in (the first stage)
    hidden_seq: int  # the sequence a stage sends (its TP shard under sequence parallelism)
    hidden_size: int
    vocab_shard: int  # logits out of the last stage (the head's rows on this TP rank)
    # the dtype of what a stage sends (the residual stream; None: fp32): the compute dtype where
    # FSDP gathers the weights in it, since the embedding's output, and so every block's, is then in it
    hidden_dtype: Any = None


def build_pipeline(
    modules: list,
    *,
    placement: Placement,
    pp_rank: int,
    pp_group,
    device,
    n_microbatches: int,
    shapes: StageShapes,
    loss_fn,
):
    """Torch's schedule for ``placement`` over this rank's stage ``modules`` (one per stage of
    ``placement.chunks``, in order)."""
    import torch
    import torch.distributed.pipelining as pipelining

    PipelineStage = _pipeline_stage_class()
    ids = stage_ids(placement.schedule, placement.pp, placement.v, pp_rank)
    assert len(ids) == len(modules), (ids, len(modules))
    n, z = placement.stages, shapes
    # The buffers a stage receives into: gloo and NCCL would read a send of another dtype as this one's bytes.
    hidden = torch.empty(z.micro_batch, z.hidden_seq, z.hidden_size, dtype=z.hidden_dtype, device=device)
    stages = []
    for stage_index, module in zip(ids, modules):
        first, last = stage_index == 0, stage_index == n - 1
        if first:
            inputs = torch.empty(z.micro_batch, z.seq_len, dtype=torch.long, device=device)
        else:  # received activations need gradients, and PipelineStage reads that off the example
            inputs = hidden.clone().requires_grad_(True)
        outputs = torch.empty(z.micro_batch, z.seq_len, z.vocab_shard, device=device) if last else hidden
        # With static shapes the gradient buffers' shapes are given too: the gradient that
        # arrives for this stage's output, and the one it sends back for its input.
        stages.append(
            PipelineStage(
                module,
                stage_index,
                n,
                device,
                input_args=(inputs,),
                output_args=(outputs,),
                output_grads=(torch.empty_like(outputs),),
                input_grads=(None if first else torch.empty_like(hidden),),
                group=pp_group,
            )
        )
    t = traits(placement.schedule)
    cls = getattr(pipelining, t.torch_class)
    pipe = cls(stages if t.multi else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    _check_shared_order(pipe, stages, pp_rank)
    return pipe


def evaluate_pipeline(pipe, *args, **kwargs) -> None:
    """``pipe.eval(*args, **kwargs)``: the schedule's forward passes only.

    Torch 2.13's multi-stage runtime runs every action of the training order in eval too, its
    backward ones as no-ops, and fails at a V's local gradient hand-off
    (``stage.get_local_bwd_output`` asserts without a backward): zbv and dualpipev could not
    evaluate. So a multi-stage schedule evaluates with its own lowered order less the backward
    actions (its forwards, sends and receives in torch's order: the dependencies left are a
    subset of those the full order satisfies, so it cannot deadlock), then gets its order back.
    """
    full = getattr(pipe, "pipeline_order_with_comms", None)
    if full is None:  # one stage per rank: torch's eval runs forwards only
        pipe.eval(*args, **kwargs)
        return
    backward = {"I", "W", "B", "SEND_B", "RECV_B", "REDUCE_GRAD"}
    forward: dict[int, list] = {}
    for rank, actions in full.items():
        flat = [sub for a in actions for sub in (a.sub_actions or (a,))]
        forward[rank] = [a for a in flat if a.computation_type.value not in backward]
    pipe.pipeline_order_with_comms = forward
    try:
        pipe.eval(*args, **kwargs)
    finally:
        pipe.pipeline_order_with_comms = full
