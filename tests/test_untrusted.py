"""The one bounded reader of files the project did not write: a FIFO or a device is refused
before a read could block, a file over its limit before a byte is read, and each caller's
own error type carries the one-line message."""

import os
from pathlib import Path

import pytest

from moemesh.errors import ConfigError
from moemesh.runs.reader import RunReadError, read_json
from moemesh.untrusted import bounded_size, read_bounded, read_json_object, regular_file


def test_a_fifo_and_a_device_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # a read of it would block for ever: no writer
    with pytest.raises(ConfigError, match=r"^model.hf_path: .*config.json is not a regular file$"):
        read_json_object(fifo, 1 << 20, "model.hf_path")
    zero = tmp_path / "summary.json"
    zero.symlink_to("/dev/zero")  # a read of it never ends
    with pytest.raises(RunReadError, match=r"summary.json is not a regular file$"):
        read_json(zero)
    with pytest.raises(ConfigError, match=r"^x: .*: No such file or directory$"):
        regular_file(tmp_path / "missing", "x")


def test_a_file_over_its_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    big = tmp_path / "meta.json"
    big.write_bytes(b"{" + b" " * 100 + b"}")
    opened = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or pytest.fail("read"))
    with pytest.raises(ConfigError, match=r"^--out=d: .*meta.json is 102 bytes, more than the 101 allowed$"):
        read_bounded(big, 101, "--out=d")
    assert not opened
    monkeypatch.undo()
    assert bounded_size(big, 102) == 102 and read_bounded(big, 102) == big.read_bytes()


def test_a_file_that_grows_while_read_is_refused(tmp_path, monkeypatch):
    import moemesh.untrusted as u

    f = tmp_path / "state.json"
    f.write_bytes(b'{"a": 1}')
    monkeypatch.setattr(u, "bounded_size", lambda *a, **k: 2)  # stat saw 2 bytes; then it grew
    with pytest.raises(ConfigError, match=r"state.json grew past 4 bytes while read$"):
        u.read_bounded(f, 4, "--input=d")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[1, 2]", r"holds a list, not a JSON object$"),
        (b"{nope", r"is not JSON \(Expecting"),
        (b"\xff\xfe", "is not JSON"),
        (b"[" * 200_000, "is not JSON"),  # nesting deep enough to exhaust the parser's recursion
    ],
)
def test_json_that_is_not_an_object_is_one_line(tmp_path, raw, message):
    p = Path(tmp_path / "config.json")
    p.write_bytes(raw)
    with pytest.raises(ConfigError, match=message) as err:
        read_json_object(p, 1 << 20, "model.hf_path")
    assert "\n" not in str(err.value)


def test_yaml_without_aliases_refuses_an_alias_and_reads_the_rest():
    import yaml

    from moemesh.untrusted import yaml_without_aliases

    assert yaml_without_aliases(b"- a=1\n- b: [1, 2]\n") == ["a=1", {"b": [1, 2]}]
    with pytest.raises(yaml.YAMLError, match="an alias"):
        yaml_without_aliases("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(yaml.YAMLError):  # still safe: no Python objects
        yaml_without_aliases("!!python/object/apply:os.system [echo]\n")


def test_metrics_records_keep_what_the_schema_knows_and_skip_deep_nesting(tmp_path):
    """An unknown key's list or object is dropped (a 64 MiB file of [[],[],...] held 1.6 GB), an
    unknown number kept (a newer trainer's); a line nested 100,000 deep is skipped, not a
    RecursionError traceback."""
    import json

    from moemesh.runs.reader import read_records

    lines = [
        json.dumps({"step": 1, "loss": 2.5, "new_metric": 0.5, "junk": [[]] * 1000, "blob": {"a": [1]}}),
        "[" * 100_000,
        json.dumps({"step": 2, "loss": 2.4, "load": {"layer0": {"cv": 0.1}}}),
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    skipped: list[int] = []
    records = read_records(tmp_path, skipped)
    assert records == [
        {"step": 1, "loss": 2.5, "new_metric": 0.5},
        {"step": 2, "loss": 2.4, "load": {"layer0": {"cv": 0.1}}},
    ]
    assert skipped == [2]


def test_only_the_last_records_load_statistics_are_kept(tmp_path):
    """A record's per-layer load lists are most of its bytes (16 layers x 64 experts: 1.9 GB held for
    a 413 MB file of 20,000 steps); only the final load is read, so only the last record that has
    one keeps it (89 MB for the same file)."""
    import json

    from moemesh.runs.compare import final_load_cv
    from moemesh.runs.reader import load_run

    def load(cv):
        return {"layer1": {"tokens_per_expert": [3, 5], "cv": cv}}

    lines = [{"step": 1, "load": load(0.5)}, {"step": 2, "load": load(0.25)}, {"step": 3, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = load_run(tmp_path, require_summary=False)
    assert run.records == [{"step": 1}, {"step": 2, "load": load(0.25)}, {"step": 3, "loss": 2.0}]
    assert final_load_cv(run) == {1: 0.25}


def test_a_metrics_line_of_exactly_the_longest_length_is_a_record(tmp_path):
    """MAX_LINE_BYTES is the longest line read (its newline included); only a longer one is refused."""
    from moemesh.runs.reader import MAX_LINE_BYTES, read_records

    head = '{"step": 2, "pad": "'
    longest = head + "p" * (MAX_LINE_BYTES - len(head) - 3) + '"}\n'
    assert len(longest) == MAX_LINE_BYTES
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n' + longest + '{"step": 3}\n')
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text(longest[:-1] + 'p"\n')
    with pytest.raises(RunReadError, match=f"line 1 is longer than {MAX_LINE_BYTES:,} bytes"):
        read_records(tmp_path)
