"""The sampling loop: prompt embeddings + seeds -> images, as diffusers' StableDiffusionPipeline
computes them, with room to be faster.

The arithmetic is the pipeline's, step for step (initial noise from one CPU generator per
image, the scheduler's input scaling, classifier-free guidance on a doubled batch, the
scheduler's step, VAE decoding, the same post-processing), so a render matches what diffusers
draws from the same parts to the pixel (tests/test_export.py checks it). What celebctl adds:

- on CUDA the UNet call of a batch is captured once as a CUDA graph and replayed for every
  denoising step (a step of one batch always has the same shapes); eager everywhere else and
  when capture fails. A smaller last batch is padded to the captured size (the extra images
  are dropped before decoding), so one graph serves the whole render;
- the scheduler's own state (timesteps, sigmas, alphas) stays on the CPU and the UNet gets the
  timesteps from one copy on the device, so no denoising step waits for the GPU (diffusers
  keeps them on the device, where the schedulers' Python comparisons sync every step);
- latents that became NaN or infinite stop the render with :class:`NonFiniteImages` instead
  of decoding to a black image;
- the caller encodes and writes the PNGs of one batch while the next batch denoises
  (:mod:`celebctl.rendering`).

Images of different prompts can share a batch: embeddings with one row per image are used as
they are, a single row is repeated for every image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .errors import CelebctlError


class NonFiniteImages(CelebctlError):
    """A render whose latents or decoded pixels are NaN or infinite (nothing sensible to save)."""


class UNetCall:
    """``call(sample, timestep, states) -> noise prediction``, eager or as a replayed CUDA graph.

    The graph is captured on the first call with a given set of shapes (after a warm-up on a
    side stream) and replayed afterwards; inputs are copied into its static buffers. Any
    failure to capture falls back to eager calls, once, with ``note`` saying so.

    ``emulate`` runs the replay path on a CPU too (tests): the same static buffers, keys,
    padding and copies, with the captured graph's replay replaced by an eager call on the
    static inputs written into the static output.
    """

    def __init__(self, unet, capture: bool, note: Callable[[str], None] | None = None,
                 emulate: bool = False):
        self.unet = unet
        self.capture = capture
        self.emulate = emulate
        self.note = note or (lambda message: None)
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def replays(self, device) -> bool:
        """True when calls on ``device`` go through captured graphs (so batch sizes matter)."""
        import torch

        kind = torch.device(device).type
        return self.capture and not self.failed and (kind == "cuda" or self.emulate)

    def _eager(self, sample, timestep, states, added=None):
        return self.unet(sample, timestep, encoder_hidden_states=states,
                         added_cond_kwargs=added, return_dict=False)[0]

    def __call__(self, sample, timestep, states, added=None):
        import torch

        if not self.replays(sample.device):
            return self._eager(sample, timestep, states, added)
        timestep = torch.as_tensor(timestep, device=sample.device)
        key = (tuple(sample.shape), tuple(states.shape), sample.dtype, timestep.dtype,
               None if added is None else tuple((k, tuple(v.shape)) for k, v in added.items()))
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(sample, timestep, states, added)
            except Exception as exc:  # noqa: BLE001 - capture failure means: run eagerly
                self.failed = True
                self.note(f"The UNet could not be captured as a CUDA graph "
                          f"({type(exc).__name__}); rendering eagerly (slower, same images).")
                return self._eager(sample, timestep, states, added)
            self.graphs[key] = entry
        replay, inputs, static_out = entry
        for static, value in zip(inputs, _flat(sample, timestep, states, added), strict=True):
            static.copy_(value)
        replay()
        return static_out.clone()

    def _capture(self, sample, timestep, states, added):
        import torch

        inputs = [value.clone() for value in _flat(sample, timestep, states, added)]
        static_added = None if added is None else dict(zip(added, inputs[3:], strict=True))

        def run():
            return self._eager(inputs[0], inputs[1], inputs[2], static_added)

        if sample.device.type != "cuda":  # emulate: what replay reads and writes, eagerly
            with torch.no_grad():
                static_out = run()
            return (lambda: static_out.copy_(run())), inputs, static_out
        stream = torch.cuda.Stream(device=sample.device)
        stream.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                run()
        torch.cuda.current_stream(sample.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = run()
        return graph.replay, inputs, static_out


def _flat(sample, timestep, states, added) -> list[Any]:
    return [sample, timestep, states, *((added or {}).values())]


def initial_latents(generators: Sequence[Any], shape: Sequence[int], device, dtype,
                    init_noise_sigma: float):
    """One latent per generator (CPU generators, as the pipeline draws them), on ``device``."""
    import torch

    latents = torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])
    return latents.to(device) * init_noise_sigma


def _rows(tensor, count: int):
    """``tensor`` with ``count`` rows: one row repeated, or the first rows of several (the last
    repeated when a padded batch needs more)."""
    import torch

    if tensor.shape[0] == 1:
        return tensor.expand(count, *tensor.shape[1:])
    if tensor.shape[0] >= count:
        return tensor[:count]
    extra = tensor[-1:].expand(count - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


def _padded_generators(generators: Sequence[Any], count: int) -> list[Any]:
    """``generators`` plus copies of the last one up to ``count`` (their images are dropped)."""
    import torch

    padded = list(generators)
    while len(padded) < count:
        copy = torch.Generator(padded[-1].device)
        copy.set_state(padded[-1].get_state())
        padded.append(copy)
    return padded


def sample_images(*, unet_call: UNetCall, vae, scheduler, embeds: Any, family: str,
                  generators: Sequence[Any], steps: int, guidance: float, height: int,
                  width: int, on_step: Callable[[int], None] | None = None,
                  pad_to: int | None = None, start: Any = None) -> list[Any]:
    """Denoise one batch (one generator per image) and decode it to PIL images.

    ``embeds`` holds the prompt's and the negative prompt's embeddings (and SDXL's pooled ones,
    which with the size/crop time ids form the UNet's added conditions): one row for all
    images, or one row per image. When the UNet call replays captured graphs, a batch smaller
    than ``pad_to`` is padded to it (copies of the last image, dropped before decoding), so
    the last batch of a render replays the same graph. Raises NonFiniteImages when the
    latents or the decoded pixels are not finite. ``start`` (img2img, see
    :class:`celebctl.rendering.img2img.StartLatents`) starts from noised latents part-way
    down the schedule instead of from pure noise.
    """
    latents = sample_latents(unet_call=unet_call, vae=vae, scheduler=scheduler, embeds=embeds,
                             family=family, generators=generators, steps=steps,
                             guidance=guidance, height=height, width=width, on_step=on_step,
                             pad_to=pad_to, start=start)
    return latents_to_images(vae, latents, family, steps)


def sample_latents(*, unet_call: UNetCall, vae, scheduler, embeds: Any, family: str,
                   generators: Sequence[Any], steps: int, guidance: float, height: int,
                   width: int, on_step: Callable[[int], None] | None = None,
                   pad_to: int | None = None, start: Any = None) -> Any:
    """:func:`sample_images` up to the denoised latents (one row per generator, padding
    dropped), for a caller that goes on from them (the hires fix)."""
    device = embeds.prompt.device
    wanted = len(generators)
    if pad_to is not None and wanted < pad_to and unet_call.replays(device):
        generators = _padded_generators(generators, pad_to)
    latents = _denoise(unet_call, scheduler, embeds, family, generators, steps, guidance,
                       height, width, vae, on_step, start)[:wanted]
    _check_finite(latents, "latents", steps)
    return latents


def latents_to_images(vae, latents, family: str, steps: int) -> list[Any]:
    """Decode denoised latents to PIL images as the pipeline post-processes them."""
    import numpy as np
    from PIL import Image

    decoded = _decode(vae, latents, family)
    _check_finite(decoded, "decoded images", steps)
    pixels = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in pixels]


def _denoise(unet_call, scheduler, embeds, family, generators, steps, guidance, height, width,
             vae, on_step, start=None):
    import inspect

    import torch

    from .models import families

    device = embeds.prompt.device
    batch = len(generators)
    dtype = embeds.prompt.dtype
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = unet_call.unet.config.in_channels
    # The scheduler works on the CPU (its Python comparisons of timesteps and sigmas would each
    # wait for the GPU); the UNet reads the timesteps from one copy made here.
    if start is None:
        # The schedule first: a sigma scheduler's init_noise_sigma is its schedule's largest
        # sigma (read before, it was the previous render's or the full training schedule's).
        scheduler.set_timesteps(steps, device="cpu")
        timesteps = scheduler.timesteps
        latents = initial_latents(generators, (channels, height // scale, width // scale),
                                  device, dtype, float(scheduler.init_noise_sigma))
    else:  # img2img: noised latents, and the tail of the schedule
        latents, timesteps = start.prepare(scheduler, generators, vae, family, device, dtype)
    unet_timesteps = timesteps.to(device)
    if hasattr(scheduler, "noise_sampler_seed"):
        # DPM++ SDE draws its noise from Brownian trees: one per image, seeded with the image's
        # own seed (as the WebUI seeds them), so an image is the same in any batch and a seed
        # gives the same image again. Unseeded, diffusers would pick a random seed.
        scheduler.noise_sampler_seed = [g.initial_seed() for g in generators]
        scheduler.noise_sampler = None
    cfg = guidance > 1
    states = _rows(embeds.prompt, batch)
    if cfg:
        states = torch.cat([_rows(embeds.negative, batch), states])
    added = None
    if family == "sdxl":
        pooled = _rows(embeds.pooled, batch)
        if cfg:
            pooled = torch.cat([_rows(embeds.negative_pooled, batch), pooled])
        added = families.added_conditions(family, pooled, height, width, dtype)
    step_kwargs: dict[str, Any] = {}
    accepted = set(inspect.signature(scheduler.step).parameters)
    if "eta" in accepted:
        step_kwargs["eta"] = 0.0
    if "generator" in accepted:
        step_kwargs["generator"] = list(generators)
    with torch.no_grad():
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = unet_call(model_input, unet_timesteps[index], states, added)
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:  # second-order samplers take ~2 timesteps per step
                on_step(-(-(index + 1) * steps // len(scheduler.timesteps)))
    return latents


def _decode(vae, latents, family: str):
    """VAE decoding. SDXL's VAE overflows in fp16: like diffusers' SDXL pipeline, it decodes in
    fp32 and is turned back to fp16 afterwards (also when decoding fails), so a shared VAE
    keeps its dtype; the other families decode in the VAE's own dtype, as their pipelines do."""
    import torch

    upcast = (family == "sdxl" and vae.dtype == torch.float16
              and getattr(vae.config, "force_upcast", False))
    with torch.no_grad():
        if not upcast:
            return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor,
                              return_dict=False)[0]
        vae.to(torch.float32)
        try:
            return vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            vae.to(torch.float16)


def _check_finite(tensor, what: str, steps: int) -> None:
    import torch

    if bool(torch.isfinite(tensor).all()):
        return
    dtype = str(tensor.dtype).replace("torch.", "")
    raise NonFiniteImages(
        f"The {what} became NaN or infinite after {steps} denoising step"
        f"{'s' if steps != 1 else ''} (in {dtype}); no image of this batch was written. "
        "This usually means the model overflows in half precision: render again with "
        "--dtype fp32 (or bf16); if that fails too, the model's weights are damaged.")
