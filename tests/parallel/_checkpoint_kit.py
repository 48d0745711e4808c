"""Shared by the checkpoint trust tests: a tiny run's checkpoints, a Checkpointer on one
process, a log that keeps its lines, and ways to tamper with a checkpoint as a disk, a
bug or an attacker would (rewriting meta.json's checksums where an attacker could)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import torch

from moemesh.parallel.mesh import single_rank_mesh
from moemesh.trainer.checkpointing import Checkpointer
from moemesh.trainer.data import prepare_data
from moemesh.trainer.optim import build_optimizer
from moemesh.trainer.parallelize import build_model
from tests.helpers import tiny_run, train_single


def run_config(**extra):
    return tiny_run(**{"trainer.steps": 3, "checkpoint.every": 1, "checkpoint.keep": 5, "trainer.seed": 0, **extra})


def train_here(run, out: Path) -> dict:
    """``run`` in this process (one rank), writing to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    return train_single(run, out, paths)


class Log:
    """What Checkpointer.resume says, line by line."""

    def __init__(self):
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def warnings(self) -> list[str]:
        return [l for l in self.lines if "warning" in l]


def checkpointer(root: Path, **extra) -> Checkpointer:
    """A fresh model and optimizer of ``run_config`` on one process, saving under ``root``."""
    run = run_config(resume="auto", **extra)
    torch.manual_seed(0)
    model = build_model(run, single_rank_mesh(), torch.device("cpu"))
    return Checkpointer(run, model, build_optimizer(model, run.trainer), single_rank_mesh(), root)


def take_a_step(ck: Checkpointer) -> None:
    """One AdamW step on the sum of the weights: the optimizer then holds both moments (AdamW
    makes its state lazily, and a checkpoint without it would not load into a stepped run)."""
    sum(p.sum() for p in ck.model.parameters()).backward()
    ck.optimizer.step()


def files_of(ckpt: Path) -> dict:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(ckpt.iterdir())
        if p.is_file() and p.name != "meta.json"
    }


def reseal(ckpt: Path) -> None:
    """Rewrite meta.json's checksums to match the files, as whoever can write the files can."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = files_of(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=2))


def plant_metadata(ckpt: Path, payload: bytes) -> None:
    (ckpt / ".metadata").write_bytes(payload)
    reseal(ckpt)


def _storage(ckpt: Path) -> dict:
    # Our own checkpoint, just written by this test: plain pickle is fine here (and reads
    # the metadata of the code before this change too).
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f).storage_data


def tensor_bytes_range(ckpt: Path, key: str) -> tuple[Path, int, int]:
    """(shard, offset, length) of ``key``'s raw tensor bytes inside its shard."""
    index, info = next((i, s) for i, s in _storage(ckpt).items() if i.fqn == key)
    shard = ckpt / info.relative_path
    blob = shard.read_bytes()[info.offset : info.offset + info.length]  # one torch.save zip
    entry = next(z for z in zipfile.ZipFile(io.BytesIO(blob)).infolist() if z.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", blob[entry.header_offset + 26 : entry.header_offset + 30])
    return shard, info.offset + entry.header_offset + 30 + name_len + extra_len, entry.file_size


def largest_float_key(ckpt: Path) -> str:
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    floats = {
        k: v.size.numel()
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and v.properties.dtype == torch.float32
    }
    return max(sorted(floats), key=floats.get)


def poison(ckpt: Path, key: str, *, fill: float = float("nan")) -> Path:
    """Overwrite ``key``'s values with ``fill`` in its shard (torch.load checks no zip CRC)."""
    shard, start, length = tensor_bytes_range(ckpt, key)
    raw = bytearray(shard.read_bytes())
    raw[start : start + length] = struct.pack("<f", fill) * (length // 4)
    shard.write_bytes(bytes(raw))
    return shard


def flip_bytes(ckpt: Path, key: str, count: int = 64) -> Path:
    """Invert ``count`` bytes in the middle of ``key``'s values (a disk's silent corruption)."""
    shard, start, length = tensor_bytes_range(ckpt, key)
    assert length >= count
    raw = bytearray(shard.read_bytes())
    mid = start + (length - count) // 2
    raw[mid : mid + count] = bytes(b ^ 0x55 for b in raw[mid : mid + count])
    shard.write_bytes(bytes(raw))
    return shard


def copy_checkpoints(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- hostile pickles: each allocates, burns CPU or crashes under plain pickle -------------
#
# Each builder takes N (the bytes to allocate, the memo index, the nesting depth) and
# returns a protocol-2 pickle of a few dozen bytes (the nesting: N + a few).


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n) if n < 2**31 else b"\x8a\x08" + n.to_bytes(8, "little", signed=True)


def _call(fn: bytes, *args: bytes) -> bytes:
    return fn + b"(" + b"".join(args) + b"tR"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _bytes_of(n: int) -> bytes:
    return _call(_g("builtins", "bytearray"), _int(n))


HOSTILE_PICKLES = {
    # torch's weights-only unpickler admits these globals: each allocates from its argument.
    "bytearray(bytearray(N))": lambda n: _pickle(_call(_g("builtins", "bytearray"), _bytes_of(n))),
    "set(bytearray(N))": lambda n: _pickle(_call(_g("builtins", "set"), _bytes_of(n))),
    "Counter(bytearray(N))": lambda n: _pickle(_call(_g("collections", "Counter"), _bytes_of(n))),
    "OrderedDict(bytearray(N))": lambda n: _pickle(_call(_g("collections", "OrderedDict"), _bytes_of(n))),
    "torch.Size(bytearray(N))": lambda n: _pickle(_call(_g("torch", "Size"), _bytes_of(n))),
    # the C unpickler grows its memo to twice the index a LONG_BINPUT names (8 bytes a slot)
    "LONG_BINPUT index N": lambda n: _pickle(b"N" + b"r" + struct.pack("<I", min(n, 2**32 - 1))),
    # a dict key nested N tuples deep: hashing it recurses in C until the stack overflows
    "dict key N tuples deep": lambda n: _pickle(b"}" + b")" + b"\x85" * n + b"Ns"),
}
# N at which each does its damage cheaply: allocates N bytes or more (1 MB), or crashes.
HOSTILE_SMALL_N = {name: 10**6 for name in HOSTILE_PICKLES} | {"LONG_BINPUT index N": 2**17}
# ... and under torch's weights-only unpickler (torch.load(weights_only=True)), which moemesh used.
TORCH_DAMAGED = (
    "bytearray(bytearray(N))",
    "set(bytearray(N))",
    "Counter(bytearray(N))",
    "OrderedDict(bytearray(N))",
    "torch.Size(bytearray(N))",
    "dict key N tuples deep",
)


def tensor_entry_zip(data_pkl: bytes, records: dict[str, bytes] | None = None) -> bytes:
    """A torch.save zip around ``data_pkl`` (stored records, as torch writes them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for name, raw in (records or {}).items():
            z.writestr(f"archive/{name}", raw)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def plant_entry(ckpt: Path, key: str, blob: bytes) -> None:
    """Store ``key`` as ``blob`` in a file of its own (evil.distcp), metadata and checksums
    rewritten to match, as whoever can write the checkpoint's files can."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = pickle.loads((ckpt / ".metadata").read_bytes())
    (index,) = [i for i in md.storage_data if i.fqn == key]
    (ckpt / "evil.distcp").write_bytes(blob)
    md.storage_data[index] = _StorageInfo("evil.distcp", 0, len(blob))
    plant_metadata(ckpt, pickle.dumps(md, protocol=2))
