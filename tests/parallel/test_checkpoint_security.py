"""Loading a checkpoint never runs code from it (finding 1 of "Checkpoints you can trust").

Each hostile ``.metadata`` below runs ``touch <marker>`` under plain ``pickle.loads``
(checked first, so a refusal here means something). Planted in the newest checkpoint, with
meta.json's checksums rewritten as an attacker who can write files would, it must be
refused in one warning line naming the file and the reason, leave no marker, and resume
from the previous, good checkpoint. One process, except the last two tests (4 ranks).
"""

from __future__ import annotations

import builtins
import os
import pickle
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

from moemesh.parallel import checkpoint
from tests.parallel import _checkpoint_kit as kit

FS = "torch.distributed.checkpoint.filesystem"  # a module the old allow-list admitted by prefix
MD = "torch.distributed.checkpoint.metadata"  # DCP's metadata classes: registered as safe


# --- a tiny pickle assembler: expressions rendered in any protocol -----------------


def g(module, name):
    return ("global", module, name)


def s(text):
    return ("str", text)


def call(fn, *args):
    return ("call", fn, args)


def lst(*items):
    return ("list", items)


def attr(obj, name):
    return call(g("builtins", "getattr"), obj, s(name))


def _render(expr, proto: int) -> bytes:
    kind = expr[0]
    if kind == "str":
        if proto == 0:
            return b"V" + expr[1].encode("raw_unicode_escape") + b"\n"
        data = expr[1].encode()
        return b"X" + struct.pack("<I", len(data)) + data
    if kind == "global":
        if proto >= 4:  # STACK_GLOBAL, where a dotted name is looked up attribute by attribute
            return _render(s(expr[1]), proto) + _render(s(expr[2]), proto) + b"\x93"
        return b"c" + expr[1].encode() + b"\n" + expr[2].encode() + b"\n"
    if kind == "list":
        return b"(" + b"".join(_render(e, proto) for e in expr[1]) + b"l"
    fn, args = expr[1], expr[2]  # call: MARK args TUPLE REDUCE
    return _render(fn, proto) + b"(" + b"".join(_render(a, proto) for a in args) + b"tR"


def render(expr, proto: int) -> bytes:
    return (b"\x80" + bytes([proto]) if proto >= 2 else b"") + _render(expr, proto) + b"."


