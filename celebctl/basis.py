"""The celeb basis: celebrity names -> token-embedding rows -> mean + principal directions.

For each name, the rows of the text encoder's input token-embedding table at BPE positions 1 and 2
(the two tokens after ``<|startoftext|>``) are gathered. Per position, repeated token ids are
dropped, the rows are centred by their mean and an SVD gives the first ``p`` right singular
vectors. An identity is then ``mean_i + coeffs_i @ components_i`` for i in (1, 2).

On disk a basis is ``bases/<id>/basis.safetensors`` (tensors, written first) and
``bases/<id>/basis.toml`` (metadata, written last: the commit point). The id is a content hash of
what the basis depends on: the embedding table, the tokenizer, the names and p.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, documents, paths, storage
from .errors import (
    BasisInUse,
    BasisMismatch,
    BasisNotFound,
    CelebctlError,
    CorruptEntry,
    FetchError,
    InvalidOption,
    SchemaError,
    StorageError,
    did_you_mean,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import ModelSpec, TextModel

SCHEMA_VERSION = 1
METHOD = "celeb-basis-v1"
DEFAULT_COMPONENTS = 512
POSITIONS = (1, 2)
TENSORS_FILE = "basis.safetensors"
META_FILE = "basis.toml"
PACKAGED_NAMES = "packaged"
ID_LENGTH = 16
CUMULATIVE_AT = (10, 50, 100)
# A fetched basis for SD 1.x is about 3 MB; anything far larger is not a basis.
MAX_TENSORS_BYTES = 64 * 1024 * 1024
MAX_META_BYTES = 4 * 1024 * 1024
MAX_NAMES_BYTES = 16 * 1024 * 1024
# A model whose table was loaded in fp16/bf16 still matches a basis built from its fp32 table:
# the per-position mean of the rows must agree to this relative error (bf16 rounding is ~0.4 %).
MATCH_RTOL = 1e-2
MAX_MEAN_ABS = 1e3
_ID_RE = re.compile(rf"^[0-9a-f]{{{ID_LENGTH}}}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Names


def _note(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def normalize_name(name: str) -> str:
    """Collapse whitespace and NFC-normalise a name (what the tokenizer sees, bar case)."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def _parse_names(text: str, where: str) -> list[str]:
    names = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        names.append(normalize_name(stripped))
    if not names:
        raise InvalidOption(f"{where} has no names: write one name per line "
                            "(blank lines and lines starting with '#' are ignored).")
    return names


def load_names(path: str | Path | None = None) -> list[str]:
    """The names to build a basis from: the packaged list, or one name per line from ``path``.

    Blank lines and lines starting with ``#`` are ignored; duplicates are kept here and dropped
    by :func:`compute_basis`.
    """
    if path is None:
        text = resources.files("celebctl").joinpath("data", "celeb_names.txt").read_text("utf-8")
        return _parse_names(text, "The packaged names list")
    file = Path(path).expanduser()
    try:
        text = storage.read_regular_file(file, MAX_NAMES_BYTES).decode("utf-8")
    except storage.FileRefused as exc:
        raise InvalidOption(f"Names file {file} {exc.reason}; pass a text file with one name "
                            "per line.") from None
    except FileNotFoundError as exc:
        raise InvalidOption(f"Names file {file} does not exist.") from exc
    except IsADirectoryError as exc:
        raise InvalidOption(f"Names file {file} is a folder; pass a text file.") from exc
    except UnicodeDecodeError as exc:
        raise InvalidOption(f"Names file {file} is not UTF-8 text.") from exc
    except OSError as exc:
        raise InvalidOption(f"Cannot read names file {file}: {exc.strerror or exc}.") from exc
    return _parse_names(text, f"Names file {file}")


def unique_names(names: Iterable[str]) -> list[str]:
    """Names without repeats; names differing only in case or spacing count as one."""
    seen: dict[str, str] = {}
    for name in names:
        clean = normalize_name(name)
        if clean:
            seen.setdefault(clean.casefold(), clean)
    return list(seen.values())


