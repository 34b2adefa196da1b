"""Crash-safe file writes, the writer lock, checksums and private file modes.

Every file celebctl writes goes to a unique temp name in the target folder, is fsynced and then
renamed over the final name, so a reader sees the old file or the new one, never half of one.
Temp names all contain ``TMP_MARK`` so that a later writer (or ``celebctl doctor --fix``) can find
and delete what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import RegistryBusy, StorageError

TMP_MARK = ".celebctl-tmp-"
DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_TIMEOUT_S = float(os.environ.get("CELEBCTL_LOCK_TIMEOUT", "60"))

_POSIX = os.name == "posix"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a bytes object."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _storage_error(exc: OSError, path: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        why = "the disk is full; free some space and try again"
    elif exc.errno in (errno.EROFS,):
        why = "the file system is read-only; point CELEBCTL_HOME at a writable folder"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; check the folder's owner and modes or set CELEBCTL_HOME"
    else:
        why = exc.strerror or str(exc)
    return StorageError(f"Could not write {path}: {why}. Nothing was changed.")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 where it is created."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        if _POSIX and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, DIR_MODE)
    except OSError as exc:
        raise _storage_error(exc, path) from exc
    return path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entry table so a rename survives power loss (POSIX only)."""
    if not _POSIX:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique temp name beside ``path``; it always contains TMP_MARK."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    ensure_private_dir(path.parent)
    tmp = temp_path_for(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _storage_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_file(path: Path) -> None:
    """Delete a file if present; a missing file is fine."""
    try:
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
    import shutil

    removed = []
    for path in find_temp_files(root):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def writer_lock(lock_file: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the data home's writer lock; other writers wait up to ``timeout`` seconds."""
    import filelock

    ensure_private_dir(lock_file.parent)
    lock = filelock.FileLock(str(lock_file), timeout=LOCK_TIMEOUT_S if timeout is None else timeout,
                             mode=FILE_MODE)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise RegistryBusy(
            f"Another celebctl process is changing the registry (lock {lock_file}). "
            "Wait for it to finish and try again."
        ) from exc
    except OSError as exc:
        raise _storage_error(exc, lock_file) from exc
    try:
        yield
    finally:
        lock.release()


def loose_modes(root: Path) -> list[tuple[Path, int, int]]:
    """(path, current mode, wanted mode) for every entry under ``root`` readable by others."""
    if not _POSIX or not root.exists():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        entries = [(Path(dirpath), DIR_MODE)] if dirpath == str(root) else []
        entries += [(Path(dirpath) / d, DIR_MODE) for d in dirnames]
        entries += [(Path(dirpath) / f, FILE_MODE) for f in filenames]
        for path, wanted in entries:
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                found.append((path, mode, wanted))
    return found


def repair_modes(root: Path) -> list[tuple[Path, int, int]]:
    """Tighten modes under ``root`` to 0700/0600; returns what was changed."""
    fixed = []
    for path, mode, wanted in loose_modes(root):
        with contextlib.suppress(OSError):
            os.chmod(path, wanted)
            fixed.append((path, mode, wanted))
    return fixed


