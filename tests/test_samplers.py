"""Samplers and schedule types by the WebUI's names (issue 23, points 1 and 6): the registry,
renders equal to diffusers' own pipelines with the same scheduler, PNG text read back, the
config's defaults, `eval --images`, `render --prompts` resuming, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from celebctl import evaluation, infotext, models, paths, rendering, samplers
from celebctl.cli import app
from celebctl.errors import InvalidOption
from tests.helpers import PHOTO, one_torch_thread

runner = CliRunner()
PROMPT = "a red apple on a table"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def plain(text: str) -> str:
    """Terminal output as one line of words, without the boxes rich draws around errors."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def missing(made: samplers.SamplerChoice) -> str | None:
    """The package a choice needs that is not installed here (diffusers' requirement)."""
    effective = made.sampler.automatic if made.schedule == samplers.AUTOMATIC else made.schedule
    for package in (made.sampler.needs, samplers.SCHEDULE_NEEDS.get(effective or "")):
        if package and importlib.util.find_spec(package) is None:
            return package
    return None


ALL_CHOICES = [samplers.SamplerChoice(s, t) for s in samplers.SAMPLERS.values()
               for t in s.schedule_types]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


# --------------------------------------------------------------------------------------------
# the registry (pure: nothing loads)


def test_names_are_found_in_any_case_and_old_combined_names_split():
    assert samplers.choice("dpm++ 2m", "KARRAS").describe() == "DPM++ 2M, Karras"
    assert samplers.choice("EULER A").describe() == "Euler a, Automatic"
    assert samplers.choice("k_dpmpp_2m").sampler.name == "DPM++ 2M"
    assert samplers.choice("Euler", "sgm_uniform").schedule == "SGM Uniform"
    # WebUI < 1.9 wrote the schedule into the sampler's name.
    assert samplers.choice("DPM++ 2M Karras").describe() == "DPM++ 2M, Karras"
    assert samplers.choice("DPM++ 2M SDE Exponential").describe() == "DPM++ 2M SDE, Exponential"
    with pytest.raises(samplers.SamplerError, match="already says schedule type Karras"):
        samplers.choice("DPM++ 2M Karras", "Exponential")
    assert samplers.sampler_names()[:3] == ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE"]
    for name in ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM2", "DPM2 a",
                 "Heun", "LMS", "DDIM", "PLMS", "UniPC", "LCM"):
        assert name in samplers.SAMPLERS


def test_unknown_names_list_the_known_ones():
    with pytest.raises(samplers.SamplerError) as caught:
        samplers.choice("DPM++ 2N")
    message = str(caught.value)
    assert "Unknown sampler 'DPM++ 2N'. Did you mean 'DPM++ 2M'?" in message
    assert ", ".join(samplers.SAMPLERS) in message
    with pytest.raises(samplers.SamplerError, match="Unknown schedule type 'karas'. Did you "
                       "mean 'Karras'\\? Known schedule types: Automatic, Uniform, Karras"):
        samplers.choice("Euler", "karas")
    with pytest.raises(samplers.SamplerError, match="Unknown scheduler 'plms': use ddim, dpm, "
                       "euler"):
        samplers.legacy_choice("plms")


def test_combinations_diffusers_lacks_are_refused_with_what_works():
    with pytest.raises(samplers.SamplerError) as caught:
        samplers.choice("Euler a", "Karras")
    assert str(caught.value).startswith(
        "Euler a has no 'Karras' schedule in diffusers. With Euler a use: Automatic, Uniform, "
        "SGM Uniform, DDIM. Samplers that take Karras: DPM++ 2M, DPM++ SDE, DPM++ 2M SDE, "
        "Euler, LMS, Heun, DPM2, DPM2 a, UniPC.")
    with pytest.raises(samplers.SamplerError, match="LCM has no 'SGM Uniform' schedule"):
        samplers.choice("LCM", "SGM Uniform")


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setattr(samplers, "_installed", lambda package: False)
    with pytest.raises(samplers.SamplerError, match="The DPM\\+\\+ SDE sampler needs the Python "
                       "package 'torchsde', which is not installed: install it \\(pip install "
                       "torchsde\\) or pick another sampler: DPM\\+\\+ 2M,"):
        samplers.choice("DPM++ SDE")
    with pytest.raises(samplers.SamplerError, match="The Beta schedule needs the Python package "
                       "'scipy'"):
        samplers.choice("Euler", "Beta")
    with pytest.raises(samplers.SamplerError, match="The LMS sampler needs .* 'scipy'"):
        samplers.choice("LMS")
    monkeypatch.setattr(samplers, "_installed", lambda package: True)
    assert samplers.choice("DPM++ SDE", "Beta").schedule == "Beta"


