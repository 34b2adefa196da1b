"""img2img and the hires fix: denoising that starts from an image instead of pure noise.

Both follow diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline
(0.42.1) step for step, so a render equals what those pipelines draw from the same parts:

- the init image is resized to the render's size with diffusers' ``VaeImageProcessor`` (PIL
  Lanczos, then scaled to [-1, 1]); each image's VAE latent is *sampled* from the encoder's
  distribution with that image's own generator, then scaled (SDXL: the VAE encodes in fp32 when
  its config says ``force_upcast``), and the same generator then draws the noise;
- the scheduler is set to the whole schedule, its last ``run`` steps are kept
  (``timesteps[start * order:]``, ``set_begin_index`` where the scheduler has it) and the clean
  latents are noised to the first kept timestep with ``add_noise``: any diffusers scheduler
  works (the loop only calls ``set_timesteps``, ``timesteps``, ``order``,
  ``scale_model_input``, ``step``, ``add_noise`` and ``set_begin_index``).

How many steps run:

- img2img (``--strength S``, the WebUI's "Denoising strength"): diffusers' rule, ``int(steps *
  S)`` of a ``steps``-long schedule (the WebUI runs one more);
- hires fix (``--hires-steps N --hires-denoise D``): the WebUI's rule for its second pass, which
  runs exactly N steps of a schedule ``int(N / min(D, 0.999))`` long (A1111's
  ``setup_img2img_steps`` when steps are given), so "Hires steps: N" means what it means there.

The hires fix is the WebUI's ``sample_hr_pass``: after the txt2img pass its latents are
upscaled to ``int(size * SCALE)`` (rounded down to a multiple of 8) by bilinear interpolation
without antialiasing (the WebUI's "Latent" upscaler), or its decoded images by PIL's Lanczos
("Lanczos") and encoded again; then an img2img pass at that size uses fresh generators from the
same seeds (the WebUI draws the second pass's noise from the same seeds too). docs/method.md,
"img2img and hires fix", says what is followed and where it differs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidOption, PhotoError
from .plan import MAX_SIZE, MAX_STEPS, MIN_SIZE

DEFAULT_STRENGTH = 0.75  # the WebUI's img2img "Denoising strength"
DEFAULT_HIRES_DENOISE = 0.7  # the WebUI's hires fix default
MAX_HIRES_SCALE = 4.0  # the WebUI's slider stops at 4
# --hires-upscaler value -> the name the WebUI writes as "Hires upscaler".
HIRES_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}
SIZE_MULTIPLE = 8


def _fraction(value: Any, flag: str, default_hint: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not 0 <= value <= 1):
        raise InvalidOption(f"{flag} must be a number from 0 to 1 ({default_hint}), "
                            f"not {value}.")
    return float(value)


def img2img_steps(steps: int, strength: float) -> int:
    """The denoising steps an img2img render runs: diffusers' ``int(steps * strength)``."""
    return min(int(steps * strength), steps)


def hires_schedule(steps: int, denoise: float) -> tuple[int, int]:
    """(schedule length, steps run) of a hires pass of ``steps`` steps: the WebUI's rule."""
    return max(steps, int(steps / min(denoise, 0.999))), steps


@dataclass(frozen=True)
class HiresFix:
    """The WebUI's hires fix: a second img2img pass at ``scale`` times the size."""

    scale: float
    steps: int | None = None  # None (the WebUI's 0): as many as the first pass
    denoise: float = DEFAULT_HIRES_DENOISE
    upscaler: str = "latent"

    def check(self) -> HiresFix:
        """Raise InvalidOption for a setting that cannot work; returns itself."""
        if (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
                or not math.isfinite(self.scale) or not 1 <= self.scale <= MAX_HIRES_SCALE):
            raise InvalidOption(f"--hires must be a scale from 1 to {MAX_HIRES_SCALE:g} (2 "
                                f"doubles width and height), not {self.scale}.")
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int)
                                       or not 1 <= self.steps <= MAX_STEPS):
            raise InvalidOption(f"--hires-steps must be between 1 and {MAX_STEPS} (leave it "
                                "out for as many as --steps).")
        denoise = _fraction(self.denoise, "--hires-denoise",
                            f"{DEFAULT_HIRES_DENOISE:g} by default, as in the WebUI")
        if denoise == 0:
            raise InvalidOption("--hires-denoise 0 would leave the upscaled image as it is; "
                                f"give a value above 0 (the WebUI's default is "
                                f"{DEFAULT_HIRES_DENOISE:g}).")
        if self.upscaler not in HIRES_UPSCALERS:
            raise InvalidOption(f"Unknown --hires-upscaler '{self.upscaler}': use "
                                f"{' or '.join(HIRES_UPSCALERS)}.")
        return self

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: ``int(side * scale)`` rounded down to a multiple of 8."""
        return tuple(int(side * self.scale) // SIZE_MULTIPLE * SIZE_MULTIPLE  # type: ignore
                     for side in (width, height))

    def steps_for(self, steps: int) -> int:
        """The second pass's steps when the first pass has ``steps``."""
        return self.steps or steps


