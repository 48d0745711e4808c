"""From ``data.*`` to a ``DataSpec``, checked before any rank starts.

``check_data`` (every job of a command, before Hydra creates a directory) reads only
metadata and sizes; ``prepare_data`` (the job that runs) also builds the stdlib corpus if it
is not cached, checks the shards' sha256 once per file identity, and scans a memmap file's
largest id once. Every mistake is a ``ConfigError``: one line, exit 2 in train.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from moemesh.data.config import DataConfig
from moemesh.data.format import (
    META_NAME,
    CorpusMeta,
    ShardMeta,
    check_shard_sizes,
    meta_json,
    read_meta,
    verify_shards,
    write_shard,
)
from moemesh.data.format import _cache_dir as cache_dir
from moemesh.data.reader import SYNTHETIC_TOKENS, DataSpec, SourceSpec, Stream, _tokens_streams
from moemesh.errors import ConfigError

# The byte-level "tokenizer" of the stdlib corpus: ids are bytes.
BYTES_TOKENIZER = {"name": "bytes", "sha256": hashlib.sha256(b"moemesh bytes 0-255").hexdigest()}
STDLIB_SHARD_BYTES = 4 << 20  # stdlib files per shard: about 4 MiB (8-10 shards), each holding out its tail


# --- the stdlib corpus ----------------------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    """The stdlib's .py files, outside site-packages and caches, in path order. A walk that does
    not enter the skipped directories: every run lists them (the corpus's cache key), and
    ``rglob`` over all 13,000 entries took 0.4 s of each ``train.py``'s start."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for where, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        files += [Path(where, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_stdlib_corpus(cache: str | None) -> Path:
    """The stdlib's .py files (sorted), one document each, as a prepared directory of bytes; built
    once under the cache directory (concurrent builders each build and rename: one wins)."""
    files = _stdlib_files()
    digest = hashlib.sha1("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:12]
    root = cache_dir(cache)
    out = root / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{digest}.tokens"
    if (out / "moemesh-data.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}."))
    try:
        shards: list[ShardMeta] = []
        docs: list[np.ndarray] = []
        size = 0

        def flush():
            tokens = np.concatenate(docs).astype(np.uint16)
            offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.uint64)
            shards.append(write_shard(tmp, len(shards), tokens, offsets, "uint16"))

        for p in files:
            try:
                data = np.frombuffer(p.read_bytes(), dtype=np.uint8)
            except OSError:
                continue
            if len(data):
                docs.append(data)
                size += len(data)
            if size >= STDLIB_SHARD_BYTES:
                flush()
                docs, size = [], 0
        if docs:
            flush()
        (tmp / "moemesh-data.json").write_bytes(
            meta_json(
                tokenizer=BYTES_TOKENIZER,
                vocab_size=256,
                eos_id=None,
                special_ids={},
                shards=shards,
                extra={"sources": [{"path": str(Path(sysconfig.get_paths()["stdlib"])), "files": len(files)}]},
            )
        )
        try:
            os.rename(tmp, out)
        except OSError:  # another builder won
            if not (out / "moemesh-data.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- one uint16 file (data=memmap) ---------------------------------------------------------------


def _check_token_file(key: str, path: str, min_tokens: int) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "no such file"
        if p.is_dir():
            prepared = (p / META_NAME).is_file()
            what = (
                f"a directory prepared by scripts/prepare_data.py: use data=tokens data.path={path}"
                if prepared
                else "a directory"
            )
        elif p.exists():
            what = "not a regular file (a FIFO, socket or device)"
        raise ConfigError(f"{key}={path}: {what} (data=memmap reads one uint16 token .bin file)")
    n = p.stat().st_size // 2
    if n < min_tokens:
        raise ConfigError(f"{key}={path} holds {n} tokens; need at least seq_len+1 = {min_tokens}")


def _check_split(key: str, n: int, val_fraction: float, need: int) -> None:
    n_val = int(n * val_fraction)
    n_train = n - n_val
    if min(n_train, n_val) < need:
        raise ConfigError(
            f"{key} holds {n} tokens: with data.val_fraction={val_fraction} the train/validation splits have "
            f"{n_train}/{n_val} tokens; each needs at least seq_len+1 = {need}"
        )


def max_token_id(path: str) -> int:
    """The largest token id in a uint16 file: read in full once (GB/s from the page cache),
    then remembered under the cache directory by (path, size, mtime), so a requeued or
    repeated run does not read it again."""
    p = Path(path).resolve()
    st = p.stat()
    ident = f"{p}:{st.st_size}:{st.st_mtime_ns}"
    memo = cache_dir() / "token-max" / f"{hashlib.sha1(ident.encode()).hexdigest()[:16]}.txt"
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


def _file_identity(path: str) -> str:
    st = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


# --- prepared directories (data=tokens) ----------------------------------------------------------


def _sources(cfg: DataConfig) -> list[tuple[str, str, float]]:
    """(key, path, weight) of each training source of data=tokens."""
    if cfg.sources:
        return [(f"data.sources[{i}].path", s.path, float(s.weight)) for i, s in enumerate(cfg.sources)]
    if not cfg.path:
        raise ConfigError(
            "data=tokens needs data.path=DIR (written by scripts/prepare_data.py) or "
            "data.sources=[{path: DIR, weight: W}, ...]"
        )
    return [("data.path", cfg.path, 1.0)]


def _check_corpus(key: str, meta: CorpusMeta, vocab_size: int) -> None:
    if meta.vocab_size > vocab_size:
        raise ConfigError(
            f"{key}={meta.path} was tokenised by {meta.tokenizer_name} with {meta.vocab_size:,} token ids, more than "
            f"model.vocab_size={vocab_size:,} can embed; valid: model.vocab_size >= {meta.vocab_size}"
        )


def _check_windows(what: str, stream: Stream, seq_len: int, hint: str) -> None:
    if stream.windows(seq_len) < 1:
        raise ConfigError(f"{what} holds {stream.n} tokens; need at least seq_len+1 = {seq_len + 1}{hint}")


def _tokens_metas(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> list[tuple[str, CorpusMeta, float]]:
    """Every training source's metadata (and val_path's, weight 0), all checked."""
    metas = [(key, read_meta(path, key), weight) for key, path, weight in _sources(cfg)]
    if cfg.val_path:
        metas.append(("data.val_path", read_meta(cfg.val_path, "data.val_path"), 0.0))
    first_key, first, _ = metas[0]
    for key, meta, _ in metas:
        _check_corpus(key, meta, vocab_size)
        if meta.tokenizer_id != first.tokenizer_id:
            raise ConfigError(
                f"{key}={meta.path} was tokenised by {meta.tokenizer_name} (sha256 {meta.tokenizer_id[:12]}), "
                f"{first_key}={first.path} by {first.tokenizer_name} (sha256 {first.tokenizer_id[:12]}): the same "
                "ids would mean different text; prepare every source with one tokenizer"
            )
    if cfg.val_path:
        _check_held_out(metas)
    hold = 0.0 if cfg.val_path else cfg.val_fraction
    for key, meta, weight in metas:
        train, val = _tokens_streams(meta.path, hold if weight else 0.0, 0)
        _check_windows(f"{key}={meta.path} (its training documents)", train, seq_len, "")
        if weight and not cfg.val_path:
            _check_windows(
                f"{key}={meta.path}: the documents held out for validation (data.val_fraction={cfg.val_fraction}: "
                "the last documents of each shard, one shard's only document never)",
                val,
                seq_len,
                "; raise data.val_fraction, or set data.val_path to a prepared validation directory",
            )
    return metas


def _check_held_out(metas: list[tuple[str, CorpusMeta, float]]) -> None:
    """data.val_path shares no shard with a training source (a copy of it, or the same input
    prepared again): validation would measure the training data."""
    *train, (_, val, _) = metas
    held = {s.tokens_sha256 for s in val.shards}
    for key, meta, _ in train:
        shared = [s.tokens_file for s in meta.shards if s.tokens_sha256 in held]
        if shared:
            raise ConfigError(
                f"data.val_path={val.path} holds the same tokens as {key}={meta.path} ({shared[0]}, by sha256): "
                "validation would measure the training data; prepare a held-out corpus, or drop data.val_path "
                "to hold out data.val_fraction of each source"
            )


def check_data(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> DataSpec | None:
    """The checks of ``prepare_data`` that build and hash nothing: run for every job before any
    starts (on a SLURM login node, before the job is queued). Returns the ``DataSpec`` that
    ``prepare_data`` will return, which is what a checkpoint's data position is checked against;
    None for data=stdlib, whose corpus ``prepare_data`` builds."""
    need = seq_len + 1
    if cfg.kind == "synthetic":
        return _synthetic_spec(cfg, need, vocab_size)
    if cfg.kind == "memmap":
        _check_token_file("data.path", _memmap_path(cfg), need)
        if cfg.val_path:
            _check_token_file("data.val_path", cfg.val_path, need)
        return _memmap_spec(cfg, vocab_size)
    if cfg.kind == "tokens":
        return _tokens_spec(cfg, _tokens_metas(cfg, seq_len=seq_len, vocab_size=vocab_size), vocab_size)
    return None


def _memmap_path(cfg: DataConfig) -> str:
    if cfg.path is None:
        raise ConfigError("data.path is required for data.kind=memmap (a uint16 token .bin file)")
    return cfg.path


def _spec(cfg: DataConfig, kind: str, sources, val, vocab_size: int) -> DataSpec:
    return DataSpec(
        kind=kind,
        sources=tuple(sources),
        val=val,
        val_fraction=cfg.val_fraction,
        vocab_size=vocab_size,
        document_mask=cfg.document_mask,
        prefetch_steps=cfg.prefetch_steps,
        resume_on_new_data=cfg.resume_on_new_data,
    )


def _synthetic_spec(cfg: DataConfig, need: int, vocab_size: int) -> DataSpec:
    _check_split("data.kind=synthetic", SYNTHETIC_TOKENS, cfg.val_fraction, need)
    src = SourceSpec("synthetic", "synthetic", "", 1.0, f"synthetic:{vocab_size}")
    return _spec(cfg, "synthetic", [src], None, vocab_size)


def _tokens_spec(cfg: DataConfig, metas: list[tuple[str, CorpusMeta, float]], vocab_size: int) -> DataSpec:
    # _tokens_metas lists the training sources in order, then val_path's (weight 0).
    sources = [
        SourceSpec(path, "tokens", meta.path, weight, meta.sha256)
        for (_, path, weight), (_, meta, _) in zip(_sources(cfg), metas)
    ]
    val = None
    if cfg.val_path:
        vmeta = metas[-1][1]
        val = SourceSpec(cfg.val_path, "tokens", vmeta.path, 1.0, vmeta.sha256)
    return _spec(cfg, "tokens", sources, val, vocab_size)


def _memmap_spec(cfg: DataConfig, vocab_size: int) -> DataSpec:
    given = _memmap_path(cfg)
    train = str(Path(given).expanduser())
    val = None
    if cfg.val_path:
        vpath = str(Path(cfg.val_path).expanduser())
        val = SourceSpec(cfg.val_path, "bin", vpath, 1.0, _file_identity(vpath))
    return _spec(cfg, "memmap", [SourceSpec(given, "bin", train, 1.0, _file_identity(train))], val, vocab_size)


def prepare_data(cfg: DataConfig, *, seq_len: int, vocab_size: int) -> DataSpec:
    """Build or check the data before any rank starts; raise ConfigError on bad input."""
    need = seq_len + 1
    if cfg.kind == "synthetic":
        return _synthetic_spec(cfg, need, vocab_size)
    if cfg.kind == "stdlib":
        path = build_stdlib_corpus(cfg.cache_dir)
        meta = read_meta(path, "the stdlib corpus")
        verify_shards(meta, "the stdlib corpus", cfg.cache_dir)
        trains, held = _tokens_streams(str(path), cfg.val_fraction, 0)
        _check_windows(f"the stdlib corpus {path} (training files)", trains, seq_len, "")
        _check_windows(
            f"the stdlib corpus {path}: its files held out by data.val_fraction={cfg.val_fraction}",
            held,
            seq_len,
            "; raise data.val_fraction",
        )
        return _spec(cfg, "stdlib", [SourceSpec("stdlib", "tokens", str(path), 1.0, meta.sha256)], None, vocab_size)
    if cfg.kind == "tokens":
        metas = _tokens_metas(cfg, seq_len=seq_len, vocab_size=vocab_size)
        for key, meta, _ in metas:
            check_shard_sizes(meta, key)
            verify_shards(meta, key)
        return _tokens_spec(cfg, metas, vocab_size)
    train_path = _memmap_path(cfg)
    train = str(Path(train_path).expanduser())
    _check_token_file("data.path", train_path, need)
    if cfg.val_path:
        _check_token_file("data.val_path", cfg.val_path, need)
        _check_token_values("data.val_path", str(Path(cfg.val_path).expanduser()), vocab_size)
    else:
        _check_split(f"data.path={train_path}", Path(train).stat().st_size // 2, cfg.val_fraction, need)
    _check_token_values("data.path", train, vocab_size)
    return _memmap_spec(cfg, vocab_size)
