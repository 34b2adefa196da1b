"""Identities on disk: save, load, list, remove, rename; split by concept.

Layout (see docs/registry.md)::

    identities/<name>/identity.toml                      metadata, the commit point
    identities/<name>/coefficients-<sha12>.safetensors   {"coefficients": (2, p) float32}
    identities/<name>/face-<sha12>.png                   aligned face crop (optional)
    identities/<name>/face_embedding-<sha12>.safetensors {"embedding": (512,) float32} (optional)

Data files carry a content hash in their name, so replacing an identity never overwrites a file
the current TOML points to: a crash at any point leaves the old identity or the new one, whole.
A brand-new identity is assembled in a temp folder and renamed into place; removal renames the
folder away first. Writes that span several steps leave a marker (a temp-named file) so that the
next writer can finish or undo them: a replace prunes its uncommitted files, a rename is rolled
forward, a joint write is rolled back. This package imports numpy and safetensors but never
torch, so `celebctl list` stays fast.

- :mod:`.schema`: names, data-file roles, the TOML schema and its migrations, checks on data.
- :mod:`.reading`: the Identity type, checked loads, sets of identities read whole.
- :mod:`.listing`: `list`, with its stat-keyed cache.
- :mod:`.writing`: save (one identity, or several as one step), remove, rename, eval history.
- :mod:`.recovery`: markers and snapshots of multi-step writes; finishing or undoing them.
- :mod:`.changes`: what this process changed, for the report after Ctrl-C.

Everything is re-exported here: ``from celebctl import registry`` is all a caller needs. A test
that replaces a function must replace it where it is looked up (e.g.
``registry.writing.forget_in_list_cache``), not here.
"""

from __future__ import annotations

# The storage helpers were reachable as registry.storage before the split; they still are.
from .. import storage as storage
from .changes import (
    _CHANGES,
    _expect_toml,
    _toml_sha,
    change_mark,
    changes_since,
)
from .listing import (
    MAX_LIST_CACHE_BYTES,
    ScanResult,
    _cache_meta,
    _cached_identity,
    _list_cache_path,
    _load_list_cache,
    _save_list_cache,
    forget_in_list_cache,
    identities_using_basis,
    list_identities,
)
from .reading import (
    JOINT_WAIT_S,
    Identity,
    _joint_journals,
    _journal_writer_alive,
    _load_identity_dir,
    _parse_tensor,
    _parse_toml,
    _read_toml_file,
    _read_verified,
    _stat_key,
    get_identity,
    identity_dir,
    identity_exists,
    known_names,
    read_identity_set,
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
    finish_pending_replace,
    finish_rename,
    recover_leftovers,
    roll_back_joint,
)
from .schema import (
    _ROLE_RE,
    BASIS_ID_RE,
    EMBEDDING_NORM_TOLERANCE,
    FACE_EMBEDDING_DIM,
    FACE_ENCODERS,
    FAMILIES,
    FILE_KINDS,
    IDENTITY_TOML,
    JOURNAL_SUFFIX,
    MAX_COEFFICIENT_ROW_NORM,
    MAX_COMPONENTS,
    MAX_FACE_FILE_BYTES,
    MAX_FACE_SIDE,
    MAX_HIDDEN,
    MAX_HISTORY,
    MAX_MODEL_CHARS,
    MAX_PHOTOS,
    MAX_TENSOR_FILE_BYTES,
    MAX_TOML_BYTES,
    MIGRATIONS,
    MIN_FACE_SIDE,
    NAME_RE,
    PENDING_SUFFIX,
    RENAME_INFIX,
    RESERVED_NAMES,
    ROLE_SUFFIX,
    SCHEMA_VERSION,
    _expect,
    _migrate_1_to_2,
    _migrate_2_to_3,
    check_coefficients,
    check_face_embedding,
    check_face_png,
    face_role,
    migrate,
    role_kind,
    validate_meta,
    validate_name,
)
from .writing import (
    IdentityWrite,
    _check_unchanged,
    _commit_identity,
    _prepare_files,
    _render_meta,
    _role_file,
    _tensor_bytes,
    _write_into,
    append_history,
    check_writable,
    faces_of,
    now_iso,
    remove_identity,
    rename_identity,
    save_identities,
    save_identity,
    write_lock,
)

__all__ = [
    "BASIS_ID_RE", "EMBEDDING_NORM_TOLERANCE", "FACE_EMBEDDING_DIM", "FACE_ENCODERS", "FAMILIES",
    "FILE_KINDS", "IDENTITY_TOML", "Identity", "IdentityWrite", "JOINT_WAIT_S", "JOURNAL_SUFFIX",
    "MAX_COEFFICIENT_ROW_NORM", "MAX_COMPONENTS", "MAX_FACE_FILE_BYTES", "MAX_FACE_SIDE",
    "MAX_HIDDEN", "MAX_HISTORY", "MAX_LIST_CACHE_BYTES", "MAX_MODEL_CHARS", "MAX_PHOTOS",
    "MAX_TENSOR_FILE_BYTES", "MAX_TOML_BYTES", "MIGRATIONS", "MIN_FACE_SIDE", "NAME_RE",
    "PENDING_SUFFIX", "RENAME_INFIX", "RESERVED_NAMES", "ROLE_SUFFIX", "SCHEMA_VERSION",
    "ScanResult", "_CHANGES", "_ROLE_RE", "_cache_meta", "_cached_identity", "_check_unchanged",
    "_coefficients_sha", "_commit_identity", "_expect", "_expect_toml", "_joint_journals",
    "_journal_path", "_journal_writer_alive", "_list_cache_path", "_load_identity_dir",
    "_load_list_cache", "_migrate_1_to_2", "_migrate_2_to_3", "_parse_tensor", "_parse_toml",
    "_pending_marker", "_prepare_files", "_prune_unreferenced", "_read_toml_file",
    "_read_verified", "_remove_backups", "_rename_marker", "_render_meta", "_restore",
    "_role_file", "_save_list_cache", "_snapshot", "_stat_key", "_tensor_bytes", "_toml_sha",
    "_write_into", "append_history", "change_mark", "changes_since", "check_coefficients",
    "check_face_embedding", "check_face_png", "check_writable", "discard_folder", "face_role",
    "faces_of", "finish_pending_replace", "finish_rename", "forget_in_list_cache", "get_identity",
    "identities_using_basis", "identity_dir", "identity_exists", "known_names", "list_identities",
    "migrate", "now_iso", "read_identity_set", "read_toml_quietly", "recover_leftovers",
    "remove_identity", "rename_identity", "role_kind", "roll_back_joint", "save_identities",
    "save_identity", "symlink_message", "validate_meta", "validate_name", "write_lock",
]
