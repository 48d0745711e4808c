"""SLURM submission decided before submitting: allocations, groups, sbatch lines, refusals.

No cluster needed here; tests/test_slurm_cluster.py runs the same paths against a real SLURM.
"""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moemesh.errors import ConfigError
from moemesh.launch.slurm import (
    SweepJob,
    allocation_for,
    group_jobs,
    mixed_allocation_error,
    requeue_signal,
    validate_slurm,
)
from moemesh.trainer.metrics import MetricsLogger
from tests.helpers import tiny_run

ROOT = Path(__file__).resolve().parents[2]


def _slurm_run(**overrides):
    return tiny_run(**{"cluster.name": "slurm", "cluster.launcher": "slurm", **overrides})


@pytest.mark.parametrize(
    "world, per_node, expected",
    [
        (16, 8, (2, 8)),
        (8, 8, (1, 8)),
        (4, 8, (1, 4)),
        (1, 8, (1, 1)),
        (32, 4, (8, 4)),
    ],
)
def test_allocation_is_the_world_size_in_whole_nodes(world, per_node, expected):
    alloc = allocation_for(_slurm_run(**{"cluster.gpus_per_node": per_node}), world)
    assert (alloc.nodes, alloc.tasks_per_node) == expected
    assert alloc.world_size == world and alloc.gpus_per_node == expected[1]


def test_allocation_refuses_uneven_nodes_and_can_skip_gpus():
    with pytest.raises(ConfigError, match=r"needs 12 ranks, not a multiple of cluster.gpus_per_node=8"):
        allocation_for(_slurm_run(), 12)
    assert allocation_for(_slurm_run(**{"cluster.slurm.request_gpus": False}), 4).gpus_per_node == 0


def test_executor_parameters_become_the_expected_sbatch_lines(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # submitit refuses to write a submission file unless it finds an srun on PATH; it
    # never runs it here, so a stand-in lets this test read the file on any machine.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    run = _slurm_run(
        **{
            "cluster.slurm.partition": "gpu",
            "cluster.slurm.account": "proj",
            "cluster.slurm.constraint": "h100",
            "cluster.slurm.time_min": 90,
            "cluster.slurm.additional_parameters": {"exclusive": True, "mail-type": "END"},
            "cluster.slurm.setup": ["module load cuda"],
        }
    )
    alloc = allocation_for(run, 16)
    params = alloc.executor_parameters(name="train", python_path="/repo")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**params)
    text = executor._executor._make_submission_file_text("python -m job", "uid")  # what sbatch would read
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --constraint=h100",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
    ):
        assert line in text.splitlines(), line
    setup = text.index("export PYTHONPATH=/repo")
    assert setup < text.index("unset RANK WORLD_SIZE") < text.index("module load cuda") < text.index("srun ")
    assert "--kill-on-bad-exit=1 --distribution=block" in text


def test_sbatch_flags_cpus_lists_and_switching_requeue_off(tmp_path):
    run = _slurm_run(
        **{
            "cluster.slurm.cpus_per_task": 6,
            "cluster.slurm.additional_parameters": {"requeue": False, "exclusive": False, "nodelist": ["n1", "n2"]},
        }
    )
    params = allocation_for(run, 8).executor_parameters(name="train")
    assert "--cpus-per-task=6" in params["slurm_srun_args"]  # srun (22.05+) does not inherit it
    assert params["cpus_per_task"] == 6
    # requeue=false is --no-requeue: without it SLURM's JobRequeue=1 requeues the job anyway.
    # Other false flags are left out.
    assert params["slurm_additional_parameters"] == {"no-requeue": True, "nodelist": "n1,n2"}
    on = allocation_for(_slurm_run(**{"cluster.slurm.additional_parameters": {"mail_type": "END"}}), 8)
    assert on.executor_parameters(name="t")["slurm_additional_parameters"] == {"requeue": True, "mail-type": "END"}
    with pytest.raises(ConfigError, match="additional_parameters"):
        allocation_for(_slurm_run(**{"cluster.slurm.additional_parameters": {"x": {"y": 1}}}), 8)


