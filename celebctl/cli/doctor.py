"""`celebctl doctor`: check the data home, and repair it with --fix."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import paths
from .common import EXIT_ERROR, CelebTyper, JsonOpt, LazyModule, out, print_json, styled, warn

core = LazyModule("celebctl.doctor")

# Commands that must stay fast check two levels of the data home; the others check all of it.
QUICK_COMMANDS = frozenset({"list", "show", "path"})


def repair_modes_before(command: str | None) -> None:
    """Tighten modes in the data home that let other users read it, with a warning.

    Runs before every command but `doctor`, which reports modes itself.
    """
    if command in (None, "doctor"):
        return
    fixed = core.repair_home_modes(quick=command in QUICK_COMMANDS)
    if not fixed:
        return
    home = paths.data_home()
    shown = ", ".join(f"{core.relative_to_home(path, home)} ({old:04o} -> {new:04o})"
                      for path, old, new in fixed[:3])
    more = f" and {len(fixed) - 3} more" if len(fixed) > 3 else ""
    warn(f"Tightened the modes of {len(fixed)} entr{'y' if len(fixed) == 1 else 'ies'} in the "
         f"data home that other users could read: {shown}{more}. celebctl keeps folders 0700 "
         "and files 0600 because the registry holds face crops and face embeddings.")


def _print_problem(problem: core.Problem) -> None:
    out.print(styled("  ", (problem.kind, "bold"), ": ", problem.message))
    if problem.fix:
        out.print(f"    fix: {problem.fix}")
    else:
        out.print("    fix: none; needs you (see above)")


def doctor_cmd(
    fix: Annotated[bool, typer.Option(
        "--fix", help="Apply the safe fixes: finish or undo interrupted writes, delete temp files "
        "and files no identity names, delete entries whose identity.toml cannot be read as an "
        "identity, remove symbolic links (never what they point to), tighten modes. An "
        "identity that reads fine is never deleted: a damaged data file is reported with the "
        "command to run.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check the data home: modes, leftovers of interrupted writes, checksums, missing bases,
    unknown schema versions. Exit code 0 when healthy, 1 when problems remain."""
    report = core.run_doctor(fix=fix)
    if json_out:
        print_json(report.to_dict())
    else:
        _print_report(report, fix)
    if not report.healthy:
        raise typer.Exit(EXIT_ERROR)


def _print_report(report: core.DoctorReport, fix: bool) -> None:
    if fix and report.fixed:
        out.print(f"Fixed {len(report.fixed)} problem{'s' if len(report.fixed) != 1 else ''} "
                  f"in {report.home}:")
        for problem in report.fixed:
            where = core.relative_to_home(problem.path, report.home)
            out.print(f"  {problem.kind}: {problem.fix} ({where})")
    for message in report.fix_errors:
        warn(f"a fix failed: {message}")
    for note in report.notes:
        out.print(styled(("Note:", "bold"), f" {note}"))
    if report.healthy:
        out.print(f"The data home is healthy ({report.home}).")
        return
    count = len(report.remaining)
    out.print(f"{count} problem{'s' if count != 1 else ''} in {report.home}:")
    for problem in report.remaining:
        _print_problem(problem)
    if not fix and any(p.fix for p in report.remaining):
        out.print("Run `celebctl doctor --fix` to apply the fixes listed.")


def register(app: CelebTyper) -> None:
    """Attach `doctor` to the root app."""
    app.command("doctor")(doctor_cmd)
