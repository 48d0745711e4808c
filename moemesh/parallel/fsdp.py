"""Sharded data parallelism (ZeRO-2 / ZeRO-3) on torch's FSDP2 ``fully_shard``.

Which ranks hold the same weights decides where a parameter is sharded, read off its
tags (``parallel.tags``), never its module class:
  * non-expert parameters over the data group (dp x ep), one FSDP unit per transformer
    block and a root unit for the embedding, final norm and head;
  * routed experts over the expert-data group (dp x tp: the ranks that hold the same
    experts), one unit per MoE layer's expert module;
  * with TP, parameters whose gradients sum over dp x ep x tp (the router, a shared expert's
    gate, q/k/v biases, qk-norm weights; the norms under sequence parallelism;
    ``GRAD_GROUP == "data_tp"``) over that group, one unit each.

Gradients: FSDP2 reduce-scatters each unit's gradients as its backward finishes, summing
over the unit's group and dividing by a factor. Every unit divides by the number of data
ranks (dp x ep), as ``parallel.grads.GradReducer`` does, so one optimizer step equals
single-process training: non-expert units by their own group size; expert units sum over
dp x tp of gradients that the All-to-All's backward already summed over ep; router units
sum TP peers' partial gradients (each saw a token slice) too.

zero2: ``reshard_after_forward=False`` (whole parameters from a unit's forward to its
backward; gradients and optimizer state sharded). zero3: ``reshard_after_forward=True``
(each unit gathered for its forward and again for its backward).

Shard dimension: dim 0 (torch.chunk semantics: rank i holds chunk i), except a parameter
that TP already splits along dim 0 (shards on dim 1, so a checkpoint can describe the
two splits as a 2-D DTensor), and experts, which shard along the expert dim when the
local experts divide evenly over the group and along dim 1 otherwise.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from moemesh.fields import Sharding
from moemesh.parallel.tags import GRAD_GROUP, TP_SHARD, expert_first_id, shard_dim

MODES = tuple(m.value for m in Sharding)

# The expert unit's output is a view (moe/experts.py's _ContiguousGrad returns x.view_as(x), as
# an autograd Function must not return its input). FSDP2 warns because an in-place op on such
# a view would skip its pre-backward hook; every consumer (the combine, the overlap's
# to_rank_major) reads it out of place, and the sharded == none tests would see a lost hook.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGroupedExperts\) returned a view tensor")


@dataclass(frozen=True)
class ShardMeshes:
    """The 1-D DeviceMeshes FSDP shards over, and the divide factor every unit uses."""

    data: Any  # dp x ep
    expert_data: Any  # dp x tp
    data_tp: Any | None  # dp x ep x tp; None without TP
    data_size: int  # dp x ep: gradients are divided by this (the data ranks)
    tp_size: int = 1


def param_shard_dim(param: torch.Tensor, *, tp_size: int, group_size: int) -> int:
    """The dimension FSDP splits ``param`` along (``parallel.tags.shard_dim``, from its tags)."""
    tp = getattr(param, TP_SHARD, None)
    return shard_dim(
        tuple(param.shape),
        expert=expert_first_id(param) is not None,
        tp_dim=tp[0] if tp is not None else None,
        tp_size=tp_size,
        group_size=group_size,
    )


class ExposedReduceTimer:
    """Time a rank waits on gradient reduction in the sharded modes: inside FSDP's
    post-backward hooks (reduce-scatter issue and any wait they do) and its final wait
    for outstanding reductions. Wall clock on CPU, where a gloo collective holds the
    thread (all of it is exposed); CUDA events on the compute stream on GPU (the time
    that stream is held up; a reduce-scatter running beside the backward costs nothing)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._events: list = []

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    self._events.append((start, end))
                else:
                    self.seconds += time.perf_counter() - t0

        return timed

    def collect(self) -> float:
        """Seconds since the last collect (resolves CUDA events: call after a sync)."""
        for start, end in self._events:
            self.seconds += start.elapsed_time(end) / 1e3
        self._events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def reshard_all(root: nn.Module) -> None:
    """Back to the sharded parameters everywhere: a forward without backward (evaluation)
    under zero2 leaves every unit gathered, and the memory report, a checkpoint and the
    optimizer all read the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _own(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _is_expert_module(module: nn.Module) -> bool:
    own = _own(module)
    return bool(own) and all(expert_first_id(p) is not None for p in own)


def _is_data_tp_module(module: nn.Module) -> bool:
    own = _own(module)
    return bool(own) and all(getattr(p, GRAD_GROUP, "data") == "data_tp" for p in own)


def apply_fsdp(
    root: nn.Module,
    blocks: list[nn.Module],
    meshes: ShardMeshes,
    *,
    mode: str,
    param_dtype: torch.dtype | None = None,
    timer: ExposedReduceTimer | None = None,
    force_sum: bool = False,
    ignored: set[nn.Parameter] | None = None,
) -> None:
    """Shard ``root`` in place: one unit per block (its experts and, with TP, its
    dp x ep x tp parameters in units of their own), then the root for what is left.

    ``param_dtype``: the compute dtype of gathered parameters (bf16 on CUDA); master
    weights, gradient reduction and optimizer state stay fp32. ``force_sum``: reduce with
    SUM and divide afterwards (gloo has no pre-multiplied sum, which NCCL uses for the
    divide factor). ``ignored``: parameters of ``root`` left to another root that shares them.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mode not in (Sharding.zero2, Sharding.zero3):
        raise ValueError(f"parallel.sharding={mode!r}: apply_fsdp builds zero2 or zero3")
    # FSDP replaces every parameter with a new one (a DTensor shard): keep the tags.
    tags = {name: dict(vars(p)) for name, p in root.named_parameters()}
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    shard = _UnitSharder(meshes, mode=mode, mp=mp, force_sum=force_sum)
    for block in blocks:
        shard.inner_units(block, [])
        shard(block, meshes.data)
    shard.inner_units(root, blocks)
    shard(root, meshes.data, ignored=ignored)
    for name, p in root.named_parameters():
        for key, value in tags[name].items():
            setattr(p, key, value)
    if timer is not None:
        for module in shard.units:
            state = module._get_fsdp_state()  # type: ignore[operator]
            for group in state._fsdp_param_groups:
                group.post_backward = timer.wrap(group.post_backward)
                group.finalize_backward = timer.wrap(group.finalize_backward)


