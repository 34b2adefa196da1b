"""Loaded pipeline components kept warm in a long-running process (`celebctl serve`).

One process that renders again and again should load a model once. :func:`warm_components`
returns the components loaded for the same model, device and dtype before, else loads them and
keeps them (the most recent :data:`MAX_WARM` sets; older ones are dropped so their memory can
go). The components are never changed by a render (see :mod:`celebctl.rendering`), so sharing
them between renders is safe. A CLI command loads its own and never uses this cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .loading import Components
    from .specs import ModelSpec

MAX_WARM = 1
_LOCK = threading.Lock()
_WARM: OrderedDict[tuple[str, str, str], Components] = OrderedDict()


def warm_key(spec: str | ModelSpec | None, device: Any = "auto", dtype: Any = "auto"
             ) -> tuple[str, str, str]:
    """The cache key of a model, device and dtype as they resolve now."""
    from .specs import resolve_device, resolve_dtype, resolve_model_spec

    model_spec = resolve_model_spec(spec)
    dev = resolve_device(device)
    return (model_spec.ref, str(dev), str(resolve_dtype(dtype, dev)))


def warm_components(spec: str | ModelSpec | None = None, device: Any = "auto",
                    dtype: Any = "auto", progress: Any = None) -> Components:
    """The pipeline components of ``spec`` on ``device`` in ``dtype``: loaded once, then
    reused (:func:`load_pipeline_components` for the first call; ``progress`` only sees
    a load)."""
    from .loading import load_pipeline_components
    from .specs import resolve_model_spec

    key = warm_key(spec, device, dtype)
    with _LOCK:  # one load at a time: two threads asking together get one copy
        components = _WARM.get(key)
        if components is not None:
            _WARM.move_to_end(key)
            return components
        while len(_WARM) >= MAX_WARM:
            _WARM.popitem(last=False)
        components = load_pipeline_components(resolve_model_spec(spec), device, dtype,
                                              progress=progress)
        _WARM[key] = components
        return components


def is_warm(spec: str | ModelSpec | None = None, device: Any = "auto",
            dtype: Any = "auto") -> bool:
    """True when :func:`warm_components` would return without loading."""
    return peek_warm_components(spec, device, dtype) is not None


def peek_warm_components(spec: str | ModelSpec | None = None, device: Any = "auto",
                         dtype: Any = "auto") -> Components | None:
    """The kept components of ``spec``, or None (never loads)."""
    return _WARM.get(warm_key(spec, device, dtype))


def forget_warm_components() -> None:
    """Drop every kept set of components (their memory goes once nothing else holds them)."""
    with _LOCK:
        _WARM.clear()
