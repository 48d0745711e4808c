"""Every Triton kernel against its torch reference, forward and backward.

On this CPU the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py);
with TRITON_INTERPRET=0 on a CUDA machine they run compiled on the GPU.
Tolerances: ids, counts, row maps and copied rows must be exactly equal; fp32
values to rtol 1e-5 / atol 1e-6 (gradients 1e-4 / 1e-5: the kernel sums in
another order); bf16 values 2e-2. A wrong index or a lost row is off by O(1), far
outside them.
"""

import pytest
import torch

from moemesh.kernels import TORCH_OPS, TRITON_OPS
from moemesh.kernels._triton import can_run_triton, interpreting
from moemesh.kernels.gating import gating_reference, gating_triton
from moemesh.kernels.permute import permute_reference, permute_triton
from moemesh.kernels.sort_chunks import sort_chunks_reference, sort_chunks_triton
from moemesh.kernels.unpermute import unpermute_reference, unpermute_triton
from tests.kernels._layers import moe_layer_pair

DEVICE = "cpu" if interpreting() else "cuda"
# Compiled (TRITON_INTERPRET=0) these tests need CUDA and carry the gpu marker (`-m gpu`);
# interpreted they run on this CPU.
pytestmark = [
    pytest.mark.skipif(not can_run_triton(DEVICE), reason=f"Triton cannot run on {DEVICE} here"),
    *([pytest.mark.gpu] if DEVICE == "cuda" else []),
]
VAL = dict(rtol=1e-5, atol=1e-6)
GRAD = dict(rtol=1e-4, atol=1e-5)


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


GATING_CASES = [  # T, E, K, renormalize, score_func, bias
    (0, 8, 2, True, "softmax", False),
    (1, 1, 1, False, "softmax", False),
    (1, 2, 2, True, "softmax", False),
    (7, 8, 3, True, "softmax", False),
    (13, 8, 1, False, "sigmoid", False),
    (33, 64, 8, True, "softmax", True),
    (5, 256, 4, False, "softmax", False),
    (9, 64, 6, True, "sigmoid", True),
]


@pytest.mark.parametrize("T,E,K,renorm,score,bias", GATING_CASES)
def test_gating_matches_reference(T, E, K, renorm, score, bias):
    logits = _randn(T, E, seed=T * 1000 + E)
    b = _randn(E, seed=E) * 0.1 if bias else None
    outs = []
    for fn in (gating_reference, gating_triton):
        x = logits.clone().requires_grad_()
        g = fn(x, top_k=K, renormalize=renorm, score_func=score, expert_bias_E=b)
        loss = (
            (g.topk_weights_TK * _randn(T, K, seed=1)).sum()
            + (g.score_sum_E * _randn(E, seed=2)).sum()
            + (g.lse_T**2).sum()
        )
        loss.backward()
        outs.append((g, x.grad))
    (ref, dref), (got, dgot) = outs
    assert torch.equal(got.topk_ids_TK, ref.topk_ids_TK)
    assert torch.equal(got.counts_E, ref.counts_E)
    torch.testing.assert_close(got.topk_weights_TK, ref.topk_weights_TK, **VAL)
    torch.testing.assert_close(got.score_sum_E, ref.score_sum_E, **VAL)
    torch.testing.assert_close(got.lse_T, ref.lse_T, **VAL)
    torch.testing.assert_close(dgot, dref, **GRAD)


