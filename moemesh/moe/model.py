"""A decoder-only transformer with an MoE FFN every k layers.

Shape letters: B batch, S sequence, D model dim, H heads, G kv heads, Dh head
dim (``moe.config.head_dim``), V vocab. Layer l (0-based) has an MoE FFN iff
``moe.config.is_moe_layer``, a dense SwiGLU otherwise.

The options the released families need are ordinary options here (moemesh/interop/hf maps a
checkpoint's config.json onto them): q/k/v biases, qk-norm per head or over the projection,
RoPE on interleaved pairs or on halves, an explicit head dim, a gated shared expert, tied
embeddings, dense layers among the MoE ones.

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

from moemesh.fields import QKNorm, RopePairing
from moemesh.moe.config import ModelConfig, head_dim, is_moe_layer
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
    column_parallel,
    copy_to_tp,
    reduce_from_tp,
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


def apply_rope(x_BHSDh, cos_SDh2, sin_SDh2, pairing: RopePairing = RopePairing.interleaved):
    """Rotate each pair of a head's dims by its position's angles: the pairs (2i, 2i+1)
    (interleaved) or (i, i + Dh/2) (half, the Llama family's ``rotate_half``). The two are
    the same rotation of differently ordered dims, so only q and k's weight rows tell them apart."""
    S = x_BHSDh.shape[-2]
    cos, sin = cos_SDh2[:S], sin_SDh2[:S]
    if pairing == RopePairing.half:
        x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSDh)


def half_pairing_order(head_dim: int) -> list[int]:
    """A head's dims reordered so that RoPE on halves rotates what RoPE on interleaved pairs
    rotated: new dim i is old dim 2i, new dim i + Dh/2 is old dim 2i + 1. Reordering q's and k's
    rows (and their biases and qk-norm weights) this way turns an interleaved model into the
    same function with ``rope_pairing=half`` (q . k is unchanged by a common permutation)."""
    return list(range(0, head_dim, 2)) + list(range(1, head_dim, 2))


def _tp_part(v: torch.Tensor, rank: int, t: int) -> torch.Tensor:
    """This TP rank's part of a vector over all heads (chunk ``rank`` of ``t`` along the last dim)."""
    return v if t == 1 else v.chunk(t, dim=-1)[rank]


