"""Identity similarity of one image: faces found, aligned, embedded and matched to identities.

Both ways of evaluating (rendering the prompt set, scoring a folder of images) score faces
here and load what scoring needs (each identity's face encoder and stored embeddings) with
:func:`load_face_references`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidOption


@dataclass
class FaceScores:
    """The faces found in one image and each face's cosine with each identity."""

    faces: int
    # identity -> the similarity of the face assigned to it (None: no face for it)
    matched: dict[str, float | None]
    told_apart: bool | None  # None with one identity


@dataclass
class FaceReferences:
    """What identity similarity needs per identity: stored embeddings and the face encoder."""

    embeddings: dict[str, Any]  # identity -> (k, 512) unit vectors, one per source photo
    encoders: dict[str, Any]  # identity -> its face encoder (as the fit used)


def check_face_embeddings(idents: Sequence[Any]) -> None:
    """Raise InvalidOption when an identity has no stored face embedding to compare with."""
    missing = [i.name for i in idents if not i.load_face_embeddings()]
    if missing:
        raise InvalidOption(f"{', '.join(missing)} has no stored face embedding (imported "
                            "without its face), so identity similarity cannot be measured.")


def load_face_references(idents: Sequence[Any], device: Any = "cpu") -> FaceReferences:
    """Each identity's stored face embeddings and its own face encoder, loaded on ``device``."""
    import numpy as np

    from .. import faces

    check_face_embeddings(idents)
    encoders = {i.name: faces.load_face_encoder(i.meta.get("face_encoder", "vggface2"),
                                                device=device) for i in idents}
    embeddings = {i.name: np.stack(i.load_face_embeddings()) for i in idents}
    return FaceReferences(embeddings=embeddings, encoders=encoders)


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _assign(scores: list[list[float]], names: Sequence[str]) -> dict[str, int | None]:
    """Each identity to at most one face, maximising the total similarity (brute force: an
    image holds a few faces and an eval a few identities)."""
    faces = len(scores)
    best: tuple[float, dict[str, int | None]] = (-math.inf, {n: None for n in names})
    slots = list(range(faces)) + [None] * len(names)
    for choice in itertools.permutations(slots, len(names)):
        total = sum(scores[f][i] for i, f in enumerate(choice) if f is not None)
        used = sum(1 for f in choice if f is not None)
        key = (used, total)
        if key > (sum(1 for v in best[1].values() if v is not None), best[0]):
            best = (total, dict(zip(names, choice, strict=True)))
    return best[1]


def score_faces(image: Any, references: dict[str, Any], encoders: dict[str, Any],
                device: Any = "cpu") -> FaceScores:
    """Detect, align and embed the faces of ``image``; cosine with each identity's references.

    ``references`` maps identity -> (k, 512) stored embeddings (unit vectors), ``encoders``
    identity -> its face encoder. A face's similarity to an identity is the best over that
    identity's embeddings.
    """
    import torch

    from .. import faces as faces_mod
    from ..augment import pil_to_tensor

    found = faces_mod.detect_faces(image, device=device)
    names = list(references)
    if not found:
        return FaceScores(0, {n: None for n in names}, False if len(names) > 1 else None)
    crops = torch.stack([pil_to_tensor(faces_mod.align_face(image, f)) for f in found])
    scores = [[0.0] * len(names) for _ in found]
    for column, name in enumerate(names):
        encoder = encoders[name]
        device_of = next(encoder.parameters()).device
        embedded = faces_mod.embed_faces(encoder, crops.to(device_of)).cpu()
        reference = torch.as_tensor(references[name]).float().reshape(-1, embedded.shape[1])
        cosines = embedded @ torch.nn.functional.normalize(reference, dim=-1).T
        for row in range(len(found)):
            scores[row][column] = float(cosines[row].max())
    assignment = _assign(scores, names)
    matched = {n: (scores[f][i] if f is not None else None)
               for i, (n, f) in enumerate(assignment.items())}
    told_apart = None
    if len(names) > 1:
        told_apart = all(f is not None for f in assignment.values()) and all(
            scores[f][i] >= max(scores[f]) for i, f in enumerate(assignment.values()))
    return FaceScores(len(found), matched, told_apart)


def score_image(image: Any, references: FaceReferences) -> FaceScores:
    """:func:`score_faces` with the references :func:`load_face_references` gave."""
    # Detection on the CPU: MTCNN is small, and its results then match across devices.
    return score_faces(image, references.embeddings, references.encoders, device="cpu")
