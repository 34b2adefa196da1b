"""Bases on disk: tensors, listing, lookup and removal (the metadata is :mod:`.metadata`).

On disk a basis is ``bases/<id>/basis.safetensors`` (tensors, written first) and
``bases/<id>/basis.toml`` (metadata, written last: the commit point). The id is a content hash
of what the basis depends on: the embedding table, the tokenizer, the names and p.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import paths
from ..errors import (
    BasisInUse,
    BasisNotFound,
    CelebctlError,
    CorruptEntry,
    StorageError,
    did_you_mean,
)
from ..storage import atomic, checksums, locking, special_files
from .compute import (
    _ID_RE,
    MAX_MEAN_ABS,
    MAX_TENSORS_BYTES,
    META_FILE,
    POSITIONS,
    SCHEMA_VERSION,
    TENSORS_FILE,
    BasisData,
)
from .metadata import BasisInfo, _read_meta

if TYPE_CHECKING:  # pragma: no cover
    import torch


# --------------------------------------------------------------------------------------------
# Tensors


@dataclass
class Basis:
    """A loaded basis: metadata plus tensors (CPU, fp32)."""

    info: BasisInfo
    mean: torch.Tensor  # (2, hidden)
    components: torch.Tensor  # (2, p, hidden)
    explained_variance_ratio: torch.Tensor  # (2, p)
    token_ids: tuple[torch.Tensor, torch.Tensor]

    @property
    def id(self) -> str:
        """The basis id."""
        return self.info.id

    @property
    def p(self) -> int:
        """Components per position."""
        return int(self.components.shape[1])

    @property
    def hidden(self) -> int:
        """Embedding width."""
        return int(self.mean.shape[1])

    def token_embeddings(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``mean_i + coefficients_i @ components_i``: (..., 2, p) -> (..., 2, hidden)."""
        import torch

        comps = self.components.to(device=coefficients.device, dtype=coefficients.dtype)
        mean = self.mean.to(device=coefficients.device, dtype=coefficients.dtype)
        return mean + torch.einsum("...ip,iph->...ih", coefficients, comps)


def _tensors_for(data: BasisData) -> dict[str, Any]:
    return {
        "mean": data.mean,
        "components": data.components,
        "explained_variance_ratio": data.explained_variance_ratio,
        "token_ids_pos1": data.token_ids[0],
        "token_ids_pos2": data.token_ids[1],
    }


def _serialize(data: BasisData) -> bytes:
    from safetensors.torch import save

    return save(_tensors_for(data), metadata={"format": "celebctl-basis",
                                              "schema_version": str(SCHEMA_VERSION)})


