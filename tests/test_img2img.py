"""img2img (--init-image, --strength) and the hires fix (--hires): the same images as diffusers'
own img2img pipelines from the same parts, the WebUI's PNG text, and checks before loading."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from celebctl import denoise, export, models, rendering
from celebctl.cli import app
from celebctl.errors import InvalidOption, PhotoError
from tests.helpers import one_torch_thread

runner = CliRunner()
PROMPT = "a castle at dawn"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> Path:
    """A 72 x 64 picture with structure (a gradient and a square), not a multiple of 64."""
    y, x = np.mgrid[0:64, 0:72]
    rgb = np.stack([x * 3, y * 4, 255 - x * 2], -1).astype(np.uint8)
    rgb[16:40, 20:44] = (250, 220, 30)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(rgb).save(path)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def pixels(path_or_image) -> np.ndarray:
    if isinstance(path_or_image, Image.Image):
        return np.asarray(path_or_image.convert("RGB"), dtype=int)
    with Image.open(path_or_image) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


def webui_fields(text: str) -> dict[str, str]:
    """The settings line of a WebUI ``parameters`` text as the WebUI's PNG Info reads it."""
    line = text.strip().split("\n")[-1]
    found = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)
    return {key: json.loads(value) if value.startswith('"') else value
            for key, value in found}


def sd_pipeline(cls, components, scheduler: str):
    pipe = cls(vae=components.vae, text_encoder=components.text_encoder,
               tokenizer=components.tokenizer, unet=components.unet,
               scheduler=rendering.make_scheduler(scheduler, components.scheduler.config),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int):
    import torch

    return [torch.Generator("cpu").manual_seed(seed)]


