"""The Celeb Basis fit: one or more face crops in, (2, p) coefficients per identity out.

The diffusion model, the VAE and the text encoder stay frozen; only a small mapping (or, with
``direct=True``, the coefficients themselves) is trained. Before the loop, augmented copies of
each face are encoded once into a pool of latents and face features, so the loop itself runs
only the text encoder and the UNet (forward and backward).

Method figures (METHOD.md, read from the reference code): mapping 512 -> 2p, LeakyReLU 0.2,
per-token L2 norm; EMA 0.99 of the mapping's output; 400 steps per identity, batch 2, AdamW,
lr 1e-2; flip, colour jitter, paste at 10-100 % of the frame on black; noise-prediction MSE.
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
    pool_size: int | None = None  # augmented samples per identity; default min(64, steps*batch)
    steps_per_identity: int = 400
    weight_decay: float = 0.01  # torch's AdamW default

    def resolved(self, n_identities: int, default_resolution: int) -> FitSettings:
        """A copy with defaults filled in and values checked."""
        steps = self.steps if self.steps is not None else self.steps_per_identity * n_identities
        resolution = self.resolution or default_resolution
        pool = self.pool_size or min(64, max(1, steps * self.batch_size))
        if steps < 1:
            raise InvalidOption("--steps must be at least 1.")
        if not 1 <= self.batch_size <= 64:
            raise InvalidOption("--batch-size must be between 1 and 64.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidOption("--lr must be a positive number.")
        if resolution % 8 or not 64 <= resolution <= 2048:
            raise InvalidOption("--resolution must be a multiple of 8 between 64 and 2048.")
        out = FitSettings(**asdict(self))
        out.steps, out.resolution, out.pool_size = steps, resolution, pool
        return out


@dataclass
class FitSubject:
    """One identity to fit: its name and aligned face crop (PIL image, RGB)."""

    name: str
    face: Any


@dataclass
class FitResult:
    """What a fit produced."""

    coefficients: dict[str, Any]  # name -> numpy (2, p) float32
    face_embeddings: dict[str, Any]  # name -> numpy (512,) float32 of the un-augmented crop
    losses: list[float]
    settings: FitSettings
    wall_time_s: float
    pool_time_s: float
    summary: dict[str, Any] = field(default_factory=dict)


class CoefficientMapping:
    """The paper's mapping: face feature (512) -> linear -> LeakyReLU(0.2) -> (2, p), L2 per row.

    With ``direct`` the (2, p) coefficients of each identity are learned directly instead (the
    ablation in the paper), still L2-normalised per row.
    """

    def __init__(self, p: int, n_identities: int, direct: bool, generator):
        import torch

        self.p, self.direct = p, direct
        if direct:
            init = torch.randn((n_identities, 2, p), generator=generator)
            self.raw = torch.nn.Parameter(init)
            self.parameters = [self.raw]
        else:
            weight = torch.randn((2 * p, FACE_FEATURE_DIM), generator=generator)  # N(0, 1)
            self.linear = torch.nn.Linear(FACE_FEATURE_DIM, 2 * p)
            with torch.no_grad():
                self.linear.weight.copy_(weight)
                self.linear.bias.zero_()
            self.parameters = list(self.linear.parameters())

    def to(self, device):
        if self.direct:
            self.raw.data = self.raw.data.to(device)
        else:
            self.linear.to(device)
        return self

    def __call__(self, features, identity_index):
        import torch.nn.functional as F

        if self.direct:
            raw = self.raw[identity_index]
        else:
            raw = F.leaky_relu(self.linear(features), 0.2).view(-1, 2, self.p)
        return F.normalize(raw, dim=-1)


def _augment(crop, rng: random.Random):
    """Flip + colour jitter of one (3, H, W) crop in [0, 1]; returns the augmented crop."""
    import torch
    import torchvision.transforms.v2.functional as TF

    image = crop
    if rng.random() < 0.5:
        image = torch.flip(image, dims=[-1])
    brightness, contrast, saturation = (rng.uniform(0.8, 1.2) for _ in range(3))
    hue = rng.uniform(-0.02, 0.02)
    image = TF.adjust_brightness(image, brightness)
    image = TF.adjust_contrast(image, contrast)
    image = TF.adjust_saturation(image, saturation)
    image = TF.adjust_hue(image, hue)
    return image.clamp(0, 1)


def _paste(face, resolution: int, rng: random.Random):
    """Rescale the face to 10-100 % of the frame height (aspect 0.9-1.1), paste on black."""
    import torch
    import torch.nn.functional as F

    scale = rng.uniform(0.1, 1.0)
    aspect = rng.uniform(0.9, 1.1)
    height = max(8, min(resolution, round(resolution * scale)))
    width = max(8, min(resolution, round(height * aspect)))
    resized = F.interpolate(face[None], size=(height, width), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    canvas = torch.zeros((3, resolution, resolution), dtype=face.dtype)
    top = rng.randint(0, resolution - height)
    left = rng.randint(0, resolution - width)
    canvas[:, top:top + height, left:left + width] = resized
    return canvas


def _pil_to_tensor(image):
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class SamplePool:
    """Latents (N, 4, h, w) and face features (N, 512), each tagged with its identity index."""

    latents: Any
    features: Any
    identity: Any
    clean_features: Any  # (n_identities, 512): features of the un-augmented crops


def build_sample_pool(components, subjects: Sequence[FitSubject], face_encoder, settings,
                      generator, rng: random.Random, progress: ProgressCallback | None = None,
                      encode_batch: int = 2) -> SamplePool:
    """Augment each face ``pool_size`` times, encode the pastes with the VAE in batches.

    Small encode batches keep the pool's peak memory (the VAE encoder's activations at full
    resolution) below that of a training step.
    """
    import torch

    from . import faces

    device, dtype = components.device, components.dtype
    vae = components.vae
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    pastes, feature_inputs, owners = [], [], []
    clean_inputs = []
    for index, subject in enumerate(subjects):
        crop = _pil_to_tensor(subject.face)
        clean_inputs.append(crop)
        for _ in range(settings.pool_size):
            augmented = _augment(crop, rng)
            feature_inputs.append(augmented)
            pastes.append(_paste(augmented, settings.resolution, rng))
            owners.append(index)
    total = len(pastes)
    latents, features = [], []
    encoder_device = next(face_encoder.parameters()).device
    with torch.no_grad():
        clean = faces.embed_faces(face_encoder, torch.stack(clean_inputs).to(encoder_device))
        for start in range(0, total, encode_batch):
            stop = min(total, start + encode_batch)
            images = torch.stack(pastes[start:stop]).to(device=device, dtype=dtype) * 2 - 1
            dist = vae.encode(images).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(device, dist.mean.dtype)
            latents.append(((dist.mean + dist.std * noise) * scaling).float())
            crops = torch.stack(feature_inputs[start:stop]).to(encoder_device)
            features.append(faces.embed_faces(face_encoder, crops).float())
            if progress:
                progress("pool", stop, total, {})
    return SamplePool(
        latents=torch.cat(latents).to(device),
        features=torch.cat(features).to(device),
        identity=torch.tensor(owners, dtype=torch.long, device=device),
        clean_features=clean.float().cpu(),
    )


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


def fit_identities(components, mean, basis_components, subjects: Sequence[FitSubject],
                   face_encoder, settings: FitSettings | None = None,
                   progress: ProgressCallback | None = None) -> FitResult:
    """Fit (2, p) coefficients for each subject, jointly, with the model frozen.

    ``mean`` (2, hidden) and ``basis_components`` (2, p, hidden) are the basis tensors.
    ``progress(phase, done, total, info)`` is called for the "pool" and "fit" phases; info
    carries the smoothed loss during "fit". Raises FitError when the loss stops being finite.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    if not subjects:
        raise FitError("Nothing to fit: no identities given.")
    settings = (settings or FitSettings()).resolved(len(subjects), components.default_resolution)
    started = time.perf_counter()
    device, dtype = components.device, components.dtype
    generator = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)

    mean = torch.as_tensor(mean, dtype=torch.float32).to(device)
    basis_components = torch.as_tensor(basis_components, dtype=torch.float32).to(device)
    p = basis_components.shape[1]
    hidden = basis_components.shape[2]
    table_width = components.text_encoder.get_input_embeddings().weight.shape[1]
    if hidden != table_width:
        from .errors import BasisMismatch

        raise BasisMismatch(
            f"The basis has {hidden}-d embeddings but the model's text encoder uses "
            f"{table_width}-d ones; build a basis for this model with `celebctl basis build`."
        )

    pool = build_sample_pool(components, subjects, face_encoder, settings, generator, rng,
                             progress)
    pool_time = time.perf_counter() - started
    # The VAE is not needed inside the loop; its weights stay where they are (frozen).
    templates = tokenize_templates(components.tokenizer)
    n = len(subjects)
    by_identity = [torch.nonzero(pool.identity == i).flatten().cpu() for i in range(n)]

    mapping = CoefficientMapping(p, n, settings.direct, generator).to(device)
    optimizer = torch.optim.AdamW(mapping.parameters, lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    scheduler = components.scheduler
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    use_autocast = dtype != torch.float32
    scaler = None
    if dtype == torch.float16 and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")

    ema: list[Any] = [None] * n
    losses: list[float] = []
    smoothed = None
    unet, text_encoder = components.unet, components.text_encoder
    # Token ids and the subject's slot positions of every template, on the device once.
    template_ids = torch.tensor([t.input_ids for t in templates], device=device)
    template_slots = torch.tensor([[pos for pos, _, _ in t.slots] for t in templates],
                                  device=device)
    batch_rows = torch.arange(settings.batch_size, device=device)
    from . import prompting

    for step in range(settings.steps):
        # Every batch mixes identities: sample j of step s belongs to identity (s*B + j) mod n.
        owners = [(step * settings.batch_size + j) % n for j in range(settings.batch_size)]
        picks = []
        for owner in owners:
            candidates = by_identity[owner]
            choice = int(torch.randint(len(candidates), (1,), generator=generator))
            picks.append(int(candidates[choice]))
        index = torch.tensor(picks, device=device)
        latents = pool.latents[index]
        features = pool.features[index]
        owner_index = torch.tensor(owners, device=device)
        chosen = [rng.randrange(len(templates)) for _ in owners]

        coeffs = mapping(features, owner_index)  # (B, 2, p)
        vectors = mean + torch.einsum("btp,tph->bth", coeffs, basis_components)  # (B, 2, hidden)
        chosen_index = torch.tensor(chosen, device=device)
        ids = template_ids[chosen_index]
        cols = template_slots[chosen_index].reshape(-1)
        rows = batch_rows[: len(chosen)].repeat_interleave(template_slots.shape[1])
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        mask[rows, cols] = True
        # index_put keeps the graph from the slot values back to the mapping.
        values = torch.zeros((*ids.shape, hidden), device=device)
        values = values.index_put((rows, cols), vectors.reshape(-1, hidden))

        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, num_train_timesteps, (len(owners),),
                                  generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            hidden_states = prompting.encode_tokens(text_encoder, ids, mask, values)
            prediction = unet(noisy.to(dtype), timesteps, hidden_states.to(dtype)).sample
        loss = F.mse_loss(prediction.float(), target.float())
        if not torch.isfinite(loss):
            raise FitError(
                f"The loss became {loss.item()} at step {step + 1}; try a lower --lr or "
                "--dtype fp32."
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        with torch.no_grad():
            detached = coeffs.detach().float()
            for i in set(owners):
                current = detached[owner_index == i].mean(dim=0)
                if ema[i] is None:
                    ema[i] = current.clone()
                else:
                    ema[i].mul_(settings.ema_momentum).add_(
                        current, alpha=1 - settings.ema_momentum)
        value = float(loss.detach())
        losses.append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if progress:
            progress("fit", step + 1, settings.steps, {"loss": smoothed})

    coefficients = {}
    with torch.no_grad():
        for i, subject in enumerate(subjects):
            if settings.direct:
                final = mapping(None, torch.tensor([i], device=device))[0]
            else:
                final = ema[i] if ema[i] is not None else mapping(
                    pool.clean_features[i:i + 1].to(device), None)[0]
            coefficients[subject.name] = final.float().cpu().numpy().astype(np.float32)
    embeddings = {s.name: pool.clean_features[i].numpy().astype(np.float32)
                  for i, s in enumerate(subjects)}
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
    }
    return FitResult(coefficients=coefficients, face_embeddings=embeddings, losses=losses,
                     settings=settings, wall_time_s=wall, pool_time_s=pool_time, summary=summary)


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
        "pool_size": settings.pool_size,
        "weight_decay": settings.weight_decay,
        "device": str(components.device),
        "dtype": dtype_names.get(components.dtype, str(components.dtype)),
        **{k: v for k, v in result.summary.items() if k != "steps"},
    }
    if joint_with:
        meta["joint_with"] = joint_with
    return meta


