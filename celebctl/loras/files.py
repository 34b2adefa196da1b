"""LoRA requests -> checked files, without loading a model or a tensor.

A request comes from a prompt tag (``<lora:NAME>``, ``<lora:NAME:WEIGHT>``) or from
``render --lora FILE[:WEIGHT]``. A NAME is the stem of a ``.safetensors`` file anywhere under
the LoRA folder (as the WebUI finds it); a file is then checked from its header alone: it
must be a safetensors file whose tensors are a LoRA (kohya/WebUI or diffusers/peft key names)
for Stable Diffusion 1.x, 2.x or SDXL, and as wide as the model (the cross-attention's key and
value input width and each text encoder's width, read from the tensors' shapes).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraError, did_you_mean

SUFFIX = ".safetensors"
MAX_LORAS = 16
MAX_WEIGHT = 100.0
_WALK_LIMIT = 200_000  # files looked at in a LoRA folder before giving up
_HASH_CHARS = 12  # the WebUI's "Lora hashes" short hash
_PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# A prompt's extra-network tag for a LoRA, as the WebUI writes it.
_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
# Which text encoders a kohya key prefix addresses: one (SD 1.x/2.x) or the first/second (SDXL).
_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "te", "lora_te1_": "te1", "lora_te2_": "te2"}
_DIFFUSERS_PARTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
_UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out",
                "time_embedding", "add_embedding")
# LyCORIS (LoHa, LoKr, (IA)^3, OFT, full diffs): formats diffusers' LoRA loader does not read.
_LYCORIS = re.compile(r"\.(hada_|lokr_|oft_|on_input|weight_diff|diff(_b)?$|w_norm|b_norm)")
_DOWN = re.compile(r"(lora_down|lora_A|lora\.down|_lora\.down|lora_linear_layer\.down)\.weight$")
# Text widths of the real families, for a hub model whose configs are not on this machine.
_FAMILY_WIDTHS = {"sd1": [768], "sd2": [1024], "sdxl": [768, 1280]}


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA asked for: a NAME from a prompt tag, or a FILE from ``--lora``."""

    name: str
    weight: float
    path: Path | None = None  # given as a file (--lora); else found by name


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's header says: its key format and the widths it was made for."""

    path: Path
    format: str  # "kohya" or "diffusers"
    parts: frozenset[str]  # "unet", "te" (kohya's one encoder), "te1", "te2"
    context_width: int | None  # input width of cross-attention keys/values, when present
    text_widths: dict[str, int]  # part -> width, where the LoRA touches a text encoder

    @property
    def encoders(self) -> int | None:
        """How many text encoders the model it was made for has, when the keys say."""
        if "te2" in self.parts or (self.format == "kohya" and "te1" in self.parts):
            return 2
        return 1 if "te" in self.parts else None

    @property
    def family_label(self) -> str:
        """The family the shapes say the LoRA was made for ("SD 1.x", "SDXL", ...)."""
        if self.encoders == 2 or self.context_width == 2048:
            return "SDXL"
        width = self.context_width or next(iter(self.text_widths.values()), None)
        if width == 768:
            return "SD 1.x"
        if width == 1024:
            return "SD 2.x"
        return f"a model with {width}-d text features" if width else "an unknown model"


@dataclass(frozen=True)
class LoraUse:
    """A checked LoRA of a render: its name (as the prompt tag writes it), file and weight."""

    name: str
    path: Path
    weight: float
    info: LoraInfo

    def tag(self) -> str:
        """The prompt tag the WebUI would read: ``<lora:NAME:WEIGHT>``."""
        from ..emphasis import format_weight

        return f"<lora:{self.name}:{format_weight(self.weight)}>"

    @property
    def key(self) -> tuple[str, float]:
        """What makes two uses the same LoRA at the same weight (for grouping renders)."""
        return (str(self.path), self.weight)


# --------------------------------------------------------------------------------------------
# requests: prompt tags and --lora options


