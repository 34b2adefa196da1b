"""`celebctl doctor`: check the data home and repair what can be repaired without losing data.

:func:`check_home` lists every :class:`Problem`; :func:`run_doctor` with ``fix=True`` applies the
fixes that are safe (they finish or undo interrupted writes, delete temp files and files no
identity names, delete entries that are not readable identities at all, remove symbolic links,
tighten modes) and checks again. An identity whose identity.toml reads fine is never deleted:
a damaged data file is reported with the command to run (`celebctl remove NAME`, re-import).
Only celebctl's own entries of the home are looked at: CELEBCTL_HOME may point at a folder that
also holds the user's files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import documents, paths, registry
from .errors import CelebctlError, CorruptEntry, SchemaError
from .storage import atomic, checksums, filemodes, locking, special_files

# Fixes run in this order: undo or finish interrupted writes before their temp files go.
FIX_ORDER = (
    "interrupted-joint",
    "interrupted-rename",
    "interrupted-replace",
    "temp",
    "uncommitted",
    "unreferenced",
    "invalid",
    "link",
    "mode",
)
RECOVERY_KINDS = frozenset(FIX_ORDER[:3])


@dataclass
class Problem:
    """One thing wrong in the data home. ``fix`` says what --fix does; None: it needs a person."""

    kind: str
    path: Path
    message: str
    fix: str | None = None

    def key(self) -> tuple[str, str]:
        return self.kind, str(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "message": self.message,
                "fix": self.fix}


@dataclass
class DoctorReport:
    """What `doctor` found, what it fixed and what is left."""

    home: Path
    problems: list[Problem] = field(default_factory=list)
    fixed: list[Problem] = field(default_factory=list)
    remaining: list[Problem] = field(default_factory=list)
    fix_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (a missing basis)

    @property
    def healthy(self) -> bool:
        return not self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {
            "home": str(self.home),
            "healthy": self.healthy,
            "problems": [p.to_dict() for p in self.problems],
            "fixed": [p.to_dict() for p in self.fixed],
            "remaining": [p.to_dict() for p in self.remaining],
            "fix_errors": self.fix_errors,
            "notes": self.notes,
        }


def relative_to_home(path: Path, home: Path) -> str:
    """``path`` as shown in messages: relative to the data home when inside it."""
    try:
        return str(path.relative_to(home))
    except ValueError:
        return str(path)


_rel = relative_to_home


def repair_home_modes(quick: bool = False) -> list[tuple[Path, int, int]]:
    """Tighten modes in the data home that let other users read it (every command runs this).

    ``quick`` checks two levels and walks the whole tree only if it finds something there.
    Returns (path, old mode, new mode) for each change.
    """
    return filemodes.repair_home_modes(paths.data_home(), deep=not quick)


# --------------------------------------------------------------------------------------------
# checks


def _check_modes(home: Path) -> list[Problem]:
    return [
        Problem("mode", path,
                f"{_rel(path, home)} has mode {mode:04o}: other users may read it (the registry "
                "holds face crops and face embeddings).",
                f"chmod {wanted:04o}")
        for path, mode, wanted in filemodes.home_loose_modes(home)
    ]


def _leftover_problem(path: Path, home: Path) -> Problem:
    name, rel = path.name, _rel(path, home)
    in_identities = path.parent == paths.identities_dir()
    if in_identities and name.endswith(registry.JOURNAL_SUFFIX):
        return Problem("interrupted-joint", path,
                       f"{rel}: a `joint` refit was interrupted before it committed.",
                       "roll it back: put its identities back as they were")
    if in_identities and registry.RENAME_INFIX in name.partition(atomic.TMP_MARK)[2]:
        old, _, rest = name.partition(atomic.TMP_MARK)
        new = rest[len(registry.RENAME_INFIX):]
        return Problem("interrupted-rename", path,
                       f"{rel}: renaming '{old}' to '{new}' was interrupted.",
                       f"finish it: keep '{new}' if it was committed, then retire '{old}'")
    if in_identities and name.endswith(atomic.TMP_MARK + registry.PENDING_SUFFIX):
        owner = name.partition(atomic.TMP_MARK)[0]
        return Problem("interrupted-replace", path,
                       f"{rel}: replacing '{owner}' was interrupted; files of the unfinished "
                       "write may be left in its folder.",
                       f"delete the files identity.toml of '{owner}' does not name")
    kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
    return Problem("temp", path, f"{rel}: temp {kind} left by an interrupted write.",
                   f"delete the {kind}")


def _check_leftovers(home: Path) -> list[Problem]:
    """Temp files and markers in celebctl's own entries of the home (never elsewhere: the home
    may be a folder that also holds the user's files); a temp folder counts once."""
    found = []
    for entry in filemodes.own_entries(home):
        if atomic.is_temp_name(entry.name):
            found.append(entry)
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(entry):
            for name in list(dirnames):
                if atomic.is_temp_name(name):
                    found.append(Path(dirpath) / name)
                    dirnames.remove(name)
            found += [Path(dirpath) / name for name in filenames if atomic.is_temp_name(name)]
    return [_leftover_problem(path, home) for path in sorted(found)]


