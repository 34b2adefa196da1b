"""Prompt embeddings -> images + metadata.

A prompt names identities; each expands in place to its two token vectors (see
:mod:`celebctl.prompting`), and the frozen pipeline runs as usual on the resulting
``prompt_embeds``. Nothing here mutates the model: the tokenizer and the embedding table stay
as loaded, so renders in one process never leak into each other.

Images go to a normal user folder as ``<prompt-slug>-<seed>.png`` (never overwriting a file) and
carry their settings as PNG text chunks: ``parameters`` in the WebUI's form and ``celebctl`` as
JSON. With the same seed and settings on the CPU the PNG bytes are identical.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, filehash
from .denoise import UNetCall, sample_images
from .errors import BasisMismatch, InvalidOption, StorageError
from .prompting import (
    CHUNK_TOKENS,
    ParsedPrompt,
    parse_prompt,
    tokenize_chunks,
    with_person_nouns,
)
from .storage import write_new_user_file

if TYPE_CHECKING:  # pragma: no cover
    from .models import Components, ModelSpec

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]

# --scheduler value -> (diffusers class, the name the WebUI writes as "Sampler").
SCHEDULERS = {
    "ddim": ("DDIMScheduler", "DDIM"),
    "dpm": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "euler": ("EulerDiscreteScheduler", "Euler"),
}
DEFAULT_OUT_DIR = Path("renders")
SLUG_MAX_CHARS = 60
MAX_IMAGES = 1000
MAX_STEPS = 1000
MAX_BATCH = 64
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_SEED = 2**63 - 1
# Classifier-free guidance when --guidance is not given: the reference samples identities at 10;
# prompts without an identity keep diffusers' usual 7.5.
IDENTITY_GUIDANCE = 10.0
PLAIN_GUIDANCE = 7.5


def default_guidance(names_identities: bool) -> float:
    """The guidance scale used when none is given (docs/method.md, "Rendering")."""
    return IDENTITY_GUIDANCE if names_identities else PLAIN_GUIDANCE


# --------------------------------------------------------------------------------------------
# Plan: everything that can be checked without loading a model


@dataclass
class RenderPlan:
    """A checked render request: parsed prompts, identities, basis, model and token counts."""

    prompt: ParsedPrompt
    negative: ParsedPrompt
    identities: list[str]
    basis_id: str | None
    spec: ModelSpec
    token_count: int  # tokens of the prompt, start/end tokens not counted
    negative_token_count: int
    max_tokens: int
    notes: list[str] = field(default_factory=list)
    person_noun: bool = True
    chunks: list[int] = field(default_factory=list)  # tokens in each 75-token chunk
    negative_chunks: list[int] = field(default_factory=list)
    # name -> (2, p) numpy coefficients, read together with the identities (one snapshot)
    coefficients: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> str:
        """The model's stable reference (repo id, absolute path, `tiny`, ...)."""
        return self.spec.ref

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what `celebctl render --dry-run --json` prints)."""
        return {
            "prompt": self.prompt.text,
            "expanded": self.prompt.expanded(),
            "negative": self.negative.text,
            "negative_expanded": self.negative.expanded(),
            # The same prompt for other tools, with the identities' exports installed there.
            "webui": self.prompt.expanded("webui"),
            "comfyui": self.prompt.expanded("comfyui"),
            "identities": list(self.identities),
            "basis_id": self.basis_id,
            "model": self.model,
            "tokens": self.token_count,
            "negative_tokens": self.negative_token_count,
            "max_tokens": self.max_tokens,
            "person_noun": self.person_noun,
            "chunks": list(self.chunks),
            "negative_chunks": list(self.negative_chunks),
            "weighted": self.prompt.weighted or self.negative.weighted,
            "guidance_default": default_guidance(bool(self.identities)),
            "notes": list(self.notes),
        }


@functools.lru_cache(maxsize=1)
def _packaged_tokenizer() -> tuple[Any, str]:
    """The packaged CLIP tokenizer and its sha256, built once per process (never mutated)."""
    from . import models

    tokenizer = models.build_clip_tokenizer()
    return tokenizer, models.tokenizer_sha256(tokenizer)


def _tokenizer_for_plan(spec: ModelSpec) -> tuple[Any, str | None]:
    """A tokenizer to count tokens with, and its sha256 when it is the model's own.

    SD 1.x models use the packaged CLIP tokenizer; a local folder's own tokenizer is read when
    present (a tokenizer is a vocabulary, not a torch model).
    """
    from . import models

    if spec.kind == "folder" and spec.path is not None and (spec.path / "tokenizer").is_dir():
        with contextlib.suppress(Exception), models.quiet_libraries(include_diffusers=False):
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(str(spec.path / "tokenizer"))
            return tokenizer, models.tokenizer_sha256(tokenizer)
    tokenizer, sha = _packaged_tokenizer()
    return tokenizer, sha if spec.kind in models.BUILTIN_FAMILIES else None


def check_families(idents: Sequence[Any], spec: Any = None, command: str = "render") -> None:
    """Refuse identities of different Stable Diffusion families together, and identities of
    another family than the model's (when the model's family is known without loading)."""
    from .models import families

    kinds = {ident.family for ident in idents}
    if len(kinds) > 1:
        detail = ", ".join(f"{i.name}: {families.label(i.family)}" for i in idents)
        raise BasisMismatch(
            f"These identities were fitted for different Stable Diffusion families ({detail}); "
            f"they cannot be used in one {command}. Re-add the odd ones out with a model of the "
            "others' family (`celebctl add NAME PHOTO --replace --model MODEL`).")
    model_family = getattr(spec, "family", None) if spec is not None else None
    if kinds and model_family and model_family not in kinds:
        family = kinds.pop()
        names = ", ".join(i.name for i in idents)
        raise BasisMismatch(
            f"{names} {'was' if len(idents) == 1 else 'were'} fitted for "
            f"{families.label(family)}, but {spec.ref} is a model of the "
            f"{families.label(model_family)} family. Render with a model of the "
            f"{families.label(family)} family (--model), or re-add "
            f"{'it' if len(idents) == 1 else 'them'} for this one (`celebctl add NAME PHOTO "
            f"--replace --model {spec.ref}`).")


def check_widths(idents: Sequence[Any], info: Any, spec: Any, command: str = "render"
                 ) -> None:
    """Refuse, before loading, a model whose text encoders are not as wide as the identities'
    basis (known from the model's configs or file header), naming the fix that works."""
    from . import models

    if info is None or not idents:
        return
    widths = models.text_widths(spec)
    if not widths or sum(widths) == info.hidden:
        return
    names = ", ".join(i.name for i in idents)
    one = len(idents) == 1
    theirs = (f"{command} with --model {info.model}" if info.built_here
              else "use the model they were fitted with (--model)")
    readd = " ".join(
        f"`celebctl add {i.name} {_source_photo(i)} --replace --model {spec.ref}`"
        for i in idents)
    raise BasisMismatch(
        f"{names} {'was' if one else 'were'} fitted on a model whose text encoder"
        f"{'s are' if len(info.encoder_widths or [1]) > 1 else ' is'} {info.hidden}-d (basis "
        f"{info.id}, built from {info.model!r}), but {spec.ref}'s "
        f"{'are' if len(widths) > 1 else 'is'} {sum(widths)}-d, so {command} cannot use "
        f"{'it' if one else 'them'} with this model. Either {theirs}, or re-add "
        f"{'it' if one else 'them'} for this model: {readd}.")


def _source_photo(ident: Any) -> str:
    """The name of the identity's first source photo for a command to show, else PHOTO."""
    sources = ident.meta.get("sources") or [{}]
    name = str(sources[0].get("photo", "")) if isinstance(sources[0], dict) else ""
    return name if name and " " not in name and name.isprintable() else "PHOTO"


def _shared_basis(idents: Sequence[Any]) -> str | None:
    bases = {ident.basis_id for ident in idents}
    if len(bases) > 1:
        detail = ", ".join(f"{i.name}: {i.basis_id}" for i in idents)
        raise BasisMismatch(
            f"The identities in this prompt use different bases ({detail}), so they cannot be "
            "rendered together: they were fitted with different models. Re-add the odd ones "
            "out with the others' model (`celebctl add NAME PHOTO --replace --model MODEL`), "
            "then render again."
        )
    return bases.pop() if bases else None


def plan_render(prompt: str, negative: str = "", model: str | ModelSpec | None = None, *,
                tokenizer: Any = None, person_noun: bool = True) -> RenderPlan:
    """Parse and check a render request without loading any model.

    Finds the registered identities named in ``prompt`` and ``negative``, checks they share one
    basis, picks the model (``model``; else the identities' recorded model when they agree; else
    the configured default) and counts tokens against the 77-token window with the model's
    tokenizer where it is known without loading (the packaged CLIP tokenizer for SD 1.x), or
    with ``tokenizer`` when given (an already loaded model's). With ``person_noun`` each
    identity is followed by "person" as in training (:func:`prompting.with_person_nouns`).
    Raises PromptError,
    IdentityNotFound, BasisMismatch, BasisNotFound or ModelUnavailable.
    """
    from . import basis as basis_mod
    from . import models, registry

    known = registry.known_names()
    parsed = parse_prompt(prompt, known)
    parsed_negative = parse_prompt(negative or "", known, allow_empty=True)
    if person_noun:
        parsed, parsed_negative = with_person_nouns(parsed), with_person_nouns(parsed_negative)
    names = list(dict.fromkeys(parsed.identities + parsed_negative.identities))
    # One consistent read: never a partner refitted by a `joint` half-way through its write.
    idents = registry.read_identity_set(names)
    check_families(idents)
    basis_id = _shared_basis(idents)
    info = basis_mod.info_for_identities(basis_id, names) if basis_id else None
    spec, notes = models.model_for_identities(
        model, info, {i.name: str(i.meta.get("model", "")) for i in idents})
    check_families(idents, spec)
    check_widths(idents, info, spec)

    # A given tokenizer belongs to a loaded model: check_model_matches_basis checks it fully.
    tokenizer, sha = (tokenizer, None) if tokenizer is not None else _tokenizer_for_plan(spec)
    if info is not None and sha is not None and sha != info.tokenizer_sha256:
        raise BasisMismatch(
            f"Model {spec.ref}'s tokenizer does not match basis {info.id}, which "
            f"{', '.join(names)} use{'s' if len(names) == 1 else ''} (it was built from "
            f"{info.model!r}). Render with the model they were fitted with (--model), or "
            f"re-add them for this one (`celebctl add NAME PHOTO --replace --model {spec.ref}`)."
        )
    chunks = tokenize_chunks(parsed, tokenizer)
    negative_chunks = tokenize_chunks(parsed_negative, tokenizer, label="negative prompt")
    if spec.is_noise_model:
        notes.append(noise_note(spec))
    return RenderPlan(prompt=parsed, negative=parsed_negative, identities=names,
                      basis_id=basis_id, spec=spec,
                      token_count=sum(c.length - 2 for c in chunks),
                      negative_token_count=sum(c.length - 2 for c in negative_chunks),
                      max_tokens=CHUNK_TOKENS * len(chunks),
                      notes=notes, coefficients={i.name: i.load_coefficients() for i in idents},
                      person_noun=person_noun, chunks=[c.length - 2 for c in chunks],
                      negative_chunks=[c.length - 2 for c in negative_chunks])


def noise_note(spec: ModelSpec) -> str:
    """The note for models with random weights."""
    return (f"'{spec.ref}' has random weights: its images are noise; use --model with real "
            "weights for real pictures.")


# --------------------------------------------------------------------------------------------
# Files


def prompt_slug(text: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """A file-name stem from a prompt: lowercase ASCII words joined by '-', never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_chars:
            if not slug:
                slug = word[:max_chars]
            break
        slug = candidate
    return slug or "render"


def _prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidOption(f"--out {out_dir} is a file; give a folder for the images.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .storage import _storage_error

        raise _storage_error(exc, out_dir, user_file=True) from exc
    if not os.access(out_dir, os.W_OK):
        raise StorageError(f"Cannot write to {out_dir}: permission denied. Pick another --out.")
    return out_dir


# --------------------------------------------------------------------------------------------
# Metadata


def _quote(value: str) -> str:
    """Quote a WebUI parameter value the way the WebUI does (values with , : or newlines)."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def model_label(spec: ModelSpec) -> str:
    """How a model is named in image metadata: local paths by their last part only, a single
    file without its extension (as the WebUI names checkpoints)."""
    if spec.kind == "single_file" and spec.path is not None:
        return spec.path.stem
    if spec.kind == "folder" and spec.path is not None:
        return spec.path.name
    return spec.ref


def image_parameters(settings: dict[str, Any]) -> str:
    """The WebUI-style ``parameters`` text for one image's settings (see :func:`render_prompt`).

    The prompt lines are what to type in the WebUI with each identity's `export --format a1111`
    file in its embeddings folder: identities by name, with the "person" celebctl added. The
    "Negative prompt:" line is always there, even empty: ComfyUI's import of dropped PNGs
    reads these parameters only when it finds that line.
    """
    lines = [settings.get("webui_prompt", settings["prompt"]),
             f"Negative prompt: {settings.get('webui_negative', settings['negative_prompt'])}"]
    fields = [
        ("Steps", str(settings["steps"])),
        ("Sampler", settings["sampler"]),
        ("CFG scale", f"{settings['cfg_scale']:g}"),
        ("Seed", str(settings["seed"])),
        ("Size", f"{settings['width']}x{settings['height']}"),
    ]
    if settings.get("model_hash"):
        fields.append(("Model hash", settings["model_hash"]))
    fields += [
        ("Model", settings["model"]),
        ("celebctl", settings["celebctl_version"]),
    ]
    if settings.get("basis_id"):
        fields.append(("Basis", settings["basis_id"]))
    if settings.get("identities"):
        fields.append(("Identities", ", ".join(settings["identities"])))
    if settings.get("ti_hashes"):
        # The embeddings as the WebUI lists them: each identity's `export --format a1111` file.
        fields.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest
                                              in settings["ti_hashes"].items())))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def embedding_hashes(names: Sequence[str]) -> dict[str, str]:
    """The WebUI's hash of each identity's `export --format a1111` file (its bytes depend on the
    identity only, so the hash names that file wherever it was exported to)."""
    from .export import a1111_bytes

    return {name: filehash.embedding_hash(a1111_bytes(name)) for name in names}


