"""The data home's writer lock (filelock): one writer at a time; readers rely on atomic renames."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import RegistryBusy
from .atomic import FILE_MODE, _storage_error, ensure_private_dir
from .faults import fault_point

LOCK_TIMEOUT_S = float(os.environ.get("CELEBCTL_LOCK_TIMEOUT", "60"))


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
