"""Permute: a stable counting sort of the (token, k) pairs by destination expert,
and a gather of their rows into one contiguous, expert-major send buffer.

Shapes: x_TD [T, D], topk_ids_TK [T, K] (id -1 marks a pair dropped by capacity)
-> rows_ND [N, D], row_map_N [N] (flat pair index t*K + k of each row),
counts_E [E] (rows per expert). N = kept pairs. Stable: inside an expert, rows
keep (token, k) order, so every backend and every layout agrees on the order.

Triton path, two kernels: ``_permute_hist_kernel`` counts keys per block of
pairs; torch turns the [blocks, E+1] histogram into each block's first slot per
expert (a tiny cumsum); ``_permute_scatter_kernel`` ranks each pair inside its
block (pairwise compare: stable), writes row_map and copies the row. Bytes:
reads T*K ids twice and T*K*D input rows once, writes N*D rows.
Backward: grad_x[t] = sum_k grad_rows[pos(t, k)], a token-centric gather-sum
(the unpermute kernel with unit weights): deterministic, no atomics.
``moemesh::permute`` wraps the launcher as a torch.library custom op (fake
implementation, autograd) so that it works under torch.compile; eager calls take
``_Permute``, an autograd.Function over the same launchers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moemesh.kernels._triton import check, next_pow2, pick, tl, triton
from moemesh.kernels._tuning import launch_params


def permute_reference(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int):
    flat_ids = topk_ids_TK.reshape(-1)
    kept = flat_ids >= 0
    # Dropped pairs sort last (key E) and are cut off.
    key = torch.where(kept, flat_ids, torch.full_like(flat_ids, num_experts))
    order = torch.sort(key, stable=True).indices
    counts_E = torch.bincount(flat_ids[kept], minlength=num_experts)
    row_map_N = order[: int(counts_E.sum())]
    K = topk_ids_TK.shape[1]
    rows_ND = x_TD.index_select(0, torch.div(row_map_N, K, rounding_mode="floor"))
    return rows_ND, row_map_N, counts_E


if triton is not None:

    @triton.jit
    def _permute_hist_kernel(ids_ptr, hist_ptr, NP, E, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ids = tl.load(ids_ptr + offs, mask=offs < NP, other=-1)
        key = tl.where(ids >= 0, ids, E)  # dropped pairs: bin E
        bins = tl.arange(0, BLOCK_B)
        onehot = (key[:, None] == bins[None, :]) & (offs < NP)[:, None]
        tl.store(hist_ptr + pid * (E + 1) + bins, tl.sum(onehot.to(tl.int32), axis=0), mask=bins < E + 1)

    @triton.jit
    def _permute_scatter_kernel(
        x_ptr,
        ids_ptr,
        base_ptr,
        rows_ptr,
        row_map_ptr,
        NP,
        E,
        K,
        D,
        stride_x,
        stride_r,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        local = tl.arange(0, BLOCK_N)
        offs = pid * BLOCK_N + local
        valid = offs < NP
        ids = tl.load(ids_ptr + offs, mask=valid, other=-1)
        key = tl.where(ids >= 0, ids, E)
        # Stable rank inside the block: earlier pairs with the same key.
        same = (key[:, None] == key[None, :]) & (local[None, :] < local[:, None]) & valid[None, :]
        rank = tl.sum(same.to(tl.int32), axis=1)
        pos = tl.load(base_ptr + pid * (E + 1) + key, mask=valid, other=0) + rank
        keep = valid & (ids >= 0)
        tl.store(row_map_ptr + pos, offs.to(tl.int64), mask=keep)
        token = (offs // K).to(tl.int64)  # int64 offsets: T*D may pass 2**31
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = keep[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=m)
            tl.store(rows_ptr + pos[:, None].to(tl.int64) * stride_r + cols[None, :], v, mask=m)


def _check(x_TD, topk_ids_TK):
    check(x_TD.dim() == 2, f"permute: x must be [T, D], got {tuple(x_TD.shape)}")
    check(
        topk_ids_TK.dim() == 2 and topk_ids_TK.shape[0] == x_TD.shape[0],
        f"permute: ids must be [T={x_TD.shape[0]}, K], got {tuple(topk_ids_TK.shape)}",
    )
    check(topk_ids_TK.dtype in (torch.int64, torch.int32), f"permute: ids dtype {topk_ids_TK.dtype} is not int")


def _launch(x_TD, topk_ids_TK, num_experts, *, params: Mapping[str, int] | None = None):
    x_TD, ids = x_TD.contiguous(), topk_ids_TK.contiguous().view(-1)
    T, D = x_TD.shape
    K, E, NP = topk_ids_TK.shape[1], num_experts, ids.numel()
    dev = x_TD.device
    cfg = launch_params("permute", params)
    BLOCK_N, warps = cfg["block_n"], cfg["num_warps"]
    blocks = triton.cdiv(NP, BLOCK_N)
    hist = torch.zeros(max(blocks, 1), E + 1, dtype=torch.int32, device=dev)
    if NP > 0:
        _permute_hist_kernel[(blocks,)](ids, hist, NP, E, BLOCK_N=BLOCK_N, BLOCK_B=next_pow2(E + 1), num_warps=warps)
    hist = hist.to(torch.int64)
    totals = hist.sum(0)
    expert_start = torch.cumsum(totals, 0) - totals
    base = expert_start[None, :] + torch.cumsum(hist, 0) - hist  # first slot of block b for key e
    counts_E = totals[:E]
    # An id outside [0, E) other than -1 (dropped) would be dropped silently (== E) or send the
    # scatter kernel out of bounds (> E): counted here, read in the sync the launcher makes anyway.
    outside = ((ids < -1) | (ids >= E)).sum()
    n, n_outside = torch.stack((counts_E.sum(), outside)).tolist()  # host sync (the dispatcher syncs anyway)
    if n_outside:
        bad = ids[(ids < -1) | (ids >= E)]
        raise ValueError(
            f"permute: expert ids must be in [0, E={E}) or -1 (dropped); {n_outside} are not, e.g. {int(bad[0])}"
        )
    rows = torch.empty(n, D, dtype=x_TD.dtype, device=dev)
    row_map = torch.empty(n, dtype=torch.int64, device=dev)
    if NP > 0:
        _permute_scatter_kernel[(blocks,)](
            x_TD,
            ids,
            base.contiguous(),
            rows,
            row_map,
            NP,
            E,
            K,
            D,
            x_TD.stride(0),
            D,
            BLOCK_N=BLOCK_N,
            BLOCK_D=min(cfg["block_d"], next_pow2(D)),
            num_warps=warps,
        )
    return rows, row_map, counts_E


if triton is not None:
    # A torch.library custom op: under torch.compile one node whose row count is a
    # data-dependent (unbacked) size, so nothing traces into the launcher's host sync.

    @torch.library.custom_op(
        "moemesh::permute",
        mutates_args=(),
        schema="(Tensor x, Tensor ids, int num_experts) -> (Tensor, Tensor, Tensor)",
    )
    def _permute_op(x_TD, topk_ids_TK, num_experts):
        return _launch(x_TD, topk_ids_TK, num_experts)

    @_permute_op.register_fake
    def _permute_fake(x_TD, topk_ids_TK, num_experts):
        n = torch.library.get_ctx().new_dynamic_size()  # kept pairs: known only after routing
        return (
            x_TD.new_empty(n, x_TD.shape[1]),
            topk_ids_TK.new_empty(n, dtype=torch.int64),
            topk_ids_TK.new_empty(num_experts, dtype=torch.int64),
        )

    def _permute_setup(ctx, inputs, output):
        ctx.T, ctx.K = inputs[1].shape
        ctx.save_for_backward(output[1])

    def _permute_backward(ctx, g_rows, _g_map, _g_counts):
        from moemesh.kernels.unpermute import gather_sum_op

        (row_map,) = ctx.saved_tensors
        return gather_sum_op(g_rows, row_map, None, ctx.T, ctx.K), None, None

    _permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)

    class _Permute(torch.autograd.Function):
        """The eager path: the same launchers without the custom op's dispatch (see _triton.pick)."""

        @staticmethod
        def forward(ctx, x_TD, topk_ids_TK, num_experts):
            out = _launch(x_TD, topk_ids_TK, num_experts)
            _permute_setup(ctx, (x_TD, topk_ids_TK, num_experts), out)
            ctx.mark_non_differentiable(out[1], out[2])
            return out

        @staticmethod
        def backward(ctx, g_rows, _g_map, _g_counts):
            from moemesh.kernels.unpermute import gather_sum

            (row_map,) = ctx.saved_tensors
            return gather_sum(g_rows, row_map, None, ctx.T, ctx.K), None, None


def permute_triton(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int):
    _check(x_TD, topk_ids_TK)
    return pick(_permute_op, _Permute.apply)(x_TD, topk_ids_TK, num_experts)
