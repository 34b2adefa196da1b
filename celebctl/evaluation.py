"""`celebctl eval`: how much renders of an identity look like the person, and follow the prompt.

The protocol of the Celeb Basis paper and the comparisons after it (docs/method.md,
"Evaluation"): render a fixed set of prompts for a few seeds, then per image

- identity similarity: detect the faces (MTCNN), align and embed each with the identity's own
  face encoder, and take the cosine with the identity's stored face embedding(s) (the best of
  them); an image without a face is a miss;
- prompt similarity: CLIP text-image cosine between the prompt (with each identity written
  "a person") and the image.

With several identities each face is matched to at most one identity (the assignment with the
highest total similarity), and an image "tells them apart" when every identity got a face and
each assigned face is closer to its own identity than to any other. ``baseline`` renders the
same prompts and seeds with each identity replaced by "a person": the similarity a prompt
reaches without the identity.

Images go through `render` (:func:`celebctl.rendering.render_prompt`) and are kept, never
overwritten, in the output folder; the summary is appended to each identity's eval history.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidOption

PROMPT_SET_VERSION = "celebctl-eval-v1"
# celebctl's own prompt set: actions, places, styles, close-ups and full body. "{}" is the
# identity; for two or more identities "{a}" and "{b}" are the first two.
SINGLE_PROMPTS: tuple[str, ...] = (
    "a close-up photo of {}",
    "a portrait photo of {}, studio lighting",
    "a photo of {} smiling",
    "a photo of {} wearing sunglasses",
    "a photo of {} riding a bicycle in a park",
    "a photo of {} reading a book in a library",
    "a photo of {} cooking in a kitchen",
    "a photo of {} on a beach at sunset",
    "a photo of {} walking on a city street at night",
    "a photo of {} in the snow wearing a red scarf",
    "a full body photo of {} standing in a field of flowers",
    "a full body photo of {} playing basketball",
    "a photo of {} as an astronaut",
    "a photo of {} as a chef, wearing a white hat",
    "an oil painting of {}",
    "a watercolor painting of {}",
    "a pencil sketch of {}",
    "an anime drawing of {}",
    "a black and white photo of {}",
    "a selfie of {} in front of the Eiffel Tower",
)
PAIR_PROMPTS: tuple[str, ...] = (
    "a photo of {a} shaking hands with {b}",
    "a photo of {a} and {b} sitting on a bench",
    "a photo of {a} talking to {b} in a cafe",
    "a photo of {a} and {b} walking on a beach",
    "a photo of {a} hugging {b}",
    "an oil painting of {a} and {b}",
)
GENERIC = "a person"
DEFAULT_SEEDS = 2
DEFAULT_STEPS = 30
MAX_SEEDS = 16

ProgressCallback = Callable[[str, int, int, dict[str, Any]], None]


def prompt_set(names: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt naming the identities, CLIP text with each identity as "a person") pairs."""
    if len(names) == 1:
        return [(t.format(names[0]), t.format(GENERIC)) for t in SINGLE_PROMPTS]
    pairs = [(t.format(a=names[0], b=names[1]), t.format(a=GENERIC, b="another person"))
             for t in PAIR_PROMPTS]
    singles = [(t.format(name), t.format(GENERIC)) for name in names for t in SINGLE_PROMPTS[:4]]
    return pairs + singles


# --------------------------------------------------------------------------------------------
# identity similarity


@dataclass
class FaceScores:
    """The faces found in one image and each face's cosine with each identity."""

    faces: int
    # identity -> the similarity of the face assigned to it (None: no face for it)
    matched: dict[str, float | None]
    told_apart: bool | None  # None with one identity


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

    from . import faces as faces_mod
    from .augment import pil_to_tensor

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


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class ImageRecord:
    """One evaluated image."""

    prompt: str
    clip_text: str
    seed: int
    path: Path
    baseline: bool
    faces: int
    identity: dict[str, float | None]
    told_apart: bool | None
    prompt_similarity: float | None


