"""The numbers a run reports, on cases with known answers, and the same on every rank."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moemesh.launch import RankContext
from moemesh.moe.dispatcher import AllToAllDispatcher
from moemesh.parallel.comm import CommMeter
from moemesh.parallel.dims import ParallelDims
from moemesh.parallel.mesh import build_mesh
from moemesh.runs.records import TIME_KEYS, RunSummary, StepRecord, TimeRecord
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import train
from moemesh.trainer.step_stats import LayerStats, RankTimes, ReducedStats, StepShape, fanout, load_stats, step_record
from tests.dist_utils import run_on_ranks
from tests.helpers import tiny_run

ROOT = Path(__file__).resolve().parents[2]


def test_load_statistics_of_a_known_assignment():
    layer = LayerStats(
        counts_E=torch.tensor([4.0, 0.0, 0.0, 0.0], dtype=torch.float64),  # everything on expert 0
        score_sum_E=torch.tensor([2.0, 1.0, 0.5, 0.5], dtype=torch.float64),  # score sums over 4 tokens
        dropped=1.0,  # one dropped pair
        aux_loss=0.0,
        z_loss=0.0,
        seq_aux_loss=0.0,
        entropy_sum=4 * math.log(4),  # uniform routers
    )
    st = load_stats(layer, tokens=4, norm=1)
    assert st["tokens_per_expert"] == [4, 0, 0, 0]
    assert st["cv"] == pytest.approx(math.sqrt(3))  # std([4,0,0,0]) = sqrt(3), mean 1
    assert st["max_over_mean"] == 4.0 and st["min"] == 0
    assert st["mean_score"] == [0.5, 0.25, 0.125, 0.125]
    assert st["entropy"] == pytest.approx(math.log(4))
    assert st["dropped_fraction"] == pytest.approx(0.25)
    balanced = dataclasses.replace(layer, counts_E=torch.ones(4, dtype=torch.float64))
    assert load_stats(balanced, tokens=4, norm=1)["cv"] == 0.0


def test_packed_rows_unpack_by_name():
    E = 3
    row = torch.arange(2 * E + 5, dtype=torch.float64)
    layer = LayerStats.unpack(row, E)
    assert layer.counts_E.tolist() == [0, 1, 2] and layer.score_sum_E.tolist() == [3, 4, 5]
    assert (layer.dropped, layer.aux_loss, layer.z_loss, layer.seq_aux_loss, layer.entropy_sum) == (6, 7, 8, 9, 10)


def _a2a_bytes(rank, world):
    """EP=2, T=6 tokens, K=2, D=5 fp32: rank 0 routes every pair to rank 1's experts, rank 1 keeps
    its own. Rank 0 sends 12 rows forward and gets them back in the combine."""
    pm = build_mesh(ParallelDims(ep=2), "cpu")
    meter = CommMeter()
    disp = AllToAllDispatcher(num_experts=4, ep_group=pm.ep_group, meter=meter)
    T, K, D = 6, 2, 5
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.tensor([[2, 3]] * T) if rank == 0 else torch.tensor([[2, 3]] * T)
    rows, meta = disp.dispatch(x, ids)
    out = disp.combine(rows * 2.0, torch.ones(T, K), meta)
    out.sum().backward()
    got = meter.collect()
    row = D * 4
    # Rank 0: 12 rows leave (dispatch fwd, combine bwd) and 12 come back (combine fwd is rank 1's
    # job; rank 0 sends nothing then), so it sends 12 rows twice. Rank 1 receives 12 rows and
    # sends them back in the combine, and the dispatch's backward.
    assert got["bytes_sent"] == 2 * 12 * row, (rank, got)
    assert got["bytes_recv"] == 2 * 12 * row, (rank, got)
    assert got["min_bytes"] == got["bytes_sent"]  # dropless: exactly the minimum
    assert got["dispatch_s"] > 0 and got["combine_s"] > 0


@pytest.mark.slow
def test_all_to_all_bytes_of_a_known_routing():
    run_on_ranks(_a2a_bytes, 2)


def _every_rank_agrees(rank, world, root, paths):
    run = tiny_run(
        **{
            "parallel.name": "tp2_ep2",
            "parallel.expert_parallel_size": 2,
            "parallel.tensor_parallel_size": 2,
            "trainer.steps": 3,
            "data.name": "stdlib",
            "data.kind": "stdlib",
            "model.expert_bias_update_rate": 0.01,
        }
    )
    dims = ParallelDims(ep=2, tp=2)
    ctx = RankContext(
        rank=rank,
        local_rank=rank,
        device=torch.device("cpu"),
        mesh=build_mesh(dims, "cpu"),
        output_dir=root,
        data_paths=paths,
    )
    summary = train(run, ctx)
    views = [None] * world
    dist.all_gather_object(views, summary)
    assert all(v == views[0] for v in views), "ranks disagree on the reduced metrics"


@pytest.mark.slow
def test_metrics_are_identical_on_every_rank(tmp_path):
    run = tiny_run(**{"data.name": "stdlib", "data.kind": "stdlib"})
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    run_on_ranks(_every_rank_agrees, 4, str(tmp_path), paths)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The contract: every key a record has is one StepRecord names (optional ones only where they
    # apply), and time.* are exactly TIME_KEYS, in order.
    required, optional = StepRecord.__required_keys__, StepRecord.__optional_keys__
    for r in records:
        assert required <= r.keys() <= required | optional, r.keys() ^ required
        assert tuple(r["time"]) == TIME_KEYS == tuple(TimeRecord.__annotations__)
    last = records[-1]
    assert last["a2a"]["ratio"] == 1.0 and last["a2a"]["bytes_sent"] > 0
    assert 0 < last["time"]["a2a"] < last["time"]["step"]
    # The routed experts' and the attention core's compute are timed apart, inside forward +
    # backward, beside the All-to-All.
    for r in records:
        inside = r["time"]["forward"] + r["time"]["backward"] + r["time"]["pipeline"]
        assert 0 < r["time"]["experts"] + r["time"]["attention_core"] + r["time"]["a2a"] < inside
        assert r["time"]["experts"] > 0 and r["time"]["attention_core"] > 0
    layer = last["load"]["layer0"]
    assert sum(layer["tokens_per_expert"]) == 8 * 32 * 2  # every (token, k) pair of the global batch
    # The logged bias range is what replaying the sign updates on the logged global counts gives.
    for name in last["load"]:
        bias = torch.zeros(8)
        for r in records:
            counts = torch.tensor(r["load"][name]["tokens_per_expert"], dtype=torch.float64)
            bias += 0.01 * torch.sign(counts.mean() - counts).float()
        assert last["load"][name]["expert_bias_range"] == pytest.approx([float(bias.min()), float(bias.max())])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary.keys() == RunSummary.__required_keys__ | RunSummary.__optional_keys__  # steps were logged
    mem = summary["memory_per_rank"]
    from moemesh.moe.param_count import count_params

    cfg = tiny_run().model
    assert mem["param_bytes"]["expert"] == {
        "min": count_params(cfg).expert * 4 // 2,
        "max": count_params(cfg).expert * 4 // 2,
    }  # fp32, EP=2
    # Adam: m and v, plus a 4-byte step counter per tensor (2 MoE layers x 3 expert tensors)
    assert mem["optimizer_bytes"]["expert"]["max"] == 2 * mem["param_bytes"]["expert"]["max"] + 6 * 4
    assert mem["grad_bytes"]["non_expert"]["max"] == mem["param_bytes"]["non_expert"]["max"]
    assert 0 < summary["a2a_share"] < 1


def test_a_run_resumed_at_its_end_keeps_its_summary(tmp_path):
    """Resumed with nothing left to train, a finished run's summary.json stayed only in name: it
    was rewritten with 0 steps and every number null, and compare.py showed dashes. Now the
    attempt that trained nothing keeps the summary, clearing only a signal's stop (the run is
    complete), and returns it."""
    from tests.helpers import train_single

    run = tiny_run(**{"trainer.steps": 2, "checkpoint.save_final": True})
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    first = train_single(run, tmp_path, paths)
    assert first["steps"] == 2 and first["final_loss"] is not None
    summary_json = tmp_path / "summary.json"
    written = json.loads(summary_json.read_text())
    stopped = {**written, "stopped_by_signal": ["SIGTERM"]}  # as if a signal had stopped the last attempt
    summary_json.write_text(json.dumps(stopped))
    again = train_single(dataclasses.replace(run, resume="auto"), tmp_path, paths)
    assert "nothing left to train" in (tmp_path / "train.log").read_text()
    assert json.loads(summary_json.read_text()) == {**written, "stopped_by_signal": None} == again


def _known_summary() -> dict:
    """A summary of known numbers, as summary.json holds it."""
    memory = {k: {"expert": {"max": 1 << 20}, "non_expert": {"max": 2 << 20}} for k in ("param_bytes", "grad_bytes")}
    memory["optimizer_bytes"] = memory["param_bytes"]
    return {
        "parallel": "ep2",
        "dp": 1,
        "ep": 2,
        "tp": 1,
        "pp": 1,
        "world_size": 2,
        "model": "tiny",
        "steps": 40,
        "final_loss": 2.5,
        "final_val_loss": 2.25,
        "median_tokens_per_s": 12_345.0,
        "median_samples_per_s": 6.0,
        "median_step_s": 0.25,
        "mfu": 0.125,
        "time_breakdown": {
            "data": 0.0,
            "forward": 0.1,
            "backward": 0.125,
            "optimizer": 0.025,
            "experts": 0.05,
            "attention_core": 0.0,
            "step": 0.25,
        },
        "a2a_share": 0.125,
        "a2a_bytes_sent_per_step": 3 << 20,
        "memory_per_rank": {**memory, "peak_bytes": {"max": 10 << 20}},
        "load_cv_final": {"layer0": 0.5},
    }


def test_the_end_of_run_summary_of_known_numbers():
    """The one-screen summary: each phase's share of the step, the step in milliseconds, MFU and
    the All-to-All share in percent, bytes in MiB, and "ranks" for more than one."""
    from moemesh.trainer.metrics import format_summary

    summary = _known_summary()
    assert format_summary(summary).splitlines() == [
        "── moemesh run summary: ep2 (dp1·ep2·tp1·pp1 = 2 ranks), model=tiny, 40 steps",
        "loss 2.5000, validation 2.2500",
        "throughput  12,345 tokens/s, 6.0 samples/s, step 250.0 ms, MFU 12.5%",
        "step time   forward 40%, backward 50%, optimizer 10% (slowest rank per phase)",
        "All-to-All  12.5% of the step (inside forward/backward), 3.0 MiB sent per rank per step",
        "timed apart 20.0% experts, 0.0% attention_core of the step (forward + backward)",
        "memory/rank expert + non-expert: params 1.0 MiB + 2.0 MiB, grads 1.0 MiB + 2.0 MiB, "
        "optimizer 1.0 MiB + 2.0 MiB; peak 10.0 MiB (max over ranks)",
        "load CV     layer0 0.50",
    ]


def test_an_attempt_that_trained_writes_its_own_summary_over_the_last_attempts(tmp_path):
    """Only an attempt that trained nothing keeps the summary.json it found; one that trained
    (a resumed run with steps left) writes its own."""
    from moemesh.trainer.metrics import MetricsLogger

    (tmp_path / "summary.json").write_text(json.dumps({**_known_summary(), "steps": 20, "final_loss": 3.0}))
    logger = MetricsLogger(str(tmp_path), enabled=True, console=False, jsonl=False, total_steps=40)
    written = logger.write_summary(_known_summary())
    logger.close()
    assert written == json.loads((tmp_path / "summary.json").read_text()) == _known_summary()


def _wandb_records(run_dir: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):  # LevelDB log framing: checksum(4) length(2) type(1) data
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    records = []
    for raw in chunks:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records, data


@pytest.mark.slow
def test_offline_wandb_run_has_layout_columns_group_and_metrics(tmp_path):
    pytest.importorskip("wandb")
    from tests.helpers import SMALL

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": "sk-do-not-log-0123456789abcdef"}
    env.pop("RANK", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "parallel=ep2",
            "logger=wandb",
            "trainer.steps=3",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *SMALL,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "sweep").glob("0_ep2")
    records, raw = _wandb_records(run_dir)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert (config["dp"], config["ep"], config["tp"], config["pp"], config["world_size"]) == (1, 2, 1, 1, 2)
    assert config["layout"] == "ep2" and config["model.num_experts"] == 8 and config["parallel.name"] == "ep2"
    assert run.display_name == "ep2" and run.job_type == "train"
    assert run.run_group == f"{tmp_path.name}/sweep"  # the sweep directory groups its runs
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert len(history) == 3
    keys = {i.key or "/".join(i.nested_key) for i in history[0].item}
    assert {"loss", "aux_loss", "tokens_per_s", "time/a2a", "a2a/bytes_sent", "load/layer0/cv"} <= keys
    assert any(k.startswith("load/layer0/tokens_per_expert") for k in keys)  # the histogram
    assert "exit" in kinds  # finish() ran
    assert b"sk-do-not-log" not in raw  # no credential in the run file, nor anywhere wandb wrote
    assert not [f for f in run_dir.rglob("*") if f.is_file() and b"sk-do-not-log" in f.read_bytes()]


def _leaves(value, prefix=""):
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _leaves(v, f"{prefix}.{key}" if prefix else key)]
    return [prefix]


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel=ep4", "model.max_ranks_per_token=2"],
        ["parallel=pp2_tp2_ep2_dp2", "model=olmoe_1b_7b", "model.max_nodes_per_token=1"],
        ["parallel=ep2", "cluster=slurm", "data=stdlib", "logger=wandb"],
    ],
)
def test_wandb_config_keeps_every_config_key_and_drops_credentials(overrides):
    """The secret filter matched "token" anywhere, so model.max_ranks_per_token, max_nodes_per_token
    and pad_token_id never reached the dashboard. Now only a key whose words name a credential
    is left out: every key of a composed config is logged; an api_key or password that a free-form
    dict (sbatch's additional_parameters) holds is not."""
    from moemesh.config.cli import compose_run
    from moemesh.trainer.wandb_tracker import flat_config

    run = compose_run(overrides)
    dims = ParallelDims.from_config(run.parallel)
    every = _leaves(dataclasses.asdict(run))
    assert {"model.max_ranks_per_token", "model.max_nodes_per_token", "model.pad_token_id"} <= set(every)
    assert set(every) <= set(flat_config(run, dims))
    credentials = {"api_key": "k", "hfToken": "t", "password": "p", "auth-token": "a", "secret": "s"}
    credentials |= {"secretkey": "k", "apitoken": "t", "mypassword": "p", "bot_token": "t", "id_token": "t"}
    slurm = dataclasses.replace(run.cluster.slurm, additional_parameters={**credentials, "comment": "kept"})
    run = dataclasses.replace(run, cluster=dataclasses.replace(run.cluster, slurm=slurm))
    config = flat_config(run, dims)
    assert config["cluster.slurm.additional_parameters.comment"] == "kept"
    assert not [k for k in config if k.split(".")[-1] in credentials]


def test_a_credential_inside_a_logged_value_is_redacted_and_settings_are_not():
    """The filter read key names only: a cluster.slurm.setup line "export HF_TOKEN=hf_..." went to
    the dashboard whole. An assignment to a credential-like name, and tokens of well-known forms,
    are replaced in every logged string; the shipped presets' values are unchanged."""
    from moemesh.config.cli import compose_run
    from moemesh.trainer.wandb_tracker import REDACTED, flat_config

    run = compose_run(["parallel=ep2", "cluster=slurm", "data=stdlib", "logger=wandb"])
    dims = ParallelDims.from_config(run.parallel)
    assert REDACTED not in json.dumps(flat_config(run, dims), default=str)  # nothing of a preset is touched
    setup = [
        "module load cuda/12.4",
        "export HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz012",
        "echo sk-abcdefghijklmnop1234",
    ]
    slurm = dataclasses.replace(
        run.cluster.slurm, setup=setup, additional_parameters={"comment": "WANDB_API_KEY=0123456789abcdef"}
    )
    run = dataclasses.replace(run, cluster=dataclasses.replace(run.cluster, slurm=slurm))
    config = flat_config(run, dims)
    assert config["cluster.slurm.setup"] == ["module load cuda/12.4", f"export HF_TOKEN={REDACTED}", f"echo {REDACTED}"]
    assert config["cluster.slurm.additional_parameters.comment"] == f"WANDB_API_KEY={REDACTED}"
    assert "hf_abcdef" not in json.dumps(config, default=str)
    from moemesh.trainer.wandb_tracker import redact

    path = "/ckpt/hf_Mixtral8x7BInstructv01abcdefgh"  # a path, not a token: kept
    assert redact(path) == path and redact(f"model.hf_path={path}") == f"model.hf_path={path}"
    # A list of records (data.sources) is one logged value: its strings are redacted too.
    sources = [{"path": "/data/a", "weight": 1.0}, {"path": "/data/b?token=s3cr3tvalue", "weight": 2.0}]
    assert redact(sources) == [sources[0], {"path": f"/data/b?token={REDACTED}", "weight": 2.0}]


@pytest.mark.parametrize(
    "token",
    [
        "hf_" + "aB3" * 11 + "x",  # a Hugging Face token: hf_ and 34 letters and digits
        "ghp_" + "Zx9" * 12,  # a GitHub personal access token: ghp_ and 36
        "AKIA" + "Q7ZX" * 4,  # an AWS access key id: AKIA and 16 capitals and digits
        "xoxb-1234567890-abcdefghij",  # a Slack bot token
    ],
)
def test_a_token_of_a_well_known_form_is_redacted_where_no_name_announces_it(token):
    """``--token hf_...`` assigns nothing the name rule sees: the token's own form gives it away."""
    from moemesh.trainer.wandb_tracker import REDACTED, redact

    assert redact(f"huggingface-cli login --token {token} --add-to-git-credential") == (
        f"huggingface-cli login --token {REDACTED} --add-to-git-credential"
    )


@pytest.mark.parametrize(
    "project, env, expected", [(None, None, "moemesh"), (None, "from-env", "from-env"), ("given", "from-env", "given")]
)
def test_wandb_project_is_the_config_s_else_wandb_project_else_moemesh(tmp_path, monkeypatch, project, env, expected):
    """logger.project was always "moemesh", so WANDB_PROJECT was never read."""
    pytest.importorskip("wandb")
    from moemesh.trainer.wandb_tracker import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    if env is None:
        monkeypatch.delenv("WANDB_PROJECT", raising=False)
    else:
        monkeypatch.setenv("WANDB_PROJECT", env)
    run = tiny_run(**{"logger.wandb": True, "logger.project": project})
    tracker = WandbTracker(run, ParallelDims.from_config(run.parallel), str(tmp_path))
    tracker.finish()
    assert tracker.run.project == expected


def test_wandb_run_continues_only_when_a_run_resumes_in_its_directory(tmp_path, monkeypatch):
    """A requeued job that resumes from its checkpoint continues the wandb run recorded in its
    directory. A fresh run in a used directory reused that id too, and its results overwrote the
    earlier run's in wandb; now it starts a run of its own."""
    pytest.importorskip("wandb")
    from tests.helpers import train_single

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tiny_run(**{"logger.wandb": True, "trainer.steps": 2})
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    id_file = tmp_path / "wandb_run_id"
    ids = []
    unsaved = dataclasses.replace(run, checkpoint=dataclasses.replace(run.checkpoint, save_final=False))
    longer = dataclasses.replace(run.trainer, steps=3)
    for attempt in (unsaved, run, dataclasses.replace(run, resume="auto", trainer=longer)):
        train_single(attempt, tmp_path, paths)
        ids.append(id_file.read_text().strip())
    fresh, again, resumed = ids
    assert fresh != again  # the second fresh run: a wandb run of its own
    assert resumed == again  # resumed from the second run's checkpoint: its wandb run, continued
    # offline-run-<time>-<id>, and "-1" after it when a resumed run starts in the same second
    assert {d.name.split("-")[3] for d in tmp_path.glob("wandb/offline-run-*")} == {fresh, again}
    id_file.write_text("../../not-an-id\n")  # read as untrusted: not an id, so a new one
    from moemesh.trainer.wandb_tracker import WandbTracker

    tracker = WandbTracker(run, ParallelDims.from_config(run.parallel), str(tmp_path), resumed=True)
    tracker.finish()
    assert tracker.run.id not in ids and len(tracker.run.id) == 8


@pytest.mark.parametrize("stopped", [["SIGUSR2"], None])
def test_a_signal_stopped_run_says_so_in_wandb_and_is_marked_preempting(tmp_path, monkeypatch, stopped):
    """The summary kept only numbers, so a run a signal stopped (requeued, to resume) looked
    finished on the dashboard: its stopped_by_signal list was dropped."""
    pytest.importorskip("wandb")
    from moemesh.trainer.wandb_tracker import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tiny_run(**{"logger.wandb": True})
    tracker = WandbTracker(run, ParallelDims.from_config(run.parallel), str(tmp_path))
    marked = []
    monkeypatch.setattr(tracker.run, "mark_preempting", lambda: marked.append(True))
    tracker.summary({"steps": 7, "final_loss": 2.5, "stopped_by_signal": stopped})
    assert tracker.run.summary["stopped_by_signal"] == ("SIGUSR2" if stopped else "")
    assert tracker.run.summary["steps"] == 7
    assert marked == ([True] if stopped else [])
    tracker.finish()


def test_fanout_mean_and_max_of_a_known_histogram():
    # 3 tokens reach 1 rank, 1 token reaches 2; no token reaches 3
    assert fanout(torch.tensor([0.0, 3.0, 1.0, 0.0])) == (1.25, 2)
    assert fanout(torch.zeros(3)) == (0.0, 0)


def test_mfu_is_per_device():
    """1000 FLOPs in 1 s over 2 devices of 1000 FLOP/s peak each: 50%."""
    stats = ReducedStats(loss=1.0, aux_loss=0.0, z_loss=0.0, seq_aux_loss=0.0, rows=torch.zeros(0, 13), num_experts=4)
    shape = StepShape(
        tokens=100,
        samples=1,
        num_experts=4,
        moe_layers=[],
        flops_per_token=10.0,
        peak_flops=1000.0,
        world_size=2,
        loss_norm=1,
    )
    times = RankTimes(*([0.0] * 9), step=1.0, bytes_sent=0, bytes_recv=0, min_bytes=0, ratio=0.0)
    rec = step_record(step=1, lr=0.1, grad_norm=1.0, stats=stats, shape=shape, times=times, biases=None)
    assert rec["mfu"] == 0.5 and rec["tokens_per_s"] == 100.0 and rec["flops_per_s"] == 1000.0


def test_memory_report_of_known_tensors_on_one_rank():
    """Bytes of a model with one expert and one non-expert parameter: its parameters, the
    gradients measured during training, AdamW's two moments per parameter (its step count,
    a 0-dim tensor, counts too), the peak and the peak less what the rank held before."""
    from moemesh.runs.records import MinMax
    from moemesh.trainer.step_stats import memory_report

    class TwoParams(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expert = torch.nn.Parameter(torch.zeros(3, 5))  # 15 fp32 values
            self.dense = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))  # 7 fp64 values

        def expert_parameters(self):
            return [self.expert]

    model = TwoParams()
    optimizer = torch.optim.AdamW(model.parameters())
    (model.expert.sum() + model.dense.sum()).backward()
    optimizer.step()
    state = {p: sum(v.numel() * v.element_size() for v in optimizer.state[p].values()) for p in model.parameters()}
    report = memory_report(model, optimizer, peak_bytes=1000, group=None, device="cpu", start_bytes=400, grads=[60, 56])
    exact = lambda n: MinMax(min=n, max=n)  # noqa: E731 - one rank: min and max agree
    assert report["param_bytes"] == {"expert": exact(15 * 4), "non_expert": exact(7 * 8)}
    assert report["grad_bytes"] == {"expert": exact(60), "non_expert": exact(56)}
    assert report["optimizer_bytes"] == {"expert": exact(state[model.expert]), "non_expert": exact(state[model.dense])}
    assert report["peak_bytes"] == exact(1000) and report["peak_above_start_bytes"] == exact(600)
    no_steps = memory_report(model, optimizer, peak_bytes=1000, group=None, device="cpu")
    assert no_steps["grad_bytes"] == {"expert": exact(0), "non_expert": exact(0)}


