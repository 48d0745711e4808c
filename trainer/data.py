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

from conf.schema import ConfigError, DataConfig

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
    digest = hashlib.sha1(
        "\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()
    ).hexdigest()[:12]
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
        raise ConfigError(f"{key}={path} holds {n} tokens; need at least {min_tokens} (seq_len + 1 for train and val)")


def prepare_data(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> DataPaths:
    """Build or check the data before any rank starts; raise ConfigError on bad input."""
    if cfg.kind == "synthetic":
        return DataPaths("synthetic", None, None, cfg.val_fraction, vocab_size)
    if cfg.kind == "stdlib":
        path = str(build_stdlib_corpus(cfg.cache_dir))
        return DataPaths("stdlib", path, None, cfg.val_fraction, vocab_size)
    need = seq_len + 1
    if cfg.val_path:
        _check_token_file("data.path", cfg.path, need)
        _check_token_file("data.val_path", cfg.val_path, need)
    else:
        _check_token_file("data.path", cfg.path, int(np.ceil(need / min(cfg.val_fraction, 1 - cfg.val_fraction))))
    return DataPaths("memmap", str(Path(cfg.path).expanduser()), cfg.val_path, cfg.val_fraction, vocab_size)


class TokenData:
    """Train and validation token arrays (memory-mapped, read-only)."""

    def __init__(self, paths: DataPaths, *, seed: int):
        self.seed = seed
        if paths.kind == "synthetic":
            rng = np.random.default_rng(seed)
            tokens = rng.integers(0, paths.vocab_size, _SYNTHETIC_TOKENS, dtype=np.uint16)
        else:
            tokens = np.memmap(paths.train, dtype=np.uint16, mode="r")
        if paths.val:
            self.train, self.val = tokens, np.memmap(paths.val, dtype=np.uint16, mode="r")
        else:
            n_val = int(len(tokens) * paths.val_fraction)
            self.train, self.val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]

    def batch(self, split: str, step: int, *, global_batch: int, seq_len: int, start: int, count: int):
        """Samples [start, start+count) of global batch ``step``: inputs and targets [count, seq_len]."""
        tokens = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(self.seed * 7919 + (0 if split == "train" else 1) * 104729 + step)
        offsets = torch.randint(0, len(tokens) - seq_len - 1, (global_batch,), generator=g)[start : start + count]
        window = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets.tolist()])
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]
