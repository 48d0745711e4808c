"""The routed experts (moe/experts.py): SwiGLU and the down projection in one autograd node that
keeps gate and up only. Outputs and every gradient equal the formula written with autograd
(F.silu(x w1) * (x w3)) w2, per expert, to fp32 rounding, on the grouped GEMMs and on the
per-expert loop (a CPU's default), with empty experts, ragged counts and frozen parts; the
tensors kept for the backward drop from D + 4F to D + 2F per routed row, as planning/memory.py
counts them; the loop allocates nothing of all rows by F, runs each GEMM once under a split
backward, and keeps its results under selective checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from moemesh.moe.experts import GroupedExperts

# fp32, the same GEMMs in another association (the fused path multiplies the recomputed h):
# rounding of inner length F, far below a wrong expert (O(1)).
TOL = dict(rtol=1e-5, atol=1e-5)
COUNTS = [5, 0, 12, 3, 0, 7]


def _experts(grouped: bool | None, D=16, Fh=24):
    torch.manual_seed(0)
    e = GroupedExperts(num_experts=len(COUNTS), hidden_size=D, ffn_size=Fh)
    e.init_weights(seed=1, prefix="layers.0.moe", std=0.2, out_std=0.2)
    e.use_grouped_mm = grouped
    return e


def _autograd_formula(e: GroupedExperts, x, counts):
    outs = []
    for j, xe in enumerate(torch.split(x, counts)):
        outs.append((F.silu(xe @ e.w1_eDF[j]) * (xe @ e.w3_eDF[j])) @ e.w2_eFD[j])
    return torch.cat(outs)


@pytest.mark.parametrize("grouped", [True, False])
def test_outputs_and_every_gradient_equal_the_autograd_formula(grouped):
    e = _experts(grouped)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), 16)
    dy = torch.randn(sum(COUNTS), 16)
    results = []
    for run in (lambda xi: e(xi, counts), lambda xi: _autograd_formula(e, xi, COUNTS)):
        e.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(dy)
        results.append([y.detach(), xi.grad, *(p.grad.clone() for p in e.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("grouped", [True, False])
def test_an_expanded_gradient_and_no_rows_at_all(grouped):
    e = _experts(grouped)
    x = torch.randn(sum(COUNTS), 16, requires_grad=True)
    e(x, torch.tensor(COUNTS)).sum().backward()  # y.sum(): a stride-0 gradient
    assert torch.isfinite(x.grad).all() and e.w2_eFD.grad[1].abs().sum() == 0  # expert 1 has no rows
    empty = torch.zeros(0, 16, requires_grad=True)
    e(empty, torch.zeros(len(COUNTS), dtype=torch.int64)).sum().backward()
    assert empty.grad.shape == (0, 16)


@pytest.mark.parametrize("grouped", [True, False])
def test_kept_tensors_per_routed_row_drop_from_d_plus_4f_to_d_plus_2f(grouped):
    D, Fh = 16, 24
    e = _experts(grouped, D, Fh)
    counts = torch.tensor(COUNTS)
    M = sum(COUNTS)
    x = torch.randn(M, D, requires_grad=True)

    def kept_per_row(run) -> float:
        """Bytes of the activations kept for the backward, per routed row, in fp32 values: each
        storage once (per-expert slices of x share x's), weights and the int counts left out."""
        weights = {p.untyped_storage().data_ptr() for p in e.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if t.is_floating_point() and ptr not in weights:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(seen.values()) / 4 / M

    fused = kept_per_row(lambda: e(x, counts))
    before = kept_per_row(lambda: _autograd_formula(e, x, COUNTS))
    assert fused == D + 2 * Fh  # x, gate, up
    assert before == D + 4 * Fh  # x, gate, silu(gate), up, h
    assert fused / before <= 2 / 3


def test_a_cpu_takes_the_per_expert_loop_by_default(monkeypatch):
    """As built and as the trainer's apply_kernels leaves it: the loop on a CPU, never
    torch._grouped_mm."""
    from moemesh.kernels import TORCH_OPS
    from moemesh.moe.config import ModelConfig
    from moemesh.moe.layer import MoELayer
    from moemesh.trainer.parallelize import apply_kernels

    layer = MoELayer(
        cfg=ModelConfig(name="t", hidden_size=16, moe_ffn_hidden_size=24, num_experts=len(COUNTS), top_k=2)
    )
    apply_kernels(layer, TORCH_OPS)
    e = GroupedExperts(num_experts=len(COUNTS), hidden_size=16, ffn_size=24)
    e.init_weights(seed=1, prefix="layers.0.moe", std=0.2, out_std=0.2)
    assert e.use_grouped_mm is None and layer.experts.use_grouped_mm is None

    def no_grouped(*a, **k):
        raise AssertionError("torch._grouped_mm called on a CPU by default")

    monkeypatch.setattr(torch, "_grouped_mm", no_grouped)
    x = torch.randn(sum(COUNTS), 16, requires_grad=True)
    e(x, torch.tensor(COUNTS)).sum().backward()
    assert x.grad is not None and e.w1_eDF.grad is not None


def test_the_loop_allocates_nothing_of_all_rows_by_f():
    """Every [M, F] temporary is one expert's rows: no op of the forward or the backward makes a
    tensor of M x F (or F x M) values, which a CPU would serve with fresh, faulting pages."""
    from torch.utils._python_dispatch import TorchDispatchMode

    D, Fh = 16, 40  # F > D, and M x F apart from every other size here
    e = _experts(False, D, Fh)
    M = sum(COUNTS)
    shapes: list[tuple[int, ...]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    x = torch.randn(M, D, requires_grad=True)
    with Record():
        e(x, torch.tensor(COUNTS)).backward(torch.randn(M, D))
    assert (max(COUNTS), Fh) in shapes  # the per-expert temporaries were seen
    assert (M, Fh) not in shapes and (Fh, M) not in shapes, sorted(set(shapes))


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("frozen", ["input", "weights", "w2", "all but w2"])
def test_gradients_when_part_is_frozen(grouped, frozen):
    """The backward computes only what is asked for, and that equals the autograd formula."""
    e = _experts(grouped)
    x = torch.randn(sum(COUNTS), 16, requires_grad=frozen not in ("input", "all but w2"))
    frozen_params = {
        "input": [],
        "weights": list(e.parameters()),
        "w2": [e.w2_eFD],
        "all but w2": [e.w1_eDF, e.w3_eDF],  # only the down projection trains: gate and up need no gradient
    }[frozen]
    for p in frozen_params:
        p.requires_grad_(False)
    dy = torch.randn(sum(COUNTS), 16)
    got, want = [], []
    for out, run in ((got, lambda: e(x, torch.tensor(COUNTS))), (want, lambda: _autograd_formula(e, x, COUNTS))):
        e.zero_grad(set_to_none=True)
        x.grad = None
        run().backward(dy)
        out += [x.grad, *(p.grad for p in e.parameters())]
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **TOL)


def test_a_split_backward_runs_each_gemm_in_the_pass_that_needs_it():
    """The zero-bubble schedules' split backward (torch's stage_backward_input, then
    stage_backward_weight) through the loop's one autograd node: the input pass computes no
    weight gradient, the weight pass no input gradient, and together they equal one backward."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
    from torch.utils._python_dispatch import TorchDispatchMode

    D, Fh = 16, 40
    e = _experts(False, D, Fh)
    M = sum(COUNTS)
    x0, dy = torch.randn(M, D), torch.randn(M, D)
    x = x0.clone().requires_grad_()
    e(x, torch.tensor(COUNTS)).backward(dy)
    want = [x.grad, *(p.grad.clone() for p in e.parameters())]
    e.zero_grad(set_to_none=True)

    class Products(TorchDispatchMode):
        """The output shape of every matrix product."""

        def __init__(self):
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm):
                self.shapes.append(tuple(out.shape))
            return out

    xi = x.detach().requires_grad_()
    y = e(xi, torch.tensor(COUNTS))
    params = list(e.parameters())
    with Products() as first:
        (dx,), groups = stage_backward_input([y], [dy], [xi], iter(params))
    with Products() as second:
        stage_backward_weight(iter(params), groups)
    weight_shapes = {(D, Fh), (Fh, D)}  # (an expert without rows runs its products with no rows)
    assert not weight_shapes & set(first.shapes)  # no weight gradient in the input pass
    assert sum(s in weight_shapes for s in second.shapes) == 3 * len(COUNTS)  # dw1, dw3, dw2 once each
    assert sorted(s for s in second.shapes if s not in weight_shapes) == sorted((n, Fh) for n in COUNTS)  # dh only
    for got, ref in zip([dx, *(p.grad for p in params)], want, strict=True):
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_compute_in_the_rows_dtype_under_autocast(dtype):
    """Under bf16 autocast (trainer.dtype=bf16 on a CPU) the experts compute in their rows'
    dtype on either path, and the two paths agree."""
    x = torch.randn(sum(COUNTS), 16, dtype=dtype)
    dy = torch.randn(sum(COUNTS), 16, dtype=dtype)
    results = []
    for grouped in (True, False):
        e = _experts(grouped)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = e(xi, torch.tensor(COUNTS))
        y.backward(dy)
        assert y.dtype == xi.grad.dtype == dtype
        results.append([y.detach(), xi.grad, *(p.grad for p in e.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **(TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


@pytest.mark.parametrize(("mode", "loops"), [("selective", 1), ("full", 2)])
def test_selective_checkpointing_keeps_what_the_loop_computed(monkeypatch, mode, loops):
    """Under selective activation checkpointing the loop's results (y, gate, up) are kept, as the
    grouped GEMMs' are: the backward's recompute runs no expert GEMM again; under full it does.
    Gradients equal an unchecked run's."""
    from moemesh.moe import experts as module
    from moemesh.parallel.recompute import checkpoint_module

    x, dy = torch.randn(sum(COUNTS), 16), torch.randn(sum(COUNTS), 16)
    want = _experts(False)
    xw = x.clone().requires_grad_()
    want(xw, torch.tensor(COUNTS)).backward(dy)

    runs, loop = [], module._loop_forward
    monkeypatch.setattr(module, "_loop_forward", lambda *a: runs.append(1) or loop(*a))
    e = _experts(False)
    checkpoint_module(e, mode)
    xi = x.clone().requires_grad_()
    e(xi, torch.tensor(COUNTS)).backward(dy)
    assert len(runs) == loops
    for got, ref in zip([xi.grad, *(p.grad for p in e.parameters())], [xw.grad, *(p.grad for p in want.parameters())]):
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("grouped", [True, False])
def test_inference_mode_runs_both_paths(grouped):
    """Evaluation under torch.inference_mode (no backward can follow) gives what no_grad gives."""
    e = _experts(grouped)
    x, counts = torch.randn(sum(COUNTS), 16), torch.tensor(COUNTS)
    with torch.no_grad():
        want = e(x, counts)
    with torch.inference_mode():
        got = e(x, counts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_loop_refuses_counts_that_leave_rows_without_an_expert():
    """Rows past the counts would be left unwritten (new_empty): garbage out, not an error."""
    e = _experts(False)
    x = torch.randn(sum(COUNTS), 16)
    with pytest.raises(AssertionError, match=rf"\({sum(COUNTS) - 1}, {sum(COUNTS)}\)"):
        e(x, torch.tensor([*COUNTS[:-1], COUNTS[-1] - 1]))
