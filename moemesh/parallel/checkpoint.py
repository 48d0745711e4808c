"""Distributed checkpoints that reshard across layouts (torch.distributed.checkpoint).

Every tensor is saved under a global key, never a rank's local one, so a checkpoint saved
under one layout (EP, TP, PP degrees) loads under another; the keys are listed in
``checkpoint_state``. Loading fills the live tensors in place.

A save is atomic: all ranks write ``step_N.tmp/``; then rank 0 writes ``meta.json`` and
renames the directory. A directory without ``meta.json`` or with the ``.tmp`` suffix is
never picked, and the previous checkpoint survives a crash or a failed save (whose
``.tmp`` is removed). Checkpoints are ordered by their step number, never by name (step
999999 comes before step 1000000); a checkpoint directory is ``step_`` and ASCII digits,
a real directory (not a symlink) holding a regular ``meta.json``. A model with a
non-finite value is never saved.

Who owns a directory: each save records the run that wrote it (``run_id``, new at every
start). A fresh run (no resume) is refused before its first step where checkpoints
already are (``owner_conflict``), since its saves would mix with an earlier run's; and
pruning keeps the last ``keep`` checkpoints preferring this run's own, so it never deletes
one it wrote in favour of one it did not write (a stray ``step_999999999999`` included).

The pieces: what is saved, keyed globally (``checkpoint_state``); how a checkpoint's files
are read as data only and checked against their checksums (``checkpoint_trust``, which
says why a checkpoint is safe to load). This module is a checkpoint directory's life:
the checks before the first step, the atomic save, the load, and which one to resume.
"""

from __future__ import annotations

import contextlib
import errno as errno_names
import json
import math
import os
import re
import shutil
import stat
import time
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from moemesh.errors import cause_of
from moemesh.parallel.checkpoint_files import FileRefused, read_file
from moemesh.parallel.checkpoint_state import (
    entry_bytes,
    init_optimizer_state,
    nonfinite_keys,
    optimizer_step,
    set_optimizer_step,
    training_state,
)
from moemesh.parallel.checkpoint_trust import (
    METADATA,
    CheckpointError,
    Limits,
    Planner,
    Reader,
    Writer,
    check_against_state,
    check_sizes,
    first_line,
    read_metadata,
    sha256,
    verify,
)

# The checkpoint API in one place, for the trainer (trainer/checkpointing.py) and tests.
__all__ = [
    "CheckpointError",
    "complete_checkpoints",
    "describe",
    "entry_bytes",
    "init_optimizer_state",
    "load",
    "nonfinite_keys",
    "optimizer_step",
    "owner_conflict",
    "read_meta",
    "preflight",
    "read_metadata",
    "remove_debris",
    "resolve",
    "save",
    "set_optimizer_step",
    "step_of",
    "training_state",
]

_DIR_PREFIX = "step_"
_STEP_DIR = re.compile(r"step_([0-9]+)", re.ASCII)  # not \d: it matches any script's digits (step_٣)
META_JSON_MAX = 1 << 20  # meta.json: ~1 KiB plus ~110 bytes per rank that saved (8,000 ranks: 0.9 MiB)
MAX_WORLD = 1 << 20  # the most ranks a meta.json may say saved it


