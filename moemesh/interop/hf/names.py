"""Which Hugging Face tensor holds each moemesh tensor, and how (torch-free).

moemesh names a tensor by its global parameter name, experts one by one
(``layers.3.moe.experts.w1_eDF[17]``, as ``parallel/checkpoint_state.py`` keys them). A
``Ref`` says where its values are in a checkpoint: one tensor, maybe one expert of a fused
[E, ...] tensor, maybe a range of rows or columns, maybe transposed (moemesh's experts are
[D, F] for ``x @ w``; transformers' are [F, D] for ``F.linear``), maybe scaled.

Expert layouts read (``Layout``), detected from the tensor names:
  * per expert, ``w1``/``w3``/``w2`` under ``block_sparse_moe`` (Mixtral on the hub, and what
    transformers 5's ``save_pretrained`` writes for it);
  * per expert, ``gate_proj``/``up_proj``/``down_proj`` under ``mlp`` (OLMoE, Qwen2-MoE,
    Qwen3-MoE on the hub and from ``save_pretrained``);
  * fused, ``mlp.experts.gate_up_proj`` [E, 2F, D] and ``mlp.experts.down_proj`` [E, D, F]
    (transformers 5's experts in memory, written by ``save_pretrained(save_original_format=False)``).
An export writes the per-expert layout ``save_pretrained`` writes for the family.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from moemesh.moe.config import ModelConfig, is_moe_layer

EXPERT_KEY = re.compile(r"layers\.(\d+)\.moe\.experts\.(w1_eDF|w3_eDF|w2_eFD)\[(\d+)\]")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")

# moemesh's names inside a block -> transformers' (under model.layers.<l>.)
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.qkv_bias.q": "self_attn.q_proj.bias",
    "attn.qkv_bias.k": "self_attn.k_proj.bias",
    "attn.qkv_bias.v": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "moe.shared.w1.weight": "mlp.shared_expert.gate_proj.weight",
    "moe.shared.w3.weight": "mlp.shared_expert.up_proj.weight",
    "moe.shared.w2.weight": "mlp.shared_expert.down_proj.weight",
    "moe.shared_gate.weight": "mlp.shared_expert_gate.weight",
}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_PER_EXPERT = {  # moemesh expert weight -> (Mixtral's name, the others' name)
    "w1_eDF": ("w1", "gate_proj"),
    "w3_eDF": ("w3", "up_proj"),
    "w2_eFD": ("w2", "down_proj"),
}
_DENSE_FFN = {"w1_eDF": "mlp.gate_proj.weight", "w3_eDF": "mlp.up_proj.weight", "w2_eFD": "mlp.down_proj.weight"}


@dataclass(frozen=True)
class Ref:
    """Where one moemesh tensor's values are in a checkpoint."""

    name: str  # the transformers tensor
    expert: int | None = None  # index along its dim 0 (a fused [E, ...] tensor), then dropped
    rows: tuple[int, int] | None = None  # a range of rows (of the tensor, or of the expert's matrix)
    cols: tuple[int, int] | None = None  # a range of columns
    transpose: bool = False  # moemesh holds the (selected) matrix transposed
    scale: float = 1.0  # multiply the values by (upcycling's down projections)


@dataclass(frozen=True)
class Generated:
    """A tensor with no counterpart in the checkpoint, drawn by its key (upcycling's routers)."""

    key: str
    std: float
    rows_per_draw: int = 1  # consecutive rows sharing one draw (a copy's g fine-grained parts)


@dataclass(frozen=True)
class Layout:
    """How a checkpoint names its routed experts (module docstring)."""

    moe: str  # the MoE block's module: "block_sparse_moe" or "mlp"
    experts: str  # "w123" | "proj" | "fused" | "dense" (upcycling a dense FFN)


MIXTRAL_LAYOUT = Layout("block_sparse_moe", "w123")
PROJ_LAYOUT = Layout("mlp", "proj")


def detect_layout(names, cfg: ModelConfig, *, dense_source: bool) -> Layout:
    """The expert layout of a checkpoint whose tensors are ``names``, from its first MoE layer."""
    if dense_source:
        return Layout("mlp", "dense")
    l = next(l for l in range(cfg.num_layers) if is_moe_layer(cfg, l))
    p = f"model.layers.{l}"
    if f"{p}.block_sparse_moe.experts.0.w1.weight" in names:
        return MIXTRAL_LAYOUT
    if f"{p}.mlp.experts.gate_up_proj" in names:
        return Layout("mlp", "fused")
    return PROJ_LAYOUT


