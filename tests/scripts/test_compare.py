"""scripts/compare.py: on two real (tiny) train.py runs (table, charts, sweeps, errors), and on
fabricated run directories (fast, one process): step breakdowns that add up to the step,
percentages that add up to 100, a subtitle on every chart, coinciding loss curves named."""

import json
import shutil
import statistics
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tests.helpers import SMALL, yaml_alias_bomb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ("throughput.png", "step_breakdown.png", "memory.png", "a2a_share.png", "load_cv.png", "loss.png")
EXPERT = "expert param MiB/rank"
PHASES = ["step ms", "fwd %", "bwd %", "pipeline %", "grad reduce %", "optim %", "other %", "a2a %"]
PERCENT = ["fwd %", "bwd %", "pipeline %", "grad reduce %", "optim %", "other %"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real 3-step runs, single and ep2 (run one after the other: 2 cores)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = []
    for layout in ("single", "ep2"):
        d = tmp / layout
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                f"hydra.run.dir={d}",
                *SMALL,
                "trainer.steps=3",
                f"parallel={layout}",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr
        out.append(d)
    return out


def _compare(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rows(md: str) -> dict[str, dict[str, str]]:
    """{run label: {column header: cell}} of the markdown table."""
    head, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return {cells[0]: dict(zip(head, cells)) for cells in rows}


def _assert_png(path: Path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), path


@pytest.mark.slow
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
        r["time"] = {
            "forward": 0.03,
            "backward": 0.04,
            "a2a": 0.01,
            "grad_reduce": 0.005,
            "optimizer": 0.005,
            "step": step,
        }
    for key in ("median_step_s", "time_breakdown", "a2a_share"):
        s.pop(key, None)
    if in_summary:  # preferred over the records; no pipeline/grad_reduce/optimizer here
        s["time_breakdown"], s["a2a_share"] = {"forward": 0.05, "backward": 0.1, "a2a": 0.04, "step": 0.2}, 0.25
    (run / "summary.json").write_text(json.dumps(s))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
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
    assert [rows["single"][k] for k in PHASES] == ["200.0", "25.0", "50.0", "–", "–", "–", "25.0", "25.0"]
    # From the records: medians over records 2..3 only (step 0.08, 0.12 -> 0.10 s), a2a 0.01 / 0.10.
    assert [rows["ep2"][k] for k in PHASES] == ["100.0", "30.0", "40.0", "–", "5.0", "5.0", "20.0", "10.0"]
    for name in CHARTS:
        _assert_png(out / name)


@pytest.mark.slow
def test_duplicate_layouts_are_told_apart_by_directory(runs, tmp_path):
    shutil.copytree(runs[0], tmp_path / "again")
    proc = _compare(runs[0], tmp_path / "again", "--out", tmp_path / "cmp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(_rows(proc.stdout)) == ["single (single)", "single (again)"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["missing", "no_run"])
def test_bad_path_exits_2_with_one_line(runs, tmp_path, name):
    bad = tmp_path / name
    if name == "no_run":
        (bad / "0_a").mkdir(parents=True)  # a subdirectory, but no summary.json anywhere
    proc = _compare(runs[0], bad, cwd=tmp_path)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "compare").exists()


# ---- fabricated runs: fast, one process ----

from moemesh.runs import compare  # noqa: E402
from moemesh.runs import records as contract  # noqa: E402  (the metrics.jsonl contract)

NEST = ("forward", "backward", "pipeline")  # the phases a2a runs inside


def test_compare_reads_the_phases_train_py_writes():
    """compare.py imports the metrics.jsonl contract instead of restating it: its phases are
    the record's, and every phase (and "other") has its colour."""
    assert compare.PHASES is contract.PHASES and compare.A2A_PHASES is contract.A2A_PHASES
    assert set(compare.PHASE_COLORS) == {*contract.PHASES, compare.OTHER}
    assert set(contract.PHASES) | set(contract.A2A_TIMES) | {*contract.COMPUTE_TIMES, "step"} == set(contract.TIME_KEYS)


def _percent_sum(cells) -> Decimal:
    """The sum of the printed percentages, exactly as printed."""
    return sum((Decimal(c) for c in cells if c != compare.DASH), Decimal(0))


def _fake_run(d: Path, layout: str, *, losses, time=None, summary=None, model="tiny") -> Path:
    """A run directory as train.py leaves it: metrics.jsonl (one record per loss) and summary.json."""
    d.mkdir(parents=True)
    time = time or {
        "forward": 0.03,
        "backward": 0.04,
        "pipeline": 0.0,
        "a2a": 0.01,
        "grad_reduce": 0.005,
        "optimizer": 0.005,
        "step": 0.1,
    }
    records = [
        {"step": i, "loss": loss, "step_s": time["step"], "tokens_per_s": 256 / time["step"], "time": time}
        for i, loss in enumerate(losses)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = {
        "parallel": layout,
        "dp": 1,
        "ep": 1,
        "tp": 1,
        "pp": 1,
        "world_size": 1,
        "model": model,
        "steps": len(losses),
        "final_loss": losses[-1],
        "median_step_s": time["step"],
        "median_tokens_per_s": 256 / time["step"],
        "time_breakdown": time,
        "a2a_share": time["a2a"] / time["step"],
        "peak_memory_bytes": {"min": 2**20, "max": 2**20, "kind": "cpu_peak_rss"},
        "start_step": 0,
        **(summary or {}),
    }
    (d / "summary.json").write_text(json.dumps(s))
    return d


def _runs(*dirs) -> list:
    runs = [compare.load_run(d) for d in dirs]
    compare.assign_labels(runs)
    for r in runs:
        r.stats = compare.compute_stats(r)
    return runs


LOSS = [5.0 - 0.05 * i for i in range(40)]
# README's ep2_dp2 row: the phases (each the slowest rank's) add up to 104.5% of the step.
OVER = {
    "forward": 0.399,
    "backward": 0.414,
    "pipeline": 0.0,
    "a2a": 0.22,
    "grad_reduce": 0.126,
    "optimizer": 0.106,
    "step": 1.0,
}


@pytest.mark.parametrize("values", [[1, 1, 1], [0.399, 0.414, 0.126, 0.106], [2, 0, 1, 0, 7, 3], [1e-9, 1, 1e9]])
def test_largest_remainder_adds_up_to_exactly_100(values):
    pct = compare.largest_remainder(values)
    assert _percent_sum(f"{p:.1f}" for p in pct) == 100
    assert all(abs(p - 100 * v / sum(values)) < 0.1 for p, v in zip(pct, values))
    assert [f"{p:.1f}" for p in compare.largest_remainder([1, 1, 1])] == ["33.4", "33.3", "33.3"]


def test_breakdown_adds_phases_and_other_up_to_the_step_without_counting_a2a():
    b = compare.step_breakdown(
        {"forward": 0.03, "backward": 0.04, "a2a": 0.02, "grad_reduce": 0.005, "optimizer": 0.005, "step": 0.1}, 0.1
    )
    assert list(b.segments) == ["forward", "backward", "grad_reduce", "optimizer", "other"]  # a2a is nested
    assert sum(b.segments.values()) == pytest.approx(0.1) and b.segments["other"] == pytest.approx(0.02)
    assert not b.scaled and b.a2a_s == 0.02
    assert {k: f"{v:.1f}" for k, v in b.percent.items()} == {
        "forward": "30.0",
        "backward": "40.0",
        "grad_reduce": "5.0",
        "optimizer": "5.0",
        "other": "20.0",
    }


def test_breakdown_scales_phases_that_exceed_the_step():
    b = compare.step_breakdown(OVER, 1.0)
    assert b.scaled and b.phase_sum_share == pytest.approx(1.045) and b.scale == pytest.approx(1 / 1.045)
    assert sum(b.segments.values()) == pytest.approx(1.0) and b.segments["other"] == 0
    assert _percent_sum(f"{v:.1f}" for v in b.percent.values()) == 100
    assert b.a2a_s == pytest.approx(0.22 / 1.045)
    assert compare.step_breakdown({"step": 1.0}, 1.0) is None and compare.step_breakdown(OVER, None) is None


def test_table_percentages_add_up_to_100_and_scaling_is_said(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS)
    b = _fake_run(tmp_path / "b", "ep2_dp2", losses=[x + 0.1 for x in LOSS], time=OVER)
    compare.main([str(a), str(b), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert _rows((tmp_path / "cmp" / "compare.md").read_text()) == rows
    for row in rows.values():
        assert _percent_sum(row[k] for k in PERCENT) == 100
    assert [rows["ep2"][k] for k in PERCENT] == ["30.0", "40.0", "0.0", "5.0", "5.0", "20.0"]
    assert rows["ep2_dp2"]["other %"] == "0.0" and rows["ep2_dp2"]["a2a %"] == "22.0"  # a2a: raw share, nested
    assert "ep2_dp2: the phases (each the slowest rank's median) add up to 104.5% of the step" in out
    assert "ep2: " not in out.replace("ep2: the", "")  # only the run that overshoots is scaled
    assert "coincide" not in out
    for name in ("throughput.png", "step_breakdown.png", "a2a_share.png", "loss.png"):
        _assert_png(tmp_path / "cmp" / name)
    assert "skipped load_cv.png" in out  # no load statistics in these records


def _bar_sums(ax, keys) -> list[float]:
    """Per bar, the heights of the stacked containers labelled with one of `keys`."""
    conts = [c for c in ax.containers if c.get_label() in keys]
    return [sum(c.patches[i].get_height() for c in conts) for i in range(len(conts[0].patches))]


def test_step_breakdown_chart_segments_add_up_to_the_step(tmp_path):
    import matplotlib.pyplot as plt

    x = _runs(_fake_run(tmp_path / "x", "x", losses=LOSS))[0]
    slower = {k: 8 * v for k, v in compare.time_breakdown(x).items()}
    runs = _runs(
        _fake_run(tmp_path / "a", "ep2", losses=LOSS, time=slower),
        _fake_run(tmp_path / "b", "ep2_dp2", losses=LOSS, time=OVER),
    )
    fig, skipped = compare.draw("step_breakdown.png", runs)
    try:
        ax = fig.axes[0]
        assert skipped is None
        assert _bar_sums(ax, (*compare.PHASES, compare.OTHER)) == pytest.approx([800.0, 1000.0])  # ms
        # The a2a overlay starts at 0 and stays within forward + backward (+ pipeline).
        a2a = next(c for c in ax.containers if c.get_label().startswith("a2a"))
        assert [p.get_y() for p in a2a.patches] == [0, 0]
        assert [p.get_height() for p in a2a.patches] == pytest.approx([80.0, 220 / 1.045])
        assert all(h <= s + 1e-9 for h, s in zip([p.get_height() for p in a2a.patches], _bar_sums(ax, NEST)))
        texts = [t.get_text() for t in ax.texts]
        assert "30.0%" in texts and "20.0%" in texts and "phases ×0.96" in " ".join(texts)
        shares = {f"{v:.1f}%" for r in runs for v in r.stats["breakdown"].percent.values()}
        assert {t for t in texts if t.endswith("%")} <= shares  # the labels are the table's shares
    finally:
        plt.close(fig)


def test_every_chart_has_a_subtitle_with_model_steps_and_machine(tmp_path):
    import matplotlib.pyplot as plt

    runs = _runs(_fake_run(tmp_path / "a", "ep2", losses=LOSS), _fake_run(tmp_path / "b", "dp2", losses=LOSS))
    sub = compare.chart_subtitle(runs)
    assert sub == "model tiny · 40 steps · machine: unknown (CPU run)"  # not recorded: not guessed
    for r in runs:
        r.stats["state"] = {k: 2**20 for k in r.stats["state"]}
        r.stats["cv"], r.stats["peak"] = {1: 0.5}, 2**20
    for name in compare.CHARTS:
        fig, skipped = compare.draw(name, runs)
        try:
            assert skipped is None and fig.get_suptitle() == sub, name
        finally:
            plt.close(fig)


def test_subtitle_uses_the_recorded_machine_and_names_differences(tmp_path):
    a = _fake_run(
        tmp_path / "a",
        "ep2",
        losses=LOSS,
        summary={"machine": {"hostname": "node7", "device": "NVIDIA H200", "count": 8}},
    )
    b = _fake_run(
        tmp_path / "b",
        "dp2",
        losses=LOSS[:10],
        model="small",
        summary={"machine": "node7, 8 × NVIDIA H200", "start_step": 30},
    )
    c = _fake_run(tmp_path / "c", "dp4", losses=LOSS, summary={"peak_memory_bytes": {"max": 1}})
    sub = compare.chart_subtitle(_runs(a, b, c))
    assert sub == (
        "model tiny (ep2, dp4); model small (dp2) · 40 steps (ep2, dp4); steps 30–40 (dp2) · "
        "machine: node7, 8 × NVIDIA H200 (ep2, dp2); machine: unknown (dp4)"
    )


def test_coinciding_loss_curves_are_named_on_the_chart_and_stdout(tmp_path, capsys):
    import matplotlib.pyplot as plt

    a = _fake_run(tmp_path / "a", "ep2_dp2", losses=LOSS)
    b = _fake_run(tmp_path / "b", "dp4", losses=[x + 3e-6 * (i % 2) for i, x in enumerate(LOSS)])
    c = _fake_run(tmp_path / "c", "ep4", losses=[x + 0.01 for x in LOSS])
    d = _fake_run(tmp_path / "d", "tp2", losses=LOSS[:20])  # identical on its 20 steps
    runs = _runs(a, b, c, d)
    assert compare.coinciding_losses(runs) == [(["ep2_dp2", "dp4", "tp2"], pytest.approx(3e-6), 20)]
    note = "ep2_dp2, dp4 and tp2 coincide (max |Δ| 3e-06 over 20 common steps)"
    assert compare.coincidence_notes(compare.coinciding_losses(runs)) == [note]
    assert compare.coinciding_losses(runs, tol=1e-6) == [(["ep2_dp2", "tp2"], 0.0, 20)]
    assert compare.coinciding_losses(runs, tol=0.1)[0][0] == ["ep2_dp2", "dp4", "ep4", "tp2"]

    fig, _ = compare.draw("loss.png", runs)
    try:
        ax = fig.axes[0]
        assert any(note in t.get_text() for t in ax.texts)
        styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
        assert len(set(styles)) == 4  # every curve drawn its own way: none hides another
    finally:
        plt.close(fig)

    compare.main([str(a), str(b), str(c), str(d), "--out", str(tmp_path / "cmp")])
    assert f"loss: {note}" in capsys.readouterr().out
    assert note in (tmp_path / "cmp" / "compare.md").read_text()


def test_a_chain_of_close_curves_is_no_group(tmp_path):
    """Runs were grouped by chains of close pairs: a, b, c each 0.6e-4 from the next were one
    group "coinciding" with a max |Δ| of 1.2e-4, over the 1e-4 tolerance (on benchmarks/data's
    b16 sweep, six runs at 0.0002). In a group every two runs are within the tolerance now."""
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS)
    b = _fake_run(tmp_path / "b", "dp2", losses=[x + 0.6e-4 for x in LOSS])
    c = _fake_run(tmp_path / "c", "ep4", losses=[x + 1.2e-4 for x in LOSS])
    d = _fake_run(tmp_path / "d", "tp2", losses=[x + 1.25e-4 for x in LOSS])
    groups = compare.coinciding_losses(_runs(a, b, c, d))
    assert [labels for labels, _, _ in groups] == [["ep2", "dp2"], ["ep4", "tp2"]]
    assert all(diff < compare.COINCIDE_TOL for _, diff, _ in groups)


def test_different_loss_curves_do_not_coincide(tmp_path):
    import matplotlib.pyplot as plt

    runs = _runs(
        _fake_run(tmp_path / "a", "ep2", losses=LOSS),
        _fake_run(tmp_path / "b", "dp2", losses=[x + 1e-3 for x in LOSS]),
        _fake_run(tmp_path / "c", "ep4", losses=LOSS[::-1]),
    )
    assert compare.coinciding_losses(runs) == []
    fig, _ = compare.draw("loss.png", runs)
    try:
        assert not any("coincide" in t.get_text() for t in fig.axes[0].texts)
    finally:
        plt.close(fig)


def test_run_name_tells_modes_of_one_layout_apart():
    assert compare.run_name({"parallel": "ep2_dp2", "sharding": "zero3", "activation_checkpointing": "full"}, "d") == (
        "ep2_dp2 zero3+full"
    )
    assert compare.run_name(
        {"parallel": "ep2_dp2", "sharding": "none", "activation_checkpointing": "selective"}, "d"
    ) == ("ep2_dp2 ckpt-selective")
    assert compare.run_name({"parallel": "ep2_dp2", "sharding": "zero2", "activation_checkpointing": "none"}, "d") == (
        "ep2_dp2 zero2"
    )
    assert compare.run_name({"parallel": "ep4"}, "d") == "ep4"  # summaries from before these keys
    assert compare.run_name({}, "run-dir") == "run-dir"


def test_a_run_whose_summary_has_no_breakdown_takes_it_from_records_lacking_values(tmp_path, capsys):
    """A summary.json without time_breakdown (a partial one) sends compare.py to the records'
    medians; records whose a2a bytes, samples/s or flops/s the reader dropped (a NaN, a string)
    or never had made it die with KeyError 'a2a'. Each median now skips what a step lacks."""
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS)
    s = json.loads((a / "summary.json").read_text())
    del s["time_breakdown"], s["a2a_share"]
    (a / "summary.json").write_text(json.dumps(s))
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):
        r["a2a"] = {"bytes_sent": "NaN" if i % 3 == 0 else 1000 * i}
        if i % 2:
            r["samples_per_s"] = 8.0
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run,) = _runs(a)
    steady = [r for r in records if r["step"] > 0][1:]  # after start_step 0, past the warm-up record
    med = run.medians()
    assert med["a2a_bytes_sent_per_step"] == statistics.median(
        r["a2a"]["bytes_sent"] for r in steady if r["a2a"]["bytes_sent"] != "NaN"
    )
    assert med["median_samples_per_s"] == 8.0 and med["median_flops_per_s"] is None and med["mfu"] is None
    assert med["a2a_share"] == pytest.approx(0.1) and med["time_breakdown"]["step"] == pytest.approx(0.1)
    compare.main([str(a), "--out", str(tmp_path / "cmp")])
    assert _rows(capsys.readouterr().out)["ep2"]["a2a %"] == "10.0"


def test_values_of_the_wrong_type_are_dropped_and_bad_lines_counted(tmp_path, capsys):
    """summary.json and metrics.jsonl are untrusted: a string where a number belongs is read as
    not recorded (the median comes from the records instead), a line that is not a JSON object is
    skipped and counted, and the comparison still runs."""
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS, summary={"median_tokens_per_s": "fast", "dp": "x"})
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "loss": "abc", "step_s": true}\nnot json\n[1, 2]\n')
    runs = _runs(a)
    assert "median_tokens_per_s" not in runs[0].summary and runs[0].records[-1] == {"step": 40}
    assert runs[0].stats["tps"] == pytest.approx(2560) and runs[0].skipped_lines == [42, 43]
    compare.main([str(a), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert _rows(out)["ep2"]["tokens/s"] == "2,560" and _rows(out)["ep2"]["dp/ep/tp/pp"] == "?/1/1/1"
    assert "ep2: 2 line(s) of metrics.jsonl not a JSON record, skipped (line 42, 43)" in out


def test_a_sweeps_failed_and_unreadable_jobs_are_named_and_the_rest_compared(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0_ep2", "ep2", losses=LOSS)
    (sweep / "1_dp2" / ".hydra").mkdir(parents=True)  # failed: no summary.json
    (sweep / "1_dp2" / "train.log").write_text("")
    _fake_run(sweep / "2_ep4", "ep4", losses=LOSS)
    (sweep / "2_ep4" / "summary.json").write_text("{cut")
    stopped = {"stopped_by_signal": ["SIGTERM"], "start_step": 0, "steps": 12}
    _fake_run(sweep / "3_ep2_dp2", "ep2_dp2", losses=LOSS[:12], summary=stopped)
    (sweep / "multirun.yaml").write_text("")
    compare.main([str(sweep)])
    out = capsys.readouterr().out
    assert list(_rows(out)) == ["ep2", "ep2_dp2"]
    assert f"{sweep / '1_dp2'}: left out: no summary.json, the job failed or has not finished" in out
    assert f"{sweep / '2_ep4'}: left out: " in out and "not JSON" in out
    assert "ep2_dp2: stopped by SIGTERM after step 12, not finished" in out
    assert "compare: left out" not in out  # its own output directory is not a job


def test_runs_of_one_name_are_told_apart_by_the_overrides_that_differ(tmp_path):
    dirs = []
    for i, lr in enumerate(("1e-3", "3e-3")):
        d = _fake_run(tmp_path / f"{i}_ep2", "ep2", losses=LOSS)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- parallel=ep2\n- trainer.steps=40\n- trainer.lr={lr}\n")
        dirs.append(d)
    same = _fake_run(tmp_path / "x" / "0_ep2", "ep2", losses=LOSS)  # no overrides: its path tells it apart
    assert [r.label for r in _runs(*dirs)] == ["ep2 (trainer.lr=1e-3)", "ep2 (trainer.lr=3e-3)"]
    assert [r.label for r in _runs(dirs[0], same)] == [f"ep2 ({tmp_path.name}/0_ep2)", "ep2 (x/0_ep2)"]


def test_a_key_given_twice_labels_the_run_by_the_value_it_used(tmp_path):
    """`trainer.lr=1e-3 ... trainer.lr=2e-3` trains at 2e-3 (Hydra takes the last); the label
    showed both values, so a reader saw 1e-3 for a run trained at 2e-3."""
    dirs = []
    for i, given in enumerate(("- trainer.lr=1e-3\n- trainer.lr=2e-3\n", "- trainer.lr=1e-3\n")):
        d = _fake_run(tmp_path / f"{i}_ep2", "ep2", losses=LOSS)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- parallel=ep2\n{given}")
        dirs.append(d)
    assert [r.label for r in _runs(*dirs)] == ["ep2 (trainer.lr=2e-3)", "ep2 (trainer.lr=1e-3)"]


def _multirun(
    sweep: Path,
    task: list[str],
    sweeper: str = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    subdir: str = "${hydra.job.num}_${parallel.name}",
):
    import yaml

    cfg = {
        "hydra": {
            "sweeper": {"_target_": sweeper},
            "sweep": {"subdir": subdir},
            "overrides": {"task": task},
        }
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(cfg))


def test_jobs_a_stopped_sweep_never_started_are_named(tmp_path, capsys):
    """A sweep a signal stopped after its first jobs never starts the others: they left no
    directory, so compare.py said nothing of them and the table looked like the whole sweep."""
    from moemesh.runs.reader import jobs_never_started

    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0_ep2", "ep2", losses=LOSS)
    _fake_run(sweep / "1_dp2", "dp2", losses=LOSS)
    _multirun(sweep, ["parallel=ep2,dp2,ep4", "trainer.lr=1e-3,'2e-3'", "data.sources=[{path: a, weight: 1}]"])
    assert jobs_never_started(sweep) == (6, [2, 3, 4, 5])
    compare.main([str(sweep), "--out", str(tmp_path / "cmp")])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"{sweep}: 4 of its 6 jobs left no directory (#2, #3, #4, #5), so are not compared: still queued" in md
    # range() and choice() count as Hydra counts them; what it cannot count, and other sweepers, say nothing
    for task, want in [
        (["trainer.seed=range(0,3)", "parallel=choice(ep2,dp2)"], (6, [2, 3, 4, 5])),
        (["trainer.seed=range(2)"], (2, [])),
        (["trainer.lr=interval(0,1)"], None),
        (["trainer.lr='1,2"], None),
    ]:
        _multirun(sweep, task)
        assert jobs_never_started(sweep) == want, task
    _multirun(sweep, ["parallel=ep2,dp2,ep4"], sweeper="hydra_plugins.moemesh_layouts.sweeper.LayoutSweeper")
    assert jobs_never_started(sweep) is None
    _multirun(sweep, ["parallel=ep2,dp2,ep4"], subdir="${parallel.name}_${hydra.job.num}")  # not by number first
    assert jobs_never_started(sweep) is None
    # A YAML alias bomb (784 bytes that str() expanded to 10^12 nodes: compare hung at 1.5 GB and
    # growing) is not read; a directory named by a digit int() refuses ("²") is not a job number.
    bomb = yaml_alias_bomb() + "hydra: {sweeper: {_target_: *a11}, sweep: {subdir: x}, overrides: {task: []}}\n"
    (sweep / "multirun.yaml").write_text(bomb)
    assert jobs_never_started(sweep) is None
    _multirun(sweep, ["parallel=ep2,dp2,ep4"])
    (sweep / "²_x").mkdir()
    assert jobs_never_started(sweep) == (3, [2])


def test_an_out_directory_that_cannot_be_written_is_one_line(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(a), "--out", str(tmp_path / "file" / "cmp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"compare.py: --out {tmp_path / 'file' / 'cmp'}")
    )


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        (["--out", ""], "argument --out: an empty path; give a directory"),  # Path("") wrote into the cwd
        (["--coincide-tol", "nan"], "argument --coincide-tol: nan must be a finite number >= 0"),
        (["--coincide-tol", "-1"], "argument --coincide-tol: -1 must be a finite number >= 0"),
        (["--coincide-tol", "x"], "argument --coincide-tol: 'x' is not a number"),
        (["--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, monkeypatch, flag, says):
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(a), *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"compare.py: {says}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_phases_a_hair_over_the_step_are_scaled_without_a_note(tmp_path):
    hair = {**OVER, "forward": 0.3, "backward": 0.4, "grad_reduce": 0.2, "optimizer": 0.1002}  # 100.02%
    runs = _runs(_fake_run(tmp_path / "a", "ep2", losses=LOSS, time=hair))
    assert runs[0].stats["breakdown"].scaled and compare.scaled_notes(runs) == []


def test_conform_drops_a_mistyped_list_whole_and_a_huge_int():
    from moemesh.runs.reader import conform
    from moemesh.runs.records import StepRecord

    record = {"step": 3, "loss": 10**400, "load": {"layer0": {"tokens_per_expert": [4, "x", 6], "cv": 0.5}}}
    assert conform(record, StepRecord) == {"step": 3, "load": {"layer0": {"cv": 0.5}}}

    # A list of numbers is all or nothing: a bool, a fraction among counts, a nan or a huge int drops it.
    def load(**layer):
        return conform({"load": {"layer0": layer}}, StepRecord)["load"]["layer0"]

    for bad in ([4, True, 6], [4, 5.5], [4, 10**400]):
        assert load(tokens_per_expert=bad) == {}, bad
    assert load(mean_score=[0.5, float("nan")]) == {}
    good = {"tokens_per_expert": [4, 5.0, 6], "mean_score": [0.5, 1]}  # a whole float counts; an int is a float
    assert load(**good) == good


def test_memory_values_of_the_wrong_shape_are_dropped(tmp_path, capsys):
    """memory_per_rank was typed a plain dict, so a list inside it reached compare.py, which
    crashed (AttributeError: 'list' object has no attribute 'get'). Its parts are typed now:
    a wrongly shaped one is read as not recorded and the comparison runs."""
    split = {"expert": {"min": 3 * 2**20, "max": 3 * 2**20}, "non_expert": {"min": 2**20, "max": 2**20}}
    memory = {
        "param_bytes": [1, 2],
        "grad_bytes": split,
        "optimizer_bytes": {"expert": "x", "non_expert": split["non_expert"]},
    }
    memory |= {"peak_bytes": {"min": 1, "max": "big"}, "peak_above_start_bytes": 7}
    bad = {"memory_per_rank": memory, "param_bytes_per_rank": split, "peak_memory_bytes": {"max": 2**21, "kind": 5}}
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS, summary=bad)
    (run,) = _runs(a)
    assert run.summary["memory_per_rank"] == {
        "grad_bytes": split,
        "optimizer_bytes": {"non_expert": split["non_expert"]},
        "peak_bytes": {"min": 1},
    }
    assert run.summary["peak_memory_bytes"] == {"max": 2**21}
    assert compare.max_bytes(run.summary, "param_bytes", "expert") == 3 * 2**20  # the older key's
    assert compare.max_bytes(run.summary, "optimizer_bytes", "expert") is None
    compare.main([str(a), "--out", str(tmp_path / "cmp")])
    assert "ep2" in _rows(capsys.readouterr().out)


def test_a_sweep_of_symlinked_runs_is_read(tmp_path):
    a = _fake_run(tmp_path / "runs" / "a", "ep2", losses=LOSS)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "0_ep2").symlink_to(a)
    assert compare.expand([tmp_path / "sweep"]) == [tmp_path / "sweep" / "0_ep2"]


def test_a_sweeps_value_counts_take_a_range_step():
    from moemesh.runs.reader import _values

    assert [_values(v) for v in ("range(0,10,2)", "range(10,0,-3)", "range(5)", "a,b")] == [5, 4, 5, 2]
    assert [_values(v) for v in ("[a,b", "[a,b],c", "{x: 1, y: 2}")] == [None, 2, 1]  # unclosed: not counted


def test_an_integer_field_is_refused_a_fraction():
    from moemesh.runs.reader import _MISSING, conform

    assert conform(1.5, int) is _MISSING and conform(2.0, int) == 2.0 and conform(3, int) == 3
    assert conform({"step": 2.5, "loss": 1.5}, contract.StepRecord) == {"loss": 1.5}


def test_a_sweep_expands_in_job_number_order_and_names_only_job_directories(tmp_path):
    from moemesh.runs.reader import expand

    sweep = tmp_path / "sweep"
    for n in (10, 2, 1):
        _fake_run(sweep / f"{n}_ep2", "ep2", losses=LOSS)
    (sweep / "3_dp2" / ".hydra").mkdir(parents=True)  # a job that failed: no summary.json
    (sweep / "cmp").mkdir()  # an output directory, not a job
    unfinished = []
    assert [d.name for d in expand([sweep], unfinished)] == ["1_ep2", "2_ep2", "10_ep2"]
    assert [d.name for d in unfinished] == ["3_dp2"]


def test_curves_exactly_tol_apart_do_not_coincide(tmp_path):
    from moemesh.runs.reader import load_run

    a = load_run(_fake_run(tmp_path / "a", "ep2", losses=[2.0, 1.5]))
    b = load_run(_fake_run(tmp_path / "b", "dp2", losses=[2.5, 1.5]))
    a.label, b.label = "a", "b"
    assert compare.coinciding_losses([a, b], tol=0.5) == []  # "closer than tol": 0.5 is not
    assert compare.coinciding_losses([a, b], tol=0.75)[0][:2] == (["a", "b"], 0.5)
    same = load_run(_fake_run(tmp_path / "c", "dp2", losses=[2.0, 1.5]))
    same.label = "c"
    assert compare.coinciding_losses([a, same], tol=0.0) == []  # --coincide-tol 0: nothing coincides


def test_an_appended_override_counts_as_the_key_it_sets():
    assert compare._effective(["+trainer.x=1", "trainer.x=2", "hydra.run.dir=d", "parallel=ep2"]) == {"trainer.x=2"}


def test_exactly_eight_jobs_never_started_are_all_named(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0_ep2", "ep2", losses=LOSS)
    _multirun(sweep, ["trainer.seed=range(9)"])
    (note,) = compare.never_started_notes([sweep])
    assert "8 of its 9 jobs left no directory (#1, #2, #3, #4, #5, #6, #7, #8), so" in note
    _multirun(sweep, ["trainer.seed=range(10)"])
    (note,) = compare.never_started_notes([sweep])
    assert "(#1, #2, #3, #4, #5, #6, #7, #8, ...)" in note


def test_the_table_is_relative_to_the_first_run_in_its_units(tmp_path, capsys):
    """tokens/s as a ratio to the first run named (not the fastest, not the last), step in ms,
    memory in MiB (2^20 bytes), expert and non-expert parameters each in their own column."""
    split = {"expert": {"min": 3 * 2**20, "max": 3 * 2**20}, "non_expert": {"min": 2**19, "max": 2**19}}
    memory = {"peak_memory_bytes": {"min": 1, "max": 3 << 30, "kind": "cpu_peak_rss"}, "param_bytes_per_rank": split}
    slow = _fake_run(tmp_path / "a", "ep2", losses=LOSS, time={**OVER, "step": 0.2}, summary=memory)
    fast = _fake_run(tmp_path / "b", "dp2", losses=LOSS)
    compare.main([str(slow), str(fast), "--out", str(tmp_path / "cmp")])
    rows = _rows(capsys.readouterr().out)
    cells = ["tokens/s", "ratio to ep2", "step ms", "peak MiB/rank", EXPERT, "non-expert param MiB/rank"]
    assert [rows["ep2"][k] for k in cells] == ["1,280", "1.00", "200.0", "3,072", "3.00", "0.50"]
    assert [rows["dp2"][k] for k in cells] == ["2,560", "2.00", "100.0", "1", "–", "–"]


def test_summary_medians_are_preferred_to_the_records_and_an_even_count_averages(tmp_path):
    """summary.json's time_breakdown and median tokens/s are the run's own (over every logged
    step, however long the run); the records are read only where the summary has none, and then
    the median of an even number of steady steps is the mean of the middle two."""
    own = {**OVER, "step": 2.0}
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS, summary={"time_breakdown": own})
    (run,) = _runs(a)
    assert compare.time_breakdown(run) == own and run.stats["breakdown"].step_s == 2.0

    b = _fake_run(tmp_path / "b", "dp2", losses=LOSS[:6])
    s = json.loads((b / "summary.json").read_text())
    for key in ("median_tokens_per_s", "median_step_s", "time_breakdown"):
        del s[key]
    (b / "summary.json").write_text(json.dumps(s))
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    for r, step_s in zip(records, (7.0, 9.0, 1.0, 2.0, 4.0, 8.0)):  # steps 0 and 1 (the warm-up) are not steady
        r["step_s"], r["tokens_per_s"] = step_s, 256 / step_s
        r |= {"a2a": {"bytes_sent": 0}, "samples_per_s": 1.0, "flops_per_s": 1.0}  # what the medians read
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run,) = _runs(b)
    assert run.stats["tps"] == (256 / 2 + 256 / 4) / 2 and run.stats["step"] == 0.1  # time.step: 0.1 throughout


def test_blank_lines_of_metrics_jsonl_are_not_counted_as_bad(tmp_path):
    a = _fake_run(tmp_path / "a", "ep2", losses=LOSS[:3])
    text = (a / "metrics.jsonl").read_text()
    (a / "metrics.jsonl").write_text("\n" + text.replace("\n", "\n\n", 1) + "  \nnot json\n")
    (run,) = _runs(a)
    assert [r["step"] for r in run.records] == [0, 1, 2] and run.skipped_lines == [7]
