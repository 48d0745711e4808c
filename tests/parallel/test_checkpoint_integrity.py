"""Checkpoints you can trust, findings 2-5, 11 and 13: order by step number, a checkpoint
directory checked before the first step, checksums and finiteness at load, no non-finite
save, one line with the real cause for every failure, no ``.tmp`` debris. One process."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from moemesh.parallel import checkpoint, checkpoint_state
from tests.parallel import _checkpoint_kit as kit


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    kit.train_here(kit.run_config(), out)
    return out / "checkpoints"


# --- finding 2: order by number -------------------------------------------------------


def test_checkpoints_sort_by_step_across_the_millionth_step(tmp_path):
    state = {"w": torch.ones(3)}
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        checkpoint.save(tmp_path, step, state, {"layout": "single"}, rank=0, keep=3)
    kept = [p.name for p in checkpoint.complete_checkpoints(tmp_path)]
    # Pruning removed the oldest, not the newest; step_999999 comes first though its name sorts last.
    assert kept == ["step_999999", "step_1000000", "step_1000001"]
    (newest, older, oldest) = checkpoint.resolve("auto", tmp_path)  # what resume=auto and a SLURM requeue use
    assert [newest.name, older.name, oldest.name] == ["step_1000001", "step_1000000", "step_999999"]
    assert checkpoint.load(newest, {"w": torch.zeros(3)})["step"] == 1_000_001


def test_a_save_replaces_a_checkpoint_of_the_same_step(tmp_path):
    """A run that fell back past a bad step_N trains to step N again; its save replaces that
    directory (a rename onto it alone would fail: it is not empty)."""
    checkpoint.save(tmp_path, 2, {"w": torch.ones(3)}, {"layout": "single"}, rank=0, keep=0)
    checkpoint.save(tmp_path, 2, {"w": torch.full((3,), 7.0)}, {"layout": "single"}, rank=0, keep=0)
    (ckpt,) = checkpoint.complete_checkpoints(tmp_path)
    state = {"w": torch.zeros(3)}
    assert checkpoint.load(ckpt, state)["step"] == 2
    assert state["w"].tolist() == [7.0, 7.0, 7.0]


# --- finding 3: the checkpoint directory, checked before the first step ---------------


def _refused_before_training(tmp_path, match, **extra):
    out = tmp_path / "run"
    with pytest.raises(checkpoint.CheckpointError, match=match) as err:
        kit.train_here(kit.run_config(**extra), out)
    assert "\n" not in str(err.value)
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # not a single step ran
    return str(err.value)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_the_first_step(tmp_path):
    (tmp_path / "file").write_text("x")
    _refused_before_training(
        tmp_path,
        rf"checkpoint.dir cannot be written: {tmp_path / 'file'}: "
        r"\[Errno 17 EEXIST\]",
        **{"checkpoint.dir": str(tmp_path / "file")},
    )


def test_a_checkpoint_dir_under_dev_null_is_refused_before_the_first_step(tmp_path):
    _refused_before_training(
        tmp_path,
        r"checkpoint.dir cannot be written: /dev/null/ckpt: \[Errno 20 ENOTDIR\]",
        **{"checkpoint.dir": "/dev/null/ckpt"},
    )


def test_an_unwritable_checkpoint_dir_is_refused_before_the_first_step(tmp_path, monkeypatch):
    # As root, permissions do not stop a write: the probe's open is refused instead.
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if ".moemesh-probe" in str(path) and str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    _refused_before_training(
        tmp_path,
        rf"checkpoint.dir cannot be written: {tmp_path / 'ro'}/.moemesh-probe-0-\d+: "
        r"\[Errno 13 EACCES\] Permission denied",
        **{"checkpoint.dir": str(tmp_path / "ro")},
    )


def test_a_full_disk_is_refused_before_the_first_step_with_the_space_needed(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    line = _refused_before_training(
        tmp_path,
        r"checkpoint.dir .*/ckpt: 0.1 MiB free, one checkpoint of this run "
        r"takes about \d+\.\d MiB \(\[Errno 28 ENOSPC\] No space left on device",
        **{"checkpoint.dir": str(tmp_path / "ckpt")},
    )
    need = float(line.split("about ")[1].split(" MiB")[0]) * 2**20
    # The estimate covers what a save writes (model, both AdamW moments, DCP's overhead).
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", real)
    kit.train_here(kit.run_config(**{"trainer.steps": 1}), tmp_path / "sized")
    (ckpt,) = checkpoint.complete_checkpoints(tmp_path / "sized" / "checkpoints")
    written = sum(p.stat().st_size for p in ckpt.iterdir())
    assert written <= need <= 2 * written, (written, need)


@pytest.mark.slow
@pytest.mark.shares_cores
def test_train_py_says_an_unusable_checkpoint_dir_in_one_line_before_starting(tmp_path, repo_root):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "trainer.steps=50",
            "checkpoint.dir=/dev/null/ckpt",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr  # a config error, found before any rank starts
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "/dev/null/ckpt" in lines[0] and "ENOTDIR" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


# --- a save that fails: one line, the previous checkpoint kept, no debris (3, 13) ------


@contextlib.contextmanager
def _writes_fail(monkeypatch, err_no: int):
    """DCP's shard writes fail with ``err_no`` (a full disk, a revoked permission)."""
    real = dcp_fs.FileSystem.create_stream

    @contextlib.contextmanager
    def failing(self, path, mode):
        if "w" in mode and str(path).endswith(".distcp"):
            raise OSError(err_no, os.strerror(err_no))
        with real(self, path, mode) as stream:
            yield stream

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", failing)
    yield


