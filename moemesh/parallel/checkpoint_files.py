"""A checkpoint's files, opened as what they claim to be: regular files of its directory.

Every file of a checkpoint (meta.json, DCP's ``.metadata``, the shards) is opened by name
inside the checkpoint's directory (``dir_fd``), with ``O_NOFOLLOW`` (a symlink, even one to
a file beside it, is refused: moemesh never writes one) and ``O_NONBLOCK`` (opening a FIFO
returns at once instead of waiting for a writer). Then ``fstat`` of the open file decides:
anything but a regular file (a FIFO, a device, a directory, a socket) is refused, and so is
a size other than the one meta.json recorded, before a byte is read or hashed. A read
never asks for more than that size. The checkpoint directory itself must be a real
directory (``O_DIRECTORY | O_NOFOLLOW``); the directory above it may be a symlink.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

_CHUNK = 256 << 10  # bytes read at a time: hashing is as fast as with 8 MiB, and the buffer stays small
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


class FileRefused(ValueError):
    """One line naming the file and why it is not read."""


def _open_dir(directory: Path) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR) and Path(directory).is_symlink():
            raise FileRefused(f"{directory}: a symbolic link, not a checkpoint directory: not read") from None
        raise


def open_regular(directory: Path, name: str, size: int | None = None, *, max_size: int | None = None) -> int:
    """A read-only fd of the regular file ``directory/name`` (``name`` one path component),
    of exactly ``size`` bytes or at most ``max_size``; FileRefused otherwise."""
    path = Path(directory) / name
    if not name or "/" in name or name in (".", ".."):
        raise FileRefused(f"{path}: not a file name of the checkpoint's directory")
    dfd = _open_dir(Path(directory))
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as err:
            if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                raise FileRefused(f"{path}: a symbolic link, not a file of the checkpoint: not read") from None
            raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise FileRefused(f"{path}: {kind}, not a regular file: not read")
        if size is not None and st.st_size != size:
            raise FileRefused(f"{path}: {st.st_size} bytes, {size} when saved (truncated or changed): not read")
        if max_size is not None and st.st_size > max_size:
            raise FileRefused(f"{path}: {st.st_size:,} bytes, more than the {max_size:,} it may have: not read")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_exactly(fd: int, length: int, offset: int, path: Path) -> bytes:
    """``length`` bytes at ``offset`` (the file's size was checked when it was opened)."""
    parts, got = [], 0
    while got < length:
        chunk = os.pread(fd, min(length - got, _CHUNK), offset + got)
        if not chunk:
            raise FileRefused(f"{path}: ends before byte {offset + length:,} (it shrank while read)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_file(directory: Path, name: str, *, max_size: int) -> bytes:
    """The whole of a regular file of at most ``max_size`` bytes."""
    fd = open_regular(directory, name, max_size=max_size)
    try:
        return read_exactly(fd, os.fstat(fd).st_size, 0, Path(directory) / name)
    finally:
        os.close(fd)


def sha256_of(directory: Path, name: str, size: int | None = None) -> dict:
    """``{"bytes", "sha256"}`` of a regular file (of ``size`` bytes, when given)."""
    fd = open_regular(directory, name, size)
    try:
        h, total, left = hashlib.sha256(), 0, os.fstat(fd).st_size
        while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
            h.update(chunk)
            total += len(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return {"bytes": total, "sha256": h.hexdigest()}
