"""The outer training loop in one process: which steps it logs, evaluates and saves, what an
evaluation averages, and the learning rate each step hands the optimizer (a stop request:
tests/launch/test_slurm.py).

The multi-rank and train.py tests reach the same loop, but slowly and through cadences that
coincide (every step logged, evaluation only at the end); these pull them apart on a tiny model.
"""

import json

import pytest
import torch

from moemesh.parallel.mesh import single_rank_mesh
from moemesh.trainer.data import prepare_data
from moemesh.trainer.loop import build_training, evaluate, train, train_step
from moemesh.trainer.optim import lr_at
from tests.helpers import cpu_context, tiny_run


def _paths(run):
    return prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _saved_steps(out) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*"))


def test_logging_evaluation_and_checkpoints_each_keep_their_own_cadence(tmp_path):
    """Five steps logged every 3rd, evaluated every 2nd, saved every 2nd: a step is logged when
    its index is a multiple of log_every, when it is the last, or when it was evaluated (its
    validation loss is not lost); evaluations and saves follow the completed-step count."""
    run = tiny_run(
        **{
            "trainer.steps": 5,
            "trainer.log_every": 3,
            "trainer.eval_every": 2,
            "checkpoint.every": 2,
            "checkpoint.keep": 5,
        }
    )
    summary = train(run, cpu_context(0, single_rank_mesh(), tmp_path, _paths(run)))
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert _saved_steps(tmp_path) == [2, 4, 5]  # every 2nd, and the last (save_final)
    assert summary["steps"] == 5 and summary["stopped_by_signal"] is None
    assert summary["final_val_loss"] == records[-1]["val_loss"]


def test_an_evaluation_is_the_mean_loss_of_the_validation_micro_batches_in_eval_mode(tmp_path):
    """``evaluate`` runs the validation split's batches in the training micro-batches and
    divides by how many it ran; the model is back in training mode afterwards."""
    run = tiny_run(**{"trainer.eval_batches": 2, "trainer.micro_batch_size": 4})  # 2 micro-steps of 4
    state = build_training(run, cpu_context(0, single_rank_mesh(), tmp_path, _paths(run)))
    assert state.accum == 2
    t = run.trainer
    got = evaluate(state.model, state.data, run, state.mesh, state.device, state.micro_start)
    assert state.model.training

    losses = []
    state.model.eval()
    with torch.no_grad():
        for b in range(t.eval_batches):
            for i in range(state.accum):
                mb = state.data.micro_batch(
                    "val", b, global_batch=t.global_batch_size, seq_len=t.seq_len, start=state.micro_start(i), count=4
                )
                losses.append(state.model(mb.inputs, mb.targets, **mb.model_kwargs(state.device)).loss.double())
    state.data.close()
    assert len(losses) == 4
    assert got == pytest.approx(float(sum(losses)) / len(losses), rel=1e-12)
    # ... and not the training split's loss at the same positions
    train_mb = state.data.micro_batch("train", 0, global_batch=t.global_batch_size, seq_len=t.seq_len, start=0, count=4)
    val_mb = state.data.micro_batch("val", 0, global_batch=t.global_batch_size, seq_len=t.seq_len, start=0, count=4)
    assert not torch.equal(train_mb.inputs, val_mb.inputs)


def test_each_step_hands_the_optimizer_the_scheduled_learning_rate(tmp_path):
    """The rate the optimizer steps with (seen from its step hook) is the schedule's for that
    step, through the warm-up and into the decay, and the record carries the same number."""
    run = tiny_run(**{"trainer.steps": 6, "trainer.warmup_steps": 2})
    state = build_training(run, cpu_context(0, single_rank_mesh(), tmp_path, _paths(run)))
    seen: list[float] = []
    state.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    results = [train_step(state, step) for step in range(4)]
    state.data.close()
    expected = [lr_at(step, run.trainer) for step in range(4)]
    assert len(set(expected)) == 4  # warm-up and decay: four different rates
    assert seen == expected and [r.lr for r in results] == expected
