"""The equivalence tests' own rules (tests/same_math.py), on made-up records and gradients:
a comparison that stops at a rounding flip must still catch a wrong number, a different
routing, a flip too early, a swapped expert and a gradient no rank holds."""

import pytest
import torch

from tests.same_math import REL, assert_grads_match, assert_same_run

BASE = [500, 520, 490, 538]  # tokens per expert, 2,048 routed pairs


def _records(losses, loads=None):
    loads = loads or [BASE] * len(losses)
    return [
        {
            "step": i + 1,
            "loss": loss,
            "aux_loss": 1.0,
            "z_loss": 0.1,
            "grad_norm": 2.0,
            "load": {"layer1": {"tokens_per_expert": list(load)}},
        }
        for i, (loss, load) in enumerate(zip(losses, loads))
    ]


def _moved(load, pairs):
    return [load[0] - pairs, load[1] + pairs, *load[2:]]


def test_identical_routing_is_held_to_rel_on_every_step():
    ref = _records([5.0, 4.0, 3.0])
    assert assert_same_run(ref, _records([5.0, 4.0 * (1 + REL / 2), 3.0]), "x", min_steps=3) == 3
    with pytest.raises(AssertionError):
        assert_same_run(ref, _records([5.0, 4.0 * (1 + 3 * REL), 3.0]), "x", min_steps=3)


def test_a_flip_ends_the_comparison_and_what_follows_may_differ():
    ref = _records([5.0, 4.0, 3.0, 2.0])
    got = _records([5.0, 4.0, 3.3, 2.5], [BASE, BASE, _moved(BASE, 1), _moved(BASE, 9)])
    assert assert_same_run(ref, got, "x", min_steps=2) == 2
    # ... but not before: the steps before the flip are still held to REL.
    bad = _records([5.0, 4.1, 3.3, 2.5], [BASE, BASE, _moved(BASE, 1), BASE])
    with pytest.raises(AssertionError):
        assert_same_run(ref, bad, "x", min_steps=2)


def test_a_flip_before_the_minimum_steps_fails_and_says_where():
    ref = _records([5.0, 4.0, 3.0])
    got = _records([5.0, 4.0, 3.0], [BASE, _moved(BASE, 2), BASE])
    with pytest.raises(AssertionError, match="routing first differs at step 2.*1 steps compared, fewer than the 2"):
        assert_same_run(ref, got, "x", min_steps=2)


def test_a_different_routing_is_not_taken_for_a_flip():
    ref = _records([5.0, 4.0, 3.0])
    got = _records([5.0, 4.0, 3.0], [BASE, BASE, _moved(BASE, 21)])  # > max(2, 1% of 2,048)
    with pytest.raises(AssertionError, match="not a rounding flip but a different routing"):
        assert_same_run(ref, got, "x", min_steps=2)


def _piece(grad, expert_first=None, tp=None, tp_rank=0):
    return {"grad": grad, "expert_first": expert_first, "tp": tp, "tp_rank": tp_rank}


def test_gradient_pieces_are_placed_by_expert_id_and_tp_shard():
    torch.manual_seed(0)
    w, head = torch.randn(4, 3, 5), torch.randn(3, 7)  # 4 experts; a head over a vocabulary of 7
    ref = {"w": _piece(w), "head": _piece(head)}
    pad = torch.zeros(3, 1)  # TP pads the vocabulary to 8: rank 1's last column is padding

    def ranks(w0, w1, pad1=pad):
        return [
            {"w": _piece(w0, expert_first=0), "head": _piece(head[:, :4], tp=(1, 7), tp_rank=0)},
            {"w": _piece(w1, expert_first=2), "head": _piece(torch.cat([head[:, 4:], pad1], 1), tp=(1, 7), tp_rank=1)},
        ]

    assert assert_grads_match(ref, ranks(w[:2], w[2:]), "x") == 0.0
    with pytest.raises(AssertionError, match="rank 0 w: gradient off by"):
        assert_grads_match(ref, ranks(w[[1, 0]], w[2:]), "x")  # two experts swapped
    lost = ranks(w[:2], w[2:])
    del lost[1]["w"]  # experts 2 and 3: no rank holds them
    with pytest.raises(AssertionError, match=r"no rank holds \(all of\) the gradient of \['w'\]"):
        assert_grads_match(ref, lost, "x")
    with pytest.raises(AssertionError, match="padded vocabulary rows have a gradient"):
        assert_grads_match(ref, ranks(w[:2], w[2:], pad1=torch.ones(3, 1)), "x")
