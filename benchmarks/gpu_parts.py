"""One part of the GPU check, in its own process (benchmarks/gpu_check.py starts each).

    python benchmarks/gpu_parts.py PART --device cuda --work DIR [--quick]

The part's figures are printed as JSON on the last line, after the marker ``GPU_CHECK_RESULT``,
with this process's peak GPU memory (``torch.cuda.max_memory_allocated``; null on a CPU) and
its peak resident set size. ``--quick`` uses the tiny models and a few steps (a CPU dry run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import runpy
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARKER = "GPU_CHECK_RESULT"
PHOTO = ROOT / "tests" / "data" / "astronaut.png"
# What each mode runs on: the SD 1.5 shape (a folder saved from sd15-random) on a GPU, the
# built-in tiny models in a dry run.
FULL = {"arch": "sd15", "random": "sd15-random", "xl": "sdxl-random", "fit_steps": 20,
        "unet_iters": 20, "unet_repeats": 3, "add_steps": None, "render_steps": 30}
QUICK = {"arch": "tiny", "random": "tiny", "xl": "tiny-xl", "fit_steps": 2,
         "unet_iters": 2, "unet_repeats": 1, "add_steps": 10, "render_steps": 2}
RENDER_PROMPT = "a photo of alice"


class Context:
    """Where a part works and what it runs on."""

    def __init__(self, device: str, work: Path, quick: bool):
        self.device = device
        self.work = work
        self.quick = quick
        self.mode = QUICK if quick else FULL
        self.cuda = device.startswith("cuda")
        # Saved in fp16 on a GPU (what users download), fp32 on a CPU (fp16 CPU kernels are
        # slow or missing).
        self.folder_dtype = "fp16" if self.cuda else "fp32"
        self.folder = work / f"{self.mode['arch']}-{self.folder_dtype}"

    def sd_model(self) -> str:
        """The saved folder when the save part made it, else the built-in random model."""
        if (self.folder / "model_index.json").is_file():
            return str(self.folder)
        return self.mode["random"]


def process_peaks() -> dict:
    """This process's peak GPU memory (when CUDA was used) and peak RSS, in MiB."""
    peak = None
    name = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        name = torch.cuda.get_device_name()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_gpu_mib": peak, "max_rss_mib": round(rss, 1), "gpu": name}


# ---- the parts


def part_gpu_tests(ctx: Context) -> dict:
    """`pytest -m gpu` in this process (so its peak GPU memory is this process's)."""
    import pytest

    counts: dict[str, int] = {}

    class Count:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                counts[report.outcome] = counts.get(report.outcome, 0) + 1

    code = pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")],
                       plugins=[Count()])
    return {"ok": int(code) == 0, "exit_code": int(code), **counts}


def part_save_folder(ctx: Context) -> dict:
    """Save the SD 1.5-shaped random model (tiny in a dry run) as a diffusers folder, and a
    face-weights file in the VGGFace2 layout next to it."""
    from benchmarks.bench_e2e import save_folder

    started = time.perf_counter()
    save_folder(ctx.mode["arch"], ctx.folder, ctx.folder_dtype)
    size = sum(p.stat().st_size for p in ctx.folder.rglob("*") if p.is_file())
    return {"folder": str(ctx.folder), "dtype": ctx.folder_dtype, "mib": round(size / 2**20),
            "seconds": round(time.perf_counter() - started, 2)}


def part_fit_step(ctx: Context) -> dict:
    """bench_fit's three loops in bf16: celebctl captured, celebctl eager (CUDA), reference."""
    from benchmarks.bench_fit import bench_model, untimed_lead

    model = ctx.sd_model()
    row = bench_model(model, "bf16", ctx.device, ctx.mode["fit_steps"], 2, None, 4)
    row["untimed_steps"] = untimed_lead("cuda" if ctx.cuda else "cpu")
    row["model_from"] = (f"{ctx.folder.name} folder (saved from {ctx.mode['random']})"
                         if model == str(ctx.folder) else model)
    return row