@pytest.mark.skipif(importlib.util.find_spec("torchsde") is not None,
                    reason="torchsde is installed here")
def test_dpm_sde_is_refused_here_without_torchsde():
    with pytest.raises(samplers.SamplerError, match="needs the Python package 'torchsde'"):
        samplers.choice("DPM++ SDE", "Karras")


def test_overrides_follow_diffusers_table():
    def over(name, schedule=None):
        return samplers.choice(name, schedule).overrides()

    karras = over("DPM++ 2M", "Karras")
    assert karras["use_karras_sigmas"] is True and karras["algorithm_type"] == "dpmsolver++"
    assert karras["use_exponential_sigmas"] is False and karras["timestep_spacing"] == "linspace"
    # Automatic is the WebUI's: DPM++ 2M -> Karras, DPM++ 2M SDE -> Exponential, Euler -> Uniform.
    assert over("DPM++ 2M") == karras
    sde = over("DPM++ 2M SDE")
    assert sde["algorithm_type"] == "sde-dpmsolver++" and sde["use_exponential_sigmas"] is True
    assert over("Euler")["timestep_spacing"] == "linspace"
    assert over("Euler a", "SGM Uniform") == {"timestep_spacing": "trailing"}
    assert over("DDIM", "DDIM") == {"timestep_spacing": "leading", "steps_offset": 1}
    assert over("DDIM") == {} and over("LCM") == {}  # the model's own config
    assert over("PLMS") == {"skip_prk_steps": True}
    assert samplers.legacy_choice("dpm").overrides() == {}


def test_choose_takes_options_then_config_then_ddim():
    nothing = (None, None)
    assert samplers.choose(configured=nothing).legacy == "ddim"
    assert samplers.choose(scheduler="dpm", configured=nothing).legacy == "dpm"
    # --scheduler and --sampler: only when both name the same sampler.
    assert samplers.choose(scheduler="euler", sampler="euler", configured=nothing).legacy == \
        "euler"
    with pytest.raises(samplers.SamplerError, match="--scheduler dpm and --sampler/--schedule "
                       "both choose the sampler"):
        samplers.choose(scheduler="dpm", sampler="Euler", configured=nothing)
    with pytest.raises(samplers.SamplerError, match="both choose"):
        samplers.choose(scheduler="dpm", schedule="Karras", configured=nothing)
    configured = ("DPM++ 2M SDE", "Karras")
    assert samplers.choose(configured=configured).describe() == "DPM++ 2M SDE, Karras"
    # The config's schedule goes with the config's sampler only.
    assert samplers.choose(sampler="Euler", configured=configured).describe() == \
        "Euler, Automatic"
    assert samplers.choose(schedule="Exponential", configured=configured).describe() == \
        "DPM++ 2M SDE, Exponential"
    with pytest.raises(samplers.SamplerError, match="DDIM has no 'Karras' schedule"):
        samplers.choose(schedule="Karras", configured=nothing)


def test_the_older_scheduler_values_write_the_schedule_their_config_amounts_to():
    ddim, dpm = samplers.legacy_choice("ddim"), samplers.legacy_choice("dpm")
    leading = {"timestep_spacing": "leading", "steps_offset": 1}
    assert samplers.schedule_label(ddim, leading) == "Automatic"
    assert samplers.schedule_label(dpm, leading) == "DDIM"
    assert samplers.schedule_label(dpm, {"timestep_spacing": "linspace"}) == "Uniform"
    assert samplers.schedule_label(dpm, {"use_karras_sigmas": True}) == "Automatic"
    assert samplers.schedule_label(samplers.legacy_choice("euler"),
                                   {"timestep_spacing": "trailing"}) == "SGM Uniform"
    assert samplers.choice("DDIM").key == "ddim" and dpm.key == "dpm"
    assert samplers.choice("DPM++ 2M").key == "DPMSolverMultistepScheduler"


