"""Reading identities: the Identity type, checked loads, sets of identities read whole."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import documents, paths
from ..errors import CorruptEntry, IdentityChanged, IdentityNotFound
from ..storage import atomic, checksums, special_files
from .schema import (
    IDENTITY_TOML,
    JOURNAL_SUFFIX,
    MAX_FACE_FILE_BYTES,
    MAX_TENSOR_FILE_BYTES,
    MAX_TOML_BYTES,
    NAME_RE,
    check_coefficients,
    check_face_embedding,
    face_role,
    role_kind,
    validate_meta,
    validate_name,
)


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
        return documents.parse_toml(special_files.read_regular_file(path, MAX_TOML_BYTES,
                                                              follow_symlinks=False))
    except (OSError, ValueError):
        return None


def _read_toml_file(path: Path, where: str) -> dict[str, Any]:
    try:
        raw = special_files.read_regular_file(path, MAX_TOML_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        raise CorruptEntry(f"{where} is missing.") from None
    except special_files.FileRefused as exc:
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
            if checksums.sha256_file(file) != entry["sha256"]:
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
        data = special_files.read_regular_file(ident.path / entry["path"], limit,
                                         follow_symlinks=False)
    except special_files.FileRefused as exc:
        raise CorruptEntry(f"identities/{ident.name}/{entry['path']} {exc.reason}.") from None
    except OSError as exc:
        raise CorruptEntry(f"identities/{ident.name}/{entry['path']} cannot be read "
                           f"({exc.strerror or exc}).") from None
    if checksums.sha256_bytes(data) != entry["sha256"]:
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
    return sorted(p.name for p in root.iterdir() if not atomic.is_temp_name(p.name))


def get_identity(name: str, verify: str = "all") -> Identity:
    """Load one identity, checking its metadata and (by default) every checksum."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        validate_name(name)
    folder = identity_dir(name)
    if not (folder / IDENTITY_TOML).exists() and not folder.is_dir():
        raise IdentityNotFound(name, known_names())
    return _load_identity_dir(folder, verify=verify)


def identity_exists(name: str) -> bool:
    return (identity_dir(name) / IDENTITY_TOML).exists()


def _stat_key(path: Path | str) -> list[int]:
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_size, st.st_ino]


# --------------------------------------------------------------------------------------------
# identities used together, read as one set while a `joint` write may be under way

# How long a read waits for a joint write that covers its identities.
JOINT_WAIT_S = 15.0


def _joint_journals() -> list[tuple[Path, set[str]]]:
    """Journals of joint writes in progress (or interrupted), with the names each covers."""
    root = paths.identities_dir()
    found = []
    with contextlib.suppress(OSError):
        for journal in root.glob(f"*{atomic.TMP_MARK}*{JOURNAL_SUFFIX}"):
            try:
                plan = documents.parse_json(special_files.read_regular_file(
                    journal, MAX_TOML_BYTES, follow_symlinks=False))
                names = {str(n) for n in plan["identities"]}
            except (OSError, ValueError, KeyError, TypeError):
                names = set()  # unreadable: assume it may cover anything
            found.append((journal, names))
    return found


def _journal_writer_alive(journal: Path) -> bool:
    """Whether the process that wrote a journal still runs (its pid is in the file name)."""
    match = re.search(rf"{re.escape(atomic.TMP_MARK)}(\d+)-", journal.name)
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
