"""The gradient reducer's buckets, without torch: ``parallel.grads`` reduces them and the planner,
which must not import torch, counts its collectives by the same rule (``planning.cost``)."""

from __future__ import annotations

from collections.abc import Sequence

BUCKET_BYTES = 25 * 2**20  # the reducer's bucket; the planner counts its all-reduces with it


def bucket_slices(nbytes: Sequence[int], bucket_bytes: int) -> list[slice]:
    """Consecutive runs of the sizes ``nbytes``, each at most ``bucket_bytes`` unless one size
    alone is more: the buckets ``GradReducer`` reduces in one collective each."""
    out: list[slice] = []
    start, size = 0, 0
    for i, n in enumerate(nbytes):
        if i > start and size + n > bucket_bytes:
            out.append(slice(start, i))
            start, size = i, 0
        size += n
    if start < len(nbytes):
        out.append(slice(start, len(nbytes)))
    return out
