"""The model's own configuration: plain dataclasses, no Hydra.

``moemesh.config.schema`` registers this class with Hydra as the ``model`` group's
schema; the model, the planner and the tests build it directly. Each field's rule sits
in ``__post_init__``, so a model config that exists is a valid model (rules that need the
layout or the trainer live in ``moemesh.config.validate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moemesh import fields
from moemesh.errors import ConfigError
from moemesh.fields import LoadBalanceScope, QKNorm, RopePairing, ScoreFunc

# Below this, an expert takes under a tenth of its even share of the routed (token, expert)
# pairs: over 90% of them are dropped even when routing is perfectly balanced, and the MoE
# layers are mostly skipped (their output is zero for a dropped pair).
CAPACITY_FACTOR_MIN = 0.1
MAX_SEQ_LEN = 1 << 24  # fp32 holds every integer position up to it


@dataclass
class UpcycleConfig:
    """Sparse upcycling (``model.hf_path`` naming a dense checkpoint; moemesh/interop/hf/names.py, docs/hf.md):
    every FFN becomes an MoE layer of ``num_experts`` experts made from it, ``top_k`` of them
    routed per token (renormalised), so that the MoE computes the dense model at step 0."""

    num_experts: int = 0  # 0: off (an MoE checkpoint is loaded as it is)
    top_k: int = 2
    # 1: every expert a copy of the dense FFN. g > 1: fine-grained, expert i is part (i mod g) of
    # the FFN's g equal parts of hidden units, its down projection scaled by g; num_experts and
    # top_k must be multiples of g. The routers start with one random row per copy (shared by its
    # g parts), so the top-k picks whole copies and the MoE still equals the dense FFN at step 0.
    granularity: int = 1
    router_init_std: float = 0.02  # the router rows' N(0, std), drawn by (trainer.seed, global name)

    def __post_init__(self) -> None:
        p = "model.upcycle."
        fields.non_negative(self, p, "num_experts")
        fields.positive(self, p, "top_k", "granularity")
        fields.number(self, p, "router_init_std", lambda v: v > 0, "a finite number > 0")
        if not self.num_experts:
            return
        g = self.granularity
        if self.num_experts % g or self.top_k % g:
            raise ConfigError(
                f"model.upcycle.num_experts={self.num_experts} and model.upcycle.top_k={self.top_k} must be "
                f"multiples of model.upcycle.granularity={g} (each token takes whole copies of the FFN: its g parts)"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.upcycle.top_k={self.top_k} must be between 1 and model.upcycle.num_experts={self.num_experts}"
            )


@dataclass
class ModelConfig:
    name: str = "???"  # required: OmegaConf reads "???" as MISSING
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # null: hidden_size / num_heads (Qwen3 sets its own)
    ffn_hidden_size: int = 512  # dense (non-MoE) SwiGLU FFN
    moe_ffn_hidden_size: int = 256  # one routed expert's SwiGLU FFN
    num_experts: int = 8
    top_k: int = 2
    # Layer l (0-based) is MoE iff (l + 1) % moe_every_k_layers == 0, l >= first_k_dense_layers
    # and l is not in dense_layers (Qwen2-MoE's decoder_sparse_step and mlp_only_layers); the
    # others have a dense FFN of ffn_hidden_size.
    moe_every_k_layers: int = 1
    first_k_dense_layers: int = 0
    dense_layers: list[int] = field(default_factory=list)
    shared_expert_ffn_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # scale the shared expert's output by sigmoid(x . w), w [D] (Qwen2-MoE)
    qk_norm: QKNorm = QKNorm.none  # none | head (Qwen3) | full (OLMoE): RMSNorm of q and k before RoPE
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    tie_embeddings: bool = False  # the output head is the embedding matrix
    pad_token_id: int | None = None  # its embedding row gets no gradient (transformers' padding_idx); null: none
    rope_pairing: RopePairing = RopePairing.interleaved  # interleaved | half (the Llama family's)
    score_func: ScoreFunc = ScoreFunc.softmax
    renormalize: bool = True  # renormalise the top-k weights to sum to 1 (transformers' norm_topk_prob)
    # Switch/GShard load-balance loss E * sum_i f_i P_i per MoE layer, summed over layers, with
    # f_i = the fraction of the T*K routed pairs sent to expert i. transformers' is K times this
    # per layer (its f_i divides by T) and pools the layers into one loss (about their mean):
    # router_aux_loss_coef c there is aux_loss_factor = c * K / (MoE layers) here (docs/hf.md).
    aux_loss_factor: float = 0.01
    z_loss_factor: float = 0.001  # router z-loss mean(logsumexp(logits)^2)
    load_balance_scope: LoadBalanceScope = LoadBalanceScope["global"]
    capacity_factor: float | None = None  # None: dropless
    seq_aux_loss_factor: float = 0.0  # DeepSeek-V3 sequence-wise balance loss; 0: off
    expert_bias_update_rate: float = 0.0  # aux-loss-free balancing (selection bias); 0: off
    # Routing of current models (moemesh/kernels/gating.py; docs/routing.md), all off by default.
    # DeepSeek-V3 group-limited top-k: the experts in router_groups runs of E/groups, a token picks
    # from its router_topk_groups best groups (a group scored by its two highest scores).
    router_groups: int = 1  # 1: no groups
    router_topk_groups: int | None = None  # null: every group
    routed_scaling_factor: float = 1.0  # multiplies the top-k weights (after renormalisation)
    # A token's experts on at most this many EP ranks (groups: each EP rank's experts) or nodes
    # (groups: the EP ranks on one node of cluster.gpus_per_node GPUs); null: no limit.
    max_ranks_per_token: int | None = None
    max_nodes_per_token: int | None = None
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    # A Hugging Face checkpoint directory (config.json + safetensors): model=hf reads the shapes
    # from its config.json when the command is composed and the weights instead of initialising
    # (moemesh/interop/hf; docs/hf.md). null: initialise from trainer.seed.
    hf_path: str | None = None
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    def __post_init__(self) -> None:
        p = "model."
        fields.choice(self, p, "score_func", ScoreFunc)
        fields.choice(self, p, "load_balance_scope", LoadBalanceScope)
        fields.choice(self, p, "qk_norm", QKNorm)
        fields.choice(self, p, "rope_pairing", RopePairing)
        if isinstance(self.upcycle, dict):  # built from a plain dict (a checkpoint's meta.json)
            self.upcycle = UpcycleConfig(**self.upcycle)
        fields.positive(
            self,
            p,
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_hidden_size",
            "moe_ffn_hidden_size",
            "num_experts",
            "moe_every_k_layers",
            "max_seq_len",
        )
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ConfigError(
                f"model.max_seq_len={self.max_seq_len} must be <= {MAX_SEQ_LEN:,} (2^24): the rotary positions are "
                "fp32, exact only up to it, and their tables are built for every position on every rank"
            )
        fields.non_negative(self, p, "shared_expert_ffn_size", "first_k_dense_layers")
        fields.positive_or_null(self, p, "head_dim")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"model.pad_token_id={self.pad_token_id} must be a token id in [0, model.vocab_size={self.vocab_size}) "
                "or null"
            )
        fields.number(self, p, "init_std", lambda v: v > 0, "a finite number > 0 (the weights' standard deviation)")
        fields.number(self, p, "rope_theta", lambda v: v > 0, "a finite number > 0 (the rotary base, usually 10000)")
        fields.number(
            self, p, "norm_eps", lambda v: v > 0, "a finite number > 0 (added to the mean square before its root)"
        )
        for name in ("aux_loss_factor", "z_loss_factor", "seq_aux_loss_factor", "expert_bias_update_rate"):
            fields.number(self, p, name, lambda v: v >= 0, "a finite number >= 0 (0: off)")
        cf = self.capacity_factor
        if cf is not None and not (math.isfinite(cf) and cf >= CAPACITY_FACTOR_MIN):
            raise ConfigError(
                f"model.capacity_factor={cf} must be null (dropless) or a finite number >= {CAPACITY_FACTOR_MIN}: "
                f"below it an expert keeps under {CAPACITY_FACTOR_MIN:.0%} of its even share of the routed tokens, "
                f"so over {1 - CAPACITY_FACTOR_MIN:.0%} are dropped even when routing is perfectly balanced"
            )
        fields.finite_floats(self, p)
        self._check_shape()
        self._check_routing()

    def _check_shape(self) -> None:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads} "
                "(or set model.head_dim)"
            )
        if head_dim(self) % 2:
            how = "model.head_dim" if self.head_dim else f"model.hidden_size/model.num_heads = {self.hidden_size}/"
            raise ConfigError(
                f"{how}{'' if self.head_dim else self.num_heads} = {head_dim(self)} must be even (rotary embedding)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be divisible by model.num_kv_heads={self.num_kv_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be between 1 and model.num_experts={self.num_experts}")
        if self.num_layers % self.moe_every_k_layers:
            raise ConfigError(
                f"model.num_layers={self.num_layers} must be divisible by "
                f"model.moe_every_k_layers={self.moe_every_k_layers} (an MoE layer every k layers)"
            )
        self._check_layers()

    def _check_layers(self) -> None:
        bad = [l for l in self.dense_layers if not 0 <= l < self.num_layers]
        if bad:
            raise ConfigError(
                f"model.dense_layers={list(self.dense_layers)}: layer {bad[0]} is not one of the model's "
                f"0..{self.num_layers - 1}"
            )
        if not any(is_moe_layer(self, l) for l in range(self.num_layers)):
            raise ConfigError(
                f"model.first_k_dense_layers={self.first_k_dense_layers}, model.dense_layers={list(self.dense_layers)} "
                f"and model.moe_every_k_layers={self.moe_every_k_layers} leave no MoE layer among the "
                f"{self.num_layers}: an MoE model needs one"
            )
        if self.shared_expert_gate and not self.shared_expert_ffn_size:
            raise ConfigError(
                "model.shared_expert_gate=true needs a shared expert: set model.shared_expert_ffn_size > 0"
            )

    def _check_routing(self) -> None:
        p, E, G = "model.", self.num_experts, self.router_groups
        fields.positive(self, p, "router_groups")
        fields.positive_or_null(self, p, "router_topk_groups", "max_ranks_per_token", "max_nodes_per_token")
        fields.number(self, p, "routed_scaling_factor", lambda v: v > 0, "a finite number > 0 (1: off)")
        if E % G:
            raise ConfigError(f"model.router_groups={G} must divide model.num_experts={E} (experts per group)")
        topk = G if self.router_topk_groups is None else self.router_topk_groups
        if topk > G:
            raise ConfigError(f"model.router_topk_groups={topk} must be <= model.router_groups={G}")
        if topk * (E // G) < self.top_k:
            raise ConfigError(
                f"model.router_topk_groups x experts per group = {topk} x {E // G} = {topk * E // G} experts "
                f"must be >= model.top_k={self.top_k} (a token needs top_k experts to pick from)"
            )
        limits = [k for k in ("max_ranks_per_token", "max_nodes_per_token") if getattr(self, k) is not None]
        if G > 1:
            limits.insert(0, "router_groups")
        if len(limits) > 1:
            raise ConfigError(
                f"model.{limits[0]} and model.{limits[1]} both limit the experts a token may reach (each its own "
                "groups): set one"
            )

    @property
    def limit_key(self) -> str | None:
        """The layout-keyed routing limit that is set, if any: max_ranks_per_token or max_nodes_per_token."""
        if self.max_ranks_per_token is not None:
            return "max_ranks_per_token"
        return "max_nodes_per_token" if self.max_nodes_per_token is not None else None


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether layer ``layer`` (0-based, global) has an MoE FFN: every ``moe_every_k_layers``-th layer,
    past the first ``first_k_dense_layers`` and not listed in ``dense_layers``.

    A function, not a method: the config also arrives as an OmegaConf node.
    """
    return (
        (layer + 1) % cfg.moe_every_k_layers == 0
        and layer >= cfg.first_k_dense_layers
        and layer not in cfg.dense_layers
    )


def head_dim(cfg: ModelConfig) -> int:
    """Dh, one attention head's width: ``model.head_dim``, or hidden_size / num_heads when null."""
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


# Fields that say where the weights came from, not what the model is: a checkpoint saved after an
# import resumes whatever they are now (trainer/checkpointing.py compares every other field).
ORIGIN_FIELDS = ("name", "hf_path", "upcycle")
