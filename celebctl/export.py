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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CelebctlError, InvalidOption

FORMATS = ("celeb", "a1111", "diffusers")
A1111_KEY = "emb_params"
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"name": self.name, "format": self.format, "path": str(self.path),
                "files": [str(f) for f in self.files], "token": self.token}


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
    """A WebUI/ComfyUI textual-inversion embedding: safetensors ``{"emb_params": (2, hidden)}``,
    or for SDXL ``{"clip_l": (2, 768), "clip_g": (2, 1280)}``."""
    vectors, ident = identity_token_vectors(name)
    parts = split_vectors(vectors, ident)
    if len(parts) == 2:
        tensors = {key: part.numpy() for key, part in zip(SDXL_KEYS, parts, strict=True)}
        return safetensors_bytes(tensors, metadata=_metadata(ident))
    return safetensors_bytes(A1111_KEY, vectors.numpy(), _metadata(ident))


def diffusers_files(name: str, token: str | None = None) -> list[tuple[str, bytes]]:
    """diffusers' textual-inversion files: ``learned_embeds.safetensors`` holding
    ``{"<name>": (2, hidden)}``, and for SDXL ``learned_embeds_2.safetensors`` with the second
    text encoder's vectors.

    SD 1.x / 2.x: ``pipe.load_textual_inversion(folder)`` adds the tokens ``<name>`` and
    ``<name>_1`` and expands ``<name>`` in prompts to both. SDXL needs one call per text
    encoder (the README shows them).
    """
    vectors, ident = identity_token_vectors(name)
    key = token or f"<{ident.name}>"
    names = (DIFFUSERS_FILE, DIFFUSERS_FILE_2)
    return [(filename, safetensors_bytes(key, part.numpy(), _metadata(ident)))
            for filename, part in zip(names, split_vectors(vectors, ident), strict=False)]


def diffusers_bytes(name: str, token: str | None = None) -> bytes:
    """The first (for SD 1.x / 2.x the only) diffusers file; see :func:`diffusers_files`."""
    return diffusers_files(name, token)[0][1]


def export_identity(name: str, output: str | Path, fmt: str = "celeb", *,
                    overwrite: bool = False, include_face: bool = True) -> ExportResult:
    """Export identity ``name`` in format ``fmt`` to ``output``.

    - ``celeb``: a ``.celeb`` bundle for ``celebctl import``; it contains the face crop and
      face embedding unless ``include_face`` is False.
    - ``a1111``: one ``.safetensors`` file for the WebUI's/ComfyUI's embeddings folder (the
      file name is the prompt word there).
    - ``diffusers``: a folder holding ``learned_embeds.safetensors`` for
      ``load_textual_inversion(folder)``; prompts then say ``<name>``.

    An existing file is never replaced unless ``overwrite``. Nothing is written on error.
    """
    from . import bundles, registry
    from .storage import _storage_error, refuse_special_file, write_user_file

    if fmt not in FORMATS:
        raise InvalidOption(f"Unknown export format '{fmt}': use {', '.join(FORMATS)}.")
    output = Path(output).expanduser()
    if fmt == "celeb":
        path = bundles.export_bundle(name, output, include_face=include_face,
                                     overwrite=overwrite)
        return ExportResult(name, fmt, path, [path], None)
    registry.get_identity(name, verify="all")  # a clear IdentityNotFound before anything else
    if fmt == "a1111":
        if output.is_dir():
            raise CelebctlError(f"{output} is a folder; give a file name such as "
                                f"{name}.safetensors.")
        if output.suffix.lower() != ".safetensors":
            raise InvalidOption(f"{output}: a WebUI embedding must end in .safetensors "
                                f"(for example {name}.safetensors).")
        refuse_special_file(output)
        if os.path.lexists(output) and not overwrite:
            raise CelebctlError(f"{output} already exists. Pick another path or pass --force.")
        data = a1111_bytes(name)
        write_user_file(output, data, overwrite=overwrite)
        return ExportResult(name, fmt, output, [output], output.stem)
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
    if not output.parent.is_dir():
        raise CelebctlError(f"The folder {output.parent} does not exist.")
    try:
        output.mkdir(exist_ok=True)
    except OSError as exc:
        raise _storage_error(exc, output, user_file=True) from exc
    for target, (_, data) in zip(targets, files, strict=True):
        write_user_file(target, data, overwrite=overwrite)
    return ExportResult(name, fmt, output, targets, f"<{name}>")
