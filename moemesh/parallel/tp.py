"""Tensor parallelism over the "tp" axis (Megatron-style), with optional sequence parallelism.

Shape letters: B batch, S sequence, D model dim, V vocab, t = TP degree.

Column-parallel linears shard their output features, row-parallel ones their input
features; attention splits heads, the dense FFN and the shared expert split their
hidden features, the embedding and the output head split the vocabulary, and the
cross-entropy runs on vocab shards without ever gathering the logits.

Why by hand and not with DTensor's parallel styles: moemesh keeps parameters as
plain tensors whose gradients its own bucketed reducer sums over explicit groups
(a router or an expert gradient must also be summed over tp, because TP peers
route different token slices), initialises every shard from the global tensor by
name, and needs token split/gather operators around the MoE layer that DTensor
does not provide. The collectives are torch's; the operators below are the five
autograd pairs Megatron-LM describes, each a few lines, and two that let a MoE layer's shared
expert share its routed rows' collectives without sequence parallelism.

With ``group=None`` (t = 1) every operator is the identity. Each forward collective
goes through ``comm.replayable``: an activation-checkpointed block's recompute
reuses its output instead of communicating again.

Under autocast the residual stream stays fp32, and a block part reads it through a TP
collective (its gradient's all-reduce; with SP a sequence gather and its reduce-scatter; a
MoE block's token split, whose gradient is gathered). These collectives move in the autocast
dtype (``wire_dtype``): the forward gather carries the values autocast's products would
round to anyway (the token split moves nothing forward: the router reads its fp32 rows), and
the backward rounds the gradient, summed over its readers in fp32 (the router's among them),
once before the sum over tp, as Megatron-LM's bf16 activations are: half the bytes. The
embedding's output, the start of the residual stream, stays exact. (Under sharding FSDP
gathers the weights in bf16 and the stream is bf16 already: nothing to narrow.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moemesh.parallel.comm import all_reduced, group_size, replayable
from moemesh.parallel.dims import padded_vocab
from moemesh.parallel.tags import GRAD_GROUP, TP_SHARD  # noqa: F401 (re-exported: the tags TP layers set)

# Attributes that tell the gradient reducer and the grad norm how a parameter is laid out.


def wire_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a TP collective that reads ``x`` from the residual stream moves in (see the module
    docstring): the autocast dtype where autocast covers ``x``'s device and ``x`` is fp32; else
    None (its own)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.dtype == torch.float32 else None


def _wire(t: torch.Tensor, wire: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``wire`` (None: its own dtype), contiguous and a tensor of its own (an in-place
    collective may write it)."""
    return t.to(dtype=wire or t.dtype, memory_format=torch.contiguous_format, copy=True)


