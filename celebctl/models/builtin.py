"""The built-in models, built in code from seeded random weights.

``tiny`` (cached in the data home as a diffusers folder) runs the whole pipeline offline in
tests and the demo; ``sd15-random`` is the real SD 1.5 architecture for speed and memory work
(compute cost does not depend on weight values). Their configs are written out here, and the
SD 1.x configs also let single-file checkpoints load without the hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from .. import paths, storage
from ..errors import StorageError
from .quiet import quiet_libraries
from .specs import TINY_CACHE_NAME, TINY_RESOLUTION
from .tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for a block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield



# ---- configs written in code


def _tiny_text_config() -> dict[str, Any]:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def _tiny_unet_config() -> dict[str, Any]:
    # sample_size 8 latents x 8 (VAE) = the 64 px default resolution.
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


def _tiny_vae_config() -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                layers_per_block=1, latent_channels=4, norm_num_groups=16,
                sample_size=TINY_RESOLUTION, scaling_factor=0.18215)


def _sd_scheduler_config() -> dict[str, Any]:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                steps_offset=1, prediction_type="epsilon")


def sd15_text_config() -> dict[str, Any]:
    """CLIP ViT-L/14's text tower as used by SD 1.x."""
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def sd15_unet_config() -> dict[str, Any]:
    """The SD 1.5 UNet."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                act_fn="silu", center_input_sample=False, downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
                norm_eps=1e-5)


def sd15_vae_config() -> dict[str, Any]:
    """The SD 1.x VAE."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215, act_fn="silu")


# Separate seeds per module, so a text-only load gives the same encoder as a full load.
_SEED_TEXT, _SEED_UNET, _SEED_VAE = 0, 1, 2


def _build_text_encoder(config: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    with _seeded(_SEED_TEXT):
        return CLIPTextModel(CLIPTextConfig(**config))


def _build_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    with _seeded(_SEED_UNET):
        return UNet2DConditionModel(**config)


def _build_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    with _seeded(_SEED_VAE):
        return AutoencoderKL(**config)


def _build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_sd_scheduler_config())


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


def _model_index(components: dict[str, Any]) -> dict[str, Any]:
    """A model_index.json so diffusers' StableDiffusionPipeline can open the folder too."""
    import diffusers

    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline",
                             "_diffusers_version": diffusers.__version__,
                             "requires_safety_checker": False,
                             "safety_checker": [None, None], "feature_extractor": [None, None],
                             "image_encoder": [None, None]}
    for name, module in components.items():
        library = "transformers" if name in ("tokenizer", "text_encoder") else "diffusers"
        index[name] = [library, type(module).__name__]
    return index


def _save_diffusers_folder(components: dict[str, Any], folder: Path) -> None:
    for name, module in components.items():
        module.save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(_model_index(components), indent=2))


def tiny_model_dir() -> Path:
    """Where the tiny model is cached (a diffusers folder)."""
    return paths.models_dir() / TINY_CACHE_NAME


def ensure_tiny_model() -> Path:
    """Build and cache the tiny model once; return its folder.

    The folder is written under a temp name and renamed into place while holding the writer
    lock, so a crash leaves either no cache or a complete one.
    """
    target = tiny_model_dir()
    if (target / "model_index.json").is_file():
        return target
    with storage.writer_lock(paths.lock_path()):
        if (target / "model_index.json").is_file():  # another process built it meanwhile
            return target
        storage.ensure_private_dir(target.parent)
        storage.clean_temp_files(target.parent)
        tmp = target.parent / f"{target.name}{storage.TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            storage.ensure_private_dir(tmp)
            with quiet_libraries():
                _save_diffusers_folder(build_tiny_model(), tmp)
            storage.repair_modes(tmp)  # save_pretrained writes 0644; the data home is private
            if target.exists():  # a damaged cache without model_index.json
                shutil.rmtree(target)
            os.replace(tmp, target)
            storage.fsync_dir(target.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"Could not write the tiny model cache {target}: {exc}. "
                               "Check that the data home is writable (CELEBCTL_HOME).") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _discard_tiny_cache() -> None:
    target = tiny_model_dir()
    with storage.writer_lock(paths.lock_path()):
        shutil.rmtree(target, ignore_errors=True)
