"""Hardening II, class 5: special files.

What is not a regular file (a FIFO, a device, a socket, a folder) is refused at once wherever a
file is read, and never read past a cap; nothing that is not a regular file is ever replaced;
symbolic links in the data home are never followed, for reading or deleting.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from celebctl import paths, registry
from celebctl.errors import CorruptEntry
from celebctl.storage import special_files
from tests.helpers import PHOTO

runner = CliRunner()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX special files")
TIMEOUT = 900  # a hang is caught here, with room for a busy machine


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


def celebctl(*args, env_extra=None):
    """The real entry point in a subprocess, so a hang fails the test instead of stalling it."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "celebctl", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.celeb"
    os.mkfifo(path)
    return path


@pytest.fixture
def sock(tmp_path):
    path = tmp_path / "s.celeb"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    yield path
    server.close()


def _refused(result, *phrases):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_import_refuses_a_fifo_at_once(tiny_home, fifo):
    _refused(celebctl("import", fifo), "named pipe", "not a regular file")


def test_import_refuses_devices_and_sockets(tiny_home, sock):
    _refused(celebctl("import", "/dev/zero"), "device")
    _refused(celebctl("import", sock), "not a regular file")


@pytest.mark.parametrize("args", [
    ["basis", "fetch", "{fifo}"],
    ["basis", "fetch", "/dev/zero"],
    ["basis", "build", "--model", "tiny", "--names", "{fifo}"],
    ["basis", "build", "--model", "tiny", "--names", "/dev/zero"],
    ["add", "bob", "{fifo}", "--model", "tiny", "--quiet"],
    ["add", "bob", "/dev/zero", "--model", "tiny", "--quiet"],
    ["render", "a cat", "--dry-run", "--model", "{fifo}.safetensors"],
])
def test_every_file_argument_refuses_special_files(tiny_home, fifo, args):
    os.mkfifo(f"{fifo}.safetensors")
    args = [a.replace("{fifo}", str(fifo)) for a in args]
    result = celebctl(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "regular file" in result.stderr or "is not a basis" in result.stderr, result.stderr


def test_a_fifo_for_a_basis_toml_is_refused(tiny_home, tmp_path):
    from celebctl import basis

    info = basis.list_bases()[0]
    sent = tmp_path / "sent"
    sent.mkdir()
    shutil.copy(info.path / basis.TENSORS_FILE, sent / basis.TENSORS_FILE)
    os.mkfifo(sent / basis.META_FILE)
    _refused(celebctl("basis", "fetch", sent), "not a regular file")


def test_a_fifo_as_face_weights_or_config_is_refused(tiny_home, tmp_path, fifo):
    from celebctl import models

    # A model given as a folder is a "real" model: it fits with the VGGFace2 face encoder.
    folder = shutil.copytree(models.tiny_model_dir(), tmp_path / "model")
    result = celebctl("add", "bob", PHOTO, "--model", folder, "--quiet",
                      env_extra={"CELEBCTL_FACE_WEIGHTS": str(fifo)})
    assert result.returncode == 1 and "not a regular file" in result.stderr, result.stderr
    os.mkfifo(paths.config_path())
    result = celebctl("render", "a cat", "--dry-run")
    assert result.returncode == 1 and "not a regular file" in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["identity.toml", "cache"])
def test_special_files_inside_the_registry_never_hang(home, where):
    if where == "identity.toml":
        toml_path = paths.identities_dir() / "bob" / registry.IDENTITY_TOML
        toml_path.unlink()
        os.mkfifo(toml_path)
    else:
        cache = paths.data_home() / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        os.mkfifo(cache / "list-index.json")
    result = celebctl("list", "--json")
    assert result.returncode == 0, result.stderr
    names = [i["name"] for i in json.loads(result.stdout)["identities"]]
    assert "alice" in names
    assert celebctl("doctor").returncode in (0, 1)


# --------------------------------------------------------------------------------------------
# writing: never replace what is not a regular file


@pytest.mark.parametrize("fmt, suffix", [("celeb", ".celeb"), ("a1111", ".safetensors")])
def test_export_never_replaces_a_device(home, fmt, suffix, tmp_path):
    # /dev/null under a name export accepts: a symlink to it and, as root, a device node.
    target = tmp_path / f"null{suffix}"
    target.symlink_to("/dev/null")
    for force in ([], ["--force"]):
        result = invoke("export", "alice", "-f", fmt, "-o", target, *force)
        assert result.exit_code == 1 and "only replaces regular files" in result.stderr
        assert target.is_symlink() and os.readlink(target) == "/dev/null"
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


