"""The MoE layer: gate -> dispatch -> experts -> combine (+ shared expert).

Shape letters: B batch, S sequence, T = B*S tokens, D model dim, E experts,
K top-k, e local experts.

The layer's weighted balance losses (aux, z, sequence-level) ride on its output
(``attach_loss``): whatever backpropagates through the layer also backpropagates
them, on every path (plain, gradient accumulation, pipeline stages). ``MoEStats``
keeps their unweighted values, detached, for the metrics.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moemesh.fields import SharedExpertOverlap
from moemesh.kernels import KernelOps
from moemesh.moe.config import ModelConfig
from moemesh.moe.dispatcher import AllToAllDispatcher
from moemesh.moe.experts import GroupedExperts
from moemesh.moe.overlap import overlapped_moe
from moemesh.moe.rank_dispatch import routed_by_rank
from moemesh.moe.router import Router, RouterLosses, entropy_sum, router_losses, sequence_aux_loss
from moemesh.parallel.comm import group_size
from moemesh.parallel.tp import (
    GRAD_GROUP,
    ColumnParallelLinear,
    RowParallelLinear,
    column_parallel,
    gather_tokens_from_tp,
    reduce_with_rows,
    split_and_copy_to_tp,
    split_tokens_to_tp,
    token_sequences,
)


@dataclass(frozen=True)
class MoEStats:
    """What one MoE layer reports for one forward (all detached but the losses)."""

    losses: RouterLosses  # unweighted, detached: the weighted ones are attached to the output
    dropped: torch.Tensor  # (token, k) pairs dropped by capacity on this rank
    counts_E: torch.Tensor  # (token, k) pairs routed to each expert from this rank, before drops
    entropy_sum: torch.Tensor  # sum over this rank's tokens of the router entropy (nats)
    score_sum_E: torch.Tensor  # sum of router scores per expert on this rank
    fanout_K1: torch.Tensor | None = None  # tokens by the EP ranks their kept pairs reach (0..K)


class _AttachLoss(torch.autograd.Function):
    """Forward: x unchanged. Backward: also send gradient ``scale`` into ``loss``, as if
    ``scale * loss`` were added to the loss being backpropagated."""

    @staticmethod
    def forward(ctx, x, loss, scale: float):
        ctx.loss_shape, ctx.loss_dtype, ctx.scale = loss.shape, loss.dtype, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full(ctx.loss_shape, ctx.scale, dtype=ctx.loss_dtype, device=g.device), None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x``, carrying ``loss`` into the backward pass (a no-op when ``loss`` needs no gradient)."""
    return _AttachLoss.apply(x, loss, scale) if loss.requires_grad else x


def weighted_balance_loss(cfg: ModelConfig, losses: RouterLosses) -> torch.Tensor:
    """What one MoE layer adds to the training loss: its weighted aux, z and sequence-level losses."""
    total = cfg.aux_loss_factor * losses.aux_loss + cfg.z_loss_factor * losses.z_loss
    if losses.seq_aux_loss is not None:
        total = total + cfg.seq_aux_loss_factor * losses.seq_aux_loss
    return total


def _detached(losses: RouterLosses) -> RouterLosses:
    seq = losses.seq_aux_loss.detach() if losses.seq_aux_loss is not None else None
    return dataclasses.replace(
        losses, aux_loss=losses.aux_loss.detach(), z_loss=losses.z_loss.detach(), seq_aux_loss=seq
    )


