"""LoRAs for drawing: ``<lora:NAME:WEIGHT>`` in prompts and ``render --lora FILE[:WEIGHT]``.

- :mod:`.files`: requests (prompt tags, options) -> files found in the LoRA folder and checked
  from their safetensors header alone (a LoRA, kohya or diffusers keys, of the model's family
  by its tensor shapes), before any model loads; the WebUI's short hash and PNG text.
- :mod:`.apply`: checked LoRAs loaded with diffusers' LoRA loader, fused into the loaded
  components for the denoising loop, and the loaded weights restored exactly for the next
  render that asks for another set (or none).

LoRAs are for rendering only: fits (`add`, `joint`, `add-many`) load their own components and
never see a fused LoRA; a caller that shares components calls :func:`restore` first.
"""

from __future__ import annotations

from .apply import apply_loras, fused_names, restore, set_key
from .files import (
    MAX_LORAS,
    LoraInfo,
    LoraRequest,
    LoraUse,
    check_lora_fits,
    configured_lora_dir,
    find_lora,
    has_tags,
    inspect_lora,
    lora_folder,
    lora_hashes_text,
    parse_lora_hashes,
    parse_lora_option,
    resolve_loras,
    short_hash,
    split_tags,
    with_tags,
)

__all__ = [
    "MAX_LORAS", "LoraInfo", "LoraRequest", "LoraUse", "apply_loras", "check_lora_fits",
    "configured_lora_dir", "find_lora", "fused_names", "has_tags", "inspect_lora",
    "lora_folder", "lora_hashes_text", "parse_lora_hashes", "parse_lora_option", "resolve_loras",
    "restore", "set_key", "short_hash", "split_tags", "with_tags",
]
