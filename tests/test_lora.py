"""LoRAs (issue 23, point 3): `<lora:NAME:WEIGHT>` and `render --lora FILE[:WEIGHT]`.

Small LoRA files are made here for `tiny` and `tiny-xl` from the loaded modules' names and
shapes, in kohya/WebUI keys (``lora_unet_..._attn2_to_k.lora_down.weight``, ``alpha``) and in
diffusers/peft keys (``unet....to_k.lora_A.weight``), with UNet and text-encoder parts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import denoise, loras, models, rendering
from celebctl.errors import LoraError, PromptError

runner = CliRunner()
STEPS = 3
# Fused weights (W + s·BA, summed once) and diffusers' unfused layers (W·x + s·B(A·x)) round
# differently in float32; on these tiny models that moves a pixel by at most this many levels.
FUSED_TOLERANCE = 2


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def make_lora(parts: models.Components, path: Path, fmt: str = "kohya", seed: int = 0,
              rank: int = 4, unet: bool = True, text: bool = True) -> Path:
    """A LoRA for ``parts``' model: random low-rank updates of every attention projection
    of the UNet and of the text encoder(s), in kohya or diffusers key names."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    sdxl = parts.text_encoder_2 is not None

    def add(module, kohya_prefix: str, diffusers_prefix: str, names: set[str]) -> None:
        for name, layer in module.named_modules():
            if not isinstance(layer, torch.nn.Linear) or name.split(".")[-1] not in names:
                continue
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.2
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.2
            if fmt == "kohya":
                key = kohya_prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(rank / 2)  # scale 0.5, as kohya reads
            else:
                tensors[f"{diffusers_prefix}{name}.lora_A.weight"] = down
                tensors[f"{diffusers_prefix}{name}.lora_B.weight"] = up

    if unet:
        add(parts.unet, "lora_unet_", "unet.", {"to_q", "to_k", "to_v", "0"})
    if text:
        projections = {"q_proj", "k_proj", "v_proj", "out_proj"}
        add(parts.text_encoder, "lora_te1_" if sdxl else "lora_te_", "text_encoder.",
            projections)
        if sdxl:
            add(parts.text_encoder_2, "lora_te2_", "text_encoder_2.", projections)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """kohya and diffusers LoRAs for tiny and tiny-xl, made once (tiny-xl built on the way)."""
    from tests.helpers import data_home

    root = tmp_path_factory.mktemp("loras")
    made = {}
    with data_home(root / "home"):
        for model in ("tiny", "tiny-xl"):
            parts = models.load_pipeline_components(model, "cpu", "fp32")
            for seed, fmt in enumerate(("kohya", "diffusers")):
                made[(model, fmt)] = make_lora(parts, root / f"{model}-{fmt}.safetensors", fmt,
                                               seed=seed)
    made["models"] = root / "home" / "models"
    return made


@pytest.fixture
def lhome(home, lora_files):
    """The test's data home: alice and bob, the tiny models, and loras/ with the files (two of
    them in a subfolder, found all the same)."""
    import shutil

    shutil.copytree(lora_files["models"], home / "models", dirs_exist_ok=True)
    folder = home / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(lora_files[("tiny", "kohya")], folder / "film.safetensors")
    shutil.copy(lora_files[("tiny", "diffusers")], folder / "styles" / "grain.safetensors")
    shutil.copy(lora_files[("tiny-xl", "kohya")], folder / "styles" / "xl-film.safetensors")
    shutil.copy(lora_files[("tiny-xl", "diffusers")], folder / "xl-grain.safetensors")
    return home


@pytest.fixture
def parts(lhome):
    return models.load_pipeline_components("tiny", "cpu", "fp32")


