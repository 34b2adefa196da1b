"""What this process changed in the registry, so a Ctrl-C report says what is on disk."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..storage import checksums, special_files
from .reading import identity_dir
from .schema import IDENTITY_TOML, MAX_TOML_BYTES

# Registry changes this process set out to make, each with a check of whether it is on disk
# now. After Ctrl-C the CLI reports the ones that took effect instead of guessing.
_CHANGES: list[tuple[str, Any]] = []


def change_mark() -> int:
    """A position in this process's change log (see :func:`changes_since`)."""
    return len(_CHANGES)


def changes_since(mark: int) -> list[str]:
    """What this process changed in the registry since ``mark`` that is committed on disk,
    described in words ("identity 'alice' was written in full")."""
    done = []
    for what, is_done in _CHANGES[mark:]:
        with contextlib.suppress(Exception):
            if is_done() and what not in done:
                done.append(what)
    return done


def _toml_sha(path: Path) -> str | None:
    try:
        return checksums.sha256_bytes(special_files.read_regular_file(path, MAX_TOML_BYTES,
                                                              follow_symlinks=False))
    except (OSError, ValueError):
        return None


def _expect_toml(what: str, name: str, sha: str, journal: Path | None = None) -> None:
    """Log a change that is committed once identities/<name>/identity.toml has sha ``sha`` (and,
    for a joint write, once its journal is gone)."""
    def is_done() -> bool:
        return _toml_sha(identity_dir(name) / IDENTITY_TOML) == sha and not (
            journal is not None and os.path.lexists(journal))

    _CHANGES.append((what, is_done))
