"""Small builders shared by tests."""

from __future__ import annotations

import io

import numpy as np

from celebctl import registry


def face_png(seed: int = 0, size: int = 64) -> bytes:
    """A small deterministic PNG standing in for an aligned face crop."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_write(name: str, seed: int = 0, p: int = 32, basis_id: str = "b" * 16,
               with_face: bool = True) -> registry.IdentityWrite:
    """An IdentityWrite with random (2, p) coefficients."""
    rng = np.random.default_rng(seed)
    return registry.IdentityWrite(
        name=name,
        coefficients=rng.standard_normal((2, p)).astype(np.float32),
        meta={"basis_id": basis_id, "model": "tiny", "hidden": 32, "face_encoder": "random-init",
              "fit": {"steps": 3, "seed": seed}},
        face_png=face_png(seed) if with_face else None,
        face_embedding=rng.standard_normal(512).astype(np.float32) if with_face else None,
    )


def add_identity(name: str, seed: int = 0, **kwargs) -> registry.Identity:
    """Register an identity directly through the core."""
    return registry.save_identity(make_write(name, seed, **kwargs))
