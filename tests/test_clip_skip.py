"""Clip skip (issue 23, point 2) and moving identities to another checkpoint (point 5): the
layer read equals diffusers' own ``clip_skip``, fits record theirs, renders use it, the PNG text
carries it, the config sets it per model, and `refit` from crops equals `add`."""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from celebctl import clipskip, export, fitting, models, registry, rendering
from celebctl.errors import FitError, IdentityExists, InvalidOption
from celebctl.fitting import FitSettings
from celebctl.models import families
from celebctl.registry import schema
from tests.helpers import PHOTO, data_home, make_write, one_torch_thread

runner = CliRunner()
FIT = dict(steps=2, pool_size=2, seed=5)


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def skip_home(tmp_path_factory):
    """tiny: 'one' fitted at clip skip 1 and 'two' at clip skip 2 (same photo, same settings);
    tiny-xl: 'xena' at clip skip 1."""
    root = tmp_path_factory.mktemp("clip-skip")
    with data_home(root), one_torch_thread():
        fitting.add_identity_from_photo("one", PHOTO, model="tiny", device="cpu",
                                        settings=FitSettings(**FIT))
        fitting.add_identity_from_photo("two", PHOTO, model="tiny", device="cpu",
                                        settings=FitSettings(**FIT, clip_skip=2))
        fitting.add_identity_from_photo("xena", PHOTO, model="tiny-xl", device="cpu",
                                        settings=FitSettings(**FIT))
    return root


@pytest.fixture
def shome(celebctl_home, skip_home):
    shutil.copytree(skip_home, celebctl_home, dirs_exist_ok=True)
    return celebctl_home


@pytest.fixture
def no_models(monkeypatch):
    loaded = []
    monkeypatch.setattr(models, "load_pipeline_components",
                        lambda *a, **k: loaded.append(a) or pytest.fail("model loaded"))
    return loaded


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _transformers5_shim(encoder):
    """diffusers 0.42.1 reads ``text_encoder.text_model.final_layer_norm`` for clip skip;
    transformers 5 keeps the norm on the model itself. Point the old name at it (no copy)."""
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model",
                           types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