def part_autocast(ctx: Context) -> dict:
    """The bare UNet, weights in bf16, forward + backward (to the text states, as in the fit)
    with torch.autocast(bf16) on and off, alternating; ms per iteration and peak memory."""
    import torch
    import torch.nn.functional as F

    from celebctl import models

    components = models.load_pipeline_components(ctx.sd_model(), ctx.device, "bf16")
    unet = components.unet
    device = components.device
    side = components.default_resolution // 8
    hidden = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, unet.config.in_channels, side, side), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    states0 = torch.randn((2, 77, hidden), generator=generator)
    latents, noise = latents.to(device, torch.bfloat16), noise.to(device)
    steps = torch.tensor([500, 700], device=device)
    added = None
    if components.family == "sdxl":
        return {"ok": False, "error": "the autocast part runs on an SD 1.x-shaped UNet"}

    def iteration(enabled: bool) -> None:
        states = states0.to(device, torch.bfloat16).requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            pred = unet(latents, steps, states, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), noise).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for enabled in (True, False):  # warm-up (cuDNN picks kernels)
        iteration(enabled)
    sync()
    times: dict[bool, list[float]] = {True: [], False: []}
    peaks: dict[bool, int] = {True: 0, False: 0}
    for _ in range(ctx.mode["unet_repeats"]):
        for enabled in (True, False):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            started = time.perf_counter()
            for _ in range(ctx.mode["unet_iters"]):
                iteration(enabled)
            sync()
            times[enabled].append((time.perf_counter() - started) / ctx.mode["unet_iters"])
            if device.type == "cuda":
                peaks[enabled] = max(peaks[enabled], torch.cuda.max_memory_allocated() - base)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"model": Path(components.spec.ref).name, "batch": 2, "latent_side": side,
            "ms_autocast_on": round(on * 1000, 2), "ms_autocast_off": round(off * 1000, 2),
            "on_over_off": round(on / off, 3),
            "peak_mib_on": round(peaks[True] / 2**20, 1) if device.type == "cuda" else None,
            "peak_mib_off": round(peaks[False] / 2**20, 1) if device.type == "cuda" else None,
            "iters": ctx.mode["unet_iters"], "repeats": ctx.mode["unet_repeats"]}


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """`python -m celebctl ARGV` in this process; returns (exit code, what it printed)."""
    out = io.StringIO()
    real_stdout, real_argv = sys.stdout, sys.argv
    sys.stdout, sys.argv = out, ["celebctl", *argv]
    code = 0
    try:
        runpy.run_module("celebctl", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.stdout, sys.argv = real_stdout, real_argv
    return code, out.getvalue()


def _parsed(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def part_add(ctx: Context) -> dict:
    """`celebctl add alice PHOTO --model FOLDER --json`, end to end in this process (the
    caller times the process); its fit is the full fit (400 steps unless --quick)."""
    argv = ["add", "alice", str(PHOTO), "--model", str(ctx.folder), "--device", ctx.device,
            "--replace", "--quiet", "--json"]
    if ctx.mode["add_steps"]:
        argv += ["--steps", str(ctx.mode["add_steps"])]
    code, out = _run_cli(argv)
    data = _parsed(out) or {}
    fit = data.get("fit", {}) if isinstance(data, dict) else {}
    wall, pool = fit.get("wall_time_s"), fit.get("pool_time_s")
    dtype = None
    if code == 0:
        from celebctl import registry

        dtype = registry.get_identity("alice").meta.get("fit", {}).get("dtype")
    return {"ok": code == 0, "exit_code": code, "steps": fit.get("steps"),
            "fit_wall_s": wall, "fit_pool_s": pool,
            "fit_loop_s": round(wall - pool, 3) if wall is not None and pool is not None
            else None,
            "captured": fit.get("captured"), "dtype": dtype,
            "output_tail": out[-1500:] if code else None}


def _render(ctx: Context, n: int) -> dict:
    """`celebctl render` of alice, n images in one batch, end to end in this process; counts
    the CUDA graphs the render loop captured (a spy on denoise.UNetCall)."""
    from celebctl import denoise

    captured: list[int] = []
    real_capture = denoise.UNetCall._capture

    def counting(self, *args, **kwargs):
        entry = real_capture(self, *args, **kwargs)
        captured.append(1)
        return entry

    denoise.UNetCall._capture = counting
    out_dir = ctx.work / f"renders-{n}"
    code, out = _run_cli(["render", RENDER_PROMPT, "-n", str(n), "--batch-size", str(n),
                          "--steps", str(ctx.mode["render_steps"]), "--model", str(ctx.folder),
                          "--device", ctx.device, "--out", str(out_dir), "--quiet", "--json"])
    data = _parsed(out) or {}
    notes = data.get("notes", []) if isinstance(data, dict) else []
    return {"ok": code == 0 and len(data.get("paths", [])) == n, "exit_code": code, "n": n,
            "batch": n, "steps": ctx.mode["render_steps"], "graphs_captured": len(captured),
            "elapsed_in_render_s": data.get("elapsed_s"), "notes": notes,
            "output_tail": out[-1500:] if code else None}


def part_render_1(ctx: Context) -> dict:
    return _render(ctx, 1)


def part_render_8(ctx: Context) -> dict:
    return _render(ctx, 8)


def part_diffusers(ctx: Context) -> dict:
    """Plain diffusers' StableDiffusionPipeline on the same folder, same dtype as celebctl's
    render (fp16 on CUDA), DDIM, same steps and guidance: one warm-up image of 1 step, then 1
    image (batch 1) and 8 images (batch 8) timed, PNGs written, as celebctl writes them."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dt = torch.float16 if ctx.cuda else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(ctx.folder), torch_dtype=dt,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe = pipe.to(ctx.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    side = 64 if ctx.quick else 512
    out_dir = ctx.work / "diffusers"
    out_dir.mkdir(parents=True, exist_ok=True)

    def images(n: int, steps: int) -> float:
        started = time.perf_counter()
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        result = pipe([RENDER_PROMPT] * n, num_inference_steps=steps, guidance_scale=10.0,
                      generator=gens, height=side, width=side).images
        for i, image in enumerate(result):
            image.save(out_dir / f"{n}-{i}.png")
        if ctx.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    images(1, 1)  # warm-up: kernels chosen, memory pools filled
    steps = ctx.mode["render_steps"]
    one, eight = images(1, steps), images(8, steps)
    return {"dtype": str(dt).replace("torch.", ""), "steps": steps,
            "images_1_s": round(one, 3), "images_8_s": round(eight, 3),
            "per_image_at_8_s": round(eight / 8, 4),
            "each_extra_image_s": round((eight - one) / 7, 4)}


def part_sdxl_step(ctx: Context) -> dict:
    """celebctl's fit step on the SDXL architecture (tiny-xl in a dry run), bf16, captured."""
    from benchmarks.bench_fit import celebctl_loop, untimed_lead
    from celebctl import basis, faces, models

    components = models.load_pipeline_components(ctx.mode["xl"], ctx.device, "bf16",
                                                 text_encoder_dtype="fp32")
    info = basis.ensure_basis(text_model=components.text_model())
    loaded = basis.load_basis(info.id)
    face = faces.prepare_face(PHOTO).aligned
    encoder = faces.load_face_encoder(components.face_encoder, device=components.device)
    steps = 3 if ctx.cuda else 1
    per_step, pool_s, captured = celebctl_loop(
        components, loaded.mean, loaded.components, face, encoder, steps, 2, 1e-2, 0,
        components.default_resolution, 4)
    return {"model": ctx.mode["xl"], "resolution": components.default_resolution, "batch": 2,
            "s_per_step": round(per_step, 4), "pool_s": round(pool_s, 2), "captured": captured,
            "timed_steps": steps, "untimed_steps": untimed_lead(components.device.type)}


def part_serve(ctx: Context) -> dict:
    """`celebctl serve --model FOLDER` (its own process, loaded once): one image of alice
    through POST /sdapi/v1/txt2img after a warm-up request; the answer's wall time, the job's
    own render time (render_prompt's elapsed_s) and the difference."""
    import signal

    from benchmarks.bench_serve import _post, start_server

    size = 512 if ctx.cuda and not ctx.quick else 64
    steps = ctx.mode["render_steps"]
    process, url = start_server(Path(os.environ["CELEBCTL_HOME"]), str(ctx.folder), ctx.device)
    body = {"prompt": RENDER_PROMPT, "steps": steps, "width": size, "height": size,
            "sampler_name": "DDIM", "eta": 0, "seed": 0}
    try:
        _post(f"{url}/sdapi/v1/txt2img", {**body, "steps": 1})
        started = time.perf_counter()
        answer = _post(f"{url}/sdapi/v1/txt2img", body)
        wall = time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(120)
    render = json.loads(answer["info"])["celebctl"]["elapsed_s"]
    return {"ok": len(answer["images"]) == 1, "steps": steps, "size": size,
            "warm_s": round(wall, 4), "render_s": render, "overhead_s": round(wall - render, 4)}


PARTS = {
    "gpu_tests": part_gpu_tests,
    "save_folder": part_save_folder,
    "fit_step": part_fit_step,
    "autocast": part_autocast,
    "add": part_add,
    "render_1": part_render_1,
    "render_8": part_render_8,
    "diffusers": part_diffusers,
    "serve": part_serve,
    "sdxl_step": part_sdxl_step,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    ctx = Context(args.device, Path(args.work), args.quick)
    ctx.work.mkdir(parents=True, exist_ok=True)
    try:
        result = PARTS[args.part](ctx)
        code = 0 if result.get("ok", True) else 1
    except Exception:  # noqa: BLE001 - the part failed: say how, on the marker line too
        result = {"ok": False, "error": traceback.format_exc()[-3000:]}
        traceback.print_exc()
        code = 1
    result.setdefault("ok", code == 0)
    sys.stdout.flush()
    print(f"\n{MARKER} {json.dumps({**result, **process_peaks()}, default=str)}", flush=True)
    os._exit(code)  # skip interpreter teardown (slow with CUDA and worker threads)


if __name__ == "__main__":
    main()