# --------------------------------------------------------------------------------------------
# renders equal diffusers' pipelines with the same scheduler


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """tiny's parts, and diffusers' StableDiffusionPipeline on the same parts."""
    from diffusers import StableDiffusionPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELEBCTL_HOME", str(tmp_path_factory.mktemp("sd-home")))
        parts = models.load_pipeline_components("tiny", "cpu", "fp32")
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return parts, pipe


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """tiny-xl's parts, and diffusers' StableDiffusionXLPipeline from the same folder."""
    from diffusers import StableDiffusionXLPipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELEBCTL_HOME", str(tmp_path_factory.mktemp("xl-home")))
        parts = models.load_pipeline_components("tiny-xl", "cpu", "fp32")
        with models.quiet_libraries():
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(models.tiny_model_dir("tiny-xl")), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return parts, pipe


def same_as_diffusers(parts, pipe, made, tmp_path, guidance=7.5, steps=2, seed=4):
    """Render with celebctl and with diffusers' pipeline; return both images as arrays."""
    import torch

    result = rendering.render_prompt(PROMPT, components=parts, sampler=made.sampler.name,
                                     schedule=made.schedule, steps=steps, seed=seed,
                                     guidance=guidance, out_dir=tmp_path)
    ours = np.asarray(Image.open(result.paths[0]).convert("RGB"))
    pipe.scheduler = rendering.make_scheduler(made, parts.scheduler.config)
    if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE: its Brownian tree's seed
        pipe.scheduler.register_to_config(noise_sampler_seed=[seed])
        pipe.scheduler.noise_sampler_seed = [seed]
    with models.quiet_libraries():
        theirs = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=64,
                      width=64, generator=[torch.Generator("cpu").manual_seed(seed)]).images[0]
    assert result.sampler == made.sampler.name and result.schedule_type == made.schedule
    return ours, np.asarray(theirs.convert("RGB"))


@pytest.mark.parametrize("made", ALL_CHOICES, ids=lambda c: c.describe())
def test_every_sampler_and_schedule_draws_what_diffusers_draws(sd, made, tmp_path):
    if missing(made):
        with pytest.raises(samplers.SamplerError, match=f"'{missing(made)}'"):
            rendering.render_prompt(PROMPT, model="tiny", sampler=made.sampler.name,
                                    schedule=made.schedule, out_dir=tmp_path)
        pytest.skip(f"needs {missing(made)}, not installed here (refused, as checked)")
    ours, theirs = same_as_diffusers(*sd, made, tmp_path)
    # Bit for bit: the same scheduler, the same noise from the same CPU generator.
    np.testing.assert_array_equal(ours, theirs)


XL_CHOICES = ([samplers.SamplerChoice(s) for s in samplers.SAMPLERS.values()]
              + [samplers.SamplerChoice(samplers.SAMPLERS["DPM++ 2M"], t)
                 for t in samplers.SCHEDULE_TYPES[1:]])


@pytest.mark.parametrize("made", XL_CHOICES, ids=lambda c: c.describe())
def test_sdxl_samplers_draw_what_diffusers_draws(xl, made, tmp_path):
    if missing(made):
        pytest.skip(f"needs {missing(made)}, not installed here")
    ours, theirs = same_as_diffusers(*xl, made, tmp_path)
    np.testing.assert_array_equal(ours, theirs)


def test_few_step_samplers_work_without_guidance(sd, tmp_path):
    for made in (samplers.choice("LCM"), samplers.choice("Euler", "SGM Uniform")):
        ours, theirs = same_as_diffusers(*sd, made, tmp_path, guidance=1.0, steps=4)
        np.testing.assert_array_equal(ours, theirs)


