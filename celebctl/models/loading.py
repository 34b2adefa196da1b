"""Loading a model's parts: tokenizer(s), text encoder(s), UNet, VAE and scheduler.

Every loading failure becomes :class:`ModelUnavailable` with a message that says how to supply
the model; torch, diffusers and transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CelebctlError, InvalidOption, ModelUnavailable
from .architectures import (
    TINY_RESOLUTION,
    sd15_text_config,
    sd15_unet_config,
    sd15_vae_config,
    sdxl_text2_config,
    sdxl_text_config,
    sdxl_unet_config,
    sdxl_vae_config,
)
from .builtin import (
    _SEED_TEXT_2,
    _build_scheduler,
    _build_text_encoder,
    _build_unet,
    _build_vae,
    _discard_tiny_cache,
    ensure_tiny_model,
)
from .quiet import quiet_libraries
from .singlefile import (
    _load_sd1_text_encoder_from_file,
    _load_single_file_pipeline,
    _sd1_text_prefix,
)
from .specs import (
    SD15_RANDOM,
    SD_RESOLUTION,
    SDXL_RANDOM,
    TINY_KINDS,
    ModelSpec,
    resolve_device,
    resolve_dtype,
    resolve_model_spec,
)
from .tokenizers import build_clip_tokenizer, embedding_table

if TYPE_CHECKING:  # pragma: no cover
    import torch

@dataclass
class TextModel:
    """Tokenizer(s) + text encoder(s) only (what a basis needs); no UNet or VAE is loaded.

    SDXL has two of each; ``text_encoders`` lists them in order.
    """

    tokenizer: Any
    text_encoder: Any
    spec: ModelSpec
    device: torch.device
    family: str = "sd1"
    tokenizer_2: Any = None
    text_encoder_2: Any = None

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)


@dataclass
class Components:
    """Everything a fit or a render needs, on one device and dtype, frozen and in eval mode.

    ``family`` is "sd1", "sd2" or "sdxl"; SDXL also has ``tokenizer_2`` and ``text_encoder_2``.
    """

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    default_resolution: int
    is_noise_model: bool
    face_encoder: str
    family: str = "sd1"
    tokenizer_2: Any = None
    text_encoder_2: Any = None

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    def text_model(self) -> TextModel:
        """The text side of these components (to find or build their basis)."""
        return TextModel(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                         spec=self.spec, device=self.device, family=self.family,
                         tokenizer_2=self.tokenizer_2, text_encoder_2=self.text_encoder_2)


def _freeze(*modules: Any) -> None:
    for module in modules:
        module.eval()
        module.requires_grad_(False)





def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def unavailable(spec: ModelSpec, exc: BaseException | str) -> ModelUnavailable:
    """A ModelUnavailable whose message names the model and says how to supply it."""
    reason = exc if isinstance(exc, str) else _reason(exc)
    if spec.kind == "hub":
        return ModelUnavailable(
            f"Could not load model '{spec.ref}' ({reason}). To use it offline, download it once "
            f"with `hf download {spec.ref}` (or `huggingface-cli download {spec.ref}`) and run "
            "with HF_HUB_OFFLINE=1 (set HF_HOME if your Hugging Face cache lives elsewhere), or "
            "pass a local diffusers folder with --model PATH. `--model tiny` works offline."
        )
    if spec.kind == "folder":
        return ModelUnavailable(
            f"Could not load model folder {spec.ref} ({reason}). It must be a diffusers folder "
            "with tokenizer/, text_encoder/, unet/, vae/ and scheduler/ subfolders (as made by "
            "`hf download <repo>` or `save_pretrained`)."
        )
    if spec.kind == "single_file":
        return ModelUnavailable(
            f"Could not load checkpoint {spec.ref} ({reason}). Check that it is a complete SD "
            "checkpoint in .safetensors form; models other than SD 1.x need their configs from "
            "the Hugging Face cache (run once online, or HF_HUB_OFFLINE=1 with a populated "
            "cache / HF_HOME), or pass a diffusers folder instead."
        )
    return ModelUnavailable(f"Could not build the built-in model '{spec.ref}' ({reason}).")


@contextlib.contextmanager
def _loading(spec: ModelSpec, include_diffusers: bool = True):
    """Turn any failure inside a load into ModelUnavailable (no raw traceback for users)."""
    try:
        with quiet_libraries(include_diffusers):
            yield
    except CelebctlError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a load can fail in many libraries' own ways
        raise unavailable(spec, exc) from exc


def _check_tokenizer(spec: ModelSpec, tokenizer: Any, text_encoder: Any) -> None:
    # transformers 5 returns a near-empty tokenizer instead of failing when files are missing.
    size = len(tokenizer)
    rows = embedding_table(text_encoder).shape[0]
    if size < 1000 or size > rows:
        raise unavailable(spec, f"its tokenizer has {size} entries for {rows} embedding rows; "
                                "the tokenizer files are missing or damaged")





def _load_scheduler(source: str) -> Any:
    import diffusers

    config = diffusers.DDIMScheduler.load_config(source, subfolder="scheduler")
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDIMScheduler
    return cls.from_config(config)


TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def _load_pretrained_text(source: str, dtype: Any = None, second: bool = False
                          ) -> tuple[Any, Any]:
    """(tokenizer, text encoder) from a folder or hub id; ``second`` reads SDXL's pair."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # use_safetensors: never fall back to pickled .bin weights. dtype: the weights are read
    # straight into the dtype they will run in, never as a full fp32 copy first.
    kwargs = {"dtype": dtype} if dtype is not None else {}
    suffix = "_2" if second else ""
    cls = CLIPTextModelWithProjection if second else CLIPTextModel
    text_encoder = cls.from_pretrained(source, subfolder=f"text_encoder{suffix}",
                                       use_safetensors=True, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{suffix}")
    return tokenizer, text_encoder


def _pretrained_family(source: str) -> str:
    """The family of a diffusers folder or (cached) hub model, from its model_index.json."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(source)
    return "sdxl" if "text_encoder_2" in index else "sd1"


def _load_pretrained(source: str, text_only: bool, dtypes: dict[str, Any] | None = None,
                     note: Any = None) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtypes = dtypes or {}
    note = note or (lambda part: None)
    xl = _pretrained_family(source) == "sdxl"

    def kwargs(part: str) -> dict[str, Any]:
        return {"torch_dtype": dtypes[part]} if dtypes.get(part) is not None else {}

    note("text encoder" + (" 1" if xl else ""))
    parts: dict[str, Any] = dict(zip(("tokenizer", "text_encoder"), _load_pretrained_text(
        source, dtypes.get("text_encoder")), strict=True))
    if xl:
        note("text encoder 2")
        parts.update(zip(("tokenizer_2", "text_encoder_2"), _load_pretrained_text(
            source, dtypes.get("text_encoder"), second=True), strict=True))
    if text_only:
        return parts
    note("UNet")
    parts["unet"] = UNet2DConditionModel.from_pretrained(source, subfolder="unet",
                                                         use_safetensors=True, **kwargs("unet"))
    note("VAE")
    parts["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True,
                                                 **kwargs("vae"))
    parts["scheduler"] = _load_scheduler(source)
    return parts


def _load_tiny(name: str, text_only: bool, dtypes: dict[str, Any] | None = None,
               note: Any = None) -> dict[str, Any]:
    folder = ensure_tiny_model(name)
    try:
        return _load_pretrained(str(folder), text_only, dtypes, note)
    except CelebctlError:
        raise
    except Exception:  # noqa: BLE001 - a damaged cache: rebuild it once
        _discard_tiny_cache(name)
        folder = ensure_tiny_model(name)
        return _load_pretrained(str(folder), text_only, dtypes, note)


def _build_random(kind: str, text_only: bool, note: Any) -> dict[str, Any]:
    """The real SD 1.5 / SDXL architectures with seeded random weights, built on the CPU."""
    from .tokenizers import OPENCLIP_PAD_TOKEN

    xl = kind == SDXL_RANDOM
    note("text encoder")
    parts: dict[str, Any] = {
        "tokenizer": build_clip_tokenizer(),
        "text_encoder": _build_text_encoder(sdxl_text_config() if xl else sd15_text_config())}
    if xl:
        note("text encoder 2")
        parts.update(tokenizer_2=build_clip_tokenizer(OPENCLIP_PAD_TOKEN),
                     text_encoder_2=_build_text_encoder(sdxl_text2_config(), projection=True,
                                                        seed=_SEED_TEXT_2))
    if not text_only:
        note("UNet")
        parts["unet"] = _build_unet(sdxl_unet_config() if xl else sd15_unet_config())
        note("VAE")
        parts.update(vae=_build_vae(sdxl_vae_config() if xl else sd15_vae_config()),
                     scheduler=_build_scheduler())
    return parts


def family_of_parts(parts: dict[str, Any]) -> str:
    """sd1, sd2 or sdxl, from loaded parts: two text encoders make SDXL; a 1024-d one SD 2.x."""
    if parts.get("text_encoder_2") is not None:
        return "sdxl"
    width = embedding_table(parts["text_encoder"]).shape[1]
    return "sd2" if width == 1024 or parts["tokenizer"].pad_token == "!" else "sd1"


def _load_parts(spec: ModelSpec, text_only: bool, dtypes: dict[str, Any] | None = None,
                note: Any = None) -> dict[str, Any]:
    """Load (or build) the model's parts on the CPU: folders and hub models straight in the
    ``dtypes`` given per part (name -> torch dtype), the others in fp32. ``note(part)`` is
    called as each part starts loading."""
    note = note or (lambda part: None)
    # Text-only loads of folders/hub ids never touch diffusers' models, so they skip much of
    # its import cost.
    with _loading(spec, include_diffusers=True):
        if spec.kind in TINY_KINDS:
            parts = _load_tiny(spec.kind, text_only, dtypes, note)
        elif spec.kind in (SD15_RANDOM, SDXL_RANDOM):
            parts = _build_random(spec.kind, text_only, note)
        elif spec.kind == "single_file":
            assert spec.path is not None
            if not spec.path.is_file():
                raise unavailable(spec, "the file no longer exists")
            prefix = _sd1_text_prefix(spec.path) if text_only else None
            if prefix is not None:
                parts = {"tokenizer": build_clip_tokenizer(),
                         "text_encoder": _load_sd1_text_encoder_from_file(spec.path, prefix)}
            else:
                note("checkpoint")
                parts = _load_single_file_pipeline(spec.path, (dtypes or {}).get("unet"))
        elif spec.kind in ("folder", "hub"):
            if spec.kind == "folder" and not (spec.path and spec.path.is_dir()):
                raise unavailable(spec, "the folder no longer exists")
            parts = _load_pretrained(spec.ref, text_only, dtypes, note)
        else:  # pragma: no cover - ModelSpec is only made by resolve_model_spec
            raise InvalidOption(f"Unknown model kind {spec.kind!r}.")
        _check_tokenizer(spec, parts["tokenizer"], parts["text_encoder"])
        if parts.get("text_encoder_2") is not None:
            _check_tokenizer(spec, parts["tokenizer_2"], parts["text_encoder_2"])
    if text_only:
        parts = {k: parts[k] for k in TEXT_PARTS if parts.get(k) is not None}
    return parts


def load_text_model(spec: str | ModelSpec | None = None,
                    device: str | torch.device = "cpu") -> TextModel:
    """Load only the tokenizer and text encoder (fp32, frozen, eval) — what a basis needs."""
    model_spec = resolve_model_spec(spec)
    dev = resolve_device(device)
    parts = _load_parts(model_spec, text_only=True)
    encoders = [parts["text_encoder"], parts.get("text_encoder_2")]
    _freeze(*[e for e in encoders if e is not None])
    with _loading(model_spec, include_diffusers=False):
        for encoder in encoders:
            if encoder is not None:
                encoder.to(dev)
    return TextModel(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                     spec=model_spec, device=dev, family=family_of_parts(parts),
                     tokenizer_2=parts.get("tokenizer_2"),
                     text_encoder_2=parts.get("text_encoder_2"))


def _resolution_of(spec: ModelSpec, unet: Any, vae: Any) -> int:
    if spec.kind in TINY_KINDS:
        return TINY_RESOLUTION
    try:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * scale
    except (AttributeError, TypeError, ValueError):
        return SD_RESOLUTION


def load_pipeline_components(spec: str | ModelSpec | None = None,
                             device: str | torch.device = "auto",
                             dtype: str | torch.dtype = "auto",
                             text_encoder_dtype: str | torch.dtype | None = None,
                             progress: Any = None) -> Components:
    """Load tokenizer, text encoder, UNet, VAE and scheduler on ``device`` in ``dtype``.

    ``text_encoder_dtype`` overrides the text encoder's dtype (fits keep it fp32). All modules
    are in eval mode with gradients off. ``progress(phase, done, total, info)`` gets "load"
    before and after. Raises ModelUnavailable (with a message that says how to supply the
    model) for anything that cannot be loaded.
    """
    import time

    model_spec = resolve_model_spec(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    te_dt = dt if text_encoder_dtype is None else resolve_dtype(text_encoder_dtype, dev)
    started = time.perf_counter()

    def note(part: str) -> None:
        if progress is not None:
            progress("load", 0, 1, {"model": model_spec.ref, "part": part,
                                    "seconds": time.perf_counter() - started})

    note("")
    parts = _load_parts(model_spec, text_only=False,
                        dtypes={"text_encoder": te_dt, "unet": dt, "vae": dt}, note=note)
    encoders = [e for e in (parts["text_encoder"], parts.get("text_encoder_2")) if e is not None]
    _freeze(*encoders, parts["unet"], parts["vae"])
    with _loading(model_spec):
        for encoder in encoders:
            encoder.to(device=dev, dtype=te_dt)
        for module in (parts["unet"], parts["vae"]):
            module.to(device=dev, dtype=dt)
    if progress is not None:
        progress("load", 1, 1, {"model": model_spec.ref,
                                "seconds": time.perf_counter() - started})
    return Components(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], unet=parts["unet"],
        vae=parts["vae"], scheduler=parts["scheduler"], spec=model_spec, device=dev, dtype=dt,
        default_resolution=_resolution_of(model_spec, parts["unet"], parts["vae"]),
        is_noise_model=model_spec.is_noise_model, face_encoder=model_spec.face_encoder,
        family=family_of_parts(parts), tokenizer_2=parts.get("tokenizer_2"),
        text_encoder_2=parts.get("text_encoder_2"),
    )