class QKVBias(nn.Module):
    """The q, k and v projections' biases ([H*Dh], [G*Dh], [G*Dh]). Kept whole on every TP rank
    (they are tiny) and sliced to the rank's heads in the forward, so their gradients are
    partial over tp (GRAD_GROUP data_tp) and no 1-D tensor is split by both TP and FSDP."""

    def __init__(self, q: int, kv: int):
        super().__init__()
        self.q = nn.Parameter(torch.empty(q))
        self.k = nn.Parameter(torch.empty(kv))
        self.v = nn.Parameter(torch.empty(kv))
        for p in self.parameters():
            setattr(p, GRAD_GROUP, "data_tp")

    def forward(self, q, k, v, rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v plus this TP rank's parts. A forward, not a plain method: under sharding the
        module is an FSDP unit of its own, whose parameters are gathered by the hooks a call runs;
        and the sums are made inside it, because under zero3 the gathered storage is freed as the
        call returns (a part handed out, a view of it, would be read after: a crash)."""
        return q + _tp_part(self.q, rank, t), k + _tp_part(self.k, rank, t), v + _tp_part(self.v, rank, t)


class QKNormLayer(nn.Module):
    """RMSNorm of the queries (or keys) before RoPE, with weight ``[width]``:
      * per head (``width`` = Dh, Qwen3): each head normalised over its own Dh dims;
      * over the projection (``width`` = heads x Dh, OLMoE): all heads at once. Under TP a rank
        holds some heads: the mean square sums the TP ranks' parts (one all-reduce of [B, S, 1]),
        and the weight, kept whole, is sliced to the rank's heads.
    The weight's gradient is partial over tp either way (GRAD_GROUP data_tp)."""

    def __init__(self, width: int, *, eps: float, per_head: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        setattr(self.weight, GRAD_GROUP, "data_tp")
        self.eps, self.per_head = eps, per_head
        self.tp_group, self.tp_rank, self.tp = None, 0, 1

    def shard(self, tp_group) -> None:
        self.tp_group, self.tp_rank, self.tp = tp_group, dist.get_rank(tp_group), group_size(tp_group)

    def forward(self, x):
        """x: [..., Dh] per head; [B, S, this rank's heads x Dh] over the projection."""
        if self.per_head:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        sq_BS1 = xf.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:  # the heads of the other TP ranks: forward and backward both sum over tp
            sq_BS1 = reduce_from_tp(copy_to_tp(sq_BS1, self.tp_group), self.tp_group)
        normed = xf * torch.rsqrt(sq_BS1 / self.weight.shape[0] + self.eps)
        return _tp_part(self.weight, self.tp_rank, self.tp) * normed.type_as(x)


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

    qkv_bias: QKVBias | None
    q_norm: QKNormLayer | None
    k_norm: QKNormLayer | None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.G = cfg.num_heads, cfg.num_kv_heads  # heads on this rank
        self.Dh = Dh = head_dim(cfg)
        self.tp_rank, self.tp = 0, 1
        self.pairing = RopePairing(cfg.rope_pairing)
        self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * Dh)
        self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * Dh)
        self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.num_kv_heads * Dh)
        self.wo = RowParallelLinear(cfg.num_heads * Dh, cfg.hidden_size)
        self.qkv_bias = QKVBias(cfg.num_heads * Dh, cfg.num_kv_heads * Dh) if cfg.qkv_bias else None
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != QKNorm.none:
            per_head = cfg.qk_norm == QKNorm.head
            q_width, k_width = (Dh, Dh) if per_head else (cfg.num_heads * Dh, cfg.num_kv_heads * Dh)
            self.q_norm = QKNormLayer(q_width, eps=cfg.norm_eps, per_head=per_head)
            self.k_norm = QKNormLayer(k_width, eps=cfg.norm_eps, per_head=per_head)
        self.core = AttentionCore()

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        t = group_size(tp_group)
        if t == 1:
            return
        for linear in (self.wq, self.wk, self.wv, self.wo):
            linear.shard(tp_group, sequence_parallel=sequence_parallel)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.shard(tp_group)
        self.H, self.G = self.H // t, self.G // t
        self.tp_rank, self.tp = dist.get_rank(tp_group), t

    def _qkv(self, x_BSD):
        """q, k, v [B, S, heads x Dh] of this rank's heads, biased and (over the projection) normalised."""
        # One input collective for the three projections; with SP it gathers the sequence: S is
        # the full length here.
        q, k, v = column_parallel(x_BSD, self.wq, self.wk, self.wv)
        if self.qkv_bias is not None:
            q, k, v = self.qkv_bias(q, k, v, self.tp_rank, self.tp)
        if self.q_norm is not None and not self.q_norm.per_head:
            assert self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x_BSD, cos, sin, mask_B1SS=None):
        q, k, v = self._qkv(x_BSD)
        q = rearrange(q, "b s (h d) -> b h s d", h=self.H)
        k = rearrange(k, "b s (g d) -> b g s d", g=self.G)
        v = rearrange(v, "b s (g d) -> b g s d", g=self.G)
        if self.q_norm is not None and self.q_norm.per_head:
            assert self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.pairing), apply_rope(k, cos, sin, self.pairing)
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
    # A pipeline stage holds the embedding only if first, the final norm and head only if last;
    # with tied embeddings there is no head: the last stage keeps the embedding as its head.
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
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleDict({str(l): Block(cfg, l) for l in range(cfg.num_layers)})
        self.norm = _norm(cfg)
        # The output head is column-parallel over the (padded) vocabulary: logits stay sharded.
        self.head = None if cfg.tie_embeddings else ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size)
        self.stage_records: list[dict[int, MoEStats]] = []  # pipeline: MoE stats per stage call, by layer
        cos, sin = rope_tables(cfg.max_seq_len, head_dim(cfg), cfg.rope_theta)
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
        if not self.first and not (self.last and self.cfg.tie_embeddings):
            self.embed = None
        if not self.last:
            self.norm = self.head = None

    @property
    def tied_copy(self) -> bool:
        """This stage holds the tied embedding only as its head: another stage (the first) holds
        it too, and the two copies' gradients are summed (``trainer.parallelize.tied_embedding_sync``)."""
        return bool(self.cfg.tie_embeddings) and self.last and not self.first

    def vocab_rows(self) -> int:
        """The logits' last dim on this rank: the (padded) vocabulary's rows this TP rank holds."""
        head = self.head if self.head is not None else self.embed
        assert head is not None, "only the last pipeline stage computes logits"
        return head.weight.shape[0]

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
            elif isinstance(module, (nn.RMSNorm, QKNormLayer)):
                module.weight.fill_(1.0)
            elif isinstance(module, QKVBias):
                for p in module.parameters():
                    p.zero_()
        self.init_buffers()
        t, rank = group_size(self.tp_group), (dist.get_rank(self.tp_group) if self.tp_group is not None else 0)
        for name, p in self.named_parameters():
            if ".experts." in f".{name}" or name.endswith("norm.weight") or ".qkv_bias." in name:
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

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The buffers, which no checkpoint holds: the RoPE tables and zero expert biases (a model
        whose parameters are loaded, not initialised, still needs these)."""
        for module in self.modules():
            if isinstance(module, Router) and module.expert_bias_E is not None:
                module.expert_bias_E.zero_()
        self.rope_cos, self.rope_sin = rope_tables(
            self.cfg.max_seq_len, head_dim(self.cfg), self.cfg.rope_theta, self.rope_cos.device
        )

    def _embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None, "only the first pipeline stage holds the embedding"
        return self.embed(tokens_BS)

    def _logits(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The final norm and the head (or the tied embedding): [B, S, V_pad/t], the vocabulary
        stays sharded."""
        assert self.norm is not None, "only the last pipeline stage holds the head"
        if self.head is not None:
            return self.head(self.norm(x_BSD))
        assert self.embed is not None
        return self.embed.project(self.norm(x_BSD))

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
