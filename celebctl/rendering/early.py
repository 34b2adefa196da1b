"""What `render --prompts` can know before a model loads: the image size and schedule type of
some models, and the notes for WebUI syntax celebctl reads as text (:mod:`.batch` uses both)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import samplers
from .plan import unsupported_syntax_notes

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Components, ModelSpec
    from .promptfile import PromptLine


def syntax_notes_by_line(lines: Sequence[PromptLine], negative: str, shown: str) -> list[str]:
    """`render`'s notes for WebUI syntax celebctl reads as text (:func:`unsupported_syntax_notes`),
    one per kind for the whole file with the lines that use it, and the negative's."""
    lines_of: dict[str, list[int]] = {}
    for line in lines:
        for note in unsupported_syntax_notes(line.text):
            lines_of.setdefault(note, []).append(line.number)
    notes = []
    for note, numbers in lines_of.items():
        where = ", ".join(str(n) for n in numbers[:10])
        where += f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
        notes.append(f"Line{'s' if len(numbers) > 1 else ''} {where} of {shown}: {note}")
    return notes + unsupported_syntax_notes("", negative)


def resolution_without_loading(spec: ModelSpec) -> int | None:
    """The model's default image size when it is known for certain without loading it: the
    built-in models, and a diffusers folder's UNet and VAE configs. None otherwise (a single
    file's size is known once it is loaded)."""
    from ..models import BUILTIN_FAMILIES

    if spec.kind in BUILTIN_FAMILIES:
        return spec.default_resolution
    if spec.kind != "folder" or spec.path is None:
        return None
    try:
        unet = json.loads((spec.path / "unet" / "config.json").read_text("utf-8"))
        vae = json.loads((spec.path / "vae" / "config.json").read_text("utf-8"))
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def schedule_type_without_loading(choice: samplers.SamplerChoice, spec: ModelSpec,
                                  components: Components | None) -> str | None:
    """The schedule type the PNGs will record, when known before the model loads: a sampler
    chosen by name has its own; an older `--scheduler` value reads the model's scheduler
    config (loaded parts, a built-in model, a diffusers folder). None otherwise."""
    from ..models import BUILTIN_FAMILIES

    if choice.legacy is None:
        return choice.schedule
    config: Any = None
    if components is not None:
        config = components.scheduler.config
    elif spec.kind in BUILTIN_FAMILIES:
        from ..models.builtin import _sd_scheduler_config

        config = _sd_scheduler_config()
    elif spec.kind == "folder" and spec.path is not None:
        try:
            config = json.loads((spec.path / "scheduler" / "scheduler_config.json")
                                .read_text("utf-8"))
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict) and not hasattr(config, "get"):
        return None
    return samplers.schedule_label(choice, config)
