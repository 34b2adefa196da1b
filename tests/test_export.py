"""Exports for other tools, and proof that diffusers renders them as celebctl does."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import basis, export, models, registry
from celebctl.cli import app
from celebctl.errors import CelebctlError, IdentityNotFound, InvalidOption
from tests.helpers import one_torch_thread

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def expected_vectors(name: str) -> np.ndarray:
    """mean_i + coefficients_i @ components_i, computed here with numpy."""
    ident = registry.get_identity(name)
    loaded = basis.load_basis(ident.basis_id)
    mean, components = loaded.mean.numpy(), loaded.components.numpy()
    coefficients = ident.load_coefficients()
    return np.stack([mean[i] + coefficients[i] @ components[i] for i in range(2)])


def load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


def test_a1111_embedding(home, tmp_path):
    out = tmp_path / "alice.safetensors"
    result = export.export_identity("alice", out, "a1111")
    assert result.files == [out] and result.token == "alice"
    tensors, metadata = load_safetensors(out)
    # One tensor under the diffusers token: WebUI and ComfyUI take any single key.
    assert list(tensors) == ["<alice>"]
    assert tensors["<alice>"].shape == (2, 32) and tensors["<alice>"].dtype == np.float32
    np.testing.assert_allclose(tensors["<alice>"], expected_vectors("alice"), rtol=1e-5,
                               atol=1e-6)
    assert metadata["celebctl_identity"] == "alice"
    assert metadata["celebctl_basis_id"] == registry.get_identity("alice").basis_id
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    # Same identity, same bytes (no timestamps).
    again = export.export_identity("alice", tmp_path / "again.safetensors", "a1111")
    assert again.path.read_bytes() == out.read_bytes()


def test_diffusers_embedding(home, tmp_path):
    folder = tmp_path / "alice-ti"
    result = export.export_identity("alice", folder, "diffusers")
    target = folder / "learned_embeds.safetensors"
    assert result.files == [target] and result.token == "<alice>"
    tensors, _ = load_safetensors(target)
    assert list(tensors) == ["<alice>"] and tensors["<alice>"].shape == (2, 32)
    a1111, _ = load_safetensors(export.export_identity("alice", tmp_path / "a.safetensors",
                                                       "a1111").path)
    np.testing.assert_array_equal(tensors["<alice>"], a1111["<alice>"])


def test_exports_refuse_to_overwrite_without_force(home, tmp_path):
    out = tmp_path / "alice.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(CelebctlError, match="already exists. Pick another path or pass --force"):
        export.export_identity("alice", out, "a1111")
    assert out.read_bytes() == b"mine"
    export.export_identity("alice", out, "a1111", overwrite=True)
    assert out.read_bytes() != b"mine"

    folder = tmp_path / "ti"
    export.export_identity("bob", folder, "diffusers")
    with pytest.raises(CelebctlError, match="already exists"):
        export.export_identity("alice", folder, "diffusers")
    export.export_identity("alice", folder, "diffusers", overwrite=True)
    tensors, _ = load_safetensors(folder / "learned_embeds.safetensors")
    assert list(tensors) == ["<alice>"]
    assert not [p for p in tmp_path.rglob(".*")]  # no temp files left


def test_export_errors(home, tmp_path):
    with pytest.raises(InvalidOption, match="must end in .safetensors"):
        export.export_identity("alice", tmp_path / "alice.pt", "a1111")
    with pytest.raises(IdentityNotFound, match="Did you mean 'alice'"):
        export.export_identity("alise", tmp_path / "x.safetensors", "a1111")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CelebctlError, match="is a file"):
        export.export_identity("alice", tmp_path / "file", "diffusers")
    with pytest.raises(CelebctlError, match="does not exist"):
        export.export_identity("alice", tmp_path / "no" / "such" / "dir", "diffusers")
    with pytest.raises(InvalidOption, match="Unknown export format"):
        export.export_identity("alice", tmp_path / "x", "ckpt")


def test_export_cli(home, tmp_path):
    help_text = " ".join(invoke("export", "--help").stdout.split())
    assert "face crop" in help_text and "a1111" in help_text and "diffusers" in help_text
    out = tmp_path / "alice.safetensors"
    result = invoke("export", "alice", "--format", "a1111", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "a1111" and data["path"] == str(out) and data["token"] == "alice"
    result = invoke("export", "alice", "--format", "a1111", "-o", out)
    assert result.exit_code == 1 and "already exists" in result.stderr
    result = invoke("export", "alice", "--format", "a1111", "-o", out, "--force")
    assert result.exit_code == 0
    result = invoke("export", "bob", "-f", "diffusers", "-o", tmp_path / "bob")
    assert result.exit_code == 0 and "load_textual_inversion" in result.stdout
    assert (tmp_path / "bob" / "learned_embeds.safetensors").is_file()
    # The bundle format still works as before.
    result = invoke("export", "alice", "-o", tmp_path / "alice.celeb")
    assert result.exit_code == 0 and (tmp_path / "alice.celeb").is_file()


def _diffusers_image(embeddings: list[tuple[str, str | None]], prompt: str, seed: int):
    """Render with diffusers' own textual-inversion loader on a freshly loaded tiny model."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = models.load_pipeline_components("tiny", "cpu", "fp32")
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for path, token in embeddings:
        pipe.load_textual_inversion(path, token=token)
    image = pipe(prompt, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image)


