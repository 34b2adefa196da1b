"""`celebctl eval`: measure an identity's likeness and prompt following."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    CelebTyper,
    ClipSkipOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LazyModule,
    ModelOpt,
    QuietOpt,
    cell,
    out,
    print_json,
    warn,
)
from .completion import identity_names
from .progress import progress_callback
from .sampling import SamplerOpt, ScheduleOpt, check_sampler_options

evaluation = LazyModule("celebctl.evaluation")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


TABLE_PROMPT_CHARS = 120  # the whole prompt is in --json and on the contact sheet


def _short(text: str) -> str:
    """A prompt cut to fit a table row (a WebUI prompt can be hundreds of words)."""
    return text if len(text) <= TABLE_PROMPT_CHARS else text[:TABLE_PROMPT_CHARS - 3] + "..."


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# Options of the prompt-set run that mean nothing when --images scores existing images.
RENDER_ONLY = ("seeds", "steps", "guidance", "sampler", "schedule", "baseline", "record",
               "model", "dtype", "out_dir", "clip_skip")


def _flag(ctx: typer.Context, name: str) -> str:
    for param in ctx.command.params:
        if param.name == name:
            return max(param.opts, key=len)
    return name


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _check_combination(ctx: typer.Context, images: Path | None, prompt: str | None) -> None:
    """Refuse options that contradict each other (usage errors, exit 2)."""
    if images is None:
        if prompt is not None:
            raise typer.BadParameter(
                "--prompt is for --images; the prompt-set run has its own prompts.",
                param_hint="'--prompt'")
        return
    given = [_flag(ctx, name) for name in RENDER_ONLY if _given(ctx, name)]
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)} cannot be used with --images: nothing is rendered or "
            "recorded when scoring existing images (use --sheet PATH for a contact sheet).",
            param_hint="'--images'")


def _scoring_progress(progress):
    """The core's "score" phase under a readable name."""
    if progress is None:
        return None

    def callback(phase, done, total, info):
        progress("Scoring images" if phase == "score" else phase, done, total, info)

    return callback


