"""The planner: exact where it can be, marks what cannot fit, ranks stably, scales; its table
says what it left out and its commands compose into the split planned."""

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import plan  # noqa: E402
from _config import compose_run  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moemesh.config.validate import validate_run  # noqa: E402
from moemesh.moe.config import ModelConfig  # noqa: E402
from moemesh.moe.context import ParallelContext  # noqa: E402
from moemesh.moe.layer import MoELayer  # noqa: E402
from moemesh.moe.model import Transformer  # noqa: E402
from moemesh.parallel.comm import CommMeter  # noqa: E402
from moemesh.parallel.dims import MeshAxis, ParallelDims, layout_name  # noqa: E402
from moemesh.parallel.mesh import build_mesh  # noqa: E402
from moemesh.parallel.pipeline import stage_layers  # noqa: E402
from tests.dist_utils import run_on_ranks  # noqa: E402

ARGS = argparse.Namespace(precision="fp32", activation_checkpointing=False, zero1=False, mfu=0.4, peak_flops=1e12)
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "parallel").glob("*.yaml"))


def _real_bytes(run, dims):
    """Max over ranks of (expert, non-expert) parameter bytes of the real model, on meta."""
    worst = (0, 0)
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            pm = build_mesh(dims, "cpu")
            with torch.device("meta"):
                par = ParallelContext(ep_group=pm.ep_group, tp_group=pm.tp_group if dims.tp > 1 else None)
                model = Transformer(
                    run.model, parallel=par, layers=stage_layers(run.model.num_layers, dims.pp)[pm.coords[MeshAxis.PP]]
                )
        finally:
            dist.destroy_process_group()
        e = sum(p.numel() * 4 for p in model.expert_parameters())
        n = sum(p.numel() * 4 for p in model.non_expert_parameters())
        worst = max(worst, (e + n, e, n))[:3] if len(worst) == 3 else (e + n, e, n)
    return worst[1], worst[2]


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_bytes_equal_the_real_model_for_every_preset(preset):
    run = compose_run([f"parallel={preset}", "trainer.global_batch_size=32", "model.num_layers=4"])
    dims = ParallelDims.from_config(run.parallel)
    p = plan.plan_one(run, dims, ARGS)
    assert p.problem is None, p.problem
    expert, non_expert = _real_bytes(run, dims)
    assert (p.param_expert, p.param_non_expert) == (expert, non_expert)
    assert p.grad_bytes == expert + non_expert  # fp32 gradients, one per parameter


@pytest.mark.slow
def test_gradient_and_optimizer_bytes_equal_a_real_run(tmp_path):
    """One real CPU step of ep2 (2 ranks): the run's memory report against the plan."""
    import json

    from tests.helpers import SMALL

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"hydra.run.dir={tmp_path}",
            "parallel=ep2",
            "trainer.steps=1",
            *SMALL,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    mem = json.loads((tmp_path / "summary.json").read_text())["memory_per_rank"]
    run = compose_run(["parallel=ep2", *SMALL, "trainer.steps=1"])
    p = plan.plan_one(run, ParallelDims(ep=2), ARGS)
    real = {k: mem[k]["expert"]["max"] + mem[k]["non_expert"]["max"] for k in ("grad_bytes", "optimizer_bytes")}
    assert (p.grad_bytes, p.optim_bytes) == (real["grad_bytes"], real["optimizer_bytes"])
    assert p.param_expert == mem["param_bytes"]["expert"]["max"]