def png_bytes(image: Any, settings: dict[str, Any]) -> bytes:
    """Encode a PIL image as PNG with ``parameters`` (WebUI) and ``celebctl`` (JSON) chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image_parameters(settings))  # iTXt when not Latin-1
    info.add_text("celebctl", json.dumps(settings, sort_keys=True, ensure_ascii=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """Read back the text chunks celebctl writes: ``{"parameters": str, "celebctl": dict}``."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    data: dict[str, Any] = {"parameters": text.get("parameters")}
    raw = text.get("celebctl")
    data["celebctl"] = json.loads(raw) if raw else None
    return data


def contact_sheet(images: Sequence[Any], columns: int | None = None) -> Any:
    """All images in one picture, row by row (ceil(sqrt(n)) columns), black where empty."""
    from PIL import Image

    if not images:
        raise InvalidOption("No images for a contact sheet.")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return sheet


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass
class RenderResult:
    """What a render wrote, and what it rendered."""

    paths: list[Path]
    grid: Path | None
    prompt: str
    expanded: str
    negative: str
    negative_expanded: str
    identities: list[str]
    basis_id: str | None
    model: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    notes: list[str]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what `celebctl render --json` prints)."""
        return {
            "paths": [str(p) for p in self.paths],
            "grid": str(self.grid) if self.grid else None,
            "prompt": self.prompt,
            "expanded": self.expanded,
            "negative": self.negative,
            "negative_expanded": self.negative_expanded,
            "identities": list(self.identities),
            "basis_id": self.basis_id,
            "model": self.model,
            "seeds": list(self.seeds),
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "notes": list(self.notes),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def check_render_options(*, num_images: int, steps: int, guidance: float | None, scheduler: str,
                         seed: int, width: int | None, height: int | None,
                         batch_size: int | None) -> None:
    """Raise InvalidOption for a setting that cannot work, before anything loads."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise InvalidOption(f"--num-images must be between 1 and {MAX_IMAGES}.")
    if not whole(steps) or not 1 <= steps <= MAX_STEPS:
        raise InvalidOption(f"--steps must be between 1 and {MAX_STEPS}.")
    if batch_size is not None and (not whole(batch_size) or not 1 <= batch_size <= MAX_BATCH):
        raise InvalidOption(f"--batch-size must be between 1 and {MAX_BATCH}.")
    if guidance is not None and (not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise InvalidOption("--guidance must be a number >= 0 (10 for identities, 7.5 for "
                            "plain prompts by default; <= 1 turns classifier-free guidance off).")
    if scheduler not in SCHEDULERS:
        raise InvalidOption(f"Unknown scheduler '{scheduler}': use {', '.join(SCHEDULERS)}.")
    if not whole(seed) or not 0 <= seed or seed + num_images - 1 > MAX_SEED:
        raise InvalidOption(f"--seed must be between 0 and {MAX_SEED - num_images + 1}.")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (not whole(value) or value % 8
                                  or not MIN_SIZE <= value <= MAX_SIZE):
            raise InvalidOption(f"{flag} must be a multiple of 8 between {MIN_SIZE} and "
                                f"{MAX_SIZE}, not {value}.")


# Auto batch size (on CUDA): a conservative peak of one image at 512 x 512 in fp16 with
# classifier-free guidance (UNet on a doubled batch, then the VAE decoder), scaled by pixels.
BYTES_PER_IMAGE_512 = 1.5 * 2**30
MAX_AUTO_BATCH = 16
CPU_BATCH = 4


def auto_batch_size(components: Components, num_images: int, width: int, height: int) -> int:
    """As many images per batch as fit: on CUDA from the free memory, on a CPU a few."""
    if components.device.type != "cuda":
        return max(1, min(num_images, CPU_BATCH))
    import torch

    free, _ = torch.cuda.mem_get_info(components.device)
    per_image = BYTES_PER_IMAGE_512 * (width * height) / (512 * 512)
    fits = int(0.7 * free // per_image)
    return max(1, min(num_images, MAX_AUTO_BATCH, fits))


def render_dtype(dtype: str, device: Any) -> Any:
    """The dtype a render runs in: fp16 on CUDA unless asked otherwise (it measured fastest
    there, and SD 1.x's UNet and VAE are safe in fp16), fp32 on a CPU."""
    from . import models

    if str(dtype).strip().lower() == "auto" and models.resolve_device(device).type == "cuda":
        return models.resolve_dtype("fp16", device)
    return models.resolve_dtype(dtype, device)


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh diffusers scheduler of kind ``name`` (ddim, dpm, euler) from a model's config."""
    import diffusers

    from .models import quiet_libraries

    if name not in SCHEDULERS:
        raise InvalidOption(f"Unknown scheduler '{name}': use {', '.join(SCHEDULERS)}.")
    cls = getattr(diffusers, SCHEDULERS[name][0])
    with quiet_libraries():  # other schedulers' keys in the config are ignored, not news
        return cls.from_config(dict(config))


def identity_vectors_for(coefficients_by_name: dict[str, Any], basis: Any) -> dict[str, Any]:
    """name -> (2, hidden) fp32 token vectors, from each identity's (2, p) coefficients."""
    import torch

    from .prompting import identity_vectors

    vectors = {}
    for name, array in coefficients_by_name.items():
        coefficients = torch.from_numpy(array).to(torch.float32)
        if coefficients.shape[-1] != basis.p:
            raise BasisMismatch(f"Identity '{name}' has {coefficients.shape[-1]} coefficients "
                                f"per token but basis {basis.id} has {basis.p} components.")
        vectors[name] = identity_vectors(coefficients, basis.mean, basis.components)
    return vectors


@dataclass
class PromptEmbeds:
    """A prompt and its negative, encoded: (1, 77, width) each, plus SDXL's pooled (1, D)."""

    prompt: Any
    negative: Any
    pooled: Any = None
    negative_pooled: Any = None


def apply_emphasis(states, weights, widths: Sequence[int] | None = None):
    """The WebUI's emphasis on one chunk's states (1, 77, width): each position scaled by its
    weight, then rescaled so the mean is what it was (A1111's "Original" mode). With SDXL's
    two encoders side by side (``widths``), each encoder's part is rescaled on its own, as the
    WebUI weights each encoder's output separately."""
    import torch

    if all(w == 1.0 for w in weights):
        return states
    factors = torch.tensor(weights, device=states.device, dtype=states.dtype)[None, :, None]
    parts = []
    for part in torch.split(states, list(widths or [states.shape[-1]]), dim=-1):
        original = part.mean()
        scaled = part * factors
        new = scaled.mean()
        # With a mean of ~0 (a final layer norm without bias, as in the built-in tiny models)
        # the rescale would divide by ~0 or multiply by ~0: keep the scaled states as they are.
        size = float(part.abs().mean())
        if min(float(original.abs()), float(new.abs())) > 1e-4 * size:
            scaled = scaled * (original / new)
        parts.append(scaled)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def encode_prompt_pair(components: Components, plan: RenderPlan, vectors: dict[str, Any]
                       ) -> PromptEmbeds:
    """The prompt and negative prompt encoded by the model's text encoder(s), in its dtype.

    Each is encoded in 75-token chunks (one for a short prompt) with the WebUI's weights
    applied, and the chunks side by side; the shorter of the two is padded with empty chunks so
    both have the same length. A short unweighted prompt is encoded exactly as diffusers'
    pipelines encode it (bit for bit). Each encoder gets its slice of the identity vectors
    (:mod:`celebctl.models.families`); for SDXL an empty negative prompt is zeros, and the
    pooled embedding is the first chunk's.
    """
    import torch

    from .models import families
    from .prompting import ParsedPrompt, build_slot_tensors, tokenize_chunks

    encoders = components.text_encoders
    family = components.family
    width = sum(families.encoder_widths(encoders))
    injector = families.SlotInjector(encoders)
    dtype = encoders[0].dtype

    def encode(parsed: ParsedPrompt, label: str) -> list[tuple[Any, Any]]:
        per_tokenizer = [tokenize_chunks(parsed, tokenizer, label=label)
                         for tokenizer in components.tokenizers]
        chunks = []
        for index in range(len(per_tokenizer[0])):
            ids = []
            mask = values = None
            for windows in per_tokenizer:
                token_ids, mask, values = build_slot_tensors(
                    [windows[index]], vectors, width, device=components.device,
                    dtype=torch.float32)
                ids.append(token_ids)
            with torch.no_grad(), injector.attached():
                injector.set(mask, values)
                states, pooled = families.encode(family, encoders, ids)
            states = apply_emphasis(states, per_tokenizer[0][index].weights,
                                    families.encoder_widths(encoders))
            chunks.append((states.to(dtype), None if pooled is None else pooled.to(dtype)))
        return chunks

    prompt = encode(plan.prompt, "prompt")
    if not plan.negative.text and families.zero_empty_negative(family):
        negative = [(torch.zeros_like(s), None if p is None else torch.zeros_like(p))
                    for s, p in prompt]
    else:
        negative = encode(plan.negative, "negative prompt")
    count = max(len(prompt), len(negative))
    if len(prompt) < count or len(negative) < count:
        blank = encode(ParsedPrompt(text=""), "prompt")[0]  # what an empty chunk encodes to
        prompt += [blank] * (count - len(prompt))
        if not plan.negative.text and families.zero_empty_negative(family):
            blank = (torch.zeros_like(blank[0]), None)
        negative += [blank] * (count - len(negative))
    return PromptEmbeds(prompt=torch.cat([s for s, _ in prompt], dim=1),
                        negative=torch.cat([s for s, _ in negative], dim=1),
                        pooled=prompt[0][1], negative_pooled=negative[0][1])


def render_prompt(prompt: str, *, negative: str = "", num_images: int = 1, steps: int = 50,
                  guidance: float | None = None, scheduler: str = "ddim", seed: int = 0,
                  width: int | None = None, height: int | None = None,
                  batch_size: int | None = None,
                  model: str | ModelSpec | None = None, device: str = "auto",
                  dtype: str = "auto", out_dir: str | Path = DEFAULT_OUT_DIR,
                  grid: bool = False, progress: ProgressCallback | None = None,
                  components: Components | None = None,
                  on_file: Callable[[Path], None] | None = None,
                  person_noun: bool = True, capture: bool = True) -> RenderResult:
    """Render ``prompt`` (registered identities named in it) to PNG files in ``out_dir``.

    Image i uses seed ``seed + i``; images are denoised ``batch_size`` at a time. Everything
    that can be checked cheaply (options, prompt, identities, basis, token window) is checked
    before the model loads. ``components`` reuses already loaded model parts (``model``,
    ``device`` and ``dtype`` are then ignored). ``progress(phase, done, total, info)`` gets
    "render" with one count per denoising step per image; ``on_file(path)`` is called as each
    PNG is written, so a caller knows what exists if the render stops early. A failed write
    raises StorageError that names the images already written. ``guidance`` None means 10
    when the prompt names identities (the reference's value) and 7.5 otherwise;
    ``person_noun`` adds "person" after each identity, as in training. ``batch_size`` None
    picks as many images per batch as fit (:func:`auto_batch_size`); on CUDA the UNet is
    replayed as a CUDA graph unless ``capture`` is False. Returns what was written.
    """
    import torch

    from . import basis as basis_mod
    from . import models

    started = time.perf_counter()
    check_render_options(num_images=num_images, steps=steps, guidance=guidance,
                         scheduler=scheduler, seed=seed, width=width, height=height,
                         batch_size=batch_size)
    if components is not None:
        if model is not None and models.resolve_model_spec(model).ref != components.spec.ref:
            raise InvalidOption(f"The loaded components are {components.spec.ref}, not {model}.")
        model = components.spec
    plan = plan_render(prompt, negative, model,
                       tokenizer=components.tokenizer if components is not None else None,
                       person_noun=person_noun)
    if guidance is None:
        guidance = default_guidance(bool(plan.identities))
    if components is None:
        torch_device = models.resolve_device(device)
        dtype = render_dtype(dtype, torch_device)
    out_dir = _prepare_out_dir(Path(out_dir))
    # A single-file checkpoint's WebUI hash, computed while the model loads (cached after).
    model_hashing = filehash.BackgroundHash(
        plan.spec.path if plan.spec.kind == "single_file" else None)

    basis = basis_mod.load_basis(plan.basis_id) if plan.basis_id else None
    if components is None:
        components = models.load_pipeline_components(plan.spec, torch_device, dtype,
                                                     progress=progress)
    if basis is not None:
        basis_mod.check_model_matches_basis(basis, components.text_encoders,
                                            components.tokenizer, model_ref=plan.spec.ref)
    vectors = identity_vectors_for(plan.coefficients, basis) if basis is not None else {}
    embeds = encode_prompt_pair(components, plan, vectors)

    width = width or components.default_resolution
    height = height or components.default_resolution
    sampler = make_scheduler(scheduler, components.scheduler.config)
    seeds = [seed + i for i in range(num_images)]
    batch = batch_size or auto_batch_size(components, num_images, width, height)
    notes = list(plan.notes)
    unet_call = UNetCall(components.unet, capture=capture, note=notes.append)
    counter = {"done": 0, "total": num_images * steps}

    settings_base = {
        "prompt": plan.prompt.text,
        "negative_prompt": plan.negative.text,
        "expanded": plan.prompt.expanded(),
        "negative_expanded": plan.negative.expanded(),
        "webui_prompt": plan.prompt.expanded("webui"),
        "webui_negative": plan.negative.expanded("webui"),
        "steps": steps,
        "sampler": SCHEDULERS[scheduler][1],
        "scheduler": scheduler,
        "cfg_scale": float(guidance),
        "width": width,
        "height": height,
        "model": model_label(plan.spec),
        "basis_id": plan.basis_id,
        "identities": list(plan.identities),
        "person_noun": plan.person_noun,
        "celebctl_version": __version__,
    }
    model_hash = model_hashing.result()
    if model_hash:
        settings_base["model_hash"] = model_hash
    if plan.identities:
        settings_base["ti_hashes"] = embedding_hashes(plan.identities)
    paths: list[Path] = []
    images: list[Any] = []
    stem = prompt_slug(plan.prompt.plain())

    def save(stem_seed: str, data: bytes, image: bool = True) -> Path:
        try:
            path = write_new_user_file(out_dir, stem_seed, ".png", data)
        except StorageError as exc:
            if paths:
                raise StorageError(f"{exc} {len(paths)} image{'s' if len(paths) != 1 else ''} "
                                   "had been written before: "
                                   + ", ".join(str(p) for p in paths) + ".") from exc
            raise StorageError(f"{exc} No image was written.") from exc
        if image:
            paths.append(path)
        if on_file is not None:
            on_file(path)
        return path

    def encode_and_save(image: Any, image_seed: int) -> Path:
        return save(f"{stem}-{image_seed}", png_bytes(image, {**settings_base,
                                                               "seed": image_seed}))

    # PNGs of one batch are encoded and written by one worker thread, in order, while the next
    # batch denoises; a failed write stops the render at the next batch.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="celebctl-png") as writer:
        pending: list[Any] = []
        for start in range(0, num_images, batch):
            for future in pending:
                if future.done():
                    future.result()  # raises the write's error now
            batch_seeds = seeds[start:start + batch]
            done_before = counter["done"]

            def on_step(step: int, done_before: int = done_before,
                        count: int = len(batch_seeds)) -> None:
                counter["done"] = done_before + step * count
                if progress is not None:
                    progress("render", counter["done"], counter["total"], {})

            generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
            with models.quiet_libraries():
                batch_images = sample_images(
                    unet_call=unet_call, vae=components.vae, scheduler=sampler,
                    embeds=embeds, family=components.family,
                    generators=generators, steps=steps, guidance=guidance, height=height,
                    width=width, on_step=on_step)
            images += batch_images
            pending += [writer.submit(encode_and_save, image, image_seed)
                        for image_seed, image in zip(batch_seeds, batch_images, strict=True)]
        for future in pending:
            future.result()

    grid_path = None
    if grid:
        sheet_settings = {**settings_base, "seed": seeds[0], "seeds": seeds,
                          "files": [p.name for p in paths]}
        grid_path = save(f"{stem}-{seeds[0]}-grid",
                         png_bytes(contact_sheet(images), sheet_settings), image=False)
    if guidance <= 1 and plan.negative.text:
        notes.append("--guidance <= 1 turns classifier-free guidance off, so the negative "
                     "prompt has no effect.")
    return RenderResult(
        paths=paths, grid=grid_path, prompt=plan.prompt.text, expanded=plan.prompt.expanded(),
        negative=plan.negative.text, negative_expanded=plan.negative.expanded(),
        identities=list(plan.identities), basis_id=plan.basis_id, model=plan.spec.ref,
        seeds=seeds, width=width, height=height, steps=steps, guidance=float(guidance),
        scheduler=scheduler, notes=notes, elapsed_s=time.perf_counter() - started,
    )


__all__ = [
    "RenderPlan", "RenderResult", "SCHEDULERS", "contact_sheet", "image_parameters",
    "make_scheduler", "model_label", "noise_note", "plan_render", "png_bytes", "prompt_slug",
    "read_png_metadata", "render_prompt",
]
