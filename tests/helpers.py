"""What several test modules share: the tiny run every trainer/checkpoint test builds, as a
RunConfig (``tiny_run``) and as train.py's command line (``SMALL``). Tests import this
module, never another test module. Multi-rank runs are in tests/dist_utils.py."""

from __future__ import annotations

# Tests build configs directly, without Hydra's command line. moemesh.config.schema (hydra,
# omegaconf) is imported where used, so that tests without configs (the kernel tests)
# also collect where those are not installed.


def tiny_run(**overrides):
    """A very small, fast RunConfig; ``overrides`` are dotted keys, e.g. {"parallel.name": "ep2"}."""
    from omegaconf import OmegaConf

    from moemesh.config.schema import to_run_config

    base = {
        "model": dict(
            name="test",
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            ffn_hidden_size=64,
            moe_ffn_hidden_size=48,
            num_experts=8,
            top_k=2,
            moe_every_k_layers=1,
            max_seq_len=32,
        ),
        "parallel": dict(name="single"),
        "cluster": dict(name="local"),
        "data": dict(name="synthetic", kind="synthetic"),
        "logger": dict(name="test", console=False),
        "trainer": dict(
            steps=10, global_batch_size=8, seq_len=32, warmup_steps=2, eval_every=0, eval_batches=1, threads_per_rank=1
        ),
    }
    cfg = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return to_run_config(cfg)


# train.py's overrides for a model and batch as small as tiny_run's (the rest from conf/).
SMALL = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=64",
    "model.moe_ffn_hidden_size=48",
    "model.max_seq_len=32",
    "trainer.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
]


def cpu_context(rank, mesh, output_dir, data_paths):
    """This process as rank ``rank`` of ``mesh`` on the CPU (the RankContext a launch builds)."""
    import torch

    from moemesh.launch import RankContext

    return RankContext(
        rank=rank,
        local_rank=rank,
        device=torch.device("cpu"),
        mesh=mesh,
        output_dir=str(output_dir),
        data_paths=data_paths,
    )


def train_single(run, output_dir, data_paths):
    """Train ``run`` in this process, as the only rank of a one-rank mesh; returns the summary."""
    from moemesh.parallel.mesh import single_rank_mesh
    from moemesh.trainer.loop import train

    return train(run, cpu_context(0, single_rank_mesh(), output_dir, data_paths))


def train_rank(run, rank, dims, output_dir, data_paths):
    """Train ``run`` as rank ``rank`` of a gloo world laid out as ``dims`` (tests/dist_utils.py
    starts the world); returns the summary."""
    from moemesh.parallel.mesh import build_mesh
    from moemesh.trainer.loop import train

    return train(run, cpu_context(rank, build_mesh(dims, "cpu"), output_dir, data_paths))


def laid_out(
    module,
    *,
    ep_group=None,
    tp_group=None,
    sequence_parallel=False,
    stats_group=None,
    ops=None,
    use_grouped_mm=None,
    overlap_chunks=0,
    meter=None,
):
    """``module`` (a Transformer or an MoE layer built whole) with a layout applied from outside,
    as trainer.parallelize.build_model does: TP, EP, the balance-statistics group, kernels, timing."""
    from moemesh.kernels import TORCH_OPS
    from moemesh.trainer.parallelize import (
        apply_ep,
        apply_instrumentation,
        apply_kernels,
        apply_load_balance_group,
        apply_tp,
    )

    apply_tp(module, tp_group, sequence_parallel=sequence_parallel)
    apply_ep(module, ep_group, overlap_chunks=overlap_chunks)
    apply_load_balance_group(module, stats_group)
    apply_kernels(module, ops or TORCH_OPS, use_grouped_mm=use_grouped_mm)
    apply_instrumentation(module, meter)
    return module


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK", "SLURM_PROCID")


def _as_a_shell(argv, cwd, monkeypatch) -> None:
    """train.py's command line ``argv`` in ``cwd``, without launcher variables or HYDRA_FULL_ERROR."""
    import sys

    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])


def passed_cli(argv, cwd, monkeypatch) -> bool:
    """Whether train.py's cli(), run in this process as ``refused_cli`` runs it, passes every check
    and would start training (training itself is replaced by a note that it was reached)."""
    import train

    _as_a_shell(argv, cwd, monkeypatch)
    ran: list[bool] = []
    monkeypatch.setattr(train, "main", lambda: ran.append(True))
    train.cli()
    return bool(ran)


def refused_cli(argv, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """train.py's cli() in this process, as a shell in ``cwd`` would run it (no launcher variables,
    no HYDRA_FULL_ERROR), with training itself replaced by a failure: what is checked must be
    refused before it. Returns (exit code, stdout, stderr)."""
    import pytest

    import train

    _as_a_shell(argv, cwd, monkeypatch)
    monkeypatch.setattr(train, "main", lambda: pytest.fail(f"{argv} passed the checks and would have run"))
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def config_error_line(code, err: str) -> str:
    """The one line of a refusal: exit 2, one non-blank line on stderr, "moemesh: config error: ..."."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("moemesh: config error: "), err
    assert "Traceback" not in err
    return lines[0]


def yaml_alias_bomb(levels: int = 12) -> str:
    """YAML lines a0 .. a<levels-1>, each a list of ten aliases of the one before: a few hundred
    bytes that expand to 10^levels values in whatever walks them (the last anchor: a<levels-1>)."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"
