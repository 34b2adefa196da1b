"""`render --prompts FILE`: every prompt of a file times N seeds, batched across prompts,
resumable, and shared out between the processes a launcher (torchrun, srun) started.

The job:

1. The file is read and checked (:mod:`.promptfile`) and every line planned: identities
   found (an unknown one is reported with its line), one model and one basis for the whole
   file, each line's token count. Nothing loads before this passes.
2. The model loads (on ``cuda:LOCAL_RANK`` under a launcher, :mod:`celebctl.distributed`).
3. Rank 0 lists the images still to make: line N's image with seed S is
   ``L{N:05d}-s{S:07d}-{slug}.png``; one that exists as a complete PNG made with the same
   prompt and settings is skipped, one made otherwise (other steps, size, seed, basis, or an
   identity fitted anew since: its TI hash differs) stops the job (nothing is replaced).
   This is decided before the model loads whenever the image size and schedule type are known
   without it (given, a built-in model, a diffusers folder): nothing left to draw loads nothing.
3. The model loads (on ``cuda:LOCAL_RANK`` under a launcher, :mod:`celebctl.distributed`).
   Every rank takes every ``world_size``-th image of the list (:func:`distributed.shard`).
4. Each rank denoises its images in batches that mix prompts: the prompts' embeddings are
   stacked, one row per image. A batch holds prompts of one length in 75-token chunks and
   one guidance scale only (images are grouped so), so no prompt is padded beyond what a
   single `render` of it pads: each image is exactly what `celebctl render` makes from its
   PNG's parameters, which is what makes those parameters a recipe.
5. PNGs are written crash-safely (a temp file, then a link to the final name), so a PNG is
   there in full or not at all, and a rerun carries on where a stopped job ended.

Steps 2 and 3 swap whenever the image size is known without the model (given, a built-in
model, a diffusers folder): what is left, and an image made otherwise, are decided before the
model loads, so a job with nothing left to draw loads nothing.

Rank 0 reports progress over the whole job (the group's counters) and gathers every rank's
rows for the summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import filehash, samplers
from ..clipskip import check_loaded_range, render_clip_skip
from ..denoise import UNetCall, sample_images
from ..errors import BasisMismatch, CelebctlError, InvalidOption
from ..loras import apply_loras, resolve_loras, set_key
from .early import resolution_without_loading, schedule_type_without_loading, syntax_notes_by_line
from .encoding import PromptEmbeds, encode_prompt_pair, identity_vectors_for
from .images import DEFAULT_OUT_DIR, _prepare_out_dir, embedding_hashes, png_bytes
from .img2img import HiresFix, InitImage, prepare_redraw
from .plan import (
    RenderPlan,
    _shared_basis,
    _tokenizer_for_plan,
    check_families,
    check_render_options,
    check_widths,
    default_guidance,
    lora_requests_of,
    noise_note,
)
from .promptfile import PromptLine, image_name, read_prompts_file
from .render import ProgressCallback, check_basis_once
from .resume import resume_note, settings_of, todo_images
from .settings import auto_batch_size, make_scheduler, render_dtype, sampler_choice

if TYPE_CHECKING:  # pragma: no cover
    from ..distributed import Group
    from ..models import Components, ModelSpec

MAX_SEEDS = 1000
MAX_JOB_IMAGES = 1_000_000
_DONE_KEY = "prompts/images-done"


@dataclass
class PromptsPlan:
    """A checked prompts file: each line's plan, and what the lines share."""

    source: Path
    lines: list[PromptLine]
    plans: list[RenderPlan]
    identities: list[str]
    basis_id: str | None
    spec: ModelSpec
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what `render --prompts FILE --dry-run --json` prints)."""
        return {
            "source": str(self.source),
            "model": self.spec.ref,
            "basis_id": self.basis_id,
            "identities": list(self.identities),
            "lines": [{"line": line.number, "prompt": plan.prompt.text,
                       "expanded": plan.prompt.expanded(), "identities": list(plan.identities),
                       "tokens": plan.token_count, "chunks": list(plan.chunks),
                       "loras": [{"name": u.name, "weight": u.weight, "path": str(u.path)}
                                 for u in plan.loras],
                       "clip_skip": plan.clip_skip}
                      for line, plan in zip(self.lines, self.plans, strict=True)],
            "notes": list(self.notes),
        }


@dataclass
class PromptsResult:
    """What a prompts-file job wrote and skipped (on rank 0: the whole job's)."""

    source: Path
    out_dir: Path
    lines: list[PromptLine]
    seeds: list[int]
    written: dict[tuple[int, int], Path]  # (line index, seed) -> path
    skipped: dict[tuple[int, int], Path]
    model: str
    steps: int
    scheduler: str
    width: int
    height: int
    world_size: int
    notes: list[str]
    elapsed_s: float
    sampler: str = "DDIM"  # the WebUI's names
    schedule_type: str = samplers.AUTOMATIC

    def paths_of(self, index: int) -> list[Path]:
        """Line ``index``'s images (written or already there), in seed order."""
        found = {**self.skipped, **self.written}
        return [found[(index, s)] for s in self.seeds if (index, s) in found]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what `celebctl render --prompts FILE --json` prints)."""
        return {
            "source": str(self.source),
            "out": str(self.out_dir),
            "images": len(self.lines) * len(self.seeds),
            "written": len(self.written),
            "skipped": len(self.skipped),
            "seeds": list(self.seeds),
            "model": self.model,
            "steps": self.steps,
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "schedule_type": self.schedule_type,
            "width": self.width,
            "height": self.height,
            "processes": self.world_size,
            "lines": [{"line": line.number, "prompt": line.text,
                       "paths": [str(p) for p in self.paths_of(i)],
                       "written": sum(1 for s in self.seeds if (i, s) in self.written),
                       "skipped": sum(1 for s in self.seeds if (i, s) in self.skipped)}
                      for i, line in enumerate(self.lines)],
            "notes": list(self.notes),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def plan_prompt_lines(lines: Sequence[PromptLine], negative: str = "",
                      model: str | ModelSpec | None = None, *, tokenizer: Any = None,
                      person_noun: bool = True, source: str | Path = "the prompts file",
                      clip_skip: int | None = None, loras: Sequence[Any] = (),
                      lora_dir: str | Path | None = None) -> PromptsPlan:
    """Plan every line without loading a model: the whole file renders with one model and the
    identities it names must share one basis. Errors name the line they come from. Each line
    reads the text encoder at ``clip_skip``, else at its identities' own clip skip
    (:func:`celebctl.clipskip.render_clip_skip`). Each line's LoRAs are its ``<lora:...>``
    tags and ``loras`` (``--lora``, for every line)."""
    from .. import basis as basis_mod
    from .. import models, registry
    from ..documents import visible
    from ..prompting import CHUNK_TOKENS, parse_prompt, tokenize_chunks, with_person_nouns

    shown = visible(str(source))
    known = registry.known_names()
    parsed_negative = parse_prompt(negative or "", known, allow_empty=True)
    parsed_lines = []
    requests = []
    loras = lora_requests_of("", negative, loras)[1]  # --lora values read once, not per line
    for line in lines:
        try:
            text, wanted = lora_requests_of(line.text, negative, loras)
            requests.append(wanted)
            parsed = parse_prompt(text, known)
        except CelebctlError as exc:
            exc.args = (f"Line {line.number} of {shown}: {exc}",)
            raise
        parsed_lines.append(with_person_nouns(parsed) if person_noun else parsed)
    if person_noun:
        parsed_negative = with_person_nouns(parsed_negative)
    names = list(dict.fromkeys([n for p in parsed_lines for n in p.identities]
                               + parsed_negative.identities))
    idents = registry.read_identity_set(names)
    check_families(idents, command="prompts file")
    basis_id = _shared_basis(idents)
    info = basis_mod.info_for_identities(basis_id, names) if basis_id else None
    spec, notes = models.model_for_identities(
        model, info, {i.name: str(i.meta.get("model", "")) for i in idents})
    check_families(idents, spec, command="prompts file")
    check_widths(idents, info, spec, command="render")
    given = tokenizer is not None
    tokenizer, sha = (tokenizer, None) if given else _tokenizer_for_plan(spec)
    if info is not None and sha is not None and sha != info.tokenizer_sha256:
        raise BasisMismatch(f"Model {spec.ref}'s tokenizer does not match basis {info.id} of "
                            f"{', '.join(names)}; render with the model they were fitted with "
                            "(--model).")
    coefficients = {i.name: i.load_coefficients() for i in idents}
    negative_chunks = tokenize_chunks(parsed_negative, tokenizer, label="negative prompt")
    by_name = {i.name: i for i in idents}
    negative_idents = [by_name[n] for n in parsed_negative.identities]
    plans = []
    found: dict[Any, Any] = {}
    for line, parsed, wanted in zip(lines, parsed_lines, requests, strict=True):
        try:
            chunks = tokenize_chunks(parsed, tokenizer)
            uses = resolve_loras(wanted, spec, lora_dir, found) if wanted else []
        except CelebctlError as exc:
            exc.args = (f"Line {line.number} of {shown}: {exc}",)
            raise
        line_skip, clip_notes = render_clip_skip(
            clip_skip, [by_name[n] for n in parsed.identities] + negative_idents, spec)
        notes += [note for note in clip_notes if note not in notes]
        plans.append(RenderPlan(
            prompt=parsed, negative=parsed_negative, identities=list(parsed.identities),
            basis_id=basis_id, spec=spec, token_count=sum(c.length - 2 for c in chunks),
            negative_token_count=sum(c.length - 2 for c in negative_chunks),
            max_tokens=CHUNK_TOKENS * len(chunks), person_noun=person_noun,
            chunks=[c.length - 2 for c in chunks],
            negative_chunks=[c.length - 2 for c in negative_chunks],
            coefficients={n: coefficients[n] for n in parsed.identities},
            clip_skip=line_skip, loras=uses))
    notes += syntax_notes_by_line(lines, negative, shown)
    if spec.is_noise_model:
        notes.append(noise_note(spec))
    return PromptsPlan(source=Path(source), lines=list(lines), plans=plans, identities=names,
                       basis_id=basis_id, spec=spec, notes=notes)


def _stack(embeds: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """One row per image: the embeddings of a batch's images, stacked."""
    import torch

    def cat(parts: list[Any]) -> Any:
        return None if parts[0] is None else torch.cat(parts)

    return PromptEmbeds(prompt=cat([e.prompt for e in embeds]),
                        negative=cat([e.negative for e in embeds]),
                        pooled=cat([e.pooled for e in embeds]),
                        negative_pooled=cat([e.negative_pooled for e in embeds]))


