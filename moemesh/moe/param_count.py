"""Parameters per rank from the config alone, without building the model.

The planner uses these counts; a test builds the real model on the meta device
for several layouts and checks every count is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from moemesh.moe.config import ModelConfig, is_moe_layer
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


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters (without the input embedding, with
    top-k of E experts) + 12 x layers x hidden x sequence for attention (PaLM's count)."""
    full = count_params(cfg)
    active = full.non_expert - cfg.vocab_size * cfg.hidden_size + full.expert * cfg.top_k / cfg.num_experts
    return 6 * active + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def count_params(
    cfg: ModelConfig, dims: ParallelDims | None = None, *, stage: int = 0, split: list[int] | None = None
) -> ParamCount:
    """Parameters on one rank of pipeline stage ``stage`` (every rank of a stage holds the same counts)."""
    from moemesh.parallel.pipeline import stage_layers

    dims = ParallelDims() if dims is None else dims
    D, t = cfg.hidden_size, dims.tp
    Dh = D // cfg.num_heads
    layers = stage_layers(cfg.num_layers, dims.pp, split)[stage]
    first, last = layers.start == 0, layers.stop == cfg.num_layers
    moe_layers = sum(1 for l in layers if is_moe_layer(cfg, l))
    dense_layers = len(layers) - moe_layers
    attention = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * Dh * D // t
    vocab = padded_vocab(cfg.vocab_size, t) // t * D  # embedding rows or head rows per rank
    tp_sharded = (
        len(layers) * attention
        + dense_layers * 3 * D * cfg.ffn_hidden_size // t
        + moe_layers * 3 * D * cfg.shared_expert_ffn_size // t
        + vocab * (int(first) + int(last))
    )
    replicated = (2 * len(layers) + int(last)) * D + moe_layers * cfg.num_experts * D
    expert = moe_layers * (cfg.num_experts // dims.ep) * 3 * D * cfg.moe_ffn_hidden_size
    return ParamCount(expert=expert, tp_sharded=tp_sharded, replicated=replicated)
