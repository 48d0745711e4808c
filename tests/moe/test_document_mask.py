"""data.document_mask: attention stays inside each document of a packed sequence, so the
logits of the packed sequence are the logits of its documents run one by one."""

import torch

from moemesh.moe.config import ModelConfig
from moemesh.moe.model import Transformer, document_mask


def _model():
    cfg = ModelConfig(
        name="t", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
        moe_ffn_hidden_size=24, num_experts=4, top_k=2, max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    return model.eval()


@torch.no_grad()
def test_packed_logits_equal_the_documents_run_separately():
    model = _model()
    lengths = [5, 11, 1, 15]  # a one-token document too
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (1, n), generator=g) for n in lengths]
    packed = torch.cat(docs, dim=1)
    numbers = torch.cat([torch.full((1, n), 40 + i) for i, n in enumerate(lengths)], dim=1)  # any distinct numbers
    got = model(packed, documents_BS=numbers, return_logits=True).logits
    want = torch.cat([model(d, return_logits=True).logits for d in docs], dim=1)
    # fp32: the same sums in another order (RoPE rotates by absolute position; q.k depends only on
    # the distance), so equal to rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Without the mask the later documents see the earlier ones: the test can fail.
    plain = model(packed, return_logits=True).logits
    assert (plain[:, lengths[0] :] - want[:, lengths[0] :]).abs().max() > 1e-2
    # One document: the mask is plain causal attention.
    one = torch.zeros_like(packed)
    torch.testing.assert_close(model(packed, documents_BS=one, return_logits=True).logits, plain, rtol=1e-5, atol=1e-5)


def test_the_mask_is_causal_and_block_diagonal():
    m = document_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))[0, 0]
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, want)


def test_gradients_flow_under_the_mask():
    model = _model().train()
    x = torch.randint(0, 97, (2, 16))
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    out = model(x, torch.roll(x, -1, 1), documents_BS=docs)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