def test_a_step_record_of_two_moe_layers_with_known_statistics():
    """Two MoE layers of E = 2 experts, top-k 2 over 4 tokens (8 routed pairs each), packed as
    StepStats packs them: the record's per-layer load, the drops over both layers, the fan-out
    over both layers' tokens, and the time and byte columns."""
    from moemesh.trainer.step_stats import stat_width

    E, K, tokens, norm = 2, 2, 4, 2
    # counts [E], score sums [E], dropped, aux, z, seq_aux, entropy, fan-out histogram [K + 1]
    layer1 = [6.0, 2.0, 2.0, 2.0, 2.0, 1.5, 0.5, 0.0, 4.0, 0.0, 3.0, 1.0]
    layer3 = [4.0, 4.0, 2.0, 2.0, 2.0, 1.0, 0.6, 0.25, 0.4, 0.0, 1.0, 3.0]
    rows = torch.tensor([layer1, layer3], dtype=torch.float64)
    assert rows.shape[1] == stat_width(E, K)
    stats = ReducedStats(loss=2.0, aux_loss=0.5, z_loss=0.1, seq_aux_loss=0.0, rows=rows, num_experts=E)
    shape = StepShape(
        tokens=tokens,
        samples=2,
        num_experts=E,
        moe_layers=[1, 3],
        flops_per_token=10.0,
        peak_flops=None,
        world_size=1,
        loss_norm=norm,
    )
    times = RankTimes(
        *([0.5] * 5), a2a_dispatch=0.25, a2a_combine=0.125, experts=0.0, attention_core=0.0, step=2.0,
        bytes_sent=0, bytes_recv=0, min_bytes=0, ratio=0.0,
    )  # fmt: skip
    rec = step_record(step=3, lr=0.1, grad_norm=1.0, stats=stats, shape=shape, times=times, biases=None)
    assert set(rec["load"]) == {"layer1", "layer3"}
    first, second = rec["load"]["layer1"], rec["load"]["layer3"]
    assert first["tokens_per_expert"] == [6, 2] and second["tokens_per_expert"] == [4, 4]
    assert (first["aux_loss"], first["z_loss"]) == (1.5 / norm, 0.5 / norm)
    assert "seq_aux_loss" not in first and second["seq_aux_loss"] == 0.25 / norm  # only where it is on
    assert (first["fanout_mean"], first["fanout_max"]) == ((1 * 3 + 2 * 1) / 4, 2)
    assert rec["dropped_fraction"] == (2.0 + 2.0) / (8 + 8)  # both layers' drops over both layers' pairs
    assert rec["a2a"]["fanout_mean"] == (1 * 4 + 2 * 4) / 8 and rec["a2a"]["fanout_max"] == 2  # over both layers
    assert rec["a2a"]["ratio"] is None  # no All-to-All: no ratio, not 0
    assert rec["time"]["a2a"] == 0.25 + 0.125 and rec["time"]["step"] == 2.0
    assert rec["samples_per_s"] == 2 / 2.0 and rec["tokens_per_s"] == tokens / 2.0 and rec["mfu"] is None


