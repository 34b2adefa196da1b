"""What a fit takes and gives: its settings, its subjects, its result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import FitError, InvalidOption

FACE_FEATURE_DIM = 512
SUBJECT = "__subject__"
MAX_PHOTOS = 16
# Augmented samples per identity in the pool, when not given. On a GPU the VAE encodes a
# sample in milliseconds, so the pool is large (each sample is used about three times in a
# 400-step fit at batch 2, each time with a fresh latent draw and fresh diffusion noise); on a
# CPU an SD-size VAE takes about a second per sample, so it is small (docs/method.md).
DEFAULT_POOL_GPU = 256
DEFAULT_POOL_CPU = 64
# Loss read back, checked for NaN/Inf and shown, every this many steps (one host sync each).
REPORT_EVERY_GPU = 10

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class FitSettings:
    """Every knob of a fit; recorded in each identity's metadata."""

    steps: int | None = None  # default: 400 per identity
    batch_size: int = 2
    lr: float = 1e-2
    seed: int = 0
    resolution: int | None = None  # default: the model's
    direct: bool = False
    ema_momentum: float = 0.99
    pool_size: int | None = None  # augmented samples per identity; default by device
    steps_per_identity: int = 400
    weight_decay: float = 0.01  # torch's AdamW default
    capture: bool = True  # CUDA only: replay the step as a CUDA graph
    # The text encoder layer the captions are read at (WebUI numbering); None: the config's
    # clip_skip for the model, else 1 (:func:`celebctl.clipskip.fit_clip_skip`).
    clip_skip: int | None = None

    def resolved(self, n_identities: int, default_resolution: int,
                 device_type: str = "cpu") -> FitSettings:
        """A copy with defaults filled in and values checked."""
        self.check()
        steps = self.steps if self.steps is not None else self.steps_per_identity * n_identities
        resolution = self.resolution or default_resolution
        samples = max(1, math.ceil(steps * self.batch_size / max(n_identities, 1)))
        cap = DEFAULT_POOL_GPU if device_type == "cuda" else DEFAULT_POOL_CPU
        pool = self.pool_size or min(cap, samples)
        out = FitSettings(**asdict(self))
        out.steps, out.resolution, out.pool_size = steps, resolution, pool
        return out

    def check(self) -> None:
        """Raise InvalidOption for a value that cannot work (before any model loads)."""
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise InvalidOption("--steps must be at least 1.")
        if self.steps is not None and self.steps > 100_000:
            raise InvalidOption("--steps must be at most 100000.")
        if not 1 <= self.batch_size <= 64:
            raise InvalidOption("--batch-size must be between 1 and 64.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidOption("--lr must be a positive number.")
        if self.resolution is not None and (self.resolution % 8
                                            or not 64 <= self.resolution <= 2048):
            raise InvalidOption("--resolution must be a multiple of 8 between 64 and 2048.")
        if self.pool_size is not None and not 1 <= self.pool_size <= 4096:
            raise InvalidOption("--pool-size must be between 1 and 4096.")
        from ..clipskip import check_clip_skip

        if self.clip_skip is not None:
            check_clip_skip(self.clip_skip)
        if not 0 <= self.ema_momentum < 1:
            raise InvalidOption("The EMA momentum must be in [0, 1).")


@dataclass
class FitSubject:
    """One identity to fit: its name and its aligned face crops (PIL images, RGB), one per
    source photo."""

    name: str
    faces: list[Any]

    def __init__(self, name: str, faces: Any):
        self.name = name
        self.faces = list(faces) if isinstance(faces, (list, tuple)) else [faces]
        if not 1 <= len(self.faces) <= MAX_PHOTOS:
            raise FitError(f"'{name}' needs 1 to {MAX_PHOTOS} face crops, not {len(self.faces)}.")


@dataclass
class FitResult:
    """What a fit produced."""

    coefficients: dict[str, Any]  # name -> numpy (2, p) float32
    face_embeddings: dict[str, Any]  # name -> numpy (photos, 512) float32, un-augmented crops
    losses: list[float]
    settings: FitSettings
    wall_time_s: float
    pool_time_s: float
    summary: dict[str, Any] = field(default_factory=dict)
    captured: bool = False  # the step ran as a CUDA graph
    notes: list[str] = field(default_factory=list)