def routed_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the routed rows travel and meet the experts in.

    Autocast does not cover the dispatcher or ``_grouped_mm``: under autocast the rows
    move in the autocast dtype (half the All-to-All bytes, bf16 expert GEMMs).
    """
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def drop_over_capacity(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, cfg: ModelConfig):
    """Capacity mode: (ids with the dropped pairs at -1, number dropped); dropless returns the ids as they are."""
    if cfg.capacity_factor is None:
        return topk_ids_TK, torch.zeros((), dtype=torch.int64, device=topk_ids_TK.device)
    T, K, E = topk_ids_TK.shape[0], topk_ids_TK.shape[1], cfg.num_experts
    if cfg.capacity_factor * K >= E:  # a capacity of T or more: nothing can drop (and 1e308 * T * K overflows)
        return topk_ids_TK, torch.zeros((), dtype=torch.int64, device=topk_ids_TK.device)
    return capacity_drop(topk_ids_TK, topk_weights_TK, E, math.ceil(cfg.capacity_factor * T * K / E))


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
    """Dense SwiGLU, built whole; ``shard`` makes w1/w3 column-parallel and w2 row-parallel."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(hidden_size, ffn_size)
        self.w3 = ColumnParallelLinear(hidden_size, ffn_size)
        self.w2 = RowParallelLinear(ffn_size, hidden_size)
        self.tp_group, self.sp = None, False

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        if group_size(tp_group) == 1:
            return
        for linear in (self.w1, self.w3, self.w2):
            linear.shard(tp_group, sequence_parallel=sequence_parallel)
        self.tp_group, self.sp = tp_group, sequence_parallel

    def forward(self, x, *, read: bool = True, reduce: bool = True):
        """``read=False``: ``x`` is already the column-parallel products' input (``read_input``);
        ``reduce=False``: this rank's partial output, unreduced over tp. The MoE layer uses both to
        move its input's and output's shares in one collective each with its routed rows'."""
        assert read or not self.sp, "under SP the products read the gathered sequence (read=True)"
        h1, h3 = column_parallel(x, self.w1, self.w3, read=read)  # one input collective for both
        return self.w2(F.silu(h1) * h3, reduce=reduce)


