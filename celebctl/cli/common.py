"""Pieces every command group shares: the Typer factory, error handling, option aliases."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import CelebctlError

# Progress bars and notes go to stderr so stdout stays clean for --json and paths.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    """True when CELEBCTL_DEBUG asks for tracebacks."""
    return os.environ.get("CELEBCTL_DEBUG", "") not in ("", "0", "false", "no")


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CelebctlError into `Error: ...` on stderr + exit 1, Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CelebctlError as exc:
            if debug_enabled():
                raise
            err.print(f"[bold red]Error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err.print(getattr(func, "interrupt_message", "Interrupted."))
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


class CelebTyper(typer.Typer):
    """A Typer whose commands all go through :func:`handle_errors`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:  # type: ignore[override]
        register = super().command(*args, **kwargs)

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            register(handle_errors(func))
            return func

        return decorator


def typer_factory(help: str, **kwargs: Any) -> CelebTyper:
    """Every command group gets the same settings."""
    return CelebTyper(
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
        **kwargs,
    )


def print_json(data: Any) -> None:
    """Write JSON to stdout (plain, no rich markup, one document)."""
    # Indented for a person at a terminal; compact (and C-encoded, much faster) for pipes.
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A warning on stderr."""
    err.print(f"[yellow]Warning:[/] {message}", markup=True, highlight=False)


# Shared option aliases.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face repo id, local diffusers folder, single-file .safetensors checkpoint, "
        "`tiny` (built-in, offline) or `sd15-random`. Default: config, else SD 1.5.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (fp16/bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]


class LazyModule:
    """A core module imported on first use, so `celebctl list` does not pay for `render`."""

    def __init__(self, name: str):
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
