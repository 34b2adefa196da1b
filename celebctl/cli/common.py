"""Pieces every command group shares: the Typer factory, error handling, option aliases."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from ..documents import visible
from ..errors import CelebctlError
from . import helpstyle
from .completion import model_names

helpstyle.apply()


class SafeConsole(Console):
    """A rich console that shows every string literally.

    Strings printed here often come from files strangers made (a bundle's metadata, a photo's
    name, a prompt), so they are never read as rich markup or emoji codes, and their control
    characters are escaped (``\\x1b``) so they cannot drive the terminal. Styling is done with
    :class:`rich.text.Text` objects built by :func:`styled`.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(markup=False, emoji=False, highlight=False, soft_wrap=True, **kwargs)

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs["markup"] = False
        kwargs["emoji"] = False
        kwargs["highlight"] = False
        super().print(*(Text(visible(o)) if isinstance(o, str) else o for o in objects),
                      **kwargs)


def styled(*parts: str | tuple[str, str]) -> Text:
    """A Text from plain strings and (string, style) pairs; every string is shown literally."""
    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(visible(part[0]), style=part[1])
        else:
            text.append(visible(part))
    return text


def cell(value: Any) -> Text:
    """A table cell that shows ``value`` literally (no markup, control characters escaped)."""
    return Text(visible(str(value)))


# Progress bars and notes go to stderr so stdout stays clean for --json and paths.
out = SafeConsole()
err = SafeConsole(stderr=True)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    """True when CELEBCTL_DEBUG asks for tracebacks."""
    return os.environ.get("CELEBCTL_DEBUG", "") not in ("", "0", "false", "no")


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CelebctlError into `Error: ...` on stderr + exit 1, Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .. import registry

        mark = registry.change_mark()
        try:
            return func(*args, **kwargs)
        except CelebctlError as exc:
            if debug_enabled():
                raise
            err.print(styled(("Error:", "bold red"), " ", str(exc)))
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err.print(interrupt_message(func, mark))
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def interrupt_message(func: Callable[..., Any], mark: int) -> str:
    """What to say after Ctrl-C: the registry changes that did take effect, if any, else the
    command's own message."""
    from .. import registry

    done = registry.changes_since(mark)
    if done:
        return ("Interrupted after these changes were committed: " + "; ".join(done) + ". "
                "Nothing else was changed.")
    return getattr(func, "interrupt_message", "Interrupted.")


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
    kwargs.setdefault("add_completion", False)  # the root app turns it on
    return CelebTyper(
        help=help,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
        **kwargs,
    )


def _json_safe(node: Any) -> Any:
    """``node`` with non-finite floats as null (NaN and Infinity are not JSON), iteratively."""
    if isinstance(node, float):
        return node if math.isfinite(node) else None
    if not isinstance(node, (dict, list, tuple)):
        return node
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(node, root, 0)]
    while stack:
        value, parent, key = stack.pop()
        if isinstance(value, dict):
            copy: Any = dict.fromkeys(value)  # keeps the key order
            parent[key] = copy
            stack.extend((v, copy, k) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            copy = [None] * len(value)
            parent[key] = copy
            stack.extend((v, copy, i) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            parent[key] = None
        else:
            parent[key] = value
    return root[0]


def json_text(data: Any, indent: int | None = None) -> str:
    """Strict JSON: ASCII only (every control or non-ASCII character escaped), no NaN."""
    text = json.dumps(_json_safe(data), indent=indent, default=str, ensure_ascii=True,
                      allow_nan=False)
    return text.replace("\x7f", "\\u007f")  # DEL is ASCII, so json leaves it raw


def print_json(data: Any) -> None:
    """Write JSON to stdout (plain, no rich markup, one document)."""
    # Indented for a person at a terminal; compact (and C-encoded, much faster) for pipes.
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json_text(data, indent) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A warning on stderr; the message is shown literally."""
    err.print(styled(("Warning:", "yellow"), " ", message))


def warn_if_word(name: str) -> None:
    """Warn when a valid identity name is also an ordinary word that prompts use."""
    from ..errors import InvalidName
    from ..prompting import word_name_note
    from ..registry import validate_name

    try:
        validate_name(name)
    except InvalidName:
        return  # the command itself reports a bad name
    note = word_name_note(name)
    if note:
        warn(note)


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
        "or a built-in: `tiny`, `tiny-sd2`, `tiny-xl` (offline, random weights), `sd15-random`, "
        "`sdxl-random`. Default: config, else SD 1.5.",
        metavar="MODEL", autocompletion=model_names, show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (fp16/bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
ClipSkipOpt = Annotated[int | None, typer.Option(
    "--clip-skip", help="Read the text encoder N layers from the end, as the WebUI's \"Clip "
    "skip\" (1 = the last layer; 2 for anime and Pony-style checkpoints). Default: the "
    "identities' own, else the config's clip_skip for the model, else 1.", min=1,
    show_default=False)]


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
