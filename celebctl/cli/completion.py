"""Shell completion: identity names, basis ids and built-in model names.

Completion runs on every Tab press, so these functions read folder names only: no TOML, no
checksums, and nothing that imports torch.
"""

from __future__ import annotations

import os
import re

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_BASIS = re.compile(r"[0-9a-f]{16}")


def _folder_names(root: os.PathLike[str] | str, pattern: re.Pattern[str]) -> list[str]:
    try:
        with os.scandir(root) as entries:
            return sorted(e.name for e in entries
                          if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def identity_names(incomplete: str) -> list[str]:
    """Registered identity names that start with ``incomplete``."""
    from .. import paths

    try:
        root = paths.identities_dir()
    except Exception:  # noqa: BLE001 - a broken CELEBCTL_HOME completes nothing
        return []
    return [n for n in _folder_names(root, _NAME)
            if n.startswith(incomplete.lower()) and os.path.isfile(os.path.join(root, n,
                                                                                 "identity.toml"))]


def basis_ids(incomplete: str) -> list[str]:
    """Basis ids on disk that start with ``incomplete``."""
    from .. import paths

    try:
        root = paths.bases_dir()
    except Exception:  # noqa: BLE001
        return []
    return [b for b in _folder_names(root, _BASIS) if b.startswith(incomplete.lower())]


def model_names(incomplete: str) -> list[str]:
    """The built-in models and the default hub model that start with ``incomplete``."""
    from ..models.specs import BUILTIN_FAMILIES, DEFAULT_MODEL

    return [m for m in (*BUILTIN_FAMILIES, DEFAULT_MODEL) if m.startswith(incomplete)]
