"""The finiteness check of the gradient norm: on the host (CPU, skip mode) a one-line
FloatingPointError naming step and value; ordered on the device (stop mode on CUDA) a
``torch._assert_async`` naming the step. On the CPU that assert raises at once, so the
device path is tested here by forcing it."""

import math

import pytest
import torch

from moemesh.trainer.nonfinite import update_allowed


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_device_ordered_stop_raises_with_the_step(bad):
    with pytest.raises(RuntimeError, match=r"non-finite gradient norm at step 17 .*stopped before the update"):
        update_allowed(torch.tensor(bad), 17, "stop", on_device=True)


def test_device_ordered_stop_passes_a_finite_norm():
    assert update_allowed(torch.tensor(3.5), 17, "stop", on_device=True) is True
    assert update_allowed(torch.tensor(0.0), 17, "stop", on_device=True) is True


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_host_stop_names_step_and_value(bad):
    with pytest.raises(FloatingPointError) as err:
        update_allowed(torch.tensor(bad), 5, "stop")
    text = str(err.value)
    assert f"non-finite gradient norm {float(bad)} at step 5: stopped before the update" in text
    assert "\n" not in text


def test_skip_decides_on_the_host_even_when_asked_for_the_device():
    # skip needs the answer on the host (optimizer.step() runs or not): never the assert.
    assert update_allowed(torch.tensor(math.nan), 5, "skip", on_device=True) is False
    assert update_allowed(torch.tensor(math.inf), 5, "skip") is False
    assert update_allowed(torch.tensor(2.0), 5, "skip") is True
    assert update_allowed(torch.tensor(2.0), 5, "stop") is True


def test_cpu_norm_defaults_to_the_host_check():
    with pytest.raises(FloatingPointError):
        update_allowed(torch.tensor(math.nan), 3, "stop")  # on_device=None: a CPU tensor, the host check


def test_a_non_finite_validation_loss_stops_a_stop_mode_run_and_not_a_skip_mode_one():
    from moemesh.trainer.nonfinite import NonFinitePolicy

    with pytest.raises(FloatingPointError, match=r"^non-finite validation loss nan after step 4: .*before saving"):
        NonFinitePolicy("stop", 10).check_val_loss(math.nan, 4)
    NonFinitePolicy("stop", 10).check_val_loss(2.5, 4)
    NonFinitePolicy("skip", 10).check_val_loss(math.inf, 4)  # skip: the next steps skip, then stop


def test_skipped_steps_stop_the_run_at_the_limit_naming_the_steps_and_a_good_step_resets_the_count():
    """skip mode: each skipped step is said in one line with the count so far; the limit-th
    skipped step in a row stops the run, naming the first and last of them; a step whose
    update lands starts the count again."""
    from moemesh.trainer.nonfinite import NonFinitePolicy

    policy, said = NonFinitePolicy("skip", 3), []
    for step in (1, 2):
        assert policy.update_allowed(torch.tensor(math.nan), step) is False
        policy.skipped(step, said.append)
    assert said == [
        f"moemesh: step {s}: non-finite gradient norm, update skipped ({s} in a row; trainer.max_skipped_steps=3)"
        for s in (1, 2)
    ]
    assert policy.update_allowed(torch.tensor(1.0), 3) is True  # an update landed: the count starts again
    for step in (4, 5):
        policy.skipped(step, said.append)
    with pytest.raises(FloatingPointError) as err:
        policy.skipped(6, said.append)
    assert str(err.value).startswith(
        "3 steps in a row skipped for a non-finite gradient norm (steps 4..6, trainer.max_skipped_steps=3): stopped"
    )
    assert said[-1].endswith("(3 in a row; trainer.max_skipped_steps=3)")


def test_a_non_finite_training_loss_stops_a_stop_mode_run_and_not_a_skip_mode_one():
    from moemesh.trainer.nonfinite import NonFinitePolicy

    with pytest.raises(FloatingPointError, match=r"^non-finite training loss inf at step 7$"):
        NonFinitePolicy("stop", 10).check_loss(math.inf, 7)
    NonFinitePolicy("stop", 10).check_loss(2.5, 7)
    NonFinitePolicy("skip", 10).check_loss(math.nan, 7)  # skip: the gradient norm decides the step
