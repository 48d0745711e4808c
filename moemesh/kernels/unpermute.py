"""Unpermute: bring expert outputs back to token order and sum the top-k rows,
each weighted by its gate weight.

Shapes: rows_ND [N, D], row_map_N [N] (flat pair index t*K + k of each row),
topk_weights_TK [T, K] -> out_TD [T, D]. Differentiable in rows and weights.
Dropped pairs have no row and contribute nothing.

Triton path: ``_gather_sum_kernel`` is token-centric (out[t] = sum_k w[t,k] *
rows[pos[t,k]]): each output row is written once, in k order: deterministic, no
atomics. Its backward, ``_unpermute_bwd_kernel``, is row-centric: grad_rows[n] =
w * grad_out[t] and grad_w[t, k] = <grad_out[t], rows[n]>, each pair owning its
own slot. Bytes: forward reads N*D rows and writes T*D; backward reads T*D grads
(per row that uses them) and N*D rows, writes N*D. Both are torch.library custom
ops (``moemesh::unpermute``, ``moemesh::unpermute_backward``) with fake
implementations, so they work under torch.compile; eager calls take
``_Unpermute``, an autograd.Function over the same launchers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moemesh.kernels._triton import check, check_float, next_pow2, pick, tl, triton
from moemesh.kernels._tuning import launch_params


def unpermute_reference(rows_ND: torch.Tensor, row_map_N: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    T, K = topk_weights_TK.shape
    D = rows_ND.shape[1]
    w_N = topk_weights_TK.reshape(-1).index_select(0, row_map_N).to(rows_ND.dtype)
    token_N = torch.div(row_map_N, K, rounding_mode="floor")
    return rows_ND.new_zeros(T, D).index_add(0, token_N, rows_ND * w_N.unsqueeze(1))


if triton is not None:

    @triton.jit
    def _gather_sum_kernel(
        rows_ptr,
        pos_ptr,
        w_ptr,
        out_ptr,
        T,
        D,
        stride_r,
        stride_o,
        K: tl.constexpr,
        HAS_W: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_t, pid_d = tl.program_id(0), tl.program_id(1)
        toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask, dmask = toks < T, cols < D
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            pos = tl.load(pos_ptr + toks * K + k, mask=tmask, other=-1)
            has = tmask & (pos >= 0)
            v = tl.load(
                rows_ptr + pos[:, None] * stride_r + cols[None, :], mask=has[:, None] & dmask[None, :], other=0.0
            ).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + toks * K + k, mask=has, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(
            out_ptr + toks[:, None].to(tl.int64) * stride_o + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=tmask[:, None] & dmask[None, :],
        )

    @triton.jit
    def _unpermute_bwd_kernel(
        g_out_ptr,
        rows_ptr,
        row_map_ptr,
        w_ptr,
        g_rows_ptr,
        g_w_ptr,
        N,
        D,
        stride_g,
        stride_r,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        pair = tl.load(row_map_ptr + n, mask=nmask, other=0)
        n = n.to(tl.int64)  # int64 offsets: N*D may pass 2**31
        tok = pair // K
        w = tl.load(w_ptr + pair, mask=nmask, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = nmask[:, None] & (cols < D)[None, :]
            g = tl.load(g_out_ptr + tok[:, None] * stride_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
            r = tl.load(rows_ptr + n[:, None] * stride_r + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(
                g_rows_ptr + n[:, None] * stride_r + cols[None, :],
                (g * w[:, None]).to(g_rows_ptr.dtype.element_ty),
                mask=m,
            )
            dot += tl.sum(g * r, axis=1)
        tl.store(g_w_ptr + pair, dot, mask=nmask)


def _positions(row_map_N: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """Inverse of row_map: the row of each (token, k) pair, -1 where dropped."""
    pos = torch.full((T * K,), -1, dtype=torch.int64, device=row_map_N.device)
    pos[row_map_N] = torch.arange(row_map_N.numel(), device=row_map_N.device)
    return pos


def gather_sum(
    rows_ND, row_map_N, weights_TK, T: int, K: int, *, params: Mapping[str, int] | None = None
) -> torch.Tensor:
    """out[t] = sum_k (w[t,k] *) rows[pos(t, k)] with the Triton kernel (no autograd)."""
    rows_ND = rows_ND.contiguous()
    D = rows_ND.shape[1]
    out = torch.empty(T, D, dtype=rows_ND.dtype, device=rows_ND.device)
    if T == 0 or D == 0:
        return out.zero_()
    pos = _positions(row_map_N, T, K)
    cfg = launch_params("gather_sum", params)
    BLOCK_T, BLOCK_D = cfg["block_t"], min(cfg["block_d"], next_pow2(D))
    w = weights_TK.contiguous() if weights_TK is not None else rows_ND
    _gather_sum_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))](
        rows_ND,
        pos,
        w,
        out,
        T,
        D,
        rows_ND.stride(0),
        out.stride(0),
        K=K,
        HAS_W=weights_TK is not None,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        num_warps=cfg["num_warps"],
    )
    return out


def _unpermute_backward_launch(g_out, rows_ND, row_map_N, weights_TK, *, params: Mapping[str, int] | None = None):
    T, K = weights_TK.shape
    N, D = rows_ND.shape
    rows_ND, g_out = rows_ND.contiguous(), g_out.contiguous()
    g_rows = torch.empty_like(rows_ND)
    g_w = torch.zeros(T * K, dtype=torch.float32, device=rows_ND.device)
    if N > 0 and D > 0:
        cfg = launch_params("unpermute_bwd", params)
        BLOCK_N = cfg["block_n"]
        _unpermute_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
            g_out,
            rows_ND,
            row_map_N,
            weights_TK.contiguous(),
            g_rows,
            g_w,
            N,
            D,
            g_out.stride(0),
            rows_ND.stride(0),
            K=K,
            BLOCK_N=BLOCK_N,
            BLOCK_D=min(cfg["block_d"], next_pow2(D)),
            num_warps=cfg["num_warps"],
        )
    return g_rows, g_w.view(T, K).to(weights_TK.dtype)


if triton is not None:
    # torch.library custom ops with fake implementations: torch.compile keeps each
    # as one node. gather_sum also serves as permute's backward (no weights).

    @torch.library.custom_op(
        "moemesh::gather_sum",
        mutates_args=(),
        schema="(Tensor rows, Tensor row_map, Tensor? weights, SymInt T, SymInt K) -> Tensor",
    )
    def gather_sum_op(rows_ND, row_map_N, weights_TK, T, K):
        return gather_sum(rows_ND, row_map_N, weights_TK, T, K)

    @gather_sum_op.register_fake
    def _gather_sum_fake(rows_ND, row_map_N, weights_TK, T, K):
        return rows_ND.new_empty(T, rows_ND.shape[1])

    @torch.library.custom_op(
        "moemesh::unpermute", mutates_args=(), schema="(Tensor rows, Tensor row_map, Tensor weights) -> Tensor"
    )
    def _unpermute_op(rows_ND, row_map_N, weights_TK):
        return gather_sum(rows_ND, row_map_N, weights_TK, *weights_TK.shape)

    @_unpermute_op.register_fake
    def _unpermute_fake(rows_ND, row_map_N, weights_TK):
        return rows_ND.new_empty(weights_TK.shape[0], rows_ND.shape[1])

    @torch.library.custom_op(
        "moemesh::unpermute_backward",
        mutates_args=(),
        schema="(Tensor g_out, Tensor rows, Tensor row_map, Tensor weights) -> (Tensor, Tensor)",
    )
    def _unpermute_bwd_op(g_out, rows_ND, row_map_N, weights_TK):
        return _unpermute_backward_launch(g_out, rows_ND, row_map_N, weights_TK)

    @_unpermute_bwd_op.register_fake
    def _unpermute_bwd_fake(g_out, rows_ND, row_map_N, weights_TK):
        return (
            torch.empty_like(rows_ND, memory_format=torch.contiguous_format),
            torch.empty_like(weights_TK, memory_format=torch.contiguous_format),
        )

    def _unpermute_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _unpermute_backward(ctx, g_out):
        rows_ND, row_map_N, weights_TK = ctx.saved_tensors
        g_rows, g_w = _unpermute_bwd_op(g_out, rows_ND, row_map_N, weights_TK)
        return g_rows, None, g_w

    _unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)

    class _Unpermute(torch.autograd.Function):
        """The eager path: the same launchers without the custom op's dispatch (see _triton.pick)."""

        @staticmethod
        def forward(ctx, rows_ND, row_map_N, weights_TK):
            ctx.save_for_backward(rows_ND, row_map_N, weights_TK)
            return gather_sum(rows_ND, row_map_N, weights_TK, *weights_TK.shape)

        @staticmethod
        def backward(ctx, g_out):
            rows_ND, row_map_N, weights_TK = ctx.saved_tensors
            g_rows, g_w = _unpermute_backward_launch(g_out, rows_ND, row_map_N, weights_TK)
            return g_rows, None, g_w


def unpermute_triton(rows_ND: torch.Tensor, row_map_N: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    check(rows_ND.dim() == 2, f"unpermute: rows must be [N, D], got {tuple(rows_ND.shape)}")
    check(
        row_map_N.shape == (rows_ND.shape[0],),
        f"unpermute: row_map must be [N={rows_ND.shape[0]}], got {tuple(row_map_N.shape)}",
    )
    check(topk_weights_TK.dim() == 2, f"unpermute: weights must be [T, K], got {tuple(topk_weights_TK.shape)}")
    check_float("unpermute", "rows", rows_ND)
    check_float("unpermute", "weights", topk_weights_TK)
    return pick(_unpermute_op, _Unpermute.apply)(rows_ND, row_map_N, topk_weights_TK)