def render_prompts_file(path: str | Path, *, seeds: int = 1, seed: int = 0, negative: str = "",
                        steps: int = 50, guidance: float | None = None,
                        scheduler: str | None = None, sampler: str | None = None,
                        schedule: str | None = None, width: int | None = None,
                        height: int | None = None, batch_size: int | None = None,
                        model: str | ModelSpec | None = None, device: str = "auto",
                        dtype: str = "auto", out_dir: str | Path = DEFAULT_OUT_DIR,
                        person_noun: bool = True, capture: bool = True,
                        progress: ProgressCallback | None = None,
                        components: Components | None = None,
                        group: Group | None = None,
                        clip_skip: int | None = None, loras: Sequence[Any] = (),
                        lora_dir: str | Path | None = None,
                        init_image: str | Path | InitImage | None = None,
                        strength: float | None = None, hires: HiresFix | None = None
                        ) -> PromptsResult:
    """Render every prompt of the file ``path`` with seeds ``seed`` .. ``seed + seeds - 1``.

    Options mean what they mean for :func:`render_prompt` (``negative`` and ``guidance`` are
    the same for every line, the init image too; ``guidance`` None is 10 for lines that name
    identities, else 7.5).
    Images already in ``out_dir`` are skipped (see the module docstring). ``group`` (a joined
    :class:`distributed.Group`) shares the images out between the processes of a launch; its
    rank 0 reports ``progress("images", done, total, {})`` over the whole job and gets the
    whole job's result, the other ranks their own part. Lines may name different LoRAs
    (``<lora:NAME:WEIGHT>``; ``loras`` apply to every line): images are grouped by LoRA set,
    which is fused before its group renders. Raises before loading a model for a bad file,
    option, identity or LoRA.
    """
    import torch

    from .. import basis as basis_mod
    from .. import models
    from ..distributed import Launch, device_for, shard
    from ..storage.userfiles import write_user_file

    started = time.perf_counter()
    launch = group.launch if group is not None else Launch()
    choice = sampler_choice(scheduler, sampler, schedule)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
        raise InvalidOption(f"--seeds must be between 1 and {MAX_SEEDS}.")
    check_render_options(num_images=seeds, steps=steps, guidance=guidance, scheduler=scheduler,
                         seed=seed, width=width, height=height, batch_size=batch_size)
    redraw = prepare_redraw(init_image=init_image, strength=strength, hires=hires, steps=steps,
                            width=width, height=height)
    lines = read_prompts_file(path)
    if len(lines) * seeds > MAX_JOB_IMAGES:
        raise InvalidOption(f"{len(lines):,} prompts x {seeds} seeds is more than "
                            f"{MAX_JOB_IMAGES:,} images; split the file.")
    if components is not None:
        model = components.spec
    job = plan_prompt_lines(lines, negative, model, person_noun=person_noun, source=path,
                            tokenizer=components.tokenizer if components is not None else None,
                            clip_skip=clip_skip, loras=loras, lora_dir=lora_dir)
    out = _prepare_out_dir(Path(out_dir))
    model_hashing = filehash.BackgroundHash(
        job.spec.path if job.spec.kind == "single_file" else None)
    hashes = embedding_hashes(job.identities) if job.identities else {}
    guidances = [guidance if guidance is not None else default_guidance(bool(plan.identities))
                 for plan in job.plans]
    seed_list = [seed + i for i in range(seeds)]

    def decide(side_w: int, side_h: int, schedule_type: str
               ) -> tuple[list[tuple[int, int]], dict[tuple[int, int], Path]]:
        """Rank 0 lists what is left to draw (every rank gets its answer); raises when an image
        was made with other settings."""
        decided: Any = None
        if launch.is_main:
            try:
                decided = todo_images(job, seed_list, out,
                                settings_of(job, steps, choice, guidances, side_w, side_h,
                                             model_hashing, hashes, schedule_type, redraw))
            except CelebctlError as exc:
                decided = exc
        decided = group.broadcast(decided) if group is not None else decided
        if isinstance(decided, BaseException):
            raise decided
        return decided

    # What is left, and whether an image was made otherwise, is decided before the model loads
    # whenever the image size is known without it (#24: no load for a job with nothing to do).
    side = (components.default_resolution if components is not None
            else resolution_without_loading(job.spec))
    known = None
    if (width and height) or redraw.init is not None or side is not None:
        known = redraw.sizes(width, height, side or 0)[:2]  # an init image's own size counts
    early_schedule = schedule_type_without_loading(choice, job.spec, components)
    if early_schedule is None:  # the model's scheduler decides the PNG's schedule type
        known = None
    todo, skipped = decide(*known, early_schedule) if known is not None else ([], {})
    if known is not None and not todo:
        if progress is not None and launch.is_main:
            progress("images", 0, 0, {})
        return PromptsResult(source=Path(path), out_dir=out, lines=job.lines, seeds=seed_list,
                             written={}, skipped=skipped, model=job.spec.ref, steps=steps,
                             scheduler=choice.key, width=known[0], height=known[1],
                             world_size=launch.world_size, notes=list(job.notes),
                             sampler=choice.sampler.name, schedule_type=early_schedule,
                             elapsed_s=time.perf_counter() - started)
    basis = basis_mod.load_basis(job.basis_id) if job.basis_id else None
    if components is None:
        torch_device = models.resolve_device(device_for(device, launch))
        components = models.load_pipeline_components(
            job.spec, torch_device, render_dtype(dtype, torch_device),
            progress=progress if launch.is_main else None)
    for line_skip in {plan.clip_skip for plan in job.plans}:
        check_loaded_range(line_skip, components.text_encoders, job.spec.ref)
    if basis is not None:
        check_basis_once(components, basis, job.spec.ref)
    width, height, out_width, out_height = redraw.sizes(width, height,
                                                        components.default_resolution)
    noise_scheduler = make_scheduler(choice, components.scheduler.config)
    schedule_type = samplers.schedule_label(choice, noise_scheduler.config)
    if known != (width, height) or early_schedule != schedule_type:
        todo, skipped = decide(width, height, schedule_type)  # not known before loading
    settings = settings_of(job, steps, choice, guidances, width, height, model_hashing,
                            hashes, schedule_type, redraw)
    mine = shard(todo, launch)
    # Batches hold one LoRA set, one chunk count and one guidance scale (see the module
    # docstring); Python's sort is stable, so images stay in (line, seed) order in each group.
    lora_sets = [set_key(plan.loras) for plan in job.plans]
    mine.sort(key=lambda item: (lora_sets[item[0]], guidances[item[0]],
                                _chunk_count(job.plans[item[0]])))
    batch = batch_size or auto_batch_size(components, max(1, len(mine)), out_width,
                                          out_height)
    notes = list(job.notes)
    unet_call = UNetCall(components.unet, capture=capture, note=notes.append)
    fused: Any = None  # the LoRA set fused now (None: not applied yet)
    vectors = identity_vectors_for(
        {n: c for plan in job.plans for n, c in plan.coefficients.items()}, basis
    ) if basis is not None else {}
    written: dict[tuple[int, int], Path] = {}
    counted = {"n": 0}

    def report() -> None:
        fresh = len(written) - counted["n"]
        total = (group.add(_DONE_KEY, fresh) if group is not None and fresh
                 else group.count(_DONE_KEY) if group is not None else len(written))
        counted["n"] += fresh
        if progress is not None and launch.is_main:
            progress("images", total, len(todo), {})

    def write(image: Any, index: int, image_seed: int) -> None:
        name = image_name(job.lines[index], image_seed, job.plans[index].prompt.plain())
        data = png_bytes(image, {**settings(index), "seed": image_seed})
        written[(index, image_seed)] = write_user_file(out / name, data)

    if progress is not None and launch.is_main:
        progress("images", 0, len(todo), {})
    encoded: dict[int, PromptEmbeds] = {}
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="celebctl-png") as writer:
            pending: list[Any] = []
            for items in _batches(mine, batch, guidances, job.plans):
                for future in [f for f in pending if f.done()]:
                    future.result()  # a failed write stops the job now
                    pending.remove(future)
                if lora_sets[items[0][0]] != fused:
                    apply_loras(components, job.plans[items[0][0]].loras)
                    if fused is not None:  # new weights: capture the UNet afresh
                        unet_call = UNetCall(components.unet, capture=capture,
                                             note=notes.append)
                    fused = lora_sets[items[0][0]]
                needed = dict.fromkeys(index for index, _ in items)
                encoded = {i: encoded[i] if i in encoded
                           else encode_prompt_pair(components, job.plans[i], vectors)
                           for i in needed}
                generators = [torch.Generator("cpu").manual_seed(s) for _, s in items]
                with models.quiet_libraries():
                    images = (sample_images if redraw.plain else redraw.sample)(
                        unet_call=unet_call, vae=components.vae,
                        scheduler=noise_scheduler,
                        embeds=_stack([encoded[i] for i, _ in items]),
                        family=components.family, generators=generators, steps=steps,
                        guidance=guidances[items[0][0]], height=height, width=width,
                        pad_to=batch)
                pending += [writer.submit(write, image, index, image_seed)
                            for (index, image_seed), image in zip(items, images, strict=True)]
                report()
            for future in pending:
                future.result()
    except CelebctlError as exc:
        exc.args = (f"{exc} {resume_note(len(written))}",)
        raise
    report()
    if group is not None and launch.is_main:
        group.wait_for(_DONE_KEY, len(todo), poll=report)
    gathered = group.gather(written) if group is not None else [written]
    everything = {k: v for part in (gathered or [written]) for k, v in part.items()}
    return PromptsResult(source=Path(path), out_dir=out, lines=job.lines, seeds=seed_list,
                         written=everything, skipped=skipped, model=job.spec.ref, steps=steps,
                         scheduler=choice.key, width=out_width, height=out_height,
                         world_size=launch.world_size, notes=notes,
                         sampler=choice.sampler.name, schedule_type=schedule_type,
                         elapsed_s=time.perf_counter() - started)


def _chunk_count(plan: RenderPlan) -> int:
    return max(len(plan.chunks), len(plan.negative_chunks), 1)


def _batches(items: Sequence[tuple[int, int]], size: int, guidances: Sequence[float],
             plans: Sequence[RenderPlan]) -> list[list[tuple[int, int]]]:
    """``items`` (already grouped) cut into batches of ``size`` that never mix groups."""
    batches: list[list[tuple[int, int]]] = []
    group_of = None
    for item in items:
        key = (set_key(plans[item[0]].loras), guidances[item[0]], _chunk_count(plans[item[0]]))
        if not batches or key != group_of or len(batches[-1]) >= size:
            batches.append([])
            group_of = key
        batches[-1].append(item)
    return batches
