"""Which run owns a checkpoint directory (issue #27, finding 2: a fresh run that deletes its
own saves). A fresh run into a directory holding checkpoints is refused before step 1;
pruning never deletes a checkpoint of the current run in favour of one it did not write.
One process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moemesh.parallel import checkpoint
from tests.parallel import _checkpoint_kit as kit


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    kit.train_here(kit.run_config(), out)
    return out / "checkpoints"


def _metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []


def _stray(root: Path, src: Path, step: int) -> Path:
    """A checkpoint directory of another run, numbered ``step`` (its meta.json says so too)."""
    d = root / f"step_{step:06d}"
    shutil.copytree(src, d)
    meta = json.loads((d / "meta.json").read_text())
    meta.update(step=step, run_id="another-run")
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def test_a_fresh_run_into_a_dir_with_checkpoints_is_refused_before_step_1(good_checkpoints, tmp_path):
    """The finding: a fresh run saved step 1..3 and pruning deleted each save at once, since the
    old run's step 10 outranked them; the run exited 0 and resume=auto took the old one."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    _stray(root, good_checkpoints / "step_000003", 10)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(checkpoint.CheckpointError) as err:
        kit.train_here(kit.run_config(**{"checkpoint.keep": 1}), out)
    line = str(err.value)
    assert "\n" not in line
    assert f"{root} already holds 1 checkpoint(s) of an earlier run (the newest: step_000010)" in line
    assert "resume=auto" in line and "hydra.run.dir=<new dir>" in line and "checkpoint.dir=<new dir>" in line
    assert not _metrics(out)  # not a step ran
    assert sorted(p.name for p in root.iterdir()) == before  # nothing removed, nothing added


def test_a_run_that_never_saves_may_start_beside_checkpoints(good_checkpoints, tmp_path):
    out = tmp_path / "run"
    kit.copy_checkpoints(good_checkpoints, out / "checkpoints")
    kit.train_here(kit.run_config(**{"checkpoint.every": 0, "checkpoint.save_final": False, "trainer.steps": 1}), out)
    assert [r["step"] for r in _metrics(out)] == [1]


def test_pruning_keeps_this_runs_saves_over_a_stray_higher_step(good_checkpoints, tmp_path):
    """A stray step_999999999999 with keep=1 deleted every save. Now this run's newest save
    stays and the stray goes (it is not this run's, and keep=1 leaves room for one)."""
    out = tmp_path / "run"
    root = kit.copy_checkpoints(good_checkpoints, out / "checkpoints")
    stray = _stray(root, good_checkpoints / "step_000003", 999_999_999_999)
    (stray / ".metadata").write_bytes(b"not a checkpoint")  # so resume falls back past it
    run = kit.run_config(**{"resume": "auto", "trainer.steps": 5, "checkpoint.keep": 1})
    kit.train_here(run, out)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_000005"]
    assert json.loads((root / "step_000005" / "meta.json").read_text())["run_id"]


def test_pruning_deletes_other_runs_first_then_this_runs_oldest(good_checkpoints, tmp_path):
    out = tmp_path / "run"
    root = kit.copy_checkpoints(good_checkpoints, out / "checkpoints")  # steps 1-3 of an earlier attempt
    run = kit.run_config(**{"resume": "auto", "trainer.steps": 6, "checkpoint.keep": 2})
    kit.train_here(run, out)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_000005", "step_000006"]
    ids = {json.loads((root / n / "meta.json").read_text())["run_id"] for n in ("step_000005", "step_000006")}
    assert len(ids) == 1  # both this run's


def test_resume_auto_continues_in_a_dir_with_checkpoints(good_checkpoints, tmp_path):
    out = tmp_path / "run"
    kit.copy_checkpoints(good_checkpoints, out / "checkpoints")
    kit.train_here(kit.run_config(**{"resume": "auto", "trainer.steps": 4}), out)
    assert [r["step"] for r in _metrics(out)] == [4]


def test_step_directories_are_ascii_digits_only(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    shutil.copytree(root / "step_000003", root / "step_\u0663\u0663")  # Arabic-Indic 33
    shutil.copytree(root / "step_000003", root / "step_\uff19")  # a fullwidth 9
    assert checkpoint.step_of(root / "step_\u0663") is None and checkpoint.step_of(root / "step_\uff19") is None
    assert [p.name for p in checkpoint.complete_checkpoints(root)][-1] == "step_000003"


def test_an_unreadable_directory_is_left_to_the_write_probe(tmp_path, monkeypatch):
    """owner_conflict runs in the CLI before anything starts: an OSError there was a traceback."""

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", unreadable)
    assert checkpoint.owner_conflict(tmp_path) is None


def test_the_refusal_counts_the_earlier_checkpoints_and_names_the_newest_by_step(tmp_path):
    for name in ("step_000010", "step_000002", "step_1000000", "step_000011.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text("{}")
    line = checkpoint.owner_conflict(tmp_path)
    assert f"{tmp_path} already holds 3 checkpoint(s) of an earlier run (the newest: step_1000000)" in line
