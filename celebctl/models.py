"""Model specs -> loaded components.

A model is named by a short spec: a Hugging Face repo id, a local diffusers folder, a single-file
``.safetensors`` checkpoint, ``tiny`` (a small seeded model built in code, cached in the data home,
for offline tests) or ``sd15-random`` (the real SD 1.5 architecture with seeded random weights, for
speed and memory work). Every loading failure becomes :class:`ModelUnavailable` with a message
that says how to supply the model; torch, diffusers and transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths, storage
from .errors import CelebctlError, InvalidOption, ModelUnavailable, StorageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"
SD15_RANDOM = "sd15-random"
# Bump when the tiny model's architecture or seeds change, so old caches are not reused.
TINY_CACHE_NAME = "tiny-v2"
TINY_RESOLUTION = 64
SD_RESOLUTION = 512

# Files that unpickle on load; we never load them (a checkpoint someone sent can run code).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFE_SUFFIXES = (".safetensors",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# OpenAI CLIP's BPE file: 1 header line, then merges; CLIP uses the first 49152-256-2 of them.
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec.

    ``kind`` is one of ``tiny``, ``sd15-random``, ``folder``, ``single_file``, ``hub``.
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
        return self.kind in (TINY, SD15_RANDOM)

    @property
    def default_resolution(self) -> int:
        """Default image size in pixels (64 for ``tiny`` so tests are fast, else 512)."""
        return TINY_RESOLUTION if self.kind == TINY else SD_RESOLUTION

    @property
    def face_encoder(self) -> str:
        """Which face encoder fits with this model: random weights for the noise models."""
        return "random-init" if self.is_noise_model else "vggface2"

    def __str__(self) -> str:
        return self.ref


MAX_CONFIG_BYTES = 1024 * 1024


def configured_model() -> str | None:
    """The ``default_model`` the user set in the config file, or None when there is none."""
    from . import documents

    config = paths.config_path()
    if not os.path.lexists(config):
        return None
    try:
        data = documents.parse_toml(storage.read_regular_file(config, MAX_CONFIG_BYTES))
    except (OSError, ValueError) as exc:
        raise InvalidOption(
            f"Could not read the config file {config}: {exc}. Fix or delete it."
        ) from exc
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


def resolve_model_spec(spec: str | ModelSpec | None) -> ModelSpec:
    """Turn what the user typed (or the configured default for None) into a :class:`ModelSpec`.

    Raises ModelUnavailable for a missing path or a pickle checkpoint and InvalidOption for a
    spec that is neither a path, a repo id nor a built-in name.
    """
    if isinstance(spec, ModelSpec):
        return spec
    text = (configured_default_model() if spec is None else spec).strip()
    if not text:
        raise InvalidOption("The model spec is empty; pass a repo id, a path, `tiny` or "
                            "`sd15-random`.")
    if text == TINY:
        return ModelSpec(kind=TINY, source=text, ref=TINY)
    if text == SD15_RANDOM:
        return ModelSpec(kind=SD15_RANDOM, source=text, ref=SD15_RANDOM)

    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return ModelSpec(kind="folder", source=text, ref=str(path), path=path)
        suffix = path.suffix.lower()
        if not storage.is_regular_file(path):
            raise ModelUnavailable(f"{path} is not a regular file (a pipe, device or socket); "
                                   "pass a diffusers folder or a .safetensors checkpoint.")
        if suffix in SAFE_SUFFIXES:
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
            "(owner/name), `tiny` or `sd15-random`."
        )
    if _HUB_ID.match(text):
        return ModelSpec(kind="hub", source=text, ref=text)
    raise InvalidOption(
        f"'{text}' is not a model spec: pass a Hugging Face repo id (owner/name), a local "
        "diffusers folder, a .safetensors checkpoint, `tiny` or `sd15-random`."
    )


# --------------------------------------------------------------------------------------------
# Device and dtype


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
    """``auto|fp32|fp16|bf16`` -> torch.dtype. auto: bf16 (or fp16) on CUDA, fp32 elsewhere."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if text in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[text])
    raise InvalidOption(f"Unknown dtype '{name}': use auto, fp32, fp16 or bf16.")


