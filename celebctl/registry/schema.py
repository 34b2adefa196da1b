"""What an identity on disk is: name rules, data-file roles, TOML schema, migrations, checks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .. import documents
from ..errors import CelebctlError, CorruptEntry, InvalidName, SchemaError

SCHEMA_VERSION = 4
IDENTITY_TOML = "identity.toml"
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Words a prompt needs for itself; an identity named like them would hijack ordinary prompts.
RESERVED_NAMES = frozenset(
    """a an the and or of with without in on at to by for from as is are be man woman person
    people men women boy girl child face photo picture image portrait painting style art
    celebctl none null true false""".split()
)
# Data files by kind. An identity has one coefficients file and, per source photo, a face crop
# and a face embedding: roles "face" / "face_embedding" for photo 1, "face_2" /
# "face_embedding_2" for photo 2, ... up to MAX_PHOTOS.
FILE_KINDS = ("coefficients", "face", "face_embedding")
ROLE_SUFFIX = {
    "coefficients": ".safetensors",
    "face": ".png",
    "face_embedding": ".safetensors",
}
MAX_PHOTOS = 16
MAX_HISTORY = 50  # eval records kept per identity (the oldest go first)
_ROLE_RE = re.compile(r"(coefficients|face_embedding|face)(?:_([2-9]|1[0-6]))?")


def role_kind(role: str) -> tuple[str, int] | None:
    """("face", 2) for "face_2"; None for a role that is not one of ours."""
    match = _ROLE_RE.fullmatch(role)
    if not match or (match.group(1) == "coefficients" and match.group(2)):
        return None
    return match.group(1), int(match.group(2) or 1)


def face_role(index: int, kind: str = "face") -> str:
    """The role of photo ``index`` (1-based): "face", "face_2", ..."""
    return kind if index == 1 else f"{kind}_{index}"


MAX_COMPONENTS = 4096
MAX_HIDDEN = 8192
MAX_TOML_BYTES = 256 * 1024
MAX_TENSOR_FILE_BYTES = 16 * 1024 * 1024
MAX_FACE_FILE_BYTES = 16 * 1024 * 1024
MAX_MODEL_CHARS = 1024
BASIS_ID_RE = re.compile(r"[0-9a-f]{16}")
FACE_ENCODERS = ("vggface2", "random-init")
FACE_EMBEDDING_DIM = 512
# The fit L2-normalises each coefficient row (and the EMA of unit rows is at most 1 long), and
# face embeddings are unit vectors: anything far outside is not an identity celebctl made.
MAX_COEFFICIENT_ROW_NORM = 1.0 + 1e-3
EMBEDDING_NORM_TOLERANCE = 1e-3


def _migrate_1_to_2(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 allows several source photos: the one [source] table becomes [[sources]]."""
    meta = dict(meta)
    source = meta.pop("source", None)
    meta["sources"] = [source] if isinstance(source, dict) else []
    meta["schema_version"] = 2
    return meta


def _migrate_2_to_3(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 3 records the Stable Diffusion family and the text encoders' widths; everything
    written before it was SD 1.x with one text encoder."""
    meta = dict(meta)
    meta.setdefault("family", "sd1")
    if isinstance(meta.get("hidden"), int) and not isinstance(meta.get("hidden"), bool):
        meta.setdefault("encoder_widths", [meta["hidden"]])
    meta["schema_version"] = 3
    return meta


def _migrate_3_to_4(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 4 records the clip skip the identity was fitted at (the text encoder layer its
    captions were read at, in the WebUI's numbering); everything before it read the last one."""
    meta = dict(meta)
    meta.setdefault("clip_skip", 1)
    meta["schema_version"] = 4
    return meta


# Ordered migrations: MIGRATIONS[v] turns a schema-v TOML dict into schema v+1.
MIGRATIONS: dict[int, Any] = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}
MAX_CLIP_SKIP = 32
FAMILIES = ("sd1", "sd2", "sdxl")

# Temp-named markers that writes spanning several steps leave in identities/ (see .recovery).
PENDING_SUFFIX = "pending"
RENAME_INFIX = "rename-to-"
JOURNAL_SUFFIX = "joint-journal"


