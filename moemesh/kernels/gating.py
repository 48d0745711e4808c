"""Fused gating: router logits -> scores -> top-k ids and weights, plus the
statistics of the load-balance losses, in one pass over the logits.

Shapes: logits_TE [T, E] -> topk_ids_TK (int64), topk_weights_TK (fp32) [T, K];
counts_E (int64) and score_sum_E (fp32) [E]; lse_T (fp32) [T].

Scores are softmax (default) or sigmoid of the logits. The aux loss's statistic ``score_sum_E``
sums each token's scores normalised to 1 over the experts, as Megatron-Core's aux losses and
DeepSeek-V3's sequence-wise loss do: softmax's already are; raw sigmoid scores are not, and a
balance loss on them would also pull every logit down, whatever the balance. Selection:
  * without an expert bias, on the logits themselves (both score functions are
    monotonic, so this is the top-k of the scores, decided on exact inputs rather
    than on rounded exponentials that may differ between backends);
  * with a bias (aux-loss-free balancing), on score + bias; the bias never
    enters the weights. The score is a rounded exponential each backend computes
    its own way (reference exp(x - lse), kernel exp(x - m) / s), so two keys
    within a rounding error of each other may be ordered differently.
Tie-breaking: among equal selection keys the lower expert id wins, in every
backend (the reference gets it from a stable descending sort; the kernel takes
the minimum index among the row's maxima).

Group-limited routing (DeepSeek-V3; also the EP-rank- and node-limited routing, whose groups
are the experts of one EP rank or one node): the E experts form ``n_groups`` runs of E/G; a
token may pick only from its ``topk_groups`` best groups, a group scored by the sum of its two
highest scores (+ bias when there is one; the one highest when a group has one expert). The
groups are chosen first (``group_limited_mask``, plain torch for both backends: a few ops on
[T, G]); the top-k then runs on the masked selection key, in the kernel as in the reference.
``scale`` (the routed scaling factor) multiplies the weights after renormalisation.

Layers: ``_gating_fwd_kernel`` / ``_gating_bwd_kernel`` (Triton), ``_launch_*``
(allocation), ``moemesh::fused_gating`` and ``moemesh::fused_gating_backward``
(torch.library custom ops with fake implementations, autograd registered on the
forward: torch.compile keeps each as one node), ``_FusedGating`` (the same as an
autograd.Function, for eager calls), ``gating_triton`` (checks, then one of the
two), ``gating_reference`` (plain torch; the CPU production path).

Bytes moved by the Triton path: forward reads T*E logits once and writes T*K ids
and weights plus T lse; backward reads the logits again and writes T*E grads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moemesh.fields import ScoreFunc
from moemesh.kernels._triton import check, next_pow2, pick, tl, triton
from moemesh.kernels._tuning import launch_params


@dataclass(frozen=True)
class GatingOutput:
    topk_ids_TK: torch.Tensor  # int64, expert ids in selection order
    topk_weights_TK: torch.Tensor  # fp32 gate weights (renormalised if asked)
    counts_E: torch.Tensor  # int64 (token, k) pairs routed to each expert
    # fp32 sum over tokens of the scores normalised per token (for the aux loss): softmax's
    # as they are, sigmoid's divided by their sum over the experts (module doc)
    score_sum_E: torch.Tensor
    lse_T: torch.Tensor  # fp32 logsumexp of the logits (for the z-loss)


SCORE_FUNCS = ("softmax", "sigmoid")
# The Triton kernels hold a row's E logits in one tile: more experts than this cannot use them
# (kernels.backend=triton is refused for such a model, auto falls back to the torch reference).
MAX_TRITON_EXPERTS = 1024


def _bincount(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(ids, minlength=n)`` for ids < n, with a static shape (torch.compile)."""
    return torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


