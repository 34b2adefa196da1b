"""Photo reading, face detection, alignment and the face encoder (celebctl.faces)."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from celebctl import faces
from celebctl.errors import (
    FaceEncoderUnavailable,
    InvalidOption,
    NoFaceFound,
    PhotoError,
)

ASTRONAUT_BOX = (181, 62, 268, 172)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    """The test portrait as RGB."""
    return Image.open(Path(__file__).parent / "data" / "astronaut.png").convert("RGB")


@pytest.fixture(scope="module")
def two_faces(astronaut) -> Image.Image:
    """A canvas with the astronaut's head twice: small on the left, large on the right."""
    head = astronaut.crop((120, 10, 330, 240))
    canvas = Image.new("RGB", (760, 420), (128, 128, 128))
    canvas.paste(head.resize((147, 161)), (60, 150))
    canvas.paste(head.resize((294, 322)), (400, 40))
    return canvas


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR chunk (8-bit RGB) claiming the given size, with a correct CRC."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    )


def _box_close(box, expected, tol=10.0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(box, expected, strict=True))


# --------------------------------------------------------------------------------------------
# The happy path


def test_astronaut_one_face_near_known_box(photo_path):
    image = faces.load_photo(photo_path)
    assert image.mode == "RGB" and image.size == (512, 512)
    found = faces.detect_faces(image)
    assert len(found) == 1
    face = found[0]
    assert _box_close(face.box, ASTRONAUT_BOX)
    assert face.probability >= faces.MIN_FACE_PROBABILITY
    assert face.landmark_array().shape == (5, 2)
    assert face.area == pytest.approx((face.box[2] - face.box[0]) * (face.box[3] - face.box[1]))
    # MTCNN order: left eye, right eye (as seen in the image), nose, mouth left, mouth right.
    lm = face.landmark_array()
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert lm[0, 1] < lm[2, 1] < lm[3, 1]


def test_prepare_face_is_deterministic(photo_path):
    first = faces.prepare_face(photo_path)
    second = faces.prepare_face(photo_path)
    assert first.aligned.size == (512, 512) and first.aligned.mode == "RGB"
    assert first.png_bytes() == second.png_bytes()
    assert first.png_bytes().startswith(b"\x89PNG")
    assert first.sha256 == second.sha256 == hashlib.sha256(photo_path.read_bytes()).hexdigest()
    assert first.face_count == 1 and first.face_index == 1 and first.note is None
    assert first.original_size == first.image_size == (512, 512) and first.scale == 1.0
    assert first.source == photo_path
    assert _box_close(first.face.box, ASTRONAUT_BOX)


def test_alignment_puts_landmarks_on_the_template(photo_path):
    prepared = faces.prepare_face(photo_path)
    template = faces.FFHQ_TEMPLATE_512
    # The fitted transform maps the eyes within a few px of the template (5-point least squares
    # trades a little eye error for the mouth).
    matrix = faces.alignment_matrix(prepared.face.landmarks)
    lm = prepared.face.landmark_array()
    mapped = np.c_[lm, np.ones(5)] @ matrix.T
    assert np.abs(mapped[:2] - template[:2]).max() < 8
    # And in the pixels: re-detecting on the aligned crop finds the eyes there too.
    again = faces.detect_faces(prepared.aligned)
    assert len(again) == 1
    assert np.abs(again[0].landmark_array()[:2] - template[:2]).max() < 8


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    matrix = faces.alignment._umeyama(src, dst)
    assert np.allclose(matrix[:, :2], scale * rot) and np.allclose(matrix[:, 2], shift)


# --------------------------------------------------------------------------------------------
# Several faces


def test_several_faces_numbered_left_to_right(two_faces, tmp_path):
    found = faces.detect_faces(two_faces)
    assert len(found) == 2
    assert found[0].center_x < found[1].center_x
    assert found[1].area > found[0].area

    face, note = faces.select_face(found, None, "group.png")
    assert face is found[1]
    assert note == (
        "2 faces found; using face 2 (the largest). "
        "Pick another with --face N (numbered left to right)."
    )
    face, note = faces.select_face(found, 1, "group.png")
    assert face is found[0] and note is None

    for bad in (0, 3, -1):
        with pytest.raises(InvalidOption) as info:
            faces.select_face(found, bad, "group.png")
        assert f"--face {bad} is out of range: group.png has 2 faces" in str(info.value)

    path = _save(two_faces, tmp_path / "group.png")
    default = faces.prepare_face(path)
    assert (default.face_index, default.face_count) == (2, 2) and default.note
    chosen = faces.prepare_face(path, face_index=1)
    assert chosen.face_index == 1 and chosen.note is None
    assert chosen.face.box == found[0].box
    with pytest.raises(InvalidOption, match="has 2 faces"):
        faces.prepare_face(path, face_index=5)


