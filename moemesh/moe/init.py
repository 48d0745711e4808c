"""Deterministic initialisation keyed by global names, so every layout starts equal.

A tensor's values depend only on the seed and a global key such as
``layers.3.moe.experts.17.w1``; never on the rank or a local index. EP rank 1
of ep2 therefore holds exactly the experts 4..7 that ``single`` holds.
"""

from __future__ import annotations

import zlib

import torch


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
    return g


@torch.no_grad()
def normal_(t: torch.Tensor, std: float, *, seed: int, key: str) -> torch.Tensor:
    values = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=_generator(seed, key))
    t.copy_(values)
    return t