@pytest.mark.parametrize("err_no,name", [(errno.ENOSPC, "ENOSPC"), (errno.EACCES, "EACCES")])
def test_a_failed_save_is_one_line_with_the_errno_and_keeps_the_previous_checkpoint(
    err_no, name, good_checkpoints, tmp_path, monkeypatch
):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = kit.checkpointer(root)
    assert ckpt.resume(kit.Log()) == 3
    with _writes_fail(monkeypatch, err_no), pytest.raises(checkpoint.CheckpointError) as err:
        ckpt.save(4)
    line = str(err.value)
    assert "\n" not in line and f"[Errno {err_no} {name}] {os.strerror(err_no)}" in line
    assert str(root / "step_000004.tmp") in line and f"{root / 'step_000003'}, is kept" in line
    assert [p.name for p in root.iterdir()] and not list(root.glob("*.tmp"))  # no debris
    assert [p.name for p in checkpoint.complete_checkpoints(root)][-1] == "step_000003"


@contextlib.contextmanager
def _writes_fail_midway(monkeypatch, make_error):
    """DCP's shard files open, then a write fails part-way (a disk that fills while saving, a
    Ctrl-C): torch's zip writer turns it into a RuntimeError that names only a zip position."""
    real = dcp_fs.FileSystem.create_stream

    class Failing:
        def __init__(self, stream):
            self.stream, self.calls = stream, 0

        def __getattr__(self, name):  # everything but write: the real file's
            return getattr(self.stream, name)

        def write(self, b):
            self.calls += 1
            if self.calls > 2:
                raise make_error()
            return self.stream.write(b)

    @contextlib.contextmanager
    def failing(self, path, mode):
        with real(self, path, mode) as stream:
            yield Failing(stream) if "w" in mode and str(path).endswith(".distcp") else stream

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", failing)
    yield


def test_a_disk_that_fills_part_way_through_a_save_is_named(good_checkpoints, tmp_path, monkeypatch):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = kit.checkpointer(root)
    assert ckpt.resume(kit.Log()) == 3
    full = lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # noqa: E731
    with _writes_fail_midway(monkeypatch, full), pytest.raises(checkpoint.CheckpointError) as err:
        ckpt.save(4)
    line = str(err.value)
    assert "[Errno 28 ENOSPC] No space left on device" in line and "unexpected pos" not in line, line
    assert [p.name for p in checkpoint.complete_checkpoints(root)][-1] == "step_000003"


