"""Photo -> upright RGB -> face detection -> FFHQ-style aligned crop -> face embedding.

Everything a face goes through before fitting lives here:

* :func:`load_photo` reads a user's file defensively (bad paths, non-images, truncated files and
  decompression bombs become :class:`~celebctl.errors.PhotoError`) and returns an upright 8-bit
  RGB image.
* :func:`detect_faces` runs facenet-pytorch's MTCNN and returns confident faces numbered left to
  right; :func:`select_face` picks one.
* :func:`align_face` warps the face onto a fixed 5-point template (FFHQ-style, 512 px).
* :func:`load_face_encoder` / :func:`embed_faces` turn aligned crops into 512-d unit vectors with
  facenet-pytorch's InceptionResnetV1 (VGGFace2 weights, or a seeded random init offline).
* :func:`prepare_face` is the one call the ``add`` command makes.

torch and facenet_pytorch are imported inside functions so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FaceEncoderUnavailable, InvalidOption, NoFaceFound, PhotoError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIGNED_SIZE",
    "ENCODER_INPUT_SIZE",
    "FACE_ENCODER_KINDS",
    "FFHQ_TEMPLATE_512",
    "MAX_PHOTO_PIXELS",
    "MAX_DETECTION_SIDE",
    "MIN_FACE_PROBABILITY",
    "VGGFACE2_WEIGHTS_NAME",
    "DetectedFace",
    "PreparedFace",
    "align_face",
    "alignment_matrix",
    "detect_faces",
    "embed_faces",
    "encoder_input_from_crops",
    "face_encoder_input",
    "face_weights_path",
    "load_face_encoder",
    "load_photo",
    "prepare_face",
    "select_face",
]

# Pixel cap checked from the header before any pixel is decoded: 64 MP is far above any camera
# photo a person would use (a 50 MP phone shot fits) and keeps the decoded RGB under ~200 MB.
MAX_PHOTO_PIXELS = 64_000_000
# File-size cap so a huge file is refused before it is read into memory.
MAX_PHOTO_BYTES = 256 * 1024 * 1024
# Detection and alignment run on an image whose longest side is at most this; MTCNN gains
# nothing from more pixels and its image pyramid gets slow and memory-hungry on 8K photos.
MAX_DETECTION_SIDE = 2048
# MTCNN's own last-stage threshold is 0.7; below 0.9 its hits on portraits are mostly
# ears, hands and patterned backgrounds.
MIN_FACE_PROBABILITY = 0.9
# MTCNN's pyramid needs min(width, height) >= its 20 px minimum face size, and facenet-pytorch
# crashes (torch.cat of an empty list) on anything smaller.
_MTCNN_MIN_SIDE = 20

ALIGNED_SIZE = 512
ENCODER_INPUT_SIZE = 160

# Formats a person plausibly sends as a portrait. Restricting Image.open to these keeps PIL's
# rarer (and less battle-tested) decoders away from untrusted files. "JPEG" also opens the MPO
# files many phones and cameras write.
_PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

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

# The part of an aligned crop the face encoder sees, as fractions (x1, y1, x2, y2). The
# VGGFace2 InceptionResnetV1 was trained on tight MTCNN box crops squashed to 160 x 160, not on
# whole-head FFHQ frames; this is where MTCNN puts its box on an FFHQ-aligned face (measured by
# re-detecting on the aligned test portrait: x 0.244-0.755, y 0.228-0.910), made symmetric
# about the vertical centre line so a horizontally flipped crop shows the same region.
_ENCODER_REGION = (0.245, 0.228, 0.755, 0.910)

VGGFACE2_WEIGHTS_NAME = "20180402-114759-vggface2.pt"
# facenet-pytorch's release asset (the URL its own InceptionResnetV1(pretrained="vggface2")
# fetches) and its sha256, as recorded by a third-party project that checks it.
VGGFACE2_URL = ("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
                + VGGFACE2_WEIGHTS_NAME)
VGGFACE2_SHA256 = "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b"
OFFLINE_ENVS = ("CELEBCTL_OFFLINE", "HF_HUB_OFFLINE")
MAX_FACE_WEIGHTS_BYTES = 512 * 1024 * 1024  # the real file is about 107 MB
FACE_WEIGHTS_ENV = "CELEBCTL_FACE_WEIGHTS"
FACE_ENCODER_KINDS = ("vggface2", "random-init")


# --------------------------------------------------------------------------------------------
# Reading photos


def load_photo(path: str | os.PathLike[str], max_side: int | None = None) -> Image.Image:
    """Read a photo and return it upright as 8-bit RGB.

    Accepts JPEG (and MPO), PNG, WebP, BMP and GIF; animated files give their first frame.
    EXIF orientation is applied. Grayscale, palette, CMYK and 16-bit images become 8-bit RGB;
    transparent areas are composited onto white.

    ``max_side`` downscales (keeping the aspect ratio) so the longest side is at most that many
    pixels; None keeps the full size. :func:`prepare_face` uses ``MAX_DETECTION_SIDE``.

    Raises :class:`PhotoError` naming the file for a missing path, a folder, an unreadable file,
    a symlink loop, an empty or oversized file, data that is not a supported image, a truncated
    or damaged image, and a header claiming more than ``MAX_PHOTO_PIXELS`` pixels (refused
    before decoding).
    """
    data = _read_photo_bytes(path)
    image = _decode_photo(data, path)
    if max_side is not None:
        image, _ = _limit_side(image, max_side)
    return image


def _read_photo_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read the whole file once, after checking it is a non-empty regular file we may read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise PhotoError(f"{p} is a symlink to a file that does not exist.") from None
        raise PhotoError(f"Photo {p} not found. Check the path.") from None
    except PermissionError:
        raise PhotoError(
            f"No permission to reach {p} (a folder on the way is not accessible)."
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PhotoError(f"{p} is a symlink loop; it points back to itself.") from None
        raise PhotoError(f"Cannot read {p}: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise PhotoError(f"{p} is a folder, not a photo. Give the path of one image file.")
    # A FIFO or device would block or stream forever on read().
    if not stat.S_ISREG(st.st_mode):
        raise PhotoError(f"{p} is not a regular file. Give the path of one image file.")
    if st.st_size == 0:
        raise PhotoError(f"{p} is empty (0 bytes). Give a JPEG, PNG or WebP photo.")
    if st.st_size > MAX_PHOTO_BYTES:
        raise PhotoError(
            f"{p} is {st.st_size / 2**20:.0f} MB, larger than the "
            f"{MAX_PHOTO_BYTES // 2**20} MB limit for a photo. Use a smaller export of it."
        )
    from . import storage

    try:
        # Opened without blocking and checked again on the open file: a path swapped for a pipe
        # after the check above is refused, not read.
        data = storage.read_regular_file(p, MAX_PHOTO_BYTES)
    except storage.FileRefused as exc:
        raise PhotoError(f"{p} {exc.reason}. Give the path of one image file.") from None
    except PermissionError:
        raise PhotoError(f"No permission to read {p}. Check its permissions (chmod u+r).") from None
    except OSError as exc:
        raise PhotoError(f"Cannot read {p}: {exc.strerror or exc}.") from None
    if not data:
        raise PhotoError(f"{p} is empty (0 bytes). Give a JPEG, PNG or WebP photo.")
    if len(data) > MAX_PHOTO_BYTES:
        raise PhotoError(f"{p} is larger than the {MAX_PHOTO_BYTES // 2**20} MB photo limit.")
    return data


def _decode_photo(data: bytes, path: str | os.PathLike[str]) -> Image.Image:
    """Decode file bytes into an upright RGB image, refusing bombs before decoding pixels."""
    p = Path(path)
    bomb = (
        f"{p} claims to be larger than {MAX_PHOTO_PIXELS // 1_000_000} megapixels; refusing to "
        "decode it (a decompression bomb, or a photo far larger than needed). "
        "Use a smaller export of it."
    )
    with warnings.catch_warnings():
        # PIL only warns between its own limit and twice that; treat the warning as a refusal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_PHOTO_FORMATS)
        except UnidentifiedImageError:
            if _has_image_signature(data):
                raise PhotoError(
                    f"{p} is truncated or damaged: it starts like an image but cannot be read. "
                    "Re-export or re-download the photo."
                ) from None
            raise PhotoError(
                f"{p} is not an image celebctl can read. Use a JPEG, PNG, WebP, BMP or GIF photo."
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PhotoError(bomb) from None
        except Exception as exc:  # any decoder failure on untrusted bytes means a damaged file
            raise PhotoError(
                f"{p} is truncated or damaged and cannot be read ({exc}). "
                "Re-export or re-download the photo."
            ) from exc

        width, height = image.size
        if width <= 0 or height <= 0:
            raise PhotoError(f"{p} is damaged: it says it is {width}x{height} pixels.")
        if width * height > MAX_PHOTO_PIXELS:
            raise PhotoError(
                f"{p} claims to be {width}x{height} pixels "
                f"({width * height / 1e6:.0f} megapixels), more than the "
                f"{MAX_PHOTO_PIXELS // 1_000_000}-megapixel limit; refusing to decode it. "
                "Use a smaller export of it."
            )
        try:
            # Animated GIF/WebP: open() already sits on frame 0, which is the one we keep.
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PhotoError(bomb) from None
        except Exception as exc:  # truncated data shows up here, as OSError or SyntaxError
            raise PhotoError(
                f"{p} is truncated or damaged and cannot be decoded ({exc}). "
                "Re-export or re-download the photo."
            ) from exc

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block should not block an otherwise usable photo
        pass
    return _to_rgb8(image)


def _has_image_signature(data: bytes) -> bool:
    """True when the bytes start like one of the accepted formats (so a failure is damage)."""
    return data.startswith(
        (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
    ) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # PIL's convert() clips 16-bit values at 255 (mostly white); rescale the range instead.
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # White, not black: a cut-out portrait then looks as it does in any viewer, and dark
        # hair against black would blur the face outline for the detector.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _limit_side(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Downscale so the longest side is at most ``max_side``; return the image and its scale."""
    longest = max(image.size)
    if longest <= max_side:
        return image, 1.0
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0), scale


