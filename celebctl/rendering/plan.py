"""A render request checked without loading a model: options, identities, basis, model, tokens."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import emphasis, samplers
from ..clipskip import render_clip_skip
from ..errors import BasisMismatch, InvalidOption, PromptError
from ..prompting import (
    CHUNK_TOKENS,
    ParsedPrompt,
    parse_prompt,
    tokenize_chunks,
    with_person_nouns,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelSpec

# --scheduler value (of earlier releases; celebctl.samplers has them all) -> (diffusers class,
# the name the WebUI writes as "Sampler").
SCHEDULERS = {
    "ddim": ("DDIMScheduler", "DDIM"),
    "dpm": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "euler": ("EulerDiscreteScheduler", "Euler"),
}
# What check_render_options accepts.
MAX_IMAGES = 1000
MAX_STEPS = 1000
MAX_BATCH = 64
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_SEED = 2**63 - 1
# Guidance far past this only burns the image (the WebUI's slider stops at 30); at 1e308 the
# guided noise overflowed to an all-black picture.
MAX_GUIDANCE = 100.0
# Classifier-free guidance when --guidance is not given: the reference samples identities at 10;
# prompts without an identity keep diffusers' usual 7.5.
IDENTITY_GUIDANCE = 10.0
PLAIN_GUIDANCE = 7.5


def default_guidance(names_identities: bool) -> float:
    """The guidance scale used when none is given (docs/method.md, "Rendering")."""
    return IDENTITY_GUIDANCE if names_identities else PLAIN_GUIDANCE


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
    clip_skip: int = 1  # the text encoder layer the prompts are read at (WebUI numbering)
    loras: list[Any] = field(default_factory=list)  # checked loras.LoraUse, in order

    @property
    def model(self) -> str:
        """The model's stable reference (repo id, absolute path, `tiny`, ...)."""
        return self.spec.ref

    def pads_conds(self, guidance: float) -> bool:
        """True when the render pads the shorter of prompt and negative with empty chunks (the
        WebUI writes "Pad conds: True" then): their chunk counts differ and guidance uses the
        negative. An empty SDXL negative is zeros of the prompt's length, never padded."""
        from ..models import families

        if guidance <= 1 or len(self.chunks) == len(self.negative_chunks):
            return False
        return not (not self.negative.text
                    and families.zero_empty_negative(self.spec.family or ""))

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
            "clip_skip": self.clip_skip,
            "loras": [{"name": u.name, "weight": u.weight, "path": str(u.path)}
                      for u in self.loras],
            "notes": list(self.notes),
        }


@functools.lru_cache(maxsize=1)
def _packaged_tokenizer() -> tuple[Any, str]:
    """The packaged CLIP tokenizer and its sha256, built once per process (never mutated)."""
    from ..models.lighttokenizer import PACKAGED_TOKENIZER_SHA256, packaged_plan_tokenizer

    # The same tokenizer without importing transformers (planning must stay light: #24).
    return packaged_plan_tokenizer(), PACKAGED_TOKENIZER_SHA256


def _tokenizer_for_plan(spec: ModelSpec) -> tuple[Any, str | None]:
    """A tokenizer to count tokens with, and its sha256 when it is the model's own.

    SD 1.x models use the packaged CLIP tokenizer; a local folder's own tokenizer is read when
    present (a tokenizer is a vocabulary, not a torch model).
    """
    from .. import models

    if spec.kind == "folder" and spec.path is not None and (spec.path / "tokenizer").is_dir():
        from ..models.lighttokenizer import folder_plan_tokenizer

        light = folder_plan_tokenizer(spec.path / "tokenizer")
        if light is not None:
            return light, models.tokenizer_sha256(light)
        with contextlib.suppress(Exception), models.quiet_libraries(include_diffusers=False):
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(str(spec.path / "tokenizer"))
            return tokenizer, models.tokenizer_sha256(tokenizer)
    tokenizer, sha = _packaged_tokenizer()
    return tokenizer, sha if spec.kind in models.BUILTIN_FAMILIES else None