class _UnitSharder:
    """Makes FSDP units, one ``fully_shard`` each, and remembers them in order."""

    def __init__(self, meshes: ShardMeshes, *, mode: str, mp, force_sum: bool):
        self.meshes, self.mode, self.mp, self.force_sum = meshes, mode, mp, force_sum
        self.units: list[nn.Module] = []

    def __call__(self, module: nn.Module, mesh, ignored: set[nn.Parameter] | None = None) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        n, tp = mesh.size(), self.meshes.tp_size
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=self.mode == Sharding.zero3,
            shard_placement_fn=lambda p: Shard(param_shard_dim(p, tp_size=tp, group_size=n)),
            mp_policy=self.mp,
            ignored_params=ignored or None,
        )
        module.set_gradient_divide_factor(float(self.meshes.data_size))  # type: ignore[operator]
        # Not on a one-rank mesh: there FSDP (torch 2.13) divides the gradient by the factor
        # in place of the reduce-scatter and, with forced sums, divides it again afterwards.
        if self.force_sum and n > 1:
            module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        self.units.append(module)

    def inner_units(self, scope: nn.Module, skip: list[nn.Module]) -> None:
        """Units of their own inside ``scope`` (not inside ``skip``): experts over the expert-data
        group; with TP, modules of dp x ep x tp parameters over that group."""
        inside = {id(m) for b in skip for m in b.modules()}
        for module in list(scope.modules()):
            if id(module) in inside or module is scope:
                continue
            if _is_expert_module(module):
                self(module, self.meshes.expert_data)
            elif self.meshes.data_tp is not None and _is_data_tp_module(module):
                self(module, self.meshes.data_tp)
