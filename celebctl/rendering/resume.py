"""`render --prompts` resumes: which images of a job are already there, made with the same
settings, and which were made otherwise (the job then stops and replaces nothing)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import filehash, samplers
from ..errors import StorageError
from .promptfile import image_name
from .render import image_settings

# The settings an existing PNG must share with this job to count as this job's image.
SAME_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "scheduler", "cfg_scale",
                 "width", "height", "model", "person_noun", "sampler", "schedule_type",
                 "scheduler_config", "clip_skip", "loras", "denoising_strength",
                 "init_image_sha256", "hires_scale", "hires_steps", "hires_upscaler",
                 "basis_id", "ti_hashes")
# Settings earlier releases did not record: compared only when the PNG has them (there the
# "scheduler" value ddim/dpm/euler says it all).
NEWER_SETTINGS = ("schedule_type", "scheduler_config")
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def existing_image(path: Path, expected: dict[str, Any]) -> str | None:
    """None when ``path`` is a complete PNG made with ``expected``'s settings; else why not."""
    import json

    from PIL import Image

    from ..storage.special_files import is_regular_file

    if not is_regular_file(path, follow_symlinks=False):
        return "is not a regular file"
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(-len(_PNG_END), 2)
            tail = handle.read()
        if head != b"\x89PNG\r\n\x1a\n" or tail != _PNG_END:
            return "is not a complete PNG"
        with Image.open(path) as image:
            raw = (getattr(image, "text", None) or {}).get("celebctl")
        made = json.loads(raw) if raw else None
    except (OSError, ValueError, SyntaxError):
        return "is not a complete PNG"
    if not isinstance(made, dict):
        return "was not made by celebctl"
    for key in SAME_SETTINGS:
        if key in NEWER_SETTINGS and key not in made:
            continue
        if made.get(key) != expected.get(key):
            return _other_settings(key, made.get(key), expected.get(key))
    return None


def _other_settings(key: str, made: Any, expected: Any) -> str:
    """Why an image is not this job's: the first setting that differs, in words."""
    if key == "ti_hashes" and isinstance(made, dict) and isinstance(expected, dict):
        # An identity replaced or refitted since (`add --replace`, `joint`): its TI hash moved.
        for name, digest in expected.items():
            if made.get(name) != digest:
                return (f"was made with another fit of {name} (TI hash {made.get(name)!r}, "
                        f"not {digest!r})")
    return f"was made with other settings ({key}: {made!r}, not {expected!r})"


def todo_images(job: Any, seeds: Sequence[int], out_dir: Path,
          settings: Callable[[int], dict[str, Any]]
          ) -> tuple[list[tuple[int, int]], dict[tuple[int, int], Path]]:
    """The images still to make and those already there; raises StorageError for a name that
    holds something else."""
    from ..documents import visible

    present = {p.name for p in out_dir.iterdir()}
    todo, skipped = [], {}
    for index, (line, plan) in enumerate(zip(job.lines, job.plans, strict=True)):
        for seed in seeds:
            name = image_name(line, seed, plan.prompt.plain())
            if name not in present:
                todo.append((index, seed))
                continue
            why = existing_image(out_dir / name, {**settings(index), "seed": seed})
            if why is not None:
                raise StorageError(
                    f"{visible(str(out_dir / name))} {why}, so it is not this job's image "
                    f"(line {line.number}, seed {seed}). Nothing is replaced: move it away or "
                    "render into another --out.")
            skipped[(index, seed)] = out_dir / name
    return todo, skipped


def settings_of(job: Any, steps: int, choice: samplers.SamplerChoice,
                 guidances: Sequence[float], width: int, height: int,
                 model_hashing: filehash.BackgroundHash, hashes: dict[str, str],
                 schedule_type: str, redraw: Any) -> Callable[[int], dict[str, Any]]:
    """Line index -> the settings its PNGs record (the model's hash is waited for only when a
    line's settings are first needed: a fresh job never needs it before the model loads)."""
    cache: dict[int, dict[str, Any]] = {}

    def settings(index: int) -> dict[str, Any]:
        if index not in cache:
            made = image_settings(job.plans[index], steps=steps, scheduler=choice,
                                  guidance=guidances[index], width=width, height=height,
                                  model_hash=model_hashing.result(), ti_hashes=hashes,
                                  schedule_type=schedule_type)
            made.update(redraw.settings(steps, width, height))
            cache.clear()  # one line's images are near each other: keep few
            cache[index] = made
        return cache[index]

    return settings


def resume_note(count: int) -> str:
    done = f"{count} image{'s' if count != 1 else ''} of this process had been written in full"
    return f"{done}; run the same command again to render the rest (finished ones are skipped)."