class _Call:
    """For payloads made by Python's own pickler: unpickles as ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(cmd: str, marker: str) -> dict:
    os_via_globals = call(attr(attr(g(FS, "_generate_uuid"), "__globals__"), "get"), s("os"))
    return {
        # the three bypasses of the old allow-list
        "getattr_globals": lambda p: render(call(attr(os_via_globals, "system"), s(cmd)), p),
        "module_attribute": lambda p: render(call(attr(g(FS, "os"), "system"), s(cmd)), p),
        "dotted_name": lambda p: render(call(g(FS, "os.system"), s(cmd)), p),
        # classic gadgets
        "reduce_os_system": lambda p: pickle.dumps(_Call(os.system, cmd), protocol=p),
        "reduce_builtins_exec": lambda p: pickle.dumps(
            _Call(builtins.exec, f"import os; os.system({cmd!r})"), protocol=p
        ),
        "copyreg_reconstructor": lambda p: render(
            call(
                g("copyreg", "_reconstructor"),
                g("subprocess", "Popen"),
                g("subprocess", "Popen"),
                lst(s("touch"), s(marker)),
            ),
            p,
        ),
        # from a class that IS registered as safe: Metadata.__init__.__globals__["os"].system
        "nested_getattr": lambda p: render(
            call(
                attr(call(attr(attr(attr(g(MD, "Metadata"), "__init__"), "__globals__"), "get"), s("os")), "system"),
                s(cmd),
            ),
            p,
        ),
        "functools_partial": lambda p: render(call(call(g("functools", "partial"), g("os", "system"), s(cmd))), p),
        "operator_attrgetter": lambda p: render(
            call(call(call(g("operator", "attrgetter"), s("system")), g(FS, "os")), s(cmd)), p
        ),
        "operator_methodcaller": lambda p: render(
            call(call(g("operator", "methodcaller"), s("system"), s(cmd)), g(FS, "os")), p
        ),
    }


CASES = [
    (name, proto) for name in _payloads("", "") for proto in range(6) if not (name == "dotted_name" and proto < 4)
]  # dotted names resolve from protocol 4 on


def _payload(name: str, proto: int, marker: Path) -> bytes:
    return _payloads(f"touch {marker}", str(marker))[name](proto)


def _wait_for(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    """step_000001 .. step_000003 of a tiny run, made once."""
    out = tmp_path_factory.mktemp("good")
    kit.train_here(kit.run_config(), out)
    return out / "checkpoints"


@pytest.mark.parametrize("name,proto", CASES)
def test_each_payload_is_armed_under_plain_pickle(name, proto, tmp_path):
    marker = tmp_path / "pwned"
    try:
        result = pickle.loads(_payload(name, proto, marker))
    except Exception as err:  # the gadget ran; what it returned may not unpickle further
        result = err
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert _wait_for(marker), f"{name} (protocol {proto}) does not run its command: the test would prove nothing"


@pytest.fixture(scope="module")
def late_markers():
    """Markers a payload would touch from a process it started (Popen returns before the command
    runs): one wait for all of them at the end of the module, not one per case."""
    markers: list[tuple[str, Path]] = []
    yield markers
    time.sleep(0.3)
    ran = [what for what, marker in markers if marker.exists()]
    assert not ran, f"payloads ran code after their refusal: {ran}"


@pytest.mark.parametrize("name,proto", CASES)
def test_a_hostile_metadata_is_refused_and_the_previous_checkpoint_loads(
    name, proto, good_checkpoints, late_markers, tmp_path
):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    marker = tmp_path / "pwned"
    kit.plant_metadata(root / "step_000003", _payload(name, proto, marker))
    log = kit.Log()
    step = kit.checkpointer(root).resume(log)
    assert not marker.exists(), f"{name} (protocol {proto}) ran code"
    late_markers.append((f"{name} (protocol {proto})", marker))
    assert step == 2
    (line,) = log.warnings()
    assert f"{root / 'step_000003' / '.metadata'}: refused" in line, line
    assert "\n" not in line and "CheckpointException" not in line
    assert any(l.startswith(f"moemesh: resumed from {root / 'step_000002'}") for l in log.lines)


def test_the_old_unpicklers_three_bypasses_name_what_was_refused(tmp_path):
    marker = tmp_path / "pwned"
    for name, payload, why in [
        ("getattr_globals", _payload("getattr_globals", 2, marker), "GLOBAL builtins.getattr is not admitted"),
        ("module_attribute", render(g(FS, "os"), 2), f"GLOBAL {FS}.os is not admitted"),
        ("dotted_name", _payload("dotted_name", 4, marker), "pickle protocol 4; moemesh writes and reads protocol 2"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(payload)
        with pytest.raises(checkpoint.CheckpointError, match=f"refused, not plain DCP metadata: .*{why}"):
            checkpoint.read_metadata(tmp_path / name)
    assert not marker.exists()


def test_a_pickled_object_entry_is_refused_not_torch_loaded(good_checkpoints, tmp_path):
    """DCP reads an entry its metadata calls bytes with torch.load(weights_only=False): a second
    way to run code from a checkpoint whose metadata is otherwise well-formed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt, marker = root / "step_000003", tmp_path / "pwned"
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    md.state_dict_metadata["trainer.step"] = BytesStorageMetadata()
    md.storage_data = {i: v for i, v in md.storage_data.items() if i.fqn != "trainer.step"}
    blob = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    (ckpt / "evil.distcp").write_bytes(blob)
    md.storage_data[MetadataIndex("trainer.step")] = _StorageInfo("evil.distcp", 0, len(blob))
    kit.plant_metadata(ckpt, pickle.dumps(md, protocol=2))
    log = kit.Log()
    assert kit.checkpointer(root).resume(log) == 2
    assert not _wait_for(marker, 0.2)
    (line,) = log.warnings()
    assert ".metadata: refused" in line and "BytesStorageMetadata" in line, line


