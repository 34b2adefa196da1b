"""File modes: finding and tightening entries other users can read (0700 folders, 0600 files),
and which entries of a data home are celebctl's own (only those are ever tightened)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .atomic import _POSIX, DIR_MODE, FILE_MODE, HOME_MARKER, is_temp_name


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
OWN_ENTRIES = ("identities", "bases", "models", "cache", "claims", ".lock", HOME_MARKER)


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
