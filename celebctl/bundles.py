"""Identity bundles (``.celeb``): one zip that carries an identity to another machine.

A bundle holds ``identity.toml`` and the data files it names, nothing else. Import treats the
file as hostile: every check runs on bytes in memory before anything is written, and the
registry only changes through :func:`registry.save_identity`, which is crash-safe.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from . import documents, registry
from .errors import BundleError, CelebctlError, CorruptEntry, SchemaError
from .storage import checksums, special_files, userfiles

BUNDLE_SUFFIX = ".celeb"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
# The TOML, the coefficients, a face crop and embedding per photo, and a carried basis's two.
MAX_MEMBERS = 2 + 2 * registry.MAX_PHOTOS + 2
MAX_MEMBER_BYTES = 16 * 1024 * 1024
MAX_TOTAL_BYTES = 32 * 1024 * 1024
MAX_RATIO = 200  # uncompressed / compressed, for members over 64 KiB
MAX_TOML_BYTES = 256 * 1024
MAX_ST_HEADER = 64 * 1024
FACE_EMBEDDING_DIM = registry.FACE_EMBEDDING_DIM
BUNDLE_FILE_MODE = 0o600  # it holds a face crop and face embedding


# --------------------------------------------------------------------------------------------
# export


def export_bundle(name: str, out: Path, include_face: bool = True, overwrite: bool = False,
                  with_basis: bool = False) -> Path:
    """Write identity ``name`` as a ``.celeb`` zip at ``out``.

    The bundle contains the face crop and face embedding unless ``include_face`` is False; an
    identity imported from a face-less bundle renders but cannot be refitted with `joint`.
    ``with_basis`` adds the identity's basis (see :mod:`celebctl.bundlebasis`), so the bundle
    renders on a machine that has neither the basis nor the model to build it.
    """
    ident = registry.get_identity(name, verify="all")
    out = Path(out)
    if out.is_dir():
        raise CelebctlError(f"{out} is a folder; give a file name such as {name}.celeb.")
    special_files.refuse_special_file(out)
    if os.path.lexists(out) and not overwrite:
        raise CelebctlError(f"{out} already exists. Pick another path or pass --force.")
    meta = dict(ident.meta)
    files = dict(meta["files"])
    if not include_face:
        files = {role: entry for role, entry in files.items() if role == "coefficients"}
        meta.pop("sources", None)  # photo names, hashes and face boxes go with the faces
    meta["files"] = files
    if meta.get("evals"):  # where this machine kept eval sheets is no one else's business
        meta["evals"] = [{k: v for k, v in e.items() if k != "sheet"} for e in meta["evals"]]
    members = {registry.IDENTITY_TOML: tomli_w.dumps(meta).encode("utf-8")}
    for entry in files.values():
        members[entry["path"]] = (ident.path / entry["path"]).read_bytes()
    if with_basis:
        from .bundlebasis import basis_members

        members.update(basis_members(ident.basis_id))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            info = zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o600) << 16
            archive.writestr(info, data)
    return userfiles.write_user_file(out, buffer.getvalue(), overwrite=overwrite,
                                   mode=BUNDLE_FILE_MODE)


# --------------------------------------------------------------------------------------------
# validation helpers (pure, on bytes)


def parse_safetensors(data: bytes, where: str) -> dict[str, Any]:
    """Validate a safetensors blob by hand, then load it as numpy. Never unpickles anything.

    The header is checked before the safetensors library sees the bytes, so a header that lies
    about its size or offsets, or is absurdly large, is refused with a clear message.
    """
    import numpy as np

    if len(data) < 8:
        raise BundleError(f"{where} is too short to be a safetensors file.")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_ST_HEADER or header_len > len(data) - 8:
        raise BundleError(f"{where} is not a valid safetensors file (bad header length).")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError(f"{where} is not a valid safetensors file (unreadable header).") from None
    if not isinstance(header, dict):
        raise BundleError(f"{where} is not a valid safetensors file.")
    body = len(data) - 8 - header_len
    spans = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(spec, dict) or spec.get("dtype") != "F32":
            raise BundleError(f"{where}: tensor '{key}' must be float32.")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 20
                       for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise BundleError(f"{where}: tensor '{key}' has a malformed header entry.")
        count = 1
        for dim in shape:
            count *= dim
        start, end = offsets
        if not 0 <= start <= end <= body or end - start != count * 4:
            raise BundleError(f"{where}: tensor '{key}' header does not match the file size.")
        spans.append((start, end))
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception:  # the library's own errors; the header was checked above
        raise BundleError(f"{where} is not a valid safetensors file.") from None
    for key, array in tensors.items():
        if not np.isfinite(array).all():
            raise BundleError(f"{where}: tensor '{key}' contains NaN or Inf.")
    return tensors


_MEMBER_RE = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def _read_members(data: bytes) -> dict[str, bytes]:
    """Open the zip and read every member with hard caps; refuse anything unusual."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"The bundle is larger than {MAX_BUNDLE_BYTES // 2**20} MiB.")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise BundleError("This is not a celebctl bundle (not a zip file).") from None
    except Exception:
        raise BundleError("This is not a celebctl bundle (unreadable zip).") from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise BundleError("The bundle is empty.")
        if len(infos) > MAX_MEMBERS:
            raise BundleError(
                f"The bundle has {len(infos)} members; at most {MAX_MEMBERS} allowed."
            )
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise BundleError("The bundle has duplicate members.")
        members: dict[str, bytes] = {}
        total = 0
        for info in infos:
            name = info.filename
            if (
                not _MEMBER_RE.fullmatch(name)
                or name in (".", "..")
                or name.startswith(".")
            ):
                raise BundleError(
                    f"The bundle member {name[:80]!r} has an unsafe path (only plain file names "
                    "are allowed)."
                )
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode) or stat.S_ISDIR(mode) or info.is_dir():
                raise BundleError(f"The bundle member {name!r} is a link or folder.")
            if info.flag_bits & 0x1:
                raise BundleError("Encrypted bundles are not supported.")
            if info.file_size > MAX_MEMBER_BYTES:
                raise BundleError(f"The bundle member {name!r} is too large.")
            if info.file_size > 65536 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise BundleError(f"The bundle member {name!r} is compressed suspiciously well.")
            try:
                with archive.open(info) as handle:
                    # Read at most one byte more than allowed: the declared size may lie.
                    blob = handle.read(MAX_MEMBER_BYTES + 1)
            except Exception:
                raise BundleError(f"The bundle member {name!r} cannot be read.") from None
            if len(blob) > MAX_MEMBER_BYTES or len(blob) != info.file_size:
                raise BundleError(f"The bundle member {name!r} is not the size it claims.")
            total += len(blob)
            if total > MAX_TOTAL_BYTES:
                raise BundleError("The bundle unpacks to too much data.")
            members[name] = blob
    return members


