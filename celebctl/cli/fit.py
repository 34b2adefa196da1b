"""`celebctl add`, `celebctl joint` and `celebctl add-many`: fit identities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    EXIT_ERROR,
    CelebTyper,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LazyModule,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    cell,
    err,
    out,
    print_json,
    warn,
    warn_if_word,
)
from .completion import identity_names
from .progress import progress_callback

fitting = LazyModule("celebctl.fitting")

StepsOpt = Annotated[int | None, typer.Option(
    "--steps", help="Optimisation steps (default 400 per identity).", show_default=False)]
LrOpt = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per step.")]
ResolutionOpt = Annotated[int | None, typer.Option(
    "--resolution", help="Training image size in px (default: the model's, 512 for SD).",
    show_default=False)]
DirectOpt = Annotated[bool, typer.Option(
    "--direct", help="Learn the (2, p) coefficients directly instead of the face mapping.")]
FitClipSkipOpt = Annotated[int | None, typer.Option(
    "--clip-skip", help="Read the captions N layers from the end of the text encoder, as the "
    "WebUI's \"Clip skip\" (1 = the last layer; 2 for anime and Pony-style checkpoints); "
    "renders use it by default. Default: the config's clip_skip for the model, else 1.",
    min=1, show_default=False)]
PoolOpt = Annotated[int | None, typer.Option(
    "--pool-size", help="Augmented samples per identity, VAE-encoded once before the fit "
    "(default 256 on a GPU, 64 on a CPU).", show_default=False)]


def _report(outcome, json_out: bool, verb: str) -> None:
    for note in outcome.notes:
        warn(note)
    summary = outcome.result.summary
    if json_out:
        print_json({
            "identities": [i.name for i in outcome.identities],
            "basis_id": outcome.basis_id,
            "model": outcome.model,
            "fit": summary,
            "clip_skip": outcome.result.settings.clip_skip,
            "paths": [str(i.path) for i in outcome.identities],
        })
        return
    names = ", ".join(f"'{i.name}'" for i in outcome.identities)
    out.print(f"{verb} {names}: {summary['steps']} steps in {summary['wall_time_s']:.1f} s, "
              f"{_loss_words(summary)}.")


def _loss_words(summary: dict) -> str:
    """How the loss moved, in words that fit the step count (10-step means need 20 steps)."""
    if summary["steps"] >= 20:
        return (f"loss {summary['loss_mean_first10']:.4f} -> {summary['loss_mean_last10']:.4f} "
                "(mean of first/last 10 steps)")
    if summary["steps"] >= 2:
        return (f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} "
                "(first -> last step)")
    return f"loss {summary['loss_first']:.4f} (one step)"


def add_cmd(
    name: Annotated[str, typer.Argument(help="Name to register (one lowercase word).",
                                        show_default=False)],
    photos: Annotated[list[Path], typer.Argument(
        help="1 to 16 photos of the person's face (JPEG, PNG, WebP, BMP). Several photos of the "
        "same person (different days, light, angles) usually give a better likeness.",
        show_default=False)],
    model: ModelOpt = None,
    face: Annotated[list[int] | None, typer.Option(
        "--face", help="Which face to use when a photo has several (1 = leftmost). With several "
        "photos, give it once per photo, in order; without it the largest face is used.",
        show_default=False)] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an existing identity.")
                       ] = False,
    steps: StepsOpt = None,
    lr: LrOpt = 1e-2,
    batch_size: BatchOpt = 2,
    seed: SeedOpt = 0,
    resolution: ResolutionOpt = None,
    direct: DirectOpt = False,
    pool_size: PoolOpt = None,
    clip_skip: FitClipSkipOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit a new identity from one or more photos of one person and register it as NAME.

    Every photo is checked (read, face found and aligned) before the model loads; one bad photo
    refuses the whole add. Builds the model's celeb basis first if it is missing. Ctrl-C stops
    cleanly: nothing is written.
    """
    settings = fitting.FitSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                   resolution=resolution, direct=direct, pool_size=pool_size,
                                   clip_skip=clip_skip)
    with progress_callback(quiet) as progress:
        outcome = fitting.add_identity_from_photo(
            name, photos, model=model, device=device, dtype=dtype, settings=settings,
            face_index=face or None, replace=replace, progress=progress)
    # After the fit, not before: a refused add should print only why it was refused.
    warn_if_word(name)
    _report(outcome, json_out, "Added")


