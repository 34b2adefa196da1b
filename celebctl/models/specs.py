"""Model specs: what the user typed -> a ModelSpec; devices and dtypes.

A model is named by a short spec: a Hugging Face repo id, a local diffusers folder, a
single-file ``.safetensors`` checkpoint, or a built-in model (:mod:`.builtin`). The model to use
for given identities is chosen here too (never from what a bundle says).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import paths
from ..errors import InvalidOption, ModelUnavailable
from ..storage import special_files
from .architectures import TINY_RESOLUTION

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"
TINY_SD2 = "tiny-sd2"
TINY_XL = "tiny-xl"
SD15_RANDOM = "sd15-random"
SDXL_RANDOM = "sdxl-random"
# Built-in models: name -> the Stable Diffusion family it stands in for.
BUILTIN_FAMILIES = {TINY: "sd1", TINY_SD2: "sd2", TINY_XL: "sdxl", SD15_RANDOM: "sd1",
                    SDXL_RANDOM: "sdxl"}
TINY_KINDS = (TINY, TINY_SD2, TINY_XL)
# Stable Diffusion families: name -> (label, default resolution in px).
FAMILIES = {"sd1": ("SD 1.x", 512), "sd2": ("SD 2.x", 768), "sdxl": ("SDXL", 1024)}
# Bump when the tiny model's architecture or seeds change, so old caches are not reused.
TINY_CACHE_NAME = "tiny-v2"
SD_RESOLUTION = 512

# Files that unpickle on load; we never load them (a checkpoint someone sent can run code).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFE_SUFFIXES = (".safetensors",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec.

    ``kind`` is a built-in name (``tiny``, ``tiny-sd2``, ``tiny-xl``, ``sd15-random``,
    ``sdxl-random``) or ``folder``, ``single_file``, ``hub``.
    ``source`` is what the user typed, ``ref`` the stable string recorded in metadata (the
    repo id for hub models, the absolute path for folders and files), ``path`` the local path
    for folders and files.
    """

    kind: str
    source: str
    ref: str
    path: Path | None = None

    @property
    def is_noise_model(self) -> bool:
        """True for the built-in random models: their images are noise."""
        return self.kind in BUILTIN_FAMILIES

    @property
    def default_resolution(self) -> int:
        """Default image size in pixels (64 for the tiny models so tests are fast)."""
        if self.kind in TINY_KINDS:
            return TINY_RESOLUTION
        family = self.family
        return FAMILIES[family][1] if family else SD_RESOLUTION

    @property
    def family(self) -> str | None:
        """The Stable Diffusion family, when it is known without loading anything: built-ins,
        folders (their model_index.json) and single files (their tensor names). None for a
        hub id that is not in the local cache."""
        if self.kind in BUILTIN_FAMILIES:
            return BUILTIN_FAMILIES[self.kind]
        return family_on_disk(self)

    @property
    def face_encoder(self) -> str:
        """Which face encoder fits with this model: random weights for the noise models."""
        return "random-init" if self.is_noise_model else "vggface2"

    def __str__(self) -> str:
        return self.ref


MAX_CONFIG_BYTES = 1024 * 1024


def read_config_file(error: type[Exception] = InvalidOption) -> dict[str, Any]:
    """The user's config file (``config.toml`` in the data home) as a dict, {} when there is
    none; ``error`` (a CelebctlError class) names the file when it cannot be read. Every
    config key is read through this one function."""
    from .. import documents

    config = paths.config_path()
    if not os.path.lexists(config):
        return {}
    try:
        return documents.parse_toml(special_files.read_regular_file(config, MAX_CONFIG_BYTES))
    except (OSError, ValueError) as exc:
        raise error(f"Could not read the config file {config}: {exc}. Fix or delete it."
                    ) from exc


def configured_model() -> str | None:
    """The ``default_model`` the user set in the config file, or None when there is none."""
    config = paths.config_path()
    data = read_config_file()
    value = data.get("default_model")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidOption(
            f"`default_model` in {config} must be a non-empty string, not {str(value)[:40]!r}."
        )
    return value


def configured_default_model() -> str:
    """The ``default_model`` from the config file, else SD 1.5."""
    return configured_model() or DEFAULT_MODEL


