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

import math

import torch
import torch.nn as nn

from parallel.comm import all_reduce_, group_size


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    out, cur, size = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if cur and size + nbytes > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    if cur:
        out.append(cur)
    return out


class GradReducer:
    def __init__(self, *, expert_params, non_expert_params, dp_group, data_group, bucket_bytes: int = 25 * 2**20):
        self.data_size = group_size(data_group)
        self.plan = [
            (bucket, group)
            for params, group in ((list(non_expert_params), data_group), (list(expert_params), dp_group))
            for bucket in _buckets(params, bucket_bytes)
        ]

    @torch.no_grad()
    def reduce(self) -> None:
        if self.data_size == 1:
            return
        for bucket, group in self.plan:
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            all_reduce_(flat, group)
            flat.div_(self.data_size)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n


@torch.no_grad()
def global_grad_norm(*, expert_params, non_expert_params, ep_group) -> torch.Tensor:
    """L2 norm of the whole model's gradient, after reduction.

    Non-expert gradients are replicated on every rank: count them once. Expert
    gradients are sharded over EP: sum their squares over the EP group.
    """
    device = next(iter(list(non_expert_params) + list(expert_params))).device

    def sq(params):
        grads = [p.grad.float().pow(2).sum() for p in params if p.grad is not None]
        return torch.stack(grads).sum() if grads else torch.zeros((), device=device)

    expert_sq = sq(expert_params).reshape(1).to(torch.float64)
    all_reduce_(expert_sq, ep_group)
    return torch.sqrt(sq(non_expert_params).to(torch.float64) + expert_sq[0]).float()


@torch.no_grad()
def clip_grads_(params, total_norm: torch.Tensor, max_norm: float) -> None:
    if max_norm <= 0 or not math.isfinite(float(total_norm)):
        return
    scale = max_norm / (float(total_norm) + 1e-6)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
