"""`celebctl render`: prompts naming identities -> PNG files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    EXIT_INTERRUPTED,
    CelebTyper,
    ClipSkipOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LazyModule,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    err,
    out,
    print_json,
    warn,
)
from .progress import progress_callback
from .sampling import SamplerOpt, ScheduleOpt, SchedulerOpt, check_sampler_options

rendering = LazyModule("celebctl.rendering")
loras = LazyModule("celebctl.loras")
DEFAULT_OUT_DIR = Path("renders")


class HiresUpscaler(str, Enum):
    """`--hires-upscaler` choices."""

    latent = "latent"
    lanczos = "lanczos"


def render_cmd(
    prompt: Annotated[str | None, typer.Argument(
        help="What to draw. Registered identities are found by name (\"alice shaking hands "
        "with bob\"); `<alice>` names one explicitly, `\\grace` writes the plain word grace "
        "even when an identity has that name. WebUI syntax works: `(alice:1.2)`, `(x)`, `[x]`, "
        "`\\(`, `BREAK`; long prompts go in 75-token chunks; `<lora:NAME:WEIGHT>` draws with "
        "the LoRA NAME.safetensors from the LoRA folder. Leave it out with --prompts.",
        show_default=False)] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", help="Render every prompt of this UTF-8 file instead: one per line; blank "
        "lines and lines starting with # are skipped. Line N's image with seed S is "
        "`L{N:05d}-s{S:07d}-FIRST-WORDS.png`; a rerun skips the images already there. Under "
        "torchrun (or srun) the images are shared out between the processes.",
        show_default=False)] = None,
    seeds: Annotated[int | None, typer.Option(
        "--seeds", help="With --prompts: images per prompt, with seeds SEED..SEED+N-1 "
        "(default 1).", show_default=False)] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images to make; image "
                                            "i uses seed SEED+i.")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 50,
    guidance: Annotated[float | None, typer.Option(
        "--guidance", help="Classifier-free guidance scale (default: 10 when the prompt names "
        "an identity, as the method's authors sample; 7.5 otherwise).",
        show_default=False)] = None,
    sampler: SamplerOpt = None,
    schedule: ScheduleOpt = None,
    scheduler: SchedulerOpt = None,
    seed: SeedOpt = 0,
    clip_skip: ClipSkipOpt = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width in px, a multiple "
                                              "of 8 (default: the model's, 512 for SD).",
                                              show_default=False)] = None,
    height: Annotated[int | None, typer.Option("--height", help="Image height in px, a "
                                               "multiple of 8 (default: the model's).",
                                               show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Images denoised at once (default: as many as fit on a GPU, up "
        "to 16; 4 on a CPU).", show_default=False)] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files "
                                          "(created if missing; files are never overwritten).")
                       ] = DEFAULT_OUT_DIR,
    grid: Annotated[bool, typer.Option("--grid", help="Also write a contact sheet of all "
                                       "images.")] = False,
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", help="Draw with this LoRA (a .safetensors file, kohya/WebUI or diffusers "
        "format) at WEIGHT (default 1); repeat for several. Same as `<lora:NAME:WEIGHT>` in "
        "the prompt, which finds NAME in the LoRA folder.", metavar="FILE[:WEIGHT]",
        show_default=False)] = None,
    lora_dir: Annotated[Path | None, typer.Option(
        "--lora-dir", help="Folder (searched with its subfolders) where `<lora:NAME>` finds "
        "NAME.safetensors (default: `lora_dir` in config.toml, else loras/ in the data home).",
        show_default=False)] = None,
    person: Annotated[bool, typer.Option(
        "--person/--no-person", help="Add 'person' after each identity unless a person noun "
        "(man, woman, ...) follows, as in training: `alice riding a bike` renders as "
        "`<alice> person riding a bike`, `alice's hat` as `<alice> person's hat`.")] = True,
    init_image: Annotated[Path | None, typer.Option(
        "--init-image", help="img2img: start from this image (JPEG, PNG, WebP, BMP, GIF) "
        "instead of noise. The size defaults to the image's, rounded down to a multiple of 8; "
        "--width/--height resize it.", show_default=False)] = None,
    strength: Annotated[float | None, typer.Option(
        "--strength", help="With --init-image: the WebUI's Denoising strength, 0 to 1 (default "
        "0.75): how much of the image is redrawn; int(steps x strength) steps run.",
        show_default=False)] = None,
    hires: Annotated[float | None, typer.Option(
        "--hires", metavar="SCALE", help="Hires fix: after drawing, upscale by SCALE (1 to 4) "
        "and redraw at that size, as the WebUI's hires fix. The PNG's Size stays the first "
        "pass's, with 'Hires upscale'.", show_default=False)] = None,
    hires_steps: Annotated[int | None, typer.Option(
        "--hires-steps", help="Steps of the hires pass (default: as --steps); they all run, "
        "as in the WebUI.", show_default=False)] = None,
    hires_denoise: Annotated[float | None, typer.Option(
        "--hires-denoise", help="Denoising strength of the hires pass (default 0.7).",
        show_default=False)] = None,
    hires_upscaler: Annotated[HiresUpscaler | None, typer.Option(
        "--hires-upscaler", help="latent: interpolate the latents (the WebUI's 'Latent'; "
        "default); lanczos: upscale the decoded image and encode it again.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the expanded prompt, "
                                          "identities, basis, model and token count; load no "
                                          "model, write nothing.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Render a prompt that names registered identities; print the paths of the PNG files.

    Each PNG carries its prompt and settings (WebUI-style `parameters` text), so the same seed
    and settings give the same image again.
    """
    choice = check_sampler_options(scheduler, sampler, schedule)
    sampling = {"scheduler": scheduler.value if scheduler else None, "sampler": sampler,
                "schedule": schedule}
    redraw = dict(init_image=init_image, strength=strength,
                  hires=_hires_fix(hires, hires_steps, hires_denoise, hires_upscaler))
    if prompts_file is not None:
        if prompt is not None:
            raise typer.BadParameter("give a PROMPT or --prompts FILE, not both.",
                                     param_hint="--prompts")
        if num_images != 1:
            raise typer.BadParameter("with --prompts, use --seeds N for images per prompt.",
                                     param_hint="--num-images")
        if grid:
            raise typer.BadParameter("a contact sheet is for one prompt; it does not go with "
                                     "--prompts.", param_hint="--grid")
        redraw = _checked(redraw, steps=steps, width=width, height=height)
        _render_prompts_file(
            prompts_file, seeds=1 if seeds is None else seeds, seed=seed, negative=negative,
            steps=steps, guidance=guidance, **sampling, width=width,
            height=height, batch_size=batch_size, model=model, device=device, dtype=dtype,
            out_dir=out_dir, person_noun=person, dry_run=dry_run, quiet=quiet,
            json_out=json_out, clip_skip=clip_skip, loras=lora or [], lora_dir=lora_dir,
            **redraw)
        return
    if prompt is None:
        raise typer.BadParameter("give a PROMPT to draw, or --prompts FILE.",
                                 param_hint="PROMPT")
    if seeds is not None:
        raise typer.BadParameter("--seeds goes with --prompts; for one prompt use "
                                 "--num-images.", param_hint="--seeds")
    redraw = _checked(redraw, steps=steps, width=width, height=height)
    if dry_run:
        plan = rendering.plan_render(prompt, negative, model, person_noun=person,
                                     clip_skip=clip_skip, loras=lora or [],
                                     lora_dir=lora_dir)
        if json_out:
            print_json({**plan.to_dict(), "sampler": choice.sampler.name,
                        "schedule_type": choice.schedule})
            return
        out.print(f"Prompt:     {plan.prompt.expanded()}")
        if plan.negative.text:
            out.print(f"Negative:   {plan.negative.expanded()}")
        if plan.identities:
            out.print(f"WebUI:      {plan.prompt.expanded('webui')}")
            out.print(f"ComfyUI:    {plan.prompt.expanded('comfyui')}")
        out.print(f"Identities: {', '.join(plan.identities) or '(none)'}")
        out.print(f"Basis:      {plan.basis_id or '(none)'}")
        out.print(f"Model:      {plan.model}")
        if plan.loras:
            out.print("LoRAs:      " + ", ".join(
                f"{u.name} x{u.weight:g} ({u.path})" for u in plan.loras))
        chunks = len(plan.chunks)
        if chunks <= 1:
            tokens = f"{plan.token_count} of {plan.max_tokens}"
        else:
            tokens = (f"{plan.token_count} in {chunks} chunks of 75 ("
                      + " + ".join(str(n) for n in plan.chunks) + ")")
        out.print(f"Tokens:     {tokens}"
                  + (f" (negative: {plan.negative_token_count})" if plan.negative.text else ""))
        weighted = [f"{text} x{weight:.3g}" for text, weight in _weighted_parts(plan.prompt)]
        if weighted:
            out.print("Weights:    " + "; ".join(weighted))
        shown = guidance if guidance is not None else rendering.default_guidance(
            bool(plan.identities))
        out.print(f"Guidance:   {shown:g}" + ("" if guidance is not None else " (default)"))
        out.print(f"Sampler:    {choice.sampler.name}, schedule type {choice.schedule}")
        if plan.clip_skip != 1:
            out.print(f"Clip skip:  {plan.clip_skip}")
        _print_redraw(redraw, steps)
        for note in plan.notes:
            warn(note)
        return
    written: list[Path] = []
    try:
        with progress_callback(quiet) as progress:
            result = rendering.render_prompt(
                prompt, negative=negative, num_images=num_images, steps=steps,
                guidance=guidance, **sampling, seed=seed, width=width,
                height=height, batch_size=batch_size, model=model, device=device, dtype=dtype,
                out_dir=out_dir, grid=grid, progress=progress, on_file=written.append,
                person_noun=person, clip_skip=clip_skip, loras=lora or [], lora_dir=lora_dir,
                **redraw,
            )
    except KeyboardInterrupt:
        if not written:
            raise
        err.print(f"Interrupted; {len(written)} image{'s' if len(written) != 1 else ''} had "
                  "been written in full (nothing is half-written):")
        for path in written:
            out.print(str(path))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for note in result.notes:
        warn(note)
    if json_out:
        print_json(result.to_dict())
        return
    for path in result.paths:
        out.print(str(path))
    if result.grid is not None:
        out.print(str(result.grid))


