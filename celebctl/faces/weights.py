"""The face encoder's VGGFace2 weights: where they live, the checked download, the offline
message, and loading them into a network without unpickling code."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FaceEncoderUnavailable

if TYPE_CHECKING:
    import torch

VGGFACE2_WEIGHTS_NAME = "20180402-114759-vggface2.pt"
# facenet-pytorch's release asset (the URL its own InceptionResnetV1(pretrained="vggface2")
# fetches) and its sha256, as recorded by a third-party project that checks it.
VGGFACE2_URL = ("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
                + VGGFACE2_WEIGHTS_NAME)
VGGFACE2_SHA256 = "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b"
OFFLINE_ENVS = ("CELEBCTL_OFFLINE", "HF_HUB_OFFLINE")
MAX_FACE_WEIGHTS_BYTES = 512 * 1024 * 1024  # the real file is about 107 MB
FACE_WEIGHTS_ENV = "CELEBCTL_FACE_WEIGHTS"


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

    from ..storage import atomic

    target = Path(target or face_weights_path())
    if _offline():
        raise FaceEncoderUnavailable(_missing_weights_message(
            "offline: HF_HUB_OFFLINE or CELEBCTL_OFFLINE is set, so nothing is downloaded"))
    tmp = target.with_name(f".{target.name}{atomic.TMP_MARK}{os.getpid()}")
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



def _load_vggface2_weights(encoder: torch.nn.Module) -> None:
    """Load the VGGFace2 state dict into ``encoder`` or raise FaceEncoderUnavailable."""
    import torch

    from ..storage import special_files

    candidates = _weights_candidates()
    path = next((c for c in candidates if os.path.exists(c)), None)
    if path is not None and not special_files.is_regular_file(path):
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
        data = special_files.read_regular_file(path, MAX_FACE_WEIGHTS_BYTES)
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

