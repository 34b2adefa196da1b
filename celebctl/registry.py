"""Identities on disk: save, load, list, remove, rename.

Layout (see docs/registry.md)::

    identities/<name>/identity.toml                      metadata, the commit point
    identities/<name>/coefficients-<sha12>.safetensors   {"coefficients": (2, p) float32}
    identities/<name>/face-<sha12>.png                   aligned face crop (optional)
    identities/<name>/face_embedding-<sha12>.safetensors {"embedding": (512,) float32} (optional)

Data files carry a content hash in their name, so replacing an identity never overwrites a file
the current TOML points to: a crash at any point leaves the old identity or the new one, whole.
A brand-new identity is assembled in a temp folder and renamed into place; removal renames the
folder away first. Writes that span several steps leave a marker (a temp-named file) so that the
next writer can finish or undo them: a replace prunes its uncommitted files, a rename is rolled
forward, a joint write is rolled back. This module imports numpy and safetensors but never
torch, so `celebctl list` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from . import documents, paths, storage
from .errors import (
    CelebctlError,
    CorruptEntry,
    IdentityChanged,
    IdentityExists,
    IdentityNotFound,
    InvalidName,
    SchemaError,
    StorageError,
)

SCHEMA_VERSION = 3
IDENTITY_TOML = "identity.toml"
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Words a prompt needs for itself; an identity named like them would hijack ordinary prompts.
RESERVED_NAMES = frozenset(
    """a an the and or of with without in on at to by for from as is are be man woman person
    people men women boy girl child face photo picture image portrait painting style art
    celebctl none null true false""".split()
)
# Data files by kind. An identity has one coefficients file and, per source photo, a face crop
# and a face embedding: roles "face" / "face_embedding" for photo 1, "face_2" /
# "face_embedding_2" for photo 2, ... up to MAX_PHOTOS.
FILE_KINDS = ("coefficients", "face", "face_embedding")
ROLE_SUFFIX = {
    "coefficients": ".safetensors",
    "face": ".png",
    "face_embedding": ".safetensors",
}
MAX_PHOTOS = 16
MAX_HISTORY = 50  # eval records kept per identity (the oldest go first)
_ROLE_RE = re.compile(r"(coefficients|face_embedding|face)(?:_([2-9]|1[0-6]))?")


def role_kind(role: str) -> tuple[str, int] | None:
    """("face", 2) for "face_2"; None for a role that is not one of ours."""
    match = _ROLE_RE.fullmatch(role)
    if not match or (match.group(1) == "coefficients" and match.group(2)):
        return None
    return match.group(1), int(match.group(2) or 1)


def face_role(index: int, kind: str = "face") -> str:
    """The role of photo ``index`` (1-based): "face", "face_2", ..."""
    return kind if index == 1 else f"{kind}_{index}"
MAX_COMPONENTS = 4096
MAX_HIDDEN = 8192
MAX_TOML_BYTES = 256 * 1024
MAX_TENSOR_FILE_BYTES = 16 * 1024 * 1024
MAX_FACE_FILE_BYTES = 16 * 1024 * 1024
MAX_MODEL_CHARS = 1024
BASIS_ID_RE = re.compile(r"[0-9a-f]{16}")
FACE_ENCODERS = ("vggface2", "random-init")
FACE_EMBEDDING_DIM = 512
# The fit L2-normalises each coefficient row (and the EMA of unit rows is at most 1 long), and
# face embeddings are unit vectors: anything far outside is not an identity celebctl made.
MAX_COEFFICIENT_ROW_NORM = 1.0 + 1e-3
EMBEDDING_NORM_TOLERANCE = 1e-3

def _migrate_1_to_2(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 allows several source photos: the one [source] table becomes [[sources]]."""
    meta = dict(meta)
    source = meta.pop("source", None)
    meta["sources"] = [source] if isinstance(source, dict) else []
    meta["schema_version"] = 2
    return meta


