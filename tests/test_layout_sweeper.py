"""``python train.py -m hydra/sweeper=layouts``: bad keys stop it before anything runs; a real 4-rank
sweep of a tiny model tables what its runs' own files say, survives a crashed job and resumes."""

import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]

from moemesh.config.cli import compose_run  # noqa: E402
from moemesh.planning import search  # noqa: E402
from moemesh.planning.cost import make_plan  # noqa: E402

SWEEP = ["-m", "hydra/sweeper=layouts", "cluster.gpus=4", *SMALL, "trainer.steps=4", "logger.console=false"]
SWEEP += ["checkpoint.save_final=false", "hydra.sweeper.warmup_steps=1"]


def _train(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# Settings are checked one by one in tests/scripts/test_layout_search.py; here, that each kind of
# mistake stops train.py with one line before a directory exists: a key Hydra's schema refuses, a
# value the search refuses, a layout that is no split of cluster.gpus, a swept key.
@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.sweeper.top=abc", "hydra.sweeper.top=abc: expected an integer"),
        ("hydra.sweeper.objective=mfu", "hydra.sweeper.objective=mfu: expected one of tokens_per_s, step_s"),
        ("hydra.sweeper.include=[ep8]", "ep8: not a valid split of cluster.gpus=4 for this model (valid: "),
        ("parallel.expert_parallel_size=1,2", "hydra/sweeper=layouts chooses the layouts itself"),
        ("parallel=ep4", "parallel=ep4: hydra/sweeper=layouts chooses each job's layout itself; to measure only"),
    ],
)
def test_bad_sweep_keys_are_one_line_before_anything_runs(tmp_path, override, message):
    sweep = tmp_path / "sweep"
    proc = _train(*SWEEP, override, f"hydra.sweep.dir={sweep}", 'hydra.sweeper.exclude=["tp>2"]', timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not sweep.exists()


@pytest.mark.slow
def test_more_gpus_than_the_planner_splits_is_one_line(tmp_path):
    """cluster.gpus=2^40 scanned every integer up to it (killed at 40 s): now refused at once."""
    sweep = tmp_path / "sweep"
    proc = _train("-m", "hydra/sweeper=layouts", "cluster.gpus=1099511627776", f"hydra.sweep.dir={sweep}", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "moemesh: config error: cluster.gpus=1099511627776 is more than the planner splits (1,048,576, 2^20)"
    ], proc.stderr
    assert not sweep.exists()


def _expected_order(top: int) -> list[str]:
    run = compose_run([*SMALL, "cluster.gpus=4", "trainer.device=cpu"])
    valid, _ = make_plan(run, 4)
    return [c.name for c in search.choose(valid, search.settings(top=top)).chosen]


def _check_table_against_runs(sweep: Path, names: list[str], failed: set[str]) -> dict:
    table = json.loads((sweep / "layouts.json").read_text())
    jobs = table["jobs"]
    assert [j["layout"] for j in jobs] == names
    for j in jobs:
        d = Path(j["dir"])
        assert d.parent == sweep
        if j["layout"] in failed:
            assert j["error"] and j["measured_rank"] is None
            continue
        assert j["error"] is None, j
        summary = json.loads((d / "summary.json").read_text())
        records = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["step"] > 1]  # warmup_steps=1
        assert summary["parallel"] == j["layout"] and summary["world_size"] == 4
        assert {a: summary[a] for a in ("dp", "ep", "tp", "pp")} == j["dims"]
        assert j["final_loss"] == summary["final_loss"]
        assert j["peak_memory_bytes"] == summary["peak_memory_bytes"]["max"]
        assert j["step_s"] == statistics.median(r["step_s"] for r in timed)
        assert j["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in timed)
        assert j["a2a_share"] == statistics.median(r["time"]["a2a"] / r["time"]["step"] for r in timed)
        assert (j["a2a_share"] > 0) == (summary["ep"] > 1)
    done = sorted((j for j in jobs if j["error"] is None), key=lambda j: -j["tokens_per_s"])
    assert [j["measured_rank"] for j in done] == list(range(1, len(done) + 1))
    by_prediction = sorted(done, key=lambda j: j["predicted_step_s"])
    assert [j["predicted_rank"] for j in by_prediction] == list(range(1, len(done) + 1))
    return {j["layout"]: j for j in jobs}


@pytest.mark.slow
def test_four_rank_sweep_tables_its_runs_survives_a_crash_and_resumes(tmp_path):
    names = _expected_order(top=4)
    assert len(names) == 4
    sweep = tmp_path / "sweep"
    # Job #1 crashes: its rank 0 cannot create metrics.jsonl (a directory is in the way).
    (sweep / f"1_{names[1]}" / "metrics.jsonl").mkdir(parents=True)
    proc = _train(*SWEEP, "hydra.sweeper.top=4", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the table ranks the rest
    jobs = _check_table_against_runs(sweep, names, failed={names[1]})
    assert f"job #1 ({names[1]}) failed: " in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"moemesh: 1 of 4 jobs failed: #1 ({names[1]}); ")
    reason = jobs[names[1]]["error"]
    assert "\n" not in reason and ("metrics.jsonl" in reason or "IsADirectory" in reason), reason
    # The printed table is layouts.md's; the winner's command trains the winner with the same overrides.
    md = (sweep / "layouts.md").read_text()
    assert md.splitlines()[0] in proc.stdout and f"| {names[1]} |" in md and reason in md
    best = min((j for j in jobs.values() if j["measured_rank"]), key=lambda j: j["measured_rank"])
    assert f"winner by tokens_per_s: {best['layout']}; train with it:" in proc.stdout
    cmd = shlex.split(next(l for l in proc.stdout.splitlines() if l.startswith("  python train.py")))
    assert f"parallel.name={best['layout']}" in cmd and "trainer.steps=4" in cmd and "cluster.gpus=4" in cmd
    assert all(not a.startswith("hydra") for a in cmd[2:])
    assert (sweep / "compare" / "throughput.png").is_file() and (sweep / "compare" / "compare.md").is_file()
    # compare.py labels each run by the layout the sweep generated (parallel.name, no preset file).
    compared = (sweep / "compare" / "compare.md").read_text()
    assert all(f"| {n} |" in compared for n in names if n != names[1]), compared

    # Restarted with the same sweep dir (as after an interruption): only the job without a
    # finished summary (the crashed one, its obstacle gone) runs again.
    (sweep / f"1_{names[1]}" / "metrics.jsonl").rmdir()
    before = {n: (sweep / f"{i}_{n}" / "summary.json").stat().st_mtime_ns for i, n in enumerate(names) if i != 1}
    proc = _train(*SWEEP, "hydra.sweeper.top=4", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, n in enumerate(names):
        if i != 1:
            assert f"job #{i} ({n}): finished before" in proc.stdout
            assert (sweep / f"{i}_{n}" / "summary.json").stat().st_mtime_ns == before[n]
    assert "finished before" not in "".join(l for l in proc.stdout.splitlines() if f"({names[1]})" in l)
    _check_table_against_runs(sweep, names, failed=set())


@pytest.mark.slow
def test_sweep_through_the_slurm_launcher(tmp_path):
    """cluster=slurm: the same sweeper submits each layout as a SLURM job (one task per rank)
    through hydra_plugins/moemesh_launcher, then tables what the jobs wrote. One job crashes: the
    launcher exits non-zero after both ran; the crash is that job's row, the sweep ranks the other,
    and exits 1."""
    import os

    if not os.environ.get("SLURM_CONF"):
        if os.environ.get("MOEMESH_REQUIRE_SLURM") == "1":
            pytest.fail("MOEMESH_REQUIRE_SLURM=1 but SLURM_CONF is unset")
        pytest.skip("no SLURM here: SLURM_CONF is unset (bash .ci/slurm/up.sh starts a local one; .ci/run does)")
    drop = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    sweep = tmp_path / "sweep"
    slurm = ["cluster=slurm", "cluster.slurm.request_gpus=false", "cluster.slurm.time_min=10"]
    sweep_args = [a if a != "cluster.gpus=4" else "cluster.gpus=2" for a in SWEEP]
    run = compose_run([*SMALL, "cluster.gpus=2", "trainer.device=cpu"])
    valid, _ = make_plan(run, 2)
    names = [c.name for c in search.choose(valid, search.settings(top=2)).chosen]
    (sweep / f"1_{names[1]}" / "metrics.jsonl").mkdir(parents=True)  # job #1's rank 0 cannot write it
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *sweep_args,
            *slurm,
            "hydra.sweeper.top=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.count(": SLURM job ") == 2
    table = json.loads((sweep / "layouts.json").read_text())
    ok, crashed = table["jobs"]
    assert [ok["layout"], crashed["layout"]] == names
    summary = json.loads((Path(ok["dir"]) / "summary.json").read_text())
    assert ok["error"] is None and ok["final_loss"] == summary["final_loss"] and summary["world_size"] == 2
    reason = crashed["error"]
    assert reason.startswith("SLURM job ") and ("metrics.jsonl" in reason or "IsADirectory" in reason), reason
    assert crashed["measured_rank"] is None and "\n" not in reason
    assert f"job #1 ({names[1]}) failed: {reason}; the sweep goes on" in proc.stderr
    assert f"job #0 ({names[0]}) failed" not in proc.stderr
    assert f"winner by tokens_per_s: {names[0]}" in proc.stdout


# ---- a failed job's reason, from each kind of launcher (no ranks: launchers that report) ----------
class _Launcher:
    def __init__(self, launch):
        self.launch = launch


def _sweeper(launch):
    from hydra_plugins.moemesh_layouts.sweeper import LayoutSweeper

    sweeper = LayoutSweeper()
    sweeper.launcher = _Launcher(launch)
    return sweeper


def test_a_job_that_runs_out_of_memory_is_its_row_with_the_error():
    """The basic launcher runs a job in this process and returns its exception: out of memory on
    a GPU is torch.OutOfMemoryError, whose first line is the row's reason."""
    import torch
    from hydra.core.utils import JobReturn, JobStatus

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has 79.1 GiB in use")

    def launch(overrides, initial_job_idx):
        return [JobReturn(status=JobStatus.FAILED, _return_value=oom)]

    reasons = _sweeper(launch)._launch([2], [["parallel.name=ep4"]], lambda i: False)
    assert reasons == {2: "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB."}


def test_a_launcher_that_fails_the_batch_fails_only_the_jobs_that_did_not_finish():
    """The SLURM launcher waits for every job, then exits 1 naming each failed one (its overrides,
    its SLURM job, the job's own first moemesh line). The row keeps the SLURM job and the reason;
    a job of the same batch that finished is no failure; the process's own stderr still shows all."""

    def launch(overrides, initial_job_idx):
        print("moemesh: job #3 (parallel.name=ep2 a=b): SLURM job 11, 1 node x 2 tasks", file=sys.stderr)
        print(
            "moemesh: failed: job #4 (parallel.name=dp2 a=b), SLURM job 12_1: moemesh: rank 1 was killed by "
            "SIGKILL; the other ranks were stopped",
            file=sys.stderr,
        )
        sys.exit(1)

    reasons = _sweeper(launch)._launch([3, 4], [["a=b"], ["a=b"]], lambda i: i == 3)
    assert reasons == {4: "SLURM job 12_1: moemesh: rank 1 was killed by SIGKILL; the other ranks were stopped"}


def test_a_job_stopped_by_a_signal_stops_the_sweep(tmp_path, capsys):
    """SIGTERM (a scancel, a kill, the first Ctrl-C) reaches the running job, which saves and leaves:
    the sweep was asked to stop too, so it ends with the job's code (128 + signal) and says how to go
    on, instead of counting the job as failed and starting the next. An earlier attempt's summary
    (older than the batch) does not count."""
    import json
    import time

    from hydra_plugins.moemesh_layouts.sweeper import LayoutSweeper

    job = tmp_path / "2_dp4"
    job.mkdir()
    (job / "summary.json").write_text(json.dumps({"stopped_by_signal": ["SIGTERM"], "steps": 12}))
    LayoutSweeper._stop_if_signalled([2], [tmp_path, tmp_path, job], ["a", "b", "dp4"], started=time.time() + 60)
    with pytest.raises(SystemExit) as stop:
        LayoutSweeper._stop_if_signalled([2], [tmp_path, tmp_path, job], ["a", "b", "dp4"], started=time.time() - 60)
    assert stop.value.code == 143
    line = capsys.readouterr().err.strip()
    assert line == (
        "moemesh: the sweep was stopped by SIGTERM during job #2 (dp4); run the same command again "
        "(same hydra.sweep.dir) to go on: finished jobs are not run again"
    )


def test_a_job_stopped_after_saving_goes_on_from_its_checkpoint_when_the_sweep_runs_again(tmp_path):
    """A fresh run into a directory that holds checkpoints is refused (issue #27): the sweep run
    again ("to go on") resumes such a job instead of starting it afresh there."""
    import json

    from hydra_plugins.moemesh_layouts.sweeper import _continuing
    from tests.helpers import tiny_run

    run, job = tiny_run(), ["parallel.name=dp4", "trainer.steps=4"]
    assert _continuing(job, tmp_path, run) == job  # nothing saved: a fresh start
    ckpt = tmp_path / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "files": {}}))
    assert _continuing(job, tmp_path, run) == [*job, "resume=auto"]
    assert _continuing([*job, "resume=/elsewhere"], tmp_path, run) == [*job, "resume=/elsewhere"]