# --------------------------------------------------------------------------------------------
# Tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map, in its order (the first 256 vocab entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, rebuilt from the packaged BPE file."""
    raw = resources.files("celebctl").joinpath("data", _BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:_NUM_MERGES + 1])
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE:  # pragma: no cover - a damaged package
        raise ModelUnavailable(f"The packaged CLIP vocabulary has {len(vocab)} entries, "
                               f"not {CLIP_VOCAB_SIZE}; reinstall celebctl.")
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer() -> Any:
    """The real CLIP ViT-L/14 tokenizer (SD 1.x), built offline from the packaged BPE merges."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5's tokenizers-backed CLIPTokenizer takes the vocab and merges in memory.
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m) for m in merges], bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        model_max_length=CLIP_MAX_LENGTH,
    )


def _tokenizer_merges(tokenizer: Any) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = model.get("merges", [])
        return [m if isinstance(m, str) else " ".join(m) for m in merges]
    ranks = getattr(tokenizer, "bpe_ranks", None)  # slow tokenizers
    if ranks:
        return [" ".join(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return []


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (sorted JSON) and its merges list."""
    digest = hashlib.sha256()
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False)
                  .encode("utf-8"))
    digest.update(b"\0")
    digest.update("\n".join(_tokenizer_merges(tokenizer)).encode("utf-8"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Embedding table helpers


def embedding_table(text_encoder: Any) -> torch.Tensor:
    """The text encoder's input token-embedding table (vocab, hidden), without a copy."""
    return text_encoder.get_input_embeddings().weight


def embedding_table_sha256(table: Any) -> str:
    """sha256 of the table's shape and its fp32 contiguous CPU bytes."""
    import torch

    data = table.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256()
    digest.update(("fp32:" + "x".join(str(n) for n in data.shape) + ";").encode("ascii"))
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Loaded models


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


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for a block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---- configs written in code


def _tiny_text_config() -> dict[str, Any]:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def _tiny_unet_config() -> dict[str, Any]:
    # sample_size 8 latents x 8 (VAE) = the 64 px default resolution.
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


def _tiny_vae_config() -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                layers_per_block=1, latent_channels=4, norm_num_groups=16,
                sample_size=TINY_RESOLUTION, scaling_factor=0.18215)


def _sd_scheduler_config() -> dict[str, Any]:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                steps_offset=1, prediction_type="epsilon")


def sd15_text_config() -> dict[str, Any]:
    """CLIP ViT-L/14's text tower as used by SD 1.x."""
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def sd15_unet_config() -> dict[str, Any]:
    """The SD 1.5 UNet."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                act_fn="silu", center_input_sample=False, downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
                norm_eps=1e-5)


def sd15_vae_config() -> dict[str, Any]:
    """The SD 1.x VAE."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215, act_fn="silu")


# Separate seeds per module, so a text-only load gives the same encoder as a full load.
_SEED_TEXT, _SEED_UNET, _SEED_VAE = 0, 1, 2


def _build_text_encoder(config: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    with _seeded(_SEED_TEXT):
        return CLIPTextModel(CLIPTextConfig(**config))


def _build_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    with _seeded(_SEED_UNET):
        return UNet2DConditionModel(**config)


def _build_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    with _seeded(_SEED_VAE):
        return AutoencoderKL(**config)


def _build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_sd_scheduler_config())


# A randomly initialised UNet all but ignores its text conditioning (its cross-attention adds
# ~5 % to the output), so no test could tell a fit that learns from one that does not. The tiny
# model scales its cross-attention output projections and its output convolution up, which makes
# the prompt, and so an identity, steer the output strongly. Measured on the seeded model:
# conditioning-dependent output std 0.016 -> ~0.6.
TINY_CROSS_ATTENTION_GAIN = 20.0
TINY_OUTPUT_GAIN = 3.0


def _strengthen_conditioning(unet: Any) -> Any:
    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(TINY_CROSS_ATTENTION_GAIN)
        unet.conv_out.weight.mul_(TINY_OUTPUT_GAIN)
        unet.conv_out.bias.mul_(TINY_OUTPUT_GAIN)
    return unet


def build_tiny_model() -> dict[str, Any]:
    """Build the tiny model's components in memory (bit-identical on every call)."""
    return {
        "tokenizer": build_clip_tokenizer(),
        "text_encoder": _build_text_encoder(_tiny_text_config()),
        "unet": _strengthen_conditioning(_build_unet(_tiny_unet_config())),
        "vae": _build_vae(_tiny_vae_config()),
        "scheduler": _build_scheduler(),
    }


def _model_index(components: dict[str, Any]) -> dict[str, Any]:
    """A model_index.json so diffusers' StableDiffusionPipeline can open the folder too."""
    import diffusers

    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline",
                             "_diffusers_version": diffusers.__version__,
                             "requires_safety_checker": False,
                             "safety_checker": [None, None], "feature_extractor": [None, None],
                             "image_encoder": [None, None]}
    for name, module in components.items():
        library = "transformers" if name in ("tokenizer", "text_encoder") else "diffusers"
        index[name] = [library, type(module).__name__]
    return index


