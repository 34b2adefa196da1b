"""The face encoder: aligned crops -> 512-d unit vectors with facenet-pytorch's
InceptionResnetV1 (VGGFace2 weights, or a seeded random init offline).

torch and facenet_pytorch are imported inside functions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import InvalidOption
from . import weights
from .photos import _to_rgb8

if TYPE_CHECKING:
    import torch

ENCODER_INPUT_SIZE = 160
FACE_ENCODER_KINDS = ("vggface2", "random-init")

# The part of an aligned crop the face encoder sees, as fractions (x1, y1, x2, y2). The
# VGGFace2 InceptionResnetV1 was trained on tight MTCNN box crops squashed to 160 x 160, not on
# whole-head FFHQ frames; this is where MTCNN puts its box on an FFHQ-aligned face (measured by
# re-detecting on the aligned test portrait: x 0.244-0.755, y 0.228-0.910), made symmetric
# about the vertical centre line so a horizontally flipped crop shows the same region.
_ENCODER_REGION = (0.245, 0.228, 0.755, 0.910)


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
        if not any(os.path.exists(c) for c in weights._weights_candidates()) \
                and not os.environ.get(weights.FACE_WEIGHTS_ENV):
            weights.download_face_weights(progress=progress)
        weights._load_vggface2_weights(encoder)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder.to(torch.device(device))



def embed_faces(encoder: torch.nn.Module, crops_01: torch.Tensor) -> torch.Tensor:
    """Aligned crops (B, 3, H, W) in [0, 1] -> L2-normalised face features (B, 512), no grad."""
    import torch
    import torch.nn.functional as F

    param = next(encoder.parameters())
    with torch.no_grad():
        batch = encoder_input_from_crops(crops_01).to(device=param.device, dtype=param.dtype)
        features = encoder(batch)
        return F.normalize(features.float(), p=2, dim=1)