@dataclass(frozen=True)
class InitImage:
    """An init image read and checked: upright 8-bit RGB, and a hash of its pixels."""

    image: Any
    sha256: str
    name: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def load_init_image(path: str | Path) -> InitImage:
    """Read ``path`` as an init image with the photo checks (no FIFOs, devices, bombs, damaged
    or non-image files); raises PhotoError naming the file. Loads no model."""
    from ..faces.photos import load_photo

    try:
        image = load_photo(path)
    except PhotoError as exc:
        raise PhotoError(f"--init-image: {exc}") from None
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes())
    return InitImage(image=image, sha256=digest.hexdigest(), name=Path(path).name)


@dataclass
class StartLatents:
    """Where an img2img pass starts: clean ``latents`` (already scaled; one row for all images
    or one per image) or ``pixels`` in [-1, 1] to encode with each image's generator, and the
    schedule (``total`` steps long, its last ``run`` steps run). :func:`denoise._denoise` calls
    :meth:`prepare`."""

    total: int
    run: int
    latents: Any = None
    pixels: Any = None

    def prepare(self, scheduler, generators, vae, family: str, device, dtype):
        """The noised latents and the timesteps to run, as diffusers' img2img pipelines
        compute them (``get_timesteps`` then ``prepare_latents``)."""
        import torch

        from ..denoise import _rows

        scheduler.set_timesteps(self.total, device="cpu")
        begin = (self.total - self.run) * scheduler.order
        timesteps = scheduler.timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        count = len(generators)
        if self.latents is not None:
            clean = _rows(self.latents, count).to(device=device, dtype=dtype)
        else:
            pixels = self.pixels if self.pixels.shape[0] == 1 else _rows(self.pixels, count)
            clean = encode_latents(vae, pixels, generators, device, dtype)
        noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g, dtype=dtype)
                           for g in generators]).to(device)
        return scheduler.add_noise(clean, noise, timesteps[:1].repeat(count)), timesteps


