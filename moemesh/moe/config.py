"""The model's own configuration: plain dataclasses, no Hydra.

``moemesh.config.schema`` registers this class with Hydra as the ``model`` group's
schema; the model, the planner and the tests build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    score_func: str = "softmax"  # router scores: softmax | sigmoid
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    aux_loss_factor: float = 0.01  # Switch/GShard load-balance loss E * sum_i f_i P_i
    z_loss_factor: float = 0.001  # router z-loss mean(logsumexp(logits)^2)
    load_balance_scope: str = "global"  # global: f, P over the data group; local: per rank
    capacity_factor: float | None = None  # None: dropless
    seq_aux_loss_factor: float = 0.0  # DeepSeek-V3 sequence-wise balance loss; 0: off
    expert_bias_update_rate: float = 0.0  # aux-loss-free balancing (selection bias); 0: off
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    init_std: float = 0.02
    norm_eps: float = 1e-5


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether layer ``layer`` (0-based, global) has an MoE FFN: every ``moe_every_k_layers``-th layer.

    A function, not a method: the config also arrives as an OmegaConf node.
    """
    return (layer + 1) % cfg.moe_every_k_layers == 0
