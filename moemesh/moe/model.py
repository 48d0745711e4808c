"""A decoder-only transformer with an MoE FFN every k layers.

Shape letters: B batch, S sequence, D model dim, H heads, G kv heads, Dh head
dim, V vocab. Layer l (0-based) has an MoE FFN iff ``moe.config.is_moe_layer``,
a dense SwiGLU otherwise.

The constructors take the model config only and build the model as one process holds
it: global shapes, every layer and expert, no process group. The layout (which layers a
pipeline stage keeps, TP shards, EP shards, the balance-statistics group, kernels,
timing) is applied from outside by ``trainer.parallelize`` through the ``shard*`` and
``keep_layers`` methods, usually on the meta device before any memory is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from moemesh.moe.config import ModelConfig, is_moe_layer
from moemesh.moe.experts import GroupedExperts
from moemesh.moe.init import normal_
from moemesh.moe.layer import MoELayer, MoEStats, SwiGLU
from moemesh.moe.router import Router
from moemesh.parallel.comm import group_size
from moemesh.parallel.tp import (
    GRAD_GROUP,
    TP_SHARD,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)


def _norm(cfg: ModelConfig) -> nn.RMSNorm:
    return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


def mark_sequence_parallel(norm: nn.RMSNorm) -> None:
    """Under sequence parallelism each TP rank normalises its own sequence shard: the norm's
    gradients are partial over tp."""
    setattr(norm.weight, GRAD_GROUP, "data_tp")


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None):
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":  # shapes only (a model built on the meta device): nothing to compute
        shape = (seq_len, head_dim // 2)
        return torch.empty(shape, device=device), torch.empty(shape, device=device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles_SDh2 = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles_SDh2.cos(), angles_SDh2.sin()


def document_mask(documents_BS: torch.Tensor) -> torch.Tensor:
    """Causal attention within documents: [B, 1, S, S], True where query s may attend to key t
    (t <= s, same document number). RoPE needs no reset at a document's start: within one
    document q.k depends only on the distance between positions."""
    S = documents_BS.shape[-1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=documents_BS.device).tril()
    same_BSS = documents_BS[:, :, None] == documents_BS[:, None, :]
    return (same_BSS & causal_SS).unsqueeze(1)


def apply_rope(x_BHSDh, cos_SDh2, sin_SDh2):
    x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
    S = x_BHSDh.shape[-2]
    cos, sin = cos_SDh2[:S], sin_SDh2[:S]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSDh)


class AttentionCore(nn.Module):
    """softmax(q k^T) v, causal (and within documents, given their mask): the part of attention
    with no weights and no collectives (a module of its own so that ``apply_instrumentation``
    can time it: time.attention_core)."""

    def forward(self, q_BHSDh, k_BGSDh, v_BGSDh, mask_B1SS=None):
        gqa = k_BGSDh.shape[1] != q_BHSDh.shape[1]
        if mask_B1SS is None:
            return F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, attn_mask=mask_B1SS, enable_gqa=gqa)


class Attention(nn.Module):
    """Causal attention; ``shard`` (TP) keeps H/t query heads and G/t kv heads on each rank."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.G = cfg.num_heads, cfg.num_kv_heads  # heads on this rank
        self.Dh = cfg.hidden_size // cfg.num_heads
        self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * self.Dh)
        self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * self.Dh)
        self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * self.Dh)
        self.wo = RowParallelLinear(cfg.num_heads * self.Dh, cfg.hidden_size)
        self.core = AttentionCore()

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        t = group_size(tp_group)
        if t == 1:
            return
        for linear in (self.wq, self.wk, self.wv, self.wo):
            linear.shard(tp_group, sequence_parallel=sequence_parallel)
        self.H, self.G = self.H // t, self.G // t

    def forward(self, x_BSD, cos, sin, mask_B1SS=None):
        # With SP the column-parallel projections gather the sequence: S is the full length here.
        q = rearrange(self.wq(x_BSD), "b s (h d) -> b h s d", h=self.H)
        k = rearrange(self.wk(x_BSD), "b s (g d) -> b g s d", g=self.G)
        v = rearrange(self.wv(x_BSD), "b s (g d) -> b g s d", g=self.G)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(rearrange(self.core(q, k, v, mask_B1SS), "b h s d -> b s (h d)"))


class Block(nn.Module):
    moe: MoELayer | None  # exactly one of moe / ffn: is_moe_layer(cfg, layer) picks which
    ffn: SwiGLU | None

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.ffn_norm = _norm(cfg)
        if is_moe_layer(cfg, layer):
            self.moe = MoELayer(cfg=cfg)
            self.ffn = None
        else:
            self.moe = None
            self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x_BSD, cos, sin, *, loss_scale: float = 1.0, mask_B1SS=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, mask_B1SS)
        h = self.ffn_norm(x_BSD)
        if self.moe is not None:
            out, stats = self.moe(h, loss_scale=loss_scale)
            return x_BSD + out, stats
        assert self.ffn is not None
        return x_BSD + self.ffn(h), None


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # mean cross-entropy over this rank's tokens; backward also
    # backpropagates every MoE layer's weighted balance losses (attached to its output)
    moe_stats: list[MoEStats]  # one per MoE layer, in layer order (unweighted losses, detached)
    logits: torch.Tensor | None = None


