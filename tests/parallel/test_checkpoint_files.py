"""A checkpoint's files are what they claim (issue #27, "Files are what they claim").

Each case tampers with the newest of three checkpoints as a disk, a bug or an attacker
would: a file that is a FIFO, a device, a directory or a symlink (inside the checkpoint
or leaving it), a size that is not the recorded one, a meta.json field missing or
ill-typed, a step that is not the checkpoint's. Resume must refuse it in one warning line
naming the file and the reason, within a second (a FIFO must not hang it: an alarm turns a
hang into a failure), and fall back to the previous checkpoint. One process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from moemesh.parallel import checkpoint
from tests.parallel import _checkpoint_kit as kit


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    kit.train_here(kit.run_config(), out)
    return out / "checkpoints"


@contextlib.contextmanager
def _deadline(seconds: int):
    def hung(*_):
        raise TimeoutError(f"still reading after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _resume(root: Path, **extra) -> tuple[int, list[str], float]:
    log = kit.Log()
    t0 = time.perf_counter()
    with _deadline(20):
        step = kit.checkpointer(root, **extra).resume(log)
    return step, log.warnings(), time.perf_counter() - t0


def _shard(ckpt: Path) -> Path:
    (shard,) = ckpt.glob("*.distcp")
    return shard


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def _set_meta(ckpt: Path, meta: dict) -> None:
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _symlink_outside(ckpt: Path) -> tuple[Path, str]:
    shard = _shard(ckpt)
    outside = ckpt.parent.parent / "elsewhere.distcp"
    shutil.copyfile(shard, outside)  # the same bytes: its checksum matches meta.json's
    shard.unlink()
    shard.symlink_to(outside)
    return shard, "a symbolic link, not a file of the checkpoint"


def _symlink_dev_zero(ckpt: Path) -> tuple[Path, str]:
    shard = _shard(ckpt)
    shard.unlink()
    shard.symlink_to("/dev/zero")
    return shard, "a symbolic link, not a file of the checkpoint"


def _fifo(name: str):
    def tamper(ckpt: Path) -> tuple[Path, str]:
        target = _shard(ckpt) if name == "shard" else ckpt / name
        target.unlink()
        os.mkfifo(target)
        return target, "a FIFO, not a regular file"

    return tamper


def _directory(ckpt: Path) -> tuple[Path, str]:
    shard = _shard(ckpt)
    shard.unlink()
    shard.mkdir()
    return shard, "a directory, not a regular file"


def _metadata_symlink(ckpt: Path) -> tuple[Path, str]:
    md = ckpt / ".metadata"
    shutil.copyfile(md, ckpt / "copy")
    md.unlink()
    md.symlink_to(ckpt / "copy")  # inside the checkpoint, and still not what meta.json lists
    return md, "a symbolic link, not a file of the checkpoint"


def _truncated(ckpt: Path) -> tuple[Path, str]:
    shard = _shard(ckpt)
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    return shard, f"{size // 2} bytes, {size} when saved (truncated or changed): not read"


def _grown(ckpt: Path) -> tuple[Path, str]:
    """64 MiB appended (sparse: no disk used), its checksum resealed: refused by size, unread."""
    shard = _shard(ckpt)
    os.truncate(shard, shard.stat().st_size + (64 << 20))
    kit.reseal(ckpt)
    return ckpt, "its files take"


TAMPERING = {
    "a shard is a symlink to a copy outside the checkpoint": _symlink_outside,
    "a shard is a symlink to /dev/zero": _symlink_dev_zero,
    "a shard is a FIFO": _fifo("shard"),
    "the .metadata is a FIFO": _fifo(".metadata"),
    "the .metadata is a symlink to a copy beside it": _metadata_symlink,
    "a shard is a directory": _directory,
    "a shard is truncated": _truncated,
    "a shard has grown by 64 MiB, resealed": _grown,
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_file_that_is_not_what_meta_json_says_is_refused_and_resume_falls_back(case, good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    path, why = TAMPERING[case](root / "step_000003")
    step, warnings, elapsed = _resume(root)
    assert step == 2, warnings
    (line,) = warnings
    assert f"cannot resume from step_000003: {path}" in line and why in line, line
    assert elapsed < 5.0  # both loads together; the refusal itself is found before any shard is read


def test_a_fifo_or_symlink_meta_json_or_checkpoint_dir_is_not_a_checkpoint(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    (root / "step_000003" / "meta.json").unlink()
    os.mkfifo(root / "step_000003" / "meta.json")
    shutil.copytree(root / "step_000002", tmp_path / "elsewhere")
    (root / "step_000004").symlink_to(tmp_path / "elsewhere")  # a checkpoint dir leaving the directory
    (root / "step_000005").mkdir()
    (root / "step_000005" / "meta.json").symlink_to(root / "step_000002" / "meta.json")
    with _deadline(20):
        assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_000001", "step_000002"]
    step, warnings, _ = _resume(root)
    assert step == 2 and not warnings


def test_a_meta_json_larger_than_1_mib_is_refused_unread(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    meta = _meta(root / "step_000003")
    meta["padding"] = "x" * (1 << 20)
    _set_meta(root / "step_000003", meta)
    step, (line,), _ = _resume(root)
    assert step == 2 and "meta.json: " in line and "more than the 1,048,576 it may have" in line, line


def _drop(key):
    def edit(meta):
        del meta[key]

    return edit


def _put(key, value):
    def edit(meta):
        meta[key] = value

    return edit


META_EDITS = {
    "no layout": (_drop("layout"), "'layout' is missing or not a string"),
    "no model": (_drop("model"), "'model' is missing or not an object"),
    "dp is a string": (_put("dp", "2"), "'dp' is missing or not an integer >= 1"),
    "no step": (_drop("step"), "'step' is missing or not an integer >= 1"),
    "step is a float": (_put("step", 3.0), "'step' is missing or not an integer >= 1"),
    "step is -7": (_put("step", -7), "'step' is missing or not an integer >= 1"),
    "step is 0": (_put("step", 0), "'step' is missing or not an integer >= 1"),
    "step is not the directory's": (_put("step", 2), "its step 2 is not its directory's number 3"),
    "a file's size is a string": (
        lambda m: m["files"][".metadata"].update(bytes="12"),
        "'files..metadata' is missing or not",
    ),
    "world is 0": (_put("world", 0), "'world' is missing or not an integer in [1, 1048576]"),
    "a JSON list": (lambda m: None, "a JSON list, not an object"),
}


@pytest.mark.parametrize("case", list(META_EDITS))
def test_a_missing_or_ill_typed_meta_json_field_is_refused_and_resume_falls_back(case, good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    edit, why = META_EDITS[case]
    meta = _meta(ckpt)
    edit(meta)
    _set_meta(ckpt, [meta] if case == "a JSON list" else meta)
    step, warnings, _ = _resume(root)
    assert step == 2, warnings
    (line,) = warnings
    assert f"cannot resume from step_000003: {ckpt / 'meta.json'}: refused: " in line and why in line, line


@pytest.mark.parametrize(
    ("degrees", "world"), [((2, 3, 1, 1), 6), ((1, 2, 2, 2), 8), ((2, 0, 1, 1), 1), ((2, "2", 1, 1), 1)]
)
def test_a_meta_json_saved_before_world_was_recorded_takes_it_from_the_degrees(degrees, world, tmp_path):
    ckpt = tmp_path / "step_000003"
    ckpt.mkdir()
    meta = {"step": 3, "files": {}, **dict(zip(("dp", "ep", "tp", "pp"), degrees))}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert checkpoint.read_meta(ckpt)["world"] == world  # their product; 1 where one is not a degree


def test_a_meta_json_may_say_up_to_max_world_ranks_saved_it(tmp_path):
    ckpt = tmp_path / "step_000003"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "files": {}, "world": checkpoint.MAX_WORLD}))
    assert checkpoint.read_meta(ckpt)["world"] == checkpoint.MAX_WORLD
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "files": {}, "world": checkpoint.MAX_WORLD + 1}))
    with pytest.raises(checkpoint.CheckpointError, match=r"'world' is missing or not an integer in \[1, 1048576\]"):
        checkpoint.read_meta(ckpt)


def _set_step_tensor(ckpt: Path, value: int) -> None:
    """Rewrite the step tensor's 8 bytes in its shard, then reseal, as an attacker could."""
    shard, start, length = kit.tensor_bytes_range(ckpt, "trainer.step")
    assert length == 8
    raw = bytearray(shard.read_bytes())
    raw[start : start + 8] = value.to_bytes(8, "little", signed=True)
    shard.write_bytes(bytes(raw))
    kit.reseal(ckpt)


