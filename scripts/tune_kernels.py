"""Sweep the Triton kernels' launch parameters (moemesh/kernels/_tuning.py) on a GPU.

    python scripts/tune_kernels.py [--tokens 16384 --experts 64 --top-k 8 --hidden 4096]

For each kernel, coordinate descent from the current table: one parameter at a
time over its candidates, the others held at the best so far, two passes. Every
candidate's output is first checked against the current table's output (exactly
for ids, counts, row maps and copies; to 1e-3 where a block size changes the
order of a float sum) and a candidate that differs is refused, not timed. Prints
each kernel's best against the current table, then the table to paste into
moemesh/kernels/_tuning.py. Times with triton.testing.do_bench on CUDA.

On CPU, ``--interpret-smoke`` runs the same code on interpreted kernels with one
timing each: a test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import pprint
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moemesh.kernels._triton import can_run_triton  # noqa: E402
from moemesh.kernels._tuning import TUNING  # noqa: E402
from scripts._args import Parser, positive_int  # noqa: E402  (errors on one line)
from scripts.bench_kernels import _time_cpu, _time_cuda  # noqa: E402

CANDIDATES = {
    # Gating tiles stop at 4096 elements and 4 warps at least: a 64x64 tile at 1 warp already
    # spills registers (255 + 2.4 KB, compiled for sm_90 by a reviewer), and larger tiles more.
    "gating_fwd": {"tile": [1024, 2048, 4096], "max_block_t": [8, 16, 32, 64], "num_warps": [4, 8]},
    "gating_bwd": {"tile": [1024, 2048, 4096], "max_block_t": [8, 16, 32, 64], "num_warps": [4, 8]},
    "permute": {"block_n": [16, 32, 64, 128], "block_d": [64, 128, 256, 512], "num_warps": [2, 4, 8]},
    "sort_chunks": {"block_m": [4, 8, 16, 32, 64], "block_d": [64, 128, 256, 512], "num_warps": [2, 4, 8]},
    "gather_sum": {"block_t": [2, 4, 8, 16, 32], "block_d": [64, 128, 256, 512], "num_warps": [2, 4, 8]},
    "unpermute_bwd": {"block_n": [4, 8, 16, 32, 64], "block_d": [64, 128, 256, 512], "num_warps": [2, 4, 8]},
    "swiglu": {"block": [256, 512, 1024, 2048, 4096], "num_warps": [2, 4, 8]},
}
# Kernels whose float outputs may change in the last bits with the blocking (a sum's order).
REORDERED = {"gating_fwd", "gating_bwd", "unpermute_bwd"}


def _workloads(T, E, K, D, dtype, device):
    """kernel -> a call of its launcher on benchmark-sized inputs (no autograd), given launch parameters."""
    from moemesh.kernels.gating import _launch_bwd, _launch_fwd
    from moemesh.kernels.permute import _launch as permute_launch
    from moemesh.kernels.sort_chunks import _launch as sort_launch
    from moemesh.kernels.swiglu import swiglu_backward, swiglu_forward
    from moemesh.kernels.unpermute import _unpermute_backward_launch, gather_sum

    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape, dt=torch.float32: torch.randn(*shape, generator=g).to(device=device, dtype=dt)  # noqa: E731
    logits, x = rnd(T, E), rnd(T, D, dt=dtype)
    ids, _w, _c, _s, _l = _launch_fwd(logits, None, K, True, False)
    rows, row_map, counts_E = permute_launch(x, ids, E)
    R = 8 if E % 8 == 0 else 1
    counts_Re = counts_E.view(R, E // R)
    w = torch.rand(T, K, generator=g).to(device)
    g_out, g_w, g_s, g_l = rnd(T, D, dt=dtype), rnd(T, K), rnd(E), rnd(T)
    # The experts' SwiGLU on every routed row, FFN width 2 D (one table entry for both passes).
    gate, up, dh = (rnd(T * K, 2 * D, dt=dtype) for _ in range(3))
    return {
        "gating_fwd": lambda params: _launch_fwd(logits, None, K, True, False, params=params),
        "gating_bwd": lambda params: (_launch_bwd(logits, ids, g_w, g_s, g_l, True, False, params=params),),
        "permute": lambda params: permute_launch(x, ids, E, params=params),
        "sort_chunks": lambda params: (sort_launch(rows, counts_Re, params=params),),
        "gather_sum": lambda params: (gather_sum(rows, row_map, w, T, K, params=params),),
        "unpermute_bwd": lambda params: _unpermute_backward_launch(g_out, rows, row_map, w, params=params),
        "swiglu": lambda params: (
            swiglu_forward(gate, up, params=params),
            *swiglu_backward(dh, gate, up, params=params),
        ),
    }


def _same(kernel, got, want) -> bool:
    for a, b in zip(got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() and kernel in REORDERED:
            if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def tune(workloads, timer, candidates=CANDIDATES, passes=2, table=TUNING) -> dict[str, dict[str, int]]:
    """Coordinate descent per kernel from ``table``; returns the best table. ``workloads`` maps
    a kernel to ``run(params)``; ``timer(fn)`` times a call of ``fn()``."""
    best_table = {}
    for kernel, run in workloads.items():
        best = dict(table[kernel])
        want = run(best)  # the current table's output
        t_start = timer(functools.partial(run, best))
        t_best = t_start
        refused = 0
        for _ in range(passes):
            for param, values in candidates[kernel].items():
                for value in values:
                    if value == best[param]:
                        continue
                    trial = {**best, param: value}
                    try:
                        ok = _same(kernel, run(trial), want)
                    except Exception:  # e.g. out of shared memory or registers
                        ok = False
                    if not ok:
                        refused += 1
                        continue
                    t = timer(functools.partial(run, trial))
                    if t < t_best:
                        best, t_best = trial, t
        best_table[kernel] = best
        note = f", {refused} candidates refused (output differed or failed)" if refused else ""
        print(
            f"{kernel:14s} {t_start * 1e3:8.3f} ms -> {t_best * 1e3:8.3f} ms ({t_start / t_best:.2f}x)  {best}{note}",
            flush=True,
        )
    return best_table


def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=16384)
    p.add_argument("--experts", type=positive_int, default=64)
    p.add_argument("--top-k", type=positive_int, default=8)
    p.add_argument("--hidden", type=positive_int, default=4096)
    p.add_argument("--passes", type=positive_int, default=2)
    p.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="run on this CPU with TRITON_INTERPRET=1 kernels and one timing each: a test of the script",
    )
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (a.interpret_smoke and can_run_triton("cpu")):
        sys.exit("tune_kernels: needs a CUDA GPU (or, to test the script, --interpret-smoke with TRITON_INTERPRET=1)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    name = torch.cuda.get_device_name() if cuda else "CPU (interpreted: the numbers mean nothing)"
    print(f"moemesh tune_kernels — {name}, T={a.tokens} E={a.experts} K={a.top_k} D={a.hidden} {dtype}", flush=True)
    timer = _time_cuda if cuda else (lambda fn: _time_cpu(fn, repeats=1))
    best = tune(_workloads(a.tokens, a.experts, a.top_k, a.hidden, dtype, device), timer, passes=a.passes)
    print("\nTUNING for moemesh/kernels/_tuning.py:")
    pprint.pprint(best, sort_dicts=False, width=118)


if __name__ == "__main__":
    main()
