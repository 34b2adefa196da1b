"""`render --prompts` (8 prompts x 1 seed, batched across prompts) next to 8 separate `render`
calls of the same prompts and seed, in the same run, as images per hour.

Two pairs are timed:

- processes: one `celebctl render --prompts FILE` process against 8 `celebctl render PROMPT`
  processes one after another (what a shell loop does: start-up and model loading each time);
- in process: :func:`rendering.render_prompts_file` against 8 :func:`rendering.render_prompt`
  calls on the same loaded components (batching across prompts alone), median of ``--repeat``.

Plain prompts (no identity), so no fit is needed; the work per image is the same with one.

    python benchmarks/bench_batch_render.py                       # tiny, CPU, 10 steps
    python benchmarks/bench_batch_render.py --steps 20 --repeat 5
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_description  # noqa: E402

PROMPTS = [
    "a lighthouse on a cliff at dusk",
    "a bowl of ramen on a wooden table",
    "an astronaut riding a horse",
    "a watercolor of a fox in the snow",
    "a city street in the rain at night",
    "a portrait of an old sailor, oil painting",
    "a red bicycle leaning on a brick wall",
    "a mountain lake at sunrise",
]


def images_per_hour(images: int, seconds: float) -> float:
    """Throughput of ``images`` made in ``seconds``."""
    return images * 3600.0 / seconds


def _cli(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "celebctl", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure_processes(model: str, steps: int, device: str, work: Path, env: dict[str, str]
                      ) -> tuple[float, float]:
    """Seconds for one `render --prompts` process and for 8 `render` processes."""
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    common = ["--steps", str(steps), "--model", model, "--device", device, "-q"]
    _cli(["render", PROMPTS[0], *common, "-o", str(work / "warm-up")], env)  # model cache
    batched = _cli(["render", "--prompts", str(prompts), *common, "-o", str(work / "p-file")],
                   env)
    separate = sum(_cli(["render", prompt, *common, "-o", str(work / "p-one")], env)
                   for prompt in PROMPTS)
    return batched, separate


def measure_in_process(model: str, steps: int, device: str, work: Path, repeat: int
                       ) -> tuple[float, float]:
    """Median seconds of render_prompts_file and of 8 render_prompt calls, one loaded model."""
    from celebctl import models, rendering

    components = models.load_pipeline_components(model, device, "auto")
    prompts = work / "prompts.txt"
    batched_times, separate_times = [], []
    for run in range(repeat + 1):  # the first run of each warms up and is not counted
        started = time.perf_counter()
        rendering.render_prompts_file(prompts, steps=steps, components=components,
                                      out_dir=work / f"i-file-{run}")
        batched = time.perf_counter() - started
        started = time.perf_counter()
        for prompt in PROMPTS:
            rendering.render_prompt(prompt, steps=steps, components=components,
                                    out_dir=work / f"i-one-{run}")
        separate = time.perf_counter() - started
        if run:
            batched_times.append(batched)
            separate_times.append(separate)
    return statistics.median(batched_times), statistics.median(separate_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = len(PROMPTS)
    with tempfile.TemporaryDirectory(prefix="celebctl-bench-batch-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "CELEBCTL_HOME": str(work / "home"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        os.environ["CELEBCTL_HOME"] = env["CELEBCTL_HOME"]
        proc_file, proc_one = measure_processes(args.model, args.steps, args.device, work, env)
        mem_file, mem_one = measure_in_process(args.model, args.steps, args.device, work,
                                               args.repeat)
    print(f"Machine: {machine_description()}")
    print(f"{n} prompts x 1 seed, {args.model}, {args.steps} DDIM steps, {args.device}")
    print(f"{'':34}{'render --prompts':>20}{'8 x render':>14}{'ratio':>8}")
    for label, batched, separate in (("processes (start-up + load each)", proc_file, proc_one),
                                     (f"in process (median of {args.repeat})", mem_file,
                                      mem_one)):
        print(f"{label:34}{images_per_hour(n, batched):>14,.0f} img/h"
              f"{images_per_hour(n, separate):>8,.0f} img/h"
              f"{separate / batched:>7.2f}x")
        print(f"{'':34}{batched:>18.2f} s{separate:>12.2f} s")


if __name__ == "__main__":
    main()