def _pipeline(model: str):
    """diffusers' own pipeline on freshly loaded parts of ``model``, DDIM as celebctl's."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    fresh = models.load_pipeline_components(model, "cpu", "fp32")
    scheduler = DDIMScheduler.from_config(fresh.scheduler.config)
    if model == "tiny-xl":
        pipe = StableDiffusionXLPipeline(
            vae=fresh.vae, text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2,
            tokenizer=fresh.tokenizer, tokenizer_2=fresh.tokenizer_2, unet=fresh.unet,
            scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
            unet=fresh.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_pixels(pipe, prompt: str, seed: int, guidance: float, size: int):
    import torch

    image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=guidance, height=size,
                 width=size, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image).astype(np.int16)


# --------------------------------------------------------------------------------------------
# requests, the folder, the header check: all before any model loads


def test_tags_are_taken_out_of_the_prompt_with_their_weights():
    text, found = loras.split_tags("a cat <lora:film:0.8>, by the sea <LORA:grain>")
    assert text == "a cat , by the sea "  # the WebUI removes the tag and keeps the rest
    assert found == [loras.LoraRequest("film", 0.8), loras.LoraRequest("grain", 1.0)]
    assert loras.split_tags("(<lora:x:-0.5>)")[1] == [loras.LoraRequest("x", -0.5)]
    for bad, message in (("<lora::1>", "names no LoRA"), ("<lora:x:abc>", "not a number"),
                         ("<lora:x:1:0.5>", "<lora:NAME:WEIGHT> only"),
                         ("<lora:x:inf>", "must be a number from")):
        with pytest.raises(LoraError, match=message):
            loras.split_tags(bad)


def test_names_are_found_in_the_lora_folder_and_its_subfolders(lhome, tmp_path, no_models):
    plan = rendering.plan_render("a cat <lora:film:0.5> <lora:grain>", model="tiny")
    assert plan.prompt.text == "a cat"
    assert [(u.name, u.weight, u.path) for u in plan.loras] == [
        ("film", 0.5, lhome / "loras" / "film.safetensors"),
        ("grain", 1.0, lhome / "loras" / "styles" / "grain.safetensors")]
    assert [u.info.format for u in plan.loras] == ["kohya", "diffusers"]
    assert plan.to_dict()["loras"][0] == {"name": "film", "weight": 0.5,
                                          "path": str(lhome / "loras" / "film.safetensors")}
    assert not [n for n in plan.notes if "lora" in n.lower()]  # no "unsupported" note now
    # A name is the exact file stem; a close one is suggested.
    with pytest.raises(LoraError, match=r"No LoRA 'Film' .*Did you mean 'film'\?"):
        rendering.plan_render("a cat <lora:Film>", model="tiny")
    # Two files of one name are refused, naming both.
    (lhome / "loras" / "styles" / "film.safetensors").write_bytes(
        (lhome / "loras" / "film.safetensors").read_bytes())
    with pytest.raises(LoraError, match="Several LoRAs are named 'film'.*styles/film"):
        rendering.plan_render("a cat <lora:film>", model="tiny")
    assert rendering.plan_render("a cat <lora:styles/film>", model="tiny").loras[0].path == \
        lhome / "loras" / "styles" / "film.safetensors"
    # --lora-dir, then the config's lora_dir, then loras/ in the data home.
    other = tmp_path / "mine"
    other.mkdir()
    (lhome / "loras" / "styles" / "film.safetensors").rename(other / "only-here.safetensors")
    with pytest.raises(LoraError, match="No LoRA 'only-here'"):
        rendering.plan_render("<lora:only-here> a cat", model="tiny")
    assert rendering.plan_render("<lora:only-here> a cat", model="tiny",
                                 lora_dir=other).loras[0].path == other / "only-here.safetensors"
    (lhome / "config.toml").write_text(f'lora_dir = "{other}"\n')
    assert rendering.plan_render("<lora:only-here> a cat", model="tiny").loras[0].name == \
        "only-here"
    assert no_models == []


def test_a_lora_is_asked_for_once_and_the_negative_prompt_has_none(lhome, no_models):
    with pytest.raises(LoraError, match="asked for twice"):
        rendering.plan_render("a cat <lora:film:0.5> <lora:film:1>", model="tiny")
    with pytest.raises(PromptError, match="negative prompt has a <lora"):
        rendering.plan_render("a cat", "<lora:film>", model="tiny")
    assert no_models == []


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("xl", ["a cat <lora:xl-film>"],
     "LoRA 'xl-film' .* was made for SDXL .*but tiny is SD 1.x"),
    ("xl", ["a cat", "--lora", "{xl}:0.7"],
     "LoRA 'tiny-xl-diffusers' .* was made for SDXL .*cross-attention 80-d"),
    ("pickle", ["a cat <lora:old>"], "a pickle file, which celebctl never loads"),
    ("garbage", ["a cat <lora:broken>"], "is not a readable safetensors file"),
    ("embedding", ["a cat <lora:emb>"], "is not a LoRA: its tensors are named like 'emb_params'"),
    ("lycoris", ["a cat <lora:loha>"], "is a LyCORIS network"),
    ("", ["a cat <lora:nowhere:0.5>"], r"No LoRA 'nowhere' \(nowhere.safetensors\) in "),
    ("", ["a cat", "--lora", "missing.safetensors:0.5"], "no such file missing.safetensors"),
    ("", ["a cat", "--lora", "style.pt"], "give a .safetensors LoRA file"),
])
def test_bad_loras_are_refused_before_any_model_loads(lhome, lora_files, tmp_path, no_models,
                                                      setup, args, message):
    import torch
    from safetensors.torch import save_file

    folder = lhome / "loras"
    if setup == "pickle":
        (folder / "old.pt").write_bytes(b"not read")
    elif setup == "garbage":
        (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    elif setup == "embedding":
        save_file({"emb_params": torch.zeros(2, 32)}, str(folder / "emb.safetensors"))
    elif setup == "lycoris":
        save_file({"lora_unet_x_attn1_to_q.hada_w1_a": torch.zeros(4, 32)},
                  str(folder / "loha.safetensors"))
    args = [a.replace("{xl}", str(lora_files[("tiny-xl", "diffusers")])) for a in args]
    result = invoke("render", *args, "--model", "tiny", "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    error = " ".join(result.stderr.split())
    assert error.startswith("Error: ") and "Traceback" not in error
    import re

    assert re.search(message, error), error
    assert no_models == []  # refused before any model was built
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_one_encoder_lora_is_refused_for_sdxl_and_the_other_way(lhome, no_models):
    with pytest.raises(LoraError, match="'grain' .*made for a model with 32-d text features.*"
                                        "tiny-xl is SDXL"):
        rendering.plan_render("a cat <lora:grain>", model="tiny-xl")
    plan = rendering.plan_render("a cat <lora:xl-film:0.3> <lora:xl-grain>", model="tiny-xl")
    assert [u.info.encoders for u in plan.loras] == [2, 2]
    assert plan.loras[0].info.context_width == 80
    assert no_models == []


# --------------------------------------------------------------------------------------------
# drawing with LoRAs


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # 2 adapters
def test_a_render_with_loras_is_what_diffusers_draws_with_them(lhome, parts, tmp_path):
    """Two LoRAs (kohya and diffusers keys, UNet and text encoder), with weights, and an
    identity: celebctl fuses them; diffusers' pipeline loads them as adapters on the same
    model with alice's exported embedding, and draws the same picture."""
    from celebctl import export

    result = rendering.render_prompt(
        "alice by the sea <lora:film:0.6>", steps=STEPS, seed=5, guidance=7.5, components=parts,
        out_dir=tmp_path / "ours", loras=[f"{lhome / 'loras/styles/grain.safetensors'}:0.8"])
    ours = pixels(result.paths[0])
    assert [(e["name"], e["weight"]) for e in result.loras] == [("film", 0.6), ("grain", 0.8)]
    assert loras.fused_names(parts) == ["film", "grain"]

    export.export_identity("alice", tmp_path / "alice-ti", "diffusers")
    pipe = _pipeline("tiny")
    pipe.load_textual_inversion(str(tmp_path / "alice-ti"))
    pipe.load_lora_weights(str(lhome / "loras/film.safetensors"), adapter_name="film")
    pipe.load_lora_weights(str(lhome / "loras/styles/grain.safetensors"), adapter_name="grain")
    pipe.set_adapters(["film", "grain"], [0.6, 0.8])
    theirs = _diffusers_pixels(pipe, "<alice> person by the sea", 5, 7.5, 64)
    assert np.abs(ours - theirs).max() <= FUSED_TOLERANCE
    # The LoRAs matter, the text encoder's part too: without either the picture differs.
    pipe.set_adapters(["film", "grain"], [0.0, 0.0])
    assert np.abs(_diffusers_pixels(pipe, "<alice> person by the sea", 5, 7.5, 64)
                  - ours).max() > 10
    pipe.set_adapters(["film", "grain"], [0.6, 0.8])
    pipe.disable_lora()  # diffusers turns the text encoders' adapters off ...
    pipe.unet.enable_adapters()  # ... and the UNet's back on: the text part alone is missing
    assert np.abs(_diffusers_pixels(pipe, "<alice> person by the sea", 5, 7.5, 64)
                  - ours).max() > FUSED_TOLERANCE


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_renders_with_loras_as_diffusers_does(lhome, lora_files, tmp_path, fmt):
    xl = models.load_pipeline_components("tiny-xl", "cpu", "fp32")
    path = lora_files[("tiny-xl", fmt)]
    result = rendering.render_prompt("a red house", steps=STEPS, seed=3, guidance=6.0,
                                     components=xl, out_dir=tmp_path / "ours",
                                     loras=[f"{path}:0.7"])
    pipe = _pipeline("tiny-xl")
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    size = xl.default_resolution
    theirs = _diffusers_pixels(pipe, "a red house", 3, 6.0, size)
    assert np.abs(pixels(result.paths[0]) - theirs).max() <= FUSED_TOLERANCE
    pipe.set_adapters(["x"], [0.0])
    assert np.abs(_diffusers_pixels(pipe, "a red house", 3, 6.0, size)
                  - pixels(result.paths[0])).max() > 10


