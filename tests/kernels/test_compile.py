"""The Triton ops under torch.compile.

Each op is a torch.library custom op with a fake implementation, so dynamo and
AOTAutograd keep it as one opaque node (permute's row count becomes an unbacked
size) and never trace into the launcher. Here: the whole token path compiles as
one graph (fullgraph=True) forward and backward, the graphs hold the ops as
nodes, the compiled values equal eager ones, and the MoE layer compiles.

On this CPU the kernels inside the nodes run under TRITON_INTERPRET=1; the
inductor test needs a C++ compiler for the code around them.
"""

import shutil

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from moemesh.kernels import TORCH_OPS, TRITON_OPS
from moemesh.kernels._triton import can_run_triton, interpreting
from tests.kernels._layers import moe_layer_pair

DEVICE = "cpu" if interpreting() else "cuda"
# Compiled (TRITON_INTERPRET=0) these tests need CUDA and carry the gpu marker (`-m gpu`);
# interpreted they run on this CPU.
pytestmark = [
    pytest.mark.skipif(not can_run_triton(DEVICE), reason=f"Triton cannot run on {DEVICE} here"),
    *([pytest.mark.gpu] if DEVICE == "cuda" else []),
]
GRAD = dict(rtol=1e-4, atol=1e-5)  # as in test_triton_kernels: kernels sum in another order
T, E, K, D = 13, 8, 2, 37


def token_path(ops, logits_TE, x_TD):
    """gating -> permute -> rank-major to expert-major and back (R=2, e=4) -> unpermute."""
    g = ops.gating(logits_TE, top_k=K, renormalize=True)
    rows, row_map, counts = ops.permute(x_TD, g.topk_ids_TK, E)
    y = ops.sort_chunks(rows * 2.0, counts.view(2, 4))
    y = ops.sort_chunks(y, counts.view(2, 4).t())
    out = ops.unpermute(y, row_map, g.topk_weights_TK)
    return (out**2).sum() + g.lse_T.sum() + (g.score_sum_E**2).sum()


def _run(fn):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen).to(DEVICE).requires_grad_()
    x = torch.randn(T, D, generator=gen).to(DEVICE).requires_grad_()
    loss = fn(logits, x)
    loss.backward()
    return loss.detach(), logits.grad, x.grad


def _targets(graphs):
    return {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}


def _opcheck_cases():
    gen = torch.Generator().manual_seed(2)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    logits = torch.randn(T, E, generator=gen).to(DEVICE).requires_grad_()
    x = torch.randn(T, D, generator=gen).to(DEVICE).requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEVICE)
    ids[3, 1] = -1  # a pair dropped by capacity
    _, row_map, counts = TORCH_OPS.permute(x.detach(), ids, E)
    N = row_map.numel()
    rows = torch.randn(N, D, generator=gen).to(DEVICE).requires_grad_()
    w = torch.rand(T, K, generator=gen).to(DEVICE).requires_grad_()
    full_counts = torch.tensor([[3, 0, 5, 1], [2, 6, 3, 6]], device=DEVICE)
    m = torch.ops.moemesh
    # fused_gating's first output is int64 ids: opcheck's AOT test sums all outputs into
    # that int tensor in place and fails on its own harness; test_token_path_* covers AOT.
    gating_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    return [
        ("fused_gating", m.fused_gating, (logits, None, K, True, False), gating_utils),
        (
            "fused_gating+bias",
            m.fused_gating,
            (logits, torch.randn(E, generator=gen).to(DEVICE) * 0.1, K, False, True),
            gating_utils,
        ),
        (
            "fused_gating_backward",
            m.fused_gating_backward,
            (logits.detach(), ids.clamp(min=0), rnd(T, K), rnd(E), rnd(T), True, False),
            None,
        ),
        ("permute", m.permute, (x, ids, E), None),
        ("sort_chunks", m.sort_chunks, (rnd(26, D).requires_grad_(), full_counts), None),
        ("unpermute", m.unpermute, (rows, row_map, w), None),
        ("unpermute_backward", m.unpermute_backward, (rnd(T, D), rows.detach(), row_map, w.detach()), None),
        ("gather_sum", m.gather_sum, (rows.detach(), row_map, None, T, K), None),
    ]


