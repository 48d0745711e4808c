"""The options the released families need, as ordinary model options usable from scratch:
RoPE on interleaved pairs (the default) or on halves, an explicit head dim, qk-norm per head
or over the projection, q/k/v biases, a gated shared expert, tied embeddings, dense layers
among the MoE ones. (Against transformers, family by family: tests/interop.)"""

import dataclasses

import pytest
import torch

from moemesh.errors import ConfigError
from moemesh.moe.config import ModelConfig, head_dim, is_moe_layer
from moemesh.moe.model import Transformer, apply_rope, half_pairing_order, rope_tables

CFG = ModelConfig(
    name="t",
    vocab_size=64,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=48,
    moe_ffn_hidden_size=24,
    num_experts=4,
    top_k=2,
    max_seq_len=16,
)


def test_default_rope_rotates_interleaved_pairs_as_complex_numbers():
    """Unchanged default: dims (2i, 2i+1) form the complex number x_2i + i x_2i+1, times e^(i s theta_i)."""
    Dh, S = 8, 6
    x = torch.randn(1, 2, S, Dh)
    cos, sin = rope_tables(S, Dh, 10000.0)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), want, rtol=1e-6, atol=1e-6)


def test_rope_on_halves_is_the_same_rotation_of_reordered_dims():
    Dh, S = 8, 6
    x = torch.randn(2, 3, S, Dh)
    cos, sin = rope_tables(S, Dh, 500.0)
    order = half_pairing_order(Dh)
    torch.testing.assert_close(apply_rope(x[..., order], cos, sin, "half"), apply_rope(x, cos, sin)[..., order])


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_a_model_with_reordered_q_k_rows_and_rope_on_halves_computes_the_same(qk_norm):
    """The conversion an export does for a model trained with interleaved RoPE (moemesh/interop/hf)."""
    cfg = dataclasses.replace(CFG, qk_norm=qk_norm, qkv_bias=True, head_dim=16)
    a = Transformer(cfg)
    a.init_weights(0)
    with torch.no_grad():  # non-trivial norm weights and biases
        for n, p in a.named_parameters():
            if "norm" in n or "qkv_bias" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.3)
    b = Transformer(dataclasses.replace(cfg, rope_pairing="half"))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    # The pairing matters: the same weights with RoPE on halves compute something else.
    assert not torch.allclose(b(x, return_logits=True).logits, a(x, return_logits=True).logits, atol=1e-3)
    Dh = head_dim(cfg)
    order = torch.tensor(half_pairing_order(Dh))
    with torch.no_grad():
        for attn in (blk.attn for blk in b.layers.values()):
            for w, heads in ((attn.wq.weight, cfg.num_heads), (attn.wk.weight, cfg.num_kv_heads)):
                rows = (torch.arange(heads)[:, None] * Dh + order).flatten()
                w.copy_(w[rows])
            attn.qkv_bias.q.copy_(attn.qkv_bias.q.view(-1, Dh)[:, order].flatten())
            attn.qkv_bias.k.copy_(attn.qkv_bias.k.view(-1, Dh)[:, order].flatten())
            for norm in (attn.q_norm, attn.k_norm):
                if norm is not None:
                    norm.weight.copy_(norm.weight.view(-1, Dh)[:, order].flatten())
    torch.testing.assert_close(b(x, return_logits=True).logits, a(x, return_logits=True).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_are_one_matrix_used_as_the_head():
    model = Transformer(dataclasses.replace(CFG, tie_embeddings=True))
    model.init_weights(0)
    assert model.head is None and "head.weight" not in dict(model.named_parameters())
    x = torch.randint(0, CFG.vocab_size, (2, 5))
    out = model(x, x, return_logits=True)
    h = model._blocks(model.embed(x), [], 1.0)
    torch.testing.assert_close(out.logits, model.norm(h) @ model.embed.weight.T)
    out.loss.backward()
    assert model.embed.weight.grad is not None
    # Pipeline stages: the last keeps the embedding as its head, a middle one holds none.
    last, middle = Transformer(model.cfg), Transformer(model.cfg)
    last.keep_layers(range(2, 3))
    middle.keep_layers(range(1, 2))
    assert last.embed is not None and last.tied_copy and middle.embed is None and not middle.tied_copy


def test_dense_layers_first_k_and_every_k_place_the_moe_layers():
    cfg = dataclasses.replace(CFG, num_layers=6, moe_every_k_layers=1, first_k_dense_layers=1, dense_layers=[3])
    assert [l for l in range(6) if is_moe_layer(cfg, l)] == [1, 2, 4, 5]
    model = Transformer(cfg)
    assert [name for name, blk in model.layers.items() if blk.moe is None] == ["0", "3"]


def test_shared_expert_gate_scales_the_shared_output_by_a_sigmoid():
    cfg = dataclasses.replace(CFG, shared_expert_ffn_size=16, shared_expert_gate=True)
    model = Transformer(cfg)
    model.init_weights(0)
    moe = model.layers["0"].moe
    x = torch.randn(1, 4, cfg.hidden_size)
    want = torch.sigmoid(x @ moe.shared_gate.weight.T) * moe.shared(x)
    torch.testing.assert_close(moe._shared(x), want)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(shared_expert_gate=True), "model.shared_expert_gate=true needs a shared expert"),
        (dict(dense_layers=[3]), "model.dense_layers=[3]: layer 3 is not one of the model's 0..2"),
        (dict(first_k_dense_layers=3), "leave no MoE layer among the 3"),
        (dict(head_dim=7), "model.head_dim = 7 must be even"),
        (dict(hidden_size=30, num_heads=4), "model.hidden_size=30 must be divisible by model.num_heads=4"),
        (dict(qk_norm="layer"), "model.qk_norm='layer' is not one of none, head, full"),
        (dict(rope_pairing="halves"), "model.rope_pairing='halves' is not one of interleaved, half"),
        (dict(upcycle=dict(num_experts=6, top_k=2, granularity=4)), "must be multiples of model.upcycle.granularity=4"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(change, says):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(CFG, **change)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_head_dim_of_its_own_sizes_the_attention():
    cfg = dataclasses.replace(CFG, head_dim=16)  # 4 heads x 16 = 64 != hidden 32 (Qwen3's shape)
    attn = Transformer(cfg).layers["0"].attn
    assert attn.wq.weight.shape == (64, 32) and attn.wk.weight.shape == (32, 32) and attn.wo.weight.shape == (32, 64)
