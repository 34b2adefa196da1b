"""The sampling loop: prompt embeddings + seeds -> images, as diffusers' StableDiffusionPipeline
computes them, with room to be faster.

The arithmetic is the pipeline's, step for step (initial noise from one CPU generator per
image, the scheduler's input scaling, classifier-free guidance on a doubled batch, the
scheduler's step, VAE decoding, the same post-processing), so a render matches what diffusers
draws from the same parts to the pixel (tests/test_export.py checks it). What celebctl adds:

- on CUDA the UNet call of a batch is captured once as a CUDA graph and replayed for every
  denoising step (a step of one batch always has the same shapes); eager everywhere else and
  when capture fails;
- the caller encodes and writes the PNGs of one batch while the next batch denoises
  (:mod:`celebctl.rendering`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class UNetCall:
    """``call(sample, timestep, states) -> noise prediction``, eager or as a replayed CUDA graph.

    The graph is captured on the first call with a given set of shapes (after a warm-up on a
    side stream) and replayed afterwards; inputs are copied into its static buffers. Any
    failure to capture falls back to eager calls, once, with ``note`` saying so.
    """

    def __init__(self, unet, capture: bool, note: Callable[[str], None] | None = None):
        self.unet = unet
        self.capture = capture
        self.note = note or (lambda message: None)
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def _eager(self, sample, timestep, states, added=None):
        return self.unet(sample, timestep, encoder_hidden_states=states,
                         added_cond_kwargs=added, return_dict=False)[0]

    def __call__(self, sample, timestep, states, added=None):
        import torch

        if not self.capture or self.failed or sample.device.type != "cuda":
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
        graph, inputs, static_out = entry
        for static, value in zip(inputs, _flat(sample, timestep, states, added), strict=True):
            static.copy_(value)
        graph.replay()
        return static_out.clone()

    def _capture(self, sample, timestep, states, added):
        import torch

        inputs = [value.clone() for value in _flat(sample, timestep, states, added)]
        static_added = None if added is None else dict(zip(added, inputs[3:], strict=True))
        stream = torch.cuda.Stream(device=sample.device)
        stream.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self._eager(inputs[0], inputs[1], inputs[2], static_added)
        torch.cuda.current_stream(sample.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self._eager(inputs[0], inputs[1], inputs[2], static_added)
        return graph, inputs, static_out


def _flat(sample, timestep, states, added) -> list[Any]:
    return [sample, timestep, states, *((added or {}).values())]


def initial_latents(generators: Sequence[Any], shape: Sequence[int], device, dtype,
                    init_noise_sigma: float):
    """One latent per generator (CPU generators, as the pipeline draws them), on ``device``."""
    import torch

    latents = torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])
    return latents.to(device) * init_noise_sigma


def sample_images(*, unet_call: UNetCall, vae, scheduler, embeds: Any, family: str,
                  generators: Sequence[Any], steps: int, guidance: float, height: int,
                  width: int, on_step: Callable[[int], None] | None = None) -> list[Any]:
    """Denoise one batch (one generator per image) and decode it to PIL images.

    ``embeds`` holds the prompt's and the negative prompt's embeddings (and SDXL's pooled ones,
    which with the size/crop time ids form the UNet's added conditions).
    """
    import inspect

    import numpy as np
    import torch
    from PIL import Image

    from .models import families

    prompt_embeds, negative_embeds = embeds.prompt, embeds.negative
    device = prompt_embeds.device
    batch = len(generators)
    dtype = prompt_embeds.dtype
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = unet_call.unet.config.in_channels
    latents = initial_latents(generators, (channels, height // scale, width // scale), device,
                              dtype, float(scheduler.init_noise_sigma))
    scheduler.set_timesteps(steps, device=device)
    cfg = guidance > 1
    states = prompt_embeds.expand(batch, -1, -1)
    if cfg:
        states = torch.cat([negative_embeds.expand(batch, -1, -1), states])
    added = None
    if family == "sdxl":
        pooled = embeds.pooled.expand(batch, -1)
        if cfg:
            pooled = torch.cat([embeds.negative_pooled.expand(batch, -1), pooled])
        added = families.added_conditions(family, pooled, height, width, dtype)
    step_kwargs: dict[str, Any] = {}
    accepted = set(inspect.signature(scheduler.step).parameters)
    if "eta" in accepted:
        step_kwargs["eta"] = 0.0
    if "generator" in accepted:
        step_kwargs["generator"] = list(generators)
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = unet_call(model_input, t, states, added)
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:
                on_step(index + 1)
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # The SDXL VAE overflows in fp16: decode in fp32, as diffusers does.
            vae.to(torch.float32)
            latents = latents.float()
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor,
                             return_dict=False)[0]
    pixels = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in pixels]
