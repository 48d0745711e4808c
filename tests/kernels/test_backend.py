"""The backend choice: what kernels.backend resolves to, and what it refuses, before a rank starts."""

from __future__ import annotations

import pytest

from moemesh.errors import ConfigError
from moemesh.kernels import MAX_TRITON_EXPERTS, backend_problem, get_ops
from moemesh.kernels._triton import triton_available
from moemesh.parallel.dims import ParallelDims
from tests.helpers import tiny_run

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
def test_more_experts_than_the_gating_tile_fall_back_or_are_refused():
    E = MAX_TRITON_EXPERTS + 16
    # auto: Triton on CUDA where the model fits, the torch reference where it does not
    assert get_ops("auto", "cuda", MAX_TRITON_EXPERTS).name == "triton"
    assert get_ops("auto", "cuda", E).name == "torch"
    assert backend_problem("auto", "cuda", E) is None
    # an explicit triton: one line naming the key, the value and what is valid
    problem = backend_problem("triton", "cuda", E)
    assert problem == (
        f"cannot route model.num_experts={E}: the Triton gating kernel holds at most {MAX_TRITON_EXPERTS} "
        "experts; valid for this model: auto (the torch backend here), torch"
    )
    with pytest.raises(ValueError, match=f"kernels.backend='triton' cannot route model.num_experts={E}"):
        get_ops("triton", "cuda", E)
    assert backend_problem("torch", "cuda", E) is None


@needs_triton
def test_check_launcher_refuses_triton_for_too_many_experts(monkeypatch):
    from moemesh.launch.checks import check_launcher

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton can run on this CPU: only the expert count is wrong
    E = MAX_TRITON_EXPERTS + 16
    run = tiny_run(**{"kernels.backend": "triton", "model.num_experts": E, "model.moe_ffn_hidden_size": 8})
    with pytest.raises(ConfigError) as err:
        check_launcher(run, None, ParallelDims())
    assert str(err.value) == (
        f"kernels.backend=triton cannot route model.num_experts={E}: the Triton gating kernel holds at most "
        f"{MAX_TRITON_EXPERTS} experts; valid for this model: auto (the torch backend here), torch"
    )
    check_launcher(tiny_run(**{"kernels.backend": "triton"}), None, ParallelDims())  # the tiny model fits
