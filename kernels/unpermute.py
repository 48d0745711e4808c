"""Unpermute: bring expert outputs back to token order, weighted sum over top-k.

Shapes: rows_ND [N, D], row_map_N [N] (flat pair index t*K + k),
topk_weights_TK [T, K] -> out_TD [T, D]. Differentiable in rows and weights.
Dropped pairs have no row and contribute nothing.
"""
from __future__ import annotations

import torch


def unpermute(rows_ND: torch.Tensor, row_map_N: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    T, K = topk_weights_TK.shape
    D = rows_ND.shape[1]
    w_N = topk_weights_TK.reshape(-1).index_select(0, row_map_N).to(rows_ND.dtype)
    weighted_ND = rows_ND * w_N.unsqueeze(1)
    token_N = torch.div(row_map_N, K, rounding_mode="floor")
    out_TD = rows_ND.new_zeros(T, D)
    return out_TD.index_add(0, token_N, weighted_ND)
