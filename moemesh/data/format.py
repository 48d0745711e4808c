"""A prepared corpus on disk, and how it is read back without trusting it.

A directory holds:
- ``moemesh-data.json``: the metadata (``CorpusMeta``): format and version, the tokenizer's
  name and identity hash, vocab size, token dtype, special ids, token and document counts,
  each source file with its size and sha256, and each shard with its sizes and sha256s;
- ``shard_NNNNNN.tok``: token ids, uint16 when the vocabulary fits (ids < 65,536), else uint32;
- ``shard_NNNNNN.idx``: uint64 document offsets into that shard, ``n_docs + 1`` of them
  (0 first, the shard's token count last): document d is tokens ``[idx[d], idx[d+1])``, its
  separator (EOS) included.

Every file is untrusted: the metadata is size-bounded before it is parsed and checked field by
field; shard names must match the pattern (no path leaves the directory); only regular files are
opened; a shard's size is checked against the metadata on every open, and its sha256 once per
file identity (``verify_shards``, remembered under the cache directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moemesh.errors import ConfigError
from moemesh.untrusted import read_bounded, regular_file

META_NAME = "moemesh-data.json"
FORMAT = "moemesh-tokens"
VERSION = 1
# The metadata of a 100 GB corpus is about a megabyte (a shard is ~300 bytes of JSON, a source
# file ~200): this bound leaves room for 300,000 source files and refuses anything stranger.
# Parsed JSON can take ~27x its bytes (a file of [[],[],...]), so the bound is also the memory a
# hostile file can cost before its fields are checked: ~1.7 GB here (7 GB at 256 MiB, before).
MAX_META_BYTES = 64 * 2**20
_SHARD = re.compile(r"shard_(\d{6})\.(tok|idx)")
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
INDEX_DTYPE: np.dtype = np.dtype("<u8")


def dtype_for(vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size={vocab_size} does not fit uint32 token ids")


def shard_names(i: int) -> tuple[str, str]:
    return f"shard_{i:06d}.tok", f"shard_{i:06d}.idx"


@dataclass(frozen=True)
class ShardMeta:
    tokens_file: str
    index_file: str
    n_tokens: int
    n_docs: int
    tokens_sha256: str
    index_sha256: str

    def as_json(self) -> dict:
        return {
            "tokens_file": self.tokens_file,
            "index_file": self.index_file,
            "tokens": self.n_tokens,
            "documents": self.n_docs,
            "tokens_sha256": self.tokens_sha256,
            "index_sha256": self.index_sha256,
        }


@dataclass(frozen=True)
class CorpusMeta:
    """A prepared directory's metadata, checked (``read_meta``)."""

    path: str  # the directory
    vocab_size: int
    dtype: str
    eos_id: int | None
    tokenizer: dict  # name, sha256 (the identity of the ids it produces), class, files
    n_tokens: int
    n_docs: int
    shards: tuple[ShardMeta, ...]
    sha256: str  # of the metadata file itself: the corpus's fingerprint

    @property
    def tokenizer_id(self) -> str:
        return str(self.tokenizer.get("sha256", ""))

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.get("name", "?"))


def _int(meta: dict, key: str, where: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _sha(meta: dict, key: str, where: str) -> str:
    v = meta.get(key)
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ConfigError(f"{where}: '{key}' must be a sha256 hex digest, got {v!r}")
    return v


def _shards(meta: dict, where: str) -> list[ShardMeta]:
    """The metadata's shard entries, each checked: files named by their index, counts, digests."""
    shards_raw = meta.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise ConfigError(f"{where}: 'shards' must be a non-empty list")
    shards = []
    for i, s in enumerate(shards_raw):
        w = f"{where}: shards[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{w} must be an object")
        names = shard_names(i)
        if (s.get("tokens_file"), s.get("index_file")) != names:
            raise ConfigError(f"{w}: files must be {names[0]} and {names[1]}, got {s.get('tokens_file')!r}")
        shards.append(
            ShardMeta(
                names[0],
                names[1],
                _int(s, "tokens", w),
                _int(s, "documents", w),
                _sha(s, "tokens_sha256", w),
                _sha(s, "index_sha256", w),
            )
        )
    return shards


