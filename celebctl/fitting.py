"""The Celeb Basis fit: face crops in, (2, p) coefficients per identity out.

The diffusion model, the VAE and the text encoder stay frozen; only a small mapping (or, with
``direct=True``, the coefficients themselves) is trained. Before the loop, augmented copies of
each identity's face crops are VAE-encoded once into a pool of latent distributions
(:mod:`celebctl.augment`), and every random draw of the loop is made up front
(:mod:`celebctl.fitstep`), so the loop itself runs only the text encoder and the UNet, forward
and backward, without waiting on the host.

Method figures (METHOD.md, read from the reference code): mapping 512 -> 2p, LeakyReLU 0.2,
per-token L2 norm; EMA 0.99 of the mapping's output, once per training sample; 400 steps per
identity, batch 2, AdamW, lr 1e-2; flip, colour jitter, paste at 10-100 % of the frame on black;
a fresh latent from the VAE's distribution at every step; noise-prediction MSE. The text
encoder, the identity vectors and the loss are fp32; only the UNet runs under autocast.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .captions import CAPTION_TEMPLATES, SUBJECT_PHRASE
from .errors import FitError, InvalidOption

FACE_FEATURE_DIM = 512
SUBJECT = "__subject__"
MAX_PHOTOS = 16
# Augmented samples per identity in the pool, when not given. On a GPU the VAE encodes a
# sample in milliseconds, so the pool is large (each sample is used about three times in a
# 400-step fit at batch 2, each time with a fresh latent draw and fresh diffusion noise); on a
# CPU an SD-size VAE takes about a second per sample, so it is small (docs/method.md).
DEFAULT_POOL_GPU = 256
DEFAULT_POOL_CPU = 64
# Loss read back, checked for NaN/Inf and shown, every this many steps (one host sync each).
REPORT_EVERY_GPU = 10

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class FitSettings:
    """Every knob of a fit; recorded in each identity's metadata."""

    steps: int | None = None  # default: 400 per identity
    batch_size: int = 2
    lr: float = 1e-2
    seed: int = 0
    resolution: int | None = None  # default: the model's
    direct: bool = False
    ema_momentum: float = 0.99
    pool_size: int | None = None  # augmented samples per identity; default by device
    steps_per_identity: int = 400
    weight_decay: float = 0.01  # torch's AdamW default
    capture: bool = True  # CUDA only: replay the step as a CUDA graph

    def resolved(self, n_identities: int, default_resolution: int,
                 device_type: str = "cpu") -> FitSettings:
        """A copy with defaults filled in and values checked."""
        self.check()
        steps = self.steps if self.steps is not None else self.steps_per_identity * n_identities
        resolution = self.resolution or default_resolution
        samples = max(1, math.ceil(steps * self.batch_size / max(n_identities, 1)))
        cap = DEFAULT_POOL_GPU if device_type == "cuda" else DEFAULT_POOL_CPU
        pool = self.pool_size or min(cap, samples)
        out = FitSettings(**asdict(self))
        out.steps, out.resolution, out.pool_size = steps, resolution, pool
        return out

    def check(self) -> None:
        """Raise InvalidOption for a value that cannot work (before any model loads)."""
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise InvalidOption("--steps must be at least 1.")
        if self.steps is not None and self.steps > 100_000:
            raise InvalidOption("--steps must be at most 100000.")
        if not 1 <= self.batch_size <= 64:
            raise InvalidOption("--batch-size must be between 1 and 64.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidOption("--lr must be a positive number.")
        if self.resolution is not None and (self.resolution % 8
                                            or not 64 <= self.resolution <= 2048):
            raise InvalidOption("--resolution must be a multiple of 8 between 64 and 2048.")
        if self.pool_size is not None and not 1 <= self.pool_size <= 4096:
            raise InvalidOption("--pool-size must be between 1 and 4096.")
        if not 0 <= self.ema_momentum < 1:
            raise InvalidOption("The EMA momentum must be in [0, 1).")


@dataclass
class FitSubject:
    """One identity to fit: its name and its aligned face crops (PIL images, RGB), one per
    source photo."""

    name: str
    faces: list[Any]

    def __init__(self, name: str, faces: Any):
        self.name = name
        self.faces = list(faces) if isinstance(faces, (list, tuple)) else [faces]
        if not 1 <= len(self.faces) <= MAX_PHOTOS:
            raise FitError(f"'{name}' needs 1 to {MAX_PHOTOS} face crops, not {len(self.faces)}.")


@dataclass
class FitResult:
    """What a fit produced."""

    coefficients: dict[str, Any]  # name -> numpy (2, p) float32
    face_embeddings: dict[str, Any]  # name -> numpy (photos, 512) float32, un-augmented crops
    losses: list[float]
    settings: FitSettings
    wall_time_s: float
    pool_time_s: float
    summary: dict[str, Any] = field(default_factory=dict)
    captured: bool = False  # the step ran as a CUDA graph
    notes: list[str] = field(default_factory=list)


def make_mapping(p: int, n_identities: int, direct: bool, generator):
    """The paper's mapping: face feature (512) -> linear -> LeakyReLU(0.2) -> (2, p), L2 per row.

    With ``direct`` the (2, p) coefficients of each identity are learned directly instead (the
    ablation in the paper), still L2-normalised per row. Returns a torch module whose call is
    ``mapping(features (B, 512), identity (B,)) -> (B, 2, p)``.
    """
    import torch
    import torch.nn.functional as F

    class CoefficientMapping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.direct = p, direct
            if direct:
                self.raw = torch.nn.Parameter(torch.randn((n_identities, 2, p),
                                                          generator=generator))
            else:
                self.linear = torch.nn.Linear(FACE_FEATURE_DIM, 2 * p)
                with torch.no_grad():
                    self.linear.weight.copy_(torch.randn((2 * p, FACE_FEATURE_DIM),
                                                         generator=generator))  # N(0, 1)
                    self.linear.bias.zero_()

        def forward(self, features, identity):
            if self.direct:
                raw = self.raw.index_select(0, identity)
            else:
                raw = F.leaky_relu(self.linear(features), 0.2).view(-1, 2, self.p)
            return F.normalize(raw, dim=-1)

    return CoefficientMapping()


def tokenize_templates(tokenizer) -> list[Any]:
    """Every caption template, tokenised once, with the subject's two slots marked."""
    from .prompting import IdentityMention, ParsedPrompt, tokenize_prompt

    tokenized = []
    for template in CAPTION_TEMPLATES:
        text = template.format(SUBJECT_PHRASE.format("\x00"))
        before, after = text.split("\x00")
        parsed = ParsedPrompt(text=text, segments=[before, IdentityMention(SUBJECT, 0, 0, True),
                                                   after])
        tokenized.append(tokenize_prompt(parsed, tokenizer))
    return tokenized


def _make_optimizer(parameters, settings: FitSettings, device):
    import torch

    if device.type == "cuda":
        # capturable: AdamW's step counter lives on the device, so the step can be replayed
        # as a CUDA graph without touching the host.
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay,
                                 capturable=True, foreach=True)
    return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)


