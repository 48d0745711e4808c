"""What an import refuses, each in one line before anything starts (exit 2): pickle weights,
code the checkpoint asks to run, an architecture moemesh cannot build or whose shape key is
missing, a tensor missing or of the wrong shape, an override of the checkpoint's architecture,
oversized or non-regular files. Nothing from the checkpoint directory is ever executed."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import config_error_line, refused_cli
from tests.interop._hf_models import save_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save_tiny("mixtral", tmp_path_factory.mktemp("hf") / "mixtral")


def _copy(good: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in good.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors[name]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _fp8_tensor(d: Path, name: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _pickled(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02 not unpickled")


def _huge_header(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))


def _fifo_config(d: Path) -> None:
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")


REMOTE = {"model_type": "evil_moe", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
# (how to break the good checkpoint, extra overrides, what the one line says)
CASES = {
    "pickle": (_pickled, [], "its weights are pickle files (pytorch_model.bin), which can run code when loaded"),
    "remote_code": (lambda d: _edit_config(d, **REMOTE), [], "asks for trust_remote_code: moemesh never runs code"),
    "unsupported": (
        lambda d: _edit_config(d, model_type="deepseek_v3"),
        [],
        "model_type='deepseek_v3' is not supported",
    ),
    "missing_key": (lambda d: _edit_config(d, num_experts_per_tok=None), [], "has no num_experts_per_tok, so moemesh"),
    "no_model_type": (lambda d: _edit_config(d, model_type=None), [], "has no model_type"),
    # A shape key is never taken from transformers' defaults (Mixtral's would be 14336).
    "missing_shape_key": (
        lambda d: _edit_config(d, intermediate_size=None),
        [],
        "(mixtral) has no intermediate_size, so moemesh cannot tell",
    ),
    "activation": (lambda d: _edit_config(d, hidden_act="gelu"), [], "hidden_act='gelu' is not supported"),
    "rope_scaling": (
        lambda d: _edit_config(d, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        [],
        "rope_parameters.rope_type='linear' is not supported",
    ),
    "window": (lambda d: _edit_config(d, sliding_window=8), [], "sliding_window=8 is not supported"),
    "shape": (
        lambda d: _edit_config(d, intermediate_size=40),
        [],
        "tensor model.layers.0.block_sparse_moe.experts.0.w1.weight is [48, 32] in model.safetensors, "
        "but config.json's shapes need [40, 32]",
    ),
    "missing_tensor": (
        lambda d: _drop_tensor(d, "model.layers.1.self_attn.k_proj.weight"),
        [],
        "the checkpoint has no tensor model.layers.1.self_attn.k_proj.weight (moemesh's layers.1.attn.wk.weight",
    ),
    "huge_config": (
        lambda d: (d / "config.json").write_text(" " * (2 << 20) + "{}"),
        [],
        "is 2,097,154 bytes, more than the 1,048,576 allowed",
    ),
    "huge_header": (_huge_header, [], "a safetensors header of 1,099,511,627,776 bytes"),
    "fp8": (
        lambda d: _fp8_tensor(d, "model.layers.0.self_attn.q_proj.weight"),
        [],
        "tensor 'model.layers.0.self_attn.q_proj.weight' is F8_E4M3, which moemesh does not read (valid: F64, F32",
    ),
    "wrong_type": (
        lambda d: _edit_config(d, hidden_size="abc"),
        [],
        "Validation error for field 'hidden_size': TypeError: Field 'hidden_size' expected int, got str (value: 'abc')",
    ),
    "sparse_step_0": (
        lambda d: _edit_config(
            d, model_type="qwen2_moe", num_experts=4, moe_intermediate_size=48, decoder_sparse_step=0
        ),
        [],
        "config.json's decoder_sparse_step=0 must be an integer >= 1",
    ),
    "bytes_after_tensors": (
        lambda d: (d / "model.safetensors").open("ab").write(b"\0" * 64),
        [],
        "model.safetensors: its tensors end at byte",
    ),
    # Shapes no checkpoint holds: refused at the first missing tensor, never a list of 3 * 10^8 keys.
    "many_experts": (
        lambda d: _edit_config(d, num_local_experts=10**8),
        [],
        "but config.json's shapes need [100000000, 32] for moemesh's layers.0.moe.router.weight_ED",
    ),
    "many_layers": (
        lambda d: _edit_config(d, num_hidden_layers=10**12),  # 10^12: a loop over the layers hung
        [],
        "config.json's num_hidden_layers=1000000000000 needs more tensors than the checkpoint's",
    ),
    # A field's check names the moemesh key, and where its value came from: the user never wrote it.
    "zero_layers": (
        lambda d: _edit_config(d, num_hidden_layers=0),
        [],
        "model.num_layers=0 must be a positive integer (read from ",  # the path, then:
    ),
    "top_k_over_experts": (
        lambda d: _edit_config(d, num_experts_per_tok=9),
        [],
        "config.json's num_experts_per_tok)",
    ),
    "fifo": (_fifo_config, [], "config.json is not a regular file"),
    "override": (lambda d: None, ["model.num_layers=3"], "model.num_layers=3: model.hf_path's config.json says 2"),
    "two_overrides": (
        lambda d: None,
        ["model.num_layers=3", "model.top_k=1"],
        "model.num_layers=3: model.hf_path's config.json says 2",
    ),
    "no_model_hf": (lambda d: None, ["model=tiny"], "architecture keys are not its config.json's (model."),
    "no_path": (lambda d: None, ["model.hf_path=???"], "model.hf_path: missing a value"),
    "dense_not_upcycled": (
        lambda d: _edit_config(d, model_type="llama"),
        [],
        "a dense llama model; set model.upcycle.num_experts",
    ),
    # model.upcycle's own rules before the checkpoint's: a granularity of 0 divided by zero while
    # resolving, and -1 experts read as "not upcycling"
    "upcycle_granularity_zero": (
        lambda d: _edit_config(d, model_type="llama"),
        ["model.upcycle.num_experts=4", "model.upcycle.granularity=0"],
        "model.upcycle.granularity=0 must be a positive integer",
    ),
    "upcycle_negative_experts": (
        lambda d: _edit_config(d, model_type="llama"),
        ["model.upcycle.num_experts=-1"],
        "model.upcycle.num_experts=-1 must be >= 0",
    ),
    "not_a_dir": (
        lambda d: None,
        ["model.hf_path=/nonexistent/ckpt"],
        "model.hf_path=/nonexistent/ckpt: not a directory",
    ),
    # An override's own mistake is the override's: no "(read from ...)".
    "own_mistake": (lambda d: None, ["model.max_seq_len=0"], "model.max_seq_len=0 must be a positive integer"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_checkpoint_is_one_line_exit_2_and_nothing_starts(case, good, tmp_path, monkeypatch, capsys):
    breaker, extra, needle = CASES[case]
    d = _copy(good, tmp_path / "ckpt")
    breaker(d)
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = refused_cli(
        ["model=hf", f"model.hf_path={d}", "trainer.seq_len=16", *extra], work, monkeypatch, capsys
    )
    line = config_error_line(code, err)
    assert needle in line and "resolving interpolation" not in line, line
    assert ("(read from " in line) == (case in ("zero_layers", "top_k_over_experts")), line
    assert list(work.iterdir()) == []


def test_code_in_the_checkpoint_directory_is_never_run(good, tmp_path):
    """A supported model_type whose config also names remote code, and a modeling file that would
    leave a mark if imported: the import reads transformers' own config class and the weights."""
    from moemesh.parallel.mesh import single_rank_mesh
    from tests.interop._hf_models import hf_run
    from tests.interop._layouts import check_layout

    d = _copy(good, tmp_path / "ckpt")
    mark = tmp_path / "ran"
    (d / "modeling_evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    (d / "configuration_evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    _edit_config(d, auto_map={"AutoConfig": "configuration_evil.C", "AutoModelForCausalLM": "modeling_evil.M"})
    check_layout(hf_run(d), 0, single_rank_mesh(), tmp_path / "run", hf_dir=good)
    assert not mark.exists()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_as_a_shell_sees_it(good, tmp_path):
    d = _copy(good, tmp_path / "ckpt")
    _pickled(d)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model=hf", f"model.hf_path={d}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "pickle files" in lines[0], proc.stderr


def test_a_selection_outside_its_tensor_selects_nothing():
    """``selected_shape`` is the bound every read relies on: an expert index, a range of rows or
    columns past the tensor's end, or a transpose of anything but a matrix selects nothing (None),
    so the check refuses the checkpoint instead of reading past a tensor."""
    from moemesh.interop.hf.names import Ref, selected_shape

    assert selected_shape(Ref("t", expert=3), (4, 6, 2)) == (6, 2)
    assert selected_shape(Ref("t", expert=4), (4, 6, 2)) is None
    assert selected_shape(Ref("t", rows=(2, 6)), (6, 2)) == (4, 2)
    assert selected_shape(Ref("t", rows=(4, 8)), (6, 2)) is None
    assert selected_shape(Ref("t", cols=(1, 2)), (6, 2)) == (6, 1)
    assert selected_shape(Ref("t", cols=(1, 3)), (6, 2)) is None
    assert selected_shape(Ref("t", transpose=True), (6, 2)) == (2, 6)
    assert selected_shape(Ref("t", transpose=True), (4, 6, 2)) is None
    # A fused gate_up_proj [E, 2F, D]: expert 1's up rows, as moemesh holds them ([D, F]).
    assert selected_shape(Ref("t", expert=1, rows=(3, 6), transpose=True), (2, 6, 5)) == (5, 3)


def test_a_sliding_window_as_long_as_the_context_is_full_attention(good, tmp_path):
    """A window of model.max_seq_len positions or more attends to the whole sequence: accepted; one
    position shorter is refused."""
    from moemesh.errors import ConfigError
    from tests.interop._hf_models import hf_run

    d = _copy(good, tmp_path / "ckpt")
    _edit_config(d, sliding_window=64)  # max_position_embeddings=64: model.max_seq_len
    assert hf_run(d).model.max_seq_len == 64
    with pytest.raises(ConfigError, match="sliding_window=64 is not supported"):
        hf_run(d, **{"model.max_seq_len": 65})


def _safetensors(path: Path, header: dict, data_bytes: int, *, length: int | None = None) -> Path:
    """A safetensors file written by hand: the header's length (``length``, or the real one), the
    header, then ``data_bytes`` zero bytes."""
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head) if length is None else length) + head + b"\0" * data_bytes)
    return path


