"""Token data: the embedded stdlib corpus, a user's memmap file, or synthetic tokens.

Sampling is by global sample index: step s of the global batch holds samples
s*G .. s*G+G-1, each a window at an offset drawn from (seed, split, step). A
data rank takes its contiguous slice of those G samples, so every layout sees
the same global batch in the same order.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moemesh.config.schema import DataConfig
from moemesh.errors import ConfigError
from moemesh.fields import DataKind

_SYNTHETIC_TOKENS = 1 << 20


@dataclass(frozen=True)
class DataPaths:
    """What a rank needs to open the data; made by ``prepare_data`` before ranks start."""

    kind: str
    train: str | None
    val: str | None
    val_fraction: float
    vocab_size: int


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_stdlib_corpus(cache_dir: str | None) -> Path:
    """Concatenate the stdlib's .py files (sorted) into a uint16 byte file, once."""
    cache = Path(cache_dir or os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh").expanduser()
    files = _stdlib_files()
    digest = hashlib.sha1("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:12]
    out = cache / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{digest}.bin"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    chunks = []
    for p in files:
        try:
            chunks.append(np.frombuffer(p.read_bytes(), dtype=np.uint8))
        except OSError:
            continue
    data = np.concatenate(chunks).astype(np.uint16)
    # Atomic: concurrent builders (ranks under torchrun) each write a temp file and rename.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        data.tofile(f)
    os.replace(tmp, out)
    return out


def _check_token_file(key: str, path: str, min_tokens: int) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file (expected a uint16 token .bin file)")
    n = p.stat().st_size // 2
    if n < min_tokens:
        raise ConfigError(f"{key}={path} holds {n} tokens; need at least seq_len+1 = {min_tokens}")


def _split(n: int, val_fraction: float) -> tuple[int, int]:
    n_val = int(n * val_fraction)
    return n - n_val, n_val


def _check_split(key: str, n: int, val_fraction: float, need: int) -> None:
    n_train, n_val = _split(n, val_fraction)
    if min(n_train, n_val) < need:
        raise ConfigError(
            f"{key} holds {n} tokens: with data.val_fraction={val_fraction} the train/validation splits have "
            f"{n_train}/{n_val} tokens; each needs at least seq_len+1 = {need}"
        )


def _cache_dir() -> Path:
    return Path(os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh").expanduser()


def max_token_id(path: str) -> int:
    """The largest token id in a uint16 file: read in full once (GB/s from the page cache),
    then remembered under the cache directory by (path, size, mtime), so a requeued or
    repeated run does not read it again."""
    p = Path(path).resolve()
    st = p.stat()
    ident = f"{p}:{st.st_size}:{st.st_mtime_ns}"
    memo = _cache_dir() / "token-max" / f"{hashlib.sha1(ident.encode()).hexdigest()[:16]}.txt"
    try:
        key, value = memo.read_text().split("\t")
        if key == ident:
            return int(value)
    except (OSError, ValueError):
        pass
    tokens = np.memmap(p, dtype=np.uint16, mode="r")
    chunk = 1 << 26  # tokens per read (128 MiB)
    top = max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(f"{ident}\t{top}")
        os.replace(tmp, memo)
    except OSError:  # a read-only home: check again next time
        pass
    return top


def _check_token_values(key: str, path: str, vocab_size: int) -> None:
    """Token ids must index the embedding: every one is checked before any rank starts (a bad
    id found at step N would end a long run there); each batch is checked again when read."""
    top = max_token_id(path)
    if top >= vocab_size:
        raise ConfigError(
            f"{key}={path} holds token id {top} >= model.vocab_size={vocab_size}; valid: "
            f"model.vocab_size >= {top + 1}, or a file tokenised for this vocabulary"
        )


def _memmap_path(cfg: DataConfig) -> str:
    """data.path of a memmap source (config validation requires it; checked again here)."""
    if cfg.path is None:
        raise ConfigError("data.path is required for data.kind=memmap (a uint16 token .bin file)")
    return cfg.path


def check_data(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> None:
    """The checks of ``prepare_data`` that build nothing: run for every job before any starts."""
    if cfg.kind == DataKind.memmap:
        need = seq_len + 1
        _check_token_file("data.path", _memmap_path(cfg), need)
        if cfg.val_path:
            _check_token_file("data.val_path", cfg.val_path, need)


def prepare_data(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> DataPaths:
    """Build or check the data before any rank starts; raise ConfigError on bad input."""
    need = seq_len + 1
    if cfg.kind == DataKind.synthetic:
        if vocab_size > 65536:
            raise ConfigError(f"model.vocab_size={vocab_size} > 65536 does not fit uint16 tokens (data.kind=synthetic)")
        _check_split("data.kind=synthetic", _SYNTHETIC_TOKENS, cfg.val_fraction, need)
        return DataPaths("synthetic", None, None, cfg.val_fraction, vocab_size)
    if cfg.kind == DataKind.stdlib:
        path = build_stdlib_corpus(cfg.cache_dir)
        _check_split(f"the stdlib corpus {path}", path.stat().st_size // 2, cfg.val_fraction, need)
        return DataPaths("stdlib", str(path), None, cfg.val_fraction, vocab_size)
    train_path = _memmap_path(cfg)
    train = str(Path(train_path).expanduser())
    _check_token_file("data.path", train_path, need)
    if cfg.val_path:
        _check_token_file("data.val_path", cfg.val_path, need)
        _check_token_values("data.val_path", str(Path(cfg.val_path).expanduser()), vocab_size)
    else:
        _check_split(f"data.path={train_path}", Path(train).stat().st_size // 2, cfg.val_fraction, need)
    _check_token_values("data.path", train, vocab_size)
    val = str(Path(cfg.val_path).expanduser()) if cfg.val_path else None
    return DataPaths("memmap", train, val, cfg.val_fraction, vocab_size)


class TokenData:
    """Train and validation token arrays (memory-mapped, read-only)."""

    def __init__(self, paths: DataPaths, *, seed: int):
        self.seed = seed
        tokens: np.ndarray  # uint16 token ids: in memory (synthetic) or a read-only memmap
        if paths.kind == DataKind.synthetic:
            rng = np.random.default_rng(seed)
            tokens = rng.integers(0, paths.vocab_size, _SYNTHETIC_TOKENS, dtype=np.uint16)
        else:
            assert paths.train is not None, "prepare_data gives every file-backed source a train path"
            tokens = np.memmap(paths.train, dtype=np.uint16, mode="r")
        self.vocab_size = paths.vocab_size
        self.train: np.ndarray
        self.val: np.ndarray
        if paths.val:
            self.train, self.val = tokens, np.memmap(paths.val, dtype=np.uint16, mode="r")
        else:
            n_train, _ = _split(len(tokens), paths.val_fraction)
            self.train, self.val = tokens[:n_train], tokens[n_train:]

    def batch(self, split: str, step: int, *, global_batch: int, seq_len: int, start: int, count: int):
        """Samples [start, start+count) of global batch ``step``: inputs and targets [count, seq_len]."""
        tokens = self.train if split == "train" else self.val
        # Reduced into the generator's range (0 .. 2**64-1): any valid trainer.seed, any step count
        # (unchanged below it, so earlier runs keep their data order).
        g = torch.Generator().manual_seed((self.seed * 7919 + (0 if split == "train" else 1) * 104729 + step) % 2**64)
        # A window of seq_len+1 tokens starts anywhere in [0, len - seq_len - 1].
        offsets = torch.randint(0, len(tokens) - seq_len, (global_batch,), generator=g)[start : start + count]
        rows = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets.tolist()])
        if rows.size and int(rows.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(rows.max())} in the {split} data >= model.vocab_size={self.vocab_size}")
        window = torch.from_numpy(rows)
        return window[:, :-1], window[:, 1:]
