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
        ("CFG scale", f"{settings['cfg_scale']:g}"),
        ("Seed", str(settings["seed"])),
        ("Size", f"{settings['width']}x{settings['height']}"),
    ]
    if settings.get("model_hash"):
        fields.append(("Model hash", settings["model_hash"]))
    fields.append(("Model", settings["model"]))
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
    """Read back the text chunks celebctl writes: ``{"parameters": str, "celebctl": dict}``."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    data: dict[str, Any] = {"parameters": text.get("parameters")}
    raw = text.get("celebctl")
    data["celebctl"] = json.loads(raw) if raw else None
    return data


def contact_sheet(images: Sequence[Any], columns: int | None = None) -> Any:
    """All images in one picture, row by row (ceil(sqrt(n)) columns), black where empty."""
    from PIL import Image

    if not images:
        raise InvalidOption("No images for a contact sheet.")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return sheet
