"""Distributed checkpoints that reshard across layouts (torch.distributed.checkpoint).

Every tensor is saved under a global key, never a rank's local one:
  * replicated tensors under their parameter name (DCP keeps one copy);
  * routed experts one by one under their global expert id,
    ``model.layers.3.moe.experts.w1_eDF[17]``, so EP=2 saves load into EP=4 or a single
    process with each expert where it belongs;
  * tensor-parallel shards as DTensors over the tp axis of the logical (padded) tensor,
    so any TP degree reads the rows it owns;
  * pipeline stages only hold their layers' keys; any split finds its own.
The same keys carry AdamW's moments (``optim.<param>.exp_avg``), plus the step, the
RNG state and the expert-bias buffers. Loading fills the live tensors in place.

A save is atomic: all ranks write ``step_N.tmp/``; then rank 0 writes ``meta.json`` and
renames the directory. A directory without ``meta.json`` or with the ``.tmp`` suffix is
never picked, and the previous checkpoint survives a crash or a failed save (whose
``.tmp`` is removed). Checkpoints are ordered by their step number, never by name (step
999999 comes before step 1000000). The last ``keep`` complete checkpoints are kept. A
model with a non-finite value is never saved.

Trust. A checkpoint is read as data only, by construction:
  * DCP's ``.metadata`` is a pickle. moemesh writes it in protocol 2 and reads it with
    torch's weights-only unpickler (``torch._weights_only_unpickler``, what
    ``torch.load(weights_only=True)`` uses): torch's plain values (sizes, dtypes, layouts)
    and DCP's eight metadata classes, registered through ``torch.serialization.safe_globals``;
    no other global, no ``getattr``, no protocol-4 names. Its entries must be tensors in
    files of this directory.
  * Shards hold tensors that DCP reads with ``torch.load(weights_only=True)``; a pickled
    object entry (DCP's ``BytesStorageMetadata``, which it would read with
    ``weights_only=False``) is refused.
Integrity. ``meta.json`` lists every file of the checkpoint with its size and sha256
(``sha256sum`` checks one by hand); each rank hashes the shards it wrote. A load checks
the metadata on every rank and each shard on one rank before anything is read, and
refuses non-finite values in any tensor it reads. Checksums find corruption, not an
attacker (who can rewrite ``meta.json`` too): safety comes from the data-only reading.
Cost measured on this CPU (2 cores of an AMD EPYC with SHA-NI, 1 GiB fp32 state, one
process): sha256 0.63-0.80 s/GiB (crc32 0.43), the finiteness check 0.35-0.40 s/GiB; a
save took 2.4 s/GiB against plain DCP's 1.1, a load 1.9 against 0.8.
"""

from __future__ import annotations

import contextlib
import errno as errno_names
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from moemesh.parallel.tags import TP_SHARD, expert_first_id

_DIR_PREFIX = "step_"
_STEP_DIR = re.compile(r"step_(\d+)")
_METADATA = ".metadata"  # DCP's file name for its metadata
_METADATA_PROTOCOL = 2  # the pickle protocol torch's weights-only unpickler reads
# What DCP's metadata is made of, beyond the torch values (Size, dtypes, layouts) the
# weights-only unpickler admits by default. Nothing else may appear in a .metadata file.
_METADATA_CLASSES = [
    Metadata,
    TensorStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
    _MEM_FORMAT_ENCODING,
    MetadataIndex,
    StorageMeta,
    _StorageInfo,
]
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    pass


# --- reading DCP's metadata as data only ------------------------------------------


def read_metadata(path: Path) -> Metadata:
    """DCP's metadata of the checkpoint at ``path``, read by torch's weights-only
    unpickler; a CheckpointError naming the file and the reason otherwise."""
    file = Path(path) / _METADATA
    data = file.read_bytes()
    try:
        with torch.serialization.safe_globals(_METADATA_CLASSES), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "protocol N is not 2" note: the error below says it
            metadata = torch._weights_only_unpickler.load(io.BytesIO(data))
    except Exception as err:
        protocol = data[1] if data[:1] == b"\x80" and len(data) > 1 else "0 or 1"
        hint = (
            f" (pickle protocol {protocol}; moemesh writes and reads protocol {_METADATA_PROTOCOL}: "
            "a checkpoint saved by an older moemesh cannot be read safely)"
            if protocol != _METADATA_PROTOCOL
            else ""
        )
        reason = _first_line(err).split(" Please use", 1)[0].rstrip(".")  # not torch's advice to allow-list it
        raise CheckpointError(f"{file}: refused, not plain DCP metadata: {reason}{hint}") from None
    _check_metadata(metadata, file)
    return metadata


