"""Bases on disk: metadata, tensors, listing, lookup, building, removal, and matching a
model to a basis.

On disk a basis is ``bases/<id>/basis.safetensors`` (tensors, written first) and
``bases/<id>/basis.toml`` (metadata, written last: the commit point). The id is a content hash
of what the basis depends on: the embedding table, the tokenizer, the names and p.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import documents, paths
from ..errors import (
    BasisInUse,
    BasisNotFound,
    CelebctlError,
    CorruptEntry,
    SchemaError,
    StorageError,
    did_you_mean,
)
from ..storage import atomic, checksums, locking, special_files
from .compute import (
    _ID_RE,
    _SHA_RE,
    CUMULATIVE_AT,
    ID_LENGTH,
    MAX_MEAN_ABS,
    MAX_META_BYTES,
    MAX_TENSORS_BYTES,
    META_FILE,
    METHOD,
    POSITIONS,
    SCHEMA_VERSION,
    TENSORS_FILE,
    BasisData,
    basis_id_for,
)

FAMILY_NAMES = ("sd1", "sd2", "sdxl")

if TYPE_CHECKING:  # pragma: no cover
    import torch


# --------------------------------------------------------------------------------------------
# Metadata


@dataclass
class BasisInfo:
    """A basis's metadata, as stored in ``basis.toml``."""

    id: str
    path: Path
    model: str
    hidden: int
    components: int
    requested_components: int
    num_names: int
    single_token_names: int
    unique_rows: tuple[int, int]
    rank: tuple[int, int]
    embedding_sha256: str
    tokenizer_sha256: str
    names_sha256: str
    names_source: str
    tensors_sha256: str
    created: str
    celebctl_version: str
    explained_variance_ratio: tuple[list[float], list[float]] = field(repr=False)
    explained_variance_cumulative: dict[str, list[float]] = field(repr=False)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = "sd1"  # sd1, sd2 or sdxl (bases written before 0.2 are SD 1.x)
    encoder_widths: list[int] = field(default_factory=list)  # one per text encoder

    @property
    def p(self) -> int:
        """Number of components per position."""
        return self.components

    @property
    def built_here(self) -> bool:
        """True when this machine built the basis from its model (not fetched): only then is
        its ``model`` something celebctl itself recorded, and may be loaded without asking."""
        return "fetched_from" not in self.extra

    def summary(self) -> str:
        """One line: cumulative explained variance at 10/50/100/all components per position."""
        cum = self.explained_variance_cumulative
        parts = []
        for key in [str(k) for k in CUMULATIVE_AT] + ["all"]:
            values = cum.get(key)
            if values:
                parts.append(f"{key}: {values[0]:.0%}/{values[1]:.0%}")
        return ", ".join(parts)

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``full`` adds the per-component explained variance."""
        data: dict[str, Any] = {
            "id": self.id, "path": str(self.path), "model": self.model, "hidden": self.hidden,
            "components": self.components, "requested_components": self.requested_components,
            "num_names": self.num_names, "single_token_names": self.single_token_names,
            "unique_rows": list(self.unique_rows), "rank": list(self.rank),
            "embedding_sha256": self.embedding_sha256,
            "tokenizer_sha256": self.tokenizer_sha256, "names_sha256": self.names_sha256,
            "names_source": self.names_source, "tensors_sha256": self.tensors_sha256,
            "created": self.created, "celebctl_version": self.celebctl_version,
            "schema_version": self.schema_version, "family": self.family,
            "encoder_widths": list(self.encoder_widths or [self.hidden]),
            "explained_variance_cumulative": dict(self.explained_variance_cumulative),
        }
        if full:
            data["explained_variance_ratio"] = [list(r) for r in self.explained_variance_ratio]
        data.update({k: v for k, v in self.extra.items() if k not in data})
        return data


def _cumulative(ratios: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for k in CUMULATIVE_AT:
        out[str(k)] = [float(sum(r[:k])) for r in ratios]
    out["all"] = [float(sum(r)) for r in ratios]
    return out


def _meta_dict(info: BasisInfo) -> dict[str, Any]:
    """What goes into basis.toml (TOML has no None; every value is a plain type)."""
    meta: dict[str, Any] = {
        "schema_version": info.schema_version,
        "id": info.id,
        "method": METHOD,
        "model": info.model,
        "hidden": info.hidden,
        "components": info.components,
        "requested_components": info.requested_components,
        "num_names": info.num_names,
        "single_token_names": info.single_token_names,
        "unique_rows": list(info.unique_rows),
        "rank": list(info.rank),
        "embedding_sha256": info.embedding_sha256,
        "tokenizer_sha256": info.tokenizer_sha256,
        "names_sha256": info.names_sha256,
        "names_source": info.names_source,
        "tensors_sha256": info.tensors_sha256,
        "created": info.created,
        "celebctl_version": info.celebctl_version,
        "family": info.family,
        "encoder_widths": list(info.encoder_widths or [info.hidden]),
    }
    for key, value in info.extra.items():
        meta.setdefault(key, value)
    meta["explained_variance"] = {
        "ratio_pos1": [float(v) for v in info.explained_variance_ratio[0]],
        "ratio_pos2": [float(v) for v in info.explained_variance_ratio[1]],
        "cumulative": dict(info.explained_variance_cumulative),
    }
    return meta


def _expect(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in meta:
        raise SchemaError(f"{where}: missing key '{key}'.")
    value = meta[key]
    # bool is an int subclass; a TOML `true` is never a count.
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise SchemaError(f"{where}: '{key}' has the wrong type ({type(value).__name__}).")
    return value


def _int_pair(meta: dict[str, Any], key: str, where: str) -> tuple[int, int]:
    value = _expect(meta, key, list, where)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                  for v in value):
        raise SchemaError(f"{where}: '{key}' must be two non-negative integers.")
    return int(value[0]), int(value[1])


def _float_list(value: Any, length: int, key: str, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise SchemaError(f"{where}: '{key}' must be {length} finite numbers.")
    return [float(v) for v in value]


def _optional_int(meta: dict[str, Any], key: str, default: int) -> int:
    value = meta.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


_KNOWN_KEYS = {"schema_version", "id", "method", "model", "hidden", "components", "family",
               "encoder_widths",
               "requested_components", "num_names", "single_token_names", "unique_rows", "rank",
               "embedding_sha256", "tokenizer_sha256", "names_sha256", "names_source",
               "tensors_sha256", "created", "celebctl_version", "explained_variance"}


def parse_meta(meta: dict[str, Any], folder: Path, where: str) -> BasisInfo:
    """Validate a parsed basis.toml (schema, types, id) and return its BasisInfo."""
    version = _expect(meta, "schema_version", int, where)
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{where} has schema_version {version}, newer than this celebctl "
                          f"understands ({SCHEMA_VERSION}); upgrade celebctl.")
    if version < 1:
        raise SchemaError(f"{where}: schema_version {version} is not valid.")
    basis_id = _expect(meta, "id", str, where)
    if not _ID_RE.match(basis_id):
        raise SchemaError(f"{where}: id {basis_id!r} is not {ID_LENGTH} lowercase hex digits.")
    method = meta.get("method", METHOD)
    if method != METHOD:
        raise SchemaError(f"{where}: method {method!r} is not {METHOD!r}.")
    shas = {}
    for key in ("embedding_sha256", "tokenizer_sha256", "names_sha256", "tensors_sha256"):
        shas[key] = _expect(meta, key, str, where)
        if not _SHA_RE.match(shas[key]):
            raise SchemaError(f"{where}: '{key}' is not a sha256 hex digest.")
    hidden = _expect(meta, "hidden", int, where)
    p = _expect(meta, "components", int, where)
    if hidden < 1 or p < 1 or p > hidden:
        raise SchemaError(f"{where}: components ({p}) and hidden ({hidden}) must satisfy "
                          "1 <= components <= hidden.")
    expected_id = basis_id_for(shas["embedding_sha256"], shas["tokenizer_sha256"],
                               shas["names_sha256"], p)
    if expected_id != basis_id:
        raise SchemaError(f"{where}: id {basis_id} does not match its content hashes "
                          f"(expected {expected_id}); the file was edited or damaged.")
    explained = _expect(meta, "explained_variance", dict, where)
    ratios = (_float_list(explained.get("ratio_pos1"), p, "explained_variance.ratio_pos1", where),
              _float_list(explained.get("ratio_pos2"), p, "explained_variance.ratio_pos2", where))
    model = _expect(meta, "model", str, where)
    if not model or len(model) > 1024 or documents.has_control_chars(model):
        raise SchemaError(f"{where}: 'model' must be 1-1024 printable characters.")
    family = meta.get("family", "sd1")
    if family not in FAMILY_NAMES:
        raise SchemaError(f"{where}: family {str(family)[:20]!r} is not one of "
                          f"{', '.join(FAMILY_NAMES)}.")
    widths = meta.get("encoder_widths", [hidden])
    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool)
                                               and w > 0 for w in widths) \
            or sum(widths) != hidden or len(widths) != (2 if family == "sdxl" else 1):
        raise SchemaError(f"{where}: encoder_widths must be the text encoders' widths, adding "
                          f"up to hidden ({hidden}).")
    return BasisInfo(
        id=basis_id,
        path=folder,
        model=model,
        hidden=hidden,
        components=p,
        requested_components=_optional_int(meta, "requested_components", p),
        num_names=_expect(meta, "num_names", int, where),
        single_token_names=_optional_int(meta, "single_token_names", 0),
        unique_rows=_int_pair(meta, "unique_rows", where),
        rank=_int_pair(meta, "rank", where),
        embedding_sha256=shas["embedding_sha256"],
        tokenizer_sha256=shas["tokenizer_sha256"],
        names_sha256=shas["names_sha256"],
        names_source=str(meta.get("names_source", "")),
        tensors_sha256=shas["tensors_sha256"],
        created=str(meta.get("created", "")),
        celebctl_version=str(meta.get("celebctl_version", "")),
        explained_variance_ratio=ratios,
        explained_variance_cumulative=_cumulative(ratios),
        schema_version=version,
        extra={k: v for k, v in meta.items() if k not in _KNOWN_KEYS},
        family=family,
        encoder_widths=widths,
    )


def _read_meta(folder: Path) -> BasisInfo:
    path = folder / META_FILE
    where = str(path)
    try:
        raw = special_files.read_regular_file(path, MAX_META_BYTES, follow_symlinks=False)
        meta = documents.parse_toml(raw)
    except FileNotFoundError as exc:
        raise CorruptEntry(f"Basis folder {folder} has no {META_FILE}: it is incomplete (an "
                           f"interrupted build?). Remove it with `celebctl basis remove "
                           f"{folder.name} --force` and build again.") from exc
    except special_files.FileRefused as exc:
        raise CorruptEntry(f"{where} {exc.reason}.") from None
    except documents.UnsafeDocument as exc:
        raise CorruptEntry(f"{where} {exc}.") from None
    except OSError as exc:
        raise CorruptEntry(f"{where} cannot be read: {exc.strerror or exc}.") from exc
    return parse_meta(meta, folder, where)


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


def info_for_identities(basis_id: str, names: Sequence[str]) -> Any:
    """The metadata of the basis identities use, or BasisNotFound that says how to get it."""
    try:
        return get_basis_info(basis_id)
    except BasisNotFound:
        raise BasisNotFound(
            f"{', '.join(names)} use{'s' if len(names) == 1 else ''} basis {basis_id}, which is "
            "not on this machine. Fetch it from whoever sent the identity (`celebctl basis "
            "fetch`), or build it with `celebctl basis build --model MODEL` for the model the "
            "identity was fitted with."
        ) from None


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
