"""The training state as a checkpoint stores it: every tensor under a global key.

A load writes through the views ``training_state`` returns, so the live model and
optimizer are filled in place. Keys never depend on the saving rank:
  * replicated tensors under their parameter name (DCP keeps one copy);
  * routed experts one by one under their global expert id,
    ``model.layers.3.moe.experts.w1_eDF[17]``, so EP=2 saves load into EP=4 or a single
    process with each expert where it belongs (experts are found by their EXPERT_SHARD tag);
  * tensor-parallel shards as DTensors over the tp axis of the logical tensor (a vocabulary
    without its padding to a multiple of tp), so any TP degree reads the rows it owns (found
    by their TP_SHARD tag);
  * pipeline stages only hold their layers' keys; any split finds its own;
  * in the sharded modes (parallel.sharding, FSDP2) a parameter is a DTensor shard of
    what the rank would hold in ``none``; it is described under the same global keys
    (experts one by one, TP shards as 2-D (data, tp) DTensors), so a checkpoint moves
    between modes and layouts.
The same keys carry AdamW's moments (``optim.<param>.exp_avg``), plus the step, the
RNG state and the expert-bias buffers.
"""

from __future__ import annotations

import torch

from moemesh.parallel.tags import TP_SHARD, expert_first_id


def _real_rows(local: torch.Tensor, dim: int, logical: int, tp_rank: int) -> torch.Tensor:
    """The part of a TP shard that holds the logical tensor. A vocabulary padded to a multiple of
    tp ends in zero rows on the last ranks; no checkpoint stores them, so one saved under tp=2
    (97 rows, padded to 98) loads under tp=1 (97) and back. Rank r holds rows [r*n, (r+1)*n) of
    the padded tensor, n = ceil(logical / tp): the chunks DTensor's Shard gives the logical one."""
    n = local.shape[dim]
    real = max(0, min(n, logical - tp_rank * n))
    return local if real == n else local.narrow(dim, 0, real)


def _tp_dtensor(local: torch.Tensor, param, tp_mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    dim, logical = getattr(param, TP_SHARD)
    shape = list(local.shape)
    shape[dim] = logical
    local = _real_rows(local, dim, logical, tp_mesh.get_local_rank())
    return DTensor.from_local(
        local,
        tp_mesh,
        [Shard(dim)],
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def _contiguous_stride(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _sharded_entries(key: str, tensor, param, tp_mesh, fsdp_tp_mesh) -> dict:
    """Entries of a sharded-mode tensor: a DTensor over FSDP's 1-D mesh, Shard(d), whose
    logical tensor is what the rank holds in ``none`` (an EP or TP shard, or all of it)."""
    from torch.distributed.tensor import DTensor, Shard

    local, mesh = tensor.to_local(), tensor.device_mesh
    (placement,) = tensor.placements
    d = placement.dim
    first = expert_first_id(param)
    if first is not None:
        if d == 0:  # whole experts on each rank: chunk i of the rank's EP shard
            start = mesh.get_local_rank() * -(-tensor.shape[0] // mesh.size())
            return {f"{key}[{first + start + j}]": local[j] for j in range(local.shape[0])}
        shape = tensor.shape[1:]  # every expert split along d - 1 over the mesh
        return {
            f"{key}[{first + j}]": DTensor.from_local(
                local[j], mesh, [Shard(d - 1)], run_check=False, shape=shape, stride=_contiguous_stride(shape)
            )
            for j in range(tensor.shape[0])
        }
    if tp_mesh is not None and getattr(param, TP_SHARD, None) is not None:
        tp_dim, logical = getattr(param, TP_SHARD)
        assert d != tp_dim, (key, d)  # parallel.fsdp shards a TP-split dim 0 along dim 1
        shape = list(tensor.shape)
        shape[tp_dim] = logical
        local = _real_rows(local, tp_dim, logical, tp_mesh.get_local_rank())
        return {
            key: DTensor.from_local(
                local,
                fsdp_tp_mesh,
                [Shard(d), Shard(tp_dim)],
                run_check=False,
                shape=torch.Size(shape),
                stride=_contiguous_stride(shape),
            )
        }
    return {key: tensor}  # the whole logical tensor, sharded over FSDP's mesh


def _entries(key: str, tensor: torch.Tensor, param, tp_mesh, fsdp_tp_mesh=None) -> dict:
    if hasattr(tensor, "to_local"):
        return _sharded_entries(key, tensor, param, tp_mesh, fsdp_tp_mesh)
    first = expert_first_id(param)
    if first is not None:
        return {f"{key}[{first + j}]": tensor[j] for j in range(tensor.shape[0])}
    if tp_mesh is not None and getattr(param, TP_SHARD, None) is not None:
        return {key: _tp_dtensor(tensor, param, tp_mesh)}
    return {key: tensor}


def parameter_entries(model, tp_mesh=None, fsdp_tp_mesh=None) -> dict:
    """This rank's parameters under their global keys (no ``model.`` prefix): views of the live
    tensors, experts one by one, TP and FSDP shards as DTensors of the logical tensor. What a
    checkpoint stores, and what an import (``moemesh.interop.hf``) fills."""
    state: dict = {}
    for name, p in model.named_parameters():
        state.update(_entries(name, p.data, p, tp_mesh, fsdp_tp_mesh))
    return state


def training_state(model, optimizer, step_tensor: torch.Tensor, tp_mesh=None, fsdp_tp_mesh=None) -> dict:
    """Views of the live tensors under global keys (a load writes through them).

    ``fsdp_tp_mesh``: with TP in a sharded mode, the 2-D (data, tp) mesh over which a TP
    shard's FSDP shards lie."""
    state: dict = {"trainer.step": step_tensor}
    for name, p in model.named_parameters():
        state.update(_entries(f"model.{name}", p.data, p, tp_mesh, fsdp_tp_mesh))
        opt = optimizer.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in opt:
                state.update(_entries(f"optim.{name}.{moment}", opt[moment], p, tp_mesh, fsdp_tp_mesh))
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


def optimizer_step(optimizer) -> int:
    """AdamW's update count: the trainer's step less the steps it skipped (0 before the first)."""
    return max((int(st["step"]) for st in optimizer.state.values() if "step" in st), default=0)


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
