"""What the server's jobs do: renders on the warm model, fits through `add`'s own core.

Requests are checked here before they queue (:func:`check_render`, :func:`check_add`); the
returned runners then do the work on the job thread. Nothing here knows HTTP.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidOption, LoraError
from .jobs import Job, JobInterrupted

MAX_PHOTO_UPLOAD = 20 * 1024 * 1024
MAX_FIT_STEPS = 2000


@dataclass
class ServerSettings:
    """How `celebctl serve` was started: the model and the limits every request meets."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_steps: int = 150  # the WebUI's slider stops at 150
    max_images: int = 16
    max_size: int = 1024
    max_fit_steps: int = MAX_FIT_STEPS

    def spec(self) -> Any:
        from .. import models

        return models.resolve_model_spec(self.model)


@dataclass
class RenderOptions:
    """One render request in celebctl's terms (the WebUI adapter maps its fields to these)."""

    prompt: str
    negative: str = ""
    num_images: int = 1
    steps: int = 50
    guidance: float | None = None
    scheduler: str | None = None  # the older ddim/dpm/euler
    sampler: str | None = None  # the WebUI's names (celebctl.samplers)
    schedule: str | None = None
    seed: int | None = 0  # None: a random one
    width: int | None = None
    height: int | None = None
    batch_size: int | None = None
    person_noun: bool = True
    clip_skip: int | None = None  # None: the identities' own (celebctl's rule)
    hires: Any = None  # rendering.img2img.HiresFix
    init_image: Any = None  # rendering.img2img.InitImage (staged by stage_init_image)
    strength: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_render(settings: ServerSettings, options: RenderOptions) -> Any:
    """Refuse, before queueing, a render past the server's limits or one `render` would refuse
    (options, prompt, identities, basis, model, tokens). Returns the checked plan."""
    from .. import rendering

    if options.seed is None:
        options.seed = random.randrange(0, 2**32 - options.num_images)
    if not 1 <= options.steps <= settings.max_steps:
        raise InvalidOption(f"steps must be between 1 and {settings.max_steps} on this server "
                            f"(celebctl serve --max-steps), not {options.steps}.")
    if not 1 <= options.num_images <= settings.max_images:
        raise InvalidOption(f"At most {settings.max_images} images per request on this server "
                            f"(celebctl serve --max-images), not {options.num_images}.")
    for label, value in (("width", options.width), ("height", options.height)):
        if value is not None and value > settings.max_size:
            raise InvalidOption(f"{label} must be at most {settings.max_size} px on this server "
                                f"(celebctl serve --max-size), not {value}.")
    from ..rendering.img2img import prepare_redraw
    from ..rendering.settings import sampler_choice

    choice = sampler_choice(options.scheduler, options.sampler, options.schedule)
    rendering.check_render_options(
        num_images=options.num_images, steps=options.steps, guidance=options.guidance,
        scheduler=choice, seed=options.seed, width=options.width,
        height=options.height, batch_size=options.batch_size)
    prepare_redraw(init_image=options.init_image, strength=options.strength,
                   hires=options.hires, steps=options.steps, width=options.width,
                   height=options.height)
    if options.hires is not None and options.hires.steps_for(options.steps) > settings.max_steps:
        raise InvalidOption(f"hires steps must be at most {settings.max_steps} on this server "
                            f"(celebctl serve --max-steps), not "
                            f"{options.hires.steps_for(options.steps)}.")
    if options.hires is not None and options.width and options.height:
        out_w, out_h = options.hires.size(options.width, options.height)
        if max(out_w, out_h) > settings.max_size:
            raise InvalidOption(f"The hires fix makes {options.width}x{options.height} into "
                                f"{out_w}x{out_h}, past this server's {settings.max_size} px "
                                "(celebctl serve --max-size); lower the scale or the size.")
    try:
        return rendering.plan_render(options.prompt, options.negative, settings.spec(),
                                     tokenizer=_warm_tokenizer(settings),
                                     person_noun=options.person_noun,
                                     clip_skip=options.clip_skip)
    except LoraError as exc:  # a client learns the LoRA names (GET /loras), not our paths
        from ..documents import visible
        from ..loras.files import lora_folder

        folder = visible(str(lora_folder()))
        raise LoraError(str(exc).replace(folder, "the server's LoRA folder (GET "
                                         "/sdapi/v1/loras lists it)")) from None


def _warm_tokenizer(settings: ServerSettings) -> Any:
    """The loaded model's tokenizer once it is warm (planning then reads nothing from disk)."""
    from .. import models
    from ..rendering import render_dtype

    device = models.resolve_device(settings.device)
    components = models.peek_warm_components(settings.spec(), device,
                                             render_dtype(settings.dtype, device))
    return components.tokenizer if components is not None else None


def load_model(settings: ServerSettings):
    """A job that loads the served model into the warm cache."""

    def run(job: Job) -> dict[str, Any]:
        from .. import models
        from ..rendering import render_dtype

        device = models.resolve_device(settings.device)
        components = models.warm_components(settings.spec(), device,
                                            render_dtype(settings.dtype, device),
                                            progress=job.progress)
        return {"model": components.spec.ref, "device": str(components.device),
                "dtype": str(components.dtype).replace("torch.", "")}

    return run


