"""Small builders shared by tests."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

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


PHOTO = Path(__file__).parent / "data" / "astronaut.png"


@contextlib.contextmanager
def one_torch_thread():
    # A 64 px model gains nothing from threads, and on a busy machine torch's spinning worker
    # threads make each step many times slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def data_home(path: Path):
    old = os.environ.get("CELEBCTL_HOME")
    os.environ["CELEBCTL_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("CELEBCTL_HOME", None)
        else:
            os.environ["CELEBCTL_HOME"] = old


def fitted_template(request) -> Path:
    """A data home with the tiny model, its basis and alice + bob; built once per session."""
    from celebctl.fitting import FitSettings, add_identity_from_photo

    root = request.getfixturevalue("tmp_path_factory").getbasetemp() / "fitted-alice-bob"
    if (root / "done").is_file():
        return root
    with one_torch_thread():
        tiny_template = request.getfixturevalue("_tiny_template")
    shutil.copytree(tiny_template, root, dirs_exist_ok=True)
    with data_home(root), one_torch_thread():
        for seed, name in enumerate(("alice", "bob")):
            add_identity_from_photo(name, PHOTO, model="tiny", device="cpu", dtype="fp32",
                                    settings=FitSettings(steps=3, seed=seed))
    (root / "done").write_text("ok")
    return root
