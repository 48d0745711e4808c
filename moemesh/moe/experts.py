"""Routed experts: SwiGLU with weights [e, ...] for this rank's e local experts.

Shape letters: M rows (expert-major), D model dim, F expert FFN dim, e local experts.
The experts take rows already grouped by expert plus the group sizes, so they are
testable without a router or a dispatcher.

Per expert: gate = x w1, up = x w3 (grouped GEMMs under autograd, which keep x), then
``_SwiGLUDown``: h = silu(gate) * up and y = h w2 in one autograd node that keeps gate and
up only. Its backward computes dh = dy w2^T, then (dgate, dup, h) in one pass of the kernels'
``swiglu_bwd`` (silu and h recomputed), then dw2 = h^T dy. Kept per routed row: D + 2 F values
(x, gate, up), where autograd over the same formulas keeps D + 4 F (x, gate, silu(gate), up,
and h for the down projection); ``planning/memory.py`` counts the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moemesh.kernels import TORCH_OPS, KernelOps
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


def _looped_weight_grad(h_MF: torch.Tensor, dy_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per expert h_j^T dy_j: [e, F, D] (zeros for an expert without rows)."""
    parts = zip(torch.split(h_MF, counts), torch.split(dy_MD, counts))
    return torch.stack([h.t() @ dy for h, dy in parts])


class _SwiGLUDown(torch.autograd.Function):
    """y = (silu(gate) * up) w2 per expert, keeping gate and up only (see the module doc).

    ``offs_e``: the experts' row offsets (grouped GEMMs); ``counts``: the rows per expert as a
    list (the per-expert loop), None with ``offs_e``. ``ops``: the kernels' swiglu primitives."""

    @staticmethod
    def forward(ctx, gate_MF, up_MF, w2_eFD, offs_e, counts, ops):
        h_MF = ops.swiglu_fwd(gate_MF, up_MF)
        ctx.save_for_backward(gate_MF, up_MF, w2_eFD, offs_e)
        ctx.counts, ctx.ops = counts, ops
        if counts is None:
            return torch._grouped_mm(h_MF, w2_eFD, offs=offs_e)
        return _looped_mm(h_MF, w2_eFD, counts)

    @staticmethod
    def backward(ctx, dy_MD):
        gate_MF, up_MF, w2_eFD, offs_e = ctx.saved_tensors
        # y.sum() and friends give an expanded gradient; .contiguous() may keep an empty one's stride 0
        dy_MD = (
            dy_MD.contiguous() if dy_MD.numel() else torch.zeros(dy_MD.shape, dtype=dy_MD.dtype, device=dy_MD.device)
        )
        w2t_eDF = w2_eFD.transpose(-2, -1)
        if ctx.counts is None:
            dh_MF = torch._grouped_mm(dy_MD, w2t_eDF, offs=offs_e)
        else:
            dh_MF = _looped_mm(dy_MD, w2t_eDF, ctx.counts)
        dgate_MF, dup_MF, h_MF = ctx.ops.swiglu_bwd(dh_MF, gate_MF, up_MF)
        dw2_eFD = None
        if ctx.needs_input_grad[2]:
            if ctx.counts is None:
                dw2_eFD = torch._grouped_mm(h_MF.t(), dy_MD, offs=offs_e)
            else:
                dw2_eFD = _looped_weight_grad(h_MF, dy_MD, ctx.counts)
        return dgate_MF, dup_MF, dw2_eFD, None, None, None


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights, built whole ([E, ...], as one process holds them);
    ``shard`` keeps one EP rank's run of experts (``trainer.parallelize.apply_ep`` calls it)."""

    def __init__(self, *, num_experts: int, hidden_size: int, ffn_size: int):
        super().__init__()
        E, D, Fh = num_experts, hidden_size, ffn_size
        self.num_local_experts, self.first_expert_id = E, 0
        self.use_grouped_mm = grouped_mm_available()  # False: a per-expert loop (apply_kernels)
        self.ops: KernelOps = TORCH_OPS  # the SwiGLU kernels (apply_kernels)
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
        offs_e = torch.cumsum(tokens_per_expert_e, 0).to(torch.int32)
        if self.use_grouped_mm and aligned and traceable:
            gate_MF, up_MF = _grouped_mm(x_MD, w1, offs_e), _grouped_mm(x_MD, w3, offs_e)
            return _SwiGLUDown.apply(gate_MF, up_MF, w2, offs_e, None, self.ops)
        counts = tokens_per_expert_e.tolist()  # host sync: the loop's bounds
        gate_MF, up_MF = _looped_mm(x_MD, w1, counts), _looped_mm(x_MD, w3, counts)
        return _SwiGLUDown.apply(gate_MF, up_MF, w2, offs_e, counts, self.ops)