def _all_gather(obj) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None) -> None:
    """Raise CheckpointError on every rank if any rank has an error (the lowest rank's), so
    no rank is left waiting in a collective the others skipped."""
    errors = [e for e in _all_gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def describe(err: BaseException, path: Path | None = None) -> str:
    """One line with the real cause: DCP's CheckpointException unwrapped to its first
    rank's error, an OSError with its errno name and the file."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, failure = min(err.failures.items())
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{describe(inner, path)}{f' (on rank {rank})' if dist.is_initialized() else ''}"
    if isinstance(err, OSError) and err.errno:
        where = err.filename or path
        return (
            f"{where}: [Errno {err.errno} {errno_names.errorcode.get(err.errno, '?')}] "
            f"{err.strerror or os.strerror(err.errno)}"
        )
    if isinstance(err, CheckpointError):
        return first_line(err)
    found = _in_chain(err, OSError)
    if isinstance(found, OSError) and found.errno:  # a full disk inside torch's zip writer: a RuntimeError
        return describe(found, path)
    return f"{type(err).__name__}: {first_line(err)}"


def _in_chain(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` among ``err``'s causes and contexts, or inside a DCP
    CheckpointException's failures (torch's writers turn an OSError or a KeyboardInterrupt into a
    RuntimeError that only names the zip position)."""
    if isinstance(err, CheckpointException):
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            found = inner if isinstance(inner, kind) else _in_chain(inner, kind)
            if found is not None:
                return found
        return None
    return cause_of(err, kind)


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory ``step_N`` (any number of digits), else None."""
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _is(path: Path, kind) -> bool:
    """``path`` is of ``kind`` (stat.S_ISDIR, S_ISREG) itself, not through a symlink."""
    try:
        return kind(os.lstat(path).st_mode)
    except OSError:
        return False


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: ordered by step number. Each is a
    real directory ``step_N`` (ASCII digits) holding a regular file meta.json."""
    if not root.is_dir():
        return []
    steps = {
        d: n
        for d in root.iterdir()
        if (n := step_of(d)) is not None and _is(d, stat.S_ISDIR) and _is(d / "meta.json", stat.S_ISREG)
    }
    return sorted(steps, key=steps.__getitem__)


def owner_conflict(root: Path, fix: str = "hydra.run.dir=<new dir>, or checkpoint.dir=<new dir>") -> str | None:
    """Why a fresh run (no resume) may not save into ``root``: it holds complete checkpoints
    of an earlier run, which would outrank this run's saves at pruning and at resume=auto.
    ``fix``: the settings that start fresh elsewhere."""
    try:
        kept = complete_checkpoints(Path(root))
    except OSError:  # unreadable: the write probe before the first step says so, in one line
        return None
    if not kept:
        return None
    return (
        f"{root} already holds {len(kept)} checkpoint(s) of an earlier run (the newest: {kept[-1].name}); "
        "a fresh run there would mix its saves with them: continue that run with resume=auto, or start "
        f"fresh in another directory ({fix})"
    )


def remove_debris(root: Path) -> list[Path]:
    """Remove half-written ``step_N.tmp`` directories (a crash or a failed save left them)."""
    gone = [d for d in root.glob(f"{_DIR_PREFIX}*.tmp") if d.is_dir() and step_of(d.with_suffix("")) is not None]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes a single process,
    which is exactly what a one-rank run is: silence that one warning, nothing else."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _probe(directory: Path, rank: int) -> str | None:
    """Create ``directory`` and a file in it, then remove the file; the error otherwise."""
    probe = directory / f".moemesh-probe-{rank}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"moemesh")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink()
        return describe(err, directory)
    return None


def preflight(root: Path, state: dict, *, rank: int, run_dir: Path | None = None, fresh: bool = False) -> int:
    """Before the first step, on every rank: refuse a ``fresh`` run (no resume, and it saves)
    into a directory that holds checkpoints (``owner_conflict``); remove ``.tmp`` debris
    (rank 0), check that ``root`` (and rank 0's ``run_dir``) can be written and hold one
    more checkpoint. Raises CheckpointError on every rank, one line naming the path,
    otherwise. Returns the estimated bytes of one checkpoint (every key once, plus DCP's
    ~1.6 KB per entry)."""
    sizes: dict = {}
    for part in _all_gather(entry_bytes(state)):
        sizes.update(part)
    need = sum(sizes.values()) + 4096 * len(sizes)
    error = owner_conflict(root) if fresh and rank == 0 else None
    _agree(error)
    if rank == 0 and root.is_dir():
        remove_debris(root)
    for directory, label in [(root, "checkpoint.dir")] + (
        [(run_dir, "run directory")] if run_dir and rank == 0 else []
    ):
        problem = _probe(Path(directory), rank)
        if problem:
            error = f"{label} cannot be written: {problem}"
            break
    if error is None:
        free = shutil.disk_usage(root).free
        if free < need:
            error = (
                f"checkpoint.dir {root}: {free / 2**20:.1f} MiB free, one checkpoint of this run takes "
                f"about {need / 2**20:.1f} MiB ([Errno {errno_names.ENOSPC} ENOSPC] "
                f"{os.strerror(errno_names.ENOSPC)} for it)"
            )
    if error and dist.is_initialized():
        error += f" (on rank {rank})"
    _agree(error)
    return need


def space_warning(root: Path, need: int, *, keep: int, saves: int) -> str | None:
    """A warning when ``root``'s disk holds the one checkpoint ``preflight`` checked but not
    what this run's ``saves`` need at their peak: a save writes ``step_N.tmp`` beside the
    ``keep`` kept ones (``keep=0`` keeps all) and prunes only after it, so at the last save
    the directory holds min(keep, existing + saves - 1) + 1 checkpoints. None when they fit
    (or the run saves at most once). ``need`` is one checkpoint's bytes."""
    existing = len(complete_checkpoints(root)) if root.is_dir() else 0
    held = existing + saves - 1
    peak = (min(keep, held) if keep else held) + 1
    more = peak - existing
    if saves <= 1 or more <= 1:
        return None
    free = shutil.disk_usage(root if root.is_dir() else root.parent).free
    if free >= more * need:
        return None
    fits = free // need + existing - 1  # the largest keep whose peak fits
    remedy = f"set checkpoint.keep={fits} or free" if fits >= 1 else "free"
    return (
        f"checkpoint.dir {root}: {free / 2**20:.1f} MiB free holds one checkpoint of about "
        f"{need / 2**20:.1f} MiB, but checkpoint.keep={keep} with {saves} saves needs {more} more at once "
        f"({more * need / 2**20:.1f} MiB, the one being written included): a save after the disk fills "
        f"fails with ENOSPC and keeps the last checkpoint; {remedy} {(more * need - free) / 2**20:.1f} MiB"
    )


def _previous(root: Path) -> str:
    kept = complete_checkpoints(root)
    return f"the last checkpoint, {kept[-1]}, is kept" if kept else "no earlier checkpoint exists"


def save(root: Path, step: int, state: dict, meta: dict, *, rank: int, keep: int, run_id: str | None = None) -> Path:
    """Save ``state`` as ``root/step_N`` (all ranks together). A non-finite value raises
    FloatingPointError and a failed write CheckpointError, on every rank, before anything
    replaces the previous checkpoint; a failed save's ``.tmp`` is removed. meta.json holds
    ``meta``, the step, the run (``run_id``), the ranks that saved and every file's checksum;
    then the last ``keep`` checkpoints are kept, this run's first (``_prune``)."""
    final = root / f"{_DIR_PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    found = _all_gather(nonfinite_keys(state))
    bad = [(r, keys[0]) for r, keys in enumerate(found) if keys]
    if bad:
        r, key = bad[0]
        where = f" on rank {r}" if len(found) > 1 else ""
        raise FloatingPointError(f"non-finite values in {key}{where} after step {step}: not saved; {_previous(root)}")

    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            error = describe(err, tmp)
    _agree(error and f"cannot save the checkpoint after step {step}: {error}; {_previous(root)}")

    writer, files, error = Writer(tmp), {}, None
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=writer)
        files = {name: sha256(tmp / name) for name in sorted(writer.written)}
    except (Exception, CheckpointException) as err:
        interrupt = _in_chain(err, KeyboardInterrupt)
        if interrupt is not None:  # a second Ctrl-C while saving: stop at once, as it does during a step
            raise interrupt from None
        error = describe(err, tmp)
    parts = _all_gather((error, files))
    error = next((e for e, _ in parts if e), None)
    if rank == 0 and error is None:
        try:
            manifest = {name: h for _, part in parts for name, h in part.items()}
            manifest[METADATA] = sha256(tmp / METADATA)
            world = dist.get_world_size() if dist.is_initialized() else 1
            record = {**meta, "step": step, "saved_at": time.time(), "run_id": run_id, "world": world}
            (tmp / "meta.json").write_text(json.dumps({**record, "files": manifest}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except Exception as err:  # the others wait for rank 0's word below
            error = describe(err, tmp)
    error = _all_gather(error)[0]  # the same on every rank so far, but for rank 0's sealing
    if error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(f"cannot save the checkpoint after step {step}: {error}; {_previous(root)}")
    if rank == 0 and keep > 0:
        _prune(root, keep, run_id)
    _barrier()
    return final


def _run_of(ckpt: Path) -> str | None:
    """The run that wrote ``ckpt`` (meta.json's run_id), None if it cannot say."""
    try:
        meta = json.loads(read_file(ckpt, "meta.json", max_size=META_JSON_MAX))
    except (OSError, ValueError, RecursionError):
        return None
    run = meta.get("run_id") if isinstance(meta, dict) else None
    return run if isinstance(run, str) else None


def _prune(root: Path, keep: int, run_id: str | None) -> None:
    """Keep ``keep`` complete checkpoints: this run's newest first, then the newest others;
    delete the rest. A checkpoint this run wrote is never deleted while one it did not write
    is kept, however high that one's step number."""
    kept = complete_checkpoints(root)
    mine = {p: run_id is not None and _run_of(p) == run_id for p in kept}
    ranked = sorted(kept, key=lambda p: (mine[p], step_of(p)))  # the last `keep` stay
    for old in ranked[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _field_error(meta_file: Path, key: str, valid: str) -> CheckpointError:
    return CheckpointError(f"{meta_file}: refused: '{key}' is missing or not {valid}")


def read_meta(path: Path) -> dict:
    """The checkpoint's meta.json, the fields a load relies on checked: ``step`` an int >= 1
    (the directory's number, for a ``step_N`` directory), ``files`` a dict of
    ``{"bytes": int >= 0, "sha256": 64 hex digits}``, ``run_id`` a str if present, ``world``
    an int in [1, MAX_WORLD] if present. CheckpointError (one line) otherwise."""
    meta_file = path / "meta.json"
    try:
        raw = read_file(path, "meta.json", max_size=META_JSON_MAX)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)") from None
    except FileRefused as err:
        raise CheckpointError(str(err)) from None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{meta_file}: not JSON ({first_line(err)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: refused: a JSON {type(meta).__name__}, not an object")
    _check_meta_fields(path, meta)
    return meta


def _check_meta_fields(path: Path, meta: dict) -> None:
    """read_meta's field checks (``world`` filled in for a checkpoint saved before it was recorded)."""
    meta_file = path / "meta.json"
    step = meta.get("step")
    if type(step) is not int or step < 1:
        raise _field_error(meta_file, "step", "an integer >= 1")
    number = step_of(path)
    if number is not None and number != step:
        raise CheckpointError(f"{meta_file}: refused: its step {step} is not its directory's number {number}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{meta_file}: no checksums ('files'), saved by an older moemesh: not loaded")
    for name, want in files.items():
        sha = want.get("sha256") if isinstance(want, dict) else None
        size = want.get("bytes") if isinstance(want, dict) else None
        if type(size) is not int or size < 0 or type(sha) is not str or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _field_error(meta_file, f"files.{name[:80]}", '{"bytes": an integer >= 0, "sha256": 64 hex digits}')
    if "run_id" in meta and meta["run_id"] is not None and type(meta["run_id"]) is not str:
        raise _field_error(meta_file, "run_id", "a string")
    if "world" not in meta:  # saved before moemesh recorded it: the degrees say as much
        degrees = [meta.get(k) for k in ("dp", "ep", "tp", "pp")]
        meta["world"] = math.prod(degrees) if all(type(d) is int and d >= 1 for d in degrees) else 1
    world = meta["world"]
    if type(world) is not int or not 1 <= world <= MAX_WORLD:
        raise _field_error(meta_file, "world", f"an integer in [1, {MAX_WORLD}]")


def load(path: Path, state: dict, check=None, *, expected: tuple[int, int] | None = None) -> dict:
    """Fill ``state`` in place from the checkpoint at ``path``; return its meta.json.

    ``check(path, meta)`` may refuse it first. ``expected``: (entries, bytes) of the whole
    model's state, every stage's (this rank's state by default), which bound the sizes of
    the checkpoint's files before any is read (``Limits``). Every failure is a
    CheckpointError with one line naming the file and the reason, raised on every rank
    together."""
    meta, metadata, error = None, None, None
    try:
        meta = read_meta(path)
        files = meta["files"]
        if check is not None:
            check(path, meta)
        keys, nbytes = expected or (0, 0)
        limits = Limits(
            keys=max(keys, len(state)), world=meta["world"], state_bytes=max(nbytes, sum(entry_bytes(state).values()))
        )
        check_sizes(path, files, limits)
        verify(path / METADATA, files)
        metadata = read_metadata(path, limits, files)
        check_against_state(metadata, state, path / METADATA)
        shards = sorted({info.relative_path for info in metadata.storage_data.values()})
        # Each shard checked once, by one rank (rank r takes every world-th one).
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for name in shards[rank::world]:
            verify(path / name, files)
    except Exception as err:  # on any rank: every rank must hear of it before DCP's collectives
        error = describe(err, path)
    _agree(error)
    assert meta is not None and metadata is not None  # _agree raised otherwise
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=Reader(path, metadata, meta["files"]), planner=Planner(path))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(describe(err, path)) from None
    return meta


def resolve(resume: str, default_root: Path) -> list[Path]:
    """Checkpoints to try, newest first: resume=auto searches ``default_root``; a path may be
    one checkpoint or a directory of them."""
    if resume == "auto":
        return list(reversed(complete_checkpoints(default_root)))
    p = Path(resume).expanduser().resolve()  # the path the user named may be a symlink; what is inside may not
    if _is(p / "meta.json", stat.S_ISREG):
        return [p]
    return list(reversed(complete_checkpoints(p)))