def test_layouts_that_cannot_run_at_the_held_micro_steps_are_left_out_for_the_next_ones(capsys):
    """The documented 16-rank sweep (default model, global_batch_size=16): the planner's best six
    need 2 or 4 micro-steps, the sweep holds 4 for all, and at 4 a dp8 layout breaks
    "global_batch_size=16 must be divisible by ... 32". Before, those jobs went to the launcher,
    which (SLURM) refused the whole batch. Now they are left out with a note, and the next
    runnable layouts the planner ranks take their places."""
    import dataclasses

    from hydra_plugins.moemesh_layouts.sweeper import _keep_runnable
    from moemesh.config.validate import batch_plan, validate_run
    from moemesh.errors import ConfigError
    from moemesh.planning.cost import with_dims

    run = compose_run(["cluster.gpus=16", "trainer.steps=30", "trainer.device=cpu"])
    valid, _ = make_plan(run, 16)
    s = search.settings(top=6, steps=30)
    choice, ranked = search.choose(valid, s), search.choose(valid, dataclasses.replace(s, top=0)).chosen
    held = max(batch_plan(with_dims(run, c.dims)).micro_steps for c in choice.chosen)
    at_held = dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, micro_steps=held))

    def runs(c) -> bool:
        try:
            validate_run(with_dims(at_held, c.dims))
        except ConfigError:
            return False
        return True

    broken = [c.label for c in choice.chosen if not runs(c)]
    assert broken, "the case this test is about: a chosen layout the held count breaks"
    _keep_runnable(choice, ranked, run, held, s.top)
    assert len(choice.chosen) == 6 and all(runs(c) for c in choice.chosen)
    assert not set(broken) & {c.label for c in choice.chosen} and set(broken) <= set(choice.filtered)
    note = capsys.readouterr().out.strip()
    # The chosen ones the held count breaks, and any next-ranked one it breaks too, in rank order.
    named = re.match(r"moemesh: left out (.+?): they cannot run at the sweep's", note)
    assert named, note
    left_out = named.group(1).split(", ")
    assert set(broken) <= set(left_out) <= set(choice.filtered)
    assert left_out == [c.label for c in ranked if c.label in left_out] and not any(
        runs(c) for c in ranked if c.label in left_out
    )
    assert f"trainer.micro_steps={held}" in note and "\n" not in note
