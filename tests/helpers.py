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
        coefficients=unit_rows(rng.standard_normal((2, p))),
        meta={"basis_id": basis_id, "model": "tiny", "hidden": 32, "face_encoder": "random-init",
              "fit": {"steps": 3, "seed": seed}},
        face_png=face_png(seed) if with_face else None,
        face_embedding=unit_rows(rng.standard_normal(512)) if with_face else None,
    )


def unit_rows(array) -> np.ndarray:
    """``array`` as float32 with each row (or the vector) scaled to length 1, as a fit makes."""
    array = np.asarray(array, dtype=np.float64)
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


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


def craft_bundle(path: Path, name: str = "alice", *, meta: dict | None = None,
                 coefficients=None, face: bytes | None = None, embedding=None,
                 raw_toml: bytes | None = None, basis_id: str | None = None,
                 compress: bool = True) -> Path:
    """A .celeb bundle written by hand, as a stranger could, with consistent checksums.

    ``meta`` updates the identity.toml keys; ``raw_toml`` replaces the TOML text entirely.
    Without ``basis_id`` the bundle names the tiny basis when the data home has one.
    """
    import zipfile

    import tomli_w

    from celebctl import basis as basis_mod

    if basis_id is None:
        bases = basis_mod.list_bases()
        basis_id = bases[0].id if bases else "b" * 16
    rng = np.random.default_rng(7)
    blobs = {
        "coefficients": registry._tensor_bytes(
            unit_rows(rng.standard_normal((2, 32))) if coefficients is None else coefficients,
            "coefficients"),
        "face": face_png(3) if face is None else face,
        "face_embedding": registry._tensor_bytes(
            unit_rows(rng.standard_normal(512)) if embedding is None else embedding,
            "embedding"),
    }
    files = {}
    members = {}
    for role, data in blobs.items():
        filename, sha = registry._role_file(role, data)
        files[role] = {"path": filename, "sha256": sha, "size": len(data)}
        members[filename] = data
    toml = {"schema_version": 1, "name": name, "basis_id": basis_id, "model": "tiny",
            "face_encoder": "random-init", "hidden": 32, "components": 32,
            "created": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:00:00+00:00",
            "celebctl_version": "0.1.0"}
    toml.update(meta or {})
    toml["files"] = files
    members["identity.toml"] = raw_toml if raw_toml is not None else \
        tomli_w.dumps(toml).encode("utf-8")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path
