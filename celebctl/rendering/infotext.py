"""The WebUI's ``parameters`` text read back: the settings line as a dict, and what celebctl
needs from it (clip skip).

The settings line is ``Key: value, Key: value, ...``; a value with a comma, colon or newline is
a JSON string in double quotes (as :func:`celebctl.rendering.images.image_parameters` and the
WebUI write it). The WebUI writes ``Clip skip`` only past 1.
"""

from __future__ import annotations

import json
import re
from typing import Any

# One "Key: value" pair: a key of words (letters, digits, spaces, - and /), then a quoted JSON
# string or everything up to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SETTINGS_LINE = re.compile(r"^\s*Steps:\s*\d+")


def settings_line(parameters: str | None) -> str | None:
    """The last line of a ``parameters`` text when it is a settings line ("Steps: ...")."""
    if not parameters:
        return None
    last = parameters.strip().split("\n")[-1]
    return last if _SETTINGS_LINE.match(last) else None


def parse_settings(parameters: str | None) -> dict[str, str]:
    """The settings of a ``parameters`` text as {key: value} (quoted values unquoted); {} when
    it has no settings line."""
    line = settings_line(parameters)
    if line is None:
        return {}
    settings: dict[str, str] = {}
    for match in _PAIR.finditer(line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        settings[key] = value
    return settings


def clip_skip_of(parameters: str | None) -> int | None:
    """The clip skip an image was drawn at, from its ``parameters``: its ``Clip skip`` (the
    WebUI writes it only past 1), 1 when the settings line has none, None when there is no
    settings line or the value is not a whole number."""
    settings = parse_settings(parameters)
    if not settings:
        return None
    value: Any = settings.get("Clip skip", "1")
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number >= 1 else None
