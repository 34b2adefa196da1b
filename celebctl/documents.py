"""Parsing TOML and JSON documents that may come from strangers, with hard limits.

A bundle, a fetched basis or a hand-edited registry file is data, and only data of a sane shape
is accepted: bounded size and nesting (a document nested thousands of levels deep makes
recursive parsers and printers fail), finite numbers only (NaN and Infinity are not JSON, and
mean nothing in a fit record) and bounded strings. Every check here is iterative.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_DEPTH = 8
MAX_STRING_CHARS = 4096
MAX_ITEMS = 100_000


# Characters that must never reach a terminal from a stored string: C0 and C1 controls, DEL, the
# Unicode bidirectional overrides and isolates, and the line/paragraph separators.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                        "\u2066-\u2069\u2028\u2029]")


def has_control_chars(text: str) -> bool:
    """True when ``text`` holds a character that could drive a terminal or reorder text."""
    return bool(CONTROL_RE.search(text))


def visible(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``,
    ``\\u202e``), so that it shows literally and cannot drive a terminal."""
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
        if char in named:
            return named[char]
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return CONTROL_RE.sub(escape, text)


class UnsafeDocument(ValueError):
    """A document refused by the limits; the message completes "The file ..."."""


def check_document(data: Any, max_depth: int = MAX_DEPTH,
                   max_string: int = MAX_STRING_CHARS) -> None:
    """Raise UnsafeDocument unless ``data`` is a sane tree of tables, lists and scalars."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    seen = 0
    while stack:
        node, depth, where = stack.pop()
        seen += 1
        if seen > MAX_ITEMS:
            raise UnsafeDocument(f"holds more than {MAX_ITEMS:,} values")
        if isinstance(node, dict):
            if depth >= max_depth:
                raise UnsafeDocument(f"is nested more than {max_depth} levels deep"
                                     + (f" (at {where})" if where else ""))
            for key, value in node.items():
                if not isinstance(key, str) or len(key) > 256:
                    raise UnsafeDocument("has a key that is too long")
                stack.append((value, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(node, list):
            if depth >= max_depth:
                raise UnsafeDocument(f"is nested more than {max_depth} levels deep"
                                     + (f" (at {where})" if where else ""))
            stack.extend((value, depth + 1, f"{where}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise UnsafeDocument(f"has a value that is not a finite number ({node!r} at "
                                     f"{where or 'the top'})")
        elif isinstance(node, str):
            if len(node) > max_string:
                raise UnsafeDocument(f"has a text value of {len(node):,} characters at "
                                     f"{where or 'the top'} (at most {max_string:,})")


# More dots than this in one key is refused before parsing: tomllib's time grows with the square
# of a dotted key's length (30,000 parts: about 15 s), so a 60 KB file could stall a command.
MAX_KEY_DOTS = 64


def _check_dotted_keys(text: str, max_depth: int) -> None:
    """Refuse keys and table headers with absurdly many dotted parts, cheaply and textually."""
    for line in text.splitlines():
        stripped = line.lstrip()
        if "=" in stripped:
            key = stripped.split("=", 1)[0]
        elif stripped.startswith("[") and "," not in stripped:
            key = stripped  # a table header such as [a.b.c]
        else:
            continue
        if key.count(".") > MAX_KEY_DOTS:
            raise UnsafeDocument(f"is nested more than {max_depth} levels deep (a key of "
                                 f"{key.count('.') + 1:,} dotted parts)")


def parse_toml(raw: bytes | str, max_depth: int = MAX_DEPTH,
               max_string: int = MAX_STRING_CHARS) -> dict[str, Any]:
    """Parse TOML text and check it with :func:`check_document`.

    Raises UnsafeDocument for text that is not UTF-8, not TOML, nested too deeply, or holds
    NaN/Infinity or huge strings.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise UnsafeDocument("is not UTF-8 text") from None
    _check_dotted_keys(text, max_depth)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UnsafeDocument(f"is not valid TOML ({exc})") from None
    except RecursionError:
        raise UnsafeDocument(f"is nested more than {max_depth} levels deep") from None
    check_document(data, max_depth=max_depth, max_string=max_string)
    return data


def parse_json(raw: bytes | str, max_depth: int = MAX_DEPTH,
               max_string: int = MAX_STRING_CHARS) -> Any:
    """Parse JSON (refusing NaN/Infinity) and check it with :func:`check_document`."""
    import json

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise UnsafeDocument(f"is nested more than {max_depth} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsafeDocument(f"is not valid JSON ({exc})") from None
    check_document(data, max_depth=max_depth, max_string=max_string)
    return data
