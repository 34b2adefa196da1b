"""What `celebctl refit` calls: fit identities again from their stored face crops, for another
checkpoint (or another clip skip), as a new identity or in place.

Each identity is fitted alone, exactly as `add` fits the same crops with the same settings (the
crops an identity keeps are the aligned faces `add` trained on), so refitting on the model it was
added with gives the identity it already is. The model loads once for all of them; each is
written as soon as its fit ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import FitError, IdentityExists, InvalidOption
from .identities import (
    _face_files,
    _note,
    fitted_meta,
    load_fit_model,
    noise_model_note,
    with_clip_skip,
)
from .phases import fit_identities
from .settings import FitResult, FitSettings, FitSubject, ProgressCallback


@dataclass
class RefitOutcome:
    """What `refit` did: the identities written (in order), their fits, and notes."""

    identities: list[Any]
    results: list[FitResult]
    basis_id: str
    model: str
    notes: list[str] = field(default_factory=list)


def _check_request(names: Sequence[str], as_name: str | None, replace: bool) -> list[str]:
    from .. import registry

    names = list(names)
    if not names:
        raise InvalidOption("Name at least one identity to refit.")
    if len(set(names)) != len(names):
        raise InvalidOption("An identity is named twice.")
    for name in names:
        registry.validate_name(name)
    if as_name is not None and replace:
        raise InvalidOption("Give --as NEW (keep the identity, write a new one) or --replace "
                            "(refit it in place), not both.")
    if as_name is None and not replace:
        raise InvalidOption("Say where the refit goes: --as NEW for a new identity (one name "
                            "only), or --replace to refit in place.")
    if as_name is not None:
        if len(names) > 1:
            raise InvalidOption("--as names one new identity: refit one identity with it, or "
                                "several with --replace.")
        registry.validate_name(as_name)
        if registry.identity_exists(as_name):
            raise IdentityExists(f"Identity '{as_name}' already exists. Pick another --as "
                                 "name, or remove it first.")
    return names


def _stored_crops(idents: Sequence[Any]) -> dict[str, list[bytes]]:
    """Every identity's face crops (PNG bytes), checked; refuses identities kept without."""
    from .. import registry

    faceless = [i.name for i in idents if not i.has_face]
    if faceless:
        listed = ", ".join(repr(n) for n in faceless)
        raise FitError(
            f"{listed} {'has' if len(faceless) == 1 else 'have'} no face crop (imported from a "
            "bundle made with --no-face), so there is nothing to refit from. Add "
            f"{'it' if len(faceless) == 1 else 'them'} again from photos with `celebctl add "
            "NAME PHOTO... --model MODEL`.")
    crops = {}
    for ident in idents:
        crops[ident.name] = ident.load_face_pngs()
        for number, png in enumerate(crops[ident.name], start=1):
            registry.check_face_png(png, f"The face crop of '{ident.name}'"
                                    + (f" (photo {number})" if number > 1 else ""), FitError)
    return crops


def _refit_write(ident, name: str, pngs: list[bytes], result: FitResult, components, spec,
                 basis, replace: bool):
    """The registry write of a refitted identity: new coefficients, model, basis and fit; the
    same crops and sources; where it came from."""
    from .. import registry

    meta = fitted_meta(result, components, spec, basis, list(ident.meta.get("sources", [])),
                       {"refit_from": {"name": ident.name,
                                       "model": str(ident.meta.get("model", "")),
                                       "basis_id": ident.basis_id}})
    return registry.IdentityWrite(
        name=name, coefficients=result.coefficients[name], meta=meta,
        **_face_files(pngs, result.face_embeddings[name]),
        # In place: refused if another process changed, renamed or removed it during the fit.
        replaces_sha256=ident.meta["files"]["coefficients"]["sha256"] if replace else None,
    )


def refit_identities(names: Sequence[str], *, model: str | None = None,
                     as_name: str | None = None, replace: bool = False,
                     device: str = "auto", dtype: str = "auto",
                     settings: FitSettings | None = None,
                     progress: ProgressCallback | None = None) -> RefitOutcome:
    """Fit ``names`` again from their stored face crops on ``model`` (else the configured
    default), each alone: as the new identity ``as_name`` (one name only) or in place
    (``replace``). The clip skip is the given one, else the config's for the model, else the
    identity's own.

    Everything that can be checked without a model is checked first (names, where the result
    goes, the crops, the options, the clip skip against the model); an identity kept without
    crops (``import`` of a ``--no-face`` bundle) is refused. Each identity is written when its
    fit ends; an error leaves the ones written before it.
    """
    import io

    from PIL import Image

    from .. import faces, models, registry

    names = _check_request(names, as_name, replace)
    (settings or FitSettings()).check()
    idents = registry.read_identity_set(names)
    crops = _stored_crops(idents)
    registry.check_writable()
    spec = models.resolve_model_spec(model)
    per_identity = [with_clip_skip(settings, spec, [ident]) for ident in idents]
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device, progress=progress)
    components, basis = load_fit_model(spec, torch_device, dtype, progress)
    written, results, notes = [], [], []
    for ident, fit_settings in zip(idents, per_identity, strict=True):
        target = as_name or ident.name
        images = []
        for png in crops[ident.name]:
            with Image.open(io.BytesIO(png)) as image:
                images.append(image.convert("RGB"))
        _note(progress, f"Refitting '{ident.name}'" + (f" as '{target}'" if as_name else "")
              + f" on {spec.ref} (clip skip {fit_settings.clip_skip})")
        result = fit_identities(components, basis.mean, basis.components,
                                [FitSubject(target, images)], encoder, fit_settings, progress)
        notes += [n for n in result.notes if n not in notes]
        write = _refit_write(ident, target, crops[ident.name], result, components, spec, basis,
                             replace)
        if replace:
            written += registry.save_identities([write], replace=True)
        else:
            written.append(registry.save_identity(write, replace=False))
        results.append(result)
    if noise_model_note(spec):
        notes.append(noise_model_note(spec))
    return RefitOutcome(identities=written, results=results, basis_id=basis.id, model=spec.ref,
                        notes=notes)
