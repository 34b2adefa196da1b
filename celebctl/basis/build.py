"""Building a basis from a loaded text encoder, and matching a loaded model to a basis.

The basis of a model is found (exact table hash, or a table loaded in fp16/bf16 that matches
within 1 %) or built from the very text encoder a command has loaded: nothing loads twice.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, paths
from ..errors import BasisMismatch, CelebctlError
from ..storage import atomic, checksums, locking
from .compute import (
    DEFAULT_COMPONENTS,
    MATCH_RTOL,
    META_FILE,
    PACKAGED_NAMES,
    TENSORS_FILE,
    Progress,
    _note,
    basis_id_for,
    compute_basis,
    effective_components,
    load_names,
    names_sha256,
    unique_names,
)
from .metadata import BasisInfo, _cumulative, _meta_dict, _read_meta
from .store import Basis, _serialize, list_bases, load_basis

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelSpec, TextModel

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
    if checksums.sha256_file(folder / TENSORS_FILE) != info.tensors_sha256:
        return None
    return info


def _write_entry(basis_id: str, tensor_bytes: bytes, meta: dict[str, Any]) -> Path:
    """Write tensors, then the TOML (the commit point), under the writer lock."""
    import tomli_w

    folder = paths.bases_dir() / basis_id
    atomic.ensure_private_dir(paths.bases_dir())
    # Readers must never see a TOML that points at other tensors: un-commit first.
    atomic.remove_file(folder / META_FILE)
    atomic.ensure_private_dir(folder)
    atomic.clean_temp_files(folder)
    atomic.atomic_write_bytes(folder / TENSORS_FILE, tensor_bytes)
    atomic.atomic_write_text(folder / META_FILE, tomli_w.dumps(meta))
    return folder


def build_basis_for_table(table: Any, tokenizer: Any, model_ref: str,
                          names: Sequence[str] | None = None, names_source: str | None = None,
                          components: int = DEFAULT_COMPONENTS, force: bool = False,
                          progress: Progress | None = None, family: str = "sd1",
                          encoder_widths: Sequence[int] | None = None
                          ) -> tuple[BasisInfo, bool]:
    """Build and store the basis of an embedding table; a no-op if that basis exists.

    ``names`` defaults to the packaged list. For SDXL ``table`` is both encoders' tables side
    by side and ``encoder_widths`` their widths (768, 1280): one basis over the concatenated
    rows, so an identity stays 2 x p numbers and both encoders see the same mixture.
    Returns (info, created).
    """
    from .. import models

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
        names_source=names_source or "", tensors_sha256=checksums.sha256_bytes(tensor_bytes),
        created=_now(), celebctl_version=__version__, explained_variance_ratio=ratios,
        explained_variance_cumulative=_cumulative(ratios), family=family,
        encoder_widths=[int(w) for w in (encoder_widths or [data.hidden])],
    )
    _note(progress, f"Writing basis {basis_id}")
    with locking.writer_lock(paths.lock_path()):
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
    from .. import models

    effective_components(components, 1 << 30)  # reject a bad --components before loading
    names = load_names(names_path)
    source = PACKAGED_NAMES if names_path is None else str(Path(names_path).expanduser()
                                                           .resolve())
    if text_model is None:
        spec = models.resolve_model_spec(model_spec)
        _note(progress, f"Loading the text encoder of {spec.ref}")
        text_model = models.load_text_model(spec)
    from ..models import families

    table = models.embedding_table(text_model.text_encoders)
    return build_basis_for_table(table, text_model.tokenizer, text_model.spec.ref, names=names,
                                 names_source=source, components=components, force=force,
                                 progress=progress, family=text_model.family,
                                 encoder_widths=families.encoder_widths(
                                     text_model.text_encoders))


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
    from .. import models

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
    from .. import models

    if text_model is None:
        spec = models.resolve_model_spec(model_spec)
        _note(progress, f"Loading the text encoder of {spec.ref}")
        text_model = models.load_text_model(spec)
    if names_path is None and components == DEFAULT_COMPONENTS:
        found = find_basis_for_model(text_model.text_encoders, text_model.tokenizer)
        if found is not None:
            return found
    info, _ = build_basis(names_path=names_path, components=components, progress=progress,
                          text_model=text_model)
    return info


def check_model_matches_basis(basis: Basis | BasisInfo | str, text_encoder: Any, tokenizer: Any,
                              model_ref: str | None = None) -> None:
    """Raise BasisMismatch unless the model's tokenizer and embedding table fit the basis."""
    from .. import models

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
