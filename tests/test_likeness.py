"""Reference-faithful defaults (issue 10): captions, "person" after identities, guidance 10,
fp32 text encoder during fits, EMA once per sample, fresh latents, several photos per person."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from celebctl import (
    augment,
    basis,
    bundles,
    captions,
    faces,
    fitstep,
    models,
    prompting,
    registry,
    rendering,
)
from celebctl.errors import InvalidOption, NoFaceFound, PhotoError
from celebctl.fitting import FitSettings, FitSubject, add_identity_from_photo, fit_identities
from tests.helpers import PHOTO, craft_bundle

runner = CliRunner()


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def second_photo(tmp_path_factory):
    """The test photo mirrored and recoloured: a second 'photo' of a face."""
    path = tmp_path_factory.mktemp("photos") / "second.png"
    image = Image.open(PHOTO).convert("RGB")
    r, g, b = ImageOps.mirror(image).split()
    Image.merge("RGB", (b, r, g)).save(path)
    return path


# --------------------------------------------------------------------------------------------
# 1. captions: the subject comes last, and nothing absent is described


@pytest.mark.parametrize("template", captions.CAPTION_TEMPLATES)
def test_every_caption_ends_with_the_subject_and_describes_nothing_absent(template):
    assert template.count("{}") == 1 and template.endswith("{}"), template
    words = set(re.findall(r"[a-z0-9]+", template.lower()))
    assert not words & captions.ABSENT_WORDS, (template, words & captions.ABSENT_WORDS)
    caption = template.format(captions.SUBJECT_PHRASE.format("X"))
    assert caption.endswith("face of X person")


def test_the_identity_slots_are_followed_only_by_person_and_the_end(tiny_home):
    from celebctl.fitting import tokenize_templates

    tokenizer = models.build_clip_tokenizer()
    person = tokenizer("person", add_special_tokens=False)["input_ids"]
    for tokens in tokenize_templates(tokenizer):
        last_slot = max(pos for pos, _, _ in tokens.slots)
        tail = tokens.input_ids[last_slot + 1:tokens.length]
        assert tail == person + [tokenizer.eos_token_id]


def test_the_rule_catches_bad_templates():
    # The check above is not vacuous: the old kinds of template fail it.
    for bad in ("a photo of {} at the beach", "a photo of {}, upper body",
                "a family photo with {}"):
        words = set(re.findall(r"[a-z0-9]+", bad.lower()))
        assert not bad.endswith("{}") or words & captions.ABSENT_WORDS


# --------------------------------------------------------------------------------------------
# 2. "person" after each identity


@pytest.mark.parametrize("text, expanded", [
    ("alice riding a bike", "<alice> person riding a bike"),
    ("a photo of alice", "a photo of <alice> person"),
    ("alice's hat", "<alice> person's hat"),
    ("ALICE\u2019S hat", "<alice> person\u2019S hat"),
    ("alice man", "<alice> man"),
    ("alice woman at work", "<alice> woman at work"),
    ("alice person", "<alice> person"),
    ("alice people", "<alice> people"),
    ("alice shaking hands with bob", "<alice> person shaking hands with <bob> person"),
    ("<alice>, smiling", "<alice> person, smiling"),
    ("alice's man", "<alice> person's man"),
])
def test_person_follows_each_identity(text, expanded):
    parsed = prompting.with_person_nouns(prompting.parse_prompt(text, ["alice", "bob"]))
    assert parsed.expanded() == expanded


def test_person_is_tokenised_after_the_slots():
    tokenizer = models.build_clip_tokenizer()
    parsed = prompting.with_person_nouns(prompting.parse_prompt("alice's hat", ["alice"]))
    tokens = prompting.tokenize_prompt(parsed, tokenizer)
    plain = tokenizer("person's hat", add_special_tokens=False)["input_ids"]
    assert tokens.input_ids[3:3 + len(plain)] == plain and [p for p, _, _ in tokens.slots] == [1, 2]


def test_render_records_and_can_turn_off_the_expansion(home):
    plan = rendering.plan_render("alice's portrait")
    assert plan.prompt.expanded() == "<alice> person's portrait" and plan.person_noun
    off = rendering.plan_render("alice's portrait", person_noun=False)
    assert off.prompt.expanded() == "<alice>'s portrait" and off.token_count == plan.token_count - 1
    result = invoke("render", "alice's portrait", "--dry-run")
    assert "Prompt:     <alice> person's portrait" in result.stdout


# --------------------------------------------------------------------------------------------
# 3. guidance 10 for identities


def test_guidance_defaults(home, tmp_path):
    assert rendering.default_guidance(True) == 10.0 and rendering.default_guidance(False) == 7.5
    data = json.loads(invoke("render", "alice", "--steps", 1, "--quiet", "--json",
                             "--out", tmp_path).stdout)
    assert data["guidance"] == 10.0
    meta = rendering.read_png_metadata(data["paths"][0])["celebctl"]
    assert meta["cfg_scale"] == 10.0 and meta["person_noun"] is True
    data = json.loads(invoke("render", "a cat", "--model", "tiny", "--steps", 1, "--quiet",
                             "--json", "--out", tmp_path).stdout)
    assert data["guidance"] == 7.5
    data = json.loads(invoke("render", "alice", "--steps", 1, "--quiet", "--json",
                             "--guidance", 4, "--out", tmp_path).stdout)
    assert data["guidance"] == 4.0


# --------------------------------------------------------------------------------------------
# 4. precision: the text encoder stays fp32 in a fit


def test_fits_keep_the_text_encoder_in_fp32(tiny_home):
    from celebctl.fitting import load_fit_model

    components, _ = load_fit_model(models.resolve_model_spec("tiny"), torch.device("cpu"),
                                   "bf16")
    assert components.text_encoder.dtype == torch.float32
    assert components.unet.dtype == torch.bfloat16 and components.vae.dtype == torch.bfloat16
    outcome = add_identity_from_photo("alice", PHOTO, model="tiny", device="cpu", dtype="bf16",
                                      settings=FitSettings(steps=2, pool_size=2))
    fit = outcome.identities[0].meta["fit"]
    assert fit["dtype"] == "bf16" and fit["text_encoder_dtype"] == "fp32"
    assert np.isfinite(outcome.result.losses).all()
    # On the CPU the default stays fp32 throughout.
    assert models.resolve_dtype("auto", "cpu") == torch.float32


# --------------------------------------------------------------------------------------------
# 5. EMA once per sample


@pytest.mark.parametrize("n, batch", [(1, 2), (1, 3), (2, 2), (3, 2), (2, 5)])
def test_ema_arithmetic_equals_one_update_per_sample(n, batch):
    steps, m, width = 7, 0.9, 5
    owners = (torch.arange(steps * batch) % n).view(steps, batch)
    decay, weight = fitstep.ema_arrays(owners, n, m)
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((steps, batch, width))
    ema = torch.zeros((n, width))
    expected: list = [None] * n
    for s in range(steps):
        x = torch.tensor(samples[s], dtype=torch.float32)
        ema = decay[s][:, None] * ema + weight[s] @ x
        for j in range(batch):  # the reference: one update per sample, in batch order
            i = int(owners[s, j])
            expected[i] = samples[s, j].copy() if expected[i] is None else \
                m * expected[i] + (1 - m) * samples[s, j]
    for i in range(n):
        np.testing.assert_allclose(ema[i].numpy(), expected[i], rtol=1e-5, atol=1e-6)


def test_per_step_ema_would_differ():
    # The old rule (one update per step on the batch mean) gives another average: the test
    # above can tell them apart.
    owners = torch.zeros((3, 2), dtype=torch.long)
    decay, weight = fitstep.ema_arrays(owners, 1, 0.5)
    x = torch.tensor([[[1.0], [3.0]], [[5.0], [7.0]], [[9.0], [11.0]]])
    ema = torch.zeros((1, 1))
    per_step = None
    for s in range(3):
        ema = decay[s][:, None] * ema + weight[s] @ x[s]
        mean = x[s].mean()
        per_step = mean if per_step is None else 0.5 * per_step + 0.5 * mean
    assert float(ema) != pytest.approx(float(per_step))


# --------------------------------------------------------------------------------------------
# 6. fresh latents and augmentations


def test_each_step_draws_a_fresh_latent_from_the_pool_distribution(tiny_home):
    components = models.load_pipeline_components("tiny", "cpu", "fp32")
    face = faces.prepare_face(PHOTO).aligned
    encoder = faces.load_face_encoder("random-init")
    pool = augment.build_sample_pool(components.vae, [FitSubject("a", face)], encoder, 3, 64,
                                     random.Random(0), components.device, torch.float32)
    assert pool.latent_mean.shape == pool.latent_std.shape == (3, 4, 8, 8)
    assert bool((pool.latent_std > 0).all())
    schedule = fitstep.build_schedule(
        steps=6, batch_size=2, pool_identity=pool.identity, n_identities=1, n_templates=4,
        latent_shape=(4, 8, 8), alphas_cumprod=components.scheduler.alphas_cumprod,
        num_train_timesteps=1000, ema_momentum=0.99, seed=1)
    assert not torch.equal(schedule.latent_noise[0], schedule.latent_noise[1])
    again = fitstep.build_schedule(
        steps=6, batch_size=2, pool_identity=pool.identity, n_identities=1, n_templates=4,
        latent_shape=(4, 8, 8), alphas_cumprod=components.scheduler.alphas_cumprod,
        num_train_timesteps=1000, ema_momentum=0.99, seed=1)
    for key in schedule.__dataclass_fields__:
        assert torch.equal(getattr(schedule, key), getattr(again, key)), key


def test_pool_size_defaults_by_device():
    cpu = FitSettings().resolved(1, 512, "cpu")
    gpu = FitSettings().resolved(1, 512, "cuda")
    assert cpu.pool_size == 64 and gpu.pool_size == 256
    assert FitSettings(steps=10).resolved(1, 512, "cuda").pool_size == 20  # steps x batch
    assert FitSettings(pool_size=9).resolved(2, 512, "cpu").pool_size == 9
    with pytest.raises(InvalidOption, match="--pool-size"):
        FitSettings(pool_size=0).check()


# --------------------------------------------------------------------------------------------
# 7. several photos of one person


def test_the_pool_draws_from_every_photo(tiny_home, second_photo, monkeypatch):
    components = models.load_pipeline_components("tiny", "cpu", "fp32")
    crops = [faces.prepare_face(p).aligned for p in (PHOTO, second_photo)]
    tensors = [augment.pil_to_tensor(c) for c in crops]
    used = []
    real = augment.jitter

    def record(crops, draws):
        used.extend(next(i for i, t in enumerate(tensors) if torch.equal(t, c)) for c in crops)
        return real(crops, draws)

    monkeypatch.setattr(augment, "jitter", record)
    encoder = faces.load_face_encoder("random-init")
    pool = augment.build_sample_pool(components.vae, [FitSubject("a", crops)], encoder, 6, 64,
                                     random.Random(0), components.device, torch.float32)
    assert used == [0, 1, 0, 1, 0, 1]
    assert pool.clean_features[0].shape == (2, 512) and pool.features.shape == (6, 512)


def test_add_several_photos_keeps_every_crop_and_source(tiny_home, second_photo, tmp_path):
    result = invoke("add", "alice", PHOTO, second_photo, "--model", "tiny", "--steps", 2,
                    "--quiet", "--json")
    assert result.exit_code == 0, result.output
    ident = registry.get_identity("alice")
    assert ident.face_count == 2
    assert [s["photo"] for s in ident.meta["sources"]] == [PHOTO.name, second_photo.name]
    pngs, embeddings = ident.load_face_pngs(), ident.load_face_embeddings()
    assert len(pngs) == 2 and pngs[0] != pngs[1] and len(embeddings) == 2
    assert json.loads(invoke("list", "--json").stdout)["identities"][0]["faces"] == 2
    shown = invoke("show", "alice").stdout
    assert "sources 1:" in shown and "sources 2:" in shown and second_photo.name in shown
    assert invoke("doctor").exit_code == 0
    # export / import round trip keeps both
    assert invoke("export", "alice", "-o", tmp_path / "a.celeb").exit_code == 0
    assert invoke("import", tmp_path / "a.celeb", "--as", "alice2").exit_code == 0
    copy = registry.get_identity("alice2")
    assert copy.load_face_pngs() == pngs and copy.meta["sources"] == ident.meta["sources"]
    # --no-face leaves every crop, embedding and source out
    assert invoke("export", "alice", "-o", tmp_path / "n.celeb", "--no-face").exit_code == 0
    plan = bundles.check_bundle((tmp_path / "n.celeb").read_bytes(), new_name="x")
    assert plan.write.face_png is None and not plan.write.extra_faces
    assert "sources" not in plan.write.meta
    # joint refits from every crop and keeps them
    assert invoke("add", "bob", PHOTO, "--model", "tiny", "--steps", 1, "--quiet").exit_code == 0
    assert invoke("joint", "alice", "bob", "--steps", 2, "--quiet").exit_code == 0
    after = registry.get_identity("alice")
    assert after.load_face_pngs() == pngs and after.face_count == 2
    assert after.meta["fit"]["joint_with"] == ["bob"]


def test_one_bad_photo_refuses_the_whole_add_before_any_model_loads(tiny_home, tmp_path,
                                                                     monkeypatch):
    loaded = []
    monkeypatch.setattr(models, "load_pipeline_components",
                        lambda *a, **k: loaded.append(1) or pytest.fail("model loaded"))
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (120, 120, 120)).save(blank)
    with pytest.raises(NoFaceFound, match="blank.png"):
        add_identity_from_photo("alice", [PHOTO, blank], model="tiny")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(PhotoError, match="notes.jpg"):
        add_identity_from_photo("alice", [PHOTO, text], model="tiny")
    with pytest.raises(InvalidOption, match="same file as"):
        add_identity_from_photo("alice", [PHOTO, PHOTO], model="tiny")
    with pytest.raises(InvalidOption, match="1 to 16 photos"):
        add_identity_from_photo("alice", [PHOTO] * 17, model="tiny")
    with pytest.raises(InvalidOption, match="ambiguous"):
        add_identity_from_photo("alice", [PHOTO, tmp_path / "x.png"], model="tiny", face_index=1)
    assert loaded == [] and not registry.identity_exists("alice")
    result = invoke("add", "alice", PHOTO, blank, "--model", "tiny")
    assert result.exit_code == 1 and "blank.png" in result.stderr


def test_face_once_per_photo(tiny_home, second_photo):
    outcome = add_identity_from_photo("alice", [PHOTO, second_photo], model="tiny",
                                      face_index=[1, 1], settings=FitSettings(steps=1))
    assert [s["face_index"] for s in outcome.identities[0].meta["sources"]] == [1, 1]
    with pytest.raises(InvalidOption, match="3 times for 2"):
        add_identity_from_photo("bob", [PHOTO, second_photo], model="tiny", face_index=[1, 1, 1])


def test_old_single_photo_identities_and_bundles_still_work(tiny_home, tmp_path):
    info = basis.list_bases()[0]
    bundle = craft_bundle(tmp_path / "v1.celeb", "old", basis_id=info.id,
                          meta={"source": {"photo": "me.jpg", "face_index": 1}})
    ident, _ = bundles.import_bundle(bundle)
    assert ident.meta["schema_version"] == registry.SCHEMA_VERSION >= 2
    assert ident.meta["sources"] == [{"photo": "me.jpg", "face_index": 1}]
    assert "source" not in ident.meta and ident.face_count == 1
    # An identity.toml written by schema 1 on disk reads and renders.
    toml_path = ident.path / registry.IDENTITY_TOML
    meta = dict(ident.meta)
    meta["schema_version"] = 1
    meta["source"] = meta.pop("sources")[0]
    import tomli_w

    toml_path.write_text(tomli_w.dumps(meta), "utf-8")
    again = registry.get_identity("old")
    assert again.meta["sources"] == [{"photo": "me.jpg", "face_index": 1}]
    assert rendering.plan_render("old").identities == ["old"]
    assert invoke("rename", "old", "older").exit_code == 0
    written = (registry.identity_dir("older") / "identity.toml").read_bytes()
    assert f"schema_version = {registry.SCHEMA_VERSION}".encode() in written


def test_fit_identities_accepts_several_crops(tiny_home, second_photo):
    components = models.load_pipeline_components("tiny", "cpu", "fp32")
    loaded = basis.load_basis(basis.ensure_basis("tiny").id)
    crops = [faces.prepare_face(p).aligned for p in (PHOTO, second_photo)]
    result = fit_identities(components, loaded.mean, loaded.components,
                            [FitSubject("alice", crops)], faces.load_face_encoder("random-init"),
                            FitSettings(steps=3, pool_size=4))
    assert result.face_embeddings["alice"].shape == (2, 512)
    assert result.coefficients["alice"].shape == (2, loaded.p)
