"""End to end through the real entry point: python train.py, spawn, torchrun, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL
from tests.same_math import assert_same_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, *overrides, launcher=(sys.executable,), env_extra=None, timeout=240):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID")}
    env.update(env_extra or {})
    proc = subprocess.run(
        [*launcher, str(ROOT / "train.py"), f"hydra.run.dir={out}", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, out


def _sweep(tmp_path, *overrides):
    """``train.py -m`` of the small model with ``overrides``, run in ``tmp_path``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *overrides, *SMALL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_default_model_learns_and_writes_outputs(tmp_path):
    proc, out = _train(tmp_path, "trainer.steps=60", "trainer.eval_every=30", "trainer.eval_batches=2")
    assert proc.returncode == 0, proc.stderr
    assert "step    60/60" in proc.stdout and "tok/s" in proc.stdout and "ETA" in proc.stdout
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "aux_loss", "z_loss", "tokens_per_s", "step_s", "load"):
        assert key in records[0]
    assert records[0]["loss"] == pytest.approx(5.55, abs=0.1)  # ~ln 256 on byte data
    assert records[-1]["loss"] < 3.0 and records[-1]["val_loss"] < 3.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 60
    assert summary["final_loss"] == records[-1]["loss"]
    assert summary["machine"]["hostname"] and summary["machine"]["device"]
    assert (out / ".hydra" / "config.yaml").is_file()
    # One step numbering: a record's step counts completed optimizer steps, as the console
    # ("step 60/60") and the checkpoint directory (step_000060) do.
    assert [r["step"] for r in records] == list(range(1, 61))
    assert (out / "checkpoints" / "step_000060").is_dir()
    # train.log holds what the run printed: the banner, progress lines, the summary.
    log = (out / "train.log").read_text()
    assert "moemesh: single" in log and "step    60/60" in log and "moemesh run summary" in log
    assert "run summary: single (dp1·ep1·tp1·pp1 = 1 rank), model=" in log  # one rank, not "1 ranks"


@pytest.mark.slow
def test_spawned_and_torchrun_ranks_match_single(tmp_path):
    steps = ["trainer.steps=3"]
    single, out1 = _train(tmp_path / "a", *SMALL, *steps)
    assert single.returncode == 0, single.stderr
    spawned, out4 = _train(tmp_path / "b", *SMALL, *steps, "parallel=ep2_dp2")
    assert spawned.returncode == 0, spawned.stderr
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    tr, out_tr = _train(
        tmp_path / "c",
        *SMALL,
        *steps,
        "parallel=ep2_dp2",
        "cluster=torchrun",
        launcher=(torchrun, "--nproc_per_node=4"),
    )
    assert tr.returncode == 0, tr.stderr
    for out in (out4, out_tr):
        assert_same_run(read_metrics(out1), read_metrics(out), out.parent.name, min_steps=2)
        assert json.loads((out / "summary.json").read_text())["world_size"] == 4
        # One run directory; only rank 0 wrote Hydra's files and the log.
        assert sorted(p.name for p in out.iterdir()) == [
            ".hydra",
            "checkpoints",
            "metrics.jsonl",
            "summary.json",
            "train.log",
        ]
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
        assert "step     3/3" in (out / "train.log").read_text()  # written by rank 0, not the launcher
    # Non-zero torchrun ranks left nothing in their working directory.
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["run"]