def _check_tensors(tensors: dict[str, Any], info: BasisInfo, where: str) -> None:
    import torch

    p, hidden = info.components, info.hidden
    expected = {"mean": (2, hidden), "components": (2, p, hidden),
                "explained_variance_ratio": (2, p)}
    for key, shape in expected.items():
        tensor = tensors.get(key)
        if tensor is None:
            raise CorruptEntry(f"{where}: tensor '{key}' is missing.")
        if tensor.dtype != torch.float32:
            raise CorruptEntry(f"{where}: tensor '{key}' is {tensor.dtype}, not float32.")
        if tuple(tensor.shape) != shape:
            raise CorruptEntry(f"{where}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                               f"the TOML says {shape}.")
        if not torch.isfinite(tensor).all():
            raise CorruptEntry(f"{where}: tensor '{key}' has NaN or infinite values.")
    for index, position in enumerate(POSITIONS):
        key = f"token_ids_pos{position}"
        ids = tensors.get(key)
        if ids is None or ids.dtype != torch.int64 or ids.dim() != 1:
            raise CorruptEntry(f"{where}: tensor '{key}' must be 1-D int64.")
        if ids.numel() != info.unique_rows[index] or (ids.numel() and int(ids.min()) < 0):
            raise CorruptEntry(f"{where}: tensor '{key}' does not match unique_rows in the TOML.")
    # Token embeddings are small numbers; a mean that overflows fp16 (the dtype models render
    # in) would draw black images without an error.
    if tensors["mean"].abs().max() > MAX_MEAN_ABS:
        raise CorruptEntry(f"{where}: tensor 'mean' has values beyond +-{MAX_MEAN_ABS:g}; that is "
                           "not a token-embedding mean.")
    ratio = tensors["explained_variance_ratio"]
    if (ratio < 0).any() or (ratio > 1 + 1e-4).any() or (ratio.sum(dim=1) > 1 + 1e-3).any():
        raise CorruptEntry(f"{where}: tensor 'explained_variance_ratio' is not a set of "
                           "fractions that sum to at most 1.")
    # Components are orthonormal per position; anything else is not a basis we made.
    comps = tensors["components"].to(torch.float64)
    gram = comps @ comps.transpose(1, 2)
    eye = torch.eye(p, dtype=torch.float64).expand_as(gram)
    if (gram - eye).abs().max() > 1e-3:
        raise CorruptEntry(f"{where}: the components are not orthonormal.")


def _load_tensor_bytes(raw: bytes, where: str) -> dict[str, Any]:
    from safetensors.torch import load

    try:
        return load(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptEntry(f"{where} is not a valid safetensors file ({exc}). celebctl only "
                           "reads safetensors, never pickles.") from exc


def load_basis(basis_id: str, allow_prefix: bool = False) -> Basis:
    """Load a basis by its exact id (or, with ``allow_prefix``, an unambiguous prefix a person
    typed), verifying its checksum and shapes."""
    import torch

    folder = _resolve_folder(basis_id, allow_prefix)
    info = _read_meta(folder)
    path = folder / TENSORS_FILE
    try:
        raw = special_files.read_regular_file(path, MAX_TENSORS_BYTES, follow_symlinks=False)
    except special_files.FileRefused as exc:
        raise CorruptEntry(f"{path} {exc.reason}.") from None
    except FileNotFoundError as exc:
        raise CorruptEntry(f"Basis {info.id} is missing {TENSORS_FILE}. Remove it with "
                           f"`celebctl basis remove {info.id} --force` and build or fetch it "
                           "again.") from exc
    except OSError as exc:
        raise CorruptEntry(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    if checksums.sha256_bytes(raw) != info.tensors_sha256:
        raise CorruptEntry(f"Basis {info.id}: {TENSORS_FILE} does not match the checksum in "
                           f"{META_FILE} (damaged file). Remove it with `celebctl basis remove "
                           f"{info.id} --force` and build or fetch it again.")
    tensors = _load_tensor_bytes(raw, str(path))
    _check_tensors(tensors, info, str(path))
    return Basis(
        info=info, mean=tensors["mean"], components=tensors["components"],
        explained_variance_ratio=tensors["explained_variance_ratio"],
        token_ids=(tensors["token_ids_pos1"].to(torch.int64),
                   tensors["token_ids_pos2"].to(torch.int64)),
    )


# --------------------------------------------------------------------------------------------
# Listing and lookup


class BasisList(list):
    """The readable bases (a list of BasisInfo) plus ``warnings`` for entries that are not."""

    def __init__(self, items: Iterable[BasisInfo] = (), warnings: Iterable[str] = ()):
        super().__init__(items)
        self.warnings: list[str] = list(warnings)


def _basis_folders() -> list[Path]:
    root = paths.bases_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not atomic.is_temp_name(p.name) and not p.is_symlink())


def list_bases() -> BasisList:
    """Every basis on disk, oldest first; broken entries become warnings, never errors."""
    found: list[BasisInfo] = []
    warnings: list[str] = []
    for folder in _basis_folders():
        try:
            info = _read_meta(folder)
            if info.id != folder.name:
                raise CorruptEntry(f"Basis folder {folder.name} holds a TOML for id {info.id}.")
            if not (folder / TENSORS_FILE).is_file():
                raise CorruptEntry(f"Basis {info.id} is missing {TENSORS_FILE}; remove it with "
                                   f"`celebctl basis remove {info.id} --force`.")
        except CelebctlError as exc:
            warnings.append(str(exc))
            continue
        found.append(info)
    found.sort(key=lambda b: (b.created, b.id))
    return BasisList(found, warnings)


def is_basis_id(text: object) -> bool:
    """True for a well-formed basis id: exactly 16 lowercase hex digits."""
    return isinstance(text, str) and bool(_ID_RE.match(text))


def _resolve_folder(basis_id: str, allow_prefix: bool = False) -> Path:
    """The folder of a basis given its exact id, or with ``allow_prefix`` (what a person types
    on the command line) an unambiguous prefix of it. Ids from files are always exact."""
    if not allow_prefix:
        if not is_basis_id(basis_id):
            raise BasisNotFound(f"{str(basis_id)[:40]!r} is not a basis id (16 lowercase hex "
                                "digits). See `celebctl basis list`.")
        folder = paths.bases_dir() / basis_id
        if folder.is_dir() and not folder.is_symlink():
            return folder
        raise BasisNotFound(f"Basis {basis_id} is not on this machine. Build it with "
                            "`celebctl basis build --model MODEL` or fetch it with `celebctl "
                            "basis fetch`; `celebctl basis list` shows what is here.")
    text = basis_id.strip().lower()
    folders = {p.name: p for p in _basis_folders()}
    if text in folders:
        return folders[text]
    matches = [name for name in folders if text and name.startswith(text)] \
        if re.fullmatch(r"[0-9a-f]+", text) else []
    if len(matches) == 1:
        return folders[matches[0]]
    if len(matches) > 1:
        raise BasisNotFound(f"Basis id prefix '{basis_id}' is ambiguous: it matches "
                            f"{', '.join(sorted(matches))}. Give more characters.")
    message = f"No basis '{basis_id}'."
    hint = did_you_mean(text, folders)
    if hint:
        message += f" Did you mean '{hint}'?"
    message += " See `celebctl basis list`."
    raise BasisNotFound(message)


def get_basis_info(basis_id: str, allow_prefix: bool = False) -> BasisInfo:
    """Metadata of one basis (exact id, or a prefix with ``allow_prefix``), without loading its
    tensors."""
    return _read_meta(_resolve_folder(basis_id, allow_prefix))


def basis_users(basis_id: str) -> list[str]:
    """Names of the identities whose identity.toml refers to exactly ``basis_id``.

    Damaged entries count too, as long as their TOML can be read: a basis is never deleted from
    under an identity because something else in its entry is wrong.
    """
    from .. import registry

    root = paths.identities_dir()
    if not root.is_dir():
        return []
    users = []
    for folder in sorted(root.iterdir()):
        if atomic.is_temp_name(folder.name) or folder.is_symlink():
            continue
        meta = registry.read_toml_quietly(folder / "identity.toml")
        if meta is not None and meta.get("basis_id") == basis_id:
            users.append(folder.name)
    return users


def remove_basis(basis_id: str, force: bool = False, allow_prefix: bool = True) -> str:
    """Delete a basis (id, or prefix with ``allow_prefix``); refused with BasisInUse while
    identities use it.

    ``force`` removes it anyway (those identities stop working) and also removes damaged
    entries. Returns the removed id.
    """
    folder = _resolve_folder(basis_id, allow_prefix)
    if not force:
        _read_meta(folder)  # a damaged entry needs --force, so nothing is deleted by accident
    with locking.writer_lock(paths.lock_path()):
        # Checked under the lock, so an identity committed a moment ago is seen.
        users = basis_users(folder.name)
        if users and not force:
            shown = ", ".join(users[:10]) + (" ..." if len(users) > 10 else "")
            raise BasisInUse(
                f"Basis {folder.name} is used by {len(users)} identit"
                f"{'y' if len(users) == 1 else 'ies'}: {shown}. Remove those first "
                "(`celebctl remove NAME`), or pass --force to remove the basis anyway (they "
                "will stop working until it is fetched or built again)."
            )
        # Reverse of the write order: the TOML (commit point) goes first.
        atomic.remove_file(folder / META_FILE)
        atomic.remove_file(folder / TENSORS_FILE)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"Could not remove {folder}: {exc.strerror or exc}.") from exc
    return folder.name
