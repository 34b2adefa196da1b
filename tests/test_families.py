"""SD 2.x and SDXL (issue 13) on the built-in `tiny-sd2` and `tiny-xl`, tested like SD 1.x."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from celebctl import basis, export, fitting, models, registry, rendering
from celebctl.errors import BasisMismatch, ModelUnavailable
from celebctl.fitting import FitSettings, FitSubject, fit_identities
from celebctl.models import families
from tests.helpers import PHOTO, add_identity, one_torch_thread

runner = CliRunner()
FIT = ["--steps", "2", "--quiet"]


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def family_home(tmp_path_factory):
    """A data home with the three tiny families, their bases and one identity each."""
    from tests.helpers import data_home

    root = tmp_path_factory.mktemp("families")
    with data_home(root), one_torch_thread():
        for model, name in (("tiny", "ann"), ("tiny-sd2", "sam"), ("tiny-xl", "xena")):
            fitting.add_identity_from_photo(name, PHOTO, model=model, device="cpu",
                                            settings=FitSettings(steps=2, pool_size=2))
        fitting.add_identity_from_photo("xavier", PHOTO, model="tiny-xl", device="cpu",
                                        settings=FitSettings(steps=2, pool_size=2, seed=1))
    return root


@pytest.fixture
def fhome(celebctl_home, family_home):
    import shutil

    shutil.copytree(family_home, celebctl_home, dirs_exist_ok=True)
    return celebctl_home


def test_each_family_loads_as_itself(tiny_home):
    for name, family, widths, prediction in (("tiny", "sd1", [32], "epsilon"),
                                             ("tiny-sd2", "sd2", [48], "v_prediction"),
                                             ("tiny-xl", "sdxl", [32, 48], "epsilon")):
        components = models.load_pipeline_components(name, "cpu", "fp32")
        assert components.family == family and models.resolve_model_spec(name).family == family
        assert families.encoder_widths(components.text_encoders) == widths
        assert components.scheduler.config.prediction_type == prediction
        pad = "!" if family != "sd1" else "<|endoftext|>"
        assert components.tokenizers[-1].pad_token == pad


def test_bases_record_family_and_widths(fhome):
    infos = {b.family: b for b in basis.list_bases()}
    assert set(infos) == {"sd1", "sd2", "sdxl"}
    xl = infos["sdxl"]
    assert xl.encoder_widths == [32, 48] and xl.hidden == 80 and xl.p == 80
    assert xl.explained_variance_cumulative["all"][0] > 0.99
    assert infos["sd2"].encoder_widths == [48]
    shown = json.loads(invoke("basis", "show", xl.id, "--json").stdout)
    assert shown["family"] == "sdxl" and shown["encoder_widths"] == [32, 48]


def test_identities_record_family(fhome):
    xena = registry.get_identity("xena")
    assert xena.family == "sdxl" and xena.meta["encoder_widths"] == [32, 48]
    assert xena.load_coefficients().shape == (2, 80)
    assert registry.get_identity("sam").family == "sd2"
    data = json.loads(invoke("list", "--json").stdout)
    assert {i["name"]: i["family"] for i in data["identities"]} == {
        "ann": "sd1", "sam": "sd2", "xena": "sdxl", "xavier": "sdxl"}
    assert "SDXL" in invoke("list").stdout


@pytest.mark.parametrize("name", ["sam", "xena"])
def test_render_joint_export_import_per_family(fhome, tmp_path, name):
    result = invoke("render", f"{name} riding a bike", "--steps", 2, "-n", 2, "--grid",
                    "--quiet", "--json", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["expanded"] == f"<{name}> person riding a bike"
    assert len(data["paths"]) == 2 and data["grid"]
    other = "xavier" if name == "xena" else None
    if other:
        assert invoke("joint", name, other, *FIT).exit_code == 0
        assert invoke("render", f"{name} shaking hands with {other}", "--steps", 1,
                      "--quiet", "--out", tmp_path / "r").exit_code == 0
    assert invoke("export", name, "-o", tmp_path / "b.celeb").exit_code == 0
    assert invoke("import", tmp_path / "b.celeb", "--as", "copy").exit_code == 0
    copy = registry.get_identity("copy")
    assert copy.family == registry.get_identity(name).family
    np.testing.assert_array_equal(copy.load_coefficients(),
                                  registry.get_identity(name).load_coefficients())


def test_sdxl_exports_carry_both_encoders(fhome, tmp_path):
    from safetensors.numpy import load

    result = invoke("export", "xena", "-f", "a1111", "-o", tmp_path / "xena.safetensors")
    assert result.exit_code == 0, result.output
    tensors = load((tmp_path / "xena.safetensors").read_bytes())
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (2, 32) and tensors["clip_g"].shape == (2, 48)
    vectors, _ = export.identity_token_vectors("xena")
    np.testing.assert_array_equal(np.concatenate([tensors["clip_l"], tensors["clip_g"]], 1),
                                  vectors.numpy())
    assert invoke("export", "xena", "-f", "diffusers", "-o", tmp_path / "ti").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "ti").iterdir()) == [
        "learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    sd2 = load(export.a1111_bytes("sam"))
    assert set(sd2) == {"<sam>"} and sd2["<sam>"].shape == (2, 48)


def test_diffusers_sdxl_renders_what_celebctl_renders(fhome, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = rendering.render_prompt("xena smiling", steps=3, seed=7, guidance=7.5,
                                     out_dir=tmp_path / "r", device="cpu", dtype="fp32")
    ours = np.asarray(Image.open(result.paths[0]).convert("RGB"))
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
    assert result.expanded == "<xena> person smiling"
    np.testing.assert_array_equal(np.asarray(theirs.convert("RGB")), ours)


def test_families_are_never_mixed(fhome, no_models):
    with pytest.raises(BasisMismatch, match="different Stable Diffusion families"):
        rendering.plan_render("ann and xena")
    result = invoke("joint", "ann", "xena", *FIT)
    assert result.exit_code == 1 and "different Stable Diffusion families" in result.stderr
    with pytest.raises(BasisMismatch, match="fitted for SD 1.x, but tiny-xl is a model of"):
        rendering.plan_render("ann", model="tiny-xl")
    assert no_models == []


@pytest.fixture
def no_models(monkeypatch):
    loaded = []
    monkeypatch.setattr(models, "load_pipeline_components",
                        lambda *a, **k: loaded.append(a) or pytest.fail("model loaded"))
    return loaded


def test_a_tiny_xl_fit_learns(tiny_home):
    components = models.load_pipeline_components("tiny-xl", "cpu", "fp32")
    info = basis.ensure_basis(text_model=components.text_model())
    loaded = basis.load_basis(info.id)
    from celebctl import faces

    face = faces.prepare_face(PHOTO).aligned
    encoder = faces.load_face_encoder("random-init")

    def fit(lr):
        return np.array(fit_identities(components, loaded.mean, loaded.components,
                                       [FitSubject("x", face)], encoder,
                                       FitSettings(steps=60, seed=3, pool_size=16, lr=lr)).losses)

    with one_torch_thread():
        trained, frozen = fit(1e-2), fit(1e-12)
    assert trained[0] == frozen[0]
    gap = frozen - trained
    assert gap[-10:].mean() > 0.02 and gap[-10:].mean() > gap[:10].mean()


def test_v_prediction_loss_equals_an_independent_computation(tiny_home):
    from tests.test_speed_paths import _step_setup

    components = models.load_pipeline_components("tiny-sd2", "cpu", "fp32")
    loaded = basis.load_basis(basis.ensure_basis(text_model=components.text_model()).id)
    from celebctl import faces

    face = faces.prepare_face(PHOTO).aligned
    step, tensors, templates, pool, mapping = _step_setup(
        components, loaded, face, faces.load_face_encoder("random-init"))
    step.v_prediction = True
    schedule = tensors.schedule
    with torch.no_grad():
        picks = schedule.picks[0]
        latents = (pool.latent_mean[picks] + pool.latent_std[picks] * schedule.latent_noise[0]
                   ) * pool.scaling
        coeffs = mapping(pool.features[picks], schedule.owners[0])
        from celebctl import prompting

        vectors = prompting.identity_vectors(coeffs, loaded.mean, loaded.components)
        renamed = [prompting.TokenizedPrompt(templates[int(t)].input_ids,
                                             [(p, f"s{b}", k) for p, _, k in
                                              templates[int(t)].slots],
                                             templates[int(t)].length)
                   for b, t in enumerate(schedule.templates[0])]
        ids, mask, values = prompting.build_slot_tensors(
            renamed, {f"s{b}": vectors[b] for b in range(2)}, loaded.hidden)
        states = prompting.encode_tokens(components.text_encoder, ids, mask, values)
        t = schedule.timesteps[0]
        noisy = components.scheduler.add_noise(latents, schedule.noise[0], t)
        target = components.scheduler.get_velocity(latents, schedule.noise[0], t)
        expected = torch.nn.functional.mse_loss(components.unet(noisy, t, states).sample, target)
    with step.hooked():
        step.run(0)
    assert float(tensors.loss[0]) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def _safetensors_header(path, keys):
    header = {key: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i, key in enumerate(keys)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(keys))
    return path


@pytest.mark.parametrize("key, family", [
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ("cond_stage_model.model.ln_final.weight", "sd2"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
])
def test_single_files_tell_their_family(tmp_path, key, family):
    path = _safetensors_header(tmp_path / "model.safetensors", [key, "other.weight"])
    assert models.single_file_family(path) == family
    assert models.resolve_model_spec(str(path)).family == family


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_describe_the_real_architectures(tmp_path, family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    models.write_config_folder(tmp_path, family)
    unet = UNet2DConditionModel.load_config(str(tmp_path / "unet"))
    vae = AutoencoderKL.load_config(str(tmp_path / "vae"))
    text = CLIPTextConfig.from_pretrained(str(tmp_path / "text_encoder"))
    expected = {"sd1": (768, 64), "sd2": (1024, 96), "sdxl": (2048, 128)}[family]
    assert (unet["cross_attention_dim"], unet["sample_size"]) == expected
    assert text.hidden_size == {"sd1": 768, "sd2": 1024, "sdxl": 768}[family]
    assert vae["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert ("text_encoder_2" in index) == (family == "sdxl")


def test_real_family_models_fail_offline_with_the_usual_error(tiny_home):
    for ref in ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-2-1"):
        with pytest.raises(ModelUnavailable, match="hf download"):
            models.load_pipeline_components(ref, "cpu", "fp32")


def test_schema_2_identities_read_as_sd1(tiny_home):
    import tomli_w

    ident = add_identity("old", seed=4, basis_id=basis.list_bases()[0].id)
    meta = dict(ident.meta)
    meta["schema_version"] = 2
    meta.pop("family")
    meta.pop("encoder_widths")
    (ident.path / registry.IDENTITY_TOML).write_text(tomli_w.dumps(meta), "utf-8")
    again = registry.get_identity("old")
    assert again.family == "sd1" and again.meta["encoder_widths"] == [32]
