"""The prompt-weighting syntax Stable Diffusion WebUI users type, parsed by celebctl's own code.

- ``(text)`` multiplies the attention to ``text`` by 1.1, ``((text))`` by 1.21, and so on;
  ``[text]`` divides it by 1.1; ``(text:1.3)`` sets the multiplier to 1.3 (nested groups
  multiply). An unclosed bracket applies to the rest of the prompt, a stray closing one is text.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. A backslash before
  any other character, or at the end, is dropped (``cat \\: dog`` is ``cat : dog``), as the WebUI
  drops it; only before a registered identity's name does it stay, for the identity finder to
  read ``\\grace`` as the plain word (``keep_escaped``).
- ``BREAK`` (the capitalised word on its own) ends the current 75-token chunk, also inside a
  weighted group. (There the WebUI sends the word "BREAK" to the text encoder instead, a side
  effect of how it marks breaks; a break is what the person typed it for.)
- A weight is at most ``MAX_WEIGHT`` in size, or PromptError: useful weights lie between about
  0.5 and 1.5, half-precision encodings overflow a little past 100 times their size, and a weight
  past float32's range (about 930 nested brackets) made the image black.

WebUI syntax that celebctl does not implement (prompt editing ``[a:b:n]``, alternation
``[a|b]``, composable ``AND``, extra networks other than LoRAs such as ``<hypernet:name:1>``)
is read by the rules above, as text; :func:`unsupported_syntax` names what a prompt uses, so the
caller can say so. ``<lora:NAME:WEIGHT>`` tags are taken out before (:mod:`celebctl.loras`).

The result is a list of :class:`Fragment` (text with its weight) and :data:`BREAK` markers.
compel (on the package index) parses a different syntax (``word+``, ``(text)1.3``) and builds
the conditioning itself, with no place for identity slots, so celebctl does not use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import PromptError

ROUND = 1.1
SQUARE = 1 / 1.1
# The largest weight (in size) a prompt may give; (text:100) or 49 nested brackets.
MAX_WEIGHT = 100.0
# Weights are stored and compared rounded to this many decimals (float products of 1.1 differ
# in their last bits depending on the order they were multiplied in).
WEIGHT_DECIMALS = 6


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
    r"|\\"  # a lone backslash: dropped unless it marks a plain identity word
    r"|\("
    r"|\["
    r"|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"  # ":1.3)" closes a round group with a weight
    r"|\)"
    r"|\]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(text: str, keep_escaped: Iterable[str] = (), label: str = "prompt"
          ) -> list[Fragment | _Break]:
    """Split ``text`` into weighted fragments and BREAK markers (adjacent equal weights merged).

    The rules are the WebUI's, written out in the module docstring. A backslash stays in the
    text only right before one of the words in ``keep_escaped`` (lowercase identity names).
    Raises PromptError, naming ``label``, for a weight larger than ``MAX_WEIGHT``.
    """
    kept = sorted({name.lower() for name in keep_escaped}, key=len, reverse=True)
    kept_after = (re.compile(rf"(?:{'|'.join(re.escape(n) for n in kept)})(?![\w\-])",
                             re.IGNORECASE) if kept else None)
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
        elif token == "\\":
            # The WebUI drops a backslash that escapes nothing; "\grace" keeps it for the
            # identity finder.
            if kept_after is not None and kept_after.match(text, match.end()):
                pieces.append([token, 1.0])
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

    _check_weights(pieces, label)

    out: list[Fragment | _Break] = []
    last_raw = None  # the unrounded weight of out[-1]: the WebUI merges on exact equality
    for piece_text, raw_weight in pieces:
        weight = round(raw_weight, WEIGHT_DECIMALS)
        parts = _BREAK.split(piece_text)
        for index, part in enumerate(parts):
            if index:
                out.append(BREAK)
                last_raw = None
            if part:
                # ((a))(b:1.21) stays two fragments: 1.1 * 1.1 is 1.2100000000000002, not 1.21.
                if out and isinstance(out[-1], Fragment) and last_raw == raw_weight:
                    out[-1] = Fragment(out[-1].text + part, weight)
                else:
                    out.append(Fragment(part, weight))
                    last_raw = raw_weight
    if not any(isinstance(item, Fragment) for item in out):
        return [item for item in out if item is not BREAK] or []
    return out


def _check_weights(pieces: list[list], label: str) -> None:
    for piece_text, weight in pieces:
        if not piece_text.strip():
            continue  # a weight on nothing changes nothing
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            shown = f"{weight:.4g}" if math.isfinite(weight) else "too large to hold"
            raise PromptError(
                f"The {label} gives {piece_text.strip()[:40]!r} a weight of {shown}; celebctl "
                f"accepts weights from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} (useful ones lie "
                "between about 0.5 and 1.5). Remove some brackets or lower the (text:weight)."
            )


# WebUI syntax celebctl reads as text. Escaped brackets are taken out before these are tried.
_UNSUPPORTED = (
    (re.compile(r"\[[^\[\]]*:[^\[\]]*:\s*[\d.]+\s*\]|\[[^\[\]]*:\s*[\d.]+\s*\]"),
     "prompt editing [from:to:when]"),
    (re.compile(r"\[[^\[\]]*\|[^\[\]]*\]"), "alternation [a|b]"),
    (re.compile(r"\bAND\b"), "composable prompts (AND)"),
    (re.compile(r"<(?:lyco|hypernet)\s*:[^>]*>", re.IGNORECASE),
     "extra networks (<hypernet:...>, <lyco:...>)"),
    # Any other <word:...> tag (<addnet:...>, an extension's): the WebUI hands it to an
    # extension and keeps it out of the text; celebctl would encode it as words.
    (re.compile(r"<(?!(?:lora|lyco|hypernet)\s*:)[A-Za-z_][\w-]*\s*:[^<>]*>", re.IGNORECASE),
     "extension tags (<addnet:...> and other <word:...>)"),
)
_ESCAPED = re.compile(r"\\.")


def unsupported_syntax(text: str) -> list[str]:
    """The WebUI features ``text`` uses that celebctl does not implement (they are read as
    text by :func:`parse`), each named once, in the order of ``_UNSUPPORTED``."""
    plain = _ESCAPED.sub("__", text)
    return [what for pattern, what in _UNSUPPORTED if pattern.search(plain)]


_SPECIAL = re.compile(r"([()\[\]\\])")


def escape(text: str) -> str:
    """``text`` with brackets and backslashes escaped, so :func:`parse` reads it literally."""
    return _SPECIAL.sub(r"\\\1", text)


def format_weight(weight: float) -> str:
    """A weight as the WebUI prompt writes it: up to 4 decimals, no trailing zeros (1.4641, 1.1,
    0.9091)."""
    text = f"{weight:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def render(fragments: list[Fragment | _Break]) -> str:
    """Fragments back as WebUI text: ``(text:1.21)`` for weighted ones (weights to 4 decimals),
    ``BREAK`` for breaks, literal brackets escaped; :func:`parse` of the result gives the same
    fragments, their weights rounded to 4 decimals."""
    parts = []
    for item in fragments:
        if item is BREAK:
            parts.append(" BREAK ")
        elif item.weight == 1.0:
            parts.append(escape(item.text))
        else:
            parts.append(f"({escape(item.text)}:{format_weight(item.weight)})")
    return "".join(parts)
