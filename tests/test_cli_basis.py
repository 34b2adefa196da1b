"""`celebctl basis ...` through Typer's CliRunner."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from celebctl import basis, paths
from celebctl.cli import app

runner = CliRunner()


def _build() -> str:
    result = runner.invoke(app, ["basis", "build", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture
def tiny_id(tiny_home) -> str:
    """Id of the tiny basis already in the data home (built once per session)."""
    (info,) = basis.list_bases()
    return info.id


def test_help_lists_commands():
    result = runner.invoke(app, ["basis", "--help"])
    assert result.exit_code == 0
    for command in ("build", "fetch", "list", "show", "remove"):
        assert command in result.output


def test_build_then_noop():
    basis_id = _build()
    assert len(basis_id) == 16 and (paths.bases_dir() / basis_id / "basis.toml").is_file()
    result = runner.invoke(app, ["basis", "build", "--model", "tiny"])
    assert result.exit_code == 0 and result.stdout.strip() == basis_id
    assert "already exists (use --force to rebuild)" in result.stderr
    result = runner.invoke(app, ["basis", "build", "--model", "tiny", "--force", "--json"])
    data = json.loads(result.stdout)
    assert data["existed"] is False and data["id"] == basis_id
    assert data["unique_rows"] == [409, 542] and data["components"] == 32


def test_build_json_and_names(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("Tom Hanks\nAdam Sandler\nEmma Stone\nBrad Pitt\n")
    result = runner.invoke(app, ["basis", "build", "-m", "tiny", "--names", str(names),
                                 "--components", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["existed"] is False and data["num_names"] == 4 and data["components"] == 2


def test_build_errors():
    result = runner.invoke(app, ["basis", "build", "--model", "./missing-model"])
    assert result.exit_code == 1
    assert "Error: Model path ./missing-model does not exist" in result.stderr
    result = runner.invoke(app, ["basis", "build", "--model", "tiny", "--names", "nope.txt"])
    assert result.exit_code == 1 and "Names file nope.txt does not exist" in result.stderr
    result = runner.invoke(app, ["basis", "build", "--model", "tiny", "--components", "0"])
    assert result.exit_code == 2
    assert not paths.bases_dir().exists() or not any(paths.bases_dir().iterdir())


def test_list_empty():
    result = runner.invoke(app, ["basis", "list"])
    assert result.exit_code == 0 and "No bases yet" in result.output
    data = json.loads(runner.invoke(app, ["basis", "list", "--json"]).stdout)
    assert data == {"bases": [], "warnings": []}


def test_list_and_show(tiny_id):
    basis_id = tiny_id
    result = runner.invoke(app, ["basis", "list"])
    assert result.exit_code == 0 and basis_id in result.stdout and "tiny" in result.stdout
    data = json.loads(runner.invoke(app, ["basis", "list", "--json"]).stdout)
    assert [b["id"] for b in data["bases"]] == [basis_id] and data["warnings"] == []
    result = runner.invoke(app, ["basis", "show", basis_id[:6]])
    assert result.exit_code == 0
    assert "cumulative explained variance" in result.stdout
    assert "position 1 (rank 32): 10:" in result.stdout
    data = json.loads(runner.invoke(app, ["basis", "show", basis_id, "--json"]).stdout)
    assert data["id"] == basis_id and len(data["explained_variance_ratio"][0]) == 32
    assert set(data["explained_variance_cumulative"]) == {"10", "50", "100", "all"}


def test_list_warns_about_broken_entries(tiny_id):
    basis_id = tiny_id
    (paths.bases_dir() / "0123456789abcdef").mkdir()
    result = runner.invoke(app, ["basis", "list"])
    assert result.exit_code == 0 and basis_id in result.stdout
    assert "Warning:" in result.stderr and "0123456789abcdef" in result.stderr


def test_show_unknown(tiny_id):
    basis_id = tiny_id
    wrong = basis_id[:-1] + ("0" if basis_id[-1] != "0" else "1")
    result = runner.invoke(app, ["basis", "show", wrong])
    assert result.exit_code == 1
    assert f"Error: No basis '{wrong}'. Did you mean '{basis_id}'?" in result.stderr


def test_remove_confirms_and_refuses_in_use(tiny_id):
    basis_id = tiny_id
    result = runner.invoke(app, ["basis", "remove", basis_id], input="n\n")
    assert result.exit_code == 1 and (paths.bases_dir() / basis_id).exists()
    alice = paths.identities_dir() / "alice"
    alice.mkdir(parents=True)
    (alice / "identity.toml").write_text(f'schema_version = 1\nbasis_id = "{basis_id}"\n')
    result = runner.invoke(app, ["basis", "remove", basis_id, "--yes"])
    assert result.exit_code == 1
    assert f"Error: Basis {basis_id} is used by 1 identity: alice." in result.stderr
    result = runner.invoke(app, ["basis", "remove", basis_id], input="y\n")
    assert result.exit_code == 1 and (paths.bases_dir() / basis_id).exists()
    result = runner.invoke(app, ["basis", "remove", basis_id, "--yes", "--force"])
    assert result.exit_code == 0 and f"Removed basis {basis_id}." in result.stderr
    assert not (paths.bases_dir() / basis_id).exists()


def test_fetch(tmp_path, tiny_id):
    basis_id = tiny_id
    info = basis.get_basis_info(basis_id)
    shared = tmp_path / "shared"
    shutil.copytree(paths.bases_dir() / basis_id, shared)
    assert runner.invoke(app, ["basis", "remove", basis_id, "--yes"]).exit_code == 0
    result = runner.invoke(app, ["basis", "fetch", str(shared), "--sha256", "f" * 64])
    assert result.exit_code == 1 and "Checksum mismatch" in result.stderr
    assert not (paths.bases_dir() / basis_id).exists()
    result = runner.invoke(app, ["basis", "fetch", str(shared), "--sha256",
                                 info.tensors_sha256])
    assert result.exit_code == 0 and result.stdout.strip() == basis_id
    assert "Registered basis for tiny." in result.stderr
    data = json.loads(runner.invoke(app, ["basis", "fetch", str(shared), "--json"]).stdout)
    assert data["existed"] is True and data["id"] == basis_id
