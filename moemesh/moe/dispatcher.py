"""Dropless All-to-All token dispatcher over the EP group. Not an nn.Module.

Shape letters: T tokens, D model dim, E experts, e = E / R local experts,
K top-k, N rows this rank sends, M rows this rank receives, R EP ranks.

dispatch: permute (expert-major send buffer) -> exchange counts [R, e] ->
All-to-All of rows with exact splits -> sort received chunks rank-major to
expert-major. combine: the reverse, then unpermute (weighted top-k sum).
The split sizes come to the host (``tolist``): on GPU this is a device sync;
the counts are tiny, the rows are not, and exact splits send no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange

from moemesh.kernels import TORCH_OPS, KernelOps
from moemesh.parallel.comm import CommMeter, all_to_all_counts, all_to_all_rows, group_size, is_replaying


@dataclass(frozen=True)
class DispatchMeta:
    row_map_N: torch.Tensor  # flat (token, k) pair index of each sent row
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    recv_counts_Re: torch.Tensor  # rows received per (source rank, local expert)
    tokens_per_expert_e: torch.Tensor  # rows each local expert computes


class AllToAllDispatcher:
    """dispatch/combine for the plain path; the steps are public so that the overlapped
    path (``moe.overlap``) runs the same steps on chunks of the tokens."""

    def __init__(self, *, num_experts: int, ep_group=None, ops: KernelOps = TORCH_OPS, meter: CommMeter | None = None):
        self.num_experts = num_experts
        self.ops = ops
        self.meter = meter  # counts the All-to-All's bytes and time (trainer.parallelize.apply_instrumentation)
        self.set_group(ep_group)

    def set_group(self, ep_group) -> None:
        """Exchange over ``ep_group`` (None: one rank, nothing crosses a process boundary)."""
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        self.num_local_experts = self.num_experts // self.ep_size

    def permute(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        """Rows in expert-major order, the (token, k) pair of each row, rows per (EP rank, local expert)."""
        rows_ND, row_map_N, counts_E = self.ops.permute(x_TD, topk_ids_TK, self.num_experts)
        return rows_ND, row_map_N, rearrange(counts_E, "(r e) -> r e", r=self.ep_size)

    @torch.no_grad()
    def fanout(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """[K + 1]: this rank's tokens by how many EP ranks their kept (token, k) pairs reach (a
        dropped pair, id -1, reaches none): the All-to-All fan-out that rank-limited routing caps."""
        K = topk_ids_TK.shape[1]
        rank_TK = torch.sort(torch.div(topk_ids_TK, self.num_local_experts, rounding_mode="floor"), dim=1).values
        first = torch.full_like(rank_TK[:, :1], -2)
        new_TK = (rank_TK >= 0) & (rank_TK != torch.cat([first, rank_TK[:, :-1]], dim=1))
        reached_T = new_TK.sum(1)
        return torch.zeros(K + 1, dtype=torch.int64, device=reached_T.device).index_add_(
            0, reached_T, torch.ones_like(reached_T)
        )

    def exchange_counts(self, counts_R: torch.Tensor) -> torch.Tensor:
        """Send row ``r`` of ``counts_R`` [R, ...] to EP rank r; receive [R, ...] (row r from rank r)."""
        return all_to_all_counts(counts_R, self.ep_group)

    def count_dropless_minimum(self, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        """Add to the meter the bytes this rank must send even with perfect packing.

        Its routed rows whose expert lives elsewhere (dispatch forward, combine backward)
        and the rows other ranks routed to its experts (combine forward, dispatch
        backward). From split sizes already on the host: no extra device sync. Not again
        when an activation-checkpointed block recomputes its forward.
        """
        if self.meter is None or self.ep_size == 1 or is_replaying():
            return
        me = dist.get_rank(self.ep_group)
        leaving = sum(send_splits) - send_splits[me]
        arriving = sum(recv_splits) - recv_splits[me]
        self.meter.min_bytes += 2 * (leaving + arriving) * row_bytes

    def to_expert_major(self, recv_MD: torch.Tensor, recv_counts_Re: torch.Tensor) -> torch.Tensor:
        """Received rows come rank-major (by source rank, then expert): regroup by local expert."""
        return self.ops.sort_chunks(recv_MD, recv_counts_Re)

    def to_rank_major(self, y_MD: torch.Tensor, recv_counts_Re: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_expert_major``: back in the order the rows arrived."""
        return self.ops.sort_chunks(y_MD, recv_counts_Re.t())

    def unpermute(self, back_ND: torch.Tensor, row_map_N: torch.Tensor, topk_weights_TK: torch.Tensor):
        """Scatter the returned rows to their tokens, summing the top-k outputs by weight."""
        return self.ops.unpermute(back_ND, row_map_N, topk_weights_TK)

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        rows_ND, row_map_N, counts_Re = self.permute(x_TD, topk_ids_TK)
        recv_counts_Re = self.exchange_counts(counts_Re)
        send_splits = counts_Re.sum(1).tolist()  # host sync: the split sizes
        recv_splits = recv_counts_Re.sum(1).tolist()
        self.count_dropless_minimum(send_splits, recv_splits, x_TD.shape[1] * x_TD.element_size())
        recv_MD = all_to_all_rows(rows_ND, send_splits, recv_splits, self.ep_group, self.meter, "dispatch")
        meta = DispatchMeta(
            row_map_N=row_map_N,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_counts_Re=recv_counts_Re,
            tokens_per_expert_e=recv_counts_Re.sum(0),
        )
        return self.to_expert_major(recv_MD, recv_counts_Re), meta

    def combine(self, y_MD: torch.Tensor, topk_weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        rank_major_MD = self.to_rank_major(y_MD, meta.recv_counts_Re)
        back_ND = all_to_all_rows(
            rank_major_MD, meta.recv_splits, meta.send_splits, self.ep_group, self.meter, "combine"
        )
        return self.unpermute(back_ND, meta.row_map_N, topk_weights_TK)
