"""The fit as three phases: prepare, train, finish.

- **prepare**: settings resolved, the augmented sample pool of every fit, the schedule of every
  random draw, the mapping, the optimiser and the static tensors of the step;
- **train**: the step loop, captured as a CUDA graph where it can be (eager otherwise, saying
  why once), with the losses read back and checked every few steps;
- **finish**: each identity's EMA turned into its coefficients, and a summary per fit.

A packed fit (``celebctl add-many --pack K``) is the same three phases over K independent fits
side by side in one training batch; `add` is a pack of one fit of one identity, `joint` a pack
of one fit of several identities sharing a mapping.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import BasisMismatch, FitError
from .mapping import make_mapping, make_optimizer, tokenize_templates
from .settings import (
    REPORT_EVERY_GPU,
    FitResult,
    FitSettings,
    FitSubject,
    ProgressCallback,
)

FP16_EAGER_NOTE = ("fp16 fits run eagerly, not as a CUDA graph: the GradScaler decides on the "
                   "host whether to skip each step. --dtype bf16 (compute capability 8.0 or "
                   "newer) is captured and needs no scaler.")
# torch warns once per optimiser that capturable AdamW ran outside a graph: the warm-up steps
# before capture, or the eager fallback, do exactly that on purpose.
_CAPTURABLE_WARNING = "This instance was constructed with capturable=True"


class PackedFitError(FitError):
    """A fit of a pack failed (non-finite loss); ``fit_index`` says which."""

    def __init__(self, message: str, fit_index: int):
        super().__init__(message)
        self.fit_index = fit_index


@dataclass
class PreparedFit:
    """Everything the train phase needs, built by :func:`prepare_fit`."""

    groups: list[list[FitSubject]]
    settings: FitSettings
    pools: list[Any]
    tensors: Any
    mapping: Any
    step: Any
    started: float
    pool_time_s: float

    @property
    def pack(self) -> int:
        return len(self.groups)


@dataclass
class TrainReport:
    """How the train phase ran."""

    captured: bool
    native_convolutions: bool
    notes: list[str] = field(default_factory=list)


def _check_groups(groups: Sequence[Sequence[FitSubject]]) -> list[list[FitSubject]]:
    groups = [list(g) for g in groups]
    if not groups or not all(groups):
        raise FitError("Nothing to fit: no identities given.")
    if len({len(g) for g in groups}) > 1:
        raise FitError("The fits of one pack must each have the same number of identities.")
    return groups


def _basis_tensors(components, mean, basis_components):
    import torch

    mean = torch.as_tensor(mean, dtype=torch.float32).to(components.device)
    basis_components = torch.as_tensor(basis_components, dtype=torch.float32).to(
        components.device)
    hidden = basis_components.shape[2]
    table_width = sum(e.get_input_embeddings().weight.shape[1]
                      for e in components.text_encoders)
    if hidden != table_width:
        raise BasisMismatch(
            f"The basis has {hidden}-d embeddings but the model's text encoder uses "
            f"{table_width}-d ones; build a basis for this model with `celebctl basis build`."
        )
    return mean, basis_components


def _build_pools(components, groups, face_encoder, settings: FitSettings,
                 progress: ProgressCallback | None) -> list[Any]:
    """One pool per fit, each from its own ``Random(seed)``, as its lone fit builds it."""
    from ..augment import build_sample_pool

    device, pack = components.device, len(groups)
    per_fit = settings.pool_size * len(groups[0])
    pools = []
    for k, group in enumerate(groups):
        def shifted(phase, done, total, info, k=k):  # one bar over the whole pack
            if progress:
                progress(phase, k * per_fit + done, pack * per_fit, info)

        pools.append(build_sample_pool(
            components.vae, group, face_encoder, settings.pool_size, settings.resolution,
            random.Random(settings.seed), device, components.dtype, shifted,
            encode_batch=4 if device.type == "cuda" else 2))
    return pools


def prepare_fit(components, mean, basis_components, groups: Sequence[Sequence[FitSubject]],
                face_encoder, settings: FitSettings | None = None,
                progress: ProgressCallback | None = None) -> PreparedFit:
    """Phase 1: pools, schedule, mapping, optimiser and step tensors for ``groups`` (one list
    of subjects per independent fit; all of the same length)."""
    import torch

    from .. import fitstep

    groups = _check_groups(groups)
    device, pack, n = components.device, len(groups), len(groups[0])
    settings = (settings or FitSettings()).resolved(n, components.default_resolution,
                                                    device.type)
    started = time.perf_counter()
    mean, basis_components = _basis_tensors(components, mean, basis_components)
    p = basis_components.shape[1]
    pools = _build_pools(components, groups, face_encoder, settings, progress)
    pool_time = time.perf_counter() - started
    templates_per_encoder = [tokenize_templates(tok) for tok in components.tokenizers]
    templates = templates_per_encoder[0]
    scheduler = components.scheduler
    # Every fit of the pack draws from the same seed, as its lone fit would: one schedule.
    schedule = fitstep.build_schedule(
        steps=settings.steps, batch_size=settings.batch_size, pool_identity=pools[0].identity,
        n_identities=n, n_templates=len(templates),
        latent_shape=tuple(pools[0].latent_mean.shape[1:]),
        alphas_cumprod=scheduler.alphas_cumprod,
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        ema_momentum=settings.ema_momentum, seed=settings.seed,
    ).to(device)
    mapping = make_mapping(p, n, settings.direct, torch.Generator().manual_seed(settings.seed),
                           pack=pack).to(device)
    scaler = None
    if components.dtype == torch.float16 and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    capture = device.type == "cuda" and settings.capture and scaler is None
    optimizer = make_optimizer(list(mapping.parameters()), settings, device, capture)
    tensors = fitstep.StepTensors(
        schedule=schedule,
        latent_mean=torch.cat([pool.latent_mean for pool in pools]),
        latent_std=torch.cat([pool.latent_std for pool in pools]),
        features=torch.cat([pool.features for pool in pools]), scaling=pools[0].scaling,
        template_ids=[torch.tensor([t.input_ids for t in per], device=device)
                      for per in templates_per_encoder],
        template_slots=torch.tensor([[pos for pos, _, _ in t.slots] for t in templates],
                                    device=device),
        basis_mean=mean, basis_components=basis_components,
        # NaN until a step writes it: a step that never ran cannot pass for a finite loss.
        loss=torch.full((settings.steps, pack), math.nan, device=device),
        ema=torch.zeros((pack * n, 2, p), device=device), pack=pack,
    )
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    step = fitstep.TrainStep(components, mapping, optimizer, tensors, prediction_type, scaler,
                             clip_skip=settings.clip_skip or 1)
    return PreparedFit(groups=groups, settings=settings, pools=pools, tensors=tensors,
                       mapping=mapping, step=step, started=started, pool_time_s=pool_time)


class LossMonitor:
    """Reads the loss buffer back every few steps (one host sync each), checks it, and reports
    progress with the loss smoothed over the pack."""

    def __init__(self, prepared: PreparedFit, progress: ProgressCallback | None):
        self.prepared = prepared
        self.progress = progress
        self.checked = 0
        self.smoothed: float | None = None

    def __call__(self, done: int) -> None:
        if done <= self.checked:
            return
        import torch

        block = self.prepared.tensors.loss[self.checked:done].float().cpu()
        bad = (~torch.isfinite(block)).nonzero()
        if len(bad):
            row, fit = int(bad[0][0]), int(bad[0][1])
            self._fail(self.checked + row, fit, float(block[row, fit]))
        for value in block.mean(dim=1).tolist():
            self.smoothed = value if self.smoothed is None else 0.9 * self.smoothed + 0.1 * value
        self.checked = done
        if self.progress:
            self.progress("fit", done, self.prepared.settings.steps, {"loss": self.smoothed})

    def _fail(self, step: int, fit: int, value: float) -> None:
        whose = ""
        if self.prepared.pack > 1:
            whose = " of " + ", ".join(f"'{s.name}'" for s in self.prepared.groups[fit])
        raise PackedFitError(f"The loss{whose} became {value} at step {step + 1}; try a lower "
                             "--lr or --dtype fp32.", fit)


@contextlib.contextmanager
def _on_device(device) -> Iterator[None]:
    """The fit's CUDA device as the current one (streams, capture), and TF32 for its fp32
    matmuls (the text encoder and the mapping); nothing on other devices."""
    if device.type != "cuda":
        yield
        return
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.cuda.device(device):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _try_capture(step, notes: list[str]) -> int:
    """Capture the step; on failure say why once and return the warm-up steps that ran."""
    import torch

    try:
        return step.capture(0)
    except torch.cuda.OutOfMemoryError:
        notes.append("The GPU ran out of memory while capturing the fit step as a CUDA graph; "
                     "it ran eagerly (same result). A smaller --pack or --batch-size needs "
                     "less memory.")
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        notes.append(f"The fit step could not be captured as a CUDA graph "
                     f"({type(exc).__name__}: {exc}); it ran eagerly (slower, same result).")
    step.graph = None
    torch.cuda.synchronize(step.device)
    return step.warmed  # the warm-up steps that ran are real steps


def _check_first_replay(step, index: int, notes: list[str]) -> None:
    """After the first replay, make sure the graph did run the step: a graph captured on
    another device's stream replays nothing, and the loss buffer would stay NaN."""
    import torch

    if bool(torch.isnan(step.t.loss[index]).all()):
        step.graph = None
        notes.append("The captured fit step did not run on the GPU; the fit went on eagerly.")
        step.run(index)


