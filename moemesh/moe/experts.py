"""Routed experts: SwiGLU with weights [e, ...] for this rank's e local experts.

Shape letters: M rows (expert-major), D model dim, F expert FFN dim, e local experts.
The experts take rows already grouped by expert plus the group sizes, so they are
testable without a router or a dispatcher.

Per expert: gate = x w1, up = x w3, h = silu(gate) * up, y = h w2. The backward computes
dh = dy w2^T, then (dgate, dup, h) in one pass of the kernels' ``swiglu_bwd`` (silu and h
recomputed), then dw2 = h^T dy, dx = dgate w1^T + dup w3^T, dw1 = x^T dgate, dw3 = x^T dup.
Kept per routed row: D + 2 F values (x, gate, up), where autograd over the same formulas keeps
D + 4 F (x, gate, silu(gate), up, and h for the down projection); ``planning/memory.py``
counts the same. Two paths compute it (``GroupedExperts.use_grouped_mm``):

* grouped GEMMs, a GPU's default (no host sync): gate and up by ``torch._grouped_mm`` under
  autograd (which keeps x), then ``_SwiGLUDown``, one autograd node for the SwiGLU and the
  down projection that keeps gate and up only;
* the per-expert loop, a CPU's default: ``_ExpertLoop``, one autograd node for all of it, one
  expert's rows at a time, writing into one output. On a CPU ``torch._grouped_mm`` loops
  over the experts too, but each of its results is all M rows: above 32 MiB glibc serves that
  with fresh pages, which fault as the GEMM first writes them (measured on a 2-core Xeon VM:
  8,192 x 512 -> 1,024 in 35.8 ms with a fresh output, 26.6 ms as eight 1,024-row products
  into reused memory). ``scripts/bench_moe.py`` times both paths.

Both compute in the rows' dtype (the weights are cast to it; no autocast inside), and both
backwards compute only the gradients their pass asks for (``_wanted``), so the zero-bubble
schedules' split backward runs each GEMM once.
"""

from __future__ import annotations

from itertools import accumulate, pairwise

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from moemesh.kernels import TORCH_OPS, KernelOps
from moemesh.moe.init import normal_
from moemesh.parallel.recompute import kept_under_selective
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


def _grad_nodes(*tensors: torch.Tensor) -> tuple:
    """The autograd node each input's gradient flows into (None for one without a gradient):
    a backward asks ``_wanted`` which of them this backward pass will run. Under
    ``torch.inference_mode`` no backward follows (and a leaf's node cannot be reached)."""
    if torch.is_inference_mode_enabled():
        return (None,) * len(tensors)
    return tuple(get_gradient_edge(t).node if t.requires_grad else None for t in tensors)


def _wanted(ctx) -> tuple[bool, ...]:
    """Which of the inputs' gradients this backward pass uses. A split backward (the zero-bubble
    pipeline schedules: torch's ``stage_backward_input``, then ``stage_backward_weight``) asks
    for the input's gradient and the weights' in separate passes, each through the same node;
    computing both in each would double the node's GEMMs."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)  # what register_multi_grad_hook uses
    out = []
    for needed, node in zip(ctx.needs_input_grad, ctx.grad_nodes, strict=False):
        try:
            out.append(needed and node is not None and (will_run is None or will_run(node)))
        except RuntimeError:  # autograd.grad with a leaf among its inputs: torch cannot tell
            out.append(needed)
    return tuple(out)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def _grouped_mm(x_MD: torch.Tensor, w_eDF: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_MD, w_eDF, offs=offs_e))


class _ExpertLoop(torch.autograd.Function):
    """The whole SwiGLU expert block, one expert at a time: the CPU path (and any run without
    ``torch._grouped_mm``). Same formulas and same kept tensors (x, gate, up) as the grouped path;
    the difference is memory. Every temporary is one expert's rows (gate, up, h, dh, dgate, dup:
    [M_j, F]) and every result is written into its place in one output (``torch.mm(out=)``,
    ``addmm_``), so nothing of all M rows by F is allocated: an expert's rows are reused heap
    memory, still warm in cache when the SwiGLU reads them (module doc).

    ``counts``: the rows per expert (a list: a host sync, free on a CPU); ``ops``: the kernels'
    swiglu primitives."""

    @staticmethod
    def forward(ctx, x_MD, w1_eDF, w3_eDF, w2_eFD, counts, ops):
        # under selective checkpointing the results are kept, as the grouped GEMMs' are
        y_MD, kept = kept_under_selective(_loop_forward, x_MD, w1_eDF, w3_eDF, w2_eFD, counts, ops)
        ctx.save_for_backward(x_MD, w1_eDF, w3_eDF, w2_eFD, *kept)
        ctx.counts, ctx.ops = counts, ops
        ctx.grad_nodes = _grad_nodes(x_MD, w1_eDF, w3_eDF, w2_eFD)
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, w1_eDF, w3_eDF, w2_eFD, *kept = ctx.saved_tensors
        wanted = _wanted(ctx)
        if not any(wanted):
            return None, None, None, None, None, None
        with torch.autocast(x_MD.device.type, enabled=False):
            return (*_loop_backward(dy_MD, x_MD, w1_eDF, w3_eDF, w2_eFD, kept, ctx.counts, ctx.ops, wanted), None, None)


def _loop_forward(x_MD, w1_eDF, w3_eDF, w2_eFD, counts, ops) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y, and each expert's gate and up (in turn) for the backward; in the rows' dtype, as the
    grouped GEMMs compute (no autocast: ``torch.mm(out=)`` takes no other dtype)."""
    y_MD = x_MD.new_empty(x_MD.shape[0], w2_eFD.shape[-1])
    kept: list[torch.Tensor] = []
    with torch.autocast(x_MD.device.type, enabled=False):
        for j, (s, e) in enumerate(_spans(counts)):
            x_jD = x_MD[s:e]
            gate_jF, up_jF = torch.mm(x_jD, w1_eDF[j]), torch.mm(x_jD, w3_eDF[j])
            torch.mm(ops.swiglu_fwd(gate_jF, up_jF), w2_eFD[j], out=y_MD[s:e])
            kept += (gate_jF, up_jF)
    return y_MD, kept


