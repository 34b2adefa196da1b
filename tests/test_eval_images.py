"""`celebctl eval NAME --images DIR`: scoring images made anywhere (issue 18, point 5)."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from celebctl import clipscore, evaluation
from celebctl.evaluation import folder as folder_mod
from tests.helpers import PHOTO

runner = CliRunner()
PARAMETERS = ("a photo of alice person, smiling\nat the beach\nNegative prompt: blurry, lowres\n"
              "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: x")


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


def save_with_parameters(path, text=PARAMETERS):
    info = PngInfo()
    info.add_text("parameters", text)
    Image.open(PHOTO).convert("RGB").save(path, pnginfo=info)


@pytest.fixture
def batch(tmp_path):
    """A folder as a user has it: the test photo, the photo with WebUI parameters, noise, a
    text file, a hidden file and a subfolder."""
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(PHOTO, folder / "b-astronaut.png")
    save_with_parameters(folder / "a-with-prompt.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "c-noise.png")
    (folder / "d-notes.txt").write_text("not an image")
    shutil.copy(PHOTO, folder / ".hidden.png")
    (folder / "sub").mkdir()
    shutil.copy(PHOTO, folder / "sub" / "inside.png")
    return folder


def test_a_folder_is_scored_against_the_identity(home, batch):
    result = evaluation.evaluate_images(["alice"], batch, clip="tiny-clip", device="cpu")
    rows = {r.file: r for r in result.images}
    assert list(rows) == ["a-with-prompt.png", "b-astronaut.png", "c-noise.png", "d-notes.txt"]
    # The astronaut is alice's own face: found, and (re-detected, re-aligned) nearly identical.
    for name in ("a-with-prompt.png", "b-astronaut.png"):
        assert rows[name].faces == 1 and rows[name].identity["alice"] > 0.99
    assert rows["c-noise.png"].faces == 0 and rows["c-noise.png"].identity == {"alice": None}
    assert rows["d-notes.txt"].skipped == (
        "d-notes.txt is not an image celebctl can read. Use a JPEG, PNG, WebP, BMP or GIF photo.")
    # The prompt comes from the PNG's parameters; CLIP reads it with alice as "a person".
    with_prompt = rows["a-with-prompt.png"]
    assert with_prompt.prompt == "a photo of alice person, smiling\nat the beach"
    assert with_prompt.prompt_source == "parameters"
    assert with_prompt.clip_text == "a photo of a person, smiling at the beach"
    scorer = clipscore.load_clip("tiny-clip")
    expected = scorer.similarity([with_prompt.clip_text], [Image.open(PHOTO).convert("RGB")])
    assert with_prompt.prompt_similarity == pytest.approx(expected[0], abs=1e-6)
    assert rows["b-astronaut.png"].prompt is None and rows["b-astronaut.png"].prompt_similarity \
        is None
    summary = result.summary()
    assert summary["files"] == 4 and summary["images"] == 3 and summary["skipped"] == 1
    assert summary["miss_rate.alice"] == pytest.approx(1 / 3)
    assert summary["identity_similarity.alice"] == pytest.approx(
        (rows["a-with-prompt.png"].identity["alice"] + rows["b-astronaut.png"].identity["alice"])
        / 2)
    assert summary["prompt_similarity"] == pytest.approx(expected[0], abs=1e-6)
    assert summary["with_prompt"] == 1
    assert any("2 of 3 image(s) carry no prompt" in note for note in result.notes)


def test_json_rows_and_summary_with_a_prompt(home, batch, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = invoke("eval", "alice", "--images", batch, "--prompt", "a photo of alice",
                    "--clip", "tiny-clip", "--json", "--quiet", "--sheet", sheet)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["names"] == ["alice"] and data["clip"] == "tiny-clip"
    assert data["sheet"] == str(sheet) and data["folder"] == str(batch)
    assert [r["file"] for r in data["images"]] == ["a-with-prompt.png", "b-astronaut.png",
                                                    "c-noise.png", "d-notes.txt"]
    scored = [r for r in data["images"] if r["skipped"] is None]
    assert all(r["prompt"] == "a photo of alice" and r["prompt_source"] == "--prompt"
               and r["clip_text"] == "a photo of a person" for r in scored)
    assert all(isinstance(r["prompt_similarity"], float) for r in scored)
    assert data["images"][3]["skipped"] and data["images"][3]["identity"] == {}
    assert data["summary"]["images"] == 3 and data["summary"]["skipped"] == 1
    assert data["summary"]["identity_similarity.alice"] > 0.99
    # The labelled sheet: a new PNG that says what it is, and is skipped when scored again.
    with Image.open(sheet) as image:
        assert image.size[0] > 256 and "miss rate 0.333" in image.info[evaluation.SHEET_MARK]
    shutil.copy(sheet, batch / "e-sheet.png")
    again = json.loads(invoke("eval", "alice", "--images", batch, "--no-clip", "--json",
                              "--quiet").stdout)
    assert again["images"][-1]["file"] == "e-sheet.png"
    assert "contact sheet" in again["images"][-1]["skipped"] and again["sheet"] is None


def test_the_table_shows_rows_skipped_files_and_the_mean(home, batch):
    result = invoke("eval", "alice", "--images", batch, "--no-clip", "--quiet")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "alice id sim" in text and "b-astronaut.png" in text and "skipped" in text
    assert re.search(r"mean over 3 images, 1 skipped: alice: identity (0\.99\d|1\.000), miss "
                     r"rate 0\.333; prompt -", text)


def test_prompt_text_from_files_is_shown_as_data(home, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    save_with_parameters(folder / "x.png", "alice [bold red]\x1b[31mred\nSteps: 3")
    result = invoke("eval", "alice", "--images", folder, "--no-clip", "--quiet")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\\x1b[31mred" in result.stdout
    assert "[bold red]" in result.stdout


@pytest.mark.skipif(os.name != "posix", reason="symlinks and FIFOs")
def test_links_and_special_files(home, tmp_path):
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "a-link.png").symlink_to(PHOTO)
    (folder / "b-dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(folder / "c-pipe.png")
    data = json.loads(invoke("eval", "alice", "--images", folder, "--no-clip", "--json",
                             "--quiet").stdout)
    rows = {r["file"]: r for r in data["images"]}
    assert rows["a-link.png"]["faces"] == 1 and rows["a-link.png"]["skipped"] is None
    assert "symlink to a file that does not exist" in rows["b-dangling.png"]["skipped"]
    assert "not a regular file" in rows["c-pipe.png"]["skipped"]


@pytest.mark.parametrize("args, message", [
    (["--images", "{dir}", "--seeds", "3"], "--seeds cannot be used with --images"),
    (["--images", "{dir}", "--baseline", "--no-record"],
     "--baseline, --record cannot be used with --images"),
    (["--images", "{dir}", "--out", "x"], "--out cannot be used with --images"),
    (["--images", "{dir}", "--model", "tiny"], "--model cannot be used with --images"),
    (["--prompt", "a photo of alice"], "--prompt is for --images"),
])
def test_contradictions_are_usage_errors(home, tmp_path, args, message):
    result = invoke("eval", "alice", *[a.format(dir=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    # Typer draws usage errors in a box: read the words without its frame.
    words = " ".join(re.sub("[\u2500-\u257f]", " ", result.stderr).split())
    assert message in words, words


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d.mkdir(), [], "holds no files to score (subfolders and hidden files are not "
                              "read)"),
    (lambda d: None, [], "does not exist. Give the folder that holds the images."),
    (lambda d: d.write_text("x"), [], "is a file, not a folder."),
    (lambda d: d.mkdir(), ["--prompt", " "], "The prompt is empty."),
    (lambda d: d.mkdir(), ["--sheet", "{dir}/../s.jpg"], "must end in .png"),
    (lambda d: d.mkdir(), ["--sheet", "{dir}/../nofolder/s.png"], "does not exist"),
])
def test_folder_problems_are_refused_before_loading(home, built, tmp_path, make, args, message):
    target = tmp_path / "imgs"
    make(target)
    result = invoke("eval", "alice", "--images", target, "--no-clip",
                    *[a.format(dir=target) for a in args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert built == []


def test_an_existing_sheet_is_never_overwritten(home, built, batch, tmp_path):
    (tmp_path / "s.png").write_bytes(b"mine")
    result = invoke("eval", "alice", "--images", batch, "--no-clip", "--sheet", tmp_path / "s.png")
    assert result.exit_code == 1 and "already exists; eval never overwrites" in result.stderr
    assert (tmp_path / "s.png").read_bytes() == b"mine" and built == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e9"])
def test_absurd_guidance_is_refused_before_loading(home, built, value, tmp_path):
    result = invoke("eval", "alice", "--guidance", value, "--no-clip", "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    assert "--guidance must be a number between 0 and 100" in result.stderr
    assert built == [] and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# prompts read from files


@pytest.mark.parametrize("text, prompt", [
    (PARAMETERS, "a photo of alice person, smiling\nat the beach"),
    ("just a prompt", "just a prompt"),
    ("a cat\nSteps: 20, Sampler: Euler", "a cat"),
    ("Negative prompt: ugly\nSteps: 20, Seed: 3", None),
    # The WebUI's rule: a last line of three or more "Key: value" pairs is settings, whatever
    # comes first; fewer is prompt text (#24 point 17).
    ("a cat\nSampler: Euler a, Seed: 3, Size: 512x512", "a cat"),
    ("a cat\nNegative prompt: ugly\nSize: 64x64, Model: \"a, b\", Version: v1", "a cat"),
    ("a cat\nmood: calm, light: soft", "a cat\nmood: calm, light: soft"),
    ("Seed: 3, Size: 512x512, Model: x", None),
    ("", None),
    (None, None),
])
def test_prompt_from_parameters(text, prompt):
    assert evaluation.prompt_from_parameters(text) == prompt


@pytest.mark.parametrize("prompt, text", [
    ("a photo of alice person riding a bike", "a photo of a person riding a bike"),
    ("a photo of alice", "a photo of a person"),
    ("(alice:1.2) woman at the beach", "a woman at the beach"),
    ("embedding:alice, portrait <lora:film:0.8>", "a person, portrait"),
    ("alice's hat BREAK red", "a person's hat red"),
    ("<nobody> smiling", "<nobody> smiling"),
    ("malice in wonderland", "malice in wonderland"),
])
def test_clip_text_writes_the_identity_as_a_person(prompt, text):
    assert evaluation.clip_text_for(prompt, ["alice"]) == text


def test_the_webui_jpeg_comment_is_read(tmp_path):
    """The WebUI keeps parameters in EXIF UserComment (UNICODE, big-endian) for JPEG/WebP."""
    import io

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + PARAMETERS.encode("utf-16-be")
    buffer = io.BytesIO()
    Image.open(PHOTO).convert("RGB").save(buffer, format="JPEG", exif=exif)
    text = folder_mod.image_text(buffer.getvalue())
    assert evaluation.prompt_from_parameters(text["parameters"]) == \
        "a photo of alice person, smiling\nat the beach"
    assert folder_mod.image_text(b"not an image") == {}


# --------------------------------------------------------------------------------------------
# the contact sheet


def test_a_plain_sheet_is_the_grid_it_was():
    from celebctl.rendering import contact_sheet

    tiles = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    sheet = contact_sheet(tiles, columns=2)
    assert sheet.size == (16, 16)
    assert sheet.getpixel((12, 4)) == (60, 0, 0) and sheet.getpixel((12, 12)) == (0, 0, 0)


def test_a_labelled_sheet_has_its_text_where_a_person_reads_it():
    from celebctl.rendering import contact_sheet

    tiles = [Image.new("RGB", (64, 64), (0, 90, 200)), None, Image.new("RGB", (64, 64))]
    sheet = contact_sheet(tiles, columns=2, title="mean: identity 0.5",
                          row_labels=["a photo of a person " * 20, "second"],
                          captions=["id 0.871\nprompt 0.254", None, "no face"])
    pixels = np.asarray(sheet)
    label_w = 15 * 12  # 64 px images: the 12 px font, a label column 15 font sizes wide
    assert sheet.width == label_w + 2 * 108 and sheet.height > 2 * 64
    title_band = pixels[:14]
    assert (title_band < 100).any()  # dark text on white
    assert (pixels[30:100, :label_w] < 100).any()  # the first row's label
    assert (pixels[:, label_w + 108:][30:100] == 255).all()  # the empty cell stays blank


def test_sheet_text_is_wrapped_cut_and_made_drawable():
    from PIL import ImageDraw

    from celebctl.rendering import images as images_mod

    font = images_mod._sheet_font(12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = images_mod._wrap(draw, "word " * 40 + "x" * 80, font, 100)
    assert len(lines) > 5 and all(draw.textlength(line, font=font) <= 100 for line in lines)
    cut = images_mod._cut(draw, lines, font, 100, 3)
    assert len(cut) == 3 and cut[-1].endswith("...") and cut[:2] == lines[:2]
    assert images_mod._cut(draw, lines[:2], font, 100, 3) == lines[:2]
    assert images_mod._drawable("a\x1b[31mb\u202e", font) == "a?[31mb?"


def test_a_long_prompt_is_cut_in_the_table_and_kept_whole_in_json(home, tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    long_prompt = "alice " + "in a garden of many flowers " * 20
    shutil.copy(PHOTO, folder / "a.png")
    table = invoke("eval", "alice", "--images", folder, "--no-clip", "--quiet",
                   "--prompt", long_prompt)
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "in a garden of many flowers" in text and long_prompt.strip() not in text
    assert "..." in text
    data = json.loads(invoke("eval", "alice", "--images", folder, "--no-clip", "--json",
                             "--prompt", long_prompt).stdout)
    assert data["images"][0]["prompt"] == long_prompt.strip()


def test_sheet_captions_wrap_file_names_at_their_parts_and_keep_scores_whole(monkeypatch):
    """A long file name gives way; "no face" and the prompt score are drawn whole (#24 p. 10)."""
    from PIL import ImageDraw

    from celebctl.rendering import contact_sheet

    drawn: list[str] = []
    original = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: drawn.append(text)
                        or original(self, xy, text, *a, **k))
    name = "L00012-s0000003-a-photo-of-alice-riding-a-bicycle-along-the-beach.png"
    image = Image.new("RGB", (64, 64))
    contact_sheet([image], columns=1, title="t",
                  row_labels=["a photo of alice riding a bicycle along the beach at dawn"],
                  captions=[f"{name}\nno face\nprompt 0.254"])
    assert "no face" in drawn and "prompt 0.254" in drawn
    pieces = [line for line in drawn if len(line) > 3 and line.removesuffix("...") in name]
    assert pieces and pieces[0].startswith("L00012-") and pieces[-1].endswith("...")
    assert all(p.endswith(("-", "...")) for p in pieces[:-1]), pieces  # split after a dash
    words = "a photo of alice riding a bicycle along the beach at dawn".split()
    label = [line for line in drawn if line.split() and set(line.replace("...", "").split())
             <= set(words)]
    assert label and all(w in words for line in label for w in line.replace("...", "").split())
