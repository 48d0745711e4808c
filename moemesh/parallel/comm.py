"""Collectives the model and trainer use; every one takes its process group.

A group of ``None`` means a single rank: the collective is the identity. This
keeps one code path for ``parallel=single`` without a process group.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_to_all_counts(counts_Re: torch.Tensor, group) -> torch.Tensor:
    """Exchange per-expert counts: row r of the input goes to rank r; row r of the output came from r."""
    if group_size(group) == 1:
        return counts_Re.clone()
    out = torch.empty_like(counts_Re)
    dist.all_to_all_single(out, counts_Re.contiguous(), group=group)
    return out


class CommMeter:
    """Time and bytes of the All-to-All exchanges of one rank, per training step.

    Time is measured around each collective: wall clock on CPU, CUDA events on GPU
    (resolved at ``collect``, after the step's host sync). Bytes count only rows that
    leave (or reach) this rank, not the rows an exchange copies to itself.
    """

    KINDS = ("dispatch", "combine")

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.seconds = {k: 0.0 for k in self.KINDS}
        self.bytes_sent = self.bytes_recv = self.min_bytes = 0
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # (kind, start, end)

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, kind: str, start, sent: int, recv: int) -> None:
        self.bytes_sent += sent
        self.bytes_recv += recv
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((kind, start, end))
        else:
            self.seconds[kind] += time.perf_counter() - start

    def collect(self) -> dict:
        for kind, start, end in self._events:
            self.seconds[kind] += start.elapsed_time(end) / 1e3
        self._events.clear()
        return {
            "dispatch_s": self.seconds["dispatch"],
            "combine_s": self.seconds["combine"],
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
            "min_bytes": self.min_bytes,
        }


def _exchange(x_ND, in_splits, out_splits, group, meter, kind):
    out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
    start = meter.start() if meter is not None else None
    dist.all_to_all_single(
        out, x_ND.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
    )
    if meter is not None:
        me = dist.get_rank(group)
        row = math.prod(x_ND.shape[1:]) * x_ND.element_size()
        meter.stop(kind, start, (sum(in_splits) - in_splits[me]) * row, (sum(out_splits) - out_splits[me]) * row)
    return out


class _AllToAllRows(torch.autograd.Function):
    """All-to-All of rows with exact variable splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND, in_splits: list[int], out_splits: list[int], group, meter, kind):
        ctx.in_splits, ctx.out_splits, ctx.group, ctx.meter, ctx.kind = in_splits, out_splits, group, meter, kind
        return _exchange(x_ND, in_splits, out_splits, group, meter, kind)

    @staticmethod
    def backward(ctx, grad_out):
        # The backward of a dispatch is a combine-shaped exchange and vice versa; it is
        # counted under the forward's name.
        grad_in = _exchange(grad_out, ctx.out_splits, ctx.in_splits, ctx.group, ctx.meter, ctx.kind)
        return grad_in, None, None, None, None, None


def all_to_all_rows(
    x_ND: torch.Tensor,
    in_splits: list[int],
    out_splits: list[int],
    group,
    meter: CommMeter | None = None,
    kind: str = "dispatch",
) -> torch.Tensor:
    if group_size(group) == 1:
        return x_ND
    return _AllToAllRows.apply(x_ND, in_splits, out_splits, group, meter, kind)
