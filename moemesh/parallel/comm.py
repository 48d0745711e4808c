"""Collectives the model and trainer use; every one takes its process group.

A group of ``None`` means a single rank: the collective is the identity. This
keeps one code path for ``parallel=single`` without a process group.

Record and replay (for activation checkpointing, ``parallel.recompute``): every
collective the model's forward issues goes through ``replayable``. While a
checkpointed region runs its forward under ``recording(tape)``, each collective's
output is kept on the tape, in order; when the region is recomputed for the backward
under ``replaying(tape)``, each collective returns its recorded output instead of
communicating, and the meter counts nothing. So a recompute never repeats an
All-to-All, a TP collective or a statistics all-reduce, needs no peer to take part,
and the tensors it rebuilds are bit-identical to the first forward's. The active
tape lives in a thread-local, like torch's own grad mode: a region's forward and its
recompute each run on one thread, and nothing outside a checkpointed region sees it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from itertools import accumulate

import torch
import torch.distributed as dist


class CollectiveTape:
    """The outputs of one checkpointed region's forward collectives, in the order they ran."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.cursor: int | None = None  # None: recording; else the next output to replay

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs)


class _Active(threading.local):
    tape: CollectiveTape | None = None
    in_collective: bool = False


_active = _Active()


@contextlib.contextmanager
def recording(tape: CollectiveTape) -> Iterator[None]:
    """Run a region's forward: each ``replayable`` collective's output goes on ``tape``."""
    prev, _active.tape = _active.tape, tape
    tape.cursor = None
    try:
        yield
    finally:
        _active.tape = prev


@contextlib.contextmanager
def replaying(tape: CollectiveTape) -> Iterator[None]:
    """Recompute a region: each ``replayable`` collective returns ``tape``'s next output.

    Starts from the first output every time (a second backward through a retained
    graph recomputes again); a recompute that stops early leaves the rest unread.
    """
    prev, _active.tape = _active.tape, tape
    tape.cursor = 0
    try:
        yield
    finally:
        _active.tape = prev
        tape.cursor = None


def is_replaying() -> bool:
    """True inside a recompute: host-side counters (meter bytes) must not count again."""
    return _active.tape is not None and _active.tape.cursor is not None


def collective_in_progress() -> bool:
    """True while a recorded collective runs (the selective policy saves nothing from it)."""
    return _active.in_collective


