"""What WebUI and ComfyUI users expect around celebctl: PNG metadata their tools read (model
hash, embedding hashes, a prompt that works there), and names that are ordinary words."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import pytest
from typer.testing import CliRunner

from celebctl import bundles, export, filehash, models, paths, registry, rendering
from celebctl.cli import app
from celebctl.prompting import word_name_note

runner = CliRunner()


def webui_fields(parameters: str) -> dict[str, str]:
    """The settings line as the WebUI's PNG Info parses it (its regex), values unquoted."""
    line = parameters.splitlines()[-1]
    found = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)
    return {k: json.loads(v) if v.startswith('"') else v for k, v in found}


def comfyui_import(parameters: str) -> dict[str, str] | None:
    """What ComfyUI's import of a dropped PNG's WebUI parameters starts from: nothing unless
    there is a "Negative prompt:" line before "Steps:"."""
    steps = parameters.rfind("\nSteps:")
    negative = parameters.rfind("\nNegative prompt:", 0, steps)
    if steps < 0 or negative < 0:
        return None
    return {"positive": parameters[:negative].strip(),
            "negative": parameters[negative + 17:steps].strip()}


@pytest.fixture(scope="module")
def components():
    return models.load_pipeline_components("tiny", "cpu", "fp32")


def test_png_metadata_lists_the_embeddings_with_their_file_hashes(home, components, tmp_path):
    result = rendering.render_prompt("(alice:1.1) shaking hands with bob", steps=1,
                                     components=components, out_dir=tmp_path / "r")
    params = rendering.read_png_metadata(result.paths[0])["parameters"]
    fields = webui_fields(params)
    exported = {}
    for name in ("alice", "bob"):
        path = export.export_identity(name, tmp_path / f"{name}.safetensors", "a1111").path
        exported[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert fields["TI hashes"] == f"alice: {exported['alice']}, bob: {exported['bob']}"
    assert "Model hash" not in fields  # a built-in model is not a file
    # The prompt line is what to type in the WebUI with the exports installed.
    assert params.splitlines()[0] == "(alice person:1.1) shaking hands with bob person"


def test_png_metadata_works_for_comfyui_drops_without_a_negative(home, components, tmp_path):
    result = rendering.render_prompt("alice smiling", steps=1, components=components,
                                     out_dir=tmp_path / "r")
    params = rendering.read_png_metadata(result.paths[0])["parameters"]
    assert params.splitlines()[1] == "Negative prompt: "
    assert comfyui_import(params) == {"positive": "alice person smiling", "negative": ""}


def test_pad_conds_is_written_when_prompt_and_negative_were_padded():
    # The shorter of prompt and negative is padded with empty chunks, as the WebUI's
    # "Pad prompt/negative prompt" option does; the WebUI writes "Pad conds: True" then.
    long = ", ".join(["a red house"] * 30)  # 2 chunks
    plan = rendering.plan_render(long, "blurry", model="tiny")
    assert len(plan.chunks) == 2 and len(plan.negative_chunks) == 1
    assert plan.pads_conds(7.5) and not plan.pads_conds(1.0)  # no negative without guidance
    assert not rendering.plan_render("a red house", "blurry", model="tiny").pads_conds(7.5)
    assert rendering.plan_render("a red house", long, model="tiny").pads_conds(7.5)
    # An empty SDXL negative is zeros as long as the prompt: nothing is padded.
    assert not rendering.plan_render(long, "", model="tiny-xl").pads_conds(7.5)
    assert rendering.plan_render(long, "", model="tiny").pads_conds(7.5)
    settings = {"prompt": long, "negative_prompt": "blurry", "steps": 1, "sampler": "DDIM",
                "cfg_scale": 7.5, "seed": 1, "width": 64, "height": 64, "model": "tiny",
                "celebctl_version": "0.1.0"}
    assert "Pad conds" not in webui_fields(rendering.image_parameters(settings))
    fields = webui_fields(rendering.image_parameters({**settings, "pad_conds": True}))
    assert fields["Pad conds"] == "True" and list(fields)[-2:] == ["Pad conds", "celebctl"]


def test_single_file_models_get_the_webui_model_hash(home, components, tmp_path):
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "my-model.safetensors"
    save_file({"x": torch.arange(4.0)}, str(checkpoint))
    parts = dataclasses.replace(components)
    parts.spec = dataclasses.replace(components.spec, kind="single_file", path=checkpoint,
                                     ref=str(checkpoint), source=str(checkpoint))
    result = rendering.render_prompt("alice smiling", steps=1, components=parts,
                                     out_dir=tmp_path / "r")
    meta = rendering.read_png_metadata(result.paths[0])
    fields = webui_fields(meta["parameters"])
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert fields["Model hash"] == digest[:10] and fields["Model"] == "my-model"
    assert meta["celebctl"]["model_hash"] == digest[:10]
    # The WebUI's order: Size, Model hash, Model.
    line = meta["parameters"].splitlines()[-1]
    assert line.index("Size:") < line.index("Model hash:") < line.index("Model:")


def test_file_hashes_are_cached_until_the_file_changes(celebctl_home, tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"one")
    assert filehash.model_hash(target) == hashlib.sha256(b"one").hexdigest()[:10]
    cache = paths.data_home() / "cache" / "file-hashes.json"
    entries = json.loads(cache.read_text())
    # A cached value is used as long as the file's stat is unchanged ...
    entries[str(target.resolve())]["sha256"] = "f" * 64
    cache.write_text(json.dumps(entries))
    assert filehash.model_hash(target) == "f" * 10
    # ... and a change to the file (new mtime and size) means hashing again.
    target.write_bytes(b"two!")
    os.utime(target, ns=(1, 1))
    assert filehash.model_hash(target) == hashlib.sha256(b"two!").hexdigest()[:10]
    cache.write_text("{not json")
    assert filehash.model_hash(target) == hashlib.sha256(b"two!").hexdigest()[:10]


def test_a_hash_that_cannot_be_made_is_left_out(tmp_path):
    assert filehash.BackgroundHash(tmp_path / "missing.safetensors").result() is None
    assert filehash.BackgroundHash(None).result() is None


def test_a_broken_checkpoint_file_is_refused_with_a_message(tmp_path):
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(b"\x00" * 64)
    result = runner.invoke(app, ["render", "a cat", "--model", str(bad), "--dry-run"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is not a readable .safetensors checkpoint" in result.stderr
    assert "download may have stopped early" in " ".join(result.stderr.split())


# ---- names that are words


def test_only_names_that_prompts_use_as_words_warn():
    assert word_name_note("grace") and "\\grace" in word_name_note("grace")
    for word in ("will", "rose", "mark", "hope", "Grace"):
        assert word_name_note(word), word
    # Whole words of CLIP's vocabulary, but names in practice: the README's own names.
    for name in ("alice", "bob", "xena", "bob_2", "carol"):
        assert word_name_note(name) is None, name


def test_the_readme_names_add_without_a_word_warning(tiny_home, photo_path):
    for name in ("alice", "bob"):
        result = runner.invoke(app, ["add", name, str(photo_path), "--model", "tiny",
                                     "--steps", "2", "--quiet"])
        assert result.exit_code == 0, result.output
        assert "ordinary word" not in result.stderr and "also a" not in result.stderr


def test_add_rename_and_import_warn_about_word_names(home, tmp_path, photo_path):
    result = runner.invoke(app, ["rename", "bob", "grace"])
    assert result.exit_code == 0
    assert "'grace' is also an ordinary word" in " ".join(result.stderr.split())
    assert "Write \\grace for the plain word" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["rename", "grace", "bob_2"])
    assert result.exit_code == 0 and "ordinary word" not in result.stderr

    bundle = bundles.export_bundle("alice", tmp_path / "alice.celeb")
    result = runner.invoke(app, ["import", str(bundle), "--as", "will", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert any("'will' is also an ordinary word" in note for note in data["notes"])
    assert registry.get_identity("will")

    # add warns once the identity is written; a refused add prints only why it was refused.
    result = runner.invoke(app, ["add", "rose", str(tmp_path / "none.jpg"), "--steps", "0"])
    assert result.exit_code == 1 and "ordinary word" not in result.stderr
    assert result.stderr.startswith("Error: ")
    result = runner.invoke(app, ["add", "rose", str(photo_path), "--model", "tiny",
                                 "--steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "'rose' is also an ordinary word" in " ".join(result.stderr.split())
    assert "Added 'rose'" in result.stdout


def test_the_plain_word_renders_as_a_word(home):
    result = runner.invoke(app, ["rename", "bob", "grace"])
    assert result.exit_code == 0
    plan = rendering.plan_render("alice dancing with \\grace")
    assert plan.identities == ["alice"] and plan.prompt.expanded() == (
        "<alice> person dancing with grace")
    assert rendering.plan_render("alice dancing with grace").identities == ["alice", "grace"]


def test_a_render_whose_prompt_and_negative_were_padded_says_pad_conds(home, components,
                                                                        tmp_path):
    long = "alice " + ", ".join(["a red brick wall in the sun"] * 14)  # two 75-token chunks
    padded = rendering.render_prompt(long, steps=1, components=components,
                                     out_dir=tmp_path / "a")
    fields = webui_fields(rendering.read_png_metadata(padded.paths[0])["parameters"])
    assert fields.get("Pad conds") == "True"
    short = rendering.render_prompt("alice smiling", steps=1, components=components,
                                    out_dir=tmp_path / "b")
    fields = webui_fields(rendering.read_png_metadata(short.paths[0])["parameters"])
    assert "Pad conds" not in fields
