import pytest
from hydra import compose, initialize_config_dir

from conf.schema import ConfigError, register_schema, to_run_config
from conf.validate import grad_accum_steps, micro_batch_size, validate_run
from tests.conftest import tiny_run


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"model.num_experts": 6, "parallel.expert_parallel_size": 4}, "model.num_experts=6 must be divisible by parallel.expert_parallel_size=4"),
        ({"model.top_k": 9}, "model.top_k=9 must be between 1 and model.num_experts=8"),
        ({"model.top_k": 0}, "model.top_k=0 must be between 1"),
        ({"trainer.global_batch_size": 6, "parallel.data_parallel_size": 4}, "trainer.global_batch_size=6 must be divisible by micro_steps*dp*ep = 1*4*1 = 4"),
        ({"trainer.micro_batch_size": 3}, "trainer.global_batch_size=8 must be divisible by micro_batch_size*dp*ep = 3*1*1 = 3"),
        ({"model.hidden_size": 0}, "model.hidden_size=0 must be a positive integer"),
        ({"parallel.data_parallel_size": 0}, "parallel.data_parallel_size=0 must be a positive integer"),
        ({"model.num_layers": 3, "model.moe_every_k_layers": 2}, "model.num_layers=3 must be divisible by model.moe_every_k_layers=2"),
        ({"parallel.tensor_parallel_size": 2, "model.num_heads": 3, "model.num_kv_heads": 3, "model.hidden_size": 48}, "model.num_heads=3 must be divisible by parallel.tensor_parallel_size=2"),
        ({"parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": True, "trainer.seq_len": 31}, "trainer.seq_len=31 must be divisible by parallel.tensor_parallel_size=2"),
        ({"parallel.pipeline_parallel_size": 4}, "model.num_layers=2 must be >= parallel.pipeline_parallel_size=4"),
        ({"parallel.pipeline_parallel_size": 2, "parallel.pipeline_split": [2, 1]}, "parallel.pipeline_split=[2, 1] must list 2 positive layer counts"),
        ({"parallel.pipeline_parallel_size": 2, "trainer.micro_batch_size": 8}, "1F1B needs micro-batches >= parallel.pipeline_parallel_size=2, got 1"),
        ({"parallel.pipeline_split": [1, 1]}, "parallel.pipeline_split=[1, 1] needs parallel.pipeline_parallel_size > 1"),
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


def test_world_size_must_match_launcher():
    run = tiny_run(**{"parallel.data_parallel_size": 2, "parallel.expert_parallel_size": 2})
    assert validate_run(run, launcher_world_size=4).world_size == 4
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=8 from the launcher != dp\*ep\*tp\*pp = 2\*2\*1\*1 = 4"):
        validate_run(run, launcher_world_size=8)


def test_micro_batch_and_accumulation():
    run = tiny_run(**{"parallel.data_parallel_size": 2, "trainer.global_batch_size": 16})
    assert (micro_batch_size(run), grad_accum_steps(run)) == (8, 1)
    run = tiny_run(**{"parallel.data_parallel_size": 2, "trainer.global_batch_size": 16, "trainer.micro_batch_size": 2})
    validate_run(run)
    assert (micro_batch_size(run), grad_accum_steps(run)) == (2, 4)


def _compose(overrides):
    import os

    register_schema()
    conf_dir = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


PRESETS = ["single", "dp2", "dp4", "dp8", "ep2", "ep4", "ep8", "ep2_dp2", "ep2_dp4", "ep4_dp2", "ep2_dp8", "ep8_dp2",
           "tp2", "tp4", "tp2_ep2", "tp2_ep2_dp2", "pp2", "pp4", "pp2_ep2_dp2", "pp2_tp2_ep2", "pp2_tp2_ep2_dp2"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_parallel_preset_validates_with_its_name(preset):
    run = to_run_config(_compose([f"parallel={preset}", "trainer.global_batch_size=32"]))
    dims = validate_run(run)
    p = run.parallel
    assert p.name == preset
    assert dims.world_size == (p.data_parallel_size * p.expert_parallel_size * p.tensor_parallel_size
                               * p.pipeline_parallel_size)


def test_every_preset_file_is_tested():
    import os

    conf_dir = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "parallel")
    assert sorted(f[:-5] for f in os.listdir(conf_dir)) == sorted(PRESETS)


def test_seed_model_matches_the_seed():
    m = to_run_config(_compose(["model=seed_4096"])).model
    assert (m.hidden_size, m.num_layers, m.num_experts, m.top_k, m.moe_every_k_layers, m.aux_loss_factor) == (
        4096, 32, 64, 2, 2, 0.01)


def test_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(Exception, match="num_expert"):
        _compose(["model.num_expert=4"])
    with pytest.raises(Exception, match="parallel.data_parallel_size"):
        _compose(["parallel.data_parallel_size=two"])