def configured_sampling() -> tuple[str | None, str | None]:
    """The ``sampler`` and ``schedule`` the user set in the config file (WebUI names, e.g.
    ``sampler = "DPM++ 2M"`` and ``schedule = "Karras"``), each None when not set. Both are
    checked here, so a typo is named with the file before anything loads."""
    from .. import samplers

    config = paths.config_path()
    data = read_config_file()
    if not data:
        return None, None
    values: list[str | None] = []
    for key in ("sampler", "schedule"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidOption(f"`{key}` in {config} must be a non-empty string (a WebUI "
                                f"name, e.g. \"DPM++ 2M\"), not {str(value)[:40]!r}.")
        values.append(value)
    sampler, schedule = values
    try:
        if sampler is not None:
            samplers.choice(sampler, schedule)
        elif schedule is not None:
            samplers.find_schedule(schedule)
    except samplers.SamplerError as exc:
        raise samplers.SamplerError(f"In the config file {config}: {exc}") from None
    return sampler, schedule


def model_for_identities(model: str | ModelSpec | None, basis_info: Any,
                         recorded: dict[str, str]) -> tuple[ModelSpec, list[str]]:
    """Which model to load for identities on ``basis_info``, and notes for the user.

    An identity's recorded model is information, never an instruction: it may come from a
    bundle a stranger made. The model is the one the user names (``model``, else the config's
    ``default_model``), else the one this machine built the identities' basis from, else the
    default (SD 1.5). ``recorded`` maps identity name -> the model its metadata names; a note
    says so when that differs from what is loaded.
    """
    if model is not None:
        spec, why = resolve_model_spec(model), "given with --model"
    elif configured_model() is not None:
        spec, why = resolve_model_spec(configured_model()), "the config's default_model"
    elif basis_info is not None and getattr(basis_info, "built_here", False):
        spec, why = resolve_model_spec(basis_info.model), "the model their basis was built from"
    else:
        spec, why = resolve_model_spec(DEFAULT_MODEL), "the default model"
    notes = []
    others = {name: ref for name, ref in recorded.items() if ref and ref != spec.ref}
    if others:
        listed = "; ".join(f"{name}: {ref!r}" for name, ref in sorted(others.items()))
        notes.append(f"The identities' metadata names another model ({listed}); loading "
                     f"{spec.ref} ({why}). Its embedding table is checked against their basis "
                     "when it loads; pass --model to choose.")
    return spec, notes


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("./", "../", "/", "~", ".\\"))
        or text.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)
        or (os.sep == "\\" and len(text) > 2 and text[1] == ":")
    )


def _pickle_refusal(path: Path) -> ModelUnavailable:
    return ModelUnavailable(
        f"Refusing to load {path}: '{path.suffix}' files are Python pickles, which can run code "
        "when loaded, and celebctl never unpickles user files. Convert it to .safetensors once "
        "in a trusted environment (for example with diffusers' conversion scripts or "
        "`safetensors.torch.save_file`) and pass the .safetensors file, or use a diffusers folder."
    )


def family_on_disk(spec: ModelSpec) -> str | None:
    """The family of a local model read from its files (cheap: JSON or a tensor header)."""
    import json

    try:
        if spec.kind == "folder" and spec.path is not None:
            index = json.loads(special_files.read_regular_file(spec.path / "model_index.json",
                                                         1 << 20))
            if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
                return "sdxl"
            config = json.loads(special_files.read_regular_file(
                spec.path / "text_encoder" / "config.json", 1 << 20))
            return "sd2" if int(config.get("hidden_size", 768)) == 1024 else "sd1"
        if spec.kind == "single_file" and spec.path is not None:
            from .singlefile import single_file_family

            return single_file_family(spec.path)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def check_safetensors_header(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header cannot be read (a partial download, another
    format renamed) with a message, before anything tries to load it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        reason = str(exc).strip() or type(exc).__name__
        raise ModelUnavailable(
            f"{path} is not a readable .safetensors checkpoint ({reason}). A download may "
            "have stopped early: check its size and checksum, or pass another --model."
        ) from exc


# The text encoders' widths of the built-in models (from their configs, without building them).
BUILTIN_WIDTHS = {TINY: [32], TINY_SD2: [48], TINY_XL: [32, 48], SD15_RANDOM: [768],
                  SDXL_RANDOM: [768, 1280]}
_SINGLE_FILE_TABLES = (
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",),
    ("cond_stage_model.transformer.embeddings.token_embedding.weight",),
    ("cond_stage_model.model.token_embedding.weight",),
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
     "conditioner.embedders.1.model.token_embedding.weight"),
)