# --------------------------------------------------------------------------------------------
# names


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid identity name, else raise :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName("An identity name must be text.")
    shown = name if len(name) <= 40 and name.isprintable() else repr(name[:40])
    if not name:
        raise InvalidName("An identity name cannot be empty.")
    if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise InvalidName(f"Invalid name {shown!s}: names cannot contain path separators.")
    if name.lower() != name and NAME_RE.fullmatch(name.lower()):
        raise InvalidName(
            f"Invalid name '{shown}': use lowercase, e.g. '{name.lower()}'."
        )
    if not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"Invalid name {shown!s}: use one word of 1-32 characters: a lowercase letter, then "
            "lowercase letters, digits, '_' or '-' (for example 'alice' or 'bob_2')."
        )
    if name in RESERVED_NAMES:
        raise InvalidName(
            f"'{name}' is a reserved word that ordinary prompts use; pick another name "
            "(for example 'alice' or 'mr_smith')."
        )
    return name


# --------------------------------------------------------------------------------------------
# the TOML: migrations and checks


def migrate(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring a metadata dict to SCHEMA_VERSION or raise SchemaError."""
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{where} has no valid integer 'schema_version'.")
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} uses schema_version {version}, newer than this celebctl understands "
            f"({SCHEMA_VERSION}). Upgrade celebctl."
        )
    if version < 1:
        raise SchemaError(f"{where} has an invalid schema_version {version}.")
    while version < SCHEMA_VERSION:
        meta = MIGRATIONS[version](meta)
        version = meta["schema_version"]
    return meta


def _expect(meta: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    kinds_t = kinds if isinstance(kinds, tuple) else (kinds,)
    if key not in meta:
        raise SchemaError(f"{where} is missing the key '{key}'.")
    value = meta[key]
    # bool is an int in Python; a TOML `true` where a number belongs is still a type error.
    if not isinstance(value, kinds_t) or (isinstance(value, bool) and bool not in kinds_t):
        wanted = "/".join(k.__name__ for k in kinds_t)
        raise SchemaError(f"{where}: '{key}' should be {wanted}, found {type(value).__name__}.")
    return value


def validate_meta(meta: dict[str, Any], where: str, expected_name: str | None = None) -> dict:
    """Check types and required keys of an identity TOML; raise SchemaError with the reason."""
    meta = migrate(meta, where)
    name = _expect(meta, "name", str, where)
    try:
        validate_name(name)
    except InvalidName as exc:
        raise SchemaError(f"{where}: {exc}") from None
    if expected_name is not None and name != expected_name:
        raise SchemaError(f"{where} names '{name}' but lives in folder '{expected_name}'.")
    try:
        documents.check_document(meta)
    except documents.UnsafeDocument as exc:
        raise SchemaError(f"{where} {exc}.") from None
    basis_id = _expect(meta, "basis_id", str, where)
    if not BASIS_ID_RE.fullmatch(basis_id):
        raise SchemaError(f"{where}: basis_id {basis_id[:40]!r} is not a basis id (16 lowercase "
                          "hex digits, as `celebctl basis list` shows).")
    model = _expect(meta, "model", str, where)
    if not model or len(model) > MAX_MODEL_CHARS or documents.has_control_chars(model):
        raise SchemaError(f"{where}: 'model' must be 1-{MAX_MODEL_CHARS} printable characters.")
    if "face_encoder" in meta and meta["face_encoder"] not in FACE_ENCODERS:
        raise SchemaError(f"{where}: face_encoder {str(meta['face_encoder'])[:40]!r} is not one "
                          f"of {', '.join(FACE_ENCODERS)}.")
    components = _expect(meta, "components", int, where)
    hidden = _expect(meta, "hidden", int, where)
    if not 1 <= components <= MAX_COMPONENTS or not 1 <= hidden <= MAX_HIDDEN:
        raise SchemaError(f"{where}: components/hidden out of range ({components}, {hidden}).")
    family = meta.get("family", "sd1")
    if family not in FAMILIES:
        raise SchemaError(f"{where}: family {str(family)[:20]!r} is not one of "
                          f"{', '.join(FAMILIES)}.")
    widths = meta.get("encoder_widths", [hidden])
    if not isinstance(widths, list) or len(widths) != (2 if family == "sdxl" else 1) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths) \
            or sum(widths) != hidden:
        raise SchemaError(f"{where}: encoder_widths must list the text encoders' widths, adding "
                          f"up to hidden ({hidden}).")
    clip_skip = meta.get("clip_skip", 1)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) \
            or not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise SchemaError(f"{where}: clip_skip must be a whole number from 1 to "
                          f"{MAX_CLIP_SKIP}.")
    for key in ("created", "updated"):
        _expect(meta, key, str, where)
    files = _expect(meta, "files", dict, where)
    if "coefficients" not in files:
        raise SchemaError(f"{where}: [files] has no 'coefficients' entry.")
    for role in files:
        if role_kind(role) is None:
            raise SchemaError(f"{where}: unknown file role '{role}'.")
    face_numbers = sorted(n for kind, n in map(role_kind, files) if kind == "face")
    if face_numbers != list(range(1, len(face_numbers) + 1)):
        raise SchemaError(f"{where}: the face files must be numbered 1, 2, ... without gaps.")
    for role, entry in files.items():
        kind = role_kind(role)
        if kind[0] == "face_embedding" and kind[1] not in face_numbers:
            raise SchemaError(f"{where}: files.{role} has no face crop beside it.")
        if not isinstance(entry, dict):
            raise SchemaError(f"{where}: files.{role} should be a table.")
        rel = _expect(entry, "path", str, f"{where} files.{role}")
        sha = _expect(entry, "sha256", str, f"{where} files.{role}")
        size = _expect(entry, "size", int, f"{where} files.{role}")
        if not re.fullmatch(rf"{kind[0]}-[0-9a-f]{{12}}{re.escape(ROLE_SUFFIX[kind[0]])}", rel):
            raise SchemaError(f"{where}: files.{role}.path '{rel}' is not a valid file name.")
        if not re.fullmatch(r"[0-9a-f]{64}", sha) or size < 0:
            raise SchemaError(f"{where}: files.{role} has an invalid sha256 or size.")
    if "fit" in meta and not isinstance(meta["fit"], dict):
        raise SchemaError(f"{where}: 'fit' should be a table.")
    evals = meta.get("evals", [])
    if not isinstance(evals, list) or not all(isinstance(x, dict) for x in evals) \
            or len(evals) > MAX_HISTORY:
        raise SchemaError(f"{where}: 'evals' should be a list of at most {MAX_HISTORY} tables.")
    sources = meta.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(x, dict) for x in sources) \
            or len(sources) > MAX_PHOTOS:
        raise SchemaError(f"{where}: 'sources' should be a list of at most {MAX_PHOTOS} tables.")
    return meta


# --------------------------------------------------------------------------------------------
# the data files


def check_coefficients(coefficients, where: str, error: type[CelebctlError] = CorruptEntry
                       ) -> None:
    """A (2, p) finite array whose rows are at most unit length, or ``error`` saying what is
    wrong (the fit normalises each row, so longer rows were not made by a fit)."""
    import numpy as np

    array = np.asarray(coefficients)
    if array.ndim != 2 or array.shape[0] != 2 or not 1 <= array.shape[1] <= MAX_COMPONENTS:
        raise error(f"{where}: coefficients must have shape (2, p), got {array.shape}.")
    if not np.isfinite(array).all():
        raise error(f"{where}: coefficients contain NaN or Inf.")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    if (norms > MAX_COEFFICIENT_ROW_NORM).any():
        raise error(f"{where}: the coefficient rows have lengths {norms.max():.4g}; a fit gives "
                    "rows of length at most 1, so these are not coefficients celebctl made.")


def check_face_embedding(embedding, where: str, error: type[CelebctlError] = CorruptEntry
                         ) -> None:
    """A finite (512,) unit vector, or ``error`` saying what is wrong."""
    import numpy as np

    array = np.asarray(embedding)
    if array.shape != (FACE_EMBEDDING_DIM,):
        raise error(f"{where} must be one ({FACE_EMBEDDING_DIM},) vector, not {array.shape}.")
    if not np.isfinite(array).all():
        raise error(f"{where} contains NaN or Inf.")
    norm = float(np.linalg.norm(array.astype(np.float64)))
    if abs(norm - 1.0) > EMBEDDING_NORM_TOLERANCE:
        raise error(f"{where} has length {norm:.4g}; face embeddings are unit vectors.")


# celebctl's crops are 512 x 512; anything not square or outside these sides is not a face crop
# a fit can use.
MIN_FACE_SIDE = 64
MAX_FACE_SIDE = 2048


def check_face_png(data: bytes, where: str, error: type[CelebctlError] = CorruptEntry) -> None:
    """A decodable square PNG face crop of sane size, or ``error`` saying what is wrong."""
    import io

    from PIL import Image

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise error(f"{where} is not a PNG image.")
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            width, height = image.size
            if width != height or not MIN_FACE_SIDE <= width <= MAX_FACE_SIDE:
                raise error(f"{where} is {width}x{height} px; a face crop is square, "
                            f"{MIN_FACE_SIDE} to {MAX_FACE_SIDE} px a side (celebctl writes "
                            "512 x 512).")
            image.load()
    except CelebctlError:
        raise
    except Exception:  # any decoder failure on untrusted bytes
        raise error(f"{where} is not a readable PNG image.") from None
