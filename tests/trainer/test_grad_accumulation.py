"""Gradient accumulation against a reference the test computes itself, one process.

``train_step`` cuts the global batch into k micro-steps (``BatchPlan``), scales each
micro-step's loss (and the balance losses riding on its activations) by 1/k and lets the
gradients add up. The reference reads the global batch in one piece and builds the same
model from the same seed, then:

* balance losses off (``aux_loss_factor`` = ``z_loss_factor`` = 0): the objective is the mean
  cross-entropy over the global batch, so one forward and backward of the whole batch gives
  the gradient the k micro-steps must add up to;
* balance losses on: they are computed per micro-step (f_i and P_i span one micro-step's
  tokens), so the objective is the mean over micro-steps i of (cross-entropy_i + the
  weighted aux and z losses of micro-step i); the reference runs each micro-batch forward
  and backward on its own at loss scale 1 and averages the gradients.

Gradients are compared as the optimizer receives them (no clipping), each to 1e-5 of the
parameter's largest entry (tests/same_math.py).
"""

import pytest
import torch

from moemesh.parallel.mesh import single_rank_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import build_training, train_step
from moemesh.trainer.parallelize import build_model
from tests.helpers import cpu_context, tiny_run
from tests.same_math import assert_grads_match

G, K = 8, 4  # global batch, micro-steps
OFF = {"model.aux_loss_factor": 0.0, "model.z_loss_factor": 0.0}


def _run(micro: int, **extra):
    return tiny_run(
        **{
            "trainer.micro_batch_size": micro,
            "trainer.global_batch_size": G,
            "trainer.grad_clip": 0.0,
            "trainer.steps": 1,
            "checkpoint.save_final": False,
            **extra,
        }
    )


def _pieces(model) -> dict[str, dict]:
    return {
        n: {"grad": p.grad.detach().clone(), "expert_first": None, "tp": None, "tp_rank": 0}
        for n, p in model.named_parameters()
    }


def _accumulated(run, tmp_path):
    """train_step's gradients at step 1, as the optimizer receives them; and the global batch."""
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    state = build_training(run, cpu_context(0, single_rank_mesh(), tmp_path, paths))
    assert state.accum == K
    seen: list[dict] = []
    state.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(_pieces(state.model)))
    try:
        train_step(state, 0)
        x, y = state.data.batch("train", 0, global_batch=G, seq_len=run.trainer.seq_len, start=0, count=G)
    finally:
        state.data.close()
        state.log.close()
    return seen[0], x, y


def _fresh_model(run):
    torch.manual_seed(run.trainer.seed)
    return build_model(run, single_rank_mesh(), torch.device("cpu"))


def test_k_micro_steps_give_the_gradient_of_the_whole_batch(tmp_path):
    run = _run(G // K, **OFF)
    got, x, y = _accumulated(run, tmp_path)
    model = _fresh_model(run)
    model(x, y).loss.backward()  # the whole global batch at once: mean cross-entropy
    worst = assert_grads_match(_pieces(model), [got], "accumulated vs whole batch")
    print(f"k={K} micro-steps against the whole batch: gradients within {worst:.1e}")


def test_k_micro_steps_give_the_mean_of_the_per_micro_step_objectives(tmp_path):
    run = _run(G // K)
    assert run.model.aux_loss_factor > 0 and run.model.z_loss_factor > 0
    got, x, y = _accumulated(run, tmp_path)
    model = _fresh_model(run)
    m = G // K
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(K):
        model.zero_grad(set_to_none=True)
        model(x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]).loss.backward()  # CE_i + aux_i + z_i
        for n, p in model.named_parameters():
            total[n] += p.grad
    for n, p in model.named_parameters():
        p.grad = total[n] / K
    worst = assert_grads_match(_pieces(model), [got], "accumulated vs per-micro-step objective")
    print(f"k={K} micro-steps against the mean objective: gradients within {worst:.1e}")
    # The balance losses matter here: the whole batch's gradient is a different one.
    model.zero_grad(set_to_none=True)
    model(x, y).loss.backward()
    with pytest.raises(AssertionError, match="gradient off by"):
        assert_grads_match(_pieces(model), [got], "whole batch, balance losses on")
