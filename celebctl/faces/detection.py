"""Finding faces with facenet-pytorch's MTCNN and choosing one.

torch and facenet_pytorch are imported inside functions.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import InvalidOption, NoFaceFound
from .photos import _to_rgb8

if TYPE_CHECKING:
    import torch

# Detection and alignment run on an image whose longest side is at most this; MTCNN gains
# nothing from more pixels and its image pyramid gets slow and memory-hungry on 8K photos.
MAX_DETECTION_SIDE = 2048
# MTCNN's own last-stage threshold is 0.7; below 0.9 its hits on portraits are mostly
# ears, hands and patterned backgrounds.
MIN_FACE_PROBABILITY = 0.9
# MTCNN's pyramid needs min(width, height) >= its 20 px minimum face size, and facenet-pytorch
# crashes (torch.cat of an empty list) on anything smaller.
_MTCNN_MIN_SIDE = 20


@dataclass(frozen=True)
class DetectedFace:
    """One face MTCNN found, in the pixel coordinates of the image it was detected on.

    ``box`` is (x1, y1, x2, y2); ``landmarks`` are five (x, y) points in MTCNN's order: left eye,
    right eye, nose tip, left mouth corner, right mouth corner (left/right as seen in the image).
    """

    box: tuple[float, float, float, float]
    probability: float
    landmarks: tuple[tuple[float, float], ...]
    area: float

    @property
    def center_x(self) -> float:
        """Horizontal centre of the box; faces are numbered by it, left to right."""
        return (self.box[0] + self.box[2]) / 2.0

    def landmark_array(self) -> np.ndarray:
        """The landmarks as a float64 array of shape (5, 2)."""
        return np.asarray(self.landmarks, dtype=np.float64).reshape(5, 2)


_MTCNN_CACHE: dict[str, object] = {}
_MTCNN_LOCK = threading.Lock()


def _mtcnn(device: str | torch.device):
    """One MTCNN per device per process: building it loads three small networks."""
    import torch
    from facenet_pytorch import MTCNN

    dev = torch.device(device)
    key = str(dev)
    with _MTCNN_LOCK:
        model = _MTCNN_CACHE.get(key)
        if model is None:
            model = MTCNN(keep_all=True, device=dev)
            model.eval()
            _MTCNN_CACHE[key] = model
    return model


def detect_faces(image: Image.Image, device: str | torch.device = "cpu") -> list[DetectedFace]:
    """Find faces with facenet-pytorch's MTCNN.

    Returns the faces with probability >= ``MIN_FACE_PROBABILITY``, sorted left to right by the
    centre of their box (so face 1 is the leftmost). Coordinates refer to ``image``.
    An image too small to hold a face gives an empty list.
    """
    if image.mode != "RGB":
        image = _to_rgb8(image)
    if min(image.size) < _MTCNN_MIN_SIDE:
        return []
    boxes, probs, points = _mtcnn(device).detect(image, landmarks=True)
    if boxes is None or points is None:
        return []
    # numpy 2 + facenet-pytorch 2.5 hand back object arrays; make them plain float arrays.
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)

    faces = []
    for box, prob, pts in zip(boxes, probs, points, strict=True):
        if not np.isfinite(prob) or prob < MIN_FACE_PROBABILITY:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        faces.append(
            DetectedFace(
                box=(x1, y1, x2, y2),
                probability=float(prob),
                landmarks=tuple((float(x), float(y)) for x, y in pts),
                area=max(0.0, x2 - x1) * max(0.0, y2 - y1),
            )
        )
    faces.sort(key=lambda f: f.center_x)
    return faces


def select_face(
    faces: list[DetectedFace], index: int | None, path: str | os.PathLike[str]
) -> tuple[DetectedFace, str | None]:
    """Choose one face; ``index`` is 1-based, counting left to right.

    With no index and several faces, the largest is used and the returned note says so.
    Raises :class:`NoFaceFound` when ``faces`` is empty and :class:`InvalidOption` when
    ``index`` is out of range.
    """
    name = str(path)
    if not faces:
        raise NoFaceFound(
            f"No face found in {name}. Use a photo where the face is clearly visible, "
            "frontal and at least ~80 px tall."
        )
    count = len(faces)
    if index is not None:
        if isinstance(index, bool) or not 1 <= index <= count:
            plural = "face" if count == 1 else "faces"
            allowed = "1" if count == 1 else f"1 to {count}"
            raise InvalidOption(
                f"--face {index} is out of range: {name} has {count} {plural} "
                f"(use {allowed}, numbered left to right)."
            )
        return faces[index - 1], None
    if count == 1:
        return faces[0], None
    # max() keeps the first (leftmost) of equal areas, so ties resolve the same way every time.
    chosen = max(range(count), key=lambda i: faces[i].area)
    note = (
        f"{count} faces found; using face {chosen + 1} (the largest). "
        "Pick another with --face N (numbered left to right)."
    )
    return faces[chosen], note

