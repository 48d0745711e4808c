import math

import pytest
import torch

from moemesh.kernels.gating import gating_reference as fused_gating
from moemesh.moe.layer import capacity_drop
from moemesh.moe.router import router_losses, sequence_aux_loss


def test_aux_loss_is_one_for_perfect_balance_and_E_for_collapse():
    E, T = 4, 8
    # Uniform probabilities, round-robin top-1 assignment: f_i = P_i = 1/E -> aux = 1.
    logits = torch.zeros(T, E)
    g = fused_gating(logits, top_k=1, renormalize=False)
    ids = torch.arange(T).remainder(E).view(T, 1)
    g = type(g)(ids, g.topk_weights_TK, torch.bincount(ids.flatten(), minlength=E), g.score_sum_E, g.lse_T)
    assert abs(float(router_losses(g, stats_group=None).aux_loss) - 1.0) < 1e-6
    # Everything on expert 0 with probability ~1: aux -> E.
    logits = torch.full((T, E), -30.0)
    logits[:, 0] = 30.0
    g = fused_gating(logits, top_k=1, renormalize=False)
    assert abs(float(router_losses(g, stats_group=None).aux_loss) - E) < 1e-4


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    g = fused_gating(logits, top_k=1, renormalize=False)
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(router_losses(g, stats_group=None).z_loss, expected)


def test_aux_loss_gradient_reaches_router_probabilities():
    logits = torch.randn(6, 4, requires_grad=True)
    g = fused_gating(logits, top_k=2, renormalize=True)
    router_losses(g, stats_group=None).aux_loss.backward()
    assert logits.grad.abs().sum() > 0


def test_sigmoid_aux_loss_uses_scores_normalised_per_token():
    """Megatron-Core's rule: with sigmoid scores the balance loss sees each token's scores
    divided by their sum over the experts. On raw sigmoids the loss under perfect balance would
    be the mean score sum, which falls as every logit falls: a pull on the router unrelated to
    balance."""
    E, T = 4, 8
    ids = torch.arange(T).remainder(E).view(T, 1)  # perfect balance: f_i = 1/E

    def aux(logits):
        g = fused_gating(logits, top_k=1, renormalize=False, score_func="sigmoid")
        g = type(g)(ids, g.topk_weights_TK, torch.bincount(ids.flatten(), minlength=E), g.score_sum_E, g.lse_T)
        return g, router_losses(g, stats_group=None).aux_loss

    for level in (-3.0, 0.0, 3.0):  # every logit equal: uniform scores once normalised
        g, loss = aux(torch.full((T, E), level))
        torch.testing.assert_close(g.score_sum_E, torch.full((E,), T / E))
        assert abs(float(loss) - 1.0) < 1e-6
    # Under perfect balance the loss is 1 whatever the logits: no gradient at all.
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0)).requires_grad_()
    g, loss = aux(logits)
    assert abs(loss.item() - 1.0) < 1e-6
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().max() < 1e-6
    # Every logit far below 0 (fp32 sigmoid underflows to 0): 0 scores, not NaN.
    g = fused_gating(torch.full((2, E), -200.0), top_k=1, renormalize=False, score_func="sigmoid")
    assert torch.equal(g.score_sum_E, torch.zeros(E))


def test_capacity_drops_lowest_weight_overflow():
    ids = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.2], [0.9], [0.5], [0.3]])
    kept, dropped = capacity_drop(ids, w, num_experts=2, capacity=2)
    assert kept.flatten().tolist() == [-1, 0, 0, 1] and int(dropped) == 1


@pytest.mark.parametrize("factor", [4.0, 7.5, 1e308])
def test_a_capacity_of_every_token_drops_nothing_and_a_huge_factor_does_not_overflow(factor):
    """capacity_factor * top_k >= num_experts gives each expert room for every token: nothing can
    drop. 1e308 * T * K was an OverflowError (inf to int) at step 0."""
    from moemesh.moe.config import ModelConfig
    from moemesh.moe.layer import drop_over_capacity

    torch.manual_seed(0)
    E, K, T = 8, 2, 64
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    cfg = ModelConfig(name="t", hidden_size=16, num_experts=E, top_k=K, moe_ffn_hidden_size=8, capacity_factor=factor)
    kept, dropped = drop_over_capacity(ids, w, cfg)
    assert torch.equal(kept, ids) and int(dropped) == 0
    if factor < 1e300:  # the same as the capacity formula gives
        reference, ref_dropped = capacity_drop(ids, w, E, math.ceil(factor * T * K / E))
        assert torch.equal(kept, reference) and int(ref_dropped) == 0