def test_the_next_render_gets_the_model_back_bit_for_bit(lhome, parts, tmp_path):
    import torch

    loaded = {k: v.clone() for part in (parts.unet, parts.text_encoder)
              for k, v in part.state_dict().items()}
    before = rendering.render_prompt("alice in a hat", steps=STEPS, seed=2, components=parts,
                                     out_dir=tmp_path / "a")
    with_lora = rendering.render_prompt("alice in a hat <lora:film:1.5> <lora:grain:-0.5>",
                                        steps=STEPS, seed=2, components=parts,
                                        out_dir=tmp_path / "b")
    # Fused, the modules are plain again: no peft wrapper is left in the denoising loop.
    assert not any("lora" in name for name, _ in parts.unet.named_modules())
    assert not any("lora" in name for name, _ in parts.text_encoder.named_modules())
    after = rendering.render_prompt("alice in a hat", steps=STEPS, seed=2, components=parts,
                                    out_dir=tmp_path / "c")
    assert before.paths[0].read_bytes() == after.paths[0].read_bytes()
    assert before.paths[0].read_bytes() != with_lora.paths[0].read_bytes()
    now = {k: v for part in (parts.unet, parts.text_encoder)
           for k, v in part.state_dict().items()}
    assert now.keys() == loaded.keys()
    assert all(torch.equal(now[k], loaded[k]) for k in loaded)
    assert loras.fused_names(parts) == []
    # A set fused twice in a row is fused once; another set restores first.
    rendering.render_prompt("a cat <lora:film>", steps=1, components=parts,
                            out_dir=tmp_path / "d")
    fused_weight = parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q \
        .weight.clone()
    rendering.render_prompt("a dog <lora:film>", steps=1, components=parts,
                            out_dir=tmp_path / "d")
    assert torch.equal(parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
                       .weight, fused_weight)
    loras.restore(parts)  # what a caller sharing components does before a fit
    assert all(torch.equal(v, loaded[k]) for k, v in parts.unet.state_dict().items())