def fit_identities(components, mean, basis_components, subjects: Sequence[FitSubject],
                   face_encoder, settings: FitSettings | None = None,
                   progress: ProgressCallback | None = None) -> FitResult:
    """Fit (2, p) coefficients for each subject, jointly, with the model frozen.

    ``mean`` (2, hidden) and ``basis_components`` (2, p, hidden) are the basis tensors.
    ``progress(phase, done, total, info)`` is called for the "pool" and "fit" phases; info
    carries the smoothed loss during "fit". Raises FitError when the loss stops being finite,
    naming the first step where it did.
    """
    import numpy as np
    import torch

    from . import fitstep
    from .augment import build_sample_pool
    from .models.convolutions import fit_convolutions

    if not subjects:
        raise FitError("Nothing to fit: no identities given.")
    device, dtype = components.device, components.dtype
    settings = (settings or FitSettings()).resolved(len(subjects), components.default_resolution,
                                                    device.type)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)

    mean = torch.as_tensor(mean, dtype=torch.float32).to(device)
    basis_components = torch.as_tensor(basis_components, dtype=torch.float32).to(device)
    p = basis_components.shape[1]
    hidden = basis_components.shape[2]
    table_width = sum(e.get_input_embeddings().weight.shape[1]
                      for e in components.text_encoders)
    if hidden != table_width:
        from .errors import BasisMismatch

        raise BasisMismatch(
            f"The basis has {hidden}-d embeddings but the model's text encoder uses "
            f"{table_width}-d ones; build a basis for this model with `celebctl basis build`."
        )

    pool = build_sample_pool(components.vae, subjects, face_encoder, settings.pool_size,
                             settings.resolution, rng, device, dtype, progress,
                             encode_batch=4 if device.type == "cuda" else 2)
    pool_time = time.perf_counter() - started
    n = len(subjects)
    templates_per_encoder = [tokenize_templates(tok) for tok in components.tokenizers]
    templates = templates_per_encoder[0]
    scheduler = components.scheduler
    schedule = fitstep.build_schedule(
        steps=settings.steps, batch_size=settings.batch_size, pool_identity=pool.identity,
        n_identities=n, n_templates=len(templates),
        latent_shape=tuple(pool.latent_mean.shape[1:]),
        alphas_cumprod=scheduler.alphas_cumprod,
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        ema_momentum=settings.ema_momentum, seed=settings.seed,
    ).to(device)
    mapping = make_mapping(p, n, settings.direct, generator).to(device)
    optimizer = _make_optimizer(list(mapping.parameters()), settings, device)
    scaler = None
    if dtype == torch.float16 and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    tensors = fitstep.StepTensors(
        schedule=schedule, latent_mean=pool.latent_mean, latent_std=pool.latent_std,
        features=pool.features, scaling=pool.scaling,
        template_ids=[torch.tensor([t.input_ids for t in per], device=device)
                      for per in templates_per_encoder],
        template_slots=torch.tensor([[pos for pos, _, _ in t.slots] for t in templates],
                                    device=device),
        basis_mean=mean, basis_components=basis_components,
        loss=torch.zeros(settings.steps, device=device),
        ema=torch.zeros((n, 2, p), device=device),
    )
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    step = fitstep.TrainStep(components, mapping, optimizer, tensors, prediction_type, scaler)
    notes: list[str] = []
    report_every = REPORT_EVERY_GPU if device.type == "cuda" else 1
    smoothed: list[float | None] = [None]
    checked = [0]

    def report(done: int) -> None:
        """Read the losses of steps checked..done back, check them, show progress."""
        if done <= checked[0]:
            return
        block = tensors.loss[checked[0]:done].float().cpu()
        bad = (~torch.isfinite(block)).nonzero()
        if len(bad):
            first = checked[0] + int(bad[0])
            raise FitError(
                f"The loss became {float(block[int(bad[0])])} at step {first + 1}; try a lower "
                "--lr or --dtype fp32."
            )
        for value in block.tolist():
            smoothed[0] = value if smoothed[0] is None else 0.9 * smoothed[0] + 0.1 * value
        checked[0] = done
        if progress:
            progress("fit", done, settings.steps, {"loss": smoothed[0]})

    convolutions = fit_convolutions(components.unet, device, dtype,
                                    int(pool.latent_mean.shape[-1]))
    with step.hooked(), convolutions as native_convolutions:
        first = 0
        if device.type == "cuda" and settings.capture and scaler is None:
            try:
                first = step.capture(0)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
                step.graph = None
                notes.append(f"The fit step could not be captured as a CUDA graph "
                             f"({type(exc).__name__}: {exc}); it ran eagerly (slower, same "
                             "result).")
                first = step.warmed  # the warm-up steps that ran are real steps
        for index in range(first, settings.steps):
            step.run(index)
            if (index + 1) % report_every == 0:
                report(index + 1)
        report(settings.steps)

    coefficients = {}
    with torch.no_grad():
        for i, subject in enumerate(subjects):
            if settings.direct:
                final = mapping(None, torch.tensor([i], device=device))[0]
            elif bool((schedule.owners == i).any()):
                final = tensors.ema[i]
            else:  # a short fit whose batches never reached this identity
                clean = pool.clean_features[i][:1].to(device)
                final = mapping(clean, torch.tensor([i], device=device))[0]
            coefficients[subject.name] = final.float().cpu().numpy().astype(np.float32)
    embeddings = {s.name: pool.clean_features[i].numpy().astype(np.float32)
                  for i, s in enumerate(subjects)}
    losses = tensors.loss.float().cpu().tolist()
    wall = time.perf_counter() - started
    head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)):]
    summary = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_min": min(losses),
        "loss_mean_first10": float(np.mean(head)),
        "loss_mean_last10": float(np.mean(tail)),
        "wall_time_s": round(wall, 3),
        "pool_time_s": round(pool_time, 3),
        "steps": settings.steps,
        "captured": step.graph is not None,
        "native_convolutions": native_convolutions,
    }
    return FitResult(coefficients=coefficients, face_embeddings=embeddings, losses=losses,
                     settings=settings, wall_time_s=wall, pool_time_s=pool_time, summary=summary,
                     captured=step.graph is not None, notes=notes)


