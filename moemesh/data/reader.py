"""Reading batches: every source as a stream of windows, in the sampler's fixed order.

``TokenData.batch(split, step, global_batch=G, seq_len=L, start=a, count=c)`` returns
samples ``a .. a+c-1`` of global batch ``step``; global batch ``step`` holds global samples
``base + (step - base_step) * G + i`` (``base`` = 0 at step 0, or what a checkpoint recorded),
so a data rank's slice is a slice of the same global batch on every layout, and a resumed
run, on any layout, reads what the uninterrupted run would have read.

Streams (``Stream``) are concatenations of token segments: one per shard of a prepared
directory (its training documents, or its held-out ones), or one file or array. Validation is
held out by whole documents: the fewest documents at the end of each shard that hold at
least ``val_fraction`` of its tokens (or a whole other prepared directory, ``data.val_path``), so no
validation token is ever a training token.

Batches of the training split are read ahead by one background thread (``prefetch_steps``
steps); the reads are memory-mapped slices, so the thread mostly waits on page faults.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from moemesh.data.format import DTYPES, INDEX_DTYPE, read_meta
from moemesh.data.sampler import Mixture, WindowOrder
from moemesh.errors import DataError

SPLITS = {"train": 0, "val": 1}
SYNTHETIC_TOKENS = 1 << 20


@dataclass(frozen=True)
class SourceSpec:
    """One source as a rank opens it (made by ``resolve.prepare_data`` before ranks start)."""

    name: str  # as the config named it (messages, checkpoints)
    format: str  # tokens (a prepared directory) | bin (one uint16 file) | synthetic
    path: str  # the directory or file; "" for synthetic
    weight: float = 1.0
    fingerprint: str = ""  # what the data is: a prepared directory's metadata sha256, a file's identity


@dataclass(frozen=True)
class DataSpec:
    """What a rank needs to open the data (picklable: it travels to spawned ranks)."""

    kind: str
    sources: tuple[SourceSpec, ...]
    val: SourceSpec | None  # read whole for validation (data.val_path); None: held out of each source
    val_fraction: float
    vocab_size: int  # the model's: every id read must be below it
    document_mask: bool = False
    prefetch_steps: int = 1
    resume_on_new_data: bool = False

    def fingerprint(self, *, seed: int, seq_len: int, legacy: bool = False) -> str:
        """What decides the order of the training windows: sources, the mixture's samples per
        block (so weights 1, 1 and 0.5, 0.5 are the same order), split, seed, seq_len.
        ``legacy``: as checkpoints before 2026-12-06 recorded it, with the weights as given."""
        shares = (
            [s.weight for s in self.sources] if legacy else list(Mixture.of([s.weight for s in self.sources]).counts)
        )
        what = {
            "sources": [[s.fingerprint, w] for s, w in zip(self.sources, shares)],
            # What is held out decides what trains.
            "val_fraction": None if self.val is not None else self.val_fraction,
            "seed": seed,
            "seq_len": seq_len,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def position_problem(self, position: dict, *, seed: int, seq_len: int) -> str | None:
        """None if a checkpoint's data position (``TokenData.position``) fits this data read with
        ``seed`` and ``seq_len``; else why not (one line)."""
        if not isinstance(position, dict) or not isinstance(position.get("samples"), int):
            return "its data position is malformed"
        mine = [self.fingerprint(seed=seed, seq_len=seq_len, legacy=old) for old in (False, True)]
        if position.get("fingerprint") in mine:
            return None
        then = ", ".join(f"{s.get('name')}" for s in position.get("sources", []) if isinstance(s, dict))
        now = ", ".join(s.name for s in self.sources)
        return (
            f"it was trained on other data (sources {then or '?'}, seq_len {position.get('seq_len')}; now {now}, "
            f"seq_len {seq_len}, or another seed, mixture or split): its position means nothing here; "
            "data.resume_on_new_data=true resumes the model and starts this data at its first window"
        )


@dataclass
class Segment:
    tokens: np.ndarray  # a shard (memmap), a file (memmap) or an array
    lo: int  # [lo, hi): the part of ``tokens`` in this stream
    hi: int
    offsets: np.ndarray | None  # the shard's document offsets (None: no document index)
    doc_base: int  # a number no other segment's documents share


@dataclass
class Stream:
    """Segments read as one sequence of tokens."""

    segments: list[Segment]
    starts: np.ndarray = field(init=False)
    n: int = field(init=False)

    def __post_init__(self):
        lengths = [s.hi - s.lo for s in self.segments]
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.n = int(self.starts[-1])

    def windows(self, seq_len: int) -> int:
        return max(0, (self.n - 1) // seq_len)

    def _pieces(self, start: int, length: int):
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, end = start, start + length
        while pos < end:
            seg, seg_start = self.segments[i], int(self.starts[i])
            a = seg.lo + pos - seg_start
            b = seg.lo + min(end, int(self.starts[i + 1])) - seg_start
            yield seg, a, b
            pos += b - a
            i += 1

    def read(self, start: int, length: int) -> np.ndarray:
        parts = [np.asarray(seg.tokens[a:b], dtype=np.int64) for seg, a, b in self._pieces(start, length)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def documents(self, start: int, length: int) -> np.ndarray:
        """A document number per token: equal numbers, same document."""
        parts = []
        for seg, a, b in self._pieces(start, length):
            if seg.offsets is None:
                parts.append(np.full(b - a, seg.doc_base, dtype=np.int64))
            else:
                local = np.searchsorted(seg.offsets, np.arange(a, b, dtype=np.uint64), side="right") - 1
                parts.append(seg.doc_base + local.astype(np.int64))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def held_out_cut(offsets: np.ndarray, n_tokens: int, val_fraction: float) -> int:
    """Where a shard's validation documents start: the fewest whole documents at its end that
    hold at least ``val_fraction`` of its tokens; none of a one-document shard (its end)."""
    if val_fraction <= 0:
        return n_tokens
    target = n_tokens - math.ceil(n_tokens * val_fraction)
    cut = int(offsets[int(np.searchsorted(offsets, target, side="right")) - 1])
    return n_tokens if cut == 0 else cut


def _tokens_streams(path: str, val_fraction: float, doc_base: int) -> tuple[Stream, Stream]:
    """(train, held-out) streams of a prepared directory (val_fraction 0: all of it trains)."""
    meta = read_meta(path)
    train, val = [], []
    d = Path(meta.path)
    for shard in meta.shards:
        if shard.n_tokens == 0:  # a piece of input without documents (numpy cannot map an empty file)
            doc_base += 1
            continue
        tokens = np.memmap(d / shard.tokens_file, dtype=DTYPES[meta.dtype], mode="r", shape=(shard.n_tokens,))
        offsets = np.memmap(d / shard.index_file, dtype=INDEX_DTYPE, mode="r", shape=(shard.n_docs + 1,))
        cut = held_out_cut(offsets, shard.n_tokens, val_fraction)
        if cut > 0:
            train.append(Segment(tokens, 0, cut, offsets, doc_base))
        if cut < shard.n_tokens:
            val.append(Segment(tokens, cut, shard.n_tokens, offsets, doc_base))
        doc_base += shard.n_docs + 1
    return Stream(train), Stream(val)


def _array_streams(tokens: np.ndarray, val_fraction: float, doc_base: int) -> tuple[Stream, Stream]:
    n_train = len(tokens) - int(len(tokens) * val_fraction)
    return (
        Stream([Segment(tokens, 0, n_train, None, doc_base)]),
        Stream([Segment(tokens, n_train, len(tokens), None, doc_base + 1)] if n_train < len(tokens) else []),
    )


def open_source(source: SourceSpec, index: int, *, val_fraction: float, vocab_size: int, seed: int):
    """A source's (train, held-out) streams; val_fraction 0 holds nothing out."""
    base = index << 48  # document numbers of different sources never meet
    if source.format == "tokens":
        return _tokens_streams(source.path, val_fraction, base)
    if source.format == "bin":
        return _array_streams(np.memmap(source.path, dtype=np.uint16, mode="r"), val_fraction, base)
    assert source.format == "synthetic", source.format
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    tokens = np.random.default_rng(seed).integers(0, vocab_size, SYNTHETIC_TOKENS, dtype=dtype)
    return _array_streams(tokens, val_fraction, base)


