"""Token-path kernels: time, achieved GB/s and speedups over the torch reference.

    python scripts/bench_kernels.py [--tokens 16384 --experts 64 --top-k 8 --hidden 4096]

On CUDA: each op (gating, permute, sort_chunks, unpermute) and the chain gating +
permute + unpermute forward, and the chain forward+backward, timed with
triton.testing.do_bench for the Triton kernels, the eager torch reference and
torch.compile of the reference. GB/s counts the bytes each op must move at least
(listed per op below); the peak is --peak-gbps or, for known devices, the datasheet
figure. On CPU: the torch reference path only (the Triton interpreter is a
correctness tool, not a speed one), timed with perf_counter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moemesh.kernels import TORCH_OPS, TRITON_OPS  # noqa: E402
from moemesh.kernels._triton import can_run_triton  # noqa: E402
from scripts._args import Parser, positive_float, positive_int  # noqa: E402

PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0}


def _peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def _time_cpu(fn, repeats=10) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _time_cuda(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3


def sort_chunks_ranks(E: int) -> int | None:
    """R, the EP ranks sort_chunks' counts [R, E/R] are cut into: the most up to 8 that leave
    each rank at least 2 experts. With one rank or one expert per rank the rank-major order
    is already expert-major and the op returns its input (timing a no-op); None where E
    allows no such split (E < 4 or prime)."""
    return next((R for R in range(min(8, E // 2), 1, -1) if E % R == 0), None)


def _cases(T, E, K, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(device)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    R = sort_chunks_ranks(E)
    counts = torch.bincount(ids.flatten().cpu(), minlength=E).view(R or 1, E // (R or 1)).to(device)
    N = T * K
    rows = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    _, row_map, _ = TORCH_OPS.permute(x, ids, E)
    es = x.element_size()
    # Bytes each op must move, forward.
    cases = {
        "gating": (lambda ops: ops.gating(logits, top_k=K, renormalize=True), T * E * 4 + T * K * 12 + T * 4),
        "permute": (lambda ops: ops.permute(x, ids, E), N * 8 + 2 * N * D * es + N * 8),
        "sort_chunks": (lambda ops: ops.sort_chunks(rows, counts), 2 * N * D * es),
        "unpermute": (lambda ops: ops.unpermute(rows, row_map, w), N * D * es + N * 12 + T * D * es),
        "gating+permute+unpermute": (
            lambda ops: _chain(ops, logits, x, K, E),
            (T * E * 4 + T * K * 12 + T * 4) + (N * 16 + 2 * N * D * es) + (N * D * es + N * 12 + T * D * es),
        ),
    }
    if R is None:  # no split that permutes: the row would time a copy-free no-op
        del cases["sort_chunks"]
    return cases


def _sort_chunks_note(E: int) -> str:
    R = sort_chunks_ranks(E)
    if R is None:
        return f"sort_chunks: not timed, E={E} has no split into 2+ ranks of 2+ experts (the order would not change)"
    return f"sort_chunks: {R} ranks x {E // R} experts, rank-major to expert-major"


def _chain(ops, logits, x, K, E):
    gate = ops.gating(logits, top_k=K, renormalize=True)
    rows, row_map, _ = ops.permute(x, gate.topk_ids_TK, E)
    return ops.unpermute(rows, row_map, gate.topk_weights_TK)


def _chain_fwd_bwd(forward, T, E, D, dtype, device):
    """forward(logits, x) then the gradients of logits and x, as a training step runs it."""
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(T, E, generator=g).to(device).requires_grad_()
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)

    def step():
        return torch.autograd.grad(forward(logits, x), (logits, x), grad_out)

    return step


def _triton_table(cases, timer, peak, fwd_bwd, compile_backend) -> None:
    """Triton against the eager reference, then against torch.compile of the reference.

    Two tables, the compiled one last: its compiles take the longest, and a run cut off
    by a time limit keeps the first table."""

    def timed(fn, what):
        try:
            return timer(fn)
        except Exception as err:  # e.g. a reference torch.compile cannot trace
            print(f"  ({what}: {type(err).__name__}: {str(err).splitlines()[0][:160]})", flush=True)
            return float("nan")

    chain_fwd_bwd = "gating+permute+unpermute fwd+bwd"
    t_tri = {}
    print(f"peak HBM {peak or '?'} GB/s", flush=True)
    print("| op | triton ms | GB/s | % of peak | eager ms | vs eager |")
    print("|---|---|---|---|---|---|", flush=True)
    for op, (fn, nbytes) in cases.items():
        t_tri[op] = timer(lambda: fn(TRITON_OPS))  # noqa: B023 (called here, in this iteration)
        t_eager = timer(lambda: fn(TORCH_OPS))  # noqa: B023
        gbps = nbytes / t_tri[op] / 1e9
        pct = f"{100 * gbps / peak:.0f}%" if peak else "?"
        print(
            f"| {op} | {t_tri[op] * 1e3:.3f} | {gbps:.0f} | {pct} | {t_eager * 1e3:.3f} | {t_eager / t_tri[op]:.2f}x |",
            flush=True,
        )
    # Forward + backward of the chain: time and speedup only (the backward's bytes
    # depend on which inputs need gradients).
    t_tri[chain_fwd_bwd] = timer(fwd_bwd["triton"])
    t_eager = timer(fwd_bwd["eager"])
    print(
        f"| {chain_fwd_bwd} | {t_tri[chain_fwd_bwd] * 1e3:.3f} | | | {t_eager * 1e3:.3f} | "
        f"{t_eager / t_tri[chain_fwd_bwd]:.2f}x |",
        flush=True,
    )

    print(f"\n| op | torch.compile({compile_backend}) of the reference, ms | triton vs compiled |")
    print("|---|---|---|", flush=True)
    for op, (fn, _) in cases.items():
        compiled = torch.compile(lambda fn=fn: fn(TORCH_OPS), backend=compile_backend)
        t_comp = timed(compiled, f"torch.compile of the {op} reference")
        print(f"| {op} | {t_comp * 1e3:.3f} | {t_comp / t_tri[op]:.2f}x |", flush=True)
    t_comp = timed(fwd_bwd["compiled"], f"{chain_fwd_bwd}, compiled")
    print(f"| {chain_fwd_bwd} | {t_comp * 1e3:.3f} | {t_comp / t_tri[chain_fwd_bwd]:.2f}x |", flush=True)


def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=None, help="default 16384 on CUDA, 2048 on CPU")
    p.add_argument("--experts", type=positive_int, default=64)
    p.add_argument("--top-k", type=positive_int, default=8)
    p.add_argument("--hidden", type=positive_int, default=None, help="default 4096 on CUDA, 512 on CPU")
    p.add_argument("--peak-gbps", type=positive_float, default=None)
    p.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="run the CUDA table's code on this CPU with TRITON_INTERPRET=1 kernels and one timing "
        "each: a test of the script, not a measurement",
    )
    a = p.parse_args(argv)
    if a.top_k > a.experts:
        p.error(f"--top-k={a.top_k} must be at most --experts={a.experts}")
    cuda = torch.cuda.is_available()
    smoke = a.interpret_smoke and not cuda
    if smoke and not can_run_triton("cpu"):
        sys.exit("--interpret-smoke: set TRITON_INTERPRET=1 before starting (and pip install triton)")
    device = "cuda" if cuda else "cpu"
    T = a.tokens if a.tokens is not None else (16384 if cuda else 2048)
    D = a.hidden if a.hidden is not None else (4096 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    E, K = a.experts, a.top_k
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = _peak(name, a.peak_gbps) if cuda else a.peak_gbps
    print(f"moemesh bench_kernels — {name}, torch {torch.__version__}, T={T} E={E} K={K} D={D} {dtype}", flush=True)
    cases = _cases(T, E, K, D, dtype, device)
    print(_sort_chunks_note(E), flush=True)
    if not ((cuda and can_run_triton("cuda")) or smoke):
        print("(CPU: the torch reference, which is the production path here)")
        print("| op | ms | GB/s |\n|---|---|---|")
        for op, (fn, nbytes) in cases.items():
            t = _time_cpu(lambda: fn(TORCH_OPS))  # noqa: B023 (timed before the next iteration)
            print(f"| {op} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} |")
        return
    if smoke:
        print("(--interpret-smoke: interpreted kernels, one run each; the numbers mean nothing)")
    chain = {
        name: (lambda ops: lambda lg, x: _chain(ops, lg, x, K, E))(ops)  # noqa: B023 (ops bound by the outer lambda)
        for name, ops in (("triton", TRITON_OPS), ("eager", TORCH_OPS))
    }
    compile_backend = "aot_eager" if smoke else "inductor"  # the smoke test checks plumbing, not inductor
    chain["compiled"] = torch.compile(chain["eager"], backend=compile_backend)
    fwd_bwd = {name: _chain_fwd_bwd(fwd, T, E, D, dtype, device) for name, fwd in chain.items()}
    timer = (lambda fn: _time_cpu(fn, repeats=1)) if smoke else _time_cuda
    _triton_table(cases, timer, peak, fwd_bwd, compile_backend)


if __name__ == "__main__":
    main()