# --------------------------------------------------------------------------------------------
# Orchestration: what `celebctl add` and `celebctl joint` call.


@dataclass
class FitOutcome:
    """What add/joint did: the identities written plus notes for the user."""

    identities: list[Any]
    notes: list[str]
    result: FitResult
    basis_id: str
    model: str


def _fit_meta(settings: FitSettings, result: FitResult, components, joint_with: list[str]
              ) -> dict[str, Any]:
    import torch

    dtype_names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    meta = {
        "mode": "direct" if settings.direct else "mapping",
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
        "resolution": settings.resolution,
        "ema_momentum": settings.ema_momentum,
        "ema_per": "sample",
        "pool_size": settings.pool_size,
        "weight_decay": settings.weight_decay,
        "captions": "subject-last-v2",
        "device": str(components.device),
        "dtype": dtype_names.get(components.dtype, str(components.dtype)),
        "text_encoder_dtype": dtype_names.get(components.text_encoder.dtype,
                                              str(components.text_encoder.dtype)),
        **{k: v for k, v in result.summary.items() if k != "steps"},
    }
    if joint_with:
        meta["joint_with"] = joint_with
    return meta


def _note(progress: ProgressCallback | None, message: str) -> None:
    if progress:
        progress("note", 0, 0, {"message": message})


