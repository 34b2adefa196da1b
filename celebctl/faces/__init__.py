"""Photo -> upright RGB -> face detection -> FFHQ-style aligned crop -> face embedding.

Everything a face goes through before fitting lives in this package, one concept a module:

- :mod:`.photos`: :func:`load_photo` reads a user's file defensively (bad paths, non-images,
  truncated files and decompression bombs become :class:`~celebctl.errors.PhotoError`) and
  returns an upright 8-bit RGB image.
- :mod:`.detection`: :func:`detect_faces` runs facenet-pytorch's MTCNN and returns confident
  faces numbered left to right; :func:`select_face` picks one.
- :mod:`.alignment`: :func:`align_face` warps the face onto a fixed 5-point template
  (FFHQ-style, 512 px).
- :mod:`.weights`: the VGGFace2 weights: where they are expected, the checked download, the
  offline message, loading them without unpickling code.
- :mod:`.encoder`: :func:`load_face_encoder` / :func:`embed_faces` turn aligned crops into 512-d
  unit vectors with facenet-pytorch's InceptionResnetV1 (VGGFace2 weights, or a seeded random
  init offline).
- :mod:`.prepare`: :func:`prepare_face` is the one call the ``add`` command makes.

Everything is re-exported here: ``from celebctl import faces`` is all a caller needs. A test
that replaces a function must replace it where it is looked up (e.g.
``faces.weights.download_face_weights`` for :func:`load_face_encoder`), not here.

torch and facenet_pytorch are imported inside functions so importing this package stays cheap.
"""

from __future__ import annotations

from .alignment import ALIGNED_SIZE, FFHQ_TEMPLATE_512, align_face, alignment_matrix
from .detection import (
    MAX_DETECTION_SIDE,
    MIN_FACE_PROBABILITY,
    DetectedFace,
    detect_faces,
    select_face,
)
from .encoder import (
    ENCODER_INPUT_SIZE,
    FACE_ENCODER_KINDS,
    embed_faces,
    encoder_input_from_crops,
    face_encoder_input,
    load_face_encoder,
)
from .photos import MAX_PHOTO_BYTES, MAX_PHOTO_PIXELS, load_photo
from .prepare import PreparedFace, prepare_face
from .weights import (
    FACE_WEIGHTS_ENV,
    MAX_FACE_WEIGHTS_BYTES,
    OFFLINE_ENVS,
    VGGFACE2_SHA256,
    VGGFACE2_URL,
    VGGFACE2_WEIGHTS_NAME,
    download_face_weights,
    face_weights_path,
)

__all__ = [
    "ALIGNED_SIZE",
    "ENCODER_INPUT_SIZE",
    "FACE_ENCODER_KINDS",
    "FACE_WEIGHTS_ENV",
    "FFHQ_TEMPLATE_512",
    "MAX_DETECTION_SIDE",
    "MAX_FACE_WEIGHTS_BYTES",
    "MAX_PHOTO_BYTES",
    "MAX_PHOTO_PIXELS",
    "MIN_FACE_PROBABILITY",
    "OFFLINE_ENVS",
    "VGGFACE2_SHA256",
    "VGGFACE2_URL",
    "VGGFACE2_WEIGHTS_NAME",
    "DetectedFace",
    "PreparedFace",
    "align_face",
    "alignment_matrix",
    "detect_faces",
    "download_face_weights",
    "embed_faces",
    "encoder_input_from_crops",
    "face_encoder_input",
    "face_weights_path",
    "load_face_encoder",
    "load_photo",
    "prepare_face",
    "select_face",
]
