"""Face crops and face embeddings are biometric data: private modes, real deletion, no leaks."""

from __future__ import annotations

import json
import re
import stat

import pytest
from typer.testing import CliRunner

from celebctl import bundles, paths, registry
from celebctl.cli import app
from celebctl.storage import atomic, checksums, filemodes
from tests.helpers import add_identity

runner = CliRunner()

pytestmark = pytest.mark.skipif(not hasattr(stat, "S_IMODE"), reason="POSIX modes")


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def all_modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")] if not p.is_symlink()}


def test_everything_written_is_private(tiny_home, _tiny_template, tmp_path):
    # The tiny model (written by diffusers' save_pretrained) and the basis ...
    assert filemodes.loose_modes(_tiny_template) == []
    # ... and what the registry commands write.
    add_identity("alice", seed=1)
    assert invoke("export", "alice", "-o", tmp_path / "a.celeb").exit_code == 0
    assert invoke("import", tmp_path / "a.celeb", "--as", "bob").exit_code == 0
    assert invoke("rename", "bob", "carol").exit_code == 0
    assert invoke("list").exit_code == 0  # writes the list cache
    modes = all_modes(tiny_home)
    assert modes["."] == 0o700
    assert {m for p, m in modes.items() if (tiny_home / p).is_dir()} == {0o700}
    assert {m for p, m in modes.items() if (tiny_home / p).is_file()} == {0o600}
    assert stat.S_IMODE((tmp_path / "a.celeb").stat().st_mode) == 0o600


def test_loose_home_is_repaired_with_a_warning(celebctl_home):
    add_identity("alice", seed=1)
    for path in [celebctl_home, *celebctl_home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    result = invoke("list")
    assert result.exit_code == 0
    assert re.search(r"Warning: Tightened the modes of \d+ entries in the data home that other "
                     r"users could read: \. \(0755 -> 0700\)", result.stderr), result.stderr
    assert "face crops and face embeddings" in result.stderr
    assert filemodes.loose_modes(celebctl_home) == []  # the whole tree, not just the top
    assert invoke("list").stderr == ""  # repaired once, quiet afterwards


def test_deep_loose_file_is_repaired_by_a_full_check(celebctl_home, tmp_path):
    ident = add_identity("alice", seed=1)
    face = ident.file_path("face")
    face.chmod(0o644)
    # `list`, `show` and `path` look two levels deep to stay fast; every other command and
    # `doctor` look at everything.
    assert invoke("list").stderr == ""
    result = invoke("export", "alice", "-o", tmp_path / "a.celeb")
    assert result.exit_code == 0
    assert f"identities/alice/{face.name} (0644 -> 0600)" in result.stderr
    assert stat.S_IMODE(face.stat().st_mode) == 0o600


def test_doctor_reports_modes_instead_of_silently_fixing(celebctl_home):
    add_identity("alice", seed=1)
    celebctl_home.chmod(0o750)
    result = invoke("doctor", "--json")
    assert result.exit_code == 1
    assert [p["kind"] for p in json.loads(result.stdout)["problems"]][:1] == ["mode"]
    assert stat.S_IMODE(celebctl_home.stat().st_mode) == 0o750


def test_remove_deletes_face_crop_and_embedding(celebctl_home):
    ident = add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    secrets = {ident.meta["files"][role]["sha256"] for role in ("face", "face_embedding")}
    assert invoke("remove", "alice", "--yes").exit_code == 0
    left = {checksums.sha256_file(p) for p in celebctl_home.rglob("*") if p.is_file()}
    assert not secrets & left
    assert not registry.identity_dir("alice").exists()
    assert atomic.find_temp_files(celebctl_home) == []
    assert "--keep-face" not in invoke("remove", "--help").output


def test_show_never_prints_embedding_values(celebctl_home):
    ident = add_identity("alice", seed=1)
    embedding = ident.load_face_embedding()
    coefficients = ident.load_coefficients()
    for args in (["show", "alice"], ["show", "alice", "--json"], ["list", "--json"]):
        result = invoke(*args)
        assert result.exit_code == 0
        for value in (*embedding[:4], *coefficients[0, :4]):
            for text in (repr(float(value)), f"{value:.4f}", f"{value:.6g}"):
                assert text not in result.output, (args, text)
    data = json.loads(invoke("show", "alice", "--json").stdout)

    def longest_number_list(node) -> int:
        if isinstance(node, dict):
            return max([0, *map(longest_number_list, node.values())])
        if isinstance(node, list):
            own = len(node) if all(isinstance(v, (int, float)) for v in node) else 0
            return max([own, *map(longest_number_list, node)])
        return 0

    assert longest_number_list(data) <= 4  # a face box at most, never 512 values


def test_export_help_says_the_bundle_holds_the_face(celebctl_home, tmp_path):
    text = " ".join(invoke("export", "--help").output.split())
    assert "face crop" in text and "--no-face" in text
    add_identity("alice", seed=1)
    out = tmp_path / "a.celeb"
    assert invoke("export", "alice", "-o", out, "--no-face").exit_code == 0
    plan = bundles.check_bundle(out.read_bytes(), new_name="bob")
    assert plan.write.face_png is None and plan.write.face_embedding is None
    assert any("not refitted with `joint`" in n for n in plan.notes)


def test_data_home_is_created_private(celebctl_home):
    assert not celebctl_home.exists()
    add_identity("alice", seed=1)
    assert stat.S_IMODE(paths.data_home().stat().st_mode) == 0o700
