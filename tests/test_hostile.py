"""Hostile input at the edges: photos given to `celebctl add` and registry TOML edited by hand.

tests/test_faces.py checks the photo reader itself and tests/test_bundles.py the bundle import;
here each hostile photo goes through the CLI (exit 1, a clear message, the registry unchanged)
and each hand-made TOML through `list`, `show` and `doctor`.
"""

from __future__ import annotations

import builtins
import datetime as dt
import errno
import io
import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from celebctl import faces, paths, registry
from celebctl.cli import app
from celebctl.errors import CelebctlError
from tests.helpers import add_identity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

runner = CliRunner()
FAST = ["--model", "tiny", "--steps", "1", "--quiet"]
ASTRONAUT = Path(__file__).parent / "data" / "astronaut.png"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def home_files() -> dict[str, bytes]:
    """Every file under the data home (but the list cache) with its content."""
    home = paths.data_home()
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and "cache" not in p.parts}


# --------------------------------------------------------------------------------------------
# photos through `celebctl add`


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
            + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat
            + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def _animated(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", (64, 48), c) for c in ((90, 90, 90), (200, 40, 40))]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100,
                   loop=0)
    return path


def _make_photo(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.png"
    if kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "truncated-jpeg":
        buffer = io.BytesIO()
        Image.open(ASTRONAUT).convert("RGB").save(buffer, format="JPEG")
        path = tmp_path / "truncated.jpg"
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    elif kind == "png-100000x100000":
        path.write_bytes(_png_claiming(100_000, 100_000))
    elif kind == "animated-gif":
        path = _animated(tmp_path / "anim.gif", "GIF")
    elif kind == "animated-webp":
        path = _animated(tmp_path / "anim.webp", "WEBP")
    elif kind == "16-bit-png":
        ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (64, 1))
        Image.fromarray(ramp).save(path)
    elif kind == "1x1":
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        path.write_bytes(ASTRONAUT.read_bytes())
        path.chmod(0)
    elif kind == "symlink-loop":
        other = tmp_path / "other.png"
        os.symlink(other, path)
        os.symlink(path, other)
    elif kind == "dangling-symlink":
        os.symlink(tmp_path / "gone.png", path)
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "char-device":
        path = Path("/dev/zero")  # an endless stream
    return path


PHOTO_CASES = {
    "zero-bytes": r"is empty \(0 bytes\)",
    "truncated-jpeg": r"is truncated or damaged",
    "png-100000x100000": r"claims to be larger than 64 megapixels; refusing to decode it",
    "animated-gif": r"No face found in",  # first frame read: grey, no face
    "animated-webp": r"No face found in",
    "16-bit-png": r"No face found in",  # decoded (rescaled to 8 bit): a ramp, no face
    "1x1": r"No face found in",
    "directory": r"is a folder, not a photo",
    "unreadable": r"No permission to read",
    "symlink-loop": r"is a symlink loop",
    "dangling-symlink": r"is a symlink to a file that does not exist",
    "fifo": r"is not a regular file",
    "char-device": r"is not a regular file",
}


@pytest.fixture
def deny_reads_as_root(monkeypatch):
    """Root reads a mode-0 file anyway; make open() fail as it would for anyone else."""
    if os.geteuid() != 0:
        return
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "unreadable.png":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    real_os_open = os.open

    def guarded_os_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "unreadable.png":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_os_open)


