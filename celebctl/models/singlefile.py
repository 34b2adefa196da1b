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

from .builtin import _sd_scheduler_config, sd15_text_config, sd15_unet_config, sd15_vae_config
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


def _write_sd1_config_folder(folder: Path) -> None:
    """SD 1.x diffusers configs, so from_single_file needs nothing from the hub."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    CLIPTextConfig(**sd15_text_config(), architectures=["CLIPTextModel"]).save_pretrained(
        str(folder / "text_encoder"))
    build_clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    for name, cls, config in (("unet", UNet2DConditionModel, sd15_unet_config()),
                              ("vae", AutoencoderKL, sd15_vae_config())):
        (folder / name).mkdir(exist_ok=True)
        full = {"_class_name": cls.__name__, **config}
        (folder / name / "config.json").write_text(json.dumps(full, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": DDIMScheduler.__name__, **_sd_scheduler_config()}))
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _load_single_file_pipeline(path: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    prefix = _sd1_text_prefix(path)
    with tempfile.TemporaryDirectory(prefix="celebctl-sd1-config-") as tmp:
        kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        if prefix is not None:
            _write_sd1_config_folder(Path(tmp))
            kwargs["config"] = tmp
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    return {name: getattr(pipe, name)
            for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")}
