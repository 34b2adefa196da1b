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
    from . import paths

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


USER_FILE_MODE = 0o644


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
        found.append((root, stat.S_IMODE(st.st_mode),
                      DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE))
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
    return _tighten(loose_modes(root, max_depth))


def _tighten(found: list[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    fixed = []
    for path, mode, wanted in found:
        with contextlib.suppress(OSError):
            os.chmod(path, wanted)
            fixed.append((path, mode, wanted))
    return fixed


# What celebctl itself keeps in a data home. Only these (and temp files of its writes) are ever
# tightened or cleaned: CELEBCTL_HOME may point at a folder that also holds the user's own files.
OWN_ENTRIES = ("identities", "bases", "models", "cache", ".lock", HOME_MARKER)


def own_entries(home: Path) -> list[Path]:
    """celebctl's entries in ``home`` (those that exist), plus temp files of its own writes."""
    try:
        names = os.listdir(home)
    except OSError:
        return []
    return [home / name for name in sorted(names) if name in OWN_ENTRIES or is_temp_name(name)]


def home_is_ours(home: Path) -> bool:
    """True when celebctl created the data home folder itself (it holds our marker file)."""
    try:
        return stat.S_ISREG(os.lstat(home / HOME_MARKER).st_mode)
    except OSError:
        return False


def home_loose_modes(home: Path, max_depth: int | None = None) -> list[tuple[Path, int, int]]:
    """(path, mode, wanted mode) for celebctl's own entries in the data home that others can read.

    The home folder itself counts only when celebctl created it. ``max_depth`` counts from the
    home (2: the home, its entries and the entries in those).
    """
    found = []
    if _POSIX and home_is_ours(home):
        with contextlib.suppress(OSError):
            st = home.lstat()
            if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                found.append((home, stat.S_IMODE(st.st_mode), DIR_MODE))
    for entry in own_entries(home):
        found += loose_modes(entry, None if max_depth is None else max(max_depth - 1, 0))
    return sorted(found)


def repair_home_modes(home: Path, deep: bool = True) -> list[tuple[Path, int, int]]:
    """Tighten loose modes of celebctl's own entries in the data home; returns (path, old mode,
    new mode) of each change. Files celebctl did not make are never touched.

    With ``deep`` False only the first two levels are checked (the home, its folders and the
    entries in them: a few milliseconds for a thousand identities), and the whole tree is walked
    only when something loose turns up there.
    """
    if deep:
        return _tighten(home_loose_modes(home))
    fixed = _tighten(home_loose_modes(home, max_depth=2))
    if fixed:
        fixed += _tighten(home_loose_modes(home))
    return fixed


# --------------------------------------------------------------------------------------------
# Reading files that may not be what their name says


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