def load_fit_model(spec, device, dtype, progress: ProgressCallback | None = None):
    """The model parts a fit needs, loaded once: the text encoder in fp32 (the reference fits in
    fp32; only the UNet runs under autocast), the UNet and VAE in ``dtype``, and the basis of
    that very text encoder (found, or built from it: no second load)."""
    import torch

    from . import basis as basis_mod
    from . import models

    components = models.load_pipeline_components(spec, device, dtype,
                                                 text_encoder_dtype=torch.float32,
                                                 progress=progress)
    info = basis_mod.ensure_basis(text_model=components.text_model())
    _note(progress, f"Basis {info.id} ({info.components} components)")
    return components, basis_mod.load_basis(info.id)


def _face_indices(face_index: int | Sequence[int] | None, photos: int) -> list[int | None]:
    """--face: one value for one photo, or one value per photo, in order."""
    if face_index is None:
        return [None] * photos
    if isinstance(face_index, int):
        face_index = [face_index]
    chosen = list(face_index)
    if len(chosen) == photos:
        return chosen
    if photos > 1 and len(chosen) == 1:
        raise InvalidOption(
            f"--face {chosen[0]} is ambiguous with {photos} photos: give --face once per photo, "
            "in the order of the photos (for example --face 2 --face 1 ...), or leave it out to "
            "use the largest face of each photo.")
    raise InvalidOption(f"--face was given {len(chosen)} times for {photos} photo(s); give it "
                        "once per photo, in the order of the photos.")


