"""A checkpoint's files, read as data only and checked against their checksums.

Trust. A checkpoint is read as data only, by moemesh's own code:
  * DCP's ``.metadata`` is a pickle. moemesh writes it in protocol 2 and reads it with its
    own interpreter (``checkpoint_pickle``): a written list of DCP's metadata classes and
    the torch values they hold (sizes, dtypes, the strided layout), plain containers and
    scalars; nothing that allocates from an argument (no ``bytearray``, ``set``,
    ``Counter``). Before a byte is read its size is capped, and what it builds is bounded,
    relative to the model's expected metadata (``Limits``). What it builds must
    then be DCP metadata in every field: tensors only, in ranges of files that meta.json
    lists, of the keys, dtypes and sizes this model has.
  * Each shard entry is a ``torch.save`` zip of one tensor. moemesh decodes it itself
    (``decode_tensor``): the ``data.pkl`` through the same interpreter with a tensor's
    allow-list (a storage reference and its shape), the raw bytes of a stored record of
    exactly that many elements; ``torch.load`` is never called on a checkpoint. A pickled
    object entry (DCP's ``BytesStorageMetadata``) is refused.
  * Every file is a regular file of the checkpoint's directory of the size meta.json
    recorded, opened without following a symlink (``checkpoint_files``).
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

import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from moemesh.errors import CheckpointError
from moemesh.parallel import checkpoint_pickle as cp
from moemesh.parallel.checkpoint_files import FileRefused, open_regular, read_exactly, sha256_of

METADATA = ".metadata"  # DCP's file name for its metadata
_METADATA_PROTOCOL = cp.PROTOCOL  # the only pickle protocol moemesh writes and reads
_ITEM_OVERHEAD = 64 << 10  # a torch.save zip around one tensor: its records, names and padding (~1.5 KiB)
_DATA_PKL_MAX = 16 << 10  # one tensor's data.pkl (~150 bytes)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(err, limit: int = 400) -> str:
    """An error's message on one line: its first sentence, whole. A message whose first line ends
    mid-sentence (torch wraps some) goes on over the next lines to the sentence's end; terminal
    escapes are dropped. Only a sentence longer than ``limit`` characters is cut, with "...",
    and at a word."""
    lines = [" ".join(_ANSI.sub("", line).split()) for line in str(err).strip().splitlines()]
    lines = [line for line in lines if line]
    text = lines[0] if lines else ""
    for more in lines[1:]:
        if re.search(r"[.:;!?)]$", text) or len(text) > limit:
            break
        text = f"{text} {more}"
    if len(text) <= limit:
        return text
    end = max(text.rfind(". ", 0, limit), text.rfind("; ", 0, limit))
    if end > 0:
        return text[: end + 1]
    cut = text.rfind(" ", 0, limit - 3)
    return text[: cut if cut > 0 else limit - 3] + "..."


def _short(name) -> str:
    """A name from a checkpoint, safe to print: a str, cut to 80 characters."""
    text = name if isinstance(name, str) else f"<a {type(name).__name__}>"
    return repr(text if len(text) <= 80 else text[:77] + "...")


# --- how much metadata a model may have ---------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How large a checkpoint of this model may be, stated before a byte of it is read, for
    ``keys`` state-dict entries of ``state_bytes`` in all, saved by ``world`` ranks (each
    entry is at most one chunk per rank).

    ``.metadata``: DCP writes about 330 bytes per entry and 190 per further chunk, which the
    interpreter builds into objects of about 5.6 KiB and 3.3 KiB (counted as
    checkpoint_pickle counts them); the limits on both are 2-3 times that. The files in
    all: the tensors, about 1.5 KiB of zip around each chunk (4 KiB allowed), the metadata."""

    keys: int
    world: int
    state_bytes: int

    @property
    def metadata_bytes(self) -> int:
        return (64 << 10) + self.keys * (1024 + 512 * self.world)

    @property
    def built_bytes(self) -> int:
        return (256 << 10) + self.keys * ((8 << 10) + (4 << 10) * self.world)

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.keys * self.world * (4 << 10) + self.metadata_bytes


