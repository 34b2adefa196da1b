"""Single-file ``.safetensors`` checkpoints as people download them.

Only the SD 1.x text encoder is read straight from the file (what a basis needs); a full load
goes through diffusers' ``from_single_file`` with configs written by celebctl, so nothing comes
from the hub.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .architectures import (
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
from .tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer

_SD1_TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
_SD1_TOKEN_KEYS = tuple(p + "embeddings.token_embedding.weight" for p in _SD1_TEXT_PREFIXES)


def _sd1_text_prefix(path: Path) -> str | None:
    """The key prefix of an SD 1.x CLIP text encoder inside a single-file checkpoint, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for prefix, key in zip(_SD1_TEXT_PREFIXES, _SD1_TOKEN_KEYS, strict=True):
            if key in keys and list(handle.get_slice(key).get_shape()) == [CLIP_VOCAB_SIZE, 768]:
                return prefix
    return None


def _load_sd1_text_encoder_from_file(path: Path, prefix: str) -> Any:
    """Load only the text encoder of an SD 1.x single file (no UNet/VAE, no hub access)."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    # Built on the CPU (not the meta device) so non-persistent buffers such as position_ids
    # are real; every weight is then replaced from the file (strict).
    model = CLIPTextModel(CLIPTextConfig(**sd15_text_config()))
    state: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if key.startswith(prefix) and not key.endswith("position_ids"):
                name = key[len(prefix):]
                if name.startswith("text_model."):
                    name = name[len("text_model."):]
                state[name] = handle.get_tensor(key).float()
    model.load_state_dict(state, strict=True)
    return model


# Tensor names that tell a checkpoint's family (the original Stability AI layouts).
_FAMILY_KEYS = (
    ("sdxl", "conditioner.embedders.1.model.ln_final.weight"),
    ("sd2", "cond_stage_model.model.ln_final.weight"),
    ("sd1", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
    ("sd1", "cond_stage_model.transformer.final_layer_norm.weight"),
)


def single_file_family(path: Path) -> str | None:
    """The family of a single-file checkpoint from its tensor names (reads only the header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    for family, key in _FAMILY_KEYS:
        if key in keys:
            return family
    return None


def _write_config(folder: Path, name: str, cls: Any, config: dict[str, Any]) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "config.json").write_text(
        json.dumps({"_class_name": cls.__name__, **config}, indent=2))


def write_config_folder(folder: Path, family: str) -> None:
    """The diffusers configs of a family's real architecture (SD 1.5, SD 2.1 at 768 px with
    v-prediction, SDXL base), so ``from_single_file`` needs nothing from the hub."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .tokenizers import OPENCLIP_PAD_TOKEN

    folder.mkdir(parents=True, exist_ok=True)
    text = {"sd1": sd15_text_config(), "sd2": sd21_text_config(),
            "sdxl": sdxl_text_config()}[family]
    CLIPTextConfig(**text, architectures=["CLIPTextModel"]).save_pretrained(
        str(folder / "text_encoder"))
    build_clip_tokenizer(OPENCLIP_PAD_TOKEN if family == "sd2" else "<|endoftext|>"
                         ).save_pretrained(str(folder / "tokenizer"))
    unet = {"sd1": sd15_unet_config(), "sd2": sd21_unet_config(),
            "sdxl": sdxl_unet_config()}[family]
    _write_config(folder, "unet", UNet2DConditionModel, unet)
    _write_config(folder, "vae", AutoencoderKL,
                  sdxl_vae_config() if family == "sdxl" else sd15_vae_config())
    scheduler = {**_sd_scheduler_config(),
                 "prediction_type": "v_prediction" if family == "sd2" else "epsilon"}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": DDIMScheduler.__name__, **scheduler}))
    index: dict[str, Any] = {"feature_extractor": [None, None], "image_encoder": [None, None],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", "DDIMScheduler"]}
    if family == "sdxl":
        CLIPTextConfig(**sdxl_text2_config(),
                       architectures=["CLIPTextModelWithProjection"]).save_pretrained(
            str(folder / "text_encoder_2"))
        build_clip_tokenizer(OPENCLIP_PAD_TOKEN).save_pretrained(str(folder / "tokenizer_2"))
        index.update({"_class_name": "StableDiffusionXLPipeline",
                      "force_zeros_for_empty_prompt": True,
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
    else:
        index.update({"_class_name": "StableDiffusionPipeline",
                      "requires_safety_checker": False, "safety_checker": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_sd1_config_folder(folder: Path) -> None:
    """SD 1.x diffusers configs, so from_single_file needs nothing from the hub."""
    write_config_folder(folder, "sd1")


PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
XL_PARTS = PARTS + ("tokenizer_2", "text_encoder_2")


def _load_single_file_pipeline(path: Path, dtype: Any = None) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = single_file_family(path)
    with tempfile.TemporaryDirectory(prefix="celebctl-config-") as tmp:
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        if family is not None:
            write_config_folder(Path(tmp), family)
            kwargs["config"] = tmp
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), **kwargs)
            return {name: getattr(pipe, name) for name in XL_PARTS}
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), safety_checker=None, requires_safety_checker=False, **kwargs)
    return {name: getattr(pipe, name) for name in PARTS}
