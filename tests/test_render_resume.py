"""`render --prompts` resumes only images made with this job's identities (issue 24, point 5):
an identity fitted anew since, or another basis, stops the job and replaces nothing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from celebctl import registry, rendering
from celebctl.rendering import resume
from tests.helpers import one_torch_thread

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


def test_an_identity_fitted_anew_stops_the_resumed_job(home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice at the sea\na castle at dawn\n", encoding="utf-8")
    out = tmp_path / "out"
    render = ("render", "--prompts", prompts, "--steps", 2, "--model", "tiny", "-o", out, "-q")
    assert invoke(*render).exit_code == 0
    alice_png = out / "L00001-s0000000-alice-at-the-sea.png"
    castle_png = out / "L00002-s0000000-a-castle-at-dawn.png"
    old_hash = rendering.read_png_metadata(alice_png)["celebctl"]["ti_hashes"]["alice"]
    before = alice_png.read_bytes()
    castle_png.unlink()  # the job stopped before this one
    assert invoke(*render).exit_code == 0 and castle_png.exists()  # same alice: resumes
    castle_png.unlink()

    # alice is now another fit (bob's numbers under her name), as after `add --replace`.
    registry.remove_identity("alice")
    registry.rename_identity("bob", "alice")
    again = invoke(*render)
    assert again.exit_code == 1, again.output
    message = " ".join(again.stderr.split())
    assert "L00001-s0000000-alice-at-the-sea.png was made with another fit of alice (TI hash " \
           f"'{old_hash}', not '" in message
    assert "Nothing is replaced" in message
    assert alice_png.read_bytes() == before and not castle_png.exists()


def test_another_basis_or_identity_hash_is_not_this_jobs_image(tmp_path):
    from PIL import Image

    from celebctl.rendering.images import png_bytes

    made = {"prompt": "alice", "negative_prompt": "", "seed": 0, "steps": 2,
            "scheduler": "ddim", "cfg_scale": 7.5, "width": 64, "height": 64, "model": "tiny",
            "person_noun": "person", "basis_id": "b1", "ti_hashes": {"alice": "aaaa"},
            "sampler": "DDIM", "celebctl_version": "x", "identities": ["alice"]}
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), made))
    assert resume.existing_image(path, dict(made)) is None
    assert resume.existing_image(path, {**made, "basis_id": "b2"}) == (
        "was made with other settings (basis_id: 'b1', not 'b2')")
    assert resume.existing_image(path, {**made, "ti_hashes": {"alice": "bbbb"}}) == (
        "was made with another fit of alice (TI hash 'aaaa', not 'bbbb')")
