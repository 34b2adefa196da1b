"""The built-in models, built in code from seeded random weights.

``tiny``, ``tiny-sd2`` and ``tiny-xl`` (cached in the data home as diffusers folders) run the
whole pipeline of each Stable Diffusion family offline in tests and the demo; ``sd15-random``
and ``sdxl-random`` are the real SD 1.5 and SDXL architectures for speed and memory work
(compute cost does not depend on weight values). Their configs are written out here, and the
real architectures' configs also let single-file checkpoints load without the hub.
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
from .quiet import quiet_libraries
from .specs import TINY, TINY_CACHE_NAME, TINY_RESOLUTION, TINY_SD2, TINY_XL
from .tokenizers import CLIP_VOCAB_SIZE, OPENCLIP_PAD_TOKEN, build_clip_tokenizer


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


# ---- SD 2.x: OpenCLIP ViT-H text encoder (1024-d, 23 layers: the last of 24 is dropped), pad
# "!", v-prediction at 768 px (2.1) or epsilon at 512 px (2.1-base).


def sd21_text_config() -> dict[str, Any]:
    """OpenCLIP ViT-H's text tower as SD 2.x uses it."""
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=1024, intermediate_size=4096,
                num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def sd21_unet_config() -> dict[str, Any]:
    """The SD 2.1 UNet (768 px)."""
    return {**sd15_unet_config(), "sample_size": 96, "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}


def _tiny_sd2_text_config() -> dict[str, Any]:
    return {**_tiny_text_config(), "hidden_size": 48, "num_attention_heads": 4,
            "hidden_act": "gelu", "projection_dim": 48}


def _tiny_sd2_unet_config() -> dict[str, Any]:
    return {**_tiny_unet_config(), "cross_attention_dim": 48, "use_linear_projection": True}


# ---- SDXL: CLIP ViT-L (768-d) and OpenCLIP ViT-bigG (1280-d, with a projection giving the
# pooled embedding); the penultimate hidden states of both side by side (2048-d) condition the
# UNet, which also takes the pooled embedding and six size/crop "time ids".


def sdxl_text_config() -> dict[str, Any]:
    """SDXL's first text encoder: CLIP ViT-L/14 (hidden states only)."""
    return {**sd15_text_config(), "projection_dim": 768}


def sdxl_text2_config() -> dict[str, Any]:
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14 with its projection."""
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120,
                num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL base UNet."""
    return dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32,
                act_fn="silu", flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5)


def sdxl_vae_config() -> dict[str, Any]:
    """The SDXL VAE (its decoder overflows in fp16, so it is decoded in fp32)."""
    return {**sd15_vae_config(), "sample_size": 1024, "scaling_factor": 0.13025,
            "force_upcast": True}


def _tiny_xl_text2_config() -> dict[str, Any]:
    return {**_tiny_text_config(), "hidden_size": 48, "hidden_act": "gelu",
            "projection_dim": 48}


def _tiny_xl_unet_config() -> dict[str, Any]:
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D",
                                                               "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=80, attention_head_dim=8, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 48, norm_num_groups=32)


def _tiny_xl_vae_config() -> dict[str, Any]:
    return {**_tiny_vae_config(), "scaling_factor": 0.13025}


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
    for name, module in components.items():
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