@pytest.mark.parametrize("value", [-7, 2, 2**62])
def test_a_step_tensor_that_is_not_meta_jsons_step_is_refused(value, good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    _set_step_tensor(root / "step_000003", value)
    step, warnings, _ = _resume(root)
    assert step == 2, warnings
    (line,) = warnings
    assert f"{root / 'step_000003'}: refused: its step tensor holds {value}, its meta.json 3" in line, line


def test_a_consistent_step_of_2_to_the_62_is_refused_in_one_line(good_checkpoints, tmp_path):
    """Directory, meta.json and tensor agree on 2**62: rc 0 with no step trained before."""
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    big = 2**62
    ckpt = root / f"step_{big}"
    (root / "step_000003").rename(ckpt)
    meta = _meta(ckpt)
    meta["step"] = big
    _set_meta(ckpt, meta)
    _set_step_tensor(ckpt, big)
    step, warnings, _ = _resume(root)
    assert step == 2, warnings
    (line,) = warnings
    assert f"{ckpt} was saved after step {big}, past trainer.steps=3: nothing would be trained" in line, line


# --- a shard entry that is not one tensor of its size ------------------------------------


def _entry(name: str):
    def tamper(ckpt: Path) -> tuple[str, str]:
        key = "model.norm.weight"  # 32 fp32 values
        good = kit.tensor_entry_zip(_tensor_pkl(32, 32), {"data/0": b"\0" * 128})
        blobs = {
            "its storage claims 10^12 elements": kit.tensor_entry_zip(_tensor_pkl(10**12, 32), {"data/0": b"\0" * 128}),
            "its shape reaches past its storage": kit.tensor_entry_zip(_tensor_pkl(16, 32), {"data/0": b"\0" * 64}),
            "its record is deflated": _deflated(good),
            "it is not a zip": b"\0" * 4096,
        }
        kit.plant_entry(ckpt, key, blobs[name])
        return key, {
            "its storage claims 10^12 elements": "its storage record holds other than 1000000000000 elements",
            "its shape reaches past its storage": "its shape reaches past its storage",
            "its record is deflated": "is compressed",
            "it is not a zip": "not a torch.save zip",
        }[name]

    return tamper


def _tensor_pkl(numel: int, size: int) -> bytes:
    """torch.save's data.pkl of a float32 vector: ``size`` elements viewed over ``numel``."""
    g = b"ctorch._utils\n_rebuild_tensor_v2\n"
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    pid += b"\x8a\x08" + numel.to_bytes(8, "little") + b"tQ"
    args = pid + b"K\x00" + b"\x8a\x08" + size.to_bytes(8, "little") + b"\x85K\x01\x85\x89"
    return b"\x80\x02" + g + b"(" + args + b"ccollections\nOrderedDict\n)RtR."


def _deflated(blob: bytes) -> bytes:
    import io
    import zipfile

    src, out = zipfile.ZipFile(io.BytesIO(blob)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        "its storage claims 10^12 elements",
        "its shape reaches past its storage",
        "its record is deflated",
        "it is not a zip",
    ],
)
def test_a_shard_entry_that_is_not_one_tensor_of_its_size_is_refused(case, good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    key, why = _entry(case)(root / "step_000003")
    step, warnings, _ = _resume(root)
    assert step == 2, warnings
    (line,) = warnings
    assert f"{root / 'step_000003' / 'evil.distcp'}: {key}: " in line and why in line, line


def test_a_damaged_shard_is_described_in_whole_sentences(good_checkpoints, tmp_path):
    """Garbage over a tensor entry's zip records, checksums resealed: the message was torch's
    weights_only explanation, cut mid-sentence; now it is one line of moemesh's own."""
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    shard, start, _ = kit.tensor_bytes_range(ckpt, "model.norm.weight")
    raw = bytearray(shard.read_bytes())
    raw[start - 700 : start] = b"\xa5" * 700  # the data.pkl and the headers before the values
    shard.write_bytes(bytes(raw))
    kit.reseal(ckpt)
    step, (line,), _ = _resume(root)
    assert step == 2
    reason = line.split(f"cannot resume from step_000003: {shard}: ", 1)[1]
    assert reason.startswith("model.norm.weight: ") and "weights_only" not in line and "(1)" not in line, line
    assert line.endswith("; trying step_000002"), line


def test_an_error_message_is_never_cut_mid_sentence():
    """torch wraps some messages over lines; the first line alone ended mid-sentence."""
    from moemesh.parallel.checkpoint_trust import first_line

    wrapped = RuntimeError(
        "Weights only load failed. This file can still be loaded, to do so you have two\n"
        "options, \x1b[1mdo those steps only if you trust the source\x1b[0m.\n\t(1) Re-running ..."
    )
    assert first_line(wrapped) == (
        "Weights only load failed. This file can still be loaded, to do so you have two options, do those "
        "steps only if you trust the source."
    )
    assert first_line(ValueError("one line\nsecond line")) == "one line second line"
    assert first_line(OSError("a whole sentence.\nmore")) == "a whole sentence."
    long = "First sentence. " + "word " * 200
    assert first_line(long) == "First sentence."
    assert first_line("x" * 1000).endswith("...") and len(first_line("x" * 1000)) == 400


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        {"samples": "7", "step": 3, "seq_len": 32, "sources": []},
        "SOURCES_NOT_A_LIST",
        "A_SOURCE_WITHOUT_NAME",
        "HUGE_COUNTS",  # 10^30 samples passed the type check and overflowed the reader (a traceback)
        "NEGATIVE_EPOCH",
    ],
)
def test_an_ill_typed_data_position_is_refused_and_resume_falls_back(bad, good_checkpoints, tmp_path):
    """meta.json's "data" (where the data order stands) is read after the load to place the
    reader: an ill-typed one crashed it there (a TypeError past the fallback)."""
    from moemesh.trainer.data import TokenData, prepare_data

    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    meta = _meta(ckpt)
    assert isinstance(meta.get("data"), dict)
    if bad == "SOURCES_NOT_A_LIST":
        bad = {**meta["data"], "sources": 5}
    elif bad == "HUGE_COUNTS":
        bad = {
            **meta["data"],
            "samples": 10**30,
            "sources": [{**s, "samples": 10**30, "epoch": 10**30} for s in meta["data"]["sources"]],
        }
    elif bad == "NEGATIVE_EPOCH":
        bad = {**meta["data"], "sources": [{**s, "epoch": -1} for s in meta["data"]["sources"]]}
    elif bad == "A_SOURCE_WITHOUT_NAME":
        bad = {
            **meta["data"],
            "sources": [{k: v for k, v in s.items() if k != "name"} for s in meta["data"]["sources"]],
        }
    meta["data"] = bad
    _set_meta(ckpt, meta)
    run = kit.run_config()
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    cp = kit.checkpointer(root)
    cp.data = TokenData(paths, seed=run.trainer.seed)
    log = kit.Log()
    try:
        with _deadline(20):
            step = cp.resume(log)
    finally:
        cp.data.close()
    assert step == 2, log.lines
    (line,) = log.warnings()
    assert f"cannot resume from step_000003: {ckpt / 'meta.json'}: refused: 'data' " in line, line


