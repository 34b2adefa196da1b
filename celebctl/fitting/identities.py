"""What `celebctl add` and `celebctl joint` call: check everything, load once, fit, register."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import FitError, InvalidOption
from .phases import fit_identities
from .settings import MAX_PHOTOS, FitResult, FitSettings, FitSubject, ProgressCallback


@dataclass
class FitOutcome:
    """What add/joint did: the identities written plus notes for the user."""

    identities: list[Any]
    notes: list[str]
    result: FitResult
    basis_id: str
    model: str


def _fit_meta(settings: FitSettings, result: FitResult, components, joint_with: list[str]
              ) -> dict[str, Any]:
    import torch

    dtype_names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    meta = {
        "mode": "direct" if settings.direct else "mapping",
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
        "resolution": settings.resolution,
        "ema_momentum": settings.ema_momentum,
        "ema_per": "sample",
        "pool_size": settings.pool_size,
        "weight_decay": settings.weight_decay,
        "captions": "subject-last-v2",
        "clip_skip": settings.clip_skip or 1,
        "device": str(components.device),
        "dtype": dtype_names.get(components.dtype, str(components.dtype)),
        "text_encoder_dtype": dtype_names.get(components.text_encoder.dtype,
                                              str(components.text_encoder.dtype)),
        **{k: v for k, v in result.summary.items() if k != "steps"},
    }
    if joint_with:
        meta["joint_with"] = joint_with
    return meta


def with_clip_skip(settings: FitSettings | None, spec, idents: Sequence[Any] = ()
                   ) -> FitSettings:
    """``settings`` with the clip skip the fit uses on ``spec`` filled in and checked against the
    model (:func:`celebctl.clipskip.fit_clip_skip`; ``idents``: identities being refitted,
    whose own clip skip is kept when they agree and nothing else decides)."""
    from dataclasses import replace

    from ..clipskip import fit_clip_skip, identity_clip_skip

    settings = settings or FitSettings()
    recorded = {identity_clip_skip(i) for i in idents}
    clip_skip, _ = fit_clip_skip(settings.clip_skip, spec,
                                 recorded.pop() if len(recorded) == 1 else None)
    return replace(settings, clip_skip=clip_skip)


def _note(progress: ProgressCallback | None, message: str) -> None:
    if progress:
        progress("note", 0, 0, {"message": message})


def load_fit_model(spec, device, dtype, progress: ProgressCallback | None = None):
    """The model parts a fit needs, loaded once: the text encoder in fp32 (the reference fits in
    fp32; only the UNet runs under autocast), the UNet and VAE in ``dtype``, and the basis of
    that very text encoder (found, or built from it: no second load)."""
    import torch

    from .. import basis as basis_mod
    from .. import models

    components = models.load_pipeline_components(spec, device, dtype,
                                                 text_encoder_dtype=torch.float32,
                                                 progress=progress)
    info = basis_mod.ensure_basis(text_model=components.text_model())
    _note(progress, f"Basis {info.id} ({info.components} components)")
    return components, basis_mod.load_basis(info.id)


def _face_indices(face_index: int | Sequence[int] | None, photos: int) -> list[int | None]:
    """--face: one value for one photo, or one value per photo, in order."""
    if face_index is None:
        return [None] * photos
    if isinstance(face_index, int):
        face_index = [face_index]
    chosen = list(face_index)
    if len(chosen) == photos:
        return chosen
    if photos > 1 and len(chosen) == 1:
        raise InvalidOption(
            f"--face {chosen[0]} is ambiguous with {photos} photos: give --face once per photo, "
            "in the order of the photos (for example --face 2 --face 1 ...), or leave it out to "
            "use the largest face of each photo.")
    raise InvalidOption(f"--face was given {len(chosen)} times for {photos} photo(s); give it "
                        "once per photo, in the order of the photos.")


def prepare_photos(photos: Sequence[Any], face_index: int | Sequence[int] | None = None):
    """Read, detect and align every photo (1 to 16) before any model loads.

    One bad photo refuses the whole set; the error names it. Returns (prepared faces, notes).
    """
    from pathlib import Path

    from .. import faces

    photos = list(photos)
    if not 1 <= len(photos) <= MAX_PHOTOS:
        raise InvalidOption(f"Give 1 to {MAX_PHOTOS} photos of the person, not {len(photos)}.")
    indices = _face_indices(face_index, len(photos))
    prepared, notes, seen = [], [], {}
    for number, (photo, index) in enumerate(zip(photos, indices, strict=True), start=1):
        face = faces.prepare_face(photo, face_index=index, device="cpu")
        if face.sha256 in seen:
            raise InvalidOption(f"{photo} is the same file as {seen[face.sha256]}; give each "
                                "photo once.")
        seen[face.sha256] = photo
        if face.note:
            notes.append(face.note if len(photos) == 1 else
                         f"Photo {number} ({Path(photo).name}): {face.note}")
        prepared.append(face)
    return prepared, notes


def _source(photo, prepared) -> dict[str, Any]:
    from pathlib import Path

    return {
        "photo": Path(photo).name,
        "photo_sha256": prepared.sha256,
        "image_size": list(prepared.original_size),
        "face_box": [round(float(v), 2) for v in prepared.face.box],
        "face_probability": round(float(prepared.face.probability), 4),
        "face_index": prepared.face_index,
        "faces_found": prepared.face_count,
    }


def _face_files(pngs: Sequence[bytes], embeddings) -> dict[str, Any]:
    """IdentityWrite arguments for several face crops and their (photos, 512) embeddings."""
    return {"face_png": pngs[0], "face_embedding": embeddings[0],
            "extra_faces": [(png, embeddings[k]) for k, png in enumerate(pngs) if k]}


def fitted_meta(result: FitResult, components, spec, basis, sources: list[Any],
                fit_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of a freshly fitted identity (model, basis, family, clip skip, fit,
    sources), as `add`, `add-many` and `refit` record it."""
    from .. import __version__
    from ..models import families

    return {
        "basis_id": basis.id,
        "model": spec.ref,
        "face_encoder": spec.face_encoder,
        "hidden": int(basis.components.shape[2]),
        "family": components.family,
        "encoder_widths": families.encoder_widths(components.text_encoders),
        "clip_skip": result.settings.clip_skip or 1,
        "celebctl_version": __version__,
        "fit": {**_fit_meta(result.settings, result, components, []), **(fit_extra or {})},
        "sources": sources,
    }


