"""scripts/bench_kernels.py's CUDA table, run on this CPU with interpreted kernels.

The table's code (Triton vs eager vs torch.compile of the reference, the chain's
forward+backward) otherwise runs only on a GPU; this keeps the first GPU session
from spending its device time on a broken script. The timings are not checked.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts._interpreted import needs_triton, run_interpreted

pytestmark = [pytest.mark.slow, pytest.mark.shares_cores]  # runs the benchmark scripts end to end under the interpreter


@needs_triton
def test_cuda_table_code_runs_under_the_interpreter(repo_root):
    out = run_interpreted(
        repo_root,
        "bench_kernels.py",
        "--interpret-smoke",
        "--tokens",
        33,
        "--experts",
        16,
        "--top-k",
        2,
        "--hidden",
        24,
        "--peak-gbps",
        100,
    )
    first, compiled = out.stdout.split("| op | torch.compile")

    def rows(text):
        return {
            line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| op ")
        }

    ops = (
        "gating",
        "permute",
        "sort_chunks",
        "unpermute",
        "gating+permute+unpermute",
        "gating+permute+unpermute fwd+bwd",
    )
    first, compiled = rows(first), rows(compiled)
    for op in ops:
        # triton and eager times, and the compiled reference's, were all measured (no nan)
        assert op in first and op in compiled, out.stdout
        assert first[op][0] and first[op][3] and "nan" not in first[op][0] + first[op][3], (op, first[op])
        assert compiled[op][0] and compiled[op][0] != "nan", (op, compiled[op])
    assert first["gating"][2].endswith("%")  # % of the given peak
    assert "  (" not in out.stdout, out.stdout  # no note of a failed path


@needs_triton
def test_bench_moe_times_each_kernel_backend(repo_root):
    """bench_moe's --kernels rows (on CUDA: triton and torch side by side), here interpreted."""
    out = run_interpreted(
        repo_root,
        "bench_moe.py",
        "--tokens",
        24,
        "--hidden",
        16,
        "--ffn",
        16,
        "--experts",
        4,
        "--rounds",
        1,
        "--no-peers",
        "--kernels",
        "triton,torch",
    )
    # on a CPU the default expert path is the per-expert loop; grouped_mm (a GPU's) is its own row
    default = "per-expert loop (default)"
    labels = (f"{default}, triton kernels", f"{default}, torch kernels", "grouped_mm, torch kernels")
    for label in (*labels, f"{default}, torch kernels, SwiGLU compiled (inductor)"):
        row = next((line for line in out.stdout.splitlines() if line.startswith(f"| moemesh, {label} |")), None)
        assert row is not None and "not timed" not in row, out.stdout  # checked against float64, then timed
    bad = subprocess.run(
        [sys.executable, "scripts/bench_moe.py", "--kernels", "cuda"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "kernels.backend='cuda' is not one of auto, triton, torch" in bad.stderr


def test_gpu_check_runs_every_compiled_kernel_test_file(repo_root):
    """Every tests/kernels/ file whose kernels compile on a GPU (it asks whether Triton can
    run), and any other test file that picks its device by whether Triton is interpreted, is in
    scripts/gpu_check.sh's test list: the only place they run compiled."""
    root = Path(repo_root)
    script = (root / "scripts" / "gpu_check.sh").read_text()
    kernels = [p for p in (root / "tests" / "kernels").glob("test_*.py") if "can_run_triton" in p.read_text()]
    picks = re.compile(r"from moemesh\.kernels\._triton import [^\n]*\binterpreting\b")
    elsewhere = [p for p in (root / "tests").rglob("test_*.py") if picks.search(p.read_text())]
    compiled = sorted({p.relative_to(root).as_posix() for p in (*kernels, *elsewhere)})
    assert "tests/kernels/test_swiglu.py" in compiled and "tests/moe/test_routing_options.py" in compiled
    assert [f for f in compiled if f not in script] == []


@pytest.mark.parametrize(("E", "ranks"), [(64, 8), (16, 8), (8, 4), (12, 6), (6, 3), (4, 2), (7, None), (3, None)])
def test_sort_chunks_row_times_a_real_permutation(E, ranks):
    """With one rank or one expert per rank sort_chunks returns its input: the row would
    time a no-op (it reported 9,000 GB/s at E=8). The counts it times must permute rows."""
    from moemesh.kernels import TORCH_OPS
    from scripts import bench_kernels

    assert bench_kernels.sort_chunks_ranks(E) == ranks
    cases = bench_kernels._cases(64, E, 2, 4, torch.float32, "cpu")
    if ranks is None:
        assert "sort_chunks" not in cases
        assert bench_kernels._sort_chunks_note(E).startswith(f"sort_chunks: not timed, E={E} has no split")
        return
    rows = torch.arange(64 * 2, dtype=torch.float32)[:, None].repeat(1, 4)
    counts = torch.full((ranks, E // ranks), 2 * 64 // E if 2 * 64 % E == 0 else 1)
    counts[0, 0] += 64 * 2 - int(counts.sum())
    assert not torch.equal(TORCH_OPS.sort_chunks(rows, counts), rows)
    assert "sort_chunks" in cases
