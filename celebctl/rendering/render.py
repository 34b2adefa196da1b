"""A whole render: plan, load, encode, denoise batch by batch, write each PNG as it is done."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, filehash, samplers
from ..clipskip import check_loaded_range
from ..denoise import UNetCall, sample_images
from ..errors import InvalidOption, StorageError
from ..loras import apply_loras
from ..storage.userfiles import write_new_user_file
from .encoding import encode_prompt_pair, identity_vectors_for
from .images import (
    DEFAULT_OUT_DIR,
    _prepare_out_dir,
    contact_sheet,
    embedding_hashes,
    model_label,
    png_bytes,
    prompt_slug,
)
from .img2img import HiresFix, InitImage, prepare_redraw
from .plan import check_render_options, default_guidance, plan_render
from .settings import auto_batch_size, make_scheduler, render_dtype, sampler_choice

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Components, ModelSpec

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class RenderResult:
    """What a render wrote, and what it rendered."""

    paths: list[Path]
    grid: Path | None
    prompt: str
    expanded: str
    negative: str
    negative_expanded: str
    identities: list[str]
    basis_id: str | None
    model: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    notes: list[str]
    elapsed_s: float
    captured: bool = False  # the UNet ran as replayed CUDA graphs
    sampler: str = "DDIM"  # the WebUI's names
    schedule_type: str = samplers.AUTOMATIC
    clip_skip: int = 1
    loras: list[dict[str, Any]] = field(default_factory=list)  # name, weight, hash
    redraw: dict[str, Any] | None = None  # img2img / hires fix settings (Redraw.to_dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what `celebctl render --json` prints)."""
        return {
            "paths": [str(p) for p in self.paths],
            "grid": str(self.grid) if self.grid else None,
            "prompt": self.prompt,
            "expanded": self.expanded,
            "negative": self.negative,
            "negative_expanded": self.negative_expanded,
            "identities": list(self.identities),
            "basis_id": self.basis_id,
            "model": self.model,
            "seeds": list(self.seeds),
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "schedule_type": self.schedule_type,
            "notes": list(self.notes),
            "elapsed_s": round(self.elapsed_s, 3),
            "captured": self.captured,
            "clip_skip": self.clip_skip,
            "loras": [dict(entry) for entry in self.loras],
            **({"redraw": dict(self.redraw)} if self.redraw else {}),
        }


# first text encoder -> (basis id, tokenizer, embedding tables' versions) already checked.
_CHECKED: weakref.WeakKeyDictionary[Any, set[tuple]] = weakref.WeakKeyDictionary()


def check_basis_once(components: Components, basis: Any, model_ref: str) -> None:
    """:func:`basis.check_model_matches_basis` for loaded components, once per basis: the
    embedding table's hash covers all its rows, so it is computed again only when a table
    changed (its version counter moved), not for every render of a loaded model."""
    from .. import basis as basis_mod
    from .. import models

    encoders = list(components.text_encoders)
    versions = tuple(models.embedding_table(encoder)._version for encoder in encoders)
    key = (basis.info.id if hasattr(basis, "info") else str(basis), id(components.tokenizer),
           versions)
    checked = _CHECKED.setdefault(encoders[0], set())
    if key in checked:
        return
    basis_mod.check_model_matches_basis(basis, components.text_encoders, components.tokenizer,
                                        model_ref=model_ref)
    checked.add(key)


def image_settings(plan: Any, *, steps: int, scheduler: str | samplers.SamplerChoice,
                   guidance: float, width: int, height: int, model_hash: str | None,
                   ti_hashes: dict[str, str] | None = None,
                   schedule_type: str | None = None) -> dict[str, Any]:
    """What every image of ``plan`` records in its PNG (all but the seed). ``scheduler``: the
    sampler choice (or an older `--scheduler` value); ``schedule_type``: the schedule type to
    write (:func:`samplers.schedule_label` of the built scheduler), else the chosen one.
    ``ti_hashes``: identity -> embedding hash, when already known (a superset is fine)."""
    from ..loras import with_tags

    made = (scheduler if isinstance(scheduler, samplers.SamplerChoice)
            else samplers.legacy_choice(scheduler))
    uses = plan.loras
    settings = {
        "prompt": with_tags(plan.prompt.text, uses),
        "negative_prompt": plan.negative.text,
        "expanded": with_tags(plan.prompt.expanded(), uses),
        "negative_expanded": plan.negative.expanded(),
        "webui_prompt": with_tags(plan.prompt.expanded("webui"), uses),
        "webui_negative": plan.negative.expanded("webui"),
        "steps": steps,
        "sampler": made.sampler.name,
        "schedule_type": schedule_type or made.schedule,
        "scheduler": made.key,
        "cfg_scale": float(guidance),
        "width": width,
        "height": height,
        "model": model_label(plan.spec),
        "basis_id": plan.basis_id,
        "identities": list(plan.identities),
        "person_noun": plan.person_noun,
        "pad_conds": plan.pads_conds(guidance),
        "celebctl_version": __version__,
    }
    if made.overrides():
        settings["scheduler_config"] = made.overrides()
    if plan.clip_skip != 1:  # as the WebUI, only past 1 (the PNGs of other renders unchanged)
        settings["clip_skip"] = plan.clip_skip
    if model_hash:
        settings["model_hash"] = model_hash
    if uses:
        settings["loras"] = lora_entries(uses)
    if plan.identities:
        known = ti_hashes or {}
        settings["ti_hashes"] = ({n: known[n] for n in plan.identities}
                                 if all(n in known for n in plan.identities)
                                 else embedding_hashes(plan.identities))
    return settings