def _load_basis_for(spec, progress: ProgressCallback | None):
    from . import basis as basis_mod

    def note(message: str) -> None:
        if progress:
            progress("note", 0, 0, {"message": message})

    info = basis_mod.ensure_basis(spec)
    note(f"Basis {info.id} ({info.components} components)")
    return basis_mod.load_basis(info.id)


def add_identity_from_photo(name: str, photo, *, model: str | None = None, device: str = "auto",
                            dtype: str = "auto", settings: FitSettings | None = None,
                            face_index: int | None = None, replace: bool = False,
                            progress: ProgressCallback | None = None) -> FitOutcome:
    """Detect and align the face in ``photo``, fit it, and register it as ``name``.

    Everything that can be checked cheaply (name, photo, face, face-encoder weights) is checked
    before the model loads; nothing is written unless the whole fit succeeds.
    """
    from pathlib import Path

    from . import __version__, faces, models, registry
    from .errors import IdentityExists

    registry.validate_name(name)
    if registry.identity_exists(name) and not replace:
        raise IdentityExists(
            f"Identity '{name}' already exists. Use --replace to overwrite it, or pick "
            "another name."
        )
    registry.check_writable()  # a read-only data home fails now, not after the fit
    spec = models.resolve_model_spec(model)
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    prepared = faces.prepare_face(photo, face_index=face_index, device="cpu")
    notes = [prepared.note] if prepared.note else []
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device)
    basis = _load_basis_for(spec, progress)
    components = models.load_pipeline_components(spec, torch_device, dtype)
    from . import basis as basis_mod

    basis_mod.check_model_matches_basis(basis, components.text_encoder, components.tokenizer,
                                        model_ref=spec.ref)
    result = fit_identities(components, basis.mean, basis.components,
                            [FitSubject(name, prepared.aligned)], encoder, settings, progress)
    box = [round(float(v), 2) for v in prepared.face.box]
    meta = {
        "basis_id": basis.id,
        "model": spec.ref,
        "face_encoder": spec.face_encoder,
        "hidden": int(basis.components.shape[2]),
        "celebctl_version": __version__,
        "fit": _fit_meta(result.settings, result, components, []),
        "source": {
            "photo": Path(photo).name,
            "photo_sha256": prepared.sha256,
            "image_size": list(prepared.original_size),
            "face_box": box,
            "face_probability": round(float(prepared.face.probability), 4),
            "face_index": prepared.face_index,
            "faces_found": prepared.face_count,
        },
    }
    write = registry.IdentityWrite(
        name=name, coefficients=result.coefficients[name], meta=meta,
        face_png=prepared.png_bytes(), face_embedding=result.face_embeddings[name],
    )
    ident = registry.save_identity(write, replace=replace)
    if spec.is_noise_model:
        notes.append(f"'{spec.ref}' has random weights: the fit exercises the code, "
                     "but the identity is not a likeness.")
    return FitOutcome([ident], notes, result, basis.id, spec.ref)


