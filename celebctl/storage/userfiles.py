"""Files the user asked for (exports, renders) in the user's own folders: written crash-safely,
never replacing anything but a regular file, and never touching the folder itself; the temp
files a killed writer left there are found by their own name pattern and owner pid."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import StorageError
from .atomic import TMP_MARK, _storage_error, _write_temp, fsync_dir
from .faults import fault_point
from .special_files import refuse_special_file

USER_FILE_MODE = 0o644


def write_user_file(path: Path, data: bytes, overwrite: bool = False,
                    mode: int = USER_FILE_MODE) -> Path:
    """Write a file the user asked for (an export) crash-safely; its folder is left untouched.

    The folder must exist. ``path`` is absent, the old file or the complete new one at every
    moment. Without ``overwrite`` an existing name is refused (also one another process creates
    meanwhile); with it, only a regular file is ever replaced: a folder, symlink, device or pipe
    at ``path`` is refused in every case.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise StorageError(f"The folder {folder} does not exist. Create it first or choose "
                           "another path.")
    refuse_special_file(path)
    if os.path.lexists(path) and not overwrite:
        raise StorageError(f"{path} already exists. Pick another path or pass --force.")
    tmp = None
    try:
        tmp = _write_temp(path, data, mode, hidden=True)
        if overwrite:
            refuse_special_file(path)  # checked again just before the rename
            fault_point("rename", path)
            os.replace(tmp, path)
            tmp = None
        elif not _link_new(tmp, path):
            raise StorageError(f"{path} already exists. Pick another path or pass --force.")
        with contextlib.suppress(OSError):
            fsync_dir(folder)
    except OSError as exc:
        raise _storage_error(exc, path, user_file=True) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def write_new_user_file(folder: Path, stem: str, suffix: str, data: bytes,
                        mode: int = USER_FILE_MODE) -> Path:
    """Write ``data`` as ``folder/stem+suffix``, or ``stem-1``, ``stem-2``... if taken.

    Never replaces anything (also not a file another process writes at the same time).
    """
    tmp = None
    target = Path(folder) / f"{stem}{suffix}"
    try:
        tmp = _write_temp(target, data, mode, hidden=True)
        for n in range(100_000):
            path = Path(folder) / f"{stem}{f'-{n}' if n else ''}{suffix}"
            if _link_new(tmp, path):
                with contextlib.suppress(OSError):
                    fsync_dir(Path(folder))
                return path
    except OSError as exc:
        raise _storage_error(exc, target, user_file=True) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    raise StorageError(f"Too many files named {stem}-N{suffix} in {folder}; clean it up.")


def _link_new(tmp: Path, path: Path) -> bool:
    """Give ``tmp`` the name ``path`` unless that name is taken (by anything, even a dangling
    link). Atomic where hard links work; the temp name stays for the caller to delete."""
    try:
        fault_point("link", path)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: check, then rename (a small race, no overwrite of
        # anything that existed at the check).
        if os.path.lexists(path):
            return False
        fault_point("rename", path)
        os.replace(tmp, path)
        return True


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this machine (a pid of another machine cannot be
    checked from here)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def stale_temp_files(folder: Path, suffix: str) -> list[Path]:
    """Temp files of :func:`write_user_file` for ``*suffix`` files in ``folder`` whose writer
    process is gone (``.NAME{suffix}.celebctl-tmp-PID-XXXXXXXX``); nothing else of the user's."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        target, mark, tail = entry.name.partition(TMP_MARK)
        pid, dash, token = tail.partition("-")
        if not (mark and target.startswith(".") and target.endswith(suffix) and dash
                and pid.isdigit() and len(token) == 8
                and all(c in "0123456789abcdef" for c in token)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and process_gone(int(pid)):
                found.append(Path(entry.path))
    return sorted(found)


def remove_stale_temp_files(folder: Path, suffix: str) -> list[Path]:
    """Delete :func:`stale_temp_files`; returns what was deleted (what cannot be is left)."""
    removed = []
    for path in stale_temp_files(folder, suffix):
        with contextlib.suppress(OSError):
            fault_point("unlink", path)
            path.unlink()
            removed.append(path)
    return removed
