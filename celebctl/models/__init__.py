"""Model specs -> loaded components, split by concept.

- :mod:`.specs`: what the user typed -> a ModelSpec; devices and dtypes; which model identities
  use.
- :mod:`.tokenizers`: the CLIP tokenizer from the packaged vocabulary; token-embedding tables.
- :mod:`.architectures`: the architecture configs of each family (real and tiny), shared by
  the built-in models and single-file loading; imports nothing else from the package.
- :mod:`.builtin`: the built-in models with seeded random weights.
- :mod:`.singlefile`: single-file checkpoints.
- :mod:`.loading`: loading a model's parts on a device, with clear errors.
- :mod:`.families`: what differs between SD 1.x, SD 2.x and SDXL (text encoders, added
  conditions).
- :mod:`.convolutions`: which CPU convolution kernels a fit of a given UNet uses.
- :mod:`.warm`: loaded components kept for reuse by a long-running process (`serve`).

Everything public is re-exported here, so ``from celebctl import models`` is all a caller needs.
"""

from __future__ import annotations

from .architectures import (
    TINY_RESOLUTION,
    _sd_scheduler_config,
    sd15_text_config,
    sd15_unet_config,
    sd15_vae_config,
    sd21_text_config,
    sd21_unet_config,
    sdxl_text2_config,
    sdxl_text_config,
    sdxl_unet_config,
    sdxl_vae_config,
)
from .builtin import (
    TINY_CROSS_ATTENTION_GAIN,
    TINY_OUTPUT_GAIN,
    _build_text_encoder,
    _build_unet,
    _build_vae,
    _model_index,
    _save_diffusers_folder,
    build_tiny_model,
    build_tiny_sd2_model,
    build_tiny_xl_model,
    ensure_tiny_model,
    tiny_model_dir,
)
from .loading import (
    Components,
    TextModel,
    family_of_parts,
    load_pipeline_components,
    load_text_model,
    unavailable,
)
from .quiet import quiet_libraries
from .singlefile import (
    _load_sd1_text_encoder_from_file,
    _sd1_text_prefix,
    single_file_family,
    write_config_folder,
)
from .specs import (
    BUILTIN_FAMILIES,
    DEFAULT_MODEL,
    FAMILIES,
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    SD15_RANDOM,
    SD_RESOLUTION,
    SDXL_RANDOM,
    TINY,
    TINY_CACHE_NAME,
    TINY_KINDS,
    TINY_SD2,
    TINY_XL,
    ModelSpec,
    configured_default_model,
    configured_model,
    configured_sampling,
    model_for_identities,
    resolve_device,
    resolve_dtype,
    resolve_model_spec,
    text_widths,
)
from .tokenizers import (
    BOS_TOKEN,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    EOS_TOKEN,
    OPENCLIP_PAD_TOKEN,
    build_clip_tokenizer,
    clip_vocab_and_merges,
    embedding_table,
    embedding_table_sha256,
    tokenizer_sha256,
)
from .warm import (
    forget_warm_components,
    is_warm,
    peek_warm_components,
    warm_components,
    warm_key,
)

__all__ = [
    "BUILTIN_FAMILIES", "FAMILIES", "OPENCLIP_PAD_TOKEN", "SDXL_RANDOM", "TINY_KINDS",
    "TINY_SD2", "TINY_XL", "build_tiny_sd2_model", "build_tiny_xl_model", "family_of_parts",
    "sd21_text_config", "sd21_unet_config", "sdxl_text2_config", "sdxl_text_config",
    "sdxl_unet_config", "sdxl_vae_config", "single_file_family", "text_widths",
    "write_config_folder",
    "BOS_TOKEN", "CLIP_MAX_LENGTH", "CLIP_VOCAB_SIZE", "Components", "DEFAULT_MODEL",
    "EOS_TOKEN", "ModelSpec", "PICKLE_SUFFIXES", "SAFE_SUFFIXES", "SD15_RANDOM",
    "SD_RESOLUTION", "TINY", "TINY_CACHE_NAME", "TINY_CROSS_ATTENTION_GAIN", "TINY_OUTPUT_GAIN",
    "TINY_RESOLUTION", "TextModel", "_build_text_encoder", "_build_unet", "_build_vae",
    "_load_sd1_text_encoder_from_file", "_model_index", "_save_diffusers_folder",
    "_sd1_text_prefix", "_sd_scheduler_config", "build_clip_tokenizer", "build_tiny_model",
    "clip_vocab_and_merges", "configured_default_model", "configured_model", "configured_sampling",
    "embedding_table", "embedding_table_sha256", "ensure_tiny_model", "load_pipeline_components",
    "load_text_model", "model_for_identities", "quiet_libraries", "resolve_device",
    "resolve_dtype", "resolve_model_spec", "sd15_text_config", "sd15_unet_config",
    "sd15_vae_config", "tiny_model_dir", "tokenizer_sha256", "unavailable",
    "forget_warm_components", "is_warm", "peek_warm_components", "warm_components",
    "warm_key",
]