def test_a_stochastic_sampler_draws_each_image_from_its_own_seed(sd, tmp_path):
    parts, _ = sd
    batched = rendering.render_prompt(PROMPT, components=parts, sampler="Euler a", steps=2,
                                      seed=10, num_images=3, batch_size=2, out_dir=tmp_path)
    alone = rendering.render_prompt(PROMPT, components=parts, sampler="Euler a", steps=2,
                                    seed=11, out_dir=tmp_path)
    a = np.asarray(Image.open(batched.paths[1]), dtype=int)
    b = np.asarray(Image.open(alone.paths[0]), dtype=int)
    assert np.abs(a - b).max() <= 1  # batched matmuls may round differently, nothing more
    first = np.asarray(Image.open(batched.paths[0]), dtype=int)
    assert np.abs(first - a).max() > 10


def test_second_order_samplers_count_steps_not_timesteps(sd, tmp_path):
    calls = []
    rendering.render_prompt(PROMPT, components=sd[0], sampler="Heun", steps=3, out_dir=tmp_path,
                            progress=lambda *args: calls.append(args[1:3]))
    assert calls[-1] == (3, 3) and all(done <= 3 for done, _ in calls)


def test_the_default_render_is_unchanged(sd, tmp_path):
    parts, _ = sd
    default = rendering.render_prompt(PROMPT, components=parts, steps=2, out_dir=tmp_path)
    ddim = rendering.render_prompt(PROMPT, components=parts, steps=2, scheduler="ddim",
                                   out_dir=tmp_path)
    named = rendering.render_prompt(PROMPT, components=parts, steps=2, sampler="ddim",
                                    out_dir=tmp_path)
    assert default.paths[0].read_bytes() == ddim.paths[0].read_bytes() == \
        named.paths[0].read_bytes()
    assert default.scheduler == "ddim" and default.schedule_type == "Automatic"
    assert parts.scheduler.__class__.__name__ == "DDIMScheduler"  # never replaced


# --------------------------------------------------------------------------------------------
# PNG text


def test_png_text_says_sampler_and_schedule_type_as_the_webui_writes_them(sd, tmp_path):
    result = rendering.render_prompt(PROMPT, components=sd[0], sampler="dpm++ 2m",
                                     schedule="karras", steps=2, seed=3, out_dir=tmp_path)
    meta = rendering.read_png_metadata(result.paths[0])
    line = meta["parameters"].splitlines()[-1]
    assert line.startswith("Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5,")
    assert meta["sampler"] == "DPM++ 2M" and meta["schedule_type"] == "Karras"
    assert meta["celebctl"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert meta["celebctl"]["scheduler_config"]["use_karras_sigmas"] is True
    # The WebUI's PNG Info regex reads the same pairs.
    fields = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line))
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"
    parsed = infotext.parse_parameters(meta["parameters"])
    assert parsed.prompt == PROMPT and parsed.negative_prompt == ""
    assert (parsed.sampler, parsed.schedule_type) == ("DPM++ 2M", "Karras")
    assert parsed.settings["Seed"] == "3"
    # Rendering the PNG's own settings again gives the same image.
    again = rendering.render_prompt(PROMPT, components=sd[0], sampler=parsed.sampler,
                                    schedule=parsed.schedule_type, steps=2, seed=3,
                                    out_dir=tmp_path)
    assert again.paths[0].read_bytes() == result.paths[0].read_bytes()


def test_infotext_of_other_tools_and_older_webuis():
    old = infotext.parse_parameters(
        "a cat,\nin the rain\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, "
        'CFG scale: 7, Seed: 1, Size: 512x512, Lora hashes: "x: 1, y: 2"')
    assert old.prompt == "a cat,\nin the rain" and old.negative_prompt == "blurry"
    assert (old.sampler, old.schedule_type) == ("DPM++ 2M", "Karras")
    assert old.settings["Lora hashes"] == "x: 1, y: 2"
    plain = infotext.parse_parameters("Steps: 20, Sampler: Euler a, CFG scale: 7")
    assert plain.prompt == "" and (plain.sampler, plain.schedule_type) == ("Euler a", None)
    other = infotext.parse_parameters("x\nSteps: 4, Sampler: Restart, Schedule type: Align "
                                      "Your Steps, CFG scale: 7")
    assert (other.sampler, other.schedule_type) == ("Restart", "Align Your Steps")
    assert infotext.parse_parameters("just a prompt, nothing else").settings == {}
    assert infotext.parse_parameters("") is None


