"""Reading documents from the formats prepare takes, and cutting inputs into units.

- ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object a line, ``--text-key`` its text;
- ``.txt`` / ``.md`` / ``.text``: the whole file is one document;
- ``.parquet``: the ``--text-key`` column, row group by row group (each read in batches of rows);
- a directory saved by ``datasets.save_to_disk`` (``state.json`` and Arrow stream files; a
  ``DatasetDict``: a split of it), read with pyarrow.

A unit depends only on its input's bytes (byte ranges aligned to lines, row groups, record
batches, whole text files), so the plan cut from units is the same on every run.
Every read is bounded: a line, a text file, the JSON beside a saved dataset.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import ConfigError, first_line
from moemesh.untrusted import read_bounded, read_json_object, regular_file

JSONL = (".jsonl", ".json", ".ndjson")
TEXT = (".txt", ".md", ".text")
PARQUET = (".parquet",)
MAX_TEXT_FILE = 256 << 20  # a .txt file is one document: bounded, since it is read whole
MAX_LINE = 64 << 20  # one jsonl line (one document), or one parquet value
PARQUET_BATCH_ROWS = 64  # rows of a parquet row group read at once


@dataclass(frozen=True)
class Input:
    path: str  # resolved
    kind: str  # jsonl | text | parquet | arrow
    size: int
    mtime_ns: int
    given: str  # as on the command line (directory inputs: the directory / file name)


@dataclass(frozen=True)
class Unit:
    input: int
    a: int  # jsonl: byte range [a, b); parquet: row group a; arrow: record batch a; text: 0
    b: int
    bytes: int  # input bytes it covers (progress, grouping)


# --- inputs and the plan --------------------------------------------------------------------------


def _arrow_files(d: Path, split: str) -> list[Path]:
    """A saved datasets directory's Arrow files, in its own order (state.json's _data_files)."""
    if (d / "dataset_dict.json").is_file():
        sub = d / split
        if not sub.is_dir():
            splits = read_json_object(d / "dataset_dict.json", 1 << 20, f"--input={d}").get("splits")
            listed = [x for x in splits if isinstance(x, str)][:20] if isinstance(splits, list) else []
            raise ConfigError(f"--input={d}: a DatasetDict without split {split!r}; --split is one of {listed}")
        d = sub
    state = read_json_object(d / "state.json", 16 << 20, f"--input={d}")
    try:
        names = [f["filename"] for f in state["_data_files"]]
    except (KeyError, TypeError) as err:
        raise ConfigError(f"--input={d}/state.json: no _data_files list ({err})") from None
    files = []
    for name in names:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ConfigError(f"--input={d}/state.json: data file name {name!r} leaves the directory")
        files.append(d / name)
    return files


# What a dataset directory holds at its top beside its data (a hub download's card and metadata),
# which a directory input leaves out, as it does hidden files and directories.
NOT_DATA = ("readme", "license", "dataset_infos", "dataset_info", "dataset_dict", "state")


def _is_data(f: Path, root: Path) -> bool:
    """A data file of directory input ``root``: not hidden, and not the dataset's card or metadata
    at its top (a README.md deeper down, in a corpus of repositories, is a document)."""
    rel = f.relative_to(root)
    hidden = any(part.startswith(".") for part in rel.parts)
    card = len(rel.parts) == 1 and f.stem.lower() in NOT_DATA
    return f.is_file() and not hidden and not card and _kind(f) is not None


def _kind(p: Path) -> str | None:
    suffix = p.suffix.lower()
    return "jsonl" if suffix in JSONL else "text" if suffix in TEXT else "parquet" if suffix in PARQUET else None


def find_inputs(given: list[str], split: str = "train") -> list[Input]:
    out: dict[str, Input] = {}  # by resolved path: a file named twice is refused

    def add(p: Path, kind: str, label: str):
        _add_input(out, p, kind, label)

    for g in given:
        p = Path(g).expanduser()
        if p.is_dir():
            if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
                for f in _arrow_files(p, split):
                    add(f, "arrow", f"{g}/{f.name}")
                continue
            files = sorted(f for f in p.rglob("*") if _is_data(f, p))
            if not files:
                raise ConfigError(f"--input={g}: a directory with no .jsonl, .json, .txt, .md or .parquet file")
            for f in files:
                add(f, _kind(f) or "", str(Path(g) / f.relative_to(p)))
        elif p.exists():
            kind = _kind(p)
            if kind is None:
                raise ConfigError(
                    f"--input={g}: unknown format {p.suffix or '(no suffix)'}; valid: .jsonl/.json (an object a line), "
                    ".txt/.md (a document a file), .parquet, or a directory saved by datasets.save_to_disk"
                )
            add(p, kind, g)
        else:
            raise ConfigError(f"--input={g}: no such file or directory")
    if not out:
        raise ConfigError("--input: no input files")
    return list(out.values())


def _add_input(found: dict[str, Input], p: Path, kind: str, label: str) -> None:
    st = regular_file(p, f"--input={label}")
    if st.st_size == 0:
        raise ConfigError(f"--input={label}: empty file (no documents)")
    real = str(p.resolve())
    if real in found:  # a.jsonl and ./a.jsonl, a directory and a file inside it, a symlink
        raise ConfigError(
            f"--input={label} is the file {found[real].given} already names ({real}); each input is tokenised once"
        )
    found[real] = Input(real, kind, st.st_size, st.st_mtime_ns, label)


def _units(inp: Input, i: int, shard_bytes: int) -> list[Unit]:
    if inp.kind == "jsonl":
        return [
            Unit(i, a, min(a + shard_bytes, inp.size), min(shard_bytes, inp.size - a))
            for a in range(0, inp.size, shard_bytes)
        ]
    if inp.kind == "text":
        if inp.size > MAX_TEXT_FILE:
            raise ConfigError(
                f"--input={inp.given}: {inp.size:,} bytes is one document, more than {MAX_TEXT_FILE:,}; "
                "split it, or give it as .jsonl (a document a line)"
            )
        return [Unit(i, 0, 1, inp.size)]
    if inp.kind == "parquet":
        import pyarrow.parquet as pq

        with _arrow_errors(inp):
            meta = pq.ParquetFile(inp.path).metadata
            sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
        return [Unit(i, g, g + 1, max(1, s)) for g, s in enumerate(sizes)]
    with _arrow_errors(inp):
        batches = _arrow_batches(inp.path)
    per = max(1, inp.size // max(1, batches))
    return [Unit(i, k, k + 1, per) for k in range(batches)]


def _arrow_batches(path: str) -> int:
    import pyarrow as pa

    with pa.memory_map(path) as source:
        return sum(1 for _ in pa.ipc.open_stream(source))


def plan_pieces(inputs: list[Input], shard_bytes: int) -> list[list[Unit]]:
    """Consecutive units grouped until each piece holds at least ``shard_bytes`` of input."""
    pieces: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for i, inp in enumerate(inputs):
        for unit in _units(inp, i, shard_bytes):
            current.append(unit)
            size += unit.bytes
            if size >= shard_bytes:
                pieces.append(current)
                current, size = [], 0
    if current:
        pieces.append(current)
    return pieces


def check_text_key(inp: Input, key: str) -> None:
    """The first document of an input has the text key (found now, not after hours of tokenising)."""
    if inp.kind != "text":
        next(documents(inp, 0, inp.size, key, first_only=True), None)


# --- reading documents ----------------------------------------------------------------------------


def _skip_started_line(f, a: int, b: int) -> None:
    """Seek to the first line that starts at or after ``a``: the line under way at ``a`` belongs
    to the previous unit. Skipped in bounded pieces (one line may be the whole file)."""
    f.seek(a - 1)
    if f.read(1) == b"\n":
        return
    while f.tell() < b:
        rest = f.readline(MAX_LINE + 1)
        if not rest or rest.endswith(b"\n"):
            return


def _jsonl(inp: Input, a: int, b: int, key: str, first_only: bool = False):
    """Documents of the lines that start in [a, b)."""
    with open(inp.path, "rb") as f:
        if a > 0:
            _skip_started_line(f, a, b)
        while f.tell() < b:
            pos = f.tell()
            line = f.readline(MAX_LINE + 1)
            if not line:
                break
            if len(line) > MAX_LINE:
                raise ConfigError(f"--input={inp.given}: a line at byte {pos:,} is longer than {MAX_LINE:,} bytes")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"--input={inp.given}: byte {pos:,}: not a JSON line ({str(err)[:120]})") from None
            if not isinstance(obj, dict) or key not in obj:
                keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                raise ConfigError(f"--text-key={key}: missing in {inp.given} at byte {pos:,}; its keys: {keys}")
            text = "" if obj[key] is None else obj[key]  # null: no text, as a parquet null (skipped)
            if not isinstance(text, str):
                raise ConfigError(
                    f"--text-key={key}: {inp.given} at byte {pos:,} holds a {type(text).__name__}, not text"
                )
            yield _valid_unicode(text)
            if first_only:
                return


def _valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate (JSON's "\\ud800", common in scraped text, which no
    UTF-8 string holds) replaced by U+FFFD, as a text file's invalid bytes are."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


@contextlib.contextmanager
def _arrow_errors(inp: Input):
    """A parquet or Arrow file that pyarrow cannot read (not one, cut short) is one line."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as err:
        first = first_line(err)[:160]
        raise ConfigError(f"--input={inp.given}: not a readable {inp.kind} file ({first})") from None


