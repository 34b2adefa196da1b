"""The WebUI's ``parameters`` text ("infotext") read back: prompt, negative, settings (pure).

The format, as the WebUI writes it and its PNG Info reads it: the prompt (one or more lines),
then a line starting "Negative prompt:" (optional), then one settings line of
``Key: value`` pairs separated by ", ", where a value holding "," or ":" is written as a JSON
string. :func:`celebctl.rendering.image_parameters` writes it; this reads any tool's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from . import samplers

# One "Key: value" pair of the settings line: a quoted value may hold commas and colons.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"
_MIN_PAIRS = 3  # a last line with fewer pairs is prompt text, as the WebUI decides


@dataclass
class Infotext:
    """A parsed ``parameters`` text."""

    prompt: str
    negative_prompt: str
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def sampler(self) -> str | None:
        """The sampler, as celebctl names it ("DPM++ 2M"; an old "DPM++ 2M Karras" split)."""
        return samplers.from_infotext(self.settings)[0]

    @property
    def schedule_type(self) -> str | None:
        """The schedule type ("Karras"), from "Schedule type" or an old combined sampler
        name; None when the text names none (a WebUI before 1.9 wrote none)."""
        return samplers.from_infotext(self.settings)[1]

    @property
    def clip_skip(self) -> int | None:
        """The clip skip the image was drawn at: its ``Clip skip`` (the WebUI writes it only
        past 1), 1 when the settings line has none, None when there is no settings line or
        the value is not a whole number of at least 1."""
        if not self.settings:
            return None
        try:
            number = int(str(self.settings.get("Clip skip", "1")).strip())
        except ValueError:
            return None
        return number if number >= 1 else None


def settings_line(line: str) -> dict[str, str]:
    """The ``Key: value`` pairs of a settings line, quoted values unquoted."""
    out: dict[str, str] = {}
    for key, value in _PAIR.findall(line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def parse_parameters(text: str | None) -> Infotext | None:
    """``text`` split into prompt, negative prompt and settings; None for no text."""
    if not text or not text.strip():
        return None
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if len(_PAIR.findall(lines[-1])) >= _MIN_PAIRS:
        settings = settings_line(lines[-1])
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        if target is prompt and line.lstrip().startswith(_NEGATIVE):
            target = negative
            line = line.lstrip()[len(_NEGATIVE):]
        target.append(line)
    return Infotext(prompt="\n".join(prompt).strip(), negative_prompt="\n".join(negative).strip(),
                    settings=settings)
