"""MoE layer forward+backward time against the ideal time of its expert FLOPs.

    python scripts/bench_moe.py [--tokens 4096 --hidden 256 --ffn 512 --experts 8 --top-k 2]

One process, fp32. The reference speed is this machine's dense matmul
(torch.mm of the same expert shapes, all routed rows in one GEMM), measured in
the same run, so the ratio is comparable across machines; absolute times are not.
Expert FLOPs: forward 3 GEMMs of 2*N*D*F, backward twice that: 18*N*D*F for N
routed rows. The ratio counts everything else in the layer (router, permute,
unpermute, the SwiGLU pointwise ops) as overhead.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from conf.schema import ModelConfig  # noqa: E402
from moe.layer import MoELayer  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    T, D, F, E, K = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    N = T * K
    cfg = ModelConfig(name="bench", hidden_size=D, moe_ffn_hidden_size=F, num_experts=E, top_k=K)

    # Dense reference: the same three GEMMs as the experts, all N rows at once, fwd + bwd.
    x = torch.randn(N, D, requires_grad=True)
    w1, w3 = (torch.randn(D, F, requires_grad=True) for _ in range(2))
    w2 = torch.randn(F, D, requires_grad=True)
    g = torch.randn(N, D)

    def dense():
        h1, h3 = x @ w1, x @ w3
        ((h1 * h3) @ w2).backward(g)

    t_dense = _time(dense, a.repeats)
    flops = 18 * N * D * F
    dense_flops_per_s = flops / t_dense

    print(f"moemesh bench_moe — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"T={T} D={D} F={F} E={E} K={K}: {N} routed rows, expert FLOPs fwd+bwd {flops / 1e9:.2f} GFLOP")
    print(f"dense matmul reference: {t_dense * 1e3:8.2f} ms  ({dense_flops_per_s / 1e9:.1f} GFLOP/s)")
    for label, grouped in (("grouped_mm", True), ("per-expert loop", False)):
        torch.manual_seed(0)
        layer = MoELayer(cfg=cfg, ep_rank=0, ep_group=None, stats_group=None, use_grouped_mm=grouped)
        with torch.no_grad():
            for q in layer.parameters():
                q.normal_(0, 0.05)
        xin = torch.randn(1, T, D, requires_grad=True)
        gout = torch.randn(1, T, D)

        def step():
            out, stats = layer(xin)
            (out * gout).sum().add(0.01 * stats.losses.aux_loss).backward()

        t = _time(step, a.repeats)
        print(f"MoE layer ({label:>15}): {t * 1e3:8.2f} ms fwd+bwd  = {t / t_dense:.2f}x the ideal expert time")


if __name__ == "__main__":
    main()