# --------------------------------------------------------------------------------------------
# the same images as diffusers


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_img2img_draws_what_diffusers_img2img_draws(home, components, init_png, tmp_path,
                                                    scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    result = rendering.render_prompt(PROMPT, steps=5, seed=3, guidance=7.5, scheduler=scheduler,
                                     components=components, out_dir=tmp_path,
                                     init_image=init_png, strength=0.6)
    # The size is the image's own (72 x 64), as diffusers' default.
    assert (result.width, result.height) == (72, 64)
    pipe = sd_pipeline(StableDiffusionImg2ImgPipeline, components, scheduler)
    with models.quiet_libraries():
        theirs = pipe(PROMPT, image=Image.open(init_png), strength=0.6, num_inference_steps=5,
                      guidance_scale=7.5, generator=generator(3)).images[0]
    # Bit for bit: the same parts, the same arithmetic, on the CPU.
    np.testing.assert_array_equal(pixels(result.paths[0]), pixels(theirs))
    # And the image matters: a plain render of the same seed is another picture.
    plain = rendering.render_prompt(PROMPT, steps=5, seed=3, guidance=7.5, scheduler=scheduler,
                                    components=components, out_dir=tmp_path, width=72,
                                    height=64)
    assert not np.array_equal(pixels(plain.paths[0]), pixels(result.paths[0]))


def test_img2img_with_an_identity_and_a_given_size(home, components, init_png, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    result = rendering.render_prompt("alice riding a bike", steps=4, seed=5, guidance=7.5,
                                     components=components, out_dir=tmp_path, width=64,
                                     height=64, init_image=init_png, strength=0.75)
    assert result.identities == ["alice"] and result.expanded.startswith("<alice> person")
    export.export_identity("alice", tmp_path / "alice-ti", "diffusers")
    fresh = models.load_pipeline_components("tiny", "cpu", "fp32")  # diffusers' TI mutates it
    pipe = sd_pipeline(StableDiffusionImg2ImgPipeline, fresh, "ddim")
    pipe.load_textual_inversion(str(tmp_path / "alice-ti"))
    with models.quiet_libraries():
        # This pipeline draws at the image's size: resized as its image processor resizes.
        image = Image.open(init_png).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
        theirs = pipe(result.expanded, image=image, strength=0.75, num_inference_steps=4,
                      guidance_scale=7.5, generator=generator(5)).images[0]
    np.testing.assert_array_equal(pixels(result.paths[0]), pixels(theirs))


def test_sdxl_img2img_draws_what_diffusers_xl_img2img_draws(tiny_home, init_png, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    parts = models.load_pipeline_components("tiny-xl", "cpu", "fp32")
    result = rendering.render_prompt(PROMPT, steps=4, seed=2, guidance=7.5, components=parts,
                                     out_dir=tmp_path, init_image=init_png, strength=0.5,
                                     scheduler="euler")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
        scheduler=rendering.make_scheduler("euler", parts.scheduler.config),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    with models.quiet_libraries():
        theirs = pipe(PROMPT, image=Image.open(init_png), strength=0.5, num_inference_steps=4,
                      guidance_scale=7.5, generator=generator(2)).images[0]
    np.testing.assert_array_equal(pixels(result.paths[0]), pixels(theirs))

    # The hires fix on SDXL: its txt2img pipeline's latents, upscaled, then its img2img.
    import torch
    from diffusers import StableDiffusionXLPipeline

    hires = rendering.render_prompt(PROMPT, steps=3, seed=2, guidance=7.5, components=parts,
                                    out_dir=tmp_path, scheduler="euler",
                                    hires=rendering.HiresFix(scale=1.5, steps=2, denoise=0.5))
    txt2img = StableDiffusionXLPipeline(**pipe.components)
    txt2img.scheduler = rendering.make_scheduler("euler", parts.scheduler.config)
    txt2img.set_progress_bar_config(disable=True)
    pipe.scheduler = rendering.make_scheduler("euler", parts.scheduler.config)
    with models.quiet_libraries():
        latents = txt2img(PROMPT, num_inference_steps=3, guidance_scale=7.5,
                          generator=generator(2), output_type="latent").images
        start = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear",
                                                antialias=False)
        theirs = pipe(PROMPT, image=start, strength=2.5 / 4, num_inference_steps=4,
                      guidance_scale=7.5, generator=generator(2)).images[0]
    assert rendering.img2img.hires_schedule(2, 0.5) == (4, 2)
    np.testing.assert_array_equal(pixels(hires.paths[0]), pixels(theirs))


@pytest.mark.parametrize(("upscaler", "scheduler"), [("latent", "ddim"), ("latent", "dpm"),
                                                     ("lanczos", "euler")])
def test_hires_fix_is_txt2img_then_img2img_on_the_upscaled_result(home, components, tmp_path,
                                                                  upscaler, scheduler):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    hires = rendering.HiresFix(scale=2, steps=3, denoise=0.6, upscaler=upscaler)
    result = rendering.render_prompt(PROMPT, steps=4, seed=11, guidance=7.5,
                                     scheduler=scheduler, components=components,
                                     out_dir=tmp_path, hires=hires)
    assert (result.width, result.height) == (128, 128)
    assert Image.open(result.paths[0]).size == (128, 128)

    txt2img = sd_pipeline(StableDiffusionPipeline, components, scheduler)
    img2img = sd_pipeline(StableDiffusionImg2ImgPipeline, components, scheduler)
    # The WebUI's rule: 3 hires steps at denoise 0.6 run the last 3 of int(3 / 0.6) = 5 steps;
    # diffusers runs int(5 * strength) of 5, so any strength in [0.6, 0.8) is the same.
    total, run = rendering.img2img.hires_schedule(3, 0.6)
    assert (total, run) == (5, 3)
    strength = (run + 0.5) / total
    with models.quiet_libraries():
        if upscaler == "latent":
            latents = txt2img(PROMPT, num_inference_steps=4, guidance_scale=7.5,
                              generator=generator(11), output_type="latent").images
            start = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear",
                                                    antialias=False)
        else:
            small = txt2img(PROMPT, num_inference_steps=4, guidance_scale=7.5,
                            generator=generator(11)).images[0]
            start = small.resize((128, 128), Image.Resampling.LANCZOS)
        theirs = img2img(PROMPT, image=start, strength=strength, num_inference_steps=total,
                         guidance_scale=7.5, generator=generator(11)).images[0]
    np.testing.assert_array_equal(pixels(result.paths[0]), pixels(theirs))


def test_euler_txt2img_starts_at_its_schedules_sigma(home, components, tmp_path):
    """A sigma scheduler's initial noise scale is read after its schedule is set, as the
    pipeline reads it: before, the first batch used the training schedule's and later batches
    the previous batch's, so Euler renders matched neither diffusers nor each other."""
    from diffusers import StableDiffusionPipeline

    result = rendering.render_prompt(PROMPT, steps=4, seed=11, guidance=7.5, num_images=2,
                                     batch_size=1, scheduler="euler", components=components,
                                     out_dir=tmp_path)
    pipe = sd_pipeline(StableDiffusionPipeline, components, "euler")
    with models.quiet_libraries():
        for path, seed in zip(result.paths, (11, 12), strict=True):
            theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5,
                          generator=generator(seed)).images[0]
            np.testing.assert_array_equal(pixels(path), pixels(theirs))


