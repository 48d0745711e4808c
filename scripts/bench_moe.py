"""The MoE layer against the ideal time of its expert GEMMs, and against its peers, side by side.

    python scripts/bench_moe.py [--tokens 4096 --hidden 512 --ffn 1024 --experts 8 --top-k 2] [--rounds 5]

One process, one problem: T tokens of width D routed top-K over E SwiGLU experts of width F,
exact and dropless (every routed row computed). Every implementation gets the same weights
and the same input, and is checked against a float64 reference of that problem (output and
input gradient) before it is timed; one that routes or computes differently is reported and
not timed. Rows are timed interleaved over ``--rounds`` rounds (every implementation once per
round, in turn), and each ratio is printed as the median over the rounds with its range.

Ideal: the expert FLOPs (forward 3 GEMMs of 2 N D F for N = T K routed rows, backward twice
that: 6 N D F and 18 N D F) divided by the best dense ``F.linear`` rate this process measures
for the experts' GEMM shapes (N/E and N rows; D -> F and F -> D), in the same rounds. What an
implementation spends above it is routing, permutation, the SwiGLU pointwise work, the
combine, autograd and GEMM inefficiency. The last column counts the pages this process touches
for the first time during one fwd+bwd (minor faults, median over the rounds): on a CPU each is
a fresh allocation the kernel maps and zeroes, a cost the GEMM that fills it pays.

moemesh's rows: the device's default expert path (on a CPU the per-expert loop, on a GPU the
grouped GEMMs; ``moe/experts.py``), on a CPU the same with its SwiGLU compiled by inductor,
and the other path.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: moemesh without pip install

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moemesh.kernels import get_ops  # noqa: E402
from moemesh.moe.config import ModelConfig  # noqa: E402
from moemesh.moe.layer import MoELayer  # noqa: E402
from moemesh.trainer.parallelize import apply_kernels  # noqa: E402

# fp32 against fp64: a correct layer agrees to rounding (measured ~1e-7 relative); a wrong
# routing decision or a dropped row is off by O(1).
TOL = 1e-4


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
    run: Callable[[torch.Tensor], torch.Tensor]  # x [T, D] -> out [T, D], differentiable
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwd+bwd": []})
    faults: list[int] = field(default_factory=list)  # pages first touched per fwd+bwd (minor faults)
    error: str | None = None


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


def moemesh_impl(
    cfg: ModelConfig, w: Weights, device, *, grouped: bool | None, backend: str, inductor_swiglu: bool = False
) -> Impl:
    """moemesh's layer; ``grouped``: the experts' GEMM path (None: the default for the device,
    named in the row)."""
    layer = MoELayer(cfg=cfg)
    ops = get_ops(backend, device)
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
    path = "grouped_mm" if (device != "cpu" if grouped is None else grouped) else "per-expert loop"
    name = f"moemesh, {path}{' (default)' if grouped is None else ''}, {backend} kernels"
    name += ", SwiGLU compiled (inductor)" if inductor_swiglu else ""
    return Impl(name, lambda x: layer(x.unsqueeze(0))[0].squeeze(0))


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
    return Impl("DeepSpeed 0.19 MoE, ep_size=1, no drop", lambda x: moe(x.unsqueeze(0))[0].squeeze(0))


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
        out.append(Impl(f"transformers Mixtral block, {how}", lambda x, b=block: b(x.unsqueeze(0)).squeeze(0)))
    return out


def check(impl: Impl, x: torch.Tensor, g: torch.Tensor, ref_out: torch.Tensor, ref_grad: torch.Tensor) -> None:
    """Output and input gradient against the float64 reference; sets ``impl.error`` otherwise."""
    xi = x.detach().clone().requires_grad_()
    try:
        out = impl.run(xi)
        out.float().backward(g)
    except Exception as err:  # a peer that cannot run this problem: said, not timed
        impl.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return
    for what, got, want in (("output", out, ref_out), ("input gradient", xi.grad, ref_grad)):
        rel = float((got.detach().double() - want).abs().max() / want.abs().max())
        if not rel <= TOL:
            impl.error = f"{what} differs from the float64 reference by {rel:.1e} (relative to its largest entry)"
            return


def dense_rate(D: int, Fh: int, rows: list[int], device, sync) -> float:
    """The best FLOP/s of F.linear over the experts' GEMM shapes: ``rows`` x D -> F and F -> D."""
    best = 0.0
    for n in rows:
        for a, b in ((D, Fh), (Fh, D)):
            x, wt = torch.randn(n, a, device=device), torch.randn(b, a, device=device)
            F.linear(x, wt)
            sync()
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                F.linear(x, wt)
            sync()
            best = max(best, reps * 2 * n * a * b / (time.perf_counter() - t0))
    return best


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="default 4096 on CPU, 16384 on CUDA")
    p.add_argument("--hidden", type=int, default=None, help="default 512 on CPU, 2048 on CUDA")
    p.add_argument("--ffn", type=int, default=None, help="default 1024 on CPU and CUDA")
    p.add_argument("--experts", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--top-k", type=int, default=None, help="default 2 on CPU, 8 on CUDA")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each implementation once per round)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-peers", action="store_true", help="moemesh's rows only")
    p.add_argument(
        "--kernels",
        default=None,
        help="moemesh's token-path kernel backends to time side by side, comma-separated (auto, triton, "
        "torch); default torch on CPU, triton,torch on CUDA",
    )
    return p.parse_args(argv)