def test_png_text_carries_the_tags_and_the_webui_hashes(lhome, parts, tmp_path):
    result = rendering.render_prompt(
        "alice on a bike <lora:film:0.75>", steps=STEPS, seed=4, components=parts,
        out_dir=tmp_path / "o", loras=[str(lhome / "loras/styles/grain.safetensors")])
    meta = rendering.read_png_metadata(result.paths[0])
    text = meta["parameters"]
    prompt_line, settings_line = text.split("\n")[0], text.split("\n")[-1]
    assert prompt_line == "alice person on a bike <lora:film:0.75> <lora:grain:1>"

    def addnet_hash(path: Path) -> str:  # the WebUI's: sha256 of what follows the header
        data = path.read_bytes()
        return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]

    film, grain = (addnet_hash(lhome / "loras/film.safetensors"),
                   addnet_hash(lhome / "loras/styles/grain.safetensors"))
    assert f'Lora hashes: "film: {film}, grain: {grain}"' in settings_line
    # Read back as the WebUI's infotext parser reads "key: value" pairs.
    import re

    fields = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)',
                             settings_line))
    assert loras.parse_lora_hashes(fields["Lora hashes"]) == {"film": film, "grain": grain}
    assert loras.split_tags(prompt_line)[1] == [loras.LoraRequest("film", 0.75),
                                                loras.LoraRequest("grain", 1.0)]
    assert meta["celebctl"]["loras"] == [{"name": "film", "weight": 0.75, "hash": film},
                                         {"name": "grain", "weight": 1.0, "hash": grain}]
    # The PNG's prompt is a recipe: rendered again from it, the same bytes.
    again = rendering.render_prompt(meta["celebctl"]["prompt"], steps=STEPS, seed=4,
                                    components=parts, out_dir=tmp_path / "again")
    assert again.paths[0].read_bytes() == result.paths[0].read_bytes()


