"""Fault-injection driver for tests/test_faults.py: one command, many crashes, one fit.

    python tests/fault_driver.py PLAN.json

PLAN is a JSON object::

    {"argv": ["add", "bob", "photo.png", "--replace", ...],   # celebctl arguments
     "variants": {"new": "/path/home-a", "replace": "/path/home-b"},   # pristine data homes
     "workdir": "/path/work",        # case homes, outputs and report.json go here
     "faults": ["kill@*", "ENOSPC@*", "EROFS@1"],
     "seed": 6, "max_points": null}  # null: every checkpoint; N: a seeded sample of N

The command runs in this process up to the registry's writer lock; for `add` and `joint` that
is the expensive part (loading the model, fitting). There the process forks. For each variant
a first child runs the rest of the command with CELEBCTL_FAULT_TRACE set, in a copy of that
variant's home, which counts the checkpoints of its write path. Then, for every fault of the
schedule, a child gets a fresh copy of the home, arms CELEBCTL_FAULT and carries on down the
real write path, exactly as `celebctl` would, until it is killed or fails or finishes. The
parent waits for each child and writes workdir/report.json; it never writes to the pristine
homes. A fault spec "kill@*" expands to kill@1..K (K checkpoints), "ENOSPC@*" to ENOSPC@1..A
(A checkpoints that allocate space).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

from celebctl import registry
from celebctl.storage import faults

SKIP_IN_COPIES = ("models", "cache")  # big or irrelevant to the write path; never touched there


def copy_home(source: Path, target: Path) -> None:
    """A copy of a data home without the model cache (the write path never reads it)."""
    shutil.copytree(source, target, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == source
                                                  and n in SKIP_IN_COPIES])


def read_trace(path: Path) -> list[dict]:
    """Checkpoints from a CELEBCTL_FAULT_TRACE file: [{"n", "kind", "path"}, ...]."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines():
        number, kind, where = line.split(" ", 2)
        rows.append({"n": int(number), "kind": kind, "path": where})
    return rows


def expand_faults(wanted: list[str], trace: list[dict], seed: int, max_points: int | None
                  ) -> list[str]:
    """Turn "kill@*" / "ENOSPC@*" into concrete specs for this write path."""
    rng = random.Random(seed)
    allocating = sum(1 for row in trace if row["kind"] in faults.ALLOCATING_KINDS)
    specs: list[str] = []
    for fault in wanted:
        action, _, at = fault.partition("@")
        if at != "*":
            specs.append(fault)
            continue
        count = len(trace) if action == "kill" else allocating
        points = list(range(1, count + 1))
        if max_points is not None and len(points) > max_points:
            points = sorted(rng.sample(points, max_points))
        specs += [f"{action}@{n}" for n in points]
    return specs


def _wait(pid: int) -> dict:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"status": "killed" if code < 0 else "exited", "code": code}


def _become_case(home: Path, fault: str | None, trace: Path | None, outputs: Path) -> None:
    """In a freshly forked child: point everything at the case and carry on."""
    os.environ["CELEBCTL_HOME"] = str(home)
    os.environ.pop(faults.FAULT_ENV, None)
    os.environ.pop(faults.FAULT_TRACE_ENV, None)
    if fault:
        os.environ[faults.FAULT_ENV] = fault
    if trace:
        os.environ[faults.FAULT_TRACE_ENV] = str(trace)
    faults.reset_fault_counter()
    for fd, suffix in ((1, ".out"), (2, ".err")):
        target = os.open(str(outputs) + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)


def _run_child(home: Path, fault: str | None, trace: Path | None, outputs: Path) -> dict | None:
    """Fork; the child returns None (and goes on with the command), the parent its result."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_case(home, fault, trace, outputs)
        return None
    result = _wait(pid)
    for suffix in (".out", ".err"):
        path = Path(str(outputs) + suffix)
        result["stdout" if suffix == ".out" else "stderr"] = (
            path.read_text("utf-8", errors="replace") if path.exists() else "")
    return result


def fan_out(plan: dict) -> None:
    """Called at the writer lock: run every case in a child; only children return."""
    workdir = Path(plan["workdir"])
    report: dict = {"variants": {}}
    for variant, pristine in plan["variants"].items():
        pristine = Path(pristine)
        base = workdir / variant
        base.mkdir(parents=True, exist_ok=True)
        trace_file = base / "trace.txt"
        copy_home(pristine, base / "trace-home")
        result = _run_child(base / "trace-home", None, trace_file, base / "trace")
        if result is None:
            return
        trace = read_trace(trace_file)
        specs = expand_faults(plan["faults"], trace, plan.get("seed", 0), plan.get("max_points"))
        cases = []
        for index, spec in enumerate(specs):
            home = base / f"case-{index:03d}"
            copy_home(pristine, home)
            outcome = _run_child(home, spec, None, base / f"case-{index:03d}")
            if outcome is None:
                return
            cases.append({"fault": spec, "home": str(home), **outcome})
        report["variants"][variant] = {"pristine": str(pristine), "trace": trace,
                                       "trace_home": str(base / "trace-home"),
                                       "trace_result": result, "cases": cases}
    (workdir / "report.json").write_text(json.dumps(report, indent=1), "utf-8")
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text("utf-8"))
    os.environ["CELEBCTL_HOME"] = next(iter(plan["variants"].values()))
    real_write_lock = registry.writing.write_lock
    forked = []

    @contextlib.contextmanager
    def forking_write_lock():
        if not forked:
            forked.append(True)
            fan_out(plan)  # returns only in a child
        with real_write_lock():
            yield

    registry.writing.write_lock = forking_write_lock  # where the writers look it up
    from celebctl.cli import app

    try:
        app(args=plan["argv"], prog_name="celebctl")
    except SystemExit as exc:
        if not forked:  # the command stopped before it reached the registry
            (Path(plan["workdir"]) / "report.json").write_text(json.dumps(
                {"error": f"never reached the writer lock (exit {exc.code})"}), "utf-8")
            raise
        # A child: skip the interpreter's slow teardown of torch; the exit code is the same.
        sys.stdout.flush()
        sys.stderr.flush()
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        os._exit(code)


if __name__ == "__main__":
    main()
