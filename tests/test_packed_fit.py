"""Packed fits (`add-many --pack K`) and the fit's device-index path, on the CPU.

A packed fit trains K independent fits in one batch; each must end where its lone fit ends.
The captured CUDA step reads its step index from a device tensor; the same path runs eagerly
here and must match the integer path bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageEnhance, ImageOps

from celebctl import basis, faces, fitstep, models
from celebctl.errors import FitError
from celebctl.fitting import FitSettings, FitSubject, fit_identities, fit_packed, phases
from tests.helpers import PHOTO

# Packing changes only the UNet's batch (3 x 2 samples instead of 2); convolution and matmul
# kernels may sum in another order at another batch size, so fp32 agrees to rounding, which
# AdamW's normalised steps do not amplify over a short fit.
PACK_ATOL = 2e-5


@pytest.fixture(scope="module")
def crops():
    face = faces.prepare_face(PHOTO).aligned
    return [face, ImageOps.mirror(face), ImageEnhance.Color(face).enhance(0.4)]


@pytest.fixture
def parts(tiny_home):
    def load(model="tiny"):
        components = models.load_pipeline_components(model, "cpu", "fp32")
        loaded = basis.load_basis(basis.ensure_basis(model).id)
        return components, loaded, faces.load_face_encoder("random-init")
    return load


def _lone(components, loaded, encoder, subjects, settings):
    return fit_identities(components, loaded.mean, loaded.components, subjects, encoder, settings)


@pytest.mark.parametrize("direct", [False, True])
def test_a_packed_fit_ends_where_each_lone_fit_ends(parts, crops, direct):
    components, loaded, encoder = parts()
    settings = FitSettings(steps=6, pool_size=3, seed=2, direct=direct)
    people = [FitSubject(f"p{k}", [crop]) for k, crop in enumerate(crops)]
    packed = fit_packed(components, loaded.mean, loaded.components, [[p] for p in people],
                        encoder, settings)
    for person, result in zip(people, packed, strict=True):
        lone = _lone(components, loaded, encoder, [person], settings)
        np.testing.assert_allclose(result.coefficients[person.name],
                                   lone.coefficients[person.name], rtol=0, atol=PACK_ATOL)
        np.testing.assert_allclose(result.losses, lone.losses, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(result.face_embeddings[person.name],
                                      lone.face_embeddings[person.name])
        assert result.summary["pack"] == 3
    # Three different faces: three different fits, not one fit copied.
    assert not np.allclose(packed[0].coefficients["p0"], packed[1].coefficients["p1"])


def test_a_pack_of_joint_fits_ends_where_each_joint_fit_ends(parts, crops):
    components, loaded, encoder = parts()
    settings = FitSettings(steps=4, pool_size=2, seed=1)
    a = [FitSubject("a", [crops[0]]), FitSubject("b", [crops[1]])]
    b = [FitSubject("c", [crops[2]]), FitSubject("d", [crops[0]])]
    packed = fit_packed(components, loaded.mean, loaded.components, [a, b], encoder, settings)
    for group, result in zip([a, b], packed, strict=True):
        lone = _lone(components, loaded, encoder, group, settings)
        for subject in group:
            np.testing.assert_allclose(result.coefficients[subject.name],
                                       lone.coefficients[subject.name], rtol=0, atol=PACK_ATOL)


def test_fits_of_different_sizes_cannot_share_a_pack(parts, crops):
    components, loaded, encoder = parts()
    with pytest.raises(FitError, match="same number of identities"):
        fit_packed(components, loaded.mean, loaded.components,
                   [[FitSubject("a", [crops[0]])],
                    [FitSubject("b", [crops[1]]), FitSubject("c", [crops[2]])]], encoder,
                   FitSettings(steps=2, pool_size=2))


@pytest.mark.parametrize("model,joint", [("tiny", False), ("tiny", True), ("tiny-xl", False)])
def test_the_device_index_path_equals_the_integer_path_bit_for_bit(parts, crops, monkeypatch,
                                                                   model, joint):
    """What a CUDA graph replays (the step index read from a device tensor) gives the very
    same losses and coefficients as the eager integer path: both read the same rows (a view
    or an index_select copy of them), so no arithmetic differs."""
    components, loaded, encoder = parts(model)
    subjects = [FitSubject("a", [crops[0]])]
    if joint:
        subjects.append(FitSubject("b", [crops[1]]))
    settings = FitSettings(steps=5, pool_size=2, seed=4)
    integer = _lone(components, loaded, encoder, subjects, settings)
    monkeypatch.setattr(fitstep.TrainStep, "device_index", True)
    indexed = _lone(components, loaded, encoder, subjects, settings)
    assert indexed.losses == integer.losses
    for subject in subjects:
        np.testing.assert_array_equal(indexed.coefficients[subject.name],
                                      integer.coefficients[subject.name])


def test_the_device_index_step_never_waits_on_the_host(parts, crops, monkeypatch):
    """No .item(), .cpu(), .tolist(), .numpy() or truth test of a tensor inside the step that a
    CUDA graph replays (any of them would be a host sync, which capture forbids). AdamW is left
    out here: on a CPU it keeps its step count on the host; the capturable AdamW of a CUDA fit
    keeps it on the device (the gpu test below runs the whole step in sync-error mode)."""
    components, loaded, encoder = parts()
    prepared = phases.prepare_fit(components, loaded.mean, loaded.components,
                                  [[FitSubject("a", [crops[0]])], [FitSubject("b", [crops[1]])]],
                                  encoder, FitSettings(steps=3, pool_size=2))
    step = prepared.step
    calls: list[str] = []
    in_optimizer = [False]
    real_step = step.optimizer.step

    def optimizer_step(*args, **kwargs):
        in_optimizer[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            in_optimizer[0] = False

    step.optimizer.step = optimizer_step

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if not in_optimizer[0]:
                calls.append(name)
            return real(self, *args, **kwargs)
        return wrapper

    with step.hooked():
        step.index.fill_(1)
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        step.optimizer.zero_grad(set_to_none=True)
        step._forward_backward()
        monkeypatch.undo()
    assert calls == []
    # It did run: step 1's loss of both fits is written, the rest still NaN.
    loss = prepared.tensors.loss
    assert torch.isfinite(loss[1]).all() and torch.isnan(loss[0]).all()


def test_a_step_that_never_ran_is_caught(parts, crops, monkeypatch):
    """The loss buffer starts as NaN, so a step that did nothing (a graph replayed on the wrong
    device's stream) cannot pass for a finite loss."""
    components, loaded, encoder = parts()
    real = fitstep.TrainStep.run

    def skip_third(self, step):
        if step != 2:
            real(self, step)

    monkeypatch.setattr(fitstep.TrainStep, "run", skip_third)
    with pytest.raises(FitError, match="became nan at step 3;"):
        _lone(components, loaded, encoder, [FitSubject("a", [crops[0]])],
              FitSettings(steps=5, pool_size=2))


def test_a_pack_names_the_fit_whose_loss_failed(parts, crops, monkeypatch):
    components, loaded, encoder = parts()
    real = components.unet.forward

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.sample = out.sample.clone()
        out.sample[2:4] = float("nan")  # fit 1's two samples
        return out

    monkeypatch.setattr(components.unet, "forward", poisoned)
    with pytest.raises(phases.PackedFitError, match="loss of 'b' became nan at step 1") as info:
        fit_packed(components, loaded.mean, loaded.components,
                   [[FitSubject("a", [crops[0]])], [FitSubject("b", [crops[1]])]], encoder,
                   FitSettings(steps=3, pool_size=2))
    assert info.value.fit_index == 1


class _FailingStep:
    def __init__(self, error):
        self.error, self.graph, self.warmed, self.device = error, None, 2, "cpu"

    def capture(self, first):
        raise self.error


@pytest.mark.parametrize("error,says", [
    (RuntimeError("operation not permitted when stream is capturing"),
     "could not be captured as a CUDA graph (RuntimeError: operation not permitted"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "ran out of memory while capturing"),
])
def test_a_failed_capture_says_why_and_keeps_the_warm_up_steps(monkeypatch, error, says):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    notes: list[str] = []
    assert phases._try_capture(_FailingStep(error), notes) == 2
    assert len(notes) == 1 and says in notes[0]


@pytest.mark.gpu
def test_the_captured_step_makes_no_host_sync_on_cuda(tiny_home, crops):
    """The device-index step under CUDA's sync debug mode set to error: any host sync raises."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    components = models.load_pipeline_components("tiny", "cuda", "bf16")
    loaded = basis.load_basis(basis.ensure_basis("tiny").id)
    encoder = faces.load_face_encoder("random-init", device="cuda")
    prepared = phases.prepare_fit(components, loaded.mean, loaded.components,
                                  [[FitSubject("a", [crops[0]])], [FitSubject("b", [crops[1]])]],
                                  encoder, FitSettings(steps=4, pool_size=2))
    step = prepared.step
    with step.hooked():
        step.index.fill_(0)
        step.optimizer.zero_grad(set_to_none=True)
        step._forward_backward()  # the first step creates AdamW's state (allowed to sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step.index.fill_(1)
            step.optimizer.zero_grad(set_to_none=True)
            step._forward_backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(prepared.tensors.loss[:2]).all()


@pytest.mark.gpu
def test_a_packed_fit_is_captured_on_cuda_and_equals_lone_fits(tiny_home, crops):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    components = models.load_pipeline_components("tiny", "cuda", "bf16")
    loaded = basis.load_basis(basis.ensure_basis("tiny").id)
    encoder = faces.load_face_encoder("random-init", device="cuda")
    settings = FitSettings(steps=12, pool_size=3, seed=3)
    people = [FitSubject(f"p{k}", [crop]) for k, crop in enumerate(crops)]
    packed = fit_packed(components, loaded.mean, loaded.components, [[p] for p in people],
                        encoder, settings)
    assert all(r.captured for r in packed)
    for person, result in zip(people, packed, strict=True):
        lone = _lone(components, loaded, encoder, [person], settings)
        # bf16 UNet at another batch size: agreement to bf16 rounding, not fp32's.
        np.testing.assert_allclose(result.coefficients[person.name],
                                   lone.coefficients[person.name], rtol=0, atol=5e-2)
