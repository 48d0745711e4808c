"""Fused ops of the MoE token path, one file per op.

Each op has a plain torch reference, which is also the CPU production path.
Triton implementations (used on CUDA, tested on CPU under TRITON_INTERPRET=1)
are added beside each reference by the kernels issue.

Shape letters: T tokens, D model dim, E experts, K top-k, N routed rows
(kept (token, k) pairs), R EP ranks, e local experts per rank.
"""
from kernels.gating import GatingOutput, fused_gating
from kernels.permute import permute
from kernels.sort_chunks import sort_chunks
from kernels.unpermute import unpermute

__all__ = ["GatingOutput", "fused_gating", "permute", "sort_chunks", "unpermute"]
