"""The celebctl command line: a thin layer over the core library.

Each command group lives in its own module and is wired here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import basis, doctor, evaluate, fit, identities, render, serve
from .common import out, typer_factory

app = typer_factory(
    help="Put a real person into Stable Diffusion from 1 to 16 face photos (Celeb Basis).\n\n"
    "Identities live in a local registry (see `celebctl path`).",
    add_completion=True,
)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"celebctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:
    """Put a real person into Stable Diffusion from 1 to 16 face photos (Celeb Basis)."""
    doctor.repair_modes_before(ctx.invoked_subcommand)


fit.register(app)
identities.register(app)
doctor.register(app)
render.register(app)
evaluate.register(app)
serve.register(app)
app.add_typer(basis.app, name="basis")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="celebctl")