def _implementations(cfg: ModelConfig, w: Weights, device, peers: bool, backends: list[str]) -> list[Impl]:
    impls = [moemesh_impl(cfg, w, device, grouped=None, backend=b) for b in backends]
    if device == "cpu" and "torch" in backends:
        impls.append(moemesh_impl(cfg, w, device, grouped=None, backend="torch", inductor_swiglu=True))
    # the other expert GEMM path: on a CPU the GPU's grouped GEMMs, on a GPU the per-expert loop
    impls.append(moemesh_impl(cfg, w, device, grouped=device == "cpu", backend="torch"))
    if peers:
        ds = deepspeed_impl(cfg, w, device)
        impls += ([ds] if ds is not None else []) + transformers_impls(cfg, w, device)
    return impls


def _time_rounds(impls: list[Impl], x, g, rounds: int, autocast, sync, dense) -> float:
    """Every implementation's fwd and fwd+bwd, once per round, in turn; the best dense rate."""

    def fwd(impl):
        with autocast:
            return impl.run(x)

    def fwd_bwd(impl):
        xi = x.detach().requires_grad_()
        with autocast:
            out = impl.run(xi)
        out.float().backward(g)

    timed = [i for i in impls if i.error is None]
    for impl in timed:  # warm-up (allocator, Triton compile)
        fwd_bwd(impl)
    rates = []
    for _ in range(rounds):
        rates.append(dense())
        for impl in timed:
            for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                sync()
                f0, t0 = _minor_faults(), time.perf_counter()
                fn(impl)
                sync()
                impl.times[what].append(time.perf_counter() - t0)
                if what == "fwd+bwd":
                    impl.faults.append(_minor_faults() - f0)
    return max(rates)


def _minor_faults() -> int:
    """This process's minor page faults so far: each is a page touched for the first time (a
    fresh allocation the kernel must map and zero)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    a = _args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    backends = (a.kernels or ("triton,torch" if cuda else "torch")).split(",")
    for b in backends:
        try:
            get_ops(b, device)
        except ValueError as err:  # a backend that does not exist, or cannot run here: one line
            sys.exit(f"bench_moe: {err}")
    if a.threads:
        torch.set_num_threads(a.threads)
    pick = lambda c, g: g if cuda else c  # noqa: E731
    T, D, Fh = a.tokens or pick(4096, 16384), a.hidden or pick(512, 2048), a.ffn or 1024
    E, K = a.experts or pick(8, 64), a.top_k or pick(2, 8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    N = T * K
    torch.manual_seed(0)
    w = Weights(
        torch.randn(E, D) * 0.05,
        torch.randn(E, D, Fh) * 0.05,
        torch.randn(E, D, Fh) * 0.05,
        torch.randn(E, Fh, D) * 0.05,
    )
    # No balance losses attached: the peers' forward computes none either (DeepSpeed's aux
    # loss is returned beside the output, unused here).
    cfg = ModelConfig(
        name="bench", hidden_size=D, moe_ffn_hidden_size=Fh, num_experts=E, top_k=K,
        aux_loss_factor=0.0, z_loss_factor=0.0,
    )  # fmt: skip
    x, g = torch.randn(T, D, device=device), torch.randn(T, D, device=device)
    xr = x.double().cpu().requires_grad_()
    ref_out = reference(xr, w, K)
    ref_out.backward(g.double().cpu())
    ref_out, ref_grad = ref_out.detach().to(device), xr.grad.to(device)
    impls = _implementations(cfg, w, device, peers=not a.no_peers, backends=backends)
    for impl in impls:
        if not cuda:  # bf16 autocast on CUDA is not fp32: checked against its own tolerance there
            check(impl, x, g, ref_out, ref_grad)
    rate = _time_rounds(impls, x, g, a.rounds, autocast, sync, lambda: dense_rate(D, Fh, [N // E, N], device, sync))
    ideal = {"fwd": 6 * N * D * Fh / rate, "fwd+bwd": 18 * N * D * Fh / rate}

    where = torch.cuda.get_device_name() if cuda else _cpu_model()
    threads = "" if cuda else f", {torch.get_num_threads()} threads"
    print(f"bench_moe — {where}, torch {torch.__version__}{threads}, {'bf16 autocast' if cuda else 'fp32'}")
    print(f"T={T} D={D} F={Fh} E={E} K={K}: {N} routed rows, exact and dropless; {a.rounds} interleaved rounds")
    print(
        f"ideal: expert FLOPs at the best dense F.linear rate {rate / 1e9:.1f} GFLOP/s "
        f"({N // E} and {N} rows): fwd {ideal['fwd'] * 1e3:.1f} ms, fwd+bwd {ideal['fwd+bwd'] * 1e3:.1f} ms\n"
    )
    print("| implementation | fwd ÷ ideal (median, range) | fwd+bwd ÷ ideal (median, range) | new pages per fwd+bwd |")
    print("|---|---:|---:|---:|")
    for impl in impls:
        if impl.error:
            print(f"| {impl.name} | not timed: {impl.error} | | |")
            continue
        cells = []
        for what in ("fwd", "fwd+bwd"):
            r = [t / ideal[what] for t in impl.times[what]]
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})")
        pages = int(statistics.median(impl.faults))
        print(
            f"| {impl.name} | {cells[0]} | {cells[1]} | {pages:,} ({pages * resource.getpagesize() / 2**20:.0f} MiB) |"
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
