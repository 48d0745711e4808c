"""Parallel degrees and the arithmetic of ranks on the 4-D mesh.

Rank order, innermost first: tp, ep, dp, pp (so tensor-parallel peers are
neighbours, an EP group is a run of consecutive ranks, DP peers are strided and
pipeline stages are outermost). Everything here is plain arithmetic, so the
layout of 1,024 ranks can be printed or tested without starting a process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from moemesh.errors import ConfigError


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary padded to a multiple of the TP degree (each rank holds vocab/tp rows)."""
    return -(-vocab_size // tp) * tp


class MeshAxis(enum.StrEnum):
    PP = "pp"
    DP = "dp"
    EP = "ep"
    TP = "tp"


# Outermost first: the order of the DeviceMesh's dimensions.
MESH_AXES: tuple[MeshAxis, ...] = (MeshAxis.PP, MeshAxis.DP, MeshAxis.EP, MeshAxis.TP)


def layout_name(dims: ParallelDims) -> str:
    """The layout's name as the presets spell it: degrees above 1, pp tp ep dp ("pp2_ep2_dp2"); all 1: "single".

    The one naming of a layout: a run's directory, summary.json ``parallel``, the wandb run
    and the planner's commands all carry it, so runs compare by what they ran.
    """
    parts = [f"{a}{n}" for a, n in (("pp", dims.pp), ("tp", dims.tp), ("ep", dims.ep), ("dp", dims.dp)) if n > 1]
    return "_".join(parts) or "single"


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    ep: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_config(cls, parallel) -> ParallelDims:
        return cls(
            dp=parallel.data_parallel_size,
            ep=parallel.expert_parallel_size,
            tp=parallel.tensor_parallel_size,
            pp=parallel.pipeline_parallel_size,
        )

    def __post_init__(self) -> None:
        for key, value in (
            ("parallel.data_parallel_size", self.dp),
            ("parallel.expert_parallel_size", self.ep),
            ("parallel.tensor_parallel_size", self.tp),
            ("parallel.pipeline_parallel_size", self.pp),
        ):
            if value < 1:
                raise ConfigError(f"{key}={value} must be a positive integer")

    def validate(self, launcher_world_size: int | None = None) -> None:
        """The world a launcher started must be this layout's (the degrees were checked when built)."""
        if launcher_world_size is not None and launcher_world_size != self.world_size:
            raise ConfigError(
                f"WORLD_SIZE={launcher_world_size} from the launcher != dp*ep*tp*pp = "
                f"{self.dp}*{self.ep}*{self.tp}*{self.pp} = {self.world_size}; "
                f"start {self.world_size} ranks or pick a parallel preset for {launcher_world_size}"
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp * self.pp

    @property
    def data_size(self) -> int:
        """Ranks that read distinct data: the dp x ep "data" group."""
        return self.dp * self.ep

    def shape(self) -> tuple[int, ...]:
        return tuple(self.size(a) for a in MESH_AXES)

    def size(self, axis: MeshAxis) -> int:
        return {MeshAxis.PP: self.pp, MeshAxis.DP: self.dp, MeshAxis.EP: self.ep, MeshAxis.TP: self.tp}[MeshAxis(axis)]

    def coords(self, rank: int) -> dict[MeshAxis, int]:
        """Mesh coordinates of a global rank (row-major over MESH_AXES, tp fastest)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        out = {}
        for axis in reversed(MESH_AXES):
            n = self.size(axis)
            out[axis] = rank % n
            rank //= n
        return {a: out[a] for a in MESH_AXES}

    def rank_of(self, coords: dict[MeshAxis, int]) -> int:
        rank = 0
        for axis in MESH_AXES:
            rank = rank * self.size(axis) + coords[axis]
        return rank

    def data_rank(self, rank: int) -> int:
        """Index of this rank's slice of the global batch: dp coordinate major, ep minor."""
        c = self.coords(rank)
        return c[MeshAxis.DP] * self.ep + c[MeshAxis.EP]

    def groups(self, axes: tuple[MeshAxis, ...] | MeshAxis) -> list[list[int]]:
        """All groups along ``axes``: ranks that differ only in those coordinates."""
        if isinstance(axes, (MeshAxis, str)):
            axes = (MeshAxis(axes),)
        axes = tuple(MeshAxis(a) for a in axes)
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = tuple(c[a] for a in MESH_AXES if a not in axes)
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def group_of(self, rank: int, axes) -> list[int]:
        for g in self.groups(axes):
            if rank in g:
                return g
        raise AssertionError("every rank is in one group per axis")

    def ep_nodes(self, gpus_per_node: int) -> int | None:
        """The nodes one EP group spans, each holding the same number of its ranks (an EP group is
        ep x tp consecutive ranks, its members tp apart); None where they do not split evenly."""
        if gpus_per_node % self.tp:
            return None
        per_node = gpus_per_node // self.tp  # EP ranks of one group on a node
        if per_node >= self.ep:
            return 1 if gpus_per_node % (self.ep * self.tp) == 0 else None
        return self.ep // per_node if self.ep % per_node == 0 else None

    def describe(self) -> str:
        ranks = "rank" if self.world_size == 1 else "ranks"
        return f"dp{self.dp}·ep{self.ep}·tp{self.tp}·pp{self.pp} = {self.world_size} {ranks}"