def test_capacity_mode_layer_equals_dropless_with_dropped_pairs_removed():
    from moemesh.moe.config import ModelConfig
    from moemesh.moe.layer import MoELayer

    torch.manual_seed(0)
    cfg = ModelConfig(name="t", hidden_size=16, num_experts=4, top_k=2, moe_ffn_hidden_size=8)
    dropless = MoELayer(cfg=cfg)
    for p in dropless.parameters():
        torch.nn.init.normal_(p, std=0.5)
    capped = MoELayer(cfg=ModelConfig(**{**cfg.__dict__, "capacity_factor": 0.5}))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(1, 12, 16)
    out, stats = capped(x)
    capacity = 3  # ceil(0.5 * 12 tokens * 2 / 4 experts)
    gate, _ = dropless.router(x[0])
    ids, dropped = capacity_drop(gate.topk_ids_TK, gate.topk_weights_TK, 4, capacity)
    assert int(stats.dropped) == int(dropped) > 0
    assert (torch.bincount(ids[ids >= 0], minlength=4) <= capacity).all()
    # The fan-out counts the pairs kept: a token whose pairs all dropped reaches no rank (at a
    # capacity of 2, 8 of the 24 pairs stay: at least 4 of the 12 tokens lose both).
    tighter = MoELayer(cfg=ModelConfig(**{**cfg.__dict__, "capacity_factor": 0.25}))
    tighter.load_state_dict(dropless.state_dict())
    reached = (capacity_drop(gate.topk_ids_TK, gate.topk_weights_TK, 4, 2)[0] >= 0).any(1)
    assert tighter(x)[1].fanout_K1.tolist() == [int((~reached).sum()), int(reached.sum()), 0]
    assert int((~reached).sum()) >= 4
    rows, meta = dropless.dispatcher.dispatch(x[0], ids)
    expected = dropless.dispatcher.combine(dropless.experts(rows, meta.tokens_per_expert_e), gate.topk_weights_TK, meta)
    torch.testing.assert_close(out[0], expected)


