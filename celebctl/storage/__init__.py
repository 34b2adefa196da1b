"""Crash-safe file writes, the writer lock, checksums, file modes; split by concept.

Every file celebctl writes in its data home goes to a unique temp name in the target folder, is
fsynced and then renamed over the final name, so a reader sees the old file or the new one, never
half of one. Every change to the disk first passes a checkpoint that tests use to kill the
process or fail the write at any step (docs/reliability.md).

- :mod:`.faults`: the fault points (``CELEBCTL_FAULT``, ``CELEBCTL_FAULT_TRACE``).
- :mod:`.atomic`: atomic writes, renames, links and removals in the data home; temp names.
- :mod:`.userfiles`: files in the user's own folders (exports, renders).
- :mod:`.special_files`: refusing folders, links, pipes and devices where a file is expected;
  bounded reads of regular files.
- :mod:`.filemodes`: private modes (0700/0600), finding and tightening loose ones; which
  entries of a data home are celebctl's own.
- :mod:`.locking`: the data home's writer lock.
- :mod:`.claims`: per-key claims (an OS file lock that dies with its process): who fits whom.
- :mod:`.checksums`: sha256 of bytes and files.

Callers import the module that names what they use (``from ..storage import atomic``;
``atomic.atomic_write_bytes(...)``); a test that replaces a function replaces it there. The names
are also re-exported here for code written against the single module this package replaced.
"""

from __future__ import annotations

from .atomic import (
    DIR_MODE,
    FILE_MODE,
    HOME_MARKER,
    TMP_MARK,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    clean_temp_files,
    ensure_private_dir,
    find_temp_files,
    fsync_dir,
    install_file,
    is_temp_name,
    link_or_copy,
    remove_file,
    remove_tree,
    rename,
    temp_path_for,
)
from .checksums import sha256_bytes, sha256_file
from .faults import (
    ALLOCATING_KINDS,
    FAULT_ENV,
    FAULT_TRACE_ENV,
    fault_point,
    reset_fault_counter,
)
from .filemodes import (
    OWN_ENTRIES,
    home_is_ours,
    home_loose_modes,
    loose_modes,
    own_entries,
    repair_home_modes,
    repair_modes,
)
from .locking import LOCK_TIMEOUT_S, writer_lock
from .special_files import FileRefused, is_regular_file, read_regular_file, refuse_special_file
from .userfiles import USER_FILE_MODE, write_new_user_file, write_user_file

__all__ = [
    "ALLOCATING_KINDS",
    "DIR_MODE",
    "FAULT_ENV",
    "FAULT_TRACE_ENV",
    "FILE_MODE",
    "HOME_MARKER",
    "LOCK_TIMEOUT_S",
    "OWN_ENTRIES",
    "TMP_MARK",
    "USER_FILE_MODE",
    "FileRefused",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "clean_temp_files",
    "ensure_private_dir",
    "fault_point",
    "find_temp_files",
    "fsync_dir",
    "home_is_ours",
    "home_loose_modes",
    "install_file",
    "is_regular_file",
    "is_temp_name",
    "link_or_copy",
    "loose_modes",
    "own_entries",
    "read_regular_file",
    "refuse_special_file",
    "remove_file",
    "remove_tree",
    "rename",
    "repair_home_modes",
    "repair_modes",
    "reset_fault_counter",
    "sha256_bytes",
    "sha256_file",
    "temp_path_for",
    "write_new_user_file",
    "write_user_file",
    "writer_lock",
]
