"""A basis's metadata: the ``basis.toml`` schema, read and checked, and written.

``basis.toml`` is the commit point of a basis (written after its tensors); its id must match
the content hashes it records, so an edited or damaged file is refused, never trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import documents
from ..errors import CorruptEntry, SchemaError
from ..storage import special_files
from .compute import (
    _ID_RE,
    _SHA_RE,
    CUMULATIVE_AT,
    ID_LENGTH,
    MAX_META_BYTES,
    META_FILE,
    METHOD,
    SCHEMA_VERSION,
    basis_id_for,
)

FAMILY_NAMES = ("sd1", "sd2", "sdxl")



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


def identity_mismatch(info: BasisInfo, meta: Mapping[str, Any]) -> str | None:
    """Why an identity's record (checked ``identity.toml`` data: family, hidden, components,
    encoder_widths) cannot have been fitted on basis ``info``, or None when it fits.

    A bundle rewritten to point at another family's basis reads as valid on its own; only this
    comparison shows it, before render gives advice that cannot work."""
    from ..models.specs import FAMILIES

    def label(family: str) -> str:
        return FAMILIES.get(family, (family,))[0]

    family = meta.get("family", "sd1")
    if family != info.family:
        return (f"it is recorded as fitted for {label(family)}, but its basis {info.id} is a "
                f"{label(info.family)} basis (built from {info.model!r})")
    hidden = meta.get("hidden")
    widths = list(meta.get("encoder_widths") or [hidden])
    if hidden != info.hidden or widths != list(info.encoder_widths or [info.hidden]):
        return (f"its text-encoder widths ({'+'.join(map(str, widths))}) are not those of its "
                f"basis {info.id} ({'+'.join(map(str, info.encoder_widths or [info.hidden]))})")
    if meta.get("components") != info.components:
        return (f"it has {meta.get('components')} coefficients per position, but its basis "
                f"{info.id} has {info.components} components")
    return None
