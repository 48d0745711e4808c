"""AdamW with decoupled weight decay on matrices only; warmup then cosine decay."""

from __future__ import annotations

import math

import torch

from moemesh.config.schema import TrainerConfig


def build_optimizer(model: torch.nn.Module, t: TrainerConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same per-tensor arithmetic on every layout (and on CPU it is no slower here).
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=False)


def lr_at(step: int, t: TrainerConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    span = max(t.steps - 1 - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)
