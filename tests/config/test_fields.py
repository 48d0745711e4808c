"""Each config dataclass checks its own fields when built (``__post_init__``), however it is built;
choices are StrEnums; the batch arithmetic is one BatchPlan."""

import dataclasses

import pytest

from moemesh.config.batch import BatchPlan
from moemesh.config.schema import ParallelConfig, TrainerConfig
from moemesh.errors import ConfigError
from moemesh.fields import PipelineSchedule, Recompute, Sharding
from moemesh.moe.config import ModelConfig
from moemesh.parallel.dims import ParallelDims
from tests.helpers import tiny_run


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"top_k": 9}, "model.top_k=9 must be between 1 and model.num_experts=8"),
        ({"hidden_size": 30}, "model.hidden_size=30 must be divisible by model.num_heads=4"),
        ({"num_kv_heads": 3}, "model.num_heads=4 must be divisible by model.num_kv_heads=3"),
        ({"init_std": float("nan")}, "model.init_std=nan must be a finite number > 0"),
        ({"score_func": "softmx"}, "model.score_func='softmx' is not one of softmax, sigmoid; did you mean softmax?"),
        ({"load_balance_scope": "globl"}, "model.load_balance_scope='globl' is not one of global, local"),
    ],
)
def test_a_model_config_refuses_a_bad_field_when_built(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        ModelConfig(name="t", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_choices_become_members_and_print_as_their_values():
    p = ParallelConfig(name="x", sharding="zero3", pipeline_schedule="1f1b")
    assert p.sharding is Sharding.zero3 and p.pipeline_schedule is PipelineSchedule["1f1b"]
    assert f"{p.sharding}" == "zero3" and str(p.pipeline_schedule) == "1f1b" and p.sharding == "zero3"
    assert TrainerConfig(activation_checkpointing="full").activation_checkpointing is Recompute.full


def test_a_typo_in_a_choice_is_one_line_with_a_did_you_mean_on_every_path():
    # built directly (a test, the planner) and composed from YAML (tiny_run goes through OmegaConf)
    with pytest.raises(ConfigError, match=r"parallel.sharding='zero4' is not one of none, zero2, zero3; did you mean"):
        ParallelConfig(name="x", sharding="zero4")
    with pytest.raises(ConfigError, match=r"trainer.on_nonfinite='skp' is not one of stop, skip; did you mean skip\?"):
        tiny_run(**{"trainer.on_nonfinite": "skp"})


def test_replace_checks_again():
    t = TrainerConfig()
    with pytest.raises(ConfigError, match=r"trainer.min_lr=0.1 must be <= trainer.lr=0.003"):
        dataclasses.replace(t, min_lr=0.1)
    with pytest.raises(ConfigError, match="trainer.micro_steps=0 must be a positive integer or null"):
        dataclasses.replace(t, micro_steps=0)


def test_parallel_dims_check_their_degrees_when_built():
    with pytest.raises(ConfigError, match="parallel.expert_parallel_size=0 must be a positive integer"):
        ParallelDims(ep=0)
    with pytest.raises(ConfigError, match="parallel.pipeline_split=.1, 1. needs parallel.pipeline_parallel_size > 1"):
        ParallelConfig(name="x", pipeline_split=[1, 1])


@pytest.mark.parametrize(
    "trainer, dims, expected",
    [
        (dict(global_batch_size=16), ParallelDims(dp=2), (1, 8)),  # one micro-step by default
        (dict(global_batch_size=16), ParallelDims(dp=2, pp=2), (2, 4)),  # pp micro-steps with PP
        (dict(global_batch_size=16, micro_steps=4), ParallelDims(ep=2), (4, 2)),
        (dict(global_batch_size=16, micro_batch_size=2), ParallelDims(dp=2, ep=2), (2, 2)),
        (dict(global_batch_size=16, micro_batch_size=2), ParallelDims(dp=2), (4, 2)),
        (dict(global_batch_size=16, micro_batch_size=2, micro_steps=2), ParallelDims(dp=2, ep=2), (2, 2)),
    ],
)
def test_batch_plan(trainer, dims, expected):
    plan = BatchPlan.of(TrainerConfig(**trainer), dims)
    assert (plan.micro_steps, plan.micro_batch_size) == expected
    assert plan.micro_steps * plan.micro_batch_size * dims.data_size == plan.global_batch_size
    # micro-step first, then data rank: every sample of the step exactly once
    starts = sorted(
        plan.micro_start(i, r) + k
        for i in range(plan.micro_steps)
        for r in range(dims.data_size)
        for k in range(plan.micro_batch_size)
    )
    assert starts == list(range(plan.global_batch_size))
    assert plan.tokens == plan.global_batch_size * plan.seq_len


@pytest.mark.parametrize(
    "trainer, dims, needle",
    [
        (dict(global_batch_size=6), ParallelDims(dp=4), "trainer.global_batch_size=6 must be divisible by micro_steps"),
        (dict(global_batch_size=16, micro_batch_size=3), ParallelDims(), "micro_batch_size*dp*ep = 3*1*1 = 3"),
        (dict(global_batch_size=16, micro_batch_size=2, micro_steps=3), ParallelDims(), "disagree"),
    ],
)
def test_batch_plan_refuses_what_does_not_divide(trainer, dims, needle):
    with pytest.raises(ConfigError) as err:
        BatchPlan.of(TrainerConfig(**trainer), dims)
    assert needle in str(err.value)


def test_cluster_nodes_states_what_the_layout_takes():
    from moemesh.config.validate import validate_run

    run = tiny_run(**{"parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2, "cluster.nodes": 2})
    with pytest.raises(ConfigError, match=r"cluster.nodes=2 but parallel=.* \(4 ranks\) takes 1 node\(s\) at ") as err:
        validate_run(run)
    assert "; set cluster.gpus_per_node=2, or another layout, or drop cluster.nodes" in str(err.value)
    # No whole number of GPUs per node spreads 4 ranks evenly over 3 nodes: nothing to suggest
    # (ceil(4 / 3) = 2 per node takes 2 nodes, and SLURM refuses nodes of unequal ranks).
    three = {"parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2, "cluster.nodes": 3}
    with pytest.raises(ConfigError) as err:
        validate_run(tiny_run(**three))
    assert str(err.value).endswith(
        "no cluster.gpus_per_node spreads 4 ranks evenly over 3 nodes: choose another layout or drop cluster.nodes"
    )
    ok = tiny_run(
        **{"parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2, "cluster.nodes": 2,
           "cluster.gpus_per_node": 2}
    )  # fmt: skip
    assert validate_run(ok).world_size == 4
    # A last node that is not full still counts: 4 ranks at 3 per node take 2 nodes.
    partial = {"parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2, "cluster.gpus_per_node": 3}
    assert validate_run(tiny_run(**partial, **{"cluster.nodes": 2})).world_size == 4
    with pytest.raises(ConfigError, match=r"cluster.nodes=1 but parallel=.* \(4 ranks\) takes 2 node\(s\) at "):
        validate_run(tiny_run(**partial, **{"cluster.nodes": 1}))


def test_a_wandb_name_may_be_128_characters_and_the_environment_counts_only_where_the_config_is_null(monkeypatch):
    """wandb takes a project or entity of up to 128 characters. WANDB_PROJECT and WANDB_ENTITY are
    checked only where wandb reads them: with logger=wandb, and the config's own key null; the
    same goes for WANDB_MODE, which only a wandb run reads."""
    from moemesh.config.schema import WANDB_NAME_MAX, LoggerConfig

    assert LoggerConfig(name="wandb", wandb=True, project="p" * WANDB_NAME_MAX).project == "p" * WANDB_NAME_MAX
    with pytest.raises(ConfigError, match=rf"^logger.entity='e{{{WANDB_NAME_MAX + 1}}}' must be 1 to 128 characters"):
        LoggerConfig(name="wandb", wandb=True, entity="e" * (WANDB_NAME_MAX + 1))
    monkeypatch.setenv("WANDB_PROJECT", "team/p")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    LoggerConfig(name="jsonl")  # no wandb run: nothing reads them
    monkeypatch.delenv("WANDB_MODE")
    LoggerConfig(name="wandb", wandb=True, project="given")  # logger.project wins: WANDB_PROJECT is not read
    with pytest.raises(ConfigError, match=r"^WANDB_PROJECT='team/p' cannot hold / .*\(logger.project is null"):
        LoggerConfig(name="wandb", wandb=True)
