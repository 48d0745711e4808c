import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _mesh(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mesh.py"), *args], capture_output=True, text=True, timeout=60
    )


def test_mesh_prints_coordinates_and_groups(tmp_path):
    dot = tmp_path / "m.dot"
    p = _mesh("parallel=ep2_dp4", "--dot", str(dot))
    assert p.returncode == 0, p.stderr
    assert "   5   0  2  1  0          5  4..7  0..3" in p.stdout  # rank 5: dp 2, ep 1, experts 4..7
    assert "{0,1} {2,3} {4,5} {6,7}" in p.stdout  # EP groups
    assert "{0,2,4,6} {1,3,5,7}" in p.stdout  # DP groups
    text = dot.read_text()
    assert text.startswith("graph mesh {") and text.count("subgraph cluster_ep") == 4
    assert "r1 -- r3 [style=dashed];" in text


def test_mesh_rejects_bad_layout():
    p = _mesh("parallel=ep4", "model.num_experts=6")
    assert p.returncode == 2
    assert "model.num_experts=6 must be divisible by parallel.expert_parallel_size=4" in p.stderr


def test_mesh_shows_all_four_axes():
    p = _mesh("parallel=pp2_tp2_ep2_dp2")
    assert p.returncode == 0, p.stderr
    assert "  13   1  1  0  1          2  0..3  2..3" in p.stdout  # pp 1 holds layers 2..3
    assert "tp groups (8 x 2 ranks)" in p.stdout and "{0,1} {2,3}" in p.stdout
    assert "pp groups (8 x 2 ranks)" in p.stdout and "{0,8} {1,9}" in p.stdout


def test_mesh_refuses_as_train_py_does_in_one_line(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args, says in (
        (["parallel=pp4", "model.num_layers=2"], "model.num_layers=2 must be >= parallel.pipeline_parallel_size=4"),
        (["parallel=ep2", "--dot", str(tmp_path / "no" / "m.dot")], f"--dot {tmp_path / 'no' / 'm.dot'}: cannot write"),
        (["parallel=ep2", "--dot", str(fifo)], f"--dot '{fifo}': not a file it can write"),  # open() blocked
        (["parallel=ep2", "--dot", ""], "--dot '': not a file it can write"),
    ):
        p = _mesh(*args)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and says in err[0], (args, p.stderr)


@pytest.mark.slow  # seconds of one process: shares the cores with the slow tier
@pytest.mark.shares_cores
def test_mesh_shows_the_layers_each_rank_holds_under_virtual_stages():
    """Printed as contiguous runs (0..1, 2..3) before, while the trainer places interleaved stages
    in a loop (rank 0: stages 0 and 2) and a V's in a V (rank 0: stages 0 and 3)."""
    for schedule, ranks in (
        ("interleaved_1f1b", ("   0   0  0  0  0          0  0..7  0,2", "   1   1  0  0  0          0  0..7  1,3")),
        ("zbv", ("   0   0  0  0  0          0  0..7  0,3", "   1   1  0  0  0          0  0..7  1,2")),
        ("1f1b", ("   0   0  0  0  0          0  0..7  0..1", "   1   1  0  0  0          0  0..7  2..3")),
    ):
        p = _mesh("parallel=pp2", f"parallel.pipeline_schedule={schedule}")
        assert p.returncode == 0, p.stderr
        for line in ranks:
            assert line in p.stdout.splitlines(), (schedule, p.stdout)
    p = _mesh("parallel=pp2", "parallel.pipeline_schedule=dualpipev", "model.num_layers=8", "trainer.micro_steps=4")
    assert "   0   0  0  0  0          0  0..7  0..1,6..7" in p.stdout.splitlines(), p.stdout
