"""A decoder-only transformer with an MoE FFN every k layers.

Shape letters: B batch, S sequence, D model dim, H heads, G kv heads, Dh head
dim, V vocab. Layer l (0-based) has an MoE FFN iff (l + 1) % moe_every_k_layers == 0,
a dense SwiGLU otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moemesh.kernels import TORCH_OPS, KernelOps
from moemesh.moe.config import ModelConfig
from moemesh.moe.experts import GroupedExperts
from moemesh.moe.init import normal_
from moemesh.moe.layer import MoELayer, MoEStats, SwiGLU
from moemesh.parallel.comm import CommMeter, group_size
from moemesh.parallel.tp import (
    GRAD_GROUP,
    TP_SHARD,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab,
    vocab_parallel_cross_entropy,
)


def _norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.RMSNorm:
    norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    if sequence_parallel:  # each TP rank normalises its own sequence shard: partial gradients
        setattr(norm.weight, GRAD_GROUP, "data_tp")
    return norm


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return (layer + 1) % cfg.moe_every_k_layers == 0


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles_SDh2 = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles_SDh2.cos(), angles_SDh2.sin()


def apply_rope(x_BHSDh, cos_SDh2, sin_SDh2):
    x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
    S = x_BHSDh.shape[-2]
    cos, sin = cos_SDh2[:S], sin_SDh2[:S]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSDh)


class Attention(nn.Module):
    """Causal attention; with TP each rank holds H/t query heads and G/t kv heads."""

    def __init__(self, cfg: ModelConfig, *, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        t = group_size(tp_group)
        self.H, self.G = cfg.num_heads // t, cfg.num_kv_heads // t  # local heads
        self.Dh = cfg.hidden_size // cfg.num_heads
        tp = dict(tp_group=tp_group, sequence_parallel=sequence_parallel)
        self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * self.Dh, **tp)
        self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * self.Dh, **tp)
        self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * self.Dh, **tp)
        self.wo = RowParallelLinear(cfg.num_heads * self.Dh, cfg.hidden_size, **tp)

    def forward(self, x_BSD, cos, sin):
        q = self.wq(x_BSD)  # with SP, the column-parallel projection gathers the sequence
        B, S = q.shape[:2]
        q = q.view(B, S, self.H, self.Dh).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.G, self.Dh).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.G, self.Dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.G != self.H)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.H * self.Dh))


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        ep_rank: int,
        ep_group,
        stats_group,
        use_grouped_mm: bool,
        ops: KernelOps,
        tp_group,
        sequence_parallel: bool,
        meter=None,
        overlap_chunks: int = 0,
    ):
        super().__init__()
        self.layer = layer
        tp = dict(tp_group=tp_group, sequence_parallel=sequence_parallel)
        self.attn_norm = _norm(cfg, sequence_parallel)
        self.attn = Attention(cfg, **tp)
        self.ffn_norm = _norm(cfg, sequence_parallel)
        if is_moe_layer(cfg, layer):
            self.moe = MoELayer(
                cfg=cfg,
                ep_rank=ep_rank,
                ep_group=ep_group,
                stats_group=stats_group,
                use_grouped_mm=use_grouped_mm,
                ops=ops,
                meter=meter,
                overlap_chunks=overlap_chunks,
                **tp,
            )
            self.ffn = None
        else:
            self.moe = None
            self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size, **tp)

    def forward(self, x_BSD, cos, sin):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
        h = self.ffn_norm(x_BSD)
        if self.moe is None:
            return x_BSD + self.ffn(h), None
        out, stats = self.moe(h)
        return x_BSD + out, stats


class _AttachLoss(torch.autograd.Function):
    """Forward: x unchanged. Backward: also send gradient 1 into ``loss``, as if it were
    added to the final loss (the pipeline's gradient scaling applies to it as well)."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=g.device)


def weighted_balance_loss(cfg: ModelConfig, stats: list[MoEStats]) -> torch.Tensor:
    """What the MoE layers add to the loss: the weighted aux, z and sequence-level losses."""
    total = torch.zeros(())
    for s in stats:
        total = total.to(s.losses.aux_loss.device) + cfg.aux_loss_factor * s.losses.aux_loss
        total = total + cfg.z_loss_factor * s.losses.z_loss
        if s.losses.seq_aux_loss is not None:
            total = total + cfg.seq_aux_loss_factor * s.losses.seq_aux_loss
    return total


def attach_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    return _AttachLoss.apply(x, loss) if loss.requires_grad else x


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # mean cross-entropy over this rank's tokens
    aux_loss: torch.Tensor  # sum over MoE layers (this rank's surrogate, see moe.router)
    z_loss: torch.Tensor  # sum over MoE layers
    seq_aux_loss: torch.Tensor  # sum over MoE layers (0 when off)
    moe_stats: list[MoEStats]  # one per MoE layer, in layer order
    logits: torch.Tensor | None = None


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        ep_rank: int = 0,
        ep_group=None,
        stats_group=None,
        use_grouped_mm: bool = True,
        ops: KernelOps = TORCH_OPS,
        tp_group=None,
        sequence_parallel: bool = False,
        layers: range | None = None,
        meter: CommMeter | None = None,
        overlap_chunks: int = 0,
    ):
        """``layers``: the global layer ids this pipeline stage holds (all by default). The
        first stage also holds the embedding, the last the final norm and the head;
        parameter names use global layer ids, so every stage initialises like ``single``."""
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group
        self.sp = sequence_parallel and group_size(tp_group) > 1
        tp = dict(tp_group=tp_group, sequence_parallel=self.sp)
        layers = range(cfg.num_layers) if layers is None else layers
        self.first, self.last = layers.start == 0, layers.stop == cfg.num_layers
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **tp) if self.first else None
        self.layers = nn.ModuleDict(
            {
                str(l): Block(
                    cfg,
                    l,
                    ep_rank=ep_rank,
                    ep_group=ep_group,
                    stats_group=stats_group,
                    use_grouped_mm=use_grouped_mm,
                    ops=ops,
                    meter=meter,
                    overlap_chunks=overlap_chunks,
                    **tp,
                )
                for l in layers
            }
        )
        self.norm = self.head = None
        if self.last:
            self.norm = _norm(cfg, self.sp)
            # The output head is column-parallel over the (padded) vocabulary: logits stay sharded.
            self.head = ColumnParallelLinear(cfg.hidden_size, padded_vocab(cfg.vocab_size, group_size(tp_group)), **tp)
            setattr(self.head.weight, TP_SHARD, (0, cfg.vocab_size))  # padding rows start at zero
        self.stage_records: list[list[MoEStats]] = []  # pipeline stages: MoE stats per microbatch
        cos, sin = rope_tables(cfg.max_seq_len, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]

    def non_expert_parameters(self) -> list[nn.Parameter]:
        expert = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Values depend on (seed, global parameter name) only: identical on every layout."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)  # residual projections (GPT-2)
        for name, module in self.named_modules():
            if isinstance(module, GroupedExperts):
                module.init_weights(seed=seed, prefix=name.removesuffix(".experts"), std=std, out_std=out_std)
            elif isinstance(module, nn.RMSNorm):
                module.weight.fill_(1.0)
        t, rank = group_size(self.tp_group), (dist.get_rank(self.tp_group) if self.tp_group is not None else 0)
        for name, p in self.named_parameters():
            if ".experts." in f".{name}" or name.endswith("norm.weight"):
                continue
            is_out = name.endswith("wo.weight") or name.endswith("w2.weight")
            std_p = out_std if is_out else std
            shard = getattr(p, TP_SHARD, None)
            if shard is None or t == 1:
                normal_(p, std_p, seed=seed, key=name)
                continue
            # A TP shard: draw the logical (global) tensor by name, pad it, keep this rank's chunk.
            dim, logical = shard
            shape = list(p.shape)
            shape[dim] = logical
            full = normal_(torch.empty(shape), std_p, seed=seed, key=name)
            pad = p.shape[dim] * t - logical
            if pad:
                pad_shape = list(shape)
                pad_shape[dim] = pad
                full = torch.cat([full, torch.zeros(pad_shape)], dim=dim)
            with torch.no_grad():
                p.copy_(full.chunk(t, dim=dim)[rank])
        self.rope_cos, self.rope_sin = rope_tables(
            self.cfg.max_seq_len, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta, self.rope_cos.device
        )

    def _blocks(self, x, stats: list[MoEStats]):
        for block in self.layers.values():
            x, s = block(x, self.rope_cos, self.rope_sin)
            if s is not None:
                stats.append(s)
        return x

    def stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One pipeline stage: tokens or hidden states in, hidden states or logits out.

        The pipeline schedule only backpropagates the last stage's loss, so each MoE
        layer's weighted aux and z losses ride on the activations (``attach_loss``);
        their values are kept in ``stage_records`` for the metrics.
        """
        x = self.embed(x) if self.first else x
        stats: list[MoEStats] = []
        for block in self.layers.values():
            x, s = block(x, self.rope_cos, self.rope_sin)
            if s is not None:
                stats.append(s)
                x = attach_loss(x, weighted_balance_loss(self.cfg, [s]))
        self.stage_records.append(stats)
        return self.head(self.norm(x)) if self.last else x

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, *, return_logits=False):
        stats: list[MoEStats] = []
        x = self._blocks(self.embed(tokens_BS), stats)
        logits = self.head(self.norm(x))  # [B, S, V_pad/t]: the vocabulary stays sharded
        loss = None
        if targets_BS is not None:
            loss = vocab_parallel_cross_entropy(
                logits.flatten(0, 1), targets_BS.flatten(), group=self.tp_group, vocab_size=self.cfg.vocab_size
            )
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = sum((s.losses.aux_loss for s in stats), zero)
        z = sum((s.losses.z_loss for s in stats), zero)
        seq = sum((s.losses.seq_aux_loss for s in stats if s.losses.seq_aux_loss is not None), zero)
        return ModelOutput(
            loss=loss,
            aux_loss=aux,
            z_loss=z,
            seq_aux_loss=seq,
            moe_stats=stats,
            logits=logits if return_logits else None,
        )