def test_captured_renders_stay_captured_with_a_lora_fused(lhome, parts, tmp_path,
                                                         monkeypatch):
    made = []

    def emulating(*args, **kwargs):
        call = denoise.UNetCall(*args, **kwargs, emulate=True)
        made.append(call)
        return call

    eager = rendering.render_prompt("alice <lora:film:0.9>", num_images=2, seed=1,
                                    steps=STEPS, batch_size=2, components=parts,
                                    out_dir=tmp_path / "eager")
    monkeypatch.setattr(rendering.render, "UNetCall", emulating)
    replayed = rendering.render_prompt("alice <lora:film:0.9>", num_images=2, seed=1,
                                       steps=STEPS, batch_size=2, components=parts,
                                       out_dir=tmp_path / "replayed")
    assert replayed.captured and len(made[0].graphs) == 1 and not eager.captured
    for a, b in zip(eager.paths, replayed.paths, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_prompts_files_group_lines_by_lora_set(lhome, parts, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice at the beach\nalice at night <lora:film:0.5>\n"
                       "a cat <lora:grain> <lora:film:0.5>\nbob at the beach <lora:film:0.5>\n")
    applied = []
    original = rendering.batch.apply_loras

    def spy(components, uses):
        applied.append([u.name for u in uses])
        return original(components, uses)

    monkeypatch.setattr(rendering.batch, "apply_loras", spy)
    result = rendering.render_prompts_file(prompts, steps=STEPS, seed=3, batch_size=4,
                                           components=parts, out_dir=tmp_path / "out")
    assert len(result.written) == 4
    # One load per set: none, film, grain + film (lines 2 and 4 share a batch).
    assert sorted(map(tuple, applied)) == [(), ("film",), ("grain", "film")]
    for index, line in enumerate(result.lines):
        path = result.paths_of(index)[0]
        meta = rendering.read_png_metadata(path)["celebctl"]
        single = rendering.render_prompt(line.text, steps=STEPS, seed=3, components=parts,
                                         out_dir=tmp_path / f"single-{index}")
        assert np.abs(pixels(single.paths[0]) - pixels(path)).max() <= 1
        assert meta.get("loras") == (single.loras or None)
    # A rerun skips them all; a line whose LoRA weight changed is another image.
    again = rendering.render_prompts_file(prompts, steps=STEPS, seed=3, components=parts,
                                          out_dir=tmp_path / "out")
    assert len(again.skipped) == 4 and not again.written
    prompts.write_text(prompts.read_text().replace("night <lora:film:0.5>", "night "
                                                   "<lora:film:0.6>"))
    from celebctl.errors import StorageError

    with pytest.raises(StorageError, match="made with other settings"):
        rendering.render_prompts_file(prompts, steps=STEPS, seed=3, components=parts,
                                      out_dir=tmp_path / "out")


def test_the_cli_renders_with_lora_options_and_shows_them_in_a_dry_run(lhome, tmp_path):
    grain = lhome / "loras" / "styles" / "grain.safetensors"
    result = invoke("render", "alice <lora:film:0.5>", "--lora", f"{grain}:0.25", "--model",
                    "tiny", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"LoRAs:      film x0.5 ({lhome / 'loras' / 'film.safetensors'}), grain x0.25" \
        in result.stdout
    result = invoke("render", "alice <lora:film:0.5>", "--lora", f"{grain}:0.25", "--model",
                    "tiny", "--steps", 2, "--out", tmp_path / "o", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [e["name"] for e in summary["loras"]] == ["film", "grain"]
    assert summary["prompt"] == "alice"
    shown = rendering.read_png_metadata(summary["paths"][0])["celebctl"]["prompt"]
    assert shown == "alice <lora:film:0.5> <lora:grain:0.25>"
    assert "--lora" in invoke("render", "--help").stdout
    # A fit takes no LoRA: `add` has no such option.
    assert invoke("add", "carol", "x.png", "--lora", str(grain)).exit_code == 2


def test_a_fused_lora_leaves_the_parts_frozen(lhome, parts, tmp_path):
    def shape(module):  # what a denoising step runs: module types, processors, hooks
        return ([type(m).__name__ for m in module.modules()],
                sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()))

    loaded = (shape(parts.unet), shape(parts.text_encoder),
              {k: type(v) for k, v in parts.unet.attn_processors.items()})
    rendering.render_prompt("a cat <lora:film>", steps=1, components=parts,
                            out_dir=tmp_path / "o")
    assert loras.fused_names(parts) == ["film"]
    assert (shape(parts.unet), shape(parts.text_encoder),
            {k: type(v) for k, v in parts.unet.attn_processors.items()}) == loaded
    for module in (parts.unet, parts.text_encoder):
        assert not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())
    assert not hasattr(parts.unet, "peft_config")
    loras.restore(parts)


@pytest.mark.gpu
def test_cuda_captured_renders_with_a_lora_match_eager_ones(lhome, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = models.load_pipeline_components("tiny", "cuda", "fp32")
    eager = rendering.render_prompt("alice <lora:film:0.9>", num_images=2, batch_size=2,
                                    steps=STEPS, seed=1, components=cuda, capture=False,
                                    out_dir=tmp_path / "eager")
    captured = rendering.render_prompt("alice <lora:film:0.9>", num_images=2, batch_size=2,
                                       steps=STEPS, seed=1, components=cuda,
                                       out_dir=tmp_path / "captured")
    assert captured.captured and not eager.captured
    for a, b in zip(eager.paths, captured.paths, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # Another set afterwards: the weights change in place, the next render captures afresh.
    plain = rendering.render_prompt("alice", steps=STEPS, seed=1, components=cuda,
                                    out_dir=tmp_path / "plain")
    assert plain.captured and loras.fused_names(cuda) == []


def _header_only_lora(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(("shapes", "fmt", "label", "widths"), [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
      (4, 768),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)},
     "kohya", "SD 1.x", [768]),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora.down"
      ".weight": (4, 1024),
      "text_encoder.text_model.encoder.layers.3.self_attn.k_proj.lora_linear_layer.down"
      ".weight": (4, 1024)}, "diffusers", "SD 2.x", [1024]),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": (),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
      "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": (4, 1280)},
     "kohya", "SDXL", [768, 1280]),
    ({"unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048),
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1280)},
     "diffusers", "SDXL", [768, 1280]),
])
def test_the_family_is_read_from_real_size_shapes(tmp_path, shapes, fmt, label, widths):
    info = loras.inspect_lora(_header_only_lora(tmp_path / "x.safetensors", shapes), "x")
    assert info.format == fmt and info.family_label == label
    loras.check_lora_fits(info, "x", widths, "model", "sd1")  # fits its own family
    for other in ([768], [1024], [768, 1280]):
        if other != widths:
            with pytest.raises(LoraError, match=f"'x' .* was made for {label} "):
                loras.check_lora_fits(info, "x", other, "model", None)


