"""Checked LoRAs -> fused into loaded components, and the exact weights back afterwards.

diffusers does the LoRA work: a light StableDiffusionPipeline / StableDiffusionXLPipeline is
built around the loaded parts (the same modules, nothing copied; a fresh scheduler, since a
pipeline's constructor may rewrite its scheduler's config) only to call its LoRA loader:
``load_lora_weights`` (kohya/WebUI and diffusers keys alike), ``set_adapters`` with the
weights, ``fuse_lora``, then ``unload_lora_weights``, which takes peft's wrappers out and
leaves the fused weights in the plain modules. The denoising loop (and a captured CUDA graph
of it) then runs the model exactly as without a LoRA: no extra work per step.

Before fusing, the weights the LoRAs change are copied (to the CPU); :func:`restore` copies
them back, so the model is bit for bit what was loaded (fusing and unfusing by subtraction
would leave float error). The set fused into a model is remembered per UNet: applying the
same set again does nothing, another set restores first. The token-embedding tables, where
identity vectors go, are never touched (a LoRA that would change them is refused).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import LoraError
from .files import LoraUse, check_lora_fits

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Components


@dataclass
class _Fused:
    key: tuple
    saved: list[tuple[Any, Any]] = field(default_factory=list)  # (parameter, CPU copy)
    names: list[str] = field(default_factory=list)


# UNet -> the LoRA set fused into its components.
_FUSED: weakref.WeakKeyDictionary[Any, _Fused] = weakref.WeakKeyDictionary()


def set_key(uses: Sequence[LoraUse]) -> tuple:
    """What identifies a LoRA set: each file and weight, in order."""
    return tuple(use.key for use in uses)


def fused_names(components: Components) -> list[str]:
    """The names of the LoRAs fused into ``components`` now (empty: the model as loaded)."""
    state = _FUSED.get(components.unet)
    return list(state.names) if state is not None else []


def _host(components: Components) -> Any:
    """A diffusers pipeline around ``components``' modules, for its LoRA loader only."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)  # no deprecation notes
    if components.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2, tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2, unet=components.unet, scheduler=scheduler)
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder,
        tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _parts(components: Components) -> dict[str, Any]:
    parts = {"unet": components.unet, "text_encoder": components.text_encoder}
    if components.text_encoder_2 is not None:
        parts["text_encoder_2"] = components.text_encoder_2
    return parts


def _tuner_layers(module: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def apply_loras(components: Components, uses: Sequence[LoraUse]) -> None:
    """Make ``components`` draw with exactly the LoRAs ``uses`` (none: the model as loaded).

    The same set as now costs nothing; another set first restores the loaded weights. A LoRA
    that does not fit the loaded model (checked again on its real widths) or that diffusers
    cannot load raises LoraError naming it, with the model left as loaded.
    """
    from ..models import families

    key = set_key(uses)
    state = _FUSED.get(components.unet)
    if state is not None and state.key == key:
        return
    restore(components)
    if not uses:
        return
    widths = families.encoder_widths(components.text_encoders)
    context = int(components.unet.config.cross_attention_dim)
    for use in uses:
        check_lora_fits(use.info, use.name, widths, components.spec.ref, components.family,
                        context=context)
    _load_and_fuse(components, uses, key)


def _load_and_fuse(components: Components, uses: Sequence[LoraUse], key: tuple) -> None:
    from ..documents import visible
    from ..models import quiet_libraries

    host = _host(components)
    parts = _parts(components)
    adapters: list[str] = []
    saved: list[tuple[Any, Any]] = []
    fused = False
    current: LoraUse | None = None
    try:
        with quiet_libraries():
            for index, use in enumerate(uses):
                current = use
                adapter = f"celebctl_{index}"
                host.load_lora_weights(str(use.path), adapter_name=adapter)
                adapters.append(adapter)
            current = None
            host.set_adapters(adapters, [float(u.weight) for u in uses])
            loaded = host.get_list_adapters()
            touched = [name for name in parts if loaded.get(name)]
            seen: set[int] = set()
            for name in touched:
                for layer in _tuner_layers(parts[name]):
                    base = layer.get_base_layer()
                    for param in (base.weight, getattr(base, "bias", None)):
                        if param is not None and id(param) not in seen:
                            seen.add(id(param))
                            saved.append((param, param.detach().to("cpu", copy=True)))
            fused = True
            host.fuse_lora(components=touched, adapter_names=adapters)
            host.unload_lora_weights()
    except Exception as exc:  # noqa: BLE001 - undo whatever was done, then say which LoRA
        _undo(host, saved if fused else [])
        if isinstance(exc, LoraError):
            raise
        what = (f"LoRA '{visible(current.name)}' ({visible(str(current.path))})"
                if current is not None else "The LoRAs " + ", ".join(
                    f"'{visible(u.name)}'" for u in uses))
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else \
            type(exc).__name__
        raise LoraError(f"{what} could not be loaded into {components.spec.ref} ({reason}). "
                        "Check that it was made for this model's family.") from exc
    for module in parts.values():
        module.eval()
        module.requires_grad_(False)
    _FUSED[components.unet] = _Fused(key=key, saved=saved, names=[u.name for u in uses])


def _undo(host: Any, saved: list[tuple[Any, Any]]) -> None:
    import contextlib

    import torch

    with contextlib.suppress(Exception):
        host.unload_lora_weights()
    with torch.no_grad():
        for param, copy in saved:
            param.copy_(copy.to(param.device))


def restore(components: Components) -> None:
    """Put back the weights ``components`` were loaded with (no-op when no LoRA is fused)."""
    import torch

    state = _FUSED.pop(components.unet, None)
    if state is None:
        return
    with torch.no_grad():
        for param, copy in state.saved:
            param.copy_(copy.to(param.device, non_blocking=False))
