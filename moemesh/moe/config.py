"""The model's own configuration: plain dataclasses, no Hydra.

``moemesh.config.schema`` registers this class with Hydra as the ``model`` group's
schema; the model, the planner and the tests build it directly. Each field's rule sits
in ``__post_init__``, so a model config that exists is a valid model (rules that need the
layout or the trainer live in ``moemesh.config.validate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moemesh import fields
from moemesh.errors import ConfigError
from moemesh.fields import LoadBalanceScope, ScoreFunc

# Below this, an expert takes under a tenth of its even share of the routed (token, expert)
# pairs: over 90% of them are dropped even when routing is perfectly balanced, and the MoE
# layers are mostly skipped (their output is zero for a dropped pair).
CAPACITY_FACTOR_MIN = 0.1


@dataclass
class ModelConfig:
    name: str = "???"  # required: OmegaConf reads "???" as MISSING
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    ffn_hidden_size: int = 512  # dense (non-MoE) SwiGLU FFN
    moe_ffn_hidden_size: int = 256  # one routed expert's SwiGLU FFN
    num_experts: int = 8
    top_k: int = 2
    moe_every_k_layers: int = 1  # layer l (0-based) is MoE iff (l + 1) % k == 0
    shared_expert_ffn_size: int = 0  # 0: no shared expert
    score_func: ScoreFunc = ScoreFunc.softmax
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    aux_loss_factor: float = 0.01  # Switch/GShard load-balance loss E * sum_i f_i P_i
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

    def __post_init__(self) -> None:
        p = "model."
        fields.choice(self, p, "score_func", ScoreFunc)
        fields.choice(self, p, "load_balance_scope", LoadBalanceScope)
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
        fields.non_negative(self, p, "shared_expert_ffn_size")
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
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"model.hidden_size/model.num_heads = {self.hidden_size}/{self.num_heads} = "
                f"{self.hidden_size // self.num_heads} must be even (rotary embedding)"
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
    """Whether layer ``layer`` (0-based, global) has an MoE FFN: every ``moe_every_k_layers``-th layer.

    A function, not a method: the config also arrives as an OmegaConf node.
    """
    return (layer + 1) % cfg.moe_every_k_layers == 0
