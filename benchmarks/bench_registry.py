"""Time `celebctl list --json` with 1,000 identities (target: under 0.3 s wall).

Runs the real entry point in a subprocess, so interpreter start-up and imports count, and
reports the median of several runs next to the time of `celebctl --version` (start-up alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_description, write_section  # noqa: E402

TARGET_S = 0.3


def populate(home: Path, count: int) -> None:
    os.environ["CELEBCTL_HOME"] = str(home)
    from celebctl import registry
    from tests.helpers import make_write

    for i in range(count):
        registry.save_identity(make_write(f"id{i:04d}", seed=i))


def time_command(args: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "celebctl", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        populate(home, args.count)
        env = {**os.environ, "CELEBCTL_HOME": str(home)}
        startup = time_command(["--version"], env, args.runs)
        listing = time_command(["list", "--json"], env, args.runs)
    verdict = "meets" if listing < TARGET_S else "MISSES"
    body = (
        f"Machine: {machine_description()}\n\n"
        f"| command | identities | median wall (s) |\n|---|---|---|\n"
        f"| `celebctl --version` (start-up only) | - | {startup:.3f} |\n"
        f"| `celebctl list --json` | {args.count} | {listing:.3f} |\n\n"
        f"`list` / start-up ratio: {listing / startup:.2f}x. Target under {TARGET_S} s: "
        f"{verdict}. Median of {args.runs} runs of the real entry point in a subprocess."
    )
    print(body)
    if args.write:
        write_section("Registry listing", body)


if __name__ == "__main__":
    main()
