"""`celebctl render`: prompts naming identities -> PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    EXIT_INTERRUPTED,
    CelebTyper,
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
DEFAULT_OUT_DIR = Path("renders")


def render_cmd(
    prompt: Annotated[str | None, typer.Argument(
        help="What to draw. Registered identities are found by name (\"alice shaking hands "
        "with bob\"); `<alice>` names one explicitly, `\\grace` writes the plain word grace "
        "even when an identity has that name. WebUI syntax works: `(alice:1.2)`, `(x)`, `[x]`, "
        "`\\(`, `BREAK`; long prompts go in 75-token chunks. Leave it out with --prompts.",
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
    person: Annotated[bool, typer.Option(
        "--person/--no-person", help="Add 'person' after each identity unless a person noun "
        "(man, woman, ...) follows, as in training: `alice riding a bike` renders as "
        "`<alice> person riding a bike`, `alice's hat` as `<alice> person's hat`.")] = True,
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
        _render_prompts_file(
            prompts_file, seeds=1 if seeds is None else seeds, seed=seed, negative=negative,
            steps=steps, guidance=guidance, **sampling, width=width,
            height=height, batch_size=batch_size, model=model, device=device, dtype=dtype,
            out_dir=out_dir, person_noun=person, dry_run=dry_run, quiet=quiet,
            json_out=json_out)
        return
    if prompt is None:
        raise typer.BadParameter("give a PROMPT to draw, or --prompts FILE.",
                                 param_hint="PROMPT")
    if seeds is not None:
        raise typer.BadParameter("--seeds goes with --prompts; for one prompt use "
                                 "--num-images.", param_hint="--seeds")
    if dry_run:
        plan = rendering.plan_render(prompt, negative, model, person_noun=person)
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
                person_noun=person,
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
                                           person_noun=options["person_noun"], source=path)
        if json_out:
            print_json(plan.to_dict())
            return
        out.print(f"Model:      {plan.spec.ref}")
        out.print(f"Basis:      {plan.basis_id or '(none)'}")
        out.print(f"Identities: {', '.join(plan.identities) or '(none)'}")
        out.print(f"Prompts:    {len(lines)} x {options['seeds']} seed"
                  f"{'s' if options['seeds'] != 1 else ''}")
        for line, line_plan in zip(lines, plan.plans, strict=True):
            out.print(f"  line {line.number}: {line_plan.prompt.expanded()}")
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