def _check_metadata(md, file: Path) -> None:
    """Tensors only, in files of this directory, without storage transforms."""

    def bad(why):
        return CheckpointError(f"{file}: refused: {why}")

    if (
        not isinstance(md, Metadata)
        or not isinstance(md.state_dict_metadata, dict)
        or not isinstance(md.storage_data, dict)
    ):
        raise bad(f"a {type(md).__name__}, not DCP metadata")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            raise bad(f"entry {key!r} is a {type(entry).__name__}, not a tensor")
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(f"storage entry {index!r} is not a DCP file range")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise bad(f"{index.fqn} is stored in {name!r}, outside the checkpoint's directory")
        if info.transform_descriptors:
            raise bad(f"{index.fqn} is stored through transforms {info.transform_descriptors!r}")


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, serving the metadata that read_metadata() has already read and checked."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        md = self._metadata
        md.storage_meta = md.storage_meta if isinstance(md.storage_meta, StorageMeta) else StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _Planner(DefaultLoadPlanner):
    """DCP's planner, minus pickled objects, plus a finiteness check of every tensor read."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = path

    def load_bytes(self, read_item, value):
        raise CheckpointError(f"{read_item.dest_index.fqn}: a pickled object, not a tensor: refused")

    def commit_tensor(self, read_item, tensor):
        # The max-abs norm propagates NaN and never overflows. A host sync per tensor: once per resume.
        if (
            tensor.is_floating_point()
            and tensor.numel()
            and not bool(torch.isfinite(torch.linalg.vector_norm(tensor, float("inf"))))
        ):
            name = self.metadata.storage_data[read_item.storage_index].relative_path
            raise CheckpointError(f"{self._path / name}: non-finite values in {read_item.dest_index.fqn}")


# --- writing ------------------------------------------------------------------------


class _Writer(dcp.FileSystemWriter):
    """DCP's writer; the metadata goes out in protocol 2, and the files this rank wrote are noted."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.written: set[str] = set()

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        fut.wait()  # DCP's file writer has finished when it returns; this re-raises its error
        self.written |= {r.storage_data.relative_path for r in fut.value()}
        return fut

    def finish(self, metadata, results):
        super().finish(metadata, results)  # fills in metadata; writes it in the default protocol
        # The directory's name changes at the rename: no path in the metadata (it would be
        # the only non-DCP class in it, pathlib's).
        metadata.storage_meta = StorageMeta(save_id=getattr(metadata.storage_meta, "save_id", None))
        file = Path(self.path) / _METADATA
        tmp = file.with_name(_METADATA + ".p2")
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f, protocol=_METADATA_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)


def _sha256(file: Path) -> dict:
    h, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def _verify(file: Path, files: dict) -> None:
    want = files.get(file.name)
    if not isinstance(want, dict):
        raise CheckpointError(f"{file}: not listed in meta.json's files, so it cannot be checked")
    got = _sha256(file)
    if got["bytes"] != want.get("bytes"):
        raise CheckpointError(f"{file}: {got['bytes']} bytes, {want.get('bytes')} when saved (truncated or changed)")
    if got["sha256"] != want.get("sha256"):
        raise CheckpointError(
            f"{file}: sha256 {got['sha256'][:12]}..., {str(want.get('sha256'))[:12]}... when "
            "saved (the file changed since it was saved)"
        )


# --- the state, keyed globally ------------------------------------------------------