def names_sha256(names: Iterable[str]) -> str:
    """sha256 of the sorted, case-folded unique names (order and repeats do not matter)."""
    keys = sorted({normalize_name(n).casefold() for n in names if normalize_name(n)})
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def name_token_ids(names: Sequence[str], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids at BPE positions 1 and 2 for each name.

    Position 1 gets one id per name. A one-token name ("Cher") has no position 2, so it adds
    to position 1 only (the reference code took the end token there, which is not a name part).
    """
    if not names:
        raise InvalidOption("No names to build a basis from.")
    encoded = tokenizer(list(names), add_special_tokens=True, truncation=True).input_ids
    bos = tokenizer.bos_token_id
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    pos1: list[int] = []
    pos2: list[int] = []
    empty = []
    for name, ids in zip(names, encoded, strict=True):
        ids = list(ids)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        body = [i for i in ids if i not in specials]
        if not body:
            empty.append(name)
            continue
        pos1.append(body[0])
        if len(body) >= 2:
            pos2.append(body[1])
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise InvalidOption(f"{len(empty)} name(s) give no tokens: {shown}. Each name needs at "
                            "least one word.")
    return pos1, pos2


# --------------------------------------------------------------------------------------------
# The pure computation


@dataclass
class BasisData:
    """A computed basis (tensors on the CPU, fp32) and the counts that describe it."""

    mean: torch.Tensor  # (2, hidden)
    components: torch.Tensor  # (2, p, hidden), orthonormal rows per position
    explained_variance_ratio: torch.Tensor  # (2, p), zero beyond each position's rank
    token_ids: tuple[torch.Tensor, torch.Tensor]  # unique sorted ids per position (int64)
    num_names: int  # unique names used
    single_token_names: int  # names with no position-2 token
    unique_rows: tuple[int, int]
    rank: tuple[int, int]  # directions that carry variance per position
    p: int
    hidden: int


def effective_components(requested: int, hidden: int) -> int:
    """p actually stored: ``min(requested, hidden)``."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InvalidOption(f"--components must be a positive integer, not {requested!r}.")
    return min(requested, hidden)


def _principal_directions(rows: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor, int]:
    """(mean, components (p, h), explained variance ratio (p,), rank) of ``rows`` (n, h)."""
    import torch

    rows = rows.to(torch.float64)
    n, hidden = rows.shape
    mean = rows.mean(dim=0)
    centred = rows - mean
    # full_matrices: when n-1 < p the basis is completed with orthonormal zero-variance
    # directions, so every position stores exactly p components (as in the paper, p = 512).
    # One thread: for matrices this small, MKL's threaded SVD gains nothing and, when the
    # cores are busy, its OpenMP spin-waits turn 0.1 s into 10 s or more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, singular, vh = torch.linalg.svd(centred, full_matrices=n - 1 < p)
    finally:
        torch.set_num_threads(threads)
    rank = min(n - 1, hidden)
    variance = torch.zeros(hidden, dtype=torch.float64)
    variance[: singular.shape[0]] = singular**2
    total = variance.sum()
    ratio = variance / total if total > 0 else variance
    ratio[rank:] = 0.0  # beyond n-1 the singular values are rounding noise
    components = vh[:p].clone()
    # Fix the sign freedom: the largest-magnitude entry of each direction is positive.
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(p), idx])
    signs[signs == 0] = 1.0
    components *= signs[:, None]
    return mean, components, ratio[:p], rank


def compute_basis(names: Sequence[str], tokenizer: Any, table: Any,
                  components: int = DEFAULT_COMPONENTS) -> BasisData:
    """Compute the celeb basis of ``table`` (vocab, hidden) for ``names`` with ``tokenizer``.

    p = min(components, hidden) for both positions; directions past a position's rank
    (unique rows - 1) carry zero explained variance.
    """
    import torch

    table = table.detach()
    if table.dim() != 2:
        raise InvalidOption(f"The embedding table must be 2-D, not {tuple(table.shape)}.")
    vocab, hidden = table.shape
    p = effective_components(components, hidden)
    names = unique_names(names)
    pos1, pos2 = name_token_ids(names, tokenizer)
    means, comps, ratios, ranks, uniques, ids_out = [], [], [], [], [], []
    for position, ids in zip(POSITIONS, (pos1, pos2), strict=True):
        unique = sorted(set(ids))
        if len(unique) < 2:
            raise InvalidOption(
                f"Position {position} has {len(unique)} distinct token(s); a basis needs names "
                "with at least 2 different tokens there. Add more names."
            )
        if unique[-1] >= vocab:
            raise BasisMismatch(f"The tokenizer gives token id {unique[-1]} but the embedding "
                                f"table has only {vocab} rows: they are not from one model.")
        index = torch.tensor(unique, dtype=torch.long)
        rows = table.index_select(0, index.to(table.device)).to("cpu", torch.float64)
        mean, direction, ratio, rank = _principal_directions(rows, p)
        means.append(mean)
        comps.append(direction)
        ratios.append(ratio)
        ranks.append(rank)
        uniques.append(len(unique))
        ids_out.append(index)
    return BasisData(
        mean=torch.stack(means).to(torch.float32).contiguous(),
        components=torch.stack(comps).to(torch.float32).contiguous(),
        explained_variance_ratio=torch.stack(ratios).to(torch.float32).contiguous(),
        token_ids=(ids_out[0], ids_out[1]),
        num_names=len(names),
        single_token_names=len(pos1) - len(pos2),
        unique_rows=(uniques[0], uniques[1]),
        rank=(ranks[0], ranks[1]),
        p=p,
        hidden=hidden,
    )


