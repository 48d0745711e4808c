"""parallel/tp in one process: each operator issues its collective on the TP group in the
forward and the conjugate one in the backward, with the shapes a TP rank holds, and the layers,
the vocab-parallel lookup and the vocab-parallel loss keep exactly this rank's shard.

torch's fake backend runs a world of 4 in this process, the TP group being ranks 0-1 (this test
is rank 1): collectives return without communicating (an all-reduce leaves its input as it is),
so a rank's output is what it computes from its own shard. The vocabulary tests run as either
TP rank: the first rank's shard ends inside the vocabulary, the last one's in its padding.
The values summed over real peers are checked by the slow multi-rank tests
(tests/parallel/test_grads.py)."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moemesh.parallel import comm, tp
from moemesh.parallel.tags import TP_SHARD
from tests.counting import CollectiveLog, fake_world


@contextlib.contextmanager
def tp_rank_of_world4(rank=1):
    """The TP group {0, 1} of a fake world of 4, seen from ``rank`` (its TP rank too)."""
    with fake_world(4, rank):
        group = dist.new_group([0, 1])
        assert tp._rank(group) == rank
        yield group


def _forward_backward(fn, x):
    with CollectiveLog() as fwd:
        y = fn(x)
    with CollectiveLog() as bwd:
        y.backward(torch.ones_like(y))
    return y, dict(fwd.ops), dict(bwd.ops)


AR, AG, RS = "c10d::allreduce_", "c10d::allgather_", "c10d::reduce_scatter_"


@pytest.mark.parametrize(
    "op, out_shape, fwd_op, bwd_op",
    [
        (tp.copy_to_tp, (2, 4, 6), None, AR),
        (tp.reduce_from_tp, (2, 4, 6), AR, None),
        (lambda x, g: tp.gather_from_tp(x, g, 1), (2, 8, 6), AG, None),
        (lambda x, g: tp.split_to_tp(x, g, 1), (2, 2, 6), None, AG),
        (lambda x, g: tp.sp_gather(x, g, 1), (2, 8, 6), AG, RS),
        (lambda x, g: tp.sp_reduce_scatter(x, g, 1), (2, 2, 6), RS, AG),
    ],
    ids=["copy", "reduce", "gather", "split", "sp_gather", "sp_reduce_scatter"],
)
def test_each_tp_operator_runs_its_collective_on_the_tp_group_and_the_conjugate_backward(op, out_shape, fwd_op, bwd_op):
    with tp_rank_of_world4() as group:
        x = torch.randn(2, 4, 6, requires_grad=True)
        y, fwd, bwd = _forward_backward(lambda x: op(x, group), x)
        assert y.shape == out_shape
        assert x.grad.shape == x.shape
        assert fwd == ({(fwd_op, 2): 1} if fwd_op else {})
        assert bwd == ({(bwd_op, 2): 1} if bwd_op else {})


def test_every_tp_operator_is_the_identity_without_a_group():
    x = torch.randn(3, 4)
    for op in (tp.copy_to_tp, tp.reduce_from_tp):
        assert op(x, None) is x
    for op in (tp.gather_from_tp, tp.split_to_tp, tp.sp_gather, tp.sp_reduce_scatter):
        assert op(x, None, 0) is x


def test_a_split_keeps_this_ranks_chunk_and_a_gathers_backward_keeps_this_ranks_gradient():
    with tp_rank_of_world4() as group:
        x = torch.arange(24.0).view(2, 4, 3).requires_grad_(True)
        y = tp.split_to_tp(x, group, 1)
        assert torch.equal(y, x.detach()[:, 2:])
        z = torch.arange(16.0).view(2, 8).requires_grad_(True)
        g = torch.arange(32.0).view(2, 16)
        tp.gather_from_tp(z, group, 1).backward(g)
        assert torch.equal(z.grad, g[:, 8:])
        assert torch.equal(tp.split_tokens_to_tp(x, group, sequence_parallel=False), x.detach()[1:])
        assert tp.split_tokens_to_tp(x, group, sequence_parallel=True) is x
        assert tp.gather_tokens_from_tp(x, group, sequence_parallel=True) is x
        assert tp.gather_tokens_from_tp(x, group, sequence_parallel=False).shape == (4, 4, 3)


def test_the_rows_and_the_copy_move_their_gradients_in_one_all_reduce():
    """``split_and_copy_to_tp``: this rank's rows and the whole input; backward one all-reduce of
    the whole input's gradient with the rows' added at their place (the fake all-reduce leaves it
    as it is), where a split and a copy would each run a collective."""
    with tp_rank_of_world4() as group:
        x = torch.randn(6, 4, requires_grad=True)
        with CollectiveLog() as fwd:
            rows, whole = tp.split_and_copy_to_tp(x, group)
        assert torch.equal(rows, x.detach()[3:]) and torch.equal(whole, x.detach())
        g_rows, g_whole = torch.randn(3, 4), torch.randn(6, 4)
        with CollectiveLog() as bwd:
            torch.autograd.backward([rows, whole], [g_rows, g_whole])
        assert fwd.ops == {} and dict(bwd.ops) == {(AR, 2): 1}
        assert torch.equal(x.grad, g_whole + torch.cat([torch.zeros(3, 4), g_rows]))
        y = torch.randn(6, 4)
        assert all(t is y for t in tp.split_and_copy_to_tp(y, None))


def test_a_partial_output_and_the_rows_are_summed_in_one_all_reduce():
    """``reduce_with_rows``: forward one all-reduce of the partial output with this rank's rows
    added at their place, in the wider of the two dtypes; backward none (the gradient is
    replicated): the partial's is the gradient, the rows' its rows."""
    with tp_rank_of_world4() as group:
        partial = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
        rows = torch.randn(3, 4, requires_grad=True)
        with CollectiveLog() as fwd:
            y = tp.reduce_with_rows(partial, rows, group)
        assert dict(fwd.ops) == {(AR, 2): 1} and y.dtype == torch.float32
        assert torch.equal(y, partial.detach().float() + torch.cat([torch.zeros(3, 4), rows.detach()]))
        g = torch.randn(6, 4)
        with CollectiveLog() as bwd:
            y.backward(g)
        assert bwd.ops == {}
        assert torch.equal(partial.grad, g.bfloat16()) and torch.equal(rows.grad, g[3:])
        a, b = torch.randn(2, 3), torch.randn(2, 3)
        assert torch.equal(tp.reduce_with_rows(a, b, None), a + b)
        # rows that are not this rank's equal share are refused, not summed at a wrong place
        with pytest.raises(AssertionError, match="rows do not split over 2 TP ranks"):
            tp.split_and_copy_to_tp(torch.randn(5, 4), group)
        with pytest.raises(AssertionError, match="7 rows are not 2 x 3"):
            tp.reduce_with_rows(torch.randn(7, 4), torch.randn(3, 4), group)


def test_a_shard_is_this_ranks_chunk_of_the_zero_padded_tensor_with_its_tags():
    with tp_rank_of_world4() as group:
        p = torch.nn.Parameter(torch.arange(21.0).view(7, 3))
        setattr(p, TP_SHARD, (0, 7))
        p.extra_tag = "kept"
        shard = tp.shard_parameter(p, group)
        assert torch.equal(shard, torch.cat([p.detach()[4:], torch.zeros(1, 3)]))
        assert getattr(shard, TP_SHARD) == (0, 7) and shard.extra_tag == "kept" and shard.requires_grad
        q = torch.nn.Parameter(torch.arange(12.0).view(2, 6), requires_grad=False)
        setattr(q, TP_SHARD, (1, 6))
        assert torch.equal(tp.shard_parameter(q, group), q.detach()[:, 3:])
        assert not tp.shard_parameter(q, group).requires_grad


def test_column_and_row_parallel_layers_on_one_rank_are_nn_linear():
    x = torch.randn(2, 5, 6)
    for layer in (tp.ColumnParallelLinear(6, 4), tp.RowParallelLinear(6, 4)):
        torch.nn.init.normal_(layer.weight)
        layer.shard(None)
        assert layer.weight.shape == (4, 6)
        assert torch.equal(layer(x), F.linear(x, layer.weight))


@pytest.mark.parametrize("sp", [False, True])
def test_column_parallel_keeps_its_output_features_and_gathers_the_sequence_under_sp(sp):
    with tp_rank_of_world4() as group:
        layer = tp.ColumnParallelLinear(6, 8)
        torch.nn.init.normal_(layer.weight)
        whole = layer.weight.detach().clone()
        layer.shard(group, sequence_parallel=sp)
        assert torch.equal(layer.weight, whole[4:])
        x = torch.randn(2, 3, 6, requires_grad=True)
        y, fwd, bwd = _forward_backward(layer, x)
        assert y.shape == ((2, 6, 4) if sp else (2, 3, 4))
        assert x.grad.shape == x.shape and layer.weight.grad.shape == (4, 6)
        assert fwd == ({(AG, 2): 1} if sp else {})
        assert bwd == {(RS if sp else AR, 2): 1}
        if not sp:
            assert torch.equal(y, F.linear(x, whole[4:]))


@pytest.mark.parametrize("sp", [False, True])
def test_products_of_one_input_share_its_collective(sp):
    """q, k and v (or w1 and w3) read one copy of the input: one all-reduce of its gradient in
    the backward, or under SP one gather forward and one reduce-scatter backward, not one each;
    the input's gradient is the three products' summed before it."""
    with tp_rank_of_world4() as group:
        layers = [tp.ColumnParallelLinear(6, n) for n in (8, 4, 4)]
        for layer in layers:
            torch.nn.init.normal_(layer.weight)
            layer.shard(group, sequence_parallel=sp)
        x = torch.randn(2, 3, 6, requires_grad=True)
        y, fwd, bwd = _forward_backward(lambda x: torch.cat(tp.column_parallel(x, *layers), -1), x)
        assert fwd == ({(AG, 2): 1} if sp else {})
        assert bwd == {(RS if sp else AR, 2): 1}
        alone = x.detach().clone().requires_grad_(True)
        for layer in layers:
            layer(alone).sum().backward()
        assert y.shape == ((2, 6, 8) if sp else (2, 3, 8))
        if not sp:  # the fake collectives leave a gradient as it is: the local sum, once
            assert torch.equal(y, torch.cat([F.linear(x, l.weight) for l in layers], -1))
            torch.testing.assert_close(x.grad, alone.grad, rtol=1e-6, atol=1e-6)
        else:
            assert x.grad.shape == x.shape
        with pytest.raises(AssertionError, match="one TP group and SP mode"):
            tp.column_parallel(x, layers[0], tp.ColumnParallelLinear(6, 4))


@pytest.mark.parametrize("sp", [False, True])
def test_row_parallel_keeps_its_input_features_and_scatters_the_sequence_under_sp(sp):
    with tp_rank_of_world4() as group:
        layer = tp.RowParallelLinear(8, 6)
        torch.nn.init.normal_(layer.weight)
        whole = layer.weight.detach().clone()
        layer.shard(group, sequence_parallel=sp)
        assert torch.equal(layer.weight, whole[:, 4:])
        x = torch.randn(2, 4, 4, requires_grad=True)
        y, fwd, bwd = _forward_backward(layer, x)
        assert y.shape == ((2, 2, 6) if sp else (2, 4, 6))
        assert x.grad.shape == x.shape and layer.weight.grad.shape == (6, 4)
        assert fwd == {(RS if sp else AR, 2): 1}
        assert bwd == ({(AG, 2): 1} if sp else {})
        if not sp:
            assert torch.equal(y, F.linear(x, whole[:, 4:]))  # the fake all-reduce adds no peer


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("padding_idx", [None, 1, 5, 6])
def test_a_vocab_shard_looks_up_only_the_ids_it_owns(rank, padding_idx):
    """V = 7 over 2 ranks: rank 0 owns ids 0-3, rank 1 ids 4-6 and a zero padding row; ids a
    rank does not own give zeros and no gradient, and the padding id's row gets no gradient."""
    with tp_rank_of_world4(rank) as group:
        emb = tp.VocabParallelEmbedding(7, 3, padding_idx=padding_idx)
        torch.nn.init.normal_(emb.weight)
        whole = emb.weight.detach().clone()
        emb.shard(group)
        first = 4 * rank
        assert (emb.rows, emb.first) == (4, first) and emb.weight.shape == (4, 3)
        ids = torch.tensor([[0, 3, 4, 5], [6, 1, 6, 4]])
        with CollectiveLog() as fwd:
            x = emb(ids)
        assert fwd.ops == {(AR, 2): 1}
        owned = (ids >= first) & (ids < first + 4)
        assert torch.equal(x, torch.where(owned[..., None], whole[ids], torch.zeros(())))
        g = torch.randn(2, 4, 3)
        x.backward(g)
        expected = torch.zeros(4, 3)
        for i, row in zip(ids.flatten().tolist(), g.view(-1, 3)):
            if first <= i < first + 4 and i != padding_idx:
                expected[i - first] += row
        torch.testing.assert_close(emb.weight.grad, expected)
        assert emb.project(torch.randn(2, 4, 3)).shape == (2, 4, 4)