@torch.no_grad()
def group_limited_mask(
    logits_TE: torch.Tensor,
    *,
    score_func: str,
    expert_bias_E: torch.Tensor | None,
    n_groups: int,
    topk_groups: int,
) -> torch.Tensor:
    """[T, E] bool: the experts in each token's ``topk_groups`` best of ``n_groups`` groups (module
    doc). Ties between groups go to the lower group id (a stable sort), as between experts."""
    T, E = logits_TE.shape
    logits_TE = logits_TE.float()
    scores_TE = torch.softmax(logits_TE, -1) if score_func == ScoreFunc.softmax else torch.sigmoid(logits_TE)
    if expert_bias_E is not None:
        scores_TE = scores_TE + expert_bias_E.float()
    per_group = E // n_groups
    group_score_TG = scores_TE.view(T, n_groups, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    best_TG = torch.sort(group_score_TG, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    allowed_TG = torch.zeros(T, n_groups, dtype=torch.bool, device=logits_TE.device).scatter_(1, best_TG, True)
    return allowed_TG.repeat_interleave(per_group, dim=1)


# A row's sigmoid scores sum to 0 only where every logit is below about -104 (fp32 underflow);
# the floor keeps that row's normalised scores 0 there, not NaN.
_SUM_FLOOR = 1e-20


def _row_sum(scores_TE: torch.Tensor) -> torch.Tensor:
    return scores_TE.sum(-1, keepdim=True).clamp_min(_SUM_FLOOR)


def balance_scores(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The scores the balance losses average: softmax's as they are, sigmoid's normalised over
    the experts (a row of underflowed scores stays 0)."""
    return scores_TE if score_func == ScoreFunc.softmax else scores_TE / _row_sum(scores_TE)


def gating_reference(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    score_func: str = "softmax",
    expert_bias_E: torch.Tensor | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
) -> GatingOutput:
    T, E = logits_TE.shape
    logits_TE = logits_TE.float()
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    if score_func == ScoreFunc.softmax:
        scores_TE = torch.exp(logits_TE - lse_T.unsqueeze(-1))
    else:
        scores_TE = torch.sigmoid(logits_TE)
    key_TE = logits_TE if expert_bias_E is None else scores_TE + expert_bias_E.float()
    if n_groups > 1:
        allowed_TE = group_limited_mask(
            logits_TE, score_func=score_func, expert_bias_E=expert_bias_E, n_groups=n_groups, topk_groups=topk_groups
        )
        key_TE = key_TE.masked_fill(~allowed_TE, float("-inf"))
    # Stable descending sort: ties keep ascending expert id, so the lower id wins.
    topk_ids_TK = torch.sort(key_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if renormalize:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        topk_weights_TK = topk_weights_TK * scale
    aux_TE = balance_scores(scores_TE, score_func)
    return GatingOutput(
        topk_ids_TK=topk_ids_TK,
        topk_weights_TK=topk_weights_TK,
        counts_E=_bincount(topk_ids_TK.flatten(), E),
        score_sum_E=aux_TE.sum(dim=0),
        lse_T=lse_T,
    )


if triton is not None:

    @triton.jit
    def _gating_fwd_kernel(
        logits_ptr,
        bias_ptr,
        allowed_ptr,
        ids_ptr,
        weights_ptr,
        lse_ptr,
        counts_part_ptr,
        ssum_part_ptr,
        T,
        E,
        stride_lt,
        scale,
        K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SIGMOID: tl.constexpr,
        RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        ks = tl.arange(0, BLOCK_K)
        rmask = rows < T
        cmask = cols < E
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :], mask=mask, other=-float("inf"))
        x = x.to(tl.float32)
        m = tl.max(x, axis=1)
        m = tl.where(rmask, m, 0.0)
        ex = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
        s = tl.sum(ex, axis=1)
        s = tl.where(rmask, s, 1.0)
        lse = m + tl.log(s)
        if SIGMOID:
            p = tl.where(mask, tl.sigmoid(x), 0.0)
        else:
            p = ex / s[:, None]
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            key = tl.where(mask, p + b[None, :], -float("inf"))
        else:
            key = x
        if HAS_MASK:  # group-limited routing: experts outside the token's groups cannot win
            allowed = tl.load(allowed_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0)
            key = tl.where(allowed != 0, key, -float("inf"))
        ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        for k in tl.static_range(K):
            best = tl.max(key, axis=1)
            idx = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == idx[:, None]
            wk = tl.sum(tl.where(hit, p, 0.0), axis=1)
            ids = tl.where(ks[None, :] == k, idx[:, None], ids)
            w = tl.where(ks[None, :] == k, wk[:, None], w)
            chosen += hit.to(tl.int32)
            key = tl.where(hit, -float("inf"), key)
        if RENORM:
            w = w / tl.where(rmask, tl.sum(w, axis=1), 1.0)[:, None]
        w = w * scale
        kmask = rmask[:, None] & (ks[None, :] < K)
        tl.store(ids_ptr + rows[:, None] * K + ks[None, :], ids.to(tl.int64), mask=kmask)
        tl.store(weights_ptr + rows[:, None] * K + ks[None, :], w, mask=kmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        # Per-block partial sums, reduced afterwards: deterministic, no float atomics.
        chosen = tl.where(rmask[:, None], chosen, 0)
        tl.store(counts_part_ptr + pid * E + cols, tl.sum(chosen, axis=0), mask=cmask)
        if SIGMOID:  # the aux loss's scores: normalised over the experts (floor: _SUM_FLOOR)
            p = p / tl.maximum(tl.sum(p, axis=1), 1e-20)[:, None]
        tl.store(ssum_part_ptr + pid * E + cols, tl.sum(p, axis=0), mask=cmask)

    @triton.jit
    def _gating_bwd_kernel(
        logits_ptr,
        ids_ptr,
        gw_ptr,
        gssum_ptr,
        glse_ptr,
        dx_ptr,
        T,
        E,
        stride_lt,
        K: tl.constexpr,
        SIGMOID: tl.constexpr,
        RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :], mask=mask, other=-float("inf"))
        x = x.to(tl.float32)
        m = tl.where(rmask, tl.max(x, axis=1), 0.0)
        ex = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
        s = tl.where(rmask, tl.sum(ex, axis=1), 1.0)
        q = ex / s[:, None]  # softmax: the lse's gradient direction
        if SIGMOID:
            p = tl.where(mask, tl.sigmoid(x), 0.0)
        else:
            p = q
        # Gradient with respect to the scores p: the score sums, then the top-k weights.
        gp = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        gss = tl.where(mask, tl.load(gssum_ptr + cols, mask=cmask, other=0.0)[None, :], 0.0)
        if SIGMOID:  # the sums are of n = p / sum(p): dn_i/dp_j = (delta_ij - n_i) / sum(p)
            psum = tl.maximum(tl.sum(p, axis=1), 1e-20)
            gp += (gss - tl.sum(gss * p, axis=1)[:, None] / psum[:, None]) / psum[:, None]
        else:
            gp += gss
        wsum = tl.zeros([BLOCK_T], dtype=tl.float32)
        gdotw = tl.zeros([BLOCK_T], dtype=tl.float32)
        if RENORM:
            for k in tl.static_range(K):
                idx = tl.load(ids_ptr + rows * K + k, mask=rmask, other=0)
                g = tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0)
                wk = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
                wsum += wk
                gdotw += g * wk
            wsum = tl.where(rmask, wsum, 1.0)
        for k in tl.static_range(K):
            idx = tl.load(ids_ptr + rows * K + k, mask=rmask, other=0)
            g = tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0)
            if RENORM:
                g = (g - gdotw / wsum) / wsum  # d(w_k / sum_j w_j)
            gp += tl.where(cols[None, :] == idx[:, None], g[:, None], 0.0)
        gp = tl.where(mask, gp, 0.0)
        if SIGMOID:
            dx = gp * p * (1.0 - p)
        else:
            dx = p * (gp - tl.sum(gp * p, axis=1)[:, None])
        glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0)
        dx += glse[:, None] * q
        tl.store(dx_ptr + rows[:, None] * E + cols[None, :], dx, mask=mask)


def _blocks(kernel: str, E: int, params: Mapping[str, int] | None) -> tuple[int, int, int]:
    """BLOCK_T, BLOCK_E and num_warps: a [BLOCK_T, BLOCK_E] tile of about ``tile`` elements."""
    t = launch_params(kernel, params)
    BLOCK_E = next_pow2(E)
    return max(1, min(t["max_block_t"], t["tile"] // BLOCK_E)), BLOCK_E, t["num_warps"]


def _check_fwd(logits_TE, bias_E, top_k):
    check(logits_TE.dim() == 2, f"fused_gating: logits must be [T, E], got {tuple(logits_TE.shape)}")
    check(
        logits_TE.dtype in (torch.float32, torch.float16, torch.bfloat16),
        f"fused_gating: logits dtype {logits_TE.dtype} is not fp32/fp16/bf16",
    )
    T, E = logits_TE.shape
    check(1 <= top_k <= E, f"fused_gating: top_k={top_k} must be in 1..E={E}")
    check(E <= MAX_TRITON_EXPERTS, f"fused_gating: E={E} > {MAX_TRITON_EXPERTS} does not fit one tile")
    if bias_E is not None:
        check(bias_E.shape == (E,), f"fused_gating: expert bias must be [E={E}], got {tuple(bias_E.shape)}")


def _launch_fwd(
    logits_TE,
    bias_E,
    top_k,
    renormalize,
    sigmoid,
    allowed_TE=None,
    scale: float = 1.0,
    *,
    params: Mapping[str, int] | None = None,
):
    T, E = logits_TE.shape
    bias_E = bias_E.contiguous() if bias_E is not None else None
    allowed_TE = allowed_TE.to(torch.int8).contiguous() if allowed_TE is not None else None
    logits_TE = logits_TE.contiguous()
    dev = logits_TE.device
    BLOCK_T, BLOCK_E, warps = _blocks("gating_fwd", E, params)
    grid = triton.cdiv(T, BLOCK_T)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    counts_part = torch.zeros(max(grid, 1), E, dtype=torch.int32, device=dev)
    ssum_part = torch.zeros(max(grid, 1), E, dtype=torch.float32, device=dev)
    if T > 0:
        _gating_fwd_kernel[(grid,)](
            logits_TE,
            bias_E if bias_E is not None else logits_TE,
            allowed_TE if allowed_TE is not None else logits_TE,
            ids,
            weights,
            lse,
            counts_part,
            ssum_part,
            T,
            E,
            logits_TE.stride(0),
            float(scale),
            K=top_k,
            HAS_BIAS=bias_E is not None,
            HAS_MASK=allowed_TE is not None,
            SIGMOID=sigmoid,
            RENORM=renormalize,
            BLOCK_T=BLOCK_T,
            BLOCK_E=BLOCK_E,
            BLOCK_K=next_pow2(top_k),
            num_warps=warps,
        )
    return ids, weights, counts_part.sum(0).to(torch.int64), ssum_part.sum(0), lse


def _launch_bwd(
    logits_TE, ids, g_weights, g_ssum, g_lse, renormalize, sigmoid, *, params: Mapping[str, int] | None = None
):
    logits_TE = logits_TE.contiguous()
    T, E = logits_TE.shape
    K = ids.shape[1]
    dx = torch.empty(T, E, dtype=torch.float32, device=logits_TE.device)
    if T > 0:
        BLOCK_T, BLOCK_E, warps = _blocks("gating_bwd", E, params)
        _gating_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
            logits_TE,
            ids,
            g_weights.contiguous(),
            g_ssum.contiguous(),
            g_lse.contiguous(),
            dx,
            T,
            E,
            logits_TE.stride(0),
            K=K,
            SIGMOID=sigmoid,
            RENORM=renormalize,
            BLOCK_T=BLOCK_T,
            BLOCK_E=BLOCK_E,
            num_warps=warps,
        )
    return dx.to(logits_TE.dtype)


if triton is not None:
    # torch.library custom ops with fake implementations: torch.compile sees each op
    # as one opaque node with known output shapes and never traces into the launcher.

    @torch.library.custom_op(
        "moemesh::fused_gating",
        mutates_args=(),
        schema="(Tensor logits, Tensor? bias, int top_k, bool renormalize, bool sigmoid, Tensor? allowed=None,"
        " float scale=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    )
    def _gating_op(logits_TE, bias_E, top_k, renormalize, sigmoid, allowed_TE=None, scale=1.0):
        return _launch_fwd(logits_TE, bias_E, top_k, renormalize, sigmoid, allowed_TE, scale)

    @_gating_op.register_fake
    def _gating_fake(logits_TE, bias_E, top_k, renormalize, sigmoid, allowed_TE=None, scale=1.0):
        T, E = logits_TE.shape
        new = logits_TE.new_empty
        return (
            new(T, top_k, dtype=torch.int64),
            new(T, top_k, dtype=torch.float32),
            new(E, dtype=torch.int64),
            new(E, dtype=torch.float32),
            new(T, dtype=torch.float32),
        )

    @torch.library.custom_op(
        "moemesh::fused_gating_backward",
        mutates_args=(),
        schema="(Tensor logits, Tensor ids, Tensor g_weights, Tensor g_score_sum, Tensor g_lse, bool renormalize,"
        " bool sigmoid) -> Tensor",
    )
    def _gating_bwd_op(logits_TE, ids, g_weights, g_ssum, g_lse, renormalize, sigmoid):
        return _launch_bwd(logits_TE, ids, g_weights, g_ssum, g_lse, renormalize, sigmoid)

    @_gating_bwd_op.register_fake
    def _gating_bwd_fake(logits_TE, ids, g_weights, g_ssum, g_lse, renormalize, sigmoid):
        return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)

    def _gating_setup(ctx, inputs, output):
        logits_TE, _bias, _k, ctx.renormalize, ctx.sigmoid, *rest = inputs
        ctx.scale = rest[1] if len(rest) > 1 else 1.0
        ctx.save_for_backward(logits_TE, output[0])

    def _gating_grad(ctx, g_weights, g_ssum, g_lse, backward_fn):
        logits_TE, ids = ctx.saved_tensors
        T, E = logits_TE.shape
        zeros = lambda *shape: logits_TE.new_zeros(shape, dtype=torch.float32)  # noqa: E731
        # The weights are scale x the (renormalised) scores: the kernel's gradient, scaled.
        g_weights = zeros(T, ids.shape[1]) if g_weights is None else g_weights.float() * ctx.scale
        g_ssum = zeros(E) if g_ssum is None else g_ssum.float()
        g_lse = zeros(T) if g_lse is None else g_lse.float()
        return backward_fn(logits_TE, ids, g_weights, g_ssum, g_lse, ctx.renormalize, ctx.sigmoid)

    def _gating_backward(ctx, _g_ids, g_weights, _g_counts, g_ssum, g_lse):
        return _gating_grad(ctx, g_weights, g_ssum, g_lse, _gating_bwd_op), None, None, None, None, None, None

    _gating_op.register_autograd(_gating_backward, setup_context=_gating_setup)

    class _FusedGating(torch.autograd.Function):
        """The eager path: the same launchers without the custom op's dispatch (see _triton.pick)."""

        @staticmethod
        def forward(ctx, logits_TE, bias_E, top_k, renormalize, sigmoid, allowed_TE=None, scale=1.0):
            out = _launch_fwd(logits_TE, bias_E, top_k, renormalize, sigmoid, allowed_TE, scale)
            _gating_setup(ctx, (logits_TE, bias_E, top_k, renormalize, sigmoid, allowed_TE, scale), out)
            ctx.mark_non_differentiable(out[0], out[2])
            return out

        @staticmethod
        def backward(ctx, _g_ids, g_weights, _g_counts, g_ssum, g_lse):
            return _gating_grad(ctx, g_weights, g_ssum, g_lse, _launch_bwd), None, None, None, None, None, None


def gating_triton(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    score_func: str = "softmax",
    expert_bias_E: torch.Tensor | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
) -> GatingOutput:
    check(score_func in SCORE_FUNCS, f"fused_gating: score_func={score_func!r} is not one of {SCORE_FUNCS}")
    bias = None if expert_bias_E is None else expert_bias_E.detach().float()
    _check_fwd(logits_TE, bias, top_k)
    allowed = None
    if n_groups > 1:
        allowed = group_limited_mask(
            logits_TE.detach(), score_func=score_func, expert_bias_E=bias, n_groups=n_groups, topk_groups=topk_groups
        )
    op = pick(_gating_op, _FusedGating.apply)
    ids, weights, counts, ssum, lse = op(
        logits_TE, bias, top_k, renormalize, score_func == ScoreFunc.sigmoid, allowed, float(scale)
    )
    return GatingOutput(topk_ids_TK=ids, topk_weights_TK=weights, counts_E=counts, score_sum_E=ssum, lse_T=lse)
