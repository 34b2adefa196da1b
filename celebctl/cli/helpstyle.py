"""Help text in the form command-line users know: `NAME` and `[NAME]` in usage lines, option
values as `INTEGER`, `TEXT`, `PATH` or `[a|b|c]`, and nothing after a flag.

Recent Typer releases (0.2x) print `{name}` for a required argument, a Python type such as
`<bool>` after every flag and `<list[str]>` after arguments. Their parameter classes expose the
pieces as small methods; this module replaces those when they exist and leaves any other Typer
as it is (older releases already print click's forms). `tests/test_completion.py` checks the
result on the installed Typer.
"""

from __future__ import annotations

from typing import Any

# Typer's type labels -> the words click users know.
_WORDS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": "BOOLEAN",
          "path": "PATH", "file": "FILE", "directory": "DIRECTORY", "datetime": "DATETIME"}


def value_word(label: str) -> str:
    """``<int>`` -> ``INTEGER``, ``<a|b>`` -> ``[a|b]``, ``<list[str]>`` -> ``TEXT``."""
    label = label.strip()
    if label.startswith("<") and label.endswith(">"):
        label = label[1:-1]
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    if label in _WORDS:
        return _WORDS[label]
    if "|" in label:
        return f"[{label}]"
    return label.upper() or "VALUE"


def _argument_name(param: Any) -> str:
    return (param.metavar or (param.name or "").upper()) or "ARG"


_argument_display = property(_argument_name)


def _usage_display_name(self: Any) -> str:
    name = _argument_name(self)
    if not self.required:
        name = f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


def _rich_display_name(self: Any) -> str:
    return _argument_name(self) + ("..." if self.nargs != 1 else "")


def _argument_type(self: Any, ctx: Any) -> str | None:
    return None  # the upper-case name already says what goes there


def _option_type(self: Any, ctx: Any) -> str | None:
    if getattr(self, "is_flag", False) or getattr(self, "count", False):
        return None
    if self.metavar is not None:
        return self.metavar
    word = value_word(str(self.display_type(ctx)))
    return word + ("..." if self.nargs != 1 else "")


def apply() -> bool:
    """Patch the installed Typer's help pieces; False when this Typer does not have them."""
    try:
        from typer import core
    except ImportError:  # pragma: no cover - typer is a dependency
        return False
    argument = getattr(core, "TyperArgument", None)
    option = getattr(core, "TyperOption", None)
    needed = ((argument, "_usage_display_name"), (argument, "_rich_display_name"),
              (argument, "display_name_raw"), (argument, "display_type_rich"),
              (option, "display_type_rich"), (option, "display_type"))
    if any(cls is None or not hasattr(cls, attr) for cls, attr in needed):
        return False
    argument.display_name_raw = _argument_display
    argument._usage_display_name = _usage_display_name
    argument._rich_display_name = _rich_display_name
    argument.display_type_rich = _argument_type
    option.display_type_rich = _option_type
    return True