def test_a_captured_hires_render_uses_a_second_graph_and_draws_the_same(
        home, components, tmp_path, monkeypatch):
    made = []

    def emulating(*args, **kwargs):
        call = denoise.UNetCall(*args, **kwargs, emulate=True)
        made.append(call)
        return call

    hires = rendering.HiresFix(scale=1.5, steps=2)
    eager = rendering.render_prompt("alice", num_images=3, steps=2, seed=4, batch_size=2,
                                    components=components, out_dir=tmp_path / "e", hires=hires)
    monkeypatch.setattr(rendering.render, "UNetCall", emulating)
    replayed = rendering.render_prompt("alice", num_images=3, steps=2, seed=4, batch_size=2,
                                       components=components, out_dir=tmp_path / "r",
                                       hires=hires)
    assert replayed.captured and not eager.captured
    # One graph for the first pass's shape, one for the hires pass's (96 px: 12 x 12 latents).
    shapes = sorted(key[0] for key in made[0].graphs)
    assert shapes == [(4, 4, 8, 8), (4, 4, 12, 12)]
    for a, b in zip(eager.paths[:2], replayed.paths[:2], strict=True):
        np.testing.assert_array_equal(pixels(a), pixels(b))


# --------------------------------------------------------------------------------------------
# PNG text, the CLI, --prompts


def test_png_text_carries_the_webui_keys_and_reads_back(home, components, init_png, tmp_path):
    result = rendering.render_prompt("alice", steps=4, seed=1, components=components,
                                     out_dir=tmp_path, init_image=init_png, strength=0.5)
    data = rendering.read_png_metadata(result.paths[0])
    fields = webui_fields(data["parameters"])
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "72x64"
    assert "Hires upscale" not in fields
    assert data["celebctl"]["denoising_strength"] == 0.5
    assert len(data["celebctl"]["init_image_sha256"]) == 64
    assert str(init_png) not in json.dumps(data)  # the image's path stays private

    hires = rendering.HiresFix(scale=2, steps=3, upscaler="lanczos")
    result = rendering.render_prompt("alice", steps=2, seed=1, components=components,
                                     out_dir=tmp_path, hires=hires)
    data = rendering.read_png_metadata(result.paths[0])
    fields = webui_fields(data["parameters"])
    # As the WebUI writes a hires render: the first pass's size, then the hires keys.
    assert fields["Size"] == "64x64" and fields["Steps"] == "2"
    assert (fields["Denoising strength"], fields["Hires upscale"], fields["Hires steps"],
            fields["Hires upscaler"]) == ("0.7", "2", "3", "Lanczos")
    assert data["parameters"].split("\n")[-1].index("Model: ") < \
        data["parameters"].split("\n")[-1].index("Denoising strength")
    assert Image.open(result.paths[0]).size == (128, 128)
    assert data["celebctl"]["hires_width"] == 128 and data["celebctl"]["hires_steps"] == 3
    # The default hires steps are the first pass's.
    result = rendering.render_prompt("alice", steps=2, seed=1, components=components,
                                     out_dir=tmp_path, hires=rendering.HiresFix(scale=1.5))
    fields = webui_fields(rendering.read_png_metadata(result.paths[0])["parameters"])
    assert fields["Hires steps"] == "2" and fields["Hires upscaler"] == "Latent"
    # A plain render writes none of these keys (its bytes are as before).
    plain = rendering.render_prompt("alice", steps=2, seed=1, components=components,
                                    out_dir=tmp_path)
    text = rendering.read_png_metadata(plain.paths[0])["parameters"]
    assert "Denoising strength" not in text and "Hires" not in text
    assert "redraw" not in plain.to_dict()