def render(settings: ServerSettings, options: RenderOptions):
    """A job that renders ``options`` on the warm model; the PNGs (with the same text chunks as
    `celebctl render` writes) end up in ``job.outputs``. Interrupted, it keeps the images
    finished before."""

    def run(job: Job) -> dict[str, Any]:
        from .. import models, rendering

        device = models.resolve_device(settings.device)
        components = models.warm_components(settings.spec(), device,
                                            rendering.render_dtype(settings.dtype, device),
                                            progress=job.progress)
        folder = Path(tempfile.mkdtemp(prefix="celebctl-serve-"))
        written: list[Path] = []

        def keep(path: Path) -> None:
            written.append(path)
            job.outputs.append(path.read_bytes())

        try:
            try:
                result = rendering.render_prompt(
                    options.prompt, negative=options.negative, num_images=options.num_images,
                    steps=options.steps, guidance=options.guidance,
                    scheduler=options.scheduler, sampler=options.sampler,
                    schedule=options.schedule, seed=int(options.seed or 0),
                    width=options.width, height=options.height,
                    batch_size=options.batch_size, components=components, out_dir=folder,
                    progress=job.progress, on_file=keep, person_noun=options.person_noun,
                    clip_skip=options.clip_skip, init_image=options.init_image,
                    strength=options.strength, hires=options.hires)
            except JobInterrupted:
                return {"interrupted": True, "images": len(job.outputs),
                        "seeds": [int(options.seed or 0) + i for i in range(len(job.outputs))]}
            summary = result.to_dict()
            summary.pop("paths", None)
            summary.pop("grid", None)
            summary["images"] = len(job.outputs)
            return summary
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            options.init_image = None  # finished jobs are kept a while; the image is not

    return run


def stage_init_image(data: bytes) -> Any:
    """An uploaded init image as a checked InitImage: written to a fresh private folder under a
    name the server chooses, read with `render --init-image`'s checks (a real image, not a
    bomb, not damaged; PhotoError otherwise, naming no server path), the folder removed."""
    from ..errors import PhotoError
    from ..rendering.img2img import load_init_image

    if len(data) > MAX_PHOTO_UPLOAD:
        raise InvalidOption(f"init_images: the image is {len(data) / 2**20:.1f} MB; the limit "
                            f"is {MAX_PHOTO_UPLOAD // 2**20} MB.")
    folder = Path(tempfile.mkdtemp(prefix="celebctl-init-"))
    path = folder / "init-image"
    try:
        path.write_bytes(data)
        try:
            return load_init_image(path)
        except PhotoError as exc:
            message = str(exc).removeprefix("--init-image: ").replace(str(path), "the image")
            raise PhotoError(f"init_images: {message}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_add(name: str, photos: list[bytes], *, replace: bool, steps: int | None) -> None:
    """What `add` checks before loading anything, for an upload: the name, the photo count,
    the size of each photo and that each decodes as an image (faces are found in the job)."""
    from .. import registry
    from ..errors import IdentityExists
    from ..fitting.settings import MAX_PHOTOS

    registry.validate_name(name)
    if registry.identity_exists(name) and not replace:
        raise IdentityExists(f"Identity '{name}' already exists. Send replace=true to "
                             "overwrite it, or pick another name.")
    if not 1 <= len(photos) <= MAX_PHOTOS:
        raise InvalidOption(f"Give 1 to {MAX_PHOTOS} photos of the person, not {len(photos)}.")
    if steps is not None and not 1 <= steps <= MAX_FIT_STEPS:
        raise InvalidOption(f"steps must be between 1 and {MAX_FIT_STEPS}.")
    for number, data in enumerate(photos, start=1):
        if len(data) > MAX_PHOTO_UPLOAD:
            raise InvalidOption(f"Photo {number} is {len(data) / 2**20:.1f} MB; the limit is "
                                f"{MAX_PHOTO_UPLOAD // 2**20} MB per photo.")


def stage_photos(photos: list[bytes], kinds: list[str]) -> tuple[Path, list[Path]]:
    """Write uploaded photos to a fresh private folder under names the server chooses (never
    the client's), decoding each as `add` does (PhotoError for what is not a usable image)."""
    from ..faces.photos import load_photo

    folder = Path(tempfile.mkdtemp(prefix="celebctl-upload-"))
    paths = []
    try:
        for number, (data, kind) in enumerate(zip(photos, kinds, strict=True), start=1):
            path = folder / f"photo-{number}{kind}"
            path.write_bytes(data)
            load_photo(path)  # the CLI's checks: a real image, not a bomb, not damaged
            paths.append(path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, paths


def add(settings: ServerSettings, name: str, folder: Path, paths: list[Path], *,
        replace: bool, steps: int | None, seed: int):
    """A job that fits ``name`` from the staged photos through `celebctl add`'s own core (the
    registry's writer lock is shared with the CLI); the staged folder goes afterwards."""

    def run(job: Job) -> dict[str, Any]:
        from .. import fitting

        try:
            outcome = fitting.add_identity_from_photo(
                name, paths, model=settings.model, device=settings.device,
                dtype=settings.dtype, settings=fitting.FitSettings(steps=steps, seed=seed),
                replace=replace, progress=job.progress)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return fit_summary(outcome)

    return run


def joint(settings: ServerSettings, names: list[str], *, steps: int | None, seed: int):
    """A job that refits ``names`` together, as `celebctl joint`."""

    def run(job: Job) -> dict[str, Any]:
        from .. import fitting

        outcome = fitting.refit_jointly(names, model=settings.model, device=settings.device,
                                        dtype=settings.dtype,
                                        settings=fitting.FitSettings(steps=steps, seed=seed),
                                        progress=job.progress)
        return fit_summary(outcome)

    return run


def fit_summary(outcome: Any) -> dict[str, Any]:
    summary = outcome.result.summary
    return {"identities": [i.name for i in outcome.identities], "basis_id": outcome.basis_id,
            "model": outcome.model, "notes": list(outcome.notes),
            "steps": summary.get("steps"), "wall_time_s": summary.get("wall_time_s")}
