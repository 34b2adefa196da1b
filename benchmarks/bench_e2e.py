"""End to end, as a user runs it: `celebctl add` and `celebctl render -n 1 / -n 8` as separate
processes from a saved diffusers folder, next to a plain diffusers StableDiffusionPipeline on
the same parts, in the same run.

The folder is saved once from `sd15-random` (the SD 1.5 architecture with random weights;
fp16 on a GPU, fp32 on a CPU) or, with `--arch tiny`, from the built-in tiny model; a
face-weights file in the VGGFace2 layout (a seeded InceptionResnetV1's state dict) makes the
folder fit as a real model would. Each command is timed as a whole process, start-up and
loading included; "each extra image" is (n=8 - n=1) / 7.

    python benchmarks/bench_e2e.py --device cuda                 # SD 1.5 shape, 400 steps
    python benchmarks/bench_e2e.py --arch tiny --fit-steps 20    # quick, on a CPU
    python benchmarks/bench_e2e.py ... --write                   # update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_description, write_section  # noqa: E402

PHOTO = ROOT / "tests" / "data" / "astronaut.png"

DIFFUSERS_SCRIPT = r"""
import json, sys, time, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
folder, device, dtype, n, batch, steps, res = sys.argv[1:8]
n, batch, steps, res = int(n), int(batch), int(steps), int(res)
dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dt, safety_checker=None,
                                               requires_safety_checker=False).to(device)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
started = time.perf_counter()
done = 0
while done < n:
    k = min(batch, n - done)
    gens = [torch.Generator("cpu").manual_seed(done + i) for i in range(k)]
    images = pipe(["a photo of a person"] * k, num_inference_steps=steps, guidance_scale=10.0,
                  generator=gens, height=res, width=res).images
    for i, image in enumerate(images):
        image.save(f"/tmp/celebctl-bench-diffusers-{done + i}.png")
    done += k
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({"images_s": time.perf_counter() - started}))
"""


def save_folder(arch: str, folder: Path, dtype: str) -> None:
    """Save the model as a diffusers folder, and a VGGFace2-layout face-weights file."""
    import torch
    from facenet_pytorch import InceptionResnetV1

    from celebctl import models

    spec = "sd15-random" if arch == "sd15" else "tiny"
    components = models.load_pipeline_components(spec, "cpu", "fp32")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    parts = {"tokenizer": components.tokenizer, "text_encoder": components.text_encoder,
             "unet": components.unet, "vae": components.vae, "scheduler": components.scheduler}
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in parts.items():
        if hasattr(module, "to") and name not in ("tokenizer", "scheduler"):
            module = module.to(dt)
        module.save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(models._model_index(parts)))
    torch.manual_seed(0)
    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(),
               folder / "vggface2-layout.pt")


def timed(argv: list[str], env: dict[str, str], timeout: int = 3600) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on a CPU")
    parser.add_argument("--fit-steps", type=int, default=400)
    parser.add_argument("--render-steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--diffusers-batch", type=int, default=8,
                        help="plain diffusers' batch for the n-image run (same as celebctl's)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="celebctl-e2e-"))
    folder = work / f"{args.arch}-{dtype}"
    if not (folder / "model_index.json").exists():
        print(f"saving {args.arch} ({dtype}) to {folder} ...", flush=True)
        save_folder(args.arch, folder, dtype)
    env = dict(os.environ, CELEBCTL_HOME=str(work / "home"), HF_HUB_OFFLINE="1",
               CELEBCTL_FACE_WEIGHTS=str(folder / "vggface2-layout.pt"))
    cli = [sys.executable, "-m", "celebctl"]
    common = ["--model", str(folder), "--device", args.device]
    res = 64 if args.arch == "tiny" else 512
    rows = []
    add_s, out = timed(cli + ["add", "alice", str(PHOTO), "--replace", "--steps",
                              str(args.fit_steps), "--quiet", "--json", *common], env)
    fit = json.loads(out)["fit"]
    rows.append(("`celebctl add` (end to end)", add_s, f"fit {fit['wall_time_s']:.1f} s "
                 f"(pool {fit['pool_time_s']:.1f} s), {args.fit_steps} steps, captured: "
                 f"{fit.get('captured')}"))
    render = cli + ["render", "alice", "--steps", str(args.render_steps), "--quiet",
                    "--out", str(work / "renders"), *common]
    one_s, _ = timed(render + ["-n", "1"], env)
    many_s, _ = timed(render + ["-n", str(args.images)], env)
    extra = (many_s - one_s) / max(args.images - 1, 1)
    rows.append(("`celebctl render -n 1` (end to end)", one_s, ""))
    rows.append((f"`celebctl render -n {args.images}` (end to end)", many_s,
                 f"each extra image {extra:.3f} s"))
    diff = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), args.device, dtype]
    d_one_s, out1 = timed(diff + ["1", "1", str(args.render_steps), str(res)], env)
    d_many_s, outn = timed(diff + [str(args.images), str(args.diffusers_batch),
                                   str(args.render_steps), str(res)], env)
    d_extra = (d_many_s - d_one_s) / max(args.images - 1, 1)
    rows.append(("plain diffusers, n=1 (process)", d_one_s,
                 f"images {json.loads(out1)['images_s']:.2f} s"))
    rows.append((f"plain diffusers, n={args.images}, batch {args.diffusers_batch} (process)",
                 d_many_s, f"each extra image {d_extra:.3f} s"))
    table = ["| what | seconds | detail |", "|---|---|---|"]
    table += [f"| {what} | {sec:.2f} | {detail} |" for what, sec, detail in rows]
    ratio = d_extra / extra if extra > 0 else float("nan")
    body = (
        f"Machine: {machine_description()}; device {args.device}, {dtype}, model: a saved "
        f"`{args.arch}` diffusers folder, {res} px.\n\n" + "\n".join(table) + "\n\n"
        f"Each extra image: diffusers / celebctl = {ratio:.2f}x (above 1: celebctl faster). "
        f"`render -n 1` end to end: {one_s:.1f} s. Run: `python benchmarks/bench_e2e.py "
        f"--arch {args.arch} --device {args.device} --fit-steps {args.fit_steps}`."
    )
    print(body)
    if args.write:
        where = "GPU" if args.device.startswith("cuda") else "CPU"
        write_section(f"End to end ({where}, {args.arch})", body)


if __name__ == "__main__":
    main()
