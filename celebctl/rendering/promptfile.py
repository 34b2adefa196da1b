"""A prompts file (`celebctl render --prompts FILE`): reading it safely, and its images' names.

The format is the WebUI's "prompts from file" habit, kept literal: one prompt per line, in
UTF-8 (a byte-order mark is allowed). Blank lines and lines whose first non-blank character is
``#`` are skipped, so a file can carry comments; every other line is a prompt as typed
(spaces around it dropped), WebUI weighting syntax included (a line starting with ``--`` is a
prompt too, not the WebUI script's options). Lines are numbered as an editor numbers them
(from 1, skipped lines counted), and line N's image with seed S is named::

    L{N:05d}-s{S:07d}-{slug}.png        e.g. L00003-s0000042-alice-riding-a-bike.png

where slug is the prompt's first words (:func:`images.prompt_slug`, at most 40 characters).
The name depends only on the line number, the seed and the line's text, so a rerun of the same
file finds the images it already wrote; an edited line gets new names.

A file is refused before any model loads when it is not a regular file (a pipe or device
would block or never end), larger than :data:`MAX_FILE_BYTES`, not UTF-8 text (NUL bytes
included), longer than :data:`MAX_LINES` lines, has a line longer than
:data:`MAX_LINE_CHARS` characters, or holds no prompt at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidOption
from .images import prompt_slug

MAX_LINES = 99_999  # so every line number fits the file names' five digits
MAX_LINE_CHARS = 4_000  # far past the longest prompt the 75-token chunks allow in practice
MAX_FILE_BYTES = 64 * 2**20
NAME_SLUG_CHARS = 40
BOM = "\ufeff"


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompts file: its line number (from 1) and its text."""

    number: int
    text: str


def image_name(line: PromptLine, seed: int, plain_text: str | None = None) -> str:
    """The file name of ``line``'s image with ``seed`` (see the module docstring)."""
    slug = prompt_slug(plain_text if plain_text is not None else line.text, NAME_SLUG_CHARS)
    return f"L{line.number:05d}-s{seed:07d}-{slug}.png"


def read_prompts_file(path: str | Path) -> list[PromptLine]:
    """The prompts of ``path``, checked (see the module docstring). Raises InvalidOption."""
    from ..documents import visible
    from ..storage.special_files import FileRefused, read_regular_file

    path = Path(path).expanduser()
    shown = visible(str(path))
    try:
        raw = read_regular_file(path, MAX_FILE_BYTES)
    except FileRefused as exc:
        raise InvalidOption(f"The prompts file {shown} {exc.reason}; give a text file with "
                            "one prompt per line.") from None
    except FileNotFoundError:
        raise InvalidOption(f"There is no prompts file {shown}.") from None
    except PermissionError:
        raise InvalidOption(f"Cannot read the prompts file {shown}: permission denied.") from None
    except OSError as exc:
        raise InvalidOption(f"Cannot read the prompts file {shown}: "
                            f"{exc.strerror or exc}.") from None
    if b"\x00" in raw:
        raise InvalidOption(f"The prompts file {shown} is not text (it contains NUL bytes); "
                            "give a UTF-8 text file with one prompt per line.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InvalidOption(f"The prompts file {shown} is not UTF-8 text (line {line}, byte "
                            f"{exc.start}); save it as UTF-8.") from None
    text = text.removeprefix(BOM)
    # Only \n ends a line (with an optional \r before it), so numbers match an editor's; a
    # final newline does not start another line.
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    if len(rows) > MAX_LINES:
        raise InvalidOption(f"The prompts file {shown} has {len(rows):,} lines; at most "
                            f"{MAX_LINES:,} are allowed. Split it into several files.")
    prompts = []
    for number, row in enumerate(rows, start=1):
        row = row.removesuffix("\r")
        if len(row) > MAX_LINE_CHARS:
            raise InvalidOption(f"Line {number} of the prompts file {shown} has {len(row):,} "
                                f"characters; a prompt may have at most {MAX_LINE_CHARS:,}.")
        stripped = row.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompts.append(PromptLine(number, stripped))
    if not prompts:
        raise InvalidOption(f"The prompts file {shown} holds no prompt (blank lines and lines "
                            "starting with # are skipped); write one prompt per line.")
    return prompts