def check_families(idents: Sequence[Any], spec: Any = None, command: str = "render") -> None:
    """Refuse identities of different Stable Diffusion families together, and identities of
    another family than the model's (when the model's family is known without loading)."""
    from ..models import families

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


def check_records_match_basis(idents: Sequence[Any], info: Any) -> None:
    """Refuse identities whose record cannot belong to their basis (an identity.toml edited to
    name another family's basis): no model choice could render them, so say what is wrong."""
    from ..basis import identity_mismatch

    if info is None:
        return
    for ident in idents:
        problem = identity_mismatch(info, ident.meta)
        if problem is not None:
            raise BasisMismatch(
                f"'{ident.name}' does not match its basis: {problem}. Its identity.toml was "
                "edited or came from a damaged bundle (`celebctl doctor` lists such "
                f"identities); re-import the bundle, or re-add it (`celebctl add {ident.name} "
                "PHOTO --replace --model MODEL`).")


def check_widths(idents: Sequence[Any], info: Any, spec: Any, command: str = "render"
                 ) -> None:
    """Refuse, before loading, a model whose text encoders are not as wide as the identities'
    basis (known from the model's configs or file header), naming the fix that works."""
    from .. import models

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


def shared_basis(idents: Sequence[Any], command: str = "render") -> str | None:
    """The one basis every identity uses (None for none); BasisMismatch naming each identity's
    basis when they differ. The one check `render`, `eval` and `joint` make."""
    bases = {ident.basis_id for ident in idents}
    if len(bases) > 1:
        detail = ", ".join(f"{i.name}: {i.basis_id}" for i in idents)
        together = ("rendered together" if command == "render"
                    else f"used together by `{command}`")
        raise BasisMismatch(
            f"The identities use different bases ({detail}), so they cannot be {together}: "
            "they were fitted with different models. Re-add the odd ones out with the others' "
            f"model (`celebctl add NAME PHOTO --replace --model MODEL`), then {command} again."
        )
    return bases.pop() if bases else None


_shared_basis = shared_basis  # the name earlier releases exported


def plan_render(prompt: str, negative: str = "", model: str | ModelSpec | None = None, *,
                tokenizer: Any = None, person_noun: bool = True,
                clip_skip: int | None = None, loras: Sequence[Any] = (),
                lora_dir: Any = None) -> RenderPlan:
    """Parse and check a render request without loading any model.

    Finds the registered identities named in ``prompt`` and ``negative``, checks they share one
    basis, picks the model (``model``; else the identities' recorded model when they agree; else
    the configured default) and counts tokens against the 77-token window with the model's
    tokenizer where it is known without loading (the packaged CLIP tokenizer for SD 1.x), or
    with ``tokenizer`` when given (an already loaded model's). With ``person_noun`` each
    identity is followed by "person" as in training (:func:`prompting.with_person_nouns`).
    ``clip_skip`` None reads the layer the identities were fitted at (else the config's for the
    model, else 1; :func:`celebctl.clipskip.render_clip_skip`).
    The prompt's ``<lora:NAME:WEIGHT>`` tags and ``loras`` (``--lora FILE[:WEIGHT]`` values or
    :class:`loras.LoraRequest`) are found (NAME in ``lora_dir``, see :func:`loras.lora_folder`)
    and checked against the model from their headers (:func:`loras.resolve_loras`).
    Raises PromptError, IdentityNotFound, BasisMismatch, BasisNotFound, ModelUnavailable or
    LoraError.
    """
    from .. import basis as basis_mod
    from .. import models, registry

    known = registry.known_names()
    prompt, lora_requests = lora_requests_of(prompt, negative, loras)
    parsed = parse_prompt(prompt, known)
    parsed_negative = parse_prompt(negative or "", known, allow_empty=True,
                                   label="negative prompt")
    if person_noun:
        parsed, parsed_negative = with_person_nouns(parsed), with_person_nouns(parsed_negative)
    names = list(dict.fromkeys(parsed.identities + parsed_negative.identities))
    # One consistent read: never a partner refitted by a `joint` half-way through its write.
    idents = registry.read_identity_set(names)
    check_families(idents)
    basis_id = _shared_basis(idents)
    info = basis_mod.info_for_identities(basis_id, names) if basis_id else None
    check_records_match_basis(idents, info)
    spec, notes = models.model_for_identities(
        model, info, {i.name: str(i.meta.get("model", "")) for i in idents})
    check_families(idents, spec)
    check_widths(idents, info, spec)
    clip_skip, clip_notes = render_clip_skip(clip_skip, idents, spec)
    notes += clip_notes

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
    notes += unsupported_syntax_notes(prompt, negative or "")
    if spec.is_noise_model:
        notes.append(noise_note(spec))
    from ..loras import resolve_loras

    uses = resolve_loras(lora_requests, spec, lora_dir) if lora_requests else []
    return RenderPlan(prompt=parsed, negative=parsed_negative, identities=names,
                      basis_id=basis_id, spec=spec,
                      token_count=sum(c.length - 2 for c in chunks),
                      negative_token_count=sum(c.length - 2 for c in negative_chunks),
                      max_tokens=CHUNK_TOKENS * len(chunks),
                      notes=notes, coefficients={i.name: i.load_coefficients() for i in idents},
                      person_noun=person_noun, chunks=[c.length - 2 for c in chunks],
                      negative_chunks=[c.length - 2 for c in negative_chunks],
                      clip_skip=clip_skip, loras=uses)


