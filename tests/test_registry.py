"""The identity registry: round trips, validation, crash safety, concurrency."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celebctl import paths, registry
from celebctl.errors import (
    CelebctlError,
    IdentityExists,
    IdentityNotFound,
    InvalidName,
    StorageError,
)
from celebctl.storage import atomic, checksums
from tests.helpers import add_identity, make_write


def test_data_home_follows_env(celebctl_home, monkeypatch, tmp_path):
    assert paths.data_home() == celebctl_home
    monkeypatch.setenv("CELEBCTL_HOME", str(tmp_path / "other"))
    assert paths.data_home() == tmp_path / "other"  # resolved per call
    monkeypatch.delenv("CELEBCTL_HOME")
    assert "celebctl" in str(paths.data_home())


def test_save_and_load_round_trip():
    write = make_write("alice", seed=1)
    ident = registry.save_identity(write)
    loaded = registry.get_identity("alice")
    assert loaded.name == "alice" and ident.path == loaded.path
    np.testing.assert_array_equal(loaded.load_coefficients(), write.coefficients)
    np.testing.assert_array_equal(loaded.load_face_embedding(), write.face_embedding)
    assert loaded.load_face_png() == write.face_png
    assert loaded.meta["schema_version"] == registry.SCHEMA_VERSION
    assert loaded.meta["components"] == 32
    assert loaded.meta["fit"] == {"steps": 3, "seed": 1}
    for entry in loaded.meta["files"].values():
        assert checksums.sha256_file(loaded.path / entry["path"]) == entry["sha256"]


def test_existing_name_refused_then_replaced():
    add_identity("alice", seed=1)
    with pytest.raises(IdentityExists, match="already exists. Use --replace"):
        add_identity("alice", seed=2)
    old_created = registry.get_identity("alice").meta["created"]
    registry.save_identity(make_write("alice", seed=2), replace=True)
    ident = registry.get_identity("alice")
    np.testing.assert_array_equal(ident.load_coefficients(), make_write("a", seed=2).coefficients)
    assert ident.meta["created"] == old_created
    # Only the files of the new generation are left.
    assert sorted(p.name for p in ident.path.iterdir()) == sorted(
        [registry.IDENTITY_TOML] + [e["path"] for e in ident.meta["files"].values()]
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "cannot be empty"),
        ("Alice", "use lowercase, e.g. 'alice'"),
        ("a/b", "path separators"),
        ("..", "path separators"),
        ("the", "reserved word"),
        ("person", "reserved word"),
        ("1abc", "one word of 1-32 characters"),
        ("x" * 33, "one word of 1-32 characters"),
        ("two words", "one word"),
    ],
)
def test_bad_names(name, message):
    with pytest.raises(InvalidName, match=message):
        registry.validate_name(name)


@given(st.text(max_size=64))
@settings(max_examples=300, deadline=None)
def test_name_check_only_raises_invalid_name(text):
    try:
        assert registry.validate_name(text) == text
        assert registry.NAME_RE.fullmatch(text)
    except InvalidName:
        pass


def test_unknown_identity_suggests():
    add_identity("alice")
    with pytest.raises(IdentityNotFound) as info:
        registry.get_identity("alise")
    assert str(info.value) == "No identity 'alise'. Did you mean 'alice'? See `celebctl list`."
    with pytest.raises(IdentityNotFound, match="^No identity 'zed'. See"):
        registry.get_identity("zed")


def test_remove_and_rename():
    add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    renamed = registry.rename_identity("bob", "carol")
    assert renamed.meta["name"] == "carol"
    np.testing.assert_array_equal(renamed.load_coefficients(), make_write("x", 2).coefficients)
    assert [i.name for i in registry.list_identities().identities] == ["alice", "carol"]
    with pytest.raises(IdentityExists):
        registry.rename_identity("alice", "carol")
    registry.remove_identity("alice")
    assert not registry.identity_dir("alice").exists()
    assert [i.name for i in registry.list_identities().identities] == ["carol"]
    with pytest.raises(IdentityNotFound):
        registry.remove_identity("alice")


def test_list_reports_broken_entries_and_keeps_going():
    add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    add_identity("carol", seed=3)
    add_identity("dave", seed=4)
    root = paths.identities_dir()
    (root / "bob" / "identity.toml").write_text("this is = = not toml")
    coeff = registry.get_identity("carol").file_path("coefficients")
    data = bytearray(coeff.read_bytes())
    data[-1] ^= 0xFF
    coeff.write_bytes(bytes(data))
    toml = (root / "dave" / "identity.toml").read_text()
    current = f"schema_version = {registry.SCHEMA_VERSION}"
    (root / "dave" / "identity.toml").write_text(toml.replace(current, "schema_version = 99"))
    (root / "eve").mkdir()  # a folder with no TOML
    scan = registry.list_identities()
    assert [i.name for i in scan.identities] == ["alice"]
    text = "\n".join(scan.warnings)
    assert "'bob'" in text and "not valid TOML" in text
    assert "'carol'" in text and "checksum" in text
    assert "'dave'" in text and "schema_version 99" in text and "Upgrade celebctl" in text
    assert "'eve'" in text and "missing" in text


def test_wrong_types_in_toml_are_explained():
    add_identity("alice")
    toml_path = paths.identities_dir() / "alice" / "identity.toml"
    toml_path.write_text(toml_path.read_text().replace("components = 32", 'components = "many"'))
    with pytest.raises(CelebctlError, match="'components' should be int, found str"):
        registry.get_identity("alice")


def test_interrupted_new_write_leaves_nothing(monkeypatch):
    add_identity("alice", seed=1)
    real = atomic.atomic_write_text

    def crash_on_toml(path, text):
        if path.name == registry.IDENTITY_TOML:
            raise KeyboardInterrupt  # as if the process died between tensors and TOML
        return real(path, text)

    monkeypatch.setattr(atomic, "atomic_write_text", crash_on_toml)
    with pytest.raises(KeyboardInterrupt):
        add_identity("bob", seed=2)
    monkeypatch.setattr(atomic, "atomic_write_text", real)
    scan = registry.list_identities()
    assert [i.name for i in scan.identities] == ["alice"] and scan.warnings == []
    assert not registry.identity_dir("bob").exists()


def test_interrupted_replace_keeps_old_identity(monkeypatch):
    add_identity("alice", seed=1)
    real = atomic.atomic_write_text

    def crash_on_toml(path, text):
        if path.name == registry.IDENTITY_TOML:
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(atomic, "atomic_write_text", crash_on_toml)
    with pytest.raises(OSError):
        registry.save_identity(make_write("alice", seed=2), replace=True)
    monkeypatch.setattr(atomic, "atomic_write_text", real)
    ident = registry.get_identity("alice")  # verifies every checksum
    np.testing.assert_array_equal(ident.load_coefficients(), make_write("a", 1).coefficients)
    # The next write sweeps the orphaned new-generation files.
    add_identity("bob", seed=3)
    names = sorted(p.name for p in ident.path.iterdir())
    assert len(names) == 4


def test_disk_full_is_a_clear_error(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real = os.write
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="the disk is full; free some space"):
        add_identity("alice")
    monkeypatch.setattr(os, "write", real)
    assert registry.list_identities().identities == []
    assert atomic.find_temp_files(paths.data_home()) == []


def test_joint_style_write_rolls_back_all(monkeypatch):
    add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    real = registry._commit_identity
    calls = []

    def fail_second(write, replace, journal=None):
        calls.append(write.name)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(write, replace, journal)

    # save_identities looks _commit_identity up in registry.writing: replace it there.
    monkeypatch.setattr(registry.writing, "_commit_identity", fail_second)
    with pytest.raises(RuntimeError):
        registry.save_identities([make_write("alice", 10), make_write("bob", 11)])
    monkeypatch.setattr(registry.writing, "_commit_identity", real)
    np.testing.assert_array_equal(
        registry.get_identity("alice").load_coefficients(), make_write("a", 1).coefficients
    )
    np.testing.assert_array_equal(
        registry.get_identity("bob").load_coefficients(), make_write("b", 2).coefficients
    )
    done = registry.save_identities([make_write("alice", 10), make_write("bob", 11)])
    assert [d.name for d in done] == ["alice", "bob"]
    np.testing.assert_array_equal(
        registry.get_identity("bob").load_coefficients(), make_write("b", 11).coefficients
    )


def test_file_modes_are_private():
    ident = add_identity("alice")
    for path in [paths.data_home(), ident.path, *ident.path.iterdir()]:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, (path, oct(mode))


def _writer(home: str, prefix: str, count: int) -> None:
    os.environ["CELEBCTL_HOME"] = home
    for i in range(count):
        registry.save_identity(make_write(f"{prefix}{i}", seed=i))
        registry.save_identity(make_write("shared", seed=i), replace=True)


def test_two_processes_writing_lose_nothing(celebctl_home):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(celebctl_home), p, 8)) for p in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    scan = registry.list_identities()
    assert scan.warnings == []
    names = {i.name for i in scan.identities}
    assert names == {f"a{i}" for i in range(8)} | {f"b{i}" for i in range(8)} | {"shared"}
    registry.get_identity("shared").load_coefficients()  # whole and verified


def test_list_cache_never_hides_damage():
    add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    assert len(registry.list_identities().identities) == 2  # fills the cache
    coeff = registry.get_identity("bob").file_path("coefficients")
    data = bytearray(coeff.read_bytes())
    data[-1] ^= 0xFF
    coeff.write_bytes(bytes(data))
    scan = registry.list_identities()
    assert [i.name for i in scan.identities] == ["alice"]
    assert "checksum" in scan.warnings[0]
    registry.remove_identity("alice")
    assert registry.list_identities().identities == []