@pytest.mark.parametrize("fmt", ["celeb", "a1111", "diffusers"])
@pytest.mark.parametrize("kind", ["dangling-link", "link-to-file", "fifo"])
def test_export_never_replaces_links_or_pipes(home, tmp_path, fmt, kind):
    out = tmp_path / "out"
    out.mkdir()
    name = {"celeb": "a.celeb", "a1111": "a.safetensors", "diffusers": "emb"}[fmt]
    target = out / name
    if fmt == "diffusers":
        target.mkdir()
        target = target / "learned_embeds.safetensors"
    victim = tmp_path / "victim.txt"
    if kind == "dangling-link":
        target.symlink_to(tmp_path / "nowhere")
    elif kind == "link-to-file":
        victim.write_text("precious")
        target.symlink_to(victim)
    else:
        os.mkfifo(target)
    for force in ([], ["--force"]):
        result = invoke("export", "alice", "-f", fmt, "-o", out / name, *force)
        assert result.exit_code == 1, (kind, force, result.output)
        assert "Traceback" not in result.output
    # Whatever was there is still there, as it was.
    assert target.is_symlink() if kind != "fifo" else stat.S_ISFIFO(os.lstat(target).st_mode)
    if kind == "link-to-file":
        assert victim.read_text() == "precious" and target.is_symlink()
    assert not (tmp_path / "nowhere").exists()


def test_export_force_replaces_a_regular_file(home, tmp_path):
    target = tmp_path / "a.celeb"
    target.write_text("old")
    assert invoke("export", "alice", "-o", target).exit_code == 1
    assert invoke("export", "alice", "-o", target, "--force").exit_code == 0
    assert target.read_bytes()[:2] == b"PK"


def test_render_out_must_be_a_folder(home, fifo):
    result = invoke("render", "alice", "--out", fifo, "--steps", "1", "--quiet")
    assert result.exit_code == 1 and "give a folder" in result.stderr


# --------------------------------------------------------------------------------------------
# symbolic links in the data home


@pytest.fixture
def linked_bob(home, tmp_path) -> Path:
    """identities/bob is a symbolic link to a folder outside the data home."""
    outside = tmp_path / "elsewhere" / "bob"
    outside.parent.mkdir()
    shutil.move(str(paths.identities_dir() / "bob"), outside)
    (paths.identities_dir() / "bob").symlink_to(outside)
    return outside


def test_remove_refuses_a_linked_identity_and_touches_nothing(linked_bob):
    before = sorted(p.name for p in linked_bob.iterdir())
    result = invoke("remove", "bob", "--yes")
    assert result.exit_code == 1 and "symbolic link" in result.stderr
    assert sorted(p.name for p in linked_bob.iterdir()) == before
    with pytest.raises(CorruptEntry, match="symbolic link"):
        registry.remove_identity("bob")


def test_a_linked_identity_is_reported_and_fixed_by_unlinking(linked_bob):
    before = sorted(p.name for p in linked_bob.iterdir())
    result = invoke("list", "--json")
    assert [i["name"] for i in json.loads(result.stdout)["identities"]] == ["alice"]
    assert "symbolic link" in result.stderr
    assert invoke("show", "bob").exit_code == 1
    report = json.loads(invoke("doctor", "--json").stdout)
    assert [p["kind"] for p in report["problems"] if p["path"].endswith("/bob")] == ["link"]
    assert not report["healthy"]
    invoke("doctor", "--fix")
    assert not os.path.lexists(paths.identities_dir() / "bob")
    assert sorted(p.name for p in linked_bob.iterdir()) == before  # the target is untouched


def test_writes_never_go_through_a_linked_identity(linked_bob, tmp_path):
    before = {p.name: p.read_bytes() for p in linked_bob.iterdir()}
    result = invoke("add", "bob", PHOTO, "--replace", "--model", "tiny", "--steps", "1",
                    "--quiet")
    assert result.exit_code == 1 and "symbolic link" in result.stderr
    assert invoke("rename", "alice", "bob").exit_code == 1
    assert invoke("rename", "bob", "carol").exit_code == 1
    assert {p.name: p.read_bytes() for p in linked_bob.iterdir()} == before


def test_linked_data_files_are_a_damaged_entry(home, tmp_path):
    ident = registry.get_identity("bob")
    face = ident.file_path("face")
    outside = tmp_path / "face.png"
    shutil.move(str(face), outside)
    face.symlink_to(outside)
    result = invoke("list", "--json")
    assert "not a regular file" in result.stderr
    assert invoke("remove", "bob", "--yes").exit_code == 0
    assert outside.exists()  # the link went, not what it pointed to


def test_read_regular_file_caps_what_it_reads(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"x" * 100)
    assert special_files.read_regular_file(path, 100) == b"x" * 100
    with pytest.raises(special_files.FileRefused, match="larger than"):
        special_files.read_regular_file(path, 99)
    with pytest.raises(special_files.FileRefused, match="device"):
        special_files.read_regular_file("/dev/zero", 10)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert special_files.read_regular_file(link, 100) == b"x" * 100
    with pytest.raises(special_files.FileRefused, match="symbolic link"):
        special_files.read_regular_file(link, 100, follow_symlinks=False)