def _a2a_worker(rank, world):
    pm = build_mesh(ParallelDims(ep=2), "cpu")
    cfg = ModelConfig(name="t", hidden_size=16, num_experts=8, top_k=2, moe_ffn_hidden_size=8)
    meter = CommMeter()
    layer = MoELayer(cfg=cfg, parallel=ParallelContext(ep_group=pm.ep_group, stats_group=pm.ep_group, meter=meter))
    for prm in layer.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    torch.nn.init.zeros_(layer.router.weight_ED)  # all ties: every token picks experts 0 and 1 (on rank 0)
    x = torch.randn(1, 10, 16, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    measured = meter.collect()["bytes_sent"]
    assert measured == plan.a2a_bytes(tokens=10, top_k=2, hidden=16, dtype_bytes=4, ep=2), (rank, measured)


@pytest.mark.slow
def test_all_to_all_bytes_equal_a_real_dropless_run():
    """With this routing each rank sends exactly the uniform-routing volume: rank 1's pairs
    all leave, and rank 0 sends back as many as it received."""
    run_on_ranks(_a2a_worker, 2)


def test_splits_that_cannot_fit_are_marked():
    run = compose_run(
        [
            "model=seed_4096",
            "cluster.gpus=16",
            "trainer.micro_batch_size=1",
            "trainer.global_batch_size=64",
            "cluster.gpu_memory_gb=1",
        ]
    )
    valid, invalid = plan.make_plan(run, 16, ARGS)
    assert valid and not any(p.fits for p in valid)
    assert any("num_kv_heads=8 must be divisible by parallel.tensor_parallel_size=16" in p.problem for p in invalid)
    roomy = compose_run(
        [
            "model=seed_4096",
            "cluster.gpus=16",
            "trainer.micro_batch_size=1",
            "trainer.global_batch_size=64",
            "cluster.gpu_memory_gb=10000",
        ]
    )
    assert all(p.fits for p in plan.make_plan(roomy, 16, ARGS)[0])


def test_ranking_of_a_hand_checked_case():
    """4 GPUs, 2 per node, a 10 MB/s network (so only off-node bytes matter). By hand:
    pp2 splits keep every costed group inside a node (pp is outermost): communication ~0,
    bubble 1/3 -> first three. pp4: no communication, bubble 3/5 -> fourth. dp4 all-reduces
    the whole model's gradients across nodes (2 x 3/4 x 14.7 MB): ~2.1 s -> second to last.
    tp4 all-reduces activations 4 times per layer x 4 layers (16 x 1.5 x 1 MiB): ~4.4 s -> last."""
    over = [
        "cluster.gpus=4",
        "cluster.gpus_per_node=2",
        "cluster.inter_node_gbps=0.01",
        "model.num_layers=4",
        "trainer.global_batch_size=16",
    ]
    run = compose_run(over)
    ranked = [(p.dims.dp, p.dims.ep, p.dims.tp, p.dims.pp) for p in plan.make_plan(run, 4, ARGS)[0]]
    assert ranked == [(p.dims.dp, p.dims.ep, p.dims.tp, p.dims.pp) for p in plan.make_plan(run, 4, ARGS)[0]]
    assert all(r[3] == 2 for r in ranked[:3]) and ranked[3] == (1, 1, 1, 4)
    assert ranked[-2:] == [(4, 1, 1, 1), (1, 1, 4, 1)]


def test_a_1024_gpu_plan_with_256_experts_takes_under_2_seconds():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "plan.py"),
            "model=seed_4096",
            "model.num_experts=256",
            "cluster.gpus=1024",
            "trainer.global_batch_size=4096",
            "trainer.micro_batch_size=1",
            "--top",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    planned = float(proc.stdout.split("planned in ")[1].split(" s")[0])
    assert planned < 2.0, proc.stdout[:400]  # the planning itself; the whole command took ~1.5 s here
    assert "| 1 |" in proc.stdout
    assert time.perf_counter() - t0 < 30


# README's seed command (--activation-checkpointing --zero1): 34 valid splits, the seed's dp8 x ep2 ranks 30th.
SEED = [
    "model=seed_4096",
    "cluster.gpus=16",
    "trainer.global_batch_size=256",
    "trainer.seq_len=4096",
    "trainer.micro_batch_size=1",
]
SEED_ARGS = argparse.Namespace(
    precision="bf16_mixed", activation_checkpointing=True, zero1=True, mfu=0.4, peak_flops=989e12
)