def _render_prompts_file(path: Path, *, dry_run: bool, quiet: bool, json_out: bool,
                         **options) -> None:
    """`render --prompts FILE`: one process, or one of the processes a launcher started (rank
    0 draws the progress bar and prints the summary)."""
    from .. import distributed

    if dry_run:
        lines = rendering.read_prompts_file(path)
        plan = rendering.plan_prompt_lines(lines, options["negative"], options["model"],
                                           person_noun=options["person_noun"], source=path,
                                           clip_skip=options["clip_skip"],
                                           loras=options["loras"],
                                           lora_dir=options["lora_dir"])
        if json_out:
            print_json(plan.to_dict())
            return
        out.print(f"Model:      {plan.spec.ref}")
        out.print(f"Basis:      {plan.basis_id or '(none)'}")
        out.print(f"Identities: {', '.join(plan.identities) or '(none)'}")
        out.print(f"Prompts:    {len(lines)} x {options['seeds']} seed"
                  f"{'s' if options['seeds'] != 1 else ''}")
        for line, line_plan in zip(lines, plan.plans, strict=True):
            out.print(f"  line {line.number}: "
                      + loras.with_tags(line_plan.prompt.expanded(), line_plan.loras))
        for note in plan.notes:
            warn(note)
        return
    launch = distributed.launch_from_env()
    with distributed.Group(launch) as group:
        try:
            with progress_callback(quiet or not launch.is_main) as progress:
                result = rendering.render_prompts_file(path, progress=progress, group=group,
                                                       **options)
        except KeyboardInterrupt:
            err.print("Interrupted; every image written so far is complete. Run the same "
                      "command again to render the rest.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if not launch.is_main:
        return
    for note in result.notes:
        warn(note)
    if json_out:
        print_json(result.to_dict())
        return
    for key in sorted(result.written):
        out.print(str(result.written[key]))
    err.print(f"Wrote {len(result.written)} image{'s' if len(result.written) != 1 else ''}"
              f"{f' ({len(result.skipped)} already there, skipped)' if result.skipped else ''}"
              f" to {result.out_dir}"
              f"{f' with {result.world_size} processes' if result.world_size > 1 else ''}.")


def _print_redraw(redraw: dict, steps: int) -> None:
    """--dry-run's lines for img2img and the hires fix."""
    init, hires = redraw["init_image"], redraw["hires"]
    if init is not None:
        strength = (rendering.DEFAULT_STRENGTH if redraw["strength"] is None
                    else redraw["strength"])
        width, height = init.size
        out.print(f"Init image: {init.name} ({width}x{height}), denoising strength "
                  f"{strength:g}: {rendering.img2img.img2img_steps(steps, strength)} of "
                  f"{steps} steps run")
    if hires is not None:
        out.print(f"Hires fix:  x{hires.scale:g}, {hires.steps_for(steps)} steps, denoising "
                  f"strength {hires.denoise:g}, "
                  f"{rendering.HIRES_UPSCALERS[hires.upscaler]} upscaler")


def _checked(redraw: dict, **sizes) -> dict:
    """The img2img/hires options checked and the init image read once, before anything heavy
    loads (a bad image is refused in a moment)."""
    checked = rendering.prepare_redraw(**sizes, **redraw)
    return {**redraw, "init_image": checked.init}


def _hires_fix(scale: float | None, steps: int | None, denoise: float | None,
               upscaler: HiresUpscaler | None):
    """The --hires options as one value (None without --hires)."""
    if scale is None:
        for flag, value in (("--hires-steps", steps), ("--hires-denoise", denoise),
                            ("--hires-upscaler", upscaler)):
            if value is not None:
                raise typer.BadParameter("goes with --hires SCALE.", param_hint=flag)
        return None
    return rendering.HiresFix(
        scale=scale, steps=steps,
        denoise=rendering.DEFAULT_HIRES_DENOISE if denoise is None else denoise,
        upscaler=(upscaler or HiresUpscaler.latent).value)


def _weighted_parts(parsed) -> list[tuple[str, float]]:
    """(text, weight) of each run of segments whose weight is not 1, for --dry-run."""
    parts: list[tuple[str, float]] = []
    for index, seg in enumerate(parsed.segments):
        weight = parsed.weight_of(index)
        text = f"<{seg.name}>" if hasattr(seg, "name") else str(seg)
        if weight == 1.0 or text == "BREAK":
            continue
        if parts and parts[-1][1] == weight:
            parts[-1] = (parts[-1][0] + text, weight)
        else:
            parts.append((text, weight))
    return [(text.strip(), weight) for text, weight in parts]


render_cmd.interrupt_message = (  # type: ignore[attr-defined]
    "Interrupted; no image was written."
)


def register(app: CelebTyper) -> None:
    """Attach `render` to the root app."""
    app.command("render")(render_cmd)