def eval_cmd(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(
        help="One or more registered identities (two or more: prompts that put them together).",
        autocompletion=identity_names, show_default=False)],
    images: Annotated[Path | None, typer.Option(
        "--images", help="Score the images in this folder (made anywhere: WebUI, ComfyUI, "
        "diffusers) instead of rendering the prompt set; nothing is recorded. Subfolders and "
        "hidden files are not read; files that are not images are listed as skipped. The "
        "prompt set's options (--seeds, --steps, --guidance, --sampler, --schedule, "
        "--baseline, --record, --model, --dtype, --out) cannot be combined with it.",
        show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="With --images: the prompt for prompt similarity. Default: each "
        "image's own prompt from its WebUI parameters (PNG text, or EXIF in JPEG/WebP).",
        show_default=False)] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Images per prompt (seeds 0..N-1).")] = 2,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps per image.")] = 30,
    guidance: Annotated[float | None, typer.Option(
        "--guidance", help="Guidance scale (default 10, as `render` uses for identities).",
        show_default=False)] = None,
    sampler: SamplerOpt = None,
    schedule: ScheduleOpt = None,
    clip: Annotated[str, typer.Option(
        "--clip", help="CLIP model for prompt similarity: a hub id (from the Hugging Face "
        "cache offline), a local folder, or `tiny-clip` (built in, random weights).")
    ] = DEFAULT_CLIP,
    no_clip: Annotated[bool, typer.Option("--no-clip", help="Skip prompt similarity.")] = False,
    baseline: Annotated[bool, typer.Option(
        "--baseline", help="Also render every prompt with each identity written 'a person': "
        "the similarity reached without the identity.")] = False,
    record: Annotated[bool, typer.Option(
        "--record/--no-record", help="Append the summary to each identity's eval history "
        "(shown by `celebctl show`).")] = True,
    model: ModelOpt = None,
    clip_skip: ClipSkipOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the images and the "
                                          "contact sheet (never overwritten).")] = Path("evals"),
    sheet: Annotated[Path | None, typer.Option(
        "--sheet", help="Write the labelled contact sheet to this new .png file (default: in "
        "--out for the prompt set; none for --images).", show_default=False)] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure identity similarity (face-recognition cosine with the identity's own face) and
    prompt similarity (CLIP), per image, per prompt and on average: on a fixed prompt set
    rendered here, or with --images on images made anywhere.

    Published figures (Celeb Basis 0.207 identity / 0.268 prompt; docs/method.md) are
    comparable in kind, not digit for digit: they used another face encoder, other prompts and
    many identities. The tiny model draws noise, so its images have no faces: every image is a
    miss.
    """
    _check_combination(ctx, images, prompt)
    if images is not None:
        _eval_images(names, images, prompt=prompt, clip=None if no_clip else clip,
                     device=device, sheet=sheet, quiet=quiet, json_out=json_out)
        return
    check_sampler_options(None, sampler, schedule)
    with progress_callback(quiet) as progress:
        result = evaluation.evaluate(
            names, model=model, device=device, dtype=dtype, seeds=seeds, steps=steps,
            guidance=guidance, clip=None if no_clip else clip, baseline=baseline,
            out_dir=out_dir, record=record, sheet=sheet, progress=progress,
            sampler=sampler, schedule=schedule, clip_skip=clip_skip)
    for note in result.notes:
        warn(note)
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(box=None, header_style="bold", title=f"{result.prompt_set}, {len(result.seeds)}"
                  f" seed(s) per prompt, {result.model}, {result.sampler} "
                  f"({result.schedule_type})")
    table.add_column("prompt", overflow="fold")
    for name in result.names:
        table.add_column(f"{name} id sim", justify="right")
        table.add_column("misses", justify="right")
    table.add_column("prompt sim", justify="right")
    with_baseline = any(r.baseline for r in result.images)
    if with_baseline:  # each prompt's "a person" baseline beside its numbers, in one cell
        table.caption = "identity / baseline: each prompt with 'a person' in the identity's place"

    def pair(row: dict, key: str) -> str:
        if not with_baseline:
            return _fmt(row[key])
        return f"{_fmt(row[key])} / {_fmt((row.get('baseline') or {}).get(key))}"

    for row in result.per_prompt(False):
        cells = [cell(row["prompt"])]
        for name in result.names:
            cells += [cell(pair(row, f"identity.{name}")), cell(row[f"misses.{name}"])]
        cells.append(cell(pair(row, "prompt_similarity")))
        table.add_row(*cells)
    out.print(table)
    for label, baseline_rows in (("mean", False), ("baseline mean ('a person')", True)):
        if baseline_rows and not any(r.baseline for r in result.images):
            continue
        summary = result.summary(baseline_rows)
        parts = [f"{name}: identity {_fmt(summary[f'identity_similarity.{name}'])}, miss rate "
                 f"{_fmt(summary[f'miss_rate.{name}'])}" for name in result.names]
        parts.append(f"prompt {_fmt(summary['prompt_similarity'])}")
        if "told_apart_rate" in summary:
            parts.append(f"told apart {_fmt(summary['told_apart_rate'])}")
        out.print(f"{label} over {summary['images']} images: " + "; ".join(parts))
    if result.sheet:
        out.print(f"contact sheet: {result.sheet}")


def _eval_images(names: list[str], images: Path, *, prompt: str | None, clip: str | None,
                 device: str, sheet: Path | None, quiet: bool, json_out: bool) -> None:
    with progress_callback(quiet) as progress:
        result = evaluation.evaluate_images(names, images, prompt=prompt, clip=clip,
                                            device=device, sheet=sheet,
                                            progress=_scoring_progress(progress))
    for note in result.notes:
        warn(note)
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(box=None, header_style="bold", title=f"{len(result.images)} file(s) in "
                  f"{result.folder}")
    table.add_column("file", overflow="fold")
    table.add_column("faces", justify="right")
    for name in result.names:
        table.add_column(f"{name} id sim", justify="right")
    table.add_column("prompt sim", justify="right")
    samplers_shown = any(row.sampler for row in result.images)
    if samplers_shown:
        table.add_column("sampler", overflow="fold")
    table.add_column("prompt", overflow="fold")
    for row in result.images:
        sampler = ([cell(", ".join(x for x in (row.sampler, row.schedule_type) if x) or "-")]
                   if samplers_shown else [])
        if row.skipped is not None:
            table.add_row(cell(row.file), cell("skipped"), *[cell("-")] * len(result.names),
                          cell("-"), *sampler, cell(row.skipped))
            continue
        table.add_row(cell(row.file), cell(row.faces),
                      *[cell(_fmt(row.identity.get(n))) for n in result.names],
                      cell(_fmt(row.prompt_similarity)), *sampler,
                      cell(_short(row.prompt or "-")))
    out.print(table)
    summary = result.summary()
    skipped = f", {summary['skipped']} skipped" if summary["skipped"] else ""
    parts = [f"{name}: identity {_fmt(summary[f'identity_similarity.{name}'])}, miss rate "
             f"{_fmt(summary[f'miss_rate.{name}'])}" for name in result.names]
    parts.append(f"prompt {_fmt(summary['prompt_similarity'])}")
    if "told_apart_rate" in summary:
        parts.append(f"told apart {_fmt(summary['told_apart_rate'])}")
    out.print(f"mean over {summary['images']} images{skipped}: " + "; ".join(parts))
    if result.sheet:
        out.print(f"contact sheet: {result.sheet}")


eval_cmd.interrupt_message = (  # type: ignore[attr-defined]
    "Interrupted; nothing was recorded (images rendered so far are kept)."
)


def register(app: CelebTyper) -> None:
    """Attach `eval` to the root app."""
    app.command("eval")(eval_cmd)
