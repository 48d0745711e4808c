"""scripts/bench_moe.py's own logic on this CPU: the check that decides what is timed, the
ideal it divides by, the dense rate's dtype, a peer that fails, and its refusals. The bf16
cases run the CUDA path's logic (bf16 autocast, its tolerance) under CPU autocast."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scripts import bench_moe

T, D, Fh, E, K = 64, 16, 24, 4, 2


def _problem():
    torch.manual_seed(0)
    w = bench_moe.Weights(
        torch.randn(E, D) * 0.05,
        torch.randn(E, D, Fh) * 0.05,
        torch.randn(E, D, Fh) * 0.05,
        torch.randn(E, Fh, D) * 0.05,
    )
    cfg = bench_moe.ModelConfig(
        name="t", hidden_size=D, moe_ffn_hidden_size=Fh, num_experts=E, top_k=K, aux_loss_factor=0.0, z_loss_factor=0.0
    )
    return w, cfg, torch.randn(T, D), torch.randn(T, D)


def test_ideal_is_the_expert_gemm_flops():
    # N = T K routed rows through 3 GEMMs of 2 D F FLOPs: 6 N D F forward, 18 N D F with the backward
    assert bench_moe.ideal_seconds(4, 2, 3, 5, rate=1.0) == {"fwd": 720.0, "fwd+bwd": 2160.0}
    assert bench_moe.ideal_seconds(4, 2, 3, 5, rate=10.0) == {"fwd": 72.0, "fwd+bwd": 216.0}
    # the reference's own GEMMs, counted by torch: the experts' share is the formula (the
    # router's GEMM, 2 T D E forward and twice that backward, is not the experts')
    w, _, x, g = _problem()
    w = bench_moe.Weights(*(t.double().requires_grad_() for t in (w.router, w.w1, w.w3, w.w2)))
    xr = x.double().requires_grad_()
    with FlopCounterMode(display=False) as fwd:
        out = bench_moe.reference(xr, w, K)
    with FlopCounterMode(display=False) as bwd:
        out.backward(g.double())
    router = 2 * T * D * E
    ideal = bench_moe.ideal_seconds(T, K, D, Fh, rate=1.0)
    assert fwd.get_total_flops() - router == ideal["fwd"]
    assert fwd.get_total_flops() + bwd.get_total_flops() - 3 * router == ideal["fwd+bwd"]


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("no kernel for this shape\nsecond line")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_refuses_a_wrong_implementation(dtype):
    w, cfg, x, g = _problem()
    ref = bench_moe.reference_grads(x, g, w, K)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    tol, _ = bench_moe.TOL[dtype]

    def checked(impl):
        bench_moe.check(impl, x, g, ref, autocast, dtype)
        return impl

    good = checked(bench_moe.moemesh_impl(cfg, w, "cpu", grouped=None, backend="torch"))
    assert good.error is None and 0 < good.worst <= tol
    grouped = checked(bench_moe.moemesh_impl(cfg, w, "cpu", grouped=True, backend="torch"))
    assert grouped.error is None

    perturbed = bench_moe.moemesh_impl(cfg, w, "cpu", grouped=None, backend="torch")
    run = perturbed.run
    perturbed.run = lambda xi: run(xi) * (1 + 4 * tol)
    assert checked(perturbed).error.startswith("output differs from the float64 reference by ")

    no_dw = bench_moe.moemesh_impl(cfg, w, "cpu", grouped=None, backend="torch")
    for p in no_dw.module.experts.parameters():  # computes dX but no expert weight gradient
        p.requires_grad_(False)
    assert checked(no_dw).error == "computes no w1 weight gradient"

    # dW computed but wrong (a backward that scales only the experts' weight gradients)
    half_dw = bench_moe.moemesh_impl(cfg, w, "cpu", grouped=None, backend="torch")
    for p in half_dw.module.experts.parameters():
        p.register_hook(lambda gr: gr * 0.5)
    assert checked(half_dw).error.startswith("w1 weight gradient differs from the float64 reference by 5.0e-01")

    raises = bench_moe.Impl("raises", _Raises(), _Raises(), lambda: {})
    assert checked(raises).error.startswith("RuntimeError: no kernel for this shape (at test_bench_moe.py:")


def test_dense_rate_runs_in_the_layers_dtype(monkeypatch):
    seen = set()
    linear = F.linear

    def spy(x, wt, *args):
        seen.add((x.dtype, wt.dtype, torch.is_autocast_enabled("cpu")))
        return linear(x, wt, *args)

    monkeypatch.setattr(bench_moe.F, "linear", spy)
    assert bench_moe.dense_rate(8, 16, [4, 8], "cpu", lambda: None, torch.bfloat16) > 0
    assert seen == {(torch.bfloat16, torch.bfloat16, False)}
    seen.clear()
    bench_moe.dense_rate(8, 16, [4], "cpu", lambda: None)  # fp32 by default, as on a CPU
    assert seen == {(torch.float32, torch.float32, False)}


SMALL = ["--tokens", T, "--hidden", D, "--ffn", Fh, "--experts", E, "--top-k", K, "--rounds", 1, "--no-peers"]


def test_a_failing_implementation_is_dropped_and_the_others_run(monkeypatch, capsys):
    """Under bf16 autocast, as on CUDA: one that raises in the check, one that raises while
    timed, one that is wrong: each dropped with a line, the others timed."""
    build = bench_moe._implementations

    def with_broken(cfg, w, device, peers, backends):
        impls = build(cfg, w, device, peers, backends)

        def flaky(name, fails_at):  # passes the check (call 1), then raises at call ``fails_at``
            impl = bench_moe.moemesh_impl(cfg, w, device, grouped=None, backend="torch")
            calls, run = [0], impl.run

            def once_too_often(x):
                calls[0] += 1
                if calls[0] >= fails_at:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return run(x)

            impl.name, impl.run = name, once_too_often
            return impl

        wrong = bench_moe.moemesh_impl(cfg, w, device, grouped=None, backend="torch")
        wrong.name, right = "wrong output", wrong.run
        wrong.run = lambda x: right(x) * 2
        warm, timed = flaky("fails in the warm-up", 2), flaky("fails when timed", 3)
        return [bench_moe.Impl("raises", _Raises(), _Raises(), lambda: {}), *impls, warm, wrong, timed]

    monkeypatch.setattr(bench_moe, "_implementations", with_broken)
    bench_moe.main([*map(str, SMALL), "--kernels", "auto", "--dtype", "bf16"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].endswith(", bf16 autocast")
    assert "[1] raises: dropped, RuntimeError: no kernel for this shape (at test_bench_moe.py:" in out
    assert "[2] moemesh, per-expert loop (default), auto kernels: ok, worst " in out
    for i, name, when in ((4, "fails in the warm-up", "in its warm-up"), (6, "fails when timed", "while timed")):
        assert f"[{i}] {name}: ok, worst" in out
        assert f"[{i}] {name}: dropped, raised {when}: OutOfMemoryError: CUDA out of memory." in out
    assert "[5] wrong output: dropped, output differs from the float64 reference by 1.0e+00 (in norm; 2e-01" in out
    # the check's lines come before the rounds, each round's line before the table
    first_round = next(i for i, line in enumerate(lines) if line.startswith("round 1/1: dense "))
    assert first_round > max(i for i, line in enumerate(lines) if line.startswith("[5] "))
    assert "[2] " in lines[first_round] and "[3] " in lines[first_round]
    assert not any(f"[{i}] " in lines[first_round] for i in (4, 5, 6))
    assert "ideal: expert FLOPs at the best dense F.linear rate (bf16) " in out
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    for timed in ("moemesh, per-expert loop (default), auto kernels", "moemesh, grouped_mm, torch kernels"):
        assert "not timed" not in rows[timed] and "–" in rows[timed], out
    for dropped in ("raises", "fails in the warm-up", "fails when timed", "wrong output"):
        assert "not timed: " in rows[dropped]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "argument --rounds: 0 must be a positive integer"),
        (["--tokens", "0"], "argument --tokens: 0 must be a positive integer"),
        (["--experts", "-1"], "argument --experts: -1 must be a positive integer"),
        (["--top-k", "9", "--experts", "8"], "--top-k=9 must be in 1..--experts=8"),
        (["--top-k", "9"], "--top-k=9 must be in 1..--experts=8"),  # the CPU default E
        (["--rounds", "many"], "argument --rounds: 'many' is not a whole number"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--kernels", "cuda"], "kernels.backend='cuda' is not one of auto, triton, torch"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        bench_moe.main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_moe.py: error: ") and message in err, err


def test_profile_splits_each_rows_time(monkeypatch, capsys):
    """--profile: a line per timed row, its parts adding up to the whole, the GEMMs' rate in place."""
    assert bench_moe.time_split({"aten::mm": 3.0, "aten::addmm_": 1.0, "aten::silu": 0.5, "aten::sort": 0.25}) == {
        "GEMMs": 4.0,
        "pointwise": 0.5,
        "token path": 0.25,
        "other": 0.0,
    }
    assert bench_moe.time_split({"_ExpertLoopBackward": 2.0})["other"] == 2.0
    build = bench_moe._implementations  # without the compiled row: seconds of inductor, not needed here
    monkeypatch.setattr(
        bench_moe, "_implementations", lambda *a, **k: [i for i in build(*a, **k) if "inductor" not in i.name]
    )
    bench_moe.main([*map(str, SMALL), "--profile"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[") and " ms; GEMMs " in line]
    assert len(lines) == 2, out  # the default and the other path
    for line in lines:
        parts = line.split("; ")[1].split(", ")
        assert [p.rsplit(" ", 2)[0] for p in parts] == list(bench_moe.PARTS)
        assert abs(sum(int(p.rsplit(" ", 2)[1]) for p in parts) - 100) <= 2  # rounded percentages
        assert " GFLOP/s in place (" in line and "of the best dense rate)" in line