def _entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HEADERS = {
    # (header, data bytes, header length written or None, what the one line says)
    "longer_than_the_file": ({"a": _entry([2], 0, 8)}, 8, 1000, "a safetensors header of 1,000 bytes (the file"),
    "gap": (
        {"a": _entry([1], 0, 4), "b": _entry([1], 8, 12)},
        12,
        None,
        "tensor 'b' starts at byte 8 of the data, not at 4",
    ),
    "overlap": ({"a": _entry([2], 0, 8), "b": _entry([2], 4, 12)}, 12, None, "tensor 'b' starts at byte 4"),
    "short_data": ({"a": _entry([4], 0, 8)}, 8, None, "tensor 'a' does not fit its bytes [0, 8]"),
    "past_the_end": ({"a": _entry([4], 0, 16)}, 8, None, "tensor 'a' does not fit its bytes [0, 16]"),
    "negative_dims": (
        {"a": _entry([-2, -2], 0, 16)},
        16,
        None,
        "tensor 'a' has no valid dtype, shape and data_offsets",
    ),
    "float_offsets": ({"a": _entry([2], 0.0, 8.0)}, 8, None, "tensor 'a' has no valid dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_a_damaged_safetensors_header_is_refused_before_any_read(case, tmp_path):
    """Each tensor of a header lies inside the file with the bytes its shape needs, and the tensors
    tile the data exactly: what safetensors' own loader would refuse later, in every rank."""
    from moemesh.errors import ConfigError
    from moemesh.interop.hf.files import read_header

    header, data_bytes, length, says = HEADERS[case]
    path = _safetensors(tmp_path / "model.safetensors", header, data_bytes, length=length)
    with pytest.raises(ConfigError) as err:
        read_header(path, "model.hf_path")
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_header_over_the_limit_is_refused_unread_even_in_a_file_that_holds_it(tmp_path):
    """The header's length is bounded on its own (64 MiB), not only by the file's size: a sparse
    file large enough to hold it is refused before the header is read."""
    from moemesh.errors import ConfigError
    from moemesh.interop.hf.files import MAX_HEADER_BYTES, read_header

    n = MAX_HEADER_BYTES + 1
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 8)
    with pytest.raises(ConfigError, match=f"a safetensors header of {n:,} bytes"):
        read_header(path, "model.hf_path")
    tensors, meta = read_header(_safetensors(path, {"a": _entry([2], 0, 8)}, 8), "model.hf_path")
    assert tensors == {"a": ("F32", (2,))} and meta == {}


@pytest.mark.parametrize(
    ("weight_map", "says"),
    [
        ({"a": "../outside.safetensors"}, "names a weight file '../outside.safetensors' outside the directory"),
        ({"a": "sub/model.safetensors"}, "names a weight file 'sub/model.safetensors' outside the directory"),
        ({"a": "pytorch_model.bin"}, "maps tensors to pytorch_model.bin: moemesh reads .safetensors files only"),
        ({"a": "one.safetensors", "b": "two.safetensors"}, "tensor a is in both one.safetensors and two.safetensors"),
    ],
)
def test_a_sharded_checkpoints_index_names_only_its_own_safetensors_files(tmp_path, weight_map, says):
    """The index is untrusted too: a weight file outside the directory, a pickle file, or a tensor
    that two files both hold (which copy is meant?) is refused in one line."""
    from moemesh.errors import ConfigError
    from moemesh.interop.hf.files import INDEX, tensor_index

    for name in ("outside.safetensors", "ckpt/one.safetensors", "ckpt/two.safetensors", "ckpt/sub/model.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _safetensors(tmp_path / name, {"a": _entry([2], 0, 8)}, 8)
    (tmp_path / "ckpt" / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError) as err:
        tensor_index(tmp_path / "ckpt")
    assert says in str(err.value), str(err.value)


def test_a_checkpoint_holding_a_nan_is_refused_by_the_rank_that_reads_it(good, tmp_path):
    """Values are checked as they are read: a NaN in any tensor is a CheckpointError naming it,
    never a model that starts training from it."""
    from safetensors.torch import load_file, save_file

    from moemesh.interop.hf.load import load_weights
    from moemesh.moe.model import Transformer
    from moemesh.parallel.checkpoint_trust import CheckpointError
    from tests.interop._hf_models import hf_run

    d = _copy(good, tmp_path / "ckpt")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = hf_run(d).model
    with pytest.raises(CheckpointError, match=r"non-finite values in model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_weights(Transformer(cfg), cfg, seed=0)


def test_a_vocabulary_with_fewer_rows_than_the_model_is_refused_at_load(good, tmp_path):
    """The embedding and the head may have fewer rows in moemesh only by its TP padding: a
    checkpoint whose vocabulary is shorter than the model's is refused by name, not loaded with
    the rows it lacks left at zero (train.py's preflight compares config.json's shapes first;
    this is the check of the rank that reads the file)."""
    import dataclasses

    from moemesh.interop.hf.load import load_weights
    from moemesh.moe.model import Transformer
    from moemesh.parallel.checkpoint_trust import CheckpointError
    from tests.interop._hf_models import hf_run

    cfg = hf_run(good).model
    load_weights(Transformer(cfg), cfg, seed=0)
    longer = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 8)
    with pytest.raises(CheckpointError, match=r"does not give moemesh's embed\.weight \[104, "):
        load_weights(Transformer(longer), longer, seed=0)