@dataclass
class BundlePlan:
    """A fully checked bundle, ready to be written."""

    write: registry.IdentityWrite
    original_name: str
    notes: list[str] = field(default_factory=list)
    basis: tuple[bytes, bytes] | None = None  # a carried basis (tensors, toml), checked


def check_bundle(data: bytes, new_name: str | None = None) -> BundlePlan:
    """Validate bundle bytes completely and return what would be written. Writes nothing."""
    members = _read_members(data)
    if registry.IDENTITY_TOML not in members:
        raise BundleError(f"The bundle has no {registry.IDENTITY_TOML}.")
    raw_toml = members[registry.IDENTITY_TOML]
    if len(raw_toml) > MAX_TOML_BYTES:
        raise BundleError(f"The bundle's {registry.IDENTITY_TOML} is too large.")
    try:
        meta = documents.parse_toml(raw_toml)
    except documents.UnsafeDocument as exc:
        raise BundleError(f"The bundle's {registry.IDENTITY_TOML} {exc}.") from None
    try:
        meta = registry.validate_meta(meta, f"The bundle's {registry.IDENTITY_TOML}")
    except (SchemaError, CorruptEntry) as exc:
        raise BundleError(str(exc)) from None
    original = meta["name"]
    files = meta["files"]
    from .bundlebasis import CARRIED_FILES, check_carried_basis

    carried = check_carried_basis(members, meta["basis_id"])
    expected = {registry.IDENTITY_TOML} | {entry["path"] for entry in files.values()}
    if carried is not None:
        expected |= set(CARRIED_FILES)
    if set(members) != expected:
        extra = sorted(set(members) - expected)
        missing = sorted(expected - set(members))
        raise BundleError(
            "The bundle's members do not match its identity.toml"
            + (f"; unexpected: {', '.join(extra)}" if extra else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + "."
        )
    for entry in files.values():
        blob = members[entry["path"]]
        if len(blob) != entry["size"] or checksums.sha256_bytes(blob) != entry["sha256"]:
            raise BundleError(f"The bundle member {entry['path']} does not match its checksum.")
    tensors = parse_safetensors(members[files["coefficients"]["path"]], "coefficients")
    if set(tensors) != {"coefficients"}:
        raise BundleError("The coefficients file must hold exactly one 'coefficients' tensor.")
    coefficients = tensors["coefficients"]
    if coefficients.shape != (2, meta["components"]):
        raise BundleError(
            f"The coefficients have shape {tuple(coefficients.shape)}, expected "
            f"(2, {meta['components']})."
        )
    registry.check_coefficients(coefficients, "The bundle's coefficients", BundleError)
    faces: list[tuple[bytes, Any]] = []
    for index in range(1, registry.MAX_PHOTOS + 1):
        role = registry.face_role(index)
        if role not in files:
            break
        which = f"The bundle's face crop {index}"
        png = members[files[role]["path"]]
        registry.check_face_png(png, which, BundleError)
        embedding = None
        embedding_role = registry.face_role(index, "face_embedding")
        if embedding_role in files:
            tensors = parse_safetensors(members[files[embedding_role]["path"]],
                                        f"face embedding {index}")
            if set(tensors) != {"embedding"}:
                raise BundleError(f"The face embedding must be one ({FACE_EMBEDDING_DIM},) "
                                  "tensor.")
            embedding = tensors["embedding"]
            registry.check_face_embedding(embedding, f"The bundle's face embedding {index}",
                                          BundleError)
        faces.append((png, embedding))
    face_png = faces[0][0] if faces else None
    name = original if new_name is None else new_name  # `--as ""` is an error, not "no --as"
    registry.validate_name(name)
    notes = []
    if face_png is None:
        notes.append(
            f"The bundle has no face crop: '{name}' can be rendered but not refitted with `joint`."
        )
    from . import paths

    basis_toml = paths.bases_dir() / meta["basis_id"] / "basis.toml"
    if basis_toml.exists():
        _check_against_basis(meta)
    elif carried is None:
        notes.append(
            f"Basis {meta['basis_id']} is not on this machine yet: the first render builds it "
            f"from {meta['model']!r}, the model the bundle names, as `add` does (or import a "
            "bundle exported with --with-basis, or `celebctl basis fetch` it).")
    keep = {k: v for k, v in meta.items() if k not in ("files", "name", "schema_version")}
    keep.setdefault("imported_from", original)
    write = registry.IdentityWrite(
        name=name, coefficients=coefficients, meta=keep, face_png=face_png,
        face_embedding=faces[0][1] if faces else None, extra_faces=faces[1:],
    )
    return BundlePlan(write=write, original_name=original, notes=notes, basis=carried)


def _check_against_basis(meta: dict[str, Any]) -> None:
    """Refuse a bundle whose identity cannot belong to the basis it names (on this machine): a
    bundle edited to point at another family's basis would be imported, then fail to render."""
    from . import basis

    try:
        info = basis.get_basis_info(meta["basis_id"])
    except CelebctlError:
        return  # a damaged basis is doctor's to report; the identity itself is sound
    problem = basis.identity_mismatch(info, meta)
    if problem is not None:
        raise BundleError(f"The bundle's identity '{meta['name']}' does not match its basis: "
                          f"{problem}. The bundle was edited or damaged; ask the sender for "
                          "the file again. Nothing was imported.")


def read_bundle(path: Path, new_name: str | None = None) -> BundlePlan:
    """Read a bundle file (a regular file, size-capped) and check it completely; writes
    nothing."""
    path = Path(path)
    try:
        if path.is_dir():
            raise BundleError(f"{path} is a folder, not a .celeb bundle.")
        data = special_files.read_regular_file(path, MAX_BUNDLE_BYTES)
    except special_files.FileRefused as exc:
        raise BundleError(f"{path} {exc.reason}; give the path of a .celeb bundle.") from None
    except FileNotFoundError:
        raise BundleError(f"No such file: {path}.") from None
    except OSError as exc:
        raise BundleError(f"Cannot read {path}: {exc.strerror}.") from None
    return check_bundle(data, new_name)


def import_bundle(path: Path, new_name: str | None = None, replace: bool = False
                  ) -> tuple[registry.Identity, list[str]]:
    """Check a bundle completely, then register it. A bad bundle leaves the registry as it was."""
    plan = read_bundle(path, new_name)
    if registry.identity_exists(plan.write.name) and not replace:
        raise BundleError(
            f"Identity '{plan.write.name}' already exists. Use --as NEW to import under another "
            "name, or --force to replace it."
        )
    notes = list(plan.notes)
    if plan.basis is not None:  # checked by check_bundle; its tensors are checked here
        from .bundlebasis import register_carried_basis

        if register_carried_basis(*plan.basis, source=str(path)):
            notes.append(f"Basis {plan.write.meta['basis_id']} came with the bundle and is now "
                         "registered.")
        _check_against_basis({**plan.write.meta, "name": plan.write.name})
    ident = registry.save_identity(plan.write, replace=replace)
    return ident, notes
