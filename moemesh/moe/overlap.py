"""All-to-All overlap: chunked dispatch pipelined with the expert compute.

Shape letters: T tokens, D model dim, K top-k, N routed rows, M received rows, R EP ranks.

The tokens are cut into ``chunks`` contiguous chunks. All chunks' per-expert counts go
in one small exchange; then every chunk's rows are sent with an asynchronous
All-to-All, and the experts compute chunk i while the rows of chunks i+1.. are still
in flight. Each chunk's combine is sent back asynchronously as soon as its experts
finish. The shared expert (``shared_at``) runs after the last chunk's combine is launched,
while it is in flight ("combine"), or after the first dispatches are launched ("dispatch"):
either way it hides an exchange that no routed compute covers (the last combine has
nothing after it, the first dispatch nothing before it). With one chunk this is the plain
path with the shared expert overlapped, bitwise the same numbers.

Backward overlaps too, through the autograd engine: an exchange is two autograd
nodes, ``_Start`` (launch) and ``_Wait``. In backward, ``_Wait`` launches the reverse
exchange and ``_Start`` waits for it; the engine runs ready nodes created later
first, so the expert backward of the next chunk runs between them; the shared expert's
backward, created between an exchange's two nodes, runs between them too.

Same math: every row meets the same expert weights as without chunking; only the
order of additions into the expert weight gradients changes (by chunk), so results
agree to fp32 rounding (tested to 1e-6).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moemesh.fields import SharedExpertOverlap
from moemesh.parallel.comm import exchange_rows, replayable


class _Handle:
    """The in-flight exchange of one chunk, shared by its _Start and _Wait nodes."""

    def __init__(self, in_splits, out_splits, group, meter, kind):
        self.in_splits, self.out_splits, self.group = in_splits, out_splits, group
        self.meter, self.kind = meter, kind
        self.work = self.grad_work = self.grad_in = None
        self.sent = self.recv = 0


def _row_bytes(x: torch.Tensor) -> int:
    return x[0].numel() * x.element_size() if x.shape[0] else 0


def _launch(x, in_splits, out_splits, group):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    return out, exchange_rows(out, x, out_splits, in_splits, group, async_op=True)


def _launch_forward(x, h: _Handle):
    """The forward launch, replayable (``comm.replayable``): an activation-checkpointed
    recompute gets the buffer the first forward's exchange filled, and ``h.work`` is None."""

    def run():
        out, h.work = _launch(x, h.in_splits, h.out_splits, h.group)
        _count(h, x, h.in_splits, h.out_splits)
        return out

    return replayable(run)


def _count(h: _Handle, x, in_splits, out_splits):
    if h.meter is None:
        return
    me = dist.get_rank(h.group)
    row = _row_bytes(x) if x.shape[0] else 0
    h.meter.bytes_sent += (sum(in_splits) - in_splits[me]) * row
    h.meter.bytes_recv += (sum(out_splits) - out_splits[me]) * row


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h: _Handle):
        ctx.h = h
        return _launch_forward(x, h)

    @staticmethod
    def backward(ctx, _unused):
        h = ctx.h
        t0 = h.meter.start() if h.meter is not None else None
        h.grad_work.wait()
        if h.meter is not None:
            h.meter.stop(h.kind, t0, 0, 0)
        grad_in, h.grad_in = h.grad_in, None
        return grad_in, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, h: _Handle):
        if h.work is not None:  # None: replayed, nothing in flight
            t0 = h.meter.start() if h.meter is not None else None
            h.work.wait()
            if h.meter is not None:
                h.meter.stop(h.kind, t0, 0, 0)  # exposed (not hidden) communication time
        ctx.h = h
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, g):
        h = ctx.h
        h.grad_in, h.grad_work = _launch(g, h.out_splits, h.in_splits, h.group)
        _count(h, g, h.out_splits, h.in_splits)
        return torch.zeros_like(g), None  # the real gradient arrives through _Start.backward


def _exchange_start(x, in_splits, out_splits, group, meter, kind):
    h = _Handle(in_splits, out_splits, group, meter, kind)
    return _Start.apply(x, h), h


def overlapped_moe(
    dispatcher,
    x_TD,
    topk_ids_TK,
    topk_weights_TK,
    experts,
    *,
    chunks: int,
    shared=None,
    shared_at: SharedExpertOverlap = SharedExpertOverlap.combine,
):
    """The dispatcher's dispatch -> experts -> combine, chunked and overlapped.

    ``experts(rows, tokens_per_expert)`` computes the local experts; ``shared()`` (optional)
    the shared expert's output for all T tokens (under TP without SP this rank's unreduced
    partial, gated or not, which the layer sums over tp with the routed rows), run while the
    exchange ``shared_at`` names is in flight ("none": not run here). Returns (out_TD, shared_out or None).
    """
    d = dispatcher
    T = x_TD.shape[0]
    bounds = [T * i // chunks for i in range(chunks + 1)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    # Permute each chunk (local): rows, their (token, k) pairs, rows per (EP rank, local expert).
    permuted = [d.permute(x_TD[lo:hi], topk_ids_TK[lo:hi]) for lo, hi in spans]
    # One exchange of every chunk's counts, before any row is in flight.
    send_counts = torch.stack([counts_Re for _, _, counts_Re in permuted], dim=1)  # [R, chunks, e]
    recv_counts = d.exchange_counts(send_counts)
    if d.meter is not None and d.ep_size > 1:
        totals = torch.stack([send_counts.sum((1, 2)), recv_counts.sum((1, 2))]).tolist()  # one host sync
        d.count_dropless_minimum(totals[0], totals[1], x_TD.shape[1] * x_TD.element_size())
    launched = []
    for i, (rows, _, counts_Re) in enumerate(permuted):
        recv_Re = recv_counts[:, i]
        send, recv = counts_Re.sum(1).tolist(), recv_Re.sum(1).tolist()  # host sync: split sizes
        buf, h = _exchange_start(rows, send, recv, d.ep_group, d.meter, "dispatch")
        launched.append((buf, h, recv_Re, send, recv))
    run_shared = shared if shared_at != SharedExpertOverlap.none else None
    shared_out = None
    if run_shared is not None and shared_at == SharedExpertOverlap.dispatch:
        shared_out = run_shared()  # while the dispatches are in flight
    combines = []
    for buf, h, recv_Re, send, recv in launched:
        received = _Wait.apply(buf, h)
        y = experts(d.to_expert_major(received, recv_Re), recv_Re.sum(0))
        back, hc = _exchange_start(d.to_rank_major(y, recv_Re), recv, send, d.ep_group, d.meter, "combine")
        combines.append((back, hc))
    if run_shared is not None and shared_at == SharedExpertOverlap.combine:
        shared_out = run_shared()  # while the last combine (and any other unwaited one) is in flight
    outs = [
        d.unpermute(_Wait.apply(back, hc), row_map, topk_weights_TK[lo:hi])
        for (lo, hi), (_, row_map, _), (back, hc) in zip(spans, permuted, combines)
    ]
    return torch.cat(outs) if outs else x_TD.new_zeros(0, x_TD.shape[1]), shared_out
