"""Crash-safe file writes, the writer lock, checksums and private file modes.

Every file celebctl writes goes to a unique temp name in the target folder, is fsynced and then
renamed over the final name, so a reader sees the old file or the new one, never half of one.
Temp names all contain ``TMP_MARK`` so that a later writer (or ``celebctl doctor --fix``) can find
and delete what a killed process left behind.

Every change to the disk goes through a helper here that first passes a checkpoint
(:func:`fault_point`). Tests set ``CELEBCTL_FAULT`` to kill the process or make a write fail at
the N-th checkpoint, which walks a command through every state a crash or a full disk can leave.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import RegistryBusy, StorageError

TMP_MARK = ".celebctl-tmp-"
DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_TIMEOUT_S = float(os.environ.get("CELEBCTL_LOCK_TIMEOUT", "60"))

_POSIX = os.name == "posix"

# Fault injection, for tests only (see docs/reliability.md). CELEBCTL_FAULT is one of
#   kill@N      SIGKILL this process at the N-th checkpoint
#   ENOSPC@N    the N-th checkpoint that allocates space, and every later one, fails: disk full
#   EROFS@N     the N-th checkpoint, and every later one, fails: the data home is read-only
#   wait@N:PATH at the N-th checkpoint, wait (up to 2 minutes) until PATH exists; tests use it
#               to put two processes' steps in a chosen order
# CELEBCTL_FAULT_TRACE names a file that gets one line per checkpoint: "N kind path".
FAULT_ENV = "CELEBCTL_FAULT"
FAULT_TRACE_ENV = "CELEBCTL_FAULT_TRACE"
# Checkpoint kinds that need free space; unlink, rename, link and rmdir do not.
ALLOCATING_KINDS = frozenset({"create", "write", "mkdir", "copy"})
_fault_counts = {"all": 0, "allocating": 0}


def reset_fault_counter() -> None:
    """Start counting checkpoints from zero again (a test that forks uses this in the child)."""
    _fault_counts["all"] = _fault_counts["allocating"] = 0


def fault_point(kind: str, path: Path | str) -> None:
    """A checkpoint just before a change to the disk; a no-op unless CELEBCTL_FAULT(_TRACE) is set.

    Raises OSError (ENOSPC or EROFS) or kills the process when the fault spec says so.
    """
    spec = os.environ.get(FAULT_ENV)
    trace = os.environ.get(FAULT_TRACE_ENV)
    if not spec and not trace:
        return
    _fault_counts["all"] += 1
    count = _fault_counts["all"]
    if kind in ALLOCATING_KINDS:
        _fault_counts["allocating"] += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(f"{count} {kind} {path}\n")
            handle.flush()
            os.fsync(handle.fileno())
    if not spec:
        return
    action, _, where = spec.partition("@")
    at, _, arg = where.partition(":")
    try:
        target = int(at)
    except ValueError:
        return
    if action == "kill" and count == target:
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "wait" and count == target:
        deadline = time.monotonic() + 120
        while arg and not os.path.exists(arg) and time.monotonic() < deadline:
            time.sleep(0.02)
    elif action == "ENOSPC" and kind in ALLOCATING_KINDS and _fault_counts["allocating"] >= target:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    elif action == "EROFS" and count >= target:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


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
        if not path.is_dir():
            fault_point("mkdir", path)
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
        fault_point("create", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
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
        finally:
            os.close(fd)
        fault_point("rename", path)
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


@contextlib.contextmanager
def writer_lock(lock_file: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the data home's writer lock; other writers wait up to ``timeout`` seconds."""
    import filelock

    ensure_private_dir(lock_file.parent)
    lock = filelock.FileLock(str(lock_file), timeout=LOCK_TIMEOUT_S if timeout is None else timeout,
                             mode=FILE_MODE)
    try:
        fault_point("lock", lock_file)
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


def loose_modes(root: Path, max_depth: int | None = None) -> list[tuple[Path, int, int]]:
    """(path, current mode, wanted mode) for every entry under ``root`` readable by others.

    ``max_depth`` limits the walk (1: ``root`` and its entries; 2: one level further), which
    keeps the check cheap enough to run before every command. Symlinks are never followed.
    """
    if not _POSIX:
        return []
    try:
        st = root.lstat()
    except OSError:
        return []
    found = []
    if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
        found.append((root, stat.S_IMODE(st.st_mode), DIR_MODE))
    if not stat.S_ISDIR(st.st_mode):
        return found
    stack = [(str(root), 1)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                found.append((Path(entry.path), mode, DIR_MODE if is_dir else FILE_MODE))
            if is_dir and (max_depth is None or depth < max_depth):
                stack.append((entry.path, depth + 1))
    return sorted(found)


def repair_modes(root: Path, max_depth: int | None = None) -> list[tuple[Path, int, int]]:
    """Tighten modes under ``root`` to 0700/0600; returns what was changed."""
    fixed = []
    for path, mode, wanted in loose_modes(root, max_depth):
        with contextlib.suppress(OSError):
            os.chmod(path, wanted)
            fixed.append((path, mode, wanted))
    return fixed


def repair_home_modes(home: Path, deep: bool = True) -> list[tuple[Path, int, int]]:
    """Tighten loose modes in the data home; returns (path, old mode, new mode) of each change.

    With ``deep`` False only the first two levels are checked (the home, its folders and the
    entries in them: a few milliseconds for a thousand identities), and the whole tree is walked
    only when something loose turns up there.
    """
    if deep:
        return repair_modes(home)
    fixed = repair_modes(home, max_depth=2)
    if fixed:
        fixed += repair_modes(home)
    return fixed


