"""The importable API: everything the CLI does is reachable from `import celebctl`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import celebctl


def test_every_export_resolves():
    for name in celebctl.__all__:
        assert getattr(celebctl, name) is not None
    with pytest.raises(AttributeError):
        celebctl.no_such_thing  # noqa: B018


def test_import_is_light():
    code = "import sys, celebctl; celebctl.list_identities; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=900)
    assert result.stdout.strip() == "False"
