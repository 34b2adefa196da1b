"""Where celebctl keeps its data. Resolved at call time so tests and users can redirect it."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CELEBCTL_HOME"


def data_home() -> Path:
    """The data home: ``$CELEBCTL_HOME`` if set, else platformdirs' user data dir."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("celebctl", appauthor=False))


def identities_dir() -> Path:
    """Folder holding one sub-folder per identity."""
    return data_home() / "identities"


def bases_dir() -> Path:
    """Folder holding one sub-folder per basis id."""
    return data_home() / "bases"


def models_dir() -> Path:
    """Folder for models celebctl builds itself (the cached ``tiny`` model)."""
    return data_home() / "models"


def config_path() -> Path:
    """The user's config file (default model, device)."""
    return data_home() / "config.toml"


def lock_path() -> Path:
    """The writer lock shared by every command that changes the data home."""
    return data_home() / ".lock"


def claims_dir() -> Path:
    """Claims of work in progress (who is fitting which person; see storage.claims)."""
    return data_home() / "claims"
