"""Who `add-many` fits: a folder of folders or a CSV/TSV manifest, read and checked without
loading any model.

- A folder of folders: ``people/alice/*.jpg`` -> identity ``alice`` with every photo in
  ``people/alice/`` (sorted by name; hidden files skipped). Files at the top level are ignored.
- A manifest (``.csv`` or ``.tsv``): one person a row, ``name,photo[,photo...]``, photo paths
  relative to the manifest's folder. A first row whose first cell is ``name`` is a header;
  blank rows and rows whose first cell starts with ``#`` are skipped.

A person who cannot be fitted (a bad name, no photo, a missing photo, a symlink loop, a name
listed twice) keeps their row with the reason: one bad person never stops the batch. A source
that cannot be read at all (a FIFO, a device, too big) is an error, before anything else.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CelebctlError, InvalidOption
from .settings import MAX_PHOTOS

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t"}
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_PEOPLE = 1_000_000


@dataclass
class Person:
    """One person of a batch: the identity name, their photos, where they were listed, and
    (when they cannot be fitted) why not."""

    name: str
    photos: list[Path]
    where: str
    problem: str | None = None
    sha256: list[str] = field(default_factory=list)  # of each photo file, once read


def _unreadable(path: Path | str, exc: OSError) -> str:
    """Why ``path`` cannot be used, in the words `add` uses (a loop is named as one)."""
    if exc.errno == errno.ELOOP:
        return f"{path} is a symlink loop; it points back to itself."
    if exc.errno == errno.ENOENT:
        return f"Photo not found: {path}."
    return f"Cannot read {path}: {exc.strerror or exc}."


def _photos_in(folder: Path) -> tuple[list[Path], str | None]:
    """The photos in ``folder``, and why the person cannot be fitted when one is unusable (a
    photo that is a symlink loop, a folder that cannot be listed)."""
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        return [], _unreadable(folder, exc)
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.lower().endswith(PHOTO_SUFFIXES):
            continue
        try:
            is_file = entry.is_file()
        except OSError as exc:
            return found, _unreadable(entry.path, exc)
        if is_file:
            found.append(Path(entry.path))
    return found, None


def _read_folder(source: Path) -> list[Person]:
    people = []
    try:
        entries = sorted(os.scandir(source), key=lambda e: e.name)
    except OSError as exc:
        raise InvalidOption(f"Cannot list {source}: {exc.strerror or exc}.") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir():
                continue
        except OSError as exc:  # a link that loops: that person fails, the others go on
            people.append(Person(entry.name, [], f"{entry.name}/", _unreadable(entry.path, exc)))
            continue
        photos, problem = _photos_in(Path(entry.path))
        people.append(Person(entry.name, photos, f"{entry.name}/", problem))
    if not people:
        raise InvalidOption(f"{source} has no sub-folders: give a folder with one folder of "
                            "photos per person (people/alice/*.jpg), or a .csv/.tsv manifest.")
    return people


def _manifest_rows(source: Path) -> list[tuple[int, list[str]]]:
    from ..storage.special_files import FileRefused, read_regular_file

    try:
        data = read_regular_file(source, MAX_MANIFEST_BYTES)
    except FileRefused as exc:
        fix = ("split it into several manifests" if "larger" in exc.reason else
               "give a .csv/.tsv text file, one person a row")
        raise InvalidOption(f"The manifest {exc}; {fix}.") from None
    except OSError as exc:
        raise InvalidOption(f"Cannot read the manifest {source}: {exc.strerror or exc}.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidOption(f"{source} is not UTF-8 text; save the manifest as UTF-8.") from None
    if "\x00" in text:
        raise InvalidOption(f"{source} is not a text file.")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=MANIFEST_SUFFIXES[
        source.suffix.lower()])
    rows = []
    try:
        for row in reader:
            cells = [cell.strip() for cell in row]
            cells = [cell for cell in cells if cell]
            if not cells or cells[0].startswith("#"):
                continue
            if not rows and reader.line_num and cells[0].lower() == "name":
                rows.append((reader.line_num, []))  # the header: kept as a marker only
                continue
            rows.append((reader.line_num, cells))
            if len(rows) > MAX_PEOPLE:
                raise InvalidOption(f"{source} lists more than {MAX_PEOPLE} people; split it.")
    except csv.Error as exc:
        raise InvalidOption(f"{source} line {reader.line_num}: {exc}.") from None
    return [(line, cells) for line, cells in rows if cells]


def _read_manifest(source: Path) -> list[Person]:
    base = source.parent
    people = []
    for line, cells in _manifest_rows(source):
        name, photos = cells[0], [Path(p) for p in cells[1:]]
        people.append(Person(name, [p if p.is_absolute() else base / p for p in photos],
                             f"{source.name} line {line}"))
    if not people:
        raise InvalidOption(f"{source} lists nobody: one person a row, name,photo[,photo...].")
    return people


def _check_person(person: Person, seen: dict[str, str]) -> None:
    """Set ``person.problem`` to the first thing that stops their fit (no model needed)."""
    from .. import registry

    if person.problem:  # found while listing (a folder or photo that is a symlink loop)
        seen.setdefault(person.name, person.where)
        return
    try:
        registry.validate_name(person.name)
    except CelebctlError as exc:
        person.problem = str(exc)
        return
    if person.name in seen:
        person.problem = f"'{person.name}' is listed twice (also at {seen[person.name]})."
        return
    seen[person.name] = person.where
    if not person.photos:
        person.problem = ("The row lists no photo." if " line " in person.where else
                          "No photo (.jpg, .jpeg, .png, .webp or .bmp).")
    elif len(person.photos) > MAX_PHOTOS:
        person.problem = (f"{len(person.photos)} photos; at most {MAX_PHOTOS} are used for one "
                          "person. Keep the best ones.")
    else:
        for photo in person.photos:
            try:
                st = os.stat(photo)
            except OSError as exc:
                person.problem = _unreadable(photo, exc)
                return
            if not stat.S_ISREG(st.st_mode):
                person.problem = f"{photo} is not a regular file."
                return


def read_people(source: Path | str) -> list[Person]:
    """Everyone ``source`` lists, in its order, each checked as far as no model is needed."""
    source = Path(source)
    try:
        os.stat(source)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidOption(f"{source} is a symlink loop; it points back to itself.") from None
        if exc.errno != errno.ENOENT:
            raise InvalidOption(f"Cannot read {source}: {exc.strerror or exc}.") from None
    if not source.exists():
        raise InvalidOption(f"{source} does not exist: give a folder of folders of photos or "
                            "a .csv/.tsv manifest.")
    if source.is_dir():
        people = _read_folder(source)
    elif source.suffix.lower() in MANIFEST_SUFFIXES:
        people = _read_manifest(source)
    else:
        raise InvalidOption(f"{source} is neither a folder nor a .csv/.tsv manifest.")
    seen: dict[str, str] = {}
    for person in people:
        _check_person(person, seen)
    return people
