"""The celeb basis, split by concept.

- :mod:`.compute`: names -> token rows -> mean + principal directions (pure tensor code).
- :mod:`.metadata`: ``basis.toml``: the BasisInfo type, its schema, checked reads and writes.
- :mod:`.store`: bases on disk (tensors, list, lookup, remove).
- :mod:`.build`: building a basis from a loaded text encoder; matching a model to a basis.
- :mod:`.fetch`: registering a basis someone else built.

Everything public is re-exported here: ``from celebctl import basis`` is all a caller needs.
"""

from __future__ import annotations

from .build import (
    build_basis,
    build_basis_for_table,
    check_model_matches_basis,
    ensure_basis,
    find_basis_for_model,
)
from .compute import (
    CUMULATIVE_AT,
    DEFAULT_COMPONENTS,
    ID_LENGTH,
    MATCH_RTOL,
    MAX_MEAN_ABS,
    MAX_META_BYTES,
    MAX_NAMES_BYTES,
    MAX_TENSORS_BYTES,
    META_FILE,
    METHOD,
    PACKAGED_NAMES,
    POSITIONS,
    SCHEMA_VERSION,
    TENSORS_FILE,
    BasisData,
    basis_id_for,
    compute_basis,
    effective_components,
    load_names,
    name_token_ids,
    names_sha256,
    normalize_name,
    unique_names,
)
from .fetch import fetch_basis
from .firstuse import info_for_identities
from .metadata import BasisInfo, _read_meta, identity_mismatch, parse_meta
from .store import (
    Basis,
    BasisList,
    basis_users,
    get_basis_info,
    is_basis_id,
    list_bases,
    load_basis,
    remove_basis,
)

__all__ = [
    "Basis", "BasisData", "BasisInfo", "BasisList", "CUMULATIVE_AT", "DEFAULT_COMPONENTS",
    "ID_LENGTH", "MATCH_RTOL", "MAX_MEAN_ABS", "MAX_META_BYTES", "MAX_NAMES_BYTES",
    "MAX_TENSORS_BYTES", "META_FILE", "METHOD", "PACKAGED_NAMES", "POSITIONS", "SCHEMA_VERSION",
    "TENSORS_FILE", "_read_meta", "basis_id_for", "basis_users", "build_basis",
    "build_basis_for_table", "check_model_matches_basis", "compute_basis",
    "effective_components", "ensure_basis", "fetch_basis", "find_basis_for_model",
    "get_basis_info", "identity_mismatch", "info_for_identities", "is_basis_id", "list_bases",
    "load_basis", "load_names", "name_token_ids", "names_sha256", "normalize_name", "parse_meta",
    "remove_basis", "unique_names",
]