def _on_wire(t: torch.Tensor, wire: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``wire``, or ``t`` itself where ``wire`` is None (a collective that writes a
    tensor of its own)."""
    return t if wire is None else _wire(t, wire)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    t = group_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(t)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(group_size(group), dim=dim)[_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    t = group_size(group)
    parts = [p.contiguous() for p in x.chunk(t, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Forward: identity (input replicated). Backward: sum the partial gradients (in ``wire``)."""

    @staticmethod
    def forward(ctx, x, group, wire):
        ctx.group, ctx.wire = group, wire
        return x

    @staticmethod
    def backward(ctx, g):
        summed = _wire(g, ctx.wire)
        dist.all_reduce(summed, group=ctx.group)
        return summed.to(g.dtype), None, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: sum the partial outputs. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduced(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather shards along dim. Backward: keep this rank's shard (consumers are replicated)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return replayable(lambda: _all_gather(x, group, dim))

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, ctx.dim), None, None


class _SplitToTP(torch.autograd.Function):
    """Forward: keep this rank's shard of a replicated tensor. Backward: all-gather the shards'
    grads (in ``wire``)."""

    @staticmethod
    def forward(ctx, x, group, dim, wire):
        ctx.group, ctx.dim, ctx.wire = group, dim, wire
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(_on_wire(g, ctx.wire), ctx.group, ctx.dim).to(g.dtype), None, None, None


class _SPGather(torch.autograd.Function):
    """Sequence parallel: forward all-gather along the sequence; backward reduce-scatter (both
    in ``wire``; the output and the gradient in the input's dtype)."""

    @staticmethod
    def forward(ctx, x, group, dim, wire):
        ctx.group, ctx.dim, ctx.wire = group, dim, wire
        return replayable(lambda: _all_gather(_on_wire(x, wire), group, dim)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(_on_wire(g, ctx.wire), ctx.group, ctx.dim).to(g.dtype), None, None, None


class _SPReduceScatter(torch.autograd.Function):
    """Sequence parallel: forward reduce-scatter along the sequence; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return replayable(lambda: _reduce_scatter(x, group, dim))

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


def _add_rows(whole: torch.Tensor, rows: torch.Tensor, group) -> torch.Tensor:
    """``whole`` with this rank's 1/t of its rows (``_split``'s) increased by ``rows``, in place."""
    n = rows.shape[0]
    assert whole.shape[0] == n * group_size(group), f"{whole.shape[0]} rows are not {group_size(group)} x {n}"
    whole.narrow(0, _rank(group) * n, n).add_(rows)
    return whole


class _SplitAndCopyToTP(torch.autograd.Function):
    """Forward: this rank's 1/t of the rows of a replicated tensor, and the tensor itself for
    column-parallel products. Backward: one all-reduce of the products' partial gradient with the
    rows' gradient added at their place, where ``split_to_tp`` and ``copy_to_tp`` would each run a
    collective (an all-gather and an all-reduce: 3 units of the tensor where 2 do)."""

    @staticmethod
    def forward(ctx, x, group, wire):
        ctx.group, ctx.wire = group, wire
        return _split(x, group, 0), x

    @staticmethod
    def backward(ctx, g_rows, g_whole):
        g = _add_rows(g_whole.clone(memory_format=torch.contiguous_format), g_rows, ctx.group)
        summed = _on_wire(g, ctx.wire)  # g is a copy already
        dist.all_reduce(summed, group=ctx.group)
        return summed.to(g.dtype), None, None


class _ReduceWithRows(torch.autograd.Function):
    """Forward: the sum over tp of row-parallel partial outputs, with this rank's rows of another
    output added at their place: ``reduce_from_tp`` and ``gather_from_tp`` in one all-reduce.
    Backward: the replicated gradient, and its rows for this rank's part."""

    @staticmethod
    def forward(ctx, partial, rows, group):
        ctx.group = group

        def run() -> torch.Tensor:
            dtype = torch.promote_types(partial.dtype, rows.dtype)
            out = _add_rows(partial.to(dtype, memory_format=torch.contiguous_format, copy=True), rows, group)
            dist.all_reduce(out, group=group)
            return out

        return replayable(run)

    @staticmethod
    def backward(ctx, g):
        return g, _split(g, ctx.group, 0), None


# Eager under torch.compile: its second output is its input, and where a graph break follows
# (trainer.compile=model breaks around the routed path) the compiled graph would hand that alias
# on outside the Function, so its gradient would skip the all-reduce.
@torch.compiler.disable
def split_and_copy_to_tp(x, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(``split_to_tp(x, group, 0, wire)``, ``copy_to_tp(x, group, wire)``) through one
    collective, ``wire`` being ``wire_dtype(x)``: a MoE layer's routed rows and its shared
    expert's input, without sequence parallelism."""
    if group_size(group) == 1:
        return x, x
    assert x.shape[0] % group_size(group) == 0, f"{x.shape[0]} rows do not split over {group_size(group)} TP ranks"
    return _SplitAndCopyToTP.apply(x, group, wire_dtype(x))


def reduce_with_rows(partial, rows, group) -> torch.Tensor:
    """``reduce_from_tp(partial) + gather_from_tp(rows, group, 0)`` through one collective: a MoE
    layer's shared expert (row-parallel, unreduced, gated or not) and its routed rows."""
    if group_size(group) == 1:
        return partial + rows
    return _ReduceWithRows.apply(partial, rows, group)


# ``wire``: the dtype the collectives move in (``wire_dtype``; None: the tensor's own).
def copy_to_tp(x, group, wire: torch.dtype | None = None):
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group, wire)


def reduce_from_tp(x, group):
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x, group, dim):
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group, dim)


def split_to_tp(x, group, dim, wire: torch.dtype | None = None):
    return x if group_size(group) == 1 else _SplitToTP.apply(x, group, dim, wire)


def sp_gather(x, group, dim, wire: torch.dtype | None = None):
    return x if group_size(group) == 1 else _SPGather.apply(x, group, dim, wire)


def sp_reduce_scatter(x, group, dim):
    return x if group_size(group) == 1 else _SPReduceScatter.apply(x, group, dim)


# The MoE layer's tokens under TP. Without sequence parallelism the layer's input is
# replicated over tp: each TP rank routes its own 1/t of the tokens, so no token crosses
# the All-to-All twice, and the outputs are gathered back (with a shared expert: in its output
# all-reduce, ``reduce_with_rows``). With SP each rank already holds its own sequence shard:
# nothing to split or gather.


