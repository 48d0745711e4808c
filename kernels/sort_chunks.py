"""Sort chunks: reorder rows from rank-major to expert-major (or back).

After the All-to-All, rows arrive grouped by source rank, and within each rank
by local expert: chunks (r, j) with sizes counts_Re [R, e]. The experts want
them grouped by local expert: chunks (j, r). Passing ``counts_Re.T`` undoes it.
"""
from __future__ import annotations

import torch


def chunk_permutation(counts_Re: torch.Tensor) -> torch.Tensor:
    """Row index map: out[i] = in[idx[i]] turns (r, j) chunk order into (j, r)."""
    R, e = counts_Re.shape
    sizes = counts_Re.reshape(-1)
    in_start = torch.cumsum(sizes, 0) - sizes
    new_order = torch.arange(R * e, device=sizes.device).view(R, e).t().reshape(-1)
    sizes_new = sizes[new_order]
    out_start = torch.cumsum(sizes_new, 0) - sizes_new
    total = int(sizes.sum())
    shift = torch.repeat_interleave(in_start[new_order] - out_start, sizes_new, output_size=total)
    return torch.arange(total, device=sizes.device) + shift


def sort_chunks(rows_ND: torch.Tensor, counts_Re: torch.Tensor) -> torch.Tensor:
    if counts_Re.shape[0] == 1 or counts_Re.shape[1] == 1:
        return rows_ND  # a single row or column of chunks: the order is already right
    return rows_ND.index_select(0, chunk_permutation(counts_Re))
