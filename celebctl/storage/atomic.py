"""Crash-safe writes in the data home: temp name, fsync, rename; and the removals and renames
that go with them.

Every file celebctl writes goes to a unique temp name in the target folder, is fsynced and then
renamed over the final name, so a reader sees the old file or the new one, never half of one.
Temp names all contain ``TMP_MARK`` so that a later writer (or ``celebctl doctor --fix``) can find
and delete what a killed process left behind. Each helper passes a fault point
(:func:`~celebctl.storage.faults.fault_point`) before it changes the disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from ..errors import StorageError
from .faults import fault_point

TMP_MARK = ".celebctl-tmp-"
DIR_MODE = 0o700
FILE_MODE = 0o600

_POSIX = os.name == "posix"


def _storage_error(exc: OSError, path: Path, user_file: bool = False) -> StorageError:
    """A StorageError that says why a write failed and what to do.

    ``user_file``: the path is one the user chose (an export, a render), so the advice is to pick
    another path, not to move the data home.
    """
    if exc.errno == errno.ENOSPC:
        why = "the disk is full; free some space and try again"
    elif exc.errno in (errno.EROFS,):
        why = ("the file system is read-only; choose a writable output path" if user_file
               else "the file system is read-only; point CELEBCTL_HOME at a writable folder")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = ("permission denied; choose a folder you can write to" if user_file
               else "permission denied; check the folder's owner and modes or set CELEBCTL_HOME")
    else:
        why = exc.strerror or str(exc)
    tail = "" if user_file else " Nothing was changed."
    return StorageError(f"Could not write {path}: {why}.{tail}")


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    return list(reversed(missing))


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents, each with mode 0700.

    A folder that already exists is left exactly as it is: its modes belong to whoever made it
    (the data home's own entries are tightened by :func:`repair_home_modes`, nothing else).
    """
    try:
        created = []
        for folder in _missing_dirs(path):
            fault_point("mkdir", folder)
            try:
                os.mkdir(folder, DIR_MODE)
            except FileExistsError:
                continue
            created.append(folder)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    except OSError as exc:
        raise _storage_error(exc, path) from exc
    if created:
        _mark_home_if_created(created)
    return path


HOME_MARKER = ".celebctl-home"


def _mark_home_if_created(created: list[Path]) -> None:
    """Leave a marker in a data home that celebctl itself created.

    Only a home with the marker has its own mode tightened later; a folder the user pointed
    CELEBCTL_HOME at keeps the modes the user gave it.
    """
    from .. import paths

    home = paths.data_home()
    if home in created:
        atomic_write_bytes(home / HOME_MARKER,
                           b"This folder was created by celebctl as its data home.\n")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entry table so a rename survives power loss (POSIX only)."""
    if not _POSIX:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path, hidden: bool = False) -> Path:
    """A unique temp name beside ``path``; it always contains TMP_MARK.

    ``hidden`` starts it with a dot (temp files in the user's own folders).
    """
    prefix = "." if hidden and not path.name.startswith(".") else ""
    return path.with_name(f"{prefix}{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _write_temp(path: Path, data: bytes, mode: int, hidden: bool = False) -> Path:
    """Write ``data`` to a new fsynced temp file beside ``path`` and return its name.

    On any failure (a full disk half-way, Ctrl-C) the temp file is deleted before the error
    propagates, so nothing partial is ever left behind.
    """
    tmp = temp_path_for(path, hidden=hidden)
    fault_point("create", tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            half = len(view) // 2
            if half:  # a checkpoint half-way, so a kill can leave a partly written temp file
                fault_point("write", tmp)
                view = view[os.write(fd, view[:half]):]
            fault_point("write", tmp)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            if _POSIX:
                os.fchmod(fd, mode)  # the umask must not narrow (or widen) the file's mode
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` in the data home: temp file, fsync, rename, fsync the folder.

    The folder is created private when missing; the file gets mode 0600.
    """
    ensure_private_dir(path.parent)
    tmp = None
    try:
        tmp = _write_temp(path, data, FILE_MODE)
        fault_point("rename", path)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise _storage_error(exc, path) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_file(path: Path) -> None:
    """Delete a file if present; a missing file is fine."""
    try:
        if os.path.lexists(path):
            fault_point("unlink", path)
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _storage_error(exc, path) from exc


def is_temp_name(name: str) -> bool:
    """True for names that celebctl's atomic writes use for their temp files."""
    return TMP_MARK in name


def find_temp_files(root: Path) -> list[Path]:
    """Every leftover temp file or folder under ``root``."""
    if not root.exists():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if is_temp_name(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def clean_temp_files(root: Path) -> list[Path]:
    """Delete leftover temp files under ``root``. Call only while holding the writer lock."""
    removed = []
    for path in find_temp_files(root):
        if not os.path.lexists(path):  # inside a temp folder removed a moment ago
            continue
        with contextlib.suppress(OSError, StorageError):
            remove_tree(path)
            removed.append(path)
    return removed


def remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Delete a file or folder tree bottom-up, never following symlinks.

    Unlike ``shutil.rmtree`` it passes a checkpoint before each deletion, so fault tests can
    stop it half-way. Registry folders are flat, so the walk is short.
    """
    try:
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            fault_point("unlink", path)
            path.unlink()
            return
        for dirpath, dirnames, filenames in os.walk(path, topdown=False):
            for name in filenames + [d for d in dirnames
                                     if os.path.islink(os.path.join(dirpath, d))]:
                entry = os.path.join(dirpath, name)
                fault_point("unlink", entry)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
            fault_point("rmdir", dirpath)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(dirpath)
    except OSError as exc:
        if not ignore_errors:
            raise _storage_error(exc, path) from exc


def rename(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst`` (replacing a file there) and flush the folder."""
    try:
        fault_point("rename", dst)
        os.replace(src, dst)
        fsync_dir(dst.parent)
    except OSError as exc:
        raise _storage_error(exc, dst) from exc


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Make ``dst`` the same file as ``src``: a hard link where possible, else a copy.

    Data files are never changed in place (writes replace them), so a hard link is a safe
    snapshot and needs no free space, which matters when the disk is full.
    """
    try:
        try:
            fault_point("link", dst)
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            fault_point("copy", dst)
            shutil.copy2(src, dst)
            os.chmod(dst, FILE_MODE)
    except OSError as exc:
        raise _storage_error(exc, Path(dst)) from exc


def check_writable(path: Path) -> None:
    """Raise StorageError now if ``path`` (a folder) cannot be written: read-only or no access."""
    try:
        fault_point("probe", path)
        if not os.access(path, os.W_OK | os.X_OK):
            read_only = _POSIX and bool(os.statvfs(path).f_flag & os.ST_RDONLY)
            code = errno.EROFS if read_only else errno.EACCES
            raise OSError(code, os.strerror(code), str(path))
    except OSError as exc:
        raise _storage_error(exc, path) from exc


def install_file(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a copy of ``src``: link (or copy) to a temp name, then rename."""
    tmp = temp_path_for(dst)
    try:
        link_or_copy(src, tmp)
        rename(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
