"""`celebctl eval` on the tiny model with the built-in tiny CLIP (issue 12)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from celebctl import clipscore, evaluation, faces, registry
from celebctl.errors import ModelUnavailable
from tests.helpers import PHOTO

runner = CliRunner()
FAST = ["--seeds", "1", "--steps", "1", "--clip", "tiny-clip", "--quiet"]


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def other_face(tmp_path_factory):
    """Another face: the test photo mirrored with its colour channels swapped."""
    image = Image.open(PHOTO).convert("RGB")
    r, g, b = ImageOps.mirror(image).split()
    return Image.merge("RGB", (b, g, r))


def test_eval_end_to_end(home, tmp_path):
    result = invoke("eval", "alice", *FAST, "--out", tmp_path / "ev", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompt_set"] == evaluation.PROMPT_SET_VERSION and data["names"] == ["alice"]
    assert len(data["images"]) == len(evaluation.SINGLE_PROMPTS) == 20
    assert len(data["per_prompt"]) == 20 and data["clip"] == "tiny-clip"
    # The tiny model draws noise: no faces, every image a miss, no identity similarity.
    assert data["summary"]["miss_rate.alice"] == 1.0
    assert data["summary"]["identity_similarity.alice"] is None
    assert all(img["identity"] == {"alice": None} and img["faces"] == 0 for img in data["images"])
    assert all(isinstance(img["prompt_similarity"], float) for img in data["images"])
    assert data["images"][0]["clip_text"] == "a close-up photo of a person"
    for img in data["images"]:
        assert (tmp_path / "ev" / img["path"].split("/")[-1]).is_file()
    sheet = Image.open(data["sheet"])
    # One row per prompt (a label column on the left), one column per seed, a summary on top.
    assert sheet.size[0] > 64 and sheet.size[1] > 64 * 20
    assert sheet.info[evaluation.SHEET_MARK].startswith(
        "celebctl-eval-v1, 1 seed(s) per prompt, 1 steps, tiny. Mean over 20 images: alice: "
        "identity -, miss rate 1.000; prompt ")
    history = registry.get_identity("alice").meta["evals"]
    assert len(history) == 1 and history[0]["prompt_set"] == evaluation.PROMPT_SET_VERSION
    assert history[0]["miss_rate_alice"] == 1.0 and history[0]["model"] == "tiny"
    assert history[0]["sheet"] == str(Path(data["sheet"]).resolve())  # `serve` shows it
    assert "evals 1:" in invoke("show", "alice").stdout
    # A second run keeps the first run's images and appends to the history.
    again = json.loads(invoke("eval", "alice", *FAST, "--out", tmp_path / "ev", "--json").stdout)
    assert again["images"][0]["path"] != data["images"][0]["path"]
    assert len(registry.get_identity("alice").meta["evals"]) == 2


def test_eval_table_baseline_and_pairs(home, tmp_path):
    result = invoke("eval", "alice", "bob", *FAST, "--baseline", "--no-record",
                    "--out", tmp_path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "alice id sim" in text and "bob id sim" in text and "prompt sim" in text
    assert "shaking" in text and "told apart" in text
    assert "baseline mean ('a person')" in text and "told apart" in text
    assert "contact sheet:" in text
    assert "evals" not in registry.get_identity("alice").meta
    data = json.loads(invoke("eval", "alice", "bob", *FAST, "--baseline", "--no-record",
                             "--out", tmp_path, "--json").stdout)
    assert data["per_prompt"][0]["prompt"] == "a photo of alice shaking hands with bob"
    assert "identity.bob" in data["per_prompt"][0] and "told_apart_rate" in data["summary"]
    baseline = [img for img in data["images"] if img["baseline"]]
    assert baseline and all("alice" not in img["prompt"] for img in baseline)
    assert baseline[0]["prompt"] == "a photo of a person shaking hands with another person"
    assert data["baseline_summary"]["images"] == len(baseline)
    # The baseline per prompt, beside the identity's numbers (#24 point 10).
    first = data["per_prompt"][0]
    assert first["baseline"]["prompt"] == baseline[0]["prompt"]
    assert first["baseline"]["images"] == 1 and "identity.alice" in first["baseline"]
    singles = [row for row in data["per_prompt"] if row["prompt"].startswith("a photo of ")
               and "shaking" not in row["prompt"]]
    assert singles and all(row["baseline"]["prompt"].startswith("a photo of a person")
                           for row in singles)
    assert len({img["prompt"] for img in baseline}) == len(baseline)  # each text rendered once
    assert "identity / baseline: each prompt with 'a person'" in text
    assert re.search(r"(\d\.\d{3}|-) / (\d\.\d{3}|-)", text), text


def test_no_clip_skips_the_column(home, tmp_path):
    data = json.loads(invoke("eval", "alice", "--seeds", "1", "--steps", "1", "--no-clip",
                             "--quiet", "--json", "--no-record", "--out", tmp_path).stdout)
    assert data["clip"] is None and data["summary"]["prompt_similarity"] is None


def test_a_missing_clip_model_is_a_clear_error_before_rendering(home, tmp_path):
    result = invoke("eval", "alice", "--seeds", "1", "--steps", "1", "--out", tmp_path / "ev")
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "openai/clip-vit-large-patch14" in message and "--no-clip" in message
    assert "hf download" in message
    assert not (tmp_path / "ev").exists() or not list((tmp_path / "ev").iterdir())
    with pytest.raises(ModelUnavailable):
        clipscore.load_clip(str(tmp_path / "no-such-folder"))


def test_identity_similarity_measures_something(home, other_face):
    ident = registry.get_identity("alice")
    references = {"alice": np.stack(ident.load_face_embeddings())}
    encoders = {"alice": faces.load_face_encoder(ident.meta["face_encoder"])}
    own = evaluation.score_faces(Image.open(PHOTO).convert("RGB"), references, encoders)
    other = evaluation.score_faces(other_face, references, encoders)
    assert own.faces == 1 and other.faces == 1
    assert own.matched["alice"] > other.matched["alice"]
    assert own.matched["alice"] > 0.99  # the stored crop, found and aligned again
    blank = evaluation.score_faces(Image.new("RGB", (256, 256), (90, 90, 90)), references,
                                   encoders)
    assert blank.faces == 0 and blank.matched == {"alice": None}


def test_two_faces_are_matched_to_two_identities(home, other_face):
    encoder = faces.load_face_encoder("random-init")
    photo = Image.open(PHOTO).convert("RGB")
    embed = []
    for image in (photo, other_face):
        face = faces.select_face(faces.detect_faces(image), None, "x")[0]
        crop = torch.from_numpy(np.asarray(faces.align_face(image, face), dtype=np.float32)
                                / 255).permute(2, 0, 1)[None]
        embed.append(faces.embed_faces(encoder, crop)[0].numpy())
    canvas = Image.new("RGB", (photo.width * 2, photo.height))
    canvas.paste(photo, (0, 0))
    canvas.paste(other_face, (photo.width, 0))
    references = {"alice": embed[0][None], "bob": embed[1][None]}
    scored = evaluation.score_faces(canvas, references, {"alice": encoder, "bob": encoder})
    assert scored.faces == 2 and scored.told_apart is True
    assert scored.matched["alice"] > 0.95 and scored.matched["bob"] > 0.95
    # One face for two identities: only one of them gets it, and they are not told apart.
    single = evaluation.score_faces(photo, references, {"alice": encoder, "bob": encoder})
    assert sum(v is not None for v in single.matched.values()) == 1
    assert single.told_apart is False and single.matched["alice"] is not None


def test_assignment_maximises_the_total():
    scores = [[0.9, 0.8], [0.85, 0.1]]  # greedy would give face 0 to the first identity
    assert evaluation._assign(scores, ["a", "b"]) == {"a": 1, "b": 0}
    assert evaluation._assign([[0.5, 0.4]], ["a", "b"]) in ({"a": 0, "b": None},)


def test_prompt_similarity_is_clips_cosine():
    scorer = clipscore.load_clip("tiny-clip")
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))]
    texts = ["a photo of a person", "a photo of a person"]
    ours = scorer.similarity(texts, images)
    model, tokenizer, processor = clipscore.tiny_clip()
    tokens = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = clipscore._features(model.get_text_features(**tokens))
        image = clipscore._features(model.get_image_features(pixel_values=pixels))
    expected = torch.nn.functional.cosine_similarity(text, image).tolist()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert abs(ours[0] - ours[1]) > 1e-4  # another image, another score


def test_prompt_sets():
    single = evaluation.prompt_set(["alice"])
    assert len(single) == 20 and all("alice" in p and "a person" in c for p, c in single)
    pair = evaluation.prompt_set(["alice", "bob"])
    assert any("alice" in p and "bob" in p for p, _ in pair)
    assert pair[0][1] == "a photo of a person shaking hands with another person"


@pytest.mark.parametrize("args, match", [
    (["--seeds", "0"], "--seeds"), (["--steps", "0"], "--steps"), (["alice"], "twice"),
])
def test_options_are_checked_first(home, args, match):
    result = invoke("eval", "alice", *args, "--no-clip")
    assert result.exit_code == 1 and match in result.stderr


def test_the_eval_bar_counts_images_not_steps(home, tmp_path):
    """20 prompts x 1 seed at 2 steps: the bar goes to 20 images, not 40 steps (#24 point 14)."""
    calls = []
    evaluation.evaluate(["alice"], seeds=1, steps=2, clip=None, record=False,
                        out_dir=tmp_path, progress=lambda *a: calls.append(a))
    counts = [(done, total) for phase, done, total, _ in calls if phase == "eval"]
    assert {total for _, total in counts} == {20}
    assert counts[-1][0] == 20 and all(0 <= d <= 20 for d, _ in counts)
    assert [d for d, _ in counts] == sorted(d for d, _ in counts)


def _record(prompt, clip_text, baseline, seed, faces=0):
    return evaluation.ImageRecord(
        prompt=prompt, clip_text=clip_text, seed=seed, path=Path(f"{prompt}-{seed}.png"),
        baseline=baseline, faces=faces, identity={"alice": None}, told_apart=None,
        prompt_similarity=0.25)


def test_the_sheet_puts_each_baseline_beside_its_prompt():
    from celebctl.evaluation import promptset

    images = [_record(p, c, False, s) for p, c in (("alice 1", "person 1"),
                                                   ("alice 2", "person 2")) for s in (0, 1)]
    images += [_record(c, c, True, s) for c in ("person 1", "person 2") for s in (0, 1)]
    result = promptset.EvalResult(names=["alice"], model="tiny", prompt_set="v", seeds=[0, 1],
                                  steps=1, guidance=10.0, clip=None, images=images, sheet=None,
                                  created="now")
    order = [(r.prompt, r.seed) for r in promptset.sheet_records(result)]
    assert order == [("alice 1", 0), ("alice 1", 1), ("person 1", 0), ("person 1", 1),
                     ("alice 2", 0), ("alice 2", 1), ("person 2", 0), ("person 2", 1)]
    assert promptset.sheet_columns(result) == 4
    _, labels, captions = promptset.sheet_caption_rows(result)
    assert labels == ["alice 1", "alice 2"]
    assert captions[0] == "no face\nprompt 0.250"
    assert captions[2] == "a person\nno face\nprompt 0.250"
