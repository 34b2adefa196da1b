"""`celebctl eval NAME --images DIR`: score images made anywhere against identities.

Images from the WebUI, ComfyUI, diffusers (with `export`) or `render` itself get the same two
numbers as the prompt-set run: identity similarity (faces found, matched to the identities,
cosine with their stored embeddings) and prompt similarity (CLIP) against ``--prompt`` or the
prompt the image carries in its WebUI ``parameters`` (PNG text chunk; EXIF UserComment in the
WebUI's JPEG and WebP files). Nothing is rendered and nothing is recorded.

The folder's files are read in name order, without subfolders and hidden files (names that
start with "."). Each file is decoded by :func:`celebctl.faces.load_photo` (regular files
only, symlinks followed, bombs and damaged files refused); a file that cannot be read is a
skipped row with the reason, not an error. celebctl's own contact sheets are skipped too.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CelebctlError, InvalidOption, PhotoError
from ..infotext import parse_parameters
from . import sheets
from .scoring import check_face_embeddings, load_face_references, mean, score_image

MAX_FOLDER_FILES = 10_000
MAX_SHEET_IMAGES = 200
SHEET_COLUMNS = 6
GENERIC = "a person"
PROMPT_FROM_OPTION = "--prompt"
PROMPT_FROM_FILE = "parameters"

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class ScoredImage:
    """One file of the folder: its scores, or why it was skipped."""

    file: str
    path: Path
    skipped: str | None = None
    faces: int = 0
    identity: dict[str, float | None] = field(default_factory=dict)
    told_apart: bool | None = None
    prompt: str | None = None
    prompt_source: str | None = None  # PROMPT_FROM_OPTION, PROMPT_FROM_FILE or None
    clip_text: str | None = None
    prompt_similarity: float | None = None
    sampler: str | None = None  # from the image's parameters, the WebUI's names
    schedule_type: str | None = None
    clip_skip: int | None = None  # from the image's parameters (None: it has none)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "path": str(self.path), "skipped": self.skipped,
                "faces": self.faces, "identity": self.identity, "told_apart": self.told_apart,
                "prompt": self.prompt, "prompt_source": self.prompt_source,
                "clip_text": self.clip_text, "prompt_similarity": self.prompt_similarity,
                "sampler": self.sampler, "schedule_type": self.schedule_type,
                "clip_skip": self.clip_skip}


@dataclass
class FolderResult:
    """Everything `celebctl eval --images` measured."""

    names: list[str]
    folder: Path
    clip: str | None
    images: list[ScoredImage]
    sheet: Path | None
    created: str
    notes: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[ScoredImage]:
        return [r for r in self.images if r.skipped is None]

    def summary(self) -> dict[str, Any]:
        """Means over the images that were read (same keys as the prompt-set run's summary)."""
        rows = self.scored
        out: dict[str, Any] = {"files": len(self.images), "images": len(rows),
                               "skipped": len(self.images) - len(rows)}
        for name in self.names:
            values = [r.identity.get(name) for r in rows]
            out[f"identity_similarity.{name}"] = mean(values)
            out[f"miss_rate.{name}"] = (sum(v is None for v in values) / len(values)
                                        if values else None)
        out["prompt_similarity"] = mean([r.prompt_similarity for r in rows])
        out["with_prompt"] = sum(r.prompt is not None for r in rows)
        if len(self.names) > 1:
            apart = [r.told_apart for r in rows if r.told_apart is not None]
            out["told_apart_rate"] = sum(apart) / len(apart) if apart else None
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready result: the summary and one row per file."""
        return {"names": self.names, "folder": str(self.folder), "clip": self.clip,
                "sheet": str(self.sheet) if self.sheet else None, "created": self.created,
                "notes": self.notes, "summary": self.summary(),
                "images": [r.to_dict() for r in self.images]}


# --------------------------------------------------------------------------------------------
# prompts carried by images


_SETTINGS_LINE = re.compile(r"^\s*Steps:\s*\d+")
# One "Key: value" of a settings line as the WebUI reads it: a key of word characters, spaces,
# dashes or slashes, then a quoted value or one up to the next comma.
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def is_settings_line(line: str) -> bool:
    """True when the WebUI reads ``line``, the last line of ``parameters``, as its settings:
    three or more ``Key: value`` pairs (whatever the first key), or celebctl's own ``Steps:``."""
    return len(_SETTING.findall(line)) >= 3 or bool(_SETTINGS_LINE.match(line))


def prompt_from_parameters(text: str | None) -> str | None:
    """The prompt of a WebUI ``parameters`` text: the lines before "Negative prompt:" and
    before the settings line (see :func:`is_settings_line`); None when there is none."""
    if not text:
        return None
    lines = text.strip().split("\n")
    if lines and is_settings_line(lines[-1]):
        lines = lines[:-1]
    prompt: list[str] = []
    for line in lines:
        if line.lstrip().startswith(_NEGATIVE):
            break
        prompt.append(line)
    joined = "\n".join(prompt).strip()
    return joined or None


def _exif_comment(image: Any) -> str | None:
    """The EXIF UserComment, where the WebUI writes ``parameters`` in JPEG and WebP files."""
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:  # a malformed EXIF block is just no prompt
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        # The EXIF standard leaves the byte order open; the WebUI (piexif) writes big-endian.
        order = "utf-16-le" if body[1:2] == b"\0" and body[:1] != b"\0" else "utf-16-be"
        return body.decode(order, "replace")
    return body.decode("utf-8", "replace") if head.startswith(b"ASCII") else None


def image_text(data: bytes) -> dict[str, str]:
    """The text an image file carries: PNG text chunks, and the WebUI's EXIF comment as
    ``parameters``. Only the header is parsed (no pixels); unreadable metadata gives {}."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP")) as image:
            text = {k: v for k, v in image.info.items() if isinstance(v, str)}
            if "parameters" not in text and image.format in ("JPEG", "WEBP"):
                comment = _exif_comment(image)
                if comment:
                    text["parameters"] = comment
    except Exception:  # metadata is optional: the pixels were read and checked already
        return {}
    return text


def is_contact_sheet(text: dict[str, str]) -> bool:
    """True for celebctl's own sheets: an eval sheet, or a `render --grid` (JSON "files")."""
    if sheets.SHEET_MARK in text:
        return True
    import json

    try:
        settings = json.loads(text.get("celebctl") or "null")
    except ValueError:
        return False
    return isinstance(settings, dict) and "files" in settings


_TOOL_TAGS = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
_COMFY_EMBEDDING = re.compile(r"\bembedding:(?=[A-Za-z])", re.IGNORECASE)
_NEXT_WORD = re.compile(r"\s*([A-Za-z]+)")


def clip_text_for(prompt: str, names: Sequence[str]) -> str:
    """The text CLIP compares an image with: ``prompt`` without weighting syntax, LoRA tags and
    ComfyUI's "embedding:" prefixes, each identity written "a person" ("alice person riding"
    and "alice riding" -> "a person riding"; "alice woman" -> "a woman"), as the prompt-set run
    does: the identity's name means nothing to CLIP."""
    from .. import prompting
    from ..emphasis import BREAK

    text = _COMFY_EMBEDDING.sub("", _TOOL_TAGS.sub(" ", prompt))
    try:
        parsed = prompting.parse_prompt(text, names)
    except CelebctlError:  # text CLIP can still read (e.g. <someone> unknown here)
        return " ".join(text.split())
    parts: list[str] = []
    for index, seg in enumerate(parsed.segments):
        if seg is BREAK:
            parts.append(" ")
        elif isinstance(seg, prompting.IdentityMention):
            following = parsed.segments[index + 1] if index + 1 < len(parsed.segments) else ""
            word = _NEXT_WORD.match(following) if isinstance(following, str) else None
            noun = word is not None and word.group(1).lower() in prompting.PERSON_NOUNS
            parts.append("a" if noun else GENERIC)
        else:
            parts.append(str(seg))
    return " ".join("".join(parts).split())


# --------------------------------------------------------------------------------------------
# the folder


def list_image_files(folder: str | Path) -> list[Path]:
    """The files of ``folder`` to score, by name: no subfolders, no hidden files."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise InvalidOption(f"--images {folder} does not exist. Give the folder that holds "
                            "the images.")
    if not folder.is_dir():
        raise InvalidOption(f"--images {folder} is a file, not a folder. Give the folder that "
                            "holds the images.")
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        files = [Path(e.path) for e in entries
                 if not e.name.startswith(".") and not _is_folder(e)]
    except OSError as exc:
        raise InvalidOption(f"Cannot list --images {folder}: {exc.strerror or exc}.") from None
    if not files:
        raise InvalidOption(f"--images {folder} holds no files to score (subfolders and "
                            "hidden files are not read). Give the folder that holds the images.")
    if len(files) > MAX_FOLDER_FILES:
        raise InvalidOption(f"--images {folder} holds {len(files):,} files; score at most "
                            f"{MAX_FOLDER_FILES:,} at once (split the folder).")
    return files


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink: a link to a folder is a folder
    except OSError:
        return False


def evaluate_images(names: Sequence[str], folder: str | Path, *, prompt: str | None = None,
                    clip: str | None = None, device: str = "auto",
                    sheet: str | Path | None = None,
                    progress: ProgressCallback | None = None) -> FolderResult:
    """Score every image in ``folder`` against ``names``: faces, identity similarity, and
    prompt similarity (``prompt``, else each image's own WebUI parameters; ``clip`` None skips
    it). Writes a labelled contact sheet to ``sheet`` when given. Names, identities, the
    prompt, the folder and the sheet path are checked before any model loads."""
    from .. import faces, models, prompting, registry
    from ..clipscore import load_clip
    from ..storage import special_files
    from .promptset import check_names

    names = list(names)
    check_names(names)
    for name in names:
        registry.validate_name(name)
    if prompt is not None:
        prompt = prompting.clean_prompt(prompt)
    sheet_target = sheets.check_sheet_path(sheet) if sheet is not None else None
    idents = registry.read_identity_set(names)
    check_face_embeddings(idents)
    files = list_image_files(folder)
    torch_device = models.resolve_device(device)
    scorer = load_clip(clip, torch_device) if clip else None
    references = load_face_references(idents, torch_device)

    rows: list[ScoredImage] = []
    thumbnails: list[Any] = []
    for index, path in enumerate(files):
        if progress is not None:
            progress("score", index, len(files), {})
        try:
            image = faces.load_photo(path, max_side=faces.MAX_DETECTION_SIDE)
            data = special_files.read_regular_file(path, faces.MAX_PHOTO_BYTES)
        except PhotoError as exc:
            reason = str(exc)  # starts with the path; the row names the file already
            if reason.startswith(str(path)):
                reason = path.name + reason[len(str(path)):]
            rows.append(ScoredImage(path.name, path, skipped=reason))
            continue
        except (OSError, special_files.FileRefused) as exc:  # changed since it was decoded
            rows.append(ScoredImage(path.name, path, skipped=f"{path}: {exc}"))
            continue
        text = image_text(data)
        if is_contact_sheet(text):
            rows.append(ScoredImage(path.name, path, skipped="a celebctl contact sheet of "
                                    "other images, not scored"))
            continue
        row = ScoredImage(path.name, path)
        carried = parse_parameters(text.get("parameters"))
        if carried is not None:
            row.sampler, row.schedule_type = carried.sampler, carried.schedule_type
            row.clip_skip = carried.clip_skip
        if prompt is not None:
            row.prompt, row.prompt_source = prompt, PROMPT_FROM_OPTION
        else:
            row.prompt = prompt_from_parameters(text.get("parameters"))
            row.prompt_source = PROMPT_FROM_FILE if row.prompt else None
        scored = score_image(image, references)
        row.faces, row.identity, row.told_apart = scored.faces, scored.matched, scored.told_apart
        if row.prompt is not None:
            row.clip_text = clip_text_for(row.prompt, names)
            if scorer is not None:
                row.prompt_similarity = scorer.similarity([row.clip_text], [image])[0]
        rows.append(row)
        if len(thumbnails) < MAX_SHEET_IMAGES:
            thumbnails.append(sheets.thumbnail(image))
    if progress is not None:
        progress("score", len(files), len(files), {})

    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    result = FolderResult(names=names, folder=Path(folder).expanduser(),
                          clip=scorer.ref if scorer else None, images=rows, sheet=None,
                          created=created)
    scored_rows = result.scored
    unprompted = sum(r.prompt is None for r in scored_rows)
    if scorer is not None and unprompted:
        result.notes.append(
            f"{unprompted} of {len(scored_rows)} image(s) carry no prompt (no WebUI "
            "'parameters'; ComfyUI keeps its prompt inside a workflow graph): no prompt "
            "similarity for them. Pass --prompt TEXT to score them all against one prompt.")
    if sheet_target is not None and thumbnails:
        if len(scored_rows) > MAX_SHEET_IMAGES:
            result.notes.append(f"The contact sheet shows the first {MAX_SHEET_IMAGES} of "
                                f"{len(scored_rows)} images.")
        result.sheet = sheets.write_sheet(_folder_sheet(result, thumbnails), path=sheet_target)
    elif sheet_target is not None:
        result.notes.append("No image could be read, so no contact sheet was written.")
    return result


def _folder_sheet(result: FolderResult, thumbnails: list[Any]) -> bytes:
    """The labelled sheet: a row per prompt, each image captioned with its file and scores."""
    shown = result.scored[:len(thumbnails)]
    labels = [r.prompt if r.prompt is not None else "(no prompt)" for r in shown]
    columns = min(SHEET_COLUMNS, max(labels.count(label) for label in labels))
    cells, row_labels = sheets.grouped_by_label(labels, columns)
    summary = result.summary()
    title = (f"{summary['images']} images in {result.folder.name or result.folder}"
             + (f" ({summary['skipped']} skipped)" if summary["skipped"] else "") + ". Mean: "
             + sheets.summary_text(result.names, summary))
    images = [thumbnails[c] if c is not None else None for c in cells]
    captions = [None if c is None else shown[c].file + "\n" + sheets.caption(
        result.names, shown[c].faces, shown[c].identity, shown[c].prompt_similarity)
        for c in cells]
    return sheets.sheet_png(images, columns, title, row_labels, captions)
