"""A checkpoint's tensors against the model its config.json describes, before any rank starts.

Torch-free: the names, shapes and dtypes come from the safetensors headers (``files``); the
moemesh tensors from ``param_specs``. A missing tensor or a shape that does not match is one
line naming the tensor (the command exits 2 and nothing starts).
"""

from __future__ import annotations

from pathlib import Path

from moemesh.errors import ConfigError
from moemesh.interop.hf.files import FLOAT_DTYPES, tensor_index
from moemesh.interop.hf.names import Ref, detect_layout, hf_ref, moemesh_keys, selected_shape
from moemesh.moe.config import ModelConfig


def _describe(ref: Ref) -> str:
    parts = [f"expert {ref.expert}" if ref.expert is not None else ""]
    parts += [
        f"rows {ref.rows[0]}:{ref.rows[1]}" if ref.rows else "",
        f"cols {ref.cols[0]}:{ref.cols[1]}" if ref.cols else "",
    ]
    sel = ", ".join(p for p in parts if p)
    return f" ({sel})" if sel else ""


def check_checkpoint(cfg: ModelConfig, what: str = "model.hf_path") -> int:
    """Every tensor the model needs is in the checkpoint at ``cfg.hf_path``, in a float dtype, with
    the shape the config implies; return how many were checked. ConfigError (one line) otherwise."""
    assert cfg.hf_path is not None
    d = Path(cfg.hf_path).expanduser()
    index = tensor_index(d, what)
    if cfg.num_layers > len(index):  # each layer has a tensor of its own: refused before any list of them
        raise ConfigError(
            f"{what}: config.json's num_hidden_layers={cfg.num_layers} needs more tensors than the checkpoint's "
            f"{len(index):,}"
        )
    layout = detect_layout(index, cfg, dense_source=cfg.upcycle.num_experts > 0)
    n = 0
    for key, shape in moemesh_keys(cfg):
        ref = hf_ref(cfg, key, layout)
        if not isinstance(ref, Ref):
            continue
        info = index.get(ref.name)
        if info is None:
            raise ConfigError(
                f"{what}: the checkpoint has no tensor {ref.name} (moemesh's {key}; layout {layout.experts})"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"{what}: tensor {ref.name} in {info.file} is {info.dtype}, not a floating-point dtype")
        got = selected_shape(ref, info.shape)
        if got != tuple(shape):
            need = list(reversed(shape)) if ref.transpose else list(shape)
            raise ConfigError(
                f"{what}: tensor {ref.name} is {list(info.shape)} in {info.file}, but config.json's shapes need "
                f"{need}{_describe(ref)} for moemesh's {key}"
            )
        n += 1
    return n