class MoELayer(nn.Module):
    """Routed experts (+ an optional shared expert) for one transformer layer.

    Built as one process holds it: every expert, no process group, the torch kernels. Where
    the experts live (EP), which TP peers share the tokens, the group the balance statistics
    are reduced over and the kernels are applied from outside (``trainer.parallelize``)
    through the methods below; the forward reads the same either way.
    """

    def __init__(self, *, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Where the load-balance statistics f_i are reduced: the data x tp group for the
        # "global" scope (set by apply_load_balance_group), None: this rank's tokens only.
        self.stats_group = None
        self.tp_group, self.sp, self.tp = None, False, 1
        self.overlap_chunks = 0  # All-to-All overlap: chunks pipelined with the experts; 0: off
        self.shared_overlap = SharedExpertOverlap.combine  # with it on, the exchange the shared expert hides
        self.by_rank = False  # dispatch once per (token, EP rank): limit_routing
        self.router = Router(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            renormalize=cfg.renormalize,
            score_func=cfg.score_func,
            bias_update_rate=cfg.expert_bias_update_rate,
            n_groups=cfg.router_groups,
            topk_groups=cfg.router_topk_groups,
            scale=cfg.routed_scaling_factor,
        )
        self.dispatcher = AllToAllDispatcher(num_experts=cfg.num_experts)
        self.experts = GroupedExperts(
            num_experts=cfg.num_experts, hidden_size=cfg.hidden_size, ffn_size=cfg.moe_ffn_hidden_size
        )
        self.shared = SwiGLU(cfg.hidden_size, cfg.shared_expert_ffn_size) if cfg.shared_expert_ffn_size else None
        # Qwen2-MoE's gate: the shared expert's output times sigmoid(x . w), w [1, D].
        self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        # TP peers route different token slices, so these gradients are partial over tp.
        setattr(self.router.weight_ED, GRAD_GROUP, "data_tp")

    def shard_experts(
        self,
        ep_group,
        *,
        overlap_chunks: int = 0,
        shared_overlap: SharedExpertOverlap = SharedExpertOverlap.combine,
    ) -> None:
        """Expert parallelism: keep this EP rank's experts; route over ``ep_group``; with
        ``overlap_chunks`` > 0 pipeline the All-to-All with the experts in that many chunks, and
        run the shared expert while the exchange ``shared_overlap`` names is in flight."""
        n = group_size(ep_group)
        if n == 1:
            return
        self.experts.shard(dist.get_rank(ep_group), n)
        self.dispatcher.set_group(ep_group)
        self.overlap_chunks = overlap_chunks
        self.shared_overlap = SharedExpertOverlap(shared_overlap)

    def limit_routing(self, n_groups: int, topk_groups: int, *, by_rank: bool) -> None:
        """Layout-keyed routing limit: each token's experts in at most ``topk_groups`` of
        ``n_groups`` runs of experts (an EP rank's or a node's). ``by_rank``: send each token once
        per EP rank it reaches (moe/rank_dispatch.py), so the cap cuts the All-to-All's bytes."""
        self.router.limit_groups(n_groups, topk_groups)
        self.by_rank = by_rank

    def shard_tokens(self, tp_group, *, sequence_parallel: bool = False) -> None:
        """Tensor parallelism: TP peers route disjoint token slices (or, with sequence
        parallelism, their own sequence shards); the shared expert is TP-sharded."""
        t = group_size(tp_group)
        if t == 1:
            return
        self.tp_group, self.sp, self.tp = tp_group, sequence_parallel, t
        if self.shared is not None:
            self.shared.shard(tp_group, sequence_parallel=sequence_parallel)
        if self.shared_gate is not None:
            # Its gradient is partial over tp: under SP each TP rank gates its own sequence shard;
            # without it each scales its own partial shared output before the sum (``forward``).
            setattr(self.shared_gate.weight, GRAD_GROUP, "data_tp")

    def set_kernels(self, ops: KernelOps, *, use_grouped_mm: bool | None = None) -> None:
        """The token-path kernels (gating, permute, chunk sort, unpermute), the experts' SwiGLU and
        their GEMMs (``GroupedExperts.use_grouped_mm``; None: by device)."""
        self.router.ops = self.dispatcher.ops = self.experts.ops = ops
        self.experts.use_grouped_mm = use_grouped_mm

    def forward(self, x_BSD: torch.Tensor, *, loss_scale: float = 1.0) -> tuple[torch.Tensor, MoEStats]:
        """``loss_scale``: the factor the caller's backward applies to the loss (1/accum
        with gradient accumulation); the attached balance losses get the same factor."""
        B, S, D = x_BSD.shape
        # Under TP without SP a shared expert's input and output move in one collective each with
        # the routed rows': its input gradient's all-reduce carries the rows' gradients, its output
        # all-reduce the rows' outputs (a gate, the same on every TP rank, scales each rank's
        # partial output before the sum; its own gradient is then partial, summed with data_tp's).
        fused = self.shared is not None and self.tp > 1 and not self.sp
        if fused:
            x_TD, read_BSD = split_and_copy_to_tp(x_BSD.reshape(B * S, D), self.tp_group)
            read_BSD = read_BSD.view(B, S, D)
        else:
            x_TD = split_tokens_to_tp(x_BSD.reshape(B * S, D), self.tp_group, sequence_parallel=self.sp)
            read_BSD = None
        gate, logits_TE = self.router(x_TD)  # 1. gate
        losses = self._balance_losses(gate, logits_TE, num_seqs=B, seq_len=S)
        topk_ids_TK, dropped = drop_over_capacity(gate.topk_ids_TK, gate.topk_weights_TK, self.cfg)
        shared = (lambda: self._shared(x_BSD, read_BSD).reshape(-1, D)) if self.shared is not None else None
        # 2.-6. dispatch -> experts -> combine
        out_TD, shared_TD = self._routed(x_TD, topk_ids_TK, gate.topk_weights_TK, shared)
        if shared is not None and shared_TD is None:
            shared_TD = shared()
        # The routed rows' outputs travel in their own dtype (under autocast the autocast dtype, which
        # their values already are: half an fp32 gather's bytes) and meet the residual's after.
        if fused:  # the sum over tp in the compute dtype, as a row-parallel output's
            out_TD = reduce_with_rows(shared_TD, out_TD, self.tp_group).to(x_BSD.dtype)
        else:
            out_TD = gather_tokens_from_tp(out_TD, self.tp_group, sequence_parallel=self.sp).to(x_BSD.dtype)
            if shared_TD is not None:
                out_TD = out_TD + shared_TD
        out_BSD = attach_loss(out_TD.view(B, S, D), weighted_balance_loss(self.cfg, losses), loss_scale)
        stats = MoEStats(
            losses=_detached(losses),
            dropped=dropped,
            counts_E=gate.counts_E.detach(),
            score_sum_E=gate.score_sum_E.detach(),
            entropy_sum=entropy_sum(logits_TE),
            fanout_K1=self.dispatcher.fanout(topk_ids_TK),
        )
        return out_BSD, stats

    def _shared(self, x_BSD: torch.Tensor, read_BSD: torch.Tensor | None = None) -> torch.Tensor:
        """The shared expert's output, gated if the layer has a gate. ``read_BSD``: its input as
        the column-parallel products and the gate read it (``split_and_copy_to_tp``, whose
        backward sums their partial gradients); the output is then this TP rank's partial,
        unreduced (``reduce_with_rows`` sums it)."""
        assert self.shared is not None
        fused = read_BSD is not None
        x_BSD = x_BSD if read_BSD is None else read_BSD
        y_BSD = self.shared(x_BSD, read=not fused, reduce=not fused)
        if self.shared_gate is not None:
            # Called as a module: with TP under sharding it is an FSDP unit over data_tp, gathered
            # by the call's hooks.
            y_BSD = torch.sigmoid(self.shared_gate(x_BSD)) * y_BSD
        return y_BSD

    # Eager under torch.compile (trainer.compile=model): its row counts change every step with the
    # routing, and its All-to-All needs host-side split sizes; the graph breaks around it.
    @torch.compiler.disable
    def _routed(self, x_TD, topk_ids_TK, topk_weights_TK, shared):
        """Dispatch -> experts -> combine, the output in the routed rows' dtype (``routed_dtype``).
        With overlap the shared expert runs while an exchange is in flight (``shared_overlap``):
        returns (out_TD, shared_TD or None)."""
        rows_TD = x_TD.to(routed_dtype(x_TD))
        if self.by_rank and self.dispatcher.ep_size > 1 and not self.overlap_chunks:
            out_TD = routed_by_rank(self.dispatcher, rows_TD, topk_ids_TK, topk_weights_TK, self.experts)
            return out_TD, None
        if self.overlap_chunks:
            out_TD, shared_TD = overlapped_moe(
                self.dispatcher,
                rows_TD,
                topk_ids_TK,
                topk_weights_TK,
                self.experts,
                chunks=self.overlap_chunks,
                shared=shared,
                shared_at=self.shared_overlap,
            )
            return out_TD, shared_TD
        rows_MD, meta = self.dispatcher.dispatch(rows_TD, topk_ids_TK)
        y_MD = self.experts(rows_MD, meta.tokens_per_expert_e)
        return self.dispatcher.combine(y_MD, topk_weights_TK, meta), None

    def _balance_losses(self, gate, logits_TE, *, num_seqs: int, seq_len: int) -> RouterLosses:
        # Each TP rank's losses cover 1/tp of the tokens: scale so their sum over tp is the mean.
        losses = router_losses(gate, stats_group=self.stats_group, scale=1.0 / self.tp)
        if self.cfg.seq_aux_loss_factor <= 0:
            return losses
        seq_T, full_len = token_sequences(
            logits_TE.shape[0], seq_len, self.tp_group, sequence_parallel=self.sp, device=logits_TE.device
        )
        seq_aux = sequence_aux_loss(
            logits_TE,
            gate.topk_ids_TK,
            seq_T,
            num_seqs=num_seqs,
            seq_len=full_len,
            score_func=self.cfg.score_func,
            tp_group=self.tp_group if self.tp > 1 else None,
        )
        return dataclasses.replace(losses, seq_aux_loss=seq_aux)
