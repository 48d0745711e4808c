"""scripts/slurm/train.sbatch's decision after srun, with srun and scontrol replaced by stubs (no
SLURM needed): a run stopped by the time-limit signal in this attempt is requeued whatever exit
code srun reports, and nothing else is. The real SLURM path: tests/test_slurm_cluster.py."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# srun stub: writes the summary a stopped rank 0 writes (or none), then exits with the given code.
SRUN = """#!/bin/bash
for a in "$@"; do case $a in hydra.run.dir=*) dir=${a#hydra.run.dir=};; esac; done
mkdir -p "$dir"
printf '%s\n' "$@" > "$dir/srun-args"
[ -n "$STUB_SIGNAL" ] && printf '{"stopped_by_signal": "%s"}' "$STUB_SIGNAL" > "$dir/summary.json"
if [ -n "$STUB_PAD_MB" ]; then  # a stopped run's summary, padded to this size
  printf '{"stopped_by_signal": "SIGUSR2", "pad": "' > "$dir/summary.json"
  head -c "${STUB_PAD_MB}M" /dev/zero | tr -c x x >> "$dir/summary.json"
  printf '"}' >> "$dir/summary.json"
fi
exit "$STUB_EXIT"
"""


def _run(tmp_path, exit_code: int, signal: str = "", stale_summary: bool = False, args=(), restart_count=0, pad_mb=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    run_dir = tmp_path / "run"
    if stale_summary:  # an earlier attempt's, stopped by the signal
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"stopped_by_signal": "SIGUSR2"}))
        old = time.time() - 3600
        os.utime(run_dir / "summary.json", (old, old))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_NNODES": "1",
        "MOEMESH_ROOT": str(ROOT),
        "MOEMESH_RUN_DIR": str(run_dir),
        "STUB_EXIT": str(exit_code),
        "STUB_SIGNAL": signal,
        "STUB_PAD_MB": str(pad_mb),
        "SLURM_RESTART_COUNT": str(restart_count),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), "parallel=dp2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tmp_path / "scontrol.log"
    return proc, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("code", [140, 143, 0])
def test_a_run_stopped_by_the_time_limit_signal_is_requeued_whatever_srun_reports(tmp_path, code):
    # 143: the first rank out (140) made srun --kill-on-bad-exit terminate the others.
    proc, requeued = _run(tmp_path, code, signal="SIGUSR2")
    assert proc.returncode == 0, proc.stderr
    assert requeued == "requeue 77\n" and "requeueing job 77" in proc.stdout


@pytest.mark.parametrize(("code", "signal"), [(1, ""), (143, "SIGTERM"), (0, "")])
def test_anything_else_is_not_requeued_and_keeps_its_exit_code(tmp_path, code, signal):
    proc, requeued = _run(tmp_path, code, signal=signal)
    assert proc.returncode == code and requeued == "", proc.stderr


def test_the_requeue_check_reads_a_bounded_summary(tmp_path):
    """It read summary.json whole, whatever its size: one past 16 MiB is not read (no requeue)."""
    proc, requeued = _run(tmp_path, 143, pad_mb=1)
    assert requeued == "requeue 77\n", proc.stderr
    (tmp_path / "big").mkdir()
    proc, requeued = _run(tmp_path / "big", 143, pad_mb=17)
    assert proc.returncode == 143 and requeued == "", proc.stderr


def test_an_earlier_attempts_summary_does_not_requeue_a_crash(tmp_path):
    proc, requeued = _run(tmp_path, 1, stale_summary=True)
    assert proc.returncode == 1 and requeued == "", proc.stderr


def _resume_args(tmp_path) -> list[str]:
    return [a for a in (tmp_path / "run" / "srun-args").read_text().splitlines() if a.startswith("resume=")]


@pytest.mark.parametrize(
    ("restart_count", "own_checkpoint", "last"),
    [(0, True, "/old/step_5"), (1, False, "/old/step_5"), (1, True, "auto")],
)
def test_a_requeued_attempt_resumes_its_own_checkpoint_not_the_one_given_at_submission(
    tmp_path, restart_count, own_checkpoint, last
):
    # Before: resume=auto came first, so resume=/old/step_5 won on every attempt and each requeue
    # restarted the run from step 5.
    if own_checkpoint:
        step = tmp_path / "run" / "checkpoints" / "step_000010"
        step.mkdir(parents=True)
        (step / "meta.json").write_text("{}")
    proc, _ = _run(tmp_path, 0, args=["resume=/old/step_5"], restart_count=restart_count)
    assert proc.returncode == 0, proc.stderr
    assert _resume_args(tmp_path)[-1] == f"resume={last}"  # Hydra: the last override wins


@pytest.mark.parametrize(("name", "resumes"), [("step_000010", True), ("step_10x", False), ("step_1.tmp", False)])
def test_a_requeue_takes_only_what_the_trainer_calls_a_checkpoint(tmp_path, name, resumes):
    """The trainer's checkpoint directories are step_ and ASCII digits; a directory the glob
    step_[0-9]* also matches (a half-written step_1.tmp, step_10x) is not one, and a requeued
    attempt must keep the submission's resume= rather than resume=auto from it."""
    step = tmp_path / "run" / "checkpoints" / name
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    proc, _ = _run(tmp_path, 0, args=["resume=/old/step_5"], restart_count=1)
    assert proc.returncode == 0, proc.stderr
    assert _resume_args(tmp_path)[-1] == ("resume=auto" if resumes else "resume=/old/step_5")


@pytest.mark.parametrize("restart_count", [0, 1])
def test_no_key_is_given_twice_and_plus_spellings_count(tmp_path, restart_count):
    """A key the user gives (resume=, cluster=mysite) was given again by the template: Hydra's
    last-wins rule held, with a "given 2 times" warning on every submission. And ++checkpoint.dir=
    was not read, so a requeue looked for its checkpoint in the wrong place."""
    ckpt = tmp_path / "ckpts" / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    user = ["cluster=mysite", "resume=/old/step_5", f"++checkpoint.dir={tmp_path / 'ckpts'}"]
    proc, _ = _run(tmp_path, 0, args=user, restart_count=restart_count)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "run" / "srun-args").read_text().splitlines()
    keys = [a.lstrip("+").split("=")[0] for a in args if "=" in a]
    assert len(keys) == len(set(keys)), args
    assert "cluster=mysite" in args and "cluster=slurm" not in args
    assert _resume_args(tmp_path) == (["resume=auto"] if restart_count else ["resume=/old/step_5"])
