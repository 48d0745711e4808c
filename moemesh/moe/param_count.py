"""Parameters per rank from the config alone, without building the model.

``param_specs`` lists every parameter tensor one rank of a pipeline stage holds, with
the shape and tags the model gives it (``moe.model``, ``parallel.tags``); ``count_params``
sums them. ``local_numel`` is the part of a tensor one rank keeps under
``parallel.sharding`` (FSDP2, ``parallel.fsdp``). The planner uses these; tests build the
real model on the meta device for every preset (and shard it) and check every number.

Sharding (zero2, zero3), as training builds it:
  * the group a parameter is sharded over holds the same weights: the data group
    (dp x ep) for non-expert parameters, the expert-data group (dp x tp) for routed
    experts, and dp x ep x tp for the parameters whose gradients sum over it when
    tp > 1 (the router; the norms under sequence parallelism);
  * the dim: 0, except a parameter TP splits along dim 0 when tp > 1 (shards dim 1),
    and experts [e, ...], which shard dim 0 if e divides over the group, else dim 1;
  * rank i keeps chunk i of ``torch.chunk``: ceil(n/k) rows for the first chunks, the
    last may hold fewer or none; rank 0 always holds a ceil-sized chunk, the most any
    rank holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import NamedTuple

from moemesh.fields import QKNorm
from moemesh.moe.config import ModelConfig, head_dim, is_moe_layer
from moemesh.parallel import tags
from moemesh.parallel.dims import ParallelDims, padded_vocab


@dataclass(frozen=True)
class ParamCount:
    expert: int  # routed experts held by this rank (E/ep of them)
    tp_sharded: int  # attention, dense FFN, shared expert, embedding, head: 1/tp each
    replicated: int  # norms and routers: whole on every rank

    @property
    def non_expert(self) -> int:
        return self.tp_sharded + self.replicated

    @property
    def total(self) -> int:
        return self.expert + self.non_expert


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor as a rank of a stage holds it (after EP and TP, before sharding)."""

    name: str  # as in Transformer.named_parameters()
    shape: tuple[int, ...]
    expert: bool  # a routed expert's weights [e, ...] (EXPERT_SHARD tag)
    tp_dim: int | None  # the dim of its TP_SHARD tag (tagged at any tp degree), None if untagged
    data_tp: bool  # GRAD_GROUP "data_tp": gradients sum over dp x ep x tp
    layer: int | None  # the transformer block it belongs to; None: embedding, final norm, head

    @property
    def numel(self) -> int:
        return prod(self.shape)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters (without the input embedding's lookup, with
    top-k of E experts; a tied embedding counts once, as the head) + 12 x layers x H x Dh x
    sequence for attention (PaLM's count, with the attention width H x Dh)."""
    full = count_params(cfg)
    lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    active = full.non_expert - lookup + full.expert * cfg.top_k / cfg.num_experts
    return 6 * active + 12 * cfg.num_layers * attention_width(cfg) * seq_len


def attention_width(cfg: ModelConfig) -> int:
    """H x Dh: the width q k^T and the attention-weighted v run at (hidden_size unless head_dim says otherwise)."""
    return cfg.num_heads * head_dim(cfg)


class Flops(NamedTuple):
    """FLOPs per token, and two parts of them that run at rates of their own."""

    total: float
    experts: float  # the routed experts' grouped GEMMs
    attention_core: float  # softmax(QK^T)V


def stage_flops_per_token(
    cfg: ModelConfig,
    seq_len: int,
    pp: int = 1,
    stage: int = 0,
    split: list[int] | None = None,
    *,
    layers: Sequence[int] | None = None,
) -> Flops:
    """``model_flops_per_token``'s count for pipeline stage ``stage`` of ``pp`` (its blocks; the
    head on the last stage; ``layers``: the layers a pipeline rank holds instead, with virtual
    stages), with its parts: the routed experts' (6 x their top-k of E parameters) and the
    attention core's (12 x blocks x hidden x sequence). The stages add up to the model's count."""
    from moemesh.parallel.pipeline import stage_layers

    held = list(stage_layers(cfg.num_layers, pp, split)[stage]) if layers is None else list(layers)
    specs = param_specs(cfg, ParallelDims(pp=pp), layers=held)
    expert = sum(s.numel for s in specs if s.expert) * cfg.top_k / cfg.num_experts
    # The embedding is a lookup (no FLOPs) unless it is also the head, on the rank of the last layer.
    as_head = cfg.tie_embeddings and cfg.num_layers - 1 in held
    dense = sum(s.numel for s in specs if not s.expert and (s.name != "embed.weight" or as_head))
    core = 12 * len(held) * attention_width(cfg) * seq_len
    return Flops(6 * (dense + expert) + core, 6 * expert, core)


def param_specs(
    cfg: ModelConfig,
    dims: ParallelDims | None = None,
    *,
    stage: int = 0,
    split: list[int] | None = None,
    sequence_parallel: bool = False,
    layers: Sequence[int] | None = None,
) -> list[ParamSpec]:
    """Every parameter on one rank of pipeline stage ``stage``, in the model's order
    (every rank of a stage holds the same shapes). ``layers``: the layers a pipeline rank holds
    instead (with virtual stages, several runs of them; ``parallel.pipeline.Placement``); the
    embedding comes with layer 0, the final norm and the head with the last layer."""
    from moemesh.parallel.pipeline import stage_layers

    dims = ParallelDims() if dims is None else dims
    D, t = cfg.hidden_size, dims.tp
    sp = sequence_parallel and t > 1
    layers = sorted(stage_layers(cfg.num_layers, dims.pp, split)[stage] if layers is None else layers)
    last = cfg.num_layers - 1 in layers
    specs: list[ParamSpec] = []

    def add(name, shape, *, tp_dim=None, expert=False, data_tp=False, layer=None):
        specs.append(ParamSpec(name, tuple(shape), expert, tp_dim, data_tp, layer))

    def norm(name, layer):
        add(name, (D,), data_tp=sp, layer=layer)

    def swiglu(prefix, ffn, layer):
        add(f"{prefix}.w1.weight", (ffn // t, D), tp_dim=0, layer=layer)
        add(f"{prefix}.w3.weight", (ffn // t, D), tp_dim=0, layer=layer)
        add(f"{prefix}.w2.weight", (D, ffn // t), tp_dim=1, layer=layer)

    vocab_rows = padded_vocab(cfg.vocab_size, t) // t
    if 0 in layers or (cfg.tie_embeddings and last):  # tied: the last layer's rank holds the head
        add("embed.weight", (vocab_rows, D), tp_dim=0)
    for l in layers:
        p = f"layers.{l}"
        norm(f"{p}.attn_norm.weight", l)
        _attention_specs(add, cfg, p, l, t)
        norm(f"{p}.ffn_norm.weight", l)
        if not is_moe_layer(cfg, l):
            swiglu(f"{p}.ffn", cfg.ffn_hidden_size, l)
            continue
        e, Fe = cfg.num_experts // dims.ep, cfg.moe_ffn_hidden_size
        add(f"{p}.moe.router.weight_ED", (cfg.num_experts, D), data_tp=True, layer=l)
        add(f"{p}.moe.experts.w1_eDF", (e, D, Fe), expert=True, layer=l)
        add(f"{p}.moe.experts.w3_eDF", (e, D, Fe), expert=True, layer=l)
        add(f"{p}.moe.experts.w2_eFD", (e, Fe, D), expert=True, layer=l)
        if cfg.shared_expert_ffn_size:
            swiglu(f"{p}.moe.shared", cfg.shared_expert_ffn_size, l)
        if cfg.shared_expert_gate:
            add(f"{p}.moe.shared_gate.weight", (1, D), data_tp=t > 1, layer=l)
    if last:
        norm("norm.weight", None)
        if not cfg.tie_embeddings:
            add("head.weight", (vocab_rows, D), tp_dim=0)
    return specs


def _attention_specs(add, cfg: ModelConfig, p: str, l: int, t: int) -> None:
    """One block's attention parameters, after its norm (moe/model.py: Attention)."""
    D, Dh, H, G = cfg.hidden_size, head_dim(cfg), cfg.num_heads, cfg.num_kv_heads
    add(f"{p}.attn.wq.weight", (H * Dh // t, D), tp_dim=0, layer=l)
    add(f"{p}.attn.wk.weight", (G * Dh // t, D), tp_dim=0, layer=l)
    add(f"{p}.attn.wv.weight", (G * Dh // t, D), tp_dim=0, layer=l)
    add(f"{p}.attn.wo.weight", (D, H * Dh // t), tp_dim=1, layer=l)
    if cfg.qkv_bias:  # whole on every TP rank, sliced in the forward (moe/model.py: QKVBias)
        for name, n in (("q", H * Dh), ("k", G * Dh), ("v", G * Dh)):
            add(f"{p}.attn.qkv_bias.{name}", (n,), data_tp=True, layer=l)
    if cfg.qk_norm != QKNorm.none:
        per_head = cfg.qk_norm == QKNorm.head
        add(f"{p}.attn.q_norm.weight", (Dh if per_head else H * Dh,), data_tp=True, layer=l)
        add(f"{p}.attn.k_norm.weight", (Dh if per_head else G * Dh,), data_tp=True, layer=l)


def count_params(
    cfg: ModelConfig,
    dims: ParallelDims | None = None,
    *,
    stage: int = 0,
    split: list[int] | None = None,
    layers: Sequence[int] | None = None,
) -> ParamCount:
    """Parameters on one rank of pipeline stage ``stage`` (every rank of a stage holds the same counts;
    ``layers``: the layers a pipeline rank holds instead, as in ``param_specs``)."""
    specs = param_specs(cfg, dims, stage=stage, split=split, layers=layers)
    expert = sum(s.numel for s in specs if s.expert)
    tp_sharded = sum(s.numel for s in specs if not s.expert and s.tp_dim is not None)
    replicated = sum(s.numel for s in specs if not s.expert and s.tp_dim is None)
    return ParamCount(expert=expert, tp_sharded=tp_sharded, replicated=replicated)


# --- sharding (parallel.sharding = zero2 | zero3) -------------------------------------


def shard_group_size(spec: ParamSpec, dims: ParallelDims) -> int:
    """The ranks ``spec`` is sharded over: those that hold the same weights."""
    if spec.expert:
        return dims.dp * dims.tp
    if spec.data_tp and dims.tp > 1:
        return dims.dp * dims.ep * dims.tp
    return dims.dp * dims.ep


def shard_dim(spec: ParamSpec, dims: ParallelDims) -> int:
    """The dim sharding splits ``spec`` along: ``parallel.tags.shard_dim``, the rule FSDP uses."""
    return tags.shard_dim(
        spec.shape, expert=spec.expert, tp_dim=spec.tp_dim, tp_size=dims.tp, group_size=shard_group_size(spec, dims)
    )


def local_numel(spec: ParamSpec, dims: ParallelDims, sharded: bool, rank: int = 0) -> int:
    """Elements of ``spec`` that rank ``rank`` of its shard group keeps (all when not sharded)."""
    if not sharded:
        return spec.numel
    k, dim = shard_group_size(spec, dims), shard_dim(spec, dims)
    n = spec.shape[dim]
    chunk = -(-n // k)
    rows = max(0, min(chunk, n - rank * chunk))
    return spec.numel // n * rows if n else 0


def uneven_non_leading_shard(specs: list[ParamSpec], dims: ParallelDims) -> ParamSpec | None:
    """The first parameter that would be split unevenly along a dim other than 0, which
    FSDP2 refuses (NotImplementedError in fully_shard); None if there is none."""
    for s in specs:
        dim = shard_dim(s, dims)
        if dim != 0 and s.shape[dim] % shard_group_size(s, dims):
            return s
    return None
