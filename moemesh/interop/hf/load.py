"""A Hugging Face checkpoint into a model with its layout applied: each rank reads its own boxes.

The model is built whole on the meta device, laid out (PP, TP, EP), materialised and sharded
(FSDP2) as for training; then ``load_weights`` fills every tensor this rank holds, found by
its global key (``parallel.checkpoint_state.parameter_entries``: experts by global id, TP
and FSDP shards as DTensors that say which box of the logical tensor the rank holds). Each box
is read from the transformers tensor ``names.hf_ref`` names, and only that box
(``reader.SliceReader``): no rank reads or holds more than its own part, on any layout and
sharding mode, and every layout starts from the same weights (invariant 1). Upcycling's routers,
which the checkpoint lacks, are drawn by (seed, global name) like moemesh's own init.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh.interop.hf.files import tensor_index
from moemesh.interop.hf.names import Generated, Ref, detect_layout, hf_ref, selected_shape
from moemesh.interop.hf.reader import MIN_BUDGET, SliceReader
from moemesh.moe.config import ModelConfig
from moemesh.moe.init import normal_
from moemesh.parallel.checkpoint_state import parameter_entries
from moemesh.parallel.checkpoint_trust import CheckpointError

MAX_BUDGET = 256 << 20


@dataclass(frozen=True)
class LoadStats:
    tensors: int  # entries filled on this rank
    own_bytes: int  # bytes of the parameters this rank holds
    bytes_read: int  # bytes of the boxes it read from the files
    seconds: float


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's tensor, its offset in the logical tensor, the logical tensor's shape)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        assert tuple(local.shape) == tuple(shape), (tuple(local.shape), tuple(shape))
        return local, tuple(offset), tuple(t.shape)
    return t, (0,) * t.dim(), tuple(t.shape)


def _generate(ref: Generated, local: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...], seed: int) -> None:
    """Rows drawn by (seed, key, draw): rows_per_draw consecutive rows share one draw."""
    full = torch.empty(shape)
    for c in range(shape[0] // ref.rows_per_draw):
        row = normal_(torch.empty(1, *shape[1:]), ref.std, seed=seed, key=f"{ref.key}.{c}")
        full[c * ref.rows_per_draw : (c + 1) * ref.rows_per_draw] = row
    box = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
    local.copy_(full[box])


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: its min and max (NaN propagates through both), one pass, no copy."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_shape(key: str, ref: Ref, index, logical: tuple[int, ...], vocab_size: int) -> None:
    info = index.get(ref.name)
    if info is None:
        raise CheckpointError(f"the checkpoint has no tensor {ref.name} (moemesh's {key})")
    got = selected_shape(ref, info.shape)
    # moemesh pads the vocabulary to a multiple of tp; a checkpoint holds the model's rows (never
    # fewer: the rows it lacks would start at zero, unnoticed).
    vocab = key in ("embed.weight", "head.weight")
    ok = got is not None and (got == logical or (vocab and got[1:] == logical[1:] and got[0] == vocab_size))
    if not ok:
        raise CheckpointError(
            f"tensor {ref.name} is {list(info.shape)} in {info.file}, which does not give moemesh's {key} "
            f"{list(logical)}"
        )


def load_weights(
    model, cfg: ModelConfig, *, seed: int, tp_mesh=None, fsdp_tp_mesh=None, budget_bytes: int | None = None
) -> LoadStats:
    """Fill every parameter of ``model`` (laid out and sharded, on any device) from ``cfg.hf_path``."""
    t0 = time.perf_counter()
    assert cfg.hf_path is not None
    d = Path(cfg.hf_path).expanduser()
    index = tensor_index(d)
    layout = detect_layout(index, cfg, dense_source=cfg.upcycle.num_experts > 0)
    jobs = []
    own = 0
    for key, t in parameter_entries(model, tp_mesh, fsdp_tp_mesh).items():
        local, offset, logical = local_box(t)
        own += local.numel() * local.element_size()
        ref = hf_ref(cfg, key, layout)
        if isinstance(ref, Ref):
            _check_shape(key, ref, index, logical, cfg.vocab_size)
        jobs.append((key, ref, local, offset, logical))
    # File by file, in the files' order: each file is mapped once per budget of reads.
    jobs.sort(key=lambda j: (index[j[1].name].file, j[1].name) if isinstance(j[1], Ref) else ("", j[0]))
    # Mapped pages at most 1.25 budgets (reader.py): about 8% over the rank's own parameters.
    budget = budget_bytes or min(max(own // 16, MIN_BUDGET), MAX_BUDGET)
    with SliceReader(d, index, budget) as reader, torch.no_grad():
        for key, ref, local, offset, logical in jobs:
            if isinstance(ref, Generated):
                _generate(ref, local, offset, logical, seed)
            elif local.numel():
                reader.read(ref, offset, tuple(local.shape), local)
            if local.is_floating_point() and local.numel() and not _finite(local):
                name = ref.name if isinstance(ref, Ref) else key
                raise CheckpointError(f"{d}: non-finite values in {name} (moemesh's {key})")
        read = reader.bytes_read
    return LoadStats(len(jobs), own, read, time.perf_counter() - t0)