def test_select_face_single_face_index_checks():
    face = faces.DetectedFace((0, 0, 10, 10), 0.99, ((1, 1),) * 5, 100.0)
    assert faces.select_face([face], 1, "a.jpg") == (face, None)
    with pytest.raises(InvalidOption, match=r"a.jpg has 1 face \(use 1, numbered"):
        faces.select_face([face], 2, "a.jpg")


# --------------------------------------------------------------------------------------------
# No face


def test_flat_grey_image_has_no_face(tmp_path):
    path = _save(Image.new("RGB", (300, 300), (128, 128, 128)), tmp_path / "photo.jpg")
    with pytest.raises(NoFaceFound) as info:
        faces.prepare_face(path)
    assert str(info.value) == (
        f"No face found in {path}. Use a photo where the face is clearly visible, "
        "frontal and at least ~80 px tall."
    )


def test_one_pixel_image_has_no_face(tmp_path):
    path = _save(Image.new("RGB", (1, 1), (200, 10, 10)), tmp_path / "dot.png")
    assert faces.load_photo(path).size == (1, 1)
    with pytest.raises(NoFaceFound, match="dot.png"):
        faces.prepare_face(path)


# --------------------------------------------------------------------------------------------
# Files that must be refused


def test_missing_file(tmp_path):
    with pytest.raises(PhotoError, match=r"nope\.jpg not found"):
        faces.load_photo(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    with pytest.raises(PhotoError, match="is a folder, not a photo"):
        faces.load_photo(tmp_path)


def test_symlink_loop(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(PhotoError, match=r"a\.jpg is a symlink loop"):
        faces.load_photo(a)


def test_dangling_symlink(tmp_path):
    link = tmp_path / "link.jpg"
    os.symlink(tmp_path / "gone.jpg", link)
    with pytest.raises(PhotoError, match="symlink to a file that does not exist"):
        faces.load_photo(link)


def test_unreadable_file(tmp_path, photo_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop reads")
    path = tmp_path / "secret.png"
    path.write_bytes(photo_path.read_bytes())
    path.chmod(0)
    try:
        with pytest.raises(PhotoError, match=r"No permission to read .*secret\.png"):
            faces.load_photo(path)
    finally:
        path.chmod(0o600)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(PhotoError, match=r"empty\.jpg is empty \(0 bytes\)"):
        faces.load_photo(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 20)
    with pytest.raises(PhotoError, match=r"notes\.jpg is not an image celebctl can read"):
        faces.load_photo(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 40])
def test_truncated_image(tmp_path, astronaut, fmt, keep):
    buffer = io.BytesIO()
    astronaut.save(buffer, format=fmt)
    data = buffer.getvalue()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[:cut])
    with pytest.raises(PhotoError, match=r"cut\.\w+ is truncated or damaged"):
        faces.load_photo(path)


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decoded.append(self.size) or original(self))
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(100_000, 100_000))
    with pytest.raises(PhotoError, match=r"bomb\.png claims to be larger than 64 megapixels"):
        faces.load_photo(path)
    assert decoded == []  # refused from the header: no pixel was decoded


def test_pixel_cap_below_pils_own_limit(tmp_path):
    # 72 MP: under PIL's default bomb limit (~89 MP) but over celebctl's 64 MP cap.
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(9000, 8000))
    with pytest.raises(PhotoError, match=r"big\.png claims to be 9000x8000 pixels"):
        faces.load_photo(path)


# --------------------------------------------------------------------------------------------
# Odd but valid images


def test_sixteen_bit_png_is_rescaled(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    image = faces.load_photo(path)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    # Rescaled, not clipped: the ramp still spans black to white with a mid-grey middle.
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert 110 < pixels[0, 32, 0] < 145


@pytest.mark.parametrize("mode", ["L", "P", "1", "LA", "RGBA"])
def test_other_modes_become_rgb(tmp_path, astronaut, mode):
    path = _save(astronaut.convert(mode), tmp_path / f"m_{mode}.png")
    image = faces.load_photo(path)
    assert image.mode == "RGB" and image.size == astronaut.size


def test_transparent_palette_index_becomes_white(tmp_path):
    palette_image = Image.new("P", (20, 10), 1)
    palette_image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette_image.paste(0, (0, 0, 10, 10))
    path = _save(palette_image, tmp_path / "logo.gif", transparency=0)
    image = faces.load_photo(path)
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((15, 2)) == (0, 200, 0)


def test_pa_and_float_modes_in_memory():
    pa = Image.new("PA", (4, 4))
    assert faces.photos._to_rgb8(pa).mode == "RGB"
    ramp = Image.fromarray(np.linspace(0, 255, 16, dtype=np.float32).reshape(4, 4), mode="F")
    assert np.asarray(faces.photos._to_rgb8(ramp))[3, 3, 0] == 255


def test_palette_photo_still_has_its_face(tmp_path, astronaut):
    path = _save(astronaut.convert("P", palette=Image.Palette.ADAPTIVE), tmp_path / "pal.gif")
    found = faces.detect_faces(faces.load_photo(path))
    assert len(found) == 1 and _box_close(found[0].box, ASTRONAUT_BOX)


def test_cmyk_jpeg(tmp_path, astronaut):
    path = _save(astronaut.convert("CMYK"), tmp_path / "print.jpg", quality=95)
    image = faces.load_photo(path)
    assert image.mode == "RGB"
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(astronaut, np.int16)).mean()
    assert diff < 10


