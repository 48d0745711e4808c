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

from kernels import TORCH_OPS, GatingOutput, KernelOps
from parallel.comm import all_reduce_, group_size


@dataclass(frozen=True)
class RouterLosses:
    aux_loss: torch.Tensor  # Switch/GShard: E * sum_i f_i P_i (this rank's surrogate)
    z_loss: torch.Tensor  # mean_t logsumexp(logits_t)^2
    global_counts_E: torch.Tensor  # routed pairs per expert over the scope (detached)


class Router(nn.Module):
    def __init__(self, *, hidden_size: int, num_experts: int, top_k: int, renormalize: bool,
                 score_func: str = "softmax", ops: KernelOps = TORCH_OPS):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.score_func, self.ops = score_func, ops
        self.weight_ED = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x_TD: torch.Tensor) -> GatingOutput:
        # Routing in fp32 even under autocast (which would cast F.linear to bf16):
        # top-k on bf16 logits flips near-ties.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight_ED.float())
        return self.ops.gating(logits_TE, top_k=self.top_k, renormalize=self.renormalize, score_func=self.score_func)


def router_losses(gate: GatingOutput, *, stats_group, scale: float = 1.0) -> RouterLosses:
    """Aux and z losses; ``stats_group`` is the data group (global scope) or None (local).

    ``scale`` multiplies both losses: 1/tp when TP peers route disjoint token slices.
    """
    T, K = gate.topk_ids_TK.shape
    E = gate.counts_E.shape[0]
    counts_E = gate.counts_E.detach().clone()
    n = group_size(stats_group)
    all_reduce_(counts_E, stats_group)
    # f_i: fraction of all routed pairs in the scope; P_i: this rank's mean score.
    # Every rank holds the same number of tokens, so mean over ranks of P_local = P_global.
    f_E = counts_E.float() / max(T * K * n, 1)
    p_E = gate.score_sum_E / max(T, 1)
    aux = E * torch.sum(f_E * p_E)
    z = torch.mean(gate.lse_T**2) if T else gate.lse_T.sum()
    return RouterLosses(aux_loss=aux * scale, z_loss=z * scale, global_counts_E=counts_E)
