"""Every mistake a user can type: one line on stderr, exit code 2, no traceback, and no
run or sweep directory left behind. Nothing starts.

The corpus runs through the real entry point (``train.cli``) in this process, where each
case costs milliseconds; a few cases also run as real processes, for the exit code and
stderr as a shell sees them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import config_error_line, passed_cli, refused_cli

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    # Hydra's own failures, turned into one line
    (["parallel.expert_parallel_size=two"], "parallel.expert_parallel_size=two: expected an integer"),
    (
        ["parallel.expert_paralel_size=2"],
        "parallel.expert_paralel_size: no such key; did you mean parallel.expert_parallel_size?",
    ),
    (["+parallel.bogus_key=1"], "'+' cannot add keys to moemesh's config groups"),
    (["++parallel.bogus_key=1"], "parallel.bogus_key: no such key"),
    (["parallel=does_not_exist"], "parallel=does_not_exist: no such preset (valid: dp2, dp4"),
    (["parallel=ep3"], "parallel=ep3: no such preset; did you mean"),
    (
        ["model=nope"],
        "model=nope: no such preset (valid: hf, mixtral_8x7b, olmoe_1b_7b, qwen3_30b_a3b, seed_4096, small, tiny)",
    ),
    (["trainer.lr=abc"], "trainer.lr=abc: expected a number"),
    # a value of the wrong shape: OmegaConf's wording named types, not what to type
    (["parallel.pipeline_split=3"], "parallel.pipeline_split: expected a list in brackets (parallel.pipeline_split=[."),
    (["model.renormalize=maybe"], "model.renormalize=maybe: expected true or false"),
    # OmegaConf takes any number for a bool: 2 was silently true
    (["parallel=tp2", "parallel.sequence_parallel=2"], "parallel.sequence_parallel=2: expected true or false"),
    (["-m", "checkpoint.save_final=true,-1"], "checkpoint.save_final=-1: expected true or false"),
    (["kernels=torch"], "kernels=torch: kernels is a group of keys (backend), not a value; set one: kernels.backend"),
    (["trainer.steps=1.5"], "trainer.steps=1.5: expected an integer"),
    # a time key says its unit, and sbatch's clock format is converted
    (
        ["cluster=slurm", "cluster.slurm.time_min=01:30:00"],
        "cluster.slurm.time_min=01:30:00: expected a whole number of minutes (cluster.slurm.time_min=90 for 01:30:00)",
    ),
    (["cluster.collective_timeout_s=5m"], "cluster.collective_timeout_s=5m: expected a whole number of seconds"),
    (["cluster.calibration.flops_per_s=fast"], "cluster.calibration.flops_per_s=fast: expected a number"),
    (["trainer.stpes=10"], "trainer.stpes: no such key; did you mean trainer.steps?"),
    (["foo=1"], "foo: no such key"),
    (["+foo=1"], "foo: no such key"),
    # the group itself is no guess for a key in it; a same-named key in another group is
    (["+model.foo=1"], "model.foo: no such key; model has 40 keys: `python train.py --cfg job --package model`"),
    (["trainer.capacity_factor=2"], "trainer.capacity_factor: no such key; did you mean model.capacity_factor?"),
    (["checkpoint.foo=1"], "checkpoint.foo: no such key; valid keys here: every, keep, save_final, dir"),
    (["trainer.steps=${oc.env:HOME}"], "trainer.steps="),
    (["a=b=c"], "cannot parse the override"),
    # Hydra's and OmegaConf's words before: "Error parsing override", "does not support deletion"
    (["trainer.steps"], "trainer.steps: an override is key=value (e.g. trainer.steps=100)"),
    (["~trainer.steps"], "~trainer.steps: moemesh's config keys cannot be removed; set a value instead"),
    (["~model"], "~model: a config group cannot be removed; choose one of its presets (model=<preset>)"),
    (["data.kind=null"], "data.kind: cannot be null"),
    (["model.num_experts=[1,2]"], "model.num_experts=[1, 2]: expected an integer"),
    (["--bogus-flag"], "unrecognized argument --bogus-flag"),
    (["--local_rank=x"], "--local_rank=x: expected a non-negative integer"),
    # keys the chosen data source would ignore
    (
        ["data.path=/tmp/train.bin"],
        "data.path=/tmp/train.bin is ignored by data=stdlib; it is read by data=tokens or data=memmap",
    ),
    (["data=synthetic", "data.cache_dir=/tmp"], "data.cache_dir=/tmp is ignored by data=synthetic"),
    (["data=memmap", "data.path=/nonexistent/train.bin"], "data.path=/nonexistent/train.bin: no such file"),
    # cross-key validation
    (
        ["parallel=ep4", "model.num_experts=6"],
        "model.num_experts=6 must be divisible by parallel.expert_parallel_size=4",
    ),
    (["parallel=dp4", "trainer.global_batch_size=6"], "trainer.global_batch_size=6 must be divisible"),
    (["trainer.micro_steps=0"], "trainer.micro_steps=0 must be a positive integer or null"),
    (["trainer.micro_steps=3"], "must be divisible by micro_steps*dp*ep = 3*1*1 = 3"),
    (
        ["trainer.micro_steps=2", "trainer.micro_batch_size=2"],
        "trainer.micro_steps=2 and trainer.micro_batch_size=2 disagree",
    ),
    (["parallel=pp2", "trainer.micro_steps=1"], "1F1B needs micro-batches >= parallel.pipeline_parallel_size=2"),
    # routing and compilation (#31)
    (["model.max_ranks_per_token=1"], "model.max_ranks_per_token=1 limits the EP ranks a token reaches"),
    (["parallel=ep2", "model.max_ranks_per_token=2"], "nothing to limit; set it below 2"),
    (["model.router_groups=3"], "model.router_groups=3 must divide model.num_experts=8"),
    (["trainer.compile=all"], "trainer.compile='all' is not one of none, blocks, model"),
    (["parallel=pp2", "trainer.compile=model"], "trainer.compile=model compiles the model's forward"),
    (
        ["parallel=pp2", "parallel.pipeline_schedule=zbv", "trainer.compile=blocks"],
        "trainer.compile=blocks needs gpipe, 1f1b or interleaved_1f1b",
    ),
    (["model.top_k=9"], "model.top_k=9 must be between 1 and model.num_experts=8"),
    (["model.hidden_size=30"], "model.hidden_size=30 must be divisible by model.num_heads=4"),
    (["trainer.seq_len=4096"], "trainer.seq_len=4096 must be <= model.max_seq_len"),
    (["kernels.backend=cuda"], "kernels.backend='cuda' is not one of auto, triton, torch"),
    (["trainer.on_nonfinite=maybe"], "trainer.on_nonfinite='maybe' is not one of stop, skip"),
    (["parallel.comm_optimization.overlap_chunks=0"], "parallel.comm_optimization.overlap_chunks=0 must be >= 1"),
    (
        ["parallel.comm_optimization.shared_expert_overlap=last"],
        "parallel.comm_optimization.shared_expert_overlap='last' is not one of none, dispatch, combine",
    ),
    (["parallel.pipeline_split=[1,3]"], "needs parallel.pipeline_parallel_size > 1"),
    (["cluster=torchrun"], "cluster.launcher=torchrun but this process has no torchrun environment"),
    (["resume=/nonexistent/ckpt"], "resume=/nonexistent/ckpt: no complete checkpoint there"),
    # numbers: non-finite or out of range, refused with the range (each was a traceback or a silent run)
    (["trainer.seed=-1", "data=synthetic"], "trainer.seed=-1 must be in [0, 2**64-1 = 18446744073709551615]"),
    (["trainer.seed=18446744073709551616"], "trainer.seed=18446744073709551616 must be in [0, 2**64-1"),
    (["model.init_std=nan"], "model.init_std=nan must be a finite number > 0"),
    (["trainer.grad_clip=nan"], "trainer.grad_clip=nan must be a finite number >= 0 (0: no clipping)"),
    (["model.capacity_factor=1e-9"], "model.capacity_factor=1e-09 must be null (dropless) or a finite number >= 0.1"),
    (["model.rope_theta=0"], "model.rope_theta=0.0 must be a finite number > 0"),
    (["model.norm_eps=-1"], "model.norm_eps=-1.0 must be a finite number > 0"),
    (["model.aux_loss_factor=inf"], "model.aux_loss_factor=inf must be a finite number >= 0"),
    (["cluster.preempt_grace_s=-5"], "cluster.preempt_grace_s=-5 must be a number of seconds >= 0"),
    (["trainer.lr=inf"], "trainer.lr=inf must be a finite number > 0"),
    (["trainer.min_lr=nan"], "trainer.min_lr=nan must be a finite number >= 0"),
    (["trainer.max_skipped_steps=0"], "trainer.max_skipped_steps=0 must be a positive integer"),
    # a model that cannot fit this machine (it was a traceback allocating the weights)
    (["model.hidden_size=1048576"], "model=tiny (model.hidden_size=1,048,576, model.num_layers=4) needs "),
    (["model.vocab_size=1000000000"], "model=tiny (most of it: model.vocab_size=1,000,000,000, model.hidden_size"),
    # FSDP2's uneven split of a non-expert tensor: the hint is its dim, not the experts per rank
    (
        ["parallel=tp2_ep2_dp2", "parallel.sharding=zero3", "model.num_experts=6", "model.hidden_size=126"]
        + ["model.head_dim=32"],
        "embed.weight [128, 126] would be split along dim 1 (126) over 4 ranks unevenly, which FSDP2 refuses; use "
        "parallel.sharding=none or a layout where it divides (its dim 1 (126) divisible by the 4 ranks that shard",
    ),
    # an overlap past a rank's tokens: empty All-to-Alls by the thousand (no step finished in 120 s)
    (
        ["parallel=ep2", "parallel.comm_optimization.all_to_all_overlap=true"]
        + ["parallel.comm_optimization.overlap_chunks=100000"],
        "parallel.comm_optimization.overlap_chunks=100000 must be <= the 1024 tokens each rank routes per forward",
    ),
    # interpolations that cannot resolve
    (["trainer.steps=${trainer.steps}"], "trainer.steps: Recursive interpolation detected"),
    (["trainer.lr=${oc.env:HOME}"], "trainer.lr="),
    # a preset whose degrees were overridden is no longer that preset: its name would mislabel the run
    (
        ["parallel=ep4", "parallel.expert_parallel_size=2"],
        "parallel.name=ep4 but the degrees are dp1·ep2·tp1·pp1, whose name is ep2: use parallel=ep2",
    ),
    (
        ["-m", "parallel=ep4,ep2", "parallel.expert_parallel_size=2"],
        "nothing was run; job #0 (parallel=ep4 parallel.expert_parallel_size=2): parallel.name=ep4 but",
    ),
    # sweeps: one bad job refuses the whole sweep before anything runs (basic launcher)
    (["-m", "parallel=ep2,ep3"], "parallel=ep3: no such preset"),
    (
        ["-m", "parallel=ep2,ep4", "model.num_experts=6"],
        "nothing was run; 1 problem(s) in this sweep of 2 job(s): job #1 (parallel=ep4): model.num_experts=6",
    ),
    (["-m", "parallel=dp4,ep4", "trainer.global_batch_size=6"], "nothing was run; 2 problem(s) in this sweep of 2"),
    (["-m", "trainer.lr=1e-3,abc"], "trainer.lr=abc: expected a number"),
    (["-m", "parallel=ep2", "data.path=/tmp/x.bin"], "data.path=/tmp/x.bin is ignored by data=stdlib"),
    # issue #27: a run or sweep directory that cannot be created (a 12- or 22-line traceback)
    (["hydra.run.dir=/proc/nope"], "hydra.run.dir=/proc/nope: cannot be created and written: [Errno 2 ENOENT]"),
    (
        ["-m", "trainer.lr=1e-3,2e-3", "hydra.sweep.dir=/proc/nope"],
        "hydra.sweep.dir=/proc/nope: cannot be created and written: [Errno 2 ENOENT]",
    ),
    (["hydra.run.dir=/dev/null/run"], "hydra.run.dir=/dev/null/run: cannot be created and written: [Errno 20 ENOTDIR]"),
    # found by the ranks once the model was built (exit 1, a run directory left behind)
    (["checkpoint.dir=/dev/null"], "checkpoint.dir=/dev/null: cannot be created and written: [Errno 20 ENOTDIR]"),
    (["parallel=ep2", "checkpoint.dir=/dev/null/c"], "checkpoint.dir=/dev/null/c: cannot be created and written"),
    # wandb names wandb.init would refuse on rank 0 once the ranks run (a traceback, exit 1)
    (["logger=wandb", "logger.project=a/b"], "logger.project='a/b' cannot hold / (wandb refuses any of / \\ # ? % :)"),
    (["parallel=ep2", "logger=wandb", "logger.entity=team:x"], "logger.entity='team:x' cannot hold :"),
    # issue #27: a batch whose micro-batches cannot fit this machine (it was killed at 24 GB)
    (["trainer.global_batch_size=2147483648"], "trainer.global_batch_size=2147483648 (a micro-batch of"),
    # the SLURM launcher's checks, made before Hydra writes the sweep's multirun.yaml
    (["-m", "cluster=slurm", "cluster.slurm.time_min=0"], "cluster.slurm.time_min=0 must be a positive number of"),
    (
        ["-m", "cluster=slurm", "parallel=ep2,dp2", "+cluster.slurm.additional_parameters.ntasks_per_node=1"],
        "moemesh sets --ntasks-per-node itself",
    ),
]


@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(argv, needle, tmp_path, monkeypatch, capsys):
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    assert needle in config_error_line(code, err)
    assert list(tmp_path.iterdir()) == []  # no outputs/ or multirun/ directory


@pytest.mark.parametrize(
    "var, value, needle",
    [
        ("WANDB_MODE", "bogus", "WANDB_MODE='bogus' is not one of online, offline, shared, disabled, dryrun, run"),
        ("WANDB_PROJECT", "team/p", "WANDB_PROJECT='team/p' cannot hold / (wandb refuses any of"),
    ],
)
def test_a_wandb_setting_wandb_would_refuse_is_one_line_before_anything_starts(
    var, value, needle, tmp_path, monkeypatch, capsys
):
    """WANDB_MODE=bogus was a pydantic traceback from wandb.init on rank 0; now the logger's
    own check refuses it, as it does logger.project and logger.entity."""
    monkeypatch.setenv(var, value)
    code, _, err = refused_cli(["parallel=ep2", "logger=wandb"], tmp_path, monkeypatch, capsys)
    assert needle in config_error_line(code, err)
    assert list(tmp_path.iterdir()) == []


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and sum(a[0] == "-m" for a, _ in CASES) >= 4


def _run(tmp_path, *argv, env_extra=None):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID", "HYDRA_FULL_ERROR")
    }
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["parallel.expert_paralel_size=2"], "did you mean parallel.expert_parallel_size?"),
        (["-m", "parallel=ep2,dp4", "trainer.global_batch_size=6"], "nothing was run; 1 problem(s) in this sweep of 2"),
        (["parallel=ep3"], "no such preset"),
    ],
)
def test_as_a_shell_sees_it(tmp_path, argv, needle):
    proc = _run(tmp_path, *argv)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.shares_cores
def test_hydra_full_error_still_gives_the_whole_trace(tmp_path):
    proc = _run(tmp_path, "parallel.expert_paralel_size=2", env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "expert_paralel_size" in proc.stderr


# --- issue #27: ownership of a run directory, config files, directories ---------------------------


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A step_N directory whose meta.json the default run would resume from (no tensors: what is
    checked before any rank starts reads only meta.json)."""
    import dataclasses

    from moemesh.config.cli import compose_run

    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    model = dataclasses.asdict(compose_run([]).model)
    meta = {"step": step, "files": {}, "layout": "single", "dp": 1, "ep": 1, "tp": 1, "pp": 1, "model": model}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def _with_position(ckpt: Path, run, *, fingerprint: str | None = None) -> Path:
    """Give a fake checkpoint the data position ``run``'s reader records after its step (with
    another ``fingerprint``: a position from other data)."""
    from moemesh.data.reader import TokenData
    from moemesh.data.resolve import check_data

    spec = check_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    meta = json.loads((ckpt / "meta.json").read_text())
    data = TokenData(spec, seed=run.trainer.seed)
    try:
        position = data.position(meta["step"], global_batch=run.trainer.global_batch_size, seq_len=run.trainer.seq_len)
    finally:
        data.close()
    meta["data"] = {**position, **({"fingerprint": fingerprint} if fingerprint else {})}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize("command", ["sweep", "slurm"])
