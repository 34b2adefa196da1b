"""Fetching a basis someone else built: a local folder or file, an https:// URL or
``hf://OWNER/REPO/PATH``. Both files are checked completely before anything is written."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .. import __version__, documents, paths
from ..errors import CelebctlError, CorruptEntry, FetchError, InvalidOption
from ..storage import checksums, locking, special_files
from .build import _existing, _now, _write_entry
from .compute import _SHA_RE, MAX_META_BYTES, MAX_TENSORS_BYTES, META_FILE, TENSORS_FILE
from .metadata import BasisInfo, _meta_dict, _read_meta, parse_meta
from .store import _check_tensors, _load_tensor_bytes

# --------------------------------------------------------------------------------------------
# Fetching


def _download_https(url: str, dest: Path, limit: int) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": f"celebctl/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response, open(dest, "wb") as out:
            total = 0
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise FetchError(f"{url} is larger than {limit // (1024 * 1024)} MB; "
                                     "that is not a basis. Nothing was written.")
                out.write(chunk)
    except FetchError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"Could not download {url} ({reason}). Check the network, or download "
                         "basis.safetensors and basis.toml yourself and run `celebctl basis "
                         "fetch FOLDER`. Nothing was written.") from exc


def _companion(name: str, suffix: str) -> str:
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return stem + suffix


def _fetch_pair_https(url: str, tmp: Path) -> tuple[Path, Path]:
    if url.endswith("/"):
        tensors_url, meta_url = url + TENSORS_FILE, url + META_FILE
    elif url.endswith(".toml"):
        tensors_url, meta_url = _companion(url, ".safetensors"), url
    else:
        tensors_url, meta_url = url, _companion(url, ".toml")
    meta_path, tensors_path = tmp / META_FILE, tmp / TENSORS_FILE
    _download_https(meta_url, meta_path, MAX_META_BYTES)
    _download_https(tensors_url, tensors_path, MAX_TENSORS_BYTES)
    return tensors_path, meta_path


def _fetch_pair_hf(source: str) -> tuple[Path, Path]:
    rest = source[len("hf://"):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise InvalidOption(f"'{source}' is not hf://OWNER/REPO[/PATH].")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    if inner.endswith(".safetensors"):
        tensors_name, meta_name = inner, _companion(inner, ".toml")
    elif inner.endswith(".toml"):
        tensors_name, meta_name = _companion(inner, ".safetensors"), inner
    else:
        prefix = inner + "/" if inner else ""
        tensors_name, meta_name = prefix + TENSORS_FILE, prefix + META_FILE
    try:
        from huggingface_hub import hf_hub_download

        meta = Path(hf_hub_download(repo_id=repo_id, filename=meta_name))
        tensors = Path(hf_hub_download(repo_id=repo_id, filename=tensors_name))
    except Exception as exc:  # noqa: BLE001 - hub errors (offline, 404, auth) have many types
        raise FetchError(
            f"Could not download {meta_name} and {tensors_name} from the Hugging Face repo "
            f"{repo_id} ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}). "
            "Check the network and the path; offline, it must already be in the Hugging Face "
            "cache (HF_HOME). Nothing was written."
        ) from exc
    return tensors, meta


def _local_pair(source: str) -> tuple[Path, Path]:
    path = Path(source).expanduser()
    if os.path.exists(path) and not path.is_dir() and not special_files.is_regular_file(path):
        raise FetchError(f"{path} is not a regular file (a pipe, device or socket); pass a "
                         "basis folder or its basis.safetensors file.")
    if path.is_dir():
        tensors, meta = path / TENSORS_FILE, path / META_FILE
    elif path.suffix == ".toml":
        meta = path
        tensors = path.with_suffix(".safetensors")
        if not tensors.is_file():
            tensors = path.parent / TENSORS_FILE
    elif path.is_file() and path.suffix == ".safetensors":
        tensors = path
        meta = path.with_suffix(".toml")
        if not meta.is_file():
            meta = path.parent / META_FILE
    elif path.is_file():
        raise FetchError(f"{path} is not a basis: pass a basis.safetensors file (with its "
                         "basis.toml beside it) or a folder holding both. Pickled files are "
                         "never loaded.")
    else:
        raise FetchError(f"{source} does not exist. Pass a local basis folder or file, an "
                         "https:// URL or hf://OWNER/REPO/PATH.")
    for needed in (tensors, meta):
        if os.path.lexists(needed) and not special_files.is_regular_file(needed):
            raise FetchError(f"{needed} is not a regular file (a pipe, device, socket or "
                             "broken link); nothing was read.")
        if not needed.is_file():
            raise FetchError(f"{needed} is missing: a basis is a basis.safetensors file with its "
                             "basis.toml beside it.")
    return tensors, meta


def fetch_basis(source: str, sha256: str | None = None) -> tuple[BasisInfo, bool]:
    """Register a basis from a local file/folder, an https:// URL or ``hf://OWNER/REPO/PATH``.

    Both files are checked before anything is written: the optional ``sha256`` of
    basis.safetensors, the TOML's schema and types, and tensor shapes, dtypes and values.
    Returns (info, created); created is False when that basis was already registered.
    """
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA_RE.match(sha256):
            raise InvalidOption(f"--sha256 must be 64 hex digits, not {sha256!r}.")
    with tempfile.TemporaryDirectory(prefix="celebctl-fetch-") as tmp_name:
        if source.startswith("https://"):
            tensors_path, meta_path = _fetch_pair_https(source, Path(tmp_name))
        elif source.startswith("hf://"):
            tensors_path, meta_path = _fetch_pair_hf(source)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
            raise FetchError(f"Unsupported source {source}: use https://, hf:// or a local path.")
        else:
            tensors_path, meta_path = _local_pair(source)
        return _register_fetched(source, tensors_path, meta_path, sha256)


def _register_fetched(source: str, tensors_path: Path, meta_path: Path,
                      sha256: str | None) -> tuple[BasisInfo, bool]:
    blobs = []
    for path, limit in ((tensors_path, MAX_TENSORS_BYTES), (meta_path, MAX_META_BYTES)):
        try:
            blobs.append(special_files.read_regular_file(path, limit))
        except special_files.FileRefused as exc:
            raise FetchError(f"{path} {exc.reason}; that is not a basis. Nothing was "
                             "written.") from None
        except OSError as exc:
            raise FetchError(f"Cannot read {path}: {exc.strerror or exc}. Nothing was "
                             "written.") from None
    raw, raw_meta = blobs
    return register_basis_bytes(source, raw, raw_meta, sha256, tensors_path.name, meta_path.name)


def register_basis_bytes(source: str, raw: bytes, raw_meta: bytes, sha256: str | None = None,
                         tensors_name: str = TENSORS_FILE, meta_name: str = META_FILE
                         ) -> tuple[BasisInfo, bool]:
    """Check a basis given as its two files' bytes completely, then register it (unless that
    basis is there already). Returns (info, created); raises FetchError naming ``source``."""
    actual = checksums.sha256_bytes(raw)
    if sha256 is not None and actual != sha256:
        raise FetchError(f"Checksum mismatch for {source}: expected sha256 {sha256}, got "
                         f"{actual}. Nothing was written.")
    try:
        meta = documents.parse_toml(raw_meta)
    except documents.UnsafeDocument as exc:
        raise FetchError(f"{meta_name} from {source} {exc}. Nothing was written.") from None
    try:
        info = parse_meta(meta, paths.bases_dir() / str(meta.get("id", "")), f"{source} (TOML)")
        if actual != info.tensors_sha256:
            raise CorruptEntry(f"{tensors_name} does not match tensors_sha256 in its TOML.")
        tensors = _load_tensor_bytes(raw, tensors_name)
        _check_tensors(tensors, info, tensors_name)
    except CelebctlError as exc:
        raise FetchError(f"Refusing {source}: {exc} Nothing was written.") from exc
    existing = _existing(info.id)
    if existing is not None:
        return existing, False
    # Keys this celebctl does not know are the sender's, not ours: they are not kept. What the
    # entry says about its origin is written here, never taken from the file.
    info.extra = {}
    meta = _meta_dict(info)
    meta["fetched_from"] = source
    meta["fetched"] = _now()
    with locking.writer_lock(paths.lock_path()):
        existing = _existing(info.id)
        if existing is not None:
            return existing, False
        _write_entry(info.id, raw, meta)
    return _read_meta(paths.bases_dir() / info.id), True
