"""`celebctl eval`: measure an identity's likeness and prompt following."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    CelebTyper,
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

evaluation = LazyModule("celebctl.evaluation")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def eval_cmd(
    names: Annotated[list[str], typer.Argument(
        help="One or more registered identities (two or more: prompts that put them together).",
        autocompletion=identity_names, show_default=False)],
    seeds: Annotated[int, typer.Option("--seeds", help="Images per prompt (seeds 0..N-1).")] = 2,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps per image.")] = 30,
    guidance: Annotated[float | None, typer.Option(
        "--guidance", help="Guidance scale (default 10, as `render` uses for identities).",
        show_default=False)] = None,
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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the images and the "
                                          "contact sheet (never overwritten).")] = Path("evals"),
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Render a fixed prompt set and measure identity similarity (face-recognition cosine with
    the identity's own face) and prompt similarity (CLIP), per prompt and on average.

    The published figures on the same protocol: Celeb Basis 0.207 identity / 0.268 prompt
    (see docs/method.md). The tiny model draws noise, so its images have no faces: every image
    is a miss.
    """
    with progress_callback(quiet) as progress:
        result = evaluation.evaluate(
            names, model=model, device=device, dtype=dtype, seeds=seeds, steps=steps,
            guidance=guidance, clip=None if no_clip else clip, baseline=baseline,
            out_dir=out_dir, record=record, progress=progress)
    for note in result.notes:
        warn(note)
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(box=None, header_style="bold", title=f"{result.prompt_set}, {len(result.seeds)}"
                  f" seed(s) per prompt, {result.model}")
    table.add_column("prompt", overflow="fold")
    for name in result.names:
        table.add_column(f"{name} id sim", justify="right")
        table.add_column("misses", justify="right")
    table.add_column("prompt sim", justify="right")
    for row in result.per_prompt(False):
        cells = [cell(row["prompt"])]
        for name in result.names:
            cells += [cell(_fmt(row[f"identity.{name}"])), cell(row[f"misses.{name}"])]
        cells.append(cell(_fmt(row["prompt_similarity"])))
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


eval_cmd.interrupt_message = (  # type: ignore[attr-defined]
    "Interrupted; the images written so far are kept, nothing was recorded."
)


def register(app: CelebTyper) -> None:
    """Attach `eval` to the root app."""
    app.command("eval")(eval_cmd)