def _weight(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraError(f"{what}: the weight {text!r} is not a number; write e.g. "
                        "<lora:NAME:0.8> or --lora FILE:0.8.") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise LoraError(f"{what}: the weight must be a number from -{MAX_WEIGHT:g} to "
                        f"{MAX_WEIGHT:g} (1 is the LoRA as trained), not {text}.")
    return value


def split_tags(text: str) -> tuple[str, list[LoraRequest]]:
    """``text`` without its ``<lora:NAME[:WEIGHT]>`` tags (removed as the WebUI removes them
    before encoding) and the LoRAs they ask for; a tag without weight means 1."""
    requests = []
    for match in _TAG.finditer(text or ""):
        items = match.group(1).split(":")
        name = items[0].strip()
        if not name:
            raise LoraError(f"{match.group(0)} names no LoRA; write <lora:NAME:WEIGHT>.")
        if len(items) > 2:
            raise LoraError(f"{match.group(0)}: celebctl reads <lora:NAME> and "
                            "<lora:NAME:WEIGHT> only (one weight for the UNet and the text "
                            "encoder alike).")
        weight = _weight(items[1].strip(), match.group(0)) if len(items) == 2 else 1.0
        requests.append(LoraRequest(name=name, weight=weight))
    return _TAG.sub("", text or ""), requests


def has_tags(text: str) -> bool:
    """True when ``text`` holds a ``<lora:...>`` tag."""
    return bool(_TAG.search(text or ""))


def parse_lora_option(value: str) -> LoraRequest:
    """``--lora FILE[:WEIGHT]`` -> a request for that file (weight 1 when none is given)."""
    text = str(value)
    path, weight = Path(text).expanduser(), 1.0
    if not path.exists() and ":" in text:
        head, tail = text.rsplit(":", 1)
        path, weight = Path(head).expanduser(), _weight(tail, f"--lora {text}")
    if path.suffix.lower() != SUFFIX:
        raise LoraError(f"--lora {text}: give a .safetensors LoRA file (other formats are "
                        "pickles, which celebctl never loads; convert them to safetensors).")
    if not path.is_file():
        raise LoraError(f"--lora {text}: no such file {path}.")
    return LoraRequest(name=path.stem, weight=weight, path=path.resolve())


# --------------------------------------------------------------------------------------------
# the LoRA folder


def lora_folder(lora_dir: str | Path | None = None) -> Path:
    """Where LoRA names are looked up: ``lora_dir``, else the config's ``lora_dir``, else
    ``loras/`` in the data home."""
    from .. import paths

    if lora_dir is not None:
        return Path(lora_dir).expanduser()
    configured = configured_lora_dir()
    return configured if configured is not None else paths.data_home() / "loras"


def configured_lora_dir() -> Path | None:
    """The ``lora_dir`` set in the config file, or None."""
    from .. import paths
    from ..models.specs import read_config_file

    config = paths.config_path()
    data = read_config_file(LoraError)
    value = data.get("lora_dir")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise LoraError(f"`lora_dir` in {config} must be a folder path, not "
                        f"{str(value)[:40]!r}.")
    return Path(value).expanduser()


def find_lora(name: str, folder: Path) -> Path:
    """The one ``NAME.safetensors`` under ``folder`` (searched recursively, as the WebUI does;
    a NAME with '/' is a path inside the folder). LoraError when there is none or several."""
    from ..documents import visible

    shown = visible(name)
    if not folder.is_dir():
        raise LoraError(f"No LoRA folder {visible(str(folder))} to find '{shown}' in. Put the "
                        "LoRA files there, point --lora-dir (or `lora_dir` in config.toml) at "
                        "yours, or give the file with --lora FILE.")
    if "/" in name or os.sep in name:
        relative = Path(name + SUFFIX)
        if relative.is_absolute() or ".." in relative.parts:
            raise LoraError(f"<lora:{shown}>: a name is a file inside the LoRA folder; give "
                            "other files with --lora FILE.")
        found = [folder / relative] if (folder / relative).is_file() else []
        stems: list[str] = []
    else:
        found, stems = [], []
        pickles = []
        seen = 0
        visited: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(folder, followlinks=True):
            try:
                stat = os.stat(root)
            except OSError:
                dirs[:] = []
                continue
            if (stat.st_dev, stat.st_ino) in visited:  # a link back up: no endless walk
                dirs[:] = []
                continue
            visited.add((stat.st_dev, stat.st_ino))
            dirs.sort()
            for file in sorted(files):
                seen += 1
                stem, suffix = os.path.splitext(file)
                if suffix.lower() == SUFFIX:
                    stems.append(stem)
                    if stem == name:
                        found.append(Path(root) / file)
                elif stem == name and suffix.lower() in _PICKLES:
                    pickles.append(Path(root) / file)
            if seen > _WALK_LIMIT:
                break
        if not found and pickles:
            raise LoraError(f"LoRA '{shown}' is {visible(str(pickles[0]))}, a pickle file, which "
                            "celebctl never loads (it can run code). Convert it to "
                            ".safetensors, or get the .safetensors release.")
    if len(found) > 1:
        raise LoraError(f"Several LoRAs are named '{shown}': "
                        + ", ".join(visible(str(p)) for p in found)
                        + ". Rename one, or give the one you mean with --lora FILE.")
    if not found:
        guess = did_you_mean(name, stems)
        raise LoraError(f"No LoRA '{shown}' ({shown}{SUFFIX}) in {visible(str(folder))}."
                        + (f" Did you mean '{visible(guess)}'?" if guess else "")
                        + " Put the file there, point --lora-dir at its folder, or give it "
                        "with --lora FILE.")
    return found[0].resolve()


# --------------------------------------------------------------------------------------------
# the header check


def inspect_lora(path: Path, name: str) -> LoraInfo:
    """Read ``path``'s safetensors header (never its tensors) and say what LoRA it is.
    LoraError naming ``name`` when it is not a safetensors file or not an SD/SDXL LoRA."""
    from ..documents import visible
    from ..storage.special_files import is_regular_file

    label = f"LoRA '{visible(name)}' ({visible(str(path))})"
    if not is_regular_file(path):
        raise LoraError(f"{label} is not a regular file; give a .safetensors file.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - any failure to read the header means: not one
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else \
            type(exc).__name__
        raise LoraError(f"{label} is not a readable safetensors file ({reason}).") from None
    if not shapes:
        raise LoraError(f"{label} holds no tensors, so it is not a LoRA.")
    odd = [k for k in shapes if "lora" not in k.lower()]
    if len(odd) == len(shapes):
        raise LoraError(f"{label} is not a LoRA: its tensors are named like "
                        f"'{visible(odd[0])}', not lora_down/lora_up or lora_A/lora_B. A "
                        "checkpoint goes to --model, an embedding to the WebUI.")
    if any(_LYCORIS.search(k) for k in shapes):
        raise LoraError(f"{label} is a LyCORIS network (LoHa, LoKr or similar), which "
                        "diffusers' LoRA loader does not read; use a plain LoRA.")
    if odd:
        raise LoraError(f"{label} holds tensors that are not LoRA weights (e.g. "
                        f"'{visible(odd[0])}'; bundled embeddings are not supported). Use a "
                        "file with LoRA weights only.")
    parts: set[str] = set()
    formats: set[str] = set()
    context = None
    text_widths: dict[str, int] = {}
    for key, shape in shapes.items():
        part, rest, fmt = _part_of(key)
        if part is None:
            raise LoraError(f"{label} is not a LoRA for Stable Diffusion 1.x, 2.x or SDXL "
                            f"(its key '{visible(key)}' addresses another kind of model).")
        if part != "unet" and "embeddings" in rest:
            raise LoraError(f"{label} changes the text encoder's token embeddings, where "
                            "celebctl puts its identities; it cannot be used.")
        parts.add(part)
        formats.add(fmt)
        if not _DOWN.search(rest) or len(shape) < 2:
            continue
        if part == "unet" and re.search(r"attn2[._](processor\.)?to_[kv]", rest):
            context = int(shape[1])
        elif part != "unet" and re.search(r"(q|k|v)_proj|fc1", rest):
            text_widths[part] = int(shape[1])
    if "te" in parts and parts & {"te1", "te2"} and formats == {"kohya"}:
        raise LoraError(f"{label} mixes one-encoder (lora_te_) and two-encoder (lora_te1_/"
                        "lora_te2_) keys; it is damaged.")
    return LoraInfo(path=path, format="kohya" if "kohya" in formats else "diffusers",
                    parts=frozenset(parts), context_width=context, text_widths=text_widths)


def _part_of(key: str) -> tuple[str | None, str, str]:
    """(model part, the rest of the key, format) of a LoRA tensor name."""
    for prefix, part in _KOHYA_PARTS.items():
        if key.startswith(prefix):
            return part, key[len(prefix):], "kohya"
    head, _, rest = key.partition(".")
    if head in _DIFFUSERS_PARTS:
        return _DIFFUSERS_PARTS[head], rest, "diffusers"
    if head in _UNET_BLOCKS:
        return "unet", key, "diffusers"
    return None, key, ""


def model_widths(spec: Any) -> list[int] | None:
    """The text widths of ``spec``'s encoders, known without loading; None when unknown."""
    from .. import models

    widths = models.text_widths(spec)
    if widths:
        return list(widths)
    return list(_FAMILY_WIDTHS[spec.family]) if spec.family in _FAMILY_WIDTHS else None


def check_lora_fits(info: LoraInfo, name: str, widths: Sequence[int] | None, model: str,
                    family: str | None = None, context: int | None = None) -> None:
    """Refuse a LoRA whose shapes do not fit a model with text encoders ``widths`` (and a UNet
    whose cross-attention reads ``context`` features: their sum unless given)."""
    from ..documents import visible
    from ..models import families

    if not widths:
        return
    context = context or sum(widths)
    mismatch = info.context_width is not None and info.context_width != context
    if info.encoders is not None and info.encoders != len(widths):
        mismatch = True
    for part, width in info.text_widths.items():
        index = 1 if part == "te2" else 0
        if index >= len(widths) or widths[index] != width:
            mismatch = True
    if not mismatch:
        return
    model_family = families.label(family) if family else "a model"
    shape = (f"cross-attention {info.context_width}-d" if info.context_width
             else f"text encoder {next(iter(info.text_widths.values()), '?')}-d")
    raise LoraError(
        f"LoRA '{visible(name)}' ({visible(str(info.path))}) was made for {info.family_label} "
        f"({shape}), but {model} is {model_family} (text encoder"
        f"{'s' if len(widths) > 1 else ''} {'+'.join(str(w) for w in widths)}-d, "
        f"cross-attention {context}-d). Use a LoRA made for {model_family} models, or render "
        "with a model the LoRA was made for (--model).")


# --------------------------------------------------------------------------------------------
# resolving a render's LoRAs


def resolve_loras(requests: Sequence[LoraRequest], spec: Any,
                  lora_dir: str | Path | None = None, cache: dict[Any, Any] | None = None
                  ) -> list[LoraUse]:
    """Find, read and check every requested LoRA for ``spec``'s model, before it loads.
    ``cache`` (a dict kept by the caller) spares looking up a name again for many prompts."""
    from ..documents import visible

    if len(requests) > MAX_LORAS:
        raise LoraError(f"{len(requests)} LoRAs is more than {MAX_LORAS}; use fewer.")
    cache = {} if cache is None else cache
    uses: list[LoraUse] = []
    widths = model_widths(spec)
    for request in requests:
        if request.path is not None:
            path = request.path
        elif ("name", request.name) in cache:
            path = cache[("name", request.name)]
        else:
            if "folder" not in cache:
                cache["folder"] = lora_folder(lora_dir)
            path = cache[("name", request.name)] = find_lora(request.name, cache["folder"])
        if any(u.path == path for u in uses):
            raise LoraError(f"LoRA '{visible(request.name)}' is asked for twice; give it once, "
                            "with the weight you want.")
        if any(u.name == request.name for u in uses):
            raise LoraError(f"Two LoRA files are named '{visible(request.name)}' in this "
                            "render; the PNG text could not tell them apart. Rename one.")
        if any(c in request.name for c in "<>:,"):
            raise LoraError(f"LoRA file {visible(str(path))}: its name cannot be written in a "
                            "<lora:NAME> tag (it holds < > : or ,); rename the file.")
        if ("info", path) not in cache:
            info = inspect_lora(path, request.name)
            check_lora_fits(info, request.name, widths, spec.ref, getattr(spec, "family", None))
            cache[("info", path)] = info
        info = cache[("info", path)]
        uses.append(LoraUse(name=request.name, path=path, weight=request.weight, info=info))
    return uses


# --------------------------------------------------------------------------------------------
# the WebUI's short hash, and the PNG text


_hashes: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def short_hash(path: Path) -> str:
    """The WebUI's LoRA hash: sha256 of the safetensors file after its header (the "addnet"
    hash, so editing metadata does not change it), first 12 hex digits. Cached per process
    by (path, mtime, size)."""
    stat = os.stat(path)
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(header + 8)
        while chunk := handle.read(4 * 1024 * 1024):
            digest.update(chunk)
    value = digest.hexdigest()[:_HASH_CHARS]
    with _hash_lock:
        _hashes[key] = value
    return value


def lora_hashes_text(entries: Sequence[dict[str, Any]]) -> str:
    """The value of the WebUI's ``Lora hashes`` field: ``NAME: HASH, ...`` (':' and ',' left
    out of names, as the WebUI does)."""
    return ", ".join(f"{str(e['name']).translate(_NAME_SYMBOLS)}: {e['hash']}" for e in entries)


_NAME_SYMBOLS = str.maketrans("", "", ":,")


def parse_lora_hashes(value: str) -> dict[str, str]:
    """A ``Lora hashes`` value read back: name -> hash."""
    found = {}
    for part in (value or "").strip().strip('"').split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip():
            found[name.strip()] = digest.strip()
    return found


def with_tags(prompt: str, uses: Sequence[LoraUse]) -> str:
    """``prompt`` with each LoRA's tag appended, as the WebUI's prompt names them."""
    tags = " ".join(use.tag() for use in uses)
    return f"{prompt} {tags}".strip() if tags else prompt