@pytest.mark.parametrize("kind", sorted(PHOTO_CASES))
def test_add_refuses_hostile_photo(kind, tmp_path, deny_reads_as_root, monkeypatch):
    from PIL import ImageFile

    add_identity("alice", seed=1)
    photo = _make_photo(kind, tmp_path)
    before = home_files()
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decoded.append(self.size) or original(self))
    result = invoke("add", "bob", photo, *FAST)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: "), result.stderr
    assert str(photo.name) in result.stderr
    assert re.search(PHOTO_CASES[kind], result.stderr), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert home_files() == before
    if kind == "png-100000x100000":
        assert (100_000, 100_000) not in decoded  # refused from the header, never decoded


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_photo_gives_its_first_frame(fmt, tmp_path):
    path = _animated(tmp_path / f"anim.{fmt.lower()}", fmt)
    with Image.open(path) as image:
        assert getattr(image, "n_frames", 1) == 2
    image = faces.load_photo(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert all(abs(a - b) <= 8 for a, b in zip(image.getpixel((5, 5)), (90, 90, 90),
                                                strict=True))


def test_animated_webp_with_the_face_first_is_used(tmp_path):
    face = Image.open(ASTRONAUT).convert("RGB")
    path = tmp_path / "face-first.webp"
    face.save(path, format="WEBP", save_all=True,
              append_images=[Image.new("RGB", face.size, (128, 128, 128))], duration=100)
    prepared = faces.prepare_face(path)
    assert prepared.face_count == 1


# --------------------------------------------------------------------------------------------
# registry TOML edited by hand


def _set(key, value):
    def edit(meta):
        meta[key] = value
    return edit


def _drop(key):
    def edit(meta):
        del meta[key]
    return edit


def _set_file(role, key, value):
    def edit(meta):
        meta["files"][role][key] = value
    return edit


def _rename_role(old, new):
    def edit(meta):
        meta["files"][new] = meta["files"].pop(old)
    return edit


# id -> (edit of the parsed TOML, or raw bytes), phrase the explanation must contain, doctor kind
TOML_CASES = {
    "components-is-text": (_set("components", "many"),
                           "'components' should be int, found str", "invalid"),
    "components-is-bool": (_set("components", True),
                           "'components' should be int, found bool", "invalid"),
    "hidden-out-of-range": (_set("hidden", 10**9), "components/hidden out of range", "invalid"),
    "missing-basis-id": (_drop("basis_id"), "is missing the key 'basis_id'", "invalid"),
    "missing-files": (_drop("files"), "is missing the key 'files'", "invalid"),
    "missing-name": (_drop("name"), "is missing the key 'name'", "invalid"),
    "name-is-int": (_set("name", 42), "'name' should be str, found int", "invalid"),
    "name-of-another": (_set("name", "alice"), "names 'alice' but lives in folder 'bob'",
                        "invalid"),
    "schema-version-text": (_set("schema_version", "1"),
                            "has no valid integer 'schema_version'", "invalid"),
    "schema-version-zero": (_set("schema_version", 0), "invalid schema_version 0", "invalid"),
    "schema-version-future": (_set("schema_version", 99),
                              "uses schema_version 99, newer than this celebctl understands",
                              "schema"),
    "created-is-datetime": (_set("created", dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)),
                            "'created' should be str, found datetime", "invalid"),
    "fit-is-text": (_set("fit", "fast"), "'fit' should be a table", "invalid"),
    "sha256-is-int": (_set_file("coefficients", "sha256", 123),
                      "'sha256' should be str, found int", "invalid"),
    "size-is-float": (_set_file("coefficients", "size", 1.5),
                      "'size' should be int, found float", "invalid"),
    "path-escapes": (_set_file("coefficients", "path", "../alice/identity.toml"),
                     "is not a valid file name", "invalid"),
    "unknown-role": (_rename_role("face", "pickle"), "unknown file role 'pickle'", "invalid"),
    "no-coefficients": (_rename_role("coefficients", "face_embedding"),
                        "has no 'coefficients' entry", "invalid"),
    "wrong-size": (_set_file("coefficients", "size", 1), "has the wrong size", "checksum"),
    "wrong-sha256": (_set_file("coefficients", "sha256", "0" * 64),
                     "does not match its checksum", "checksum"),
    "toml-syntax": (b"schema_version = 1\n[[[", "is not valid TOML", "invalid"),
    "not-utf8": (b"\xff\xfe\x00garbage", "is not UTF-8 text", "invalid"),
    "empty-file": (b"", "has no valid integer 'schema_version'", "invalid"),
}


def _edit_bob(edit) -> Path:
    toml_path = paths.identities_dir() / "bob" / registry.IDENTITY_TOML
    if isinstance(edit, bytes):
        toml_path.write_bytes(edit)
    else:
        meta = tomllib.loads(toml_path.read_text("utf-8"))
        edit(meta)
        toml_path.write_text(tomli_w.dumps(meta), "utf-8")
    return toml_path


@pytest.mark.parametrize("case", sorted(TOML_CASES))
def test_hand_edited_toml(case):
    edit, phrase, doctor_kind = TOML_CASES[case]
    add_identity("alice", seed=1)
    add_identity("bob", seed=2)
    toml_path = _edit_bob(edit)
    edited = toml_path.read_bytes()
    # `list` warns about bob and goes on listing alice.
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [i["name"] for i in data["identities"]] == ["alice"]
    assert len(data["warnings"]) == 1 and data["warnings"][0].startswith("Skipping 'bob': ")
    assert phrase in data["warnings"][0]
    assert "Warning:" in result.stderr
    # `show bob` explains what is wrong; alice is fine.
    result = invoke("show", "bob")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")
    assert phrase in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output
    assert invoke("show", "alice").exit_code == 0
    # doctor reports it. An entry whose identity.toml is not a valid identity is not usable by
    # anything, and --fix deletes it; a valid one with a damaged file, or one of a newer
    # schema, is left for a person.
    result = invoke("doctor", "--json")
    assert result.exit_code == 1
    problems = [p for p in json.loads(result.stdout)["problems"] if p["path"].endswith("/bob")]
    assert [p["kind"] for p in problems] == [doctor_kind], problems
    if doctor_kind == "invalid":
        assert problems[0]["fix"].startswith("delete the entry")
        report = json.loads(invoke("doctor", "--fix", "--json").stdout)
        assert any(p["path"].endswith("/bob") for p in report["fixed"])
        assert not [p for p in report["remaining"] if p["path"].endswith("/bob")]
        assert not toml_path.parent.exists()
        assert invoke("list", "--json").stderr == ""
    else:
        assert problems[0]["fix"] is None
        assert invoke("doctor", "--fix").exit_code == 1
        assert toml_path.read_bytes() == edited
        assert len(list(toml_path.parent.iterdir())) == 4
    # `remove` can always delete it.
    if toml_path.parent.exists():
        assert invoke("remove", "bob", "--yes").exit_code == 0
        assert not toml_path.parent.exists()


TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.datetimes(timezones=st.just(dt.timezone.utc)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([
    ("schema_version",), ("name",), ("basis_id",), ("model",), ("components",), ("hidden",),
    ("created",), ("updated",), ("files",), ("fit",), ("source",),
    ("files", "coefficients"), ("files", "coefficients", "path"),
    ("files", "coefficients", "sha256"), ("files", "coefficients", "size"),
    ("files", "face"), ("files", "face", "size"),
]), value=TOML_VALUES)
def test_any_hand_edit_is_a_warning_never_a_crash(path, value):
    if not registry.identity_exists("alice"):
        add_identity("alice", seed=1)
    if not registry.identity_exists("bob"):
        add_identity("bob", seed=2)
    toml_path = paths.identities_dir() / "bob" / registry.IDENTITY_TOML
    original = toml_path.read_bytes()
    try:
        meta = tomllib.loads(original.decode())
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        toml_path.write_text(tomli_w.dumps(meta), "utf-8")
        scan = registry.list_identities()
        names = [i.name for i in scan.identities]
        assert "alice" in names
        assert ("bob" in names) != any(w.startswith("Skipping 'bob'") for w in scan.warnings)
        if "bob" in names:
            registry.get_identity("bob")  # what `list` accepts, `show` loads
        else:
            with pytest.raises(CelebctlError):
                registry.get_identity("bob")
    finally:
        toml_path.write_bytes(original)


# --------------------------------------------------------------------------------------------
# bundles: what tests/test_bundles.py does not already cover


@pytest.fixture
def bundle(tmp_path) -> Path:
    from celebctl import bundles

    add_identity("alice", seed=1)
    path = bundles.export_bundle("alice", tmp_path / "alice.celeb")
    registry.remove_identity("alice")
    add_identity("bob", seed=2)  # so "unchanged" is about a registry with something in it
    return path


def _import_refused(path: Path, match: str, *extra: str) -> None:
    before = home_files()
    result = invoke("import", path, *extra)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
    assert re.search(match, result.stderr), result.stderr
    assert home_files() == before


def _patch_sizes(data: bytes, member: str, size: int) -> bytes:
    """Make the zip headers claim ``size`` uncompressed bytes for ``member``."""
    out = bytearray(data)
    name = member.encode()
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := out.find(signature, start)) != -1:
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if out[name_at:name_at + len(name)] == name:
                out[start + offset:start + offset + 4] = struct.pack("<I", size)
            start += 4
    return bytes(out)


def test_bundle_whose_headers_lie_about_sizes(bundle, tmp_path):
    import zipfile

    with zipfile.ZipFile(bundle) as archive:
        face = next(i for i in archive.infolist() if i.filename.startswith("face-"))
    for claimed in (face.file_size // 2, face.file_size * 2):
        path = tmp_path / f"lying-{claimed}.celeb"
        path.write_bytes(_patch_sizes(bundle.read_bytes(), face.filename, claimed))
        _import_refused(path, r"(cannot be read|is not the size it claims|compressed "
                              r"suspiciously well)")


def test_bundle_size_caps(bundle, tmp_path, monkeypatch):
    from celebctl import bundles

    # The real caps are 16 MiB a member and 32 MiB in all; shrink them rather than write 33 MB.
    monkeypatch.setattr(bundles, "MAX_MEMBER_BYTES", 1000)
    _import_refused(bundle, r"is too large")
    monkeypatch.setattr(bundles, "MAX_MEMBER_BYTES", 16 * 2**20)
    monkeypatch.setattr(bundles, "MAX_TOTAL_BYTES", 5000)
    _import_refused(bundle, r"unpacks to too much data")
    monkeypatch.setattr(bundles, "MAX_BUNDLE_BYTES", 1000)
    _import_refused(bundle, r"is larger than 1000 bytes")


def test_encrypted_bundle(bundle, tmp_path):
    data = bytearray(bundle.read_bytes())
    start = data.find(b"PK\x01\x02")
    data[start + 8] |= 0x1  # the "encrypted" flag bit in the central directory
    path = tmp_path / "encrypted.celeb"
    path.write_bytes(bytes(data))
    _import_refused(path, r"(Encrypted bundles are not supported|cannot be read)")


@pytest.mark.parametrize("name, match", [
    ("the", "reserved word"), ("person", "reserved word"), ("../x", "path separators"),
    ("a/b", "path separators"), ("Alice", "use lowercase"), ("", "cannot be empty"),
    ("x" * 33, "use one word of 1-32 characters"), ("bob", "already exists"),
])
def test_import_as_a_bad_name(bundle, name, match):
    _import_refused(bundle, match, "--as", name)


def test_bundle_that_is_a_folder_or_missing(tmp_path, celebctl_home):
    add_identity("bob", seed=2)
    _import_refused(tmp_path, "is a folder, not a .celeb bundle")
    _import_refused(tmp_path / "nope.celeb", "No such file")