@pytest.mark.parametrize("case", range(8))
def test_custom_ops_pass_opcheck(case):
    """torch.library.opcheck: schema, autograd registration, fake vs real, AOT dispatch."""
    name, op, args, utils = _opcheck_cases()[case]
    kwargs = {"test_utils": utils} if utils else {}
    result = torch.library.opcheck(op, args, **kwargs)
    assert all(v == "SUCCESS" for v in result.values()), (name, result)


def test_the_sort_chunks_op_differentiates_to_the_inverse_permutation():
    """The custom op's own autograd (what torch.compile runs), not the eager Function's; the token
    path sorts there and back, so a backward that forgot to transpose the counts cancels out."""
    from moemesh.kernels.sort_chunks import sort_chunks_reference

    gen = torch.Generator().manual_seed(4)
    counts = torch.tensor([[3, 0, 5, 1], [2, 6, 3, 6]], device=DEVICE)
    x, g = (torch.randn(26, D, generator=gen).to(DEVICE) for _ in range(2))
    grads = []
    for fn in (torch.ops.moemesh.sort_chunks, sort_chunks_reference):
        xi = x.clone().requires_grad_()
        (fn(xi, counts) * g).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_eager_calls_take_the_autograd_functions():
    """Outside torch.compile the ops skip the custom-op dispatch (see kernels._triton.pick)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=gen).to(DEVICE).requires_grad_()
    x = torch.randn(T, D, generator=gen).to(DEVICE).requires_grad_()
    g = TRITON_OPS.gating(logits, top_k=K, renormalize=True)
    rows, row_map, counts = TRITON_OPS.permute(x, g.topk_ids_TK, E)
    y = TRITON_OPS.sort_chunks(rows, counts.view(2, 4))
    out = TRITON_OPS.unpermute(y, row_map, g.topk_weights_TK)
    names = [type(t.grad_fn).__name__ for t in (g.topk_weights_TK, rows, y, out)]
    assert names == ["_FusedGatingBackward", "_PermuteBackward", "_SortChunksBackward", "_UnpermuteBackward"]


def test_token_path_compiles_as_one_graph_with_the_ops_as_nodes():
    fw, bw = [], []

    def keep(store):
        def compiler(gm, _inputs):
            store.append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep(fw), bw_compiler=keep(bw))
    compiled = _run(torch.compile(lambda lg, x: token_path(TRITON_OPS, lg, x), backend=backend, fullgraph=True))
    eager = _run(lambda lg, x: token_path(TRITON_OPS, lg, x))
    reference = _run(lambda lg, x: token_path(TORCH_OPS, lg, x))
    assert len(fw) == 1 and len(bw) == 1  # one graph each way: no graph break
    assert {
        "moemesh.fused_gating.default",
        "moemesh.permute.default",
        "moemesh.sort_chunks.default",
        "moemesh.unpermute.default",
    } <= _targets(fw)
    assert {
        "moemesh.fused_gating_backward.default",
        "moemesh.gather_sum.default",
        "moemesh.sort_chunks.default",
        "moemesh.unpermute_backward.default",
    } <= _targets(bw)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernels: bit-identical
    for got, want in zip(compiled, reference):
        torch.testing.assert_close(got, want, **GRAD)


@pytest.mark.skipif(
    DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("c++")),
    reason="inductor on CPU needs a C++ compiler (g++/c++), none on PATH",
)
def test_token_path_under_inductor_equals_the_reference():
    torch._dynamo.reset()
    compiled = _run(torch.compile(lambda lg, x: token_path(TRITON_OPS, lg, x), fullgraph=True))
    reference = _run(lambda lg, x: token_path(TORCH_OPS, lg, x))
    for got, want in zip(compiled, reference):
        torch.testing.assert_close(got, want, **GRAD)


def test_moe_layer_compiles_with_triton_ops():
    layers = moe_layer_pair(DEVICE)
    torch._dynamo.reset()
    forwards = [layers[0], torch.compile(layers[1], backend="aot_eager")]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=gen).to(DEVICE)
    res = []
    for layer, fwd in zip(layers, forwards):
        xi = x.clone().requires_grad_()
        out, st = fwd(xi)
        ((out**2).sum() + st.losses.aux_loss + st.losses.z_loss).backward()
        res.append((out, st.counts_E, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(res[1][0], res[0][0], **GRAD)
    assert torch.equal(res[1][1], res[0][1])
    torch.testing.assert_close(res[1][2], res[0][2], **GRAD)
    for name, grad in res[0][3].items():
        torch.testing.assert_close(res[1][3][name], grad, **GRAD, msg=lambda m, n=name: f"{n}: {m}")
