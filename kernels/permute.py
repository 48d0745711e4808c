"""Permute: order the (token, k) pairs by destination expert and gather their rows.

Shapes: x_TD [T, D], topk_ids_TK [T, K] (id -1 marks a dropped pair) ->
rows_ND [N, D] expert-major, row_map_N [N] (flat pair index t*K + k of each
row), counts_E [E] (rows per expert). The sort is stable: within an expert,
rows keep token order, so every backend and every layout agrees on the order.
"""
from __future__ import annotations

import torch


def permute(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int):
    flat_ids = topk_ids_TK.flatten()
    kept = flat_ids >= 0
    # Dropped pairs sort last (key E) and are cut off.
    key = torch.where(kept, flat_ids, torch.full_like(flat_ids, num_experts))
    order = torch.sort(key, stable=True).indices
    counts_E = torch.bincount(flat_ids[kept], minlength=num_experts)
    n_kept = int(kept.sum())
    row_map_N = order[:n_kept]
    K = topk_ids_TK.shape[1] if topk_ids_TK.dim() == 2 else 1
    rows_ND = x_TD.index_select(0, torch.div(row_map_N, K, rounding_mode="floor"))
    return rows_ND, row_map_N, counts_E
