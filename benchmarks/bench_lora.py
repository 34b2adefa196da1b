"""A render with one fused LoRA next to the same render without, per image, in the same run.

Two copies of the same model are loaded; one gets a LoRA (UNet and text encoder, rank 8, in
kohya keys) fused by its first render and keeps it, so the renders timed afterwards are what
every later render with that LoRA costs. Renders of the two alternate (A B A B ...), so a
busy machine slows both alike; the figure is the ratio of the medians, per image. The one-off
cost of loading and fusing the LoRA is printed apart.

    python benchmarks/bench_lora.py                        # tiny, CPU, 10 steps, 4 images
    python benchmarks/bench_lora.py --repeat 7 --write     # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_description, write_section  # noqa: E402


def make_lora(parts, path: Path, rank: int = 8) -> Path:
    """A random LoRA for every attention projection of ``parts``' UNet and text encoder."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, module, names in (
            ("lora_unet_", parts.unet, {"to_q", "to_k", "to_v", "0"}),
            ("lora_te_", parts.text_encoder, {"q_proj", "k_proj", "v_proj", "out_proj"})):
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.split(".")[-1] in names:
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(
                    rank, layer.in_features, generator=generator) * 0.1
                tensors[f"{key}.lora_up.weight"] = torch.randn(
                    layer.out_features, rank, generator=generator) * 0.1
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def unet_calls(plain, fused, count: int) -> tuple[float, float, float]:
    """Median seconds of one UNet call without and with the fused LoRA, and the median ratio
    of alternating pairs: the per-step cost alone, without encoding, decoding or PNG writes.
    (SD 1.x/2.x UNets: SDXL's also wants its added conditions.)"""
    import torch

    if plain.family == "sdxl":
        return math.nan, math.nan, math.nan

    size = plain.default_resolution // 8
    sample = torch.randn(2, plain.unet.config.in_channels, size, size)
    states = torch.randn(2, 77, plain.unet.config.cross_attention_dim)
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for index in range(count):
            for which in ((0, 1) if index % 2 else (1, 0)):
                unet = (plain, fused)[which].unet
                started = time.perf_counter()
                unet(sample, torch.tensor(500), encoder_hidden_states=states)
                times[which].append(time.perf_counter() - started)
    ratio = statistics.median(b / a for a, b in zip(times[0], times[1], strict=True))
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40, help="UNet calls timed of each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CELEBCTL_HOME", str(Path(tmp) / "home"))
        from celebctl import models, rendering

        plain = models.load_pipeline_components(args.model, args.device, "fp32")
        fused = models.load_pipeline_components(args.model, args.device, "fp32")
        lora = make_lora(plain, Path(tmp) / "style.safetensors")
        out = Path(tmp) / "out"

        def render(parts, loras) -> float:
            started = time.perf_counter()
            rendering.render_prompt("a lighthouse on a cliff at dusk", steps=args.steps,
                                    num_images=args.images, batch_size=args.images, seed=1,
                                    components=parts, out_dir=out, loras=loras)
            return (time.perf_counter() - started) / args.images

        render(plain, [])  # warm-up
        started = time.perf_counter()
        render(fused, [f"{lora}:0.8"])  # loads and fuses the LoRA once
        first = time.perf_counter() - started
        calls = unet_calls(plain, fused, args.calls)
        without, with_lora = [], []
        for index in range(args.repeat):  # which goes first alternates too
            if index % 2:
                with_lora.append(render(fused, [f"{lora}:0.8"]))
            without.append(render(plain, []))
            if not index % 2:
                with_lora.append(render(fused, [f"{lora}:0.8"]))
    a, b = statistics.median(without), statistics.median(with_lora)
    # On a shared machine the load drifts between renders: each pair's ratio, and the fastest
    # render of each kind (the least disturbed), say more than the medians alone.
    pairs = statistics.median(w / p for w, p in zip(with_lora, without, strict=True))
    lines = [
        f"Machine: {machine_description()}",
        f"Model {args.model}, {args.device}, {args.steps} steps, {args.images} images per "
        f"render, {args.repeat} alternating renders of each:",
        f"- without LoRA:        median {a:.3f} s per image, fastest {min(without):.3f} s",
        f"- with one fused LoRA: median {b:.3f} s per image, fastest {min(with_lora):.3f} s",
        f"- ratio (with / without): {pairs:.3f} median of the pairs, {b / a:.3f} of the "
        f"medians, {min(with_lora) / min(without):.3f} of the fastest (target: within 10 %)",
        f"- first render with the LoRA (loading and fusing it included): {first:.2f} s for "
        f"{args.images} images",
        f"- one UNet call (batch of 2, the denoising step's work), {args.calls} alternating "
        f"calls of each: {calls[0] * 1000:.1f} ms without, {calls[1] * 1000:.1f} ms with "
        f"(medians); ratio {calls[2]:.3f} median of the pairs",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("LoRA: a fused LoRA per image (bench_lora.py)",
                      "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))


if __name__ == "__main__":
    main()