def new_identity_write(name: str, photos: Sequence[Any], prepared: Sequence[Any],
                       result: FitResult, components, spec, basis):
    """The registry write of a freshly fitted identity: coefficients, every face crop and
    embedding, and the metadata (model, basis, fit, sources) that `add` and `add-many` record."""
    from .. import registry

    meta = fitted_meta(result, components, spec, basis,
                       [_source(p, f) for p, f in zip(photos, prepared, strict=True)])
    return registry.IdentityWrite(
        name=name, coefficients=result.coefficients[name], meta=meta,
        **_face_files([f.png_bytes() for f in prepared], result.face_embeddings[name]),
    )


def noise_model_note(spec) -> str | None:
    """What to say after fitting on a model with random weights."""
    if not spec.is_noise_model:
        return None
    return (f"'{spec.ref}' has random weights: the fit exercises the code, but the identity is "
            "not a likeness.")


def add_identity_from_photo(name: str, photo, *, model: str | None = None, device: str = "auto",
                            dtype: str = "auto", settings: FitSettings | None = None,
                            face_index: int | Sequence[int] | None = None,
                            replace: bool = False,
                            progress: ProgressCallback | None = None) -> FitOutcome:
    """Detect and align the face in ``photo`` (a path, or a list of 1 to 16 paths of the same
    person), fit it, and register it as ``name``.

    Everything that can be checked cheaply (name, options, every photo and face, face-encoder
    weights) is checked before the model loads; nothing is written unless the whole fit
    succeeds. With several photos the pool draws from all of them and the identity keeps every
    crop, embedding and source.
    """
    from .. import faces, models, registry
    from ..errors import IdentityExists

    photos = list(photo) if isinstance(photo, (list, tuple)) else [photo]
    registry.validate_name(name)
    if registry.identity_exists(name) and not replace:
        raise IdentityExists(
            f"Identity '{name}' already exists. Use --replace to overwrite it, or pick "
            "another name."
        )
    (settings or FitSettings()).check()
    registry.check_writable()  # a read-only data home fails now, not after the fit
    spec = models.resolve_model_spec(model)
    settings = with_clip_skip(settings, spec)
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    prepared, notes = prepare_photos(photos, face_index)
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device, progress=progress)
    components, basis = load_fit_model(spec, torch_device, dtype, progress)
    result = fit_identities(components, basis.mean, basis.components,
                            [FitSubject(name, [p.aligned for p in prepared])], encoder, settings,
                            progress)
    notes += result.notes
    write = new_identity_write(name, photos, prepared, result, components, spec, basis)
    ident = registry.save_identity(write, replace=replace)
    if noise_model_note(spec):
        notes.append(noise_model_note(spec))
    return FitOutcome([ident], notes, result, basis.id, spec.ref)


