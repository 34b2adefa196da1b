"""Paths that may not be what their name says: a folder, symlink, pipe, device or socket where a
regular file is expected is refused, both before reading one and before replacing one."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import StorageError
from .atomic import _storage_error


def refuse_special_file(path: Path) -> None:
    """Raise StorageError when ``path`` exists and is anything but a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _storage_error(exc, path, user_file=True) from exc
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        what = "a folder"
    elif stat.S_ISLNK(st.st_mode):
        what = "a symbolic link" + ("" if os.path.exists(path) else " to nothing")
    else:
        what = "not a regular file (a device, pipe or socket)"
    raise StorageError(f"{path} is {what}; celebctl only replaces regular files. Remove it "
                       "yourself or choose another path. Nothing was written.")


class FileRefused(ValueError):
    """A path that is not a regular file, or is larger than the caller allows.

    ``reason`` completes a sentence that starts with the path: "is a named pipe, not a regular
    file".
    """

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path} {reason}")
        self.path = Path(path)
        self.reason = reason


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _human_size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 1024} KiB" if n >= 1024 else f"{n} bytes"


def read_regular_file(path: Path | str, limit: int, follow_symlinks: bool = True) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes.

    A pipe, device, socket or folder is refused at once (it is opened without blocking and
    never read), and no more than ``limit`` + 1 bytes are ever read, so neither a FIFO nor
    /dev/zero can hang or exhaust memory. With ``follow_symlinks`` False a symbolic link is
    refused too (files inside the data home). Raises :class:`FileRefused`, or OSError
    (FileNotFoundError, PermissionError, ...) for the caller to word.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise FileRefused(path, "is a symbolic link; celebctl does not follow links in its "
                                    "data home") from None
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO opened by nobody else
            raise FileRefused(path, "is a socket or special file, not a regular file") from None
        if exc.errno == errno.EISDIR:
            raise FileRefused(path, "is a folder, not a file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(path, f"is {_kind_of(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise FileRefused(path, f"is larger than {_human_size(limit)}")
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise FileRefused(path, f"is larger than {_human_size(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_regular_file(path: Path | str, follow_symlinks: bool = True) -> bool:
    """True for a regular file (never blocks, never raises)."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode)
