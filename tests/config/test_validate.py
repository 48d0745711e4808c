import re

import pytest
from hydra import compose, initialize_config_dir

from moemesh.config.schema import register_schema, to_run_config
from moemesh.config.validate import batch_plan, validate_run
from moemesh.errors import ConfigError
from tests.helpers import tiny_run


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            {"model.num_experts": 6, "parallel.expert_parallel_size": 4},
            "model.num_experts=6 must be divisible by parallel.expert_parallel_size=4",
        ),
        ({"model.top_k": 9}, "model.top_k=9 must be between 1 and model.num_experts=8"),
        ({"model.top_k": 0}, "model.top_k=0 must be between 1"),
        (
            {"trainer.global_batch_size": 6, "parallel.data_parallel_size": 4},
            "trainer.global_batch_size=6 must be divisible by micro_steps*dp*ep = 1*4*1 = 4",
        ),
        (
            {"trainer.micro_batch_size": 3},
            "trainer.global_batch_size=8 must be divisible by micro_batch_size*dp*ep = 3*1*1 = 3",
        ),
        ({"model.hidden_size": 0}, "model.hidden_size=0 must be a positive integer"),
        ({"parallel.data_parallel_size": 0}, "parallel.data_parallel_size=0 must be a positive integer"),
        (
            {"model.num_layers": 3, "model.moe_every_k_layers": 2},
            "model.num_layers=3 must be divisible by model.moe_every_k_layers=2",
        ),
        (
            {
                "parallel.tensor_parallel_size": 2,
                "model.num_heads": 3,
                "model.num_kv_heads": 3,
                "model.hidden_size": 48,
            },
            "model.num_heads=3 must be divisible by parallel.tensor_parallel_size=2",
        ),
        (
            {"parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": True, "trainer.seq_len": 31},
            "trainer.seq_len=31 must be divisible by parallel.tensor_parallel_size=2",
        ),
        ({"parallel.pipeline_parallel_size": 4}, "model.num_layers=2 must be >= parallel.pipeline_parallel_size=4"),
        (
            {"parallel.pipeline_parallel_size": 2, "parallel.pipeline_split": [2, 1]},
            "parallel.pipeline_split=[2, 1] must list 2 positive layer counts",
        ),
        (
            {"parallel.pipeline_parallel_size": 2, "trainer.micro_batch_size": 8},
            "1F1B needs micro-batches >= parallel.pipeline_parallel_size=2, got 1",
        ),
        (
            {"parallel.pipeline_split": [1, 1]},
            "parallel.pipeline_split=[1, 1] needs parallel.pipeline_parallel_size > 1",
        ),
        ({"parallel.pipeline_schedule": "zb"}, "parallel.pipeline_schedule='zb' is not one of 1f1b, gpipe"),
        ({"cluster.backend": "mpi"}, "cluster.backend='mpi' is not one of auto, gloo, nccl"),
        ({"trainer.seq_len": 64}, "trainer.seq_len=64 must be <= model.max_seq_len=32"),
        ({"data.kind": "memmap"}, "data.path is required"),
    ],
)
def test_invalid_configs_name_keys_and_values(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate_run(tiny_run(**overrides))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_the_dense_ffn_is_split_over_tp_only_where_a_layer_has_one():
    """model.ffn_hidden_size=63 under tp2 was refused though every layer is MoE (tiny_run's model):
    no dense FFN is built, so nothing is split."""
    tp2 = {"parallel.name": "tp2", "parallel.tensor_parallel_size": 2, "model.ffn_hidden_size": 63}
    validate_run(tiny_run(**tp2))
    with pytest.raises(
        ConfigError, match="model.ffn_hidden_size=63 must be divisible by parallel.tensor_parallel_size=2"
    ):
        validate_run(tiny_run(**tp2, **{"model.first_k_dense_layers": 1}))


def test_world_size_must_match_launcher():
    run = tiny_run(**{"parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2})
    assert validate_run(run, launcher_world_size=4).world_size == 4
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=8 from the launcher != dp\*ep\*tp\*pp = 2\*2\*1\*1 = 4"):
        validate_run(run, launcher_world_size=8)


def test_micro_batch_and_accumulation():
    run = tiny_run(**{"parallel.data_parallel_size": 2, "trainer.global_batch_size": 16})
    plan = batch_plan(run)
    assert (plan.micro_batch_size, plan.micro_steps) == (8, 1)
    run = tiny_run(**{"parallel.data_parallel_size": 2, "trainer.global_batch_size": 16, "trainer.micro_batch_size": 2})
    validate_run(run)
    plan = batch_plan(run)
    assert (plan.micro_batch_size, plan.micro_steps) == (2, 4)


def _compose(overrides):
    import os

    register_schema()
    conf_dir = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


PRESETS = [
    "single",
    "dp2",
    "dp4",
    "dp8",
    "ep2",
    "ep4",
    "ep8",
    "ep2_dp2",
    "ep2_dp4",
    "ep4_dp2",
    "ep2_dp8",
    "ep8_dp2",
    "tp2",
    "tp4",
    "tp2_dp2",
    "tp2_ep2",
    "tp2_ep2_dp2",
    "pp2",
    "pp4",
    "pp2_ep2",
    "pp2_ep2_dp2",
    "pp2_tp2_ep2",
    "pp2_tp2_ep2_dp2",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_parallel_preset_validates_with_its_name(preset):
    run = to_run_config(_compose([f"parallel={preset}", "trainer.global_batch_size=32"]))
    dims = validate_run(run)
    p = run.parallel
    assert p.name == preset
    assert dims.world_size == (
        p.data_parallel_size * p.expert_parallel_size * p.tensor_parallel_size * p.pipeline_parallel_size
    )


def test_every_preset_file_is_tested():
    import os

    conf_dir = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "parallel")
    assert sorted(f[:-5] for f in os.listdir(conf_dir)) == sorted(PRESETS)


def test_seed_model_matches_the_seed():
    m = to_run_config(_compose(["model=seed_4096"])).model
    assert (m.hidden_size, m.num_layers, m.num_experts, m.top_k, m.moe_every_k_layers, m.aux_loss_factor) == (
        4096,
        32,
        64,
        2,
        2,
        0.01,
    )


def test_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(Exception, match="num_expert"):
        _compose(["model.num_expert=4"])
    with pytest.raises(Exception, match="parallel.data_parallel_size"):
        _compose(["parallel.data_parallel_size=two"])


# --- numbers: non-finite or out-of-range values are refused in one line naming key, value, range ---


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("trainer.lr", float("inf"), "trainer.lr=inf must be a finite number > 0"),
        ("trainer.lr", float("nan"), "trainer.lr=nan must be a finite number > 0"),
        ("trainer.min_lr", float("nan"), "trainer.min_lr=nan must be a finite number >= 0"),
        ("trainer.grad_clip", float("nan"), "trainer.grad_clip=nan must be a finite number >= 0 (0: no clipping)"),
        ("trainer.grad_clip", float("inf"), "trainer.grad_clip=inf must be a finite number >= 0"),
        ("trainer.weight_decay", float("nan"), "trainer.weight_decay=nan must be a finite number >= 0"),
        ("model.init_std", float("nan"), "model.init_std=nan must be a finite number > 0"),
        ("model.init_std", 0.0, "model.init_std=0.0 must be a finite number > 0"),
        ("model.rope_theta", 0.0, "model.rope_theta=0.0 must be a finite number > 0"),
        ("model.norm_eps", -1.0, "model.norm_eps=-1.0 must be a finite number > 0"),
        ("model.norm_eps", 0.0, "model.norm_eps=0.0 must be a finite number > 0"),
        ("model.aux_loss_factor", float("inf"), "model.aux_loss_factor=inf must be a finite number >= 0 (0: off)"),
        ("model.z_loss_factor", float("nan"), "model.z_loss_factor=nan must be a finite number >= 0"),
        ("model.seq_aux_loss_factor", float("inf"), "model.seq_aux_loss_factor=inf must be a finite number"),
        ("model.expert_bias_update_rate", float("nan"), "model.expert_bias_update_rate=nan must be a finite"),
        (
            "model.capacity_factor",
            1e-9,
            "model.capacity_factor=1e-09 must be null (dropless) or a finite number >= 0.1",
        ),
        ("model.capacity_factor", float("nan"), "model.capacity_factor=nan must be null (dropless)"),
        ("model.capacity_factor", float("inf"), "model.capacity_factor=inf must be null (dropless)"),
        ("cluster.preempt_grace_s", -5, "cluster.preempt_grace_s=-5 must be a number of seconds >= 0"),
        ("cluster.collective_timeout_s", -1, "cluster.collective_timeout_s=-1 must be a positive number of seconds"),
        ("cluster.peak_flops", float("nan"), "cluster.peak_flops=nan must be a finite number > 0 (FLOP/s per device)"),
        ("cluster.gpu_memory_gb", float("inf"), "cluster.gpu_memory_gb=inf must be a finite number > 0"),
        ("logger.init_timeout_s", 0.0, "logger.init_timeout_s=0.0 must be a finite number of seconds > 0"),
        ("trainer.seed", -1, "trainer.seed=-1 must be in [0, 2**64-1 = 18446744073709551615]"),
        ("trainer.seed", 2**64, "trainer.seed=18446744073709551616 must be in [0, 2**64-1"),
        ("trainer.max_skipped_steps", 0, "trainer.max_skipped_steps=0 must be a positive integer"),
    ],
)
def test_numbers_out_of_range_are_refused_in_one_line(key, value, needle):
    with pytest.raises(ConfigError) as err:
        validate_run(tiny_run(**{key: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def _float_fields(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _float_fields(type(default), f"{prefix}{f.name}.")
        elif f.type in ("float", "Optional[float]", "float | None"):
            yield f"{prefix}{f.name}"


def test_every_float_key_refuses_nan_and_inf():
    """A float key added later is covered too: NaN passes every '< 0' check by failing it."""
    from moemesh.config.schema import RunConfig

    keys = list(_float_fields(RunConfig))
    assert "trainer.lr" in keys and "model.capacity_factor" in keys and len(keys) >= 20
    for key in keys:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ConfigError, match=rf"^{key}=(nan|inf|-inf) must be "):
                validate_run(tiny_run(**{key: bad}))


def test_seed_limits_are_the_generators_and_the_largest_seed_draws_batches():
    from moemesh.data import DataConfig, TokenData, prepare_data

    validate_run(tiny_run(**{"trainer.seed": 2**64 - 1}))
    validate_run(tiny_run(**{"trainer.seed": 0}))
    paths = prepare_data(DataConfig(name="s", kind="synthetic"), seq_len=8, vocab_size=256)
    for seed in (0, 2**64 - 1):  # the largest overflowed the data generator's seed before
        x, y = TokenData(paths, seed=seed).batch("train", 10**9, global_batch=4, seq_len=8, start=0, count=4)
        assert x.shape == (4, 8)


def test_capacity_factor_below_one_warns_with_the_fraction_dropped():
    from moemesh.config.validate import config_warnings

    assert config_warnings(tiny_run()) == [] and config_warnings(tiny_run(**{"model.capacity_factor": 1.25})) == []
    assert config_warnings(tiny_run(**{"model.capacity_factor": 1.0})) == []  # an even share each: nothing dropped
    (line,) = config_warnings(tiny_run(**{"model.capacity_factor": 0.25}))
    assert line.startswith("model.capacity_factor=0.25 < 1") and "about 75% or more" in line and "\n" not in line
    validate_run(tiny_run(**{"model.capacity_factor": 0.1}))  # the floor itself is allowed


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"parallel.sequence_parallel": True}, "parallel.sequence_parallel=true has no effect on this run (tp = 1)"),
        (
            {"parallel.comm_optimization.all_to_all_overlap": True},
            "parallel.comm_optimization.all_to_all_overlap=true has no effect on this run (ep = 1: no All-to-All",
        ),
        ({"parallel.pipeline_schedule": "zbv"}, "parallel.pipeline_schedule=zbv has no effect on this run (pp = 1"),
        ({"model.upcycle.num_experts": 4}, "model.upcycle.num_experts=4 has no effect on this run (upcycling reads"),
    ],
)
def test_a_setting_this_layout_ignores_is_a_warning(overrides, says):
    from moemesh.config.validate import config_warnings

    (line,) = config_warnings(tiny_run(**overrides))  # one line, and the run still starts
    assert line.startswith(says) and "\n" not in line


