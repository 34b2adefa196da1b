"""The prompt-set run of `celebctl eval`: render fixed prompts for a few seeds, then score.

Images go through `render` (:func:`celebctl.rendering.render_prompt`) and are kept, never
overwritten, in the output folder, with a labelled contact sheet; the summary is appended to
each identity's eval history. ``baseline`` renders the same prompts and seeds with each
identity replaced by "a person": the similarity a prompt reaches without the identity.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidOption
from . import sheets
from .scoring import check_face_embeddings, load_face_references, mean, score_image

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
MAX_STEPS = 1000
# Far above any useful scale (7.5 and 10 are usual); higher only burns the image.
MAX_GUIDANCE = 100.0

ProgressCallback = Callable[[str, float, int, dict[str, Any]], None]  # done may be fractional


def prompt_set(names: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt naming the identities, CLIP text with each identity as "a person") pairs."""
    if len(names) == 1:
        return [(t.format(names[0]), t.format(GENERIC)) for t in SINGLE_PROMPTS]
    pairs = [(t.format(a=names[0], b=names[1]), t.format(a=GENERIC, b="another person"))
             for t in PAIR_PROMPTS]
    singles = [(t.format(name), t.format(GENERIC)) for name in names for t in SINGLE_PROMPTS[:4]]
    return pairs + singles


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
    sampler: str = "DDIM"  # the WebUI's names, as the images' PNG text says
    schedule_type: str = "Automatic"

    def summary(self, baseline: bool = False) -> dict[str, Any]:
        """Means over the identity (or baseline) images."""
        rows = [r for r in self.images if r.baseline == baseline]
        out: dict[str, Any] = {"images": len(rows)}
        for name in self.names:
            values = [r.identity.get(name) for r in rows]
            out[f"identity_similarity.{name}"] = mean(values)
            out[f"miss_rate.{name}"] = (sum(v is None for v in values) / len(values)
                                        if values else None)
        out["prompt_similarity"] = mean([r.prompt_similarity for r in rows])
        if len(self.names) > 1:
            apart = [r.told_apart for r in rows if r.told_apart is not None]
            out["told_apart_rate"] = sum(apart) / len(apart) if apart else None
        return out

    def per_prompt(self, baseline: bool = False) -> list[dict[str, Any]]:
        """One row per prompt: mean similarities and misses over its seeds. A row of the
        identity's prompts carries, under "baseline", the same numbers for its "a person"
        version when the run had --baseline."""
        rows = []
        for prompt in dict.fromkeys(r.prompt for r in self.images if r.baseline == baseline):
            mine = [r for r in self.images if r.prompt == prompt and r.baseline == baseline]
            row = self._means(prompt, mine)
            if not baseline:
                theirs = self.baseline_of(prompt)
                if theirs:
                    row["baseline"] = self._means(theirs[0].prompt, theirs)
            rows.append(row)
        return rows

    def baseline_of(self, prompt: str) -> list[ImageRecord]:
        """The baseline images of the identity prompt ``prompt`` (its CLIP text rendered as
        the prompt, "a person" in the identity's place); [] without --baseline."""
        clip_text = next((r.clip_text for r in self.images
                          if r.prompt == prompt and not r.baseline), None)
        return [r for r in self.images if r.baseline and r.prompt == clip_text]

    def _means(self, prompt: str, records: list[ImageRecord]) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": prompt, "images": len(records)}
        for name in self.names:
            values = [r.identity.get(name) for r in records]
            row[f"identity.{name}"] = mean(values)
            row[f"misses.{name}"] = sum(v is None for v in values)
        row["prompt_similarity"] = mean([r.prompt_similarity for r in records])
        return row

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
        record["sampler"] = self.sampler
        record["schedule_type"] = self.schedule_type
        if self.sheet is not None:  # `serve`'s gallery shows the latest sheet
            record["sheet"] = str(Path(self.sheet).resolve())
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
            "sampler": self.sampler, "schedule_type": self.schedule_type,
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


