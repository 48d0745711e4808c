import pytest
import torch.distributed as dist

from moemesh.parallel.dims import MeshAxis, ParallelDims
from moemesh.parallel.mesh import build_mesh
from tests.dist_utils import run_on_ranks

pytestmark = pytest.mark.slow  # spawns gloo ranks


def _check_meshes(rank, world):
    for dims in (ParallelDims(dp=2, ep=2), ParallelDims(ep=4), ParallelDims(dp=4)):
        pm = build_mesh(dims, "cpu")  # asserts its groups against the rank arithmetic
        assert dist.get_process_group_ranks(pm.ep_group) == dims.group_of(rank, MeshAxis.EP)
        assert dist.get_process_group_ranks(pm.dp_group) == dims.group_of(rank, MeshAxis.DP)
        assert dist.get_process_group_ranks(pm.data_group) == list(range(4))
        assert pm.device_mesh.mesh_dim_names == ("pp", "dp", "ep", "tp")
        assert pm.ep_rank == dims.coords(rank)[MeshAxis.EP]


def test_device_mesh_groups_match_arithmetic():
    run_on_ranks(_check_meshes, 4)