@pytest.mark.parametrize(
    "overrides",
    [
        {"parallel.name": "tp2", "parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": True},
        {
            "parallel.name": "ep2",
            "parallel.expert_parallel_size": 2,
            "parallel.comm_optimization.all_to_all_overlap": True,
        },
        {"parallel.name": "pp2", "parallel.pipeline_parallel_size": 2, "parallel.pipeline_schedule": "gpipe"},
    ],
)
def test_the_same_setting_on_a_layout_that_uses_it_is_no_warning(overrides):
    from moemesh.config.validate import config_warnings

    assert config_warnings(tiny_run(**overrides)) == []


# --- the layout's name ---


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_named_by_its_degrees(preset):
    from moemesh.parallel.dims import ParallelDims, layout_name

    p = to_run_config(_compose([f"parallel={preset}", "trainer.global_batch_size=32"])).parallel
    assert layout_name(ParallelDims.from_config(p)) == preset


def test_a_name_that_is_not_the_layout_is_refused():
    from moemesh.config.validate import check_layout_name
    from moemesh.parallel.dims import ParallelDims

    run = tiny_run(**{"parallel.name": "ep4", "parallel.expert_parallel_size": 2})
    with pytest.raises(ConfigError) as err:
        check_layout_name(run, ParallelDims(ep=2), presets={"ep2", "ep4"})
    assert str(err.value).startswith(
        "parallel.name=ep4 but the degrees are dp1·ep2·tp1·pp1, whose name is ep2: use parallel=ep2"
    )
    with pytest.raises(ConfigError, match="use parallel.name=ep3_dp2 with these degrees"):
        check_layout_name(tiny_run(**{"parallel.name": "ep4"}), ParallelDims(ep=3, dp=2), presets={"ep4"})
    check_layout_name(tiny_run(**{"parallel.name": "ep2"}), ParallelDims(ep=2))


