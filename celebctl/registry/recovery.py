"""Crash recovery: markers and snapshots of multi-step writes, finished or undone later."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .. import paths
from ..errors import StorageError
from ..storage import atomic
from .listing import _list_cache_path
from .reading import identity_dir, read_toml_quietly
from .schema import IDENTITY_TOML, JOURNAL_SUFFIX, NAME_RE, PENDING_SUFFIX, RENAME_INFIX


def _pending_marker(name: str) -> Path:
    return paths.identities_dir() / f"{name}{atomic.TMP_MARK}{PENDING_SUFFIX}"


def _rename_marker(old: str, new: str) -> Path:
    return paths.identities_dir() / f"{old}{atomic.TMP_MARK}{RENAME_INFIX}{new}"


def _journal_path() -> Path:
    return paths.identities_dir() / f"joint{atomic.TMP_MARK}{os.getpid()}-{JOURNAL_SUFFIX}"


def discard_folder(folder: Path) -> None:
    """Delete an identity folder: rename it away in one step, then its TOML, then the rest.

    Caller holds the writer lock. A crash part-way leaves only a temp-named folder, which the
    next writer deletes.
    """
    if not os.path.lexists(folder):
        return
    if folder.is_symlink():  # only the link itself is ours; what it points to is not
        atomic.remove_file(folder)
        return
    trash = atomic.temp_path_for(folder)
    atomic.rename(folder, trash)
    atomic.remove_file(trash / IDENTITY_TOML)
    atomic.remove_tree(trash, ignore_errors=True)


def _coefficients_sha(folder: Path) -> str | None:
    """sha256 of the coefficients the committed TOML names; None when there is no TOML."""
    if not os.path.lexists(folder / IDENTITY_TOML):
        return None
    meta = read_toml_quietly(folder / IDENTITY_TOML)
    try:
        return str(meta["files"]["coefficients"]["sha256"])  # type: ignore[index]
    except (KeyError, TypeError):
        return "unreadable"


def _prune_unreferenced(folder: Path) -> None:
    """Delete data files the committed TOML no longer points to (old generations, temp files)."""
    meta = read_toml_quietly(folder / IDENTITY_TOML)
    try:
        keep = {entry["path"] for entry in meta["files"].values()}  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        return
    keep.add(IDENTITY_TOML)
    for child in folder.iterdir():
        if child.name not in keep and child.is_file():
            with contextlib.suppress(OSError, StorageError):
                atomic.remove_file(child)


def _snapshot(name: str) -> Path | None:
    """Hard-link an identity's files aside (copies where links fail) so it can be restored."""
    folder = identity_dir(name)
    if not (folder / IDENTITY_TOML).exists():
        return None
    backup = paths.identities_dir() / f"{name}{atomic.TMP_MARK}{os.getpid()}-backup"
    atomic.remove_tree(backup)
    atomic.ensure_private_dir(backup)
    for child in folder.iterdir():
        if child.is_file() and not child.is_symlink() and not atomic.is_temp_name(child.name):
            atomic.link_or_copy(child, backup / child.name)
    return backup


def _restore(name: str, backup: Path | None) -> None:
    """Put an identity back as ``backup`` holds it (None: it did not exist). Idempotent.

    Links need no free space, so this works on a full disk.
    """
    folder = identity_dir(name)
    if backup is None:
        discard_folder(folder)
        return
    # Restore files first, then the TOML (commit point), exactly like a normal write.
    atomic.ensure_private_dir(folder)
    for child in backup.iterdir():
        if child.name != IDENTITY_TOML and not (folder / child.name).exists():
            atomic.link_or_copy(child, folder / child.name)
    atomic.install_file(backup / IDENTITY_TOML, folder / IDENTITY_TOML)
    _prune_unreferenced(folder)


def _remove_backups(backups: dict[str, Path | None]) -> None:
    for backup in backups.values():
        if backup is not None:
            atomic.remove_tree(backup, ignore_errors=True)


def finish_pending_replace(marker: Path) -> None:
    """A replace of that identity may have left new files its TOML never came to name: prune."""
    folder = paths.identities_dir() / marker.name.split(atomic.TMP_MARK)[0]
    if (folder / IDENTITY_TOML).exists():
        _prune_unreferenced(folder)
    atomic.remove_file(marker)


def finish_rename(marker: Path) -> None:
    """Roll an interrupted rename forward: once the new entry is committed, retire the old one."""
    old, _, rest = marker.name.partition(atomic.TMP_MARK)
    new = rest[len(RENAME_INFIX):]
    root = paths.identities_dir()
    if NAME_RE.fullmatch(old) and NAME_RE.fullmatch(new) and old != new:
        new_sha = _coefficients_sha(root / new)
        old_sha = _coefficients_sha(root / old)
        # Retire the old entry only when it is the renamed one (same coefficients) or debris.
        if new_sha not in (None, "unreadable") and old_sha in (new_sha, None):
            discard_folder(root / old)
    atomic.remove_file(marker)


def roll_back_joint(journal: Path) -> None:
    """Put every identity of an interrupted joint write back as it was, from its snapshot."""
    root = paths.identities_dir()
    try:
        plan = json.loads(journal.read_text("utf-8"))
        entries = [(str(name), backup) for name, backup in plan["identities"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        entries = []  # written atomically, so only a hand-made file gets here: nothing to undo
    for name, backup in entries:
        if not NAME_RE.fullmatch(name):
            continue
        if backup is None:
            _restore(name, None)
        elif isinstance(backup, str) and atomic.is_temp_name(backup) and "/" not in backup \
                and (root / backup / IDENTITY_TOML).is_file():
            _restore(name, root / backup)
    atomic.remove_file(journal)


def recover_leftovers() -> list[Path]:
    """Finish or undo what killed writers left behind, then delete their temp files.

    Caller holds the writer lock. Interrupted joint writes are rolled back first (their
    snapshots are temp folders), then renames rolled forward, then replaces pruned. Returns the
    temp files and folders deleted (here and in the list cache's folder, which `list` writes
    without the lock: a temp file it is writing at this moment only costs it its cache update).
    """
    root = paths.identities_dir()
    removed = atomic.clean_temp_files(_list_cache_path().parent)
    if not root.is_dir():
        return removed
    for journal in sorted(root.glob(f"*{atomic.TMP_MARK}*{JOURNAL_SUFFIX}")):
        roll_back_joint(journal)
    for marker in sorted(root.glob(f"*{atomic.TMP_MARK}{RENAME_INFIX}*")):
        finish_rename(marker)
    for marker in sorted(root.glob(f"*{atomic.TMP_MARK}{PENDING_SUFFIX}")):
        finish_pending_replace(marker)
    return removed + atomic.clean_temp_files(root)
