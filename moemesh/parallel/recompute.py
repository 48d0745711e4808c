"""Activation checkpointing per transformer block (``trainer.activation_checkpointing``).

``full`` keeps, between a block's forward and its backward, only the block's input and
the outputs of its collectives; the backward recomputes the rest of the block from
them. ``selective`` also keeps the results of the operators in ``SELECTIVE_SAVE``: the
attention output and the routed experts' matmul outputs (the attention core costs
O(S^2) FLOPs for T x D values kept; the expert GEMMs are the MoE layer's FLOPs; the
per-expert loop, which runs no grouped GEMM, keeps the same through
``kept_under_selective``); the
norms, RoPE, projections, dense FFN, router and token permutations are recomputed.

Neither repeats a collective: the block's forward runs under ``comm.recording`` and
its recompute under ``comm.replaying`` (see ``parallel/comm.py``), so an All-to-All,
a TP all-gather / reduce-scatter / all-reduce or the load-balance statistics
all-reduce returns its recorded output instead of communicating again, and the
All-to-All meter counts each exchange once. What the forward hands back to its
caller (the hidden states, the MoE statistics) is the first forward's; the recompute
only refills the tensors the backward reads.

The block is wrapped in place as torchtitan does, before FSDP wraps it: its class
becomes a subclass whose ``forward`` runs ``torch.utils.checkpoint.checkpoint``
(non-reentrant) around the original one. No module is inserted, so parameter names,
``state_dict`` keys and ``isinstance`` checks are those of the unwrapped model. Under
zero3 the expert unit that FSDP2 nests in the block gathers its weights during the
recompute instead of just before its own backward: the same gathers, earlier.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import checkpoint

from moemesh.fields import Recompute
from moemesh.parallel.comm import CollectiveTape, collective_in_progress, recording, replaying

MODES = tuple(m.value for m in Recompute)

# What ``selective`` keeps: the attention core's output (with its log-sum-exp; O(S^2)
# FLOPs for T x D values) and the routed experts' grouped-GEMM outputs (the MoE layer's
# FLOPs). Measured on CPU (tests/parallel/test_recompute.py): this keeps about a quarter
# of the activations of none, where also keeping every other matmul output (the
# attention projections, the dense FFN, the router) kept half and saved little time.
SELECTIVE_SAVE = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_grouped_mm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


class SelectiveOutputs:
    """The outputs of a region's ``SELECTIVE_SAVE`` operators, in the order they ran.

    Why not torch's ``create_selective_checkpoint_contexts``: it matches every operator of
    the region by (operator, call index), so a region whose recompute runs a different
    number of some operator fails or, worse, hands a result to the wrong call. Ours does:
    a replayed collective runs none of its operators, and FSDP2's hooks on a unit nested
    in the block (the experts, sharded over their own group) run profiler records and,
    under zero3, the all-gather that the unit's backward needs, during the recompute
    rather than before it. Here only the kept operators are counted, and they are the
    model's own compute, the same calls in the same order in the forward and the recompute.
    """

    def __init__(self) -> None:
        self.outputs: list[tuple[Any, Any]] = []  # (operator, its output, detached)


def _detached(out):
    return tree_map_only(torch.Tensor, lambda t: t.detach(), out)


_active = threading.local()  # the innermost selective _Keep or _Reuse of this thread


def kept_under_selective(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, kept as a ``SELECTIVE_SAVE`` operator's output is: under ``selective``
    its forward keeps the result and its recompute returns that instead of calling ``fn``;
    anywhere else, just the call. For a region of the model's own compute that is not one
    operator (the experts' per-expert GEMM loop on a CPU, ``moe/experts.py``); ``fn`` must
    run no collective and no ``SELECTIVE_SAVE`` operator, and be the same object in the forward
    and the recompute (a module-level function, not a closure made per call): the recompute
    matches kept results by it."""
    mode = getattr(_active, "mode", None)
    return fn(*args) if mode is None else mode.call(fn, args)


class _Selective(TorchDispatchMode):
    """What _Keep and _Reuse share: being the thread's active one between enter and exit."""

    def __enter__(self):
        self._outer, _active.mode = getattr(_active, "mode", None), self
        return super().__enter__()

    def __exit__(self, *exc):
        _active.mode = self._outer
        return super().__exit__(*exc)