def test_a_sequence_parallel_vocab_shard_scatters_the_sequence_and_its_head_gathers_it():
    with tp_rank_of_world4() as group:
        emb = tp.VocabParallelEmbedding(7, 3)
        torch.nn.init.normal_(emb.weight)
        emb.shard(group, sequence_parallel=True)
        with CollectiveLog() as fwd:
            x = emb(torch.tensor([[0, 3, 4, 5], [6, 1, 6, 4]]))
        assert x.shape == (2, 2, 3) and fwd.ops == {(RS, 2): 1}
        with CollectiveLog() as fwd:
            logits = emb.project(x)
        assert logits.shape == (2, 4, 4) and fwd.ops == {(AG, 2): 1}


def _shard_cross_entropy(logits_NVt, target_N, first, vocab_size):
    """The loss one rank computes when no peer adds anything: a log-sum-exp over its own real
    columns, less the target's logit where it owns the target."""
    valid = logits_NVt[:, : vocab_size - first]
    local = target_N - first
    mine = (local >= 0) & (local < valid.shape[1])
    tgt = torch.where(mine, valid.gather(1, local.clamp(0, valid.shape[1] - 1)[:, None])[:, 0], 0.0)
    return (torch.logsumexp(valid, -1) - tgt).mean()


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_vocab_shards_loss_and_gradient_cover_its_own_columns_without_the_padding(rank, dtype):
    """V = 7 over 2 ranks of 4 columns: rank 0 holds ids 0-3, rank 1 ids 4-6 and a padding column."""
    with tp_rank_of_world4(rank) as group:
        logits = torch.randn(6, 4).to(dtype).requires_grad_(True)
        target = torch.tensor([4, 6, 0, 5, 3, 4])
        with CollectiveLog() as fwd:
            loss = tp.vocab_parallel_cross_entropy(logits, target, group=group, vocab_size=7)
        assert fwd.ops == {(AR, 2): 2}  # the max, then the sum and the target logit together
        loss.backward()
        assert logits.grad.dtype == dtype
        ref_logits = logits.detach().float().requires_grad_(True)
        ref = _shard_cross_entropy(ref_logits, target, first=4 * rank, vocab_size=7)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(logits.grad.float(), ref_logits.grad.to(dtype).float())
        if rank == 1:
            assert torch.all(logits.grad[:, 3] == 0)