def _save_diffusers_folder(components: dict[str, Any], folder: Path) -> None:
    for name, module in components.items():
        module.save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(_model_index(components), indent=2))


def tiny_model_dir() -> Path:
    """Where the tiny model is cached (a diffusers folder)."""
    return paths.models_dir() / TINY_CACHE_NAME


def ensure_tiny_model() -> Path:
    """Build and cache the tiny model once; return its folder.

    The folder is written under a temp name and renamed into place while holding the writer
    lock, so a crash leaves either no cache or a complete one.
    """
    target = tiny_model_dir()
    if (target / "model_index.json").is_file():
        return target
    with storage.writer_lock(paths.lock_path()):
        if (target / "model_index.json").is_file():  # another process built it meanwhile
            return target
        storage.ensure_private_dir(target.parent)
        storage.clean_temp_files(target.parent)
        tmp = target.parent / f"{target.name}{storage.TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            storage.ensure_private_dir(tmp)
            with quiet_libraries():
                _save_diffusers_folder(build_tiny_model(), tmp)
            storage.repair_modes(tmp)  # save_pretrained writes 0644; the data home is private
            if target.exists():  # a damaged cache without model_index.json
                shutil.rmtree(target)
            os.replace(tmp, target)
            storage.fsync_dir(target.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"Could not write the tiny model cache {target}: {exc}. "
                               "Check that the data home is writable (CELEBCTL_HOME).") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _discard_tiny_cache() -> None:
    target = tiny_model_dir()
    with storage.writer_lock(paths.lock_path()):
        shutil.rmtree(target, ignore_errors=True)


# ---- error messages


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
def quiet_libraries(include_diffusers: bool = True):
    """Silence transformers/diffusers logging and progress bars for a block (core never prints)."""
    import warnings

    import transformers.utils.logging as tlog

    loggers = [tlog]
    if include_diffusers:
        import diffusers.utils.logging as dlog

        loggers.append(dlog)
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    try:
        for log in loggers:
            log.set_verbosity(log.ERROR)
            log.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, verbosity, bars in saved:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()


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


# ---- single files

_SD1_TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
_SD1_TOKEN_KEYS = tuple(p + "embeddings.token_embedding.weight" for p in _SD1_TEXT_PREFIXES)


def _sd1_text_prefix(path: Path) -> str | None:
    """The key prefix of an SD 1.x CLIP text encoder inside a single-file checkpoint, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for prefix, key in zip(_SD1_TEXT_PREFIXES, _SD1_TOKEN_KEYS, strict=True):
            if key in keys and list(handle.get_slice(key).get_shape()) == [CLIP_VOCAB_SIZE, 768]:
                return prefix
    return None


def _load_sd1_text_encoder_from_file(path: Path, prefix: str) -> Any:
    """Load only the text encoder of an SD 1.x single file (no UNet/VAE, no hub access)."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    # Built on the CPU (not the meta device) so non-persistent buffers such as position_ids
    # are real; every weight is then replaced from the file (strict).
    model = CLIPTextModel(CLIPTextConfig(**sd15_text_config()))
    state: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if key.startswith(prefix) and not key.endswith("position_ids"):
                name = key[len(prefix):]
                if name.startswith("text_model."):
                    name = name[len("text_model."):]
                state[name] = handle.get_tensor(key).float()
    model.load_state_dict(state, strict=True)
    return model


def _write_sd1_config_folder(folder: Path) -> None:
    """SD 1.x diffusers configs, so from_single_file needs nothing from the hub."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    CLIPTextConfig(**sd15_text_config(), architectures=["CLIPTextModel"]).save_pretrained(
        str(folder / "text_encoder"))
    build_clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    for name, cls, config in (("unet", UNet2DConditionModel, sd15_unet_config()),
                              ("vae", AutoencoderKL, sd15_vae_config())):
        (folder / name).mkdir(exist_ok=True)
        full = {"_class_name": cls.__name__, **config}
        (folder / name / "config.json").write_text(json.dumps(full, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": DDIMScheduler.__name__, **_sd_scheduler_config()}))
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _load_single_file_pipeline(path: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    prefix = _sd1_text_prefix(path)
    with tempfile.TemporaryDirectory(prefix="celebctl-sd1-config-") as tmp:
        kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        if prefix is not None:
            _write_sd1_config_folder(Path(tmp))
            kwargs["config"] = tmp
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    return {name: getattr(pipe, name)
            for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")}


# ---- folders and hub ids


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
