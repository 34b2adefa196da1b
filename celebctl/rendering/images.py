"""Image files: names from prompts, PNG metadata (WebUI parameters, celebctl JSON), sheets."""

from __future__ import annotations

import io
import json
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import filehash
from ..errors import InvalidOption, StorageError

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelSpec

DEFAULT_OUT_DIR = Path("renders")
SLUG_MAX_CHARS = 60


def prompt_slug(text: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """A file-name stem from a prompt: lowercase ASCII words joined by '-', never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_chars:
            if not slug:
                slug = word[:max_chars]
            break
        slug = candidate
    return slug or "render"


def _prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidOption(f"--out {out_dir} is a file; give a folder for the images.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from ..storage.atomic import _storage_error

        raise _storage_error(exc, out_dir, user_file=True) from exc
    if not os.access(out_dir, os.W_OK):
        raise StorageError(f"Cannot write to {out_dir}: permission denied. Pick another --out.")
    return out_dir


# --------------------------------------------------------------------------------------------
# metadata


def _quote(value: str) -> str:
    """Quote a WebUI parameter value the way the WebUI does (values with , : or newlines)."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def model_label(spec: ModelSpec) -> str:
    """How a model is named in image metadata: local paths by their last part only, a single
    file without its extension (as the WebUI names checkpoints)."""
    if spec.kind == "single_file" and spec.path is not None:
        return spec.path.stem
    if spec.kind == "folder" and spec.path is not None:
        return spec.path.name
    return spec.ref


def image_parameters(settings: dict[str, Any]) -> str:
    """The WebUI-style ``parameters`` text for one image's settings (see :func:`render_prompt`).

    The prompt lines are what to type in the WebUI with each identity's `export --format a1111`
    file in its embeddings folder: identities by name, with the "person" celebctl added. The
    "Negative prompt:" line is always there, even empty: ComfyUI's import of dropped PNGs
    reads these parameters only when it finds that line. ``pad_conds`` true adds
    "Pad conds: True".
    """
    lines = [settings.get("webui_prompt", settings["prompt"]),
             f"Negative prompt: {settings.get('webui_negative', settings['negative_prompt'])}"]
    fields = [
        ("Steps", str(settings["steps"])),
        ("Sampler", settings["sampler"]),
        *([("Schedule type", settings["schedule_type"])] if settings.get("schedule_type")
          else []),
        ("CFG scale", f"{settings['cfg_scale']:g}"),
        ("Seed", str(settings["seed"])),
        ("Size", f"{settings['width']}x{settings['height']}"),
    ]
    if settings.get("model_hash"):
        fields.append(("Model hash", settings["model_hash"]))
    fields.append(("Model", settings["model"]))
    if settings.get("clip_skip", 1) != 1:
        fields.append(("Clip skip", str(settings["clip_skip"])))  # the WebUI writes it past 1
    if settings.get("loras"):
        # As the WebUI writes it: "Lora hashes: "NAME: HASH, ..."" (its short hash, :mod:`loras`).
        from ..loras import lora_hashes_text

        fields.append(("Lora hashes", lora_hashes_text(settings["loras"])))
    # img2img and the hires fix, under the WebUI's keys ("Size" stays the first pass's).
    if settings.get("denoising_strength") is not None:
        fields.append(("Denoising strength", f"{settings['denoising_strength']:g}"))
    if settings.get("hires_scale") is not None:
        fields += [("Hires upscale", f"{settings['hires_scale']:g}"),
                   ("Hires steps", str(settings["hires_steps"])),
                   ("Hires upscaler", settings["hires_upscaler"])]
    if settings.get("pad_conds"):
        # The shorter of prompt and negative was padded with empty chunks, as the WebUI's
        # "Pad prompt/negative prompt" option does; it writes this then (RenderPlan.pads_conds).
        fields.append(("Pad conds", "True"))
    fields.append(("celebctl", settings["celebctl_version"]))
    if settings.get("basis_id"):
        fields.append(("Basis", settings["basis_id"]))
    if settings.get("identities"):
        fields.append(("Identities", ", ".join(settings["identities"])))
    if settings.get("ti_hashes"):
        # The embeddings as the WebUI lists them: each identity's `export --format a1111` file.
        fields.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest
                                              in settings["ti_hashes"].items())))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def embedding_hashes(names: Sequence[str]) -> dict[str, str]:
    """The WebUI's hash of each identity's `export --format a1111` file (its bytes depend on the
    identity only, so the hash names that file wherever it was exported to)."""
    from ..export import a1111_bytes

    return {name: filehash.embedding_hash(a1111_bytes(name)) for name in names}