def train(prepared: PreparedFit, progress: ProgressCallback | None = None) -> TrainReport:
    """Phase 2: every step of the schedule, captured where possible, losses checked."""
    from ..models.convolutions import fit_convolutions

    step, settings = prepared.step, prepared.settings
    device = step.device
    notes: list[str] = []
    if device.type == "cuda" and step.scaler is not None and settings.capture:
        notes.append(FP16_EAGER_NOTE)
    monitor = LossMonitor(prepared, progress)
    report_every = REPORT_EVERY_GPU if device.type == "cuda" else 1
    latent_side = int(prepared.tensors.latent_mean.shape[-1])
    convolutions = fit_convolutions(step.components.unet, device, step.unet_dtype, latent_side)
    with warnings.catch_warnings(), _on_device(device), step.hooked(), \
            convolutions as native_convolutions:
        warnings.filterwarnings("ignore", message=_CAPTURABLE_WARNING)
        first = 0
        if device.type == "cuda" and settings.capture and step.scaler is None:
            first = _try_capture(step, notes)
        for index in range(first, settings.steps):
            step.run(index)
            if index == first and step.graph is not None:
                _check_first_replay(step, index, notes)
            if (index + 1) % report_every == 0:
                monitor(index + 1)
        monitor(settings.steps)
    return TrainReport(captured=step.graph is not None,
                       native_convolutions=native_convolutions, notes=notes)