def joint_cmd(
    names: Annotated[list[str], typer.Argument(help="Two or more registered identities.",
                                               autocompletion=identity_names,
                                               show_default=False)],
    model: ModelOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = 1e-2,
    batch_size: BatchOpt = 2,
    seed: SeedOpt = 0,
    resolution: ResolutionOpt = None,
    direct: DirectOpt = False,
    pool_size: PoolOpt = None,
    clip_skip: FitClipSkipOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Refit identities together (one shared mapping) so they combine well in one prompt.

    Uses their stored face crops; all of them are replaced in one all-or-nothing step.
    """
    settings = fitting.FitSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                   resolution=resolution, direct=direct, pool_size=pool_size,
                                   clip_skip=clip_skip)
    with progress_callback(quiet) as progress:
        outcome = fitting.refit_jointly(names, model=model, device=device, dtype=dtype,
                                        settings=settings, progress=progress)
    _report(outcome, json_out, "Refitted")


def refit_cmd(
    names: Annotated[list[str], typer.Argument(help="Registered identities to fit again.",
                                               autocompletion=identity_names,
                                               show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="The checkpoint to fit them for: a repo id, a diffusers folder, a "
        ".safetensors file or a built-in model.", show_default=False)],
    as_name: Annotated[str | None, typer.Option(
        "--as", help="Write the refit as this new identity and keep the old one (one NAME "
        "only).", metavar="NEW", show_default=False)] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Refit in place.")] = False,
    steps: StepsOpt = None,
    lr: LrOpt = 1e-2,
    batch_size: BatchOpt = 2,
    seed: SeedOpt = 0,
    resolution: ResolutionOpt = None,
    direct: DirectOpt = False,
    pool_size: PoolOpt = None,
    clip_skip: Annotated[int | None, typer.Option(
        "--clip-skip", help="Text encoder layer, as the WebUI's \"Clip skip\" (default: the "
        "config's clip_skip for the model, else the identity's own).", min=1,
        show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit identities again from their stored face crops, for another checkpoint: move your
    people to a new finetune.

    Each is fitted alone, as `add` fits the same crops with the same options. Identities
    imported from a --no-face bundle keep no crops and cannot be refitted.
    """
    settings = fitting.FitSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                   resolution=resolution, direct=direct, pool_size=pool_size,
                                   clip_skip=clip_skip)
    with progress_callback(quiet) as progress:
        outcome = fitting.refit_identities(names, model=model, as_name=as_name, replace=replace,
                                           device=device, dtype=dtype, settings=settings,
                                           progress=progress)
    for note in outcome.notes:
        warn(note)
    if json_out:
        print_json({
            "identities": [i.name for i in outcome.identities],
            "from": list(names),
            "basis_id": outcome.basis_id,
            "model": outcome.model,
            "clip_skip": [r.settings.clip_skip for r in outcome.results],
            "fit": [r.summary for r in outcome.results],
            "paths": [str(i.path) for i in outcome.identities],
        })
        return
    for source, ident, result in zip(names, outcome.identities, outcome.results, strict=True):
        summary = result.summary
        target = f" as '{ident.name}'" if ident.name != source else ""
        out.print(f"Refitted '{source}'{target} on {outcome.model} (clip skip "
                  f"{result.settings.clip_skip}): {summary['steps']} steps in "
                  f"{summary['wall_time_s']:.1f} s, loss {summary['loss_mean_first10']:.4f} -> "
                  f"{summary['loss_mean_last10']:.4f}.")