def test_a_resume_none_of_whose_checkpoints_could_serve_is_refused_before_any_rank(good_checkpoints, tmp_path):
    """train.py asks what meta.json says before it starts the ranks (exit 2, nothing made), as the
    ranks ask before reading tensors (exit 1, after the model was built): one candidate that
    passes is enough, since the ranks fall back to older ones."""
    from moemesh.errors import ConfigError
    from moemesh.trainer.checkpointing import check_resume

    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    check_resume(kit.run_config(resume=str(root)))
    check_resume(kit.run_config(resume="auto"))  # the run's own directory: the ranks' to look in
    check_resume(kit.run_config(resume=str(root), **{"trainer.steps": 2}))  # step 3 is past, 1 and 2 are not
    with pytest.raises(ConfigError) as err:
        check_resume(kit.run_config(resume=str(root / "step_000003"), **{"model.hidden_size": 64}))
    assert str(err.value).startswith(
        f"resume={root / 'step_000003'}: none of 1 checkpoint(s) could be loaded: {root / 'step_000003'} was saved "
        "for another model: model.hidden_size=32 (now 64)"
    ), err.value
    (root / "step_000001" / "meta.json").write_text("[]")
    with pytest.raises(ConfigError) as err:
        check_resume(kit.run_config(resume=str(root), **{"trainer.steps": 1}))
    reasons = str(err.value).split(": none of 3 checkpoint(s) could be loaded: ")[1].split("; ")
    assert [r.split(" ")[0] for r in reasons] == [str(root / f"step_00000{n}") for n in (3, 2)] + [
        str(root / "step_000001" / "meta.json:")
    ], reasons
    assert "past trainer.steps=1" in reasons[1] and "a JSON list, not an object" in reasons[2], reasons


