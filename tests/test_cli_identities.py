"""Registry commands through the CLI: output, exit codes, files written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from celebctl import __version__, paths, registry
from celebctl.cli import app
from tests.helpers import add_identity

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"celebctl {__version__}"
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("list", "show", "remove", "rename", "path", "export", "import"):
        assert command in result.output


def test_path(celebctl_home):
    result = invoke("path")
    assert result.exit_code == 0 and result.output.strip() == str(celebctl_home)


def test_list_empty_and_json():
    result = invoke("list")
    assert result.exit_code == 0 and "No identities yet" in result.output
    add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    result = invoke("list", "--json")
    data = json.loads(result.stdout)
    assert [i["name"] for i in data["identities"]] == ["alice", "bob"]
    assert data["warnings"] == []
    assert data["identities"][0]["components"] == 32


def test_list_warns_on_broken_entry():
    add_identity("alice")
    add_identity("bob")
    (paths.identities_dir() / "bob" / "identity.toml").write_text("[[[")
    result = invoke("list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [i["name"] for i in data["identities"]] == ["alice"]
    assert "Skipping 'bob'" in result.stderr


def test_show_and_unknown_name():
    add_identity("alice")
    result = invoke("show", "alice", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["name"] == "alice" and data["components"] == 32
    result = invoke("show", "alise")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: No identity 'alise'. Did you mean 'alice'? See `celebctl list`."
    )
    assert "Traceback" not in result.output


def test_show_explains_broken_entry():
    add_identity("alice")
    toml_path = paths.identities_dir() / "alice" / "identity.toml"
    toml_path.write_text(toml_path.read_text().replace('model = "tiny"', "model = 3"))
    result = invoke("show", "alice")
    assert result.exit_code == 1
    assert "'model' should be str, found int" in result.stderr


def test_remove_asks_and_dry_run():
    add_identity("alice")
    folder = registry.identity_dir("alice")
    result = invoke("remove", "alice", "--dry-run")
    assert result.exit_code == 0 and "Would delete" in result.output and folder.exists()
    result = invoke("remove", "alice", input="n\n")
    assert result.exit_code == 1 and folder.exists()
    assert "Nothing deleted" in result.stderr
    result = invoke("remove", "alice", input="y\n")
    assert result.exit_code == 0 and not folder.exists()
    add_identity("bob")
    result = invoke("remove", "bob", "--yes")
    assert result.exit_code == 0 and "Removed 'bob'" in result.output
    result = invoke("remove", "bob", "--yes")
    assert result.exit_code == 1 and "No identity 'bob'" in result.stderr


def test_rename():
    add_identity("alice")
    result = invoke("rename", "alice", "carol")
    assert result.exit_code == 0 and "Renamed 'alice' to 'carol'" in result.output
    assert registry.identity_exists("carol") and not registry.identity_exists("alice")
    result = invoke("rename", "carol", "The")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: Invalid name 'The': use lowercase, e.g. 'the'."


def test_export_import_round_trip(tmp_path):
    add_identity("alice", seed=4)
    bundle = tmp_path / "alice.celeb"
    result = invoke("export", "alice", "-o", str(bundle))
    assert result.exit_code == 0 and bundle.exists()
    result = invoke("import", str(bundle))
    assert result.exit_code == 1 and "already exists" in result.stderr
    result = invoke("import", str(bundle), "--as", "alice2", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["name"] == "alice2"
    result = invoke("import", str(bundle), "--force")
    assert result.exit_code == 0
    result = invoke("export", "alice", "-o", str(bundle))
    assert result.exit_code == 1 and "already exists" in result.stderr
    result = invoke("export", "alice", "-o", str(bundle), "--force", "--no-face")
    assert result.exit_code == 0


def test_import_garbage_is_clean_error(tmp_path):
    path = tmp_path / "x.celeb"
    path.write_text("not a zip")
    result = invoke("import", str(path))
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: This is not a celebctl bundle (not a zip file)."
    result = invoke("import", str(tmp_path / "missing.celeb"))
    assert result.exit_code == 1 and "No such file" in result.stderr


def test_usage_error_exit_code():
    result = invoke("show")
    assert result.exit_code == 2
    result = invoke("frobnicate")
    assert result.exit_code == 2


def test_debug_shows_traceback(monkeypatch):
    monkeypatch.setenv("CELEBCTL_DEBUG", "1")
    result = invoke("show", "nobody")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "IdentityNotFound"


def _run(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "celebctl", *args], capture_output=True,
                          text=True, env=full_env, timeout=900)


def test_entry_point_subprocess(celebctl_home):
    add_identity("alice")
    result = _run("list", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["identities"][0]["name"] == "alice"
    result = _run("show", "alise")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: No identity 'alise'. Did you mean 'alice'?")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["list", "--json"], ["show", "alice", "--json"]])
def test_list_and_show_do_not_import_heavy_libraries(command, celebctl_home):
    add_identity("alice")
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['celebctl', {', '.join(repr(c) for c in command)}]\n"
        "try:\n    runpy.run_module('celebctl', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'facenet_pytorch') "
        "if m in sys.modules]\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=900, env=dict(os.environ))
    assert "HEAVY=\n" in result.stderr, result.stderr
    assert '"alice"' in result.stdout
