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

A save is atomic: all ranks write ``step_NNNNNN.tmp/``; after a barrier rank 0 writes
``meta.json`` and renames the directory. A directory without ``meta.json`` or with the
``.tmp`` suffix is never picked, and the previous checkpoint survives a crash during
the save. The last ``keep`` complete checkpoints are kept.

Loading never unpickles arbitrary objects: DCP's metadata file is a pickle, so it is
read with an unpickler that admits only DCP's own metadata classes and plain values.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moe.experts import GroupedExperts
from parallel.tp import TP_SHARD

_DIR_PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


# --- safe reading of DCP's pickled metadata ---------------------------------------

_ALLOWED = {
    "builtins": {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "slice",
                 "NoneType", "getattr"},
    "collections": {"OrderedDict", "defaultdict"},
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
              "bool", "complex64", "complex128", "strided", "sparse_coo", "contiguous_format", "preserve_format",
              "channels_last", "device"},
    "torch.serialization": {"_get_layout"},  # a tensor layout by name
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
}
_ALLOWED_PREFIXES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint._nested_dict", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _ALLOWED and name in _ALLOWED[module] or module.startswith(_ALLOWED_PREFIXES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --- the state, keyed globally ------------------------------------------------------

def _tp_dtensor(local: torch.Tensor, param, tp_mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    dim, _ = getattr(param, TP_SHARD)
    shape = list(local.shape)
    shape[dim] *= tp_mesh.size()
    return DTensor.from_local(local, tp_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _entries(key: str, tensor: torch.Tensor, param, expert_module, tp_mesh) -> dict:
    if expert_module is not None:
        first = expert_module.first_expert_id
        return {f"{key}[{first + j}]": tensor[j] for j in range(tensor.shape[0])}
    if tp_mesh is not None and getattr(param, TP_SHARD, None) is not None:
        return {key: _tp_dtensor(tensor, param, tp_mesh)}
    return {key: tensor}


def training_state(model, optimizer, step_tensor: torch.Tensor, tp_mesh=None) -> dict:
    """Views of the live tensors under global keys (a load writes through them)."""
    owner = {id(p): m for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    state: dict = {"trainer.step": step_tensor}
    for name, p in model.named_parameters():
        expert = owner.get(id(p))
        state.update(_entries(f"model.{name}", p.data, p, expert, tp_mesh))
        opt = optimizer.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in opt:
                state.update(_entries(f"optim.{name}.{moment}", opt[moment], p, expert, tp_mesh))
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


# --- files --------------------------------------------------------------------------

def _barrier():
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(_DIR_PREFIX)
             and not d.name.endswith(".tmp") and (d / "meta.json").is_file()]
    return sorted(found, key=lambda d: d.name)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes a single process,
    which is exactly what a one-rank run is: silence that one warning, nothing else."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(root: Path, step: int, state: dict, meta: dict, *, rank: int, keep: int) -> Path:
    final = root / f"{_DIR_PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with _single_process_quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, state: dict) -> dict:
    """Fill ``state`` in place from the checkpoint at ``path``; return its meta."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    with _single_process_quiet():
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
    return json.loads(meta_file.read_text())


def resolve(resume: str, default_root: Path) -> list[Path]:
    """Checkpoints to try, newest first: resume=auto searches ``default_root``; a path may be
    one checkpoint or a directory of them."""
    if resume == "auto":
        return list(reversed(complete_checkpoints(default_root)))
    p = Path(resume).expanduser()
    if (p / "meta.json").is_file():
        return [p]
    return list(reversed(complete_checkpoints(p)))
