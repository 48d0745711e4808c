"""The reading order: a pure function of the global sample index.

A stream of ``n`` tokens is cut into ``W = (n - 1) // L`` windows of ``L + 1`` tokens at
stride ``L`` (``L`` = seq_len): window ``w`` is tokens ``[w*L, w*L + L + 1)``, so every token
but the stream's last ``n - W*L`` is an input exactly once, and a target exactly once, per
epoch. Sample ``k`` of a stream is window ``perm_e(k mod W)`` of epoch ``e = k // W``, where
``perm_e`` is a seeded bijection of ``[0, W)``, new each epoch: a shuffle without replacement,
epoch after epoch.

The bijection is a Feistel network over the smallest even power of two >= W, walked back into
``[0, W)`` (cycle walking): any index is mapped in O(1) time and memory, with no permutation
array (a 100 GB corpus has tens of millions of windows; each rank would hold that array).

A mixture of sources assigns global sample ``g`` to a source by a fixed schedule: a block of
``MIX_BLOCK`` samples holds each source's largest-remainder share of it, spread through the
block by smooth weighted round-robin. So the proportions are exact to 1/MIX_BLOCK within every
block (not merely in expectation), and a source's own sample count at ``g`` is a formula too:
the mixture's state at any point is a function of ``g`` alone.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

MIX_BLOCK = 4096
_ROUNDS = 6
_M64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 64-bit hash of some integers (splitmix64 steps): seeds for the generators below."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h


def _hash_u64(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of ``x ^ key`` (uint64 arithmetic wraps)."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of ``[0, n)`` applied to ``index`` (values in ``[0, n)``)."""
    idx = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return idx.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(mix64(key, r)) for r in range(_ROUNDS)]
    limit = np.uint64(n)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_hash_u64(right, k) & mask)
        return (left << np.uint64(half)) | right

    out = once(idx)
    todo = out >= limit
    while todo.any():  # cycle walking: the cycle through an index < n returns below n
        out[todo] = once(out[todo])
        todo = out >= limit
    return out.astype(np.int64)


def epoch_key(seed: int, split: int, source: int, epoch: int) -> int:
    return mix64(seed, split, source, epoch)


def window_of(k: np.ndarray, windows: int, *, seed: int, split: int, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, window) of a stream's samples ``k`` (int64 array): epoch ``k // W`` in its own order."""
    k = np.asarray(k, dtype=np.int64)
    epoch, pos = np.divmod(k, windows)
    out = np.empty_like(k)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = permute(pos[sel], windows, epoch_key(seed, split, source, int(e)))
    return epoch, out


class WindowOrder:
    """``window_of`` for one stream, computed ``CHUNK`` consecutive samples at a time and
    remembered (a few chunks): consecutive batches read consecutive samples, so one vectorised
    call serves many batches (the per-call cost of numpy, not the arithmetic, dominates a batch)."""

    CHUNK = 4096
    KEEP = 8

    def __init__(self, windows: int, *, seed: int, split: int, source: int):
        self.windows, self.seed, self.split, self.source = windows, seed, split, source
        self._chunks: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()  # the read-ahead thread and the caller share the chunks

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            got = self._chunks.get(c)
            if got is not None:
                self._chunks.move_to_end(c)
                return got
        k = np.arange(c * self.CHUNK, (c + 1) * self.CHUNK, dtype=np.int64)
        got = window_of(k, self.windows, seed=self.seed, split=self.split, source=self.source)
        with self._lock:
            self._chunks[c] = got
            while len(self._chunks) > self.KEEP:
                self._chunks.popitem(last=False)
        return got

    def __call__(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.asarray(k, dtype=np.int64)
        chunk, at = np.divmod(k, self.CHUNK)
        epoch, window = np.empty_like(k), np.empty_like(k)
        for c in np.unique(chunk):
            sel = chunk == c
            e, w = self._chunk(int(c))
            epoch[sel], window[sel] = e[at[sel]], w[at[sel]]
        return epoch, window


@dataclass(frozen=True)
class Mixture:
    """The fixed schedule that draws samples from sources by weight (see the module's docstring)."""

    counts: tuple[int, ...]  # samples of each source in a block of MIX_BLOCK
    source_at: np.ndarray  # [MIX_BLOCK]: the source of each slot of a block
    rank_at: np.ndarray  # [MIX_BLOCK]: how many earlier slots of the block the same source holds

    @classmethod
    def of(cls, weights: list[float] | tuple[float, ...]) -> Mixture:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
        share = w / w.sum() * MIX_BLOCK
        counts = np.floor(share).astype(np.int64)
        # Largest remainders get the slots left over (ties: the earlier source).
        for s in sorted(range(len(w)), key=lambda s: (-(share[s] - counts[s]), s))[: MIX_BLOCK - int(counts.sum())]:
            counts[s] += 1
        if np.any(counts == 0):
            raise ValueError(f"mixture weights {list(weights)}: a source would get no sample in {MIX_BLOCK}")
        # Smooth weighted round-robin: each slot goes to the source furthest behind its share.
        current = np.zeros(len(w), dtype=np.int64)
        source_at = np.empty(MIX_BLOCK, dtype=np.int64)
        rank_at = np.empty(MIX_BLOCK, dtype=np.int64)
        taken = np.zeros(len(w), dtype=np.int64)
        for slot in range(MIX_BLOCK):
            current += counts
            s = int(np.argmax(current))
            current[s] -= MIX_BLOCK
            source_at[slot], rank_at[slot] = s, taken[s]
            taken[s] += 1
        return cls(tuple(int(c) for c in counts), source_at, rank_at)

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's own sample index) of global samples ``g``."""
        block, slot = np.divmod(np.asarray(g, dtype=np.int64), MIX_BLOCK)
        source = self.source_at[slot]
        counts = np.asarray(self.counts, dtype=np.int64)
        return source, block * counts[source] + self.rank_at[slot]

    def drawn(self, g: int) -> list[int]:
        """Samples each source has given among the first ``g`` global samples."""
        block, slot = divmod(int(g), MIX_BLOCK)
        head = np.bincount(self.source_at[:slot], minlength=len(self.counts))
        return [block * c + int(h) for c, h in zip(self.counts, head)]
