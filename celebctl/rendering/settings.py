"""Settings chosen once the device is known: images per batch, dtype, a fresh scheduler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import samplers

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Components

# Auto batch size (on CUDA): a conservative peak of one image at 512 x 512 in fp16 with
# classifier-free guidance (UNet on a doubled batch, then the VAE decoder), scaled by pixels.
BYTES_PER_IMAGE_512 = 1.5 * 2**30
MAX_AUTO_BATCH = 16
CPU_BATCH = 4


def auto_batch_size(components: Components, num_images: int, width: int, height: int) -> int:
    """As many images per batch as fit: on CUDA from the free memory, on a CPU a few."""
    if components.device.type != "cuda":
        return max(1, min(num_images, CPU_BATCH))
    import torch

    free, _ = torch.cuda.mem_get_info(components.device)
    per_image = BYTES_PER_IMAGE_512 * (width * height) / (512 * 512)
    fits = int(0.7 * free // per_image)
    return max(1, min(num_images, MAX_AUTO_BATCH, fits))


def render_dtype(dtype: str, device: Any) -> Any:
    """The dtype a render runs in: fp16 on CUDA unless asked otherwise (it measured fastest
    there, and SD 1.x's UNet and VAE are safe in fp16), fp32 on a CPU."""
    from .. import models

    if str(dtype).strip().lower() == "auto" and models.resolve_device(device).type == "cuda":
        return models.resolve_dtype("fp16", device)
    return models.resolve_dtype(dtype, device)


def sampler_choice(scheduler: str | None = None, sampler: str | None = None,
                   schedule: str | None = None) -> samplers.SamplerChoice:
    """:func:`samplers.choose` with the config file's ``sampler`` and ``schedule`` (read only
    when no option chooses the sampler). Raises SamplerError before anything loads."""
    from .. import models

    configured = ((None, None) if scheduler is not None or sampler is not None
                  else models.configured_sampling())
    return samplers.choose(scheduler=scheduler, sampler=sampler, schedule=schedule,
                           configured=configured)


def make_scheduler(name: str | samplers.SamplerChoice, config: Any) -> Any:
    """A fresh diffusers scheduler from a model's scheduler ``config``: ``name`` is a sampler
    choice (:mod:`celebctl.samplers`) or an older `--scheduler` value (ddim, dpm, euler)."""
    import diffusers

    from ..models import quiet_libraries

    made = name if isinstance(name, samplers.SamplerChoice) else samplers.legacy_choice(name)
    samplers.check_choice(made)
    cls = getattr(diffusers, made.sampler.cls)
    with quiet_libraries():  # other schedulers' keys in the config are ignored, not news
        return cls.from_config({**dict(config), **made.overrides()})
