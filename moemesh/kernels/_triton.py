"""Triton, where it can be imported. The ops stay usable (torch reference) without it.

On CPU, Triton kernels run only under ``TRITON_INTERPRET=1``, which must be set
before triton is imported (the tests' conftest does it).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without triton: the torch references only
    triton, tl = None, None


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_run_triton(device_type: str) -> bool:
    """True where a Triton kernel can run on tensors of this device type."""
    if triton is None:
        return False
    return device_type == "cuda" or interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(0, (max(int(n), 1) - 1).bit_length())


# The floating dtypes the kernels load and store (they compute in fp32 inside); anything else
# (float64, integers) is refused in one line rather than computed in fp32 and rounded.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(what: str, name: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{what}: {name} dtype {t.dtype} is not fp32/fp16/bf16")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def pick(custom_op, eager_apply):
    """The op to call: under torch.compile the torch.library custom op (one opaque node
    with a fake implementation); in eager mode the autograd.Function over the same
    launchers, whose dispatch costs about 20 us less host time per call (measured on
    this CPU: 10 us vs 32 us for an identity). Both give bit-identical results."""
    return custom_op if torch.compiler.is_compiling() else eager_apply
