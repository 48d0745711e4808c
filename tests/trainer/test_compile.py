"""trainer.compile=blocks and =model train like eager: five steps on the CPU (inductor), the losses
and the gradient norms equal to fp32 rounding, with and without activation checkpointing (full,
selective); and nothing recompiles after the first step (the compiled regions' shapes are fixed
by the micro-batch; the routed path with its data-dependent row counts runs eagerly between
them).

Bound: 1e-5 relative on the loss, 1e-4 on the gradient norm (its smallest gradients, where
AdamW turns a rounding difference into a full-size update, weigh little in the norm). Inductor
fuses the norms, RoPE and SwiGLU and may reorder their reductions, each reorder a few fp32 ulps
(2**-24 ~ 6e-8); a wrong graph (a missed op, a stale guard) moves the loss by more than 1e-3.
Measured on this CPU: the losses equal, the norms 1.2e-7 apart.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.parallel.mesh import single_rank_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import build_training, train_step
from tests.helpers import cpu_context, tiny_run

pytestmark = pytest.mark.slow  # inductor compiles for several seconds


def _losses(tmp_path, name, **overrides):
    run = tiny_run(**{"trainer.steps": 5, "model.shared_expert_ffn_size": 16, **overrides})
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    (tmp_path / name).mkdir()
    state = build_training(run, cpu_context(0, single_rank_mesh(), tmp_path / name, paths))
    losses, norms, graphs = [], [], []
    for step in range(1, 6):
        result = train_step(state, step)
        losses.append(result.stats.loss)
        norms.append(float(result.grad_norm))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    names = [n for n, _ in state.model.named_parameters()]
    state.log.close()
    return losses, norms, names, graphs


def test_compiled_blocks_and_model_train_like_eager_and_do_not_recompile(tmp_path):
    torch._dynamo.reset()
    cases = [
        ("blocks", "none"),
        ("blocks", "full"),
        ("blocks", "selective"),
        ("model", "none"),
        ("model", "full"),
        ("model", "selective"),
    ]
    eager = {}
    for mode, ac in cases:
        if ac not in eager:
            eager[ac] = _losses(tmp_path, f"eager_{ac}", **{"trainer.activation_checkpointing": ac})
        losses, n_eager, names_eager, _ = eager[ac]
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled, n_comp, names, graphs = _losses(
            tmp_path, f"{mode}_{ac}", **{"trainer.compile": mode, "trainer.activation_checkpointing": ac}
        )
        if ac == "none":
            assert graphs[0] > before  # something was compiled
        assert graphs[1:] == [graphs[0]] * 4, graphs  # no recompile after the first step
        assert compiled == pytest.approx(losses, rel=1e-5), (mode, ac, compiled, losses)
        assert n_comp == pytest.approx(n_eager, rel=1e-4), (mode, ac, n_comp, n_eager)  # the gradients' norm
        assert names == names_eager  # parameter names unchanged (checkpoints, FSDP's roots)
