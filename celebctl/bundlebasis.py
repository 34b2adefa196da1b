"""The basis an identity needs, on a machine that lacks it: carried inside a ``.celeb``
bundle (``export --with-basis``), or built from the identity's model on first use.

A carried basis is two extra bundle members, ``basis.toml`` and ``basis.safetensors``, the
files of the basis folder as they are. On import both are checked before anything is written:
the id the TOML states must be the one its own hashes give (:func:`basis.basis_id_for`) and
the one the identity names, the tensors must match their checksum, shapes and dtypes; then the
basis is registered as `basis fetch` registers one.

Without one, the first command that needs the basis (`render`, `eval`) builds it from the
model the identity was fitted with, as `add` does, and uses it only if its id is the one the
identity names (:func:`celebctl.basis.firstuse.build_missing_basis`).
"""

from __future__ import annotations

from .errors import BundleError, CelebctlError

CARRIED_FILES = ("basis.toml", "basis.safetensors")  # basis.META_FILE, basis.TENSORS_FILE


def basis_members(basis_id: str) -> dict[str, bytes]:
    """The basis folder's two files as bundle members (read as regular, size-capped files)."""
    from . import basis
    from .storage import special_files

    info = basis.get_basis_info(basis_id)
    members = {}
    for name, limit in ((basis.META_FILE, basis.MAX_META_BYTES),
                        (basis.TENSORS_FILE, basis.MAX_TENSORS_BYTES)):
        try:
            members[name] = special_files.read_regular_file(info.path / name, limit,
                                                            follow_symlinks=False)
        except (special_files.FileRefused, OSError) as exc:
            raise CelebctlError(f"Cannot read basis {basis_id}'s {name} to put it in the "
                                f"bundle ({exc}). Check it with `celebctl doctor`.") from None
    return members


def check_carried_basis(members: dict[str, bytes], basis_id: str) -> tuple[bytes, bytes] | None:
    """The carried basis's (tensors, toml) bytes once checked against ``basis_id``; None when
    the bundle carries none. Raises BundleError; writes nothing."""
    from . import documents
    from .basis import basis_id_for, parse_meta
    from .paths import bases_dir
    from .storage import checksums

    present = [name for name in CARRIED_FILES if name in members]
    if not present:
        return None
    if len(present) == 1:
        raise BundleError(f"The bundle carries {present[0]} without its companion; a basis is "
                          f"{' and '.join(CARRIED_FILES)}. Nothing was imported.")
    raw_meta, raw = members[CARRIED_FILES[0]], members[CARRIED_FILES[1]]
    try:
        meta = documents.parse_toml(raw_meta)
        info = parse_meta(meta, bases_dir() / str(meta.get("id", "")), "The bundle's basis.toml")
    except documents.UnsafeDocument as exc:
        raise BundleError(f"The bundle's basis.toml {exc}. Nothing was imported.") from None
    except CelebctlError as exc:
        raise BundleError(f"{exc} Nothing was imported.") from None
    own_id = basis_id_for(info.embedding_sha256, info.tokenizer_sha256, info.names_sha256,
                          info.components)
    if info.id != own_id:
        raise BundleError(f"The bundle's basis says it is {info.id}, but its hashes give "
                          f"{own_id}: it was edited or damaged. Nothing was imported.")
    if info.id != basis_id:
        raise BundleError(f"The bundle carries basis {info.id}, but its identity uses basis "
                          f"{basis_id}. Nothing was imported.")
    if checksums.sha256_bytes(raw) != info.tensors_sha256:
        raise BundleError("The bundle's basis.safetensors does not match the checksum in its "
                          "basis.toml. Nothing was imported.")
    return raw, raw_meta


def register_carried_basis(raw: bytes, raw_meta: bytes, source: str) -> bool:
    """Register a basis checked by :func:`check_carried_basis` (its tensors are checked in
    full here); True when it was new on this machine."""
    from .basis.fetch import register_basis_bytes
    from .errors import FetchError

    try:
        _, created = register_basis_bytes(source, raw, raw_meta)
    except FetchError as exc:
        raise BundleError(str(exc)) from None
    return created