def test_wandb_gets_each_degree_in_its_column_and_each_record_at_its_step(tmp_path, monkeypatch):
    """The layout's columns hold each its own degree (distinct here, so a swap shows); a record
    goes to wandb at its own step, its nested numbers under slash-joined keys, each MoE layer's
    per-expert counts as a histogram with one bin per expert; the summary's table gives each
    expert its own mean score."""
    pytest.importorskip("wandb")
    from moemesh.trainer.wandb_tracker import WandbTracker, flat_config

    run = tiny_run(
        **{
            "parallel.name": "tp2_ep4_dp3",
            "parallel.data_parallel_size": 3,
            "parallel.expert_parallel_size": 4,
            "parallel.tensor_parallel_size": 2,
            "logger.wandb": True,
        }
    )
    dims = ParallelDims.from_config(run.parallel)
    config = flat_config(run, dims)
    assert (config["dp"], config["ep"], config["tp"], config["pp"], config["world_size"]) == (3, 4, 2, 1, 24)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = WandbTracker(run, dims, str(tmp_path))
    logged = []
    monkeypatch.setattr(tracker.run, "log", lambda data, step=None: logged.append((data, step)))
    load = {"tokens_per_expert": [5, 0, 3], "mean_score": [0.5, 0.0, 0.25], "cv": 0.75}
    tracker.log({"step": 7, "loss": 2.5, "time": {"a2a": 0.25}, "load": {"layer1": load}})
    ((data, step),) = logged
    assert step == 7 and data["loss"] == 2.5 and data["time/a2a"] == 0.25 and data["load/layer1/cv"] == 0.75
    histogram = data["load/layer1/tokens_per_expert"]
    assert histogram.histogram == [5, 0, 3] and histogram.bins == [0, 1, 2, 3]
    tracker.summary({"steps": 7})
    table = logged[-1][0]["load/final_per_expert"]
    assert table.data == [["layer1", 0, 5, 0.5], ["layer1", 1, 0, 0.0], ["layer1", 2, 3, 0.25]]
    tracker.finish()


