"""Launch parameters of the Triton kernels, in one table.

Every launcher takes ``params=`` (a mapping of some of its kernel's keys) and uses
this table for the rest, so ``scripts/tune_kernels.py`` sweeps the values on a GPU by
passing candidates (refusing any whose output differs from this table's) and prints a
table to paste here. Nothing writes to the table at run time. The values below are first guesses, not yet
measured on a GPU: see benchmarks/RESULTS.md.

Keys per kernel: block sizes (each a power of two; a block over D is capped at
next_pow2(D)) and ``num_warps``. The gating kernels' ``tile`` is the element
budget of one [BLOCK_T, BLOCK_E] tile: BLOCK_T = min(max_block_t, tile // next_pow2(E)).
"""

from __future__ import annotations

from collections.abc import Mapping

TUNING: dict[str, dict[str, int]] = {
    "gating_fwd": {"tile": 4096, "max_block_t": 64, "num_warps": 4},
    "gating_bwd": {"tile": 4096, "max_block_t": 64, "num_warps": 4},
    "permute": {"block_n": 64, "block_d": 128, "num_warps": 4},
    "sort_chunks": {"block_m": 16, "block_d": 128, "num_warps": 4},
    "gather_sum": {"block_t": 16, "block_d": 128, "num_warps": 4},
    "unpermute_bwd": {"block_n": 16, "block_d": 128, "num_warps": 4},
    "swiglu": {"block": 1024, "num_warps": 4},
}


def launch_params(kernel: str, params: Mapping[str, int] | None = None) -> Mapping[str, int]:
    """``kernel``'s launch parameters: this table's, with ``params`` (a launcher's argument) over them."""
    table = TUNING[kernel]
    if not params:
        return table
    unknown = set(params) - set(table)
    if unknown:
        raise KeyError(f"{kernel}: unknown launch parameters {sorted(unknown)}; known: {sorted(table)}")
    return {**table, **params}
