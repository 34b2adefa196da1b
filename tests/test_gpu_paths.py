"""The model parts as a fit and a render load them: frozen, in eval mode, for every family, on
the CPU and (marked gpu) on CUDA. A part left in training mode would change what dropout or
normalisation layers compute; a weight left with requires_grad would make every fit step
build and keep gradients for the whole model."""

from __future__ import annotations

import pytest
import torch

from celebctl import fitting, models, rendering
from tests.helpers import PHOTO

FAMILIES = ["tiny", "tiny-sd2", "tiny-xl"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _frozen_problems(components, when: str) -> list[str]:
    """Every module of the UNet, VAE and text encoder(s) that trains or has a trainable weight."""
    parts = {"unet": components.unet, "vae": components.vae}
    for k, encoder in enumerate(components.text_encoders, start=1):
        parts[f"text_encoder_{k}"] = encoder
    problems = []
    for part, module in parts.items():
        training = [name or "(root)" for name, m in module.named_modules() if m.training]
        trainable = [name for name, p in module.named_parameters() if p.requires_grad]
        if training:
            problems.append(f"{when}: {part} has {len(training)} modules in training mode, "
                            f"e.g. {training[:3]}")
        if trainable:
            problems.append(f"{when}: {part} has {len(trainable)} weights with requires_grad, "
                            f"e.g. {trainable[:3]}")
    return problems


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fit_and_render_load_frozen_parts(tiny_home, tmp_path, monkeypatch, family, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loaded = []
    problems: list[str] = []
    real = models.load_pipeline_components

    def recording(*args, **kwargs):
        components = real(*args, **kwargs)
        problems.extend(_frozen_problems(components, f"load #{len(loaded) + 1}"))
        loaded.append(components)
        return components

    monkeypatch.setattr(models, "load_pipeline_components", recording)
    fitting.add_identity_from_photo("ann", PHOTO, model=family, device=device,
                                    settings=fitting.FitSettings(steps=1, pool_size=1))
    rendering.render_prompt("a photo of ann", num_images=1, steps=1, device=device,
                            out_dir=tmp_path / "renders")
    assert len(loaded) == 2  # one load for the fit, one for the render
    fit_parts, render_parts = loaded
    assert fit_parts.family == render_parts.family
    assert len(fit_parts.text_encoders) == (2 if family == "tiny-xl" else 1)
    # And still frozen after the fit and the render used them (hooks, autocast, capture).
    problems += _frozen_problems(fit_parts, "after the fit")
    problems += _frozen_problems(render_parts, "after the render")
    assert problems == []