def _rows(text: str) -> list[dict[str, str]]:
    """The table's rows as {column: cell}, keyed by the header's names."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


@pytest.mark.parametrize("ckpt", [False, True])
def test_total_column_is_the_sum_of_the_memory_parts(ckpt):
    args = argparse.Namespace(**{**vars(SEED_ARGS), "activation_checkpointing": ckpt})
    run = compose_run(SEED)
    valid, _ = plan.make_plan(run, 16, args)
    for p in valid:
        act = p.act_ckpt_bytes if ckpt else p.act_bytes
        assert p.total_bytes == p.param_expert + p.param_non_expert + p.grad_bytes + p.optim_bytes + act
        assert p.fits == (p.total_bytes <= run.cluster.gpu_memory_gb * 1e9)
    rows = _rows(plan.table(valid, 0, ckpt))
    assert len(rows) == len(valid)
    parts = ("expert GB", "non-exp GB", "grad GB", "optim GB", "act GB")
    for row, p in zip(rows, valid, strict=True):
        assert row["total GB"] == f"{p.total_bytes / 1e9:,.1f}"
        printed = sum(float(row[c].replace(",", "")) for c in parts)
        assert abs(printed - float(row["total GB"].replace(",", ""))) <= 0.05 * (len(parts) + 1), row
    assert {r["fits"] for r in rows} == {"yes", "NO"}  # both kinds are checked


@pytest.mark.parametrize("top", [5, 25])
def test_rows_cut_are_counted_and_the_seed_scenarios_are_shown_beyond_the_cut(top):
    valid, _ = plan.make_plan(compose_run(SEED), 16, SEED_ARGS)
    seeds = {i: p.dims for i, p in enumerate(valid, 1) if p.dims in plan.SEED_SPLITS}
    assert sorted(seeds.values(), key=lambda d: d.dp) == [plan.ParallelDims(dp=2, ep=8), plan.ParallelDims(dp=8, ep=2)]
    assert max(seeds) > top  # dp8 x ep2 ranks below the cut, as in README's command
    text = plan.table(valid, top, True)
    shown = {int(r["#"].split()[0]): r for r in _rows(text)}
    assert sorted(shown) == sorted(set(range(1, top + 1)) | set(seeds))
    for i, row in shown.items():
        d = valid[i - 1].dims
        assert (int(row["dp"]), int(row["ep"]), int(row["tp"]), int(row["pp"])) == (d.dp, d.ep, d.tp, d.pp)
        assert row["#"] == (f"{i} (seed)" if i in seeds else str(i))
    hidden = len(valid) - len(shown)
    assert text.splitlines()[-1] == f"... {hidden} more splits not shown (--top {top}); --top 0 shows all"
    for everything in (0, len(valid)):
        assert "not shown" not in plan.table(valid, everything, True)
        assert len(_rows(plan.table(valid, everything, True))) == len(valid)


def test_the_command_for_every_row_composes_into_its_split():
    """The user's other overrides are kept, including a parallel preset's schedule; the degrees,
    the name and the (reset) pipeline split are the row's; a user's own degrees are dropped."""
    over = [
        *SEED,
        "parallel=pp2",
        "parallel.pipeline_schedule=gpipe",
        "parallel.pipeline_split=[20,12]",
        "parallel.data_parallel_size=3",
    ]
    run = compose_run(over)
    valid, _ = plan.make_plan(run, 16, SEED_ARGS)
    assert len(valid) > 20
    for p in valid:
        argv = plan.train_command(run, over, p.dims)
        assert argv[:2] == ["python", "train.py"]
        got = compose_run(argv[2:])
        d = p.dims
        assert got == dataclasses.replace(
            run,
            parallel=dataclasses.replace(
                run.parallel,
                name=layout_name(d),
                data_parallel_size=d.dp,
                expert_parallel_size=d.ep,
                tensor_parallel_size=d.tp,
                pipeline_parallel_size=d.pp,
                pipeline_split=None,
            ),
        )
        validate_run(got)


def test_command_option_prints_the_rows_command_and_the_table_prints_the_best(capsys):
    valid, _ = plan.make_plan(compose_run(SEED), 16, SEED_ARGS)
    n, p = next((i, p) for i, p in enumerate(valid, 1) if p.dims == plan.ParallelDims(dp=8, ep=2))
    assert not p.fits
    plan.main([*SEED, "--activation-checkpointing", "--zero1", "--command", str(n)])
    out, err = capsys.readouterr()
    assert out.splitlines() == [out.strip()]  # the command alone, ready to paste
    got = compose_run(shlex.split(out)[2:])
    assert plan.ParallelDims.from_config(got.parallel) == plan.ParallelDims(dp=8, ep=2)
    assert got.parallel.name == "ep2_dp8" and got.model.name == "seed_4096"
    assert f"row {n} does not fit: {p.total_bytes / 1e9:.1f} GB per GPU" in err and "--zero1" in err
    plan.main([*SEED, "--activation-checkpointing", "--zero1"])
    out = capsys.readouterr().out
    best = re.search(r"row 1, the best fitting split.*\n  (python train.py .*)\n", out).group(1)
    plan.main([*SEED, "--activation-checkpointing", "--zero1", "--command", "1"])
    assert capsys.readouterr().out.strip() == best
    with pytest.raises(SystemExit) as exit_:
        plan.main([*SEED, "--command", str(len(valid) + 1)])
    assert exit_.value.code == 2 and f"the plan has {len(valid)} rows" in capsys.readouterr().err


def test_generated_names_are_the_presets_names():
    for path in sorted((ROOT / "conf" / "parallel").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        dims = plan.ParallelDims(
            dp=cfg.data_parallel_size,
            ep=cfg.expert_parallel_size,
            tp=cfg.tensor_parallel_size,
            pp=cfg.pipeline_parallel_size,
        )
        assert layout_name(dims) == cfg.name == path.stem
