"""scripts/tune_kernels.py: the coordinate descent, and the script end to end on interpreted kernels."""

import pytest
import torch

from moemesh.kernels._tuning import TUNING
from scripts.tune_kernels import tune
from tests.scripts._interpreted import needs_triton, run_interpreted


def test_descent_finds_the_fastest_correct_candidate_and_refuses_wrong_ones():
    before = {k: dict(v) for k, v in TUNING.items()}
    timed = {}  # the launch parameters of the call being timed

    def run(params):  # the output changes (is wrong) when block_m is 4
        timed.update(params)
        return (torch.tensor([1.0 if params["block_m"] != 4 else 2.0]),)

    def timer(fn):  # fastest at block_m=4 (refused), then 64; block_d 256 best; warps 8 best
        fn()
        return 1.0 / timed["block_m"] + abs(timed["block_d"] - 256) / 1e4 + 1.0 / timed["num_warps"] / 100

    best = tune({"sort_chunks": run}, timer)
    assert best["sort_chunks"] == {"block_m": 64, "block_d": 256, "num_warps": 8}
    assert TUNING == before  # the table itself is left alone


@pytest.mark.slow
@pytest.mark.shares_cores
@needs_triton
def test_tune_script_runs_under_the_interpreter(repo_root):
    out = run_interpreted(
        repo_root,
        "tune_kernels.py",
        "--interpret-smoke",
        "--tokens",
        17,
        "--experts",
        16,
        "--top-k",
        2,
        "--hidden",
        24,
        "--passes",
        1,
    )
    for kernel in TUNING:
        assert any(line.startswith(kernel) and "ms ->" in line for line in out.stdout.splitlines()), out.stdout
    assert "refused" not in out.stdout, out.stdout  # every candidate gives the same output here
    table = out.stdout.split("TUNING for moemesh/kernels/_tuning.py:")[1]
    assert set(eval(table)) == set(TUNING)  # noqa: S307 (our own printed dict literal)
