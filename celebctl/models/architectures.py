"""The architecture configs of each Stable Diffusion family, written in code.

The real SD 1.5, SD 2.1 and SDXL architectures (``sd15_*``, ``sd21_*``, ``sdxl_*``: diffusers and
transformers config dicts) and the built-in tiny models' scaled-down ones (``_tiny_*``). The
built-in models (:mod:`.builtin`) are built from them and single-file checkpoints
(:mod:`.singlefile`) load with them, without the hub. This module imports nothing heavy and
nothing else in the package but the tokenizer's vocabulary size, so every module can use it.
"""

from __future__ import annotations

from typing import Any

from .tokenizers import CLIP_VOCAB_SIZE

# The built-in tiny models generate 64 px images (8 x 8 latents).
TINY_RESOLUTION = 64


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
