"""Clip skip: which layer of the text encoder a fit and a render read, in the WebUI's numbering.

``clip_skip`` N counts from the end as the WebUI does: 1 is the last layer (what the model was
trained with), 2 the one before, and so on. Where each family reads its states
(docs/method.md, "Clip skip"):

- SD 1.x and SD 2.x: the hidden states N layers from the end, then the encoder's final layer
  norm (N = 1 is the plain last hidden state) -- what diffusers' ``clip_skip=N-1`` gives, and
  what the WebUI and ComfyUI do for SD 1.x.
- SDXL reads the penultimate layer of both encoders without a final norm already. The WebUI
  (A1111) keeps that layer whatever clip skip says, ComfyUI's ``CLIPSetLastLayer -N`` takes
  ``hidden_states[-N]`` of both encoders, diffusers ``hidden_states[-(clip_skip + 2)]``. The
  majority for each N: 1 and 2 both give the penultimate layer (A1111 and diffusers agree on
  1, A1111 and ComfyUI on 2, the value Pony-style checkpoints ask for), and N >= 3 gives
  ``hidden_states[-N]`` as ComfyUI does (diffusers' ``clip_skip=N-2``).

An identity is fitted at one clip skip and records it; a render reads the layer its identities
were fitted at unless told otherwise. A per-model default comes from the config file::

    [models."/path/to/ponyDiffusion.safetensors"]
    clip_skip = 2

keyed by the model as the user types it (a repo id, a path -- compared once resolved -- or a
built-in name).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidOption

DEFAULT_CLIP_SKIP = 1
# Past the deepest text encoder celebctl knows (OpenCLIP bigG: 32 layers); a per-model check
# narrows it further where the model's layer count is known without loading it.
MAX_CLIP_SKIP = 32


def check_clip_skip(value: Any, flag: str = "--clip-skip") -> int:
    """``value`` as a clip skip (a whole number 1..32), else InvalidOption saying so."""
    if isinstance(value, bool) or not isinstance(value, int) or not \
            1 <= value <= MAX_CLIP_SKIP:
        raise InvalidOption(f"{flag} must be a whole number from 1 (the last layer, the "
                            f"default) to {MAX_CLIP_SKIP}, not {str(value)[:20]!r}; 2 is what "
                            "anime and Pony-style checkpoints ask for.")
    return value


def hidden_index(family: str, clip_skip: int) -> int | None:
    """Which entry of an encoder's ``hidden_states`` the model reads at ``clip_skip``
    (negative, from the end); None for SD 1.x / 2.x at clip skip 1 (the last hidden state,
    after the final norm)."""
    if family == "sdxl":
        return -max(clip_skip, 2)
    return None if clip_skip <= 1 else -clip_skip


def text_layers(spec: Any) -> int | None:
    """How many layers the model's shallowest text encoder has, read cheaply (built-in
    architectures, a folder's or the hub cache's configs, a single file's family), or None."""
    import json

    from . import models
    from .storage import special_files

    def config_layers(path: Path) -> int:
        data = json.loads(special_files.read_regular_file(path, 1 << 20))
        return int(data["num_hidden_layers"])

    builtin = {
        models.TINY: [models.architectures._tiny_text_config()],
        models.TINY_SD2: [models.architectures._tiny_sd2_text_config()],
        models.TINY_XL: [models.architectures._tiny_text_config(),
                         models.architectures._tiny_xl_text2_config()],
        models.SD15_RANDOM: [models.sd15_text_config()],
        models.SDXL_RANDOM: [models.sdxl_text_config(), models.sdxl_text2_config()],
    }
    by_family = {"sd1": [models.sd15_text_config()], "sd2": [models.sd21_text_config()],
                 "sdxl": [models.sdxl_text_config(), models.sdxl_text2_config()]}
    try:
        if spec.kind in builtin:
            return min(int(c["num_hidden_layers"]) for c in builtin[spec.kind])
        if spec.kind == "folder" and spec.path is not None:
            found = [config_layers(spec.path / folder / "config.json")
                     for folder in ("text_encoder", "text_encoder_2")
                     if (spec.path / folder / "config.json").exists()]
            return min(found) if found else None
        if spec.kind == "single_file":
            family = models.specs.family_on_disk(spec)
            return (min(int(c["num_hidden_layers"]) for c in by_family[family])
                    if family in by_family else None)
        if spec.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            found = []
            for folder in ("text_encoder", "text_encoder_2"):
                cached = try_to_load_from_cache(spec.ref, f"{folder}/config.json")
                if isinstance(cached, str):
                    found.append(config_layers(Path(cached)))
            return min(found) if found else None
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        return None
    return None


def loaded_layers(text_encoders: Sequence[Any]) -> int:
    """The layer count of the shallowest loaded text encoder."""
    return min(int(e.config.num_hidden_layers) for e in text_encoders)


def _range_error(clip_skip: int, layers: int, model: str, source: str) -> InvalidOption:
    return InvalidOption(f"{source} {clip_skip} is out of range for {model}: its text encoder "
                         f"has {layers} layer{'s' if layers != 1 else ''}, so clip skip can be "
                         f"1 to {layers}. Pass --clip-skip 1 to {layers}.")


