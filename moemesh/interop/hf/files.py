"""A Hugging Face checkpoint directory, read as untrusted data.

Every file is a regular file (a symlink is followed: the hub's cache links snapshots to
blobs; a FIFO or a device is refused) whose size is checked before it is read; JSON files
are bounded, and a safetensors file's header (8 bytes of length, then JSON) is bounded and
checked against the file before it is parsed. Weights are safetensors only: a directory
holding only pickle-based weights (``pytorch_model.bin``, ``*.pt``) is refused, and nothing
in the directory is ever imported or executed. Torch-free: the command line checks a
checkpoint before any rank starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

from moemesh.errors import ConfigError
from moemesh.untrusted import read_json_object, regular_file

MAX_CONFIG_BYTES = 1 << 20  # config.json, generation_config.json (a few KB in practice)
MAX_INDEX_BYTES = 64 << 20  # model.safetensors.index.json (about 100 B per tensor)
MAX_HEADER_BYTES = 64 << 20  # one safetensors header (about 150 B per tensor)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# safetensors' dtype names and their bytes per element.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Copied next to an export when the source had them (read as bytes, never parsed or run).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
MAX_TOKENIZER_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorInfo:
    file: str  # the safetensors file's name in the directory
    dtype: str  # safetensors' name: BF16, F32, ...
    shape: tuple[int, ...]


def read_json(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a regular file of at most ``limit`` bytes (a config.json: 1 MiB)."""
    return read_json_object(path, limit, what)


def checkpoint_dir(path: str, what: str = "model.hf_path") -> Path:
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ConfigError(f"{what}={path}: not a directory (a Hugging Face checkpoint: config.json + *.safetensors)")
    return d


def _plain_name(name: object, d: Path, what: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
        raise ConfigError(f"{what}: {d / INDEX} names a weight file {name!r} outside the directory")
    return name


def weight_files(d: Path, what: str = "model.hf_path") -> list[str]:
    """The safetensors files of checkpoint directory ``d`` (from its index, or the one file);
    a one-line ConfigError if there are none, naming pickle-based weights when those are all it has."""
    if (d / INDEX).exists():
        index = read_json(d / INDEX, what, MAX_INDEX_BYTES)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{what}: {d / INDEX} has no weight_map")
        names = sorted({_plain_name(f, d, what) for f in weight_map.values()})
        bad = [n for n in names if not n.endswith(".safetensors")]
        if bad:
            raise ConfigError(f"{what}: {d / INDEX} maps tensors to {bad[0]}: moemesh reads .safetensors files only")
        return names
    if (d / SINGLE).exists():
        return [SINGLE]
    pickled = sorted(p.name for pattern in PICKLED for p in d.glob(pattern))
    if pickled:
        raise ConfigError(
            f"{what}={d}: its weights are pickle files ({pickled[0]}), which can run code when loaded; "
            "moemesh reads safetensors only (convert them, e.g. save_pretrained(..., safe_serialization=True), "
            "somewhere you trust)"
        )
    raise ConfigError(f"{what}={d}: no {SINGLE} or {INDEX} (a Hugging Face checkpoint in safetensors)")


def read_header(path: Path, what: str) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """A safetensors file's tensors {name: (dtype, shape)} and its metadata, from a header whose
    length is bounded and whose every tensor lies inside the file with the bytes its shape needs."""
    st = regular_file(path, what)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{what}: {path} is not a safetensors file ({st.st_size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > st.st_size:
            raise ConfigError(
                f"{what}: {path}: a safetensors header of {n:,} bytes (the file holds {st.st_size:,}; "
                f"at most {MAX_HEADER_BYTES:,} allowed): not a safetensors file, or a damaged one"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{what}: {path}: its safetensors header is not JSON (or nested too deeply)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{what}: {path}: its safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ConfigError(f"{what}: {path}: its safetensors __metadata__ is not a map of strings to strings")
    data_bytes = st.st_size - 8 - n
    tensors, spans = {}, []
    for name, entry in header.items():
        tensors[name] = _tensor_entry(name, entry, data_bytes, path, what)
        spans.append((*entry["data_offsets"], name))
    # As safetensors itself requires (its loader would refuse the file later, in every rank): the
    # tensors tile the data from 0 to its end, no overlap, no gap, nothing after.
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ConfigError(
                f"{what}: {path}: tensor {name!r} starts at byte {begin:,} of the data, not at {end:,}: "
                "tensors overlap or leave a gap; a damaged safetensors file"
            )
        end = stop
    if end != data_bytes:
        raise ConfigError(
            f"{what}: {path}: its tensors end at byte {end:,} of the data, but the file holds {data_bytes:,}: "
            "a damaged safetensors file"
        )
    return tensors, meta


def _tensor_entry(name: str, entry: object, data_bytes: int, path: Path, what: str) -> tuple[str, tuple[int, ...]]:
    ok = isinstance(entry, dict) and entry.get("dtype") in DTYPE_BYTES
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    ok = ok and isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok:
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in DTYPE_BYTES:
            fp8 = "; convert an fp8 checkpoint to bf16 first" if dtype.startswith("F8") else ""
            raise ConfigError(
                f"{what}: {path}: tensor {name!r} is {dtype}, which moemesh does not read "
                f"(valid: {', '.join(DTYPE_BYTES)}{fp8})"
            )
        raise ConfigError(f"{what}: {path}: tensor {name!r} has no valid dtype, shape and data_offsets")
    assert isinstance(entry, dict) and isinstance(shape, list) and isinstance(offsets, list)
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes or end - begin != prod(shape) * DTYPE_BYTES[entry["dtype"]]:
        raise ConfigError(f"{what}: {path}: tensor {name!r} does not fit its bytes {offsets} in the file")
    return entry["dtype"], tuple(shape)


def tensor_index(d: Path, what: str = "model.hf_path") -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``d``: its file, dtype and shape (headers only)."""
    out: dict[str, TensorInfo] = {}
    for name in weight_files(d, what):
        tensors, _ = read_header(d / name, what)
        for key, (dtype, shape) in tensors.items():
            if key in out:  # which copy is meant? transformers takes the index's; refuse, not guess
                raise ConfigError(f"{what}: tensor {key} is in both {out[key].file} and {name}: a damaged checkpoint")
            out[key] = TensorInfo(name, dtype, shape)
    return out


def tokenizer_files(d: Path) -> list[Path]:
    """The tokenizer (and generation config) files of ``d`` that an export copies: regular files
    of bounded size; others are left out."""
    found = []
    for name in TOKENIZER_FILES:
        p = d / name
        if p.exists():
            st = regular_file(p, "tokenizer file")
            if st.st_size <= MAX_TOKENIZER_FILE_BYTES:
                found.append(p)
    return found
