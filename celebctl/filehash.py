"""sha256 of large files (single-file checkpoints), cached by (path, mtime, size, inode).

The WebUI labels images with the first 10 hex digits of a checkpoint's sha256 ("Model hash")
and with the first 12 of each embedding file's ("TI hashes"); tools such as PNG Info, image
browsers and model sites match files by them. Hashing a 2-7 GB checkpoint takes seconds, so
the result is kept in ``cache/file-hashes.json`` of the data home and recomputed only when the
file changes. The cache is an optimisation: anything odd in it means hashing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from . import paths
from .storage import atomic, special_files

MODEL_HASH_CHARS = 10  # the WebUI's "Model hash" (its sha256-based short hash)
EMBEDDING_HASH_CHARS = 12  # the WebUI's "TI hashes"
_CHUNK = 4 * 1024 * 1024
_MAX_CACHE_BYTES = 4 * 1024 * 1024
_MAX_ENTRIES = 256
_lock = threading.Lock()


def _cache_path() -> Path:
    return paths.data_home() / "cache" / "file-hashes.json"


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _load() -> dict[str, Any]:
    try:
        raw = special_files.read_regular_file(_cache_path(), _MAX_CACHE_BYTES,
                                              follow_symlinks=False)
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(entries: dict[str, Any]) -> None:
    try:
        atomic.ensure_private_dir(_cache_path().parent)
        atomic.atomic_write_text(_cache_path(), json.dumps(entries))
    except Exception:  # noqa: BLE001 - a read-only data home must not break a render
        pass


def sha256_file(path: str | Path) -> str:
    """The full sha256 (hex) of ``path``, from the cache when the file is unchanged."""
    path = Path(path).resolve()
    key = str(path)
    stamp = _stat_key(path)
    with _lock:
        entry = _load().get(key)
    if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(
            entry.get("sha256"), str) and len(entry["sha256"]) == 64:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if _stat_key(path) == stamp:  # not changed while we read it
        with _lock:
            entries = _load()
            entries[key] = {"stat": stamp, "sha256": value}
            if len(entries) > _MAX_ENTRIES:
                entries = dict(list(entries.items())[-_MAX_ENTRIES:])
            _save(entries)
    return value


def model_hash(path: str | Path) -> str:
    """The WebUI's "Model hash" of a single-file checkpoint: sha256, first 10 hex digits."""
    return sha256_file(path)[:MODEL_HASH_CHARS]


def embedding_hash(data: bytes) -> str:
    """The WebUI's hash of an embedding file's bytes: sha256, first 12 hex digits."""
    return hashlib.sha256(data).hexdigest()[:EMBEDDING_HASH_CHARS]


class BackgroundHash:
    """A model hash computed on a worker thread while the model loads; ``result()`` waits.

    Any error (an unreadable file) gives None: the hash is a label, never a reason to fail.
    """

    def __init__(self, path: str | Path | None):
        self._value: str | None = None
        self._thread: threading.Thread | None = None
        if path is not None:
            self._thread = threading.Thread(target=self._run, args=(path,), daemon=True,
                                            name="celebctl-model-hash")
            self._thread.start()

    def _run(self, path: str | Path) -> None:
        try:
            self._value = model_hash(path)
        except Exception:  # noqa: BLE001
            self._value = None

    def result(self) -> str | None:
        if self._thread is not None:
            self._thread.join()
        return self._value
