"""Dispatch by EP rank: each token goes once to each EP rank its experts live on (DeepEP's way),
so capping the EP ranks a token reaches (``model.max_ranks_per_token``, ``max_nodes_per_token``)
caps the All-to-All's bytes, not only its fan-out.

Shape letters: T tokens, D model dim, K top-k, R EP ranks, e local experts per rank, U (token,
rank) pairs this rank sends, M rows it receives, P (row, local expert) pairs it computes.

dispatch: the unique (token, rank) pairs, rank-major -> exchange counts [R] -> All-to-All of the
rows x[t], of each row's K local expert ids (-1: an expert elsewhere or a dropped pair) and of its
K weights (0 there) -> expand each received row to its local experts, expert-major -> experts.
combine: each received row's weighted sum over its local experts (the weights travel with the
token, as DeepEP's) -> All-to-All back, one row per (token, rank) -> each token's sum over its ranks.

Per token this sends (ranks reached - own) x (D + 2 K) values each way, where the pair-by-pair
dispatcher sends (remote pairs) x D: with K experts on M ranks, about M / K of its bytes. Same
math as the pair-by-pair path: every (token, expert) pair meets the same expert weights and
weight; only the order of the additions into a token's output changes (by rank), which agrees to
fp32 rounding. Every exchange is a ``comm`` collective, replayed under activation checkpointing.
"""

from __future__ import annotations

import torch

from moemesh.parallel.comm import all_to_all_rows


def _pairs(topk_ids_TK: torch.Tensor, e: int, R: int):
    """The unique (token, rank) pairs, rank-major: (tokens [U], ranks [U], rows sent to each rank [R])."""
    T = topk_ids_TK.shape[0]
    rank_TK = torch.where(topk_ids_TK >= 0, torch.div(topk_ids_TK, e, rounding_mode="floor"), R)
    reach_TR1 = torch.zeros(T, R + 1, dtype=torch.bool, device=topk_ids_TK.device)
    reach_TR1.scatter_(1, rank_TK, True)
    reach_RT = reach_TR1[:, :R].t()
    rank_U, token_U = reach_RT.nonzero(as_tuple=True)  # sorted by rank, then token
    return token_U, rank_U, reach_RT.sum(1)


def routed_by_rank(dispatcher, x_TD, topk_ids_TK, topk_weights_TK, experts) -> torch.Tensor:
    """The routed experts' output for every token [T, D], each token sent once per EP rank."""
    d = dispatcher
    T, D = x_TD.shape
    R, e = d.ep_size, d.num_local_experts
    token_U, rank_U, send_R = _pairs(topk_ids_TK, e, R)
    # Each sent row's K slots: the local expert on its rank (-1 elsewhere) and the weight (0 there).
    ids_UK = topk_ids_TK[token_U]
    here_UK = (ids_UK >= 0) & (torch.div(ids_UK, e, rounding_mode="floor") == rank_U[:, None])
    local_UK = torch.where(here_UK, ids_UK - rank_U[:, None] * e, -1)
    weights_UK = torch.where(here_UK, topk_weights_TK[token_U], 0.0)
    recv_R = d.exchange_counts(send_R)
    send, recv = send_R.tolist(), recv_R.tolist()  # host sync: the split sizes
    row_bytes = D * x_TD.element_size() + ids_UK.shape[1] * (8 + 4)  # the row, its ids and weights
    d.count_dropless_minimum(send, recv, row_bytes)
    exchange = lambda t: all_to_all_rows(t, send, recv, d.ep_group, d.meter, "dispatch")  # noqa: E731
    recv_MD, local_MK, w_MK = exchange(x_TD[token_U]), exchange(local_UK), exchange(weights_UK.float())
    # Expand to (row, local expert) pairs, expert-major: what the grouped GEMMs take.
    M, K = local_MK.shape
    key_P = torch.where(local_MK >= 0, local_MK, e).flatten()
    order = torch.sort(key_P, stable=True).indices
    order = order[key_P[order] < e]
    counts_e = torch.zeros(e, dtype=torch.int64, device=x_TD.device).index_add_(0, key_P[order], torch.ones_like(order))
    y_PD = experts(recv_MD[order // K], counts_e)
    out_MD = recv_MD.new_zeros(M, D).index_add(0, order // K, y_PD * w_MK.flatten()[order, None].to(y_PD.dtype))
    back_UD = all_to_all_rows(out_MD, recv, send, d.ep_group, d.meter, "combine")
    return x_TD.new_zeros(T, D).index_add(0, token_U, back_UD.to(x_TD.dtype))