# --------------------------------------------------------------------------------------------
# the layer read equals diffusers' clip_skip


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_render_equals_diffusers_clip_skip(shome, tmp_path, clip_skip):
    """WebUI clip skip N on SD 1.x is diffusers' clip_skip=N-1 (None for 1), bit for bit. The
    negative prompt is read at the same layer (diffusers' pipeline reads it at the last layer
    whatever clip_skip says, so its embeddings are passed in, made by its own encode_prompt)."""
    from diffusers import StableDiffusionPipeline

    result = rendering.render_prompt("two smiling", negative="blurry", steps=3, seed=7,
                                     guidance=7.5, out_dir=tmp_path / "r", device="cpu",
                                     dtype="fp32", clip_skip=clip_skip)
    assert result.clip_skip == clip_skip
    export.export_identity("two", tmp_path / "two.safetensors", "a1111")
    with models.quiet_libraries():
        pipe = StableDiffusionPipeline.from_pretrained(
            str(models.tiny_model_dir("tiny")), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.load_textual_inversion(str(tmp_path / "two.safetensors"), token="<two>")
        _transformers5_shim(pipe.text_encoder)
        pipe.set_progress_bar_config(disable=True)
        theirs_skip = None if clip_skip == 1 else clip_skip - 1
        prompt_embeds, _ = pipe.encode_prompt(result.expanded, "cpu", 1, False,
                                              clip_skip=theirs_skip)
        negative_embeds, _ = pipe.encode_prompt("blurry", "cpu", 1, False,
                                                clip_skip=theirs_skip)
        theirs = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                      num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                      generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
    np.testing.assert_array_equal(np.asarray(theirs.convert("RGB")), _pixels(result.paths[0]))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_render_at_clip_skip_1_and_2_is_sdxls_own_layer(shome, tmp_path, clip_skip):
    """SDXL already reads the penultimate layer; clip skip 1 and 2 both keep it (the WebUI and
    ComfyUI draw clip skip 2 there): diffusers' pipeline with clip_skip=None, bit for bit."""
    from diffusers import StableDiffusionXLPipeline

    result = rendering.render_prompt("xena smiling", steps=3, seed=7, guidance=7.5,
                                     out_dir=tmp_path / "r", device="cpu", dtype="fp32",
                                     clip_skip=clip_skip)
    export.export_identity("xena", tmp_path / "ti", "diffusers")
    with models.quiet_libraries():
        pipe = StableDiffusionXLPipeline.from_pretrained(str(models.tiny_model_dir("tiny-xl")),
                                                         add_watermarker=False)
        for filename, encoder, tokenizer in (
                ("learned_embeds.safetensors", pipe.text_encoder, pipe.tokenizer),
                ("learned_embeds_2.safetensors", pipe.text_encoder_2, pipe.tokenizer_2)):
            pipe.load_textual_inversion(str(tmp_path / "ti" / filename), token="<xena>",
                                        text_encoder=encoder, tokenizer=tokenizer)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(result.expanded, num_inference_steps=3, guidance_scale=7.5,
                      generator=[torch.Generator("cpu").manual_seed(7)], height=64,
                      width=64).images[0]
    np.testing.assert_array_equal(np.asarray(theirs.convert("RGB")), _pixels(result.paths[0]))


def test_sdxl_deeper_clip_skip_is_diffusers_clip_skip_minus_two(tiny_home):
    """Past 2, SDXL reads hidden_states[-N] of both encoders (ComfyUI's CLIPSetLastLayer -N):
    diffusers' clip_skip=N-2. Checked on 4-layer encoders of the tiny-xl widths."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = models.load_pipeline_components("tiny-xl", "cpu", "fp32")
    torch.manual_seed(0)
    first = CLIPTextModel(CLIPTextConfig(**{
        **models.architectures._tiny_text_config(), "num_hidden_layers": 4})).eval()
    second = CLIPTextModelWithProjection(CLIPTextConfig(**{
        **models.architectures._tiny_xl_text2_config(), "num_hidden_layers": 4})).eval()
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=first, text_encoder_2=second, tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler,
        add_watermarker=False)
    ids = [tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids
           for tok in (parts.tokenizer, parts.tokenizer_2)]
    with torch.no_grad():
        for ours_skip, theirs_skip in ((1, None), (2, None), (3, 1), (4, 2)):
            ours, pooled = families.encode("sdxl", [first, second], ids, ours_skip)
            theirs, _, theirs_pooled, _ = pipe.encode_prompt(
                "a photo of a cat", device="cpu", do_classifier_free_guidance=False,
                clip_skip=theirs_skip)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            torch.testing.assert_close(pooled, theirs_pooled, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# fits record their clip skip; renders use it


def test_a_fit_at_clip_skip_2_differs_and_records_it(shome):
    one, two = registry.get_identity("one"), registry.get_identity("two")
    assert two.meta["clip_skip"] == 2 and two.meta["fit"]["clip_skip"] == 2
    assert one.meta["clip_skip"] == 1 and one.meta["fit"]["clip_skip"] == 1
    assert not np.array_equal(one.load_coefficients(), two.load_coefficients())
    assert (shome / "identities" / "two" / "identity.toml").read_text().count(
        "clip_skip = 2") == 2


def test_render_uses_the_identitys_clip_skip_and_notes_another(shome, tmp_path):
    own = rendering.render_prompt("two smiling", steps=2, out_dir=tmp_path / "a", device="cpu",
                                  dtype="fp32")
    assert own.clip_skip == 2
    assert not [n for n in own.notes if "clip skip" in n]
    other = rendering.render_prompt("two smiling", steps=2, out_dir=tmp_path / "b",
                                    device="cpu", dtype="fp32", clip_skip=1)
    said = [n for n in other.notes if "clip skip" in n]
    assert len(said) == 1 and "two at 2" in said[0] and "Rendering at clip skip 1" in said[0]
    assert not np.array_equal(_pixels(own.paths[0]), _pixels(other.paths[0]))


def test_mixed_clip_skips_take_the_most_common_then_the_lowest(shome, no_models):
    plan = rendering.plan_render("one and two")
    assert plan.clip_skip == 1
    said = [n for n in plan.notes if "clip skip" in n]
    assert len(said) == 1 and "two at 2" in said[0] and "one at" not in said[0]
    assert rendering.plan_render("two and two").clip_skip == 2


def test_png_text_round_trips(shome, tmp_path):
    from celebctl.evaluation.folder import image_text
    from celebctl.infotext import parse_parameters

    def clip_skip_of(text):
        return parse_parameters(text).clip_skip

    two = rendering.render_prompt("two smiling", steps=2, out_dir=tmp_path, device="cpu",
                                  dtype="fp32")
    meta = rendering.read_png_metadata(two.paths[0])
    assert ", Clip skip: 2, " in meta["parameters"]
    assert meta["settings"]["Clip skip"] == "2" and meta["celebctl"]["clip_skip"] == 2
    assert clip_skip_of(image_text(two.paths[0].read_bytes()).get("parameters")) == 2
    one = rendering.render_prompt("one smiling", steps=2, out_dir=tmp_path, device="cpu",
                                  dtype="fp32")
    meta = rendering.read_png_metadata(one.paths[0])
    # As the WebUI: nothing written at clip skip 1, and a render without it is as before.
    assert "Clip skip" not in meta["parameters"] and "clip_skip" not in meta["celebctl"]
    assert clip_skip_of(meta["parameters"]) == 1


def test_prompts_file_reads_each_line_at_its_identities_clip_skip(shome, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one smiling\ntwo smiling\n")
    result = rendering.render_prompts_file(prompts, steps=2, out_dir=tmp_path / "out",
                                           device="cpu", dtype="fp32")
    by_line = {line.number: result.paths_of(i)[0] for i, line in enumerate(result.lines)}
    assert "Clip skip" not in rendering.read_png_metadata(by_line[1])["parameters"]
    assert rendering.read_png_metadata(by_line[2])["settings"]["Clip skip"] == "2"
    # The same job again skips both: the clip skip is one of the settings an image must share.
    again = rendering.render_prompts_file(prompts, steps=2, out_dir=tmp_path / "out",
                                          device="cpu", dtype="fp32")
    assert len(again.skipped) == 2 and not again.written


# --------------------------------------------------------------------------------------------
# config, range, schema


def test_the_config_sets_a_models_clip_skip(shome, no_models, tmp_path):
    (shome / "config.toml").write_text('[models."tiny"]\nclip_skip = 2\n')
    spec = models.resolve_model_spec("tiny")
    assert clipskip.configured_clip_skip(spec) == 2
    assert rendering.plan_render("a cat", model="tiny").clip_skip == 2
    assert fitting.identities.with_clip_skip(FitSettings(), spec).clip_skip == 2
    assert fitting.identities.with_clip_skip(FitSettings(clip_skip=1), spec).clip_skip == 1
    assert rendering.plan_render("a cat", model="tiny-xl").clip_skip == 1
    # Keys are paths as typed, resolved; a checkpoint elsewhere is not this one.
    checkpoint = tmp_path / "pony.safetensors"
    assert clipskip.normalise_model_key(str(checkpoint)) == str(checkpoint.resolve())
    assert clipskip.normalise_model_key("~/m/pony.safetensors").startswith("/")
    assert clipskip.normalise_model_key("owner/repo") == "owner/repo"
    (shome / "config.toml").write_text('[models."tiny"]\nclip_skip = 0\n')
    with pytest.raises(InvalidOption, match=r'clip_skip for \[models."tiny"\]'):
        rendering.plan_render("a cat", model="tiny")


def test_a_clip_skip_out_of_range_is_refused_before_loading(shome, no_models, built):
    with pytest.raises(InvalidOption, match="out of range for tiny: its text encoder has 2 "
                       "layers, so clip skip can be 1 to 2"):
        rendering.plan_render("two smiling", clip_skip=3)
    result = invoke("add", "carol", PHOTO, "--model", "tiny", "--clip-skip", "3", "--quiet")
    assert result.exit_code == 1 and "--clip-skip 3 is out of range" in result.stderr
    result = invoke("render", "two", "--clip-skip", "0", "--dry-run")
    assert result.exit_code == 2
    result = invoke("eval", "two", "--images", shome, "--clip-skip", "2")
    assert result.exit_code == 2 and "--clip-skip" in result.stderr
    assert built == [] and no_models == []


def test_schema_4_migrates_older_identities_to_clip_skip_1(celebctl_home):
    old = {"schema_version": 3, "name": "x", "family": "sd1"}
    assert schema.migrate(dict(old), "x")["clip_skip"] == 1
    assert schema.SCHEMA_VERSION == 4
    ident = registry.save_identity(make_write("old"))
    assert clipskip.identity_clip_skip(ident) == 1
    meta = dict(ident.meta, clip_skip=99)
    with pytest.raises(Exception, match="clip_skip must be a whole number"):
        schema.validate_meta(meta, "old")


# --------------------------------------------------------------------------------------------
# point 5: another checkpoint, and refit


def test_render_says_when_the_checkpoint_is_not_the_identitys(shome, no_models):
    folder = models.tiny_model_dir("tiny")  # the same weights, another model reference
    result = invoke("render", "one smiling", "--model", folder, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    notes = [n for n in json.loads(result.stdout)["notes"] if "another model" in n]
    assert len(notes) == 1 and "one: 'tiny'" in notes[0] and str(folder) in notes[0]


def test_refit_from_crops_equals_add_from_the_same_crops(shome):
    """`one` was added from PHOTO with FIT at clip skip 1, `two` at 2; refitting `two` at clip
    skip 1 from its stored crops gives `one` exactly, and `one` refitted as a new identity is
    `one` again (one torch thread, as the fixture fitted them: the same reductions)."""
    with one_torch_thread():
        outcome = fitting.refit_identities(["one"], model="tiny", as_name="uno", device="cpu",
                                           settings=FitSettings(**FIT))
    uno, one = registry.get_identity("uno"), registry.get_identity("one")
    assert [i.name for i in outcome.identities] == ["uno"]
    np.testing.assert_array_equal(uno.load_coefficients(), one.load_coefficients())
    assert uno.meta["fit"]["refit_from"]["name"] == "one" and uno.meta["clip_skip"] == 1
    assert uno.load_face_pngs() == one.load_face_pngs()
    with one_torch_thread():
        result = invoke("refit", "two", "--model", "tiny", "--replace", "--clip-skip", "1",
                        "--steps", 2, "--pool-size", 2, "--seed", 5, "--device", "cpu",
                        "--quiet")
    assert result.exit_code == 0, result.output
    assert "Refitted 'two' on tiny (clip skip 1)" in result.stdout
    two = registry.get_identity("two")
    assert two.meta["clip_skip"] == 1
    np.testing.assert_array_equal(two.load_coefficients(), one.load_coefficients())


def test_refit_refuses_clearly_before_loading(shome, no_models):
    with pytest.raises(InvalidOption, match="--as NEW .* or --replace"):
        fitting.refit_identities(["one"], model="tiny")
    with pytest.raises(InvalidOption, match="not both"):
        fitting.refit_identities(["one"], model="tiny", as_name="uno", replace=True)
    with pytest.raises(InvalidOption, match="--as names one new identity"):
        fitting.refit_identities(["one", "two"], model="tiny", as_name="uno")
    with pytest.raises(IdentityExists, match="'two' already exists"):
        fitting.refit_identities(["one"], model="tiny", as_name="two")
    registry.save_identity(make_write("faceless", with_face=False))
    with pytest.raises(FitError, match="no face crop .*--no-face"):
        fitting.refit_identities(["faceless"], model="tiny", replace=True)
    with pytest.raises(InvalidOption, match="out of range"):
        fitting.refit_identities(["one"], model="tiny", replace=True,
                                 settings=FitSettings(clip_skip=5))
    result = invoke("refit", "one", "two", "--model", "tiny", "--as", "uno")
    assert result.exit_code == 1 and "--as names one new identity" in result.stderr
