"""scripts/bench_comm.py: its group shapes are the mesh's, its fits read the planner's bytes and
steps back, and a real 2-rank run (slow) times every collective gloo has."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from moemesh.planning import calibration
from scripts import bench_comm

ROOT = Path(__file__).resolve().parents[2]


def terms(kind: str, nbytes: int, n: int) -> tuple[float, int]:
    """The planner's (bytes, steps) for a timed collective, as the fit reads a bench row."""
    return calibration.bench_row_terms(
        {"kind": kind, "bytes": nbytes, "n": n, "sent": bench_comm.sent_bytes(kind, nbytes, n)}
    )


def test_group_shapes_are_the_mesh_groups():
    assert bench_comm.group_shapes(4) == {
        "consecutive2": [[0, 1], [2, 3]],  # tp or ep innermost
        "strided2": [[0, 2], [1, 3]],  # dp over ep2
        "consecutive4": [[0, 1, 2, 3]],
    }
    assert set(bench_comm.group_shapes(6)) == {"consecutive2", "strided2", "consecutive3", "strided3", "consecutive6"}


def test_splits_are_uneven_and_symmetric():
    n, numel = 4, 1000
    table = [bench_comm._splits(r, n, numel) for r in range(n)]
    assert all(table[r][j] == table[j][r] for r in range(n) for j in range(n))  # what r sends j, j receives
    assert len({tuple(sorted(row)) for row in table}) == 1 and len(set(table[0])) == n


@pytest.mark.parametrize(
    ("kind", "n", "expected"),
    [
        ("all_reduce", 4, (1.5e6, 6)),
        ("reduce_scatter", 4, (0.75e6, 3)),
        ("all_gather", 2, (0.5e6, 1)),
        ("p2p", 2, (1e6, 1)),
    ],
)
def test_planner_bytes_and_steps(kind, n, expected):
    assert terms(kind, 1_000_000, n) == pytest.approx(expected)