def _table_texts(table, inp: Input, key: str):
    if key not in table.column_names:
        raise ConfigError(f"--text-key={key}: no such column in {inp.given}; its columns: {table.column_names[:12]}")
    for text in table.column(key).to_pylist():
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"--text-key={key}: {inp.given} holds {type(text).__name__} values, not text")
        yield text or ""


def _batch_texts(batch, inp: Input, key: str, where: str):
    """The texts of a record batch of one column (``key``), each value bounded as a jsonl line is
    before any becomes a Python string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    batch.validate(full=True)  # offsets within the buffers: a crafted memory-mapped file reads out of bounds
    column = batch.column(0)
    if batch.num_rows and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        longest = pc.max(pc.binary_length(column)).as_py()
        if longest is not None and longest > MAX_LINE:
            raise ConfigError(
                f"--input={inp.given}: a {key!r} value in {where} is {longest:,} bytes, more than {MAX_LINE:,} "
                "(one document, as a jsonl line); split it"
            )
    yield from _table_texts(pa.Table.from_batches([batch]), inp, key)


def documents(inp: Input, a: int, b: int, key: str, first_only: bool = False):
    if inp.kind in ("parquet", "arrow"):
        with _arrow_errors(inp):
            yield from _arrow_documents(inp, a, key, first_only)
    else:
        yield from _text_documents(inp, a, b, key, first_only)


def _text_documents(inp: Input, a: int, b: int, key: str, first_only: bool):
    if inp.kind == "jsonl":
        yield from _jsonl(inp, a, b, key, first_only)
    elif inp.kind == "text":
        yield read_bounded(Path(inp.path), MAX_TEXT_FILE, f"--input={inp.given}").decode("utf-8", errors="replace")


def _arrow_documents(inp: Input, a: int, key: str, first_only: bool):
    if inp.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(inp.path)
        if key not in pf.schema_arrow.names:
            raise ConfigError(
                f"--text-key={key}: no such column in {inp.given}; its columns: {pf.schema_arrow.names[:12]}"
            )
        if first_only:
            return
        # Streamed in batches of rows: a row group can hold gigabytes of text, and a value is
        # bounded as a jsonl line is, so a batch holds at most PARQUET_BATCH_ROWS x MAX_LINE.
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[a], columns=[key]):
            yield from _batch_texts(batch, inp, key, f"row group {a}")
    else:
        import pyarrow as pa

        with pa.memory_map(inp.path) as source:
            reader = pa.ipc.open_stream(source)
            if key not in reader.schema.names:
                raise ConfigError(
                    f"--text-key={key}: no such column in {inp.given}; its columns: {reader.schema.names[:12]}"
                )
            if first_only:
                return
            for k, batch in enumerate(reader):
                if k == a:
                    yield from _batch_texts(batch.select([key]), inp, key, f"record batch {a}")
                    return
