"""A hostile checkpoint costs at most 1 MB and 1 s to refuse (issue #27, "Metadata").

Each hostile pickle (kit.HOSTILE_PICKLES) first does its damage under plain pickle, and
under torch's weights-only unpickler that moemesh used, at a small N: it allocates N bytes
or more (up to 17 N), or crashes the process. So a refusal here means something. Planted as a
checkpoint's ``.metadata`` or as one tensor entry of a shard, with meta.json's checksums
rewritten as an attacker who can write files would, at N = 10^9 (the tuples: 10^6 deep,
which crashes), it is refused in one line, within 1 s and 1 MB of Python allocations, and
resume falls back to the previous checkpoint. One process.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch

from moemesh.parallel import checkpoint
from tests.parallel import _checkpoint_kit as kit

BIG_N = {name: 10**9 for name in kit.HOSTILE_PICKLES} | {"dict key N tuples deep": 10**6}
NAMES = list(kit.HOSTILE_PICKLES)


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    kit.train_here(kit.run_config(), out)
    return out / "checkpoints"


def _damage(load, payload: bytes) -> int:
    """Peak bytes Python allocated while ``load`` read ``payload`` (it may raise after)."""
    tracemalloc.start()
    try:
        load(payload)
    except Exception:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _crashes(code: str, payload: bytes) -> bool:
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=60)
    return proc.returncode < 0  # killed by a signal (SIGSEGV: the C stack overflowed)


@pytest.mark.parametrize("name", NAMES)
def test_each_hostile_pickle_does_its_damage_under_plain_pickle(name):
    payload = kit.HOSTILE_PICKLES[name](kit.HOSTILE_SMALL_N[name])
    assert len(payload) < 100 or name == "dict key N tuples deep"
    if name == "dict key N tuples deep":
        assert _crashes("import pickle, sys; pickle.loads(sys.stdin.buffer.read())", payload)
    else:
        import pickle

        assert _damage(pickle.loads, payload) >= 10**6, f"{name} is not armed: the test would prove nothing"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.slow, pytest.mark.shares_cores])
        if n == "dict key N tuples deep"
        else n  # a subprocess imports torch
        for n in kit.TORCH_DAMAGED
    ],
)
def test_each_hostile_pickle_does_its_damage_under_torchs_weights_only_unpickler(name):
    from torch import _weights_only_unpickler as weights_only

    payload = kit.HOSTILE_PICKLES[name](kit.HOSTILE_SMALL_N[name])
    if name == "dict key N tuples deep":
        read = "w.load(io.BytesIO(sys.stdin.buffer.read()))"
        assert _crashes(f"import io, sys; from torch import _weights_only_unpickler as w; {read}", payload)
    else:
        assert _damage(lambda p: weights_only.load(io.BytesIO(p)), payload) >= 10**6


def _refusal_cost(fn) -> tuple[BaseException, int, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except checkpoint.CheckpointError as err:
        caught: BaseException = err
    else:
        caught = AssertionError("not refused")
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return caught, peak, elapsed


@pytest.mark.parametrize("name", NAMES)
def test_a_hostile_metadata_is_refused_within_1_mb_and_1_s(name, good_checkpoints, tmp_path):
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    kit.plant_metadata(ckpt, kit.HOSTILE_PICKLES[name](BIG_N[name]))
    c = kit.checkpointer(root)
    state = c._state()  # the load's own limits: the model's entries, the ranks that saved
    err, peak, elapsed = _refusal_cost(lambda: checkpoint.load(ckpt, state, check=c._check_meta, expected=c.expected()))
    line = str(err)
    assert isinstance(err, checkpoint.CheckpointError), line
    assert line.startswith(f"{ckpt / '.metadata'}: ") and "\n" not in line, line
    assert peak < 1_000_000 and elapsed < 1.0, (name, peak, elapsed)
    log = kit.Log()
    assert kit.checkpointer(root).resume(log) == 2
    (warning,) = log.warnings()
    assert f"cannot resume from step_000003: {ckpt / '.metadata'}: " in warning, warning


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dict key N tuples deep"])
def test_a_hostile_tensor_entry_is_refused_within_1_mb_and_1_s(name, good_checkpoints, tmp_path):
    """The same pickles as the data.pkl of one tensor entry: DCP read each with
    torch.load(weights_only=True), which does the damage (shown at a small N first)."""
    small = kit.tensor_entry_zip(kit.HOSTILE_PICKLES[name](kit.HOSTILE_SMALL_N[name]))
    if name in kit.TORCH_DAMAGED:
        assert _damage(lambda b: torch.load(io.BytesIO(b), weights_only=True, map_location="cpu"), small) >= 10**6
    blob = kit.tensor_entry_zip(kit.HOSTILE_PICKLES[name](BIG_N[name]))
    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    kit.plant_entry(ckpt, "model.norm.weight", blob)
    log = kit.Log()
    assert kit.checkpointer(root).resume(log) == 2
    (line,) = log.warnings()
    assert f"cannot resume from step_000003: {ckpt / 'evil.distcp'}: model.norm.weight: refused" in line, line
    # What refusing the entry costs: decoding it.
    from moemesh.parallel.checkpoint_trust import decode_tensor

    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="refused"):
        decode_tensor(blob, torch.float32, torch.Size([32]))
    elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000 and elapsed < 1.0, (name, peak, elapsed)


def test_the_admitted_globals_are_exactly_this_list():
    """Nothing else may appear in a checkpoint's pickles; a torch upgrade cannot widen this
    (torch's own allow-list is never used), and widening it here fails this test."""
    from moemesh.parallel import checkpoint_pickle

    md = "torch.distributed.checkpoint.metadata"
    dtypes = ["bfloat16", "bool", "float16", "float32", "float64", "int16", "int32", "int64", "int8", "uint8"]
    assert sorted(checkpoint_pickle.METADATA_GLOBALS) == sorted(
        [
            f"{md}.ChunkStorageMetadata",
            f"{md}.Metadata",
            f"{md}.MetadataIndex",
            f"{md}.StorageMeta",
            f"{md}.TensorProperties",
            f"{md}.TensorStorageMetadata",
            f"{md}._MEM_FORMAT_ENCODING",
            "torch.distributed.checkpoint.filesystem._StorageInfo",
            "torch.Size",
            "torch.serialization._get_layout",
            *[f"torch.{d}" for d in dtypes],
        ]
    )
    storages = ["BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short"]
    assert sorted(checkpoint_pickle.TENSOR_GLOBALS) == sorted(
        ["torch._utils._rebuild_tensor_v2", "collections.OrderedDict", *[f"torch.{s}Storage" for s in storages]]
    )
    # How each may be used: values are pushed, classes built empty, calls checked first.
    kinds = {k: type(v).__name__ for k, v in checkpoint_pickle.METADATA_GLOBALS.items()}
    assert sorted(k for k, v in kinds.items() if v == "Call") == sorted(
        [f"{md}._MEM_FORMAT_ENCODING", "torch.Size", "torch.serialization._get_layout"]
    )


@pytest.mark.parametrize(
    "name, args",
    [
        ("torch.Size", ([1] * 65,)),
        ("torch.Size", (bytearray(10),)),
        ("torch.Size", ([-1],)),
        ("torch.serialization._get_layout", ("torch.sparse_coo",)),
        ("torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", (7,)),
    ],
)
def test_an_admitted_call_refuses_arguments_it_does_not_expect(name, args):
    from moemesh.parallel import checkpoint_pickle

    with pytest.raises(checkpoint_pickle.Refused):
        checkpoint_pickle.METADATA_GLOBALS[name].check(args)  # type: ignore[union-attr]


def test_the_interpreter_reads_what_dcp_writes_as_plain_pickle_does(good_checkpoints):
    import pickle

    from moemesh.parallel import checkpoint_pickle

    raw = (good_checkpoints / "step_000003" / ".metadata").read_bytes()
    assert checkpoint_pickle.loads(raw, checkpoint_pickle.METADATA_GLOBALS, max_bytes=10**8) == pickle.loads(raw)


def _p(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


# Further probes of the interpreter itself: each must be refused at once, in one line.
MALFORMED = {
    "LONG4 of 2**31 - 1 bytes": _p(b"\x8b\xff\xff\xff\x7f"),
    "LONG1 of 255 bytes": _p(b"\x8a\xff" + b"\x01" * 255),
    "BINUNICODE of 2**32 - 1 bytes": _p(b"X\xff\xff\xff\xff"),
    "BINBYTES (protocol 3)": _p(b"B\x05\x00\x00\x00hello"),
    "SHORT_BINUNICODE (protocol 4)": _p(b"\x8c\x02os"),
    "STACK_GLOBAL (protocol 4)": _p(b"N N\x93"),
    "a memo read before it was written": _p(b"j\xff\xff\xff\x7f"),
    "MARKs 65 deep": _p(b"(" * 65 + b"N"),
    "4,097 objects on the stack": _p(b"N" * 4097),
    "APPEND to a tuple": _p(b")Na"),
    "a list as a dict key": _p(b"}]Ns"),
    "NEWOBJ with arguments": _p(b"ctorch.distributed.checkpoint.metadata\nStorageMeta\nN\x85\x81"),
    "BUILD of a field the class does not have": _p(
        b"ctorch.distributed.checkpoint.metadata\nStorageMeta\n)\x81}X\x08\x00\x00\x00__class_Nsb"
    ),
    "REDUCE of a class": _p(b"ctorch.distributed.checkpoint.metadata\nMetadata\n)R"),
    "a global name of 300 characters": _p(b"c" + b"a" * 300 + b"\nb\n"),
    "bytes after STOP": _p(b"N") + b"N.",
    "no STOP": b"\x80\x02N",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_pickle_is_refused_at_once(case):
    from moemesh.parallel import checkpoint_pickle

    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(checkpoint_pickle.Refused) as err:
        checkpoint_pickle.loads(MALFORMED[case], checkpoint_pickle.METADATA_GLOBALS, max_bytes=10**6)
    elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "\n" not in str(err.value) and peak < 1_000_000 and elapsed < 0.1, (str(err.value), peak, elapsed)


def test_what_a_pickle_builds_is_bounded_by_max_bytes():
    import pickle

    from moemesh.parallel import checkpoint_pickle

    raw = pickle.dumps({"a": list(range(1000))}, protocol=2)
    assert checkpoint_pickle.loads(raw, checkpoint_pickle.METADATA_GLOBALS, max_bytes=10**6) == pickle.loads(raw)
    with pytest.raises(checkpoint_pickle.Refused, match="builds more than 10,000 bytes of objects"):
        checkpoint_pickle.loads(raw, checkpoint_pickle.METADATA_GLOBALS, max_bytes=10_000)


def test_a_metadata_field_that_holds_itself_is_refused_without_recursing(good_checkpoints, tmp_path):
    import pickle

    root = kit.copy_checkpoints(good_checkpoints, tmp_path / "checkpoints")
    ckpt = root / "step_000003"
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    loop: list = []
    loop.append(loop)
    md.planner_data = {"model.norm.weight": loop}
    md.version = (((((),),),),)
    kit.plant_metadata(ckpt, pickle.dumps(md, protocol=2))
    with pytest.raises(checkpoint.CheckpointError, match="refused: planner data that is not a dict of name paths"):
        checkpoint.read_metadata(ckpt)
