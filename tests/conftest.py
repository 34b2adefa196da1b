"""Shared fixtures: every test gets its own empty data home."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def celebctl_home(tmp_path, monkeypatch) -> Path:
    """Point CELEBCTL_HOME at a fresh temp folder; nothing touches the user's real data."""
    home = tmp_path / "celebctl-home"
    monkeypatch.setenv("CELEBCTL_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("CELEBCTL_DEBUG", raising=False)
    return home


@pytest.fixture(scope="session")
def photo_path() -> Path:
    """The public-domain NASA astronaut portrait (one face)."""
    return DATA / "astronaut.png"