def replayable(run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()``, a forward collective returning a new tensor, made safe to recompute.

    Outside a checkpointed region: ``run()``. Recording: ``run()``, its output kept on
    the tape (a reference, not a copy: callers never modify it in place; for an
    asynchronous collective, the buffer its wait fills). Replaying: the recorded
    output, and ``run`` is not called, so nothing is sent and nothing is metered.
    """
    tape = _active.tape
    if tape is None:
        return run()
    if tape.cursor is not None:
        assert tape.cursor < len(tape.outputs), "recompute issued more collectives than its forward"
        out = tape.outputs[tape.cursor]
        tape.cursor += 1
        return out.detach()
    _active.in_collective = True
    try:
        out = run()
    finally:
        _active.in_collective = False
    tape.outputs.append(out.detach())
    return out


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place, for the trainer (gradients, metrics). Not replayable: inside a
    checkpointed region use ``all_reduced``."""
    assert _active.tape is None, "all_reduce_ in a checkpointed region would run again on recompute: use all_reduced"
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_reduced(t: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: the sum of ``t`` over ``group`` (a copy of ``t`` for one rank). Replayable."""
    if group_size(group) == 1:
        return t.clone()

    def run() -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    return replayable(run)


def all_to_all_counts(counts_Re: torch.Tensor, group) -> torch.Tensor:
    """Exchange per-expert counts: row r of the input goes to rank r; row r of the output came from r."""
    if group_size(group) == 1:
        return counts_Re.clone()

    def run() -> torch.Tensor:
        out = torch.empty_like(counts_Re)
        dist.all_to_all_single(out, counts_Re.contiguous(), group=group)
        return out

    return replayable(run)


class CommMeter:
    """Time and bytes of the All-to-All exchanges of one rank, per training step, and the
    time of two computations the planner prices at rates of their own (``timed_region``):
    the routed experts ("experts") and the attention core ("attention_core").

    Time is measured around each collective: wall clock on CPU, CUDA events on GPU
    (resolved at ``collect``, after the step's host sync). Bytes count only rows that
    leave (or reach) this rank, not the rows an exchange copies to itself.
    """

    KINDS = ("dispatch", "combine", "experts", "attention_core")

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
            "experts_s": self.seconds["experts"],
            "attention_core_s": self.seconds["attention_core"],
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
            "min_bytes": self.min_bytes,
        }


class PeerWork:
    """The receives and sends of one ``exchange_rows`` on gloo, waited for as one collective's work."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


_next_tag: dict = {}  # process group -> the tag of its next exchange_rows on gloo
_crosses_hosts: dict = {}  # process group -> whether its ranks are on more than one host
_rank_hosts: list | None = None  # global rank -> its host's name, once set_rank_hosts was given them


def set_rank_hosts(hosts: list | None) -> None:
    """Where every global rank runs (``parallel.mesh.build_mesh`` gathers the host names once, at
    start): on gloo, ``exchange_rows`` posts its receives first for groups that span hosts. None
    (the default): every exchange is torch's ``all_to_all_single``."""
    global _rank_hosts
    _rank_hosts = list(hosts) if hosts else None
    _crosses_hosts.clear()


def rank_hosts() -> list | None:
    """Every global rank's host name as ``set_rank_hosts`` was given them (None: not gathered,
    as on NCCL or a single rank)."""
    return None if _rank_hosts is None else list(_rank_hosts)


def _receives_first(group) -> bool:
    """Whether ``exchange_rows`` posts its receives first on ``group``: gloo, across hosts. Decided
    once per group from the host names ``set_rank_hosts`` was given, for the whole group, so all
    its ranks take the same path; no collective of its own."""
    if _rank_hosts is None:
        return False
    crosses = _crosses_hosts.get(group)
    if crosses is None:
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        crosses = dist.get_backend(group) == "gloo" and len({_rank_hosts[r] for r in ranks}) > 1
        _crosses_hosts[group] = crosses
    return crosses


def exchange_rows(
    out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, async_op=False
):
    """All-to-All of rows: ``x``'s ``in_splits[j]`` rows for each group rank j in turn go to rank j,
    and rank j's rows for this rank land in ``out`` at ``out_splits``' offsets. Returns the work
    (``async_op``) or None, as ``all_to_all_single``, which it is except on gloo across hosts.

    On gloo, for a group whose ranks are on more than one host, every receive is posted before
    any send. Gloo carries a pair's control messages and payloads on one TCP stream, and its
    All-to-All posts each send before its receive: a rank whose peer is already waiting writes
    its whole payload first, and only then the message that it is ready to receive, so the
    peer's payload waits behind it and the two directions of the link take turns instead of
    running at once. Across a link shaped to 200 Mbit/s (two hosts, benchmarks/RESULTS.md) that
    held 4-8 MiB exchanges to 55-62% of the link's rate in most calls; with the receives first
    they reach 90-93% in every call. Inside one host (loopback) the turns cost little, and
    torch's collective keeps its lower latency on oversubscribed cores. Which groups span hosts
    is known from ``set_rank_hosts``; without it, every group is taken for one host's. Each
    such exchange on a group has its own tag (the group's count of exchanges so far, the same on
    every rank, as collectives are called in the same order), so exchanges in flight at once
    never match each other's messages."""
    x = x.contiguous()
    if not _receives_first(group):
        return dist.all_to_all_single(
            out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group, async_op=async_op
        )
    me, n = dist.get_rank(group), len(in_splits)
    tag = _next_tag.get(group, 0)
    _next_tag[group] = (tag + 1) % (1 << 24)
    at_in, at_out = list(accumulate(in_splits, initial=0)), list(accumulate(out_splits, initial=0))
    works = []
    for i in range(1, n):
        src = (me - i) % n
        if out_splits[src]:
            works.append(dist.irecv(out.narrow(0, at_out[src], out_splits[src]), group=group, group_src=src, tag=tag))
    out.narrow(0, at_out[me], out_splits[me]).copy_(x.narrow(0, at_in[me], in_splits[me]))
    for i in range(1, n):
        dst = (me + i) % n
        if in_splits[dst]:
            works.append(dist.isend(x.narrow(0, at_in[dst], in_splits[dst]), group=group, group_dst=dst, tag=tag))
    work = PeerWork(works)
    if async_op:
        return work
    work.wait()
    return None


def _exchange(x_ND, in_splits, out_splits, group, meter, kind):
    out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
    start = meter.start() if meter is not None else None
    exchange_rows(out, x_ND, out_splits, in_splits, group)
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
        return replayable(lambda: _exchange(x_ND, in_splits, out_splits, group, meter, kind))

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


class _RegionClock:
    """The backward start of one timed region, handed from its exit marker to its entry marker."""

    __slots__ = ("forward_start", "backward_start")

    def __init__(self) -> None:
        self.forward_start = self.backward_start = None


class _RegionEntry(torch.autograd.Function):
    """On the region's input. Forward: starts the forward clock. Backward (the region's last
    gradient out): stops the backward clock."""

    @staticmethod
    def forward(ctx, x, meter: CommMeter, kind: str, clock: _RegionClock, anchor):
        ctx.meter, ctx.kind, ctx.clock = meter, kind, clock
        clock.forward_start = meter.start()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.clock.backward_start is not None:
            ctx.meter.stop(ctx.kind, ctx.clock.backward_start, 0, 0)
            ctx.clock.backward_start = None
        return g, None, None, None, None


class _RegionExit(torch.autograd.Function):
    """On the region's output. Forward: stops the forward clock. Backward (the region's first
    gradient in): starts the backward clock."""

    @staticmethod
    def forward(ctx, y, meter: CommMeter, kind: str, clock: _RegionClock):
        ctx.meter, ctx.clock = meter, clock
        meter.stop(kind, clock.forward_start, 0, 0)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        ctx.clock.backward_start = ctx.meter.start()
        return g, None, None, None


def _enter(meter: CommMeter, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, _RegionClock]:
    clock = _RegionClock()
    # An input that needs no gradient (weights that do) would leave the entry marker out of the
    # backward, and its clock running: an empty leaf that needs one keeps the marker in.
    anchor = torch.empty(0, requires_grad=True) if torch.is_grad_enabled() and not x.requires_grad else None
    return _RegionEntry.apply(x, meter, kind, clock, anchor), clock


def timed_region(meter: CommMeter | None, kind: str, run: Callable[..., torch.Tensor], x, *args) -> torch.Tensor:
    """``run(x, *args)``, its forward and its backward timed under ``kind`` on ``meter``.

    The backward is timed from the gradient reaching the output to the gradient leaving ``x``
    (autograd runs the region's nodes in between; on one thread per device, another branch
    ready at the same time can run in that window too). A recompute (activation
    checkpointing) runs the forward again and is timed again: it is computation.
    No meter, or under torch.compile: ``run(x, *args)``, untimed.
    """
    if meter is None or torch.compiler.is_compiling():
        return run(x, *args)
    x, clock = _enter(meter, kind, x)
    return _RegionExit.apply(run(x, *args), meter, kind, clock)


def time_module(module: torch.nn.Module, meter: CommMeter, kind: str) -> None:
    """Time every call of ``module`` as ``timed_region`` does, through forward hooks: the
    module stays as built, its first positional input marks the region's entry, its output
    the exit. Register before FSDP shards the module: FSDP prepends its pre-forward hook
    (the gather runs before the clock starts) and appends its post-forward one, which then
    sees the marked output (its backward gather runs before the backward clock starts)."""
    clocks: list[_RegionClock] = []  # a call's clock, from its pre-hook to its post-hook

    def before(mod, args):
        if torch.compiler.is_compiling() or not args or not isinstance(args[0], torch.Tensor):
            return None
        x, clock = _enter(meter, kind, args[0])
        clocks.append(clock)
        return (x, *args[1:])

    def after(mod, args, out):
        if not clocks:  # compiling, or no tensor input: untimed
            return None
        return _RegionExit.apply(out, meter, kind, clocks.pop())

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)
