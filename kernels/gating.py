"""Gating: router logits -> top-k experts and weights, plus load-balance statistics.

Shapes: logits_TE [T, E] -> topk_ids_TK, topk_weights_TK [T, K]; counts_E and
prob_sum_E [E]; lse_T [T].

Tie-breaking: among equal selection scores the lower expert id wins. The
reference gets this from a stable descending sort; any other backend must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GatingOutput:
    topk_ids_TK: torch.Tensor  # int64, expert ids in selection order
    topk_weights_TK: torch.Tensor  # float32, gate weights (renormalised if asked)
    probs_TE: torch.Tensor  # float32 softmax over experts
    counts_E: torch.Tensor  # int64, (token, k) pairs routed to each expert
    prob_sum_E: torch.Tensor  # float32, sum over tokens of probs_TE (for the aux loss)
    lse_T: torch.Tensor  # float32 logsumexp of the logits (for the z-loss)


def fused_gating(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    expert_bias_E: torch.Tensor | None = None,
) -> GatingOutput:
    """Softmax top-k gating (torch reference).

    ``expert_bias_E`` shifts the selection scores only; weights come from the
    unbiased probabilities (aux-loss-free balancing).
    """
    T, E = logits_TE.shape
    logits_TE = logits_TE.float()
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    probs_TE = torch.exp(logits_TE - lse_T.unsqueeze(-1))
    select_TE = probs_TE if expert_bias_E is None else probs_TE + expert_bias_E.float()
    # Stable descending sort: ties keep ascending expert id, so the lower id wins.
    order_TE = torch.sort(select_TE.detach(), dim=-1, descending=True, stable=True).indices
    topk_ids_TK = order_TE[:, :top_k]
    topk_weights_TK = probs_TE.gather(1, topk_ids_TK)
    if renormalize:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    counts_E = torch.bincount(topk_ids_TK.flatten(), minlength=E)
    return GatingOutput(
        topk_ids_TK=topk_ids_TK,
        topk_weights_TK=topk_weights_TK,
        probs_TE=probs_TE,
        counts_E=counts_E,
        prob_sum_E=probs_TE.sum(dim=0),
        lse_T=lse_T,
    )