def encode_latents(vae, pixels, generators, device, dtype):
    """Each row of ``pixels`` (or its one row, for every generator) through the VAE encoder,
    its latent sampled with its own generator, scaled as the img2img pipelines scale it. A VAE
    whose config asks for it (``force_upcast``, SDXL's) encodes in fp32 and is put back to its
    dtype afterwards."""
    import torch

    image = pixels.to(device=device, dtype=dtype)
    own_dtype = vae.dtype
    upcast = bool(getattr(vae.config, "force_upcast", False)) and own_dtype != torch.float32
    with torch.no_grad():
        if upcast:
            image = image.float()
            vae.to(torch.float32)
        try:
            if image.shape[0] == 1:
                # One picture for every image (an init image): encoded once, sampled per seed
                # (the same bits as encoding it for each image, as the pipelines do).
                dist = vae.encode(image[:1]).latent_dist
                latents = torch.cat([dist.sample(generator) for generator in generators])
            else:
                latents = torch.cat([vae.encode(image[i:i + 1]).latent_dist.sample(generator)
                                     for i, generator in enumerate(generators)])
        finally:
            if upcast:
                vae.to(own_dtype)
    latents = latents.to(dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(device=device, dtype=dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(device=device, dtype=dtype)
        return (latents - mean) * vae.config.scaling_factor / std
    return vae.config.scaling_factor * latents


def preprocess_images(images, width: int, height: int):
    """PIL images -> a (n, 3, height, width) float tensor in [-1, 1], resized as diffusers'
    img2img pipelines resize their ``image`` (VaeImageProcessor, Lanczos)."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=SIZE_MULTIPLE)
    return processor.preprocess(list(images), height=height, width=width)


def upscale_latents(latents, width: int, height: int, scale_factor: int):
    """The WebUI's "Latent" upscaler: bilinear interpolation, no antialiasing."""
    import torch

    return torch.nn.functional.interpolate(
        latents, size=(height // scale_factor, width // scale_factor), mode="bilinear",
        antialias=False)


@dataclass
class Redraw:
    """What a render does besides plain txt2img: start from an init image (img2img), or add
    a hires pass. ``Redraw()`` is a plain render."""

    init: InitImage | None = None
    strength: float | None = None
    hires: HiresFix | None = None
    _pixels: Any = field(default=None, repr=False)  # the init image, preprocessed once

    @property
    def plain(self) -> bool:
        return self.init is None and self.hires is None

    def sizes(self, width: int | None, height: int | None, default: int
              ) -> tuple[int, int, int, int]:
        """(first-pass width, height, output width, height). With an init image the size is
        --width/--height, else the image's own rounded down to a multiple of 8 (diffusers'
        default); raises InvalidOption for a size out of range."""
        if self.init is not None:
            own = [side - side % SIZE_MULTIPLE for side in self.init.size]
            width, height = width or own[0], height or own[1]
            for flag, value in (("width", width), ("height", height)):
                if not MIN_SIZE <= value <= MAX_SIZE:
                    iw, ih = self.init.size
                    raise InvalidOption(
                        f"--init-image {self.init.name} is {iw}x{ih}, which gives a {flag} of "
                        f"{value} px; the size must be between {MIN_SIZE} and {MAX_SIZE}. Give "
                        "--width and --height (the image is resized to them).")
        width, height = width or default, height or default
        if self.hires is None:
            return width, height, width, height
        out_w, out_h = self.hires.size(width, height)
        if not (MIN_SIZE <= out_w <= MAX_SIZE and MIN_SIZE <= out_h <= MAX_SIZE):
            raise InvalidOption(
                f"--hires {self.hires.scale:g} makes {width}x{height} into {out_w}x{out_h}; "
                f"the hires size must be between {MIN_SIZE} and {MAX_SIZE} px a side. Lower "
                "--hires or --width/--height.")
        return width, height, out_w, out_h

    def steps_run(self, steps: int) -> int:
        """Denoising steps each image runs (both passes of a hires render)."""
        if self.init is not None:
            return img2img_steps(steps, self.strength or 0)
        if self.hires is not None:
            return steps + self.hires.steps_for(steps)
        return steps

    def settings(self, steps: int, width: int, height: int) -> dict[str, Any]:
        """What the PNG records of it (the WebUI's keys in images.image_parameters)."""
        if self.init is not None:
            return {"denoising_strength": self.strength, "init_image_sha256": self.init.sha256}
        if self.hires is not None:
            out_w, out_h = self.hires.size(width, height)
            return {"denoising_strength": self.hires.denoise, "hires_scale": self.hires.scale,
                    "hires_steps": self.hires.steps_for(steps),
                    "hires_upscaler": HIRES_UPSCALERS[self.hires.upscaler],
                    "hires_width": out_w, "hires_height": out_h}
        return {}

    def to_dict(self, steps: int, width: int, height: int) -> dict[str, Any]:
        """A JSON-ready summary for a render's result (empty for a plain render)."""
        return {k: v for k, v in self.settings(steps, width, height).items()
                if k != "init_image_sha256"} | (
            {"init_image": self.init.name} if self.init is not None else {})

    def sample(self, *, generators, steps: int, width: int, height: int, on_step=None,
               **kwargs) -> list[Any]:
        """One batch's images (``kwargs`` as for :func:`denoise.sample_images`)."""
        from ..denoise import sample_images

        if self.init is not None:
            if self._pixels is None or self._pixels.shape[-2:] != (height, width):
                self._pixels = preprocess_images([self.init.image], width, height)
            pixels = self._pixels
            start = StartLatents(total=steps, run=img2img_steps(steps, self.strength or 0),
                                 pixels=pixels)
            return sample_images(generators=generators, steps=steps, width=width,
                                 height=height, on_step=on_step, start=start, **kwargs)
        if self.hires is not None:
            return self._sample_hires(generators, steps, width, height, on_step, kwargs)
        return sample_images(generators=generators, steps=steps, width=width, height=height,
                             on_step=on_step, **kwargs)

    def _sample_hires(self, generators, steps, width, height, on_step, kwargs) -> list[Any]:
        import torch
        from PIL import Image

        from ..denoise import latents_to_images, sample_latents

        hires = self.hires
        assert hires is not None
        # The second pass draws from fresh generators with the same seeds (as the WebUI).
        states = [g.get_state() for g in generators]
        latents = sample_latents(generators=generators, steps=steps, width=width,
                                 height=height, on_step=on_step, **kwargs)
        out_w, out_h = hires.size(width, height)
        total, run = hires_schedule(hires.steps_for(steps), hires.denoise)
        vae, family = kwargs["vae"], kwargs["family"]
        if hires.upscaler == "latent":
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            start = StartLatents(total=total, run=run,
                                 latents=upscale_latents(latents, out_w, out_h, scale))
        else:
            small = latents_to_images(vae, latents, family, steps)
            big = [image.resize((out_w, out_h), Image.Resampling.LANCZOS) for image in small]
            start = StartLatents(total=total, run=run,
                                 pixels=preprocess_images(big, out_w, out_h))
        fresh = []
        for generator, state in zip(generators, states, strict=True):
            copy = torch.Generator(generator.device)
            copy.set_state(state)
            fresh.append(copy)
        scheduler = kwargs.pop("scheduler")
        second = type(scheduler).from_config(scheduler.config)

        def second_step(step: int) -> None:
            if on_step is not None:
                on_step(steps + step)

        return latents_to_images(vae, sample_latents(
            generators=fresh, steps=run, width=out_w, height=out_h, on_step=second_step,
            start=start, scheduler=second, **kwargs), family, run)


def prepare_redraw(*, init_image: str | Path | InitImage | None = None,
                   strength: float | None = None, hires: HiresFix | None = None,
                   steps: int = 50, width: int | None = None, height: int | None = None
                   ) -> Redraw:
    """Check img2img and hires options and read the init image, before any model loads.

    ``strength`` defaults to 0.75 with an init image and is refused without one; an init image
    and a hires pass do not go together (the WebUI's img2img has no hires fix: give the size
    wanted with --width/--height). The sizes are checked as far as they are known without the
    model (--width/--height, the init image's). Raises InvalidOption or PhotoError.
    """
    if init_image is None:
        if strength is not None:
            raise InvalidOption("--strength goes with --init-image (for the hires pass use "
                                "--hires-denoise).")
        if hires is not None:
            _check_hires_schedule(hires.check(), steps)
            if width is not None and height is not None:
                Redraw(hires=hires).sizes(width, height, 0)
        return Redraw(hires=hires)
    if hires is not None:
        raise InvalidOption("--hires is a second pass after drawing from noise; with "
                            "--init-image give the size you want with --width/--height "
                            "instead.")
    strength = DEFAULT_STRENGTH if strength is None else _fraction(
        strength, "--strength", f"the WebUI's Denoising strength, {DEFAULT_STRENGTH:g} by "
        "default")
    if img2img_steps(steps, strength) < 1:
        raise InvalidOption(
            f"--strength {strength:g} with --steps {steps} leaves no denoising step (img2img "
            f"runs int(steps x strength) = {img2img_steps(steps, strength)}); raise --strength "
            "or --steps.")
    init = init_image if isinstance(init_image, InitImage) else load_init_image(init_image)
    redraw = Redraw(init=init, strength=strength)
    redraw.sizes(width, height, 0)
    return redraw


def _check_hires_schedule(hires: HiresFix, steps: int) -> None:
    total, run = hires_schedule(hires.steps_for(steps), hires.denoise)
    if total > MAX_STEPS:
        raise InvalidOption(
            f"--hires-denoise {hires.denoise:g} with {run} hires steps needs a schedule of "
            f"{total} steps (the WebUI's rule: steps / denoise), more than {MAX_STEPS}; raise "
            "--hires-denoise or lower --hires-steps.")