def split_tokens_to_tp(x_TD: torch.Tensor, group, *, sequence_parallel: bool) -> torch.Tensor:
    """The tokens this TP rank routes (all T, or this rank's T/t; their gradients gathered in
    ``wire_dtype``)."""
    return x_TD if sequence_parallel else split_to_tp(x_TD, group, 0, wire_dtype(x_TD))


def gather_tokens_from_tp(y_TD: torch.Tensor, group, *, sequence_parallel: bool) -> torch.Tensor:
    """The inverse of ``split_tokens_to_tp``: every token's output on every TP rank."""
    return y_TD if sequence_parallel else gather_from_tp(y_TD, group, 0)


def token_sequences(
    num_tokens: int, seq_len: int, group, *, sequence_parallel: bool, device=None
) -> tuple[torch.Tensor, int]:
    """For the tokens ``split_tokens_to_tp`` kept: each token's sequence (batch row) and the
    full sequence length. ``seq_len`` is the length this rank holds (S, or S/t with SP);
    tokens are flattened batch-major, so token i of the layer is in row i // seq_len."""
    first = 0 if sequence_parallel else _rank(group) * num_tokens  # this rank's slice of B*S
    full_len = seq_len * group_size(group) if sequence_parallel else seq_len
    seq_T = torch.div(torch.arange(first, first + num_tokens, device=device), seq_len, rounding_mode="floor")
    return seq_T, full_len


def _mark_sharded(p: nn.Parameter, dim: int, logical: int) -> nn.Parameter:
    setattr(p, TP_SHARD, (dim, logical))
    return p


def shard_parameter(p: nn.Parameter, group) -> nn.Parameter:
    """This TP rank's chunk of ``p``, a tensor of logical (global) shape tagged ``TP_SHARD``
    (dim, logical size): padded with zero rows to a multiple of the TP degree along dim (the
    vocabulary), then cut in equal chunks, rank i keeping chunk i. Free on the meta device.
    The tags carry over to the new parameter."""
    dim, logical = getattr(p, TP_SHARD)
    t = group_size(group)
    assert p.shape[dim] == logical, f"shard a logical tensor once: {tuple(p.shape)} along {dim} != {logical}"
    data = p.data
    pad = padded_vocab(logical, t) - logical
    if pad:
        pad_shape = list(data.shape)
        pad_shape[dim] = pad
        data = torch.cat([data, data.new_zeros(pad_shape)], dim=dim)
    shard = nn.Parameter(data.chunk(t, dim=dim)[_rank(group)].clone(), requires_grad=p.requires_grad)
    for key, value in vars(p).items():
        setattr(shard, key, value)
    return shard


