"""`list`: every identity sorted by name, broken ones as warnings, via a stat-keyed cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import CorruptEntry, SchemaError
from ..storage import atomic, special_files
from .reading import Identity, _load_identity_dir, _stat_key
from .schema import IDENTITY_TOML, JOURNAL_SUFFIX, SCHEMA_VERSION


@dataclass
class ScanResult:
    """`list_identities` output: good entries plus a warning per broken one."""

    identities: list[Identity] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _list_cache_path() -> Path:
    return paths.data_home() / "cache" / "list-index.json"


MAX_LIST_CACHE_BYTES = 256 * 1024 * 1024


def _load_list_cache() -> dict[str, Any]:
    try:
        raw = special_files.read_regular_file(_list_cache_path(), MAX_LIST_CACHE_BYTES,
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
        atomic.ensure_private_dir(_list_cache_path().parent)
        payload = {"schema_version": SCHEMA_VERSION, "entries": entries}
        atomic.atomic_write_text(_list_cache_path(), json.dumps(payload))
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
        if atomic.is_temp_name(folder.name):
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


def identities_using_basis(basis_id: str) -> list[str]:
    """Names of the (readable) identities that refer to ``basis_id``."""
    return [i.name for i in list_identities().identities if i.basis_id == basis_id]
