"""MoE layer forward+backward time against the ideal time of its expert FLOPs.

    python scripts/bench_moe.py [--tokens 4096 --hidden 256 --ffn 512 --experts 8 --top-k 2]

One process: fp32 on CPU; on CUDA bf16 autocast, with the Triton and the torch
kernels (``--kernels``) side by side. The reference speed is this machine's dense matmul
(torch.mm of the same expert shapes, all routed rows in one GEMM), measured in
the same run, so the ratio is comparable across machines; absolute times are not.
Expert FLOPs: forward 3 GEMMs of 2*N*D*F, backward twice that: 18*N*D*F for N
routed rows. The ratio counts everything else in the layer (router, permute,
unpermute, the SwiGLU pointwise ops) as overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moemesh.kernels import backend_problem, get_ops  # noqa: E402
from moemesh.moe.config import ModelConfig  # noqa: E402
from moemesh.moe.layer import MoELayer  # noqa: E402
from moemesh.trainer.parallelize import apply_kernels  # noqa: E402


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up (and Triton's compile)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="default 4096 on CPU, 16384 on CUDA")
    p.add_argument("--hidden", type=int, default=None, help="default 256 on CPU, 2048 on CUDA")
    p.add_argument("--ffn", type=int, default=None, help="default 512 on CPU, 1024 on CUDA")
    p.add_argument("--experts", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--top-k", type=int, default=None, help="default 2 on CPU, 8 on CUDA")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--kernels",
        default=None,
        help="comma list of kernels.backend values to time (default: triton,torch on CUDA, torch on CPU)",
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    default = lambda c, g: g if cuda else c  # noqa: E731
    T = a.tokens or default(4096, 16384)
    D = a.hidden or default(256, 2048)
    F = a.ffn or default(512, 1024)
    E = a.experts or default(8, 64)
    K = a.top_k or default(2, 8)
    backends = (a.kernels or default("torch", "triton,torch")).split(",")
    for b in backends:
        problem = backend_problem(b, device)
        if problem:
            sys.exit(f"--kernels: kernels.backend={b!r} {problem}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # CUDA: bf16 autocast (what training uses there; _grouped_mm's fast path is bf16).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    N = T * K
    cfg = ModelConfig(name="bench", hidden_size=D, moe_ffn_hidden_size=F, num_experts=E, top_k=K)

    # Dense reference: the same three GEMMs as the experts, all N rows at once, fwd + bwd.
    x = torch.randn(N, D, device=device, requires_grad=True)
    w1, w3 = (torch.randn(D, F, device=device, requires_grad=True) for _ in range(2))
    w2 = torch.randn(F, D, device=device, requires_grad=True)
    g = torch.randn(N, D, device=device)

    def dense():
        with autocast:
            h1, h3 = x @ w1, x @ w3
            out = (h1 * h3) @ w2
        out.backward(g)

    t_dense = _time(dense, a.repeats, sync)
    flops = 18 * N * D * F
    dense_flops_per_s = flops / t_dense

    where = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    threads = "" if cuda else f", {torch.get_num_threads()} threads"
    print(f"moemesh bench_moe — {where}, torch {torch.__version__}{threads}, {'bf16 autocast' if cuda else 'fp32'}")
    print(f"T={T} D={D} F={F} E={E} K={K}: {N} routed rows, expert FLOPs fwd+bwd {flops / 1e9:.2f} GFLOP")
    print(f"dense matmul reference: {t_dense * 1e3:8.2f} ms  ({dense_flops_per_s / 1e9:.1f} GFLOP/s)", flush=True)
    variants = [(f"grouped_mm, {b}", True, b) for b in backends] + [("per-expert loop, torch", False, "torch")]
    for label, grouped, backend in variants:
        torch.manual_seed(0)
        layer = MoELayer(cfg=cfg)
        apply_kernels(layer, get_ops(backend, device), use_grouped_mm=grouped)
        layer = layer.to(device)
        with torch.no_grad():
            for q in layer.parameters():
                q.normal_(0, 0.05)
        xin = torch.randn(1, T, D, device=device, requires_grad=True)
        gout = torch.randn(1, T, D, device=device)

        def step(layer=layer, xin=xin, gout=gout):  # bound now: step runs within this iteration
            with autocast:
                out, _ = layer(xin)  # the weighted aux and z losses ride on out
                loss = (out.float() * gout).sum()
            loss.backward()

        t = _time(step, a.repeats, sync)
        print(
            f"MoE layer ({label:>22}): {t * 1e3:8.2f} ms fwd+bwd  = {t / t_dense:.2f}x the ideal expert time",
            flush=True,
        )


if __name__ == "__main__":
    main()
