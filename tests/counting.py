"""Counting what a step runs, for the tests that hold the planner to it: the products'
FLOPs (``MatmulFlops``), the collectives with their sizes (``CollectiveLog``), and a fake
world in which this process is one rank of several (``fake_world``).

The fake backend (torch's) returns from every collective without communicating: shapes are
a real rank's, values are not, so what it can check is what does not depend on the values
(FLOPs, collective sizes, bytes kept), and only where each rank's work is fixed by the shapes
(TP, PP; not EP, whose rows follow the routing)."""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


class MatmulFlops(FlopCounterMode):
    """torch's FLOP counter, with what it does not count on a CPU: ``addmm_`` (the per-expert
    loop's weight gradients) and the CPU flash attention, forward and backward (two and four
    products of S x S x Dh per head)."""

    def __init__(self):
        aten = torch.ops.aten

        def addmm_(_, a, b, *args, out_shape=None, **kwargs):
            return 2 * a[0] * a[1] * b[1]

        def attention(q, k, *args, out_shape=None, **kwargs):
            return 4 * q[0] * q[1] * q[2] * k[2] * q[3]

        def attention_backward(grad, q, k, *args, out_shape=None, **kwargs):
            return 2 * attention(q, k)

        super().__init__(
            display=False,
            custom_mapping={
                aten.addmm_: addmm_,
                aten._scaled_dot_product_flash_attention_for_cpu: attention,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
            },
        )


def _numel(tensors) -> int:
    return sum(math.prod(t.shape) for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))


class CollectiveLog(TorchDispatchMode):
    """Every c10d operator issued, in order, as (name, its group's size, elements): an
    all-reduce's tensor, an all-gather's gathered output, a reduce-scatter's input before it
    is scattered (other operators: every tensor they are given); ``widths``: each one's bytes
    per element (its first tensor's)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []
        self.widths: list[int] = []

    @property
    def ops(self) -> Counter:
        """How many of each (name, group size)."""
        return Counter((name, size) for name, size, _ in self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func.name()
            pg = next(a for a in args if isinstance(a, torch.ScriptObject))
            whole = {
                "c10d::allreduce_": args[0],
                "c10d::allgather_": args[0],
                "c10d::_allgather_base_": args[0],
                "c10d::reduce_scatter_": args[1],
                "c10d::_reduce_scatter_base_": args[1],
            }
            self.calls.append((name, dist.ProcessGroup.unbox(pg).size(), _numel(whole.get(name, args))))
            self.widths.append(next(t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)).element_size())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0):
    """This process as rank ``rank`` of a fake world of ``world_size`` (the default group)."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
