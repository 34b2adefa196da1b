"""Seconds per fit step and peak memory: celebctl's fit loop next to a reference loop.

The reference is the straightforward way textual-inversion training scripts do it: the VAE
encodes the (augmented) image batch at every step, the whole token-embedding table is the
trainable parameter (AdamW over all of it), and after each step every row except the
identity's two is copied back from a saved original. celebctl's loop encodes a pool of
augmented images once before the loop and trains only the small mapping into the basis.

Both loops run in this one process on the same loaded model, batch and resolution; timings skip
a warm-up step. Peak memory is the highest resident set size (CPU) above the level just before
each loop, sampled every 2 ms, or torch's peak allocated memory on CUDA.

    python benchmarks/bench_fit.py                        # tiny + sd15-random, fp32 + bf16
    python benchmarks/bench_fit.py --models tiny --steps 3
    python benchmarks/bench_fit.py --write                # update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_description, write_section  # noqa: E402

PHOTO = Path(__file__).resolve().parent.parent / "tests" / "data" / "astronaut.png"


class PeakMemory:
    """Peak memory above the level at start, for CPU (RSS sampling) or CUDA (allocator)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch

        gc.collect()
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
        return False


def _trim_heap() -> None:
    """Ask glibc to return freed memory so the next loop's baseline is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reference_loop(components, pixel_pool, template_ids, placeholder_ids, steps, batch_size,
                   lr, seed):
    """Textual-inversion-style loop; returns seconds per step (after one warm-up step).

    Every text encoder's whole token-embedding table is trained (for SDXL both, with the
    pooled embedding and time ids as added conditions), and all rows but the placeholders'
    are copied back after each step.
    """
    import torch
    import torch.nn.functional as F

    from celebctl.models import families
    from celebctl.models.convolutions import fit_convolutions

    device, dtype = components.device, components.dtype
    unet, vae, encoders = components.unet, components.vae, components.text_encoders
    scheduler = components.scheduler
    embeddings = [e.get_input_embeddings() for e in encoders]
    originals = [m.weight.detach().clone() for m in embeddings]
    for module in embeddings:
        module.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([m.weight for m in embeddings], lr=lr)
    keep = torch.ones(originals[0].shape[0], dtype=torch.bool, device=originals[0].device)
    keep[placeholder_ids] = False
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    scaling = float(vae.config.scaling_factor)
    use_autocast = dtype != torch.float32
    stamps = []
    # The same convolution kernels as celebctl's fit of this model, so that the ratio measures
    # the loops and not the kernel choice (models/convolutions.py).
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_side = pixel_pool[0].shape[-1] // vae_scale
    try:
        with fit_convolutions(unet, device, dtype, latent_side):
            for _ in range(steps + 1):
                picks = [rng.randrange(len(pixel_pool)) for _ in range(batch_size)]
                images = torch.stack([pixel_pool[i] for i in picks]).to(device, dtype) * 2 - 1
                ids = torch.stack([template_ids[rng.randrange(len(template_ids))]
                                   for _ in range(batch_size)]).to(device)
                with torch.no_grad():
                    latents = vae.encode(images).latent_dist.sample() * scaling
                noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
                t = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
                noisy = scheduler.add_noise(latents.float(), noise.float(), t)
                with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                    states, pooled = families.encode(components.family, encoders,
                                                     [ids] * len(encoders))
                    size = latents.shape[-1] * vae_scale
                    added = families.added_conditions(components.family, pooled, size, size,
                                                      dtype) if pooled is not None else None
                    pred = unet(noisy.to(dtype), t, states.to(dtype),
                                added_cond_kwargs=added).sample
                loss = F.mse_loss(pred.float(), noise.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for module, original in zip(embeddings, originals, strict=True):
                        module.weight[keep] = original[keep]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
    finally:
        with torch.no_grad():
            for module, original in zip(embeddings, originals, strict=True):
                module.weight.copy_(original)
                module.weight.requires_grad_(False)
        del optimizer
    return (stamps[-1] - stamps[0]) / steps


def untimed_lead(device_type: str) -> int:
    """Steps celebctl's fit runs before the timed window opens: its first loss report.

    The fit reports every step on a CPU but only every REPORT_EVERY_GPU steps on CUDA (one
    host sync each), and on CUDA it first runs WARMUP_STEPS eager steps and captures the graph.
    Timing starts at the first report after all of that, so the window holds only steady
    steps; the fit runs ``untimed_lead + steps`` steps and the window is exactly ``steps``.
    """
    from celebctl.fitstep import WARMUP_STEPS
    from celebctl.fitting import REPORT_EVERY_GPU

    if device_type != "cuda":
        return 1
    every = REPORT_EVERY_GPU
    return every * -(-(WARMUP_STEPS + 1) // every)  # first report after warm-up and capture


def celebctl_loop(components, basis_mean, basis_components, face, encoder, steps, batch_size,
                  lr, seed, resolution, pool_size, capture=True):
    """celebctl's fit; returns (seconds per step in the timed window, pool seconds, whether
    the step ran as a CUDA graph).

    The window runs from the first loss report after warm-up (and capture) to the last one and
    holds ``steps`` steps (:func:`untimed_lead`).
    """
    import torch

    from celebctl.fitting import FitSettings, FitSubject, fit_identities

    if steps < 1:
        raise ValueError("steps must be at least 1")
    stamps = []

    def progress(phase, done, total, info):
        if phase == "fit":
            if components.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append((done, time.perf_counter()))

    lead = untimed_lead(components.device.type)
    settings = FitSettings(steps=lead + steps, batch_size=batch_size, lr=lr, seed=seed,
                           resolution=resolution, pool_size=pool_size, capture=capture)
    result = fit_identities(components, basis_mean, basis_components,
                            [FitSubject("bench", face)], encoder, settings, progress)
    opened = [(done, t) for done, t in stamps if done >= lead]
    if len(opened) < 2 or opened[-1][0] - opened[0][0] < 1:
        raise RuntimeError(f"the fit reported at steps {[d for d, _ in stamps]}: no timed window "
                           f"after the {lead} untimed steps")
    (first_done, first_t), (last_done, last_t) = opened[0], opened[-1]
    return (last_t - first_t) / (last_done - first_done), result.pool_time_s, result.captured


def bench_model(model: str, dtype_name: str, device_name: str, steps: int, batch_size: int,
                resolution: int | None, pool_size: int, repeats: int = 1) -> dict:
    from celebctl import basis, faces, models
    from celebctl.augment import augment_crop as _augment
    from celebctl.augment import paste_on_black as _paste
    from celebctl.augment import pil_to_tensor as _pil_to_tensor
    from celebctl.captions import CAPTION_TEMPLATES

    components = models.load_pipeline_components(model, device_name, dtype_name,
                                                 text_encoder_dtype="fp32")
    res = resolution or components.default_resolution
    info = basis.ensure_basis(text_model=components.text_model())
    loaded = basis.load_basis(info.id)
    prepared = faces.prepare_face(PHOTO)
    encoder = faces.load_face_encoder(components.face_encoder, device=components.device)

    # The reference sees the same kind of augmented pastes, encoded at every step.
    rng = random.Random(0)
    crop = _pil_to_tensor(prepared.aligned)
    pixel_pool = [_paste(_augment(crop, rng), res, rng) for _ in range(pool_size)]
    tokenizer = components.tokenizer
    placeholder = tokenizer("sks", add_special_tokens=False)["input_ids"][:1] + \
        tokenizer("ohwx", add_special_tokens=False)["input_ids"][:1]
    template_ids = []
    for template in CAPTION_TEMPLATES[:16]:
        text_ids = tokenizer(template.format("face of sks ohwx person"), padding="max_length",
                             max_length=77, truncation=True, return_tensors="pt")["input_ids"][0]
        template_ids.append(text_ids)

    order = ["celebctl", "reference"]
    if components.device.type == "cuda":
        order.insert(1, "eager")  # celebctl without the CUDA graph, side by side
    # Repeats alternate the loops (A B A B ...) so a slow spell of a shared machine hits both;
    # each figure is the median over the repeats, peak memory the highest.
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for _ in range(repeats):
        for name in order:
            runs[name].append(_one_run(name, components, loaded, prepared, encoder, pixel_pool,
                                       template_ids, placeholder, steps, batch_size, res,
                                       pool_size))
    rows = {name: {"s_per_step": statistics.median(r["s_per_step"] for r in found),
                   "peak_bytes": max(r["peak_bytes"] for r in found),
                   "pool_s": statistics.median(r["pool_s"] for r in found),
                   "captured": all(r["captured"] for r in found)}
            for name, found in runs.items()}
    return {"model": model, "dtype": dtype_name, "device": str(components.device),
            "resolution": res, "batch": batch_size, "steps": steps, "repeats": repeats, **{
                f"{k}_{m}": v for k, r in rows.items() for m, v in r.items()}}


def _one_run(name, components, loaded, prepared, encoder, pixel_pool, template_ids,
             placeholder, steps, batch_size, res, pool_size) -> dict:
    """One timed run of one loop: seconds per step, peak memory, pool seconds."""
    import torch

    with PeakMemory(components.device) as memory:
        if name in ("celebctl", "eager"):
            per_step, pool_s, captured = celebctl_loop(
                components, loaded.mean, loaded.components, prepared.aligned, encoder, steps,
                batch_size, 1e-2, 0, res, pool_size, capture=name == "celebctl")
        else:
            per_step = reference_loop(components, pixel_pool, template_ids,
                                      torch.tensor(placeholder), steps, batch_size,
                                      5e-3, 0)
            pool_s, captured = 0.0, False
    return {"s_per_step": per_step, "peak_bytes": memory.peak, "pool_s": pool_s,
            "captured": captured}


def format_rows(results: list[dict]) -> str:
    lines = [
        "| model | dtype | device | px | batch | celebctl s/step | eager s/step (GPU) | "
        "reference s/step | speed-up | graph vs eager | celebctl peak MiB | reference peak MiB "
        "| memory ratio | celebctl pool s (once) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speed = r["reference_s_per_step"] / r["celebctl_s_per_step"]
        mem_c = r["celebctl_peak_bytes"] / 2**20
        mem_r = r["reference_peak_bytes"] / 2**20
        ratio = mem_c / mem_r if mem_r > 0 else float("nan")
        eager = r.get("eager_s_per_step")
        eager_cells = (f"{eager:.4f} | {eager / r['celebctl_s_per_step']:.2f}x"
                       if eager else "- | -")
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['device']} | {r['resolution']} | {r['batch']} | "
            f"{r['celebctl_s_per_step']:.4f} | {eager_cells.split(' | ')[0]} | "
            f"{r['reference_s_per_step']:.4f} | {speed:.2f}x | {eager_cells.split(' | ')[1]} | "
            f"{mem_c:.0f} | {mem_r:.0f} | {ratio:.2f} | {r['celebctl_pool_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd15-random"],
                        help="also tiny-xl, tiny-sd2, sdxl-random")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per loop (celebctl's fit first runs untimed ones: 1 "
                             "on a CPU; on CUDA the graph's warm-up and capture, until its "
                             "first loss report, 10 steps)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: the model's (64 for tiny, 512 for sd15-random)")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the loops this many times, alternating; medians are shown")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--title", default="Fit step: celebctl vs reference loop",
                        help="section of docs/benchmarks.md to write")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1 (timed steps; warm-up steps come on top)")
    os.environ.setdefault("CELEBCTL_HOME", str(Path.home() / ".cache" / "celebctl-bench"))
    import torch

    torch.manual_seed(0)
    results = []
    for model in args.models:
        for dtype in args.dtypes:
            started = time.perf_counter()
            row = bench_model(model, dtype, args.device, args.steps, args.batch_size,
                              args.resolution, args.pool_size, args.repeats)
            results.append(row)
            print(format_rows([row]).splitlines()[-1], f"({time.perf_counter() - started:.0f} s)",
                  flush=True)
            gc.collect()
    table = format_rows(results)
    body = (
        f"Machine: {machine_description()}\n\n{table}\n\n"
        f"Speed-up = reference s/step / celebctl s/step at equal batch and resolution (target "
        f">= 1.5x); memory ratio = celebctl peak / reference peak (target <= 1). Each loop ran "
        f"{args.steps} timed steps, {args.repeats} time(s) alternating with the other loop "
        "(medians; peak memory the highest), in one process, on the same model (celebctl: "
        "timed between its first and last loss report, so CUDA-graph capture and warm-up are "
        "excluded; the reference: after one warm-up step). On a GPU celebctl runs twice, with "
        "the step captured as a CUDA graph and eagerly; 'graph vs eager' is their ratio. "
        f"celebctl's pool (VAE-encoding {args.pool_size} augmented images once) is shown "
        "separately. Both loops use the convolution kernels celebctl picks for the model "
        "(`celebctl/models/convolutions.py`: torch's own CPU kernels for a small fp32 UNet such "
        "as `tiny`, oneDNN otherwise). "
        "`sd15-random` is the real SD 1.5 architecture with random weights (compute cost does "
        "not depend on weight values). Run: `python benchmarks/bench_fit.py`."
    )
    print()
    print(body)
    if args.write:
        write_section(args.title, body)


if __name__ == "__main__":
    main()