def test_a_second_ctrl_c_while_saving_stops_at_once_not_as_a_failed_save(good_checkpoints, tmp_path, monkeypatch):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = kit.checkpointer(root)
    assert ckpt.resume(kit.Log()) == 3
    with _writes_fail_midway(monkeypatch, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        ckpt.save(4)
    assert [p.name for p in checkpoint.complete_checkpoints(root)][-1] == "step_000003"


def _peak_of_saves(existing: int, saves: int, keep: int) -> int:
    """Checkpoints on disk at once, counted by saving and pruning as checkpoint.save does."""
    on_disk, peak = existing, existing
    for _ in range(saves):
        peak = max(peak, on_disk + 1)  # the .tmp beside the kept ones
        on_disk = min(on_disk + 1, keep) if keep else on_disk + 1
    return peak


@pytest.mark.parametrize(
    "existing,saves,keep", [(0, 10, 3), (0, 2, 3), (0, 1, 3), (2, 5, 3), (3, 5, 3), (0, 6, 0), (1, 4, 1), (4, 3, 2)]
)
def test_the_space_warning_counts_the_checkpoints_a_run_holds_at_once(tmp_path, monkeypatch, existing, saves, keep):
    root = tmp_path / "ckpt"
    root.mkdir()
    for step in range(1, existing + 1):
        (root / f"step_{step:06d}").mkdir()
    monkeypatch.setattr(checkpoint, "complete_checkpoints", lambda r: sorted(r.iterdir()))
    more = _peak_of_saves(existing, saves, keep) - existing
    need, real = 2**20, shutil.disk_usage
    for room, warned in [(more * need, False), (more * need - 1, more > 1)]:
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p, room=room: real(p)._replace(free=room))
        line = checkpoint.space_warning(root, need, keep=keep, saves=saves)
        assert (line is not None) == warned, (room, line)
    if more > 1:
        assert f"checkpoint.keep={keep} with {saves} saves needs {more} more at once" in line
        assert line.endswith(" free 0.0 MiB"), line  # one byte short: what is missing, not all of it


def test_a_disk_that_holds_one_checkpoint_but_not_keep_plus_one_is_warned_before_the_first_step(tmp_path, monkeypatch):
    ckpt = kit.checkpointer(tmp_path / "ckpt", **{"trainer.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3})
    need, real = ckpt.preflight(tmp_path), shutil.disk_usage
    assert ckpt.space_warning(need, 0) is None  # this disk holds them
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=int(2.5 * need)))
    line = ckpt.space_warning(need, 0)
    # Three saves with keep=3: the third is written beside two kept ones, three at once.
    assert line and "checkpoint.keep=3 with 3 saves needs 3 more at once" in line, line
    assert "set checkpoint.keep=1 or free" in line, line
    monkeypatch.setattr(ckpt, "mesh", types.SimpleNamespace(rank=1))
    assert ckpt.space_warning(need, 0) is None  # rank 0 says it, once
    monkeypatch.undo()
    # Resumed after step 4: one save is left (step 6), beside the ones already there.
    assert ckpt.space_warning(need, 4) is None
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=int(4 * need)))
    assert ckpt.space_warning(need, 0) is None


@pytest.mark.parametrize("bias_rate", [0.0, 0.01])
def test_the_expected_size_bounds_a_checkpoint_by_its_entries_and_bytes(tmp_path, bias_rate):
    """``Checkpointer.expected`` (the bound a load holds a checkpoint's files to) counts what a
    save holds: each parameter and its two AdamW moments, the step, the RNG state (64 KiB
    allowed), and a bias per MoE layer, which exists only under aux-loss-free balancing."""
    ckpt = kit.checkpointer(tmp_path / "ckpt", **{"model.expert_bias_update_rate": bias_rate})
    kit.take_a_step(ckpt)
    state = ckpt._state()
    sizes = checkpoint_state.entry_bytes(state)
    keys, nbytes = ckpt.expected()
    biases = ckpt.run.model.num_layers  # one [E] bias per layer (every layer is MoE here)
    assert keys == len(state) + (0 if bias_rate else biases)
    bias_bytes = 4 * biases * ckpt.run.model.num_experts
    held = sum(sizes.values()) - sizes["rng.cpu"] - sizes["trainer.step"] + (0 if bias_rate else bias_bytes)
    assert nbytes == held + (64 << 10) and sizes["rng.cpu"] <= 64 << 10