class _Keep(_Selective):
    """selective's forward: keep each ``SELECTIVE_SAVE`` operator's output."""

    def __init__(self, kept: SelectiveOutputs):
        super().__init__()
        self.kept = kept

    def call(self, fn, args):
        assert not collective_in_progress(), f"{fn} inside a collective: a replay would skip it"
        out = fn(*args)
        self.kept.outputs.append((fn, _detached(out)))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SELECTIVE_SAVE:
            assert not collective_in_progress(), f"{func} inside a collective: a replay would skip it"
            self.kept.outputs.append((func, _detached(out)))
        return out


class _Reuse(_Selective):
    """selective's recompute: each ``SELECTIVE_SAVE`` operator returns the kept output."""

    def __init__(self, kept: SelectiveOutputs):
        super().__init__()
        self.kept = kept
        self.cursor = 0

    def __enter__(self):
        self.cursor = 0  # a retained graph recomputes again, from the first
        return super().__enter__()

    def _next(self, func):
        assert self.cursor < len(self.kept.outputs), f"{func}: the recompute ran more kept operators than the forward"
        op, out = self.kept.outputs[self.cursor]
        assert op is func, f"recompute ran {func} where the forward ran {op}"
        self.cursor += 1
        return _detached(out)

    def call(self, fn, args):
        return self._next(fn)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in SELECTIVE_SAVE:
            return func(*args, **(kwargs or {}))
        return self._next(func)


class _Contexts:
    """Several context managers entered together; enterable again (a retained graph recomputes twice)."""

    def __init__(self, *make: Callable[[], Any]):
        self.make = make
        self.stack: contextlib.ExitStack | None = None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        for m in self.make:
            self.stack.enter_context(m())
        return self

    def __exit__(self, *exc):
        assert self.stack is not None
        stack, self.stack = self.stack, None
        return stack.__exit__(*exc)


def checkpoint_contexts(mode: str) -> tuple[_Contexts, _Contexts]:
    """``checkpoint``'s ``context_fn`` for one call: (forward context, recompute context)."""
    tape = CollectiveTape()
    forward: list[Callable[[], Any]] = [functools.partial(recording, tape)]
    recompute: list[Callable[[], Any]] = [functools.partial(replaying, tape)]
    if mode == "selective":
        kept = SelectiveOutputs()
        forward.append(functools.partial(_Keep, kept))
        recompute.append(functools.partial(_Reuse, kept))
    return _Contexts(*forward), _Contexts(*recompute)


class _Checkpointed:
    """Put in front of a module's class: its forward runs under activation checkpointing."""

    activation_checkpointing: str

    def forward(self, *args, **kwargs):
        plain = super().forward
        if not torch.is_grad_enabled():  # eval: nothing is saved anyway
            return plain(*args, **kwargs)
        return checkpoint(
            plain,
            *args,
            use_reentrant=False,
            context_fn=functools.partial(checkpoint_contexts, self.activation_checkpointing),
            **kwargs,
        )


_CLASSES: dict[type, type] = {}  # one checkpointed subclass per module class, as FSDP2 does


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    return _CLASSES[cls]


def checkpoint_module(module: nn.Module, mode: str) -> None:
    """Checkpoint ``module``'s forward in place (``full`` or ``selective``)."""
    if mode not in (Recompute.full, Recompute.selective):
        raise ValueError(f"activation checkpointing mode {mode!r}: choose full or selective")
    if not isinstance(module, _Checkpointed):
        module.__class__ = _checkpointed_class(type(module))
    module.activation_checkpointing = mode  # type: ignore[assignment]


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str) -> None:
    """Checkpoint each transformer block of ``blocks`` (``none``: leave them as they are)."""
    if mode not in MODES:
        raise ValueError(f"trainer.activation_checkpointing={mode!r}: choose one of {', '.join(MODES)}")
    if mode == Recompute.none:
        return
    for block in blocks.values():
        checkpoint_module(block, mode)


def checkpointed_modules(module: nn.Module) -> Iterator[tuple[str, str]]:
    """(name, mode) of each checkpointed submodule of ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, _Checkpointed):
            yield name, m.activation_checkpointing