def lora_entries(uses: Any) -> list[dict[str, Any]]:
    """Each LoRA of a render as its PNG records it: name (as its tag), weight, WebUI hash."""
    from ..loras import short_hash

    return [{"name": u.name, "weight": u.weight, "hash": short_hash(u.path)} for u in uses]


def render_prompt(prompt: str, *, negative: str = "", num_images: int = 1, steps: int = 50,
                  guidance: float | None = None, scheduler: str | None = None,
                  sampler: str | None = None, schedule: str | None = None, seed: int = 0,
                  width: int | None = None, height: int | None = None,
                  batch_size: int | None = None,
                  model: str | ModelSpec | None = None, device: str = "auto",
                  dtype: str = "auto", out_dir: str | Path = DEFAULT_OUT_DIR,
                  grid: bool = False, progress: ProgressCallback | None = None,
                  components: Components | None = None,
                  on_file: Callable[[Path], None] | None = None,
                  person_noun: bool = True, capture: bool = True,
                  clip_skip: int | None = None, loras: Sequence[Any] = (),
                  lora_dir: str | Path | None = None,
                  init_image: str | Path | InitImage | None = None,
                  strength: float | None = None, hires: HiresFix | None = None
                  ) -> RenderResult:
    """Render ``prompt`` (registered identities named in it) to PNG files in ``out_dir``.

    Image i uses seed ``seed + i``; images are denoised ``batch_size`` at a time. Everything
    that can be checked cheaply (options, prompt, identities, basis, token window) is checked
    before the model loads. ``components`` reuses already loaded model parts (``model``,
    ``device`` and ``dtype`` are then ignored). ``progress(phase, done, total, info)`` gets
    "render" with one count per denoising step per image; ``on_file(path)`` is called as each
    PNG is written, so a caller knows what exists if the render stops early. A failed write
    raises StorageError that names the images already written. ``guidance`` None means 10
    when the prompt names identities (the reference's value) and 7.5 otherwise;
    ``person_noun`` adds "person" after each identity, as in training. ``batch_size`` None
    picks as many images per batch as fit (:func:`auto_batch_size`); on CUDA the UNet is
    replayed as a CUDA graph unless ``capture`` is False. ``sampler`` and ``schedule`` are
    the WebUI's names ("DPM++ 2M", "Karras"); ``scheduler`` the older ddim/dpm/euler; none of
    them: the config's ``sampler``/``schedule``, else DDIM (:func:`samplers.choose`).
    ``clip_skip`` (the WebUI's numbering) None reads the layer the identities were fitted at.
    ``loras`` (``FILE[:WEIGHT]``) and the prompt's ``<lora:NAME:WEIGHT>`` tags (NAME found in
    ``lora_dir``) are checked before the model loads and fused into it for this render
    (:mod:`celebctl.loras`); given ``components`` keep them fused until a render asks for
    another set. ``init_image`` and ``strength`` (the WebUI's denoising strength, 0.75 by
    default) draw from an image; ``hires`` adds the WebUI's hires fix (:mod:`.img2img`).
    Returns what was written.
    """
    started = time.perf_counter()
    choice = sampler_choice(scheduler, sampler, schedule)
    check_render_options(num_images=num_images, steps=steps, guidance=guidance,
                         scheduler=scheduler, seed=seed, width=width, height=height,
                         batch_size=batch_size)
    # Before torch loads: a bad init image is refused in a moment.
    redraw = prepare_redraw(init_image=init_image, strength=strength, hires=hires, steps=steps,
                            width=width, height=height)
    import torch

    from .. import basis as basis_mod
    from .. import models

    if components is not None:
        if model is not None and models.resolve_model_spec(model).ref != components.spec.ref:
            raise InvalidOption(f"The loaded components are {components.spec.ref}, not {model}.")
        model = components.spec
    plan = plan_render(prompt, negative, model,
                       tokenizer=components.tokenizer if components is not None else None,
                       person_noun=person_noun, clip_skip=clip_skip, loras=loras,
                       lora_dir=lora_dir)
    if guidance is None:
        guidance = default_guidance(bool(plan.identities))
    if components is None:
        torch_device = models.resolve_device(device)
        dtype = render_dtype(dtype, torch_device)
    out_dir = _prepare_out_dir(Path(out_dir))
    # A single-file checkpoint's WebUI hash, computed while the model loads (cached after).
    model_hashing = filehash.BackgroundHash(
        plan.spec.path if plan.spec.kind == "single_file" else None)

    basis = basis_mod.load_basis(plan.basis_id) if plan.basis_id else None
    if components is None:
        components = models.load_pipeline_components(plan.spec, torch_device, dtype,
                                                     progress=progress)
    check_loaded_range(plan.clip_skip, components.text_encoders, plan.spec.ref)
    if basis is not None:
        check_basis_once(components, basis, plan.spec.ref)
    apply_loras(components, plan.loras)  # none: the weights as loaded
    vectors = identity_vectors_for(plan.coefficients, basis) if basis is not None else {}
    embeds = encode_prompt_pair(components, plan, vectors)

    width, height, out_width, out_height = redraw.sizes(width, height,
                                                        components.default_resolution)
    noise_scheduler = make_scheduler(choice, components.scheduler.config)
    schedule_type = samplers.schedule_label(choice, noise_scheduler.config)
    seeds = [seed + i for i in range(num_images)]
    batch = batch_size or auto_batch_size(components, num_images, out_width, out_height)
    notes = list(plan.notes)
    unet_call = UNetCall(components.unet, capture=capture, note=notes.append)
    counter = {"done": 0, "total": num_images * redraw.steps_run(steps)}

    settings_base = image_settings(plan, steps=steps, scheduler=choice, guidance=guidance,
                                   width=width, height=height,
                                   model_hash=model_hashing.result(),
                                   schedule_type=schedule_type)
    settings_base.update(redraw.settings(steps, width, height))
    paths: list[Path] = []
    images: list[Any] = []
    stem = prompt_slug(plan.prompt.plain())

    def save(stem_seed: str, data: bytes, image: bool = True) -> Path:
        try:
            path = write_new_user_file(out_dir, stem_seed, ".png", data)
        except StorageError as exc:
            if paths:
                raise StorageError(f"{exc} {len(paths)} image{'s' if len(paths) != 1 else ''} "
                                   "had been written before: "
                                   + ", ".join(str(p) for p in paths) + ".") from exc
            raise StorageError(f"{exc} No image was written.") from exc
        if image:
            paths.append(path)
        if on_file is not None:
            on_file(path)
        return path

    def encode_and_save(image: Any, image_seed: int) -> Path:
        return save(f"{stem}-{image_seed}", png_bytes(image, {**settings_base,
                                                               "seed": image_seed}))

    # PNGs of one batch are encoded and written by one worker thread, in order, while the next
    # batch denoises; a failed write stops the render at the next batch.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="celebctl-png") as writer:
        pending: list[Any] = []
        for start in range(0, num_images, batch):
            for future in pending:
                if future.done():
                    future.result()  # raises the write's error now
            batch_seeds = seeds[start:start + batch]
            done_before = counter["done"]

            def on_step(step: int, done_before: int = done_before,
                        count: int = len(batch_seeds)) -> None:
                counter["done"] = done_before + step * count
                if progress is not None:
                    progress("render", counter["done"], counter["total"], {})

            generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
            with models.quiet_libraries():
                batch_images = (sample_images if redraw.plain else redraw.sample)(
                    unet_call=unet_call, vae=components.vae, scheduler=noise_scheduler,
                    embeds=embeds, family=components.family,
                    generators=generators, steps=steps, guidance=guidance, height=height,
                    width=width, on_step=on_step, pad_to=batch)
            images += batch_images
            pending += [writer.submit(encode_and_save, image, image_seed)
                        for image_seed, image in zip(batch_seeds, batch_images, strict=True)]
        for future in pending:
            future.result()

    grid_path = None
    if grid:
        sheet_settings = {**settings_base, "seed": seeds[0], "seeds": seeds,
                          "files": [p.name for p in paths]}
        grid_path = save(f"{stem}-{seeds[0]}-grid",
                         png_bytes(contact_sheet(images), sheet_settings), image=False)
    if guidance <= 1 and plan.negative.text:
        notes.append("--guidance <= 1 turns classifier-free guidance off, so the negative "
                     "prompt has no effect.")
    return RenderResult(
        paths=paths, grid=grid_path, prompt=plan.prompt.text, expanded=plan.prompt.expanded(),
        negative=plan.negative.text, negative_expanded=plan.negative.expanded(),
        identities=list(plan.identities), basis_id=plan.basis_id, model=plan.spec.ref,
        seeds=seeds, width=out_width, height=out_height, steps=steps,
        guidance=float(guidance),
        scheduler=choice.key, notes=notes, elapsed_s=time.perf_counter() - started,
        captured=unet_call.replays(components.device) and bool(unet_call.graphs),
        sampler=choice.sampler.name, schedule_type=schedule_type,
        clip_skip=plan.clip_skip,
        loras=list(settings_base.get("loras", [])),
        redraw=redraw.to_dict(steps, width, height) or None,
    )
