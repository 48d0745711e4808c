"""What a run reports: per-step records (metrics.jsonl), the summary (summary.json),
the console progress bar and end-of-run summary, and the numbers behind them.

Every number in a record is global: reduced over the ranks that share it (loss and
load statistics summed over the data ranks, TP peers and pipeline stages; times and
bytes as the slowest rank's, since the slowest rank sets the step time).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from array import array
from collections.abc import Mapping
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, TextIO, TypedDict

import torch

from moemesh.parallel.comm import all_reduce_

# ---- the metrics.jsonl contract: a record's keys, defined here once -------------------------

# The sequential phases of a step, as timed (time.<phase>; pipeline: the PP schedule's
# forward and backward together).
PHASES = ("forward", "backward", "pipeline", "grad_reduce", "optimizer")
# The phases the All-to-All runs inside (its time is part of theirs, never added to them).
A2A_PHASES = ("forward", "backward", "pipeline")
# All-to-All seconds: both directions (a2a), then each.
A2A_TIMES = ("a2a", "a2a_dispatch", "a2a_combine")


class TimeRecord(TypedDict):
    """``time`` in a record: seconds of the step, each the slowest rank's."""

    forward: float
    backward: float
    pipeline: float
    grad_reduce: float
    optimizer: float
    a2a: float
    a2a_dispatch: float
    a2a_combine: float
    step: float


TIME_KEYS: tuple[str, ...] = tuple(TimeRecord.__annotations__)  # (*PHASES, *A2A_TIMES, "step")


class A2ARecord(TypedDict):
    """``a2a`` in a record: All-to-All bytes of one step, the busiest rank's."""

    bytes_sent: int
    bytes_recv: int
    min_bytes: int  # what a dropless exchange of the same routing must send
    ratio: float | None  # bytes_sent / min_bytes; None without an All-to-All


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


class _RunSummary(TypedDict):
    machine: dict  # hostname, device, count, cpus, python, torch
    parallel: str  # the layout's name (parallel.dims.layout_name)
    dp: int
    ep: int
    tp: int
    pp: int
    world_size: int
    model: str
    steps: int  # steps this attempt ran
    final_loss: float | None
    final_val_loss: float | None
    median_tokens_per_s: float | None  # None: no step logged
    median_step_s: float | None
    peak_memory_bytes: dict  # min, max over ranks; kind
    param_bytes_per_rank: dict
    memory_per_rank: dict  # {param,grad,optimizer}_bytes: {expert, non_expert}: {min, max}; peak_bytes
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


# ---- the step's statistics: accumulated on the device, reduced, unpacked by name ------------

LOSS_TERMS = ("loss", "aux_loss", "z_loss", "seq_aux_loss")
# Per MoE layer, the statistics vector: routed pairs per expert [E], score sums per
# expert [E], then these.
_TAIL = ("dropped", "aux_loss", "z_loss", "seq_aux_loss", "entropy_sum")


def stat_width(num_experts: int) -> int:
    return 2 * num_experts + len(_TAIL)


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

    @classmethod
    def unpack(cls, row: torch.Tensor, num_experts: int) -> LayerStats:
        E = num_experts
        return cls(row[:E], row[E : 2 * E], **dict(zip(_TAIL, row[2 * E :].tolist())))


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

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device):
        self.num_experts = num_experts
        self.loss_sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device)  # LOSS_TERMS order
        # One row per MoE layer of the whole model (global order): LayerStats.unpack's layout.
        self.layer_sums = torch.zeros(num_moe_layers, stat_width(num_experts), dtype=torch.float64, device=device)

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
            self.layer_sums[slot] += torch.cat([s.counts_E.double(), s.score_sum_E.double(), tail.double()])

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
    step: float
    bytes_sent: float
    bytes_recv: float
    min_bytes: float
    ratio: float  # bytes_sent / min_bytes; 0 without an All-to-All

    @classmethod
    def measure(cls, seconds: dict[str, float], comm: dict, step_s: float) -> RankTimes:
        """From ``PhaseTimer.seconds`` (phases not run: 0) and ``CommMeter.collect()``."""
        ratio = comm["bytes_sent"] / comm["min_bytes"] if comm["min_bytes"] else 0.0
        return cls(
            **{p: seconds.get(p, 0.0) for p in PHASES},
            a2a_dispatch=comm["dispatch_s"],
            a2a_combine=comm["combine_s"],
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
        "forward": times.forward,
        "backward": times.backward,
        "pipeline": times.pipeline,
        "grad_reduce": times.grad_reduce,
        "optimizer": times.optimizer,
        "a2a": times.a2a_dispatch + times.a2a_combine,
        "a2a_dispatch": times.a2a_dispatch,
        "a2a_combine": times.a2a_combine,
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
    return record


def memory_report(model, optimizer, peak_bytes: int, group, device) -> dict:
    """Bytes per rank, expert / non-expert, as min and max over all ranks (one collective)."""
    expert_ids = {id(p) for p in model.expert_parameters()}

    def split(sizes):  # [(param, bytes)] -> (expert, non-expert)
        e = sum(b for p, b in sizes if id(p) in expert_ids)
        return [e, sum(b for _, b in sizes) - e]

    params = list(model.parameters())
    param_b = split([(p, p.numel() * p.element_size()) for p in params])
    # Gradients exist from backward to zero_grad(set_to_none=True), one per trainable parameter.
    grad_b = split([(p, p.numel() * p.element_size() if p.requires_grad else 0) for p in params])
    optim_b = split(
        [
            (p, sum(v.numel() * v.element_size() for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)))
            for p in params
        ]
    )
    local = torch.tensor(param_b + grad_b + optim_b + [peak_bytes], dtype=torch.float64, device=device)
    both = torch.cat([local, -local])  # max of v and of -v: max and min in one collective
    all_reduce_(both, group, op=torch.distributed.ReduceOp.MAX)
    n = local.numel()
    hi, lo = both[:n].tolist(), (-both[n:]).tolist()
    mm = lambda i: {"min": int(lo[i]), "max": int(hi[i])}  # noqa: E731
    report: dict[str, dict] = {}
    for k, name in enumerate(("param_bytes", "grad_bytes", "optimizer_bytes")):
        report[name] = {"expert": mm(2 * k), "non_expert": mm(2 * k + 1)}
    report["peak_bytes"] = mm(6)
    return report


