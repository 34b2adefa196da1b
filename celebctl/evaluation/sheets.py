"""The contact sheet of an evaluation: every image, labelled with what was measured on it.

Rows are prompts (the label on the left), each image is captioned with its identity
similarity (or "no face") and its prompt similarity, and a summary line heads the sheet. The
drawing is :func:`celebctl.rendering.contact_sheet`; this module only says what to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidOption

# Images are shrunk to this (longest side) on the sheet: 40 prompts x 16 seeds of 1024 px
# images would otherwise make a picture no viewer opens.
SHEET_IMAGE_SIDE = 256
# A sheet marks itself with this PNG text chunk, so `eval --images` does not score a sheet.
SHEET_MARK = "celebctl-sheet"


def fmt(value: float | None) -> str:
    """A similarity with three decimals, "-" for none."""
    return "-" if value is None else f"{value:.3f}"


def thumbnail(image: Any) -> Any:
    """A copy of ``image`` at most SHEET_IMAGE_SIDE px on its longest side."""
    copy = image.convert("RGB")
    copy.thumbnail((SHEET_IMAGE_SIDE, SHEET_IMAGE_SIDE))
    return copy


def caption(names: Sequence[str], faces: int, identity: dict[str, float | None],
            prompt_similarity: float | None) -> str:
    """What goes under one image: "id 0.871" or "no face" (one identity) or each identity's
    score, then "prompt 0.254" when prompt similarity was measured."""
    if faces == 0:
        first = "no face"
    elif len(names) == 1:
        value = identity.get(names[0])
        first = "id -" if value is None else f"id {value:.3f}"
    else:
        first = ", ".join(f"{name} {fmt(identity.get(name))}" for name in names)
    return first if prompt_similarity is None else f"{first}\nprompt {prompt_similarity:.3f}"


def summary_text(names: Sequence[str], summary: dict[str, Any]) -> str:
    """One identity/miss/prompt summary: "alice: identity 0.812, miss rate 0.250; prompt 0.254"."""
    parts = [f"{name}: identity {fmt(summary.get(f'identity_similarity.{name}'))}, miss rate "
             f"{fmt(summary.get(f'miss_rate.{name}'))}" for name in names]
    parts.append(f"prompt {fmt(summary.get('prompt_similarity'))}")
    if summary.get("told_apart_rate") is not None:
        parts.append(f"told apart {fmt(summary['told_apart_rate'])}")
    return "; ".join(parts)


def grouped_by_label(labels: Sequence[str], columns: int) -> tuple[list[int | None], list[str]]:
    """Cells (an index into ``labels``, or None for an empty cell) and row labels that put
    equal labels on rows of their own, in order of first appearance."""
    order = list(dict.fromkeys(labels))
    cells: list[int | None] = []
    row_labels: list[str] = []
    for label in order:
        members = [i for i, other in enumerate(labels) if other == label]
        for start in range(0, len(members), columns):
            chunk = members[start:start + columns]
            cells += chunk + [None] * (columns - len(chunk))
            row_labels.append(label if start == 0 else f"{label} (continued)")
    return cells, row_labels


def sheet_png(images: Sequence[Any], columns: int, title: str, row_labels: Sequence[str],
              captions: Sequence[str | None]) -> bytes:
    """The labelled sheet as PNG bytes, marked as a sheet (SHEET_MARK holds the title)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from ..rendering import contact_sheet

    sheet = contact_sheet(images, columns=columns, title=title, row_labels=row_labels,
                          captions=captions)
    info = PngInfo()
    info.add_text(SHEET_MARK, title)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def check_sheet_path(path: str | Path) -> Path:
    """``--sheet PATH`` checked before anything loads: a new .png file in an existing folder."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise InvalidOption(f"--sheet {path} must end in .png (the sheet is a PNG image).")
    if not path.parent.is_dir():
        raise InvalidOption(f"--sheet {path}: the folder {path.parent} does not exist. "
                            "Create it first or choose another path.")
    if path.exists() or path.is_symlink():
        raise InvalidOption(f"--sheet {path} already exists; eval never overwrites a file. "
                            "Choose another path.")
    return path


def write_sheet(data: bytes, path: Path | None = None, folder: Path | None = None,
                stem: str = "eval-sheet") -> Path:
    """Write the sheet to ``path`` (checked by :func:`check_sheet_path`) or as a new file
    ``stem.png`` in ``folder``; never replaces a file (a name taken meanwhile gets "-1")."""
    from ..storage import userfiles

    if path is not None:
        return userfiles.write_new_user_file(path.parent, path.stem, path.suffix, data)
    if folder is None:
        raise ValueError("write_sheet needs a path or a folder")
    return userfiles.write_new_user_file(folder, stem, ".png", data)
