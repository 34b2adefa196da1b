"""Start-up of the commands that load no model, each against `python -c pass` and `celebctl list`.

Every command runs as the real entry point in a fresh process, round-robin with the two
references so that a busy machine slows all of them alike; the medians go to
docs/benchmarks.md with `--write`. Target: every light command within 0.5 s of `celebctl list`.

`--check-imports HOME TMP` runs the same commands in this one process instead and prints, as
JSON, the heavy modules (torch, diffusers, facenet_pytorch, transformers' models) loaded after
each: `tests/test_startup.py` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.5
HEAVY = ("torch", "diffusers", "facenet_pytorch", "transformers.models")

# Commands that load no model; run in this order they leave the registry as they found it.
LIGHT_COMMANDS = [
    ["list"],
    ["show", "alice"],
    ["export", "alice", "-o", "{tmp}/alice.celeb", "--force"],
    ["import", "{tmp}/alice.celeb", "--as", "carol", "--force"],
    ["rename", "carol", "dave"],
    ["remove", "dave", "--yes"],
    ["doctor"],
    ["path"],
    ["render", "alice riding a bike", "--dry-run"],
    ["render", "--prompts", "{tmp}/prompts.txt", "--dry-run"],
]


def help_commands() -> list[list[str]]:
    """`--help` of the root and of every command and sub-command."""
    import typer.main

    from celebctl.cli import app

    found = [["--help"]]

    def walk(group, prefix):
        for name, command in sorted(getattr(group, "commands", {}).items()):
            found.append([*prefix, name, "--help"])
            walk(command, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return found


def heavy_modules() -> list[str]:
    return sorted(m for m in sys.modules if m in HEAVY or m.startswith(tuple(h + "." for h in
                                                                              HEAVY)))


def check_imports(home: Path, tmp: Path) -> dict[str, dict]:
    """Run every light command and every --help in this process; the heavy modules after each."""
    from celebctl.cli import app

    os.environ["CELEBCTL_HOME"] = str(home)
    (tmp / "prompts.txt").write_text("alice riding a bike\na castle\n", encoding="utf-8")
    report = {}
    for command in [*LIGHT_COMMANDS, *help_commands()]:
        args = [a.format(tmp=tmp) for a in command]
        try:
            app(args=args, prog_name="celebctl")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        report[" ".join(command)] = {"exit": code, "heavy": heavy_modules()[:5]}
    return report


def prepare_home(home: Path) -> None:
    """A registry with alice fitted on the built-in tiny model (1 step)."""
    env = dict(os.environ, CELEBCTL_HOME=str(home))
    photo = ROOT / "tests" / "data" / "astronaut.png"
    subprocess.run([sys.executable, "-m", "celebctl", "add", "alice", str(photo), "--model",
                    "tiny", "--steps", "1", "--quiet"], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def time_all(home: Path, tmp: Path, runs: int) -> dict[str, float]:
    env = dict(os.environ, CELEBCTL_HOME=str(home), PYTHONPATH=str(ROOT))
    (tmp / "prompts.txt").write_text("alice riding a bike\na castle\n", encoding="utf-8")
    jobs = {"python -c pass": [sys.executable, "-c", "pass"]}
    for command in LIGHT_COMMANDS + [["export", "--help"], ["render", "--help"], ["--help"]]:
        jobs["celebctl " + " ".join(command).replace("{tmp}/", "")] = [
            sys.executable, "-m", "celebctl", *(a.format(tmp=tmp) for a in command)]
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(runs):
        for name, argv in jobs.items():  # round-robin: load on the machine hits all alike
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def table(medians: dict[str, float]) -> str:
    listing = medians["celebctl list"]
    rows = ["| command | median s | vs `python -c pass` | vs `celebctl list` |",
            "|---|---:|---:|---:|"]
    for name, value in medians.items():
        rows.append(f"| `{name.replace('|', '/')}` | {value:.2f} | "
                    f"+{value - medians['python -c pass']:.2f} | {value - listing:+.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--check-imports", nargs=2, metavar=("HOME", "TMP"))
    args = parser.parse_args()
    if args.check_imports:
        print(json.dumps(check_imports(Path(args.check_imports[0]),
                                       Path(args.check_imports[1]))))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_description, write_section

    with tempfile.TemporaryDirectory() as scratch:
        home, tmp = Path(scratch) / "home", Path(scratch)
        prepare_home(home)
        medians = time_all(home, tmp, args.runs)
    listing = medians["celebctl list"]
    slow = [n for n, v in medians.items() if n.startswith("celebctl") and v - listing > TARGET_S]
    verdict = ("every light command within 0.5 s of `celebctl list`" if not slow
               else "more than 0.5 s above `celebctl list`: "
               + ", ".join(f"`{name}`" for name in slow))
    body = (f"Machine: {machine_description()}.\n\nMedian of {args.runs} fresh processes each\n"
            f"(`python benchmarks/bench_startup.py`), run round-robin; {verdict}.\n\n"
            f"{table(medians)}\n")
    print(body)
    if args.write:
        write_section("Start-up of commands that load no model", body)


if __name__ == "__main__":
    main()