# --- memory: only where a run trains, never for the planner ---


def test_a_model_too_big_for_this_machine_is_refused_before_it_starts():
    from moemesh.launch.checks import check_fits_host

    seed = to_run_config(_compose(["model=seed_4096"]))
    dims = validate_run(seed)  # valid: the planner plans it (scripts/plan.py validates, never sizes memory)
    with pytest.raises(ConfigError) as err:
        check_fits_host(seed, dims, ranks_here=None, host_bytes=128 * 2**30, device_type="cpu")
    msg = str(err.value)
    assert (
        msg.startswith(
            "model=seed_4096 (most of it: model.num_experts=64, model.moe_ffn_hidden_size=1,792) needs 402.0 GiB"
        )
        and "more than its 128.0 GiB" in msg
        and "\n" not in msg
    )
    # On a GPU the host holds the fp32 weights only while building: 4 bytes per parameter.
    check_fits_host(seed, dims, ranks_here=None, host_bytes=128 * 2**30, device_type="cuda")
    tiny = tiny_run()
    check_fits_host(tiny, validate_run(tiny), ranks_here=None, host_bytes=2**30, device_type="cpu")


@pytest.mark.parametrize(
    ("override", "says"),
    [
        # weights alone past the machine: the model is named, by the keys of its largest part,
        # even where the micro-batches would need more still (no batch size could fix it)
        ("model.vocab_size=1000000000", "model=tiny (most of it: model.vocab_size=1,000,000,000, model.hidden_size"),
        ("model.shared_expert_ffn_size=1000000000", "model=tiny (most of it: model.shared_expert_ffn_size=1,000,"),
        ("model.moe_ffn_hidden_size=1000000000", "(most of it: model.num_experts=8, model.moe_ffn_hidden_size=1,0"),
        ("model.ffn_hidden_size=300000000", "(most of it: model.ffn_hidden_size=300,000,000)"),
        # the rotary tables of every position, on every rank
        ("model.max_seq_len=16777216", "model.max_seq_len=16,777,216 needs 12.0 GiB of this machine's memory for the"),
    ],
)
def test_what_does_not_fit_is_named_by_its_key(override, says):
    from moemesh.launch.checks import check_fits_host

    one_head = ["model.num_heads=1", "model.num_kv_heads=1"]  # head_dim 128: 64 rotary columns
    run = to_run_config(_compose([override, "model.first_k_dense_layers=1", *one_head]))
    with pytest.raises(ConfigError) as err:
        check_fits_host(run, validate_run(run), ranks_here=None, host_bytes=8 * 2**30, device_type="cpu")
    assert says in str(err.value) and "trainer.global_batch_size" not in str(err.value).split("needs")[0]