def _check_joint(names: Sequence[str], settings: FitSettings | None):
    """Everything `joint` can check before loading a model: names, the identities (read as one
    consistent set), their face crops, family and basis. Returns (identities, face PNGs)."""
    from .. import registry
    from ..errors import InvalidName
    from ..rendering import check_families, shared_basis

    if len(names) < 2:
        raise InvalidName("`joint` needs at least two identities.")
    if len(set(names)) != len(names):
        raise InvalidName("An identity is named twice.")
    for name in names:
        registry.validate_name(name)
    (settings or FitSettings()).check()
    idents = registry.read_identity_set(names)
    registry.check_writable()  # a read-only data home fails now, not after the fit
    faceless = [i.name for i in idents if not i.has_face]
    if faceless:
        raise FitError(
            f"{', '.join(repr(n) for n in faceless)} has no face crop (imported from a bundle "
            "made with --no-face), so it cannot be refitted. Add it again from a photo."
        )
    check_families(idents, command="joint")
    shared_basis(idents, command="joint")
    face_pngs = {}
    for ident in idents:
        face_pngs[ident.name] = ident.load_face_pngs()
        for number, png in enumerate(face_pngs[ident.name], start=1):
            registry.check_face_png(png, f"The face crop of '{ident.name}'"
                                    + (f" (photo {number})" if number > 1 else ""), FitError)
    return idents, face_pngs


def _joint_writes(idents, face_pngs, names, result: FitResult, components, spec, basis):
    """One registry write per identity, each refusing to replace an identity that changed."""
    from .. import __version__, registry
    from ..models import families

    writes = []
    for ident in idents:
        meta = {k: v for k, v in ident.meta.items()
                if k not in ("files", "name", "schema_version", "created", "updated")}
        meta.update({
            "basis_id": basis.id, "model": spec.ref, "face_encoder": spec.face_encoder,
            "family": components.family,
            "encoder_widths": families.encoder_widths(components.text_encoders),
            "clip_skip": result.settings.clip_skip or 1,
            "celebctl_version": __version__,
            "fit": _fit_meta(result.settings, result, components,
                             [n for n in names if n != ident.name]),
        })
        writes.append(registry.IdentityWrite(
            name=ident.name, coefficients=result.coefficients[ident.name], meta=meta,
            **_face_files(face_pngs[ident.name], result.face_embeddings[ident.name]),
            # Refused if another process changed, renamed or removed it during the fit.
            replaces_sha256=ident.meta["files"]["coefficients"]["sha256"],
        ))
    return writes


def refit_jointly(names: Sequence[str], *, model: str | None = None, device: str = "auto",
                  dtype: str = "auto", settings: FitSettings | None = None,
                  progress: ProgressCallback | None = None) -> FitOutcome:
    """Refit registered identities together (one shared mapping) from their stored face crops
    (every photo of each).

    All are replaced in one all-or-nothing step; on any error every identity stays as it was.
    """
    import io

    import torch
    from PIL import Image

    from .. import basis as basis_mod
    from .. import faces, models, registry
    from ..rendering import check_families, check_widths

    names = list(names)
    idents, face_pngs = _check_joint(names, settings)
    info = basis_mod.info_for_identities(idents[0].basis_id, names)
    spec, notes = models.model_for_identities(
        model, info, {i.name: str(i.meta.get("model", "")) for i in idents})
    check_families(idents, spec, command="joint")
    check_widths(idents, info, spec, command="joint")
    settings = with_clip_skip(settings, spec, idents)
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    basis = basis_mod.load_basis(info.id)
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device, progress=progress)
    components = models.load_pipeline_components(spec, torch_device, dtype,
                                                 text_encoder_dtype=torch.float32,
                                                 progress=progress)
    basis_mod.check_model_matches_basis(basis, components.text_encoders, components.tokenizer,
                                        model_ref=spec.ref)
    subjects = []
    for ident in idents:
        crops = []
        for png in face_pngs[ident.name]:
            with Image.open(io.BytesIO(png)) as image:
                crops.append(image.convert("RGB"))
        subjects.append(FitSubject(ident.name, crops))
    result = fit_identities(components, basis.mean, basis.components, subjects, encoder,
                            settings, progress)
    notes += result.notes
    writes = _joint_writes(idents, face_pngs, names, result, components, spec, basis)
    written = registry.save_identities(writes, replace=True)
    return FitOutcome(written, notes, result, basis.id, spec.ref)