def basis_id_for(embedding_sha256: str, tokenizer_sha256: str, names_sha256: str,
                 components: int) -> str:
    """The basis id: 16 hex chars of sha256 over everything the basis depends on (p stored)."""
    text = "\n".join([METHOD, embedding_sha256, tokenizer_sha256, names_sha256, str(components)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]


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
            "schema_version": self.schema_version,
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


_KNOWN_KEYS = {"schema_version", "id", "method", "model", "hidden", "components",
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
    )


def _read_meta(folder: Path) -> BasisInfo:
    path = folder / META_FILE
    where = str(path)
    try:
        raw = storage.read_regular_file(path, MAX_META_BYTES, follow_symlinks=False)
        meta = documents.parse_toml(raw)
    except FileNotFoundError as exc:
        raise CorruptEntry(f"Basis folder {folder} has no {META_FILE}: it is incomplete (an "
                           f"interrupted build?). Remove it with `celebctl basis remove "
                           f"{folder.name} --force` and build again.") from exc
    except storage.FileRefused as exc:
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
        raw = storage.read_regular_file(path, MAX_TENSORS_BYTES, follow_symlinks=False)
    except storage.FileRefused as exc:
        raise CorruptEntry(f"{path} {exc.reason}.") from None
    except FileNotFoundError as exc:
        raise CorruptEntry(f"Basis {info.id} is missing {TENSORS_FILE}. Remove it with "
                           f"`celebctl basis remove {info.id} --force` and build or fetch it "
                           "again.") from exc
    except OSError as exc:
        raise CorruptEntry(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    if storage.sha256_bytes(raw) != info.tensors_sha256:
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
                  if p.is_dir() and not storage.is_temp_name(p.name) and not p.is_symlink())


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
    from . import registry

    root = paths.identities_dir()
    if not root.is_dir():
        return []
    users = []
    for folder in sorted(root.iterdir()):
        if storage.is_temp_name(folder.name) or folder.is_symlink():
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
    with storage.writer_lock(paths.lock_path()):
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
        storage.remove_file(folder / META_FILE)
        storage.remove_file(folder / TENSORS_FILE)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"Could not remove {folder}: {exc.strerror or exc}.") from exc
    return folder.name


