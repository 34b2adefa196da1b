"""Writing identities crash-safely: save one or a joint set, remove, rename, eval history."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .. import paths
from ..errors import (
    CelebctlError,
    CorruptEntry,
    IdentityChanged,
    IdentityExists,
    IdentityNotFound,
    InvalidName,
    StorageError,
)
from ..storage import atomic, checksums, locking
from .changes import _CHANGES, _expect_toml, _toml_sha
from .listing import forget_in_list_cache
from .reading import (
    Identity,
    _load_identity_dir,
    get_identity,
    identity_dir,
    identity_exists,
    known_names,
    read_toml_quietly,
    symlink_message,
)
from .recovery import (
    _coefficients_sha,
    _journal_path,
    _pending_marker,
    _prune_unreferenced,
    _remove_backups,
    _rename_marker,
    _restore,
    _snapshot,
    discard_folder,
    recover_leftovers,
)
from .schema import (
    IDENTITY_TOML,
    MAX_HISTORY,
    MAX_PHOTOS,
    ROLE_SUFFIX,
    SCHEMA_VERSION,
    check_coefficients,
    check_face_embedding,
    check_face_png,
    face_role,
    role_kind,
    validate_meta,
    validate_name,
)


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


def now_iso() -> str:
    """UTC timestamp, second precision, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _tensor_bytes(array, key: str) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    return save({key: array})


def _role_file(role: str, data: bytes) -> tuple[str, str]:
    kind = (role_kind(role) or (role,))[0]
    sha = checksums.sha256_bytes(data)
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
    atomic.ensure_private_dir(folder)
    files: dict[str, dict[str, Any]] = {}
    for role, data in _prepare_files(write).items():
        filename, sha = _role_file(role, data)
        target = folder / filename
        if not (target.exists() and checksums.sha256_file(target) == sha):
            atomic.atomic_write_bytes(target, data)
        files[role] = {"path": filename, "sha256": sha, "size": len(data)}
    meta = _render_meta(write, files, previous)
    validate_meta(dict(meta), f"identity '{write.name}'", write.name)
    text = tomli_w.dumps(meta)
    _expect_toml(f"identity '{write.name}' was written in full", write.name,
                 checksums.sha256_bytes(text.encode("utf-8")), journal)
    atomic.atomic_write_text(folder / IDENTITY_TOML, text)
    atomic.fsync_dir(folder)


def check_writable() -> None:
    """Fail early (before a long fit) when the data home cannot be written."""
    home = paths.data_home()
    atomic.ensure_private_dir(home)
    atomic.check_writable(home)


@contextlib.contextmanager
def write_lock() -> Iterator[None]:
    """The data home's writer lock; also sweeps leftovers of earlier crashed writers."""
    atomic.ensure_private_dir(paths.data_home())
    with locking.writer_lock(paths.lock_path()):
        recover_leftovers()
        yield


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
        atomic.atomic_write_bytes(marker, b"")
        try:
            _write_into(folder, write, previous, journal)
        finally:
            _prune_unreferenced(folder)
            atomic.remove_file(marker)
    else:
        root = atomic.ensure_private_dir(paths.identities_dir())
        if os.path.lexists(folder):  # a folder with no TOML: debris of an interrupted write
            discard_folder(folder)
        staging = root / f"{write.name}{atomic.TMP_MARK}{os.getpid()}-new"
        atomic.remove_tree(staging)
        try:
            _write_into(staging, write, None, journal)
            atomic.rename(staging, folder)
        except BaseException:
            atomic.remove_tree(staging, ignore_errors=True)
            raise
    forget_in_list_cache([write.name])
    return _load_identity_dir(folder, verify="all")


def save_identity(write: IdentityWrite, replace: bool = False) -> Identity:
    """Write one identity crash-safely. Refuses an existing name unless ``replace``."""
    validate_name(write.name)
    _prepare_files(write)  # check inputs before touching anything
    with write_lock():
        return _commit_identity(write, replace)


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
            atomic.atomic_write_text(journal, json.dumps(plan))
            for write in writes:
                done.append(_commit_identity(write, replace=True, journal=journal))
        except BaseException:
            # If this undo fails too (read-only, say), the journal stays and the next writer
            # undoes the write; the error that stopped it is the one reported.
            with contextlib.suppress(OSError, CelebctlError):
                for name, backup in backups.items():
                    _restore(name, backup)
                atomic.remove_file(journal)
            if not journal.exists():
                _remove_backups(backups)
            raise
        atomic.remove_file(journal)
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
        staging = root / f"{new}{atomic.TMP_MARK}{os.getpid()}-rename"
        marker = _rename_marker(old, new)
        atomic.remove_tree(staging)
        try:
            atomic.ensure_private_dir(staging)
            for entry in ident.meta["files"].values():
                atomic.link_or_copy(source / entry["path"], staging / entry["path"])
            meta = dict(ident.meta)
            meta["name"] = new
            meta["updated"] = now_iso()
            atomic.atomic_write_text(staging / IDENTITY_TOML, tomli_w.dumps(meta))
            if os.path.lexists(identity_dir(new)):  # debris without a TOML
                discard_folder(identity_dir(new))
            # From here a crash is rolled forward by the next writer (finish_rename).
            atomic.atomic_write_bytes(marker, b"")
            toml_sha = checksums.sha256_file(staging / IDENTITY_TOML)
            _CHANGES.append((f"identity '{old}' was renamed to '{new}'",
                             lambda: _toml_sha(identity_dir(new) / IDENTITY_TOML) == toml_sha))
            atomic.rename(staging, identity_dir(new))
        except BaseException:
            # The marker is written after the staging folder is complete, so with the staging
            # folder gone the rename was committed and the marker must stay to roll it forward.
            if os.path.lexists(staging):
                atomic.remove_tree(staging, ignore_errors=True)
                with contextlib.suppress(StorageError):
                    atomic.remove_file(marker)
            raise
        # The new entry is committed; now retire the old one.
        discard_folder(source)
        atomic.remove_file(marker)
        forget_in_list_cache([old, new])
        return _load_identity_dir(identity_dir(new), verify="all")