def refit_jointly(names: Sequence[str], *, model: str | None = None, device: str = "auto",
                  dtype: str = "auto", settings: FitSettings | None = None,
                  progress: ProgressCallback | None = None) -> FitOutcome:
    """Refit registered identities together (one shared mapping) from their stored face crops.

    All are replaced in one all-or-nothing step; on any error every identity stays as it was.
    """
    import io

    from PIL import Image

    from . import __version__, faces, models, registry
    from . import basis as basis_mod
    from .errors import BasisMismatch, InvalidName

    names = list(names)
    if len(names) < 2:
        raise InvalidName("`joint` needs at least two identities.")
    if len(set(names)) != len(names):
        raise InvalidName("An identity is named twice.")
    for name in names:
        registry.validate_name(name)
    idents = registry.read_identity_set(names)
    registry.check_writable()  # a read-only data home fails now, not after the fit
    faceless = [i.name for i in idents if not i.has_face]
    if faceless:
        raise FitError(
            f"{', '.join(repr(n) for n in faceless)} has no face crop (imported from a bundle "
            "made with --no-face), so it cannot be refitted. Add it again from a photo."
        )
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
        face_pngs[ident.name] = ident.load_face_png()
        registry.check_face_png(face_pngs[ident.name], f"The face crop of '{ident.name}'",
                                FitError)
    info = basis_mod.info_for_identities(idents[0].basis_id, names)
    spec, notes = models.model_for_identities(
        model, info, {i.name: str(i.meta.get("model", "")) for i in idents})
    torch_device = models.resolve_device(device)
    models.resolve_dtype(dtype, torch_device)
    basis = basis_mod.load_basis(info.id)
    encoder = faces.load_face_encoder(spec.face_encoder, device=torch_device)
    components = models.load_pipeline_components(spec, torch_device, dtype)
    basis_mod.check_model_matches_basis(basis, components.text_encoder, components.tokenizer,
                                        model_ref=spec.ref)
    subjects = []
    for ident in idents:
        with Image.open(io.BytesIO(face_pngs[ident.name])) as image:
            subjects.append(FitSubject(ident.name, image.convert("RGB")))
    result = fit_identities(components, basis.mean, basis.components, subjects, encoder,
                            settings, progress)
    writes = []
    for ident in idents:
        meta = {k: v for k, v in ident.meta.items()
                if k not in ("files", "name", "schema_version", "created", "updated")}
        meta.update({
            "basis_id": basis.id, "model": spec.ref, "face_encoder": spec.face_encoder,
            "celebctl_version": __version__,
            "fit": _fit_meta(result.settings, result, components,
                             [n for n in names if n != ident.name]),
        })
        writes.append(registry.IdentityWrite(
            name=ident.name, coefficients=result.coefficients[ident.name], meta=meta,
            face_png=face_pngs[ident.name], face_embedding=result.face_embeddings[ident.name],
            # Refused if another process changed, renamed or removed it during the fit.
            replaces_sha256=ident.meta["files"]["coefficients"]["sha256"],
        ))
    written = registry.save_identities(writes, replace=True)
    return FitOutcome(written, notes, result, basis.id, spec.ref)
