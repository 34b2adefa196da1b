"""The built-in models, built in code from seeded random weights.

``tiny``, ``tiny-sd2`` and ``tiny-xl`` (cached in the data home as diffusers folders) run the
whole pipeline of each Stable Diffusion family offline in tests and the demo; ``sd15-random``
and ``sdxl-random`` are the real SD 1.5 and SDXL architectures for speed and memory work
(compute cost does not depend on weight values). Their configs are in :mod:`.architectures`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import StorageError
from ..storage import atomic, filemodes, locking
from .architectures import (
    _sd_scheduler_config,
    _tiny_sd2_text_config,
    _tiny_sd2_unet_config,
    _tiny_text_config,
    _tiny_unet_config,
    _tiny_vae_config,
    _tiny_xl_text2_config,
    _tiny_xl_unet_config,
    _tiny_xl_vae_config,
)
from .quiet import quiet_libraries
from .specs import TINY, TINY_CACHE_NAME, TINY_SD2, TINY_XL
from .tokenizers import OPENCLIP_PAD_TOKEN, build_clip_tokenizer


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for a block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield



# Separate seeds per module, so a text-only load gives the same encoder as a full load.
_SEED_TEXT, _SEED_UNET, _SEED_VAE = 0, 1, 2


def _build_text_encoder(config: dict[str, Any], projection: bool = False,
                        seed: int = _SEED_TEXT) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed):
        return cls(CLIPTextConfig(**config))


def _build_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    with _seeded(_SEED_UNET):
        return UNet2DConditionModel(**config)


def _build_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    with _seeded(_SEED_VAE):
        return AutoencoderKL(**config)


def _build_scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**_sd_scheduler_config(), "prediction_type": prediction_type})


_SEED_TEXT_2 = 3


# A randomly initialised UNet all but ignores its text conditioning (its cross-attention adds
# ~5 % to the output), so no test could tell a fit that learns from one that does not. The tiny
# model scales its cross-attention output projections and its output convolution up, which makes
# the prompt, and so an identity, steer the output strongly. Measured on the seeded model:
# conditioning-dependent output std 0.016 -> ~0.6.
TINY_CROSS_ATTENTION_GAIN = 20.0
TINY_OUTPUT_GAIN = 3.0


def _strengthen_conditioning(unet: Any) -> Any:
    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(TINY_CROSS_ATTENTION_GAIN)
        unet.conv_out.weight.mul_(TINY_OUTPUT_GAIN)
        unet.conv_out.bias.mul_(TINY_OUTPUT_GAIN)
    return unet


def build_tiny_model() -> dict[str, Any]:
    """Build the tiny model's components in memory (bit-identical on every call)."""
    return {
        "tokenizer": build_clip_tokenizer(),
        "text_encoder": _build_text_encoder(_tiny_text_config()),
        "unet": _strengthen_conditioning(_build_unet(_tiny_unet_config())),
        "vae": _build_vae(_tiny_vae_config()),
        "scheduler": _build_scheduler(),
    }


def build_tiny_sd2_model() -> dict[str, Any]:
    """The tiny SD 2.x stand-in: an OpenCLIP-style tokenizer (pad "!"), a 48-d gelu text
    encoder, a linear-projection UNet and v-prediction."""
    return {
        "tokenizer": build_clip_tokenizer(OPENCLIP_PAD_TOKEN),
        "text_encoder": _build_text_encoder(_tiny_sd2_text_config()),
        "unet": _strengthen_conditioning(_build_unet(_tiny_sd2_unet_config())),
        "vae": _build_vae(_tiny_vae_config()),
        "scheduler": _build_scheduler("v_prediction"),
    }


def build_tiny_xl_model() -> dict[str, Any]:
    """The tiny SDXL stand-in: two text encoders (32-d, and 48-d with a projection), a UNet
    with SDXL's added text/time conditioning, 80-d cross-attention."""
    return {
        "tokenizer": build_clip_tokenizer(),
        "tokenizer_2": build_clip_tokenizer(OPENCLIP_PAD_TOKEN),
        "text_encoder": _build_text_encoder(_tiny_text_config()),
        "text_encoder_2": _build_text_encoder(_tiny_xl_text2_config(), projection=True,
                                              seed=_SEED_TEXT_2),
        "unet": _strengthen_conditioning(_build_unet(_tiny_xl_unet_config())),
        "vae": _build_vae(_tiny_xl_vae_config()),
        "scheduler": _build_scheduler(),
    }


_TEXT_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def _model_index(components: dict[str, Any]) -> dict[str, Any]:
    """A model_index.json so diffusers' own pipeline class can open the folder too."""
    import diffusers

    xl = "text_encoder_2" in components
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None]}
    if xl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    for name, module in components.items():
        library = "transformers" if name in _TEXT_PARTS else "diffusers"
        index[name] = [library, type(module).__name__]
    return index


def _save_diffusers_folder(components: dict[str, Any], folder: Path) -> None:
    from transformers import PreTrainedModel

    for name, module in components.items():
        if isinstance(module, PreTrainedModel):
            # transformers writes weights on rank 0 only once torch.distributed is initialised
            # (add-many and render --prompts under torchrun join a gloo group), which left other
            # ranks' caches without weights; its config and a safetensors file do the same job.
            from safetensors.torch import save_file

            (folder / name).mkdir(parents=True, exist_ok=True)
            module.config.save_pretrained(str(folder / name))
            save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                      str(folder / name / "model.safetensors"), metadata={"format": "pt"})
        else:
            module.save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(_model_index(components), indent=2))


# Built-in models cached as diffusers folders: name -> (cache folder name, builder).
_CACHED = {
    TINY: (TINY_CACHE_NAME, build_tiny_model),
    TINY_SD2: ("tiny-sd2-v1", build_tiny_sd2_model),
    TINY_XL: ("tiny-xl-v1", build_tiny_xl_model),
}


def tiny_model_dir(name: str = TINY) -> Path:
    """Where a tiny built-in model is cached (a diffusers folder)."""
    return paths.models_dir() / _CACHED[name][0]


def ensure_tiny_model(name: str = TINY) -> Path:
    """Build and cache a tiny built-in model once; return its folder.

    The folder is written under a temp name and renamed into place while holding the writer
    lock, so a crash leaves either no cache or a complete one.
    """
    target = tiny_model_dir(name)
    builder = _CACHED[name][1]
    if (target / "model_index.json").is_file():
        return target
    with locking.writer_lock(paths.lock_path()):
        if (target / "model_index.json").is_file():  # another process built it meanwhile
            return target
        atomic.ensure_private_dir(target.parent)
        atomic.clean_temp_files(target.parent)
        tmp = target.parent / f"{target.name}{atomic.TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            atomic.ensure_private_dir(tmp)
            with quiet_libraries():
                _save_diffusers_folder(builder(), tmp)
            filemodes.repair_modes(tmp)  # save_pretrained writes 0644; the data home is private
            if target.exists():  # a damaged cache without model_index.json
                shutil.rmtree(target)
            os.replace(tmp, target)
            atomic.fsync_dir(target.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"Could not write the tiny model cache {target}: {exc}. "
                               "Check that the data home is writable (CELEBCTL_HOME).") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _discard_tiny_cache(name: str = TINY) -> None:
    target = tiny_model_dir(name)
    with locking.writer_lock(paths.lock_path()):
        shutil.rmtree(target, ignore_errors=True)