def test_the_parts_a_refusal_prints_add_up_to_more_than_the_host():
    """The rotary tables counted in the check but left out of the message made it say "needs 14.0
    GiB ... plus 1.0 GiB ..., more than its 16.0 GiB"."""
    from moemesh.launch.checks import check_fits_host, host_activation_bytes
    from moemesh.moe.config import head_dim
    from moemesh.moe.param_count import count_params

    run = tiny_run(**{"model.max_seq_len": 4_000_000, "trainer.global_batch_size": 4096})
    dims = validate_run(run)
    state = count_params(run.model, dims).total * 16
    act, rope = host_activation_bytes(run, dims, "cpu")[0], 3 * 4_000_000 * (head_dim(run.model) // 2) * 4
    assert act > state and rope < act  # the batch is blamed
    with pytest.raises(ConfigError) as err:
        check_fits_host(run, dims, ranks_here=None, host_bytes=state + act + rope - 1, device_type="cpu")
    gib = [float(x.replace(",", "")) for x in re.findall(r"([\d,]+\.\d) GiB", str(err.value))]
    assert "GiB for the rotary tables" in str(err.value) and sum(gib[:-1]) > gib[-1] - 0.15, str(err.value)


def test_max_seq_len_past_fp32_positions_is_refused():
    with pytest.raises(ConfigError, match=r"model.max_seq_len=16777217 must be <= 16,777,216 \(2\^24\)"):
        to_run_config(_compose(["model.max_seq_len=16777217"]))


def test_memory_counts_the_ranks_on_this_machine():
    from moemesh.launch.checks import check_fits_host, host_activation_bytes
    from moemesh.moe.param_count import count_params
    from moemesh.parallel.dims import ParallelDims

    run = tiny_run(**{"parallel.name": "ep2_dp2", "parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2})
    dims = ParallelDims(dp=2, ep=2)
    from moemesh.moe.config import head_dim

    rope = 3 * run.model.max_seq_len * (head_dim(run.model) // 2) * 4  # cos, sin and their angles, fp32
    one = count_params(run.model, dims).total * 16 + host_activation_bytes(run, dims, "cpu")[0] + rope
    check_fits_host(run, dims, ranks_here=None, host_bytes=4 * one, device_type="cpu")
    with pytest.raises(ConfigError, match="on its 4 rank"):  # spawned here: all four
        check_fits_host(run, dims, ranks_here=None, host_bytes=4 * one - 1, device_type="cpu")
    check_fits_host(run, dims, ranks_here=1, host_bytes=one, device_type="cpu")  # torchrun, one per machine


def test_a_batch_too_big_for_this_machine_is_one_line_before_a_rank_starts():
    """Issue #27: trainer.global_batch_size=2147483648 passed; the process grew to 24 GB and the
    kernel killed it with no moemesh line. The check counted weights and optimizer state only."""
    from moemesh.launch.checks import check_fits_host, host_activation_bytes
    from moemesh.parallel.dims import ParallelDims
    from moemesh.planning.memory import activation_bytes

    run = tiny_run(**{"trainer.global_batch_size": 2147483648})
    dims = validate_run(run)  # valid arithmetic: the check is about this machine
    with pytest.raises(ConfigError) as err:
        check_fits_host(run, dims, ranks_here=None, host_bytes=64 * 2**30, device_type="cpu")
    msg = str(err.value)
    assert msg.startswith("trainer.global_batch_size=2147483648 (a micro-batch of 2,147,483,648 x 32 tokens") and (
        "for its activations and token ids on 1 rank(s)" in msg and "more than its 64.0 GiB" in msg
    )
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="for its token ids"):  # on a GPU the host still reads the token ids
        check_fits_host(run, dims, ranks_here=None, host_bytes=64 * 2**30, device_type="cuda")
    # The count is the planner's (fp32 on CPU) plus the token ids, inputs and targets.
    small = tiny_run()
    T = small.trainer.global_batch_size * small.trainer.seq_len
    want = activation_bytes(small.model, range(small.model.num_layers), T, ParallelDims(), False, "none", 1, 4)
    assert host_activation_bytes(small, validate_run(small), "cpu") == [want + 16 * T]


def test_integers_with_underscores_are_read_as_python_reads_them():
    """Issue #27 (info): trainer.steps=3_0 ran 30 steps. It is an integer literal as Python and
    YAML 1.1 write one (1_000), read as such everywhere; other spellings are one line."""
    from moemesh.config.cli import compose_run as _run

    assert _run(["trainer.steps=3_0"]).trainer.steps == 30
    assert _run(["trainer.steps=1_000"]).trainer.steps == 1000
    for bad in ("3__0", "_30", "30_"):
        with pytest.raises(ConfigError, match=f"trainer.steps={bad}: expected an integer"):
            _run([f"trainer.steps={bad}"])


def test_overlap_chunks_are_checked_only_where_the_overlap_runs():
    """ep 1 has no All-to-All: the overlap is ignored there (a warning), so its chunk count is
    not refused (a layout sweep setting the overlap for every job would fail its ep 1 jobs)."""
    over = {"parallel.comm_optimization.all_to_all_overlap": True, "parallel.comm_optimization.overlap_chunks": 10**5}
    validate_run(tiny_run(**over))
    ep2 = {"parallel.name": "ep2", "parallel.expert_parallel_size": 2}
    with pytest.raises(ConfigError, match=r"overlap_chunks=100000 must be <= the \d+ tokens each rank routes"):
        validate_run(tiny_run(**over, **ep2))


def _layout(**keys):
    dims = {"dp": "data_parallel_size", "ep": "expert_parallel_size", "tp": "tensor_parallel_size"}
    return {f"parallel.{dims[k]}": v for k, v in keys.items()}


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        # a routing limit whose experts are exactly top_k fits; one fewer does not
        ({**_layout(ep=4), "model.max_ranks_per_token": 1}, None),  # 1 rank x 2 experts = top_k 2
        ({**_layout(ep=4), "model.max_ranks_per_token": 1, "model.top_k": 3}, "experts must be >= model.top_k=3"),
        # TP peers route disjoint token slices: the micro-batch's tokens must divide by tp
        ({**_layout(dp=1, tp=2), "trainer.seq_len": 31, "trainer.micro_batch_size": 1}, "(TP peers route disjoint"),
        ({**_layout(dp=1, tp=2), "trainer.seq_len": 31, "trainer.micro_batch_size": 2}, None),
        ({**_layout(tp=2), "model.shared_expert_ffn_size": 3}, "model.shared_expert_ffn_size=3 must be divisible"),
        # as many overlap chunks as routed tokens is allowed; one more is an empty All-to-All
        (
            {**_layout(ep=2), "trainer.micro_batch_size": 1, "trainer.seq_len": 8,
             "parallel.comm_optimization.all_to_all_overlap": True, "parallel.comm_optimization.overlap_chunks": 8},
            None,
        ),
        (
            {**_layout(ep=2), "trainer.micro_batch_size": 1, "trainer.seq_len": 8,
             "parallel.comm_optimization.all_to_all_overlap": True, "parallel.comm_optimization.overlap_chunks": 9},
            "overlap_chunks=9 must be <= the 8 tokens",
        ),
        # with tp, each rank routes its 1/tp slice of the micro-batch's tokens: 8 / 2 = 4
        (
            {**_layout(ep=2, tp=2), "trainer.micro_batch_size": 1, "trainer.seq_len": 8,
             "parallel.comm_optimization.all_to_all_overlap": True, "parallel.comm_optimization.overlap_chunks": 5},
            "overlap_chunks=5 must be <= the 4 tokens",
        ),
        # a limit of fewer EP ranks than the group has limits something; all of them does not
        ({**_layout(ep=2), "model.max_ranks_per_token": 1}, None),
        ({**_layout(ep=2), "model.max_ranks_per_token": 2}, "nothing to limit; set it below 2"),
    ],
)  # fmt: skip
def test_the_rules_between_groups_at_their_boundaries(overrides, refused):
    """Each rule accepts the config at its edge and refuses the one past it (a rule removed, or
    < for <=, passed every other test)."""
    run = tiny_run(**overrides)
    if refused is None:
        validate_run(run)
        return
    with pytest.raises(ConfigError) as err:
        validate_run(run)
    assert refused in str(err.value), err.value


def test_a_pipeline_s_ranks_are_counted_stage_by_stage():
    """With ranks_here the check counts each rank at the smallest stage's size (a lower bound):
    a machine that holds the smallest stage is never refused for the largest. Spawned here,
    each stage's rank is counted once."""
    from moemesh.launch.checks import check_fits_host, host_activation_bytes, host_param_counts
    from moemesh.moe.config import head_dim

    run = tiny_run(
        **{
            "parallel.name": "pp2",
            "parallel.pipeline_parallel_size": 2,
            "parallel.pipeline_split": [3, 1],
            "model.num_layers": 4,
            "trainer.micro_steps": 4,
        }
    )
    dims = validate_run(run)
    sizes = [p * 16 + a for p, a in zip(host_param_counts(run, dims), host_activation_bytes(run, dims, "cpu"))]
    assert min(sizes) < max(sizes), sizes
    rope = 3 * run.model.max_seq_len * (head_dim(run.model) // 2) * 4
    check_fits_host(run, dims, ranks_here=1, host_bytes=min(sizes) + rope, device_type="cpu")
    with pytest.raises(ConfigError, match="on its 1 rank"):
        check_fits_host(run, dims, ranks_here=1, host_bytes=min(sizes) + rope - 1, device_type="cpu")
    # spawned here: one rank per stage, each stage counted once
    check_fits_host(run, dims, ranks_here=None, host_bytes=sum(sizes) + 2 * rope, device_type="cpu")
    with pytest.raises(ConfigError, match="on its 2 rank"):
        check_fits_host(run, dims, ranks_here=None, host_bytes=sum(sizes) + 2 * rope - 1, device_type="cpu")