def png_bytes(image: Any, settings: dict[str, Any]) -> bytes:
    """Encode a PIL image as PNG with ``parameters`` (WebUI) and ``celebctl`` (JSON) chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image_parameters(settings))  # iTXt when not Latin-1
    info.add_text("celebctl", json.dumps(settings, sort_keys=True, ensure_ascii=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """Read back the text chunks celebctl writes: ``{"parameters": str, "celebctl": dict,
    "settings": dict}`` (the WebUI settings line as {key: value}), with the "sampler" and
    "schedule_type" the parameters name (any tool's, WebUI < 1.9's "DPM++ 2M Karras" split;
    None where they name none)."""
    from PIL import Image

    from ..infotext import parse_parameters

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    data: dict[str, Any] = {"parameters": text.get("parameters")}
    raw = text.get("celebctl")
    data["celebctl"] = json.loads(raw) if raw else None
    parsed = parse_parameters(data["parameters"])
    data["settings"] = dict(parsed.settings) if parsed else {}
    data["sampler"] = parsed.sampler if parsed else None
    data["schedule_type"] = parsed.schedule_type if parsed else None
    return data


# Labelled sheets: dark text on white, a font size that follows the image size.
_SHEET_BACKGROUND = (255, 255, 255)
_SHEET_TEXT = (20, 20, 20)
_SHEET_RULE = (215, 215, 215)
_SHEET_EMPTY = (235, 235, 235)
_ELLIPSIS = "..."


def contact_sheet(images: Sequence[Any], columns: int | None = None, *,
                  title: str | None = None, row_labels: Sequence[str | None] | None = None,
                  captions: Sequence[str | None] | None = None) -> Any:
    """All images in one picture, row by row (ceil(sqrt(n)) columns), black where empty.

    With ``title``, ``row_labels`` or ``captions`` it is a sheet a person can read: the title
    (wrapped) on top, each row's label (one per row, e.g. its prompt; wrapped, and cut with
    "..." when it does not fit) in a column on the left, and each image's caption (one per
    image; a newline separates its lines) under it. In that form an entry of ``images`` may be None:
    an empty cell, so a caller can start a new row. Text is drawn with Pillow's built-in font.
    """
    from PIL import Image

    if not images or all(image is None for image in images):
        raise InvalidOption("No images for a contact sheet.")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    if title is None and row_labels is None and captions is None:
        width, height = images[0].size
        sheet = Image.new("RGB", (columns * width, rows * height))
        for index, image in enumerate(images):
            sheet.paste(image.convert("RGB"),
                        ((index % columns) * width, (index // columns) * height))
        return sheet
    return _labelled_sheet(images, columns, rows, title, row_labels, captions)


def _labelled_sheet(images: Sequence[Any], columns: int, rows: int, title: str | None,
                    row_labels: Sequence[str | None] | None,
                    captions: Sequence[str | None] | None) -> Any:
    from PIL import Image, ImageDraw

    present = [image for image in images if image is not None]
    image_w = max(image.width for image in present)
    image_h = max(image.height for image in present)
    size = min(24, max(12, round(image_w / 22)))
    font = _sheet_font(size)
    line_h = size + max(3, size // 3)
    pad = max(4, size // 2)
    cell_w = max(image_w + pad, 9 * size)  # a gap, and room for "prompt 0.254"
    label_w = 15 * size if row_labels is not None else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def lines_of(text: str | None, width: int, max_lines: int) -> list[str]:
        out: list[str] = []
        for part in (text or "").split("\n"):
            out += _wrap(measure, part, font, width)
        return _cut(measure, out, font, width, max_lines)

    def caption_of(text: str | None, width: int, max_lines: int) -> list[str]:
        # The first line (a file name) gives way: the lines after it (the scores) stay whole.
        first, _, rest = (text or "").partition("\n")
        kept = lines_of(rest, width, max_lines - 1) if rest else []
        return lines_of(first, width, max_lines - len(kept)) + kept

    caption_lines = [caption_of(c, cell_w - 2 * pad, 4)
                     for c in (captions or [None] * len(images))]
    caption_h = max((len(lines) for lines in caption_lines), default=0) * line_h
    row_h = pad + image_h + (pad + caption_h if caption_h else 0) + pad
    sheet_w = label_w + columns * cell_w
    title_lines = lines_of(title, sheet_w - 2 * pad, 8) if title else []
    top = pad + len(title_lines) * line_h + pad if title_lines else 0
    sheet = Image.new("RGB", (sheet_w, top + rows * row_h), _SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, line in enumerate(title_lines):
        draw.text((pad, pad + index * line_h), line, fill=_SHEET_TEXT, font=font)
    for row in range(rows):
        y = top + row * row_h
        draw.line([(0, y), (sheet_w, y)], fill=_SHEET_RULE)
        label = row_labels[row] if row_labels is not None and row < len(row_labels) else None
        label_lines = lines_of(label, label_w - 2 * pad, max(1, (row_h - 2 * pad) // line_h))
        for index, line in enumerate(label_lines if label_w else []):
            draw.text((pad, y + pad + index * line_h), line, fill=_SHEET_TEXT, font=font)
    for index, image in enumerate(images):
        x = label_w + (index % columns) * cell_w
        y = top + (index // columns) * row_h
        if image is None:
            continue
        image_x = x + (cell_w - image.width) // 2
        sheet.paste(image.convert("RGB"), (image_x, y + pad))
        for number, line in enumerate(caption_lines[index]):
            line_w = measure.textlength(line, font=font)
            draw.text((x + (cell_w - line_w) / 2, y + pad + image_h + pad + number * line_h),
                      line, fill=_SHEET_TEXT, font=font)
    return sheet


def _sheet_font(size: int) -> Any:
    """Pillow's built-in font at ``size`` px (Pillow >= 10.1), else its small bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow, or no FreeType
        return ImageFont.load_default()