def test_gating_ties_go_to_the_lower_expert_id_in_both_backends():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 2.0, 2.0]], device=DEVICE)
    for fn in (gating_reference, gating_triton):
        assert fn(logits, top_k=2, renormalize=False).topk_ids_TK.tolist() == [[1, 2], [0, 1], [0, 2]]
    # Integer logits in a small range: ties everywhere, with and without a bias.
    ties = torch.randint(0, 3, (40, 16), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    bias = torch.zeros(16, device=DEVICE)
    for b in (None, bias):
        a = gating_reference(ties, top_k=4, renormalize=True, expert_bias_E=b)
        t = gating_triton(ties, top_k=4, renormalize=True, expert_bias_E=b)
        assert torch.equal(a.topk_ids_TK, t.topk_ids_TK)


@pytest.mark.parametrize("score,bias", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_gating_never_selects_the_padding_columns_of_a_non_power_of_two_expert_count(score, bias):
    """E=6 and 12 fill 8- and 16-wide tiles. With every logit negative (no bias: the key is the
    logit) or every score + bias negative, a padding column loaded as 0 or keyed without the
    column mask would outrank every real expert and give an id >= E."""
    for E in (6, 12):
        logits = _randn(9, E, seed=E) - 20.0
        b = torch.full((E,), -1.0, device=DEVICE) + _randn(E, seed=E + 1) * 0.1 if bias else None
        ref = gating_reference(logits, top_k=3, renormalize=True, score_func=score, expert_bias_E=b)
        got = gating_triton(logits, top_k=3, renormalize=True, score_func=score, expert_bias_E=b)
        assert int(got.topk_ids_TK.max()) < E
        assert torch.equal(got.topk_ids_TK, ref.topk_ids_TK) and torch.equal(got.counts_E, ref.counts_E)
        torch.testing.assert_close(got.topk_weights_TK, ref.topk_weights_TK, **VAL)


PERMUTE_CASES = [  # T, K, E, D, drop
    (0, 2, 8, 24, False),
    (1, 1, 1, 37, False),
    (7, 2, 2, 37, True),
    (33, 4, 8, 24, False),
    (17, 8, 64, 37, True),
    (5, 3, 256, 24, False),  # most experts get zero tokens
]


def _ids(T, K, E, drop, seed):
    g = torch.Generator().manual_seed(seed)
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    if drop and T:
        ids[torch.rand(T, K, generator=g) < 0.3] = -1
    return ids.to(DEVICE)


@pytest.mark.parametrize("T,K,E,D,drop", PERMUTE_CASES)
def test_permute_matches_reference(T, K, E, D, drop):
    ids = _ids(T, K, E, drop, seed=T + K + E)
    x = _randn(T, D, seed=3)
    results = []
    for fn in (permute_reference, permute_triton):
        xi = x.clone().requires_grad_()
        rows, row_map, counts = fn(xi, ids, E)
        (rows * _randn(*rows.shape, seed=4)).sum().backward() if rows.numel() else None
        results.append((rows, row_map, counts, xi.grad))
    (r0, m0, c0, g0), (r1, m1, c1, g1) = results
    assert torch.equal(m1, m0) and torch.equal(c1, c0) and torch.equal(r1, r0)
    if g0 is not None:
        torch.testing.assert_close(g1, g0, **GRAD)


@pytest.mark.parametrize("R,e,D", [(2, 1, 37), (2, 3, 24), (4, 2, 37)])
def test_sort_chunks_matches_reference(R, e, D):
    counts = torch.randint(0, 4, (R, e), generator=torch.Generator().manual_seed(R * e)).to(DEVICE)
    counts[0, 0] = 0  # an empty chunk
    M = int(counts.sum())
    x = _randn(M, D, seed=5)
    outs = []
    for fn in (sort_chunks_reference, sort_chunks_triton):
        xi = x.clone().requires_grad_()
        y = fn(xi, counts)
        (y * _randn(M, D, seed=6)).sum().backward()
        outs.append((y, xi.grad))
    assert torch.equal(outs[1][0], outs[0][0]) and torch.equal(outs[1][1], outs[0][1])
    assert torch.equal(sort_chunks_triton(outs[1][0], counts.t()), x)


def test_unpermute_backward_gives_each_gradient_in_its_inputs_dtype():
    """What the custom op's fake implementation promises torch.compile (eager autograd would cast)."""
    ids = _ids(3, 2, 4, False, seed=21)
    _, row_map, _ = permute_reference(_randn(3, 5, seed=22), ids, 4)
    rows, w, g = _randn(6, 5, seed=23).bfloat16(), torch.rand(3, 2).to(DEVICE).bfloat16(), _randn(3, 5).bfloat16()
    g_rows, g_w = torch.ops.moemesh.unpermute_backward(g, rows, row_map, w)
    assert g_rows.dtype == g_w.dtype == torch.bfloat16 and g_w.shape == (3, 2)


@pytest.mark.parametrize("T,K,E,D,drop", PERMUTE_CASES)
def test_unpermute_matches_reference(T, K, E, D, drop):
    ids = _ids(T, K, E, drop, seed=T * 7 + K)
    _, row_map, _ = permute_reference(_randn(T, D, seed=8), ids, E)
    rows = _randn(row_map.numel(), D, seed=9)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    outs = []
    for fn in (unpermute_reference, unpermute_triton):
        ri, wi = rows.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(ri, row_map, wi)
        (out * _randn(T, D, seed=11)).sum().backward()
        outs.append((out, ri.grad, wi.grad))
    (o0, r0, w0), (o1, r1, w1) = outs
    torch.testing.assert_close(o1, o0, **VAL)
    torch.testing.assert_close(r1, r0, **GRAD)
    torch.testing.assert_close(w1, w0, **GRAD)


@pytest.mark.parametrize("K", range(1, 9))
def test_every_top_k_from_1_to_8(K):
    """Gating then the permute/unpermute round trip at each K (E=8, so K=8 routes to all)."""
    logits, x = _randn(6, 8, seed=20 + K), _randn(6, 37, seed=30 + K)
    res = []
    for ops in (TORCH_OPS, TRITON_OPS):
        g = ops.gating(logits, top_k=K, renormalize=K % 2 == 0)
        rows, row_map, counts = ops.permute(x, g.topk_ids_TK, 8)
        res.append((g, rows, row_map, counts, ops.unpermute(rows, row_map, g.topk_weights_TK)))
    (g0, r0, m0, c0, o0), (g1, r1, m1, c1, o1) = res
    assert torch.equal(g1.topk_ids_TK, g0.topk_ids_TK) and torch.equal(m1, m0) and torch.equal(c1, c0)
    assert torch.equal(r1, r0)
    torch.testing.assert_close(g1.topk_weights_TK, g0.topk_weights_TK, **VAL)
    torch.testing.assert_close(o1, o0, **VAL)


BF16 = dict(rtol=2e-2, atol=2e-2)  # the kernels sum in fp32 and round once; the reference rounds per op


def test_bf16_token_path_forward_and_backward():
    """bf16 as training on a GPU runs it (autocast): routing and copies exact, sums to bf16 precision."""
    logits = _randn(19, 16, seed=40).bfloat16()
    x = _randn(19, 37, seed=41).bfloat16()
    g_out = _randn(19, 37, seed=42).bfloat16()
    res = []
    for ops in (TORCH_OPS, TRITON_OPS):
        li, xi = logits.clone().requires_grad_(), x.clone().requires_grad_()
        g = ops.gating(li, top_k=3, renormalize=True)
        rows, row_map, counts = ops.permute(xi, g.topk_ids_TK, 16)
        y = ops.sort_chunks(rows, counts.view(4, 4))
        out = ops.unpermute(ops.sort_chunks(y, counts.view(4, 4).t()), row_map, g.topk_weights_TK)
        ((out.float() * g_out.float()).sum() + g.lse_T.sum()).backward()
        res.append((g.topk_ids_TK, rows, y, out, li.grad, xi.grad))
    (i0, r0, y0, o0, dl0, dx0), (i1, r1, y1, o1, dl1, dx1) = res
    assert torch.equal(i1, i0) and torch.equal(r1, r0) and torch.equal(y1, y0)
    assert o1.dtype == dx1.dtype == torch.bfloat16
    torch.testing.assert_close(o1, o0, **BF16)
    torch.testing.assert_close(dx1, dx0, **BF16)
    torch.testing.assert_close(dl1, dl0, **BF16)


def test_moe_layer_triton_equals_torch():
    layers = moe_layer_pair(DEVICE, shared_expert_ffn_size=12)
    x = _randn(2, 9, 24, seed=12).cpu()
    g = _randn(2, 9, 24, seed=13).cpu()
    res = []
    for layer in layers:
        xi = x.to(DEVICE).clone().requires_grad_()
        out, st = layer(xi)
        ((out * g.to(DEVICE)).sum() + st.losses.aux_loss + st.losses.z_loss).backward()
        res.append((out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(res[1][0], res[0][0], **VAL)
    torch.testing.assert_close(res[1][1], res[0][1], **GRAD)
    for name, grad in res[0][2].items():
        torch.testing.assert_close(res[1][2][name], grad, **GRAD, msg=lambda m, n=name: f"{n}: {m}")


# hypothesis is a test requirement (requirements-dev.txt): a missing one fails here, never skips.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(0, 20),
    K=st.integers(1, 4),
    E=st.sampled_from([1, 2, 3, 8, 64]),
    D=st.integers(1, 40),
    drop=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**16),
)
def test_permute_unpermute_round_trip(T, K, E, D, drop, seed):
    """permute then unpermute with the gate weights gives x * (sum of kept weights), in both backends."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    if T:
        ids[torch.rand(T, K, generator=g) < drop] = -1
    x = torch.randn(T, D, generator=g)
    w = torch.rand(T, K, generator=g)
    ids, x, w = ids.to(DEVICE), x.to(DEVICE), w.to(DEVICE)
    expected = x * (w * (ids >= 0)).sum(1, keepdim=True)
    for ops in (TORCH_OPS, TRITON_OPS):
        rows, row_map, counts = ops.permute(x, ids, E)
        assert int(counts.sum()) == int((ids >= 0).sum()) == rows.shape[0]
        torch.testing.assert_close(ops.unpermute(rows, row_map, w), expected, **VAL)


# Other launch parameters (kernels/_tuning.py), as `scripts/tune_kernels.py` tries them:
# blocks smaller than D (the loops over D run several times), than T and than N.
SMALL_BLOCKS = {
    "gating_fwd": dict(tile=64, max_block_t=4),
    "gating_bwd": dict(tile=32, max_block_t=2),
    "permute": dict(block_n=8, block_d=16),
    "sort_chunks": dict(block_m=4, block_d=16),
    "gather_sum": dict(block_t=2, block_d=16),
    "unpermute_bwd": dict(block_n=4, block_d=8),
}


def _launches(params):
    """Every launcher once, on the irregular cases below, with ``params`` over the tuning table."""
    from moemesh.kernels.gating import _launch_bwd, _launch_fwd
    from moemesh.kernels.permute import _launch as permute_launch
    from moemesh.kernels.sort_chunks import _launch as sort_launch
    from moemesh.kernels.unpermute import _unpermute_backward_launch, gather_sum

    T, E, K = 33, 64, 8  # GATING_CASES[5]: several row blocks
    logits, bias = _randn(T, E, seed=1), _randn(E, seed=2) * 0.1
    fwd = _launch_fwd(logits, bias, K, True, False, params=params["gating_fwd"])
    g_w, g_s, g_l = _randn(T, K, seed=3), _randn(E, seed=4), _randn(T, seed=5)
    bwd = _launch_bwd(logits, fwd[0], g_w, g_s, g_l, True, False, params=params["gating_bwd"])
    T, K, E, D = 17, 8, 64, 37  # PERMUTE_CASES[4], with drops
    ids, x = _ids(T, K, E, True, seed=6), _randn(T, D, seed=7)
    rows, row_map, counts_E = permute_launch(x, ids, E, params=params["permute"])
    counts_Re = counts_E.view(4, 16)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    return {
        "gating_fwd": fwd,
        "gating_bwd": (bwd,),
        "permute": (rows, row_map, counts_E),
        "sort_chunks": (sort_launch(rows, counts_Re, params=params["sort_chunks"]),),
        "gather_sum": (gather_sum(rows, row_map, w, T, K, params=params["gather_sum"]),),
        "unpermute_bwd": _unpermute_backward_launch(
            _randn(T, D, seed=9), rows, row_map, w, params=params["unpermute_bwd"]
        ),
    }


@pytest.mark.slow  # one process, seconds: the fast tier keeps its 90 s bound
@pytest.mark.shares_cores
def test_kernels_match_reference_with_small_blocks():
    """Launch parameters are arguments: small blocks give the table's results (which the tests
    above hold to the references), exactly where nothing is summed in another order."""
    from moemesh.kernels._tuning import TUNING

    before = {k: dict(v) for k, v in TUNING.items()}
    want = _launches({kernel: None for kernel in SMALL_BLOCKS})
    got = _launches(SMALL_BLOCKS)
    for kernel, outs in want.items():
        for a, b in zip(got[kernel], outs, strict=True):
            if a.is_floating_point() and kernel in ("gating_fwd", "gating_bwd", "unpermute_bwd"):
                torch.testing.assert_close(a, b, **GRAD, msg=kernel)  # sums in another order
            else:
                assert torch.equal(a, b), kernel
    assert TUNING == before
    with pytest.raises(KeyError, match="unknown launch parameters"):
        _launches({**SMALL_BLOCKS, "permute": dict(block_m=8)})


def test_launch_params_lay_a_launchers_params_over_the_table_and_refuse_unknown_keys():
    """The fast tier's check of kernels/_tuning.py (the small-blocks test above is slow)."""
    from moemesh.kernels._tuning import TUNING, launch_params

    before = {k: dict(v) for k, v in TUNING.items()}
    assert launch_params("permute") == TUNING["permute"]
    assert launch_params("permute", {"block_n": 8}) == {**TUNING["permute"], "block_n": 8}
    assert TUNING == before  # the table itself is left alone
    with pytest.raises(KeyError, match=r"permute: unknown launch parameters \['block_m'\]; known: \['block_d', "):
        launch_params("permute", {"block_m": 8})


def test_unpermute_gradients_with_a_model_dim_over_one_block():
    """D = 300 spans three 128-wide blocks of the backward's loop over D: the weight gradient
    sums the dot product over all of them. Rows, weights and the output's gradient are transposed
    views (the launchers make them contiguous: the kernels assume a column stride of 1)."""
    T, K, E, D = 5, 2, 4, 300
    ids = _ids(T, K, E, True, seed=13)
    _, row_map, _ = permute_reference(_randn(T, D, seed=14), ids, E)
    rows = _randn(D, row_map.numel(), seed=15)
    w = torch.rand(K, T, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    g_out = _randn(D, T, seed=17)
    outs = []
    for fn in (unpermute_reference, unpermute_triton):
        ri, wi = rows.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(ri.t(), row_map, wi.t())
        (out.t() * g_out).sum().backward()
        outs.append((out, ri.grad, wi.grad))
    (o0, r0, w0), (o1, r1, w1) = outs
    torch.testing.assert_close(o1, o0, **VAL)
    torch.testing.assert_close(r1, r0, **GRAD)
    torch.testing.assert_close(w1, w0, **GRAD)


def _int(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


_X, _W = _randn(3, 4), torch.full((3, 2), 0.5, device=DEVICE)
REFUSALS = {  # what each checking launcher refuses, and its one line
    "gating top_k 0": (
        lambda: gating_triton(_randn(3, 4), top_k=0, renormalize=True),
        "fused_gating: top_k=0 must be in 1..E=4",
    ),
    "gating top_k > E": (
        lambda: gating_triton(_randn(3, 4), top_k=5, renormalize=True),
        "fused_gating: top_k=5 must be in 1..E=4",
    ),
    "gating E > 1024": (
        lambda: gating_triton(_randn(2, 1040), top_k=2, renormalize=True),
        "fused_gating: E=1040 > 1024 does not fit one tile",
    ),
    "gating dtype": (
        lambda: gating_triton(_randn(3, 4).double(), top_k=2, renormalize=True),
        "fused_gating: logits dtype torch.float64 is not fp32/fp16/bf16",
    ),
    "gating bias shape": (
        lambda: gating_triton(_randn(3, 4), top_k=2, renormalize=True, expert_bias_E=_randn(3)),
        "fused_gating: expert bias must be [E=4], got (3,)",
    ),
    "gating logits shape": (
        lambda: gating_triton(_randn(4), top_k=1, renormalize=True),
        "fused_gating: logits must be [T, E], got (4,)",
    ),
    "permute x shape": (lambda: permute_triton(_randn(4), _int(0, 1), 4), "permute: x must be [T, D], got (4,)"),
    "permute ids shape": (
        lambda: permute_triton(_X, _int(0, 1).view(1, 2), 4),
        "permute: ids must be [T=3, K], got (1, 2)",
    ),
    "permute ids dtype": (
        lambda: permute_triton(_X, _W, 4),
        "permute: ids dtype torch.float32 is not int",
    ),
    "permute id == E": (
        lambda: permute_triton(_X, _int(0, 1, 2, 3, -1, 4).view(3, 2), 4),
        "permute: expert ids must be in [0, E=4) or -1 (dropped); 1 are not, e.g. 4",
    ),
    "permute id > E": (
        lambda: permute_triton(_X, _int(0, 9, 2, 3, 1, 7).view(3, 2), 4),
        "permute: expert ids must be in [0, E=4) or -1 (dropped); 2 are not, e.g. 9",
    ),
    "permute id < -1": (
        lambda: permute_triton(_X, _int(0, 1, -2, 3, 1, 2).view(3, 2), 4),
        "permute: expert ids must be in [0, E=4) or -1 (dropped); 1 are not, e.g. -2",
    ),
    "sort_chunks rows shape": (
        lambda: sort_chunks_triton(_randn(4), _int(1, 1, 1, 1).view(2, 2)),
        "sort_chunks: rows must be [M, D], got (4,)",
    ),
    "sort_chunks counts shape": (
        lambda: sort_chunks_triton(_randn(4, 2), _int(1, 1, 1, 1)),
        "sort_chunks: counts must be [R, e], got (4,)",
    ),
    "unpermute rows shape": (
        lambda: unpermute_triton(_randn(6), _int(0, 1, 2, 3, 4, 5), _W),
        "unpermute: rows must be [N, D], got (6,)",
    ),
    "unpermute row_map shape": (
        lambda: unpermute_triton(_randn(6, 4), _int(0, 1, 2), _W),
        "unpermute: row_map must be [N=6], got (3,)",
    ),
    "unpermute weights shape": (
        lambda: unpermute_triton(_randn(6, 4), _int(0, 1, 2, 3, 4, 5), _W.view(-1)),
        "unpermute: weights must be [T, K], got (6,)",
    ),
    "unpermute rows float64": (
        lambda: unpermute_triton(_randn(6, 4).double(), _int(0, 1, 2, 3, 4, 5), _W),
        "unpermute: rows dtype torch.float64 is not fp32/fp16/bf16",
    ),
    "unpermute rows int": (
        lambda: unpermute_triton(_int(*range(24)).view(6, 4), _int(0, 1, 2, 3, 4, 5), _W),
        "unpermute: rows dtype torch.int64 is not fp32/fp16/bf16",
    ),
    "unpermute weights float64": (
        lambda: unpermute_triton(_randn(6, 4), _int(0, 1, 2, 3, 4, 5), _W.double()),
        "unpermute: weights dtype torch.float64 is not fp32/fp16/bf16",
    ),
    "swiglu float64": (
        lambda: TRITON_OPS.swiglu_fwd(_randn(3, 4).double(), _randn(3, 4).double()),
        "swiglu: tensor dtype torch.float64 is not fp32/fp16/bf16",
    ),
    "swiglu int": (
        lambda: TRITON_OPS.swiglu_fwd(_int(*range(12)).view(3, 4), _int(*range(12)).view(3, 4)),
        "swiglu: tensor dtype torch.int64 is not fp32/fp16/bf16",
    ),
    "swiglu backward float64": (
        lambda: TRITON_OPS.swiglu_bwd(_randn(3, 4).double(), _randn(3, 4).double(), _randn(3, 4).double()),
        "swiglu: tensor dtype torch.float64 is not fp32/fp16/bf16",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_the_checking_launchers_refuse_bad_input_in_one_line(case):
    call, message = REFUSALS[case]
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