class ColumnParallelLinear(nn.Module):
    """y[..., out/t] = x @ W_shard^T; input replicated (or sequence-sharded with SP).

    Built whole ([out, in], as one process holds it); ``shard(tp_group)`` keeps this rank's
    output features. ``trainer.parallelize.apply_tp`` calls it, never the model."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.tp_group, self.sp = None, False
        self.weight = _mark_sharded(nn.Parameter(torch.empty(out_features, in_features)), 0, out_features)

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        if group_size(tp_group) == 1:
            return
        self.tp_group, self.sp = tp_group, sequence_parallel
        self.weight = shard_parameter(self.weight, tp_group)

    def read_input(self, x):
        """The input as this rank's product reads it: replicated (the backward sums its gradient
        over tp) or, with SP, the sequence gathered (the backward reduce-scatters it)."""
        wire = wire_dtype(x)
        return sp_gather(x, self.tp_group, 1, wire) if self.sp else copy_to_tp(x, self.tp_group, wire)

    def forward(self, x):
        return F.linear(self.read_input(x), self.weight)


def column_parallel(x, *linears: ColumnParallelLinear, read: bool = True) -> tuple[torch.Tensor, ...]:
    """Several column-parallel products of one input (attention's q, k and v; an FFN's w1 and w3)
    through one collective: the input is read once, so the backward sums its gradient over tp in
    one all-reduce (with SP: the forward gathers the sequence once, the backward reduce-scatters
    once), not once per product, as Megatron-LM's fused QKV projection does. ``read=False``: ``x``
    was already read (``split_and_copy_to_tp``)."""
    first = linears[0]
    assert all(l.tp_group is first.tp_group and l.sp == first.sp for l in linears), "one TP group and SP mode"
    x = first.read_input(x) if read else x
    return tuple(F.linear(x, l.weight) for l in linears)


class RowParallelLinear(nn.Module):
    """y = sum over tp of x[..., in/t] @ W_shard^T; output replicated (or sequence-sharded with SP).

    Built whole; ``shard(tp_group)`` keeps this rank's input features."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.tp_group, self.sp = None, False
        self.weight = _mark_sharded(nn.Parameter(torch.empty(out_features, in_features)), 1, in_features)

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        if group_size(tp_group) == 1:
            return
        self.tp_group, self.sp = tp_group, sequence_parallel
        self.weight = shard_parameter(self.weight, tp_group)

    def forward(self, x, *, reduce: bool = True):
        """``reduce=False``: this rank's partial output, for the caller to sum over tp
        (``reduce_with_rows``)."""
        y = F.linear(x, self.weight)
        if not reduce:
            return y
        return sp_reduce_scatter(y, self.tp_group, 1) if self.sp else reduce_from_tp(y, self.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Rows [V_pad/t, D] per rank; each rank looks up the ids it owns, then the shards are summed.

    Built whole ([V, D]); ``shard(tp_group)`` keeps this rank's rows of the padded vocabulary."""

    def __init__(self, vocab_size: int, dim: int, *, padding_idx: int | None = None):
        super().__init__()
        self.tp_group, self.sp = None, False
        self.vocab_size = vocab_size
        self.padding_idx = padding_idx  # this token's row gets no gradient from the lookup (global id)
        self.rows, self.first = vocab_size, 0
        self.weight = _mark_sharded(nn.Parameter(torch.empty(vocab_size, dim)), 0, vocab_size)

    def shard(self, tp_group, *, sequence_parallel: bool = False) -> None:
        t = group_size(tp_group)
        if t == 1:
            return
        self.tp_group, self.sp = tp_group, sequence_parallel
        self.rows = padded_vocab(self.vocab_size, t) // t
        self.first = _rank(tp_group) * self.rows
        self.weight = shard_parameter(self.weight, tp_group)

    def forward(self, ids_BS):
        if group_size(self.tp_group) == 1:
            return F.embedding(ids_BS, self.weight, padding_idx=self.padding_idx)
        local = ids_BS - self.first
        outside = (local < 0) | (local >= self.rows)
        pad = self.padding_idx
        pad = pad - self.first if pad is not None and 0 <= pad - self.first < self.rows else None
        # (Row 0 stands in for the ids outside this shard: their output is masked, their gradient
        # is masked too, so it does not matter whether row 0 is the padding row.)
        x = F.embedding(local.masked_fill(outside, 0), self.weight, padding_idx=pad).masked_fill(
            outside.unsqueeze(-1), 0.0
        )
        return sp_reduce_scatter(x, self.tp_group, 1) if self.sp else reduce_from_tp(x, self.tp_group)

    def project(self, x):
        """The same matrix as a column-parallel output head (tied embeddings): logits over this
        rank's rows of the padded vocabulary, [..., V_pad/t]."""
        wire = wire_dtype(x)
        x = sp_gather(x, self.tp_group, 1, wire) if self.sp else copy_to_tp(x, self.tp_group, wire)
        return F.linear(x, self.weight)


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross-entropy from vocab-sharded logits [N, V_pad/t]; the full logits never exist."""

    @staticmethod
    def forward(ctx, logits_NVt, target_N, group, first: int, vocab_size: int):
        logits = logits_NVt.float()
        Vt = logits.shape[-1]
        cols = first + torch.arange(Vt, device=logits.device)
        logits = logits.masked_fill((cols >= vocab_size)[None, :], float("-inf"))  # vocab padding
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(logits - m[:, None])
        s = e.sum(-1)
        local = target_N - first
        mine = (local >= 0) & (local < Vt)
        tgt = torch.where(mine, logits.gather(1, local.clamp(0, Vt - 1)[:, None])[:, 0], torch.zeros_like(m))
        both = torch.stack([s, tgt])
        dist.all_reduce(both, group=group)
        s, tgt = both[0], both[1]
        loss = (torch.log(s) + m - tgt).mean()
        ctx.save_for_backward(e, s, local, mine)
        ctx.in_dtype = logits_NVt.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        e, s, local, mine = ctx.saved_tensors
        N = e.shape[0]
        grad = e / s[:, None]
        rows = torch.arange(N, device=grad.device)[mine]
        grad[rows, local[mine]] -= 1.0
        return (grad * (g / N)).to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_NVt, target_N, *, group, vocab_size: int) -> torch.Tensor:
    if group_size(group) == 1:
        return F.cross_entropy(logits_NVt.float()[:, :vocab_size], target_N)
    first = _rank(group) * logits_NVt.shape[-1]
    return _VocabParallelCE.apply(logits_NVt, target_N, group, first, vocab_size)