# --------------------------------------------------------------------------------------------
# Detection


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


# --------------------------------------------------------------------------------------------
# Alignment


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


# --------------------------------------------------------------------------------------------
# Face encoder


def encoder_input_from_crops(crops: torch.Tensor) -> torch.Tensor:
    """Aligned crops (B, 3, H, W) in [0, 1] -> InceptionResnetV1 input (B, 3, 160, 160).

    Takes the face region of each aligned crop, resizes it to 160 x 160 and standardises it the
    way facenet-pytorch does: ``(x * 255 - 127.5) / 128``. Not meant to be differentiated.
    """
    import torch.nn.functional as F

    if crops.ndim == 3:
        crops = crops.unsqueeze(0)
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected crops of shape (B, 3, H, W), got {tuple(crops.shape)}")
    height, width = crops.shape[-2:]
    x1, y1, x2, y2 = _ENCODER_REGION
    region = crops[
        :, :, round(y1 * height) : round(y2 * height), round(x1 * width) : round(x2 * width)
    ]
    region = region.float()
    resized = F.interpolate(
        region,
        size=(ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return (resized * 255.0 - 127.5) / 128.0


def face_encoder_input(aligned: Image.Image | torch.Tensor) -> torch.Tensor:
    """An aligned crop (PIL image, or tensor (3, H, W) / (B, 3, H, W) in [0, 1]) -> (B, 3, 160,
    160) standardised encoder input. A PIL image gives a batch of one."""
    import torch

    if isinstance(aligned, Image.Image):
        rgb = np.asarray(_to_rgb8(aligned), dtype=np.float32) / 255.0
        aligned = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()
    return encoder_input_from_crops(aligned)


def face_weights_path() -> Path:
    """Where the VGGFace2 weights are expected.

    ``$CELEBCTL_FACE_WEIGHTS`` when set; otherwise where facenet-pytorch itself caches them:
    ``$TORCH_HOME/checkpoints/20180402-114759-vggface2.pt`` with TORCH_HOME defaulting to
    ``$XDG_CACHE_HOME/torch`` (``~/.cache/torch``).
    """
    override = os.environ.get(FACE_WEIGHTS_ENV)
    if override:
        return Path(override).expanduser()
    # Same rule as facenet_pytorch.models.inception_resnet_v1.get_torch_home(), which is where
    # InceptionResnetV1(pretrained="vggface2") looks (note: not torch.hub.get_dir(), the "hub"
    # subfolder).
    torch_home = os.environ.get(
        "TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    )
    return Path(os.path.expanduser(torch_home)) / "checkpoints" / VGGFACE2_WEIGHTS_NAME


def _weights_candidates() -> list[Path]:
    """The facenet-pytorch location first; torch.hub's checkpoint folder as a fallback."""
    primary = face_weights_path()
    if os.environ.get(FACE_WEIGHTS_ENV):
        return [primary]
    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints" / VGGFACE2_WEIGHTS_NAME
    return [primary] if hub == primary else [primary, hub]


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
               for name in OFFLINE_ENVS)


def _missing_weights_message(reason: str) -> str:
    target = face_weights_path()
    return (f"The VGGFace2 face-recognition weights are not on this machine ({reason}). "
            f"Download {VGGFACE2_URL} on a machine with internet and copy the file "
            f"{VGGFACE2_WEIGHTS_NAME} to {target}, or set {FACE_WEIGHTS_ENV}=/path/to/file.")


def download_face_weights(progress=None, url: str = VGGFACE2_URL,
                          sha256: str = VGGFACE2_SHA256, target: Path | None = None) -> Path:
    """Download the VGGFace2 weights once into the torch hub cache, checking their sha256.

    The file is written to a temp name beside the target, checked, then renamed into place, so
    an interrupted or corrupted download never leaves a file that looks complete. Raises
    FaceEncoderUnavailable (with the URL and where to put the file) offline or on failure.
    """
    import hashlib
    import urllib.error
    import urllib.request

    from . import storage

    target = Path(target or face_weights_path())
    if _offline():
        raise FaceEncoderUnavailable(_missing_weights_message(
            "offline: HF_HUB_OFFLINE or CELEBCTL_OFFLINE is set, so nothing is downloaded"))
    tmp = target.with_name(f".{target.name}{storage.TMP_MARK}{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "celebctl"})
        with urllib.request.urlopen(request, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                if done + len(chunk) > MAX_FACE_WEIGHTS_BYTES:
                    raise FaceEncoderUnavailable(_missing_weights_message(
                        f"{url} is larger than a face-weights file"))
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress("download", done, total or done, {"file": VGGFACE2_WEIGHTS_NAME})
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise FaceEncoderUnavailable(_missing_weights_message(
                f"the download from {url} does not match the published sha256 {sha256}; it "
                "was deleted"))
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FaceEncoderUnavailable(_missing_weights_message(
            f"the download from {url} failed: {reason}")) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return target


def load_face_encoder(kind: str, device: str | torch.device = "cpu", seed: int = 0,
                      progress=None):
    """Build the face-recognition network: an InceptionResnetV1 giving 512-d unit vectors.

    ``kind="vggface2"`` loads the VGGFace2 weights from :func:`face_weights_path`; on first use
    they are downloaded there (facenet-pytorch's release asset, checked against its sha256)
    unless the machine is offline (``HF_HUB_OFFLINE`` or ``CELEBCTL_OFFLINE``), in which case
    :class:`FaceEncoderUnavailable` gives the URL, the file name and where to put it.
    ``kind="random-init"`` gives a random network seeded by ``seed``, for offline tiny models.
    ``progress(phase, done, total, info)`` gets "download" with bytes. The encoder is in eval
    mode with gradients off.
    """
    if kind not in FACE_ENCODER_KINDS:
        raise InvalidOption(
            f"Unknown face encoder '{kind}'. Use one of: {', '.join(FACE_ENCODER_KINDS)}."
        )
    import torch
    from facenet_pytorch import InceptionResnetV1

    if kind == "random-init":
        # fork_rng so seeding here leaves the caller's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = InceptionResnetV1(pretrained=None, classify=False)
    else:
        encoder = InceptionResnetV1(pretrained=None, classify=False)
        if not any(os.path.exists(c) for c in _weights_candidates()) \
                and not os.environ.get(FACE_WEIGHTS_ENV):
            download_face_weights(progress=progress)
        _load_vggface2_weights(encoder)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder.to(torch.device(device))


def _load_vggface2_weights(encoder: torch.nn.Module) -> None:
    """Load the VGGFace2 state dict into ``encoder`` or raise FaceEncoderUnavailable."""
    import torch

    from . import storage

    candidates = _weights_candidates()
    path = next((c for c in candidates if os.path.exists(c)), None)
    if path is not None and not storage.is_regular_file(path):
        raise FaceEncoderUnavailable(
            f"{path} is not a regular file (a folder, pipe or device), so it cannot be the "
            f"VGGFace2 weights. Put {VGGFACE2_WEIGHTS_NAME} there, or set {FACE_WEIGHTS_ENV} to "
            "the file's path.")
    if path is None:
        expected = candidates[0]
        where = (
            f"{FACE_WEIGHTS_ENV} points at {expected}, which does not exist."
            if os.environ.get(FACE_WEIGHTS_ENV)
            else f"facenet-pytorch looks for {expected}."
        )
        raise FaceEncoderUnavailable(
            "The VGGFace2 face-recognition weights are not on this machine. "
            f"{where} Download {VGGFACE2_URL} on a machine with internet and copy the file "
            f"{VGGFACE2_WEIGHTS_NAME} there, or set {FACE_WEIGHTS_ENV}=/path/to/file."
        )
    invalid = (
        f"{path} is not a valid VGGFace2 weights file for InceptionResnetV1. Replace it with "
        f"{VGGFACE2_WEIGHTS_NAME} from {VGGFACE2_URL}"
    )
    try:
        data = storage.read_regular_file(path, MAX_FACE_WEIGHTS_BYTES)
        # weights_only: these files only hold tensors; never run pickled code from disk.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged, truncated or non-torch file fails in many ways
        raise FaceEncoderUnavailable(f"{invalid} ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise FaceEncoderUnavailable(f"{invalid} (it does not hold a state dict of tensors).")
    # The released file carries the 8631-way VGGFace2 classifier ("logits.*"); an embedding
    # model (classify=False) has no such layer.
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FaceEncoderUnavailable(f"{invalid} ({first_line}).") from exc


def embed_faces(encoder: torch.nn.Module, crops_01: torch.Tensor) -> torch.Tensor:
    """Aligned crops (B, 3, H, W) in [0, 1] -> L2-normalised face features (B, 512), no grad."""
    import torch
    import torch.nn.functional as F

    param = next(encoder.parameters())
    with torch.no_grad():
        batch = encoder_input_from_crops(crops_01).to(device=param.device, dtype=param.dtype)
        features = encoder(batch)
        return F.normalize(features.float(), p=2, dim=1)


# --------------------------------------------------------------------------------------------
# One call for `celebctl add`


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