@pytest.mark.parametrize(
    "key, needle",
    [
        ("ntasks_per_node", "moemesh sets --ntasks-per-node itself; it follows the layout: choose the layout"),
        ("nodes", "--nodes itself; it follows the layout"),
        ("time", "--time itself; set cluster.slurm.time_min instead"),
        ("cpus-per-task", "--cpus-per-task itself; set cluster.slurm.cpus_per_task instead"),
        ("signal", "set cluster.slurm.signal_delay_s instead"),
    ],
)
def test_an_additional_parameter_may_not_override_a_derived_option(key, needle):
    # Before: it was merged over the derived allocation (--ntasks-per-node=1 for a 2-rank layout).
    with pytest.raises(ConfigError, match=f"cluster.slurm.additional_parameters.{key}=1: ") as err:
        allocation_for(_slurm_run(**{"cluster.slurm.additional_parameters": {key: 1}}), 2)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "completed, rank, received, stopped, expected",
    [
        (False, 0, [], False, "fail"),  # a rank raised: exit non-zero so srun stops the others
        (False, 3, [signal.SIGUSR2], True, "fail"),
        (True, 0, [], False, "done"),
        (True, 0, [signal.SIGUSR2], False, "done"),  # the signal came after the last step
        (True, 0, [signal.SIGUSR2], True, "requeue"),
        (True, 2, [signal.SIGUSR2], True, "done"),  # task 0 requeues for everyone
        (True, 0, [signal.SIGTERM, signal.SIGUSR2], True, "requeue"),  # submitit's preemption: TERM then USR2
        (True, 0, [signal.SIGTERM], True, "interrupted"),  # scancel or SLURM preemption
        (True, 1, [signal.SIGUSR1], True, "interrupted"),
    ],
)
def test_what_a_task_does_after_training(completed, rank, received, stopped, expected):
    from moemesh.launch.slurm import after_task

    assert (
        after_task(completed=completed, rank=rank, received=received, stopped_early=stopped, requeue_sig=signal.SIGUSR2)
        == expected
    )


def test_only_a_requeued_attempt_with_its_own_checkpoint_resumes():
    from moemesh.launch.slurm import resume_setting

    assert resume_setting(None, 0, True) is None  # first attempt in a reused directory: as the user said
    assert resume_setting("/ckpt/a", 0, False) == "/ckpt/a"
    assert resume_setting(None, 1, False) is None  # requeued before any save: fresh again
    assert resume_setting("/ckpt/a", 2, False) == "/ckpt/a"
    assert resume_setting(None, 1, True) == "auto" and resume_setting("/ckpt/a", 1, True) == "auto"


@pytest.mark.slow
@pytest.mark.shares_cores
def test_groups_keep_sweep_order_and_the_rejection_says_how_to_split():
    a4, a16 = allocation_for(_slurm_run(), 4), allocation_for(_slurm_run(), 16)
    jobs = [
        SweepJob(0, ["cluster=slurm", "parallel=ep8_dp2"], a16),
        SweepJob(1, ["cluster=slurm", "parallel=ep4"], a4),
        SweepJob(2, ["cluster=slurm", "parallel=ep2_dp8"], a16),
    ]
    groups = group_jobs(jobs)
    assert list(groups) == [a16, a4] and [j.index for j in groups[a16]] == [0, 2]
    from moemesh.launch.slurm import job_name

    assert job_name([SweepJob(0, [], a16, "ep8_dp2")]) == "moemesh-ep8_dp2"
    assert job_name([SweepJob(0, [], a16, "ep8_dp2"), SweepJob(1, [], a16, "ep2_dp8")]) == "moemesh-sweep"
    message = mixed_allocation_error(groups)
    assert "16 ranks = 2 nodes x 8 tasks" in message and "4 ranks = 1 node x 4 tasks" in message
    assert "python train.py -m cluster=slurm parallel=ep8_dp2,ep2_dp8" in message
    assert "python train.py -m cluster=slurm parallel=ep4" in message and "\n" not in message
    # The suggested commands keep the overrides every job shares (before: only the varying
    # ones, so pasting them trained locally without cluster=slurm), quoted for a shell.
    common = ["cluster=slurm", "trainer.steps=30", "cluster.slurm.setup=[module load cuda]"]
    jobs = [
        SweepJob(i, [p], a, "", [*common, p]) for i, (p, a) in enumerate([("parallel=ep2", a4), ("parallel=dp2", a16)])
    ]
    message = mixed_allocation_error(group_jobs(jobs))
    assert (
        "python train.py -m cluster=slurm trainer.steps=30 'cluster.slurm.setup=[module load cuda]' parallel=ep2  and"
        in message
    )
    # Any sbatch setting splits too, e.g. two time limits.
    longer = allocation_for(_slurm_run(**{"cluster.slurm.time_min": 120}), 16)
    assert len(group_jobs([SweepJob(0, [], a16), SweepJob(1, [], longer)])) == 2


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("cluster.slurm.mixed_allocations", "merge", "is not one of split, reject"),
        ("cluster.slurm.time_min", 0, "must be a positive number of minutes"),
        ("cluster.slurm.signal_delay_s", 3600, "must be in [0, time_min*60=3600)"),
        ("cluster.slurm.max_timeouts", -1, "must be >= 0"),
        ("cluster.slurm.cpus_per_task", 0, "positive integer or null"),
    ],
)
def test_slurm_settings_are_validated(key, value, needle):
    with pytest.raises(ConfigError) as err:
        validate_slurm(_slurm_run(**{key: value}))
    assert needle in str(err.value) and key in str(err.value)