def prepare_photos(photos: Sequence[Any], face_index: int | Sequence[int] | None = None):
    """Read, detect and align every photo (1 to 16) before any model loads.

    One bad photo refuses the whole set; the error names it. Returns (prepared faces, notes).
    """
    from pathlib import Path

    from . import faces

    photos = list(photos)
    if not 1 <= len(photos) <= MAX_PHOTOS:
        raise InvalidOption(f"Give 1 to {MAX_PHOTOS} photos of the person, not {len(photos)}.")
    indices = _face_indices(face_index, len(photos))
    prepared, notes, seen = [], [], {}
    for number, (photo, index) in enumerate(zip(photos, indices, strict=True), start=1):
        face = faces.prepare_face(photo, face_index=index, device="cpu")
        if face.sha256 in seen:
            raise InvalidOption(f"{photo} is the same file as {seen[face.sha256]}; give each "
                                "photo once.")
        seen[face.sha256] = photo
        if face.note:
            notes.append(face.note if len(photos) == 1 else
                         f"Photo {number} ({Path(photo).name}): {face.note}")
        prepared.append(face)
    return prepared, notes


def _source(photo, prepared) -> dict[str, Any]:
    from pathlib import Path

    return {
        "photo": Path(photo).name,
        "photo_sha256": prepared.sha256,
        "image_size": list(prepared.original_size),
        "face_box": [round(float(v), 2) for v in prepared.face.box],
        "face_probability": round(float(prepared.face.probability), 4),
        "face_index": prepared.face_index,
        "faces_found": prepared.face_count,
    }


def _face_files(pngs: Sequence[bytes], embeddings) -> dict[str, Any]:
    """IdentityWrite arguments for several face crops and their (photos, 512) embeddings."""
    return {"face_png": pngs[0], "face_embedding": embeddings[0],
            "extra_faces": [(png, embeddings[k]) for k, png in enumerate(pngs) if k]}


def add_identity_from_photo(name: str, photo, *, model: str | None = None, device: str = "auto",
                            dtype: str = "auto", settings: FitSettings | None = None,
                            face_index: int | Sequence[int] | None = None,
                            replace: bool = False,
                            progress: ProgressCallback | None = None) -> FitOutcome:
    """Detect and align the face in ``photo`` (a path, or a list of 1 to 16 paths of the same
    person), fit it, and register it as ``name``.

    Everything that can be checked cheaply (name, options, every photo and face, face-encoder
    weights) is checked before the model loads; nothing is written unless the whole fit
    succeeds. With several photos the pool draws from all of them and the identity keeps every
    crop, embedding and source.
    """
    from . import __version__, faces, models, registry
    from .errors import IdentityExists
    from .models import families

    photos = list(photo) if isinstance(photo, (list, tuple)) else [photo]
    registry.validate_name(name)
    if registry.identity_exists(name) and not replace:
        raise IdentityExists(
            f"Identity '{name}' already exists. Use --replace to overwrite it, or pick "
            "another name."
        )
    (settings or FitSettings()).check()
    registry.check_writable()  # a read-only data home fails now, not after the fit
    spec = models.resolve_model_spec(model)
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    prepared, notes = prepare_photos(photos, face_index)
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device, progress=progress)
    components, basis = load_fit_model(spec, torch_device, dtype, progress)
    result = fit_identities(components, basis.mean, basis.components,
                            [FitSubject(name, [p.aligned for p in prepared])], encoder, settings,
                            progress)
    notes += result.notes
    meta = {
        "basis_id": basis.id,
        "model": spec.ref,
        "face_encoder": spec.face_encoder,
        "hidden": int(basis.components.shape[2]),
        "family": components.family,
        "encoder_widths": families.encoder_widths(components.text_encoders),
        "celebctl_version": __version__,
        "fit": _fit_meta(result.settings, result, components, []),
        "sources": [_source(p, f) for p, f in zip(photos, prepared, strict=True)],
    }
    write = registry.IdentityWrite(
        name=name, coefficients=result.coefficients[name], meta=meta,
        **_face_files([f.png_bytes() for f in prepared], result.face_embeddings[name]),
    )
    ident = registry.save_identity(write, replace=replace)
    if spec.is_noise_model:
        notes.append(f"'{spec.ref}' has random weights: the fit exercises the code, "
                     "but the identity is not a likeness.")
    return FitOutcome([ident], notes, result, basis.id, spec.ref)


