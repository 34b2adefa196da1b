"""`celebctl doctor [--fix] [--json]`: every check, what --fix does, and what it never does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import doctor, paths, registry
from celebctl.cli import app
from celebctl.storage import atomic, filemodes, locking
from tests.helpers import add_identity, make_write

runner = CliRunner()
TMP = atomic.TMP_MARK


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def problems_json(*extra) -> tuple[int, dict]:
    result = invoke("doctor", "--json", *extra)
    return result.exit_code, json.loads(result.stdout)


def kinds(report: dict, key: str = "problems") -> list[tuple[str, str]]:
    home = paths.data_home()
    return sorted((p["kind"], str(Path(p["path"]).relative_to(home))) for p in report[key])


@pytest.fixture
def two(tiny_home):
    """alice and bob on the real tiny basis, so nothing but the damage below is reported."""
    from celebctl import basis

    info = basis.list_bases()[0]
    for seed, name in enumerate(("alice", "bob"), start=1):
        add_identity(name, seed=seed, p=info.components, basis_id=info.id)
    return tiny_home


def coefficients(name: str):
    return registry.get_identity(name).load_coefficients()


def test_empty_and_healthy_homes(two):
    result = invoke("doctor")
    assert result.exit_code == 0 and "The data home is healthy" in result.stdout
    code, report = problems_json()
    assert code == 0 and report["healthy"] and report["problems"] == []
    assert invoke("doctor", "--fix").exit_code == 0


def test_missing_home_is_healthy(celebctl_home):
    assert not celebctl_home.exists()
    assert invoke("doctor").exit_code == 0
    assert not celebctl_home.exists()  # checking writes nothing


def test_modes_are_reported_and_fixed(two):
    ident = registry.get_identity("alice")
    loose_file = ident.file_path("face")
    loose_file.chmod(0o644)
    ident.path.chmod(0o755)
    code, report = problems_json()
    assert code == 1
    assert kinds(report) == [("mode", "identities/alice"),
                             ("mode", str(loose_file.relative_to(two)))]
    assert {p["fix"] for p in report["problems"]} == {"chmod 0600", "chmod 0700"}
    result = invoke("doctor", "--fix")
    assert result.exit_code == 0 and "Fixed 2 problems" in result.stdout
    assert loose_file.stat().st_mode & 0o777 == 0o600
    assert ident.path.stat().st_mode & 0o777 == 0o700


def test_temp_files_anywhere_are_deleted(two):
    ids = paths.identities_dir()
    leftovers = [
        ids / f"carol{TMP}123-new",  # a staging folder, with content
        ids / "alice" / f"identity.toml{TMP}123-abcd",
        paths.bases_dir() / f"x{TMP}1-2",
        paths.data_home() / "cache" / f"list-index.json{TMP}9-9",
        paths.models_dir() / f"tiny-v1{TMP}5-5",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / f"coefficients.safetensors{TMP}1-1").write_bytes(b"x")
    for path in leftovers[1:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    filemodes.repair_modes(two)
    code, report = problems_json()
    assert code == 1
    assert kinds(report) == sorted(("temp", str(p.relative_to(two))) for p in leftovers)
    assert invoke("doctor", "--fix").exit_code == 0
    assert atomic.find_temp_files(two) == []
    assert [i.name for i in registry.list_identities().identities] == ["alice", "bob"]


def test_interrupted_replace_is_pruned(two):
    folder = registry.identity_dir("alice")
    orphan = folder / "coefficients-0123456789ab.safetensors"
    orphan.write_bytes(b"new generation, never committed")
    orphan.chmod(0o600)
    marker = paths.identities_dir() / f"alice{TMP}{registry.PENDING_SUFFIX}"
    marker.write_bytes(b"")
    marker.chmod(0o600)
    code, report = problems_json()
    assert kinds(report) == [("interrupted-replace", marker.name and f"identities/{marker.name}"),
                             ("unreferenced", f"identities/alice/{orphan.name}")]
    before = coefficients("alice")
    assert invoke("doctor", "--fix").exit_code == 0
    assert not orphan.exists() and not marker.exists()
    np.testing.assert_array_equal(coefficients("alice"), before)


def test_interrupted_rename_is_rolled_forward(two):
    ids = paths.identities_dir()
    shutil.copytree(ids / "bob", ids / "carol")  # the new entry was committed ...
    toml = ids / "carol" / registry.IDENTITY_TOML
    toml.write_text(toml.read_text().replace('name = "bob"', 'name = "carol"'))
    marker = ids / f"bob{TMP}{registry.RENAME_INFIX}carol"  # ... the old one not yet retired
    marker.write_bytes(b"")
    filemodes.repair_modes(two)
    code, report = problems_json()
    assert code == 1 and kinds(report) == [("interrupted-rename", f"identities/{marker.name}")]
    # Until it is fixed, both names list (nothing is lost) ...
    assert [i.name for i in registry.list_identities().identities] == ["alice", "bob", "carol"]
    before = coefficients("bob")
    assert invoke("doctor", "--fix").exit_code == 0
    # ... afterwards only the new one.
    assert [i.name for i in registry.list_identities().identities] == ["alice", "carol"]
    np.testing.assert_array_equal(coefficients("carol"), before)


def test_rename_marker_never_retires_a_different_identity(two):
    marker = paths.identities_dir() / f"alice{TMP}{registry.RENAME_INFIX}bob"
    marker.write_bytes(b"")  # alice and bob differ: this marker is stale, not a half rename
    assert invoke("doctor", "--fix").exit_code == 0
    assert [i.name for i in registry.list_identities().identities] == ["alice", "bob"]


def test_interrupted_joint_is_rolled_back(two):
    before = {n: coefficients(n) for n in ("alice", "bob")}
    # What a `joint` killed after committing alice, before bob, leaves behind.
    backups = {n: registry._snapshot(n) for n in ("alice", "bob")}
    journal = registry._journal_path()
    atomic.atomic_write_text(journal, json.dumps(
        {"identities": {n: b.name for n, b in backups.items()}}))
    with locking.writer_lock(paths.lock_path()):  # the lock without the sweep of write_lock
        registry._commit_identity(make_write("alice", seed=50, basis_id=registry.get_identity(
            "alice").basis_id), replace=True)
    assert not np.array_equal(coefficients("alice"), before["alice"])
    scan = registry.list_identities()
    assert any("`joint` refit is being written or was interrupted" in w for w in scan.warnings)
    code, report = problems_json()
    assert ("interrupted-joint", f"identities/{journal.name}") in kinds(report)
    result = invoke("doctor", "--fix")
    assert result.exit_code == 0, result.output
    for name in ("alice", "bob"):
        np.testing.assert_array_equal(coefficients(name), before[name])
    assert atomic.find_temp_files(two) == []


def test_uncommitted_folder_is_deleted(two):
    debris = paths.identities_dir() / "carol"
    debris.mkdir(mode=0o700)
    (debris / "face-0123456789ab.png").write_bytes(b"a face nobody can reach")
    (debris / "face-0123456789ab.png").chmod(0o600)
    code, report = problems_json()
    assert kinds(report) == [("uncommitted", "identities/carol")]
    assert invoke("doctor", "--fix").exit_code == 0
    assert not debris.exists()


def test_damaged_identities_are_reported_never_deleted(two):
    bob = registry.get_identity("bob")
    coeff = bob.file_path("coefficients")
    data = bytearray(coeff.read_bytes())
    data[-1] ^= 0xFF
    coeff.write_bytes(bytes(data))
    alice = registry.get_identity("alice")
    alice.file_path("face_embedding").unlink()
    snapshot = {p: p.read_bytes() for p in sorted(paths.identities_dir().rglob("*"))
                if p.is_file()}
    code, report = problems_json()
    assert code == 1
    assert kinds(report) == [("checksum", "identities/alice"), ("checksum", "identities/bob")]
    messages = {Path(p["path"]).name: p["message"] for p in report["problems"]}
    assert "does not match its checksum" in messages["bob"]
    assert "is missing" in messages["alice"]
    assert all("celebctl remove" in m for m in messages.values())
    assert all(p["fix"] is None for p in report["problems"])
    result = invoke("doctor", "--fix")
    assert result.exit_code == 1 and "needs you" in result.stdout
    assert {p: p.read_bytes() for p in snapshot} == snapshot


def test_missing_and_damaged_bases(two):
    from celebctl import basis

    info = basis.list_bases()[0]
    add_identity("carol", seed=3, basis_id="c" * 16)
    tensors = info.path / basis.TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    add_identity("dave", seed=4, basis_id="c" * 16)
    code, report = problems_json()
    # A missing basis is a note, said once for all who use it; the damaged one a problem.
    assert kinds(report) == [("checksum", f"bases/{info.id}")]
    assert f"celebctl basis remove {info.id} --force" in report["problems"][0]["message"]
    [note] = report["notes"]
    assert note.startswith(f"Basis {'c' * 16} ('carol', 'dave') is not on this machine yet")
    assert "the first render builds it from 'tiny'" in note
    assert invoke("doctor", "--fix").exit_code == 1
    assert tensors.read_bytes() == bytes(data)


def test_an_identity_that_does_not_match_its_basis(two):
    # identity.toml rewritten to say SDXL while it names the SD 1.x tiny basis: doctor was silent
    # and render's advice contradicted itself.
    from celebctl import basis, rendering
    from celebctl.errors import BasisMismatch

    info = basis.list_bases()[0]
    add_identity("carol", seed=3, p=info.components, basis_id=info.id)
    toml = paths.identities_dir() / "carol" / registry.IDENTITY_TOML
    text = toml.read_text()
    for old, new in (('family = "sd1"', 'family = "sdxl"'), ("hidden = 32", "hidden = 80"),
                     ("encoder_widths = [\n    32,\n]", "encoder_widths = [32, 48]")):
        assert old in text, (old, text)
        text = text.replace(old, new)
    toml.write_text(text)
    code, report = problems_json()
    assert code == 1 and kinds(report) == [("basis-mismatch", "identities/carol")]
    message = report["problems"][0]["message"]
    assert message.startswith(f"'carol' does not match its basis: it is recorded as fitted for "
                              f"SDXL, but its basis {info.id} is a SD 1.x basis")
    assert report["problems"][0]["fix"] is None
    with pytest.raises(BasisMismatch, match="^'carol' does not match its basis: it is recorded"):
        rendering.plan_render("carol at the beach")
    assert invoke("doctor", "--fix").exit_code == 1 and toml.read_text() == text


def test_future_basis_schema(two):
    from celebctl import basis

    info = basis.list_bases()[0]
    meta = info.path / basis.META_FILE
    meta.write_text(meta.read_text().replace("schema_version = 1", "schema_version = 7"))
    code, report = problems_json()
    assert kinds(report) == [("schema", f"bases/{info.id}")]
    assert "Upgrade celebctl" in report["problems"][0]["message"]


def test_stray_file_in_identities(two):
    stray = paths.identities_dir() / "notes.txt"
    stray.write_text("hello")
    stray.chmod(0o600)
    code, report = problems_json()
    assert kinds(report) == [("invalid", "identities/notes.txt")]
    assert invoke("doctor", "--fix").exit_code == 1 and stray.exists()


def test_fix_everything_at_once_keeps_every_valid_identity(two):
    before = {n: coefficients(n) for n in ("alice", "bob")}
    ids = paths.identities_dir()
    (ids / f"dave{TMP}1-new").mkdir()
    (ids / "carol").mkdir()
    (ids / "alice" / "stray.bin").write_bytes(b"x")
    (ids / f"bob{TMP}{registry.PENDING_SUFFIX}").write_bytes(b"")
    os.chmod(two, 0o755)
    result = invoke("doctor", "--fix")
    assert result.exit_code == 0, result.output
    assert doctor.check_home() == []
    for name, coeffs in before.items():
        np.testing.assert_array_equal(coefficients(name), coeffs)


def test_human_output_lists_fixes(two):
    (paths.identities_dir() / f"x{TMP}1-1").write_bytes(b"")
    result = invoke("doctor")
    assert result.exit_code == 1
    assert "1 problem in" in result.stdout and "temp:" in result.stdout
    assert "fix: delete the file" in result.stdout
    assert "Run `celebctl doctor --fix`" in result.stdout


def test_the_next_write_cleans_up_like_doctor_fix(two):
    ids = paths.identities_dir()
    leftovers = [ids / f"carol{TMP}123-new", ids / "alice" / f"identity.toml{TMP}1-2",
                 paths.data_home() / "cache" / f"list-index.json{TMP}9-9"]
    leftovers[0].mkdir()
    for path in leftovers[1:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    registry.remove_identity("bob")  # any write
    assert atomic.find_temp_files(two) == []
