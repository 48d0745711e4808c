"""Fused ops of the MoE token path and the experts' SwiGLU, one file per op, each with a torch reference
(also the CPU production path) and a Triton implementation (used on CUDA; tested
on CPU under TRITON_INTERPRET=1).

Shape letters: T tokens, D model dim, E experts, K top-k, N routed rows
(kept (token, k) pairs), M received rows, R EP ranks, e local experts per rank.

The backend is chosen once, by the caller, from the config (``kernels.backend``)
and passed down as a ``KernelOps``; nothing here reads a global switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moemesh.fields import KernelBackend
from moemesh.kernels._triton import can_run_triton, triton_available
from moemesh.kernels.gating import MAX_TRITON_EXPERTS, GatingOutput, balance_scores, gating_reference, gating_triton
from moemesh.kernels.permute import permute_reference, permute_triton
from moemesh.kernels.sort_chunks import sort_chunks_reference, sort_chunks_triton
from moemesh.kernels.swiglu import swiglu_bwd_torch, swiglu_bwd_triton, swiglu_fwd_torch, swiglu_fwd_triton
from moemesh.kernels.unpermute import unpermute_reference, unpermute_triton

BACKENDS = tuple(b.value for b in KernelBackend)


@dataclass(frozen=True)
class KernelOps:
    name: str
    gating: Callable[..., GatingOutput]
    permute: Callable
    sort_chunks: Callable
    unpermute: Callable
    swiglu_fwd: Callable  # (gate, up) -> h, no autograd (moe/experts.py owns the backward)
    swiglu_bwd: Callable  # (dh, gate, up) -> (dgate, dup, h), no autograd


TORCH_OPS = KernelOps(
    "torch",
    gating_reference,
    permute_reference,
    sort_chunks_reference,
    unpermute_reference,
    swiglu_fwd_torch,
    swiglu_bwd_torch,
)
TRITON_OPS = KernelOps(
    "triton", gating_triton, permute_triton, sort_chunks_triton, unpermute_triton, swiglu_fwd_triton, swiglu_bwd_triton
)


def resolve_backend(backend: str, device_type: str, num_experts: int | None = None) -> str:
    """auto: triton on CUDA (when triton imports and the model's ``num_experts`` fits the
    gating kernel's tile), torch elsewhere."""
    if backend == "auto":
        fits = num_experts is None or num_experts <= MAX_TRITON_EXPERTS
        return "triton" if device_type == "cuda" and triton_available() and fits else "torch"
    return backend


def backend_problem(backend: str, device_type: str, num_experts: int | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` for a model of ``num_experts`` experts
    (None if it can)."""
    if backend not in BACKENDS:
        return f"is not one of {', '.join(BACKENDS)}"
    resolved = resolve_backend(backend, device_type, num_experts)
    if resolved == "triton" and num_experts is not None and num_experts > MAX_TRITON_EXPERTS:
        return (
            f"cannot route model.num_experts={num_experts}: the Triton gating kernel holds at most "
            f"{MAX_TRITON_EXPERTS} experts; valid for this model: auto (the torch backend here), torch"
        )
    if resolved == "triton" and not can_run_triton(device_type):
        if not triton_available():
            return "needs the triton package (pip install triton==3.9.0); valid here: auto, torch"
        return (
            f"cannot run Triton kernels on {device_type} without TRITON_INTERPRET=1 "
            "(set it before starting, slow: for tests); valid here: auto, torch"
        )
    return None


def get_ops(backend: str, device_type: str, num_experts: int | None = None) -> KernelOps:
    """The ops of ``backend`` on ``device_type``; ``num_experts`` (the model's, all of them:
    gating sees every expert) makes auto fall back to torch where Triton's gating cannot."""
    problem = backend_problem(backend, device_type, num_experts)
    if problem:
        raise ValueError(f"kernels.backend={backend!r} {problem}")
    return TRITON_OPS if resolve_backend(backend, device_type, num_experts) == "triton" else TORCH_OPS


__all__ = [
    "BACKENDS",
    "MAX_TRITON_EXPERTS",
    "GatingOutput",
    "KernelBackend",
    "KernelOps",
    "TORCH_OPS",
    "TRITON_OPS",
    "backend_problem",
    "balance_scores",
    "get_ops",
    "resolve_backend",
]
