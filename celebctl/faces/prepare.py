"""The one call ``celebctl add`` makes: photo -> detected, chosen and aligned face."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .alignment import align_face
from .detection import MAX_DETECTION_SIDE, DetectedFace, detect_faces, select_face
from .photos import _decode_photo, _limit_side, _read_photo_bytes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PreparedFace:
    """A photo read, its face detected and aligned: what fitting needs from the photo.

    ``face`` coordinates refer to the working image of ``image_size`` (the photo after EXIF
    rotation, downscaled by ``scale`` when its longest side exceeded ``MAX_DETECTION_SIDE``);
    ``original_size`` is the upright photo before downscaling. ``face_index`` is 1-based, left
    to right, out of ``face_count``.
    """

    source: Path
    sha256: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]
    scale: float
    face: DetectedFace
    face_index: int
    face_count: int
    note: str | None
    aligned: Image.Image

    def png_bytes(self) -> bytes:
        """The aligned crop as PNG bytes; identical for identical crops (no timestamps)."""
        buffer = io.BytesIO()
        # No pnginfo: PIL then writes no tIME/tEXt chunks, so the bytes depend on pixels only.
        self.aligned.save(buffer, format="PNG", optimize=False, compress_level=6)
        return buffer.getvalue()


def prepare_face(
    path: str | os.PathLike[str],
    face_index: int | None = None,
    device: str | torch.device = "cpu",
) -> PreparedFace:
    """Read a photo, detect its faces, choose one and align it to a 512 px crop.

    ``face_index`` (1-based, left to right) picks a face; by default the largest one. Raises
    :class:`PhotoError`, :class:`NoFaceFound` or :class:`InvalidOption` (bad ``face_index``).
    """
    data = _read_photo_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    upright = _decode_photo(data, path)
    working, scale = _limit_side(upright, MAX_DETECTION_SIDE)
    faces = detect_faces(working, device=device)
    face, note = select_face(faces, face_index, path)
    chosen_index = next(i for i, f in enumerate(faces) if f is face) + 1
    return PreparedFace(
        source=Path(path),
        sha256=digest,
        original_size=upright.size,
        image_size=working.size,
        scale=scale,
        face=face,
        face_index=chosen_index,
        face_count=len(faces),
        note=note,
        aligned=align_face(working, face),
    )