def test_requeue_signal_follows_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert requeue_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert requeue_signal() == signal.SIGUSR1


def test_resumed_metrics_keep_earlier_steps_and_drop_the_rest(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 9)] + ['{"step": 9, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    log = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=True, total_steps=10)
    log.begin(5)  # checkpoint after step 5: steps 1-5 were done, 6+ are redone
    for s in range(6, 11):
        log.log({"step": s, "loss": 0.0, "lr": 1e-3, "tokens_per_s": 1.0})
    log.close()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    fresh = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=True, total_steps=10)
    fresh.begin(0)
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def _cli(tmp_path, *args, path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _fake_sbatch(tmp_path) -> Path:
    """A PATH entry whose sbatch only records that it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho called >> {tmp_path}/sbatch-calls\nexit 1\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.slow
@pytest.mark.shares_cores
def test_invalid_job_rejects_the_whole_sweep_before_sbatch(tmp_path):
    bin_dir = _fake_sbatch(tmp_path)
    proc = _cli(
        tmp_path,
        "-m",
        "cluster=slurm",
        "parallel=ep2_dp2,ep4",
        "model.num_experts=6",
        f"hydra.sweep.dir={tmp_path}/sweep",
        path=f"{bin_dir}:{os.environ['PATH']}",
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "moemesh: config error: nothing was submitted; 1 problem(s) in this sweep of 2 job(s)"
    )
    assert "job #1 (parallel=ep4): model.num_experts=6 must be divisible by parallel.expert_parallel_size=4" in lines[0]
    assert not (tmp_path / "sbatch-calls").exists() and not (tmp_path / "sweep" / ".submitit").exists()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_mixed_sweep_with_reject_never_calls_sbatch(tmp_path):
    bin_dir = _fake_sbatch(tmp_path)
    proc = _cli(
        tmp_path,
        "-m",
        "cluster=slurm",
        "cluster.slurm.mixed_allocations=reject",
        "parallel=ep2,ep2_dp2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        path=f"{bin_dir}:{os.environ['PATH']}",
    )
    assert proc.returncode == 2 and "needs 2 different allocations" in proc.stderr, proc.stderr
    assert not (tmp_path / "sbatch-calls").exists()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_without_sbatch_or_outside_slurm_the_error_says_what_to_do(tmp_path):
    no_slurm_path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists()
    )
    proc = _cli(tmp_path, "-m", "cluster=slurm", "parallel=ep2", path=no_slurm_path)
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr, proc.stderr
    # Without -m, cluster=slurm outside an allocation names both ways in.
    proc = _cli(tmp_path, "cluster=slurm", "parallel=ep2", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "python train.py -m cluster=slurm parallel=ep2" in proc.stderr and "srun -n 2" in proc.stderr


@pytest.mark.slow
@pytest.mark.shares_cores
def test_sweep_started_inside_srun_tasks_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_JOB_ID="7", SLURM_LOCALID="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "parallel=ep2", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "every rank would run the sweep on its own" in proc.stderr, proc.stderr


@pytest.mark.parametrize("steps, stops_early", [(3, True), (1, False)])
def test_a_stop_request_saves_and_stops_unless_the_run_is_already_done(tmp_path, steps, stops_early):
    """A signal that lands during the last step must not make a finished run look cut short
    (a requeued attempt would resume with nothing left to do)."""
    import torch

    from moemesh.launch import RankContext
    from moemesh.launch.signals import StopFlag
    from moemesh.parallel import checkpoint
    from moemesh.parallel.mesh import single_rank_mesh
    from moemesh.trainer.data import prepare_data
    from moemesh.trainer.loop import train

    run = tiny_run(**{"trainer.steps": steps})
    flag = StopFlag()
    flag.set(signal.SIGUSR2, None)  # already requested before the first step ends
    ctx = RankContext(
        rank=0,
        local_rank=0,
        device=torch.device("cpu"),
        mesh=single_rank_mesh(),
        output_dir=str(tmp_path),
        data_paths=prepare_data(run.data, seq_len=32, vocab_size=256),
        stop_requested=flag.get,
        stop_signals=flag.names,
        on_stop=flag.mark_stopped,
    )
    summary = train(run, ctx)
    assert flag.stopped_early is stops_early and summary["steps"] == 1
    assert summary["stopped_by_signal"] == (["SIGUSR2"] if stops_early else None)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == ["step_000001"]


def test_a_failed_task_leaves_submitits_error_record_for_the_launcher(tmp_path, monkeypatch):
    """A task that fails exits through sys.exit (one line in its log, no traceback), so submitit
    writes no result for it; the task writes submitit's ("error", text) record itself. Without
    it the launcher's results() waited 15 s per failed job for a file that never came."""
    import submitit

    from hydra_plugins.moemesh_launcher.launcher import _leave_failure_for_submitit

    env = {"SUBMITIT_FOLDER": str(tmp_path), "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77"}
    env |= {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    line = "moemesh: error: rank 0 failed: CheckpointError: checkpoint.dir cannot be written"
    _leave_failure_for_submitit(line)
    # What the launcher's results() reads for task 0 (the part that waited), without a cluster:
    task0 = submitit.SlurmJob(tmp_path, "77", tasks=(0, 1))._sub_jobs[0]
    assert task0.paths.result_pickle == tmp_path / "77_0_result.pkl"
    assert task0._get_outcome_and_result() == ("error", line)


def test_a_task_out_of_timeouts_ends_in_one_line_naming_its_checkpoints(tmp_path, capsys, caplog):
    """Before: the task logged "requeueing", then submitit's UncompletedJobError ended it in a
    traceback, and the submitter's hint said resume=<run dir>/checkpoints."""
    import submitit

    from hydra_plugins.moemesh_launcher.launcher import _requeue

    def out_of_timeouts(signum, frame):
        raise submitit.core.utils.UncompletedJobError("Job not requeued because: timed-out too many times.")

    with caplog.at_level("INFO"), pytest.raises(SystemExit) as end:
        _requeue(out_of_timeouts, signal.SIGUSR2, tmp_path / "checkpoints", 3)
    assert end.value.code == 1 and "requeued" not in caplog.text
    assert capsys.readouterr().err == (
        "moemesh: stopped by SIGUSR2 before the time limit and saved, not requeued: timed-out too many "
        f"times (cluster.slurm.max_timeouts=3); continue with resume={tmp_path}/checkpoints\n"
    )

    def requeued(signum, frame):
        sys.exit(-1)  # submitit: requeued, then exits the task

    with caplog.at_level("INFO"), pytest.raises(SystemExit) as end:
        _requeue(requeued, signal.SIGUSR2, tmp_path / "checkpoints", 3)
    assert end.value.code == -1 and "every rank saved: requeued" in caplog.text


def test_a_task_stopped_by_sigterm_says_a_cancelled_job_is_not_requeued(tmp_path):
    # Before: "(a preempted job is requeued by SLURM and resumes)", also after a plain scancel.
    from hydra_plugins.moemesh_launcher.launcher import _interrupted_line

    line = _interrupted_line(0, ["SIGTERM"], tmp_path / "checkpoints")
    assert line.startswith("moemesh: rank 0 saved and stopped for SIGTERM: not finished")
    assert "a cancelled one is not requeued" in line and line.endswith(f"resume={tmp_path}/checkpoints")


def test_ctrl_c_while_waiting_stops_the_waiting_and_names_the_jobs(tmp_path, monkeypatch, capsys):
    """Before: the KeyboardInterrupt reached train.py, which said "SIGINT: stopped at once,
    nothing saved since the last checkpoint" while the jobs stayed queued."""
    from types import SimpleNamespace

    from hydra_plugins.moemesh_launcher import launcher

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 12_1\necho 13\n")  # 12_0 has ended
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def interrupted(handles):
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher.MoemeshSlurmLauncher, "_watch", staticmethod(interrupted))
    handles = {i: (SweepJob(i, [], None), SimpleNamespace(job_id=j)) for i, j in enumerate(["12_0", "12_1", "13"])}
    monkeypatch.setattr(launcher.MoemeshSlurmLauncher, "__init__", lambda self: None)
    with pytest.raises(SystemExit) as end:
        launcher.MoemeshSlurmLauncher()._wait(handles)
    assert end.value.code == 130
    assert capsys.readouterr().err == (
        "moemesh: stopped waiting (Ctrl-C); the SLURM jobs go on: 12_1, 13 still queued or running "
        "(follow with squeue -j 12_1,13; stop them with scancel 12_1 13)\n"
    )


class _Handle:
    """What the launcher reads of a failed submitit job: every task's stderr and its log folder."""

    def __init__(self, text: str, folder: Path):
        self.text, self.paths = text, type("P", (), {"stderr": folder / "9_0_log.err"})()

    def stderr(self):
        return self.text


def test_a_rank_a_signal_killed_is_named_not_the_survivor_that_lost_it(tmp_path):
    """Under srun, a rank killed with SIGKILL (or by the OOM killer) left its peers' gloo error
    as the job's reason: "rank 0 failed: ... Connection reset by peer" blamed a survivor. srun's
    own line names the task that died; it is the reason now."""
    from hydra_plugins.moemesh_launcher.launcher import _first_moemesh_line

    survivor = "moemesh: error: rank 0 failed: RuntimeError: [pair.cc:537] Read error: Connection reset by peer"
    killed = (
        f"{survivor}\nsrun: error: vm: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating StepId=9.0\n"
        "srun: error: vm: task 0: Terminated\n"
    )
    line = _first_moemesh_line(_Handle(killed, tmp_path), RuntimeError("failed"))
    assert line == f"moemesh: rank 1 on vm ended: Killed (srun); the other ranks were stopped (logs: {tmp_path})"
    # A rank that raised exits with a code, a peer aborts after losing it, or SLURM kills every task
    # at once (past its KillWait): the job's own line stays the reason.
    for tail in (
        "srun: error: vm: task 0: Exited with exit code 1\nsrun: error: vm: task 1: Terminated\n",
        "srun: error: vm: task 1: Aborted\nsrun: error: vm: task 0: Exited with exit code 1\n",
        "srun: error: vm: tasks 0-1: Killed\n",
    ):
        assert _first_moemesh_line(_Handle(f"{survivor}\n{tail}", tmp_path), RuntimeError("x")).startswith(survivor)


@pytest.mark.parametrize(
    "sinfo, size, verdict",
    [
        ("1|8\n", (1, 8), "it needs 10 CPUs on a node"),
        ("2|8\n1|64\n", (3, 64), None),  # a larger node exists: the job may wait for it
        ("3|32+\n", (3, None), None),  # sinfo could not give one count: no CPU verdict, not a wrong one
    ],
)
def test_the_cpus_of_the_largest_node_are_read_exactly(monkeypatch, sinfo, size, verdict):
    """Without --exact, sinfo prints nodes of different CPU counts in one state as their least count
    and "+": taken as the largest, a job that fits a bigger node would have been cancelled."""
    import subprocess as sp

    from hydra_plugins.moemesh_launcher import launcher

    calls = []

    def fake(argv, **kw):
        calls.append(argv)
        return sp.CompletedProcess(argv, 0, stdout=sinfo, stderr="")

    monkeypatch.setattr(sp, "run", fake)
    assert launcher._partition_size("gpu") == size
    assert "-e" in calls[0]
    line = launcher._never_starts("PENDING", "PartitionConfig", "gpu", "1", "10", {})
    assert (line is None) if verdict is None else (verdict in line), line


def test_a_jobs_outcome_line_reads_a_bounded_summary(tmp_path):
    """The launcher's line per finished job read summary.json whole, whatever its size."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.moemesh_launcher.launcher import _outcome

    ret = JobReturn(hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}}))
    ret.status = JobStatus.COMPLETED
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3, "final_loss": 2.5}))
    assert _outcome(ret) == f"3 steps, final loss 2.5000 -> {tmp_path}"
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3, "pad": "x" * (17 << 20)}))
    assert _outcome(ret) == "status COMPLETED"


def test_no_requeue_given_as_a_flag_switches_requeue_off():
    """additional_parameters.no_requeue=true (sbatch's own spelling) must not become --requeue."""
    run = _slurm_run(**{"cluster.slurm.additional_parameters": {"no_requeue": True}})
    params = allocation_for(run, 8).executor_parameters(name="t")
    assert params["slurm_additional_parameters"] == {"no-requeue": True}


def test_a_job_without_a_layout_name_is_named_as_a_sweep():
    from moemesh.launch.slurm import job_name

    a = allocation_for(_slurm_run(), 8)
    assert job_name([SweepJob(0, [], a)]) == "moemesh-sweep"  # never "moemesh-"