def expert_ref(cfg: ModelConfig, layout: Layout, layer: int, weight: str, expert: int) -> Ref:
    """Expert ``expert``'s ``weight`` (w1_eDF, w3_eDF, w2_eFD) of layer ``layer``: moemesh holds
    [D, F] (w1, w3) and [F, D] (w2), transformers the transposes."""
    p = f"model.layers.{layer}.{layout.moe}.experts"
    if layout.experts == "fused":
        F = cfg.moe_ffn_hidden_size
        if weight == "w2_eFD":
            return Ref(f"{p}.down_proj", expert=expert, transpose=True)
        rows = (0, F) if weight == "w1_eDF" else (F, 2 * F)
        return Ref(f"{p}.gate_up_proj", expert=expert, rows=rows, transpose=True)
    mixtral, proj = _PER_EXPERT[weight]
    return Ref(f"{p}.{expert}.{mixtral if layout.experts == 'w123' else proj}.weight", transpose=True)


def upcycled_expert_ref(cfg: ModelConfig, layer: int, weight: str, expert: int) -> Ref:
    """An upcycled expert from the dense FFN: part (expert mod g) of its hidden units, the down
    projection scaled by g (``moe.config.UpcycleConfig``)."""
    g = cfg.upcycle.granularity
    F = cfg.moe_ffn_hidden_size  # the dense FFN's F / g
    part = expert % g
    span = (part * F, (part + 1) * F)
    name = f"model.layers.{layer}.{_DENSE_FFN[weight]}"
    if weight == "w2_eFD":  # down_proj [D, F_dense]: the part's columns
        return Ref(name, cols=span if g > 1 else None, transpose=True, scale=float(g))
    return Ref(name, rows=span if g > 1 else None, transpose=True)


def hf_ref(cfg: ModelConfig, key: str, layout: Layout) -> Ref | Generated:
    """Where the moemesh tensor ``key`` (a global name, experts one by one) comes from."""
    m = EXPERT_KEY.fullmatch(key)
    if m:
        layer, weight, expert = int(m.group(1)), m.group(2), int(m.group(3))
        if layout.experts == "dense":
            return upcycled_expert_ref(cfg, layer, weight, expert)
        return expert_ref(cfg, layout, layer, weight, expert)
    if key in _TOP:
        return Ref(_TOP[key])
    m = _LAYER.fullmatch(key)
    if m is None:
        raise KeyError(key)
    layer, rest = int(m.group(1)), m.group(2)
    if rest == "moe.router.weight_ED":
        if layout.experts == "dense":
            return Generated(
                f"layers.{layer}.moe.router.upcycled", cfg.upcycle.router_init_std, cfg.upcycle.granularity
            )
        return Ref(f"model.layers.{layer}.{layout.moe}.gate.weight")
    return Ref(f"model.layers.{layer}.{_BLOCK[rest]}")


def moemesh_keys(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the whole model under its global key with its logical shape (experts one
    by one; the vocabulary unpadded): what a checkpoint must hold, and what an export writes.
    Lazy: a check stops at the first tensor missing, however many experts a config names."""
    from moemesh.moe.param_count import param_specs

    for spec in param_specs(cfg):
        if spec.expert:
            yield from ((f"{spec.name}[{i}]", spec.shape[1:]) for i in range(spec.shape[0]))
        else:
            yield spec.name, spec.shape


def selected_shape(ref: Ref, full: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of what ``ref`` selects from a tensor of shape ``full``, as moemesh holds it
    (transposed if it says so); None if the selection does not fit in the tensor."""
    shape = list(full)
    if ref.expert is not None:
        if not shape or not 0 <= ref.expert < shape[0]:
            return None
        shape = shape[1:]
    for dim, span in ((0, ref.rows), (1, ref.cols)):
        if span is None:
            continue
        if len(shape) <= dim or not 0 <= span[0] <= span[1] <= shape[dim]:
            return None
        shape[dim] = span[1] - span[0]
    if ref.transpose:
        if len(shape) != 2:
            return None
        shape.reverse()
    return tuple(shape)
