"""Tiny random Hugging Face models of every family, built with transformers from configs in code
and saved with ``save_pretrained`` (offline: nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

# Small enough for a fast test; shaped so that every layout of the tests divides: 4 heads and
# 2 kv heads (tp2), 4 experts (ep2), 2-3 layers (pp2); Qwen3's head_dim differs from hidden/heads.
COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {
    "mixtral": dict(num_local_experts=4, router_aux_loss_coef=0.02, rope_theta=1e6),
    "olmoe": dict(num_experts=4, router_aux_loss_coef=0.01, norm_topk_prob=False),
    "qwen2_moe": dict(
        num_experts=4,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
    ),
    # 97 tokens: tp2 pads the vocabulary with a row that no checkpoint holds and the import must zero.
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, head_dim=16, norm_topk_prob=True, vocab_size=97),
}
DENSE = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True, intermediate_size=64),
    "qwen3": dict(tie_word_embeddings=True, head_dim=16, intermediate_size=64),
}


def hf_config(family: str, **overrides):
    from transformers import AutoConfig

    kw = {**COMMON, **(FAMILIES.get(family) or DENSE[family]), **overrides}
    kw.pop("num_experts", None) if family == "mixtral" else None
    return AutoConfig.for_model(family, **kw)


def save_tiny(family: str, directory: Path, *, seed: int = 0, fused: bool = False, dtype=None, **overrides) -> Path:
    """A random ``family`` model saved to ``directory`` (per-expert tensors as save_pretrained
    writes them, or transformers' fused in-memory layout with ``fused``; in ``dtype``, fp32 by
    default); returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    with torch.no_grad():  # transformers zero-inits some routers: random ones route for real
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(directory, save_original_format=not fused)
    return Path(directory)


def load_hf(directory: Path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=dtype or torch.float32)
    model.eval()
    return model


def hf_run(path: Path, **overrides):
    """A tiny RunConfig (tests/helpers.py's) with ``model=hf`` (conf/model/hf.yaml) on ``path``."""
    from omegaconf import OmegaConf

    from tests.helpers import tiny_run

    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "hf.yaml"))
    assert isinstance(model, dict)
    model["hf_path"] = str(path)
    base = {
        "model": model,
        "trainer.seq_len": 16,
        "trainer.global_batch_size": 8,
        "trainer.micro_steps": 2,
        "trainer.grad_clip": 0.0,
        "trainer.steps": 1,
        "checkpoint.save_final": False,
    }
    return tiny_run(**{**base, **overrides})
