"""The experts' fused SwiGLU (kernels/swiglu.py) against its definition, forward and backward, on
every layer of the op: the Triton kernel (interpreted on this CPU, compiled with
TRITON_INTERPRET=0 on a GPU), the custom op and its autograd, and the torch backend's
primitives, which the CPU runs. Shapes include non-multiples of the block (1024 elements).

Tolerances (fp32): values rtol 1e-5 / atol 1e-6; the recomputed h bit-comparable to the
forward's; gradients rtol 1e-5 / atol 1e-6 (the same formula, an elementwise op: no sum order).
"""

import pytest
import torch

from moemesh.kernels._triton import can_run_triton, interpreting
from moemesh.kernels.swiglu import (
    swiglu_backward,
    swiglu_bwd_torch,
    swiglu_forward,
    swiglu_fwd_torch,
    swiglu_reference,
)

DEVICE = "cpu" if interpreting() else "cuda"
TRITON = pytest.mark.skipif(not can_run_triton(DEVICE), reason=f"Triton cannot run on {DEVICE} here")
VAL = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(0, 8), (1, 1), (3, 5), (17, 96), (33, 257), (129, 31)]


def _three(M, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(M, F, generator=g) * 3).to(DEVICE) for _ in range(3)]


def _reference_grads(dh, gate, up):
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = swiglu_reference(g, u)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("M,F", SHAPES)
def test_torch_primitives_equal_the_definition(M, F):
    dh, gate, up = _three(M, F)
    h, dgate, dup = _reference_grads(dh, gate, up)
    torch.testing.assert_close(swiglu_fwd_torch(gate, up), h, **VAL)
    got = swiglu_bwd_torch(dh, gate, up)
    for a, b in zip(got, (dgate, dup, h)):
        torch.testing.assert_close(a, b, **VAL)


@TRITON
@pytest.mark.parametrize("M,F", SHAPES)
def test_triton_launchers_equal_the_definition(M, F):
    dh, gate, up = _three(M, F, seed=M + F)
    h, dgate, dup = _reference_grads(dh, gate, up)
    torch.testing.assert_close(swiglu_forward(gate, up), h, **VAL)
    for a, b in zip(swiglu_backward(dh, gate, up), (dgate, dup, h)):
        torch.testing.assert_close(a, b, **VAL)
    # one block size below the shapes' sizes: several programs, a ragged last block
    torch.testing.assert_close(swiglu_forward(gate, up, params={"block": 16}), h, **VAL)


@TRITON
@pytest.mark.parametrize("compiled_path", [False, True])
def test_triton_op_keeps_gate_and_up_only_and_differentiates(compiled_path, monkeypatch):
    import moemesh.kernels.swiglu as sw

    if compiled_path:  # the torch.library op (what torch.compile sees), not the eager Function
        monkeypatch.setattr(sw, "pick", lambda op, eager: op)
    dh, gate, up = _three(19, 40, seed=3)
    h, dgate, dup = _reference_grads(dh, gate, up)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sw.swiglu_triton(g, u)
    out.backward(dh)
    torch.testing.assert_close(out.detach(), h, **VAL)
    torch.testing.assert_close(g.grad, dgate, **VAL)
    torch.testing.assert_close(u.grad, dup, **VAL)
    assert sum(t.numel() for t in saved) == 2 * 19 * 40  # gate and up: no silu(gate), no h


@TRITON
def test_the_custom_ops_pass_opcheck():
    import moemesh.kernels.swiglu as sw

    dh, gate, up = _three(9, 24, seed=5)
    torch.library.opcheck(torch.ops.moemesh.swiglu_fwd, (gate, up))
    torch.library.opcheck(torch.ops.moemesh.swiglu_bwd, (dh, gate, up))
    torch.library.opcheck(torch.ops.moemesh.swiglu, (gate.requires_grad_(), up.requires_grad_()))
    assert sw.swiglu_fwd_triton is not None


def test_bad_shapes_are_refused_by_the_launchers():
    a, b = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"swiglu: shapes differ: \(3, 4\) and \(3, 5\)"):
        swiglu_forward(a, b)
    with pytest.raises(ValueError, match=r"must be \[M, F\]"):
        swiglu_forward(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match=r"swiglu: dtypes differ: torch.float32 and torch.bfloat16"):
        swiglu_forward(torch.randn(3, 4), torch.randn(3, 4).bfloat16())


@TRITON
def test_the_launchers_take_halves_of_a_fused_projection():
    """gate and up as the two column halves of one [M, 2F] product: strided views, which the
    launchers must make contiguous before the kernel reads them as flat arrays."""
    M, F = 7, 12
    dh = _three(M, F, seed=11)[0]
    gate, up = (torch.randn(M, 2 * F, generator=torch.Generator().manual_seed(12)) * 3).to(DEVICE).chunk(2, dim=1)
    h, dgate, dup = _reference_grads(dh, gate, up)
    torch.testing.assert_close(swiglu_forward(gate, up), h, **VAL)
    for a, b in zip(swiglu_backward(dh, gate, up), (dgate, dup, h)):
        torch.testing.assert_close(a, b, **VAL)


def test_the_backward_launcher_refuses_a_gradient_of_another_shape_or_dtype():
    gate, up = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"swiglu backward: shapes differ: \(3, 5\) and \(3, 4\)"):
        swiglu_backward(torch.randn(3, 5), gate, up)
    with pytest.raises(ValueError, match=r"swiglu backward: dtypes differ: torch.bfloat16 and torch.float32"):
        swiglu_backward(torch.randn(3, 4).bfloat16(), gate, up)