def test_a2a_is_priced_at_what_leaves_the_rank():
    """rank 0's own split stays home: the planner's A2A bytes are the buffer less that split."""
    n, nbytes = 4, 1_000_000
    own = bench_comm._splits(0, n, nbytes // 4)[0] * 4
    assert terms("a2a", nbytes, n) == pytest.approx((nbytes - own, n - 1))


def test_fit_link_reads_bandwidth_and_latency_back():
    gbps, lat = 0.8, 150.0
    xs = [terms("all_reduce", b, n) for b in (2**14, 2**18, 2**20, 2**22) for n in (2, 4)]
    ts = [b / (gbps * 1e9) + s * lat * 1e-6 for b, s in xs]
    assert calibration.fit_link(xs, ts) == pytest.approx((gbps, lat), rel=1e-9)
    results = [
        {"kind": "all_reduce", "n": n, "bytes": b, "s": t, "shape": f"c{n}"}
        for (b, n), t in zip([(b, n) for b in (2**14, 2**18, 2**20, 2**22) for n in (2, 4)], ts)
    ]
    out, unresolved = calibration.constants_from_bench(results)
    assert unresolved == []
    assert out["gbps"]["sync_intra"] == pytest.approx(gbps) and out["latency_us"]["tp_intra"] == pytest.approx(lat)
    assert "a2a_intra" not in out["gbps"]


def test_sync_is_fitted_over_every_weight_and_gradient_collective():
    """sync prices zero2/zero3's all-gathers and reduce-scatters as well as none's all-reduce: one
    line through all three (in the planner's bytes and steps for each), not the all-reduce alone."""
    gbps, lat = 1.2, 80.0
    results = []
    for kind in ("all_reduce", "reduce_scatter", "all_gather"):
        slow = 2.0 if kind == "all_gather" else 1.0  # the gathers run at half the bandwidth here
        for b in (2**14, 2**18, 2**20, 2**22):
            nbytes, steps = terms(kind, b, 4)
            t = nbytes * slow / (gbps * 1e9) + steps * lat * 1e-6
            results.append({"kind": kind, "n": 4, "bytes": b, "s": t, "shape": "c4"})
    out, unresolved = calibration.constants_from_bench(results)
    assert unresolved == []
    assert out["gbps"]["tp_intra"] == pytest.approx(gbps)  # TP: the all-reduces alone
    assert gbps / 2 < out["gbps"]["sync_intra"] < gbps  # between the two, pulled by the gathers


@pytest.mark.slow
def test_two_ranks_time_every_collective(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_comm.py"), "--world", "2", "--sizes", "4K,64K"]
    kinds = ",".join((*bench_comm.KINDS, "a2a_torch"))  # every kind, and the a2a's reference when asked for
    proc = subprocess.run(
        [*cmd, "--iters", "2", "--repeats", "1", "--kinds", kinds, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    timed = {r["kind"] for r in data["results"]}
    assert {"a2a", "a2a_torch", "all_reduce", "p2p"} <= timed
    assert timed | set(data["skipped"]) == {*bench_comm.KINDS, "a2a_torch"}
    # The reference is priced as the a2a it stands beside, and stays out of the planner's constants.
    assert {r["sent"] for r in data["results"] if r["kind"] == "a2a_torch"} == {
        r["sent"] for r in data["results"] if r["kind"] == "a2a"
    }
    assert not [k for k in calibration.constants_from_bench(data["results"])[0]["gbps"] if "torch" in k]
    assert all(r["s"] > 0 and r["shape"] == "consecutive2" for r in data["results"])
    assert all(r["sent"] == bench_comm.sent_bytes(r["kind"], r["bytes"], 2) for r in data["results"])
    assert {f["kind"] for f in data["fits"]} == timed
    assert "| a2a | consecutive2 |" in proc.stdout


@pytest.mark.slow
def test_under_torchrun_every_rank_leaves_nothing_behind(tmp_path):
    """Launched (torchrun), each rank is this script; a rank other than 0 leaves by os._exit,
    so it must not hold a temporary directory it cannot remove (it left one per run)."""
    import os

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "scripts" / "bench_comm.py"), "--sizes", "4K,16K", "--iters", "1", "--repeats", "1"]
    proc = subprocess.run(
        [*cmd, "--kinds", "all_reduce"], env={**env, "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| all_reduce | consecutive2 |" in proc.stdout
    assert [p.name for p in tmp.iterdir() if p.name.startswith("moemesh-bench-comm-")] == []


def test_groups_are_classed_by_the_link_they_use():
    hosts = ["n1", "n1", "n2", "n2"]
    shapes = bench_comm.group_shapes(4)
    assert bench_comm.link_of(shapes["consecutive2"], hosts) == "intra"  # EP/TP peers: one host
    assert bench_comm.link_of(shapes["strided2"], hosts) == "inter"  # DP peers: across hosts
    assert bench_comm.link_of(shapes["consecutive4"], hosts) == "inter"
    assert bench_comm.link_of([[0, 1], [1, 2]], hosts) == "mixed"
    # One rank per host in each strided pair: both of a host's ranks send over its link at once.
    assert bench_comm.ranks_sending_across(shapes["strided2"], hosts) == 2
    assert bench_comm.ranks_sending_across(shapes["consecutive4"], hosts) == 0


def test_each_link_class_gets_its_own_constants():
    rows = []
    for link, shape, gbps, lat in (("intra", "consecutive2", 2.0, 50.0), ("inter", "strided2", 0.01, 400.0)):
        for b in (2**14, 2**16, 2**18):
            nbytes, steps = terms("a2a", b, 2)
            t = nbytes / (gbps * 1e9) + steps * lat * 1e-6
            rows.append(
                {
                    "kind": "a2a",
                    "n": 2,
                    "bytes": b,
                    "sent": bench_comm.sent_bytes("a2a", b, 2),
                    "s": t,
                    "shape": shape,
                    "link": link,
                    "ranks_sending_across": 2,
                }
            )
    out, _ = calibration.constants_from_bench(rows)
    assert out["gbps"]["a2a_intra"] == pytest.approx(2.0) and out["gbps"]["a2a_inter"] == pytest.approx(0.01)
    assert out["latency_us"]["a2a_inter"] == pytest.approx(400.0)
    (inter,) = [f for f in bench_comm.fits(rows) if f["link"] == "inter"]
    assert inter["link_gbps"] == pytest.approx(0.02)  # two ranks of a host share its link


def test_fit_link_without_a_bandwidth_fits_latency_through_the_origin():
    """Times that fall as bytes grow: no bandwidth (inf), and alpha = sum(steps t) / sum(steps^2)."""
    bw, lat = calibration.fit_link([(2.0, 1), (1.0, 2)], [1.0, 3.0])
    assert math.isinf(bw) and lat == pytest.approx(1.4e6, rel=1e-12)


def test_fit_link_with_a_negative_latency_fits_bandwidth_through_the_origin():
    """Times that grow with bytes but fall with steps: no negative latency, alpha = 0 and
    1 / bw = sum(bytes t) / sum(bytes^2)."""
    xs, ts = [(1e6, 1), (2e6, 1), (3e6, 2)], [1e-3 - 1e-5, 2e-3 - 1e-5, 3e-3 - 2e-5]
    bw, lat = calibration.fit_link(xs, ts)
    inv_bw = sum(b * t for (b, _), t in zip(xs, ts)) / sum(b * b for b, _ in xs)
    assert lat == 0.0 and bw == pytest.approx(1 / inv_bw / 1e9, rel=1e-12)


def test_one_collective_is_too_few_to_fit_a_line():
    results = [{"kind": "all_reduce", "n": 2, "bytes": 2**20, "s": 1e-3, "shape": "c2"}]
    out, unresolved = calibration.constants_from_bench(results)
    assert out == {"gbps": {}, "latency_us": {}} and unresolved == []
