"""One line for an override the grammar cannot read, saying how to quote it."""

import pytest

from moemesh.config.cli import preflight
from moemesh.config.schema import register_schema
from moemesh.errors import ConfigError


def test_an_unquoted_special_character_says_to_quote_it():
    register_schema()  # train.py does this at import
    with pytest.raises(ConfigError) as err:
        preflight(["-m", "hydra/sweeper=layouts", "cluster.gpus=4", "hydra.sweeper.include=[ep>=2]"])
    message = str(err.value)
    assert message.startswith("cannot parse the override: hydra.sweeper.include=[ep>=2] (a value with characters")
    assert """'hydra.sweeper.include=["ep>=2"]'""" in message and "\n" not in message
    # Quoted, the same value composes.
    command = preflight(["-m", "hydra/sweeper=layouts", "cluster.gpus=4", 'hydra.sweeper.include=["ep>=2"]'])
    assert command.multirun and len(command.jobs) == 1


def test_a_comma_without_m_says_it_makes_a_sweep():
    register_schema()
    with pytest.raises(ConfigError) as err:
        preflight(["trainer.lr=1e-3,2e-3"])
    assert str(err.value) == (
        "trainer.lr=1e-3,2e-3: a comma makes a sweep: add -m to run one job per value, or write a list as key=[a,b]"
    )


def test_printing_a_sweeps_config_is_one_line():
    from moemesh.config.cli import needs_preflight

    with pytest.raises(ConfigError, match=r"^--cfg prints one job's config, not a sweep's: drop -m"):
        needs_preflight(["-m", "parallel=ep2,dp2", "--cfg", "job"])
    assert not needs_preflight(["parallel=ep2", "--cfg", "job"])


def test_a_missing_preset_in_a_subgroup_lists_that_subgroups_presets():
    register_schema()
    with pytest.raises(ConfigError) as err:
        preflight(["cluster=calibrated/cpu5"])
    message = str(err.value)  # (valid: the calibrated presets, cpu4 among them; not local, slurm, torchrun)
    assert message.startswith("cluster=calibrated/cpu5: no such preset; did you mean cpu4? (valid: ")
    assert "cpu4" in message.split("(valid: ")[1] and "local" not in message
    with pytest.raises(ConfigError) as err:  # Hydra's own groups keep Hydra's list
        preflight(["hydra/sweeper=nope"])
    assert str(err.value).startswith("hydra/sweeper=nope: no such preset") and "layouts" in str(err.value)


def test_a_key_given_twice_with_different_values_is_named_with_the_one_used():
    from moemesh.config.cli import repeated_keys

    argv = ["-m", "parallel=dp2", "trainer.lr=1e-3", "parallel=ep2,dp2", "++trainer.lr=2e-3", "trainer.steps=5"]
    assert repeated_keys(argv) == [
        "parallel is given 2 times (dp2, ep2,dp2): the last, parallel=ep2,dp2, is used",
        "trainer.lr is given 2 times (1e-3, 2e-3): the last, trainer.lr=2e-3, is used",
    ]
    assert repeated_keys(["trainer.lr=1e-3", "trainer.lr=1e-3", "~logger.tags"]) == []  # the same value twice: no doubt


def test_the_scripts_compose_refuses_a_number_for_a_bool_as_train_py_does():
    """plan.py, mesh.py and calibrate.py compose with compose_run, which took sequence_parallel=2 as
    true while train.py refused it."""
    from moemesh.config.cli import compose_run

    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=2: expected true or false"):
        compose_run(["parallel=tp2", "parallel.sequence_parallel=2"])


@pytest.mark.parametrize("cluster, verb", [("local", "run"), ("slurm", "submitted")])
def test_a_sweep_job_whose_layout_name_is_wrong_refuses_the_sweep_naming_the_job(cluster, verb, tmp_path, monkeypatch):
    """A sweep names the job (its number from 0 and its overrides) and says that nothing ran, or,
    with the SLURM launcher, that nothing was submitted; a single job's line is the mistake alone."""
    register_schema()
    monkeypatch.chdir(tmp_path)  # the sweep directory's probe: created and removed here
    argv = ["-m", f"cluster={cluster}", "parallel=ep2,ep4", "parallel.expert_parallel_size=2"]
    with pytest.raises(ConfigError) as err:
        preflight(argv)
    assert str(err.value).startswith(
        f"nothing was {verb}; job #1 (cluster={cluster} parallel=ep4 parallel.expert_parallel_size=2): "
        "parallel.name=ep4 but the degrees are dp1·ep2·tp1·pp1, whose name is ep2: use parallel=ep2"
    )
    with pytest.raises(ConfigError) as err:  # one job: the mistake alone
        preflight([f"cluster={cluster}", "parallel=ep4", "parallel.expert_parallel_size=2"])
    assert str(err.value).startswith("parallel.name=ep4 but the degrees are dp1·ep2·tp1·pp1")
    assert list(tmp_path.iterdir()) == []


def test_removing_a_hydra_default_is_hydras_to_allow_and_removing_a_moemesh_key_is_refused(tmp_path, monkeypatch):
    """``~key`` of moemesh's schema-backed keys is one line; Hydra's own groups (its logging, say)
    are Hydra's, and their removal composes."""
    register_schema()
    monkeypatch.chdir(tmp_path)
    assert len(preflight(["~hydra/job_logging"]).jobs) == 1
    with pytest.raises(ConfigError, match=r"^~trainer.steps: moemesh's config keys cannot be removed"):
        preflight(["~trainer.steps"])


def test_a_refused_value_given_with_plus_plus_gets_no_note_about_adding_keys():
    """The note "'+' cannot add keys" belongs to a key the schema lacks; ``++key=value`` of a key
    it has, with a refused value, is that value's line alone."""
    register_schema()
    with pytest.raises(ConfigError) as err:
        preflight(["++trainer.steps=0"])
    assert str(err.value) == "trainer.steps=0 must be a positive integer"


def test_sbatchs_clock_format_for_a_minutes_key_is_converted_rounding_seconds_up():
    """``time_min=1-01:30:20`` (sbatch's days-hours:minutes:seconds) is a day, 90 minutes and 20
    seconds: 1531 whole minutes once the seconds round up, so the job is never cut short."""
    from moemesh.config.cli import compose_run

    minutes = 1 * 24 * 60 + 1 * 60 + 30 + 1
    with pytest.raises(ConfigError) as err:
        compose_run(["cluster=slurm", "cluster.slurm.time_min=1-01:30:20"])
    assert str(err.value) == (
        "cluster.slurm.time_min=1-01:30:20: expected a whole number of minutes "
        f"(cluster.slurm.time_min={minutes} for 1-01:30:20)"
    )


@pytest.mark.parametrize("sweeper", [[], ["hydra/sweeper=basic"]])
def test_hydras_own_sweeper_named_or_not_has_each_job_of_the_sweep_checked(sweeper, tmp_path, monkeypatch):
    """Hydra's basic sweeper, whether the command names it or not, runs the cartesian product of
    the sweep's values; preflight checks each of those jobs (another sweeper makes its own)."""
    register_schema()
    monkeypatch.chdir(tmp_path)
    jobs = preflight(["-m", *sweeper, "parallel=dp2,ep2", "trainer.steps=3,4"]).jobs
    assert len(jobs) == 4
    with pytest.raises(ConfigError, match=r"^nothing was run; job #1 \("):
        preflight(["-m", *sweeper, "parallel=ep2,ep4", "parallel.expert_parallel_size=2"])
