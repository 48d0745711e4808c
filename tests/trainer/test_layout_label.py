"""The layout label is the layout: summary.json ``parallel``, the start line and wandb's run name
and ``layout`` column come from the degrees that ran, not from ``parallel.name`` (which the
command line now refuses when it disagrees: tests/test_bad_input.py)."""

import json

import pytest

from moemesh.parallel.dims import ParallelDims
from moemesh.trainer.data import prepare_data
from tests.helpers import tiny_run, train_single


def test_summary_and_start_line_name_the_degrees_that_ran(tmp_path, capsys):
    run = tiny_run(**{"parallel.name": "ep4", "trainer.steps": 2, "logger.console": True})  # ran: one rank
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    summary = train_single(run, tmp_path, paths)
    assert summary["parallel"] == "single"
    assert json.loads((tmp_path / "summary.json").read_text())["parallel"] == "single"
    assert "moemesh: single (dp1·ep1·tp1·pp1 = 1 rank)" in capsys.readouterr().out


@pytest.mark.slow  # seconds of one process: shares the cores with the slow tier
@pytest.mark.shares_cores
def test_wandb_names_the_run_and_its_layout_column_by_the_degrees(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from moemesh.trainer.wandb_tracker import WandbTracker, flat_config

    run = tiny_run(**{"parallel.name": "ep4", "parallel.expert_parallel_size": 2, "logger.wandb": True})
    dims = ParallelDims(ep=2)
    assert flat_config(run, dims)["layout"] == "ep2"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    tracker = WandbTracker(run, dims, str(tmp_path))
    try:
        assert tracker.run.name == "ep2" and tracker.note is None
    finally:
        tracker.finish()