def add_many_cmd(
    source: Annotated[Path, typer.Argument(
        help="A folder of folders (`people/alice/*.jpg` -> identity `alice`) or a .csv/.tsv "
        "manifest (`name,photo[,photo...]`, paths relative to the manifest).",
        show_default=False)],
    model: ModelOpt = None,
    pack: Annotated[int | None, typer.Option(
        "--pack", help="People fitted side by side in one training batch, each an independent "
        "fit (default: 8 on a GPU, fewer if memory runs out; on a CPU 4 for small models, else "
        "1).", show_default=False)] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Refit people who are already registered.")] = False,
    bundles: Annotated[Path | None, typer.Option(
        "--bundles", help="Also write each person as DIR/NAME.celeb (for jobs across machines: "
        "`celebctl import DIR/*.celeb` merges them).", metavar="DIR",
        show_default=False)] = None,
    with_basis: Annotated[bool, typer.Option(
        "--with-basis", help="With --bundles: carry the basis in each bundle, so it renders "
        "on a machine without the basis or the model.")] = False,
    steps: StepsOpt = None,
    lr: LrOpt = 1e-2,
    batch_size: BatchOpt = 2,
    seed: SeedOpt = 0,
    resolution: ResolutionOpt = None,
    direct: DirectOpt = False,
    pool_size: PoolOpt = None,
    clip_skip: FitClipSkipOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit everyone a folder or manifest lists who is not registered yet.

    Resumable: run it again after a crash or Ctrl-C and it fits only who is missing. One bad
    person (no face, unreadable photo, name taken) never stops the batch; the table at the end
    says why, and the exit code is 1 when anyone failed. Each person gets the same fit as
    `celebctl add` with the same options. Under torchrun (`torchrun --nproc-per-node 8 -m
    celebctl add-many people/`), accelerate launch or srun, each process fits its share on its
    own GPU.
    """
    from ..fitting import batch

    settings = fitting.FitSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                   resolution=resolution, direct=direct, pool_size=pool_size,
                                   clip_skip=clip_skip)
    options = batch.BatchOptions(model=model, device=device, dtype=dtype, settings=settings,
                                 pack=pack, replace=replace, bundles=bundles,
                                 bundle_basis=with_basis)
    with progress_callback(quiet) as progress:
        result = batch.add_many(source, options, progress=progress, notify=_say)
    if not result.is_main:
        if result.failed:
            raise typer.Exit(EXIT_ERROR)
        return
    _report_batch(result, json_out)
    if result.failed:
        raise typer.Exit(EXIT_ERROR)


def _say(message: str) -> None:
    """A line on stderr while a job waits for its other processes."""
    err.print(cell(message))


def _report_batch(result, json_out: bool) -> None:
    for note in result.notes:
        warn(note)
    if json_out:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "status", "why", "listed at"):
        table.add_column(column, overflow="fold")
    styles = {"added": "green", "skipped": "dim", "failed": "red"}
    for row in result.rows:
        status = cell(row.status)
        status.stylize(styles.get(row.status, ""))
        table.add_row(cell(row.name), status, cell(row.reason), cell(row.where))
    out.print(table)
    summary = result.to_dict()
    rate = f", {summary['people_per_hour']:.0f} people/h" if summary["added"] else ""
    out.print(f"Added {summary['added']}, skipped {summary['skipped']}, failed "
              f"{summary['failed']} in {result.elapsed_s:.1f} s{rate}.")


# Fits write nothing until they finish, so an interrupted one leaves the registry as it was.
add_cmd.interrupt_message = "Interrupted; nothing was written."  # type: ignore[attr-defined]
joint_cmd.interrupt_message = "Interrupted; nothing was written."  # type: ignore[attr-defined]
refit_cmd.interrupt_message = (  # type: ignore[attr-defined]
    "Interrupted; identities refitted before it were written, the rest are as they were.")
add_many_cmd.interrupt_message = (  # type: ignore[attr-defined]
    "Interrupted; everyone added so far is kept. Run the same command again to fit the rest.")


def register(app: CelebTyper) -> None:
    """Attach `add`, `joint`, `add-many` and `refit` to the root app."""
    app.command("add")(add_cmd)
    app.command("joint")(joint_cmd)
    app.command("add-many")(add_many_cmd)
    app.command("refit")(refit_cmd)
