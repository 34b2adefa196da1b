"""Loading a model's parts: tokenizer(s), text encoder(s), UNet, VAE and scheduler.

Every loading failure becomes :class:`ModelUnavailable` with a message that says how to supply
the model; torch, diffusers and transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CelebctlError, InvalidOption, ModelUnavailable
from .builtin import (
    _build_scheduler,
    _build_text_encoder,
    _build_unet,
    _build_vae,
    _discard_tiny_cache,
    ensure_tiny_model,
    sd15_text_config,
    sd15_unet_config,
    sd15_vae_config,
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
    TINY,
    TINY_RESOLUTION,
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
    """Tokenizer + text encoder only (what a basis needs); no UNet or VAE is loaded."""

    tokenizer: Any
    text_encoder: Any
    spec: ModelSpec
    device: torch.device


@dataclass
class Components:
    """Everything a fit or a render needs, on one device and dtype, frozen and in eval mode."""

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


def _load_pretrained_text(source: str, dtype: Any = None) -> tuple[Any, Any]:
    from transformers import CLIPTextModel, CLIPTokenizer

    # use_safetensors: never fall back to pickled .bin weights. dtype: the weights are read
    # straight into the dtype they will run in, never as a full fp32 copy first.
    kwargs = {"dtype": dtype} if dtype is not None else {}
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                 use_safetensors=True, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    return tokenizer, text_encoder


def _load_pretrained_all(source: str, dtypes: dict[str, Any] | None = None,
                         note: Any = None) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtypes = dtypes or {}
    note = note or (lambda part: None)

    def kwargs(part: str) -> dict[str, Any]:
        return {"torch_dtype": dtypes[part]} if dtypes.get(part) is not None else {}

    note("text encoder")
    tokenizer, text_encoder = _load_pretrained_text(source, dtypes.get("text_encoder"))
    note("UNet")
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True,
                                                **kwargs("unet"))
    note("VAE")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True,
                                        **kwargs("vae"))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae,
            "scheduler": _load_scheduler(source)}


def _load_tiny(text_only: bool, dtypes: dict[str, Any] | None = None,
               note: Any = None) -> dict[str, Any]:
    folder = ensure_tiny_model()
    try:
        return (dict(zip(("tokenizer", "text_encoder"), _load_pretrained_text(str(folder)),
                         strict=True))
                if text_only else _load_pretrained_all(str(folder), dtypes, note))
    except CelebctlError:
        raise
    except Exception:  # noqa: BLE001 - a damaged cache: rebuild it once
        _discard_tiny_cache()
        folder = ensure_tiny_model()
        if text_only:
            return dict(zip(("tokenizer", "text_encoder"), _load_pretrained_text(str(folder)),
                            strict=True))
        return _load_pretrained_all(str(folder))


def _load_parts(spec: ModelSpec, text_only: bool, dtypes: dict[str, Any] | None = None,
                note: Any = None) -> dict[str, Any]:
    """Load (or build) the model's parts on the CPU: folders and hub models straight in the
    ``dtypes`` given per part (name -> torch dtype), the others in fp32. ``note(part)`` is
    called as each part starts loading."""
    note = note or (lambda part: None)
    # Text-only loads of folders/hub ids never touch diffusers, so they skip its import cost.
    needs_diffusers = not text_only or spec.kind in (TINY, "single_file")
    with _loading(spec, include_diffusers=needs_diffusers):
        if spec.kind == TINY:
            parts = _load_tiny(text_only, dtypes, note)
        elif spec.kind == SD15_RANDOM:
            note("text encoder")
            parts = {"tokenizer": build_clip_tokenizer(),
                     "text_encoder": _build_text_encoder(sd15_text_config())}
            if not text_only:
                note("UNet")
                parts["unet"] = _build_unet(sd15_unet_config())
                note("VAE")
                parts.update(vae=_build_vae(sd15_vae_config()), scheduler=_build_scheduler())
        elif spec.kind == "single_file":
            assert spec.path is not None
            if not spec.path.is_file():
                raise unavailable(spec, "the file no longer exists")
            prefix = _sd1_text_prefix(spec.path) if text_only else None
            if prefix is not None:
                parts = {"tokenizer": build_clip_tokenizer(),
                         "text_encoder": _load_sd1_text_encoder_from_file(spec.path, prefix)}
            else:
                parts = _load_single_file_pipeline(spec.path)
        elif spec.kind in ("folder", "hub"):
            if spec.kind == "folder" and not (spec.path and spec.path.is_dir()):
                raise unavailable(spec, "the folder no longer exists")
            source = spec.ref
            parts = (dict(zip(("tokenizer", "text_encoder"), _load_pretrained_text(source),
                              strict=True))
                     if text_only else _load_pretrained_all(source, dtypes, note))
        else:  # pragma: no cover - ModelSpec is only made by resolve_model_spec
            raise InvalidOption(f"Unknown model kind {spec.kind!r}.")
        _check_tokenizer(spec, parts["tokenizer"], parts["text_encoder"])
    if text_only:
        parts = {k: parts[k] for k in ("tokenizer", "text_encoder")}
    return parts


def load_text_model(spec: str | ModelSpec | None = None,
                    device: str | torch.device = "cpu") -> TextModel:
    """Load only the tokenizer and text encoder (fp32, frozen, eval) — what a basis needs."""
    model_spec = resolve_model_spec(spec)
    dev = resolve_device(device)
    parts = _load_parts(model_spec, text_only=True)
    text_encoder = parts["text_encoder"]
    _freeze(text_encoder)
    with _loading(model_spec, include_diffusers=False):
        text_encoder.to(dev)
    return TextModel(tokenizer=parts["tokenizer"], text_encoder=text_encoder, spec=model_spec,
                     device=dev)


def _resolution_of(spec: ModelSpec, unet: Any, vae: Any) -> int:
    if spec.kind == TINY:
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
    modules = [parts["text_encoder"], parts["unet"], parts["vae"]]
    _freeze(*modules)
    with _loading(model_spec):
        parts["text_encoder"].to(device=dev, dtype=te_dt)
        for module in modules[1:]:
            module.to(device=dev, dtype=dt)
    if progress is not None:
        progress("load", 1, 1, {"model": model_spec.ref,
                                "seconds": time.perf_counter() - started})
    return Components(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], unet=parts["unet"],
        vae=parts["vae"], scheduler=parts["scheduler"], spec=model_spec, device=dev, dtype=dt,
        default_resolution=_resolution_of(model_spec, parts["unet"], parts["vae"]),
        is_noise_model=model_spec.is_noise_model, face_encoder=model_spec.face_encoder,
    )
