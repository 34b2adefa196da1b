"""People per hour: N lone `celebctl add` commands against `celebctl add-many` with `--pack 1`
and with larger packs, side by side in one run, every command a whole process (start-up,
imports and model loading included), each in a fresh data home that already holds the model
and its basis.

The N people are N different photos of the one public-domain test face (mirrored, cropped,
recoloured), so every command fits the same work.

    python benchmarks/bench_batch.py                                   # CPU, tiny, 8 people
    python benchmarks/bench_batch.py --device cuda --model sd15-random --steps 400 --packs 1 4 8
    python benchmarks/bench_batch.py ... --write                       # update docs/benchmarks.md

`--render-steps N` (default 10; 0 skips it) adds images per hour of one `render --prompts`
process against 8 `render` processes of the same prompts (`bench_batch_render.py`'s
measurement), in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_description, write_section  # noqa: E402

PHOTO = ROOT / "tests" / "data" / "astronaut.png"


def make_people(folder: Path, count: int) -> list[tuple[str, Path]]:
    """``count`` photos of the test face, each a little different, one folder each."""
    from PIL import Image, ImageEnhance, ImageOps

    source = Image.open(PHOTO).convert("RGB")
    people = []
    for k in range(count):
        image = ImageOps.mirror(source) if k % 2 else source
        image = ImageEnhance.Brightness(image).enhance(0.8 + 0.05 * (k % 5))
        image = image.crop((4 * k, 0, 512, 512 - 4 * k))
        name = f"person{k:03d}"
        (folder / name).mkdir(parents=True)
        image.save(folder / name / "photo.png")
        people.append((name, folder / name / "photo.png"))
    return people


def celebctl(home: Path, *args: str, timeout: float) -> float:
    """Run one celebctl command as a process; its wall time in seconds."""
    env = dict(os.environ, CELEBCTL_HOME=str(home), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "celebctl", *args, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"celebctl {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def prepared_home(template: Path, into: Path) -> Path:
    """A copy of the data home that holds the model and basis, without identities."""
    shutil.copytree(template, into, ignore=shutil.ignore_patterns("identities"))
    return into


def measure_render(args, tmp: Path) -> list[str]:
    """Images per hour: one `render --prompts` process against one process per prompt."""
    from benchmarks.bench_batch_render import PROMPTS, images_per_hour, measure_processes

    work = tmp / "render"
    work.mkdir()
    env = dict(os.environ, CELEBCTL_HOME=str(prepared_home(tmp / "template", work / "home")),
               HF_HUB_OFFLINE="1")
    batched, separate = measure_processes(args.model, args.render_steps, args.device, work, env)
    n = len(PROMPTS)
    return ["", f"`render --prompts` of {n} prompts x 1 seed, {args.render_steps} DDIM steps: "
            f"{images_per_hour(n, batched):.0f} images/h ({batched:.1f} s) against "
            f"{images_per_hour(n, separate):.0f} images/h for {n} `render` processes "
            f"({separate:.1f} s): **{separate / batched:.2f}x**."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--people", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--render-steps", type=int, default=10)
    parser.add_argument("--skip-lone", action="store_true",
                        help="compare packs only (long fits, where lone adds add nothing new)")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    fit = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
           "--steps", str(args.steps)]
    with tempfile.TemporaryDirectory(prefix="celebctl-bench-batch-") as tmp:
        tmp = Path(tmp)
        people = make_people(tmp / "people", args.people)
        template = tmp / "template"
        # The first add builds the basis and caches the model; it is not counted.
        celebctl(template, "add", "warmup", str(people[0][1]), *fit, timeout=args.timeout)
        rows = []
        if not args.skip_lone:
            home = prepared_home(template, tmp / "lone")
            lone = sum(celebctl(home, "add", name, str(photo), *fit, timeout=args.timeout)
                       for name, photo in people)
            rows.append((f"lone `add` x {args.people}", lone))
        for pack in args.packs:
            home = prepared_home(template, tmp / f"pack{pack}")
            wall = celebctl(home, "add-many", str(tmp / "people"), *fit, "--pack", str(pack),
                            timeout=args.timeout)
            rows.append((f"`add-many --pack {pack}`", wall))
        render_lines = measure_render(args, tmp) if args.render_steps > 0 else []
    per_hour = {label: args.people * 3600 / wall for label, wall in rows}
    pack1 = per_hour.get("`add-many --pack 1`")
    first = rows[0][0]
    best_label = max((r[0] for r in rows if r[0].startswith("`add-many")), key=per_hour.get)
    lines = ["| command | wall s | people / hour | vs first row |", "|---|---|---|---|"]
    for label, wall in rows:
        lines.append(f"| {label} | {wall:.1f} | {per_hour[label]:.0f} | "
                     f"{per_hour[label] / per_hour[first]:.2f}x |")
    summary = {label: round(value, 1) for label, value in per_hour.items()}
    lines.append("")
    if pack1 and not args.skip_lone:
        summary["pack1_vs_lone"] = round(pack1 / per_hour[first], 2)
        lines.append(f"`--pack 1` vs {args.people} lone adds: **{summary['pack1_vs_lone']}x**.")
    if pack1:
        summary["best_pack_vs_pack1"] = round(per_hour[best_label] / pack1, 2)
        lines.append(f"Best pack ({best_label}) vs `--pack 1`: "
                     f"**{summary['best_pack_vs_pack1']}x**.")
    table = "\n".join(lines + render_lines)
    print(table)
    print(json.dumps(summary))
    if args.write:
        body = (f"Machine: {machine_description()}. Model `{args.model}` on {args.device}, "
                f"{args.people} people, {args.steps} steps each, every command a whole process "
                f"(`python benchmarks/bench_batch.py "
                f"{' '.join(sys.argv[1:]).replace('--write', '').strip()}`).\n\n{table}")
        write_section(f"Batch fits: add-many ({args.model}, {args.device}, {args.steps} steps)",
                      body)


if __name__ == "__main__":
    main()