def test_a_resume_continues_adamws_own_count_after_skipped_steps(tmp_path):
    """A step skipped for a non-finite gradient norm (trainer.on_nonfinite=skip) does not advance
    AdamW; a resume set its count to the trainer's step, so the resumed run's bias correction
    was not the uninterrupted run's. meta.json records AdamW's own count now."""
    ck = kit.checkpointer(tmp_path / "checkpoints")
    kit.take_a_step(ck)  # step 1 updates; step 2 is skipped (no optimizer.step())
    path = ck.save(2)
    assert _meta(path)["optimizer_step"] == 1
    again = kit.checkpointer(tmp_path / "checkpoints")
    assert again.resume(kit.Log()) == 2
    counts = {float(st["step"]) for st in again.optimizer.state.values()}
    assert counts == {1.0}, counts
    meta = _meta(path)
    meta["optimizer_step"] = 3  # more updates than steps: refused, and nothing older to fall back to
    _set_meta(path, meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"'optimizer_step' is not an integer in \[0, step 2\]"):
        kit.checkpointer(tmp_path / "checkpoints").resume(kit.Log())


def test_adamws_count_is_0_before_its_first_update_and_its_largest_after():
    """A run whose every step so far was skipped saves optimizer_step 0, not 1."""
    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(2)]
    opt = torch.optim.AdamW(ps)
    assert checkpoint.optimizer_step(opt) == 0
    checkpoint.init_optimizer_state(opt)
    assert checkpoint.optimizer_step(opt) == 0
    opt.state[ps[1]]["step"].fill_(5.0)
    assert checkpoint.optimizer_step(opt) == 5


