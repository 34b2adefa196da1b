"""A bundle works on a fresh machine (issue 24, point 11): it carries its basis when asked
(`export --with-basis`), the carried basis is verified before anything is written, and a basis
that is absent is built from the identity's model on first use; doctor says so once."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from typer.testing import CliRunner

from celebctl import basis, paths, registry
from celebctl.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def fresh_home(tmp_path: Path, monkeypatch, name: str = "fresh") -> Path:
    home = tmp_path / name
    monkeypatch.setenv("CELEBCTL_HOME", str(home))
    return home


def rewrite(bundle: Path, change) -> Path:
    """A copy of ``bundle`` with its members passed through ``change(members)``."""
    with zipfile.ZipFile(bundle) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    out = bundle.with_name("changed-" + bundle.name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    out.write_bytes(buffer.getvalue())
    return out


def test_a_bundle_with_its_basis_renders_on_a_fresh_machine(home, tmp_path, monkeypatch,
                                                             built):
    ident = registry.get_identity("alice")
    original = basis.get_basis_info(ident.basis_id).path
    bundle = tmp_path / "alice.celeb"
    result = invoke("export", "alice", "-o", bundle, "--with-basis")
    assert result.exit_code == 0, result.output
    refused = invoke("export", "alice", "-f", "a1111", "-o", tmp_path / "a.safetensors",
                     "--with-basis")
    assert refused.exit_code == 2 and "--with-basis is for .celeb bundles" in refused.stderr

    fresh_home(tmp_path, monkeypatch)
    result = invoke("import", bundle)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert f"Basis {ident.basis_id} came with the bundle and is now registered" in text
    assert "not on this machine" not in text
    copied = paths.bases_dir() / ident.basis_id
    for name in (basis.TENSORS_FILE,):
        assert (copied / name).read_bytes() == (original / name).read_bytes()
    built.clear()
    dry = invoke("render", "alice riding a bike", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert built == []  # the carried basis is used; nothing was built
    assert invoke("doctor").exit_code == 0
    again = invoke("import", bundle, "--force")  # the basis is there now: no second note
    assert again.exit_code == 0 and "came with the bundle" not in again.stderr


def test_a_carried_basis_is_checked_before_anything_is_written(home, tmp_path, monkeypatch):
    bundle = tmp_path / "alice.celeb"
    assert invoke("export", "alice", "-o", bundle, "--with-basis").exit_code == 0
    basis_id = registry.get_identity("alice").basis_id

    def other_id(members):
        members["basis.toml"] = members["basis.toml"].replace(basis_id.encode(), b"0" * 16)

    def damaged(members):
        data = bytearray(members["basis.safetensors"])
        data[-1] ^= 0xFF
        members["basis.safetensors"] = bytes(data)

    def half(members):
        del members["basis.safetensors"]

    cases = {other_id: "does not match its content hashes", damaged: "does not match the checksum",
             half: "without its companion"}
    fresh_home(tmp_path, monkeypatch)
    for change, phrase in cases.items():
        result = invoke("import", rewrite(bundle, change))
        assert result.exit_code == 1, result.output
        assert phrase in " ".join(result.stderr.split()), result.stderr
        assert not paths.bases_dir().exists() or not list(paths.bases_dir().iterdir())
        assert registry.list_identities().identities == []


def test_an_absent_basis_is_built_from_the_model_on_first_use(home, tmp_path, monkeypatch):
    basis_id = registry.get_identity("alice").basis_id
    bundles = [tmp_path / "alice.celeb", tmp_path / "bob.celeb"]
    for name, bundle in zip(("alice", "bob"), bundles, strict=True):
        assert invoke("export", name, "-o", bundle).exit_code == 0
    fresh_home(tmp_path, monkeypatch)
    result = invoke("import", *bundles)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert text.count(f"Basis {basis_id} is not on this machine yet") == 1  # said once
    assert "the first render builds it from 'tiny'" in text
    doctor = invoke("doctor", "--json")
    assert doctor.exit_code == 0, doctor.output  # a note, not a failure
    report = json.loads(doctor.stdout)
    assert report["healthy"] and report["problems"] == []
    assert len(report["notes"]) == 1 and "('alice', 'bob')" in report["notes"][0]
    dry = invoke("render", "alice with bob", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert basis.get_basis_info(basis_id).id == basis_id  # built here, the same id
    assert json.loads(invoke("doctor", "--json").stdout)["notes"] == []


def test_a_basis_that_cannot_be_built_here_says_how_to_get_it(home, tmp_path, monkeypatch):
    bundle = tmp_path / "alice.celeb"
    assert invoke("export", "alice", "-o", bundle).exit_code == 0

    def elsewhere(members):
        members["identity.toml"] = members["identity.toml"].replace(
            b'model = "tiny"', b'model = "/nowhere/model"')

    fresh_home(tmp_path, monkeypatch)
    assert invoke("import", rewrite(bundle, elsewhere)).exit_code == 0
    result = invoke("render", "alice", "--dry-run", "--model", "tiny")
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert "is not on this machine" in message and "--with-basis" in message
    assert "Traceback" not in result.output
