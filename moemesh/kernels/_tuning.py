"""Launch parameters of the Triton kernels, in one table.

The launchers read it on every call, so ``scripts/tune_kernels.py`` can sweep the
values on a GPU (refusing any candidate whose output differs from this table's)
and print a table to paste here. The values below are first guesses, not yet
measured on a GPU: see benchmarks/RESULTS.md.

Keys per kernel: block sizes (each a power of two; a block over D is capped at
next_pow2(D)) and ``num_warps``. The gating kernels' ``tile`` is the element
budget of one [BLOCK_T, BLOCK_E] tile: BLOCK_T = min(max_block_t, tile // next_pow2(E)).
"""

from __future__ import annotations

import contextlib

TUNING: dict[str, dict[str, int]] = {
    "gating_fwd": {"tile": 4096, "max_block_t": 64, "num_warps": 4},
    "gating_bwd": {"tile": 4096, "max_block_t": 64, "num_warps": 4},
    "permute": {"block_n": 64, "block_d": 128, "num_warps": 4},
    "sort_chunks": {"block_m": 16, "block_d": 128, "num_warps": 4},
    "gather_sum": {"block_t": 16, "block_d": 128, "num_warps": 4},
    "unpermute_bwd": {"block_n": 16, "block_d": 128, "num_warps": 4},
}


@contextlib.contextmanager
def override(kernel: str, **values: int):
    """Use other launch parameters for ``kernel`` inside the block (for tuning and tests)."""
    unknown = set(values) - set(TUNING[kernel])
    if unknown:
        raise KeyError(f"{kernel}: unknown launch parameters {sorted(unknown)}; known: {sorted(TUNING[kernel])}")
    saved = dict(TUNING[kernel])
    TUNING[kernel].update(values)
    try:
        yield
    finally:
        TUNING[kernel].clear()
        TUNING[kernel].update(saved)