def _final_coefficients(prepared: PreparedFit, fit: int, identity: int):
    """The EMA of an identity, or (a fit too short to reach it) the mapping of its face."""
    import torch

    tensors, n = prepared.tensors, len(prepared.groups[0])
    owners = tensors.schedule.owners
    with torch.no_grad():
        if prepared.settings.direct:
            return prepared.mapping.coefficients_for(fit, identity, None)
        if bool((owners == identity).any()):
            return tensors.ema[fit * n + identity]
        clean = prepared.pools[fit].clean_features[identity][0].to(tensors.ema.device)
        return prepared.mapping.coefficients_for(fit, identity, clean)


def finish(prepared: PreparedFit, report: TrainReport) -> list[FitResult]:
    """Phase 3: each fit's coefficients and face embeddings, losses and summary."""
    import numpy as np

    wall = time.perf_counter() - prepared.started
    all_losses = prepared.tensors.loss.float().cpu().numpy()
    results = []
    for fit, group in enumerate(prepared.groups):
        coefficients = {
            s.name: _final_coefficients(prepared, fit, i).float().cpu().numpy().astype(np.float32)
            for i, s in enumerate(group)}
        embeddings = {s.name: prepared.pools[fit].clean_features[i].numpy().astype(np.float32)
                      for i, s in enumerate(group)}
        losses = [float(v) for v in all_losses[:, fit]]
        head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)):]
        summary = {
            "loss_first": losses[0], "loss_last": losses[-1], "loss_min": min(losses),
            "loss_mean_first10": float(np.mean(head)), "loss_mean_last10": float(np.mean(tail)),
            "wall_time_s": round(wall, 3), "pool_time_s": round(prepared.pool_time_s, 3),
            "steps": prepared.settings.steps, "captured": report.captured,
            "native_convolutions": report.native_convolutions,
        }
        if prepared.pack > 1:
            summary["pack"] = prepared.pack
        if report.notes:
            summary["notes"] = list(report.notes)
        results.append(FitResult(
            coefficients=coefficients, face_embeddings=embeddings, losses=losses,
            settings=prepared.settings, wall_time_s=wall, pool_time_s=prepared.pool_time_s,
            summary=summary, captured=report.captured, notes=list(report.notes)))
    return results


def fit_packed(components, mean, basis_components, groups: Sequence[Sequence[FitSubject]],
               face_encoder, settings: FitSettings | None = None,
               progress: ProgressCallback | None = None) -> list[FitResult]:
    """Fit several independent fits in one training batch; one :class:`FitResult` per group.

    Each fit has its own mapping, AdamW state, EMA and pool, and the schedule its lone fit
    would draw from the same seed; the loss is the sum of the fits' own means, so each fit gets
    exactly its lone fit's gradient. Raises :class:`PackedFitError` naming the fit whose loss
    stopped being finite.
    """
    prepared = prepare_fit(components, mean, basis_components, groups, face_encoder, settings,
                           progress)
    return finish(prepared, train(prepared, progress))


def fit_identities(components, mean, basis_components, subjects: Sequence[FitSubject],
                   face_encoder, settings: FitSettings | None = None,
                   progress: ProgressCallback | None = None) -> FitResult:
    """Fit (2, p) coefficients for each subject, jointly (one shared mapping), with the model
    frozen.

    ``mean`` (2, hidden) and ``basis_components`` (2, p, hidden) are the basis tensors.
    ``progress(phase, done, total, info)`` is called for the "pool" and "fit" phases; info
    carries the smoothed loss during "fit". Raises FitError when the loss stops being finite,
    naming the first step where it did.
    """
    return fit_packed(components, mean, basis_components, [list(subjects)], face_encoder,
                      settings, progress)[0]
