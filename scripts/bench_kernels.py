"""Token-path kernels: time, achieved GB/s and speedups over the torch reference.

    python scripts/bench_kernels.py [--tokens 16384 --experts 64 --top-k 8 --hidden 4096]

On CUDA: each op (gating, permute, sort_chunks, unpermute) and the chain gating +
permute + unpermute, forward and forward+backward, timed with
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

from kernels import TORCH_OPS, TRITON_OPS  # noqa: E402
from kernels._triton import can_run_triton  # noqa: E402

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


def _cases(T, E, K, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(device)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    R = 8 if E % 8 == 0 else 1
    counts = torch.bincount(ids.flatten().cpu(), minlength=E).view(R, E // R).to(device)
    N = T * K
    rows = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    _, row_map, _ = TORCH_OPS.permute(x, ids, E)
    es = x.element_size()
    # Bytes each op must move, forward.
    return {
        "gating": (lambda ops: ops.gating(logits, top_k=K, renormalize=True), T * E * 4 + T * K * 12 + T * 4),
        "permute": (lambda ops: ops.permute(x, ids, E), N * 8 + 2 * N * D * es + N * 8),
        "sort_chunks": (lambda ops: ops.sort_chunks(rows, counts), 2 * N * D * es),
        "unpermute": (lambda ops: ops.unpermute(rows, row_map, w), N * D * es + N * 12 + T * D * es),
        "gating+permute+unpermute": (
            lambda ops: _chain(ops, logits, x, K, E),
            (T * E * 4 + T * K * 12 + T * 4) + (N * 16 + 2 * N * D * es) + (N * D * es + N * 12 + T * D * es),
        ),
    }


def _chain(ops, logits, x, K, E):
    gate = ops.gating(logits, top_k=K, renormalize=True)
    rows, row_map, _ = ops.permute(x, gate.topk_ids_TK, E)
    return ops.unpermute(rows, row_map, gate.topk_weights_TK)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--peak-gbps", type=float, default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    T = a.tokens or (16384 if cuda else 2048)
    D = a.hidden or (4096 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    E, K = a.experts, a.top_k
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = _peak(name, a.peak_gbps) if cuda else None
    print(f"moemesh bench_kernels — {name}, torch {torch.__version__}, T={T} E={E} K={K} D={D} {dtype}")
    cases = _cases(T, E, K, D, dtype, device)
    if not (cuda and can_run_triton("cuda")):
        print("(CPU: the torch reference, which is the production path here)")
        print("| op | ms | GB/s |\n|---|---|---|")
        for op, (fn, nbytes) in cases.items():
            t = _time_cpu(lambda: fn(TORCH_OPS))
            print(f"| {op} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} |")
        return
    compiled = {}

    def compiled_ref(op, fn):
        if op not in compiled:
            compiled[op] = torch.compile(lambda: fn(TORCH_OPS))
        return compiled[op]

    print(f"peak HBM {peak or '?'} GB/s")
    print("| op (forward) | triton ms | GB/s | % of peak | eager ms | compiled ms | vs eager | vs compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for op, (fn, nbytes) in cases.items():
        t_tri = _time_cuda(lambda: fn(TRITON_OPS))
        t_eager = _time_cuda(lambda: fn(TORCH_OPS))
        try:
            t_comp = _time_cuda(compiled_ref(op, fn))
        except Exception as err:  # a reference torch.compile cannot trace (host syncs)
            print(f"  (torch.compile of {op}: {type(err).__name__})")
            t_comp = float("nan")
        gbps = nbytes / t_tri / 1e9
        pct = f"{100 * gbps / peak:.0f}%" if peak else "?"
        print(f"| {op} | {t_tri * 1e3:.3f} | {gbps:.0f} | {pct} | {t_eager * 1e3:.3f} | {t_comp * 1e3:.3f} | "
              f"{t_eager / t_tri:.2f}x | {t_comp / t_tri:.2f}x |")


if __name__ == "__main__":
    main()