class Batch(NamedTuple):
    inputs: torch.Tensor  # [count, seq_len] int64
    targets: torch.Tensor  # [count, seq_len]: inputs shifted by one
    documents: torch.Tensor | None  # [count, seq_len] document numbers (data.document_mask), else None

    def model_kwargs(self, device) -> dict:
        """The model's keyword arguments beyond tokens and targets."""
        return {} if self.documents is None else {"documents_BS": self.documents.to(device)}


class DataPositionError(ValueError):
    """A checkpoint's data position that does not fit this run's data (one line)."""


class TokenData:
    """Batches by global sample index over the sources of a ``DataSpec``; see the module docstring."""

    def __init__(self, spec: DataSpec, *, seed: int):
        self.spec, self.seed, self.vocab_size = spec, seed, spec.vocab_size
        hold = 0.0 if spec.val is not None else spec.val_fraction
        opened = [
            open_source(s, i, val_fraction=hold, vocab_size=spec.vocab_size, seed=seed)
            for i, s in enumerate(spec.sources)
        ]
        weights = [s.weight for s in spec.sources]
        self.names = {"train": [s.name for s in spec.sources], "val": [s.name for s in spec.sources]}
        self.streams = {"train": [t for t, _ in opened], "val": [v for _, v in opened]}
        self.mixtures = {"train": Mixture.of(weights), "val": Mixture.of(weights)}
        if spec.val is not None:
            whole, _ = open_source(spec.val, len(spec.sources), val_fraction=0.0, vocab_size=spec.vocab_size, seed=seed)
            self.names["val"], self.streams["val"], self.mixtures["val"] = [spec.val.name], [whole], Mixture.of([1.0])
        self.base_samples, self.base_step = 0, 0  # train sample of step base_step's first sample
        self._ahead: dict[tuple, concurrent.futures.Future] = {}
        self._orders: dict[tuple, WindowOrder] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # --- the order -------------------------------------------------------------------------

    @property
    def train(self) -> np.ndarray:
        """The first source's training tokens (tests and tools; a view of every segment)."""
        return np.concatenate([np.asarray(s.tokens[s.lo : s.hi]) for s in self.streams["train"][0].segments])

    @property
    def val(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.tokens[s.lo : s.hi]) for s in self.streams["val"][0].segments])

    def first_sample(self, split: str, step: int, global_batch: int) -> int:
        if split == "train":
            return self.base_samples + (step - self.base_step) * global_batch
        return step * global_batch

    def windows(self, split: str, seq_len: int) -> list[int]:
        return [stream.windows(seq_len) for stream in self.streams[split]]

    def locate(self, split: str, g: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, epoch, window) of global samples ``g`` of ``split``."""
        source, k = self.mixtures[split].locate(g)
        epoch, window = np.empty_like(k), np.empty_like(k)
        for s in np.unique(source):
            sel = source == s
            epoch[sel], window[sel] = self._order(split, int(s), seq_len)(k[sel])
        return source, epoch, window

    def _order(self, split: str, source: int, seq_len: int) -> WindowOrder:
        key = (split, source, seq_len)
        order = self._orders.get(key)
        if order is None:
            w = self.streams[split][source].windows(seq_len)
            if w == 0:
                raise ValueError(
                    f"the {split} split of {self.names[split][source]} holds no window of {seq_len + 1} tokens"
                )
            order = self._orders[key] = WindowOrder(w, seed=self.seed, split=SPLITS[split], source=source)
        return order

    def _read(self, split: str, step: int, global_batch: int, seq_len: int, start: int, count: int) -> Batch:
        g = self.first_sample(split, step, global_batch) + start + np.arange(count, dtype=np.int64)
        source, _, window = self.locate(split, g, seq_len)
        rows, docs = [], []
        for s, w in zip(source.tolist(), window.tolist()):
            stream = self.streams[split][s]
            rows.append(stream.read(w * seq_len, seq_len + 1))
            if self.spec.document_mask:
                docs.append(stream.documents(w * seq_len, seq_len))
        window_CS = torch.from_numpy(np.stack(rows))
        if window_CS.numel() and int(window_CS.max()) >= self.vocab_size:
            row = int(window_CS.max(dim=1).values.argmax())
            raise DataError(
                f"token id {int(window_CS.max())} in the {split} data of {self.names[split][int(source[row])]} "
                f">= model.vocab_size={self.vocab_size}: its metadata's vocabulary does not hold its tokens; "
                "prepare it again (scripts/prepare_data.py)"
            )
        documents = torch.from_numpy(np.stack(docs)) if docs else None
        return Batch(window_CS[:, :-1], window_CS[:, 1:], documents)

    # --- batches, read ahead ---------------------------------------------------------------

    def micro_batch(self, split: str, step: int, *, global_batch: int, seq_len: int, start: int, count: int) -> Batch:
        """Samples [start, start+count) of global batch ``step`` of ``split``."""
        key = (split, step, global_batch, seq_len, start, count)
        future = self._ahead.pop(key, None)
        batch = future.result() if future is not None else self._read(*key)
        if split == "train" and self.spec.prefetch_steps > 0:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moemesh-data")
            for ahead in range(1, self.spec.prefetch_steps + 1):
                nxt = (split, step + ahead, global_batch, seq_len, start, count)
                if nxt not in self._ahead:
                    self._ahead[nxt] = self._pool.submit(self._read, *nxt)
        return batch

    def batch(self, split: str, step: int, *, global_batch: int, seq_len: int, start: int, count: int):
        """(inputs, targets) of ``micro_batch``."""
        b = self.micro_batch(split, step, global_batch=global_batch, seq_len=seq_len, start=start, count=count)
        return b.inputs, b.targets

    def close(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # --- the position a checkpoint records ---------------------------------------------------

    def position(self, step: int, *, global_batch: int, seq_len: int) -> dict:
        """Where the training order stands after ``step`` steps: what a checkpoint records."""
        g = self.first_sample("train", step, global_batch)
        windows = self.windows("train", seq_len)
        drawn = self.mixtures["train"].drawn(g)
        return {
            "samples": g,
            "step": step,
            "fingerprint": self.spec.fingerprint(seed=self.seed, seq_len=seq_len),
            "seq_len": seq_len,
            "sources": [
                {
                    "name": s.name,
                    "fingerprint": s.fingerprint,
                    "weight": s.weight,
                    "windows": w,
                    "samples": n,
                    "epoch": n // w if w else 0,
                    "window_in_epoch": n % w if w else 0,
                }
                for s, w, n in zip(self.spec.sources, windows, drawn)
            ],
        }

    def check_position(self, position: dict, *, seq_len: int) -> str | None:
        """None if a checkpoint's position fits this data; else why not (one line)."""
        return self.spec.position_problem(position, seed=self.seed, seq_len=seq_len)

    def resume_at(self, step: int, position: dict | None, *, seq_len: int) -> str:
        """Continue after ``step`` from a checkpoint's position (None: a checkpoint from before
        positions were recorded, whose runs read step s at sample s * global_batch)."""
        self.close()
        if position is None:
            self.base_samples, self.base_step = 0, 0
            return "no data position in the checkpoint: step s reads global samples from s x global_batch"
        if self.check_position(position, seq_len=seq_len) is not None:
            self.base_samples, self.base_step = 0, step  # resume_on_new_data: this data from its start
            return "new data: reading it from its first window"
        self.base_samples, self.base_step = int(position["samples"]), step
        parts = [
            f"{s['name']} epoch {s['epoch']} window {s['window_in_epoch']}/{s['windows']}" for s in position["sources"]
        ]
        return f"data resumed at global sample {self.base_samples:,} ({'; '.join(parts)})"