def test_a_rank_owning_every_target_has_the_plain_cross_entropy_of_its_columns():
    with tp_rank_of_world4() as group:
        logits = torch.randn(5, 4, requires_grad=True)
        target = torch.tensor([4, 5, 6, 6, 4])
        loss = tp.vocab_parallel_cross_entropy(logits, target, group=group, vocab_size=8)
        loss.backward()
        ref_logits = logits.detach().clone().requires_grad_(True)
        ref = F.cross_entropy(ref_logits, target - 4)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_without_a_group_the_loss_is_the_cross_entropy_of_the_real_vocabulary():
    logits = torch.randn(5, 8, dtype=torch.bfloat16)
    target = torch.tensor([0, 6, 3, 2, 6])
    loss = tp.vocab_parallel_cross_entropy(logits, target, group=None, vocab_size=7)
    assert torch.equal(loss, F.cross_entropy(logits.float()[:, :7], target))


@pytest.mark.parametrize(
    "op",
    [
        tp.reduce_from_tp,
        lambda x, g: tp.gather_from_tp(x, g, 1),
        lambda x, g: tp.sp_gather(x, g, 1),
        lambda x, g: tp.sp_reduce_scatter(x, g, 1),
        lambda x, g: tp.reduce_with_rows(x, x[:1], g),
    ],
    ids=["reduce", "gather", "sp_gather", "sp_reduce_scatter", "reduce_with_rows"],
)
def test_a_recomputed_forward_collective_returns_its_recorded_output_without_communicating(op):
    with tp_rank_of_world4() as group:
        x = torch.randn(2, 4, 6)
        tape = comm.CollectiveTape()
        with comm.recording(tape):
            first = op(x, group)
        assert len(tape.outputs) == 1
        with comm.replaying(tape), CollectiveLog() as log:
            again = op(x, group)
        assert log.ops == {} and torch.equal(again, first)
