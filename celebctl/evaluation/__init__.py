"""`celebctl eval`: how much images of an identity look like the person, and follow the prompt.

The protocol of the Celeb Basis paper and the comparisons after it (docs/method.md,
"Evaluation"), per image:

- identity similarity: detect the faces (MTCNN), align and embed each with the identity's own
  face encoder, and take the cosine with the identity's stored face embedding(s) (the best of
  them); an image without a face is a miss;
- prompt similarity: CLIP text-image cosine between the prompt (with each identity written
  "a person") and the image.

With several identities each face is matched to at most one identity (the assignment with the
highest total similarity), and an image "tells them apart" when every identity got a face and
each assigned face is closer to its own identity than to any other.

- :mod:`.scoring`: faces of one image -> identity similarity; loading what it needs.
- :mod:`.promptset`: :func:`evaluate` renders celebctl's fixed prompt set and scores it.
- :mod:`.folder`: :func:`evaluate_images` scores images made anywhere (``eval --images``).
- :mod:`.sheets`: the labelled contact sheet both write.
"""

from __future__ import annotations

from .folder import (
    FolderResult,
    ScoredImage,
    clip_text_for,
    evaluate_images,
    image_text,
    list_image_files,
    prompt_from_parameters,
)
from .promptset import (
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    GENERIC,
    MAX_GUIDANCE,
    MAX_SEEDS,
    MAX_STEPS,
    PAIR_PROMPTS,
    PROMPT_SET_VERSION,
    SINGLE_PROMPTS,
    EvalResult,
    ImageRecord,
    ProgressCallback,
    check_eval_options,
    check_names,
    evaluate,
    prompt_set,
)
from .scoring import (
    FaceReferences,
    FaceScores,
    _assign,
    check_face_embeddings,
    load_face_references,
    score_faces,
    score_image,
)
from .sheets import SHEET_IMAGE_SIDE, SHEET_MARK, check_sheet_path

__all__ = [
    "DEFAULT_SEEDS", "DEFAULT_STEPS", "GENERIC", "MAX_GUIDANCE", "MAX_SEEDS", "MAX_STEPS",
    "PAIR_PROMPTS", "PROMPT_SET_VERSION", "SHEET_IMAGE_SIDE", "SHEET_MARK", "SINGLE_PROMPTS",
    "EvalResult", "FaceReferences", "FaceScores", "FolderResult", "ImageRecord",
    "ProgressCallback", "ScoredImage", "_assign", "check_eval_options", "check_face_embeddings",
    "check_names", "check_sheet_path", "clip_text_for", "evaluate", "evaluate_images",
    "image_text", "list_image_files", "load_face_references", "prompt_from_parameters",
    "prompt_set", "score_faces", "score_image",
]