def _identity_problems(folder: Path, home: Path) -> list[Problem]:
    name, rel = folder.name, _rel(folder, home)
    remove_hint = f"Run `celebctl remove {name}` and add or import it again."
    toml_path = folder / registry.IDENTITY_TOML
    if not os.path.lexists(toml_path):
        return [Problem("uncommitted", folder,
                        f"{rel} has no identity.toml: a write that never committed (its files "
                        "are not an identity and nothing uses them).", "delete the folder")]
    unusable = "delete the entry: it is not a usable identity (nothing can read it)"
    try:
        raw = documents.parse_toml(special_files.read_regular_file(
            toml_path, registry.MAX_TOML_BYTES, follow_symlinks=False))
    except (OSError, ValueError) as exc:
        return [Problem("invalid", folder,
                        f"{rel}/identity.toml cannot be read or is not a valid document ({exc}). "
                        f"{remove_hint}", unusable)]
    version = raw.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and \
            version > registry.SCHEMA_VERSION:
        return [Problem("schema", folder,
                        f"{rel}/identity.toml uses schema_version {version}, newer than this "
                        f"celebctl understands ({registry.SCHEMA_VERSION}). Upgrade celebctl.")]
    try:
        ident = registry._load_identity_dir(folder, verify="all")
    except SchemaError as exc:
        return [Problem("invalid", folder, f"{exc} {remove_hint}", unusable)]
    except CorruptEntry as exc:
        return [Problem("checksum", folder, f"{exc} {remove_hint}")]
    except OSError as exc:
        return [Problem("invalid", folder, f"{rel} cannot be read ({exc}).")]
    problems = []
    keep = {registry.IDENTITY_TOML} | {e["path"] for e in ident.meta["files"].values()}
    for child in sorted(folder.iterdir()):
        if child.name in keep or atomic.is_temp_name(child.name):
            continue
        problems.append(Problem("unreferenced", child,
                                f"{_rel(child, home)} is not named by identity.toml of "
                                f"'{name}' (left by an interrupted replace).", "delete it"))
    basis_toml = paths.bases_dir() / ident.basis_id / "basis.toml"
    if basis_toml.is_file():
        problems += _basis_mismatch(ident, folder)
    # else: not a problem: the first render builds it (see missing_basis_notes)
    return problems


def missing_basis_notes() -> list[str]:
    """One note per basis that identities use and this machine lacks (an imported bundle's):
    the first render builds it from their model, as `add` does."""
    users: dict[str, list[Any]] = {}
    for ident in registry.list_identities().identities:
        if not (paths.bases_dir() / ident.basis_id / "basis.toml").is_file():
            users.setdefault(ident.basis_id, []).append(ident)
    notes = []
    for basis_id, idents in users.items():
        names = ", ".join(f"'{i.name}'" for i in idents)
        model = str(idents[0].meta.get("model") or "")
        notes.append(
            f"Basis {basis_id} ({names}) is not on this machine yet: the first render builds "
            f"it from {model!r}, the model they were fitted with (or now: `celebctl basis build "
            f"--model {model or 'MODEL'}`; or `celebctl basis fetch` it).")
    return notes


def _basis_mismatch(ident: Any, folder: Path) -> list[Problem]:
    """An identity whose record cannot belong to its basis (another family, other widths or
    component count): render would refuse it with advice that cannot work."""
    from . import basis

    try:
        info = basis.get_basis_info(ident.basis_id)
    except CelebctlError:
        return []  # the basis itself is reported by _check_bases
    problem = basis.identity_mismatch(info, ident.meta)
    if problem is None:
        return []
    return [Problem(
        "basis-mismatch", folder,
        f"'{ident.name}' does not match its basis: {problem}. Its identity.toml was edited or "
        f"came from a damaged bundle; re-import the bundle, or re-add it (`celebctl add "
        f"{ident.name} PHOTO --replace --model MODEL`).")]


def _check_identities(home: Path) -> list[Problem]:
    root = paths.identities_dir()
    if not root.is_dir():
        return []
    problems = []
    for folder in sorted(root.iterdir()):
        if atomic.is_temp_name(folder.name):
            continue
        if folder.is_symlink():
            problems.append(Problem("link", folder, registry.symlink_message(folder),
                                    "delete the link (what it points to is left alone)"))
            continue
        if not folder.is_dir():
            problems.append(Problem(
                "invalid", folder,
                f"{_rel(folder, home)} is not an identity folder; move it out of the data home."))
            continue
        problems += _identity_problems(folder, home)
    return problems


