"""What a pipeline schedule costs, for the planner (cost.py, memory.py): the share of a step its
ranks idle (the bubble) and the micro-batches of activations its busiest rank holds. Torch-free.

p pipeline ranks, v stages per rank (``parallel.pp_stages_per_rank``), m micro-batches (micro-steps).
Times per micro-batch and stage are a forward F, a backward for the input I and one for the
weights W, taken equal (F = I = W: a linear layer's three matmuls); a full backward is I + W. A
stage of a rank with v stages takes 1/v of these. Then the bubble of each of torch's schedules:

  gpipe, 1f1b                (p - 1) / (m + p - 1)                  idle (p-1)(F+I+W)
  interleaved_1f1b           (p - 1) / (v m + p - 1)                idle (p-1)(F+I+W)/v
  interleaved_zero_bubble    (p - 1) / (3 v m + p - 1)              idle (p-1)(F+I-W)/v (ZB-H1)
  zbv, dualpipev (v = 2)     (p - 1) / (6 m + p - 1)                as interleaved_zero_bubble, v = 2

and the activations held, in micro-batches of the rank's whole share of layers (a stage counts 1/v;
a micro-batch is held from its forward to its weight gradients):

  gpipe m;  1f1b min(m, p);  interleaved_1f1b min(m, p + (p-1)/v);
  interleaved_zero_bubble, zbv min(m, p);  dualpipev min(m, p + 1/2)

Each is the value of torch's own action order (torch 2.13, ``_calculate_single_rank_operations``)
run with those times: ``tests/planning/test_schedules.py`` builds every schedule's order and
checks these for m >= p (m >= 2p for the V ones, m a multiple of p for the interleaved ones), the
regime the formulas hold in. Outside it (fewer micro-batches than the pipeline needs to fill, or
an interleaved schedule's m not a multiple of p, which torch runs) the planner takes 1F1B's
bubble and GPipe's m micro-batches held, which bound every schedule's from above there
(interleaved_1f1b at p = 4, v = 2 holds all 7 of m = 7, where its formula says 5.5).

What this leaves out: unequal F, I, W (attention's core has no weights, so its W is 0: the
zero-bubble schedules' real bubble is larger), the point-to-point latency between stages (priced
apart, as p2p messages: a rank with v stages sends v times as many), the gradients a split
backward keeps from its I to its W, and DualPipe's overlap of one micro-batch's forward with
another's backward (torch runs the pair one after the other).
"""

from __future__ import annotations

from moemesh.fields import PipelineSchedule

_ZERO_BUBBLE = {PipelineSchedule["interleaved_zero_bubble"], PipelineSchedule["zbv"], PipelineSchedule["dualpipev"]}


def _in_regime(schedule: PipelineSchedule, pp: int, m: int) -> bool:
    """Whether the closed forms hold: enough micro-batches to fill the pipeline."""
    if schedule in (PipelineSchedule["zbv"], PipelineSchedule["dualpipev"]):
        return m >= 2 * pp
    if schedule in (PipelineSchedule["interleaved_1f1b"], PipelineSchedule["interleaved_zero_bubble"]):
        return m >= pp and m % pp == 0
    return True


def bubble_fraction(schedule: str, pp: int, v: int, m: int) -> float:
    """The share of a step each pipeline rank idles (module doc); 0 without a pipeline."""
    if pp == 1:
        return 0.0
    s = PipelineSchedule(schedule)
    work = float(m)  # in units of one micro-batch's F + I + W on a rank
    if _in_regime(s, pp, m):
        if s == PipelineSchedule["interleaved_1f1b"]:
            work = v * m
        elif s in _ZERO_BUBBLE:
            work = 3 * v * m
    return (pp - 1) / (work + pp - 1)


def in_flight_stages(schedule: str, pp: int, v: int, m: int) -> float:
    """Micro-batches of activations the busiest pipeline rank holds at its peak, in units of one
    micro-batch through all of its layers (module doc); 1 without a pipeline."""
    if pp == 1:
        return 1.0
    s = PipelineSchedule(schedule)
    if not _in_regime(s, pp, m):
        return float(m)  # every micro-batch: the bound (module doc)
    peak = {
        PipelineSchedule["gpipe"]: float(m),
        PipelineSchedule["interleaved_1f1b"]: pp + (pp - 1) / v,
        PipelineSchedule["dualpipev"]: pp + 0.5,
    }.get(s, float(pp))
    return min(float(m), peak)
