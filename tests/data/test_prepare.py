"""scripts/prepare_data.py: a corpus in any of the formats becomes shards a run reads; bad
inputs are one line and exit 2; a killed prepare continues to the same bytes."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moemesh.data import DataConfig, TokenData, check_data, prepare_data
from moemesh.data.format import META_NAME, read_meta
from moemesh.errors import ConfigError
from scripts.prepare_data import main as prepare_main
from tests.data._corpus import documents, write_corpus, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _tokenizer(bpe_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _prepare(capsys, *args) -> tuple[int, list[str]]:
    rc = prepare_main([*map(str, args), "--no-progress"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    return rc, err


def _saved_dataset(d: Path, texts: list[str]) -> Path:
    """The layout datasets.save_to_disk writes: Arrow stream files listed in state.json."""
    d.mkdir()
    table = pa.table({"text": texts, "n": list(range(len(texts)))})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=7):
            w.write_batch(batch)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (d / "dataset_info.json").write_text("{}")
    return d


def _tiny_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json made in a blink (for the checks that never tokenise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


@pytest.mark.slow  # end to end: worker processes, a 70,000-id BPE
@pytest.mark.shares_cores
def test_every_format_becomes_uint32_shards_that_decode_to_the_documents(tmp_path, capsys, bpe_dir):
    docs = documents(120)
    jl = write_jsonl(tmp_path / "a.jsonl", docs[:60])
    pq.write_table(pa.table({"text": docs[60:90]}), tmp_path / "b.parquet", row_group_size=8)
    ds = _saved_dataset(tmp_path / "saved", docs[90:115])
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(docs[115:]):
        (txt / f"{i:02d}.txt").write_text(d)
    out = tmp_path / "out"
    rc, err = _prepare(
        capsys,
        "--tokenizer",
        bpe_dir,
        "--input",
        jl,
        tmp_path / "b.parquet",
        ds,
        txt,
        "--out",
        out,
        "--shard-mb",
        "0.004",
        "--workers",
        "2",
    )
    assert rc == 0, err
    meta = read_meta(out)
    raw = json.loads((out / META_NAME).read_text())
    assert meta.dtype == "uint32" and meta.vocab_size == 70000 and meta.n_docs == 120 and len(meta.shards) > 4
    assert raw["sources"][0]["sha256"] == hashlib.sha256(jl.read_bytes()).hexdigest()
    assert [s["documents"] for s in raw["sources"]] == [60, 30, 25, 1, 1, 1, 1, 1]
    assert raw["tokenizer"]["sha256"] == hashlib.sha256(_tokenizer(bpe_dir).to_str().encode()).hexdigest()
    # Every document in order, its ids followed by EOS, where the document index says.
    tok, eos = _tokenizer(bpe_dir), meta.eos_id
    tokens = np.concatenate([np.fromfile(out / s.tokens_file, dtype="<u4") for s in meta.shards]).astype(np.int64)
    want = np.concatenate([np.array([*tok.encode(d, add_special_tokens=False).ids, eos]) for d in docs])
    assert np.array_equal(tokens, want) and tokens.max() > 65535
    starts = np.concatenate(
        [
            np.fromfile(out / s.index_file, dtype="<u8")[:-1] + sum(x.n_tokens for x in meta.shards[:i])
            for i, s in enumerate(meta.shards)
        ]
    )
    assert np.array_equal(starts, np.concatenate([[0], np.cumsum([len(tok.encode(d).ids) + 1 for d in docs])[:-1]]))
    # A run reads it: the vocab must fit, ids above 65,535 come back as written.
    cfg = DataConfig(name="t", kind="tokens", path=str(out), val_fraction=0.05)
    with pytest.raises(ConfigError, match=r"with 70,000 token ids, more than model.vocab_size=50,000 .* >= 70000$"):
        check_data(cfg, seq_len=32, vocab_size=50000)
    data = TokenData(prepare_data(cfg, seq_len=32, vocab_size=70000), seed=0)
    x, _ = data.batch("train", 0, global_batch=64, seq_len=32, start=0, count=64)
    assert x.max() > 65535 and set(x.flatten().tolist()) <= set(tokens.tolist())
    # The same command again: nothing to do; another tokenizer into the same directory: refused.
    rc, err = _prepare(
        capsys,
        "--tokenizer",
        bpe_dir,
        "--input",
        jl,
        tmp_path / "b.parquet",
        ds,
        txt,
        "--out",
        out,
        "--shard-mb",
        "0.004",
    )
    assert rc == 0 and "already prepared" in err[-1]


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")
    good = write_jsonl(tmp_path / "good.jsonl", ["hello hello"] * 3)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nokey.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nokey.parquet")
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "afile").write_text("")
    cases = [
        (["--input", tmp_path / "cut.parquet"], "cut.parquet: not a readable parquet file ("),
        (["--input", good, "--shard-mb", "inf"], "--shard-mb=inf must be a number of MiB > 0"),
        (["--input", tmp_path / "nokey.jsonl"], "--text-key=text: missing in"),
        (["--input", tmp_path / "nokey.parquet"], "--text-key=text: no such column in"),
        (["--input", tmp_path / "empty.jsonl"], "empty.jsonl: empty file (no documents)"),
        (["--input", tmp_path / "nope.jsonl"], "no such file or directory"),
        (["--input", tmp_path / "notes.csv"], "unknown format .csv"),
        (["--input", good, "--workers", "0"], "--workers=0 must be 1 to "),
        (["--input", good, "--eos-token", "<nope>"], "--eos-token=<nope> is not a special token"),
    ]
    for args, message in cases:
        rc, err = _prepare(capsys, "--tokenizer", tok, *args, "--out", tmp_path / "o")
        assert rc == 2 and len(err) == 1 and message in err[0], (args, err)
        assert err[0].startswith("prepare_data: error: ")
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", good, "--out", tmp_path / "afile")
    assert rc == 2 and len(err) == 1 and "afile is a file, not a directory" in err[0], err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", good, "--out", tmp_path / "o")
    assert rc == 2 and "holds files that are not a prepared corpus" in err[0]


def test_a_corrupt_shard_is_one_line_before_any_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    out = write_corpus(tmp_path / "out", [[30] * 20, [30] * 20], vocab_size=70000)
    cfg = DataConfig(name="t", kind="tokens", path=str(out), val_fraction=0.1)
    prepare_data(cfg, seq_len=16, vocab_size=70000)  # verified: remembered by file identity
    shard = out / "shard_000001.tok"
    b = bytearray(shard.read_bytes())
    b[5] ^= 1  # one flipped bit, same size: only the sha256 finds it
    shard.write_bytes(bytes(b))
    check_data(cfg, seq_len=16, vocab_size=70000)  # sizes only: passes
    with pytest.raises(ConfigError, match=r"shard shard_000001.tok has sha256 \w+\.\.\., its metadata says"):
        prepare_data(cfg, seq_len=16, vocab_size=70000)
    shard.write_bytes(bytes(b[:-4]))  # truncated: every check finds it
    with pytest.raises(ConfigError, match=r"shard_000001.tok is [\d,]+ bytes, its metadata says [\d,]+: corrupt"):
        check_data(cfg, seq_len=16, vocab_size=70000)
    (out / META_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        check_data(cfg, seq_len=16, vocab_size=70000)
    (out / META_NAME).unlink()
    os.mkfifo(out / META_NAME)  # a FIFO would block a read forever: refused unread
    with pytest.raises(ConfigError, match="is not a regular file"):
        check_data(cfg, seq_len=16, vocab_size=70000)


def _reseal_index(out: Path, offsets: list[int]) -> None:
    """Rewrite shard 1's document index and its sha256 in the metadata, as whoever writes the
    directory can: the hash then agrees, so only the offsets themselves can be checked."""
    idx = out / "shard_000001.idx"
    raw = np.asarray(offsets, dtype=np.uint64).tobytes()
    assert len(raw) == idx.stat().st_size
    idx.write_bytes(raw)
    meta = json.loads((out / META_NAME).read_text())
    (entry,) = [s for s in meta["shards"] if s["index_file"] == idx.name]
    entry["index_sha256"] = hashlib.sha256(raw).hexdigest()
    (out / META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "offsets, message",
    [
        ([0, 30, 20, 40], r"shard_000001.idx: document 2 starts at 20, before document 1 \(30\): the offsets must"),
        ([0, 20, 40, 50], r"shard_000001.idx starts at offset 0 and ends at 50, not 0 and its 40 tokens"),
        ([5, 20, 30, 40], r"shard_000001.idx starts at offset 5 and ends at 40, not 0 and its 40 tokens"),
    ],
)
def test_a_document_index_out_of_order_is_refused_though_its_hash_agrees(tmp_path, monkeypatch, offsets, message):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    out = write_corpus(tmp_path / "out", [[10, 10], [20, 10, 10]], vocab_size=70000)
    meta = json.loads((out / META_NAME).read_text())
    assert [(s["documents"], s["tokens"]) for s in meta["shards"] if s["index_file"] == "shard_000001.idx"] == [(3, 40)]
    _reseal_index(out, offsets)
    cfg = DataConfig(name="t", kind="tokens", path=str(out), val_fraction=0.1)
    with pytest.raises(ConfigError, match=message):
        prepare_data(cfg, seq_len=16, vocab_size=70000)


def _markers(out: Path) -> int:
    return len(list((out / ".prepare").glob("piece_*.json"))) if (out / ".prepare").is_dir() else 0


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_killed_prepare_continues_to_the_same_bytes(tmp_path, bpe_dir):
    docs = documents(6000, seed=3)
    inputs = [write_jsonl(tmp_path / f"{i}.jsonl", docs[i * 2000 : (i + 1) * 2000]) for i in range(3)]
    args = ["--tokenizer", str(bpe_dir), "--input", *map(str, inputs), "--shard-mb", "0.02", "--no-progress"]
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _markers(tmp_path / "killed") < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: give it more input"
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its workers, mid-way
    proc.wait()
    made = _markers(tmp_path / "killed")
    assert 3 <= made and not (tmp_path / "killed" / META_NAME).exists()
    again = subprocess.run([*cmd, "--out", str(tmp_path / "killed")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    got, want = _shards(tmp_path / "killed"), _shards(tmp_path / "whole")
    assert len(want) > 2 * made and got.keys() == want.keys() and got == want  # metadata included
    assert not (tmp_path / "killed" / ".prepare").exists()


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_worker_that_dies_is_one_line_not_a_hang(tmp_path, bpe_dir):
    """The OOM killer (or a native reader's crash) ends one worker: a multiprocessing.Pool waited
    on its task forever. The prepare now stops in one line, exit 2, and the rerun continues."""
    docs = documents(6000, seed=3)
    inputs = [write_jsonl(tmp_path / f"{i}.jsonl", docs[i * 2000 : (i + 1) * 2000]) for i in range(3)]
    args = ["--tokenizer", str(bpe_dir), "--input", *map(str, inputs), "--shard-mb", "0.02", "--no-progress"]
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args, "--workers", "2"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "o")], start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _markers(tmp_path / "o") < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "finished before a worker could be killed: give it more input"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert workers, children
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [l for l in err.decode().splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "a prepare worker died" in lines[0], lines
    again = subprocess.run([*cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
@pytest.mark.shares_cores
def test_a_hub_name_offline_is_one_line_naming_it(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", documents(5))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "prepare_data.py"),
            "--tokenizer",
            "someorg/no-such-tokenizer",
            "--input",
            str(good),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("prepare_data: error: --tokenizer=someorg/no-such-tokenizer: not a local directory")


@pytest.mark.slow  # a worker process finds it
@pytest.mark.shares_cores
def test_a_missing_key_deep_in_a_file_is_one_line_from_the_worker(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")
    lines = [json.dumps({"text": "hello"})] * 50 + [json.dumps({"txt": "hello"})]
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", tmp_path / "late.jsonl", "--out", tmp_path / "o")
    assert rc == 2 and len(err) == 1 and "--text-key=text: missing in" in err[0] and "its keys: ['txt']" in err[0], err
    assert not (tmp_path / "o" / META_NAME).exists()


def test_a_null_text_is_an_empty_document_in_jsonl_as_in_parquet_and_a_number_is_refused(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "hello"}\n{"text": null}\n{"text": "hello hello"}\n')
    pq.write_table(pa.table({"text": ["hello", None, "hello"]}), tmp_path / "in" / "b.parquet")
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and err == [], err
    meta = json.loads((tmp_path / "o" / META_NAME).read_text())
    assert [(s["documents"], s["tokens"]) for s in meta["sources"]] == [(2, 5), (2, 4)]  # EOS included
    (tmp_path / "n.jsonl").write_text('{"text": "hello"}\n{"text": 7}\n')
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    for name, says in (("n.jsonl", "n.jsonl at byte 18 holds a int, not text"), ("n.parquet", "holds int values")):
        rc, err = _prepare(capsys, "--tokenizer", tok, "--input", tmp_path / name, "--out", tmp_path / f"o-{name}")
        assert rc == 2 and len(err) == 1 and says in err[0], (name, err)


def test_a_documents_text_stays_text_and_the_files_follow_the_umask(tmp_path, capsys):
    """A special token's text inside a document is not the special id (only the separator
    between documents is EOS); a lone surrogate in a JSON string is U+FFFD, not a crash; the
    shards are as readable as the umask makes files (mkstemp alone would leave them 0600)."""
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")  # <|endoftext|> 0, [UNK] 1, hello 2
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"text": "hello <|endoftext|> hello"}) + "\n" + '{"text": "hello \\ud800 hello"}\n'
    )
    old = os.umask(0o022)
    try:
        rc, err = _prepare(capsys, "--tokenizer", tok, "--input", tmp_path / "in.jsonl", "--out", tmp_path / "o")
    finally:
        os.umask(old)
    assert rc == 0, err
    ids = np.fromfile(tmp_path / "o" / "shard_000000.tok", dtype=np.uint16).tolist()
    assert ids == [2, 1, 1, 1, 2, 0, 2, 1, 2, 0]  # "<|", "endoftext", "|>" and U+FFFD: unknown words
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir() if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_a_vocabulary_with_gaps_is_sized_by_its_largest_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moemesh.data.tokenizer import load_tokenizer

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "b": 70000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).vocab_size == 70001


def test_a_directory_input_leaves_out_a_datasets_card_and_hidden_files(tmp_path):
    from moemesh.data.inputs import find_inputs

    d = tmp_path / "download"
    (d / "data").mkdir(parents=True)
    (d / ".cache").mkdir()
    for f in ("README.md", "dataset_infos.json", "LICENSE.txt", ".cache/x.jsonl", "data/.part.jsonl"):
        (d / f).write_text("{}\n")
    write_jsonl(d / "data" / "train-0.jsonl", ["hello"])
    write_jsonl(d / "data" / "train-1.jsonl", ["hello"])
    (d / "data" / "README.md").write_text("a document of a corpus of repositories")  # below the top: data
    assert [i.given for i in find_inputs([str(d)])] == [
        f"{d}/data/README.md",
        f"{d}/data/train-0.jsonl",
        f"{d}/data/train-1.jsonl",
    ]


def test_a_tokenizer_beside_its_models_weights_is_read_without_them(tmp_path):
    from moemesh.data.tokenizer import load_tokenizer

    d = tmp_path / "model"
    d.mkdir()
    _tiny_tokenizer(d / "tokenizer.json")
    bare = load_tokenizer(str(d / "tokenizer.json"))
    (d / "model.safetensors").write_bytes(b"\0" * (1 << 20))
    from moemesh.data import tokenizer

    files = tokenizer._dir_files(d)
    assert sorted(files) == ["tokenizer.json"] and bare.vocab_size == 3


def test_an_input_without_documents_beside_others_is_a_warning(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", ["hello hello"] * 3)
    write_jsonl(tmp_path / "in" / "b.jsonl", [""])
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and err == [
        f"prepare_data: warning: --input={tmp_path / 'in' / 'b.jsonl'}: no documents "
        "(every 'text' is empty); it adds nothing"
    ], err
    meta = json.loads((tmp_path / "o" / META_NAME).read_text())
    assert [s["documents"] for s in meta["sources"]] == [3, 0]
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", tmp_path / "in" / "b.jsonl", "--out", tmp_path / "o2")
    assert rc == 2 and len(err) == 1 and "b.jsonl: no documents" in err[0], err


def test_a_validation_corpus_that_shares_a_shard_with_training_is_refused(tmp_path):
    train = write_corpus(tmp_path / "train", [[40, 40]], vocab_size=1000)
    held = write_corpus(tmp_path / "held", [[40, 40]], vocab_size=1000, start=500)
    cfg = DataConfig(name="t", kind="tokens", path=str(train), val_path=str(held))
    check_data(cfg, seq_len=16, vocab_size=1000)
    shutil.copytree(train, tmp_path / "copy")
    cfg = DataConfig(name="t", kind="tokens", path=str(train), val_path=str(tmp_path / "copy"))
    with pytest.raises(ConfigError, match=r"data.val_path=.*copy holds the same tokens as data.path=.*train \(shard_"):
        check_data(cfg, seq_len=16, vocab_size=1000)


def test_a_parquet_row_group_and_an_arrow_batch_are_read_in_bounded_pieces(tmp_path, monkeypatch):
    """A row group can hold gigabytes of text: it is read in batches of rows (never whole with
    read_row_group), in order, and a value longer than a jsonl line may be is refused in one line
    before it becomes a Python string, in parquet and in a saved dataset."""
    from moemesh.data import inputs

    texts = [f"doc {i} " + "x" * (i % 7) for i in range(50)]
    pq.write_table(pa.table({"text": texts, "n": list(range(50))}), tmp_path / "a.parquet", row_group_size=50)

    def whole(*_a, **_k):
        raise AssertionError("read_row_group reads a whole row group")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", whole)
    monkeypatch.setattr(inputs, "PARQUET_BATCH_ROWS", 8)
    (parquet,) = inputs.find_inputs([str(tmp_path / "a.parquet")])
    assert list(inputs.documents(parquet, 0, 1, "text")) == texts
    saved = _saved_dataset(tmp_path / "saved", texts)  # record batches of 7 rows
    (arrow,) = inputs.find_inputs([str(saved)])
    assert list(inputs.documents(arrow, 1, 2, "text")) == texts[7:14]
    monkeypatch.setattr(inputs, "MAX_LINE", 9)
    # the longest of the first batch: "doc 6 xxxxxx" (12 bytes); of rows 7-13: "doc 13 xxxxxx"
    for inp, a, where, n in ((parquet, 0, "row group 0", 12), (arrow, 1, "record batch 1", 13)):
        with pytest.raises(ConfigError) as err:
            list(inputs.documents(inp, a, a + 1, "text"))
        assert f"a 'text' value in {where} is {n} bytes, more than 9 (one document, as a jsonl line)" in str(err.value)


def test_a_crafted_arrow_batch_is_refused_before_it_is_read(tmp_path):
    """A saved dataset's string offsets pointing past the data buffer: reading the texts read out
    of bounds (SIGBUS in a worker, measured); the batch is validated first and refused in one line."""
    from moemesh.data import inputs

    d = _saved_dataset(tmp_path / "saved", ["hello", "hello", "hello"])
    f = d / "data-00000-of-00001.arrow"
    good = np.array([0, 5, 10, 15], dtype="<i4").tobytes()  # the text column's offsets
    raw = f.read_bytes()
    assert raw.count(good) == 1
    f.write_bytes(raw.replace(good, np.array([0, 5, 10, 50_000_000], dtype="<i4").tobytes()))
    (arrow,) = inputs.find_inputs([str(d)])
    with pytest.raises(ConfigError) as err:
        list(inputs.documents(arrow, 0, 1, "text"))
    assert "not a readable arrow file (" in str(err.value) and "\n" not in str(err.value)


def test_a_saved_datasets_or_an_outs_json_that_is_wrong_is_one_line(tmp_path, capsys):
    """dataset_dict.json, state.json and --out's metadata are read as untrusted JSON objects: not
    JSON, the wrong type or nested 100,000 deep was a JSONDecodeError, AttributeError or
    RecursionError traceback; each is one line, exit 2."""
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")
    good = tmp_path / "in.jsonl"
    good.write_text('{"text": "hello"}\n')
    cases = []
    for i, (name, raw) in enumerate(
        [("dataset_dict.json", "not json"), ("dataset_dict.json", '["train"]'), ("state.json", "[" * 100_000)]
    ):
        d = _saved_dataset(tmp_path / f"saved{i}", ["hello"])
        if name == "dataset_dict.json":
            (d / "state.json").unlink()
        (d / name).write_text(raw)
        cases.append((["--input", d, "--out", tmp_path / f"o{i}"], name))
    for i, raw in enumerate(['{"tokenizer": "x"}', "[" * 100_000]):
        out = tmp_path / f"out{i}"
        out.mkdir()
        (out / META_NAME).write_text(raw)
        cases.append((["--input", good, "--out", out], "--out="))
    for args, says in cases:
        rc, err = _prepare(capsys, "--tokenizer", tok, *args)
        assert rc == 2 and len(err) == 1 and says in err[0], (args, err)


def test_inputs_given_twice_or_in_two_flags_and_impossible_options(tmp_path, capsys):
    """--input a --input b prepared only b (argparse's last flag won) and --input a a tokenised a
    twice; --workers 10^12 and an --out under a file were tracebacks that left files behind."""
    tok = _tiny_tokenizer(tmp_path / "tokenizer.json")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "hello"}\n')
    b.write_text('{"text": "hello hello"}\n')
    d_a = tmp_path / "d" / "a.jsonl"
    d_a.parent.mkdir()
    d_a.write_text('{"text": "hello"}\n')
    rc, err = _prepare(capsys, "--tokenizer", tok, "--input", a, "--input", b, "--out", tmp_path / "two")
    assert rc == 0 and err == [], err
    assert [s["path"] for s in json.loads((tmp_path / "two" / META_NAME).read_text())["sources"]] == [str(a), str(b)]
    for args, says in [
        (["--input", a, a, "--out", tmp_path / "o1"], f"--input={a} is given twice"),
        (  # the same file under two spellings, or in a directory given beside it
            ["--input", a, f"{tmp_path}/./a.jsonl", "--out", tmp_path / "o1"],
            f"--input={tmp_path}/./a.jsonl is the file {a} already names ({a.resolve()})",
        ),
        (["--input", tmp_path / "d", d_a, "--out", tmp_path / "o1"], f"--input={d_a} is the file {d_a} already names"),
        (
            ["--input", a, "--workers", "1000000000000", "--out", tmp_path / "o2"],
            "--workers=1000000000000 must be 1 to",
        ),
        (["--input", a, "--out", a / "sub"], f"--out={a / 'sub'}: cannot make"),
    ]:
        rc, err = _prepare(capsys, "--tokenizer", tok, *args)
        assert rc == 2 and len(err) == 1 and says in err[0], (args, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_every_jsonl_document_is_read_once_whatever_the_unit_boundaries(tmp_path):
    """Units are byte ranges of --shard-mb: a line belongs to the unit it starts in, also where a
    boundary falls exactly on a line's first byte or on its newline."""
    from moemesh.data.inputs import _units, documents, find_inputs

    docs = [f"doc{i} " + "x" * (i % 5) for i in range(12)]
    (inp,) = find_inputs([str(write_jsonl(tmp_path / "a.jsonl", docs))])
    for shard_bytes in range(1, inp.size + 2):
        got = [t for u in _units(inp, 0, shard_bytes) for t in documents(inp, u.a, u.b, "text")]
        assert got == docs, shard_bytes


def test_a_piece_marker_naming_another_shards_files_is_not_kept(tmp_path):
    from moemesh.data.prepare import _shard_ok

    out = write_corpus(tmp_path / "out", [[3, 4]], vocab_size=1000)
    (shard,) = json.loads((out / META_NAME).read_text())["shards"]
    (out / ".prepare").mkdir()
    for i in (0, 1):
        (out / ".prepare" / f"piece_{i:06d}.json").write_text(json.dumps({"shard": shard, "inputs": {}}))
    assert _shard_ok(out, 0) is not None
    assert _shard_ok(out, 1) is None  # shard 0's files, complete as they are, are not piece 1's shard


def test_an_unfinished_prepare_of_other_options_is_not_continued(tmp_path):
    from moemesh.data.prepare import _refuse_other

    tok = {"name": "t", "sha256": "a" * 64}
    plan = {"version": 2, "tokenizer": tok, "shard_bytes": 1 << 20, "pieces": 3}
    out = tmp_path / "out"
    (out / ".prepare").mkdir(parents=True)
    (out / ".prepare" / "plan.json").write_text(json.dumps(plan))
    _refuse_other(out, plan)  # the same plan: continued
    with pytest.raises(ConfigError, match="holds an unfinished prepare of other inputs or options"):
        _refuse_other(out, {**plan, "shard_bytes": 2 << 20})


def test_ids_past_65535_are_written_as_uint32(tmp_path, capsys):
    """A vocabulary of 65,537 ids (the largest 65,536) needs uint32 shards: uint16 would wrap it to 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "b": 65536}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "in.jsonl", ["b a", "a b b"])
    rc, err = _prepare(
        capsys, "--tokenizer", tmp_path / "tokenizer.json", "--input", tmp_path / "in.jsonl", "--out", tmp_path / "o"
    )
    assert rc == 0, err
    meta = read_meta(tmp_path / "o")
    assert (meta.vocab_size, meta.dtype) == (65537, "uint32")
    ids = np.fromfile(tmp_path / "o" / "shard_000000.tok", dtype=np.uint32).tolist()
    assert ids == [65536, 2, 0, 2, 65536, 65536, 0]
    assert np.fromfile(tmp_path / "o" / "shard_000000.idx", dtype=np.uint64).tolist() == [0, 3, 7]


def test_sources_of_two_tokenizers_are_refused(tmp_path, monkeypatch):
    """The same ids would mean different text."""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    a = write_corpus(tmp_path / "a", [[40, 40]], vocab_size=1000, tokenizer="one")
    b = write_corpus(tmp_path / "b", [[40, 40]], vocab_size=1000, tokenizer="two")
    from moemesh.data import DataSourceConfig

    cfg = DataConfig(name="t", kind="tokens", sources=[DataSourceConfig(str(a), 1.0), DataSourceConfig(str(b), 1.0)])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].path=.* was tokenised by two .*, data.sources\[0\]"):
        check_data(cfg, seq_len=16, vocab_size=1000)
    cfg = DataConfig(name="t", kind="tokens", path=str(a), val_path=str(b))
    with pytest.raises(ConfigError, match=r"data.val_path=.* was tokenised by two"):
        check_data(cfg, seq_len=16, vocab_size=1000)


def test_a_corrupt_validation_directory_is_found_before_any_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    train = write_corpus(tmp_path / "train", [[40, 40]], vocab_size=1000)
    held = write_corpus(tmp_path / "held", [[40, 40]], vocab_size=1000, start=500)
    shard = held / "shard_000000.tok"
    b = bytearray(shard.read_bytes())
    b[3] ^= 1  # same size: only the sha256 finds it
    shard.write_bytes(bytes(b))
    cfg = DataConfig(name="t", kind="tokens", path=str(train), val_path=str(held))
    with pytest.raises(ConfigError, match=r"data.val_path=.*: shard shard_000000.tok has sha256"):
        prepare_data(cfg, seq_len=16, vocab_size=1000)


def test_a_piece_marker_is_not_kept_when_its_shard_changed(tmp_path):
    """A shard rewritten since its marker (same size, other bytes) is made again, not kept."""
    from moemesh.data.prepare import _shard_ok

    out = write_corpus(tmp_path / "out", [[3, 4]], vocab_size=1000)
    (shard,) = json.loads((out / META_NAME).read_text())["shards"]
    (out / ".prepare").mkdir()
    (out / ".prepare" / "piece_000000.json").write_text(json.dumps({"shard": shard, "inputs": {}}))
    assert _shard_ok(out, 0) is not None
    for name in ("shard_000000.tok", "shard_000000.idx"):
        good = (out / name).read_bytes()
        (out / name).write_bytes(good[::-1])
        assert _shard_ok(out, 0) is None, name
        (out / name).write_bytes(good)