def test_an_entry_stored_outside_the_checkpoint_is_refused(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    index = next(iter(md.storage_data))
    md.storage_data[index].relative_path = "../step_000001/__0_0.distcp"
    kit.plant_metadata(ckpt, pickle.dumps(md, protocol=2))
    log = kit.Log()
    assert kit.checkpointer(root).resume(log) == 2
    (line,) = log.warnings()
    assert "outside the checkpoint's directory" in line, line


def test_a_metadata_changed_behind_the_manifests_back_is_refused_by_its_checksum(good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    marker = tmp_path / "pwned"
    (root / "step_000003" / ".metadata").write_bytes(_payload("reduce_os_system", 4, marker))
    log = kit.Log()
    assert kit.checkpointer(root).resume(log) == 2
    (line,) = log.warnings()
    assert f"{root / 'step_000003' / '.metadata'}:" in line and "when saved" in line, line
    assert not marker.exists()


def test_metadata_is_written_in_the_protocol_the_weights_only_unpickler_reads(good_checkpoints):
    raw = (good_checkpoints / "step_000003" / ".metadata").read_bytes()
    assert raw[:2] == b"\x80\x02"
    assert b"pathlib" not in raw  # the save directory's path is not kept
    md = checkpoint.read_metadata(good_checkpoints / "step_000003")
    assert "trainer.step" in md.state_dict_metadata


# --- the finding as reported: ep2_dp2, 4 ranks, resume=auto ------------------------


def _resume_on_four_ranks(rank, world, out, marker):
    from moemesh.launch import RankContext
    from moemesh.parallel.dims import ParallelDims
    from moemesh.parallel.mesh import build_mesh
    from moemesh.trainer.data import prepare_data
    from moemesh.trainer.loop import train

    run = kit.run_config(
        **{
            "parallel.name": "ep2_dp2",
            "parallel.data_parallel_size": 2,
            "parallel.expert_parallel_size": 2,
            "trainer.steps": 4,
            "resume": "auto",
        }
    )
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    ctx = RankContext(
        rank=rank,
        local_rank=rank,
        device=torch.device("cpu"),
        mesh=build_mesh(ParallelDims(dp=2, ep=2), "cpu"),
        output_dir=out,
        data_paths=paths,
    )
    summary = train(run, ctx)
    assert not Path(marker).exists(), f"rank {rank} ran the payload"
    assert summary["start_step"] == 1, summary["start_step"]


@pytest.mark.slow
def test_on_four_ranks_hostile_corrupt_and_poisoned_checkpoints_are_skipped_with_their_causes(tmp_path):
    from tests.dist_utils import run_on_ranks

    out = tmp_path / "run"
    run_on_ranks(_make_four_rank_checkpoints, 4, str(out))
    root, marker = out / "checkpoints", tmp_path / "pwned"
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == [f"step_00000{i}" for i in (1, 2, 3, 4)]
    kit.plant_metadata(root / "step_000004", _payload("getattr_globals", 2, marker))
    key = kit.largest_float_key(root / "step_000003")
    flipped = kit.flip_bytes(root / "step_000003", key)
    poisoned = kit.poison(root / "step_000002", key)
    kit.reseal(root / "step_000002")  # NaN saved as if it were good (the code before this change did)
    (out / "train.log").unlink()
    run_on_ranks(_resume_on_four_ranks, 4, str(out), str(marker))
    assert not marker.exists()
    warnings = [l for l in (out / "train.log").read_text().splitlines() if "warning" in l]
    assert len(warnings) == 3, warnings
    assert f"{root / 'step_000004' / '.metadata'}: refused" in warnings[0]
    assert f"{flipped}: sha256" in warnings[1] and "changed since it was saved" in warnings[1]
    assert f"{poisoned}: non-finite values in {key}" in warnings[2]
    assert not any("CheckpointException" in w for w in warnings)


def _make_four_rank_checkpoints(rank, world, out):
    from moemesh.launch import RankContext
    from moemesh.parallel.dims import ParallelDims
    from moemesh.parallel.mesh import build_mesh
    from moemesh.trainer.data import prepare_data
    from moemesh.trainer.loop import train

    run = kit.run_config(
        **{
            "parallel.name": "ep2_dp2",
            "parallel.data_parallel_size": 2,
            "parallel.expert_parallel_size": 2,
            "trainer.steps": 4,
        }
    )
    paths = prepare_data(run.data, seq_len=run.trainer.seq_len, vocab_size=run.model.vocab_size)
    Path(out).mkdir(exist_ok=True)
    train(
        run,
        RankContext(
            rank=rank,
            local_rank=rank,
            device=torch.device("cpu"),
            mesh=build_mesh(ParallelDims(dp=2, ep=2), "cpu"),
            output_dir=out,
            data_paths=paths,
        ),
    )


# --- issue #27 on four ranks: a fresh run refused, hostile files refused at once -------------


@pytest.mark.slow
def test_on_four_ranks_a_fresh_run_is_refused_and_hostile_files_cost_nothing(tmp_path):
    """ep2_dp2, as the probe ran it: a fresh run into the directory deleted its own saves; a
    40-byte bytearray(bytearray(10^9)) .metadata made every rank allocate 2 GB; a FIFO or a
    symlink to /dev/zero as a shard hung the resume for ever."""
    from tests.dist_utils import run_on_ranks

    out = tmp_path / "run"
    run_on_ranks(_make_four_rank_checkpoints, 4, str(out))
    root, marker = out / "checkpoints", tmp_path / "pwned"
    names = [f"step_00000{i}" for i in (1, 2, 3, 4)]
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == names
    with pytest.raises(Exception) as err:  # a fresh run into it: every rank stops before step 1
        run_on_ranks(_make_four_rank_checkpoints, 4, str(out))
    assert "already holds 4 checkpoint(s) of an earlier run (the newest: step_000004)" in str(err.value)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == names
    kit.plant_metadata(root / "step_000004", kit.HOSTILE_PICKLES["bytearray(bytearray(N))"](10**9))
    fifo = sorted((root / "step_000003").glob("*.distcp"))[1]
    fifo.unlink()
    os.mkfifo(fifo)
    zero = sorted((root / "step_000002").glob("*.distcp"))[2]
    zero.unlink()
    zero.symlink_to("/dev/zero")
    (out / "train.log").unlink()
    run_on_ranks(_resume_on_four_ranks, 4, str(out), str(marker))  # falls back to step 1
    warnings = [l for l in (out / "train.log").read_text().splitlines() if "warning" in l]
    assert len(warnings) == 3, warnings
    assert f"{root / 'step_000004' / '.metadata'}: refused, not plain DCP metadata" in warnings[0]
    assert f"{fifo}: a FIFO, not a regular file" in warnings[1], warnings[1]
    assert f"{zero}: a symbolic link, not a file of the checkpoint" in warnings[2], warnings[2]


def _widen_a_chunk(md, ckpt):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    entry = md.state_dict_metadata["model.norm.weight"]
    (c,) = entry.chunks
    entry.chunks = [ChunkStorageMetadata(offsets=c.offsets, sizes=torch.Size([n + 1 for n in c.sizes]))]


def _past_the_end(md, ckpt):
    info = next(v for i, v in md.storage_data.items() if i.fqn == "model.norm.weight")
    info.offset = (ckpt / info.relative_path).stat().st_size - 1  # starts inside the file, ends past it


def _retype(md, ckpt):
    md.state_dict_metadata["model.norm.weight"].properties.dtype = torch.float64


@pytest.mark.parametrize(
    "edit, reason",
    [
        (_widen_a_chunk, "'model.norm.weight' has a chunk outside its tensor"),
        (_past_the_end, "'model.norm.weight' is stored past the end of"),
        (_retype, "refused: model.norm.weight is torch.float64 ["),
    ],
)
def test_a_metadata_that_disagrees_with_its_tensors_or_files_is_refused_before_a_shard_is_read(
    edit, reason, good_checkpoints, tmp_path
):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    edit(md, ckpt)
    kit.plant_metadata(ckpt, pickle.dumps(md, protocol=2))
    log = kit.Log()
    assert kit.checkpointer(root).resume(log) == 2
    (line,) = log.warnings()
    assert f"{ckpt / '.metadata'}: " in line and reason in line, line


def test_a_metadata_one_byte_over_the_models_limit_is_refused_unread(good_checkpoints, tmp_path):
    """meta.json's size for .metadata is checked against the model's limit before a byte is read."""
    import json
    import re

    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    meta_json = root / "step_000003" / "meta.json"

    def refusal(size: int) -> str:
        meta = json.loads(meta_json.read_text())
        meta["files"][".metadata"]["bytes"] = size
        meta_json.write_text(json.dumps(meta))
        log = kit.Log()
        assert kit.checkpointer(root).resume(log) == 2
        (line,) = log.warnings()
        assert f"{root / 'step_000003' / '.metadata'}: {size:,} bytes, more than the " in line, line
        assert "that the metadata of" in line, line
        return line

    limit = int(re.search(r"more than the ([\d,]+) that", refusal(10**9))[1].replace(",", ""))
    refusal(limit + 1)
