"""How one rank's copy of the model is laid out and what it runs with.

``trainer.parallelize`` builds one ``ParallelContext`` from the mesh and the run's
config, once, and hands it to the model; the modules read their groups and switches
from it instead of from a dozen constructor arguments. The default is one process:
no groups, the torch kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from moemesh.kernels import TORCH_OPS, KernelOps
from moemesh.parallel.comm import CommMeter, group_size


@dataclass(frozen=True)
class ParallelContext:
    ep_group: Any = None  # the All-to-All group of the routed tokens (None: no EP)
    tp_group: Any = None  # tensor-parallel peers (None: no TP)
    sequence_parallel: bool = False  # asked for; in effect only with TP (see ``sp``)
    # Where the load-balance statistics f_i are reduced: the data x tp group for the
    # "global" scope, None for "local" (per micro-batch, as some papers do).
    stats_group: Any = None
    ops: KernelOps = TORCH_OPS  # gating, permute, chunk sort, unpermute
    use_grouped_mm: bool = True  # torch._grouped_mm where available; False: a per-expert loop
    meter: CommMeter | None = None  # counts the All-to-All bytes and time
    overlap_chunks: int = 0  # All-to-All overlap: chunks pipelined with the experts; 0: off

    @property
    def ep_size(self) -> int:
        return group_size(self.ep_group)

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep_group is None else dist.get_rank(self.ep_group)

    @property
    def tp_size(self) -> int:
        return group_size(self.tp_group)

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect: asked for, and more than one TP rank."""
        return self.sequence_parallel and self.tp_size > 1