def test_keys_of_other_models_are_refused(tmp_path):
    path = _header_only_lora(tmp_path / "flux.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": (4, 3072)})
    with pytest.raises(LoraError, match="not a LoRA for Stable Diffusion 1.x, 2.x or SDXL"):
        loras.inspect_lora(path, "flux")
    path = _header_only_lora(tmp_path / "emb.safetensors", {
        "lora_te_text_model_embeddings_token_embedding.lora_down.weight": (4, 768)})
    with pytest.raises(LoraError, match="changes the text encoder's token embeddings"):
        loras.inspect_lora(path, "emb")


def test_a_prompts_file_dry_run_shows_each_lines_loras(lhome, tmp_path, no_models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice at the beach <lora:film:0.5>\na cat\n")
    grain = lhome / "loras" / "styles" / "grain.safetensors"
    result = invoke("render", "--prompts", prompts, "--lora", f"{grain}:0.3", "--model", "tiny",
                    "--dry-run")
    assert result.exit_code == 0, result.output
    assert "line 1: <alice> person at the beach <lora:film:0.5> <lora:grain:0.3>" in result.stdout
    assert "line 2: a cat <lora:grain:0.3>" in result.stdout
    prompts.write_text("a cat\na dog <lora:nowhere>\n")
    result = invoke("render", "--prompts", prompts, "--model", "tiny", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert "Line 2 of" in result.stderr and "No LoRA 'nowhere'" in result.stderr
    assert no_models == []


def test_a_hostile_lora_folder_neither_hangs_nor_loops(tmp_path, no_models):
    import os

    folder = tmp_path / "loras"
    (folder / "a").mkdir(parents=True)
    os.symlink(folder, folder / "a" / "back-up")  # a cycle
    os.mkfifo(folder / "a" / "pipe.safetensors")
    with pytest.raises(LoraError, match="No LoRA 'film'"):
        loras.find_lora("film", folder)
    with pytest.raises(LoraError, match="is not a regular file"):
        loras.inspect_lora(loras.find_lora("pipe", folder), "pipe")
    assert no_models == []