def test_rgba_alpha_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent black
    image = faces.load_photo(_save(rgba, tmp_path / "cut.png"))
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((35, 5)) == (255, 0, 0)


def test_exif_rotated_jpeg_is_upright(tmp_path, astronaut):
    upright = astronaut.crop((0, 0, 512, 400))
    # Orientation 6 = "rotate 90 degrees clockwise to display": store the pixels turned
    # counter-clockwise, as a phone held sideways would.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "phone.jpg", exif=exif, quality=95)
    assert Image.open(path).size == (400, 512)
    image = faces.load_photo(path)
    assert image.size == (512, 400)
    found = faces.detect_faces(image)
    assert len(found) == 1 and _box_close(found[0].box, ASTRONAUT_BOX)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    image = faces.load_photo(path)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("fmt,suffix", [("WEBP", "webp"), ("BMP", "bmp")])
def test_webp_and_bmp(tmp_path, astronaut, fmt, suffix):
    image = faces.load_photo(_save(astronaut, tmp_path / f"a.{suffix}", format=fmt))
    assert image.mode == "RGB" and image.size == (512, 512)


def test_large_photo_is_downscaled_for_detection(tmp_path, astronaut):
    canvas = Image.new("RGB", (3000, 2000), (128, 128, 128))
    canvas.paste(astronaut.resize((1024, 1024)), (1000, 500))
    path = _save(canvas, tmp_path / "huge.jpg", quality=90)
    assert faces.load_photo(path, max_side=faces.MAX_DETECTION_SIDE).size == (2048, 1365)
    prepared = faces.prepare_face(path)
    assert prepared.original_size == (3000, 2000)
    assert prepared.image_size == (2048, 1365)
    assert prepared.scale == pytest.approx(2048 / 3000)
    # The box refers to the downscaled image: the astronaut box, doubled, shifted, scaled.
    expected = [
        (v * 2 + off) * prepared.scale
        for v, off in zip(ASTRONAUT_BOX, (1000, 500, 1000, 500), strict=True)
    ]
    assert _box_close(prepared.face.box, expected, tol=15)
    assert prepared.aligned.size == (512, 512)


