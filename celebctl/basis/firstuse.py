"""A basis identities need but this machine lacks (an imported bundle's), built on first use
from the model they were fitted with, as `add` builds one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import BasisMismatch, BasisNotFound
from .store import get_basis_info


def info_for_identities(basis_id: str, names: Sequence[str]) -> Any:
    """The metadata of the basis identities use. A basis that is not here is built from the
    model they were fitted with, as `add` does (an imported bundle without its basis works on
    a fresh machine); BasisNotFound says how to get it when that model is not here either."""
    try:
        return get_basis_info(basis_id)
    except BasisNotFound:
        return build_missing_basis(basis_id, names)


def build_missing_basis(basis_id: str, names: Sequence[str], progress: Any = None) -> Any:
    """Build the basis ``basis_id`` of identities ``names`` from the model they were fitted with
    (as `add` does) and return its info; raises BasisNotFound when that model is not here, or
    BasisMismatch when it gives another basis."""
    from .. import models, registry
    from ..errors import ModelUnavailable
    from .build import ensure_basis

    model = str(registry.get_identity(names[0]).meta.get("model") or "")
    advice = (f"{', '.join(names)} use{'s' if len(names) == 1 else ''} basis {basis_id}, which "
              "is not on this machine. Import a bundle that carries it (`celebctl export "
              "--with-basis` on the sender's machine), fetch it (`celebctl basis fetch`), or "
              "build it with `celebctl basis build --model MODEL` for the model the identity "
              "was fitted with")
    if not model:
        raise BasisNotFound(advice + ".")
    try:
        info = ensure_basis(models.resolve_model_spec(model), progress=progress)
    except ModelUnavailable as exc:
        raise BasisNotFound(f"{advice} ({model!r}, which could not be loaded here: {exc})") \
            from None
    if info.id != basis_id:
        raise BasisMismatch(f"Built the basis of {model!r} for {', '.join(names)}, but it is "
                            f"{info.id}, not their basis {basis_id}: the model here differs "
                            "from the one they were fitted with. Fetch their basis (`celebctl "
                            "basis fetch`) or import a bundle that carries it.")
    return info
