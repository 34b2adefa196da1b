"""Reading a user's photo defensively: bytes -> upright 8-bit RGB.

Bad paths, non-images, truncated files and decompression bombs become
:class:`~celebctl.errors.PhotoError` naming the file; nothing here imports torch.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PhotoError

# Pixel cap checked from the header before any pixel is decoded: 64 MP is far above any camera
# photo a person would use (a 50 MP phone shot fits) and keeps the decoded RGB under ~200 MB.
MAX_PHOTO_PIXELS = 64_000_000
# File-size cap so a huge file is refused before it is read into memory.
MAX_PHOTO_BYTES = 256 * 1024 * 1024

# Formats a person plausibly sends as a portrait. Restricting Image.open to these keeps PIL's
# rarer (and less battle-tested) decoders away from untrusted files. "JPEG" also opens the MPO
# files many phones and cameras write.
_PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


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
    from ..storage import special_files

    try:
        # Opened without blocking and checked again on the open file: a path swapped for a pipe
        # after the check above is refused, not read.
        data = special_files.read_regular_file(p, MAX_PHOTO_BYTES)
    except special_files.FileRefused as exc:
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