def test_module_import_does_not_pull_torch():
    code = (
        "import sys, celebctl.faces; "
        "assert 'torch' not in sys.modules and 'facenet_pytorch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Face encoder


@pytest.fixture(scope="module")
def random_encoder():
    return faces.load_face_encoder("random-init", seed=0)


def test_encoder_input_shapes_and_standardisation(photo_path):
    aligned = faces.prepare_face(photo_path).aligned
    from_pil = faces.face_encoder_input(aligned)
    assert from_pil.shape == (1, 3, 160, 160)
    assert from_pil.min() >= -1.0 and from_pil.max() <= 1.0
    crops = torch.from_numpy(np.asarray(aligned, np.float32) / 255).permute(2, 0, 1)[None]
    batch = faces.encoder_input_from_crops(crops.repeat(3, 1, 1, 1))
    assert batch.shape == (3, 3, 160, 160)
    assert torch.allclose(batch[0], from_pil[0])
    # A white crop becomes (255 - 127.5) / 128, as facenet's fixed_image_standardization.
    white = faces.encoder_input_from_crops(torch.ones(1, 3, 64, 64))
    assert torch.allclose(white, torch.full_like(white, 127.5 / 128))


def test_random_init_encoder_is_deterministic(random_encoder):
    again = faces.load_face_encoder("random-init", seed=0)
    other = faces.load_face_encoder("random-init", seed=1)
    assert not random_encoder.training
    assert not any(p.requires_grad for p in random_encoder.parameters())
    crops = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    out = faces.embed_faces(random_encoder, crops)
    assert out.shape == (2, 512) and not out.requires_grad
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(out, faces.embed_faces(again, crops))
    assert not torch.allclose(out, faces.embed_faces(other, crops))


def test_random_init_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    faces.load_face_encoder("random-init", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_encoder_kind():
    with pytest.raises(InvalidOption, match="Unknown face encoder 'arcface'"):
        faces.load_face_encoder("arcface")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("CELEBCTL_FACE_WEIGHTS", raising=False)
    return home


def test_vggface2_missing_weights(torch_home):
    expected = torch_home / "checkpoints" / "20180402-114759-vggface2.pt"
    assert faces.face_weights_path() == expected
    with pytest.raises(FaceEncoderUnavailable) as info:
        faces.load_face_encoder("vggface2")
    message = " ".join(str(info.value).split())
    # Offline (the tests set HF_HUB_OFFLINE): the URL, the file name and where to put it.
    assert faces.VGGFACE2_URL in message and "offline" in message
    assert f"copy the file 20180402-114759-vggface2.pt to {expected}" in message
    assert "CELEBCTL_FACE_WEIGHTS=/path/to/file" in message
    assert not expected.exists()  # nothing was downloaded or created


def _online(monkeypatch):
    for name in faces.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)


def test_face_weights_are_downloaded_once_and_checked(torch_home, tmp_path, monkeypatch):
    import hashlib

    source = tmp_path / "asset.pt"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    _online(monkeypatch)
    seen = []
    path = faces.download_face_weights(progress=lambda *a: seen.append(a[1]),
                                       url=source.as_uri(), sha256=digest)
    assert path == faces.face_weights_path() and path.read_bytes() == source.read_bytes()
    assert seen and seen[-1] == 7000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_a_download_that_does_not_match_its_checksum_is_deleted(torch_home, tmp_path,
                                                                   monkeypatch):
    source = tmp_path / "asset.pt"
    source.write_bytes(b"tampered")
    _online(monkeypatch)
    with pytest.raises(FaceEncoderUnavailable, match="does not match the published sha256"):
        faces.download_face_weights(url=source.as_uri(), sha256="0" * 64)
    assert not faces.face_weights_path().exists()
    assert not any(faces.face_weights_path().parent.iterdir())
    with pytest.raises(FaceEncoderUnavailable, match="download from .* failed"):
        faces.download_face_weights(url=(tmp_path / "missing.pt").as_uri(), sha256="0" * 64)


def test_vggface2_env_override_missing(tmp_path, monkeypatch):
    target = tmp_path / "weights" / "vgg.pt"
    monkeypatch.setenv("CELEBCTL_FACE_WEIGHTS", str(target))
    assert faces.face_weights_path() == target
    with pytest.raises(FaceEncoderUnavailable, match=f"points at {target}, which does not"):
        faces.load_face_encoder("vggface2")


def test_vggface2_garbage_file(torch_home):
    path = torch_home / "checkpoints" / "20180402-114759-vggface2.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(FaceEncoderUnavailable, match="is not a valid VGGFace2 weights file"):
        faces.load_face_encoder("vggface2")


def test_vggface2_wrong_state_dict(torch_home):
    path = torch_home / "checkpoints" / "20180402-114759-vggface2.pt"
    path.parent.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(FaceEncoderUnavailable, match="is not a valid VGGFace2 weights file"):
        faces.load_face_encoder("vggface2")


class _NotWeights:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


def test_vggface2_pickled_object_is_not_unpickled(torch_home):
    path = torch_home / "checkpoints" / "20180402-114759-vggface2.pt"
    path.parent.mkdir(parents=True)
    torch.save({"payload": _NotWeights()}, path)
    with pytest.raises(FaceEncoderUnavailable, match="is not a valid VGGFace2 weights file"):
        faces.load_face_encoder("vggface2")


def test_vggface2_valid_state_dict_loads(torch_home, random_encoder, monkeypatch):
    path = torch_home / "checkpoints" / "20180402-114759-vggface2.pt"
    path.parent.mkdir(parents=True)
    state = dict(random_encoder.state_dict())
    # The released file also carries the VGGFace2 classifier; the loader must drop it.
    state["logits.weight"] = torch.zeros(10, 512)
    state["logits.bias"] = torch.zeros(10)
    torch.save(state, path)

    loaded = faces.load_face_encoder("vggface2", seed=99)
    assert not loaded.training
    crops = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    assert torch.equal(faces.embed_faces(loaded, crops), faces.embed_faces(random_encoder, crops))

    # The same file through CELEBCTL_FACE_WEIGHTS, with TORCH_HOME elsewhere.
    moved = path.rename(path.parent.parent / "elsewhere.pt")
    monkeypatch.setenv("CELEBCTL_FACE_WEIGHTS", str(moved))
    via_env = faces.load_face_encoder("vggface2")
    assert torch.equal(faces.embed_faces(via_env, crops), faces.embed_faces(random_encoder, crops))
