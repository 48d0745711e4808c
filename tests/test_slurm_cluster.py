"""cluster=slurm against a real SLURM: submission, sweeps, refusal, time limit -> requeue -> resume.

Needs a running SLURM whose config is in SLURM_CONF. `.ci/run` starts a single-node one
on this machine (`.ci/slurm/up.sh`, 8 advertised CPUs on 2 cores) and stops it
afterwards; without one these tests skip and say why (`MOEMESH_REQUIRE_SLURM=1` turns
the skip into a failure).
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SMALL as TRAIN_CLI_SMALL
from tests.launch._processes import wait_for_steps
from tests.same_math import assert_same_run, read_metrics

pytestmark = pytest.mark.slow  # submits jobs to a real SLURM

ROOT = Path(__file__).resolve().parents[1]
SMALL = [*TRAIN_CLI_SMALL, "logger.console=false"]
# This cluster's node has CPUs, not GPUs; each attempt may run 10 minutes.
SLURM = ["cluster=slurm", "cluster.slurm.request_gpus=false", "cluster.slurm.time_min=10"]


def _unavailable(reason: str):
    if os.environ.get("MOEMESH_REQUIRE_SLURM") == "1":
        pytest.fail(f"MOEMESH_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def slurm():
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        _unavailable("no SLURM here: SLURM_CONF is unset (bash .ci/slurm/up.sh starts a local one; .ci/run does)")
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        _unavailable(f"SLURM_CONF={conf} but sinfo failed: {err}")
    if state.returncode != 0 or not {"idle", "mix", "alloc"} & set(state.stdout.split()):
        _unavailable(f"SLURM_CONF={conf} but no usable node: {state.stdout.strip() or state.stderr.strip()}")


def _env():
    drop = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop and not (k.startswith("SLURM_") and k != "SLURM_CONF")}


def _cmd(sweep: Path, *overrides):
    return [sys.executable, str(ROOT / "train.py"), "-m", *SLURM, f"hydra.sweep.dir={sweep}", *SMALL, *overrides]


def _submit(tmp_path, *overrides, timeout=300):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        _cmd(sweep, *overrides), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    return proc, sweep


def _job_ids(stdout: str) -> dict[int, str]:
    return {int(n): j for n, j in re.findall(r"moemesh: job #(\d+) .*?: SLURM job (\S+),", stdout)}


def _sacct(job_id: str) -> dict:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "--format=JobID,State,NNodes,NTasks"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    rows = [l.split("|") for l in out.splitlines() if l.split("|")[0] == job_id]
    return dict(zip(("id", "state", "nodes", "ntasks"), rows[-1])) if rows else {}


def _losses(run_dir: Path):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_four_rank_job_trains_with_one_task_per_rank(tmp_path):
    proc, sweep = _submit(tmp_path, "parallel=ep2_dp2", "trainer.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = _job_ids(proc.stdout)[0]
    assert "4 ranks = 1 node x 4 tasks" in proc.stdout
    run_dir = sweep / "0_ep2_dp2"
    assert len(_losses(run_dir)) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["ep"] == 2 and summary["dp"] == 2
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "checkpoints" / "step_000003").is_dir()
    # Four SLURM tasks ran (submitit keeps one log per task), and only rank 0 wrote the run's files.
    assert sorted(p.name for p in (sweep / ".submitit" / job).glob("*_log.out")) == [
        f"{job}_{t}_log.out" for t in range(4)
    ]
    assert "3 steps, final loss" in proc.stdout
    acct = _sacct(job)
    assert acct.get("state") in ("COMPLETED", "RUNNING", "COMPLETING") and acct.get("nodes") == "1", acct


def test_sweep_runs_every_job_grouped_by_allocation_and_layouts_agree(tmp_path):
    # ep2 and dp2 need 2 ranks (one job array), ep2_dp2 needs 4 (a second submission).
    proc, sweep = _submit(tmp_path, "parallel=ep2,dp2,ep2_dp2", "trainer.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = _job_ids(proc.stdout)
    assert len(ids) == 3
    assert ids[0].split("_")[0] == ids[1].split("_")[0] and "_" in ids[0]  # one array for the 2-rank jobs
    assert ids[2].split("_")[0] != ids[0].split("_")[0]
    reference = read_metrics(sweep / "0_ep2")
    assert len(reference) == 3
    for sub, world in (("1_dp2", 2), ("2_ep2_dp2", 4)):
        assert_same_run(reference, read_metrics(sweep / sub), sub, min_steps=2)  # same math in every layout
        assert json.loads((sweep / sub / "summary.json").read_text())["world_size"] == world


def test_sweep_that_mixes_allocations_is_rejected_before_submission(tmp_path):
    def known_jobs():
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-S", "2000-01-01", "--format=JobIDRaw"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
        return set(out.split()) | set(queued.split())

    before = known_jobs()
    proc, sweep = _submit(tmp_path, "cluster.slurm.mixed_allocations=reject", "parallel=ep2,ep2_dp2", "trainer.steps=3")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("moemesh: config error: cluster.slurm.mixed_allocations=reject and this sweep needs 2")
    assert "parallel=ep2 " in line and "parallel=ep2_dp2 " in line  # the two sweeps to run instead
    assert known_jobs() == before and not (sweep / ".submitit").exists()


def test_job_slurm_refuses_or_can_never_start_fails_in_one_line(tmp_path):
    # This cluster has one node and no GPUs: 16 ranks need 2 nodes (queued, never startable:
    # the launcher cancels it), and asking for GPUs makes sbatch refuse outright.
    proc, _ = _submit(
        tmp_path / "a", "parallel=ep8_dp2", "trainer.steps=3", "trainer.global_batch_size=16", timeout=120
    )
    assert proc.returncode == 1
    assert "16 ranks = 2 nodes x 8 tasks" in proc.stdout
    assert "can never start (PartitionConfig: it needs 2 nodes and partition debug has 1)" in proc.stderr, proc.stderr
    job = _job_ids(proc.stdout)[0]
    assert not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    proc, sweep = _submit(
        tmp_path / "b", "parallel=ep2", "trainer.steps=3", "cluster.slurm.request_gpus=true", timeout=120
    )
    assert proc.returncode == 1
    # SLURM's request_gpus=false given again as true: the cli's warning about the repeated key, then the one line.
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("moemesh:") and "is given 2 times" not in l]
    assert line.startswith("moemesh: sbatch refused job #0 (2 ranks = 1 node x 2 tasks")
    assert "cluster.slurm.request_gpus=false" in line
    # Two tasks of more than half the node's CPUs each: sbatch takes it, and it stays PENDING
    # (PartitionConfig) on one node forever; it was waited on, now it is cancelled.
    node_cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    proc, _ = _submit(
        tmp_path / "c", "parallel=ep2", "trainer.steps=3", f"cluster.slurm.cpus_per_task={node_cpus // 2 + 1}"
    )
    assert proc.returncode == 1
    needs = 2 * (node_cpus // 2 + 1)
    assert (
        f"can never start (PartitionConfig: it needs {needs} CPUs on a node (its tasks per node x "
        f"cluster.slurm.cpus_per_task) and partition debug's nodes have at most {node_cpus})" in proc.stderr
    ), proc.stderr
    assert not subprocess.run(
        ["squeue", "-h", "-j", _job_ids(proc.stdout)[0]], capture_output=True, text=True
    ).stdout.strip()


def _scontrol_job(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout


def test_a_rank_that_raises_fails_the_job_with_its_reason(tmp_path):
    # The job's metrics.jsonl is a link into a directory that does not exist: rank 0 raises when
    # it opens it, after the ranks started (what the submitter checks leaves links to the ranks).
    # The task must exit non-zero (srun then stops any rank still waiting in a collective) and
    # SLURM must record the job as FAILED, not COMPLETED, with the rank's one-line reason. (An
    # unwritable checkpoint.dir, then a directory named metrics.jsonl, served here until the
    # submitter refused them before submitting.)
    (tmp_path / "sweep" / "0_dp2").mkdir(parents=True)
    (tmp_path / "sweep" / "0_dp2" / "metrics.jsonl").symlink_to(tmp_path / "gone" / "metrics.jsonl")
    proc, _ = _submit(tmp_path, "parallel=dp2", "trainer.steps=3", timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("moemesh: failed:")]
    assert re.search(r"FileNotFoundError: \[Errno 2\] No such file or directory: .*metrics\.jsonl", line), line
    assert _sacct(_job_ids(proc.stdout)[0]).get("state") == "FAILED"


def test_an_unwritable_checkpoint_dir_is_refused_before_submitting(tmp_path):
    proc, sweep = _submit(tmp_path, "parallel=dp2", "checkpoint.dir=/proc/moemesh-no-such-dir", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("moemesh: config error: checkpoint.dir=/proc/moemesh-no-such-dir: cannot be created and written")
    )
    assert "SLURM job" not in proc.stdout and not sweep.exists()


def _release_requeued(job: str, *more: str) -> None:
    """Start a requeued job now instead of after SLURM's 121 s hold. Not within the second of
    the requeue: slurmd refuses a launch credential issued in the same second as the
    previous attempt's revocation ("Job credential revoked") -- the reason for the hold."""
    time.sleep(2.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now", *more], check=True, timeout=30)


# Seconds of training a time-limit job must have left when its limit is lowered: the next limit
# check (<= 30 s) and the save after its signal.
LEFT_S = 40


def _start_time_limit_job(sweep: Path, steps: int):
    """Submit the time-limit test's job and wait until it has trained 12 steps: (sweep, proc, job id)."""
    proc = subprocess.Popen(
        _cmd(
            sweep,
            "parallel=dp2",
            f"trainer.steps={steps}",
            "cluster.slurm.max_timeouts=2",
            "checkpoint.every=0",
            "logger.console=true",
        ),
        cwd=sweep.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_steps(None, 12, proc, timeout=180, metrics=sweep / "0_dp2" / "metrics.jsonl")
        return sweep, proc, next(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
    except BaseException:
        proc.kill()
        raise


def test_job_over_its_time_limit_is_requeued_and_resumes(tmp_path):
    """SLURM's own limit machinery: warning signal, our save, submitit's requeue, resume=auto.

    Two shortcuts keep this under two minutes, both on SLURM's side: slurmctld checks
    limits only every 30 s, so instead of submitting with a one-minute limit (which would
    fire at a random moment, maybe before training starts) the test lowers the running
    job's limit once training is under way, so the warning comes at the next check; and
    SLURM holds a requeued job for 121 s, so the test releases it (StartTime=now) and
    restores the original limit for the second attempt.
    """
    # slurmctld checks limits every 30 s and sends the signal at the first check at which the job's
    # end is at most signal_delay_s + 30 s away (send_job_warn_signal): the lowered limit ends
    # 60-120 s from now, so the signal comes at the next check, <= 30 s after the limit is lowered.
    # The job must still be training then: 2,400 steps is 43 s at a Xeon's ~18 ms a step, 58 s at an
    # EPYC's ~24 ms. On a CPU fast enough to finish them within LEFT_S of the lowering, the job is
    # cancelled at once and started again with the steps that last that long at its measured pace.
    # Both attempts together run the steps, so every step more is this test's time.
    steps = 2400
    sweep, proc, job = _start_time_limit_job(tmp_path / "sweep", steps)
    try:
        metrics = sweep / "0_dp2" / "metrics.jsonl"
        records = metrics.read_text().splitlines()
        pace = statistics.median(json.loads(l)["step_s"] for l in records[6:])  # past the first, slower steps
        needed = len(records) + math.ceil(LEFT_S / pace)
        if needed > steps:
            print(f"\nSLURM time limit: {pace * 1000:.0f} ms a step; starting again with {needed} steps")
            subprocess.run(["scancel", job], timeout=30)
            proc.wait(timeout=60)
            steps = needed
            sweep, proc, job = _start_time_limit_job(tmp_path / "sweep_again", steps)
            metrics = sweep / "0_dp2" / "metrics.jsonl"
        elapsed = subprocess.run(["squeue", "-h", "-j", job, "-o", "%M"], capture_output=True, text=True).stdout
        ran_s = sum(int(x) * 60**i for i, x in enumerate(reversed(elapsed.strip().split(":"))))
        limit = math.ceil((ran_s + 60) / 60)  # minutes: the limit now ends 60-120 s from now
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], check=True, timeout=30)
        lowered, lowered_at = time.monotonic(), len(metrics.read_text().splitlines())

        deadline = time.time() + 120  # the next limit check (<= 30 s), a save, the requeue
        while not ("Restarts=1" in (info := _scontrol_job(job)) and "JobState=PENDING" in info):
            assert proc.poll() is None, f"the job ended before SLURM's signal (trainer.steps={steps}):\n{info}"
            assert time.time() < deadline, f"job was not requeued:\n{info}"
            time.sleep(0.5)
        signalled_s = time.monotonic() - lowered
        _release_requeued(job, "TimeLimit=10")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        if job is not None and proc.returncode != 0:
            subprocess.run(["scancel", job], timeout=30)
    assert proc.returncode == 0, err[-3000:]

    log = (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()
    stopped = re.search(r"stop requested \(SIGUSR2\); stopped after step (\d+)", log)
    resumed = re.search(r"resumed from \S+step_(\d+) .* at step (\d+)", log)
    assert stopped and resumed, log[-3000:]
    assert "Requeued job" in log and 0 < int(stopped.group(1)) == int(resumed.group(2)) < steps
    first = [json.loads(l)["step_s"] for l in metrics.read_text().splitlines()[: int(stopped.group(1))]]
    print(
        f"\nSLURM time limit: lowered at step {lowered_at}, stopped after step {stopped.group(1)} of {steps}, "
        f"requeued {signalled_s:.1f} s after the limit was lowered; {statistics.median(first) * 1000:.0f} ms a step"
    )
    summary = json.loads((sweep / "0_dp2" / "summary.json").read_text())
    assert summary["start_step"] == int(stopped.group(1)) and summary["stopped_by_signal"] is None
    # One continuous record over both attempts.
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == list(range(1, steps + 1))
    assert _sacct(job).get("state") in ("COMPLETED", "COMPLETING", "RUNNING")


def test_plain_sbatch_template_trains_and_requeues_itself(tmp_path):
    """scripts/slurm/train.sbatch: srun rank wiring, then save + requeue + resume on SIGUSR2.

    The signal is sent by hand (scancel --signal, which like sbatch --signal reaches the
    job's tasks, not its batch shell); the time-limit path itself is tested above.
    """
    script = tmp_path / "train.sbatch"
    script.write_text((ROOT / "scripts/slurm/train.sbatch").read_text().replace("#SBATCH --gpus-per-node=8\n", ""))
    run_dir, steps = tmp_path / "run", 300
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--time=10",
            f"--chdir={ROOT}",
            f"--output={tmp_path}/slurm-%j.out",
            f"--export=ALL,MOEMESH_RUN_DIR={run_dir}",
            str(script),
            "parallel=dp2",
            *SMALL,
            f"trainer.steps={steps}",
            "logger.console=true",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() < deadline, _scontrol_job(job)
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        deadline = time.time() + 120
        while not ("Restarts=1" in (info := _scontrol_job(job)) and "JobState=PENDING" in info):
            assert time.time() < deadline, f"job was not requeued:\n{info}"
            time.sleep(0.5)
        _release_requeued(job)
        deadline = time.time() + 240
        while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            assert time.time() < deadline, _scontrol_job(job)
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "attempt 1: 1 node(s) x 2 tasks" in out and "attempt 2:" in out, out[-3000:]
    assert "requeueing job" in out and re.search(r"resumed from \S+ \(saved under dp2\) at step \d+", out), out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and 0 < summary["start_step"] < steps and summary["stopped_by_signal"] is None
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == list(range(1, steps + 1))