# --------------------------------------------------------------------------------------------
# the config's defaults


def write_config(text: str) -> None:
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_config_defaults_apply_to_render_and_are_checked(tiny_home, sd, tmp_path, no_models):
    write_config('sampler = "DPM++ 2M"\nschedule = "Karras"\n')
    assert models.configured_sampling() == ("DPM++ 2M", "Karras")
    assert rendering.sampler_choice().describe() == "DPM++ 2M, Karras"
    write_config('sampler = "DPM++ 2N"\n')
    with pytest.raises(samplers.SamplerError, match="In the config file .*config.toml: Unknown "
                       "sampler 'DPM\\+\\+ 2N'"):
        rendering.sampler_choice()
    result = invoke("render", PROMPT, "--model", "tiny", "-o", tmp_path)
    assert result.exit_code == 1 and "Unknown sampler 'DPM++ 2N'" in plain(result.stderr)
    write_config("sampler = 3\n")
    with pytest.raises(InvalidOption, match="`sampler` in .* must be a "
                       "non-empty string"):
        models.configured_sampling()
    write_config('schedule = "Karras"\nsampler = "Euler a"\n')
    with pytest.raises(samplers.SamplerError, match="Euler a has no 'Karras' schedule"):
        models.configured_sampling()
    assert no_models == []


def test_a_render_without_options_uses_the_configs_sampler(tiny_home, sd, tmp_path):
    write_config('sampler = "Euler a"\nschedule = "SGM Uniform"\n')
    result = rendering.render_prompt(PROMPT, components=sd[0], steps=2, out_dir=tmp_path)
    meta = rendering.read_png_metadata(result.paths[0])
    assert "Sampler: Euler a, Schedule type: SGM Uniform," in meta["parameters"]
    given = rendering.render_prompt(PROMPT, components=sd[0], steps=2, sampler="DDIM",
                                    out_dir=tmp_path)
    assert given.sampler == "DDIM" and given.schedule_type == "Automatic"


# --------------------------------------------------------------------------------------------
# eval and render --prompts