@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["parallel=ep4", "model.num_experts=6"],
            "model.num_experts=6 must be divisible by parallel.expert_parallel_size=4",
        ),
        (["parallel=dp4", "trainer.global_batch_size=6"], "trainer.global_batch_size=6 must be divisible"),
        (["cluster=torchrun"], "cluster.launcher=torchrun but this process has no torchrun environment"),
        (["data=memmap", "data.path=/nonexistent/train.bin"], "data.path=/nonexistent/train.bin: no such file"),
        (["resume=/nonexistent/ckpt"], "resume=/nonexistent/ckpt: no complete checkpoint there"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_starts_nothing(tmp_path, overrides, needle):
    proc, out = _train(tmp_path, *overrides)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_launcher_world_size_mismatch_exits_2(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "parallel=ep2_dp2", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "WORLD_SIZE=2 from the launcher != dp*ep*tp*pp = 2*2*1*1 = 4" in proc.stderr


def test_a_sweep_holds_micro_steps_equal_or_says_it_mixes_them(monkeypatch, capsys, tmp_path):
    import train

    monkeypatch.chdir(tmp_path)
    held = train._check_command(["-m", "parallel=single,pp2", *SMALL])
    assert held[-1] == "trainer.micro_steps=2"  # pp2 needs 2 for 1F1B: single takes 2 as well
    assert "every layout of this sweep takes 2 micro-steps" in capsys.readouterr().out
    mixed = ["-m", "parallel=single,dp2", "trainer.micro_batch_size=2", *SMALL]  # 4 vs 2 micro-steps
    assert train._check_command(mixed) == mixed
    err = capsys.readouterr().err
    assert "warning: this sweep mixes micro-step counts (single: 4, dp2: 2)" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_failed_job_of_a_local_sweep_is_its_own_and_the_sweep_goes_on(tmp_path):
    """Job 0's spawned ranks fail (rank 0 cannot create metrics.jsonl: it is a link into a
    directory that does not exist, which the checks before the sweep leave to the ranks), and so
    does job 1, which trains in this process (one rank); job 2 still runs, and the command ends
    naming both failed jobs in one line, exit 1."""
    sweep = tmp_path / "sweep"
    for job in ("0_dp2", "1_single"):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "metrics.jsonl").symlink_to(tmp_path / "gone" / "metrics.jsonl")
    proc = _sweep(tmp_path, "parallel=dp2,single,single", "trainer.steps=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr
    assert json.loads((sweep / "2_single" / "summary.json").read_text())["steps"] == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "moemesh: 2 of 3 sweep jobs failed (the others ran): 0_dp2: rank 0 failed: FileNotFoundError"
    )
    assert "; 1_single: rank 0 failed: FileNotFoundError" in last
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "Traceback" not in proc.stderr
    assert "Terminating process" not in proc.stderr  # torch's line per stopped rank: the reason says it once
    assert "Traceback" in (sweep / "1_single" / "train.log").read_text()  # the in-process job's, kept


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_refused_resume_leaves_no_run_directory(tmp_path):
    """In this process (one rank) and from spawned ranks, whose launcher learns the reason from
    the rank that failed: a tensor file that changed since the save, which only the ranks read.
    What meta.json says (another model, another corpus) is asked before any rank starts."""
    proc, first = _train(tmp_path / "a", "trainer.steps=1", *SMALL)
    assert proc.returncode == 0, proc.stderr
    # Another corpus (data=synthetic): train.py knows the data before the ranks start, exit 2
    proc, out = _train(
        tmp_path / "data",
        "trainer.steps=2",
        "data=synthetic",
        f"resume={first / 'checkpoints'}",
        "parallel=ep2",
        *SMALL,
    )
    assert proc.returncode == 2 and not out.exists(), proc.stderr
    assert "it was trained on other data" in proc.stderr.strip().splitlines()[-1], proc.stderr
    proc, out = _train(  # unless asked to resume the model on new data
        tmp_path / "new",
        "trainer.steps=2",
        "data=synthetic",
        "data.resume_on_new_data=true",
        f"resume={first / 'checkpoints'}",
        *SMALL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "new data: reading it from its first window" in (out / "train.log").read_text()
    (ckpt,) = (first / "checkpoints").glob("step_*")
    tensors = max(ckpt.glob("*.distcp"), key=lambda f: f.stat().st_size)
    body = bytearray(tensors.read_bytes())
    body[len(body) // 2] ^= 0xFF
    tensors.write_bytes(bytes(body))
    for layout in ("single", "ep2"):
        proc, out = _train(
            tmp_path / layout, "trainer.steps=2", f"resume={first / 'checkpoints'}", f"parallel={layout}", *SMALL
        )
        assert proc.returncode == 1 and "(the file changed since it was saved)" in proc.stderr, proc.stderr
        assert not out.exists(), layout
    proc, out = _train(
        tmp_path / "other", f"resume={first / 'checkpoints'}", "parallel=ep2", *SMALL, "model.num_layers=3"
    )
    assert proc.returncode == 2 and not out.exists(), proc.stderr
    assert proc.stderr.strip().endswith("was saved for another model: model.num_layers=2 (now 3)"), proc.stderr


@pytest.mark.slow
def test_held_micro_steps_make_pp2_and_single_optimise_the_same_loss(tmp_path):
    proc = _sweep(tmp_path, "parallel=single,pp2", "trainer.steps=3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    single, pp2 = (read_metrics(tmp_path / "sweep" / d) for d in ("0_single", "1_pp2"))
    assert_same_run(single, pp2, "pp2", min_steps=2)


def test_a_stopped_layout_sweep_job_leaves_the_resume_line_to_its_sweeper():
    """The layout search prints "run the same command again"; a single-run resume line beside it
    would give two different ways to go on. A basic sweep's job and a single run keep theirs."""
    import train

    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    layouts = "hydra_plugins.moemesh_layouts.sweeper.LayoutSweeper"
    job = ["parallel=dp2", "trainer.steps=50"]
    line = train._stop_message(["SIGTERM"], 7, ["-m", *job], "/m/0_dp2", job, layouts)
    assert line == "moemesh: stopped by SIGTERM after step 7; checkpoint saved"
    line = train._stop_message(["SIGTERM"], 7, ["-m", *job], "/m/0_dp2", job, basic)
    assert line.endswith("hydra.run.dir=/m/0_dp2 resume=auto (the sweep's later jobs did not start)")
    line = train._stop_message(["SIGINT"], 7, job, "/r", None, None)
    assert line.endswith("resume with: python train.py parallel=dp2 trainer.steps=50 hydra.run.dir=/r resume=auto")