def check_sizes(path: Path, files: dict, limits: Limits) -> None:
    """meta.json's sizes within ``limits``, before any file is opened or hashed."""
    listed = files.get(METADATA)
    if not isinstance(listed, dict) or type(listed.get("bytes")) is not int:
        raise CheckpointError(f"{path / METADATA}: not listed in meta.json's files, so it cannot be checked")
    if listed["bytes"] > limits.metadata_bytes:
        raise CheckpointError(
            f"{path / METADATA}: {listed['bytes']:,} bytes, more than the {limits.metadata_bytes:,} that the "
            f"metadata of {limits.keys:,} entries saved by {limits.world} rank(s) may take: not read"
        )
    total = sum(w["bytes"] for w in files.values() if isinstance(w, dict) and type(w.get("bytes")) is int)
    if total > limits.total_bytes:
        raise CheckpointError(
            f"{path}: its files take {total:,} bytes, more than the {limits.total_bytes:,} that a checkpoint of "
            f"this model ({limits.state_bytes:,} bytes of tensors) saved by {limits.world} rank(s) may take: not read"
        )


# --- reading DCP's metadata as data only ------------------------------------------


def read_metadata(path: Path, limits: Limits | None = None, files: dict | None = None) -> Metadata:
    """DCP's metadata of the checkpoint at ``path``, read by moemesh's interpreter within
    ``limits`` (by default: a model of 1,024 entries saved by one rank) and checked field by
    field (against ``files``, meta.json's list, when given); CheckpointError otherwise."""
    limits = limits or Limits(keys=1024, world=1, state_bytes=0)
    file = Path(path) / METADATA
    want = files.get(METADATA) if files else None
    size = want.get("bytes") if isinstance(want, dict) and type(want.get("bytes")) is int else None
    try:
        fd = open_regular(Path(path), METADATA, size, max_size=limits.metadata_bytes)
        try:
            data = read_exactly(fd, os.fstat(fd).st_size, 0, file)
        finally:
            os.close(fd)
    except FileRefused as err:
        raise CheckpointError(str(err)) from None
    try:
        metadata = cp.loads(data, cp.METADATA_GLOBALS, max_bytes=limits.built_bytes)
    except cp.Refused as err:
        raise CheckpointError(f"{file}: refused, not plain DCP metadata: {err}") from None
    _check_metadata(metadata, file, files)
    return metadata


def _check_metadata(md, file: Path, files: dict | None) -> None:
    """Every field what DCP writes: tensors only, each chunk inside its tensor, each stored in
    a range of a file of this directory (of the size meta.json lists, when given)."""

    def bad(why):
        return CheckpointError(f"{file}: refused: {why}")

    _check_top(md, bad)
    _check_entries(md.state_dict_metadata, bad)
    _check_storage(md.storage_data, md.state_dict_metadata, files, bad)


def _check_top(md, bad) -> None:
    """The Metadata object itself and its small fields."""
    if type(md) is not Metadata:
        raise bad(f"a {type(md).__name__}, not DCP metadata")
    sdm, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
    if type(sdm) is not dict or type(storage) is not dict:
        raise bad("no dicts of entries and storage")
    planner = getattr(md, "planner_data", None)
    if planner is not None and not (
        type(planner) is dict and all(type(v) is tuple and all(type(p) is str for p in v) for v in planner.values())
    ):
        raise bad("planner data that is not a dict of name paths")
    sm = getattr(md, "storage_meta", None)
    if sm is not None and type(sm) is not StorageMeta:
        raise bad("storage meta that is not DCP's")
    if type(getattr(md, "version", None)) not in (str, type(None)):
        raise bad("a version that is not a string")


def _check_entries(sdm: dict, bad) -> None:
    """Tensors only, each chunk inside its tensor."""
    for key, entry in sdm.items():
        if type(key) is not str or type(entry) is not TensorStorageMetadata:
            raise bad(f"entry {_short(key)} is a {type(entry).__name__}, not a tensor")
        props, size, chunks = (getattr(entry, f, None) for f in ("properties", "size", "chunks"))
        if type(props) is not TensorProperties or not hasattr(props, "dtype") or type(size) is not torch.Size:
            raise bad(f"entry {_short(key)} has no tensor properties or size")
        if props.layout is not torch.strided or type(chunks) is not list or not chunks:
            raise bad(f"entry {_short(key)} is not a strided tensor stored in chunks")
        for c in chunks:
            offsets, sizes = getattr(c, "offsets", None), getattr(c, "sizes", None)
            if (
                type(c) is not ChunkStorageMetadata
                or type(offsets) is not torch.Size
                or type(sizes) is not torch.Size
                or not len(offsets) == len(sizes) == len(size)
                or any(o + s > n for o, s, n in zip(offsets, sizes, size))
            ):
                raise bad(f"entry {_short(key)} has a chunk outside its tensor {list(size)}")


