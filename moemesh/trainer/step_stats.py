"""The numbers behind a step's record: loss terms and per-MoE-layer routing statistics
accumulated on the device over the micro-steps, reduced over the ranks and unpacked by name
(``StepStats`` -> ``ReducedStats``), the slowest rank's phase times (``RankTimes``), the memory
report, and ``step_record``, which turns them into the metrics.jsonl record
(``runs.records.StepRecord``).

A function taking a group is a collective: every rank of the group calls it, in the same order.
Each host sync is marked where it happens.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch

from moemesh.parallel.comm import all_reduce_
from moemesh.runs.records import PHASES, LoadRecord, MemoryRecord, MinMax, SplitBytes, StepRecord, TimeRecord

LOSS_TERMS = ("loss", "aux_loss", "z_loss", "seq_aux_loss")
# Per MoE layer, the statistics vector: routed pairs per expert [E], score sums per
# expert [E], then these, then (when the top-k is given) tokens by the EP ranks they reach [K + 1].
_TAIL = ("dropped", "aux_loss", "z_loss", "seq_aux_loss", "entropy_sum")


def stat_width(num_experts: int, top_k: int = 0) -> int:
    return 2 * num_experts + len(_TAIL) + (top_k + 1 if top_k else 0)


@dataclass(frozen=True)
class LayerStats:
    """One MoE layer's routing statistics, summed over the global batch (host, float64)."""

    counts_E: torch.Tensor  # routed (token, k) pairs per expert, before drops
    score_sum_E: torch.Tensor  # router scores per expert
    dropped: float  # pairs dropped by capacity
    aux_loss: float  # sums over micro-steps and ranks: divide by the loss norm for a mean
    z_loss: float
    seq_aux_loss: float
    entropy_sum: float  # router entropy summed over tokens (nats)
    fanout_K1: torch.Tensor | None = None  # tokens by the EP ranks their pairs reach (0..K)

    @classmethod
    def unpack(cls, row: torch.Tensor, num_experts: int) -> LayerStats:
        E, n = num_experts, len(_TAIL)
        fanout = row[2 * E + n :]
        tail = dict(zip(_TAIL, row[2 * E : 2 * E + n].tolist()))
        return cls(row[:E], row[E : 2 * E], **tail, fanout_K1=fanout if fanout.numel() else None)


@dataclass(frozen=True)
class ReducedStats:
    """The step's statistics summed over every rank, on the host: loss terms as global means
    per token, and the packed per-layer rows (``layer(j)`` names a row's parts)."""

    loss: float  # cross-entropy
    aux_loss: float  # summed over the MoE layers
    z_loss: float
    seq_aux_loss: float
    rows: torch.Tensor  # [MoE layers, stat_width(E)], float64
    num_experts: int

    def layer(self, j: int) -> LayerStats:
        return LayerStats.unpack(self.rows[j], self.num_experts)

    @property
    def counts_LE(self) -> torch.Tensor:
        return self.rows[:, : self.num_experts]

    @property
    def dropped_L(self) -> torch.Tensor:
        return self.rows[:, 2 * self.num_experts + _TAIL.index("dropped")]


class StepStats:
    """One step's loss terms and per-MoE-layer statistics on this rank, by name.

    Summed on the device over the micro-steps (no host sync), packed into one flat float64
    tensor for the all-reduce and unpacked into a ``ReducedStats`` here, in one place.
    """

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device, top_k: int = 0):
        self.num_experts, self.top_k = num_experts, top_k
        self.loss_sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device)  # LOSS_TERMS order
        # One row per MoE layer of the whole model (global order): LayerStats.unpack's layout.
        width = stat_width(num_experts, top_k)
        self.layer_sums = torch.zeros(num_moe_layers, width, dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor, tp: int) -> None:
        """Cross-entropy of this rank's micro-batch(es). TP peers hold the same cross-entropy
        but disjoint routing slices: the reduction runs over dp x ep x tp, so it enters as 1/tp."""
        self.loss_sums[0] += loss.detach().double() / tp

    def add_moe(self, stats, slots) -> None:
        """One forward's MoE statistics (``MoEStats`` per local MoE layer; ``slots``: their
        indices among all MoE layers). The layers' balance losses also add to the loss terms."""
        for slot, s in zip(slots, stats):
            l = s.losses
            seq = l.seq_aux_loss.detach() if l.seq_aux_loss is not None else torch.zeros_like(l.aux_loss)
            tail = torch.stack(
                [s.dropped.to(l.aux_loss), l.aux_loss.detach(), l.z_loss.detach(), seq, s.entropy_sum.to(l.aux_loss)]
            )
            self.loss_sums[1:4] += tail[1:4].double()
            parts = [s.counts_E.double(), s.score_sum_E.double(), tail.double()]
            if self.top_k:
                none = torch.zeros(self.top_k + 1, dtype=torch.float64, device=self.layer_sums.device)
                parts.append(s.fanout_K1.double() if s.fanout_K1 is not None else none)
            self.layer_sums[slot] += torch.cat(parts)

    def reduce(self, data_tp_group, pp_group, *, loss_norm: int) -> ReducedStats:
        """Sum over the data ranks and TP peers, then over the pipeline stages (each holds its
        own layers; the last one the loss): two all-reduces of one flat tensor. ``loss_norm``
        (data ranks x micro-steps) turns the summed loss terms into global means."""
        flat = torch.cat([self.loss_sums, self.layer_sums.flatten()])
        all_reduce_(flat, data_tp_group)
        all_reduce_(flat, pp_group)
        flat = flat.cpu()  # host sync (every step): the loss check and the bias update read these
        n = len(LOSS_TERMS)
        losses = (flat[:n] / loss_norm).tolist()
        return ReducedStats(
            **dict(zip(LOSS_TERMS, losses)), rows=flat[n:].view(len(self.layer_sums), -1), num_experts=self.num_experts
        )