def test_debris_of_an_interrupted_save_is_removed_before_the_first_step(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    (root / "step_000009.tmp").mkdir()
    (root / "step_000009.tmp" / "__0_0.distcp").write_bytes(b"\0" * 4096)
    (root / "step_best.tmp").mkdir()  # not a save's: step_ and digits only
    kit.checkpointer(root).preflight(tmp_path)
    assert not (root / "step_000009.tmp").exists()
    assert (root / "step_best.tmp").is_dir()
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_000001", "step_000002", "step_000003"]


# --- finding 4: checksums and finiteness at load --------------------------------------


def _resume(root):
    log = kit.Log()
    step = kit.checkpointer(root).resume(log)
    return step, log


def test_the_manifest_lists_every_file_with_its_sha256(good_checkpoints):
    ckpt = good_checkpoints / "step_000003"
    assert json.loads((ckpt / "meta.json").read_text())["files"] == kit.files_of(ckpt)


def test_flipped_bytes_in_a_shard_skip_that_checkpoint_naming_the_file(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    shard = kit.flip_bytes(root / "step_000003", kit.largest_float_key(root / "step_000003"))
    step, log = _resume(root)
    assert step == 2
    (line,) = log.warnings()
    assert f"cannot resume from step_000003: {shard}: sha256 " in line and "when saved" in line, line
    assert line.endswith("; trying step_000002")


def test_a_nan_shard_skips_that_checkpoint_naming_the_file_and_the_tensor(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    key = kit.largest_float_key(root / "step_000003")
    shard = kit.poison(root / "step_000003", key)
    kit.reseal(root / "step_000003")  # saved that way: its checksums match
    step, log = _resume(root)
    assert step == 2
    (line,) = log.warnings()
    assert f"{shard}: non-finite values in {key}" in line, line


def test_an_infinite_optimizer_moment_is_refused_too(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    key = "optim." + kit.largest_float_key(root / "step_000003").removeprefix("model.") + ".exp_avg_sq"
    kit.poison(root / "step_000003", key, fill=float("inf"))
    kit.reseal(root / "step_000003")
    step, log = _resume(root)
    assert step == 2 and f"non-finite values in {key}" in log.warnings()[0]


def test_when_every_checkpoint_is_bad_the_error_lists_each_cause(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    key = kit.largest_float_key(root / "step_000003")
    for ckpt in checkpoint.complete_checkpoints(root):
        kit.flip_bytes(ckpt, key)
    with pytest.raises(checkpoint.CheckpointError, match=r"none of 3 checkpoint\(s\) could be loaded: .*sha256"):
        kit.checkpointer(root).resume(kit.Log())


# --- finding 5: a non-finite model is never saved -------------------------------------


def test_a_non_finite_model_is_not_saved_and_the_last_good_checkpoint_is_kept(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = kit.checkpointer(root)
    assert ckpt.resume(kit.Log()) == 3
    name, p = next(iter(ckpt.model.named_parameters()))
    p.data.view(-1)[5] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=rf"non-finite values in model.{name} after step 4: not saved; "
        rf"the last checkpoint, {root / 'step_000003'}, is kept",
    ):
        ckpt.save(4)
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in good_checkpoints.iterdir())


def test_training_that_turns_non_finite_stops_at_the_save_with_the_last_good_checkpoint(good_checkpoints, tmp_path):
    # An infinite learning rate: the gradient is finite, the update is not. The code before
    # this change saved those weights as step 4 and resume=auto picked them.
    kit.copy_checkpoints(good_checkpoints, tmp_path / "run" / "checkpoints")
    run = kit.run_config(**{"trainer.steps": 6, "resume": "auto"})
    run.trainer.lr = float("inf")  # past TrainerConfig's own check, which refuses it on the command line
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite values in \S+ after step 4: not saved; the last "
        rf"checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step_000003'}, "
        "is kept",
    ):
        kit.train_here(run, tmp_path / "run")
    kept = checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_000001", "step_000002", "step_000003"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


def test_only_nan_and_infinity_count_as_non_finite_never_a_large_finite_value():
    """A max-abs norm cannot overflow where a sum of squares would (1e30 squared is inf in float32)."""
    state = {
        "big": torch.full((4,), 1e30),
        "big.bf16": torch.full((3,), 3e38, dtype=torch.bfloat16),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf.bf16": torch.tensor([-float("inf")], dtype=torch.bfloat16),
        "empty": torch.zeros(0),
        "trainer.step": torch.tensor(7),
    }
    assert checkpoint_state.nonfinite_keys(state) == ["nan", "inf.bf16"]


# --- finding 11: the cause, not "CheckpointException ranks:dict_keys(...)" --------------


def test_a_dcp_failure_is_described_by_its_cause():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/step_000004.tmp/__1_0.distcp")
    except OSError as e:
        wrapped = CheckpointException("write", {1: _wrap_exception(e)})
    assert (
        checkpoint.describe(wrapped) == "/ckpt/step_000004.tmp/__1_0.distcp: [Errno 28 ENOSPC] No space left on device"
    )