class StepSample:
    """The numbers the summary's medians need, from a bounded, evenly spaced sample of the logged steps.

    A record is kilobytes (per-layer load statistics); a week of steps is millions. This keeps
    a handful of floats per kept step (one array per column), at most ``capacity`` steps: every
    logged step until it is full, then every 2nd, 4th, ... (each time it fills, every other kept
    step goes and the spacing doubles), so the sample always spans the whole run evenly.
    Medians are exact up to ``capacity`` logged steps. Every rank is fed the same (reduced)
    records in the same order, so every rank keeps the same sample and the same summary.
    """

    def __init__(self, capacity: int = 4096):
        if capacity < 2:
            raise ValueError(f"capacity={capacity} must be >= 2")
        self.capacity = capacity
        self.stride = 1  # steady record i (0: the one after warm-up) is kept iff i % stride == 0
        self.seen = 0  # logged records with timings, the warm-up one included
        self.names: tuple[str, ...] = ()
        self.first: list[float] | None = None  # the warm-up step: the medians' source only when alone
        self.columns: list[array] = []
        self.last: Mapping[str, Any] = {}  # the last record (its load statistics end the summary)

    def _values(self, r: Mapping[str, Any]) -> list[float]:
        t = r["time"]
        if not self.names:
            self.names = (
                *(f"time.{k}" for k in t),
                "a2a_share",
                "a2a_bytes_sent",
                "samples_per_s",
                "flops_per_s",
                "mfu",
            )
            self.columns = [array("d") for _ in self.names]
        mfu = r.get("mfu")
        return [
            *(t.get(k[5:], 0.0) for k in self.names[:-5]),
            t["a2a"] / t["step"] if t["step"] else 0.0,
            r["a2a"]["bytes_sent"],
            r["samples_per_s"],
            r["flops_per_s"],
            math.nan if mfu is None else mfu,
        ]

    def add(self, record: Mapping[str, Any]) -> None:
        self.last = record
        if "time" not in record:
            return
        index, self.seen = self.seen, self.seen + 1
        if index == 0:
            self.first = self._values(record)
            return
        steady = index - 1
        if steady % self.stride:
            return
        if len(self.columns[0]) == self.capacity:  # full: keep every other step, twice the spacing
            self.columns = [column[::2] for column in self.columns]
            self.stride *= 2
            if steady % self.stride:
                return
        for column, value in zip(self.columns, self._values(record)):
            column.append(value)

    def __len__(self) -> int:
        """Steps the medians are taken over."""
        return len(self.columns[0]) if self.columns and self.columns[0] else int(self.first is not None)

    def medians(self) -> dict[str, float] | None:
        if self.columns and self.columns[0]:
            return {name: statistics.median(column) for name, column in zip(self.names, self.columns)}
        return None if self.first is None else dict(zip(self.names, self.first))

    def summary(self) -> dict:
        """The summary's medians over the logged steps after the first (warm-up)."""
        med = self.medians()
        if med is None:
            return {}
        mfu = med["mfu"]
        return {
            "time_breakdown": {name[5:]: v for name, v in med.items() if name.startswith("time.")},
            "a2a_share": med["a2a_share"],
            "a2a_bytes_sent_per_step": med["a2a_bytes_sent"],
            "median_samples_per_s": med["samples_per_s"],
            "median_flops_per_s": med["flops_per_s"],
            "mfu": None if math.isnan(mfu) else mfu,
            "load_cv_final": {layer: v["cv"] for layer, v in self.last.get("load", {}).items()},
            "median_over_steps": len(self),  # logged steps behind the medians (evenly sampled past capacity)
        }