def lora_requests_of(prompt: str, negative: str, options: Sequence[Any] = ()
                     ) -> tuple[str, list[Any]]:
    """``prompt`` without its LoRA tags, and the LoRAs asked for: the tags', then
    ``options``' (``FILE[:WEIGHT]`` strings or :class:`loras.LoraRequest`). A tag in the
    negative prompt is refused: a LoRA changes the model for both, so it goes in the prompt."""
    from .. import loras

    if loras.has_tags(negative):
        raise PromptError("The negative prompt has a <lora:...> tag; LoRAs go in the prompt "
                          "(or --lora FILE[:WEIGHT]).")
    if not loras.has_tags(prompt) and not options:
        return prompt, []
    stripped, requests = loras.split_tags(prompt)
    requests += [o if isinstance(o, loras.LoraRequest) else loras.parse_lora_option(o)
                 for o in options]
    return stripped, requests


def unsupported_syntax_notes(prompt: str, negative: str = "") -> list[str]:
    """A note for each WebUI feature the prompt or negative uses that celebctl reads as plain
    text (:func:`emphasis.unsupported_syntax`): the render goes on, but not as the WebUI's."""
    notes = []
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        for what in emphasis.unsupported_syntax(text):
            notes.append(f"The {label} uses the WebUI's {what}, which celebctl does not "
                         "support: it is read as plain text (brackets still weight it), so the "
                         "image differs from the WebUI's.")
    return notes


def noise_note(spec: ModelSpec) -> str:
    """The note for models with random weights."""
    return (f"'{spec.ref}' has random weights: its images are noise; use --model with real "
            "weights for real pictures.")


def check_render_options(*, num_images: int, steps: int, guidance: float | None,
                         scheduler: str | samplers.SamplerChoice | None,
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
    if guidance is not None and (isinstance(guidance, bool)
                                 or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)
                                 or not 0 <= guidance <= MAX_GUIDANCE):
        raise InvalidOption(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g} (10 for "
                            "identities, 7.5 for plain prompts by default; useful values lie "
                            "between about 5 and 15; <= 1 turns classifier-free guidance off).")
    if scheduler is not None and not isinstance(scheduler, samplers.SamplerChoice):
        samplers.legacy_choice(scheduler)  # the older --scheduler value
    if not whole(seed) or not 0 <= seed or seed + num_images - 1 > MAX_SEED:
        raise InvalidOption(f"--seed must be between 0 and {MAX_SEED - num_images + 1}.")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (not whole(value) or value % 8
                                  or not MIN_SIZE <= value <= MAX_SIZE):
            raise InvalidOption(f"{flag} must be a multiple of 8 between {MIN_SIZE} and "
                                f"{MAX_SIZE}, not {value}.")
