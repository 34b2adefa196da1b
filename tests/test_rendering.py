"""Rendering on the tiny model: files, metadata, determinism, isolation, errors, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from celebctl import __version__, models, registry, rendering
from celebctl.cli import app
from celebctl.errors import BasisMismatch, IdentityNotFound, InvalidOption, PromptError
from tests.helpers import add_identity, one_torch_thread

PHOTO = Path(__file__).parent / "data" / "astronaut.png"
runner = CliRunner()


# --------------------------------------------------------------------------------------------
# fixtures: alice and bob are fitted once per session (3 steps on tiny) and copied per test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def render(components, prompt="alice shaking hands with bob", out=None, **kwargs):
    kwargs.setdefault("steps", 2)
    return rendering.render_prompt(prompt, components=components, out_dir=out, **kwargs)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------------------------
# files and metadata


def test_render_writes_pngs_with_webui_parameters(home, components, tmp_path):
    from PIL import Image

    out = tmp_path / "renders"
    result = render(components, out=out, negative="blurry, bob", seed=5, num_images=2)
    basis_id = registry.get_identity("alice").basis_id
    assert [p.name for p in result.paths] == ["alice-shaking-hands-with-bob-5.png",
                                              "alice-shaking-hands-with-bob-6.png"]
    assert result.seeds == [5, 6] and result.identities == ["alice", "bob"]
    assert result.expanded == "<alice> person shaking hands with <bob> person"
    assert result.basis_id == basis_id and result.model == "tiny"
    assert any("random weights: its images are noise" in n for n in result.notes)
    for path in result.paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in result.paths]

    meta = rendering.read_png_metadata(result.paths[1])
    ti_hashes = rendering.embedding_hashes(["alice", "bob"])
    assert meta["parameters"] == (
        "alice person shaking hands with bob person\n"
        "Negative prompt: blurry, bob person\n"
        "Steps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 10, Seed: 6, "
        "Size: 64x64, Model: tiny, "
        f"celebctl: {__version__}, Basis: {basis_id}, Identities: \"alice, bob\", "
        f"TI hashes: \"alice: {ti_hashes['alice']}, bob: {ti_hashes['bob']}\""
    )
    assert meta["celebctl"] == {
        "prompt": "alice shaking hands with bob", "negative_prompt": "blurry, bob",
        "expanded": "<alice> person shaking hands with <bob> person",
        "negative_expanded": "blurry, <bob> person",
        "steps": 2, "sampler": "DDIM", "schedule_type": "Automatic", "scheduler": "ddim",
        "cfg_scale": 10.0, "seed": 6,
        "width": 64, "height": 64, "model": "tiny", "basis_id": basis_id,
        "identities": ["alice", "bob"], "person_noun": True, "pad_conds": False,
        "celebctl_version": __version__,
        "webui_prompt": "alice person shaking hands with bob person",
        "webui_negative": "blurry, bob person", "ti_hashes": ti_hashes,
    }
    # The WebUI's own parser (its regex) reads the settings line back.
    fields = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)',
                             meta["parameters"].splitlines()[-1]))
    assert fields["Seed"] == "6" and fields["Sampler"] == "DDIM"
    assert json.loads(fields["Identities"]) == "alice, bob"


def test_same_seed_gives_byte_identical_pngs_and_never_overwrites(home, components, tmp_path):
    first = render(components, out=tmp_path, seed=3).paths[0]
    second = render(components, out=tmp_path, seed=3).paths[0]
    third = render(components, out=tmp_path, seed=3).paths[0]
    assert [first.name, second.name, third.name] == [
        "alice-shaking-hands-with-bob-3.png", "alice-shaking-hands-with-bob-3-1.png",
        "alice-shaking-hands-with-bob-3-2.png"]
    assert first.read_bytes() == second.read_bytes() == third.read_bytes()
    other = render(components, out=tmp_path, seed=4).paths[0]
    assert other.read_bytes() != first.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_users_file_is_never_replaced(home, components, tmp_path):
    mine = tmp_path / "alice-shaking-hands-with-bob-0.png"
    mine.write_bytes(b"my own file")
    result = render(components, out=tmp_path)
    assert result.paths[0].name == "alice-shaking-hands-with-bob-0-1.png"
    assert mine.read_bytes() == b"my own file"


def test_batches_and_grid(home, components, tmp_path):
    from PIL import Image

    batched = render(components, out=tmp_path / "b", seed=10, num_images=3, batch_size=2,
                     grid=True)
    single = render(components, out=tmp_path / "s", seed=11)
    assert batched.seeds == [10, 11, 12]
    a = np.asarray(Image.open(batched.paths[1]), dtype=int)
    b = np.asarray(Image.open(single.paths[0]), dtype=int)
    assert np.abs(a - b).max() <= 1  # image i has seed+i whatever the batch size
    with Image.open(batched.grid) as sheet:
        assert sheet.size == (128, 128)  # 2 columns x 2 rows of 64 px
    assert batched.grid.name == "alice-shaking-hands-with-bob-10-grid.png"
    assert rendering.read_png_metadata(batched.grid)["celebctl"]["seeds"] == [10, 11, 12]


def test_progress_counts_every_step_of_every_image(home, components, tmp_path):
    calls = []
    render(components, out=tmp_path, steps=2, num_images=3, batch_size=2,
           progress=lambda *args: calls.append(args))
    assert [c[:3] for c in calls] == [("render", 2, 6), ("render", 4, 6), ("render", 5, 6),
                                      ("render", 6, 6)]


@pytest.mark.parametrize("scheduler, sampler", [("dpm", "DPM++ 2M"), ("euler", "Euler")])
def test_other_schedulers(home, components, tmp_path, scheduler, sampler):
    result = render(components, out=tmp_path, scheduler=scheduler, width=72, height=64)
    meta = rendering.read_png_metadata(result.paths[0])
    assert f"Sampler: {sampler}," in meta["parameters"] and "Size: 72x64" in meta["parameters"]
    assert components.scheduler.__class__.__name__ == "DDIMScheduler"  # untouched


def test_prompt_without_identities(home, components, tmp_path):
    result = render(components, "a red apple on a table", out=tmp_path)
    assert result.identities == [] and result.basis_id is None
    params = rendering.read_png_metadata(result.paths[0])["parameters"]
    assert "Identities" not in params and "Basis" not in params


def test_prompt_slug():
    slug = rendering.prompt_slug("Alice's portrait, oil on canvas!")
    assert slug == "alice-s-portrait-oil-on-canvas"
    assert rendering.prompt_slug("<alice> über café") == "alice-uber-cafe"
    assert rendering.prompt_slug("\u05e9\u05dc\u05d5\u05dd !!!") == "render"
    long = rendering.prompt_slug("word " * 50)
    assert len(long) <= 60 and long.endswith("word") and not long.endswith("-")
    assert rendering.prompt_slug("x" * 100) == "x" * 60


# --------------------------------------------------------------------------------------------
# no state leaks between renders


def test_renders_do_not_mutate_the_model(home, components, tmp_path):
    import torch

    def snapshot():
        return {k: v.clone() for k, v in components.text_encoder.state_dict().items()}

    before = snapshot()
    vocab_before = len(components.tokenizer)
    first = render(components, "a photo of alice", out=tmp_path / "1", seed=2)
    render(components, "a photo of bob", out=tmp_path / "2", seed=2)
    again = render(components, "a photo of alice", out=tmp_path / "3", seed=2)
    assert first.paths[0].read_bytes() == again.paths[0].read_bytes()
    after = snapshot()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(components.tokenizer) == vocab_before
    assert not components.text_encoder.get_input_embeddings()._forward_hooks
    alice = render(components, "a photo of alice", out=tmp_path / "4", seed=9).paths[0]
    bob = render(components, "a photo of bob", out=tmp_path / "4", seed=9).paths[0]
    assert alice.read_bytes() != bob.read_bytes()  # the identity changes the picture


# --------------------------------------------------------------------------------------------
# planning, --dry-run and errors


def test_plan_loads_no_model(home, no_models):
    plan = rendering.plan_render("Alice shaking hands with bob", "blurry <bob>")
    assert plan.model == "tiny"  # the identities' recorded model, not the configured default
    assert plan.identities == ["alice", "bob"]
    # Each identity is 2 tokens and is followed by "person", as in training.
    assert plan.token_count == 9 and plan.negative_token_count == 4 and plan.max_tokens == 75
    bare = rendering.plan_render("Alice shaking hands with bob", "blurry <bob>",
                                 person_noun=False)
    assert bare.token_count == 7 and bare.prompt.expanded() == "<alice> shaking hands with <bob>"
    assert plan.basis_id == registry.get_identity("alice").basis_id
    assert no_models == []


def test_dry_run_cli_loads_no_model_and_writes_nothing(home, no_models, tmp_path):
    out = tmp_path / "renders"
    result = invoke("render", "alice shaking hands with bob", "--dry-run", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Prompt:     <alice> person shaking hands with <bob> person" in result.stdout
    assert "Identities: alice, bob" in result.stdout and "Tokens:     9 of 75" in result.stdout
    assert "Guidance:   10 (default)" in result.stdout
    assert "Model:      tiny" in result.stdout
    assert "random weights" in result.stderr
    data = json.loads(invoke("render", "alice", "--dry-run", "--json").stdout)
    assert data["expanded"] == "<alice> person" and data["tokens"] == 3
    assert data["model"] == "tiny" and data["person_noun"] and data["guidance_default"] == 10
    data = json.loads(invoke("render", "alice", "--dry-run", "--json", "--no-person").stdout)
    assert data["expanded"] == "<alice>" and data["tokens"] == 2 and not data["person_noun"]
    assert no_models == [] and not out.exists()


def test_model_choice(home, tmp_path):
    assert rendering.plan_render("a cat").model == models.DEFAULT_MODEL
    # With no --model, identities render with the model their (locally built) basis came from.
    assert rendering.plan_render("alice").model == "tiny"
    folder = _tiny_copy(home, tmp_path / "same-model")
    plan = rendering.plan_render("alice", model=str(folder))
    assert plan.model == str(folder)
    assert any("alice: 'tiny'" in n and f"loading {folder}" in n for n in plan.notes)
    # A model whose text encoder is another width is refused before it loads, with the fix.
    with pytest.raises(BasisMismatch, match="--replace --model sd15-random"):
        rendering.plan_render("alice", model="sd15-random")


def test_identities_on_different_bases(home, no_models):
    add_identity("carol", basis_id="c" * 16)
    with pytest.raises(BasisMismatch) as info:
        rendering.plan_render("alice and carol")
    message = str(info.value)
    assert "different bases" in message and "carol: cccccccccccccccc" in message
    with pytest.raises(BasisMismatch, match="different bases"):
        rendering.plan_render("alice", negative="carol")
    result = invoke("render", "bob with carol", "--dry-run")
    assert result.exit_code == 1 and result.stderr.startswith("Error: The identities")
    assert no_models == []


def _tiny_copy(home: Path, dest: Path) -> Path:
    shutil.copytree(models.tiny_model_dir(), dest)
    return dest


def test_model_that_does_not_match_the_basis(home, tmp_path):
    import torch
    from transformers import CLIPTextModel

    folder = _tiny_copy(home, tmp_path / "other-model")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        encoder.get_input_embeddings().weight.mul_(1.5)
    encoder.save_pretrained(folder / "text_encoder")
    out = tmp_path / "renders"
    with pytest.raises(BasisMismatch, match="embedding table does not match basis"):
        rendering.render_prompt("alice", model=str(folder), steps=2, device="cpu", out_dir=out)
    assert not any(out.glob("*.png"))


def test_tokenizer_mismatch_is_found_without_loading(home, tmp_path, no_models):
    from transformers import CLIPTokenizer

    folder = _tiny_copy(home, tmp_path / "other-tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.add_tokens(["<zzz>"])
    tokenizer.save_pretrained(folder / "tokenizer")
    with pytest.raises(BasisMismatch, match="tokenizer does not match basis"):
        rendering.plan_render("alice at the beach", model=str(folder))
    assert no_models == []


def test_too_long_prompt_fails_before_loading(home, no_models, tmp_path):
    # Long prompts are encoded in 75-token chunks, as the WebUI does; only absurd ones fail.
    plan = rendering.plan_render(" ".join(["alice"] * 40), person_noun=False)
    assert plan.chunks == [74, 6] and plan.token_count == 80  # an identity is never split
    with pytest.raises(PromptError, match="needs 16 chunks of 75 tokens.*at most 12"):
        rendering.render_prompt(" ".join(["alice"] * 400), out_dir=tmp_path / "r")
    with pytest.raises(PromptError, match="^The negative prompt needs"):
        rendering.render_prompt("alice", negative=" ".join(["bob"] * 400), out_dir=tmp_path)
    result = invoke("render", "x " * 10_000, "--dry-run")
    assert result.exit_code == 1 and "20,000 characters" in result.stderr
    assert no_models == [] and not (tmp_path / "r").exists()


def test_weights_past_the_limit_fail_before_loading(home, no_models, tmp_path):
    # 1,990 nested brackets made a weight past float32 and wrote an all-black PNG.
    with pytest.raises(PromptError, match=r"^The prompt gives 'alice' a weight of .*-100 to 100"):
        rendering.render_prompt("(" * 1990 + "alice", out_dir=tmp_path / "r")
    with pytest.raises(PromptError, match=r"^The negative prompt gives 'blurry' a weight of 1e"):
        rendering.render_prompt("alice", negative="(blurry:100000)", out_dir=tmp_path / "r")
    result = invoke("render", "(alice:101)", "--dry-run")
    assert result.exit_code == 1 and "a weight of 101" in result.stderr
    assert invoke("render", "(alice:100) [[bob]]", "--dry-run").exit_code == 0
    assert no_models == [] and not (tmp_path / "r").exists()


def test_unknown_explicit_identity(home):
    with pytest.raises(IdentityNotFound, match="Did you mean 'alice'"):
        rendering.plan_render("<alise> at the beach")
    result = invoke("render", "<alise> at the beach", "--dry-run")
    assert result.exit_code == 1
    assert "Error: No identity 'alise'. Did you mean 'alice'? See `celebctl list`." in result.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 65}, "--width must be a multiple of 8"),
    ({"height": 4096}, "--height must be a multiple of 8"),
    ({"steps": 0}, "--steps must be between"),
    ({"num_images": 0}, "--num-images must be between"),
    ({"guidance": float("nan")}, "--guidance must be"),
    ({"guidance": 1e308}, "--guidance must be a number from 0 to 100"),  # was a black PNG
    ({"guidance": float("inf")}, "--guidance must be"),
    ({"guidance": -1.0}, "--guidance must be"),
    ({"scheduler": "plms"}, "Unknown scheduler 'plms'"),
    ({"seed": -1}, "--seed must be between"),
    ({"batch_size": 0}, "--batch-size must be between"),
])
def test_bad_options_fail_before_anything(home, no_models, tmp_path, kwargs, message):
    with pytest.raises(InvalidOption, match=re.escape(message)):
        rendering.render_prompt("alice", out_dir=tmp_path / "r", **kwargs)
    assert no_models == [] and not (tmp_path / "r").exists()


def test_out_dir_that_is_a_file(home, components, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InvalidOption, match="is a file"):
        render(components, out=target)


# --------------------------------------------------------------------------------------------
# the CLI end to end (loads the tiny model itself)


def test_cli_render_json(home, tmp_path):
    out = tmp_path / "renders"
    result = invoke("render", "alice shaking hands with bob", "--steps", 2, "-n", 2,
                    "--seed", 4, "--out", out, "--grid", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seeds"] == [4, 5] and data["identities"] == ["alice", "bob"]
    assert data["expanded"] == "<alice> person shaking hands with <bob> person"
    assert data["guidance"] == 10.0
    assert [Path(p).name for p in data["paths"]] == ["alice-shaking-hands-with-bob-4.png",
                                                     "alice-shaking-hands-with-bob-5.png"]
    assert all(Path(p).is_file() for p in data["paths"]) and Path(data["grid"]).is_file()
    assert "random weights" in result.stderr
    plain = invoke("render", "alice", "--steps", 1, "--out", out, "--quiet")
    assert plain.exit_code == 0 and plain.stdout.strip() == str(out / "alice-0.png")