def _migrate_2_to_3(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 3 records the Stable Diffusion family and the text encoders' widths; everything
    written before it was SD 1.x with one text encoder."""
    meta = dict(meta)
    meta.setdefault("family", "sd1")
    if isinstance(meta.get("hidden"), int) and not isinstance(meta.get("hidden"), bool):
        meta.setdefault("encoder_widths", [meta["hidden"]])
    meta["schema_version"] = 3
    return meta


# Ordered migrations: MIGRATIONS[v] turns a schema-v TOML dict into schema v+1.
MIGRATIONS: dict[int, Any] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}
FAMILIES = ("sd1", "sd2", "sdxl")


# --------------------------------------------------------------------------------------------
# names


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid identity name, else raise :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName("An identity name must be text.")
    shown = name if len(name) <= 40 and name.isprintable() else repr(name[:40])
    if not name:
        raise InvalidName("An identity name cannot be empty.")
    if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise InvalidName(f"Invalid name {shown!s}: names cannot contain path separators.")
    if name.lower() != name and NAME_RE.fullmatch(name.lower()):
        raise InvalidName(
            f"Invalid name '{shown}': use lowercase, e.g. '{name.lower()}'."
        )
    if not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"Invalid name {shown!s}: use one word of 1-32 characters: a lowercase letter, then "
            "lowercase letters, digits, '_' or '-' (for example 'alice' or 'bob_2')."
        )
    if name in RESERVED_NAMES:
        raise InvalidName(
            f"'{name}' is a reserved word that ordinary prompts use; pick another name "
            "(for example 'alice' or 'mr_smith')."
        )
    return name


# --------------------------------------------------------------------------------------------
# data types


@dataclass
class Identity:
    """One registered identity: its folder and parsed metadata."""

    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def basis_id(self) -> str:
        return str(self.meta.get("basis_id", ""))

    @property
    def family(self) -> str:
        """sd1, sd2 or sdxl."""
        return str(self.meta.get("family", "sd1"))

    @property
    def has_face(self) -> bool:
        return "face" in self.meta.get("files", {})

    @property
    def face_count(self) -> int:
        """How many face crops (source photos) the identity keeps."""
        return sum(1 for role in self.meta.get("files", {})
                   if (role_kind(role) or ("", 0))[0] == "face")

    complete: bool = True  # False for entries `list` took from its cache (summary fields only)
    _coefficients: Any = field(default=None, repr=False, compare=False)

    def full(self) -> Identity:
        """This identity with its complete metadata (re-read when it came from the list cache)."""
        return self if self.complete else get_identity(self.name, verify="none")

    def file_path(self, role: str) -> Path | None:
        entry = self.meta.get("files", {}).get(role)
        return self.path / entry["path"] if entry else None

    def load_coefficients(self):
        """The (2, p) float32 coefficients as a numpy array (checksum verified; read once)."""
        if self._coefficients is None:
            data = _read_verified(self.full(), "coefficients")
            array = _parse_tensor(data, "coefficients", self.name)
            check_coefficients(array, f"The coefficients of '{self.name}'", CorruptEntry)
            self._coefficients = array
        return self._coefficients

    def load_face_embedding(self, index: int = 1):
        """The (512,) face embedding of photo ``index`` (1-based), or None when there is none."""
        role = face_role(index, "face_embedding")
        if role not in self.meta.get("files", {}):
            return None
        array = _parse_tensor(_read_verified(self.full(), role), "embedding", self.name)
        check_face_embedding(array, f"The face embedding of '{self.name}'", CorruptEntry)
        return array

    def load_face_embeddings(self) -> list[Any]:
        """Every stored face embedding, photo 1 first (an empty list when there are none)."""
        found = [self.load_face_embedding(i) for i in range(1, self.face_count + 1)]
        return [e for e in found if e is not None]

    def load_face_png(self, index: int = 1) -> bytes | None:
        """The aligned face crop of photo ``index`` as PNG bytes, or None when there is none."""
        role = face_role(index)
        if role not in self.meta.get("files", {}):
            return None
        return _read_verified(self.full(), role)

    def load_face_pngs(self) -> list[bytes]:
        """Every stored face crop, photo 1 first."""
        return [self.load_face_png(i) for i in range(1, self.face_count + 1)]  # type: ignore

    def summary(self) -> dict[str, Any]:
        """What `list --json` shows: the metadata minus bulky fit details."""
        meta = self.meta
        return {
            "name": self.name,
            "basis_id": meta.get("basis_id"),
            "model": meta.get("model"),
            "created": meta.get("created"),
            "updated": meta.get("updated"),
            "components": meta.get("components"),
            "has_face": self.has_face,
            "faces": self.face_count,
            "family": self.family,
            "face_encoder": meta.get("face_encoder"),
        }


@dataclass
class ScanResult:
    """`list_identities` output: good entries plus a warning per broken one."""

    identities: list[Identity] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class IdentityWrite:
    """Everything needed to write one identity."""

    name: str
    coefficients: Any  # numpy (2, p) float32
    meta: dict[str, Any]
    face_png: bytes | None = None
    face_embedding: Any = None  # numpy (512,) float32 or None
    # Photos 2, 3, ...: (face crop PNG, face embedding or None) each.
    extra_faces: list[tuple[bytes, Any]] = field(default_factory=list)
    # sha256 of the coefficients file this write was computed from (joint refits). When the
    # identity on disk no longer has it (changed, renamed or removed meanwhile), the write is
    # refused instead of overwriting or resurrecting it.
    replaces_sha256: str | None = None


# --------------------------------------------------------------------------------------------
# reading


def now_iso() -> str:
    """UTC timestamp, second precision, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def identity_dir(name: str) -> Path:
    return paths.identities_dir() / name


def _parse_toml(raw: bytes, where: str) -> dict[str, Any]:
    try:
        return documents.parse_toml(raw)
    except documents.UnsafeDocument as exc:
        raise CorruptEntry(f"{where} {exc}.") from None


def read_toml_quietly(path: Path) -> dict[str, Any] | None:
    """A registry TOML parsed within the limits, or None when it cannot be (never raises)."""
    try:
        return documents.parse_toml(storage.read_regular_file(path, MAX_TOML_BYTES,
                                                              follow_symlinks=False))
    except (OSError, ValueError):
        return None


def migrate(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring a metadata dict to SCHEMA_VERSION or raise SchemaError."""
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{where} has no valid integer 'schema_version'.")
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} uses schema_version {version}, newer than this celebctl understands "
            f"({SCHEMA_VERSION}). Upgrade celebctl."
        )
    if version < 1:
        raise SchemaError(f"{where} has an invalid schema_version {version}.")
    while version < SCHEMA_VERSION:
        meta = MIGRATIONS[version](meta)
        version = meta["schema_version"]
    return meta


def _expect(meta: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    kinds_t = kinds if isinstance(kinds, tuple) else (kinds,)
    if key not in meta:
        raise SchemaError(f"{where} is missing the key '{key}'.")
    value = meta[key]
    # bool is an int in Python; a TOML `true` where a number belongs is still a type error.
    if not isinstance(value, kinds_t) or (isinstance(value, bool) and bool not in kinds_t):
        wanted = "/".join(k.__name__ for k in kinds_t)
        raise SchemaError(f"{where}: '{key}' should be {wanted}, found {type(value).__name__}.")
    return value


def validate_meta(meta: dict[str, Any], where: str, expected_name: str | None = None) -> dict:
    """Check types and required keys of an identity TOML; raise SchemaError with the reason."""
    meta = migrate(meta, where)
    name = _expect(meta, "name", str, where)
    try:
        validate_name(name)
    except InvalidName as exc:
        raise SchemaError(f"{where}: {exc}") from None
    if expected_name is not None and name != expected_name:
        raise SchemaError(f"{where} names '{name}' but lives in folder '{expected_name}'.")
    try:
        documents.check_document(meta)
    except documents.UnsafeDocument as exc:
        raise SchemaError(f"{where} {exc}.") from None
    basis_id = _expect(meta, "basis_id", str, where)
    if not BASIS_ID_RE.fullmatch(basis_id):
        raise SchemaError(f"{where}: basis_id {basis_id[:40]!r} is not a basis id (16 lowercase "
                          "hex digits, as `celebctl basis list` shows).")
    model = _expect(meta, "model", str, where)
    if not model or len(model) > MAX_MODEL_CHARS or documents.has_control_chars(model):
        raise SchemaError(f"{where}: 'model' must be 1-{MAX_MODEL_CHARS} printable characters.")
    if "face_encoder" in meta and meta["face_encoder"] not in FACE_ENCODERS:
        raise SchemaError(f"{where}: face_encoder {str(meta['face_encoder'])[:40]!r} is not one "
                          f"of {', '.join(FACE_ENCODERS)}.")
    components = _expect(meta, "components", int, where)
    hidden = _expect(meta, "hidden", int, where)
    if not 1 <= components <= MAX_COMPONENTS or not 1 <= hidden <= MAX_HIDDEN:
        raise SchemaError(f"{where}: components/hidden out of range ({components}, {hidden}).")
    family = meta.get("family", "sd1")
    if family not in FAMILIES:
        raise SchemaError(f"{where}: family {str(family)[:20]!r} is not one of "
                          f"{', '.join(FAMILIES)}.")
    widths = meta.get("encoder_widths", [hidden])
    if not isinstance(widths, list) or len(widths) != (2 if family == "sdxl" else 1) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths) \
            or sum(widths) != hidden:
        raise SchemaError(f"{where}: encoder_widths must list the text encoders' widths, adding "
                          f"up to hidden ({hidden}).")
    for key in ("created", "updated"):
        _expect(meta, key, str, where)
    files = _expect(meta, "files", dict, where)
    if "coefficients" not in files:
        raise SchemaError(f"{where}: [files] has no 'coefficients' entry.")
    for role in files:
        if role_kind(role) is None:
            raise SchemaError(f"{where}: unknown file role '{role}'.")
    face_numbers = sorted(n for kind, n in map(role_kind, files) if kind == "face")
    if face_numbers != list(range(1, len(face_numbers) + 1)):
        raise SchemaError(f"{where}: the face files must be numbered 1, 2, ... without gaps.")
    for role, entry in files.items():
        kind = role_kind(role)
        if kind[0] == "face_embedding" and kind[1] not in face_numbers:
            raise SchemaError(f"{where}: files.{role} has no face crop beside it.")
        if not isinstance(entry, dict):
            raise SchemaError(f"{where}: files.{role} should be a table.")
        rel = _expect(entry, "path", str, f"{where} files.{role}")
        sha = _expect(entry, "sha256", str, f"{where} files.{role}")
        size = _expect(entry, "size", int, f"{where} files.{role}")
        if not re.fullmatch(rf"{kind[0]}-[0-9a-f]{{12}}{re.escape(ROLE_SUFFIX[kind[0]])}", rel):
            raise SchemaError(f"{where}: files.{role}.path '{rel}' is not a valid file name.")
        if not re.fullmatch(r"[0-9a-f]{64}", sha) or size < 0:
            raise SchemaError(f"{where}: files.{role} has an invalid sha256 or size.")
    if "fit" in meta and not isinstance(meta["fit"], dict):
        raise SchemaError(f"{where}: 'fit' should be a table.")
    evals = meta.get("evals", [])
    if not isinstance(evals, list) or not all(isinstance(x, dict) for x in evals) \
            or len(evals) > MAX_HISTORY:
        raise SchemaError(f"{where}: 'evals' should be a list of at most {MAX_HISTORY} tables.")
    sources = meta.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(x, dict) for x in sources) \
            or len(sources) > MAX_PHOTOS:
        raise SchemaError(f"{where}: 'sources' should be a list of at most {MAX_PHOTOS} tables.")
    return meta


def _read_toml_file(path: Path, where: str) -> dict[str, Any]:
    try:
        raw = storage.read_regular_file(path, MAX_TOML_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        raise CorruptEntry(f"{where} is missing.") from None
    except storage.FileRefused as exc:
        raise CorruptEntry(f"{where} {exc.reason}.") from None
    except OSError as exc:
        raise CorruptEntry(f"{where} cannot be read ({exc.strerror}).") from exc
    return _parse_toml(raw, where)


def _load_identity_dir(folder: Path, verify: str = "coefficients") -> Identity:
    """Parse and check one identity folder.

    ``verify`` is "none", "coefficients" (hash the small tensor file, check the others exist with
    the recorded size; what `list` does) or "all" (hash every file).
    """
    name = folder.name
    if folder.is_symlink():
        raise CorruptEntry(symlink_message(folder))
    where = f"identities/{name}/{IDENTITY_TOML}"
    meta = validate_meta(_read_toml_file(folder / IDENTITY_TOML, where), where, name)
    ident = Identity(name=name, path=folder, meta=meta)
    for role, entry in meta["files"].items():
        file = folder / entry["path"]
        try:
            st = file.lstat()
        except OSError:
            raise CorruptEntry(
                f"identities/{name}/{entry['path']} is missing; the entry is damaged. "
                f"Remove it (`celebctl remove {name}`) or re-import it."
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntry(f"identities/{name}/{entry['path']} is not a regular file (a "
                               f"link or special file); the entry is damaged. Remove it "
                               f"(`celebctl remove {name}`) or re-import it.")
        size = st.st_size
        if size != entry["size"]:
            raise CorruptEntry(f"identities/{name}/{entry['path']} has the wrong size.")
        if verify == "all" or (verify == "coefficients" and role == "coefficients"):
            if storage.sha256_file(file) != entry["sha256"]:
                raise CorruptEntry(
                    f"identities/{name}/{entry['path']} does not match its checksum."
                )
    return ident


def symlink_message(folder: Path) -> str:
    """What to say about an identity folder that is a symbolic link."""
    try:
        target = os.readlink(folder)
    except OSError:
        target = "?"
    return (f"identities/{folder.name} is a symbolic link (to {target}); celebctl never follows "
            "links in its data home, so it neither reads nor deletes what the link points to. "
            f"Delete the link yourself (`rm {folder}`), and its target if you want its face "
            "data gone, or move the real folder in its place.")


def _read_verified(ident: Identity, role: str) -> bytes:
    entry = ident.meta["files"][role]
    limit = MAX_FACE_FILE_BYTES if (role_kind(role) or ("",))[0] == "face" \
        else MAX_TENSOR_FILE_BYTES
    try:
        data = storage.read_regular_file(ident.path / entry["path"], limit,
                                         follow_symlinks=False)
    except storage.FileRefused as exc:
        raise CorruptEntry(f"identities/{ident.name}/{entry['path']} {exc.reason}.") from None
    except OSError as exc:
        raise CorruptEntry(f"identities/{ident.name}/{entry['path']} cannot be read "
                           f"({exc.strerror or exc}).") from None
    if storage.sha256_bytes(data) != entry["sha256"]:
        raise CorruptEntry(f"identities/{ident.name}/{entry['path']} does not match its checksum.")
    return data


def _parse_tensor(data: bytes, key: str, owner: str):
    import numpy as np
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptEntry(f"The tensor file of '{owner}' is not valid safetensors.") from exc
    if key not in tensors:
        raise CorruptEntry(f"The tensor file of '{owner}' has no '{key}' tensor.")
    array = tensors[key]
    if array.dtype != np.float32 or not np.isfinite(array).all():
        raise CorruptEntry(f"The '{key}' tensor of '{owner}' is not finite float32.")
    return array


def known_names() -> list[str]:
    root = paths.identities_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not storage.is_temp_name(p.name))


def get_identity(name: str, verify: str = "all") -> Identity:
    """Load one identity, checking its metadata and (by default) every checksum."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        validate_name(name)
    folder = identity_dir(name)
    if not (folder / IDENTITY_TOML).exists() and not folder.is_dir():
        raise IdentityNotFound(name, known_names())
    return _load_identity_dir(folder, verify=verify)


JOINT_WAIT_S = 15.0


def _joint_journals() -> list[tuple[Path, set[str]]]:
    """Journals of joint writes in progress (or interrupted), with the names each covers."""
    root = paths.identities_dir()
    found = []
    with contextlib.suppress(OSError):
        for journal in root.glob(f"*{storage.TMP_MARK}*{JOURNAL_SUFFIX}"):
            try:
                plan = documents.parse_json(storage.read_regular_file(
                    journal, MAX_TOML_BYTES, follow_symlinks=False))
                names = {str(n) for n in plan["identities"]}
            except (OSError, ValueError, KeyError, TypeError):
                names = set()  # unreadable: assume it may cover anything
            found.append((journal, names))
    return found


def _journal_writer_alive(journal: Path) -> bool:
    """Whether the process that wrote a journal still runs (its pid is in the file name)."""
    match = re.search(rf"{re.escape(storage.TMP_MARK)}(\d+)-", journal.name)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def read_identity_set(names: Sequence[str], verify: str = "all",
                      wait_s: float | None = None) -> list[Identity]:
    """Read identities that are used together (one prompt, one joint fit) as one consistent set.

    A `joint` write replaces its identities one after another; reading in between would mix a
    new identity with an old partner. This waits (up to ``wait_s``) while a joint write that
    covers any of ``names`` is in progress, and re-reads when an identity changed during the
    read. A joint write that was interrupted (its process is gone) raises IdentityChanged with
    the command that puts them back. Coefficients are loaded as part of the read.
    """
    import time

    deadline = time.monotonic() + (JOINT_WAIT_S if wait_s is None else wait_s)
    wanted = set(names)
    while True:
        busy = [(j, covered) for j, covered in _joint_journals() if not covered or
                covered & wanted]
        if busy:
            stale = [covered for j, covered in busy if not _journal_writer_alive(j)]
            if stale:
                shown = ", ".join(sorted(set().union(*stale) & wanted or set().union(*stale)))
                raise IdentityChanged(
                    f"A `joint` refit of {shown or 'several identities'} was interrupted, so they "
                    "may not belong together right now. Run `celebctl doctor --fix` to put them "
                    "back as they were before it, then try again.")
        else:
            stamps = {}
            idents = []
            with contextlib.suppress(OSError):
                for name in names:
                    stamps[name] = _stat_key(identity_dir(name) / IDENTITY_TOML)
            idents = [get_identity(name, verify=verify) for name in names]
            for ident in idents:
                ident.load_coefficients()
            settled = True
            for name in names:
                try:
                    settled &= stamps.get(name) == _stat_key(identity_dir(name) / IDENTITY_TOML)
                except OSError:
                    settled = False
            if settled and not [j for j, c in _joint_journals() if not c or c & wanted]:
                return idents
        if time.monotonic() > deadline:
            raise IdentityChanged(
                f"Another celebctl process is rewriting {', '.join(sorted(wanted))} (a `joint` "
                "refit); try again when it has finished.")
        time.sleep(0.05)


def identity_exists(name: str) -> bool:
    return (identity_dir(name) / IDENTITY_TOML).exists()


def _stat_key(path: Path | str) -> list[int]:
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _list_cache_path() -> Path:
    return paths.data_home() / "cache" / "list-index.json"


MAX_LIST_CACHE_BYTES = 256 * 1024 * 1024


def _load_list_cache() -> dict[str, Any]:
    try:
        raw = storage.read_regular_file(_list_cache_path(), MAX_LIST_CACHE_BYTES,
                                        follow_symlinks=False)
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _cached_identity(folder: Path, entry: Any) -> Identity | None:
    """Reuse a parsed entry when the TOML and every file it names are unchanged on disk.

    The key is (mtime_ns, size, inode) of each file, as git's index does; any write changes it.
    The cache is an optimisation only: anything odd means a full parse and verification.
    """
    try:
        base = str(folder)
        if not isinstance(entry, dict) or entry.get("toml") != _stat_key(
                os.path.join(base, IDENTITY_TOML)):
            return None
        meta = entry["meta"]
        stamps = entry["files"]
        for role, file_entry in meta["files"].items():
            if stamps.get(role) != _stat_key(os.path.join(base, file_entry["path"])):
                return None
        return Identity(name=folder.name, path=folder, meta=meta, complete=False)
    except (OSError, KeyError, TypeError, AttributeError):
        return None


def _cache_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What the list cache keeps of an identity: no biometric detail (photo name and hash, face
    box) and no file checksums, only what `list` shows and the file names it stats."""
    kept = {k: v for k, v in meta.items() if k not in ("source", "sources", "files")}
    kept["files"] = {role: {"path": entry["path"], "size": entry["size"]}
                     for role, entry in meta["files"].items()}
    return kept


def forget_in_list_cache(names: Iterable[str]) -> None:
    """Drop identities from the list cache at once (after a remove, rename or rewrite)."""
    names = set(names)
    cache = _load_list_cache()
    if names & set(cache):
        _save_list_cache({k: v for k, v in cache.items() if k not in names})


def _save_list_cache(entries: dict[str, Any]) -> None:
    try:
        storage.ensure_private_dir(_list_cache_path().parent)
        payload = {"schema_version": SCHEMA_VERSION, "entries": entries}
        storage.atomic_write_text(_list_cache_path(), json.dumps(payload))
    except Exception:  # a read-only data home must not break `list`
        pass


def list_identities() -> ScanResult:
    """Every identity, sorted by name. Broken entries become warnings, never exceptions."""
    result = ScanResult()
    root = paths.identities_dir()
    if not root.is_dir():
        return result
    cache = _load_list_cache()
    fresh: dict[str, Any] = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if storage.is_temp_name(folder.name):
            if folder.name.endswith(JOURNAL_SUFFIX):
                result.warnings.append(
                    "A `joint` refit is being written or was interrupted; if it was interrupted, "
                    "the next change to the registry (or `celebctl doctor --fix`) puts its "
                    "identities back as they were."
                )
            continue
        if not folder.is_dir():
            result.warnings.append(f"identities/{folder.name} is not a folder; ignored.")
            continue
        cached = cache.get(folder.name)
        ident = _cached_identity(folder, cached)
        if ident is not None:
            result.identities.append(ident)
            fresh[folder.name] = cached  # just checked against the disk
            continue
        try:
            ident = _load_identity_dir(folder, verify="coefficients")
        except (CorruptEntry, SchemaError) as exc:
            result.warnings.append(f"Skipping '{folder.name}': {exc}")
            continue
        except OSError as exc:
            result.warnings.append(f"Skipping '{folder.name}': cannot be read ({exc}).")
            continue
        result.identities.append(ident)
        try:
            fresh[folder.name] = {
                "toml": _stat_key(folder / IDENTITY_TOML),
                "files": {role: _stat_key(folder / e["path"])
                          for role, e in ident.meta["files"].items()},
                "meta": _cache_meta(ident.meta),
            }
        except OSError:
            pass
    if fresh != cache:
        _save_list_cache(fresh)
    return result


# --------------------------------------------------------------------------------------------
# writing


def _tensor_bytes(array, key: str) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    return save({key: array})


def _role_file(role: str, data: bytes) -> tuple[str, str]:
    kind = (role_kind(role) or (role,))[0]
    sha = storage.sha256_bytes(data)
    return f"{kind}-{sha[:12]}{ROLE_SUFFIX[kind]}", sha


def _render_meta(write: IdentityWrite, files: dict[str, dict[str, Any]],
                 previous: dict[str, Any] | None) -> dict[str, Any]:
    import numpy as np

    coeffs = np.asarray(write.coefficients)
    meta = dict(write.meta)
    meta["schema_version"] = SCHEMA_VERSION
    meta["name"] = write.name
    stamp = now_iso()
    meta["created"] = (previous or {}).get("created", meta.get("created", stamp))
    meta["updated"] = stamp
    meta["components"] = int(coeffs.shape[1])
    meta.setdefault("hidden", int(meta.get("hidden", 0)))
    meta.setdefault("family", "sd1")
    meta.setdefault("encoder_widths", [meta["hidden"]])
    meta["files"] = files
    # Put scalar keys first so the TOML reads well; tomli_w needs tables after values anyway.
    scalars = {k: v for k, v in meta.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in meta.items() if isinstance(v, dict)}
    return {**scalars, **tables}


def _check_unchanged(write: IdentityWrite) -> None:
    """Refuse a write computed from an identity that changed or vanished since. Lock held."""
    if write.replaces_sha256 is None:
        return
    current = _coefficients_sha(identity_dir(write.name))
    if current is None:
        raise IdentityChanged(
            f"Identity '{write.name}' was removed or renamed by another celebctl process while "
            "this command ran; nothing was written. Check `celebctl list` and run it again."
        )
    if current != write.replaces_sha256:
        raise IdentityChanged(
            f"Identity '{write.name}' was changed by another celebctl process while this command "
            "ran; nothing was written. Run it again."
        )


def check_coefficients(coefficients, where: str, error: type[CelebctlError] = CorruptEntry
                       ) -> None:
    """A (2, p) finite array whose rows are at most unit length, or ``error`` saying what is
    wrong (the fit normalises each row, so longer rows were not made by a fit)."""
    import numpy as np

    array = np.asarray(coefficients)
    if array.ndim != 2 or array.shape[0] != 2 or not 1 <= array.shape[1] <= MAX_COMPONENTS:
        raise error(f"{where}: coefficients must have shape (2, p), got {array.shape}.")
    if not np.isfinite(array).all():
        raise error(f"{where}: coefficients contain NaN or Inf.")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    if (norms > MAX_COEFFICIENT_ROW_NORM).any():
        raise error(f"{where}: the coefficient rows have lengths {norms.max():.4g}; a fit gives "
                    "rows of length at most 1, so these are not coefficients celebctl made.")


def check_face_embedding(embedding, where: str, error: type[CelebctlError] = CorruptEntry
                         ) -> None:
    """A finite (512,) unit vector, or ``error`` saying what is wrong."""
    import numpy as np

    array = np.asarray(embedding)
    if array.shape != (FACE_EMBEDDING_DIM,):
        raise error(f"{where} must be one ({FACE_EMBEDDING_DIM},) vector, not {array.shape}.")
    if not np.isfinite(array).all():
        raise error(f"{where} contains NaN or Inf.")
    norm = float(np.linalg.norm(array.astype(np.float64)))
    if abs(norm - 1.0) > EMBEDDING_NORM_TOLERANCE:
        raise error(f"{where} has length {norm:.4g}; face embeddings are unit vectors.")


# celebctl's crops are 512 x 512; anything not square or outside these sides is not a face crop
# a fit can use.
MIN_FACE_SIDE = 64
MAX_FACE_SIDE = 2048


def check_face_png(data: bytes, where: str, error: type[CelebctlError] = CorruptEntry) -> None:
    """A decodable square PNG face crop of sane size, or ``error`` saying what is wrong."""
    import io

    from PIL import Image

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise error(f"{where} is not a PNG image.")
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            width, height = image.size
            if width != height or not MIN_FACE_SIDE <= width <= MAX_FACE_SIDE:
                raise error(f"{where} is {width}x{height} px; a face crop is square, "
                            f"{MIN_FACE_SIDE} to {MAX_FACE_SIDE} px a side (celebctl writes "
                            "512 x 512).")
            image.load()
    except CelebctlError:
        raise
    except Exception:  # any decoder failure on untrusted bytes
        raise error(f"{where} is not a readable PNG image.") from None


def _prepare_files(write: IdentityWrite) -> dict[str, bytes]:
    check_coefficients(write.coefficients, f"identity '{write.name}'")
    faces = []
    if write.face_png is not None:
        faces.append((write.face_png, write.face_embedding))
    elif write.face_embedding is not None or write.extra_faces:
        raise CorruptEntry(f"identity '{write.name}': face data without a first face crop.")
    faces += list(write.extra_faces)
    if len(faces) > MAX_PHOTOS:
        raise CorruptEntry(f"identity '{write.name}': at most {MAX_PHOTOS} photos.")
    blobs = {"coefficients": _tensor_bytes(write.coefficients, "coefficients")}
    for index, (png, embedding) in enumerate(faces, start=1):
        check_face_png(bytes(png), f"The face crop of '{write.name}' (photo {index})")
        blobs[face_role(index)] = bytes(png)
        if embedding is not None:
            check_face_embedding(embedding, f"The face embedding of '{write.name}' (photo "
                                            f"{index})")
            blobs[face_role(index, "face_embedding")] = _tensor_bytes(embedding, "embedding")
    return blobs


def _write_into(folder: Path, write: IdentityWrite, previous: dict[str, Any] | None,
                journal: Path | None = None) -> None:
    """Write the data files then the TOML (the commit point) into ``folder``."""
    storage.ensure_private_dir(folder)
    files: dict[str, dict[str, Any]] = {}
    for role, data in _prepare_files(write).items():
        filename, sha = _role_file(role, data)
        target = folder / filename
        if not (target.exists() and storage.sha256_file(target) == sha):
            storage.atomic_write_bytes(target, data)
        files[role] = {"path": filename, "sha256": sha, "size": len(data)}
    meta = _render_meta(write, files, previous)
    validate_meta(dict(meta), f"identity '{write.name}'", write.name)
    text = tomli_w.dumps(meta)
    _expect_toml(f"identity '{write.name}' was written in full", write.name,
                 storage.sha256_bytes(text.encode("utf-8")), journal)
    storage.atomic_write_text(folder / IDENTITY_TOML, text)
    storage.fsync_dir(folder)


def _prune_unreferenced(folder: Path) -> None:
    """Delete data files the committed TOML no longer points to (old generations, temp files)."""
    meta = read_toml_quietly(folder / IDENTITY_TOML)
    try:
        keep = {entry["path"] for entry in meta["files"].values()}  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        return
    keep.add(IDENTITY_TOML)
    for child in folder.iterdir():
        if child.name not in keep and child.is_file():
            with contextlib.suppress(OSError, StorageError):
                storage.remove_file(child)


PENDING_SUFFIX = "pending"
RENAME_INFIX = "rename-to-"
JOURNAL_SUFFIX = "joint-journal"


def _pending_marker(name: str) -> Path:
    return paths.identities_dir() / f"{name}{storage.TMP_MARK}{PENDING_SUFFIX}"


def _rename_marker(old: str, new: str) -> Path:
    return paths.identities_dir() / f"{old}{storage.TMP_MARK}{RENAME_INFIX}{new}"


def _journal_path() -> Path:
    return paths.identities_dir() / f"joint{storage.TMP_MARK}{os.getpid()}-{JOURNAL_SUFFIX}"


def discard_folder(folder: Path) -> None:
    """Delete an identity folder: rename it away in one step, then its TOML, then the rest.

    Caller holds the writer lock. A crash part-way leaves only a temp-named folder, which the
    next writer deletes.
    """
    if not os.path.lexists(folder):
        return
    if folder.is_symlink():  # only the link itself is ours; what it points to is not
        storage.remove_file(folder)
        return
    trash = storage.temp_path_for(folder)
    storage.rename(folder, trash)
    storage.remove_file(trash / IDENTITY_TOML)
    storage.remove_tree(trash, ignore_errors=True)


def _coefficients_sha(folder: Path) -> str | None:
    """sha256 of the coefficients the committed TOML names; None when there is no TOML."""
    if not os.path.lexists(folder / IDENTITY_TOML):
        return None
    meta = read_toml_quietly(folder / IDENTITY_TOML)
    try:
        return str(meta["files"]["coefficients"]["sha256"])  # type: ignore[index]
    except (KeyError, TypeError):
        return "unreadable"


def finish_pending_replace(marker: Path) -> None:
    """A replace of that identity may have left new files its TOML never came to name: prune."""
    folder = paths.identities_dir() / marker.name.split(storage.TMP_MARK)[0]
    if (folder / IDENTITY_TOML).exists():
        _prune_unreferenced(folder)
    storage.remove_file(marker)


def finish_rename(marker: Path) -> None:
    """Roll an interrupted rename forward: once the new entry is committed, retire the old one."""
    old, _, rest = marker.name.partition(storage.TMP_MARK)
    new = rest[len(RENAME_INFIX):]
    root = paths.identities_dir()
    if NAME_RE.fullmatch(old) and NAME_RE.fullmatch(new) and old != new:
        new_sha = _coefficients_sha(root / new)
        old_sha = _coefficients_sha(root / old)
        # Retire the old entry only when it is the renamed one (same coefficients) or debris.
        if new_sha not in (None, "unreadable") and old_sha in (new_sha, None):
            discard_folder(root / old)
    storage.remove_file(marker)


def roll_back_joint(journal: Path) -> None:
    """Put every identity of an interrupted joint write back as it was, from its snapshot."""
    root = paths.identities_dir()
    try:
        plan = json.loads(journal.read_text("utf-8"))
        entries = [(str(name), backup) for name, backup in plan["identities"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        entries = []  # written atomically, so only a hand-made file gets here: nothing to undo
    for name, backup in entries:
        if not NAME_RE.fullmatch(name):
            continue
        if backup is None:
            _restore(name, None)
        elif isinstance(backup, str) and storage.is_temp_name(backup) and "/" not in backup \
                and (root / backup / IDENTITY_TOML).is_file():
            _restore(name, root / backup)
    storage.remove_file(journal)


def recover_leftovers() -> list[Path]:
    """Finish or undo what killed writers left behind, then delete their temp files.

    Caller holds the writer lock. Interrupted joint writes are rolled back first (their
    snapshots are temp folders), then renames rolled forward, then replaces pruned. Returns the
    temp files and folders deleted (here and in the list cache's folder, which `list` writes
    without the lock: a temp file it is writing at this moment only costs it its cache update).
    """
    root = paths.identities_dir()
    removed = storage.clean_temp_files(_list_cache_path().parent)
    if not root.is_dir():
        return removed
    for journal in sorted(root.glob(f"*{storage.TMP_MARK}*{JOURNAL_SUFFIX}")):
        roll_back_joint(journal)
    for marker in sorted(root.glob(f"*{storage.TMP_MARK}{RENAME_INFIX}*")):
        finish_rename(marker)
    for marker in sorted(root.glob(f"*{storage.TMP_MARK}{PENDING_SUFFIX}")):
        finish_pending_replace(marker)
    return removed + storage.clean_temp_files(root)


def check_writable() -> None:
    """Fail early (before a long fit) when the data home cannot be written."""
    home = paths.data_home()
    storage.ensure_private_dir(home)
    storage.check_writable(home)


@contextlib.contextmanager
def write_lock() -> Iterator[None]:
    """The data home's writer lock; also sweeps leftovers of earlier crashed writers."""
    storage.ensure_private_dir(paths.data_home())
    with storage.writer_lock(paths.lock_path()):
        recover_leftovers()
        yield


# Registry changes this process set out to make, each with a check of whether it is on disk
# now. After Ctrl-C the CLI reports the ones that took effect instead of guessing.
_CHANGES: list[tuple[str, Any]] = []


def change_mark() -> int:
    """A position in this process's change log (see :func:`changes_since`)."""
    return len(_CHANGES)


def changes_since(mark: int) -> list[str]:
    """What this process changed in the registry since ``mark`` that is committed on disk,
    described in words ("identity 'alice' was written in full")."""
    done = []
    for what, is_done in _CHANGES[mark:]:
        with contextlib.suppress(Exception):
            if is_done() and what not in done:
                done.append(what)
    return done


def _toml_sha(path: Path) -> str | None:
    try:
        return storage.sha256_bytes(storage.read_regular_file(path, MAX_TOML_BYTES,
                                                              follow_symlinks=False))
    except (OSError, ValueError):
        return None


def _expect_toml(what: str, name: str, sha: str, journal: Path | None = None) -> None:
    """Log a change that is committed once identities/<name>/identity.toml has sha ``sha`` (and,
    for a joint write, once its journal is gone)."""
    def is_done() -> bool:
        return _toml_sha(identity_dir(name) / IDENTITY_TOML) == sha and not (
            journal is not None and os.path.lexists(journal))

    _CHANGES.append((what, is_done))


def _commit_identity(write: IdentityWrite, replace: bool,
                     journal: Path | None = None) -> Identity:
    """Write one identity. Caller holds the lock; ``journal`` is that of a joint write."""
    folder = identity_dir(write.name)
    if folder.is_symlink():
        raise CorruptEntry(symlink_message(folder))
    _check_unchanged(write)
    existing = (folder / IDENTITY_TOML).exists()
    if existing and not replace:
        raise IdentityExists(
            f"Identity '{write.name}' already exists. Use --replace to overwrite it, or pick "
            "another name."
        )
    if existing:
        previous = read_toml_quietly(folder / IDENTITY_TOML)
        marker = _pending_marker(write.name)
        storage.atomic_write_bytes(marker, b"")
        try:
            _write_into(folder, write, previous, journal)
        finally:
            _prune_unreferenced(folder)
            storage.remove_file(marker)
    else:
        root = storage.ensure_private_dir(paths.identities_dir())
        if os.path.lexists(folder):  # a folder with no TOML: debris of an interrupted write
            discard_folder(folder)
        staging = root / f"{write.name}{storage.TMP_MARK}{os.getpid()}-new"
        storage.remove_tree(staging)
        try:
            _write_into(staging, write, None, journal)
            storage.rename(staging, folder)
        except BaseException:
            storage.remove_tree(staging, ignore_errors=True)
            raise
    forget_in_list_cache([write.name])
    return _load_identity_dir(folder, verify="all")


def save_identity(write: IdentityWrite, replace: bool = False) -> Identity:
    """Write one identity crash-safely. Refuses an existing name unless ``replace``."""
    validate_name(write.name)
    _prepare_files(write)  # check inputs before touching anything
    with write_lock():
        return _commit_identity(write, replace)


def _snapshot(name: str) -> Path | None:
    """Hard-link an identity's files aside (copies where links fail) so it can be restored."""
    folder = identity_dir(name)
    if not (folder / IDENTITY_TOML).exists():
        return None
    backup = paths.identities_dir() / f"{name}{storage.TMP_MARK}{os.getpid()}-backup"
    storage.remove_tree(backup)
    storage.ensure_private_dir(backup)
    for child in folder.iterdir():
        if child.is_file() and not child.is_symlink() and not storage.is_temp_name(child.name):
            storage.link_or_copy(child, backup / child.name)
    return backup


def _restore(name: str, backup: Path | None) -> None:
    """Put an identity back as ``backup`` holds it (None: it did not exist). Idempotent.

    Links need no free space, so this works on a full disk.
    """
    folder = identity_dir(name)
    if backup is None:
        discard_folder(folder)
        return
    # Restore files first, then the TOML (commit point), exactly like a normal write.
    storage.ensure_private_dir(folder)
    for child in backup.iterdir():
        if child.name != IDENTITY_TOML and not (folder / child.name).exists():
            storage.link_or_copy(child, folder / child.name)
    storage.install_file(backup / IDENTITY_TOML, folder / IDENTITY_TOML)
    _prune_unreferenced(folder)


def save_identities(writes: Iterable[IdentityWrite], replace: bool = True) -> list[Identity]:
    """Write several identities as one step: if any write fails, all are put back as they were.

    Each identity on its own is always old-or-new in full, even across a crash; the rollback
    covers errors raised in this process (disk full, a bad tensor, Ctrl-C).
    """
    writes = list(writes)
    for write in writes:
        validate_name(write.name)
        _prepare_files(write)
    if len({w.name for w in writes}) != len(writes):
        raise InvalidName("The same identity is named twice.")
    with write_lock():
        for write in writes:
            if identity_exists(write.name) and not replace:
                raise IdentityExists(f"Identity '{write.name}' already exists.")
            _check_unchanged(write)
        backups: dict[str, Path | None] = {}
        journal = _journal_path()
        done: list[Identity] = []
        try:
            for write in writes:
                backups[write.name] = _snapshot(write.name)
            # The journal names the snapshots: until it is deleted (the commit point of the
            # whole write), a crash is undone by the next writer (recover_leftovers).
            plan = {"identities": {n: b.name if b else None for n, b in backups.items()}}
            storage.atomic_write_text(journal, json.dumps(plan))
            for write in writes:
                done.append(_commit_identity(write, replace=True, journal=journal))
        except BaseException:
            # If this undo fails too (read-only, say), the journal stays and the next writer
            # undoes the write; the error that stopped it is the one reported.
            with contextlib.suppress(OSError, CelebctlError):
                for name, backup in backups.items():
                    _restore(name, backup)
                storage.remove_file(journal)
            if not journal.exists():
                _remove_backups(backups)
            raise
        storage.remove_file(journal)
        _remove_backups(backups)
        return done


def faces_of(ident: Identity) -> list[tuple[bytes, Any]]:
    """Every (face crop PNG, face embedding or None) of an identity, photo 1 first."""
    return [(ident.load_face_png(k), ident.load_face_embedding(k))  # type: ignore[misc]
            for k in range(1, ident.face_count + 1)]


def append_history(names: Sequence[str], key: str, record: dict[str, Any]) -> list[Identity]:
    """Append ``record`` to the ``key`` list (e.g. "evals") of each identity's metadata, all in
    one step, keeping the newest MAX_HISTORY. The data files are written back unchanged; an
    identity changed by another process meanwhile is refused (IdentityChanged)."""
    writes = []
    for name in names:
        ident = get_identity(name, verify="all")
        meta = {k: v for k, v in ident.meta.items()
                if k not in ("files", "name", "schema_version", "created", "updated")}
        meta[key] = (list(meta.get(key, [])) + [dict(record)])[-MAX_HISTORY:]
        faces = faces_of(ident)
        writes.append(IdentityWrite(
            name=name, coefficients=ident.load_coefficients(), meta=meta,
            face_png=faces[0][0] if faces else None,
            face_embedding=faces[0][1] if faces else None, extra_faces=faces[1:],
            replaces_sha256=ident.meta["files"]["coefficients"]["sha256"]))
    return save_identities(writes, replace=True)


def _remove_backups(backups: dict[str, Path | None]) -> None:
    for backup in backups.values():
        if backup is not None:
            storage.remove_tree(backup, ignore_errors=True)


def remove_identity(name: str) -> Identity:
    """Delete an identity: its folder is renamed away (atomic) and then deleted."""
    validate_name(name)
    with write_lock():
        folder = identity_dir(name)
        if not os.path.lexists(folder):
            raise IdentityNotFound(name, known_names())
        if folder.is_symlink():
            raise CorruptEntry(symlink_message(folder))
        ident: Identity
        try:
            ident = _load_identity_dir(folder, verify="none")
        except CelebctlError:
            ident = Identity(name=name, path=folder, meta={})  # removing a broken entry is fine
        # The folder is renamed away in one step (the entry, face crop and embedding disappear
        # together), then its TOML goes first, then the rest.
        _CHANGES.append((f"identity '{name}' was removed",
                         lambda: not os.path.lexists(folder)))
        discard_folder(folder)
        forget_in_list_cache([name])
        return ident


def rename_identity(old: str, new: str) -> Identity:
    """Rename an identity. The new entry is complete before the old one disappears."""
    validate_name(old)
    validate_name(new)
    if old == new:
        return get_identity(old)
    with write_lock():
        source = identity_dir(old)
        for folder in (source, identity_dir(new)):
            if folder.is_symlink():
                raise CorruptEntry(symlink_message(folder))
        if not (source / IDENTITY_TOML).exists():
            raise IdentityNotFound(old, known_names())
        if identity_dir(new).exists() and (identity_dir(new) / IDENTITY_TOML).exists():
            raise IdentityExists(
                f"Identity '{new}' already exists. Remove it first or pick another name."
            )
        ident = _load_identity_dir(source, verify="all")
        root = paths.identities_dir()
        staging = root / f"{new}{storage.TMP_MARK}{os.getpid()}-rename"
        marker = _rename_marker(old, new)
        storage.remove_tree(staging)
        try:
            storage.ensure_private_dir(staging)
            for entry in ident.meta["files"].values():
                storage.link_or_copy(source / entry["path"], staging / entry["path"])
            meta = dict(ident.meta)
            meta["name"] = new
            meta["updated"] = now_iso()
            storage.atomic_write_text(staging / IDENTITY_TOML, tomli_w.dumps(meta))
            if os.path.lexists(identity_dir(new)):  # debris without a TOML
                discard_folder(identity_dir(new))
            # From here a crash is rolled forward by the next writer (finish_rename).
            storage.atomic_write_bytes(marker, b"")
            toml_sha = storage.sha256_file(staging / IDENTITY_TOML)
            _CHANGES.append((f"identity '{old}' was renamed to '{new}'",
                             lambda: _toml_sha(identity_dir(new) / IDENTITY_TOML) == toml_sha))
            storage.rename(staging, identity_dir(new))
        except BaseException:
            # The marker is written after the staging folder is complete, so with the staging
            # folder gone the rename was committed and the marker must stay to roll it forward.
            if os.path.lexists(staging):
                storage.remove_tree(staging, ignore_errors=True)
                with contextlib.suppress(StorageError):
                    storage.remove_file(marker)
            raise
        # The new entry is committed; now retire the old one.
        discard_folder(source)
        storage.remove_file(marker)
        forget_in_list_cache([old, new])
        return _load_identity_dir(identity_dir(new), verify="all")


def identities_using_basis(basis_id: str) -> list[str]:
    """Names of the (readable) identities that refer to ``basis_id``."""
    return [i.name for i in list_identities().identities if i.basis_id == basis_id]
