"""Warping a detected face onto a fixed 5-point template (FFHQ-style, 512 px)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import NoFaceFound
from .detection import DetectedFace
from .photos import _to_rgb8

ALIGNED_SIZE = 512

# FFHQ-style 5-point template for a 512 x 512 crop: left eye, right eye, nose tip, left mouth
# corner, right mouth corner (image left/right, the order MTCNN uses). These are the mean FFHQ
# landmark positions at 512 px used by facexlib's FaceRestoreHelper (GFPGAN, CodeFormer): eyes
# at ~47% height, the face centred, hair and chin inside the frame.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, shift) taking src to dst.

    Umeyama (1991), "Least-squares estimation of transformation parameters between two point
    patterns". Returns the 2x3 matrix [s*R | t].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c**2).sum(axis=1).mean()
    if not np.isfinite(var_src) or var_src < 1e-12:
        raise NoFaceFound("The face landmarks are degenerate (all in one spot); cannot align.")
    cov = dst_c.T @ src_c / src.shape[0]
    u, s, vt = np.linalg.svd(cov)
    # The sign fix keeps R a rotation: a mirror image would swap the eyes.
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var_src)
    shift = mu_dst - scale * rotation @ mu_src
    return np.hstack([scale * rotation, shift[:, None]])


def alignment_matrix(
    landmarks: np.ndarray | tuple[tuple[float, float], ...], size: int = ALIGNED_SIZE
) -> np.ndarray:
    """The 2x3 similarity matrix mapping image coordinates to a ``size`` px aligned crop."""
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    return _umeyama(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template)


def align_face(image: Image.Image, face: DetectedFace, size: int = ALIGNED_SIZE) -> Image.Image:
    """Warp ``face`` onto the FFHQ-style template: a ``size`` x ``size`` RGB crop.

    The similarity transform is fitted to the 5 landmarks by least squares; pixels outside the
    photo are black. Deterministic for the same inputs.
    """
    if image.mode != "RGB":
        image = _to_rgb8(image)
    forward = alignment_matrix(face.landmarks, size)
    scale = float(np.sqrt(abs(np.linalg.det(forward[:, :2]))))
    # A plain bicubic warp aliases when it shrinks a lot; box-reduce the photo first so the
    # warp itself never shrinks by more than 2x.
    factor = int(1.0 / scale) if scale < 0.5 else 1
    if factor > 1:
        image = image.reduce(factor)
        # Pixel i of the reduced image covers source pixels [i*f, (i+1)*f).
        to_reduced = np.array([[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0], [0, 0, 1]])
        forward = forward @ np.linalg.inv(to_reduced)
    # PIL wants the inverse map: output pixel -> source pixel.
    full = np.vstack([forward, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2].reshape(-1)
    return image.transform(
        (size, size),
        Image.Transform.AFFINE,
        tuple(float(v) for v in inverse),
        resample=Image.Resampling.BICUBIC,
        fillcolor=(0, 0, 0),
    )