def read_meta(directory: str | Path, key: str = "data.path") -> CorpusMeta:
    """The checked metadata of a prepared directory; ConfigError (one line) on anything wrong,
    including a shard whose size is not the metadata's."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise ConfigError(
            f"{key}={directory}: not a directory (expected one written by scripts/prepare_data.py, holding {META_NAME})"
        )
    path = d / META_NAME
    if not path.exists():
        hint = " (a prepare that has not finished: run it again to continue)" if (d / ".prepare").is_dir() else ""
        raise ConfigError(f"{key}={directory}: no {META_NAME}: not a prepared corpus{hint}")
    raw = read_bounded(path, MAX_META_BYTES, key)
    where = f"{key}={directory}: {META_NAME}"
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{where} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{where}: not a {FORMAT} metadata file")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{where}: version {meta.get('version')!r}; this moemesh reads version {VERSION}")
    vocab = _int(meta, "vocab_size", where, 1, 2**32)
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise ConfigError(f"{where}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype].itemsize == 2 and vocab > 1 << 16:
        raise ConfigError(f"{where}: vocab_size={vocab} does not fit dtype {dtype}")
    eos = meta.get("eos_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < vocab):
        raise ConfigError(f"{where}: 'eos_id' must be null or an id below vocab_size={vocab}, got {eos!r}")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("sha256"), str) or not isinstance(tok.get("name"), str):
        raise ConfigError(f"{where}: 'tokenizer' must hold a name and a sha256")
    shards = _shards(meta, where)
    n_tokens = _int(meta, "tokens", where)
    n_docs = _int(meta, "documents", where)
    if n_tokens != sum(s.n_tokens for s in shards) or n_docs != sum(s.n_docs for s in shards):
        raise ConfigError(f"{where}: 'tokens'/'documents' are not the sums over its shards")
    out = CorpusMeta(
        path=str(d),
        vocab_size=vocab,
        dtype=dtype,
        eos_id=eos,
        tokenizer=tok,
        n_tokens=n_tokens,
        n_docs=n_docs,
        shards=tuple(shards),
        sha256=hashlib.sha256(raw).hexdigest(),
    )
    check_shard_sizes(out, key)
    return out


def check_shard_sizes(meta: CorpusMeta, key: str = "data.path") -> None:
    """Every shard is a regular file of the size its metadata says (a stat each: always affordable)."""
    item = DTYPES[meta.dtype].itemsize
    for s in meta.shards:
        for name, want in ((s.tokens_file, s.n_tokens * item), (s.index_file, (s.n_docs + 1) * INDEX_DTYPE.itemsize)):
            p = Path(meta.path) / name
            if not p.exists():
                raise ConfigError(f"{key}={meta.path}: shard {name} is missing")
            got = regular_file(p, f"{key}={meta.path}").st_size
            if got != want:
                raise ConfigError(
                    f"{key}={meta.path}: shard {name} is {got:,} bytes, its metadata says {want:,}: "
                    "corrupt or truncated; prepare the corpus again"
                )


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cache_dir(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MOEMESH_CACHE") or Path.home() / ".cache" / "moemesh").expanduser()


def verify_shards(meta: CorpusMeta, key: str = "data.path", cache_dir: str | None = None) -> int:
    """Check every shard's sha256 against the metadata, once per file identity (path, size,
    mtime, expected hash): a verified file is remembered under the cache directory, so a
    requeued or repeated run reads nothing again. Returns the bytes hashed now.

    Cost: sha256 reads at about 1-2 GB/s on one core, so a 100 GB corpus costs one to two
    minutes once, before its first run starts; a file changed since (new mtime) is hashed again.
    Sizes are checked on every open (``check_shard_sizes``)."""
    memo_dir = _cache_dir(cache_dir) / "verified"
    hashed = 0
    for s in meta.shards:
        for name, want in ((s.tokens_file, s.tokens_sha256), (s.index_file, s.index_sha256)):
            p = (Path(meta.path) / name).resolve()
            st = regular_file(p, f"{key}={meta.path}")
            ident = f"{p}:{st.st_size}:{st.st_mtime_ns}:{want}"
            memo = memo_dir / hashlib.sha256(ident.encode()).hexdigest()[:32]
            try:
                if memo.read_text() == ident:
                    continue
            except OSError:
                pass
            got = sha256_file(p)
            hashed += st.st_size
            if got != want:
                raise ConfigError(
                    f"{key}={meta.path}: shard {name} has sha256 {got[:16]}..., its metadata says {want[:16]}...: "
                    "corrupt; prepare the corpus again"
                )
            if name == s.index_file:
                _check_offsets(p, s, f"{key}={meta.path}")
            try:
                memo_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(memo, ident.encode())
            except OSError:  # a read-only cache: hashed again next time
                pass
    return hashed


def _check_offsets(path: Path, shard: ShardMeta, where: str, chunk: int = 1 << 22) -> None:
    """A shard's document index as the reader relies on it: 0 first, the shard's token count
    last, never decreasing (its sha256 matching the metadata says only that the two agree).
    Read in chunks of ``chunk`` offsets, once per file identity with the hash."""
    offsets = np.memmap(path, dtype=INDEX_DTYPE, mode="r", shape=(shard.n_docs + 1,))
    if int(offsets[0]) != 0 or int(offsets[-1]) != shard.n_tokens:
        raise ConfigError(
            f"{where}: shard {path.name} starts at offset {int(offsets[0])} and ends at {int(offsets[-1])}, "
            f"not 0 and its {shard.n_tokens} tokens: corrupt; prepare the corpus again"
        )
    for a in range(0, shard.n_docs, chunk):
        piece = np.asarray(offsets[a : a + chunk + 1])
        bad = np.flatnonzero(piece[1:] < piece[:-1])
        if bad.size:
            d = a + int(bad[0])
            raise ConfigError(
                f"{where}: shard {path.name}: document {d + 1} starts at {int(piece[bad[0] + 1])}, before "
                f"document {d} ({int(piece[bad[0]])}): the offsets must not decrease; corrupt, prepare the corpus again"
            )


def process_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o077  # unknown: private, as before


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temp file in the same directory, renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(
            fd, 0o666 & ~process_umask()
        )  # mkstemp's file is 0600: a corpus is as readable as the shell makes files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_shard(directory: Path, i: int, tokens: np.ndarray, offsets: np.ndarray, dtype: str) -> ShardMeta:
    """Write shard ``i`` (tokens and document offsets) atomically; return its metadata entry."""
    tok_name, idx_name = shard_names(i)
    tok_bytes = np.ascontiguousarray(tokens, dtype=DTYPES[dtype]).tobytes()
    idx_bytes = np.ascontiguousarray(offsets, dtype=INDEX_DTYPE).tobytes()
    atomic_write(directory / tok_name, tok_bytes)
    atomic_write(directory / idx_name, idx_bytes)
    return ShardMeta(
        tok_name,
        idx_name,
        len(tokens),
        len(offsets) - 1,
        hashlib.sha256(tok_bytes).hexdigest(),
        hashlib.sha256(idx_bytes).hexdigest(),
    )


def meta_json(
    *, tokenizer: dict, vocab_size: int, eos_id: int | None, special_ids: dict, shards: list[ShardMeta], extra: dict
) -> bytes:
    """The metadata file's bytes: deterministic (no timestamps), so the same inputs give the same file."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "dtype": dtype_for(vocab_size),
        "eos_id": eos_id,
        "special_ids": special_ids,
        "tokens": sum(s.n_tokens for s in shards),
        "documents": sum(s.n_docs for s in shards),
        **extra,
        "shards": [s.as_json() for s in shards],
    }
    return (json.dumps(meta, indent=1, sort_keys=False) + "\n").encode()