def test_diffusers_textual_inversion_renders_what_celebctl_renders(home, tmp_path):
    from PIL import Image

    result = invoke("render", "alice shaking hands with bob", "--steps", 3, "--seed", 7,
                    "--guidance", 7.5, "--scheduler", "ddim", "--out", tmp_path / "renders",
                    "--quiet", "--json")
    assert result.exit_code == 0, result.output
    ours = np.asarray(Image.open(json.loads(result.stdout)["paths"][0]).convert("RGB"))

    for name in ("alice", "bob"):
        export.export_identity(name, tmp_path / f"{name}-ti", "diffusers")
        export.export_identity(name, tmp_path / f"{name}.safetensors", "a1111")
    prompt = "<alice> person shaking hands with <bob> person"  # what render expands it to
    from_diffusers = _diffusers_image(
        [(str(tmp_path / "alice-ti"), None), (str(tmp_path / "bob-ti"), None)], prompt, 7)
    from_a1111 = _diffusers_image(
        [(str(tmp_path / "alice.safetensors"), None),
         (str(tmp_path / "bob.safetensors"), None)], prompt, 7)
    # Exact: the same vectors reach the same layers in the same order.
    np.testing.assert_array_equal(from_diffusers, ours)
    np.testing.assert_array_equal(from_a1111, ours)
    # And the identities matter: without them diffusers draws something else.
    plain = _diffusers_image([], "alice shaking hands with bob", 7)
    assert not np.array_equal(plain, ours)



def test_a1111_export_to_a_new_folder_with_a_trailing_slash(home, tmp_path):
    """`-o embeddings/` names a folder even before it exists: created, alice.safetensors inside,
    as the diffusers export creates its folder; nothing is created when the export fails."""
    folder = tmp_path / "embeddings"
    result = invoke("export", "alice", "--format", "a1111", "-o", f"{folder}/")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["alice.safetensors"]
    assert f"Wrote {folder / 'alice.safetensors'}" in " ".join(result.stdout.split())
    result = invoke("export", "alice", "--format", "a1111", "-o", f"{folder}/")
    assert result.exit_code == 1 and "already exists" in result.stderr
    missing = tmp_path / "no" / "embeddings"
    result = invoke("export", "alice", "--format", "a1111", "-o", f"{missing}/")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    assert not (tmp_path / "no").exists()
    # Without the slash a name that is not .safetensors is still refused, not made a folder.
    result = invoke("export", "alice", "--format", "a1111", "-o", tmp_path / "alice")
    assert result.exit_code == 1 and "must end in .safetensors" in result.stderr
    assert not (tmp_path / "alice").exists()


def test_export_says_what_to_type_where(home, tmp_path):
    # An embeddings folder as the target: the file is NAME.safetensors inside it.
    folder = tmp_path / "embeddings"
    folder.mkdir()
    result = invoke("export", "alice", "-f", "a1111", "-o", folder, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["files"] == [str(folder / "alice.safetensors")]
    assert data["triggers"] == {"webui": "alice", "comfyui": "embedding:alice",
                                "diffusers": "<alice>"}
    text = " ".join(invoke("export", "alice", "-f", "a1111", "-o", tmp_path / "a.safetensors"
                           ).stdout.split())
    assert "write 'a' in prompts" in text  # the WebUI word is the file name
    assert "'embedding:a person's hat'" in text and "skips 'embedding:a's'" in text
    assert "adds the token '<alice>'" in text
    text = " ".join(invoke("export", "alice", "-f", "diffusers", "-o", tmp_path / "ti"
                           ).stdout.split())
    assert f'pipe.load_textual_inversion("{tmp_path / "ti"}")' in text
    assert "'<alice>' in prompts, exactly: lowercase" in text and "'<Alice>'" in text


def test_the_trigger_words_printed_are_the_ones_diffusers_registers(home, tmp_path):
    """What export prints about diffusers holds: the a1111 file and the diffusers folder both
    register `<alice>`, `<alice>` expands to both vectors and `<Alice>` to one only."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    for source, fmt in ((tmp_path / "alice.safetensors", "a1111"), (tmp_path / "ti", "diffusers")):
        export.export_identity("alice", source, fmt)
        parts = models.load_pipeline_components("tiny", "cpu", "fp32")
        tokenizer = parts.tokenizer
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=tokenizer,
            unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.load_textual_inversion(str(source))
        assert pipe.maybe_convert_prompt("<alice> person", tokenizer) == \
            "<alice> <alice>_1 person"
        assert pipe.maybe_convert_prompt("<Alice> person", tokenizer) == "<Alice> person"
