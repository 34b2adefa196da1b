"""Time building a celeb basis (target: under 10 s for an SD 1.5-shaped table).

Two cases, side by side in one run, each in a fresh data home:
- `tiny`: `build_basis("tiny")` end to end (text-encoder load from the cache, hashing, SVD,
  writing), plus the no-op second call;
- SD 1.5 shape: a seeded random 49,408 x 768 table with the real CLIP tokenizer and the shipped
  names, through `build_basis_for_table` (hashing the 150 MB table, SVD, writing ~3 MB).
Imports and the one-off tiny-model cache build are outside the timed region.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_description, write_section  # noqa: E402

TARGET_S = 10.0


def _median_time(func, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = parser.parse_args()

    import torch

    from celebctl import basis, models

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CELEBCTL_HOME"] = str(Path(tmp) / "home")
        models.ensure_tiny_model()  # the model cache is not part of a basis build
        models.load_text_model("tiny")  # warm the imports

        tiny_build = _median_time(lambda: basis.build_basis("tiny", force=True), args.runs)
        tiny_noop = _median_time(lambda: basis.build_basis("tiny"), args.runs)
        tiny_info = basis.list_bases()[0]

        tokenizer = models.build_clip_tokenizer()
        table = torch.randn(49408, 768, generator=torch.Generator().manual_seed(0)) * 0.02
        names = basis.load_names()
        sd_compute = _median_time(lambda: basis.compute_basis(names, tokenizer, table),
                                  args.runs)
        sd_build = _median_time(
            lambda: basis.build_basis_for_table(table, tokenizer, "sd15-shaped", force=True),
            args.runs)
        sd_info = next(b for b in basis.list_bases() if b.model == "sd15-shaped")

    verdict = "meets" if sd_build < TARGET_S else "MISSES"
    rows = [
        ("`build_basis(\"tiny\")`", tiny_info, tiny_build),
        ("`build_basis(\"tiny\")` again (no-op)", tiny_info, tiny_noop),
        ("`compute_basis`, SD 1.5-shaped table", sd_info, sd_compute),
        ("`build_basis_for_table`, SD 1.5-shaped (hash + compute + write)", sd_info, sd_build),
    ]
    lines = ["| step | table | p | unique rows (pos 1/2) | median (s) |", "|---|---|---|---|---|"]
    for label, info, seconds in rows:
        lines.append(f"| {label} | 49408 x {info.hidden} | {info.components} | "
                     f"{info.unique_rows[0]}/{info.unique_rows[1]} | {seconds:.3f} |")
    body = (
        f"Machine: {machine_description()}\n\n" + "\n".join(lines) + "\n\n"
        f"SD 1.5-shaped build / tiny build: {sd_build / tiny_build:.2f}x. Target under "
        f"{TARGET_S:.0f} s for the SD 1.5-shaped build: {verdict}. Median of {args.runs} runs; "
        "the shipped 646 unique names with the packaged CLIP tokenizer."
    )
    print(body)
    if args.write:
        write_section("Basis build", body)


if __name__ == "__main__":
    main()