def test_expert_bias_moves_toward_the_mean_load_and_changes_selection_only():
    from moemesh.moe.router import Router

    r = Router(hidden_size=4, num_experts=4, top_k=1, renormalize=False, bias_update_rate=0.1)
    r.update_bias(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5: expert 0 over, 1-3 under
    assert r.expert_bias_E.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    torch.nn.init.zeros_(r.weight_ED)
    r.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    gate, _ = r(torch.randn(5, 4))
    assert (gate.topk_ids_TK == 2).all()  # the bias decided the selection
    torch.testing.assert_close(gate.topk_weights_TK, torch.full((5, 1), 0.25))  # weights: unbiased scores


def test_sequence_aux_loss_known_answer():
    from moemesh.moe.router import sequence_aux_loss

    # 2 sequences of 2 tokens, E=2, K=1; uniform scores (P=1/2 each). Sequence 0 sends both
    # tokens to expert 0: f = (2*E/(K*S), 0) = (2, 0) -> sum f P = 1. Sequence 1 splits: f = (1, 1)
    # -> sum f P = 1. Mean over sequences: 1 (the balanced value is also 1 with uniform P).
    logits = torch.zeros(4, 2, requires_grad=True)
    ids = torch.tensor([[0], [0], [0], [1]])
    seq = torch.tensor([0, 0, 1, 1])
    loss = sequence_aux_loss(logits, ids, seq, num_seqs=2, seq_len=2, score_func="softmax", tp_group=None)
    assert float(loss.detach()) == pytest.approx(1.0)
    loss.backward()  # overloaded expert 0 in sequence 0: its score gets pushed down
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0


def test_router_entropy():
    from moemesh.moe.router import entropy_sum

    assert float(entropy_sum(torch.zeros(3, 4))) == pytest.approx(3 * math.log(4), rel=1e-6)
    assert float(entropy_sum(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_sequence_aux_loss_counts_k_pairs_per_token_and_normalises_sigmoid_scores():
    """f_i divides by K (top-2's pairs are twice the tokens) and P_i takes each token's scores
    normalised to sum 1, as softmax's do: a balanced top-2 sequence scores 1, and so do sigmoid
    scores that are all equal, whatever their level (raw sigmoid(3) would give 1.9)."""
    from moemesh.moe.router import sequence_aux_loss

    ids = torch.tensor([[0, 1], [2, 3]])  # one sequence of 2 tokens, E=4, K=2: every expert once
    loss = sequence_aux_loss(
        torch.zeros(2, 4), ids, torch.tensor([0, 0]), num_seqs=1, seq_len=2, score_func="softmax", tp_group=None
    )
    assert loss.item() == pytest.approx(1.0)
    loss = sequence_aux_loss(
        torch.full((2, 2), 3.0),
        torch.tensor([[0], [1]]),
        torch.tensor([0, 0]),
        num_seqs=1,
        seq_len=2,
        score_func="sigmoid",
        tp_group=None,
    )
    assert loss.item() == pytest.approx(1.0)


def test_sequence_aux_loss_of_tp_peers_sums_to_the_whole_sequences(monkeypatch):
    """Under TP each peer holds part of every sequence: the counts are summed over the peers
    (the all-reduce, replayed here by hand) and the peers' losses add up to the loss of the
    whole sequences; without the sum each peer's f would count only its own tokens."""
    from moemesh.moe import router

    torch.manual_seed(0)
    T, E, K, S = 8, 4, 2, 4  # 2 sequences of 4 tokens; peer 0 holds tokens 0-1 and 4-5
    logits = torch.randn(T, E)
    ids = torch.topk(logits, K).indices
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    kw = dict(num_seqs=2, seq_len=S, score_func="softmax")
    whole = router.sequence_aux_loss(logits, ids, seq, tp_group=None, **kw)
    peers = [torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])]
    counts = []
    monkeypatch.setattr(router, "all_reduced", lambda t, group: counts.append(t) or t)
    for p in peers:
        router.sequence_aux_loss(logits[p], ids[p], seq[p], tp_group="tp", **kw)
    total = counts[0] + counts[1]
    monkeypatch.setattr(router, "all_reduced", lambda t, group: total)
    parts = [router.sequence_aux_loss(logits[p], ids[p], seq[p], tp_group="tp", **kw) for p in peers]
    torch.testing.assert_close(parts[0] + parts[1], whole)


def test_a_fractional_capacity_rounds_up():
    """capacity = ceil(capacity_factor * T * K / E): 1.1 * 10 * 1 / 2 = 5.5 gives each expert 6
    slots, so 6 of expert 0's 7 pairs stay (int() would keep 5)."""
    from moemesh.moe.config import ModelConfig
    from moemesh.moe.layer import drop_over_capacity

    ids = torch.tensor([[0]] * 7 + [[1]] * 3)
    w = torch.linspace(0.1, 1.0, 10)[:, None]
    cfg = ModelConfig(name="t", hidden_size=16, num_experts=2, top_k=1, moe_ffn_hidden_size=8, capacity_factor=1.1)
    kept, dropped = drop_over_capacity(ids, w, cfg)
    assert int(dropped) == 1 and kept[0, 0] == -1  # the lowest weight of expert 0 drops


def test_a_dropped_pair_is_sent_to_no_rank():
    """Rank-dispatch sends a token once per EP rank it reaches; a pair dropped by capacity (-1)
    reaches none (it went to rank 0, bytes for nothing, before the sentinel rank)."""
    from moemesh.moe.rank_dispatch import _pairs

    ids = torch.tensor([[0, -1], [-1, -1], [3, 2]])  # e=2 experts per rank, R=2 ranks
    token_U, rank_U, sent_R = _pairs(ids, 2, 2)
    assert list(zip(rank_U.tolist(), token_U.tolist())) == [(0, 0), (1, 2)]
    assert sent_R.tolist() == [1, 1]


def test_rank_dispatch_counts_every_byte_a_row_carries(monkeypatch):
    """The dropless minimum prices a sent row at what its dispatch exchanges carry: the row, its K
    local expert ids and its K weights (one rank: the exchanges are the identity, recorded here)."""
    from types import SimpleNamespace

    from moemesh.moe import rank_dispatch

    carried, priced = {}, []

    def exchange(t, send, recv, group, meter, kind):
        if kind == "dispatch":
            carried[len(carried)] = t[0].numel() * t.element_size()
        return t

    monkeypatch.setattr(rank_dispatch, "all_to_all_rows", exchange)
    d = SimpleNamespace(
        ep_size=1,
        num_local_experts=4,
        ep_group=None,
        meter=None,
        exchange_counts=lambda counts: counts,
        count_dropless_minimum=lambda send, recv, row_bytes: priced.append(row_bytes),
    )
    x = torch.randn(3, 6)
    ids, w = torch.tensor([[0, 2], [1, -1], [3, 0]]), torch.full((3, 2), 0.5)
    out = rank_dispatch.routed_by_rank(d, x, ids, w, lambda rows, counts: rows)
    assert priced == [sum(carried.values())] and len(carried) == 3
    assert torch.allclose(out, x * torch.tensor([[1.0], [0.5], [1.0]]))


def test_aux_loss_over_a_data_group_is_the_global_loss_and_gradient(monkeypatch):
    """Two data ranks, each with half the tokens: the counts are summed over the group (the
    all-reduce, replayed here by hand), and the mean of the ranks' surrogates is the loss of the
    whole batch on one rank, with the same gradient on every logit (what DDP's mean makes of it).
    ``scale`` (1/tp) multiplies both losses."""
    from moemesh.moe import router

    T, E, K = 6, 4, 2
    logits = torch.randn(2 * T, E, generator=torch.Generator().manual_seed(0)).requires_grad_()
    whole = router.router_losses(fused_gating(logits, top_k=K, renormalize=True), stats_group=None)
    (g_whole,) = torch.autograd.grad(whole.aux_loss, logits)
    halves = [fused_gating(logits[r * T : (r + 1) * T], top_k=K, renormalize=True) for r in range(2)]
    total = halves[0].counts_E + halves[1].counts_E
    monkeypatch.setattr(router, "all_reduced", lambda t, group: total)
    monkeypatch.setattr(router, "group_size", lambda group: 2)
    ranks = [router.router_losses(g, stats_group="dp") for g in halves]
    assert all(torch.equal(r.global_counts_E, whole.global_counts_E) for r in ranks)
    mean = (ranks[0].aux_loss + ranks[1].aux_loss) / 2
    torch.testing.assert_close(mean, whole.aux_loss)
    torch.testing.assert_close(torch.autograd.grad(mean, logits)[0], g_whole)
    scaled = router.router_losses(halves[0], stats_group="dp", scale=0.25)
    torch.testing.assert_close(scaled.aux_loss, ranks[0].aux_loss * 0.25)
    torch.testing.assert_close(scaled.z_loss, ranks[0].z_loss * 0.25)


def test_capacity_ties_keep_the_earlier_pairs_at_a_realistic_pair_count():
    """Equal weights (a router at zero init, repeated tokens): the earlier (token, k) pairs stay.
    40 pairs, past the length where torch's unstable CPU sort still keeps ties in order."""
    ids = torch.zeros(40, 1, dtype=torch.int64)
    kept, dropped = capacity_drop(ids, torch.full((40, 1), 0.5), num_experts=2, capacity=10)
    assert kept.flatten().tolist() == [0] * 10 + [-1] * 30 and int(dropped) == 30


def test_sequence_aux_loss_of_underflowed_sigmoid_scores_is_finite_as_the_gating_is():
    """Every logit of a row below about -104: its sigmoid scores underflow to 0 in fp32, and the
    normalised scores were 0/0 = NaN here, where the gating's balance scores keep them 0."""
    logits = torch.tensor([[-120.0, -130.0, -140.0, -150.0], [1.0, 0.0, -1.0, 2.0]])
    ids = torch.tensor([[0, 1], [3, 0]])
    seq = torch.tensor([0, 0])
    loss = sequence_aux_loss(logits, ids, seq, num_seqs=1, seq_len=2, score_func="sigmoid", tp_group=None)
    assert torch.isfinite(loss)
    p = torch.sigmoid(logits[1]) / torch.sigmoid(logits[1]).sum()  # the first row adds 0 to P
    f = torch.tensor([2.0, 1.0, 0.0, 1.0]) * 4 / (2 * 2)
    torch.testing.assert_close(loss, (f * p / 2).sum())
