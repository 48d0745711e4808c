"""Sort chunks: reorder rows from rank-major to expert-major (or back).

After the All-to-All, rows arrive grouped by source rank and, inside each rank,
by local expert: chunks (r, j) with sizes counts_Re [R, e]. The experts want
them grouped by local expert: chunks (j, r). Passing ``counts_Re.T`` undoes it.

Triton path: ``_sort_chunks_kernel`` finds each output row's chunk by comparing
its index with the R*e output chunk starts (no host sync, no per-chunk launch)
and copies the row. Bytes: reads and writes M*D once. The backward of a
permutation is the inverse permutation: the same kernel with counts transposed.
``moemesh::sort_chunks`` is a torch.library custom op with a fake
implementation, so it works under torch.compile; eager calls take ``_SortChunks``,
an autograd.Function over the same launcher.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moemesh.kernels._triton import check, next_pow2, pick, tl, triton
from moemesh.kernels._tuning import launch_params


def _chunk_tables(counts_Re: torch.Tensor):
    """Per output chunk (j, r): its start in the output and its start in the input."""
    R, e = counts_Re.shape
    sizes = counts_Re.reshape(-1).to(torch.int64)
    in_start = torch.cumsum(sizes, 0) - sizes
    new_order = torch.arange(R * e, device=sizes.device).view(R, e).t().reshape(-1)
    sizes_new = sizes[new_order]
    out_start = torch.cumsum(sizes_new, 0) - sizes_new
    return sizes_new, out_start, in_start[new_order]


def chunk_permutation(counts_Re: torch.Tensor) -> torch.Tensor:
    """Row index map: out[i] = in[idx[i]] turns (r, j) chunk order into (j, r)."""
    sizes_new, out_start, src_start = _chunk_tables(counts_Re)
    total = int(sizes_new.sum())
    shift = torch.repeat_interleave(src_start - out_start, sizes_new, output_size=total)
    return torch.arange(total, device=counts_Re.device) + shift


def sort_chunks_reference(rows_MD: torch.Tensor, counts_Re: torch.Tensor) -> torch.Tensor:
    if counts_Re.shape[0] == 1 or counts_Re.shape[1] == 1:
        return rows_MD  # a single row or column of chunks: the order is already right
    return rows_MD.index_select(0, chunk_permutation(counts_Re))


if triton is not None:

    @triton.jit
    def _sort_chunks_kernel(
        in_ptr,
        out_ptr,
        out_start_ptr,
        src_start_ptr,
        M,
        D,
        C,
        stride_i,
        stride_o,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        imask = i < M
        c = tl.arange(0, BLOCK_C)
        starts = tl.load(out_start_ptr + c, mask=c < C, other=2**62)
        # The last chunk starting at or before row i holds it (empty chunks share a start).
        chunk = tl.sum((starts[None, :] <= i[:, None]).to(tl.int32), axis=1) - 1
        chunk = tl.maximum(chunk, 0)
        src = tl.load(src_start_ptr + chunk, mask=imask, other=0) + (
            i - tl.load(out_start_ptr + chunk, mask=imask, other=0)
        )
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = imask[:, None] & (cols < D)[None, :]
            v = tl.load(in_ptr + src[:, None] * stride_i + cols[None, :], mask=m)
            tl.store(out_ptr + i[:, None].to(tl.int64) * stride_o + cols[None, :], v, mask=m)


def _launch(rows_MD: torch.Tensor, counts_Re: torch.Tensor, *, params: Mapping[str, int] | None = None) -> torch.Tensor:
    rows_MD = rows_MD.contiguous()
    M, D = rows_MD.shape
    out = torch.empty_like(rows_MD)
    if M == 0 or D == 0:
        return out
    _, out_start, src_start = _chunk_tables(counts_Re.to(rows_MD.device))
    C = out_start.numel()
    cfg = launch_params("sort_chunks", params)
    BLOCK_M = cfg["block_m"]
    _sort_chunks_kernel[(triton.cdiv(M, BLOCK_M),)](
        rows_MD,
        out,
        out_start.contiguous(),
        src_start.contiguous(),
        M,
        D,
        C,
        rows_MD.stride(0),
        out.stride(0),
        BLOCK_M=BLOCK_M,
        BLOCK_C=next_pow2(C),
        BLOCK_D=min(cfg["block_d"], next_pow2(D)),
        num_warps=cfg["num_warps"],
    )
    return out


if triton is not None:
    # A torch.library custom op (fake implementation, autograd): one node under
    # torch.compile. Its backward is itself with the counts transposed.

    @torch.library.custom_op("moemesh::sort_chunks", mutates_args=(), schema="(Tensor rows, Tensor counts) -> Tensor")
    def _sort_chunks_op(rows_MD, counts_Re):
        return _launch(rows_MD, counts_Re)

    @_sort_chunks_op.register_fake
    def _sort_chunks_fake(rows_MD, counts_Re):
        return torch.empty_like(rows_MD, memory_format=torch.contiguous_format)

    def _sort_chunks_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _sort_chunks_backward(ctx, g_out):
        (counts_Re,) = ctx.saved_tensors
        return _sort_chunks_op(g_out, counts_Re.t()), None

    _sort_chunks_op.register_autograd(_sort_chunks_backward, setup_context=_sort_chunks_setup)

    class _SortChunks(torch.autograd.Function):
        """The eager path: the same launcher without the custom op's dispatch (see _triton.pick)."""

        @staticmethod
        def forward(ctx, rows_MD, counts_Re):
            ctx.save_for_backward(counts_Re)
            return _launch(rows_MD, counts_Re)

        @staticmethod
        def backward(ctx, g_out):
            (counts_Re,) = ctx.saved_tensors
            return _launch(g_out, counts_Re.t()), None


def sort_chunks_triton(rows_MD: torch.Tensor, counts_Re: torch.Tensor) -> torch.Tensor:
    check(rows_MD.dim() == 2, f"sort_chunks: rows must be [M, D], got {tuple(rows_MD.shape)}")
    check(counts_Re.dim() == 2, f"sort_chunks: counts must be [R, e], got {tuple(counts_Re.shape)}")
    if counts_Re.shape[0] == 1 or counts_Re.shape[1] == 1:
        return rows_MD
    return pick(_sort_chunks_op, _SortChunks.apply)(rows_MD, counts_Re)