def test_a_resume_restores_the_random_state_the_run_saved_with(tmp_path):
    """Nothing in training draws random numbers today, but whatever comes to (dropout, sampled
    routing noise) must continue the uninterrupted run's stream: the CPU generator's state at the
    save is the state after the resume, whatever the process drew before it."""
    ck = kit.checkpointer(tmp_path / "checkpoints")
    kit.take_a_step(ck)
    torch.manual_seed(1234)
    torch.rand(7)
    saved_state = torch.get_rng_state()
    ck.save(1)
    uninterrupted = torch.rand(5)
    torch.manual_seed(99)  # a new process seeds and draws on its own before resuming
    torch.rand(3)
    assert kit.checkpointer(tmp_path / "checkpoints").resume(kit.Log()) == 1
    assert torch.equal(torch.get_rng_state(), saved_state)
    assert torch.equal(torch.rand(5), uninterrupted)


def test_open_regular_takes_one_name_of_the_directory_and_at_most_max_size_bytes(tmp_path):
    from moemesh.parallel.checkpoint_files import FileRefused, open_regular, read_exactly, read_file

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"x" * 10)
    for name in ("sub/f", "..", ".", ""):
        with pytest.raises(FileRefused, match="not a file name of the checkpoint's directory"):
            open_regular(tmp_path / "sub", name)
    assert read_file(tmp_path / "sub", "f", max_size=10) == b"x" * 10
    with pytest.raises(FileRefused, match="10 bytes, more than the 9 it may have"):
        read_file(tmp_path / "sub", "f", max_size=9)
    fd = open_regular(tmp_path / "sub", "f", 10)
    try:  # a file that shrank after its size was checked: refused, never returned short
        assert read_exactly(fd, 4, 6, tmp_path / "f") == b"xxxx"
        with pytest.raises(FileRefused, match=r"f: ends before byte 12 \(it shrank while read\)"):
            read_exactly(fd, 6, 6, tmp_path / "f")
    finally:
        os.close(fd)


