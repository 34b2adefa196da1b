"""Hardening II, class 1: the user's folders are not ours.

celebctl may create its own files private, and keeps its own data home private, but it never
changes a folder or file it did not make: not the folder an export or render goes into, not a
folder CELEBCTL_HOME points at, not the user's files beside celebctl's entries there.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from celebctl import rendering
from celebctl.cli import app
from celebctl.storage import atomic, filemodes
from tests.helpers import add_identity

runner = CliRunner()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX modes")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def shared_folder(tmp_path):
    """A folder like /tmp: world-writable and sticky (1777)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    return folder


@pytest.mark.parametrize("fmt, name", [("celeb", "a.celeb"), ("a1111", "a.safetensors"),
                                       ("diffusers", "a-embedding")])
def test_export_never_changes_the_folder_it_writes_into(home, shared_folder, fmt, name):
    result = invoke("export", "alice", "-f", fmt, "-o", shared_folder / name)
    assert result.exit_code == 0, result.output
    assert mode(shared_folder) == 0o1777


def test_export_into_the_current_folder_keeps_its_mode(home, tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    cwd.mkdir()
    cwd.chmod(0o755)
    monkeypatch.chdir(cwd)
    assert invoke("export", "alice", "-o", "alice.celeb").exit_code == 0
    assert mode(cwd) == 0o755
    # The bundle holds a face crop, so the file itself is private; the embeddings are not.
    assert mode(cwd / "alice.celeb") == 0o600
    assert invoke("export", "alice", "-f", "a1111", "-o", "alice.safetensors").exit_code == 0
    assert mode(cwd / "alice.safetensors") == 0o644


def test_render_never_changes_its_output_folder(home, shared_folder):
    result = invoke("render", "a photo of alice", "--steps", "1", "--quiet", "--out",
                    shared_folder)
    assert result.exit_code == 0, result.output
    assert mode(shared_folder) == 0o1777
    assert {mode(p) for p in shared_folder.iterdir()} == {0o644}


@pytest.fixture
def users_folder(tmp_path, monkeypatch):
    """CELEBCTL_HOME pointed at a folder that already holds the user's own things."""
    folder = tmp_path / "my-stuff"
    folder.mkdir()
    folder.chmod(0o755)
    script = folder / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    notes = folder / "notes"
    notes.mkdir()
    notes.chmod(0o775)
    (notes / "todo.txt").write_text("buy milk\n")
    (notes / "todo.txt").chmod(0o644)
    # A name that looks like a celebctl temp file, but in the user's own folder.
    (notes / f"draft{atomic.TMP_MARK}1").write_text("keep me\n")
    monkeypatch.setenv("CELEBCTL_HOME", str(folder))
    return folder


def user_modes(folder):
    return {str(p.relative_to(folder)): mode(p)
            for p in [folder, folder / "run.sh", folder / "notes", *(folder / "notes").iterdir()]}


def test_a_home_that_existed_keeps_the_users_modes(users_folder, tmp_path):
    before = user_modes(users_folder)
    for args in (["path"], ["list"], ["doctor"], ["doctor", "--fix"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "Tightened" not in result.stderr
    add_identity("alice", seed=1)
    assert invoke("export", "alice", "-o", tmp_path / "a.celeb").exit_code == 0
    assert invoke("import", tmp_path / "a.celeb", "--as", "bob").exit_code == 0
    assert invoke("rename", "bob", "carol").exit_code == 0
    assert invoke("doctor", "--fix").exit_code in (0, 1)
    assert user_modes(users_folder) == before
    assert (users_folder / "notes" / f"draft{atomic.TMP_MARK}1").read_text() == "keep me\n"
    # celebctl's own entries there are private, and loosening them is repaired.
    identities = users_folder / "identities"
    assert mode(identities) == 0o700
    identities.chmod(0o755)
    result = invoke("list")
    assert "Tightened" in result.stderr and mode(identities) == 0o700
    assert user_modes(users_folder) == before
    # doctor reports only celebctl's entries.
    report = json.loads(invoke("doctor", "--json").stdout)
    assert all("notes" not in p["path"] and "run.sh" not in p["path"]
               for p in report["problems"]), report


def test_a_home_celebctl_creates_is_marked_and_kept_private(celebctl_home):
    add_identity("alice", seed=1)
    assert filemodes.home_is_ours(celebctl_home)
    assert mode(celebctl_home) == 0o700
    celebctl_home.chmod(0o755)
    assert "Tightened" in invoke("list").stderr
    assert mode(celebctl_home) == 0o700


def test_missing_parents_of_the_home_are_created_private(tmp_path, monkeypatch):
    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("CELEBCTL_HOME", str(home))
    before = mode(tmp_path)
    add_identity("alice", seed=1)
    assert {mode(home), mode(home.parent), mode(home.parent.parent)} == {0o700}
    assert mode(tmp_path) == before  # the folder that existed is untouched
    assert filemodes.home_is_ours(home) and not filemodes.home_is_ours(home.parent)


def test_one_atomic_writer_for_user_files():
    # Rendering and export write users' files through storage, not a copy of their own.
    assert not hasattr(rendering, "write_user_file") and not hasattr(rendering, "_write_temp")
    import celebctl.export as export_module

    source = open(export_module.__file__, encoding="utf-8").read()
    assert "write_user_file" in source and "os.open(" not in source


def test_a_failed_export_write_leaves_no_temp_file(home, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for fmt, name in (("celeb", "a.celeb"), ("a1111", "a.safetensors")):
        monkeypatch.setenv("CELEBCTL_FAULT", "ENOSPC@2")  # the write half-way through
        result = invoke("export", "alice", "-f", fmt, "-o", out / name)
        monkeypatch.delenv("CELEBCTL_FAULT")
        assert result.exit_code == 1 and "the disk is full" in result.stderr, result.output
        assert list(out.iterdir()) == []