def summarize_records(records: list[dict]) -> dict:
    """Medians over the logged steps after the first (warm-up), for summary.json."""
    sample = StepSample(capacity=max(2, len(records)))
    for r in records:
        sample.add(r)
    return sample.summary()


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_summary(s: Mapping[str, Any]) -> str:
    """The one-screen end-of-run summary."""
    m = s.get("memory_per_rank", {})
    lines = [
        f"── moemesh run summary: {s['parallel']} (dp{s['dp']}·ep{s['ep']}·tp{s['tp']}·pp{s['pp']} = "
        f"{s['world_size']} ranks), model={s['model']}, {s['steps']} steps",
        f"loss {s['final_loss']:.4f}" + (f", validation {s['final_val_loss']:.4f}" if s.get("final_val_loss") else ""),
        f"throughput  {s['median_tokens_per_s']:,.0f} tokens/s, {s.get('median_samples_per_s') or 0:,.1f} samples/s, "
        f"step {s['median_step_s'] * 1e3:,.1f} ms" + (f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") else ""),
    ]
    tb = s.get("time_breakdown")
    if tb:
        parts = ", ".join(f"{k} {100 * v / tb['step']:.0f}%" for k, v in tb.items() if k in PHASES and v)
        parts += " (slowest rank per phase)"
        lines.append(f"step time   {parts}")
        lines.append(
            f"All-to-All  {100 * (s.get('a2a_share') or 0):.1f}% of the step (inside forward/backward), "
            f"{_mib(s.get('a2a_bytes_sent_per_step') or 0)} sent per rank per step"
        )
    if m:
        lines.append(
            f"memory/rank params expert {_mib(m['param_bytes']['expert']['max'])}, non-expert "
            f"{_mib(m['param_bytes']['non_expert']['max'])}; optimizer "
            f"{_mib(m['optimizer_bytes']['expert']['max'] + m['optimizer_bytes']['non_expert']['max'])}; "
            f"peak {_mib(m['peak_bytes']['max'])} (max over ranks)"
        )
    cv = s.get("load_cv_final")
    if cv:
        lines.append("load CV     " + ", ".join(f"{k} {v:.2f}" for k, v in cv.items()))
    return "\n".join(lines)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes one JSON object per logged step; prints a live progress line.

    Only rank 0 constructs one with ``enabled=True``; other ranks get a silent one.
    """

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        console: bool,
        jsonl: bool,
        total_steps: int,
        tracker=None,
        sample_capacity: int = 4096,
    ):
        self.enabled, self.console, self.total_steps = enabled, console and enabled, total_steps
        self.tracker = tracker if enabled else None
        # Not the records (kilobytes each, every step of a long run): the sample the summary needs.
        self.sample = StepSample(sample_capacity)
        self.dir = Path(output_dir)
        self._jsonl = enabled and jsonl
        self._file: TextIO | None = None  # opened by begin(), once the first step is known
        self._tty = sys.stdout.isatty()
        # Every line the run prints, also on file (rank 0; appended across resumed attempts).
        self._log = open(self.dir / "train.log", "a") if enabled else None
        self._last_print = 0.0
        self._start = time.perf_counter()

    def begin(self, start_step: int) -> None:
        """Open metrics.jsonl. A run resumed in its own directory (a requeued SLURM job)
        keeps the records of the ``start_step`` steps completed before and appends after them.
        A record's ``step`` counts completed optimizer steps (1 for the first, as on the
        console and in ``checkpoints/step_N``)."""
        if not self._jsonl or self._file is not None:
            return
        path = self.dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", start_step + 1) <= start_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:  # a line cut short when the last attempt was killed
                    continue
        self._file = open(path, "w")
        self._file.writelines(kept)

    def log(self, record: StepRecord) -> None:
        self.sample.add(record)  # on every rank: the summary is the same everywhere
        if not self.enabled:
            return
        if self.tracker is not None:
            self.tracker.log(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if "loss" in record:
            self._progress(record)

    def _progress(self, r: StepRecord) -> None:
        """The live progress line: redrawn in place on a terminal; otherwise, and in
        train.log, the first and last steps and one line every 5 s."""
        now = time.perf_counter()
        step = r["step"]
        last = step == self.total_steps
        due = last or step == 1 or now - self._last_print >= 5.0
        if not (due or (self.console and self._tty)):
            return
        elapsed = now - self._start
        eta = elapsed / step * (self.total_steps - step)
        done = int(20 * step / self.total_steps)
        line = (
            f"[{'#' * done}{'.' * (20 - done)}] step {step:>5}/{self.total_steps} | loss {r['loss']:.4f} | "
            f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | ETA {_fmt_duration(eta)}"
        )
        if "val_loss" in r:
            line += f" | val {r['val_loss']:.4f}"
        if self.console and self._tty:
            sys.stdout.write("\r" + line + ("\n" if last else ""))
            sys.stdout.flush()
        elif self.console and due:
            print(line, flush=True)
        if due:
            self._last_print = now
            self._to_file(line)

    def message(self, text: str) -> None:
        if self.console:
            if self._tty:
                sys.stdout.write("\r\033[K")
            print(text, flush=True)
        self._to_file(text)

    def _to_file(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    def write_summary(self, summary: RunSummary) -> None:
        if self.enabled:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.tracker is not None:
                self.tracker.summary(summary)
            if summary.get("steps"):
                self.message(format_summary(summary))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._log is not None:
            self._log.close()
            self._log = None