def refit_jointly(names: Sequence[str], *, model: str | None = None, device: str = "auto",
                  dtype: str = "auto", settings: FitSettings | None = None,
                  progress: ProgressCallback | None = None) -> FitOutcome:
    """Refit registered identities together (one shared mapping) from their stored face crops
    (every photo of each).

    All are replaced in one all-or-nothing step; on any error every identity stays as it was.
    """
    import io

    from PIL import Image

    from . import __version__, faces, models, registry
    from . import basis as basis_mod
    from .errors import BasisMismatch, InvalidName
    from .models import families

    names = list(names)
    if len(names) < 2:
        raise InvalidName("`joint` needs at least two identities.")
    if len(set(names)) != len(names):
        raise InvalidName("An identity is named twice.")
    for name in names:
        registry.validate_name(name)
    (settings or FitSettings()).check()
    idents = registry.read_identity_set(names)
    registry.check_writable()  # a read-only data home fails now, not after the fit
    faceless = [i.name for i in idents if not i.has_face]
    if faceless:
        raise FitError(
            f"{', '.join(repr(n) for n in faceless)} has no face crop (imported from a bundle "
            "made with --no-face), so it cannot be refitted. Add it again from a photo."
        )
    from .rendering import check_families, check_widths

    check_families(idents, command="joint")
    bases = {i.basis_id for i in idents}
    if len(bases) > 1:
        detail = ", ".join(f"{i.name}: {i.basis_id}" for i in idents)
        raise BasisMismatch(
            f"The identities use different bases ({detail}); `joint` needs one basis. Re-add "
            "the odd ones out with the others' model (`celebctl add NAME PHOTO --replace "
            "--model MODEL`)."
        )
    face_pngs = {}
    for ident in idents:
        face_pngs[ident.name] = ident.load_face_pngs()
        for number, png in enumerate(face_pngs[ident.name], start=1):
            registry.check_face_png(png, f"The face crop of '{ident.name}'"
                                    + (f" (photo {number})" if number > 1 else ""), FitError)
    info = basis_mod.info_for_identities(idents[0].basis_id, names)
    spec, notes = models.model_for_identities(
        model, info, {i.name: str(i.meta.get("model", "")) for i in idents})
    check_families(idents, spec, command="joint")
    check_widths(idents, info, spec, command="joint")
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    basis = basis_mod.load_basis(info.id)
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device, progress=progress)
    import torch

    components = models.load_pipeline_components(spec, torch_device, dtype,
                                                 text_encoder_dtype=torch.float32,
                                                 progress=progress)
    basis_mod.check_model_matches_basis(basis, components.text_encoders, components.tokenizer,
                                        model_ref=spec.ref)
    subjects = []
    for ident in idents:
        crops = []
        for png in face_pngs[ident.name]:
            with Image.open(io.BytesIO(png)) as image:
                crops.append(image.convert("RGB"))
        subjects.append(FitSubject(ident.name, crops))
    result = fit_identities(components, basis.mean, basis.components, subjects, encoder,
                            settings, progress)
    notes += result.notes
    writes = []
    for ident in idents:
        meta = {k: v for k, v in ident.meta.items()
                if k not in ("files", "name", "schema_version", "created", "updated")}
        meta.update({
            "basis_id": basis.id, "model": spec.ref, "face_encoder": spec.face_encoder,
            "family": components.family,
            "encoder_widths": families.encoder_widths(components.text_encoders),
            "celebctl_version": __version__,
            "fit": _fit_meta(result.settings, result, components,
                             [n for n in names if n != ident.name]),
        })
        writes.append(registry.IdentityWrite(
            name=ident.name, coefficients=result.coefficients[ident.name], meta=meta,
            **_face_files(face_pngs[ident.name], result.face_embeddings[ident.name]),
            # Refused if another process changed, renamed or removed it during the fit.
            replaces_sha256=ident.meta["files"]["coefficients"]["sha256"],
        ))
    written = registry.save_identities(writes, replace=True)
    return FitOutcome(written, notes, result, basis.id, spec.ref)
