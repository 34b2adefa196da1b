"""Identity -> files other tools load: WebUI/ComfyUI embeddings, diffusers textual inversion.

An identity is two token vectors, ``mean_i + coefficients_i @ components_i`` on its basis; both
formats carry exactly those two vectors (fp32), so diffusers' ``load_textual_inversion`` plus a
prompt with ``<name>`` renders what ``celebctl render`` renders. Neither format contains the face
crop or face embedding (a ``.celeb`` bundle, see :mod:`celebctl.bundles`, does).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CelebctlError, InvalidOption

FORMATS = ("celeb", "a1111", "diffusers")
# SDXL embeddings as A1111 and ComfyUI read them: one tensor per text encoder.
SDXL_KEYS = ("clip_l", "clip_g")
DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_FILE_2 = "learned_embeds_2.safetensors"  # SDXL's second text encoder


@dataclass
class ExportResult:
    """What an export wrote."""

    name: str
    format: str
    path: Path  # the file (celeb, a1111) or folder (diffusers) given
    files: list[Path]
    token: str | None  # what to type in a prompt of the other tool
    # What to type where: tool -> the prompt word ("webui", "comfyui", "diffusers").
    triggers: dict[str, str] = field(default_factory=dict)
    usage: list[str] = field(default_factory=list)  # how to load it, one line per tool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"name": self.name, "format": self.format, "path": str(self.path),
                "files": [str(f) for f in self.files], "token": self.token,
                "triggers": dict(self.triggers), "usage": list(self.usage)}


def diffusers_token(name: str) -> str:
    """The token diffusers' ``load_textual_inversion`` registers for an identity: ``<name>``,
    lowercase like every identity name. It must be typed exactly: diffusers expands ``<name>``
    to its two vectors by plain text replacement, so ``<Alice>`` would get only the first."""
    return f"<{name}>"


def a1111_usage(path: Path, name: str, family: str) -> tuple[dict[str, str], list[str]]:
    """What to type in each tool for the WebUI/ComfyUI file ``path``."""
    token, stem = diffusers_token(name), path.stem
    triggers = {"webui": stem, "comfyui": f"embedding:{stem}"}
    lines = [
        f"WebUI: put {stem}.safetensors in the embeddings folder and write '{stem}' in prompts "
        f"(the file name, any case); '{stem} person riding a bike' is what celebctl renders.",
        f"ComfyUI: put it in models/embeddings and write 'embedding:{stem}' followed by a space; "
        f"for a possessive write 'embedding:{stem} person's hat' (ComfyUI skips "
        f"'embedding:{stem}'s' with a warning).",
    ]
    if family == "sdxl":
        lines.append("diffusers: export with --format diffusers (two files, one per text "
                     "encoder).")
    else:
        triggers["diffusers"] = token
        lines.append(f"diffusers: pipe.load_textual_inversion(\"{path}\") adds the token "
                     f"'{token}'; write it exactly, lowercase, in angle brackets.")
    return triggers, lines


def diffusers_usage(folder: Path, name: str, family: str) -> tuple[dict[str, str], list[str]]:
    """What to type, and how to load, a diffusers textual-inversion folder."""
    token = diffusers_token(name)
    if family == "sdxl":
        lines = [
            f"diffusers (SDXL): pipe.load_textual_inversion(\"{folder / DIFFUSERS_FILE}\", "
            f"token=\"{token}\", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
            f"  and pipe.load_textual_inversion(\"{folder / DIFFUSERS_FILE_2}\", "
            f"token=\"{token}\", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
        ]
    else:
        lines = [f"diffusers: pipe.load_textual_inversion(\"{folder}\")"]
    lines.append(f"Then write '{token}' in prompts, exactly: lowercase, in angle brackets "
                 f"(diffusers expands it to its two vectors, '{token} {token}_1'; '<"
                 f"{name.capitalize()}>' would get only the first). '{token} person riding a "
                 f"bike' is what celebctl renders.")
    return {"diffusers": token}, lines


def identity_token_vectors(name: str) -> tuple[Any, Any]:
    """The identity's (2, hidden) fp32 token vectors (torch, CPU) and the identity itself.

    For SDXL ``hidden`` is both text encoders' widths side by side (see :func:`split_vectors`).
    """
    import torch

    from . import registry
    from .basis import load_basis
    from .errors import BasisMismatch
    from .prompting import identity_vectors

    ident = registry.get_identity(name, verify="all")
    basis = load_basis(ident.basis_id)
    coefficients = torch.from_numpy(ident.load_coefficients()).to(torch.float32)
    if coefficients.shape[-1] != basis.p:
        raise BasisMismatch(f"Identity '{name}' has {coefficients.shape[-1]} coefficients per "
                            f"token but basis {basis.id} has {basis.p} components.")
    vectors = identity_vectors(coefficients, basis.mean, basis.components)
    return vectors.detach().to(torch.float32).contiguous(), ident


def _metadata(ident: Any) -> dict[str, str]:
    # safetensors metadata is str -> str; no timestamps, so exports are reproducible.
    return {
        "format": "pt",
        "celebctl_version": __version__,
        "celebctl_identity": ident.name,
        "celebctl_basis_id": str(ident.basis_id),
        "celebctl_model": str(ident.meta.get("model", "")),
    }


def safetensors_bytes(key: str | dict[str, Any], array: Any = None,
                      metadata: dict[str, str] | None = None) -> bytes:
    """fp32 tensors as a safetensors file, header keys sorted so equal input gives equal bytes.

    ``key`` and ``array`` for one tensor, or ``key`` a dict name -> array for several. (The
    safetensors library writes its metadata in hash order, which changes between runs.)
    """
    import numpy as np

    tensors = key if isinstance(key, dict) else {key: array}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        blobs.append(data.tobytes())
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def split_vectors(vectors: Any, ident: Any) -> list[Any]:
    """The identity's vectors per text encoder: one (2, hidden) for SD 1.x / 2.x, two for SDXL
    ((2, 768) for CLIP ViT-L, (2, 1280) for OpenCLIP ViT-bigG)."""
    widths = list(ident.meta.get("encoder_widths") or [vectors.shape[-1]])
    parts, start = [], 0
    for width in widths:
        parts.append(vectors[:, start:start + width].contiguous())
        start += width
    return parts


def a1111_bytes(name: str) -> bytes:
    """A WebUI/ComfyUI textual-inversion embedding: safetensors ``{"<name>": (2, hidden)}``,
    or for SDXL ``{"clip_l": (2, 768), "clip_g": (2, 1280)}``.

    The WebUI and ComfyUI take the one tensor of a single-key file whatever its key (the file
    name is the prompt word there); the key ``<name>`` makes diffusers' loader, given this file,
    register the same token as our diffusers export rather than a generic one."""
    vectors, ident = identity_token_vectors(name)
    parts = split_vectors(vectors, ident)
    if len(parts) == 2:
        tensors = {key: part.numpy() for key, part in zip(SDXL_KEYS, parts, strict=True)}
        return safetensors_bytes(tensors, metadata=_metadata(ident))
    return safetensors_bytes(diffusers_token(ident.name), vectors.numpy(), _metadata(ident))


def diffusers_files(name: str, token: str | None = None) -> list[tuple[str, bytes]]:
    """diffusers' textual-inversion files: ``learned_embeds.safetensors`` holding
    ``{"<name>": (2, hidden)}``, and for SDXL ``learned_embeds_2.safetensors`` with the second
    text encoder's vectors.

    SD 1.x / 2.x: ``pipe.load_textual_inversion(folder)`` adds the tokens ``<name>`` and
    ``<name>_1`` and expands ``<name>`` in prompts to both. SDXL needs one call per text
    encoder (the README shows them).
    """
    vectors, ident = identity_token_vectors(name)
    key = token or diffusers_token(ident.name)
    names = (DIFFUSERS_FILE, DIFFUSERS_FILE_2)
    return [(filename, safetensors_bytes(key, part.numpy(), _metadata(ident)))
            for filename, part in zip(names, split_vectors(vectors, ident), strict=False)]


def diffusers_bytes(name: str, token: str | None = None) -> bytes:
    """The first (for SD 1.x / 2.x the only) diffusers file; see :func:`diffusers_files`."""
    return diffusers_files(name, token)[0][1]


def export_identity(name: str, output: str | Path, fmt: str = "celeb", *,
                    overwrite: bool = False, include_face: bool = True,
                    with_basis: bool = False) -> ExportResult:
    """Export identity ``name`` in format ``fmt`` to ``output``.

    - ``celeb``: a ``.celeb`` bundle for ``celebctl import``; it contains the face crop and
      face embedding unless ``include_face`` is False, and the basis with ``with_basis``.
    - ``a1111``: one ``.safetensors`` file for the WebUI's/ComfyUI's embeddings folder (the
      file name is the prompt word there).
    - ``diffusers``: a folder holding ``learned_embeds.safetensors`` for
      ``load_textual_inversion(folder)``; prompts then say ``<name>``.

    An existing file is never replaced unless ``overwrite``. Nothing is written on error.
    """
    from . import bundles, registry
    from .storage.special_files import refuse_special_file
    from .storage.userfiles import write_user_file

    if fmt not in FORMATS:
        raise InvalidOption(f"Unknown export format '{fmt}': use {', '.join(FORMATS)}.")
    # "embeddings/" means a folder even before it exists (Path() drops the slash).
    as_folder = str(output).endswith(("/", os.sep))
    output = Path(output).expanduser()
    if fmt == "celeb":
        path = bundles.export_bundle(name, output, include_face=include_face,
                                     overwrite=overwrite, with_basis=with_basis)
        return ExportResult(name, fmt, path, [path], None)
    # A clear IdentityNotFound before anything else.
    ident = registry.get_identity(name, verify="all")
    family = str(ident.meta.get("family") or "sd1")
    if fmt == "a1111":
        folder = output if as_folder or output.is_dir() else None
        if folder is not None:
            # An embeddings folder, created if missing as for diffusers: the usual file name.
            _check_folder(folder)
            output = folder / f"{name}.safetensors"
        if output.suffix.lower() != ".safetensors":
            raise InvalidOption(f"{output}: a WebUI embedding must end in .safetensors "
                                f"(for example {name}.safetensors).")
        refuse_special_file(output)
        if os.path.lexists(output) and not overwrite:
            raise CelebctlError(f"{output} already exists. Pick another path or pass --force.")
        data = a1111_bytes(name)
        if folder is not None:
            _make_folder(folder)
        write_user_file(output, data, overwrite=overwrite)
        triggers, usage = a1111_usage(output, name, family)
        return ExportResult(name, fmt, output, [output], output.stem, triggers, usage)
    # diffusers: a folder, created if missing
    if os.path.lexists(output) and not output.is_dir():
        raise CelebctlError(f"{output} is a file; `--format diffusers` writes a folder.")
    files = diffusers_files(name)
    targets = [output / filename for filename, _ in files]
    for target in targets:
        if output.is_dir():
            refuse_special_file(target)
        if os.path.lexists(target) and not overwrite:
            raise CelebctlError(f"{target} already exists. Pick another folder or pass --force.")
    _check_folder(output)
    _make_folder(output)
    for target, (_, data) in zip(targets, files, strict=True):
        write_user_file(target, data, overwrite=overwrite)
    triggers, usage = diffusers_usage(output, name, family)
    return ExportResult(name, fmt, output, targets, diffusers_token(name), triggers, usage)


def _check_folder(folder: Path) -> None:
    """Refuse an export folder that is a file or whose parent is missing (before any write)."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise CelebctlError(f"{folder} is a file, not a folder. Pick a folder or a file name.")
    if not folder.parent.is_dir():
        raise CelebctlError(f"The folder {folder.parent} does not exist. Create it first.")


def _make_folder(folder: Path) -> None:
    """Create the export folder ``folder``, one level like ``mkdir`` (see :func:`_check_folder`)."""
    from .storage.atomic import _storage_error

    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise _storage_error(exc, folder, user_file=True) from exc
