"""Pipeline parallelism over the "pp" axis with torch.distributed.pipelining.

Layers are split into ``pp`` stages, balanced by layer count (earlier stages take
the remainder) or by an explicit ``parallel.pipeline_split`` (layers per stage).
Each pp rank builds only its stage (``moe.model.Transformer(layers=...)``), wraps
it in a ``PipelineStage`` with static shapes (shape inference would run the MoE
layers' collectives on meta tensors), and steps a GPipe or 1F1B schedule over the
rank's micro-batches. EP and TP collectives inside a stage pair up because every
rank of a stage runs the same schedule in the same order.
"""

from __future__ import annotations

from moemesh.errors import ConfigError
from moemesh.fields import PipelineSchedule

SCHEDULES = tuple(s.value for s in PipelineSchedule)


def stage_layers(num_layers: int, pp: int, split: list[int] | None = None) -> list[range]:
    """The global layer ids of each stage."""
    if split is None:
        base, extra = divmod(num_layers, pp)
        split = [base + (1 if s < extra else 0) for s in range(pp)]
    if len(split) != pp or any(n < 1 for n in split) or sum(split) != num_layers:
        raise ConfigError(
            f"parallel.pipeline_split={list(split)} must list {pp} positive layer counts (one per stage) "
            f"summing to model.num_layers={num_layers}"
        )
    starts = [sum(split[:s]) for s in range(pp)]
    return [range(a, a + n) for a, n in zip(starts, split)]


def stage_module_of(model):
    """What PipelineStage calls: a module whose forward is ``model.stage_forward`` (the
    sharded modes make it the FSDP root, so the root's hooks run around each stage call)."""
    import torch.nn as nn

    class StageModule(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.stage_forward(x)

    return StageModule(model)


def build_schedule(
    model,
    *,
    schedule: str,
    pp_rank: int,
    pp_size: int,
    pp_group,
    device,
    n_microbatches: int,
    micro_batch: int,
    seq_len: int,
    hidden_seq: int,
    loss_fn,
    stage_module=None,
):
    import torch
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    cfg = model.cfg
    hidden = torch.empty(micro_batch, hidden_seq, cfg.hidden_size, device=device)
    if model.first:
        inputs = torch.empty(micro_batch, seq_len, dtype=torch.long, device=device)
    else:  # received activations need gradients, and PipelineStage reads that off the example
        inputs = hidden.clone().requires_grad_(True)
    if model.last:
        outputs = torch.empty(micro_batch, seq_len, model.head.weight.shape[0], device=device)
    else:
        outputs = hidden
    # With static shapes, the gradient buffers' shapes are given too: the gradient that
    # arrives for this stage's output, and the one it sends back for its input.
    stage = PipelineStage(
        stage_module if stage_module is not None else stage_module_of(model),
        pp_rank,
        pp_size,
        device,
        input_args=(inputs,),
        output_args=(outputs,),
        output_grads=(torch.empty_like(outputs),),
        input_grads=(None if model.first else torch.empty_like(hidden),),
        group=pp_group,
    )
    cls = {PipelineSchedule["1f1b"]: Schedule1F1B, PipelineSchedule.gpipe: ScheduleGPipe}[PipelineSchedule(schedule)]
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)