# --------------------------------------------------------------------------------------------
# Building


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _existing(basis_id: str) -> BasisInfo | None:
    folder = paths.bases_dir() / basis_id
    if not (folder / META_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        return None
    try:
        info = _read_meta(folder)
    except CelebctlError:
        return None
    if storage.sha256_file(folder / TENSORS_FILE) != info.tensors_sha256:
        return None
    return info


def _write_entry(basis_id: str, tensor_bytes: bytes, meta: dict[str, Any]) -> Path:
    """Write tensors, then the TOML (the commit point), under the writer lock."""
    import tomli_w

    folder = paths.bases_dir() / basis_id
    storage.ensure_private_dir(paths.bases_dir())
    # Readers must never see a TOML that points at other tensors: un-commit first.
    storage.remove_file(folder / META_FILE)
    storage.ensure_private_dir(folder)
    storage.clean_temp_files(folder)
    storage.atomic_write_bytes(folder / TENSORS_FILE, tensor_bytes)
    storage.atomic_write_text(folder / META_FILE, tomli_w.dumps(meta))
    return folder


def build_basis_for_table(table: Any, tokenizer: Any, model_ref: str,
                          names: Sequence[str] | None = None, names_source: str | None = None,
                          components: int = DEFAULT_COMPONENTS, force: bool = False,
                          progress: Progress | None = None) -> tuple[BasisInfo, bool]:
    """Build and store the basis of an embedding table; a no-op if that basis exists.

    ``names`` defaults to the packaged list. Returns (info, created).
    """
    from . import models

    if names is None:
        names = load_names()
        names_source = PACKAGED_NAMES
    _, hidden = table.shape
    p = effective_components(components, int(hidden))
    _note(progress, "Hashing the embedding table and tokenizer")
    emb_sha = models.embedding_table_sha256(table)
    tok_sha = models.tokenizer_sha256(tokenizer)
    nm_sha = names_sha256(names)
    basis_id = basis_id_for(emb_sha, tok_sha, nm_sha, p)
    if not force:
        existing = _existing(basis_id)
        if existing is not None:
            return existing, False
    _note(progress, f"Computing the basis from {len(unique_names(names))} names")
    data = compute_basis(names, tokenizer, table, components)
    tensor_bytes = _serialize(data)
    ratios = ([float(v) for v in data.explained_variance_ratio[0].tolist()],
              [float(v) for v in data.explained_variance_ratio[1].tolist()])
    info = BasisInfo(
        id=basis_id, path=paths.bases_dir() / basis_id, model=model_ref, hidden=data.hidden,
        components=data.p, requested_components=components, num_names=data.num_names,
        single_token_names=data.single_token_names, unique_rows=data.unique_rows,
        rank=data.rank, embedding_sha256=emb_sha, tokenizer_sha256=tok_sha, names_sha256=nm_sha,
        names_source=names_source or "", tensors_sha256=storage.sha256_bytes(tensor_bytes),
        created=_now(), celebctl_version=__version__, explained_variance_ratio=ratios,
        explained_variance_cumulative=_cumulative(ratios),
    )
    _note(progress, f"Writing basis {basis_id}")
    with storage.writer_lock(paths.lock_path()):
        if not force:
            existing = _existing(basis_id)  # another process may have built it meanwhile
            if existing is not None:
                return existing, False
        _write_entry(basis_id, tensor_bytes, _meta_dict(info))
    return info, True


def build_basis(model_spec: str | ModelSpec | None = None, names_path: str | Path | None = None,
                components: int = DEFAULT_COMPONENTS, force: bool = False,
                progress: Progress | None = None,
                text_model: TextModel | None = None) -> tuple[BasisInfo, bool]:
    """Build the basis of a model's text encoder (only the tokenizer and text encoder load).

    Same model, names and p as an existing basis: returns it with ``created=False`` unless
    ``force``. Pass ``text_model`` to reuse an already loaded text encoder.
    """
    from . import models

    effective_components(components, 1 << 30)  # reject a bad --components before loading
    names = load_names(names_path)
    source = PACKAGED_NAMES if names_path is None else str(Path(names_path).expanduser()
                                                           .resolve())
    if text_model is None:
        spec = models.resolve_model_spec(model_spec)
        _note(progress, f"Loading the text encoder of {spec.ref}")
        text_model = models.load_text_model(spec)
    table = models.embedding_table(text_model.text_encoder)
    return build_basis_for_table(table, text_model.tokenizer, text_model.spec.ref, names=names,
                                 names_source=source, components=components, force=force,
                                 progress=progress)


# --------------------------------------------------------------------------------------------
# Matching a model to a basis


def _table_matches(basis: Basis, table: Any) -> bool:
    """True when the basis's per-position means agree with ``table`` (any dtype) within 1 %."""
    import torch

    if table.dim() != 2 or table.shape[1] != basis.hidden:
        return False
    for index, ids in enumerate(basis.token_ids):
        if ids.numel() == 0 or int(ids.max()) >= table.shape[0]:
            return False
        rows = table.detach().index_select(0, ids.to(table.device)).to("cpu", torch.float64)
        stored = basis.mean[index].to(torch.float64)
        error = torch.linalg.vector_norm(rows.mean(dim=0) - stored)
        if error > MATCH_RTOL * max(float(torch.linalg.vector_norm(stored)), 1e-12):
            return False
    return True


def _preference(info: BasisInfo, packaged_sha: str) -> tuple[bool, bool, str]:
    return (info.names_sha256 == packaged_sha,
            info.components == min(DEFAULT_COMPONENTS, info.hidden), info.created)


def find_basis_for_model(text_encoder: Any, tokenizer: Any) -> BasisInfo | None:
    """An existing basis built from this text encoder's table and tokenizer, or None.

    An exact table hash wins; otherwise a table loaded in fp16/bf16 still matches the basis
    built from its fp32 weights. Among several, the packaged names and p = 512 are preferred.
    """
    from . import models

    table = models.embedding_table(text_encoder)
    tok_sha = models.tokenizer_sha256(tokenizer)
    candidates = [b for b in list_bases()
                  if b.tokenizer_sha256 == tok_sha and b.hidden == table.shape[1]]
    if not candidates:
        return None
    packaged = names_sha256(load_names())
    candidates.sort(key=lambda b: _preference(b, packaged), reverse=True)
    emb_sha = models.embedding_table_sha256(table)
    for info in candidates:
        if info.embedding_sha256 == emb_sha:
            return info
    for info in candidates:
        try:
            if _table_matches(load_basis(info.id), table):
                return info
        except CelebctlError:
            continue
    return None


def ensure_basis(model_spec: str | ModelSpec | None = None,
                 text_model: TextModel | None = None, names_path: str | Path | None = None,
                 components: int = DEFAULT_COMPONENTS,
                 progress: Progress | None = None) -> BasisInfo:
    """The basis for a model: an existing match (any dtype) or a newly built one."""
    from . import models

    if text_model is None:
        spec = models.resolve_model_spec(model_spec)
        _note(progress, f"Loading the text encoder of {spec.ref}")
        text_model = models.load_text_model(spec)
    if names_path is None and components == DEFAULT_COMPONENTS:
        found = find_basis_for_model(text_model.text_encoder, text_model.tokenizer)
        if found is not None:
            return found
    info, _ = build_basis(names_path=names_path, components=components, progress=progress,
                          text_model=text_model)
    return info


def check_model_matches_basis(basis: Basis | BasisInfo | str, text_encoder: Any, tokenizer: Any,
                              model_ref: str | None = None) -> None:
    """Raise BasisMismatch unless the model's tokenizer and embedding table fit the basis."""
    from . import models

    if isinstance(basis, str):
        basis = load_basis(basis)
    info = basis.info if isinstance(basis, Basis) else basis
    model = model_ref or str(getattr(getattr(text_encoder, "config", None), "_name_or_path", "")
                             or "this model")
    hint = f"Build a basis for this model with `celebctl basis build --model {model}`."
    if models.tokenizer_sha256(tokenizer) != info.tokenizer_sha256:
        raise BasisMismatch(f"Model {model}'s tokenizer does not match basis {info.id} (built "
                            f"from {info.model}). {hint}")
    table = models.embedding_table(text_encoder)
    if table.shape[1] != info.hidden:
        raise BasisMismatch(f"Model {model}'s embeddings are {table.shape[1]}-d but basis "
                            f"{info.id} (built from {info.model}) is {info.hidden}-d. {hint}")
    if models.embedding_table_sha256(table) == info.embedding_sha256:
        return
    loaded = basis if isinstance(basis, Basis) else load_basis(info.id)
    if not _table_matches(loaded, table):
        raise BasisMismatch(f"Model {model}'s embedding table does not match basis {info.id} "
                            f"built from {info.model}. {hint}")


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
    if os.path.exists(path) and not path.is_dir() and not storage.is_regular_file(path):
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
        if os.path.lexists(needed) and not storage.is_regular_file(needed):
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
            blobs.append(storage.read_regular_file(path, limit))
        except storage.FileRefused as exc:
            raise FetchError(f"{path} {exc.reason}; that is not a basis. Nothing was "
                             "written.") from None
        except OSError as exc:
            raise FetchError(f"Cannot read {path}: {exc.strerror or exc}. Nothing was "
                             "written.") from None
    raw, raw_meta = blobs
    actual = storage.sha256_bytes(raw)
    if sha256 is not None and actual != sha256:
        raise FetchError(f"Checksum mismatch for {source}: expected sha256 {sha256}, got "
                         f"{actual}. Nothing was written.")
    try:
        meta = documents.parse_toml(raw_meta)
    except documents.UnsafeDocument as exc:
        raise FetchError(f"{meta_path.name} from {source} {exc}. Nothing was written.") from None
    try:
        info = parse_meta(meta, paths.bases_dir() / str(meta.get("id", "")), f"{source} (TOML)")
        if actual != info.tensors_sha256:
            raise CorruptEntry(f"{tensors_path.name} does not match tensors_sha256 in its TOML.")
        tensors = _load_tensor_bytes(raw, tensors_path.name)
        _check_tensors(tensors, info, tensors_path.name)
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
    with storage.writer_lock(paths.lock_path()):
        existing = _existing(info.id)
        if existing is not None:
            return existing, False
        _write_entry(info.id, raw, meta)
    return _read_meta(paths.bases_dir() / info.id), True


__all__ = [
    "Basis", "BasisData", "BasisInfo", "BasisList", "DEFAULT_COMPONENTS", "basis_id_for",
    "basis_users", "build_basis", "build_basis_for_table", "check_model_matches_basis",
    "compute_basis", "ensure_basis", "fetch_basis", "find_basis_for_model", "get_basis_info",
    "list_bases", "load_basis", "load_names", "name_token_ids", "names_sha256",
    "remove_basis", "unique_names",
]
