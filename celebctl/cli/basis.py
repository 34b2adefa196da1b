"""`celebctl basis ...`: build, fetch, list, show and remove celeb bases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    JsonOpt,
    LazyModule,
    ModelOpt,
    QuietOpt,
    YesOpt,
    cell,
    err,
    out,
    print_json,
    styled,
    typer_factory,
    warn,
)
from .completion import basis_ids

core = LazyModule("celebctl.basis")

app = typer_factory(
    help="Celeb bases: the mean and principal directions of celebrity-name token embeddings, "
    "built once per text encoder. Identities are stored as coefficients in a basis."
)

IdArg = Annotated[str, typer.Argument(help="Basis id or an unambiguous prefix of it "
                                            "(see `celebctl basis list`).",
                                       metavar="BASIS_ID", autocompletion=basis_ids,
                                       show_default=False)]


def _percent(value: float) -> str:
    return f"{value:.0%}"


def _variance_lines(info: core.BasisInfo) -> list[str]:
    cum = info.explained_variance_cumulative
    lines = []
    for index, position in enumerate(core.POSITIONS):
        cells = [f"{key}: {_percent(values[index])}" for key, values in cum.items()]
        lines.append(f"position {position} (rank {info.rank[index]}): " + ", ".join(cells))
    return lines


@app.command("build")
def build_cmd(
    model: ModelOpt = None,
    names: Annotated[Path | None, typer.Option(
        "--names", help="Text file with one name per line ('#' comments and blank lines are "
        "ignored). Default: the packaged list of 646 names.", show_default=False)] = None,
    components: Annotated[int, typer.Option(
        "--components", "-p", min=1, help="Directions per token position (capped at the "
        "embedding width).")] = core.DEFAULT_COMPONENTS,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if it exists.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Build the basis for a model's text encoder (loads only the tokenizer and text encoder)."""
    if quiet or json_out or not err.is_terminal:
        # Not a terminal (a log, a pipe): each step as a plain line instead of a spinner.
        info, created = core.build_basis(
            model, names_path=names, components=components, force=force,
            progress=None if quiet or json_out else lambda message: err.print(f"{message} ..."))
    else:
        with err.status(styled("Building basis ...")) as status:
            info, created = core.build_basis(
                model, names_path=names, components=components, force=force,
                progress=lambda message: status.update(styled(f"{message} ...")),
            )
    if json_out:
        print_json({"existed": not created, **info.to_dict()})
        return
    if created:
        err.print(f"Built basis for {info.model}: p = {info.components}, "
                  f"{info.num_names} names, unique rows {info.unique_rows[0]}/"
                  f"{info.unique_rows[1]}.")
    else:
        err.print(f"Basis for {info.model} already exists (use --force to rebuild).")
    out.print(info.id)


@app.command("fetch")
def fetch_cmd(
    source: Annotated[str, typer.Argument(
        help="A local basis folder or basis.safetensors (with basis.toml beside it), an "
        "https:// URL or hf://OWNER/REPO/PATH.", show_default=False)],
    sha256: Annotated[str | None, typer.Option(
        "--sha256", help="Expected sha256 of basis.safetensors.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a basis someone else built; it is checked completely before anything is written."""
    info, created = core.fetch_basis(source, sha256=sha256)
    if json_out:
        print_json({"existed": not created, **info.to_dict()})
        return
    err.print(("Registered" if created else "Already registered:") + f" basis for {info.model}.")
    out.print(info.id)


@app.command("list")
def list_cmd(json_out: JsonOpt = False) -> None:
    """List bases. Broken entries are reported as warnings."""
    bases = core.list_bases()
    for message in bases.warnings:
        warn(message)
    if json_out:
        print_json({"bases": [b.to_dict() for b in bases], "warnings": bases.warnings})
        return
    if not bases:
        out.print("No bases yet. Build one with `celebctl basis build --model MODEL`.")
        return
    table = Table(box=None, header_style="bold")
    for column in ("id", "model", "names", "p", "var@10", "var@100", "var@all", "created"):
        if column == "model":  # paths can be long: fold them rather than drop the column
            table.add_column(column, overflow="fold", min_width=12)
        else:
            table.add_column(column, no_wrap=True)
    for info in bases:
        cum = info.explained_variance_cumulative
        # Cumulative explained variance as "position 1 / position 2".
        cells = ["/".join(_percent(v) for v in cum[key]) for key in ("10", "100", "all")]
        table.add_row(cell(info.id), cell(info.model), cell(info.num_names),
                      cell(info.components), *map(cell, cells),
                      cell(info.created[:16].replace("T", " ")))
    out.print(table)


@app.command("show")
def show_cmd(basis_id: IdArg, json_out: JsonOpt = False) -> None:
    """Show one basis's metadata and its explained-variance summary."""
    info = core.get_basis_info(basis_id, allow_prefix=True)
    if json_out:
        print_json(info.to_dict(full=True))
        return
    data = info.to_dict()
    data.pop("explained_variance_cumulative")
    out.print(styled((info.id, "bold"), f"  ({info.path})"))
    for key, value in data.items():
        if key in ("id", "path"):
            continue
        if isinstance(value, list):
            value = " / ".join(str(v) for v in value)
        out.print(f"  {key}: {value}")
    out.print("  cumulative explained variance:")
    for line in _variance_lines(info):
        out.print(f"    {line}")


@app.command("remove")
def remove_cmd(
    basis_id: IdArg,
    force: Annotated[bool, typer.Option(
        "--force", help="Remove even if identities use it, or if the entry is damaged.")] = False,
    yes: YesOpt = False,
) -> None:
    """Delete a basis. Refused while identities use it, unless --force."""
    if not yes:
        typer.confirm(f"Remove basis {basis_id}?", abort=True, err=True)
    removed = core.remove_basis(basis_id, force=force)
    err.print(f"Removed basis {removed}.")
