"""Fault points: the checkpoint every change to the disk passes first.

Tests set ``CELEBCTL_FAULT`` to kill the process or make a write fail at the N-th checkpoint,
which walks a command through every state a crash or a full disk can leave (see
docs/reliability.md). Without the variables a checkpoint does nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

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