def text_widths(spec: ModelSpec) -> list[int] | None:
    """The token-embedding width of each of a model's text encoders, read cheaply (configs,
    a checkpoint's tensor header, the Hugging Face cache), or None when that needs a download
    or a load. Lets a mismatch with an identity's basis be refused before anything loads."""
    import json

    def config_width(path: Path) -> int:
        return int(json.loads(special_files.read_regular_file(path, 1 << 20))["hidden_size"])

    try:
        if spec.kind in BUILTIN_WIDTHS:
            return list(BUILTIN_WIDTHS[spec.kind])
        if spec.kind == "folder" and spec.path is not None:
            widths = [config_width(spec.path / "text_encoder" / "config.json")]
            second = spec.path / "text_encoder_2" / "config.json"
            if second.exists():
                widths.append(config_width(second))
            return widths
        if spec.kind == "single_file" and spec.path is not None:
            from safetensors import safe_open

            with safe_open(str(spec.path), framework="pt") as handle:
                keys = set(handle.keys())
                for names in _SINGLE_FILE_TABLES:
                    if all(name in keys for name in names):
                        return [int(handle.get_slice(n).get_shape()[1]) for n in names]
            return None
        if spec.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            widths = []
            for folder in ("text_encoder", "text_encoder_2"):
                cached = try_to_load_from_cache(spec.ref, f"{folder}/config.json")
                if isinstance(cached, str):
                    widths.append(config_width(Path(cached)))
            return widths or None
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None
    return None


def resolve_model_spec(spec: str | ModelSpec | None) -> ModelSpec:
    """Turn what the user typed (or the configured default for None) into a :class:`ModelSpec`.

    Raises ModelUnavailable for a missing path or a pickle checkpoint and InvalidOption for a
    spec that is neither a path, a repo id nor a built-in name.
    """
    if isinstance(spec, ModelSpec):
        return spec
    text = (configured_default_model() if spec is None else spec).strip()
    if not text:
        raise InvalidOption("The model spec is empty; pass a repo id, a path or a built-in "
                            "model (`tiny`, `tiny-sd2`, `tiny-xl`, `sd15-random`, "
                            "`sdxl-random`).")
    if text in BUILTIN_FAMILIES:
        return ModelSpec(kind=text, source=text, ref=text)

    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return ModelSpec(kind="folder", source=text, ref=str(path), path=path)
        suffix = path.suffix.lower()
        if not special_files.is_regular_file(path):
            raise ModelUnavailable(f"{path} is not a regular file (a pipe, device or socket); "
                                   "pass a diffusers folder or a .safetensors checkpoint.")
        if suffix in SAFE_SUFFIXES:
            check_safetensors_header(path)
            return ModelSpec(kind="single_file", source=text, ref=str(path), path=path)
        if suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        raise ModelUnavailable(
            f"{path} is not a model celebctl can load: pass a diffusers folder or a single-file "
            ".safetensors checkpoint."
        )
    if _looks_like_path(text):
        raise ModelUnavailable(
            f"Model path {text} does not exist. Check the path, or pass a Hugging Face repo id "
            "(owner/name) or a built-in model such as `tiny`."
        )
    if _HUB_ID.match(text):
        return ModelSpec(kind="hub", source=text, ref=text)
    raise InvalidOption(
        f"'{text}' is not a model spec: pass a Hugging Face repo id (owner/name), a local "
        "diffusers folder, a .safetensors checkpoint or a built-in model (`tiny`, `tiny-sd2`, "
        "`tiny-xl`, `sd15-random`, `sdxl-random`)."
    )


# ---- device and dtype


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto|cpu|cuda|cuda:N|mps`` -> torch.device (auto: cuda, else mps, else cpu)."""
    import torch

    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not mps_ok:
            raise InvalidOption("--device mps was asked for but MPS (Apple GPU) is not "
                                "available here; use --device cpu or auto.")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            raise InvalidOption(
                f"--device {text} was asked for but no CUDA GPU is available (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). "
                "Use --device cpu or auto."
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise InvalidOption(f"--device {text}: there are only {count} CUDA device(s) "
                                f"(cuda:0..cuda:{count - 1}).")
        return torch.device("cuda", index)
    raise InvalidOption(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.")


_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def resolve_dtype(name: str | torch.dtype = "auto",
                  device: str | torch.device = "cpu") -> torch.dtype:
    """``auto|fp32|fp16|bf16`` -> torch.dtype. auto: fp32 off CUDA; on CUDA bf16 where the
    device asked for has native bf16 (compute capability 8.0 or newer: A100, H100, RTX 30xx
    on), else fp16."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            # Not torch.cuda.is_bf16_supported(): it says yes where bf16 is only emulated
            # (V100, T4: slower than fp16) and asks about the current device, not this one.
            major, _minor = torch.cuda.get_device_capability(dev)
            return torch.bfloat16 if major >= 8 else torch.float16
        return torch.float32
    if text in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[text])
    raise InvalidOption(f"Unknown dtype '{name}': use auto, fp32, fp16 or bf16.")
