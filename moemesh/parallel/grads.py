"""Gradient reduction so that one optimizer step equals single-process training.

Each data rank's loss is the mean over its own tokens; the global loss is the
mean over the data ranks. Non-expert gradients: sum over the data group (dp x ep),
divide by its size. Expert gradients already hold the sum over their EP group
(the All-to-All's backward brought every EP peer's contribution home), so they
are summed over dp only and divided by the same data-group size.

Gradients are flattened into buckets of at most ``bucket_bytes`` and reduced
with one collective per bucket, not one per parameter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moemesh.parallel import buckets
from moemesh.parallel.comm import all_reduce_, group_size


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    return [params[b] for b in buckets.bucket_slices([p.numel() * p.element_size() for p in params], bucket_bytes)]


class GradReducer:
    """Sum each parameter's gradient over its group, divide by the number of data ranks.

    ``plan`` lists (parameters, group) pairs: non-expert parameters over the data
    group (dp x ep), parameters that see only a TP rank's token slice (router,
    sequence-parallel norms) over dp x ep x tp, expert parameters over dp (x tp).
    """

    def __init__(self, plan, *, data_size: int, bucket_bytes: int | None = None):
        self.data_size = data_size
        limit = buckets.BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        # Even where a group has one rank (experts under pure EP: their All-to-All backward
        # already summed the EP peers), the gradient is still divided by the data ranks.
        # A bucket is skipped only if there is nothing to do: a one-rank group and one data
        # rank (tp2 alone still sums router and expert gradients over its TP peers).
        self.plan = [
            (bucket, group)
            for params, group in plan
            if group_size(group) > 1 or data_size > 1
            for bucket in _buckets(list(params), limit)
        ]

    @torch.no_grad()
    def reduce(self) -> None:
        for bucket, group in self.plan:
            grads = []
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce_(flat, group)
            flat.div_(self.data_size)
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n


@torch.no_grad()
def global_grad_norm(*, replicated, tp_sharded, expert, tp_group, ep_group, pp_group=None) -> torch.Tensor:
    """L2 norm of the whole model's gradient, after reduction.

    Replicated gradients are counted once; TP-sharded ones are summed over tp;
    expert gradients (sharded over ep, replicated over dp and tp) over ep; and
    every pipeline stage holds different parameters: the total is summed over pp.
    """
    params = list(replicated) + list(tp_sharded) + list(expert)
    device = params[0].device if params else torch.device("cpu")

    def sq_local(grads):
        parts = [g.float().pow(2).sum() for g in grads]
        return (torch.stack(parts).sum() if parts else torch.zeros((), device=device)).to(torch.float64)

    def sq(ps):
        # Whole gradients count here; a sharded one (a DTensor, parallel.sharding) counts its
        # shard, summed over the ranks it is sharded over: a small all-reduce per mesh.
        whole, shards = [], {}
        for p in ps:
            if p.grad is None:
                continue
            if hasattr(p.grad, "to_local"):
                shards.setdefault(p.grad.device_mesh, []).append(p.grad.to_local())
            else:
                whole.append(p.grad)
        total = sq_local(whole)
        for mesh, grads in shards.items():
            total = total + all_reduce_(sq_local(grads).reshape(1), mesh.get_group())[0]
        return total

    tp_sq = all_reduce_(sq(tp_sharded).reshape(1), tp_group)
    expert_sq = all_reduce_(sq(expert).reshape(1), ep_group)
    total = all_reduce_((sq(replicated) + tp_sq[0] + expert_sq[0]).reshape(1), pp_group)
    return torch.sqrt(total[0]).float()


@torch.no_grad()
def clip_grads_(params, total_norm: torch.Tensor, max_norm: float | None) -> None:
    """Scale the gradients in place by min(1, max_norm / (total_norm + 1e-6)), without a host sync.

    The coefficient stays on the device: computed in float64 from the float32 norm (the same
    IEEE operations as the Python floats this read from the host before), rounded once to the
    gradients' dtype, so the clipped gradients are bitwise what they were. On CUDA every step
    pays one multiply over the gradients (by exactly 1 when no clip is due, which changes no
    bit) instead of a host round trip; off CUDA, where reading the scale stalls nothing, a
    step that needs no clip skips the multiply. ``max_norm`` 0 or None: off. A non-finite norm leaves the
    gradients untouched, as before (the loop stops or skips such a step; only stop mode's
    device-ordered check on CUDA lets one reach here, after its assert has already failed).
    """
    if not max_norm or max_norm <= 0:
        return
    # A sharded gradient (DTensor) is scaled through its local shard, in place.
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    if not grads:
        return
    denom = total_norm.detach().to(torch.float64) + 1e-6
    # torch.div, not `max_norm / denom`: Tensor.__rtruediv__ is reciprocal() * max_norm, two roundings.
    scale = torch.div(torch.full_like(denom, max_norm), denom).clamp_(max=1.0)
    scale = torch.where(torch.isfinite(denom), scale, torch.ones_like(scale))
    if not scale.is_cuda and bool(scale == 1.0):  # host sync, free off CUDA: skip the no-op multiply
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, scale.to(dtype))