def check_names(names: Sequence[str]) -> None:
    """Raise InvalidOption unless ``names`` are 1 to 4 distinct identities."""
    if not names:
        raise InvalidOption("Name at least one identity to evaluate.")
    if len(set(names)) != len(names):
        raise InvalidOption("An identity is named twice.")
    if len(names) > 4:
        raise InvalidOption("Evaluate at most 4 identities together.")


def check_eval_options(names: Sequence[str], seeds: int, steps: int,
                       guidance: float | None = None) -> None:
    """Raise InvalidOption for settings that cannot work (before anything loads)."""
    check_names(names)
    if not 1 <= seeds <= MAX_SEEDS:
        raise InvalidOption(f"--seeds must be between 1 and {MAX_SEEDS}.")
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidOption(f"--steps must be between 1 and {MAX_STEPS}.")
    if guidance is not None and not (isinstance(guidance, (int, float))
                                     and math.isfinite(guidance)
                                     and 0 <= guidance <= MAX_GUIDANCE):
        raise InvalidOption(f"--guidance must be a number between 0 and {MAX_GUIDANCE:g} "
                            "(default 10, as `render` uses for identities).")


def sheet_caption_rows(result: EvalResult) -> tuple[str, list[str], list[str | None]]:
    """The sheet's title, row labels (a row per prompt, baseline rows marked) and captions."""
    title = (f"{result.prompt_set}, {len(result.seeds)} seed(s) per prompt, {result.steps} "
             f"steps, {result.model}. Mean over {result.summary(False)['images']} images: "
             + sheets.summary_text(result.names, result.summary(False)))
    if any(r.baseline for r in result.images):
        title += (" | baseline ('a person'): "
                  + sheets.summary_text(result.names, result.summary(True)))
    labels: list[str] = []
    captions: list[str | None] = []
    for record in sheet_records(result)[::sheet_columns(result)]:
        labels.append(record.prompt)
    for record in sheet_records(result):
        text = sheets.caption(result.names, record.faces, record.identity,
                              record.prompt_similarity)
        captions.append(f"a person\n{text}" if record.baseline else text)
    return title, labels, captions


def sheet_columns(result: EvalResult) -> int:
    """Images per sheet row: a prompt's seeds, then its baseline's seeds beside them."""
    return len(result.seeds) * (2 if any(r.baseline for r in result.images) else 1)


def sheet_records(result: EvalResult) -> list[ImageRecord]:
    """The images in sheet order: each identity prompt's, then its baseline's beside them."""
    ordered: list[ImageRecord] = []
    for prompt in dict.fromkeys(r.prompt for r in result.images if not r.baseline):
        ordered += [r for r in result.images if r.prompt == prompt and not r.baseline]
        ordered += result.baseline_of(prompt)
    return ordered