def _check_storage(storage: dict, sdm: dict, files: dict | None, bad) -> None:
    """Each entry stored in a range of a file of this directory that fits its chunk."""
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise bad("a storage entry that is not a DCP file range")
        entry = sdm.get(index.fqn)
        if entry is None:
            raise bad(f"storage for {_short(index.fqn)}, which has no entry")
        name, offset, length = (getattr(info, f, None) for f in ("relative_path", "offset", "length"))
        if type(name) is not str or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise bad(f"{_short(index.fqn)} is stored in {_short(name)}, outside the checkpoint's directory")
        if getattr(info, "transform_descriptors", None):
            raise bad(f"{_short(index.fqn)} is stored through transforms")
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise bad(f"{_short(index.fqn)} has a file range that is not two ints >= 0")
        chunk = next((c for c in entry.chunks if c.offsets == index.offset), None)
        if chunk is None:
            raise bad(f"storage for {_short(index.fqn)} at {index.offset} matches none of its chunks")
        limit = chunk.sizes.numel() * entry.properties.dtype.itemsize + _ITEM_OVERHEAD
        if length > limit:
            raise bad(f"{_short(index.fqn)} takes {length:,} bytes, more than a chunk of its size ({limit:,})")
        if files is not None:
            want = files.get(name)
            if not isinstance(want, dict) or type(want.get("bytes")) is not int:
                raise bad(f"{_short(index.fqn)} is stored in {_short(name)}, which meta.json does not list")
            if offset + length > want["bytes"]:
                raise bad(f"{_short(index.fqn)} is stored past the end of {name} ({want['bytes']:,} bytes)")


def check_against_state(md: Metadata, state: dict, file: Path) -> None:
    """Every key this rank loads is in the metadata with its dtype and global size."""
    for key, t in state.items():
        entry = md.state_dict_metadata.get(key)
        if type(entry) is not TensorStorageMetadata:  # _check_metadata let only tensors through
            raise CheckpointError(f"{file}: refused: no entry {_short(key)}, which this model has")
        shape = torch.Size(t.shape)  # a DTensor's is the global shape
        if entry.properties.dtype != t.dtype or entry.size != shape:
            raise CheckpointError(
                f"{file}: refused: {key} is {entry.properties.dtype} {list(entry.size)} in the checkpoint, "
                f"{t.dtype} {list(shape)} in this model"
            )


# --- a shard entry: one tensor of a torch.save zip ---------------------------------


def _record(blob: bytes, info: zipfile.ZipInfo) -> bytes:
    """A stored record's bytes, read at its local header (no decompression, no CRC: torch's
    reader checks none either, and the finiteness check and checksums cover the values)."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise ValueError(f"record {info.filename!r} is compressed")
    head = blob[info.header_offset : info.header_offset + 30]
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"record {info.filename!r} has no local header")
    start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if start + info.file_size > len(blob):
        raise ValueError(f"record {info.filename!r} runs past the entry")
    return blob[start : start + info.file_size]


def decode_tensor(blob: bytes, dtype: torch.dtype, sizes: torch.Size) -> torch.Tensor:
    """The tensor of one shard entry (a ``torch.save`` zip), of ``dtype`` and ``sizes``;
    ValueError (one line) if it is anything else."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
        records = {i.filename: i for i in archive.infolist()}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as err:
        raise ValueError(f"not a torch.save zip ({first_line(err)})") from None
    pkl = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise ValueError("not a torch.save zip (no single data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    order = records.get(prefix + "byteorder")
    if order is not None and _record(blob, order) != b"little":
        raise ValueError("a big-endian tensor")
    if records[pkl[0]].file_size > _DATA_PKL_MAX:
        raise ValueError(f"a data.pkl of {records[pkl[0]].file_size:,} bytes, more than one tensor's")
    try:
        ref = cp.loads(
            _record(blob, records[pkl[0]]),
            cp.TENSOR_GLOBALS,
            max_bytes=_DATA_PKL_MAX,
            persistent_load=cp.storage_ref,
        )
    except cp.Refused as err:
        raise ValueError(f"refused, not one tensor: {err}") from None
    if type(ref) is not cp.TensorRef:
        raise ValueError(f"refused: a {type(ref).__name__}, not one tensor")
    st = ref.storage
    if st.dtype != dtype or torch.Size(ref.size) != sizes:
        raise ValueError(f"a {st.dtype} tensor of {list(ref.size)}, not {dtype} {list(sizes)}")
    data = records.get(f"{prefix}data/{st.key}")
    if data is None or data.file_size != st.numel * dtype.itemsize:
        raise ValueError(f"its storage record holds other than {st.numel} elements")
    if sizes.numel() and ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) >= st.numel:
        raise ValueError("its shape reaches past its storage")
    raw = _record(blob, data)
    storage = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return storage.as_strided(ref.size, ref.stride, ref.offset)


