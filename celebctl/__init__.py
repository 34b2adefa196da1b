"""celebctl: put a real person into Stable Diffusion from 1 to 16 face photos (Celeb Basis).

The public API mirrors the CLI; heavy libraries (torch, diffusers, transformers) load only when
a function that needs them is called, so ``import celebctl`` stays fast::

    import celebctl
    celebctl.add_identity_from_photo("alice", "alice.jpg", model="tiny")
    celebctl.render_prompt("a photo of alice", model="tiny")
    [i.name for i in celebctl.list_identities().identities]
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562).
_EXPORTS = {
    "CelebctlError": "errors",
    "FitSettings": "fitting",
    "add_identity_from_photo": "fitting",
    "refit_jointly": "fitting",
    "fit_identities": "fitting",
    "fit_packed": "fitting",
    "add_many": "fitting.batch",
    "BatchOptions": "fitting.batch",
    "render_prompt": "rendering",
    "plan_render": "rendering",
    "export_identity": "export",
    "export_bundle": "bundles",
    "import_bundle": "bundles",
    "list_identities": "registry",
    "get_identity": "registry",
    "remove_identity": "registry",
    "rename_identity": "registry",
    "build_basis": "basis",
    "fetch_basis": "basis",
    "list_bases": "basis",
    "load_basis": "basis",
    "remove_basis": "basis",
    "load_pipeline_components": "models",
    "data_home": "paths",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'celebctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
