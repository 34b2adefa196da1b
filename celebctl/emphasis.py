"""The prompt-weighting syntax Stable Diffusion WebUI users type, parsed by celebctl's own code.

- ``(text)`` multiplies the attention to ``text`` by 1.1, ``((text))`` by 1.21, and so on;
  ``[text]`` divides it by 1.1; ``(text:1.3)`` sets the multiplier to 1.3 (nested groups
  multiply). An unclosed bracket applies to the rest of the prompt, a stray closing one is text.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters.
- ``BREAK`` (the capitalised word on its own) ends the current 75-token chunk.

The result is a list of :class:`Fragment` (text with its weight) and :data:`BREAK` markers.
compel (on the package index) parses a different syntax (``word+``, ``(text)1.3``) and builds
the conditioning itself, with no place for identity slots, so celebctl does not use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1
SQUARE = 1 / 1.1


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text and the attention weight it gets."""

    text: str
    weight: float = 1.0


class _Break:
    """The BREAK keyword: start a new 75-token chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()

_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash
    r"|\\"  # a lone backslash is text
    r"|\("
    r"|\["
    r"|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"  # ":1.3)" closes a round group with a weight
    r"|\)"
    r"|\]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(text: str) -> list[Fragment | _Break]:
    """Split ``text`` into weighted fragments and BREAK markers (adjacent equal weights merged).

    The rules are the WebUI's, written out in the module docstring.
    """
    pieces: list[list] = []  # [text, weight] pairs, weights multiplied in place
    round_starts: list[int] = []
    square_starts: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_starts.append(len(pieces))
        elif token == "[":
            square_starts.append(len(pieces))
        elif match.group(1) is not None and round_starts:
            multiply(round_starts.pop(), float(match.group(1)))
        elif token == ")" and round_starts:
            multiply(round_starts.pop(), ROUND)
        elif token == "]" and square_starts:
            multiply(square_starts.pop(), SQUARE)
        else:
            pieces.append([token, 1.0])
    for start in round_starts:
        multiply(start, ROUND)
    for start in square_starts:
        multiply(start, SQUARE)

    out: list[Fragment | _Break] = []
    for piece_text, weight in pieces:
        parts = _BREAK.split(piece_text)
        for index, part in enumerate(parts):
            if index:
                out.append(BREAK)
            if part:
                if out and isinstance(out[-1], Fragment) and out[-1].weight == weight:
                    out[-1] = Fragment(out[-1].text + part, weight)
                else:
                    out.append(Fragment(part, round(weight, 6)))
    if not any(isinstance(item, Fragment) for item in out):
        return [item for item in out if item is not BREAK] or []
    return out


_SPECIAL = re.compile(r"([()\[\]\\])")


def escape(text: str) -> str:
    """``text`` with brackets and backslashes escaped, so :func:`parse` reads it literally."""
    return _SPECIAL.sub(r"\\\1", text)


def render(fragments: list[Fragment | _Break]) -> str:
    """Fragments back as WebUI text: ``(text:1.21)`` for weighted ones, ``BREAK`` for breaks,
    literal brackets escaped; :func:`parse` of the result gives the same fragments."""
    parts = []
    for item in fragments:
        if item is BREAK:
            parts.append(" BREAK ")
        elif item.weight == 1.0:
            parts.append(escape(item.text))
        else:
            parts.append(f"({escape(item.text)}:{item.weight:.3g})")
    return "".join(parts)
