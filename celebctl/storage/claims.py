"""Claims: "this process is working on X", visible to every process that shares the data home,
and gone the moment the process is (exit, crash, kill -9).

A claim is an OS file lock (``flock``) on ``FOLDER/KEY.claim``, held while the work runs; the
file also says who holds it (pid, host, start time) for the message another process shows. The
kernel drops the lock when its process ends, so a claim never outlives its process and needs no
cleanup: a file left by a killed process is simply free to lock again. Released claims delete
their file. On a network file system the lock is as good as the file system's own locking (NFS
v4 and Lustre/GPFS with locking enabled honour it across machines; a mount without locking
would let two machines claim the same key, which costs double work, never a torn file).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .atomic import FILE_MODE, ensure_private_dir

SUFFIX = ".claim"


class Claim:
    """A held claim; :meth:`release` (or the end of the process) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Delete the claim file and drop the lock (in that order: a process that opened the
        file meanwhile sees that its inode is no longer the claim's and tries again)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(path: Path) -> dict[str, Any]:
    """Who holds the claim at ``path``, as its file says ({} when it cannot be read)."""
    from .special_files import read_regular_file

    try:
        data = json.loads(read_regular_file(path, 4096, follow_symlinks=False))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """'process 123 on node1 since 14:02:07 UTC' (as much as is known)."""
    parts = [f"process {holder['pid']}" if isinstance(holder.get("pid"), int) else
             "another process"]
    if isinstance(holder.get("host"), str):
        parts.append(f"on {holder['host']}")
    if isinstance(holder.get("since"), (int, float)):
        parts.append("since " + time.strftime("%H:%M:%S UTC", time.gmtime(holder["since"])))
    return " ".join(parts)


def try_claim(folder: Path, key: str) -> Claim | dict[str, Any]:
    """Claim ``key``: a :class:`Claim` when this process now holds it, else what is known of
    the process that does (a dict, maybe empty). Never waits."""
    import fcntl

    ensure_private_dir(folder)
    path = folder / f"{key}{SUFFIX}"
    for _ in range(100):  # a holder releasing between our open and lock: try again
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return _holder(path)
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released (unlinked) after we opened it: that inode claims nothing
            os.close(fd)
            continue
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": round(time.time(), 3)}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return Claim(path, fd)
    return {}