def _check_bases(home: Path) -> list[Problem]:
    from . import basis

    root = paths.bases_dir()
    if not root.is_dir():
        return []
    problems = []
    for folder in sorted(root.iterdir()):
        if atomic.is_temp_name(folder.name):
            continue
        hint = (f"Remove it with `celebctl basis remove {folder.name} --force` and build or "
                "fetch it again.")
        if folder.is_symlink():
            problems.append(Problem("link", folder,
                                    f"{_rel(folder, home)} is a symbolic link; celebctl never "
                                    "follows links in its data home.",
                                    "delete the link (what it points to is left alone)"))
            continue
        if not folder.is_dir():
            problems.append(Problem("invalid", folder,
                                    f"{_rel(folder, home)} is not a basis folder. {hint}"))
            continue
        with contextlib.suppress(OSError, ValueError):
            version = documents.parse_toml(special_files.read_regular_file(
                folder / basis.META_FILE, basis.MAX_META_BYTES, follow_symlinks=False)).get(
                "schema_version")
            if isinstance(version, int) and version > basis.SCHEMA_VERSION:
                problems.append(Problem(
                    "schema", folder,
                    f"{_rel(folder, home)}/{basis.META_FILE} uses schema_version {version}, newer "
                    f"than this celebctl understands ({basis.SCHEMA_VERSION}). Upgrade celebctl."))
                continue
        try:
            info = basis._read_meta(folder)
            digest = checksums.sha256_file(folder / basis.TENSORS_FILE)
        except CelebctlError as exc:
            problems.append(Problem("invalid", folder, f"{exc}"))
            continue
        except OSError as exc:
            problems.append(Problem("checksum", folder,
                                    f"{_rel(folder, home)}/{basis.TENSORS_FILE} cannot be read "
                                    f"({exc.strerror or exc}). {hint}"))
            continue
        if digest != info.tensors_sha256:
            problems.append(Problem("checksum", folder,
                                    f"{_rel(folder, home)}/{basis.TENSORS_FILE} does not match "
                                    f"the checksum in {basis.META_FILE}. {hint}"))
    return problems


def check_home(home: Path | None = None) -> list[Problem]:
    """Every problem in the data home: modes, leftovers of interrupted writes, damaged or
    uncommitted identities, stray files, checksum mismatches, missing bases, unknown schemas."""
    home = home or paths.data_home()
    if not home.exists():
        return []
    others = _check_leftovers(home) + _check_identities(home) + _check_bases(home)
    # A loose mode inside something that --fix deletes anyway is not worth a line of its own.
    doomed = [p.path for p in others if p.kind in ("temp", "uncommitted", "unreferenced")]
    modes = [p for p in _check_modes(home)
             if not any(p.path == d or d in p.path.parents for d in doomed)]
    return modes + others


# --------------------------------------------------------------------------------------------
# fixes


def _apply(problem: Problem) -> None:
    path = problem.path
    if problem.kind == "interrupted-joint":
        registry.roll_back_joint(path)
    elif problem.kind == "interrupted-rename":
        registry.finish_rename(path)
    elif problem.kind == "interrupted-replace":
        registry.finish_pending_replace(path)
    elif problem.kind in ("temp", "unreferenced"):
        atomic.remove_tree(path)
    elif problem.kind in ("uncommitted", "invalid") and path.parent == paths.identities_dir():
        registry.discard_folder(path)
        registry.forget_in_list_cache([path.name])
    elif problem.kind == "link":
        if path.is_symlink():
            atomic.remove_file(path)
    elif problem.kind == "mode":
        if os.path.lexists(path) and not path.is_symlink():
            os.chmod(path, atomic.DIR_MODE if path.is_dir() else atomic.FILE_MODE)


def _apply_all(problems: list[Problem], report: DoctorReport) -> None:
    order = {kind: i for i, kind in enumerate(FIX_ORDER)}
    for problem in sorted(problems, key=lambda p: order.get(p.kind, len(order))):
        if problem.fix is None:
            continue
        try:
            _apply(problem)
        except (OSError, CelebctlError) as exc:
            report.fix_errors.append(f"{_rel(problem.path, report.home)}: {exc}")


def run_doctor(fix: bool = False) -> DoctorReport:
    """Check the data home; with ``fix``, apply the safe fixes and check again.

    Checking alone takes no lock and writes nothing (so it works on a read-only home; while
    another process writes, its temp files show up). Fixing holds the writer lock.
    """
    home = paths.data_home()
    report = DoctorReport(home=home)
    if not home.exists():
        return report
    report.problems = check_home(home)
    report.notes = missing_basis_notes()
    if not fix:
        report.remaining = list(report.problems)
        return report
    with locking.writer_lock(paths.lock_path()):
        # Finishing or undoing an interrupted write changes what else is wrong (a file that
        # looked unreferenced may be named again), so those fixes go first and the rest is
        # checked afresh before it is fixed.
        _apply_all([p for p in check_home(home) if p.kind in RECOVERY_KINDS], report)
        _apply_all([p for p in check_home(home) if p.kind not in RECOVERY_KINDS], report)
        report.remaining = check_home(home)
    left = {p.key() for p in report.remaining}
    report.fixed = [p for p in report.problems if p.fix is not None and p.key() not in left]
    return report
