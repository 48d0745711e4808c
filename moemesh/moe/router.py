"""Top-k softmax router and its losses.

Shape letters: T tokens, D model dim, E experts, K top-k.

Load-balance statistics (scope "global", the default) are reduced over the data
group (dp x ep), so the aux loss is the one single-process training would see on
the same global batch, for every layout. Each rank computes a local surrogate
whose mean over the data group equals the global loss and whose gradient is the
global gradient; no autograd collective is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moemesh.fields import ScoreFunc
from moemesh.kernels import TORCH_OPS, GatingOutput, KernelOps, balance_scores
from moemesh.parallel.comm import all_reduced, group_size


@dataclass(frozen=True)
class RouterLosses:
    aux_loss: torch.Tensor  # Switch/GShard: E * sum_i f_i P_i (this rank's surrogate)
    z_loss: torch.Tensor  # mean_t logsumexp(logits_t)^2
    global_counts_E: torch.Tensor  # routed pairs per expert over the scope (detached)
    seq_aux_loss: torch.Tensor | None = None  # sequence-level balance loss (surrogate), if enabled


class Router(nn.Module):
    """Logits -> fused gating. With ``bias_update_rate`` > 0 it keeps an expert bias that
    shifts the selection only (aux-loss-free balancing, DeepSeek-V3): after each step,
    ``update_bias`` moves each expert's bias by the rate toward the mean load. ``n_groups`` /
    ``topk_groups``: group-limited routing (a token picks from its best groups of experts);
    ``limit_groups`` sets groups from the layout (EP ranks or nodes); ``scale`` multiplies the
    weights (the routed scaling factor)."""

    expert_bias_E: torch.Tensor | None  # a buffer; None unless bias_update_rate > 0

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        score_func: str = "softmax",
        bias_update_rate: float = 0.0,
        n_groups: int = 1,
        topk_groups: int | None = None,
        scale: float = 1.0,
    ):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.n_groups, self.topk_groups, self.scale = n_groups, topk_groups or n_groups, scale
        self.score_func = score_func
        self.ops: KernelOps = TORCH_OPS  # the gating kernel (trainer.parallelize.apply_kernels)
        self.weight_ED = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias_E", torch.zeros(num_experts) if bias_update_rate > 0 else None)

    def forward(self, x_TD: torch.Tensor) -> tuple[GatingOutput, torch.Tensor]:
        """The gating and the logits [T, E] (fp32)."""
        # Routing in fp32 even under autocast (which would cast F.linear to bf16):
        # top-k on bf16 logits flips near-ties.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight_ED.float())
        gate = self.ops.gating(
            logits_TE,
            top_k=self.top_k,
            renormalize=self.renormalize,
            score_func=self.score_func,
            expert_bias_E=self.expert_bias_E,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            scale=self.scale,
        )
        return gate, logits_TE

    def limit_groups(self, n_groups: int, topk_groups: int) -> None:
        """Route each token to experts in at most ``topk_groups`` of ``n_groups`` runs of experts
        (the EP ranks' or the nodes': ``trainer.parallelize.apply_routing_limit``)."""
        self.n_groups, self.topk_groups = n_groups, topk_groups

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """Sign update toward the mean load: underloaded experts up, overloaded down."""
        if self.expert_bias_E is None:
            return
        counts = global_counts_E.to(self.expert_bias_E)
        self.expert_bias_E += self.bias_update_rate * torch.sign(counts.mean() - counts)


@torch.no_grad()
def entropy_sum(logits_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the router distribution's entropy (softmax of the logits), in nats."""
    logp = torch.log_softmax(logits_TE.float(), dim=-1)
    return -(logp.exp() * logp).sum()


def sequence_aux_loss(logits_TE, topk_ids_TK, seq_T, *, num_seqs: int, seq_len: int, score_func: str, tp_group):
    """DeepSeek-V3's sequence-wise balance loss, mean over sequences of sum_i f_i P_i with
    f_i = E/(K*S) * (pairs of the sequence routed to i), P_i = mean over the sequence of the
    normalised score. ``seq_T`` maps each local token to its sequence. When TP peers hold
    parts of a sequence, the counts are summed over tp and each peer's P covers its own
    tokens (over the full length S), so the peers' losses sum to the exact loss.
    """
    T, E = logits_TE.shape
    K = topk_ids_TK.shape[1]
    scores = torch.softmax(logits_TE, -1) if score_func == ScoreFunc.softmax else torch.sigmoid(logits_TE)
    scores = balance_scores(scores, score_func)
    counts_BE = torch.zeros(num_seqs, E, device=logits_TE.device)
    counts_BE.index_put_(
        (seq_T[:, None].expand(T, K), topk_ids_TK), torch.ones(T, K, device=logits_TE.device), accumulate=True
    )
    counts_BE = all_reduced(counts_BE, tp_group)
    f_BE = counts_BE * E / (K * seq_len)
    p_BE = torch.zeros(num_seqs, E, device=logits_TE.device).index_add(0, seq_T, scores) / seq_len
    return (f_BE * p_BE).sum() / num_seqs


def router_losses(gate: GatingOutput, *, stats_group, scale: float = 1.0) -> RouterLosses:
    """Aux and z losses; ``stats_group`` is the data group (global scope) or None (local).

    ``scale`` multiplies both losses: 1/tp when TP peers route disjoint token slices.
    """
    T, K = gate.topk_ids_TK.shape
    E = gate.counts_E.shape[0]
    counts_E = all_reduced(gate.counts_E.detach(), stats_group)
    n = group_size(stats_group)
    # f_i: fraction of all routed pairs in the scope; P_i: this rank's mean score.
    # Every rank holds the same number of tokens, so mean over ranks of P_local = P_global.
    f_E = counts_E.float() / max(T * K * n, 1)
    p_E = gate.score_sum_E / max(T, 1)
    aux = E * torch.sum(f_E * p_E)
    z = torch.mean(gate.lse_T**2) if T else gate.lse_T.sum()
    return RouterLosses(aux_loss=aux * scale, z_loss=z * scale, global_counts_E=counts_E)
