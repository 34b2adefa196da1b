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
EMBED_BATCH = 16  # augmented crops per face-encoder call (measured: 16.6 ms/crop at 2, 12.5 at 8)


def pil_to_tensor(image):
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Augmentation:
    """The random draws of one augmented sample (drawn in this order from the fit's RNG)."""

    flip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    height: int
    width: int
    top: int
    left: int


def _draw_paste(rng: random.Random, resolution: int) -> tuple[int, int, int, int]:
    scale = rng.uniform(0.1, 1.0)
    aspect = rng.uniform(0.9, 1.1)
    height = max(8, min(resolution, round(resolution * scale)))
    width = max(8, min(resolution, round(height * aspect)))
    top = rng.randint(0, resolution - height)
    left = rng.randint(0, resolution - width)
    return height, width, top, left


def _draw_jitter(rng: random.Random) -> tuple[bool, float, float, float, float]:
    flip = rng.random() < 0.5
    brightness, contrast, saturation = (rng.uniform(0.8, 1.2) for _ in range(3))
    return flip, brightness, contrast, saturation, rng.uniform(-0.02, 0.02)


def draw_augmentation(rng: random.Random, resolution: int) -> Augmentation:
    """Flip (p 0.5); brightness, contrast, saturation x0.8-1.2; hue +-0.02; the paste's size
    (10-100 % of the frame height, aspect 0.9-1.1) and place on a ``resolution`` canvas."""
    return Augmentation(*_draw_jitter(rng), *_draw_paste(rng, resolution))


def _grayscale(images):
    """ITU-R 601 luma of (N, 3, H, W) images, as (N, 1, H, W)."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def shift_hue(images, shifts):
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by ``shifts`` (N,) turns (HSV)."""
    import torch

    r, g, b = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    delta = value - images.min(dim=1)[0]
    saturation = delta / value.clamp_min(1e-12)
    safe = delta.clamp_min(1e-12)
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    # Back to RGB in sixths of a turn: channel n is v - v s clamp(min(k, 4 - k), 0, 1) with
    # k = (n + 6 h) mod 6, n = 5, 3, 1 for red, green, blue (grey pixels keep s = 0).
    sixths = torch.remainder(hue + 6.0 * shifts.view(-1, 1, 1), 6.0)
    chroma = value * saturation
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(sixths + n, 6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def jitter(images, draws: Sequence[Augmentation]):
    """Flip and colour-jitter (N, 3, H, W) crops in [0, 1] on their device, each by its draw:
    brightness, contrast (towards the mean grey), saturation (towards grey), hue, in that
    order, clamped to [0, 1] after each."""
    import torch

    def column(values):
        return torch.tensor(values, dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)

    flips = torch.tensor([d.flip for d in draws], device=images.device).view(-1, 1, 1, 1)
    x = torch.where(flips, images.flip(-1), images)
    x = (x * column([d.brightness for d in draws])).clamp(0, 1)
    contrast = column([d.contrast for d in draws])
    mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
    saturation = column([d.saturation for d in draws])
    x = (saturation * x + (1 - saturation) * _grayscale(x)).clamp(0, 1)
    hues = torch.tensor([d.hue for d in draws], dtype=images.dtype, device=images.device)
    return shift_hue(x, hues).clamp(0, 1)


def paste(faces, draws: Sequence[Augmentation], resolution: int):
    """Each face rescaled to its draw's size and pasted at its place on a black canvas."""
    import torch
    import torch.nn.functional as F

    canvas = torch.zeros((len(draws), 3, resolution, resolution), dtype=faces.dtype,
                         device=faces.device)
    for i, d in enumerate(draws):
        resized = F.interpolate(faces[i:i + 1], size=(d.height, d.width), mode="bilinear",
                                antialias=True, align_corners=False)[0]
        canvas[i, :, d.top:d.top + d.height, d.left:d.left + d.width] = resized
    return canvas


def augment_crop(crop, rng: random.Random):
    """Flip + colour jitter of one (3, H, W) crop in [0, 1] (draws as the pool makes them)."""
    draw = Augmentation(*_draw_jitter(rng), 0, 0, 0, 0)
    return jitter(crop[None], [draw])[0]


def paste_on_black(face, resolution: int, rng: random.Random):
    """One (3, H, W) face rescaled to 10-100 % of the frame height, pasted on black."""
    draw = Augmentation(False, 1.0, 1.0, 1.0, 0.0, *_draw_paste(rng, resolution))
    return paste(face[None], [draw], resolution)[0]


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

    Every draw is made up front from ``rng``; the flips, jitter and pastes then run on the
    fit's device, a chunk of samples at a time (a GPU does a whole chunk in milliseconds where
    a CPU spent 20 ms a sample). ``subjects`` carry ``faces`` (PIL crops, one per photo).
    Small encode batches keep the pool's peak memory (the VAE encoder's activations at full
    resolution) below a step's.
    """
    import torch

    from . import faces as faces_mod

    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    encoder_device = next(face_encoder.parameters()).device
    sources, draws, owners, clean = [], [], [], []
    for index, subject in enumerate(subjects):
        crops = torch.stack([pil_to_tensor(face) for face in subject.faces]).to(device)
        with torch.no_grad():
            clean.append(faces_mod.embed_faces(face_encoder, crops.to(encoder_device))
                         .float().cpu())
        for k in range(pool_size):
            sources.append(crops[k % len(crops)])
            draws.append(draw_augmentation(rng, resolution))
            owners.append(index)
    total = len(draws)
    # A GPU jitters many crops per kernel; a CPU is faster a few at a time (they stay in cache).
    chunk = max(encode_batch, 16) if torch.device(device).type == "cuda" else encode_batch
    means, stds, features, unembedded = [], [], [], []

    def embed_waiting() -> None:  # the face encoder works best on batches of 16 or more
        crops = torch.cat(unembedded).to(encoder_device)
        features.append(faces_mod.embed_faces(face_encoder, crops).float().to(device))
        unembedded.clear()

    with torch.no_grad():
        for first in range(0, total, chunk):
            last = min(total, first + chunk)
            jittered = jitter(torch.stack(sources[first:last]), draws[first:last])
            unembedded.append(jittered)
            if sum(len(c) for c in unembedded) >= EMBED_BATCH or last == total:
                embed_waiting()
            pastes = paste(jittered, draws[first:last], resolution)
            for start in range(0, last - first, encode_batch):
                images = pastes[start:start + encode_batch].to(dtype=dtype) * 2 - 1
                dist = vae.encode(images).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
                if progress:
                    progress("pool", min(total, first + start + encode_batch), total, {})
    return SamplePool(
        latent_mean=torch.cat(means).to(device),
        latent_std=torch.cat(stds).to(device),
        features=torch.cat(features).to(device),
        identity=torch.tensor(owners, dtype=torch.long),
        clean_features=clean,
        scaling=scaling,
    )