def test_step_stats_sum_two_micro_steps_and_unpack_them_by_name():
    """Two micro-steps of one MoE layer (E = 2, top-k 1) on one rank of a tp = 2 layout: the
    cross-entropy enters as 1/tp (TP peers hold the same one), the layer's balance losses add to
    the loss terms, and ``reduce`` divides the loss terms by the loss norm and unpacks the row."""
    from types import SimpleNamespace

    from moemesh.trainer.step_stats import StepStats

    def moe(aux, z, seq, dropped, counts, fanout):
        losses = SimpleNamespace(aux_loss=torch.tensor(aux), z_loss=torch.tensor(z), seq_aux_loss=seq)
        return SimpleNamespace(
            losses=losses,
            dropped=torch.tensor(dropped),
            counts_E=torch.tensor(counts),
            score_sum_E=torch.tensor([0.5, 0.25]),
            entropy_sum=torch.tensor(1.0),
            fanout_K1=fanout,
        )

    stats = StepStats(num_moe_layers=1, num_experts=2, device=torch.device("cpu"), top_k=1)
    stats.add_loss(torch.tensor(3.0), tp=2)
    stats.add_loss(torch.tensor(5.0), tp=2)
    stats.add_moe([moe(0.5, 0.125, torch.tensor(0.25), 1.0, [3.0, 1.0], torch.tensor([0.0, 4.0]))], slots=[0])
    stats.add_moe([moe(1.5, 0.375, None, 0.0, [2.0, 2.0], None)], slots=[0])  # no seq loss, no fan-out
    reduced = stats.reduce(None, None, loss_norm=2)
    assert reduced.loss == (3.0 + 5.0) / 2 / 2
    assert (reduced.aux_loss, reduced.z_loss, reduced.seq_aux_loss) == ((0.5 + 1.5) / 2, 0.5 / 2, 0.25 / 2)
    layer = reduced.layer(0)
    assert layer.counts_E.tolist() == [5.0, 3.0] and layer.score_sum_E.tolist() == [1.0, 0.5]
    assert (layer.dropped, layer.aux_loss, layer.z_loss, layer.seq_aux_loss, layer.entropy_sum) == (1, 2, 0.5, 0.25, 2)
    assert layer.fanout_K1.tolist() == [0.0, 4.0]