def fanout(hist_K1: torch.Tensor) -> tuple[float, int]:
    """(mean, max) EP ranks a token's kept pairs reach, from the tokens counted by that number."""
    h = hist_K1.double()
    reached = torch.arange(len(h), dtype=torch.float64)
    total = float(h.sum())
    hit = (h > 0).nonzero()
    return (float((h * reached).sum()) / total if total else 0.0), (int(hit.max()) if len(hit) else 0)


def load_stats(s: LayerStats, tokens: int, norm: float, bias_range=None) -> LoadRecord:
    """One layer's balance over the global batch, from its reduced statistics."""
    c = s.counts_E.double().round()
    mean = c.mean()
    out: LoadRecord = {
        "tokens_per_expert": [int(v) for v in c.tolist()],
        "cv": float(c.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "max_over_mean": float(c.max() / mean) if mean > 0 else 0.0,
        "min": int(c.min()),
        "mean_score": [round(float(v) / tokens, 6) for v in s.score_sum_E.tolist()],
        "entropy": s.entropy_sum / tokens,
        "dropped_fraction": s.dropped / max(float(c.sum()), 1.0),
        "aux_loss": s.aux_loss / norm,
        "z_loss": s.z_loss / norm,
    }
    if s.seq_aux_loss:
        out["seq_aux_loss"] = s.seq_aux_loss / norm
    if s.fanout_K1 is not None:
        out["fanout_mean"], out["fanout_max"] = fanout(s.fanout_K1)
    if bias_range is not None:
        out["expert_bias_range"] = bias_range
    return out


@dataclass(frozen=True)
class StepShape:
    tokens: int  # per optimizer step, global
    samples: int
    num_experts: int
    moe_layers: list
    flops_per_token: float
    peak_flops: float | None  # per device
    world_size: int
    loss_norm: int  # data ranks x micro-steps: turns summed per-rank losses into global means


@dataclass(frozen=True)
class RankTimes:
    """One rank's seconds per phase and All-to-All numbers for one step. ``max_over`` takes
    each field's maximum over the ranks (one collective): a record holds the slowest rank's."""

    forward: float
    backward: float
    pipeline: float
    grad_reduce: float
    optimizer: float
    a2a_dispatch: float
    a2a_combine: float
    experts: float
    attention_core: float
    step: float
    bytes_sent: float
    bytes_recv: float
    min_bytes: float
    ratio: float  # bytes_sent / min_bytes; 0 without an All-to-All
    data: float = 0.0  # waiting for the micro-batches (last: callers that predate it name the rest)

    @classmethod
    def measure(cls, seconds: dict[str, float], comm: dict, step_s: float) -> RankTimes:
        """From ``PhaseTimer.seconds`` (phases not run: 0) and ``CommMeter.collect()``."""
        ratio = comm["bytes_sent"] / comm["min_bytes"] if comm["min_bytes"] else 0.0
        return cls(
            **{p: seconds.get(p, 0.0) for p in PHASES},
            a2a_dispatch=comm["dispatch_s"],
            a2a_combine=comm["combine_s"],
            experts=comm["experts_s"],
            attention_core=comm["attention_core_s"],
            step=step_s,
            bytes_sent=comm["bytes_sent"],
            bytes_recv=comm["bytes_recv"],
            min_bytes=comm["min_bytes"],
            ratio=ratio,
        )

    def max_over(self, group, device) -> RankTimes:
        t = torch.tensor(astuple(self), dtype=torch.float64, device=device)
        all_reduce_(t, group, op=torch.distributed.ReduceOp.MAX)
        return RankTimes(*t.tolist())  # host sync (logged steps): the record is written on the host


def bias_ranges(biases: dict, num_layers: int, mesh, device) -> dict | None:
    """(min, max) of each MoE layer's expert bias, gathered over pipeline stages; None when off."""
    if not biases or all(b is None for b in biases.values()):
        return None
    t = torch.full((num_layers, 2), float("-inf"), dtype=torch.float64, device=device)
    for slot, b in biases.items():
        t[slot] = torch.stack([-b.min(), b.max()]).double()
    all_reduce_(t, mesh.pp_group, op=torch.distributed.ReduceOp.MAX)
    neg_lo_hi = t.tolist()  # host sync (logged steps): the record is written on the host
    return {slot: [-neg_lo_hi[slot][0], neg_lo_hi[slot][1]] for slot in range(num_layers)}


def step_record(
    *, step: int, lr: float, grad_norm: float, stats: ReducedStats, shape: StepShape, times: RankTimes, biases
) -> StepRecord:
    """A logged step's record from the reduced numbers (``times``: the slowest rank's)."""
    step_s = times.step
    flops_per_s = shape.flops_per_token * shape.tokens / step_s
    routed = float(stats.counts_LE.sum())
    time_: TimeRecord = {
        "data": times.data,
        "forward": times.forward,
        "backward": times.backward,
        "pipeline": times.pipeline,
        "grad_reduce": times.grad_reduce,
        "optimizer": times.optimizer,
        "a2a": times.a2a_dispatch + times.a2a_combine,
        "a2a_dispatch": times.a2a_dispatch,
        "a2a_combine": times.a2a_combine,
        "experts": times.experts,
        "attention_core": times.attention_core,
        "step": step_s,
    }
    record: StepRecord = {
        "step": step,
        "loss": stats.loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "aux_loss": stats.aux_loss,
        "z_loss": stats.z_loss,
        "seq_aux_loss": stats.seq_aux_loss,
        "tokens_per_s": shape.tokens / step_s,
        "samples_per_s": shape.samples / step_s,
        "step_s": step_s,
        "flops_per_s": flops_per_s,
        "mfu": flops_per_s / (shape.peak_flops * shape.world_size) if shape.peak_flops else None,
        "dropped_fraction": float(stats.dropped_L.sum()) / max(routed, 1.0),
        "time": time_,
        "a2a": {
            "bytes_sent": int(times.bytes_sent),
            "bytes_recv": int(times.bytes_recv),
            "min_bytes": int(times.min_bytes),
            "ratio": times.ratio or None,
        },
        "load": {},
    }
    for j, layer in enumerate(shape.moe_layers):
        bias = None if biases is None else biases[j]
        record["load"][f"layer{layer}"] = load_stats(stats.layer(j), shape.tokens, shape.loss_norm, bias)
    hists = [h for h in (stats.layer(j).fanout_K1 for j in range(len(shape.moe_layers))) if h is not None]
    if hists:  # over every MoE layer's tokens: beside the bytes the fan-out makes
        record["a2a"]["fanout_mean"], record["a2a"]["fanout_max"] = fanout(torch.stack(hists).sum(0))
    return record


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t``: its shard for a DTensor (parallel.sharding), else all."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _split(model, sizes) -> list[int]:
    """[(param, bytes)] -> [expert bytes, non-expert bytes]."""
    expert_ids = {id(p) for p in model.expert_parameters()}
    e = sum(b for p, b in sizes if id(p) in expert_ids)
    return [e, sum(b for _, b in sizes) - e]


def grad_bytes(model) -> list[int]:
    """[expert, non-expert] bytes of the gradients this rank holds now: read after the
    backward and the reduction, before ``zero_grad`` frees them. In the sharded modes FSDP2
    keeps each gradient's shard (a DTensor) and frees the whole one after its reduce-scatter;
    a mode that kept whole gradients would show here. Shapes only: no host sync."""
    return _split(model, [(p, local_bytes(p.grad)) for p in model.parameters() if p.grad is not None])


def memory_report(
    model, optimizer, peak_bytes: int, group, device, start_bytes: int = 0, grads: list[int] | None = None
) -> MemoryRecord:
    """Bytes per rank, expert / non-expert, as min and max over all ranks (one collective):
    what each rank holds at rest (its shards in the sharded modes), the gradients measured
    during training (``grads``: the largest ``grad_bytes`` seen after a backward; [0, 0]
    when no step ran), and the peak (also less ``start_bytes``, what the rank held before
    training)."""
    split = functools.partial(_split, model)
    params = list(model.parameters())
    param_b = split([(p, local_bytes(p)) for p in params])
    grad_b = list(grads) if grads is not None else [0, 0]
    optim_b = split(
        [(p, sum(local_bytes(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))) for p in params]
    )
    local = torch.tensor(
        param_b + grad_b + optim_b + [peak_bytes, peak_bytes - start_bytes], dtype=torch.float64, device=device
    )
    both = torch.cat([local, -local])  # max of v and of -v: max and min in one collective
    all_reduce_(both, group, op=torch.distributed.ReduceOp.MAX)
    n = local.numel()
    hi, lo = both[:n].tolist(), (-both[n:]).tolist()
    mm = lambda i: MinMax(min=int(lo[i]), max=int(hi[i]))  # noqa: E731
    split_mm = lambda k: SplitBytes(expert=mm(2 * k), non_expert=mm(2 * k + 1))  # noqa: E731
    report = MemoryRecord(
        param_bytes=split_mm(0),
        grad_bytes=split_mm(1),
        optimizer_bytes=split_mm(2),
        peak_bytes=mm(6),
        # The peak less what the rank held before building the model (on the CPU the process's
        # interpreter, torch and process groups; 0 on CUDA, whose peak counts tensors only).
        peak_above_start_bytes=mm(7),
    )
    return report