def _loop_backward(dy_MD, x_MD, w1_eDF, w3_eDF, w2_eFD, kept, counts, ops, wanted):
    """(dx, dw1, dw3, dw2), each None where ``wanted`` says so; one expert's rows at a time."""
    dy_MD = dy_MD.contiguous()  # y.sum() and friends give an expanded gradient
    dx_MD, dw1_eDF, dw3_eDF, dw2_eFD = (
        torch.empty_like(t) if need else None for t, need in zip((x_MD, w1_eDF, w3_eDF, w2_eFD), wanted, strict=True)
    )
    for j, (s, e) in enumerate(_spans(counts)):
        gate_jF, up_jF = kept[2 * j], kept[2 * j + 1]
        x_jD, dy_jD = x_MD[s:e], dy_MD[s:e]
        dh_jF = torch.mm(dy_jD, w2_eFD[j].t())
        dgate_jF, dup_jF, h_jF = ops.swiglu_bwd(dh_jF, gate_jF, up_jF)
        if dw2_eFD is not None:
            torch.mm(h_jF.t(), dy_jD, out=dw2_eFD[j])
        if dx_MD is not None:
            torch.mm(dgate_jF, w1_eDF[j].t(), out=dx_MD[s:e]).addmm_(dup_jF, w3_eDF[j].t())
        if dw1_eDF is not None:
            torch.mm(x_jD.t(), dgate_jF, out=dw1_eDF[j])
        if dw3_eDF is not None:
            torch.mm(x_jD.t(), dup_jF, out=dw3_eDF[j])
    return dx_MD, dw1_eDF, dw3_eDF, dw2_eFD


def _spans(counts: list[int]):
    """(start, end) of each expert's rows. An expert without rows has an empty span: its
    products have inner length 0, so its weight gradients come out zero."""
    return pairwise(accumulate(counts, initial=0))


class _SwiGLUDown(torch.autograd.Function):
    """y = (silu(gate) * up) w2 per expert on the grouped GEMMs, keeping gate and up only (see
    the module doc). ``offs_e``: the experts' row offsets; ``ops``: the kernels' swiglu
    primitives."""

    @staticmethod
    def forward(ctx, gate_MF, up_MF, w2_eFD, offs_e, ops):
        h_MF = ops.swiglu_fwd(gate_MF, up_MF)
        ctx.save_for_backward(gate_MF, up_MF, w2_eFD, offs_e)
        ctx.ops = ops
        ctx.grad_nodes = _grad_nodes(gate_MF, up_MF, w2_eFD)
        return torch._grouped_mm(h_MF, w2_eFD, offs=offs_e)

    @staticmethod
    def backward(ctx, dy_MD):
        gate_MF, up_MF, w2_eFD, offs_e = ctx.saved_tensors
        # y.sum() and friends give an expanded gradient; .contiguous() may keep an empty one's stride 0
        dy_MD = (
            dy_MD.contiguous() if dy_MD.numel() else torch.zeros(dy_MD.shape, dtype=dy_MD.dtype, device=dy_MD.device)
        )
        dh_MF = torch._grouped_mm(dy_MD, w2_eFD.transpose(-2, -1), offs=offs_e)
        dgate_MF, dup_MF, h_MF = ctx.ops.swiglu_bwd(dh_MF, gate_MF, up_MF)
        dw2_eFD = torch._grouped_mm(h_MF.t(), dy_MD, offs=offs_e) if _wanted(ctx)[2] else None
        return dgate_MF, dup_MF, dw2_eFD, None, None


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights, built whole ([E, ...], as one process holds them);
    ``shard`` keeps one EP rank's run of experts (``trainer.parallelize.apply_ep`` calls it)."""

    def __init__(self, *, num_experts: int, hidden_size: int, ffn_size: int):
        super().__init__()
        E, D, Fh = num_experts, hidden_size, ffn_size
        self.num_local_experts, self.first_expert_id = E, 0
        # True: torch._grouped_mm; False: the per-expert loop (_ExpertLoop); None: the grouped
        # GEMMs off a CPU (no host sync), the loop on one (``apply_kernels`` sets it)
        self.use_grouped_mm: bool | None = None
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
        grouped = x_MD.device.type != "cpu" if self.use_grouped_mm is None else self.use_grouped_mm
        if grouped and grouped_mm_available() and aligned and traceable:
            offs_e = torch.cumsum(tokens_per_expert_e, 0).to(torch.int32)
            gate_MF, up_MF = _grouped_mm(x_MD, w1, offs_e), _grouped_mm(x_MD, w3, offs_e)
            return _SwiGLUDown.apply(gate_MF, up_MF, w2, offs_e, self.ops)
        counts = tokens_per_expert_e.tolist()  # host sync: the loop's bounds
        # every row must be some expert's: rows past the counts would be left unwritten
        assert sum(counts) == x_MD.shape[0], (sum(counts), x_MD.shape[0])
        return _ExpertLoop.apply(x_MD, w1, w3, w2, counts, self.ops)
