"""scripts/compare.py on two real (tiny) train.py runs: table, charts, sweeps, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
         "model.ffn_hidden_size=64", "model.moe_ffn_hidden_size=48", "model.max_seq_len=32",
         "trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.eval_every=0", "trainer.eval_batches=1"]
CHARTS = ("throughput.png", "step_breakdown.png", "memory.png", "a2a_share.png", "load_cv.png", "loss.png")
EXPERT = "expert param MiB/rank"
PHASES = ["step ms", "fwd %", "bwd %", "pipeline %", "grad reduce %", "optim %", "a2a %"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real 3-step runs, single and ep2 (run one after the other: 2 cores)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = []
    for layout in ("single", "ep2"):
        d = tmp / layout
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={d}", *SMALL,
                               "trainer.steps=3", f"parallel={layout}"],
                              cwd=tmp, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        out.append(d)
    return out


def _compare(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def _rows(md: str) -> dict[str, dict[str, str]]:
    """{run label: {column header: cell}} of the markdown table."""
    head, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return {cells[0]: dict(zip(head, cells)) for cells in rows}


def _assert_png(path: Path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), path


def test_table_and_charts_from_two_runs(runs, tmp_path):
    proc = _compare(*runs, "--out", tmp_path / "cmp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "cmp" / "compare.md").read_text()
    rows = _rows(md)
    assert list(rows) == ["single", "ep2"] and _rows(proc.stdout) == rows
    for d, name in zip(runs, rows):
        s = json.loads((d / "summary.json").read_text())
        row = rows[name]
        assert (row["world"], row["dp/ep/tp/pp"]) == (str(s["world_size"]), f"{s['dp']}/{s['ep']}/1/1")
        assert row["tokens/s"] == f"{s['median_tokens_per_s']:,.0f}" and row["final loss"] == f"{s['final_loss']:.4f}"
        assert row["step ms"] == f"{s['median_step_s'] * 1e3:.1f}"
        assert row[EXPERT] == f"{s['param_bytes_per_rank']['expert']['max'] / 2**20:.2f}"
        assert row["a2a %"] == f"{s['a2a_share'] * 100:.1f}"
    assert rows["single"]["ratio to single"] == "1.00" and rows["single"]["a2a %"] == "0.0"
    assert float(rows["ep2"][EXPERT]) == float(rows["single"][EXPERT]) / 2  # half the experts per rank
    for name in CHARTS:
        _assert_png(tmp_path / "cmp" / name)


def _add_phase_times(run: Path, *, in_summary: bool):
    """Phase times (seconds) as train.py is about to log them; the first record is warm-up."""
    s = json.loads((run / "summary.json").read_text())
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for r, step in zip(records, (1.0, 0.08, 0.12)):
        r["time"] = {"forward": 0.03, "backward": 0.04, "a2a": 0.01, "grad_reduce": 0.005, "optimizer": 0.005,
                     "step": step}
    for key in ("median_step_s", "time_breakdown", "a2a_share"):
        s.pop(key, None)
    if in_summary:  # preferred over the records; no pipeline/grad_reduce/optimizer here
        s["time_breakdown"], s["a2a_share"] = {"forward": 0.05, "backward": 0.1, "a2a": 0.04, "step": 0.2}, 0.25
    (run / "summary.json").write_text(json.dumps(s))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sweep_dir_is_expanded_and_phase_times_are_used(runs, tmp_path):
    sweep = tmp_path / "multirun" / "06-11-17"
    for i, (d, sub) in enumerate(zip(runs, ("a", "b"))):
        shutil.copytree(d, sweep / f"{i}_{sub}")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    _add_phase_times(sweep / "0_a", in_summary=True)
    _add_phase_times(sweep / "1_b", in_summary=False)
    proc = _compare(sweep, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = sweep / "compare"  # default --out for a sweep
    rows = _rows((out / "compare.md").read_text())
    assert list(rows) == ["single", "ep2"]
    assert [rows["single"][k] for k in PHASES] == ["200.0", "25.0", "50.0", "–", "–", "–", "25.0"]
    # From the records: medians over records 2..3 only (step 0.08, 0.12 -> 0.10 s), a2a 0.01 / 0.10.
    assert [rows["ep2"][k] for k in PHASES] == ["100.0", "30.0", "40.0", "–", "5.0", "5.0", "10.0"]
    for name in CHARTS:
        _assert_png(out / name)


def test_duplicate_layouts_are_told_apart_by_directory(runs, tmp_path):
    shutil.copytree(runs[0], tmp_path / "again")
    proc = _compare(runs[0], tmp_path / "again", "--out", tmp_path / "cmp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(_rows(proc.stdout)) == ["single (single)", "single (again)"]


@pytest.mark.parametrize("name", ["missing", "no_run"])
def test_bad_path_exits_2_with_one_line(runs, tmp_path, name):
    bad = tmp_path / name
    if name == "no_run":
        (bad / "0_a").mkdir(parents=True)  # a subdirectory, but no summary.json anywhere
    proc = _compare(runs[0], bad, cwd=tmp_path)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "compare").exists()