def test_a_vocabulary_padded_for_tp_is_saved_without_its_padding_rows():
    from moemesh.parallel.checkpoint_state import _real_rows

    local = torch.zeros(49, 3)  # 97 rows over tp=2: 49 each, the last rank's final row padding
    assert _real_rows(local, 0, 97, 0).shape[0] == 49
    assert _real_rows(local, 0, 97, 1).shape[0] == 48
    assert _real_rows(torch.zeros(25, 3), 0, 97, 3).shape[0] == 22  # tp=4: 25+25+25+22
    assert _real_rows(torch.zeros(2, 3), 0, 5, 3).shape[0] == 0  # tp=4: 2+2+1+0, the last rank all padding


def test_an_ep_shards_experts_are_keyed_by_their_global_ids():
    from moemesh.parallel.checkpoint_state import parameter_entries
    from moemesh.parallel.tags import EXPERT_SHARD

    model = torch.nn.Module()
    model.w1_eDF = torch.nn.Parameter(torch.arange(12.0).reshape(3, 2, 2))  # experts 4, 5, 6 of an EP rank
    setattr(model.w1_eDF, EXPERT_SHARD, 4)
    entries = parameter_entries(model)
    assert list(entries) == ["w1_eDF[4]", "w1_eDF[5]", "w1_eDF[6]"]
    assert all(torch.equal(entries[f"w1_eDF[{4 + j}]"], model.w1_eDF[j]) for j in range(3))


def test_a_checkpoint_holds_both_adamw_moments_and_only_persistent_buffers(tmp_path):
    from moemesh.parallel.checkpoint_state import parameter_entries, training_state

    ck = kit.checkpointer(tmp_path / "checkpoints")
    kit.take_a_step(ck)
    state = training_state(ck.model, ck.optimizer, torch.zeros((), dtype=torch.int64))
    params = parameter_entries(ck.model)  # experts one by one: key[i] -> optim.key.exp_avg[i]
    for moment in ("exp_avg", "exp_avg_sq"):
        keys = {
            k.replace(".exp_avg_sq", ".M").replace(".exp_avg", ".M")
            for k in state
            if k.endswith(moment) or f".{moment}[" in k
        }
        want = {f"optim.{k}.M" if "[" not in k else "optim.{}.M[{}".format(*k.split("[")) for k in params}
        assert keys == want, (moment, want ^ keys)
    persistent = {f"model.{k}" for k in ck.model.state_dict()}
    transient = {f"model.{k}" for k, _ in ck.model.named_buffers()} - persistent  # the rotary tables
    assert transient and not transient & set(state), transient & set(state)
