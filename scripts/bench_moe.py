"""The MoE layer against the ideal time of its expert GEMMs, and against its peers, side by side.

    python scripts/bench_moe.py [--tokens 4096 --hidden 512 --ffn 1024 --experts 8 --top-k 2] [--rounds 5]
                                [--dtype fp32|bf16]

One process, one problem: T tokens of width D routed top-K over E SwiGLU experts of width F,
exact and dropless (every routed row computed). Every implementation gets the same weights
and the same input, and is checked against a float64 reference of that problem, computed on
the same device (output, input gradient and the router's and experts' weight gradients),
before it is timed; one that raises, routes or computes differently is dropped with a one-line
note and the others still run. The tolerance depends on ``--dtype``: fp32 (default on a CPU)
agrees to rounding, bf16 autocast (default on CUDA; on a CPU too where asked) to bf16's
rounding and the near-ties it routes differently (``TOL``). Each check line, then each
round's times, are printed as soon as they are known. Rows are timed interleaved over
``--rounds`` rounds (every implementation once per round, in turn), and each ratio is printed
as the median over the rounds with its range.

Ideal: the expert FLOPs (forward 3 GEMMs of 2 N D F for N = T K routed rows, backward twice
that: 6 N D F and 18 N D F; ``ideal_seconds``) divided by the best dense ``F.linear`` rate this
process measures for the experts' GEMM shapes (N/E and N rows; D -> F and F -> D), in the
layer's compute dtype (bf16 under bf16 autocast), in the same rounds. What an
implementation spends above it is routing, permutation, the SwiGLU pointwise work, the
combine, autograd and GEMM inefficiency. The last column counts the pages this process touches
for the first time during one fwd+bwd (minor faults, median over the rounds): on a CPU each is
a fresh allocation the kernel maps and zeroes, a cost the GEMM that fills it pays.

moemesh's rows: the device's default expert path (on a CPU the per-expert loop, on a GPU the
grouped GEMMs; ``moe/experts.py``), on a CPU the same with its SwiGLU compiled by inductor,
and the other path.

``--profile``: after the table, each timed row's forward+backward is run ``PROFILE_ITERS`` more
times under torch.profiler, and its time split into the GEMMs (with their rate in place: the
expert FLOPs over the GEMMs' own time, against the best dense rate the ideal takes), pointwise
work (the SwiGLU, the weighting), the token path (gather, scatter, sort, copies) and the rest
(autograd, routing logic, fused kernels). It tells which part keeps a row above its ideal on a
given machine: GEMMs slower in place than alone, or the work around them.

Peers, each when installed: DeepSpeed's MoE layer (ep_size=1, drop_tokens=False, the second
expert chosen without sampling), transformers' Mixtral sparse block (``eager`` and
``grouped_mm`` experts). On CUDA the layer runs under bf16 autocast at a larger default shape.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: moemesh without pip install

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moemesh.errors import ConfigError  # noqa: E402
from moemesh.kernels import get_ops  # noqa: E402
from moemesh.moe.config import ModelConfig  # noqa: E402
from moemesh.moe.layer import MoELayer  # noqa: E402
from moemesh.trainer.parallelize import apply_kernels  # noqa: E402
from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)

# The check against the float64 reference, by the dtype the layer computes in: (tolerance, how
# the error is measured).
# fp32: a correct layer agrees to rounding (measured ~1e-7 of the largest entry); a wrong
# routing decision or a dropped row is off by O(1) in its entries.
# bf16 autocast: 8 bits of mantissa leave a layer that routes in fp32 (moemesh) ~6e-3 off in
# norm; one that routes on bf16 logits (DeepSpeed, Mixtral) also flips the near-ties float64
# decides otherwise, 3e-2 to 9e-2 off (measured with CPU autocast, T=256-512, E=16 K=4 and
# E=64 K=8, the CUDA default's E and K). The norm is used there (a flipped near-tie moves a few
# entries by O(1)), with room for that: a missing gradient is off by 1, a wrong routing rule or
# a dropped quarter of the rows by O(1) too; finer errors are the fp32 check's to find.
TOL = {torch.float32: (1e-4, "max"), torch.bfloat16: (0.25, "norm")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRADS = ("router", "w1", "w3", "w2")  # the weight gradients checked, in moemesh's layout (Weights)


@dataclass
class Weights:
    """One problem's weights, moemesh's layout: router [E, D], w1 w3 [E, D, F], w2 [E, F, D]."""

    router: torch.Tensor
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


@dataclass
class Impl:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor] | None  # x [T, D] -> out [T, D], differentiable
    module: nn.Module | None = None  # holds the weights: their gradients are cleared before the check
    # the weights' gradients in moemesh's layout (Weights' shapes), keyed by GRADS; None: not computed
    grads: Callable[[], dict[str, torch.Tensor | None]] | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwd+bwd": []})
    faults: list[int] = field(default_factory=list)  # pages first touched per fwd+bwd (minor faults)
    error: str | None = None
    worst: float = 0.0  # the largest error the check measured (under TOL's measure)


@dataclass
class Reference:
    """The float64 reference's output and gradients, on the benchmark's device."""

    out: torch.Tensor
    x_grad: torch.Tensor
    w_grads: dict[str, torch.Tensor]


def reference(x: torch.Tensor, w: Weights, top_k: int) -> torch.Tensor:
    """The problem in float64, written out: softmax over the experts, top-k renormalised,
    a SwiGLU per expert, the weighted sum."""
    x = x.double()
    probs = torch.softmax(x @ w.router.double().t(), dim=-1)
    topw, topi = probs.topk(top_k, dim=-1)
    topw = topw / topw.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(w.router.shape[0]):
        tok, slot = torch.where(topi == e)
        if tok.numel():
            h = F.silu(x[tok] @ w.w1[e].double()) * (x[tok] @ w.w3[e].double())
            out.index_add_(0, tok, (h @ w.w2[e].double()) * topw[tok, slot, None])
    return out


def reference_grads(x: torch.Tensor, g: torch.Tensor, w: Weights, top_k: int) -> Reference:
    """``reference``'s output and the gradients of <out, g>, in float64 on ``x``'s device (on
    CUDA the GPU's: never the CPU at the large CUDA shape)."""
    xr = x.detach().double().requires_grad_()
    w64 = Weights(*(t.detach().to(x.device, torch.float64).requires_grad_() for t in dataclasses.astuple(w)))
    out = reference(xr, w64, top_k)
    out.backward(g.double())
    assert xr.grad is not None
    return Reference(
        out.detach(),
        xr.grad,
        {k: getattr(w64, k).grad for k in GRADS},  # type: ignore[misc]
    )


def ideal_seconds(tokens: int, top_k: int, D: int, Fh: int, rate: float) -> dict[str, float]:
    """The expert GEMMs' time at ``rate`` FLOP/s: N = tokens x top_k routed rows, each through
    3 GEMMs of 2 D F FLOPs forward (6 N D F), twice that backward (dX and dW: 18 N D F)."""
    N = tokens * top_k
    return {"fwd": 6 * N * D * Fh / rate, "fwd+bwd": 18 * N * D * Fh / rate}


def moemesh_impl(
    cfg: ModelConfig, w: Weights, device, *, grouped: bool | None, backend: str, inductor_swiglu: bool = False
) -> Impl:
    """moemesh's layer; ``grouped``: the experts' GEMM path (None: the default for the device,
    named in the row)."""
    layer = MoELayer(cfg=cfg)
    ops = get_ops(backend, device, cfg.num_experts)
    if inductor_swiglu:
        # The CPU fusion route: the torch backend's SwiGLU forward and backward primitives
        # compiled by inductor (one loop each way instead of 2 and 5 passes); the rest eager.
        compiled = {"dynamic": True, "fullgraph": True}
        ops = dataclasses.replace(
            ops,
            swiglu_fwd=torch.compile(ops.swiglu_fwd, **compiled),
            swiglu_bwd=torch.compile(ops.swiglu_bwd, **compiled),
        )
    apply_kernels(layer, ops, use_grouped_mm=grouped)
    with torch.no_grad():
        layer.router.weight_ED.copy_(w.router)
        layer.experts.w1_eDF.copy_(w.w1)
        layer.experts.w3_eDF.copy_(w.w3)
        layer.experts.w2_eFD.copy_(w.w2)
    layer = layer.to(device)
    name = moemesh_name(device, grouped=grouped, backend=backend, inductor_swiglu=inductor_swiglu)

    def grads():
        return {
            "router": layer.router.weight_ED.grad,
            "w1": layer.experts.w1_eDF.grad,
            "w3": layer.experts.w3_eDF.grad,
            "w2": layer.experts.w2_eFD.grad,
        }

    return Impl(name, lambda x: layer(x.unsqueeze(0))[0].squeeze(0), layer, grads)


def moemesh_name(device, *, grouped: bool | None, backend: str, inductor_swiglu: bool = False) -> str:
    path = "grouped_mm" if (device != "cpu" if grouped is None else grouped) else "per-expert loop"
    name = f"moemesh, {path}{' (default)' if grouped is None else ''}, {backend} kernels"
    return name + (", SwiGLU compiled (inductor)" if inductor_swiglu else "")


class _SwiGLUExpert(nn.Module):
    def __init__(self, D: int, Fh: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, Fh, bias=False), nn.Linear(D, Fh, bias=False)
        self.w2 = nn.Linear(Fh, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def deepspeed_impl(cfg: ModelConfig, w: Weights, device) -> Impl | None:
    try:
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE
    except ImportError:
        return None
    if not dist.is_initialized():  # DeepSpeed builds its expert groups on a process group
        import tempfile

        store = tempfile.mktemp(prefix="moemesh-bench-moe-")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    E, D, Fh, K = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.top_k
    moe = MoE(
        hidden_size=D,
        expert=_SwiGLUExpert(D, Fh),
        num_experts=E,
        ep_size=1,
        k=K,
        capacity_factor=float(E),  # with drop_tokens=False: every routed row computed
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(w.router)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w1.weight.copy_(w.w1[e].t())
            expert.w3.weight.copy_(w.w3[e].t())
            expert.w2.weight.copy_(w.w2[e].t())
    moe = moe.to(device)
    experts = moe.deepspeed_moe.experts.deepspeed_experts

    def grads():
        def stacked(name):  # nn.Linear keeps [out, in]: moemesh's [in, out] per expert
            gs = [getattr(e, name).weight.grad for e in experts]
            return None if any(gr is None for gr in gs) else torch.stack([gr.t() for gr in gs])

        return {"router": moe.deepspeed_moe.gate.wg.weight.grad, **{k: stacked(k) for k in ("w1", "w3", "w2")}}

    return Impl("DeepSpeed 0.19 MoE, ep_size=1, no drop", lambda x: moe(x.unsqueeze(0))[0].squeeze(0), moe, grads)


def transformers_impls(cfg: ModelConfig, w: Weights, device) -> list[Impl]:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return []
    E, D, Fh, K = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.top_k
    out = []
    for how in ("eager", "grouped_mm"):
        config = MixtralConfig(
            hidden_size=D, intermediate_size=Fh, num_local_experts=E, num_experts_per_tok=K, router_jitter_noise=0.0
        )
        config._experts_implementation = how
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(w.router)
            block.experts.gate_up_proj.copy_(torch.cat([w.w1, w.w3], dim=2).transpose(1, 2))
            block.experts.down_proj.copy_(w.w2.transpose(1, 2))
        block = block.to(device)

        def grads(b=block):
            gu, down = b.experts.gate_up_proj.grad, b.experts.down_proj.grad  # [E, 2F, D], [E, D, F]
            return {
                "router": b.gate.weight.grad,
                "w1": None if gu is None else gu[:, :Fh].transpose(1, 2),
                "w3": None if gu is None else gu[:, Fh:].transpose(1, 2),
                "w2": None if down is None else down.transpose(1, 2),
            }

        run = lambda x, b=block: b(x.unsqueeze(0)).squeeze(0)  # noqa: E731
        out.append(Impl(f"transformers Mixtral block, {how}", run, block, grads))
    return out


def _one_line(err: BaseException) -> str:
    """An exception as one line: its type, its message's first line, where it was raised."""
    lines = str(err).strip().splitlines()
    where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    at = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:160]}{at}"


def rel_error(got: torch.Tensor, want: torch.Tensor, measure: str) -> float:
    """max: the largest difference over the largest entry; norm: the norms' ratio."""
    diff = got.detach().to(want.dtype) - want
    if measure == "max":
        return float(diff.abs().max() / want.abs().max())
    return float(diff.norm() / want.norm())


def check(impl: Impl, x: torch.Tensor, g: torch.Tensor, ref: Reference, autocast, dtype: torch.dtype) -> None:
    """One fwd+bwd under ``autocast``: the output, the input gradient and the weights'
    gradients against the float64 reference at ``dtype``'s tolerance (``TOL``); sets
    ``impl.error`` (one line) if it raises or differs, else ``impl.worst``."""
    tol, measure = TOL[dtype]
    try:
        assert impl.run is not None and impl.module is not None and impl.grads is not None
        impl.module.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        with autocast:
            out = impl.run(xi)
        out.float().backward(g)
        got = {"output": out, "input gradient": xi.grad, **{f"{k} weight gradient": v for k, v in impl.grads().items()}}
        want = {"output": ref.out, "input gradient": ref.x_grad}
        want.update({f"{k} weight gradient": ref.w_grads[k] for k in GRADS})
        for what, expected in want.items():
            have = got.get(what)
            if have is None:
                impl.error = f"computes no {what}"
                return
            if have.shape != expected.shape:
                impl.error = f"{what} has shape {tuple(have.shape)}, not {tuple(expected.shape)}"
                return
            rel = rel_error(have, expected, measure)
            impl.worst = max(impl.worst, rel)
            if not rel <= tol:
                impl.error = (
                    f"{what} differs from the float64 reference by {rel:.1e} "
                    f"({'of its largest entry' if measure == 'max' else 'in norm'}; {tol:.0e} allowed)"
                )
                return
    except Exception as err:  # a peer that cannot run this problem: said, dropped, the others run
        impl.error = _one_line(err)
    finally:
        if impl.module is not None:
            impl.module.zero_grad(set_to_none=True)


def dense_rate(D: int, Fh: int, rows: list[int], device, sync, dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of F.linear over the experts' GEMM shapes: ``rows`` x D -> F and F -> D,
    in ``dtype`` (the layer's compute dtype: bf16 under bf16 autocast, as its GEMMs run)."""
    best = 0.0
    for n in rows:
        for a, b in ((D, Fh), (Fh, D)):
            x = torch.randn(n, a, device=device, dtype=dtype)
            wt = torch.randn(b, a, device=device, dtype=dtype)
            F.linear(x, wt)
            sync()
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                F.linear(x, wt)
            sync()
            best = max(best, reps * 2 * n * a * b / (time.perf_counter() - t0))
    return best


PROG = "bench_moe.py"


def _refuse(message: str):
    """A mistake found after parsing: one line, as the parser says its own."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _args(argv):
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=None, help="default 4096 on CPU, 16384 on CUDA")
    p.add_argument("--hidden", type=positive_int, default=None, help="default 512 on CPU, 2048 on CUDA")
    p.add_argument("--ffn", type=positive_int, default=None, help="default 1024 on CPU and CUDA")
    p.add_argument("--experts", type=positive_int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--top-k", type=positive_int, default=None, help="default 2 on CPU, 8 on CUDA")
    p.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved rounds (each implementation once per round)"
    )
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="fp32, or bf16 autocast (the layer's and the dense rate's); default fp32 on CPU, bf16 on CUDA",
    )
    p.add_argument("--no-peers", action="store_true", help="moemesh's rows only")
    p.add_argument("--profile", action="store_true", help="split each row's time (module doc)")
    p.add_argument(
        "--kernels",
        default=None,
        help="moemesh's token-path kernel backends to time side by side, comma-separated (auto, triton, "
        "torch); default torch on CPU, triton,torch on CUDA",
    )
    a = p.parse_args(argv)
    if a.top_k is not None and a.experts is not None and a.top_k > a.experts:
        _refuse(f"--top-k={a.top_k} must be in 1..--experts={a.experts}")
    return a


def _implementations(cfg: ModelConfig, w: Weights, device, peers: bool, backends: list[str]) -> list[Impl]:
    """Every implementation, each built on the same weights; one whose construction raises is
    an ``Impl`` with its error (reported, not timed)."""
    impls: list[Impl] = []

    def add(name: str, build: Callable[[], Impl | list[Impl] | None]) -> None:
        try:
            made = build()
        except Exception as err:
            impls.append(Impl(name, None, error=f"could not be built: {_one_line(err)}"))
            return
        impls.extend([] if made is None else made if isinstance(made, list) else [made])

    for b in backends:
        add(
            moemesh_name(device, grouped=None, backend=b),
            lambda b=b: moemesh_impl(cfg, w, device, grouped=None, backend=b),
        )
    if device == "cpu" and "torch" in backends:
        name = moemesh_name(device, grouped=None, backend="torch", inductor_swiglu=True)
        add(name, lambda: moemesh_impl(cfg, w, device, grouped=None, backend="torch", inductor_swiglu=True))
    # the other expert GEMM path: on a CPU the GPU's grouped GEMMs, on a GPU the per-expert loop
    other = device == "cpu"
    add(
        moemesh_name(device, grouped=other, backend="torch"),
        lambda: moemesh_impl(cfg, w, device, grouped=other, backend="torch"),
    )
    if peers:
        add("DeepSpeed MoE", lambda: deepspeed_impl(cfg, w, device))
        add("transformers Mixtral block", lambda: transformers_impls(cfg, w, device))
    return impls


def _time_rounds(impls: list[Impl], x, g, rounds: int, autocast, sync, dense, say=print) -> float:
    """Every implementation's fwd and fwd+bwd, once per round, in turn; the best dense rate.
    One that raises is dropped with a one-line note (``impl.error``), the others go on; each
    round's times are printed (``say``) as soon as the round ends."""

    def fwd(impl):
        with autocast:
            return impl.run(x)

    def fwd_bwd(impl):
        xi = x.detach().requires_grad_()
        with autocast:
            out = impl.run(xi)
        out.float().backward(g)

    def drop(impl, err, when="while timed"):
        impl.error = f"raised {when}: {_one_line(err)}"
        say(f"[{impls.index(impl) + 1}] {impl.name}: dropped, {impl.error}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    for impl in [i for i in impls if i.error is None]:  # warm-up (allocator, Triton compile)
        try:
            fwd_bwd(impl)
        except Exception as err:
            drop(impl, err, "in its warm-up")
    rates = []
    for r in range(rounds):
        rates.append(dense())
        cells = []
        for impl in [i for i in impls if i.error is None]:
            try:
                for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    sync()
                    f0, t0 = _minor_faults(), time.perf_counter()
                    fn(impl)
                    sync()
                    impl.times[what].append(time.perf_counter() - t0)
                    if what == "fwd+bwd":
                        impl.faults.append(_minor_faults() - f0)
            except Exception as err:
                drop(impl, err)
                continue
            cells.append(
                f"[{impls.index(impl) + 1}] {impl.times['fwd'][-1] * 1e3:.2f} / {impl.times['fwd+bwd'][-1] * 1e3:.2f}"
            )
        say(f"round {r + 1}/{rounds}: dense {rates[-1] / 1e9:.1f} GFLOP/s; fwd / fwd+bwd ms: {', '.join(cells)}")
    return max(rates)


PROFILE_ITERS = 3
# Each aten op by what it does (self times: an op's children are counted where they belong).
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"})
POINTWISE_OPS = frozenset(
    "aten::" + op
    for op in (
        "silu silu_ silu_backward sigmoid sigmoid_backward mul mul_ add add_ sub sub_ div div_ neg exp "
        "addcmul addcmul_ where clamp clamp_min sum softmax _softmax _softmax_backward_data "
        "_log_softmax logsumexp"
    ).split()
)
TOKEN_OPS = frozenset(
    "aten::" + op
    for op in (
        "index_select index index_put_ index_add index_add_ scatter scatter_ scatter_add scatter_add_ "
        "gather sort argsort topk cumsum bincount nonzero repeat_interleave fill_ zero_ copy_ cat "
        "embedding_dense_backward _index_put_impl_"
    ).split()
)
PARTS = ("GEMMs", "pointwise", "token path", "other")


def time_split(self_times: dict[str, float]) -> dict[str, float]:
    """Seconds per part (``PARTS``) from each op's self time (op name -> seconds)."""
    out = dict.fromkeys(PARTS, 0.0)
    for name, t in self_times.items():
        part = (
            "GEMMs"
            if name in GEMM_OPS
            else "pointwise"
            if name in POINTWISE_OPS
            else "token path"
            if name in TOKEN_OPS
            else "other"
        )
        out[part] += t
    return out


def profile_row(impl: Impl, x, g, autocast, sync, cuda: bool) -> dict[str, float]:
    """``impl``'s forward+backward, ``PROFILE_ITERS`` times under torch.profiler: seconds per
    iteration of each part (``time_split``), on the device that runs the ops."""
    from torch.profiler import ProfilerActivity, profile

    def fwd_bwd():
        xi = x.detach().requires_grad_()
        with autocast:
            out = impl.run(xi)
        out.float().backward(g)

    fwd_bwd()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_ITERS):
            fwd_bwd()
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = {e.key: getattr(e, key) / 1e6 / PROFILE_ITERS for e in prof.key_averages()}  # from µs
    return time_split(times)


def _print_table(impls: list[Impl], ideal: dict[str, float], say) -> None:
    """Each row's times over the ideal (median and range over the rounds), and its new pages."""
    say("| implementation | fwd ÷ ideal (median, range) | fwd+bwd ÷ ideal (median, range) | new pages per fwd+bwd |")
    say("|---|---:|---:|---:|")
    for impl in impls:
        if impl.error:
            say(f"| {impl.name} | not timed: {impl.error} | | |")
            continue
        cells = []
        for what in ("fwd", "fwd+bwd"):
            r = [t / ideal[what] for t in impl.times[what]]
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})")
        pages = int(statistics.median(impl.faults))
        say(f"| {impl.name} | {cells[0]} | {cells[1]} | {pages:,} ({pages * resource.getpagesize() / 2**20:.0f} MiB) |")


def _print_profiles(impls: list[Impl], x, g, autocast, sync, cuda: bool, *, flops: float, rate: float, say) -> None:
    """``--profile``'s lines: each timed row's parts, and its GEMMs' rate in place (the expert
    ``flops`` over their time) against the best dense ``rate``."""
    say(f"\nwhere each row's fwd+bwd goes (torch profiler, {PROFILE_ITERS} iterations, self times per iteration):")
    for i, impl in enumerate(impls, 1):
        if impl.error:
            continue
        try:
            split = profile_row(impl, x, g, autocast, sync, cuda)
        except Exception as err:
            say(f"[{i}] {impl.name}: not profiled, {_one_line(err)}")
            continue
        total = sum(split.values())
        in_place = flops / split["GEMMs"] if split["GEMMs"] else 0.0
        parts = ", ".join(f"{p} {100 * t / total:.0f} %" for p, t in split.items())
        say(
            f"[{i}] {impl.name}: {total * 1e3:.1f} ms; {parts}; the GEMMs at {in_place / 1e9:.1f} GFLOP/s in "
            f"place ({in_place / rate:.2f} of the best dense rate)"
        )


def _minor_faults() -> int:
    """This process's minor page faults so far: each is a page touched for the first time (a
    fresh allocation the kernel must map and zero)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    a = _args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[a.dtype or ("bf16" if cuda else "fp32")]
    pick = lambda c, g: g if cuda else c  # noqa: E731
    T, D, Fh = _given(a.tokens, pick(4096, 16384)), _given(a.hidden, pick(512, 2048)), _given(a.ffn, 1024)
    E, K = _given(a.experts, pick(8, 64)), _given(a.top_k, pick(2, 8))
    if K > E:
        _refuse(f"--top-k={K} must be in 1..--experts={E}")
    backends = (a.kernels or ("triton,torch" if cuda else "torch")).split(",")
    for b in backends:
        try:
            get_ops(b, device, E)
        except ValueError as err:  # a backend that does not exist, or cannot run here: one line
            _refuse(str(err))
    try:
        # No balance losses attached: the peers' forward computes none either (DeepSpeed's aux
        # loss is returned beside the output, unused here).
        cfg = ModelConfig(
            name="bench", hidden_size=D, moe_ffn_hidden_size=Fh, num_experts=E, top_k=K,
            aux_loss_factor=0.0, z_loss_factor=0.0,
        )  # fmt: skip
    except ConfigError as err:  # a shape the model refuses: its one line
        _refuse(str(err))
    if a.threads:
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    say = lambda *line: print(*line, flush=True)  # noqa: E731  (each result as soon as it is known)
    N = T * K
    where = torch.cuda.get_device_name() if cuda else _cpu_model()
    threads = "" if cuda else f", {torch.get_num_threads()} threads"
    say(f"bench_moe — {where}, torch {torch.__version__}{threads}, {a.dtype or ('bf16' if cuda else 'fp32')}"
        f"{' autocast' if dtype != torch.float32 else ''}")  # fmt: skip
    say(f"T={T} D={D} F={Fh} E={E} K={K}: {N} routed rows, exact and dropless; {a.rounds} interleaved rounds")
    torch.manual_seed(0)
    w = Weights(
        torch.randn(E, D) * 0.05,
        torch.randn(E, D, Fh) * 0.05,
        torch.randn(E, D, Fh) * 0.05,
        torch.randn(E, Fh, D) * 0.05,
    )
    x, g = torch.randn(T, D, device=device), torch.randn(T, D, device=device)
    ref = reference_grads(x, g, w, K)  # float64 on the device itself
    impls = _implementations(cfg, w, device, peers=not a.no_peers, backends=backends)
    tol, measure = TOL[dtype]
    say(f"checked against float64 on {device} (output, input and weight gradients; {measure} error ≤ {tol:.0e}):")
    for i, impl in enumerate(impls, 1):
        if impl.error is None:
            check(impl, x, g, ref, autocast, dtype)
        say(f"[{i}] {impl.name}: " + (f"dropped, {impl.error}" if impl.error else f"ok, worst {impl.worst:.1e}"))
    del ref
    if cuda:
        torch.cuda.empty_cache()
    dense = lambda: dense_rate(D, Fh, [N // E, N], device, sync, dtype)  # noqa: E731
    rate = _time_rounds(impls, x, g, a.rounds, autocast, sync, dense, say)
    ideal = ideal_seconds(T, K, D, Fh, rate)
    say(
        f"\nideal: expert FLOPs at the best dense F.linear rate ({dtype_name(dtype)}) {rate / 1e9:.1f} GFLOP/s "
        f"({N // E} and {N} rows): fwd {ideal['fwd'] * 1e3:.1f} ms, fwd+bwd {ideal['fwd+bwd'] * 1e3:.1f} ms\n"
    )
    _print_table(impls, ideal, say)
    if a.profile:
        _print_profiles(impls, x, g, autocast, sync, cuda, flops=ideal["fwd+bwd"] * rate, rate=rate, say=say)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
