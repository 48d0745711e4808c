"""The torch reference ops of the token path, against direct per-row definitions."""

import pytest
import torch

from moemesh.kernels.gating import gating_reference as fused_gating
from moemesh.kernels.permute import permute_reference as permute
from moemesh.kernels.sort_chunks import sort_chunks_reference as sort_chunks
from moemesh.kernels.unpermute import unpermute_reference as unpermute


def test_gating_topk_ties_prefer_lower_expert_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    g = fused_gating(logits, top_k=2, renormalize=False)
    assert g.topk_ids_TK.tolist() == [[1, 2], [0, 1]]
    assert g.counts_E.tolist() == [1, 2, 1, 0]


def test_gating_values():
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    g = fused_gating(logits, top_k=3, renormalize=True)
    probs = torch.softmax(logits, -1)
    ref_w, ref_ids = probs.topk(3, dim=-1)
    assert torch.equal(g.topk_ids_TK, ref_ids)
    torch.testing.assert_close(g.topk_weights_TK, ref_w / ref_w.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g.score_sum_E, probs.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.lse_T, torch.logsumexp(logits, -1))
    # The bias changes the selection, never the weights.
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    gb = fused_gating(logits, top_k=1, renormalize=False, expert_bias_E=bias)
    assert (gb.topk_ids_TK == 4).all()
    torch.testing.assert_close(gb.topk_weights_TK[:, 0], probs[:, 4])


@pytest.mark.parametrize("T,K,E", [(0, 1, 4), (1, 1, 1), (7, 2, 8), (13, 4, 8)])
def test_permute_unpermute_round_trip(T, K, E):
    torch.manual_seed(T)
    x = torch.randn(T, 5, requires_grad=True)
    ids = torch.randint(0, E, (T, K))
    w = torch.rand(T, K, requires_grad=True)
    rows, row_map, counts = permute(x, ids, E)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    # expert-major, token order kept inside an expert (stable)
    assert torch.equal(ids.flatten()[row_map], torch.sort(ids.flatten(), stable=True).values)
    assert torch.equal(rows, x[row_map // K])
    out = unpermute(rows * 2, row_map, w)
    torch.testing.assert_close(out, 2 * x * w.sum(1, keepdim=True))
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * w.sum(1, keepdim=True).detach().expand_as(x))


def test_permute_skips_dropped_pairs():
    x = torch.arange(6.0).view(3, 2)
    ids = torch.tensor([[0, -1], [1, 0], [-1, -1]])
    rows, row_map, counts = permute(x, ids, 2)
    assert row_map.tolist() == [0, 3, 2] and counts.tolist() == [2, 1]
    out = unpermute(rows, row_map, torch.ones(3, 2))
    assert out.tolist() == [[0, 1], [4, 6], [0, 0]]


def test_sort_chunks_rank_major_to_expert_major_and_back():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # R=2 source ranks, e=3 local experts
    labels = [(r, j) for r in range(2) for j in range(3) for _ in range(int(counts[r, j]))]
    rows = torch.tensor([[r, j] for r, j in labels], dtype=torch.float32)
    expert_major = sort_chunks(rows, counts)
    assert [tuple(map(int, row)) for row in expert_major] == sorted(labels, key=lambda rj: (rj[1], rj[0]))
    assert torch.equal(sort_chunks(expert_major, counts.t()), rows)


def test_gating_ties_prefer_lower_expert_id_at_a_realistic_expert_count():
    """64 and 256 experts (DeepSeek-V3's count): torch's unstable CPU sort keeps the order of ties
    only for short rows, so a short row cannot tell a stable sort from an unstable one."""
    for E in (64, 256):
        logits = torch.zeros(3, E)
        logits[:, ::3] = 1.0  # E/3 tied best experts, the rest tied below them
        ids = fused_gating(logits, top_k=8, renormalize=True).topk_ids_TK
        assert ids.tolist() == [list(range(0, 24, 3))] * 3, E
        ids = fused_gating(torch.zeros(2, E), top_k=6, renormalize=True).topk_ids_TK
        assert ids.tolist() == [list(range(6))] * 2, E


def test_group_ties_prefer_lower_group_id_at_a_realistic_group_count():
    """Rank-limited routing makes each EP rank a group: 32 and 64 groups, where torch's unstable
    CPU sort no longer keeps tied groups in order. Every group tied: the lowest groups are allowed,
    and the top-k (ties again) takes the lowest experts."""
    from moemesh.kernels.gating import group_limited_mask

    for G in (32, 64):
        logits = torch.zeros(3, 2 * G)
        allowed = group_limited_mask(logits, score_func="sigmoid", expert_bias_E=None, n_groups=G, topk_groups=4)
        assert allowed.tolist() == [[True] * 8 + [False] * (2 * G - 8)] * 3, G
        ids = fused_gating(logits, top_k=6, renormalize=True, score_func="sigmoid", n_groups=G, topk_groups=4)
        assert ids.topk_ids_TK.tolist() == [list(range(6))] * 3, G