def test_eval_images_reads_sampler_and_schedule_type(home, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    texts = {"a-new.png": "alice\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG "
                          "scale: 7",
             "b-old.png": "alice\nSteps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 7",
             "c-none.png": None}
    for name, text in texts.items():
        info = PngInfo()
        if text:
            info.add_text("parameters", text)
        Image.open(PHOTO).convert("RGB").resize((128, 128)).save(folder / name, pnginfo=info)
    result = evaluation.evaluate_images(["alice"], folder, device="cpu")
    rows = {r.file: (r.sampler, r.schedule_type) for r in result.images}
    assert rows == {"a-new.png": ("DPM++ 2M", "Karras"), "b-old.png": ("DPM++ 2M SDE", "Karras"),
                    "c-none.png": (None, None)}
    out = invoke("eval", "alice", "--images", folder, "--no-clip", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["images"][0]["schedule_type"] == "Karras"
    refused = invoke("eval", "alice", "--images", folder, "--sampler", "Euler")
    assert refused.exit_code == 2 and "--sampler cannot be used with --images" in \
        plain(refused.stderr)


def test_eval_renders_with_the_sampler_given(home, tmp_path, monkeypatch):
    seen = []
    real = rendering.render_prompt

    def spy(*args, **kwargs):
        seen.append((kwargs.get("sampler"), kwargs.get("schedule")))
        return real(*args, **kwargs)

    monkeypatch.setattr(rendering, "render_prompt", spy)
    result = evaluation.evaluate(["alice"], model="tiny", device="cpu", seeds=1, steps=2,
                                 out_dir=tmp_path, record=False, sampler="Euler a",
                                 schedule="SGM Uniform")
    assert seen and set(seen) == {("Euler a", "SGM Uniform")}
    assert (result.sampler, result.schedule_type) == ("Euler a", "SGM Uniform")
    params = rendering.read_png_metadata(result.images[0].path)["parameters"]
    assert "Sampler: Euler a, Schedule type: SGM Uniform," in params
    with pytest.raises(samplers.SamplerError, match="Unknown sampler"):
        evaluation.evaluate(["alice"], model="tiny", sampler="nope", out_dir=tmp_path)


def test_prompts_file_treats_the_sampler_as_a_setting(home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice riding a bike\n", encoding="utf-8")
    out = tmp_path / "out"
    common = ("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o", out,
              "--quiet")
    first = invoke(*common, "--sampler", "Euler a", "--json")
    assert first.exit_code == 0, first.output
    made = json.loads(first.stdout)
    assert made["written"] == 1 and made["sampler"] == "Euler a"
    again = invoke(*common, "--sampler", "euler A", "--schedule", "automatic", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 1
    other = invoke(*common, "--sampler", "Euler a", "--schedule", "SGM Uniform")
    assert other.exit_code == 1 and "was made with other settings (schedule_type: " \
        "'Automatic', not 'SGM Uniform')" in plain(other.stderr)
    # A PNG from before schedule types were recorded is this job's image still.
    png = next(out.iterdir())
    legacy_dir = tmp_path / "legacy"
    legacy = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o",
                    legacy_dir, "--quiet", "--scheduler", "dpm")
    assert legacy.exit_code == 0, legacy.output
    png = next(legacy_dir.iterdir())
    with Image.open(png) as image:
        text = dict(image.text)
        pixels = image.copy()
    settings = json.loads(text["celebctl"])
    del settings["schedule_type"]
    info = PngInfo()
    info.add_text("parameters", text["parameters"])
    info.add_text("celebctl", json.dumps(settings))
    pixels.save(png, pnginfo=info)
    resumed = invoke("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o",
                     legacy_dir, "--quiet", "--scheduler", "dpm", "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["skipped"] == 1


# --------------------------------------------------------------------------------------------
# the CLI


def test_render_help_lists_the_sampler_and_schedule_names():
    result = runner.invoke(app, ["render", "--help"], env={"COLUMNS": "300"})
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0
    assert ", ".join(samplers.SAMPLERS) in text
    assert ", ".join(samplers.SCHEDULE_TYPES) in text


def test_cli_refuses_bad_names_before_loading(tiny_home, tmp_path, no_models):
    result = invoke("render", PROMPT, "--model", "tiny", "--sampler", "Eulr", "-o", tmp_path)
    assert result.exit_code == 2 and "Unknown sampler 'Eulr'. Did you mean 'Euler'?" in \
        plain(result.stderr)
    result = invoke("render", PROMPT, "--model", "tiny", "--sampler", "Euler a", "--schedule",
                    "Karras", "-o", tmp_path)
    assert result.exit_code == 2 and "Euler a has no 'Karras' schedule" in \
        plain(result.stderr)
    result = invoke("render", PROMPT, "--scheduler", "dpm", "--sampler", "Euler", "-o",
                    tmp_path)
    assert result.exit_code == 2 and "both choose the sampler" in plain(result.stderr)
    result = invoke("render", PROMPT, "--model", "tiny", "--schedule", "nope", "-o", tmp_path)
    assert result.exit_code == 2 and "Unknown schedule type 'nope'" in \
        plain(result.stderr)
    assert no_models == []


def test_dry_run_shows_the_sampler(tiny_home):
    result = invoke("render", PROMPT, "--model", "tiny", "--sampler", "DPM++ 2M SDE",
                    "--dry-run")
    assert result.exit_code == 0 and "Sampler:    DPM++ 2M SDE, schedule type Automatic" in \
        result.stdout
    result = invoke("render", PROMPT, "--model", "tiny", "--sampler", "euler", "--schedule",
                    "karras", "--dry-run", "--json")
    made = json.loads(result.stdout)
    assert (made["sampler"], made["schedule_type"]) == ("Euler", "Karras")


def test_cli_render_with_a_webui_sampler(tiny_home, tmp_path):
    result = invoke("render", PROMPT, "--model", "tiny", "--steps", 2, "--sampler", "UniPC",
                    "--schedule", "karras", "-o", tmp_path, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert (made["sampler"], made["schedule_type"]) == ("UniPC", "Karras")
    assert made["scheduler"] == "UniPCMultistepScheduler"
