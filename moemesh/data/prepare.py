"""Tokenise a corpus into shards (``scripts/prepare_data.py``): parallel, restartable, checked.

Inputs (``inputs``: text, jsonl, parquet, a saved datasets directory) are taken in the order
given, a directory's files sorted by name.

The plan: every input is cut into units that depend only on its bytes (byte ranges of
``--shard-mb`` aligned to lines, row groups, record batches, whole text files), and consecutive
units are grouped into pieces of at least ``--shard-mb`` of input; piece i becomes shard i.
Each shard is written atomically with a marker under ``OUT/.prepare/``; a prepare started again
on the same inputs and tokenizer keeps the shards it finds complete (size and sha256 as marked)
and makes the rest. Tokenisation is deterministic, so the shards are the same bytes as one
uninterrupted run's; the metadata is written last (no timestamps), the same bytes too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moemesh.data.format import (
    DTYPES,
    INDEX_DTYPE,
    MAX_META_BYTES,
    META_NAME,
    ShardMeta,
    atomic_write,
    dtype_for,
    meta_json,
    sha256_file,
    shard_names,
    write_shard,
)
from moemesh.data.inputs import Input, check_text_key, documents, find_inputs, plan_pieces
from moemesh.data.tokenizer import TokenizerInfo, load_tokenizer
from moemesh.errors import ConfigError
from moemesh.untrusted import read_json_object

PLAN_VERSION = 2  # 2: special tokens' text inside a document is encoded as text
ENCODE_BATCH = 512  # documents per encode_batch call


# --- workers --------------------------------------------------------------------------------------

_WORKER: dict = {}


def _die_with_parent() -> None:
    """A worker ends when the prepare that started it ends, however it ends (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_worker(backend_json: str, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(backend_json)
    # A special token's text inside a document ("<|endoftext|>" in a web page) is text, not the
    # special id: only the separator prepare puts between documents is EOS.
    tok.encode_special_tokens = True
    _WORKER["tok"] = tok


def encodedocuments(tok, texts: list[str], eos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts``, each followed by ``eos``; and the document lengths."""
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        n = len(x)
        out[pos : pos + n] = x
        out[pos + n] = eos
        pos += n + 1
    return out, lengths


def _piece(task) -> dict:
    """Tokenise piece ``index`` into shard ``index`` (run in a worker)."""
    index, units, inputs, key, eos, dtype_name, out_dir = task
    tok, dtype = _WORKER["tok"], DTYPES[dtype_name]
    chunks, lengths = [], []
    per_input: dict[int, list[int]] = {}  # input -> [documents, tokens]
    batch: list[str] = []

    def flush(i: int):
        if batch:
            t, n = encodedocuments(tok, batch, eos, dtype)
            chunks.append(t)
            lengths.append(n)
            stats = per_input.setdefault(i, [0, 0])
            stats[0] += len(n)
            stats[1] += int(n.sum())
            batch.clear()

    for u in units:
        inp = inputs[u.input]
        for text in documents(inp, u.a, u.b, key):
            if text:
                batch.append(text)
                if len(batch) >= ENCODE_BATCH:
                    flush(u.input)
        flush(u.input)
        per_input.setdefault(u.input, [0, 0])
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)
    n = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(INDEX_DTYPE)
    out = Path(out_dir)
    shard = write_shard(out, index, tokens, offsets, dtype_name)
    marker = {"shard": shard.as_json(), "inputs": {str(i): v for i, v in sorted(per_input.items())}}
    atomic_write(out / ".prepare" / f"piece_{index:06d}.json", json.dumps(marker).encode())
    return {"index": index, "bytes": sum(u.bytes for u in units)}


def _hash_input(task) -> tuple[int, str]:
    i, path = task
    return i, sha256_file(Path(path))


# --- the command ----------------------------------------------------------------------------------


def _shard_ok(out: Path, index: int) -> ShardMeta | None:
    """Piece ``index``'s shard, if a marker says it is complete and the files agree (size, sha256)."""
    marker = out / ".prepare" / f"piece_{index:06d}.json"
    try:
        s = read_json_object(marker, 1 << 20, "marker")["shard"]
        shard = ShardMeta(
            s["tokens_file"], s["index_file"], s["tokens"], s["documents"], s["tokens_sha256"], s["index_sha256"]
        )
    except (ConfigError, KeyError, TypeError):
        return None
    if (shard.tokens_file, shard.index_file) != shard_names(index):
        return None
    for name, want in ((shard.tokens_file, shard.tokens_sha256), (shard.index_file, shard.index_sha256)):
        p = out / name
        if not p.is_file() or sha256_file(p) != want:
            return None
    return shard


def _refuse_other(out: Path, plan: dict) -> None:
    """An output directory holding another tokenizer's (or other inputs') shards is refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out} is a file, not a directory; name a new or prepared directory")
    for name in (META_NAME, ".prepare/plan.json"):
        p = out / name
        if not p.exists():
            continue
        try:
            other = read_json_object(p, MAX_META_BYTES, f"--out={out}")
        except ConfigError:
            raise ConfigError(
                f"--out={out}: {name} is not a JSON object: not a directory of this tool's; use another --out"
            ) from None
        tok = other.get("tokenizer")
        tok = tok if isinstance(tok, dict) else {}
        if tok.get("sha256") != plan["tokenizer"]["sha256"]:
            raise ConfigError(
                f"--out={out} holds shards of another tokenizer ({tok.get('name')}, sha256 "
                f"{str(tok.get('sha256'))[:12]}), not of {plan['tokenizer']['name']} (sha256 "
                f"{plan['tokenizer']['sha256'][:12]}); use another --out or remove it"
            )
        if name == ".prepare/plan.json" and other != plan:
            raise ConfigError(
                f"--out={out} holds an unfinished prepare of other inputs or options; run that command again to "
                "finish it, or use another --out"
            )
    if out.exists() and not (out / META_NAME).exists() and not (out / ".prepare").exists():
        if any(out.iterdir()):
            raise ConfigError(f"--out={out} exists and holds files that are not a prepared corpus; use another --out")


def _check_options(inputs: list[str], out: str, workers: int, shard_mb: float) -> None:
    """The command's options, before a tokenizer is loaded or a file made."""
    cpus = os.cpu_count() or 1
    if not 1 <= workers <= 4 * cpus:
        raise ConfigError(
            f"--workers={workers} must be 1 to {4 * cpus} (processes, one core each; this machine has {cpus})"
        )
    if not out or not str(out).strip():
        raise ConfigError("--out is empty; give the directory to write")
    if any(not str(i).strip() for i in inputs):
        raise ConfigError("--input holds an empty path; give files or directories")
    if len(set(inputs)) < len(inputs):
        twice = next(i for i in inputs if inputs.count(i) > 1)
        raise ConfigError(f"--input={twice} is given twice; each input is tokenised once")
    if not 0 < shard_mb < 2**40:
        raise ConfigError(f"--shard-mb={shard_mb} must be a number of MiB > 0, e.g. 64")


def prepare(
    *,
    tokenizer: str,
    inputs: list[str],
    out: str,
    text_key: str = "text",
    workers: int = 1,
    shard_mb: float = 64.0,
    split: str = "train",
    eos_token: str | None = None,
    progress: bool = True,
) -> Path:
    """Tokenise ``inputs`` into ``out`` (see the module docstring); returns ``out``."""
    _check_options(inputs, out, workers, shard_mb)
    shard_bytes = max(1, int(shard_mb * 2**20))
    info = load_tokenizer(tokenizer, eos_token=eos_token)
    found = find_inputs(inputs, split)
    for inp in found:
        check_text_key(inp, text_key)
    pieces = plan_pieces(found, shard_bytes)
    dtype = dtype_for(info.vocab_size)
    plan = {
        "version": PLAN_VERSION,
        "tokenizer": info.as_meta(),
        "eos_id": info.eos_id,
        "text_key": text_key,
        "shard_bytes": shard_bytes,
        "inputs": [asdict(i) for i in found],
        "pieces": len(pieces),
    }
    root = Path(out).expanduser()
    _refuse_other(root, plan)
    if (root / META_NAME).exists():
        meta = read_json_object(root / META_NAME, MAX_META_BYTES, f"--out={out}")
        if meta.get("prepared_from") == _identity(plan):
            print(f"prepare_data: {out} is already prepared from these inputs; nothing to do", file=sys.stderr)
            return root
        raise ConfigError(f"--out={out} holds a corpus prepared from other inputs or options; use another --out")
    work = root / ".prepare"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, a read-only or missing mount
        raise ConfigError(f"--out={out}: cannot make {work}: {err.strerror or err}") from None
    lock = open(work / "lock", "w")  # noqa: SIM115 (held for the whole prepare)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ConfigError(f"--out={out}: another prepare is writing it now") from None
    try:
        if not (work / "plan.json").exists():
            atomic_write(work / "plan.json", json.dumps(plan, indent=1).encode())
        for p in root.glob(".shard_*.tmp"):
            p.unlink(missing_ok=True)
        done = {i: s for i in range(len(pieces)) if (s := _shard_ok(root, i)) is not None}
        todo = [
            (i, pieces[i], found, text_key, info.eos_id, dtype, str(root)) for i in range(len(pieces)) if i not in done
        ]
        hashes = _run(info, todo, found, workers, progress, skipped=len(done), total=len(pieces))
        markers = [json.loads((work / f"piece_{i:06d}.json").read_text()) for i in range(len(pieces))]
        shards = [_shard_ok(root, i) for i in range(len(pieces))]
        if any(s is None for s in shards):
            raise ConfigError(f"--out={out}: a shard changed while it was being prepared; run the command again")
        sources = _sources(found, markers, hashes, text_key)
        data = meta_json(
            tokenizer=info.as_meta(),
            vocab_size=info.vocab_size,
            eos_id=info.eos_id,
            special_ids=info.special_ids,
            shards=[s for s in shards if s is not None],
            extra={"text_key": text_key, "sources": sources, "prepared_from": _identity(plan)},
        )
        atomic_write(root / META_NAME, data)
    finally:
        lock.close()
    shutil.rmtree(work, ignore_errors=True)
    return root


def _sources(found: list[Input], markers: list[dict], hashes: list[str], text_key: str) -> list[dict]:
    """Each input's entry of the metadata (path, bytes, sha256, documents, tokens), summed over the
    pieces' markers. An input without a document is a warning (it adds nothing; refusing it only
    now, after the others were tokenised, would lose that work); a corpus without one, an error."""
    per_input = [[0, 0] for _ in found]
    for m in markers:
        for i, (docs, toks) in m["inputs"].items():
            per_input[int(i)][0] += docs
            per_input[int(i)][1] += toks
    empty = [inp.given for inp, (docs, _) in zip(found, per_input) if docs == 0]
    if len(empty) == len(found):
        raise ConfigError(f"--input={empty[0]}: no documents (every {text_key!r} is empty, or no lines)")
    for given in empty:
        print(
            f"prepare_data: warning: --input={given}: no documents (every {text_key!r} is empty); it adds nothing",
            file=sys.stderr,
        )
    return [
        {"path": inp.given, "bytes": inp.size, "sha256": hashes[i], "documents": d, "tokens": t}
        for i, (inp, (d, t)) in enumerate(zip(found, per_input))
    ]


def _identity(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _run(
    info: TokenizerInfo, todo: list, inputs: list[Input], workers: int, progress: bool, *, skipped: int, total: int
):
    """Tokenise the pieces left and hash every input, over ``workers`` processes; returns the hashes."""
    from tqdm import tqdm

    # One core per worker: the tokenizers library would otherwise run its own threads in each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    todo_bytes = sum(sum(u.bytes for u in t[1]) for t in todo)
    hash_bytes = sum(i.size for i in inputs)
    bar = tqdm(
        total=todo_bytes + hash_bytes,
        unit="B",
        unit_scale=True,
        desc=f"prepare ({total - skipped} of {total} shards to make)",
        disable=not progress,
        file=sys.stderr,
        leave=False,  # cleared at the end: an error after it stays one line
    )
    hashes: dict[int, str] = {}
    ctx = multiprocessing.get_context("spawn")
    # An executor, not a multiprocessing.Pool: a worker that dies (the OOM killer, a crash in a
    # native reader) breaks the executor and every pending result raises, where a Pool waits on
    # its lost task forever.
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(info.backend_json, os.getpid())
    )
    try:
        pending_hashes = [pool.submit(_hash_input, (i, inp.path)) for i, inp in enumerate(inputs)]
        for done in as_completed([pool.submit(_piece, task) for task in todo]):
            bar.update(done.result()["bytes"])
        for future in pending_hashes:
            i, h = future.result()
            hashes[i] = h
            bar.update(inputs[i].size)
    except BaseException as err:
        # An error (a bad input, Ctrl-C) ends the run now, as a Pool's exit did: the workers are
        # stopped, not waited on through the pieces they hold (the executor has no terminate).
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        if isinstance(err, BrokenProcessPool):
            raise ConfigError(
                "a prepare worker died (killed, out of memory, or a crash reading an input); the shards it had "
                "not finished were not kept: rerun the same command to continue, with fewer --workers if memory "
                "ran out"
            ) from None
        raise
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    return hashes
