"""The fast paths (issue 11), tested where they run offline: the fit step as a pure function of
a drawn-up-front schedule, its check for a non-finite loss, one model load per command, the
render loop (batches chosen by memory, PNGs written by a worker), and, on a GPU only, CUDA
graphs equal to eager."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from celebctl import augment, basis, faces, fitstep, models, prompting, rendering
from celebctl.errors import FitError
from celebctl.fitting import (
    FitSettings,
    FitSubject,
    fit_identities,
    make_mapping,
    tokenize_templates,
)
from tests.helpers import PHOTO

runner = CliRunner()


def invoke(*args):
    from celebctl.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_parts(tiny_home):
    components = models.load_pipeline_components("tiny", "cpu", "fp32")
    loaded = basis.load_basis(basis.ensure_basis("tiny").id)
    face = faces.prepare_face(PHOTO).aligned
    return components, loaded, face, faces.load_face_encoder("random-init")


def _step_setup(components, loaded, face, encoder, steps=3, seed=5):
    pool = augment.build_sample_pool(components.vae, [FitSubject("a", face)], encoder, 4, 64,
                                     random.Random(seed), components.device, torch.float32)
    templates = tokenize_templates(components.tokenizer)
    schedule = fitstep.build_schedule(
        steps=steps, batch_size=2, pool_identity=pool.identity, n_identities=1,
        n_templates=len(templates), latent_shape=tuple(pool.latent_mean.shape[1:]),
        alphas_cumprod=components.scheduler.alphas_cumprod, num_train_timesteps=1000,
        ema_momentum=0.99, seed=seed)
    mapping = make_mapping(loaded.p, 1, False, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(mapping.parameters(), lr=1e-2)
    tensors = fitstep.StepTensors(
        schedule=schedule, latent_mean=pool.latent_mean, latent_std=pool.latent_std,
        features=pool.features, scaling=pool.scaling,
        template_ids=[torch.tensor([t.input_ids for t in templates])],
        template_slots=torch.tensor([[p for p, _, _ in t.slots] for t in templates]),
        basis_mean=loaded.mean, basis_components=loaded.components,
        loss=torch.zeros((steps, 1)), ema=torch.zeros((1, 2, loaded.p)))
    step = fitstep.TrainStep(components, mapping, optimizer, tensors, "epsilon")
    return step, tensors, templates, pool, mapping


def test_the_eager_step_equals_an_independent_computation(tiny_parts):
    components, loaded, face, encoder = tiny_parts
    step, tensors, templates, pool, mapping = _step_setup(components, loaded, face, encoder)
    schedule = tensors.schedule
    # The same step computed another way: diffusers' add_noise, the render path's slot
    # tensors and encode_tokens, the mapping evaluated before the optimiser moves it.
    with torch.no_grad():
        picks = schedule.picks[0]
        latents = (pool.latent_mean[picks] + pool.latent_std[picks] * schedule.latent_noise[0]
                   ) * pool.scaling
        coeffs = mapping(pool.features[picks], schedule.owners[0])
        vectors = prompting.identity_vectors(coeffs, loaded.mean, loaded.components)
        tokenized = [templates[int(t)] for t in schedule.templates[0]]
        renamed = [prompting.TokenizedPrompt(t.input_ids, [(p, f"s{b}", k) for p, _, k in t.slots],
                                             t.length) for b, t in enumerate(tokenized)]
        ids, mask, values = prompting.build_slot_tensors(
            renamed, {f"s{b}": vectors[b] for b in range(2)}, loaded.hidden)
        states = prompting.encode_tokens(components.text_encoder, ids, mask, values)
        noisy = components.scheduler.add_noise(latents, schedule.noise[0], schedule.timesteps[0])
        prediction = components.unet(noisy, schedule.timesteps[0], states).sample
        expected = F.mse_loss(prediction, schedule.noise[0])
    with step.hooked():
        step.run(0)
    assert float(tensors.loss[0]) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    # The EMA started from the step's first sample and took its second one (m = 0.99).
    first, second = coeffs[0], coeffs[1]
    np.testing.assert_allclose(tensors.ema[0].numpy(), (0.99 * first + 0.01 * second).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_a_seed_gives_the_same_fit_and_another_seed_another(tiny_parts):
    components, loaded, face, encoder = tiny_parts

    def fit(seed):
        return fit_identities(components, loaded.mean, loaded.components, [FitSubject("a", face)],
                              encoder, FitSettings(steps=4, pool_size=4, seed=seed))

    first, again, other = fit(3), fit(3), fit(4)
    assert first.losses == again.losses
    np.testing.assert_array_equal(first.coefficients["a"], again.coefficients["a"])
    assert first.losses != other.losses


def test_a_non_finite_loss_names_its_step(tiny_parts, monkeypatch):
    components, loaded, face, encoder = tiny_parts
    real = components.unet.forward
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == 3:
            out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(components.unet, "forward", poisoned)
    with pytest.raises(FitError, match="at step 3;"):
        fit_identities(components, loaded.mean, loaded.components, [FitSubject("a", face)],
                       encoder, FitSettings(steps=6, pool_size=4))


def test_small_unets_fit_with_torchs_own_cpu_convolutions(tiny_parts):
    from celebctl.models import convolutions

    components, loaded, face, encoder = tiny_parts
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert convolutions.prefers_native_convolutions(components.unet, cpu, torch.float32, 8)
    # Real sizes keep oneDNN: SD 1.5 at 512 px (64x64 latents), and a tiny UNet at 2048 px.
    sd15 = SimpleNamespace(config=SimpleNamespace(block_out_channels=[320, 640, 1280, 1280]))
    assert convolutions.largest_conv_work(sd15, 64) == 320 * 320 * 64 * 64
    assert not convolutions.prefers_native_convolutions(sd15, cpu, torch.float32, 64)
    assert not convolutions.prefers_native_convolutions(components.unet, cpu, torch.float32, 256)
    # Only fp32 on a CPU: bf16 needs oneDNN, a GPU never uses it.
    assert not convolutions.prefers_native_convolutions(components.unet, cpu, torch.bfloat16, 8)
    assert not convolutions.prefers_native_convolutions(components.unet, cuda, torch.float32, 8)

    before = torch.backends.mkldnn.enabled
    seen = []
    real = components.unet.forward

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.enabled)
        return real(*args, **kwargs)

    components.unet.forward = spy
    try:
        result = fit_identities(components, loaded.mean, loaded.components,
                                [FitSubject("a", face)], encoder,
                                FitSettings(steps=2, pool_size=2))
    finally:
        del components.unet.forward
    assert seen == [False, False]  # every step of the tiny fit ran without oneDNN
    assert result.summary["native_convolutions"] is True
    assert torch.backends.mkldnn.enabled == before  # and the switch is restored

    with pytest.raises(RuntimeError, match="boom"):
        with convolutions.fit_convolutions(components.unet, cpu, torch.float32, 8) as native:
            assert native and not torch.backends.mkldnn.enabled
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled == before


def test_the_report_reads_the_loss_every_few_steps_on_a_gpu():
    from celebctl import fitting

    assert fitting.REPORT_EVERY_GPU > 1  # one host sync per block of steps, not per step


def test_add_loads_each_model_part_once(tiny_home, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from facenet_pytorch import InceptionResnetV1
    from transformers import CLIPTextModel

    counts: dict[str, int] = {}

    def counting(cls, name, method):
        real = getattr(cls, method)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        if method == "from_pretrained":
            monkeypatch.setattr(cls, method, classmethod(lambda c, *a, **k: wrapper(*a, **k)))
        else:
            monkeypatch.setattr(cls, method, wrapper)

    counting(CLIPTextModel, "text encoder", "from_pretrained")
    counting(UNet2DConditionModel, "UNet", "from_pretrained")
    counting(AutoencoderKL, "VAE", "from_pretrained")
    counting(InceptionResnetV1, "face encoder", "__init__")
    result = invoke("add", "alice", PHOTO, "--model", "tiny", "--steps", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert counts == {"text encoder": 1, "UNet": 1, "VAE": 1, "face encoder": 1}, counts
    counts.clear()
    assert invoke("render", "alice", "--steps", 1, "--quiet", "--out",
                  tiny_home / "r").exit_code == 0
    assert counts == {"text encoder": 1, "UNet": 1, "VAE": 1}, counts


def test_auto_batch_size(monkeypatch):
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert rendering.auto_batch_size(cpu, 1, 512, 512) == 1
    assert rendering.auto_batch_size(cpu, 9, 512, 512) == rendering.CPU_BATCH
    gpu = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))
    assert rendering.auto_batch_size(gpu, 8, 512, 512) == 8
    assert rendering.auto_batch_size(gpu, 64, 512, 512) == rendering.MAX_AUTO_BATCH
    assert rendering.auto_batch_size(gpu, 64, 1024, 1024) == 7  # 0.7 x 60 GiB / 6 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**30, 80 * 2**30))
    assert rendering.auto_batch_size(gpu, 8, 512, 512) == 1


def test_render_writes_pngs_on_a_worker_in_order(home, tmp_path, monkeypatch):
    from celebctl.storage import userfiles

    threads = []
    real = userfiles.write_new_user_file

    def recording(folder, stem, suffix, data, **kwargs):
        threads.append((threading.current_thread().name, stem))
        return real(folder, stem, suffix, data, **kwargs)

    monkeypatch.setattr(rendering.render, "write_new_user_file", recording)
    result = rendering.render_prompt("alice", num_images=3, steps=1, batch_size=1,
                                     out_dir=tmp_path, device="cpu")
    assert [stem for _, stem in threads] == ["alice-0", "alice-1", "alice-2"]
    assert all(name.startswith("celebctl-png") for name, _ in threads)
    assert [p.name for p in result.paths] == ["alice-0.png", "alice-1.png", "alice-2.png"]


def test_batches_do_not_change_the_seeds_images(home, tmp_path):
    one = rendering.render_prompt("alice", num_images=2, steps=2, batch_size=1,
                                  out_dir=tmp_path / "one", device="cpu")
    two = rendering.render_prompt("alice", num_images=2, steps=2, batch_size=2,
                                  out_dir=tmp_path / "two", device="cpu")
    from PIL import Image

    for a, b in zip(one.paths, two.paths, strict=True):
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
        assert diff.max() <= 1  # the same seed draws the same picture in any batch


# --------------------------------------------------------------------------------------------
# GPU only


@pytest.fixture
def graph_replays(monkeypatch):
    """Counts every CUDA graph replay (fit step and render UNet call alike)."""
    count = [0]
    real = torch.cuda.CUDAGraph.replay

    def counting(self):
        count[0] += 1
        return real(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting)
    return count


def _other_face(face):
    """A second identity for joint fits: the crop mirrored with its colour channels turned."""
    from PIL import Image, ImageOps

    r, g, b = ImageOps.mirror(face).split()
    return Image.merge("RGB", (b, r, g))


# fp32 runs the same kernels eagerly and in the graph: equal up to reduction order. bf16 rounds
# every UNet activation, so a different reduction order can move a loss by a few bf16 ulps
# and the mapping a little with it: looser bounds, still far below the spread between seeds.
FIT_CASES = {
    "fp32": dict(dtype="fp32", subjects=1, direct=False, rtol=1e-4, atol=1e-5, ctol=1e-3),
    "bf16": dict(dtype="bf16", subjects=1, direct=False, rtol=2e-2, atol=2e-3, ctol=2e-2),
    "joint": dict(dtype="fp32", subjects=2, direct=False, rtol=1e-4, atol=1e-5, ctol=1e-3),
    "direct": dict(dtype="fp32", subjects=1, direct=True, rtol=1e-4, atol=1e-5, ctol=1e-3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_captured_fit_equals_eager_on_cuda(tiny_home, graph_replays, case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = FIT_CASES[case]
    components = models.load_pipeline_components("tiny", "cuda", spec["dtype"],
                                                 text_encoder_dtype="fp32")
    loaded = basis.load_basis(basis.ensure_basis("tiny").id)
    face = faces.prepare_face(PHOTO).aligned
    subjects = [FitSubject("a", face), FitSubject("b", _other_face(face))][:spec["subjects"]]
    encoder = faces.load_face_encoder("random-init", device="cuda")
    steps = 12

    def fit(capture):
        return fit_identities(components, loaded.mean, loaded.components, subjects, encoder,
                              FitSettings(steps=steps, pool_size=4, seed=1, capture=capture,
                                          direct=spec["direct"]))

    captured = fit(True)
    replays = graph_replays[0]
    eager = fit(False)
    # The captured fit really ran as a graph: flagged, no fallback note, and every step after
    # the eager warm-up steps was a replay; the eager fit replayed nothing.
    assert captured.captured and captured.summary["captured"] is True
    assert not any("could not be captured" in note for note in captured.notes), captured.notes
    assert replays == steps - fitstep.WARMUP_STEPS
    assert not eager.captured and eager.summary["captured"] is False
    assert graph_replays[0] == replays
    assert len(captured.losses) == len(eager.losses) == steps
    np.testing.assert_allclose(captured.losses, eager.losses, rtol=spec["rtol"],
                               atol=spec["atol"])
    assert set(captured.coefficients) == {s.name for s in subjects}
    for name in captured.coefficients:
        np.testing.assert_allclose(captured.coefficients[name], eager.coefficients[name],
                                   rtol=spec["ctol"], atol=spec["ctol"])
    if spec["subjects"] == 2:  # a joint fit gives each identity its own coefficients
        assert not np.allclose(captured.coefficients["a"], captured.coefficients["b"])


@pytest.mark.gpu
def test_captured_render_equals_eager_on_cuda(home, tmp_path, graph_replays, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from PIL import Image

    from celebctl import denoise

    # RenderResult does not say whether the UNet ran as a graph; count the captures instead.
    captures = [0]
    real_capture = denoise.UNetCall._capture

    def counting(self, *args, **kwargs):
        entry = real_capture(self, *args, **kwargs)
        captures[0] += 1
        return entry

    monkeypatch.setattr(denoise.UNetCall, "_capture", counting)
    steps = 4
    a = rendering.render_prompt("alice", num_images=2, steps=steps, batch_size=2,
                                out_dir=tmp_path / "a", device="cuda", dtype="fp32",
                                capture=True)
    # One batch of two images: one graph, replayed at every denoising step, no fallback.
    assert captures[0] == 1 and graph_replays[0] == steps
    assert not any("could not be captured" in note for note in a.notes), a.notes
    assert a.captured
    b = rendering.render_prompt("alice", num_images=2, steps=steps, batch_size=2,
                                out_dir=tmp_path / "b", device="cuda", dtype="fp32",
                                capture=False)
    assert captures[0] == 1 and graph_replays[0] == steps  # the eager render captured nothing
    assert not b.captured
    for x, y in zip(a.paths, b.paths, strict=True):
        diff = np.abs(np.asarray(Image.open(x), dtype=int) - np.asarray(Image.open(y), dtype=int))
        assert diff.max() <= 2
