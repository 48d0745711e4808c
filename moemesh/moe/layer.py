"""The MoE layer: router -> dispatcher -> experts -> dispatcher^-1 (+ shared expert).

Shape letters: B batch, S sequence, T = B*S tokens, D model dim, E experts,
K top-k, e local experts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moemesh.kernels import TORCH_OPS, KernelOps
from moemesh.moe.config import ModelConfig
from moemesh.moe.dispatcher import AllToAllDispatcher
from moemesh.moe.experts import GroupedExperts
from moemesh.moe.overlap import overlapped_moe
from moemesh.moe.router import Router, RouterLosses, entropy_sum, router_losses, sequence_aux_loss
from moemesh.parallel.comm import CommMeter, group_size
from moemesh.parallel.tp import (
    GRAD_GROUP,
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp,
    gather_from_tp,
    split_to_tp,
)


@dataclass(frozen=True)
class MoEStats:
    """What one MoE layer reports for one forward (all detached but the losses)."""

    losses: RouterLosses
    dropped: torch.Tensor  # (token, k) pairs dropped by capacity on this rank
    routed: int  # (token, k) pairs routed on this rank (T*K)
    counts_E: torch.Tensor  # (token, k) pairs routed to each expert from this rank, before drops
    entropy_sum: torch.Tensor  # sum over this rank's tokens of the router entropy (nats)
    score_sum_E: torch.Tensor  # sum of router scores per expert on this rank


def capacity_drop(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, num_experts: int, capacity: int):
    """Mark as dropped (-1) each expert's lowest-weight pairs beyond ``capacity``.

    Ties keep the earlier (token, k) pair. Returns the new ids and the drop count.
    """
    flat_ids = topk_ids_TK.reshape(-1)
    flat_w = topk_weights_TK.detach().reshape(-1)
    by_weight = torch.sort(flat_w, descending=True, stable=True).indices
    order = by_weight[torch.sort(flat_ids[by_weight], stable=True).indices]  # by expert, then weight
    counts_E = torch.bincount(flat_ids, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.empty_like(flat_ids)
    rank_in_expert[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts_E[flat_ids[order]]
    keep = rank_in_expert < capacity
    ids = torch.where(keep, flat_ids, torch.full_like(flat_ids, -1)).view_as(topk_ids_TK)
    return ids, (~keep).sum()


class SwiGLU(nn.Module):
    """Dense SwiGLU; with TP, w1/w3 are column-parallel and w2 row-parallel."""

    def __init__(self, hidden_size: int, ffn_size: int, *, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        tp = dict(tp_group=tp_group, sequence_parallel=sequence_parallel)
        self.w1 = ColumnParallelLinear(hidden_size, ffn_size, **tp)
        self.w3 = ColumnParallelLinear(hidden_size, ffn_size, **tp)
        self.w2 = RowParallelLinear(ffn_size, hidden_size, **tp)
        self.tp_group, self.sp = tp_group, sequence_parallel

    def forward(self, x):
        if self.sp or group_size(self.tp_group) == 1:
            h1, h3 = self.w1(x), self.w3(x)
        else:  # one all-reduce in backward for both projections of the replicated input
            x = copy_to_tp(x, self.tp_group)
            h1, h3 = F.linear(x, self.w1.weight), F.linear(x, self.w3.weight)
        return self.w2(F.silu(h1) * h3)


class MoELayer(nn.Module):
    def __init__(
        self,
        *,
        cfg: ModelConfig,
        ep_rank: int,
        ep_group,
        stats_group,
        use_grouped_mm: bool = True,
        ops: KernelOps = TORCH_OPS,
        tp_group=None,
        sequence_parallel: bool = False,
        meter: CommMeter | None = None,
        overlap_chunks: int = 0,
    ):
        super().__init__()
        ep_size = group_size(ep_group)
        e = cfg.num_experts // ep_size
        self.cfg = cfg
        self.stats_group = stats_group
        self.tp_group, self.sp = tp_group, sequence_parallel
        self.tp = group_size(tp_group)
        self.overlap_chunks = overlap_chunks if ep_size > 1 else 0  # 0: no overlap
        self.router = Router(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            renormalize=cfg.renormalize,
            score_func=cfg.score_func,
            ops=ops,
            bias_update_rate=cfg.expert_bias_update_rate,
        )
        self.dispatcher = AllToAllDispatcher(num_experts=cfg.num_experts, ep_group=ep_group, ops=ops, meter=meter)
        self.experts = GroupedExperts(
            num_local_experts=e,
            first_expert_id=ep_rank * e,
            hidden_size=cfg.hidden_size,
            ffn_size=cfg.moe_ffn_hidden_size,
            use_grouped_mm=use_grouped_mm,
        )
        self.shared = (
            SwiGLU(cfg.hidden_size, cfg.shared_expert_ffn_size, tp_group=tp_group, sequence_parallel=sequence_parallel)
            if cfg.shared_expert_ffn_size
            else None
        )
        # TP peers route different token slices, so these gradients are partial over tp.
        setattr(self.router.weight_ED, GRAD_GROUP, "data_tp")

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_all_TD = x_BSD.reshape(B * S, D)
        # With TP (no SP) the input is replicated over tp: each TP rank routes its own
        # 1/tp of the tokens, so no token crosses the All-to-All twice. With SP the
        # input is already this rank's sequence shard.
        tp_split = self.tp > 1 and not self.sp
        x_TD = split_to_tp(x_all_TD, self.tp_group, 0) if tp_split else x_all_TD
        gate, logits_TE = self.router(x_TD)
        # Each TP rank's losses cover 1/tp of the tokens: scale so their sum over tp is the mean.
        losses = router_losses(gate, stats_group=self.stats_group, scale=1.0 / self.tp)
        if self.cfg.seq_aux_loss_factor > 0:
            T = x_TD.shape[0]
            first = dist.get_rank(self.tp_group) * T if tp_split else 0
            full_len = S * self.tp if self.sp else S  # with SP each rank holds S/tp of every sequence
            seq_T = torch.div(torch.arange(first, first + T, device=x_TD.device), S, rounding_mode="floor")
            seq_aux = sequence_aux_loss(
                logits_TE,
                gate.topk_ids_TK,
                seq_T,
                num_seqs=B,
                seq_len=full_len,
                score_func=self.cfg.score_func,
                tp_group=self.tp_group if self.tp > 1 else None,
            )
            losses = dataclasses.replace(losses, seq_aux_loss=seq_aux)
        topk_ids_TK = gate.topk_ids_TK
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        if self.cfg.capacity_factor is not None:
            T, K, E = topk_ids_TK.shape[0], topk_ids_TK.shape[1], self.cfg.num_experts
            capacity = math.ceil(self.cfg.capacity_factor * T * K / E)
            topk_ids_TK, dropped = capacity_drop(topk_ids_TK, gate.topk_weights_TK, E, capacity)
        # Autocast does not cover the dispatcher or _grouped_mm: move the routed rows in
        # the autocast dtype ourselves (half the All-to-All bytes, bf16 expert GEMMs).
        dev = x_TD.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_TD.dtype
        shared_out = None
        if self.overlap_chunks:
            shared_fn = (lambda: self.shared(x_BSD).reshape(-1, D)) if self.shared is not None else None
            out_TD, shared_out = overlapped_moe(
                self.dispatcher,
                x_TD.to(compute_dtype),
                topk_ids_TK,
                gate.topk_weights_TK,
                self.experts,
                chunks=self.overlap_chunks,
                shared=shared_fn,
            )
            out_TD = out_TD.to(x_TD.dtype)
        else:
            rows_MD, meta = self.dispatcher.dispatch(x_TD.to(compute_dtype), topk_ids_TK)
            y_MD = self.experts(rows_MD, meta.tokens_per_expert_e)
            out_TD = self.dispatcher.combine(y_MD, gate.topk_weights_TK, meta).to(x_TD.dtype)
        if tp_split:
            out_TD = gather_from_tp(out_TD, self.tp_group, 0)
        if self.shared is not None:
            out_TD = out_TD + (shared_out if shared_out is not None else self.shared(x_BSD).reshape(-1, D))
        stats = MoEStats(
            losses=losses,
            dropped=dropped,
            routed=topk_ids_TK.numel(),
            counts_E=gate.counts_E.detach(),
            score_sum_E=gate.score_sum_E.detach(),
            entropy_sum=entropy_sum(logits_TE),
        )
        return out_TD.view(B, S, D), stats
