"""Reading a file the project did not write: every such read is bounded before it is parsed.

A regular file only (a FIFO or a character device such as /dev/zero would block a read or
never end), of at most ``limit`` bytes, checked with stat() before the read and again by
reading at most ``limit + 1`` bytes (the file may grow meanwhile). Symlinks are followed: these
are the user's own inputs (a corpus, a model directory, a run). Checkpoint shards, which
another rank or an attacker may have swapped, are opened more strictly, relative to their
directory and without following links: ``moemesh.parallel.checkpoint_files``.

Each caller names what it reads (``what``: the key or flag it came from) and the error its
layer raises; the messages are one line: "<what>: <path> is not a regular file".
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import yaml

from moemesh.errors import ConfigError


def _where(path: Path, what: str) -> str:
    return f"{what}: {path}" if what else str(path)


def regular_file(path: Path, what: str = "", error: type[Exception] = ConfigError) -> os.stat_result:
    """stat() of ``path`` if it is a regular file; ``error`` naming it otherwise."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise error(f"{_where(path, what)}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{_where(path, what)} is not a regular file")
    return st


def bounded_size(path: Path, limit: int, what: str = "", error: type[Exception] = ConfigError) -> int:
    """The size of regular file ``path`` if it is at most ``limit`` bytes."""
    size = regular_file(path, what, error).st_size
    if size > limit:
        raise error(f"{_where(path, what)} is {size:,} bytes, more than the {limit:,} allowed")
    return size


def read_bounded(path: Path, limit: int, what: str = "", error: type[Exception] = ConfigError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    bounded_size(path, limit, what, error)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{_where(path, what)} grew past {limit:,} bytes while read")
    return data


def read_json_object(path: Path, limit: int, what: str = "", error: type[Exception] = ConfigError) -> dict:
    """A JSON object from a regular file of at most ``limit`` bytes."""
    raw = read_bounded(path, limit, what, error)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: [[[[... nested deep
        raise error(
            f"{_where(path, what)} is not JSON ({(str(err).splitlines() or [type(err).__name__])[0]})"
        ) from None
    if not isinstance(data, dict):
        raise error(f"{_where(path, what)} holds a {type(data).__name__}, not a JSON object")
    return data


class YamlAliasError(yaml.composer.ComposerError):
    """``yaml_without_aliases`` met an alias (its ``problem_mark`` says where)."""


class _NoAliases(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise YamlAliasError(None, None, "an alias (*name) is not read here", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def yaml_without_aliases(raw: bytes | str):
    """YAML from a file this project did not write, parsed safely (``yaml.safe_load``'s types)
    and without aliases: a few hundred bytes of nested ``&a [*b, *b, ...]`` expand to 10^12
    nodes in whatever walks the result. An alias raises ``YamlAliasError``, a ``yaml.YAMLError``."""
    return yaml.load(raw, Loader=_NoAliases)  # noqa: S506 (a SafeLoader)
