"""The 4-D DeviceMesh ("pp", "dp", "ep", "tp") and the process groups cut from it.

Groups are handed to the model and trainer as arguments; nothing here is global.
For a single rank no process group exists and every group is ``None``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from moemesh.parallel.comm import set_rank_hosts
from moemesh.parallel.dims import MESH_AXES, MeshAxis, ParallelDims


@dataclass
class ParallelMesh:
    dims: ParallelDims
    rank: int
    device_mesh: Any  # torch DeviceMesh, or None for a single rank
    ep_group: Any
    dp_group: Any  # expert gradients are averaged here
    data_group: Any  # dp x ep: non-expert gradients, loss and load statistics
    tp_group: Any
    pp_group: Any
    world_group: Any
    # With TP, TP peers route different token slices: statistics and the gradients of
    # parameters that see only a slice (router, experts) are also summed over tp.
    data_tp_group: Any = None  # dp x ep x tp
    expert_grad_group: Any = None  # dp x tp: expert gradients
    data_mesh: Any = None  # the data group as a 1-D DeviceMesh (what FSDP shards over)

    def __post_init__(self):
        if self.expert_grad_group is None:
            self.expert_grad_group = self.dp_group
        if self.data_tp_group is None:
            self.data_tp_group = self.data_group

    def shard_meshes(self):
        """The 1-D DeviceMeshes the sharded modes shard over (``parallel.fsdp``). Every rank
        must call this, in the same order: flattening the TP-crossing groups is collective."""
        from moemesh.parallel.fsdp import ShardMeshes

        m, tp = self.device_mesh, self.dims.tp
        dp, ep, tp_axis = MeshAxis.DP.value, MeshAxis.EP.value, MeshAxis.TP.value
        return ShardMeshes(
            data=self.data_mesh,
            expert_data=m[dp, tp_axis]._flatten("expert_data") if tp > 1 else m[dp],
            data_tp=m[dp, ep, tp_axis]._flatten("data_tp") if tp > 1 else None,
            data_size=self.dims.data_size,
            tp_size=tp,
        )

    @property
    def coords(self) -> dict[MeshAxis, int]:
        return self.dims.coords(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.coords[MeshAxis.EP]

    @property
    def data_rank(self) -> int:
        return self.dims.data_rank(self.rank)


def single_rank_mesh() -> ParallelMesh:
    return ParallelMesh(ParallelDims(), 0, None, None, None, None, None, None, None)


def _my_group(dims: ParallelDims, rank: int, axes):
    """Every rank creates every group along ``axes`` (same order everywhere); keep this rank's."""
    mine = None
    for ranks in dims.groups(axes):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """Build the mesh on an initialised default process group of ``dims.world_size`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    if dims.world_size == 1 and not dist.is_initialized():
        return single_rank_mesh()
    # Every rank's host, once: gloo exchanges rows across hosts with their receives first
    # (parallel/comm.py:exchange_rows); other backends keep their own All-to-All.
    hosts: list | None = None
    if dist.get_backend() == "gloo":
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
    set_rank_hosts(hosts)
    mesh = init_device_mesh(device_type, dims.shape(), mesh_dim_names=tuple(a.value for a in MESH_AXES))
    data = mesh[MeshAxis.DP.value, MeshAxis.EP.value]._flatten("data")
    rank = dist.get_rank()
    pm = ParallelMesh(
        dims=dims,
        rank=rank,
        device_mesh=mesh,
        ep_group=mesh[MeshAxis.EP.value].get_group(),
        dp_group=mesh[MeshAxis.DP.value].get_group(),
        data_group=data.get_group(),
        tp_group=mesh[MeshAxis.TP.value].get_group(),
        pp_group=mesh[MeshAxis.PP.value].get_group(),
        world_group=dist.group.WORLD,
        data_mesh=data,
    )
    if dims.tp > 1:
        pm.data_tp_group = _my_group(dims, rank, (MeshAxis.DP, MeshAxis.EP, MeshAxis.TP))
        pm.expert_grad_group = _my_group(dims, rank, (MeshAxis.DP, MeshAxis.TP))
    # The mesh's groups must be the ones the rank arithmetic (and the docs) describe.
    for axis, group in ((MeshAxis.EP, pm.ep_group), (MeshAxis.DP, pm.dp_group)):
        assert dist.get_process_group_ranks(group) == dims.group_of(rank, axis), axis
    assert dist.get_process_group_ranks(pm.data_group) == dims.group_of(rank, (MeshAxis.DP, MeshAxis.EP))
    return pm
