"""Collectives the model and trainer use; every one takes its process group.

A group of ``None`` means a single rank: the collective is the identity. This
keeps one code path for ``parallel=single`` without a process group.
"""
from __future__ import annotations

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


class _AllToAllRows(torch.autograd.Function):
    """All-to-All of rows with exact variable splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND, in_splits: list[int], out_splits: list[int], group):
        ctx.in_splits, ctx.out_splits, ctx.group = in_splits, out_splits, group
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(
            out, x_ND.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in,
            grad_out.contiguous(),
            output_split_sizes=ctx.in_splits,
            input_split_sizes=ctx.out_splits,
            group=ctx.group,
        )
        return grad_in, None, None, None


def all_to_all_rows(x_ND: torch.Tensor, in_splits: list[int], out_splits: list[int], group) -> torch.Tensor:
    if group_size(group) == 1:
        return x_ND
    return _AllToAllRows.apply(x_ND, in_splits, out_splits, group)
