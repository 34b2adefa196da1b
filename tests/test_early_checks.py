"""Every check that can run without the model runs before it loads: a refused command returns
before any model class (any torch module) is constructed, and its advice names the fix that
works."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from celebctl.cli import app
from tests.helpers import PHOTO

runner = CliRunner()


REFUSALS = [
    (["add", "carl", PHOTO, "--steps", "0"], "--steps must be at least 1"),
    (["add", "carl", PHOTO, "--lr", "-1"], "--lr must be a positive number"),
    (["add", "carl", PHOTO, "--batch-size", "0"], "--batch-size"),
    (["add", "carl", PHOTO, "--pool-size", "0"], "--pool-size"),
    (["add", "carl", PHOTO, "--resolution", "30"], "--resolution"),
    (["add", "Carl", PHOTO], "use lowercase, e.g. 'carl'"),
    (["add", "the", PHOTO], "reserved word"),
    (["add", "alice", PHOTO], "already exists"),
    (["add", "carl", "no-such-photo.jpg"], "no-such-photo.jpg"),
    (["add", "carl", PHOTO, "--face", "1", "--face", "1"], "--face"),
    (["add", "carl", PHOTO, "--model", "no/such-local-folder-or-file.safetensors"],
     "no/such-local-folder-or-file.safetensors"),
    (["joint", "alice"], "at least two identities"),
    (["joint", "alice", "nobody"], "nobody"),
    (["joint", "alice", "bob", "--steps", "0"], "--steps must be at least 1"),
    (["joint", "alice", "bob", "--model", "sd15-random"],
     "joint with --model tiny, or re-add them for this model"),
    (["render", "alice", "--model", "sd15-random"],
     "`celebctl add alice astronaut.png --replace --model sd15-random`"),
    (["render", "alice", "--model", "tiny-xl"], "SDXL"),
    (["render", "alice", "-n", "0"], "--num-images"),
    (["render", "alice", "--steps", "0"], "--steps"),
    (["render", "alice", "--width", "30"], "--width must be a multiple of 8"),
    (["render", "alice", "--guidance", "nan"], "--guidance"),
    (["render", "<nobody> smiling"], "nobody"),
    (["eval", "alice", "--seeds", "0"], "--seeds"),
    (["eval", "nobody"], "nobody"),
    (["eval", "alice", "--model", "sd15-random"], "re-add it for this model"),
    (["basis", "build", "--model", "no/such-local-folder.safetensors"], "no/such-local-folder"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS, ids=lambda v: " ".join(map(str, v))
                         if isinstance(v, list) else None)
def test_refusals_come_before_any_model_is_built(home, built, args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert message.lower() in " ".join(result.stderr.split()).lower(), result.stderr
    assert "Traceback" not in result.output
    assert built == [], f"constructed before refusing: {sorted(set(built))}"


def test_photos_are_checked_before_the_model_loads(home, built, tmp_path):
    """A photo without a face is refused by the face detector alone: nothing of the Stable
    Diffusion model (or the face-recognition network) is built."""
    from PIL import Image

    blank = tmp_path / "wall.png"
    Image.new("RGB", (256, 256), (200, 190, 180)).save(blank)
    result = runner.invoke(app, ["add", "carl", str(PHOTO), str(blank)])
    assert result.exit_code == 1 and "wall.png" in result.stderr, result.output
    assert set(built) <= {"MTCNN", "PNet", "RNet", "ONet", "Conv2d", "PReLU", "MaxPool2d",
                          "Linear", "Softmax", "Softmax2d", "Flatten"}, sorted(set(built))


def test_a_valid_command_does_build_models(home, built, tmp_path):
    # The spy works: the same render with good options constructs the model's modules.
    result = runner.invoke(app, ["render", "alice", "--steps", "1", "-o", str(tmp_path),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "UNet2DConditionModel" in built and "CLIPTextModel" in built