def _tp_dtensor(local: torch.Tensor, param, tp_mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    dim, _ = getattr(param, TP_SHARD)
    shape = list(local.shape)
    shape[dim] *= tp_mesh.size()
    return DTensor.from_local(
        local,
        tp_mesh,
        [Shard(dim)],
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def _entries(key: str, tensor: torch.Tensor, param, tp_mesh) -> dict:
    first = expert_first_id(param)
    if first is not None:
        return {f"{key}[{first + j}]": tensor[j] for j in range(tensor.shape[0])}
    if tp_mesh is not None and getattr(param, TP_SHARD, None) is not None:
        return {key: _tp_dtensor(tensor, param, tp_mesh)}
    return {key: tensor}


def training_state(model, optimizer, step_tensor: torch.Tensor, tp_mesh=None) -> dict:
    """Views of the live tensors under global keys (a load writes through them)."""
    state: dict = {"trainer.step": step_tensor}
    for name, p in model.named_parameters():
        state.update(_entries(f"model.{name}", p.data, p, tp_mesh))
        opt = optimizer.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in opt:
                state.update(_entries(f"optim.{name}.{moment}", opt[moment], p, tp_mesh))
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent and b is not None:
            state[f"model.{name}"] = b
    state["rng.cpu"] = torch.get_rng_state()
    return state


def init_optimizer_state(optimizer) -> None:
    """Give AdamW its state tensors before a load fills them (it creates them lazily)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def set_optimizer_step(optimizer, step: int) -> None:
    for st in optimizer.state.values():
        if "step" in st:
            st["step"].fill_(float(step))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_keys(state: dict) -> list[str]:
    """Keys of this rank's floating-point tensors that hold a NaN or an infinity."""
    by_dtype: dict = {}
    for key, t in state.items():
        t = _local(t)
        if t.is_floating_point() and t.numel():
            by_dtype.setdefault((t.dtype, t.device), []).append((key, t))
    bad = []
    for group in by_dtype.values():
        # Max-abs norms (they propagate NaN, never overflow), one fused call per dtype and
        # one host sync per group: once per save.
        norms = torch._foreach_norm([t for _, t in group], float("inf"))
        finite = torch.isfinite(torch.stack(norms)).tolist()
        bad += [key for (key, _), ok in zip(group, finite) if not ok]
    return bad


def entry_bytes(state: dict) -> dict[str, int]:
    """Each entry's bytes in a checkpoint (global size for TP shards)."""
    return {key: t.numel() * t.element_size() for key, t in state.items()}


# --- files --------------------------------------------------------------------------


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


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [""])[0]


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
        return _first_line(err)
    return f"{type(err).__name__}: {_first_line(err)}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory ``step_N`` (any number of digits), else None."""
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: ordered by step number."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if step_of(d) is not None and d.is_dir() and (d / "meta.json").is_file()]
    return sorted(found, key=step_of)


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


def preflight(root: Path, state: dict, *, rank: int, run_dir: Path | None = None) -> int:
    """Before the first step, on every rank: remove ``.tmp`` debris (rank 0), check that
    ``root`` (and rank 0's ``run_dir``) can be written and hold one more checkpoint. Raises
    CheckpointError on every rank, one line naming the path, otherwise. Returns the
    estimated bytes of one checkpoint (every key once, plus DCP's ~1.6 KB per entry)."""
    sizes: dict = {}
    for part in _all_gather(entry_bytes(state)):
        sizes.update(part)
    need = sum(sizes.values()) + 4096 * len(sizes)
    error = None
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


def _previous(root: Path) -> str:
    kept = complete_checkpoints(root)
    return f"the last checkpoint, {kept[-1]}, is kept" if kept else "no earlier checkpoint exists"


def save(root: Path, step: int, state: dict, meta: dict, *, rank: int, keep: int) -> Path:
    """Save ``state`` as ``root/step_N`` (all ranks together). A non-finite value raises
    FloatingPointError and a failed write CheckpointError, on every rank, before anything
    replaces the previous checkpoint; a failed save's ``.tmp`` is removed."""
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

    writer, files, error = _Writer(tmp), {}, None
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=writer)
        files = {name: _sha256(tmp / name) for name in sorted(writer.written)}
    except (Exception, CheckpointException) as err:
        error = describe(err, tmp)
    parts = _all_gather((error, files))
    error = next((e for e, _ in parts if e), None)
    if rank == 0 and error is None:
        try:
            manifest = {name: h for _, part in parts for name, h in part.items()}
            manifest[_METADATA] = _sha256(tmp / _METADATA)
            (tmp / "meta.json").write_text(
                json.dumps({**meta, "step": step, "saved_at": time.time(), "files": manifest}, indent=2)
            )
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
    if rank == 0:
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def load(path: Path, state: dict, check=None) -> dict:
    """Fill ``state`` in place from the checkpoint at ``path``; return its meta.json.

    ``check(path, meta)`` may refuse it first. Every failure is a CheckpointError with one
    line naming the file and the reason, raised on every rank together."""
    meta, metadata, error = None, None, None
    try:
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as err:
            raise CheckpointError(f"{meta_file}: not JSON ({err})") from None
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict):
            raise CheckpointError(f"{meta_file}: no checksums ('files'), saved by an older moemesh: not loaded")
        if check is not None:
            check(path, meta)
        _verify(path / _METADATA, files)
        metadata = read_metadata(path)
        shards = sorted({info.relative_path for info in metadata.storage_data.values()})
        # Each shard checked once, by one rank (rank r takes every world-th one).
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for name in shards[rank::world]:
            _verify(path / name, files)
    except Exception as err:  # on any rank: every rank must hear of it before DCP's collectives
        error = describe(err, path)
    _agree(error)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_Reader(path, metadata), planner=_Planner(path))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(describe(err, path)) from None
    return meta


def resolve(resume: str, default_root: Path) -> list[Path]:
    """Checkpoints to try, newest first: resume=auto searches ``default_root``; a path may be
    one checkpoint or a directory of them."""
    if resume == "auto":
        return list(reversed(complete_checkpoints(default_root)))
    p = Path(resume).expanduser()
    if (p / "meta.json").is_file():
        return [p]
    return list(reversed(complete_checkpoints(p)))
