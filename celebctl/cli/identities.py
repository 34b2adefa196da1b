"""Registry commands: list, show, remove, rename, path, export, import."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import bundles, paths, registry
from ..errors import CelebctlError, IdentityNotFound
from ..export import export_identity
from ..models import families
from ..prompting import word_name_note
from .common import (
    EXIT_ERROR,
    CelebTyper,
    JsonOpt,
    YesOpt,
    cell,
    err,
    out,
    print_json,
    styled,
    warn,
    warn_if_word,
)
from .completion import identity_names

NameArg = Annotated[str, typer.Argument(help="Identity name, as shown by `celebctl list`.",
                                        autocompletion=identity_names, show_default=False)]


class ExportFormat(str, Enum):
    """What `celebctl export --format` writes."""

    celeb = "celeb"
    a1111 = "a1111"
    diffusers = "diffusers"


def list_cmd(json_out: JsonOpt = False) -> None:
    """List registered identities. Broken entries are reported as warnings."""
    scan = registry.list_identities()
    for message in scan.warnings:
        warn(message)
    if json_out:
        print_json({
            "identities": [ident.summary() for ident in scan.identities],
            "warnings": scan.warnings,
        })
        return
    if not scan.identities:
        out.print("No identities yet. Add one with `celebctl add NAME PHOTO`.")
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "family", "model", "basis", "p", "faces", "updated"):
        # Paths can be long: fold them rather than cut them.
        table.add_column(column, overflow="fold" if column == "model" else "ellipsis",
                         no_wrap=column not in ("model",))
    for ident in scan.identities:
        s = ident.summary()
        table.add_row(
            cell(s["name"]), cell(families.label(s["family"])), cell(s["model"]),
            cell(str(s["basis_id"])[:12]),
            cell(s["components"]), cell(s["faces"]), cell(str(s["updated"])[:16].replace("T", " ")),
        )
    out.print(table)


def show_cmd(name: NameArg, json_out: JsonOpt = False) -> None:
    """Show one identity's metadata (never the embedding values)."""
    ident = registry.get_identity(name, verify="all")
    data = {"name": ident.name, "path": str(ident.path), **ident.meta}
    if json_out:
        print_json(data)
        return
    out.print(styled((ident.name, "bold"), f"  ({ident.path})"))
    _print_tree(data, indent=0, skip={"name", "path"})


def _print_tree(data: dict, indent: int, skip: set[str] = frozenset()) -> None:
    pad = "  " * indent
    for key, value in data.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            out.print(f"{pad}{key}:")
            _print_tree(value, indent + 1)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for number, item in enumerate(value, start=1):  # e.g. one [[sources]] per photo
                out.print(f"{pad}{key} {number}:")
                _print_tree(item, indent + 1)
        else:
            out.print(f"{pad}{key}: {value}")


def remove_cmd(
    name: NameArg,
    yes: YesOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted.")] = False,
) -> None:
    """Delete an identity: coefficients, face crop and face embedding."""
    registry.validate_name(name)
    if not registry.identity_dir(name).exists():
        raise IdentityNotFound(name, registry.known_names())
    folder = registry.identity_dir(name)
    if dry_run:
        out.print(f"Would delete identity '{name}' ({folder}) and every file in it.")
        return
    if not yes:
        try:
            confirmed = typer.confirm(f"Delete identity '{name}' and its face data?", default=False)
        except typer.Abort:
            confirmed = False
        if not confirmed:
            err.print("Nothing deleted. Pass --yes to delete without asking.")
            raise typer.Exit(1)
    ident = registry.remove_identity(name)
    out.print(f"Removed '{ident.name}'.")


def rename_cmd(
    old: Annotated[str, typer.Argument(help="Current name.", autocompletion=identity_names,
                                       show_default=False)],
    new: Annotated[str, typer.Argument(help="New name.", show_default=False)],
) -> None:
    """Rename an identity (prompts then use the new name)."""
    ident = registry.rename_identity(old, new)
    out.print(f"Renamed '{old}' to '{ident.name}'.")
    warn_if_word(ident.name)


def path_cmd() -> None:
    """Print the data home (set CELEBCTL_HOME to move it)."""
    out.print(str(paths.data_home()))