def check_range(clip_skip: int, spec: Any, source: str = "--clip-skip") -> None:
    """Refuse, before the model loads, a clip skip past the model's layers (when its layer
    count is known without loading it)."""
    layers = text_layers(spec)
    if layers is not None and clip_skip > layers:
        raise _range_error(clip_skip, layers, spec.ref, source)


def check_loaded_range(clip_skip: int, text_encoders: Sequence[Any], model: str,
                       source: str = "--clip-skip") -> None:
    """The same check on a loaded model (for models whose layer count needed the load)."""
    layers = loaded_layers(text_encoders)
    if clip_skip > layers:
        raise _range_error(clip_skip, layers, model, source)


# --------------------------------------------------------------------------------------------
# the config's per-model defaults


def normalise_model_key(key: str) -> str:
    """A ``[models."KEY"]`` key as the ModelSpec.ref it stands for: a path resolved to an
    absolute one (it need not exist), a built-in name or repo id as typed."""
    from . import models

    text = key.strip()
    if text in models.BUILTIN_FAMILIES:
        return text
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith((".", "~")) or os.sep in text and path.exists() \
            or text.lower().endswith((".safetensors", ".ckpt")):
        return str(path.resolve())
    return text


def _config_models() -> dict[str, Any]:
    """The config file's ``[models]`` table (empty when there is no config)."""
    from . import paths
    from .models.specs import read_config_file

    config = paths.config_path()
    data = read_config_file()
    table = data.get("models", {})
    if not isinstance(table, dict):
        raise InvalidOption(f"`models` in {config} must be a table of "
                            '[models."MODEL"] sections.')
    return table


def configured_clip_skip(spec: Any) -> int | None:
    """The config's ``clip_skip`` for the model ``spec`` (None when it sets none)."""
    from . import paths

    for key, section in _config_models().items():
        if normalise_model_key(str(key)) != spec.ref:
            continue
        if not isinstance(section, dict) or "clip_skip" not in section:
            continue
        return check_clip_skip(section["clip_skip"],
                               f'clip_skip for [models."{key}"] in {paths.config_path()}')
    return None


def fit_clip_skip(given: int | None, spec: Any, recorded: int | None = None
                  ) -> tuple[int, str]:
    """The clip skip a fit uses on ``spec``, checked against the model's layers, and where it
    came from: ``given``; else the config's for the model; else ``recorded`` (what the
    identities being refitted were fitted at, when they agree); else 1."""
    configured = configured_clip_skip(spec) if given is None else None
    if given is not None:
        clip_skip, source = check_clip_skip(given), "--clip-skip"
    elif configured is not None:
        clip_skip, source = configured, f"the config's clip_skip for {spec.ref}"
    elif recorded is not None:
        clip_skip, source = recorded, "the clip skip the identities were fitted at"
    else:
        clip_skip, source = DEFAULT_CLIP_SKIP, "the default"
    check_range(clip_skip, spec, "--clip-skip" if given is not None else "Clip skip")
    return clip_skip, source


def identity_clip_skip(ident: Any) -> int:
    """The clip skip an identity was fitted at (1 for identities fitted before it existed)."""
    value = ident.meta.get("clip_skip", DEFAULT_CLIP_SKIP)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 \
        else DEFAULT_CLIP_SKIP


def render_clip_skip(given: int | None, idents: Sequence[Any], spec: Any
                     ) -> tuple[int, list[str]]:
    """The clip skip a render uses, and notes: ``given``; else the identities' own (when
    they differ, the most common one, ties to the lowest); else the config's for the model;
    else 1. A note (one) names the identities fitted at another clip skip than the render's."""
    notes: list[str] = []
    fitted = {ident.name: identity_clip_skip(ident) for ident in idents}
    if given is not None:
        clip_skip = check_clip_skip(given)
        source = "--clip-skip"
    elif fitted:
        counts: dict[int, int] = {}
        for value in fitted.values():
            counts[value] = counts.get(value, 0) + 1
        clip_skip = min(counts, key=lambda v: (-counts[v], v))
        source = "the identities' clip skip"
        if len(counts) > 1:
            source = "the clip skip most of the identities were fitted at"
    else:
        configured = configured_clip_skip(spec)
        clip_skip = configured if configured is not None else DEFAULT_CLIP_SKIP
        source = (f"the config's clip_skip for {spec.ref}" if configured is not None
                  else "the default")
    check_range(clip_skip, spec, "--clip-skip" if given is not None else "Clip skip")
    others = {name: value for name, value in fitted.items() if value != clip_skip}
    if others:
        listed = ", ".join(f"{name} at {value}" for name, value in others.items())
        notes.append(f"Rendering at clip skip {clip_skip} ({source}), but {listed} "
                     f"{'was' if len(others) == 1 else 'were'} fitted at another clip skip, so "
                     f"{'it looks' if len(others) == 1 else 'they look'} less like "
                     f"{'itself' if len(others) == 1 else 'themselves'}. Leave --clip-skip out "
                     "to render at the identities' own, or refit them at this one "
                     f"(`celebctl refit NAME --model MODEL --clip-skip {clip_skip} --replace`).")
    return clip_skip, notes