def test_cli_img2img_and_hires(home, init_png, tmp_path):
    out = tmp_path / "r"
    result = invoke("render", "alice", "--init-image", init_png, "--strength", "0.5",
                    "--steps", 2, "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["redraw"] == {"denoising_strength": 0.5, "init_image": "init.png"}
    assert (summary["width"], summary["height"]) == (72, 64)
    result = invoke("render", "alice", "--hires", "1.5", "--hires-upscaler", "lanczos",
                    "--hires-denoise", "0.5", "--steps", 2, "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["redraw"]["hires_upscaler"] == "Lanczos" and summary["width"] == 96
    help_text = " ".join(invoke("render", "--help").stdout.split())
    for flag in ("--init-image", "--strength", "--hires", "--hires-steps", "--hires-denoise",
                 "--hires-upscaler"):
        assert flag in help_text


def test_prompts_file_shares_the_init_image_and_resumes(home, components, init_png, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice riding a bike\na castle at dawn\n")
    out = tmp_path / "job"
    job = rendering.render_prompts_file(prompts, seeds=1, seed=3, steps=4, batch_size=1,
                                        components=components, out_dir=out,
                                        init_image=init_png, strength=0.5)
    assert len(job.written) == 2 and (job.width, job.height) == (72, 64)
    single = rendering.render_prompt("a castle at dawn", steps=4, seed=3, components=components,
                                     out_dir=tmp_path / "one", init_image=init_png,
                                     strength=0.5)
    np.testing.assert_array_equal(pixels(job.written[(1, 3)]), pixels(single.paths[0]))
    again = rendering.render_prompts_file(prompts, seeds=1, seed=3, steps=4, batch_size=1,
                                          components=components, out_dir=out,
                                          init_image=init_png, strength=0.5)
    assert not again.written and len(again.skipped) == 2
    with pytest.raises(Exception, match="denoising_strength"):
        rendering.render_prompts_file(prompts, seeds=1, seed=3, steps=4, components=components,
                                      out_dir=out, init_image=init_png, strength=0.6)
    hires = rendering.render_prompts_file(prompts, seeds=1, seed=3, steps=2,
                                          components=components, out_dir=tmp_path / "hires",
                                          hires=rendering.HiresFix(scale=2, steps=2))
    assert {Image.open(p).size for p in hires.written.values()} == {(128, 128)}
    result = invoke("render", "--prompts", prompts, "--init-image", init_png, "--steps", 2,
                    "--out", tmp_path / "cli", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 2


# --------------------------------------------------------------------------------------------
# refused before any model loads


def _bomb(path: Path) -> Path:
    Image.new("1", (9000, 9000)).save(path)  # 81 megapixels in a small file
    return path


def test_bad_init_images_are_refused_before_any_model_loads(home, tmp_path, built):
    (tmp_path / "notes.txt").write_text("not a picture")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        tmp_path / "notes.txt": "is not an image celebctl can read",
        tmp_path / "missing.png": "not found",
        tmp_path / "fifo": "not a regular file",
        Path("/dev/zero"): "not a regular file",
        tmp_path: "is a folder",
        _bomb(tmp_path / "bomb.png"): "megapixel",
    }
    for path, message in cases.items():
        result = invoke("render", "alice", "--init-image", path, "--out", tmp_path / "o")
        assert result.exit_code == 1, (path, result.output)
        assert result.stderr.startswith("Error: --init-image") and message in result.stderr
        result = invoke("render", "--prompts", tmp_path / "notes.txt", "--init-image", path,
                        "--out", tmp_path / "o")
        assert result.exit_code == 1 and message in result.stderr
    with pytest.raises(PhotoError, match="--init-image"):
        rendering.prepare_redraw(init_image=tmp_path / "notes.txt")
    assert built == []
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (("--strength", "1.5"), "--strength must be a number from 0 to 1"),
    (("--strength", "-0.1"), "--strength must be a number from 0 to 1"),
    (("--strength", "nan"), "--strength must be a number from 0 to 1"),
    (("--strength", "0.01"), "leaves no denoising step"),
    (("--hires", "2"), "--hires is a second pass"),
])
def test_bad_img2img_options_are_refused_before_loading(home, init_png, tmp_path, built, args,
                                                        message):
    result = invoke("render", "alice", "--init-image", init_png, *args, "--out", tmp_path)
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert built == []


@pytest.mark.parametrize(("args", "message", "code"), [
    (("--strength", "0.5"), "--strength goes with --init-image", 1),
    (("--hires", "5"), "--hires must be a scale from 1 to 4", 1),
    (("--hires", "0.5"), "--hires must be a scale from 1 to 4", 1),
    (("--hires", "2", "--hires-denoise", "0"), "--hires-denoise 0", 1),
    (("--hires", "2", "--hires-denoise", "1.2"), "--hires-denoise must be a number", 1),
    (("--hires", "2", "--hires-steps", "0"), "--hires-steps must be between", 1),
    (("--hires", "2", "--hires-denoise", "0.001"), "more than 1000", 1),
    (("--hires", "4", "--width", "1024"), "the hires size must be between", 1),
    (("--hires-steps", "5"), "goes with --hires", 2),
    (("--hires-upscaler", "lanczos"), "goes with --hires", 2),
])
def test_bad_hires_options_are_refused(home, tmp_path, built, args, message, code):
    result = invoke("render", "alice", *args, "--out", tmp_path)
    assert result.exit_code == code and message in " ".join(result.stderr.split()), \
        result.output
    if code == 2 or "hires size" not in message:
        assert built == []


def test_too_large_init_image_names_the_fix(home, tmp_path, built):
    path = tmp_path / "wide.png"
    Image.new("RGB", (2100, 80), "white").save(path)
    with pytest.raises(InvalidOption, match="is 2100x80.*Give --width and --height"):
        rendering.render_prompt("alice", init_image=path, out_dir=tmp_path, device="cpu")
    assert built == []
    result = invoke("render", "alice", "--init-image", path, "--width", 512, "--height", 64,
                    "--dry-run")
    assert result.exit_code == 0, result.output
    assert ("Init image: wide.png (2100x80), denoising strength 0.75: 37 of 50 steps run"
            in result.stdout)
    result = invoke("render", "alice", "--hires", 2, "--steps", 20, "--dry-run")
    assert result.exit_code == 0, result.output
    assert ("Hires fix:  x2, 20 steps, denoising strength 0.7, Latent upscaler"
            in result.stdout)