def export_cmd(
    name: NameArg,
    # str, not Path: a trailing slash ("embeddings/") says "a folder" and Path drops it.
    output: Annotated[str, typer.Option("--output", "-o", help=(
        "File to write (`celeb`: NAME.celeb, `a1111`: NAME.safetensors, or an embeddings "
        "folder, existing or ending in /, to write NAME.safetensors in); a folder for "
        "`diffusers`."),
        show_default=False)],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help=(
        "`celeb`: a registry bundle for `celebctl import`; it contains the person's face crop "
        "and face embedding unless --no-face. "
        "`a1111`: a textual-inversion embedding (.safetensors) for the WebUI's or ComfyUI's "
        "embeddings folder; type the file name in WebUI prompts, `embedding:NAME` in ComfyUI. "
        "`diffusers`: a folder with learned_embeds.safetensors for "
        "`pipe.load_textual_inversion(FOLDER)`; prompts say `<NAME>`, lowercase. "
        "`a1111` and `diffusers` hold only the two token vectors, no face data."))
    ] = ExportFormat.celeb,
    no_face: Annotated[bool, typer.Option("--no-face", help=(
        "Leave the face crop and face embedding out of a .celeb bundle (the identity still "
        "renders but cannot be refitted with `joint`)."))] = False,
    with_basis: Annotated[bool, typer.Option("--with-basis", help=(
        "Carry the identity's basis in the .celeb bundle (a few MB), so it renders on a machine "
        "that has neither the basis nor the model to build it."))] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Export an identity for celebctl, the WebUI/ComfyUI or diffusers.

    A `.celeb` bundle contains the person's face crop unless --no-face; the other formats
    contain only the identity's two token vectors.
    """
    if with_basis and fmt is not ExportFormat.celeb:
        raise typer.BadParameter("--with-basis is for .celeb bundles (--format celeb).",
                                 param_hint="--with-basis")
    result = export_identity(name, output, fmt.value, overwrite=force, include_face=not no_face,
                             with_basis=with_basis)
    if json_out:
        print_json(result.to_dict())
        return
    for path in result.files:
        out.print(f"Wrote {path}")
    for line in result.usage:
        out.print(line)


def _import_one(bundle: Path, as_name: str | None, force: bool) -> tuple[object, list[str]]:
    ident, notes = bundles.import_bundle(bundle, new_name=as_name, replace=force)
    word = word_name_note(ident.name)
    return ident, [*notes, word] if word else list(notes)


def import_cmd(
    bundle_paths: Annotated[list[Path], typer.Argument(
        metavar="BUNDLE", help="One or more .celeb bundles (`celebctl import out/*.celeb`).",
        show_default=False)],
    as_name: Annotated[str | None, typer.Option("--as", help="Register under another name "
                                                "(one bundle only).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Import .celeb bundles. Each is checked completely before anything of it is written; with
    several, one that fails is reported and the others are still imported (exit 1 if any
    failed)."""
    if as_name is not None and len(bundle_paths) > 1:
        raise typer.BadParameter("--as renames one bundle; give a single BUNDLE with it.",
                                 param_hint="--as")
    if len(bundle_paths) == 1:
        ident, notes = _import_one(bundle_paths[0], as_name, force)
        for note in notes:
            warn(note)
        if json_out:
            print_json({"name": ident.name, "path": str(ident.path), "notes": notes})
        else:
            out.print(f"Imported '{ident.name}'.")
        return
    imported, failed = [], []
    said: set[str] = set()  # a note shared by several bundles (a missing basis) is said once
    for bundle in bundle_paths:
        try:
            ident, notes = _import_one(bundle, None, force)
        except CelebctlError as exc:
            failed.append({"bundle": str(bundle), "error": str(exc)})
            err.print(styled(("Error:", "bold red"), f" {bundle}: {exc}"))
            continue
        for note in notes:
            if note not in said:
                warn(note)
                said.add(note)
        imported.append({"name": ident.name, "path": str(ident.path), "notes": notes})
        if not json_out:
            out.print(f"Imported '{ident.name}' from {bundle.name}.")
    if json_out:
        print_json({"imported": imported, "failed": failed})
    else:
        out.print(f"Imported {len(imported)} of {len(bundle_paths)} bundles.")
    if failed:
        raise typer.Exit(EXIT_ERROR)


def register(app: CelebTyper) -> None:
    """Attach the registry commands to the root app."""
    app.command("list")(list_cmd)
    app.command("show")(show_cmd)
    app.command("remove")(remove_cmd)
    app.command("rename")(rename_cmd)
    app.command("path")(path_cmd)
    app.command("export")(export_cmd)
    app.command("import")(import_cmd)


__all__ = ["register", "CelebctlError"]