def test_a_resume_from_other_data_is_refused_before_any_job_starts_or_is_queued(command, tmp_path, monkeypatch, capsys):
    """Checked only once a job ran: a local sweep's later job failed after the first had trained,
    and a SLURM job waited in the queue to exit 2 on its compute node."""
    from moemesh.config.cli import compose_run

    run = compose_run(["data=synthetic"])
    ckpt = _with_position(_fake_checkpoint(tmp_path / "old" / "checkpoints", 1), run, fingerprint="0" * 64)
    argv = ["-m", "trainer.lr=1e-3,2e-3", "data=synthetic", f"resume={ckpt}", f"hydra.sweep.dir={tmp_path / 'sw'}"]
    if command == "slurm":
        argv.append("cluster=slurm")
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"{ckpt}: it was trained on other data (sources synthetic, seq_len {run.trainer.seq_len}" in line, line
    assert not (tmp_path / "sw").exists()


def test_a_resume_from_the_same_data_passes_the_checks(tmp_path, monkeypatch):
    from moemesh.config.cli import compose_run

    run = compose_run(["data=synthetic"])
    ckpt = _with_position(_fake_checkpoint(tmp_path / "old" / "checkpoints", 1), run)
    assert passed_cli(["data=synthetic", f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch)


@pytest.mark.parametrize("multirun", [False, True])
def test_a_fresh_run_into_a_directory_with_checkpoints_is_one_line_and_touches_nothing(
    multirun, tmp_path, monkeypatch, capsys
):
    """It saved, and pruning deleted each save at once in favour of the old run's higher steps."""
    if multirun:
        run_dir = tmp_path / "sweep"
        _fake_checkpoint(run_dir / "1_single" / "checkpoints", 7)
        argv = ["-m", "trainer.lr=1e-3,2e-3", f"hydra.sweep.dir={run_dir}"]
    else:
        run_dir = tmp_path / "run"
        _fake_checkpoint(run_dir / "checkpoints", 7)
        argv = [f"hydra.run.dir={run_dir}"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert "already holds 1 checkpoint(s) of an earlier run (the newest: step_000007)" in line
    assert "continue that run with resume=auto" in line
    assert ("hydra.sweep.dir=<new dir>" if multirun else "hydra.run.dir=<new dir>") in line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("multirun", [False, True])
def test_a_fresh_run_into_a_run_directory_with_records_is_one_line_and_touches_nothing(
    multirun, tmp_path, monkeypatch, capsys
):
    """A run that saved no checkpoint (checkpoint.dir elsewhere, save_final=false) left its
    metrics.jsonl and summary.json: a fresh run into that directory rewrote both."""
    run_dir = tmp_path / "sweep" / "0_single" if multirun else tmp_path / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    argv = ["-m", "trainer.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else []
    argv = argv or [f"hydra.run.dir={run_dir}"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"{run_dir} holds another run's metrics.jsonl, which this run would overwrite" in line
    assert "resume=auto" not in line  # no checkpoint there to continue: resume=auto would overwrite them too
    assert ("hydra.sweep.dir=<new dir>" if multirun else "hydra.run.dir=<new dir>") in line
    assert line.startswith("moemesh: config error: job #0 (") == multirun
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("name", "multirun"), [("metrics.jsonl", False), ("summary.json", True), ("train.log", False)])
def test_a_record_name_taken_by_a_directory_is_one_line_before_any_rank_starts(
    name, multirun, tmp_path, monkeypatch, capsys
):
    """Rank 0 opened metrics.jsonl once the model was built and died with a traceback, and
    summary.json only after the last step, its numbers lost."""
    run_dir = tmp_path / "sweep" / "1_single" if multirun else tmp_path / "run"
    (run_dir / name).mkdir(parents=True)
    argv = ["-m", "trainer.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else []
    argv = argv or [f"hydra.run.dir={run_dir}"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"{run_dir / name} is a directory, and the run writes a file of that name there" in line, line
    assert ("hydra.sweep.dir=<new dir>" if multirun else "hydra.run.dir=<new dir>") in line
    assert line.startswith("moemesh: config error: job #1 (") == multirun
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_a_file_where_the_run_saves_its_checkpoints_is_one_line(kind, tmp_path, monkeypatch, capsys):
    """The ranks found it once the model was built (checkpoint.dir cannot be written: EEXIST)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if kind == "file":
        (run_dir / "checkpoints").write_text("")
    else:
        (run_dir / "checkpoints").symlink_to(tmp_path / "nowhere")
    code, _, err = refused_cli([f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"{run_dir / 'checkpoints'} is not a directory, and the run saves its checkpoints there" in line, line
    assert passed_cli([f"hydra.run.dir={run_dir}", "checkpoint.save_final=false"], tmp_path, monkeypatch)


def test_record_names_that_are_links_to_files_or_dangling_pass(tmp_path, monkeypatch):
    """A link is what the run opens: one to a file (or to where a file will be) is a file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "log.txt").write_text("")
    (run_dir / "train.log").symlink_to(tmp_path / "log.txt")
    (run_dir / "summary.json").symlink_to(tmp_path / "not-yet.json")
    assert passed_cli([f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch)


@pytest.mark.parametrize("resume", ["auto", "elsewhere"])
def test_a_resume_that_would_start_or_mix_records_beside_another_runs_is_one_line(
    resume, tmp_path, monkeypatch, capsys
):
    """resume=auto with no checkpoint to continue starts fresh, and a checkpoint from another run
    appends its steps after the first run's: either way the directory's records are lost or mixed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    given = "auto" if resume == "auto" else str(_fake_checkpoint(tmp_path / "other" / "checkpoints", 7))
    code, _, err = refused_cli([f"hydra.run.dir={run_dir}", f"resume={given}"], tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    says = "which this run would overwrite" if resume == "auto" else "continues another run's checkpoint"
    assert f"{run_dir} holds another run's metrics.jsonl" in line and says in line, line


def test_a_rewind_into_a_directory_with_newer_checkpoints_is_one_line(tmp_path, monkeypatch, capsys):
    """Resumed from step 2 beside step 6, the run's own resume line (resume=auto) took step 6:
    the rewound trajectory was lost without a word. Elsewhere (checkpoint.dir), it runs."""
    root = tmp_path / "run" / "checkpoints"
    older = _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 6)
    argv = [f"hydra.run.dir={tmp_path / 'run'}", f"resume={older}"]
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"resume={older} is step 2, but {root} holds step_000006, newer" in line
    assert "checkpoint.dir=<new dir>" in line
    assert passed_cli([*argv, f"checkpoint.dir={tmp_path / 'rewound'}"], tmp_path, monkeypatch)


def test_a_rewind_names_the_newest_checkpoint_and_resuming_the_newest_runs(tmp_path, monkeypatch, capsys):
    """Beside several newer checkpoints the line names the newest, the one resume=auto would
    take; the newest itself, given as resume, has none newer beside it and runs."""
    root = tmp_path / "run" / "checkpoints"
    oldest, _, newest = (_fake_checkpoint(root, step) for step in (2, 4, 6))
    argv = [f"hydra.run.dir={tmp_path / 'run'}", f"resume={oldest}"]
    line = config_error_line(*refused_cli(argv, tmp_path, monkeypatch, capsys)[::2])
    assert f"resume={oldest} is step 2, but {root} holds step_000006, newer" in line
    assert passed_cli([f"hydra.run.dir={tmp_path / 'run'}", f"resume={newest}"], tmp_path, monkeypatch)


def test_an_empty_metrics_file_is_no_other_runs_records(tmp_path, monkeypatch):
    """A run that stopped before its first record leaves an empty metrics.jsonl: nothing to lose,
    so a fresh run into that directory runs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    assert passed_cli([f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch)


def test_a_run_directory_given_as_resume_points_to_its_checkpoints(tmp_path, monkeypatch, capsys):
    _fake_checkpoint(tmp_path / "old" / "checkpoints", 7)
    argv = [f"hydra.run.dir={tmp_path / 'run'}", f"resume={tmp_path / 'old'}"]
    line = config_error_line(*refused_cli(argv, tmp_path, monkeypatch, capsys)[::2])
    assert line.endswith(f"valid: null, auto, such a path; did you mean resume={tmp_path / 'old' / 'checkpoints'}?")


def test_the_same_command_with_resume_auto_passes_the_check(tmp_path, monkeypatch, capsys):
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 7)
    assert passed_cli([f"hydra.run.dir={tmp_path / 'run'}", "resume=auto"], tmp_path, monkeypatch)


def test_a_calibrated_cluster_config_with_a_python_tag_is_one_line(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """It was refused safely (YAML's safe loader), as an 88-line traceback."""
    import moemesh.config.cli as cli

    conf = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(cli.CONF_DIR, conf)
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    (conf / "cluster" / "calibrated" / "evil.yaml").write_text(
        "defaults:\n  - /cluster/local@_here_\n  - _self_\nname: calibrated/evil\n"
        f'calibration:\n  flops_per_s: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    monkeypatch.setattr(cli, "CONF_DIR", conf)
    code, _, err = refused_cli(["cluster=calibrated/evil"], tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"{conf / 'cluster' / 'calibrated' / 'evil.yaml'}, line 6: could not determine a constructor" in line
    assert "no !!python tags" in line
    assert not marker.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("group", "text", "says"),
    [
        ("parallel/mine", "name: ep2\nexpert_paralel_size: 2\n", "parallel.expert_paralel_size: no such key; did you"),
        ("parallel/mine", "name: ep2\nsharding: zero4\n", "parallel.sharding='zero4' is not one of none, zero2, zero3"),
        (
            "cluster/calibrated/mine",
            "defaults:\n  - /cluster/local@_here_\n  - _self_\ncalibration:\n  flops_per_sec: 5e9\n",
            "cluster.calibration.flops_per_sec: no such key; did you mean cluster.calibration.flops_per_s?",
        ),
    ],
)
def test_a_mistake_inside_a_group_file_names_the_file_and_the_key(
    group, text, says, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    """Hydra's first line named only the file ("In 'parallel/mine': ConfigKeyError raised while
    composing config:"): the key was on a line the one-line report dropped."""
    import moemesh.config.cli as cli

    conf = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(cli.CONF_DIR, conf)
    (conf / f"{group}.yaml").write_text(text)
    monkeypatch.setattr(cli, "CONF_DIR", conf)
    code, _, err = refused_cli([f"{group.split('/')[0]}={group.split('/', 1)[1]}"], tmp_path, monkeypatch, capsys)
    line = config_error_line(code, err)
    assert f"{conf / group}.yaml: {says}" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.shares_cores
@pytest.mark.parametrize(
    "argv", [["hydra.run.dir=/proc/nope"], ["-m", "trainer.lr=1e-3,2e-3", "hydra.sweep.dir=/proc/nope"]]
)
def test_an_unusable_run_or_sweep_dir_as_a_shell_sees_it(tmp_path, argv):
    proc = _run(tmp_path, *argv)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "/proc/nope: cannot be created" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- issue #27: no environment variable's value in a config error ---------------------------------

SECRET = "AKIA-moemesh-test-Zq7xW3vR9"  # planted; it must appear in no output


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["trainer.steps=${oc.env:MOEMESH_TEST_SECRET}"], "trainer.steps=${oc.env:MOEMESH_TEST_SECRET}: expected"),
        (["trainer.lr=${oc.env:MOEMESH_TEST_SECRET,0.001}"], "trainer.lr=${oc.env:MOEMESH_TEST_SECRET,0.001}"),
        (["model.num_experts=x${oc.env:MOEMESH_TEST_SECRET}"], "model.num_experts=x${oc.env:MOEMESH_TEST_SECRET}"),
        (["parallel=${oc.env:MOEMESH_TEST_SECRET}"], "parallel=${oc.env:MOEMESH_TEST_SECRET}: no such preset"),
        (["data.path=${oc.env:MOEMESH_TEST_SECRET}"], "data.path=${oc.env:MOEMESH_TEST_SECRET} is ignored"),
        (["hydra.run.dir=/proc/${oc.env:MOEMESH_TEST_SECRET}"], "hydra.run.dir=/proc/${oc.env:MOEMESH_TEST_SECRET}:"),
    ],
)
def test_a_config_error_prints_the_interpolation_never_the_secret(argv, shown, tmp_path, monkeypatch, capsys):
    """It printed the resolved value, twice ("trainer.steps=<secret> (${oc.env:...} resolves to
    '<secret>')"); stderr goes into SLURM .err files and CI logs."""
    monkeypatch.setenv("MOEMESH_TEST_SECRET", SECRET)
    code, out, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    assert SECRET not in out + err and "AKIA" not in out + err, err
    assert shown in config_error_line(code, err)


def test_hide_env_keeps_short_values_inside_other_words():
    from moemesh.config.cli import hide_env

    os.environ["MOEMESH_TEST_SHORT"] = "12"
    try:
        line = hide_env("trainer.steps=12: 12 must be <= 120", ["trainer.steps=${oc.env:MOEMESH_TEST_SHORT}"])
    finally:
        del os.environ["MOEMESH_TEST_SHORT"]
    assert line == "trainer.steps=${oc.env:MOEMESH_TEST_SHORT}: ${oc.env:MOEMESH_TEST_SHORT} must be <= 120"


def test_hide_env_replaces_the_longer_of_two_nested_values_first(monkeypatch):
    """A value that holds another variable's value (a token and its prefix) is replaced whole:
    replacing the shorter one first would leave the rest of the longer one in the line."""
    from moemesh.config.cli import hide_env

    monkeypatch.setenv("MOEMESH_TEST_LONG", "hunter2-and-more")
    monkeypatch.setenv("MOEMESH_TEST_PREFIX", "hunter2")
    argv = ["trainer.lr=${oc.env:MOEMESH_TEST_LONG}", "trainer.steps=${oc.env:MOEMESH_TEST_PREFIX}"]
    line = hide_env("trainer.lr=hunter2-and-more, trainer.steps=hunter2", argv)
    assert line == "trainer.lr=${oc.env:MOEMESH_TEST_LONG}, trainer.steps=${oc.env:MOEMESH_TEST_PREFIX}"


def test_hide_env_replaces_a_value_of_4_characters_inside_other_words(monkeypatch):
    """Only a value shorter than 4 characters is kept where it stands inside a word: one of 4 is
    replaced wherever it stands, like any longer value."""
    from moemesh.config.cli import hide_env

    monkeypatch.setenv("MOEMESH_TEST_FOUR", "q7zx")
    line = hide_env("data.path=/data/q7zx.bin", ["data.path=/data/${oc.env:MOEMESH_TEST_FOUR}.bin"])
    assert line == "data.path=/data/${oc.env:MOEMESH_TEST_FOUR}.bin"


def test_hide_env_hides_a_variable_that_only_a_config_file_names(tmp_path, monkeypatch):
    """An ``${oc.env:...}`` in a group's YAML file (a calibrated preset, say) is hidden too, though
    the command line never names the variable."""
    import moemesh.config.cli as cli

    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mine.yaml").write_text("slurm:\n  account: ${oc.env:MOEMESH_TEST_FROM_FILE}\n")
    monkeypatch.setattr(cli, "CONF_DIR", tmp_path)
    monkeypatch.setenv("MOEMESH_TEST_FROM_FILE", "acct-0xdeadbeef")
    line = cli.hide_env("cluster.slurm.account=acct-0xdeadbeef: refused", ["cluster=mine"])
    assert line == "cluster.slurm.account=${oc.env:MOEMESH_TEST_FROM_FILE}: refused"


@pytest.mark.slow
@pytest.mark.shares_cores
def test_no_secret_in_anything_a_shell_sees(tmp_path):
    """The same, as a shell runs it: every byte of stdout and stderr grepped."""
    for arg in ("trainer.steps=${oc.env:MOEMESH_TEST_SECRET}", "trainer.lr=${oc.env:MOEMESH_TEST_SECRET,0.001}"):
        proc = _run(tmp_path, arg, env_extra={"MOEMESH_TEST_SECRET": SECRET})
        assert proc.returncode == 2 and "${oc.env:MOEMESH_TEST_SECRET" in proc.stderr, proc.stderr
        assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["hydra.run.dir="], ["-m", "hydra.sweep.dir=", "trainer.lr=1e-3,2e-3"]])
def test_an_empty_output_directory_is_refused_not_the_current_one(argv, tmp_path, monkeypatch, capsys):
    """hydra.run.dir= trained into the current directory (the repository, from its root): .hydra/,
    checkpoints/, metrics.jsonl among the sources."""
    code, _, err = refused_cli(argv, tmp_path, monkeypatch, capsys)
    key = "hydra.sweep.dir" if "-m" in argv else "hydra.run.dir"
    assert f"{key} is empty; give the directory the run writes" in config_error_line(code, err)
    assert list(tmp_path.iterdir()) == []
