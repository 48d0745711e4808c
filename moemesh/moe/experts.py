"""Routed experts: SwiGLU with weights [e, ...] for this rank's e local experts.

Shape letters: M rows (expert-major), D model dim, F expert FFN dim, e local experts.
The experts take rows already grouped by expert plus the group sizes, so they are
testable without a router or a dispatcher.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moemesh.moe.init import normal_
from moemesh.parallel.tags import EXPERT_SHARD


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded gradients (stride 0), such
    as the one ``y.sum()`` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if g.numel() == 0:  # .contiguous() may keep an empty tensor's stride-0 layout
            return torch.zeros(g.shape, dtype=g.dtype, device=g.device)
        return g.contiguous()


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def _grouped_mm(x_MD: torch.Tensor, w_eDF: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_MD, w_eDF, offs=offs_e))


def _looped_mm(x_MD: torch.Tensor, w_eDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = [chunk @ w_eDF[j] for j, chunk in enumerate(torch.split(x_MD, counts))]
    return torch.cat(outs) if outs else x_MD.new_empty(0, w_eDF.shape[-1])


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights, built whole ([E, ...], as one process holds them);
    ``shard`` keeps one EP rank's run of experts (``trainer.parallelize.apply_ep`` calls it)."""

    def __init__(self, *, num_experts: int, hidden_size: int, ffn_size: int):
        super().__init__()
        E, D, Fh = num_experts, hidden_size, ffn_size
        self.num_local_experts, self.first_expert_id = E, 0
        self.use_grouped_mm = grouped_mm_available()  # False: a per-expert loop (apply_kernels)
        self.w1_eDF = nn.Parameter(torch.empty(E, D, Fh))  # gate projection
        self.w3_eDF = nn.Parameter(torch.empty(E, D, Fh))  # up projection
        self.w2_eFD = nn.Parameter(torch.empty(E, Fh, D))  # down projection
        for p in self.parameters():  # checkpoints key expert rows by global expert id
            setattr(p, EXPERT_SHARD, 0)

    def shard(self, ep_rank: int, ep_size: int) -> None:
        """Keep experts ``ep_rank * e .. (ep_rank + 1) * e - 1`` of the E (e = E / ep_size): the
        parameters' rows are sliced (free on the meta device), tagged with the first global id."""
        E = self.num_local_experts
        assert self.first_expert_id == 0 and E % ep_size == 0, (self.first_expert_id, E, ep_size)
        e = E // ep_size
        first = ep_rank * e
        for name in ("w1_eDF", "w3_eDF", "w2_eFD"):
            whole = getattr(self, name)
            part = nn.Parameter(whole.data[first : first + e].clone(), requires_grad=whole.requires_grad)
            setattr(part, EXPERT_SHARD, first)
            setattr(self, name, part)
        self.num_local_experts, self.first_expert_id = e, first

    @torch.no_grad()
    def init_weights(self, *, seed: int, prefix: str, std: float, out_std: float) -> None:
        for j in range(self.num_local_experts):
            key = f"{prefix}.experts.{self.first_expert_id + j}"  # global expert id
            normal_(self.w1_eDF[j], std, seed=seed, key=f"{key}.w1")
            normal_(self.w3_eDF[j], std, seed=seed, key=f"{key}.w3")
            normal_(self.w2_eFD[j], out_std, seed=seed, key=f"{key}.w2")

    def forward(self, x_MD: torch.Tensor, tokens_per_expert_e: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = (w.to(x_MD.dtype) for w in (self.w1_eDF, self.w3_eDF, self.w2_eFD))
        # _grouped_mm needs 16-byte aligned strides: D and F a multiple of 4 (fp32) or 8 (bf16).
        aligned = all(n * x_MD.element_size() % 16 == 0 for n in w1.shape[1:])
        # torch.compile traces _grouped_mm through its meta function, which accepts only
        # bf16 (eager CPU also takes fp32): compiled fp32 takes the loop.
        traceable = x_MD.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        if self.use_grouped_mm and aligned and traceable:
            offs_e = torch.cumsum(tokens_per_expert_e, 0).to(torch.int32)
            h_MF = F.silu(_grouped_mm(x_MD, w1, offs_e)) * _grouped_mm(x_MD, w3, offs_e)
            return _grouped_mm(h_MF, w2, offs_e)
        counts = tokens_per_expert_e.tolist()
        h_MF = F.silu(_looped_mm(x_MD, w1, counts)) * _looped_mm(x_MD, w3, counts)
        return _looped_mm(h_MF, w2, counts)