def _drawable(text: str, font: Any) -> str:
    """``text`` with control and format characters (data from files) shown as "?"; the
    bitmap fallback font only knows Latin-1."""
    from PIL import ImageFont

    out = "".join("?" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") else c
                  for c in text)
    if not isinstance(font, ImageFont.FreeTypeFont):
        out = out.encode("latin-1", "replace").decode("latin-1")
    return out


_WORD_PARTS = re.compile(r"[^-_./]+[-_./]*|[-_./]+")


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Word-wrap ``text`` to ``width`` px; a word wider than a line is split after a dash,
    underscore, dot or slash (file names), and only where none fits, between characters."""
    lines: list[str] = []
    line = ""
    for word in _drawable(text, font).split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for piece in _WORD_PARTS.findall(word):
            if draw.textlength(line + piece, font=font) <= width:
                line += piece
                continue
            if line:
                lines.append(line)
                line = ""
            for char in piece:  # only a piece wider than a line is cut between characters
                if line and draw.textlength(line + char, font=font) > width:
                    lines.append(line)
                    line = ""
                line += char
    if line:
        lines.append(line)
    return lines


def _cut(draw: Any, lines: list[str], font: Any, width: int, max_lines: int) -> list[str]:
    """At most ``max_lines`` lines, the last ending in "..." when something was left out."""
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and draw.textlength(last + _ELLIPSIS, font=font) > width:
        last = last[:-1]
    return lines[:max_lines - 1] + [last.rstrip() + _ELLIPSIS]