class Reader(dcp.FileSystemReader):
    """DCP's file reader, serving the metadata that read_metadata() has already read and
    checked, and reading each tensor through decode_tensor from a regular file of the
    checkpoint of the size meta.json recorded (never torch.load)."""

    def __init__(self, path: Path, metadata: Metadata, files: dict):
        super().__init__(str(path))
        self._metadata, self._files, self._dir = metadata, files, Path(path)

    def read_metadata(self, *args, **kwargs):
        md = self._metadata
        md.storage_meta = md.storage_meta if isinstance(md.storage_meta, StorageMeta) else StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            path = self._dir / name
            try:
                fd = open_regular(self._dir, name, self._files[name]["bytes"])
            except FileRefused as err:
                raise CheckpointError(str(err)) from None
            try:
                for item in items:
                    if item.type == LoadItemType.BYTE_IO:
                        raise CheckpointError(f"{item.dest_index.fqn}: a pickled object, not a tensor: refused")
                    info = self.storage_data[item.storage_index]
                    entry = self._metadata.state_dict_metadata[item.storage_index.fqn]
                    chunk = next(c for c in entry.chunks if c.offsets == item.storage_index.offset)
                    blob = read_exactly(fd, info.length, info.offset, path)
                    try:
                        tensor = decode_tensor(blob, entry.properties.dtype, chunk.sizes)
                    except ValueError as err:
                        raise CheckpointError(f"{path}: {item.storage_index.fqn}: {err}") from None
                    for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                        tensor = tensor.narrow(dim, start, length)
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != tensor.size():
                        raise CheckpointError(f"{path}: {item.storage_index.fqn}: {list(tensor.size())} elements read")
                    target.copy_(tensor)
                    planner.commit_tensor(item, target)
            except FileRefused as err:
                raise CheckpointError(str(err)) from None
            finally:
                os.close(fd)
        fut: Future = Future()
        fut.set_result(None)
        return fut


class Planner(DefaultLoadPlanner):
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


class Writer(dcp.FileSystemWriter):
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
        file = Path(self.path) / METADATA
        tmp = file.with_name(METADATA + ".p2")
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f, protocol=_METADATA_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)


def sha256(file: Path) -> dict:
    """``{"bytes", "sha256"}`` of a regular file (this rank's own, just written)."""
    return sha256_of(file.parent, file.name)


def verify(file: Path, files: dict) -> None:
    """``file`` is the regular file meta.json lists, of its size (checked before a byte is
    hashed) and its sha256."""
    want = files.get(file.name)
    if not isinstance(want, dict) or type(want.get("bytes")) is not int or type(want.get("sha256")) is not str:
        raise CheckpointError(f"{file}: not listed in meta.json's files, so it cannot be checked")
    try:
        got = sha256_of(file.parent, file.name, want["bytes"])
    except FileRefused as err:
        raise CheckpointError(str(err)) from None
    if got["sha256"] != want["sha256"]:
        raise CheckpointError(
            f"{file}: sha256 {got['sha256'][:12]}..., {want['sha256'][:12]}... when "
            "saved (the file changed since it was saved)"
        )