def evaluate(names: Sequence[str], *, model: str | None = None, device: str = "auto",
             dtype: str = "auto", seeds: int = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS,
             guidance: float | None = None, clip: str | None = None, baseline: bool = False,
             out_dir: str | Path = "evals", record: bool = True,
             sheet: str | Path | None = None,
             progress: ProgressCallback | None = None, sampler: str | None = None,
             schedule: str | None = None, clip_skip: int | None = None) -> EvalResult:
    """Render the prompt set for ``names`` and measure identity and prompt similarity.

    ``clip`` None skips prompt similarity. Everything that can be checked without a model is
    checked first (names, options, identities, basis, the sheet's path; the CLIP model's
    availability comes next). The labelled contact sheet goes to ``sheet`` when given, else
    into ``out_dir``. The summary is appended to each identity's eval history unless
    ``record`` is False. ``sampler`` and ``schedule`` are the WebUI's names, as for `render`
    (default: the config's, else DDIM). Every image, baseline included, reads the text encoder
    at ``clip_skip``, else at the identities' own clip skip.
    """
    from PIL import Image

    from .. import models, registry, rendering
    from ..clipscore import load_clip

    names = list(names)
    check_eval_options(names, seeds, steps, guidance)
    choice = rendering.sampler_choice(sampler=sampler, schedule=schedule)  # before loading
    for name in names:
        registry.validate_name(name)
    sheet_target = sheets.check_sheet_path(sheet) if sheet is not None else None
    idents = registry.read_identity_set(names)
    check_face_embeddings(idents)
    prompts = prompt_set(names)
    # Plan one render up front: options, identities, basis and model are checked here.
    plan = rendering.plan_render(prompts[0][0], model=model, clip_skip=clip_skip)
    spec = plan.spec
    torch_device = models.resolve_device(device)
    scorer = load_clip(clip, torch_device) if clip else None
    references = load_face_references(idents, torch_device)
    components = models.load_pipeline_components(
        spec, torch_device, rendering.render_dtype(dtype, torch_device), progress=progress)
    out = Path(out_dir).expanduser()
    seed_list = list(range(seeds))
    runs = [(p, c, False) for p, c in prompts]
    if baseline:
        # Each "a person" text once (two identities' singles share theirs).
        runs += [(c, c, True) for c in dict.fromkeys(c for _, c in prompts)]
    total = len(runs) * seeds  # the bar counts images; a run's steps move it in fractions
    done = [0]
    # One guidance for every run, baseline included, so the two are comparable.
    used_guidance = guidance if guidance is not None else rendering.default_guidance(True)

    def step_progress(phase: str, count: int, of: int, info: dict[str, Any]) -> None:
        if progress is not None and phase == "render" and of:
            progress("eval", done[0] + seeds * count / of, total, {})

    records: list[ImageRecord] = []
    thumbnails: dict[Path, Any] = {}
    schedule_type = choice.schedule
    notes = list(plan.notes)
    for prompt, clip_text, is_baseline in runs:
        result = rendering.render_prompt(
            prompt, num_images=seeds, steps=steps, guidance=used_guidance, seed=0,
            sampler=sampler, schedule=schedule,
            out_dir=out, components=components, progress=step_progress,
            clip_skip=plan.clip_skip)
        done[0] += seeds
        schedule_type = result.schedule_type
        for note in result.notes:
            if note not in notes:
                notes.append(note)
        rendered = []
        for path in result.paths:  # files this run just wrote
            with Image.open(path) as image:
                rendered.append(image.convert("RGB"))
        similarities = scorer.similarity([clip_text] * len(rendered), rendered) if scorer \
            else [None] * len(rendered)
        for seed_value, path, image, similarity in zip(seed_list, result.paths, rendered,
                                                      similarities, strict=True):
            scored = score_image(image, references)
            records.append(ImageRecord(
                prompt=prompt, clip_text=clip_text, seed=seed_value, path=path,
                baseline=is_baseline, faces=scored.faces, identity=scored.matched,
                told_apart=scored.told_apart, prompt_similarity=similarity))
            thumbnails[path] = sheets.thumbnail(image)
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    evaluation = EvalResult(names=names, model=spec.ref, prompt_set=PROMPT_SET_VERSION,
                            seeds=seed_list, steps=steps, guidance=used_guidance,
                            clip=scorer.ref if scorer else None, images=records,
                            sheet=None, created=created, notes=notes,
                            sampler=choice.sampler.name, schedule_type=schedule_type)
    if thumbnails:
        title, labels, captions = sheet_caption_rows(evaluation)
        # A row per prompt, its baseline's images beside its own.
        data = sheets.sheet_png([thumbnails[r.path] for r in sheet_records(evaluation)],
                                sheet_columns(evaluation), title, labels, captions)
        evaluation.sheet = sheets.write_sheet(data, path=sheet_target, folder=out,
                                              stem="eval-" + "-".join(names) + "-sheet")
    if record:
        registry.append_history(names, "evals", evaluation.history_record())
    return evaluation
