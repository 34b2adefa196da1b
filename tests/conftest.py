"""Shared fixtures: every test gets its own empty data home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# huggingface_hub reads these once, at import: set them before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

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


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory) -> Path:
    """A data home with the tiny model and its basis built once per test session."""
    import os

    template = tmp_path_factory.mktemp("tiny-template")
    old = os.environ.get("CELEBCTL_HOME")
    os.environ["CELEBCTL_HOME"] = str(template)
    try:
        from celebctl import basis

        basis.ensure_basis("tiny")
    finally:
        if old is None:
            os.environ.pop("CELEBCTL_HOME", None)
        else:
            os.environ["CELEBCTL_HOME"] = old
    return template


@pytest.fixture
def tiny_home(celebctl_home, _tiny_template) -> Path:
    """The test's data home, pre-filled with the cached tiny model and its basis."""
    import shutil

    celebctl_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    for part in ("models", "bases"):
        if (_tiny_template / part).exists():
            shutil.copytree(_tiny_template / part, celebctl_home / part, dirs_exist_ok=True)
    return celebctl_home


@pytest.fixture(scope="session")
def fitted(request) -> Path:
    """A data home with the tiny model, its basis and alice + bob fitted (3 steps), once."""
    from tests.helpers import fitted_template

    return fitted_template(request)


@pytest.fixture(scope="module")
def components(fitted):
    """The tiny model's parts on the CPU in fp32, loaded once per test module (from ``fitted``)."""
    from celebctl import models
    from tests.helpers import data_home

    with data_home(fitted):
        return models.load_pipeline_components("tiny", "cpu", "fp32")


@pytest.fixture
def home(tiny_home, fitted) -> Path:
    """The test's data home with alice and bob registered (copied from ``fitted``)."""
    import shutil

    shutil.copytree(fitted / "identities", tiny_home / "identities", dirs_exist_ok=True)
    return tiny_home



@pytest.fixture
def built(monkeypatch) -> list[str]:
    """The class names of torch modules constructed while the test runs (checks that a command
    refused its input before building any model)."""
    import torch

    seen: list[str] = []
    original = torch.nn.Module.__init__

    def spy(self, *args, **kwargs):
        seen.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", spy)
    return seen


@pytest.fixture
def no_models(built) -> list[str]:
    """The same list, under the name the rendering tests use."""
    return built