@dataclass
class EvalResult:
    """Everything `celebctl eval` measured."""

    names: list[str]
    model: str
    prompt_set: str
    seeds: list[int]
    steps: int
    guidance: float | None
    clip: str | None
    images: list[ImageRecord]
    sheet: Path | None
    created: str
    notes: list[str] = field(default_factory=list)

    def _mean(self, values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    def summary(self, baseline: bool = False) -> dict[str, Any]:
        """Means over the identity (or baseline) images."""
        rows = [r for r in self.images if r.baseline == baseline]
        out: dict[str, Any] = {"images": len(rows)}
        for name in self.names:
            values = [r.identity.get(name) for r in rows]
            out[f"identity_similarity.{name}"] = self._mean(values)
            out[f"miss_rate.{name}"] = (sum(v is None for v in values) / len(values)
                                        if values else None)
        out["prompt_similarity"] = self._mean([r.prompt_similarity for r in rows])
        if len(self.names) > 1:
            apart = [r.told_apart for r in rows if r.told_apart is not None]
            out["told_apart_rate"] = sum(apart) / len(apart) if apart else None
        return out

    def per_prompt(self, baseline: bool = False) -> list[dict[str, Any]]:
        """One row per prompt: mean similarities and misses over its seeds."""
        rows = []
        for prompt in dict.fromkeys(r.prompt for r in self.images if r.baseline == baseline):
            mine = [r for r in self.images if r.prompt == prompt and r.baseline == baseline]
            row: dict[str, Any] = {"prompt": prompt, "images": len(mine)}
            for name in self.names:
                values = [r.identity.get(name) for r in mine]
                row[f"identity.{name}"] = self._mean(values)
                row[f"misses.{name}"] = sum(v is None for v in values)
            row["prompt_similarity"] = self._mean([r.prompt_similarity for r in mine])
            rows.append(row)
        return rows

    def history_record(self) -> dict[str, Any]:
        """What goes into each identity's eval history (TOML: no None values)."""
        record: dict[str, Any] = {
            "date": self.created, "prompt_set": self.prompt_set, "model": self.model,
            "seeds": len(self.seeds), "steps": self.steps, "images": len(
                [r for r in self.images if not r.baseline]),
            "clip": self.clip or "none", "identities": list(self.names),
        }
        if self.guidance is not None:
            record["guidance"] = float(self.guidance)
        for scope, baseline in (("", False), ("baseline_", True)):
            if not any(r.baseline == baseline for r in self.images):
                continue
            for key, value in self.summary(baseline).items():
                if value is not None and key != "images":
                    record[scope + key.replace(".", "_")] = round(float(value), 4)
        return record

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready result."""
        return {
            "names": self.names, "model": self.model, "prompt_set": self.prompt_set,
            "seeds": self.seeds, "steps": self.steps, "guidance": self.guidance,
            "clip": self.clip, "sheet": str(self.sheet) if self.sheet else None,
            "created": self.created, "notes": self.notes,
            "summary": self.summary(False),
            "baseline_summary": self.summary(True) if any(r.baseline for r in self.images)
            else None,
            "per_prompt": self.per_prompt(False),
            "images": [{"prompt": r.prompt, "clip_text": r.clip_text, "seed": r.seed,
                        "path": str(r.path), "baseline": r.baseline, "faces": r.faces,
                        "identity": r.identity, "told_apart": r.told_apart,
                        "prompt_similarity": r.prompt_similarity} for r in self.images],
        }


def check_eval_options(names: Sequence[str], seeds: int, steps: int) -> None:
    """Raise InvalidOption for settings that cannot work (before anything loads)."""
    if not names:
        raise InvalidOption("Name at least one identity to evaluate.")
    if len(set(names)) != len(names):
        raise InvalidOption("An identity is named twice.")
    if len(names) > 4:
        raise InvalidOption("Evaluate at most 4 identities together.")
    if not 1 <= seeds <= MAX_SEEDS:
        raise InvalidOption(f"--seeds must be between 1 and {MAX_SEEDS}.")
    if not 1 <= steps <= 1000:
        raise InvalidOption("--steps must be between 1 and 1000.")


def evaluate(names: Sequence[str], *, model: str | None = None, device: str = "auto",
             dtype: str = "auto", seeds: int = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS,
             guidance: float | None = None, clip: str | None = None, baseline: bool = False,
             out_dir: str | Path = "evals", record: bool = True,
             progress: ProgressCallback | None = None) -> EvalResult:
    """Render the prompt set for ``names`` and measure identity and prompt similarity.

    ``clip`` None skips prompt similarity. Everything that can be checked without a model is
    checked first (names, identities, basis, options, the CLIP model's availability comes
    next). The summary is appended to each identity's eval history unless ``record`` is False.
    """
    import io

    import numpy as np
    from PIL import Image

    from . import faces, models, registry, rendering, storage
    from .clipscore import load_clip

    names = list(names)
    check_eval_options(names, seeds, steps)
    for name in names:
        registry.validate_name(name)
    idents = registry.read_identity_set(names)
    missing = [i.name for i in idents if not i.load_face_embeddings()]
    if missing:
        raise InvalidOption(f"{', '.join(missing)} has no stored face embedding (imported "
                            "without its face), so identity similarity cannot be measured.")
    prompts = prompt_set(names)
    # Plan one render up front: options, identities, basis and model are checked here.
    plan = rendering.plan_render(prompts[0][0], model=model)
    spec = plan.spec
    torch_device = models.resolve_device(device)
    scorer = load_clip(clip, torch_device) if clip else None
    encoders = {i.name: faces.load_face_encoder(i.meta.get("face_encoder", "vggface2"),
                                                device=torch_device) for i in idents}
    references = {i.name: np.stack(i.load_face_embeddings()) for i in idents}
    components = models.load_pipeline_components(
        spec, torch_device, rendering.render_dtype(dtype, torch_device), progress=progress)
    out = Path(out_dir).expanduser()
    seed_list = list(range(seeds))
    runs = [(p, c, False) for p, c in prompts]
    if baseline:
        runs += [(c, c, True) for _, c in prompts]
    total = len(runs) * seeds * steps
    done = [0]
    # One guidance for every run, baseline included, so the two are comparable.
    used_guidance = guidance if guidance is not None else rendering.default_guidance(True)

    def step_progress(phase: str, count: int, of: int, info: dict[str, Any]) -> None:
        if progress is not None and phase == "render":
            progress("eval", done[0] + count, total, {})

    records: list[ImageRecord] = []
    images: list[Any] = []
    notes = list(plan.notes)
    for prompt, clip_text, is_baseline in runs:
        result = rendering.render_prompt(
            prompt, num_images=seeds, steps=steps, guidance=used_guidance, seed=0,
            out_dir=out, components=components, progress=step_progress)
        done[0] += seeds * steps
        for note in result.notes:
            if note not in notes:
                notes.append(note)
        rendered = []
        for path in result.paths:
            with Image.open(path) as image:
                rendered.append(image.convert("RGB"))
        similarities = scorer.similarity([clip_text] * len(rendered), rendered) if scorer \
            else [None] * len(rendered)
        for seed_value, path, image, similarity in zip(seed_list, result.paths, rendered,
                                                      similarities, strict=True):
            scored = score_faces(image, references, encoders, device="cpu")
            records.append(ImageRecord(
                prompt=prompt, clip_text=clip_text, seed=seed_value, path=path,
                baseline=is_baseline, faces=scored.faces, identity=scored.matched,
                told_apart=scored.told_apart, prompt_similarity=similarity))
            images.append(image)
    sheet_path = None
    if images:
        sheet = rendering.contact_sheet(images, columns=seeds)  # a row per prompt
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        stem = "eval-" + "-".join(names)
        sheet_path = storage.write_new_user_file(out, f"{stem}-sheet", ".png",
                                                 buffer.getvalue())
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    evaluation = EvalResult(names=names, model=spec.ref, prompt_set=PROMPT_SET_VERSION,
                            seeds=seed_list, steps=steps, guidance=used_guidance,
                            clip=scorer.ref if scorer else None, images=records,
                            sheet=sheet_path, created=created, notes=notes)
    if record:
        registry.append_history(names, "evals", evaluation.history_record())
    return evaluation