class Transformer(nn.Module):
    # A pipeline stage holds the embedding only if first, the final norm and head only if last.
    embed: VocabParallelEmbedding | None
    norm: nn.RMSNorm | None
    head: ColumnParallelLinear | None
    rope_cos: torch.Tensor  # buffers [max_seq_len, Dh/2]
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        """The whole model, as one process holds it; parameter names use global layer ids
        (``layers.<l>``), so every pipeline stage initialises and checkpoints like ``single``."""
        super().__init__()
        self.cfg = cfg
        self.tp_group, self.sp = None, False  # set by apply_tp
        self.first = self.last = True  # holds the embedding / the final norm and head
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(l): Block(cfg, l) for l in range(cfg.num_layers)})
        self.norm = _norm(cfg)
        # The output head is column-parallel over the (padded) vocabulary: logits stay sharded.
        self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size)
        self.stage_records: list[dict[int, MoEStats]] = []  # pipeline: MoE stats per stage call, by layer
        cos, sin = rope_tables(cfg.max_seq_len, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def keep_layers(self, layers: Iterable[int]) -> None:
        """Become one pipeline rank: keep the layers ``layers`` (global ids; with virtual stages
        several runs of them), the embedding only if layer 0 is among them, the final norm and
        the head only if the last layer is."""
        keep = set(layers)
        for l in [l for l in self.layers if int(l) not in keep]:
            del self.layers[l]
        self.first, self.last = 0 in keep, self.cfg.num_layers - 1 in keep
        if not self.first:
            self.embed = None
        if not self.last:
            self.norm = self.head = None

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        """Tensor parallelism over ``tp_group``: the embedding, the head, attention, the dense
        FFNs and the MoE layers' tokens and shared experts (the routed experts are EP's)."""
        if group_size(tp_group) == 1:
            return
        self.tp_group, self.sp = tp_group, sequence_parallel
        tp = dict(sequence_parallel=sequence_parallel)
        for vocab in (self.embed, self.head):
            if vocab is not None:
                vocab.shard(tp_group, **tp)
        for block in self.layers.values():
            assert isinstance(block, Block)
            block.attn.shard(tp_group, **tp)
            if block.ffn is not None:
                block.ffn.shard(tp_group, **tp)
            if block.moe is not None:
                block.moe.shard_tokens(tp_group, **tp)
        if sequence_parallel:
            for module in self.modules():
                if isinstance(module, nn.RMSNorm):
                    mark_sequence_parallel(module)

    def stage_moe_layers(self) -> dict[int, MoELayer]:
        """The MoE layers this stage holds, by global layer id."""
        return {int(l): b.moe for l, b in self.layers.items() if isinstance(b, Block) and b.moe is not None}

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]

    def non_expert_parameters(self) -> list[nn.Parameter]:
        expert = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Values depend on (seed, global parameter name) only: identical on every layout.

        Sets every parameter and buffer, so a model built on the meta device and
        materialised with ``to_empty`` starts exactly like one built in place.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)  # residual projections (GPT-2)
        for name, module in self.named_modules():
            if isinstance(module, GroupedExperts):
                module.init_weights(seed=seed, prefix=name.removesuffix(".experts"), std=std, out_std=out_std)
            elif isinstance(module, nn.RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router) and module.expert_bias_E is not None:
                module.expert_bias_E.zero_()
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

    def _embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None, "only the first pipeline stage holds the embedding"
        return self.embed(tokens_BS)

    def _logits(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The final norm and the head: [B, S, V_pad/t], the vocabulary stays sharded."""
        assert self.norm is not None and self.head is not None, "only the last pipeline stage holds the head"
        return self.head(self.norm(x_BSD))

    def _blocks(self, x, stats: list[MoEStats], loss_scale: float, documents_BS=None):
        mask = None if documents_BS is None else document_mask(documents_BS)  # once for every layer
        for block in self.layers.values():
            x, s = block(x, self.rope_cos, self.rope_sin, loss_scale=loss_scale, mask_B1SS=mask)
            if s is not None:
                stats.append(s)
        return x

    def stage_forward(self, x: torch.Tensor, layers: range | None = None) -> torch.Tensor:
        """One pipeline stage, layers ``layers`` (default: every layer held): tokens or hidden
        states in, hidden states or logits out (the embedding runs if the stage starts at layer
        0, the head if it ends at the last).

        The schedule backpropagates each micro-batch's loss with gradient 1 and scales
        the gradients afterwards, so the MoE layers' attached losses take scale 1; their
        statistics go to ``stage_records`` (by global layer id) for the metrics.
        """
        ids = [int(l) for l in self.layers] if layers is None else list(layers)
        x = self._embed(x) if ids and ids[0] == 0 else x
        stats: dict[int, MoEStats] = {}
        for l in ids:
            x, s = self.layers[str(l)](x, self.rope_cos, self.rope_sin, loss_scale=1.0)
            if s is not None:
                stats[l] = s
        self.stage_records.append(stats)
        return self._logits(x) if ids and ids[-1] == self.cfg.num_layers - 1 else x

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        *,
        return_logits=False,
        loss_scale=1.0,
        documents_BS: torch.Tensor | None = None,
    ):
        """``loss_scale``: the factor the caller applies to ``loss`` before backward (1/accum
        with gradient accumulation); each MoE layer's attached balance losses get it too.
        ``documents_BS``: a document number per token (data.document_mask): attention stays
        within each document."""
        stats: list[MoEStats] = []
        x = self._blocks(self._embed(tokens_BS), stats, loss_scale, documents_BS)
        logits = self._logits(x)  # [B, S, V_pad/t]: the vocabulary stays sharded
        loss = None
        if targets_BS is not None:
            loss = vocab_parallel_cross_entropy(
                logits.flatten(0, 1), targets_BS.flatten(), group=self.tp_group, vocab_size=self.cfg.vocab_size
            )
        return ModelOutput(loss=loss, moe_stats=stats, logits=logits if return_logits else None)
