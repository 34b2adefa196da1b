"""The render loop's time per step, this checkout against another (an older commit), side by
side in one run: each side renders 4 images of a plain prompt with the built-in `tiny` model on
the CPU, 60 DDIM steps, three times after a warm-up, in its own process; the processes of the
two sides alternate.

    git worktree add /tmp/celebctl-old <commit>
    python benchmarks/bench_render_step.py --baseline /tmp/celebctl-old [--write]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_description, write_section  # noqa: E402

STEPS = 60
TIMER = r"""
import os, sys, tempfile, time
os.environ["CELEBCTL_HOME"] = tempfile.mkdtemp()
from celebctl import models, rendering
steps = int(sys.argv[1])
parts = models.load_pipeline_components("tiny", "cpu", "fp32")
out = tempfile.mkdtemp()
rendering.render_prompt("a photo of a cat", steps=5, num_images=4, components=parts,
                        out_dir=out, seed=0)
times = []
for seed in (1, 2, 3):
    started = time.perf_counter()
    rendering.render_prompt("a photo of a cat", steps=steps, num_images=4, components=parts,
                            out_dir=out, seed=seed)
    times.append((time.perf_counter() - started) / steps)
print(sorted(times)[1])
"""


def per_step(tree: Path) -> float:
    """The median time per step of one process rendering from the checkout ``tree``."""
    done = subprocess.run([sys.executable, "-c", TIMER, str(STEPS)], cwd="/",
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the older commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    old, new = [], []
    for _ in range(args.rounds):
        old.append(per_step(Path(args.baseline)))
        new.append(per_step(ROOT))
    ratio = statistics.median(n / o for n, o in zip(new, old, strict=True))
    baseline = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or args.baseline
    text = (f"{machine_description()}. `tiny`, CPU, fp32, 4 images of 64 px, {STEPS} DDIM "
            f"steps; the median of three renders per process, {args.rounds} processes a side, "
            "alternating.\n\n| checkout | s per step (each process) |\n|---|---|\n"
            f"| baseline {baseline} | {', '.join(f'{t:.4f}' for t in old)} |\n"
            f"| this checkout | {', '.join(f'{t:.4f}' for t in new)} |\n\n"
            f"This checkout / baseline, median of the pairs: {ratio:.3f} (target: unchanged).\n")
    print(text)
    if args.write:
        write_section("Render loop per step, against an older commit", text)


if __name__ == "__main__":
    main()
