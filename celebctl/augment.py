"""Augmented training samples for a fit: face crops -> a pool of latent distributions + features.

Method (docs/method.md): horizontal flip (p 0.5); brightness, contrast and saturation x0.8-1.2,
hue +-0.02; for the diffusion target the crop is rescaled to 10-100 % of the frame height
(aspect 0.9-1.1) and pasted at a random place on a black canvas; the face encoder sees the
flipped/jittered crop without the paste.

The pool keeps each sample's latent *distribution* (the VAE's mean and std), not one latent:
the fit draws a fresh latent from it at every step, as the reference does when it encodes each
batch afresh, for the cost of one multiply-add. The pool size trades VAE time for how many
distinct augmentations the fit sees (docs/method.md, "The pool").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


def pil_to_tensor(image):
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def augment_crop(crop, rng: random.Random):
    """Flip + colour jitter of one (3, H, W) crop in [0, 1]; returns the augmented crop."""
    import torch
    import torchvision.transforms.v2.functional as TF

    image = crop
    if rng.random() < 0.5:
        image = torch.flip(image, dims=[-1])
    brightness, contrast, saturation = (rng.uniform(0.8, 1.2) for _ in range(3))
    hue = rng.uniform(-0.02, 0.02)
    image = TF.adjust_brightness(image, brightness)
    image = TF.adjust_contrast(image, contrast)
    image = TF.adjust_saturation(image, saturation)
    image = TF.adjust_hue(image, hue)
    return image.clamp(0, 1)


def paste_on_black(face, resolution: int, rng: random.Random):
    """Rescale the face to 10-100 % of the frame height (aspect 0.9-1.1), paste on black."""
    import torch
    import torch.nn.functional as F

    scale = rng.uniform(0.1, 1.0)
    aspect = rng.uniform(0.9, 1.1)
    height = max(8, min(resolution, round(resolution * scale)))
    width = max(8, min(resolution, round(height * aspect)))
    resized = F.interpolate(face[None], size=(height, width), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    canvas = torch.zeros((3, resolution, resolution), dtype=face.dtype)
    top = rng.randint(0, resolution - height)
    left = rng.randint(0, resolution - width)
    canvas[:, top:top + height, left:left + width] = resized
    return canvas


@dataclass
class SamplePool:
    """Augmented samples of every identity, on the fit's device.

    ``latent_mean`` / ``latent_std`` (N, C, h, w) fp32 are the VAE's distribution of each paste
    (unscaled); ``features`` (N, 512) the face features of the augmented crops; ``identity``
    (N,) which identity each sample belongs to; ``clean_features`` per identity, the (photos,
    512) features of the un-augmented crops (CPU).
    """

    latent_mean: Any
    latent_std: Any
    features: Any
    identity: Any
    clean_features: list[Any]
    scaling: float


def build_sample_pool(vae, subjects: Sequence[Any], face_encoder, pool_size: int,
                      resolution: int, rng: random.Random, device, dtype,
                      progress: ProgressCallback | None = None,
                      encode_batch: int = 2) -> SamplePool:
    """Augment each identity's crops ``pool_size`` times (its photos in turn) and VAE-encode
    the pastes in batches of ``encode_batch``.

    ``subjects`` carry ``faces`` (PIL crops, one per photo). Small encode batches keep the
    pool's peak memory (the VAE encoder's activations at full resolution) below a step's.
    """
    import torch

    from . import faces as faces_mod

    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    pastes, feature_inputs, owners = [], [], []
    clean = []
    encoder_device = next(face_encoder.parameters()).device
    for index, subject in enumerate(subjects):
        crops = [pil_to_tensor(face) for face in subject.faces]
        with torch.no_grad():
            clean.append(faces_mod.embed_faces(face_encoder, torch.stack(crops).to(
                encoder_device)).float().cpu())
        for k in range(pool_size):
            augmented = augment_crop(crops[k % len(crops)], rng)
            feature_inputs.append(augmented)
            pastes.append(paste_on_black(augmented, resolution, rng))
            owners.append(index)
    total = len(pastes)
    means, stds, features = [], [], []
    with torch.no_grad():
        for start in range(0, total, encode_batch):
            stop = min(total, start + encode_batch)
            images = torch.stack(pastes[start:stop]).to(device=device, dtype=dtype) * 2 - 1
            dist = vae.encode(images).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
            crops = torch.stack(feature_inputs[start:stop]).to(encoder_device)
            features.append(faces_mod.embed_faces(face_encoder, crops).float())
            if progress:
                progress("pool", stop, total, {})
    return SamplePool(
        latent_mean=torch.cat(means).to(device),
        latent_std=torch.cat(stds).to(device),
        features=torch.cat(features).to(device),
        identity=torch.tensor(owners, dtype=torch.long),
        clean_features=clean,
        scaling=scaling,
    )
