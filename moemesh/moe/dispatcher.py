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

from moemesh.kernels import TORCH_OPS, KernelOps
from moemesh.parallel.comm import CommMeter, all_to_all_counts, all_to_all_rows, group_size


@dataclass(frozen=True)
class DispatchMeta:
    row_map_N: torch.Tensor  # flat (token, k) pair index of each sent row
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    recv_counts_Re: torch.Tensor  # rows received per (source rank, local expert)
    tokens_per_expert_e: torch.Tensor  # rows each local expert computes


class AllToAllDispatcher:
    def __init__(self, *, num_experts: int, ep_group, ops: KernelOps = TORCH_OPS, meter: CommMeter | None = None):
        self.num_experts = num_experts
        self.ops = ops
        self.meter = meter
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        R, e = self.ep_size, self.num_local_experts
        rows_ND, row_map_N, counts_E = self.ops.permute(x_TD, topk_ids_TK, self.num_experts)
        counts_Re = counts_E.view(R, e)
        recv_counts_Re = all_to_all_counts(counts_Re, self.ep_group)
        send_splits = counts_Re.sum(1).tolist()
        recv_splits = recv_counts_Re.sum(1).tolist()
        if self.meter is not None and R > 1:
            # The dropless minimum this rank must send, from the routing itself: its routed
            # rows whose expert lives elsewhere (dispatch forward, combine backward) and the
            # rows other ranks routed to its experts (combine forward, dispatch backward).
            # From the split sizes already on the host: no extra device sync on the hot path.
            me = dist.get_rank(self.ep_group)
            leaving = sum(send_splits) - send_splits[me]
            arriving = sum(recv_splits) - recv_splits[me]
            self.meter.min_bytes += 2 * (leaving + arriving) * x_TD.shape[1] * x_TD.element_size()
        recv_MD = all_to_all_rows(rows_ND, send_splits, recv_splits, self.ep_group, self.meter, "dispatch")
        expert_major_MD = self.ops.sort_chunks(recv_MD, recv_counts_Re)
        meta = DispatchMeta(
            row_map_N=row_map_N,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_counts_Re=recv_counts_Re,
            tokens_per_expert_e=recv_counts_Re.sum(0),
        )
        return expert_major_MD, meta

    def combine(self, y_MD: torch.Tensor, topk_weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        rank_major_MD = self.ops.sort_chunks(y_MD, meta.recv_counts_Re.t())
        back_ND = all_to_all_rows(
            rank_major_MD, meta.recv_splits, meta.send_splits, self.ep_group, self.meter, "combine"
        )
        return self.ops.unpermute(back_ND, meta.row_map_N, topk_weights_TK)
